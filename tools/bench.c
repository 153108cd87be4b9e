/* pgscope-bench: the same closed-loop workloads, in one run against one server, through
 * hand-written non-blocking libpq on a libevent loop (the baseline), through pgscope's guards,
 * through pgscope's transactions on the pool, and through pgbench; it prints transactions per
 * second, p50/p99 latency and the ratios between them. Uses the public header only (plus
 * libpq and libevent directly for the baseline). Not a test: see README, Performance. */
#include <getopt.h>
#include <malloc.h>
#include <pgscope.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

static struct event_base *base;
static int accounts = 100000; /* pgbench_accounts rows (scale 1) */
static unsigned seed = 12345;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "pgscope-bench: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(2);
}

/* ---- one measured run: clients in a closed loop until the deadline ---- */

typedef struct run {
    double end_at;
    int active; /* clients still running */
    double *lat;
    size_t nlat, cap;
    long errors;
} run;

static void record(run *r, double started)
{
    if (r->nlat == r->cap) {
        r->cap = r->cap ? r->cap * 2 : 65536;
        r->lat = realloc(r->lat, r->cap * sizeof *r->lat);
        if (!r->lat)
            die("out of memory");
    }
    r->lat[r->nlat++] = now_s() - started;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

typedef struct result {
    char name[64];
    double tps, p50_ms, p99_ms;
    long errors;
} result;

enum { MAX_RESULTS = 256 };
static result results[MAX_RESULTS];
static int nresults;
static const char *only; /* --only: comma-separated parts of workload names to run */

/* Is this workload left out by --only? */
static int skipped(const char *name)
{
    if (!only)
        return 0;
    for (const char *p = only; *p;) {
        size_t n = strcspn(p, ",");
        if (n > 0 && n < 64) {
            char part[64];
            memcpy(part, p, n);
            part[n] = '\0';
            if (strstr(name, part))
                return 0;
        }
        p += n + (p[n] == ',');
    }
    return 1;
}

static result *new_result(void)
{
    if (nresults == MAX_RESULTS)
        die("too many workloads for one run (at most %d)", MAX_RESULTS);
    return &results[nresults++];
}

static result *finish_run(run *r, const char *name, double seconds)
{
    result *res = new_result();
    snprintf(res->name, sizeof res->name, "%s", name);
    qsort(r->lat, r->nlat, sizeof *r->lat, cmp_double);
    res->tps = (double)r->nlat / seconds;
    res->p50_ms = r->nlat ? r->lat[r->nlat / 2] * 1e3 : 0;
    res->p99_ms = r->nlat ? r->lat[(size_t)((double)r->nlat * 0.99)] * 1e3 : 0;
    res->errors = r->errors;
    free(r->lat);
    printf("  %-44s %9.0f tx/s  p50 %6.3f ms  p99 %6.3f ms%s\n", name, res->tps, res->p50_ms,
           res->p99_ms, r->errors ? "  (errors!)" : "");
    fflush(stdout);
    return res;
}

static void drive(run *r)
{
    while (r->active > 0)
        event_base_loop(base, EVLOOP_ONCE);
}

static char *random_aid(char *buf)
{
    snprintf(buf, 16, "%d", 1 + (int)(rand_r(&seed) % (unsigned)accounts));
    return buf;
}

static const char update_sql[] =
    "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = $1::int";

/* ---- the baseline: hand-written non-blocking libpq on the same loop ---- */

typedef enum { W_SELECT, W_TX3, W_TXPIPE } workload;

typedef struct raw {
    PGconn *pg;
    struct event *ev;
    run *r;
    workload w;
    int prepared; /* execute by name (prepared once per connection), as pgbench -M prepared */
    int step;
    double t0;
    char aid[16];
} raw;

/* The baseline's statements: prepared once per connection as s0, s1, ... (what careful
 * hand-written libpq does), or sent unnamed (parsed every time) for comparison. */
static const char *const raw_sql[] = {"SELECT 1", "BEGIN", update_sql, "COMMIT"};
enum { RS_SELECT, RS_BEGIN, RS_UPDATE, RS_COMMIT, RS_COUNT };

static int raw_stmt(raw *c, int which)
{
    const char *v[] = {c->aid};
    int np = which == RS_UPDATE;
    if (c->prepared) {
        char name[8];
        snprintf(name, sizeof name, "s%d", which);
        return PQsendQueryPrepared(c->pg, name, np, np ? v : NULL, NULL, NULL, 0);
    }
    return PQsendQueryParams(c->pg, raw_sql[which], np, NULL, np ? v : NULL, NULL, NULL, 0);
}

static void raw_prepare(PGconn *pg, int count)
{
    for (int i = 0; i < count; i++) {
        char name[8];
        snprintf(name, sizeof name, "s%d", i);
        PGresult *res = PQprepare(pg, name, raw_sql[i], i == RS_UPDATE, NULL);
        if (PQresultStatus(res) != PGRES_COMMAND_OK)
            die("raw libpq: prepare: %s", PQerrorMessage(pg));
        PQclear(res);
    }
}

static void raw_send(raw *c)
{
    static const int tx3[] = {RS_BEGIN, RS_UPDATE, RS_COMMIT};
    int ok = 1;
    switch (c->w) {
    case W_SELECT:
        ok = raw_stmt(c, RS_SELECT);
        break;
    case W_TX3:
        ok = raw_stmt(c, tx3[c->step]);
        break;
    case W_TXPIPE:
        ok = raw_stmt(c, RS_BEGIN) && raw_stmt(c, RS_UPDATE) && raw_stmt(c, RS_COMMIT) &&
             PQpipelineSync(c->pg);
        break;
    }
    if (!ok || PQflush(c->pg) < 0)
        die("raw libpq: %s", PQerrorMessage(c->pg));
}

static void raw_start(raw *c)
{
    if (now_s() >= c->r->end_at) {
        c->r->active--;
        return;
    }
    c->t0 = now_s();
    c->step = 0;
    random_aid(c->aid);
    raw_send(c);
}

static void raw_readable(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    raw *c = arg;
    if (!PQconsumeInput(c->pg))
        die("raw libpq: %s", PQerrorMessage(c->pg));
    for (;;) {
        if (PQisBusy(c->pg))
            return;
        PGresult *res = PQgetResult(c->pg);
        if (c->w == W_TXPIPE) {
            if (!res)
                continue; /* the end of one statement's results */
            ExecStatusType st = PQresultStatus(res);
            PQclear(res);
            if (st == PGRES_FATAL_ERROR || st == PGRES_PIPELINE_ABORTED)
                c->r->errors++;
            if (st != PGRES_PIPELINE_SYNC)
                continue;
            record(c->r, c->t0);
            raw_start(c);
            return;
        }
        if (res) {
            if (PQresultStatus(res) == PGRES_FATAL_ERROR)
                c->r->errors++;
            PQclear(res);
            continue;
        }
        /* NULL: this statement is done */
        if (c->w == W_TX3 && ++c->step < 3) {
            raw_send(c);
            return;
        }
        record(c->r, c->t0);
        raw_start(c);
        return;
    }
}

static void bench_raw(const char *conninfo, workload w, int prepared, int n, double seconds,
                      const char *name)
{
    if (skipped(name))
        return;
    raw *cs = calloc((size_t)n, sizeof *cs);
    run r = {0};
    for (int i = 0; i < n; i++) {
        cs[i].pg = PQconnectdb(conninfo);
        if (PQstatus(cs[i].pg) != CONNECTION_OK)
            die("raw libpq: %s", PQerrorMessage(cs[i].pg));
        if (prepared)
            raw_prepare(cs[i].pg, RS_COUNT);
        PQsetnonblocking(cs[i].pg, 1);
        cs[i].prepared = prepared;
        if (w == W_TXPIPE)
            PQenterPipelineMode(cs[i].pg);
        cs[i].r = &r;
        cs[i].w = w;
        cs[i].ev = event_new(base, PQsocket(cs[i].pg), EV_READ | EV_PERSIST, raw_readable, &cs[i]);
        event_add(cs[i].ev, NULL);
    }
    r.end_at = now_s() + seconds;
    r.active = n;
    double t0 = now_s();
    for (int i = 0; i < n; i++)
        raw_start(&cs[i]);
    drive(&r);
    double el = now_s() - t0;
    for (int i = 0; i < n; i++) {
        event_free(cs[i].ev);
        PQfinish(cs[i].pg);
    }
    free(cs);
    finish_run(&r, name, el);
}

/* ---- pgscope: a guard per connection, a statement at a time ---- */

typedef struct guard_client {
    pgs_conn *conn;
    run *r;
    double t0;
} guard_client;

static void opened(pgs_conn *c, const pgs_error *err, void *arg)
{
    (void)c;
    if (err)
        die("pgscope: %s", err->message);
    (*(int *)arg)++;
}

static void closed(void *arg)
{
    (*(int *)arg)++;
}

static void guard_next(guard_client *g);

static void guard_done(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg)
{
    (void)c;
    (void)res;
    guard_client *g = arg;
    if (err)
        g->r->errors++;
    record(g->r, g->t0);
    guard_next(g);
}

static void guard_next(guard_client *g)
{
    if (now_s() >= g->r->end_at) {
        g->r->active--;
        return;
    }
    g->t0 = now_s();
    if (pgs_query(g->conn, "SELECT 1", 0, NULL, guard_done, g) != PGS_OK)
        die("pgscope: cannot queue");
}

static void bench_guard(const char *conninfo, int n, double seconds, const char *name)
{
    if (skipped(name))
        return;
    guard_client *gs = calloc((size_t)n, sizeof *gs);
    run r = {0};
    int up = 0;
    for (int i = 0; i < n; i++) {
        gs[i].r = &r;
        if (pgs_conn_open(base, conninfo, NULL, opened, &up, &gs[i].conn) != PGS_OK)
            die("pgscope: cannot open");
    }
    while (up < n)
        event_base_loop(base, EVLOOP_ONCE);
    r.end_at = now_s() + seconds;
    r.active = n;
    double t0 = now_s();
    for (int i = 0; i < n; i++)
        guard_next(&gs[i]);
    drive(&r);
    double el = now_s() - t0;
    int down = 0;
    for (int i = 0; i < n; i++)
        pgs_conn_close(gs[i].conn, closed, &down);
    while (down < n)
        event_base_loop(base, EVLOOP_ONCE);
    free(gs);
    finish_run(&r, name, el);
}

/* ---- pgscope: BEGIN; UPDATE; COMMIT through pgs_pool_run_tx ---- */

typedef struct tx_client {
    pgs_pool *pool;
    run *r;
    double t0;
    char aid[16];
    const pgs_tx_opts *opts;
    int wait_update; /* the plain form: COMMIT only after the UPDATE's reply */
} tx_client;

static void tx_next(tx_client *t);

static void updated(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg)
{
    (void)c;
    (void)res;
    (void)err;
    pgs_tx_end(arg, 1, NULL, NULL);
}

static void ignore(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg)
{
    (void)c;
    (void)res;
    (void)err;
    (void)arg;
}

static void tx_body(pgs_tx *tx, void *arg)
{
    tx_client *t = arg;
    const char *v[] = {t->aid};
    if (t->wait_update) {
        pgs_tx_query(tx, update_sql, 1, v, updated, tx);
        return;
    }
    pgs_tx_query(tx, update_sql, 1, v, ignore, NULL);
    pgs_tx_end(tx, 1, NULL, NULL);
}

static void tx_done(const pgs_tx_result *res, void *arg)
{
    tx_client *t = arg;
    if (res->outcome != PGS_TX_COMMITTED)
        t->r->errors++;
    record(t->r, t->t0);
    tx_next(t);
}

static void tx_next(tx_client *t)
{
    if (now_s() >= t->r->end_at) {
        t->r->active--;
        return;
    }
    t->t0 = now_s();
    random_aid(t->aid);
    if (pgs_pool_run_tx(t->pool, t->opts, tx_body, tx_done, t) != PGS_OK)
        die("pgscope: cannot queue a transaction");
}

static void pool_closed(void *arg)
{
    *(int *)arg = 1;
}

static void wait_pool_full(pgs_pool *p, int n)
{
    for (pgs_pool_counts st;;) {
        pgs_pool_stats(p, &st);
        if (st.idle >= n)
            return;
        event_base_loop(base, EVLOOP_ONCE);
    }
}

static void bench_tx(const char *conninfo, int n, double seconds, int plain, pgs_pool_reset reset,
                     int resolvable, const char *name)
{
    if (skipped(name))
        return;
    pgs_pool_opts po = {.min_size = n, .max_size = n, .reset = reset};
    pgs_pool *pool;
    if (pgs_pool_new(base, conninfo, &po, &pool) != PGS_OK)
        die("pgscope: cannot create a pool");
    wait_pool_full(pool, n);
    pgs_tx_opts opts = {.begin_alone = plain, .resolvable = resolvable};
    tx_client *ts = calloc((size_t)n, sizeof *ts);
    run r = {0};
    for (int i = 0; i < n; i++)
        ts[i] = (tx_client){.pool = pool, .r = &r, .opts = &opts, .wait_update = plain};
    r.end_at = now_s() + seconds;
    r.active = n;
    double t0 = now_s();
    for (int i = 0; i < n; i++)
        tx_next(&ts[i]);
    drive(&r);
    double el = now_s() - t0;
    int done = 0;
    pgs_pool_close(pool, pool_closed, &done);
    while (!done)
        event_base_loop(base, EVLOOP_ONCE);
    free(ts);
    finish_run(&r, name, el);
}

/* ---- pgbench, the server's own tool, on the same server in the same run ---- */

static const char *pgbench_path(void)
{
    static char path[512];
    FILE *f = popen("ls -d /usr/lib/postgresql/*/bin/pgbench 2>/dev/null | sort -V | tail -1", "r");
    if (!f || !fgets(path, sizeof path, f)) {
        if (f)
            pclose(f);
        return NULL;
    }
    pclose(f);
    path[strcspn(path, "\n")] = '\0';
    return path[0] ? path : NULL;
}

/* How pgbench runs the transaction: in 3 round trips, inside \startpipeline, or inside
 * \startpipeline after the same session reset the pool sends on each return by default
 * (PGS_RESET_SESSION; pgbench 15 has no \syncpipeline, so it is one segment, not two): the
 * same statements per transaction as pgscope's pooled one, in one round trip too. */
enum { PGB_3RT, PGB_PIPELINED, PGB_PIPELINED_RESET };

static void bench_pgbench(const char *pgbench, const char *conninfo, int n, double seconds,
                          int how, const char *name)
{
    if (skipped(name))
        return;
    char script[] = "/tmp/pgscope-bench-XXXXXX";
    int fd = mkstemp(script);
    if (fd < 0)
        die("cannot write the pgbench script");
    FILE *f = fdopen(fd, "w");
    int pipelined = how != PGB_3RT;
    fprintf(f, "\\set aid random(1, %d)\n%s%sBEGIN;\n"
               "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;\n"
               "COMMIT;\n%s",
            accounts, pipelined ? "\\startpipeline\n" : "",
            how == PGB_PIPELINED_RESET
                ? "CLOSE ALL;\nSET SESSION AUTHORIZATION DEFAULT;\nRESET ALL;\nUNLISTEN *;\n"
                  "SELECT pg_advisory_unlock_all();\nDISCARD TEMP;\nDISCARD SEQUENCES;\n"
                : "",
            pipelined ? "\\endpipeline\n" : "");
    fclose(f);
    char cmd[2048];
    snprintf(cmd, sizeof cmd,
             "'%s' -n -M prepared -f '%s' -c %d -j 1 -T %d '%s' 2>&1", pgbench, script, n,
             (int)(seconds + 0.5), conninfo);
    FILE *out = popen(cmd, "r");
    double tps = 0, lat = 0;
    char line[512];
    while (out && fgets(line, sizeof line, out)) {
        sscanf(line, "latency average = %lf ms", &lat);
        sscanf(line, "tps = %lf", &tps);
    }
    if (out)
        pclose(out);
    unlink(script);
    result *res = new_result();
    snprintf(res->name, sizeof res->name, "%s", name);
    res->tps = tps;
    res->p50_ms = lat; /* pgbench reports the average; shown in the p50 column, marked */
    res->p99_ms = 0;
    printf("  %-44s %9.0f tx/s  avg %6.3f ms  (pgbench, -M prepared)\n", name, tps, lat);
    fflush(stdout);
}

/* ---- memory: pgscope's own bytes per connection, beyond libpq's ---- */

static size_t heap_in_use(void)
{
    struct mallinfo2 mi = mallinfo2();
    return mi.uordblks + mi.hblkhd;
}

static void bench_memory(const char *conninfo, int n)
{
    /* n raw PGconn, then n guards: the difference is pgscope's state (libevent's events
     * included, which a hand-written loop would need too, in some form). */
    PGconn **pg = calloc((size_t)n, sizeof *pg);
    size_t before = heap_in_use();
    for (int i = 0; i < n; i++) {
        pg[i] = PQconnectdb(conninfo);
        if (PQstatus(pg[i]) != CONNECTION_OK)
            die("raw libpq: %s", PQerrorMessage(pg[i]));
        PQsetnonblocking(pg[i], 1);
        PQenterPipelineMode(pg[i]);
    }
    size_t raw_bytes = heap_in_use() - before;
    for (int i = 0; i < n; i++)
        PQfinish(pg[i]);
    free(pg);
    pgs_conn **gs = calloc((size_t)n, sizeof *gs);
    int up = 0;
    before = heap_in_use();
    for (int i = 0; i < n; i++)
        pgs_conn_open(base, conninfo, NULL, opened, &up, &gs[i]);
    while (up < n)
        event_base_loop(base, EVLOOP_ONCE);
    size_t guard_bytes = heap_in_use() - before;
    int down = 0;
    for (int i = 0; i < n; i++)
        pgs_conn_close(gs[i], closed, &down);
    while (down < n)
        event_base_loop(base, EVLOOP_ONCE);
    free(gs);
    long per = ((long)guard_bytes - (long)raw_bytes) / n;
    printf("  memory: libpq %zu B per connection, pgscope guard %zu B: pgscope's own %ld B "
           "per connection (%d connections)\n",
           raw_bytes / (size_t)n, guard_bytes / (size_t)n, per, n);
}

/* ---- scale: 10,000 transaction requests queued at once on a 20-connection pool ---- */

typedef struct scale_req {
    double queued, started;
    int fired, committed;
} scale_req;

static void scale_body(pgs_tx *tx, void *arg)
{
    scale_req *q = arg;
    q->started = now_s();
    char aid[16];
    const char *v[] = {random_aid(aid)};
    pgs_tx_query(tx, update_sql, 1, v, ignore, NULL);
    pgs_tx_end(tx, 1, NULL, NULL);
}

static int scale_fired;

static void scale_done(const pgs_tx_result *res, void *arg)
{
    scale_req *q = arg;
    q->fired++;
    q->committed = res->outcome == PGS_TX_COMMITTED;
    scale_fired++;
}

static long max_rss_kb(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_maxrss;
}

static void bench_scale(const char *conninfo, int requests, int poolsize)
{
    pgs_pool_opts po = {.min_size = poolsize, .max_size = poolsize, .acquire_timeout_ms = -1};
    pgs_pool *pool;
    if (pgs_pool_new(base, conninfo, &po, &pool) != PGS_OK)
        die("pgscope: cannot create a pool");
    wait_pool_full(pool, poolsize);
    scale_req *q = calloc((size_t)requests, sizeof *q);
    size_t heap0 = heap_in_use(), heap_peak = heap0;
    long rss0 = max_rss_kb();
    double t0 = now_s();
    scale_fired = 0;
    for (int i = 0; i < requests; i++) {
        q[i].queued = now_s();
        if (pgs_pool_run_tx(pool, NULL, scale_body, scale_done, &q[i]) != PGS_OK)
            die("pgscope: cannot queue");
    }
    size_t heap_queued = heap_in_use();
    while (scale_fired < requests) {
        event_base_loop(base, EVLOOP_ONCE);
        size_t h = heap_in_use();
        if (h > heap_peak)
            heap_peak = h;
    }
    double el = now_s() - t0;
    int once = 0, committed = 0;
    double *wait = calloc((size_t)requests, sizeof *wait);
    for (int i = 0; i < requests; i++) {
        once += q[i].fired == 1;
        committed += q[i].committed;
        wait[i] = q[i].started - q[i].queued;
    }
    qsort(wait, (size_t)requests, sizeof *wait, cmp_double);
    int done = 0;
    pgs_pool_close(pool, pool_closed, &done);
    while (!done)
        event_base_loop(base, EVLOOP_ONCE);
    size_t heap_after = heap_in_use();
    printf("  scale: %d requests queued at once on a pool of %d: %d done exactly once, %d "
           "committed, in %.2f s (%.0f tx/s)\n",
           requests, poolsize, once, committed, el, requests / el);
    printf("         queue wait p50 %.0f ms, p99 %.0f ms; heap %zu KiB before, %zu KiB with all "
           "queued (%zu B per request), peak %zu KiB, %zu KiB after; max RSS %ld -> %ld KiB\n",
           wait[requests / 2] * 1e3, wait[(size_t)(requests * 0.99)] * 1e3, heap0 / 1024,
           heap_queued / 1024, (heap_queued - heap0) / (size_t)requests, heap_peak / 1024,
           heap_after / 1024, rss0, max_rss_kb());
    free(wait);
    free(q);
}

/* ---- instructions per statement (run under valgrind --tool=callgrind) ---- */

static long fixed_left;

static void fixed_guard_done(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg)
{
    (void)res;
    (void)arg;
    if (err)
        die("pgscope: %s", err->message);
    if (--fixed_left > 0)
        pgs_query(c, "SELECT 1", 0, NULL, fixed_guard_done, NULL);
}

static void fixed_raw_readable(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    PGconn *pg = arg;
    PQconsumeInput(pg);
    while (!PQisBusy(pg)) {
        PGresult *res = PQgetResult(pg);
        if (res) {
            PQclear(res);
            continue;
        }
        if (--fixed_left > 0) {
            PQsendQueryPrepared(pg, "s0", 0, NULL, NULL, NULL, 0);
            PQflush(pg);
        }
        return;
    }
}

/* Only this function's instructions are counted (callgrind --toggle-collect): the same
 * `count` statements one after another, through raw libpq or through a guard. */
__attribute__((noinline)) static void measured_statements(int guard, void *conn, long count)
{
    fixed_left = count;
    if (guard) {
        pgs_query(conn, "SELECT 1", 0, NULL, fixed_guard_done, NULL);
    } else {
        PQsendQueryPrepared(conn, "s0", 0, NULL, NULL, NULL, 0);
        PQflush(conn);
    }
    while (fixed_left > 0)
        event_base_loop(base, EVLOOP_ONCE);
}

static void instructions_mode(const char *conninfo, const char *mode, long count)
{
    int guard = strcmp(mode, "guard") == 0;
    if (!guard && strcmp(mode, "raw") != 0)
        die("--instructions takes raw or guard");
    if (guard) {
        pgs_conn *c;
        int up = 0, down = 0;
        pgs_conn_open(base, conninfo, NULL, opened, &up, &c);
        while (!up)
            event_base_loop(base, EVLOOP_ONCE);
        measured_statements(1, c, count);
        pgs_conn_close(c, closed, &down);
        while (!down)
            event_base_loop(base, EVLOOP_ONCE);
    } else {
        PGconn *pg = PQconnectdb(conninfo);
        if (PQstatus(pg) != CONNECTION_OK)
            die("raw libpq: %s", PQerrorMessage(pg));
        raw_prepare(pg, 1); /* s0 is SELECT 1: executed by name, as the guard's cache does */
        PQsetnonblocking(pg, 1);
        struct event *ev = event_new(base, PQsocket(pg), EV_READ | EV_PERSIST, fixed_raw_readable, pg);
        event_add(ev, NULL);
        measured_statements(0, pg, count);
        event_free(ev);
        PQfinish(pg);
    }
}

/* ---- setup and the table of ratios ---- */

static void quiet(void *arg, const char *message)
{
    (void)arg;
    (void)message;
}

static void setup_tables(const char *conninfo)
{
    PGconn *pg = PQconnectdb(conninfo);
    if (PQstatus(pg) != CONNECTION_OK)
        die("cannot connect: %s", PQerrorMessage(pg));
    PQsetNoticeProcessor(pg, quiet, NULL);
    char sql[512];
    snprintf(sql, sizeof sql, "SELECT count(*) FROM pgbench_accounts");
    PGresult *r = PQexec(pg, sql);
    int have = PQresultStatus(r) == PGRES_TUPLES_OK ? atoi(PQgetvalue(r, 0, 0)) : -1;
    PQclear(r);
    if (have != accounts) {
        printf("setting up pgbench_accounts with %d rows\n", accounts);
        PQclear(PQexec(pg, "DROP TABLE IF EXISTS pgbench_accounts"));
        PQclear(PQexec(pg, "CREATE TABLE pgbench_accounts (aid int PRIMARY KEY, bid int, "
                           "abalance int, filler char(84)) WITH (fillfactor = 100)"));
        snprintf(sql, sizeof sql,
                 "INSERT INTO pgbench_accounts SELECT g, 1, 0, '' FROM generate_series(1, %d) g",
                 accounts);
        r = PQexec(pg, sql);
        if (PQresultStatus(r) != PGRES_COMMAND_OK)
            die("setup: %s", PQerrorMessage(pg));
        PQclear(r);
        PQclear(PQexec(pg, "VACUUM ANALYZE pgbench_accounts"));
    }
    PQfinish(pg);
}

/* A workload's throughput: the mean over its runs (the guard pair runs twice, see main). */
static double tps_of(const char *name)
{
    double sum = 0;
    int runs = 0;
    for (int i = 0; i < nresults; i++)
        if (strcmp(results[i].name, name) == 0) {
            sum += results[i].tps;
            runs++;
        }
    return runs ? sum / runs : 0;
}

static void ratio(const char *what, const char *a, const char *b, double target)
{
    double x = tps_of(a), y = tps_of(b);
    if (x <= 0 || y <= 0)
        return;
    if (target <= 0) { /* for information: no target */
        printf("  %-66s %5.2fx\n", what, x / y);
        return;
    }
    printf("  %-66s %5.2fx  (target >= %.2fx: %s)\n", what, x / y, target,
           x / y >= target ? "met" : "NOT met");
}

static const char *const usage_text =
    "usage: pgscope-bench --tcp CONNINFO [--unix CONNINFO] [options]\n"
    "\n"
    "Runs the same closed-loop workloads through raw non-blocking libpq (the baseline),\n"
    "pgscope's guards, pgscope's pooled transactions and pgbench, against one server in one\n"
    "run, and prints tx/s, p50/p99 latency and the ratios.\n"
    "\n"
    "  --tcp S          conninfo over TCP loopback (default: $PGSCOPE_TEST_CONNINFO)\n"
    "  --unix S         conninfo over the Unix socket (default: $PGSCOPE_SOCKET_CONNINFO)\n"
    "  --seconds N      duration of each measured run (default 1: all of it in under a minute)\n"
    "  --clients LIST   connection counts (default 1,8,32)\n"
    "  --requests N     the scale run's queued requests (default 10000)\n"
    "  --no-pgbench     skip pgbench\n"
    "  --variants       also run the baseline with unnamed statements, and pooled transactions\n"
    "                   without a reset, with DISCARD ALL and with pgs_tx_opts.resolvable, and\n"
    "                   pgbench's pipelined transaction after the pool's default reset\n"
    "  --only LIST      run only the workloads whose names contain one of these (comma-separated)\n"
    "  --instructions raw|guard [--count N]\n"
    "                   only run N statements one way (for callgrind; see tools/run-bench)\n";

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"tcp", required_argument, 0, 't'},      {"unix", required_argument, 0, 'u'},
        {"seconds", required_argument, 0, 's'},  {"clients", required_argument, 0, 'c'},
        {"requests", required_argument, 0, 'r'}, {"no-pgbench", no_argument, 0, 'P'},
        {"instructions", required_argument, 0, 'i'}, {"count", required_argument, 0, 'n'},
        {"only", required_argument, 0, 'o'},    {"variants", no_argument, 0, 'V'},
        {"help", no_argument, 0, 'h'},           {0, 0, 0, 0}};
    const char *instructions = NULL;
    long count = 20000;
    const char *tcp = getenv("PGSCOPE_TEST_CONNINFO"), *unix_ci = getenv("PGSCOPE_SOCKET_CONNINFO");
    double seconds = 1;
    char clients_list[64] = "1,8,32";
    int requests = 10000, use_pgbench = 1, variants = 0;
    for (int ch; (ch = getopt_long(argc, argv, "h", longopts, NULL)) != -1;) {
        switch (ch) {
        case 't': tcp = optarg; break;
        case 'u': unix_ci = optarg; break;
        case 's': seconds = atof(optarg); break;
        case 'c': snprintf(clients_list, sizeof clients_list, "%s", optarg); break;
        case 'r': requests = atoi(optarg); break;
        case 'P': use_pgbench = 0; break;
        case 'i': instructions = optarg; break;
        case 'n': count = atol(optarg); break;
        case 'o': only = optarg; break;
        case 'V': variants = 1; break;
        case 'h': fputs(usage_text, stdout); return 0;
        default: fputs(usage_text, stderr); return 2;
        }
    }
    if (!tcp || !*tcp)
        die("no server: give --tcp CONNINFO (or run it through tools/run-bench)");
    if (seconds <= 0 || requests <= 0)
        die("--seconds and --requests must be positive");
    base = event_base_new();
    if (instructions) { /* one mode, for callgrind: see tools/run-bench */
        instructions_mode(unix_ci && *unix_ci ? unix_ci : tcp, instructions, count);
        event_base_free(base);
        return 0;
    }
    setup_tables(tcp);
    const char *pgbench = use_pgbench ? pgbench_path() : NULL;
    int clients[8], nclients = 0;
    for (char *tok = strtok(clients_list, ","); tok && nclients < 8; tok = strtok(NULL, ","))
        clients[nclients++] = atoi(tok);

    struct {
        const char *label, *conninfo;
    } nets[2] = {{"unix", unix_ci}, {"tcp", tcp}};
    for (int ni = 0; ni < 2; ni++) {
        if (!nets[ni].conninfo || !*nets[ni].conninfo)
            continue;
        for (int ci = 0; ci < nclients; ci++) {
            int n = clients[ci];
            char name[64];
            printf("\n%s, %d connection(s)\n", nets[ni].label, n);
#define NAME(fmt) (snprintf(name, sizeof name, fmt " %s %d", nets[ni].label, n), name)
            const char *ci = nets[ni].conninfo;
            /* The two sides of a targeted ratio alternate in slices, A B B A A B B A ...: a
             * drift of the machine (it is shared and noisy) weighs on both alike, and a row's
             * figure is the mean of its slices. k slices of about a second per side (pgbench
             * takes whole seconds), at least one. */
            int k = seconds < 1.5 ? 1 : (int)(seconds + 0.5);
            for (int i = 0; i < 4 * k; i++) {
                if (i % 4 == 1 || i % 4 == 2)
                    bench_guard(ci, n, seconds / (2 * k), NAME("pgscope guard SELECT 1"));
                else
                    bench_raw(ci, W_SELECT, 1, n, seconds / (2 * k), NAME("raw libpq SELECT 1"));
            }
            if (variants)
                bench_raw(ci, W_SELECT, 0, n, seconds, NAME("raw libpq unnamed SELECT 1"));
            /* Rows no target compares: half the time in the quick run (under a minute). */
            double info = k == 1 ? seconds / 2 : seconds;
            bench_raw(ci, W_TX3, 1, n, info, NAME("raw libpq tx 3 round trips"));
            bench_raw(ci, W_TXPIPE, 1, n, info, NAME("raw libpq tx pipelined"));
            bench_tx(ci, n, seconds, 1, PGS_RESET_SESSION, 0, NAME("pgscope pool tx 3 round trips"));
            if (!pgbench)
                bench_tx(ci, n, seconds, 0, PGS_RESET_SESSION, 0,
                         NAME("pgscope pool tx one round trip"));
            for (int i = 0; pgbench && i < 2 * k; i++) { /* against pgbench's pipelined script */
                if (i % 4 == 1 || i % 4 == 2)
                    bench_pgbench(pgbench, ci, n, seconds / k, PGB_PIPELINED,
                                  NAME("pgbench tx pipelined"));
                else
                    bench_tx(ci, n, seconds / k, 0, PGS_RESET_SESSION, 0,
                             NAME("pgscope pool tx one round trip"));
            }
            if (variants) {
                bench_tx(ci, n, seconds, 0, PGS_RESET_NONE, 0, NAME("pgscope tx no reset"));
                bench_tx(ci, n, seconds, 0, PGS_RESET_ALL, 0, NAME("pgscope tx DISCARD ALL"));
                bench_tx(ci, n, seconds, 0, PGS_RESET_SESSION, 1, NAME("pgscope tx resolvable"));
            }
            if (pgbench) {
                bench_pgbench(pgbench, ci, n, seconds, PGB_3RT, NAME("pgbench tx 3 round trips"));
                if (variants)
                    bench_pgbench(pgbench, ci, n, seconds, PGB_PIPELINED_RESET,
                                  NAME("pgbench tx pipelined + reset"));
            }
        }
    }
    printf("\nratios (same server, same run)\n");
    for (int ni = 0; ni < 2; ni++) {
        if (!nets[ni].conninfo || !*nets[ni].conninfo)
            continue;
        for (int ci = 0; ci < nclients; ci++) {
            int n = clients[ci];
            char a[64], b[64], what[128];
            const char *l = nets[ni].label;
            snprintf(a, sizeof a, "pgscope guard SELECT 1 %s %d", l, n);
            snprintf(b, sizeof b, "raw libpq SELECT 1 %s %d", l, n);
            snprintf(what, sizeof what, "guard / raw libpq, SELECT 1, %s, %d conn", l, n);
            ratio(what, a, b, 0.95);
            snprintf(a, sizeof a, "pgscope pool tx one round trip %s %d", l, n);
            snprintf(b, sizeof b, "pgscope pool tx 3 round trips %s %d", l, n);
            snprintf(what, sizeof what, "pgscope tx one round trip / its 3 round trips, %s, %d conn", l, n);
            ratio(what, a, b, 1.4);
            snprintf(b, sizeof b, "pgbench tx pipelined %s %d", l, n);
            snprintf(what, sizeof what, "pgscope tx one round trip / pgbench pipelined, %s, %d conn", l, n);
            ratio(what, a, b, 1.0);
            snprintf(b, sizeof b, "raw libpq tx pipelined %s %d", l, n);
            snprintf(what, sizeof what, "  pgscope tx one round trip / raw libpq pipelined, %s, %d conn", l, n);
            ratio(what, a, b, 0);
            if (!variants)
                continue;
            snprintf(b, sizeof b, "pgbench tx pipelined + reset %s %d", l, n);
            snprintf(what, sizeof what, "  one round trip / pgbench pipelined + the same reset, %s, %d conn",
                     l, n);
            ratio(what, a, b, 0);
            snprintf(b, sizeof b, "pgbench tx pipelined %s %d", l, n);
            static const char *const variant[] = {"no reset", "DISCARD ALL", "resolvable"};
            for (int vi = 0; vi < 3; vi++) {
                snprintf(a, sizeof a, "pgscope tx %s %s %d", variant[vi], l, n);
                snprintf(what, sizeof what, "  one round trip, %s / pgbench pipelined, %s, %d conn",
                         variant[vi], l, n);
                ratio(what, a, b, 0);
            }
        }
    }
    printf("\n");
    bench_memory(tcp, 50);
    bench_scale(tcp, requests, 20);
    event_base_free(base);
    return 0;
}

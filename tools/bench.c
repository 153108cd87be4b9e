/* pgscope-bench: the same closed-loop workloads, in one run against one server, through
 * hand-written non-blocking libpq on a libevent loop (the baseline), through pgscope's guards,
 * through pgscope's transactions on the pool (plain and multiplexed), and through pgbench; it
 * prints transactions per second, p50/p99 latency, the client's CPU per transaction and the
 * ratios between them, and checks on the server that every transaction row's commits are
 * there. On request (--only copy-in,stream) the bulk-data part: COPY FROM STDIN through pgscope
 * against psql's \copy, and a streamed SELECT through pgscope against raw libpq in single-row
 * mode. Uses the public header only (plus libpq and libevent directly for the baseline). Not a
 * test: see README, Performance. */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <malloc.h>
#include <pgscope.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static struct event_base *base;
static int accounts = 100000; /* pgscope_bench_accounts rows (pgbench's scale 1) */
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
    long committed;    /* transactions the run saw commit (checked on the server) */
    int checked;       /* a transaction row: the balances are compared before and after */
    long long sum0;    /* the balances' sum before the window */
    double t0, cpu0;   /* the window's start: wall clock, this process's CPU */
    double elapsed, cpu_s;
    int conns_used;    /* a pool's connections in use, the most seen (0: not a pool) */
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
    double tps, p50_ms, p99_ms; /* pgbench: p50_ms holds its average (avg_only) */
    double cpu_us;              /* client CPU (user + system) per transaction */
    long errors, committed;
    int avg_only;
    int check;      /* the server's balances against the commits: 1 equal, -1 not, 0 unchecked */
    int conns_used; /* see run */
} result;

enum { MAX_RESULTS = 1024 };
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

/* The heading of the rows that follow ("unix, 8 connection(s)"), printed before the first of
 * them only: a section whose workloads --only leaves out prints nothing. */
static char section[128];

static void print_section(void)
{
    if (section[0])
        printf("%s", section);
    section[0] = '\0';
}

static result *new_result(void)
{
    if (nresults == MAX_RESULTS)
        die("too many workloads for one run (at most %d)", MAX_RESULTS);
    return &results[nresults++];
}

/* One row as it was measured: throughput, latency, the client's CPU per transaction (per
 * statement for SELECT 1), the pool's connections in use and the server-side check. */
static void print_row(const result *res)
{
    print_section();
    printf("  %-52s %9.0f tx/s  ", res->name, res->tps);
    if (res->avg_only)
        printf("avg %7.3f ms %15s", res->p50_ms, "");
    else
        printf("p50 %7.3f ms  p99 %7.3f ms", res->p50_ms, res->p99_ms);
    printf("  cpu %6.1f µs/tx", res->cpu_us);
    if (res->conns_used)
        printf("  in use %d", res->conns_used);
    if (res->check)
        printf("  %s", res->check > 0 ? "check ok" : "CHECK FAILED");
    if (res->errors)
        printf("  (%ld errors!)", res->errors);
    printf("\n");
    fflush(stdout);
}

static double cpu_self_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
           (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

static long long balance_sum(void);
static int check_commits(const char *name, long long before, long committed);

/* The measured window, for `clients` running until `seconds` have passed: the wall clock and
 * this process's CPU from here to window_close. A transaction row reads the balances' sum
 * first, outside the window. */
static void window_open(run *r, int clients, double seconds)
{
    if (r->checked)
        r->sum0 = balance_sum();
    r->active = clients;
    r->t0 = now_s();
    r->cpu0 = cpu_self_s();
    r->end_at = r->t0 + seconds;
}

static void window_close(run *r)
{
    r->elapsed = now_s() - r->t0;
    r->cpu_s = cpu_self_s() - r->cpu0;
}

/* After the run has ended (every transaction answered, its connections closed). */
static result *finish_run(run *r, const char *name)
{
    result *res = new_result();
    snprintf(res->name, sizeof res->name, "%s", name);
    qsort(r->lat, r->nlat, sizeof *r->lat, cmp_double);
    res->tps = r->elapsed > 0 ? (double)r->nlat / r->elapsed : 0;
    res->p50_ms = r->nlat ? r->lat[r->nlat / 2] * 1e3 : 0;
    res->p99_ms = r->nlat ? r->lat[(size_t)((double)r->nlat * 0.99)] * 1e3 : 0;
    res->cpu_us = r->nlat ? r->cpu_s * 1e6 / (double)r->nlat : 0;
    res->errors = r->errors;
    res->committed = r->committed;
    res->conns_used = r->conns_used;
    res->check = r->checked ? check_commits(name, r->sum0, r->committed) : 0;
    free(r->lat);
    print_row(res);
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

/* The mark on the tables the benchmark creates (a comment): a table of one of their names
 * without it is someone else's, and the benchmark never drops or alters it. */
static const char copy_table_marker[] = "pgscope-bench: created and dropped by the benchmark";

/* 1 when `table` exists and is the benchmark's own, 0 when it does not exist; a table of that
 * name without the mark stops the benchmark. */
static int own_table(PGconn *pg, const char *table)
{
    const char *params[1] = {table};
    PGresult *r = PQexecParams(pg,
                               "SELECT obj_description(c, 'pg_class') FROM "
                               "to_regclass($1) c WHERE c IS NOT NULL",
                               1, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(r) != PGRES_TUPLES_OK)
        die("checking %s: %s", table, PQerrorMessage(pg));
    int exists = PQntuples(r) > 0;
    if (exists && (PQgetisnull(r, 0, 0) || strcmp(PQgetvalue(r, 0, 0), copy_table_marker) != 0))
        die("a table %s exists that pgscope-bench did not create; not touching it (drop or "
            "rename it yourself)",
            table);
    PQclear(r);
    return exists;
}

/* pgscope_bench_accounts (pgbench_accounts' shape, the benchmark's own) is checked (and set up)
 * on first use, so that a run --only leaves without a workload on it does not touch it. */
static const char *accounts_conninfo;
static int accounts_ready;
static void setup_tables(const char *conninfo);

static void need_accounts(void)
{
    if (!accounts_ready)
        setup_tables(accounts_conninfo);
    accounts_ready = 1;
}

/* ---- result checks: the server holds what the committed transactions wrote ---- */

/* Every transaction the benchmark runs adds 1 to one account's balance, so over a row the sum
 * of the balances must grow by exactly the commits the row reports: a commit reported but not
 * made, or made but reported as failed, shows. A mismatch is printed loudly and makes the exit
 * status 1. The rows run one after another, so nothing else writes meanwhile. */
static PGconn *check_pg;
static int check_failures;

static long long balance_sum(void)
{
    need_accounts();
    if (!check_pg) {
        check_pg = PQconnectdb(accounts_conninfo);
        if (PQstatus(check_pg) != CONNECTION_OK)
            die("cannot connect: %s", PQerrorMessage(check_pg));
    }
    PGresult *r = PQexec(check_pg, "SELECT coalesce(sum(abalance), 0) FROM pgscope_bench_accounts");
    if (PQresultStatus(r) != PGRES_TUPLES_OK)
        die("reading the balances: %s", PQerrorMessage(check_pg));
    long long sum = atoll(PQgetvalue(r, 0, 0));
    PQclear(r);
    return sum;
}

/* 1 when the balances grew by `committed` since `before`; otherwise -1, loudly. */
static int check_commits(const char *name, long long before, long committed)
{
    long long grew = balance_sum() - before;
    if (grew == committed)
        return 1;
    check_failures++;
    fflush(stdout);
    fprintf(stderr,
            "pgscope-bench: RESULT CHECK FAILED: %s: %ld transactions reported committed, but "
            "the balances grew by %lld (%+lld)\n",
            name, committed, grew, grew - committed);
    printf("  !!! RESULT CHECK FAILED: %s: %ld commits reported, the server holds %lld\n", name,
           committed, grew);
    return -1;
}

static const char update_sql[] =
    "UPDATE pgscope_bench_accounts SET abalance = abalance + 1 WHERE aid = $1::int";

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

/* A COMMIT that committed: the server answers a COMMIT of a failed transaction with the tag
 * ROLLBACK, not an error. */
static void count_commit(run *r, const PGresult *res)
{
    if (PQresultStatus(res) == PGRES_COMMAND_OK &&
        strcmp(PQcmdStatus((PGresult *)res), "COMMIT") == 0)
        r->committed++;
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
            count_commit(c->r, res);
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
            count_commit(c->r, res);
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
    need_accounts(); /* prepared: the UPDATE too, whatever the workload */
    raw *cs = calloc((size_t)n, sizeof *cs);
    run r = {.checked = w != W_SELECT};
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
    window_open(&r, n, seconds);
    for (int i = 0; i < n; i++)
        raw_start(&cs[i]);
    drive(&r);
    window_close(&r);
    for (int i = 0; i < n; i++) {
        event_free(cs[i].ev);
        PQfinish(cs[i].pg);
    }
    free(cs);
    finish_run(&r, name);
}

/* ---- a light tracer: what pgs_hooks costs when set ---- */

/* What a light tracer or metrics exporter does per statement: stamp the start with the clock
 * (a span's start), and at the end take the duration the library measured, bump counters and a
 * log2 latency histogram. Set on the guards of the "+ hooks" rows and the guard-hooks
 * instructions mode; without it (NULL) the library pays a pointer test. */
typedef struct light_tracer {
    long started, ended, failed;
    long long last_start_ns, total_us;
    long buckets[32]; /* duration_us in [2^i, 2^(i+1)) */
} light_tracer;

static light_tracer tracer;

static void lt_stmt_start(pgs_conn *c, const char *sql, void *arg)
{
    (void)c;
    (void)sql;
    light_tracer *t = arg;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    t->last_start_ns = (long long)ts.tv_sec * 1000000000 + ts.tv_nsec;
    t->started++;
}

static void lt_stmt_end(pgs_conn *c, const pgs_stmt_trace *tr, void *arg)
{
    (void)c;
    light_tracer *t = arg;
    t->ended++;
    t->failed += tr->err != NULL;
    t->total_us += tr->duration_us;
    unsigned long long us = tr->duration_us > 0 ? (unsigned long long)tr->duration_us : 1;
    int b = 63 - __builtin_clzll(us);
    t->buckets[b < 31 ? b : 31]++;
}

static const pgs_hooks light_hooks = {.stmt_start = lt_stmt_start, .stmt_end = lt_stmt_end,
                                      .arg = &tracer};

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

/* hooks: NULL, or the light tracer (whose counts must then match the statements run). */
static void bench_guard(const char *conninfo, int n, double seconds, const pgs_hooks *hooks,
                        const char *name)
{
    if (skipped(name))
        return;
    guard_client *gs = calloc((size_t)n, sizeof *gs);
    run r = {0};
    int up = 0;
    pgs_conn_opts opts = {.hooks = hooks};
    memset(&tracer, 0, sizeof tracer);
    for (int i = 0; i < n; i++) {
        gs[i].r = &r;
        if (pgs_conn_open(base, conninfo, &opts, opened, &up, &gs[i].conn) != PGS_OK)
            die("pgscope: cannot open");
    }
    while (up < n)
        event_base_loop(base, EVLOOP_ONCE);
    window_open(&r, n, seconds);
    for (int i = 0; i < n; i++)
        guard_next(&gs[i]);
    drive(&r);
    window_close(&r);
    int down = 0;
    for (int i = 0; i < n; i++)
        pgs_conn_close(gs[i].conn, closed, &down);
    while (down < n)
        event_base_loop(base, EVLOOP_ONCE);
    free(gs);
    if (hooks && (tracer.ended != (long)r.nlat || tracer.started != tracer.ended))
        die("the tracer saw %ld statements start and %ld end, the run %zu", tracer.started,
            tracer.ended, r.nlat);
    finish_run(&r, name);
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
    if (res->outcome == PGS_TX_COMMITTED)
        t->r->committed++;
    else
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

/* A pooled transaction workload: `callers` clients in a closed loop (each starts its next
 * transaction from the last one's done) on a pool of `conns` connections, plain or
 * multiplexed (pgs_pool_opts.multiplex; mux_depth 0 is the library's default). */
typedef struct tx_spec {
    int conns, callers;
    int multiplex, mux_depth;
    int plain; /* BEGIN, UPDATE and COMMIT each on a round trip of its own */
    pgs_pool_reset reset;
    int resolvable;
} tx_spec;

/* The pool's connections in use, the most seen: sampled every 10 ms, so that the window pays
 * a call per sample, not per transaction. arg: a client (its pool, its run). */
static void sample_in_use(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    tx_client *t = arg;
    pgs_pool_counts st;
    pgs_pool_stats(t->pool, &st);
    if (st.in_use > t->r->conns_used)
        t->r->conns_used = st.in_use;
}

static void bench_tx(const char *conninfo, const tx_spec *spec, double seconds, const char *name)
{
    if (skipped(name))
        return;
    need_accounts();
    pgs_pool_opts po = {.min_size = spec->conns, .max_size = spec->conns, .reset = spec->reset,
                        .multiplex = spec->multiplex, .mux_depth = spec->mux_depth};
    pgs_pool *pool;
    if (pgs_pool_new(base, conninfo, &po, &pool) != PGS_OK)
        die("pgscope: cannot create a pool");
    wait_pool_full(pool, spec->conns);
    pgs_tx_opts opts = {.begin_alone = spec->plain, .resolvable = spec->resolvable};
    int n = spec->callers;
    tx_client *ts = calloc((size_t)n, sizeof *ts);
    run r = {.checked = 1};
    for (int i = 0; i < n; i++)
        ts[i] = (tx_client){.pool = pool, .r = &r, .opts = &opts, .wait_update = spec->plain};
    static const struct timeval every = {0, 10000};
    struct event *sampler = event_new(base, -1, EV_PERSIST, sample_in_use, &ts[0]);
    event_add(sampler, &every);
    window_open(&r, n, seconds);
    for (int i = 0; i < n; i++)
        tx_next(&ts[i]);
    drive(&r);
    window_close(&r);
    event_free(sampler);
    int done = 0;
    pgs_pool_close(pool, pool_closed, &done);
    while (!done)
        event_base_loop(base, EVLOOP_ONCE);
    free(ts);
    finish_run(&r, name);
}

/* ---- pgbench, the server's own tool, on the same server in the same run ---- */

/* A client program of the highest installed PostgreSQL (pgbench, psql), or NULL. */
static const char *pg_tool_path(const char *tool, char *path, size_t size)
{
    char cmd[256];
    snprintf(cmd, sizeof cmd, "ls -d /usr/lib/postgresql/*/bin/%s 2>/dev/null | sort -V | tail -1",
             tool);
    FILE *f = popen(cmd, "r");
    if (!f || !fgets(path, (int)size, f)) {
        if (f)
            pclose(f);
        return NULL;
    }
    pclose(f);
    path[strcspn(path, "\n")] = '\0';
    return path[0] ? path : NULL;
}

static const char *pgbench_path(void)
{
    static char path[512];
    return pg_tool_path("pgbench", path, sizeof path);
}

/* How pgbench runs the transaction: in 3 round trips, inside \startpipeline, or inside
 * \startpipeline after the same session reset the pool sends on each return by default
 * (PGS_RESET_SESSION; pgbench 15 has no \syncpipeline, so it is one segment, not two): the
 * same statements per transaction as pgscope's pooled one, in one round trip too. */
enum { PGB_3RT, PGB_PIPELINED, PGB_PIPELINED_RESET };

/* A PostgreSQL client tool's command: the conninfo without its password (see psql_prepare). */
typedef struct psql_cmd {
    const char *path;
    char *conninfo;
    int has_password;
} psql_cmd;
static char copy_file[64], pass_file[64];
static psql_cmd psql_prepare(const char *conninfo);

/* A pipe, then a child: the stdio buffers flushed first, so nothing is written twice. Returns
 * fork's answer; p holds both ends in both processes. */
static pid_t fork_piped(int p[2])
{
    if (pipe(p) != 0)
        die("pipe: %s", strerror(errno));
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0)
        die("fork: %s", strerror(errno));
    return pid;
}

/* Run a PostgreSQL client tool (psql, pgbench) with `argv`, its output (stderr too when
 * asked) into a pipe; the password, if any, through the password file, never on its command
 * line; messages untranslated. Returns its pid; *rd is the pipe's end to read. */
static pid_t run_tool(const char *path, char *const *argv, const psql_cmd *pc, int with_stderr,
                      int *rd)
{
    int p[2];
    pid_t pid = fork_piped(p);
    if (pid == 0) {
        dup2(p[1], 1);
        if (with_stderr)
            dup2(p[1], 2);
        close(p[0]);
        close(p[1]);
        if (pc->has_password) {
            setenv("PGPASSFILE", pass_file, 1);
            unsetenv("PGPASSWORD");
        }
        setenv("LC_ALL", "C", 1); /* "Time: 12.345 ms", "tps = ...": with a decimal point */
        unsetenv("LANGUAGE");
        execvp(path, argv);
        fprintf(stderr, "pgscope-bench: cannot run %s: %s\n", path, strerror(errno));
        _exit(127);
    }
    close(p[1]);
    *rd = p[0];
    return pid;
}
static void pass_file_remove(void);

/* The script: the transaction once per run, or `depth` transactions (each with an account of
 * its own) inside one \startpipeline ... \endpipeline, for which pgbench counts one
 * "transaction" per script run. */
static void write_pgbench_script(char *path, int how, int depth)
{
    int fd = mkstemp(path);
    FILE *f = fd < 0 ? NULL : fdopen(fd, "w");
    if (!f)
        die("cannot write the pgbench script");
    int pipelined = how != PGB_3RT;
    for (int i = 0; i < depth; i++)
        fprintf(f, "\\set aid%d random(1, %d)\n", i, accounts);
    if (pipelined)
        fputs("\\startpipeline\n", f);
    if (how == PGB_PIPELINED_RESET)
        fputs("CLOSE ALL;\nSET SESSION AUTHORIZATION DEFAULT;\nRESET ALL;\nUNLISTEN *;\n"
              "SELECT pg_advisory_unlock_all();\nDISCARD TEMP;\nDISCARD SEQUENCES;\n",
              f);
    for (int i = 0; i < depth; i++)
        fprintf(f, "BEGIN;\nUPDATE pgscope_bench_accounts SET abalance = abalance + 1 WHERE "
                   "aid = :aid%d;\nCOMMIT;\n",
                i);
    if (pipelined)
        fputs("\\endpipeline\n", f);
    if (fclose(f) != 0)
        die("cannot write the pgbench script");
}

/* What one pgbench run reported, and its CPU (user + system, from wait4). */
typedef struct pgbench_out {
    double tps, lat_ms, cpu_s;
    double connect_ms; /* its "initial connection time" */
    long processed;    /* script runs: pgbench's "transactions" */
    int failed;        /* a non-zero exit status (an aborted client) */
} pgbench_out;

/* pgbench -M prepared with `clients` clients on one thread, for `limit` ("-T" seconds or "-t"
 * script runs per client) `value`. Its errors are shown; the rest of its output is read. */
static pgbench_out pgbench_once(const char *pgbench, const psql_cmd *pc, char *script, int clients,
                                char *limit, int value)
{
    char nclients[16], nvalue[16];
    snprintf(nclients, sizeof nclients, "%d", clients);
    snprintf(nvalue, sizeof nvalue, "%d", value);
    char *argv[] = {"pgbench", "-n", "-M", "prepared", "-f", script, "-c", nclients,
                    "-j", "1", limit, nvalue, pc->conninfo, NULL};
    int rd;
    pid_t pid = run_tool(pgbench, argv, pc, 1, &rd);
    FILE *out = fdopen(rd, "r");
    pgbench_out o = {0};
    char line[512];
    while (out && fgets(line, sizeof line, out)) {
        sscanf(line, "latency average = %lf ms", &o.lat_ms);
        sscanf(line, "tps = %lf", &o.tps);
        sscanf(line, "number of transactions actually processed: %ld", &o.processed);
        sscanf(line, "initial connection time = %lf ms", &o.connect_ms);
        if (strstr(line, "error") || strstr(line, "abort"))
            fprintf(stderr, "  pgbench: %s", line);
    }
    if (out)
        fclose(out);
    int st;
    struct rusage ru;
    while (wait4(pid, &st, 0, &ru) < 0 && errno == EINTR)
        ;
    o.cpu_s = (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
              (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
    o.failed = !WIFEXITED(st) || WEXITSTATUS(st) != 0;
    return o;
}

/* pgbench's start (connecting: over TCP each connection's SCRAM key derivation costs
 * milliseconds of CPU; reading the script; preparing) is not part of its throughput, and the
 * in-process rows count their measured window only: so its CPU is measured once per script
 * and client count with -t 1 and taken off the timed runs'. Its -T clock runs from before the
 * connections (32 logins over TCP took over a second on a loaded machine, and a one-second
 * run then ran nothing), so the timed runs get the connection time of that run on top. */
typedef struct pgbench_start {
    const char *conninfo;
    int clients, how, depth;
    double cpu_s, connect_s;
} pgbench_start;

static pgbench_start pgbench_start_cost(const char *pgbench, const psql_cmd *pc, char *script,
                                        const char *conninfo, int clients, int how, int depth)
{
    static pgbench_start seen[64];
    static int nseen;
    for (int i = 0; i < nseen; i++)
        if (seen[i].conninfo == conninfo && seen[i].clients == clients && seen[i].how == how &&
            seen[i].depth == depth)
            return seen[i];
    pgbench_out o = pgbench_once(pgbench, pc, script, clients, "-t", 1);
    pgbench_start st = {conninfo, clients, how, depth, o.cpu_s, o.connect_ms / 1e3};
    if (nseen < 64)
        seen[nseen++] = st;
    return st;
}

/* pgbench on `clients` connections; `depth` transactions per script run (pipelined only):
 * the row's tx/s and commits are pgbench's figures times depth. */
static void bench_pgbench(const char *pgbench, const char *conninfo, int clients, double seconds,
                          int how, int depth, const char *name)
{
    if (skipped(name))
        return;
    need_accounts();
    char script[] = "/tmp/pgscope-bench-XXXXXX";
    write_pgbench_script(script, how, depth);
    /* The conninfo without its password, which goes through a password file: never on a
     * command line (ps shows those to every user). */
    psql_cmd pc = psql_prepare(conninfo);
    pgbench_start start = pgbench_start_cost(pgbench, &pc, script, conninfo, clients, how, depth);
    long long sum0 = balance_sum();
    pgbench_out o = pgbench_once(pgbench, &pc, script, clients, "-T",
                                 (int)(seconds + start.connect_s + 0.5));
    if (o.processed == 0) {
        o.failed = 1;
        fprintf(stderr, "pgscope-bench: %s: pgbench ran no transaction\n", name);
    }
    free(pc.conninfo);
    pass_file_remove();
    unlink(script);
    result *res = new_result();
    snprintf(res->name, sizeof res->name, "%s", name);
    res->tps = o.tps * depth;
    res->p50_ms = o.lat_ms; /* pgbench reports the average (of a script run: a pipeline) */
    res->avg_only = 1;
    res->committed = o.processed * depth;
    double cpu = o.cpu_s > start.cpu_s ? o.cpu_s - start.cpu_s : 0;
    res->cpu_us = res->committed ? cpu * 1e6 / (double)res->committed : 0;
    res->errors = o.failed;
    res->check = check_commits(name, sum0, res->committed);
    print_row(res);
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
    need_accounts();
    pgs_pool_opts po = {.min_size = poolsize, .max_size = poolsize, .acquire_timeout_ms = -1};
    pgs_pool *pool;
    if (pgs_pool_new(base, conninfo, &po, &pool) != PGS_OK)
        die("pgscope: cannot create a pool");
    wait_pool_full(pool, poolsize);
    scale_req *q = calloc((size_t)requests, sizeof *q);
    long long sum0 = balance_sum();
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
    int check = check_commits("scale", sum0, committed);
    printf("  scale: %d requests queued at once on a pool of %d: %d done exactly once, %d "
           "committed, in %.2f s (%.0f tx/s); %s\n",
           requests, poolsize, once, committed, el, requests / el,
           check > 0 ? "check ok" : "CHECK FAILED");
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
    int hooks = strcmp(mode, "guard-hooks") == 0;
    int guard = hooks || strcmp(mode, "guard") == 0;
    if (!guard && strcmp(mode, "raw") != 0)
        die("--instructions takes raw, guard or guard-hooks");
    if (guard) {
        pgs_conn *c;
        int up = 0, down = 0;
        pgs_conn_opts opts = {.hooks = hooks ? &light_hooks : NULL};
        pgs_conn_open(base, conninfo, &opts, opened, &up, &c);
        while (!up)
            event_base_loop(base, EVLOOP_ONCE);
        measured_statements(1, c, count);
        pgs_conn_close(c, closed, &down);
        while (!down)
            event_base_loop(base, EVLOOP_ONCE);
        if (hooks && tracer.ended != count)
            die("the tracer saw %ld statements end, not %ld", tracer.ended, count);
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
    int have = -1;
    if (own_table(pg, "pgscope_bench_accounts")) {
        PGresult *r = PQexec(pg, "SELECT count(*) FROM pgscope_bench_accounts");
        have = PQresultStatus(r) == PGRES_TUPLES_OK ? atoi(PQgetvalue(r, 0, 0)) : -1;
        PQclear(r);
    }
    PGresult *r;
    if (have != accounts) {
        printf("setting up pgscope_bench_accounts with %d rows\n", accounts);
        PQclear(PQexec(pg, "DROP TABLE IF EXISTS pgscope_bench_accounts")); /* (its own) */
        snprintf(sql, sizeof sql,
                 "CREATE TABLE pgscope_bench_accounts (aid int PRIMARY KEY, bid int, "
                 "abalance int, filler char(84)) WITH (fillfactor = 100); "
                 "COMMENT ON TABLE pgscope_bench_accounts IS '%s'",
                 copy_table_marker);
        r = PQexec(pg, sql);
        if (PQresultStatus(r) != PGRES_COMMAND_OK)
            die("setup: %s", PQerrorMessage(pg));
        PQclear(r);
        snprintf(sql, sizeof sql,
                 "INSERT INTO pgscope_bench_accounts SELECT g, 1, 0, '' "
                 "FROM generate_series(1, %d) g",
                 accounts);
        r = PQexec(pg, sql);
        if (PQresultStatus(r) != PGRES_COMMAND_OK)
            die("setup: %s", PQerrorMessage(pg));
        PQclear(r);
        PQclear(PQexec(pg, "VACUUM ANALYZE pgscope_bench_accounts"));
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

/* A ratio against its target: at least `target` (at_most 0) or at most it (at_most 1); target
 * 0: for information. */
static void print_ratio(const char *what, double r, double target, int at_most)
{
    print_section();
    if (target <= 0) {
        printf("  %-66s %5.2fx\n", what, r);
        return;
    }
    int met = at_most ? r <= target : r >= target;
    char shown[16]; /* 2.996 is not 3.00 against a target of 3: then three decimals */
    snprintf(shown, sizeof shown, "%.2f", r);
    if (met != (at_most ? atof(shown) <= target : atof(shown) >= target))
        snprintf(shown, sizeof shown, "%.3f", r);
    printf("  %-66s %5sx  (target %s %.2fx: %s)\n", what, shown, at_most ? "<=" : ">=", target,
           met ? "met" : "NOT met");
}

static void ratio(const char *what, const char *a, const char *b, double target)
{
    double x = tps_of(a), y = tps_of(b);
    if (x <= 0 || y <= 0)
        return;
    print_ratio(what, x / y, target, 0);
}

/* The median, over the slices of a and b run one beside the other (the i-th slice of each:
 * main runs the SELECT 1 rows as A B C C B A, so the guard's i-th sits next to the hooks' i-th
 * and to raw's i-th), of a's throughput over b's; 0 without a pair. A burst of noise on the
 * shared machine then moves one pair, not the figure. */
static double paired_ratio(const char *a, const char *b, int *pairs)
{
    double ta[64], tb[64], r[64];
    int na = 0, nb = 0;
    for (int i = 0; i < nresults; i++) {
        if (strcmp(results[i].name, a) == 0 && na < 64)
            ta[na++] = results[i].tps;
        else if (strcmp(results[i].name, b) == 0 && nb < 64)
            tb[nb++] = results[i].tps;
    }
    int n = na < nb ? na : nb, m = 0;
    for (int i = 0; i < n; i++)
        if (tb[i] > 0)
            r[m++] = ta[i] / tb[i];
    *pairs = m;
    if (m == 0)
        return 0;
    qsort(r, (size_t)m, sizeof r[0], cmp_double);
    return m % 2 ? r[m / 2] : (r[m / 2 - 1] + r[m / 2]) / 2;
}

/* ---- the server's settings: what a commit costs ---- */

/* The sets tools/run-bench gives its throwaway server (--server-settings): its own (the data is
 * thrown away, so nothing waits for the disk), durable as a production server is, and durable
 * but for synchronous_commit (a COMMIT returns before its WAL is flushed: a crash loses the
 * last moments' commits, never consistency). */
static const struct settings_set {
    const char *name, *fsync, *synchronous_commit, *full_page_writes;
} settings_sets[] = {{"fast", "off", "off", "off"},
                     {"sync-off", "on", "off", "on"},
                     {"durable", "on", "on", "on"}};

static char server_line[512]; /* "PostgreSQL 15.18; fsync off, ... (fast)": beside each table */

/* Reads the settings with SHOW and names their set; `expect` (a set's name, or NULL): stop
 * unless the server has it. The benchmark never changes a server's settings. */
static void read_server_settings(const char *conninfo, const char *expect)
{
    static const char *const shown[] = {"server_version", "fsync", "synchronous_commit",
                                        "full_page_writes"};
    char val[4][64];
    PGconn *pg = PQconnectdb(conninfo);
    if (PQstatus(pg) != CONNECTION_OK)
        die("cannot connect: %s", PQerrorMessage(pg));
    for (int i = 0; i < 4; i++) {
        char sql[64];
        snprintf(sql, sizeof sql, "SHOW %s", shown[i]);
        PGresult *r = PQexec(pg, sql);
        if (PQresultStatus(r) != PGRES_TUPLES_OK)
            die("%s: %s", sql, PQerrorMessage(pg));
        snprintf(val[i], sizeof val[i], "%s", PQgetvalue(r, 0, 0));
        PQclear(r);
    }
    PQfinish(pg);
    const char *name = "neither fast, sync-off nor durable";
    for (size_t i = 0; i < sizeof settings_sets / sizeof settings_sets[0]; i++)
        if (strcmp(val[1], settings_sets[i].fsync) == 0 &&
            strcmp(val[2], settings_sets[i].synchronous_commit) == 0 &&
            strcmp(val[3], settings_sets[i].full_page_writes) == 0)
            name = settings_sets[i].name;
    snprintf(server_line, sizeof server_line,
             "PostgreSQL %s; fsync %s, synchronous_commit %s, full_page_writes %s (%s)", val[0],
             val[1], val[2], val[3], name);
    printf("server: %s\n", server_line);
    if (expect && strcmp(expect, name) != 0)
        die("the server's settings are not %s's; pgscope-bench never changes them "
            "(tools/run-bench --server-settings %s sets them on the throwaway server it starts)",
            expect, expect);
}

/* ---- multiplexed transactions: many callers on few connections ---- */

/* The section's contenders, all at `callers` closed-loop callers unless named otherwise: the
 * multiplexed pool at each size (the library's default depth, and the smallest size at depth
 * 32), each beside pgbench's pipelined script at the same depth: as many clients as the pool
 * has connections in use, as many transactions per pipeline as it keeps in flight on each. The
 * pool fills a connection to its depth before it takes another (the header's rule), so 64
 * callers at depth 16 use 4 connections of a pool of 8: its pgbench is 4 x 16, the 4's. The
 * summary shows the connections each pool had in use, and says so when that differs. Then the
 * plain pool of the largest size with the same callers (they queue for connections) and with
 * one caller per connection, and pgbench's pipelined script with one transaction per pipeline
 * on that many clients. */
enum {
    MUX_DEFAULT_DEPTH = 16, /* the library's (pgs_pool_opts.mux_depth 0) */
    MUX_DEEP = 32,
    MUX_MAX_SIZES = 8,
    MUX_MAX_ROWS = 2 * MUX_MAX_SIZES + 5,
};

typedef struct mux_row {
    char name[64];
    int pgbench;        /* pgbench's pipelined script instead of a pool */
    tx_spec spec;       /* a pool */
    int clients, depth; /* pgbench: clients, transactions per pipeline */
    int partner;        /* a multiplexed pool: its pgbench row at the same depth, or -1 */
} mux_row;

static int mux_add_pool(mux_row *rows, int n, const char *net, int conns, int callers, int depth)
{
    mux_row *m = &rows[n];
    *m = (mux_row){.spec = {.conns = conns, .callers = callers, .multiplex = depth > 0,
                            .mux_depth = depth == MUX_DEFAULT_DEPTH ? 0 : depth},
                   .partner = -1};
    if (depth > 0)
        snprintf(m->name, sizeof m->name, "mux: pgscope multiplexed %d conns depth %d %s",
                 conns, depth, net);
    else
        snprintf(m->name, sizeof m->name, "mux: pgscope pool %d conns %d callers %s", conns,
                 callers, net);
    return n + 1;
}

/* Adds pgbench's row unless the list has it; returns the new count, *at its index. */
static int mux_add_pgbench(mux_row *rows, int n, const char *net, int clients, int depth, int *at)
{
    for (int i = 0; i < n; i++)
        if (rows[i].pgbench && rows[i].clients == clients && rows[i].depth == depth) {
            *at = i;
            return n;
        }
    *at = n;
    rows[n] = (mux_row){.pgbench = 1, .clients = clients, .depth = depth, .partner = -1};
    snprintf(rows[n].name, sizeof rows[n].name, "mux: pgbench pipelined %d clients x %d tx %s",
             clients, depth, net);
    return n + 1;
}

static int mux_rows(mux_row *rows, const char *net, int callers, const int *sizes, int nsizes,
                    int with_pgbench)
{
    int n = 0, big = sizes[0];
    for (int i = 1; i < nsizes; i++)
        big = sizes[i] > big ? sizes[i] : big;
    n = mux_add_pool(rows, n, net, big, callers, 0);
    n = mux_add_pool(rows, n, net, big, big, 0);
    int at;
    if (with_pgbench)
        n = mux_add_pgbench(rows, n, net, big, 1, &at);
    for (int i = 0; i <= nsizes; i++) {
        int size = i < nsizes ? sizes[i] : sizes[0];
        int depth = i < nsizes ? MUX_DEFAULT_DEPTH : MUX_DEEP;
        int pool = n;
        n = mux_add_pool(rows, n, net, size, callers, depth);
        int used = (callers + depth - 1) / depth; /* connections filled to their depth */
        used = used < size ? used : size;
        int fill = callers / used;
        if (with_pgbench) {
            n = mux_add_pgbench(rows, n, net, used, fill < depth ? fill : depth, &at);
            rows[pool].partner = at;
        }
    }
    return n;
}

static void run_mux_row(const char *pgbench, const char *conninfo, const mux_row *m, double seconds)
{
    if (m->pgbench)
        bench_pgbench(pgbench, conninfo, m->clients, seconds, PGB_PIPELINED, m->depth, m->name);
    else
        bench_tx(conninfo, &m->spec, seconds, m->name);
}

/* Every contender once per round, A B C ... C B A ...: a drift of the shared machine weighs on
 * all alike; a row's figures are the medians of its rounds. Slices of whole seconds (pgbench's
 * -T). */
static void bench_mux(const char *pgbench, const char *net, const char *conninfo, int callers,
                      const int *sizes, int nsizes, int rounds, double seconds)
{
    mux_row rows[MUX_MAX_ROWS];
    int n = mux_rows(rows, net, callers, sizes, nsizes, pgbench != NULL);
    double slice = seconds < 1 ? 1 : (int)(seconds + 0.5);
    snprintf(section, sizeof section,
             "\n%s, multiplexed transactions: %d callers unless said, %d round(s) of %.0f s "
             "slices\n",
             net, callers, rounds, slice);
    for (int round = 0; round < rounds; round++)
        for (int k = 0; k < n; k++)
            run_mux_row(pgbench, conninfo, &rows[round % 2 ? n - 1 - k : k], slice);
}

/* A row over its slices: the median of each figure, the checks all passed or not. */
typedef struct row_median {
    int runs, failed_checks, avg_only, conns_used;
    double tps, p50_ms, p99_ms, cpu_us;
    long errors;
} row_median;

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

static row_median median_row(const char *name)
{
    row_median m = {0};
    double tps[MAX_RESULTS], p50[MAX_RESULTS], p99[MAX_RESULTS], cpu[MAX_RESULTS];
    for (int i = 0; i < nresults; i++) {
        const result *r = &results[i];
        if (strcmp(r->name, name) != 0)
            continue;
        tps[m.runs] = r->tps;
        p50[m.runs] = r->p50_ms;
        p99[m.runs] = r->p99_ms;
        cpu[m.runs] = r->cpu_us;
        m.runs++;
        m.failed_checks += r->check < 0;
        m.avg_only = r->avg_only;
        m.errors += r->errors;
        m.conns_used = r->conns_used > m.conns_used ? r->conns_used : m.conns_used;
    }
    if (m.runs == 0)
        return m;
    m.tps = median(tps, m.runs);
    m.p50_ms = median(p50, m.runs);
    m.p99_ms = median(p99, m.runs);
    m.cpu_us = median(cpu, m.runs);
    return m;
}

static void print_mux_summary(const char *pgbench, const char *net, int callers, const int *sizes,
                              int nsizes)
{
    mux_row rows[MUX_MAX_ROWS];
    row_median med[MUX_MAX_ROWS];
    int n = mux_rows(rows, net, callers, sizes, nsizes, pgbench != NULL), any = 0;
    for (int i = 0; i < n; i++) {
        med[i] = median_row(rows[i].name);
        any |= med[i].runs > 0;
    }
    section[0] = '\0';
    if (!any)
        return;
    printf("\nmultiplexed transactions, %s, the median of each figure over its slices\n", net);
    printf("  server: %s\n", server_line);
    printf("  %-52s %9s %9s %9s %9s %6s  %s\n", "workload", "tx/s", "p50 ms", "p99 ms",
           "cpu µs/tx", "conns", "check");
    for (int i = 0; i < n; i++) {
        const row_median *m = &med[i];
        if (m->runs == 0)
            continue;
        char p50[16], p99[16], conns[16];
        snprintf(p50, sizeof p50, m->avg_only ? "avg %.3f" : "%.3f", m->p50_ms);
        snprintf(p99, sizeof p99, m->avg_only ? "-" : "%.3f", m->p99_ms);
        snprintf(conns, sizeof conns, m->conns_used ? "%d" : "-", m->conns_used);
        printf("  %-52s %9.0f %9s %9s %9.1f %6s  %s%s\n", rows[i].name, m->tps, p50, p99,
               m->cpu_us, conns,
               m->failed_checks ? "FAILED" : "ok", m->errors ? " (errors!)" : "");
        int same = rows[i].partner;
        if (same >= 0 && m->conns_used && m->conns_used != rows[same].clients)
            printf("    (it had %d connections in use; its pgbench at the same depth has %d "
                   "clients)\n", m->conns_used, rows[same].clients);
    }
    int pgbench_rows = 0;
    for (int i = 0; i < n; i++)
        pgbench_rows |= rows[i].pgbench && med[i].runs > 0;
    if (pgbench_rows)
        printf("  (pgbench counts a script run, one pipeline of N transactions, as one "
               "transaction: its tx/s and\n   commits here are its figures times N, its latency "
               "the pipeline's average; its CPU is the\n   process's (wait4) less its start, "
               "measured once with -t 1)\n");

    /* The targets: the multiplexed pool at its best size (default depth) against pgbench's
     * pipelined script one deep and at the same depth, the smallest multiplexed pool against
     * the plain pool of the largest size with the same callers, and that pair's p99 and CPU. */
    int best = -1, smallest = -1, plain = -1, pgb1 = -1;
    for (int i = 0; i < n; i++) {
        if (rows[i].pgbench && rows[i].depth == 1)
            pgb1 = i;
        if (!rows[i].pgbench && !rows[i].spec.multiplex && rows[i].spec.callers == callers)
            plain = i;
        if (rows[i].pgbench || !rows[i].spec.multiplex || rows[i].spec.mux_depth != 0 ||
            med[i].runs == 0)
            continue;
        if (best < 0 || med[i].tps > med[best].tps)
            best = i;
        if (smallest < 0 || rows[i].spec.conns < rows[smallest].spec.conns)
            smallest = i;
    }
    if (best < 0)
        return;
    snprintf(section, sizeof section,
             "\nmultiplexed transactions, %s: the targets (best size: %d conns)\n", net,
             rows[best].spec.conns);
    char what[128];
    if (pgb1 >= 0 && med[pgb1].runs && med[pgb1].tps > 0) {
        snprintf(what, sizeof what, "mux pool of %d / pgbench pipelined %d x 1 tx",
                 rows[best].spec.conns, rows[pgb1].clients);
        print_ratio(what, med[best].tps / med[pgb1].tps, 3.0, 0);
    }
    int same = rows[best].partner;
    if (same >= 0 && med[same].runs && med[same].tps > 0) {
        snprintf(what, sizeof what, "mux pool of %d / pgbench pipelined %d x %d tx (same depth)",
                 rows[best].spec.conns, rows[same].clients, rows[same].depth);
        print_ratio(what, med[best].tps / med[same].tps, 0.8, 0);
    }
    if (plain >= 0 && med[plain].runs && med[plain].tps > 0) {
        snprintf(what, sizeof what, "mux pool of %d / plain pool of %d, %d callers",
                 rows[smallest].spec.conns, rows[plain].spec.conns, callers);
        print_ratio(what, med[smallest].tps / med[plain].tps, 2.0, 0);
        if (med[plain].p99_ms > 0) {
            snprintf(what, sizeof what, "p99, mux pool of %d / plain pool of %d (%.2f / %.2f ms)",
                     rows[best].spec.conns, rows[plain].spec.conns, med[best].p99_ms,
                     med[plain].p99_ms);
            print_ratio(what, med[best].p99_ms / med[plain].p99_ms, 0, 0);
        }
        if (med[plain].cpu_us > 0) {
            snprintf(what, sizeof what,
                     "client CPU/tx, mux pool of %d / plain pool of %d (%.1f / %.1f us)",
                     rows[best].spec.conns, rows[plain].spec.conns, med[best].cpu_us,
                     med[plain].cpu_us);
            print_ratio(what, med[best].cpu_us / med[plain].cpu_us, 1.0, 1);
        }
    }
    for (int i = 0; i < n; i++) /* the rest, for information: each pool against its pgbench */
        if (i != best && rows[i].partner >= 0 && med[i].runs && med[rows[i].partner].runs &&
            med[rows[i].partner].tps > 0) {
            snprintf(what, sizeof what, "  mux pool of %d, depth %d / pgbench %d x %d tx",
                     rows[i].spec.conns,
                     rows[i].spec.mux_depth ? rows[i].spec.mux_depth : MUX_DEFAULT_DEPTH,
                     rows[rows[i].partner].clients, rows[rows[i].partner].depth);
            print_ratio(what, med[i].tps / med[rows[i].partner].tps, 0, 0);
        }
    section[0] = '\0';
}

/* ---- bulk data: COPY FROM STDIN and a streamed SELECT (only when --only names them) ---- */

/* Two parts, run only when --only names them ("copy-in", "stream"): each takes a minute or
 * more. Both on the TCP conninfo. The contenders alternate over three rounds (A B, B A, A B)
 * and a row's figure is the median of its rounds. Each measured run of pgscope or raw libpq
 * is a child process of its own (fork) that opens its own event base and connection, so that
 * its peak RSS is its own: VmHWM is per process and never goes down. The child resets it to
 * the current RSS after connecting (/proc/self/clear_refs, "5"), reads VmRSS (the baseline),
 * runs, then reads VmHWM: the peak during the run, minus the baseline, is what the run cost
 * in memory. */

enum { BULK_ROUNDS = 3, COPY_CHUNK = 64 * 1024 };

static int bulk_selected(const char *part)
{
    return only && !skipped(part);
}

/* One measured run, as a child process reports it to the bench. */
typedef struct bulk_run {
    double seconds;      /* the statement: from sending it to its end */
    long rows;           /* as the statement's end says (COPY's tag, the rows received) */
    long base_kb;        /* VmRSS just before the statement (psql: 0) */
    long peak_kb;        /* VmHWM at its end (psql: ru_maxrss, the whole process) */
    long chunks, waits;  /* COPY: 64 KiB writes taken, and PGS_EAGAIN answers */
    int hwm_reset;       /* clear_refs worked: the peak is the run's own */
    double wall;         /* psql: the whole process, start and connect included */
    char err[512];
} bulk_run;

/* The temp files, removed at exit and on SIGINT/SIGTERM, by the bench process only (a child
 * that dies must not remove them under the others). */
static pid_t bulk_owner;

static void bulk_cleanup(void)
{
    if (getpid() != bulk_owner)
        return;
    if (copy_file[0])
        unlink(copy_file);
    if (pass_file[0])
        unlink(pass_file);
}

static void bulk_signal(int sig)
{
    bulk_cleanup(); /* getpid and unlink are async-signal-safe */
    signal(sig, SIG_DFL);
    raise(sig);
}

static long status_kb(const char *field) /* "VmRSS:", "VmHWM:" of /proc/self/status */
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kb = -1;
    size_t n = strlen(field);
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, field, n) == 0) {
            kb = atol(line + n);
            break;
        }
    if (f)
        fclose(f);
    return kb;
}

static void measure_begin(bulk_run *out)
{
    int fd = open("/proc/self/clear_refs", O_WRONLY);
    out->hwm_reset = fd >= 0 && write(fd, "5", 1) == 1;
    if (fd >= 0)
        close(fd);
    out->base_kb = status_kb("VmRSS:");
}

static void measure_end(bulk_run *out)
{
    out->peak_kb = status_kb("VmHWM:");
}

static void write_all(int fd, const void *p, size_t n)
{
    for (const char *c = p; n > 0;) {
        ssize_t w = write(fd, c, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return;
        c += w;
        n -= (size_t)w;
    }
}

/* In a measuring child: where its report goes, and the stall watch. A run that makes no
 * progress for STALL_SECONDS (a COPY whose on_ready never comes, rows that stop) is reported
 * as stalled, with its counters, instead of hanging the benchmark. */
enum { STALL_SECONDS = 60 };
static int child_pipe = -1;
static const long *watched; /* a counter that moves while the run makes progress */
static long watched_last;
static double watched_at;

static void stall_tick(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    bulk_run *out = arg;
    if (*watched != watched_last) {
        watched_last = *watched;
        watched_at = now_s();
        return;
    }
    if (now_s() - watched_at < STALL_SECONDS)
        return;
    measure_end(out);
    out->seconds = 0;
    snprintf(out->err, sizeof out->err,
             "stalled: nothing moved for %d s (progress count %ld; %ld writes taken, %ld "
             "PGS_EAGAIN)", STALL_SECONDS, *watched, out->chunks, out->waits);
    write_all(child_pipe, out, sizeof *out);
    _exit(0);
}

static struct event *watch_progress(const long *counter, bulk_run *out)
{
    static const struct timeval second = {1, 0};
    watched = counter;
    watched_last = *counter;
    watched_at = now_s();
    struct event *ev = event_new(base, -1, EV_PERSIST, stall_tick, out);
    event_add(ev, &second);
    return ev;
}

typedef void (*bulk_fn)(const char *conninfo, const void *spec, bulk_run *out);

/* Run fn in a child process with an event base and connections of its own; *out is what it
 * measured, or err says why not. */
static void in_child(bulk_fn fn, const char *conninfo, const void *spec, bulk_run *out)
{
    int p[2];
    pid_t pid = fork_piped(p);
    if (pid == 0) {
        close(p[0]);
        child_pipe = p[1];
        /* Not the parent's base: its epoll set is shared with the parent's. Left alone. */
        base = event_base_new();
        if (!base)
            die("event_base_new failed");
        bulk_run r = {0};
        fn(conninfo, spec, &r);
        write_all(p[1], &r, sizeof r);
        _exit(0); /* no atexit, no stdio flush, nothing sent on the parent's connection */
    }
    close(p[1]);
    memset(out, 0, sizeof *out);
    size_t got = 0;
    while (got < sizeof *out) {
        ssize_t n = read(p[0], (char *)out + got, sizeof *out - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    close(p[0]);
    int st;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
        ;
    if (got != sizeof *out || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
        memset(out, 0, sizeof *out);
        snprintf(out->err, sizeof out->err, "the measuring process failed (%s %d)",
                 WIFSIGNALED(st) ? "signal" : "exit status",
                 WIFSIGNALED(st) ? WTERMSIG(st) : WEXITSTATUS(st));
    }
}

static int cmp_run_seconds(const void *a, const void *b)
{
    const bulk_run *x = a, *y = b;
    return x->seconds < y->seconds ? -1 : x->seconds > y->seconds;
}

/* A contender's rounds: the median's time, the largest memory figure. */
typedef struct bulk_sum {
    const char *label;
    long rows;
    int ok;             /* every round worked */
    double seconds;     /* median */
    long growth_kb;     /* max over rounds of peak - baseline; psql: max ru_maxrss */
    double wall;        /* psql: median of the whole process's time */
    int hwm_reset;
} bulk_sum;

static bulk_sum summarize(const char *label, long rows, bulk_run *runs, int n)
{
    bulk_sum s = {.label = label, .rows = rows, .ok = 1, .hwm_reset = 1};
    double walls[BULK_ROUNDS];
    for (int i = 0; i < n; i++) {
        if (runs[i].err[0] || runs[i].seconds <= 0)
            s.ok = 0;
        long g = runs[i].peak_kb - runs[i].base_kb;
        if (g > s.growth_kb)
            s.growth_kb = g;
        s.hwm_reset &= runs[i].hwm_reset;
        walls[i] = runs[i].wall;
    }
    if (!s.ok)
        return s;
    qsort(runs, (size_t)n, sizeof *runs, cmp_run_seconds);
    s.seconds = runs[n / 2].seconds;
    qsort(walls, (size_t)n, sizeof *walls, cmp_double);
    s.wall = walls[n / 2];
    return s;
}

static void print_run(const char *label, long rows, int round, const bulk_run *r)
{
    if (r->err[0]) {
        printf("  %-40s %9ld rows  round %d: FAILED: %s\n", label, rows, round + 1, r->err);
        fflush(stdout);
        return;
    }
    printf("  %-40s %9ld rows  round %d: %7.3f s %10.0f rows/s", label, r->rows, round + 1,
           r->seconds, (double)r->rows / r->seconds);
    if (r->wall > 0)
        printf("  (psql's \\timing; the process %.3f s in all, max RSS %ld KiB)\n", r->wall,
               r->peak_kb);
    else if (r->chunks)
        printf("  peak RSS +%ld KiB  (%ld writes of 64 KiB, %ld PGS_EAGAIN)\n",
               r->peak_kb - r->base_kb, r->chunks, r->waits);
    else
        printf("  peak RSS +%ld KiB\n", r->peak_kb - r->base_kb);
    fflush(stdout);
}

/* ---- COPY FROM STDIN: pgscope against psql's \copy, from one file ---- */


/* The table is the bench's own: created here, marked with a comment, truncated before each run,
 * dropped at the end. A table of that name without the mark is someone else's: left alone. */
static PGconn *copy_table_create(const char *conninfo)
{
    PGconn *pg = PQconnectdb(conninfo);
    if (PQstatus(pg) != CONNECTION_OK)
        die("cannot connect: %s", PQerrorMessage(pg));
    PQsetNoticeProcessor(pg, quiet, NULL);
    if (own_table(pg, "pgscope_bench_copy"))
        PQclear(PQexec(pg, "DROP TABLE pgscope_bench_copy")); /* an interrupted run's */
    char sql[256];
    snprintf(sql, sizeof sql, "CREATE TABLE pgscope_bench_copy (id int NOT NULL, name text NOT "
                              "NULL, amount numeric(12,2) NOT NULL, at timestamptz NOT NULL); "
                              "COMMENT ON TABLE pgscope_bench_copy IS '%s'",
             copy_table_marker);
    PGresult *r = PQexec(pg, sql);
    if (PQresultStatus(r) != PGRES_COMMAND_OK)
        die("copy-in: creating pgscope_bench_copy: %s", PQerrorMessage(pg));
    PQclear(r);
    return pg;
}

/* Before each run: an empty table, and no checkpoint owed from the last run's WAL (best
 * effort: CHECKPOINT needs a superuser or pg_checkpoint; without, runs may meet one). */
static void copy_table_reset(PGconn *pg)
{
    PGresult *r = PQexec(pg, "TRUNCATE pgscope_bench_copy");
    if (PQresultStatus(r) != PGRES_COMMAND_OK)
        die("copy-in: %s", PQerrorMessage(pg));
    PQclear(r);
    PQclear(PQexec(pg, "CHECKPOINT"));
}

/* The data, in COPY's text format: id, a name, an amount, a timestamp; about 60 bytes a row.
 * Returns the file's size; *small_bytes is where row small_rows ends. */
static off_t write_copy_file(int fd, long rows, long small_rows, off_t *small_bytes)
{
    static const char *const words[] = {"alpha", "bravo", "charlie", "delta",
                                        "echo",  "foxtrot", "golf", "hotel"};
    FILE *f = fdopen(fd, "w");
    if (!f)
        die("cannot write %s", copy_file);
    const time_t start = 1704067200; /* 2024-01-01 00:00:00 UTC */
    for (long i = 1; i <= rows; i++) {
        time_t t = start + (time_t)i * 7;
        struct tm tm;
        char ts[32];
        gmtime_r(&t, &tm);
        strftime(ts, sizeof ts, "%Y-%m-%d %H:%M:%S+00", &tm);
        fprintf(f, "%ld\tcustomer %08ld %s\t%ld.%02ld\t%s\n", i, i * 7919 % 100000000,
                words[i % 8], i * 37 % 100000, i % 100, ts);
        if (i == small_rows)
            *small_bytes = ftello(f);
    }
    off_t size = ftello(f);
    if (fclose(f) != 0)
        die("cannot write %s: %s", copy_file, strerror(errno));
    return size;
}

typedef struct copy_spec {
    const char *file;
    off_t bytes; /* from the start of the file: whole rows */
} copy_spec;

typedef struct copy_feed {
    long progress; /* on_ready calls and writes taken */
    int fd;
    off_t left;       /* bytes still to read */
    char *buf;
    size_t pending;   /* bytes in buf not taken yet (PGS_EAGAIN) */
    int ended, finished;
    double t0;
    bulk_run *out;
} copy_feed;

/* Writes 64 KiB chunks until pgscope says PGS_EAGAIN, then waits for the next on_ready. */
static void copy_ready(pgs_copy *copy, void *arg)
{
    copy_feed *f = arg;
    f->progress++;
    while (!f->ended) {
        if (!f->pending) {
            if (f->left == 0) {
                f->ended = 1;
                int rc = pgs_copy_end(copy, NULL);
                if (rc != PGS_OK)
                    snprintf(f->out->err, sizeof f->out->err, "pgs_copy_end: %s",
                             pgs_strerror(rc));
                return;
            }
            size_t want = f->left < COPY_CHUNK ? (size_t)f->left : COPY_CHUNK;
            ssize_t n = read(f->fd, f->buf, want);
            if (n <= 0) {
                f->ended = 1;
                snprintf(f->out->err, sizeof f->out->err, "reading the data: %s",
                         n < 0 ? strerror(errno) : "short file");
                pgs_copy_end(copy, "the bench could not read its file");
                return;
            }
            f->pending = (size_t)n;
            f->left -= n;
        }
        int rc = pgs_copy_write(copy, f->buf, f->pending);
        if (rc == PGS_EAGAIN) {
            f->out->waits++;
            return;
        }
        if (rc != PGS_OK) { /* the connection is gone: done reports it */
            f->ended = 1;
            snprintf(f->out->err, sizeof f->out->err, "pgs_copy_write: %s", pgs_strerror(rc));
            return;
        }
        f->out->chunks++;
        f->progress++;
        f->pending = 0;
    }
}

static void copy_done(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg)
{
    (void)c;
    copy_feed *f = arg;
    f->out->seconds = now_s() - f->t0;
    if (err)
        snprintf(f->out->err, sizeof f->out->err, "%s", err->message);
    else if (!f->out->err[0])
        f->out->rows = atol(PQcmdTuples((PGresult *)res));
    f->finished = 1;
}

static void copy_pgscope_child(const char *conninfo, const void *arg, bulk_run *out)
{
    const copy_spec *spec = arg;
    copy_feed f = {.left = spec->bytes, .out = out};
    f.fd = open(spec->file, O_RDONLY);
    f.buf = malloc(COPY_CHUNK);
    if (f.fd < 0 || !f.buf)
        die("copy-in: cannot read %s", spec->file);
    memset(f.buf, 0, COPY_CHUNK); /* resident before the baseline */
    pgs_conn *c;
    int up = 0, down = 0;
    if (pgs_conn_open(base, conninfo, NULL, opened, &up, &c) != PGS_OK)
        die("pgscope: cannot open");
    while (!up)
        event_base_loop(base, EVLOOP_ONCE);
    struct event *watch = watch_progress(&f.progress, out);
    measure_begin(out);
    f.t0 = now_s();
    int rc = pgs_copy_in(c, "COPY pgscope_bench_copy FROM STDIN", copy_ready, copy_done, &f, NULL);
    if (rc != PGS_OK)
        snprintf(out->err, sizeof out->err, "pgs_copy_in: %s", pgs_strerror(rc));
    while (rc == PGS_OK && !f.finished)
        event_base_loop(base, EVLOOP_ONCE);
    measure_end(out);
    event_free(watch);
    pgs_conn_close(c, closed, &down);
    while (!down)
        event_base_loop(base, EVLOOP_ONCE);
    close(f.fd);
    free(f.buf);
}

/* psql gets the conninfo without its password; the password, if there is one, goes into a
 * temp password file (0600) that PGPASSFILE names, so that it is never on a command line. */

static void append_quoted(char **p, const char *val) /* a conninfo value: '...', \ and ' escaped */
{
    *(*p)++ = '\'';
    for (; *val; val++) {
        if (*val == '\\' || *val == '\'')
            *(*p)++ = '\\';
        *(*p)++ = *val;
    }
    *(*p)++ = '\'';
}

static void pass_file_remove(void)
{
    if (pass_file[0])
        unlink(pass_file);
    pass_file[0] = '\0';
}

static psql_cmd psql_prepare(const char *conninfo)
{
    static char path[512];
    psql_cmd cmd = {.path = pg_tool_path("psql", path, sizeof path)};
    if (!cmd.path)
        cmd.path = "psql"; /* from PATH */
    char *errmsg = NULL;
    PQconninfoOption *opts = PQconninfoParse(conninfo, &errmsg);
    if (!opts) /* errmsg may quote the password: not printed */
        die("copy-in: the conninfo does not parse");
    size_t size = 1;
    for (PQconninfoOption *o = opts; o->keyword; o++)
        if (o->val)
            size += strlen(o->keyword) + 2 * strlen(o->val) + 5;
    char *p = cmd.conninfo = malloc(size);
    const char *password = NULL;
    for (PQconninfoOption *o = opts; o->keyword; o++) {
        if (!o->val)
            continue;
        if (strcmp(o->keyword, "password") == 0) {
            password = o->val;
            continue;
        }
        p += sprintf(p, "%s%s=", p == cmd.conninfo ? "" : " ", o->keyword);
        append_quoted(&p, o->val);
    }
    *p = '\0';
    if (password && *password) {
        if (strchr(password, '\n') || strchr(password, '\r'))
            die("copy-in: a password with a line break cannot go into a password file");
        pass_file_remove(); /* one at a time */
        strcpy(pass_file, "/tmp/pgscope-bench-pgpass-XXXXXX");
        int fd = mkstemp(pass_file); /* 0600, as libpq wants */
        if (fd < 0)
            die("cannot create a password file: %s", strerror(errno));
        /* Any host, port, database and user: the file is this one connection's. */
        FILE *f = fdopen(fd, "w");
        fputs("*:*:*:*:", f);
        for (const char *c = password; *c; c++) {
            if (*c == '\\' || *c == ':')
                fputc('\\', f);
            fputc(*c, f);
        }
        fputc('\n', f);
        if (fclose(f) != 0)
            die("cannot write the password file");
        cmd.has_password = 1;
    }
    PQconninfoFree(opts);
    return cmd;
}

static void copy_psql(const psql_cmd *cmd, const char *file, bulk_run *out)
{
    memset(out, 0, sizeof *out);
    char copy[256];
    snprintf(copy, sizeof copy, "\\copy pgscope_bench_copy FROM '%s'", file);
    char *argv[] = {"psql", "-X", "-w", "-v", "ON_ERROR_STOP=1", "-c", "\\timing on",
                    "-c", copy, "-d", cmd->conninfo, NULL};
    int rd;
    double t0 = now_s();
    pid_t pid = run_tool(cmd->path, argv, cmd, 0, &rd);
    FILE *f = fdopen(rd, "r");
    char line[512];
    double ms = 0;
    while (f && fgets(line, sizeof line, f)) {
        sscanf(line, "COPY %ld", &out->rows);
        sscanf(line, "Time: %lf ms", &ms);
    }
    if (f)
        fclose(f);
    int st;
    struct rusage ru;
    while (wait4(pid, &st, 0, &ru) < 0 && errno == EINTR)
        ;
    out->wall = now_s() - t0;
    out->seconds = ms / 1e3;
    out->peak_kb = ru.ru_maxrss;
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0 || ms <= 0 || out->rows <= 0)
        snprintf(out->err, sizeof out->err, "psql failed (exit status %d; its stderr above)",
                 WIFEXITED(st) ? WEXITSTATUS(st) : -1);
}

static void check_rows(bulk_run *r, long want)
{
    if (!r->err[0] && r->rows != want)
        snprintf(r->err, sizeof r->err, "%ld rows instead of %ld", r->rows, want);
}

/* ---- a streamed SELECT: pgscope against raw libpq in single-row mode ---- */

/* ProjectSet, not a function scan in FROM: the server streams the rows instead of first
 * materialising them all in a tuplestore (spilled to disk past work_mem). */
static const char stream_sql[] = "SELECT i, i::text FROM (SELECT generate_series(1, $1::int) AS i) s";

typedef struct stream_state {
    long rows, bytes; /* bytes: the same small work per row on both sides */
    int finished;
    double t0;
    bulk_run *out;
} stream_state;

static void count_rows(stream_state *s, const PGresult *rows)
{
    int n = PQntuples(rows);
    for (int i = 0; i < n; i++)
        s->bytes += PQgetlength(rows, i, 1);
    s->rows += n;
}

static int stream_rows_cb(pgs_conn *c, const PGresult *rows, void *arg)
{
    (void)c;
    count_rows(arg, rows);
    return 0;
}

static void stream_done(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg)
{
    (void)c;
    (void)res;
    stream_state *s = arg;
    s->out->seconds = now_s() - s->t0;
    s->out->rows = s->rows;
    if (err)
        snprintf(s->out->err, sizeof s->out->err, "%s", err->message);
    s->finished = 1;
}

static void stream_pgscope_child(const char *conninfo, const void *arg, bulk_run *out)
{
    const char *v[] = {arg};
    stream_state s = {.out = out};
    pgs_conn *c;
    int up = 0, down = 0;
    if (pgs_conn_open(base, conninfo, NULL, opened, &up, &c) != PGS_OK)
        die("pgscope: cannot open");
    while (!up)
        event_base_loop(base, EVLOOP_ONCE);
    struct event *watch = watch_progress(&s.rows, out);
    measure_begin(out);
    s.t0 = now_s();
    int rc = pgs_query_stream(c, stream_sql, 1, v, 0, stream_rows_cb, stream_done, &s);
    if (rc != PGS_OK)
        snprintf(out->err, sizeof out->err, "pgs_query_stream: %s", pgs_strerror(rc));
    while (rc == PGS_OK && !s.finished)
        event_base_loop(base, EVLOOP_ONCE);
    measure_end(out);
    event_free(watch);
    pgs_conn_close(c, closed, &down);
    while (!down)
        event_base_loop(base, EVLOOP_ONCE);
}

typedef struct raw_stream {
    PGconn *pg;
    stream_state s;
} raw_stream;

/* Hand-written non-blocking libpq on the same kind of libevent loop as pgscope's. */
static void raw_stream_readable(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    raw_stream *r = arg;
    bulk_run *out = r->s.out;
    if (!PQconsumeInput(r->pg)) {
        snprintf(out->err, sizeof out->err, "%s", PQerrorMessage(r->pg));
        r->s.finished = 1;
        return;
    }
    while (!PQisBusy(r->pg)) {
        PGresult *res = PQgetResult(r->pg);
        if (!res) {
            out->seconds = now_s() - r->s.t0;
            out->rows = r->s.rows;
            r->s.finished = 1;
            return;
        }
        ExecStatusType st = PQresultStatus(res);
        if (st == PGRES_SINGLE_TUPLE)
            count_rows(&r->s, res);
        else if (st != PGRES_TUPLES_OK && !out->err[0])
            snprintf(out->err, sizeof out->err, "%s", PQresultErrorMessage(res));
        PQclear(res);
    }
}

static void stream_raw_child(const char *conninfo, const void *arg, bulk_run *out)
{
    const char *v[] = {arg};
    raw_stream r = {.s = {.out = out}};
    r.pg = PQconnectdb(conninfo);
    if (PQstatus(r.pg) != CONNECTION_OK)
        die("raw libpq: %s", PQerrorMessage(r.pg));
    PQsetnonblocking(r.pg, 1);
    struct event *ev =
        event_new(base, PQsocket(r.pg), EV_READ | EV_PERSIST, raw_stream_readable, &r);
    event_add(ev, NULL);
    struct event *watch = watch_progress(&r.s.rows, out);
    measure_begin(out);
    r.s.t0 = now_s();
    if (!PQsendQueryParams(r.pg, stream_sql, 1, NULL, v, NULL, NULL, 0) ||
        !PQsetSingleRowMode(r.pg))
        die("raw libpq: %s", PQerrorMessage(r.pg));
    int fl;
    while ((fl = PQflush(r.pg)) == 1) /* one small message: at most a moment */
        ;
    if (fl < 0)
        die("raw libpq: %s", PQerrorMessage(r.pg));
    while (!r.s.finished)
        event_base_loop(base, EVLOOP_ONCE);
    measure_end(out);
    event_free(watch);
    event_free(ev);
    PQfinish(r.pg);
}

/* ---- the bulk part's table ---- */

static void print_sum(const bulk_sum *s, const char *memory_note)
{
    if (!s->ok) {
        printf("  %-54s %10ld  FAILED (see above)\n", s->label, s->rows);
        return;
    }
    printf("  %-54s %10ld %11.0f %9.3f  %s\n", s->label, s->rows, (double)s->rows / s->seconds,
           s->seconds, memory_note);
}

static void bulk_ratio(const char *what, const bulk_sum *a, const bulk_sum *b, double target)
{
    if (!a->ok || !b->ok)
        return;
    double x = (double)a->rows / a->seconds, y = (double)b->rows / b->seconds;
    print_ratio(what, x / y, target, 0);
}

static void bench_bulk(const char *conninfo, long copy_rows, long stream_rows)
{
    int copy_in = bulk_selected("copy-in"), stream = bulk_selected("stream");
    if (!copy_in && !stream)
        return;
    bulk_owner = getpid();
    atexit(bulk_cleanup);
    struct sigaction sa = {.sa_handler = bulk_signal};
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    printf("\nbulk data over TCP: each run a process of its own; %d rounds, the contenders "
           "alternating (A B, B A, A B)\n",
           BULK_ROUNDS);

    bulk_sum copy_sum[3] = {{0}}; /* pgscope, psql, pgscope at a tenth of the rows */
    long small_rows = copy_rows / 10;
    if (copy_in) {
        PGconn *pg = copy_table_create(conninfo);
        strcpy(copy_file, "/tmp/pgscope-bench-copy-XXXXXX");
        int fd = mkstemp(copy_file);
        if (fd < 0)
            die("cannot create a temp file: %s", strerror(errno));
        off_t small_bytes = 0, bytes = write_copy_file(fd, copy_rows, small_rows, &small_bytes);
        printf("  the data: %ld rows (int, text, numeric, timestamptz) in COPY text format, "
               "%.1f MiB, in %s\n", copy_rows, (double)bytes / 1048576, copy_file);
        psql_cmd psql = psql_prepare(conninfo);
        copy_spec full = {copy_file, bytes}, small = {copy_file, small_bytes};
        bulk_run runs[3][BULK_ROUNDS];
        for (int round = 0; round < BULK_ROUNDS; round++) {
            for (int k = 0; k < 2; k++) {
                int which = (round % 2 == 0) == (k == 0) ? 0 : 1; /* A B, B A, A B */
                bulk_run *r = &runs[which][round];
                copy_table_reset(pg);
                if (which == 0) {
                    in_child(copy_pgscope_child, conninfo, &full, r);
                    check_rows(r, copy_rows);
                    print_run("copy-in pgscope pgs_copy_in", copy_rows, round, r);
                } else {
                    copy_psql(&psql, copy_file, r);
                    check_rows(r, copy_rows);
                    print_run("copy-in psql \\copy", copy_rows, round, r);
                }
            }
            copy_table_reset(pg);
            in_child(copy_pgscope_child, conninfo, &small, &runs[2][round]);
            check_rows(&runs[2][round], small_rows);
            print_run("copy-in pgscope pgs_copy_in, a tenth", small_rows, round, &runs[2][round]);
        }
        copy_sum[0] = summarize("copy-in pgscope pgs_copy_in (64 KiB writes)", copy_rows,
                                runs[0], BULK_ROUNDS);
        copy_sum[1] = summarize("copy-in psql \\copy (its \\timing)", copy_rows, runs[1],
                                BULK_ROUNDS);
        copy_sum[2] = summarize("copy-in pgscope pgs_copy_in, a tenth of the rows", small_rows,
                                runs[2], BULK_ROUNDS);
        PQclear(PQexec(pg, "DROP TABLE pgscope_bench_copy"));
        PQfinish(pg);
        unlink(copy_file);
        copy_file[0] = '\0';
        if (pass_file[0])
            unlink(pass_file);
        pass_file[0] = '\0';
        free(psql.conninfo);
    }

    bulk_sum stream_sum[2] = {{0}}; /* pgscope, raw libpq */
    if (stream) {
        char n[24];
        snprintf(n, sizeof n, "%ld", stream_rows);
        bulk_run runs[2][BULK_ROUNDS];
        for (int round = 0; round < BULK_ROUNDS; round++)
            for (int k = 0; k < 2; k++) {
                int which = (round % 2 == 0) == (k == 0) ? 0 : 1;
                bulk_run *r = &runs[which][round];
                in_child(which == 0 ? stream_pgscope_child : stream_raw_child, conninfo, n, r);
                check_rows(r, stream_rows);
                print_run(which == 0 ? "stream pgscope pgs_query_stream"
                                     : "stream raw libpq single-row mode",
                          stream_rows, round, r);
            }
        stream_sum[0] = summarize("stream pgscope pgs_query_stream", stream_rows, runs[0],
                                  BULK_ROUNDS);
        stream_sum[1] = summarize("stream raw libpq single-row (non-blocking, libevent)",
                                  stream_rows, runs[1], BULK_ROUNDS);
    }

    printf("\nbulk data, median of %d rounds (TCP)\n", BULK_ROUNDS);
    printf("  %-54s %10s %11s %9s  %s\n", "workload", "rows", "rows/s", "median s",
           "client memory");
    char note[160];
    if (copy_in) {
        for (int i = 0; i < 3; i++) {
            if (i == 1)
                snprintf(note, sizeof note, "max RSS %ld KiB, whole psql (wall %.3f s)",
                         copy_sum[i].growth_kb, copy_sum[i].wall);
            else
                snprintf(note, sizeof note, "peak RSS +%ld KiB over baseline", copy_sum[i].growth_kb);
            print_sum(&copy_sum[i], note);
        }
    }
    if (stream)
        for (int i = 0; i < 2; i++) {
            snprintf(note, sizeof note, "peak RSS +%ld KiB over baseline", stream_sum[i].growth_kb);
            print_sum(&stream_sum[i], note);
        }
    printf("\nbulk data ratios (same server, same run)\n");
    if (copy_in) {
        bulk_ratio("copy-in rows/s, pgscope / psql \\copy", &copy_sum[0], &copy_sum[1], 0.9);
        if (copy_sum[0].ok && copy_sum[2].ok) {
            long big = copy_sum[0].growth_kb, little = copy_sum[2].growth_kb;
            printf("  copy-in pgscope peak RSS growth, %ld rows +%ld KiB, %ld rows +%ld KiB: "
                   "%s\n", copy_rows, big, small_rows, little,
                   big <= little + 1024 ? "flat (within 1 MiB)" : "GROWS with the rows");
        }
    }
    if (stream) {
        bulk_ratio("stream rows/s, pgscope / raw libpq single-row", &stream_sum[0],
                   &stream_sum[1], 0.9);
        if (stream_sum[0].ok)
            printf("  %-66s %5.2f MiB  (target < 16 MiB: %s)\n",
                   "stream pgscope client peak memory beyond its baseline",
                   (double)stream_sum[0].growth_kb / 1024,
                   stream_sum[0].growth_kb < 16 * 1024 ? "met" : "NOT met");
    }
    if ((copy_sum[0].ok && !copy_sum[0].hwm_reset) || (stream_sum[0].ok && !stream_sum[0].hwm_reset))
        printf("  (/proc/self/clear_refs was not writable: a peak may include the connect's)\n");
}

static const char *const usage_text =
    "usage: pgscope-bench --tcp CONNINFO [--unix CONNINFO] [options]\n"
    "\n"
    "Runs the same closed-loop workloads through raw non-blocking libpq (the baseline),\n"
    "pgscope's guards, pgscope's pooled transactions (plain and multiplexed) and pgbench,\n"
    "against one server in one run, and prints tx/s, p50/p99 latency, the client's CPU per\n"
    "transaction and the ratios. After each transaction row it checks that the server's\n"
    "balances grew by exactly the commits reported; a mismatch makes the exit status 1.\n"
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
    "  --only LIST      run only the workloads whose names contain one of these (comma-separated;\n"
    "                   the last two lines are named memory and scale; the multiplexed section's\n"
    "                   rows all start with \"mux:\")\n"
    "  --mux-callers N  the multiplexed section's closed-loop callers (default 64)\n"
    "  --mux-sizes LIST its multiplexed pools' connections (default 2,4,8; the smallest also at\n"
    "                   depth 32; the plain pool and pgbench's one-deep script at the largest)\n"
    "  --mux-rounds N   its rounds: each contender runs once per round, in alternating order;\n"
    "                   a row's figures are the medians (default 3; slices of --seconds, whole)\n"
    "  --server-settings fast|sync-off|durable\n"
    "                   stop unless the server has these settings (fsync, synchronous_commit,\n"
    "                   full_page_writes: off/off/off, on/off/on, on/on/on); the benchmark only\n"
    "                   reads them (SHOW), and tools/run-bench sets them on its own server\n"
    "  --instructions raw|guard|guard-hooks [--count N]\n"
    "                   only run N statements one way (for callgrind; see tools/run-bench);\n"
    "                   guard-hooks: a guard with a light tracer's pgs_hooks set\n"
    "\n"
    "The bulk-data part runs only when --only names it (over TCP; a few minutes at the default\n"
    "sizes; e.g. --only copy-in,stream):\n"
    "  copy-in          COPY FROM STDIN from one generated file: pgscope (pgs_copy_in, 64 KiB\n"
    "                   writes) against psql's \\copy, then pgscope at a tenth of the rows (is its\n"
    "                   memory flat?); in a table of its own, pgscope_bench_copy (created, and\n"
    "                   dropped at the end; CHECKPOINT before each run where allowed)\n"
    "  stream           a streamed SELECT: pgscope (pgs_query_stream) against raw libpq in\n"
    "                   single-row mode, non-blocking on a libevent loop\n"
    "  --copy-rows N    rows to COPY (default 1000000)\n"
    "  --stream-rows N  rows to stream (default 10000000)\n";

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"tcp", required_argument, 0, 't'},      {"unix", required_argument, 0, 'u'},
        {"seconds", required_argument, 0, 's'},  {"clients", required_argument, 0, 'c'},
        {"requests", required_argument, 0, 'r'}, {"no-pgbench", no_argument, 0, 'P'},
        {"instructions", required_argument, 0, 'i'}, {"count", required_argument, 0, 'n'},
        {"only", required_argument, 0, 'o'},    {"variants", no_argument, 0, 'V'},
        {"copy-rows", required_argument, 0, 'C'}, {"stream-rows", required_argument, 0, 'S'},
        {"mux-callers", required_argument, 0, 'm'}, {"mux-sizes", required_argument, 0, 'z'},
        {"mux-rounds", required_argument, 0, 'R'}, {"server-settings", required_argument, 0, 'E'},
        {"help", no_argument, 0, 'h'},           {0, 0, 0, 0}};
    const char *instructions = NULL;
    long count = 20000;
    const char *tcp = getenv("PGSCOPE_TEST_CONNINFO"), *unix_ci = getenv("PGSCOPE_SOCKET_CONNINFO");
    double seconds = 1;
    char clients_list[64] = "1,8,32";
    int requests = 10000, use_pgbench = 1, variants = 0;
    long copy_rows = 1000000, stream_rows = 10000000;
    int mux_callers = 64, mux_rounds = 3;
    char mux_list[64] = "2,4,8";
    const char *settings = NULL;
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
        case 'C': copy_rows = atol(optarg); break;
        case 'S': stream_rows = atol(optarg); break;
        case 'm': mux_callers = atoi(optarg); break;
        case 'z': snprintf(mux_list, sizeof mux_list, "%s", optarg); break;
        case 'R': mux_rounds = atoi(optarg); break;
        case 'E': settings = optarg; break;
        case 'h': fputs(usage_text, stdout); return 0;
        default: fputs(usage_text, stderr); return 2;
        }
    }
    if (!tcp || !*tcp)
        die("no server: give --tcp CONNINFO (or run it through tools/run-bench)");
    if (seconds <= 0 || requests <= 0)
        die("--seconds and --requests must be positive");
    if (copy_rows < 10 || stream_rows < 1 || stream_rows > 2147483647)
        die("--copy-rows must be at least 10, --stream-rows between 1 and 2147483647");
    int mux_sizes[MUX_MAX_SIZES], nmux = 0;
    for (char *tok = strtok(mux_list, ","); tok; tok = strtok(NULL, ",")) {
        if (nmux == MUX_MAX_SIZES || atoi(tok) < 1)
            die("--mux-sizes takes 1 to %d connection counts, each at least 1", MUX_MAX_SIZES);
        mux_sizes[nmux++] = atoi(tok);
    }
    if (nmux == 0 || mux_callers < 1 || mux_rounds < 1)
        die("--mux-sizes, --mux-callers and --mux-rounds must be positive");
    if (settings && strcmp(settings, "fast") != 0 && strcmp(settings, "sync-off") != 0 &&
        strcmp(settings, "durable") != 0)
        die("--server-settings takes fast, sync-off or durable");
    base = event_base_new();
    if (instructions) { /* one mode, for callgrind: see tools/run-bench */
        instructions_mode(unix_ci && *unix_ci ? unix_ci : tcp, instructions, count);
        event_base_free(base);
        return 0;
    }
    accounts_conninfo = tcp;
    read_server_settings(tcp, settings);
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
            snprintf(section, sizeof section, "\n%s, %d connection(s)\n", nets[ni].label, n);
#define NAME(fmt) (snprintf(name, sizeof name, fmt " %s %d", nets[ni].label, n), name)
            const char *ci = nets[ni].conninfo;
            /* The sides of a compared pair alternate in slices, A B B A A B B A ...: a drift
             * of the machine (it is shared and noisy) weighs on both alike, and a row's figure
             * is the mean of its slices. k slices of about a second per side (pgbench takes
             * whole seconds), at least one. The SELECT 1 rows are three: raw libpq, the guard,
             * and the guard with a light tracer's hooks set, in the order A B C C B A, so that
             * each pair (guard / raw, hooks / none) sits side by side as often as reversed. */
            int k = seconds < 1.5 ? 1 : (int)(seconds + 0.5);
            for (int i = 0; i < 6 * k; i++) {
                int at = i % 6;
                if (at == 1 || at == 4)
                    bench_guard(ci, n, seconds / (2 * k), NULL, NAME("pgscope guard SELECT 1"));
                else if (at == 2 || at == 3)
                    bench_guard(ci, n, seconds / (2 * k), &light_hooks,
                                NAME("pgscope guard SELECT 1 + hooks"));
                else
                    bench_raw(ci, W_SELECT, 1, n, seconds / (2 * k), NAME("raw libpq SELECT 1"));
            }
            if (variants)
                bench_raw(ci, W_SELECT, 0, n, seconds, NAME("raw libpq unnamed SELECT 1"));
            /* Rows no target compares: half the time in the quick run (under a minute). */
            double info = k == 1 ? seconds / 2 : seconds;
            bench_raw(ci, W_TX3, 1, n, info, NAME("raw libpq tx 3 round trips"));
            bench_raw(ci, W_TXPIPE, 1, n, info, NAME("raw libpq tx pipelined"));
            bench_tx(ci, &(tx_spec){.conns = n, .callers = n, .plain = 1}, seconds,
                     NAME("pgscope pool tx 3 round trips"));
            if (!pgbench)
                bench_tx(ci, &(tx_spec){.conns = n, .callers = n}, seconds,
                         NAME("pgscope pool tx one round trip"));
            for (int i = 0; pgbench && i < 2 * k; i++) { /* against pgbench's pipelined script */
                if (i % 4 == 1 || i % 4 == 2)
                    bench_pgbench(pgbench, ci, n, seconds / k, PGB_PIPELINED, 1,
                                  NAME("pgbench tx pipelined"));
                else
                    bench_tx(ci, &(tx_spec){.conns = n, .callers = n}, seconds / k,
                             NAME("pgscope pool tx one round trip"));
            }
            if (variants) {
                bench_tx(ci, &(tx_spec){.conns = n, .callers = n, .reset = PGS_RESET_NONE},
                         seconds, NAME("pgscope tx no reset"));
                bench_tx(ci, &(tx_spec){.conns = n, .callers = n, .reset = PGS_RESET_ALL},
                         seconds, NAME("pgscope tx DISCARD ALL"));
                bench_tx(ci, &(tx_spec){.conns = n, .callers = n, .resolvable = 1}, seconds,
                         NAME("pgscope tx resolvable"));
            }
            if (pgbench) {
                bench_pgbench(pgbench, ci, n, seconds, PGB_3RT, 1,
                              NAME("pgbench tx 3 round trips"));
                if (variants)
                    bench_pgbench(pgbench, ci, n, seconds, PGB_PIPELINED_RESET, 1,
                                  NAME("pgbench tx pipelined + reset"));
            }
        }
        bench_mux(pgbench, nets[ni].label, nets[ni].conninfo, mux_callers, mux_sizes, nmux,
                  mux_rounds, seconds);
    }
    snprintf(section, sizeof section, "\nratios (same server, same run)\n");
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
            snprintf(b, sizeof b, "pgscope guard SELECT 1 + hooks %s %d", l, n);
            snprintf(what, sizeof what, "  guard with hooks / without, SELECT 1, %s, %d conn", l, n);
            ratio(what, b, a, 0);
            int pairs;
            double med = paired_ratio(b, a, &pairs);
            snprintf(what, sizeof what, "    the same, median of its %d adjacent slice pairs", pairs);
            if (pairs > 0)
                printf("  %-66s %5.2fx\n", what, med);
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
    for (int ni = 0; ni < 2; ni++)
        if (nets[ni].conninfo && *nets[ni].conninfo)
            print_mux_summary(pgbench, nets[ni].label, mux_callers, mux_sizes, nmux);
    if (!skipped("memory") || !skipped("scale"))
        printf("\n");
    if (!skipped("memory"))
        bench_memory(tcp, 50);
    if (!skipped("scale"))
        bench_scale(tcp, requests, 20);
    section[0] = '\0';
    bench_bulk(tcp, copy_rows, stream_rows);
    if (check_pg)
        PQfinish(check_pg);
    event_base_free(base);
    if (check_failures) {
        fprintf(stderr, "pgscope-bench: %d RESULT CHECK(S) FAILED (see above)\n", check_failures);
        return 1;
    }
    return 0;
}

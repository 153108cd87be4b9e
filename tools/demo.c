/* pgscope-demo: shows each of pgscope's guarantees against a real PostgreSQL, in plain words,
 * with what the server holds afterwards. Uses only the public header. Each scenario is written
 * as a sequence of steps; `wait_for` runs the event loop until a step's callback has fired,
 * which keeps the story readable (a service would stay in callbacks instead). */
#include <getopt.h>
#include <pgscope.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "demo_schema.h"

static struct event_base *base;
static const char *conninfo = "";
static int connect_timeout_ms; /* for every guard and the pool: see demo_connect_timeout */
static int failures;           /* checks that did not hold */

/* ---- output ---- */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void say(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    printf("  ");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    fflush(stdout);
}

static void check(int ok, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    printf("  %s ", ok ? "[ok]  " : "[FAIL]");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    fflush(stdout);
    failures += !ok;
}

/* One clear line (libpq's messages can span several), then exit 2. */
static void fatal(const char *what, const pgs_error *err)
{
    char msg[sizeof err->message];
    snprintf(msg, sizeof msg, "%s", err ? err->message : "failed");
    for (char *p = msg; *p; p++)
        if (*p == '\n' || *p == '\t')
            *p = ' ';
    fprintf(stderr, "pgscope-demo: %s: %s\n", what, msg);
    exit(2);
}

/* ---- sync-looking steps over the async API ---- */

static void wait_for(const int *flag)
{
    while (!*flag)
        event_base_loop(base, EVLOOP_ONCE);
}

typedef struct opened {
    int fired;
    pgs_error err;
    int ok;
} opened;

static void on_opened(pgs_conn *c, const pgs_error *err, void *arg)
{
    (void)c;
    opened *o = arg;
    o->fired = 1;
    o->ok = !err;
    if (err)
        o->err = *err;
}

static pgs_conn *open_conn(void)
{
    opened o = {0};
    pgs_conn *c;
    pgs_conn_opts opts = {.connect_timeout_ms = connect_timeout_ms};
    if (pgs_conn_open(base, conninfo, &opts, on_opened, &o, &c) != PGS_OK)
        fatal("cannot start a connection", NULL);
    wait_for(&o.fired);
    if (!o.ok)
        fatal("cannot connect", &o.err);
    return c;
}

static void on_closed(void *arg)
{
    *(int *)arg = 1;
}

static void close_conn(pgs_conn *c)
{
    int done = 0;
    pgs_conn_close(c, on_closed, &done);
    wait_for(&done);
}

typedef struct rows {
    int fired;
    pgs_error err;
    int failed;
    int n;
    char v[16][3][64];
} rows;

static void on_rows(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg)
{
    (void)c;
    rows *r = arg;
    r->fired = 1;
    r->failed = err != NULL;
    if (err) {
        r->err = *err;
        return;
    }
    for (int i = 0; i < PQntuples(res) && i < 16; i++, r->n++)
        for (int j = 0; j < PQnfields(res) && j < 3; j++)
            snprintf(r->v[i][j], sizeof r->v[i][j], "%s", PQgetvalue(res, i, j));
}

/* One statement, waited for. Exits on an error unless `tolerate` is set. */
static rows query(pgs_conn *c, const char *sql, int n, const char *const *values, int tolerate)
{
    rows r = {0};
    if (pgs_query(c, sql, n, values, on_rows, &r) != PGS_OK)
        fatal("cannot send a statement", NULL);
    wait_for(&r.fired);
    if (r.failed && !tolerate)
        fatal(sql, &r.err);
    return r;
}

static void load_schema(pgs_conn *c)
{
    const char *p = demo_schema;
    while (*p) {
        const char *end = strstr(p, ";\n");
        size_t len = end ? (size_t)(end - p) + 1 : strlen(p);
        char *stmt = strndup(p, len);
        if (strspn(stmt, " \t\n") < strlen(stmt))
            query(c, stmt, 0, NULL, 0);
        free(stmt);
        p += end ? len + 1 : len;
    }
}

static long total_balance(pgs_conn *c)
{
    rows r = query(c, "SELECT sum(balance) FROM demo_accounts", 0, NULL, 0);
    return atol(r.v[0][0]);
}

static void show_balances(pgs_conn *c, const char *when, const char *ids)
{
    const char *v[] = {ids};
    rows r = query(c,
                   "SELECT owner, balance FROM demo_accounts WHERE id = ANY($1::int[]) "
                   "ORDER BY id",
                   1, v, 0);
    char line[256] = "";
    for (int i = 0; i < r.n; i++) {
        size_t len = strlen(line);
        snprintf(line + len, sizeof line - len, "%s%s %s", i ? ", " : "", r.v[i][0], r.v[i][1]);
    }
    say("%-7s %s", when, line);
}

static long balance_of(pgs_conn *c, const char *id)
{
    const char *v[] = {id};
    return atol(query(c, "SELECT balance FROM demo_accounts WHERE id = $1::int", 1, v, 0).v[0][0]);
}

/* The accounts a scenario uses: the richest pays (so earlier runs, which moved money about,
 * never turn a planned commit into an overdraft), the two poorest receive. */
typedef struct parties {
    char from[64], to[64], other[64];
    char from_name[64], to_name[64], other_name[64];
    char ids[200];
} parties;

static parties pick_parties(pgs_conn *c)
{
    rows r = query(c, "SELECT id, owner FROM demo_accounts ORDER BY balance DESC, id", 0, NULL, 0);
    if (r.n < 3)
        fatal("the demo needs at least 3 accounts in demo_accounts", NULL);
    parties p;
    snprintf(p.from, sizeof p.from, "%s", r.v[0][0]);
    snprintf(p.from_name, sizeof p.from_name, "%s", r.v[0][1]);
    snprintf(p.to, sizeof p.to, "%s", r.v[r.n - 1][0]);
    snprintf(p.to_name, sizeof p.to_name, "%s", r.v[r.n - 1][1]);
    snprintf(p.other, sizeof p.other, "%s", r.v[r.n - 2][0]);
    snprintf(p.other_name, sizeof p.other_name, "%s", r.v[r.n - 2][1]);
    snprintf(p.ids, sizeof p.ids, "{%s,%s,%s}", p.from, p.to, p.other);
    return p;
}

static int backend_alive(pgs_conn *observer, int pid)
{
    char p[16];
    snprintf(p, sizeof p, "%d", pid);
    const char *v[] = {p};
    return atoi(query(observer, "SELECT count(*) FROM pg_stat_activity WHERE pid = $1::int", 1, v,
                      0)
                    .v[0][0]);
}

/* Poll until the backend is gone (a cancelled session's backend exits within moments). */
static int backend_gone(pgs_conn *observer, int pid)
{
    for (int i = 0; i < 100; i++) {
        if (!backend_alive(observer, pid))
            return 1;
        usleep(20000);
    }
    return 0;
}

/* ---- a transfer: the body every scenario shares ---- */

/* One transfer run by pgs_run_tx (which hands the same arg to the body and to done). */
typedef struct job {
    char from[12], to[12], amount[24];
    const char *extra_sql; /* run after the two updates (cancel, timeout) */
    int in_id_order;       /* update the lower id first, so concurrent transfers never deadlock */
    int bodies;            /* how often the body ran */
    int fired;             /* done */
    pgs_tx_outcome outcome;
    int has_err;
    pgs_error err;
    int attempts;
    double started, ended;
    pgs_tx *tx; /* the current attempt's guard */
} job;

static void ignore_result(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg)
{
    (void)c;
    (void)res;
    (void)err;
    (void)arg;
}

/* Credit first, then debit: an overdraft fails on the debit, after the credit ran, so the
 * rollback visibly undoes work. */
static void queue_transfer(pgs_tx *tx, const job *j)
{
    static const char credit_sql[] =
        "UPDATE demo_accounts SET balance = balance + $1::bigint WHERE id = $2::int";
    static const char debit_sql[] =
        "UPDATE demo_accounts SET balance = balance - $1::bigint WHERE id = $2::int";
    const char *credit[] = {j->amount, j->to};
    const char *debit[] = {j->amount, j->from};
    int debit_first = j->in_id_order && atoi(j->from) < atoi(j->to);
    pgs_tx_query(tx, debit_first ? debit_sql : credit_sql, 2, debit_first ? debit : credit,
                 ignore_result, NULL);
    pgs_tx_query(tx, debit_first ? credit_sql : debit_sql, 2, debit_first ? credit : debit,
                 ignore_result, NULL);
}

static void transfer_body(pgs_tx *tx, void *arg)
{
    job *j = arg;
    j->bodies++;
    j->tx = tx;
    queue_transfer(tx, j);
    if (j->extra_sql)
        pgs_tx_query(tx, j->extra_sql, 0, NULL, ignore_result, NULL);
    pgs_tx_end(tx, 1, NULL, NULL); /* at once: one round trip for the whole transaction */
}

static void job_done(const pgs_tx_result *r, void *arg)
{
    job *j = arg;
    j->fired = 1;
    j->outcome = r->outcome;
    j->has_err = r->err != NULL;
    if (r->err)
        j->err = *r->err;
    j->attempts = r->attempts;
    j->ended = now_s();
}

static const char *outcome_name(pgs_tx_outcome o)
{
    return o == PGS_TX_COMMITTED ? "committed" : o == PGS_TX_ROLLED_BACK ? "rolled back" : "unknown";
}

static void make_job(job *j, int from, int to, long amount)
{
    memset(j, 0, sizeof *j);
    snprintf(j->from, sizeof j->from, "%d", from);
    snprintf(j->to, sizeof j->to, "%d", to);
    snprintf(j->amount, sizeof j->amount, "%ld", amount);
}

static void run_job(pgs_conn *c, job *j, const pgs_tx_opts *opts)
{
    j->started = now_s();
    if (pgs_run_tx(c, opts, transfer_body, job_done, j) != PGS_OK)
        fatal("cannot start a transaction", NULL);
}

static void report(const job *j)
{
    if (j->has_err)
        say("outcome: %s after %.1f ms: %s (SQLSTATE %s)", outcome_name(j->outcome),
            (j->ended - j->started) * 1e3, j->err.message, j->err.sqlstate[0] ? j->err.sqlstate : "-");
    else
        say("outcome: %s after %.1f ms", outcome_name(j->outcome), (j->ended - j->started) * 1e3);
}

/* ---- scenarios ---- */

static void scenario_commit(void)
{
    printf("\n== commit: a transfer commits on clean exit\n");
    pgs_conn *c = open_conn();
    load_schema(c);
    parties p = pick_parties(c);
    show_balances(c, "before:", p.ids);
    long a0 = balance_of(c, p.from), b0 = balance_of(c, p.to);
    job j;
    make_job(&j, atoi(p.from), atoi(p.to), 100);
    say("transfer 100 from %s to %s: BEGIN, two UPDATEs and COMMIT in one round trip",
        p.from_name, p.to_name);
    run_job(c, &j, NULL);
    wait_for(&j.fired);
    report(&j);
    show_balances(c, "after:", p.ids);
    check(j.outcome == PGS_TX_COMMITTED && !j.has_err, "the transaction committed");
    check(balance_of(c, p.from) == a0 - 100 && balance_of(c, p.to) == b0 + 100,
          "%s has 100 less, %s 100 more", p.from_name, p.to_name);
    close_conn(c);
}

static void scenario_rollback(void)
{
    printf("\n== rollback: an error mid-way undoes the whole transaction\n");
    pgs_conn *c = open_conn();
    load_schema(c);
    parties p = pick_parties(c);
    show_balances(c, "before:", p.ids);
    long a0 = balance_of(c, p.from), b0 = balance_of(c, p.to);
    job j;
    make_job(&j, atoi(p.from), atoi(p.to), a0 + 1);
    say("transfer %s from %s to %s: more than there is; the credit runs, the debit breaks "
        "the CHECK",
        j.amount, p.from_name, p.to_name);
    run_job(c, &j, NULL);
    wait_for(&j.fired);
    report(&j);
    show_balances(c, "after:", p.ids);
    check(j.outcome == PGS_TX_ROLLED_BACK && strcmp(j.err.sqlstate, "23514") == 0,
          "rolled back with SQLSTATE 23514 (check_violation)");
    check(balance_of(c, p.from) == a0 && balance_of(c, p.to) == b0,
          "nothing changed: %s did not keep the credit", p.to_name);
    close_conn(c);
}

typedef struct sp_state {
    int inner_fired, outer_fired;
    pgs_tx_result inner, outer;
    pgs_error inner_err;
} sp_state;

static void inner_done(const pgs_tx_result *r, void *arg)
{
    sp_state *s = arg;
    s->inner_fired = 1;
    s->inner = *r;
    if (r->err)
        s->inner_err = *r->err;
}

static void outer_done(const pgs_tx_result *r, void *arg)
{
    sp_state *s = arg;
    s->outer_fired = 1;
    s->outer = *r;
    s->outer.err = NULL;
}

static void scenario_savepoint(void)
{
    printf("\n== savepoint: an inner guard fails and is rolled back; the outer one commits\n");
    pgs_conn *c = open_conn();
    load_schema(c);
    parties pt = pick_parties(c);
    show_balances(c, "before:", pt.ids);
    long e0 = balance_of(c, pt.from), f0 = balance_of(c, pt.to);
    rows before = query(c, "SELECT count(*) FROM demo_log", 0, NULL, 0);
    pgs_tx *outer, *inner;
    sp_state s = {0};
    if (pgs_tx_begin(c, NULL, NULL, NULL, &outer) != PGS_OK)
        fatal("cannot begin", NULL);
    const char *ev[] = {"savepoint demo: outer transfer of 10"};
    pgs_tx_query(outer, "INSERT INTO demo_log (event) VALUES ($1)", 1, ev, ignore_result, NULL);
    job ok_transfer;
    make_job(&ok_transfer, atoi(pt.from), atoi(pt.to), 10);
    queue_transfer(outer, &ok_transfer);
    pgs_tx_savepoint(outer, NULL, NULL, &inner);
    job overdraft;
    make_job(&overdraft, atoi(pt.from), atoi(pt.to), e0 * 10);
    queue_transfer(inner, &overdraft);
    pgs_tx_end(inner, 1, inner_done, &s);
    pgs_tx_end(outer, 1, outer_done, &s);
    say("outer: log row + transfer 10 from %s to %s; inner savepoint: an overdraft of %s",
        pt.from_name, pt.to_name, overdraft.amount);
    wait_for(&s.outer_fired);
    say("inner: %s (%s, SQLSTATE %s)", outcome_name(s.inner.outcome), s.inner_err.message,
        s.inner_err.sqlstate);
    say("outer: %s", outcome_name(s.outer.outcome));
    show_balances(c, "after:", pt.ids);
    rows after = query(c, "SELECT count(*) FROM demo_log", 0, NULL, 0);
    check(s.inner.outcome == PGS_TX_ROLLED_BACK && strcmp(s.inner_err.sqlstate, "23514") == 0,
          "the inner guard rolled back to its savepoint");
    check(s.outer.outcome == PGS_TX_COMMITTED, "the outer guard committed");
    check(balance_of(c, pt.from) == e0 - 10 && balance_of(c, pt.to) == f0 + 10 &&
              atol(after.v[0][0]) == atol(before.v[0][0]) + 1,
          "the outer work is there (10 moved, one log row), the inner work is not");
    close_conn(c);
}

typedef struct later {
    job *j;
    int fired;
} later;

static void cancel_later(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    later *l = arg;
    l->fired = 1;
    if (l->j->tx)
        pgs_tx_cancel(l->j->tx);
}

/* Shared by cancel and timeout: a transfer, then a long statement, stopped one way or the
 * other; the backend must be gone and nothing written. */
static void long_statement(int by_timeout)
{
    pgs_conn *c = open_conn(), *observer = open_conn();
    load_schema(c);
    int pid = PQbackendPID(pgs_conn_pgconn(c));
    parties p = pick_parties(c);
    long g0 = balance_of(observer, p.from), h0 = balance_of(observer, p.to);
    job j;
    make_job(&j, atoi(p.from), atoi(p.to), 50);
    j.extra_sql = "SELECT pg_sleep(30)";
    pgs_tx_opts opts = {.timeout_ms = by_timeout ? 500 : 0};
    say("transfer 50 from %s to %s, then SELECT pg_sleep(30) in the same transaction",
        p.from_name, p.to_name);
    run_job(c, &j, &opts);
    struct event *t = NULL;
    later l = {.j = &j};
    if (!by_timeout) {
        say("cancel after 500 ms");
        t = evtimer_new(base, cancel_later, &l);
        struct timeval tv = {0, 500000};
        evtimer_add(t, &tv);
    } else {
        say("the transaction's time budget: 500 ms");
    }
    wait_for(&j.fired);
    if (t)
        event_free(t);
    report(&j);
    int gone = backend_gone(observer, pid);
    say("backend %d: %s", pid, gone ? "gone from pg_stat_activity (the connection was closed)"
                                     : "still there");
    pgs_code want = by_timeout ? PGS_ETIMEDOUT : PGS_ECANCELED;
    check(j.outcome == PGS_TX_ROLLED_BACK && j.err.code == want, "the guard reported %s",
          pgs_strerror(want));
    check(j.ended - j.started < 2.0, "it took %.0f ms, not 30 s", (j.ended - j.started) * 1e3);
    check(gone, "backend gone");
    check(pgs_conn_pgconn(c) == NULL, "the connection guard's connection is closed");
    check(balance_of(observer, p.from) == g0 && balance_of(observer, p.to) == h0,
          "nothing was written");
    close_conn(c);
    close_conn(observer);
}

static void scenario_cancel(void)
{
    printf("\n== cancel: a long statement inside a transaction is cancelled\n");
    long_statement(0);
}

static void scenario_timeout(void)
{
    printf("\n== timeout: a statement runs over the transaction's time budget\n");
    long_statement(1);
}

/* Read the balance first, then write it back changed: under serializable isolation two of
 * these at once conflict, and one must run again. */
typedef struct rmw {
    job j;
    int read_balance_waiting;
} rmw;

static rmw *rmw_jobs[2];
static int rmw_parked;

static void rmw_write(rmw *r, long balance)
{
    char next[24];
    snprintf(next, sizeof next, "%ld", balance - atol(r->j.amount));
    const char *debit[] = {next, r->j.from};
    const char *credit[] = {r->j.amount, r->j.to};
    pgs_tx_query(r->j.tx, "UPDATE demo_accounts SET balance = $1::bigint WHERE id = $2::int", 2,
                 debit, ignore_result, NULL);
    pgs_tx_query(r->j.tx,
                 "UPDATE demo_accounts SET balance = balance + $1::bigint WHERE id = $2::int", 2,
                 credit, ignore_result, NULL);
    pgs_tx_end(r->j.tx, 1, NULL, NULL);
}

static long rmw_seen[2];

static void rmw_read(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg)
{
    (void)c;
    rmw *r = arg;
    if (err) {
        pgs_tx_end(r->j.tx, 0, NULL, NULL);
        return;
    }
    long balance = atol(PQgetvalue(res, 0, 0));
    if (rmw_parked < 0) { /* a retry: nothing to wait for */
        rmw_write(r, balance);
        return;
    }
    /* Both first attempts read before either writes, so the conflict is certain. */
    rmw_seen[rmw_parked++] = balance;
    if (rmw_parked == 2) {
        rmw_parked = -1;
        rmw_write(rmw_jobs[0], rmw_seen[0]);
        rmw_write(rmw_jobs[1], rmw_seen[1]);
    }
}

static void rmw_body(pgs_tx *tx, void *arg)
{
    rmw *r = arg;
    r->j.bodies++;
    r->j.tx = tx;
    const char *v[] = {r->j.from};
    pgs_tx_query(tx, "SELECT balance FROM demo_accounts WHERE id = $1::int", 1, v, rmw_read, r);
}

static void scenario_retry(void)
{
    printf("\n== retry: two conflicting serializable transfers; one is retried, both apply\n");
    pgs_conn *c1 = open_conn(), *c2 = open_conn();
    load_schema(c1);
    parties p = pick_parties(c1);
    show_balances(c1, "before:", p.ids);
    long a0 = balance_of(c1, p.from);
    rmw r1 = {0}, r2 = {0};
    make_job(&r1.j, atoi(p.from), atoi(p.to), 5);
    make_job(&r2.j, atoi(p.from), atoi(p.other), 7);
    rmw_jobs[0] = &r1;
    rmw_jobs[1] = &r2;
    rmw_parked = 0;
    pgs_tx_opts opts = {.isolation = PGS_ISO_SERIALIZABLE, .retries = 5};
    say("both read %s's balance, then write it back less 5 and less 7", p.from_name);
    r1.j.started = r2.j.started = now_s();
    pgs_run_tx(c1, &opts, rmw_body, job_done, &r1.j);
    pgs_run_tx(c2, &opts, rmw_body, job_done, &r2.j);
    wait_for(&r1.j.fired);
    wait_for(&r2.j.fired);
    say("first:  %s after %d attempt(s)", outcome_name(r1.j.outcome), r1.j.attempts);
    say("second: %s after %d attempt(s)", outcome_name(r2.j.outcome), r2.j.attempts);
    show_balances(c1, "after:", p.ids);
    check(r1.j.outcome == PGS_TX_COMMITTED && r2.j.outcome == PGS_TX_COMMITTED, "both committed");
    check(r1.j.attempts + r2.j.attempts == 3, "exactly one ran again (40001 serialization failure)");
    check(balance_of(c1, p.from) == a0 - 12, "%s lost 12 in all: no update was lost",
          p.from_name);
    close_conn(c1);
    close_conn(c2);
}

/* ---- transfer: many at once on a pool ---- */

/* Transfers that neither committed nor were refused by the CHECK, grouped by code and message,
 * so the summary says what happened to them. */
typedef struct failure_kind {
    int code; /* a pgs_code, or -1: the rest */
    char msg[200];
    int n;
} failure_kind;

typedef struct load {
    pgs_pool *pool;
    int count, concurrency, started, finished, commits, rollbacks, retries, other;
    failure_kind kinds[8];
    int nkinds;
    unsigned seed;
    double t0, last_print;
    int tty;
} load;

typedef struct load_job {
    load *l;
    job j;
} load_job;

static void load_next(load *l);

static void load_body(pgs_tx *tx, void *arg)
{
    transfer_body(tx, &((load_job *)arg)->j);
}

static void progress_line(load *l, int last)
{
    double el = now_s() - l->t0;
    printf("\r  %d/%d transfers  %.0f/s  commits %d  rollbacks %d  retries %d%s", l->finished,
           l->count, el > 0 ? l->finished / el : 0.0, l->commits, l->rollbacks, l->retries,
           last ? "\n" : "");
    fflush(stdout);
}

/* Counts a failure under its code and the first line of its message; past the first seven
 * kinds, under "other reasons" (code -1), the last slot. */
static void note_failure(load *l, const pgs_tx_result *r)
{
    int code = r->err ? (int)r->err->code : PGS_OK;
    char msg[sizeof l->kinds[0].msg];
    const char *text = r->err ? r->err->message : outcome_name(r->outcome);
    size_t len = strcspn(text, "\n");
    if (len >= sizeof msg)
        len = sizeof msg - 1;
    memcpy(msg, text, len);
    msg[len] = '\0';
    int size = (int)(sizeof l->kinds / sizeof l->kinds[0]), i = 0;
    while (i < l->nkinds && (l->kinds[i].code != code || strcmp(l->kinds[i].msg, msg) != 0))
        i++;
    if (i == l->nkinds && l->nkinds < size - 1) {
        l->kinds[i].code = code;
        memcpy(l->kinds[i].msg, msg, sizeof msg);
        l->nkinds++;
    } else if (i == l->nkinds) {
        i = size - 1;
        l->kinds[i].code = -1;
        l->nkinds = size;
    }
    l->kinds[i].n++;
}

static void load_done(const pgs_tx_result *r, void *arg)
{
    load_job *lj = arg;
    load *l = lj->l;
    l->finished++;
    if (r->attempts > 1)
        l->retries += r->attempts - 1;
    if (r->outcome == PGS_TX_COMMITTED) {
        l->commits++;
    } else if (r->err && strcmp(r->err->sqlstate, "23514") == 0) {
        l->rollbacks++; /* an overdraft: the CHECK refused it, as it should */
    } else {
        l->other++;
        note_failure(l, r);
    }
    free(lj);
    if (l->tty && (now_s() - l->last_print >= 0.1 || l->finished == l->count)) {
        l->last_print = now_s(); /* ten updates a second at most: the line is for people */
        progress_line(l, 0);
    }
    load_next(l);
}

static void load_next(load *l)
{
    if (l->started >= l->count)
        return;
    load_job *lj = calloc(1, sizeof *lj);
    if (!lj)
        fatal("out of memory", NULL);
    lj->l = l;
    int from = 1 + (int)(rand_r(&l->seed) % 8), to = 1 + (int)(rand_r(&l->seed) % 7);
    if (to >= from)
        to++;
    make_job(&lj->j, from, to, 1 + (long)(rand_r(&l->seed) % 300));
    lj->j.in_id_order = 1;
    l->started++;
    /* Eight accounts: the more transfers at once, the more often each one conflicts, so the
     * more retries it may need (10, and one more for every 8 at a time). */
    pgs_tx_opts opts = {.isolation = PGS_ISO_SERIALIZABLE, .retries = 10 + l->concurrency / 8};
    if (pgs_pool_run_tx(l->pool, &opts, load_body, load_done, lj) != PGS_OK)
        fatal("cannot queue a transfer", NULL);
}

static void on_pool_closed(void *arg)
{
    *(int *)arg = 1;
}

/* ---- tracing: what a light tracer plugs into the pool's hooks (pgs_hooks) ---- */

/* The hooks only observe: they count, keep the three slowest statements (their text, which
 * never holds a parameter value) and the acquire waits, and call nothing of the library. A
 * service would hand the same facts to its logger or metrics. */
enum { SLOWEST = 3, SQL_SHOWN = 100, TX_KINDS = 8 };

typedef struct slow_stmt {
    long long us;
    char sql[SQL_SHOWN + 4]; /* cut at SQL_SHOWN bytes, "..." then */
} slow_stmt;

/* Transactions that ended the same way (tx_end): the outcome and the SQLSTATE (or the code when
 * there is none), with the attempt each ended on: 1, 2, 3 or later. */
typedef struct tx_kind {
    pgs_tx_outcome outcome;
    char why[32]; /* "" (as the end asked), a SQLSTATE, or a code's name */
    int n;
    int at_attempt[3];
} tx_kind;

typedef struct tracer {
    long stmt_started, stmt_ended, stmt_failed;
    slow_stmt slow[SLOWEST]; /* slowest first */
    int nslow;
    long tx_begun, tx_ended, tx_first; /* tx_first: ended on attempt 1 (one per transfer) */
    tx_kind kinds[TX_KINDS];
    int nkinds;
    long long *waits; /* granted acquires' waits, in us */
    size_t nwaits, cap;
    long acquire_failed; /* acquires that did not get a connection */
    int waits_lost;      /* out of memory for a wait: the percentiles leave it out */
    long conn_opened, conn_failed, conn_abandoned, conn_lost, conn_replaced;
} tracer;

static void t_stmt_start(pgs_conn *c, const char *sql, void *arg)
{
    (void)c;
    (void)sql;
    ((tracer *)arg)->stmt_started++;
}

/* The statement's text on one line, cut at SQL_SHOWN bytes. */
static void shown_sql(char *out, size_t cap, const char *sql)
{
    size_t n = 0;
    for (const char *p = sql; *p && n < SQL_SHOWN && n + 4 < cap; p++)
        out[n++] = (*p == '\n' || *p == '\t' || *p == '\r') ? ' ' : *p;
    snprintf(out + n, cap - n, "%s", sql[n] ? "..." : "");
}

/* Keeps the slowest run of each of the SLOWEST slowest texts: the statements of one pipeline
 * segment end together, so the slowest runs alone would often be one transaction's. */
static void t_stmt_end(pgs_conn *c, const pgs_stmt_trace *t, void *arg)
{
    (void)c;
    tracer *tr = arg;
    tr->stmt_ended++;
    tr->stmt_failed += t->err != NULL;
    if (tr->nslow == SLOWEST && t->duration_us <= tr->slow[SLOWEST - 1].us)
        return;
    char sql[sizeof tr->slow[0].sql];
    shown_sql(sql, sizeof sql, t->sql);
    int at = 0; /* the text's entry, or where a new one goes (the last, when the list is full) */
    while (at < tr->nslow && strcmp(tr->slow[at].sql, sql) != 0)
        at++;
    if (at < tr->nslow && tr->slow[at].us >= t->duration_us)
        return; /* its text was slower before */
    if (at == tr->nslow && tr->nslow < SLOWEST)
        tr->nslow++;
    else if (at == tr->nslow)
        at = SLOWEST - 1; /* the fastest of the list gives way */
    slow_stmt s = {.us = t->duration_us};
    memcpy(s.sql, sql, sizeof sql);
    while (at > 0 && tr->slow[at - 1].us < s.us) { /* move up to its place */
        tr->slow[at] = tr->slow[at - 1];
        at--;
    }
    tr->slow[at] = s;
}

static void t_tx_begin(pgs_conn *c, pgs_tx *tx, void *arg)
{
    (void)c;
    (void)tx;
    ((tracer *)arg)->tx_begun++;
}

static void t_tx_end(pgs_conn *c, const pgs_tx_result *r, long long duration_us, void *arg)
{
    (void)c;
    (void)duration_us;
    tracer *tr = arg;
    tr->tx_ended++;
    tr->tx_first += r->attempts <= 1;
    char why[32] = "";
    if (r->err && r->err->sqlstate[0])
        snprintf(why, sizeof why, "SQLSTATE %s", r->err->sqlstate);
    else if (r->err)
        snprintf(why, sizeof why, "%.*s", (int)strcspn(pgs_strerror(r->err->code), ":"),
                 pgs_strerror(r->err->code));
    int i = 0;
    while (i < tr->nkinds && (tr->kinds[i].outcome != r->outcome || strcmp(tr->kinds[i].why, why)))
        i++;
    if (i == tr->nkinds && tr->nkinds < TX_KINDS - 1) {
        tr->kinds[i].outcome = r->outcome;
        memcpy(tr->kinds[i].why, why, sizeof why);
        tr->nkinds++;
    } else if (i == tr->nkinds) {
        i = TX_KINDS - 1; /* the last slot takes the rest (outcome 0: "other") */
        tr->nkinds = TX_KINDS;
    }
    tr->kinds[i].n++;
    tr->kinds[i].at_attempt[r->attempts <= 1 ? 0 : r->attempts == 2 ? 1 : 2]++;
}

static void t_acquire(pgs_pool *p, const pgs_acquire_trace *t, void *arg)
{
    (void)p;
    tracer *tr = arg;
    if (t->code != PGS_OK) {
        tr->acquire_failed++;
        return;
    }
    if (tr->nwaits == tr->cap) {
        size_t cap = tr->cap ? 2 * tr->cap : 1024;
        long long *w = realloc(tr->waits, cap * sizeof *w);
        if (!w) {
            tr->waits_lost = 1; /* a tracer never stops the work it watches */
            return;
        }
        tr->waits = w;
        tr->cap = cap;
    }
    tr->waits[tr->nwaits++] = t->wait_us;
}

static void t_conn_open(pgs_conn *c, const pgs_error *err, void *arg)
{
    (void)c;
    tracer *tr = arg;
    if (err && err->code == PGS_ECLOSED)
        tr->conn_abandoned++; /* still opening when the pool closed: not a failure */
    else if (err)
        tr->conn_failed++;
    else
        tr->conn_opened++;
}

static void t_conn_lost(pgs_conn *c, const pgs_error *err, void *arg)
{
    (void)c;
    (void)err;
    ((tracer *)arg)->conn_lost++;
}

static void t_conn_replaced(pgs_pool *p, pgs_conn *c, const pgs_error *why, void *arg)
{
    (void)p;
    (void)c;
    (void)why;
    ((tracer *)arg)->conn_replaced++;
}

static int cmp_ll(const void *a, const void *b)
{
    long long x = *(const long long *)a, y = *(const long long *)b;
    return x < y ? -1 : x > y;
}

/* Committed first, then refused, then the rest, each in the order first seen: stable lines. */
static int kind_rank(const tx_kind *k)
{
    return k->outcome == PGS_TX_COMMITTED ? 0 : strcmp(k->why, "SQLSTATE 23514") == 0 ? 1 : 2;
}

/* The summary, once the pool is closed (every statement it traced has ended). */
static void trace_summary(tracer *tr, const load *l)
{
    say("trace (the pool's pgs_hooks): %ld statements ended (%ld started; the pool's resets "
        "included), %ld failed",
        tr->stmt_ended, tr->stmt_started, tr->stmt_failed);
    say("trace: %ld transactions: %ld transfers, %ld retries", tr->tx_ended, tr->tx_first,
        tr->tx_ended - tr->tx_first);
    say("trace: connections opened %ld, failed %ld, closed while opening %ld, lost %ld, "
        "replaced %ld",
        tr->conn_opened, tr->conn_failed, tr->conn_abandoned, tr->conn_lost, tr->conn_replaced);
    if (tr->nwaits == 0) {
        say("trace: no acquire traces");
    } else {
        qsort(tr->waits, tr->nwaits, sizeof *tr->waits, cmp_ll);
        size_t p99 = (size_t)((double)tr->nwaits * 0.99);
        if (p99 >= tr->nwaits)
            p99 = tr->nwaits - 1;
        say("trace: acquire wait p50 %.2f ms, p99 %.2f ms (%zu granted, %ld failed)",
            tr->waits[tr->nwaits / 2] / 1e3, tr->waits[p99] / 1e3, tr->nwaits, tr->acquire_failed);
    }
    if (tr->waits_lost)
        say("trace: (some acquire waits were not kept: out of memory)");
    say("trace: slowest statements (queued to answered; the slowest run of each text; text only, "
        "never values):");
    for (int i = 0; i < tr->nslow; i++)
        say("trace:   %.1f ms  %s", tr->slow[i].us / 1e3, tr->slow[i].sql);
    for (int rank = 0; rank < 3; rank++)
        for (int i = 0; i < tr->nkinds; i++) {
            const tx_kind *k = &tr->kinds[i];
            if (kind_rank(k) != rank)
                continue;
            say("trace: transactions %s%s%s: %d (on attempt 1: %d, 2: %d, 3 or later: %d)",
                k->outcome ? outcome_name(k->outcome) : "ended otherwise", k->why[0] ? ", " : "",
                k->why, k->n, k->at_attempt[0], k->at_attempt[1], k->at_attempt[2]);
        }
    check(tr->tx_first == l->finished && tr->tx_ended - tr->tx_first == l->retries &&
              tr->tx_begun == tr->tx_ended,
          "the trace saw every transfer once (%ld) and every retry (%ld), each begun and ended",
          tr->tx_first, tr->tx_ended - tr->tx_first);
    check(tr->stmt_started == tr->stmt_ended, "every statement traced at its start ended (%ld)",
          tr->stmt_ended);
    free(tr->waits);
    tr->waits = NULL;
}

/* How many more connections the server takes now: max_connections, less the slots reserved
 * for superusers (and, from PostgreSQL 16, for pg_use_reserved_connections), less the client
 * connections already open (this one among them). Tells how it got there in `how`. */
static int free_connections(pgs_conn *c, char *how, size_t len)
{
    rows r = query(c,
                   "SELECT current_setting('max_connections')::int, "
                   "current_setting('superuser_reserved_connections')::int "
                   "+ coalesce(current_setting('reserved_connections', true)::int, 0), "
                   "(SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::int",
                   0, NULL, 0);
    int max = atoi(r.v[0][0]), reserved = atoi(r.v[0][1]), in_use = atoi(r.v[0][2]);
    int left = max - reserved - in_use;
    snprintf(how, len, "max_connections %d, less %d reserved and %d in use", max, reserved,
             in_use);
    return left;
}

static void scenario_transfer(int count, int concurrency)
{
    pgs_conn *c = open_conn();
    char how[160];
    int left = free_connections(c, how, sizeof how);
    if (left < 1) {
        fprintf(stderr, "pgscope-demo: the server takes no more connections (%s)\n", how);
        exit(2);
    }
    int asked = concurrency;
    if (concurrency > left)
        concurrency = left;
    printf("\n== transfer: %d random serializable transfers, %d at a time, on a pool of %d\n",
           count, concurrency, concurrency);
    if (concurrency < asked)
        say("warning: concurrency %d capped at %d, what the server takes now (%s)", asked,
            concurrency, how);
    load_schema(c);
    long total0 = total_balance(c);
    load l = {.count = count, .concurrency = concurrency, .seed = (unsigned)time(NULL),
              .tty = isatty(STDOUT_FILENO)};
    tracer tr = {0};
    const pgs_hooks hooks = {.stmt_start = t_stmt_start, .stmt_end = t_stmt_end,
                             .tx_begin = t_tx_begin, .tx_end = t_tx_end, .acquire = t_acquire,
                             .conn_open = t_conn_open, .conn_lost = t_conn_lost,
                             .conn_replaced = t_conn_replaced, .arg = &tr};
    pgs_pool_opts po = {.max_size = concurrency, .acquire_timeout_ms = 60000,
                        .conn = {.connect_timeout_ms = connect_timeout_ms}, .hooks = &hooks};
    if (pgs_pool_new(base, conninfo, &po, &l.pool) != PGS_OK)
        fatal("cannot create the pool", NULL);
    l.t0 = now_s();
    for (int i = 0; i < concurrency; i++)
        load_next(&l);
    while (l.finished < l.count)
        event_base_loop(base, EVLOOP_ONCE);
    double el = now_s() - l.t0;
    if (l.tty)
        progress_line(&l, 1);
    say("%d transfers in %.2f s (%.0f/s): %d committed, %d refused as overdrafts, %d retries",
        l.count, el, l.count / el, l.commits, l.rollbacks, l.retries);
    for (int i = 0; i < l.nkinds; i++) {
        const failure_kind *k = &l.kinds[i];
        const char *name = k->code < 0 ? NULL : pgs_strerror(k->code);
        if (name)
            say("%d failed with %.*s: %s", k->n, (int)strcspn(name, ":"), name, k->msg);
        else
            say("%d failed for other reasons", k->n);
    }
    long total1 = total_balance(c);
    say("total balance before %ld, after %ld", total0, total1);
    check(l.other == 0, "every transfer committed or was refused by the CHECK (%d other)", l.other);
    check(total0 == total1, "invariant held: the total balance is unchanged");
    int closed = 0;
    pgs_pool_close(l.pool, on_pool_closed, &closed);
    wait_for(&closed);
    trace_summary(&tr, &l);
    close_conn(c);
}

/* ---- bulk: COPY in and out, a large result streamed row by row ---- */

/* What a COPY's or a streamed statement's done said. The first member of each state below, so
 * one done callback serves them all (they share their arg with the data callbacks). */
typedef struct outcome {
    int fired;
    int failed;
    pgs_error err;
    long tuples; /* PQcmdTuples of the final result: the rows copied or returned */
    double ended;
} outcome;

static void on_outcome(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg)
{
    (void)c;
    outcome *o = arg;
    o->fired = 1;
    o->ended = now_s();
    o->failed = err != NULL;
    if (err)
        o->err = *err;
    else
        o->tuples = atol(PQcmdTuples((PGresult *)res));
}

#define FNV_OFFSET 14695981039346656037ull
#define MIB (1024.0 * 1024.0)

/* FNV-1a over the bytes: the export must be the load, byte for byte. */
static uint64_t fnv1a(uint64_t h, const char *p, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        h ^= (unsigned char)p[i];
        h *= 1099511628211ull;
    }
    return h;
}

static long bulk_amount(long id)
{
    return id * 7919 % 100003;
}

/* A COPY FROM STDIN fed from on_ready: rows made up 64 KiB at a time, each chunk written with
 * pgs_copy_write until it says PGS_EAGAIN; the chunk it refused waits for the next on_ready. */
typedef struct loader {
    outcome out;
    long next, last, of;      /* the ids still to write (next..last); `of`: for the label */
    const char *abort_reason; /* end with this (the server discards every row); NULL: commit */
    int ended;
    int write_error; /* a code other than PGS_EAGAIN (done reports the same) */
    long refused;    /* PGS_EAGAIN answers */
    long ready_calls;
    char chunk[64 * 1024];
    size_t len;            /* the chunk's bytes, not yet taken */
    long chunk_rows;       /* and its rows */
    long long chunk_sum;   /* and their amounts */
    long rows;             /* taken, in all */
    long long amount_sum;  /* ... */
    size_t bytes;          /* ... */
    uint64_t hash;         /* ... */
} loader;

static loader *new_loader(long first, long last, long of, const char *abort_reason)
{
    loader *l = calloc(1, sizeof *l);
    if (!l)
        fatal("out of memory", NULL);
    l->next = first;
    l->last = last;
    l->of = of;
    l->abort_reason = abort_reason;
    l->hash = FNV_OFFSET;
    return l;
}

/* The next whole rows, as many as fit in the chunk (COPY's text format: tab, newline). */
static void fill_chunk(loader *l)
{
    l->len = 0;
    l->chunk_rows = 0;
    l->chunk_sum = 0;
    while (l->next <= l->last && sizeof l->chunk - l->len > 128) {
        long id = l->next++;
        l->len += (size_t)snprintf(l->chunk + l->len, sizeof l->chunk - l->len,
                                   "%ld\t%ld\trow %ld of %ld, loaded by COPY FROM STDIN\n", id,
                                   bulk_amount(id), id, l->of);
        l->chunk_rows++;
        l->chunk_sum += bulk_amount(id);
    }
}

static void on_copy_ready(pgs_copy *copy, void *arg)
{
    loader *l = arg;
    l->ready_calls++;
    while (!l->ended) {
        if (l->len == 0) {
            if (l->next > l->last) {
                l->ended = 1;
                int rc = pgs_copy_end(copy, l->abort_reason);
                if (rc != PGS_OK)
                    l->write_error = rc;
                return;
            }
            fill_chunk(l);
        }
        int rc = pgs_copy_write(copy, l->chunk, l->len);
        if (rc == PGS_EAGAIN) {
            l->refused++; /* nothing taken: on_ready fires again once it can take more */
            return;
        }
        if (rc != PGS_OK) {
            l->write_error = rc; /* the connection is gone: done fires with its error */
            l->ended = 1;
            return;
        }
        l->rows += l->chunk_rows;
        l->amount_sum += l->chunk_sum;
        l->bytes += l->len;
        l->hash = fnv1a(l->hash, l->chunk, l->len);
        l->len = 0;
    }
}

static const char copy_in_sql[] = "COPY demo_bulk (id, amount, label) FROM STDIN";

static void refused_at_once(const char *what, int rc)
{
    pgs_error e = {.code = (pgs_code)rc};
    snprintf(e.message, sizeof e.message, "%s", pgs_strerror(rc));
    fatal(what, &e);
}

/* Run the loader's COPY (inside tx when not NULL) and wait for its done. */
static void run_loader(pgs_conn *c, pgs_tx *tx, loader *l)
{
    int rc = tx ? pgs_tx_copy_in(tx, copy_in_sql, on_copy_ready, on_outcome, l, NULL)
                : pgs_copy_in(c, copy_in_sql, on_copy_ready, on_outcome, l, NULL);
    if (rc != PGS_OK)
        refused_at_once("cannot start COPY FROM STDIN", rc);
    wait_for(&l->out.fired);
}

/* COPY TO STDOUT's output as it arrives: in text format one row per call. */
typedef struct exporter {
    outcome out;
    long rows, calls;
    size_t bytes;
    uint64_t hash;
} exporter;

static int on_copy_data(pgs_conn *c, const char *data, size_t len, void *arg)
{
    (void)c;
    exporter *e = arg;
    e->calls++;
    e->bytes += len;
    e->hash = fnv1a(e->hash, data, len);
    for (const char *p = data, *end = data + len; (p = memchr(p, '\n', (size_t)(end - p))); p++)
        e->rows++;
    return 0;
}

/* A streamed result as it arrives: rows counted, the second column summed (the first when
 * there is one column); stop_after > 0 stops the delivery once that many came. */
typedef struct streamer {
    outcome out;
    long rows, calls, stop_after;
    long long sum;
    size_t bytes;
} streamer;

static int on_stream_rows(pgs_conn *c, const PGresult *res, void *arg)
{
    (void)c;
    streamer *s = arg;
    int n = PQntuples(res), cols = PQnfields(res);
    s->calls++;
    for (int i = 0; i < n; i++) {
        s->sum += strtoll(PQgetvalue(res, i, cols > 1 ? 1 : 0), NULL, 10);
        for (int j = 0; j < cols; j++)
            s->bytes += (size_t)PQgetlength(res, i, j);
    }
    s->rows += n;
    return s->stop_after > 0 && s->rows >= s->stop_after; /* non-zero: no more rows, please */
}

/* The process's peak resident memory so far (VmHWM), in KiB; -1 without /proc/self/status. */
static long peak_kib(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    if (!f)
        return -1;
    char line[256];
    long kib = -1;
    while (kib < 0 && fgets(line, sizeof line, f))
        if (sscanf(line, "VmHWM: %ld kB", &kib) != 1)
            kib = -1;
    fclose(f);
    return kib;
}

#if defined(__SANITIZE_ADDRESS__)
#define DEMO_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define DEMO_ASAN 1
#endif
#endif

/* A memory checker in the process makes the peak say nothing about pgscope: AddressSanitizer
 * keeps freed memory in quarantine, valgrind shadows every allocation. */
static const char *memory_checker(void)
{
#ifdef DEMO_ASAN
    return "AddressSanitizer";
#else
    const char *preload = getenv("LD_PRELOAD");
    return preload && strstr(preload, "vgpreload") ? "valgrind" : NULL;
#endif
}

typedef struct ended {
    int fired;
    pgs_tx_outcome outcome;
    int has_err;
    pgs_error err;
} ended;

static void on_ended(const pgs_tx_result *r, void *arg)
{
    ended *e = arg;
    e->fired = 1;
    e->outcome = r->outcome;
    e->has_err = r->err != NULL;
    if (r->err)
        e->err = *r->err;
}

/* BEGIN; COPY rows first..first+999 FROM STDIN; SELECT count(*); commit or roll back. Returns
 * the count the transaction saw. */
static long copy_in_transaction(pgs_conn *c, long first, long of, int commit, ended *e,
                                long *copied)
{
    pgs_tx *tx;
    int rc = pgs_tx_begin(c, NULL, NULL, NULL, &tx);
    if (rc != PGS_OK)
        refused_at_once("cannot begin", rc);
    loader *l = new_loader(first, first + 999, of, NULL);
    run_loader(c, tx, l);
    *copied = l->out.failed ? -1 : l->out.tuples;
    rows inside = {0};
    if (pgs_tx_query(tx, "SELECT count(*) FROM demo_bulk", 0, NULL, on_rows, &inside) != PGS_OK)
        fatal("cannot send a statement", NULL);
    wait_for(&inside.fired);
    pgs_tx_end(tx, commit, on_ended, e);
    wait_for(&e->fired);
    free(l);
    return inside.failed ? -1 : atol(inside.v[0][0]);
}

static long bulk_count(pgs_conn *c)
{
    return atol(query(c, "SELECT count(*) FROM demo_bulk", 0, NULL, 0).v[0][0]);
}

static double per_s(long n, double s)
{
    return s > 0 ? n / s : 0.0;
}

static void scenario_bulk(long n)
{
    printf("\n== bulk: %ld rows in with COPY FROM STDIN, out with COPY TO STDOUT, %ld streamed "
           "row by row\n",
           n, 5 * n);
    pgs_conn *c = open_conn();
    load_schema(c);
    query(c, "TRUNCATE demo_bulk", 0, NULL, 0);
    long peak0 = peak_kib();
    if (peak0 >= 0)
        say("peak memory (VmHWM) before: %.1f MiB", peak0 / 1024.0);

    /* In: written until PGS_EAGAIN, then from on_ready. */
    loader *l = new_loader(1, n, n, NULL);
    double t0 = now_s();
    run_loader(c, NULL, l);
    if (l->out.failed)
        fatal("COPY FROM STDIN", &l->out.err);
    double el = l->out.ended - t0;
    say("COPY FROM STDIN: %ld rows (%.1f MiB) in %.2f s, %.0f rows/s (64 KiB writes; PGS_EAGAIN "
        "answers: %ld, on_ready calls: %ld)",
        l->rows, l->bytes / MIB, el, per_s(l->rows, el), l->refused, l->ready_calls);
    rows held = query(c, "SELECT count(*), sum(amount) FROM demo_bulk", 0, NULL, 0);
    check(l->out.tuples == n && atol(held.v[0][0]) == n && atoll(held.v[0][1]) == l->amount_sum,
          "the server holds the %ld rows (PQcmdTuples %ld), sum(amount) %lld as written", n,
          l->out.tuples, l->amount_sum);

    /* Out: one row per on_data, counted and hashed; never the whole in memory. */
    exporter e = {.hash = FNV_OFFSET};
    t0 = now_s();
    int rc = pgs_copy_out(c, "COPY (SELECT id, amount, label FROM demo_bulk ORDER BY id) TO STDOUT",
                          on_copy_data, on_outcome, &e);
    if (rc != PGS_OK)
        refused_at_once("cannot start COPY TO STDOUT", rc);
    wait_for(&e.out.fired);
    if (e.out.failed)
        fatal("COPY TO STDOUT", &e.out.err);
    el = e.out.ended - t0;
    say("COPY TO STDOUT: %ld rows (%.1f MiB) in %.2f s, %.0f rows/s (on_data calls: %ld)", e.rows,
        e.bytes / MIB, el, per_s(e.rows, el), e.calls);
    check(e.rows == n && e.out.tuples == n, "%ld rows exported, as PQcmdTuples says", e.rows);
    check(e.bytes == l->bytes && e.hash == l->hash,
          "the export is byte for byte what was loaded (%zu bytes, FNV-1a %016llx)", e.bytes,
          (unsigned long long)e.hash);

    /* A large SELECT, streamed: summed as it comes, checked against the server's own sum. */
    static const char stream_sql[] =
        "SELECT b.id, b.amount + k, b.label FROM demo_bulk b "
        "CROSS JOIN generate_series(0, $1::int - 1) AS k";
    const char *five[] = {"5"};
    streamer s = {0};
    t0 = now_s();
    rc = pgs_query_stream(c, stream_sql, 1, five, 0, on_stream_rows, on_outcome, &s);
    if (rc != PGS_OK)
        refused_at_once("cannot start a streamed statement", rc);
    wait_for(&s.out.fired);
    if (s.out.failed)
        fatal("the streamed SELECT", &s.out.err);
    el = s.out.ended - t0;
    say("pgs_query_stream: %ld rows (%.1f MiB of values) in %.2f s, %.0f rows/s (on_rows calls: "
        "%ld)",
        s.rows, s.bytes / MIB, el, per_s(s.rows, el), s.calls);
    rows sum = query(c,
                     "SELECT sum(b.amount + k) FROM demo_bulk b "
                     "CROSS JOIN generate_series(0, $1::int - 1) AS k",
                     1, five, 0);
    say("sum of amount + k: %lld streamed, %s by the server", s.sum, sum.v[0][0]);
    check(s.rows == 5 * n && s.out.tuples == 5 * n, "%ld rows streamed, as PQcmdTuples says",
          s.rows);
    check(s.sum == atoll(sum.v[0][0]), "the streamed sum equals the server's own sum");

    /* Stop early: on_rows says so; the rest is read and discarded, the connection stays. */
    streamer early = {.stop_after = 1000};
    rc = pgs_query_stream(c, "SELECT g FROM generate_series(1, 100000) AS g", 0, NULL, 0,
                          on_stream_rows, on_outcome, &early);
    if (rc != PGS_OK)
        refused_at_once("cannot start a streamed statement", rc);
    wait_for(&early.out.fired);
    rows one = query(c, "SELECT 1", 0, NULL, 1);
    say("SELECT of 100000 rows, on_rows returns 1 once 1000 came: %ld delivered, then done (%s)",
        early.rows, early.out.failed ? early.out.err.message : "no error");
    check(!early.out.failed && early.rows >= 1000 && early.rows < 100000 && !one.failed,
          "stopped early: the rest discarded, done fired, the connection still answers");

    /* An aborted COPY: the server discards every row of it. */
    static const char reason[] = "the demo changed its mind";
    loader *a = new_loader(n + 1, n + 1000, n, reason);
    run_loader(c, NULL, a);
    say("COPY FROM STDIN of 1000 more rows, then pgs_copy_end(copy, \"%s\"): %s (SQLSTATE %s)",
        reason, a->out.failed ? a->out.err.message : "no error",
        a->out.err.sqlstate[0] ? a->out.err.sqlstate : "-");
    check(a->rows == 1000 && a->out.failed && a->out.err.code == PGS_ECANCELED &&
              strcmp(a->out.err.sqlstate, "57014") == 0,
          "the aborted COPY reported %s (SQLSTATE 57014)", pgs_strerror(PGS_ECANCELED));
    long count = bulk_count(c);
    check(count == n, "none of its rows is there: the table holds %ld rows", count);

    /* Inside a transaction guard: the COPY's rows go with its rollback, stay with its commit. */
    ended rb = {0}, cm = {0};
    long copied_rb, copied_cm;
    long seen = copy_in_transaction(c, n + 1, n, 0, &rb, &copied_rb);
    count = bulk_count(c);
    say("in a transaction guard: COPY of 1000 rows (PQcmdTuples %ld), count(*) inside %ld, "
        "then the end rolls back: %s, count(*) after %ld",
        copied_rb, seen, outcome_name(rb.outcome), count);
    check(copied_rb == 1000 && seen == n + 1000 && rb.outcome == PGS_TX_ROLLED_BACK &&
              !rb.has_err && count == n,
          "the transaction saw its COPY's rows; they went with its rollback");
    seen = copy_in_transaction(c, n + 1, n, 1, &cm, &copied_cm);
    count = bulk_count(c);
    say("the same, then the end commits: %s, count(*) after %ld", outcome_name(cm.outcome),
        count);
    check(copied_cm == 1000 && seen == n + 1000 && cm.outcome == PGS_TX_COMMITTED && !cm.has_err &&
              count == n + 1000,
          "committed: the table holds %ld rows", count);

    /* Memory: what went through against what the process ever held. */
    long peak1 = peak_kib();
    double through = (double)(l->bytes + e.bytes + s.bytes) / MIB;
    const char *checker = memory_checker();
    if (peak0 < 0 || peak1 < 0) {
        say("peak memory: not known here (no /proc/self/status)");
    } else {
        say("peak memory (VmHWM) after: %.1f MiB (%+.1f MiB), while %.1f MiB went through",
            peak1 / 1024.0, (peak1 - peak0) / 1024.0, through);
        if (checker)
            say("peak memory not checked: under %s the peak says little about pgscope", checker);
        else
            check(peak1 - peak0 < 8 * 1024,
                  "peak memory stayed flat: %+.1f MiB (under 8 MiB) for %.1f MiB of data",
                  (peak1 - peak0) / 1024.0, through);
    }
    free(l);
    free(a);
    close_conn(c);
}

/* ---- command line ---- */

static const char *const usage_text =
    "usage: pgscope-demo [--conninfo CONNINFO] [SCENARIO] [options]\n"
    "\n"
    "Shows pgscope's guarantees against a PostgreSQL server, and what the server holds after.\n"
    "Connects to --conninfo, else to $PGSCOPE_DEMO_CONNINFO, else where libpq's environment\n"
    "(PGHOST, PGPORT, PGUSER, PGPASSWORD, ~/.pgpass, ...) points. A password in --conninfo is\n"
    "visible to every user of the machine (ps): give it in PGSCOPE_DEMO_CONNINFO, PGPASSWORD\n"
    "or ~/.pgpass instead. Connecting gives up after the conninfo's connect_timeout, else\n"
    "PGCONNECT_TIMEOUT's, else 10 s.\n"
    "\n"
    "scenarios:\n"
    "  tour       all of the below in order (the default)\n"
    "  commit     a transfer commits; balances before and after\n"
    "  rollback   an overdraft mid-way: nothing changes, the SQLSTATE is shown\n"
    "  savepoint  an inner guard fails and rolls back, the outer one commits\n"
    "  cancel     a long statement is cancelled: the backend is gone, nothing written\n"
    "  timeout    a statement over the transaction's time budget: same outcome\n"
    "  retry      two conflicting serializable transfers: one retried, both applied\n"
    "  transfer   many random transfers on a traced pool [--count N] [--concurrency C]\n"
    "  bulk       COPY in and out, a large SELECT streamed row by row, memory flat [--rows N]\n"
    "\n"
    "options:\n"
    "  --conninfo S     libpq connection string or URI\n"
    "  --count N        transfers for `transfer` (default 1000) and `tour` (default 500)\n"
    "  --concurrency C  pool size and transfers at once for `transfer` and `tour` (default 8;\n"
    "                   capped at the connections the server has free)\n"
    "  --rows N         rows `bulk` loads with COPY and exports (default 200000, and 100000 in\n"
    "                   `tour`); it streams 5 times as many\n"
    "  --check-args     check the arguments, then exit (0: valid, 2: not) without connecting\n"
    "  -h, --help       this text (also: pgscope-demo SCENARIO --help)\n"
    "\n"
    "Exit status: 0 when every check held, 1 when one did not, 2 on an error.\n";

static const char *const scenario_names[] = {"tour",   "commit",  "rollback", "savepoint", "cancel",
                                             "timeout", "retry",   "transfer", "bulk"};

/* A bad command line: what is wrong, the usage line and the scenarios, exit 2. */
static void bad_usage(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("pgscope-demo: ", stderr);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n%.*s", (int)(strchr(usage_text, '\n') - usage_text + 1), usage_text);
    fputs("scenarios:", stderr);
    for (size_t i = 0; i < sizeof scenario_names / sizeof scenario_names[0]; i++)
        fprintf(stderr, " %s", scenario_names[i]);
    fputs(" (see pgscope-demo --help)\n", stderr);
    exit(2);
}

/* An argument as an error message may quote it: not when it may hold a password (a conninfo or
 * URI given where a scenario or option belongs), and an option only up to its '='. */
static int may_hold_password(const char *arg)
{
    return strchr(arg, '=') || strstr(arg, "://") || strchr(arg, '@');
}

static const char *shown(const char *arg, char *buf, size_t len)
{
    if (arg[0] == '-') {
        snprintf(buf, len, "%.*s", (int)strcspn(arg, "="), arg);
        return buf;
    }
    return may_hold_password(arg) ? "***" : arg;
}

static void scenario_help(const char *name)
{
    printf("pgscope-demo %s: ", name);
    const char *p = strstr(usage_text, "scenarios:");
    char key[32];
    snprintf(key, sizeof key, "\n  %-10s ", name);
    const char *line = strstr(p, key);
    if (line) {
        const char *end = strchr(line + 1, '\n');
        printf("%.*s\n", (int)(end - line - 14), line + 14);
    }
    const char *opts = strcmp(name, "transfer") == 0 ? " [--count N] [--concurrency C]"
                       : strcmp(name, "bulk") == 0   ? " [--rows N]"
                       : strcmp(name, "tour") == 0   ? " [--count N] [--concurrency C] [--rows N]"
                                                     : "";
    printf("usage: pgscope-demo [--conninfo CONNINFO] %s%s\n", name, opts);
}

static int positive(const char *s, const char *what)
{
    char *end;
    long v = strtol(s, &end, 10);
    if (*s == '\0' || *end != '\0' || v <= 0 || v > 10000000)
        bad_usage("%s must be a number from 1 to 10000000, not \"%s\"", what, s);
    return (int)v;
}

/* The connect deadline for every guard: 0 (the library's rule: the conninfo's
 * connect_timeout) when the conninfo has one; else PGCONNECT_TIMEOUT's, as libpq reads it
 * (below 2 s counts as 2 s); else 10 s, which is enough for a local or nearby server. A
 * conninfo that does not parse gets 0 too: opening the guard says what is wrong with it. */
static int demo_connect_timeout(const char *ci)
{
    char *why = NULL;
    PQconninfoOption *opts = PQconninfoParse(ci, &why);
    PQfreemem(why); /* libpq's reason may quote the password: never shown from here */
    if (!opts)
        return 0;
    int has = 0;
    for (PQconninfoOption *o = opts; o->keyword; o++)
        if (strcmp(o->keyword, "connect_timeout") == 0 && o->val && o->val[0])
            has = 1;
    PQconninfoFree(opts);
    if (has)
        return 0;
    const char *env = getenv("PGCONNECT_TIMEOUT");
    int s = env ? atoi(env) : 0;
    if (s > 0)
        return (s < 2 ? 2 : s) * 1000;
    return 10000;
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {{"conninfo", required_argument, 0, 'c'},
                                             {"count", required_argument, 0, 'n'},
                                             {"concurrency", required_argument, 0, 'j'},
                                             {"rows", required_argument, 0, 'r'},
                                             {"check-args", no_argument, 0, 'k'},
                                             {"help", no_argument, 0, 'h'},
                                             {0, 0, 0, 0}};
    int count = 1000, concurrency = 8, bulk_rows = 200000, help = 0, check_only = 0;
    const char *count_opt = NULL, *concurrency_opt = NULL, *rows_opt = NULL, *conninfo_opt = NULL;
    char buf[64];
    opterr = 0; /* its messages name the program by its path: bad_usage says it instead */
    for (int ch; (ch = getopt_long(argc, argv, ":h", longopts, NULL)) != -1;) {
        switch (ch) {
        case 'c':
            conninfo_opt = optarg;
            break;
        case 'n':
            count = positive(optarg, "--count");
            count_opt = optarg;
            break;
        case 'j':
            concurrency = positive(optarg, "--concurrency");
            concurrency_opt = optarg;
            break;
        case 'r':
            bulk_rows = positive(optarg, "--rows");
            rows_opt = optarg;
            break;
        case 'k':
            check_only = 1;
            break;
        case 'h':
            help = 1;
            break;
        case ':':
            bad_usage("%s needs a value", shown(argv[optind - 1], buf, sizeof buf));
            break;
        default:
            if (optopt)
                bad_usage("unknown option \"-%c\"", optopt);
            bad_usage("unknown option \"%s\"", shown(argv[optind - 1], buf, sizeof buf));
        }
    }
    const char *scenario = optind < argc ? argv[optind] : "tour";
    if (optind + 1 < argc)
        bad_usage("unexpected argument \"%s\" (one scenario at a time)",
                  shown(argv[optind + 1], buf, sizeof buf));
    int known = 0;
    for (size_t i = 0; i < sizeof scenario_names / sizeof scenario_names[0]; i++)
        known |= strcmp(scenario, scenario_names[i]) == 0;
    if (!known && scenario[0] != '-' && may_hold_password(scenario))
        bad_usage("no scenario \"***\" (a connection string goes in --conninfo or "
                  "PGSCOPE_DEMO_CONNINFO)");
    if (!known)
        bad_usage("no scenario \"%s\"", shown(scenario, buf, sizeof buf));
    if (help) {
        if (optind < argc)
            scenario_help(scenario);
        else
            fputs(usage_text, stdout);
        return 0;
    }
    int all = strcmp(scenario, "tour") == 0;
    if (!all && strcmp(scenario, "transfer") != 0) {
        if (count_opt)
            bad_usage("--count applies to transfer and tour, not to %s", scenario);
        if (concurrency_opt)
            bad_usage("--concurrency applies to transfer and tour, not to %s", scenario);
    }
    if (!all && strcmp(scenario, "bulk") != 0 && rows_opt)
        bad_usage("--rows applies to bulk and tour, not to %s", scenario);
    if (check_only)
        return 0;
    /* The environment, not argv: what is on a command line every user can read (ps). */
    const char *env_conninfo = getenv("PGSCOPE_DEMO_CONNINFO");
    conninfo = conninfo_opt ? conninfo_opt : env_conninfo ? env_conninfo : "";
    connect_timeout_ms = demo_connect_timeout(conninfo);
    base = event_base_new();
    if (!base)
        fatal("cannot create an event loop", NULL);
    {
        pgs_conn *c = open_conn();
        PGconn *pg = pgs_conn_pgconn(c);
        printf("pgscope-demo: connected to %s:%s, database %s as %s (PostgreSQL %s)\n",
               PQhost(pg), PQport(pg), PQdb(pg), PQuser(pg), PQparameterStatus(pg, "server_version"));
        close_conn(c);
    }
    if (all || strcmp(scenario, "commit") == 0)
        scenario_commit();
    if (all || strcmp(scenario, "rollback") == 0)
        scenario_rollback();
    if (all || strcmp(scenario, "savepoint") == 0)
        scenario_savepoint();
    if (all || strcmp(scenario, "cancel") == 0)
        scenario_cancel();
    if (all || strcmp(scenario, "timeout") == 0)
        scenario_timeout();
    if (all || strcmp(scenario, "retry") == 0)
        scenario_retry();
    if (all || strcmp(scenario, "transfer") == 0)
        scenario_transfer(all && !count_opt ? 500 : count, concurrency);
    if (all || strcmp(scenario, "bulk") == 0)
        scenario_bulk(all && !rows_opt ? 100000 : bulk_rows);
    event_base_free(base);
    printf("\n%s\n", failures ? "SOME CHECKS FAILED" : "every check held");
    return failures ? 1 : 0;
}

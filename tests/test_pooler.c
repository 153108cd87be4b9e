/* The guards behind a real PgBouncer in transaction mode (tests/with-pgbouncer.sh): one server
 * connection shared by every client (default_pool_size = 1), so whatever one guard leaves on the
 * server session (a prepared statement) the next one meets, and a cancel request must reach
 * the server through the bouncer. The observer (th_scalar) talks to the server directly. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "helpers.h"

/* Tagged, so the observer finds this suite's server sessions among those of suites sharing
 * the server (PgBouncer passes application_name on to the server session). */
#define APP "pgscope_pooler_test"

static const char *bouncer_conninfo(void)
{
    static char buf[2048];
    const char *ci = getenv("PGSCOPE_TEST_BOUNCER_CONNINFO");
    if (!ci || !*ci)
        ck_abort_msg("PGSCOPE_TEST_BOUNCER_CONNINFO is not set: run this suite with meson test "
                     "(tests/with-pgbouncer.sh starts PgBouncer)");
    snprintf(buf, sizeof buf, "%s application_name=" APP, ci);
    return buf;
}

/* A command on PgBouncer's admin console (simple query protocol only). */
static void bouncer_admin(const char *cmd)
{
    char ci[2048];
    snprintf(ci, sizeof ci, "%s dbname=pgbouncer", getenv("PGSCOPE_TEST_BOUNCER_CONNINFO"));
    PGconn *pg = PQconnectdb(ci);
    ck_assert_msg(PQstatus(pg) == CONNECTION_OK, "admin console: %s", PQerrorMessage(pg));
    PGresult *r = PQexec(pg, cmd);
    ExecStatusType st = PQresultStatus(r);
    ck_assert_msg(st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK, "admin console: %s: %s", cmd,
                  PQresultErrorMessage(r));
    PQclear(r);
    PQfinish(pg);
}

/* The lines of PgBouncer's log that mention `word`, to stderr (on a failure). */
static void print_bouncer_log(const char *word)
{
    const char *path = getenv("PGSCOPE_TEST_BOUNCER_LOG");
    FILE *f = path ? fopen(path, "r") : NULL;
    if (!f)
        return;
    char line[1024];
    fprintf(stderr, "pooler: PgBouncer's log (%s), lines with \"%s\":\n", path, word);
    while (fgets(line, sizeof line, f))
        if (strstr(line, word))
            fprintf(stderr, "  %s", line);
    fclose(f);
}

/* A statement's record plus its command tag ("SELECT 1", "UPDATE 1"): tells which statement
 * the server really ran. */
typedef struct pcall {
    th_call k;
    char cmd[64];
} pcall;

static void record_cmd(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg)
{
    pcall *p = arg;
    th_record(c, res, err, &p->k);
    snprintf(p->cmd, sizeof p->cmd, "%s", res ? PQcmdStatus((PGresult *)res) : "");
}

/* ---- the statement cache behind a pooler ---- */

static const char *const W_SQL = "UPDATE pooler_bt SET v = v + 1000 WHERE id = $1 RETURNING v";
static const char *const R_SQL = "SELECT v FROM pooler_bt WHERE id = $1";
static const char *const ID[] = {"1"};

static long table_v(void)
{
    return th_scalar_long("SELECT v FROM pooler_bt WHERE id = 1", 0, NULL);
}

/* What went wrong, collected over all rounds (each round is printed), asserted at the end: the
 * first bad round does not hide what the later ones do. */
static char problems[4096];
static int nproblems;

__attribute__((format(printf, 1, 2))) static void problem(const char *fmt, ...)
{
    size_t len = strlen(problems);
    va_list ap;
    va_start(ap, fmt);
    if (len < sizeof problems - 1) {
        vsnprintf(problems + len, sizeof problems - len, fmt, ap);
        len = strlen(problems);
        if (len < sizeof problems - 1)
            snprintf(problems + len, sizeof problems - len, "\n");
    }
    va_end(ap);
    nproblems++;
}

/* An error is only acceptable as the cache's own, explained: the prepared statement is not on
 * this server session (26000), with a message that names the likely cause: a pooler in
 * transaction mode. Counted, so that the test can prove the check ran at all. */
static int nexplained;

static void check_explained_error(int round, const char *who, const pcall *p)
{
    if (p->k.code == PGS_ESQL && strcmp(p->k.sqlstate, "26000") == 0 &&
        strstr(p->k.message, "pooler") && strstr(p->k.message, "transaction mode"))
        nexplained++;
    if (p->k.code != PGS_ESQL)
        problem("round %d: %s: %s instead of PGS_ESQL: %s", round, who, pgs_strerror(p->k.code),
                p->k.message);
    else if (strcmp(p->k.sqlstate, "26000") != 0)
        problem("round %d: %s failed with SQLSTATE %s, not 26000 (prepared statement missing): %s",
                round, who, p->k.sqlstate, p->k.message);
    else if (!strstr(p->k.message, "pooler") || !strstr(p->k.message, "transaction mode"))
        problem("round %d: %s: the message does not name the likely cause (a pooler in "
                "transaction mode): %s",
                round, who, p->k.message);
}

static void print_call(const char *who, int round, const pcall *p, long before, long after)
{
    fprintf(stderr,
            "pooler: round %d %s: %s sqlstate=%s cmd=\"%s\" value=%s; table v %ld -> %ld%s%s\n",
            round, who, p->k.code ? pgs_strerror(p->k.code) : "ok", p->k.sqlstate, p->cmd,
            p->k.value, before, after, p->k.code ? "; " : "", p->k.code ? p->k.message : "");
}

/* R's outcome: an explained error, or a SELECT that saw one of the values the table held while
 * it ran (lo or hi) and changed nothing. */
static void check_r(int round, const pcall *r, long lo, long hi)
{
    if (r->k.code != PGS_OK) {
        check_explained_error(round, "R (the SELECT)", r);
        return;
    }
    long v = atol(r->k.value);
    if (strcmp(r->cmd, "SELECT 1") != 0)
        problem("round %d: R's SELECT ran another statement: command tag \"%s\", value %s (the "
                "server executed W's UPDATE under R's statement name)",
                round, r->cmd, r->k.value);
    else if (v != lo && v != hi)
        problem("round %d: R's SELECT returned %ld, the table held %ld%s%ld", round, v, lo,
                lo == hi ? "" : " or ", hi);
}

/* W's outcome: an explained error, or the UPDATE (never R's SELECT). Returns 1 when the server
 * reported the UPDATE's success. */
static int check_w(int round, const pcall *w)
{
    if (w->k.code != PGS_OK) {
        check_explained_error(round, "W (the UPDATE)", w);
        return 0;
    }
    if (strcmp(w->cmd, "UPDATE 1") != 0) {
        problem("round %d: W's UPDATE ran another statement: command tag \"%s\", value %s", round,
                w->cmd, w->k.value);
        return 0;
    }
    return 1;
}

/* This suite's server sessions (PgBouncer's server connections). */
static long app_sessions(void)
{
    return th_scalar_long("SELECT count(*) FROM pg_stat_activity WHERE application_name = '" APP
                          "'",
                          0, NULL);
}

static void run_one(struct event_base *b, pgs_conn *c, const char *sql, pcall *p)
{
    memset(p, 0, sizeof *p);
    ck_assert_int_eq(pgs_query(c, sql, 1, ID, record_cmd, p), PGS_OK);
    th_run_until(b, &p->k.fired, 15);
    ck_assert_int_eq(p->k.fired, 1);
}

START_TEST(test_cached_statements_of_two_guards_never_cross_behind_a_pooler)
{
    th_scalar("CREATE TABLE IF NOT EXISTS pooler_bt(id int primary key, v int)", 0, NULL);
    th_scalar("INSERT INTO pooler_bt VALUES (1, 0) ON CONFLICT (id) DO UPDATE SET v = 0", 0,
              NULL);
    ck_assert_int_eq(table_v(), 0);

    struct event_base *b = th_loop_begin();
    pgs_conn_opts o; /* the default statement cache */
    memset(&o, 0, sizeof o);
    pgs_conn *w = th_open_at(b, bouncer_conninfo(), &o);
    pgs_conn *r = th_open_at(b, bouncer_conninfo(), &o);
    int w_ok = 0, round = 0;
    pcall pw, pr;

    /* Sequential: W's UPDATE, then R's SELECT, each waiting for its result. Both guards' first
     * statements meet on the one server session. */
    for (int i = 0; i < 4; i++, round++) {
        long before = table_v();
        run_one(b, w, W_SQL, &pw);
        long mid = table_v();
        print_call("W", round, &pw, before, mid);
        int updated = check_w(round, &pw);
        w_ok += updated;
        if (updated && atol(pw.k.value) != mid)
            problem("round %d: W returned %s, the table holds %ld", round, pw.k.value, mid);
        run_one(b, r, R_SQL, &pr);
        long after = table_v();
        print_call("R", round, &pr, mid, after);
        check_r(round, &pr, mid, mid);
        if (after != mid)
            problem("round %d: R's SELECT changed the table: %ld -> %ld", round, mid, after);
    }

    /* Interleaved: both queued in the same loop turn; PgBouncer runs them one after the other
     * on the same server session, in either order. */
    for (int i = 0; i < 4; i++, round++) {
        long before = table_v();
        memset(&pw, 0, sizeof pw);
        memset(&pr, 0, sizeof pr);
        if (i % 2 == 0) {
            ck_assert_int_eq(pgs_query(w, W_SQL, 1, ID, record_cmd, &pw), PGS_OK);
            ck_assert_int_eq(pgs_query(r, R_SQL, 1, ID, record_cmd, &pr), PGS_OK);
        } else {
            ck_assert_int_eq(pgs_query(r, R_SQL, 1, ID, record_cmd, &pr), PGS_OK);
            ck_assert_int_eq(pgs_query(w, W_SQL, 1, ID, record_cmd, &pw), PGS_OK);
        }
        th_run_until(b, &pw.k.fired, 15);
        th_run_until(b, &pr.k.fired, 15);
        long after = table_v();
        print_call("W", round, &pw, before, after);
        print_call("R", round, &pr, before, after);
        int updated = check_w(round, &pw);
        w_ok += updated;
        if (after != before + 1000L * updated)
            problem("round %d: the table went %ld -> %ld, W's UPDATE reported success %d time(s)",
                    round, before, after, updated);
        check_r(round, &pr, before, after);
    }

    /* Sequential again, R first this time. */
    for (int i = 0; i < 2; i++, round++) {
        long before = table_v();
        run_one(b, r, R_SQL, &pr);
        long mid = table_v();
        print_call("R", round, &pr, before, mid);
        check_r(round, &pr, before, before);
        if (mid != before)
            problem("round %d: R's SELECT changed the table: %ld -> %ld", round, before, mid);
        run_one(b, w, W_SQL, &pw);
        long after = table_v();
        print_call("W", round, &pw, mid, after);
        w_ok += check_w(round, &pw);
    }

    /* The pooler replaces its server connection (server_lifetime, a switchover: here its
     * RECONNECT command): what each cache prepared is gone, on a session both share again. */
    ck_assert_int_eq(app_sessions(), 1);
    int old_pid = (int)th_scalar_long(
        "SELECT pid FROM pg_stat_activity WHERE application_name = '" APP "'", 0, NULL);
    bouncer_admin("RECONNECT");
    th_wait_backend_gone(old_pid, 5);
    fprintf(stderr, "pooler: PgBouncer replaced its server connection (backend %d gone)\n",
            old_pid);
    /* W is the busier one now: twice, then R, so that whatever W prepares anew on the new
     * session is there before R's statement comes back. */
    for (int i = 0; i < 3; i++, round++) {
        long before = table_v(), mid = before;
        for (int twice = 0; twice < 2; twice++) {
            run_one(b, w, W_SQL, &pw);
            long now = table_v();
            print_call("W", round, &pw, mid, now);
            int updated = check_w(round, &pw);
            w_ok += updated;
            if (now != mid + 1000L * updated)
                problem("round %d: the table went %ld -> %ld, W's UPDATE reported success %d "
                        "time(s)",
                        round, mid, now, updated);
            mid = now;
        }
        run_one(b, r, R_SQL, &pr);
        long after = table_v();
        print_call("R", round, &pr, mid, after);
        check_r(round, &pr, mid, mid);
        if (after != mid)
            problem("round %d: R's SELECT changed the table: %ld -> %ld", round, mid, after);
    }

    /* The premise: both guards ran on one server session, a new one. */
    ck_assert_int_eq(app_sessions(), 1);
    ck_assert_int_ne(th_scalar_long("SELECT pid FROM pg_stat_activity WHERE application_name = '" APP
                                    "'",
                                    0, NULL),
                     old_pid);
    long v = table_v();
    fprintf(stderr, "pooler: %d UPDATEs reported success; the table holds v = %ld\n", w_ok, v);
    if (v != 1000L * w_ok)
        problem("the table holds v = %ld, but W's UPDATE reported success %d time(s) (%ld): "
                "some other statement ran it",
                v, w_ok, 1000L * w_ok);
    ck_assert_msg(nproblems == 0, "%d problem(s):\n%s", nproblems, problems);
    /* After the RECONNECT, W's first statement ran by name on a session that never saw its
     * Parse: the explained 26000 did happen, and its message was checked above. */
    fprintf(stderr, "pooler: %d explained 26000 error(s)\n", nexplained);
    ck_assert_int_ge(nexplained, 1);
    th_close(b, w);
    th_close(b, r);
    th_loop_end(b);
}
END_TEST

/* ---- cancel and close behind a pooler ---- */

static const char *const SLEEP_SQL = "SELECT pg_sleep(30)";

/* The statement cache off: these tests are about cancel and close, and must not depend on
 * prepared statements an earlier test left on the shared server session. */
static const pgs_conn_opts no_cache = {.statement_cache = -1};

/* This suite's server sessions running SLEEP_SQL right now. */
static long sleeping_on_server(void)
{
    return th_scalar_long("SELECT count(*) FROM pg_stat_activity WHERE application_name = '" APP
                          "' AND query = 'SELECT pg_sleep(30)' AND state = 'active'",
                          0, NULL);
}

/* No pg_sleep of this suite left over on the server (from an earlier test that failed). */
static void end_stray_sleepers(void)
{
    free(th_scalar("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE "
                   "application_name = '" APP "' AND query LIKE 'SELECT pg_sleep%' "
                   "AND pid <> pg_backend_pid()",
                   0, NULL));
    double end = th_now() + 5;
    while (sleeping_on_server() > 0 && th_now() < end)
        usleep(20000);
    ck_assert_int_eq(sleeping_on_server(), 0);
}

/* Run the loop until the observer sees the statement running on the server. */
static void wait_until_sleeping(struct event_base *b, const th_call *k)
{
    double end = th_now() + 10;
    long n = 0;
    while (!k->fired && th_now() < end && (n = sleeping_on_server()) == 0) {
        event_base_loop(b, EVLOOP_NONBLOCK);
        usleep(20000);
    }
    ck_assert_msg(n == 1, "the statement never showed as active on the server (%ld; fired %d: %s)",
                  n, k->fired, k->message);
}

/* After the guard is gone, the server must not sleep on: within 3 s nothing of ours runs. */
static void assert_server_stopped(const char *how)
{
    double t0 = th_now(), end = t0 + 3;
    long n;
    while ((n = sleeping_on_server()) > 0 && th_now() < end)
        usleep(50000);
    if (n > 0) {
        fprintf(stderr, "pooler: after %s, SELECT pg_sleep(30) still runs on the server\n", how);
        print_bouncer_log("cancel");
    } else {
        fprintf(stderr, "pooler: after %s, the server stopped the statement within %.2f s\n",
                how, th_now() - t0);
    }
    ck_assert_msg(n == 0,
                  "after %s the server still runs SELECT pg_sleep(30) 3 s later: the cancel "
                  "request did not reach it through the pooler",
                  how);
}

START_TEST(test_cancel_reaches_the_server_before_the_close_behind_a_pooler)
{
    end_stray_sleepers();
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open_at(b, bouncer_conninfo(), &no_cache);
    th_call k = {0};
    ck_assert_int_eq(pgs_query(c, SLEEP_SQL, 0, NULL, th_record, &k), PGS_OK);
    wait_until_sleeping(b, &k);
    ck_assert_int_eq(k.fired, 0);
    ck_assert_int_eq(pgs_conn_cancel(c), PGS_OK);
    th_run_until(b, &k.fired, 10);
    fprintf(stderr, "pooler: the statement got %s (%s)\n", pgs_strerror(k.code), k.message);
    ck_assert_int_eq(k.fired, 1);
    ck_assert_int_eq(k.code, PGS_ECANCELED);
    th_close(b, c);
    ck_assert_int_eq(k.fired, 1);
    assert_server_stopped("pgs_conn_cancel + pgs_conn_close");
    th_loop_end(b);
}
END_TEST

START_TEST(test_close_stops_the_statement_behind_a_pooler)
{
    end_stray_sleepers();
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open_at(b, bouncer_conninfo(), &no_cache);
    th_call k = {0};
    ck_assert_int_eq(pgs_query(c, SLEEP_SQL, 0, NULL, th_record, &k), PGS_OK);
    wait_until_sleeping(b, &k);
    ck_assert_int_eq(k.fired, 0);
    int done = 0;
    ck_assert_int_eq(pgs_conn_close(c, th_count_done, &done), PGS_OK);
    th_run_until(b, &done, 10);
    fprintf(stderr, "pooler: the statement got %s (%s)\n", pgs_strerror(k.code), k.message);
    ck_assert_int_eq(done, 1);
    ck_assert_int_eq(k.fired, 1);
    ck_assert_int_eq(k.code, PGS_ECLOSED);
    assert_server_stopped("pgs_conn_close");
    th_loop_end(b);
}
END_TEST

/* ---- the recommended configuration: a pool with the statement cache off, no session reset ---- */

/* What the README recommends behind a pooler in transaction mode: no statement cache (its
 * prepared statements would live on whichever server session ran the Parse) and no session
 * reset (the next transaction may run on another server session anyway). */
static pgs_pool_opts recommended(int max_size)
{
    pgs_pool_opts o = {.max_size = max_size, .reset = PGS_RESET_NONE};
    o.conn.statement_cache = -1;
    return o;
}

static pgs_pool *pool_at(struct event_base *b, const char *conninfo, pgs_pool_opts o)
{
    pgs_pool *p = NULL;
    ck_assert_int_eq(pgs_pool_new(b, conninfo, &o, &p), PGS_OK);
    return p;
}

static void close_pool(struct event_base *b, pgs_pool *p)
{
    int done = 0;
    ck_assert_int_eq(pgs_pool_close(p, th_count_done, &done), PGS_OK);
    th_run_until(b, &done, 15);
    ck_assert_int_eq(done, 1);
}

typedef th_got got; /* (tests/helpers.h) */

static pgs_conn *acquire(struct event_base *b, pgs_pool *p)
{
    got g = {0};
    ck_assert_int_eq(pgs_pool_acquire(p, th_on_got, &g, NULL), PGS_OK);
    th_run_until(b, &g.fired, 15);
    ck_assert_msg(g.code == PGS_OK, "acquire failed: %s", g.message);
    return g.conn;
}

/* One pgs_pool_run_tx (or pgs_run_tx): the body's own argument and the end's record (they
 * give body and done the same argument). */
typedef struct pool_run {
    th_txdone d;
    pgs_tx_body body;
    void *arg;
} pool_run;

static void pool_run_body(pgs_tx *tx, void *arg)
{
    pool_run *r = arg;
    r->body(tx, r->arg);
}

static void pool_run_done(const pgs_tx_result *res, void *arg)
{
    th_record_tx(res, &((pool_run *)arg)->d);
}

static void start_run(pgs_pool *p, const pgs_tx_opts *o, pool_run *r, pgs_tx_body body,
                      void *arg)
{
    memset(r, 0, sizeof *r);
    r->body = body;
    r->arg = arg;
    ck_assert_int_eq(pgs_pool_run_tx(p, o, pool_run_body, pool_run_done, r), PGS_OK);
    ck_assert_int_eq(r->d.fired, 0);
}

static void run_and_wait(struct event_base *b, pgs_pool *p, const pgs_tx_opts *o, pool_run *r,
                         pgs_tx_body body, void *arg)
{
    start_run(p, o, r, body, arg);
    th_run_until(b, &r->d.fired, 15);
    ck_assert_int_eq(r->d.fired, 1);
}

/* A statement on a guard outside a transaction, waited for. */
static void query_and_wait(struct event_base *b, pgs_conn *c, const char *sql, th_call *k)
{
    memset(k, 0, sizeof *k);
    ck_assert_int_eq(pgs_query(c, sql, 0, NULL, th_record, k), PGS_OK);
    th_run_until(b, &k->fired, 10);
    ck_assert_int_eq(k->fired, 1);
}

/* PgBouncer's port (for a proxy in front of it). */
static int bouncer_port(void)
{
    PQconninfoOption *opts = PQconninfoParse(bouncer_conninfo(), NULL);
    ck_assert_ptr_nonnull(opts);
    int port = 0;
    for (PQconninfoOption *o = opts; o->keyword; o++)
        if (strcmp(o->keyword, "port") == 0 && o->val)
            port = atoi(o->val);
    PQconninfoFree(opts);
    ck_assert_int_gt(port, 0);
    return port;
}

/* This suite's server sessions inside a transaction right now. */
static long open_tx_on_server(void)
{
    return th_scalar_long("SELECT count(*) FROM pg_stat_activity WHERE application_name = '" APP
                          "' AND xact_start IS NOT NULL AND pid <> pg_backend_pid()",
                          0, NULL);
}

static void wait_no_open_tx(double seconds)
{
    double end = th_now() + seconds;
    long n;
    while ((n = open_tx_on_server()) > 0 && th_now() < end)
        usleep(20000);
    ck_assert_msg(n == 0, "%ld transaction(s) of this suite still open on the server", n);
}

/* 200 one-round-trip transactions (BEGIN; UPDATE; INSERT; COMMIT in one write), 8 in flight at
 * a time, on a pool of 4 guards, all through PgBouncer's one server connection. A proxy in
 * front of PgBouncer counts the round trips. */
enum { LOAD = 200, LOAD_IN_FLIGHT = 8 };

typedef struct load {
    int id;
    char id_text[16];
    th_call upd, ins;
    th_txdone d;
} load;

static load loads[LOAD];
static pgs_pool *load_pool;
static int load_started, load_finished, load_in_flight, load_max_in_flight, load_max_in_use;
static long load_max_sessions;

static void load_done(const pgs_tx_result *r, void *arg);

static void load_body(pgs_tx *tx, void *arg)
{
    load *l = arg;
    pgs_pool_counts st;
    pgs_pool_stats(load_pool, &st);
    if (st.in_use > load_max_in_use)
        load_max_in_use = st.in_use;
    const char *v[] = {l->id_text};
    ck_assert_int_eq(pgs_tx_query(tx, "UPDATE pooler_counter SET n = n + 1 WHERE id = 1 "
                                      "RETURNING n",
                                  0, NULL, th_record, &l->upd),
                     PGS_OK);
    ck_assert_int_eq(pgs_tx_query(tx, "INSERT INTO pooler_load (id, v) VALUES ($1::int, 'x') "
                                      "RETURNING id",
                                  1, v, th_record, &l->ins),
                     PGS_OK);
    ck_assert_int_eq(pgs_tx_end(tx, 1, NULL, NULL), PGS_OK);
}

static void load_start_next(void)
{
    if (load_started >= LOAD)
        return;
    load *l = &loads[load_started++];
    ck_assert_int_eq(pgs_pool_run_tx(load_pool, NULL, load_body, load_done, l), PGS_OK);
    if (++load_in_flight > load_max_in_flight)
        load_max_in_flight = load_in_flight;
}

static void load_done(const pgs_tx_result *r, void *arg)
{
    load *l = arg;
    th_record_tx(r, &l->d);
    load_in_flight--;
    if (++load_finished % 25 == 0) { /* what the server holds, now and then, mid-run */
        long n = app_sessions();
        if (n > load_max_sessions)
            load_max_sessions = n;
    }
    load_start_next();
}

START_TEST(test_pool_runs_one_round_trip_transactions_through_one_server_connection)
{
    th_fresh_table("pooler_load");
    free(th_scalar("DROP TABLE IF EXISTS pooler_counter", 0, NULL));
    free(th_scalar("CREATE TABLE pooler_counter (id int PRIMARY KEY, n int NOT NULL)", 0, NULL));
    free(th_scalar("INSERT INTO pooler_counter VALUES (1, 0)", 0, NULL));
    struct event_base *b = th_loop_begin();
    th_observer_keep(1);
    th_proxy *px = th_proxy_start(bouncer_port());
    char ci[2300];
    snprintf(ci, sizeof ci, "%s application_name=" APP, th_proxy_conninfo(px));
    load_pool = pool_at(b, ci, recommended(4));

    /* All four guards connected first: their startup and authentication are not what is
     * counted. Released at once (no reset is sent: PGS_RESET_NONE). */
    got g[4] = {{0}};
    for (int i = 0; i < 4; i++)
        ck_assert_int_eq(pgs_pool_acquire(load_pool, th_on_got, &g[i], NULL), PGS_OK);
    for (int i = 0; i < 4; i++) {
        th_run_until(b, &g[i].fired, 15);
        ck_assert_msg(g[i].code == PGS_OK, "acquire failed: %s", g[i].message);
    }
    for (int i = 0; i < 4; i++)
        th_close(b, g[i].conn);
    th_run_for(b, 0.1);
    th_proxy_reset_turns(px);

    memset(loads, 0, sizeof loads);
    load_started = load_finished = load_in_flight = load_max_in_flight = load_max_in_use = 0;
    load_max_sessions = 0;
    for (int i = 0; i < LOAD; i++) {
        loads[i].id = i + 1;
        snprintf(loads[i].id_text, sizeof loads[i].id_text, "%d", i + 1);
    }
    double t0 = th_now();
    for (int i = 0; i < LOAD_IN_FLIGHT; i++)
        load_start_next();
    double end = t0 + 30;
    while (load_finished < LOAD && th_now() < end)
        event_base_loop(b, EVLOOP_ONCE);
    double took = th_now() - t0;
    int turns = th_proxy_turns(px);
    fprintf(stderr,
            "pooler: %d transactions in %.2f s, %d in flight at most, %d guards in use at most, "
            "%ld server session(s), %d round trips\n",
            load_finished, took, load_max_in_flight, load_max_in_use, load_max_sessions, turns);
    ck_assert_int_eq(load_finished, LOAD);

    /* Every one committed, at its first attempt, each statement with its own result: the
     * counter values returned are exactly 1..LOAD, each once. */
    static char seen[LOAD + 1];
    memset(seen, 0, sizeof seen);
    for (int i = 0; i < LOAD; i++) {
        load *l = &loads[i];
        ck_assert_int_eq(l->d.fired, 1);
        ck_assert_msg(l->d.outcome == PGS_TX_COMMITTED && !l->d.has_err,
                      "transaction %d: outcome %d: %s", l->id, l->d.outcome, l->d.err.message);
        ck_assert_int_eq(l->d.attempts, 1);
        ck_assert_int_eq(l->upd.fired, 1);
        ck_assert_int_eq(l->ins.fired, 1);
        ck_assert_msg(l->upd.code == PGS_OK && l->ins.code == PGS_OK, "transaction %d: %s%s",
                      l->id, l->upd.message, l->ins.message);
        ck_assert_str_eq(l->ins.value, l->id_text);
        long n = atol(l->upd.value);
        ck_assert_msg(n >= 1 && n <= LOAD && !seen[n], "transaction %d: counter value %s", l->id,
                      l->upd.value);
        seen[n] = 1;
    }
    ck_assert_int_eq(load_max_in_flight, LOAD_IN_FLIGHT);
    ck_assert_int_le(load_max_in_use, 4);
    ck_assert_int_ge(load_max_in_use, 2); /* the guards did take turns on the one session */
    ck_assert_int_eq(load_max_sessions, 1);
    ck_assert_int_eq(app_sessions(), 1);
    /* One round trip each: BEGIN + UPDATE + INSERT + COMMIT + sync in one write. */
    ck_assert_int_eq(turns, LOAD);

    /* The server holds exactly what was committed. */
    ck_assert_int_eq(th_rows("pooler_load"), LOAD);
    ck_assert_int_eq(th_scalar_long("SELECT sum(id) FROM pooler_load", 0, NULL),
                     (long)LOAD * (LOAD + 1) / 2);
    ck_assert_int_eq(th_scalar_long("SELECT n FROM pooler_counter WHERE id = 1", 0, NULL), LOAD);
    pgs_pool_counts st;
    pgs_pool_stats(load_pool, &st);
    ck_assert_int_eq(st.in_use, 0);
    ck_assert_int_le(st.size, 4);
    ck_assert_int_eq(st.reset, 0); /* PGS_RESET_NONE */
    ck_assert_int_eq(st.replaced, 0);
    close_pool(b, load_pool);
    th_proxy_stop(px);
    th_observer_keep(0);
    th_loop_end(b);
}
END_TEST

/* ---- savepoints ---- */

typedef struct sp_calls {
    th_call k[4]; /* parent 1, child 2, child 1 (the duplicate), parent 3 */
    th_txdone inner;
} sp_calls;

static void insert_in(pgs_tx *tx, const char *id, th_call *k)
{
    const char *v[] = {id};
    ck_assert_int_eq(pgs_tx_query(tx, "INSERT INTO pooler_sp (id, v) VALUES ($1::int, 'x')", 1,
                                  v, th_record, k),
                     PGS_OK);
}

static void savepoint_body(pgs_tx *tx, void *arg)
{
    sp_calls *s = arg;
    pgs_tx *sp = NULL;
    insert_in(tx, "1", &s->k[0]);
    ck_assert_int_eq(pgs_tx_savepoint(tx, NULL, NULL, &sp), PGS_OK);
    insert_in(sp, "2", &s->k[1]);
    insert_in(sp, "1", &s->k[2]); /* 23505 inside the savepoint */
    ck_assert_int_eq(pgs_tx_end(sp, 1, th_record_tx, &s->inner), PGS_OK);
    insert_in(tx, "3", &s->k[3]); /* runs after the rollback to the savepoint */
    ck_assert_int_eq(pgs_tx_end(tx, 1, NULL, NULL), PGS_OK);
}

typedef struct plain_ins {
    const char *id;
    th_call k;
} plain_ins;

static void plain_insert_body(pgs_tx *tx, void *arg)
{
    plain_ins *pi = arg;
    insert_in(tx, pi->id, &pi->k);
    ck_assert_int_eq(pgs_tx_end(tx, 1, NULL, NULL), PGS_OK);
}

START_TEST(test_failed_savepoint_rolled_back_parent_commits_behind_a_pooler)
{
    th_fresh_table("pooler_sp");
    struct event_base *b = th_loop_begin();
    pgs_pool *p = pool_at(b, bouncer_conninfo(), recommended(4));
    /* The savepoint's transaction and three others at once: the others wait in PgBouncer for
     * the one server connection, also while the child's end waits for its own results in the
     * middle of the transaction. */
    sp_calls s = {0};
    pool_run r, pr[3];
    plain_ins pi[3] = {{.id = "10"}, {.id = "11"}, {.id = "12"}};
    start_run(p, NULL, &r, savepoint_body, &s);
    for (int i = 0; i < 3; i++)
        start_run(p, NULL, &pr[i], plain_insert_body, &pi[i]);
    th_run_until(b, &r.d.fired, 15);
    for (int i = 0; i < 3; i++)
        th_run_until(b, &pr[i].d.fired, 15);

    /* The child: rolled back to its savepoint, with the duplicate's SQLSTATE, before the
     * parent's end. */
    ck_assert_int_eq(s.inner.fired, 1);
    ck_assert_int_eq(s.inner.outcome, PGS_TX_ROLLED_BACK);
    ck_assert_int_eq(s.inner.has_err, 1);
    ck_assert_int_eq(s.inner.err.code, PGS_ESQL);
    ck_assert_str_eq(s.inner.err.sqlstate, "23505");
    ck_assert(s.inner.at <= r.d.at);
    for (int i = 0; i < 4; i++)
        ck_assert_int_eq(s.k[i].fired, 1);
    ck_assert_int_eq(s.k[0].code, PGS_OK);
    ck_assert_int_eq(s.k[1].code, PGS_OK); /* ran, then undone by the rollback to savepoint */
    ck_assert_int_eq(s.k[2].code, PGS_ESQL);
    ck_assert_str_eq(s.k[2].sqlstate, "23505");
    ck_assert_int_eq(s.k[3].code, PGS_OK);
    /* The parent committed, and so did the others. */
    ck_assert_msg(r.d.outcome == PGS_TX_COMMITTED && !r.d.has_err, "outcome %d: %s",
                  r.d.outcome, r.d.err.message);
    ck_assert_int_eq(r.d.attempts, 1);
    for (int i = 0; i < 3; i++) {
        ck_assert_msg(pr[i].d.outcome == PGS_TX_COMMITTED && !pr[i].d.has_err,
                      "insert %s: outcome %d: %s", pi[i].id, pr[i].d.outcome,
                      pr[i].d.err.message);
        ck_assert_int_eq(pi[i].k.code, PGS_OK);
    }
    /* The server holds the parent's rows and the others', not the child's. */
    ck_assert_int_eq(th_rows("pooler_sp"), 5);
    ck_assert_int_eq(th_scalar_long("SELECT count(*) FROM pooler_sp WHERE id = 2", 0, NULL), 0);
    ck_assert_int_eq(th_scalar_long("SELECT sum(id) FROM pooler_sp", 0, NULL),
                     1 + 3 + 10 + 11 + 12);
    wait_no_open_tx(3);
    close_pool(b, p);
    th_loop_end(b);
}
END_TEST

/* ---- retries ---- */

typedef struct retry_body_state {
    int runs;
    int fail_runs; /* the first this many runs fail with 40001 */
    th_call ins[8], conflict[8];
} retry_body_state;

/* Insert a row, then (on the first fail_runs runs) fail as a conflicting serializable
 * transaction would: the row of a failed run must go with its rollback. */
static void retry_body(pgs_tx *tx, void *arg)
{
    retry_body_state *s = arg;
    int n = s->runs++;
    ck_assert_int_lt(n, 8);
    ck_assert_int_eq(pgs_tx_query(tx, "INSERT INTO pooler_retry (x) VALUES (1)", 0, NULL,
                                  th_record, &s->ins[n]),
                     PGS_OK);
    if (n < s->fail_runs)
        ck_assert_int_eq(pgs_tx_query(tx, TH_SERIALIZATION_FAILURE, 0, NULL, th_record,
                                      &s->conflict[n]),
                         PGS_OK);
    ck_assert_int_eq(pgs_tx_end(tx, 1, NULL, NULL), PGS_OK);
}

START_TEST(test_serialization_failure_retried_behind_a_pooler)
{
    free(th_scalar("DROP TABLE IF EXISTS pooler_retry", 0, NULL));
    free(th_scalar("CREATE TABLE pooler_retry (x int)", 0, NULL)); /* no key: duplicates show */
    struct event_base *b = th_loop_begin();
    pgs_pool *p = pool_at(b, bouncer_conninfo(), recommended(4));
    pgs_tx_opts to = {.retries = 3};

    /* Fails once: the second attempt commits, the row is there once. */
    retry_body_state once = {.fail_runs = 1};
    pool_run r;
    run_and_wait(b, p, &to, &r, retry_body, &once);
    ck_assert_msg(r.d.outcome == PGS_TX_COMMITTED && !r.d.has_err, "outcome %d: %s",
                  r.d.outcome, r.d.err.message);
    ck_assert_int_eq(r.d.attempts, 2);
    ck_assert_int_eq(once.runs, 2);
    ck_assert_int_eq(once.conflict[0].fired, 1);
    ck_assert_int_eq(once.conflict[0].code, PGS_ESQL);
    ck_assert_str_eq(once.conflict[0].sqlstate, "40001");
    ck_assert_int_eq(once.ins[1].fired, 1);
    ck_assert_int_eq(once.ins[1].code, PGS_OK);
    ck_assert_int_eq(th_rows("pooler_retry"), 1);

    /* Fails every time: retries exhausted after 1 + 3 runs, rolled back with 40001, nothing
     * written. */
    retry_body_state always = {.fail_runs = 8};
    run_and_wait(b, p, &to, &r, retry_body, &always);
    ck_assert_int_eq(r.d.outcome, PGS_TX_ROLLED_BACK);
    ck_assert_int_eq(r.d.has_err, 1);
    ck_assert_int_eq(r.d.err.code, PGS_ESQL);
    ck_assert_str_eq(r.d.err.sqlstate, "40001");
    ck_assert_int_eq(r.d.attempts, 4);
    ck_assert_int_eq(always.runs, 4);
    ck_assert_int_eq(th_rows("pooler_retry"), 1);
    wait_no_open_tx(3);
    close_pool(b, p);
    th_loop_end(b);
}
END_TEST

/* ---- a transaction guard cancelled mid-statement ---- */

static void insert_3_body(pgs_tx *tx, void *arg)
{
    ck_assert_int_eq(pgs_tx_query(tx, "INSERT INTO pooler_txcancel (id, v) VALUES (3, 'x')", 0,
                                  NULL, th_record, arg),
                     PGS_OK);
    ck_assert_int_eq(pgs_tx_end(tx, 1, NULL, NULL), PGS_OK);
}

START_TEST(test_transaction_cancelled_mid_statement_behind_a_pooler)
{
    end_stray_sleepers();
    th_fresh_table("pooler_txcancel");
    struct event_base *b = th_loop_begin();
    pgs_pool *p = pool_at(b, bouncer_conninfo(), recommended(4));
    pgs_conn *c = acquire(b, p);
    pgs_tx *tx = NULL;
    th_call ins = {0}, sl = {0}, after_sl = {0};
    th_txdone d = {0};
    ck_assert_int_eq(pgs_tx_begin(c, NULL, NULL, NULL, &tx), PGS_OK);
    ck_assert_int_eq(pgs_tx_query(tx, "INSERT INTO pooler_txcancel (id, v) VALUES (1, 'x')", 0,
                                  NULL, th_record, &ins),
                     PGS_OK);
    ck_assert_int_eq(pgs_tx_query(tx, SLEEP_SQL, 0, NULL, th_record, &sl), PGS_OK);
    ck_assert_int_eq(pgs_tx_query(tx, "INSERT INTO pooler_txcancel (id, v) VALUES (2, 'x')", 0,
                                  NULL, th_record, &after_sl),
                     PGS_OK);
    wait_until_sleeping(b, &sl);
    ck_assert_int_eq(open_tx_on_server(), 1);
    ck_assert_int_eq(sl.fired + after_sl.fired, 0);
    double t0 = th_now();
    ck_assert_int_eq(pgs_tx_cancel(tx), PGS_OK);
    ck_assert_int_eq(pgs_tx_cancel(tx), PGS_EMISUSE);
    ck_assert_int_eq(pgs_tx_end(tx, 1, th_record_tx, &d), PGS_OK);
    ck_assert_int_eq(d.fired, 0);
    th_run_until(b, &d.fired, 10);
    fprintf(stderr, "pooler: the transaction's statement got %s after %.3f s (%s); its end %s\n",
            pgs_strerror(sl.code), sl.at - t0, sl.message, d.has_err ? d.err.message : "ok");
    /* Every statement's callback fired once, the cancelled ones with PGS_ECANCELED. */
    ck_assert_int_eq(ins.fired, 1);
    ck_assert_msg(ins.code == PGS_OK || ins.code == PGS_ECANCELED, "the first insert got %s",
                  pgs_strerror(ins.code));
    ck_assert_int_eq(sl.fired, 1);
    ck_assert_int_eq(sl.code, PGS_ECANCELED);
    ck_assert_msg(sl.at - t0 < 1.0, "the cancel took %.3f s", sl.at - t0);
    ck_assert_int_eq(after_sl.fired, 1);
    ck_assert_int_eq(after_sl.code, PGS_ECANCELED);
    /* The end: rolled back, with the cancel's code. */
    ck_assert_int_eq(d.outcome, PGS_TX_ROLLED_BACK);
    ck_assert_int_eq(d.has_err, 1);
    ck_assert_int_eq(d.err.code, PGS_ECANCELED);
    /* The server stopped the statement, the transaction is gone, nothing of it is there. */
    assert_server_stopped("pgs_tx_cancel");
    wait_no_open_tx(3);
    ck_assert_int_eq(th_rows("pooler_txcancel"), 0);
    /* The guard goes back (the pool drops it: it was cancelled); the pool goes on. */
    th_close(b, c);
    th_call k3 = {0};
    pool_run r;
    run_and_wait(b, p, NULL, &r, insert_3_body, &k3);
    ck_assert_msg(r.d.outcome == PGS_TX_COMMITTED && !r.d.has_err, "outcome %d: %s",
                  r.d.outcome, r.d.err.message);
    ck_assert_int_eq(k3.code, PGS_OK);
    ck_assert_int_eq(th_rows("pooler_txcancel"), 1);
    ck_assert_int_eq(th_scalar_long("SELECT id FROM pooler_txcancel", 0, NULL), 3);
    close_pool(b, p);
    th_loop_end(b);
}
END_TEST

/* ---- session state ---- */

/* A value work_mem surely does not have by default. */
#define LOCAL_WORK_MEM "7777kB"
#define SESSION_WORK_MEM "6666kB"

typedef struct set_local {
    int fail; /* end with an error: the rollback must drop the setting too */
    th_call set, show, boom;
} set_local;

static void set_local_body(pgs_tx *tx, void *arg)
{
    set_local *s = arg;
    ck_assert_int_eq(pgs_tx_query(tx, "SET LOCAL work_mem = '" LOCAL_WORK_MEM "'", 0, NULL,
                                  th_record, &s->set),
                     PGS_OK);
    ck_assert_int_eq(pgs_tx_query(tx, "SHOW work_mem", 0, NULL, th_record, &s->show), PGS_OK);
    if (s->fail)
        ck_assert_int_eq(pgs_tx_query(tx, "SELECT 1 / 0", 0, NULL, th_record, &s->boom),
                         PGS_OK);
    ck_assert_int_eq(pgs_tx_end(tx, 1, NULL, NULL), PGS_OK);
}

static void show_body(pgs_tx *tx, void *arg)
{
    ck_assert_int_eq(pgs_tx_query(tx, "SHOW work_mem", 0, NULL, th_record, arg), PGS_OK);
    ck_assert_int_eq(pgs_tx_end(tx, 1, NULL, NULL), PGS_OK);
}

START_TEST(test_set_local_does_not_outlive_its_transaction_behind_a_pooler)
{
    char *dflt = th_scalar("SHOW work_mem", 0, NULL); /* the server's default, directly */
    ck_assert_ptr_nonnull(dflt);
    ck_assert_str_ne(dflt, LOCAL_WORK_MEM);
    ck_assert_str_ne(dflt, SESSION_WORK_MEM);
    struct event_base *b = th_loop_begin();
    pgs_pool *p = pool_at(b, bouncer_conninfo(), recommended(4));
    pool_run r;

    /* SET LOCAL holds inside its transaction, committed or rolled back. */
    set_local ok = {0}, failed = {.fail = 1};
    run_and_wait(b, p, NULL, &r, set_local_body, &ok);
    ck_assert_msg(r.d.outcome == PGS_TX_COMMITTED && !r.d.has_err, "outcome %d: %s",
                  r.d.outcome, r.d.err.message);
    ck_assert_int_eq(ok.set.code, PGS_OK);
    ck_assert_str_eq(ok.show.value, LOCAL_WORK_MEM);
    run_and_wait(b, p, NULL, &r, set_local_body, &failed);
    ck_assert_int_eq(r.d.outcome, PGS_TX_ROLLED_BACK);
    ck_assert_str_eq(r.d.err.sqlstate, "22012");
    ck_assert_str_eq(failed.show.value, LOCAL_WORK_MEM);

    /* Afterwards every guard of the pool (four at once, so four client connections on the
     * one server session) sees the default, in a transaction and outside one. */
    got g[4] = {{0}};
    for (int i = 0; i < 4; i++)
        ck_assert_int_eq(pgs_pool_acquire(p, th_on_got, &g[i], NULL), PGS_OK);
    for (int i = 0; i < 4; i++) {
        th_run_until(b, &g[i].fired, 15);
        ck_assert_msg(g[i].code == PGS_OK, "acquire failed: %s", g[i].message);
    }
    for (int i = 0; i < 4; i++) {
        th_call k;
        query_and_wait(b, g[i].conn, "SHOW work_mem", &k);
        ck_assert_int_eq(k.code, PGS_OK);
        ck_assert_str_eq(k.value, dflt);
        th_call kt = {0};
        pool_run rt = {.body = show_body, .arg = &kt};
        ck_assert_int_eq(pgs_run_tx(g[i].conn, NULL, pool_run_body, pool_run_done, &rt), PGS_OK);
        th_run_until(b, &rt.d.fired, 10);
        ck_assert_msg(rt.d.outcome == PGS_TX_COMMITTED && !rt.d.has_err, "outcome %d: %s",
                      rt.d.outcome, rt.d.err.message);
        ck_assert_int_eq(kt.code, PGS_OK);
        ck_assert_str_eq(kt.value, dflt);
    }

    /* What transaction mode does not protect, and why the README says SET LOCAL: a plain SET
     * stays on the server session, so another client connection (here another guard) meets it,
     * whatever reset its pool was given. */
    th_call k;
    query_and_wait(b, g[0].conn, "SET work_mem = '" SESSION_WORK_MEM "'", &k);
    ck_assert_int_eq(k.code, PGS_OK);
    query_and_wait(b, g[1].conn, "SHOW work_mem", &k);
    ck_assert_str_eq(k.value, SESSION_WORK_MEM);
    query_and_wait(b, g[1].conn, "RESET work_mem", &k);
    ck_assert_int_eq(k.code, PGS_OK);
    query_and_wait(b, g[0].conn, "SHOW work_mem", &k);
    ck_assert_str_eq(k.value, dflt);
    for (int i = 0; i < 4; i++)
        th_close(b, g[i].conn);
    free(dflt);
    close_pool(b, p);
    th_loop_end(b);
}
END_TEST

static Suite *pooler_suite(void)
{
    Suite *s = suite_create("pooler");
    TCase *t = tcase_create("pooler");
    tcase_set_timeout(t, 40);
    tcase_add_test(t, test_cached_statements_of_two_guards_never_cross_behind_a_pooler);
    tcase_add_test(t, test_cancel_reaches_the_server_before_the_close_behind_a_pooler);
    tcase_add_test(t, test_close_stops_the_statement_behind_a_pooler);
    tcase_add_test(t, test_pool_runs_one_round_trip_transactions_through_one_server_connection);
    tcase_add_test(t, test_failed_savepoint_rolled_back_parent_commits_behind_a_pooler);
    tcase_add_test(t, test_serialization_failure_retried_behind_a_pooler);
    tcase_add_test(t, test_transaction_cancelled_mid_statement_behind_a_pooler);
    tcase_add_test(t, test_set_local_does_not_outlive_its_transaction_behind_a_pooler);
    suite_add_tcase(s, t);
    return s;
}

int main(void)
{
    return th_run_suite(pooler_suite());
}

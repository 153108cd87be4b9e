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
 * this server session (26000), with a message that names the likely cause. */
static void check_explained_error(int round, const char *who, const pcall *p)
{
    if (p->k.code != PGS_ESQL)
        problem("round %d: %s: %s instead of PGS_ESQL: %s", round, who, pgs_strerror(p->k.code),
                p->k.message);
    else if (strcmp(p->k.sqlstate, "26000") != 0)
        problem("round %d: %s failed with SQLSTATE %s, not 26000 (prepared statement missing): %s",
                round, who, p->k.sqlstate, p->k.message);
    else if (!strstr(p->k.message, "pooler"))
        problem("round %d: %s: the message does not name the likely cause (a pooler): %s", round,
                who, p->k.message);
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

static Suite *pooler_suite(void)
{
    Suite *s = suite_create("pooler");
    TCase *t = tcase_create("pooler");
    tcase_set_timeout(t, 40);
    tcase_add_test(t, test_cached_statements_of_two_guards_never_cross_behind_a_pooler);
    tcase_add_test(t, test_cancel_reaches_the_server_before_the_close_behind_a_pooler);
    tcase_add_test(t, test_close_stops_the_statement_behind_a_pooler);
    suite_add_tcase(s, t);
    return s;
}

int main(void)
{
    return th_run_suite(pooler_suite());
}

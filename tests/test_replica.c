/* The guards against a real primary and a hot standby streaming from it (meson's 'replica' test
 * starts both with tests/with-standby.sh, that is tools/pgtmp.sh run --standby): a row committed
 * on the primary shows on the standby; every target_session_attrs value of libpq 15 over a host
 * list (by address and by a name the library looks up) lands on the right server; a write on
 * the standby fails with 25006; after the standby is promoted (and its old primary stopped),
 * read-write lands on it. The last test changes the pair for good, so it runs last. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "helpers.h"

/* ---- the pair's fixtures ---- */

static const char *env_of(const char *name)
{
    const char *v = getenv(name);
    ck_assert_msg(v && *v,
                  "%s is not set: the replica suite needs a primary and a standby (meson test "
                  "replica, or tests/with-standby.sh)",
                  name);
    return v;
}

static int primary_port(void)
{
    return atoi(th_conninfo_value("port"));
}

static int standby_port(void)
{
    return atoi(env_of("PGSCOPE_STANDBY_PORT"));
}

/* The standby's conninfo: the primary's (user, password, database) at the standby's port. */
static const char *standby_conninfo(void)
{
    char extra[64];
    snprintf(extra, sizeof extra, "host=127.0.0.1 port=%d", standby_port());
    return th_conninfo(extra);
}

/* tools/pgtmp.sh with ARGS (promote, pgctl ...), which finds the pair through the environment
 * (PGSCOPE_TMPDIR, PGSCOPE_PGDATA, PGSCOPE_STANDBY_PGDATA) this process inherited. */
static void pgtmp(const char *args)
{
    const char *tool = env_of("PGSCOPE_PGTMP");
    env_of("PGSCOPE_TMPDIR");
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "'%s' %s >/dev/null 2>&1", tool, args);
    ck_assert_msg(system(cmd) == 0, "pgtmp.sh %s failed", args);
}

/* ---- helpers ---- */

/* One statement on a guard, run to its callback. */
static th_call *run(struct event_base *b, pgs_conn *c, const char *sql, th_call *k)
{
    memset(k, 0, sizeof *k);
    ck_assert_int_eq(pgs_query(c, sql, 0, NULL, th_record, k), PGS_OK);
    th_run_until(b, &k->fired, 10);
    ck_assert_int_eq(k->fired, 1);
    return k;
}

/* Run `sql` on guard c (the standby) until its first column reads `want`, for at most `seconds`
 * (the table may not have arrived yet: errors count as not yet). Returns how long it took. */
static double poll_until(struct event_base *b, pgs_conn *c, const char *sql, const char *want,
                         double seconds)
{
    double t0 = th_now();
    th_call k;
    for (;;) {
        run(b, c, sql, &k);
        if (k.code == PGS_OK && k.ntuples > 0 && strcmp(k.value, want) == 0)
            return th_now() - t0;
        ck_assert_msg(k.code == PGS_OK || strcmp(k.sqlstate, "42P01") == 0,
                      "%s on the standby: %s", sql, k.message);
        ck_assert_msg(th_now() - t0 < seconds, "%s did not read '%s' on the standby within %.0f s",
                      sql, want, seconds);
        th_run_for(b, 0.02);
    }
}

/* Where a conninfo landed: the port PQport names and what pg_is_in_recovery() says there, or
 * the connect's error. */
typedef struct landing {
    int ok;
    pgs_error err;
    int port;
    char recovery[256];
} landing;

static landing land(struct event_base *b, const char *conninfo)
{
    landing l = {0};
    th_open_rec r = {0};
    pgs_conn *c = NULL;
    ck_assert_int_eq(pgs_conn_open(b, conninfo, NULL, th_on_open, &r, &c), PGS_OK);
    th_run_until(b, &r.fired, 20);
    ck_assert_int_eq(r.fired, 1);
    l.ok = r.ok;
    if (r.ok) {
        PGconn *pg = pgs_conn_pgconn(c);
        ck_assert_ptr_nonnull(pg);
        l.port = atoi(PQport(pg));
        th_call k;
        run(b, c, "SELECT pg_is_in_recovery()", &k);
        ck_assert_msg(k.code == PGS_OK, "pg_is_in_recovery(): %s", k.message);
        snprintf(l.recovery, sizeof l.recovery, "%s", k.value);
    } else {
        l.err = r.err;
    }
    th_close(b, c); /* after a failed open too: exited exactly once on every path */
    return l;
}

/* Connect to `hosts` (a comma-separated list) at `ports` with target_session_attrs=`tsa`. */
static landing land_at(struct event_base *b, const char *hosts, const char *ports,
                       const char *tsa)
{
    char extra[256];
    snprintf(extra, sizeof extra, "host=%s port=%s target_session_attrs=%s", hosts, ports, tsa);
    return land(b, th_conninfo(extra));
}

/* land_at lands at want_port, where pg_is_in_recovery() says want_recovery ("t" or "f"). The
 * messages name hosts, ports and tsa only, never the conninfo (it holds the password). */
static void expect_at(struct event_base *b, const char *hosts, const char *ports, const char *tsa,
                      int want_port, const char *want_recovery)
{
    landing l = land_at(b, hosts, ports, tsa);
    ck_assert_msg(l.ok, "host=%s port=%s target_session_attrs=%s: connect failed: %s", hosts,
                  ports, tsa, l.err.message);
    ck_assert_msg(l.port == want_port && strcmp(l.recovery, want_recovery) == 0,
                  "host=%s port=%s target_session_attrs=%s: landed on port %d (in recovery: %s), "
                  "expected port %d (in recovery: %s) [primary %d, standby %d]",
                  hosts, ports, tsa, l.port, l.recovery, want_port, want_recovery, primary_port(),
                  standby_port());
}

/* land_at finds no server of the kind asked for: PGS_ECONNECT, with libpq's reason. */
static void expect_refused(struct event_base *b, const char *hosts, const char *ports,
                           const char *tsa, const char *why)
{
    landing l = land_at(b, hosts, ports, tsa);
    ck_assert_msg(!l.ok,
                  "host=%s port=%s target_session_attrs=%s: connected to port %d, expected no "
                  "server to qualify",
                  hosts, ports, tsa, l.port);
    ck_assert_msg(l.err.code == PGS_ECONNECT && strstr(l.err.message, why),
                  "host=%s port=%s target_session_attrs=%s: expected PGS_ECONNECT (%s), got %s: %s",
                  hosts, ports, tsa, why, pgs_strerror(l.err.code), l.err.message);
}

/* Every target_session_attrs value of libpq 15 over `list` (two hosts, both of which reach
 * the pair), in both orders, and each host alone. */
static void check_every_attr(struct event_base *b, const char *list, const char *one)
{
    int p = primary_port(), s = standby_port();
    char ps[32], sp[32], po[16], so[16];
    snprintf(ps, sizeof ps, "%d,%d", p, s);
    snprintf(sp, sizeof sp, "%d,%d", s, p);
    snprintf(po, sizeof po, "%d", p);
    snprintf(so, sizeof so, "%d", s);
    static const struct {
        const char *tsa;
        int to; /* 'p' the primary, 's' the standby, '1' the first listed */
    } cases[] = {
        {"any", '1'},     {"read-write", 'p'}, {"primary", 'p'},
        {"read-only", 's'}, {"standby", 's'},  {"prefer-standby", 's'},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *tsa = cases[i].tsa;
        int kind = cases[i].to == 's' ? s : p;
        int want_ps = cases[i].to == '1' ? p : kind; /* primary listed first */
        int want_sp = cases[i].to == '1' ? s : kind; /* standby listed first */
        expect_at(b, list, ps, tsa, want_ps, want_ps == s ? "t" : "f");
        expect_at(b, list, sp, tsa, want_sp, want_sp == s ? "t" : "f");
    }
    /* one server listed: prefer-standby takes the primary when there is no standby; the
     * strict ones refuse the wrong kind */
    expect_at(b, one, po, "prefer-standby", p, "f");
    expect_at(b, one, so, "prefer-standby", s, "t");
    expect_at(b, one, so, "any", s, "t");
    expect_refused(b, one, po, "read-only", "session is not read-only");
    expect_refused(b, one, po, "standby", "server is not in hot standby mode");
    expect_refused(b, one, so, "read-write", "session is read-only");
    expect_refused(b, one, so, "primary", "server is in hot standby mode");
}

/* ---- replication ---- */

START_TEST(test_row_committed_on_the_primary_shows_on_the_standby)
{
    struct event_base *b = th_loop_begin();
    pgs_conn *p = th_open(b, NULL);
    pgs_conn *s = th_open_at(b, standby_conninfo(), NULL);
    th_call k;
    ck_assert_str_eq(run(b, p, "SELECT pg_is_in_recovery()", &k)->value, "f");
    ck_assert_str_eq(run(b, s, "SELECT pg_is_in_recovery()", &k)->value, "t");
    ck_assert_int_eq(atoi(PQport(pgs_conn_pgconn(s))), standby_port());

    th_call made[3] = {0};
    ck_assert_int_eq(pgs_query(p, "DROP TABLE IF EXISTS pgs_replica_rows", 0, NULL, th_record,
                               &made[0]),
                     PGS_OK);
    ck_assert_int_eq(pgs_query(p, "CREATE TABLE pgs_replica_rows (id int PRIMARY KEY, v text)", 0,
                               NULL, th_record, &made[1]),
                     PGS_OK);
    const char *v[] = {"from the primary"};
    ck_assert_int_eq(pgs_query(p, "INSERT INTO pgs_replica_rows VALUES (1, $1)", 1, v, th_record,
                               &made[2]),
                     PGS_OK);
    th_run_until(b, &made[2].fired, 10);
    for (int i = 0; i < 3; i++)
        ck_assert_msg(made[i].code == PGS_OK, "statement %d on the primary: %s", i,
                      made[i].message);
    double lag = poll_until(b, s, "SELECT v FROM pgs_replica_rows WHERE id = 1",
                            "from the primary", 10);
    /* a change to the row follows it too (the statement is cached on the standby by now) */
    run(b, p, "UPDATE pgs_replica_rows SET v = 'updated' WHERE id = 1", &k);
    ck_assert_msg(k.code == PGS_OK, "update: %s", k.message);
    double lag2 = poll_until(b, s, "SELECT v FROM pgs_replica_rows WHERE id = 1", "updated", 10);
    printf("replica: a new table's row on the standby after %.3f s, an update after %.3f s\n", lag,
           lag2);
    th_close(b, s);
    th_close(b, p);
    th_loop_end(b);
}
END_TEST

/* ---- target_session_attrs over a host list ---- */

START_TEST(test_every_target_session_attrs_lands_on_the_right_server)
{
    struct event_base *b = th_loop_begin();
    check_every_attr(b, "127.0.0.1,127.0.0.1", "127.0.0.1");
    th_loop_end(b);
}
END_TEST

START_TEST(test_host_names_are_looked_up_for_every_attr)
{
    struct event_base *b = th_loop_begin();
    /* names the library looks up itself (evdns), then hands libpq as host + hostaddr */
    check_every_attr(b, "localhost,localhost", "localhost");
    th_loop_end(b);
}
END_TEST

/* Names and addresses mixed in one list, in either order: the library passes libpq one
 * hostaddr entry per host, empty for an address (or a socket dir) it did not look up. */
START_TEST(test_names_and_addresses_mixed_in_one_list)
{
    struct event_base *b = th_loop_begin();
    int p = primary_port(), s = standby_port();
    char ps[32], sp[32];
    snprintf(ps, sizeof ps, "%d,%d", p, s);
    snprintf(sp, sizeof sp, "%d,%d", s, p);
    expect_at(b, "localhost,127.0.0.1", ps, "standby", s, "t");
    expect_at(b, "localhost,127.0.0.1", sp, "read-write", p, "f");
    expect_at(b, "127.0.0.1,localhost", ps, "standby", s, "t");
    expect_at(b, "127.0.0.1,localhost", sp, "read-write", p, "f");
    th_loop_end(b);
}
END_TEST

/* ---- writes on the standby ---- */

/* pgs_run_tx's body and done share one argument. */
typedef struct tx_write {
    th_call insert;
    th_txdone end;
} tx_write;

static void write_body(pgs_tx *tx, void *arg)
{
    tx_write *w = arg;
    ck_assert_int_eq(pgs_tx_query(tx, "INSERT INTO pgs_replica_w VALUES (2)", 0, NULL, th_record,
                                  &w->insert),
                     PGS_OK);
    ck_assert_int_eq(pgs_tx_end(tx, 1, NULL, NULL), PGS_OK);
}

static void write_done(const pgs_tx_result *r, void *arg)
{
    th_record_tx(r, &((tx_write *)arg)->end);
}

START_TEST(test_write_on_the_standby_fails_with_25006)
{
    struct event_base *b = th_loop_begin();
    /* the table exists on the standby once the primary's CREATE arrived */
    pgs_conn *p = th_open(b, NULL);
    th_call k;
    run(b, p, "DROP TABLE IF EXISTS pgs_replica_w", &k);
    run(b, p, "CREATE TABLE pgs_replica_w (x int)", &k);
    ck_assert_msg(k.code == PGS_OK, "create: %s", k.message);
    run(b, p, "INSERT INTO pgs_replica_w VALUES (1)", &k);
    ck_assert_msg(k.code == PGS_OK, "insert: %s", k.message);
    th_close(b, p);

    /* reached through the host list, as an application would */
    char extra[128];
    snprintf(extra, sizeof extra,
             "host=127.0.0.1,127.0.0.1 port=%d,%d target_session_attrs=standby", primary_port(),
             standby_port());
    pgs_conn *s = th_open_at(b, th_conninfo(extra), NULL);
    ck_assert_int_eq(atoi(PQport(pgs_conn_pgconn(s))), standby_port());
    poll_until(b, s, "SELECT count(*) FROM pgs_replica_w", "1", 10);

    run(b, s, "INSERT INTO pgs_replica_w VALUES (2)", &k);
    ck_assert_int_eq(k.code, PGS_ESQL);
    ck_assert_str_eq(k.sqlstate, "25006"); /* read_only_sql_transaction */
    run(b, s, "CREATE TABLE pgs_replica_never (x int)", &k);
    ck_assert_int_eq(k.code, PGS_ESQL);
    ck_assert_str_eq(k.sqlstate, "25006");
    /* the guard stays usable, and the session idle */
    ck_assert_str_eq(run(b, s, "SELECT count(*) FROM pgs_replica_w", &k)->value, "1");
    ck_assert_int_eq(pgs_conn_txstatus(s), PQTRANS_IDLE);

    /* inside a transaction guard: the write aborts it, the end rolls back with 25006 */
    tx_write w = {0};
    ck_assert_int_eq(pgs_run_tx(s, NULL, write_body, write_done, &w), PGS_OK);
    th_run_until(b, &w.end.fired, 10);
    ck_assert_int_eq(w.end.fired, 1);
    ck_assert_int_eq(w.insert.fired, 1);
    ck_assert_str_eq(w.insert.sqlstate, "25006");
    ck_assert_int_eq(w.end.outcome, PGS_TX_ROLLED_BACK);
    ck_assert_int_eq(w.end.has_err, 1);
    ck_assert_int_eq(w.end.err.code, PGS_ESQL);
    ck_assert_str_eq(w.end.err.sqlstate, "25006");
    ck_assert_int_eq(w.end.attempts, 1);
    ck_assert_int_eq(pgs_conn_txstatus(s), PQTRANS_IDLE);
    ck_assert_str_eq(run(b, s, "SELECT count(*) FROM pgs_replica_w", &k)->value, "1");
    th_close(b, s);
    th_loop_end(b);
}
END_TEST

/* ---- failover ---- */

START_TEST(test_after_promotion_read_write_lands_on_the_former_standby)
{
    struct event_base *b = th_loop_begin();
    int p = primary_port(), s = standby_port();
    char ps[32], sp[32];
    snprintf(ps, sizeof ps, "%d,%d", p, s);
    snprintf(sp, sizeof sp, "%d,%d", s, p);
    const char *list = "127.0.0.1,127.0.0.1";
    /* before: read-write passes over the standby listed first */
    expect_at(b, list, sp, "read-write", p, "f");

    /* a session on the standby that lives through the promotion */
    pgs_conn *old = th_open_at(b, standby_conninfo(), NULL);
    th_call k;
    ck_assert_str_eq(run(b, old, "SELECT pg_is_in_recovery()", &k)->value, "t");
    ck_assert_str_eq(PQparameterStatus(pgs_conn_pgconn(old), "in_hot_standby"), "on");

    pgtmp("promote");

    /* both take writes now: read-write takes the first listed */
    expect_at(b, list, sp, "read-write", s, "f");
    expect_at(b, list, ps, "read-write", p, "f");
    expect_refused(b, list, sp, "standby", "server is not in hot standby mode");
    /* the session from before: out of recovery, the server told it so, and it may write */
    ck_assert_str_eq(run(b, old, "SELECT pg_is_in_recovery()", &k)->value, "f");
    ck_assert_str_eq(PQparameterStatus(pgs_conn_pgconn(old), "in_hot_standby"), "off");
    run(b, old, "CREATE TABLE pgs_replica_after (x int)", &k);
    ck_assert_msg(k.code == PGS_OK, "a write after the promotion: %s", k.message);

    /* the failover completed: the old primary goes away, and a list that names it first
     * lands on the former standby for every attr that accepts a primary */
    pgtmp("pgctl stop -m fast -w");
    expect_at(b, list, ps, "read-write", s, "f");
    expect_at(b, list, ps, "primary", s, "f");
    expect_at(b, list, ps, "any", s, "f");
    expect_at(b, list, ps, "prefer-standby", s, "f");
    expect_refused(b, list, ps, "read-only", "session is not read-only");
    expect_at(b, "localhost,localhost", ps, "read-write", s, "f");
    th_close(b, old);
    th_loop_end(b);
}
END_TEST

static Suite *replica_suite(void)
{
    Suite *s = suite_create("replica");
    TCase *t = tcase_create("replica");
    tcase_set_timeout(t, 60);
    tcase_add_test(t, test_row_committed_on_the_primary_shows_on_the_standby);
    tcase_add_test(t, test_every_target_session_attrs_lands_on_the_right_server);
    tcase_add_test(t, test_host_names_are_looked_up_for_every_attr);
    tcase_add_test(t, test_names_and_addresses_mixed_in_one_list);
    tcase_add_test(t, test_write_on_the_standby_fails_with_25006);
    /* last: it promotes the standby and stops the primary */
    tcase_add_test(t, test_after_promotion_read_write_lands_on_the_former_standby);
    suite_add_tcase(s, t);
    return s;
}

int main(void)
{
    return th_run_suite(replica_suite());
}

/* Transaction guards against the real server: commit, rollback, options, savepoints, cancel,
 * timeouts, unknown commits and their resolution, retries, and round trips on the wire. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "helpers.h"

typedef th_txdone txdone; /* (helpers.h) */

static int insert(pgs_tx *tx, const char *table, const char *id, th_call *k)
{
    char sql[128];
    snprintf(sql, sizeof sql, "INSERT INTO %s (id, v) VALUES ($1::int, 'x')", table);
    const char *v[] = {id};
    return pgs_tx_query(tx, sql, 1, v, th_record, k);
}

/* ---- commit and rollback ---- */

static long seen_in_callback = -1;

static void count_from_outside(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg)
{
    th_record(c, res, err, arg);
    seen_in_callback = th_rows("tx_commit"); /* a second connection, before COMMIT */
}

START_TEST(test_commit_visible_after_done_not_before)
{
    th_fresh_table("tx_commit");
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    pgs_tx *tx;
    th_call k1 = {0}, k2 = {0};
    txdone d = {0};
    pgs_tx_opts resolvable = {.resolvable = 1};
    ck_assert_int_eq(pgs_tx_begin(c, &resolvable, NULL, NULL, &tx), PGS_OK);
    ck_assert_int_eq(insert(tx, "tx_commit", "1", &k1), PGS_OK);
    const char *v[] = {"2"};
    ck_assert_int_eq(pgs_tx_query(tx, "INSERT INTO tx_commit (id, v) VALUES ($1::int, 'y')", 1,
                                  v, count_from_outside, &k2),
                     PGS_OK);
    th_run_until(b, &k2.fired, 10);
    ck_assert_int_eq(seen_in_callback, 0);
    ck_assert_int_eq(pgs_tx_end(tx, 1, th_record_tx, &d), PGS_OK);
    ck_assert_int_eq(d.fired, 0);
    th_run_until(b, &d.fired, 10);
    ck_assert_int_eq(d.outcome, PGS_TX_COMMITTED);
    ck_assert_int_eq(d.has_err, 0);
    ck_assert_str_ne(d.xid, ""); /* it wrote, so it had an id */
    ck_assert_int_eq(th_rows("tx_commit"), 2);
    ck_assert_int_eq(k1.fired, 1);
    ck_assert_int_eq(k2.fired, 1);
    /* the connection is free again */
    th_call after = {0};
    ck_assert_int_eq(pgs_query(c, "SELECT 1", 0, NULL, th_record, &after), PGS_OK);
    th_run_until(b, &after.fired, 5);
    th_close(b, c);
    th_loop_end(b);
    ck_assert_int_eq(d.fired, 1);
}
END_TEST

START_TEST(test_unique_violation_rolls_back_everything)
{
    th_fresh_table("tx_dup");
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    pgs_tx *tx;
    th_call k[4] = {0};
    txdone d = {0};
    ck_assert_int_eq(pgs_tx_begin(c, NULL, NULL, NULL, &tx), PGS_OK);
    ck_assert_int_eq(insert(tx, "tx_dup", "1", &k[0]), PGS_OK);
    ck_assert_int_eq(insert(tx, "tx_dup", "2", &k[1]), PGS_OK);
    ck_assert_int_eq(insert(tx, "tx_dup", "1", &k[2]), PGS_OK); /* 23505 */
    ck_assert_int_eq(insert(tx, "tx_dup", "3", &k[3]), PGS_OK); /* after the failure */
    ck_assert_int_eq(pgs_tx_end(tx, 1, th_record_tx, &d), PGS_OK);  /* asks to commit: cannot */
    th_run_until(b, &d.fired, 10);
    ck_assert_int_eq(d.outcome, PGS_TX_ROLLED_BACK);
    ck_assert_int_eq(d.has_err, 1);
    ck_assert_int_eq(d.err.code, PGS_ESQL);
    ck_assert_str_eq(d.err.sqlstate, "23505");
    ck_assert_int_eq(k[0].code, PGS_OK);
    ck_assert_str_eq(k[2].sqlstate, "23505");
    ck_assert_int_eq(k[3].code, PGS_ESQL); /* got the error that aborted it, not a success */
    ck_assert_str_eq(k[3].sqlstate, "23505");
    ck_assert_int_eq(th_rows("tx_dup"), 0);
    for (int i = 0; i < 4; i++)
        ck_assert_int_eq(k[i].fired, 1);
    ck_assert_int_eq(PQtransactionStatus(pgs_conn_pgconn(c)), PQTRANS_IDLE);
    th_close(b, c);
    th_loop_end(b);
    ck_assert_int_eq(d.fired, 1);
}
END_TEST

START_TEST(test_ok_zero_rolls_back)
{
    th_fresh_table("tx_ok0");
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    pgs_tx *tx;
    th_call k = {0};
    txdone d = {0};
    ck_assert_int_eq(pgs_tx_begin(c, NULL, NULL, NULL, &tx), PGS_OK);
    ck_assert_int_eq(insert(tx, "tx_ok0", "1", &k), PGS_OK);
    ck_assert_int_eq(pgs_tx_end(tx, 0, th_record_tx, &d), PGS_OK);
    ck_assert_int_eq(pgs_tx_end(tx, 1, th_record_tx, &d), PGS_EMISUSE); /* ending twice */
    th_run_until(b, &d.fired, 10);
    ck_assert_int_eq(d.outcome, PGS_TX_ROLLED_BACK);
    ck_assert_int_eq(d.has_err, 0);
    ck_assert_int_eq(k.code, PGS_OK);
    ck_assert_int_eq(th_rows("tx_ok0"), 0);
    th_close(b, c);
    th_loop_end(b);
    ck_assert_int_eq(d.fired, 1);
}
END_TEST

START_TEST(test_options_reach_the_server)
{
    th_fresh_table("tx_ro");
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    pgs_tx *tx;
    pgs_tx_opts o = {.isolation = PGS_ISO_SERIALIZABLE, .read_only = 1, .deferrable = 1};
    th_call iso = {0}, ro = {0}, df = {0}, w = {0};
    txdone d = {0};
    ck_assert_int_eq(pgs_tx_begin(c, &o, NULL, NULL, &tx), PGS_OK);
    ck_assert_int_eq(pgs_tx_query(tx, "SHOW transaction_isolation", 0, NULL, th_record, &iso),
                     PGS_OK);
    ck_assert_int_eq(pgs_tx_query(tx, "SHOW transaction_read_only", 0, NULL, th_record, &ro),
                     PGS_OK);
    ck_assert_int_eq(pgs_tx_query(tx, "SHOW transaction_deferrable", 0, NULL, th_record, &df),
                     PGS_OK);
    ck_assert_int_eq(insert(tx, "tx_ro", "1", &w), PGS_OK);
    ck_assert_int_eq(pgs_tx_end(tx, 1, th_record_tx, &d), PGS_OK);
    th_run_until(b, &d.fired, 10);
    ck_assert_str_eq(iso.value, "serializable");
    ck_assert_str_eq(ro.value, "on");
    ck_assert_str_eq(df.value, "on");
    ck_assert_str_eq(w.sqlstate, "25006"); /* read_only_sql_transaction */
    ck_assert_str_eq(d.err.sqlstate, "25006");
    ck_assert_int_eq(th_rows("tx_ro"), 0);
    /* and the default isolation is the server's */
    pgs_tx_opts rr = {.isolation = PGS_ISO_REPEATABLE_READ};
    txdone d2 = {0};
    th_call iso2 = {0};
    ck_assert_int_eq(pgs_tx_begin(c, &rr, NULL, NULL, &tx), PGS_OK);
    ck_assert_int_eq(pgs_tx_query(tx, "SHOW transaction_isolation", 0, NULL, th_record, &iso2),
                     PGS_OK);
    ck_assert_int_eq(pgs_tx_end(tx, 1, th_record_tx, &d2), PGS_OK);
    th_run_until(b, &d2.fired, 10);
    ck_assert_str_eq(iso2.value, "repeatable read");
    ck_assert_int_eq(d2.outcome, PGS_TX_COMMITTED);
    ck_assert_str_eq(d2.xid, ""); /* it wrote nothing: no id */
    th_close(b, c);
    th_loop_end(b);
}
END_TEST

/* ---- misuse ---- */

START_TEST(test_misuse_is_reported_not_crashed)
{
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    pgs_tx *tx = NULL, *other = NULL;
    pgs_tx_opts bad = {.isolation = 42};
    ck_assert_int_eq(pgs_tx_begin(NULL, NULL, NULL, NULL, &tx), PGS_EINVAL);
    ck_assert_int_eq(pgs_tx_begin(c, &bad, NULL, NULL, &tx), PGS_EINVAL);
    ck_assert_int_eq(pgs_tx_end(NULL, 1, NULL, NULL), PGS_EINVAL);
    ck_assert_int_eq(pgs_tx_cancel(NULL), PGS_EINVAL);
    /* a transaction the caller began by hand is not the guard's to commit */
    th_call raw = {0}, rb = {0};
    ck_assert_int_eq(pgs_query(c, "BEGIN", 0, NULL, th_record, &raw), PGS_OK);
    ck_assert_int_eq(pgs_tx_begin(c, NULL, NULL, NULL, &tx), PGS_EMISUSE); /* in flight */
    th_run_until(b, &raw.fired, 5);
    ck_assert_int_eq(pgs_tx_begin(c, NULL, NULL, NULL, &tx), PGS_EMISUSE); /* inside BEGIN */
    ck_assert_int_eq(pgs_query(c, "ROLLBACK", 0, NULL, th_record, &rb), PGS_OK);
    th_run_until(b, &rb.fired, 5);
    /* one guard at a time, and it owns the session */
    txdone d = {0};
    th_call q = {0};
    ck_assert_int_eq(pgs_tx_begin(c, NULL, NULL, NULL, &tx), PGS_OK);
    ck_assert_int_eq(pgs_tx_begin(c, NULL, NULL, NULL, &other), PGS_EMISUSE);
    ck_assert_int_eq(pgs_query(c, "SELECT 1", 0, NULL, th_record, &q), PGS_EMISUSE);
    ck_assert_int_eq(pgs_tx_query(tx, NULL, 0, NULL, th_record, &q), PGS_EINVAL);
    ck_assert_int_eq(pgs_tx_end(tx, 1, th_record_tx, &d), PGS_OK);
    ck_assert_int_eq(pgs_tx_query(tx, "SELECT 1", 0, NULL, th_record, &q), PGS_EMISUSE);
    ck_assert_int_eq(pgs_tx_savepoint(tx, NULL, NULL, &other), PGS_EMISUSE);
    th_run_until(b, &d.fired, 5);
    ck_assert_int_eq(d.outcome, PGS_TX_COMMITTED);
    ck_assert_int_eq(q.fired, 0);
    th_close(b, c);
    th_loop_end(b);
}
END_TEST

/* ---- savepoints ---- */

START_TEST(test_savepoint_error_rolled_back_outer_commits)
{
    th_fresh_table("tx_sp");
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    pgs_tx *tx, *sp;
    th_call k[5] = {0};
    txdone outer = {0}, inner = {0};
    ck_assert_int_eq(pgs_tx_begin(c, NULL, NULL, NULL, &tx), PGS_OK);
    ck_assert_int_eq(insert(tx, "tx_sp", "1", &k[0]), PGS_OK);
    ck_assert_int_eq(pgs_tx_savepoint(tx, NULL, NULL, &sp), PGS_OK);
    ck_assert_int_eq(insert(tx, "tx_sp", "9", &k[4]), PGS_EMISUSE); /* LIFO: the child first */
    ck_assert_int_eq(insert(sp, "tx_sp", "2", &k[1]), PGS_OK);
    ck_assert_int_eq(insert(sp, "tx_sp", "1", &k[2]), PGS_OK); /* 23505 inside the savepoint */
    ck_assert_int_eq(pgs_tx_end(sp, 1, th_record_tx, &inner), PGS_OK);
    ck_assert_int_eq(insert(tx, "tx_sp", "3", &k[3]), PGS_OK); /* runs after the rollback-to */
    ck_assert_int_eq(pgs_tx_end(tx, 1, th_record_tx, &outer), PGS_OK);
    th_run_until(b, &outer.fired, 10);
    ck_assert_int_eq(inner.fired, 1);
    ck_assert_int_eq(inner.outcome, PGS_TX_ROLLED_BACK);
    ck_assert_str_eq(inner.err.sqlstate, "23505");
    ck_assert(inner.at <= outer.at);
    ck_assert_int_eq(outer.outcome, PGS_TX_COMMITTED);
    ck_assert_int_eq(outer.has_err, 0);
    ck_assert_int_eq(k[3].code, PGS_OK);
    ck_assert_int_eq(th_rows("tx_sp"), 2); /* ids 1 and 3 */
    ck_assert_int_eq(th_scalar_long("SELECT sum(id) FROM tx_sp", 0, NULL), 4);
    th_close(b, c);
    th_loop_end(b);
}
END_TEST

START_TEST(test_three_levels_deep)
{
    th_fresh_table("tx_deep");
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    pgs_tx *t1, *t2, *t3;
    th_call k[4] = {0};
    txdone d1 = {0}, d2 = {0}, d3 = {0};
    ck_assert_int_eq(pgs_tx_begin(c, NULL, NULL, NULL, &t1), PGS_OK);
    ck_assert_int_eq(insert(t1, "tx_deep", "1", &k[0]), PGS_OK);
    ck_assert_int_eq(pgs_tx_savepoint(t1, NULL, NULL, &t2), PGS_OK);
    ck_assert_int_eq(insert(t2, "tx_deep", "2", &k[1]), PGS_OK);
    ck_assert_int_eq(pgs_tx_savepoint(t2, NULL, NULL, &t3), PGS_OK);
    ck_assert_int_eq(insert(t3, "tx_deep", "3", &k[2]), PGS_OK);
    ck_assert_int_eq(pgs_tx_end(t3, 0, th_record_tx, &d3), PGS_OK); /* level 3 rolled back */
    ck_assert_int_eq(insert(t2, "tx_deep", "4", &k[3]), PGS_OK);
    ck_assert_int_eq(pgs_tx_end(t2, 1, th_record_tx, &d2), PGS_OK); /* level 2 released */
    ck_assert_int_eq(pgs_tx_end(t1, 1, th_record_tx, &d1), PGS_OK);
    th_run_until(b, &d1.fired, 10);
    ck_assert_int_eq(d3.outcome, PGS_TX_ROLLED_BACK);
    ck_assert_int_eq(d3.has_err, 0);
    ck_assert_int_eq(d2.outcome, PGS_TX_COMMITTED);
    ck_assert_int_eq(d1.outcome, PGS_TX_COMMITTED);
    ck_assert_int_eq(th_scalar_long("SELECT sum(id) FROM tx_deep", 0, NULL), 1 + 2 + 4);
    for (int i = 0; i < 4; i++)
        ck_assert_int_eq(k[i].fired, 1);
    th_close(b, c);
    th_loop_end(b);
    ck_assert_int_eq(d1.fired + d2.fired + d3.fired, 3);
}
END_TEST

START_TEST(test_parent_ended_with_open_child_rolls_back_both)
{
    th_fresh_table("tx_lifo");
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    pgs_tx *tx, *sp;
    th_call k[2] = {0};
    txdone d = {0};
    ck_assert_int_eq(pgs_tx_begin(c, NULL, NULL, NULL, &tx), PGS_OK);
    ck_assert_int_eq(insert(tx, "tx_lifo", "1", &k[0]), PGS_OK);
    ck_assert_int_eq(pgs_tx_savepoint(tx, NULL, NULL, &sp), PGS_OK);
    ck_assert_int_eq(insert(sp, "tx_lifo", "2", &k[1]), PGS_OK);
    ck_assert_int_eq(pgs_tx_end(tx, 1, th_record_tx, &d), PGS_OK); /* child still open */
    th_run_until(b, &d.fired, 10);
    ck_assert_int_eq(d.err.code, PGS_EMISUSE);
    ck_assert_int_eq(d.outcome, PGS_TX_ROLLED_BACK);
    ck_assert_int_eq(th_rows("tx_lifo"), 0); /* misuse never commits */
    ck_assert_int_eq(k[0].fired + k[1].fired, 2);
    ck_assert_int_eq(PQtransactionStatus(pgs_conn_pgconn(c)), PQTRANS_IDLE);
    th_close(b, c);
    th_loop_end(b);
}
END_TEST

/* ---- cancel and timeouts ---- */

typedef struct tx_canceller {
    pgs_tx *tx;
    int rc, rc_again;
    double at;
} tx_canceller;

static void cancel_tx_from_timer(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    tx_canceller *k = arg;
    k->at = th_now();
    k->rc = pgs_tx_cancel(k->tx);
    k->rc_again = pgs_tx_cancel(k->tx);
}

static void after(struct event_base *b, double seconds, event_callback_fn fn, void *arg,
                  struct event **ev)
{
    *ev = evtimer_new(b, fn, arg);
    struct timeval tv = {(long)seconds, (long)((seconds - (long)seconds) * 1e6)};
    evtimer_add(*ev, &tv);
}

START_TEST(test_cancel_mid_statement)
{
    th_fresh_table("tx_cancel");
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    int pid = th_backend_pid(c);
    pgs_tx *tx, *sp;
    th_call ins = {0}, sleep = {0}, child = {0};
    txdone d = {0}, dc = {0};
    ck_assert_int_eq(pgs_tx_begin(c, NULL, NULL, NULL, &tx), PGS_OK);
    ck_assert_int_eq(insert(tx, "tx_cancel", "1", &ins), PGS_OK);
    ck_assert_int_eq(pgs_tx_savepoint(tx, NULL, NULL, &sp), PGS_OK);
    ck_assert_int_eq(pgs_tx_query(sp, "SELECT pg_sleep(30)", 0, NULL, th_record, &sleep),
                     PGS_OK);
    ck_assert_int_eq(insert(sp, "tx_cancel", "2", &child), PGS_OK);
    tx_canceller cn = {.tx = sp}; /* cancelling a child cancels the whole connection */
    struct event *t;
    after(b, 0.3, cancel_tx_from_timer, &cn, &t);
    th_run_until(b, &child.fired, 10);
    event_free(t);
    ck_assert_int_eq(cn.rc, PGS_OK);
    ck_assert_int_eq(cn.rc_again, PGS_EMISUSE);
    ck_assert_int_eq(sleep.code, PGS_ECANCELED);
    ck_assert_int_eq(child.code, PGS_ECANCELED);
    ck_assert_msg(sleep.at - cn.at < 1.0, "cancel took %.3f s", sleep.at - cn.at);
    ck_assert_int_eq(pgs_tx_end(sp, 1, th_record_tx, &dc), PGS_OK);
    ck_assert_int_eq(pgs_tx_end(tx, 1, th_record_tx, &d), PGS_OK);
    th_run_until(b, &d.fired, 5);
    ck_assert_int_eq(dc.err.code, PGS_ECANCELED);
    ck_assert_int_eq(d.err.code, PGS_ECANCELED);
    ck_assert_int_eq(d.outcome, PGS_TX_ROLLED_BACK);
    th_wait_backend_gone(pid, 5);
    ck_assert_int_eq(th_rows("tx_cancel"), 0);
    th_close(b, c);
    th_loop_end(b);
    ck_assert_int_eq(ins.fired + sleep.fired + child.fired + d.fired + dc.fired, 5);
}
END_TEST

START_TEST(test_cancel_while_begin_in_flight)
{
    th_fresh_table("tx_cancel_begin");
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    int pid = th_backend_pid(c);
    pgs_tx *tx;
    th_call k = {0};
    txdone d = {0};
    ck_assert_int_eq(pgs_tx_begin(c, NULL, NULL, NULL, &tx), PGS_OK);
    ck_assert_int_eq(insert(tx, "tx_cancel_begin", "1", &k), PGS_OK);
    ck_assert_int_eq(pgs_tx_cancel(tx), PGS_OK); /* BEGIN is queued, not answered */
    ck_assert_int_eq(pgs_tx_end(tx, 1, th_record_tx, &d), PGS_OK);
    ck_assert_int_eq(k.fired + d.fired, 0);
    th_run_until(b, &d.fired, 10);
    ck_assert_int_eq(k.code, PGS_ECANCELED);
    ck_assert_int_eq(d.err.code, PGS_ECANCELED);
    ck_assert_int_eq(d.outcome, PGS_TX_ROLLED_BACK);
    th_wait_backend_gone(pid, 5);
    ck_assert_int_eq(th_rows("tx_cancel_begin"), 0);
    ck_assert_int_eq(pgs_tx_begin(c, NULL, NULL, NULL, &tx), PGS_EMISUSE); /* connection gone */
    th_close(b, c);
    th_loop_end(b);
}
END_TEST

/* A table whose COMMIT takes a while: a deferred constraint trigger sleeps at commit time. */
static void slow_commit_table(const char *name, const char *seconds)
{
    th_fresh_table(name);
    char sql[512];
    snprintf(sql, sizeof sql,
             "CREATE OR REPLACE FUNCTION pgs_slow_commit() RETURNS trigger LANGUAGE plpgsql AS "
             "$$ BEGIN PERFORM pg_sleep(%s); RETURN NULL; END $$",
             seconds);
    free(th_scalar(sql, 0, NULL));
    snprintf(sql, sizeof sql,
             "CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON %s DEFERRABLE INITIALLY DEFERRED "
             "FOR EACH ROW EXECUTE FUNCTION pgs_slow_commit()",
             name);
    free(th_scalar(sql, 0, NULL));
}

START_TEST(test_cancel_while_commit_in_flight_waits_for_the_reply)
{
    slow_commit_table("tx_cancel_commit", "0.5");
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    pgs_tx *tx;
    th_call k = {0};
    txdone d = {0};
    ck_assert_int_eq(pgs_tx_begin(c, NULL, NULL, NULL, &tx), PGS_OK);
    ck_assert_int_eq(insert(tx, "tx_cancel_commit", "1", &k), PGS_OK);
    th_run_until(b, &k.fired, 10); /* everything before COMMIT answered */
    ck_assert_int_eq(pgs_tx_end(tx, 1, th_record_tx, &d), PGS_OK);
    tx_canceller cn = {.tx = tx};
    struct event *t;
    after(b, 0.2, cancel_tx_from_timer, &cn, &t); /* COMMIT is running on the server */
    th_run_until(b, &d.fired, 10);
    event_free(t);
    ck_assert_int_eq(cn.rc, PGS_OK);
    /* COMMIT is never cancelled: it finished within the grace, and says so truthfully */
    ck_assert_int_eq(d.outcome, PGS_TX_COMMITTED);
    ck_assert_int_eq(th_rows("tx_cancel_commit"), 1);
    th_close(b, c);

    /* The same with the INSERT still unanswered when the cancel comes (all of it went in one
     * write): the cancel request is for the INSERT, and may reach COMMIT's pre-commit work
     * instead. Whatever the server did, the end must say the same. */
    free(th_scalar("DELETE FROM tx_cancel_commit", 0, NULL));
    c = th_open(b, NULL);
    th_call k2 = {0};
    txdone d2 = {0};
    ck_assert_int_eq(pgs_tx_begin(c, NULL, NULL, NULL, &tx), PGS_OK);
    ck_assert_int_eq(insert(tx, "tx_cancel_commit", "2", &k2), PGS_OK);
    ck_assert_int_eq(pgs_tx_end(tx, 1, th_record_tx, &d2), PGS_OK);
    tx_canceller cn2 = {.tx = tx};
    after(b, 0.2, cancel_tx_from_timer, &cn2, &t);
    th_run_until(b, &d2.fired, 10);
    event_free(t);
    ck_assert_int_eq(cn2.rc, PGS_OK);
    ck_assert_int_ne(d2.outcome, PGS_TX_UNKNOWN); /* the reply came within the grace */
    ck_assert_int_eq(th_rows("tx_cancel_commit"), d2.outcome == PGS_TX_COMMITTED ? 1 : 0);
    if (d2.outcome != PGS_TX_COMMITTED)
        ck_assert_int_eq(d2.err.code, PGS_ECANCELED); /* what it was, wherever it hit */
    th_close(b, c);
    th_loop_end(b);
}
END_TEST

START_TEST(test_statement_timeout)
{
    th_fresh_table("tx_stmt_timeout");
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    pgs_tx *tx;
    pgs_tx_opts o = {.statement_timeout_ms = 100};
    th_call ins = {0}, slow = {0};
    txdone d = {0};
    ck_assert_int_eq(pgs_tx_begin(c, &o, NULL, NULL, &tx), PGS_OK);
    ck_assert_int_eq(insert(tx, "tx_stmt_timeout", "1", &ins), PGS_OK);
    ck_assert_int_eq(pgs_tx_query(tx, "SELECT pg_sleep(5)", 0, NULL, th_record, &slow), PGS_OK);
    ck_assert_int_eq(pgs_tx_end(tx, 1, th_record_tx, &d), PGS_OK);
    double t0 = th_now();
    th_run_until(b, &d.fired, 10);
    ck_assert_msg(th_now() - t0 < 3, "took %.2f s", th_now() - t0);
    ck_assert_int_eq(slow.code, PGS_ETIMEDOUT);
    ck_assert_str_eq(slow.sqlstate, "57014");
    ck_assert_int_eq(d.err.code, PGS_ETIMEDOUT);
    ck_assert_int_eq(d.outcome, PGS_TX_ROLLED_BACK);
    ck_assert_int_eq(th_rows("tx_stmt_timeout"), 0);
    /* the setting was local to the transaction, and the connection is still usable */
    th_call show = {0};
    ck_assert_int_eq(pgs_query(c, "SHOW statement_timeout", 0, NULL, th_record, &show), PGS_OK);
    th_run_until(b, &show.fired, 5);
    ck_assert_str_eq(show.value, "0");
    th_close(b, c);
    th_loop_end(b);
}
END_TEST

START_TEST(test_transaction_timeout)
{
    th_fresh_table("tx_timeout");
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    int pid = th_backend_pid(c);
    pgs_tx *tx;
    pgs_tx_opts o = {.timeout_ms = 300};
    th_call ins = {0}, slow = {0};
    txdone d = {0};
    double t0 = th_now();
    ck_assert_int_eq(pgs_tx_begin(c, &o, NULL, NULL, &tx), PGS_OK);
    ck_assert_int_eq(insert(tx, "tx_timeout", "1", &ins), PGS_OK);
    ck_assert_int_eq(pgs_tx_query(tx, "SELECT pg_sleep(30)", 0, NULL, th_record, &slow), PGS_OK);
    ck_assert_int_eq(pgs_tx_end(tx, 1, th_record_tx, &d), PGS_OK);
    th_run_until(b, &d.fired, 10);
    double took = th_now() - t0;
    ck_assert_msg(took >= 0.29 && took < 2, "took %.2f s", took);
    ck_assert_int_eq(slow.code, PGS_ETIMEDOUT);
    ck_assert_int_eq(d.err.code, PGS_ETIMEDOUT);
    ck_assert_int_eq(d.outcome, PGS_TX_ROLLED_BACK);
    th_wait_backend_gone(pid, 5);
    ck_assert_int_eq(th_rows("tx_timeout"), 0);
    th_close(b, c);
    th_loop_end(b);
}
END_TEST

/* ---- unknown commits ---- */

/* A resolve that must not be answered (its call failed at once). */
static void never_resolved(pgs_txid_status status, const pgs_error *err, void *arg)
{
    (void)status;
    (void)err;
    (void)arg;
    ck_abort_msg("a resolve refused at once was answered");
}

typedef struct xid_watch {
    pgs_tx *tx;
    th_proxy *proxy;
    int pid;
    int acted;
} xid_watch;

/* The fault arrives while COMMIT runs (the deferred trigger sleeps in it). */
static void fault_during_commit(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    xid_watch *w = arg;
    w->acted = 1;
    if (w->proxy) {
        th_proxy_cut(w->proxy);
    } else {
        char p[16];
        snprintf(p, sizeof p, "%d", w->pid);
        const char *v[] = {p};
        free(th_scalar("SELECT pg_terminate_backend($1)", 1, v));
    }
}

/* Insert one row through `conninfo`, commit, and hit the connection with a fault while the
 * COMMIT runs. Returns the end's report. */
static txdone commit_with_fault(struct event_base *b, const char *conninfo, const char *table,
                                th_proxy *proxy)
{
    pgs_conn *c = th_open_at(b, conninfo, NULL);
    pgs_tx *tx;
    th_call k = {0};
    txdone d = {0};
    xid_watch w = {.proxy = proxy, .pid = th_backend_pid(c)};
    pgs_tx_opts resolvable = {.resolvable = 1};
    ck_assert_int_eq(pgs_tx_begin(c, &resolvable, NULL, NULL, &tx), PGS_OK);
    ck_assert_int_eq(insert(tx, table, "1", &k), PGS_OK);
    th_run_until(b, &k.fired, 10); /* the body waited for its result, then ends */
    ck_assert_int_eq(pgs_tx_end(tx, 1, th_record_tx, &d), PGS_OK);
    struct event *t;
    after(b, 0.3, fault_during_commit, &w, &t);
    th_run_until(b, &d.fired, 10);
    event_free(t);
    ck_assert_int_eq(w.acted, 1);
    ck_assert_int_eq(k.fired, 1);
    ck_assert_ptr_null(pgs_conn_pgconn(c)); /* the connection is gone */
    th_close(b, c);
    return d;
}

START_TEST(test_commit_reply_lost_is_unknown_then_resolved_committed)
{
    slow_commit_table("tx_unknown_c", "0.8");
    struct event_base *b = th_loop_begin();
    th_proxy *p = th_proxy_start(atoi(th_conninfo_value("port")));
    txdone d = commit_with_fault(b, th_proxy_conninfo(p), "tx_unknown_c", p);
    ck_assert_int_eq(d.outcome, PGS_TX_UNKNOWN);
    ck_assert_int_eq(d.err.code, PGS_ECOMMIT_UNKNOWN);
    ck_assert_str_eq(d.err.sqlstate, "08007");
    ck_assert_str_ne(d.xid, "");
    /* the server never saw the cut before it committed: resolution says so */
    ck_assert_int_eq(th_resolve(b, d.xid), PGS_TXID_COMMITTED);
    ck_assert_int_eq(th_rows("tx_unknown_c"), 1);
    th_proxy_stop(p);
    th_loop_end(b);
}
END_TEST

START_TEST(test_backend_killed_during_commit_is_unknown_then_resolved_aborted)
{
    slow_commit_table("tx_unknown_a", "5");
    struct event_base *b = th_loop_begin();
    txdone d = commit_with_fault(b, th_conninfo(NULL), "tx_unknown_a", NULL);
    ck_assert_int_eq(d.outcome, PGS_TX_UNKNOWN);
    ck_assert_int_eq(d.err.code, PGS_ECOMMIT_UNKNOWN);
    ck_assert_str_ne(d.xid, "");
    ck_assert_int_eq(th_resolve(b, d.xid), PGS_TXID_ABORTED);
    ck_assert_int_eq(th_rows("tx_unknown_a"), 0);
    ck_assert_int_eq(pgs_tx_resolve(b, th_conninfo(NULL), "12; DROP", never_resolved, NULL),
                     PGS_EINVAL);
    const char *bad[] = {"12/", "/5", "12/x", "12/5/6", ""};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        ck_assert_int_eq(pgs_tx_resolve(b, th_conninfo(NULL), bad[i], never_resolved, NULL),
                         PGS_EINVAL);
    th_loop_end(b);
}
END_TEST

/* ---- pgs_run_tx: retries and round trips ---- */

/* Read the balance, then write balance + 1: a read-modify-write that serializable isolation
 * must refuse when two run at once. A barrier makes the first two reads happen before either
 * write, so the conflict is certain rather than likely. */
typedef struct parked {
    pgs_tx *tx;
    char next[32];
} parked;

static parked parking[2];
static int barrier; /* reads still to arrive before the parked ones may write */
static int nparked;
static int bodies_run;

static void wrote_balance(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg)
{
    (void)c;
    (void)res;
    (void)err;
    (void)arg;
}

static void write_and_end(parked *p)
{
    const char *v[] = {p->next};
    pgs_tx_query(p->tx, "UPDATE tx_retry SET bal = $1::int WHERE id = 1", 1, v, wrote_balance,
                 NULL);
    pgs_tx_end(p->tx, 1, NULL, NULL);
}

static void read_balance(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg)
{
    (void)c;
    pgs_tx *tx = arg;
    if (err) {
        pgs_tx_end(tx, 0, NULL, NULL);
        return;
    }
    parked p = {.tx = tx};
    snprintf(p.next, sizeof p.next, "%ld", atol(PQgetvalue(res, 0, 0)) + 1);
    if (barrier == 0) {
        write_and_end(&p);
        return;
    }
    parking[nparked++] = p;
    if (--barrier == 0)
        for (int i = 0; i < nparked; i++)
            write_and_end(&parking[i]);
}

static void increment_body(pgs_tx *tx, void *arg)
{
    (void)arg;
    bodies_run++;
    pgs_tx_query(tx, "SELECT bal FROM tx_retry WHERE id = 1", 0, NULL, read_balance, tx);
}

static void arm_barrier(void)
{
    barrier = 2;
    nparked = 0;
}

START_TEST(test_conflicting_serializable_transactions_both_commit_by_retry)
{
    free(th_scalar("DROP TABLE IF EXISTS tx_retry", 0, NULL));
    free(th_scalar("CREATE TABLE tx_retry (id int PRIMARY KEY, bal int)", 0, NULL));
    free(th_scalar("INSERT INTO tx_retry VALUES (1, 100)", 0, NULL));
    struct event_base *b = th_loop_begin();
    pgs_conn *c1 = th_open(b, NULL), *c2 = th_open(b, NULL);
    pgs_tx_opts o = {.isolation = PGS_ISO_SERIALIZABLE, .retries = 5};
    txdone d1 = {0}, d2 = {0};
    bodies_run = 0;
    arm_barrier();
    ck_assert_int_eq(pgs_run_tx(c1, &o, increment_body, th_record_tx, &d1), PGS_OK);
    ck_assert_int_eq(pgs_run_tx(c2, &o, increment_body, th_record_tx, &d2), PGS_OK);
    ck_assert_int_eq(bodies_run, 0); /* never inside the call */
    th_run_until(b, &d1.fired, 20);
    th_run_until(b, &d2.fired, 20);
    ck_assert_int_eq(d1.outcome, PGS_TX_COMMITTED);
    ck_assert_int_eq(d2.outcome, PGS_TX_COMMITTED);
    ck_assert_int_eq(th_scalar_long("SELECT bal FROM tx_retry WHERE id = 1", 0, NULL), 102);
    /* both read 100 at first, so exactly one of them had to run again */
    ck_assert_int_eq(d1.attempts + d2.attempts, 3);
    ck_assert_int_eq(bodies_run, d1.attempts + d2.attempts);
    /* without retries the conflict is reported with its SQLSTATE */
    pgs_tx_opts none = {.isolation = PGS_ISO_SERIALIZABLE};
    txdone e1 = {0}, e2 = {0};
    arm_barrier();
    ck_assert_int_eq(pgs_run_tx(c1, &none, increment_body, th_record_tx, &e1), PGS_OK);
    ck_assert_int_eq(pgs_run_tx(c2, &none, increment_body, th_record_tx, &e2), PGS_OK);
    th_run_until(b, &e1.fired, 20);
    th_run_until(b, &e2.fired, 20);
    ck_assert_int_eq((e1.outcome == PGS_TX_COMMITTED) + (e2.outcome == PGS_TX_COMMITTED), 1);
    txdone *lost = e1.outcome == PGS_TX_COMMITTED ? &e2 : &e1;
    ck_assert_str_eq(lost->err.sqlstate, "40001");
    ck_assert_int_eq(lost->attempts, 1);
    th_close(b, c1);
    th_close(b, c2);
    th_loop_end(b);
}
END_TEST

typedef struct rt_ctx {
    th_call k[3];
    th_call read;
    txdone d;
    int interactive;
    pgs_tx_opts opts;
} rt_ctx;

static void rt_done(const pgs_tx_result *r, void *arg)
{
    th_record_tx(r, &((rt_ctx *)arg)->d);
}

static void rt_insert_rest(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg);

static void write_body(pgs_tx *tx, void *arg)
{
    rt_ctx *x = arg;
    if (x->interactive) { /* wait for a read before writing: a second round trip */
        pgs_tx_query(tx, "SELECT count(*) FROM tx_rt", 0, NULL, rt_insert_rest, tx);
        return;
    }
    const char *ids[] = {"1", "2", "3"};
    for (int i = 0; i < 3; i++)
        insert(tx, "tx_rt", ids[i], &x->k[i]);
    pgs_tx_end(tx, 1, NULL, NULL); /* at once: nothing to wait for */
}

static rt_ctx *rt_current;

static void rt_insert_rest(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg)
{
    th_record(c, res, err, &rt_current->read);
    pgs_tx *tx = arg;
    const char *ids[] = {"4", "5", "6"};
    for (int i = 0; i < 3; i++)
        insert(tx, "tx_rt", ids[i], &rt_current->k[i]);
    pgs_tx_end(tx, 1, NULL, NULL);
}

static int run_and_count_turns(struct event_base *b, pgs_conn *c, th_proxy *p, rt_ctx *x)
{
    rt_current = x;
    th_proxy_reset_turns(p);
    ck_assert_int_eq(pgs_run_tx(c, &x->opts, write_body, rt_done, x), PGS_OK);
    th_run_until(b, &x->d.fired, 10);
    ck_assert_int_eq(x->d.outcome, PGS_TX_COMMITTED);
    for (int i = 0; i < 3; i++) {
        ck_assert_int_eq(x->k[i].fired, 1);
        ck_assert_int_eq(x->k[i].code, PGS_OK);
    }
    return th_proxy_turns(p);
}

START_TEST(test_write_only_run_tx_takes_one_round_trip)
{
    th_fresh_table("tx_rt");
    struct event_base *b = th_loop_begin();
    th_proxy *p = th_proxy_start(atoi(th_conninfo_value("port")));
    pgs_conn *c = th_open_at(b, th_proxy_conninfo(p), NULL);
    rt_ctx one = {0}, two = {.interactive = 1};
    /* BEGIN + 3 INSERTs + COMMIT + sync: one burst on the wire, one reply */
    ck_assert_int_eq(run_and_count_turns(b, c, p, &one), 1);
    ck_assert_str_eq(one.d.xid, ""); /* not resolvable: the id was not read */
    /* resolvable: the id and its flush request ride in the same burst */
    rt_ctx res = {.opts = {.resolvable = 1}};
    free(th_scalar("DELETE FROM tx_rt WHERE id <= 3", 0, NULL));
    ck_assert_int_eq(run_and_count_turns(b, c, p, &res), 1);
    ck_assert_str_ne(res.d.xid, "");
    ck_assert_int_eq(atol(res.d.xid) > 0, 1);
    /* a body that waits for a read first needs exactly one more */
    ck_assert_int_eq(run_and_count_turns(b, c, p, &two), 2);
    ck_assert_str_eq(two.read.value, "3");
    /* begin_alone: BEGIN on its own round trip, then the rest */
    rt_ctx alone = {.opts = {.begin_alone = 1}};
    free(th_scalar("DELETE FROM tx_rt WHERE id <= 3", 0, NULL));
    ck_assert_int_eq(run_and_count_turns(b, c, p, &alone), 2);
    ck_assert_int_eq(th_rows("tx_rt"), 6);
    th_close(b, c);
    th_proxy_stop(p);
    th_loop_end(b);
}
END_TEST

START_TEST(test_connection_closed_under_open_transaction)
{
    th_fresh_table("tx_closed");
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    pgs_tx *tx;
    th_call k = {0};
    txdone d = {0};
    pgs_tx_opts o = {.timeout_ms = 500};
    ck_assert_int_eq(pgs_tx_begin(c, &o, NULL, NULL, &tx), PGS_OK);
    ck_assert_int_eq(insert(tx, "tx_closed", "1", &k), PGS_OK);
    th_close(b, c); /* the connection guard is gone; the transaction guard still needs its end */
    ck_assert_int_eq(k.code, PGS_ECLOSED);
    ck_assert_int_eq(pgs_tx_query(tx, "SELECT 1", 0, NULL, th_record, &k), PGS_ECLOSED);
    ck_assert_int_eq(pgs_tx_cancel(tx), PGS_EMISUSE);
    ck_assert_int_eq(pgs_tx_end(tx, 1, th_record_tx, &d), PGS_OK);
    th_loop_end(b); /* the timeout timer went with the transaction */
    ck_assert_int_eq(d.fired, 1);
    ck_assert_int_eq(d.outcome, PGS_TX_ROLLED_BACK);
    ck_assert_int_eq(d.err.code, PGS_ECLOSED);
    ck_assert_int_eq(th_rows("tx_closed"), 0);
    ck_assert_int_eq(k.fired, 1);
}
END_TEST

START_TEST(test_cancel_with_commit_held_behind_a_savepoint_rolls_back)
{
    th_fresh_table("tx_held");
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    pgs_tx *tx, *sp;
    th_call k = {0}, slow = {0};
    txdone d = {0}, ds = {0};
    ck_assert_int_eq(pgs_tx_begin(c, NULL, NULL, NULL, &tx), PGS_OK);
    ck_assert_int_eq(insert(tx, "tx_held", "1", &k), PGS_OK);
    ck_assert_int_eq(pgs_tx_savepoint(tx, NULL, NULL, &sp), PGS_OK);
    ck_assert_int_eq(pgs_tx_query(sp, "SELECT pg_sleep(1)", 0, NULL, th_record, &slow), PGS_OK);
    ck_assert_int_eq(pgs_tx_end(sp, 1, th_record_tx, &ds), PGS_OK);
    ck_assert_int_eq(pgs_tx_end(tx, 1, th_record_tx, &d), PGS_OK); /* COMMIT waits for the child */
    ck_assert_int_eq(pgs_tx_cancel(tx), PGS_OK);
    th_run_until(b, &d.fired, 10);
    ck_assert_int_eq(d.outcome, PGS_TX_ROLLED_BACK); /* never sent, so certain */
    ck_assert_int_eq(d.err.code, PGS_ECANCELED);
    ck_assert_int_eq(slow.code, PGS_ECANCELED);
    ck_assert_int_eq(th_rows("tx_held"), 0);
    th_close(b, c);
    th_loop_end(b);
    ck_assert_int_eq(ds.fired + d.fired + k.fired + slow.fired, 4);
}
END_TEST

/* ---- exact outcomes under faults ---- */

typedef struct status_call {
    th_call k;
    PGTransactionStatusType status; /* pgs_conn_txstatus in the callback */
} status_call;

static void record_status(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg)
{
    status_call *s = arg;
    s->status = pgs_conn_txstatus(c);
    th_record(c, res, err, &s->k);
}

START_TEST(test_txstatus_is_right_in_every_callback)
{
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    pgs_tx *tx, *sp;
    status_call first = {0}, bad = {0}, skipped = {0}, after = {0}, last = {0};
    txdone d = {0}, ds = {0};
    ck_assert_int_eq(pgs_conn_txstatus(c), PQTRANS_IDLE);
    ck_assert_int_eq(pgs_tx_begin(c, NULL, NULL, NULL, &tx), PGS_OK);
    ck_assert_int_eq(pgs_conn_txstatus(c), PQTRANS_INTRANS); /* open from BEGIN's queueing */
    ck_assert_int_eq(pgs_tx_query(tx, "SELECT 1", 0, NULL, record_status, &first), PGS_OK);
    th_run_until(b, &first.k.fired, 10);
    ck_assert_int_eq(first.status, PQTRANS_INTRANS);
    /* a savepoint child fails: the transaction is in error until its rollback is answered */
    ck_assert_int_eq(pgs_tx_savepoint(tx, NULL, NULL, &sp), PGS_OK);
    ck_assert_int_eq(pgs_tx_query(sp, "SELECT 1/0", 0, NULL, record_status, &bad), PGS_OK);
    ck_assert_int_eq(pgs_tx_query(sp, "SELECT 2", 0, NULL, record_status, &skipped), PGS_OK);
    ck_assert_int_eq(pgs_tx_end(sp, 1, th_record_tx, &ds), PGS_OK);
    /* the parent's next statement, queued now, runs after ROLLBACK TO and RELEASE */
    ck_assert_int_eq(pgs_tx_query(tx, "SELECT 3", 0, NULL, record_status, &after), PGS_OK);
    th_run_until(b, &after.k.fired, 10);
    ck_assert_str_eq(bad.k.sqlstate, "22012");
    ck_assert_int_eq(bad.status, PQTRANS_INERROR);
    ck_assert_int_eq(skipped.status, PQTRANS_INERROR);
    ck_assert_int_eq(ds.outcome, PGS_TX_ROLLED_BACK);
    ck_assert_int_eq(after.k.code, PGS_OK);
    ck_assert_int_eq(after.status, PQTRANS_INTRANS); /* nothing queued after it */
    /* a failure in the transaction itself */
    ck_assert_int_eq(pgs_tx_query(tx, "SELECT 1/0", 0, NULL, record_status, &last), PGS_OK);
    th_run_until(b, &last.k.fired, 10);
    ck_assert_int_eq(last.status, PQTRANS_INERROR);
    ck_assert_int_eq(pgs_tx_end(tx, 1, th_record_tx, &d), PGS_OK);
    th_run_until(b, &d.fired, 10);
    ck_assert_int_eq(d.outcome, PGS_TX_ROLLED_BACK);
    ck_assert_int_eq(pgs_conn_txstatus(c), PQTRANS_IDLE);
    ck_assert_int_eq(PQtransactionStatus(pgs_conn_pgconn(c)), PQTRANS_IDLE);
    th_close(b, c);
    ck_assert_int_eq(pgs_conn_txstatus(NULL), PQTRANS_UNKNOWN);
    th_loop_end(b);
}
END_TEST

/* A statement timeout that ends the wait for a lock reports PGS_ETIMEDOUT whether the statement
 * was new (the wait is in the statement cache's Parse) or cached (in its Bind). */
START_TEST(test_statement_timeout_is_a_timeout_cached_or_not)
{
    th_fresh_table("tx_parse_lock");
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    const char *cached_sql = "SELECT count(*) FROM tx_parse_lock";
    th_call warm = {0};
    ck_assert_int_eq(pgs_query(c, cached_sql, 0, NULL, th_record, &warm), PGS_OK);
    th_run_until(b, &warm.fired, 10);
    const char *sqls[] = {"SELECT count(*) FROM tx_parse_lock WHERE id > 0", cached_sql};
    for (int i = 0; i < 2; i++) {
        PGconn *blocker = th_lock_table("tx_parse_lock", "ACCESS EXCLUSIVE");
        pgs_tx *tx;
        th_call k = {0};
        txdone d = {0};
        pgs_tx_opts o = {.statement_timeout_ms = 300};
        ck_assert_int_eq(pgs_tx_begin(c, &o, NULL, NULL, &tx), PGS_OK);
        ck_assert_int_eq(pgs_tx_query(tx, sqls[i], 0, NULL, th_record, &k), PGS_OK);
        ck_assert_int_eq(pgs_tx_end(tx, 1, th_record_tx, &d), PGS_OK);
        th_run_until(b, &d.fired, 10);
        th_unlock(blocker);
        ck_assert_msg(k.code == PGS_ETIMEDOUT, "%s: %s %s %s", i ? "cached" : "new",
                      pgs_strerror(k.code), k.sqlstate, k.message);
        ck_assert_str_eq(k.sqlstate, "57014");
        ck_assert_ptr_null(strstr(k.message, "not run"));
        ck_assert_int_eq(d.outcome, PGS_TX_ROLLED_BACK);
        ck_assert_int_eq(d.err.code, PGS_ETIMEDOUT);
        ck_assert_str_eq(d.err.sqlstate, "57014");
    }
    th_close(b, c);
    th_loop_end(b);
}
END_TEST

/* The server's FATAL ends the session at an earlier statement of COMMIT's own pipeline
 * segment: COMMIT never ran, so the transaction rolled back (not "unknown"). */
START_TEST(test_fatal_before_commit_in_its_segment_is_rolled_back_not_unknown)
{
    th_fresh_table("tx_fatal_seg");
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    int pid = th_backend_pid(c);
    pgs_tx *tx;
    th_call sleep = {0}, k = {0};
    txdone d = {0};
    pgs_tx_opts o = {.resolvable = 1};
    ck_assert_int_eq(pgs_tx_begin(c, &o, NULL, NULL, &tx), PGS_OK);
    ck_assert_int_eq(pgs_tx_query(tx, "SELECT pg_sleep(5)", 0, NULL, th_record, &sleep), PGS_OK);
    ck_assert_int_eq(insert(tx, "tx_fatal_seg", "1", &k), PGS_OK);
    ck_assert_int_eq(pgs_tx_end(tx, 1, th_record_tx, &d), PGS_OK); /* one write, COMMIT in it */
    th_run_for(b, 0.3);
    th_terminate(pid);
    th_run_until(b, &d.fired, 10);
    ck_assert_int_eq(sleep.code, PGS_ECONN);
    ck_assert_str_eq(sleep.sqlstate, "57P01");
    ck_assert_int_eq(k.fired, 1);
    ck_assert_msg(d.outcome == PGS_TX_ROLLED_BACK, "outcome %d: %s", d.outcome, d.err.message);
    ck_assert_int_eq(d.err.code, PGS_ECONN);
    ck_assert_str_eq(d.err.sqlstate, "57P01");
    ck_assert_int_eq(th_rows("tx_fatal_seg"), 0);
    th_close(b, c);
    th_loop_end(b);
}
END_TEST

/* The connection is cut (no FATAL: nothing from the server) while COMMIT still waits behind a
 * savepoint's end: COMMIT was never written, so the transaction rolled back. */
START_TEST(test_loss_with_commit_held_behind_a_savepoint_is_rolled_back_not_unknown)
{
    th_fresh_table("tx_held_cut");
    struct event_base *b = th_loop_begin();
    th_proxy *p = th_proxy_start(atoi(th_conninfo_value("port")));
    pgs_conn *c = th_open_at(b, th_proxy_conninfo(p), NULL);
    pgs_tx *tx, *sp;
    th_call k = {0}, slow = {0};
    txdone d = {0}, ds = {0};
    ck_assert_int_eq(pgs_tx_begin(c, NULL, NULL, NULL, &tx), PGS_OK);
    ck_assert_int_eq(insert(tx, "tx_held_cut", "1", &k), PGS_OK);
    ck_assert_int_eq(pgs_tx_savepoint(tx, NULL, NULL, &sp), PGS_OK);
    ck_assert_int_eq(pgs_tx_query(sp, "SELECT pg_sleep(5)", 0, NULL, th_record, &slow), PGS_OK);
    ck_assert_int_eq(pgs_tx_end(sp, 1, th_record_tx, &ds), PGS_OK);
    ck_assert_int_eq(pgs_tx_end(tx, 1, th_record_tx, &d), PGS_OK); /* COMMIT waits for the child */
    th_run_for(b, 0.3);
    th_proxy_cut(p);
    th_run_until(b, &d.fired, 10);
    ck_assert_int_eq(slow.code, PGS_ECONN);
    ck_assert_msg(d.outcome == PGS_TX_ROLLED_BACK, "outcome %d: %s", d.outcome, d.err.message);
    ck_assert_int_eq(d.err.code, PGS_ECONN);
    ck_assert_ptr_null(strstr(d.err.message, "COMMIT was in flight"));
    th_close(b, c);
    th_proxy_stop(p);
    /* the server rolled it back when the connection went */
    for (double end = th_now() + 5; th_rows("tx_held_cut") != 0 && th_now() < end;)
        usleep(20000);
    ck_assert_int_eq(th_rows("tx_held_cut"), 0);
    th_loop_end(b);
}
END_TEST

/* pgs_run_tx: a serialization failure, then the connection dies during the backoff. The
 * failure is what the done reports, and attempts counts the body's runs. */
static int conflict_runs;

static void conflict_body(pgs_tx *tx, void *arg)
{
    (void)arg;
    conflict_runs++;
    pgs_tx_query(tx, TH_SERIALIZATION_FAILURE, 0, NULL, th_note_conn, NULL);
    pgs_tx_end(tx, 1, NULL, NULL);
}

START_TEST(test_retry_whose_connection_died_in_the_backoff_reports_the_failure)
{
    struct event_base *b = th_loop_begin();
    th_proxy *p = th_proxy_start(atoi(th_conninfo_value("port")));
    pgs_conn *c = th_open_at(b, th_proxy_conninfo(p), NULL);
    txdone d = {0};
    conflict_runs = 0;
    th_seen_conn = NULL;
    pgs_tx_opts o = {.retries = 3, .retry_base_ms = 500, .retry_max_ms = 500};
    ck_assert_int_eq(pgs_run_tx(c, &o, conflict_body, th_record_tx, &d), PGS_OK);
    /* the first attempt rolled back (its ROLLBACK answered): the backoff runs now */
    th_run_until_idle_or(b, &d.fired);
    th_proxy_cut(p);
    th_run_until(b, &d.fired, 10);
    ck_assert_int_eq(d.fired, 1);
    ck_assert_int_eq(d.attempts, conflict_runs);
    if (conflict_runs == 1) { /* (the backoff's jitter may, rarely, have run it again first) */
        ck_assert_int_eq(d.outcome, PGS_TX_ROLLED_BACK);
        ck_assert_msg(d.err.code == PGS_ESQL, "%s: %s", pgs_strerror(d.err.code), d.err.message);
        ck_assert_str_eq(d.err.sqlstate, "40001");
    }
    th_close(b, c);
    th_proxy_stop(p);
    th_loop_end(b);
}
END_TEST

/* Found by the model test (tests/test_model.c; PGSCOPE_SEED=502 program 3): after a statement
 * of a savepoint failed, one queued in a later loop turn is answered by libpq itself
 * (PIPELINE_ABORTED), with no socket event: its callback, the savepoint's end and the root's
 * end must still fire. */
START_TEST(test_statement_after_a_failed_one_in_a_later_turn_is_answered)
{
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    pgs_tx *tx, *sp;
    th_call bad = {0}, after = {0};
    txdone ds = {0}, d = {0};
    ck_assert_int_eq(pgs_tx_begin(c, NULL, NULL, NULL, &tx), PGS_OK);
    ck_assert_int_eq(pgs_tx_savepoint(tx, NULL, NULL, &sp), PGS_OK);
    ck_assert_int_eq(pgs_tx_query(sp, "SELECT 1/0", 0, NULL, th_record, &bad), PGS_OK);
    th_run_until(b, &bad.fired, 10);
    ck_assert_str_eq(bad.sqlstate, "22012");
    ck_assert_int_eq(pgs_tx_query(sp, "SELECT 2", 0, NULL, th_record, &after), PGS_OK);
    ck_assert_int_eq(pgs_tx_end(sp, 1, th_record_tx, &ds), PGS_OK);
    ck_assert_int_eq(pgs_tx_end(tx, 1, th_record_tx, &d), PGS_OK);
    th_run_until(b, &d.fired, 5);
    ck_assert_int_eq(after.fired, 1);
    ck_assert_int_eq(after.code, PGS_ESQL); /* skipped after the error that aborted it */
    ck_assert_int_eq(ds.outcome, PGS_TX_ROLLED_BACK);
    ck_assert_int_eq(d.outcome, PGS_TX_COMMITTED); /* the savepoint's rollback undid it */
    th_close(b, c);
    th_loop_end(b);
}
END_TEST

/* Found by the model test (PGSCOPE_SEED=69502956878259 program 67 under ASan): an orphaned
 * savepoint's handle stays valid until its parent's done returns; a call on it meanwhile is
 * refused (it was freed a round trip early). */
static pgs_tx *orphan_b;
static int orphan_refused;

/* The parent's done: the orphan is still a valid handle here (its own end came earlier). */
static void parent_done_tries_orphan(const pgs_tx_result *r, void *arg)
{
    th_record_tx(r, arg);
    orphan_refused = pgs_tx_end(orphan_b, 1, NULL, NULL) == PGS_EMISUSE;
}

START_TEST(test_orphaned_savepoint_stays_valid_until_its_parents_done)
{
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    pgs_tx *tx, *a;
    txdone da = {0}, d = {0};
    ck_assert_int_eq(pgs_tx_begin(c, NULL, NULL, NULL, &tx), PGS_OK);
    ck_assert_int_eq(pgs_tx_savepoint(tx, NULL, NULL, &a), PGS_OK);
    ck_assert_int_eq(pgs_tx_savepoint(a, NULL, NULL, &orphan_b), PGS_OK);
    orphan_refused = 0;
    ck_assert_int_eq(pgs_tx_end(a, 1, parent_done_tries_orphan, &da), PGS_OK); /* B orphaned */
    ck_assert_int_eq(pgs_tx_end(orphan_b, 1, NULL, NULL), PGS_EMISUSE);
    th_run_until(b, &da.fired, 10);
    ck_assert_int_eq(orphan_refused, 1);
    ck_assert_int_eq(da.outcome, PGS_TX_ROLLED_BACK);
    ck_assert_int_eq(da.err.code, PGS_EMISUSE);
    ck_assert_int_eq(pgs_tx_end(tx, 0, th_record_tx, &d), PGS_OK);
    th_run_until(b, &d.fired, 10);
    th_close(b, c);
    th_loop_end(b);
}
END_TEST

static Suite *tx_suite(void)
{
    Suite *s = suite_create("tx");
    TCase *t = tcase_create("tx");
    tcase_set_timeout(t, 30);
    tcase_add_test(t, test_commit_visible_after_done_not_before);
    tcase_add_test(t, test_unique_violation_rolls_back_everything);
    tcase_add_test(t, test_ok_zero_rolls_back);
    tcase_add_test(t, test_options_reach_the_server);
    tcase_add_test(t, test_misuse_is_reported_not_crashed);
    tcase_add_test(t, test_savepoint_error_rolled_back_outer_commits);
    tcase_add_test(t, test_three_levels_deep);
    tcase_add_test(t, test_parent_ended_with_open_child_rolls_back_both);
    tcase_add_test(t, test_cancel_mid_statement);
    tcase_add_test(t, test_cancel_while_begin_in_flight);
    tcase_add_test(t, test_cancel_while_commit_in_flight_waits_for_the_reply);
    tcase_add_test(t, test_statement_timeout);
    tcase_add_test(t, test_transaction_timeout);
    tcase_add_test(t, test_commit_reply_lost_is_unknown_then_resolved_committed);
    tcase_add_test(t, test_backend_killed_during_commit_is_unknown_then_resolved_aborted);
    tcase_add_test(t, test_conflicting_serializable_transactions_both_commit_by_retry);
    tcase_add_test(t, test_write_only_run_tx_takes_one_round_trip);
    tcase_add_test(t, test_connection_closed_under_open_transaction);
    tcase_add_test(t, test_cancel_with_commit_held_behind_a_savepoint_rolls_back);
    tcase_add_test(t, test_txstatus_is_right_in_every_callback);
    tcase_add_test(t, test_statement_timeout_is_a_timeout_cached_or_not);
    tcase_add_test(t, test_fatal_before_commit_in_its_segment_is_rolled_back_not_unknown);
    tcase_add_test(t, test_loss_with_commit_held_behind_a_savepoint_is_rolled_back_not_unknown);
    tcase_add_test(t, test_retry_whose_connection_died_in_the_backoff_reports_the_failure);
    tcase_add_test(t, test_statement_after_a_failed_one_in_a_later_turn_is_answered);
    tcase_add_test(t, test_orphaned_savepoint_stays_valid_until_its_parents_done);
    suite_add_tcase(s, t);
    return s;
}

int main(void)
{
    return th_run_suite(tx_suite());
}

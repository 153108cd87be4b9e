/* Tracing hooks on connections and transaction guards, and per-statement limits
 * (pgs_query_ex), against the real server: what each hook sees and when, that parameter
 * values never reach a hook, that a deadline cancels and closes (and a late cancel never hits
 * the next statement), and that a server-side limit keeps the connection. The pool's hooks
 * are tests/test_pool_ops.c's. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "helpers.h"

/* Everything the hooks saw, in order. */
typedef struct seen {
    int starts, ends, opens, open_errs, losts, begins, tx_ends;
    char start_sql[8][160];
    char end_sql[8][160];
    long long end_rows[8], end_us[8];
    pgs_code end_code[8];
    char end_sqlstate[8][6];
    int end_seq[8];          /* th_fire_seq when stmt_end fired */
    pgs_tx_outcome tx_outcome[4];
    int tx_attempts[4];
    long long tx_us[4];
    pgs_code lost_code;
    char lost_sqlstate[6];
    int txstatus_in_end;     /* pgs_conn_txstatus read from inside stmt_end */
    char everything[4096];   /* every string a hook got, joined */
} seen;

static void note(seen *s, const char *text)
{
    size_t n = strlen(s->everything);
    snprintf(s->everything + n, sizeof s->everything - n, "%s|", text ? text : "");
}

static void h_start(pgs_conn *c, const char *sql, void *arg)
{
    (void)c;
    seen *s = arg;
    if (s->starts < 8)
        snprintf(s->start_sql[s->starts], sizeof s->start_sql[0], "%s", sql);
    s->starts++;
    note(s, sql);
}

static void h_end(pgs_conn *c, const pgs_stmt_trace *t, void *arg)
{
    seen *s = arg;
    int i = s->ends++;
    note(s, t->sql);
    if (t->err)
        note(s, t->err->message);
    s->txstatus_in_end = pgs_conn_txstatus(c); /* a read-only call from inside: safe */
    (void)pgs_conn_pgconn(c);
    if (i >= 8)
        return;
    snprintf(s->end_sql[i], sizeof s->end_sql[0], "%s", t->sql);
    s->end_rows[i] = t->rows;
    s->end_us[i] = t->duration_us;
    s->end_code[i] = t->err ? t->err->code : PGS_OK;
    snprintf(s->end_sqlstate[i], sizeof s->end_sqlstate[0], "%s", t->err ? t->err->sqlstate : "");
    s->end_seq[i] = th_fire_seq++;
}

static void h_open(pgs_conn *c, const pgs_error *err, void *arg)
{
    (void)c;
    seen *s = arg;
    s->opens++;
    s->open_errs += err != NULL;
}

static void h_lost(pgs_conn *c, const pgs_error *err, void *arg)
{
    (void)c;
    seen *s = arg;
    s->losts++;
    s->lost_code = err->code;
    snprintf(s->lost_sqlstate, sizeof s->lost_sqlstate, "%s", err->sqlstate);
}

static void h_begin(pgs_conn *c, pgs_tx *tx, void *arg)
{
    (void)c;
    (void)tx;
    ((seen *)arg)->begins++;
}

static void h_tx_end(pgs_conn *c, const pgs_tx_result *r, long long us, void *arg)
{
    (void)c;
    seen *s = arg;
    int i = s->tx_ends++;
    if (i < 4) {
        s->tx_outcome[i] = r->outcome;
        s->tx_attempts[i] = r->attempts;
        s->tx_us[i] = us;
    }
}

static pgs_hooks hooks_for(seen *s)
{
    return (pgs_hooks){.stmt_start = h_start, .stmt_end = h_end, .conn_open = h_open,
                       .conn_lost = h_lost, .tx_begin = h_begin, .tx_end = h_tx_end, .arg = s};
}

START_TEST(test_statement_hooks_see_text_rows_errors_and_never_values)
{
    seen s = {0};
    pgs_hooks h = hooks_for(&s);
    pgs_conn_opts o = {.hooks = &h};
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, &o);
    ck_assert_int_eq(s.opens, 1);
    ck_assert_int_eq(s.open_errs, 0);
    th_call k1 = {0}, k2 = {0}, k3 = {0};
    const char *v[] = {"secret-value-42"};
    ck_assert_int_eq(pgs_query(c, "SELECT $1::text FROM generate_series(1, 3)", 1, v, th_record,
                               &k1),
                     PGS_OK);
    ck_assert_int_eq(s.starts, 1); /* inside the call */
    ck_assert_int_eq(pgs_query(c, "SELECT 1/0", 0, NULL, th_record, &k2), PGS_OK);
    ck_assert_int_eq(pgs_query(c, "SELECT 2", 0, NULL, th_record, &k3), PGS_OK);
    th_run_until(b, &k3.fired, 10);
    ck_assert_int_eq(s.starts, 3);
    ck_assert_int_eq(s.ends, 3);
    ck_assert_str_eq(s.end_sql[0], "SELECT $1::text FROM generate_series(1, 3)");
    ck_assert_int_eq(s.end_rows[0], 3);
    ck_assert_int_eq(s.end_code[0], PGS_OK);
    ck_assert_int_eq(s.end_code[1], PGS_ESQL);
    ck_assert_str_eq(s.end_sqlstate[1], "22012");
    ck_assert_int_eq(s.end_rows[1], -1);
    ck_assert_int_eq(s.end_rows[2], 1);
    for (int i = 0; i < 3; i++)
        ck_assert(s.end_us[i] >= 0 && s.end_us[i] < 10000000);
    /* each stmt_end just before its statement's callback */
    ck_assert_int_lt(s.end_seq[0], k1.seq);
    ck_assert_int_lt(k1.seq, s.end_seq[1]);
    ck_assert_int_lt(s.end_seq[1], k2.seq);
    ck_assert_ptr_null(strstr(s.everything, "secret-value-42"));
    ck_assert_int_eq(s.txstatus_in_end, PQTRANS_IDLE);
    th_close(b, c);
    th_loop_end(b);
    ck_assert_int_eq(s.losts, 0);
}
END_TEST

static void count_open(pgs_conn *c, const pgs_error *err, void *arg)
{
    (void)c;
    (void)err;
    ++*(int *)arg;
}

START_TEST(test_connection_hooks_see_a_failed_open_and_a_loss)
{
    seen s = {0};
    pgs_hooks h = hooks_for(&s);
    pgs_conn_opts o = {.hooks = &h};
    struct event_base *b = th_loop_begin();
    char ci[128];
    snprintf(ci, sizeof ci, "host=127.0.0.1 port=%d user=x dbname=x", th_closed_port());
    pgs_conn *bad = NULL;
    int fired = 0;
    ck_assert_int_eq(pgs_conn_open(b, ci, &o, count_open, &fired, &bad), PGS_OK);
    th_run_until(b, &fired, 10);
    ck_assert_int_eq(s.opens, 1);
    ck_assert_int_eq(s.open_errs, 1);
    th_close(b, bad);
    pgs_conn *c = th_open(b, &o);
    ck_assert_int_eq(s.opens, 2);
    th_terminate(th_backend_pid(c));
    double until = th_now() + 5;
    while (s.losts == 0 && th_now() < until)
        th_run_for(b, 0.05);
    ck_assert_int_eq(s.losts, 1);
    ck_assert_int_eq(s.lost_code, PGS_ECONN);
    ck_assert_str_eq(s.lost_sqlstate, "57P01");
    th_close(b, c);
    th_loop_end(b);
}
END_TEST

static int body_runs;

static void retry_body(pgs_tx *tx, void *arg)
{
    (void)arg;
    static th_call k;
    memset(&k, 0, sizeof k);
    body_runs++;
    pgs_tx_query(tx, body_runs == 1 ? TH_SERIALIZATION_FAILURE : "SELECT 1", 0, NULL, th_record,
                 &k);
    pgs_tx_end(tx, 1, NULL, NULL);
}

START_TEST(test_transaction_hooks_see_each_attempt_with_its_outcome)
{
    seen s = {0};
    pgs_hooks h = hooks_for(&s);
    pgs_conn_opts o = {.hooks = &h};
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, &o);
    body_runs = 0;
    th_txdone d = {0};
    pgs_tx_opts to = {.retries = 2, .retry_base_ms = 1};
    ck_assert_int_eq(pgs_run_tx(c, &to, retry_body, th_record_tx, &d), PGS_OK);
    th_run_until(b, &d.fired, 10);
    ck_assert_int_eq(d.outcome, PGS_TX_COMMITTED);
    ck_assert_int_eq(d.attempts, 2);
    ck_assert_int_eq(s.begins, 2);
    ck_assert_int_eq(s.tx_ends, 2);
    ck_assert_int_eq(s.tx_outcome[0], PGS_TX_ROLLED_BACK);
    ck_assert_int_eq(s.tx_attempts[0], 1);
    ck_assert_int_eq(s.tx_outcome[1], PGS_TX_COMMITTED);
    ck_assert_int_eq(s.tx_attempts[1], 2);
    ck_assert(s.tx_us[1] >= 0 && s.tx_us[1] < 10000000);
    /* BEGIN and COMMIT are traced as statements too */
    ck_assert_ptr_nonnull(strstr(s.everything, "COMMIT"));
    th_close(b, c);
    th_loop_end(b);
}
END_TEST

/* ---- pgs_query_ex ---- */

START_TEST(test_deadline_cancels_closes_and_never_hits_the_next_statement)
{
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    int pid = th_backend_pid(c);
    th_call k = {0}, behind = {0};
    pgs_query_opts qo = {.timeout_ms = 200};
    double t0 = th_now();
    ck_assert_int_eq(pgs_query_ex(c, "SELECT pg_sleep(5)", 0, NULL, &qo, th_record, &k), PGS_OK);
    ck_assert_int_eq(pgs_query(c, "SELECT 3", 0, NULL, th_record, &behind), PGS_OK);
    th_run_until(b, &behind.fired, 10);
    ck_assert_int_eq(k.code, PGS_ETIMEDOUT);
    ck_assert_msg(k.at - t0 >= 0.18 && k.at - t0 < 2.0, "timed out after %.3f s", k.at - t0);
    ck_assert_ptr_nonnull(strstr(k.message, "timeout_ms 200"));
    ck_assert_int_eq(behind.code, PGS_ETIMEDOUT); /* the connection closed under it */
    ck_assert_int_lt(k.seq, behind.seq);
    th_wait_backend_gone(pid, 5); /* cancelled and closed: the sleep does not go on */
    /* the guard is dead: its next statement is refused at once */
    th_call again = {0};
    ck_assert_int_eq(pgs_query(c, "SELECT 4", 0, NULL, th_record, &again), PGS_ETIMEDOUT);
    th_close(b, c);
    /* a fresh guard's statement is not hit by any late cancel */
    pgs_conn *c2 = th_open(b, NULL);
    th_call next = {0};
    ck_assert_int_eq(pgs_query(c2, "SELECT pg_sleep(0.5)", 0, NULL, th_record, &next), PGS_OK);
    th_run_until(b, &next.fired, 10);
    ck_assert_int_eq(next.code, PGS_OK);
    th_close(b, c2);
    th_loop_end(b);
}
END_TEST

START_TEST(test_deadline_that_fires_during_the_parse_of_a_new_statement)
{
    th_fresh_table("trace_locked");
    struct event_base *b = th_loop_begin();
    PGconn *blocker = th_lock_table("trace_locked", "ACCESS EXCLUSIVE");
    pgs_conn *c = th_open(b, NULL);
    th_call k = {0};
    pgs_query_opts qo = {.timeout_ms = 300};
    /* a new statement: its Parse waits for the table's lock */
    ck_assert_int_eq(pgs_query_ex(c, "SELECT count(*) FROM trace_locked", 0, NULL, &qo, th_record,
                                  &k),
                     PGS_OK);
    th_run_until(b, &k.fired, 10);
    ck_assert_int_eq(k.code, PGS_ETIMEDOUT);
    th_unlock(blocker);
    th_close(b, c);
    th_loop_end(b);
}
END_TEST

START_TEST(test_server_side_limit_keeps_the_connection_and_the_session_setting)
{
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    th_call set = {0}, k = {0}, show = {0}, after = {0};
    ck_assert_int_eq(pgs_query(c, "SET statement_timeout = '7s'", 0, NULL, th_record, &set),
                     PGS_OK);
    pgs_query_opts qo = {.server_timeout_ms = 200};
    double t0 = th_now();
    ck_assert_int_eq(pgs_query_ex(c, "SELECT pg_sleep(3)", 0, NULL, &qo, th_record, &k), PGS_OK);
    th_run_until(b, &k.fired, 10);
    ck_assert_int_eq(k.code, PGS_ETIMEDOUT);
    ck_assert_str_eq(k.sqlstate, "57014");
    ck_assert_msg(k.at - t0 < 2.0, "took %.3f s", k.at - t0);
    /* the session's own setting is back, and the next statement is not limited */
    ck_assert_int_eq(pgs_query(c, "SHOW statement_timeout", 0, NULL, th_record, &show), PGS_OK);
    ck_assert_int_eq(pgs_query(c, "SELECT pg_sleep(0.4)", 0, NULL, th_record, &after), PGS_OK);
    th_run_until(b, &after.fired, 10);
    ck_assert_str_eq(show.value, "7s");
    ck_assert_int_eq(after.code, PGS_OK);
    /* a fast statement under a limit just answers */
    th_call fast = {0};
    ck_assert_int_eq(pgs_query_ex(c, "SELECT 5", 0, NULL, &qo, th_record, &fast), PGS_OK);
    th_run_until(b, &fast.fired, 10);
    ck_assert_int_eq(fast.code, PGS_OK);
    ck_assert_str_eq(fast.value, "5");
    th_close(b, c);
    th_loop_end(b);
}
END_TEST

START_TEST(test_query_ex_arguments_and_ownership)
{
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    th_call k = {0};
    pgs_query_opts neg = {.timeout_ms = -1};
    ck_assert_int_eq(pgs_query_ex(c, "SELECT 1", 0, NULL, &neg, th_record, &k), PGS_EINVAL);
    ck_assert_int_eq(pgs_query_ex(NULL, "SELECT 1", 0, NULL, &(pgs_query_opts){.timeout_ms = 5},
                                  th_record, &k),
                     PGS_EINVAL);
    pgs_tx *tx;
    ck_assert_int_eq(pgs_tx_begin(c, NULL, NULL, NULL, &tx), PGS_OK);
    ck_assert_int_eq(pgs_query_ex(c, "SELECT 1", 0, NULL,
                                  &(pgs_query_opts){.timeout_ms = 100, .server_timeout_ms = 50},
                                  th_record, &k),
                     PGS_EMISUSE);
    th_txdone d = {0};
    ck_assert_int_eq(pgs_tx_end(tx, 1, th_record_tx, &d), PGS_OK);
    th_run_until(b, &d.fired, 10);
    ck_assert_int_eq(d.outcome, PGS_TX_COMMITTED);
    /* NULL opts: a plain statement */
    ck_assert_int_eq(pgs_query_ex(c, "SELECT 6", 0, NULL, NULL, th_record, &k), PGS_OK);
    th_run_until(b, &k.fired, 10);
    ck_assert_str_eq(k.value, "6");
    th_close(b, c);
    th_loop_end(b);
    ck_assert_int_eq(k.fired, 1);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("trace");
    TCase *t = tcase_create("trace");
    tcase_set_timeout(t, 30);
    tcase_add_test(t, test_statement_hooks_see_text_rows_errors_and_never_values);
    tcase_add_test(t, test_connection_hooks_see_a_failed_open_and_a_loss);
    tcase_add_test(t, test_transaction_hooks_see_each_attempt_with_its_outcome);
    tcase_add_test(t, test_deadline_cancels_closes_and_never_hits_the_next_statement);
    tcase_add_test(t, test_deadline_that_fires_during_the_parse_of_a_new_statement);
    tcase_add_test(t, test_server_side_limit_keeps_the_connection_and_the_session_setting);
    tcase_add_test(t, test_query_ex_arguments_and_ownership);
    suite_add_tcase(s, t);
    return th_run_suite(s);
}

/* The connection guard against the real server: connect and its failures, pipelined queries,
 * close on every path, cancel, connection loss, notices and notifications. */
#include <fcntl.h>
#include <locale.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "helpers.h"


/* ---- queries ---- */

START_TEST(test_params_come_back_verbatim_no_injection)
{
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    const char *tricky[] = {
        "it's", "a;b", "'; DROP TABLE pgs_victim; --", "\"quoted\" \\ back\\slash", "$1", "",
    };
    th_call k[6] = {0};
    th_call made = {0}, after = {0};
    ck_assert_int_eq(pgs_query(c, "CREATE TEMP TABLE pgs_victim(x int)", 0, NULL, th_record, &made),
                     PGS_OK);
    for (int i = 0; i < 6; i++) {
        const char *v[] = {tricky[i]};
        ck_assert_int_eq(pgs_query(c, "SELECT $1::text", 1, v, th_record, &k[i]), PGS_OK);
    }
    ck_assert_int_eq(pgs_query(c, "SELECT count(*) FROM pgs_victim", 0, NULL, th_record, &after),
                     PGS_OK);
    th_run_until(b, &after.fired, 10);
    ck_assert_int_eq(made.code, PGS_OK);
    for (int i = 0; i < 6; i++) {
        ck_assert_int_eq(k[i].fired, 1);
        ck_assert_int_eq(k[i].code, PGS_OK);
        ck_assert_str_eq(k[i].value, tricky[i]);
    }
    ck_assert_int_eq(after.code, PGS_OK); /* the table survived */
    ck_assert_str_eq(after.value, "0");
    th_close(b, c);
    th_loop_end(b);
}
END_TEST

START_TEST(test_typed_params_and_null)
{
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    const char *v[] = {"41", NULL};
    th_call k = {0}, n = {0};
    ck_assert_int_eq(pgs_query(c, "SELECT $1::int + 1", 1, v, th_record, &k), PGS_OK);
    ck_assert_int_eq(pgs_query(c, "SELECT ($2::text IS NULL)::text || $1", 2, v, th_record, &n),
                     PGS_OK);
    th_run_until(b, &n.fired, 10);
    ck_assert_str_eq(k.value, "42");
    ck_assert_str_eq(n.value, "true41");
    th_close(b, c);
    th_loop_end(b);
}
END_TEST

START_TEST(test_hundred_queued_run_in_order_failure_isolated)
{
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    th_call k[100] = {0};
    char num[100][8];
    th_fire_seq = 0;
    for (int i = 0; i < 100; i++) {
        snprintf(num[i], sizeof num[i], "%d", i);
        const char *v[] = {num[i]};
        const char *sql = i == 50 ? "SELECT 1 / ($1::int - 50)" : "SELECT $1::int";
        ck_assert_int_eq(pgs_query(c, sql, 1, v, th_record, &k[i]), PGS_OK);
    }
    ck_assert_int_eq(th_fire_seq, 0); /* nothing fires inside pgs_query */
    th_run_until(b, &k[99].fired, 15);
    for (int i = 0; i < 100; i++) {
        ck_assert_int_eq(k[i].fired, 1);
        ck_assert_int_eq(k[i].seq, i);
        if (i == 50) {
            ck_assert_int_eq(k[i].code, PGS_ESQL);
            ck_assert_str_eq(k[i].sqlstate, "22012"); /* division_by_zero */
        } else {
            ck_assert_int_eq(k[i].code, PGS_OK);
            ck_assert_str_eq(k[i].value, num[i]);
        }
    }
    th_close(b, c);
    th_loop_end(b);
}
END_TEST

START_TEST(test_multiple_statements_in_one_string_rejected)
{
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    th_call k = {0};
    ck_assert_int_eq(pgs_query(c, "SELECT 1; SELECT 2", 0, NULL, th_record, &k), PGS_OK);
    th_run_until(b, &k.fired, 10);
    ck_assert_int_eq(k.code, PGS_ESQL);
    ck_assert_str_eq(k.sqlstate, "42601");
    th_close(b, c);
    th_loop_end(b);
}
END_TEST

static void on_open_seq(pgs_conn *c, const pgs_error *err, void *arg)
{
    (void)c;
    th_call *k = arg;
    k->fired++;
    k->seq = th_fire_seq++;
    k->code = err ? err->code : PGS_OK;
}

START_TEST(test_queries_queued_while_connecting_run_after_connect)
{
    struct event_base *b = th_loop_begin();
    pgs_conn *c = NULL;
    th_call opened = {0};
    th_call k[3] = {0};
    th_fire_seq = 0;
    ck_assert_int_eq(pgs_conn_open(b, th_conninfo(NULL), NULL, on_open_seq, &opened, &c), PGS_OK);
    const char *v[] = {"7"};
    for (int i = 0; i < 3; i++)
        ck_assert_int_eq(pgs_query(c, "SELECT $1::int * 6", 1, v, th_record, &k[i]), PGS_OK);
    th_run_until(b, &k[2].fired, 10);
    ck_assert_int_eq(opened.fired, 1);
    ck_assert_int_eq(opened.code, PGS_OK);
    ck_assert_int_eq(opened.seq, 0);
    for (int i = 0; i < 3; i++) {
        ck_assert_int_eq(k[i].seq, i + 1);
        ck_assert_str_eq(k[i].value, "42");
    }
    th_close(b, c);
    th_loop_end(b);
}
END_TEST

/* ---- the statement cache ---- */

static const char *value_of(struct event_base *b, pgs_conn *c, const char *sql, th_call *k)
{
    memset(k, 0, sizeof *k);
    ck_assert_int_eq(pgs_query(c, sql, 0, NULL, th_record, k), PGS_OK);
    th_run_until(b, &k->fired, 10);
    return k->value;
}

START_TEST(test_statements_are_prepared_once_and_errors_stay_their_own)
{
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    th_call k[3] = {0}, q = {0};
    const char *v[] = {"7"};
    for (int i = 0; i < 3; i++)
        ck_assert_int_eq(pgs_query(c, "SELECT $1::int * 6", 1, v, th_record, &k[i]), PGS_OK);
    th_run_until(b, &k[2].fired, 10);
    for (int i = 0; i < 3; i++)
        ck_assert_str_eq(k[i].value, "42");
    ck_assert_str_eq(value_of(b, c,
                              "SELECT count(*) FROM pg_prepared_statements "
                              "WHERE statement = 'SELECT $1::int * 6' AND name LIKE 'pgs_s_%'",
                              &q),
                     "1");
    /* a statement that does not parse gets its own error, not "an earlier one failed" */
    value_of(b, c, "SELEC 1", &q);
    ck_assert_int_eq(q.code, PGS_ESQL);
    ck_assert_str_eq(q.sqlstate, "42601");
    ck_assert_ptr_null(strstr(q.message, "not run"));
    value_of(b, c, "SELEC 1", &q); /* not cached: the same error again */
    ck_assert_str_eq(q.sqlstate, "42601");
    ck_assert_str_eq(value_of(b, c, "SELECT 'after'", &q), "after");
    /* the user deallocates everything: the cache starts over, statements still work */
    value_of(b, c, "DEALLOCATE ALL", &q);
    ck_assert_int_eq(q.code, PGS_OK);
    ck_assert_int_eq(pgs_query(c, "SELECT $1::int * 6", 1, v, th_record, &k[0]), PGS_OK);
    th_run_until(b, &k[0].fired, 10);
    ck_assert_int_eq(k[0].code, PGS_OK);
    /* a table changed under a cached plan: that one execution fails, the next parses anew */
    value_of(b, c, "CREATE TEMP TABLE pgs_cache_t (a int)", &q);
    value_of(b, c, "SELECT * FROM pgs_cache_t", &q);
    ck_assert_int_eq(q.code, PGS_OK);
    value_of(b, c, "ALTER TABLE pgs_cache_t ADD COLUMN b int", &q);
    value_of(b, c, "SELECT * FROM pgs_cache_t", &q);
    ck_assert_str_eq(q.sqlstate, "0A000");
    value_of(b, c, "SELECT * FROM pgs_cache_t", &q);
    ck_assert_int_eq(q.code, PGS_OK);
    th_close(b, c);
    th_loop_end(b);
}
END_TEST

START_TEST(test_stale_statement_fails_once_per_use_then_parses_anew)
{
    struct event_base *b = th_loop_begin();
    th_proxy *p = th_proxy_start(atoi(th_conninfo_value("port")));
    pgs_conn *c = th_open_at(b, th_proxy_conninfo(p), NULL);
    th_call q;
    const char *sql = "SELECT * FROM pgs_stale_t";
    value_of(b, c, "CREATE TEMP TABLE pgs_stale_t (a int)", &q);
    value_of(b, c, sql, &q);
    ck_assert_int_eq(q.code, PGS_OK);

    /* Two uses in one write: both run the stale plan and fail; the next use parses anew. */
    value_of(b, c, "ALTER TABLE pgs_stale_t ADD COLUMN b int", &q);
    th_call k[2] = {0};
    for (int i = 0; i < 2; i++)
        ck_assert_int_eq(pgs_query(c, sql, 0, NULL, th_record, &k[i]), PGS_OK);
    th_run_until(b, &k[1].fired, 10);
    for (int i = 0; i < 2; i++) {
        ck_assert_int_eq(k[i].fired, 1);
        ck_assert_str_eq(k[i].sqlstate, "0A000");
    }
    value_of(b, c, sql, &q);
    ck_assert_int_eq(q.code, PGS_OK);

    /* One use alone, and the same text queued while it is on the wire: the second waits,
     * hears nothing of the first's failure and runs on a fresh Parse. */
    value_of(b, c, "ALTER TABLE pgs_stale_t ADD COLUMN c int", &q);
    th_call alone = {0}, behind = {0};
    th_proxy_stall(p, 1);
    ck_assert_int_eq(pgs_query(c, sql, 0, NULL, th_record, &alone), PGS_OK);
    event_base_loop(b, EVLOOP_NONBLOCK); /* out on its own, held up in the proxy */
    ck_assert_int_eq(pgs_query(c, sql, 0, NULL, th_record, &behind), PGS_OK);
    th_proxy_stall(p, 0);
    th_run_until(b, &behind.fired, 10);
    ck_assert_int_eq(alone.fired, 1);
    ck_assert_str_eq(alone.sqlstate, "0A000");
    ck_assert_int_eq(behind.fired, 1);
    ck_assert_int_eq(behind.code, PGS_OK);
    th_close(b, c);
    th_proxy_stop(p);
    th_loop_end(b);
}
END_TEST

START_TEST(test_statement_cache_can_be_turned_off)
{
    struct event_base *b = th_loop_begin();
    pgs_conn_opts o = {.statement_cache = -1};
    pgs_conn *c = th_open(b, &o);
    th_call q;
    value_of(b, c, "SELECT 1", &q);
    value_of(b, c, "SELECT 1", &q);
    ck_assert_str_eq(value_of(b, c, "SELECT count(*) FROM pg_prepared_statements", &q), "0");
    th_close(b, c);
    th_loop_end(b);
}
END_TEST

/* ---- connect failures ---- */

/* Open with conninfo, expect failure with `code`; return the error for further checks. */
static pgs_error open_fails(const char *conninfo, const pgs_conn_opts *opts, pgs_code code)
{
    struct event_base *b = th_loop_begin();
    th_open_rec r = {0};
    int done = 0;
    pgs_conn *c = NULL;
    ck_assert_int_eq(pgs_conn_open(b, conninfo, opts, th_on_open, &r, &c), PGS_OK);
    ck_assert_int_eq(r.fired, 0);
    th_run_until(b, &r.fired, 20);
    ck_assert_int_eq(r.ok, 0);
    ck_assert_msg(r.err.code == code, "expected %s, got %s: %s", pgs_strerror(code),
                  pgs_strerror(r.err.code), r.err.message);
    /* A dead guard refuses statements with its cause, and still needs (and takes) its exit. */
    th_call k = {0};
    ck_assert_int_eq(pgs_query(c, "SELECT 1", 0, NULL, th_record, &k), code);
    ck_assert_int_eq(pgs_conn_close(c, th_count_done, &done), PGS_OK);
    th_loop_end(b);
    ck_assert_int_eq(done, 1);
    ck_assert_int_eq(r.fired, 1);
    ck_assert_int_eq(k.fired, 0);
    return r.err;
}

START_TEST(test_connect_bad_conninfo_syntax)
{
    pgs_error e = open_fails("host=127.0.0.1 password=Hunter2Syntax port", NULL, PGS_EINVAL);
    ck_assert_ptr_null(strstr(e.message, "Hunter2Syntax"));
    ck_assert_ptr_nonnull(strstr(e.message, "invalid connection string"));
    e = open_fails("postgresql://u:Hunter2Uri@127.0.0.1:notaport/db", NULL, PGS_EINVAL);
    ck_assert_ptr_null(strstr(e.message, "Hunter2Uri"));
    e = open_fails("host=127.0.0.1 bogus_option=1 password=Hunter2Opt", NULL, PGS_EINVAL);
    ck_assert_ptr_null(strstr(e.message, "Hunter2Opt"));
    /* what libpq quotes of the string is masked unless it is a real option name */
    ck_assert_msg(strstr(e.message, "invalid connection option \"***\""), "%s", e.message);
}
END_TEST

START_TEST(test_connect_refused_port)
{
    char ci[256];
    snprintf(ci, sizeof ci, "host=127.0.0.1 port=%d user=x password=Hunter2Refused dbname=x",
             th_closed_port());
    pgs_error e = open_fails(ci, NULL, PGS_ECONNECT);
    ck_assert_ptr_nonnull(strstr(e.message, "refused"));
    ck_assert_ptr_null(strstr(e.message, "Hunter2Refused"));
}
END_TEST

START_TEST(test_connect_wrong_password)
{
    pgs_error e = open_fails(th_conninfo("password=Hunter2Wrong"), NULL, PGS_EAUTH);
    ck_assert_str_eq(e.sqlstate, "28P01");
    ck_assert_ptr_nonnull(strstr(e.message, "password authentication failed"));
    ck_assert_ptr_null(strstr(e.message, "Hunter2Wrong"));
    ck_assert_ptr_null(strstr(e.message, "LOCATION"));
}
END_TEST

START_TEST(test_connect_unknown_database)
{
    pgs_error e = open_fails(th_conninfo("dbname=pgs_no_such_db"), NULL, PGS_ENODB);
    ck_assert_str_eq(e.sqlstate, "3D000");
    ck_assert_ptr_nonnull(strstr(e.message, "pgs_no_such_db"));
    ck_assert_ptr_null(strstr(e.message, th_conninfo_value("password")));
}
END_TEST

/* connect_timeout from libpq's environment when the conninfo has none. */
START_TEST(test_connect_timeout_from_the_environment)
{
    int port;
    int lfd = th_silent_listener(&port);
    char ci[256];
    snprintf(ci, sizeof ci, "host=127.0.0.1 port=%d user=x dbname=x", port);
    setenv("PGCONNECT_TIMEOUT", "1", 1); /* libpq's rule: 1 s counts as 2 */
    struct event_base *b = th_loop_begin();
    th_open_rec r = {0};
    pgs_conn *c = NULL;
    double t0 = th_now();
    ck_assert_int_eq(pgs_conn_open(b, ci, NULL, th_on_open, &r, &c), PGS_OK);
    unsetenv("PGCONNECT_TIMEOUT");
    th_run_until(b, &r.fired, 10);
    ck_assert_int_eq(r.err.code, PGS_ETIMEDOUT);
    double took = r.at - t0;
    ck_assert_msg(took >= 1.9 && took < 5.0, "timed out after %.3f s, want ~2 s", took);
    th_close(b, c);
    th_loop_end(b);
    close(lfd);
}
END_TEST

START_TEST(test_connect_timeout_against_silent_listener)
{
    int port;
    int lfd = th_silent_listener(&port);
    char ci[256];
    snprintf(ci, sizeof ci, "host=127.0.0.1 port=%d user=x dbname=x connect_timeout=0", port);
    pgs_conn_opts o = {.connect_timeout_ms = 500};
    double t0 = th_now();
    struct event_base *b = th_loop_begin();
    th_open_rec r = {0};
    int done = 0;
    pgs_conn *c = NULL;
    ck_assert_int_eq(pgs_conn_open(b, ci, &o, th_on_open, &r, &c), PGS_OK);
    th_run_until(b, &r.fired, 10);
    ck_assert_int_eq(r.err.code, PGS_ETIMEDOUT);
    double took = r.at - t0;
    ck_assert_msg(took >= 0.45 && took < 2.0, "timed out after %.3f s, want ~0.5 s", took);
    ck_assert_int_eq(pgs_conn_close(c, th_count_done, &done), PGS_OK);
    th_loop_end(b); /* also proves the guard's socket is closed */
    ck_assert_int_eq(done, 1);
    close(lfd);
}
END_TEST

START_TEST(test_host_name_resolved_through_evdns)
{
    /* "localhost" goes through libevent's resolver and reaches libpq as a hostaddr. */
    struct event_base *b = th_loop_begin();
    th_open_rec r = {0};
    pgs_conn *c = NULL;
    ck_assert_int_eq(pgs_conn_open(b, th_conninfo("host=localhost"), NULL, th_on_open, &r, &c),
                     PGS_OK);
    th_run_until(b, &r.fired, 10);
    ck_assert_msg(r.ok, "connect to localhost failed: %s", r.err.message);
    ck_assert_str_eq(PQhost(pgs_conn_pgconn(c)), "localhost");
    ck_assert_str_eq(PQhostaddr(pgs_conn_pgconn(c)), "127.0.0.1");
    th_close(b, c);
    th_loop_end(b);
}
END_TEST

START_TEST(test_unresolvable_host_fails_with_reason_then_next_host_used)
{
    pgs_conn_opts o = {.connect_timeout_ms = 8000};
    pgs_error e = open_fails(th_conninfo("host=pgscope-no-such-host.invalid"), &o, PGS_ECONNECT);
    ck_assert_ptr_nonnull(strstr(e.message, "could not resolve host name"));
    ck_assert_ptr_nonnull(strstr(e.message, "pgscope-no-such-host.invalid"));
    /* a list: the bad name is skipped, the next host is used */
    struct event_base *b = th_loop_begin();
    th_open_rec r = {0};
    pgs_conn *c = NULL;
    ck_assert_int_eq(pgs_conn_open(b, th_conninfo("host=pgscope-no-such-host.invalid,127.0.0.1"),
                                   &o, th_on_open, &r, &c),
                     PGS_OK);
    th_run_until(b, &r.fired, 10);
    ck_assert_msg(r.ok, "connect failed: %s", r.err.message);
    th_close(b, c);
    th_loop_end(b);
}
END_TEST

/* ---- close ---- */

/* A conninfo for a server that accepts and never answers; *lfd gets its listening socket. */
static const char *silent_conninfo(int *lfd)
{
    static char ci[128];
    int port;
    *lfd = th_silent_listener(&port);
    snprintf(ci, sizeof ci, "host=127.0.0.1 port=%d user=x dbname=x", port);
    return ci;
}

START_TEST(test_close_while_connecting)
{
    int lfd;
    const char *ci = silent_conninfo(&lfd);
    struct event_base *b = th_loop_begin();
    th_open_rec r = {0};
    int done = 0;
    pgs_conn *c = NULL;
    th_call k = {0};
    ck_assert_int_eq(pgs_conn_open(b, ci, NULL, th_on_open, &r, &c), PGS_OK);
    ck_assert_int_eq(pgs_query(c, "SELECT 1", 0, NULL, th_record, &k), PGS_OK);
    event_base_loop(b, EVLOOP_NONBLOCK); /* let the handshake start */
    ck_assert_int_eq(pgs_conn_close(c, th_count_done, &done), PGS_OK);
    ck_assert_int_eq(r.fired + k.fired + done, 0); /* nothing fires inside close */
    th_loop_end(b);
    ck_assert_int_eq(r.fired, 1);
    ck_assert_int_eq(r.err.code, PGS_ECLOSED);
    ck_assert_int_eq(k.fired, 1);
    ck_assert_int_eq(k.code, PGS_ECLOSED);
    ck_assert_int_eq(done, 1);
    close(lfd);
}
END_TEST

START_TEST(test_close_while_host_name_is_looked_up)
{
    struct event_base *b = th_loop_begin();
    th_open_rec r = {0};
    int done = 0;
    pgs_conn *c = NULL;
    ck_assert_int_eq(pgs_conn_open(b, th_conninfo("host=localhost"), NULL, th_on_open, &r, &c),
                     PGS_OK);
    ck_assert_int_eq(pgs_conn_close(c, th_count_done, &done), PGS_OK);
    th_loop_end(b); /* the abandoned lookup frees itself and leaves nothing behind */
    ck_assert_int_eq(r.fired, 1);
    ck_assert_int_eq(r.err.code, PGS_ECLOSED);
    ck_assert_int_eq(done, 1);
}
END_TEST

typedef struct closer {
    pgs_conn *c;
    int done;
    int close_rc;
    int second_rc;
} closer;

static void close_from_timer(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    closer *k = arg;
    k->close_rc = pgs_conn_close(k->c, th_count_done, &k->done);
    k->second_rc = pgs_conn_close(k->c, th_count_done, &k->done); /* idempotent */
}

START_TEST(test_close_while_statement_runs)
{
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    int pid = th_backend_pid(c);
    th_call k = {0};
    ck_assert_int_eq(pgs_query(c, "SELECT pg_sleep(30)", 0, NULL, th_record, &k), PGS_OK);
    closer cl = {.c = c};
    struct event *t = evtimer_new(b, close_from_timer, &cl);
    struct timeval tv = {0, 200000};
    evtimer_add(t, &tv);
    double t0 = th_now();
    th_run_until(b, &cl.done, 10);
    event_free(t);
    ck_assert_int_eq(cl.close_rc, PGS_OK);
    ck_assert_int_eq(cl.second_rc, PGS_EMISUSE);
    ck_assert_int_eq(k.fired, 1);
    ck_assert_int_eq(k.code, PGS_ECLOSED);
    ck_assert_msg(th_now() - t0 < 5, "close took %.2f s", th_now() - t0);
    th_loop_end(b);
    ck_assert_int_eq(cl.done, 1);
    /* close asked the server to stop: the backend does not sleep on for 30 s */
    th_wait_backend_gone(pid, 5);
}
END_TEST

START_TEST(test_close_with_ten_queued)
{
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    th_call k[10] = {0};
    for (int i = 0; i < 10; i++)
        ck_assert_int_eq(pgs_query(c, "SELECT pg_sleep(0.05)", 0, NULL, th_record, &k[i]), PGS_OK);
    int done = 0;
    ck_assert_int_eq(pgs_conn_close(c, th_count_done, &done), PGS_OK);
    for (int i = 0; i < 10; i++)
        ck_assert_int_eq(k[i].fired, 0);
    ck_assert_int_eq(done, 0);
    th_loop_end(b);
    for (int i = 0; i < 10; i++) {
        ck_assert_int_eq(k[i].fired, 1);
        ck_assert_int_eq(k[i].code, PGS_ECLOSED);
    }
    ck_assert_int_eq(done, 1);
}
END_TEST

static int inner_done;

static void close_inside_result(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg)
{
    th_record(c, res, err, arg);
    ck_assert_int_eq(pgs_conn_close(c, th_count_done, &inner_done), PGS_OK);
    ck_assert_int_eq(inner_done, 0);
}

START_TEST(test_close_from_inside_a_result_callback)
{
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    th_call first = {0}, second = {0};
    ck_assert_int_eq(pgs_query(c, "SELECT 1", 0, NULL, close_inside_result, &first), PGS_OK);
    ck_assert_int_eq(pgs_query(c, "SELECT 2", 0, NULL, th_record, &second), PGS_OK);
    th_loop_end(b);
    ck_assert_int_eq(first.fired, 1);
    ck_assert_int_eq(second.fired, 1);
    ck_assert_int_eq(second.code, PGS_ECLOSED);
    ck_assert_int_eq(inner_done, 1); /* done fired once, after the callback returned */
}
END_TEST

START_TEST(test_misuse_gets_codes_not_crashes)
{
    struct event_base *b = th_loop_begin();
    pgs_conn *c = NULL;
    ck_assert_int_eq(pgs_conn_open(NULL, "", NULL, th_on_open, NULL, &c), PGS_EINVAL);
    ck_assert_ptr_null(c);
    ck_assert_int_eq(pgs_conn_open(b, NULL, NULL, th_on_open, NULL, &c), PGS_EINVAL);
    ck_assert_int_eq(pgs_conn_open(b, "", NULL, NULL, NULL, &c), PGS_EINVAL);
    ck_assert_int_eq(pgs_query(NULL, "SELECT 1", 0, NULL, th_record, NULL), PGS_EINVAL);
    ck_assert_int_eq(pgs_conn_close(NULL, NULL, NULL), PGS_EINVAL);
    ck_assert_int_eq(pgs_conn_cancel(NULL), PGS_EINVAL);
    c = th_open(b, NULL);
    th_call k = {0};
    ck_assert_int_eq(pgs_query(c, NULL, 0, NULL, th_record, &k), PGS_EINVAL);
    ck_assert_int_eq(pgs_query(c, "SELECT 1", 0, NULL, NULL, &k), PGS_EINVAL);
    ck_assert_int_eq(pgs_query(c, "SELECT $1", 1, NULL, th_record, &k), PGS_EINVAL);
    ck_assert_int_eq(pgs_query(c, "SELECT 1", -1, NULL, th_record, &k), PGS_EINVAL);
    int done = 0;
    ck_assert_int_eq(pgs_conn_close(c, th_count_done, &done), PGS_OK);
    ck_assert_int_eq(pgs_query(c, "SELECT 1", 0, NULL, th_record, &k), PGS_EMISUSE);
    ck_assert_int_eq(pgs_conn_cancel(c), PGS_EMISUSE);
    ck_assert_int_eq(pgs_conn_close(c, th_count_done, &done), PGS_EMISUSE);
    th_loop_end(b);
    ck_assert_int_eq(done, 1);
    ck_assert_int_eq(k.fired, 0);
}
END_TEST

START_TEST(test_copy_is_refused_clearly)
{
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    th_call k = {0};
    ck_assert_int_eq(pgs_query(c, "COPY (SELECT 1) TO STDOUT", 0, NULL, th_record, &k), PGS_OK);
    th_run_until(b, &k.fired, 10);
    ck_assert_int_eq(k.code, PGS_EUNSUPPORTED);
    th_close(b, c);
    th_loop_end(b);
}
END_TEST

/* ---- cancel ---- */

typedef struct ticker {
    struct event *ev;
    double last;
    double max_gap;
    int ticks;
} ticker;

static void on_tick(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    ticker *t = arg;
    double now = th_now();
    if (t->last > 0 && now - t->last > t->max_gap)
        t->max_gap = now - t->last;
    t->last = now;
    t->ticks++;
}

typedef struct canceller {
    pgs_conn *c;
    int rc;
    int rc_again;
    double at;
} canceller;

static void cancel_from_timer(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    canceller *k = arg;
    k->at = th_now();
    k->rc = pgs_conn_cancel(k->c);
    k->rc_again = pgs_conn_cancel(k->c);
}

START_TEST(test_cancel_long_statement)
{
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    int pid = th_backend_pid(c);
    th_call k = {0}, queued = {0};
    ck_assert_int_eq(pgs_query(c, "SELECT pg_sleep(30)", 0, NULL, th_record, &k), PGS_OK);
    ck_assert_int_eq(pgs_query(c, "SELECT 1", 0, NULL, th_record, &queued), PGS_OK);
    ticker tk = {0};
    tk.ev = event_new(b, -1, EV_PERSIST, on_tick, &tk);
    struct timeval every = {0, 10000};
    event_add(tk.ev, &every);
    canceller cn = {.c = c};
    struct event *t = evtimer_new(b, cancel_from_timer, &cn);
    struct timeval tv = {0, 300000};
    evtimer_add(t, &tv);
    th_run_until(b, &k.fired, 10);
    ck_assert_int_eq(cn.rc, PGS_OK);
    ck_assert_int_eq(cn.rc_again, PGS_EMISUSE);
    ck_assert_int_eq(k.code, PGS_ECANCELED);
    ck_assert_msg(k.at - cn.at < 1.0, "cancel took %.3f s", k.at - cn.at);
    /* the loop kept running while the cancel request was out */
    ck_assert_msg(tk.max_gap < 0.25, "the loop stalled for %.3f s", tk.max_gap);
    ck_assert_int_ge(tk.ticks, 20);
    event_free(tk.ev);
    event_free(t);
    th_run_until(b, &queued.fired, 5);
    ck_assert_int_eq(queued.code, PGS_ECANCELED);
    th_call after = {0};
    ck_assert_int_eq(pgs_query(c, "SELECT 1", 0, NULL, th_record, &after), PGS_ECANCELED);
    th_wait_backend_gone(pid, 5);
    th_close(b, c);
    th_loop_end(b);
    ck_assert_int_eq(k.fired, 1);
    ck_assert_int_eq(queued.fired, 1);
    ck_assert_int_eq(after.fired, 0);
}
END_TEST

START_TEST(test_cancel_request_that_stalls_is_bounded)
{
    /* The network to the server stalls: the cancel request cannot get through. The guard
     * stops waiting after cancel_timeout_ms and still reports and closes. */
    struct event_base *b = th_loop_begin();
    th_proxy *p = th_proxy_start(atoi(th_conninfo_value("port")));
    int fds_before = th_count_fds();
    pgs_conn_opts o = {.cancel_timeout_ms = 300};
    pgs_conn *c = th_open_at(b, th_proxy_conninfo(p), &o);
    th_call k = {0};
    ck_assert_int_eq(pgs_query(c, "SELECT pg_sleep(3)", 0, NULL, th_record, &k), PGS_OK);
    event_base_loop(b, EVLOOP_NONBLOCK);
    th_proxy_stall(p, 1);
    double t0 = th_now();
    ck_assert_int_eq(pgs_conn_cancel(c), PGS_OK);
    th_run_until(b, &k.fired, 10);
    double took = k.at - t0;
    ck_assert_int_eq(k.code, PGS_ECANCELED);
    ck_assert_msg(took >= 0.25 && took < 2.0, "cancel took %.3f s, want ~0.3 s", took);
    th_close(b, c);
    th_proxy_stall(p, 0); /* the abandoned request gets through; its thread cleans up */
    for (double end = th_now() + 5; th_count_fds() > fds_before && th_now() < end;)
        usleep(20000);
    th_proxy_stop(p);
    th_loop_end(b);
    ck_assert_int_eq(k.fired, 1);
}
END_TEST

START_TEST(test_cancel_while_connecting)
{
    int lfd;
    const char *ci = silent_conninfo(&lfd);
    struct event_base *b = th_loop_begin();
    th_open_rec r = {0};
    pgs_conn *c = NULL;
    ck_assert_int_eq(pgs_conn_open(b, ci, NULL, th_on_open, &r, &c), PGS_OK);
    ck_assert_int_eq(pgs_conn_cancel(c), PGS_OK);
    ck_assert_int_eq(r.fired, 0);
    th_run_until(b, &r.fired, 5);
    ck_assert_int_eq(r.err.code, PGS_ECANCELED);
    int done = 0;
    ck_assert_int_eq(pgs_conn_close(c, th_count_done, &done), PGS_OK);
    th_loop_end(b);
    ck_assert_int_eq(done, 1);
    ck_assert_int_eq(r.fired, 1);
    close(lfd);
}
END_TEST

/* ---- connection loss ---- */

typedef struct lost_rec {
    int fired;
    pgs_error err;
} lost_rec;

static void on_lost_rec(pgs_conn *c, const pgs_error *err, void *arg)
{
    (void)c;
    lost_rec *l = arg;
    l->fired++;
    l->err = *err;
}

static void terminate_from_timer(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    char p[16];
    snprintf(p, sizeof p, "%d", *(int *)arg);
    const char *v[] = {p};
    char *r = th_scalar("SELECT pg_terminate_backend($1)::text", 1, v);
    ck_assert_str_eq(r, "true");
    free(r);
}

START_TEST(test_terminated_backend_mid_statement_is_econn)
{
    struct event_base *b = th_loop_begin();
    lost_rec l = {0};
    pgs_conn_opts o = {.on_lost = on_lost_rec, .lost_arg = &l};
    pgs_conn *c = th_open(b, &o);
    int pid = th_backend_pid(c);
    th_call k = {0}, queued = {0};
    ck_assert_int_eq(pgs_query(c, "SELECT pg_sleep(30)", 0, NULL, th_record, &k), PGS_OK);
    ck_assert_int_eq(pgs_query(c, "SELECT 1", 0, NULL, th_record, &queued), PGS_OK);
    struct event *t = evtimer_new(b, terminate_from_timer, &pid);
    struct timeval tv = {0, 200000};
    evtimer_add(t, &tv);
    th_run_until(b, &queued.fired, 10);
    event_free(t);
    ck_assert_int_eq(k.fired, 1);
    ck_assert_int_eq(k.code, PGS_ECONN);
    ck_assert_str_eq(k.sqlstate, "57P01"); /* admin_shutdown */
    ck_assert_int_eq(queued.code, PGS_ECONN);
    th_run_until(b, &l.fired, 5);
    ck_assert_int_eq(l.err.code, PGS_ECONN);
    th_call after = {0};
    ck_assert_int_eq(pgs_query(c, "SELECT 1", 0, NULL, th_record, &after), PGS_ECONN);
    ck_assert_ptr_null(pgs_conn_pgconn(c));
    th_close(b, c);
    th_loop_end(b);
    ck_assert_int_eq(l.fired, 1);
    ck_assert_int_eq(k.fired, 1);
}
END_TEST

START_TEST(test_terminated_idle_backend_reported_by_on_lost)
{
    struct event_base *b = th_loop_begin();
    lost_rec l = {0};
    pgs_conn_opts o = {.on_lost = on_lost_rec, .lost_arg = &l};
    pgs_conn *c = th_open(b, &o);
    int pid = th_backend_pid(c);
    terminate_from_timer(-1, 0, &pid);
    th_run_until(b, &l.fired, 5);
    ck_assert_int_eq(l.err.code, PGS_ECONN);
    ck_assert_msg(strcmp(l.err.sqlstate, "57P01") == 0, "%s %s", l.err.sqlstate, l.err.message);
    th_close(b, c);
    th_loop_end(b);
    ck_assert_int_eq(l.fired, 1);
}
END_TEST

/* ---- a lone statement and what comes while it runs ---- */

/* Run a statement once, so the guard's cache holds it (the next use is executed by name). */
static void warm(struct event_base *b, pgs_conn *c, const char *sql, int nparams,
                 const char *const *values)
{
    th_call k = {0};
    ck_assert_int_eq(pgs_query(c, sql, nparams, values, th_record, &k), PGS_OK);
    th_run_until(b, &k.fired, 10);
    ck_assert_int_eq(k.code, PGS_OK);
}

typedef struct mode_call {
    th_call k;
    int pipeline; /* PQpipelineStatus when the callback ran */
} mode_call;

static void record_mode(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg)
{
    mode_call *m = arg;
    m->pipeline = PQpipelineStatus(pgs_conn_pgconn(c));
    th_record(c, res, err, &m->k);
}

typedef struct later {
    pgs_conn *c;
    const char *sql[3];
    char value[3][8];
    mode_call k[3];
} later;

static void queue_three(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    later *l = arg;
    for (int i = 0; i < 3; i++) {
        const char *v[] = {l->value[i]};
        ck_assert_int_eq(pgs_query(l->c, l->sql[i], 1, v, record_mode, &l->k[i]), PGS_OK);
        strcpy(l->value[i], "0"); /* the guard kept its own copy */
    }
}

START_TEST(test_lone_statement_goes_alone_and_a_burst_in_one_round_trip)
{
    struct event_base *b = th_loop_begin();
    th_proxy *p = th_proxy_start(atoi(th_conninfo_value("port")));
    pgs_conn *c = th_open_at(b, th_proxy_conninfo(p), NULL);
    const char *sql = "SELECT $1::int + 1";
    const char *v0[] = {"0"};
    warm(b, c, sql, 1, v0);

    /* Alone: outside pipeline mode, with the value as it was when queued. */
    char buf[8] = "41";
    const char *v[] = {buf};
    mode_call lone = {0};
    th_proxy_reset_turns(p);
    ck_assert_int_eq(pgs_query(c, sql, 1, v, record_mode, &lone), PGS_OK);
    strcpy(buf, "99"); /* the caller's buffer changes before the loop runs */
    th_run_until(b, &lone.k.fired, 10);
    ck_assert_int_eq(lone.k.code, PGS_OK);
    ck_assert_str_eq(lone.k.value, "42");
    ck_assert_int_eq(lone.pipeline, PQ_PIPELINE_OFF);
    ck_assert_int_eq(th_proxy_turns(p), 1);

    /* Three in one loop turn: pipelined, all sent before any reply (the proxy holds them
     * until they are all there: one round trip), in order. */
    mode_call k[3];
    memset(k, 0, sizeof k);
    char vals[3][8] = {"1", "2", "3"};
    th_fire_seq = 0;
    th_proxy_reset_turns(p);
    th_proxy_stall(p, 1);
    for (int i = 0; i < 3; i++) {
        const char *vi[] = {vals[i]};
        ck_assert_int_eq(pgs_query(c, sql, 1, vi, record_mode, &k[i]), PGS_OK);
    }
    event_base_loop(b, EVLOOP_NONBLOCK);
    th_proxy_stall(p, 0);
    th_run_until(b, &k[2].k.fired, 10);
    for (int i = 0; i < 3; i++) {
        ck_assert_int_eq(k[i].k.fired, 1);
        ck_assert_int_eq(k[i].k.seq, i);
        ck_assert_int_eq(k[i].k.value[0], '2' + i);
    }
    ck_assert_int_eq(k[0].pipeline, PQ_PIPELINE_ON);
    ck_assert_int_eq(th_proxy_turns(p), 1);

    /* And alone again after the pipeline. */
    mode_call again = {0};
    ck_assert_int_eq(pgs_query(c, sql, 1, v, record_mode, &again), PGS_OK);
    th_run_until(b, &again.k.fired, 10);
    ck_assert_str_eq(again.k.value, "100");
    ck_assert_int_eq(again.pipeline, PQ_PIPELINE_OFF);
    th_close(b, c);
    th_proxy_stop(p);
    th_loop_end(b);
}
END_TEST

START_TEST(test_statements_queued_while_one_runs_alone_follow_it_in_order)
{
    struct event_base *b = th_loop_begin();
    th_proxy *p = th_proxy_start(atoi(th_conninfo_value("port")));
    pgs_conn *c = th_open_at(b, th_proxy_conninfo(p), NULL);
    const char *sleep_sql = "SELECT pg_sleep(0.3)::text || $1";
    const char *v0[] = {"x"};
    warm(b, c, sleep_sql, 1, v0);
    later l = {.c = c,
               .sql = {"SELECT $1::int * 2", "SELECT 1 / ($1::int - 5)", "SELECT $1::text"},
               .value = {"21", "5", "last"}};
    th_call first = {0};
    th_fire_seq = 0;
    th_proxy_reset_turns(p);
    ck_assert_int_eq(pgs_query(c, sleep_sql, 1, v0, th_record, &first), PGS_OK);
    /* A later loop turn, while the first runs on its own: these three wait for it. */
    struct event *t = evtimer_new(b, queue_three, &l);
    struct timeval tv = {0, 50000};
    evtimer_add(t, &tv);
    th_run_until(b, &l.k[2].k.fired, 10);
    event_free(t);
    ck_assert_int_eq(first.fired, 1);
    ck_assert_int_eq(first.seq, 0);
    ck_assert_int_eq(first.code, PGS_OK);
    ck_assert_str_eq(first.value, "x");
    for (int i = 0; i < 3; i++) {
        ck_assert_int_eq(l.k[i].k.fired, 1);
        ck_assert_int_eq(l.k[i].k.seq, i + 1);
    }
    ck_assert_int_eq(l.k[0].k.code, PGS_OK);
    ck_assert_str_eq(l.k[0].k.value, "42");
    ck_assert_int_eq(l.k[1].k.code, PGS_ESQL); /* its own failure only */
    ck_assert_str_eq(l.k[1].k.sqlstate, "22012");
    ck_assert_int_eq(l.k[2].k.code, PGS_OK);
    ck_assert_str_eq(l.k[2].k.value, "last");
    /* the three went together, pipelined, once the first was answered */
    ck_assert_int_eq(l.k[0].pipeline, PQ_PIPELINE_ON);
    ck_assert_int_ge(th_proxy_turns(p), 2);
    th_close(b, c);
    th_proxy_stop(p);
    th_loop_end(b);
}
END_TEST

typedef struct terminator {
    later l;
    int pid;
} terminator;

static void queue_then_terminate(evutil_socket_t fd, short what, void *arg)
{
    terminator *t = arg;
    queue_three(fd, what, &t->l);
    terminate_from_timer(fd, what, &t->pid);
}

START_TEST(test_backend_lost_while_one_runs_alone_fails_the_waiting_once)
{
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    const char *sleep_sql = "SELECT pg_sleep($1::float8)::text";
    const char *short_sleep[] = {"0"}, *long_sleep[] = {"30"};
    warm(b, c, sleep_sql, 1, short_sleep);
    terminator t = {.l = {.c = c, .sql = {"SELECT $1::int", "SELECT $1::int", "SELECT $1::int"},
                          .value = {"1", "2", "3"}},
                    .pid = th_backend_pid(c)};
    th_call first = {0};
    ck_assert_int_eq(pgs_query(c, sleep_sql, 1, long_sleep, th_record, &first), PGS_OK);
    struct event *ev = evtimer_new(b, queue_then_terminate, &t);
    struct timeval tv = {0, 100000};
    evtimer_add(ev, &tv);
    th_run_until(b, &t.l.k[2].k.fired, 10);
    event_free(ev);
    ck_assert_int_eq(first.fired, 1);
    ck_assert_int_eq(first.code, PGS_ECONN);
    for (int i = 0; i < 3; i++) {
        ck_assert_int_eq(t.l.k[i].k.fired, 1);
        ck_assert_int_eq(t.l.k[i].k.code, PGS_ECONN);
    }
    th_close(b, c);
    th_loop_end(b);
    ck_assert_int_eq(first.fired, 1);
}
END_TEST

START_TEST(test_close_in_the_same_turn_as_a_lone_statement)
{
    free(th_scalar("CREATE TABLE IF NOT EXISTS conn_held (x int)", 0, NULL));
    free(th_scalar("TRUNCATE conn_held", 0, NULL));
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    const char *sql = "INSERT INTO conn_held VALUES ($1::int)";
    const char *one[] = {"1"}, *two[] = {"2"};
    warm(b, c, sql, 1, one);
    th_call k = {0};
    ck_assert_int_eq(pgs_query(c, sql, 1, two, th_record, &k), PGS_OK);
    int done = 0;
    ck_assert_int_eq(pgs_conn_close(c, th_count_done, &done), PGS_OK);
    ck_assert_int_eq(k.fired, 0);
    th_loop_end(b);
    ck_assert_int_eq(k.fired, 1);
    ck_assert_int_eq(k.code, PGS_ECLOSED);
    ck_assert_int_eq(done, 1);
    /* It was still held for the end of the loop turn: it never reached the server. */
    ck_assert_int_eq(th_scalar_long("SELECT count(*) FROM conn_held", 0, NULL), 1);
}
END_TEST

/* ---- notices and notifications ---- */

typedef struct notify_rec {
    int fired;
    char channel[64];
    char payload[64];
    int pid;
} notify_rec;

static void on_notify_rec(pgs_conn *c, const PGnotify *n, void *arg)
{
    (void)c;
    notify_rec *r = arg;
    r->fired++;
    snprintf(r->channel, sizeof r->channel, "%s", n->relname);
    snprintf(r->payload, sizeof r->payload, "%s", n->extra);
    r->pid = n->be_pid;
}

START_TEST(test_notify_from_another_connection_reaches_listener)
{
    struct event_base *b = th_loop_begin();
    notify_rec r = {0};
    pgs_conn_opts o = {.on_notify = on_notify_rec, .notify_arg = &r};
    pgs_conn *c = th_open(b, &o);
    th_call listened = {0};
    ck_assert_int_eq(pgs_query(c, "LISTEN pgs_chan", 0, NULL, th_record, &listened), PGS_OK);
    th_run_until(b, &listened.fired, 5);
    ck_assert_int_eq(listened.code, PGS_OK);
    const char *v[] = {"it's; a payload"};
    free(th_scalar("SELECT pg_notify('pgs_chan', $1)", 1, v));
    th_run_until(b, &r.fired, 5);
    ck_assert_str_eq(r.channel, "pgs_chan");
    ck_assert_str_eq(r.payload, "it's; a payload");
    ck_assert_int_ne(r.pid, th_backend_pid(c));
    th_close(b, c);
    th_loop_end(b);
    ck_assert_int_eq(r.fired, 1);
}
END_TEST

typedef struct notice_rec {
    int fired;
    char message[128];
    char severity[16];
} notice_rec;

static void on_notice_rec(pgs_conn *c, const PGresult *res, void *arg)
{
    (void)c;
    notice_rec *r = arg;
    r->fired++;
    snprintf(r->message, sizeof r->message, "%s",
             PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY));
    snprintf(r->severity, sizeof r->severity, "%s",
             PQresultErrorField(res, PG_DIAG_SEVERITY_NONLOCALIZED));
}

START_TEST(test_notice_reaches_callback)
{
    struct event_base *b = th_loop_begin();
    notice_rec r = {0};
    pgs_conn_opts o = {.on_notice = on_notice_rec, .notice_arg = &r};
    pgs_conn *c = th_open(b, &o);
    th_call k = {0};
    ck_assert_int_eq(pgs_query(c, "DO $$ BEGIN RAISE NOTICE 'hello %', 42; END $$", 0, NULL,
                               th_record, &k),
                     PGS_OK);
    th_run_until(b, &k.fired, 5);
    ck_assert_int_eq(k.code, PGS_OK);
    ck_assert_int_eq(r.fired, 1);
    ck_assert_str_eq(r.message, "hello 42");
    ck_assert_str_eq(r.severity, "NOTICE");
    th_close(b, c);
    th_loop_end(b);
}
END_TEST

/* ---- conninfo parse errors ---- */


/* libpq's reason for a conninfo that does not parse quotes a piece of it (a word, a URI piece,
 * the whole URI), and that piece can be the password or part of it. */
static void assert_parse_errors_hide_the_password(void)
{
    static const char *const bad[] = {
        "postgresql://u:Xyzzy%zzs3cret@127.0.0.1/db",            /* bad %-encoding, userinfo */
        "postgresql://u@127.0.0.1/db?password=Xyzzy%zzs3cret",   /* ... in the query */
        "postgresql://u:s3cret%00W0rd@127.0.0.1/db",             /* %00 */
        "host=127.0.0.1 s3cretW0rd",                             /* a bare word */
        "host=127.0.0.1 password=s3cret W0rd",                   /* an unquoted space */
        "host=127.0.0.1 password=s3cret W0rd=x",                 /* ... that looks like an option */
        "host=127.0.0.1 password='s3cretW0rd",                   /* unterminated quote */
        "host=127.0.0.1 !\"s3cretW0rd",                          /* a quote inside the word */
        "postgresql://u:s3cretW0rd@[::1",                        /* the whole URI is quoted */
        "postgresql://u:s3cretW0rd@[::1]x/db",
        "postgresql://u:s3cretW0rd@[]/db",
        "postgresql://127.0.0.1/db?password=s3cret&W0rd=x",      /* an unencoded & */
        "postgresql://u:=\" s3cret \"W0rd%zz@127.0.0.1/db",      /* quotes and spaces */
    };
    static const char *const secrets[] = {"Xyzzy%zzs3cret", "s3cretW0rd", "=\" s3cret \"W0rd"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        /* on_open once, PGS_EINVAL, a reason, and no four-character piece of a password */
        pgs_error e = open_fails(bad[i], NULL, PGS_EINVAL);
        ck_assert_msg(strncmp(e.message, "invalid connection string: ", 27) == 0 &&
                          strlen(e.message) > 27,
                      "%s: %s", bad[i], e.message);
        for (size_t s = 0; s < sizeof secrets / sizeof *secrets; s++)
            for (const char *p = secrets[s]; strlen(p) >= 4; p++) {
                char piece[5];
                memcpy(piece, p, 4);
                piece[4] = '\0';
                if (strchr(piece, ' ') || strchr(piece, '"') || strchr(piece, '='))
                    continue; /* punctuation, not a secret */
                ck_assert_msg(!strstr(e.message, piece), "%s: \"%s\" shows in: %s", bad[i],
                              piece, e.message);
            }
    }
}

START_TEST(test_conninfo_parse_errors_never_show_the_password)
{
    assert_parse_errors_hide_the_password();
    /* Translated, libpq quotes with other marks (German: »...«): same guarantee. Runs only
     * where a UTF-8 locale exists; libpq's German catalogue may be absent (then English). */
    if (setlocale(LC_ALL, "C.UTF-8")) {
        setenv("LANGUAGE", "de", 1);
        assert_parse_errors_hide_the_password();
        unsetenv("LANGUAGE");
        setlocale(LC_ALL, "C");
    }
}
END_TEST

/* ---- the same code whatever the cache did, and the server's reason on a loss ---- */

static void count_notice(pgs_conn *c, const PGresult *res, void *arg)
{
    (void)c;
    (void)res;
    (*(int *)arg)++;
}

typedef struct txdone_rec {
    int fired;
    pgs_tx_outcome outcome;
    char sqlstate[6];
} txdone_rec;

static void on_txdone_rec(const pgs_tx_result *r, void *arg)
{
    txdone_rec *d = arg;
    d->fired++;
    d->outcome = r->outcome;
    if (r->err)
        memcpy(d->sqlstate, r->err->sqlstate, sizeof d->sqlstate);
}

/* The backend is terminated while the statement waits for a lock: in its Parse when it is new
 * to the statement cache, in its Bind when cached. Either way the statement hears PGS_ECONN
 * with the server's 57P01, never a code that depends on the cache. */
START_TEST(test_backend_terminated_in_parse_or_bind_is_econn_cached_or_not)
{
    free(th_scalar("DROP TABLE IF EXISTS conn_parse_lock", 0, NULL));
    free(th_scalar("CREATE TABLE conn_parse_lock (id int)", 0, NULL));
    const char *sqls[] = {"SELECT count(*) FROM conn_parse_lock WHERE id > 0",
                          "SELECT count(*) FROM conn_parse_lock"};
    for (int cached = 0; cached < 2; cached++) {
        struct event_base *b = th_loop_begin();
        pgs_conn *c = th_open(b, NULL);
        if (cached)
            warm(b, c, sqls[cached], 0, NULL);
        int pid = th_backend_pid(c);
        PGconn *blocker = th_lock_table("conn_parse_lock", "ACCESS EXCLUSIVE");
        th_call k = {0}, next = {0};
        ck_assert_int_eq(pgs_query(c, sqls[cached], 0, NULL, th_record, &k), PGS_OK);
        ck_assert_int_eq(pgs_query(c, "SELECT 2", 0, NULL, th_record, &next), PGS_OK);
        th_run_for(b, 0.3);
        th_terminate(pid);
        th_run_until(b, &next.fired, 10);
        th_unlock(blocker);
        ck_assert_msg(k.code == PGS_ECONN, "%s: %s %s", cached ? "cached" : "new",
                      pgs_strerror(k.code), k.message);
        ck_assert_str_eq(k.sqlstate, "57P01");
        ck_assert_int_eq(k.fired, 1);
        ck_assert_int_eq(next.code, PGS_ECONN);
        ck_assert_str_eq(next.sqlstate, "57P01");
        th_close(b, c);
        th_loop_end(b);
    }
}
END_TEST

/* The server says why it closes an idle session (a FATAL the client reads as a notice): the
 * loss carries that reason and SQLSTATE, to on_lost and to what comes after. */
START_TEST(test_server_reason_for_closing_reaches_on_lost)
{
    struct event_base *b = th_loop_begin();
    for (int guarded = 0; guarded < 2; guarded++) {
        lost_rec l = {0};
        int notices = 0;
        pgs_conn_opts o = {.on_lost = on_lost_rec, .lost_arg = &l, .on_notice = count_notice,
                           .notice_arg = &notices};
        pgs_conn *c =
            th_open_at(b, th_conninfo("options='-c idle_in_transaction_session_timeout=200'"), &o);
        th_call k = {0};
        pgs_tx *tx = NULL;
        if (guarded) { /* a transaction guard left open and idle */
            ck_assert_int_eq(pgs_tx_begin(c, NULL, NULL, NULL, &tx), PGS_OK);
            ck_assert_int_eq(pgs_tx_query(tx, "SELECT 1", 0, NULL, th_record, &k), PGS_OK);
        } else { /* the user's own BEGIN */
            ck_assert_int_eq(pgs_query(c, "BEGIN", 0, NULL, th_record, &k), PGS_OK);
        }
        th_run_until(b, &k.fired, 10);
        ck_assert_int_eq(k.code, PGS_OK);
        /* Inside a transaction guard the server is never idle in transaction (its statements
         * are pipelined without a sync): an administrator terminates it instead. */
        if (guarded)
            th_terminate(th_backend_pid(c));
        th_run_until(b, &l.fired, 10);
        ck_assert_int_eq(l.err.code, PGS_ECONN);
        const char *want = guarded ? "57P01" : "25P03";
        ck_assert_msg(strcmp(l.err.sqlstate, want) == 0, "%s %s", l.err.sqlstate, l.err.message);
        ck_assert_msg(strstr(l.err.message, guarded ? "administrator" : "idle-in-transaction"),
                      "%s", l.err.message);
        ck_assert_int_eq(notices, 0); /* the FATAL is the loss's reason, not a notice */
        if (tx) {
            txdone_rec d = {0};
            ck_assert_int_eq(pgs_tx_end(tx, 1, on_txdone_rec, &d), PGS_OK);
            th_run_until(b, &d.fired, 10);
            ck_assert_int_eq(d.outcome, PGS_TX_ROLLED_BACK);
            ck_assert_str_eq(d.sqlstate, "57P01");
        } else {
            ck_assert_int_eq(pgs_query(c, "SELECT 1", 0, NULL, th_record, &k), PGS_ECONN);
        }
        th_close(b, c);
        ck_assert_int_eq(l.fired, 1);
    }
    th_loop_end(b);
}
END_TEST

/* ---- the loop while a guard connects ---- */


/* A Kerberos configuration that takes 300 ms to read, as a krb5.conf on a slow network share
 * would: a FIFO that a thread opens for writing (the reader then sees an empty file) only from
 * then on. */
typedef struct slow_krb5 {
    char path[64];
    pthread_t tid;
    atomic_int stop;
} slow_krb5;

static void *slow_krb5_feed(void *arg)
{
    slow_krb5 *k = arg;
    usleep(300 * 1000);
    while (!atomic_load(&k->stop)) {
        int fd = open(k->path, O_WRONLY | O_NONBLOCK); /* succeeds only while someone reads */
        if (fd >= 0)
            close(fd);
        usleep(1000);
    }
    return NULL;
}

/* A 1 ms timer that records the longest gap between its firings: how long the loop stood. */
typedef struct gap_rec {
    struct event *ev;
    double last, longest; /* ms */
} gap_rec;

static void on_gap_tick(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    gap_rec *g = arg;
    double now = th_now() * 1000;
    if (now - g->last > g->longest)
        g->longest = now - g->last;
    g->last = now;
}

START_TEST(test_connect_does_not_stall_the_loop)
{
    /* libpq's own default, gssencmode=prefer, looks for Kerberos credentials inside
     * PQconnectPoll at the first TCP connect of a process (each test runs in a child of its own,
     * and the suite's parent connects nowhere): on the loop thread, for as long as Kerberos
     * takes. A slow Kerberos makes such a stall certain. */
    slow_krb5 k = {0};
    snprintf(k.path, sizeof k.path, "/tmp/pgscope-krb5-%d.conf", (int)getpid());
    unlink(k.path);
    ck_assert_int_eq(mkfifo(k.path, 0600), 0);
    setenv("KRB5_CONFIG", k.path, 1);
    ck_assert_int_eq(pthread_create(&k.tid, NULL, slow_krb5_feed, &k), 0);
    /* A listener that never answers: measured is the client's part of the handshake up to the
     * server's first answer, where that look happens. (The password exchange after it costs
     * what SCRAM costs on every connect: 4096 HMAC rounds, 3-9 ms, 20-60 ms under ASan.) */
    int port;
    int lfd = th_silent_listener(&port);
    char ci[128];
    snprintf(ci, sizeof ci, "host=127.0.0.1 port=%d user=x dbname=x", port);
    struct event_base *b = th_loop_begin();
    gap_rec g = {0};
    g.ev = event_new(b, -1, EV_PERSIST, on_gap_tick, &g);
    struct timeval ms = {0, 1000};
    ck_assert_int_eq(event_add(g.ev, &ms), 0);
    th_open_rec r = {0};
    pgs_conn *c = NULL;
    g.last = th_now() * 1000;
    ck_assert_int_eq(pgs_conn_open(b, ci, NULL, th_on_open, &r, &c), PGS_OK);
    th_run_for(b, 0.4);
    event_free(g.ev);
    th_close(b, c);
    atomic_store(&k.stop, 1);
    pthread_join(k.tid, NULL);
    unsetenv("KRB5_CONFIG");
    unlink(k.path);
    th_loop_end(b);
    close(lfd);
    ck_assert_int_eq(r.fired, 1); /* PGS_ECLOSED */
    ck_assert_msg(g.longest < 20, "the loop stood still for %.1f ms while a guard connected",
                  g.longest);
}
END_TEST

static const char *gssencmode_of(pgs_conn *c)
{
    static char v[16];
    PQconninfoOption *opts = PQconninfo(pgs_conn_pgconn(c));
    ck_assert_ptr_nonnull(opts);
    snprintf(v, sizeof v, "(none)");
    for (PQconninfoOption *o = opts; o->keyword; o++)
        if (strcmp(o->keyword, "gssencmode") == 0 && o->val)
            snprintf(v, sizeof v, "%s", o->val);
    PQconninfoFree(opts);
    return v;
}

START_TEST(test_gssencmode_is_disable_unless_asked_for)
{
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open(b, NULL);
    ck_assert_str_eq(gssencmode_of(c), "disable");
    th_close(b, c);
    /* asked for in the conninfo */
    c = th_open_at(b, th_conninfo("gssencmode=prefer"), NULL);
    ck_assert_str_eq(gssencmode_of(c), "prefer");
    th_close(b, c);
    /* in the environment */
    setenv("PGGSSENCMODE", "prefer", 1);
    c = th_open(b, NULL);
    unsetenv("PGGSSENCMODE");
    ck_assert_str_eq(gssencmode_of(c), "prefer");
    th_close(b, c);
    /* in a service file */
    char path[64];
    snprintf(path, sizeof path, "/tmp/pgscope-service-%d.conf", (int)getpid());
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    fputs("[pgs_gss]\ngssencmode=prefer\n", f);
    fclose(f);
    setenv("PGSERVICEFILE", path, 1);
    c = th_open_at(b, th_conninfo("service=pgs_gss"), NULL);
    unsetenv("PGSERVICEFILE");
    unlink(path);
    ck_assert_str_eq(gssencmode_of(c), "prefer");
    th_close(b, c);
    th_loop_end(b);
}
END_TEST

static Suite *conn_suite(void)
{
    Suite *s = suite_create("conn");
    TCase *t = tcase_create("conn");
    tcase_set_timeout(t, 30);
    tcase_add_test(t, test_params_come_back_verbatim_no_injection);
    tcase_add_test(t, test_typed_params_and_null);
    tcase_add_test(t, test_hundred_queued_run_in_order_failure_isolated);
    tcase_add_test(t, test_multiple_statements_in_one_string_rejected);
    tcase_add_test(t, test_queries_queued_while_connecting_run_after_connect);
    tcase_add_test(t, test_statements_are_prepared_once_and_errors_stay_their_own);
    tcase_add_test(t, test_statement_cache_can_be_turned_off);
    tcase_add_test(t, test_stale_statement_fails_once_per_use_then_parses_anew);
    tcase_add_test(t, test_connect_bad_conninfo_syntax);
    tcase_add_test(t, test_conninfo_parse_errors_never_show_the_password);
    tcase_add_test(t, test_connect_does_not_stall_the_loop);
    tcase_add_test(t, test_gssencmode_is_disable_unless_asked_for);
    tcase_add_test(t, test_connect_refused_port);
    tcase_add_test(t, test_connect_wrong_password);
    tcase_add_test(t, test_connect_unknown_database);
    tcase_add_test(t, test_connect_timeout_against_silent_listener);
    tcase_add_test(t, test_connect_timeout_from_the_environment);
    tcase_add_test(t, test_host_name_resolved_through_evdns);
    tcase_add_test(t, test_unresolvable_host_fails_with_reason_then_next_host_used);
    tcase_add_test(t, test_close_while_connecting);
    tcase_add_test(t, test_close_while_host_name_is_looked_up);
    tcase_add_test(t, test_close_while_statement_runs);
    tcase_add_test(t, test_close_with_ten_queued);
    tcase_add_test(t, test_close_from_inside_a_result_callback);
    tcase_add_test(t, test_misuse_gets_codes_not_crashes);
    tcase_add_test(t, test_copy_is_refused_clearly);
    tcase_add_test(t, test_cancel_long_statement);
    tcase_add_test(t, test_cancel_request_that_stalls_is_bounded);
    tcase_add_test(t, test_cancel_while_connecting);
    tcase_add_test(t, test_terminated_backend_mid_statement_is_econn);
    tcase_add_test(t, test_terminated_idle_backend_reported_by_on_lost);
    tcase_add_test(t, test_lone_statement_goes_alone_and_a_burst_in_one_round_trip);
    tcase_add_test(t, test_statements_queued_while_one_runs_alone_follow_it_in_order);
    tcase_add_test(t, test_backend_lost_while_one_runs_alone_fails_the_waiting_once);
    tcase_add_test(t, test_close_in_the_same_turn_as_a_lone_statement);
    tcase_add_test(t, test_notify_from_another_connection_reaches_listener);
    tcase_add_test(t, test_notice_reaches_callback);
    tcase_add_test(t, test_backend_terminated_in_parse_or_bind_is_econn_cached_or_not);
    tcase_add_test(t, test_server_reason_for_closing_reaches_on_lost);
    suite_add_tcase(s, t);
    return s;
}

int main(void)
{
    return th_run_suite(conn_suite());
}

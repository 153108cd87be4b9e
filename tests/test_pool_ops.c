/* The pool's operations against the real server: a request's own timeout
 * (pgs_pool_acquire_within) and the words of every failure, the counters kept exactly and
 * their reset, setup statements on every new connection and again after every session reset,
 * a setup that fails (never handed out, counted, reported, recovered from), and the pool's
 * hooks (acquire, conn_replaced). The pool's basics are tests/test_pool.c's. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "helpers.h"

/* ---- what the hooks saw ---- */

typedef struct hook_log {
    int acquires;
    int by_code[PGS_EAGAIN + 1];
    long long wait_us[PGS_EAGAIN + 1];
    pgs_pool_counts in_acquire; /* pgs_pool_stats from inside the acquire hook */
    int replaced, replaced_null;
    pgs_error why; /* the last conn_replaced's */
    pgs_pool_counts in_replaced;
    int stmt_ends; /* statement hooks of pooled connections, for "SELECT 'hooked'" */
} hook_log;

static hook_log hk;

static void on_acquire_hook(pgs_pool *pool, const pgs_acquire_trace *t, void *arg)
{
    ck_assert_ptr_eq(arg, &hk);
    hk.acquires++;
    hk.by_code[t->code]++;
    hk.wait_us[t->code] = t->wait_us;
    pgs_pool_stats(pool, &hk.in_acquire); /* read-only calls from inside are safe */
}

static void on_replaced_hook(pgs_pool *pool, pgs_conn *conn, const pgs_error *why, void *arg)
{
    (void)arg;
    ck_assert_ptr_nonnull(conn);
    hk.replaced++;
    if (why)
        hk.why = *why;
    else
        hk.replaced_null++;
    pgs_pool_stats(pool, &hk.in_replaced);
}

static void on_stmt_end_hook(pgs_conn *conn, const pgs_stmt_trace *t, void *arg)
{
    (void)conn;
    (void)arg;
    if (strcmp(t->sql, "SELECT 'hooked'") == 0)
        hk.stmt_ends++;
}

static const pgs_hooks pool_hooks = {
    .acquire = on_acquire_hook,
    .conn_replaced = on_replaced_hook,
    .stmt_end = on_stmt_end_hook,
    .arg = &hk,
};

/* ---- requests ---- */

typedef struct got {
    int fired;
    pgs_conn *conn;
    pgs_code code;
    char sqlstate[6];
    char message[512];
    double at;
    int hooks_before; /* acquire hooks fired when the callback ran */
} got;

static void on_got(pgs_conn *conn, const pgs_error *err, void *arg)
{
    got *g = arg;
    g->fired++;
    g->conn = conn;
    g->code = err ? err->code : PGS_OK;
    g->at = th_now();
    g->hooks_before = hk.acquires;
    if (err) {
        memcpy(g->sqlstate, err->sqlstate, sizeof g->sqlstate);
        snprintf(g->message, sizeof g->message, "%s", err->message);
    }
}

static pgs_pool *pool_at(struct event_base *b, const char *conninfo, pgs_pool_opts o)
{
    pgs_pool *p = NULL;
    ck_assert_int_eq(pgs_pool_new(b, conninfo, &o, &p), PGS_OK);
    return p;
}

/* A guard, however short the pool's own timeout (a connect with SCRAM may take a while). */
static pgs_conn *acquire_now(struct event_base *b, pgs_pool *p)
{
    got g = {0};
    ck_assert_int_eq(pgs_pool_acquire_within(p, 15000, on_got, &g, NULL), PGS_OK);
    th_run_until(b, &g.fired, 15);
    ck_assert_msg(g.code == PGS_OK, "acquire failed: %s", g.message);
    return g.conn;
}

static void close_pool(struct event_base *b, pgs_pool *p)
{
    int done = 0;
    ck_assert_int_eq(pgs_pool_close(p, th_count_done, &done), PGS_OK);
    th_run_until(b, &done, 15);
    ck_assert_int_eq(done, 1);
}

/* Run a statement on a guard and return its first value (it must succeed). */
static const char *value_of(struct event_base *b, pgs_conn *c, const char *sql)
{
    static th_call k;
    memset(&k, 0, sizeof k);
    ck_assert_int_eq(pgs_query(c, sql, 0, NULL, th_record, &k), PGS_OK);
    th_run_until(b, &k.fired, 10);
    ck_assert_msg(k.code == PGS_OK, "%s: %s", sql, k.message);
    return k.value;
}

static pgs_pool_counts stats(pgs_pool *p)
{
    pgs_pool_counts st;
    pgs_pool_stats(p, &st);
    return st;
}

/* Run the loop until `field` of the counts reaches want (or fail after seconds). */
#define WAIT_COUNT(b, p, field, want, seconds)                                                     \
    do {                                                                                           \
        double end_ = th_now() + (seconds);                                                        \
        while (stats(p).field != (want)) {                                                         \
            ck_assert_msg(th_now() < end_, #field " stuck at %ld, not %ld",                        \
                          (long)stats(p).field, (long)(want));                                     \
            th_run_for(b, 0.02);                                                                   \
        }                                                                                          \
    } while (0)

static void assert_has(const char *text, const char *part)
{
    ck_assert_msg(strstr(text, part), "\"%s\" not in \"%s\"", part, text);
}

/* ---- a request's own timeout ---- */

START_TEST(test_request_timeout_shorter_and_longer_than_the_pools)
{
    struct event_base *b = th_loop_begin();
    pgs_pool_opts o = {.min_size = 1, .max_size = 1, .acquire_timeout_ms = 1000};
    pgs_pool *p = pool_at(b, th_conninfo("application_name=pgs_ops_within"), o);
    pgs_conn *held = acquire_now(b, p);
    got zero = {0}, shorter = {0}, longer = {0}, pools = {0}, forever = {0};
    ck_assert_int_eq(pgs_pool_acquire_within(p, 0, on_got, &zero, NULL), PGS_EINVAL);
    ck_assert_int_eq(pgs_pool_acquire_within(NULL, 100, on_got, &zero, NULL), PGS_EINVAL);
    double t0 = th_now();
    ck_assert_int_eq(pgs_pool_acquire_within(p, 200, on_got, &shorter, NULL), PGS_OK);
    ck_assert_int_eq(pgs_pool_acquire_within(p, 2500, on_got, &longer, NULL), PGS_OK);
    ck_assert_int_eq(pgs_pool_acquire(p, on_got, &pools, NULL), PGS_OK);
    ck_assert_int_eq(pgs_pool_acquire_within(p, -1, on_got, &forever, NULL), PGS_OK);

    th_run_until(b, &shorter.fired, 5); /* its own 200 ms, before the pool's 1000 */
    ck_assert_int_eq(shorter.code, PGS_ETIMEDOUT);
    ck_assert_ptr_null(shorter.conn);
    ck_assert_msg(shorter.at - t0 >= 0.15 && shorter.at - t0 < 0.9, "after %.3f s",
                  shorter.at - t0);
    assert_has(shorter.message, "within 200 ms");
    assert_has(shorter.message, "this request's timeout");
    assert_has(shorter.message, "max_size 1, all in use, 4 waiting");

    th_run_until(b, &pools.fired, 5); /* the pool's acquire_timeout_ms */
    ck_assert_int_eq(pools.code, PGS_ETIMEDOUT);
    ck_assert_msg(pools.at - t0 >= 0.9 && pools.at - t0 < 2.2, "after %.3f s", pools.at - t0);
    assert_has(pools.message, "within 1000 ms");
    assert_has(pools.message, "the pool's acquire_timeout_ms");
    assert_has(pools.message, "3 waiting");
    ck_assert_int_eq(longer.fired, 0); /* its own 2500 ms outlast the pool's */

    th_run_until(b, &longer.fired, 5);
    ck_assert_int_eq(longer.code, PGS_ETIMEDOUT);
    ck_assert_msg(longer.at - t0 >= 2.3 && longer.at - t0 < 4.5, "after %.3f s", longer.at - t0);
    assert_has(longer.message, "within 2500 ms");
    assert_has(longer.message, "this request's timeout");
    ck_assert_int_eq(forever.fired, 0); /* no limit: still waiting, past every other */

    th_close(b, held);
    th_run_until(b, &forever.fired, 5);
    ck_assert_int_eq(forever.code, PGS_OK);
    th_close(b, forever.conn);
    pgs_pool_counts st = stats(p);
    ck_assert_int_eq(st.requests, 5);
    ck_assert_int_eq(st.acquired, 2);
    ck_assert_int_eq(st.timed_out, 3);
    ck_assert_int_eq(zero.fired, 0);
    close_pool(b, p);
    th_loop_end(b);
}
END_TEST

/* The counts as the pool's close's done sees them (the handle's last moment). */
typedef struct final_counts {
    pgs_pool *pool;
    pgs_pool_counts st;
    int done;
} final_counts;

static void counts_at_done(void *arg)
{
    final_counts *f = arg;
    f->done++;
    pgs_pool_stats(f->pool, &f->st);
}

START_TEST(test_unreachable_server_and_close_name_their_cause)
{
    struct event_base *b = th_loop_begin();
    char ci[160];
    snprintf(ci, sizeof ci, "host=127.0.0.1 port=%d dbname=nobody user=nobody", th_closed_port());
    pgs_pool_opts o = {.max_size = 2, .acquire_timeout_ms = 30000};
    pgs_pool *p = pool_at(b, ci, o);
    got down = {0}, waiter = {0};
    double t0 = th_now();
    ck_assert_int_eq(pgs_pool_acquire_within(p, 300, on_got, &down, NULL), PGS_OK);
    th_run_until(b, &down.fired, 10);
    ck_assert_int_eq(down.code, PGS_ECONNECT);
    ck_assert_double_lt(down.at - t0, 2.0);
    assert_has(down.message, "within 300 ms");
    assert_has(down.message, "this request's timeout");
    assert_has(down.message, "the last new connection failed");
    ck_assert_int_eq(pgs_pool_acquire(p, on_got, &waiter, NULL), PGS_OK);
    final_counts fin = {.pool = p};
    ck_assert_int_eq(pgs_pool_close(p, counts_at_done, &fin), PGS_OK);
    th_run_until(b, &fin.done, 10);
    ck_assert_int_eq(waiter.fired, 1);
    ck_assert_int_eq(waiter.code, PGS_ECLOSED);
    assert_has(waiter.message, "the pool was closed");
    pgs_pool_counts st = fin.st;
    ck_assert_int_eq(st.requests, 2);
    ck_assert_int_eq(st.failed_connect, 1);
    ck_assert_int_eq(st.timed_out, 1);
    ck_assert_int_eq(st.closed, 1);
    ck_assert_int_eq(st.acquired, 0);
    ck_assert_int_eq(st.opened, 0);
    ck_assert_uint_ge(st.connect_failures, 1);
    th_loop_end(b);
}
END_TEST

/* ---- the counters ---- */

START_TEST(test_counters_exact_for_a_scripted_sequence_and_reset_keeps_gauges)
{
    memset(&hk, 0, sizeof hk);
    struct event_base *b = th_loop_begin();
    pgs_pool_opts o = {.max_size = 2, .max_waiting = 1, .acquire_timeout_ms = 300,
                       .hooks = &pool_hooks};
    pgs_pool *p = pool_at(
        b, th_conninfo("application_name=pgs_ops_stats options='-c lock_timeout=300'"), o);
    /* two grants */
    pgs_conn *a = acquire_now(b, p);
    pgs_conn *c = acquire_now(b, p);
    /* a timeout, and a refusal while it waits */
    got timeout = {0}, busy = {0}, cancel = {0};
    ck_assert_int_eq(pgs_pool_acquire(p, on_got, &timeout, NULL), PGS_OK);
    ck_assert_int_eq(pgs_pool_acquire(p, on_got, &busy, NULL), PGS_EBUSY);
    th_run_until(b, &timeout.fired, 5);
    ck_assert_int_eq(timeout.code, PGS_ETIMEDOUT);
    /* a cancel */
    pgs_pool_req *req;
    ck_assert_int_eq(pgs_pool_acquire(p, on_got, &cancel, &req), PGS_OK);
    ck_assert_int_eq(pgs_pool_acquire_cancel(req), PGS_OK);
    th_run_until(b, &cancel.fired, 5);
    ck_assert_int_eq(cancel.code, PGS_ECANCELED);
    /* a connection terminated while in use: lost, and replaced once its user lets go */
    int pid = th_backend_pid(c);
    th_terminate(pid);
    th_wait_backend_gone(pid, 10);
    th_call k = {0};
    int rc = pgs_query(c, "SELECT 1", 0, NULL, th_record, &k);
    if (rc == PGS_OK) {
        th_run_until(b, &k.fired, 10);
        rc = k.code;
    }
    ck_assert_int_eq(rc, PGS_ECONN);
    th_close(b, c);
    ck_assert_int_eq(hk.replaced, 1);
    ck_assert_int_eq(hk.why.code, PGS_ECONN);
    ck_assert_int_eq(hk.in_replaced.lost, 1); /* counted before the hook ran */
    /* a failed reset: another session locks the guard's temporary table, DISCARD TEMP waits,
     * lock_timeout ends it */
    value_of(b, a, "CREATE TEMP TABLE pgs_ops_locked (x int)");
    char table[160];
    snprintf(table, sizeof table, "%s.pgs_ops_locked",
             value_of(b, a, "SELECT pg_my_temp_schema()::regnamespace::text"));
    PGconn *blocker = th_lock_table(table, "ACCESS SHARE");
    th_close(b, a); /* idle: its reset goes out now */
    WAIT_COUNT(b, p, resets_failed, 1, 10);
    th_unlock(blocker);
    WAIT_COUNT(b, p, size, 0, 10);
    ck_assert_int_eq(hk.replaced, 2);
    ck_assert_str_eq(hk.why.sqlstate, "55P03");

    pgs_pool_counts st = stats(p);
    ck_assert_int_eq(st.requests, 4); /* the refused one is not among them */
    ck_assert_int_eq(st.refused_busy, 1);
    ck_assert_int_eq(st.acquired, 2);
    ck_assert_int_eq(st.timed_out, 1);
    ck_assert_int_eq(st.failed_connect, 0);
    ck_assert_int_eq(st.canceled, 1);
    ck_assert_int_eq(st.closed, 0);
    ck_assert_int_eq(st.opened, 2);
    ck_assert_int_eq(st.connect_failures, 0);
    ck_assert_int_eq(st.lost, 1);
    ck_assert_int_eq(st.setup_failures, 0);
    ck_assert_int_eq(st.resets_failed, 1);
    ck_assert_int_eq(st.reset, 1);    /* only the clean return was reset */
    ck_assert_int_eq(st.replaced, 2); /* the lost one, the one whose reset failed */
    ck_assert_msg(st.wait_max_ms > 0 && st.wait_max_ms <= st.wait_total_ms &&
                      st.wait_total_ms < 10000,
                  "waits: total %.3f max %.3f", st.wait_total_ms, st.wait_max_ms);
    ck_assert_int_eq(st.requests, st.acquired + st.timed_out + st.canceled + st.closed);
    ck_assert_int_eq(st.size + st.idle + st.in_use + st.waiting, 0);

    /* the reset zeroes what accumulates; the gauges are the pool's state and stay */
    a = acquire_now(b, p);
    c = acquire_now(b, p);
    got closed = {0};
    ck_assert_int_eq(pgs_pool_acquire(p, on_got, &closed, NULL), PGS_OK);
    pgs_pool_stats_reset(p);
    st = stats(p);
    ck_assert_int_eq(st.size, 2);
    ck_assert_int_eq(st.in_use, 2);
    ck_assert_int_eq(st.waiting, 1);
    ck_assert_int_eq(st.idle, 0);
    ck_assert(st.acquired == 0 && st.timed_out == 0 && st.canceled == 0 && st.replaced == 0 &&
              st.reset == 0 && st.connect_failures == 0 && st.requests == 0 &&
              st.refused_busy == 0 && st.failed_connect == 0 && st.closed == 0 &&
              st.opened == 0 && st.lost == 0 && st.setup_failures == 0 &&
              st.resets_failed == 0 && st.wait_total_ms == 0 && st.wait_max_ms == 0);
    /* and counts on from zero: the waiter fails with the pool's close */
    int done = 0;
    ck_assert_int_eq(pgs_pool_close(p, th_count_done, &done), PGS_OK);
    th_run_until(b, &closed.fired, 5);
    ck_assert_int_eq(closed.code, PGS_ECLOSED);
    st = stats(p);
    ck_assert_int_eq(st.closed, 1);
    ck_assert_int_eq(st.requests, 0);
    th_close(b, a);
    th_close(b, c);
    th_run_until(b, &done, 10);
    ck_assert_int_eq(hk.replaced, 2); /* the pool's close replaces nothing */
    th_loop_end(b);
}
END_TEST

/* ---- setup statements ---- */

static const char *const setup_sql[] = {
    "SET search_path TO pgs_ops_s, public",
    "LISTEN pgs_ops_chan",
    "PREPARE pgs_ops_p AS SELECT 'prepared'::text",
    "SELECT nextval('public.pgs_ops_setup_runs')", /* counts the runs */
    NULL,
};

typedef struct notified {
    int fired;
    pgs_conn *conn;
    char channel[64], payload[64];
} notified;

static void on_notify(pgs_conn *c, const PGnotify *n, void *arg)
{
    notified *nt = arg;
    nt->fired++;
    nt->conn = c;
    snprintf(nt->channel, sizeof nt->channel, "%s", n->relname);
    snprintf(nt->payload, sizeof nt->payload, "%s", n->extra);
}

static const char *const session_checks[] = {
    "SELECT v FROM where_am_i", /* found through the setup's search_path */
    "SELECT count(*) FROM pg_listening_channels() c WHERE c = 'pgs_ops_chan'",
    "EXECUTE pgs_ops_p",
};
static const char *const session_expected[] = {"in pgs_ops_s", "1", "prepared"};
enum { NCHECKS = 3 };

static void assert_set_up(struct event_base *b, pgs_conn *c)
{
    for (int i = 0; i < NCHECKS; i++)
        ck_assert_str_eq(value_of(b, c, session_checks[i]), session_expected[i]);
}

/* A waiter's statements, queued in its acquire callback: they share the reset's segment (and
 * the setup's inside it). The first fails: it must not undo the setup. */
static th_call waiter_calls[NCHECKS + 1];

static void got_then_check(pgs_conn *c, const pgs_error *err, void *arg)
{
    on_got(c, err, arg);
    if (err)
        return;
    ck_assert_int_eq(pgs_query(c, "SELECT 1/0", 0, NULL, th_record, &waiter_calls[0]), PGS_OK);
    for (int i = 0; i < NCHECKS; i++)
        ck_assert_int_eq(
            pgs_query(c, session_checks[i], 0, NULL, th_record, &waiter_calls[i + 1]), PGS_OK);
}

static const pgs_pool_reset modes[] = {PGS_RESET_SESSION, PGS_RESET_ALL, PGS_RESET_NONE};

START_TEST(test_setup_in_effect_for_every_user)
{
    pgs_pool_reset mode = modes[_i];
    free(th_scalar("DROP SCHEMA IF EXISTS pgs_ops_s CASCADE", 0, NULL));
    free(th_scalar("CREATE SCHEMA pgs_ops_s", 0, NULL));
    free(th_scalar("CREATE TABLE pgs_ops_s.where_am_i (v text)", 0, NULL));
    free(th_scalar("INSERT INTO pgs_ops_s.where_am_i VALUES ('in pgs_ops_s')", 0, NULL));
    free(th_scalar("DROP SEQUENCE IF EXISTS pgs_ops_setup_runs", 0, NULL));
    free(th_scalar("CREATE SEQUENCE pgs_ops_setup_runs", 0, NULL));
    struct event_base *b = th_loop_begin();
    notified nt = {0};
    pgs_pool_opts o = {.max_size = 1, .reset = mode, .setup_sql = setup_sql,
                       .conn = {.on_notify = on_notify, .notify_arg = &nt}};
    /* (the list is copied: a caller's array may go at once) */
    pgs_pool *p = pool_at(b, th_conninfo("application_name=pgs_ops_setup"), o);

    pgs_conn *first = acquire_now(b, p);
    int pid = th_backend_pid(first);
    assert_set_up(b, first);
    if (mode != PGS_RESET_NONE) { /* undo it by hand: the reset must bring it back anyway */
        value_of(b, first, "SET search_path TO pg_catalog");
        value_of(b, first, "UNLISTEN *");
        value_of(b, first, "DEALLOCATE pgs_ops_p");
    }
    got waiter = {0};
    memset(waiter_calls, 0, sizeof waiter_calls);
    ck_assert_int_eq(pgs_pool_acquire(p, got_then_check, &waiter, NULL), PGS_OK);
    th_close(b, first); /* to the waiter, with the reset owed */
    for (int i = 0; i <= NCHECKS; i++)
        th_run_until(b, &waiter_calls[i].fired, 10);
    ck_assert_int_eq(waiter.code, PGS_OK);
    ck_assert_int_eq(th_backend_pid(waiter.conn), pid); /* the same session */
    ck_assert_int_eq(waiter_calls[0].code, PGS_ESQL);
    ck_assert_str_eq(waiter_calls[0].sqlstate, "22012");
    for (int i = 0; i < NCHECKS; i++) {
        ck_assert_msg(waiter_calls[i + 1].code == PGS_OK, "%s: %s", session_checks[i],
                      waiter_calls[i + 1].message);
        ck_assert_str_eq(waiter_calls[i + 1].value, session_expected[i]);
    }
    /* the setup's LISTEN is in effect for this user: a NOTIFY reaches it */
    free(th_scalar("NOTIFY pgs_ops_chan, 'hello'", 0, NULL));
    th_run_until(b, &nt.fired, 10);
    ck_assert_ptr_eq(nt.conn, waiter.conn);
    ck_assert_str_eq(nt.channel, "pgs_ops_chan");
    ck_assert_str_eq(nt.payload, "hello");
    th_close(b, waiter.conn); /* idle: the reset (and the setup) go out now */

    pgs_conn *third = acquire_now(b, p);
    ck_assert_int_eq(th_backend_pid(third), pid);
    assert_set_up(b, third);
    /* the setup ran once, and again inside each reset */
    pgs_pool_counts st = stats(p);
    long runs = th_scalar_long("SELECT last_value FROM pgs_ops_setup_runs", 0, NULL);
    ck_assert_int_eq(st.reset, mode == PGS_RESET_NONE ? 0 : 2);
    ck_assert_int_eq(runs, 1 + (long)st.reset);
    ck_assert_int_eq(st.opened, 1);
    ck_assert_int_eq(st.setup_failures, 0);
    ck_assert_int_eq(st.resets_failed, 0);
    th_close(b, third);
    close_pool(b, p);
    th_loop_end(b);
}
END_TEST

/* A waiter's statement travels with the reset and the setup after it: one burst on the wire,
 * one reply. And a guard whose only statements in flight are those is clean: closed at once
 * in the acquire callback, it comes back to the pool instead of being replaced. */
static th_call shared_call;
static int closed_at_once;

static void got_then_query(pgs_conn *c, const pgs_error *err, void *arg)
{
    on_got(c, err, arg);
    if (!err)
        ck_assert_int_eq(pgs_query(c, "SHOW search_path", 0, NULL, th_record, &shared_call),
                         PGS_OK);
}

static void got_then_close(pgs_conn *c, const pgs_error *err, void *arg)
{
    on_got(c, err, arg);
    if (!err)
        ck_assert_int_eq(pgs_conn_close(c, th_count_done, &closed_at_once), PGS_OK);
}

START_TEST(test_setup_after_reset_shares_the_next_users_write)
{
    struct event_base *b = th_loop_begin();
    th_proxy *px = th_proxy_start(atoi(th_conninfo_value("port")));
    static const char *const setup[] = {"SET search_path TO pg_catalog, public",
                                        "LISTEN pgs_ops_chan", NULL};
    pgs_pool_opts o = {.max_size = 1, .setup_sql = setup};
    pgs_pool *p = pool_at(b, th_proxy_conninfo(px), o);
    pgs_conn *c = acquire_now(b, p);
    int pid = th_backend_pid(c);
    value_of(b, c, "SET search_path TO public");
    got w = {0};
    memset(&shared_call, 0, sizeof shared_call);
    ck_assert_int_eq(pgs_pool_acquire(p, got_then_query, &w, NULL), PGS_OK);
    th_proxy_reset_turns(px);
    th_close(b, c);
    th_run_until(b, &shared_call.fired, 10);
    ck_assert_int_eq(shared_call.code, PGS_OK);
    ck_assert_str_eq(shared_call.value, "pg_catalog, public");
    ck_assert_int_eq(th_proxy_turns(px), 1); /* reset + setup + the statement: one burst */

    got quick = {0};
    closed_at_once = 0;
    ck_assert_int_eq(pgs_pool_acquire(p, got_then_close, &quick, NULL), PGS_OK);
    th_close(b, w.conn); /* to `quick`, which gives it back with its reset still in flight */
    th_run_until(b, &closed_at_once, 10);
    ck_assert_int_eq(quick.code, PGS_OK);
    c = acquire_now(b, p);
    ck_assert_int_eq(th_backend_pid(c), pid); /* back in the pool, not replaced */
    ck_assert_str_eq(value_of(b, c, "SHOW search_path"), "pg_catalog, public");
    ck_assert_str_eq(
        value_of(b, c, "SELECT count(*) FROM pg_listening_channels() c WHERE c = 'pgs_ops_chan'"),
        "1");
    pgs_pool_counts st = stats(p);
    ck_assert_int_eq(st.replaced, 0);
    ck_assert_int_eq(st.opened, 1);
    ck_assert_int_eq(st.reset, 3); /* every return: the first user's, w's, quick's */
    th_close(b, c);
    close_pool(b, p);
    th_proxy_stop(px);
    th_loop_end(b);
}
END_TEST

static const char *const failing_setup[] = {
    "SET application_name = 'pgs_ops_setupfail'",
    "SELECT count(*) FROM pgs_ops_needed",
    NULL,
};

START_TEST(test_failed_setup_never_handed_out_and_the_pool_recovers)
{
    free(th_scalar("DROP TABLE IF EXISTS pgs_ops_needed", 0, NULL));
    memset(&hk, 0, sizeof hk);
    struct event_base *b = th_loop_begin();
    pgs_pool_opts o = {.min_size = 1, .max_size = 1, .acquire_timeout_ms = 500,
                       .setup_sql = failing_setup, .hooks = &pool_hooks};
    pgs_pool *p = pool_at(b, th_conninfo(NULL), o);
    got w = {0};
    ck_assert_int_eq(pgs_pool_acquire(p, on_got, &w, NULL), PGS_OK);
    th_run_until(b, &w.fired, 10);
    ck_assert_int_eq(w.code, PGS_ECONNECT); /* never the connection whose setup failed */
    ck_assert_ptr_null(w.conn);
    ck_assert_str_eq(w.sqlstate, "42P01");
    assert_has(w.message, "within 500 ms");
    assert_has(w.message, "setup statement 2 of 2 (SELECT count(*) FROM pgs_ops_needed)");
    pgs_pool_counts st = stats(p);
    ck_assert_uint_ge(st.setup_failures, 1);
    ck_assert_msg(st.opened - st.setup_failures <= 1, "opened %lu, setup failed %lu", st.opened,
                  st.setup_failures); /* (one may be in its setup now) */
    ck_assert_int_eq(st.acquired, 0);
    ck_assert_int_eq(st.failed_connect, 1);
    ck_assert_int_eq(st.lost, 0);
    ck_assert_int_eq(hk.replaced, (int)st.setup_failures);
    ck_assert_int_eq(hk.why.code, PGS_ESQL);
    ck_assert_str_eq(hk.why.sqlstate, "42P01");
    /* the statement would succeed now: the pool gets there by itself (min_size) */
    free(th_scalar("CREATE TABLE pgs_ops_needed (x int)", 0, NULL));
    double end = th_now() + 10;
    while (stats(p).idle != 1) {
        ck_assert_msg(th_now() < end, "the pool did not recover");
        th_run_for(b, 0.02);
    }
    pgs_conn *c = acquire_now(b, p);
    ck_assert_str_eq(value_of(b, c, "SHOW application_name"), "pgs_ops_setupfail");
    th_close(b, c);
    close_pool(b, p);
    th_loop_end(b);
}
END_TEST

static th_call after_reset_call;

static void got_then_select(pgs_conn *c, const pgs_error *err, void *arg)
{
    on_got(c, err, arg);
    if (!err)
        ck_assert_int_eq(pgs_query(c, "SELECT 'never'", 0, NULL, th_record, &after_reset_call),
                         PGS_OK);
}

START_TEST(test_setup_failing_after_a_reset_closes_the_guard)
{
    free(th_scalar("DROP TABLE IF EXISTS pgs_ops_needed", 0, NULL));
    free(th_scalar("CREATE TABLE pgs_ops_needed (x int)", 0, NULL));
    memset(&hk, 0, sizeof hk);
    struct event_base *b = th_loop_begin();
    pgs_pool_opts o = {.max_size = 1, .setup_sql = failing_setup, .hooks = &pool_hooks};
    pgs_pool *p = pool_at(b, th_conninfo(NULL), o);
    /* handed to a waiter with the reset: its statement hears why, and never runs */
    pgs_conn *c = acquire_now(b, p);
    int pid = th_backend_pid(c);
    got w = {0};
    memset(&after_reset_call, 0, sizeof after_reset_call);
    ck_assert_int_eq(pgs_pool_acquire(p, got_then_select, &w, NULL), PGS_OK);
    free(th_scalar("DROP TABLE pgs_ops_needed", 0, NULL));
    th_close(b, c);
    th_run_until(b, &after_reset_call.fired, 10);
    ck_assert_int_eq(after_reset_call.code, PGS_ECONN);
    ck_assert_str_eq(after_reset_call.sqlstate, "42P01");
    assert_has(after_reset_call.message, "setup statement 2 of 2");
    assert_has(after_reset_call.message, "after the session reset");
    th_close(b, w.conn);
    th_wait_backend_gone(pid, 10);
    pgs_pool_counts st = stats(p);
    ck_assert_int_eq(st.setup_failures, 1);
    ck_assert_int_eq(st.resets_failed, 0); /* the reset itself went through */
    ck_assert_int_eq(st.lost, 0);
    ck_assert_int_eq(st.replaced, 1);
    ck_assert_int_eq(hk.replaced, 1);
    ck_assert_str_eq(hk.why.sqlstate, "42P01");
    /* idle when it fails: replaced at once */
    free(th_scalar("CREATE TABLE pgs_ops_needed (x int)", 0, NULL));
    c = acquire_now(b, p);
    ck_assert_int_ne(th_backend_pid(c), pid);
    pid = th_backend_pid(c);
    free(th_scalar("DROP TABLE pgs_ops_needed", 0, NULL));
    th_close(b, c);
    WAIT_COUNT(b, p, setup_failures, 2, 10);
    WAIT_COUNT(b, p, size, 0, 10);
    th_wait_backend_gone(pid, 10);
    ck_assert_int_eq(hk.replaced, 2);
    ck_assert_str_eq(hk.why.sqlstate, "42P01");
    assert_has(hk.why.message, "after the session reset");
    /* and a fresh one, once the statement works again */
    free(th_scalar("CREATE TABLE pgs_ops_needed (x int)", 0, NULL));
    c = acquire_now(b, p);
    ck_assert_str_eq(value_of(b, c, "SHOW application_name"), "pgs_ops_setupfail");
    th_close(b, c);
    st = stats(p);
    ck_assert_int_eq(st.opened, 3);
    ck_assert_int_eq(st.setup_failures, 2);
    ck_assert_int_eq(st.lost, 0);
    close_pool(b, p);
    th_loop_end(b);
}
END_TEST

/* ---- hooks ---- */

START_TEST(test_acquire_hook_once_per_outcome_before_the_callback)
{
    memset(&hk, 0, sizeof hk);
    struct event_base *b = th_loop_begin();
    pgs_pool_opts o = {.max_size = 1, .max_waiting = 2, .acquire_timeout_ms = 200,
                       .hooks = &pool_hooks};
    pgs_pool *p = pool_at(b, th_conninfo("application_name=pgs_ops_hooks"), o);
    got granted = {0}, timeout = {0}, cancel = {0}, closed1 = {0}, closed2 = {0}, busy = {0};
    ck_assert_int_eq(pgs_pool_acquire_within(p, 15000, on_got, &granted, NULL), PGS_OK);
    th_run_until(b, &granted.fired, 15);
    ck_assert_int_eq(granted.code, PGS_OK);
    ck_assert_int_eq(granted.hooks_before, 1); /* the hook first, then the callback */
    ck_assert_int_eq(hk.by_code[PGS_OK], 1);
    ck_assert_int_eq(hk.in_acquire.acquired, 1); /* the stats from inside count it */
    ck_assert_msg(hk.wait_us[PGS_OK] >= 0 && hk.wait_us[PGS_OK] < 10000000, "waited %lld us",
                  hk.wait_us[PGS_OK]);
    /* the pool's hooks reach its connections' statements */
    value_of(b, granted.conn, "SELECT 'hooked'");
    ck_assert_int_eq(hk.stmt_ends, 1);

    ck_assert_int_eq(pgs_pool_acquire(p, on_got, &timeout, NULL), PGS_OK);
    th_run_until(b, &timeout.fired, 5);
    ck_assert_int_eq(timeout.code, PGS_ETIMEDOUT);
    ck_assert_int_eq(timeout.hooks_before, 2);
    ck_assert_int_eq(hk.by_code[PGS_ETIMEDOUT], 1);
    ck_assert_msg(hk.wait_us[PGS_ETIMEDOUT] >= 150000 && hk.wait_us[PGS_ETIMEDOUT] < 2000000,
                  "waited %lld us", hk.wait_us[PGS_ETIMEDOUT]);
    ck_assert_int_eq(hk.in_acquire.timed_out, 1);

    pgs_pool_req *req;
    ck_assert_int_eq(pgs_pool_acquire(p, on_got, &cancel, &req), PGS_OK);
    ck_assert_int_eq(pgs_pool_acquire_cancel(req), PGS_OK);
    th_run_until(b, &cancel.fired, 5);
    ck_assert_int_eq(cancel.hooks_before, 3);
    ck_assert_int_eq(hk.by_code[PGS_ECANCELED], 1);
    ck_assert_msg(hk.wait_us[PGS_ECANCELED] < 150000, "waited %lld us",
                  hk.wait_us[PGS_ECANCELED]);

    ck_assert_int_eq(pgs_pool_acquire_within(p, 10000, on_got, &closed1, NULL), PGS_OK);
    ck_assert_int_eq(pgs_pool_acquire(p, on_got, &closed2, NULL), PGS_OK);
    ck_assert_int_eq(pgs_pool_acquire(p, on_got, &busy, NULL), PGS_EBUSY); /* no outcome */
    int done = 0;
    ck_assert_int_eq(pgs_pool_close(p, th_count_done, &done), PGS_OK);
    th_run_until(b, &closed2.fired, 5);
    ck_assert_int_eq(closed1.code, PGS_ECLOSED);
    ck_assert_int_eq(closed2.code, PGS_ECLOSED);
    ck_assert_int_eq(closed2.hooks_before, 5);
    ck_assert_int_eq(hk.by_code[PGS_ECLOSED], 2);
    th_close(b, granted.conn);
    th_run_until(b, &done, 10);

    /* PGS_ECONNECT, from a pool that cannot reach its server */
    char ci[160];
    snprintf(ci, sizeof ci, "host=127.0.0.1 port=%d dbname=nobody user=nobody", th_closed_port());
    pgs_pool *down = pool_at(b, ci, o);
    got unreachable = {0};
    ck_assert_int_eq(pgs_pool_acquire(down, on_got, &unreachable, NULL), PGS_OK);
    th_run_until(b, &unreachable.fired, 5);
    ck_assert_int_eq(unreachable.code, PGS_ECONNECT);
    ck_assert_int_eq(unreachable.hooks_before, 6);
    ck_assert_int_eq(hk.by_code[PGS_ECONNECT], 1);
    close_pool(b, down);

    /* exactly once per outcome: six callbacks, six hooks; nothing replaced */
    ck_assert_int_eq(hk.acquires, 6);
    ck_assert_int_eq(granted.fired + timeout.fired + cancel.fired + closed1.fired +
                         closed2.fired + unreachable.fired,
                     6);
    ck_assert_int_eq(busy.fired, 0);
    ck_assert_int_eq(hk.replaced, 0);
    th_loop_end(b);
}
END_TEST

/* Retired for idle time (above min_size): the hook hears of it, with no error. */
START_TEST(test_replaced_hook_for_idle_retirement_has_no_error)
{
    memset(&hk, 0, sizeof hk);
    struct event_base *b = th_loop_begin();
    pgs_pool_opts o = {.max_size = 2, .idle_timeout_ms = 200, .hooks = &pool_hooks};
    pgs_pool *p = pool_at(b, th_conninfo("application_name=pgs_ops_idle"), o);
    pgs_conn *c = acquire_now(b, p);
    th_close(b, c);
    WAIT_COUNT(b, p, size, 0, 5);
    ck_assert_int_eq(hk.replaced, 1);
    ck_assert_int_eq(hk.replaced_null, 1);
    ck_assert_int_eq(stats(p).replaced, 0); /* not counted as a replacement */
    close_pool(b, p);
    th_loop_end(b);
}
END_TEST

static Suite *pool_ops_suite(void)
{
    Suite *s = suite_create("pool_ops");
    TCase *t = tcase_create("pool_ops");
    tcase_set_timeout(t, 60);
    tcase_add_test(t, test_request_timeout_shorter_and_longer_than_the_pools);
    tcase_add_test(t, test_unreachable_server_and_close_name_their_cause);
    tcase_add_test(t, test_counters_exact_for_a_scripted_sequence_and_reset_keeps_gauges);
    tcase_add_loop_test(t, test_setup_in_effect_for_every_user, 0, 3);
    tcase_add_test(t, test_setup_after_reset_shares_the_next_users_write);
    tcase_add_test(t, test_failed_setup_never_handed_out_and_the_pool_recovers);
    tcase_add_test(t, test_setup_failing_after_a_reset_closes_the_guard);
    tcase_add_test(t, test_acquire_hook_once_per_outcome_before_the_callback);
    tcase_add_test(t, test_replaced_hook_for_idle_retirement_has_no_error);
    suite_add_tcase(s, t);
    return s;
}

int main(void)
{
    return th_run_suite(pool_ops_suite());
}

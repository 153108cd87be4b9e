/* The pool against the real server: load on a small pool, limits, reset on return, health
 * after terminated backends and a server restart, cancel and close. `test_pool restart` runs
 * only the restart case (meson gives it a server of its own: it stops that server). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "helpers.h"

typedef th_got got; /* (tests/helpers.h) */

static pgs_pool *new_pool(struct event_base *b, const char *app, pgs_pool_opts o)
{
    char extra[96];
    snprintf(extra, sizeof extra, "application_name=%s", app);
    pgs_pool *p = NULL;
    ck_assert_int_eq(pgs_pool_new(b, th_conninfo(extra), &o, &p), PGS_OK);
    return p;
}

static pgs_conn *acquire(struct event_base *b, pgs_pool *p)
{
    got g = {0};
    ck_assert_int_eq(pgs_pool_acquire(p, th_on_got, &g, NULL), PGS_OK);
    ck_assert_int_eq(g.fired, 0);
    th_run_until(b, &g.fired, 15);
    ck_assert_msg(g.code == PGS_OK, "acquire failed: %s", g.message);
    return g.conn;
}

static void release(struct event_base *b, pgs_conn *c)
{
    th_close(b, c); /* done fires once, from the loop */
}

static void close_pool(struct event_base *b, pgs_pool *p)
{
    int done = 0;
    ck_assert_int_eq(pgs_pool_close(p, th_count_done, &done), PGS_OK);
    ck_assert_int_eq(done, 0);
    th_run_until(b, &done, 15);
    ck_assert_int_eq(done, 1);
}

/* ---- helpers ---- */

static const char *query_value(struct event_base *b, pgs_conn *c, const char *sql)
{
    static th_call k;
    memset(&k, 0, sizeof k);
    ck_assert_int_eq(pgs_query(c, sql, 0, NULL, th_record, &k), PGS_OK);
    th_run_until(b, &k.fired, 10);
    ck_assert_msg(k.code == PGS_OK, "%s: %s", sql, k.message);
    return k.value;
}

static long backends(const char *app)
{
    const char *v[] = {app};
    return th_scalar_long("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", 1,
                          v);
}

/* Run the loop until the pool's counts satisfy `want` (or fail after seconds). */
static void wait_counts(struct event_base *b, pgs_pool *p, int size, int idle, double seconds)
{
    double end = th_now() + seconds;
    pgs_pool_counts st;
    for (;;) {
        pgs_pool_stats(p, &st);
        if ((size < 0 || st.size == size) && (idle < 0 || st.idle == idle))
            return;
        ck_assert_msg(th_now() < end, "pool stuck at size %d idle %d in use %d waiting %d", st.size,
                      st.idle, st.in_use, st.waiting);
        struct timeval tv = {0, 20000};
        event_base_loopexit(b, &tv);
        event_base_dispatch(b);
    }
}

/* ---- load ---- */

enum { LOAD = 1000 };

typedef struct load {
    int id;
    int body_seq; /* when its body started, among all */
    int fired;
    pgs_tx_outcome outcome;
    int failed;
    char id_text[8];
} load;

static int body_counter;
static int bodies_done;
static int max_in_use;
static long max_backends;
static pgs_pool *load_pool;

static void load_body(pgs_tx *tx, void *arg)
{
    load *l = arg;
    l->body_seq = body_counter++;
    pgs_pool_counts st;
    pgs_pool_stats(load_pool, &st);
    if (st.in_use > max_in_use)
        max_in_use = st.in_use;
    if (l->id % 100 == 0) { /* what the server sees, now and then, mid-run */
        long n = backends("pgs_pool_load");
        if (n > max_backends)
            max_backends = n;
    }
    const char *v[] = {l->id_text};
    static th_call sink; /* the insert's own result is not what this test checks */
    pgs_tx_query(tx, "INSERT INTO pool_load (id) VALUES ($1::int)", 1, v, th_record, &sink);
    pgs_tx_end(tx, 1, NULL, NULL);
}

static void load_done(const pgs_tx_result *r, void *arg)
{
    load *l = arg;
    l->fired++;
    l->outcome = r->outcome;
    l->failed = r->err != NULL;
    bodies_done++;
}

START_TEST(test_thousand_transactions_on_a_pool_of_four)
{
    free(th_scalar("DROP TABLE IF EXISTS pool_load", 0, NULL));
    free(th_scalar("CREATE TABLE pool_load (id int PRIMARY KEY)", 0, NULL));
    struct event_base *b = th_loop_begin();
    pgs_pool_opts o = {.max_size = 4, .acquire_timeout_ms = 60000};
    load_pool = new_pool(b, "pgs_pool_load", o);
    static load l[LOAD];
    body_counter = bodies_done = max_in_use = 0;
    max_backends = 0;
    for (int i = 0; i < LOAD; i++) {
        l[i] = (load){.id = i};
        snprintf(l[i].id_text, sizeof l[i].id_text, "%d", i);
        ck_assert_int_eq(pgs_pool_run_tx(load_pool, NULL, load_body, load_done, &l[i]), PGS_OK);
    }
    ck_assert_int_eq(body_counter, 0);
    double end = th_now() + 50;
    while (bodies_done < LOAD && th_now() < end)
        event_base_loop(b, EVLOOP_ONCE);
    ck_assert_int_eq(bodies_done, LOAD);
    for (int i = 0; i < LOAD; i++) {
        ck_assert_int_eq(l[i].fired, 1);
        ck_assert_int_eq(l[i].outcome, PGS_TX_COMMITTED);
        ck_assert_int_eq(l[i].failed, 0);
        ck_assert_int_eq(l[i].body_seq, i); /* served in FIFO order */
    }
    ck_assert_int_eq(th_scalar_long("SELECT count(*) FROM pool_load", 0, NULL), LOAD);
    ck_assert_int_le(max_in_use, 4);
    ck_assert_int_ge(max_in_use, 2); /* it did run in parallel */
    ck_assert_int_le(max_backends, 4);
    ck_assert_int_le(backends("pgs_pool_load"), 4);
    pgs_pool_counts st;
    pgs_pool_stats(load_pool, &st);
    ck_assert_int_eq(st.acquired, LOAD);
    ck_assert_int_le(st.size, 4);
    close_pool(b, load_pool);
    th_loop_end(b);
    ck_assert_int_eq(backends("pgs_pool_load"), 0);
}
END_TEST

/* ---- limits ---- */

START_TEST(test_acquire_timeout_and_waiter_bound_have_their_own_codes)
{
    struct event_base *b = th_loop_begin();
    pgs_pool_opts o = {.min_size = 1, .max_size = 1, .acquire_timeout_ms = 200, .max_waiting = 1};
    pgs_pool *p = new_pool(b, "pgs_pool_limits", o);
    wait_counts(b, p, 1, 1, 10); /* connected ahead, so only the waiter can time out */
    pgs_pool_counts st;
    pgs_pool_stats(p, &st);
    ck_assert_int_eq(st.acquired, 0);
    pgs_conn *held = acquire(b, p);
    got waiter = {0}, over = {0};
    ck_assert_int_eq(pgs_pool_acquire(p, th_on_got, &waiter, NULL), PGS_OK);
    ck_assert_str_eq(pgs_pool_refusal(p), "");
    ck_assert_int_eq(pgs_pool_acquire(p, th_on_got, &over, NULL), PGS_EBUSY); /* at once */
    /* the words name the limit it hit */
    ck_assert_str_eq(pgs_pool_refusal(p),
                     "too many requests waiting (max_waiting 1; max_size 1, 1 in use)");
    double t0 = th_now();
    th_run_until(b, &waiter.fired, 5);
    double took = th_now() - t0;
    ck_assert_int_eq(waiter.code, PGS_ETIMEDOUT);
    ck_assert_ptr_null(waiter.conn);
    ck_assert_msg(took >= 0.15 && took < 2, "timed out after %.3f s", took);
    ck_assert_int_eq(over.fired, 0);
    pgs_pool_stats(p, &st);
    ck_assert_int_eq(st.timed_out, 1);
    ck_assert_int_eq(st.in_use, 1);
    ck_assert_int_eq(st.size, 1);
    release(b, held);
    close_pool(b, p);
    th_loop_end(b);
}
END_TEST

/* ---- reset on return ---- */

static int connects, releases;

static void count_connect(pgs_conn *c, void *arg)
{
    (void)c;
    ck_assert_ptr_eq(arg, &connects);
    connects++;
}

static void count_release(pgs_conn *c, void *arg)
{
    (void)c;
    (void)arg;
    releases++;
}

static th_call *query_call(struct event_base *b, pgs_conn *c, const char *sql)
{
    static th_call k;
    memset(&k, 0, sizeof k);
    ck_assert_int_eq(pgs_query(c, sql, 0, NULL, th_record, &k), PGS_OK);
    th_run_until(b, &k.fired, 10);
    return &k;
}

static const char *cached_select_42 =
    "SELECT count(*) FROM pg_prepared_statements WHERE statement = 'SELECT 42'";

/* Leave every kind of session state the default reset covers. */
static void dirty_the_session(struct event_base *b, pgs_conn *c)
{
    free(th_scalar("DO $$BEGIN CREATE ROLE pgs_pool_role; EXCEPTION WHEN duplicate_object "
                   "THEN NULL; END$$",
                   0, NULL));
    free(th_scalar("CREATE SEQUENCE IF NOT EXISTS pgs_pool_seq", 0, NULL));
    free(th_scalar("GRANT USAGE ON SEQUENCE pgs_pool_seq TO pgs_pool_role", 0, NULL));
    query_value(b, c, "SET search_path TO pg_catalog");
    query_value(b, c, "SET ROLE pgs_pool_role");
    query_value(b, c, "LISTEN pgs_pool_chan");
    query_value(b, c, "CREATE TEMP TABLE pgs_pool_tmp (x int)");
    query_value(b, c, "SELECT pg_advisory_lock(4242)");
    query_value(b, c, "DECLARE pgs_pool_cur CURSOR WITH HOLD FOR SELECT 1");
    query_value(b, c, "SELECT nextval('public.pgs_pool_seq')");
    query_value(b, c, "SELECT 42"); /* into the statement cache */
    query_value(b, c, "SET default_transaction_isolation = serializable");
    query_value(b, c, "SET default_transaction_read_only = on"); /* the reset must still run */
}

static void assert_clean_session(struct event_base *b, pgs_conn *c)
{
    ck_assert_str_eq(query_value(b, c, "SHOW search_path"), "\"$user\", public");
    ck_assert_str_eq(query_value(b, c, "SHOW default_transaction_read_only"), "off");
    ck_assert_str_eq(query_value(b, c, "SHOW default_transaction_isolation"), "read committed");
    ck_assert_str_eq(query_value(b, c, "SELECT current_user = session_user"), "t");
    ck_assert_str_eq(query_value(b, c, "SELECT count(*) FROM pg_listening_channels()"), "0");
    ck_assert_str_eq(query_value(b, c, "SELECT to_regclass('pg_temp.pgs_pool_tmp') IS NULL"),
                     "t");
    ck_assert_str_eq(query_value(b, c, "SELECT count(*) FROM pg_locks WHERE locktype = "
                                       "'advisory' AND pid = pg_backend_pid()"),
                     "0");
    ck_assert_str_eq(query_value(b, c, "SELECT count(*) FROM pg_cursors WHERE name <> ''"), "0");
    th_call *k = query_call(b, c, "SELECT currval('pgs_pool_seq')");
    ck_assert_str_eq(k->sqlstate, "55000"); /* currval not yet defined in this session */
}

/* Acquire, leave state with dirty(), give it back, acquire again: the same session. */
static pgs_conn *dirty_then_reacquire(struct event_base *b, pgs_pool *p, int *pid,
                                      void (*dirty)(struct event_base *, pgs_conn *))
{
    pgs_conn *c = acquire(b, p);
    *pid = th_backend_pid(c);
    dirty(b, c);
    release(b, c);
    c = acquire(b, p);
    ck_assert_int_eq(th_backend_pid(c), *pid); /* the same session, reused */
    return c;
}

START_TEST(test_next_user_sees_a_clean_session)
{
    struct event_base *b = th_loop_begin();
    pgs_pool_opts o = {.max_size = 1, .on_connect = count_connect, .on_release = count_release,
                       .cb_arg = &connects};
    pgs_pool *p = new_pool(b, "pgs_pool_reset", o);
    int pid;
    pgs_conn *c = dirty_then_reacquire(b, p, &pid, dirty_the_session);
    assert_clean_session(b, c);
    /* but the statement cache was kept: SELECT 42 is still prepared, and runs by name */
    ck_assert_str_eq(query_value(b, c, cached_select_42), "1");
    ck_assert_str_eq(query_value(b, c, "SELECT 42"), "42");
    /* the user's own PREPARE: then DISCARD ALL, which takes the cache with it */
    query_value(b, c, "PREPARE pgs_pool_p AS SELECT 1");
    release(b, c);
    c = acquire(b, p);
    ck_assert_int_eq(th_backend_pid(c), pid);
    ck_assert_str_eq(query_value(b, c, "SELECT count(*) FROM pg_prepared_statements "
                                       "WHERE name = 'pgs_pool_p'"),
                     "0");
    ck_assert_str_eq(query_value(b, c, cached_select_42), "0");
    ck_assert_str_eq(query_value(b, c, "SELECT 42"), "42"); /* parsed again, and cached */
    /* and after that, the light reset again: the cache stays */
    release(b, c);
    c = acquire(b, p);
    ck_assert_str_eq(query_value(b, c, cached_select_42), "1");
    /* returned inside a transaction: never handed out again */
    query_value(b, c, "BEGIN");
    release(b, c);
    c = acquire(b, p);
    ck_assert_int_ne(th_backend_pid(c), pid);
    ck_assert_int_eq(PQtransactionStatus(pgs_conn_pgconn(c)), PQTRANS_IDLE);
    /* and after a cancel */
    int pid2 = th_backend_pid(c);
    ck_assert_int_eq(pgs_conn_cancel(c), PGS_OK);
    release(b, c);
    c = acquire(b, p);
    ck_assert_int_ne(th_backend_pid(c), pid2);
    pgs_pool_counts st;
    pgs_pool_stats(p, &st);
    ck_assert_int_eq(st.reset, 3);
    ck_assert_int_eq(st.replaced, 2);
    ck_assert_int_eq(connects, 3);  /* the first, and one replacement for each dirty return */
    ck_assert_int_eq(releases, 3); /* only the clean returns came back */
    release(b, c);
    close_pool(b, p);
    th_loop_end(b);
}
END_TEST

/* A waiter's statements queued in its acquire callback: they travel with the last user's
 * reset, in its pipeline segment, and run after it in a fresh transaction. */
enum { WAITER_CHECKS = 6 };
static const char *const waiter_checks[WAITER_CHECKS] = {
    "SHOW transaction_isolation", /* not the serializable the last user left as default */
    "VACUUM pgs_pool_vac",        /* the first of its transaction, not inside a pipeline */
    "SHOW search_path",
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
    "SELECT to_regclass('pg_temp.pgs_pool_tmp') IS NULL",
    "SELECT current_user = session_user",
};
static th_call waiter_calls[WAITER_CHECKS];

static void waiter_got(pgs_conn *c, const pgs_error *err, void *arg)
{
    got *g = arg;
    th_on_got(c, err, g);
    for (int i = 0; !err && i < WAITER_CHECKS; i++)
        ck_assert_int_eq(pgs_query(c, waiter_checks[i], 0, NULL, th_record, &waiter_calls[i]),
                         PGS_OK);
}

START_TEST(test_waiter_statements_follow_the_reset)
{
    free(th_scalar("CREATE TABLE IF NOT EXISTS pgs_pool_vac (x int)", 0, NULL));
    struct event_base *b = th_loop_begin();
    pgs_pool_opts o = {.max_size = 1};
    pgs_pool *p = new_pool(b, "pgs_pool_waiter", o);
    pgs_conn *c = acquire(b, p);
    int pid = th_backend_pid(c);
    dirty_the_session(b, c);
    got g = {0};
    memset(waiter_calls, 0, sizeof waiter_calls);
    ck_assert_int_eq(pgs_pool_acquire(p, waiter_got, &g, NULL), PGS_OK);
    release(b, c); /* the waiter gets it, with the reset owed */
    for (int i = 0; i < WAITER_CHECKS; i++) {
        th_run_until(b, &waiter_calls[i].fired, 10);
        ck_assert_msg(waiter_calls[i].code == PGS_OK, "%s: %s", waiter_checks[i],
                      waiter_calls[i].message);
    }
    ck_assert_int_eq(g.fired, 1);
    ck_assert_int_eq(th_backend_pid(g.conn), pid); /* the same session, reused */
    ck_assert_str_eq(waiter_calls[0].value, "read committed");
    ck_assert_str_eq(waiter_calls[2].value, "\"$user\", public");
    ck_assert_str_eq(waiter_calls[3].value, "0");
    ck_assert_str_eq(waiter_calls[4].value, "t");
    ck_assert_str_eq(waiter_calls[5].value, "t");
    assert_clean_session(b, g.conn);
    pgs_pool_counts st;
    pgs_pool_stats(p, &st);
    ck_assert_int_eq(st.reset, 1);
    ck_assert_int_eq(st.replaced, 0);
    release(b, g.conn);
    close_pool(b, p);
    th_loop_end(b);
}
END_TEST

/* A reset that fails (here DISCARD TEMP: another session holds a lock on the temporary
 * table, and lock_timeout ends the wait) closes the guard, and the waiter's statements queued
 * behind it never run (the server skips the rest of the segment, and the reset's aborted
 * transaction would refuse what comes later). */
static th_call failed_insert, failed_select;

static void insert_when_granted(pgs_conn *c, const pgs_error *err, void *arg)
{
    th_on_got(c, err, arg);
    if (err)
        return;
    ck_assert_int_eq(pgs_query(c, "INSERT INTO pgs_pool_probe VALUES (1)", 0, NULL, th_record,
                               &failed_insert),
                     PGS_OK);
    ck_assert_int_eq(pgs_query(c, "SELECT 1", 0, NULL, th_record, &failed_select), PGS_OK);
}

START_TEST(test_failed_reset_runs_nothing_after_it)
{
    free(th_scalar("DROP TABLE IF EXISTS pgs_pool_probe", 0, NULL));
    free(th_scalar("CREATE TABLE pgs_pool_probe (x int)", 0, NULL));
    struct event_base *b = th_loop_begin();
    pgs_pool_opts o = {.max_size = 1};
    pgs_pool *p = NULL;
    ck_assert_int_eq(pgs_pool_new(b,
                                  th_conninfo("application_name=pgs_pool_resetfail "
                                              "options='-c lock_timeout=300'"),
                                  &o, &p),
                     PGS_OK);
    pgs_conn *c = acquire(b, p);
    int pid = th_backend_pid(c);
    query_value(b, c, "CREATE TEMP TABLE pgs_pool_locked (x int)");
    char nsp[64];
    snprintf(nsp, sizeof nsp, "%s", query_value(b, c, "SELECT pg_my_temp_schema()::regnamespace"));
    /* Another session locks that temporary table (allowed: it reads no data). */
    PGconn *blocker = PQconnectdb(th_conninfo(NULL));
    ck_assert_int_eq(PQstatus(blocker), CONNECTION_OK);
    char *ident = PQescapeIdentifier(blocker, nsp, strlen(nsp));
    char sql[256];
    snprintf(sql, sizeof sql, "LOCK TABLE %s.pgs_pool_locked IN ACCESS SHARE MODE", ident);
    PQfreemem(ident);
    PQclear(PQexec(blocker, "BEGIN"));
    PGresult *r = PQexec(blocker, sql);
    ck_assert_msg(PQresultStatus(r) == PGRES_COMMAND_OK, "%s", PQerrorMessage(blocker));
    PQclear(r);

    got g = {0};
    memset(&failed_insert, 0, sizeof failed_insert);
    memset(&failed_select, 0, sizeof failed_select);
    ck_assert_int_eq(pgs_pool_acquire(p, insert_when_granted, &g, NULL), PGS_OK);
    release(b, c);
    th_run_until(b, &failed_insert.fired, 10);
    th_run_until(b, &failed_select.fired, 10);
    ck_assert_int_eq(g.code, PGS_OK);
    ck_assert_int_eq(failed_insert.fired, 1);
    ck_assert_int_eq(failed_insert.code, PGS_ECONN);
    ck_assert_msg(strstr(failed_insert.message, "session reset failed") &&
                      strstr(failed_insert.message, "lock timeout"),
                  "%s", failed_insert.message);
    ck_assert_str_eq(failed_insert.sqlstate, "55P03"); /* the server's own: lock_timeout */
    ck_assert_int_eq(failed_select.fired, 1);
    ck_assert_int_eq(failed_select.code, PGS_ECONN);
    PQclear(PQexec(blocker, "COMMIT"));
    PQfinish(blocker);
    /* the insert never ran, and the guard's session is gone */
    ck_assert_int_eq(th_scalar_long("SELECT count(*) FROM pgs_pool_probe", 0, NULL), 0);
    th_wait_backend_gone(pid, 10);
    release(b, g.conn);
    /* the pool replaced it: the next user gets a fresh, working session */
    c = acquire(b, p);
    ck_assert_int_ne(th_backend_pid(c), pid);
    ck_assert_str_eq(query_value(b, c, "SELECT 7"), "7");
    pgs_pool_counts st;
    pgs_pool_stats(p, &st);
    ck_assert_int_eq(st.replaced, 1);
    release(b, c);
    close_pool(b, p);
    th_loop_end(b);
}
END_TEST

START_TEST(test_reset_all_discards_everything_cache_included)
{
    struct event_base *b = th_loop_begin();
    pgs_pool_opts o = {.max_size = 1, .reset = PGS_RESET_ALL};
    pgs_pool *p = new_pool(b, "pgs_pool_reset_all", o);
    int pid;
    pgs_conn *c = dirty_then_reacquire(b, p, &pid, dirty_the_session);
    assert_clean_session(b, c);
    ck_assert_str_eq(query_value(b, c, cached_select_42), "0");
    ck_assert_str_eq(query_value(b, c, "SELECT 42"), "42");
    release(b, c);
    /* a reset that is not one of the three is refused */
    pgs_pool *bad = NULL;
    pgs_pool_opts wrong = {.reset = (pgs_pool_reset)7};
    ck_assert_int_eq(pgs_pool_new(b, th_conninfo(NULL), &wrong, &bad), PGS_EINVAL);
    ck_assert_ptr_null(bad);
    close_pool(b, p);
    th_loop_end(b);
}
END_TEST

static void set_path_and_cache(struct event_base *b, pgs_conn *c)
{
    query_value(b, c, "SET search_path TO pg_catalog");
    query_value(b, c, "SELECT 42");
}

START_TEST(test_no_reset_keeps_the_session_but_still_refuses_dirty_guards)
{
    struct event_base *b = th_loop_begin();
    pgs_pool_opts o = {.max_size = 1, .reset = PGS_RESET_NONE};
    pgs_pool *p = new_pool(b, "pgs_pool_noreset", o);
    int pid;
    pgs_conn *c = dirty_then_reacquire(b, p, &pid, set_path_and_cache);
    /* as documented: the session is as the last user left it, cache included */
    ck_assert_str_eq(query_value(b, c, "SHOW search_path"), "pg_catalog");
    ck_assert_str_eq(query_value(b, c, cached_select_42), "1");
    query_value(b, c, "BEGIN"); /* but a guard left inside a transaction is never reused */
    release(b, c);
    c = acquire(b, p);
    ck_assert_int_ne(th_backend_pid(c), pid);
    pgs_pool_counts st;
    pgs_pool_stats(p, &st);
    ck_assert_int_eq(st.reset, 0);
    ck_assert_int_eq(st.replaced, 1);
    release(b, c);
    close_pool(b, p);
    th_loop_end(b);
}
END_TEST

/* ---- health ---- */

typedef struct probe {
    int fired, ok;
    th_call k;
} probe;

static void probe_ran(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg)
{
    probe *pr = arg;
    th_record(c, res, err, &pr->k);
    pr->fired++;
    pr->ok = err == NULL;
    pgs_conn_close(c, NULL, NULL);
}

static void probe_got(pgs_conn *c, const pgs_error *err, void *arg)
{
    probe *pr = arg;
    if (err || pgs_query(c, "SELECT 1", 0, NULL, probe_ran, pr) != PGS_OK) {
        pr->fired++;
        if (c)
            pgs_conn_close(c, NULL, NULL);
    }
}

static int run_probes(struct event_base *b, pgs_pool *p, int n)
{
    probe *pr = calloc((size_t)n, sizeof *pr);
    for (int i = 0; i < n; i++)
        ck_assert_int_eq(pgs_pool_acquire(p, probe_got, &pr[i], NULL), PGS_OK);
    int ok = 0;
    for (int i = 0; i < n; i++) {
        th_run_until(b, &pr[i].fired, 20);
        ok += pr[i].ok;
    }
    free(pr);
    return ok;
}

START_TEST(test_terminated_idle_backends_replaced)
{
    struct event_base *b = th_loop_begin();
    pgs_pool_opts o = {.min_size = 4, .max_size = 4};
    pgs_pool *p = new_pool(b, "pgs_pool_health", o);
    wait_counts(b, p, 4, 4, 10); /* min_size opened ahead */
    ck_assert_int_eq(backends("pgs_pool_health"), 4);
    free(th_scalar("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                   "WHERE application_name = 'pgs_pool_health'",
                   0, NULL));
    /* Gone on the server (their goodbye is on its way to us) before anyone asks the pool. */
    for (double end = th_now() + 5; backends("pgs_pool_health") > 0 && th_now() < end;)
        usleep(10000);
    ck_assert_int_eq(run_probes(b, p, 100), 100);
    pgs_pool_counts st;
    pgs_pool_stats(p, &st);
    ck_assert_int_ge(st.replaced, 4);
    wait_counts(b, p, 4, 4, 10); /* back to its size */
    close_pool(b, p);
    th_loop_end(b);
}
END_TEST

/* ---- cancel and close ---- */

START_TEST(test_cancelled_waiter_and_fifo_handover)
{
    struct event_base *b = th_loop_begin();
    pgs_pool_opts o = {.max_size = 1};
    pgs_pool *p = new_pool(b, "pgs_pool_cancel", o);
    pgs_conn *held = acquire(b, p);
    got w1 = {0}, w2 = {0}, w3 = {0};
    pgs_pool_req *r1;
    th_fire_seq = 0;
    ck_assert_int_eq(pgs_pool_acquire(p, th_on_got, &w1, &r1), PGS_OK);
    ck_assert_int_eq(pgs_pool_acquire(p, th_on_got, &w2, NULL), PGS_OK);
    ck_assert_int_eq(pgs_pool_acquire(p, th_on_got, &w3, NULL), PGS_OK);
    ck_assert_int_eq(pgs_pool_acquire_cancel(r1), PGS_OK);
    ck_assert_int_eq(pgs_pool_acquire_cancel(r1), PGS_EMISUSE);
    ck_assert_int_eq(w1.fired, 0);
    th_run_until(b, &w1.fired, 5);
    ck_assert_int_eq(w1.code, PGS_ECANCELED);
    release(b, held);
    th_run_until(b, &w2.fired, 10); /* the next in line, not w3 */
    ck_assert_int_eq(w2.code, PGS_OK);
    ck_assert_int_eq(w3.fired, 0);
    release(b, w2.conn);
    th_run_until(b, &w3.fired, 10);
    ck_assert_int_eq(w3.code, PGS_OK);
    /* granted but not yet delivered: the cancel still wins, and the guard moves on */
    release(b, w3.conn);
    wait_counts(b, p, 1, 1, 5);
    got w4 = {0};
    pgs_pool_req *r4;
    ck_assert_int_eq(pgs_pool_acquire(p, th_on_got, &w4, &r4), PGS_OK);
    ck_assert_int_eq(pgs_pool_acquire_cancel(r4), PGS_OK);
    th_run_until(b, &w4.fired, 5);
    ck_assert_int_eq(w4.code, PGS_ECANCELED);
    ck_assert_ptr_null(w4.conn);
    wait_counts(b, p, 1, 1, 5);
    close_pool(b, p);
    th_loop_end(b);
    ck_assert_int_eq(w1.fired + w2.fired + w3.fired + w4.fired, 4);
}
END_TEST

START_TEST(test_close_with_waiters_and_guards_out)
{
    struct event_base *b = th_loop_begin();
    pgs_pool_opts o = {.max_size = 1};
    pgs_pool *p = new_pool(b, "pgs_pool_close", o);
    pgs_conn *held = acquire(b, p);
    got w1 = {0}, w2 = {0}, late = {0};
    int done = 0;
    ck_assert_int_eq(pgs_pool_acquire(p, th_on_got, &w1, NULL), PGS_OK);
    ck_assert_int_eq(pgs_pool_acquire(p, th_on_got, &w2, NULL), PGS_OK);
    ck_assert_int_eq(pgs_pool_close(p, th_count_done, &done), PGS_OK);
    ck_assert_int_eq(pgs_pool_close(p, th_count_done, &done), PGS_EMISUSE);
    ck_assert_int_eq(pgs_pool_acquire(p, th_on_got, &late, NULL), PGS_ECLOSED);
    th_run_until(b, &w2.fired, 5);
    ck_assert_int_eq(w1.code, PGS_ECLOSED);
    ck_assert_int_eq(w2.code, PGS_ECLOSED);
    ck_assert_int_eq(done, 0); /* a guard is still out */
    query_value(b, held, "SELECT 1"); /* and still works */
    release(b, held);
    th_run_until(b, &done, 5);
    th_loop_end(b); /* no socket, timer or descriptor left */
    ck_assert_int_eq(done, 1);
    ck_assert_int_eq(w1.fired + w2.fired, 2);
    ck_assert_int_eq(late.fired, 0);
    ck_assert_int_eq(backends("pgs_pool_close"), 0);
}
END_TEST

/* ---- re-entrant calls from inside the pool's callbacks ---- */

typedef struct reenter {
    pgs_conn *conn;
    int close_rc, query_rc, done;
    pgs_pool *pool;
    pgs_pool_req *req;
    int cancel_rc, fired;
} reenter;

static void done_then_reenter(void *arg)
{
    reenter *r = arg;
    r->done++;
    th_call k = {0};
    r->close_rc = pgs_conn_close(r->conn, th_count_done, &r->done); /* already closing */
    r->query_rc = pgs_query(r->conn, "BEGIN", 0, NULL, th_record, &k);
}

static void got_then_cancel_self(pgs_conn *conn, const pgs_error *err, void *arg)
{
    reenter *r = arg;
    r->fired++;
    r->conn = conn;
    (void)err;
    r->cancel_rc = pgs_pool_acquire_cancel(r->req); /* its own callback: too late */
}

static void close_pool_on_connect(pgs_conn *c, void *arg)
{
    (void)c;
    reenter *r = arg;
    if (!r->fired++)
        r->cancel_rc = pgs_pool_close(r->pool, th_count_done, &r->done);
}

START_TEST(test_reentrant_calls_are_refused_or_safe)
{
    struct event_base *b = th_loop_begin();
    pgs_pool_opts o = {.max_size = 1};
    pgs_pool *p = new_pool(b, "pgs_pool_reenter", o);
    reenter r = {.pool = p};
    ck_assert_int_eq(pgs_pool_acquire(p, got_then_cancel_self, &r, &r.req), PGS_OK);
    th_run_until(b, &r.fired, 10);
    ck_assert_int_eq(r.cancel_rc, PGS_EMISUSE);
    ck_assert_ptr_nonnull(r.conn);
    int pid = th_backend_pid(r.conn);
    ck_assert_int_eq(pgs_conn_close(r.conn, done_then_reenter, &r), PGS_OK);
    th_run_until(b, &r.done, 5);
    ck_assert_int_eq(r.close_rc, PGS_EMISUSE);
    ck_assert_int_eq(r.query_rc, PGS_EMISUSE); /* nothing slips in after the user's exit */
    pgs_conn *c = acquire(b, p);
    ck_assert_int_eq(th_backend_pid(c), pid);
    query_value(b, c, "SELECT 1"); /* after the pipelined reset, the session is plain idle */
    ck_assert_int_eq(PQtransactionStatus(pgs_conn_pgconn(c)), PQTRANS_IDLE);
    release(b, c);
    close_pool(b, p);
    ck_assert_int_eq(r.done, 1);
    /* closing the pool from on_connect */
    reenter q = {0};
    pgs_pool_opts oc = {.min_size = 1, .max_size = 1, .on_connect = close_pool_on_connect,
                        .cb_arg = &q};
    q.pool = new_pool(b, "pgs_pool_reenter", oc);
    th_run_until(b, &q.done, 10);
    ck_assert_int_eq(q.cancel_rc, PGS_OK);
    th_loop_end(b);
    ck_assert_int_eq(q.done, 1);
}
END_TEST

START_TEST(test_idle_timeout_keeps_min_size)
{
    struct event_base *b = th_loop_begin();
    connects = 0;
    pgs_pool_opts o = {.min_size = 2, .max_size = 5, .idle_timeout_ms = 200,
                       .on_connect = count_connect, .cb_arg = &connects};
    pgs_pool *p = new_pool(b, "pgs_pool_idle", o);
    pgs_conn *c[5];
    for (int i = 0; i < 5; i++)
        c[i] = acquire(b, p);
    for (int i = 0; i < 5; i++)
        release(b, c[i]);
    wait_counts(b, p, 5, 5, 5);
    wait_counts(b, p, 2, 2, 5); /* the three above min_size went idle too long */
    pgs_pool_counts st;
    pgs_pool_stats(p, &st);
    ck_assert_int_eq(st.replaced, 0);
    ck_assert_int_eq(connects, 5); /* none below min_size was closed and reopened */
    ck_assert_int_eq(backends("pgs_pool_idle"), 2);
    close_pool(b, p);
    th_loop_end(b);
}
END_TEST

/* ---- server restart (its own server: see main) ---- */

static void pgctl(const char *args)
{
    const char *tool = getenv("PGSCOPE_PGTMP");
    ck_assert_msg(tool && getenv("PGSCOPE_PGDATA"),
                  "the restart test needs the throwaway server (PGSCOPE_PGTMP, PGSCOPE_PGDATA)");
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "%s pgctl %s >/dev/null 2>&1", tool, args);
    ck_assert_int_eq(system(cmd), 0);
}

START_TEST(test_server_restart_fails_clearly_then_recovers)
{
    struct event_base *b = th_loop_begin();
    pgs_pool_opts o = {.min_size = 2, .max_size = 2, .acquire_timeout_ms = 1000};
    pgs_pool *p = new_pool(b, "pgs_pool_restart", o);
    wait_counts(b, p, 2, 2, 10);
    pgctl("stop -m fast -w");
    got down = {0};
    double t0 = th_now();
    ck_assert_int_eq(pgs_pool_acquire(p, th_on_got, &down, NULL), PGS_OK);
    th_run_until(b, &down.fired, 10);
    ck_assert_msg(down.code == PGS_ECONNECT, "got %s: %s", pgs_strerror(down.code), down.message);
    ck_assert_double_lt(th_now() - t0, 3.0);
    pgctl("start -w");
    int ok = 0;
    for (int i = 0; i < 20 && !ok; i++) /* a few may still fail while the pool backs off */
        ok = run_probes(b, p, 1);
    ck_assert_int_eq(ok, 1);
    wait_counts(b, p, 2, 2, 10); /* back to its size */
    pgs_pool_counts st;
    pgs_pool_stats(p, &st);
    ck_assert_int_ge(st.connect_failures, 1);
    close_pool(b, p);
    th_loop_end(b);
}
END_TEST

/* ---- exact outcomes and a live guard under faults ---- */

/* The temporary table a guard made, locked by another session, so the pool's reset of that
 * guard (DISCARD TEMP) waits. Returns the schema-qualified name, escaped. */
static void temp_table_of(struct event_base *b, pgs_conn *c, const char *table, char *out,
                          size_t cap)
{
    char sql[128];
    snprintf(sql, sizeof sql, "CREATE TEMP TABLE %s (x int)", table);
    query_value(b, c, sql);
    const char *nsp = query_value(b, c, "SELECT pg_my_temp_schema()::regnamespace::text");
    snprintf(out, cap, "%s.%s", nsp, table);
}

/* Guards come back and their session reset waits (a lock another session holds on their
 * temporary table); their backends are then terminated and gone before anyone asks. The
 * waiters must get live guards, never those. */
START_TEST(test_dead_guards_whose_reset_is_in_flight_are_never_handed_out)
{
    enum { N = 3 };
    struct event_base *b = th_loop_begin();
    pgs_pool_opts o = {.max_size = N};
    pgs_pool *p = new_pool(b, "pgs_pool_deadreset", o);
    pgs_conn *c[N];
    char tables[N][160];
    for (int i = 0; i < N; i++)
        c[i] = acquire(b, p);
    for (int i = 0; i < N; i++)
        temp_table_of(b, c[i], "pgs_dead_reset", tables[i], sizeof tables[i]);
    char list[600];
    snprintf(list, sizeof list, "%s, %s, %s", tables[0], tables[1], tables[2]);
    PGconn *blocker = th_lock_table(list, "ACCESS SHARE");
    for (int i = 0; i < N; i++)
        release(b, c[i]);
    th_run_for(b, 0.3); /* their resets are on the wire, waiting for the lock */
    free(th_scalar("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                   "WHERE application_name = 'pgs_pool_deadreset'",
                   0, NULL));
    th_unlock(blocker); /* (their exit drops their temporary tables: it needs the lock too) */
    for (double end = th_now() + 5; backends("pgs_pool_deadreset") > 0 && th_now() < end;)
        usleep(10000);
    ck_assert_int_eq(backends("pgs_pool_deadreset"), 0);
    pgs_pool_counts st;
    pgs_pool_stats(p, &st);
    ck_assert_int_eq(st.idle, N); /* the loop has not run: nothing has been read yet */
    ck_assert_int_eq(run_probes(b, p, N), N);
    pgs_pool_stats(p, &st);
    ck_assert_int_ge(st.replaced, N);
    close_pool(b, p);
    th_loop_end(b);
}
END_TEST

/* The transaction's own cancel request stops the pool's reset that shares its pipeline
 * segment (the reset waits for a lock): COMMIT was skipped, so rolled back, not unknown. */
static pgs_tx *cancel_me;
static th_call body_call;

static void insert_and_commit(pgs_tx *tx, void *arg)
{
    (void)arg;
    cancel_me = tx;
    pgs_tx_query(tx, "INSERT INTO pgs_pool_probe VALUES (1)", 0, NULL, th_record, &body_call);
    pgs_tx_end(tx, 1, NULL, NULL);
}

typedef struct run_rec {
    int fired;
    pgs_tx_outcome outcome;
    pgs_error err;
    int has_err;
    int attempts;
    pgs_pool *pool;
    pgs_pool_counts in_done; /* the pool's counts when done ran */
    got again;               /* an acquire from inside done */
} run_rec;

static void on_run_done(const pgs_tx_result *r, void *arg)
{
    run_rec *d = arg;
    d->fired++;
    d->outcome = r->outcome;
    d->has_err = r->err != NULL;
    if (r->err)
        d->err = *r->err;
    d->attempts = r->attempts;
    if (d->pool)
        pgs_pool_stats(d->pool, &d->in_done);
}

START_TEST(test_cancel_that_stops_the_pool_reset_is_rolled_back_not_unknown)
{
    free(th_scalar("DROP TABLE IF EXISTS pgs_pool_probe", 0, NULL));
    free(th_scalar("CREATE TABLE pgs_pool_probe (x int)", 0, NULL));
    struct event_base *b = th_loop_begin();
    pgs_pool_opts o = {.max_size = 1};
    pgs_pool *p = new_pool(b, "pgs_pool_cancelreset", o);
    pgs_conn *c = acquire(b, p);
    char table[160];
    temp_table_of(b, c, "pgs_cancel_reset", table, sizeof table);
    PGconn *blocker = th_lock_table(table, "ACCESS SHARE");
    run_rec d = {0};
    th_call *ins = &body_call;
    memset(ins, 0, sizeof *ins);
    cancel_me = NULL;
    ck_assert_int_eq(pgs_pool_run_tx(p, NULL, insert_and_commit, on_run_done, &d), PGS_OK);
    release(b, c); /* to the waiting run, its reset in the same segment as BEGIN ... COMMIT */
    th_run_for(b, 0.3);
    ck_assert_ptr_nonnull(cancel_me);
    ck_assert_int_eq(d.fired, 0);
    ck_assert_int_eq(pgs_tx_cancel(cancel_me), PGS_OK);
    th_run_until(b, &d.fired, 10);
    th_unlock(blocker);
    ck_assert_msg(d.outcome == PGS_TX_ROLLED_BACK, "outcome %d: %s", d.outcome, d.err.message);
    ck_assert_int_eq(d.err.code, PGS_ECANCELED);
    ck_assert_int_eq(ins->fired, 1);
    ck_assert_int_eq(ins->code, PGS_ECANCELED);
    ck_assert_int_eq(th_scalar_long("SELECT count(*) FROM pgs_pool_probe", 0, NULL), 0);
    close_pool(b, p);
    th_loop_end(b);
}
END_TEST

/* pgs_pool_run_tx: a serialization failure, then the guard's connection dies. The
 * transaction rolled back, so the retry runs on another guard. */
static int conflict_runs;

static void conflict_then_insert(pgs_tx *tx, void *arg)
{
    (void)arg;
    if (conflict_runs++ == 0)
        pgs_tx_query(tx, TH_SERIALIZATION_FAILURE, 0, NULL, th_note_conn, NULL);
    else
        pgs_tx_query(tx, "INSERT INTO pgs_pool_probe VALUES (2)", 0, NULL, th_note_conn, NULL);
    pgs_tx_end(tx, 1, NULL, NULL);
}

START_TEST(test_pool_run_tx_retries_on_another_guard_when_the_connection_died)
{
    free(th_scalar("DROP TABLE IF EXISTS pgs_pool_probe", 0, NULL));
    free(th_scalar("CREATE TABLE pgs_pool_probe (x int)", 0, NULL));
    struct event_base *b = th_loop_begin();
    th_proxy *px = th_proxy_start(atoi(th_conninfo_value("port")));
    pgs_pool_opts o = {.max_size = 2};
    pgs_pool *p = NULL;
    ck_assert_int_eq(pgs_pool_new(b, th_proxy_conninfo(px), &o, &p), PGS_OK);
    run_rec d = {0};
    conflict_runs = 0;
    th_seen_conn = NULL;
    pgs_tx_opts to = {.retries = 3, .retry_base_ms = 500, .retry_max_ms = 500};
    ck_assert_int_eq(pgs_pool_run_tx(p, &to, conflict_then_insert, on_run_done, &d), PGS_OK);
    /* the first attempt rolled back (its ROLLBACK answered): the backoff runs now */
    th_run_until_idle_or(b, &d.fired);
    int cut = conflict_runs == 1; /* (the backoff's jitter may, rarely, have run it again) */
    if (cut)
        th_proxy_cut(px);
    th_run_until(b, &d.fired, 15);
    ck_assert_msg(d.outcome == PGS_TX_COMMITTED, "outcome %d: %s", d.outcome, d.err.message);
    ck_assert_int_eq(d.attempts, 2);
    ck_assert_int_eq(conflict_runs, 2);
    ck_assert_int_eq(th_scalar_long("SELECT count(*) FROM pgs_pool_probe", 0, NULL), 1);
    pgs_pool_counts st;
    pgs_pool_stats(p, &st);
    if (cut)
        ck_assert_int_ge(st.replaced, 1);
    close_pool(b, p);
    th_proxy_stop(px);
    th_loop_end(b);
}
END_TEST

/* pgs_pool_run_tx's done fires once the guard is back: the counts say so, and an acquire from
 * inside done gets that guard rather than a new connection. */
static void select_and_commit(pgs_tx *tx, void *arg)
{
    (void)arg;
    pgs_tx_query(tx, "SELECT 1", 0, NULL, th_record, &body_call);
    pgs_tx_end(tx, 1, NULL, NULL);
}

static void done_then_acquire(const pgs_tx_result *r, void *arg)
{
    run_rec *d = arg;
    on_run_done(r, d);
    ck_assert_int_eq(pgs_pool_acquire(d->pool, th_on_got, &d->again, NULL), PGS_OK);
}

START_TEST(test_pool_run_tx_done_fires_with_the_guard_back)
{
    struct event_base *b = th_loop_begin();
    pgs_pool_opts o = {.max_size = 2};
    pgs_pool *p = new_pool(b, "pgs_pool_doneback", o);
    run_rec d = {.pool = p};
    ck_assert_int_eq(pgs_pool_run_tx(p, NULL, select_and_commit, done_then_acquire, &d), PGS_OK);
    th_run_until(b, &d.again.fired, 10);
    ck_assert_int_eq(d.outcome, PGS_TX_COMMITTED);
    ck_assert_int_eq(d.in_done.in_use, 0);
    ck_assert_int_eq(d.in_done.size, 1);
    ck_assert_int_eq(d.again.code, PGS_OK);
    pgs_pool_counts st;
    pgs_pool_stats(p, &st);
    ck_assert_int_eq(st.size, 1); /* no connection opened for the second acquire */
    ck_assert_int_eq(backends("pgs_pool_doneback"), 1);
    release(b, d.again.conn);
    close_pool(b, p);
    th_loop_end(b);
}
END_TEST

/* After a restart the server may give an id whose assignment never reached its WAL (a crash)
 * to another transaction: pgs_tx_resolve then says UNKNOWN, never that transaction's status. */
static void commit_one(pgs_tx *tx, void *arg)
{
    (void)arg;
    pgs_tx_query(tx, "INSERT INTO pgs_pool_probe VALUES (7)", 0, NULL, th_note_conn, NULL);
    pgs_tx_end(tx, 1, NULL, NULL);
}

static char kept_xid[48];

static void keep_xid(const pgs_tx_result *r, void *arg)
{
    snprintf(kept_xid, sizeof kept_xid, "%s", r->xid);
    on_run_done(r, arg);
}

START_TEST(test_resolve_after_a_restart_says_unknown)
{
    free(th_scalar("DROP TABLE IF EXISTS pgs_pool_probe", 0, NULL));
    free(th_scalar("CREATE TABLE pgs_pool_probe (x int)", 0, NULL));
    struct event_base *b = th_loop_begin();
    pgs_pool_opts o = {.max_size = 1};
    pgs_pool *p = new_pool(b, "pgs_pool_resolve", o);
    run_rec d = {0};
    pgs_tx_opts to = {.resolvable = 1};
    ck_assert_int_eq(pgs_pool_run_tx(p, &to, commit_one, keep_xid, &d), PGS_OK);
    th_run_until(b, &d.fired, 15);
    ck_assert_int_eq(d.outcome, PGS_TX_COMMITTED);
    ck_assert_msg(strchr(kept_xid, '/'), "xid %s", kept_xid);
    ck_assert_int_eq(th_resolve(b, kept_xid), PGS_TXID_COMMITTED);
    char bare[48];
    snprintf(bare, sizeof bare, "%.*s", (int)strcspn(kept_xid, "/"), kept_xid);
    close_pool(b, p);
    pgctl("restart -w -m fast");
    ck_assert_int_eq(th_resolve(b, kept_xid), PGS_TXID_UNKNOWN); /* restarted since */
    ck_assert_int_eq(th_resolve(b, bare), PGS_TXID_COMMITTED); /* (a bare id: not noticed) */
    th_loop_end(b);
}
END_TEST

/* Found by the model test (PGSCOPE_SEED=69502956878259 program 67 under ASan): a pool's
 * handle stays valid until its close's done returns, and a guard's until its close's done
 * returns: calls from inside them are refused, not a use after free. */
typedef struct closing_rec {
    pgs_pool *pool;
    pgs_conn *conn;
    int done, acquire_rc, query_rc;
} closing_rec;

static void pool_done_then_acquire(void *arg)
{
    closing_rec *r = arg;
    r->done++;
    r->acquire_rc = pgs_pool_acquire(r->pool, th_on_got, NULL, NULL);
}

static void conn_done_then_query(void *arg)
{
    closing_rec *r = arg;
    r->done++;
    r->query_rc = pgs_query(r->conn, "SELECT 1", 0, NULL, th_record, NULL);
}

START_TEST(test_handles_stay_valid_inside_their_close_done)
{
    struct event_base *b = th_loop_begin();
    closing_rec r = {0};
    r.pool = new_pool(b, "pgs_pool_closing", (pgs_pool_opts){.max_size = 1});
    ck_assert_int_eq(pgs_pool_close(r.pool, pool_done_then_acquire, &r), PGS_OK);
    th_run_until(b, &r.done, 10);
    ck_assert_int_eq(r.acquire_rc, PGS_ECLOSED);
    closing_rec q = {0};
    q.conn = th_open(b, NULL);
    ck_assert_int_eq(pgs_conn_close(q.conn, conn_done_then_query, &q), PGS_OK);
    th_run_until(b, &q.done, 10);
    ck_assert_int_eq(q.query_rc, PGS_EMISUSE);
    th_loop_end(b);
}
END_TEST

/* A body that must never run: the guard it was meant for was closed first. */
static void body_never(pgs_tx *tx, void *arg)
{
    (void)arg;
    ck_abort_msg("the body ran on a guard that was closed before it");
    pgs_tx_end(tx, 0, NULL, NULL);
}

typedef struct order_rec {
    th_txdone run;
    int run_seq, close_seq, closed;
} order_rec;

static void order_run_done(const pgs_tx_result *r, void *arg)
{
    order_rec *o = arg;
    th_record_tx(r, &o->run);
    o->run_seq = th_fire_seq++;
}

static void order_closed(void *arg)
{
    order_rec *o = arg;
    o->closed++;
    o->close_seq = th_fire_seq++;
}

START_TEST(test_guard_closed_before_its_run_body_is_not_handed_out_under_it)
{
    /* The defect: pgs_run_tx then pgs_conn_close on a pooled guard gave the guard back to the
     * pool (its close's done first) while the run's body was still to run on it. The run now
     * holds the session from the call: the close really closes, the run ends ECLOSED first. */
    struct event_base *b = th_loop_begin();
    pgs_pool *p = new_pool(b, "pool_run_close", (pgs_pool_opts){.max_size = 1});
    pgs_conn *c = acquire(b, p);
    order_rec o = {0};
    ck_assert_int_eq(pgs_run_tx(c, NULL, body_never, order_run_done, &o), PGS_OK);
    th_call k = {0};
    ck_assert_int_eq(pgs_query(c, "SELECT 1", 0, NULL, th_record, &k), PGS_EMISUSE); /* held */
    ck_assert_int_eq(pgs_conn_close(c, order_closed, &o), PGS_OK);
    th_run_until(b, &o.closed, 10);
    th_run_for(b, 0.05);
    ck_assert_int_eq(o.run.fired, 1);
    ck_assert_int_eq(o.run.outcome, PGS_TX_ROLLED_BACK);
    ck_assert_int_eq(o.run.err.code, PGS_ECLOSED);
    ck_assert_int_eq(o.run.attempts, 0);
    ck_assert_int_lt(o.run_seq, o.close_seq);
    pgs_pool_counts st;
    pgs_pool_stats(p, &st);
    ck_assert_uint_eq(st.replaced, 1); /* closed, not reused */
    pgs_conn *again = acquire(b, p); /* a fresh one works */
    th_call q = {0};
    ck_assert_int_eq(pgs_query(again, "SELECT 7", 0, NULL, th_record, &q), PGS_OK);
    th_run_until(b, &q.fired, 10);
    ck_assert_str_eq(q.value, "7");
    release(b, again);
    close_pool(b, p);
    th_loop_end(b);
}
END_TEST

static Suite *pool_suite(int restart_only)
{
    Suite *s = suite_create("pool");
    TCase *t = tcase_create("pool");
    tcase_set_timeout(t, 60);
    if (restart_only) {
        tcase_add_test(t, test_server_restart_fails_clearly_then_recovers);
        tcase_add_test(t, test_resolve_after_a_restart_says_unknown);
    } else {
        tcase_add_test(t, test_thousand_transactions_on_a_pool_of_four);
        tcase_add_test(t, test_acquire_timeout_and_waiter_bound_have_their_own_codes);
        tcase_add_test(t, test_next_user_sees_a_clean_session);
        tcase_add_test(t, test_waiter_statements_follow_the_reset);
        tcase_add_test(t, test_failed_reset_runs_nothing_after_it);
        tcase_add_test(t, test_reset_all_discards_everything_cache_included);
        tcase_add_test(t, test_no_reset_keeps_the_session_but_still_refuses_dirty_guards);
        tcase_add_test(t, test_terminated_idle_backends_replaced);
        tcase_add_test(t, test_cancelled_waiter_and_fifo_handover);
        tcase_add_test(t, test_close_with_waiters_and_guards_out);
        tcase_add_test(t, test_reentrant_calls_are_refused_or_safe);
        tcase_add_test(t, test_idle_timeout_keeps_min_size);
        tcase_add_test(t, test_dead_guards_whose_reset_is_in_flight_are_never_handed_out);
        tcase_add_test(t, test_cancel_that_stops_the_pool_reset_is_rolled_back_not_unknown);
        tcase_add_test(t, test_pool_run_tx_retries_on_another_guard_when_the_connection_died);
        tcase_add_test(t, test_pool_run_tx_done_fires_with_the_guard_back);
        tcase_add_test(t, test_handles_stay_valid_inside_their_close_done);
        tcase_add_test(t, test_guard_closed_before_its_run_body_is_not_handed_out_under_it);
    }
    suite_add_tcase(s, t);
    return s;
}



int main(int argc, char **argv)
{
    return th_run_suite(pool_suite(argc > 1 && strcmp(argv[1], "restart") == 0));
}

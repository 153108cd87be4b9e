/* Multiplexed transactions (pgs_pool_opts.multiplex) against the real server: many callers'
 * transactions pipelined on few connections, each with its exact outcome; an error, a rollback,
 * a cancel, a timeout or a lost connection costs its neighbours only what the header says; FIFO
 * service, retries, the pool's limits and close, savepoints and session state. What a test
 * checks is what a user relies on: rows in the server, outcomes and SQLSTATEs, how often each
 * callback fired, and which backends (pg_stat_activity, pg_backend_pid()) did the work. */
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "faultproxy.h"
#include "helpers.h"

/* ---- one multiplexed transaction: what it does and what became of it ---- */

enum { MAX_STMTS = 8, MAX_EXTRA = 4 };

typedef struct mtx mtx;
struct mtx {
    /* What its body does: INSERT its row (when `table`), SELECT pg_backend_pid(), then the
     * `extra` statements ("$1" in one is its id), then end (commit, or rollback when
     * `rollback`): in the body, or (`interactive`) from the last statement's callback, after
     * the body returned. `custom` replaces all that. */
    const char *table;
    int id;
    const char *extra[MAX_EXTRA];
    int rollback;
    int interactive;
    int conflict_first; /* the first attempt starts with a serialization failure */
    pgs_tx_opts opts;
    void (*custom)(mtx *m);
    void (*after)(mtx *m); /* from its done (the next round of a caller) */
    int aux;               /* for a test's own use */
    /* What happened (the last attempt's statements). */
    pgs_tx *tx;
    int body_runs;
    int body_seq, done_seq; /* th_fire_seq at the body's last run and at done */
    double body_at;
    th_call k[MAX_STMTS];
    int queued[MAX_STMTS]; /* pgs_tx_query took it: then its callback must fire once */
    int nk, pid_i, last_i;
    th_txdone d;
    th_txdone sub; /* a savepoint's end (custom bodies) */
};

static int dones, dones_wanted, dones_reached;

static void reset_counts(void)
{
    dones = 0;
    dones_wanted = INT_MAX;
    dones_reached = 0;
}

static void mtx_init(mtx *m, const char *table, int id)
{
    memset(m, 0, sizeof *m);
    m->table = table;
    m->id = id;
}

static void end_from_callback(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg)
{
    mtx *m = arg;
    th_record(c, res, err, &m->k[m->last_i]);
    ck_assert_int_eq(pgs_tx_end(m->tx, !m->rollback, NULL, NULL), PGS_OK);
}

/* Queue a statement on tx (the transaction or a savepoint of it), recorded in the next slot;
 * `ends` makes its callback end the transaction. */
static void queue_on(mtx *m, pgs_tx *tx, const char *sql, int n, const char *const *values,
                     int ends)
{
    ck_assert_int_lt(m->nk, MAX_STMTS);
    int i = m->nk++;
    m->last_i = i;
    int rc = ends ? pgs_tx_query(tx, sql, n, values, end_from_callback, m)
                  : pgs_tx_query(tx, sql, n, values, th_record, &m->k[i]);
    m->queued[i] = rc == PGS_OK;
}

/* The same with the transaction's id as $1 when the text uses it. */
static void queue(mtx *m, const char *sql, int ends)
{
    char id[16];
    snprintf(id, sizeof id, "%d", m->id);
    const char *v[] = {id};
    int with_id = strstr(sql, "$1") != NULL;
    queue_on(m, m->tx, sql, with_id, with_id ? v : NULL, ends);
}

static void mux_body(pgs_tx *tx, void *arg)
{
    mtx *m = arg;
    m->tx = tx;
    m->body_runs++;
    m->body_seq = th_fire_seq++;
    m->body_at = th_now();
    memset(m->k, 0, sizeof m->k);
    memset(m->queued, 0, sizeof m->queued);
    m->nk = 0;
    if (m->custom) {
        m->custom(m);
        return;
    }
    const char *sql[2 + MAX_EXTRA + 1];
    char insert[128];
    int n = 0;
    if (m->conflict_first && m->body_runs == 1)
        sql[n++] = TH_SERIALIZATION_FAILURE;
    if (m->table) {
        snprintf(insert, sizeof insert, "INSERT INTO %s (id, v) VALUES ($1::int, 'x')", m->table);
        sql[n++] = insert;
    }
    m->pid_i = n;
    sql[n++] = "SELECT pg_backend_pid()";
    for (int i = 0; i < MAX_EXTRA && m->extra[i]; i++)
        sql[n++] = m->extra[i];
    for (int i = 0; i < n; i++)
        queue(m, sql[i], m->interactive && i == n - 1);
    if (!m->interactive || !m->queued[m->last_i])
        ck_assert_int_eq(pgs_tx_end(tx, !m->rollback, NULL, NULL), PGS_OK);
}

static void mux_done(const pgs_tx_result *r, void *arg)
{
    mtx *m = arg;
    th_record_tx(r, &m->d);
    m->done_seq = th_fire_seq++;
    m->tx = NULL;
    if (++dones >= dones_wanted)
        dones_reached = 1;
    if (m->after)
        m->after(m);
}

static void submit(pgs_pool *p, mtx *m)
{
    ck_assert_int_eq(pgs_pool_run_tx(p, &m->opts, mux_body, mux_done, m), PGS_OK);
}

static void submit_all(pgs_pool *p, mtx *ms, int n)
{
    for (int i = 0; i < n; i++)
        submit(p, &ms[i]);
}

/* Run the loop until `n` transactions in all have fired done (or fail after seconds). */
static void wait_dones(struct event_base *b, int n, double seconds)
{
    dones_wanted = n;
    dones_reached = dones >= n;
    th_run_until(b, &dones_reached, seconds);
    dones_wanted = INT_MAX;
}

/* Run the loop until *count reaches n (or fail after seconds). */
static void wait_count(struct event_base *b, const int *count, int n, double seconds)
{
    double end = th_now() + seconds;
    while (*count < n) {
        ck_assert_msg(th_now() < end, "timed out waiting (%d of %d)", *count, n);
        th_run_for(b, 0.01);
    }
}

/* ---- what the pool and the server say ---- */

static pgs_pool *mux_pool(struct event_base *b, const char *app, pgs_pool_opts o)
{
    char extra[96];
    snprintf(extra, sizeof extra, "application_name=%s", app);
    o.multiplex = 1;
    pgs_pool *p = NULL;
    ck_assert_int_eq(pgs_pool_new(b, th_conninfo(extra), &o, &p), PGS_OK);
    return p;
}

static void close_pool(struct event_base *b, pgs_pool *p)
{
    int done = 0;
    ck_assert_int_eq(pgs_pool_close(p, th_count_done, &done), PGS_OK);
    ck_assert_int_eq(done, 0);
    th_run_until(b, &done, 20);
    ck_assert_int_eq(done, 1);
}

/* Run the loop until the pool has `size` connections, `idle` of them idle. */
static void wait_pool(struct event_base *b, pgs_pool *p, int size, int idle, double seconds)
{
    double end = th_now() + seconds;
    pgs_pool_counts st;
    for (pgs_pool_stats(p, &st); st.size != size || st.idle != idle; pgs_pool_stats(p, &st)) {
        ck_assert_msg(th_now() < end, "pool stuck at size %d idle %d", st.size, st.idle);
        th_run_for(b, 0.02);
    }
}

/* Server backends with this application_name. */
static long backends(const char *app)
{
    const char *v[] = {app};
    return th_scalar_long("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", 1,
                          v);
}

static void wait_backends_gone(const char *app, double seconds)
{
    double end = th_now() + seconds;
    long n;
    while ((n = backends(app)) > 0 && th_now() < end)
        usleep(20000);
    ck_assert_msg(n == 0, "%ld backends of %s still there after %.0f s", n, app, seconds);
}

/* Run the loop until a backend of `app` is running a statement whose text holds `marker`;
 * returns its pid. */
static int wait_running(struct event_base *b, const char *app, const char *marker, double seconds)
{
    const char *v[] = {app, marker};
    double end = th_now() + seconds;
    for (;;) {
        char *pid = th_scalar("SELECT pid FROM pg_stat_activity WHERE application_name = $1 "
                              "AND state = 'active' AND position($2 in query) > 0",
                              2, v);
        if (pid) {
            int n = atoi(pid);
            free(pid);
            return n;
        }
        ck_assert_msg(th_now() < end, "no backend of %s ran '%s' within %.0f s", app, marker,
                      seconds);
        th_run_for(b, 0.02);
    }
}

static long has_row(const char *table, long id)
{
    char sql[128], v[24];
    snprintf(sql, sizeof sql, "SELECT count(*) FROM %s WHERE id = $1::int", table);
    snprintf(v, sizeof v, "%ld", id);
    const char *vals[] = {v};
    return th_scalar_long(sql, 1, vals);
}

static void fresh_tables(const char *const *names, int n)
{
    for (int i = 0; i < n; i++)
        th_fresh_table(names[i]);
}

static void drop_table(const char *name)
{
    char sql[128];
    snprintf(sql, sizeof sql, "DROP TABLE IF EXISTS %s", name);
    free(th_scalar(sql, 0, NULL));
}

/* ---- checks ---- */

static const char *outcome_name(pgs_tx_outcome o)
{
    return o == PGS_TX_COMMITTED     ? "COMMITTED"
           : o == PGS_TX_ROLLED_BACK ? "ROLLED_BACK"
           : o == PGS_TX_UNKNOWN     ? "UNKNOWN"
                                     : "(none)";
}

/* The backend its pg_backend_pid() ran on (0: it did not answer). */
static int pid_of(const mtx *m)
{
    const th_call *k = &m->k[m->pid_i];
    return m->body_runs && k->fired && k->code == PGS_OK ? atoi(k->value) : 0;
}

/* done fired once, and every statement the body queued answered exactly once. */
static void assert_once(const mtx *m, const char *what)
{
    ck_assert_msg(m->d.fired == 1, "%s (id %d): done fired %d times", what, m->id, m->d.fired);
    for (int i = 0; i < m->nk; i++)
        ck_assert_msg(m->k[i].fired == m->queued[i], "%s (id %d): statement %d fired %d times",
                      what, m->id, i, m->k[i].fired);
}

static void assert_committed(const mtx *m, const char *what)
{
    assert_once(m, what);
    ck_assert_msg(m->d.outcome == PGS_TX_COMMITTED && !m->d.has_err, "%s (id %d): %s, %s: %s", what,
                  m->id, outcome_name(m->d.outcome),
                  m->d.has_err ? pgs_strerror(m->d.err.code) : "no error", m->d.err.message);
    if (m->table)
        ck_assert_msg(has_row(m->table, m->id) == 1, "%s (id %d): COMMITTED, but no row", what,
                      m->id);
}

/* ROLLED_BACK with this code (and SQLSTATE, unless NULL), its row absent. */
static void assert_rolled_back(const mtx *m, pgs_code code, const char *sqlstate, const char *what)
{
    assert_once(m, what);
    ck_assert_msg(m->d.outcome == PGS_TX_ROLLED_BACK, "%s (id %d): %s (%s), want ROLLED_BACK", what,
                  m->id, outcome_name(m->d.outcome), m->d.err.message);
    ck_assert_msg(m->d.has_err && m->d.err.code == code, "%s (id %d): %s (%s), want %s", what,
                  m->id, m->d.has_err ? pgs_strerror(m->d.err.code) : "no error", m->d.err.message,
                  pgs_strerror(code));
    if (sqlstate)
        ck_assert_msg(strcmp(m->d.err.sqlstate, sqlstate) == 0,
                      "%s (id %d): SQLSTATE %s (%s), "
                      "want %s",
                      what, m->id, m->d.err.sqlstate, m->d.err.message, sqlstate);
    if (m->table)
        ck_assert_msg(has_row(m->table, m->id) == 0,
                      "%s (id %d): ROLLED_BACK, but its row is "
                      "there",
                      what, m->id);
}

/* The outcome against the server: COMMITTED, its row there; ROLLED_BACK, with an error and
 * no row; UNKNOWN, PGS_ECOMMIT_UNKNOWN and either. Returns whether the row is there. */
static long assert_exact(const mtx *m, const char *table, const char *what)
{
    assert_once(m, what);
    long present = has_row(table, m->id);
    switch (m->d.outcome) {
    case PGS_TX_COMMITTED:
        ck_assert_msg(present == 1, "%s (id %d): COMMITTED, but its row is absent", what, m->id);
        ck_assert_msg(!m->d.has_err, "%s (id %d): COMMITTED with an error: %s", what, m->id,
                      m->d.err.message);
        break;
    case PGS_TX_ROLLED_BACK:
        ck_assert_msg(present == 0, "%s (id %d): ROLLED_BACK (%s), but its row is there", what,
                      m->id, m->d.err.message);
        ck_assert_msg(m->d.has_err || m->rollback, "%s (id %d): ROLLED_BACK without an error", what,
                      m->id);
        break;
    case PGS_TX_UNKNOWN:
        ck_assert_msg(m->d.has_err && m->d.err.code == PGS_ECOMMIT_UNKNOWN,
                      "%s (id %d): UNKNOWN with %s", what, m->id, pgs_strerror(m->d.err.code));
        break;
    default:
        ck_abort_msg("%s (id %d): no outcome (%d)", what, m->id, m->d.outcome);
    }
    return present;
}

/* The most transactions in flight at once (body run, done not yet fired) among those whose
 * pg_backend_pid() said `pid`. */
static int overlap_on(const mtx *ms, int n, int pid)
{
    int most = 0;
    for (int i = 0; i < n; i++) {
        if (pid_of(&ms[i]) != pid)
            continue;
        int at = ms[i].body_seq, k = 0;
        for (int j = 0; j < n; j++)
            if (pid_of(&ms[j]) == pid && ms[j].body_seq <= at && at < ms[j].done_seq)
                k++;
        if (k > most)
            most = k;
    }
    return most;
}

/* The distinct backends the transactions ran on: their number, the first `max` in pids. */
static int distinct_pids(const mtx *ms, int n, int *pids, int max)
{
    int np = 0;
    for (int i = 0; i < n; i++) {
        int pid = pid_of(&ms[i]), seen = 0;
        for (int j = 0; j < i && !seen; j++)
            seen = pid_of(&ms[j]) == pid;
        if (pid && !seen && np++ < max)
            pids[np - 1] = pid;
    }
    return np;
}

/* ---- many callers on few connections ---- */

enum { CALLERS = 64, ROUNDS = 4, MANY = CALLERS * ROUNDS };

static mtx many[MANY];
static pgs_pool *many_pool;
static long many_max_backends;

/* From a caller's done: what the server sees now, and the caller's next round. */
static void many_next(mtx *m)
{
    long slot = m - many;
    if (slot % 8 == 0) {
        long n = backends("pgs_mux_many");
        if (n > many_max_backends)
            many_max_backends = n;
    }
    if (slot + CALLERS < MANY)
        submit(many_pool, &many[slot + CALLERS]);
}

/* 64 callers, 4 rounds each, on a pool of 2 with the default depth (16): every transaction
 * commits exactly once and gets its own results, the table holds exactly their rows and sums,
 * the server never sees more than 2 backends, and transactions really were in flight together
 * on one backend. */
START_TEST(test_many_callers_share_two_backends_and_all_commit)
{
    th_observer_keep(1);
    const char *tables[] = {"mux_many"};
    fresh_tables(tables, 1);
    free(th_scalar("DROP TABLE IF EXISTS mux_many_sum", 0, NULL));
    free(th_scalar("CREATE TABLE mux_many_sum (k int PRIMARY KEY, n bigint NOT NULL)", 0, NULL));
    free(
        th_scalar("INSERT INTO mux_many_sum SELECT k, 0 FROM generate_series(0, 7) AS k", 0, NULL));
    struct event_base *b = th_loop_begin();
    reset_counts();
    many_max_backends = 0;
    many_pool =
        mux_pool(b, "pgs_mux_many", (pgs_pool_opts){.max_size = 2, .acquire_timeout_ms = 60000});
    for (int i = 0; i < MANY; i++) {
        mtx_init(&many[i], "mux_many", i + 1);
        many[i].extra[0] = "UPDATE mux_many_sum SET n = n + $1::int WHERE k = $1::int % 8";
        many[i].extra[1] = "SELECT $1::int * 7";
        many[i].after = many_next;
    }
    submit_all(many_pool, many, CALLERS);
    for (int i = 0; i < CALLERS; i++)
        ck_assert_int_eq(many[i].body_runs, 0); /* from the loop, never inside the call */
    wait_dones(b, MANY, 90);
    long during = backends("pgs_mux_many");
    close_pool(b, many_pool);
    th_loop_end(b);
    for (int i = 0; i < MANY; i++) {
        ck_assert_int_eq(many[i].body_runs, 1);
        ck_assert_int_eq(many[i].d.attempts, 1);
        assert_committed(&many[i], "many callers");
        ck_assert_msg(atol(many[i].k[3].value) == 7L * many[i].id,
                      "id %d got '%s', another's "
                      "result",
                      many[i].id, many[i].k[3].value);
    }
    ck_assert_int_eq(th_rows("mux_many"), MANY);
    ck_assert_int_eq(th_scalar_long("SELECT sum(n) FROM mux_many_sum", 0, NULL),
                     (long)MANY * (MANY + 1) / 2);
    ck_assert_int_eq(th_scalar_long("SELECT count(*) FROM mux_many_sum s WHERE n <> "
                                    "(SELECT coalesce(sum(id), 0) FROM mux_many WHERE id % 8 = "
                                    "s.k)",
                                    0, NULL),
                     0);
    int pids[8];
    int np = distinct_pids(many, MANY, pids, 8);
    ck_assert_msg(np >= 1 && np <= 2, "the transactions ran on %d backends", np);
    ck_assert_int_le(many_max_backends, 2);
    ck_assert_int_le(during, 2);
    int most = 0;
    for (int i = 0; i < np; i++) {
        int o = overlap_on(many, MANY, pids[i]);
        printf("test_mux: many callers: backend %d: at most %d transactions in flight\n", pids[i],
               o);
        if (o > most)
            most = o;
        ck_assert_msg(o <= 16, "backend %d had %d transactions in flight (mux_depth 16)", pids[i],
                      o);
    }
    ck_assert_msg(most >= 2, "no two transactions were ever in flight together on a backend");
    ck_assert_int_eq(backends("pgs_mux_many"), 0);
    drop_table("mux_many");
    drop_table("mux_many_sum");
    th_observer_keep(0);
}
END_TEST

/* A connection in use with room takes the next transactions: 8 callers on a warm pool of up to
 * 4 all run on its one connection, together, and no other is opened. */
START_TEST(test_few_callers_fill_one_connection_before_another_is_taken)
{
    th_observer_keep(1);
    const char *tables[] = {"mux_few"};
    fresh_tables(tables, 1);
    struct event_base *b = th_loop_begin();
    reset_counts();
    pgs_pool *p = mux_pool(b, "pgs_mux_few", (pgs_pool_opts){.max_size = 4});
    static mtx warm, few[8];
    mtx_init(&warm, "mux_few", 100);
    submit(p, &warm);
    wait_dones(b, 1, 15);
    assert_committed(&warm, "warm-up");
    for (int i = 0; i < 8; i++)
        mtx_init(&few[i], "mux_few", i + 1);
    submit_all(p, few, 8);
    wait_dones(b, 9, 15);
    pgs_pool_counts st;
    pgs_pool_stats(p, &st);
    long seen = backends("pgs_mux_few");
    close_pool(b, p);
    th_loop_end(b);
    for (int i = 0; i < 8; i++) {
        assert_committed(&few[i], "few callers");
        ck_assert_msg(pid_of(&few[i]) == pid_of(&warm),
                      "transaction %d ran on backend %d, not "
                      "on the connection in use (%d)",
                      i, pid_of(&few[i]), pid_of(&warm));
    }
    ck_assert_int_eq(st.size, 1);
    ck_assert_int_eq(seen, 1);
    ck_assert_int_ge(overlap_on(few, 8, pid_of(&warm)), 2);
    ck_assert_int_eq(th_rows("mux_few"), 9);
    drop_table("mux_few");
    th_observer_keep(0);
}
END_TEST

/* ---- an error aborts only its own transaction ---- */

/* Ten transactions pipelined on one connection: a unique violation, a division by zero (then
 * a statement it aborted), a rollback asked for, and a failure decided after the body returned
 * each end their own transaction only, with its first error; the others commit. */
START_TEST(test_an_error_aborts_only_its_own_transaction)
{
    th_observer_keep(1);
    const char *tables[] = {"mux_err"};
    fresh_tables(tables, 1);
    free(th_scalar("INSERT INTO mux_err (id, v) VALUES (100, 'there')", 0, NULL));
    struct event_base *b = th_loop_begin();
    reset_counts();
    pgs_pool *p = mux_pool(b, "pgs_mux_err", (pgs_pool_opts){.max_size = 1});
    static mtx t[10];
    for (int i = 0; i < 10; i++)
        mtx_init(&t[i], "mux_err", i + 1);
    t[2].extra[0] = "INSERT INTO mux_err (id, v) VALUES (100, 'again')"; /* 23505 */
    t[4].extra[0] = "SELECT 1 / ($1::int - 5)";                          /* 22012 */
    t[4].extra[1] = "INSERT INTO mux_err (id, v) VALUES (100, 'again')"; /* aborted by it */
    t[6].rollback = 1;
    t[8].extra[0] = "SELECT 1 / ($1::int - 9)";
    t[8].interactive = 1;
    submit_all(p, t, 10);
    wait_dones(b, 10, 20);
    close_pool(b, p);
    th_loop_end(b);
    for (int i = 0; i < 10; i++) {
        char what[64];
        snprintf(what, sizeof what, "transaction %d", i);
        if (i == 2) {
            assert_rolled_back(&t[i], PGS_ESQL, "23505", what);
            ck_assert_int_eq(t[i].k[0].code, PGS_OK); /* its own INSERT ran, and went */
            ck_assert_str_eq(t[i].k[2].sqlstate, "23505");
        } else if (i == 4) {
            assert_rolled_back(&t[i], PGS_ESQL, "22012", what); /* the first error */
            ck_assert_str_eq(t[i].k[2].sqlstate, "22012");
            ck_assert_int_eq(t[i].k[3].code, PGS_ESQL);
            ck_assert_str_eq(t[i].k[3].sqlstate, "22012"); /* the error that aborted it */
        } else if (i == 6) {
            assert_once(&t[i], what);
            ck_assert_int_eq(t[i].d.outcome, PGS_TX_ROLLED_BACK);
            ck_assert_int_eq(t[i].d.has_err, 0); /* it did what its end asked */
            ck_assert_int_eq(has_row("mux_err", t[i].id), 0);
        } else if (i == 8) {
            assert_rolled_back(&t[i], PGS_ESQL, "22012", what);
        } else {
            assert_committed(&t[i], what);
        }
        ck_assert_int_eq(pid_of(&t[i]), pid_of(&t[0]));
    }
    ck_assert_msg(overlap_on(t, 10, pid_of(&t[0])) >= 2, "the transactions were never pipelined "
                                                         "together");
    ck_assert_int_eq(th_rows("mux_err"), 1 + 6);
    drop_table("mux_err");
    th_observer_keep(0);
}
END_TEST

/* ---- a body that waits holds its connection alone ---- */

enum { AHEAD = 10, BEHIND = 100 };

/* On a pool of 2: ten transactions, then one whose body returns without ending (it decides
 * after a 3 s statement), then 100 more. The ten share its connection; the hundred all run on
 * the other one and are done long before the slow one is. */
START_TEST(test_a_waiting_body_holds_its_connection_and_stalls_no_one)
{
    th_observer_keep(1);
    const char *tables[] = {"mux_hold"};
    fresh_tables(tables, 1);
    struct event_base *b = th_loop_begin();
    reset_counts();
    pgs_pool *p = mux_pool(b, "pgs_mux_hold", (pgs_pool_opts){.min_size = 2, .max_size = 2});
    wait_pool(b, p, 2, 2, 15);
    static mtx ahead[AHEAD], slow, behind[BEHIND];
    for (int i = 0; i < AHEAD; i++)
        mtx_init(&ahead[i], "mux_hold", i + 1);
    mtx_init(&slow, "mux_hold", 50);
    slow.extra[0] = "SELECT pg_sleep(3)";
    slow.interactive = 1;
    for (int i = 0; i < BEHIND; i++)
        mtx_init(&behind[i], "mux_hold", 101 + i);
    submit_all(p, ahead, AHEAD);
    submit(p, &slow);
    submit_all(p, behind, BEHIND);
    wait_dones(b, AHEAD + 1 + BEHIND, 60);
    long seen = backends("pgs_mux_hold");
    close_pool(b, p);
    th_loop_end(b);
    assert_committed(&slow, "the slow one");
    ck_assert_msg(slow.d.at - slow.body_at >= 2.9, "the slow one took %.3f s",
                  slow.d.at - slow.body_at);
    int held = pid_of(&slow);
    for (int i = 0; i < AHEAD; i++) {
        assert_committed(&ahead[i], "ahead");
        ck_assert_msg(pid_of(&ahead[i]) == held, "ahead %d ran on %d, not with the slow one (%d)",
                      i, pid_of(&ahead[i]), held);
    }
    for (int i = 0; i < BEHIND; i++) {
        assert_committed(&behind[i], "behind");
        ck_assert_msg(pid_of(&behind[i]) != held,
                      "behind %d was put behind the held "
                      "transaction (backend %d)",
                      i, held);
        ck_assert_msg(behind[i].done_seq < slow.done_seq, "behind %d ended after the slow one", i);
        ck_assert_msg(behind[i].d.at < slow.d.at, "behind %d waited for the slow one", i);
    }
    ck_assert_int_ge(overlap_on(behind, BEHIND, pid_of(&behind[0])), 2);
    ck_assert_int_le(seen, 2);
    ck_assert_int_eq(th_rows("mux_hold"), AHEAD + 1 + BEHIND);
    drop_table("mux_hold");
    th_observer_keep(0);
}
END_TEST

/* ---- FIFO ---- */

enum { FIFO = 40 };

/* One connection, mux_depth 1 or 4: bodies run and transactions end in the order they were
 * asked for, and never more than mux_depth are in flight. */
START_TEST(test_requests_are_served_in_the_order_made)
{
    int depth = _i == 0 ? 1 : 4;
    th_observer_keep(1);
    const char *tables[] = {"mux_fifo"};
    fresh_tables(tables, 1);
    struct event_base *b = th_loop_begin();
    reset_counts();
    pgs_pool *p = mux_pool(b, "pgs_mux_fifo", (pgs_pool_opts){.max_size = 1, .mux_depth = depth});
    static mtx t[FIFO];
    for (int i = 0; i < FIFO; i++)
        mtx_init(&t[i], "mux_fifo", i + 1);
    submit_all(p, t, FIFO);
    wait_dones(b, FIFO, 30);
    close_pool(b, p);
    th_loop_end(b);
    for (int i = 0; i < FIFO; i++) {
        assert_committed(&t[i], "fifo");
        if (i > 0) {
            ck_assert_msg(t[i].body_seq > t[i - 1].body_seq, "depth %d: body %d ran before %d",
                          depth, i, i - 1);
            ck_assert_msg(t[i].done_seq > t[i - 1].done_seq, "depth %d: %d ended before %d", depth,
                          i, i - 1);
        }
    }
    int o = overlap_on(t, FIFO, pid_of(&t[0]));
    ck_assert_msg(o <= depth, "%d in flight at once with mux_depth %d", o, depth);
    if (depth > 1)
        ck_assert_msg(o >= 2, "mux_depth %d, but never two in flight", depth);
    drop_table("mux_fifo");
    th_observer_keep(0);
}
END_TEST

/* ---- retries ---- */

/* A serialization failure on the first attempt among neighbours on one connection: with
 * retries 2 it commits on the second (attempts 2); with retries 0 it ends ROLLED_BACK 40001
 * after one. The neighbours commit either way. */
START_TEST(test_serialization_failure_is_retried_as_asked)
{
    int retries = _i == 0 ? 2 : 0;
    th_observer_keep(1);
    const char *tables[] = {"mux_retry"};
    fresh_tables(tables, 1);
    struct event_base *b = th_loop_begin();
    reset_counts();
    pgs_pool *p = mux_pool(b, "pgs_mux_retry", (pgs_pool_opts){.max_size = 1});
    static mtx t[9];
    for (int i = 0; i < 9; i++)
        mtx_init(&t[i], "mux_retry", i + 1);
    mtx *r = &t[4];
    r->conflict_first = 1;
    r->opts.retries = retries;
    submit_all(p, t, 9);
    wait_dones(b, 9, 20);
    close_pool(b, p);
    th_loop_end(b);
    for (int i = 0; i < 9; i++)
        if (i != 4)
            assert_committed(&t[i], "neighbour");
    if (retries) {
        assert_committed(r, "retried");
        ck_assert_int_eq(r->body_runs, 2);
        ck_assert_msg(r->d.attempts == 2, "the body ran twice, done says attempts %d",
                      r->d.attempts);
    } else {
        assert_rolled_back(r, PGS_ESQL, "40001", "not retried");
        ck_assert_int_eq(r->d.attempts, 1);
        ck_assert_int_eq(r->body_runs, 1);
    }
    drop_table("mux_retry");
    th_observer_keep(0);
}
END_TEST

enum { QUEUED = 40 };

/* One connection, depth 1, 40 requests of 20 ms each behind a transaction that fails with
 * 40001: its retry (backoff at most 20 ms) goes to the head of the queue, so most of the 40
 * run after it, not before. */
START_TEST(test_a_retry_goes_to_the_head_of_the_queue)
{
    th_observer_keep(1);
    const char *tables[] = {"mux_head"};
    fresh_tables(tables, 1);
    struct event_base *b = th_loop_begin();
    reset_counts();
    pgs_pool *p = mux_pool(b, "pgs_mux_head", (pgs_pool_opts){.max_size = 1, .mux_depth = 1});
    static mtx r, t[QUEUED];
    mtx_init(&r, "mux_head", 1000);
    r.conflict_first = 1;
    r.opts = (pgs_tx_opts){.retries = 2, .retry_base_ms = 20, .retry_max_ms = 20};
    for (int i = 0; i < QUEUED; i++) {
        mtx_init(&t[i], "mux_head", i + 1);
        t[i].extra[0] = "SELECT pg_sleep(0.02)";
    }
    submit(p, &r);
    submit_all(p, t, QUEUED);
    wait_dones(b, QUEUED + 1, 60);
    close_pool(b, p);
    th_loop_end(b);
    assert_committed(&r, "retried");
    ck_assert_int_eq(r.body_runs, 2);
    int after = 0;
    for (int i = 0; i < QUEUED; i++) {
        assert_committed(&t[i], "queued");
        after += t[i].body_seq > r.body_seq;
    }
    printf("test_mux: the retry ran before %d of the %d queued transactions\n", after, QUEUED);
    ck_assert_msg(after >= QUEUED / 2, "the retry ran behind %d of %d requests made after it",
                  QUEUED - after, QUEUED);
    ck_assert_msg(r.d.attempts == 2, "the body ran twice, done says attempts %d", r.d.attempts);
    drop_table("mux_head");
    th_observer_keep(0);
}
END_TEST

/* The connection is cut right after COMMIT reached the server: UNKNOWN (the server committed:
 * the row is there, the id resolves so), and never retried though retries were allowed; the
 * pool then serves the next transaction on a new connection. */
START_TEST(test_an_unknown_commit_is_never_retried)
{
    th_observer_keep(1);
    const char *tables[] = {"mux_unknown"};
    fresh_tables(tables, 1);
    struct event_base *b = th_loop_begin();
    reset_counts();
    th_proxy *px = th_proxy_start(atoi(th_conninfo_value("port")));
    char ci[2048];
    snprintf(ci, sizeof ci, "%s application_name=pgs_mux_unknown", th_proxy_conninfo(px));
    pgs_pool *p = NULL;
    pgs_pool_opts o = {.max_size = 1, .multiplex = 1};
    ck_assert_int_eq(pgs_pool_new(b, ci, &o, &p), PGS_OK);
    static mtx u, next;
    mtx_init(&u, "mux_unknown", 1);
    u.opts = (pgs_tx_opts){.retries = 3, .resolvable = 1};
    fp_on_commit(px, FP_COMMIT_CUT_AFTER, 1, 1);
    submit(p, &u);
    wait_dones(b, 1, 20);
    fp_counts k;
    fp_get_counts(px, &k);
    ck_assert_int_eq(k.commit_faults, 1);
    ck_assert_msg(u.d.outcome == PGS_TX_UNKNOWN, "outcome %s: %s", outcome_name(u.d.outcome),
                  u.d.err.message);
    ck_assert_int_eq(u.d.err.code, PGS_ECOMMIT_UNKNOWN);
    ck_assert_int_eq(u.d.attempts, 1);
    ck_assert_int_eq(u.body_runs, 1);
    ck_assert_msg(u.d.xid[0] != '\0', "no transaction id");
    ck_assert_int_eq(th_resolve(b, u.d.xid), PGS_TXID_COMMITTED);
    mtx_init(&next, "mux_unknown", 2);
    submit(p, &next);
    wait_dones(b, 2, 20);
    close_pool(b, p);
    th_proxy_stop(px);
    th_loop_end(b);
    assert_once(&u, "unknown");
    ck_assert_int_eq(has_row("mux_unknown", 1), 1);
    assert_committed(&next, "the next one");
    ck_assert_int_ne(pid_of(&next), pid_of(&u));
    drop_table("mux_unknown");
    th_observer_keep(0);
}
END_TEST

/* ---- the pool's limits ---- */

/* The only connection is held by a transaction that decides after a 2 s statement: a request
 * that waits ends after acquire_timeout_ms (200) ROLLED_BACK with PGS_ETIMEDOUT, attempts 0,
 * its body never run; the held one commits. */
START_TEST(test_acquire_timeout_while_the_only_connection_is_held)
{
    th_observer_keep(1);
    const char *tables[] = {"mux_acq"};
    fresh_tables(tables, 1);
    struct event_base *b = th_loop_begin();
    reset_counts();
    pgs_pool *p = mux_pool(
        b, "pgs_mux_acq", (pgs_pool_opts){.min_size = 1, .max_size = 1, .acquire_timeout_ms = 200});
    wait_pool(b, p, 1, 1, 15);
    static mtx held, w;
    mtx_init(&held, "mux_acq", 1);
    held.extra[0] = "SELECT pg_sleep(2)";
    held.interactive = 1;
    mtx_init(&w, "mux_acq", 2);
    submit(p, &held);
    wait_count(b, &held.body_runs, 1, 10);
    double t0 = th_now();
    submit(p, &w);
    wait_dones(b, 1, 10);
    ck_assert_int_eq(w.d.fired, 1);
    double took = w.d.at - t0;
    ck_assert_msg(took >= 0.15 && took < 1.5, "the waiter ended after %.3f s", took);
    wait_dones(b, 2, 15);
    close_pool(b, p);
    th_loop_end(b);
    assert_committed(&held, "held");
    assert_rolled_back(&w, PGS_ETIMEDOUT, NULL, "waiter");
    ck_assert_int_eq(w.d.attempts, 0);
    ck_assert_int_eq(w.body_runs, 0);
    ck_assert_int_lt(w.done_seq, held.done_seq);
    drop_table("mux_acq");
    th_observer_keep(0);
}
END_TEST

/* max_waiting 1 while the only connection is held: the first request waits (and commits once
 * the held one ends), the second is refused at once with PGS_EBUSY and its done never fires. */
START_TEST(test_max_waiting_refuses_at_once_and_done_never_fires)
{
    th_observer_keep(1);
    const char *tables[] = {"mux_busy"};
    fresh_tables(tables, 1);
    struct event_base *b = th_loop_begin();
    reset_counts();
    pgs_pool *p = mux_pool(b, "pgs_mux_busy",
                           (pgs_pool_opts){.min_size = 1, .max_size = 1, .max_waiting = 1});
    wait_pool(b, p, 1, 1, 15);
    static mtx held, w1, w2;
    mtx_init(&held, "mux_busy", 1);
    held.extra[0] = "SELECT pg_sleep(1)";
    held.interactive = 1;
    mtx_init(&w1, "mux_busy", 2);
    mtx_init(&w2, "mux_busy", 3);
    submit(p, &held);
    wait_count(b, &held.body_runs, 1, 10);
    submit(p, &w1);
    ck_assert_int_eq(pgs_pool_run_tx(p, NULL, mux_body, mux_done, &w2), PGS_EBUSY);
    ck_assert_msg(pgs_pool_refusal(p)[0] != '\0', "no words for the refusal");
    wait_dones(b, 2, 20);
    close_pool(b, p);
    th_loop_end(b);
    assert_committed(&held, "held");
    assert_committed(&w1, "waiter");
    ck_assert_int_gt(w1.done_seq, held.done_seq);
    ck_assert_int_eq(w2.d.fired, 0);
    ck_assert_int_eq(w2.body_runs, 0);
    ck_assert_int_eq(has_row("mux_busy", 3), 0);
    drop_table("mux_busy");
    th_observer_keep(0);
}
END_TEST

/* The server cannot be reached: a request ends after acquire_timeout_ms ROLLED_BACK with
 * PGS_ECONNECT (and the connect error), attempts 0, its body never run. */
START_TEST(test_unreachable_server_ends_requests_with_econnect)
{
    struct event_base *b = th_loop_begin();
    reset_counts();
    char ci[2048];
    snprintf(ci, sizeof ci, "%s", th_conninfo(NULL));
    char extra[96];
    snprintf(extra, sizeof extra, "host=127.0.0.1 hostaddr=127.0.0.1 port=%d", th_closed_port());
    snprintf(ci, sizeof ci, "%s", th_conninfo(extra));
    pgs_pool *p = NULL;
    pgs_pool_opts o = {.max_size = 2, .acquire_timeout_ms = 300, .multiplex = 1};
    ck_assert_int_eq(pgs_pool_new(b, ci, &o, &p), PGS_OK);
    static mtx t[3];
    for (int i = 0; i < 3; i++)
        mtx_init(&t[i], NULL, i + 1);
    double t0 = th_now();
    submit_all(p, t, 3);
    wait_dones(b, 3, 15);
    close_pool(b, p);
    th_loop_end(b);
    for (int i = 0; i < 3; i++) {
        assert_rolled_back(&t[i], PGS_ECONNECT, NULL, "unreachable");
        ck_assert_int_eq(t[i].d.attempts, 0);
        ck_assert_int_eq(t[i].body_runs, 0);
        ck_assert_msg(t[i].d.at - t0 >= 0.25 && t[i].d.at - t0 < 5, "ended after %.3f s",
                      t[i].d.at - t0);
    }
}
END_TEST

typedef th_got got; /* (tests/helpers.h) */

/* pgs_pool_acquire's guards come from the same max_size: with one of 2 held by hand, every
 * multiplexed transaction runs on the other; with the only one held, they wait, and run once
 * it is given back. */
START_TEST(test_acquired_guards_and_multiplexed_transactions_share_max_size)
{
    th_observer_keep(1);
    const char *tables[] = {"mux_share"};
    fresh_tables(tables, 1);
    struct event_base *b = th_loop_begin();
    reset_counts();
    int size = _i == 0 ? 2 : 1;
    pgs_pool *p = mux_pool(b, "pgs_mux_share", (pgs_pool_opts){.max_size = size});
    got g = {0};
    ck_assert_int_eq(pgs_pool_acquire(p, th_on_got, &g, NULL), PGS_OK);
    th_run_until(b, &g.fired, 15);
    ck_assert_int_eq(g.code, PGS_OK);
    int held = th_backend_pid(g.conn);
    static mtx t[20];
    for (int i = 0; i < 20; i++)
        mtx_init(&t[i], "mux_share", i + 1);
    submit_all(p, t, 20);
    if (size == 1) {
        th_run_for(b, 0.3);
        ck_assert_int_eq(dones, 0);
        for (int i = 0; i < 20; i++)
            ck_assert_int_eq(t[i].body_runs, 0);
        th_close(b, g.conn);
    }
    wait_dones(b, 20, 20);
    long seen = backends("pgs_mux_share");
    if (size == 2)
        th_close(b, g.conn);
    close_pool(b, p);
    th_loop_end(b);
    ck_assert_int_le(seen, size);
    for (int i = 0; i < 20; i++) {
        assert_committed(&t[i], "multiplexed");
        if (size == 2)
            ck_assert_int_ne(pid_of(&t[i]), held);
    }
    drop_table("mux_share");
    th_observer_keep(0);
}
END_TEST

/* ---- cancel and timeout ---- */

/* Neighbours ahead and behind a transaction whose statement sleeps 5 s on the shared
 * connection; it is cancelled (_i 0: pgs_tx_cancel while its sleep runs; _i 1: its own
 * timeout_ms, 500): it ends ROLLED_BACK with the cancel's code, its row absent; every neighbour
 * commits (those behind run to their end); then the connection is closed, never reused, and
 * the next transaction runs on a new one. */
START_TEST(test_cancel_rolls_back_only_its_own_and_retires_the_connection)
{
    int by_timeout = _i == 1;
    pgs_code code = by_timeout ? PGS_ETIMEDOUT : PGS_ECANCELED;
    const char *what = by_timeout ? "timeout_ms" : "pgs_tx_cancel";
    th_observer_keep(1);
    const char *tables[] = {"mux_cancel"};
    fresh_tables(tables, 1);
    struct event_base *b = th_loop_begin();
    reset_counts();
    pgs_pool *p = mux_pool(b, "pgs_mux_cancel", (pgs_pool_opts){.max_size = 1});
    static mtx t[9], next;
    for (int i = 0; i < 9; i++)
        mtx_init(&t[i], "mux_cancel", i + 1);
    mtx *c = &t[4];
    c->extra[0] = "SELECT pg_sleep(5) /* mux_cancel_me */";
    if (by_timeout)
        c->opts.timeout_ms = 500;
    submit_all(p, t, 9);
    int pid = wait_running(b, "pgs_mux_cancel", "mux_cancel_me", 10);
    if (!by_timeout) {
        ck_assert_ptr_nonnull(c->tx);
        ck_assert_int_eq(pgs_tx_cancel(c->tx), PGS_OK);
    }
    wait_dones(b, 9, 20);
    th_wait_backend_gone(pid, 15); /* closed, never reused */
    mtx_init(&next, "mux_cancel", 100);
    submit(p, &next);
    wait_dones(b, 10, 20);
    close_pool(b, p);
    th_loop_end(b);
    assert_rolled_back(c, code, NULL, what);
    ck_assert_int_eq(c->k[c->nk - 1].code, code); /* its sleep got the cancel's code */
    for (int i = 0; i < 9; i++) {
        if (i == 4)
            continue;
        assert_committed(&t[i], what);
        /* Those ahead of it ran on its connection; those behind it in its pipeline segment
         * were skipped with it and ran again on another (the cancelled one takes no more). */
        if (i < 4)
            ck_assert_int_eq(pid_of(&t[i]), pid);
    }
    assert_committed(&next, "after the cancel");
    ck_assert_int_ne(pid_of(&next), pid);
    for (int i = 0; i < 9; i++) /* nothing fired again while the loop drained */
        assert_once(&t[i], "after the loop drained");
    drop_table("mux_cancel");
    th_observer_keep(0);
}
END_TEST

/* The cancel request reaches a neighbour's statement: a neighbour sleeps 5 s, and a transaction
 * behind it is cancelled. The neighbour rolls back with 57014 (PGS_ESQL: not its own cancel);
 * the cancelled one rolls back with PGS_ECANCELED (_i 0: it had not ended, its COMMIT never
 * written) or ends as its COMMIT's reply says (_i 1: it had ended at once, with more behind
 * it); the others commit; each outcome matches the server, and the connection is closed. */
START_TEST(test_cancel_that_reaches_a_neighbour_is_reported_on_the_neighbour)
{
    int cancelled_ended = _i == 1;
    th_observer_keep(1);
    const char *tables[] = {"mux_hit"};
    fresh_tables(tables, 1);
    struct event_base *b = th_loop_begin();
    reset_counts();
    pgs_pool *p = mux_pool(b, "pgs_mux_hit", (pgs_pool_opts){.max_size = 1});
    enum { N = 8, SLOW = 2, CANCELLED = 5 };
    static mtx t[N], next;
    for (int i = 0; i < N; i++)
        mtx_init(&t[i], "mux_hit", i + 1);
    t[SLOW].extra[0] = "SELECT pg_sleep(5) /* mux_hit_slow */";
    mtx *c = &t[CANCELLED];
    c->interactive = !cancelled_ended;
    int n = cancelled_ended ? N : CANCELLED + 1; /* nothing goes behind a held transaction */
    submit_all(p, t, n);
    int pid = wait_running(b, "pgs_mux_hit", "mux_hit_slow", 10);
    wait_count(b, &c->body_runs, 1, 10);
    ck_assert_ptr_nonnull(c->tx);
    ck_assert_int_eq(pgs_tx_cancel(c->tx), PGS_OK);
    wait_dones(b, n, 20);
    th_wait_backend_gone(pid, 15);
    mtx_init(&next, "mux_hit", 100);
    submit(p, &next);
    wait_dones(b, n + 1, 20);
    close_pool(b, p);
    th_loop_end(b);
    assert_rolled_back(&t[SLOW], PGS_ESQL, "57014", "the neighbour the cancel reached");
    if (!cancelled_ended) {
        assert_rolled_back(c, PGS_ECANCELED, NULL, "cancelled");
        for (int i = 0; i < c->nk; i++)
            ck_assert_msg(c->k[i].code == PGS_ECANCELED, "cancelled: statement %d got %s", i,
                          pgs_strerror(c->k[i].code));
    } else {
        long present = assert_exact(c, "mux_hit", "cancelled, ended at once");
        if (c->d.outcome == PGS_TX_ROLLED_BACK)
            ck_assert_int_eq(c->d.err.code, PGS_ECANCELED);
        printf("test_mux: the cancelled transaction whose COMMIT was sent: %s, row %s\n",
               outcome_name(c->d.outcome), present ? "present" : "absent");
    }
    for (int i = 0; i < n; i++)
        if (i != SLOW && i != CANCELLED)
            assert_committed(&t[i], "neighbour");
    assert_committed(&next, "after the cancel");
    ck_assert_int_ne(pid_of(&next), pid);
    drop_table("mux_hit");
    th_observer_keep(0);
}
END_TEST

/* pgs_tx_opts.statement_timeout_ms on one transaction among neighbours: its slow statement
 * fails with PGS_ETIMEDOUT (57014) and it rolls back; the neighbours commit and do not inherit
 * its limit; the connection stays in use (the next transaction runs on the same backend). */
START_TEST(test_statement_timeout_fails_only_its_own_and_keeps_the_connection)
{
    th_observer_keep(1);
    const char *tables[] = {"mux_stmt"};
    fresh_tables(tables, 1);
    char *timeout = th_scalar("SHOW statement_timeout", 0, NULL);
    struct event_base *b = th_loop_begin();
    reset_counts();
    pgs_pool *p = mux_pool(b, "pgs_mux_stmt", (pgs_pool_opts){.max_size = 1});
    static mtx t[7], next;
    for (int i = 0; i < 7; i++) {
        mtx_init(&t[i], "mux_stmt", i + 1);
        t[i].extra[0] = "SHOW statement_timeout";
    }
    t[3].opts.statement_timeout_ms = 200;
    t[3].extra[1] = "SELECT pg_sleep(3)";
    submit_all(p, t, 7);
    wait_dones(b, 7, 20);
    mtx_init(&next, "mux_stmt", 100);
    submit(p, &next);
    wait_dones(b, 8, 20);
    close_pool(b, p);
    th_loop_end(b);
    assert_rolled_back(&t[3], PGS_ETIMEDOUT, "57014", "over its statement_timeout_ms");
    ck_assert_str_eq(t[3].k[2].value, "200ms");
    ck_assert_int_eq(t[3].k[3].code, PGS_ETIMEDOUT);
    for (int i = 0; i < 7; i++) {
        if (i != 3) {
            assert_committed(&t[i], "neighbour");
            ck_assert_str_eq(t[i].k[2].value, timeout);
        }
        ck_assert_int_eq(pid_of(&t[i]), pid_of(&t[0]));
    }
    assert_committed(&next, "the next");
    ck_assert_int_eq(pid_of(&next), pid_of(&t[0])); /* not closed: a server-side limit */
    free(timeout);
    drop_table("mux_stmt");
    th_observer_keep(0);
}
END_TEST

/* Session state a body leaves behind (SET without LOCAL: a misuse the header warns of) reaches
 * the next transaction on the connection, as documented: no reset runs between transactions;
 * once the connection has been idle over a second it goes back to the pool and its session is
 * reset, so a transaction after that sees the default, on the same backend. */
START_TEST(test_session_state_left_behind_lasts_until_the_idle_reset)
{
    th_observer_keep(1);
    char *timeout = th_scalar("SHOW statement_timeout", 0, NULL);
    struct event_base *b = th_loop_begin();
    reset_counts();
    pgs_pool *p = mux_pool(b, "pgs_mux_leak", (pgs_pool_opts){.max_size = 1});
    static mtx t[3];
    for (int i = 0; i < 3; i++) {
        mtx_init(&t[i], NULL, i + 1);
        t[i].extra[0] = "SHOW statement_timeout";
    }
    t[0].extra[0] = "SET statement_timeout = '7777ms'";
    submit_all(p, t, 2);
    wait_dones(b, 2, 15);
    th_run_for(b, 2.5);
    pgs_pool_counts st;
    pgs_pool_stats(p, &st);
    submit(p, &t[2]);
    wait_dones(b, 3, 15);
    close_pool(b, p);
    th_loop_end(b);
    for (int i = 0; i < 3; i++) {
        assert_committed(&t[i], "session state");
        ck_assert_int_eq(pid_of(&t[i]), pid_of(&t[0]));
    }
    ck_assert_str_eq(t[1].k[1].value, "7777ms"); /* inherited, as the header warns */
    ck_assert_str_eq(t[2].k[1].value, timeout);  /* reset after the idle second */
    ck_assert_uint_ge(st.reset, 1);
    free(timeout);
    th_observer_keep(0);
}
END_TEST

/* The reply to a COMMIT never comes (the fault proxy holds the server's replies after it), and
 * that transaction's timeout_ms passes: it waits commit_grace_ms, then the connection is closed
 * at once and every COMMIT in flight on it ends UNKNOWN (the server did commit them: rows there,
 * ids resolve so); the pool then serves on a new connection. */
START_TEST(test_commit_reply_never_coming_makes_every_commit_in_flight_unknown)
{
    th_observer_keep(1);
    const char *tables[] = {"mux_grace"};
    fresh_tables(tables, 1);
    struct event_base *b = th_loop_begin();
    reset_counts();
    th_proxy *px = th_proxy_start(atoi(th_conninfo_value("port")));
    char ci[2048];
    snprintf(ci, sizeof ci, "%s application_name=pgs_mux_grace", th_proxy_conninfo(px));
    pgs_pool *p = NULL;
    pgs_pool_opts o = {.max_size = 1, .multiplex = 1};
    ck_assert_int_eq(pgs_pool_new(b, ci, &o, &p), PGS_OK);
    static mtx t[4], next;
    for (int i = 0; i < 4; i++) {
        mtx_init(&t[i], "mux_grace", i + 1);
        t[i].opts.resolvable = 1;
    }
    t[0].opts.timeout_ms = 400;
    t[0].opts.commit_grace_ms = 300;
    fp_on_commit(px, FP_COMMIT_STALL_AFTER, 1, 1);
    submit_all(p, t, 4);
    wait_dones(b, 4, 20);
    double took = t[0].d.at - t[0].body_at;
    fp_stall_replies(px, 0);
    mtx_init(&next, "mux_grace", 100);
    submit(p, &next);
    wait_dones(b, 5, 20);
    close_pool(b, p);
    th_proxy_stop(px);
    wait_backends_gone("pgs_mux_grace", 15);
    ck_assert_msg(t[0].d.outcome == PGS_TX_UNKNOWN, "%s: %s", outcome_name(t[0].d.outcome),
                  t[0].d.err.message);
    ck_assert_msg(took >= 0.6 && took < 3,
                  "it ended %.3f s after its body ran (timeout 0.4 s "
                  "+ grace 0.3 s)",
                  took);
    int unknown = 0;
    for (int i = 0; i < 4; i++) {
        long present = assert_exact(&t[i], "mux_grace", "COMMIT in flight");
        if (t[i].d.outcome == PGS_TX_UNKNOWN && t[i].d.xid[0])
            ck_assert_int_eq(th_resolve(b, t[i].d.xid),
                             present ? PGS_TXID_COMMITTED : PGS_TXID_ABORTED);
        unknown += t[i].d.outcome == PGS_TX_UNKNOWN;
    }
    th_loop_end(b);
    printf("test_mux: commit grace: %d of 4 UNKNOWN\n", unknown);
    assert_committed(&next, "after the grace");
    drop_table("mux_grace");
    th_observer_keep(0);
}
END_TEST

/* ---- a lost connection ---- */

/* The shared backend is terminated while a neighbour's statement sleeps on it: those that
 * committed before keep their rows; the sleeper (its statement failed) and one held after it
 * (its COMMIT never written) are ROLLED_BACK with PGS_ECONN, never UNKNOWN; the ones between,
 * whose COMMIT was written, are UNKNOWN or ROLLED_BACK and have no row (the server never ran
 * them); the requests that waited commit on a new connection. */
START_TEST(test_terminated_backend_gives_each_transaction_its_exact_outcome)
{
    th_observer_keep(1);
    const char *tables[] = {"mux_kill"};
    fresh_tables(tables, 1);
    struct event_base *b = th_loop_begin();
    reset_counts();
    pgs_pool *p = mux_pool(b, "pgs_mux_kill", (pgs_pool_opts){.max_size = 1});
    enum { A = 3, S = 3, B0 = 4, T = 7, W0 = 8, N = 11 };
    static mtx t[N];
    for (int i = 0; i < N; i++)
        mtx_init(&t[i], "mux_kill", i + 1);
    t[S].extra[0] = "SELECT pg_sleep(5) /* mux_kill_slow */";
    t[T].interactive = 1;
    /* The first ones answered before the sleep begins (a segment's replies come at its end,
     * so they go in a loop turn of their own). */
    submit_all(p, t, A);
    wait_dones(b, A, 10);
    submit_all(p, t + A, N - A);
    int pid = wait_running(b, "pgs_mux_kill", "mux_kill_slow", 10);
    th_terminate(pid);
    wait_dones(b, N, 30);
    th_wait_backend_gone(pid, 10);
    close_pool(b, p);
    th_loop_end(b);
    int unknown = 0;
    for (int i = 0; i < A; i++)
        assert_committed(&t[i], "before the sleep");
    assert_rolled_back(&t[S], PGS_ECONN, NULL, "the sleeper");
    for (int i = B0; i < T; i++) {
        /* Behind the sleeper in its segment: never run there (after the FATAL), so ROLLED_BACK,
         * or run again on the new connection and COMMITTED; never UNKNOWN. */
        long present = assert_exact(&t[i], "mux_kill", "between");
        ck_assert_msg(t[i].d.outcome != PGS_TX_UNKNOWN,
                      "between (id %d): %s, row %ld: the server never ran it there", t[i].id,
                      outcome_name(t[i].d.outcome), present);
        unknown += t[i].d.outcome == PGS_TX_UNKNOWN;
    }
    assert_rolled_back(&t[T], PGS_ECONN, NULL, "held, its COMMIT never written");
    for (int i = W0; i < N; i++) {
        assert_committed(&t[i], "waited");
        ck_assert_int_ne(pid_of(&t[i]), pid);
    }
    printf("test_mux: terminated backend: %d of %d with COMMIT written were UNKNOWN\n", unknown,
           T - B0);
    drop_table("mux_kill");
    th_observer_keep(0);
}
END_TEST

/* A connection whose transactions have all ended dies before the next request (_i 0: its
 * backend terminated; _i 1: the network cut, through the fault proxy), and the loop has not
 * run since: the request is not put on the dead connection (the pool reads what the server
 * sent before it hands a connection out) but commits on a new one. */
START_TEST(test_a_connection_that_died_idle_is_never_given_a_transaction)
{
    int by_cut = _i & 1;
    int multiplex = !(_i & 2); /* (the default pool's pgs_pool_run_tx keeps the same rule) */
    th_observer_keep(1);
    const char *tables[] = {"mux_idle"};
    fresh_tables(tables, 1);
    struct event_base *b = th_loop_begin();
    reset_counts();
    th_proxy *px = NULL;
    char ci[2048];
    if (by_cut) {
        px = th_proxy_start(atoi(th_conninfo_value("port")));
        snprintf(ci, sizeof ci, "%s application_name=pgs_mux_idle", th_proxy_conninfo(px));
    } else {
        snprintf(ci, sizeof ci, "%s", th_conninfo("application_name=pgs_mux_idle"));
    }
    pgs_pool *p = NULL;
    pgs_pool_opts o = {.max_size = 1, .multiplex = multiplex};
    ck_assert_int_eq(pgs_pool_new(b, ci, &o, &p), PGS_OK);
    static mtx first, next;
    mtx_init(&first, "mux_idle", 1);
    mtx_init(&next, "mux_idle", 2);
    submit(p, &first);
    wait_dones(b, 1, 15);
    int pid = pid_of(&first);
    if (by_cut) {
        th_proxy_cut(px);
        /* (the proxy's thread closes the socket: give the close time to land, as the
         * terminate waits for the backend to be gone) */
        usleep(300 * 1000);
    } else {
        th_terminate(pid);
        th_wait_backend_gone(pid, 10);
    }
    submit(p, &next);
    wait_dones(b, 2, 15);
    close_pool(b, p);
    if (px)
        th_proxy_stop(px);
    th_loop_end(b);
    assert_committed(&first, "first");
    assert_committed(&next, by_cut ? "after the cut" : "after the terminate");
    ck_assert_int_ne(pid_of(&next), pid);
    drop_table("mux_idle");
    th_observer_keep(0);
}
END_TEST

/* ---- what the server is sent ---- */

static int traced_rollbacks, traced_statements, warned;
static void count_stmt(pgs_conn *conn, const char *sql, void *arg)
{
    (void)conn, (void)arg;
    traced_statements++;
    traced_rollbacks += strncmp(sql, "ROLLBACK", 8) == 0;
}

static void count_notice(pgs_conn *conn, const PGresult *res, void *arg)
{
    (void)conn, (void)arg, (void)res;
    warned++;
}

static int quiet_done;
static void quiet_tx_done(const pgs_tx_result *r, void *arg)
{
    (void)r, (void)arg;
    quiet_done++;
}

static void quiet_stmt(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg)
{
    (void)c, (void)res, (void)err, (void)arg;
}

static void quiet_body(pgs_tx *tx, void *arg)
{
    int i = (int)(intptr_t)arg;
    char v[16];
    snprintf(v, sizeof v, "%d", i);
    const char *vals[] = {v};
    pgs_tx_query(tx, "INSERT INTO mux_quiet (id) VALUES ($1::int)", 1, vals, quiet_stmt, NULL);
    if (i % 5 == 0) /* a failure among them: its neighbours in the batch are sent again */
        pgs_tx_query(tx, "SELECT 1 / ($1::int - $1::int)", 1, vals, quiet_stmt, NULL);
    pgs_tx_end(tx, 1, NULL, NULL);
}

/* A batch is the transactions' own statements and nothing else: no ROLLBACK of the library's
 * (outside a transaction the server answers one with a warning, which it also writes to its
 * log, at every batch), no notice, also when transactions fail among the batch. */
START_TEST(test_batches_send_only_the_transactions_own_statements)
{
    th_observer_keep(1);
    const char *tables[] = {"mux_quiet"};
    fresh_tables(tables, 1);
    struct event_base *b = th_loop_begin();
    traced_rollbacks = traced_statements = warned = quiet_done = 0;
    pgs_hooks hooks = {.stmt_start = count_stmt};
    pgs_pool_opts o = {.max_size = 2, .hooks = &hooks,
                       .conn = {.on_notice = count_notice}};
    pgs_pool *p = mux_pool(b, "pgs_mux_quiet", o);
    enum { N = 200 };
    for (int i = 1; i <= N; i++)
        ck_assert_int_eq(pgs_pool_run_tx(p, NULL, quiet_body, quiet_tx_done, (void *)(intptr_t)i),
                         PGS_OK);
    double end = th_now() + 30;
    while (quiet_done < N && th_now() < end)
        event_base_loop(b, EVLOOP_ONCE);
    ck_assert_int_eq(quiet_done, N);
    close_pool(b, p);
    th_loop_end(b);
    ck_assert_int_eq(th_scalar_long("SELECT count(*) FROM mux_quiet", 0, NULL), N - N / 5);
    ck_assert_msg(traced_rollbacks == 0, "%d ROLLBACKs of the library's in %d statements",
                  traced_rollbacks, traced_statements);
    ck_assert_int_eq(warned, 0);
    drop_table("mux_quiet");
    th_observer_keep(0);
}
END_TEST

/* A transaction cancelled while the network stalls (its statement's replies held by the proxy):
 * after its commit_grace_ms the shared connection is closed, and it ends ROLLED_BACK with
 * PGS_ECANCELED, instead of waiting for replies that never come; the pool then serves on a
 * new connection. (Found by the soak: a transfer hung for ever.) */
START_TEST(test_cancel_during_a_stall_closes_within_the_grace)
{
    th_observer_keep(1);
    const char *tables[] = {"mux_stall"};
    fresh_tables(tables, 1);
    struct event_base *b = th_loop_begin();
    reset_counts();
    th_proxy *px = th_proxy_start(atoi(th_conninfo_value("port")));
    char ci[2048];
    snprintf(ci, sizeof ci, "%s application_name=pgs_mux_stall", th_proxy_conninfo(px));
    pgs_pool *p = NULL;
    /* (the closed connection's callbacks wait for the cancel request on its way, as for any
     * close: its own time limit is 1 s here) */
    pgs_pool_opts o = {.max_size = 1, .multiplex = 1, .conn = {.cancel_timeout_ms = 1000}};
    ck_assert_int_eq(pgs_pool_new(b, ci, &o, &p), PGS_OK);
    static mtx c, next;
    mtx_init(&c, "mux_stall", 1);
    c.extra[0] = "SELECT pg_sleep(5) /* mux_stall_me */";
    c.interactive = 1;
    c.opts.commit_grace_ms = 500;
    mtx_init(&next, "mux_stall", 2);
    submit(p, &c);
    wait_running(b, "pgs_mux_stall", "mux_stall_me", 10);
    th_proxy_stall(px, 1);
    double t0 = th_now();
    ck_assert_int_eq(pgs_tx_cancel(c.tx), PGS_OK);
    wait_dones(b, 1, 10);
    double took = th_now() - t0;
    th_proxy_stall(px, 0);
    submit(p, &next);
    wait_dones(b, 2, 15);
    close_pool(b, p);
    th_proxy_stop(px);
    th_loop_end(b);
    assert_rolled_back(&c, PGS_ECANCELED, NULL, "cancelled during the stall");
    ck_assert_msg(took < 4.0, "done came %.1f s after the cancel (grace 0.5 s, cancel 1 s)", took);
    assert_committed(&next, "after the stall");
    drop_table("mux_stall");
    th_observer_keep(0);
}
END_TEST

/* ---- seeded random cuts under many callers ---- */

enum {
    RC_CALLERS = 64,
    RC_ROUNDS = 8,
    RC_N = RC_CALLERS * RC_ROUNDS,
    RC_ACCOUNTS = 8,
    RC_FAULTS = 60
};

static mtx rc[RC_N];
static pgs_pool *rc_pool;
static uint64_t rng_state;

static uint64_t rnd(void) /* xorshift64* */
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1DULL;
}

/* A transfer between two accounts, its ledger row first; the accounts are updated in id order
 * so that two transfers never deadlock. */
static void transfer_body(mtx *m)
{
    int t = m->id, a = t % RC_ACCOUNTS + 1, to = (t * 3 + 1) % RC_ACCOUNTS + 1;
    if (to == a)
        to = a % RC_ACCOUNTS + 1;
    int amt = t % 50 + 1, lo = a < to ? a : to, hi = a < to ? to : a;
    char id[16], sa[16], sto[16], samt[16], slo[16], shi[16], dlo[16], dhi[16];
    snprintf(id, sizeof id, "%d", t);
    snprintf(sa, sizeof sa, "%d", a);
    snprintf(sto, sizeof sto, "%d", to);
    snprintf(samt, sizeof samt, "%d", amt);
    snprintf(slo, sizeof slo, "%d", lo);
    snprintf(shi, sizeof shi, "%d", hi);
    snprintf(dlo, sizeof dlo, "%d", lo == a ? -amt : amt);
    snprintf(dhi, sizeof dhi, "%d", lo == a ? amt : -amt);
    const char *ledger[] = {id, sa, sto, samt}, *first[] = {slo, dlo}, *second[] = {shi, dhi};
    queue_on(m, m->tx,
             "INSERT INTO mux_rc_ledger (id, a, b, amt) VALUES ($1::int, $2::int, $3::int, "
             "$4::int)",
             4, ledger, 0);
    const char *update = "UPDATE mux_rc_accounts SET bal = bal + $2::int WHERE id = $1::int";
    queue_on(m, m->tx, update, 2, first, 0);
    queue_on(m, m->tx, update, 2, second, 0);
    m->pid_i = m->nk;
    queue_on(m, m->tx, "SELECT pg_backend_pid()", 0, NULL, 0);
    ck_assert_int_eq(pgs_tx_end(m->tx, 1, NULL, NULL), PGS_OK);
}

static void rc_next(mtx *m)
{
    long slot = m - rc;
    if (slot + RC_CALLERS < RC_N)
        submit(rc_pool, &rc[slot + RC_CALLERS]);
}

/* 64 callers, 8 transfers each, through the fault proxy on a pool of 2, while the connections
 * are cut at random moments and at random COMMITs (before or after the server saw it): every
 * outcome matches the ledger (COMMITTED: its row; ROLLED_BACK: none; UNKNOWN: either, and
 * its id resolves to what the server holds), every callback fired once, money is conserved and
 * each account's balance is exactly what the committed ledger rows say; then the pool serves
 * again. PGSCOPE_SEED=N repeats a run. */
START_TEST(test_random_cuts_under_many_callers_keep_every_outcome_exact)
{
    const char *env = getenv("PGSCOPE_SEED");
    uint64_t seed =
        env && *env ? strtoull(env, NULL, 10) : (uint64_t)time(NULL) ^ (uint64_t)getpid();
    rng_state = seed ? seed : 1;
    printf("test_mux: random cuts with seed %llu (PGSCOPE_SEED=%llu CK_RUN_CASE=random "
           "tests/test_mux repeats them)\n",
           (unsigned long long)seed, (unsigned long long)seed);
    fflush(stdout);
    th_observer_keep(1);
    free(th_scalar("DROP TABLE IF EXISTS mux_rc_ledger, mux_rc_accounts", 0, NULL));
    free(th_scalar("CREATE TABLE mux_rc_ledger (id int PRIMARY KEY, a int, b int, amt int)", 0,
                   NULL));
    free(th_scalar("CREATE TABLE mux_rc_accounts (id int PRIMARY KEY, bal bigint NOT NULL)", 0,
                   NULL));
    free(th_scalar("INSERT INTO mux_rc_accounts SELECT i, 1000 FROM generate_series(1, 8) i", 0,
                   NULL));
    /* COMMIT takes a few ms (a deferred trigger), so that faults land during COMMITs too */
    free(th_scalar("CREATE OR REPLACE FUNCTION mux_rc_slow_commit() RETURNS trigger LANGUAGE "
                   "plpgsql AS $$ BEGIN PERFORM pg_sleep(0.002); RETURN NULL; END $$",
                   0, NULL));
    free(th_scalar("CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON mux_rc_ledger DEFERRABLE "
                   "INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION mux_rc_slow_commit()",
                   0, NULL));
    struct event_base *b = th_loop_begin();
    reset_counts();
    th_proxy *px = th_proxy_start(atoi(th_conninfo_value("port")));
    char ci[2048];
    snprintf(ci, sizeof ci, "%s application_name=pgs_mux_random", th_proxy_conninfo(px));
    pgs_pool_opts o = {.max_size = 2, .acquire_timeout_ms = 60000, .multiplex = 1};
    ck_assert_int_eq(pgs_pool_new(b, ci, &o, &rc_pool), PGS_OK);
    for (int i = 0; i < RC_N; i++) {
        mtx_init(&rc[i], NULL, i + 1);
        rc[i].custom = transfer_body;
        rc[i].after = rc_next;
        rc[i].opts.resolvable = i % 2;
    }
    submit_all(rc_pool, rc, RC_CALLERS);
    const char *fault_name[] = {"cut", "cut before a COMMIT", "cut after a COMMIT"};
    int faults[3] = {0};
    for (int f = 0; f < RC_FAULTS && dones < RC_N; f++) {
        th_run_for(b, 0.01 + (double)(rnd() % 70) / 1000);
        int kind = (int)(rnd() % 3);
        faults[kind]++;
        if (kind == 0)
            th_proxy_cut(px);
        else
            fp_on_commit(px, kind == 1 ? FP_COMMIT_CUT_BEFORE : FP_COMMIT_CUT_AFTER, 1,
                         (int)(rnd() % 2));
    }
    fp_on_commit(px, FP_COMMIT_PASS, 0, 0);
    wait_dones(b, RC_N, 120);
    th_run_for(b, 0.3); /* (a last cut may have come after the last done) */
    static mtx after;
    mtx_init(&after, "mux_rc_ledger", RC_N + 1);
    after.custom = transfer_body;
    submit(rc_pool, &after);
    wait_dones(b, RC_N + 1, 20);
    fp_counts k;
    fp_get_counts(px, &k);
    close_pool(b, rc_pool);
    th_proxy_stop(px);
    wait_backends_gone("pgs_mux_random", 15); /* the server has decided every transaction */
    int seen[3] = {0}, resolved = 0, unknown_present = 0;
    for (int i = 0; i < RC_N; i++) {
        mtx *m = &rc[i];
        char what[160];
        snprintf(what, sizeof what, "PGSCOPE_SEED=%llu, transfer %d", (unsigned long long)seed,
                 m->id);
        ck_assert_msg(m->body_runs <= 1, "%s: the body ran %d times", what, m->body_runs);
        long present = assert_exact(m, "mux_rc_ledger", what);
        if (m->d.outcome == PGS_TX_COMMITTED)
            ck_assert_int_eq(m->d.attempts, 1);
        if (m->d.outcome == PGS_TX_UNKNOWN && m->d.xid[0]) {
            pgs_txid_status st = th_resolve(b, m->d.xid);
            ck_assert_msg(st == (present ? PGS_TXID_COMMITTED : PGS_TXID_ABORTED),
                          "%s: xid %s resolved %d, but the row is %s", what, m->d.xid, st,
                          present ? "there" : "absent");
            resolved++;
        }
        seen[m->d.outcome - 1]++;
        unknown_present += m->d.outcome == PGS_TX_UNKNOWN && present;
    }
    th_loop_end(b);
    assert_committed(&after, "after the faults");
    ck_assert_int_eq(th_scalar_long("SELECT sum(bal) FROM mux_rc_accounts", 0, NULL),
                     1000 * RC_ACCOUNTS);
    ck_assert_int_eq(th_scalar_long("SELECT count(*) FROM mux_rc_accounts ac WHERE bal <> 1000 "
                                    "- (SELECT coalesce(sum(amt), 0) FROM mux_rc_ledger WHERE a "
                                    "= ac.id) + (SELECT coalesce(sum(amt), 0) FROM mux_rc_ledger "
                                    "WHERE b = ac.id)",
                                    0, NULL),
                     0);
    ck_assert_int_eq(th_scalar_long("SELECT count(*) FROM mux_rc_ledger", 0, NULL),
                     seen[0] + unknown_present + 1);
    printf("test_mux: seed %llu: faults: %d %s, %d %s, %d %s (%ld cuts, %ld COMMITs hit); "
           "%d committed, %d rolled back, %d unknown (%d of them committed, %d resolved)\n",
           (unsigned long long)seed, faults[0], fault_name[0], faults[1], fault_name[1], faults[2],
           fault_name[2], k.cuts, k.commit_faults, seen[0], seen[1], seen[2], unknown_present,
           resolved);
    ck_assert_msg(seen[0] > 0, "PGSCOPE_SEED=%llu: nothing committed", (unsigned long long)seed);
    ck_assert_msg(k.cuts > 0,
                  "PGSCOPE_SEED=%llu: no fault hit a connection (the run was over "
                  "before the first)",
                  (unsigned long long)seed);
    free(th_scalar("DROP TABLE IF EXISTS mux_rc_ledger, mux_rc_accounts", 0, NULL));
    free(th_scalar("DROP FUNCTION IF EXISTS mux_rc_slow_commit()", 0, NULL));
    th_observer_keep(0);
}
END_TEST

/* ---- the pool's close ---- */

/* The pool is closed while transactions run on its one connection (one sleeps 1 s, one held
 * after it decides later) and others wait: the waiting ones end ROLLED_BACK with PGS_ECLOSED,
 * attempts 0, their bodies never run; the running ones finish and commit; a new request is
 * refused at once; the pool's done fires once, after every transaction's done, and the loop
 * drains. */
static int pool_done_seq, pool_dones;

static void pool_closed(void *arg)
{
    (void)arg;
    pool_dones++;
    pool_done_seq = th_fire_seq++;
}

START_TEST(test_pool_close_fails_waiters_and_lets_running_ones_finish)
{
    th_observer_keep(1);
    const char *tables[] = {"mux_close"};
    fresh_tables(tables, 1);
    struct event_base *b = th_loop_begin();
    reset_counts();
    pool_dones = 0;
    pgs_pool *p = mux_pool(b, "pgs_mux_close", (pgs_pool_opts){.max_size = 1});
    enum { SLOW = 2, HELD = 4, W0 = 5, N = 9 };
    static mtx t[N], late;
    for (int i = 0; i < N; i++)
        mtx_init(&t[i], "mux_close", i + 1);
    t[SLOW].extra[0] = "SELECT pg_sleep(1) /* mux_close_slow */";
    t[HELD].extra[0] = "SELECT pg_sleep(0.3)";
    t[HELD].interactive = 1;
    mtx_init(&late, "mux_close", 100);
    submit_all(p, t, N);
    wait_running(b, "pgs_mux_close", "mux_close_slow", 10);
    wait_count(b, &t[HELD].body_runs, 1, 10);
    ck_assert_int_eq(pgs_pool_close(p, pool_closed, NULL), PGS_OK);
    ck_assert_int_eq(pgs_pool_run_tx(p, NULL, mux_body, mux_done, &late), PGS_ECLOSED);
    ck_assert_int_eq(pool_dones, 0);
    th_run_until(b, &pool_dones, 20);
    th_loop_end(b);
    ck_assert_int_eq(pool_dones, 1);
    for (int i = 0; i < W0; i++) {
        assert_committed(&t[i], "running");
        ck_assert_int_lt(t[i].done_seq, pool_done_seq);
    }
    for (int i = W0; i < N; i++) {
        assert_rolled_back(&t[i], PGS_ECLOSED, NULL, "waiting");
        ck_assert_int_eq(t[i].d.attempts, 0);
        ck_assert_int_eq(t[i].body_runs, 0);
        ck_assert_int_lt(t[i].done_seq, pool_done_seq);
    }
    ck_assert_int_eq(late.d.fired, 0);
    ck_assert_int_eq(backends("pgs_mux_close"), 0);
    ck_assert_int_eq(th_rows("mux_close"), W0);
    drop_table("mux_close");
    th_observer_keep(0);
}
END_TEST

/* ---- savepoints ---- */

/* INSERT id*10+1; a savepoint with INSERT id*10+2 and (aux 0) a division by zero, ended asking
 * to release (aux 0, the error rolls it back) or to roll back (aux 1); INSERT id*10+3; commit. */
static void savepoint_body(mtx *m)
{
    char v[3][16];
    for (int i = 0; i < 3; i++)
        snprintf(v[i], sizeof v[i], "%d", m->id * 10 + i + 1);
    const char *insert = "INSERT INTO mux_sp (id, v) VALUES ($1::int, 'x')";
    const char *v1[] = {v[0]}, *v2[] = {v[1]}, *v3[] = {v[2]};
    queue_on(m, m->tx, insert, 1, v1, 0);
    m->pid_i = m->nk;
    queue_on(m, m->tx, "SELECT pg_backend_pid()", 0, NULL, 0);
    pgs_tx *child = NULL;
    ck_assert_int_eq(pgs_tx_savepoint(m->tx, NULL, NULL, &child), PGS_OK);
    queue_on(m, child, insert, 1, v2, 0);
    if (m->aux == 0)
        queue_on(m, child, "SELECT 1 / 0", 0, NULL, 0);
    ck_assert_int_eq(pgs_tx_end(child, m->aux == 0, th_record_tx, &m->sub), PGS_OK);
    queue_on(m, m->tx, insert, 1, v3, 0);
    ck_assert_int_eq(pgs_tx_end(m->tx, 1, NULL, NULL), PGS_OK);
}

/* Two transactions with a savepoint each (one whose child fails, one whose child is rolled
 * back on purpose) among committing neighbours on one connection: each child rolls back, its
 * parent commits, rows exact. */
START_TEST(test_savepoints_inside_multiplexed_transactions)
{
    th_observer_keep(1);
    const char *tables[] = {"mux_sp"};
    fresh_tables(tables, 1);
    struct event_base *b = th_loop_begin();
    reset_counts();
    pgs_pool *p = mux_pool(b, "pgs_mux_sp", (pgs_pool_opts){.max_size = 1});
    enum { N = 8, SP1 = 2, SP2 = 5 };
    static mtx t[N];
    for (int i = 0; i < N; i++)
        mtx_init(&t[i], "mux_sp", i + 1);
    t[SP1].custom = t[SP2].custom = savepoint_body;
    t[SP1].id = 1000;
    t[SP2].id = 2000;
    t[SP2].aux = 1;
    submit_all(p, t, N);
    wait_dones(b, N, 20);
    close_pool(b, p);
    th_loop_end(b);
    for (int i = 0; i < N; i++) {
        if (i == SP1 || i == SP2) {
            mtx *m = &t[i];
            assert_once(m, "savepoint");
            ck_assert_msg(m->d.outcome == PGS_TX_COMMITTED && !m->d.has_err, "parent %d: %s: %s",
                          m->id, outcome_name(m->d.outcome), m->d.err.message);
            ck_assert_int_eq(m->sub.fired, 1);
            ck_assert_int_eq(m->sub.outcome, PGS_TX_ROLLED_BACK);
            if (m->aux == 0) {
                ck_assert_int_eq(m->sub.err.code, PGS_ESQL);
                ck_assert_str_eq(m->sub.err.sqlstate, "22012");
            } else {
                ck_assert_int_eq(m->sub.has_err, 0);
            }
            ck_assert_int_eq(has_row("mux_sp", m->id * 10 + 1), 1);
            ck_assert_int_eq(has_row("mux_sp", m->id * 10 + 2), 0);
            ck_assert_int_eq(has_row("mux_sp", m->id * 10 + 3), 1);
        } else {
            assert_committed(&t[i], "neighbour");
        }
        ck_assert_int_eq(pid_of(&t[i]), pid_of(&t[0]));
    }
    ck_assert_int_eq(th_rows("mux_sp"), N - 2 + 4);
    drop_table("mux_sp");
    th_observer_keep(0);
}
END_TEST

/* ---- misuse ---- */

/* A negative mux_depth is refused by pgs_pool_new; a NULL body or done (or pool) by
 * pgs_pool_run_tx, at once, and no callback ever fires for them. */
START_TEST(test_bad_input_is_refused_at_once)
{
    struct event_base *b = th_loop_begin();
    reset_counts();
    pgs_pool *p = NULL;
    pgs_pool_opts bad = {.multiplex = 1, .mux_depth = -1};
    ck_assert_int_eq(pgs_pool_new(b, th_conninfo(NULL), &bad, &p), PGS_EINVAL);
    p = mux_pool(b, "pgs_mux_bad", (pgs_pool_opts){.max_size = 1});
    static mtx m, ok;
    mtx_init(&m, NULL, 1);
    mtx_init(&ok, NULL, 2);
    ck_assert_int_eq(pgs_pool_run_tx(p, NULL, NULL, mux_done, &m), PGS_EINVAL);
    ck_assert_int_eq(pgs_pool_run_tx(p, NULL, mux_body, NULL, &m), PGS_EINVAL);
    ck_assert_int_eq(pgs_pool_run_tx(NULL, NULL, mux_body, mux_done, &m), PGS_EINVAL);
    submit(p, &ok); /* and the pool works */
    wait_dones(b, 1, 15);
    th_run_for(b, 0.1);
    close_pool(b, p);
    th_loop_end(b);
    assert_committed(&ok, "a good one");
    ck_assert_int_eq(m.d.fired, 0);
    ck_assert_int_eq(m.body_runs, 0);
}
END_TEST

/* ---- session state ---- */

/* SET LOCAL and a transaction-scoped advisory lock stay inside their transaction: the next one
 * on the same backend (pipelined right behind it) sees the defaults and no lock, also after a
 * transaction that failed with SET LOCAL in it. */
START_TEST(test_set_local_does_not_reach_the_next_transaction)
{
    th_observer_keep(1);
    char *timeout = th_scalar("SHOW statement_timeout", 0, NULL);
    char *path = th_scalar("SHOW search_path", 0, NULL);
    struct event_base *b = th_loop_begin();
    reset_counts();
    pgs_pool *p = mux_pool(b, "pgs_mux_local", (pgs_pool_opts){.max_size = 1});
    static mtx t[4];
    for (int i = 0; i < 4; i++)
        mtx_init(&t[i], NULL, i + 1);
    t[0].extra[0] = "SET LOCAL statement_timeout = '4321ms'";
    t[0].extra[1] = "SHOW statement_timeout";
    t[0].extra[2] = "SELECT pg_advisory_xact_lock(4711)";
    t[1].extra[0] = "SHOW statement_timeout";
    t[1].extra[1] = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = "
                    "pg_backend_pid()";
    t[2].extra[0] = "SET LOCAL search_path = pg_catalog";
    t[2].extra[1] = "SELECT 1 / 0";
    t[3].extra[0] = "SHOW search_path";
    submit_all(p, t, 4);
    wait_dones(b, 4, 15);
    close_pool(b, p);
    th_loop_end(b);
    assert_committed(&t[0], "SET LOCAL");
    ck_assert_str_eq(t[0].k[2].value, "4321ms");
    assert_committed(&t[1], "the next");
    ck_assert_str_eq(t[1].k[1].value, timeout);
    ck_assert_str_eq(t[1].k[2].value, "0");
    assert_rolled_back(&t[2], PGS_ESQL, "22012", "failed with SET LOCAL");
    assert_committed(&t[3], "after the failed one");
    ck_assert_str_eq(t[3].k[1].value, path);
    for (int i = 1; i < 4; i++)
        ck_assert_int_eq(pid_of(&t[i]), pid_of(&t[0]));
    ck_assert_int_ge(overlap_on(t, 4, pid_of(&t[0])), 2);
    free(timeout);
    free(path);
    th_observer_keep(0);
}
END_TEST

static Suite *mux_suite(void)
{
    Suite *s = suite_create("mux");
    TCase *t = tcase_create("load");
    tcase_set_timeout(t, 120);
    tcase_add_test(t, test_many_callers_share_two_backends_and_all_commit);
    tcase_add_test(t, test_few_callers_fill_one_connection_before_another_is_taken);
    tcase_add_test(t, test_a_waiting_body_holds_its_connection_and_stalls_no_one);
    tcase_add_loop_test(t, test_requests_are_served_in_the_order_made, 0, 2);
    suite_add_tcase(s, t);
    t = tcase_create("outcomes");
    tcase_set_timeout(t, 60);
    tcase_add_test(t, test_an_error_aborts_only_its_own_transaction);
    tcase_add_loop_test(t, test_serialization_failure_is_retried_as_asked, 0, 2);
    tcase_add_test(t, test_a_retry_goes_to_the_head_of_the_queue);
    tcase_add_test(t, test_an_unknown_commit_is_never_retried);
    tcase_add_test(t, test_savepoints_inside_multiplexed_transactions);
    tcase_add_test(t, test_set_local_does_not_reach_the_next_transaction);
    tcase_add_test(t, test_session_state_left_behind_lasts_until_the_idle_reset);
    tcase_add_test(t, test_statement_timeout_fails_only_its_own_and_keeps_the_connection);
    tcase_add_test(t, test_bad_input_is_refused_at_once);
    suite_add_tcase(s, t);
    t = tcase_create("limits");
    tcase_set_timeout(t, 60);
    tcase_add_test(t, test_acquire_timeout_while_the_only_connection_is_held);
    tcase_add_test(t, test_max_waiting_refuses_at_once_and_done_never_fires);
    tcase_add_test(t, test_pool_close_fails_waiters_and_lets_running_ones_finish);
    tcase_add_test(t, test_unreachable_server_ends_requests_with_econnect);
    tcase_add_loop_test(t, test_acquired_guards_and_multiplexed_transactions_share_max_size, 0, 2);
    suite_add_tcase(s, t);
    t = tcase_create("cancel");
    tcase_set_timeout(t, 60);
    tcase_add_loop_test(t, test_cancel_rolls_back_only_its_own_and_retires_the_connection, 0, 2);
    tcase_add_loop_test(t, test_cancel_that_reaches_a_neighbour_is_reported_on_the_neighbour, 0, 2);
    tcase_add_test(t, test_terminated_backend_gives_each_transaction_its_exact_outcome);
    tcase_add_test(t, test_commit_reply_never_coming_makes_every_commit_in_flight_unknown);
    tcase_add_loop_test(t, test_a_connection_that_died_idle_is_never_given_a_transaction, 0, 4);
    tcase_add_test(t, test_batches_send_only_the_transactions_own_statements);
    tcase_add_test(t, test_cancel_during_a_stall_closes_within_the_grace);
    suite_add_tcase(s, t);
    /* CK_RUN_CASE=random with PGSCOPE_SEED=N repeats one sequence of random faults */
    t = tcase_create("random");
    tcase_set_timeout(t, 180);
    tcase_add_test(t, test_random_cuts_under_many_callers_keep_every_outcome_exact);
    suite_add_tcase(s, t);
    return s;
}

int main(void) { return th_run_suite(mux_suite()); }

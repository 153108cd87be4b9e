/* Faults at COMMIT, end to end: transaction guards through the fault proxy (tools/faultproxy.h)
 * against the real server — cut before or after COMMIT, stall after it, an error ahead of it,
 * seeded random cuts, a slow drip — each outcome checked against what the server holds. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "faultproxy.h"
#include "helpers.h"

static fp_proxy *proxy_up(void)
{
    return th_proxy_start(atoi(th_conninfo_value("port")));
}

static fp_counts counts(fp_proxy *p)
{
    fp_counts k;
    fp_get_counts(p, &k);
    return k;
}

/* Whether the row with this id is in the table (the observer's view). */
static long has_row(const char *table, long id)
{
    char sql[128], v[24];
    snprintf(sql, sizeof sql, "SELECT count(*) FROM %s WHERE id = $1::int", table);
    snprintf(v, sizeof v, "%ld", id);
    const char *vals[] = {v};
    return th_scalar_long(sql, 1, vals);
}

static const char *outcome_name(pgs_tx_outcome o)
{
    return o == PGS_TX_COMMITTED ? "COMMITTED" : o == PGS_TX_ROLLED_BACK ? "ROLLED_BACK"
                                             : o == PGS_TX_UNKNOWN      ? "UNKNOWN"
                                                                        : "(none)";
}

/* ---- one guarded transaction ---- */

enum { MAX_STMTS = 3 };

typedef struct run {
    int begun; /* on_begun fired */
    th_call k[MAX_STMTS];
    int queued[MAX_STMTS]; /* pgs_tx_query took it (only then must its callback fire) */
    int nk;
    th_txdone d;
    pgs_tx *tx;
    int with_select; /* a SELECT of the id doubled follows the INSERTs */
    char id[16];
    char doubled[16]; /* what that SELECT must answer */
} run;

static void on_begun(pgs_tx *tx, const pgs_error *err, void *arg)
{
    (void)tx;
    (void)err;
    ((run *)arg)->begun++;
}

static int query(run *r, const char *sql, const char *value, pgs_result_cb cb, void *arg)
{
    const char *v[] = {value};
    int i = r->nk++, rc = pgs_tx_query(r->tx, sql, 1, v, cb, arg ? arg : &r->k[i]);
    r->queued[i] = rc == PGS_OK;
    return rc;
}

/* The SELECT (if asked) and the end. */
static void finish_tx(run *r)
{
    if (r->with_select)
        query(r, "SELECT $1::int * 2", r->id, th_record, NULL);
    ck_assert_int_eq(pgs_tx_end(r->tx, 1, th_record_tx, &r->d), PGS_OK);
}

/* An interactive body: the rest waits for the INSERT's answer (a second round trip). */
static void insert_then_finish(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg)
{
    run *r = arg;
    th_record(c, res, err, &r->k[0]);
    finish_tx(r);
}

/* BEGIN, an INSERT of each id, with `with_select` a SELECT of the first id doubled, and COMMIT:
 * all in one write, or (interactive) the rest once the first INSERT is answered. Returns once
 * queued; r->d.fired says when it ended. */
static void start_tx(pgs_conn *c, const pgs_tx_opts *o, const char *table, const long *ids,
                     int nids, int with_select, int interactive, run *r)
{
    char sql[128];
    snprintf(sql, sizeof sql, "INSERT INTO %s (id, v) VALUES ($1::int, 'x')", table);
    snprintf(r->id, sizeof r->id, "%ld", ids[0]);
    snprintf(r->doubled, sizeof r->doubled, "%ld", 2 * ids[0]);
    r->with_select = with_select;
    ck_assert_int_eq(pgs_tx_begin(c, o, on_begun, r, &r->tx), PGS_OK);
    for (int i = 0; i < nids; i++) {
        char id[16];
        snprintf(id, sizeof id, "%ld", ids[i]);
        int waits = interactive && i == 0;
        ck_assert_int_eq(query(r, sql, id, waits ? insert_then_finish : th_record, waits ? r : NULL),
                         PGS_OK);
    }
    if (!interactive)
        finish_tx(r);
}

static void run_tx(struct event_base *b, pgs_conn *c, const pgs_tx_opts *o, const char *table,
                   long id, run *r)
{
    start_tx(c, o, table, &id, 1, 0, 0, r);
    th_run_until(b, &r->d.fired, 15);
}

/* ---- how COMMIT travels ---- */

/* 0: the statement cache's prepared statement, parsed in the same write (first use);
 * 1: the cached statement, Bind/Execute only (a clean transaction ran first on the guard);
 * 2: the statement cache off, unnamed Parse/Bind/Execute. */
static const char *const shape_name[] = {"statement cache, first use",
                                         "statement cache, cached statement", "no statement cache"};

static pgs_conn *open_shape(struct event_base *b, fp_proxy *p, int shape, const char *table,
                            const pgs_tx_opts *o)
{
    pgs_conn_opts co = {.statement_cache = shape == 2 ? -1 : 0};
    pgs_conn *c = th_open_at(b, th_proxy_conninfo(p), &co);
    if (shape == 1) {
        run warm = {0};
        run_tx(b, c, o, table, 1000, &warm);
        ck_assert_msg(warm.d.outcome == PGS_TX_COMMITTED, "warm-up: %s: %s",
                      outcome_name(warm.d.outcome), warm.d.err.message);
    }
    return c;
}

/* Every callback of a transaction fired once; the INSERT's as `code` says (-1: any). */
static void assert_fired_once(const run *r, int code, const char *what)
{
    ck_assert_msg(r->d.fired == 1, "%s: done fired %d times", what, r->d.fired);
    ck_assert_msg(r->begun == 1, "%s: on_begun fired %d times", what, r->begun);
    for (int i = 0; i < r->nk; i++) {
        ck_assert_msg(r->k[i].fired == r->queued[i], "%s: statement %d fired %d times", what, i,
                      r->k[i].fired);
        if (code >= 0 && i == 0)
            ck_assert_msg(r->k[i].code == (pgs_code)code, "%s: INSERT: %s (%s)", what,
                          pgs_strerror(r->k[i].code), r->k[i].message);
    }
}

/* ---- cut at COMMIT ---- */

/* The connection is cut right after COMMIT reached the server; the replies before it (the
 * transaction id) got through. Unknown, then resolved: committed. */
START_TEST(test_cut_after_commit_is_unknown_and_resolves_committed)
{
    th_observer_keep(1);
    const char *table = "f_cut_after";
    const char *shape = shape_name[_i];
    th_fresh_table(table);
    struct event_base *b = th_loop_begin();
    fp_proxy *p = proxy_up();
    pgs_tx_opts o = {.resolvable = 1};
    pgs_conn *c = open_shape(b, p, _i, table, &o);
    fp_on_commit(p, FP_COMMIT_CUT_AFTER, 1, 1);
    run r = {0};
    run_tx(b, c, &o, table, 1, &r);
    ck_assert_msg(r.d.outcome == PGS_TX_UNKNOWN, "%s: outcome %s: %s", shape,
                  outcome_name(r.d.outcome), r.d.err.message);
    ck_assert_int_eq(r.d.err.code, PGS_ECOMMIT_UNKNOWN);
    ck_assert_msg(r.d.xid[0] != '\0', "%s: no transaction id", shape);
    assert_fired_once(&r, PGS_OK, shape);
    fp_counts k = counts(p);
    ck_assert_int_eq(k.commits, _i == 1 ? 2 : 1);
    ck_assert_int_eq(k.commit_faults, 1);
    ck_assert_int_eq(k.cuts, 1);
    pgs_txid_status st = th_resolve(b, r.d.xid);
    ck_assert_msg(st == PGS_TXID_COMMITTED, "%s: xid %s resolved %d", shape, r.d.xid, st);
    ck_assert_int_eq(has_row(table, 1), 1);
    th_close(b, c);
    th_proxy_stop(p);
    th_loop_end(b);
    th_observer_keep(0);
    assert_fired_once(&r, PGS_OK, shape);
}
END_TEST

/* COMMIT is dropped and the connection cut: the client wrote it and heard nothing, so unknown;
 * the server never saw it. Loop 0-2: the id arrived first (replies_before), in each shape;
 * 3: cut at once, no id (the unnamed statement's COMMIT). */
START_TEST(test_cut_before_commit_is_unknown_and_resolves_aborted)
{
    th_observer_keep(1);
    const char *table = "f_cut_before";
    int shape_i = _i < 3 ? _i : 2, replies_before = _i < 3;
    char what[96];
    snprintf(what, sizeof what, "%s, replies_before %d", shape_name[shape_i], replies_before);
    th_fresh_table(table);
    struct event_base *b = th_loop_begin();
    fp_proxy *p = proxy_up();
    pgs_tx_opts o = {.resolvable = 1};
    pgs_conn *c = open_shape(b, p, shape_i, table, &o);
    int pid = th_backend_pid(c);
    fp_on_commit(p, FP_COMMIT_CUT_BEFORE, 1, replies_before);
    run r = {0};
    run_tx(b, c, &o, table, 1, &r);
    ck_assert_msg(r.d.outcome == PGS_TX_UNKNOWN, "%s: outcome %s: %s", what,
                  outcome_name(r.d.outcome), r.d.err.message);
    ck_assert_int_eq(r.d.err.code, PGS_ECOMMIT_UNKNOWN);
    assert_fired_once(&r, replies_before ? PGS_OK : -1, what);
    ck_assert_int_eq(counts(p).commit_faults, 1);
    if (replies_before) {
        ck_assert_msg(r.d.xid[0] != '\0', "%s: no transaction id", what);
        pgs_txid_status st = th_resolve(b, r.d.xid);
        ck_assert_msg(st == PGS_TXID_ABORTED, "%s: xid %s resolved %d", what, r.d.xid, st);
    } else {
        ck_assert_msg(r.d.xid[0] == '\0', "%s: xid %s, though nothing came back", what, r.d.xid);
    }
    th_close(b, c);
    th_wait_backend_gone(pid, 10);
    ck_assert_int_eq(has_row(table, 1), 0);
    th_proxy_stop(p);
    th_loop_end(b);
    th_observer_keep(0);
}
END_TEST

/* A statement of COMMIT's own segment fails (unique violation); the connection is cut right
 * after COMMIT, once that error got through. COMMIT was skipped: rolled back, never unknown. */
START_TEST(test_error_ahead_of_commit_then_cut_is_rolled_back)
{
    th_observer_keep(1);
    const char *table = "f_err_cut";
    const char *shape = shape_name[_i];
    th_fresh_table(table);
    free(th_scalar("INSERT INTO f_err_cut (id, v) VALUES (1, 'there')", 0, NULL));
    struct event_base *b = th_loop_begin();
    fp_proxy *p = proxy_up();
    pgs_tx_opts o = {.resolvable = 1};
    pgs_conn *c = open_shape(b, p, _i, table, &o);
    int pid = th_backend_pid(c);
    fp_on_commit(p, FP_COMMIT_CUT_AFTER, 1, 1);
    run r = {0};
    long ids[] = {2, 1};
    start_tx(c, &o, table, ids, 2, 0, 0, &r);
    th_run_until(b, &r.d.fired, 15);
    ck_assert_msg(r.d.outcome == PGS_TX_ROLLED_BACK, "%s: outcome %s: %s", shape,
                  outcome_name(r.d.outcome), r.d.err.message);
    ck_assert_int_eq(r.d.err.code, PGS_ESQL);
    ck_assert_str_eq(r.d.err.sqlstate, "23505");
    assert_fired_once(&r, PGS_OK, shape);
    ck_assert_int_eq(r.k[1].code, PGS_ESQL);
    ck_assert_str_eq(r.k[1].sqlstate, "23505");
    fp_counts k = counts(p);
    ck_assert_int_eq(k.commit_faults, 1);
    ck_assert_int_eq(k.cuts, 1);
    th_close(b, c);
    th_wait_backend_gone(pid, 10);
    ck_assert_int_eq(has_row(table, 2), 0);
    ck_assert_int_eq(has_row(table, 1), 1);
    th_proxy_stop(p);
    th_loop_end(b);
    th_observer_keep(0);
}
END_TEST

/* ---- stall after COMMIT ---- */

/* COMMIT (the cached statement's Execute) reaches the server, its reply never comes back.
 * pgs_tx_cancel waits commit_grace_ms for it, then reports unknown; the server committed. */
START_TEST(test_cancel_with_commit_reply_stalled_waits_grace_then_unknown)
{
    th_observer_keep(1);
    const char *table = "f_stall";
    const int cached = 1;
    const char *shape = shape_name[cached];
    th_fresh_table(table);
    struct event_base *b = th_loop_begin();
    fp_proxy *p = proxy_up();
    pgs_tx_opts o = {.resolvable = 1, .commit_grace_ms = 300};
    pgs_conn *c = open_shape(b, p, cached, table, &o);
    fp_on_commit(p, FP_COMMIT_STALL_AFTER, 1, 1);
    run r = {0};
    long id = 1;
    start_tx(c, &o, table, &id, 1, 0, 0, &r);
    th_run_until(b, &r.k[0].fired, 10); /* the replies before COMMIT are in */
    ck_assert_int_eq(r.k[0].code, PGS_OK);
    ck_assert_int_eq(counts(p).commit_faults, 1);
    ck_assert_int_eq(r.d.fired, 0);
    double t0 = th_now();
    ck_assert_int_eq(pgs_tx_cancel(r.tx), PGS_OK);
    th_run_until(b, &r.d.fired, 10);
    double took = r.d.at - t0;
    ck_assert_msg(took >= 0.28 && took < 2.0, "%s: the end came after %.3f s, want ~0.3 s", shape,
                  took);
    ck_assert_msg(r.d.outcome == PGS_TX_UNKNOWN, "%s: outcome %s: %s", shape,
                  outcome_name(r.d.outcome), r.d.err.message);
    ck_assert_int_eq(r.d.err.code, PGS_ECOMMIT_UNKNOWN);
    ck_assert_msg(r.d.xid[0] != '\0', "%s: no transaction id", shape);
    pgs_txid_status st = th_resolve(b, r.d.xid);
    ck_assert_msg(st == PGS_TXID_COMMITTED, "%s: xid %s resolved %d", shape, r.d.xid, st);
    ck_assert_int_eq(has_row(table, 1), 1);
    th_close(b, c);
    th_proxy_stop(p);
    th_loop_end(b);
    th_observer_keep(0);
    assert_fired_once(&r, PGS_OK, shape);
}
END_TEST

/* ---- seeded random cuts ---- */

enum { RANDOM_RUNS = 50, CUT_MS_MAX = 12 };

static uint64_t rng_state;

static uint64_t rnd(void) /* xorshift64* */
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1DULL;
}

static run random_runs[RANDOM_RUNS];

/* A transaction's shape in the random runs: statement cache on, resolvable, interactive. */
typedef struct shape {
    int cache, resolvable, interactive;
    long bytes; /* what a clean run writes (0: not measured yet) */
    double ms;  /* and how long it takes */
} shape;

static pgs_conn *open_for(struct event_base *b, fp_proxy *p, const shape *sh)
{
    pgs_conn_opts co = {.statement_cache = sh->cache ? 0 : -1};
    return th_open_at(b, th_proxy_conninfo(p), &co);
}

/* Measure a clean run of this shape on a fresh guard. */
static void measure(struct event_base *b, fp_proxy *p, shape *sh, const char *table, long id)
{
    pgs_conn *c = open_for(b, p, sh);
    pgs_tx_opts o = {.resolvable = sh->resolvable};
    run r = {0};
    long before = counts(p).bytes_up;
    double t0 = th_now();
    start_tx(c, &o, table, &id, 1, 1, sh->interactive, &r);
    th_run_until(b, &r.d.fired, 15);
    ck_assert_msg(r.d.outcome == PGS_TX_COMMITTED, "a clean run: %s", r.d.err.message);
    sh->ms = (r.d.at - t0) * 1000;
    sh->bytes = counts(p).bytes_up - before;
    th_close(b, c);
}

/* Cut after a random number of bytes or milliseconds, somewhere in a pipelined transaction
 * (or an interactive one) whose COMMIT takes a few ms (a deferred trigger): every outcome must
 * be exact, and every callback fire once. */
START_TEST(test_random_cuts_give_exact_outcomes)
{
    const char *env = getenv("PGSCOPE_SEED");
    uint64_t seed = env && *env ? strtoull(env, NULL, 10) : (uint64_t)time(NULL) ^ (uint64_t)getpid();
    rng_state = seed ? seed : 1;
    printf("test_faults: random cuts with seed %llu (PGSCOPE_SEED=%llu CK_RUN_CASE=random "
           "tests/test_faults repeats them)\n",
           (unsigned long long)seed, (unsigned long long)seed);
    fflush(stdout);
    th_observer_keep(1);
    const char *table = "f_random";
    th_fresh_table(table);
    free(th_scalar("CREATE OR REPLACE FUNCTION f_slow_commit() RETURNS trigger LANGUAGE plpgsql "
                   "AS $$ BEGIN PERFORM pg_sleep(0.003); RETURN NULL; END $$",
                   0, NULL));
    free(th_scalar("CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON f_random DEFERRABLE "
                   "INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION f_slow_commit()",
                   0, NULL));
    struct event_base *b = th_loop_begin();
    fp_proxy *p = proxy_up();
    shape shapes[8];
    for (int i = 0; i < 8; i++)
        shapes[i] = (shape){.cache = i & 1, .resolvable = (i >> 1) & 1, .interactive = i >> 2};
    int seen[2][3] = {{0}}, unknown_committed = 0;
    for (int i = 0; i < RANDOM_RUNS; i++) {
        run *r = &random_runs[i];
        int by_bytes = (int)(rnd() % 2);
        shape *sh = &shapes[rnd() % 8];
        if (!sh->bytes)
            measure(b, p, sh, table, 100000 + (long)(sh - shapes));
        /* from the first byte (or at once) to a little past the end */
        long n = by_bytes ? 1 + (long)(rnd() % (uint64_t)(sh->bytes + sh->bytes / 8))
                          : (long)(rnd() % (uint64_t)(1.25 * sh->ms + 2));
        char what[256];
        snprintf(what, sizeof what,
                 "PGSCOPE_SEED=%llu, run %d: cut after %ld %s (a clean run: %ld bytes, %.1f ms), "
                 "statement cache %s, resolvable %d, interactive %d",
                 (unsigned long long)seed, i, n, by_bytes ? "bytes" : "ms", sh->bytes, sh->ms,
                 sh->cache ? "on" : "off", sh->resolvable, sh->interactive);
        pgs_conn *c = open_for(b, p, sh);
        int pid = th_backend_pid(c);
        long id = i + 1;
        pgs_tx_opts o = {.resolvable = sh->resolvable};
        if (by_bytes)
            fp_cut_after_bytes(p, n);
        else
            fp_cut_after_ms(p, (int)n);
        start_tx(c, &o, table, &id, 1, 1, sh->interactive, r);
        th_run_until(b, &r->d.fired, 15);
        if (by_bytes)
            fp_cut_after_bytes(p, 0);
        th_close(b, c);
        if (r->d.outcome != PGS_TX_COMMITTED)
            th_wait_backend_gone(pid, 10); /* the server has decided */
        long present = has_row(table, id);
        assert_fired_once(r, -1, what);
        switch (r->d.outcome) {
        case PGS_TX_COMMITTED:
            ck_assert_msg(present == 1, "%s: COMMITTED, but the row is absent", what);
            ck_assert_msg(!r->d.has_err, "%s: COMMITTED with an error: %s", what, r->d.err.message);
            ck_assert_msg(r->k[0].code == PGS_OK && r->k[1].code == PGS_OK &&
                              strcmp(r->k[1].value, r->doubled) == 0,
                          "%s: COMMITTED, but a statement failed or answered wrong (%s, %s '%s')",
                          what, pgs_strerror(r->k[0].code), pgs_strerror(r->k[1].code),
                          r->k[1].value);
            break;
        case PGS_TX_ROLLED_BACK:
            ck_assert_msg(present == 0, "%s: ROLLED_BACK (%s), but the row is there", what,
                          r->d.err.message);
            ck_assert_msg(r->d.has_err, "%s: ROLLED_BACK without an error", what);
            break;
        case PGS_TX_UNKNOWN:
            ck_assert_msg(r->d.err.code == PGS_ECOMMIT_UNKNOWN, "%s: UNKNOWN with %s", what,
                          pgs_strerror(r->d.err.code));
            if (r->d.xid[0]) {
                pgs_txid_status st = th_resolve(b, r->d.xid);
                ck_assert_msg(st == (present ? PGS_TXID_COMMITTED : PGS_TXID_ABORTED),
                              "%s: xid %s resolved %d, but the row is %s", what, r->d.xid, st,
                              present ? "there" : "absent");
            }
            unknown_committed += present == 1;
            break;
        default:
            ck_abort_msg("%s: no outcome (%d)", what, r->d.outcome);
        }
        seen[by_bytes][r->d.outcome - 1]++;
    }
    fp_counts k = counts(p);
    th_proxy_stop(p);
    th_loop_end(b);
    th_observer_keep(0);
    for (int i = 0; i < RANDOM_RUNS; i++) /* nothing fired again while the loop drained */
        assert_fired_once(&random_runs[i], -1, "after the loop drained");
    printf("test_faults: seed %llu: %ld cuts; by bytes %d committed, %d rolled back, %d unknown; "
           "by ms %d committed, %d rolled back, %d unknown; %d of the unknown had committed\n",
           (unsigned long long)seed, k.cuts, seen[1][0], seen[1][1], seen[1][2], seen[0][0],
           seen[0][1], seen[0][2], unknown_committed);
}
END_TEST

/* ---- slow replies ---- */

typedef struct rows_check {
    int fired;
    pgs_code code;
    int ntuples;
    int bad_row; /* first row that came back wrong, -1: none */
    double at;
} rows_check;

static void check_rows(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg)
{
    (void)c;
    rows_check *k = arg;
    k->fired++;
    k->at = th_now();
    k->code = err ? err->code : PGS_OK;
    k->bad_row = -1;
    if (err)
        return;
    k->ntuples = PQntuples(res);
    for (int i = 0; i < k->ntuples && k->bad_row < 0; i++) {
        char want[32];
        snprintf(want, sizeof want, "row %d", i + 1);
        if (atoi(PQgetvalue(res, i, 0)) != i + 1 || strcmp(PQgetvalue(res, i, 1), want) != 0)
            k->bad_row = i;
    }
}

/* The server's replies trickle in, 7 bytes a millisecond: the result is whole and right. */
START_TEST(test_slow_drip_delivers_every_row)
{
    th_observer_keep(1);
    struct event_base *b = th_loop_begin();
    fp_proxy *p = proxy_up();
    pgs_conn *c = th_open_at(b, th_proxy_conninfo(p), NULL);
    long before = counts(p).bytes_down;
    fp_drip(p, 7, 1);
    rows_check k = {0};
    double t0 = th_now();
    ck_assert_int_eq(
        pgs_query(c, "SELECT i, 'row ' || i FROM generate_series(1, 200) AS i", 0, NULL, check_rows, &k),
        PGS_OK);
    th_run_until(b, &k.fired, 20);
    fp_drip(p, 0, 0);
    long bytes = counts(p).bytes_down - before;
    ck_assert_msg(k.code == PGS_OK, "%s", pgs_strerror(k.code));
    ck_assert_int_eq(k.ntuples, 200);
    ck_assert_msg(k.bad_row < 0, "row %d came back wrong", k.bad_row + 1);
    /* it did trickle: at least one millisecond for every 7 bytes (less a margin) */
    double took = k.at - t0, least = 0.9 * (double)bytes / 7 / 1000;
    ck_assert_msg(took >= least, "%ld bytes took %.3f s, a drip needs %.3f s", bytes, took, least);
    th_close(b, c);
    th_proxy_stop(p);
    th_loop_end(b);
    th_observer_keep(0);
    ck_assert_int_eq(k.fired, 1);
}
END_TEST

/* ---- the proxy itself: COMMIT as a simple query ---- */

static PGresult *exec_ok(PGconn *pg, const char *sql)
{
    PGresult *r = PQexec(pg, sql);
    ck_assert_msg(PQresultStatus(r) == PGRES_COMMAND_OK || PQresultStatus(r) == PGRES_TUPLES_OK,
                  "%s: %s", sql, PQerrorMessage(pg));
    return r;
}

/* Plain libpq (simple query protocol) through the proxy: COMMIT in any spelling is found, a
 * string that only contains it is not. */
START_TEST(test_simple_query_commit_is_found)
{
    th_observer_keep(1);
    const char *table = "f_simple";
    th_fresh_table(table);
    struct event_base *b = th_loop_begin();
    fp_proxy *p = proxy_up();
    const char *commits[] = {"  Commit And\n No  Chain ;\n", "end"};
    fp_commit_fault faults[] = {FP_COMMIT_CUT_AFTER, FP_COMMIT_CUT_BEFORE};
    for (int i = 0; i < 2; i++) {
        PGconn *pg = PQconnectdb(th_proxy_conninfo(p));
        ck_assert_msg(PQstatus(pg) == CONNECTION_OK, "%s", PQerrorMessage(pg));
        int pid = PQbackendPID(pg);
        char sql[128];
        snprintf(sql, sizeof sql, "INSERT INTO %s (id, v) VALUES (%d, 'x')", table, i + 1);
        PQclear(exec_ok(pg, "SELECT 'commit'"));
        PQclear(exec_ok(pg, "BEGIN"));
        PQclear(exec_ok(pg, sql));
        fp_on_commit(p, faults[i], 1, 0);
        PGresult *r = PQexec(pg, commits[i]);
        ck_assert_msg(PQresultStatus(r) != PGRES_COMMAND_OK, "%s went through", commits[i]);
        PQclear(r);
        PQfinish(pg);
        fp_counts k = counts(p);
        ck_assert_int_eq(k.commits, i + 1);
        ck_assert_int_eq(k.commit_faults, i + 1);
        ck_assert_int_eq(k.cuts, i + 1);
        th_wait_backend_gone(pid, 10);
        ck_assert_int_eq(has_row(table, i + 1), faults[i] == FP_COMMIT_CUT_AFTER);
    }
    th_proxy_stop(p);
    th_loop_end(b);
    th_observer_keep(0);
}
END_TEST

static Suite *faults_suite(void)
{
    Suite *s = suite_create("faults");
    TCase *t = tcase_create("commit");
    tcase_set_timeout(t, 60);
    tcase_add_loop_test(t, test_cut_after_commit_is_unknown_and_resolves_committed, 0, 3);
    tcase_add_loop_test(t, test_cut_before_commit_is_unknown_and_resolves_aborted, 0, 4);
    tcase_add_loop_test(t, test_error_ahead_of_commit_then_cut_is_rolled_back, 0, 3);
    tcase_add_test(t, test_cancel_with_commit_reply_stalled_waits_grace_then_unknown);
    suite_add_tcase(s, t);
    /* CK_RUN_CASE=random with PGSCOPE_SEED=N repeats one sequence of random cuts */
    t = tcase_create("random");
    tcase_set_timeout(t, 120);
    tcase_add_test(t, test_random_cuts_give_exact_outcomes);
    suite_add_tcase(s, t);
    t = tcase_create("wire");
    tcase_set_timeout(t, 60);
    tcase_add_test(t, test_slow_drip_delivers_every_row);
    tcase_add_test(t, test_simple_query_commit_is_found);
    suite_add_tcase(s, t);
    return s;
}

int main(void)
{
    return th_run_suite(faults_suite());
}

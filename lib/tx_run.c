/* pgs_run_tx, the `async with` form: begin, run the body, and retry serialization failures
 * and deadlocks with backoff and jitter (never after an unknown commit), counting the body's
 * runs; tx_run continues a retry the pool moved to another guard. Built on the transaction
 * guards (tx.c) and the loop adapter; knows nothing of pools. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "conn.h"
#include "error.h"
#include "loop.h"
#include "tx_private.h"

enum { DEFAULT_RETRY_BASE_MS = 5, DEFAULT_RETRY_MAX_MS = 500 };

struct run {
    pgs_conn *conn;
    pgs_tx_opts opts;
    pgs_tx_body body;
    pgs_tx_done_cb done;
    void *arg;
    int attempts;       /* the body's runs so far (a pool's retry carries them over) */
    pgs_tx_result last; /* the last attempt's outcome, while a retry waits */
    pgs_error last_err;
    uint64_t rng;
    loop_ev *ev;
};

int run_attempts(const run *r)
{
    return r->attempts;
}

static void run_finish(run *r, pgs_tx_result *res)
{
    res->attempts = r->attempts;
    pgs_tx_done_cb done = r->done;
    void *arg = r->arg;
    loop_ev_free(r->ev);
    free(r);
    done(res, arg);
}

void run_conn_freed(void *owner)
{
    ((run *)owner)->conn = NULL;
}

static void run_attempt(void *arg, int what)
{
    (void)what;
    run *r = arg;
    pgs_tx *tx;
    if (r->conn && conn_owner(r->conn) == r)
        conn_set_owner(r->conn, NULL, NULL);
    if (r->attempts > 0 && (!r->conn || !conn_ready(r->conn))) {
        /* The connection died (or was closed) during the backoff: the failure that asked for
         * the retry stands, and the body has run as often as it says (pgs_pool_run_tx takes
         * the retry to another guard). */
        pgs_tx_result res = r->last;
        pgs_error e;
        char msg[sizeof e.message + 64];
        snprintf(msg, sizeof msg, "%s; not retried: the connection was lost before the retry",
                 r->last_err.message);
        err_set(&e, r->last_err.code, r->last_err.sqlstate, msg, NULL);
        res.err = &e;
        run_finish(r, &res);
        return;
    }
    int rc = r->conn ? pgs_tx_begin(r->conn, &r->opts, NULL, NULL, &tx) : PGS_ECLOSED;
    /* Refused because its guard is closing (closed by its user before the body ran). */
    int closed = !r->conn || (rc == PGS_EMISUSE && !conn_ready(r->conn));
    if (rc != PGS_OK) {
        pgs_error e;
        err_set(&e, closed ? PGS_ECLOSED : rc, NULL,
                closed ? "the connection guard was closed before the body ran"
                       : "could not begin the transaction",
                NULL);
        pgs_tx_result res = {.outcome = PGS_TX_ROLLED_BACK, .err = &e};
        run_finish(r, &res);
        return;
    }
    r->attempts++;
    tx_attach_run(tx, r);
    r->body(tx, r->arg);
}

int tx_retryable(const pgs_tx_result *res)
{
    return res->outcome == PGS_TX_ROLLED_BACK && res->err && res->err->code == PGS_ESQL &&
           (strcmp(res->err->sqlstate, "40001") == 0 || strcmp(res->err->sqlstate, "40P01") == 0);
}

/* Exponential backoff with full jitter: a random wait up to base * 2^(attempts-1). */
int tx_backoff_ms(const pgs_tx_opts *opts, int attempts, uint64_t *rng)
{
    int base = opts->retry_base_ms ? opts->retry_base_ms : DEFAULT_RETRY_BASE_MS;
    int cap = opts->retry_max_ms ? opts->retry_max_ms : DEFAULT_RETRY_MAX_MS;
    long long limit = (long long)base << (attempts - 1 < 20 ? attempts - 1 : 20);
    if (limit > cap)
        limit = cap;
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    return (int)(*rng % (uint64_t)(limit + 1));
}

static int backoff_ms(run *r)
{
    return tx_backoff_ms(&r->opts, r->attempts, &r->rng);
}

static void keep_last(run *r, const pgs_tx_result *res)
{
    r->last = *res;
    if (res->err)
        r->last_err = *res->err;
    r->last.err = NULL;
}

void run_after(run *r, pgs_tx_result *res)
{
    if (tx_retryable(res) && r->attempts <= r->opts.retries && r->conn && conn_ready(r->conn) &&
        !conn_owner(r->conn)) {
        /* Hold the session through the backoff, so nothing else takes it meanwhile. */
        keep_last(r, res);
        conn_set_owner(r->conn, r, run_conn_freed);
        loop_ev_timer(r->ev, backoff_ms(r));
        return;
    }
    run_finish(r, res);
}

int tx_run(pgs_conn *conn, const pgs_tx_opts *opts, pgs_tx_body body, pgs_tx_done_cb done,
           void *arg, const pgs_tx_result *prior)
{
    if (!conn || !body || !done || tx_check_opts(opts) != PGS_OK)
        return PGS_EINVAL;
    int rc = tx_check_conn(conn);
    if (rc != PGS_OK)
        return rc;
    run *r = calloc(1, sizeof *r);
    if (!r)
        return PGS_ENOMEM;
    r->conn = conn;
    if (opts)
        r->opts = *opts;
    r->body = body;
    r->done = done;
    r->arg = arg;
    r->rng = (uint64_t)(uintptr_t)r ^ ((uint64_t)time(NULL) << 32) ^ 0x9e3779b97f4a7c15ull;
    r->ev = loop_ev_new(conn_base(conn), run_attempt, r);
    if (!r->ev) {
        free(r);
        return PGS_ENOMEM;
    }
    /* The session is the run's from this call, as it is through a retry's backoff: until the
     * body's transaction begins nothing else may take it (a pool's guard closed meanwhile is
     * really closed, not handed to someone else under a body still to run). */
    conn_set_owner(conn, r, run_conn_freed);
    if (prior) {
        /* A retry the pool moved here: it backs off as it would have on the old guard. */
        r->attempts = prior->attempts;
        keep_last(r, prior);
        loop_ev_timer(r->ev, backoff_ms(r));
    } else {
        loop_ev_post(r->ev); /* the body runs from the loop, never inside this call */
    }
    return PGS_OK;
}

int pgs_run_tx(pgs_conn *conn, const pgs_tx_opts *opts, pgs_tx_body body, pgs_tx_done_cb done,
               void *arg)
{
    return tx_run(conn, opts, body, done, arg, NULL);
}

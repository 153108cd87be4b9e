/* pgs_pool_run_tx: acquire + pgs_run_tx + release as one scope, its done fired once the guard
 * is back, and a retry whose connection died moved to another guard; in the multiplexed mode,
 * pool_mux.c's. The top of the library: the pool's public API and the transaction layer's
 * tx.h. */
#include <stdlib.h>

#include "error.h"
#include "pool_private.h"
#include "tx.h"

enum { MAX_AGAIN = 3 };

typedef struct pool_run {
    pgs_pool *pool;
    pgs_tx_opts opts;
    pgs_tx_body body;
    pgs_tx_done_cb done;
    void *arg;
    pgs_conn *conn;
    pgs_tx_result result; /* the last outcome (err points to `err` once reported) */
    pgs_error err;
    int retry; /* the connection died after a retryable failure: retry on another guard */
    int again; /* the guard died before the body ran: run it on another (fresh) */
    int agains; /* how often (bounded: a server that kills every session ends it) */
} pool_run;

static void pool_run_report(pool_run *r)
{
    r->result.err = r->result.err ? &r->err : NULL;
    r->done(&r->result, r->arg);
    free(r);
}

static void pool_run_acquired(pgs_conn *conn, const pgs_error *err, void *arg);

/* The guard is back in the pool (or closed, when its connection died): report, or take the
 * retry to another guard. */
static void pool_run_released(void *arg)
{
    pool_run *r = arg;
    if ((r->retry || r->again) && pgs_pool_acquire(r->pool, pool_run_acquired, r, NULL) == PGS_OK)
        return; /* (a closing pool refuses: the outcome so far stands) */
    pool_run_report(r);
}

static void pool_run_done(const pgs_tx_result *res, void *arg)
{
    pool_run *r = arg;
    r->result = *res;
    if (res->err)
        r->err = *res->err;
    /* Retries left after a serialization failure or deadlock means pgs_run_tx could not run
     * them: the connection died. The transaction was rolled back, so another guard may run it
     * again (never after an unknown commit: that is not retryable). */
    r->retry = tx_retryable(res) && res->attempts <= r->opts.retries;
    /* The guard died between its grant and the body (the pool reads what the server sent
     * before a grant, but a loss can land after it): nothing ran, so another guard may. */
    r->again = res->attempts == 0 && res->err && res->err->code == PGS_ECLOSED &&
               r->agains++ < MAX_AGAIN;
    pgs_conn_close(r->conn, pool_run_released, r); /* back to the pool, then done */
}

static void pool_run_body(pgs_tx *tx, void *arg)
{
    pool_run *r = arg;
    r->body(tx, r->arg);
}

static void pool_run_acquired(pgs_conn *conn, const pgs_error *err, void *arg)
{
    pool_run *r = arg;
    r->conn = conn;
    int retry = r->retry;
    r->retry = 0;
    r->again = 0;
    if (retry)
        r->result.err = &r->err;
    int rc = err ? (int)err->code
                 : tx_run(conn, &r->opts, pool_run_body, pool_run_done, r,
                          retry ? &r->result : NULL);
    if (rc == PGS_OK)
        return;
    /* No transaction: no guard for it (or for its retry: the attempts made stand), or no
     * transaction could begin on it. */
    r->result.outcome = PGS_TX_ROLLED_BACK;
    r->result.err = &r->err;
    r->result.attempts = retry ? r->result.attempts : 0;
    if (err)
        r->err = *err;
    else
        err_set(&r->err, rc, NULL, "could not begin the transaction", NULL);
    if (conn) {
        pgs_conn_close(conn, pool_run_released, r);
        return;
    }
    pool_run_report(r);
}

int pgs_pool_run_tx(pgs_pool *p, const pgs_tx_opts *opts, pgs_tx_body body, pgs_tx_done_cb done,
                    void *arg)
{
    if (!p || !body || !done)
        return PGS_EINVAL;
    if (p->opts.multiplex)
        return mux_run_tx(p, opts, body, done, arg);
    pool_run *r = calloc(1, sizeof *r);
    if (!r)
        return PGS_ENOMEM;
    r->pool = p;
    if (opts)
        r->opts = *opts;
    r->body = body;
    r->done = done;
    r->arg = arg;
    int rc = pgs_pool_acquire(p, pool_run_acquired, r, NULL);
    if (rc != PGS_OK)
        free(r);
    return rc;
}

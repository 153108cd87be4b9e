/* The pool's accounting: its counters (each request's outcome counted once, as its callback
 * is about to fire; each connection it will not reuse counted once, as it lets go), the pool's
 * hooks (acquire, conn_replaced), and the words of its failures, which name the limit hit and
 * the pool's state. Part of the pool layer (pool_private.h); pool.c decides, this file keeps
 * the books. Without hooks it costs a pointer test per event. */
#include <stdio.h>
#include <string.h>

#include "pool_private.h"

/* What the counters mean (exactly, so that they add up):
 *  - requests = acquired + timed_out + canceled + closed + the requests still open (waiting,
 *    or granted and not yet delivered); timed_out counts every request whose wait ran out,
 *    failed_connect those of them that got PGS_ECONNECT (the server could not be reached, or
 *    the setup failed, meanwhile). refused_busy: refused at once, never in `requests`.
 *  - opened: connects that succeeded; connect_failures: that failed. setup_failures: of the
 *    opened ones, those closed because a setup statement failed (at first, or after a reset).
 *  - lost: connections lost after they came up; replaced: connections closed for good that
 *    the pool would otherwise have kept (lost, dirty, cancelled, failed reset, lifetime over);
 *    resets_failed: session resets the server refused (the guard was closed). */

void pool_req_outcome(pgs_pool *p, pgs_pool_req *r, pgs_code code)
{
    pgs_pool_counts *c = &p->counters;
    double waited = pool_now_ms() - r->asked;
    switch (code) {
    case PGS_OK:
        c->acquired++;
        c->wait_total_ms += waited;
        if (waited > c->wait_max_ms)
            c->wait_max_ms = waited;
        break;
    case PGS_ECONNECT:
        c->failed_connect++;
        c->timed_out++; /* (its wait ran out too) */
        break;
    case PGS_ETIMEDOUT:
        c->timed_out++;
        break;
    case PGS_ECANCELED:
        c->canceled++;
        break;
    default:
        c->closed++;
        break;
    }
    const pgs_hooks *h = p->opts.hooks;
    if (h && h->acquire) {
        pgs_acquire_trace t = {.wait_us = (long long)(waited * 1000), .code = code};
        h->acquire(p, &t, h->arg);
    }
}

void pool_replaced(slot *s, int counts, const pgs_error *why)
{
    pgs_pool *p = s->pool;
    if (counts & REPLACED_COUNT)
        p->counters.replaced++;
    if (counts & REPLACED_LOST)
        p->counters.lost++;
    const pgs_hooks *h = p->opts.hooks;
    if (h && h->conn_replaced)
        h->conn_replaced(p, s->conn, why, h->arg);
}

/* "max_size 4, all in use, 3 waiting" */
static void describe_state(const pgs_pool *p, char *out, size_t cap)
{
    if (p->in_use >= p->opts.max_size)
        snprintf(out, cap, "max_size %d, all in use, %d waiting", p->opts.max_size, p->waiting);
    else
        snprintf(out, cap, "max_size %d, %d in use, %d opening, %d waiting", p->opts.max_size,
                 p->in_use, p->connecting, p->waiting);
}

void pool_wait_error(pgs_pool *p, pgs_error *err, const char *what, int timeout_ms,
                     const char *limit, const char *state)
{
    char msg[sizeof err->message + sizeof p->connect_err.message];
    if (p->connect_failing) {
        /* The server could not be reached (or a new connection's setup failed) meanwhile:
         * that is why, and its SQLSTATE goes with it. */
        snprintf(msg, sizeof msg, "no %s within %d ms (%s; %s): the last new connection failed: %s",
                 what, timeout_ms, limit, state, p->connect_err.message);
        err_set(err, PGS_ECONNECT, p->connect_err.sqlstate, msg, NULL);
    } else {
        snprintf(msg, sizeof msg, "no %s within %d ms (%s; %s)", what, timeout_ms, limit, state);
        err_set(err, PGS_ETIMEDOUT, NULL, msg, NULL);
    }
}

void pool_timeout_error(pgs_pool *p, pgs_pool_req *r)
{
    char state[128];
    describe_state(p, state, sizeof state);
    pool_wait_error(p, &r->err, "connection", r->timeout_ms,
                    r->own_timeout ? "this request's timeout" : "the pool's acquire_timeout_ms",
                    state);
}

void pool_failed_error(pgs_pool *p, pgs_pool_req *r, pgs_code code)
{
    char msg[160];
    double waited = pool_now_ms() - r->asked;
    if (code == PGS_ECANCELED)
        snprintf(msg, sizeof msg, "the request was canceled after %.0f ms", waited);
    else
        snprintf(msg, sizeof msg, "the pool was closed while the request waited (%.0f ms; "
                 "max_size %d, %d in use)", waited, p->opts.max_size, p->in_use);
    err_set(&r->err, code, NULL, msg, NULL);
}

void pgs_pool_stats(const pgs_pool *p, pgs_pool_counts *st)
{
    if (!p || !st)
        return;
    *st = p->counters;
    st->size = p->size;
    st->idle = p->nidle;
    st->in_use = p->in_use;
    st->waiting = p->waiting;
}

const char *pgs_pool_refusal(const pgs_pool *p)
{
    return p ? p->refusal : "";
}

void pgs_pool_stats_reset(pgs_pool *p)
{
    if (p)
        memset(&p->counters, 0, sizeof p->counters); /* the gauges are not kept here */
}

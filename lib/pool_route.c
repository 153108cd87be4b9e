/* Read routing over two pools: read-only transactions to a standby while its replay lag is
 * within the caller's bound, everything else (and reads when the standby lags, is unreachable
 * or its lag is not known yet) to the primary. The lag is measured on the standby every so
 * often, on one of its pool's guards. Sits on the pool's public API (pgs_pool_run_tx). */
#include <stdlib.h>

#include "error.h"
#include "loop.h"
#include "pgscope.h"

enum { DEFAULT_MAX_LAG_MS = 1000, DEFAULT_LAG_CHECK_MS = 500 };

/* The standby's replay lag in ms: 0 while its WAL receiver runs and it has replayed all it
 * received (an idle primary writes nothing, so the last replayed commit's age would grow
 * without any lag); otherwise the age of the last transaction it replayed. A server not in
 * recovery (promoted) has none. */
#define LAG_SQL                                                                                    \
    "SELECT CASE WHEN NOT pg_catalog.pg_is_in_recovery() THEN 0 "                                  \
    "WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_stat_wal_receiver) AND "                            \
    "pg_catalog.pg_last_wal_receive_lsn() = pg_catalog.pg_last_wal_replay_lsn() THEN 0 "           \
    "ELSE (extract(epoch FROM now() - pg_catalog.pg_last_xact_replay_timestamp()) * 1000)::bigint " \
    "END"

struct pgs_router {
    pgs_pool *primary, *standby;
    pgs_router_opts opts;
    loop_ev *timer;
    long lag_ms;   /* as last measured; -1: not known (not yet, or the standby failed) */
    int measuring; /* a measurement is in flight (it holds the router) */
    int freed;     /* pgs_router_free was called while it was */
};

static void measure(void *arg, int what);

static void router_release(pgs_router *r)
{
    loop_ev_free(r->timer);
    free(r);
}

static void lag_closed(void *arg)
{
    pgs_router *r = arg;
    r->measuring = 0;
    if (r->freed) {
        router_release(r);
        return;
    }
    loop_ev_timer(r->timer, r->opts.lag_check_ms);
}

static void lag_answered(pgs_conn *conn, const PGresult *res, const pgs_error *err, void *arg)
{
    pgs_router *r = arg;
    r->lag_ms = !err && PQntuples(res) == 1 && !PQgetisnull(res, 0, 0)
                    ? strtol(PQgetvalue(res, 0, 0), NULL, 10)
                    : -1;
    if (pgs_conn_close(conn, lag_closed, r) != PGS_OK)
        lag_closed(r);
}

static void lag_acquired(pgs_conn *conn, const pgs_error *err, void *arg)
{
    pgs_router *r = arg;
    if (err) {
        r->lag_ms = -1; /* unreachable: reads go to the primary until it answers again */
        lag_closed(r);
        return;
    }
    if (pgs_query(conn, LAG_SQL, 0, NULL, lag_answered, r) != PGS_OK) {
        r->lag_ms = -1;
        if (pgs_conn_close(conn, lag_closed, r) != PGS_OK)
            lag_closed(r);
    }
}

static void measure(void *arg, int what)
{
    (void)what;
    pgs_router *r = arg;
    r->measuring = 1;
    if (pgs_pool_acquire(r->standby, lag_acquired, r, NULL) != PGS_OK) {
        r->lag_ms = -1; /* (the pool is closing, or too many waiting) */
        r->measuring = 0;
        loop_ev_timer(r->timer, r->opts.lag_check_ms);
    }
}

int pgs_router_new(struct event_base *base, pgs_pool *primary, pgs_pool *standby,
                   const pgs_router_opts *opts, pgs_router **out)
{
    if (out)
        *out = NULL;
    if (!base || !primary || !standby || !out)
        return PGS_EINVAL;
    pgs_router *r = calloc(1, sizeof *r);
    if (!r)
        return PGS_ENOMEM;
    if (opts)
        r->opts = *opts;
    if (r->opts.max_lag_ms == 0)
        r->opts.max_lag_ms = DEFAULT_MAX_LAG_MS;
    if (r->opts.lag_check_ms <= 0)
        r->opts.lag_check_ms = DEFAULT_LAG_CHECK_MS;
    r->primary = primary;
    r->standby = standby;
    r->lag_ms = -1;
    r->timer = loop_ev_new(base, measure, r);
    if (!r->timer) {
        free(r);
        return PGS_ENOMEM;
    }
    loop_ev_timer(r->timer, 0); /* the first measurement from the loop, at once */
    *out = r;
    return PGS_OK;
}

long pgs_router_lag_ms(const pgs_router *r)
{
    return r ? r->lag_ms : -1;
}

pgs_pool *pgs_router_pick(const pgs_router *r, const pgs_tx_opts *opts)
{
    if (!r)
        return NULL;
    if (opts && opts->read_only && r->lag_ms >= 0 &&
        (r->opts.max_lag_ms < 0 || r->lag_ms <= r->opts.max_lag_ms))
        return r->standby;
    return r->primary;
}

int pgs_router_run_tx(pgs_router *r, const pgs_tx_opts *opts, pgs_tx_body body,
                      pgs_tx_done_cb done, void *arg)
{
    if (!r)
        return PGS_EINVAL;
    return pgs_pool_run_tx(pgs_router_pick(r, opts), opts, body, done, arg);
}

int pgs_router_free(pgs_router *r)
{
    if (!r)
        return PGS_EINVAL;
    if (r->freed)
        return PGS_EMISUSE;
    loop_ev_stop(r->timer);
    if (r->measuring) {
        r->freed = 1; /* its guard comes back first */
        return PGS_OK;
    }
    router_release(r);
    return PGS_OK;
}

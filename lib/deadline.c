/* Per-statement limits (pgs_query_ex): a client-side deadline that cancels and closes, and a
 * server-side statement_timeout for one statement only. Built on the connection layer's own
 * API (conn.h) and the loop's timers; plain pgs_query pays nothing for it. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conn.h"
#include "error.h"
#include "loop.h"

typedef struct limited {
    pgs_conn *conn;
    pgs_result_cb cb;
    void *arg;
    loop_ev *timer; /* the client-side deadline, or NULL */
    int timeout_ms;
    int server_limit; /* a server-side limit was set for it */
    int expired;
} limited;

/* set_config(..., is_local = true) lasts until the end of the implicit transaction the
 * pipeline segment makes, that is the statement's own sync: the session's setting is back
 * for whatever follows. (Its answer needs nothing: a failure aborts the statement after it,
 * which then reports it.) */
static const char set_limit[] =
    "SELECT pg_catalog.set_config('statement_timeout', $1, true)";

static void limit_set(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg)
{
    (void)c;
    (void)res;
    (void)err;
    (void)arg;
}

static void limited_done(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg)
{
    limited *l = arg;
    if (l->timer)
        loop_ev_free(l->timer);
    pgs_error e;
    if (err && l->expired) {
        e = *err; /* (the connection's kill already says whose deadline it was) */
        e.code = PGS_ETIMEDOUT;
        err = &e;
    } else if (err && l->server_limit && err->code == PGS_ESQL &&
               strcmp(err->sqlstate, "57014") == 0) {
        e = *err; /* the server's statement_timeout we set */
        e.code = PGS_ETIMEDOUT;
        err = &e;
    }
    l->cb(c, res, err, l->arg);
    free(l);
}

/* The deadline passed before the result: a cancel request, and the connection closed (after
 * a cancel its state is unknown: a late cancel must never reach the next statement). Every
 * statement still pending hears PGS_ETIMEDOUT, ours first in order. */
static void on_deadline(void *arg, int what)
{
    (void)what;
    limited *l = arg;
    l->expired = 1;
    char msg[160];
    snprintf(msg, sizeof msg,
             "a statement's deadline passed (timeout_ms %d): cancel request sent, connection "
             "closed",
             l->timeout_ms);
    conn_kill(l->conn, PGS_ETIMEDOUT, msg, 1);
}

int pgs_query_ex(pgs_conn *c, const char *sql, int nparams, const char *const *values,
                 const pgs_query_opts *opts, pgs_result_cb cb, void *arg)
{
    if (!opts || (opts->timeout_ms == 0 && opts->server_timeout_ms == 0))
        return pgs_query(c, sql, nparams, values, cb, arg);
    if (!c || !sql || !cb || nparams < 0 || (nparams > 0 && !values) || opts->timeout_ms < 0 ||
        opts->server_timeout_ms < 0)
        return PGS_EINVAL;
    limited *l = calloc(1, sizeof *l);
    if (!l)
        return PGS_ENOMEM;
    *l = (limited){.conn = c, .cb = cb, .arg = arg, .timeout_ms = opts->timeout_ms};
    if (opts->timeout_ms > 0 && !(l->timer = loop_ev_new(conn_base(c), on_deadline, l))) {
        free(l);
        return PGS_ENOMEM;
    }
    /* As pgs_query: refused while a transaction guard or the pool owns the session (the
     * check is pgs_query's own, through a statement that is never sent). */
    int rc = PGS_OK;
    if (opts->server_timeout_ms > 0) {
        char ms[16];
        snprintf(ms, sizeof ms, "%d", opts->server_timeout_ms);
        const char *v[1] = {ms};
        rc = conn_user_query(c, set_limit, 1, v, CONN_NO_SYNC, limit_set, NULL);
        l->server_limit = rc == PGS_OK;
    }
    if (rc == PGS_OK)
        rc = conn_user_query(c, sql, nparams, values, 0, limited_done, l);
    if (rc != PGS_OK) {
        if (l->server_limit)
            conn_sync(c, 0); /* end the limit's segment now, not with someone's statement */
        if (l->timer)
            loop_ev_free(l->timer);
        free(l);
        return rc;
    }
    if (l->timer)
        loop_ev_timer(l->timer, opts->timeout_ms);
    return PGS_OK;
}

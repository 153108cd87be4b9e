/* pgs_tx_resolve: what became of a transaction whose COMMIT's reply was lost, asked of the
 * server with txid_status() over a fresh connection guard, unless the server restarted since
 * the id was read (then the id may be another transaction's). Uses the public API only. */
#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "pgscope.h"

typedef struct resolve {
    pgs_resolve_cb cb;
    void *arg;
    char xid[48];   /* the transaction id */
    char started[24]; /* when the server had started as the id was read (""; not known) */
    pgs_txid_status status;
    int failed;
    pgs_error err;
} resolve;

static void resolve_closed(void *arg)
{
    resolve *rs = arg;
    rs->cb(rs->failed ? PGS_TXID_UNKNOWN : rs->status, rs->failed ? &rs->err : NULL, rs->arg);
    free(rs);
}

static void resolve_answer(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg)
{
    resolve *rs = arg;
    if (err) {
        rs->failed = 1;
        rs->err = *err;
    } else if (PQgetisnull(res, 0, 0)) {
        rs->status = PGS_TXID_UNKNOWN; /* too old: the server no longer knows */
    } else if (rs->started[0] && strcmp(PQgetvalue(res, 0, 1), rs->started) != 0) {
        /* Restarted since: after a crash, an id whose assignment was not yet in the WAL is
         * given again, and the status may be the other transaction's. */
        rs->status = PGS_TXID_UNKNOWN;
    } else {
        const char *v = PQgetvalue(res, 0, 0);
        rs->status = strcmp(v, "committed") == 0   ? PGS_TXID_COMMITTED
                     : strcmp(v, "aborted") == 0   ? PGS_TXID_ABORTED
                     : strcmp(v, "in progress") == 0 ? PGS_TXID_IN_PROGRESS
                                                   : PGS_TXID_UNKNOWN;
    }
    pgs_conn_close(c, resolve_closed, rs);
}

static void resolve_open(pgs_conn *c, const pgs_error *err, void *arg)
{
    resolve *rs = arg;
    const char *v[] = {rs->xid};
    int rc = err ? (int)err->code
                 : pgs_query(c,
                             "SELECT txid_status($1::bigint), (extract(epoch from "
                             "pg_catalog.pg_postmaster_start_time()) * 1000000)::bigint::text",
                             1, v, resolve_answer, rs);
    if (rc != PGS_OK) {
        rs->failed = 1;
        if (err)
            rs->err = *err;
        else
            err_set(&rs->err, rc, NULL, "could not ask the server", NULL);
        pgs_conn_close(c, resolve_closed, rs);
    }
}

int pgs_tx_resolve(struct event_base *base, const char *conninfo, const char *xid,
                   pgs_resolve_cb cb, void *arg)
{
    /* "id" or "id/started", each a decimal number */
    size_t id = xid ? strspn(xid, "0123456789") : 0;
    const char *started = xid && xid[id] == '/' ? xid + id + 1 : NULL;
    size_t slen = started ? strspn(started, "0123456789") : 0;
    if (!base || !conninfo || !xid || !cb || id == 0 || id >= 24 ||
        (started ? slen == 0 || slen >= 24 || started[slen] != '\0' : xid[id] != '\0'))
        return PGS_EINVAL;
    resolve *rs = calloc(1, sizeof *rs);
    if (!rs)
        return PGS_ENOMEM;
    rs->cb = cb;
    rs->arg = arg;
    memcpy(rs->xid, xid, id);
    if (started)
        memcpy(rs->started, started, slen);
    pgs_conn *c;
    int rc = pgs_conn_open(base, conninfo, NULL, resolve_open, rs, &c);
    if (rc != PGS_OK)
        free(rs);
    return rc;
}

/* Bulk data on the connection layer: COPY FROM STDIN with backpressure, COPY TO STDOUT chunk by
 * chunk, and statements whose rows are delivered as they arrive (libpq's single-row or chunked
 * mode). Each runs on its own, outside pipeline mode, once the statements before it are
 * answered (pipeline.c queues it; results.c hands it its results through bulk_next). */
#include <limits.h>

#include "conn_private.h"

/* How much COPY data may wait in libpq's buffer before writes are refused until write-ready:
 * libpq itself writes in 8 KiB steps and grows its buffer without bound in non-blocking mode
 * (PQputCopyData), so the bound is ours. */
enum { COPY_HIGH_WATER = 64 * 1024, DEFAULT_BATCH_ROWS = 256 };

static const char not_copy_in[] = "the statement is not COPY ... FROM STDIN (use pgs_query)";
static const char not_copy_out[] = "the statement is not COPY ... TO STDOUT (use pgs_query)";

int bulk_must_wait(pgs_conn *c)
{
    return c->sent.head != NULL || c->held != NULL;
}

int bulk_send(pgs_conn *c, op *o, const char *sql, const char *const *values)
{
    if (bulk_must_wait(c)) {
        /* Leaving pipeline mode needs every result read: wait for them. The server must
         * send them (a flush request when no sync ends the segment). */
        if (!o->copy && !(o->copy = copy_statement(sql, o->nparams, values)))
            return SEND_NOMEM;
        o->phase = OP_UNSENT;
        list_push(&c->waiting, o);
        c->draining = 1;
        if (c->open_segment)
            c->flush_req = 1;
        flush_later(c);
        return 0;
    }
    int ok;
    if (c->segment_err && c->open_segment) {
        /* An earlier statement of the open segment failed (inside a transaction): the server
         * skips everything until the sync. Sent pipelined, libpq answers it "not run" by
         * itself, like any statement behind the error. */
        o->flags |= CONN_NO_SYNC;
        ok = PQsendQueryParams(c->pg, sql, o->nparams, NULL, values, NULL, NULL, 0);
    } else {
        /* libpq allows leaving pipeline mode once every result is read (true: nothing is in
         * flight), also inside a transaction: the statement's own sync keeps it open. */
        if (c->pipelined) {
            if (!PQexitPipelineMode(c->pg))
                return SEND_LOST;
            c->pipelined = 0;
        }
        ok = PQsendQueryParams(c->pg, sql, o->nparams, NULL, values, NULL, NULL, 0);
        if (ok && o->bulk->kind == CONN_STREAM) {
#ifdef LIBPQ_HAS_CHUNK_MODE
            int batch = o->bulk->spec.batch_rows ? o->bulk->spec.batch_rows : DEFAULT_BATCH_ROWS;
            ok = batch > 1 ? PQsetChunkedRowsMode(c->pg, batch) : PQsetSingleRowMode(c->pg);
#else
            ok = PQsetSingleRowMode(c->pg);
#endif
        }
        o->flags |= OP_SOLO;
        c->solo = 1;
        c->open_segment = 0;
        c->flush_req = 0;
        c->sync_turn = c->sync_yielded = 0;
    }
    o->phase = OP_RESULTS;
    list_push(&c->sent, o);
    if (o->copy) {
        free(o->copy);
        o->copy = NULL;
    }
    if (!ok) {
        lost_from_libpq(c);
        return 0;
    }
    flush_later(c);
    return 0;
}

/* ---- COPY FROM STDIN: writing ---- */

/* Hand the end (or abort) to libpq. In non-blocking mode it may not take it yet: then again
 * on write-ready. Returns 0, or -1 when the connection failed. */
static int send_end(pgs_conn *c, pgs_copy *cp)
{
    int r = PQputCopyEnd(c->pg, cp->aborted ? cp->abort_reason : NULL);
    if (r < 0) {
        lost_from_libpq(c);
        return -1;
    }
    if (r == 0) { /* not taken: buffer full */
        cp->full = c->copy_blocked = 1;
        return flush_output(c);
    }
    cp->end_sent = 1;
    cp->phase = BK_FINISHING;
    return flush_output(c);
}

static pgs_code refused(pgs_copy *cp)
{
    pgs_conn *c = cp->conn;
    if (!cp->op->cb)
        return PGS_EMISUSE; /* done fired, or is firing */
    if (c->state == CS_DEAD)
        return c->dead_err->code;
    if (c->state != CS_READY)
        return PGS_EMISUSE;
    return PGS_OK;
}

int pgs_copy_write(pgs_copy *cp, const void *data, size_t len)
{
    if (!cp || (!data && len) || len > INT_MAX)
        return PGS_EINVAL;
    pgs_code rc = refused(cp);
    if (rc != PGS_OK)
        return rc;
    if (cp->end_asked)
        return PGS_EMISUSE;
    pgs_conn *c = cp->conn;
    if (cp->phase != BK_COPY_IN || cp->full) {
        cp->ready_owed = 1;
        return PGS_EAGAIN;
    }
    if (len == 0)
        return PGS_OK;
    int r = PQputCopyData(c->pg, data, (int)len);
    if (r < 0) {
        lost_from_libpq(c);
        return c->dead_err ? c->dead_err->code : PGS_ECONN;
    }
    if (r == 0) { /* libpq could not take it (only if its buffer cannot grow) */
        cp->full = cp->ready_owed = c->copy_blocked = 1;
        flush_output(c);
        return PGS_EAGAIN;
    }
    cp->unflushed += len;
    if (cp->unflushed >= COPY_HIGH_WATER) {
        /* Bounded: push it out now; what the socket does not take makes the next write
         * wait for write-ready (bulk_next tells the caller through on_ready). */
        if (flush_output(c) != 0)
            return PGS_OK; /* taken; done hears of the loss */
        if (c->want_write)
            cp->full = c->copy_blocked = 1;
        else
            cp->unflushed = 0;
    } else {
        flush_later(c);
    }
    return PGS_OK;
}

int pgs_copy_end(pgs_copy *cp, const char *abort_reason)
{
    if (!cp)
        return PGS_EINVAL;
    if (cp->end_asked || !cp->op->cb)
        return PGS_EMISUSE;
    if (abort_reason) {
        cp->abort_reason = strdup(abort_reason);
        cp->aborted = 1;
        if (!cp->abort_reason) /* the server needs some reason; this one always exists */
            cp->abort_reason = strdup("aborted by the caller");
    }
    cp->end_asked = 1;
    pgs_conn *c = cp->conn;
    /* Before the server started it, the end waits for the start (bulk_next). */
    if (cp->phase == BK_COPY_IN && !cp->full && c->state == CS_READY)
        send_end(c, cp);
    return PGS_OK;
}

/* ---- reading ---- */

/* The server started a COPY. The one the call asked for goes ahead; another kind is ended at
 * once (COPY FROM STDIN aborted, COPY TO STDOUT read and discarded) and reported PGS_EINVAL. */
static int copy_started(pgs_conn *c, pgs_copy *cp, ExecStatusType st)
{
    if (st == PGRES_COPY_IN) {
        if (cp->kind != CONN_COPY_IN) {
            cp->mismatch = 1;
            cp->end_asked = cp->aborted = 1;
            if (!(cp->abort_reason = strdup(not_copy_out)))
                cp->aborted = 0; /* (ended empty instead: nothing to copy either way) */
            cp->phase = BK_COPY_IN;
            return send_end(c, cp);
        }
        cp->started = 1;
        cp->phase = BK_COPY_IN;
        if (cp->end_asked)
            return send_end(c, cp);
        cp->ready_owed = 0;
        cp->spec.on_ready(cp, cp->spec.arg);
        return 0;
    }
    /* PGRES_COPY_OUT (COPY_BOTH is replication only, which a guard never starts) */
    if (cp->kind != CONN_COPY_OUT) {
        cp->mismatch = 1;
        cp->stopped = 1;
    } else {
        cp->started = 1;
    }
    cp->phase = BK_COPY_OUT;
    return 0;
}

int bulk_result(pgs_conn *c, op *o, PGresult *res, ExecStatusType st)
{
    pgs_copy *cp = o->bulk;
    if (st == PGRES_SINGLE_TUPLE || st == PGRES_TUPLES_CHUNK_) {
        if (!cp->stopped && cp->spec.on_rows(c, res, cp->spec.arg))
            cp->stopped = 1;
        PQclear(res);
        return c->state == CS_READY;
    }
    PQclear(res); /* a COPY's start, or the same again at a later read */
    if (cp->phase == BK_QUEUED && copy_started(c, cp, st) != 0)
        return 0;
    for (;;) {
        if (c->state != CS_READY)
            return 0;
        if (cp->phase == BK_COPY_IN) {
            if (cp->full && !c->want_write) { /* what libpq held has gone out */
                cp->full = c->copy_blocked = 0;
                cp->unflushed = 0;
                if (cp->end_asked && !cp->end_sent) {
                    if (send_end(c, cp) != 0)
                        return 0;
                    continue;
                }
                if (cp->ready_owed) {
                    cp->ready_owed = 0;
                    cp->spec.on_ready(cp, cp->spec.arg);
                    continue;
                }
            }
            return 0; /* the server answers after the end */
        }
        if (cp->phase != BK_COPY_OUT)
            return 1; /* ended: the final result is next */
        char *buf;
        int n = PQgetCopyData(c->pg, &buf, 1);
        if (n > 0) {
            if (!cp->stopped && cp->spec.on_data(c, buf, (size_t)n, cp->spec.arg))
                cp->stopped = 1;
            PQfreemem(buf);
            continue;
        }
        if (n == 0)
            return 0; /* the rest has not arrived */
        if (n == -2) {
            lost_from_libpq(c);
            return 0;
        }
        cp->phase = BK_FINISHING; /* then the statement's final result */
    }
}

void bulk_last_words(pgs_conn *c)
{
    pgs_copy *cp = c->sent.head->bulk;
    if (!c->pg || cp->phase != BK_COPY_IN || c->goodbye)
        return;
    /* Ending the COPY makes libpq parse messages again; what the server sent before it
     * closed is still in libpq's buffer (the end itself cannot be sent any more). */
    cp->phase = BK_FINISHING;
    PQputCopyEnd(c->pg, "connection lost");
    for (PGresult *res; (res = PQgetResult(c->pg));) {
        if (PQresultStatus(res) == PGRES_FATAL_ERROR && is_fatal(res))
            note_goodbye(c, res);
        PQclear(res);
        if (c->goodbye)
            break;
    }
}

const pgs_error *bulk_outcome(pgs_conn *c, op *o, const PGresult *res, const pgs_error *err,
                              pgs_error *e)
{
    pgs_copy *cp = o->bulk;
    int copy = cp->kind != CONN_STREAM;
    c->copy_blocked = 0;
    if (copy && (cp->mismatch || (!err && !cp->started))) {
        /* Not the COPY asked for: the server ended it (or it was no COPY at all). */
        set_error(c, e, PGS_EINVAL, NULL, cp->kind == CONN_COPY_IN ? not_copy_in : not_copy_out);
        return e;
    }
    if (err && cp->aborted && res && strcmp(err->sqlstate, "57014") == 0) {
        /* The caller's abort: the server's error says so, with the reason. */
        *e = *err;
        e->code = PGS_ECANCELED;
        return e;
    }
    return err;
}

/* ---- the calls on a connection guard (the transaction guard's are tx.c's) ---- */

/* As pgs_query: refused while a transaction guard (or the pool) owns the session. */
static int bulk_on_conn(pgs_conn *c, const char *sql, int nparams, const char *const *values,
                        const conn_bulk_spec *spec, pgs_result_cb done, void *arg,
                        pgs_copy **out)
{
    if (out)
        *out = NULL;
    if (c && (c->owner || (c->keeper && !c->lent)))
        return PGS_EMISUSE;
    return conn_bulk(c, sql, nparams, values, spec, done, arg, out);
}

int pgs_copy_in(pgs_conn *c, const char *sql, pgs_copy_ready_cb on_ready, pgs_result_cb done,
                void *arg, pgs_copy **out)
{
    if (!on_ready)
        return PGS_EINVAL;
    conn_bulk_spec spec = {.kind = CONN_COPY_IN, .on_ready = on_ready, .arg = arg};
    return bulk_on_conn(c, sql, 0, NULL, &spec, done, arg, out);
}

int pgs_copy_out(pgs_conn *c, const char *sql, pgs_copy_data_cb on_data, pgs_result_cb done,
                 void *arg)
{
    if (!on_data)
        return PGS_EINVAL;
    conn_bulk_spec spec = {.kind = CONN_COPY_OUT, .on_data = on_data, .arg = arg};
    return bulk_on_conn(c, sql, 0, NULL, &spec, done, arg, NULL);
}

int pgs_query_stream(pgs_conn *c, const char *sql, int nparams, const char *const *values,
                     int batch_rows, pgs_rows_cb on_rows, pgs_result_cb done, void *arg)
{
    if (!on_rows || batch_rows < 0)
        return PGS_EINVAL;
    conn_bulk_spec spec = {
        .kind = CONN_STREAM, .on_rows = on_rows, .arg = arg, .batch_rows = batch_rows};
    return bulk_on_conn(c, sql, nparams, values, &spec, done, arg, NULL);
}

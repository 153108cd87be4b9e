/* Results: every result libpq returns is mapped through the FIFO of what was sent, each
 * statement's callback fires once it is complete (at its sync), a failed Parse of the
 * statement cache becomes its statement's own error, and a FATAL ends the connection with the
 * server's reason. Sending is pipeline.c's. */
#include "conn_private.h"

/* The statement at the head of `sent` has all its results: tell its callback. Returns 0 when
 * the connection went down on the way (the caller must stop). */
int deliver(pgs_conn *c, op *o)
{
    pgs_error e;
    const pgs_error *err = NULL;
    PGresult *res = o->res;
    o->res = NULL;
    ExecStatusType st = res ? o->status : PGRES_FATAL_ERROR;
    /* For the layer above (conn_not_run): the server skipped it, or its own Parse failed. */
    c->reporting_not_run = st == PGRES_PIPELINE_ABORTED || (o->flags & OP_NOT_RUN);
    switch (st) {
    case PGRES_COMMAND_OK:
        /* The user's own SQL PREPARE: the pool's reset must then drop prepared statements,
         * until one of these commands has dropped them all (counted once it succeeded). */
        if (!c->user_prepared && strcmp(PQcmdStatus(res), "PREPARE") == 0)
            c->user_prepared = 1;
        else if (c->user_prepared && (strcmp(PQcmdStatus(res), "DISCARD ALL") == 0 ||
                                      strcmp(PQcmdStatus(res), "DEALLOCATE ALL") == 0))
            c->user_prepared = 0;
        break;
    case PGRES_TUPLES_OK:
    case PGRES_EMPTY_QUERY:
        break;
    case PGRES_PIPELINE_ABORTED: {
        char msg[sizeof e.message + 64];
        snprintf(msg, sizeof msg, "not run: an earlier statement in the same pipeline failed: %s",
                 c->segment_err ? c->segment_err->message : "(not known)");
        set_error(c, &e, PGS_ESQL, c->segment_err ? c->segment_err->sqlstate : NULL, msg);
        err = &e;
        break;
    }
    case PGRES_COPY_IN:
    case PGRES_COPY_OUT:
    case PGRES_COPY_BOTH:
        set_error(c, &e, PGS_EUNSUPPORTED, NULL,
                          "COPY needs pgs_copy_in or pgs_copy_out, not pgs_query");
        err = &e;
        break;
    default:
        if (res) {
            /* FATAL means the server ends the session (pg_terminate_backend: 57P01); libpq
             * may have given up on it too (lost sync with the server: an error of its own,
             * with no SQLSTATE). A server's error that came before the guard was closed
             * stays the statement's own. */
            int fatal = is_fatal(res);
            c->server_ended |= fatal;
            int lost = fatal || !PQresultErrorField(res, PG_DIAG_SQLSTATE) ||
                       (c->pg && PQstatus(c->pg) == CONNECTION_BAD);
            err_from_result(&e, lost ? PGS_ECONN : PGS_ESQL, res, c->password);
        } else {
            loss_error(c, &e);
        }
        err = &e;
        if (!c->segment_err && (c->segment_err = malloc(sizeof e)))
            *c->segment_err = e;
        /* Our prepared statement is gone (DEALLOCATE by hand) or stale (the table changed
         * under it): parse afresh next time. */
        if ((o->flags & OP_PREPARED) && o->stmt &&
            (strcmp(e.sqlstate, "26000") == 0 || strcmp(e.sqlstate, "0A000") == 0)) {
            if (strcmp(e.sqlstate, "26000") == 0)
                explain_missing_statement(c, &e);
            cache_forget(c, o);
        }
        break;
    }
    if (__builtin_expect(o->flags & (OP_BULK | OP_TRACED), 0)) {
        if (o->flags & OP_BULK)
            err = bulk_outcome(c, o, res, err, &e);
        if (o->flags & OP_TRACED)
            trace_end(c, o, res, err);
    }
    pgs_result_cb cb = o->cb;
    o->cb = NULL;
    /* The server's result goes with its own error (a COPY the caller aborted: ECANCELED) */
    cb(c, err && err->code != PGS_ESQL && err->code != PGS_ECANCELED ? NULL : res, err, o->arg);
    c->reporting_not_run = 0;
    PQclear(res);
    if (c->state != CS_READY)
        return 0;
    /* The statement's own error (a bulk statement's EINVAL and ECANCELED too) leaves the
     * session usable; the others are the connection's. */
    if (err && err->code != PGS_ESQL && err->code != PGS_EINVAL && err->code != PGS_ECANCELED) {
        conn_lost(c, err);
        return 0;
    }
    return 1;
}

/* The cache's own Parse came back. A failure (a syntax error, a missing table, a statement
 * timeout, the backend terminated) belongs to the statement after it, which the server then
 * skips: that statement gets the Parse's own error result, so it ends exactly as the same
 * statement would have unnamed (a cache miss and a hit report the same). The entry is
 * forgotten, so the next use parses again. */
static void prepare_done(pgs_conn *c, op *o)
{
    PGresult *res = o->res;
    o->res = NULL;
    if (res && PQresultStatus(res) == PGRES_COMMAND_OK) {
        cache_confirm(c, o);
        PQclear(res);
        return;
    }
    cache_forget(c, o);
    op *next = c->sent.head; /* its statement: sent right after it */
    if (res && next && (next->flags & OP_PREPARED) && next->stmt_no == o->stmt_no && !next->res) {
        next->res = res; /* the statement's own PIPELINE_ABORTED result is then dropped */
        next->status = PQresultStatus(res);
        next->flags |= OP_NOT_RUN; /* without its Parse, it never ran */
        return;
    }
    if (!c->segment_err && (c->segment_err = malloc(sizeof *c->segment_err))) {
        if (res)
            err_from_result(c->segment_err, PGS_ESQL, res, c->password);
        else
            loss_error(c, c->segment_err);
    }
    PQclear(res);
}

/* The statement at the head of `sent` is complete (its segment's sync came back, or outside
 * pipeline mode its ReadyForQuery): off the FIFO, its callback, and the segment's error is
 * forgotten. Returns 0 when the connection went down on the way (the caller must stop). */
static inline int complete(pgs_conn *c, op *o)
{
    list_pop(&c->sent);
    int alive = o->cb ? deliver(c, o) : 1;
    op_release(c, o);
    if (alive && c->segment_err) {
        free(c->segment_err);
        c->segment_err = NULL;
    }
    return alive;
}

/* The statement's result (its first: a statement has one, or an error after some rows). */
static inline void take_result(op *o, PGresult *res, ExecStatusType st)
{
    if (!o->res) {
        o->res = res;
        o->status = st;
    } else {
        PQclear(res);
    }
}

/* A result other than a statement's plain success: an error, rows or COPY data. Returns 0
 * when reading must stop (the connection went down, or a COPY waits for the socket). */
static int unusual_result(pgs_conn *c, op *o, PGresult *res, ExecStatusType st)
{
    if (st == PGRES_FATAL_ERROR && is_fatal(res))
        note_goodbye(c, res); /* whatever reports the loss, this is why */
    int copy = st == PGRES_COPY_IN || st == PGRES_COPY_OUT || st == PGRES_COPY_BOTH;
    if (o->flags & OP_BULK) {
        /* Rows and COPY data of a bulk statement are copy.c's: it reads what has come
         * (libpq gives the COPY's result again at each read). */
        if (copy || st == PGRES_SINGLE_TUPLE || st == PGRES_TUPLES_CHUNK_)
            return bulk_result(c, o, res, st);
    }
    take_result(o, res, st);
    if (copy) { /* a COPY result has no terminating NULL the pipeline can reach: end here */
        pgs_error e;
        set_error(c, &e, PGS_EUNSUPPORTED, NULL,
                  "COPY needs pgs_copy_in or pgs_copy_out, not pgs_query");
        conn_lost(c, &e);
        return 0;
    }
    return 1;
}

/* Map every result through the FIFO of what was sent: each statement's results end with NULL
 * (outside pipeline mode after ReadyForQuery), and in pipeline mode each sync yields
 * PGRES_PIPELINE_SYNC. */
static void read_results(pgs_conn *c)
{
    while (c->state == CS_READY && c->sent.head && !PQisBusy(c->pg)) {
        op *o = c->sent.head;
        PGresult *res = PQgetResult(c->pg);
        if (o->phase == OP_SYNC) {
            if (res && PQresultStatus(res) == PGRES_PIPELINE_SYNC) {
                /* A synced statement is complete only now: its callback sees the session's
                 * state after ReadyForQuery (PQtransactionStatus, nothing left in flight). */
                PQclear(res);
                if (!complete(c, o))
                    return;
                continue;
            }
            PQclear(res);
            pgs_error e;
            set_error(c, &e, PGS_ECONN, "08P01", "protocol out of step: expected a sync");
            conn_lost(c, &e);
            return;
        }
        if (res) {
            ExecStatusType st = PQresultStatus(res);
            if (__builtin_expect(st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK, 1)) {
                take_result(o, res, st);
                continue;
            }
            if (!unusual_result(c, o, res, st))
                return;
            continue;
        }
        if (o->flags & OP_PREPARE) {
            list_pop(&c->sent);
            prepare_done(c, o);
            op_release(c, o);
            continue;
        }
        if (o->flags & OP_SOLO) {
            /* Outside pipeline mode libpq's NULL comes after ReadyForQuery: complete, and
             * libpq is idle. Its callback runs before what waited behind it is sent (it
             * sees the session idle, a cache entry it dropped is not used, and a failed
             * pool reset closes the guard before the next user's statements leave); while
             * statements wait, those its callback queues join them at the back. */
            c->solo = c->waiting.head != NULL;
            if (!complete(c, o))
                return;
            if (c->solo) {
                c->solo = 0;
                send_list(c, &c->waiting);
            }
            continue;
        }
        if (o->flags & CONN_NO_SYNC) {
            list_pop(&c->sent);
            if (!deliver(c, o)) {
                op_release(c, o);
                return;
            }
            op_release(c, o);
        } else {
            o->phase = OP_SYNC;
        }
    }
    /* A bulk statement waited for what was in flight: its turn. */
    if (__builtin_expect(c->draining, 0) && !c->sent.head && c->state == CS_READY) {
        c->draining = 0;
        send_list(c, &c->waiting);
    }
}

void read_answered(pgs_conn *c)
{
    read_results(c);
}

static void read_notifies(pgs_conn *c)
{
    for (PGnotify *n; c->state == CS_READY && (n = PQnotifies(c->pg));) {
        if (c->opts.on_notify)
            c->opts.on_notify(c, n, c->opts.notify_arg);
        PQfreemem(n);
    }
}

static void on_socket_ready(pgs_conn *c, int what)
{
    int idle = !c->sent.head; /* nothing was owed: what came is a notice, NOTIFY or goodbye */
    if (what & LOOP_READ) {
        if (!PQconsumeInput(c->pg)) {
            lost_from_libpq(c);
            return;
        }
    }
    /* Output left over: flush on write-ready, and after reading too, since the server may
     * only read ours once we have read its (libpq docs, Asynchronous Command Processing). */
    if (c->want_write && flush_output(c) != 0)
        return;
    /* Notifications before and after the results: libpq parses one that arrives after a
     * result only while results are read. Nobody listening, they are only dropped (and
     * parsing an idle connection's input shows a notice or the server's goodbye). */
    if (c->opts.on_notify)
        read_notifies(c); /* those that came before the results first */
    read_results(c);
    if (c->opts.on_notify || idle || ++c->reads_undrained >= NOTIFY_DRAIN_EVERY) {
        c->reads_undrained = 0;
        read_notifies(c);
    }
    /* libpq gave up on the connection while parsing (a protocol error): with statements
     * owed, that comes as an error result (deliver checks); idle, only the status shows it.
     * An idle session's FATAL is the server's goodbye: the connection ends with its reason,
     * without waiting for the EOF that follows. */
    if (c->state == CS_READY && ((idle && PQstatus(c->pg) == CONNECTION_BAD) || c->goodbye))
        lost_from_libpq(c);
}

/* The socket's handler: results (and what the server sends unasked) once connected, the
 * handshake's next step while connecting. */
void conn_on_io(void *arg, int what)
{
    pgs_conn *c = arg;
    if (c->state == CS_READY) {
        c->in_io = 1;
        on_socket_ready(c, what);
        c->in_io = 0;
        if (c->state == CS_READY && c->flush_due)
            push_output(c);
    } else if (c->state == CS_CONNECTING) {
        connect_step(c, PQconnectPoll(c->pg));
    }
    if (c->finish_pending) /* closed from a notice callback: libpq has returned now */
        finish_if_due(c);
}

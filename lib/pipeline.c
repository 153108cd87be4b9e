/* Sending: the statement FIFO into libpq's pipeline. A lone statement on an idle guard goes
 * out on its own, a burst in one write; syncs end segments, flush requests make the server
 * answer without one; plugs hold statements back for a layer above. Flushes once a loop turn.
 * Uses the statement cache (stmt_cache.c); results come back through results.c. */
#include "conn_private.h"

static int send_held(pgs_conn *c, int alone);

/* Push libpq's output buffer out. While data is left, watch write-ready as well; drop it as
 * soon as all is out (a persistent write watch on a writable socket spins). */
int flush_output(pgs_conn *c)
{
    int r = PQflush(c->pg);
    if (r >= 0 && r != c->want_write) {
        c->want_write = r;
        if (loop_ev_watch(c->io, PQsocket(c->pg), LOOP_READ | (r ? LOOP_WRITE : 0)) != 0)
            r = -1;
    }
    if (r < 0) {
        lost_from_libpq(c);
        return -1;
    }
    return 0;
}

/* A lone sync (o, a record with no callback) ends the pipeline segment: it is in flight
 * until its PGRES_PIPELINE_SYNC comes. Returns 0, or -1 when libpq failed (o not taken). */
static int send_sync(pgs_conn *c, op *o)
{
    if (!PQpipelineSync(c->pg))
        return -1;
    c->segs++;
    c->flush_req = 0;
    c->open_segment = 0;
    c->sync_turn = c->sync_yielded = 0;
    o->phase = OP_SYNC;
    list_push(&c->sent, o);
    return 0;
}

/* The end of a loop turn's sending: a statement held because it came alone goes out on its
 * own; the flush request owed by CONN_FLUSH statements (one for all of them, and none when a
 * sync came after them); then out to the socket. */
int push_output(pgs_conn *c)
{
    if (c->sync_turn) {
        if (!c->sync_yielded) {
            /* The caller's next statements often come from an event it posted in this turn
             * (the body of pgs_run_tx after an acquire): wait for the events already queued,
             * once, so they join the segment and all of it leaves in one write. */
            c->sync_yielded = 1;
            loop_ev_post(c->defer);
            return 0;
        }
        /* Nothing joined its segment: a sync of its own ends it. (No held statement: one
         * coming after it would have cleared sync_turn, and none is held behind a sent one.) */
        op *o = op_new(c);
        if (!o) {
            pgs_error e;
            set_error(c, &e, PGS_ENOMEM, NULL, "out of memory ending a pipeline segment");
            conn_lost(c, &e);
            return -1;
        }
        o->flags = c->sync_turn & CONN_RESET;
        if (send_sync(c, o) != 0) {
            op_release(c, o);
            lost_from_libpq(c);
            return -1;
        }
    }
    c->flush_due = 0;
    if (c->held && send_held(c, 1) != 0) {
        lost_from_libpq(c);
        return -1;
    }
    if (c->flush_req) {
        c->flush_req = 0;
        if (!PQsendFlushRequest(c->pg)) {
            lost_from_libpq(c);
            return -1;
        }
    }
    if (flush_output(c) != 0)
        return -1;
    /* A COPY whose writes were refused until libpq's buffer emptied: this flush emptied it
     * (no socket event will say so), so tell the writer now (on_ready, from bulk_next). */
    if (c->copy_blocked && !c->want_write) {
        read_answered(c);
        if (c->state != CS_READY)
            return -1;
    }
    /* After an error in the segment, libpq answers what is sent after it (PIPELINE_ABORTED)
     * by itself, with no socket event to read it by: read it now. */
    if (c->segment_err && c->sent.head) {
        read_answered(c);
        if (c->state != CS_READY)
            return -1;
    }
    return 0;
}

/* Keep the values (v[0..nparams-1]) and sql (v[nparams]; NULL when the cache has the text) of
 * a statement that is not sent at once: one block, freed with free(). */
char **copy_statement(const char *sql, int nparams, const char *const *values)
{
    size_t size = (size_t)(nparams + 1) * sizeof(char *) + (sql ? strlen(sql) + 1 : 0);
    for (int i = 0; i < nparams; i++)
        size += values[i] ? strlen(values[i]) + 1 : 0;
    char **v = malloc(size);
    if (!v)
        return NULL;
    char *p = (char *)(v + nparams + 1);
    for (int i = 0; i <= nparams; i++) {
        const char *s = i < nparams ? values[i] : sql;
        if (!s) {
            v[i] = NULL;
            continue;
        }
        size_t n = strlen(s) + 1;
        v[i] = memcpy(p, s, n);
        p += n;
    }
    return v;
}

/* Put the statement into libpq's buffer: Parse first when fresh (a pipelined Prepare with its
 * own entry in the FIFO), then Bind/Execute by name, or unnamed when not cached. */
static int emit_statement(pgs_conn *c, op *o, const char *sql, const char *const *values,
                          int fresh)
{
    stmt *e = o->stmt;
    if (!e)
        return PQsendQueryParams(c->pg, sql, o->nparams, NULL, values, NULL, NULL, 0) ? 0 : -1;
    if (fresh) {
        op *p = op_new(c);
        if (!p || !PQsendPrepare(c->pg, e->name, sql, o->nparams, NULL)) {
            free(p);
            cache_drop(c, e);
            o->stmt = NULL;
            return -1;
        }
        p->flags = CONN_NO_SYNC | OP_PREPARE | (o->flags & CONN_RESET);
        p->phase = OP_RESULTS;
        p->stmt = e;
        p->stmt_no = e->no;
        list_push(&c->sent, p);
    }
    return PQsendQueryPrepared(c->pg, e->name, o->nparams, values, NULL, NULL, 0) ? 0 : -1;
}

/* Pipeline mode for what follows; libpq allows entering it only when idle (no solo). */
static int enter_pipeline(pgs_conn *c)
{
    if (!c->pipelined) {
        if (!PQenterPipelineMode(c->pg))
            return -1;
        c->pipelined = 1;
    }
    return 0;
}

/* One flush for everything queued in this loop turn: at the end of the socket handler when a
 * result callback queued it (the common closed loop, no extra event), otherwise from a
 * deferred call. */
void flush_later(pgs_conn *c)
{
    if (!c->flush_due) {
        c->flush_due = 1;
        if (!c->in_io)
            loop_ev_post(c->defer);
    }
}

/* The held statement goes out: on its own outside pipeline mode when it stayed alone to the
 * end of the loop turn (no sync of its own to send and no PIPELINE_SYNC result to read, which
 * is most of the pipeline's cost per statement), or pipelined when another came after it. */
static int send_held(pgs_conn *c, int alone)
{
    op *o = c->held;
    c->held = NULL;
    const char *const *values = (const char *const *)o->copy;
    /* Leaving pipeline mode needs every result read: true, since nothing was in flight. */
    if (alone && c->pipelined && PQexitPipelineMode(c->pg))
        c->pipelined = 0;
    int ok;
    if (alone && !c->pipelined) {
        ok = o->stmt ? PQsendQueryPrepared(c->pg, o->stmt->name, o->nparams, values, NULL, NULL, 0)
                     : emit_statement(c, o, o->copy[o->nparams], values, 0) == 0;
        o->flags |= OP_SOLO;
        c->solo = 1;
    } else {
        const char *sql = o->stmt ? o->stmt->sql : o->copy[o->nparams];
        ok = enter_pipeline(c) == 0 && emit_statement(c, o, sql, values, 0) == 0 &&
             PQpipelineSync(c->pg);
        c->segs++;
        c->flush_req = 0;
    }
    /* In flight from here, even on failure: its callback hears of the loss, never "not sent". */
    o->phase = OP_RESULTS;
    list_push(&c->sent, o);
    if (o->copy) {
        free(o->copy);
        o->copy = NULL;
    }
    return ok ? 0 : -1; /* the caller flushes: push_output at once, send_op with its own */
}

/* Send a statement (sql != NULL) or a lone sync, or keep it for later. Returns 0 when the
 * connection took it (sent, held, waiting, or a sync not needed: o may be gone), SEND_LOST
 * when libpq failed (the caller reports the loss), SEND_NOMEM when it could not be kept. */
static int send_op(pgs_conn *c, op *o, const char *sql, const char *const *values)
{
    if (c->solo || c->draining) { /* libpq takes nothing more until the statement on its own
                                     is answered; or a bulk one waits for it to be */
        if (sql && !o->copy && !(o->copy = copy_statement(sql, o->nparams, values)))
            return SEND_NOMEM;
        o->phase = OP_UNSENT;
        list_push(&c->waiting, o);
        return 0;
    }
    if (c->held && send_held(c, 0) != 0)
        return SEND_LOST;
    if (o->flags & OP_BULK)
        return bulk_send(c, o, sql, values);
    if (!sql) { /* a lone sync: ends the pipeline segment (and any error's abort) */
        if (!c->pipelined) {
            op_release(c, o); /* outside pipeline mode every statement ended with its own */
            return 0;
        }
        if (send_sync(c, o) != 0)
            return SEND_LOST;
        flush_later(c);
        return 0;
    }
    int fresh = 0;
    if (__builtin_expect(!(o->flags & CONN_UNCACHED), 1))
        resolve_statement(c, o, sql, &fresh);
    if (!fresh && !(o->flags & (CONN_NO_SYNC | CONN_RESET)) && !c->sent.head &&
        !c->open_segment) {
        /* Alone on an idle connection so far: held to the end of the loop turn. Its values
         * are the caller's only during this call, so they are copied (the text is the
         * cache's), unless it has none. (Never a pool reset: the next user's statements
         * must follow it in the pipeline, not wait for its reply.) */
        if (!o->copy && (o->nparams > 0 || !o->stmt) &&
            !(o->copy = copy_statement(o->stmt ? NULL : sql, o->nparams, values)))
            return SEND_NOMEM;
        o->phase = OP_UNSENT;
        c->held = o;
        flush_later(c);
        return 0;
    }
    if (enter_pipeline(c) != 0 || emit_statement(c, o, sql, values, fresh) != 0)
        return SEND_LOST;
    /* From here the statement may reach the server (libpq writes once its buffer fills), so
     * it is in flight: if what follows fails, its callback hears of the loss, never "not sent". */
    o->phase = OP_RESULTS;
    list_push(&c->sent, o);
    /* Without a sync the server holds its replies; a flush request makes it send them. One
     * request at the end of the loop turn serves every statement before it, and a sync
     * serves them too; CONN_FLUSH_NOW puts one right here. */
    int ok = 1;
    c->sync_turn = c->sync_yielded = 0; /* it joined the segment: ending it is its sender's */
    if (!(o->flags & CONN_NO_SYNC)) {
        ok = PQpipelineSync(c->pg);
        c->segs++;
        c->flush_req = 0;
        c->open_segment = 0;
    } else {
        c->open_segment = 1;
        /* (a pool reset's sync is part of the reset: conn_clean) */
        c->sync_turn = (o->flags & CONN_SYNC_TURN) ? CONN_SYNC_TURN | (o->flags & CONN_RESET) : 0;
        if (o->flags & CONN_FLUSH_NOW) {
            ok = PQsendFlushRequest(c->pg);
            c->flush_req = 0;
        } else if (o->flags & CONN_FLUSH) {
            c->flush_req = 1;
        }
    }
    if (o->copy) { /* libpq has its own copy now (sql and values may have pointed here) */
        free(o->copy);
        o->copy = NULL;
    }
    if (!ok) {
        lost_from_libpq(c);
        return 0;
    }
    flush_later(c); /* PQpipelineSync also writes by itself in libpq 15; the rest waits */
    return 0;
}

/* Send what waits in `list`, in order, up to the first plug marker. What waits in `waiting`
 * stays there, in place, while a statement runs on its own or a bulk one must wait. */
void send_list(pgs_conn *c, op_list *list)
{
    for (op *o; c->state == CS_READY && list->head && !(list->head->flags & OP_MARKER);) {
        if (list == &c->waiting &&
            (c->solo || c->draining || ((list->head->flags & OP_BULK) && bulk_must_wait(c)))) {
            if (!c->solo && !c->draining) { /* the bulk one at its head waits for the rest */
                c->draining = 1;
                if (c->open_segment)
                    c->flush_req = 1;
                flush_later(c);
            }
            break;
        }
        o = list_pop(list);
        const char *sql = o->copy ? o->copy[o->nparams] : NULL;
        if (send_op(c, o, sql, (const char *const *)o->copy) != 0) {
            /* (not SEND_NOMEM: it has its copy) */
            list_push(&c->sent, o);
            lost_from_libpq(c);
        }
    }
}

/* Queue a statement (sql != NULL) or a lone sync (sql == NULL, never with a callback: outside
 * pipeline mode a sync is dropped). */
/* (Inlined: it is most of pgs_query, on every statement's path.) */
__attribute__((always_inline)) static inline int enqueue(pgs_conn *c, const char *sql, int nparams, const char *const *values,
                   int flags, pgs_copy *bulk, pgs_result_cb cb, void *arg)
{
    if (c->state != CS_READY || c->returning) {
        if (c->returning || c->state == CS_CLOSING)
            return PGS_EMISUSE;
        if (c->state == CS_DEAD)
            return c->dead_err->code;
    }
    op *o = op_new(c);
    if (!o)
        return PGS_ENOMEM;
    o->cb = cb;
    o->arg = arg;
    o->flags = flags;
    o->nparams = nparams;
    if (bulk) {
        o->flags |= OP_BULK;
        o->bulk = bulk;
        bulk->op = o;
        bulk->conn = c;
    }
    if (c->state == CS_CONNECTING || (c->plugged && !(flags & CONN_BYPASS))) {
        if (sql) {
            o->copy = copy_statement(sql, nparams, values);
            if (!o->copy) {
                free(o);
                return PGS_ENOMEM;
            }
        }
        o->phase = OP_UNSENT;
        list_push(&c->unsent, o);
    } else {
        int r = send_op(c, o, sql, values);
        if (r != 0) {
            /* Not accepted, so its callback never fires; after a libpq failure the others
             * hear of the loss. */
            o->bulk = NULL; /* (the caller frees it) */
            free(o->copy);
            free(o);
            if (r == SEND_NOMEM)
                return PGS_ENOMEM;
            lost_from_libpq(c);
            return PGS_ECONN;
        }
    }
    /* Accepted (a statement's record stays until its callback; a lone sync's may be gone) */
    if (__builtin_expect(c->opts.hooks != NULL, 0) && sql)
        trace_start(c, o, sql);
    return PGS_OK;
}

/* A statement's arguments checked, then queued (inlined into each caller: pgs_query's is the
 * hot path). */
__attribute__((always_inline)) static inline int checked_query(pgs_conn *c, const char *sql,
                                                               int nparams,
                                                               const char *const *values,
                                                               int flags, pgs_result_cb cb,
                                                               void *arg)
{
    if (!c || !sql || !cb || nparams < 0 || (nparams > 0 && !values))
        return PGS_EINVAL;
    return enqueue(c, sql, nparams, values, flags, NULL, cb, arg);
}

int conn_query(pgs_conn *c, const char *sql, int nparams, const char *const *values, int flags,
               pgs_result_cb cb, void *arg)
{
    return checked_query(c, sql, nparams, values, flags, cb, arg);
}

int conn_bulk(pgs_conn *c, const char *sql, int nparams, const char *const *values,
              const conn_bulk_spec *spec, pgs_result_cb cb, void *arg, pgs_copy **out)
{
    if (out)
        *out = NULL;
    if (!c || !sql || !cb || nparams < 0 || (nparams > 0 && !values))
        return PGS_EINVAL;
    pgs_copy *bulk = calloc(1, sizeof *bulk);
    if (!bulk)
        return PGS_ENOMEM;
    bulk->kind = spec->kind;
    bulk->spec = *spec;
    int rc = enqueue(c, sql, nparams, values, 0, bulk, cb, arg);
    if (rc != PGS_OK) {
        free(bulk);
        return rc;
    }
    if (out)
        *out = bulk;
    return PGS_OK;
}

int conn_sync(pgs_conn *c, int flags)
{
    return enqueue(c, NULL, 0, NULL, flags, NULL, NULL, NULL);
}

int conn_plug(pgs_conn *c)
{
    if (c->state != CS_READY)
        return 0;
    op *m = calloc(1, sizeof *m);
    if (!m)
        return 0; /* no hold: statements go out at once, still in order */
    m->flags = OP_MARKER;
    m->nparams = ++c->next_plug;
    m->phase = OP_UNSENT;
    list_push(&c->unsent, m);
    c->plugged++;
    return m->nparams;
}

void conn_unplug(pgs_conn *c, int plug)
{
    op *prev = NULL;
    for (op *o = c->unsent.head; o; prev = o, o = o->next) {
        if ((o->flags & OP_MARKER) && o->nparams == plug) {
            if (prev)
                prev->next = o->next;
            else
                c->unsent.head = o->next;
            if (c->unsent.tail == o)
                c->unsent.tail = prev;
            free(o);
            c->plugged--;
            break;
        }
    }
    send_list(c, &c->unsent);
}

/* A transaction guard owns the session (use pgs_tx_query), or the pool does. */
static inline int owned(const pgs_conn *c)
{
    return c && (c->owner || (c->keeper && !c->lent));
}

int conn_user_query(pgs_conn *c, const char *sql, int nparams, const char *const *values,
                    int flags, pgs_result_cb cb, void *arg)
{
    return owned(c) ? PGS_EMISUSE : checked_query(c, sql, nparams, values, flags, cb, arg);
}

int pgs_query(pgs_conn *c, const char *sql, int nparams, const char *const *values,
              pgs_result_cb cb, void *arg)
{
    /* (not through conn_user_query: the hot path, with its flags known) */
    return owned(c) ? PGS_EMISUSE : checked_query(c, sql, nparams, values, 0, cb, arg);
}

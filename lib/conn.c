/* The connection guard's life: allocation, the deferred delivery of every callback (results,
 * on_open, on_lost, done), loss (which statements certainly never ran), close, cancel and the
 * keeper's (pool's) hand-back, and the accessors the layers above use through conn.h. The
 * handshake is connect.c's, sending pipeline.c's, results results.c's. Knows nothing of
 * transactions or pools. */
#include "conn_private.h"

#include <errno.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* PQfinish, unless it must wait: called from the notice callback, inside libpq's own parsing
 * (on_io finishes once that libpq call has returned), or while a cancel request for statements
 * still running is on its way (cancel_finished finishes): a pooler such as PgBouncer drops a
 * client's server link when the client goes, and would then drop the cancel request that
 * comes after, leaving the statement running. */
void finish_if_due(pgs_conn *c)
{
    if (!c->pg || c->in_notice || (c->cancel && c->cancel_waits))
        return;
    PQfinish(c->pg);
    c->pg = NULL;
    c->finish_pending = 0;
}

/* Close the libpq connection. The socket watch goes first: the fd dies with PQfinish. */
static void drop_pgconn(pgs_conn *c)
{
    drop_lookups(c);
    if (!c->pg)
        return;
    loop_ev_stop(c->io);
    c->want_write = c->flush_due = c->flush_req = 0;
    c->solo = c->pipelined = c->open_segment = c->sync_turn = c->sync_yielded = 0;
    c->draining = c->copy_blocked = 0;
    c->finish_pending = 1;
    c->cancel_waits = c->cancel && c->sent.head; /* it is for what runs: let it arrive first */
    finish_if_due(c);
}

int is_fatal(const PGresult *res)
{
    const char *sev = PQresultErrorField(res, PG_DIAG_SEVERITY_NONLOCALIZED);
    return sev && (strcmp(sev, "FATAL") == 0 || strcmp(sev, "PANIC") == 0);
}

int is_error(const op *o)
{
    return o->res && (o->status == PGRES_FATAL_ERROR || o->status == PGRES_PIPELINE_ABORTED);
}

/* The connection is failing: mark the statements still owed a callback that certainly never
 * ran on the server, so that a layer above can tell "not run" from "outcome unknown"
 * (conn_not_run). Certain are: those never handed to libpq; those after an error in their
 * own pipeline segment (the server skips everything after an error until the segment's
 * sync); and everything after the server's FATAL (the session ended there). A statement
 * with no such proof may have run, even if its reply never came. */
static void mark_not_run(pgs_conn *c)
{
    int skip = c->segment_err != NULL || c->server_ended;
    for (op *o = c->sent.head; o; o = o->next) {
        if (skip || o->phase == OP_UNSENT)
            o->flags |= OP_NOT_RUN;
        if (is_error(o)) /* it ran and failed: the rest of its segment is skipped */
            skip = 1;
        if (o->res && o->status == PGRES_FATAL_ERROR && is_fatal(o->res))
            c->server_ended = 1;
        if (!(o->flags & CONN_NO_SYNC)) /* its sync ends the segment */
            skip = c->server_ended;
    }
    op_list *unsent[] = {&c->waiting, &c->unsent};
    for (size_t i = 0; i < sizeof unsent / sizeof *unsent; i++)
        for (op *o = unsent[i]->head; o; o = o->next)
            o->flags |= OP_NOT_RUN;
}

/* Every statement still owed a callback goes to the failed list, to hear dead_err. */
static void fail_pending(pgs_conn *c)
{
    if (c->held) {
        list_push(&c->sent, c->held);
        c->held = NULL;
    }
    mark_not_run(c);
    c->plugged = 0; /* the markers go with the rest */
    list_append(&c->failed, &c->sent);
    list_append(&c->failed, &c->waiting);
    list_append(&c->failed, &c->unsent);
    loop_ev_post(c->defer);
}

static const pgs_error out_of_memory = {PGS_ENOMEM, "", "out of memory"};

static void set_dead_err(pgs_conn *c, const pgs_error *why)
{
    if (c->dead_err && c->dead_err != &out_of_memory)
        free(c->dead_err);
    pgs_error *e = malloc(sizeof *e);
    if (e)
        *e = *why;
    c->dead_err = e ? e : (pgs_error *)&out_of_memory;
}

/* The connection is gone for good (lost, failed, cancelled): record why, tell everyone later. */
void go_dead(pgs_conn *c, const pgs_error *why)
{
    if (c->state == CS_READY || c->state == CS_CONNECTING) {
        set_dead_err(c, why);
        c->state = CS_DEAD;
    }
    drop_pgconn(c);
    if (!c->cancel) /* else the timer bounds the cancel request */
        loop_ev_stop(c->timer);
    fail_pending(c);
}

void conn_lost(pgs_conn *c, const pgs_error *why)
{
    /* Before on_open has fired, it is on_open that reports the failure. */
    if (c->state == CS_READY && c->opts.on_lost && !c->on_open)
        c->lost_due = 1;
    if (c->state == CS_READY && c->opts.hooks && !c->on_open)
        c->lost_hook_due = 1;
    go_dead(c, why);
}

/* The server's FATAL: why the session ends, whatever reports the loss. (Which statements it
 * stopped is server_ended's business: the one it came for ran, or was running.) */
void note_goodbye(pgs_conn *c, const PGresult *res)
{
    if (!c->goodbye && (c->goodbye = malloc(sizeof *c->goodbye)))
        err_from_result(c->goodbye, PGS_ECONN, res, c->password);
}

/* Why libpq lost the connection: the server's own FATAL when one came before it closed
 * (57P01 terminated, 25P03 idle in transaction too long, 57P02 crash of another backend...),
 * else libpq's words. */
void loss_error(pgs_conn *c, pgs_error *e)
{
    if (c->goodbye)
        *e = *c->goodbye;
    else
        set_error(c, e, PGS_ECONN, "08006", PQerrorMessage(c->pg));
}

void lost_from_libpq(pgs_conn *c)
{
    if (c->solo && c->sent.head && (c->sent.head->flags & OP_BULK))
        bulk_last_words(c); /* a COPY's lost the server's FATAL: find it */
    pgs_error e;
    loss_error(c, &e);
    conn_lost(c, &e);
}

/* The layers above let go of a guard that is going: a transaction guard it was closed under
 * must stop using it, a keeper (the pool) counts it gone. */
static void detach_conn(pgs_conn *c)
{
    if (c->owner && c->owner_freed)
        c->owner_freed(c->owner);
    c->owner = NULL;
    if (c->keeper)
        c->keeper->freed(c->keeper_arg, c);
    c->keeper = NULL;
}

static void free_conn(pgs_conn *c)
{
    for (op *o = c->spare, *next; o; o = next) {
        next = o->next;
        free(o);
    }
    cache_clear(c);
    free(c->segment_err);
    if (c->dead_err != &out_of_memory)
        free(c->dead_err);
    if (c->pg)
        PQfinish(c->pg);
    free(c->goodbye); /* (after PQfinish: the notice receiver may write it until then) */
    PQconninfoFree(c->parsed);
    loop_ev_free(c->io);
    loop_ev_free(c->timer);
    loop_ev_free(c->defer);
    if (c->password) {
        memset(c->password, 0, strlen(c->password));
        free(c->password);
    }
    free(c);
}

/* Runs from the loop only. User callbacks may call back into the API (close, query); the
 * state is re-read after each one, and the handle is freed only here, after `done`. */
static void run_deferred(void *arg, int what)
{
    (void)what;
    pgs_conn *c = arg;
    if (c->returning && c->state != CS_READY) {
        c->returning = 0; /* lost on its way back: an ordinary close after all */
        c->state = CS_CLOSING;
        c->lost_due = 0;
    }
    if (c->state == CS_READY) {
        if (push_output(c) != 0)
            goto not_ready;
        if (c->returning) {
            /* The keeper has it back before the user's exit fires, so that exit sees the
             * pool's counts with the guard returned (a done that acquires again gets it, not
             * a new connection). The user's calls on it are refused from the close on (it is
             * no longer lent), also from inside done. */
            pgs_done_cb done = c->done;
            void *done_arg = c->done_arg;
            c->done = NULL;
            c->returning = 0;
            c->keeper->returned(c->keeper_arg, c); /* may close it: freed only from the loop */
            if (done)
                done(done_arg);
        }
        return;
    }
not_ready:
    /* A cancel request goes out before anyone hears "cancelled", so the statement has
     * really been told to stop when the callback runs. */
    if (c->cancel)
        return;
    if (c->on_open && c->state != CS_CONNECTING) {
        pgs_conn_cb cb = c->on_open;
        c->on_open = NULL;
        trace_conn_open(c, c->dead_err);
        cb(c, c->dead_err, c->open_arg);
    }
    for (op *o; (o = list_pop(&c->failed));) {
        if (o->cb && o->res && (o->phase == OP_SYNC || (o->flags & OP_SOLO) || is_error(o))) {
            /* Its result came (only the sync, ReadyForQuery, was lost), or its error did. */
            deliver(c, o);
        } else if (o->cb) {
            if (o->flags & OP_TRACED)
                trace_end(c, o, NULL, c->dead_err);
            pgs_result_cb cb = o->cb;
            o->cb = NULL;
            c->reporting_not_run = (o->flags & OP_NOT_RUN) != 0;
            cb(c, NULL, c->dead_err, o->arg);
            c->reporting_not_run = 0;
        }
        op_release(c, o);
    }
    if (c->lost_hook_due) {
        c->lost_hook_due = 0;
        trace_conn_lost(c, c->dead_err);
    }
    if (c->lost_due) {
        c->lost_due = 0;
        c->opts.on_lost(c, c->dead_err, c->opts.lost_arg);
    }
    if (c->state == CS_CLOSING && !c->cancel && !c->failed.head && !c->on_open) {
        /* The handle stays valid until done returns (every call on it is refused by now),
         * and the layers above have let go of it before. */
        detach_conn(c);
        if (c->done)
            c->done(c->done_arg);
        free_conn(c);
    }
}

static void on_timer(void *arg, int what)
{
    (void)what;
    pgs_conn *c = arg;
    if (c->cancel) {
        abandon_cancel(c);
        return;
    }
    if (c->state == CS_CONNECTING)
        connect_timed_out(c);
}

void conn_notice(void *arg, const PGresult *res)
{
    pgs_conn *c = arg;
    if (is_fatal(res)) {
        /* An idle session's FATAL (libpq hands it to the notice receiver): the server's
         * reason for closing, which the loss then reports (on_socket_ready acts on it). */
        note_goodbye(c, res);
        c->server_ended = 1; /* (nothing was in flight: libpq parses a notice only then) */
        return;
    }
    if (c->shared) {
        const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
        if (state && strcmp(state, "25P01") == 0)
            return; /* the COMMIT that opens a segment found none (its BEGIN was skipped) */
    }
    if (c->opts.on_notice && c->state == CS_READY && !c->finish_pending) {
        c->in_notice++;
        c->opts.on_notice(c, res, c->opts.notice_arg);
        c->in_notice--;
    }
}

void *conn_owner(pgs_conn *c)
{
    return c->owner;
}

void conn_set_owner(pgs_conn *c, void *owner, void (*freed)(void *owner))
{
    c->owner = owner;
    c->owner_freed = freed;
}

int conn_in_flight(pgs_conn *c)
{
    return c->sent.head || c->held || c->waiting.head || c->unsent.head;
}

struct event_base *conn_base(pgs_conn *c)
{
    return c->base;
}

int conn_ready(pgs_conn *c)
{
    return c->state == CS_READY;
}

/* A guard in CS_CONNECTING with its events, or NULL (no memory). */
pgs_conn *conn_new(struct event_base *base, const pgs_conn_opts *opts, pgs_conn_cb on_open,
                   void *arg)
{
    pgs_conn *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    c->base = base;
    if (opts)
        c->opts = *opts;
    if (c->opts.cancel_timeout_ms <= 0)
        c->opts.cancel_timeout_ms = DEFAULT_CANCEL_TIMEOUT_MS;
    c->on_open = on_open;
    c->open_arg = arg;
    c->io = loop_ev_new(base, conn_on_io, c);
    c->timer = loop_ev_new(base, on_timer, c);
    c->defer = loop_ev_new(base, run_deferred, c);
    if (!c->io || !c->timer || !c->defer) {
        free_conn(c);
        return NULL;
    }
    c->state = CS_CONNECTING;
    c->xact = c->xact_view = -1;
    if (getrandom(&c->name_tag, sizeof c->name_tag, GRND_NONBLOCK) != sizeof c->name_tag)
        c->name_tag = (uint64_t)(uintptr_t)c ^ ((uint64_t)time(NULL) << 20) ^ (uint64_t)getpid();
    return c;
}

/* ---- exit paths ---- */

int pgs_conn_close(pgs_conn *c, pgs_done_cb done, void *arg)
{
    if (!c)
        return PGS_EINVAL;
    if (c->state == CS_CLOSING || c->returning)
        return PGS_EMISUSE;
    if (c->keeper && !c->lent)
        return PGS_EMISUSE; /* not the user's (any more): the keeper has it */
    if (c->keeper && conn_clean(c)) {
        /* Pooled and reusable: back to the keeper instead of closed. */
        c->lent = 0;
        c->returning = 1;
        c->done = done;
        c->done_arg = arg;
        loop_ev_post(c->defer);
        return PGS_OK;
    }
    if (c->state == CS_READY || c->state == CS_CONNECTING) {
        /* Work the server still runs would go on for nobody: ask it to stop. */
        if (c->state == CS_READY && c->sent.head && !c->cancel)
            start_cancel(c);
        pgs_error e;
        set_error(c, &e, PGS_ECLOSED, NULL, "the connection guard was closed");
        go_dead(c, &e);
    }
    c->state = CS_CLOSING;
    c->done = done;
    c->done_arg = arg;
    c->lost_due = 0;
    fail_pending(c);
    return PGS_OK;
}

int conn_refresh(pgs_conn *c)
{
    if (c->state == CS_READY)
        conn_on_io(c, LOOP_READ); /* a read that finds nothing costs one recv */
    return c->state == CS_READY;
}

void conn_lend(pgs_conn *c)
{
    c->lent = 1;
}

int conn_not_run(pgs_conn *c)
{
    return c->reporting_not_run;
}

const pgs_error *conn_error(pgs_conn *c)
{
    return c->state == CS_READY || c->state == CS_CONNECTING ? NULL : c->dead_err;
}

void conn_set_xact(pgs_conn *c, int status)
{
    c->xact = status;
}

void conn_set_xact_view(pgs_conn *c, int status)
{
    c->xact_view = status;
}

PGTransactionStatusType pgs_conn_txstatus(pgs_conn *c)
{
    if (!c || c->state != CS_READY)
        return PQTRANS_UNKNOWN;
    if (c->xact_view >= 0)
        return (PGTransactionStatusType)c->xact_view;
    if (c->xact >= 0)
        return (PGTransactionStatusType)c->xact;
    return PQtransactionStatus(c->pg);
}

int conn_probe(pgs_conn *c)
{
    if (c->state != CS_READY || conn_in_flight(c))
        return c->state == CS_READY;
    /* An idle session is owed nothing: any byte waiting is the server's goodbye (a FATAL
     * before it closes) or EOF. Peek without consuming, as pgconn's CheckConn does. */
    char b;
    ssize_t n = recv(PQsocket(c->pg), &b, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return 1;
    pgs_error e;
    set_error(c, &e, PGS_ECONN, "08006",
              n == 0 ? "the server closed the idle connection"
                     : "the server sent data on an idle connection (it is closing it)");
    conn_lost(c, &e);
    return 0;
}

int conn_user_prepared(pgs_conn *c)
{
    return c->user_prepared;
}

int conn_clean(pgs_conn *c)
{
    if (c->state != CS_READY || c->owner || c->cancel || c->spoiled || c->returning ||
        (c->keeper && !c->lent))
        return 0;
    int resets = 0;
    if (c->held) {
        if (!(c->held->flags & CONN_RESET))
            return 0;
        resets++;
    }
    op_list *lists[] = {&c->sent, &c->waiting, &c->unsent};
    for (size_t i = 0; i < sizeof lists / sizeof *lists; i++)
        for (op *o = lists[i]->head; o; o = o->next) {
            if (!(o->flags & CONN_RESET))
                return 0;
            resets++;
        }
    /* A reset in flight was sent from an idle session and leaves it idle; libpq reports the
     * pipeline as active until it is answered. */
    return resets > 0 || PQtransactionStatus(c->pg) == PQTRANS_IDLE;
}

int conn_between(pgs_conn *c, const void *owner)
{
    return c->state == CS_READY && c->owner == owner && !c->plugged && !c->cancel &&
           !c->spoiled && !c->returning && !c->held && !c->solo && !c->draining;
}

void conn_spoil(pgs_conn *c)
{
    c->spoiled = 1;
}

void conn_set_shared(pgs_conn *c)
{
    c->shared = 1;
}

int conn_segment_fresh(pgs_conn *c)
{
    return !c->open_segment;
}

char **conn_copy_statement(const char *sql, int nparams, const char *const *values)
{
    return copy_statement(sql, nparams, values);
}

void conn_set_keeper(pgs_conn *c, const conn_keeper *keeper, void *arg)
{
    c->keeper = keeper;
    c->keeper_arg = arg;
}

int conn_fail(pgs_conn *c, const pgs_error *why, int send_cancel)
{
    if ((c->state != CS_READY && c->state != CS_CONNECTING) || c->returning)
        return PGS_EMISUSE;
    if (send_cancel && c->state == CS_READY && c->sent.head && !c->cancel)
        start_cancel(c);
    go_dead(c, why);
    return PGS_OK;
}

int conn_kill(pgs_conn *c, pgs_code code, const char *msg, int send_cancel)
{
    pgs_error e;
    set_error(c, &e, code, code == PGS_ECANCELED ? "57014" : NULL, msg);
    return conn_fail(c, &e, send_cancel);
}

void conn_cancel_request(pgs_conn *c)
{
    if (c->state == CS_READY && c->sent.head && !c->cancel)
        start_cancel(c);
}

int pgs_conn_cancel(pgs_conn *c)
{
    if (!c)
        return PGS_EINVAL;
    if (c->keeper && !c->lent)
        return PGS_EMISUSE;
    return conn_kill(c, PGS_ECANCELED, "canceled by the caller; the connection is closed", 1);
}

PGconn *pgs_conn_pgconn(pgs_conn *c)
{
    return c && c->state == CS_READY ? c->pg : NULL;
}

/* The connection guard: a libpq non-blocking connection driven by the loop adapter (loop.h):
 * async connect with a deadline, a pipelined FIFO of statements, cancel, close and loss.
 * Knows nothing of transactions or pools; tx.c and pool.c use it through conn.h. */
#include "conn.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "error.h"
#include "loop.h"
#include "pgs_config.h"

enum { DEFAULT_CONNECT_TIMEOUT_MS = 30000, DEFAULT_CANCEL_TIMEOUT_MS = 5000 };

typedef enum conn_state {
    CS_CONNECTING, /* PQconnectPoll handshake in progress */
    CS_READY,      /* connected (in pipeline mode while statements are pipelined) */
    CS_DEAD,       /* the PGconn is gone (failed, lost or cancelled); awaiting pgs_conn_close */
    CS_CLOSING,    /* pgs_conn_close called: deliver what is pending, then done, then free */
} conn_state;

typedef enum op_phase {
    OP_UNSENT,  /* not sent yet (connecting, plugged, waiting or held): values in op->copy */
    OP_RESULTS, /* sent: collecting the statement's results up to libpq's NULL */
    OP_SYNC,    /* results in (kept in op->res): the PGRES_PIPELINE_SYNC after it completes it */
} op_phase;

enum {
    OP_MARKER = 1 << 16,  /* a plug marker in `unsent` (not a statement) */
    OP_PREPARE = 1 << 17, /* the cache's own Parse of a statement (no callback) */
    OP_PREPARED = 1 << 18, /* executed by name; its Parse went just before it */
    OP_SOLO = 1 << 19,     /* sent on its own, outside pipeline mode */
    OP_NOT_RUN = 1 << 20   /* failed with the connection, and certainly never ran (mark_not_run) */
};

/* send_op's answers besides 0 (accepted): not accepted, and why */
enum { SEND_LOST = -1, SEND_NOMEM = -2 };

typedef struct op {
    struct op *next;
    op_phase phase;
    int flags;
    pgs_result_cb cb; /* NULL once it has fired */
    void *arg;
    PGresult *res; /* the statement's result, once it came */
    ExecStatusType status; /* PQresultStatus(res), read once */
    /* OP_UNSENT only: one block holding the value pointers, then the strings */
    int nparams;
    char **copy;
    struct stmt *stmt; /* OP_PREPARE / OP_PREPARED: the cache entry (it may be gone since:
                          cache_forget checks) */
    unsigned stmt_no;  /* the entry's number, to tell it from a later one at that address */
} op;

/* The statement cache: each distinct statement text is parsed once per connection, as a named
 * prepared statement, and then executed by name (what asyncpg and psycopg do). */
typedef struct stmt {
    struct stmt *next;
    uint64_t hash;
    size_t len;
    int nparams;
    unsigned no; /* its name's number: never reused, unlike its address */
    char name[40];
    char sql[]; /* the text it was prepared from */
} stmt;

enum { CACHE_BUCKETS = 64, DEFAULT_CACHE_SIZE = 256 };

/* With no on_notify nobody takes notifications, and libpq keeps each that comes (after a
 * LISTEN) until it is taken: they are dropped every this many socket reads rather than on each
 * (a libpq call and parse per statement, as the benchmark's instruction count showed). */
enum { NOTIFY_DRAIN_EVERY = 64 };

typedef struct cancel_req cancel_req;

typedef struct op_list {
    op *head, *tail;
} op_list;

struct pgs_conn {
    conn_state state;
    PGconn *pg;
    struct event_base *base;
    loop_ev *io;    /* the socket */
    loop_ev *timer; /* connect deadline, then the cancel-request deadline */
    loop_ev *defer; /* deferred delivery: callbacks never fire inside the call that caused them */
    cancel_req *cancel; /* a cancel request in flight */
    pgs_conn_opts opts;
    char *password; /* kept only to redact it from messages; wiped on free */
    PQconninfoOption *parsed; /* the conninfo, until libpq is started */
    struct host_slot *hosts;  /* the host list, while names are looked up */
    int nhosts;
    int lookups; /* in flight */
    char *hostlist, *portlist;

    pgs_conn_cb on_open; /* NULL once it has fired */
    void *open_arg;
    pgs_done_cb done;
    void *done_arg;

    op_list sent;   /* in flight, in the order sent: results map to it one by one */
    op_list unsent; /* queued while connecting, or held behind a plug marker */
    op_list waiting; /* came while a statement runs on its own (solo): libpq takes no more */
    op *held;       /* a lone statement on an idle connection, until the end of the loop turn:
                       alone then, it goes out on its own, else pipelined with what came */
    int solo;       /* a statement sent outside pipeline mode is in flight */
    int pipelined;  /* libpq is in pipeline mode */
    int open_segment; /* pipelined statements sent since the last sync (no leaving the mode) */
    int sync_turn;  /* the last statement sent was CONN_SYNC_TURN (with its CONN_RESET): a sync
                       at the end of the turn */
    int sync_yielded; /* push_output waited once for the turn's queued events (sync_turn) */
    op_list failed; /* to be told dead_err from the loop */
    op *spare;      /* recycled statement records */
    int nspare;
    int in_notice;      /* inside the user's notice callback (inside libpq) */
    int finish_pending; /* PQfinish waits for libpq to return, or for the cancel request */
    int cancel_waits;   /* the cancel request is for statements that ran when it closed */
    int plugged;    /* plug markers in `unsent`: new statements wait unless CONN_BYPASS */
    int next_plug;
    const conn_keeper *keeper; /* a pool that takes the guard back on a clean close */
    void *keeper_arg;
    int returning;  /* closed cleanly into the keeper: done, then keeper->returned, from the loop */
    void *owner;    /* the layer above that owns the session (a transaction guard) */
    void (*owner_freed)(void *owner);
    int want_write; /* PQflush left data: wait for write-ready too */
    int flush_due;  /* statements were sent since the last flush */
    int flush_req;  /* a flush request is owed at the next flush (CONN_FLUSH statements sent
                       since the last sync or flush request) */
    int in_io;      /* inside the socket handler: it flushes on its way out */
    int lost_due;   /* on_lost is to fire */
    stmt **cache;        /* CACHE_BUCKETS chains, allocated at the first statement */
    stmt *last;          /* the entry found last, and the address of the text it was found
                            for: the same text at the same address skips hashing */
    uintptr_t last_sql;
    int reads_undrained; /* socket reads since notifications were last taken */
    int cached;          /* entries */
    unsigned next_stmt;  /* names are never reused: the server may still hold old ones */
    uint64_t name_tag;        /* random, in every cached statement's name (stmt_name) */
    int user_prepared;        /* SQL PREPARE ran since prepared statements were last dropped */
    int lent;                 /* kept by a keeper: handed to a user, who has not closed it */
    int xact;                 /* the transaction status the owner knows (conn_set_xact), or -1 */
    int server_ended;         /* the server sent FATAL: nothing after it runs */
    int reporting_not_run;    /* inside the callback of a statement that certainly never ran */
    /* Errors live on the heap only while they exist (most connections never have one): the
     * per-connection state stays small. */
    pgs_error *dead_err;    /* why the connection is gone */
    pgs_error *segment_err; /* the error that aborted the current pipeline segment */
    pgs_error *goodbye;     /* the server's FATAL that came as a notice (an idle session) */
};

/* ---- op lists ---- */

static void list_push(op_list *l, op *o)
{
    o->next = NULL;
    if (l->tail)
        l->tail->next = o;
    else
        l->head = o;
    l->tail = o;
}

static op *list_pop(op_list *l)
{
    op *o = l->head;
    if (o) {
        l->head = o->next;
        if (!l->head)
            l->tail = NULL;
    }
    return o;
}

static void list_append(op_list *to, op_list *from)
{
    if (!from->head)
        return;
    if (to->tail)
        to->tail->next = from->head;
    else
        to->head = from->head;
    to->tail = from->tail;
    from->head = from->tail = NULL;
}

enum { SPARE_OPS = 8 };

/* Statement records are recycled per connection: a statement costs no malloc in the steady
 * state (the benchmark's instruction count showed malloc/free as a third of the overhead). */
static op *op_new(pgs_conn *c)
{
    op *o = c->spare;
    if (o) {
        c->spare = o->next;
        c->nspare--;
        memset(o, 0, sizeof *o);
        return o;
    }
    return calloc(1, sizeof *o);
}

static void op_release(pgs_conn *c, op *o)
{
    if (o->res) /* the checks save a call per statement: both are NULL by now as a rule */
        PQclear(o->res);
    if (o->copy)
        free(o->copy);
    if (c->nspare < SPARE_OPS) { /* (op_new clears it) */
        o->next = c->spare;
        c->spare = o;
        c->nspare++;
        return;
    }
    free(o);
}

/* ---- helpers ---- */

static void set_error(pgs_conn *c, pgs_error *e, pgs_code code, const char *sqlstate,
                      const char *msg)
{
    err_set(e, code, sqlstate, msg, c->password);
}

static void drop_lookups(pgs_conn *c);
static int deliver(pgs_conn *c, struct op *o);
static void cache_clear(pgs_conn *c);
static void cache_drop(pgs_conn *c, stmt *gone);
static void cache_forget(pgs_conn *c, op *o);
static void explain_missing_statement(pgs_conn *c, pgs_error *e);

/* PQfinish, unless it must wait: called from the notice callback, inside libpq's own parsing
 * (on_io finishes once that libpq call has returned), or while a cancel request for statements
 * still running is on its way (cancel_finished finishes): a pooler such as PgBouncer drops a
 * client's server link when the client goes, and would then drop the cancel request that
 * comes after, leaving the statement running. */
static void finish_if_due(pgs_conn *c)
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
    c->finish_pending = 1;
    c->cancel_waits = c->cancel && c->sent.head; /* it is for what runs: let it arrive first */
    finish_if_due(c);
}

static int is_fatal(const PGresult *res)
{
    const char *sev = PQresultErrorField(res, PG_DIAG_SEVERITY_NONLOCALIZED);
    return sev && (strcmp(sev, "FATAL") == 0 || strcmp(sev, "PANIC") == 0);
}

static int is_error(const op *o)
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
static void go_dead(pgs_conn *c, const pgs_error *why)
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

static void conn_lost(pgs_conn *c, const pgs_error *why)
{
    /* Before on_open has fired, it is on_open that reports the failure. */
    if (c->state == CS_READY && c->opts.on_lost && !c->on_open)
        c->lost_due = 1;
    go_dead(c, why);
}

/* The server's FATAL: why the session ends, whatever reports the loss. (Which statements it
 * stopped is server_ended's business: the one it came for ran, or was running.) */
static void note_goodbye(pgs_conn *c, const PGresult *res)
{
    if (!c->goodbye && (c->goodbye = malloc(sizeof *c->goodbye)))
        err_from_result(c->goodbye, PGS_ECONN, res, c->password);
}

/* Why libpq lost the connection: the server's own FATAL when one came before it closed
 * (57P01 terminated, 25P03 idle in transaction too long, 57P02 crash of another backend...),
 * else libpq's words. */
static void loss_error(pgs_conn *c, pgs_error *e)
{
    if (c->goodbye)
        *e = *c->goodbye;
    else
        set_error(c, e, PGS_ECONN, "08006", PQerrorMessage(c->pg));
}

static void lost_from_libpq(pgs_conn *c)
{
    pgs_error e;
    loss_error(c, &e);
    conn_lost(c, &e);
}

/* ---- the cancel request ---- */

/* A cancel request in flight. It outlives nothing: the connection waits for it (bounded by
 * cancel_timeout_ms) before callbacks hear "cancelled" and before `done`. */
struct cancel_req {
    pgs_conn *conn;
#if PGS_HAVE_ASYNC_CANCEL
    PGcancelConn *cc;
    loop_ev *ev;
#else
    PGcancel *cancel;
    loop_job *job;
#endif
};

static void cancel_finished(pgs_conn *c)
{
    c->cancel = NULL;
    loop_ev_stop(c->timer);
    if (c->finish_pending) /* the connection waited for the request: close it now */
        finish_if_due(c);
    loop_ev_post(c->defer);
}

#if !PGS_HAVE_ASYNC_CANCEL
/* libpq < 17 has only the blocking PQcancel, which libpq allows on another thread. */
static void cancel_work(void *arg)
{
    cancel_req *r = arg;
    char errbuf[256];
    PQcancel(r->cancel, errbuf, sizeof errbuf); /* failure is fine: the close follows anyway */
    PQfreeCancel(r->cancel);
    r->cancel = NULL;
}

static void cancel_done(void *arg)
{
    cancel_req *r = arg;
    pgs_conn *c = r->conn;
    free(r);
    cancel_finished(c);
}

/* Ask the server to stop what the backend runs. Call while c->pg is still open. */
static void start_cancel(pgs_conn *c)
{
    cancel_req *r = calloc(1, sizeof *r);
    if (!r)
        return;
    r->conn = c;
    r->cancel = PQgetCancel(c->pg);
    if (r->cancel) {
        r->job = loop_job_start(c->base, cancel_work, cancel_done, r);
        if (r->job) {
            c->cancel = r;
            loop_ev_timer(c->timer, c->opts.cancel_timeout_ms);
            return;
        }
        PQfreeCancel(r->cancel);
    }
    free(r);
}

/* The request took too long (the server's address stalls): stop waiting; the worker frees
 * its part when PQcancel returns. */
static void abandon_cancel(pgs_conn *c)
{
    loop_job_abandon(c->cancel->job, free);
    cancel_finished(c);
}
#else
/* libpq >= 17: the non-blocking cancel connection, polled on the loop like a connect. */
static void cancel_end(cancel_req *r)
{
    pgs_conn *c = r->conn;
    loop_ev_free(r->ev);
    PQcancelFinish(r->cc);
    free(r);
    cancel_finished(c);
}

static int cancel_watch(cancel_req *r, PostgresPollingStatusType st)
{
    if (st != PGRES_POLLING_READING && st != PGRES_POLLING_WRITING)
        return -1;
    return loop_ev_watch_once(r->ev, PQcancelSocket(r->cc),
                              st == PGRES_POLLING_READING ? LOOP_READ : LOOP_WRITE);
}

static void cancel_poll(void *arg, int what)
{
    (void)what;
    cancel_req *r = arg;
    if (cancel_watch(r, PQcancelPoll(r->cc)) != 0)
        cancel_end(r);
}

static void start_cancel(pgs_conn *c)
{
    cancel_req *r = calloc(1, sizeof *r);
    if (!r)
        return;
    r->conn = c;
    r->cc = PQcancelCreate(c->pg);
    r->ev = r->cc ? loop_ev_new(c->base, cancel_poll, r) : NULL;
    if (!r->ev || !PQcancelStart(r->cc) || cancel_watch(r, PGRES_POLLING_WRITING) != 0) {
        loop_ev_free(r->ev);
        PQcancelFinish(r->cc);
        free(r);
        return;
    }
    c->cancel = r;
    loop_ev_timer(c->timer, c->opts.cancel_timeout_ms);
}

static void abandon_cancel(pgs_conn *c)
{
    cancel_end(c->cancel);
}
#endif

/* ---- deferred delivery ---- */

/* Push libpq's output buffer out. While data is left, watch write-ready as well; drop it as
 * soon as all is out (a persistent write watch on a writable socket spins). */
static int flush_output(pgs_conn *c)
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

static int send_held(pgs_conn *c, int alone);

/* A lone sync (o, a record with no callback) ends the pipeline segment: it is in flight
 * until its PGRES_PIPELINE_SYNC comes. Returns 0, or -1 when libpq failed (o not taken). */
static int send_sync(pgs_conn *c, op *o)
{
    if (!PQpipelineSync(c->pg))
        return -1;
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
static int push_output(pgs_conn *c)
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
    return flush_output(c);
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
    /* The guard was closed under a transaction: it must stop using this handle. */
    if (c->owner && c->owner_freed)
        c->owner_freed(c->owner);
    if (c->keeper)
        c->keeper->freed(c->keeper_arg, c);
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
        cb(c, c->dead_err, c->open_arg);
    }
    for (op *o; (o = list_pop(&c->failed));) {
        if (o->cb && o->res && (o->phase == OP_SYNC || (o->flags & OP_SOLO) || is_error(o))) {
            /* Its result came (only the sync, ReadyForQuery, was lost), or its error did. */
            deliver(c, o);
        } else if (o->cb) {
            pgs_result_cb cb = o->cb;
            o->cb = NULL;
            c->reporting_not_run = (o->flags & OP_NOT_RUN) != 0;
            cb(c, NULL, c->dead_err, o->arg);
            c->reporting_not_run = 0;
        }
        op_release(c, o);
    }
    if (c->lost_due) {
        c->lost_due = 0;
        c->opts.on_lost(c, c->dead_err, c->opts.lost_arg);
    }
    if (c->state == CS_CLOSING && !c->cancel && !c->failed.head && !c->on_open) {
        pgs_done_cb done = c->done;
        void *done_arg = c->done_arg;
        free_conn(c);
        if (done)
            done(done_arg);
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
    if (c->state == CS_CONNECTING) {
        char msg[80];
        snprintf(msg, sizeof msg, "connection timed out after %d ms", c->opts.connect_timeout_ms);
        pgs_error e;
        set_error(c, &e, PGS_ETIMEDOUT, NULL, msg);
        go_dead(c, &e);
    }
}

/* ---- results ---- */

/* The statement at the head of `sent` has all its results: tell its callback. Returns 0 when
 * the connection went down on the way (the caller must stop). */
static int deliver(pgs_conn *c, op *o)
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
        set_error(c, &e, PGS_EUNSUPPORTED, NULL, "COPY is not supported by pgscope");
        err = &e;
        break;
    default:
        if (res) {
            /* FATAL means the server ends the session (pg_terminate_backend: 57P01); libpq
             * may have given up on it too (lost sync with the server). */
            int fatal = is_fatal(res);
            c->server_ended |= fatal;
            err_from_result(&e, fatal || PQstatus(c->pg) == CONNECTION_BAD ? PGS_ECONN : PGS_ESQL,
                            res, c->password);
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
    pgs_result_cb cb = o->cb;
    o->cb = NULL;
    cb(c, err ? (err->code == PGS_ESQL ? res : NULL) : res, err, o->arg);
    c->reporting_not_run = 0;
    PQclear(res);
    if (c->state != CS_READY)
        return 0;
    if (err && err->code != PGS_ESQL) {
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

static void send_list(pgs_conn *c, op_list *list);

/* The statement at the head of `sent` is complete (its segment's sync came back, or outside
 * pipeline mode its ReadyForQuery): off the FIFO, its callback, and the segment's error is
 * forgotten. Returns 0 when the connection went down on the way (the caller must stop). */
static int complete(pgs_conn *c, op *o)
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
            if (st == PGRES_FATAL_ERROR && is_fatal(res))
                note_goodbye(c, res); /* whatever reports the loss, this is why */
            if (!o->res) {
                o->res = res;
                o->status = st;
            } else {
                PQclear(res);
            }
            /* A COPY result has no terminating NULL the pipeline can reach: end here. */
            if (st == PGRES_COPY_IN || st == PGRES_COPY_OUT || st == PGRES_COPY_BOTH) {
                pgs_error e;
                set_error(c, &e, PGS_EUNSUPPORTED, NULL, "COPY is not supported by pgscope");
                conn_lost(c, &e);
                return;
            }
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

/* ---- sending ---- */

/* The cache's key: a hash of the text, eight bytes at a time (each statement is looked up, so
 * a byte-at-a-time hash costs in proportion to the SQL's length on every call). */
static uint64_t hash_sql(const char *s, size_t len)
{
    uint64_t h = 0x9e3779b97f4a7c15u ^ len, w;
    size_t i = 0;
    for (; i + 8 <= len; i += 8) {
        memcpy(&w, s + i, 8);
        h = (h ^ w) * 0xbf58476d1ce4e5b9u;
        h ^= h >> 31;
    }
    w = 0;
    memcpy(&w, s + i, len - i);
    h = (h ^ w) * 0x94d049bb133111ebu;
    return h ^ (h >> 29);
}

static void cache_clear(pgs_conn *c)
{
    if (!c->cache)
        return;
    for (int i = 0; i < CACHE_BUCKETS; i++)
        for (stmt *e = c->cache[i], *next; e; e = next) {
            next = e->next;
            free(e);
        }
    free(c->cache);
    c->cache = NULL;
    c->cached = 0;
    c->last = NULL;
}

static void cache_drop(pgs_conn *c, stmt *gone)
{
    if (!c->cache)
        return;
    for (stmt **pp = &c->cache[gone->hash % CACHE_BUCKETS]; *pp; pp = &(*pp)->next)
        if (*pp == gone) {
            if (c->last == gone)
                c->last = NULL;
            *pp = gone->next;
            free(gone);
            c->cached--;
            return;
        }
}

/* A cached statement's prepared statement is not on the server session that ran it: we
 * prepared it on this connection and did not drop it, so either something deallocated it
 * behind the cache's back or the session is not the one it was prepared on, which is what a
 * pooler in transaction mode does. Say so: the server's words alone point nowhere. */
static void explain_missing_statement(pgs_conn *c, pgs_error *e)
{
    char msg[sizeof e->message + 320];
    snprintf(msg, sizeof msg,
             "%s: the statement cache prepared it on this connection, so the server session is "
             "not the one it was prepared on (a pooler in transaction mode, such as PgBouncer, "
             "in between: turn the cache off with pgs_conn_opts.statement_cache < 0) or it was "
             "deallocated behind the cache's back",
             e->message);
    char sqlstate[sizeof e->sqlstate];
    memcpy(sqlstate, e->sqlstate, sizeof sqlstate); /* (err_set writes e->sqlstate) */
    set_error(c, e, e->code, sqlstate, msg);
}

/* Drop the entry a statement ran by, if the cache still has it: an earlier failure or a
 * DEALLOCATE may have dropped it (and its address may hold a newer entry), so it is looked
 * for by address and number, never read through the op's pointer. */
static void cache_forget(pgs_conn *c, op *o)
{
    if (!c->cache)
        return;
    for (int i = 0; i < CACHE_BUCKETS; i++)
        for (stmt *e = c->cache[i]; e; e = e->next)
            if (e == o->stmt && e->no == o->stmt_no) {
                cache_drop(c, e);
                return;
            }
}

/* Does `sql` start with these words (case-insensitive, any whitespace between them)? */
static int starts_with_words(const char *sql, const char *const *words)
{
    for (; *words; words++) {
        while (*sql == ' ' || *sql == '\t' || *sql == '\n' || *sql == '\r' || *sql == '(')
            sql++;
        size_t n = strlen(*words);
        if (strncasecmp(sql, *words, n) != 0)
            return 0;
        sql += n;
        if ((*sql >= 'a' && *sql <= 'z') || (*sql >= 'A' && *sql <= 'Z') || *sql == '_')
            return 0; /* a longer word */
    }
    return 1;
}

/* Statements that deallocate prepared statements empty the cache (and are not cached):
 * DEALLOCATE, and DISCARD ALL (not DISCARD TEMP and the like). */
static int cache_buster(const char *sql)
{
    static const char *const discard_all[] = {"DISCARD", "ALL", NULL};
    static const char *const deallocate[] = {"DEALLOCATE", NULL};
    return starts_with_words(sql, discard_all) || starts_with_words(sql, deallocate);
}

/* The cached statement for sql, or a new entry (*fresh set: it must be prepared first), or
 * NULL: not cached (cache off or full, or no memory). */
static stmt *cache_get(pgs_conn *c, const char *sql, int nparams, int *fresh)
{
    *fresh = 0;
    int size = c->opts.statement_cache;
    if (size < 0)
        return NULL;
    if (size == 0)
        size = DEFAULT_CACHE_SIZE;
    stmt *e;
    if (!c->cache && !(c->cache = calloc(CACHE_BUCKETS, sizeof *c->cache)))
        return NULL;
    size_t len = strlen(sql);
    uint64_t h = hash_sql(sql, len);
    for (e = c->cache[h % CACHE_BUCKETS]; e; e = e->next)
        if (e->hash == h && e->len == len && e->nparams == nparams &&
            memcmp(e->sql, sql, len) == 0) {
            c->last = e;
            c->last_sql = (uintptr_t)sql;
            return e;
        }
    if (c->cached >= size)
        return NULL;
    e = malloc(sizeof *e + len + 1);
    if (!e)
        return NULL;
    e->hash = h;
    e->len = len;
    e->nparams = nparams;
    e->no = ++c->next_stmt;
    /* Unique beyond the connection: behind a pooler that shares server sessions between
     * clients, a name another client prepared can never match one of ours (it would run that
     * client's statement), and ours fails loudly instead (explain_missing_statement). */
    snprintf(e->name, sizeof e->name, "pgs_s_%016llx_%u", (unsigned long long)c->name_tag, e->no);
    memcpy(e->sql, sql, len + 1);
    e->next = c->cache[h % CACHE_BUCKETS];
    c->cache[h % CACHE_BUCKETS] = e;
    c->cached++;
    *fresh = 1;
    return e;
}

/* Keep the values (v[0..nparams-1]) and sql (v[nparams]; NULL when the cache has the text) of
 * a statement that is not sent at once: one block, freed with free(). */
static char **copy_statement(const char *sql, int nparams, const char *const *values)
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

/* Which cache entry the statement runs by (o->stmt, executed by name), and whether it is new
 * (*fresh: its Parse must go first). None when the cache is off or full; a statement that
 * deallocates prepared statements is never cached and empties the cache. */
static void resolve_statement(pgs_conn *c, op *o, const char *sql, int *fresh)
{
    stmt *e = c->last; /* set only while the cache is on */
    /* The same text as last time, at the same address, is the common case (a statement in a
     * loop): no hashing. The text may have changed in place (a reused buffer): strcmp tells. */
    if (e && (uintptr_t)sql == c->last_sql && e->nparams == o->nparams &&
        strcmp(e->sql, sql) == 0) {
        *fresh = 0;
        o->stmt = e;
        o->stmt_no = e->no;
        o->flags |= OP_PREPARED;
        return;
    }
    e = cache_get(c, sql, o->nparams, fresh);
    int buster = *fresh || !e ? cache_buster(sql) : 0;
    if (*fresh && buster) { /* never cached: a hit cannot be one */
        cache_drop(c, e);
        e = NULL;
        *fresh = 0;
    }
    if (!e && buster)
        cache_clear(c); /* the server forgets (some of) our prepared statements */
    o->stmt = e;
    if (e) {
        o->stmt_no = e->no;
        o->flags |= OP_PREPARED;
    }
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
static void flush_later(pgs_conn *c)
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
    if (c->solo) { /* libpq takes nothing more until the statement on its own is answered */
        if (sql && !o->copy && !(o->copy = copy_statement(sql, o->nparams, values)))
            return SEND_NOMEM;
        o->phase = OP_UNSENT;
        list_push(&c->waiting, o);
        return 0;
    }
    if (c->held && send_held(c, 0) != 0)
        return SEND_LOST;
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

/* Send what waits in `list`, in order, up to the first plug marker. */
static void send_list(pgs_conn *c, op_list *list)
{
    for (op *o; c->state == CS_READY && list->head && !(list->head->flags & OP_MARKER);) {
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
static int enqueue(pgs_conn *c, const char *sql, int nparams, const char *const *values,
                   int flags, pgs_result_cb cb, void *arg)
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
        return PGS_OK;
    }
    int r = send_op(c, o, sql, values);
    if (r != 0) {
        /* Not accepted, so its callback never fires; after a libpq failure the others hear
         * of the loss. */
        free(o);
        if (r == SEND_NOMEM)
            return PGS_ENOMEM;
        lost_from_libpq(c);
        return PGS_ECONN;
    }
    return PGS_OK;
}

int conn_query(pgs_conn *c, const char *sql, int nparams, const char *const *values, int flags,
               pgs_result_cb cb, void *arg)
{
    if (!c || !sql || !cb || nparams < 0 || (nparams > 0 && !values))
        return PGS_EINVAL;
    return enqueue(c, sql, nparams, values, flags, cb, arg);
}

int conn_sync(pgs_conn *c, int flags)
{
    return enqueue(c, NULL, 0, NULL, flags, NULL, NULL);
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

int pgs_query(pgs_conn *c, const char *sql, int nparams, const char *const *values,
              pgs_result_cb cb, void *arg)
{
    if (c && (c->owner || (c->keeper && !c->lent)))
        return PGS_EMISUSE; /* a transaction guard owns the session (use pgs_tx_query), or the
                               pool does */
    return conn_query(c, sql, nparams, values, 0, cb, arg);
}

/* ---- connecting ---- */

/* libpq puts a startup error's SQLSTATE only in the verbose message text ("FATAL:  28P01: ...",
 * with a LOCATION line): take the code out and leave the words. */
static void connect_error(pgs_conn *c, pgs_error *e)
{
    char msg[1024];
    snprintf(msg, sizeof msg, "%s", PQerrorMessage(c->pg));
    char sqlstate[6] = "";
    for (char *p = strstr(msg, "FATAL:  "); p; p = strstr(p, "FATAL:  ")) {
        p += 8;
        if (strspn(p, "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ") == 5 && p[5] == ':' && p[6] == ' ') {
            memcpy(sqlstate, p, 5);
            memmove(p, p + 7, strlen(p + 7) + 1);
        }
    }
    for (char *p = strstr(msg, "\nLOCATION:"); p; p = strstr(p, "\nLOCATION:")) {
        char *end = strchr(p + 1, '\n');
        if (!end) {
            *p = '\0';
            break;
        }
        memmove(p, end, strlen(end) + 1);
    }
    pgs_code code = PGS_ECONNECT;
    if (strncmp(sqlstate, "28", 2) == 0)
        code = PGS_EAUTH;
    else if (strcmp(sqlstate, "3D000") == 0)
        code = PGS_ENODB;
    set_error(c, e, code, sqlstate, msg);
}

static void connected(pgs_conn *c)
{
    loop_ev_stop(c->timer);
    PQsetErrorVerbosity(c->pg, PQERRORS_DEFAULT);
    if (PQsetnonblocking(c->pg, 1) != 0) {
        pgs_error e;
        set_error(c, &e, PGS_ECONNECT, NULL, PQerrorMessage(c->pg));
        go_dead(c, &e);
        return;
    }
    c->state = CS_READY;
    if (loop_ev_watch(c->io, PQsocket(c->pg), LOOP_READ) != 0) {
        lost_from_libpq(c);
        return;
    }
    send_list(c, &c->unsent);
    if (c->state != CS_READY)
        return;
    pgs_conn_cb cb = c->on_open;
    c->on_open = NULL;
    cb(c, NULL, c->open_arg);
}

/* One step of the handshake. The socket may change between steps, so each step re-points a
 * one-shot watch at PQsocket() in the direction the poll asked for. */
static void connect_step(pgs_conn *c, PostgresPollingStatusType st)
{
    if (st == PGRES_POLLING_READING || st == PGRES_POLLING_WRITING) {
        int want = st == PGRES_POLLING_READING ? LOOP_READ : LOOP_WRITE;
        if (loop_ev_watch_once(c->io, PQsocket(c->pg), want) == 0)
            return;
    }
    if (st == PGRES_POLLING_OK) {
        connected(c);
        return;
    }
    pgs_error e;
    connect_error(c, &e);
    go_dead(c, &e);
}

static void on_io(void *arg, int what)
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

static void on_notice(void *arg, const PGresult *res)
{
    pgs_conn *c = arg;
    if (is_fatal(res)) {
        /* An idle session's FATAL (libpq hands it to the notice receiver): the server's
         * reason for closing, which the loss then reports (on_socket_ready acts on it). */
        note_goodbye(c, res);
        c->server_ended = 1; /* (nothing was in flight: libpq parses a notice only then) */
        return;
    }
    if (c->opts.on_notice && c->state == CS_READY && !c->finish_pending) {
        c->in_notice++;
        c->opts.on_notice(c, res, c->opts.notice_arg);
        c->in_notice--;
    }
}

/* One entry of the conninfo's comma-separated host list. */
typedef struct host_slot {
    const char *host;    /* points into conn->hostlist */
    const char *port;    /* points into conn->portlist, or NULL */
    pgs_conn *conn;
    loop_lookup *lookup; /* in flight */
    char *addrs;         /* a name's numeric addresses, comma-separated */
    char why[160];       /* why a name did not resolve */
} host_slot;

static const char *option(PQconninfoOption *opts, const char *keyword)
{
    for (PQconninfoOption *o = opts; o->keyword; o++)
        if (strcmp(o->keyword, keyword) == 0)
            return o->val && *o->val ? o->val : NULL;
    return NULL;
}

static int is_name(const char *host)
{
    return *host && *host != '/' && *host != '@' && !loop_is_numeric_host(host);
}

static void drop_lookups(pgs_conn *c)
{
    for (int i = 0; i < c->nhosts; i++) {
        if (c->hosts[i].lookup)
            loop_lookup_cancel(c->hosts[i].lookup);
        free(c->hosts[i].addrs);
    }
    free(c->hosts);
    free(c->hostlist);
    free(c->portlist);
    c->hosts = NULL;
    c->hostlist = c->portlist = NULL;
    c->nhosts = c->lookups = 0;
}

/* Append "item" to a comma-separated list being built in buf. */
static void list_add(char *buf, size_t cap, const char *item)
{
    size_t len = strlen(buf);
    snprintf(buf + len, cap - len, "%s%s", len ? "," : "", item ? item : "");
}

/* Start libpq. Resolved names become one entry per address: host keeps the name (TLS checks
 * it) and hostaddr carries the number, so libpq tries every address without a lookup.
 * gssencmode defaults to disable (see pgs_conn_open). */
static void start_libpq(pgs_conn *c)
{
    const char *kw[64], *val[64];
    char *hosts = NULL, *addrs = NULL, *ports = NULL;
    int n = 0;
    if (c->nhosts > 0) {
        size_t cap = 16;
        for (int i = 0; i < c->nhosts; i++)
            cap += (strlen(c->hosts[i].host) + 64) * 4 +
                   (c->hosts[i].addrs ? strlen(c->hosts[i].addrs) * 8 : 0);
        hosts = calloc(1, cap);
        addrs = calloc(1, cap);
        ports = calloc(1, cap);
        if (!hosts || !addrs || !ports)
            goto nomem;
        char why[400] = "";
        for (int i = 0; i < c->nhosts; i++) {
            host_slot *h = &c->hosts[i];
            if (!is_name(h->host)) {
                list_add(hosts, cap, h->host);
                list_add(addrs, cap, "");
                list_add(ports, cap, h->port);
                continue;
            }
            if (!h->addrs) {
                size_t len = strlen(why);
                snprintf(why + len, sizeof why - len, "%scould not resolve host name \"%s\": %s",
                         len ? "; " : "", h->host, h->why);
                continue;
            }
            char *save = NULL;
            for (char *a = strtok_r(h->addrs, ",", &save); a; a = strtok_r(NULL, ",", &save)) {
                list_add(hosts, cap, h->host);
                list_add(addrs, cap, a);
                list_add(ports, cap, h->port);
            }
        }
        if (!*hosts) {
            pgs_error e;
            set_error(c, &e, PGS_ECONNECT, NULL, why);
            go_dead(c, &e);
            goto out;
        }
    }
    for (PQconninfoOption *o = c->parsed; o->keyword && n < 60; o++) {
        const char *v = o->val;
        if (hosts && strcmp(o->keyword, "host") == 0)
            v = hosts;
        else if (hosts && strcmp(o->keyword, "hostaddr") == 0)
            v = addrs;
        else if (hosts && strcmp(o->keyword, "port") == 0)
            v = option(c->parsed, "port") ? ports : NULL;
        else if (strcmp(o->keyword, "gssencmode") == 0 && !(v && *v) &&
                 !getenv("PGGSSENCMODE") && !option(c->parsed, "service") && !getenv("PGSERVICE"))
            /* libpq's default, prefer, has the first connect of a process look for Kerberos
             * credentials inside PQconnectPoll: tens of ms that block the loop. GSSAPI
             * encryption only when asked for (a service file may ask). */
            v = "disable";
        if (!v)
            continue;
        kw[n] = o->keyword;
        val[n++] = v;
    }
    if (hosts && !option(c->parsed, "hostaddr")) {
        kw[n] = "hostaddr";
        val[n++] = addrs;
    }
    kw[n] = val[n] = NULL;
    c->pg = PQconnectStartParams(kw, val, 0);
    if (!c->pg)
        goto nomem;
    PQsetNoticeReceiver(c->pg, on_notice, c);
    /* Verbose only during start-up, to learn the SQLSTATE of a refused login. */
    PQsetErrorVerbosity(c->pg, PQERRORS_VERBOSE);
    if (PQstatus(c->pg) == CONNECTION_BAD) {
        pgs_error e;
        set_error(c, &e, PGS_EINVAL, NULL, PQerrorMessage(c->pg));
        go_dead(c, &e);
        goto out;
    }
    /* Per the libpq docs, the first poll waits as if PQconnectPoll said "writing". */
    if (loop_ev_watch_once(c->io, PQsocket(c->pg), LOOP_WRITE) != 0) {
        pgs_error e;
        set_error(c, &e, PGS_ECONNECT, NULL, "could not watch the connection's socket");
        go_dead(c, &e);
    }
    goto out;
nomem : {
    pgs_error e;
    set_error(c, &e, PGS_ENOMEM, NULL, NULL);
    go_dead(c, &e);
}
out:
    free(hosts);
    free(addrs);
    free(ports);
    drop_lookups(c);
    PQconninfoFree(c->parsed);
    c->parsed = NULL;
}

static void on_resolved(void *arg, const char *addrs, const char *why)
{
    host_slot *h = arg;
    pgs_conn *c = h->conn;
    h->lookup = NULL;
    if (addrs)
        h->addrs = strdup(addrs);
    else
        snprintf(h->why, sizeof h->why, "%s", why ? why : "lookup failed");
    if (--c->lookups == 0 && c->state == CS_CONNECTING)
        start_libpq(c);
}

/* Split host (and port) lists and start a lookup for each name. Returns 0 when no name needs
 * one (libpq handles numbers and socket paths without blocking), 1 when lookups run, -1 on
 * no memory. */
static int start_lookups(pgs_conn *c)
{
    const char *host = option(c->parsed, "host");
    if (!host || option(c->parsed, "hostaddr"))
        return 0; /* no host: a Unix socket; hostaddr given: the caller already resolved */
    int names = 0, n = 1;
    for (const char *p = host; *p; p++)
        n += *p == ',';
    const char *port = option(c->parsed, "port");
    c->hostlist = strdup(host);
    c->portlist = port ? strdup(port) : NULL;
    c->hosts = calloc((size_t)n, sizeof *c->hosts);
    if (!c->hostlist || (port && !c->portlist) || !c->hosts)
        return -1;
    char *h = c->hostlist, *p = c->portlist;
    for (int i = 0; i < n; i++) {
        char *comma = strchr(h, ',');
        if (comma)
            *comma = '\0';
        c->hosts[i].host = h;
        c->hosts[i].conn = c;
        h = comma ? comma + 1 : h + strlen(h);
        if (p) {
            char *pc = strchr(p, ',');
            if (pc)
                *pc = '\0';
            c->hosts[i].port = p;
            /* one port for all hosts, or one per host (libpq's rule) */
            if (pc)
                p = pc + 1;
        }
        names += is_name(c->hosts[i].host);
    }
    c->nhosts = n;
    if (names == 0) {
        drop_lookups(c);
        return 0;
    }
    for (int i = 0; i < n; i++) {
        host_slot *s = &c->hosts[i];
        if (!is_name(s->host))
            continue;
        s->lookup = loop_resolve(c->base, s->host, on_resolved, s);
        if (!s->lookup)
            return -1;
        c->lookups++;
    }
    return 1;
}

int pgs_conn_open(struct event_base *base, const char *conninfo, const pgs_conn_opts *opts,
                  pgs_conn_cb on_open, void *arg, pgs_conn **out)
{
    if (out)
        *out = NULL;
    if (!base || !conninfo || !on_open || !out)
        return PGS_EINVAL;
    pgs_conn *c = calloc(1, sizeof *c);
    if (!c)
        return PGS_ENOMEM;
    c->base = base;
    if (opts)
        c->opts = *opts;
    if (c->opts.cancel_timeout_ms <= 0)
        c->opts.cancel_timeout_ms = DEFAULT_CANCEL_TIMEOUT_MS;
    c->on_open = on_open;
    c->open_arg = arg;
    c->io = loop_ev_new(base, on_io, c);
    c->timer = loop_ev_new(base, on_timer, c);
    c->defer = loop_ev_new(base, run_deferred, c);
    if (!c->io || !c->timer || !c->defer) {
        free_conn(c);
        return PGS_ENOMEM;
    }
    c->state = CS_CONNECTING;
    c->xact = -1;
    if (getrandom(&c->name_tag, sizeof c->name_tag, GRND_NONBLOCK) != sizeof c->name_tag)
        c->name_tag = (uint64_t)(uintptr_t)c ^ ((uint64_t)time(NULL) << 20) ^ (uint64_t)getpid();
    *out = c;
    char *why = NULL;
    c->parsed = PQconninfoParse(conninfo, &why);
    pgs_error e;
    if (!c->parsed) {
        /* libpq's reason quotes a piece of the string, the password perhaps: not shown. */
        char msg[600] = "invalid connection string: ";
        size_t len = strlen(msg);
        if (why)
            err_conninfo_reason(msg + len, sizeof msg - len, conninfo);
        set_error(c, &e, why ? PGS_EINVAL : PGS_ENOMEM, NULL, why ? msg : NULL);
        PQfreemem(why);
        go_dead(c, &e);
        return PGS_OK;
    }
    const char *pw = option(c->parsed, "password");
    if (pw)
        c->password = strdup(pw);
    const char *t = option(c->parsed, "connect_timeout");
    int timeout_s = t ? atoi(t) : 0;
    if (c->opts.connect_timeout_ms == 0) /* libpq treats 1 as 2 s; so do we */
        c->opts.connect_timeout_ms =
            timeout_s > 0 ? (timeout_s < 2 ? 2 : timeout_s) * 1000 : DEFAULT_CONNECT_TIMEOUT_MS;
    /* One deadline for the whole connect: lookups and every host libpq tries. */
    if (c->opts.connect_timeout_ms > 0)
        loop_ev_timer(c->timer, c->opts.connect_timeout_ms);
    int r = start_lookups(c);
    if (r < 0) {
        set_error(c, &e, PGS_ENOMEM, NULL, NULL);
        go_dead(c, &e);
    } else if (r == 0) {
        start_libpq(c);
    }
    return PGS_OK;
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
        on_io(c, LOOP_READ); /* a read that finds nothing costs one recv */
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

PGTransactionStatusType pgs_conn_txstatus(pgs_conn *c)
{
    if (!c || c->state != CS_READY)
        return PQTRANS_UNKNOWN;
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
    if (c->state != CS_READY || c->owner || c->cancel || c->returning || (c->keeper && !c->lent))
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

void conn_set_keeper(pgs_conn *c, const conn_keeper *keeper, void *arg)
{
    c->keeper = keeper;
    c->keeper_arg = arg;
}

int conn_kill(pgs_conn *c, pgs_code code, const char *msg, int send_cancel)
{
    if ((c->state != CS_READY && c->state != CS_CONNECTING) || c->returning)
        return PGS_EMISUSE;
    if (send_cancel && c->state == CS_READY && c->sent.head && !c->cancel)
        start_cancel(c);
    pgs_error e;
    set_error(c, &e, code, code == PGS_ECANCELED ? "57014" : NULL, msg);
    go_dead(c, &e);
    return PGS_OK;
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

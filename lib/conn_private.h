/* Internal: the connection layer's shared state, for its files only (conn.c, connect.c,
 * cancel.c, stmt_cache.c, pipeline.c, results.c), as libuv keeps one internal header for the
 * files of a layer. The layers above see only conn.h. */
#ifndef PGS_CONN_PRIVATE_H
#define PGS_CONN_PRIVATE_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "conn.h"
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
    OP_NOT_RUN = 1 << 20,  /* failed with the connection, and certainly never ran (mark_not_run) */
    OP_BULK = 1 << 21,     /* a COPY or streamed statement: `bulk` is set (flags are at hand on
                              the hot paths where the pointer is not) */
    OP_TRACED = 1 << 22    /* its connection has hooks: `trace` is set (trace.c) */
};

/* send_op's answers besides 0 (accepted): not accepted, and why */
enum { SEND_LOST = -1, SEND_NOMEM = -2 };

typedef struct op {
    struct op *next;
    pgs_result_cb cb; /* NULL once it has fired */
    void *arg;
    PGresult *res; /* the statement's result, once it came */
    /* OP_UNSENT only: one block holding the value pointers, then the strings */
    char **copy;
    struct stmt *stmt; /* OP_PREPARE / OP_PREPARED: the cache entry (it may be gone since:
                          cache_forget checks) */
    struct pgs_copy *bulk; /* a COPY or streamed statement (copy.c); NULL for the rest */
    struct op_trace *trace; /* its start, for the hooks (trace.c); NULL without hooks */
    int flags;
    int nparams;
    unsigned stmt_no;     /* the entry's number, to tell it from a later one at that address */
    unsigned char phase;  /* an op_phase (small: op_new clears the record for every statement) */
    unsigned char status; /* an ExecStatusType: PQresultStatus(res), read once */
} op;

/* A COPY or streamed statement's state (copy.c): the public pgs_copy handle. */
typedef enum bulk_phase {
    BK_QUEUED,    /* not sent yet, or sent and not yet started by the server */
    BK_COPY_IN,   /* the server takes COPY data: pgs_copy_write */
    BK_COPY_OUT,  /* the server sends COPY data: on_data */
    BK_FINISHING, /* data done (or not a COPY): the statement's final result and its end */
} bulk_phase;

struct pgs_copy {
    pgs_conn *conn;
    struct op *op; /* its statement record: done has fired once op->cb is NULL */
    int kind;      /* CONN_COPY_IN, CONN_COPY_OUT or CONN_STREAM */
    bulk_phase phase;
    conn_bulk_spec spec;
    int started;     /* the server started the COPY the call asked for */
    int mismatch;    /* the statement was not the kind of COPY the call asked for */
    int stopped;     /* the caller asked for no more data (the rest is discarded) */
    int full;        /* written data waits in libpq for write-ready: writes refused */
    int ready_owed;  /* a write was refused: on_ready once it may write again */
    int end_asked;   /* pgs_copy_end was called */
    int end_sent;    /* ... and libpq took the end */
    int aborted;     /* the end was an abort */
    size_t unflushed; /* bytes written since libpq's buffer was last seen empty */
    char *abort_reason;
};

/* The statement cache: each distinct statement text is parsed once per connection, as a named
 * prepared statement, and then executed by name (what asyncpg and psycopg do). */
typedef struct stmt {
    struct stmt *next;
    uint64_t hash;
    size_t len;
    int nparams;
    unsigned no; /* its name's number: never reused, unlike its address */
    /* Its Parse is unanswered: an error before it in its pipeline segment makes the server
     * skip it, and the name would not exist. Until it is answered, a use in a later segment
     * goes unnamed (resolve_statement), so a neighbour's failed segment never turns into a
     * 26000 for another statement (a cache hit and a miss report the same). */
    unsigned parsing;
    unsigned seg; /* the segment its Parse went out in (pgs_conn.segs then) */
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
    struct connect_plan *plan; /* the hosts to try, while connecting (connect.c) */
    int per_host_ms;           /* libpq's connect_timeout, which applies to each host */

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
    int draining;   /* a bulk statement waits in `waiting` for what is in flight */
    int copy_blocked; /* a COPY's writes are refused until libpq's buffer is empty */
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
    int lost_hook_due; /* the conn_lost hook is to fire */
    stmt **cache;        /* CACHE_BUCKETS chains, allocated at the first statement */
    stmt *last;          /* the entry found last, and the address of the text it was found
                            for: the same text at the same address skips hashing */
    uintptr_t last_sql;
    int reads_undrained; /* socket reads since notifications were last taken */
    int cached;          /* entries */
    unsigned next_stmt;  /* names are never reused: the server may still hold old ones */
    unsigned segs;       /* syncs sent: the number of the pipeline segment now open */
    uint64_t name_tag;        /* random, in every cached statement's name (stmt_name) */
    int user_prepared;        /* SQL PREPARE ran since prepared statements were last dropped */
    int lent;                 /* kept by a keeper: handed to a user, who has not closed it */
    int spoiled;              /* a cancel request went out on a shared session: never reused */
    int shared;               /* carries pipelined transactions (conn_set_shared) */
    int xact;                 /* the transaction status the owner knows (conn_set_xact), or -1 */
    int xact_view;            /* a shared session's: the running body's or callback's, or -1 */
    int server_ended;         /* the server sent FATAL: nothing after it runs */
    int reporting_not_run;    /* inside the callback of a statement that certainly never ran */
    /* Errors live on the heap only while they exist (most connections never have one): the
     * per-connection state stays small. */
    pgs_error *dead_err;    /* why the connection is gone */
    pgs_error *segment_err; /* the error that aborted the current pipeline segment */
    pgs_error *goodbye;     /* the server's FATAL that came as a notice (an idle session) */
};

/* ---- op lists ---- */

static inline void list_push(op_list *l, op *o)
{
    o->next = NULL;
    if (l->tail)
        l->tail->next = o;
    else
        l->head = o;
    l->tail = o;
}

static inline op *list_pop(op_list *l)
{
    op *o = l->head;
    if (o) {
        l->head = o->next;
        if (!l->head)
            l->tail = NULL;
    }
    return o;
}

static inline void list_append(op_list *to, op_list *from)
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

enum { SPARE_OPS = 64 }; /* (a deep pipeline, as the pool's multiplexed mode keeps, reuses them) */

/* Statement records are recycled per connection: a statement costs no malloc in the steady
 * state (the benchmark's instruction count showed malloc/free as a third of the overhead). */
static inline op *op_new(pgs_conn *c)
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

static inline void op_release(pgs_conn *c, op *o)
{
    if (o->res) /* the checks save a call per statement: both are NULL by now as a rule */
        PQclear(o->res);
    if (o->copy)
        free(o->copy);
    if (o->flags & (OP_BULK | OP_TRACED)) {
        if (o->flags & OP_BULK) {
            free(o->bulk->abort_reason);
            free(o->bulk);
        }
        free(o->trace);
    }
    if (c->nspare < SPARE_OPS) { /* (op_new clears it) */
        o->next = c->spare;
        c->spare = o;
        c->nspare++;
        return;
    }
    free(o);
}

static inline void set_error(pgs_conn *c, pgs_error *e, pgs_code code, const char *sqlstate,
                      const char *msg)
{
    err_set(e, code, sqlstate, msg, c->password);
}

/* ---- across the layer's files ---- */

/* copy.c: COPY and streamed statements (a statement record's `bulk`) */
/* Send a bulk statement (on its own, outside pipeline mode, once nothing is in flight).
 * Returns 0 when taken (sent, or waiting), SEND_LOST, SEND_NOMEM. */
int bulk_send(pgs_conn *c, struct op *o, const char *sql, const char *const *values);
/* Must the bulk statement wait for what is in flight? */
int bulk_must_wait(pgs_conn *c);
/* A row or COPY result `res` (status st) of the bulk statement at the head of `sent`: hand
 * its data on (rows, COPY in and out), and take the result. Returns 1 when the FIFO may read
 * on (the statement's final result and its end come as for any statement), 0 when it must
 * wait for the socket (or the connection went down). */
int bulk_result(pgs_conn *c, struct op *o, PGresult *res, ExecStatusType st);
/* libpq 17's chunked rows (PGRES_TUPLES_CHUNK), or a status no result has before it. */
#ifdef LIBPQ_HAS_CHUNK_MODE
#define PGRES_TUPLES_CHUNK_ PGRES_TUPLES_CHUNK
#else
#define PGRES_TUPLES_CHUNK_ ((ExecStatusType)-1)
#endif
/* The connection failed under a bulk statement: libpq reads but does not parse what the
 * server sends during COPY FROM STDIN, its FATAL included (57P01 ...); parse it now, so the
 * loss carries the server's reason. */
void bulk_last_words(pgs_conn *c);
/* What the statement's end reports, given its final result's error (NULL: none): the error
 * to report (e, or `err`, or NULL). Its own verdicts, PGS_EINVAL (not the COPY asked for) and
 * PGS_ECANCELED (the caller's abort), leave the session usable. */
const pgs_error *bulk_outcome(pgs_conn *c, struct op *o, const PGresult *res,
                              const pgs_error *err, pgs_error *e);

/* trace.c: the hooks of the connection layer (only with c->opts.hooks set) */
long long trace_now_us(void);
void trace_start(pgs_conn *c, struct op *o, const char *sql);
void trace_end(pgs_conn *c, struct op *o, const PGresult *res, const pgs_error *err);
void trace_conn_open(pgs_conn *c, const pgs_error *err);
void trace_conn_lost(pgs_conn *c, const pgs_error *err);

/* conn.c: the guard's life, loss and exit */
pgs_conn *conn_new(struct event_base *base, const pgs_conn_opts *opts, pgs_conn_cb on_open,
                   void *arg);
void conn_notice(void *arg, const PGresult *res); /* libpq's notice receiver */
void finish_if_due(pgs_conn *c);
int is_fatal(const PGresult *res);
int is_error(const op *o);
void note_goodbye(pgs_conn *c, const PGresult *res);
void loss_error(pgs_conn *c, pgs_error *e);
void go_dead(pgs_conn *c, const pgs_error *why);
void conn_lost(pgs_conn *c, const pgs_error *why);
void lost_from_libpq(pgs_conn *c);

/* connect.c: the handshake */
void connect_step(pgs_conn *c, PostgresPollingStatusType st);
void connect_timed_out(pgs_conn *c); /* the whole connect's deadline passed */
void drop_lookups(pgs_conn *c);

/* cancel.c: the cancel request (cancel_finished is conn.c's) */
void start_cancel(pgs_conn *c);
void abandon_cancel(pgs_conn *c);
void cancel_finished(pgs_conn *c);

/* stmt_cache.c: the statement cache */
void cache_resolve(pgs_conn *c, op *o, const char *sql, int *fresh);
void cache_clear(pgs_conn *c);
void cache_drop(pgs_conn *c, stmt *gone);
void cache_forget(pgs_conn *c, op *o);
void cache_confirm(pgs_conn *c, op *o);
void explain_missing_statement(pgs_conn *c, pgs_error *e);

/* Which cache entry the statement runs by (o->stmt, executed by name), and whether it is new
 * (*fresh: its Parse must go first); cache_resolve does the work. The same text as last time,
 * at the same address, is the common case (a statement in a loop): no hashing, and no call
 * (this is the hot path of every statement). The text may have changed in place (a reused
 * buffer): strcmp tells. */
static inline void resolve_statement(pgs_conn *c, op *o, const char *sql, int *fresh)
{
    stmt *e = c->last; /* set only while the cache is on */
    if (e && (uintptr_t)sql == c->last_sql && e->nparams == o->nparams && !e->parsing &&
        strcmp(e->sql, sql) == 0) {
        *fresh = 0;
        o->stmt = e;
        o->stmt_no = e->no;
        o->flags |= OP_PREPARED;
        return;
    }
    cache_resolve(c, o, sql, fresh);
}

/* pipeline.c: sending */
int push_output(pgs_conn *c);
int flush_output(pgs_conn *c);
void flush_later(pgs_conn *c);
/* A statement's text (v[nparams]) and values in one block, for sending later; free() it. */
char **copy_statement(const char *sql, int nparams, const char *const *values);
void send_list(pgs_conn *c, op_list *list);

/* results.c: the result FIFO, and the socket's handler */
void conn_on_io(void *arg, int what);
/* Deliver what libpq has answered already, without reading the socket. Callbacks may fire. */
void read_answered(pgs_conn *c);
int deliver(pgs_conn *c, op *o);

#endif

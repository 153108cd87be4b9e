/* Internal: the connection layer's API for the layers above (transactions, pool). Everything
 * here works on a pgs_conn and knows nothing of transactions or pools. */
#ifndef PGS_CONN_H
#define PGS_CONN_H

#include "pgscope.h"

/* conn_query flags */
enum {
    /* Do not end the statement with a pipeline sync: it joins the next statements in one
     * implicit transaction, and an error aborts them until the next sync (they get the
     * error that aborted them, PGS_ESQL with its SQLSTATE). */
    CONN_NO_SYNC = 1,
    /* Have the server send the statement's result without waiting for the next sync (needed
     * with CONN_NO_SYNC when the caller waits for it): a flush request goes out at the end of
     * the loop turn, after everything queued in it, unless a sync follows the statement. */
    CONN_FLUSH = 2,
    /* Send now even while the connection is plugged (see conn_plug). */
    CONN_BYPASS = 4,
    /* A session reset (the pool's): it leaves the session idle, so a guard with only resets
     * in flight counts as clean and idle (conn_clean), and the next user's statements simply
     * follow it in the pipeline. */
    CONN_RESET = 8,
    /* A flush request right after the statement, so its result leaves the server before the
     * statements queued after it run (the id before a COMMIT). */
    CONN_FLUSH_NOW = 16,
    /* With CONN_NO_SYNC: the statement's segment is shared with what is queued next in the
     * same loop turn, or in the events already pending when the turn would end (the output
     * waits for them once): all of it goes out in one write, ended by their sync. If nothing
     * follows by then, a sync of its own ends the segment. The pool's reset uses it, so a
     * waiting user's first statements travel with it. */
    CONN_SYNC_TURN = 32,
    /* Not through the statement cache: parsed with it, unnamed, every time, so it never
     * depends on a Parse that an error earlier in the pipeline made the server skip. */
    CONN_UNCACHED = 64,
};

/* pgs_query with flags (and without pgs_query's check of the owner). */
int conn_query(pgs_conn *c, const char *sql, int nparams, const char *const *values, int flags,
               pgs_result_cb cb, void *arg);
/* pgs_query with flags: refused as pgs_query is while a transaction guard or a keeper owns
 * the session. */
int conn_user_query(pgs_conn *c, const char *sql, int nparams, const char *const *values,
                    int flags, pgs_result_cb cb, void *arg);
/* Queue a lone pipeline sync: it ends the implicit transaction segment and, after an error,
 * the server's skipping of everything sent before it. Outside pipeline mode (every statement
 * sent so far had its own sync) there is nothing to end, and it is dropped. */
int conn_sync(pgs_conn *c, int flags);

/* A COPY or streamed statement (copy.c): what conn_bulk runs, and where its data goes. */
enum { CONN_COPY_IN = 1, CONN_COPY_OUT, CONN_STREAM };
typedef struct conn_bulk_spec {
    int kind; /* CONN_COPY_IN, CONN_COPY_OUT, CONN_STREAM */
    pgs_copy_ready_cb on_ready;
    pgs_copy_data_cb on_data;
    pgs_rows_cb on_rows;
    void *arg;
    int batch_rows;
} conn_bulk_spec;
/* conn_query for a bulk statement: it runs on its own once what is in flight is answered
 * (flags are ignored: it ends with its own sync). *out (may be NULL) gets the COPY handle. */
int conn_bulk(pgs_conn *c, const char *sql, int nparams, const char *const *values,
              const conn_bulk_spec *spec, pgs_result_cb cb, void *arg, pgs_copy **out);

/* Plug: statements queued after this point without CONN_BYPASS wait, in order, until the plug
 * is pulled, so a layer above can slip statements (CONN_BYPASS) in ahead of them. Plugs nest
 * by position: unplugging sends what waits up to the next plug still in place. Returns the
 * plug's id (0: nothing held, e.g. the connection is gone). */
int conn_plug(pgs_conn *c);
void conn_unplug(pgs_conn *c, int plug);

/* The layer above that owns the session; while set, pgs_query refuses with PGS_EMISUSE.
 * freed(owner) runs if the connection guard is freed (closed by its user) while still owned,
 * so the owner drops its pointer. */
void *conn_owner(pgs_conn *c);
void conn_set_owner(pgs_conn *c, void *owner, void (*freed)(void *owner));

/* Anything queued or awaiting results? */
int conn_in_flight(pgs_conn *c);
/* The loop the connection runs on. */
struct event_base *conn_base(pgs_conn *c);
/* Connected and usable? */
int conn_ready(pgs_conn *c);

/* A keeper (the pool) takes a guard back when its user closes it cleanly: connected, nothing
 * in flight, no transaction open, no owner, no cancel. Then pgs_conn_close fires the user's
 * done (from the loop) and hands the guard to returned() instead of closing it. A guard closed
 * any other way is really closed; freed() tells the keeper when it is gone. */
typedef struct conn_keeper {
    void (*returned)(void *arg, pgs_conn *c);
    void (*freed)(void *arg, pgs_conn *c);
} conn_keeper;
void conn_set_keeper(pgs_conn *c, const conn_keeper *keeper, void *arg);
/* Is an idle connection still alive? A non-blocking peek at its socket: EOF or unsolicited
 * data means the server is closing it; the guard then goes dead (on_lost, from the loop).
 * With statements in flight it cannot tell (their replies are data): see conn_refresh.
 * Returns 1 when it looks alive. No callback fires inside it. */
int conn_probe(pgs_conn *c);
/* Read and handle, without waiting, whatever the server has sent (results, a FATAL, EOF), as
 * the socket handler would: callbacks may fire inside it, so call it from the loop only.
 * Returns 1 when the connection is still up. */
int conn_refresh(pgs_conn *c);
/* The keeper hands the guard to a user: until the user closes it, the user's calls
 * (pgs_query, pgs_conn_close, pgs_conn_cancel, a transaction guard) are accepted; before and
 * after, they are refused with PGS_EMISUSE. */
void conn_lend(pgs_conn *c);
/* Reusable as it is, or free for a transaction guard: connected, no owner, no cancel, nothing
 * in flight but resets, and idle (no transaction) or about to be (after a reset)? */
int conn_clean(pgs_conn *c);
/* May a transaction be queued now behind what is in flight, on a session shared by pipelined
 * transactions (the pool's multiplexed mode)? Connected, owned by `owner` (NULL: nobody; or
 * the transaction whose end the next one carries), nothing held back by a plug, no cancel
 * request, not spoiled. */
int conn_between(pgs_conn *c, const void *owner);
/* A cancel request went out on a session that others share: it may still land on whatever
 * runs next, so the session is never reused (conn_clean and conn_between say no). */
void conn_spoil(pgs_conn *c);

/* The session carries pipelined transactions, whose batches end with a COMMIT in a segment of
 * its own (it ends a transaction an error earlier in the batch left aborted): its warning when
 * there was none (SQLSTATE 25P01, its BEGIN skipped after a failed COMMIT) is not the user's
 * notice. */
void conn_set_shared(pgs_conn *c);
/* Does the next statement start a new pipeline segment (nothing sent since the last sync)? */
int conn_segment_fresh(pgs_conn *c);
/* A statement's text (v[nparams]) and values in one block, to send later; free() it. */
char **conn_copy_statement(const char *sql, int nparams, const char *const *values);

/* Has SQL PREPARE run on this session (a statement tagged PREPARE came back) since every
 * prepared statement was last dropped (a DISCARD ALL or DEALLOCATE ALL that succeeded)? */
int conn_user_prepared(pgs_conn *c);

/* Inside a statement's callback: 1 when the statement certainly never ran on the server (never
 * handed to libpq, skipped after an earlier error of its pipeline segment, or after the
 * server's FATAL), whatever error it reports; 0 when it ran or may have. */
int conn_not_run(pgs_conn *c);

/* The connection's tracing hooks, or NULL. */
const pgs_hooks *conn_hooks(pgs_conn *c);

/* Why the connection is gone (NULL while it is up or connecting). */
const pgs_error *conn_error(pgs_conn *c);

/* The owner (a transaction guard) states the session's transaction status, which libpq only
 * learns at a pipeline sync; pgs_conn_txstatus answers it. -1: libpq's own again. */
void conn_set_xact(pgs_conn *c, int status);

/* On a shared session several transactions are in flight, and the one whose body or callback
 * runs is not the owner: around that code its own status is what pgs_conn_txstatus says (set
 * before, -1 after; callbacks never nest, so one value is enough). */
void conn_set_xact_view(pgs_conn *c, int status);

/* Send a cancel request for what the backend runs, without closing: its answer (57014, and
 * skipped statements after it) arrives as usual. Callbacks still wait for it as for a close. */
void conn_cancel_request(pgs_conn *c);

/* End the connection now: optionally send a cancel request for what runs, close, and fail
 * every pending callback with `code` (from the loop). PGS_EMISUSE when already gone. */
int conn_kill(pgs_conn *c, pgs_code code, const char *msg, int send_cancel);
/* The same with the error itself (its SQLSTATE kept), e.g. the server's reason. */
int conn_fail(pgs_conn *c, const pgs_error *why, int send_cancel);

#endif

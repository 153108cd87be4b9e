/* pgscope: scoped, non-blocking PostgreSQL connection guards on a libevent loop.
 *
 * The one public header. A guard is the C form of an async context manager: entering it is
 * asynchronous (a callback says how it went) and leaving it happens exactly once on every path.
 *
 * Rules that hold for every function below (stated once here, as libuv does):
 *  - Handles are opaque; the library allocates and frees them. A handle is valid from the call
 *    that returns it until its exit callback (the `done` of pgs_conn_close) returns.
 *  - Callbacks run from the event loop, never from inside the call that scheduled them.
 *  - A function that takes a callback and returns a non-zero pgs_code failed at once: that
 *    callback never fires. If it returns PGS_OK, the callback fires exactly once. No third case.
 *  - Results are libpq's own PGresult, borrowed: valid during the callback only; the library
 *    clears them after the callback returns. Do not PQclear them.
 *  - Error messages never contain a password.
 *  - Everything runs on the thread that runs the event_base; the library is not thread-safe.
 */
#ifndef PGSCOPE_H
#define PGSCOPE_H

#include <stddef.h>

#include <event2/event.h>
#include <libpq-fe.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define PGS_API __attribute__((visibility("default")))
#else
#define PGS_API
#endif

/* ---------------------------------------------------------------------------------------- */
/* Errors                                                                                    */
/* ---------------------------------------------------------------------------------------- */

/* One vocabulary for every failure. Functions that can fail at once return one of these;
 * failures found later arrive in a callback as a pgs_error. */
typedef enum pgs_code {
    PGS_OK = 0,
    PGS_EINVAL,          /* bad argument or bad conninfo syntax */
    PGS_EMISUSE,         /* call not allowed in the handle's state (e.g. closed twice) */
    PGS_ECONNECT,        /* could not connect: refused, unreachable, server not accepting */
    PGS_EAUTH,           /* the server rejected the credentials (SQLSTATE class 28) */
    PGS_ENODB,           /* the database named in the conninfo does not exist (3D000) */
    PGS_ECONN,           /* the connection was lost after it was established */
    PGS_ESQL,            /* the server reported an error for the statement (see sqlstate) */
    PGS_ETIMEDOUT,       /* a deadline passed (connect timeout, ...) */
    PGS_ECANCELED,       /* the work was cancelled by pgs_conn_cancel */
    PGS_ECOMMIT_UNKNOWN, /* the connection was lost while COMMIT was in flight */
    PGS_ECLOSED,         /* the guard was closed before the work could finish */
    PGS_ENOMEM,          /* out of memory */
    PGS_EUNSUPPORTED,    /* the statement needs a protocol feature pgscope does not offer (COPY) */
} pgs_code;

/* A failure: its code, the server's SQLSTATE when it sent one ("" otherwise), and a message in
 * plain words with any password redacted. Passed to callbacks as a borrowed pointer, valid
 * during the callback only. Long server messages are cut to fit. */
typedef struct pgs_error {
    pgs_code code;
    char sqlstate[6];
    char message[512];
} pgs_error;

/* The name of a code ("PGS_ETIMEDOUT: timed out"), a static string; never NULL. */
PGS_API const char *pgs_strerror(int code);

/* ---------------------------------------------------------------------------------------- */
/* Connection guard                                                                          */
/* ---------------------------------------------------------------------------------------- */

typedef struct pgs_conn pgs_conn;

/* on_open: err is NULL when the connection is up; otherwise it says why it is not (PGS_EINVAL,
 * PGS_ECONNECT, PGS_EAUTH, PGS_ENODB, PGS_ETIMEDOUT, PGS_ECLOSED, PGS_ECANCELED, PGS_ENOMEM). */
typedef void (*pgs_conn_cb)(pgs_conn *conn, const pgs_error *err, void *arg);

/* A statement's outcome. On success err is NULL and res is the statement's result
 * (PGRES_TUPLES_OK or PGRES_COMMAND_OK). On a server error err->code is PGS_ESQL with the
 * SQLSTATE, and res is the server's error result (for PQresultErrorField). For every other
 * failure (PGS_ECONN, PGS_ECANCELED, PGS_ECLOSED, PGS_EUNSUPPORTED) res is NULL. */
typedef void (*pgs_result_cb)(pgs_conn *conn, const PGresult *res, const pgs_error *err,
                              void *arg);

/* The exit callback of a handle: the last callback it ever fires. */
typedef void (*pgs_done_cb)(void *arg);

/* A notice or warning the server sent (RAISE NOTICE, ...). res is borrowed: use
 * PQresultErrorMessage / PQresultErrorField on it. */
typedef void (*pgs_notice_cb)(pgs_conn *conn, const PGresult *res, void *arg);

/* A NOTIFY delivered to a LISTENing connection. n is borrowed (freed after the callback). */
typedef void (*pgs_notify_cb)(pgs_conn *conn, const PGnotify *n, void *arg);

/* The connection was lost while the guard was open and no statement was there to report it
 * (or in addition to the statements that got PGS_ECONN). The handle stays valid: call
 * pgs_conn_close to release it. Fires at most once. */
typedef void (*pgs_lost_cb)(pgs_conn *conn, const pgs_error *err, void *arg);

/* Options for pgs_conn_open. Zero-initialise ({0}); every zero field means its default. */
typedef struct pgs_conn_opts {
    /* Whole connect deadline across all hosts, in ms. 0: the conninfo's connect_timeout if
     * set (libpq's own poll loop ignores it, so the library enforces it with a timer),
     * otherwise 30 s. Negative: no deadline. */
    int connect_timeout_ms;
    /* How long a cancel request may take before the library stops waiting for it and closes
     * the connection anyway (the request itself may still arrive). 0: 5 s. */
    int cancel_timeout_ms;
    pgs_notice_cb on_notice; /* NULL: notices are dropped (libpq would print them to stderr) */
    void *notice_arg;
    pgs_notify_cb on_notify; /* NULL: notifications are dropped */
    void *notify_arg;
    pgs_lost_cb on_lost; /* NULL: connection loss shows only through pending callbacks */
    void *lost_arg;
} pgs_conn_opts;

/* Enter a connection guard: start a non-blocking connection described by `conninfo` (libpq's
 * keyword/value string or a postgresql:// URI; libpq's PG* environment variables fill in what
 * it leaves out) on `base`, and fire on_open exactly once from the loop.
 *
 * The guard is exited with pgs_conn_close, exactly once, on every path: also after on_open
 * reported an error, after pgs_conn_cancel, and after the connection was lost. Until then the
 * handle stays valid (a dead connection answers every new statement with an error code).
 *
 * opts may be NULL (all defaults); it is copied. `conninfo` is copied.
 * Returns PGS_OK and sets *out, or PGS_EINVAL (NULL base, conninfo, on_open or out) or
 * PGS_ENOMEM; then on_open never fires and *out is NULL. A conninfo that does not parse is
 * reported through on_open as PGS_EINVAL, with libpq's reason. */
PGS_API int pgs_conn_open(struct event_base *base, const char *conninfo,
                          const pgs_conn_opts *opts, pgs_conn_cb on_open, void *arg,
                          pgs_conn **out);

/* Queue a statement with text-format parameters ($1 .. $n). Values travel as parameters,
 * never spliced into the SQL, so any string is safe; a NULL entry in `values` is SQL NULL.
 * `sql` must be a single statement. `sql` and `values` are copied into libpq before return.
 *
 * Statements run in the order they were queued; the library pipelines them, and each one is
 * its own implicit transaction (an error in one does not affect the next). Statements queued
 * while the guard is still connecting are sent once it is up. `cb` fires exactly once with the
 * result or the error (see pgs_result_cb); a statement that needs COPY fails with
 * PGS_EUNSUPPORTED.
 *
 * Returns PGS_OK, or at once: PGS_EINVAL (NULL conn/sql/cb, nparams < 0 or values NULL with
 * nparams > 0), PGS_EMISUSE (the guard is closing), PGS_ECONN / PGS_ECANCELED / the connect
 * error (the connection is already gone), PGS_ENOMEM. */
PGS_API int pgs_query(pgs_conn *conn, const char *sql, int nparams, const char *const *values,
                      pgs_result_cb cb, void *arg);

/* Exit the guard. Every pending callback (on_open while connecting, every queued or running
 * statement) fires with PGS_ECLOSED first, then `done` fires, then the handle is freed.
 * A statement still running on the server gets a cancel request, so the server does not go on
 * working for nobody; `done` waits for that request at most cancel_timeout_ms.
 * May be called from any callback of this connection, including on_open.
 * Returns PGS_OK (done will fire exactly once), PGS_EINVAL (NULL conn), or PGS_EMISUSE when the
 * guard is already closing (idempotent: the first close wins, this `done` never fires). */
PGS_API int pgs_conn_close(pgs_conn *conn, pgs_done_cb done, void *arg);

/* Cancel: send a cancel request for the running statement without blocking the loop, then
 * close the connection (after a cancel its state is unknown, so it is never reused). Every
 * pending callback fires with PGS_ECANCELED (on_open too, while connecting). The handle stays
 * valid until pgs_conn_close.
 * Returns PGS_OK, PGS_EINVAL (NULL conn), or PGS_EMISUSE when the connection is already gone,
 * being cancelled, or the guard is closing. */
PGS_API int pgs_conn_cancel(pgs_conn *conn);

/* The libpq connection, for read-only inspection (PQbackendPID, PQparameterStatus,
 * PQtransactionStatus, ...) while the guard is connected; NULL otherwise. Never send on it,
 * change its blocking mode or PQfinish it: the guard owns it. */
PGS_API PGconn *pgs_conn_pgconn(pgs_conn *conn);

#ifdef __cplusplus
}
#endif
#endif /* PGSCOPE_H */

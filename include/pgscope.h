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

/* The version of this header. pgs_version() says which library a program runs with: a
 * program can refuse a library whose major (or, before 1.0, minor) version differs from the
 * header it was built with, as the ABI may differ. */
#define PGSCOPE_VERSION_MAJOR 0
#define PGSCOPE_VERSION_MINOR 5
#define PGSCOPE_VERSION_PATCH 0
#define PGSCOPE_VERSION "0.5.0"
/* MAJOR * 10000 + MINOR * 100 + PATCH, for #if comparisons. */
#define PGSCOPE_VERSION_NUMBER                                                                  \
    (PGSCOPE_VERSION_MAJOR * 10000 + PGSCOPE_VERSION_MINOR * 100 + PGSCOPE_VERSION_PATCH)

/* The library's version as PGSCOPE_VERSION_NUMBER computes it (its header's, when it was
 * built); `text`, when not NULL, gets the version string ("0.5.0", static). */
PGS_API int pgs_version(const char **text);

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
    PGS_EUNSUPPORTED,    /* the statement needs another call (COPY: pgs_copy_in, pgs_copy_out) */
    PGS_EBUSY,           /* the pool's bound on waiting requests is reached: try later */
    PGS_EAGAIN,          /* not now: a COPY cannot take data yet (wait for its on_ready) */
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
 * SQLSTATE, and res is the server's error result (for PQresultErrorField). Inside a
 * transaction guard, a server error caused by its timeout or cancel is reported as
 * PGS_ETIMEDOUT / PGS_ECANCELED, still with the server's result. For every other failure
 * (PGS_ECONN, PGS_ECANCELED, PGS_ECLOSED, PGS_EUNSUPPORTED) res is NULL. A lost connection
 * (PGS_ECONN) carries the server's own reason and SQLSTATE when it sent one before closing
 * (57P01 terminated by an administrator, 25P03 idle in transaction too long, 57P02 another
 * backend crashed, ...); otherwise 08006 and libpq's words. The callback fires once the
 * statement is complete: use pgs_conn_txstatus for the session's transaction status then
 * (PQtransactionStatus lags inside a transaction guard, whose statements are pipelined
 * without syncs: libpq learns the status only when a sync is answered). */
typedef void (*pgs_result_cb)(pgs_conn *conn, const PGresult *res, const pgs_error *err,
                              void *arg);

/* The exit callback of a handle: the last callback it ever fires. */
typedef void (*pgs_done_cb)(void *arg);

/* A notice or warning the server sent (RAISE NOTICE, ...). res is borrowed: use
 * PQresultErrorMessage / PQresultErrorField on it. */
typedef void (*pgs_notice_cb)(pgs_conn *conn, const PGresult *res, void *arg);
/* (It may close or cancel the guard; the libpq connection is then closed once libpq returns.) */

/* A NOTIFY delivered to a LISTENing connection. n is borrowed (freed after the callback). */
typedef void (*pgs_notify_cb)(pgs_conn *conn, const PGnotify *n, void *arg);

/* The connection was lost while the guard was open and no statement was there to report it
 * (or in addition to the statements that got PGS_ECONN). The handle stays valid: call
 * pgs_conn_close to release it. Fires at most once. */
typedef void (*pgs_lost_cb)(pgs_conn *conn, const pgs_error *err, void *arg);

/* ---------------------------------------------------------------------------------------- */
/* Tracing hooks                                                                             */
/* ---------------------------------------------------------------------------------------- */

/* What OpenTelemetry instrumentation, a logger or metrics plug into (pgx's QueryTracer,
 * asyncpg's query logger): one struct of optional callbacks, given per connection
 * (pgs_conn_opts.hooks) or per pool (pgs_pool_opts.hooks: its connections get it too). Rules:
 *  - Every member may be NULL; the struct and `arg` are borrowed and must outlive every
 *    connection and pool that uses them. With no hooks set the library pays nothing but a
 *    pointer test (the benchmark's instruction count says so).
 *  - Hooks observe; they are not results. They may call the read-only functions
 *    (pgs_pool_stats, pgs_conn_txstatus, pgs_conn_pgconn, pgs_router_lag_ms, pgs_strerror) and
 *    nothing else of the library. stmt_start and tx_begin fire inside the call that queues
 *    the work (pgs_query, pgs_tx_query, pgs_tx_begin, ...), before it returns; the others
 *    fire from the loop, just before the callback of what they describe (stmt_end before the
 *    statement's callback, tx_end before the transaction's done, acquire before the acquire's
 *    callback). Internal statements are traced too (BEGIN, COMMIT, the pool's reset).
 *  - Statement text only, never parameter values. Durations are in microseconds, from the
 *    call that queued the work to its end. tx_end fires for every transaction guard (each
 *    attempt of pgs_run_tx: its attempts field counts the body's runs so far); its conn is
 *    NULL when the connection guard was closed under the transaction. */
typedef struct pgs_tx pgs_tx;
typedef struct pgs_pool pgs_pool;
typedef struct pgs_tx_result pgs_tx_result;

typedef struct pgs_stmt_trace {
    const char *sql;        /* the statement's text (borrowed, valid during the hook) */
    long long duration_us;  /* from queueing to its end */
    long long rows;         /* rows returned or affected (PQcmdTuples), -1 when none or failed */
    const pgs_error *err;   /* NULL on success; else the code and SQLSTATE its callback gets */
} pgs_stmt_trace;

typedef struct pgs_acquire_trace {
    long long wait_us; /* from pgs_pool_acquire to its outcome */
    pgs_code code;     /* PGS_OK (granted), PGS_ETIMEDOUT, PGS_ECONNECT, PGS_ECANCELED, PGS_ECLOSED */
} pgs_acquire_trace;

typedef struct pgs_hooks {
    void (*stmt_start)(pgs_conn *conn, const char *sql, void *arg);
    void (*stmt_end)(pgs_conn *conn, const pgs_stmt_trace *t, void *arg);
    /* A transaction guard begun (root or savepoint: tx's parent says which) and ended. */
    void (*tx_begin)(pgs_conn *conn, pgs_tx *tx, void *arg);
    void (*tx_end)(pgs_conn *conn, const pgs_tx_result *r, long long duration_us, void *arg);
    void (*acquire)(pgs_pool *pool, const pgs_acquire_trace *t, void *arg);
    /* A connection up (err NULL) or failed to open; lost after it was up. */
    void (*conn_open)(pgs_conn *conn, const pgs_error *err, void *arg);
    void (*conn_lost)(pgs_conn *conn, const pgs_error *err, void *arg);
    /* The pool closed a connection that could not be reused (why: its error, or NULL when it
     * was retired: idle timeout, lifetime, dirty session) and will open another if needed. */
    void (*conn_replaced)(pgs_pool *pool, pgs_conn *conn, const pgs_error *why, void *arg);
    void *arg;
} pgs_hooks;

/* Options for pgs_conn_open. Zero-initialise ({0}); every zero field means its default. */
typedef struct pgs_conn_opts {
    /* Whole connect deadline across all hosts, in ms. 0: the conninfo's connect_timeout (or
     * else PGCONNECT_TIMEOUT) times the number of hosts listed if set, otherwise 30 s.
     * Negative: no deadline. With several hosts (or a name with several addresses), each gets
     * connect_timeout, as libpq documents it (per host), or else an even share of this
     * deadline; a host that has not answered by then (one that accepts TCP and never speaks,
     * say) is given up and the next one tried. libpq's own poll loop enforces neither, so the
     * library does, with timers. Connect errors name each host tried and why it failed; once
     * connected, PQhost / PQhostaddr / PQport on pgs_conn_pgconn say which one it reached. */
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
    /* The statement cache: each distinct statement text is parsed once per connection as a
     * prepared statement, then executed by name (no extra round trip: the Parse is pipelined
     * in front of the first use). Its names (pgs_s_<random>_<n>) are unique to the
     * connection, so a statement another client prepared can never be run by mistake. A
     * statement reports the same whether it was cached or not (an error in its Parse is its
     * own error, a statement timeout PGS_ETIMEDOUT, a FATAL PGS_ECONN). DEALLOCATE and
     * DISCARD ALL (and so the pool's PGS_RESET_ALL) empty it; a statement whose table changed
     * under it (SQLSTATE 0A000) or whose prepared statement is missing on the server (26000)
     * fails once and is parsed anew next time; the 26000 message says the likely cause, a
     * pooler in transaction mode (PgBouncer before 1.21) that runs it on another server
     * session. How many distinct statements it keeps: the first N, no eviction (0: 256; < 0:
     * off, as it must be behind such a pooler). */
    int statement_cache;
    const pgs_hooks *hooks; /* tracing (see above); NULL: none */
} pgs_conn_opts;

/* Enter a connection guard: start a non-blocking connection described by `conninfo` (libpq's
 * keyword/value string or a postgresql:// URI; libpq's PG* environment variables fill in what
 * it leaves out) on `base`, and fire on_open exactly once from the loop.
 *
 * The guard is exited with pgs_conn_close, exactly once, on every path: also after on_open
 * reported an error, after pgs_conn_cancel, and after the connection was lost. Until then the
 * handle stays valid (a dead connection answers every new statement with an error code).
 *
 * GSSAPI: libpq's default (gssencmode=prefer) looks for Kerberos credentials on the first
 * connect of a process, inside the connect step, which blocks the loop for tens of ms; so
 * unless the conninfo or PGGSSENCMODE sets gssencmode, or a service is named (service= or
 * PGSERVICE: its file may set it), the guard connects with gssencmode=disable. Users of
 * Kerberos set gssencmode=prefer or require.
 *
 * opts may be NULL (all defaults); it is copied. `conninfo` is copied.
 * Returns PGS_OK and sets *out, or PGS_EINVAL (NULL base, conninfo, on_open or out) or
 * PGS_ENOMEM; then on_open never fires and *out is NULL. A conninfo that does not parse is
 * reported through on_open as PGS_EINVAL, with libpq's reason in English; the piece of the
 * string it quotes shows as "***" (it may be the password) unless it is an option's name. */
PGS_API int pgs_conn_open(struct event_base *base, const char *conninfo,
                          const pgs_conn_opts *opts, pgs_conn_cb on_open, void *arg,
                          pgs_conn **out);

/* Queue a statement with text-format parameters ($1 .. $n). Values travel as parameters,
 * never spliced into the SQL, so any string is safe; a NULL entry in `values` is SQL NULL.
 * `sql` must be a single statement. `sql` and `values` are copied before return (into libpq,
 * or the guard's own copy while the statement waits), so the caller may reuse them at once.
 *
 * Statements run in the order they were queued, and each one is its own implicit transaction
 * (an error in one does not affect the next). Statements queued in one loop turn are
 * pipelined (sent without waiting for each other's replies, libpq pipeline mode); a statement
 * queued alone on an idle guard goes out at the end of the loop turn on its own, outside
 * pipeline mode (cheaper per statement), and statements queued while it runs follow,
 * pipelined, once it is answered. Statements queued while the guard
 * is still connecting are sent once it is up. `cb` fires exactly once with the
 * result or the error (see pgs_result_cb); a statement that needs COPY fails with
 * PGS_EUNSUPPORTED and closes the connection (use pgs_copy_in / pgs_copy_out).
 *
 * Returns PGS_OK, or at once: PGS_EINVAL (NULL conn/sql/cb, nparams < 0 or values NULL with
 * nparams > 0), PGS_EMISUSE (the guard is closing), PGS_ECONN / PGS_ECANCELED / the connect
 * error (the connection is already gone), PGS_ENOMEM. */
PGS_API int pgs_query(pgs_conn *conn, const char *sql, int nparams, const char *const *values,
                      pgs_result_cb cb, void *arg);

/* Per-statement limits for pgs_query_ex. Zero-initialise; zero means none. */
typedef struct pgs_query_opts {
    /* Client-side deadline in ms, from the call to the result: when it passes first, a cancel
     * request goes to the server and the connection is closed (after a cancel its state is
     * unknown, and a late cancel must never hit the next statement), the statement's callback
     * gets PGS_ETIMEDOUT, and so does every other statement still pending on the guard (the
     * message says it was another's deadline). The guard stays to be closed; a pool replaces
     * it. Also while the statement waits in its Parse (a new statement, a locked table). */
    int timeout_ms;
    /* Server-side limit in ms: statement_timeout for this statement only, set with
     * set_config(..., is_local) in the same pipeline segment and undone at its sync, so the
     * session's own setting is untouched. Over it the statement fails with PGS_ETIMEDOUT
     * (SQLSTATE 57014) and the connection stays usable. */
    int server_timeout_ms;
} pgs_query_opts;

/* pgs_query with limits (opts may be NULL: then exactly pgs_query). The same contract, and
 * PGS_EINVAL for a negative limit. */
PGS_API int pgs_query_ex(pgs_conn *conn, const char *sql, int nparams, const char *const *values,
                         const pgs_query_opts *opts, pgs_result_cb cb, void *arg);

/* Exit the guard. Every pending callback (on_open while connecting, every queued or running
 * statement) fires with PGS_ECLOSED first, then `done` fires, then the handle is freed.
 * A statement still running on the server gets a cancel request, so the server does not go on
 * working for nobody; the connection closes only once that request was delivered (or failed,
 * or cancel_timeout_ms passed), so that a pooler in between (PgBouncer) still forwards it,
 * and `done` waits for it too.
 * May be called from any callback of this connection, including on_open.
 * Returns PGS_OK (done will fire exactly once), PGS_EINVAL (NULL conn), or PGS_EMISUSE when the
 * guard is already closing (idempotent: the first close wins, this `done` never fires). */
PGS_API int pgs_conn_close(pgs_conn *conn, pgs_done_cb done, void *arg);

/* Cancel: send a cancel request for the running statement without blocking the loop, then
 * close the connection once the request was delivered (or failed, bounded by
 * cancel_timeout_ms): after a cancel its state is unknown, so it is never reused. Every
 * pending callback fires with PGS_ECANCELED (on_open too, while connecting). The handle stays
 * valid until pgs_conn_close.
 * Returns PGS_OK, PGS_EINVAL (NULL conn), or PGS_EMISUSE when the connection is already gone,
 * being cancelled, or the guard is closing. */
PGS_API int pgs_conn_cancel(pgs_conn *conn);

/* The session's transaction status as of the statements answered so far, right in every
 * callback: PQTRANS_IDLE, PQTRANS_INTRANS (a transaction guard is open, or a raw BEGIN ran),
 * PQTRANS_INERROR (a statement of the open transaction failed, and no savepoint's rollback has
 * undone that yet), PQTRANS_ACTIVE (outside a transaction guard only: statements queued after
 * the one just answered are still in flight, as libpq says), PQTRANS_UNKNOWN (not connected, or
 * NULL). Inside a transaction guard it is the guard's own account of the transaction, from
 * BEGIN's queueing to the end's reply; outside it is libpq's PQtransactionStatus, which is
 * exact there (every statement ends with its own sync). */
PGS_API PGTransactionStatusType pgs_conn_txstatus(pgs_conn *conn);

/* The libpq connection, for read-only inspection (PQbackendPID, PQparameterStatus,
 * PQtransactionStatus, ...) while the guard is connected; NULL otherwise. Never send on it,
 * change its blocking mode or PQfinish it: the guard owns it. */
PGS_API PGconn *pgs_conn_pgconn(pgs_conn *conn);


/* ---------------------------------------------------------------------------------------- */
/* Transaction guard                                                                         */
/* ---------------------------------------------------------------------------------------- */

/* The C form of `async with conn.transaction():`. Begin sends BEGIN (queued at once, so the
 * transaction counts as open from that moment), statements run inside it, and the end commits
 * when asked to and nothing failed, and rolls back otherwise. Rules:
 *  - BEGIN goes out in the same write as the first statements (pipeline mode), and a body that
 *    queues its statements and ends at once costs one round trip: BEGIN + statements +
 *    COMMIT + sync.
 *  - Once a statement fails the transaction cannot commit: the end rolls back and reports
 *    the first error with its SQLSTATE, whatever `ok` said. Statements queued after a failure
 *    get the error that aborted them.
 *  - Statements queued in one loop turn leave in one write, and their results come back once
 *    the server has run all of them (one flush request after the last, or COMMIT's sync), so
 *    a result callback cannot be what a later statement of the same turn waits for.
 *  - A transaction guard owns its connection while open: pgs_query on that connection returns
 *    PGS_EMISUSE; use pgs_tx_query.
 *  - Nesting: pgs_tx_savepoint opens a child as a SAVEPOINT. Children end in LIFO order. A
 *    child's end waits for its own statements' results (a savepoint cannot contain an error it
 *    has not seen), then releases the savepoint or rolls back to it; statements the parent
 *    queues meanwhile run after that. Ending a parent with a child still open rolls both back
 *    (never a COMMIT for a scope closed out of order) and the parent's end reports PGS_EMISUSE;
 *    the child handle is freed with its parent and must not be used after the parent's done.
 *  - Cancel (pgs_tx_cancel) and the whole-transaction timeout send a cancel request and close
 *    the connection: its state is unknown afterwards. Every pending statement callback of the
 *    transaction and its children gets PGS_ECANCELED (PGS_ETIMEDOUT for the timeout). The
 *    guard must still be ended; its end reports the same code, the transaction rolled back
 *    (the server rolls back when a connection closes). The connection guard stays to be closed.
 *  - The outcome is exact. COMMITTED only when the server answered COMMIT. UNKNOWN
 *    (PGS_ECOMMIT_UNKNOWN) only when COMMIT may have reached the server and nothing received
 *    proves it was skipped: never for a COMMIT not yet written (held behind a savepoint's
 *    end), nor for one behind an error or the server's FATAL earlier in its own pipeline
 *    segment (the server skips everything after an error until the sync, the pool's reset
 *    included when it shares the segment); those are ROLLED_BACK with the first error (the
 *    cancel's code after pgs_tx_cancel or the timeout). A code never depends on whether a
 *    statement was in the statement cache or which statement noticed a loss.
 *  - Once COMMIT is sent, a cancel or timeout waits up to commit_grace_ms for its reply;
 *    without one, the connection is closed and the end reports PGS_ECOMMIT_UNKNOWN. The
 *    cancel request goes out only while statements ahead of COMMIT are unanswered (to stop a
 *    long one); since a transaction's statements leave in one write, it may reach COMMIT's
 *    pre-commit work (deferred triggers) instead, which then fails. Either way the outcome
 *    reported is what COMMIT's own reply says. Once everything before COMMIT is answered, no
 *    cancel request is sent. A connection lost while COMMIT is in flight is reported the same way,
 *    never as success or rollback, and is never retried. With pgs_tx_opts.resolvable the
 *    transaction id, read just before COMMIT in the same round trip, comes with it, for
 *    pgs_tx_resolve.
 *  - COMMIT answered with the tag ROLLBACK is an error, never success.
 */
typedef struct pgs_tx pgs_tx;

typedef enum pgs_isolation {
    PGS_ISO_DEFAULT = 0, /* the server's default_transaction_isolation */
    PGS_ISO_READ_COMMITTED,
    PGS_ISO_REPEATABLE_READ,
    PGS_ISO_SERIALIZABLE,
} pgs_isolation;

/* Options for a transaction. Zero-initialise; zero means the default. Children (savepoints)
 * take only their statements from their parent; their own options are ignored. */
typedef struct pgs_tx_opts {
    pgs_isolation isolation;
    int read_only;  /* BEGIN ... READ ONLY: writes fail with SQLSTATE 25006 */
    int deferrable; /* with serializable + read only: wait for a safe snapshot */
    /* Server-side limit for each statement, in ms (SET LOCAL statement_timeout, sent with
     * BEGIN). A statement over it fails with PGS_ETIMEDOUT (SQLSTATE 57014) and the
     * transaction rolls back; the connection stays usable. 0: the server's setting. */
    int statement_timeout_ms; /* (also while it waits in its Parse, cached or not) */
    /* Client-side limit for the whole transaction, from begin to the end's reply, in ms. When
     * it passes, the transaction is cancelled like pgs_tx_cancel, with PGS_ETIMEDOUT. 0: none. */
    int timeout_ms;
    /* Send BEGIN on its own round trip: statements wait for its reply instead of going out in
     * the same write. Slower; for comparison (the benchmark's plain 3-round-trip mode). */
    int begin_alone;
    /* Read the transaction id just before COMMIT (txid_current_if_assigned() and the server's
     * start time, in the same round trip, flushed so that it leaves the server before COMMIT
     * runs), so that a COMMIT
     * lost in flight (PGS_ECOMMIT_UNKNOWN) can be resolved with pgs_tx_resolve. Costs one
     * statement and one more server write per transaction (see README, Performance). Without
     * it an unknown COMMIT is still reported as unknown, only without an id. */
    int resolvable;
    /* How long a cancel or timeout waits for the reply of a COMMIT already sent. 0: 5000. */
    int commit_grace_ms;
    /* pgs_run_tx only: run the body again, up to this many more times, after a serialization
     * failure (40001) or deadlock (40P01), with exponential backoff and jitter. */
    int retries;
    int retry_base_ms; /* first backoff (0: 5 ms); doubled each retry, up to retry_max_ms */
    int retry_max_ms;  /* 0: 500 ms */
} pgs_tx_opts;

/* How a transaction ended. */
typedef enum pgs_tx_outcome {
    PGS_TX_COMMITTED = 1,
    PGS_TX_ROLLED_BACK,
    PGS_TX_UNKNOWN, /* connection lost while COMMIT was in flight: see pgs_tx_resolve */
} pgs_tx_outcome;

/* What the end reports. Borrowed: valid during the callback. */
typedef struct pgs_tx_result {
    pgs_tx_outcome outcome;
    /* NULL when the transaction did what the end asked (commit, or the rollback ok=0 asked
     * for); otherwise why it did not: the first statement error (PGS_ESQL with SQLSTATE,
     * PGS_ETIMEDOUT for a statement timeout), PGS_ECANCELED, PGS_ETIMEDOUT, PGS_ECONN,
     * PGS_ECLOSED, PGS_EMISUSE, or PGS_ECOMMIT_UNKNOWN. */
    const pgs_error *err;
    /* The id pgs_tx_resolve takes, read before COMMIT with pgs_tx_opts.resolvable: the
     * transaction id, a slash and when the server had started ("731/1764553207123456": the
     * time tells resolve whether the server restarted since, after which the id may have gone
     * to another transaction); "" without resolvable, when no id was assigned (the
     * transaction wrote nothing, so its outcome changes nothing), or when it did not arrive. */
    char xid[48];
    /* How many times the body ran (pgs_run_tx, pgs_pool_run_tx: 0 when it never did); 1
     * otherwise. */
    int attempts;
} pgs_tx_result;

/* on_begun: BEGIN (or SAVEPOINT) came back; err NULL or why it failed. Optional. */
typedef void (*pgs_tx_cb)(pgs_tx *tx, const pgs_error *err, void *arg);
/* The end of a transaction guard: its last callback. The handle is freed after it returns. */
typedef void (*pgs_tx_done_cb)(const pgs_tx_result *result, void *arg);

/* Begin a transaction on a connected guard. BEGIN (with the options) is queued at once and
 * goes out with the first statements; on_begun (may be NULL) fires when it is answered.
 * The guard must be ended with pgs_tx_end exactly once, on every path.
 * Returns PGS_OK and sets *out, or at once: PGS_EINVAL (NULL conn/out, bad options),
 * PGS_EMISUSE (the connection is not connected and idle: statements still in flight, another
 * transaction guard open, or a transaction the caller began with a raw BEGIN),
 * PGS_ENOMEM. */
PGS_API int pgs_tx_begin(pgs_conn *conn, const pgs_tx_opts *opts, pgs_tx_cb on_begun,
                         void *arg, pgs_tx **out);

/* Begin a child of an open transaction: a SAVEPOINT with a generated name. Same contract as
 * pgs_tx_begin. PGS_EMISUSE when the parent is ending or already has an open child;
 * PGS_ECLOSED when the connection guard was closed under the transaction; the dead
 * connection's code (PGS_ECONN, PGS_ECANCELED, PGS_ETIMEDOUT) when it is gone. */
PGS_API int pgs_tx_savepoint(pgs_tx *parent, pgs_tx_cb on_begun, void *arg, pgs_tx **out);

/* A statement inside the transaction: as pgs_query (parameters only, one statement, cb fires
 * exactly once). PGS_EMISUSE when the guard is ending or has an open child (LIFO);
 * PGS_ECLOSED when the connection guard was closed under the transaction; the dead
 * connection's code (PGS_ECONN, PGS_ECANCELED, PGS_ETIMEDOUT: the transaction's timeout) when
 * it is gone. */
PGS_API int pgs_tx_query(pgs_tx *tx, const char *sql, int nparams, const char *const *values,
                         pgs_result_cb cb, void *arg);

/* End the guard: ok != 0 commits (a child: RELEASE SAVEPOINT), ok == 0 rolls back (a child:
 * ROLLBACK TO SAVEPOINT + RELEASE). done (may be NULL) fires exactly once with the outcome,
 * after every statement callback of the guard. Returns PGS_OK, or PGS_EINVAL (NULL tx),
 * PGS_EMISUSE (already ended: the first end stands, this done never fires). */
PGS_API int pgs_tx_end(pgs_tx *tx, int ok, pgs_tx_done_cb done, void *arg);

/* Cancel the transaction (see the rules above): cancel request, connection closed, pending
 * callbacks get PGS_ECANCELED. Returns PGS_OK, PGS_EINVAL, or PGS_EMISUSE when it is already
 * cancelled or its connection is gone. */
PGS_API int pgs_tx_cancel(pgs_tx *tx);

/* The body of pgs_run_tx: queue the transaction's statements with pgs_tx_query and finish the
 * scope with pgs_tx_end(tx, ok, NULL, NULL) (now or later, from a result callback). With
 * retries it may run more than once, each time in a new transaction. */
typedef void (*pgs_tx_body)(pgs_tx *tx, void *arg);

/* The whole `async with` form on one connection: begin, run the body, commit or roll back as
 * the body's end says, retry serialization failures and deadlocks as opts->retries allows
 * (never after an unknown commit), then fire done exactly once with the final outcome and the
 * number of attempts. The body runs from the loop, never inside this call; the session is the
 * run's from this call on (pgs_query and pgs_tx_begin on it are refused with PGS_EMISUSE until
 * done, and a guard closed before the body ran ends the run ROLLED_BACK with PGS_ECLOSED,
 * the body never run; a pool then closes that guard instead of reusing it). Retries run on the
 * same connection; when it dies before a retry (during the backoff), done reports the failure
 * that asked for the retry (its code and SQLSTATE, the message saying it was not retried),
 * and attempts the body's runs (pgs_pool_run_tx moves such a retry to another guard).
 * Returns PGS_OK, or at once PGS_EINVAL, PGS_EMISUSE (as pgs_tx_begin), PGS_ENOMEM. */
PGS_API int pgs_run_tx(pgs_conn *conn, const pgs_tx_opts *opts, pgs_tx_body body,
                       pgs_tx_done_cb done, void *arg);

/* What the server says became of a transaction id (from a PGS_TX_UNKNOWN result). */
typedef enum pgs_txid_status {
    PGS_TXID_COMMITTED = 1,
    PGS_TXID_ABORTED,
    PGS_TXID_IN_PROGRESS, /* not finished yet: ask again later */
    PGS_TXID_UNKNOWN,     /* too old for the server to remember, no id, or the server restarted
                             since the id was read (after a crash the server may give an id
                             whose assignment never reached its WAL to another transaction:
                             its status says nothing of ours) */
} pgs_txid_status;

typedef void (*pgs_resolve_cb)(pgs_txid_status status, const pgs_error *err, void *arg);

/* Resolve an unknown commit over a fresh connection (txid_status()). xid is a result's xid
 * (or a bare transaction id: then a restart in between goes unnoticed). cb fires exactly once:
 * err NULL and the status, or err (connect or SQL failure) and PGS_TXID_UNKNOWN.
 * Returns PGS_OK, or PGS_EINVAL (NULL base/conninfo/xid/cb, xid not of that form),
 * PGS_ENOMEM. */
PGS_API int pgs_tx_resolve(struct event_base *base, const char *conninfo, const char *xid,
                           pgs_resolve_cb cb, void *arg);

/* ---------------------------------------------------------------------------------------- */
/* Bulk data: COPY in and out, and results streamed row by row                               */
/* ---------------------------------------------------------------------------------------- */

/* COPY and streamed results run on the same queue as every other statement, in order, on a
 * connection guard (pgs_copy_in, pgs_copy_out, pgs_query_stream) or inside a transaction guard
 * (pgs_tx_copy_in, ...: a failure aborts the transaction like any failed statement, and the
 * end rolls back). Rules they share:
 *  - Each takes the protocol for itself: it waits until the statements before it are
 *    answered, then runs on its own (outside pipeline mode), and statements queued after it
 *    wait until it is over. Memory stays bounded by one chunk or row, whatever the size of
 *    the data.
 *  - `done` (a pgs_result_cb) fires exactly once, last, when the statement is over: err NULL
 *    and res the statement's final result (PQcmdTuples gives the rows copied or returned), or
 *    the error as for pgs_query (PGS_ESQL with the server's result: SQLSTATE, and for bad COPY
 *    data the line in PG_DIAG_CONTEXT; PGS_ECONN, PGS_ECANCELED, PGS_ETIMEDOUT, PGS_ECLOSED).
 *    The data callbacks (on_ready, on_data, on_rows) fire only before it, from the loop.
 *  - Cancel, close, a transaction's timeout and a lost connection work as for any statement:
 *    pgs_conn_cancel (pgs_tx_cancel) sends a cancel request and closes the connection, and
 *    done gets the code. In a transaction the COPY's rows go with the rollback.
 *  - `sql` is copied before return and takes no parameters for COPY (the server does not
 *    allow them in COPY); quote identifiers in it with PQescapeIdentifier. */

/* A COPY ... FROM STDIN in progress: the handle pgs_copy_write and pgs_copy_end take. Valid
 * from the call that returns it until its done returns. */
typedef struct pgs_copy pgs_copy;

/* The COPY can take data: first when the server has started it, then each time after
 * pgs_copy_write said PGS_EAGAIN, once what libpq held has gone out to the socket. A stream
 * of calls (not once), each from the loop. It may write, end, or do nothing (then the caller
 * writes later, from wherever its data comes). */
typedef void (*pgs_copy_ready_cb)(pgs_copy *copy, void *arg);

/* Start COPY ... FROM STDIN (`sql`, in text, csv or binary format as it says). on_ready fires
 * once the server has started it; write the data with pgs_copy_write and finish (or abort)
 * with pgs_copy_end; done fires once the server has answered the end, with the row count in
 * PQcmdTuples(res), or the error: bad data (22P02 ..., the line number in the error's
 * context), a constraint violated (23505 ...), the caller's abort (PGS_ECANCELED, SQLSTATE
 * 57014, with the server's result), a statement that is not COPY FROM STDIN (PGS_EINVAL; one
 * that is COPY TO STDOUT is read to its end and discarded). The server checks most data as it
 * comes but reports its first error only after the end: the writes before it still succeed.
 * Returns PGS_OK and sets *out (may be NULL), or at once PGS_EINVAL (NULL conn, sql, on_ready
 * or done), PGS_EMISUSE (a transaction guard owns the connection, or it is closing), the
 * connection's error when it is gone, PGS_ENOMEM; then no callback fires. */
PGS_API int pgs_copy_in(pgs_conn *conn, const char *sql, pgs_copy_ready_cb on_ready,
                        pgs_result_cb done, void *arg, pgs_copy **out);
/* The same inside a transaction guard (PGS_EMISUSE when it is ending or has an open child). */
PGS_API int pgs_tx_copy_in(pgs_tx *tx, const char *sql, pgs_copy_ready_cb on_ready,
                           pgs_result_cb done, void *arg, pgs_copy **out);

/* Hand `len` bytes of COPY data to the connection (any split: rows may span writes). The
 * bytes are copied (into libpq's buffer) before return. Backpressure: while what was written
 * has not yet gone out to the socket (the server reads slower than the caller writes), the
 * write is refused with PGS_EAGAIN and nothing is taken; on_ready fires once it may be
 * called again. So the library holds at most about 64 KiB plus one write, however much the
 * caller has to send. Returns PGS_OK (taken), PGS_EAGAIN (not taken: the server has not
 * started the COPY yet, or the buffer is full), PGS_EINVAL (NULL copy, NULL data with len >
 * 0, len over INT_MAX), PGS_EMISUSE (after pgs_copy_end, or once done has fired), or the
 * connection's error when it is gone (done then fires with it, if it has not yet). */
PGS_API int pgs_copy_write(pgs_copy *copy, const void *data, size_t len);

/* Finish the COPY: `abort_reason` NULL ends the data and the server commits the rows (or,
 * inside a transaction, keeps them for the transaction's end); non-NULL aborts it, the server
 * discards every row and done reports PGS_ECANCELED with the reason. Before the server has
 * started the COPY (before on_ready), the end is applied as soon as it starts. Returns PGS_OK
 * (done fires), PGS_EINVAL (NULL copy), PGS_EMISUSE (already ended, or done has fired). */
PGS_API int pgs_copy_end(pgs_copy *copy, const char *abort_reason);

/* One piece of COPY ... TO STDOUT output: in text or csv format one row, its newline
 * included; borrowed (valid during the call). Return 0 to go on; non-zero stops the delivery:
 * the rest is read and discarded (the connection stays usable; to stop the server's work
 * too, cancel the guard, which closes it). */
typedef int (*pgs_copy_data_cb)(pgs_conn *conn, const char *data, size_t len, void *arg);

/* Run COPY ... TO STDOUT (`sql`) and hand its output to on_data chunk by chunk as it arrives,
 * never the whole in memory; done fires after the last (PQcmdTuples: the rows). A statement
 * that is not COPY TO STDOUT: PGS_EINVAL (COPY FROM STDIN is ended at once, nothing copied).
 * Returns as pgs_copy_in. */
PGS_API int pgs_copy_out(pgs_conn *conn, const char *sql, pgs_copy_data_cb on_data,
                         pgs_result_cb done, void *arg);
PGS_API int pgs_tx_copy_out(pgs_tx *tx, const char *sql, pgs_copy_data_cb on_data,
                            pgs_result_cb done, void *arg);

/* Rows of a streamed statement as they arrive: `rows` holds PQntuples(rows) >= 1 rows, with
 * the columns described as in any PGresult; borrowed, freed after the call, so memory is
 * bounded by one batch, not the result. Return 0 to go on; non-zero stops the delivery: the
 * rest of the rows are read and discarded (not delivered), the connection stays usable, and
 * done still fires with the statement's end (to stop the server's work too, cancel the guard,
 * which closes it). */
typedef int (*pgs_rows_cb)(pgs_conn *conn, const PGresult *rows, void *arg);

/* Run a statement (as pgs_query: one statement, text parameters) and receive its rows as
 * they arrive instead of in one result: libpq's single-row mode, so on_rows gets one row per
 * call; with libpq 17 or later, chunked mode: up to batch_rows per call (0: 256). done fires
 * after the last row with the statement's final result (its status PGRES_TUPLES_OK, no rows;
 * PQcmdTuples says how many there were) or the error; an error after some rows (a division by
 * zero in row 1000, a lost connection) comes after those rows were delivered. Returns as
 * pgs_query, and PGS_EINVAL for batch_rows < 0 or NULL on_rows. */
PGS_API int pgs_query_stream(pgs_conn *conn, const char *sql, int nparams,
                             const char *const *values, int batch_rows, pgs_rows_cb on_rows,
                             pgs_result_cb done, void *arg);
PGS_API int pgs_tx_query_stream(pgs_tx *tx, const char *sql, int nparams,
                                const char *const *values, int batch_rows, pgs_rows_cb on_rows,
                                pgs_result_cb done, void *arg);

/* ---------------------------------------------------------------------------------------- */
/* Pool                                                                                      */
/* ---------------------------------------------------------------------------------------- */

/* A pool of connection guards on one loop. pgs_pool_acquire hands out a connected guard;
 * pgs_conn_close on it gives it back. Rules:
 *  - Waiters are served in FIFO order. A request is granted, times out, is cancelled, or sees
 *    the pool close: exactly one of these, and its callback fires once, from the loop.
 *  - A guard comes back for reuse only when it is connected, idle (no transaction, nothing
 *    in flight) and was not cancelled; then its session is reset (pgs_pool_opts.reset): by
 *    default everything DISCARD ALL resets except the statement cache's prepared statements
 *    (settings, role and session user, cursors, LISTEN, advisory locks, temporary tables,
 *    sequence state; prepared statements too, with DISCARD ALL, once the user ran SQL
 *    PREPARE). The reset is sent when the guard goes idle, or, when someone is waiting, with
 *    the hand-over: the statements the new user queues in the acquire callback (or in an event
 *    it posts from there, such as pgs_run_tx's body) share its pipeline segment, so reset and
 *    statements leave in one write and cost that user no round trip (until it is answered,
 *    PQtransactionStatus on the new guard says PQTRANS_ACTIVE). It runs as a transaction of
 *    its own, so the new user's first statement starts a fresh one with the defaults restored
 *    (even VACUUM may come first). Should it fail (a lock wait that lock_timeout ends, say),
 *    the guard is closed as soon as its answer comes, and nothing queued behind it runs (the
 *    server skips the rest of its segment, and the default reset's aborted transaction
 *    refuses what follows);
 *    their callbacks get PGS_ECONN with the reason, and a transaction among them ends
 *    ROLLED_BACK (its COMMIT was skipped).
 *    Anything else (closed inside a transaction, with statements running, after a cancel or
 *    a lost connection) is closed, and the pool opens a replacement.
 *  - Connections that die while idle (backend terminated, server restarted) are noticed at
 *    once and replaced; a waiter only ever gets a live one: before a grant the pool reads what
 *    the server sent (EOF, its FATAL), also while the last user's reset is still in flight. While the server is down, new
 *    connections are retried with backoff; waiters time out with PGS_ECONNECT (and the
 *    connect error) instead of PGS_ETIMEDOUT, and the pool refills by itself when it is back.
 *  - A guard's handle is valid for its user from the acquire callback until its close's done
 *    returns; after that the pool may hand the same handle to someone else. A returned guard
 *    is back in the pool (the counts say so) when that done fires, and from the close on the
 *    user's calls on it (pgs_query, pgs_conn_close, pgs_conn_cancel, pgs_tx_begin) are
 *    refused with PGS_EMISUSE, also from inside done.
 */
typedef struct pgs_pool pgs_pool;
typedef struct pgs_pool_req pgs_pool_req;

/* How the pool resets a session that comes back, before anyone else gets it. */
typedef enum pgs_pool_reset {
    /* The default: CLOSE ALL, SET SESSION AUTHORIZATION DEFAULT, RESET ALL, UNLISTEN *,
     * pg_advisory_unlock_all(), DISCARD TEMP, DISCARD SEQUENCES, inside BEGIN ISOLATION LEVEL
     * READ COMMITTED ... COMMIT (asyncpg's reset, and more). Prepared statements stay, so the
     * statement cache stays warm; once the user has run SQL PREPARE on the session, DISCARD
     * ALL instead. Not
     * covered: statements prepared inside a function (EXECUTE 'PREPARE ...'); use
     * PGS_RESET_ALL if users do that. */
    PGS_RESET_SESSION = 0,
    /* DISCARD ALL every time: also drops the statement cache (parsed again by the next user)
     * and cached plans. pgbouncer's session-pooling reset. */
    PGS_RESET_ALL,
    /* Nothing: session state one user leaves (SET, temporary tables, LISTEN, PREPARE, a role)
     * reaches the next; guards are still reused only when idle and clean. For pools whose
     * users never change session state (pgxpool's behaviour). */
    PGS_RESET_NONE,
} pgs_pool_reset;

/* Options for pgs_pool_new. Zero-initialise; zero means the default. */
typedef struct pgs_pool_opts {
    int min_size;           /* opened ahead, in the background, and kept open (0) */
    int max_size;           /* connections open or opening at most (0: 10) */
    int acquire_timeout_ms; /* how long a request may wait (0: 30000; < 0: forever) */
    int max_waiting;        /* requests waiting at most; past it acquire gives PGS_EBUSY (0: no
                               bound) */
    int idle_timeout_ms;    /* close connections idle this long, down to min_size (0: 300000;
                               < 0: never) */
    int max_lifetime_ms;    /* close and replace connections older than this when they come
                               back or wait idle (0: 3600000; < 0: never) */
    pgs_pool_reset reset; /* what a guard's session gets when it comes back (see above) */
    pgs_conn_opts conn;     /* for each connection (its on_lost is chained after the pool's) */
    /* Optional notifications: a new connection is up (before anyone gets it), a guard came
     * back (before its reset). They must not send statements. */
    void (*on_connect)(pgs_conn *conn, void *arg);
    void (*on_release)(pgs_conn *conn, void *arg);
    void *cb_arg;
    /* Setup statements for every new connection (asyncpg's init, pgx's AfterConnect): a
     * NULL-terminated list of SQL statements (SET search_path ..., LISTEN ..., PREPARE ...;
     * copied at pgs_pool_new), run in order in one round trip after the connection is up and
     * before anyone gets it: a waiter never gets a half-configured connection. They run
     * inside a transaction block (BEGIN ... COMMIT, so that none of it is undone by an error
     * of the next user's statements in the same pipeline segment): a statement that cannot
     * (VACUUM, CREATE DATABASE) fails there. A PREPARE among them makes each reset a DISCARD
     * ALL (see PGS_RESET_SESSION), so the statement cache is parsed anew for every user. If one fails,
     * that connection is closed, the failure counted (setup_failures) and reported (the
     * conn_replaced hook, with the statement's error), and the pool opens another with
     * backoff, as after a failed connect; waiters that time out meanwhile get PGS_ECONNECT
     * with that error. The session reset (PGS_RESET_SESSION, PGS_RESET_ALL) undoes what setup
     * did (RESET ALL, UNLISTEN *, DISCARD), so the setup statements run again after every
     * reset, in the same pipeline segment (no extra round trip): each user finds the session
     * as setup left it. With PGS_RESET_NONE they run once per connection. NULL: none. */
    const char *const *setup_sql;
    const pgs_hooks *hooks; /* tracing for the pool and its connections (overrides conn.hooks) */
    /* Multiplexed transactions (opt-in): pgs_pool_run_tx pipelines the transactions of many
     * callers on few connections, several in flight on one connection at once (see "Multiplexed
     * transactions" below pgs_pool_run_tx). 0: off, each transaction has a connection to itself. */
    int multiplex;
    /* With multiplex: transactions in flight on one connection at most (0: 16). */
    int mux_depth;
} pgs_pool_opts;

/* Counters for export (pgs_pool_stats fills them; the type's tag and name are one). */
typedef struct pgs_pool_counts {
    int size;    /* connections open or opening */
    int idle;    /* ready to hand out */
    int in_use;  /* handed out */
    int waiting; /* requests waiting */
    unsigned long acquired, timed_out, canceled, replaced, reset, connect_failures;
    /* Since the pool was created or pgs_pool_stats_reset: */
    unsigned long requests;       /* pgs_pool_acquire calls accepted */
    unsigned long refused_busy;   /* refused with PGS_EBUSY (max_waiting) */
    unsigned long failed_connect; /* requests that ended with PGS_ECONNECT */
    unsigned long closed;         /* requests failed by the pool's close */
    unsigned long opened;         /* connections that came up */
    unsigned long lost;           /* connections lost (idle or in use) */
    unsigned long setup_failures; /* connections closed because a setup statement failed */
    unsigned long resets_failed;  /* session resets that failed (the guard was closed) */
    double wait_total_ms;         /* summed over granted requests, from acquire to grant */
    double wait_max_ms;
} pgs_pool_counts;

/* Create a pool on `base` for `conninfo` (copied). opts may be NULL. min_size connections start
 * opening at once. Returns PGS_OK and *out, or PGS_EINVAL (NULL base/conninfo/out,
 * min_size > max_size, negative sizes, a reset that is not a pgs_pool_reset), PGS_ENOMEM. */
PGS_API int pgs_pool_new(struct event_base *base, const char *conninfo,
                         const pgs_pool_opts *opts, pgs_pool **out);

/* Ask for a connection. cb fires exactly once: with a connected guard and err NULL (close it
 * to give it back), or with conn NULL and err PGS_ETIMEDOUT, PGS_ECONNECT (the server could
 * not be reached within the timeout), PGS_ECANCELED (pgs_pool_acquire_cancel) or PGS_ECLOSED
 * (the pool closed). `req` (may be NULL) gets a handle for pgs_pool_acquire_cancel, valid
 * until cb fires. Returns PGS_OK, or at once PGS_EINVAL, PGS_ECLOSED (the pool is closing),
 * PGS_EBUSY (max_waiting reached), PGS_ENOMEM; then cb never fires. */
PGS_API int pgs_pool_acquire(pgs_pool *pool, pgs_conn_cb cb, void *arg, pgs_pool_req **req);

/* Why the pool's last acquire was refused at once (PGS_EBUSY, PGS_ECLOSED) in words that name
 * the limit: "too many requests waiting (max_waiting 3; max_size 4, 4 in use)". A static
 * buffer of the pool's, valid until its next acquire; "" before any refusal (or NULL pool). */
PGS_API const char *pgs_pool_refusal(const pgs_pool *pool);

/* Abandon a request that has not fired yet: its cb fires with PGS_ECANCELED, and a connection
 * already set aside for it goes to the next waiter (hand-over and cancel are one decision).
 * Returns PGS_OK, PGS_EINVAL, or PGS_EMISUSE when its callback is already running or done, or
 * its outcome is already decided (the pool's close failed it: cb fires with PGS_ECLOSED). */
PGS_API int pgs_pool_acquire_cancel(pgs_pool_req *req);

/* acquire + pgs_run_tx + release as one scope: done fires exactly once with the outcome
 * (outcome PGS_TX_ROLLED_BACK and the acquire's error when no connection could be had),
 * after the guard is back in the pool (pgs_pool_stats no longer counts it in use). A retry
 * after a serialization failure or deadlock whose connection died (the transaction was
 * rolled back, so it is safe) runs on another guard, after its backoff; attempts counts the
 * body's runs on all of them. Never after an unknown commit. A guard whose connection died
 * between its grant and the body (the body never ran) is replaced by another, up to 3 times.
 * Returns PGS_OK, or at once what pgs_pool_acquire
 * returns, or PGS_EINVAL (NULL body or done). */
PGS_API int pgs_pool_run_tx(pgs_pool *pool, const pgs_tx_opts *opts, pgs_tx_body body,
                            pgs_tx_done_cb done, void *arg);

/* Multiplexed transactions (pgs_pool_opts.multiplex): what pgs_pool_run_tx does then.
 *  - Several callers' transactions are in flight on one connection at once, pipelined. The
 *    body's statements are kept until it returns; a body that ended its transaction then (the
 *    common case) has it sent whole, BEGIN to COMMIT, behind the others queued on that
 *    connection in the same loop turn, in one pipeline segment; the last COMMIT of the batch
 *    goes in a segment of its own: two writes and two wake-ups of the server for many
 *    transactions. Results go to their own transaction.
 *  - An error aborts only its own transaction. The server skips what follows an error up to
 *    the sync, so a transaction behind a failed one in the same segment never ran at all (its
 *    BEGIN was skipped): it is sent again, whole, on a connection with room, before the
 *    requests still waiting; its callbacks fire once, for the run that happened, and nothing
 *    of the skipped one is reported (the statement hooks do show the skipped statements).
 *    After 8 such runs again it is sent first in a segment of its own, where nothing can skip
 *    it. Skipped ones run again in their order. Their time limit (timeout_ms) counts from the
 *    first run; cancelled (pgs_tx_cancel) or out of time before they run again, they end
 *    ROLLED_BACK with PGS_ECANCELED or PGS_ETIMEDOUT, their statements' callbacks told they
 *    did not run (with conn NULL: such a transaction is on no connection while it waits; so
 *    too when the pool's close ends it then, with PGS_ECLOSED). The batch's last COMMIT, alone in its segment, ends a transaction the error left
 *    aborted (it answers ROLLBACK), so the next batch finds the session idle. (When a COMMIT
 *    itself failed, the last one may find no transaction and the server warns "there is no
 *    transaction in progress", SQLSTATE 25P01: that warning is not passed to on_notice.)
 *  - Outcomes are exact as everywhere: a connection lost makes each COMMIT already written
 *    UNKNOWN, and every transaction whose COMMIT was not written, whose statement the server
 *    refused, or that was skipped, ROLLED_BACK (or sent again, when skipped by a neighbour's
 *    error that arrived before the loss). A transaction whose BEGIN did not run is never
 *    COMMITTED, though a COMMIT in a later segment answers "COMMIT" with no transaction.
 *  - pgs_conn_txstatus, called in the body or a statement's callback, gives that transaction's
 *    own status (INTRANS, or INERROR after a failure), not its neighbours'.
 *  - Callers share sessions, as in PgBouncer's transaction mode: a body must not leave session
 *    state behind (SET without LOCAL, PREPARE, LISTEN, temporary tables, session advisory
 *    locks, a role): the next transaction on the connection inherits it. Everything inside the
 *    transaction is fine (SET LOCAL, pg_advisory_xact_lock, the statement cache's prepared
 *    statements). No session reset runs between transactions; it runs (pgs_pool_opts.reset)
 *    when the connection goes back to the pool, after it has been idle for a second.
 *  - Requests are served in FIFO order, onto the first connection in use that has room
 *    (mux_depth transactions in flight), so few connections carry deep pipelines; another is
 *    taken from the pool (up to max_size) only when every connection in use is full. A
 *    request that finds no room waits under the pool's rules: acquire_timeout_ms (then done
 *    reports ROLLED_BACK, attempts 0, with PGS_ETIMEDOUT, or PGS_ECONNECT while the server
 *    cannot be reached) and max_waiting (then PGS_EBUSY at once). done fires once the outcome
 *    is known; the connection stays with the mode's other transactions.
 *  - The body runs from the loop. A body that returns without ending its transaction (it
 *    waits for a result to decide) starts a pipeline segment of its own and holds that
 *    connection alone until it ends: transactions already in flight ahead of it are
 *    unaffected, and none is put behind it; the others go to other connections (or wait for
 *    one). Such a transaction costs what it costs in the default mode. So do those that open
 *    a savepoint, run a COPY or stream, or use begin_alone. The statement hooks' stmt_start of
 *    statements kept until the body returns fires when they are sent, just after it returns.
 *  - A statement that runs long delays the transactions pipelined with it on its connection
 *    (head-of-line blocking): those behind it run after it, and the replies of those ahead
 *    of it in its segment, which the server sends at the segment's end, come after it too.
 *    Keep multiplexed transactions short.
 *  - Retries (40001, 40P01) run the body again after their backoff, at the head of the queue
 *    (perhaps on another connection); attempts counts the body's runs; never after an
 *    unknown commit.
 *  - pgs_tx_cancel, and pgs_tx_opts.timeout_ms, cost the transaction's neighbours this much:
 *    the cancel request reaches whatever statement the server runs at that moment, which may
 *    be a neighbour's: that neighbour then rolls back with SQLSTATE 57014, exactly reported;
 *    those behind it in its segment are sent again elsewhere. The cancelled transaction rolls
 *    back (its pending statements get the cancel's code); the connection takes no new
 *    transaction and is closed once those on it are done. Only when a COMMIT already sent gets
 *    no reply within commit_grace_ms is the connection closed at once: every COMMIT in flight
 *    on it then ends UNKNOWN. When the cancelled transaction's COMMIT waits for its own BEGIN's
 *    reply (begin_alone) or a savepoint's, the connection is closed when that COMMIT would
 *    leave, after everything ahead of it was answered: the neighbours' outcomes stay exact.
 *  - pgs_pool_acquire still hands out connections of their own, from the same max_size. */

/* Fill *stats. */
PGS_API void pgs_pool_stats(const pgs_pool *pool, pgs_pool_counts *stats);

/* Zero the cumulative counters (everything below `waiting`), e.g. after each export; the
 * gauges (size, idle, in_use, waiting) are the pool's state and stay. */
PGS_API void pgs_pool_stats_reset(pgs_pool *pool);

/* pgs_pool_acquire with its own timeout instead of the pool's acquire_timeout_ms (psycopg's
 * getconn(timeout=)): ms > 0, or < 0 to wait as long as it takes; 0 is PGS_EINVAL. The
 * error message of a timeout names the limit it hit and the pool's state ("no connection
 * within 200 ms (this request's timeout; max_size 4, all in use, 3 waiting)"). */
PGS_API int pgs_pool_acquire_within(pgs_pool *pool, int timeout_ms, pgs_conn_cb cb, void *arg,
                                    pgs_pool_req **req);

/* Close the pool: new acquires fail with PGS_ECLOSED, waiting requests are told PGS_ECLOSED,
 * idle connections close now, guards in use close as they come back; done fires when the last
 * one is gone, then the pool is freed. Returns PGS_OK, PGS_EINVAL, or PGS_EMISUSE when it is
 * already closing. */
PGS_API int pgs_pool_close(pgs_pool *pool, pgs_done_cb done, void *arg);

/* ---------------------------------------------------------------------------------------- */
/* Listener: LISTEN that survives reconnects                                                 */
/* ---------------------------------------------------------------------------------------- */

/* A guard that LISTENs on a set of channels and keeps doing so across lost connections
 * (psycopg's notifies() loop, pgx's pglisten): after a loss it opens a new connection with
 * backoff and LISTENs again. Notifications sent while it is not listening are lost, since the
 * server queues them only for sessions that listen; so it tells its user where each gap begins
 * and ends, and a user who keeps state from notifications re-reads it when a gap ends. Rules:
 *  - on_state(1) fires once LISTEN has succeeded for every channel on a connection: first
 *    after pgs_listener_new, then after each reconnect. Re-read the state the notifications
 *    describe then (at the first one too): nothing before it reached this listener.
 *  - on_state(0, why) fires once per gap, when it begins: when the loss is noticed (the
 *    server closed the session, the network failed, a ping went unanswered), or when the first
 *    attempt to connect and LISTEN fails (so a wrong password or an unreachable server is
 *    told, not hidden). During a gap the listener retries with backoff (retry_base_ms doubled
 *    per failure up to retry_max_ms, each a random point in the upper half of its step), and
 *    failed attempts are not told again. So on_state's calls alternate, 0 and 1, starting with
 *    either. Failures no retry can mend (PGS_EAUTH, PGS_ENODB) are retried just the same;
 *    close the listener to give up.
 *  - A LISTEN that fails (a server in recovery refuses it with 25006; a channel name the
 *    connection's encoding cannot quote gives PGS_EINVAL) fails the whole attempt: the
 *    connection is closed and the next attempt comes after the backoff. on_state(1) always
 *    means every channel, never some.
 *  - on_notify fires only while listening: after on_state(1), before the next on_state(0)
 *    or the close. A notification that arrives on a connection whose LISTENs are not all
 *    answered yet is dropped: it reports a commit made before on_state(1) fires, which the
 *    re-read then sees.
 *  - While listening the connection is pinged (SELECT 1, an ordinary statement: hooks see
 *    it) every ping_interval_ms; an answer later than ping_timeout_ms starts a gap
 *    (PGS_ETIMEDOUT), so a network that stalls without closing is noticed. ping_timeout_ms also bounds the wait for the LISTENs'
 *    answers. A loss the server or the kernel reports (a terminated backend, a reset) is
 *    noticed at once, without a ping.
 *  - pgs_listener_close: fires done exactly once, from the loop, once the connection is
 *    closed; from the close on nothing else fires. It may be called from inside any of the
 *    listener's callbacks.
 * The listener's connections are ordinary guards (the opts.conn options apply to each). */
typedef struct pgs_listener pgs_listener;

/* Options for pgs_listener_new. Zero-initialise; zero means the default. */
typedef struct pgs_listener_opts {
    /* For each connection the listener opens (connect_timeout_ms bounds each attempt, a
     * notice callback, hooks, ...); its on_notify, on_lost and their args are the listener's
     * own and ignored here. */
    pgs_conn_opts conn;
    int retry_base_ms;    /* the first retry's step (0: 100 ms) */
    int retry_max_ms;     /* the largest step (0: 5000 ms, or retry_base_ms if larger) */
    int ping_interval_ms; /* a ping this long after each answer while listening (0: 30000;
                             < 0: no pings) */
    int ping_timeout_ms;  /* how long a ping, or the LISTENs, may go unanswered (0: 10000) */
} pgs_listener_opts;

/* A notification on one of the channels. n is borrowed (freed after the callback): relname
 * is the channel, extra the payload, be_pid the notifying backend's pid. */
typedef void (*pgs_listener_notify_cb)(pgs_listener *l, const PGnotify *n, void *arg);

/* listening = 1 (why NULL): LISTEN is in place on every channel; re-read state now.
 * listening = 0: a gap begins; why says why (borrowed: the connect error, PGS_ECONN with the
 * server's reason such as 57P01, PGS_ETIMEDOUT for an unanswered ping or LISTEN, PGS_ESQL
 * for a LISTEN the server refused). */
typedef void (*pgs_listener_state_cb)(pgs_listener *l, int listening, const pgs_error *why,
                                      void *arg);

/* Start a listener on `base` for `conninfo` (copied) and the NULL-terminated list `channels`
 * (copied; each a channel name as pg_notify takes it, 1 to 63 bytes, any characters: it is
 * quoted with PQescapeIdentifier, never spliced into SQL). The first connection starts at
 * once; on_state tells how it went. on_notify and on_state fire from the loop, never inside
 * a call of this API. opts may be NULL (defaults). The listener is exited with
 * pgs_listener_close, exactly once.
 * Returns PGS_OK and sets *out, or at once (*out NULL, no callback ever): PGS_EINVAL (NULL
 * base, conninfo, channels, on_notify, on_state or out; no channel; an empty channel name or
 * one over 63 bytes, which the server would cut; a negative retry or ping_timeout option; a
 * conninfo that does not parse), PGS_ENOMEM. */
PGS_API int pgs_listener_new(struct event_base *base, const char *conninfo,
                             const char *const *channels, const pgs_listener_opts *opts,
                             pgs_listener_notify_cb on_notify, pgs_listener_state_cb on_state,
                             void *arg, pgs_listener **out);

/* Exit the listener: its connection (or attempt) is closed, and done (may be NULL) fires
 * exactly once, from the loop, after which the handle is freed; no other callback fires from
 * this call on. Returns PGS_OK, PGS_EINVAL (NULL), or PGS_EMISUSE when it is already closing
 * (the first close stands; this done never fires). */
PGS_API int pgs_listener_close(pgs_listener *l, pgs_done_cb done, void *arg);

/* The connection guard that listens now, for inspection only (pgs_conn_pgconn: PQbackendPID,
 * PQparameterStatus, ...); NULL during a gap, before the first on_state(1) and once closing.
 * Borrowed: valid until the next on_state; never close it or send on it. */
PGS_API pgs_conn *pgs_listener_conn(const pgs_listener *l);

/* ---------------------------------------------------------------------------------------- */
/* Read routing: a primary and a standby                                                     */
/* ---------------------------------------------------------------------------------------- */

/* Two pools, one for the primary (its conninfo may list every host with
 * target_session_attrs=read-write, so that it follows a failover) and one for a streaming
 * standby (target_session_attrs=standby, or prefer-standby to fall back to the primary), and a
 * router over them: read-only transactions (pgs_tx_opts.read_only) go to the standby while its
 * replay lag is within max_lag_ms, everything else to the primary; reads go to the primary
 * too while the lag is over the bound, not known yet, or the standby cannot be reached. The
 * lag is measured on the standby every lag_check_ms, on one of its pool's guards: 0 while it
 * streams and has replayed everything it received, otherwise the age of the last transaction
 * it replayed (pg_last_xact_replay_timestamp); a server no longer in recovery (promoted) has
 * none. A read on the standby sees the primary's commits up to that lag: a caller that must
 * read its own writes sends those reads to the primary (read_only = 0). The pools stay the
 * caller's: the router neither closes nor frees them. */
typedef struct pgs_router pgs_router;

typedef struct pgs_router_opts {
    int max_lag_ms;   /* reads go to the standby while its lag is at most this (0: 1000 ms;
                         < 0: whatever the lag, once it is known) */
    int lag_check_ms; /* how often the lag is measured (0: 500 ms) */
} pgs_router_opts;

/* Create a router over `primary` and `standby` (pools on `base`); the first measurement starts
 * from the loop at once. Returns PGS_OK and *out, or PGS_EINVAL (NULL base, pool or out),
 * PGS_ENOMEM. Free it with pgs_router_free before closing the pools. */
PGS_API int pgs_router_new(struct event_base *base, pgs_pool *primary, pgs_pool *standby,
                           const pgs_router_opts *opts, pgs_router **out);

/* pgs_pool_run_tx on the pool pgs_router_pick chooses for opts; the same contract. */
PGS_API int pgs_router_run_tx(pgs_router *router, const pgs_tx_opts *opts, pgs_tx_body body,
                              pgs_tx_done_cb done, void *arg);

/* The pool a transaction with these options goes to now (for pgs_pool_acquire by hand). */
PGS_API pgs_pool *pgs_router_pick(const pgs_router *router, const pgs_tx_opts *opts);

/* The standby's replay lag in ms as last measured; -1 while it is not known (before the first
 * measurement, or the last one failed). */
PGS_API long pgs_router_lag_ms(const pgs_router *router);

/* Stop measuring and free the router (once a measurement in flight has given its guard back,
 * from the loop). Transactions already routed run on. Returns PGS_OK, PGS_EINVAL (NULL), or
 * PGS_EMISUSE (freed twice). */
PGS_API int pgs_router_free(pgs_router *router);

#ifdef __cplusplus
}
#endif
#endif /* PGSCOPE_H */

/* Internal: the pool's shared state, for its files only (pool.c: slots, waiters, reset and
 * setup; pool_stats.c: the counters, the hooks and the words of its failures). The layers
 * below see none of it; pool_run.c and pool_route.c use the public API. */
#ifndef PGS_POOL_PRIVATE_H
#define PGS_POOL_PRIVATE_H

#include "conn.h"
#include "error.h"
#include "loop.h"

typedef enum slot_state {
    SL_CONNECTING,
    SL_SETUP,   /* connected, its setup statements in flight: not handed out yet */
    SL_IDLE,
    SL_IN_USE,  /* handed out, or granted and about to be */
    SL_CLOSING, /* the pool closes it; gone when its close's done fires */
} slot_state;

typedef struct slot slot;

/* A statement the pool sends on a slot's connection, as its callback's arg: which slot, and
 * which setup statement (1..n; 0 for the pool's own: BEGIN, COMMIT, the reset's). */
typedef struct stmt_ref {
    slot *s;
    int setup_no;
} stmt_ref;

struct slot {
    struct slot *prev, *next; /* the idle list, while idle */
    struct slot *all_prev, *all_next;
    pgs_pool *pool;
    pgs_conn *conn;
    slot_state state;
    double born;
    loop_ev *idle_timer; /* idle timeout, or the end of its lifetime, while idle */
    struct pgs_pool_req *granted_to; /* set aside for a request not yet delivered */
    int reset_owed; /* came back, its session reset not sent yet (see slot_returned) */
    int failed_by_pool; /* the pool ended it (its reset or setup failed): not a loss */
    stmt_ref own;       /* setup_no 0 */
    stmt_ref *setup;    /* setup_no 1..n, with setup_sql only */
    int setup_left;     /* setup statements not answered yet (SL_SETUP) */
    int setup_failed;
    pgs_error setup_err; /* the first failure of its setup */
};

typedef enum req_state {
    RQ_WAITING, /* in the queue; its event is the timeout */
    RQ_GRANTED, /* a connection is set aside; its event delivers it */
    RQ_FAILED,  /* cancelled or the pool closed; its event delivers err */
    RQ_FIRING,  /* its callback runs: too late to cancel */
} req_state;

struct pgs_pool_req {
    pgs_pool_req *prev, *next;
    pgs_pool *pool;
    pgs_conn_cb cb;
    void *arg;
    loop_ev *ev;
    req_state state;
    slot *granted;
    pgs_error err;
    double asked;    /* when pgs_pool_acquire was called */
    double deadline; /* when its acquire timeout ends */
    int timeout_ms;  /* its limit (< 0: none) */
    int own_timeout; /* the limit is its own (pgs_pool_acquire_within), not the pool's */
};

struct pgs_pool {
    struct event_base *base;
    char refusal[160]; /* why the last acquire was refused at once (pgs_pool_refusal) */
    char *conninfo;
    pgs_pool_opts opts; /* opts.setup_sql points to `setup` */
    char **setup;       /* the setup statements, copied (NULL-terminated), or NULL */
    int nsetup;
    slot *idle; /* most recently returned first: warm connections are reused */
    slot *all;
    pgs_pool_req *wait_head, *wait_tail;
    int size, nidle, in_use, waiting;
    int connecting; /* opening, or running their setup: waiters will get them */
    int retiring;   /* closing, not yet gone: not counted toward min_size */
    int outstanding; /* acquire callbacks not yet fired: the pool outlives them */
    int closing;
    pgs_done_cb done;
    void *done_arg;
    loop_ev *retry; /* reconnect backoff while the server cannot be reached */
    int retry_ms;
    int retry_armed;
    int connect_failing; /* the last new connection failed (its connect or its setup) */
    pgs_error connect_err;
    loop_ev *finish; /* the close's done, from the loop */
    pgs_pool_counts counters; /* the cumulative ones (the gauges are the fields above) */
    struct mux *mux; /* the multiplexed mode's state (pool_mux.c), from its first request */
};

/* pool.c */
double pool_now_ms(void);
/* Hand idle connections to waiters, open what waiters and min_size need. */
void pool_dispatch(pgs_pool *p);
/* A new connection failed (its connect or its setup): reconnect only after a backoff, and
 * waiters whose wait runs out meanwhile hear `err` (PGS_ECONNECT). */
void pool_backoff(pgs_pool *p, const pgs_error *err);
/* A new connection is up (and set up): to the first waiter, or idle. */
void slot_ready(slot *s);
/* Close a slot's connection; slot_replace also counts it and tells the hook (pool_replaced). */
void slot_retire(slot *s);
void slot_replace(slot *s, int counts, const pgs_error *why);

/* A request, carrier or report of the pool's that it must outlive has ended (it was counted
 * in p->outstanding): the pool may finish closing now. */
void pool_outstanding_done(pgs_pool *p);

/* pool_mux.c: the multiplexed mode */
struct mux;
/* pgs_pool_run_tx with pgs_pool_opts.multiplex (same contract; body and done checked). */
int mux_run_tx(pgs_pool *p, const pgs_tx_opts *opts, pgs_tx_body body, pgs_tx_done_cb done,
               void *arg);
/* The pool closes: waiting transactions fail with PGS_ECLOSED (from the loop), idle carriers go
 * back, the others once their transactions are done. */
void mux_close(pgs_pool *p);
void mux_free(struct mux *m);

/* pool_session.c */
/* Copy the setup statements into p->setup (0, or -1: no memory); free them. */
int pool_copy_setup(pgs_pool *p, const char *const *sql);
void pool_free_setup(pgs_pool *p);
/* Run the setup on a new connection (SL_SETUP); then slot_ready, or the slot is closed and
 * the pool backs off. */
void slot_start_setup(slot *s);
/* Queue the session reset (and the setup again), with no sync of its own: the next user's
 * statements queued in this loop turn share its pipeline segment. A failure reported later
 * closes the guard. Returns PGS_OK or why it could not be queued. */
int slot_send_reset(slot *s);

/* pool_stats.c */
/* A request's outcome is decided and its callback about to fire: count it, and tell the
 * acquire hook (code PGS_OK: granted). */
void pool_req_outcome(pgs_pool *p, pgs_pool_req *r, pgs_code code);
/* Fill r->err for a request whose wait ran out: PGS_ETIMEDOUT, or PGS_ECONNECT with the last
 * connect (or setup) failure, naming the limit it hit and the pool's state. */
void pool_timeout_error(pgs_pool *p, pgs_pool_req *r);
/* The same for any wait that ran out (the multiplexed mode's too): "no <what> within <ms> ms
 * (<limit>; <state>)", with the last connect failure when there is one. */
void pool_wait_error(pgs_pool *p, pgs_error *err, const char *what, int timeout_ms,
                     const char *limit, const char *state);
/* Fill r->err for a request failed at once by the pool (PGS_ECANCELED, PGS_ECLOSED). */
void pool_failed_error(pgs_pool *p, pgs_pool_req *r, pgs_code code);

/* What pool_replaced counts besides telling the hook. */
enum {
    REPLACED_COUNT = 1, /* in `replaced` (not: retired for idle time, or a failed setup) */
    REPLACED_LOST = 2,  /* in `lost`: the connection was lost */
};
/* A connection the pool closes (or its user closed) and will not reuse: count it, and tell
 * the conn_replaced hook why (NULL: retired, or the user's own close of a dirty guard). */
void pool_replaced(slot *s, int counts, const pgs_error *why);

#endif

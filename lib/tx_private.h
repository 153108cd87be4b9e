/* Internal: what the transaction layer's files share (tx.c, the guards; tx_cancel.c, cancel
 * and time limits; tx_shared.c, transactions pipelined on a shared session; tx_run.c,
 * pgs_run_tx and its retries). The pool sees only tx.h. */
#ifndef PGS_TX_PRIVATE_H
#define PGS_TX_PRIVATE_H

#include "conn.h"
#include "loop.h"
#include "tx.h"

typedef struct run run;

enum {
    DEFAULT_COMMIT_GRACE_MS = 5000,
    STMT = CONN_NO_SYNC | CONN_FLUSH, /* inside a transaction: no sync, results sent at once */
};

typedef enum tx_state {
    TX_OPEN,     /* statements welcome */
    TX_SETTLING, /* a child's end: waiting for its own results before it decides */
    TX_ENDING,   /* end statements sent: waiting for their replies and any stragglers */
    TX_DONE,     /* done is scheduled */
} tx_state;

typedef enum op_kind {
    K_BEGIN, /* BEGIN or SAVEPOINT */
    K_SETUP, /* SET LOCAL-style settings sent with BEGIN */
    K_USER,
    K_TXID,
    K_COMMIT,
    K_ROLLBACK,
    K_RELEASE,
    K_ROLLBACK_TO,
} op_kind;

/* COMMIT's life: the outcome reported follows from where COMMIT got to (commit_replied). */
typedef enum commit_phase {
    CM_NONE,     /* not queued */
    CM_HELD,     /* queued behind a plug (a settling savepoint, BEGIN sent alone): not handed
                    to libpq, so it cannot have reached the server */
    CM_SENT,     /* handed to libpq: it may have reached the server */
    CM_ANSWERED, /* its reply came, or proof that the server never ran it */
} commit_phase;

struct pgs_tx {
    pgs_conn *conn; /* root only (children use the root's); NULL once the guard was freed */
    pgs_tx *parent;
    pgs_tx *child; /* the open child (LIFO: at most one) */
    int children_ending; /* ended children whose end statements are still out */
    int plug;            /* a settling child's hold on later statements */
    run *run; /* the pgs_run_tx driving this guard, or NULL */
    tx_state state;
    pgs_tx_opts opts; /* the root's, for children too */
    char savepoint[40];
    unsigned next_savepoint; /* root: names for children */
    pgs_tx_cb on_begun;
    void *begun_arg;
    pgs_tx_done_cb done;
    void *done_arg;
    int inflight; /* statements of this guard whose callbacks have not fired */
    int ok;       /* what the end asked */
    int failed;   /* first failure in err */
    pgs_error err;
    int orphan; /* ended by its parent: no done; freed with its parent, after the parent's */
    pgs_tx *orphans;     /* such children of this one, done, waiting to be freed with it */
    pgs_tx *next_orphan;
    commit_phase commit;  /* root */
    pgs_code cancel_code; /* root: PGS_ECANCELED / PGS_ETIMEDOUT once cancelled */
    int in_grace;         /* root: cancelled with COMMIT out; waiting for its reply */
    int cancel_grace;     /* root, shared: cancelled with statements out; waiting for them */
    int ahead;            /* root: statements of the tree queued before COMMIT, unanswered */
    int settling;         /* root: children holding later statements back (a plug) */
    pgs_tx_outcome outcome;
    char xid[48];
    loop_ev *defer; /* done, from the loop */
    const pgs_hooks *hooks; /* its connection's tracing hooks, or NULL */
    long long t0_us;        /* begun at (with hooks only) */
    loop_ev *timer; /* root: the whole-transaction timeout, then the commit grace */
    int server_aborted; /* root: the server refused one of its statements: it cannot commit */
    int xact; /* root: its status as pgs_conn_txstatus gives it (INTRANS, INERROR) */
    /* root: BEGIN's answer. A COMMIT after a sync runs whatever the session holds: when BEGIN
     * never ran (skipped, refused) it finds no transaction and still answers "COMMIT". */
    int begun;       /* BEGIN succeeded */
    long long deadline_us; /* root: when its time limit passes (tx_now_us; 0: none) */
    int waiting_replay;    /* root, shared: skipped whole, queued to be sent again */
    int begin_unrun; /* BEGIN certainly did not start the transaction (the server said so) */
    /* root, on a session shared by pipelined transactions (tx_shared.c): */
    const tx_share *share; /* NULL otherwise */
    void *share_arg;
    int share_attempts;
    int recording;        /* inside its body's call: statements kept, sent when it returns */
    int end_owed;         /* ended while recording (or replayed): the end goes with the rest */
    int end_alone;        /* shared: its end goes in a segment of its own (else carried on) */
    pgs_tx *before; /* the batched one placed just before it, whose end goes out first */
    int batched;          /* sent whole in one go, behind others in their pipeline segment */
    int victim;           /* batched, and its BEGIN skipped: a neighbour's error, so replayed */
    int user_fired;       /* a statement callback of it fired (it cannot be replayed then) */
    int replays;
    struct tx_rec *recs; /* the statements kept (a batched one's, until its end, to replay) */
    struct tx_rec **rec_tail;
};

typedef struct tx_op {
    pgs_tx *tx;
    op_kind kind;
    pgs_result_cb cb;
    void *arg;
} tx_op;


/* tx.c: the guards */
pgs_tx *root_of(pgs_tx *tx);
pgs_conn *conn_of(pgs_tx *tx); /* NULL when the guard was closed and freed under it */
void note_failure(pgs_tx *tx, const pgs_error *e);
void note_failure_code(pgs_tx *tx, pgs_code code, const char *msg);
void note_unsent(pgs_tx *tx, const char *what, int rc);
/* Queue one statement of the guard, a COPY or stream when bulk is set (PGS_OK, or why not:
 * its callback then never fires). */
int send_any(pgs_tx *tx, op_kind kind, const char *sql, int nparams, const char *const *values,
             int flags, const conn_bulk_spec *bulk, pgs_copy **out, pgs_result_cb cb, void *arg);
/* Queue one statement of the guard (PGS_OK, or why not: its callback then never fires). */
int send_stmt(pgs_tx *tx, op_kind kind, const char *sql, int nparams, const char *const *values,
              int flags, pgs_result_cb cb, void *arg);
/* BEGIN with the options, and what goes with it: from here the transaction counts as open. */
int send_begin(pgs_tx *tx);
void progress(pgs_tx *tx);
void end_root(pgs_tx *tx);
void tx_free(pgs_tx *tx);
/* A root guard on conn, which it owns from here; BEGIN sent unless the share records. */
int begin_root(pgs_conn *conn, const pgs_tx_opts *opts, pgs_tx_cb on_begun, void *arg,
               const tx_share *share, void *share_arg, int attempts, pgs_tx **out);
/* The options and the connection a transaction guard can begin with (PGS_OK, or the code
 * pgs_tx_begin would return), and the run a guard reports its end to. */
int tx_check_conn(pgs_conn *conn);
void tx_attach_run(pgs_tx *tx, run *r);

/* The root's timer (its time limit, then a grace), made when first armed: 0, or -1 (no
 * memory, or no connection to make it on). */
int arm_timer(pgs_tx *root, int ms);

/* tx_cancel.c: the whole-transaction time limit and the commit grace (the root's timer) */
void tx_on_timer(void *arg, int what);

/* tx_shared.c */
/* The end is queued: on a shared session the next transaction may follow at once. */
void end_queued(pgs_tx *tx);
/* On a shared session, around a body or callback of root's tree: pgs_conn_txstatus gives
 * root's own status (on), or the session's again (off). Nothing on other sessions. */
void tx_view(pgs_tx *root, pgs_conn *c, int on);
long long tx_now_us(void); /* the monotonic clock, in microseconds */
/* tx_shared.c: a skipped transaction that may not run again (cancelled, out of time) ends
 * ROLLED_BACK with that code, its callbacks told why (1); else 0. From its done event. */
int victim_expired(pgs_tx *tx);
/* tx_shared.c: a transaction queued to be sent again is cancelled or out of time: out of the
 * queue, ROLLED_BACK with the code (its done from the loop). */
void drop_waiting(pgs_tx *root, pgs_code code);
/* tx_cancel.c: a cancelled shared transaction's COMMIT held behind the plug about to be pulled
 * must never leave: the connection is closed instead (1), everything ahead answered. */
int tx_kill_before_commit(pgs_tx *root);
/* pgs_tx_query while the body records. */
int record_stmt(pgs_tx *tx, const char *sql, int nparams, const char *const *values,
                pgs_result_cb cb, void *arg);
/* Send what the body recorded now, on a segment of its own (before a savepoint, a bulk
 * statement or a cancel, which need the transaction on the server). */
void emit_alone(pgs_tx *tx);
/* A batched transaction whose BEGIN was skipped ended: run it again, or fail it. */
void replay_victim(pgs_tx *tx);
/* The callbacks of statements that could not be sent (from the done event, first). */
void fire_unsent(pgs_tx *tx);
void free_recs(pgs_tx *tx);

/* tx_run.c: a guard of the run ended (its outcome, owned by the caller); the connection guard
 * the run holds was freed under it. */
void run_after(run *r, pgs_tx_result *res);
int run_attempts(const run *r); /* the body's runs so far */
void run_conn_freed(void *owner);

#endif

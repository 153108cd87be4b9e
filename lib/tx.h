/* Internal: what the pool needs of the transaction layer beyond the public API (pgs_pool_run_tx
 * moves a retry to another guard when the first one's connection died). */
#ifndef PGS_TX_H
#define PGS_TX_H

#include <stdint.h>

#include "pgscope.h"

/* pgs_run_tx, continuing after `prior` (NULL: a first run): a retry of a transaction whose
 * connection died after a serialization failure or deadlock. Its attempts carry on from
 * prior->attempts, the first one after the backoff that retry owes, and should the new
 * connection die before it, done reports prior's outcome. */
int tx_run(pgs_conn *conn, const pgs_tx_opts *opts, pgs_tx_body body, pgs_tx_done_cb done,
           void *arg, const pgs_tx_result *prior);

/* Are these transaction options valid (NULL: the defaults)? PGS_OK or PGS_EINVAL. */
int tx_check_opts(const pgs_tx_opts *o);

/* The pool's multiplexed mode: transactions pipelined on sessions they share (tx_shared.c). */
typedef struct tx_share {
    /* The transaction's end is queued: the session may take the next transaction
     * (conn_between says when). Fires inside pgs_tx_end or tx_body_returned: it must not call
     * the user. */
    void (*ended)(void *arg);
    /* The outcome, from the loop, after the guard's own done; the guard is gone. */
    void (*done)(void *arg, const pgs_tx_result *res);
    /* None of it ran (a transaction before it in its pipeline segment failed): it waits to be
     * sent again, whole, with tx_replay (or failed with tx_abandon). From the loop. */
    void (*again)(void *arg);
    /* Queued by `again`, it was cancelled or ran out of time: out of the queue (its done
     * follows from the loop). Inside pgs_tx_cancel or from the loop: must not call the user. */
    void (*dropped)(void *arg);
} tx_share;

/* Begin a root transaction on a shared session, behind the transactions in flight on it
 * (conn_between(conn, before) must hold: else PGS_EMISUSE, or PGS_ECONN when the connection is
 * gone; before: the carried transaction placed last, or NULL). Its
 * statements are kept until tx_body_returned; it owns the session until its end is queued.
 * Its result reports `attempts`. */
int tx_begin_shared(pgs_conn *conn, const pgs_tx_opts *opts, const tx_share *share, void *arg,
                    int attempts, pgs_tx *before, pgs_tx **out);
/* The body returned: send the transaction, with its end when the body ended it. */
void tx_body_returned(pgs_tx *tx);
/* Run a shared transaction's body (pgs_conn_txstatus inside it gives the transaction's own
 * status, not the session's), then tx_body_returned. */
void tx_call_body(pgs_tx *tx, pgs_tx_body body, void *arg);
/* Send a transaction whose first run was skipped (share->again) on conn (conn_between). */
int tx_replay(pgs_tx *tx, pgs_conn *conn, pgs_tx *before);
/* After tx_body_returned (or tx_replay): a batched transaction whose end waits, owning the
 * session until then. The next transaction placed on the session takes it as `before` (from
 * then it owns the session): when it is sent, before's end goes first, into the same segment
 * when it is batched too, else alone. The batch's last one is sealed (tx_seal: its end alone,
 * in a segment of its own) before the loop turn ends. */
int tx_carried(const pgs_tx *tx);
void tx_seal(pgs_tx *tx);
/* Or give up on it: its callbacks and done report code and msg, ROLLED_BACK (from the loop). */
void tx_abandon(pgs_tx *tx, pgs_code code, const char *msg);

/* The wait before retry number `attempts` (the body has run that many times): exponential
 * backoff with full jitter from opts' retry_base_ms and retry_max_ms; *rng is the state. */
int tx_backoff_ms(const pgs_tx_opts *opts, int attempts, uint64_t *rng);

/* Rolled back by a serialization failure (40001) or deadlock (40P01): safe to run again. */
int tx_retryable(const pgs_tx_result *res);

#endif

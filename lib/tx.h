/* Internal: what the pool needs of the transaction layer beyond the public API (pgs_pool_run_tx
 * moves a retry to another guard when the first one's connection died). */
#ifndef PGS_TX_H
#define PGS_TX_H

#include "pgscope.h"

/* pgs_run_tx, continuing after `prior` (NULL: a first run): a retry of a transaction whose
 * connection died after a serialization failure or deadlock. Its attempts carry on from
 * prior->attempts, the first one after the backoff that retry owes, and should the new
 * connection die before it, done reports prior's outcome. */
int tx_run(pgs_conn *conn, const pgs_tx_opts *opts, pgs_tx_body body, pgs_tx_done_cb done,
           void *arg, const pgs_tx_result *prior);

/* Rolled back by a serialization failure (40001) or deadlock (40P01): safe to run again. */
int tx_retryable(const pgs_tx_result *res);

#endif

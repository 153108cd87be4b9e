/* Internal: what the transaction layer's files share (tx.c, the guards; tx_run.c, pgs_run_tx
 * and its retries). The pool sees only tx.h. */
#ifndef PGS_TX_PRIVATE_H
#define PGS_TX_PRIVATE_H

#include "tx.h"

typedef struct run run;

/* tx.c: the options and the connection a transaction guard can begin with (PGS_OK, or the
 * code pgs_tx_begin would return), and the run a guard reports its end to. */
int tx_check_conn(pgs_conn *conn);
void tx_attach_run(pgs_tx *tx, run *r);

/* tx_run.c: a guard of the run ended (its outcome, owned by the caller); the connection guard
 * the run holds was freed under it. */
void run_after(run *r, pgs_tx_result *res);
int run_attempts(const run *r); /* the body's runs so far */
void run_conn_freed(void *owner);

#endif

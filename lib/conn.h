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
};

/* pgs_query with flags. */
int conn_query(pgs_conn *c, const char *sql, int nparams, const char *const *values, int flags,
               pgs_result_cb cb, void *arg);

#endif

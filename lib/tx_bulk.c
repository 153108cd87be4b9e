/* COPY and streamed statements inside a transaction guard (pgs_tx_copy_in, pgs_tx_copy_out,
 * pgs_tx_query_stream): checked as pgs_tx_query, then sent through the guard's own path
 * (send_any) with the connection layer's bulk spec. A multiplexed body that starts one gets a
 * segment of its own first (emit_alone): its connection is then its alone until it ends. */
#include <stddef.h>

#include "tx_private.h"

#include "conn.h"

/* A COPY or streamed statement inside the transaction: checked as pgs_tx_query. */
static int tx_bulk(pgs_tx *tx, const char *sql, int nparams, const char *const *values,
                   const conn_bulk_spec *spec, pgs_result_cb done, void *arg, pgs_copy **out)
{
    if (out)
        *out = NULL;
    if (!tx || !sql || !done || nparams < 0 || (nparams > 0 && !values))
        return PGS_EINVAL;
    if (tx->state != TX_OPEN || tx->child)
        return PGS_EMISUSE;
    if (tx->recording)
        emit_alone(tx);
    return send_any(tx, K_USER, sql, nparams, values, STMT, spec, out, done, arg);
}

int pgs_tx_copy_in(pgs_tx *tx, const char *sql, pgs_copy_ready_cb on_ready, pgs_result_cb done,
                   void *arg, pgs_copy **out)
{
    conn_bulk_spec spec = {.kind = CONN_COPY_IN, .on_ready = on_ready, .arg = arg};
    return on_ready ? tx_bulk(tx, sql, 0, NULL, &spec, done, arg, out) : PGS_EINVAL;
}

int pgs_tx_copy_out(pgs_tx *tx, const char *sql, pgs_copy_data_cb on_data, pgs_result_cb done,
                    void *arg)
{
    conn_bulk_spec spec = {.kind = CONN_COPY_OUT, .on_data = on_data, .arg = arg};
    return on_data ? tx_bulk(tx, sql, 0, NULL, &spec, done, arg, NULL) : PGS_EINVAL;
}

int pgs_tx_query_stream(pgs_tx *tx, const char *sql, int nparams, const char *const *values,
                        int batch_rows, pgs_rows_cb on_rows, pgs_result_cb done, void *arg)
{
    conn_bulk_spec spec = {
        .kind = CONN_STREAM, .on_rows = on_rows, .arg = arg, .batch_rows = batch_rows};
    if (!on_rows || batch_rows < 0)
        return PGS_EINVAL;
    return tx_bulk(tx, sql, nparams, values, &spec, done, arg, NULL);
}

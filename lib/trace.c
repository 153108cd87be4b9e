/* Tracing on the connection layer: the statement hooks (start when queued, end just before its
 * callback, with its duration, rows and error) and the connection hooks (opened, lost). Only
 * statements of a connection with hooks carry a trace record (OP_TRACED), so without hooks
 * nothing here runs. The transaction and pool hooks are their layers'. */
#include <time.h>

#include "conn_private.h"

typedef struct op_trace {
    long long t0_us;
    char sql[]; /* the text, never the values */
} op_trace;

long long trace_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

void trace_start(pgs_conn *c, op *o, const char *sql)
{
    const pgs_hooks *h = c->opts.hooks;
    size_t n = strlen(sql) + 1;
    op_trace *t = malloc(sizeof *t + n);
    if (!t)
        return; /* untraced: tracing never fails a statement */
    t->t0_us = trace_now_us();
    memcpy(t->sql, sql, n);
    o->trace = t;
    o->flags |= OP_TRACED;
    if (h->stmt_start)
        h->stmt_start(c, sql, h->arg);
}

void trace_end(pgs_conn *c, op *o, const PGresult *res, const pgs_error *err)
{
    const pgs_hooks *h = c->opts.hooks;
    op_trace *t = o->trace;
    if (!h || !t || !h->stmt_end)
        return;
    const char *tuples = !err && res ? PQcmdTuples((PGresult *)res) : "";
    pgs_stmt_trace tr = {
        .sql = t->sql,
        .duration_us = trace_now_us() - t->t0_us,
        .rows = *tuples ? strtoll(tuples, NULL, 10) : -1,
        .err = err,
    };
    h->stmt_end(c, &tr, h->arg);
}

void trace_conn_open(pgs_conn *c, const pgs_error *err)
{
    const pgs_hooks *h = c->opts.hooks;
    if (h && h->conn_open)
        h->conn_open(c, err, h->arg);
}

void trace_conn_lost(pgs_conn *c, const pgs_error *err)
{
    const pgs_hooks *h = c->opts.hooks;
    if (h && h->conn_lost)
        h->conn_lost(c, err, h->arg);
}

const pgs_hooks *conn_hooks(pgs_conn *c)
{
    return c ? c->opts.hooks : NULL;
}

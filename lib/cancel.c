/* The cancel request: asks the server to stop what a guard's backend runs, without blocking
 * the loop (libpq 17's non-blocking cancel connection, or PQcancel on a worker thread before
 * it). The guard waits for it (bounded by cancel_timeout_ms) before it closes; conn.c decides
 * when to send one. */
#include "conn_private.h"

/* A cancel request in flight. It outlives nothing: the connection waits for it (bounded by
 * cancel_timeout_ms) before callbacks hear "cancelled" and before `done`. */
struct cancel_req {
    pgs_conn *conn;
#if PGS_HAVE_ASYNC_CANCEL
    PGcancelConn *cc;
    loop_ev *ev;
#else
    PGcancel *cancel;
    loop_job *job;
#endif
};

void cancel_finished(pgs_conn *c)
{
    c->cancel = NULL;
    loop_ev_stop(c->timer);
    if (c->finish_pending) /* the connection waited for the request: close it now */
        finish_if_due(c);
    loop_ev_post(c->defer);
}

#if !PGS_HAVE_ASYNC_CANCEL
/* libpq < 17 has only the blocking PQcancel, which libpq allows on another thread. */
static void cancel_work(void *arg)
{
    cancel_req *r = arg;
    char errbuf[256];
    PQcancel(r->cancel, errbuf, sizeof errbuf); /* failure is fine: the close follows anyway */
    PQfreeCancel(r->cancel);
    r->cancel = NULL;
}

static void cancel_done(void *arg)
{
    cancel_req *r = arg;
    pgs_conn *c = r->conn;
    free(r);
    cancel_finished(c);
}

/* Ask the server to stop what the backend runs. Call while c->pg is still open. */
void start_cancel(pgs_conn *c)
{
    cancel_req *r = calloc(1, sizeof *r);
    if (!r)
        return;
    r->conn = c;
    r->cancel = PQgetCancel(c->pg);
    if (r->cancel) {
        r->job = loop_job_start(c->base, cancel_work, cancel_done, r);
        if (r->job) {
            c->cancel = r;
            loop_ev_timer(c->timer, c->opts.cancel_timeout_ms);
            return;
        }
        PQfreeCancel(r->cancel);
    }
    free(r);
}

/* The request took too long (the server's address stalls): stop waiting; the worker frees
 * its part when PQcancel returns. */
void abandon_cancel(pgs_conn *c)
{
    loop_job_abandon(c->cancel->job, free);
    cancel_finished(c);
}
#else
/* libpq >= 17: the non-blocking cancel connection, polled on the loop like a connect. */
static void cancel_end(cancel_req *r)
{
    pgs_conn *c = r->conn;
    loop_ev_free(r->ev);
    PQcancelFinish(r->cc);
    free(r);
    cancel_finished(c);
}

static int cancel_watch(cancel_req *r, PostgresPollingStatusType st)
{
    if (st != PGRES_POLLING_READING && st != PGRES_POLLING_WRITING)
        return -1;
    return loop_ev_watch_once(r->ev, PQcancelSocket(r->cc),
                              st == PGRES_POLLING_READING ? LOOP_READ : LOOP_WRITE);
}

static void cancel_poll(void *arg, int what)
{
    (void)what;
    cancel_req *r = arg;
    if (cancel_watch(r, PQcancelPoll(r->cc)) != 0)
        cancel_end(r);
}

void start_cancel(pgs_conn *c)
{
    cancel_req *r = calloc(1, sizeof *r);
    if (!r)
        return;
    r->conn = c;
    r->cc = PQcancelCreate(c->pg);
    r->ev = r->cc ? loop_ev_new(c->base, cancel_poll, r) : NULL;
    if (!r->ev || !PQcancelStart(r->cc) || cancel_watch(r, PGRES_POLLING_WRITING) != 0) {
        loop_ev_free(r->ev);
        PQcancelFinish(r->cc);
        free(r);
        return;
    }
    c->cancel = r;
    loop_ev_timer(c->timer, c->opts.cancel_timeout_ms);
}

void abandon_cancel(pgs_conn *c)
{
    cancel_end(c->cancel);
}
#endif

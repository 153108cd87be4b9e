/* The pool's multiplexed mode (pgs_pool_opts.multiplex): pgs_pool_run_tx's transactions
 * pipelined on connections they share. Requests wait in one FIFO; each goes to the first
 * connection in use with room (mux_depth), its body run from the loop, and a body that ends at
 * once lets the next follow it on the same connection in the same write. The connections
 * ("carriers") are the pool's own guards, acquired as needed and given back after a second
 * idle. Sits on the pool (pool_private.h: its limits, counters and close) and the transaction
 * layer's shared begin (tx.h). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "pool_private.h"
#include "tx.h"

enum { DEFAULT_MUX_DEPTH = 16, CARRIER_LINGER_MS = 1000 };

typedef struct carrier carrier;

typedef struct mux_req {
    struct mux_req *prev, *next; /* the queue, or the list of retries backing off */
    struct mux *mux;
    pgs_tx_opts opts;
    pgs_tx_body body;
    pgs_tx_done_cb done;
    void *arg;
    carrier *on; /* where its transaction runs */
    pgs_tx *tx;  /* its transaction, while it runs */
    int replay;  /* its transaction waits to be sent again (its first sending was skipped) */
    int attempts;
    int backing_off;
    double deadline; /* when its wait ends (< 0: never) */
    loop_ev *backoff; /* a retry's wait (made when first needed) */
    pgs_tx_result last; /* the attempt that asked for the retry */
    pgs_error last_err;
    pgs_error err; /* why it failed, once it did */
    uint64_t rng;
} mux_req;

typedef struct req_list {
    mux_req *head, *tail;
    int n;
} req_list;

struct carrier {
    carrier *prev, *next;
    struct mux *mux;
    pgs_conn *conn;
    int inflight;  /* its transactions whose outcome is not reported yet */
    pgs_tx *carried; /* the last one placed, its end owed (tx_carried): it owns the session */
    int releasing; /* given back: gone when the close's done fires */
    double idle_since;
};

/* A connection asked of the pool for carrying transactions, not granted yet. */
typedef struct asking {
    struct asking *prev, *next;
    struct mux *mux;
    pgs_pool_req *req;
} asking;

struct mux {
    pgs_pool *pool;
    asking *asks; /* the acquires in flight (`acquiring` of them) */
    int depth;
    req_list queue;   /* waiting for a place, in order */
    req_list backing; /* retries waiting out their backoff */
    req_list failed;  /* failed by the pool's close: reported from the loop */
    carrier *carriers;
    int ncarriers; /* carriers not being released */
    int acquiring;
    int dispatching;
    int timer_armed;
    int linger_armed;
    loop_ev *dispatch_ev;
    loop_ev *timer;  /* the first wait's end */
    loop_ev *linger; /* idle carriers go back */
    loop_ev *report; /* the failed ones' done */
};

static void req_unlink(req_list *l, mux_req *r)
{
    if (r->prev)
        r->prev->next = r->next;
    else
        l->head = r->next;
    if (r->next)
        r->next->prev = r->prev;
    else
        l->tail = r->prev;
    r->prev = r->next = NULL;
    l->n--;
}

static void req_push(req_list *l, mux_req *r)
{
    r->next = NULL;
    r->prev = l->tail;
    if (l->tail)
        l->tail->next = r;
    else
        l->head = r;
    l->tail = r;
    l->n++;
}

static void req_insert_before(req_list *l, mux_req *at, mux_req *r)
{
    r->next = at;
    r->prev = at->prev;
    if (at->prev)
        at->prev->next = r;
    else
        l->head = r;
    at->prev = r;
    l->n++;
}

static void req_push_front(req_list *l, mux_req *r)
{
    r->prev = NULL;
    r->next = l->head;
    if (l->head)
        l->head->prev = r;
    else
        l->tail = r;
    l->head = r;
    l->n++;
}

/* ---- reporting ---- */

/* The request's end: done with its outcome, then it is gone (the pool outlives it). */
static void req_finish(mux_req *r, const pgs_tx_result *res)
{
    pgs_pool *p = r->mux->pool;
    pgs_tx_done_cb done = r->done;
    void *arg = r->arg;
    pgs_tx_result out = *res;
    pgs_error e;
    if (res->err) {
        e = *res->err;
        out.err = &e;
    }
    loop_ev_free(r->backoff);
    free(r);
    done(&out, arg);
    pool_outstanding_done(p);
}

/* It ends without (another) transaction: r->err says why. After a retryable failure the
 * attempt that asked for the retry is the outcome, and the message says why it stands. */
static void req_fail(mux_req *r)
{
    pgs_tx_result res = {.outcome = PGS_TX_ROLLED_BACK, .err = &r->err, .attempts = r->attempts};
    if (r->attempts > 0) {
        char msg[sizeof r->err.message * 2 + 32];
        snprintf(msg, sizeof msg, "%s; not retried: %s", r->last_err.message, r->err.message);
        pgs_error e;
        err_set(&e, r->last_err.code, r->last_err.sqlstate, msg, NULL);
        r->err = e;
        memcpy(res.xid, r->last.xid, sizeof res.xid);
    }
    req_finish(r, &res);
}

static void on_report(void *arg, int what)
{
    (void)what;
    struct mux *m = arg;
    for (mux_req *r; (r = m->failed.head);) {
        req_unlink(&m->failed, r);
        req_fail(r);
    }
}

/* ---- carriers ---- */

static double now_ms(void)
{
    return pool_now_ms();
}

static void carrier_gone(void *arg)
{
    carrier *c = arg;
    struct mux *m = c->mux;
    pgs_pool *p = m->pool;
    if (c->prev)
        c->prev->next = c->next;
    else
        m->carriers = c->next;
    if (c->next)
        c->next->prev = c->prev;
    free(c);
    pool_outstanding_done(p);
}

/* Back to the pool (reset there, or closed when it is not clean: dead, or spoiled by a cancel
 * request). */
static void carrier_release(carrier *c)
{
    struct mux *m = c->mux;
    c->releasing = 1;
    m->ncarriers--;
    m->pool->outstanding++; /* until its close's done */
    if (pgs_conn_close(c->conn, carrier_gone, c) != PGS_OK)
        carrier_gone(c);
}

static void arm_linger(struct mux *m)
{
    if (!m->linger_armed) { /* (not pushed back by every dispatch: it checks each one's idle time) */
        m->linger_armed = 1;
        loop_ev_timer(m->linger, CARRIER_LINGER_MS);
    }
}

/* A carrier with nothing in flight: given back when it cannot take another transaction (its
 * connection died, or a cancel request spoiled it) or the pool closes; otherwise it lingers. */
static void carrier_settle(carrier *c)
{
    struct mux *m = c->mux;
    if (c->inflight > 0 || c->releasing)
        return;
    c->idle_since = now_ms();
    if (m->pool->closing || !conn_between(c->conn, NULL))
        carrier_release(c);
    else if (!m->queue.head)
        arm_linger(m);
}

static void on_linger(void *arg, int what)
{
    (void)what;
    struct mux *m = arg;
    double now = now_ms();
    int left = 0;
    m->linger_armed = 0;
    for (carrier *c = m->carriers, *next; c; c = next) {
        next = c->next;
        if (c->releasing || c->inflight > 0)
            continue;
        if (now - c->idle_since >= CARRIER_LINGER_MS - 1 || !conn_between(c->conn, NULL))
            carrier_release(c);
        else
            left = 1;
    }
    if (left)
        arm_linger(m);
}

static void dispatch(struct mux *m);

static void carrier_acquired(pgs_conn *conn, const pgs_error *err, void *arg)
{
    asking *a = arg;
    struct mux *m = a->mux;
    if (a->prev)
        a->prev->next = a->next;
    else
        m->asks = a->next;
    if (a->next)
        a->next->prev = a->prev;
    free(a);
    m->acquiring--;
    if (err) {
        /* The pool closed (the requests heard of it), or could not give one; or stop_asking
         * cancelled it while requests came in, which acquire_more did not ask for then (it
         * counted this one): ask now. */
        if (err->code == PGS_ECANCELED && m->queue.head && !m->pool->closing)
            dispatch(m);
        return;
    }
    carrier *c = calloc(1, sizeof *c);
    if (!c) {
        pgs_conn_close(conn, NULL, NULL);
        return;
    }
    c->mux = m;
    c->conn = conn;
    c->idle_since = now_ms();
    /* Last in the list: the first ones fill up first, so few connections carry deep
     * pipelines. */
    carrier **at = &m->carriers;
    carrier *prev = NULL;
    while (*at) {
        prev = *at;
        at = &(*at)->next;
    }
    c->prev = prev;
    *at = c;
    m->ncarriers++;
    dispatch(m);
}

/* Every carrier is full or held: ask the pool for more, as many as the waiting requests fill
 * (up to max_size). */
static void acquire_more(struct mux *m)
{
    pgs_pool *p = m->pool;
    int need = (m->queue.n + m->depth - 1) / m->depth;
    while (m->acquiring < need && m->ncarriers + m->acquiring < p->opts.max_size) {
        asking *a = calloc(1, sizeof *a);
        if (!a)
            break;
        a->mux = m;
        if (pgs_pool_acquire_within(p, -1, carrier_acquired, a, &a->req) != PGS_OK) {
            free(a);
            break; /* (max_waiting full of other requests: the next dispatch tries again) */
        }
        a->next = m->asks;
        if (m->asks)
            m->asks->prev = a;
        m->asks = a;
        m->acquiring++;
    }
}

/* Nobody waits any more: the acquires still in flight are not needed (they would hold a place
 * in the pool's queue, and a connection when granted). Their callbacks fire from the loop. */
static void stop_asking(struct mux *m)
{
    for (asking *a = m->asks; a; a = a->next)
        if (a->req) {
            pgs_pool_acquire_cancel(a->req);
            a->req = NULL;
        }
}

/* ---- transactions ---- */

static void tx_ended(void *arg)
{
    mux_req *r = arg;
    if (!r->mux->dispatching)
        loop_ev_post(r->mux->dispatch_ev); /* its carrier may take the next now */
}

static void on_backoff(void *arg, int what)
{
    (void)what;
    mux_req *r = arg;
    struct mux *m = r->mux;
    req_unlink(&m->backing, r);
    r->backing_off = 0;
    int timeout = m->pool->opts.acquire_timeout_ms;
    r->deadline = timeout < 0 ? -1 : now_ms() + timeout;
    req_push_front(&m->queue, r); /* it was asked for before those waiting now */
    dispatch(m);
}

static void tx_finished(void *arg, const pgs_tx_result *res)
{
    mux_req *r = arg;
    struct mux *m = r->mux;
    carrier *c = r->on;
    r->on = NULL;
    r->tx = NULL;
    if (c) { /* (none for one abandoned while it waited to be sent again) */
        c->inflight--;
        carrier_settle(c);
    }
    if (tx_retryable(res) && r->attempts <= r->opts.retries && !m->pool->closing) {
        /* Rolled back, so safe to run again: after its backoff, at the head of the queue. */
        r->last = *res;
        r->last.err = NULL;
        if (res->err)
            r->last_err = *res->err;
        if (!r->backoff && !(r->backoff = loop_ev_new(m->pool->base, on_backoff, r))) {
            req_finish(r, res);
            return;
        }
        r->backing_off = 1;
        req_push(&m->backing, r);
        loop_ev_timer(r->backoff, tx_backoff_ms(&r->opts, r->attempts, &r->rng));
    } else {
        req_finish(r, res);
    }
    if (m->queue.head)
        loop_ev_post(m->dispatch_ev);
}

/* Its transaction was skipped whole: send it again, first in line (it never ran). */
static void tx_again(void *arg)
{
    mux_req *r = arg;
    struct mux *m = r->mux;
    carrier *c = r->on;
    r->on = NULL;
    c->inflight--;
    carrier_settle(c);
    if (m->pool->closing) {
        tx_abandon(r->tx, PGS_ECLOSED, "not run: the pool was closed before it could run again");
        return;
    }
    r->replay = 1;
    r->deadline = -1; /* (its own time limit runs on: the transaction's timer) */
    /* First in line, but behind the others waiting to run again (a retry may have gone to the
     * head between them): skipped ones keep their order. */
    mux_req *last = NULL;
    for (mux_req *q = m->queue.head; q; q = q->next)
        if (q->replay)
            last = q;
    if (!last)
        req_push_front(&m->queue, r);
    else if (last->next)
        req_insert_before(&m->queue, last->next, r);
    else
        req_push(&m->queue, r);
    if (!m->dispatching)
        loop_ev_post(m->dispatch_ev);
}

/* Its transaction, queued to run again, was cancelled or ran out of time (tx_share). */
static void tx_dropped(void *arg)
{
    mux_req *r = arg;
    if (r->replay) {
        req_unlink(&r->mux->queue, r);
        r->replay = 0;
    }
}

static const tx_share share = {tx_ended, tx_finished, tx_again, tx_dropped};

/* Begin the request's transaction on the carrier and run its body. Returns 0, or -1 when the
 * carrier could not take it (the request is back at the head of the queue). */
/* The end of the dispatch: each batch's last end goes alone, in a segment of its own. */
static void seal_all(struct mux *m)
{
    for (carrier *c = m->carriers; c; c = c->next) {
        pgs_tx *t = c->carried;
        if (t) {
            c->carried = NULL;
            tx_seal(t);
        }
    }
}

static int start(struct mux *m, carrier *c, mux_req *r)
{
    /* The one placed last, whose end waits, goes with the new one (tx_begin_shared). */
    pgs_tx *before = c->carried;
    if (r->replay) {
        if (tx_replay(r->tx, c->conn, before) != PGS_OK) {
            req_push_front(&m->queue, r);
            return -1;
        }
        c->carried = NULL;
        r->replay = 0;
        r->on = c;
        c->inflight++;
        if (tx_carried(r->tx))
            c->carried = r->tx;
        return 0;
    }
    pgs_tx *tx;
    int rc = tx_begin_shared(c->conn, &r->opts, &share, r, r->attempts + 1, before, &tx);
    if (rc != PGS_OK) {
        if (rc == PGS_ENOMEM) {
            err_set(&r->err, rc, NULL, "could not begin the transaction", NULL);
            req_fail(r);
            return 0;
        }
        req_push_front(&m->queue, r);
        return -1;
    }
    c->carried = NULL;
    r->attempts++;
    r->on = c;
    r->tx = tx;
    c->inflight++;
    tx_call_body(tx, r->body, r->arg); /* the next may follow at once if it ended the tx */
    if (tx_carried(tx))
        c->carried = tx;
    return 0;
}

static carrier *with_room(struct mux *m)
{
    for (carrier *c = m->carriers; c; c = c->next)
        /* One with nothing in flight may have died idle unnoticed: read what the server sent
         * (EOF, its FATAL) first, as the pool does before a grant. */
        if (!c->releasing && c->inflight < m->depth && conn_between(c->conn, c->carried) &&
            (c->inflight > 0 || conn_probe(c->conn)))
            return c;
    return NULL;
}

/* The earliest wait's end, for the timer (the queue is in order of asking, but a retry goes
 * to its head with a later end). */
static void arm_timer(struct mux *m)
{
    double first = -1;
    for (mux_req *r = m->queue.head; r; r = r->next)
        if (r->deadline >= 0 && (first < 0 || r->deadline < first))
            first = r->deadline;
    m->timer_armed = first >= 0;
    if (m->timer_armed) {
        double left = first - now_ms();
        loop_ev_timer(m->timer, left > 1 ? (int)left + 1 : 1);
    }
}

static void dispatch(struct mux *m)
{
    pgs_pool *p = m->pool;
    if (m->dispatching)
        return;
    m->dispatching = 1;
    carrier *c = NULL;
    while (m->queue.head && !p->closing) {
        if (!c || c->releasing || c->inflight >= m->depth || !conn_between(c->conn, c->carried))
            c = with_room(m);
        if (!c)
            break;
        mux_req *r = m->queue.head;
        req_unlink(&m->queue, r);
        if (start(m, c, r) != 0)
            c = NULL;
    }
    seal_all(m);
    m->dispatching = 0;
    for (carrier *k = m->carriers, *next; k; k = next) {
        next = k->next;
        carrier_settle(k); /* (dead ones with nothing in flight go back) */
    }
    if (m->queue.head && !p->closing) {
        acquire_more(m);
        if (!m->timer_armed)
            arm_timer(m);
    } else if (!m->queue.head && m->asks) {
        stop_asking(m);
    }
}

static void on_dispatch(void *arg, int what)
{
    (void)what;
    dispatch(arg);
}

/* Requests whose wait ran out: PGS_ETIMEDOUT, or PGS_ECONNECT while new connections fail. */
static void on_timer(void *arg, int what)
{
    (void)what;
    struct mux *m = arg;
    pgs_pool *p = m->pool;
    m->timer_armed = 0;
    double now = now_ms();
    req_list expired = {0};
    for (mux_req *r = m->queue.head, *next; r; r = next) {
        next = r->next;
        if (r->deadline >= 0 && r->deadline <= now + 0.5) {
            req_unlink(&m->queue, r);
            req_push(&expired, r);
        }
    }
    for (mux_req *r; (r = expired.head);) {
        req_unlink(&expired, r);
        char state[128];
        snprintf(state, sizeof state,
                 "max_size %d, %d connections carrying transactions, %d waiting",
                 p->opts.max_size, m->ncarriers, m->queue.n + expired.n + 1);
        pool_wait_error(p, &r->err, "place for the transaction", p->opts.acquire_timeout_ms,
                        "the pool's acquire_timeout_ms", state);
        req_fail(r);
    }
    if (m->queue.head && !m->timer_armed)
        arm_timer(m);
}

/* ---- the pool's side ---- */

static struct mux *mux_new(pgs_pool *p)
{
    struct mux *m = calloc(1, sizeof *m);
    if (!m)
        return NULL;
    m->pool = p;
    m->depth = p->opts.mux_depth > 0 ? p->opts.mux_depth : DEFAULT_MUX_DEPTH;
    m->dispatch_ev = loop_ev_new(p->base, on_dispatch, m);
    m->timer = loop_ev_new(p->base, on_timer, m);
    m->linger = loop_ev_new(p->base, on_linger, m);
    m->report = loop_ev_new(p->base, on_report, m);
    if (!m->dispatch_ev || !m->timer || !m->linger || !m->report) {
        mux_free(m);
        return NULL;
    }
    return m;
}

int mux_run_tx(pgs_pool *p, const pgs_tx_opts *opts, pgs_tx_body body, pgs_tx_done_cb done,
               void *arg)
{
    if (tx_check_opts(opts) != PGS_OK)
        return PGS_EINVAL;
    if (p->closing) {
        snprintf(p->refusal, sizeof p->refusal, "the pool is closing");
        return PGS_ECLOSED;
    }
    if (!p->mux && !(p->mux = mux_new(p)))
        return PGS_ENOMEM;
    struct mux *m = p->mux;
    if (p->opts.max_waiting > 0 && m->queue.n >= p->opts.max_waiting) {
        p->counters.refused_busy++;
        snprintf(p->refusal, sizeof p->refusal,
                 "too many transactions waiting (max_waiting %d; max_size %d, mux_depth %d)",
                 p->opts.max_waiting, p->opts.max_size, m->depth);
        return PGS_EBUSY;
    }
    mux_req *r = calloc(1, sizeof *r);
    if (!r)
        return PGS_ENOMEM;
    r->mux = m;
    if (opts)
        r->opts = *opts;
    r->body = body;
    r->done = done;
    r->arg = arg;
    int timeout = p->opts.acquire_timeout_ms;
    r->deadline = timeout < 0 ? -1 : now_ms() + timeout;
    r->rng = (uint64_t)(uintptr_t)r ^ ((uint64_t)time(NULL) << 32) ^ 0x9e3779b97f4a7c15ull;
    p->outstanding++; /* the pool outlives the request */
    req_push(&m->queue, r);
    if (!m->dispatching)
        loop_ev_post(m->dispatch_ev); /* the body runs from the loop, never inside this call */
    return PGS_OK;
}

void mux_close(pgs_pool *p)
{
    struct mux *m = p->mux;
    if (!m)
        return;
    const char *why = "the pool was closed while the transaction waited";
    for (mux_req *r; (r = m->queue.head);) {
        req_unlink(&m->queue, r);
        if (r->replay) {
            r->replay = 0;
            tx_abandon(r->tx, PGS_ECLOSED, "not run: the pool was closed before it could run again");
            continue;
        }
        err_set(&r->err, PGS_ECLOSED, NULL, why, NULL);
        req_push(&m->failed, r);
    }
    for (mux_req *r; (r = m->backing.head);) {
        req_unlink(&m->backing, r);
        loop_ev_stop(r->backoff);
        err_set(&r->err, PGS_ECLOSED, NULL, "the pool was closed during its backoff", NULL);
        req_push(&m->failed, r);
    }
    loop_ev_stop(m->timer);
    m->timer_armed = 0;
    if (m->failed.head)
        loop_ev_post(m->report);
    for (carrier *c = m->carriers, *next; c; c = next) {
        next = c->next;
        carrier_settle(c);
    }
}

void mux_free(struct mux *m)
{
    if (!m)
        return;
    loop_ev_free(m->dispatch_ev);
    loop_ev_free(m->timer);
    loop_ev_free(m->linger);
    loop_ev_free(m->report);
    free(m);
}

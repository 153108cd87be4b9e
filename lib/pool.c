/* The pool: connection guards handed out and taken back on one loop, with FIFO waiters,
 * limits, health (loss noticed at once, reconnects with backoff), setup statements for each new
 * connection, reset on return, and close. The top layer of the library: it uses the
 * connection layer (conn.h, as the guards' keeper) and the loop adapter; its counters, hooks
 * and failure messages are pool_stats.c's, pgs_pool_run_tx is pool_run.c's. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "pool_private.h"

enum {
    DEFAULT_MAX_SIZE = 10,
    DEFAULT_ACQUIRE_TIMEOUT_MS = 30000,
    DEFAULT_IDLE_TIMEOUT_MS = 300000,
    DEFAULT_MAX_LIFETIME_MS = 3600000,
    RETRY_FIRST_MS = 50,
    RETRY_MAX_MS = 2000,
};

static void slot_available(slot *s);

double pool_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* ---- lists ---- */

static void idle_push(slot *s)
{
    pgs_pool *p = s->pool;
    s->prev = NULL;
    s->next = p->idle;
    if (p->idle)
        p->idle->prev = s;
    p->idle = s;
    p->nidle++;
    s->state = SL_IDLE;
}

static void idle_remove(slot *s)
{
    pgs_pool *p = s->pool;
    if (s->prev)
        s->prev->next = s->next;
    else
        p->idle = s->next;
    if (s->next)
        s->next->prev = s->prev;
    s->prev = s->next = NULL;
    p->nidle--;
    loop_ev_stop(s->idle_timer);
}

static void wait_push(pgs_pool_req *r)
{
    pgs_pool *p = r->pool;
    r->next = NULL;
    r->prev = p->wait_tail;
    if (p->wait_tail)
        p->wait_tail->next = r;
    else
        p->wait_head = r;
    p->wait_tail = r;
    p->waiting++;
}

static void wait_push_front(pgs_pool_req *r)
{
    pgs_pool *p = r->pool;
    r->prev = NULL;
    r->next = p->wait_head;
    if (p->wait_head)
        p->wait_head->prev = r;
    else
        p->wait_tail = r;
    p->wait_head = r;
    p->waiting++;
}

static void wait_remove(pgs_pool_req *r)
{
    pgs_pool *p = r->pool;
    if (r->prev)
        r->prev->next = r->next;
    else
        p->wait_head = r->next;
    if (r->next)
        r->next->prev = r->prev;
    else
        p->wait_tail = r->prev;
    r->prev = r->next = NULL;
    p->waiting--;
}

/* ---- slots ---- */

static void maybe_finish(pgs_pool *p)
{
    if (p->closing && p->size == 0 && p->outstanding == 0)
        loop_ev_post(p->finish);
}

void pool_outstanding_done(pgs_pool *p)
{
    p->outstanding--;
    maybe_finish(p);
}

static void slot_free(slot *s)
{
    pgs_pool *p = s->pool;
    if (s->all_prev)
        s->all_prev->all_next = s->all_next;
    else
        p->all = s->all_next;
    if (s->all_next)
        s->all_next->all_prev = s->all_prev;
    if (s->state == SL_CLOSING)
        p->retiring--;
    loop_ev_free(s->idle_timer);
    free(s->setup);
    free(s);
    p->size--;
}

/* The pool's own close of a slot is done: make room, open a replacement if wanted. */
static void slot_gone(void *arg)
{
    slot *s = arg;
    pgs_pool *p = s->pool;
    slot_free(s);
    pool_dispatch(p);
    maybe_finish(p);
}

/* Close a slot's connection (really: the keeper lets go first). */
void slot_retire(slot *s)
{
    if (s->state == SL_CLOSING)
        return; /* already on its way out: slot_gone comes once */
    if (s->state == SL_IDLE)
        idle_remove(s);
    loop_ev_stop(s->idle_timer);
    s->state = SL_CLOSING;
    s->pool->retiring++;
    conn_set_keeper(s->conn, NULL, NULL);
    pgs_conn_close(s->conn, slot_gone, s); /* the pool's guards always accept this close */
}

/* The pool lets go of a connection it will not reuse: counted, the hook told, closed. */
void slot_replace(slot *s, int counts, const pgs_error *why)
{
    pool_replaced(s, counts, why);
    slot_retire(s);
}

/* Why a slot's connection cannot be used (for the hook and the counts): its error once it is
 * gone, else `fallback` (code rc) in *buf. */
static const pgs_error *unusable_why(slot *s, int rc, const char *fallback, pgs_error *buf,
                                     int *counts)
{
    const pgs_error *why = conn_error(s->conn);
    *counts = REPLACED_COUNT;
    if (why && why->code == PGS_ECONN && !s->failed_by_pool)
        *counts |= REPLACED_LOST;
    if (!why) {
        err_set(buf, rc, NULL, fallback, NULL);
        why = buf;
    }
    return why;
}

static int expired(const slot *s)
{
    int life = s->pool->opts.max_lifetime_ms;
    return life > 0 && pool_now_ms() - s->born >= life;
}

/* While idle: wake at the idle timeout or the end of its lifetime, whichever is first. */
static void arm_idle_timer(slot *s)
{
    pgs_pool *p = s->pool;
    double wait = p->opts.idle_timeout_ms > 0 ? p->opts.idle_timeout_ms : -1;
    if (p->opts.max_lifetime_ms > 0) {
        double left = s->born + p->opts.max_lifetime_ms - pool_now_ms();
        if (wait < 0 || left < wait)
            wait = left < 1 ? 1 : left;
    }
    if (wait > 0)
        loop_ev_timer(s->idle_timer, (int)wait);
}

static void on_idle_timeout(void *arg, int what)
{
    (void)what;
    slot *s = arg;
    pgs_pool *p = s->pool;
    if (s->state != SL_IDLE)
        return;
    if (expired(s)) {
        slot_replace(s, REPLACED_COUNT, NULL);
        pool_dispatch(p); /* min_size brings a fresh one */
    } else if (p->size - p->retiring > p->opts.min_size) {
        slot_replace(s, 0, NULL);
    } else {
        arm_idle_timer(s); /* kept for min_size: its lifetime still counts */
    }
}

/* ---- requests ---- */

/* A granted request's guard, just before it is delivered: alive, and its owed reset sent
 * now, so that the statements its user queues in the callback share the reset's pipeline
 * segment (one write and one sync for both; should the reset fail, the server skips them).
 * Returns 0, or -1 when it cannot be handed out (it is retired). */
static int ready_for_grant(pgs_pool *p, slot *s)
{
    /* Never grant a dead guard: read what the server sent first (EOF, its FATAL, the
     * failure of a reset still in flight), which a peek cannot tell from replies. */
    conn_refresh(s->conn);
    int rc = PGS_OK;
    if (s->reset_owed && conn_ready(s->conn)) {
        s->reset_owed = 0;
        rc = slot_send_reset(s);
    }
    if (rc == PGS_OK && conn_ready(s->conn))
        return 0;
    pgs_error buf;
    int counts;
    const pgs_error *why =
        unusable_why(s, rc, "the pool could not queue the session reset", &buf, &counts);
    p->in_use--;
    slot_replace(s, counts, why);
    return -1;
}

static void req_fire(void *arg, int what)
{
    (void)what;
    pgs_pool_req *r = arg;
    pgs_pool *p = r->pool;
    pgs_conn *conn = NULL;
    const pgs_error *err = &r->err;
    switch (r->state) {
    case RQ_WAITING: /* its timeout */
        pool_timeout_error(p, r);
        wait_remove(r);
        break;
    case RQ_GRANTED: {
        slot *s = r->granted;
        s->granted_to = NULL;
        if (ready_for_grant(p, s) != 0) {
            /* Died between the grant and now (or its reset could not be sent): never hand
             * out a dead or dirty one. Back to the head of the line, with the time it has
             * left. */
            r->state = RQ_WAITING;
            r->granted = NULL;
            wait_push_front(r);
            if (r->timeout_ms > 0) {
                double left = r->deadline - pool_now_ms();
                loop_ev_timer(r->ev, left > 1 ? (int)left : 1);
            }
            pool_dispatch(p);
            return;
        }
        conn = s->conn;
        err = NULL;
        conn_lend(conn);
        break;
    }
    case RQ_FAILED:
    case RQ_FIRING:
        break;
    }
    r->state = RQ_FIRING;
    pool_req_outcome(p, r, err ? err->code : PGS_OK);
    r->cb(conn, err, r->arg);
    loop_ev_free(r->ev);
    free(r);
    p->outstanding--;
    maybe_finish(p);
}

static void grant(pgs_pool_req *r, slot *s)
{
    pgs_pool *p = r->pool;
    wait_remove(r);
    r->state = RQ_GRANTED;
    r->granted = s;
    s->granted_to = r;
    s->state = SL_IN_USE;
    p->in_use++;
    loop_ev_stop(r->ev);
    loop_ev_post(r->ev);
}

static void fail_req(pgs_pool_req *r, pgs_code code)
{
    pool_failed_error(r->pool, r, code);
    if (r->state == RQ_WAITING)
        wait_remove(r);
    r->state = RQ_FAILED;
    loop_ev_stop(r->ev);
    loop_ev_post(r->ev);
}

/* ---- opening ---- */

static void on_retry(void *arg, int what)
{
    (void)what;
    pgs_pool *p = arg;
    p->retry_armed = 0;
    pool_dispatch(p);
}

/* A new connection failed (its connect or its setup): waiters hear why when their wait runs
 * out, and new ones are opened only after a backoff, so a down server is not hammered;
 * waiters and min_size bring us back. */
void pool_backoff(pgs_pool *p, const pgs_error *err)
{
    p->connect_failing = 1;
    p->connect_err = *err;
    if (!p->retry_armed && !p->closing) {
        p->retry_ms = p->retry_ms ? p->retry_ms * 2 : RETRY_FIRST_MS;
        if (p->retry_ms > RETRY_MAX_MS)
            p->retry_ms = RETRY_MAX_MS;
        p->retry_armed = 1;
        loop_ev_timer(p->retry, p->retry_ms);
    }
}

static void connect_failed(pgs_pool *p, const pgs_error *err)
{
    p->counters.connect_failures++;
    pool_backoff(p, err);
}

static void slot_lost(pgs_conn *conn, const pgs_error *err, void *arg)
{
    slot *s = arg;
    pgs_pool *p = s->pool;
    if (s->state == SL_IDLE) {
        /* Died while idle (terminated, server restart): never handed out; replace it. */
        slot_replace(s, REPLACED_COUNT | REPLACED_LOST, err);
        return;
    }
    /* (In use: counted when its user closes it, slot_freed. During its setup: setup_over.) */
    if (s->state == SL_IN_USE && !s->granted_to && p->opts.conn.on_lost)
        p->opts.conn.on_lost(conn, err, p->opts.conn.lost_arg);
}

/* A new connection is up and set up: reconnecting works again; to a waiter, or idle. */
void slot_ready(slot *s)
{
    pgs_pool *p = s->pool;
    p->connect_failing = 0;
    p->retry_ms = 0;
    slot_available(s);
}

static const conn_keeper keeper;

static void slot_opened(pgs_conn *conn, const pgs_error *err, void *arg)
{
    slot *s = arg;
    pgs_pool *p = s->pool;
    if (s->state != SL_CLOSING && !err) {
        p->counters.opened++;
        s->born = pool_now_ms();
        conn_set_keeper(conn, &keeper, s);
        s->state = SL_SETUP; /* neither connecting nor idle while on_connect runs */
        if (p->opts.on_connect)
            p->opts.on_connect(conn, p->opts.cb_arg);
        if (s->state != SL_CLOSING && p->nsetup) {
            slot_start_setup(s); /* still counted as connecting, until setup_over */
            return;
        }
    }
    p->connecting--;
    if (s->state == SL_CLOSING)
        return; /* the pool was closed meanwhile (from on_connect, say): slot_gone follows */
    if (err) {
        connect_failed(p, err);
        slot_retire(s);
        return;
    }
    slot_ready(s);
}

static slot *new_slot(pgs_pool *p)
{
    slot *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->pool = p;
    s->own.s = s;
    s->idle_timer = loop_ev_new(p->base, on_idle_timeout, s);
    if (s->idle_timer && p->nsetup && (s->setup = calloc((size_t)p->nsetup, sizeof *s->setup)))
        for (int i = 0; i < p->nsetup; i++)
            s->setup[i] = (stmt_ref){s, i + 1};
    if (!s->idle_timer || (p->nsetup && !s->setup)) {
        loop_ev_free(s->idle_timer);
        free(s->setup);
        free(s);
        return NULL;
    }
    return s;
}

static void open_slot(pgs_pool *p)
{
    slot *s = new_slot(p);
    if (!s) {
        pgs_error e;
        err_set(&e, PGS_ENOMEM, NULL, NULL, NULL);
        connect_failed(p, &e);
        return;
    }
    s->state = SL_CONNECTING;
    s->all_next = p->all;
    if (p->all)
        p->all->all_prev = s;
    p->all = s;
    p->size++;
    p->connecting++;
    pgs_conn_opts o = p->opts.conn;
    o.on_lost = slot_lost;
    o.lost_arg = s;
    if (p->opts.hooks)
        o.hooks = p->opts.hooks;
    if (pgs_conn_open(p->base, p->conninfo, &o, slot_opened, s, &s->conn) != PGS_OK) {
        p->connecting--;
        slot_free(s);
        pgs_error e;
        err_set(&e, PGS_ENOMEM, NULL, NULL, NULL);
        connect_failed(p, &e);
    }
}

/* Hand idle connections to waiters in FIFO order, then open what waiters and min_size need. */
void pool_dispatch(pgs_pool *p)
{
    if (p->closing)
        return;
    while (p->wait_head && p->idle) {
        slot *s = p->idle;
        /* Dead or too old: never handed out. (A probed-dead guard's on_lost comes later and
         * finds it closing.) retire takes it off the idle list. */
        if (!conn_probe(s->conn)) {
            pgs_error buf;
            int counts;
            const pgs_error *why = unusable_why(s, PGS_ECONN, NULL, &buf, &counts);
            slot_replace(s, counts, why);
            continue;
        }
        if (expired(s)) {
            slot_replace(s, REPLACED_COUNT, NULL);
            continue;
        }
        idle_remove(s);
        grant(p->wait_head, s);
    }
    if (p->retry_armed)
        return;
    /* Connections being opened will serve waiters soon: open only for the rest. */
    int want = p->waiting - p->connecting;
    int live = p->size - p->retiring;
    if (p->opts.min_size - live > want)
        want = p->opts.min_size - live;
    while (want-- > 0 && p->size < p->opts.max_size && !p->retry_armed)
        open_slot(p);
}

/* A live connection is free: to the first waiter, or idle. */
static void slot_available(slot *s)
{
    pgs_pool *p = s->pool;
    if (p->closing) {
        slot_retire(s);
        return;
    }
    if (expired(s)) {
        slot_replace(s, REPLACED_COUNT, NULL);
        return;
    }
    if (p->wait_head) {
        grant(p->wait_head, s); /* an owed reset goes with the grant (req_fire) */
        return;
    }
    if (s->reset_owed) {
        /* Idle: reset now, so what the last user left (advisory locks above all) is not
         * kept while it waits. */
        s->reset_owed = 0;
        int rc = slot_send_reset(s);
        if (rc != PGS_OK) {
            pgs_error buf;
            int counts;
            const pgs_error *why =
                unusable_why(s, rc, "the pool could not queue the session reset", &buf, &counts);
            slot_replace(s, counts, why);
            pool_dispatch(p);
            return;
        }
    }
    idle_push(s);
    arm_idle_timer(s);
}

/* ---- the guard comes back ---- */

static void slot_returned(void *arg, pgs_conn *conn)
{
    slot *s = arg;
    pgs_pool *p = s->pool;
    p->in_use--;
    if (p->opts.on_release)
        p->opts.on_release(conn, p->opts.cb_arg);
    if (p->closing) {
        slot_retire(s);
        return;
    }
    /* The next user gets a clean session: the reset is owed, and sent when the guard goes
     * idle or, to a waiter, with the grant, ahead of that user's first statements in the
     * same pipeline segment, so it costs no round trip and no write of its own. */
    if (p->opts.reset != PGS_RESET_NONE) {
        p->counters.reset++;
        s->reset_owed = 1;
    }
    slot_available(s);
}

/* The user closed a guard that could not come back (or it was lost): it is gone. Why, for
 * the hook: its error (lost, cancelled, timed out, its reset failed), or none when the user
 * closed it dirty (inside a transaction, with statements running). */
static void slot_freed(void *arg, pgs_conn *conn)
{
    (void)conn;
    slot *s = arg;
    pgs_pool *p = s->pool;
    p->in_use--;
    pgs_error buf;
    int counts;
    const pgs_error *why = unusable_why(s, PGS_ECLOSED, NULL, &buf, &counts);
    pool_replaced(s, counts, why->code == PGS_ECLOSED ? NULL : why);
    slot_free(s);
    pool_dispatch(p);
    maybe_finish(p);
}

static const conn_keeper keeper = {slot_returned, slot_freed};

/* ---- public API ---- */

static void pool_finished(void *arg, int what)
{
    (void)what;
    pgs_pool *p = arg;
    /* The handle stays valid until done returns: a call on it is refused (closing). */
    if (p->done)
        p->done(p->done_arg);
    loop_ev_free(p->retry);
    loop_ev_free(p->finish);
    mux_free(p->mux);
    pool_free_setup(p);
    free(p->conninfo);
    free(p);
}
int pgs_pool_new(struct event_base *base, const char *conninfo, const pgs_pool_opts *opts,
                 pgs_pool **out)
{
    if (out)
        *out = NULL;
    if (!base || !conninfo || !out)
        return PGS_EINVAL;
    pgs_pool_opts o = opts ? *opts : (pgs_pool_opts){0};
    if (o.max_size == 0)
        o.max_size = DEFAULT_MAX_SIZE;
    if (o.min_size < 0 || o.max_size < 0 || o.min_size > o.max_size || o.max_waiting < 0 ||
        o.reset < PGS_RESET_SESSION || o.reset > PGS_RESET_NONE || o.mux_depth < 0)
        return PGS_EINVAL;
    if (o.acquire_timeout_ms == 0)
        o.acquire_timeout_ms = DEFAULT_ACQUIRE_TIMEOUT_MS;
    if (o.idle_timeout_ms == 0)
        o.idle_timeout_ms = DEFAULT_IDLE_TIMEOUT_MS;
    if (o.max_lifetime_ms == 0)
        o.max_lifetime_ms = DEFAULT_MAX_LIFETIME_MS;
    pgs_pool *p = calloc(1, sizeof *p);
    if (!p)
        return PGS_ENOMEM;
    p->base = base;
    p->opts = o;
    p->conninfo = strdup(conninfo);
    p->retry = loop_ev_new(base, on_retry, p);
    p->finish = loop_ev_new(base, pool_finished, p);
    if (!p->conninfo || !p->retry || !p->finish || pool_copy_setup(p, o.setup_sql) != 0) {
        loop_ev_free(p->retry);
        loop_ev_free(p->finish);
        pool_free_setup(p);
        free(p->conninfo);
        free(p);
        return PGS_ENOMEM;
    }
    pool_dispatch(p); /* min_size, in the background */
    *out = p;
    return PGS_OK;
}

static int acquire(pgs_pool *p, int timeout_ms, int own_timeout, pgs_conn_cb cb, void *arg,
                   pgs_pool_req **out)
{
    if (out)
        *out = NULL;
    if (!p || !cb || timeout_ms == 0)
        return PGS_EINVAL;
    if (p->closing) {
        snprintf(p->refusal, sizeof p->refusal, "the pool is closing");
        return PGS_ECLOSED;
    }
    if (p->opts.max_waiting > 0 && !p->idle && p->waiting >= p->opts.max_waiting) {
        p->counters.refused_busy++;
        snprintf(p->refusal, sizeof p->refusal,
                 "too many requests waiting (max_waiting %d; max_size %d, %d in use)",
                 p->opts.max_waiting, p->opts.max_size, p->in_use);
        return PGS_EBUSY;
    }
    pgs_pool_req *r = calloc(1, sizeof *r);
    if (!r)
        return PGS_ENOMEM;
    r->pool = p;
    r->cb = cb;
    r->arg = arg;
    r->ev = loop_ev_new(p->base, req_fire, r);
    if (!r->ev) {
        free(r);
        return PGS_ENOMEM;
    }
    r->state = RQ_WAITING;
    r->timeout_ms = timeout_ms;
    r->own_timeout = own_timeout;
    r->asked = pool_now_ms();
    r->deadline = r->asked + timeout_ms;
    p->outstanding++;
    p->counters.requests++;
    wait_push(r);
    if (timeout_ms > 0)
        loop_ev_timer(r->ev, timeout_ms);
    pool_dispatch(p); /* a grant is delivered from the loop, never from inside this call */
    if (out)
        *out = r;
    return PGS_OK;
}

int pgs_pool_acquire(pgs_pool *p, pgs_conn_cb cb, void *arg, pgs_pool_req **out)
{
    return acquire(p, p ? p->opts.acquire_timeout_ms : 0, 0, cb, arg, out);
}

int pgs_pool_acquire_within(pgs_pool *p, int timeout_ms, pgs_conn_cb cb, void *arg,
                            pgs_pool_req **out)
{
    return acquire(p, timeout_ms, 1, cb, arg, out);
}

int pgs_pool_acquire_cancel(pgs_pool_req *r)
{
    if (!r)
        return PGS_EINVAL;
    if (r->state == RQ_FAILED || r->state == RQ_FIRING)
        return PGS_EMISUSE;
    if (r->state == RQ_GRANTED) {
        /* Set aside but not yet delivered: the cancel wins, the connection moves on. */
        slot *s = r->granted;
        r->granted = NULL;
        s->granted_to = NULL;
        r->pool->in_use--;
        slot_available(s);
    }
    fail_req(r, PGS_ECANCELED);
    return PGS_OK;
}

int pgs_pool_close(pgs_pool *p, pgs_done_cb done, void *arg)
{
    if (!p)
        return PGS_EINVAL;
    if (p->closing)
        return PGS_EMISUSE;
    p->closing = 1;
    p->done = done;
    p->done_arg = arg;
    loop_ev_stop(p->retry);
    p->retry_armed = 0;
    while (p->wait_head)
        fail_req(p->wait_head, PGS_ECLOSED);
    mux_close(p);
    for (slot *s = p->all, *next; s; s = next) {
        next = s->all_next;
        if (s->state == SL_IDLE || s->state == SL_CONNECTING || s->state == SL_SETUP)
            slot_retire(s);
    }
    maybe_finish(p);
    return PGS_OK;
}

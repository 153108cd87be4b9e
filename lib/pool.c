/* The pool: connection guards handed out and taken back on one loop, with FIFO waiters,
 * limits, health (loss noticed at once, reconnects with backoff), reset on return and close.
 * The top layer of the library: it uses the connection layer (conn.h, as the guards' keeper)
 * and the loop adapter; pgs_pool_run_tx is pool_run.c's. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "conn.h"
#include "error.h"
#include "loop.h"

enum {
    DEFAULT_MAX_SIZE = 10,
    DEFAULT_ACQUIRE_TIMEOUT_MS = 30000,
    DEFAULT_IDLE_TIMEOUT_MS = 300000,
    DEFAULT_MAX_LIFETIME_MS = 3600000,
    RETRY_FIRST_MS = 50,
    RETRY_MAX_MS = 2000,
};

typedef enum slot_state {
    SL_CONNECTING,
    SL_IDLE,
    SL_IN_USE,    /* handed out, or granted and about to be */
    SL_CLOSING,   /* the pool closes it; gone when its close's done fires */
} slot_state;

typedef struct slot {
    struct slot *prev, *next; /* the idle list, while idle */
    struct slot *all_prev, *all_next;
    pgs_pool *pool;
    pgs_conn *conn;
    slot_state state;
    double born;
    loop_ev *idle_timer; /* idle timeout, or the end of its lifetime, while idle */
    struct pgs_pool_req *granted_to; /* set aside for a request not yet delivered */
    int reset_owed; /* came back, its session reset not sent yet (see slot_returned) */
} slot;

typedef enum req_state {
    RQ_WAITING, /* in the queue; its event is the timeout */
    RQ_GRANTED, /* a connection is set aside; its event delivers it */
    RQ_FAILED,  /* cancelled or the pool closed; its event delivers err */
    RQ_FIRING,  /* its callback runs: too late to cancel */
} req_state;

struct pgs_pool_req {
    pgs_pool_req *prev, *next;
    pgs_pool *pool;
    pgs_conn_cb cb;
    void *arg;
    loop_ev *ev;
    req_state state;
    slot *granted;
    pgs_error err;
    double deadline; /* when its acquire timeout ends */
};

struct pgs_pool {
    struct event_base *base;
    char *conninfo;
    pgs_pool_opts opts;
    slot *idle; /* most recently returned first: warm connections are reused */
    slot *all;
    pgs_pool_req *wait_head, *wait_tail;
    int size, nidle, in_use, waiting, connecting;
    int retiring;  /* closing, not yet gone: not counted toward min_size */
    int requests; /* acquire callbacks not yet fired: the pool outlives them */
    int closing;
    pgs_done_cb done;
    void *done_arg;
    loop_ev *retry; /* reconnect backoff while the server cannot be reached */
    int retry_ms;
    int retry_armed;
    int connect_failing;
    pgs_error connect_err;
    loop_ev *finish; /* the close's done, from the loop */
    pgs_pool_counts counters;
};

static void dispatch(pgs_pool *p);
static void slot_available(slot *s);
static int send_reset(pgs_pool *p, slot *s, pgs_conn *conn);

static double now_ms(void)
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
    if (p->closing && p->size == 0 && p->requests == 0)
        loop_ev_post(p->finish);
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
    free(s);
    p->size--;
}

/* The pool's own close of a slot is done: make room, open a replacement if wanted. */
static void slot_gone(void *arg)
{
    slot *s = arg;
    pgs_pool *p = s->pool;
    slot_free(s);
    dispatch(p);
    maybe_finish(p);
}

/* Close a slot's connection (really: the keeper lets go first). */
static void retire(slot *s)
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

static int expired(const slot *s)
{
    int life = s->pool->opts.max_lifetime_ms;
    return life > 0 && now_ms() - s->born >= life;
}

/* While idle: wake at the idle timeout or the end of its lifetime, whichever is first. */
static void arm_idle_timer(slot *s)
{
    pgs_pool *p = s->pool;
    double wait = p->opts.idle_timeout_ms > 0 ? p->opts.idle_timeout_ms : -1;
    if (p->opts.max_lifetime_ms > 0) {
        double left = s->born + p->opts.max_lifetime_ms - now_ms();
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
        p->counters.replaced++;
        retire(s);
        dispatch(p); /* min_size brings a fresh one */
    } else if (p->size - p->retiring > p->opts.min_size) {
        retire(s);
    } else {
        arm_idle_timer(s); /* kept for min_size: its lifetime still counts */
    }
}

/* ---- requests ---- */

static void req_fire(void *arg, int what)
{
    (void)what;
    pgs_pool_req *r = arg;
    pgs_pool *p = r->pool;
    pgs_conn *conn = NULL;
    const pgs_error *err = &r->err;
    switch (r->state) {
    case RQ_WAITING: /* its timeout */
        wait_remove(r);
        p->counters.timed_out++;
        if (p->connect_failing) {
            char msg[sizeof r->err.message + 64];
            snprintf(msg, sizeof msg, "no connection within the acquire timeout: %s",
                     p->connect_err.message);
            err_set(&r->err, PGS_ECONNECT, p->connect_err.sqlstate, msg, NULL);
        } else {
            err_set(&r->err, PGS_ETIMEDOUT, NULL,
                    "no connection became free within the acquire timeout", NULL);
        }
        break;
    case RQ_GRANTED: {
        slot *s = r->granted;
        s->granted_to = NULL;
        /* The last user's session reset goes out now, in this turn, and the statements the
         * callback below queues share its pipeline segment: one write and one sync for both,
         * and should the reset fail, the server skips them. */
        int reset_failed = 0;
        /* Never grant a dead guard: read what the server sent first (EOF, its FATAL, the
         * failure of a reset still in flight), which a peek cannot tell from replies. */
        conn_refresh(s->conn);
        if (s->reset_owed && conn_ready(s->conn)) {
            s->reset_owed = 0;
            reset_failed = send_reset(p, s, s->conn) != PGS_OK;
        }
        if (reset_failed || !conn_ready(s->conn)) {
            /* Died between the grant and now (or its reset could not be sent): never hand
             * out a dead or dirty one. Back to the head of the line, with the time it has
             * left. */
            p->in_use--;
            p->counters.replaced++;
            retire(s);
            r->state = RQ_WAITING;
            r->granted = NULL;
            wait_push_front(r);
            if (p->opts.acquire_timeout_ms > 0)
                loop_ev_timer(r->ev, r->deadline - now_ms() > 1 ? (int)(r->deadline - now_ms())
                                                                 : 1);
            dispatch(p);
            return;
        }
        conn = s->conn;
        err = NULL;
        conn_lend(conn);
        p->counters.acquired++;
        break;
    }
    case RQ_FAILED:
    case RQ_FIRING:
        break;
    }
    r->state = RQ_FIRING;
    r->cb(conn, err, r->arg);
    loop_ev_free(r->ev);
    free(r);
    p->requests--;
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

static void fail_req(pgs_pool_req *r, pgs_code code, const char *msg)
{
    if (r->state == RQ_WAITING)
        wait_remove(r);
    r->state = RQ_FAILED;
    err_set(&r->err, code, NULL, msg, NULL);
    loop_ev_stop(r->ev);
    loop_ev_post(r->ev);
}

/* ---- opening ---- */

static void on_retry(void *arg, int what)
{
    (void)what;
    pgs_pool *p = arg;
    p->retry_armed = 0;
    dispatch(p);
}

static void connect_failed(pgs_pool *p, const pgs_error *err)
{
    p->connect_failing = 1;
    p->connect_err = *err;
    p->counters.connect_failures++;
    if (!p->retry_armed && !p->closing) {
        /* Back off so a down server is not hammered; waiters and min_size bring us back. */
        p->retry_ms = p->retry_ms ? p->retry_ms * 2 : RETRY_FIRST_MS;
        if (p->retry_ms > RETRY_MAX_MS)
            p->retry_ms = RETRY_MAX_MS;
        p->retry_armed = 1;
        loop_ev_timer(p->retry, p->retry_ms);
    }
}

static void slot_lost(pgs_conn *conn, const pgs_error *err, void *arg)
{
    slot *s = arg;
    pgs_pool *p = s->pool;
    if (s->state == SL_IDLE) {
        /* Died while idle (terminated, server restart): never handed out; replace it. */
        p->counters.replaced++;
        retire(s);
        return;
    }
    if (s->state == SL_IN_USE && !s->granted_to && p->opts.conn.on_lost)
        p->opts.conn.on_lost(conn, err, p->opts.conn.lost_arg);
}

static const conn_keeper keeper;

static void slot_opened(pgs_conn *conn, const pgs_error *err, void *arg)
{
    slot *s = arg;
    pgs_pool *p = s->pool;
    p->connecting--;
    if (s->state == SL_CLOSING)
        return; /* the pool closed it while it was connecting: slot_gone follows */
    if (err) {
        connect_failed(p, err);
        retire(s);
        return;
    }
    p->connect_failing = 0;
    p->retry_ms = 0;
    s->born = now_ms();
    conn_set_keeper(conn, &keeper, s);
    s->state = SL_IN_USE; /* neither connecting nor idle while on_connect runs */
    if (p->opts.on_connect)
        p->opts.on_connect(conn, p->opts.cb_arg);
    if (s->state == SL_CLOSING)
        return; /* the pool was closed from on_connect */
    slot_available(s);
}

static void open_slot(pgs_pool *p)
{
    slot *s = calloc(1, sizeof *s);
    if (s)
        s->idle_timer = loop_ev_new(p->base, on_idle_timeout, s);
    if (!s || !s->idle_timer) {
        free(s);
        pgs_error e;
        err_set(&e, PGS_ENOMEM, NULL, NULL, NULL);
        connect_failed(p, &e);
        return;
    }
    s->pool = p;
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
    if (pgs_conn_open(p->base, p->conninfo, &o, slot_opened, s, &s->conn) != PGS_OK) {
        p->connecting--;
        slot_free(s);
        pgs_error e;
        err_set(&e, PGS_ENOMEM, NULL, NULL, NULL);
        connect_failed(p, &e);
    }
}

/* Hand idle connections to waiters in FIFO order, then open what waiters and min_size need. */
static void dispatch(pgs_pool *p)
{
    if (p->closing)
        return;
    while (p->wait_head && p->idle) {
        slot *s = p->idle;
        if (!conn_probe(s->conn) || expired(s)) {
            /* Dead or too old: never handed out. (A probed-dead guard's on_lost comes later
             * and finds it closing.) retire takes it off the idle list. */
            p->counters.replaced++;
            retire(s);
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
    if (p->closing || expired(s)) {
        if (!p->closing)
            p->counters.replaced++;
        retire(s);
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
        if (send_reset(p, s, s->conn) != PGS_OK) {
            p->counters.replaced++;
            retire(s);
            dispatch(p);
            return;
        }
    }
    idle_push(s);
    arm_idle_timer(s);
}

/* ---- the guard comes back ---- */

static void reset_done(pgs_conn *conn, const PGresult *res, const pgs_error *err, void *arg)
{
    (void)res;
    slot *s = arg;
    pgs_pool *p = s->pool;
    if (!err)
        return;
    /* The reset failed (or the connection went). Idle: replace it. Already handed out: its
     * new user's statements are queued behind the reset, on a session that may still hold
     * the last user's state, so close it now; they hear why instead of running on it. */
    if (s->state == SL_IDLE) {
        p->counters.replaced++;
        retire(s);
        dispatch(p);
    } else if (conn_ready(conn)) {
        char msg[sizeof err->message + 64];
        snprintf(msg, sizeof msg, "the pool's session reset failed: %s", err->message);
        pgs_error e;
        err_set(&e, PGS_ECONN, err->sqlstate, msg, NULL); /* the server's SQLSTATE, if any */
        conn_fail(conn, &e, 0);
    }
}

/* Everything DISCARD ALL resets except prepared statements (and cached plans), so the
 * statement cache stays warm, in DISCARD ALL's order, with no sync of its own: it shares the
 * next user's segment and write (each write costs the server a wake-up; sent on return as two
 * segments of its own, it made three writes per lease and half the transactions per second:
 * tools/run-bench). It is a transaction of its own, begun READ COMMITTED, so whatever
 * defaults the last user left (serializable deferrable could wait for a safe snapshot,
 * serializable fails on a hot standby) do not apply to it, and every step works in a
 * read-only transaction. RESET ALL leaves the role and session user, hence SET SESSION
 * AUTHORIZATION DEFAULT. A failure leaves the block open and aborted (the server skips to
 * the sync, and refuses what comes after it): reset_done closes the guard then. */
static const char *const session_reset[] = {
    "BEGIN ISOLATION LEVEL READ COMMITTED", "CLOSE ALL", "SET SESSION AUTHORIZATION DEFAULT",
    "RESET ALL", "UNLISTEN *", "SELECT pg_catalog.pg_advisory_unlock_all()", "DISCARD TEMP",
    "DISCARD SEQUENCES", "COMMIT", NULL,
};

static int send_reset(pgs_pool *p, slot *s, pgs_conn *conn)
{
    /* No sync of its own: what the new user queues in this turn joins its segment (DISCARD
     * ALL and the reset's COMMIT end their transaction at once, so the user's first
     * statement starts a fresh one, even VACUUM); otherwise a sync ends it with the turn.
     * DISCARD ALL when asked, or when the user's own SQL PREPARE left statements behind. */
    enum { F = CONN_RESET | CONN_NO_SYNC | CONN_SYNC_TURN };
    if (p->opts.reset == PGS_RESET_ALL || conn_user_prepared(conn))
        return conn_query(conn, "DISCARD ALL", 0, NULL, F, reset_done, s);
    for (int i = 0; session_reset[i]; i++) {
        /* Each reports to reset_done: a failure, or the skip it caused, is handled once. */
        int rc = conn_query(conn, session_reset[i], 0, NULL, F, reset_done, s);
        if (rc != PGS_OK)
            return rc;
    }
    return PGS_OK;
}

static void slot_returned(void *arg, pgs_conn *conn)
{
    slot *s = arg;
    pgs_pool *p = s->pool;
    p->in_use--;
    if (p->opts.on_release)
        p->opts.on_release(conn, p->opts.cb_arg);
    if (p->closing) {
        retire(s);
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

/* The user closed a guard that could not come back (or it was lost): it is gone. */
static void slot_freed(void *arg, pgs_conn *conn)
{
    (void)conn;
    slot *s = arg;
    pgs_pool *p = s->pool;
    p->in_use--;
    p->counters.replaced++;
    slot_free(s);
    dispatch(p);
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
        o.reset < PGS_RESET_SESSION || o.reset > PGS_RESET_NONE)
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
    if (!p->conninfo || !p->retry || !p->finish) {
        loop_ev_free(p->retry);
        loop_ev_free(p->finish);
        free(p->conninfo);
        free(p);
        return PGS_ENOMEM;
    }
    dispatch(p); /* min_size, in the background */
    *out = p;
    return PGS_OK;
}

int pgs_pool_acquire(pgs_pool *p, pgs_conn_cb cb, void *arg, pgs_pool_req **out)
{
    if (out)
        *out = NULL;
    if (!p || !cb)
        return PGS_EINVAL;
    if (p->closing)
        return PGS_ECLOSED;
    if (p->opts.max_waiting > 0 && !p->idle && p->waiting >= p->opts.max_waiting)
        return PGS_EBUSY;
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
    p->requests++;
    wait_push(r);
    r->deadline = now_ms() + p->opts.acquire_timeout_ms;
    if (p->opts.acquire_timeout_ms > 0)
        loop_ev_timer(r->ev, p->opts.acquire_timeout_ms);
    dispatch(p); /* a grant is delivered from the loop, never from inside this call */
    if (out)
        *out = r;
    return PGS_OK;
}

int pgs_pool_acquire_cancel(pgs_pool_req *r)
{
    if (!r)
        return PGS_EINVAL;
    pgs_pool *p = r->pool;
    if (r->state == RQ_FAILED || r->state == RQ_FIRING)
        return PGS_EMISUSE;
    p->counters.canceled++;
    if (r->state == RQ_GRANTED) {
        /* Set aside but not yet delivered: the cancel wins, the connection moves on. */
        slot *s = r->granted;
        r->granted = NULL;
        s->granted_to = NULL;
        p->in_use--;
        slot_available(s);
    }
    fail_req(r, PGS_ECANCELED, "the request was canceled");
    return PGS_OK;
}

void pgs_pool_stats(const pgs_pool *p, pgs_pool_counts *st)
{
    *st = p->counters;
    st->size = p->size;
    st->idle = p->nidle;
    st->in_use = p->in_use;
    st->waiting = p->waiting;
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
        fail_req(p->wait_head, PGS_ECLOSED, "the pool was closed");
    for (slot *s = p->all, *next; s; s = next) {
        next = s->all_next;
        if (s->state == SL_IDLE || s->state == SL_CONNECTING)
            retire(s);
    }
    maybe_finish(p);
    return PGS_OK;
}

/* The listener: LISTEN on a set of channels that survives lost connections. It keeps one
 * connection guard at a time, and after a loss closes it, opens another with backoff and
 * LISTENs again, telling its user where each gap begins and ends. It sits above the connection
 * layer: it uses the public guard API only, and the loop adapter for its timers. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "error.h"
#include "loop.h"
#include "pgscope.h"

enum {
    DEFAULT_RETRY_BASE_MS = 100,
    DEFAULT_RETRY_MAX_MS = 5000,
    DEFAULT_PING_INTERVAL_MS = 30000,
    DEFAULT_PING_TIMEOUT_MS = 10000,
    /* The server cuts longer identifiers to NAMEDATALEN - 1 bytes (63 in every stock build)
     * with only a notice, so LISTEN would wait on another name than the one pg_notify uses. */
    MAX_CHANNEL_LEN = 63,
};

typedef enum listen_state {
    LS_CONNECTING,  /* a guard is opening */
    LS_SUBSCRIBING, /* connected; the LISTENs are in flight (timer: their deadline) */
    LS_LISTENING,   /* every LISTEN answered (timer: the next ping) */
    LS_PINGING,     /* still listening; a ping is in flight (timer: its deadline) */
    LS_WAITING,     /* in a gap without a guard (timer: the next attempt) */
    LS_CLOSING,     /* closed by the user: the guards finish, then done fires */
} listen_state;

struct pgs_listener {
    struct event_base *base;
    char *conninfo;
    char **channels; /* NULL-terminated copy */
    int nchannels;
    pgs_conn_opts conn_opts; /* the user's, with the listener's own on_notify and on_lost */
    int retry_base_ms, retry_max_ms, ping_interval_ms, ping_timeout_ms;
    pgs_listener_notify_cb on_notify;
    pgs_listener_state_cb on_state;
    void *arg;
    listen_state state;
    pgs_conn *conn;  /* the current guard; NULL in a gap and while closing */
    int guards;      /* guards opened whose close has not finished yet */
    int unanswered;  /* LISTENs of the current guard not answered yet */
    int failures;    /* attempts failed since the last time it listened (the backoff's step) */
    int gap_told;    /* on_state(0) fired since the last on_state(1) (or ever, before one) */
    uint64_t rng;    /* the backoff's jitter */
    loop_ev *timer;  /* meaning by state, see listen_state */
    loop_ev *finish; /* fires done from the loop once the last guard is closed */
    pgs_done_cb done;
    void *done_arg;
};

static void guard_opened(pgs_conn *c, const pgs_error *err, void *arg);

/* ---- backoff ---- */

static uint64_t next_random(pgs_listener *l)
{
    /* xorshift64: the jitter only has to spread listeners apart, and a private state leaves
     * the program's rand() sequence alone. */
    uint64_t x = l->rng;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return l->rng = x;
}

static void seed_random(pgs_listener *l)
{
    uint64_t seed = 0;
    if (getrandom(&seed, sizeof seed, GRND_NONBLOCK) != (ssize_t)sizeof seed)
        seed = (uint64_t)time(NULL) ^ (uint64_t)(uintptr_t)l;
    l->rng = seed ? seed : 0x9e3779b97f4a7c15u;
}

/* retry_base_ms doubled per failed attempt up to retry_max_ms, then a random point in its
 * upper half, so that listeners cut off together do not come back in step. */
static int backoff_ms(pgs_listener *l)
{
    int d = l->retry_base_ms;
    for (int i = 0; i < l->failures && d < l->retry_max_ms; i++)
        d = d > l->retry_max_ms / 2 ? l->retry_max_ms : d * 2;
    if (d > l->retry_max_ms)
        d = l->retry_max_ms;
    return d - (int)(next_random(l) % (uint64_t)(d / 2 + 1));
}

static void arm_timer(pgs_listener *l, int ms)
{
    /* Should the timer fail, the next loop turn stands in, so the state never waits forever. */
    if (loop_ev_timer(l->timer, ms) != 0)
        loop_ev_post(l->timer);
}

/* ---- guards ---- */

static void guard_closed(void *arg)
{
    pgs_listener *l = arg;
    l->guards--;
    if (l->state == LS_CLOSING && l->guards == 0)
        loop_ev_post(l->finish);
}

/* Let go of the current guard: it closes in the background, and its late callbacks (PGS_ECLOSED
 * for what was in flight) are ignored, as every callback checks it is the current one. */
static void retire_guard(pgs_listener *l)
{
    pgs_conn *c = l->conn;
    l->conn = NULL;
    if (c && pgs_conn_close(c, guard_closed, l) != PGS_OK)
        l->guards--; /* (it was closing already: its done will not come) */
}

/* A gap: the guard is lost, or an attempt to connect and LISTEN failed. Retry after the
 * backoff; tell the user only of the first failure since it last listened. */
static void start_gap(pgs_listener *l, const pgs_error *why)
{
    pgs_error e = *why; /* it may belong to the guard retired next */
    retire_guard(l);
    l->state = LS_WAITING;
    arm_timer(l, backoff_ms(l));
    l->failures++;
    if (!l->gap_told) {
        l->gap_told = 1;
        l->on_state(l, 0, &e, l->arg); /* may close the listener */
    }
}

static void start_gap_code(pgs_listener *l, pgs_code code, const char *msg)
{
    pgs_error e;
    err_set(&e, code, NULL, msg, NULL);
    start_gap(l, &e);
}

static int open_guard(pgs_listener *l)
{
    pgs_conn *c = NULL;
    int rc = pgs_conn_open(l->base, l->conninfo, &l->conn_opts, guard_opened, l, &c);
    if (rc == PGS_OK) {
        l->guards++;
        l->conn = c;
        l->state = LS_CONNECTING;
    }
    return rc;
}

/* ---- LISTEN and ping ---- */

static void now_listening(pgs_listener *l)
{
    l->state = LS_LISTENING;
    l->failures = 0;
    l->gap_told = 0;
    if (l->ping_interval_ms > 0)
        arm_timer(l, l->ping_interval_ms);
    else
        loop_ev_stop(l->timer);
    l->on_state(l, 1, NULL, l->arg); /* may close the listener */
}

static void listen_answered(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg)
{
    (void)res;
    pgs_listener *l = arg;
    if (c != l->conn || l->state != LS_SUBSCRIBING)
        return;
    if (err)
        start_gap(l, err);
    else if (--l->unanswered == 0)
        now_listening(l);
}

/* "LISTEN <channel>", the name quoted by libpq (an identifier: never spliced raw), or NULL
 * with *why set. */
static char *listen_sql(PGconn *pg, const char *channel, int index, pgs_error *why)
{
    char *quoted = PQescapeIdentifier(pg, channel, strlen(channel));
    if (!quoted) {
        char msg[300];
        snprintf(msg, sizeof msg, "channel %d cannot be quoted as an identifier: %s", index + 1,
                 PQerrorMessage(pg));
        err_set(why, PGS_EINVAL, NULL, msg, NULL);
        return NULL;
    }
    size_t n = strlen(quoted) + sizeof "LISTEN ";
    char *sql = malloc(n);
    if (sql)
        snprintf(sql, n, "LISTEN %s", quoted);
    else
        err_set(why, PGS_ENOMEM, NULL, NULL, NULL);
    PQfreemem(quoted);
    return sql;
}

static void free_statements(char **sql, int n)
{
    for (int i = 0; i < n; i++)
        free(sql[i]);
    free(sql);
}

/* One LISTEN per channel (pgs_query takes one statement each), queued in one loop turn, so
 * they leave in one write. Every statement is built before any is queued: a name that cannot
 * be quoted fails the attempt before anything is sent. */
static void subscribe(pgs_listener *l)
{
    PGconn *pg = pgs_conn_pgconn(l->conn);
    if (!pg) {
        start_gap_code(l, PGS_ECONN, "the connection was lost before LISTEN");
        return;
    }
    char **sql = calloc((size_t)l->nchannels, sizeof *sql);
    pgs_error why;
    err_set(&why, PGS_ENOMEM, NULL, NULL, NULL);
    int built = 0;
    while (sql && built < l->nchannels &&
           (sql[built] = listen_sql(pg, l->channels[built], built, &why)))
        built++;
    if (built < l->nchannels) {
        free_statements(sql, built);
        start_gap(l, &why);
        return;
    }
    l->state = LS_SUBSCRIBING;
    l->unanswered = l->nchannels;
    arm_timer(l, l->ping_timeout_ms);
    int rc = PGS_OK;
    for (int i = 0; rc == PGS_OK && i < l->nchannels; i++)
        rc = pgs_query(l->conn, sql[i], 0, NULL, listen_answered, l);
    free_statements(sql, l->nchannels);
    if (rc != PGS_OK)
        start_gap_code(l, (pgs_code)rc, "could not queue LISTEN");
}

static void ping_answered(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg)
{
    (void)res;
    pgs_listener *l = arg;
    if (c != l->conn || l->state != LS_PINGING)
        return;
    if (err) {
        start_gap(l, err);
        return;
    }
    l->state = LS_LISTENING;
    arm_timer(l, l->ping_interval_ms);
}

static void send_ping(pgs_listener *l)
{
    int rc = pgs_query(l->conn, "SELECT 1", 0, NULL, ping_answered, l);
    if (rc != PGS_OK) {
        start_gap_code(l, (pgs_code)rc, "could not send a ping");
        return;
    }
    l->state = LS_PINGING;
    arm_timer(l, l->ping_timeout_ms);
}

static void timed_out(pgs_listener *l, const char *what)
{
    char msg[160];
    snprintf(msg, sizeof msg, "the server did not answer %s within %d ms", what,
             l->ping_timeout_ms);
    start_gap_code(l, PGS_ETIMEDOUT, msg);
}

/* ---- events ---- */

static void guard_opened(pgs_conn *c, const pgs_error *err, void *arg)
{
    pgs_listener *l = arg;
    if (c != l->conn || l->state != LS_CONNECTING)
        return;
    if (err)
        start_gap(l, err);
    else
        subscribe(l);
}

static void guard_lost(pgs_conn *c, const pgs_error *err, void *arg)
{
    pgs_listener *l = arg;
    if (c != l->conn)
        return;
    switch (l->state) {
    case LS_SUBSCRIBING:
    case LS_LISTENING:
    case LS_PINGING:
        start_gap(l, err);
        break;
    case LS_CONNECTING: /* on_open reports it */
    case LS_WAITING:
    case LS_CLOSING:
        break;
    }
}

static void guard_notified(pgs_conn *c, const PGnotify *n, void *arg)
{
    pgs_listener *l = arg;
    if (c != l->conn)
        return;
    switch (l->state) {
    case LS_LISTENING:
    case LS_PINGING:
        l->on_notify(l, n, l->arg);
        break;
    case LS_SUBSCRIBING:
        /* Before on_state(1): the commit it reports precedes the re-read that on_state(1)
         * asks for, which sees it. */
    case LS_CONNECTING:
    case LS_WAITING:
    case LS_CLOSING:
        break;
    }
}

static void timer_fired(void *arg, int what)
{
    (void)what;
    pgs_listener *l = arg;
    switch (l->state) {
    case LS_WAITING: {
        int rc = open_guard(l);
        if (rc != PGS_OK)
            start_gap_code(l, (pgs_code)rc, "could not start a connection");
        break;
    }
    case LS_SUBSCRIBING:
        timed_out(l, "LISTEN");
        break;
    case LS_LISTENING:
        send_ping(l);
        break;
    case LS_PINGING:
        timed_out(l, "a ping");
        break;
    case LS_CONNECTING: /* the guard's own connect deadline ends it */
    case LS_CLOSING:
        break;
    }
}

static void free_listener(pgs_listener *l)
{
    loop_ev_free(l->timer);
    loop_ev_free(l->finish);
    if (l->channels)
        for (int i = 0; i < l->nchannels; i++)
            free(l->channels[i]);
    free(l->channels);
    if (l->conninfo) {
        memset(l->conninfo, 0, strlen(l->conninfo)); /* it may hold the password */
        free(l->conninfo);
    }
    free(l);
}

static void finish_fired(void *arg, int what)
{
    (void)what;
    pgs_listener *l = arg;
    if (l->done)
        l->done(l->done_arg);
    free_listener(l);
}

/* ---- public API ---- */

static int check_args(struct event_base *base, const char *conninfo, const char *const *channels,
                      const pgs_listener_opts *opts, pgs_listener_notify_cb on_notify,
                      pgs_listener_state_cb on_state, pgs_listener **out)
{
    if (!base || !conninfo || !channels || !channels[0] || !on_notify || !on_state || !out)
        return PGS_EINVAL;
    for (const char *const *ch = channels; *ch; ch++)
        if (!**ch || strlen(*ch) > MAX_CHANNEL_LEN)
            return PGS_EINVAL;
    if (opts && (opts->retry_base_ms < 0 || opts->retry_max_ms < 0 || opts->ping_timeout_ms < 0))
        return PGS_EINVAL;
    /* A conninfo that does not parse never will: refused now rather than retried forever. */
    char *why = NULL;
    PQconninfoOption *parsed = PQconninfoParse(conninfo, &why);
    PQfreemem(why);
    if (!parsed)
        return PGS_EINVAL;
    PQconninfoFree(parsed);
    return PGS_OK;
}

static void apply_opts(pgs_listener *l, const pgs_listener_opts *opts)
{
    pgs_listener_opts o = {0};
    if (opts)
        o = *opts;
    l->conn_opts = o.conn;
    l->conn_opts.on_notify = guard_notified;
    l->conn_opts.notify_arg = l;
    l->conn_opts.on_lost = guard_lost;
    l->conn_opts.lost_arg = l;
    l->retry_base_ms = o.retry_base_ms ? o.retry_base_ms : DEFAULT_RETRY_BASE_MS;
    l->retry_max_ms = o.retry_max_ms ? o.retry_max_ms : DEFAULT_RETRY_MAX_MS;
    if (l->retry_max_ms < l->retry_base_ms)
        l->retry_max_ms = l->retry_base_ms;
    l->ping_interval_ms = o.ping_interval_ms ? o.ping_interval_ms : DEFAULT_PING_INTERVAL_MS;
    l->ping_timeout_ms = o.ping_timeout_ms ? o.ping_timeout_ms : DEFAULT_PING_TIMEOUT_MS;
}

static int copy_channels(pgs_listener *l, const char *const *channels)
{
    int n = 0;
    while (channels[n])
        n++;
    l->channels = calloc((size_t)n + 1, sizeof *l->channels);
    if (!l->channels)
        return PGS_ENOMEM;
    l->nchannels = n;
    for (int i = 0; i < n; i++)
        if (!(l->channels[i] = strdup(channels[i])))
            return PGS_ENOMEM;
    return PGS_OK;
}

int pgs_listener_new(struct event_base *base, const char *conninfo, const char *const *channels,
                     const pgs_listener_opts *opts, pgs_listener_notify_cb on_notify,
                     pgs_listener_state_cb on_state, void *arg, pgs_listener **out)
{
    if (out)
        *out = NULL;
    int rc = check_args(base, conninfo, channels, opts, on_notify, on_state, out);
    if (rc != PGS_OK)
        return rc;
    pgs_listener *l = calloc(1, sizeof *l);
    if (!l)
        return PGS_ENOMEM;
    l->base = base;
    l->on_notify = on_notify;
    l->on_state = on_state;
    l->arg = arg;
    apply_opts(l, opts);
    seed_random(l);
    rc = copy_channels(l, channels);
    if (rc == PGS_OK && !(l->conninfo = strdup(conninfo)))
        rc = PGS_ENOMEM;
    if (rc == PGS_OK && (!(l->timer = loop_ev_new(base, timer_fired, l)) ||
                         !(l->finish = loop_ev_new(base, finish_fired, l))))
        rc = PGS_ENOMEM;
    if (rc == PGS_OK)
        rc = open_guard(l); /* a failure here is the caller's answer: no callback */
    if (rc != PGS_OK) {
        free_listener(l);
        return rc;
    }
    *out = l;
    return PGS_OK;
}

int pgs_listener_close(pgs_listener *l, pgs_done_cb done, void *arg)
{
    if (!l)
        return PGS_EINVAL;
    if (l->state == LS_CLOSING)
        return PGS_EMISUSE;
    l->state = LS_CLOSING;
    l->done = done;
    l->done_arg = arg;
    loop_ev_stop(l->timer);
    retire_guard(l);
    if (l->guards == 0)
        loop_ev_post(l->finish);
    return PGS_OK;
}

pgs_conn *pgs_listener_conn(const pgs_listener *l)
{
    if (!l)
        return NULL;
    return l->state == LS_LISTENING || l->state == LS_PINGING ? l->conn : NULL;
}

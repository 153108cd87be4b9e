/* faultproxy: the fault-injecting loopback proxy of faultproxy.h. One thread runs its own event
 * base (listener, a bufferevent pair per connection, timers); it reads the client's protocol
 * to find COMMIT and the server's to know which replies have come, and applies every fault. */
#include "faultproxy.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/listener.h>

enum {
    REPLIES_WAIT_MS = 1000, /* replies_before: how long to wait for those replies */
    LINGER_MS = 5000,       /* cut after COMMIT: how long the server side waits for its reply */
    SSL_REQUEST = 80877103,
    GSSENC_REQUEST = 80877104,
    MAX_MESSAGE = 0x40000000,
};

/* ---- small containers: a set of names, the replies a connection is owed ---- */

typedef struct names {
    char **v;
    int n, cap;
} names;

static int names_find(const names *s, const char *name)
{
    for (int i = 0; i < s->n; i++)
        if (strcmp(s->v[i], name) == 0)
            return i;
    return -1;
}

/* Add (on) or remove a name; -1 when out of memory. */
static int names_set(names *s, const char *name, int on)
{
    int i = names_find(s, name);
    if (!on) {
        if (i >= 0) {
            free(s->v[i]);
            s->v[i] = s->v[--s->n];
        }
        return 0;
    }
    if (i >= 0)
        return 0;
    if (s->n == s->cap) {
        int cap = s->cap ? 2 * s->cap : 8;
        char **v = realloc(s->v, (size_t)cap * sizeof *v);
        if (!v)
            return -1;
        s->v = v;
        s->cap = cap;
    }
    if (!(s->v[s->n] = strdup(name)))
        return -1;
    s->n++;
    return 0;
}

static void names_free(names *s)
{
    for (int i = 0; i < s->n; i++)
        free(s->v[i]);
    free(s->v);
}

/* The replies the server owes, in order: one entry per client message that gets an answer,
 * named by that message's type. Entries are numbered from 0 in the order they were pushed;
 * `base` is the number of the first one still owed. */
typedef struct owed {
    char *t;
    size_t head, len, cap;
    long base;
} owed;

static int owed_push(owed *o, char type)
{
    if (o->head + o->len == o->cap) {
        if (o->head > 0) {
            memmove(o->t, o->t + o->head, o->len);
            o->head = 0;
        } else {
            size_t cap = o->cap ? 2 * o->cap : 64;
            char *t = realloc(o->t, cap);
            if (!t)
                return -1;
            o->t = t;
            o->cap = cap;
        }
    }
    o->t[o->head + o->len++] = type;
    return 0;
}

static char owed_front(const owed *o)
{
    return o->len ? o->t[o->head] : '\0';
}

static void owed_pop(owed *o, size_t n)
{
    o->head += n;
    o->len -= n;
    o->base += (long)n;
}

/* Number of the last entry pushed so far (-1: none). */
static long owed_last(const owed *o)
{
    return o->base + (long)o->len - 1;
}

/* A backend message of type t completed: pop what it answers. 'Z' ends a simple query, a
 * function call or a sync (and everything an error made the server skip before it); an error
 * in extended protocol also answers every message up to the next sync (skipped). */
static void owed_answer(owed *o, char t)
{
    char f = owed_front(o);
    switch (t) {
    case 'Z': {
        size_t i = 0;
        while (i < o->len && !strchr("QSF", o->t[o->head + i]))
            i++;
        if (i < o->len)
            owed_pop(o, i + 1);
        break;
    }
    case 'E': {
        size_t i = 0;
        while (i < o->len && !strchr("QSF", o->t[o->head + i]))
            i++;
        owed_pop(o, i);
        break;
    }
    case '1':
    case '2':
    case '3':
        if (f == "PBC"[t - '1'])
            owed_pop(o, 1);
        break;
    case 'C': /* CommandComplete, EmptyQueryResponse, PortalSuspended: an Execute's end */
    case 'I':
    case 's':
        if (f == 'E')
            owed_pop(o, 1);
        break;
    case 'T': /* RowDescription, NoData: a Describe's end */
    case 'n':
        if (f == 'D')
            owed_pop(o, 1);
        break;
    default:
        break;
    }
}

/* ---- COMMIT ---- */

static const char *skip_space(const char *s)
{
    while (*s == ' ' || *s == '\t' || *s == '\n' || *s == '\r' || *s == '\f' || *s == '\v')
        s++;
    return s;
}

/* The keyword w (any case) at s, as a whole word: what follows it and its white space. */
static const char *word(const char *s, const char *w)
{
    size_t n = strlen(w);
    if (strncasecmp(s, w, n) != 0)
        return NULL;
    char next = s[n];
    if ((next >= 'A' && next <= 'Z') || (next >= 'a' && next <= 'z') || (next >= '0' && next <= '9') ||
        next == '_')
        return NULL;
    return skip_space(s + n);
}

/* COMMIT or END, optionally WORK or TRANSACTION, optionally AND [NO] CHAIN, white space
 * anywhere between and around, at most one ';' at the end. */
static int is_commit(const char *s)
{
    const char *p;
    s = skip_space(s);
    if (!(p = word(s, "COMMIT")) && !(p = word(s, "END")))
        return 0;
    const char *q;
    if ((q = word(p, "WORK")) || (q = word(p, "TRANSACTION")))
        p = q;
    if ((q = word(p, "AND"))) {
        const char *r = word(q, "NO");
        if (!(p = word(r ? r : q, "CHAIN")))
            return 0;
    }
    if (*p == ';')
        p = skip_space(p + 1);
    return *p == '\0';
}

/* ---- the proxy ---- */

typedef struct fp_cmd {
    int op;
    long a, b, c;
    int turns;
    fp_counts counts;
    int done;
    struct fp_cmd *next;
} fp_cmd;

enum { OP_CUT, OP_CUT_MS, OP_CUT_BYTES, OP_STALL, OP_STALL_REPLIES, OP_DRIP, OP_COMMIT, OP_TURNS,
       OP_RESET_TURNS, OP_COUNTS, OP_STOP };

typedef struct fp_conn fp_conn;

typedef struct cut_timer {
    fp_proxy *p;
    struct event *ev;
    long upto; /* cut the connections numbered up to this one */
    struct cut_timer *next;
} cut_timer;

struct fp_proxy {
    /* shared with the callers: the command queue */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    fp_cmd *head, *tail;
    int wake[2];
    /* set before the thread starts, read-only afterwards */
    pthread_t tid;
    int port, target;
    struct event_base *base;
    struct evconnlistener *listener;
    struct event *wake_ev;
    /* the proxy thread's own */
    fp_conn *conns;
    long next_id;
    cut_timer *cut_timers;
    long cut_bytes;
    int stall, stall_replies;
    int drip_bytes;
    struct event *drip_ev;
    int commit_what, commit_left, commit_replies;
    int turns;
    fp_counts counts;
};

struct fp_conn {
    fp_proxy *p;
    fp_conn *prev, *next;
    long id;
    struct bufferevent *cli, *srv; /* NULL once closed */
    int cli_closing, srv_closing;  /* writing out what is left, then closing */
    int startup;                   /* the startup packet has not passed yet */
    int last;                      /* turns: 1 client->server data last, 2 server->client */
    int cut;                       /* counted as cut */
    long budget;                   /* fp_cut_after_bytes: bytes left; -1: off */
    size_t msg_left;               /* server->client: bytes of the current message to come */
    char msg_type;
    int drip_left;
    names stmts, portals; /* prepared statements, portals that hold a COMMIT */
    owed owed;
    /* a COMMIT fault under way */
    int fault;          /* fp_commit_fault */
    int replies_before; /* its flag */
    int waiting;        /* waiting for the replies before COMMIT */
    long boundary;      /* the last entry owed before COMMIT */
    long commit_seq;    /* COMMIT's own entry */
    long flush_mark;    /* the last entry the server will send unasked: up to the last Flush,
                           Sync or simple Query forwarded */
    int c2s_drop;       /* the client's further bytes are dropped */
    int held;           /* replies held (stall after COMMIT) */
    int linger;         /* client cut; the server side waits for COMMIT's reply */
    struct event *timer;
};

static int cli_open(const fp_conn *c)
{
    return c->cli && !c->cli_closing;
}

static int srv_open(const fp_conn *c)
{
    return c->srv && !c->srv_closing;
}

static uint32_t be32(const unsigned char *b)
{
    return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
}

/* Free the connection once both sides are gone. Called last by every entry point. */
static void conn_settle(fp_conn *c)
{
    if (c->cli || c->srv)
        return;
    fp_proxy *p = c->p;
    if (c->prev)
        c->prev->next = c->next;
    else
        p->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    event_free(c->timer);
    names_free(&c->stmts);
    names_free(&c->portals);
    free(c->owed.t);
    p->counts.open--;
    free(c);
}

static void on_closing_read(struct bufferevent *bev, void *arg)
{
    (void)arg;
    struct evbuffer *in = bufferevent_get_input(bev);
    evbuffer_drain(in, evbuffer_get_length(in));
}

static void side_free(fp_conn *c, struct bufferevent *bev)
{
    bufferevent_free(bev);
    if (bev == c->cli) {
        c->cli = NULL;
        c->cli_closing = 0;
    } else {
        c->srv = NULL;
        c->srv_closing = 0;
    }
}

static void on_closing_write(struct bufferevent *bev, void *arg)
{
    fp_conn *c = arg;
    if (evbuffer_get_length(bufferevent_get_output(bev)) == 0) {
        side_free(c, bev);
        conn_settle(c);
    }
}

static void on_closing_event(struct bufferevent *bev, short what, void *arg)
{
    fp_conn *c = arg;
    if (what & BEV_EVENT_CONNECTED)
        return; /* a server side closing before it was up: now it writes */
    side_free(c, bev);
    conn_settle(c);
}

/* Close one side: at once, or (flush) once what was forwarded to it is written. */
static void side_close(fp_conn *c, struct bufferevent *bev, int flush)
{
    if (!bev)
        return;
    if (!flush || evbuffer_get_length(bufferevent_get_output(bev)) == 0) {
        side_free(c, bev);
        return;
    }
    if (bev == c->cli)
        c->cli_closing = 1;
    else
        c->srv_closing = 1;
    bufferevent_setwatermark(bev, EV_WRITE, 0, 0);
    bufferevent_setcb(bev, on_closing_read, on_closing_write, on_closing_event, c);
    bufferevent_enable(bev, EV_READ | EV_WRITE);
}

/* The proxy cuts the client's connection (once per connection in the counts). */
static void count_cut(fp_conn *c)
{
    if (!c->cut && cli_open(c)) {
        c->cut = 1;
        c->p->counts.cuts++;
    }
}

/* A network failure: the client side goes at once; the server side at once too, or (flush)
 * after what was already forwarded to it. */
static void conn_cut(fp_conn *c, int flush_server)
{
    count_cut(c);
    c->fault = c->waiting = c->linger = c->held = 0;
    evtimer_del(c->timer);
    side_close(c, c->cli, 0);
    side_close(c, c->srv, flush_server);
}

static void apply_reading(fp_conn *c)
{
    fp_proxy *p = c->p;
    if (cli_open(c)) {
        if (p->stall)
            bufferevent_disable(c->cli, EV_READ);
        else
            bufferevent_enable(c->cli, EV_READ);
    }
    if (srv_open(c)) {
        if (p->stall || c->held || (p->stall_replies && cli_open(c)))
            bufferevent_disable(c->srv, EV_READ);
        else
            bufferevent_enable(c->srv, EV_READ);
    }
}

static void add_timer(struct event *ev, int ms)
{
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    evtimer_add(ev, &tv);
}

/* The COMMIT fault's moment has come (the replies before it are through, or not awaited). */
static void commit_act(fp_conn *c)
{
    int what = c->fault;
    c->fault = c->waiting = 0;
    evtimer_del(c->timer);
    switch (what) {
    case FP_COMMIT_CUT_BEFORE:
    case FP_COMMIT_CUT_AFTER:
        /* the client gets the replies let through, if any, and then nothing */
        count_cut(c);
        side_close(c, c->cli, c->replies_before);
        if (what == FP_COMMIT_CUT_BEFORE || c->owed.base > c->commit_seq) {
            side_close(c, c->srv, 1);
        } else {
            c->linger = 1; /* replies are discarded from now on */
            add_timer(c->timer, LINGER_MS);
            apply_reading(c);
        }
        break;
    case FP_COMMIT_STALL_AFTER:
        if (cli_open(c)) {
            c->held = 1;
            apply_reading(c);
        } else {
            side_close(c, c->srv, 1);
        }
        break;
    default:
        break;
    }
}

/* After each complete backend message: a fault waiting for replies, a lingering server. */
static void replies_moved(fp_conn *c)
{
    if (c->waiting && c->owed.base > c->boundary)
        commit_act(c);
    if (c->linger && c->owed.base > c->commit_seq) {
        c->linger = 0;
        evtimer_del(c->timer);
        side_close(c, c->srv, 1);
    }
}

static void on_conn_timer(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    fp_conn *c = arg;
    if (c->waiting) {
        commit_act(c);
    } else if (c->linger) {
        c->linger = 0;
        side_close(c, c->srv, 1);
    }
    conn_settle(c);
}

/* Server to client, a whole message at a time as far as faults go (so a fault lands on a
 * message boundary), and at most the drip's allowance. Without a client side (cut, closed),
 * the server's bytes are read and dropped, still counted as replies. `final`: the server is
 * gone, whatever is left goes out now, drip or not. */
static void pump_s2c(fp_conn *c, int final)
{
    fp_proxy *p = c->p;
    for (;;) {
        if (!c->srv || c->srv_closing)
            return;
        struct evbuffer *in = bufferevent_get_input(c->srv);
        size_t have = evbuffer_get_length(in);
        int to_client = cli_open(c);
        if (have == 0 || (to_client && (p->stall || p->stall_replies || c->held)))
            return;
        if (c->msg_left == 0) {
            unsigned char h[5];
            if (have < sizeof h)
                return;
            evbuffer_copyout(in, h, sizeof h);
            uint32_t len = be32(h + 1);
            if (len < 4 || len > MAX_MESSAGE) { /* not the protocol */
                conn_cut(c, 0);
                return;
            }
            c->msg_type = (char)h[0];
            c->msg_left = 1 + (size_t)len;
        }
        size_t n = have < c->msg_left ? have : c->msg_left;
        if (to_client && p->drip_bytes > 0 && !final) {
            if (c->drip_left <= 0)
                return;
            if (n > (size_t)c->drip_left)
                n = (size_t)c->drip_left;
            c->drip_left -= (int)n;
        }
        if (to_client) {
            evbuffer_remove_buffer(in, bufferevent_get_output(c->cli), n);
            p->counts.bytes_down += (long)n;
        } else {
            evbuffer_drain(in, n);
        }
        c->msg_left -= n;
        if (c->msg_left == 0) {
            owed_answer(&c->owed, c->msg_type);
            replies_moved(c);
        }
    }
}

/* The size of the next whole client message in `in`, 0 while it is incomplete, -1 when the
 * stream is not the protocol. */
static long next_message(const fp_conn *c, struct evbuffer *in)
{
    unsigned char h[5];
    size_t have = evbuffer_get_length(in), hl = c->startup ? 4 : 5;
    if (have < hl)
        return 0;
    evbuffer_copyout(in, h, hl);
    uint32_t len = be32(c->startup ? h : h + 1);
    if (len < 4 || len > MAX_MESSAGE)
        return -1;
    size_t total = c->startup ? len : 1 + (size_t)len;
    return have >= total ? (long)total : 0;
}

/* The NUL-terminated string at s within n bytes, or NULL. */
static const char *cstr(const char *s, size_t n)
{
    return s && memchr(s, '\0', n) ? s : NULL;
}

/* The string after the one at s (both within the message that ends at end), or NULL. */
static const char *after(const char *s, const char *end)
{
    if (!s)
        return NULL;
    const char *t = s + strlen(s) + 1;
    return cstr(t, (size_t)(end - t));
}

/* Read one whole client message: note the statements and portals it defines or closes, say
 * which reply it is owed ('\0': none) and whether it runs COMMIT. -1: out of memory. */
static int client_message(fp_conn *c, const unsigned char *m, size_t total, char *owes,
                          int *commit)
{
    const char *body = (const char *)m + 5, *end = (const char *)m + total;
    const char *s1 = cstr(body, total - 5), *s2 = after(s1, end);
    int rc = 0;
    *commit = 0;
    *owes = strchr("QPBEDCSF", m[0]) && m[0] ? (char)m[0] : '\0';
    switch (m[0]) {
    case 'Q':
        *commit = s1 && is_commit(s1);
        break;
    case 'P': /* Parse: statement name, text (an unnamed one replaces the unnamed statement) */
        if (s1 && s2)
            rc = names_set(&c->stmts, s1, is_commit(s2));
        break;
    case 'B': /* Bind: portal name, statement name */
        if (s1 && s2)
            rc = names_set(&c->portals, s1, names_find(&c->stmts, s2) >= 0);
        break;
    case 'E': /* Execute: portal name */
        *commit = s1 && names_find(&c->portals, s1) >= 0;
        break;
    case 'C': /* Close: 'S' or 'P', name */
        if (total > 6 && (s1 = cstr(body + 1, total - 6)))
            rc = names_set(body[0] == 'S' ? &c->stmts : &c->portals, s1, 0);
        break;
    default:
        break;
    }
    return rc;
}

static void forward(fp_conn *c, struct evbuffer *in, size_t n)
{
    evbuffer_remove_buffer(in, bufferevent_get_output(c->srv), n);
    c->p->counts.bytes_up += (long)n;
    if (c->budget >= 0)
        c->budget -= (long)n;
}

/* The fault armed by fp_on_commit, if any, for this COMMIT. */
static int take_commit_fault(fp_proxy *p)
{
    int what = p->commit_what;
    if (what == FP_COMMIT_PASS)
        return 0;
    p->counts.commit_faults++;
    if (p->commit_left > 0 && --p->commit_left == 0)
        p->commit_what = FP_COMMIT_PASS;
    return what;
}

/* Client to server, whole messages only (the faults act on message boundaries). */
static void pump_c2s(fp_conn *c)
{
    fp_proxy *p = c->p;
    int rest = 0; /* forwarding the rest of the write whose COMMIT is cut after */
    while (cli_open(c)) {
        struct evbuffer *in = bufferevent_get_input(c->cli);
        size_t have = evbuffer_get_length(in);
        if (have == 0)
            break;
        if (c->c2s_drop || !srv_open(c)) {
            evbuffer_drain(in, have);
            break;
        }
        if (p->stall)
            break;
        long total = next_message(c, in);
        if (total == 0)
            break;
        if (total < 0) {
            conn_cut(c, 0);
            break;
        }
        unsigned char *m = evbuffer_pullup(in, total);
        char type = '\0'; /* (m is gone once forwarded) */
        if (c->startup) {
            uint32_t code = total >= 8 ? be32(m + 4) : 0;
            if (code == SSL_REQUEST || code == GSSENC_REQUEST) { /* plain text, please */
                evbuffer_drain(in, (size_t)total);
                bufferevent_write(c->cli, "N", 1);
                continue;
            }
            c->startup = 0; /* a startup packet or a CancelRequest: forwarded as is */
        } else {
            char owes;
            int commit;
            type = (char)m[0];
            if (client_message(c, m, (size_t)total, &owes, &commit) != 0 ||
                (owes && owed_push(&c->owed, owes) != 0)) {
                conn_cut(c, 0); /* out of memory */
                break;
            }
            int what = 0;
            if (commit && !rest) {
                p->counts.commits++;
                what = take_commit_fault(p);
            }
            if (what) {
                c->fault = what;
                c->replies_before = p->commit_replies;
                c->commit_seq = owed_last(&c->owed);
                c->boundary = c->commit_seq - 1;
                if (what == FP_COMMIT_CUT_BEFORE) {
                    /* The server sends replies only at a Flush or Sync; those after the last
                     * one would wait for COMMIT's own Sync, which it never gets. */
                    c->boundary = c->flush_mark;
                    evbuffer_drain(in, evbuffer_get_length(in));
                    c->c2s_drop = 1;
                    break;
                }
                rest = what == FP_COMMIT_CUT_AFTER;
            }
        }
        if (c->budget >= 0 && total >= c->budget) {
            forward(c, in, (size_t)c->budget);
            conn_cut(c, 1);
            break;
        }
        forward(c, in, (size_t)total);
        if (type && strchr("HSQF", type))
            c->flush_mark = owed_last(&c->owed);
    }
    if (rest) {
        c->c2s_drop = 1;
        if (cli_open(c)) {
            struct evbuffer *in = bufferevent_get_input(c->cli);
            evbuffer_drain(in, evbuffer_get_length(in));
        }
    }
    if (c->fault && !c->waiting) {
        if (!c->replies_before || c->owed.base > c->boundary) {
            commit_act(c);
        } else {
            c->waiting = 1;
            add_timer(c->timer, REPLIES_WAIT_MS);
        }
    }
}

static void on_cli_read(struct bufferevent *bev, void *arg)
{
    (void)bev;
    fp_conn *c = arg;
    if (c->last != 1)
        c->p->turns++;
    c->last = 1;
    pump_c2s(c);
    conn_settle(c);
}

static void on_srv_read(struct bufferevent *bev, void *arg)
{
    (void)bev;
    fp_conn *c = arg;
    c->last = 2;
    pump_s2c(c, 0);
    conn_settle(c);
}

static void on_cli_event(struct bufferevent *bev, short what, void *arg)
{
    (void)bev;
    fp_conn *c = arg;
    if (what & (BEV_EVENT_EOF | BEV_EVENT_ERROR)) {
        pump_c2s(c); /* whole messages still buffered (a Terminate) */
        side_close(c, c->cli, 0);
        if (c->held)
            c->held = 0;
        /* a fault under way closes the server side itself (when COMMIT is answered) */
        if (!c->waiting && !c->linger)
            side_close(c, c->srv, 1);
        else
            apply_reading(c);
    }
    conn_settle(c);
}

static void on_srv_event(struct bufferevent *bev, short what, void *arg)
{
    (void)bev;
    fp_conn *c = arg;
    if (what & BEV_EVENT_CONNECTED) {
        apply_reading(c);
        pump_c2s(c);
    } else if (what & (BEV_EVENT_EOF | BEV_EVENT_ERROR)) {
        pump_s2c(c, 1); /* its last words (a FATAL) */
        c->waiting = c->linger = 0;
        side_close(c, c->srv, 0);
        side_close(c, c->cli, 1);
    }
    conn_settle(c);
}

static void on_accept(struct evconnlistener *l, evutil_socket_t fd, struct sockaddr *sa, int len,
                      void *arg)
{
    (void)l;
    (void)sa;
    (void)len;
    fp_proxy *p = arg;
    fp_conn *c = calloc(1, sizeof *c);
    int sfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons((uint16_t)p->target)};
    to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    /* No Nagle on either hop, as libpq and the server do on theirs: a reply the proxy forwards
     * in two writes must not wait for the peer's delayed ACK. */
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (sfd >= 0)
        setsockopt(sfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (c)
        c->timer = evtimer_new(p->base, on_conn_timer, c);
    if (c && c->timer && sfd >= 0) {
        c->cli = bufferevent_socket_new(p->base, fd, BEV_OPT_CLOSE_ON_FREE);
        if (c->cli)
            fd = -1;
        c->srv = bufferevent_socket_new(p->base, sfd, BEV_OPT_CLOSE_ON_FREE);
        if (c->srv)
            sfd = -1;
    }
    if (!c || !c->timer || !c->cli || !c->srv ||
        bufferevent_socket_connect(c->srv, (struct sockaddr *)&to, sizeof to) != 0) {
        if (c) {
            if (c->cli)
                bufferevent_free(c->cli);
            if (c->srv)
                bufferevent_free(c->srv);
            if (c->timer)
                event_free(c->timer);
            free(c);
        }
        if (fd >= 0)
            close(fd);
        if (sfd >= 0)
            close(sfd);
        return;
    }
    c->p = p;
    c->id = ++p->next_id;
    c->startup = 1;
    c->flush_mark = -1;
    c->budget = p->cut_bytes > 0 ? p->cut_bytes : -1;
    c->drip_left = p->drip_bytes;
    c->next = p->conns;
    if (p->conns)
        p->conns->prev = c;
    p->conns = c;
    p->counts.connections++;
    p->counts.open++;
    bufferevent_setcb(c->cli, on_cli_read, NULL, on_cli_event, c);
    bufferevent_setcb(c->srv, on_srv_read, NULL, on_srv_event, c);
    apply_reading(c);
}

/* Run f on every connection (each may be freed by it). */
static void each_conn(fp_proxy *p, void (*f)(fp_conn *c))
{
    for (fp_conn *c = p->conns, *next; c; c = next) {
        next = c->next;
        f(c);
        conn_settle(c);
    }
}

static void cut_hard(fp_conn *c)
{
    conn_cut(c, 0);
}

static void resume(fp_conn *c)
{
    apply_reading(c);
    pump_c2s(c);
    pump_s2c(c, 0);
}

static void release(fp_conn *c)
{
    c->held = 0;
    resume(c);
}

static void on_cut_timer(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    cut_timer *t = arg;
    fp_proxy *p = t->p;
    for (fp_conn *c = p->conns, *next; c; c = next) {
        next = c->next;
        if (c->id <= t->upto)
            conn_cut(c, 0);
        conn_settle(c);
    }
    for (cut_timer **pp = &p->cut_timers; *pp; pp = &(*pp)->next)
        if (*pp == t) {
            *pp = t->next;
            break;
        }
    event_free(t->ev);
    free(t);
}

static void on_drip(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    fp_proxy *p = arg;
    for (fp_conn *c = p->conns, *next; c; c = next) {
        next = c->next;
        c->drip_left = p->drip_bytes;
        pump_s2c(c, 0);
        conn_settle(c);
    }
}

static void set_budget(fp_conn *c)
{
    c->budget = c->p->cut_bytes > 0 ? c->p->cut_bytes : -1;
}

/* A control call, on the proxy thread. */
static void apply(fp_proxy *p, fp_cmd *k)
{
    switch (k->op) {
    case OP_CUT:
        each_conn(p, cut_hard);
        break;
    case OP_CUT_MS: {
        cut_timer *t = calloc(1, sizeof *t);
        if (!t)
            break;
        t->p = p;
        t->upto = p->next_id;
        if (!(t->ev = evtimer_new(p->base, on_cut_timer, t))) {
            free(t);
            break;
        }
        t->next = p->cut_timers;
        p->cut_timers = t;
        add_timer(t->ev, k->a > 0 ? (int)k->a : 0);
        break;
    }
    case OP_CUT_BYTES:
        p->cut_bytes = k->a;
        each_conn(p, set_budget);
        break;
    case OP_STALL:
        p->stall = (int)k->a;
        each_conn(p, resume);
        break;
    case OP_STALL_REPLIES:
        p->stall_replies = (int)k->a;
        each_conn(p, k->a ? apply_reading : release);
        break;
    case OP_DRIP:
        p->drip_bytes = k->a > 0 ? (int)k->a : 0;
        if (p->drip_ev) {
            event_free(p->drip_ev);
            p->drip_ev = NULL;
        }
        if (p->drip_bytes > 0 && (p->drip_ev = event_new(p->base, -1, EV_PERSIST, on_drip, p)))
            add_timer(p->drip_ev, k->b > 0 ? (int)k->b : 1);
        on_drip(-1, 0, p); /* the first allowance now; without a drip, what was held */
        break;
    case OP_COMMIT:
        p->commit_what = (int)k->a;
        p->commit_left = k->b > 0 ? (int)k->b : 0;
        p->commit_replies = k->c != 0;
        break;
    case OP_TURNS:
        k->turns = p->turns;
        break;
    case OP_RESET_TURNS:
        p->turns = 0;
        for (fp_conn *c = p->conns; c; c = c->next)
            c->last = 0;
        break;
    case OP_COUNTS:
        k->counts = p->counts;
        break;
    case OP_STOP:
        event_base_loopbreak(p->base);
        break;
    default:
        break;
    }
}

static void on_wake(evutil_socket_t fd, short what, void *arg)
{
    (void)what;
    fp_proxy *p = arg;
    char b[64];
    while (read(fd, b, sizeof b) > 0)
        ;
    for (;;) {
        pthread_mutex_lock(&p->mu);
        fp_cmd *k = p->head;
        if (k && !(p->head = k->next))
            p->tail = NULL;
        pthread_mutex_unlock(&p->mu);
        if (!k)
            break;
        apply(p, k);
        pthread_mutex_lock(&p->mu);
        k->done = 1;
        pthread_cond_broadcast(&p->cv);
        pthread_mutex_unlock(&p->mu);
    }
}

/* Post a command and wait until the proxy thread has applied it. */
static void call(fp_proxy *p, fp_cmd *k)
{
    pthread_mutex_lock(&p->mu);
    if (p->tail)
        p->tail->next = k;
    else
        p->head = k;
    p->tail = k;
    pthread_mutex_unlock(&p->mu);
    /* A full pipe already holds a wake-up: EAGAIN is fine. */
    ssize_t w;
    do
        w = write(p->wake[1], "w", 1);
    while (w < 0 && errno == EINTR);
    pthread_mutex_lock(&p->mu);
    while (!k->done)
        pthread_cond_wait(&p->cv, &p->mu);
    pthread_mutex_unlock(&p->mu);
}

static void command(fp_proxy *p, int op, long a, long b, long c)
{
    fp_cmd k = {.op = op, .a = a, .b = b, .c = c};
    call(p, &k);
}

static void *proxy_main(void *arg)
{
    fp_proxy *p = arg;
    event_base_dispatch(p->base); /* until OP_STOP */
    return NULL;
}

/* Free everything; the thread is not running (never started, or joined). */
static void proxy_free(fp_proxy *p)
{
    while (p->conns) {
        fp_conn *c = p->conns;
        if (c->cli)
            side_free(c, c->cli);
        if (c->srv)
            side_free(c, c->srv);
        conn_settle(c);
    }
    while (p->cut_timers) {
        cut_timer *t = p->cut_timers;
        p->cut_timers = t->next;
        event_free(t->ev);
        free(t);
    }
    if (p->drip_ev)
        event_free(p->drip_ev);
    if (p->listener)
        evconnlistener_free(p->listener);
    if (p->wake_ev)
        event_free(p->wake_ev);
    if (p->base)
        event_base_free(p->base);
    if (p->wake[0] >= 0)
        close(p->wake[0]);
    if (p->wake[1] >= 0)
        close(p->wake[1]);
    pthread_cond_destroy(&p->cv);
    pthread_mutex_destroy(&p->mu);
    free(p);
}

/* An event base whose timers keep to the millisecond (a timerfd), so a drip of N bytes every
 * ms is that, not every 2 ms. */
static struct event_base *precise_base(void)
{
    struct event_config *cfg = event_config_new();
    if (!cfg)
        return NULL;
    event_config_set_flag(cfg, EVENT_BASE_FLAG_PRECISE_TIMER);
    struct event_base *base = event_base_new_with_config(cfg);
    event_config_free(cfg);
    return base;
}

fp_proxy *fp_start(int target_port)
{
    fp_proxy *p = calloc(1, sizeof *p);
    if (!p)
        return NULL;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    p->wake[0] = p->wake[1] = -1;
    p->target = target_port;
    struct sockaddr_in a = {.sin_family = AF_INET};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t alen = sizeof a;
    if (target_port <= 0 || target_port > 65535 || pipe2(p->wake, O_NONBLOCK | O_CLOEXEC) != 0 ||
        !(p->base = precise_base()) ||
        !(p->wake_ev = event_new(p->base, p->wake[0], EV_READ | EV_PERSIST, on_wake, p)) ||
        event_add(p->wake_ev, NULL) != 0 ||
        !(p->listener = evconnlistener_new_bind(
              p->base, on_accept, p, LEV_OPT_CLOSE_ON_FREE | LEV_OPT_CLOSE_ON_EXEC, -1,
              (struct sockaddr *)&a, sizeof a)) ||
        getsockname(evconnlistener_get_fd(p->listener), (struct sockaddr *)&a, &alen) != 0) {
        proxy_free(p);
        return NULL;
    }
    p->port = ntohs(a.sin_port);
    /* The thread starts with SIGPIPE blocked: a write to a socket its peer closed fails with
     * EPIPE there instead of killing the process (the signal stays pending on that thread). */
    sigset_t pipe_set, old;
    sigemptyset(&pipe_set);
    sigaddset(&pipe_set, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe_set, &old);
    int rc = pthread_create(&p->tid, NULL, proxy_main, p);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        proxy_free(p);
        return NULL;
    }
    return p;
}

int fp_port(const fp_proxy *p)
{
    return p->port;
}

void fp_stop(fp_proxy *p)
{
    if (!p)
        return;
    command(p, OP_STOP, 0, 0, 0);
    pthread_join(p->tid, NULL);
    proxy_free(p);
}

void fp_cut(fp_proxy *p)
{
    command(p, OP_CUT, 0, 0, 0);
}

void fp_cut_after_ms(fp_proxy *p, int ms)
{
    command(p, OP_CUT_MS, ms, 0, 0);
}

void fp_cut_after_bytes(fp_proxy *p, long bytes)
{
    command(p, OP_CUT_BYTES, bytes, 0, 0);
}

void fp_stall(fp_proxy *p, int on)
{
    command(p, OP_STALL, on != 0, 0, 0);
}

void fp_stall_replies(fp_proxy *p, int on)
{
    command(p, OP_STALL_REPLIES, on != 0, 0, 0);
}

void fp_drip(fp_proxy *p, int bytes, int every_ms)
{
    command(p, OP_DRIP, bytes, every_ms, 0);
}

void fp_on_commit(fp_proxy *p, fp_commit_fault what, int count, int replies_before)
{
    command(p, OP_COMMIT, what, count, replies_before);
}

int fp_turns(fp_proxy *p)
{
    fp_cmd k = {.op = OP_TURNS};
    call(p, &k);
    return k.turns;
}

void fp_reset_turns(fp_proxy *p)
{
    command(p, OP_RESET_TURNS, 0, 0, 0);
}

void fp_get_counts(fp_proxy *p, fp_counts *out)
{
    fp_cmd k = {.op = OP_COUNTS};
    call(p, &k);
    *out = k.counts;
}

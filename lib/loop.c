/* The libevent adapter: socket watchers, timers, deferred calls and worker-thread jobs. The
 * bottom of the stack next to error.c; the connection layer reaches libevent only through it. */
#include "loop.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <netdb.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

#include <event2/dns.h>
#include <event2/event.h>
#include <event2/util.h>

struct loop_ev {
    struct event *ev;
    struct event_base *base;
    loop_fn fn;
    void *arg;
    int fd;    /* what the event is assigned to now, -1 for timers and deferred calls */
    short how; /* libevent flags of the current assignment */
};

static void on_event(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    loop_ev *e = arg;
    int w = (what & EV_READ ? LOOP_READ : 0) | (what & EV_WRITE ? LOOP_WRITE : 0) |
            (what & EV_TIMEOUT ? LOOP_TIMEOUT : 0);
    e->fn(e->arg, w);
}

loop_ev *loop_ev_new(struct event_base *base, loop_fn fn, void *arg)
{
    loop_ev *e = calloc(1, sizeof *e);
    if (!e)
        return NULL;
    e->base = base;
    e->fn = fn;
    e->arg = arg;
    e->fd = -1;
    e->ev = event_new(base, -1, 0, on_event, e);
    if (!e->ev) {
        free(e);
        return NULL;
    }
    return e;
}

/* libevent forbids event_assign on a pending event: delete, assign, add. */
static int reassign(loop_ev *e, int fd, short how, const struct timeval *tv)
{
    event_del(e->ev);
    if (event_assign(e->ev, e->base, fd, how, on_event, e) != 0)
        return -1;
    e->fd = fd;
    e->how = how;
    return event_add(e->ev, tv);
}

static short io_flags(int want)
{
    return (short)((want & LOOP_READ ? EV_READ : 0) | (want & LOOP_WRITE ? EV_WRITE : 0));
}

int loop_ev_watch(loop_ev *e, int fd, int want)
{
    short how = (short)(io_flags(want) | EV_PERSIST);
    if (e->fd == fd && e->how == how && event_pending(e->ev, EV_READ | EV_WRITE, NULL))
        return 0;
    return reassign(e, fd, how, NULL);
}

int loop_ev_watch_once(loop_ev *e, int fd, int want)
{
    return reassign(e, fd, io_flags(want), NULL);
}

int loop_ev_timer(loop_ev *e, int ms)
{
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    return reassign(e, -1, 0, &tv);
}

void loop_ev_post(loop_ev *e)
{
    /* Activating an already active event only merges flags: it still runs once. */
    event_active(e->ev, 0, 0);
}

void loop_ev_stop(loop_ev *e)
{
    event_del(e->ev);
}

void loop_ev_free(loop_ev *e)
{
    if (!e)
        return;
    event_free(e->ev); /* event_free deletes a pending or active event first */
    free(e);
}

/* ---- worker-thread jobs ---- */

/* The thread is joinable: a job the loop waits for is joined (the thread has already written
 * its byte, so the join is brief) and everything is closed before `done` runs, so a caller
 * counting descriptors after `done` sees none left. An abandoned job is detached and the thread
 * cleans up after itself; the mutex makes "finished" and "abandoned" one decision. */
struct loop_job {
    pthread_mutex_t mu;
    pthread_t tid;
    int finished;  /* the thread wrote its byte */
    int abandoned; /* the loop stopped waiting */
    int wake[2];
    struct event *ev;
    void (*work)(void *);
    void (*done)(void *);
    void (*release)(void *);
    void *arg;
};

static void job_free(loop_job *j)
{
    if (j->release)
        j->release(j->arg);
    close(j->wake[0]);
    close(j->wake[1]);
    pthread_mutex_destroy(&j->mu);
    free(j);
}

static void *job_thread(void *p)
{
    loop_job *j = p;
    j->work(j->arg);
    pthread_mutex_lock(&j->mu);
    if (j->abandoned) {
        pthread_mutex_unlock(&j->mu);
        job_free(j);
        return NULL;
    }
    j->finished = 1;
    /* The read end stays open until the loop has read this: no SIGPIPE is possible. */
    ssize_t n;
    do
        n = write(j->wake[1], "x", 1);
    while (n < 0 && errno == EINTR);
    pthread_mutex_unlock(&j->mu);
    return NULL;
}

static void job_woken(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    loop_job *j = arg;
    event_free(j->ev);
    pthread_join(j->tid, NULL);
    void (*done)(void *) = j->done;
    void *done_arg = j->arg;
    j->release = NULL;
    job_free(j);
    done(done_arg);
}

loop_job *loop_job_start(struct event_base *base, void (*work)(void *), void (*done)(void *),
                         void *arg)
{
    loop_job *j = calloc(1, sizeof *j);
    if (!j)
        return NULL;
    if (pipe2(j->wake, O_CLOEXEC) != 0) {
        free(j);
        return NULL;
    }
    j->work = work;
    j->done = done;
    j->arg = arg;
    pthread_mutex_init(&j->mu, NULL);
    j->ev = event_new(base, j->wake[0], EV_READ, job_woken, j);
    if (!j->ev || event_add(j->ev, NULL) != 0 || pthread_create(&j->tid, NULL, job_thread, j)) {
        if (j->ev)
            event_free(j->ev);
        job_free(j);
        return NULL;
    }
    return j;
}

void loop_job_abandon(loop_job *j, void (*release)(void *))
{
    event_free(j->ev);
    pthread_mutex_lock(&j->mu);
    j->release = release;
    if (!j->finished) {
        j->abandoned = 1;
        pthread_detach(j->tid);
        pthread_mutex_unlock(&j->mu);
        return; /* the thread frees the job when its work returns */
    }
    pthread_mutex_unlock(&j->mu);
    pthread_join(j->tid, NULL);
    job_free(j);
}

/* ---- host name lookups ---- */

struct loop_lookup {
    struct evdns_base *dns;
    struct evdns_getaddrinfo_request *req;
    struct event *deliver;
    loop_resolved_fn fn; /* NULL once cancelled */
    void *arg;
    int answered;
    char *addrs;
    char why[160];
};

/* Runs from the loop after evdns answered (or was cancelled): never inside evdns's own
 * callback, where freeing its base is not allowed. */
static void lookup_deliver(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    loop_lookup *lk = arg;
    if (lk->fn)
        lk->fn(lk->arg, lk->addrs, lk->addrs ? NULL : lk->why);
    event_free(lk->deliver);
    evdns_base_free(lk->dns, 0);
    free(lk->addrs);
    free(lk);
}

static char *join_addrs(const struct evutil_addrinfo *ai)
{
    size_t cap = 1, len = 0;
    for (const struct evutil_addrinfo *a = ai; a; a = a->ai_next)
        cap += INET6_ADDRSTRLEN + 1;
    char *out = malloc(cap);
    if (!out)
        return NULL;
    out[0] = '\0';
    for (const struct evutil_addrinfo *a = ai; a; a = a->ai_next) {
        char buf[INET6_ADDRSTRLEN];
        const void *src = a->ai_family == AF_INET6
                              ? (const void *)&((struct sockaddr_in6 *)a->ai_addr)->sin6_addr
                              : (const void *)&((struct sockaddr_in *)a->ai_addr)->sin_addr;
        if ((a->ai_family != AF_INET && a->ai_family != AF_INET6) ||
            !evutil_inet_ntop(a->ai_family, src, buf, sizeof buf) || strstr(out, buf))
            continue;
        len += (size_t)snprintf(out + len, cap - len, "%s%s", len ? "," : "", buf);
    }
    if (len == 0) {
        free(out);
        return NULL;
    }
    return out;
}

static void lookup_answered(int result, struct evutil_addrinfo *res, void *arg)
{
    loop_lookup *lk = arg;
    lk->answered = 1;
    lk->req = NULL;
    if (result == 0) {
        lk->addrs = join_addrs(res);
        if (!lk->addrs)
            snprintf(lk->why, sizeof lk->why, "no usable address");
    } else {
        snprintf(lk->why, sizeof lk->why, "%s", evutil_gai_strerror(result));
    }
    if (res)
        evutil_freeaddrinfo(res);
    event_active(lk->deliver, 0, 0);
}

loop_lookup *loop_resolve(struct event_base *base, const char *name, loop_resolved_fn fn,
                          void *arg)
{
    loop_lookup *lk = calloc(1, sizeof *lk);
    if (!lk)
        return NULL;
    lk->fn = fn;
    lk->arg = arg;
    lk->dns = evdns_base_new(base, EVDNS_BASE_INITIALIZE_NAMESERVERS);
    if (lk->dns && evdns_base_count_nameservers(lk->dns) == 0) /* no resolv.conf: still /etc/hosts */
        evdns_base_load_hosts(lk->dns, NULL);
    lk->deliver = event_new(base, -1, 0, lookup_deliver, lk);
    if (!lk->dns || !lk->deliver) {
        if (lk->deliver)
            event_free(lk->deliver);
        if (lk->dns)
            evdns_base_free(lk->dns, 0);
        free(lk);
        return NULL;
    }
    struct evutil_addrinfo hints = {0};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_protocol = IPPROTO_TCP;
    hints.ai_flags = EVUTIL_AI_ADDRCONFIG;
    /* May answer at once (hosts file, cache): lookup_answered then defers delivery itself. */
    struct evdns_getaddrinfo_request *req =
        evdns_getaddrinfo(lk->dns, name, NULL, &hints, lookup_answered, lk);
    if (!lk->answered)
        lk->req = req;
    return lk;
}

void loop_lookup_cancel(loop_lookup *lk)
{
    lk->fn = NULL;
    if (lk->req) /* evdns then answers with EVUTIL_EAI_CANCEL, and delivery frees the lookup */
        evdns_getaddrinfo_cancel(lk->req);
}

int loop_is_numeric_host(const char *host)
{
    unsigned char buf[sizeof(struct in6_addr)];
    return evutil_inet_pton(AF_INET, host, buf) == 1 || evutil_inet_pton(AF_INET6, host, buf) == 1;
}

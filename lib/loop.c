/* The libevent adapter: socket watchers, timers, deferred calls and worker-thread jobs. The
 * bottom of the stack next to error.c; the connection layer reaches libevent only through it. */
#include "loop.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

#include <event2/event.h>

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

struct loop_job {
    pthread_mutex_t mu;
    int refs; /* the thread's and the loop's; the last to let go frees the job */
    int wake[2];
    struct event *ev;
    void (*work)(void *);
    void (*done)(void *);
    void (*release)(void *);
    void *arg;
};

static void job_unref(loop_job *j)
{
    pthread_mutex_lock(&j->mu);
    int last = --j->refs == 0;
    pthread_mutex_unlock(&j->mu);
    if (!last)
        return;
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
    /* Both pipe ends live until the last reference goes, so this write can never raise
     * SIGPIPE, even when the loop has abandoned the job. */
    ssize_t n;
    do
        n = write(j->wake[1], "x", 1);
    while (n < 0 && errno == EINTR);
    job_unref(j);
    return NULL;
}

static void job_woken(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    loop_job *j = arg;
    event_free(j->ev);
    j->done(j->arg);
    job_unref(j);
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
    j->refs = 2;
    pthread_mutex_init(&j->mu, NULL);
    j->ev = event_new(base, j->wake[0], EV_READ, job_woken, j);
    pthread_attr_t attr;
    pthread_t tid;
    int ok = j->ev && event_add(j->ev, NULL) == 0 && pthread_attr_init(&attr) == 0;
    if (ok) {
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        ok = pthread_create(&tid, &attr, job_thread, j) == 0;
        pthread_attr_destroy(&attr);
    }
    if (!ok) {
        if (j->ev)
            event_free(j->ev);
        close(j->wake[0]);
        close(j->wake[1]);
        pthread_mutex_destroy(&j->mu);
        free(j);
        return NULL;
    }
    return j;
}

void loop_job_abandon(loop_job *j, void (*release)(void *))
{
    event_free(j->ev);
    pthread_mutex_lock(&j->mu);
    j->release = release;
    pthread_mutex_unlock(&j->mu);
    job_unref(j);
}

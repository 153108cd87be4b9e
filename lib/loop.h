/* Internal: the libevent adapter. The only file that touches libevent, as hiredis keeps its
 * loop glue in adapters/libevent.h. Layers above see socket watchers, timers, deferred calls
 * and off-loop jobs, each with an explicit free. */
#ifndef PGS_LOOP_H
#define PGS_LOOP_H

struct event_base;

enum { LOOP_READ = 1, LOOP_WRITE = 2, LOOP_TIMEOUT = 4 };

typedef void (*loop_fn)(void *arg, int what);

/* One libevent event used as a socket watcher, a timer or a deferred call. */
typedef struct loop_ev loop_ev;

loop_ev *loop_ev_new(struct event_base *base, loop_fn fn, void *arg);
/* Watch fd for `want` (LOOP_READ | LOOP_WRITE); persistent until changed or stopped. Any
 * earlier watch is removed first (never re-assign a pending event); a no-op when fd and want
 * are what is already watched. Returns 0 or -1. */
int loop_ev_watch(loop_ev *ev, int fd, int want);
/* Watch fd once for `want` (the connect handshake: the socket may change between steps). */
int loop_ev_watch_once(loop_ev *ev, int fd, int want);
/* Fire once after ms milliseconds (replaces any earlier schedule). */
int loop_ev_timer(loop_ev *ev, int ms);
/* Fire once on the next loop iteration with what = 0: a deferred call, so callbacks never run
 * inside the API call that scheduled them. Posting a posted event is a no-op. */
void loop_ev_post(loop_ev *ev);
/* Remove whatever is scheduled. */
void loop_ev_stop(loop_ev *ev);
void loop_ev_free(loop_ev *ev);

/* A blocking function run on a worker thread; `done` then runs on the loop. The worker wakes
 * the loop through a pipe, so the caller's event_base needs no evthread_use_pthreads(). */
typedef struct loop_job loop_job;

/* Start work(arg) on a new thread; done(arg) runs on the loop after it returns, unless the job
 * was abandoned first. Returns NULL when no thread or pipe could be had (nothing runs). */
loop_job *loop_job_start(struct event_base *base, void (*work)(void *), void (*done)(void *),
                         void *arg);
/* The loop stops waiting: done never runs. release(arg) runs once, on the worker thread when
 * work returns later, or at once when it has already returned. */
void loop_job_abandon(loop_job *job, void (*release)(void *));

#endif

/* Host name lookup with libevent's evdns, so a name never blocks the loop (libpq would
 * resolve it inside PQconnectPoll, on the loop thread). fn runs from the loop with every
 * address of the name as a comma-separated numeric list, or with NULL and a reason. */
typedef struct loop_lookup loop_lookup;
typedef void (*loop_resolved_fn)(void *arg, const char *addrs, const char *why);

/* Returns NULL when no resolver could be set up (fn never runs). */
loop_lookup *loop_resolve(struct event_base *base, const char *name, loop_resolved_fn fn,
                          void *arg);
/* fn never runs after this; the lookup frees itself from the loop. */
void loop_lookup_cancel(loop_lookup *lk);

/* Is this a numeric IPv4 or IPv6 address (no lookup needed)? */
int loop_is_numeric_host(const char *host);

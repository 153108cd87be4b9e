/* Shared test fixtures (see helpers.h). Tests create loops and connections inside the test, in
 * Check's forked child: a libpq connection must not cross a fork. */
#include "helpers.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int fds_at_begin;

double th_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int th_count_fds(void)
{
    int n = 0;
    DIR *d = opendir("/proc/self/fd");
    ck_assert_ptr_nonnull(d);
    for (struct dirent *e; (e = readdir(d));)
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n - 1; /* the DIR's own descriptor */
}

const char *th_conninfo(const char *extra)
{
    static char buf[2048];
    const char *base = getenv("PGSCOPE_TEST_CONNINFO");
    if (!base || !*base)
        ck_abort_msg("PGSCOPE_TEST_CONNINFO is not set: run the suite with meson test (it starts "
                     "a throwaway server) or tools/run-tests");
    snprintf(buf, sizeof buf, "%s %s", base, extra ? extra : "");
    return buf;
}

const char *th_conninfo_value(const char *keyword)
{
    static char buf[256];
    buf[0] = '\0';
    PQconninfoOption *opts = PQconninfoParse(th_conninfo(NULL), NULL);
    ck_assert_ptr_nonnull(opts);
    for (PQconninfoOption *o = opts; o->keyword; o++)
        if (strcmp(o->keyword, keyword) == 0 && o->val)
            snprintf(buf, sizeof buf, "%s", o->val);
    PQconninfoFree(opts);
    return buf;
}

struct event_base *th_loop_begin(void)
{
    fds_at_begin = th_count_fds();
    struct event_base *b = event_base_new();
    ck_assert_ptr_nonnull(b);
    return b;
}

void th_loop_end(struct event_base *base)
{
    int r = event_base_dispatch(base);
    ck_assert_msg(r == 1, "the loop still had events after the test (dispatch returned %d)", r);
    event_base_free(base);
    ck_assert_int_eq(th_count_fds(), fds_at_begin);
}

static void on_deadline(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    *(int *)arg = 1;
}

void th_run_until(struct event_base *base, const int *flag, double seconds)
{
    int expired = 0;
    struct event *t = evtimer_new(base, on_deadline, &expired);
    struct timeval tv = {(long)seconds, (long)((seconds - (long)seconds) * 1e6)};
    evtimer_add(t, &tv);
    while (!*flag && !expired)
        event_base_loop(base, EVLOOP_ONCE);
    event_free(t);
    ck_assert_msg(*flag, "timed out after %.1f s waiting for a callback", seconds);
}

typedef struct open_wait {
    int fired;
    pgs_error err;
    int ok;
} open_wait;

static void on_open_wait(pgs_conn *c, const pgs_error *err, void *arg)
{
    (void)c;
    open_wait *w = arg;
    w->fired++;
    w->ok = err == NULL;
    if (err)
        w->err = *err;
}

pgs_conn *th_open(struct event_base *base, const pgs_conn_opts *opts)
{
    open_wait w = {0};
    pgs_conn *c = NULL;
    ck_assert_int_eq(pgs_conn_open(base, th_conninfo(NULL), opts, on_open_wait, &w, &c), PGS_OK);
    th_run_until(base, &w.fired, 15);
    ck_assert_msg(w.ok, "connect failed: %s", w.err.message);
    return c;
}

static void on_done_count(void *arg)
{
    (*(int *)arg)++;
}

void th_close(struct event_base *base, pgs_conn *c)
{
    int done = 0;
    ck_assert_int_eq(pgs_conn_close(c, on_done_count, &done), PGS_OK);
    ck_assert_int_eq(done, 0); /* never from inside the call */
    th_run_until(base, &done, 10);
    ck_assert_int_eq(done, 1);
}

/* A fresh connection per call, closed before returning, so no test leaves a descriptor. */
static PGconn *observer(void)
{
    PGconn *pg = PQconnectdb(th_conninfo(NULL));
    ck_assert_msg(PQstatus(pg) == CONNECTION_OK, "observer: %s", PQerrorMessage(pg));
    return pg;
}

char *th_scalar(const char *sql, int nparams, const char *const *values)
{
    PGconn *pg = observer();
    PGresult *r = PQexecParams(pg, sql, nparams, NULL, values, NULL, NULL, 0);
    ExecStatusType st = PQresultStatus(r);
    ck_assert_msg(st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK, "observer: %s: %s", sql,
                  PQresultErrorMessage(r));
    char *v = NULL;
    if (st == PGRES_TUPLES_OK && PQntuples(r) > 0 && !PQgetisnull(r, 0, 0))
        v = strdup(PQgetvalue(r, 0, 0));
    PQclear(r);
    PQfinish(pg);
    return v;
}

long th_scalar_long(const char *sql, int nparams, const char *const *values)
{
    char *v = th_scalar(sql, nparams, values);
    ck_assert_msg(v != NULL, "observer: %s returned no value", sql);
    long n = atol(v);
    free(v);
    return n;
}

void th_wait_backend_gone(int pid, double seconds)
{
    char p[16];
    snprintf(p, sizeof p, "%d", pid);
    const char *v[] = {p};
    double end = th_now() + seconds;
    long n;
    while ((n = th_scalar_long("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", 1, v)) &&
           th_now() < end)
        usleep(20000);
    ck_assert_msg(n == 0, "backend %d still in pg_stat_activity after %.1f s", pid, seconds);
}

static int loopback_socket(int *port, int do_listen)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    ck_assert_int_ge(fd, 0);
    struct sockaddr_in a = {.sin_family = AF_INET};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ck_assert_int_eq(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    if (do_listen)
        ck_assert_int_eq(listen(fd, 16), 0);
    socklen_t len = sizeof a;
    ck_assert_int_eq(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    *port = ntohs(a.sin_port);
    return fd;
}

int th_silent_listener(int *port)
{
    return loopback_socket(port, 1);
}

int th_closed_port(void)
{
    int port;
    close(loopback_socket(&port, 0));
    return port;
}

int th_run_suite(Suite *s)
{
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? 0 : 1;
}

/* Shared test fixtures (see helpers.h). Tests create loops and connections inside the test, in
 * Check's forked child: a libpq connection must not cross a fork. */
#include "helpers.h"

#include "faultproxy.h"

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
int th_fire_seq;

void th_record(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg)
{
    (void)c;
    th_call *k = arg;
    k->fired++;
    k->seq = th_fire_seq++;
    k->at = th_now();
    k->code = err ? err->code : PGS_OK;
    if (err) {
        memcpy(k->sqlstate, err->sqlstate, sizeof k->sqlstate);
        memcpy(k->message, err->message, sizeof k->message);
    }
    if (!err && res && PQresultStatus(res) == PGRES_TUPLES_OK) {
        k->ntuples = PQntuples(res);
        if (k->ntuples > 0)
            snprintf(k->value, sizeof k->value, "%s", PQgetvalue(res, 0, 0));
    }
}

void th_on_open(pgs_conn *c, const pgs_error *err, void *arg)
{
    (void)c;
    th_open_rec *r = arg;
    r->fired++;
    r->at = th_now();
    r->ok = !err;
    if (err)
        r->err = *err;
}

void th_count_done(void *arg)
{
    (*(int *)arg)++;
}

int th_backend_pid(pgs_conn *c)
{
    PGconn *pg = pgs_conn_pgconn(c);
    ck_assert_ptr_nonnull(pg);
    return PQbackendPID(pg);
}

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
    return th_open_at(base, th_conninfo(NULL), opts);
}

pgs_conn *th_open_at(struct event_base *base, const char *conninfo, const pgs_conn_opts *opts)
{
    open_wait w = {0};
    pgs_conn *c = NULL;
    ck_assert_int_eq(pgs_conn_open(base, conninfo, opts, on_open_wait, &w, &c), PGS_OK);
    th_run_until(base, &w.fired, 15);
    ck_assert_msg(w.ok, "connect failed: %s", w.err.message);
    return c;
}

void th_close(struct event_base *base, pgs_conn *c)
{
    int done = 0;
    ck_assert_int_eq(pgs_conn_close(c, th_count_done, &done), PGS_OK);
    ck_assert_int_eq(done, 0); /* never from inside the call */
    th_run_until(base, &done, 10);
    ck_assert_int_eq(done, 1);
}

/* A fresh connection per call, closed before returning, so no test leaves a descriptor;
 * unless th_observer_keep(1) asked th_scalar to keep one until th_observer_keep(0). */
static int keep_observer;
static PGconn *kept_observer;

static void quiet(void *arg, const char *message)
{
    (void)arg;
    (void)message; /* "table does not exist, skipping" and the like */
}

static PGconn *observer(void)
{
    PGconn *pg = PQconnectdb(th_conninfo(NULL));
    ck_assert_msg(PQstatus(pg) == CONNECTION_OK, "observer: %s", PQerrorMessage(pg));
    PQsetNoticeProcessor(pg, quiet, NULL);
    return pg;
}

void th_observer_keep(int on)
{
    keep_observer = on;
    if (!on && kept_observer) {
        PQfinish(kept_observer);
        kept_observer = NULL;
    }
}

char *th_scalar(const char *sql, int nparams, const char *const *values)
{
    PGconn *pg = kept_observer ? kept_observer : observer();
    if (keep_observer)
        kept_observer = pg;
    PGresult *r = PQexecParams(pg, sql, nparams, NULL, values, NULL, NULL, 0);
    ExecStatusType st = PQresultStatus(r);
    ck_assert_msg(st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK, "observer: %s: %s", sql,
                  PQresultErrorMessage(r));
    char *v = NULL;
    if (st == PGRES_TUPLES_OK && PQntuples(r) > 0 && !PQgetisnull(r, 0, 0))
        v = strdup(PQgetvalue(r, 0, 0));
    PQclear(r);
    if (!keep_observer)
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

void th_terminate(int pid)
{
    char p[16];
    snprintf(p, sizeof p, "%d", pid);
    const char *v[] = {p};
    char *r = th_scalar("SELECT pg_terminate_backend($1)::text", 1, v);
    ck_assert_msg(r && strcmp(r, "true") == 0, "could not terminate backend %d", pid);
    free(r);
}

PGconn *th_lock_table(const char *table, const char *mode)
{
    PGconn *pg = observer();
    char sql[512];
    snprintf(sql, sizeof sql, "LOCK TABLE %s IN %s MODE", table, mode);
    PQclear(PQexec(pg, "BEGIN"));
    PGresult *r = PQexec(pg, sql);
    ck_assert_msg(PQresultStatus(r) == PGRES_COMMAND_OK, "%s: %s", sql, PQerrorMessage(pg));
    PQclear(r);
    return pg;
}

void th_unlock(PGconn *blocker)
{
    PQclear(PQexec(blocker, "COMMIT"));
    PQfinish(blocker);
}

void th_run_for(struct event_base *base, double seconds)
{
    struct timeval tv = {(long)seconds, (long)((seconds - (long)seconds) * 1e6)};
    event_base_loopexit(base, &tv);
    event_base_dispatch(base);
}

pgs_conn *th_seen_conn;

void th_note_conn(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg)
{
    (void)res;
    (void)err;
    (void)arg;
    th_seen_conn = c;
}

void th_run_until_idle_or(struct event_base *base, const int *done)
{
    double end = th_now() + 15;
    while (!*done && !(th_seen_conn && pgs_conn_txstatus(th_seen_conn) == PQTRANS_IDLE)) {
        ck_assert_msg(th_now() < end, "timed out waiting for the transaction to end");
        event_base_loop(base, EVLOOP_ONCE);
    }
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

/* ---- transactions ---- */

void th_record_tx(const pgs_tx_result *r, void *arg)
{
    th_txdone *d = arg;
    d->fired++;
    d->at = th_now();
    d->outcome = r->outcome;
    d->has_err = r->err != NULL;
    if (r->err)
        d->err = *r->err;
    memcpy(d->xid, r->xid, sizeof d->xid);
    d->attempts = r->attempts;
}

void th_fresh_table(const char *name)
{
    char sql[256];
    snprintf(sql, sizeof sql, "DROP TABLE IF EXISTS %s", name);
    free(th_scalar(sql, 0, NULL));
    snprintf(sql, sizeof sql, "CREATE TABLE %s (id int PRIMARY KEY, v text)", name);
    free(th_scalar(sql, 0, NULL));
}

long th_rows(const char *table)
{
    char sql[128];
    snprintf(sql, sizeof sql, "SELECT count(*) FROM %s", table);
    return th_scalar_long(sql, 0, NULL);
}

typedef struct resolved {
    int fired;
    pgs_txid_status status;
    int has_err;
    char message[512];
} resolved;

static void on_resolved(pgs_txid_status status, const pgs_error *err, void *arg)
{
    resolved *r = arg;
    r->fired++;
    r->status = status;
    r->has_err = err != NULL;
    if (err)
        snprintf(r->message, sizeof r->message, "%s", err->message);
}

pgs_txid_status th_resolve(struct event_base *base, const char *xid)
{
    for (double end = th_now() + 5;; usleep(20000)) {
        resolved r = {0};
        ck_assert_int_eq(pgs_tx_resolve(base, th_conninfo(NULL), xid, on_resolved, &r), PGS_OK);
        ck_assert_int_eq(r.fired, 0);
        th_run_until(base, &r.fired, 10);
        ck_assert_int_eq(r.fired, 1);
        ck_assert_msg(!r.has_err, "resolving %s: %s", xid, r.message);
        if (r.status != PGS_TXID_IN_PROGRESS)
            return r.status;
        ck_assert_msg(th_now() < end, "transaction %s still in progress after 5 s", xid);
    }
}

/* ---- the fault proxy (tools/faultproxy.c), as the suites use it ---- */

th_proxy *th_proxy_start(int target_port)
{
    th_proxy *p = fp_start(target_port);
    ck_assert_msg(p != NULL, "the fault proxy to port %d did not start", target_port);
    return p;
}

int th_proxy_port(th_proxy *p)
{
    return fp_port(p);
}

const char *th_proxy_conninfo(th_proxy *p)
{
    char extra[64];
    snprintf(extra, sizeof extra, "host=127.0.0.1 hostaddr=127.0.0.1 port=%d", fp_port(p));
    return th_conninfo(extra);
}

void th_proxy_cut(th_proxy *p)
{
    fp_cut(p);
}

void th_proxy_stall(th_proxy *p, int on)
{
    fp_stall(p, on);
}

int th_proxy_turns(th_proxy *p)
{
    return fp_turns(p);
}

void th_proxy_reset_turns(th_proxy *p)
{
    fp_reset_turns(p);
}

void th_proxy_stop(th_proxy *p)
{
    fp_stop(p);
}

void th_on_got(pgs_conn *conn, const pgs_error *err, void *arg)
{
    th_got *g = arg;
    g->fired++;
    g->seq = th_fire_seq++;
    g->conn = conn;
    g->code = err ? err->code : PGS_OK;
    g->at = th_now();
    if (err) {
        memcpy(g->sqlstate, err->sqlstate, sizeof g->sqlstate);
        snprintf(g->message, sizeof g->message, "%s", err->message);
    }
}

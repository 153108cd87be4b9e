/* The failover drill, against a real primary and a hot standby streaming from it (meson's
 * 'failover' test starts a pair of its own with tests/with-standby.sh):
 *
 *  1. the standby is made synchronous (remote_apply), and a bank is created: 100 accounts and a
 *     ledger of transfers;
 *  2. a pool over both hosts (target_session_attrs=read-write) runs transfers at concurrency 8,
 *     each with an id of its own, recording every outcome and when it came;
 *  3. about 1 s in, the primary is stopped (immediate: a crash) and the standby promoted, from
 *     a thread, while the loop goes on; transfers keep being started until 200 have committed
 *     on the new primary;
 *  4. against the new primary: how long from the stop to its first commit; no COMMITTED
 *     transfer lost, no ROLLED_BACK one there; every UNKNOWN resolved by its ledger row; money
 *     conserved and every balance its ledger's sum;
 *  5. the old primary comes back, read-only in recovery (standby.signal, no primary to follow),
 *     and 50 more transfers through the same pool (on fresh connections that meet it first in
 *     the host list) all commit on the new primary, none on the old one.
 *
 * It prints one line the README can quote ("failover: stop->first commit on new primary ...").
 * PGSCOPE_SEED picks the transfers (accounts and amounts); the seed is printed. */
#include <fcntl.h>
#include <pthread.h>
#include <spawn.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "helpers.h"

extern char **environ;

enum {
    N_ACCOUNTS = 100,
    START_BALANCE = 1000,
    CONCURRENCY = 8,
    COMMITS_AFTER_FAILOVER = 200, /* the drill ends once this many committed on the new primary */
    MORE_AFTER_RETURN = 50,       /* transfers once the old primary is back */
    MAX_XFERS = 60000,
};
#define STOP_AFTER_S 1.0      /* the primary is stopped this long into the drill */
#define FAILOVER_LIMIT_S 30.0 /* no 200 commits on the new primary by then: the test fails */
#define FIRST_COMMIT_BOUND_S 15.0 /* the stop to the first commit on the new primary, at most */

/* ---- the pair's fixtures ---- */

static const char *env_of(const char *name)
{
    const char *v = getenv(name);
    ck_assert_msg(v && *v,
                  "%s is not set: the failover drill needs a primary and a standby of its own "
                  "(meson test failover, or tests/with-standby.sh)",
                  name);
    return v;
}

static int primary_port(void)
{
    return atoi(th_conninfo_value("port"));
}

static int standby_port(void)
{
    return atoi(env_of("PGSCOPE_STANDBY_PORT"));
}

/* The standby's conninfo: the primary's (user, password, database) at the standby's port. Its
 * own static buffer (th_conninfo's is shared). */
static const char *standby_conninfo(void)
{
    static char buf[2048];
    char extra[64];
    snprintf(extra, sizeof extra, "host=127.0.0.1 port=%d", standby_port());
    snprintf(buf, sizeof buf, "%s", th_conninfo(extra));
    return buf;
}

/* tools/pgtmp.sh with ARGS, from the loop's thread (blocking), as test_replica does. */
static void pgtmp(const char *args)
{
    const char *tool = env_of("PGSCOPE_PGTMP");
    env_of("PGSCOPE_TMPDIR");
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "'%s' %s >/dev/null", tool, args);
    ck_assert_msg(system(cmd) == 0, "pgtmp.sh %s failed", args);
}

/* tools/pgtmp.sh with argv (no shell), its stdout to /dev/null; returns its exit status. Safe
 * on another thread (no Check assertions here). */
static int pgtmp_spawn(char *const argv[])
{
    posix_spawn_file_actions_t fa;
    if (posix_spawn_file_actions_init(&fa) != 0)
        return -1;
    posix_spawn_file_actions_addopen(&fa, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
    pid_t pid;
    int rc = posix_spawn(&pid, argv[0], &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    if (rc != 0)
        return -1;
    int status;
    while (waitpid(pid, &status, 0) < 0)
        ;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

/* ---- blocking sessions for the checks (the observer of helpers.h is the old primary) ---- */

static PGconn *session_at(const char *conninfo, const char *what)
{
    PGconn *pg = PQconnectdb(conninfo);
    ck_assert_msg(PQstatus(pg) == CONNECTION_OK, "%s: %s", what, PQerrorMessage(pg));
    return pg;
}

/* The first column of the first row (malloc'd, NULL for none), or fails the test. */
static char *scalar_on(PGconn *pg, const char *sql)
{
    PGresult *r = PQexec(pg, sql);
    ExecStatusType st = PQresultStatus(r);
    ck_assert_msg(st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK, "%s: %s", sql,
                  PQresultErrorMessage(r));
    char *v = NULL;
    if (st == PGRES_TUPLES_OK && PQntuples(r) > 0 && !PQgetisnull(r, 0, 0))
        v = strdup(PQgetvalue(r, 0, 0));
    PQclear(r);
    return v;
}

static long long_on(PGconn *pg, const char *sql)
{
    char *v = scalar_on(pg, sql);
    ck_assert_msg(v != NULL, "%s returned no value", sql);
    long n = atol(v);
    free(v);
    return n;
}

/* ---- the drill's state ---- */

typedef struct drill drill;

typedef struct xfer {
    drill *d;
    long id;
    int src, dst, amount;
    int phase; /* 0: the drill; 1: after the old primary came back */
    double started, finished;
    int fired;
    pgs_tx_outcome outcome;
    pgs_code code;
    char sqlstate[6];
    char message[200];
    int attempts;
    int port; /* the server its INSERT ran on (inet_server_port()); 0 when none answered */
} xfer;

struct drill {
    struct event_base *b;
    pgs_pool *pool;
    int primary_port, standby_port;
    uint64_t rng;
    xfer *x;
    long n;     /* transfers started: ids 1 .. n */
    long limit; /* start none past this id */
    int inflight;
    int starting; /* start the next as each finishes */
    int phase;
    int finished;
    struct event *tick;
    double t0;
    /* the failover, from a thread: stop the primary (immediate), promote the standby */
    pthread_t thread;
    int thread_started, thread_joined;
    atomic_int thread_done;
    double t_spawned;                         /* the loop's thread: when it started the thread */
    double t_stop, t_stopped, t_promoted;     /* the thread's: written before thread_done */
    int stop_rc, promote_rc;
    /* commits on the new primary (the standby's port) */
    long committed_new;
    double first_new_commit;
};

static uint64_t next_rand(drill *d)
{
    /* xorshift64* */
    d->rng ^= d->rng >> 12;
    d->rng ^= d->rng << 25;
    d->rng ^= d->rng >> 27;
    return d->rng * 2685821657736338717ULL;
}

static void *failover_thread(void *arg)
{
    drill *d = arg;
    char *tool = (char *)getenv("PGSCOPE_PGTMP");
    char *stop[] = {tool, "pgctl", "stop", "-m", "immediate", NULL};
    char *promote[] = {tool, "promote", NULL};
    d->t_stop = th_now();
    d->stop_rc = pgtmp_spawn(stop);
    d->t_stopped = th_now();
    d->promote_rc = pgtmp_spawn(promote);
    d->t_promoted = th_now();
    atomic_store(&d->thread_done, 1);
    return NULL;
}

/* ---- one transfer ---- */

static const char SQL_LEDGER[] =
    "INSERT INTO fo_ledger (transfer_id, src, dst, amount, server_port) "
    "VALUES ($1::bigint, $2::int, $3::int, $4::int, inet_server_port()) RETURNING server_port";
static const char SQL_MOVE[] =
    "UPDATE fo_accounts SET balance = balance + $2::int WHERE id = $1::int";

static void on_ledger(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg)
{
    (void)c;
    xfer *x = arg;
    if (!err && res && PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1)
        x->port = atoi(PQgetvalue(res, 0, 0));
}

static void ignore(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg)
{
    (void)c;
    (void)res;
    (void)err;
    (void)arg;
}

/* The ledger row and the two updates (the lower account first, so no two transfers deadlock),
 * queued in one turn: BEGIN, the three statements and COMMIT leave in one write, one round
 * trip. */
static void xfer_body(pgs_tx *tx, void *arg)
{
    xfer *x = arg;
    char id[24], src[16], dst[16], amt[16], debit[16];
    snprintf(id, sizeof id, "%ld", x->id);
    snprintf(src, sizeof src, "%d", x->src);
    snprintf(dst, sizeof dst, "%d", x->dst);
    snprintf(amt, sizeof amt, "%d", x->amount);
    snprintf(debit, sizeof debit, "%d", -x->amount);
    const char *ledger[] = {id, src, dst, amt};
    const char *take[] = {src, debit};
    const char *give[] = {dst, amt};
    const char *const *first = x->src < x->dst ? take : give;
    const char *const *second = x->src < x->dst ? give : take;
    int ok = pgs_tx_query(tx, SQL_LEDGER, 4, ledger, on_ledger, x) == PGS_OK;
    ok = ok && pgs_tx_query(tx, SQL_MOVE, 2, first, ignore, NULL) == PGS_OK;
    ok = ok && pgs_tx_query(tx, SQL_MOVE, 2, second, ignore, NULL) == PGS_OK;
    /* a statement refused at once (the connection is gone): never commit the rest */
    ck_assert_int_eq(pgs_tx_end(tx, ok, NULL, NULL), PGS_OK);
}

static void start_next(drill *d);

static void xfer_done(const pgs_tx_result *r, void *arg)
{
    xfer *x = arg;
    drill *d = x->d;
    x->fired++;
    ck_assert_msg(x->fired == 1, "transfer %ld: done fired %d times", x->id, x->fired);
    x->finished = th_now();
    x->outcome = r->outcome;
    x->attempts = r->attempts;
    if (r->err) {
        x->code = r->err->code;
        memcpy(x->sqlstate, r->err->sqlstate, sizeof x->sqlstate);
        snprintf(x->message, sizeof x->message, "%.*s", (int)sizeof x->message - 1,
                 r->err->message);
    }
    d->inflight--;
    if (x->outcome == PGS_TX_COMMITTED && x->port == d->standby_port) {
        if (d->committed_new++ == 0)
            d->first_new_commit = x->finished;
    }
    if (d->starting)
        start_next(d);
}

static void start_next(drill *d)
{
    if (d->n >= d->limit) {
        ck_assert_msg(d->phase != 0, "%d transfers before the drill ended: raise MAX_XFERS",
                      MAX_XFERS);
        d->starting = 0;
        return;
    }
    xfer *x = &d->x[d->n++];
    x->d = d;
    x->id = d->n;
    x->phase = d->phase;
    x->src = 1 + (int)(next_rand(d) % N_ACCOUNTS);
    do
        x->dst = 1 + (int)(next_rand(d) % N_ACCOUNTS);
    while (x->dst == x->src);
    x->amount = 1 + (int)(next_rand(d) % 100);
    x->started = th_now();
    d->inflight++;
    /* retries: a deadlock or serialization failure runs again (never after an unknown commit) */
    pgs_tx_opts o = {.retries = 3};
    int rc = pgs_pool_run_tx(d->pool, &o, xfer_body, xfer_done, x);
    ck_assert_msg(rc == PGS_OK, "pgs_pool_run_tx for transfer %ld: %s", x->id, pgs_strerror(rc));
}

/* Every 10 ms: the failover's schedule, and the drill's end (no new transfers, the last one
 * done, the tick gone, so the loop can drain). */
static void on_tick(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    drill *d = arg;
    double now = th_now();
    if (d->phase == 0) {
        if (!d->thread_started && now - d->t0 >= STOP_AFTER_S) {
            d->t_spawned = now;
            ck_assert_int_eq(pthread_create(&d->thread, NULL, failover_thread, d), 0);
            d->thread_started = 1;
        }
        if (d->thread_started && !d->thread_joined && atomic_load(&d->thread_done)) {
            ck_assert_int_eq(pthread_join(d->thread, NULL), 0);
            d->thread_joined = 1;
        }
        if (d->starting && (d->committed_new >= COMMITS_AFTER_FAILOVER ||
                            (d->thread_started && now - d->t_spawned > FAILOVER_LIMIT_S)))
            d->starting = 0;
    }
    if (!d->starting && d->inflight == 0 && (d->phase != 0 || d->thread_joined)) {
        event_free(d->tick);
        d->tick = NULL;
        d->finished = 1;
    }
}

static void print_pool(drill *d, const char *when)
{
    pgs_pool_counts c;
    pgs_pool_stats(d->pool, &c);
    printf("failover: pool %s: size %d idle %d in use %d waiting %d; acquired %lu timed out %lu "
           "replaced %lu connect failures %lu\n",
           when, c.size, c.idle, c.in_use, c.waiting, c.acquired, c.timed_out, c.replaced,
           c.connect_failures);
}

/* Start `CONCURRENCY` transfers and run the loop until the phase ends by itself; fails the
 * test (after saying what was still going on) if it does not within `seconds`. */
static void run_phase(drill *d, double seconds)
{
    d->finished = 0;
    d->starting = 1;
    d->tick = event_new(d->b, -1, EV_PERSIST, on_tick, d);
    ck_assert_ptr_nonnull(d->tick);
    struct timeval tv = {0, 10000};
    ck_assert_int_eq(evtimer_add(d->tick, &tv), 0);
    for (int i = 0; i < CONCURRENCY && d->starting; i++)
        start_next(d);
    double end = th_now() + seconds;
    while (!d->finished && th_now() < end)
        event_base_loop(d->b, EVLOOP_ONCE);
    if (!d->finished) {
        printf("failover: phase %d did not end within %.0f s: %d transfers in flight, %ld "
               "started, failover thread %s\n",
               d->phase, seconds, d->inflight, d->n,
               !d->thread_started ? "not started" : d->thread_joined ? "done" : "still running");
        print_pool(d, "when it hung");
        fflush(stdout);
        ck_abort_msg("the drill's phase %d hung: %d transfers never finished", d->phase,
                     d->inflight);
    }
}

/* Each kind of failure (outcome, code, SQLSTATE) among transfers 1 .. n: how many, and the
 * first one's message. */
static void print_failure_kinds(drill *d, long n)
{
    enum { KINDS = 16 };
    const xfer *first[KINDS];
    long count[KINDS];
    int kinds = 0;
    for (long i = 0; i < n; i++) {
        const xfer *x = &d->x[i];
        if (x->outcome == PGS_TX_COMMITTED)
            continue;
        int k = 0;
        while (k < kinds && !(first[k]->outcome == x->outcome && first[k]->code == x->code &&
                              strcmp(first[k]->sqlstate, x->sqlstate) == 0))
            k++;
        if (k == kinds) {
            if (kinds == KINDS)
                continue; /* (more kinds than that: the first 16 tell enough) */
            first[kinds] = x;
            count[kinds++] = 0;
        }
        count[k]++;
    }
    for (int k = 0; k < kinds; k++)
        printf("failover:   %ld %s with %s [%s], e.g. transfer %ld at +%.3f s from the stop: "
               "%s\n",
               count[k], first[k]->outcome == PGS_TX_UNKNOWN ? "unknown" : "rolled back",
               pgs_strerror(first[k]->code), first[k]->sqlstate, first[k]->id,
               first[k]->finished - d->t_stop, first[k]->message);
}

/* ---- the drill ---- */

static void make_bank_and_sync(PGconn *prim, PGconn *stby)
{
    /* the standby synchronous, and COMMIT returning only once it applied the commit there */
    free(scalar_on(prim, "ALTER SYSTEM SET synchronous_standby_names = '*'"));
    free(scalar_on(prim, "ALTER SYSTEM SET synchronous_commit = 'remote_apply'"));
    free(scalar_on(prim, "SELECT pg_reload_conf()"));
    double t0 = th_now();
    for (;;) {
        char *s = scalar_on(prim, "SELECT string_agg(sync_state, ',') FROM pg_stat_replication");
        int sync = s && strcmp(s, "sync") == 0;
        char seen[64];
        snprintf(seen, sizeof seen, "%s", s ? s : "(no standby)");
        free(s);
        if (sync)
            break;
        ck_assert_msg(th_now() - t0 < 15, "the standby is not synchronous after 15 s: %s", seen);
        usleep(50000);
    }
    /* with a new session: the reload reached every backend started since */
    PGconn *check = session_at(th_conninfo(NULL), "primary");
    char *sc = scalar_on(check, "SHOW synchronous_commit");
    ck_assert_str_eq(sc, "remote_apply");
    free(sc);
    PQfinish(check);

    free(scalar_on(prim, "DROP TABLE IF EXISTS fo_ledger, fo_accounts"));
    free(scalar_on(prim, "CREATE TABLE fo_accounts (id int PRIMARY KEY, balance bigint NOT NULL)"));
    free(scalar_on(prim, "CREATE TABLE fo_ledger (transfer_id bigint PRIMARY KEY, "
                         "src int NOT NULL, dst int NOT NULL, amount int NOT NULL, "
                         "server_port int NOT NULL)"));
    char sql[256];
    snprintf(sql, sizeof sql,
             "INSERT INTO fo_accounts SELECT g, %d FROM generate_series(1, %d) g", START_BALANCE,
             N_ACCOUNTS);
    free(scalar_on(prim, sql));

    /* both tables on the standby (at once, with remote_apply; polled all the same) */
    t0 = th_now();
    for (;;) {
        PGresult *r = PQexec(stby, "SELECT (SELECT count(*) FROM fo_accounts) || '/' || "
                                   "(SELECT sum(balance) FROM fo_accounts) || '/' || "
                                   "(SELECT count(*) FROM fo_ledger)");
        char want[64];
        snprintf(want, sizeof want, "%d/%d/0", N_ACCOUNTS, N_ACCOUNTS * START_BALANCE);
        int ok = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1 &&
                 strcmp(PQgetvalue(r, 0, 0), want) == 0;
        PQclear(r);
        if (ok)
            break;
        ck_assert_msg(th_now() - t0 < 15, "the bank did not reach the standby within 15 s");
        usleep(20000);
    }
    printf("failover: standby synchronous (remote_apply), bank of %d accounts of %d on both\n",
           N_ACCOUNTS, START_BALANCE);
}

/* The ledger of a server: present[id] = 1 + the row's server_port for ids 1 .. n. */
static int *read_ledger(PGconn *pg, long n)
{
    int *present = calloc((size_t)n + 1, sizeof *present);
    ck_assert_ptr_nonnull(present);
    PGresult *r = PQexec(pg, "SELECT transfer_id, server_port FROM fo_ledger");
    ck_assert_msg(PQresultStatus(r) == PGRES_TUPLES_OK, "reading the ledger: %s",
                  PQresultErrorMessage(r));
    for (int i = 0; i < PQntuples(r); i++) {
        long id = atol(PQgetvalue(r, i, 0));
        ck_assert_msg(id >= 1 && id <= n, "the ledger holds transfer %ld, never started", id);
        present[id] = 1 + atoi(PQgetvalue(r, i, 1));
    }
    PQclear(r);
    return present;
}

/* standby.signal in the old primary's data dir, owned as the dir is (the postgres OS user when
 * the test runs as root): it comes back in recovery, read-only, following no one (its own
 * settings name no primary_conninfo: pg_basebackup -R wrote that into the standby's copy). */
static void make_standby_signal(void)
{
    const char *data = env_of("PGSCOPE_PGDATA");
    char path[1024];
    snprintf(path, sizeof path, "%s/standby.signal", data);
    struct stat st;
    ck_assert_int_eq(stat(data, &st), 0);
    int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
    ck_assert_msg(fd >= 0, "creating %s failed", path);
    ck_assert_int_eq(fchown(fd, st.st_uid, st.st_gid), 0);
    close(fd);
}

static void on_pool_closed(void *arg)
{
    (*(int *)arg)++;
}

START_TEST(test_failover_drill)
{
    drill *d = calloc(1, sizeof *d);
    ck_assert_ptr_nonnull(d);
    d->x = calloc(MAX_XFERS + MORE_AFTER_RETURN, sizeof *d->x);
    ck_assert_ptr_nonnull(d->x);
    d->primary_port = primary_port();
    d->standby_port = standby_port();
    const char *seed_env = getenv("PGSCOPE_SEED");
    uint64_t seed = seed_env && *seed_env ? strtoull(seed_env, NULL, 0)
                                          : (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    printf("failover: seed %llu (PGSCOPE_SEED=%llu repeats the transfers)\n",
           (unsigned long long)seed, (unsigned long long)seed);
    d->rng = seed ? seed : 1;

    env_of("PGSCOPE_PGTMP");
    env_of("PGSCOPE_PGDATA");
    /* the loop first: the blocking sessions below are opened and closed inside its scope, so
     * th_loop_end's descriptor count holds */
    struct event_base *b = th_loop_begin();
    d->b = b;

    /* 1. synchronous replication and the bank */
    PGconn *prim = session_at(th_conninfo(NULL), "primary");
    PGconn *stby = session_at(standby_conninfo(), "standby");
    make_bank_and_sync(prim, stby);
    PQfinish(prim); /* it dies with the primary */

    /* 2. a pool over both hosts, read-write: the primary's, and the standby's once promoted */
    char extra[256];
    snprintf(extra, sizeof extra,
             "host=127.0.0.1,127.0.0.1 port=%d,%d target_session_attrs=read-write "
             "connect_timeout=2",
             d->primary_port, d->standby_port);
    pgs_pool_opts po = {.max_size = CONCURRENCY, .acquire_timeout_ms = 10000};
    ck_assert_int_eq(pgs_pool_new(b, th_conninfo(extra), &po, &d->pool), PGS_OK);

    /* 3. transfers; the primary stopped about 1 s in and the standby promoted, from a thread;
     * until 200 committed on the new primary */
    d->phase = 0;
    d->limit = MAX_XFERS;
    d->t0 = th_now();
    run_phase(d, STOP_AFTER_S + FAILOVER_LIMIT_S + 20);
    ck_assert_msg(d->stop_rc == 0, "pgtmp.sh pgctl stop -m immediate exited with %d",
                  d->stop_rc);
    ck_assert_msg(d->promote_rc == 0, "pgtmp.sh promote exited with %d", d->promote_rc);
    print_pool(d, "after the drill");
    /* connections opened for the drill's last waiters may still be on their way (the pool
     * opens for waiters, and a granted one serves them first): let them arrive, so that what
     * the pool holds is settled before the checks block the loop */
    double settle = th_now();
    for (;;) {
        pgs_pool_counts c;
        pgs_pool_stats(d->pool, &c);
        if (c.size == c.idle)
            break;
        ck_assert_msg(th_now() - settle < 10,
                      "10 s after the drill the pool still has %d connections neither idle nor "
                      "in use (of %d, %d idle)",
                      c.size - c.idle - c.in_use, c.size, c.idle);
        th_run_for(b, 0.01);
    }
    settle = th_now() - settle;

    long n_drill = d->n;
    long committed = 0, committed_old = 0, rolled_back = 0, unknown = 0, other = 0;
    double crash_seen = 0; /* the first transfer after the stop began that did not commit */
    long started_after_stop = 0, cutoff = 0; /* the first id started after the stop returned */
    for (long i = 0; i < n_drill; i++) {
        xfer *x = &d->x[i];
        ck_assert_msg(x->fired == 1, "transfer %ld: done fired %d times", x->id, x->fired);
        if (x->started > d->t_stopped) {
            started_after_stop++;
            if (!cutoff)
                cutoff = x->id;
        }
        switch (x->outcome) {
        case PGS_TX_COMMITTED:
            committed++;
            committed_old += x->port == d->primary_port;
            break;
        case PGS_TX_ROLLED_BACK:
            rolled_back++;
            break;
        case PGS_TX_UNKNOWN:
            unknown++;
            break;
        default:
            other++;
        }
        if (x->outcome != PGS_TX_COMMITTED && x->finished > d->t_stop &&
            (!crash_seen || x->finished < crash_seen))
            crash_seen = x->finished;
    }
    ck_assert_int_eq(other, 0);
    printf("failover: %ld transfers: %ld committed (%ld on the old primary, %ld on the new), %ld "
           "rolled back, %ld unknown; %ld started after the stop returned\n",
           n_drill, committed, committed_old, committed - committed_old, rolled_back, unknown,
           started_after_stop);
    /* why the others failed: each kind (outcome, code, SQLSTATE) once, with its first example */
    print_failure_kinds(d, n_drill);
    ck_assert_msg(d->committed_new >= COMMITS_AFTER_FAILOVER,
                  "only %ld transfers committed on the new primary within %.0f s of the stop "
                  "(the pool never reached it?)",
                  d->committed_new, FAILOVER_LIMIT_S);

    /* 4. the checks, against the new primary (the promoted standby) */
    char *rec = scalar_on(stby, "SELECT pg_is_in_recovery()::text");
    ck_assert_msg(rec && strcmp(rec, "false") == 0, "the promoted standby is still in recovery");
    free(rec);
    int *present = read_ledger(stby, n_drill);
    long lost = 0, rb_present = 0, unk_yes = 0, unk_no = 0, wrong_port = 0;
    for (long i = 0; i < n_drill; i++) {
        xfer *x = &d->x[i];
        int here = present[x->id] != 0;
        if (x->outcome == PGS_TX_COMMITTED && !here) {
            if (lost++ < 10)
                printf("failover: LOST: transfer %ld reported COMMITTED at +%.3f s from the stop "
                       "(ran on port %d) is not on the new primary\n",
                       x->id, x->finished - d->t_stop, x->port);
        }
        if (x->outcome == PGS_TX_COMMITTED && here && present[x->id] - 1 != x->port)
            wrong_port++;
        if (x->outcome == PGS_TX_ROLLED_BACK && here) {
            if (rb_present++ < 10)
                printf("failover: transfer %ld reported ROLLED_BACK (%s: %s) is on the new "
                       "primary\n",
                       x->id, pgs_strerror(x->code), x->message);
        }
        if (x->outcome == PGS_TX_UNKNOWN) {
            if (here)
                unk_yes++;
            else
                unk_no++;
        }
        /* started after the primary was gone: only the new primary can have run it */
        if (x->started > d->t_stopped && here)
            ck_assert_msg(present[x->id] - 1 == d->standby_port,
                          "transfer %ld, started after the stop, ran on port %d", x->id,
                          present[x->id] - 1);
    }
    long sum = long_on(stby, "SELECT sum(balance) FROM fo_accounts");
    char sql[512];
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM fo_accounts a WHERE a.balance <> %d"
             " - coalesce((SELECT sum(amount) FROM fo_ledger WHERE src = a.id), 0)"
             " + coalesce((SELECT sum(amount) FROM fo_ledger WHERE dst = a.id), 0)",
             START_BALANCE);
    long off = long_on(stby, sql);
    long rows = long_on(stby, "SELECT count(*) FROM fo_ledger");
    int conserved = sum == (long)N_ACCOUNTS * START_BALANCE && off == 0;
    double to_first = d->first_new_commit - d->t_stop;
    printf("failover: from the stop command: first failed transfer (the crash, as clients saw "
           "it) %.2f s, stop returned %.2f s, promote returned %.2f s, first commit on the new "
           "primary %.2f s (%.2f s after the crash was seen)\n",
           crash_seen ? crash_seen - d->t_stop : -1.0, d->t_stopped - d->t_stop,
           d->t_promoted - d->t_stop, to_first,
           crash_seen ? d->first_new_commit - crash_seen : -1.0);
    printf("failover: ledger on the new primary: %ld rows; unknown resolved by their rows: %ld "
           "committed, %ld not\n",
           rows, unk_yes, unk_no);
    printf("failover: stop->first commit on new primary %.2f s; transfers committed %ld (%ld "
           "lost), rolled back %ld, unknown %ld (%ld committed, %ld not), money %s\n",
           to_first, committed, lost, rolled_back, unknown, unk_yes, unk_no,
           conserved ? "conserved" : "NOT conserved");
    fflush(stdout);
    ck_assert_msg(lost == 0, "%ld transfers reported COMMITTED are missing on the new primary",
                  lost);
    ck_assert_msg(rb_present == 0, "%ld transfers reported ROLLED_BACK are on the new primary",
                  rb_present);
    ck_assert_msg(wrong_port == 0, "%ld committed transfers ran elsewhere than they said",
                  wrong_port);
    ck_assert_int_eq(rows, committed + unk_yes);
    ck_assert_msg(sum == (long)N_ACCOUNTS * START_BALANCE, "sum(balance) is %ld, not %ld", sum,
                  (long)N_ACCOUNTS * START_BALANCE);
    ck_assert_msg(off == 0, "%ld accounts differ from their initial balance plus the ledger", off);
    ck_assert_msg(to_first < FIRST_COMMIT_BOUND_S,
                  "the first commit on the new primary came %.2f s after the stop (bound %.0f s)",
                  to_first, FIRST_COMMIT_BOUND_S);
    ck_assert_msg(cutoff > 0, "no transfer was started after the stop");
    free(present);

    /* 5. the old primary comes back, read-only: in recovery, following no one */
    make_standby_signal();
    pgtmp("pgctl start -w");
    rec = th_scalar("SELECT pg_is_in_recovery()::text", 0, NULL);
    ck_assert_msg(rec && strcmp(rec, "true") == 0, "the old primary is back but not in recovery");
    free(rec);
    /* the pool's sessions on the new primary go (terminated; the pool notices them dead while
     * idle and drops them), so the next transfers connect afresh through the host list, whose
     * first host is the old primary, up again and read-only */
    free(scalar_on(stby, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                         "WHERE datname = current_database() AND backend_type = 'client backend' "
                         "AND pid <> pg_backend_pid()"));
    double emptied = th_now();
    for (double end = th_now() + 10;;) {
        pgs_pool_counts c;
        pgs_pool_stats(d->pool, &c);
        if (c.size == 0)
            break;
        ck_assert_msg(th_now() < end, "the pool still counts %d connections 10 s after their "
                                      "backends were terminated", c.size);
        th_run_for(b, 0.02);
    }
    emptied = th_now() - emptied;
    pgs_pool_counts before;
    pgs_pool_stats(d->pool, &before);
    d->phase = 1;
    d->limit = n_drill + MORE_AFTER_RETURN;
    run_phase(d, 30);
    print_pool(d, "after the old primary came back");
    pgs_pool_counts after;
    pgs_pool_stats(d->pool, &after);
    /* each connect passed over the old primary (read-only now) to the new one: none failed */
    ck_assert_msg(after.connect_failures == before.connect_failures,
                  "%lu connects failed with the old primary back in recovery",
                  after.connect_failures - before.connect_failures);
    printf("failover: the pool settled %.3f s after the drill; after the terminate it was empty "
           "in %.3f s\n",
           settle, emptied);
    present = read_ledger(stby, d->n);
    for (long i = n_drill; i < d->n; i++) {
        xfer *x = &d->x[i];
        ck_assert_msg(x->outcome == PGS_TX_COMMITTED,
                      "transfer %ld after the old primary came back: outcome %d, %s: %s", x->id,
                      x->outcome, pgs_strerror(x->code), x->message);
        ck_assert_msg(x->port == d->standby_port,
                      "transfer %ld ran on port %d, not the new primary's %d", x->id, x->port,
                      d->standby_port);
        ck_assert_msg(present[x->id] - 1 == d->standby_port,
                      "transfer %ld is not on the new primary", x->id);
    }
    free(present);
    /* none of them, nor any transfer started after the stop, is on the old primary */
    char cut[24];
    snprintf(cut, sizeof cut, "%ld", cutoff);
    const char *cv[] = {cut};
    long on_old =
        th_scalar_long("SELECT count(*) FROM fo_ledger WHERE transfer_id >= $1::bigint", 1, cv);
    long old_rows = th_scalar_long("SELECT count(*) FROM fo_ledger", 0, NULL);
    ck_assert_msg(on_old == 0,
                  "the old primary holds %ld transfers started after the stop (id >= %ld)", on_old,
                  cutoff);
    rec = th_scalar("SELECT pg_is_in_recovery()::text", 0, NULL);
    ck_assert_str_eq(rec, "true");
    free(rec);
    /* what the old primary holds that the new one does not: its unreplicated tail, COMMITs in
     * flight at the crash, which the library must have called UNKNOWN (never COMMITTED, never
     * ROLLED_BACK) */
    PGconn *old = session_at(th_conninfo(NULL), "old primary");
    int *old_present = read_ledger(old, d->n);
    int *new_present = read_ledger(stby, d->n);
    PQfinish(old);
    long tail = 0;
    for (long id = 1; id <= n_drill; id++) {
        if (!old_present[id] || new_present[id])
            continue;
        tail++;
        xfer *x = &d->x[id - 1];
        ck_assert_msg(x->outcome == PGS_TX_UNKNOWN,
                      "transfer %ld is on the old primary only, yet was reported %s", x->id,
                      x->outcome == PGS_TX_COMMITTED ? "COMMITTED" : "ROLLED_BACK");
    }
    free(old_present);
    free(new_present);
    printf("failover: old primary back in recovery (%ld ledger rows, %ld of them only there, all "
           "unknown); %d more transfers all committed on the new primary, none on the old\n",
           old_rows, tail, MORE_AFTER_RETURN);
    fflush(stdout);
    PQfinish(stby);

    int closed = 0;
    ck_assert_int_eq(pgs_pool_close(d->pool, on_pool_closed, &closed), PGS_OK);
    th_run_until(b, &closed, 10);
    ck_assert_int_eq(closed, 1);
    th_loop_end(b);
    free(d->x);
    free(d);
}
END_TEST

static Suite *failover_suite(void)
{
    Suite *s = suite_create("failover");
    TCase *t = tcase_create("failover");
    tcase_set_timeout(t, 150);
    /* one test: it crashes the primary and promotes the standby for good */
    tcase_add_test(t, test_failover_drill);
    suite_add_tcase(s, t);
    return s;
}

int main(void)
{
    return th_run_suite(failover_suite());
}

/* pgscope-soak: a Jepsen-style bank soak. Random transfers between accounts run through
 * pgs_pool_run_tx (serializable, retried) in several shapes while real faults hit the server
 * and the network on a seeded schedule (backends terminated or cancelled, server restarts, a
 * loopback proxy that cuts and stalls connections, also right at COMMIT). Every outcome and
 * every callback the library reports is recorded; at the end an independent connection checks
 * them against what the server holds. Prints one table; exits 0 only when every invariant
 * held, 1 when one did not, 2 on a setup error. Uses only the public header (plus libpq,
 * libevent and the fault proxy, tools/faultproxy.h). See README, Fault soak. */
#include <fcntl.h>
#include <getopt.h>
#include <pgscope.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "faultproxy.h"

extern char **environ;

enum {
    START_BALANCE = 1000,
    MAX_AMOUNT = 100,
    BACKSTOP_TIMEOUT_MS = 3000, /* every transfer's limit: a COMMIT stalled for good ends */
    RESOLVERS = 4,              /* pgs_tx_resolve calls at once */
    RESOLVE_TRIES = 100,
    CHUNK = 4096,               /* transfers per allocation (records never move) */
    MAX_TRANSFERS = 100000000,
};

/* ---- options ---- */

typedef enum fault_kind {
    F_TERMINATE,
    F_CANCEL,
    F_RESTART_FAST,
    F_RESTART_IMMEDIATE,
    F_CUT,
    F_STALL,
    F_COMMIT_CUT_BEFORE,
    F_COMMIT_CUT_AFTER,
    F_COMMIT_STALL,
    F_COUNT
} fault_kind;

static const char *const fault_names[F_COUNT] = {
    "terminate", "cancel", "restart-fast", "restart-immediate", "cut",
    "stall", "commit-cut-before", "commit-cut-after", "commit-stall"};

static int is_restart(fault_kind k)
{
    return k == F_RESTART_FAST || k == F_RESTART_IMMEDIATE;
}

static int is_proxy(fault_kind k)
{
    return k >= F_CUT;
}

static struct {
    const char *conninfo;
    long transfers;
    double seconds;
    int concurrency, pool, accounts, fault_ms, fault_gap, retries, stuck_s;
    int quiet, verbose, selftest, multiplex;
    uint64_t seed;
    unsigned faults; /* a bit per fault_kind asked for */
    const char *restart_cmd;
} opt = {.transfers = 10000, .concurrency = 16, .pool = 8, .accounts = 20, .fault_ms = 200,
         .fault_gap = 10, .retries = 8, .stuck_s = 60, .faults = (1u << F_COUNT) - 1};

/* ---- small helpers ---- */

static struct event_base *base;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* A setup error (bad option, unreachable server, schema): one line, exit 2. */
static void setup_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "pgscope-soak: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(2);
}

static void *must_alloc(size_t n)
{
    void *p = calloc(1, n);
    if (!p)
        setup_error("out of memory");
    return p;
}

static struct timeval ms_tv(int ms)
{
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    return tv;
}

static struct event *timer_new(event_callback_fn cb, void *arg, int persist)
{
    struct event *ev = event_new(base, -1, persist ? EV_PERSIST : 0, cb, arg);
    if (!ev)
        setup_error("cannot create a timer");
    return ev;
}

static void timer_in(struct event *ev, int ms)
{
    struct timeval tv = ms_tv(ms);
    event_add(ev, &tv);
}

/* splitmix64: every random choice comes from the seed, so --seed replays the same transfers
 * and the same fault schedule (the timing of a real server and network still varies). */
static uint64_t next_rand(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static int rand_below(uint64_t *s, int n)
{
    return (int)(next_rand(s) % (uint64_t)n);
}

/* The short name of a code: "PGS_ESQL" of "PGS_ESQL: the server reported an error". */
static void code_name(int code, char *out, size_t cap)
{
    const char *s = pgs_strerror(code);
    snprintf(out, cap, "%.*s", (int)strcspn(s, ":"), s);
}

/* ---- the direct, blocking connection: setup and the final checks ---- */

static PGconn *direct_connect(void)
{
    const char *k[] = {"dbname", "application_name", "connect_timeout", NULL};
    const char *v[] = {opt.conninfo, "pgscope-soak-observer", "10", NULL};
    PGconn *c = PQconnectdbParams(k, v, 1);
    if (!c || PQstatus(c) != CONNECTION_OK) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s", c ? PQerrorMessage(c) : "out of memory");
        msg[strcspn(msg, "\n")] = '\0';
        PQfinish(c);
        setup_error("cannot connect to the server: %s", msg);
    }
    return c;
}

/* One statement on the blocking connection; any failure is a setup error. */
static PGresult *sql_exec(PGconn *c, const char *sql, int n, const char *const *v)
{
    PGresult *r = PQexecParams(c, sql, n, NULL, v, NULL, NULL, 0);
    ExecStatusType st = PQresultStatus(r);
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s", PQerrorMessage(c));
        msg[strcspn(msg, "\n")] = '\0';
        setup_error("%s: %s", sql, msg);
    }
    return r;
}

static void sql_run(PGconn *c, const char *sql, int n, const char *const *v)
{
    PQclear(sql_exec(c, sql, n, v));
}

/* Its own tables, created if missing and emptied: every transfer id of this run is new. */
static void create_schema(PGconn *c)
{
    sql_run(c, "SET client_min_messages = warning", 0, NULL);
    sql_run(c,
            "CREATE TABLE IF NOT EXISTS soak_accounts (id int PRIMARY KEY, "
            "balance bigint NOT NULL CHECK (balance >= 0))",
            0, NULL);
    sql_run(c,
            "CREATE TABLE IF NOT EXISTS soak_ledger (transfer_id bigint PRIMARY KEY, "
            "from_id int NOT NULL, to_id int NOT NULL, amount bigint NOT NULL)",
            0, NULL);
    sql_run(c, "TRUNCATE soak_accounts, soak_ledger", 0, NULL);
    char n[16], b[16];
    snprintf(n, sizeof n, "%d", opt.accounts);
    snprintf(b, sizeof b, "%d", START_BALANCE);
    const char *v[] = {n, b};
    sql_run(c,
            "INSERT INTO soak_accounts SELECT g, $2::bigint FROM generate_series(1, $1::int) g",
            2, v);
}

/* keyword='val[ more]' at w, quoted for a conninfo; returns the end. */
static char *quoted(char *w, const char *keyword, const char *val, const char *more)
{
    w += sprintf(w, "%s='", keyword);
    for (const char *q = val; *q; q++) {
        if (*q == '\'' || *q == '\\')
            *w++ = '\\';
        *w++ = *q;
    }
    return w + sprintf(w, "%s%s' ", more ? " " : "", more ? more : "");
}

/* The pool's conninfo: the user's (keyword/value or URI) rebuilt as keyword/value, with its own
 * application_name (how the faults find its backends), durable commits (a server running with
 * synchronous_commit = off, as the throwaway one does, loses acknowledged commits in a crash:
 * true to PostgreSQL, useless to a check of what the library reports) and, when `port` is
 * given, host and port replaced: the way to the proxy. */
static char *rebuild_conninfo(const char *conninfo, const char *appname, const char *port)
{
    static const char durable[] = "-c synchronous_commit=on";
    char *why = NULL;
    PQconninfoOption *o = PQconninfoParse(conninfo, &why);
    PQfreemem(why); /* (it may quote the password: not printed) */
    if (!o)
        setup_error("the conninfo does not parse");
    size_t cap = 128 + strlen(appname) + 2 * sizeof durable;
    for (PQconninfoOption *p = o; p->keyword; p++)
        if (p->val)
            cap += strlen(p->keyword) + 2 * strlen(p->val) + 4;
    char *s = must_alloc(cap), *w = s;
    int has_options = 0;
    for (PQconninfoOption *p = o; p->keyword; p++) {
        if (!p->val || strcmp(p->keyword, "application_name") == 0)
            continue;
        if (port && (strcmp(p->keyword, "host") == 0 || strcmp(p->keyword, "hostaddr") == 0 ||
                     strcmp(p->keyword, "port") == 0))
            continue;
        int options = strcmp(p->keyword, "options") == 0;
        has_options |= options;
        w = quoted(w, p->keyword, p->val, options ? durable : NULL);
    }
    if (!has_options)
        w = quoted(w, "options", durable, NULL);
    w = quoted(w, "application_name", appname, NULL);
    if (port)
        sprintf(w, "host=127.0.0.1 port=%s", port);
    PQconninfoFree(o);
    return s;
}

/* ---- transfers ---- */

typedef enum shape {
    SH_ONE_TRIP, /* everything queued, then the end: one round trip */
    SH_READ,     /* read the balance, then decide in its callback */
    SH_SAVEPOINT, /* the transfer inside a savepoint; redone in the parent if it rolled back */
    SH_COUNT
} shape;
static const char *const shape_names[SH_COUNT] = {"one-trip", "read-decide", "savepoint"};

enum {
    M_TIMEOUT = 1,     /* a small timeout_ms */
    M_CANCEL = 2,      /* pgs_tx_cancel from a timer */
    M_SLEEP = 4,       /* a pg_sleep first */
    M_RESOLVABLE = 8,  /* pgs_tx_opts.resolvable */
    M_SP_FAIL = 16,    /* the savepoint fails on purpose (division by zero) */
    M_DEBIT_FIRST = 32 /* debit before credit (else credit first: deadlocks happen) */
};

enum { DECLINED = 1, REFUSED = 2 }; /* why an attempt ended with ok = 0 */

typedef struct transfer {
    long id;
    int from, to, amount;
    unsigned char shape, mods;
    short sleep_ms, timeout_ms, cancel_ms, grace_ms;
    /* what the library reported */
    unsigned char done_calls;    /* the run's done: must be 1 */
    unsigned char outcome;       /* pgs_tx_outcome; 0 until done */
    unsigned char code;          /* the final error's code (PGS_OK: none) */
    char sqlstate[6];
    char xid[48];
    int attempts; /* reported */
    char *message; /* the final error's message, for outcomes other than COMMITTED */
    /* what the soak counted */
    int bodies;                /* body runs */
    int queued, fired;         /* statement callbacks owed / fired, all attempts */
    int att_queued, att_fired; /* the same for the running attempt */
    int ends, end_dones;       /* pgs_tx_end accepted (root and savepoints) / their done */
    int late;  /* a callback after its scope's done, or a body while an end was owed */
    int gaps;  /* an attempt's done with statement callbacks still owed */
    unsigned char attempt_open; /* between the body and its end's done */
    unsigned char proof;        /* this attempt: the server's error or FATAL was received */
    unsigned char asked_rollback; /* DECLINED / REFUSED: the attempt ended with ok = 0 */
    pgs_tx *tx;                 /* the running attempt's guard */
    struct event *cancel_ev;
    /* the resolution of an unknown outcome */
    unsigned char xid_status; /* pgs_txid_status from pgs_tx_resolve, 0: none */
    short resolve_tries;
} transfer;

static transfer *chunks[MAX_TRANSFERS / CHUNK + 1];
static long started, finished, in_flight;
static double t_start, t_stop_starting, last_progress;
static pgs_pool *pool;
static char pool_appname[64];
static char *pool_conninfo;
static int finishing;
static pgs_pool_counts end_counts;
static long cancel_calls;

static transfer *T(long i)
{
    if (!chunks[i / CHUNK])
        chunks[i / CHUNK] = must_alloc(CHUNK * sizeof(transfer));
    return &chunks[i / CHUNK][i % CHUNK];
}

static const char SQL_DEBIT[] =
    "UPDATE soak_accounts SET balance = balance - $1::bigint WHERE id = $2::int";
static const char SQL_CREDIT[] =
    "UPDATE soak_accounts SET balance = balance + $1::bigint WHERE id = $2::int";
static const char SQL_LEDGER[] = "INSERT INTO soak_ledger (transfer_id, from_id, to_id, amount) "
                                 "VALUES ($1::bigint, $2::int, $3::int, $4::bigint)";
static const char SQL_READ[] = "SELECT balance FROM soak_accounts WHERE id = $1::int";
static const char SQL_SLEEP[] = "SELECT pg_sleep($1::float8)";
static const char SQL_FAIL[] = "SELECT 1 / $1::int";

/* Proof the server skipped COMMIT: its error for a statement of the transaction itself (a
 * savepoint's error is undone by its rollback, so only the root's count), or its FATAL for any
 * of them (the session ended there). A server error comes with its result (res), also when
 * the library names it after the transaction's cancel or timeout; a lost connection carries
 * the server's SQLSTATE only when the server said goodbye (08xxx is libpq's own). */
static int server_said_no(const PGresult *res, const pgs_error *err, int root)
{
    if (!err)
        return 0;
    if (err->code == PGS_ECONN && err->sqlstate[0] && strncmp(err->sqlstate, "08", 2) != 0)
        return 1;
    return root && (err->code == PGS_ESQL || res != NULL);
}

static void stmt_fired(transfer *t, const PGresult *res, const pgs_error *err, int root)
{
    t->fired++;
    t->att_fired++;
    if (!t->attempt_open || t->done_calls)
        t->late++;
    if (server_said_no(res, err, root))
        t->proof = 1;
}

static void on_root_stmt(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg)
{
    (void)c;
    stmt_fired(arg, res, err, 1);
}

static void on_child_stmt(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg)
{
    (void)c;
    stmt_fired(arg, res, err, 0);
}

static int queue_stmt(transfer *t, pgs_tx *tx, int root, const char *sql, int n,
                      const char *const *v, pgs_result_cb cb)
{
    if (pgs_tx_query(tx, sql, n, v, cb ? cb : root ? on_root_stmt : on_child_stmt, t) != PGS_OK)
        return 0;
    t->queued++;
    t->att_queued++;
    return 1;
}

/* The two updates and the ledger row. 0 when any was refused at once (the connection is
 * gone): the scope must then not commit a part of a transfer. */
static int queue_transfer(transfer *t, pgs_tx *tx, int root)
{
    char amount[16], from[16], to[16], id[24];
    snprintf(amount, sizeof amount, "%d", t->amount);
    snprintf(from, sizeof from, "%d", t->from);
    snprintf(to, sizeof to, "%d", t->to);
    snprintf(id, sizeof id, "%ld", t->id);
    const char *debit[] = {amount, from}, *credit[] = {amount, to};
    const char *ledger[] = {id, from, to, amount};
    int debit_first = (t->mods & M_DEBIT_FIRST) != 0;
    int ok = queue_stmt(t, tx, root, debit_first ? SQL_DEBIT : SQL_CREDIT, 2,
                        debit_first ? debit : credit, NULL);
    ok &= queue_stmt(t, tx, root, debit_first ? SQL_CREDIT : SQL_DEBIT, 2,
                     debit_first ? credit : debit, NULL);
    ok &= queue_stmt(t, tx, root, SQL_LEDGER, 4, ledger, NULL);
    return ok;
}

static void end_scope(transfer *t, pgs_tx *tx, int ok, pgs_tx_done_cb done)
{
    if (pgs_tx_end(tx, ok, done, t) == PGS_OK)
        t->ends++;
    else
        t->late++; /* refused: its done never fires, and the run would hang */
}

static void attempt_done(const pgs_tx_result *r, void *arg)
{
    (void)r;
    transfer *t = arg;
    t->end_dones++;
    if (!t->attempt_open || t->done_calls)
        t->late++;
    if (t->att_fired != t->att_queued)
        t->gaps++;
    t->attempt_open = 0;
    t->tx = NULL;
    if (t->cancel_ev)
        event_del(t->cancel_ev);
}

/* The root's end, committing the transfer queued just before unless that was refused. */
static void end_root(transfer *t, int queued_ok)
{
    if (!queued_ok)
        t->asked_rollback = REFUSED;
    end_scope(t, t->tx, queued_ok, attempt_done);
}

static void savepoint_done(const pgs_tx_result *r, void *arg)
{
    transfer *t = arg;
    t->end_dones++;
    if (!t->attempt_open || t->done_calls) {
        t->late++;
        return;
    }
    if (r->outcome == PGS_TX_COMMITTED) /* released: the transfer is in the parent */
        end_root(t, 1);
    else /* rolled back to the savepoint: the parent does it itself */
        end_root(t, queue_transfer(t, t->tx, 1));
}

static void on_read(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg)
{
    (void)c;
    transfer *t = arg;
    stmt_fired(t, res, err, 1);
    if (!t->tx)
        return; /* late: counted */
    if (err) { /* the transaction failed: its end reports why (and retries a 40001) */
        end_scope(t, t->tx, 1, attempt_done);
        return;
    }
    if (PQntuples(res) != 1 || atol(PQgetvalue(res, 0, 0)) < t->amount) {
        t->asked_rollback = DECLINED; /* not enough money: ok = 0, rolled back as asked */
        end_scope(t, t->tx, 0, attempt_done);
        return;
    }
    end_root(t, queue_transfer(t, t->tx, 1));
}

static void transfer_body(pgs_tx *tx, void *arg)
{
    transfer *t = arg;
    if (t->attempt_open || t->done_calls)
        t->late++;
    t->bodies++;
    t->attempt_open = 1;
    t->proof = 0;
    t->asked_rollback = 0;
    t->att_queued = t->att_fired = 0;
    t->tx = tx;
    if (t->cancel_ev)
        timer_in(t->cancel_ev, t->cancel_ms);
    if (t->mods & M_SLEEP) {
        char s[16];
        snprintf(s, sizeof s, "%.3f", t->sleep_ms / 1000.0);
        const char *v[] = {s};
        queue_stmt(t, tx, 1, SQL_SLEEP, 1, v, NULL);
    }
    switch ((shape)t->shape) {
    case SH_ONE_TRIP:
    case SH_COUNT:
        end_root(t, queue_transfer(t, tx, 1));
        break;
    case SH_READ: {
        char from[16];
        snprintf(from, sizeof from, "%d", t->from);
        const char *v[] = {from};
        if (!queue_stmt(t, tx, 1, SQL_READ, 1, v, on_read))
            end_root(t, 0);
        break;
    }
    case SH_SAVEPOINT: {
        pgs_tx *sp;
        if (pgs_tx_savepoint(tx, NULL, NULL, &sp) != PGS_OK) {
            end_root(t, queue_transfer(t, tx, 1));
            break;
        }
        int ok = queue_transfer(t, sp, 0);
        if (t->mods & M_SP_FAIL) {
            const char *v[] = {"0"};
            queue_stmt(t, sp, 0, SQL_FAIL, 1, v, NULL);
        }
        end_scope(t, sp, ok, savepoint_done);
        break;
    }
    }
}

static void on_cancel_timer(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    transfer *t = arg;
    if (t->tx && pgs_tx_cancel(t->tx) == PGS_OK)
        cancel_calls++;
}

static void start_more(void);
static void begin_finish(void);

static void transfer_done(const pgs_tx_result *r, void *arg)
{
    transfer *t = arg;
    if (++t->done_calls > 1)
        return;
    if (t->attempt_open)
        t->late++; /* the run's done before its attempt's end */
    t->outcome = (unsigned char)r->outcome;
    t->attempts = r->attempts;
    if (r->err) {
        t->code = (unsigned char)r->err->code;
        memcpy(t->sqlstate, r->err->sqlstate, sizeof t->sqlstate);
        t->sqlstate[sizeof t->sqlstate - 1] = '\0';
        if (r->outcome != PGS_TX_COMMITTED && (t->message = strdup(r->err->message)))
            for (char *p = t->message; *p; p++) /* one line (libpq's span several) */
                if (*p == '\n' || *p == '\t')
                    *p = ' ';
    }
    memcpy(t->xid, r->xid, sizeof t->xid);
    t->xid[sizeof t->xid - 1] = '\0';
    if (t->cancel_ev) {
        event_free(t->cancel_ev);
        t->cancel_ev = NULL;
    }
    in_flight--;
    finished++;
    last_progress = now_s();
    start_more();
    if (in_flight == 0)
        begin_finish();
}

static int kinds_missing(void);

/* A run that has not yet seen every fault kind it asked for goes on for a while (a slow or
 * loaded machine): up to twice its transfers and its seconds. */
static int may_start(void)
{
    if (finishing)
        return 0;
    if (started < opt.transfers && (opt.seconds <= 0 || now_s() < t_stop_starting))
        return 1;
    return kinds_missing() && started < 2L * opt.transfers && started < MAX_TRANSFERS &&
           (opt.seconds <= 0 || now_s() < t_stop_starting + opt.seconds);
}

/* A new transfer, every choice drawn from the seed and its id. */
static void start_one(void)
{
    transfer *t = T(started);
    t->id = started + 1;
    uint64_t s = opt.seed ^ ((uint64_t)t->id * 0xd1342543de82ef95ull);
    t->from = 1 + rand_below(&s, opt.accounts);
    t->to = 1 + rand_below(&s, opt.accounts - 1);
    if (t->to >= t->from)
        t->to++;
    t->amount = 1 + rand_below(&s, MAX_AMOUNT);
    int sh = rand_below(&s, 10);
    t->shape = sh < 4 ? SH_ONE_TRIP : sh < 7 ? SH_READ : SH_SAVEPOINT;
    t->mods = (rand_below(&s, 2) ? M_RESOLVABLE : 0) | (rand_below(&s, 2) ? M_DEBIT_FIRST : 0);
    /* (Rare: a cancel or timeout closes its connection, and a new one costs a connect.) */
    int special = rand_below(&s, 100);
    if (special < 3)
        t->mods |= M_TIMEOUT | (rand_below(&s, 2) ? M_SLEEP : 0);
    else if (special < 6)
        t->mods |= M_CANCEL | (rand_below(&s, 2) ? M_SLEEP : 0);
    if (t->shape == SH_SAVEPOINT && rand_below(&s, 10) < 3)
        t->mods |= M_SP_FAIL;
    t->sleep_ms = (short)rand_below(&s, 60);
    t->timeout_ms = (short)(t->mods & M_TIMEOUT ? 20 + rand_below(&s, 61) : BACKSTOP_TIMEOUT_MS);
    t->cancel_ms = (short)rand_below(&s, 30);
    t->grace_ms = (short)(50 + rand_below(&s, 351));
    if (t->mods & M_CANCEL)
        t->cancel_ev = timer_new(on_cancel_timer, t, 0);
    pgs_tx_opts o = {.isolation = PGS_ISO_SERIALIZABLE,
                     .retries = opt.retries,
                     .retry_base_ms = 2,
                     .retry_max_ms = 100,
                     .timeout_ms = t->timeout_ms,
                     .commit_grace_ms = t->grace_ms,
                     .resolvable = (t->mods & M_RESOLVABLE) != 0};
    int rc = pgs_pool_run_tx(pool, &o, transfer_body, transfer_done, t);
    if (rc != PGS_OK)
        setup_error("cannot queue a transfer: %s", pgs_strerror(rc));
    started++;
    in_flight++;
}

static void start_more(void)
{
    while (in_flight < opt.concurrency && may_start())
        start_one();
}

/* ---- faults ---- */

static struct {
    unsigned available;                 /* kinds that can run here */
    const char *skipped[F_COUNT];       /* why not, for the table */
    long applied[F_COUNT], missed[F_COUNT], failed[F_COUNT];
    int deck[F_COUNT], deck_len, deck_pos;
    int redo; /* a signal kind that found no backend before it ever took: drawn next (+1) */
    uint64_t rng;
    struct event *timer, *unstall, *child_watch;
    pid_t child; /* the restart command while it runs */
    fault_kind child_kind;
    double next_restart;   /* restarts are spaced (a refill costs the pool seconds)... */
    long next_restart_at;  /* ...in time and in progress (`finished`) */
    long finished_at_last; /* `finished` at the last fault */
    int observers; /* fault connections open */
    const char *restart_cmd;
    char *restart_owned;
    int stalled;
    fp_proxy *proxy;
    fp_counts proxy_counts;
} F;

static void maybe_done(void);

static unsigned enabled_kinds(void)
{
    return opt.faults & F.available;
}

static int kinds_missing(void)
{
    for (int k = 0; k < F_COUNT; k++)
        if ((enabled_kinds() & (1u << k)) && F.applied[k] == 0)
            return 1;
    return 0;
}

static int restart_allowed(void)
{
    return !F.child && now_s() >= F.next_restart && finished >= F.next_restart_at;
}

/* The next kind: every enabled kind once per round, in a shuffled order. A restart that may
 * not run yet stays in the round; while only such cards are left, another kind is drawn
 * without using up the round. A signal kind that missed before it ever took comes first. */
static fault_kind draw_kind(void)
{
    if (F.redo) {
        fault_kind k = (fault_kind)(F.redo - 1);
        F.redo = 0;
        return k;
    }
    if (F.deck_pos >= F.deck_len) {
        F.deck_len = 0;
        for (int k = 0; k < F_COUNT; k++)
            if (enabled_kinds() & (1u << k))
                F.deck[F.deck_len++] = k;
        for (int i = F.deck_len - 1; i > 0; i--) {
            int j = rand_below(&F.rng, i + 1), x = F.deck[i];
            F.deck[i] = F.deck[j];
            F.deck[j] = x;
        }
        F.deck_pos = 0;
    }
    for (int i = F.deck_pos; i < F.deck_len; i++) {
        if (is_restart((fault_kind)F.deck[i]) && !restart_allowed())
            continue;
        int x = F.deck[i];
        F.deck[i] = F.deck[F.deck_pos];
        F.deck[F.deck_pos++] = x;
        return (fault_kind)x;
    }
    int others[F_COUNT], n = 0;
    for (int k = 0; k < F_COUNT; k++)
        if ((enabled_kinds() & (1u << k)) && !is_restart((fault_kind)k))
            others[n++] = k;
    return n ? (fault_kind)others[rand_below(&F.rng, n)] : F_COUNT;
}

/* terminate / cancel: a fresh direct connection picks a pool backend and signals it. */
static void on_observer_closed(void *arg)
{
    (void)arg;
    F.observers--;
    maybe_done();
}

/* A kind that missed before it ever took is drawn next: a short run must still see it once. */
static void observer_missed(fault_kind k)
{
    F.missed[k]++;
    if (F.applied[k] == 0)
        F.redo = (int)k + 1;
}

static void on_observer_answer(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg)
{
    fault_kind k = (fault_kind)(intptr_t)arg;
    if (!err && PQntuples(res) == 1 && strcmp(PQgetvalue(res, 0, 0), "t") == 0)
        F.applied[k]++;
    else
        observer_missed(k); /* no pool backend just then, or the server is restarting */
    pgs_conn_close(c, on_observer_closed, NULL);
}

static void on_observer_open(pgs_conn *c, const pgs_error *err, void *arg)
{
    fault_kind k = (fault_kind)(intptr_t)arg;
    const char *v[] = {pool_appname};
    if (err || pgs_query(c,
                         k == F_TERMINATE
                             ? "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                               "WHERE application_name = $1 ORDER BY random() LIMIT 1"
                             : "SELECT pg_cancel_backend(pid) FROM pg_stat_activity "
                               "WHERE application_name = $1 ORDER BY state = 'idle', random() "
                               "LIMIT 1",
                         1, v, on_observer_answer, arg) != PGS_OK) {
        observer_missed(k);
        pgs_conn_close(c, on_observer_closed, NULL);
    }
}

static void signal_backend(fault_kind k)
{
    pgs_conn_opts o = {.connect_timeout_ms = 2000, .statement_cache = -1};
    pgs_conn *c;
    if (pgs_conn_open(base, opt.conninfo, &o, on_observer_open, (void *)(intptr_t)k, &c) ==
        PGS_OK)
        F.observers++;
    else
        observer_missed(k);
}

/* restart: the command runs in a child process, watched from the loop. */
static void on_child_watch(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    int status;
    pid_t p = waitpid(F.child, &status, WNOHANG);
    if (p == 0) {
        timer_in(F.child_watch, 20);
        return;
    }
    if (p == F.child && WIFEXITED(status) && WEXITSTATUS(status) == 0) {
        F.applied[F.child_kind]++;
    } else {
        F.failed[F.child_kind]++;
        fprintf(stderr, "pgscope-soak: the restart command failed (%s %s)\n", F.restart_cmd,
                F.child_kind == F_RESTART_FAST ? "fast" : "immediate");
    }
    F.child = 0;
    last_progress = now_s();
    /* Until each restart kind asked for has run once, the next comes after a few fault
     * periods: with the long spacing a short run (the 'soak' test's 2,000 transfers, about 8 s)
     * could end before its second kind's turn, on a slow machine, and fail its own check. */
    int spacing = 25;
    for (int k = F_RESTART_FAST; k <= F_RESTART_IMMEDIATE; k++)
        if ((enabled_kinds() & (1u << k)) && F.applied[k] + F.failed[k] == 0)
            spacing = 3;
    F.next_restart = last_progress + spacing * opt.fault_ms / 1000.0;
    F.next_restart_at = finished + (long)spacing * opt.fault_gap;
    maybe_done();
}

static void restart_server(fault_kind k)
{
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "%s %s", F.restart_cmd, k == F_RESTART_FAST ? "fast" : "immediate");
    char *argv[] = {"sh", "-c", cmd, NULL};
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
    /* The server it starts must not inherit our sockets (the proxy's listener among them). */
    posix_spawn_file_actions_addclosefrom_np(&fa, 3);
    pid_t pid;
    int rc = posix_spawn(&pid, "/bin/sh", &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    if (rc != 0) {
        F.failed[k]++;
        return;
    }
    F.child = pid;
    F.child_kind = k;
    timer_in(F.child_watch, 20);
}

static void on_unstall(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    fp_stall(F.proxy, 0);
    F.stalled = 0;
}

static void inject(fault_kind k)
{
    switch (k) {
    case F_TERMINATE:
    case F_CANCEL:
        signal_backend(k);
        return;
    case F_RESTART_FAST:
    case F_RESTART_IMMEDIATE:
        restart_server(k);
        return;
    case F_CUT:
    case F_STALL:
    case F_COMMIT_CUT_BEFORE:
    case F_COMMIT_CUT_AFTER:
    case F_COMMIT_STALL:
        if (k == F_CUT) {
            fp_cut(F.proxy);
        } else if (k == F_STALL) {
            fp_stall(F.proxy, 1);
            F.stalled = 1;
            timer_in(F.unstall, 50 + rand_below(&F.rng, 550));
        } else {
            fp_commit_fault what = k == F_COMMIT_CUT_BEFORE  ? FP_COMMIT_CUT_BEFORE
                                   : k == F_COMMIT_CUT_AFTER ? FP_COMMIT_CUT_AFTER
                                                             : FP_COMMIT_STALL_AFTER;
            fp_on_commit(F.proxy, what, 1, rand_below(&F.rng, 2));
        }
        F.applied[k]++;
        return;
    case F_COUNT:
        return;
    }
}

static void on_fault_timer(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    if (finishing)
        return;
    /* Paced by progress too: on a slow machine (a sanitizer build) faults must not come so
     * often that the pool spends its time reconnecting. */
    if (finished - F.finished_at_last >= opt.fault_gap) {
        fault_kind k = draw_kind();
        if (k != F_COUNT)
            inject(k);
        F.finished_at_last = finished;
    }
    timer_in(F.timer, opt.fault_ms / 2 + rand_below(&F.rng, opt.fault_ms + 1));
}

static void stop_faults(void)
{
    event_del(F.timer);
    if (F.stalled) {
        event_del(F.unstall);
        on_unstall(-1, 0, NULL);
    }
    if (F.proxy)
        fp_on_commit(F.proxy, FP_COMMIT_PASS, 0, 0);
}

/* Which kinds can run: restarts need a command, the proxy kinds the proxy and a server on
 * 127.0.0.1 over TCP (it forwards there). Returns the proxy's target port, or 0. */
static int plan_faults(PGconn *direct)
{
    F.available = (1u << F_TERMINATE) | (1u << F_CANCEL);
    const char *tool = getenv("PGSCOPE_PGTMP");
    if (opt.restart_cmd && *opt.restart_cmd) {
        F.restart_cmd = opt.restart_cmd;
    } else if (tool && *tool && getenv("PGSCOPE_PGDATA") && *getenv("PGSCOPE_PGDATA")) {
        size_t n = strlen(tool) + 64;
        F.restart_owned = must_alloc(n);
        snprintf(F.restart_owned, n, "'%s' pgctl restart -w -t 60 -m", tool);
        F.restart_cmd = F.restart_owned;
    }
    if (F.restart_cmd)
        F.available |= (1u << F_RESTART_FAST) | (1u << F_RESTART_IMMEDIATE);
    else
        F.skipped[F_RESTART_FAST] = F.skipped[F_RESTART_IMMEDIATE] =
            "skipped: no --restart-cmd, PGSCOPE_PGTMP/PGDATA unset";
    const char *addr = PQhostaddr(direct);
    int tcp_loopback = addr && strcmp(addr, "127.0.0.1") == 0;
    int port = tcp_loopback ? atoi(PQport(direct)) : 0;
    for (int k = 0; k < F_COUNT; k++) {
        if (!is_proxy((fault_kind)k))
            continue;
        if (port > 0)
            F.available |= 1u << k;
        else
            F.skipped[k] = "skipped: the server is not on 127.0.0.1 over TCP";
    }
    for (int k = 0; k < F_COUNT; k++)
        if (!(opt.faults & (1u << k)))
            F.skipped[k] = "off (--faults)";
    return port;
}

/* ---- the end: pool closed, unknowns resolved, loop drained ---- */

static struct event *progress_ev, *watch_ev;
static int pool_closed, resolving;
static long resolve_next;

static void resolve_more(void);

static void on_resolve_retry(evutil_socket_t fd, short what, void *arg);

static void on_resolved(pgs_txid_status st, const pgs_error *err, void *arg)
{
    transfer *t = arg;
    last_progress = now_s();
    if (!err && (st == PGS_TXID_COMMITTED || st == PGS_TXID_ABORTED)) {
        t->xid_status = (unsigned char)st;
    } else if (!err && st == PGS_TXID_UNKNOWN) {
        t->xid_status = PGS_TXID_UNKNOWN; /* forgotten: the ledger decides */
    } else if (++t->resolve_tries < RESOLVE_TRIES) {
        /* Still in progress (its session is not gone yet), or the server is not back: ask
         * again shortly. */
        struct timeval tv = ms_tv(200);
        if (event_base_once(base, -1, EV_TIMEOUT, on_resolve_retry, t, &tv) == 0)
            return; /* (still counted in `resolving`) */
    }
    resolving--;
    resolve_more();
}

static void launch_resolve(transfer *t)
{
    resolving++;
    if (pgs_tx_resolve(base, opt.conninfo, t->xid, on_resolved, t) != PGS_OK) {
        resolving--;
        t->resolve_tries = RESOLVE_TRIES; /* the ledger decides */
    }
}

static void on_resolve_retry(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    resolving--;
    launch_resolve(arg);
    resolve_more();
}

static void resolve_more(void)
{
    while (resolving < RESOLVERS && resolve_next < started) {
        transfer *t = T(resolve_next++);
        if (t->outcome == PGS_TX_UNKNOWN && t->xid[0])
            launch_resolve(t);
    }
    maybe_done();
}

static void on_pool_closed(void *arg)
{
    (void)arg;
    pool = NULL;
    pool_closed = 1;
    last_progress = now_s();
    if (F.proxy) {
        fp_get_counts(F.proxy, &F.proxy_counts);
        fp_stop(F.proxy); /* every connection through it closed: their sessions end */
        F.proxy = NULL;
    }
    resolve_more();
}

/* Every transfer is done: the pool's counts, then close it and resolve the unknowns. */
static void begin_finish(void)
{
    if (finishing || may_start())
        return;
    finishing = 1;
    pgs_pool_stats(pool, &end_counts);
    stop_faults();
    pgs_pool_close(pool, on_pool_closed, NULL);
}

/* Nothing is left once the pool is closed, the unknowns asked about, the fault connections and
 * the restart command finished: the soak's own timers go, and the loop runs dry. */
static void maybe_done(void)
{
    if (finishing && pool_closed && resolving == 0 && resolve_next >= started &&
        F.observers == 0 && F.child == 0) {
        event_del(progress_ev);
        event_del(watch_ev);
    }
}

/* ---- the report ---- */

typedef struct tally {
    char label[48];
    long n;
    const transfer *first; /* an example, for --verbose */
} tally;

static tally rollbacks[64];
static int nrollbacks;

static void count_rollback(const char *label, const transfer *t)
{
    for (int i = 0; i < nrollbacks; i++)
        if (strcmp(rollbacks[i].label, label) == 0) {
            rollbacks[i].n++;
            return;
        }
    if (nrollbacks < (int)(sizeof rollbacks / sizeof *rollbacks)) {
        snprintf(rollbacks[nrollbacks].label, sizeof rollbacks[nrollbacks].label, "%s", label);
        rollbacks[nrollbacks].first = t;
        rollbacks[nrollbacks++].n = 1;
    }
}

static int by_count(const void *a, const void *b)
{
    const tally *x = a, *y = b;
    return x->n < y->n ? 1 : x->n > y->n ? -1 : strcmp(x->label, y->label);
}

static void row(const char *label, const char *fmt, ...)
{
    char value[96];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(value, sizeof value, fmt, ap);
    va_end(ap);
    printf("| %-52s | %22s |\n", label, value);
}

typedef struct invariant {
    const char *what;
    int checked;
    long bad; /* 0: held */
} invariant;

enum {
    I_TOTAL,
    I_ACCOUNTS,
    I_LEDGER_ROWS,
    I_COMMITTED,
    I_ROLLED_BACK,
    I_UNKNOWN,
    I_NOT_EXECUTED,
    I_CALLBACKS,
    I_OUTCOMES,
    I_POOL,
    I_DRAINED,
    I_FAULTS,
    I_COUNT
};

static invariant inv[I_COUNT] = {
    {"total balance unchanged", 0, 0},
    {"every account = start + its ledger rows", 0, 0},
    {"every ledger row is a transfer, as sent", 0, 0},
    {"every COMMITTED transfer has its ledger row", 0, 0},
    {"every ROLLED_BACK transfer has none", 0, 0},
    {"every UNKNOWN resolved (xid agrees with ledger)", 0, 0},
    {"no UNKNOWN that was provably not executed", 0, 0},
    {"every callback fired exactly once", 0, 0},
    {"outcomes well-formed (codes, attempts)", 0, 0},
    {"pool at the end: in use 0, waiting 0, sessions gone", 0, 0},
    {"the loop drained (dispatch returned 1)", 0, 0},
    {"every fault kind asked for was injected", 0, 0},
};

/* One example per violated invariant, on stderr, to start debugging from. */
static void example(int which, const transfer *t, const char *what)
{
    if (inv[which].bad++ >= 5)
        return;
    if (!t) {
        fprintf(stderr, "pgscope-soak: VIOLATED %s: %s\n", inv[which].what, what);
        return;
    }
    char code[32];
    code_name(t->code, code, sizeof code);
    fprintf(stderr,
            "pgscope-soak: VIOLATED %s: transfer %ld (%s%s%s%s%s, %d -> %d, %d): %s; reported %s "
            "%s %s xid '%s' attempts %d (bodies %d), callbacks: done %d, ends %d/%d, "
            "statements %d/%d, late %d, gaps %d%s%s\n",
            inv[which].what, t->id, shape_names[t->shape], t->mods & M_TIMEOUT ? " +timeout" : "",
            t->mods & M_CANCEL ? " +cancel" : "", t->mods & M_SLEEP ? " +sleep" : "",
            t->mods & M_RESOLVABLE ? " +resolvable" : "", t->from, t->to, t->amount, what,
            t->outcome == PGS_TX_COMMITTED     ? "COMMITTED"
            : t->outcome == PGS_TX_ROLLED_BACK ? "ROLLED_BACK"
            : t->outcome == PGS_TX_UNKNOWN     ? "UNKNOWN"
                                               : "(no outcome)",
            t->code ? code : "", t->sqlstate, t->xid, t->attempts, t->bodies, t->done_calls,
            t->end_dones, t->ends, t->fired, t->queued, t->late, t->gaps,
            t->message ? ": " : "", t->message ? t->message : "");
}

/* Why an unknown's id and its ledger row disagree, with what the ledger says of that id: a
 * row written under it (xmin) by another transfer means the server gave the id out again. */
static const char *xid_owner(PGconn *c, const char *xid, int committed)
{
    static char why[160];
    const char *v[] = {xid};
    PGresult *r = sql_exec(c,
                           "SELECT transfer_id FROM soak_ledger "
                           "WHERE xmin = (($1::bigint % 4294967296)::text)::xid",
                           1, v);
    snprintf(why, sizeof why, "txid_status says %s, %s; the ledger row written under that id: %s%s",
             committed ? "committed" : "aborted",
             committed ? "no ledger row" : "the ledger row is there",
             PQntuples(r) ? "transfer " : "none",
             PQntuples(r) ? PQgetvalue(r, 0, 0) : "");
    PQclear(r);
    return why;
}

/* The final checks through a connection of their own, straight to the server. */
static void check_server(long *resolved_committed, long *resolved_aborted, long *by_xid)
{
    PGconn *c = direct_connect();
    /* The pool's sessions must be gone before the ledger can decide an unknown. */
    const char *v[] = {pool_appname};
    long left = -1;
    for (double end = now_s() + 30; now_s() < end;) {
        PGresult *r = sql_exec(
            c, "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", 1, v);
        left = atol(PQgetvalue(r, 0, 0));
        PQclear(r);
        if (left == 0)
            break;
        usleep(50000);
    }
    if (left != 0) {
        char what[96];
        snprintf(what, sizeof what, "%ld pool sessions still on the server 30 s after close",
                 left);
        example(I_POOL, NULL, what);
    }
    unsigned char *row_of = must_alloc((size_t)started + 1);
    long *expect = must_alloc(((size_t)opt.accounts + 1) * sizeof *expect);
    for (int a = 1; a <= opt.accounts; a++)
        expect[a] = START_BALANCE;
    PGresult *r = sql_exec(c, "SELECT transfer_id, from_id, to_id, amount FROM soak_ledger", 0,
                           NULL);
    inv[I_LEDGER_ROWS].checked = 1;
    for (int i = 0; i < PQntuples(r); i++) {
        long id = atol(PQgetvalue(r, i, 0));
        int from = atoi(PQgetvalue(r, i, 1)), to = atoi(PQgetvalue(r, i, 2));
        long amount = atol(PQgetvalue(r, i, 3));
        if (from >= 1 && from <= opt.accounts && to >= 1 && to <= opt.accounts) {
            expect[from] -= amount;
            expect[to] += amount;
        }
        if (id < 1 || id > started) {
            example(I_LEDGER_ROWS, NULL, "a ledger row with an id no transfer had");
            continue;
        }
        const transfer *t = T(id - 1);
        row_of[id] = 1;
        if (t->from != from || t->to != to || t->amount != amount)
            example(I_LEDGER_ROWS, t, "its ledger row differs from what was sent");
    }
    PQclear(r);
    r = sql_exec(c, "SELECT id, balance FROM soak_accounts ORDER BY id", 0, NULL);
    inv[I_TOTAL].checked = inv[I_ACCOUNTS].checked = 1;
    long total = 0;
    for (int i = 0; i < PQntuples(r); i++) {
        int id = atoi(PQgetvalue(r, i, 0));
        long balance = atol(PQgetvalue(r, i, 1));
        total += balance;
        if (id < 1 || id > opt.accounts || balance != expect[id]) {
            char what[128];
            snprintf(what, sizeof what, "account %d holds %ld, its ledger rows say %ld", id,
                     balance, id >= 1 && id <= opt.accounts ? expect[id] : 0);
            example(I_ACCOUNTS, NULL, what);
        }
    }
    if (PQntuples(r) != opt.accounts)
        example(I_ACCOUNTS, NULL, "accounts missing");
    if (total != (long)opt.accounts * START_BALANCE) {
        char what[96];
        snprintf(what, sizeof what, "total %ld, expected %ld", total,
                 (long)opt.accounts * START_BALANCE);
        example(I_TOTAL, NULL, what);
    }
    PQclear(r);
    inv[I_COMMITTED].checked = inv[I_ROLLED_BACK].checked = inv[I_UNKNOWN].checked = 1;
    for (long i = 0; i < started; i++) {
        transfer *t = T(i);
        int has = row_of[t->id];
        if (t->outcome == PGS_TX_COMMITTED && !has)
            example(I_COMMITTED, t, "no ledger row");
        else if (t->outcome == PGS_TX_ROLLED_BACK && has)
            example(I_ROLLED_BACK, t, "its ledger row is there");
        else if (t->outcome == PGS_TX_UNKNOWN) {
            int committed = has;
            if (t->xid_status == PGS_TXID_COMMITTED || t->xid_status == PGS_TXID_ABORTED) {
                (*by_xid)++;
                committed = t->xid_status == PGS_TXID_COMMITTED;
                if (committed != has)
                    example(I_UNKNOWN, t, xid_owner(c, t->xid, committed));
            }
            (*(committed ? resolved_committed : resolved_aborted))++;
        }
    }
    PQfinish(c);
    free(row_of);
    free(expect);
}

/* What the library reported, checked against itself: callbacks and outcomes. */
static void check_bookkeeping(long *not_executed)
{
    inv[I_CALLBACKS].checked = inv[I_OUTCOMES].checked = inv[I_NOT_EXECUTED].checked = 1;
    for (long i = 0; i < started; i++) {
        transfer *t = T(i);
        if (t->done_calls != 1 || t->fired != t->queued || t->end_dones != t->ends ||
            t->late || t->gaps || t->attempt_open)
            example(I_CALLBACKS, t, "a callback fired twice, never, late or early");
        int ok = 0;
        switch (t->outcome) {
        case PGS_TX_COMMITTED:
            ok = t->code == PGS_OK && t->attempts >= 1;
            break;
        case PGS_TX_ROLLED_BACK:
            ok = t->code != PGS_OK || t->asked_rollback;
            break;
        case PGS_TX_UNKNOWN:
            ok = t->code == PGS_ECOMMIT_UNKNOWN && t->attempts >= 1;
            break;
        }
        if (!ok || t->attempts != t->bodies || t->attempts > opt.retries + 1)
            example(I_OUTCOMES, t, "outcome, code and attempts do not fit");
        if (t->outcome == PGS_TX_COMMITTED && t->proof)
            example(I_OUTCOMES, t, "COMMITTED after the server's error or FATAL was received");
        if (t->outcome == PGS_TX_UNKNOWN && t->proof) {
            (*not_executed)++;
            example(I_NOT_EXECUTED, t, "UNKNOWN after the server's error or FATAL was received");
        }
    }
}

/* The checks, then the table. Returns how many transfers committed. */
static long print_report(double duration, int dispatch_rc, int selftest_id, long hung)
{
    long committed = 0, rolled_back = 0, unknown = 0, retries = 0, unknown_xid = 0;
    long resolved_committed = 0, resolved_aborted = 0, by_xid = 0, not_executed = 0;
    long shapes[SH_COUNT] = {0}, resolvable = 0, proved = 0;
    for (long i = 0; i < started; i++) {
        transfer *t = T(i);
        shapes[t->shape]++;
        resolvable += (t->mods & M_RESOLVABLE) != 0;
        proved += t->outcome && t->proof;
        if (t->attempts > 1)
            retries += t->attempts - 1;
        if (t->outcome == PGS_TX_COMMITTED) {
            committed++;
        } else if (t->outcome == PGS_TX_ROLLED_BACK) {
            rolled_back++;
            char label[48], code[32];
            code_name(t->code, code, sizeof code);
            if (t->code == PGS_OK)
                snprintf(label, sizeof label, "%s",
                         t->asked_rollback == DECLINED ? "declined (balance too low, ok = 0)"
                                                       : "ok = 0 (statement refused at once)");
            else if (t->sqlstate[0])
                snprintf(label, sizeof label, "%s %s", code, t->sqlstate);
            else
                snprintf(label, sizeof label, "%s", code);
            count_rollback(label, t);
        } else if (t->outcome == PGS_TX_UNKNOWN) {
            if (!unknown++)
                count_rollback("unknown", t); /* (an example only: not a rollback row) */
            unknown_xid += t->xid[0] != 0;
        }
    }
    if (!hung) {
        check_server(&resolved_committed, &resolved_aborted, &by_xid);
        check_bookkeeping(&not_executed);
        inv[I_POOL].checked = inv[I_DRAINED].checked = 1;
        /* (the multiplexed mode keeps its connections for a second after the last transaction:
         * for it the sessions' end after the close is the check) */
        if ((end_counts.in_use != 0 && !opt.multiplex) || end_counts.waiting != 0) {
            char what[96];
            snprintf(what, sizeof what, "after the last transfer: in use %d, waiting %d",
                     end_counts.in_use, end_counts.waiting);
            example(I_POOL, NULL, what);
        }
        if (dispatch_rc != 1 ||
            event_base_get_num_events(base, EVENT_BASE_COUNT_ADDED | EVENT_BASE_COUNT_ACTIVE) != 0)
            example(I_DRAINED, NULL, "events left on the loop");
    } else {
        inv[I_CALLBACKS].checked = inv[I_DRAINED].checked = 1;
        char what[96];
        snprintf(what, sizeof what, "%ld transfers without a done after %d s", hung, opt.stuck_s);
        example(I_CALLBACKS, NULL, what);
        example(I_DRAINED, NULL, "the soak hung");
    }
    inv[I_FAULTS].checked = 1;
    for (int k = 0; k < F_COUNT; k++)
        if ((enabled_kinds() & (1u << k)) && F.applied[k] == 0) {
            char what[96];
            snprintf(what, sizeof what, "%s was never injected", fault_names[k]);
            example(I_FAULTS, NULL, what);
        }

    static const char dashes[] = "--------------------------------------------------------";
    printf("\n| %-52s | %22s |\n", "pgscope-soak", "");
    printf("|-%.52s-|-%.22s:|\n", dashes, dashes);
    row("seed (replay with --seed)", "%llu", (unsigned long long)opt.seed);
    row("duration", "%.1f s", duration);
    row("concurrency / pool size / accounts", "%d / %d%s / %d", opt.concurrency, opt.pool,
        opt.multiplex ? " multiplexed" : "",
        opt.accounts);
    row("transfers attempted", "%ld", started);
    row("  one-trip / read-decide / savepoint", "%ld / %ld / %ld", shapes[SH_ONE_TRIP],
        shapes[SH_READ], shapes[SH_SAVEPOINT]);
    row("  resolvable", "%ld", resolvable);
    row("committed", "%ld", committed);
    row("rolled back", "%ld", rolled_back);
    row("  of which after the server's error or FATAL", "%ld", proved);
    qsort(rollbacks, (size_t)nrollbacks, sizeof *rollbacks, by_count);
    for (int i = 0; i < nrollbacks; i++) {
        char label[64];
        snprintf(label, sizeof label, "  %.47s", rollbacks[i].label);
        if (strcmp(rollbacks[i].label, "unknown") != 0)
            row(label, "%ld", rollbacks[i].n);
    }
    row("unknown (PGS_ECOMMIT_UNKNOWN)", "%ld", unknown);
    row("  with a transaction id", "%ld", unknown_xid);
    if (!hung) {
        row("  resolved committed / aborted", "%ld / %ld", resolved_committed, resolved_aborted);
        row("  resolved by pgs_tx_resolve / by ledger row", "%ld / %ld", by_xid,
            unknown - by_xid);
        row("  provably not executed (must be 0)", "%ld", not_executed);
    }
    row("retries (sum of attempts - 1)", "%ld", retries);
    row("pgs_tx_cancel calls that took", "%ld", cancel_calls);
    for (int k = 0; k < F_COUNT; k++) {
        char label[64];
        snprintf(label, sizeof label, "fault %s", fault_names[k]);
        if (F.skipped[k])
            row(label, "%s", "skipped");
        else if (F.missed[k] || F.failed[k])
            row(label, "%ld (+%ld missed%s)", F.applied[k], F.missed[k] + F.failed[k],
                F.failed[k] ? ", failed" : "");
        else
            row(label, "%ld", F.applied[k]);
    }
    if (enabled_kinds() >> F_CUT) {
        row("  proxy: connections / cut", "%ld / %ld", F.proxy_counts.connections,
            F.proxy_counts.cuts);
        row("  proxy: COMMITs seen / hit by a fault", "%ld / %ld", F.proxy_counts.commits,
            F.proxy_counts.commit_faults);
    }
    int passed = 0, failed = 0;
    for (int i = 0; i < I_COUNT; i++) {
        if (!inv[i].checked)
            continue;
        char label[96];
        snprintf(label, sizeof label, "%s", inv[i].what);
        row(label, "%s", inv[i].bad ? "VIOLATED" : "held");
        inv[i].bad ? failed++ : passed++;
    }
    printf("\n");
    for (int k = 0; k < F_COUNT; k++)
        if (F.skipped[k] && strcmp(F.skipped[k], "off (--faults)") != 0)
            printf("fault %s %s\n", fault_names[k], F.skipped[k]);
    for (int i = 0; opt.verbose && i < nrollbacks; i++)
        printf("%s, e.g. transfer %ld: %s\n", rollbacks[i].label, rollbacks[i].first->id,
               rollbacks[i].first->message ? rollbacks[i].first->message : "(no error)");
    if (selftest_id)
        printf("selftest: transfer %d was recorded as ROLLED_BACK instead of COMMITTED\n",
               selftest_id);
    printf("soak: %d passed, %d failed\n", passed, failed);
    fflush(stdout);
    return committed;
}

/* ---- progress and the hang watch ---- */

static void on_progress(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    if (opt.quiet)
        return;
    long faults = 0;
    for (int k = 0; k < F_COUNT; k++)
        faults += F.applied[k];
    double el = now_s() - t_start;
    pgs_pool_counts pc = {0};
    if (pool)
        pgs_pool_stats(pool, &pc);
    fprintf(stderr,
            "pgscope-soak: %.0f s, %ld/%ld transfers done (%.0f/s), %ld faults; pool: %d open, "
            "%d idle, %d in use, %d waiting%s\n",
            el, finished, started, el > 0 ? finished / el : 0.0, faults, pc.size, pc.idle,
            pc.in_use, pc.waiting, finishing ? ", finishing" : "");
}

static void on_watch(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    if (now_s() - last_progress < opt.stuck_s)
        return;
    /* Something never called back: say what, check nothing else, exit 1. */
    fprintf(stderr, "pgscope-soak: no progress for %d s (%ld of %ld transfers done%s)\n",
            opt.stuck_s, finished, started, finishing ? ", finishing" : "");
    long hung = 0;
    for (long i = 0; i < started; i++)
        if (!T(i)->done_calls && hung++ < 5)
            example(I_CALLBACKS, T(i), "no done yet");
    inv[I_CALLBACKS].bad = 0;
    print_report(now_s() - t_start, -1, 0, hung ? hung : 1);
    _exit(1);
}

/* ---- command line ---- */

static const char usage_text[] =
    "usage: pgscope-soak [options]\n"
    "\n"
    "Random bank transfers through pgs_pool_run_tx under real faults, then checks every\n"
    "reported outcome against what the server holds. Prints one table; exit status 0 when\n"
    "every invariant held, 1 when one did not, 2 on a setup error (unreachable server, ...).\n"
    "\n"
    "options:\n"
    "  --conninfo S      the server (default: $PGSCOPE_TEST_CONNINFO, else libpq's environment);\n"
    "                    a superuser (it signals backends); it owns soak_accounts and\n"
    "                    soak_ledger and empties them first\n"
    "  --transfers N     transfers to run (default 10000)\n"
    "  --seconds S       stop starting new transfers after S seconds\n"
    "  --concurrency N   transfers at once (default 16)\n"
    "  --pool N          the pool's max_size (default 8)\n"
    "  --multiplex       the pool's multiplexed mode: transactions pipelined on shared\n"
    "                    connections (pgs_pool_opts.multiplex)\n"
    "  --accounts N      accounts (default 20; fewer means more conflicts)\n"
    "  --retries N       pgs_tx_opts.retries (default 8)\n"
    "  --seed N          the seed of every random choice (default: from the clock; printed)\n"
    "  --faults LIST     comma-separated kinds, or all (default) or none: terminate, cancel,\n"
    "                    restart-fast, restart-immediate, cut, stall, commit-cut-before,\n"
    "                    commit-cut-after, commit-stall\n"
    "  --fault-ms MS     mean time between faults (default 200)\n"
    "  --fault-gap N     and at least N transfers done between two faults (default 10);\n"
    "                    a restart comes at most once per 25 intervals and 25 gaps\n"
    "  --restart-cmd C   a shell command that restarts the server; the soak appends the\n"
    "                    shutdown mode (fast or immediate), e.g. 'pg_ctl -D DIR restart -w -m'\n"
    "                    (default: $PGSCOPE_PGTMP pgctl ..., when PGSCOPE_PGTMP and\n"
    "                    PGSCOPE_PGDATA are set, as under tools/pgtmp.sh)\n"
    "  --stuck S         a hang: no progress for S seconds (default 60)\n"
    "  --selftest        corrupt one recorded outcome: the checks must catch it (exit 1)\n"
    "  --quiet           no progress lines\n"
    "  --verbose         after the table, one example message per kind of rollback\n"
    "  -h, --help        this text\n";

static long number(const char *s, const char *what, long min, long max)
{
    char *end;
    long v = strtol(s, &end, 10);
    if (*s == '\0' || *end != '\0' || v < min || v > max)
        setup_error("%s must be a number from %ld to %ld, not \"%s\"", what, min, max, s);
    return v;
}

static unsigned parse_faults(const char *s)
{
    if (strcmp(s, "all") == 0)
        return (1u << F_COUNT) - 1;
    unsigned set = 0;
    char *copy = strdup(s), *save = NULL;
    if (!copy)
        setup_error("out of memory");
    for (char *w = strtok_r(copy, ",", &save); w; w = strtok_r(NULL, ",", &save)) {
        if (strcmp(w, "none") == 0)
            continue;
        int k = 0;
        while (k < F_COUNT && strcmp(w, fault_names[k]) != 0)
            k++;
        if (k == F_COUNT)
            setup_error("no fault kind \"%s\" (see --help)", w);
        set |= 1u << k;
    }
    free(copy);
    return set;
}

static void parse_args(int argc, char **argv)
{
    enum { O_CONNINFO = 256, O_TRANSFERS, O_SECONDS, O_CONC, O_POOL, O_ACCOUNTS, O_RETRIES,
           O_SEED, O_FAULTS, O_FAULT_MS, O_FAULT_GAP, O_RESTART, O_STUCK, O_SELFTEST, O_QUIET,
           O_VERBOSE, O_MULTIPLEX };
    static const struct option longopts[] = {
        {"conninfo", required_argument, 0, O_CONNINFO},
        {"transfers", required_argument, 0, O_TRANSFERS},
        {"seconds", required_argument, 0, O_SECONDS},
        {"concurrency", required_argument, 0, O_CONC},
        {"pool", required_argument, 0, O_POOL},
        {"accounts", required_argument, 0, O_ACCOUNTS},
        {"retries", required_argument, 0, O_RETRIES},
        {"seed", required_argument, 0, O_SEED},
        {"faults", required_argument, 0, O_FAULTS},
        {"fault-ms", required_argument, 0, O_FAULT_MS},
        {"fault-gap", required_argument, 0, O_FAULT_GAP},
        {"restart-cmd", required_argument, 0, O_RESTART},
        {"stuck", required_argument, 0, O_STUCK},
        {"selftest", no_argument, 0, O_SELFTEST},
        {"quiet", no_argument, 0, O_QUIET},
        {"verbose", no_argument, 0, O_VERBOSE},
        {"multiplex", no_argument, 0, O_MULTIPLEX},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    const char *env = getenv("PGSCOPE_TEST_CONNINFO");
    opt.conninfo = env ? env : "";
    int seed_given = 0, transfers_given = 0;
    for (int ch; (ch = getopt_long(argc, argv, "h", longopts, NULL)) != -1;) {
        switch (ch) {
        case O_CONNINFO: opt.conninfo = optarg; break;
        case O_TRANSFERS:
            opt.transfers = number(optarg, "--transfers", 1, MAX_TRANSFERS);
            transfers_given = 1;
            break;
        case O_SECONDS: opt.seconds = (double)number(optarg, "--seconds", 1, 1000000); break;
        case O_CONC: opt.concurrency = (int)number(optarg, "--concurrency", 1, 10000); break;
        case O_POOL: opt.pool = (int)number(optarg, "--pool", 1, 1000); break;
        case O_MULTIPLEX: opt.multiplex = 1; break;
        case O_ACCOUNTS: opt.accounts = (int)number(optarg, "--accounts", 2, 1000000); break;
        case O_RETRIES: opt.retries = (int)number(optarg, "--retries", 0, 1000); break;
        case O_SEED: {
            char *end;
            opt.seed = strtoull(optarg, &end, 10);
            if (!*optarg || *end)
                setup_error("--seed must be a number, not \"%s\"", optarg);
            seed_given = 1;
            break;
        }
        case O_FAULTS: opt.faults = parse_faults(optarg); break;
        case O_FAULT_MS: opt.fault_ms = (int)number(optarg, "--fault-ms", 1, 3600000); break;
        case O_FAULT_GAP: opt.fault_gap = (int)number(optarg, "--fault-gap", 0, 1000000); break;
        case O_RESTART: opt.restart_cmd = optarg; break;
        case O_STUCK: opt.stuck_s = (int)number(optarg, "--stuck", 1, 86400); break;
        case O_SELFTEST: opt.selftest = 1; break;
        case O_QUIET: opt.quiet = 1; break;
        case O_VERBOSE: opt.verbose = 1; break;
        case 'h': fputs(usage_text, stdout); exit(0);
        default: setup_error("see pgscope-soak --help");
        }
    }
    if (optind < argc)
        setup_error("unexpected argument \"%s\"", argv[optind]);
    if (opt.seconds > 0 && !transfers_given)
        opt.transfers = MAX_TRANSFERS; /* the clock decides */
    if (!seed_given) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        uint64_t s = (uint64_t)ts.tv_sec * 1000000007ull ^ (uint64_t)ts.tv_nsec ^
                     ((uint64_t)getpid() << 32);
        opt.seed = next_rand(&s) % 1000000000000ull;
    }
}

/* The selftest: one COMMITTED outcome recorded as ROLLED_BACK. Returns its id, or 0. */
static int corrupt_one(void)
{
    for (long i = 0; i < started; i++) {
        transfer *t = T(i);
        if (t->outcome == PGS_TX_COMMITTED) {
            t->outcome = PGS_TX_ROLLED_BACK;
            t->code = PGS_ESQL;
            snprintf(t->sqlstate, sizeof t->sqlstate, "40001");
            return (int)t->id;
        }
    }
    return 0;
}

int main(int argc, char **argv)
{
    parse_args(argc, argv);
    signal(SIGPIPE, SIG_IGN); /* a cut connection must not end the soak */
    printf("pgscope-soak: seed %llu (replay: --seed %llu)\n", (unsigned long long)opt.seed,
           (unsigned long long)opt.seed);
    fflush(stdout);

    PGconn *direct = direct_connect();
    create_schema(direct);
    F.rng = opt.seed ^ 0x5ca1ab1e0ddba11ull;
    int target_port = plan_faults(direct);
    char port[16] = "";
    if (target_port > 0 && (enabled_kinds() >> F_CUT)) {
        F.proxy = fp_start(target_port);
        if (!F.proxy)
            setup_error("cannot start the fault proxy");
        snprintf(port, sizeof port, "%d", fp_port(F.proxy));
    }
    if (!opt.quiet)
        fprintf(stderr, "pgscope-soak: PostgreSQL %s at %s:%s%s\n",
                PQparameterStatus(direct, "server_version"), PQhost(direct), PQport(direct),
                port[0] ? ", the pool through the fault proxy" : "");
    PQfinish(direct);

    base = event_base_new();
    if (!base)
        setup_error("cannot create an event loop");
    snprintf(pool_appname, sizeof pool_appname, "pgscope-soak-%ld", (long)getpid());
    pool_conninfo = rebuild_conninfo(opt.conninfo, pool_appname, port[0] ? port : NULL);
    pgs_pool_opts po = {.max_size = opt.pool,
                        .multiplex = opt.multiplex,
                        .acquire_timeout_ms = 10000,
                        .conn = {.connect_timeout_ms = 5000, .cancel_timeout_ms = 1000}};
    if (pgs_pool_new(base, pool_conninfo, &po, &pool) != PGS_OK)
        setup_error("cannot create the pool");

    F.timer = timer_new(on_fault_timer, NULL, 0);
    F.unstall = timer_new(on_unstall, NULL, 0);
    F.child_watch = timer_new(on_child_watch, NULL, 0);
    progress_ev = timer_new(on_progress, NULL, 1);
    watch_ev = timer_new(on_watch, NULL, 1);
    timer_in(progress_ev, 2000);
    timer_in(watch_ev, 1000);
    if (enabled_kinds())
        timer_in(F.timer, opt.fault_ms);

    t_start = last_progress = now_s();
    t_stop_starting = t_start + opt.seconds;
    start_more();
    int rc = event_base_dispatch(base);
    double duration = now_s() - t_start;

    int selftest_id = opt.selftest ? corrupt_one() : 0;
    long committed = print_report(duration, rc, selftest_id, 0);
    if (started >= 10 && committed == 0)
        setup_error("no transfer committed: the pool could not work with the server");
    int violated = 0;
    for (int i = 0; i < I_COUNT; i++)
        violated |= inv[i].checked && inv[i].bad;

    for (long i = 0; i < started; i++)
        free(T(i)->message);
    for (size_t i = 0; i < sizeof chunks / sizeof *chunks; i++)
        free(chunks[i]);
    event_free(F.timer);
    event_free(F.unstall);
    event_free(F.child_watch);
    event_free(progress_ev);
    event_free(watch_ev);
    event_base_free(base);
    free(pool_conninfo);
    free(F.restart_owned);
    return violated ? 1 : 0;
}

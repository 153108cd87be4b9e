/* Model-based random testing against the real server (issue 13): thousands of seeded random
 * programs of API calls checked against a reference model of pgscope.h.
 *
 * A program opens guards and pools and then, between loop steps (EVLOOP_ONCE / EVLOOP_NONBLOCK)
 * and from inside callbacks, issues random calls: pgs_conn_open / pgs_query / pgs_conn_close /
 * pgs_conn_cancel; pgs_tx_begin / pgs_tx_savepoint / pgs_tx_query / pgs_tx_end (ok or not) /
 * pgs_tx_cancel; pgs_run_tx and its body; pgs_pool_new / pgs_pool_acquire /
 * pgs_pool_acquire_cancel / release (pgs_conn_close on an acquired guard) / pgs_pool_run_tx /
 * pgs_pool_close; NULL arguments. Handles are used in every state the header allows: closing,
 * cancelled, gone, still connecting, ending, with a child open, orphaned, owned by a
 * transaction, inside their own exit callback, requests inside their own callback, ...
 *
 * The model tracks each handle's state and predicts each call's immediate code: the exact code
 * where the header fixes it, the documented set where the state is not observable (whether an
 * end's reply came, whether a timeout fired) or where the header leaves the choice open. It
 * knows which callbacks must fire (one per call that returned PGS_OK) and checks that each
 * fires exactly once, never inside an API call, in the documented order (statements before
 * their transaction's done, children before parents, everything before a close's or pool's
 * done), with a code its history allows and a correct value. A program ends by closing what is
 * still open; the loop must then drain with no descriptor left, and the server must show no
 * session of the program (application_name pgs_model_<pid>_<n>, checked in batches).
 *
 * Environment:
 *   PGSCOPE_SEED            base seed (default: the time); program i runs with a seed derived
 *                           from it. A failure prints the seed, the command that reruns that
 *                           program alone, and the program's operation log (calls, codes,
 *                           callbacks), also when the process dies (crash, sanitizer report).
 *   PGSCOPE_MODEL_PROGRAMS  how many programs (default 2000); new programs stop after
 *   PGSCOPE_MODEL_SECONDS   seconds (default 55), whichever comes first
 *   PGSCOPE_MODEL_FIRST     the first program's number (default 0)
 *   PGSCOPE_MODEL_AVOID     comma-separated classes of calls to leave out while a known library
 *                           defect is open: closedone, pooldone, orphan, econn,
 *                           aborted (see avoid_names) */
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>

#include "helpers.h"

#if defined(__SANITIZE_ADDRESS__)
#define MODEL_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MODEL_SANITIZED 1
#endif
#endif
#ifdef MODEL_SANITIZED
#include <sanitizer/common_interface_defs.h>
#endif

enum { DEFAULT_PROGRAMS = 2000, DEFAULT_SECONDS = 55 };

#define M(code) (1u << (unsigned)(code))

/* ---- the program's state: the model ---------------------------------------------------- */

enum { MAXC = 64, MAXT = 192, MAXP = 3, MAXQ = 96, MAXR = 64, MAXCB = 1600 };

enum { C_PLAIN, C_POOLED, C_HIDDEN };
enum { T_OPEN, T_ENDED, T_DONE };
enum {
    K_OPEN,
    K_QUERY,
    K_CLOSE,
    K_BEGUN,
    K_TXQ,
    K_TXDONE,
    K_RUNDONE,
    K_BODY,
    K_ACQ,
    K_POOLDONE,
    K_STRAY /* the callback of a call that was refused: must never fire */
};
static const char *const kind_names[] = {"on_open",  "query",     "close done", "on_begun",
                                         "tx query", "tx done",   "run done",   "body",
                                         "acquire",  "pool done", "stray"};

typedef struct mcb {
    int kind;
    int expected; /* its call returned PGS_OK */
    int fired;
    int seq; /* order of firing */
    int conn, tx, pool, req, run;
    unsigned allowed; /* codes it may report */
    int stmt;
    char want[24]; /* the value a successful SELECT must return */
} mcb;

typedef struct mconn {
    int used, kind, pool;
    pgs_conn *h;
    int valid;         /* the user may call on it */
    int connecting;    /* plain: on_open has not fired */
    unsigned bad;      /* the connect error its conninfo gets (0: a good one) */
    int closing;       /* pgs_conn_close returned PGS_OK */
    int exiting;       /* inside its close's done */
    int exited;        /* its close's done returned: the handle is gone */
    int dead;          /* 0 alive, 1 perhaps (an asynchronous killer), 2 gone */
    unsigned deadmask; /* what a call on it answers once it is gone */
    int nq;            /* pgs_query callbacks not yet fired */
    int txroot;        /* the last root transaction begun on it, or -1 */
    int runs_pending;  /* pgs_run_tx accepted, body not started */
    int open_cb, close_cb;
    int run; /* hidden: the pool run it serves */
} mconn;

typedef struct mtx {
    int used;
    pgs_tx *h;
    int conn, parent, child, root;
    int state, orphan, valid, expire;
    int finished; /* root: known to have let go of its connection */
    int run;      /* a body's transaction: its run, or -1 */
    int done_cb, begun_cb;
    int ok;
    int cancelled;                                    /* root: pgs_tx_cancel returned PGS_OK */
    int timeout, stmt_timeout, read_only, deferrable; /* root's options */
    int may_fail;     /* root: a statement of the tree may fail (its error aborts what follows) */
    int events;       /* root: the tree met a close, cancel, loss or timeout */
    int misuse;       /* root: a scope of the tree was ended with a child open */
    int failure_seen; /* root: a statement of the tree reported its failure */
    int ended_with_child;
} mtx;

typedef struct mpool {
    int used, valid, closing, exiting;
    pgs_pool *h;
    pgs_pool_opts o;
    int close_cb;
} mpool;

typedef struct mreq {
    int used, valid, pool, cb, firing, cancelled;
    pgs_pool_req *h;
} mreq;

typedef struct mrun {
    int used, pool, conn, body_cb, done_cb, tx, conflict, finished;
    pgs_tx_opts o;
} mrun;

static struct prog {
    int active, number, dumped;
    uint64_t seed;
    struct event_base *base;
    struct event *guard;
    int guard_fired;
    const char *api;   /* the API call in progress, or NULL */
    const char *doing; /* its description for the log */
    char ctx[24];
    int cleanup;
    int quiet; /* letting the loop settle: callbacks make no calls */
    int ops, budget, hard_budget, steps;
    int fire_seq;
    int plain_opened;
    double deadline;
    int fds;
    mconn c[MAXC];
    mtx t[MAXT];
    mpool p[MAXP];
    mreq q[MAXQ];
    mrun r[MAXR];
    mcb cb[MAXCB];
    int nc, nt, np, nq, nr, ncb;
} P;

static uint64_t base_seed;
static uint64_t rng;
static char app_prefix[64];
static char table[64];
static char password[256];
static int avoid_closedone, avoid_pooldone, avoid_orphan, avoid_aborted, tolerate_econn;
static long total_ops, total_callbacks, total_programs;
static double time_run, time_cleanup, time_server;

/* ---- randomness ---- */

static uint64_t splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static unsigned rnd(unsigned n)
{
    return n ? (unsigned)(splitmix(&rng) % n) : 0;
}

static int chance(unsigned pct)
{
    return rnd(100) < pct;
}

static uint64_t program_seed(int i)
{
    uint64_t s = base_seed ^ ((uint64_t)(unsigned)i * 0xd1b54a32d192ed03ull);
    return splitmix(&s);
}

/* ---- the operation log ---- */

enum { LOG_MAX = 8 << 20 };
static char *log_buf;
static size_t log_len, log_cap;

static void mlog(const char *fmt, ...)
{
    char line[600];
    int n = snprintf(line, sizeof line, "%-7s ", P.ctx);
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
    va_end(ap);
    size_t len = strlen(line);
    (void)m;
    if (log_len + len + 2 > log_cap) {
        if (log_cap >= LOG_MAX)
            return;
        size_t cap = log_cap ? log_cap * 2 : 1 << 16;
        char *b = realloc(log_buf, cap);
        if (!b)
            return;
        log_buf = b;
        log_cap = cap;
    }
    memcpy(log_buf + log_len, line, len);
    log_len += len;
    log_buf[log_len++] = '\n';
}

static const char *cname(int c)
{
    static const char *const n[] = {
        "OK",     "EINVAL",       "EMISUSE",   "ECONNECT",  "EAUTH",           "ENODB",
        "ECONN",  "ESQL",         "ETIMEDOUT", "ECANCELED", "ECOMMIT_UNKNOWN", "ECLOSED",
        "ENOMEM", "EUNSUPPORTED", "EBUSY"};
    return c >= 0 && c < (int)(sizeof n / sizeof *n) ? n[c] : "?";
}

static const char *mask_str(unsigned m)
{
    static char buf[256];
    buf[0] = '\0';
    for (int c = 0; c < 16; c++)
        if (m & M(c)) {
            if (buf[0])
                strcat(buf, "|");
            strcat(buf, cname(c));
        }
    return buf[0] ? buf : "(none)";
}

/* Best effort from a dying process too: plain write(2). */
static void write_all(const char *s, size_t n)
{
    while (n > 0) {
        ssize_t w = write(2, s, n);
        if (w <= 0)
            return;
        s += w;
        n -= (size_t)w;
    }
}

static void dump_program(int number, uint64_t seed, const char *why, const char *log, size_t len)
{
    char head[1024];
    int n = snprintf(head, sizeof head,
                     "\n=== pgs_model: program %d FAILED: %s\n"
                     "=== seed: PGSCOPE_SEED=%" PRIu64 " (program seed 0x%016" PRIx64 ")\n"
                     "=== rerun it alone: PGSCOPE_SEED=%" PRIu64 " PGSCOPE_MODEL_FIRST=%d "
                     "PGSCOPE_MODEL_PROGRAMS=1 meson test model\n"
                     "=== operation log (%zu bytes): context, call or callback, result\n",
                     number, why, base_seed, seed, base_seed, number, len);
    write_all(head, n > 0 ? (size_t)n : 0);
    if (log)
        write_all(log, len);
}

static void dump_log(const char *why)
{
    if (P.dumped || !P.active)
        return;
    P.dumped = 1;
    dump_program(P.number, P.seed, why, log_buf, log_len);
    if (P.api) {
        char line[700];
        int n = snprintf(line, sizeof line, "%-7s %s ... (died inside %s)\n", P.ctx,
                         P.doing ? P.doing : "", P.api);
        write_all(line, n > 0 ? (size_t)n : 0);
    }
    write_all("=== end of the operation log\n", 29);
}

static void model_fail(const char *fmt, ...)
{
    char msg[900];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    mlog("FAIL: %s", msg);
    dump_log(msg);
    ck_abort_msg("model: program %d (PGSCOPE_SEED=%" PRIu64 "): %s", P.number, base_seed, msg);
}

#ifdef MODEL_SANITIZED
static void on_sanitizer_death(void)
{
    dump_log("the sanitizer stopped the process (its report is above)");
}
#else
static void on_fatal_signal(int sig)
{
    char why[64];
    snprintf(why, sizeof why, "fatal signal %d (a crash in the library or the test)", sig);
    dump_log(why);
    signal(sig, SIG_DFL);
    raise(sig);
}
#endif

/* ---- the model's records ---- */

static int new_cb(int kind)
{
    if (P.ncb >= MAXCB)
        model_fail("out of callback records (MAXCB)");
    int i = P.ncb++;
    mcb *k = &P.cb[i];
    memset(k, 0, sizeof *k);
    k->kind = kind;
    k->conn = k->tx = k->pool = k->req = k->run = -1;
    return i;
}

static int new_conn(int kind)
{
    int i = P.nc++;
    mconn *c = &P.c[i];
    memset(c, 0, sizeof *c);
    c->used = 1;
    c->kind = kind;
    c->pool = c->txroot = c->open_cb = c->close_cb = -1;
    return i;
}

static int new_tx(void)
{
    int i = P.nt++;
    mtx *t = &P.t[i];
    memset(t, 0, sizeof *t);
    t->used = 1;
    t->conn = t->parent = t->child = t->root = t->run = t->done_cb = t->begun_cb = -1;
    return i;
}

static int room(void)
{
    return P.nc < MAXC - 2 && P.nt < MAXT - 2 && P.nq < MAXQ - 1 && P.nr < MAXR - 1 &&
           P.ncb < MAXCB - 16;
}

/* ---- calls ---- */

static int rc_holder;
#define CALL(name, expr) (P.api = (name), rc_holder = (expr), P.api = NULL, rc_holder)
/* The same, with what the log will say about it (shown if the process dies inside the call). */
#define CALLW(what, name, expr)                                                                    \
    (P.doing = (what), P.api = (name), rc_holder = (expr), P.api = NULL, P.doing = NULL, rc_holder)

/* Coverage: how often each call returned each code, and how often each odd situation came
 * up (printed at the end, so a change that stops reaching a state shows). */
enum { MAXCOV = 96 };
static struct {
    const char *name;
    long n[16];
    long count;
} cov_table[MAXCOV];

static long *cov_slot(const char *name)
{
    for (int i = 0; i < MAXCOV; i++) {
        if (!cov_table[i].name)
            cov_table[i].name = name;
        if (strcmp(cov_table[i].name, name) == 0)
            return &cov_table[i].count;
    }
    static long overflow;
    return &overflow;
}

static void cov(const char *situation)
{
    (*cov_slot(situation))++;
}

static void cov_call(const char *what, int rc)
{
    static char names[MAXCOV][32];
    char name[32];
    size_t n = strcspn(what, " (");
    if (n >= sizeof name)
        n = sizeof name - 1;
    memcpy(name, what, n);
    name[n] = '\0';
    for (int i = 0; i < MAXCOV; i++) {
        if (!cov_table[i].name) {
            memcpy(names[i], name, n + 1);
            cov_table[i].name = names[i];
        }
        if (strcmp(cov_table[i].name, name) == 0) {
            cov_table[i].n[rc & 15]++;
            return;
        }
    }
}

static void cov_print(void)
{
    fprintf(stderr, "model: calls by returned code, and odd situations reached:\n");
    for (int i = 0; i < MAXCOV && cov_table[i].name; i++) {
        char line[400];
        int len = snprintf(line, sizeof line, "  %-44s", cov_table[i].name);
        for (int c = 0; c < 16; c++)
            if (cov_table[i].n[c] && len < (int)sizeof line)
                len += snprintf(line + len, sizeof line - (size_t)len, " %s %ld", cname(c),
                                cov_table[i].n[c]);
        if (cov_table[i].count && len < (int)sizeof line)
            snprintf(line + len, sizeof line - (size_t)len, " %ld", cov_table[i].count);
        fprintf(stderr, "%s\n", line);
    }
}

static void expect(const char *what, int rc, unsigned allowed)
{
    total_ops++;
    P.ops++;
    cov_call(what, rc);
    if (strncmp(P.ctx, "in#", 3) == 0)
        cov("(calls made inside a callback)");
    if (allowed == M(rc))
        mlog("%s -> %s", what, cname(rc));
    else
        mlog("%s -> %s (allowed %s)", what, cname(rc), mask_str(allowed));
    if (!(allowed & M(rc)))
        model_fail("%s returned %s; the model allows %s", what, cname(rc), mask_str(allowed));
}

static void cov_name(const char *op, const char *state)
{
    char buf[80];
    snprintf(buf, sizeof buf, "%s on %s", op, state);
    static char interned[96][80];
    static int ninterned;
    for (int i = 0; i < ninterned; i++)
        if (strcmp(interned[i], buf) == 0) {
            cov(interned[i]);
            return;
        }
    if (ninterned < 96) {
        memcpy(interned[ninterned], buf, sizeof buf);
        cov(interned[ninterned++]);
    }
}

static void cov_conn(const char *op, int closing, int dead, int owned, int exiting)
{
    char buf[80];
    static const char *const kinds[] = {"closing guard", "dead guard", "owned guard",
                                        "guard inside its close done"};
    int which = exiting ? 3 : closing ? 0 : dead ? 1 : owned ? 2 : -1;
    if (which < 0)
        return;
    snprintf(buf, sizeof buf, "%s on a %s", op, kinds[which]);
    /* the table keeps the pointer: intern the few names there are */
    static char interned[64][80];
    static int ninterned;
    for (int i = 0; i < ninterned; i++)
        if (strcmp(interned[i], buf) == 0) {
            cov(interned[i]);
            return;
        }
    if (ninterned < 64) {
        memcpy(interned[ninterned], buf, sizeof buf);
        cov(interned[ninterned++]);
    }
}

static void check_message(const pgs_error *e, const char *where)
{
    if (!e)
        return;
    if (memchr(e->message, '\0', sizeof e->message) == NULL)
        model_fail("%s: error message not terminated", where);
    if (memchr(e->sqlstate, '\0', sizeof e->sqlstate) == NULL)
        model_fail("%s: sqlstate not terminated", where);
    if (password[0] && strstr(e->message, password))
        model_fail("%s: the error message shows the password: %s", where, e->message);
}

/* ---- model helpers ---- */

/* 2: an open transaction guard owns the session; 1: one ended and may or may not have let go
 * (its end's reply is not observable); 0: free. */
static int owner_state(const mconn *c)
{
    if (c->txroot < 0)
        return 0;
    const mtx *t = &P.t[c->txroot];
    if (t->state == T_OPEN)
        return 2;
    if (t->state == T_ENDED && !t->finished)
        return 1;
    return 0;
}

static unsigned dead_set(const mconn *c, unsigned alive)
{
    if (c->dead == 2)
        return c->deadmask;
    if (c->dead == 1)
        return alive | c->deadmask;
    return alive;
}

/* What may reach every callback of this connection still pending: its close, its loss. */
static unsigned conn_events(const mconn *c)
{
    return (c->closing ? M(PGS_ECLOSED) : 0) | (c->dead ? c->deadmask : 0);
}

static void tree_event(int ci)
{
    mconn *c = &P.c[ci];
    if (c->txroot >= 0 && P.t[c->txroot].state != T_DONE)
        P.t[c->txroot].events = 1;
}

static void conflict_runs(int ci)
{
    for (int i = 0; i < P.nr; i++)
        if (P.r[i].used && P.r[i].pool < 0 && P.r[i].conn == ci && !P.cb[P.r[i].body_cb].fired &&
            !P.r[i].finished)
            P.r[i].conflict = 1;
}

/* Something happened to the connection: every callback still pending on it may now say so. */
static void conn_event(int ci, unsigned codes)
{
    if (tolerate_econn && (codes & (M(PGS_ECLOSED) | M(PGS_ECANCELED))))
        codes |= M(PGS_ECONN);
    for (int i = 0; i < P.ncb; i++) {
        mcb *k = &P.cb[i];
        if (k->expected && !k->fired && k->conn == ci &&
            (k->kind == K_OPEN || k->kind == K_QUERY || k->kind == K_TXQ || k->kind == K_BEGUN))
            k->allowed |= codes;
    }
    tree_event(ci);
    conflict_runs(ci);
}

static void learn_finished(mconn *c)
{
    if (c->txroot >= 0 && P.t[c->txroot].state == T_ENDED)
        P.t[c->txroot].finished = 1;
}

static unsigned pred_query(const mconn *c)
{
    if (c->closing || c->runs_pending > 0) /* a pending pgs_run_tx holds the session */
        return M(PGS_EMISUSE);
    int own = owner_state(c);
    if (own == 2)
        return M(PGS_EMISUSE) | (c->dead == 2 ? c->deadmask : 0); /* which first: open */
    unsigned m = dead_set(c, M(PGS_OK));
    if (own == 1)
        m |= M(PGS_EMISUSE);
    return m;
}

/* pgs_tx_begin and pgs_run_tx: the guard must be connected and idle. */
static unsigned pred_begin(const mconn *c)
{
    if (c->closing || c->dead == 2 || c->nq > 0 || owner_state(c) == 2 ||
        (c->bad && c->connecting) || c->runs_pending > 0) /* (a pending run holds the session) */
        return M(PGS_EMISUSE);
    /* Connected before on_open fired, a killer pending, the last transaction's end not seen. */
    if (c->connecting || c->dead == 1 || owner_state(c) == 1)
        return M(PGS_OK) | M(PGS_EMISUSE);
    return M(PGS_OK);
}

static unsigned pred_close(const mconn *c)
{
    return c->closing ? M(PGS_EMISUSE) : M(PGS_OK);
}

static unsigned pred_cancel(const mconn *c)
{
    if (c->closing || c->dead == 2)
        return M(PGS_EMISUSE);
    if (c->dead == 1)
        return M(PGS_OK) | M(PGS_EMISUSE);
    return M(PGS_OK);
}

/* pgs_tx_query and pgs_tx_savepoint. */
static unsigned pred_txq(const mtx *t)
{
    if (t->state != T_OPEN || t->child >= 0 || t->orphan)
        return M(PGS_EMISUSE);
    const mconn *c = &P.c[t->conn];
    if (c->exited)
        return M(PGS_ECLOSED);
    if (c->exiting) /* inside the close's done: the guard is closing, or gone */
        return M(PGS_ECLOSED) | M(PGS_EMISUSE);
    if (c->closing)
        return M(PGS_EMISUSE);
    return dead_set(c, M(PGS_OK));
}

static unsigned pred_end(const mtx *t)
{
    return t->state == T_OPEN && !t->orphan ? M(PGS_OK) : M(PGS_EMISUSE);
}

static unsigned pred_txcancel(const mtx *t)
{
    const mtx *r = &P.t[t->root];
    const mconn *c = &P.c[r->conn];
    if (r->cancelled || r->state == T_DONE || c->exited || c->exiting || c->closing || c->dead == 2)
        return M(PGS_EMISUSE);
    /* after the end (done is scheduled once the end's reply came), a timeout that may have
     * fired, a killer pending */
    if (r->state == T_ENDED || r->timeout || c->dead == 1)
        return M(PGS_OK) | M(PGS_EMISUSE);
    return M(PGS_OK);
}

static unsigned pred_acquire(const mpool *p)
{
    if (p->closing)
        return M(PGS_ECLOSED);
    if (p->o.max_waiting > 0) {
        pgs_pool_counts st;
        pgs_pool_stats(p->h, &st);
        if (st.waiting >= p->o.max_waiting)
            return st.idle == 0 ? M(PGS_EBUSY) : M(PGS_OK) | M(PGS_EBUSY);
    }
    return M(PGS_OK);
}

static void check_pool_counts(const mpool *p)
{
    if (!p->h || p->closing)
        return;
    pgs_pool_counts st;
    pgs_pool_stats(p->h, &st);
    int max = p->o.max_size ? p->o.max_size : 10;
    if (st.size > max || st.idle > st.size || st.in_use > st.size || st.idle < 0 || st.in_use < 0 ||
        st.waiting < 0)
        model_fail("pool counts out of bounds: size %d idle %d in use %d waiting %d (max %d)",
                   st.size, st.idle, st.in_use, st.waiting, max);
}

/* ---- statements ---- */

enum { S_ONE, S_PARAM, S_INSERT, S_SLEEP, S_DIV0, S_SUM, S_NULLSQL, S_BADN };

typedef struct stmt {
    int s, nparams;
    const char *sql;
    char p1[16], p2[16];
    const char *vals[2];
    char want[24];
} stmt;

static void pick_stmt(stmt *st, int allow_bad)
{
    static char insert_sql[128];
    snprintf(insert_sql, sizeof insert_sql, "INSERT INTO %s (v) VALUES ($1::int)", table);
    memset(st, 0, sizeof *st);
    unsigned w = rnd(100);
    int a = (int)rnd(2000) - 1000, b = (int)rnd(2000) - 1000;
    snprintf(st->p1, sizeof st->p1, "%d", a);
    snprintf(st->p2, sizeof st->p2, "%d", b);
    st->vals[0] = st->p1;
    st->vals[1] = st->p2;
    if (w < 20) {
        st->s = S_ONE;
        st->sql = "SELECT 1";
        strcpy(st->want, "1");
    } else if (w < 45) {
        st->s = S_PARAM;
        st->sql = "SELECT $1::int";
        st->nparams = 1;
        snprintf(st->want, sizeof st->want, "%d", a);
    } else if (w < 63) {
        st->s = S_INSERT;
        st->sql = insert_sql;
        st->nparams = 1;
    } else if (w < 70) {
        st->s = S_SLEEP;
        st->sql = "SELECT pg_sleep(0.05)";
    } else if (w < 75) {
        st->s = S_DIV0;
        st->sql = "SELECT 1/$1::int";
        st->nparams = 1;
        strcpy(st->p1, "0");
    } else if (w < 97 || !allow_bad) {
        st->s = S_SUM;
        st->sql = "SELECT $1::int + $2::int";
        st->nparams = 2;
        snprintf(st->want, sizeof st->want, "%d", a + b);
    } else if (w < 99) {
        st->s = S_NULLSQL;
        st->sql = NULL;
    } else {
        st->s = S_BADN;
        st->sql = "SELECT 1";
        st->nparams = -1;
    }
}

static const char *stmt_name(const stmt *st)
{
    static const char *const n[] = {"SELECT 1", "SELECT $1", "INSERT",   "pg_sleep",
                                    "1/0",      "$1+$2",     "NULL sql", "nparams -1"};
    return n[st->s];
}

static void check_result(mcb *k, pgs_conn *conn, const PGresult *res, const pgs_error *err)
{
    int code = err ? (int)err->code : PGS_OK;
    check_message(err, kind_names[k->kind]);
    if (!(k->allowed & M(code)))
        model_fail("callback #%d (%s) reported %s%s%s; the model allows %s", (int)(k - P.cb),
                   kind_names[k->kind], cname(code), err ? ": " : "", err ? err->message : "",
                   mask_str(k->allowed));
    if (!err) {
        if (!res)
            model_fail("callback #%d: success without a result", (int)(k - P.cb));
        ExecStatusType st = PQresultStatus(res);
        if (st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK)
            model_fail("callback #%d: success with result status %s", (int)(k - P.cb),
                       PQresStatus(st));
        if (k->want[0] && (st != PGRES_TUPLES_OK || PQntuples(res) != 1 ||
                           strcmp(PQgetvalue(res, 0, 0), k->want) != 0))
            model_fail("callback #%d: expected the value %s, got %s", (int)(k - P.cb), k->want,
                       st == PGRES_TUPLES_OK && PQntuples(res) ? PQgetvalue(res, 0, 0) : "none");
    } else if (err->code == PGS_ESQL) {
        if (!res || strlen(err->sqlstate) != 5)
            model_fail("callback #%d: PGS_ESQL without the server's result or SQLSTATE",
                       (int)(k - P.cb));
        if (k->kind == K_QUERY && k->stmt == S_DIV0 && strcmp(err->sqlstate, "22012") != 0)
            model_fail("callback #%d: 1/0 failed with SQLSTATE %s", (int)(k - P.cb), err->sqlstate);
    } else if ((err->code == PGS_ECONN || err->code == PGS_ECLOSED ||
                err->code == PGS_EUNSUPPORTED) &&
               res) {
        model_fail("callback #%d: %s with a result", (int)(k - P.cb), cname(err->code));
    }
    if (k->conn >= 0 && P.c[k->conn].kind == C_HIDDEN && !P.c[k->conn].h)
        P.c[k->conn].h = conn; /* a pool's guard the body got: first seen here */
    if (k->conn >= 0 && conn != P.c[k->conn].h)
        model_fail("callback #%d: called with another connection", (int)(k - P.cb));
}

/* ---- forward declarations ---- */

static void random_op(int fk, int fid);
static void turn_end(void);
static void op_txend(int ti, int forced);
static void op_close(int ci);
enum { F_NONE, F_CONN, F_TX, F_POOL, F_REQ };

static mcb *enter(void *arg, const char *name)
{
    mcb *k = arg;
    int id = (int)(k - P.cb);
    if (!P.active)
        model_fail("callback #%d (%s) fired outside its program", id, name);
    if (P.api)
        model_fail("callback #%d (%s) fired inside %s", id, name, P.api);
    if (k->kind == K_STRAY || !k->expected)
        model_fail("callback #%d (%s) fired although its call was refused", id, name);
    if (k->fired)
        model_fail("callback #%d (%s) fired twice", id, name);
    k->fired = 1;
    k->seq = ++P.fire_seq;
    total_callbacks++;
    snprintf(P.ctx, sizeof P.ctx, "in#%d", id);
    return k;
}

static void leave(void)
{
    turn_end();
    snprintf(P.ctx, sizeof P.ctx, "L%d", P.steps);
}

/* From inside a callback: now and then the next random calls, mostly on its own handles. */
static void cb_ops(int fk, int fid)
{
    if (P.cleanup || P.quiet || P.ops >= P.hard_budget || !chance(50))
        return;
    int n = 1 + (int)rnd(2);
    for (int i = 0; i < n && room(); i++)
        random_op(fk, fid);
}

/* Every callback of these kinds bound to the connection (or transaction tree) has fired. */
static void check_all_fired(const char *who, int conn, int root)
{
    for (int i = 0; i < P.ncb; i++) {
        mcb *k = &P.cb[i];
        if (!k->expected || k->fired)
            continue;
        if (conn >= 0 && k->conn == conn &&
            (k->kind == K_OPEN || k->kind == K_QUERY || k->kind == K_TXQ || k->kind == K_BEGUN))
            model_fail("%s fired before callback #%d (%s)", who, i, kind_names[k->kind]);
        if (root >= 0 && k->tx >= 0 && P.t[k->tx].root == root &&
            (k->kind == K_TXQ || k->kind == K_BEGUN || (k->kind == K_TXDONE && k->tx != root)))
            model_fail("%s fired before callback #%d (%s of tx%d)", who, i, kind_names[k->kind],
                       k->tx);
    }
}

/* ---- callbacks ---- */

static void on_lost(pgs_conn *conn, const pgs_error *err, void *arg)
{
    (void)conn;
    (void)arg;
    model_fail("on_lost fired although no connection was lost (%s)", err ? err->message : "");
}

static void on_open(pgs_conn *conn, const pgs_error *err, void *arg)
{
    mcb *k = enter(arg, "on_open");
    mconn *c = &P.c[k->conn];
    int code = err ? (int)err->code : PGS_OK;
    mlog("fire #%d on_open c%d: %s%s%s", (int)(k - P.cb), k->conn, cname(code), err ? " " : "",
         err ? err->message : "");
    check_message(err, "on_open");
    if (conn != c->h)
        model_fail("on_open with another handle");
    if (!(k->allowed & M(code)))
        model_fail("on_open of c%d reported %s; the model allows %s", k->conn, cname(code),
                   mask_str(k->allowed));
    c->connecting = 0;
    if (!err) {
        if (!pgs_conn_pgconn(conn) || PQstatus(pgs_conn_pgconn(conn)) != CONNECTION_OK)
            model_fail("on_open said up, but there is no live libpq connection");
        if (c->bad)
            model_fail("a bad conninfo connected");
    } else if (!c->closing && (code == PGS_ENODB || code == PGS_EINVAL)) {
        c->dead = 2;
        c->deadmask = M(code);
    }
    cb_ops(F_CONN, k->conn);
    leave();
}

static void on_result(pgs_conn *conn, const PGresult *res, const pgs_error *err, void *arg)
{
    mcb *k = enter(arg, kind_names[((mcb *)arg)->kind]);
    int code = err ? (int)err->code : PGS_OK;
    char where[32];
    snprintf(where, sizeof where, k->tx >= 0 ? "tx%d" : "c%d", k->tx >= 0 ? k->tx : k->conn);
    mlog("fire #%d %s %s: %s%s%s", (int)(k - P.cb), kind_names[k->kind], where, cname(code),
         err ? " " : "", err ? err->sqlstate : "");
    check_result(k, conn, res, err);
    mconn *c = &P.c[k->conn];
    if (k->kind == K_QUERY) {
        c->nq--;
        PGTransactionStatusType s = pgs_conn_txstatus(conn);
        if (s == PQTRANS_INTRANS || s == PQTRANS_INERROR)
            model_fail("pgs_conn_txstatus says %d in a plain statement's callback", (int)s);
        if ((code == PGS_ECANCELED || code == PGS_ECONN || code == PGS_ETIMEDOUT) && c->dead != 2 &&
            !c->closing) {
            c->dead = 2; /* only a dead guard fails a statement so */
            c->deadmask = M(code);
        }
    } else {
        mtx *t = &P.t[k->tx];
        if (t->begun_cb >= 0 && P.cb[t->begun_cb].expected && !P.cb[t->begun_cb].fired)
            model_fail("a statement of tx%d answered before its on_begun", k->tx);
        if (code == PGS_ESQL || code == PGS_ETIMEDOUT)
            P.t[t->root].failure_seen = 1;
        PGTransactionStatusType s = pgs_conn_txstatus(conn);
        if (s != PQTRANS_INTRANS && s != PQTRANS_INERROR && s != PQTRANS_UNKNOWN)
            model_fail("pgs_conn_txstatus says %d in a transaction's statement callback", (int)s);
    }
    cb_ops(k->kind == K_QUERY ? F_CONN : F_TX, k->kind == K_QUERY ? k->conn : k->tx);
    leave();
}

static void on_begun(pgs_tx *tx, const pgs_error *err, void *arg)
{
    mcb *k = enter(arg, "on_begun");
    int code = err ? (int)err->code : PGS_OK;
    mlog("fire #%d on_begun tx%d: %s", (int)(k - P.cb), k->tx, cname(code));
    if (code == PGS_ESQL || code == PGS_ETIMEDOUT)
        P.t[P.t[k->tx].root].failure_seen = 1;
    check_message(err, "on_begun");
    if (tx != P.t[k->tx].h)
        model_fail("on_begun with another handle");
    if (!(k->allowed & M(code)))
        model_fail("on_begun of tx%d reported %s; the model allows %s", k->tx, cname(code),
                   mask_str(k->allowed));
    cb_ops(F_TX, k->tx);
    leave();
}

static const unsigned done_codes = M(PGS_ESQL) | M(PGS_ETIMEDOUT) | M(PGS_ECANCELED) |
                                   M(PGS_ECONN) | M(PGS_ECLOSED) | M(PGS_EMISUSE) |
                                   M(PGS_ECOMMIT_UNKNOWN);

/* What an end reports, as far as the model knows the transaction's life. */
static void check_outcome(int ti, const pgs_tx_result *r, int attempts)
{
    mtx *t = &P.t[ti];
    mtx *root = &P.t[t->root];
    if (!r)
        model_fail("tx%d: done without a result", ti);
    check_message(r->err, "tx done");
    if (r->attempts != attempts)
        model_fail("tx%d: attempts %d, expected %d", ti, r->attempts, attempts);
    if (r->outcome != PGS_TX_COMMITTED && r->outcome != PGS_TX_ROLLED_BACK &&
        r->outcome != PGS_TX_UNKNOWN)
        model_fail("tx%d: outcome %d", ti, (int)r->outcome);
    if (r->err && !(done_codes & M(r->err->code)))
        model_fail("tx%d: the end reports %s, not a documented code", ti, cname(r->err->code));
    if ((r->outcome == PGS_TX_UNKNOWN) != (r->err && r->err->code == PGS_ECOMMIT_UNKNOWN))
        model_fail("tx%d: outcome %d with %s", ti, (int)r->outcome,
                   r->err ? cname(r->err->code) : "no error");
    if (!r->err && r->outcome != (t->ok ? PGS_TX_COMMITTED : PGS_TX_ROLLED_BACK))
        model_fail("tx%d: no error, but outcome %d after an end with ok=%d", ti, (int)r->outcome,
                   t->ok);
    if (t->ended_with_child && (r->outcome != PGS_TX_ROLLED_BACK || !r->err))
        model_fail("tx%d ended with a child open: outcome %d, %s", ti, (int)r->outcome,
                   r->err ? cname(r->err->code) : "no error");
    if (t->ended_with_child && !root->may_fail && !root->events && r->err->code != PGS_EMISUSE)
        model_fail("tx%d ended with a child open reports %s, not PGS_EMISUSE", ti,
                   cname(r->err->code));
    if (!root->may_fail && !root->events && !root->misuse) {
        /* nothing could go wrong: it did what its end asked */
        if (r->err || r->outcome != (t->ok ? PGS_TX_COMMITTED : PGS_TX_ROLLED_BACK))
            model_fail("tx%d: nothing failed, yet outcome %d with %s (ok=%d)", ti, (int)r->outcome,
                       r->err ? r->err->message : "no error", t->ok);
    }
    if (r->outcome == PGS_TX_UNKNOWN && !root->events)
        model_fail("tx%d: outcome unknown although its connection was never touched", ti);
}

/* A root transaction is over: its connection is free again (or gone, after a cancel). */
static void root_over(int ti)
{
    mtx *t = &P.t[ti];
    mconn *c = &P.c[t->conn];
    t->state = T_DONE;
    t->finished = 1;
    if (t->cancelled && !c->closing && c->dead != 2) {
        c->dead = 2; /* the cancel closed it at the end at the latest */
    }
}

static void invalidate_orphans(int ti)
{
    for (int i = 0; i < P.nt; i++)
        if (P.t[i].used && P.t[i].orphan && P.t[i].root == P.t[ti].root && P.t[i].valid) {
            int a = P.t[i].parent, under = 0;
            for (; a >= 0; a = P.t[a].parent)
                under |= a == ti;
            if (under)
                P.t[i].valid = 0;
        }
}

static void on_tx_done(const pgs_tx_result *r, void *arg)
{
    mcb *k = enter(arg, "tx done");
    int ti = k->tx;
    mtx *t = &P.t[ti];
    mlog("fire #%d tx done tx%d: outcome %d %s%s%s", (int)(k - P.cb), ti, r ? (int)r->outcome : -1,
         r && r->err ? cname(r->err->code) : "OK", r && r->err ? " " : "",
         r && r->err ? r->err->sqlstate : "");
    if (t->state != T_ENDED)
        model_fail("done of tx%d fired, but it was never ended", ti);
    /* its own statements, its children's: all before */
    for (int i = 0; i < P.ncb; i++) {
        mcb *o = &P.cb[i];
        if (!o->expected || o->fired || o->tx < 0 || o == k)
            continue;
        int under = 0;
        for (int a = o->tx; a >= 0; a = P.t[a].parent)
            under |= a == ti;
        if (under && (o->kind == K_TXQ || o->kind == K_BEGUN || o->kind == K_TXDONE))
            model_fail("done of tx%d fired before callback #%d (%s of tx%d)", ti, i,
                       kind_names[o->kind], o->tx);
    }
    check_outcome(ti, r, 1);
    t->state = T_DONE;
    if (t->parent < 0)
        root_over(ti);
    /* The handle stays valid until done returns: calls on it now are refused. */
    cb_ops(F_TX, ti);
    t->valid = 0;
    invalidate_orphans(ti);
    leave();
}

/* The pool counts in use at most what the model knows is lent or about to be. */
static void check_in_use(int pi, const char *where)
{
    if (!P.p[pi].valid || P.p[pi].exiting)
        return;
    pgs_pool_counts st;
    pgs_pool_stats(P.p[pi].h, &st);
    int lent = 0;
    for (int i = 0; i < P.nc; i++)
        lent += P.c[i].used && P.c[i].pool == pi && !P.c[i].exited &&
                (P.c[i].kind == C_POOLED || P.c[i].kind == C_HIDDEN);
    for (int i = 0; i < P.nq; i++)
        lent += P.q[i].used && P.q[i].pool == pi && !P.cb[P.q[i].cb].fired;
    for (int i = 0; i < P.nr; i++)
        lent += P.r[i].used && P.r[i].pool == pi && !P.r[i].finished && !P.cb[P.r[i].body_cb].fired;
    if (st.in_use > lent)
        model_fail("in %s the pool p%d counts %d guards in use, at most %d are", where, pi,
                   st.in_use, lent);
}

static void on_close_done(void *arg)
{
    mcb *k = enter(arg, "close done");
    int ci = k->conn;
    mconn *c = &P.c[ci];
    mlog("fire #%d close done c%d", (int)(k - P.cb), ci);
    check_all_fired("a close's done", ci, -1);
    if (c->kind == C_POOLED) {
        c->exited = 1; /* for the count: the guard is back (or gone) when done fires */
        check_in_use(c->pool, "a release's done");
        c->exited = 0;
    }
    c->exiting = 1;
    if (!avoid_closedone && !P.cleanup && chance(40))
        random_op(F_CONN, ci); /* valid until done returns: every call is refused */
    c->exiting = 0;
    c->exited = 1;
    c->valid = 0;
    if (c->txroot >= 0)
        tree_event(ci);
    leave();
}

static void start_body(mrun *r, pgs_tx *tx);
static void run_body(pgs_tx *tx, void *arg);

/* The body's argument is the done's record (one `arg` for both): find the run. */
static void run_body_tx(pgs_tx *tx, void *arg)
{
    mcb *done = arg;
    run_body(tx, &P.cb[P.r[done->run].body_cb]);
}

static void run_body(pgs_tx *tx, void *arg)
{
    mcb *k = enter(arg, "body");
    mrun *r = &P.r[k->run];
    mlog("fire #%d body of run%d", (int)(k - P.cb), k->run);
    if (!tx)
        model_fail("a body without a transaction");
    start_body(r, tx);
    leave();
}

static void on_run_done(const pgs_tx_result *res, void *arg)
{
    mcb *k = enter(arg, "run done");
    int ri = k->run;
    mrun *r = &P.r[ri];
    int body = P.cb[r->body_cb].fired;
    mlog("fire #%d run done run%d: outcome %d %s attempts %d", (int)(k - P.cb), ri,
         res ? (int)res->outcome : -1, res && res->err ? cname(res->err->code) : "OK",
         res ? res->attempts : -1);
    if (!res)
        model_fail("run%d: done without a result", ri);
    if (!body) {
        if (res->attempts != 0 || res->outcome != PGS_TX_ROLLED_BACK || !res->err)
            model_fail("run%d: the body never ran, yet attempts %d outcome %d %s", ri,
                       res->attempts, (int)res->outcome, res->err ? "" : "without an error");
        check_message(res->err, "run done");
        unsigned ok;
        if (r->pool < 0) {
            if (!r->conflict)
                model_fail("pgs_run_tx on a free guard never ran its body (%s: %s)",
                           cname(res->err->code), res->err->message);
            ok = M(PGS_EMISUSE) | M(PGS_ECLOSED);
            if (P.c[r->conn].exited)
                model_fail("run%d: its done came after its guard's close done: the attempt "
                           "used a freed guard",
                           ri);
            P.c[r->conn].runs_pending--;
        } else {
            ok = M(PGS_ETIMEDOUT) | (P.p[r->pool].closing ? M(PGS_ECLOSED) : 0);
        }
        cov(r->pool < 0 ? "pgs_run_tx whose body never ran" : "pgs_pool_run_tx with no guard");
        if (!(ok & M(res->err->code)))
            model_fail("run%d without a body reports %s; the model allows %s", ri,
                       cname(res->err->code), mask_str(ok));
    } else {
        int ti = r->tx;
        mtx *t = &P.t[ti];
        if (t->state == T_OPEN)
            model_fail("run%d: done before the body ended its transaction", ri);
        for (int i = 0; i < P.ncb; i++) {
            mcb *o = &P.cb[i];
            if (o->expected && !o->fired && o->tx >= 0 && P.t[o->tx].root == ti &&
                (o->kind == K_TXQ || o->kind == K_BEGUN || o->kind == K_TXDONE))
                model_fail("done of run%d fired before callback #%d (%s)", ri, i,
                           kind_names[o->kind]);
        }
        check_outcome(ti, res, 1);
        root_over(ti);
        t->valid = 0;
        invalidate_orphans(ti);
        if (r->pool >= 0) {
            mconn *c = &P.c[r->conn];
            c->exited = 1;
            /* done comes after the guard is back: the pool counts it no more */
            check_in_use(r->pool, "a pool run's done");
        }
    }
    r->finished = 1;
    if (r->pool < 0 && !P.c[r->conn].exited && P.c[r->conn].valid)
        cb_ops(F_CONN, r->conn);
    else if (r->pool >= 0 && P.p[r->pool].valid)
        cb_ops(F_POOL, r->pool);
    leave();
}

static void on_acquired(pgs_conn *conn, const pgs_error *err, void *arg)
{
    mcb *k = enter(arg, "acquire");
    int qi = k->req;
    mreq *q = &P.q[qi];
    int code = err ? (int)err->code : PGS_OK;
    q->firing = 1;
    check_message(err, "acquire");
    if (!(k->allowed & M(code)))
        model_fail("acquire q%d reported %s%s%s; the model allows %s", qi, cname(code),
                   err ? ": " : "", err ? err->message : "", mask_str(k->allowed));
    int ci = -1;
    if (!err) {
        if (!conn)
            model_fail("acquire q%d: no error and no guard", qi);
        PGconn *pg = pgs_conn_pgconn(conn);
        if (!pg || PQstatus(pg) != CONNECTION_OK)
            model_fail("acquire q%d handed out a guard that is not connected", qi);
        for (int i = 0; i < P.nc; i++)
            if (P.c[i].used && P.c[i].h == conn && !P.c[i].exited &&
                (P.c[i].kind == C_POOLED || P.c[i].kind == C_HIDDEN))
                model_fail("acquire q%d handed out c%d's guard, still lent", qi, i);
        ci = new_conn(C_POOLED);
        P.c[ci].h = conn;
        P.c[ci].pool = q->pool;
        P.c[ci].valid = 1;
    } else if (conn) {
        model_fail("acquire q%d: an error and a guard", qi);
    }
    mlog("fire #%d acquire q%d: %s%s%d", (int)(k - P.cb), qi, cname(code), ci >= 0 ? " -> c" : "",
         ci);
    if (P.cleanup) {
        if (ci >= 0)
            op_close(ci);
    } else if (chance(15)) {
        random_op(F_REQ, qi); /* its callback runs: too late to cancel */
    } else if (ci >= 0) {
        cb_ops(F_CONN, ci);
    } else {
        cb_ops(F_POOL, q->pool);
    }
    q->firing = 0;
    q->valid = 0;
    leave();
}

static void on_pool_done(void *arg)
{
    mcb *k = enter(arg, "pool done");
    int pi = k->pool;
    mpool *p = &P.p[pi];
    mlog("fire #%d pool done p%d", (int)(k - P.cb), pi);
    for (int i = 0; i < P.nq; i++)
        if (P.q[i].used && P.q[i].pool == pi && !P.cb[P.q[i].cb].fired)
            model_fail("pool done of p%d before the callback of acquire q%d", pi, i);
    for (int i = 0; i < P.nc; i++)
        if (P.c[i].used && P.c[i].pool == pi && !P.c[i].exited && P.c[i].kind == C_POOLED)
            model_fail("pool done of p%d while c%d is still lent", pi, i);
    for (int i = 0; i < P.nr; i++)
        if (P.r[i].used && P.r[i].pool == pi && !P.r[i].finished)
            model_fail("pool done of p%d before the done of run%d", pi, i);
    p->exiting = 1;
    if (!avoid_pooldone && !P.cleanup && chance(50))
        random_op(F_POOL, pi); /* valid until done returns */
    p->exiting = 0;
    p->valid = 0;
    leave();
}

static void on_pool_connect(pgs_conn *conn, void *arg)
{
    (void)arg;
    if (P.api)
        model_fail("on_connect fired inside %s", P.api);
    if (!conn || !pgs_conn_pgconn(conn))
        model_fail("on_connect without a live guard");
}

static void on_pool_release(pgs_conn *conn, void *arg)
{
    (void)arg;
    if (P.api)
        model_fail("on_release fired inside %s", P.api);
    for (int i = 0; i < P.nc; i++)
        if (P.c[i].used && P.c[i].h == conn && !P.c[i].exited && P.c[i].kind == C_POOLED &&
            P.c[i].closing)
            return;
    /* a pool run's guard (which one is not known unless a callback showed it) */
    for (int i = 0; i < P.nc; i++)
        if (P.c[i].used && P.c[i].kind == C_HIDDEN && !P.c[i].exited &&
            (!P.c[i].h || P.c[i].h == conn))
            return;
    model_fail("on_release for a guard nobody released");
}

static void on_guard(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    P.guard_fired = 1;
}

/* ---- operations ---- */

static void random_tx_opts(pgs_tx_opts *o, int allow_bad)
{
    memset(o, 0, sizeof *o);
    o->isolation = (pgs_isolation)rnd(4);
    o->read_only = chance(10);
    o->deferrable = o->isolation == PGS_ISO_SERIALIZABLE && o->read_only && chance(30);
    o->statement_timeout_ms = chance(8) ? 25 : 0;
    o->timeout_ms = chance(6) ? 30 + (int)rnd(250) : 0;
    o->begin_alone = chance(15);
    o->resolvable = chance(20);
    if (allow_bad && chance(3))
        o->isolation = (pgs_isolation)42;
}

static const char *opts_str(const pgs_tx_opts *o)
{
    static char buf[96];
    snprintf(buf, sizeof buf, "iso%d%s%s%s%s%s%s", (int)o->isolation, o->read_only ? " ro" : "",
             o->deferrable ? " deferrable" : "", o->statement_timeout_ms ? " stmt_timeout" : "",
             o->timeout_ms ? " timeout" : "", o->begin_alone ? " begin_alone" : "",
             o->resolvable ? " resolvable" : "");
    return buf;
}

static int opts_valid(const pgs_tx_opts *o)
{
    return o->isolation >= PGS_ISO_DEFAULT && o->isolation <= PGS_ISO_SERIALIZABLE;
}

static int new_root(int ci, const pgs_tx_opts *o, pgs_tx *h)
{
    int ti = new_tx();
    mtx *t = &P.t[ti];
    mconn *c = &P.c[ci];
    t->h = h;
    t->conn = ci;
    t->root = ti;
    t->state = T_OPEN;
    t->valid = 1;
    t->timeout = o->timeout_ms > 0;
    t->stmt_timeout = o->statement_timeout_ms > 0;
    t->read_only = o->read_only;
    t->deferrable = o->deferrable;
    t->may_fail = t->stmt_timeout; /* a loaded server may time out any statement */
    learn_finished(c);
    c->txroot = ti;
    if (t->timeout) {
        if (c->dead == 0)
            c->dead = 1;
        c->deadmask |= M(PGS_ETIMEDOUT) | M(PGS_ECONN);
        conn_event(ci, M(PGS_ETIMEDOUT) | M(PGS_ECONN));
        t->events = 1;
    }
    if (c->dead || c->closing)
        t->events = 1;
    return ti;
}

static void cov_tx(const char *op, const mtx *t)
{
    const mtx *r = &P.t[t->root];
    const mconn *c = &P.c[t->conn];
    if (t->orphan)
        cov_name(op, "an orphaned savepoint");
    else if (t->state == T_DONE)
        cov_name(op, "a transaction inside its own done");
    else if (t->state == T_ENDED)
        cov_name(op, "an ended transaction");
    else if (t->child >= 0)
        cov_name(op, "a transaction with a child open");
    else if (r->state == T_ENDED)
        cov_name(op, "a savepoint whose root is ending");
    if (c->exited || c->exiting)
        cov_name(op, "a transaction whose guard is closed");
    else if (c->closing)
        cov_name(op, "a transaction whose guard is closing");
    else if (c->dead == 2)
        cov_name(op, "a transaction whose guard is gone");
    if (r->cancelled)
        cov_name(op, "a cancelled transaction");
    if (r->run >= 0)
        cov_name(op, "a body's transaction");
}

static void op_open(void)
{
    int ci = new_conn(C_PLAIN);
    mconn *c = &P.c[ci];
    char extra[256];
    const char *conninfo;
    unsigned v = rnd(100);
    if (v < 2) {
        conninfo = "host=127.0.0.1 dbname='unterminated";
        c->bad = M(PGS_EINVAL);
    } else if (v < 5) {
        snprintf(extra, sizeof extra, "dbname=pgs_model_no_such_db application_name=%s_%d",
                 app_prefix, P.number);
        conninfo = th_conninfo(extra);
        c->bad = M(PGS_ENODB);
    } else {
        snprintf(extra, sizeof extra, "application_name=%s_%d", app_prefix, P.number);
        conninfo = th_conninfo(extra);
    }
    pgs_conn_opts o = {0};
    static const int caches[] = {0, 0, -1, 1};
    o.statement_cache = caches[rnd(4)];
    if (chance(50)) {
        o.on_lost = on_lost;
        o.lost_arg = c;
    }
    int k = new_cb(K_OPEN);
    P.cb[k].conn = ci;
    P.cb[k].allowed = c->bad ? c->bad : M(PGS_OK);
    c->open_cb = k;
    char what[96];
    snprintf(what, sizeof what, "open c%d #%d%s cache %d", ci, k,
             c->bad == M(PGS_EINVAL) ? " bad syntax"
             : c->bad                ? " no such db"
                                     : "",
             o.statement_cache);
    int rc =
        CALLW(what, "pgs_conn_open", pgs_conn_open(P.base, conninfo, &o, on_open, &P.cb[k], &c->h));
    expect(what, rc, M(PGS_OK));
    if (!c->h)
        model_fail("pgs_conn_open returned PGS_OK without a handle");
    P.cb[k].expected = 1;
    c->valid = 1;
    c->connecting = 1;
    if (c->bad) {
        c->dead = 1;
        c->deadmask = c->bad;
    }
    P.plain_opened++;
}

static void op_query(int ci)
{
    mconn *c = &P.c[ci];
    stmt st;
    pick_stmt(&st, 1);
    int bad = st.s == S_NULLSQL || st.s == S_BADN;
    unsigned allowed = pred_query(c);
    if (bad) /* which check comes first is not said: the argument's, or the state's */
        allowed = M(PGS_EINVAL) | (allowed & ~M(PGS_OK));
    int k = new_cb(bad ? K_STRAY : K_QUERY);
    mcb *cb = &P.cb[k];
    cb->conn = ci;
    cb->stmt = st.s;
    memcpy(cb->want, st.want, sizeof cb->want);
    cb->allowed = (st.s == S_DIV0 ? M(PGS_ESQL) : M(PGS_OK)) | conn_events(c);
    char what[96];
    snprintf(what, sizeof what, "query c%d #%d %s", ci, k, stmt_name(&st));
    cov_conn("query", c->closing, c->dead == 2, owner_state(c) == 2, c->exiting);
    int rc =
        CALLW(what, "pgs_query",
              pgs_query(c->h, st.sql, st.nparams, st.nparams > 0 ? st.vals : NULL, on_result, cb));
    expect(what, rc, allowed);
    if (rc == PGS_OK) {
        cb->expected = 1;
        c->nq++;
        conflict_runs(ci);
        if (owner_state(c) == 1)
            learn_finished(c);
    } else if (!bad && (c->deadmask & M(rc)) && c->dead == 1 && owner_state(c) != 2) {
        c->dead = 2;
        c->deadmask = M(rc);
    }
}

static void op_close(int ci)
{
    mconn *c = &P.c[ci];
    unsigned allowed = pred_close(c);
    int k = new_cb(K_CLOSE);
    P.cb[k].conn = ci;
    char what[64];
    snprintf(what, sizeof what, "%s c%d #%d", c->kind == C_POOLED ? "release" : "close", ci, k);
    cov_conn("close", c->closing, c->dead == 2, owner_state(c) == 2, c->exiting);
    int rc = CALLW(what, "pgs_conn_close", pgs_conn_close(c->h, on_close_done, &P.cb[k]));
    expect(what, rc, allowed);
    if (rc == PGS_OK) {
        P.cb[k].expected = 1;
        c->closing = 1;
        c->close_cb = k;
        conn_event(ci, M(PGS_ECLOSED));
    }
}

static void op_cancel(int ci)
{
    mconn *c = &P.c[ci];
    unsigned allowed = pred_cancel(c);
    char what[64];
    snprintf(what, sizeof what, "cancel c%d", ci);
    cov_conn("cancel", c->closing, c->dead == 2, owner_state(c) == 2, c->exiting);
    int rc = CALLW(what, "pgs_conn_cancel", pgs_conn_cancel(c->h));
    expect(what, rc, allowed);
    if (rc == PGS_OK) {
        c->dead = 2;
        c->deadmask = M(PGS_ECANCELED);
        conn_event(ci, M(PGS_ECANCELED));
    } else if (c->dead == 1) {
        c->dead = 2;
    }
}

static void op_txbegin(int ci)
{
    mconn *c = &P.c[ci];
    pgs_tx_opts o;
    random_tx_opts(&o, 1);
    unsigned allowed = opts_valid(&o) ? pred_begin(c) : M(PGS_EINVAL);
    int kb = chance(40) ? new_cb(K_BEGUN) : -1;
    pgs_tx *h = NULL;
    char what[128];
    snprintf(what, sizeof what, "tx_begin c%d tx%d %s%s", ci, P.nt, opts_str(&o),
             kb >= 0 ? " on_begun" : "");
    cov_conn("tx_begin", c->closing, c->dead == 2, owner_state(c) == 2, c->exiting);
    if (c->connecting)
        cov("tx_begin on a guard still connecting");
    int rc =
        CALLW(what, "pgs_tx_begin",
              pgs_tx_begin(c->h, &o, kb >= 0 ? on_begun : NULL, kb >= 0 ? &P.cb[kb] : NULL, &h));
    expect(what, rc, allowed);
    if (rc != PGS_OK) {
        if (kb >= 0)
            P.cb[kb].kind = K_STRAY;
        if (h)
            model_fail("pgs_tx_begin failed but set *out");
        return;
    }
    if (!h)
        model_fail("pgs_tx_begin returned PGS_OK without a handle");
    conflict_runs(ci);
    int ti = new_root(ci, &o, h);
    if (kb >= 0) {
        P.cb[kb].expected = 1;
        P.cb[kb].tx = ti;
        P.cb[kb].conn = ci;
        P.cb[kb].allowed = M(PGS_OK) | conn_events(c);
        P.t[ti].begun_cb = kb;
    }
}

static unsigned stmt_natural(const mtx *root, const stmt *st)
{
    unsigned nat = M(PGS_OK);
    if (st->s == S_DIV0 || (st->s == S_INSERT && root->read_only))
        nat = M(PGS_ESQL);
    if (root->may_fail)
        nat |= M(PGS_ESQL) | M(PGS_ETIMEDOUT);
    return nat;
}

static void op_txquery(int ti)
{
    mtx *t = &P.t[ti];
    mtx *root = &P.t[t->root];
    if (avoid_aborted && root->failure_seen && t->state == T_OPEN)
        return;
    mconn *c = &P.c[t->conn];
    stmt st;
    pick_stmt(&st, 1);
    int bad = st.s == S_NULLSQL || st.s == S_BADN;
    unsigned allowed = bad ? M(PGS_EINVAL) : pred_txq(t);
    int k = new_cb(bad ? K_STRAY : K_TXQ);
    mcb *cb = &P.cb[k];
    cb->conn = t->conn;
    cb->tx = ti;
    cb->stmt = st.s;
    memcpy(cb->want, st.want, sizeof cb->want);
    cb->allowed = stmt_natural(root, &st) | conn_events(c) |
                  (root->cancelled ? M(PGS_ECANCELED) | M(PGS_ECONN) : 0);
    char what[96];
    snprintf(what, sizeof what, "tx_query tx%d #%d %s", ti, k, stmt_name(&st));
    cov_tx("tx_query", t);
    int rc = CALLW(
        what, "pgs_tx_query",
        pgs_tx_query(t->h, st.sql, st.nparams, st.nparams > 0 ? st.vals : NULL, on_result, cb));
    expect(what, rc, allowed);
    if (rc == PGS_OK) {
        cb->expected = 1;
        if (st.s == S_DIV0 || (st.s == S_INSERT && root->read_only))
            root->may_fail = 1;
    } else if (!bad && rc != PGS_EMISUSE && rc != PGS_ECLOSED && c->dead == 1) {
        c->dead = 2;
        c->deadmask = M(rc);
    }
}

static void op_savepoint(int ti)
{
    mtx *t = &P.t[ti];
    mtx *root = &P.t[t->root];
    if (avoid_aborted && root->failure_seen && t->state == T_OPEN)
        return;
    mconn *c = &P.c[t->conn];
    int nullout = chance(2);
    unsigned allowed = nullout ? M(PGS_EINVAL) : pred_txq(t);
    int kb = chance(40) ? new_cb(K_BEGUN) : -1;
    pgs_tx *h = NULL;
    char what[96];
    snprintf(what, sizeof what, "savepoint tx%d -> tx%d%s%s", ti, P.nt, kb >= 0 ? " on_begun" : "",
             nullout ? " out=NULL" : "");
    cov_tx("savepoint", t);
    int rc = CALLW(what, "pgs_tx_savepoint",
                   pgs_tx_savepoint(t->h, kb >= 0 ? on_begun : NULL, kb >= 0 ? &P.cb[kb] : NULL,
                                    nullout ? NULL : &h));
    expect(what, rc, allowed);
    if (rc != PGS_OK) {
        if (kb >= 0)
            P.cb[kb].kind = K_STRAY;
        if (h)
            model_fail("pgs_tx_savepoint failed but set *out");
        if (!nullout && rc != PGS_EMISUSE && rc != PGS_ECLOSED && c->dead == 1) {
            c->dead = 2;
            c->deadmask = M(rc);
        }
        return;
    }
    if (!h)
        model_fail("pgs_tx_savepoint returned PGS_OK without a handle");
    int ci = new_tx();
    mtx *ch = &P.t[ci];
    t = &P.t[ti];
    ch->h = h;
    ch->conn = t->conn;
    ch->parent = ti;
    ch->root = t->root;
    ch->state = T_OPEN;
    ch->valid = 1;
    t->child = ci;
    if (kb >= 0) {
        P.cb[kb].expected = 1;
        P.cb[kb].tx = ci;
        P.cb[kb].conn = t->conn;
        /* SAVEPOINT in an aborted transaction fails */
        P.cb[kb].allowed = M(PGS_OK) | (root->may_fail ? M(PGS_ESQL) | M(PGS_ETIMEDOUT) : 0) |
                           conn_events(c) | (root->cancelled ? M(PGS_ECANCELED) | M(PGS_ECONN) : 0);
        ch->begun_cb = kb;
    }
}

static void op_txend(int ti, int forced)
{
    mtx *t = &P.t[ti];
    mtx *root = &P.t[t->root];
    int body = t->run >= 0; /* a body's own transaction */
    int ok = chance(70);
    /* a body ends with pgs_tx_end(tx, ok, NULL, NULL); others mostly with a done */
    int kd = !body && chance(88) ? new_cb(K_TXDONE) : -1;
    unsigned allowed = pred_end(t);
    char what[96];
    snprintf(what, sizeof what, "tx_end tx%d ok=%d done #%d%s", ti, ok, kd,
             forced ? " [cleanup]" : "");
    cov_tx("tx_end", t);
    int rc = CALLW(what, "pgs_tx_end",
                   pgs_tx_end(t->h, ok, kd >= 0 ? on_tx_done : NULL, kd >= 0 ? &P.cb[kd] : NULL));
    expect(what, rc, allowed);
    if (rc != PGS_OK) {
        if (kd >= 0)
            P.cb[kd].kind = K_STRAY;
        return;
    }
    t->state = T_ENDED;
    t->ok = ok;
    if (kd >= 0) {
        P.cb[kd].expected = 1;
        P.cb[kd].tx = ti;
        t->done_cb = kd;
    } else {
        t->expire = 1; /* no done to say when it goes: valid for the rest of this turn */
    }
    if (t->parent >= 0)
        P.t[t->parent].child = -1;
    if (t->child >= 0) {
        cov("(an end with a child open)");
        t->ended_with_child = 1;
        root->misuse = 1;
        for (int d = t->child; d >= 0; d = P.t[d].child) {
            P.t[d].orphan = 1;
            P.t[d].state = T_ENDED;
            if (avoid_orphan || kd < 0)
                P.t[d].expire = 1;
        }
        t->child = -1;
    }
}

static void op_txcancel(int ti)
{
    mtx *t = &P.t[ti];
    mtx *root = &P.t[t->root];
    mconn *c = &P.c[root->conn];
    unsigned allowed = pred_txcancel(t);
    char what[64];
    snprintf(what, sizeof what, "tx_cancel tx%d (root tx%d)", ti, t->root);
    cov_tx("tx_cancel", t);
    int rc = CALLW(what, "pgs_tx_cancel", pgs_tx_cancel(t->h));
    expect(what, rc, allowed);
    if (rc != PGS_OK)
        return;
    root->cancelled = 1;
    root->events = 1;
    if (root->state == T_OPEN) {
        c->dead = 2;
        c->deadmask = M(PGS_ECANCELED);
        conn_event(root->conn, M(PGS_ECANCELED));
    } else {
        if (c->dead == 0)
            c->dead = 1;
        c->deadmask |= M(PGS_ECANCELED) | M(PGS_ECONN);
        conn_event(root->conn, M(PGS_ECANCELED) | M(PGS_ECONN));
    }
}

static void op_runtx(int ci)
{
    mconn *c = &P.c[ci];
    pgs_tx_opts o;
    random_tx_opts(&o, 1);
    int nullbody = chance(2);
    unsigned allowed = !opts_valid(&o) || nullbody ? M(PGS_EINVAL) : pred_begin(c);
    int ri = P.nr++;
    mrun *r = &P.r[ri];
    memset(r, 0, sizeof *r);
    r->used = 1;
    r->pool = -1;
    r->conn = ci;
    r->tx = -1;
    r->body_cb = new_cb(K_BODY);
    r->done_cb = new_cb(K_RUNDONE);
    P.cb[r->body_cb].run = P.cb[r->done_cb].run = ri;
    r->o = o;
    /* one argument for both: the body finds its record through the done's */
    char what[128];
    snprintf(what, sizeof what, "run_tx c%d run%d %s%s", ci, ri, opts_str(&o),
             nullbody ? " body=NULL" : "");
    cov_conn("run_tx", c->closing, c->dead == 2, owner_state(c) == 2, c->exiting);
    if (c->runs_pending)
        cov("run_tx while another run's body is pending");
    int rc =
        CALLW(what, "pgs_run_tx",
              pgs_run_tx(c->h, &o, nullbody ? NULL : run_body_tx, on_run_done, &P.cb[r->done_cb]));
    expect(what, rc, allowed);
    if (rc != PGS_OK) {
        P.cb[r->body_cb].kind = P.cb[r->done_cb].kind = K_STRAY;
        r->finished = 1;
        return;
    }
    P.cb[r->body_cb].expected = P.cb[r->done_cb].expected = 1;
    r->conflict = allowed != M(PGS_OK) || c->runs_pending > 0;
    conflict_runs(ci);
    c->runs_pending++;
}

static void start_body(mrun *r, pgs_tx *tx)
{
    int ri = (int)(r - P.r);
    int ci;
    if (r->pool >= 0) {
        ci = new_conn(C_HIDDEN);
        P.c[ci].pool = r->pool;
        P.c[ci].run = ri;
        r->conn = ci;
    } else {
        ci = r->conn;
        mconn *c = &P.c[ci];
        if (c->exited)
            model_fail("pgs_run_tx ran its body after its guard was closed");
        if (c->closing || c->dead == 2 || c->nq > 0 || owner_state(c) == 2)
            model_fail("pgs_run_tx ran its body on a guard that was not free (closing %d, "
                       "gone %d, statements in flight %d, transaction open %d)",
                       c->closing, c->dead == 2, c->nq, owner_state(c) == 2);
        c->runs_pending--;
    }
    int ti = new_root(ci, &r->o, tx);
    P.t[ti].run = ri;
    r->tx = ti;
    mlog("        body tx%d on c%d", ti, ci);
    if (P.cleanup) {
        op_txend(ti, 1);
        return;
    }
    if (P.quiet)
        return; /* ended when the program winds down */
    int n = (int)rnd(4);
    for (int i = 0; i < n && room() && P.t[ti].state == T_OPEN; i++)
        random_op(F_TX, ti);
    if (P.t[ti].state == T_OPEN && chance(45))
        op_txend(ti, 0);
}

static void op_poolnew(void)
{
    int pi = P.np++;
    mpool *p = &P.p[pi];
    memset(p, 0, sizeof *p);
    p->used = 1;
    p->close_cb = -1;
    pgs_pool_opts o = {0};
    o.max_size = 1 + (int)rnd(3);
    o.min_size = (int)rnd((unsigned)o.max_size + 1);
    if (chance(50))
        o.min_size = 0;
    static const int timeouts[] = {150, 1500, 5000, 10000};
    o.acquire_timeout_ms = timeouts[rnd(4)];
    static const int waiting[] = {0, 0, 1, 2};
    o.max_waiting = waiting[rnd(4)];
    o.reset = (pgs_pool_reset)rnd(3);
    static const int idle[] = {0, 0, 60, 300};
    o.idle_timeout_ms = idle[rnd(4)];
    o.max_lifetime_ms = chance(20) ? 250 : 0;
    static const int caches[] = {0, -1, 1};
    o.conn.statement_cache = caches[rnd(3)];
    if (chance(30)) {
        o.on_connect = on_pool_connect;
        o.on_release = on_pool_release;
    }
    int bad = chance(3);
    if (bad)
        o.min_size = o.max_size + 1;
    char extra[128];
    snprintf(extra, sizeof extra, "application_name=%s_%d", app_prefix, P.number);
    pgs_pool *h = NULL;
    char what[128];
    snprintf(what, sizeof what,
             "pool_new p%d min %d max %d timeout %d max_waiting %d reset %d "
             "idle %d life %d",
             pi, o.min_size, o.max_size, o.acquire_timeout_ms, o.max_waiting, (int)o.reset,
             o.idle_timeout_ms, o.max_lifetime_ms);
    int rc = CALLW(what, "pgs_pool_new", pgs_pool_new(P.base, th_conninfo(extra), &o, &h));
    expect(what, rc, bad ? M(PGS_EINVAL) : M(PGS_OK));
    if (rc != PGS_OK) {
        p->used = 0;
        if (h)
            model_fail("pgs_pool_new failed but set *out");
        return;
    }
    p->h = h;
    p->o = o;
    p->valid = 1;
}

static void op_acquire(int pi)
{
    mpool *p = &P.p[pi];
    unsigned allowed = pred_acquire(p);
    if (p->exiting)
        cov_name("acquire", "a pool inside its close's done");
    else if (p->closing)
        cov_name("acquire", "a closing pool");
    int qi = P.nq++;
    mreq *q = &P.q[qi];
    memset(q, 0, sizeof *q);
    q->used = 1;
    q->pool = pi;
    int want_handle = chance(70);
    int k = new_cb(K_ACQ);
    P.cb[k].req = qi;
    P.cb[k].pool = pi;
    P.cb[k].allowed = M(PGS_OK) | M(PGS_ETIMEDOUT);
    q->cb = k;
    pgs_pool_req *h = NULL;
    char what[64];
    snprintf(what, sizeof what, "acquire p%d q%d #%d", pi, qi, k);
    int rc = CALLW(what, "pgs_pool_acquire",
                   pgs_pool_acquire(p->h, on_acquired, &P.cb[k], want_handle ? &h : NULL));
    expect(what, rc, allowed);
    check_pool_counts(p);
    if (rc != PGS_OK) {
        P.cb[k].kind = K_STRAY;
        q->used = 0;
        if (h)
            model_fail("pgs_pool_acquire failed but set *req");
        return;
    }
    if (want_handle && !h)
        model_fail("pgs_pool_acquire returned PGS_OK without a request handle");
    P.cb[k].expected = 1;
    q->h = h;
    q->valid = 1;
}

static void op_acqcancel(int qi)
{
    mreq *q = &P.q[qi];
    unsigned allowed;
    if (q->firing || q->cancelled)
        allowed = M(PGS_EMISUSE);
    else if (P.p[q->pool].closing) /* failed by the close, or already set aside: not known */
        allowed = M(PGS_OK) | M(PGS_EMISUSE);
    else
        allowed = M(PGS_OK);
    char what[64];
    snprintf(what, sizeof what, "acquire_cancel q%d%s", qi,
             q->firing ? " (inside its callback)" : "");
    cov_name("acquire_cancel", q->firing              ? "a request inside its own callback"
                               : P.p[q->pool].closing ? "a request of a closing pool"
                                                      : "a waiting request");
    int rc = CALLW(what, "pgs_pool_acquire_cancel", pgs_pool_acquire_cancel(q->h));
    expect(what, rc, allowed);
    if (rc == PGS_OK) {
        q->cancelled = 1;
        P.cb[q->cb].allowed = M(PGS_ECANCELED); /* the cancel wins, even over a grant */
    } else if (!q->firing && !q->cancelled) {
        cov("acquire_cancel refused before its callback ran (the pool closed)");
    }
}

static void op_poolrun(int pi)
{
    mpool *p = &P.p[pi];
    pgs_tx_opts o;
    random_tx_opts(&o, 0);
    int nulldone = chance(2);
    unsigned allowed = nulldone ? M(PGS_EINVAL) : pred_acquire(p);
    int ri = P.nr++;
    mrun *r = &P.r[ri];
    memset(r, 0, sizeof *r);
    r->used = 1;
    r->pool = pi;
    r->conn = -1;
    r->tx = -1;
    r->o = o;
    r->body_cb = new_cb(K_BODY);
    r->done_cb = new_cb(K_RUNDONE);
    P.cb[r->body_cb].run = P.cb[r->done_cb].run = ri;
    char what[128];
    snprintf(what, sizeof what, "pool_run_tx p%d run%d %s%s", pi, ri, opts_str(&o),
             nulldone ? " done=NULL" : "");
    int rc = CALLW(
        what, "pgs_pool_run_tx",
        pgs_pool_run_tx(p->h, &o, run_body_tx, nulldone ? NULL : on_run_done, &P.cb[r->done_cb]));
    expect(what, rc, allowed);
    check_pool_counts(p);
    if (rc != PGS_OK) {
        P.cb[r->body_cb].kind = P.cb[r->done_cb].kind = K_STRAY;
        r->finished = 1;
        return;
    }
    P.cb[r->body_cb].expected = P.cb[r->done_cb].expected = 1;
}

static void op_poolclose(int pi)
{
    mpool *p = &P.p[pi];
    unsigned allowed = p->closing ? M(PGS_EMISUSE) : M(PGS_OK);
    int k = new_cb(K_POOLDONE);
    P.cb[k].pool = pi;
    char what[64];
    snprintf(what, sizeof what, "pool_close p%d #%d", pi, k);
    int rc = CALLW(what, "pgs_pool_close", pgs_pool_close(p->h, on_pool_done, &P.cb[k]));
    expect(what, rc, allowed);
    if (rc != PGS_OK) {
        P.cb[k].kind = K_STRAY;
        return;
    }
    P.cb[k].expected = 1;
    p->closing = 1;
    p->close_cb = k;
    for (int i = 0; i < P.nq; i++)
        if (P.q[i].used && P.q[i].pool == pi && !P.cb[P.q[i].cb].fired && !P.q[i].cancelled)
            P.cb[P.q[i].cb].allowed |= M(PGS_ECLOSED);
}

/* NULL handles and arguments: refused at once, no callback. */
static void op_badargs(void)
{
    int k = new_cb(K_STRAY);
    void *a = &P.cb[k];
    pgs_tx *tx = NULL;
    pgs_conn *conn = NULL;
    pgs_pool *pool = NULL;
    int rc;
    const char *what;
    switch (rnd(12)) {
    case 0:
        what = "pgs_query(NULL)";
        rc = CALL(what, pgs_query(NULL, "SELECT 1", 0, NULL, on_result, a));
        break;
    case 1:
        what = "pgs_conn_close(NULL)";
        rc = CALL(what, pgs_conn_close(NULL, on_close_done, a));
        break;
    case 2:
        what = "pgs_conn_cancel(NULL)";
        rc = CALL(what, pgs_conn_cancel(NULL));
        break;
    case 3:
        what = "pgs_tx_begin(NULL)";
        rc = CALL(what, pgs_tx_begin(NULL, NULL, on_begun, a, &tx));
        break;
    case 4:
        what = "pgs_tx_end(NULL)";
        rc = CALL(what, pgs_tx_end(NULL, 1, on_tx_done, a));
        break;
    case 5:
        what = "pgs_tx_cancel(NULL)";
        rc = CALL(what, pgs_tx_cancel(NULL));
        break;
    case 6:
        what = "pgs_tx_query(NULL)";
        rc = CALL(what, pgs_tx_query(NULL, "SELECT 1", 0, NULL, on_result, a));
        break;
    case 7:
        what = "pgs_pool_acquire(NULL)";
        rc = CALL(what, pgs_pool_acquire(NULL, on_acquired, a, NULL));
        break;
    case 8:
        what = "pgs_pool_acquire_cancel(NULL)";
        rc = CALL(what, pgs_pool_acquire_cancel(NULL));
        break;
    case 9:
        what = "pgs_pool_close(NULL)";
        rc = CALL(what, pgs_pool_close(NULL, on_pool_done, a));
        break;
    case 10:
        what = "pgs_conn_open(conninfo NULL)";
        rc = CALL(what, pgs_conn_open(P.base, NULL, NULL, on_open, a, &conn));
        if (conn)
            model_fail("pgs_conn_open failed but set *out");
        break;
    default:
        what = "pgs_pool_new(base NULL)";
        rc = CALL(what, pgs_pool_new(NULL, "", NULL, &pool));
        if (pool)
            model_fail("pgs_pool_new failed but set *out");
        break;
    }
    if (tx)
        model_fail("pgs_tx_begin failed but set *out");
    expect(what, rc, M(PGS_EINVAL));
}

/* ---- choosing ---- */

/* Mostly a handle in a usable state, sometimes any valid one (closing, gone, ...). */
static int pick_conn(void)
{
    int ids[MAXC], n = 0, good[MAXC], ng = 0;
    for (int i = 0; i < P.nc; i++)
        if (P.c[i].used && P.c[i].valid && P.c[i].kind != C_HIDDEN) {
            ids[n++] = i;
            if (!P.c[i].closing && !P.c[i].dead && !P.c[i].connecting)
                good[ng++] = i;
        }
    if (ng && chance(75))
        return good[rnd((unsigned)ng)];
    return n ? ids[rnd((unsigned)n)] : -1;
}

static int pick_tx(void)
{
    int ids[MAXT], n = 0, good[MAXT], ng = 0, odd[MAXT], no = 0;
    for (int i = 0; i < P.nt; i++)
        if (P.t[i].used && P.t[i].valid) {
            ids[n++] = i;
            const mconn *c = &P.c[P.t[i].conn];
            if (P.t[i].state == T_OPEN && P.t[i].child < 0 && !c->closing && !c->dead)
                good[ng++] = i;
            if (P.t[i].orphan || P.t[i].state != T_OPEN || P.t[i].child >= 0)
                odd[no++] = i;
        }
    unsigned w = rnd(100);
    if (ng && w < 70)
        return good[rnd((unsigned)ng)];
    if (no && w < 88)
        return odd[rnd((unsigned)no)];
    return n ? ids[rnd((unsigned)n)] : -1;
}

static int pick_pool(void)
{
    int ids[MAXP], n = 0;
    for (int i = 0; i < P.np; i++)
        if (P.p[i].used && P.p[i].valid)
            ids[n++] = i;
    return n ? ids[rnd((unsigned)n)] : -1;
}

static int pick_req(void)
{
    int ids[MAXQ], n = 0;
    for (int i = 0; i < P.nq; i++)
        if (P.q[i].used && P.q[i].valid && P.q[i].h && !P.cb[P.q[i].cb].fired)
            ids[n++] = i;
    return n ? ids[rnd((unsigned)n)] : -1;
}

static void conn_op(int ci)
{
    const mconn *c = &P.c[ci];
    /* a free guard gets transactions, a busy or connecting one statements */
    int is_free = pred_begin(c) == M(PGS_OK);
    unsigned w = rnd(100);
    if (w < (is_free ? 30u : 50u))
        op_query(ci);
    else if (w < (is_free ? 38u : 64u))
        op_close(ci);
    else if (w < (is_free ? 42u : 70u))
        op_cancel(ci);
    else if (w < (is_free ? 80u : 90u))
        op_txbegin(ci);
    else
        op_runtx(ci);
}

static void tx_op(int ti)
{
    unsigned w = rnd(100);
    if (P.t[ti].child >= 0 && w < 12) {
        op_txend(ti, 0); /* out of order: the child becomes an orphan */
        return;
    }
    if (w < 46)
        op_txquery(ti);
    else if (w < 66)
        op_savepoint(ti);
    else if (w < 96)
        op_txend(ti, 0);
    else
        op_txcancel(ti);
}

static void pool_op(int pi)
{
    unsigned w = rnd(100);
    if (w < 62)
        op_acquire(pi);
    else if (w < 92)
        op_poolrun(pi);
    else
        op_poolclose(pi);
}

static void random_op(int fk, int fid)
{
    if (!room())
        return;
    if (fk == F_CONN && fid >= 0 && P.c[fid].valid && chance(70)) {
        conn_op(fid);
        return;
    }
    if (fk == F_TX && fid >= 0 && P.t[fid].valid && chance(70)) {
        tx_op(fid);
        return;
    }
    if (fk == F_POOL && fid >= 0 && P.p[fid].valid && chance(70)) {
        pool_op(fid);
        return;
    }
    if (fk == F_REQ && fid >= 0 && P.q[fid].valid && P.q[fid].h) {
        op_acqcancel(fid);
        return;
    }
    int ci = pick_conn(), ti = pick_tx(), pi = pick_pool(), qi = pick_req();
    int live_conns = 0;
    for (int i = 0; i < P.nc; i++)
        live_conns += P.c[i].used && !P.c[i].exited && P.c[i].kind == C_PLAIN;
    unsigned w_open = P.plain_opened < 4 && live_conns < 3 ? (ci < 0 ? 30u : 5u) : 0;
    unsigned w_pool = P.np < MAXP && pi < 0 ? (ci < 0 ? 12u : 2u) : 0;
    unsigned w_conn = ci >= 0 ? 40u : 0;
    unsigned w_tx = ti >= 0 ? 40u : 0;
    unsigned w_poolop = pi >= 0 ? 12u : 0;
    unsigned w_req = qi >= 0 ? 3u : 0;
    unsigned w_bad = 1;
    unsigned total = w_open + w_pool + w_conn + w_tx + w_poolop + w_req + w_bad;
    unsigned x = rnd(total);
    if (x < w_open)
        op_open();
    else if ((x -= w_open) < w_pool)
        op_poolnew();
    else if ((x -= w_pool) < w_conn)
        conn_op(ci);
    else if ((x -= w_conn) < w_tx)
        tx_op(ti);
    else if ((x -= w_tx) < w_poolop)
        pool_op(pi);
    else if ((x -= w_poolop) < w_req)
        op_acqcancel(qi);
    else
        op_badargs();
}

static void turn_end(void)
{
    for (int i = 0; i < P.nt; i++)
        if (P.t[i].used && P.t[i].expire) {
            P.t[i].expire = 0;
            P.t[i].valid = 0;
        }
}

/* ---- one program ---- */

static void step_loop(void)
{
    P.steps++;
    snprintf(P.ctx, sizeof P.ctx, "L%d", P.steps);
    if (chance(35)) {
        event_base_loop(P.base, EVLOOP_NONBLOCK);
    } else {
        struct timeval tv = {0, 200 + (long)rnd(3000)};
        P.guard_fired = 0;
        evtimer_add(P.guard, &tv);
        event_base_loop(P.base, EVLOOP_ONCE);
        evtimer_del(P.guard);
    }
    snprintf(P.ctx, sizeof P.ctx, "L%d", P.steps);
}

static int pending_things(char *why, size_t cap)
{
    for (int i = 0; i < P.ncb; i++)
        if (P.cb[i].expected && !P.cb[i].fired && P.cb[i].kind != K_BODY) {
            snprintf(why, cap, "callback #%d (%s) never fired", i, kind_names[P.cb[i].kind]);
            return 1;
        }
    for (int i = 0; i < P.nc; i++)
        if (P.c[i].used && P.c[i].valid) {
            snprintf(why, cap, "c%d still open", i);
            return 1;
        }
    for (int i = 0; i < P.nt; i++)
        if (P.t[i].used && P.t[i].valid) {
            snprintf(why, cap, "tx%d still open", i);
            return 1;
        }
    for (int i = 0; i < P.np; i++)
        if (P.p[i].used && P.p[i].valid) {
            snprintf(why, cap, "pool p%d still open", i);
            return 1;
        }
    return 0;
}

/* Liveness: with no new calls, every statement on a connected guard is answered (or fails)
 * on its own; its callback must not wait for a later call (an end, a close) to fire. Only in
 * some programs: it costs a couple of idle seconds. */
static void quiesce(void)
{
    P.quiet = 1;
    mlog("---- quiet: no calls until the loop settles");
    double start = th_now(), last = start;
    int seen = P.fire_seq;
    while (th_now() - last < 3.0 && th_now() - start < 20) {
        step_loop();
        if (P.fire_seq != seen) {
            seen = P.fire_seq;
            last = th_now();
        }
    }
    for (int i = 0; i < P.ncb; i++) {
        mcb *k = &P.cb[i];
        if (!k->expected || k->fired ||
            (k->kind != K_QUERY && k->kind != K_TXQ && k->kind != K_BEGUN))
            continue;
        /* on a live guard (a cancel request may take its time; a deferrable BEGIN waits for
         * a safe snapshot) */
        const mconn *c = &P.c[k->conn];
        if (c->connecting || c->closing || c->dead)
            continue;
        const mtx *r = k->tx >= 0 ? &P.t[P.t[k->tx].root] : NULL;
        if (r && (r->deferrable || r->cancelled || r->timeout))
            continue;
        model_fail("callback #%d (%s) did not fire in %.1f s of an idle loop: its statement "
                   "should have been answered without a further call",
                   i, kind_names[k->kind], th_now() - start);
    }
    P.quiet = 0;
    cov("(programs with a quiet phase)");
}

static void cleanup(void)
{
    P.cleanup = 1;
    snprintf(P.ctx, sizeof P.ctx, "cleanup");
    mlog("---- cleanup: close what is still open");
    char why[128];
    double end = th_now() + 30;
    while (pending_things(why, sizeof why)) {
        /* the deepest open transactions first (their parents would roll them back anyway) */
        for (int i = P.nt - 1; i >= 0; i--)
            if (P.t[i].used && P.t[i].valid && P.t[i].state == T_OPEN && !P.t[i].orphan &&
                P.t[i].child < 0)
                op_txend(i, 1);
        for (int i = 0; i < P.nc; i++)
            if (P.c[i].used && P.c[i].valid && !P.c[i].closing && P.c[i].kind != C_HIDDEN)
                op_close(i);
        for (int i = 0; i < P.np; i++)
            if (P.p[i].used && P.p[i].valid && !P.p[i].closing)
                op_poolclose(i);
        turn_end();
        step_loop();
        if (th_now() > end)
            model_fail("did not wind down within 30 s: %s", why);
    }
}

static void drain(void)
{
    double end = th_now() + 15;
    while (event_base_get_num_events(P.base, EVENT_BASE_COUNT_ADDED | EVENT_BASE_COUNT_ACTIVE) >
           0) {
        step_loop();
        if (th_now() > end)
            model_fail("the loop did not drain within 15 s: %d events left (a leaked timer or "
                       "watch)",
                       event_base_get_num_events(P.base,
                                                 EVENT_BASE_COUNT_ADDED | EVENT_BASE_COUNT_ACTIVE));
    }
}

/* The server must show no session of a finished program: backends of closed connections go
 * away on their own, a little later. An observer connection costs a SCRAM handshake, so one
 * query every so often covers every program that ended since (each keeps its log until then,
 * so a stray session is still reported with its program's seed and operations). */
enum { MAX_PENDING = 1024, STRAY_AFTER_S = 10, SWEEP_EVERY_S = 15 };
typedef struct ended {
    int number;
    uint64_t seed;
    double at;
    char *log;
    size_t len;
} ended;
static ended pending[MAX_PENDING];
static int npending;
static double last_sweep;
static int sweeps;

static void sweep_server(int final)
{
    double end = th_now() + STRAY_AFTER_S;
    for (;;) {
        char like[96];
        snprintf(like, sizeof like, "%s\\_%%", app_prefix);
        const char *v[] = {like};
        char *list = th_scalar(
            "SELECT string_agg(application_name || ' ' || coalesce(state, '?'), ',') FROM "
            "pg_stat_activity WHERE application_name LIKE $1",
            1, v);
        last_sweep = th_now();
        sweeps++;

        int kept = 0;
        for (int i = 0; i < npending; i++) {
            ended *e = &pending[i];
            char app[96];
            snprintf(app, sizeof app, "%s_%d ", app_prefix, e->number);
            const char *hit = list ? strstr(list, app) : NULL;
            if (hit && (hit == list || hit[-1] == ',')) {
                if (th_now() - e->at < STRAY_AFTER_S) {
                    pending[kept++] = *e;
                    continue;
                }
                char why[400];
                snprintf(why, sizeof why,
                         "a session of this program is still on the server %.1f s after it "
                         "closed everything (application_name, state: %.200s)",
                         th_now() - e->at, hit);
                dump_program(e->number, e->seed, why, e->log, e->len);
                write_all("=== end of the operation log\n", 29);
                ck_abort_msg("model: program %d (PGSCOPE_SEED=%" PRIu64 "): %s", e->number,
                             base_seed, why);
            }
            free(e->log);
        }
        npending = kept;
        free(list);
        if (!final || npending == 0)
            return;
        if (th_now() > end + 1)
            ck_abort_msg("model: stray sessions were not reported"); /* not reached */
        usleep(50000);
    }
}

static void program_ended(void)
{
    if (npending == MAX_PENDING)
        sweep_server(1);
    ended *e = &pending[npending++];
    e->number = P.number;
    e->seed = P.seed;
    e->at = th_now();
    e->len = log_len;
    e->log = malloc(log_len ? log_len : 1);
    if (e->log && log_len)
        memcpy(e->log, log_buf, log_len);
    if (th_now() - last_sweep > SWEEP_EVERY_S)
        sweep_server(0);
}

static void run_program(int number, uint64_t seed)
{
    memset(&P, 0, sizeof P);
    P.active = 1;
    P.number = number;
    P.seed = seed;
    rng = seed;
    log_len = 0;
    snprintf(P.ctx, sizeof P.ctx, "start");
    mlog("program %d seed 0x%016" PRIx64, number, seed);
    P.base = th_loop_begin();
    P.guard = evtimer_new(P.base, on_guard, NULL);
    ck_assert_ptr_nonnull(P.guard);
    P.fds = th_count_fds();
    P.budget = 6 + (int)rnd(45);
    P.hard_budget = P.budget * 2 + 10;
    P.deadline = th_now() + 20;
    double t0 = th_now();
    snprintf(P.ctx, sizeof P.ctx, "L0");
    /* Calls come in batches between loop steps, mostly after something fired, sometimes on a
     * quiet step (a guard still connecting, a statement still running): a program follows its
     * callbacks whatever the server's speed. */
    int seen = -1;
    double next_quiet = 0, active_until = th_now() + 8;
    while (P.ops < P.budget && room() && th_now() < active_until) {
        double now = th_now();
        if (P.fire_seq != seen ? chance(70) : now >= next_quiet) {
            seen = P.fire_seq;
            next_quiet = now + 0.002 + rnd(80) / 1000.0;
            int n = 1 + (int)rnd(3);
            for (int i = 0; i < n && P.ops < P.budget && room(); i++)
                random_op(F_NONE, -1);
            turn_end();
        }
        seen = P.fire_seq;
        step_loop();
    }
    if (chance(4))
        quiesce();
    double t1 = th_now();
    time_run += t1 - t0;
    cleanup();
    drain();
    event_free(P.guard);
    P.guard = NULL;
    if (th_count_fds() != P.fds)
        model_fail("%d descriptor(s) left open after everything was closed",
                   th_count_fds() - P.fds);
    th_loop_end(P.base);
    P.base = NULL;
    char why[128];
    if (pending_things(why, sizeof why))
        model_fail("after the loop drained: %s", why);
    for (int i = 0; i < P.np; i++)
        if (P.p[i].used && !P.cb[P.p[i].close_cb].fired)
            model_fail("pool p%d never closed", i);
    double t2 = th_now();
    P.active = 0;
    program_ended();
    time_server += th_now() - t2;
    time_cleanup += t2 - t1;
    total_programs++;
}

/* ---- the suite ---- */

static const char *const avoid_names[] = {
    "closedone", /* calls on a guard inside its own close's done */
    "pooldone",  /* calls on a pool inside its own close's done */
    "orphan",    /* calls on a savepoint orphaned by its parent's end, after that turn */
    "econn",     /* accept PGS_ECONN from a statement whose error came before a close or cancel */
    "aborted",   /* statements and savepoints queued after a failure of their transaction came */
    NULL};

static void parse_avoid(void)
{
    const char *a = getenv("PGSCOPE_MODEL_AVOID");
    if (!a)
        return;
    avoid_closedone = strstr(a, "closedone") != NULL;
    avoid_pooldone = strstr(a, "pooldone") != NULL;
    avoid_orphan = strstr(a, "orphan") != NULL;
    tolerate_econn = strstr(a, "econn") != NULL;
    avoid_aborted = strstr(a, "aborted") != NULL;
    (void)avoid_names;
}

START_TEST(test_random_programs_match_the_model)
{
    const char *s = getenv("PGSCOPE_SEED");
    base_seed = s && *s ? strtoull(s, NULL, 0) : (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    const char *np = getenv("PGSCOPE_MODEL_PROGRAMS");
    int programs = np && *np ? atoi(np) : DEFAULT_PROGRAMS;
    const char *ns = getenv("PGSCOPE_MODEL_SECONDS");
    double seconds = ns && *ns ? atof(ns) : DEFAULT_SECONDS;
    const char *nf = getenv("PGSCOPE_MODEL_FIRST");
    int first = nf && *nf ? atoi(nf) : 0;
    parse_avoid();
    /* The observer (th_scalar) is plain libpq: its default gssencmode=prefer looks for Kerberos
     * credentials on each connect, which can stall for seconds on a host whose DNS does not
     * answer. The guards themselves disable it unless told otherwise (see pgs_conn_open). */
    setenv("PGGSSENCMODE", "disable", 0);
    fprintf(stderr, "model: PGSCOPE_SEED=%" PRIu64 " programs %d..%d, at most %.0f s%s%s\n",
            base_seed, first, first + programs - 1, seconds,
            getenv("PGSCOPE_MODEL_AVOID") ? ", avoiding " : "",
            getenv("PGSCOPE_MODEL_AVOID") ? getenv("PGSCOPE_MODEL_AVOID") : "");
    snprintf(app_prefix, sizeof app_prefix, "pgs_model_%d", (int)getpid());
    snprintf(table, sizeof table, "pgs_model_t_%d", (int)getpid());
    snprintf(password, sizeof password, "%s", th_conninfo_value("password"));
    char sql[160];
    snprintf(sql, sizeof sql, "DROP TABLE IF EXISTS %s", table);
    free(th_scalar(sql, 0, NULL));
    snprintf(sql, sizeof sql, "CREATE TABLE %s (v int)", table);
    free(th_scalar(sql, 0, NULL));
#ifdef MODEL_SANITIZED
    __sanitizer_set_death_callback(on_sanitizer_death);
#else
    signal(SIGSEGV, on_fatal_signal);
    signal(SIGBUS, on_fatal_signal);
    signal(SIGABRT, on_fatal_signal);
    signal(SIGFPE, on_fatal_signal);
#endif
    double start = th_now();
    last_sweep = start;
    int ran = 0;
    for (int i = first; i < first + programs; i++) {
        if (th_now() - start > seconds)
            break;
        run_program(i, program_seed(i));
        ran++;
    }
    double t3 = th_now();
    sweep_server(1);
    time_server += th_now() - t3;
    double took = th_now() - start;
    fprintf(stderr,
            "model: %d programs, %ld calls, %ld callbacks in %.1f s (PGSCOPE_SEED=%" PRIu64 ")\n",
            ran, total_ops, total_callbacks, took, base_seed);
    cov_print();
    fprintf(stderr,
            "model: time in programs %.1f s, winding down %.1f s, server checks %.1f s "
            "(%d queries)\n",
            time_run, time_cleanup, time_server, sweeps);
    snprintf(sql, sizeof sql, "DROP TABLE IF EXISTS %s", table);
    free(th_scalar(sql, 0, NULL));
    free(log_buf);
    log_buf = NULL;
    log_cap = log_len = 0;
    ck_assert_int_gt(ran, 0);
}
END_TEST

static Suite *model_suite(void)
{
    Suite *s = suite_create("model");
    TCase *t = tcase_create("model");
    tcase_set_timeout(t, 230);
    tcase_add_test(t, test_random_programs_match_the_model);
    suite_add_tcase(s, t);
    return s;
}

int main(void)
{
    return th_run_suite(model_suite());
}

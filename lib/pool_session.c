/* The pool's care of sessions: the setup statements every new connection runs before anyone
 * gets it, the reset a returned guard gets before the next user, and the setup again inside
 * that reset (which undoes it), in the same pipeline segment. Part of the pool layer
 * (pool_private.h): pool.c decides when; this file sends the statements (through conn.h) and
 * acts on their failure. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pool_private.h"

/* Free what pool_copy_setup kept. */
void pool_free_setup(pgs_pool *p)
{
    for (int i = 0; p->setup && p->setup[i]; i++)
        free(p->setup[i]);
    free(p->setup);
}

/* The setup statements, copied (the caller's may go after pgs_pool_new). An empty list is
 * none. Returns 0 or -1 (no memory). */
int pool_copy_setup(pgs_pool *p, const char *const *sql)
{
    int n = 0;
    while (sql && sql[n])
        n++;
    p->opts.setup_sql = NULL;
    if (n == 0)
        return 0;
    if (!(p->setup = calloc((size_t)n + 1, sizeof *p->setup)))
        return -1;
    for (int i = 0; i < n; i++)
        if (!(p->setup[i] = strdup(sql[i])))
            return -1;
    p->nsetup = n;
    p->opts.setup_sql = (const char *const *)p->setup;
    return 0;
}

/* The setup runs in one transaction, BEGIN + the statements + COMMIT, in one write: all of it
 * or nothing, and the same way as after a reset (slot_send_reset), where it must be a
 * transaction of its own: the next user's statements share its pipeline segment, and an error
 * among them would otherwise roll back the setup's SET and LISTEN (a segment without a sync
 * is one implicit transaction). So setup statements must be allowed in a transaction block:
 * SET, LISTEN, PREPARE, CREATE TEMP TABLE are; VACUUM is not. */
static const char setup_begin[] = "BEGIN ISOLATION LEVEL READ COMMITTED";

/* "setup statement 2 of 3 (LISTEN pgs_chan) failed: ..." into e (err's code and SQLSTATE). */
static void describe_setup_failure(pgs_pool *p, const stmt_ref *ref, const pgs_error *err,
                                   const char *when, pgs_error *e)
{
    char msg[sizeof err->message + 160];
    if (ref->setup_no > 0)
        snprintf(msg, sizeof msg, "setup statement %d of %d (%.60s) failed%s: %s",
                 ref->setup_no, p->nsetup, p->setup[ref->setup_no - 1], when, err->message);
    else
        snprintf(msg, sizeof msg, "the setup transaction failed%s: %s", when, err->message);
    err_set(e, err->code, err->sqlstate, msg, NULL);
}

static void setup_over(slot *s)
{
    pgs_pool *p = s->pool;
    p->connecting--;
    if (s->state == SL_CLOSING)
        return; /* the pool closed it meanwhile: slot_gone follows */
    if (!s->setup_failed) {
        slot_ready(s);
        return;
    }
    /* Never handed out: closed, and the next one opened after a backoff, as after a failed
     * connect. A lost connection is a loss; a statement the server refused, a setup failure. */
    int lost = s->setup_err.code == PGS_ECONN || !conn_ready(s->conn);
    if (!lost) {
        p->counters.setup_failures++;
        s->failed_by_pool = 1;
    }
    pool_replaced(s, lost ? REPLACED_LOST : 0, &s->setup_err);
    pool_backoff(p, &s->setup_err);
    slot_retire(s);
}

static void setup_answered(pgs_conn *conn, const PGresult *res, const pgs_error *err, void *arg)
{
    (void)conn;
    (void)res;
    stmt_ref *ref = arg;
    slot *s = ref->s;
    if (err && !s->setup_failed) { /* the first: those after it were skipped for it */
        s->setup_failed = 1;
        describe_setup_failure(s->pool, ref, err, "", &s->setup_err);
    }
    if (--s->setup_left == 0)
        setup_over(s);
}

static void queue_setup(slot *s, const char *sql, int flags, stmt_ref *ref)
{
    if (s->setup_failed)
        return;
    int rc = conn_query(s->conn, sql, 0, NULL, flags, setup_answered, ref);
    if (rc == PGS_OK) {
        s->setup_left++;
        return;
    }
    pgs_error e;
    err_set(&e, rc, NULL, "could not queue it", NULL);
    s->setup_failed = 1;
    describe_setup_failure(s->pool, ref, &e, "", &s->setup_err);
}

/* Run the setup on a new connection; setup_over follows once every statement is answered. */
void slot_start_setup(slot *s)
{
    pgs_pool *p = s->pool;
    s->state = SL_SETUP;
    queue_setup(s, setup_begin, CONN_NO_SYNC, &s->own);
    for (int i = 0; i < p->nsetup; i++)
        queue_setup(s, p->setup[i], CONN_NO_SYNC, &s->setup[i]);
    queue_setup(s, "COMMIT", 0, &s->own);
    if (s->setup_left == 0)
        setup_over(s); /* nothing was queued */
    else if (s->setup_failed)
        conn_fail(s->conn, &s->setup_err, 0); /* no COMMIT and sync: what went hears why */
}

/* A reset statement (or a setup statement after it) is answered. */
static void reset_done(pgs_conn *conn, const PGresult *res, const pgs_error *err, void *arg)
{
    (void)res;
    stmt_ref *ref = arg;
    slot *s = ref->s;
    pgs_pool *p = s->pool;
    if (!err || s->state == SL_CLOSING)
        return;
    /* The reset (or a setup statement after it) failed, or the connection went. Only the
     * first error acts: after it the guard is closing, or dead. */
    int lost = err->code == PGS_ECONN || !conn_ready(conn);
    if (!lost) {
        if (ref->setup_no)
            p->counters.setup_failures++;
        else
            p->counters.resets_failed++;
    }
    pgs_error e = *err;
    if (ref->setup_no)
        describe_setup_failure(p, ref, err, " after the session reset", &e);
    if (s->state == SL_IDLE) {
        /* Idle: replace it. */
        slot_replace(s, REPLACED_COUNT | (lost ? REPLACED_LOST : 0), &e);
        pool_dispatch(p);
    } else if (!lost) {
        /* Already handed out: its new user's statements are queued behind the reset, on a
         * session that may still hold the last user's state, so close it now; they hear why
         * instead of running on it. (A lost one: they hear of the loss.) */
        char msg[sizeof e.message + 64];
        if (ref->setup_no)
            snprintf(msg, sizeof msg, "the pool's %s", e.message);
        else
            snprintf(msg, sizeof msg, "the pool's session reset failed: %s", e.message);
        s->failed_by_pool = 1;
        err_set(&e, PGS_ECONN, err->sqlstate, msg, NULL); /* the server's SQLSTATE, if any */
        conn_fail(conn, &e, 0);
    }
}

/* Everything DISCARD ALL resets except prepared statements (and cached plans), so the
 * statement cache stays warm, in DISCARD ALL's order, with no sync of its own: it shares the
 * next user's segment and write (each write costs the server a wake-up; sent on return as two
 * segments of its own, it made three writes per lease and half the transactions per second:
 * tools/run-bench). It is a transaction of its own, begun READ COMMITTED, so whatever
 * defaults the last user left (serializable deferrable could wait for a safe snapshot,
 * serializable fails on a hot standby) do not apply to it, and every step works in a
 * read-only transaction. RESET ALL leaves the role and session user, hence SET SESSION
 * AUTHORIZATION DEFAULT. A failure leaves the block open and aborted (the server skips to
 * the sync, and refuses what comes after it): reset_done closes the guard then. The setup
 * statements, which the reset undoes, run again inside the same transaction, before its
 * COMMIT (slot_send_reset). */
static const char *const session_reset[] = {
    setup_begin, "CLOSE ALL", "SET SESSION AUTHORIZATION DEFAULT", "RESET ALL", "UNLISTEN *",
    "SELECT pg_catalog.pg_advisory_unlock_all()", "DISCARD TEMP", "DISCARD SEQUENCES", NULL,
};

int slot_send_reset(slot *s)
{
    pgs_pool *p = s->pool;
    pgs_conn *conn = s->conn;
    /* No sync of its own: what the new user queues in this turn joins its segment (DISCARD
     * ALL and the reset's COMMIT end their transaction at once, so the user's first
     * statement starts a fresh one, even VACUUM); otherwise a sync ends it with the turn.
     * DISCARD ALL when asked, or when the user's own SQL PREPARE left statements behind (a
     * setup PREPARE counts: it runs again after the DISCARD ALL). Every statement is flagged
     * as a reset, the setup ones too, so the guard counts as clean and idle while they are in
     * flight and the next user's statements share their write. */
    enum { F = CONN_RESET | CONN_NO_SYNC | CONN_SYNC_TURN };
    int rc = PGS_OK;
    if (p->opts.reset == PGS_RESET_ALL || conn_user_prepared(conn)) {
        rc = conn_query(conn, "DISCARD ALL", 0, NULL, F, reset_done, &s->own);
        if (rc != PGS_OK || !p->nsetup)
            return rc;
        /* DISCARD ALL cannot run inside a transaction block: the setup's own comes after. */
        rc = conn_query(conn, setup_begin, 0, NULL, F, reset_done, &s->own);
    } else {
        /* Each reports to reset_done: a failure, or the skip it caused, is handled once. */
        for (int i = 0; rc == PGS_OK && session_reset[i]; i++)
            rc = conn_query(conn, session_reset[i], 0, NULL, F, reset_done, &s->own);
    }
    for (int i = 0; rc == PGS_OK && i < p->nsetup; i++)
        rc = conn_query(conn, p->setup[i], 0, NULL, F, reset_done, &s->setup[i]);
    return rc == PGS_OK ? conn_query(conn, "COMMIT", 0, NULL, F, reset_done, &s->own) : rc;
}

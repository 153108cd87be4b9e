/* Transaction guards: BEGIN with options, statements, savepoints, commit/rollback, cancel,
 * timeouts, and the exact outcome (COMMIT's life decides it). Sits on the connection layer
 * (conn.h) and the loop adapter (loop.h); knows nothing of pools. Every statement goes through
 * the connection's pipeline, and each result is mapped back through the FIFO of what was sent.
 * pgs_run_tx and its retries are tx_run.c's, resolving an unknown commit tx_resolve.c's, COPY
 * and streamed statements tx_bulk.c's. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tx_private.h"

#include "conn.h"
#include "error.h"
#include "loop.h"

/* The id pgs_tx_resolve needs: the transaction id and, after a slash, when the server started
 * (in microseconds): after a crash restart the server may give an id whose assignment never
 * reached its WAL to another transaction, so the answer for an id read before a restart is
 * not to be trusted. NULL (no id: nothing was written) when no id was assigned. */
#define RESOLVABLE_ID                                                                              \
    "SELECT txid_current_if_assigned()::text || '/' || "                                           \
    "(extract(epoch from pg_catalog.pg_postmaster_start_time()) * 1000000)::bigint::text"

pgs_tx *root_of(pgs_tx *tx)
{
    while (tx->parent)
        tx = tx->parent;
    return tx;
}

/* The connection, or NULL when its guard was closed and freed under the transaction. */
pgs_conn *conn_of(pgs_tx *tx)
{
    return root_of(tx)->conn;
}

void note_failure(pgs_tx *tx, const pgs_error *e)
{
    if (!tx->failed) {
        tx->failed = 1;
        tx->err = *e;
    }
}

void note_failure_code(pgs_tx *tx, pgs_code code, const char *msg)
{
    pgs_error e;
    err_set(&e, code, NULL, msg, NULL);
    note_failure(tx, &e);
}

/* An end statement (`what`) could not be queued (send_stmt's rc): the connection is gone, and
 * its own reason (the server's FATAL with its SQLSTATE, say) is the failure. */
void note_unsent(pgs_tx *tx, const char *what, int rc)
{
    pgs_conn *c = conn_of(tx);
    const pgs_error *why = c ? conn_error(c) : NULL;
    char msg[sizeof why->message + 64];
    snprintf(msg, sizeof msg, "could not send %s: %s", what,
             why ? why->message : pgs_strerror(rc));
    pgs_error e;
    err_set(&e, why ? why->code : rc == PGS_EMISUSE ? PGS_ECLOSED : (pgs_code)rc,
            why ? why->sqlstate : NULL, msg, NULL);
    note_failure(tx, &e);
}

/* ---- sending ---- */

static void tx_op_done(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg);

/* Queue one statement of this guard. A connection that is gone answers with its cause, which
 * becomes the guard's failure. */
int send_any(pgs_tx *tx, op_kind kind, const char *sql, int nparams, const char *const *values,
             int flags, const conn_bulk_spec *bulk, pgs_copy **out, pgs_result_cb cb, void *arg)
{
    if (!conn_of(tx))
        return PGS_ECLOSED;
    pgs_tx *root = root_of(tx);
    if (root->share && root->cancel_code != PGS_OK &&
        (kind == K_USER || kind == K_BEGIN || kind == K_SETUP))
        return root->cancel_code; /* its connection lives on for the others */
    tx_op *op = malloc(sizeof *op);
    if (!op)
        return PGS_ENOMEM;
    *op = (tx_op){tx, kind, cb, arg};
    int rc = bulk ? conn_bulk(conn_of(tx), sql, nparams, values, bulk, tx_op_done, op, out)
                  : conn_query(conn_of(tx), sql, nparams, values, flags, tx_op_done, op);
    if (rc != PGS_OK) {
        free(op);
        return rc;
    }
    tx->inflight++;
    if (kind != K_TXID && kind != K_COMMIT)
        root->ahead++;
    return PGS_OK;
}

int send_stmt(pgs_tx *tx, op_kind kind, const char *sql, int nparams, const char *const *values,
              int flags, pgs_result_cb cb, void *arg)
{
    return send_any(tx, kind, sql, nparams, values, flags, NULL, NULL, cb, arg);
}

/* An end statement: if it cannot be sent, the connection is gone and that is the failure. */
static void send_end(pgs_tx *tx, op_kind kind, const char *sql, int flags)
{
    int rc = send_stmt(tx, kind, sql, 0, NULL, flags, NULL, NULL);
    if (rc != PGS_OK) {
        note_unsent(tx, sql, rc);
        /* Not released: the savepoint's work dies with the transaction around it. */
        if (tx->outcome == PGS_TX_COMMITTED)
            tx->outcome = PGS_TX_ROLLED_BACK;
        if (tx->parent)
            note_failure(tx->parent, &tx->err);
    }
}

/* ---- ending ---- */

static void finish(pgs_tx *tx)
{
    tx->state = TX_DONE;
    loop_ev_post(tx->defer);
    if (tx->parent) {
        tx->parent->children_ending--;
        progress(tx->parent);
        return;
    }
    if (tx->timer)
        loop_ev_stop(tx->timer);
    if (!tx->conn)
        return;
    if (conn_owner(tx->conn) == tx) {
        conn_set_owner(tx->conn, NULL, NULL);
        conn_set_xact(tx->conn, -1); /* after the end's sync libpq knows it again */
    }
    /* After a cancel request the session's state is unknown: never reuse it. (A shared one
     * carries the others' transactions to their end first: kill_shared spoiled it.) */
    if (tx->cancel_code != PGS_OK && conn_ready(tx->conn) && !tx->share)
        conn_kill(tx->conn, tx->cancel_code, "the transaction was canceled", 0);
}

/* A COMMIT held behind plugs goes to libpq once the last of them is pulled. */
static void commit_released(pgs_tx *root)
{
    if (root->commit == CM_HELD && root->settling == 0 && !root->plug)
        root->commit = CM_SENT;
}

void progress(pgs_tx *tx)
{
    switch (tx->state) {
    case TX_SETTLING:
        if (tx->inflight == 0 && tx->children_ending == 0) {
            /* All of the child's results are in: release, or roll back to the savepoint. The
             * sync first ends the server's skipping after an error. */
            char sql[80];
            tx->state = TX_ENDING;
            root_of(tx)->settling--;
            if (tx->ok && !tx->failed) {
                tx->outcome = PGS_TX_COMMITTED;
                snprintf(sql, sizeof sql, "RELEASE SAVEPOINT %s", tx->savepoint);
                send_end(tx, K_RELEASE, sql, STMT | CONN_BYPASS);
            } else {
                tx->outcome = PGS_TX_ROLLED_BACK;
                if (conn_of(tx))
                    conn_sync(conn_of(tx), CONN_BYPASS);
                snprintf(sql, sizeof sql, "ROLLBACK TO SAVEPOINT %s", tx->savepoint);
                send_end(tx, K_ROLLBACK_TO, sql, STMT | CONN_BYPASS);
                snprintf(sql, sizeof sql, "RELEASE SAVEPOINT %s", tx->savepoint);
                send_end(tx, K_RELEASE, sql, STMT | CONN_BYPASS);
            }
            if (conn_of(tx) && !tx_kill_before_commit(root_of(tx)))
                conn_unplug(conn_of(tx), tx->plug);
            commit_released(root_of(tx));
            progress(tx);
        }
        break;
    case TX_ENDING:
        if (tx->inflight == 0 && tx->children_ending == 0 && !tx->recording)
            finish(tx);
        break;
    case TX_OPEN:
    case TX_DONE:
        break;
    }
}

static void send_rollback(pgs_tx *tx)
{
    tx->outcome = PGS_TX_ROLLED_BACK;
    send_end(tx, K_ROLLBACK, "ROLLBACK", 0);
}

/* The flags of a root's COMMIT or ROLLBACK. Shared: carried on in its batch's segment, or
 * alone; and never by a prepared statement's name, whose Parse a failed segment before it may
 * have made the server skip (the end that ends a batch must run, to end an aborted transaction). */
static int end_flags(const pgs_tx *tx)
{
    if (!tx->share)
        return 0;
    return (tx->end_alone ? 0 : STMT) | CONN_UNCACHED;
}

void end_root(pgs_tx *tx)
{
    tx->state = TX_ENDING;
    if (tx->ok && !tx->failed) {
        /* resolvable: the id rides in the same round trip, before COMMIT, and leaves the
         * server first (its own flush request), so a COMMIT whose reply is lost can still be
         * resolved. Otherwise COMMIT alone: one server write for the whole transaction. */
        int rc = PGS_OK;
        if (tx->opts.resolvable)
            rc = send_stmt(tx, K_TXID, RESOLVABLE_ID, 0, NULL,
                           STMT | CONN_FLUSH_NOW, NULL, NULL);
        /* Shared: COMMIT alone in its segment (the end of a batch, or of a transaction that
         * owned the session): if an error aborted the transaction (or one before it in the
         * batch), the server skips only up to the sync before it, and COMMIT then ends the
         * aborted transaction, so the next one finds the session idle. Carried on in the
         * batch's segment otherwise (tx_carry_on). */
        if (rc == PGS_OK && tx->share && tx->end_alone)
            rc = tx->conn ? conn_sync(tx->conn, 0) : PGS_ECLOSED;
        if (rc == PGS_OK)
            rc = send_stmt(tx, K_COMMIT, "COMMIT", 0, NULL, end_flags(tx), NULL, NULL);
        if (rc == PGS_OK) {
            tx->commit = tx->settling > 0 || tx->plug ? CM_HELD : CM_SENT;
            tx->outcome = PGS_TX_UNKNOWN; /* until the reply says otherwise */
        } else {
            /* Not sent: the connection is gone, and the server dropped the transaction. */
            note_unsent(tx, "COMMIT", rc);
            tx->outcome = PGS_TX_ROLLED_BACK;
        }
        end_queued(tx);
        return;
    }
    /* The lone sync ends any abort the server is in, so ROLLBACK itself runs. (Shared and
     * carried on in a batch: if it is skipped, the batch's last end, alone, ends the abort.) */
    int carried = tx->share && !tx->end_alone;
    if (tx->conn && !carried)
        conn_sync(tx->conn, 0);
    tx->outcome = PGS_TX_ROLLED_BACK;
    send_end(tx, K_ROLLBACK, "ROLLBACK", end_flags(tx));
    end_queued(tx);
}

/* ---- results ---- */

static int is_aborted(const PGresult *res)
{
    return res && PQresultStatus(res) == PGRES_PIPELINE_ABORTED;
}

/* Did a batched transaction fail only because of those before it in its segment? Its BEGIN
 * was skipped after their error. (A statement never runs by the name of a prepared statement
 * whose Parse a failed segment may have skipped: stmt.parsing.) */
static int skipped(const tx_op *op, const PGresult *res)
{
    return op->kind == K_BEGIN && is_aborted(res);
}

/* The server's ERROR for the statement (not libpq's word on a lost connection, nor a FATAL):
 * the transaction is aborted, whatever follows. */
static int refused(const PGresult *res)
{
    const char *severity = PQresultErrorField(res, PG_DIAG_SEVERITY_NONLOCALIZED);
    return PQresultStatus(res) == PGRES_FATAL_ERROR && severity && strcmp(severity, "ERROR") == 0;
}

/* COMMIT's reply, or what came instead, decides the outcome: COMMITTED only when the server
 * said so; UNKNOWN only when COMMIT may have reached the server and nothing received proves
 * it was skipped; otherwise ROLLED_BACK with the first error. */
static void commit_replied(pgs_tx *tx, pgs_conn *c, const PGresult *res, const pgs_error *err)
{
    tx->commit = CM_ANSWERED;
    if (!err) {
        if (strcmp(PQcmdStatus((PGresult *)res), "COMMIT") == 0 && tx->begun &&
            !tx->server_aborted) {
            tx->outcome = PGS_TX_COMMITTED;
            return;
        }
        if (strcmp(PQcmdStatus((PGresult *)res), "COMMIT") == 0) {
            /* A COMMIT in a segment of its own (a shared session's) found no transaction of
             * ours: BEGIN never ran, or what it began was ended already. Nothing committed. */
            tx->outcome = PGS_TX_ROLLED_BACK;
            if (tx->cancel_code != PGS_OK)
                note_failure_code(tx, tx->cancel_code, "the transaction was canceled before it ran");
            note_failure_code(tx, PGS_ESQL, "COMMIT found no transaction: BEGIN did not run");
            return;
        }
        /* COMMIT of a failed transaction "succeeds" with the tag ROLLBACK. */
        tx->outcome = PGS_TX_ROLLED_BACK;
        pgs_error e;
        err_set(&e, PGS_ESQL, "40000", "COMMIT was answered with ROLLBACK: the transaction had failed",
                NULL);
        note_failure(tx, &e);
        return;
    }
    if (err->code == PGS_ESQL) {
        if (is_aborted(res) && tx->cancel_code != PGS_OK) {
            /* Cancelled before COMMIT ran: it was skipped, certain. The connection closes at
             * finish, which ends the failed transaction on the server. */
            tx->outcome = PGS_TX_ROLLED_BACK;
            note_failure_code(tx, tx->cancel_code, "the transaction was canceled before COMMIT ran");
        } else if (is_aborted(res) && tx->share) {
            /* An earlier statement failed: the next segment's opening ROLLBACK ends the
             * failed transaction (a ROLLBACK of ours could land in another's transaction). */
            tx->outcome = PGS_TX_ROLLED_BACK;
            note_failure(tx, err);
        } else if (is_aborted(res)) {
            /* An earlier statement failed: after the sync the session sits in the failed
             * transaction; roll it back (its error is already noted). */
            note_failure(tx, err);
            send_rollback(tx);
        } else if (tx->cancel_code != PGS_OK && strcmp(err->sqlstate, "57014") == 0) {
            /* The cancel request for statements ahead reached COMMIT's pre-commit work. */
            tx->outcome = PGS_TX_ROLLED_BACK;
            note_failure_code(tx, tx->cancel_code,
                              "the transaction was canceled while COMMIT ran, before it committed");
        } else {
            tx->outcome = PGS_TX_ROLLED_BACK; /* COMMIT itself failed (40001, a deferred check) */
            note_failure(tx, err);
        }
        return;
    }
    if (conn_not_run(c) || tx->server_aborted || tx->begin_unrun) {
        /* Never written, or skipped by the server: after an earlier error of its pipeline
         * segment (the pool's reset, a statement of ours), or after the server's FATAL; or
         * (a shared session's COMMIT, in a segment of its own) the server had refused one of
         * the transaction's statements, so COMMIT could only roll back. The closed session
         * takes the transaction with it. */
        tx->outcome = PGS_TX_ROLLED_BACK;
        if (tx->cancel_code != PGS_OK)
            note_failure_code(tx, tx->cancel_code, "the transaction was canceled before COMMIT ran");
        note_failure(tx, err);
        return;
    }
    tx->outcome = PGS_TX_UNKNOWN;
    char msg[sizeof err->message + 160];
    snprintf(msg, sizeof msg,
             "connection lost while COMMIT was in flight; outcome unknown (transaction id %s): %s",
             tx->xid[0]              ? tx->xid
             : tx->opts.resolvable   ? "not known"
                                     : "not read: set pgs_tx_opts.resolvable to resolve it",
             err->message);
    pgs_error e;
    err_set(&e, PGS_ECOMMIT_UNKNOWN, "08007", msg, NULL);
    tx->failed = 1; /* replaces any earlier note: unknown is what the caller must hear */
    tx->err = e;
}

static void tx_op_done(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg)
{
    tx_op *op = arg;
    pgs_tx *tx = op->tx;
    pgs_tx *root = root_of(tx);
    tx->inflight--;
    if (op->kind != K_TXID && op->kind != K_COMMIT)
        root->ahead--;
    if (root->cancel_grace && root->ahead == 0) {
        root->cancel_grace = 0; /* (its statements answered after the cancel: no kill owed) */
        if (root->timer)
            loop_ev_stop(root->timer);
    }
    if (root->victim || (root->batched && root->cancel_code == PGS_OK && skipped(op, res))) {
        /* None of it ran, or what ran is rolled back and nobody has heard of it: a
         * transaction before it in the segment failed. Its callbacks wait for the run again
         * (replay_victim). */
        root->victim = 1;
        free(op);
        progress(tx);
        return;
    }
    pgs_error renamed;
    if (err && op->kind != K_COMMIT && op->kind != K_TXID) {
        int aborted = is_aborted(res);
        int timeout = err->code == PGS_ESQL && strcmp(err->sqlstate, "57014") == 0;
        if (root->cancel_code != PGS_OK && err->code != root->cancel_code &&
            (timeout || aborted || err->code != PGS_ESQL)) {
            /* The server's answer to our cancel request, a statement skipped after it, or the
             * connection the cancel closed (or that failed on the way, the pool's reset ahead
             * of us included): every pending statement hears the cancel's code. */
            char msg[sizeof err->message + 96];
            snprintf(msg, sizeof msg, "%s (%s)",
                     root->cancel_code == PGS_ETIMEDOUT ? "the transaction's time limit passed"
                                                        : "the transaction was canceled",
                     err->message);
            err_set(&renamed, root->cancel_code, err->sqlstate, msg, NULL);
            err = &renamed;
        } else if (timeout && !aborted && tx->opts.statement_timeout_ms > 0) {
            renamed = *err;
            renamed.code = PGS_ETIMEDOUT; /* the server's statement_timeout we set */
            err = &renamed;
        } else if (strcmp(err->sqlstate, "25P02") == 0) {
            /* The server refused it because an earlier statement failed: usually it never
             * sees it (skipped in the same pipeline segment), but after a statement that ran
             * on its own (a COPY) the segment ended. Either way, the error that aborted it. */
            const pgs_tx *first = tx;
            while (first && !first->failed)
                first = first->parent;
            if (first) {
                char msg[sizeof err->message + 64];
                snprintf(msg, sizeof msg, "not run: an earlier statement failed: %s",
                         first->err.message);
                err_set(&renamed, first->err.code, first->err.sqlstate, msg, NULL);
                err = &renamed;
            }
        }
    }
    if (err && res && op->kind != K_COMMIT && op->kind != K_ROLLBACK &&
        (tx == root || op->kind != K_USER) && refused(res))
        root->server_aborted = 1;
    if (!err && root->share && root->cancel_code != PGS_OK && root->commit == CM_NONE &&
        (op->kind == K_USER || op->kind == K_SETUP)) {
        /* Answered after the cancel: the statement ran, but its transaction will not commit,
         * and every pending callback hears the cancel's code (the connection lives on for
         * the transactions that share it). */
        err_set(&renamed, root->cancel_code, NULL,
                root->cancel_code == PGS_ETIMEDOUT ? "the transaction's time limit passed"
                                                   : "the transaction was canceled",
                NULL);
        err = &renamed;
        res = NULL;
    }
    /* The transaction's status as the server now has it, for pgs_conn_txstatus in the
     * callbacks below (libpq learns it only at a sync). On a shared session the owner may be
     * another transaction: the callbacks see their own through the view (tx_view). */
    if (err && op->kind != K_COMMIT && op->kind != K_ROLLBACK)
        root->xact = PQTRANS_INERROR;
    else if (!err && op->kind == K_ROLLBACK_TO)
        root->xact = PQTRANS_INTRANS;
    if (c && conn_owner(c) == root)
        conn_set_xact(c, root->xact);
    switch (op->kind) {
    case K_BEGIN:
        if (tx == root) {
            if (!err)
                root->begun = 1;
            else if (res || (c && conn_not_run(c)))
                root->begin_unrun = 1;
        }
        if (err)
            note_failure(tx, err);
        if (tx->plug && !tx->parent) {
            int plug = tx->plug;
            tx->plug = 0;
            if (tx->conn && !tx_kill_before_commit(tx))
                conn_unplug(tx->conn, plug);
            commit_released(tx);
        }
        if (tx->on_begun) {
            pgs_tx_cb cb = tx->on_begun;
            tx->on_begun = NULL;
            tx_view(root, c, 1);
            cb(tx, err, tx->begun_arg);
            tx_view(root, c, 0);
        }
        break;
    case K_SETUP:
    case K_USER:
        if (err)
            note_failure(tx, err);
        if (op->cb) {
            root->user_fired = 1;
            tx_view(root, c, 1);
            op->cb(c, res, err, op->arg);
            tx_view(root, c, 0);
        }
        break;
    case K_TXID:
        if (!err && res && PQntuples(res) == 1 && !PQgetisnull(res, 0, 0))
            snprintf(tx->xid, sizeof tx->xid, "%s", PQgetvalue(res, 0, 0));
        break;
    case K_COMMIT:
        commit_replied(tx, c, res, err);
        break;
    case K_ROLLBACK:
        /* Rolled back either way (a lost session's transaction dies with it); a body error
         * noted earlier stays the one reported. */
        if (err)
            note_failure(tx, err);
        break;
    case K_RELEASE:
    case K_ROLLBACK_TO:
        if (err) {
            /* The savepoint could not be resolved: the parent cannot commit either. */
            note_failure(tx, err);
            if (tx->outcome == PGS_TX_COMMITTED)
                tx->outcome = PGS_TX_ROLLED_BACK;
            note_failure(tx->parent, err);
        }
        break;
    }
    free(op);
    progress(tx);
}

/* ---- done, from the loop ---- */

void tx_free(pgs_tx *tx)
{
    for (pgs_tx *o = tx->orphans, *next; o; o = next) {
        next = o->next_orphan;
        tx_free(o);
    }
    free_recs(tx);
    loop_ev_free(tx->defer);
    loop_ev_free(tx->timer);
    free(tx);
}

long long tx_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* The tx_begin hook, inside the call that began it (a trace, not a result). */
static void traced_begin(pgs_tx *tx, pgs_conn *conn)
{
    const pgs_hooks *h = conn_hooks(conn);
    if (!h)
        return;
    tx->hooks = h;
    tx->t0_us = tx_now_us();
    if (h->tx_begin)
        h->tx_begin(conn, tx, h->arg);
}

static void fire_done(void *arg, int what)
{
    (void)what;
    pgs_tx *tx = arg;
    if (tx->orphan && tx->parent) {
        /* Its handle stays valid until the parent's done returns (the header's promise): a
         * call on it is refused meanwhile. */
        tx->next_orphan = tx->parent->orphans;
        tx->parent->orphans = tx;
        return;
    }
    fire_unsent(tx);
    if (tx->state != TX_DONE)
        return; /* (only those were due: the transaction goes on) */
    if (tx->victim) {
        if (!victim_expired(tx))
            replay_victim(tx);
        return;
    }
    pgs_tx_result r = {
        .outcome = tx->outcome, .err = NULL, .attempts = tx->share ? tx->share_attempts : 1};
    if (tx->failed && tx->outcome != PGS_TX_COMMITTED)
        r.err = &tx->err; /* (a cancel that came after COMMIT left is no failure if it committed) */
    memcpy(r.xid, tx->xid, sizeof r.xid);
    if (tx->hooks && tx->hooks->tx_end) {
        pgs_tx_result t = r;
        t.attempts = tx->run ? run_attempts(tx->run) : tx->share ? tx->share_attempts : 1;
        tx->hooks->tx_end(conn_of(tx), &t, tx_now_us() - tx->t0_us, tx->hooks->arg);
    }
    if (!tx->orphan && tx->done)
        tx->done(&r, tx->done_arg);
    run *rn = tx->run;
    const tx_share *share = tx->share;
    void *share_arg = tx->share_arg;
    pgs_tx_result copy = r;
    pgs_error e = tx->err;
    copy.err = r.err ? &e : NULL;
    tx_free(tx);
    if (rn)
        run_after(rn, &copy);
    else if (share)
        share->done(share_arg, &copy);
}

/* ---- begin ---- */

static pgs_tx *tx_new(pgs_conn *conn, pgs_tx *parent)
{
    pgs_tx *tx = calloc(1, sizeof *tx);
    if (!tx)
        return NULL;
    tx->conn = parent ? NULL : conn;
    tx->parent = parent;
    tx->state = TX_OPEN;
    tx->xact = PQTRANS_INTRANS;
    tx->defer = loop_ev_new(conn_base(conn), fire_done, tx);
    if (!tx->defer) {
        tx_free(tx);
        return NULL;
    }
    return tx;
}

/* The user closed the connection guard under the transaction (and its run, if any). */
static void conn_freed_under_tx(void *owner)
{
    pgs_tx *tx = owner;
    tx->conn = NULL;
    if (tx->run)
        run_conn_freed(tx->run);
}

/* Can a transaction guard take this connection now? */
int tx_check_conn(pgs_conn *conn)
{
    /* Nothing of the caller's in flight, and no transaction the caller began with a raw
     * BEGIN: a guard only ever commits what it began. */
    return conn_clean(conn) ? PGS_OK : PGS_EMISUSE;
}

int tx_check_opts(const pgs_tx_opts *o)
{
    if (o && (o->isolation < PGS_ISO_DEFAULT || o->isolation > PGS_ISO_SERIALIZABLE ||
              o->statement_timeout_ms < 0 || o->timeout_ms < 0 || o->commit_grace_ms < 0 ||
              o->retries < 0 || o->retry_base_ms < 0 || o->retry_max_ms < 0))
        return PGS_EINVAL;
    return PGS_OK;
}

int arm_timer(pgs_tx *root, int ms)
{
    /* Made when first needed: most transactions never set a time limit nor get cancelled. */
    if (!root->timer) {
        if (!root->conn || !(root->timer = loop_ev_new(conn_base(root->conn), tx_on_timer, root)))
            return -1;
    }
    return loop_ev_timer(root->timer, ms);
}

static void begin_sql(const pgs_tx_opts *o, char *sql, size_t cap)
{
    if (o->isolation == PGS_ISO_DEFAULT && !o->read_only && !o->deferrable) {
        memcpy(sql, "BEGIN", 6); /* (the common case: no formatting on every transaction) */
        return;
    }
    static const char *const iso[] = {"", " ISOLATION LEVEL READ COMMITTED",
                                       " ISOLATION LEVEL REPEATABLE READ",
                                       " ISOLATION LEVEL SERIALIZABLE"};
    snprintf(sql, cap, "BEGIN%s%s%s", iso[o->isolation], o->read_only ? " READ ONLY" : "",
             o->deferrable ? " DEFERRABLE" : "");
}

int begin_root(pgs_conn *conn, const pgs_tx_opts *opts, pgs_tx_cb on_begun, void *arg,
               const tx_share *share, void *share_arg, int attempts, pgs_tx **out)
{
    pgs_tx *tx = tx_new(conn, NULL);
    if (!tx)
        return PGS_ENOMEM;
    if (opts)
        tx->opts = *opts;
    if (tx->opts.commit_grace_ms == 0)
        tx->opts.commit_grace_ms = DEFAULT_COMMIT_GRACE_MS;
    tx->on_begun = on_begun;
    tx->begun_arg = arg;
    tx->share = share;
    tx->share_arg = share_arg;
    tx->share_attempts = attempts;
    tx->rec_tail = &tx->recs;
    if (share) {
        /* The body's statements are kept until it returns: then it is known whether the whole
         * transaction goes out at once (tx_shared.c). */
        tx->recording = 1;
        conn_set_owner(conn, tx, conn_freed_under_tx);
    } else {
        int rc = send_begin(tx);
        if (rc != PGS_OK) {
            tx_free(tx);
            return rc;
        }
    }
    if (tx->opts.timeout_ms > 0) {
        if (arm_timer(tx, tx->opts.timeout_ms) != 0) {
            tx_free(tx);
            return PGS_ENOMEM;
        }
        tx->deadline_us = tx_now_us() + tx->opts.timeout_ms * 1000LL; /* (a replay's limit) */
    }
    *out = tx;
    traced_begin(tx, conn);
    return PGS_OK;
}

int send_begin(pgs_tx *tx)
{
    pgs_conn *conn = tx->conn;
    char sql[96];
    begin_sql(&tx->opts, sql, sizeof sql);
    int rc = send_stmt(tx, K_BEGIN, sql, 0, NULL, STMT, NULL, NULL);
    if (rc != PGS_OK)
        return rc;
    /* From here the transaction counts as open: BEGIN is queued. */
    conn_set_owner(conn, tx, conn_freed_under_tx);
    conn_set_xact(conn, PQTRANS_INTRANS);
    if (tx->opts.begin_alone)
        tx->plug = conn_plug(conn); /* statements wait for BEGIN's reply */
    if (tx->opts.statement_timeout_ms > 0) {
        char ms[16];
        snprintf(ms, sizeof ms, "%d", tx->opts.statement_timeout_ms);
        const char *v[] = {ms};
        send_stmt(tx, K_SETUP, "SELECT set_config('statement_timeout', $1, true)", 1, v, STMT, NULL,
             NULL);
    }
    return PGS_OK;
}

int pgs_tx_begin(pgs_conn *conn, const pgs_tx_opts *opts, pgs_tx_cb on_begun, void *arg,
                 pgs_tx **out)
{
    if (out)
        *out = NULL;
    if (!conn || !out || tx_check_opts(opts) != PGS_OK)
        return PGS_EINVAL;
    int rc = tx_check_conn(conn);
    if (rc != PGS_OK)
        return rc;
    return begin_root(conn, opts, on_begun, arg, NULL, NULL, 1, out);
}

int pgs_tx_savepoint(pgs_tx *parent, pgs_tx_cb on_begun, void *arg, pgs_tx **out)
{
    if (out)
        *out = NULL;
    if (!parent || !out)
        return PGS_EINVAL;
    if (parent->state != TX_OPEN || parent->child)
        return PGS_EMISUSE;
    if (!conn_of(parent))
        return PGS_ECLOSED;
    if (parent->recording)
        emit_alone(parent);
    pgs_tx *tx = tx_new(conn_of(parent), parent);
    if (!tx)
        return PGS_ENOMEM;
    pgs_tx *root = root_of(parent);
    tx->opts = root->opts;
    tx->on_begun = on_begun;
    tx->begun_arg = arg;
    /* Generated, so no user text ever reaches the identifier. */
    snprintf(tx->savepoint, sizeof tx->savepoint, "pgs_sp_%u", ++root->next_savepoint);
    char sql[64];
    snprintf(sql, sizeof sql, "SAVEPOINT %s", tx->savepoint);
    int rc = send_stmt(tx, K_BEGIN, sql, 0, NULL, STMT, NULL, NULL);
    if (rc != PGS_OK) {
        tx_free(tx);
        return rc;
    }
    parent->child = tx;
    *out = tx;
    traced_begin(tx, conn_of(parent));
    return PGS_OK;
}

int pgs_tx_query(pgs_tx *tx, const char *sql, int nparams, const char *const *values,
                 pgs_result_cb cb, void *arg)
{
    if (!tx || !sql || !cb || nparams < 0 || (nparams > 0 && !values))
        return PGS_EINVAL;
    if (tx->state != TX_OPEN || tx->child)
        return PGS_EMISUSE;
    if (tx->recording)
        return record_stmt(tx, sql, nparams, values, cb, arg);
    return send_stmt(tx, K_USER, sql, nparams, values, STMT, cb, arg);
}

/* The end of a child. It waits for its own results (plugging the connection so statements
 * its parent queues meanwhile go after its savepoint is resolved), then decides. */
static void end_child(pgs_tx *tx)
{
    tx->parent->child = NULL;
    tx->parent->children_ending++;
    tx->state = TX_SETTLING;
    tx->plug = conn_of(tx) ? conn_plug(conn_of(tx)) : 0;
    root_of(tx)->settling++;
    progress(tx);
}

static void end_tx(pgs_tx *tx, int ok)
{
    tx->ok = ok;
    if (tx->child) {
        /* Out of order: roll the child back, then this scope too; nothing commits. */
        pgs_tx *child = tx->child;
        child->orphan = 1;
        note_failure_code(child, PGS_EMISUSE, "its parent ended while it was still open");
        end_tx(child, 0);
        note_failure_code(tx, PGS_EMISUSE,
                          "ended while a savepoint child was still open: both rolled back");
    }
    if (tx->parent) {
        end_child(tx);
    } else if (tx->recording) {
        tx->state = TX_ENDING; /* the end goes out with the body's statements */
        tx->end_owed = 1;
    } else {
        end_root(tx);
    }
}

int pgs_tx_end(pgs_tx *tx, int ok, pgs_tx_done_cb done, void *arg)
{
    if (!tx)
        return PGS_EINVAL;
    if (tx->state != TX_OPEN || tx->orphan)
        return PGS_EMISUSE;
    tx->done = done;
    tx->done_arg = arg;
    end_tx(tx, ok);
    progress(tx);
    return PGS_OK;
}

void tx_attach_run(pgs_tx *tx, run *r)
{
    tx->run = r;
}

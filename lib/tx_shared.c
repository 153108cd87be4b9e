/* Transactions on a shared session (the pool's multiplexed mode). The body's statements are
 * kept until it returns. A body that ended its transaction goes out whole, BEGIN to COMMIT,
 * into the pipeline segment of those before it in the same loop turn; the batch's last COMMIT
 * goes in a segment of its own: two writes and syncs for the whole batch. An error makes the
 * server skip the rest of the segment, so a transaction whose BEGIN was skipped never ran: it
 * is sent again (a "victim"), its callbacks untouched. The last COMMIT, alone, ends a
 * transaction the error left aborted (answering ROLLBACK), so the session is idle after each
 * batch. A body that waits for a result starts a segment of its own and owns the session until
 * its end, which also goes alone. Part of the transaction layer (tx_private.h), on conn.h. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tx_private.h"

/* After this many runs again a victim goes out alone, first in its segment, where nothing can
 * skip its BEGIN. */
enum { MAX_REPLAYS = 8 };

typedef struct tx_rec {
    struct tx_rec *next;
    pgs_result_cb cb;
    void *arg;
    int nparams;
    int unsent; /* could not be sent: its callback hears why (fire_unsent) */
    char **v;   /* the values, then the text (conn_copy_statement) */
} tx_rec;

void free_recs(pgs_tx *tx)
{
    for (tx_rec *r = tx->recs, *next; r; r = next) {
        next = r->next;
        free(r->v);
        free(r);
    }
    tx->recs = NULL;
    tx->rec_tail = &tx->recs;
}

int record_stmt(pgs_tx *tx, const char *sql, int nparams, const char *const *values,
                pgs_result_cb cb, void *arg)
{
    tx_rec *r = calloc(1, sizeof *r);
    if (!r || !(r->v = conn_copy_statement(sql, nparams, values))) {
        free(r);
        return PGS_ENOMEM;
    }
    r->cb = cb;
    r->arg = arg;
    r->nparams = nparams;
    *tx->rec_tail = r;
    tx->rec_tail = &r->next;
    return PGS_OK;
}

/* The callbacks of statements that could not be sent, with the transaction's failure: from
 * the loop (the tx's done event, first). */
void fire_unsent(pgs_tx *tx)
{
    for (tx_rec *r = tx->recs; r; r = r->next) {
        if (!r->unsent)
            continue;
        r->unsent = 0;
        pgs_error e = tx->err;
        /* NULL when it is on no connection: waiting to run again, or its guard freed */
        tx_view(tx, tx->conn, 1);
        r->cb(tx->conn, NULL, &e, r->arg);
        tx_view(tx, tx->conn, 0);
    }
}

static void send_owed_end(pgs_tx *tx, int alone)
{
    tx->end_owed = 0;
    tx->end_alone = alone;
    end_root(tx);
    progress(tx);
}

/* Send the recorded transaction: batched (its end with it, behind what is in the segment) or
 * alone (a segment of its own). */
static void emit(pgs_tx *tx, int batched)
{
    pgs_conn *c = tx->conn;
    pgs_tx *before = tx->before;
    tx->before = NULL;
    if (before) /* into this segment when this one joins it, else alone */
        send_owed_end(before, !batched);
    tx->recording = 0;
    tx->batched = batched;
    tx->end_alone = !batched;
    int rc = c ? PGS_OK : PGS_ECLOSED;
    if (rc == PGS_OK && !batched && !conn_segment_fresh(c))
        rc = conn_sync(c, 0); /* nothing before it in its segment can skip its BEGIN */
    if (rc == PGS_OK)
        rc = send_begin(tx);
    int accepted = rc == PGS_OK; /* its BEGIN may reach the server */
    if (rc != PGS_OK)
        note_unsent(tx, "BEGIN", rc);
    for (tx_rec *r = tx->recs; r; r = r->next) {
        if (rc == PGS_OK) {
            rc = send_stmt(tx, K_USER, r->v[r->nparams], r->nparams, (const char *const *)r->v,
                           STMT, r->cb, r->arg);
            if (rc != PGS_OK)
                note_unsent(tx, "a statement", rc);
        }
        r->unsent = rc != PGS_OK;
    }
    if (rc != PGS_OK) {
        /* The connection is gone (or memory): nothing of it runs. Its callbacks hear of it
         * from the loop, before its done. The end carried in for the one before it must not
         * wait for a sync that nothing of this one will bring. */
        if (accepted && c && conn_ready(c))
            /* Part of it went (memory ran out): a session left in its open transaction
             * would commit it with the next one's COMMIT. */
            conn_kill(c, PGS_ECONN,
                      "the connection was closed: a transaction could not be sent whole", 1);
        else if (before && batched && c && conn_ready(c))
            conn_sync(c, 0);
        tx->outcome = PGS_TX_ROLLED_BACK;
        tx->batched = 0;
        if (tx->end_owed) {
            tx->end_owed = 0;
            tx->state = TX_ENDING;
            end_queued(tx);
        }
        if (tx->state == TX_ENDING) {
            progress(tx);
            return;
        }
        /* A body still open may wait for them: tell them now, from the loop (its done event,
         * which fires only them while the transaction is not done). */
        loop_ev_post(tx->defer);
        return;
    }
    if (!batched)
        free_recs(tx);
    /* A batched one's end waits: the next transaction on the session carries it into the same
     * segment (tx_carry_on), or the batch's last end goes in a segment of its own (tx_seal). */
    if (tx->end_owed && !batched) {
        tx->end_owed = 0;
        end_root(tx);
    }
    progress(tx);
}

int tx_carried(const pgs_tx *tx)
{
    return tx->batched && tx->end_owed;
}

void tx_seal(pgs_tx *tx)
{
    send_owed_end(tx, 1);
}

void emit_alone(pgs_tx *tx)
{
    emit(tx, 0);
}

void tx_body_returned(pgs_tx *tx)
{
    if (!tx->recording)
        return; /* sent already (before a savepoint, a bulk statement or a cancel) */
    emit(tx, tx->end_owed && !tx->opts.begin_alone && tx->replays < MAX_REPLAYS);
}

void tx_view(pgs_tx *root, pgs_conn *c, int on)
{
    if (root->share && c)
        conn_set_xact_view(c, on ? root->xact : -1);
}

void tx_call_body(pgs_tx *tx, pgs_tx_body body, void *arg)
{
    tx_view(tx, tx->conn, 1);
    body(tx, arg);
    tx_view(tx, conn_of(tx), 0);
    tx_body_returned(tx);
}

void end_queued(pgs_tx *tx)
{
    if (!tx->share)
        return;
    if (tx->conn && conn_owner(tx->conn) == tx) {
        conn_set_owner(tx->conn, NULL, NULL);
        conn_set_xact(tx->conn, -1);
    }
    tx->share->ended(tx->share_arg);
}

int tx_begin_shared(pgs_conn *conn, const pgs_tx_opts *opts, const tx_share *share, void *arg,
                    int attempts, pgs_tx *before, pgs_tx **out)
{
    *out = NULL;
    if (tx_check_opts(opts) != PGS_OK)
        return PGS_EINVAL;
    if (!conn_between(conn, before))
        return conn_ready(conn) ? PGS_EMISUSE : PGS_ECONN;
    conn_set_shared(conn);
    int rc = begin_root(conn, opts, NULL, NULL, share, arg, attempts, out);
    if (rc == PGS_OK)
        (*out)->before = before;
    return rc;
}

/* From its done event: none of it ran. Back to the pool's queue, as it was when its body
 * returned (its statements kept, its end owed). */
void replay_victim(pgs_tx *tx)
{
    tx->victim = 0;
    tx->user_fired = 0;
    tx->replays++;
    tx->conn = NULL;
    tx->state = TX_ENDING;
    tx->failed = 0;
    tx->outcome = 0;
    tx->commit = CM_NONE;
    tx->server_aborted = 0;
    tx->begun = tx->begin_unrun = 0;
    tx->xact = PQTRANS_INTRANS;
    tx->in_grace = 0;
    tx->ahead = 0;
    tx->xid[0] = '\0';
    tx->waiting_replay = 1;
    if (tx->deadline_us) {
        /* Its time limit runs on while it waits and runs again (tx_on_timer: drop_waiting). */
        long long left = tx->deadline_us - tx_now_us();
        if (left < 1000 || arm_timer(tx, (int)(left / 1000)) != 0)
            arm_timer(tx, 0);
    }
    tx->share->again(tx->share_arg);
}

int victim_expired(pgs_tx *tx)
{
    pgs_code code = tx->cancel_code;
    if (code == PGS_OK && tx->deadline_us && tx_now_us() >= tx->deadline_us)
        code = PGS_ETIMEDOUT;
    if (code == PGS_OK)
        return 0;
    tx->victim = 0;
    tx_abandon(tx, code,
               code == PGS_ETIMEDOUT ? "not run: the transaction's time limit passed"
                                     : "not run: the transaction was canceled");
    return 1;
}

void drop_waiting(pgs_tx *root, pgs_code code)
{
    root->cancel_code = code;
    root->waiting_replay = 0;
    root->share->dropped(root->share_arg);
    tx_abandon(root, code,
               code == PGS_ETIMEDOUT
                   ? "not run: the transaction's time limit passed while it waited to run again"
                   : "not run: the transaction was canceled while it waited to run again");
}

int tx_replay(pgs_tx *tx, pgs_conn *conn, pgs_tx *before)
{
    if (!conn_between(conn, before))
        return conn_ready(conn) ? PGS_EMISUSE : PGS_ECONN;
    conn_set_shared(conn);
    tx->conn = conn;
    tx->before = before;
    tx->waiting_replay = 0;
    conn_set_owner(conn, tx, NULL);
    tx->end_owed = 1;
    tx->recording = 1;
    tx_body_returned(tx);
    return PGS_OK;
}

void tx_abandon(pgs_tx *tx, pgs_code code, const char *msg)
{
    tx->waiting_replay = 0;
    if (tx->timer)
        loop_ev_stop(tx->timer);
    note_failure_code(tx, code, msg);
    tx->outcome = PGS_TX_ROLLED_BACK;
    for (tx_rec *r = tx->recs; r; r = r->next)
        r->unsent = 1;
    tx->state = TX_DONE;
    loop_ev_post(tx->defer);
}

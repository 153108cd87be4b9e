/* Cancel and time limits of transaction guards: pgs_tx_cancel, the whole-transaction timeout
 * and the grace a COMMIT already sent gets for its reply. On its own session a cancel closes
 * the connection; on a shared one (the pool's multiplexed mode) the others' transactions run to
 * their end. Part of the transaction layer (tx_private.h), on conn.h. */
#include "tx_private.h"

/* kill_tx on a shared session: the others' transactions on it must not pay for this one more
 * than the cancel request itself costs (see the header's multiplexed rules). */
static void kill_shared(pgs_tx *root, pgs_code code)
{
    const char *msg = code == PGS_ETIMEDOUT ? "the transaction's time limit passed"
                                            : "the transaction was canceled";
    /* (A COMMIT held behind a plug, its BEGIN's or a savepoint's, never leaves now: the
     * connection is closed when that plug is pulled, once what is ahead of it was answered,
     * so the others' transactions ahead end exactly: tx_kill_before_commit.) */
    note_failure_code(root, code, msg);
    if (root->ahead > 0) {
        /* Its statements are out: stop the one running (it may be a neighbour's, which then
         * rolls back with 57014), and never reuse the session (the request may land later). */
        conn_cancel_request(root->conn);
        conn_spoil(root->conn);
        /* Their replies are owed within the grace; a network that stalls would hold them, and
         * every transaction on the session, for ever: then the connection is closed. */
        root->cancel_grace = 1;
        if (arm_timer(root, root->opts.commit_grace_ms) != 0) /* (no memory: no wait) */
            tx_on_timer(root, 0);
    }
}

int tx_kill_before_commit(pgs_tx *root)
{
    if (!root->share || root->cancel_code == PGS_OK || root->commit != CM_HELD ||
        root->settling > 0 || root->plug || !root->conn)
        return 0;
    conn_kill(root->conn, PGS_ECONN,
              "the connection was closed: a transaction sharing it was canceled before its "
              "COMMIT left",
              0); /* (nothing runs: all ahead is answered, all behind is held) */
    return 1;
}

static void kill_tx(pgs_tx *root, pgs_code code)
{
    if (root->waiting_replay) {
        drop_waiting(root, code);
        return;
    }
    root->cancel_code = code;
    if (root->victim)
        return; /* skipped whole: nothing of it runs, and it is not sent again */
    /* A COMMIT held behind a plug has not left: cancel as if not sent (the closed connection
     * makes its rollback certain). */
    if (root->commit == CM_SENT) {
        /* COMMIT is never cancelled. Statements still ahead of it are: the server's replies
         * then show whether COMMIT ran or was skipped. Either way wait a bounded grace for
         * its reply, which tells the truth; without one the outcome is unknown. */
        root->in_grace = 1;
        if (root->ahead > 0 && root->conn) {
            conn_cancel_request(root->conn);
            if (root->share)
                conn_spoil(root->conn);
        }
        if (arm_timer(root, root->opts.commit_grace_ms) != 0) /* (no memory: no wait) */
            tx_on_timer(root, 0);
        return;
    }
    if (root->share && root->conn) {
        kill_shared(root, code);
        return;
    }
    const char *msg = code == PGS_ETIMEDOUT
                          ? "the transaction's time limit passed; the connection is closed"
                          : "the transaction was canceled; the connection is closed";
    if (root->conn)
        conn_kill(root->conn, code, msg, 1);
}

void tx_on_timer(void *arg, int what)
{
    (void)what;
    pgs_tx *root = arg;
    if (root->cancel_grace) {
        if (root->conn)
            conn_kill(root->conn, PGS_ECONN,
                      "no reply within the grace period after a transaction sharing the "
                      "connection was canceled",
                      0);
        return;
    }
    if (root->in_grace) {
        /* No reply to COMMIT within the grace: close without a cancel request (it could hit
         * the commit itself); the COMMIT then reports PGS_ECOMMIT_UNKNOWN. */
        if (root->conn)
            conn_kill(root->conn, PGS_ECONN, "no reply to COMMIT within the grace period", 0);
        return;
    }
    kill_tx(root, PGS_ETIMEDOUT);
}

int pgs_tx_cancel(pgs_tx *tx)
{
    if (!tx)
        return PGS_EINVAL;
    pgs_tx *root = root_of(tx);
    if ((root->waiting_replay || root->victim) && root->cancel_code == PGS_OK) {
        kill_tx(root, PGS_ECANCELED); /* skipped whole: it is not sent again */
        return PGS_OK;
    }
    if (root->cancel_code != PGS_OK || root->state == TX_DONE || !root->conn ||
        !conn_ready(root->conn))
        return PGS_EMISUSE;
    if (root->recording)
        emit_alone(root); /* (its body cancels it before it returned) */
    kill_tx(root, PGS_ECANCELED);
    return PGS_OK;
}

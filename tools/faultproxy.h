/* faultproxy: a loopback TCP proxy between a PostgreSQL client and server that injects real
 * network faults, for the test suites and the soak (tools/soak.c). It runs on a thread of its
 * own with its own libevent base (bufferevents), so the caller's loop never sees its events,
 * and it listens on 127.0.0.1 only. It reads the client's protocol messages (v3: startup,
 * then type byte + length) so that it can act at the message that holds COMMIT: a simple
 * Query whose text is COMMIT (or END, COMMIT AND NO CHAIN; case and white space ignored), or
 * an Execute of a portal bound (Bind) to a statement prepared (Parse) with such a text, named
 * or unnamed. TLS (SSLRequest) and GSSAPI encryption are refused with 'N' so the client speaks
 * plain text to it. Not part of the library: it knows nothing of pgscope.
 * Every function is thread-safe (never call one from the proxy's own thread: none of its code
 * calls back into yours), and each control call has taken effect when it returns: a call that
 * stalls, say, holds every byte the client sends after it (bytes it had already forwarded
 * still go out). COMMIT WORK / TRANSACTION and COMMIT AND CHAIN count as COMMIT too. */
#ifndef PGS_FAULTPROXY_H
#define PGS_FAULTPROXY_H

typedef struct fp_proxy fp_proxy;

/* Start a proxy to 127.0.0.1:target_port on a free loopback port. NULL on failure. */
fp_proxy *fp_start(int target_port);
/* Its port. */
int fp_port(const fp_proxy *p);
/* Close every connection, stop the thread, free. */
void fp_stop(fp_proxy *p);

/* Cut every connection open now: both sockets closed at once, as a network failure would. */
void fp_cut(fp_proxy *p);
/* Cut every connection open now after `ms` milliseconds (a one-shot timer). */
void fp_cut_after_ms(fp_proxy *p, int ms);
/* Each connection (open now or new) is cut once `bytes` more bytes have gone client to server
 * from now on (for a new one, its startup packet counts): exactly that many reach the server
 * (the rest of the chunk that crosses the mark is dropped), then its side closes; the client
 * side closes at once. <= 0: off, for every connection. */
void fp_cut_after_bytes(fp_proxy *p, long bytes);
/* Stall: stop forwarding in both directions without closing (a network that hangs; the
 * sockets stay open, so only the client's own deadlines end the wait). on = 0 resumes and
 * forwards what was held. */
void fp_stall(fp_proxy *p, int on);
/* Half-open: stop forwarding the server's replies only (the client's messages still reach the
 * server). on = 0 resumes, and also releases the replies a FP_COMMIT_STALL_AFTER holds. */
void fp_stall_replies(fp_proxy *p, int on);
/* Slow drip of the server's replies: at most `bytes` every `every_ms` ms. bytes <= 0: off. */
void fp_drip(fp_proxy *p, int bytes, int every_ms);

/* What to do at the client message that holds a COMMIT, for the next `count` COMMITs seen on
 * any connection (count <= 0: every one until set again; FP_COMMIT_PASS ends it). */
typedef enum fp_commit_fault {
    FP_COMMIT_PASS = 0,
    /* The message is dropped and the connection cut: the server never sees COMMIT (so it
     * rolls the transaction back), though the client wrote it. */
    FP_COMMIT_CUT_BEFORE,
    /* The message reaches the server, then the connection is cut before any reply to it
     * reaches the client: the server commits; the client cannot know. */
    FP_COMMIT_CUT_AFTER,
    /* The message reaches the server, and from then on no reply reaches the client, without
     * closing (stall after commit: the client's grace or timeout must end the wait). */
    FP_COMMIT_STALL_AFTER,
} fp_commit_fault;
/* With replies_before = 1, the server's replies to what came before COMMIT still reach the
 * client before the fault (so an id read before COMMIT with its own flush request arrives);
 * with 0, the fault takes effect at once. The rule: the proxy follows which client messages
 * the server owes an answer (Parse, Bind, Describe, Execute, Close, Sync, Query, FunctionCall)
 * and which backend message ends each answer (ParseComplete ..., CommandComplete, an error,
 * which also ends the answers the server then skips up to the Sync, ReadyForQuery); it lets
 * replies through exactly up to the end of the answer to the last message before COMMIT (for
 * FP_COMMIT_CUT_BEFORE: to the last one up to the last Flush, Sync or Query ahead of it, since
 * the server sends nothing later without COMMIT's own Sync), waiting for them at most 1 s.
 * FP_COMMIT_CUT_AFTER also forwards the rest of the write that holds COMMIT (its Sync), drops
 * whatever the client sends later, and keeps the server's side open, reading and dropping its
 * replies, until COMMIT is answered (at most 5 s), so the server commits rather than hearing
 * of a lost client halfway. A FP_COMMIT_STALL_AFTER holds the replies until the connection
 * closes or fp_stall_replies(p, 0). */
void fp_on_commit(fp_proxy *p, fp_commit_fault what, int count, int replies_before);

/* Round trips: bursts of client-to-server data, each one started after the server last sent
 * something (or first). For tests that count round trips on the wire. */
int fp_turns(fp_proxy *p);
void fp_reset_turns(fp_proxy *p);

/* What it saw and did. */
typedef struct fp_counts {
    long connections; /* accepted */
    long open;        /* open now */
    long cuts;        /* connections it cut (any fault) */
    long commits;     /* client messages holding COMMIT seen */
    long commit_faults; /* of those, how many a fp_on_commit fault hit */
    long bytes_up;    /* forwarded client to server */
    long bytes_down;  /* forwarded server to client */
} fp_counts;
void fp_get_counts(fp_proxy *p, fp_counts *out);

#endif

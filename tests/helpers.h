/* Shared test fixtures: the server under test, a blocking observer connection, a loop that
 * must drain on its own, descriptor counting, and waiting helpers. One copy for every suite. */
#ifndef PGS_TEST_HELPERS_H
#define PGS_TEST_HELPERS_H

#include <check.h>
#include <event2/event.h>
#include <libpq-fe.h>

#include "pgscope.h"

/* The conninfo of the server under test (PGSCOPE_TEST_CONNINFO, set by tests/with-server.sh
 * or the user), with `extra` keyword=value pairs appended (later keywords win). Static buffer. */
const char *th_conninfo(const char *extra);
/* One value of the conninfo ("port", "password", ...), static buffer, "" when absent. */
const char *th_conninfo_value(const char *keyword);

/* A new loop for one test; records the open descriptors so th_loop_end can prove none leaked. */
struct event_base *th_loop_begin(void);
/* Run the loop until nothing is left, assert it drained on its own (no timer or socket event
 * leaked), free it, and assert every descriptor opened since th_loop_begin is closed. */
void th_loop_end(struct event_base *base);
/* Run the loop until *flag is non-zero (or fail the test after `seconds`). */
void th_run_until(struct event_base *base, const int *flag, double seconds);

/* Open a guard and run the loop until it is up (fails the test otherwise). */
pgs_conn *th_open(struct event_base *base, const pgs_conn_opts *opts);
pgs_conn *th_open_at(struct event_base *base, const char *conninfo, const pgs_conn_opts *opts);
/* Close a guard and run the loop until done fired (exactly once). */
void th_close(struct event_base *base, pgs_conn *c);

/* The blocking observer: a separate plain libpq connection that checks what the server holds.
 * Returns the first column of the first row as a malloc'd string (NULL for SQL NULL or no
 * row); fails the test on an error. */
char *th_scalar(const char *sql, int nparams, const char *const *values);
/* th_scalar as a number. */
long th_scalar_long(const char *sql, int nparams, const char *const *values);
/* on = 1: th_scalar (and what uses it) keeps one observer connection for every call, where a
 * test makes many (connecting costs more than the query); on = 0 closes it. Both calls on the
 * same side of th_loop_begin / th_loop_end, so the descriptor count holds. */
void th_observer_keep(int on);
/* Poll until the backend with this pid is gone from pg_stat_activity (or fail after seconds). */
void th_wait_backend_gone(int pid, double seconds);

/* pg_terminate_backend(pid) from the observer (fails the test unless it answered true). */
void th_terminate(int pid);
/* Another session that holds a lock on `table` (schema-qualified if need be, already escaped)
 * in `mode` ("ACCESS EXCLUSIVE", ...) inside an open transaction, until th_unlock. */
PGconn *th_lock_table(const char *table, const char *mode);
void th_unlock(PGconn *blocker);
/* Run the loop for about `seconds` (whatever fires meanwhile). */
void th_run_for(struct event_base *base, double seconds);

/* A statement that fails as a conflicting serializable transaction would (SQLSTATE 40001). */
#define TH_SERIALIZATION_FAILURE                                                                   \
    "DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = 'serialization_failure'; END $$"
/* A pgs_result_cb that remembers the connection it ran on in th_seen_conn. */
extern pgs_conn *th_seen_conn;
void th_note_conn(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg);
/* Run the loop until *done, or until th_seen_conn is set and its session is idle again (a
 * transaction that ran there has ended: a retry's backoff runs). */
void th_run_until_idle_or(struct event_base *base, const int *done);

/* A record of one statement's callback: how often it fired, in which order, what it got. */
typedef struct th_call {
    int fired;
    int seq; /* th_fire_seq when it fired */
    pgs_code code;
    char sqlstate[6];
    char message[512];
    char value[256]; /* first column of the first row */
    int ntuples;
    double at;
} th_call;
extern int th_fire_seq;
/* A pgs_result_cb that fills the th_call given as arg. */
void th_record(pgs_conn *c, const PGresult *res, const pgs_error *err, void *arg);
/* An acquire's record (its pgs_conn_cb is th_on_got): how often it fired, in which order, the
 * guard it got, or its error. */
typedef struct th_got {
    int fired;
    int seq; /* th_fire_seq when it fired */
    pgs_conn *conn;
    pgs_code code;
    char sqlstate[6];
    char message[512];
    double at;
} th_got;
void th_on_got(pgs_conn *conn, const pgs_error *err, void *arg);
/* An on_open's record: how often it fired, whether it was up, its error, when. */
typedef struct th_open_rec {
    int fired;
    int ok;
    pgs_error err;
    double at;
} th_open_rec;
/* A pgs_conn_cb that fills the th_open_rec given as arg. */
void th_on_open(pgs_conn *c, const pgs_error *err, void *arg);
/* A pgs_done_cb that counts into the int given as arg. */
void th_count_done(void *arg);
/* The backend pid of a connected guard. */
int th_backend_pid(pgs_conn *c);

/* Monotonic seconds. */
double th_now(void);
int th_count_fds(void);

/* A loopback TCP listener that accepts connections into its backlog and never answers.
 * Returns the listening fd; *port gets its port. */
int th_silent_listener(int *port);
/* A loopback port with nothing listening on it. */
int th_closed_port(void);

/* Build and run a Check suite; returns the process exit status. */
int th_run_suite(Suite *s);

/* A transaction's end as a pgs_tx_done_cb (th_record_tx) records it. */
typedef struct th_txdone {
    int fired;
    pgs_tx_outcome outcome;
    int has_err;
    pgs_error err;
    char xid[48];
    int attempts;
    double at;
} th_txdone;
void th_record_tx(const pgs_tx_result *r, void *arg);
/* A fresh table `name` (id int PRIMARY KEY, v text), made by the observer. */
void th_fresh_table(const char *name);
/* SELECT count(*) FROM table, by the observer. */
long th_rows(const char *table);
/* pgs_tx_resolve on a fresh connection, asked again while the server says IN_PROGRESS (fails
 * the test on an error, or when it stays in progress for 5 s). */
pgs_txid_status th_resolve(struct event_base *base, const char *xid);

/* A loopback TCP proxy in front of the server (a thread of the test process), for real
 * network faults and for counting round trips on the wire: the fault proxy of
 * tools/faultproxy.h itself, so a test may also call its fp_* functions on it. */
typedef struct fp_proxy th_proxy;
/* Proxy to 127.0.0.1:target_port; listens on a free loopback port. */
th_proxy *th_proxy_start(int target_port);
int th_proxy_port(th_proxy *p);
/* A conninfo through the proxy: the server's conninfo with host/port replaced. Static buffer. */
const char *th_proxy_conninfo(th_proxy *p);
/* Cut every connection now (both sides closed), as a network failure would. */
void th_proxy_cut(th_proxy *p);
/* Stop forwarding (both directions) without closing: a network that stalls. */
void th_proxy_stall(th_proxy *p, int on);
/* Round trips: bursts of client-to-server data, each one started after the server last sent
 * something (or first). */
int th_proxy_turns(th_proxy *p);
void th_proxy_reset_turns(th_proxy *p);
void th_proxy_stop(th_proxy *p);

#endif

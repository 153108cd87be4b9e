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
/* Close a guard and run the loop until done fired (exactly once). */
void th_close(struct event_base *base, pgs_conn *c);

/* The blocking observer: a separate plain libpq connection that checks what the server holds.
 * Returns the first column of the first row as a malloc'd string (NULL for SQL NULL or no
 * row); fails the test on an error. */
char *th_scalar(const char *sql, int nparams, const char *const *values);
/* th_scalar as a number. */
long th_scalar_long(const char *sql, int nparams, const char *const *values);
/* Poll until the backend with this pid is gone from pg_stat_activity (or fail after seconds). */
void th_wait_backend_gone(int pid, double seconds);

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

#endif

/* Read routing (pgs_router) against a real primary and a streaming hot standby
 * (tests/with-standby.sh): read-only transactions on the standby while its replay lag is
 * within the bound, the rest on the primary, and reads back on the primary when the standby
 * lags (replay paused) or cannot be reached. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "helpers.h"

/* A blocking session on the standby, for what the test does there by hand. */
static PGconn *standby_session(void)
{
    PGconn *pg = PQconnectdb(getenv("PGSCOPE_STANDBY_CONNINFO"));
    ck_assert_msg(PQstatus(pg) == CONNECTION_OK, "standby: %s", PQerrorMessage(pg));
    return pg;
}

static void standby_exec(PGconn *pg, const char *sql)
{
    PGresult *res = PQexec(pg, sql);
    ck_assert_msg(PQresultStatus(res) == PGRES_TUPLES_OK || PQresultStatus(res) == PGRES_COMMAND_OK,
                  "%s: %s", sql, PQresultErrorMessage(res));
    PQclear(res);
}

/* Where a transaction ran: its body reads pg_is_in_recovery() and commits. */
typedef struct where {
    th_call k;
    th_txdone d;
} where;

static void where_body(pgs_tx *tx, void *arg)
{
    where *w = arg;
    memset(&w->k, 0, sizeof w->k);
    ck_assert_int_eq(pgs_tx_query(tx, "SELECT pg_is_in_recovery()::text", 0, NULL, th_record,
                                  &w->k),
                     PGS_OK);
    ck_assert_int_eq(pgs_tx_end(tx, 1, NULL, NULL), PGS_OK);
}

static void where_done(const pgs_tx_result *res, void *arg)
{
    th_record_tx(res, &((where *)arg)->d);
}

/* Run one transaction through the router; returns 1 when it ran on the standby. */
static int run_where(struct event_base *b, pgs_router *r, int read_only)
{
    where w = {0};
    pgs_tx_opts o = {.read_only = read_only};
    ck_assert_int_eq(pgs_router_run_tx(r, &o, where_body, where_done, &w), PGS_OK);
    th_run_until(b, &w.d.fired, 15);
    ck_assert_msg(w.d.outcome == PGS_TX_COMMITTED, "outcome %d: %s", w.d.outcome,
                  w.d.err.message);
    ck_assert_int_eq(w.k.fired, 1);
    return strcmp(w.k.value, "true") == 0;
}

/* Run the loop until the router's lag satisfies `ok` (or fail after `seconds`). */
static long wait_lag(struct event_base *b, pgs_router *r, int (*ok)(long), double seconds)
{
    double until = th_now() + seconds;
    while (!ok(pgs_router_lag_ms(r))) {
        ck_assert_msg(th_now() < until, "lag stayed at %ld ms", pgs_router_lag_ms(r));
        th_run_for(b, 0.05);
    }
    return pgs_router_lag_ms(r);
}

static int lag_known_small(long lag)
{
    return lag >= 0 && lag <= 300;
}

static int lag_over_bound(long lag)
{
    return lag > 300;
}

static int lag_unknown(long lag)
{
    return lag < 0;
}

typedef struct pools {
    pgs_pool *primary, *standby;
    int closed;
} pools;

static void pool_closed(void *arg)
{
    ++*(int *)arg;
}

static void pools_open(struct event_base *b, pools *p, const char *standby_ci)
{
    pgs_pool_opts o = {.max_size = 2, .acquire_timeout_ms = 3000};
    ck_assert_int_eq(pgs_pool_new(b, th_conninfo(NULL), &o, &p->primary), PGS_OK);
    ck_assert_int_eq(pgs_pool_new(b, standby_ci, &o, &p->standby), PGS_OK);
}

static void pools_close(struct event_base *b, pools *p)
{
    ck_assert_int_eq(pgs_pool_close(p->primary, pool_closed, &p->closed), PGS_OK);
    ck_assert_int_eq(pgs_pool_close(p->standby, pool_closed, &p->closed), PGS_OK);
    while (p->closed < 2)
        th_run_for(b, 0.05);
}

START_TEST(test_reads_go_to_the_standby_and_writes_to_the_primary)
{
    struct event_base *b = th_loop_begin();
    pools p = {0};
    pools_open(b, &p, getenv("PGSCOPE_STANDBY_CONNINFO"));
    pgs_router_opts ro = {.max_lag_ms = 300, .lag_check_ms = 100};
    pgs_router *r = NULL;
    ck_assert_int_eq(pgs_router_new(b, p.primary, p.standby, &ro, &r), PGS_OK);
    /* before the first measurement the lag is not known: reads go to the primary */
    ck_assert_int_eq(pgs_router_lag_ms(r), -1);
    ck_assert_ptr_eq(pgs_router_pick(r, &(pgs_tx_opts){.read_only = 1}), p.primary);
    ck_assert_int_eq(run_where(b, r, 1), 0);
    wait_lag(b, r, lag_known_small, 10);
    ck_assert_int_eq(run_where(b, r, 1), 1); /* read-only: the standby */
    ck_assert_int_eq(run_where(b, r, 0), 0); /* read-write: the primary */
    ck_assert_ptr_eq(pgs_router_pick(r, NULL), p.primary);
    ck_assert_int_eq(pgs_router_free(r), PGS_OK);
    pools_close(b, &p);
    th_loop_end(b);
}
END_TEST

START_TEST(test_reads_go_to_the_primary_while_the_standby_lags_past_the_bound)
{
    th_fresh_table("route_lag");
    struct event_base *b = th_loop_begin();
    pools p = {0};
    pools_open(b, &p, getenv("PGSCOPE_STANDBY_CONNINFO"));
    pgs_router_opts ro = {.max_lag_ms = 300, .lag_check_ms = 100};
    pgs_router *r = NULL;
    ck_assert_int_eq(pgs_router_new(b, p.primary, p.standby, &ro, &r), PGS_OK);
    wait_lag(b, r, lag_known_small, 10);
    /* the standby stops replaying; the primary goes on writing */
    PGconn *sb = standby_session();
    standby_exec(sb, "SELECT pg_wal_replay_pause()");
    for (int i = 0; i < 5; i++) {
        char sql[96];
        snprintf(sql, sizeof sql, "INSERT INTO route_lag VALUES (%d, 'x')", i);
        free(th_scalar(sql, 0, NULL));
        th_run_for(b, 0.1);
    }
    long lag = wait_lag(b, r, lag_over_bound, 10);
    ck_assert_msg(lag > 300, "lag %ld", lag);
    ck_assert_int_eq(run_where(b, r, 1), 0); /* read-only, but the standby lags: the primary */
    /* replay again: the lag falls and reads go back to the standby */
    standby_exec(sb, "SELECT pg_wal_replay_resume()");
    PQfinish(sb);
    wait_lag(b, r, lag_known_small, 10);
    ck_assert_int_eq(run_where(b, r, 1), 1);
    ck_assert_int_eq(pgs_router_free(r), PGS_OK);
    pools_close(b, &p);
    th_loop_end(b);
}
END_TEST

START_TEST(test_reads_go_to_the_primary_while_the_standby_cannot_be_reached)
{
    char ci[128];
    snprintf(ci, sizeof ci, "host=127.0.0.1 port=%d user=x dbname=x", th_closed_port());
    struct event_base *b = th_loop_begin();
    pools p = {0};
    pools_open(b, &p, ci);
    pgs_router_opts ro = {.lag_check_ms = 100};
    pgs_router *r = NULL;
    ck_assert_int_eq(pgs_router_new(b, p.primary, p.standby, &ro, &r), PGS_OK);
    th_run_for(b, 0.5);
    wait_lag(b, r, lag_unknown, 5);
    ck_assert_int_eq(run_where(b, r, 1), 0);
    ck_assert_int_eq(pgs_router_free(r), PGS_OK);
    ck_assert_int_eq(pgs_router_free(NULL), PGS_EINVAL);
    pools_close(b, &p);
    th_loop_end(b);
}
END_TEST

START_TEST(test_router_freed_while_it_measures_lets_the_loop_drain)
{
    struct event_base *b = th_loop_begin();
    pools p = {0};
    pools_open(b, &p, getenv("PGSCOPE_STANDBY_CONNINFO"));
    pgs_router *r = NULL;
    ck_assert_int_eq(pgs_router_new(NULL, p.primary, p.standby, NULL, &r), PGS_EINVAL);
    ck_assert_ptr_null(r);
    ck_assert_int_eq(pgs_router_new(b, p.primary, p.standby, NULL, &r), PGS_OK);
    th_run_for(b, 0.01); /* the first measurement is on its way */
    ck_assert_int_eq(pgs_router_free(r), PGS_OK);
    pools_close(b, &p);
    th_loop_end(b); /* nothing of the router is left on the loop */
}
END_TEST

int main(void)
{
    Suite *s = suite_create("route");
    TCase *t = tcase_create("route");
    tcase_set_timeout(t, 60);
    tcase_add_test(t, test_reads_go_to_the_standby_and_writes_to_the_primary);
    tcase_add_test(t, test_reads_go_to_the_primary_while_the_standby_lags_past_the_bound);
    tcase_add_test(t, test_reads_go_to_the_primary_while_the_standby_cannot_be_reached);
    tcase_add_test(t, test_router_freed_while_it_measures_lets_the_loop_drain);
    suite_add_tcase(s, t);
    return th_run_suite(s);
}

/* Host lists: pgscope's own connect walks them as libpq documents (connect_timeout applies to
 * each host, a failed host makes way for the next), under one overall deadline, against the
 * real server and listeners that accept TCP and never answer (a deaf host). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "helpers.h"

/* The server's conninfo with the host list and port list replaced. */
static const char *hosts_conninfo(const char *hosts, const char *ports, const char *more)
{
    static char extra[512];
    snprintf(extra, sizeof extra, "host=%s hostaddr='' port=%s %s", hosts, ports, more);
    return th_conninfo(extra);
}

/* Open at `ci`, wait for on_open (exactly once), return how long it took. */
static double open_and_wait(struct event_base *b, const char *ci, const pgs_conn_opts *o,
                            th_open_rec *r, pgs_conn **c)
{
    double t0 = th_now();
    ck_assert_int_eq(pgs_conn_open(b, ci, o, th_on_open, r, c), PGS_OK);
    th_run_until(b, &r->fired, 30);
    th_run_for(b, 0.05);
    ck_assert_int_eq(r->fired, 1);
    return r->at - t0;
}

START_TEST(test_deaf_first_host_is_skipped_after_its_connect_timeout)
{
    /* The defect: one timer for the whole connect fired after connect_timeout and the live
     * second host was never tried. libpq's rule: connect_timeout is per host. */
    int deaf;
    int lfd = th_silent_listener(&deaf);
    char ports[64];
    snprintf(ports, sizeof ports, "%d,%s", deaf, th_conninfo_value("port"));
    struct event_base *b = th_loop_begin();
    th_open_rec r = {0};
    pgs_conn *c = NULL;
    double took = open_and_wait(b, hosts_conninfo("127.0.0.1,127.0.0.1", ports, "connect_timeout=2"),
                                NULL, &r, &c);
    ck_assert_msg(r.ok, "connect failed: %s", r.err.message);
    ck_assert_msg(took >= 1.9 && took < 5.0, "connected after %.3f s, want ~2 s", took);
    /* it reached the live one, and says so */
    ck_assert_str_eq(PQport(pgs_conn_pgconn(c)), th_conninfo_value("port"));
    th_call k = {0};
    ck_assert_int_eq(pgs_query(c, "SELECT 1", 0, NULL, th_record, &k), PGS_OK);
    th_run_until(b, &k.fired, 10);
    ck_assert_int_eq(k.code, PGS_OK);
    th_close(b, c);
    th_loop_end(b);
    close(lfd);
}
END_TEST

START_TEST(test_without_connect_timeout_each_host_gets_a_share_of_the_deadline)
{
    int deaf;
    int lfd = th_silent_listener(&deaf);
    char ports[64];
    snprintf(ports, sizeof ports, "%d,%s", deaf, th_conninfo_value("port"));
    pgs_conn_opts o = {.connect_timeout_ms = 1200}; /* two hosts: 600 ms each */
    struct event_base *b = th_loop_begin();
    th_open_rec r = {0};
    pgs_conn *c = NULL;
    double took = open_and_wait(b, hosts_conninfo("127.0.0.1,127.0.0.1", ports, "connect_timeout=0"),
                                &o, &r, &c);
    ck_assert_msg(r.ok, "connect failed: %s", r.err.message);
    ck_assert_msg(took >= 0.55 && took < 1.2, "connected after %.3f s, want ~0.6 s", took);
    ck_assert_str_eq(PQport(pgs_conn_pgconn(c)), th_conninfo_value("port"));
    th_close(b, c);
    th_loop_end(b);
    close(lfd);
}
END_TEST

START_TEST(test_all_hosts_deaf_fails_in_time_naming_every_host)
{
    int deaf1, deaf2;
    int l1 = th_silent_listener(&deaf1), l2 = th_silent_listener(&deaf2);
    char ports[64], p1[16], p2[16];
    snprintf(ports, sizeof ports, "%d,%d", deaf1, deaf2);
    snprintf(p1, sizeof p1, "port %d", deaf1);
    snprintf(p2, sizeof p2, "port %d", deaf2);
    pgs_conn_opts o = {.connect_timeout_ms = 1000};
    struct event_base *b = th_loop_begin();
    th_open_rec r = {0};
    pgs_conn *c = NULL;
    double took = open_and_wait(b, hosts_conninfo("127.0.0.1,127.0.0.1", ports, "connect_timeout=0"),
                                &o, &r, &c);
    ck_assert(!r.ok);
    ck_assert_int_eq(r.err.code, PGS_ETIMEDOUT);
    ck_assert_msg(took >= 0.9 && took < 2.5, "failed after %.3f s, want ~1 s", took);
    ck_assert_msg(strstr(r.err.message, p1) && strstr(r.err.message, p2),
                  "the error names both hosts: %s", r.err.message);
    ck_assert_ptr_null(strstr(r.err.message, th_conninfo_value("password")));
    th_close(b, c);
    th_loop_end(b);
    close(l1);
    close(l2);
}
END_TEST

START_TEST(test_overall_deadline_names_the_host_it_was_trying)
{
    /* connect_timeout=2 per host, but the caller allows 700 ms in all: the deadline wins. */
    int deaf;
    int lfd = th_silent_listener(&deaf);
    char ports[64], p1[16];
    snprintf(ports, sizeof ports, "%d,%s", deaf, th_conninfo_value("port"));
    snprintf(p1, sizeof p1, "port %d", deaf);
    pgs_conn_opts o = {.connect_timeout_ms = 700};
    struct event_base *b = th_loop_begin();
    th_open_rec r = {0};
    pgs_conn *c = NULL;
    double took = open_and_wait(b, hosts_conninfo("127.0.0.1,127.0.0.1", ports, "connect_timeout=2"),
                                &o, &r, &c);
    ck_assert(!r.ok);
    ck_assert_int_eq(r.err.code, PGS_ETIMEDOUT);
    ck_assert_msg(took >= 0.65 && took < 1.8, "failed after %.3f s, want ~0.7 s", took);
    ck_assert_msg(strstr(r.err.message, p1), "the error names the host: %s", r.err.message);
    th_close(b, c);
    th_loop_end(b);
    close(lfd);
}
END_TEST

START_TEST(test_refused_first_host_makes_way_at_once_and_each_host_gets_its_full_share)
{
    /* refused (fast), deaf (its full 2 s), live: the deaf host's timer starts when libpq
     * reaches it, not at the open */
    int deaf;
    int lfd = th_silent_listener(&deaf);
    char ports[96];
    snprintf(ports, sizeof ports, "%d,%d,%s", th_closed_port(), deaf, th_conninfo_value("port"));
    struct event_base *b = th_loop_begin();
    th_open_rec r = {0};
    pgs_conn *c = NULL;
    double took = open_and_wait(
        b, hosts_conninfo("127.0.0.1,127.0.0.1,127.0.0.1", ports, "connect_timeout=2"), NULL, &r,
        &c);
    ck_assert_msg(r.ok, "connect failed: %s", r.err.message);
    ck_assert_msg(took >= 1.9 && took < 5.0, "connected after %.3f s, want ~2 s", took);
    ck_assert_str_eq(PQport(pgs_conn_pgconn(c)), th_conninfo_value("port"));
    th_close(b, c);
    th_loop_end(b);
    close(lfd);
}
END_TEST

START_TEST(test_prefer_standby_comes_back_to_a_primary_before_a_deaf_host)
{
    /* libpq's prefer-standby: a first pass for a standby, then any server. The primary is
     * passed over in the first pass; the deaf host after it is given up; the second pass
     * must still reach the primary (the list starts again without the deaf host). */
    int deaf;
    int lfd = th_silent_listener(&deaf);
    char ports[64];
    snprintf(ports, sizeof ports, "%s,%d", th_conninfo_value("port"), deaf);
    struct event_base *b = th_loop_begin();
    th_open_rec r = {0};
    pgs_conn *c = NULL;
    double took = open_and_wait(
        b,
        hosts_conninfo("127.0.0.1,127.0.0.1", ports,
                       "connect_timeout=2 target_session_attrs=prefer-standby"),
        NULL, &r, &c);
    ck_assert_msg(r.ok, "connect failed: %s", r.err.message);
    ck_assert_msg(took >= 1.9 && took < 5.0, "connected after %.3f s, want ~2 s", took);
    ck_assert_str_eq(PQport(pgs_conn_pgconn(c)), th_conninfo_value("port"));
    th_close(b, c);
    th_loop_end(b);
    close(lfd);
}
END_TEST

START_TEST(test_host_names_in_a_list_skip_a_deaf_host_too)
{
    /* "localhost" goes through evdns (one entry per address: ::1 may be refused, 127.0.0.1
     * deaf), then the live port */
    int deaf;
    int lfd = th_silent_listener(&deaf);
    char ports[64];
    snprintf(ports, sizeof ports, "%d,%s", deaf, th_conninfo_value("port"));
    struct event_base *b = th_loop_begin();
    th_open_rec r = {0};
    pgs_conn *c = NULL;
    open_and_wait(b, hosts_conninfo("localhost,localhost", ports, "connect_timeout=2"), NULL, &r,
                  &c);
    ck_assert_msg(r.ok, "connect failed: %s", r.err.message);
    ck_assert_str_eq(PQhost(pgs_conn_pgconn(c)), "localhost");
    ck_assert_str_eq(PQport(pgs_conn_pgconn(c)), th_conninfo_value("port"));
    th_close(b, c);
    th_loop_end(b);
    close(lfd);
}
END_TEST

static void pool_closed(void *arg)
{
    ++*(int *)arg;
}

static void insert_body(pgs_tx *tx, void *arg)
{
    static th_call k;
    (void)arg;
    memset(&k, 0, sizeof k);
    ck_assert_int_eq(pgs_tx_query(tx, "INSERT INTO hosts_pool VALUES (1, 'a')", 0, NULL,
                                  th_record, &k),
                     PGS_OK);
    ck_assert_int_eq(pgs_tx_end(tx, 1, NULL, NULL), PGS_OK);
}

START_TEST(test_pool_over_a_deaf_host_and_a_live_one_commits)
{
    /* Before: a pool could not acquire at all (each connect spent its whole deadline on the
     * deaf host). */
    int deaf;
    int lfd = th_silent_listener(&deaf);
    char ports[64];
    snprintf(ports, sizeof ports, "%d,%s", deaf, th_conninfo_value("port"));
    th_fresh_table("hosts_pool");
    struct event_base *b = th_loop_begin();
    pgs_pool_opts po = {.max_size = 2, .acquire_timeout_ms = 10000};
    pgs_pool *p = NULL;
    ck_assert_int_eq(
        pgs_pool_new(b, hosts_conninfo("127.0.0.1,127.0.0.1", ports, "connect_timeout=2"), &po,
                     &p),
        PGS_OK);
    th_txdone d = {0};
    ck_assert_int_eq(pgs_pool_run_tx(p, NULL, insert_body, th_record_tx, &d), PGS_OK);
    th_run_until(b, &d.fired, 15);
    ck_assert_msg(d.outcome == PGS_TX_COMMITTED, "outcome %d: %s", d.outcome, d.err.message);
    ck_assert_int_eq(th_rows("hosts_pool"), 1);
    int closed = 0;
    ck_assert_int_eq(pgs_pool_close(p, pool_closed, &closed), PGS_OK);
    th_run_until(b, &closed, 10);
    th_loop_end(b);
    close(lfd);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("hosts");
    TCase *t = tcase_create("hosts");
    tcase_set_timeout(t, 30);
    tcase_add_test(t, test_deaf_first_host_is_skipped_after_its_connect_timeout);
    tcase_add_test(t, test_without_connect_timeout_each_host_gets_a_share_of_the_deadline);
    tcase_add_test(t, test_all_hosts_deaf_fails_in_time_naming_every_host);
    tcase_add_test(t, test_overall_deadline_names_the_host_it_was_trying);
    tcase_add_test(t, test_refused_first_host_makes_way_at_once_and_each_host_gets_its_full_share);
    tcase_add_test(t, test_prefer_standby_comes_back_to_a_primary_before_a_deaf_host);
    tcase_add_test(t, test_host_names_in_a_list_skip_a_deaf_host_too);
    tcase_add_test(t, test_pool_over_a_deaf_host_and_a_live_one_commits);
    suite_add_tcase(s, t);
    return th_run_suite(s);
}

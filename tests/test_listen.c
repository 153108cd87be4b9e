/* The listener against the real server: notifications with payloads, LISTEN again after the
 * backend is terminated (twice), the server out of reach and a stalled network (through the
 * fault proxy) with bounded backoff, each gap told once, channel names that need quoting,
 * refused arguments, and close from the loop, inside a gap and inside a notification. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "faultproxy.h"
#include "helpers.h"

enum { MAX_SEEN = 32 };

/* What a listener's callbacks saw. */
typedef struct lrec {
    pgs_listener *l;
    int nstates;
    int states[MAX_SEEN]; /* the listening flag of each on_state, in order */
    pgs_error why[MAX_SEEN];
    int why_null[MAX_SEEN];
    double state_at[MAX_SEEN];
    int listening; /* the last on_state's flag */
    int nnotifies;
    char channel[MAX_SEEN][128];
    char payload[MAX_SEEN][128];
    int be_pid[MAX_SEEN];
    int notified_in_gap; /* on_notify while not listening: never */
    int done;
    int calls_after_done;
    /* waiting */
    int goal_states, goal_notifies, hit;
    /* close from inside a callback */
    int close_on_notify, close_on_gap;
    int close_rc, close_again_rc;
} lrec;

static void check_goal(lrec *r)
{
    r->hit = r->nstates >= r->goal_states && r->nnotifies >= r->goal_notifies;
}

static void close_inside(lrec *r);

static void rec_state(pgs_listener *l, int listening, const pgs_error *why, void *arg)
{
    lrec *r = arg;
    ck_assert_ptr_eq(l, r->l);
    if (r->done)
        r->calls_after_done++;
    if (r->nstates < MAX_SEEN) {
        r->states[r->nstates] = listening;
        r->why_null[r->nstates] = why == NULL;
        if (why)
            r->why[r->nstates] = *why;
        r->state_at[r->nstates] = th_now();
    }
    r->nstates++;
    r->listening = listening;
    check_goal(r);
    if (!listening && r->close_on_gap)
        close_inside(r);
}

static void rec_notify(pgs_listener *l, const PGnotify *n, void *arg)
{
    lrec *r = arg;
    ck_assert_ptr_eq(l, r->l);
    if (r->done)
        r->calls_after_done++;
    if (r->listening != 1)
        r->notified_in_gap++;
    if (r->nnotifies < MAX_SEEN) {
        snprintf(r->channel[r->nnotifies], sizeof r->channel[0], "%s", n->relname);
        snprintf(r->payload[r->nnotifies], sizeof r->payload[0], "%s", n->extra);
        r->be_pid[r->nnotifies] = n->be_pid;
    }
    r->nnotifies++;
    check_goal(r);
    if (r->close_on_notify)
        close_inside(r);
}

static void rec_done(void *arg)
{
    lrec *r = arg;
    r->done++;
}

static void close_inside(lrec *r)
{
    r->close_rc = pgs_listener_close(r->l, rec_done, r);
    r->close_again_rc = pgs_listener_close(r->l, rec_done, r);
    ck_assert_int_eq(r->done, 0); /* never inside the call */
}

static pgs_listener *start(struct event_base *b, const char *conninfo, const char *const *ch,
                           const pgs_listener_opts *o, lrec *r)
{
    ck_assert_int_eq(pgs_listener_new(b, conninfo, ch, o, rec_notify, rec_state, r, &r->l), PGS_OK);
    ck_assert_ptr_nonnull(r->l);
    ck_assert_int_eq(r->nstates, 0); /* nothing fires inside the call */
    return r->l;
}

/* Run the loop until at least `states` on_state and `notifies` on_notify calls in all. */
static void wait_for(struct event_base *b, lrec *r, int states, int notifies, double seconds)
{
    r->goal_states = states;
    r->goal_notifies = notifies;
    check_goal(r);
    th_run_until(b, &r->hit, seconds);
}

/* Close from the loop: done fires once, later, and nothing after it. */
static void close_and_drain(struct event_base *b, lrec *r)
{
    ck_assert_int_eq(pgs_listener_close(r->l, rec_done, r), PGS_OK);
    ck_assert_int_eq(pgs_listener_close(r->l, rec_done, r), PGS_EMISUSE);
    ck_assert_int_eq(r->done, 0);
    th_run_until(b, &r->done, 10);
}

static void notify(const char *channel, const char *payload)
{
    const char *v[] = {channel, payload};
    free(th_scalar("SELECT pg_notify($1, $2)", 2, v));
}

static int listener_pid(pgs_listener *l)
{
    pgs_conn *c = pgs_listener_conn(l);
    ck_assert_ptr_nonnull(c);
    return th_backend_pid(c);
}

static fp_counts proxy_counts(th_proxy *p)
{
    fp_counts k;
    fp_get_counts(p, &k);
    return k;
}

/* ---- notifications ---- */

START_TEST(test_notifications_on_two_channels_arrive_with_payload)
{
    struct event_base *b = th_loop_begin();
    lrec r = {0};
    const char *ch[] = {"pgs_listen_a", "pgs_listen_b", NULL};
    pgs_listener *l = start(b, th_conninfo(NULL), ch, NULL, &r);
    ck_assert_ptr_null(pgs_listener_conn(l)); /* not listening yet */
    wait_for(b, &r, 1, 0, 10);
    ck_assert_int_eq(r.states[0], 1);
    ck_assert(r.why_null[0]);
    int pid = listener_pid(l);
    notify("pgs_listen_a", "first; it's \"quoted\"");
    notify("pgs_listen_other", "not ours");
    notify("pgs_listen_b", "second");
    wait_for(b, &r, 1, 2, 10);
    ck_assert_str_eq(r.channel[0], "pgs_listen_a");
    ck_assert_str_eq(r.payload[0], "first; it's \"quoted\"");
    ck_assert_str_eq(r.channel[1], "pgs_listen_b");
    ck_assert_str_eq(r.payload[1], "second");
    ck_assert_int_ne(r.be_pid[0], pid); /* the observer sent them */
    close_and_drain(b, &r);
    th_loop_end(b);
    ck_assert_int_eq(r.nstates, 1);
    ck_assert_int_eq(r.nnotifies, 2); /* the other channel's never came */
    ck_assert_int_eq(r.done, 1);
    ck_assert_int_eq(r.calls_after_done, 0);
}
END_TEST

START_TEST(test_channel_names_are_quoted_never_spliced)
{
    th_fresh_table("pgs_listen_victim");
    struct event_base *b = th_loop_begin();
    lrec r = {0};
    char longest[64];
    memset(longest, 'L', 63);
    longest[63] = '\0';
    const char *ch[] = {"a\"; DROP TABLE pgs_listen_victim; --", "Mixed Case", longest, NULL};
    start(b, th_conninfo(NULL), ch, NULL, &r);
    wait_for(b, &r, 1, 0, 10);
    ck_assert_int_eq(r.states[0], 1);
    for (int i = 0; i < 3; i++)
        notify(ch[i], "p");
    notify("mixed case", "folded: not ours"); /* an unquoted name would have been folded */
    notify(ch[0], "last");
    wait_for(b, &r, 1, 4, 10);
    for (int i = 0; i < 3; i++)
        ck_assert_str_eq(r.channel[i], ch[i]);
    ck_assert_str_eq(r.channel[3], ch[0]);
    ck_assert_str_eq(r.payload[3], "last");
    ck_assert_int_eq(th_rows("pgs_listen_victim"), 0); /* the table is still there */
    close_and_drain(b, &r);
    th_loop_end(b);
    ck_assert_int_eq(r.nnotifies, 4);
}
END_TEST

/* ---- gaps ---- */

START_TEST(test_backend_terminated_twice_each_gap_told_and_listen_restored)
{
    struct event_base *b = th_loop_begin();
    lrec r = {0};
    pgs_listener_opts o = {.retry_base_ms = 50, .retry_max_ms = 200};
    const char *ch[] = {"pgs_listen_t", NULL};
    pgs_listener *l = start(b, th_conninfo(NULL), ch, &o, &r);
    wait_for(b, &r, 1, 0, 10);
    for (int round = 0; round < 2; round++) {
        char gap[16], after[16];
        snprintf(gap, sizeof gap, "gap-%d", round);
        snprintf(after, sizeof after, "after-%d", round);
        int pid = listener_pid(l);
        th_terminate(pid);
        th_wait_backend_gone(pid, 5);
        notify(ch[0], gap); /* nobody listens now: this one is lost */
        int s = 2 * round + 1;
        wait_for(b, &r, s + 2, round, 10);
        ck_assert_int_eq(r.states[s], 0);
        ck_assert_int_eq(r.why[s].code, PGS_ECONN);
        ck_assert_msg(strcmp(r.why[s].sqlstate, "57P01") == 0, "%s: %s", r.why[s].sqlstate,
                      r.why[s].message);
        ck_assert_int_eq(r.states[s + 1], 1);
        ck_assert(r.why_null[s + 1]);
        ck_assert_int_ne(listener_pid(l), pid);
        notify(ch[0], after);
        wait_for(b, &r, s + 2, round + 1, 10);
        ck_assert_str_eq(r.payload[round], after);
    }
    close_and_drain(b, &r);
    th_loop_end(b);
    ck_assert_int_eq(r.nstates, 5);   /* 1, 0, 1, 0, 1 */
    ck_assert_int_eq(r.nnotifies, 2); /* gap-0 and gap-1 never came */
    ck_assert_int_eq(r.notified_in_gap, 0);
    ck_assert_int_eq(r.calls_after_done, 0);
}
END_TEST

START_TEST(test_server_out_of_reach_retries_with_bounded_backoff_told_once)
{
    struct event_base *b = th_loop_begin();
    th_proxy *p = th_proxy_start(atoi(th_conninfo_value("port")));
    lrec r = {0};
    pgs_listener_opts o = {.retry_base_ms = 50, .retry_max_ms = 400};
    const char *ch[] = {"pgs_listen_down", NULL};
    start(b, th_proxy_conninfo(p), ch, &o, &r);
    wait_for(b, &r, 1, 0, 10);
    /* The server goes out of reach: every connection, open or new, is cut at once. */
    fp_cut_after_bytes(p, 1);
    th_proxy_cut(p);
    wait_for(b, &r, 2, 0, 5);
    ck_assert_int_eq(r.states[1], 0);
    ck_assert_int_eq(r.why[1].code, PGS_ECONN);
    long before = proxy_counts(p).connections;
    th_run_for(b, 2.0);
    long attempts = proxy_counts(p).connections - before;
    /* Steps 50, 100, 200, 400, 400 ... ms, each jittered into its upper half: 4 to 12 in 2 s
     * (with no backoff it would be hundreds). */
    ck_assert_msg(attempts >= 4 && attempts <= 16, "%ld attempts in 2 s", attempts);
    ck_assert_int_eq(r.nstates, 2); /* failed attempts are not told again */
    notify(ch[0], "while down");    /* lost */
    double t0 = th_now();
    fp_cut_after_bytes(p, 0); /* back */
    wait_for(b, &r, 3, 0, 10);
    ck_assert_int_eq(r.states[2], 1);
    double took = r.state_at[2] - t0;
    ck_assert_msg(took < 2.0, "listening again %.3f s after the server came back", took);
    notify(ch[0], "back");
    wait_for(b, &r, 3, 1, 10);
    ck_assert_str_eq(r.payload[0], "back");
    close_and_drain(b, &r);
    th_proxy_stop(p);
    th_loop_end(b);
    ck_assert_int_eq(r.nnotifies, 1);
    ck_assert_int_eq(r.notified_in_gap, 0);
}
END_TEST

START_TEST(test_stalled_network_noticed_by_ping_then_listening_again)
{
    struct event_base *b = th_loop_begin();
    th_proxy *p = th_proxy_start(atoi(th_conninfo_value("port")));
    int fds_before = th_count_fds();
    lrec r = {0};
    pgs_listener_opts o = {.retry_base_ms = 50,
                           .retry_max_ms = 400,
                           .ping_interval_ms = 200,
                           .ping_timeout_ms = 300,
                           .conn = {.connect_timeout_ms = 300, .cancel_timeout_ms = 300}};
    const char *ch[] = {"pgs_listen_stall", NULL};
    start(b, th_proxy_conninfo(p), ch, &o, &r);
    wait_for(b, &r, 1, 0, 10);
    th_run_for(b, 0.5); /* pings answered: still listening, nothing told */
    ck_assert_int_eq(r.nstates, 1);
    /* The network hangs without closing: only the ping can tell. */
    double t0 = th_now();
    th_proxy_stall(p, 1);
    wait_for(b, &r, 2, 0, 5);
    double took = r.state_at[1] - t0;
    ck_assert_int_eq(r.states[1], 0);
    ck_assert_int_eq(r.why[1].code, PGS_ETIMEDOUT);
    ck_assert_msg(took >= 0.25 && took < 2.0, "the stall noticed after %.3f s, want 0.3-0.5 s",
                  took);
    th_run_for(b, 1.5); /* attempts time out (connect_timeout_ms), silently */
    ck_assert_int_eq(r.nstates, 2);
    t0 = th_now();
    th_proxy_stall(p, 0);
    wait_for(b, &r, 3, 0, 10);
    ck_assert_int_eq(r.states[2], 1);
    took = r.state_at[2] - t0;
    ck_assert_msg(took < 2.0, "listening again %.3f s after the network came back", took);
    notify(ch[0], "through");
    wait_for(b, &r, 3, 1, 10);
    ck_assert_str_eq(r.payload[0], "through");
    close_and_drain(b, &r);
    /* Cancel requests abandoned during the stall get through now; their threads clean up. */
    for (double end = th_now() + 5; th_count_fds() > fds_before && th_now() < end;)
        usleep(20000);
    th_proxy_stop(p);
    th_loop_end(b);
    ck_assert_int_eq(r.nstates, 3);
    ck_assert_int_eq(r.calls_after_done, 0);
}
END_TEST

START_TEST(test_first_failure_told_once_with_its_reason_then_retried)
{
    struct event_base *b = th_loop_begin();
    pgs_listener_opts o = {.retry_base_ms = 20, .retry_max_ms = 100};
    const char *ch[] = {"pgs_listen_never", NULL};
    char refused[80];
    snprintf(refused, sizeof refused, "host=127.0.0.1 hostaddr=127.0.0.1 port=%d",
             th_closed_port());
    struct {
        const char *extra;
        pgs_code code;
    } cases[] = {{refused, PGS_ECONNECT}, {"password=wrong-password", PGS_EAUTH}};
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        lrec r = {0};
        pgs_listener *l = start(b, th_conninfo(cases[i].extra), ch, &o, &r);
        wait_for(b, &r, 1, 0, 10);
        ck_assert_int_eq(r.states[0], 0);
        ck_assert_msg(r.why[0].code == cases[i].code, "case %zu: %s", i, r.why[0].message);
        ck_assert_ptr_null(strstr(r.why[0].message, "wrong-password"));
        th_run_for(b, 0.5); /* several more attempts, none told */
        ck_assert_int_eq(r.nstates, 1);
        ck_assert_ptr_null(pgs_listener_conn(l));
        close_and_drain(b, &r);
        ck_assert_int_eq(r.nstates, 1);
    }
    th_loop_end(b);
}
END_TEST

START_TEST(test_channel_that_cannot_listen_fails_the_attempt_never_half_listening)
{
    /* Not valid UTF-8: libpq refuses to quote it on a UTF8 connection. The listener never
     * listens on the good channel alone: every attempt fails whole, told once. */
    struct event_base *b = th_loop_begin();
    th_proxy *p = th_proxy_start(atoi(th_conninfo_value("port")));
    lrec r = {0};
    pgs_listener_opts o = {.retry_base_ms = 20, .retry_max_ms = 100};
    const char *ch[] = {"pgs_listen_good", "bad\xc3\x28", NULL};
    start(b, th_proxy_conninfo(p), ch, &o, &r);
    wait_for(b, &r, 1, 0, 10);
    ck_assert_int_eq(r.states[0], 0);
    ck_assert_int_eq(r.why[0].code, PGS_EINVAL);
    ck_assert_msg(strstr(r.why[0].message, "channel 2") != NULL, "%s", r.why[0].message);
    long before = proxy_counts(p).connections;
    notify(ch[0], "never");
    th_run_for(b, 1.0);
    ck_assert_int_ge(proxy_counts(p).connections - before, 3); /* retried */
    ck_assert_int_eq(r.nstates, 1);
    ck_assert_int_eq(r.nnotifies, 0);
    close_and_drain(b, &r);
    th_proxy_stop(p);
    th_loop_end(b);
}
END_TEST

/* ---- close ---- */

START_TEST(test_close_during_a_gap_fires_done_once_and_nothing_after)
{
    struct event_base *b = th_loop_begin();
    th_proxy *p = th_proxy_start(atoi(th_conninfo_value("port")));
    lrec r = {0};
    pgs_listener_opts o = {.retry_base_ms = 20, .retry_max_ms = 100};
    const char *ch[] = {"pgs_listen_closegap", NULL};
    start(b, th_proxy_conninfo(p), ch, &o, &r);
    wait_for(b, &r, 1, 0, 10);
    fp_cut_after_bytes(p, 1);
    th_proxy_cut(p);
    wait_for(b, &r, 2, 0, 5);
    th_run_for(b, 0.3); /* retrying: an attempt or its backoff is under way */
    close_and_drain(b, &r);
    fp_cut_after_bytes(p, 0); /* the server is back: a leaked attempt would listen now */
    th_run_for(b, 0.5);
    th_proxy_stop(p);
    th_loop_end(b);
    ck_assert_int_eq(r.nstates, 2);
    ck_assert_int_eq(r.done, 1);
    ck_assert_int_eq(r.calls_after_done, 0);
}
END_TEST

START_TEST(test_close_from_inside_the_gap_callback)
{
    struct event_base *b = th_loop_begin();
    lrec r = {0};
    const char *ch[] = {"pgs_listen_closeinside", NULL};
    pgs_listener *l = start(b, th_conninfo(NULL), ch, NULL, &r);
    wait_for(b, &r, 1, 0, 10);
    r.close_on_gap = 1;
    th_terminate(listener_pid(l));
    th_run_until(b, &r.done, 10);
    ck_assert_int_eq(r.close_rc, PGS_OK);
    ck_assert_int_eq(r.close_again_rc, PGS_EMISUSE);
    th_run_for(b, 0.3); /* no reconnect: the retry died with the close */
    th_loop_end(b);
    ck_assert_int_eq(r.nstates, 2);
    ck_assert_int_eq(r.done, 1);
    ck_assert_int_eq(r.calls_after_done, 0);
}
END_TEST

START_TEST(test_close_from_inside_on_notify_stops_delivery)
{
    struct event_base *b = th_loop_begin();
    lrec r = {0};
    const char *ch[] = {"pgs_listen_closenotify", NULL};
    start(b, th_conninfo(NULL), ch, NULL, &r);
    wait_for(b, &r, 1, 0, 10);
    r.close_on_notify = 1;
    /* Both in one transaction: they arrive together, in one read. */
    free(th_scalar("SELECT pg_notify('pgs_listen_closenotify', '1') IS NULL "
                   "AND pg_notify('pgs_listen_closenotify', '2') IS NULL",
                   0, NULL));
    th_run_until(b, &r.done, 10);
    ck_assert_int_eq(r.close_rc, PGS_OK);
    ck_assert_int_eq(r.close_again_rc, PGS_EMISUSE);
    th_loop_end(b);
    ck_assert_int_eq(r.nnotifies, 1);
    ck_assert_str_eq(r.payload[0], "1");
    ck_assert_int_eq(r.done, 1);
    ck_assert_int_eq(r.calls_after_done, 0);
}
END_TEST

/* ---- misuse ---- */

START_TEST(test_bad_arguments_refused_at_once_without_callbacks)
{
    struct event_base *b = th_loop_begin();
    lrec r = {0};
    const char *ci = th_conninfo(NULL);
    const char *ch[] = {"pgs_listen_c", NULL};
    const char *none[] = {NULL};
    const char *empty[] = {"pgs_listen_c", "", NULL};
    char too_long[65];
    memset(too_long, 'x', 64);
    too_long[64] = '\0';
    const char *longer[] = {too_long, NULL};
    pgs_listener_opts neg_base = {.retry_base_ms = -1}, neg_max = {.retry_max_ms = -1},
                      neg_ping = {.ping_timeout_ms = -1};
    pgs_listener *l;
#define REFUSED(call)                                                                              \
    do {                                                                                           \
        l = (pgs_listener *)&r;                                                                    \
        ck_assert_int_eq(call, PGS_EINVAL);                                                        \
        ck_assert_ptr_null(l);                                                                     \
    } while (0)
    REFUSED(pgs_listener_new(NULL, ci, ch, NULL, rec_notify, rec_state, &r, &l));
    REFUSED(pgs_listener_new(b, NULL, ch, NULL, rec_notify, rec_state, &r, &l));
    REFUSED(pgs_listener_new(b, ci, NULL, NULL, rec_notify, rec_state, &r, &l));
    REFUSED(pgs_listener_new(b, ci, none, NULL, rec_notify, rec_state, &r, &l));
    REFUSED(pgs_listener_new(b, ci, empty, NULL, rec_notify, rec_state, &r, &l));
    REFUSED(pgs_listener_new(b, ci, longer, NULL, rec_notify, rec_state, &r, &l));
    REFUSED(pgs_listener_new(b, ci, ch, NULL, NULL, rec_state, &r, &l));
    REFUSED(pgs_listener_new(b, ci, ch, NULL, rec_notify, NULL, &r, &l));
    REFUSED(pgs_listener_new(b, ci, ch, &neg_base, rec_notify, rec_state, &r, &l));
    REFUSED(pgs_listener_new(b, ci, ch, &neg_max, rec_notify, rec_state, &r, &l));
    REFUSED(pgs_listener_new(b, ci, ch, &neg_ping, rec_notify, rec_state, &r, &l));
    REFUSED(pgs_listener_new(b, "this is not a conninfo", ch, NULL, rec_notify, rec_state, &r, &l));
    REFUSED(pgs_listener_new(b, "postgresql://[::1", ch, NULL, rec_notify, rec_state, &r, &l));
#undef REFUSED
    ck_assert_int_eq(pgs_listener_new(b, ci, ch, NULL, rec_notify, rec_state, &r, NULL),
                     PGS_EINVAL);
    ck_assert_int_eq(pgs_listener_close(NULL, rec_done, &r), PGS_EINVAL);
    ck_assert_ptr_null(pgs_listener_conn(NULL));
    th_loop_end(b); /* nothing was started: the loop is empty */
    ck_assert_int_eq(r.nstates + r.nnotifies + r.done, 0);
}
END_TEST

static Suite *listen_suite(void)
{
    Suite *s = suite_create("listen");
    TCase *t = tcase_create("listen");
    tcase_set_timeout(t, 30);
    tcase_add_test(t, test_notifications_on_two_channels_arrive_with_payload);
    tcase_add_test(t, test_channel_names_are_quoted_never_spliced);
    tcase_add_test(t, test_backend_terminated_twice_each_gap_told_and_listen_restored);
    tcase_add_test(t, test_server_out_of_reach_retries_with_bounded_backoff_told_once);
    tcase_add_test(t, test_stalled_network_noticed_by_ping_then_listening_again);
    tcase_add_test(t, test_first_failure_told_once_with_its_reason_then_retried);
    tcase_add_test(t, test_channel_that_cannot_listen_fails_the_attempt_never_half_listening);
    tcase_add_test(t, test_close_during_a_gap_fires_done_once_and_nothing_after);
    tcase_add_test(t, test_close_from_inside_the_gap_callback);
    tcase_add_test(t, test_close_from_inside_on_notify_stops_delivery);
    tcase_add_test(t, test_bad_arguments_refused_at_once_without_callbacks);
    suite_add_tcase(s, t);
    return s;
}

int main(void)
{
    return th_run_suite(listen_suite());
}

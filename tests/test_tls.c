/* TLS and authentication against a server of its own that speaks TLS (meson's 'tls' test starts
 * it with tools/pgtmp.sh --tls): sslmode=verify-full with the cluster's CA, by address and by a
 * name the library looks up itself, SCRAM bound to the TLS channel, the failures a user must be
 * able to tell apart (wrong CA, wrong host name, wrong password), and a pool over TLS. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "helpers.h"

/* ---- the TLS server's fixtures ---- */

static const char *env_path(const char *name)
{
    const char *v = getenv(name);
    ck_assert_msg(v && *v,
                  "%s is not set: the tls suite needs the throwaway server with TLS "
                  "(meson test tls, or tools/pgtmp.sh run --tls)",
                  name);
    return v;
}

/* The server's conninfo with sslmode=verify-full against the CA in `ca_var`, then `extra`
 * (later keywords win). Static buffer. */
static const char *verify_full_with(const char *ca_var, const char *extra)
{
    char more[1024];
    snprintf(more, sizeof more, "sslmode=verify-full sslrootcert='%s' %s", env_path(ca_var),
             extra ? extra : "");
    return th_conninfo(more);
}

/* The right CA, the certificate's host name, and its address given, so no lookup is needed. */
static const char *verify_full(const char *extra)
{
    static char buf[2048];
    char more[1024];
    snprintf(more, sizeof more, "host=localhost hostaddr=127.0.0.1 %s", extra ? extra : "");
    snprintf(buf, sizeof buf, "%s", verify_full_with("PGSCOPE_TLS_CA", more));
    return buf;
}

/* The server's real password (copied: th_conninfo_value reuses th_conninfo's buffer). */
static const char *server_password(void)
{
    static char pw[256];
    snprintf(pw, sizeof pw, "%s", th_conninfo_value("password"));
    ck_assert_int_gt(strlen(pw), 0);
    return pw;
}

/* ---- helpers ---- */

/* Open with conninfo, expect on_open to fail with `code`; the guard is closed after. */
static pgs_error open_fails(const char *conninfo, pgs_code code)
{
    struct event_base *b = th_loop_begin();
    th_open_rec r = {0};
    int done = 0;
    pgs_conn *c = NULL;
    ck_assert_int_eq(pgs_conn_open(b, conninfo, NULL, th_on_open, &r, &c), PGS_OK);
    th_run_until(b, &r.fired, 20);
    ck_assert_int_eq(r.ok, 0);
    ck_assert_msg(r.err.code == code, "expected %s, got %s: %s", pgs_strerror(code),
                  pgs_strerror(r.err.code), r.err.message);
    ck_assert_int_eq(pgs_conn_close(c, th_count_done, &done), PGS_OK);
    th_loop_end(b);
    ck_assert_int_eq(done, 1);
    ck_assert_int_eq(r.fired, 1);
    return r.err;
}

static const char *query_value(struct event_base *b, pgs_conn *c, const char *sql)
{
    static th_call k;
    memset(&k, 0, sizeof k);
    ck_assert_int_eq(pgs_query(c, sql, 0, NULL, th_record, &k), PGS_OK);
    th_run_until(b, &k.fired, 10);
    ck_assert_msg(k.code == PGS_OK, "%s: %s", sql, k.message);
    return k.value;
}

/* The guard's session is encrypted, as the server sees it (its own pg_stat_ssl row, asked on
 * the guard and by the observer) and as libpq sees it, and statements work over it. */
static void assert_encrypted(struct event_base *b, pgs_conn *c)
{
    PGconn *pg = pgs_conn_pgconn(c);
    ck_assert_int_eq(PQsslInUse(pg), 1);
    const char *proto = PQsslAttribute(pg, "protocol");
    ck_assert_msg(proto && strncmp(proto, "TLSv1.", 6) == 0, "protocol %s", proto);
    ck_assert_str_eq(
        query_value(b, c, "SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()"),
        "true");
    ck_assert_str_eq(query_value(b, c, "SELECT 6 * 7"), "42");
    char pid[16];
    snprintf(pid, sizeof pid, "%d", th_backend_pid(c));
    const char *v[] = {pid};
    char *ssl = th_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = $1", 1, v);
    ck_assert_ptr_nonnull(ssl);
    ck_assert_str_eq(ssl, "t");
    free(ssl);
}

static void assert_connects_encrypted(const char *conninfo)
{
    struct event_base *b = th_loop_begin();
    pgs_conn *c = th_open_at(b, conninfo, NULL);
    assert_encrypted(b, c);
    th_close(b, c);
    th_loop_end(b);
}

/* ---- connecting ---- */

/* verify-full with the right CA, by name + address and by address alone (the certificate names
 * both). channel_binding=require: libpq accepts only SCRAM-SHA-256-PLUS, so the login really
 * was SCRAM with the conninfo's password, bound to this TLS session. */
START_TEST(test_verify_full_connects_encrypted_with_scram)
{
    assert_connects_encrypted(verify_full("channel_binding=require"));
    assert_connects_encrypted(
        verify_full_with("PGSCOPE_TLS_CA", "host=127.0.0.1 channel_binding=require"));
}
END_TEST

/* host=localhost without hostaddr: the library looks the name up on the loop (evdns) and hands
 * libpq the address, while TLS still checks the certificate against the name. */
START_TEST(test_verify_full_with_a_name_the_library_resolves)
{
    assert_connects_encrypted(
        verify_full_with("PGSCOPE_TLS_CA", "host=localhost channel_binding=require"));
}
END_TEST

/* ---- the failures ---- */

START_TEST(test_wrong_ca_fails_with_a_certificate_error)
{
    const char *pw = server_password();
    pgs_error e = open_fails(
        verify_full_with("PGSCOPE_TLS_OTHER_CA", "host=localhost hostaddr=127.0.0.1"),
        PGS_ECONNECT);
    ck_assert_msg(strstr(e.message, "certificate verify failed"), "%s", e.message);
    ck_assert_str_eq(e.sqlstate, "");
    ck_assert_ptr_null(strstr(e.message, pw));
}
END_TEST

START_TEST(test_wrong_host_name_fails_with_a_mismatch_error)
{
    const char *pw = server_password();
    pgs_error e = open_fails(
        verify_full_with("PGSCOPE_TLS_CA", "host=wrong.invalid hostaddr=127.0.0.1"), PGS_ECONNECT);
    ck_assert_msg(strstr(e.message, "does not match host name \"wrong.invalid\""), "%s",
                  e.message);
    ck_assert_ptr_null(strstr(e.message, pw));
}
END_TEST

START_TEST(test_wrong_password_over_tls_is_an_auth_error)
{
    const char *pw = server_password();
    pgs_error e = open_fails(verify_full("password=TlsHunter2Wrong"), PGS_EAUTH);
    ck_assert_str_eq(e.sqlstate, "28P01");
    ck_assert_msg(strstr(e.message, "password authentication failed"), "%s", e.message);
    ck_assert_ptr_null(strstr(e.message, "TlsHunter2Wrong"));
    ck_assert_ptr_null(strstr(e.message, pw));
}
END_TEST

/* ---- the pool ---- */

typedef th_got got; /* (tests/helpers.h) */

static pgs_conn *acquire_wait(struct event_base *b, got *g)
{
    th_run_until(b, &g->fired, 15);
    ck_assert_msg(g->code == PGS_OK, "acquire failed: %s", g->message);
    return g->conn;
}

/* Guards handed out at once (three new connections) and a guard handed out again after its
 * reset are all encrypted and work. */
START_TEST(test_pool_hands_out_guards_over_tls)
{
    enum { N = 3 };
    struct event_base *b = th_loop_begin();
    pgs_pool_opts o = {.max_size = N, .acquire_timeout_ms = 10000};
    pgs_pool *p = NULL;
    ck_assert_int_eq(
        pgs_pool_new(b, verify_full("application_name=pgs_tls_pool channel_binding=require"), &o,
                     &p),
        PGS_OK);
    got g[N] = {{0}};
    int pids[N];
    for (int i = 0; i < N; i++)
        ck_assert_int_eq(pgs_pool_acquire(p, th_on_got, &g[i], NULL), PGS_OK);
    for (int i = 0; i < N; i++) {
        pgs_conn *c = acquire_wait(b, &g[i]);
        assert_encrypted(b, c);
        pids[i] = th_backend_pid(c);
        for (int j = 0; j < i; j++)
            ck_assert_int_ne(pids[i], pids[j]);
    }
    ck_assert_int_eq(
        th_scalar_long("SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) "
                       "WHERE a.application_name = 'pgs_tls_pool' AND s.ssl",
                       0, NULL),
        N);
    for (int i = 0; i < N; i++)
        th_close(b, g[i].conn);

    got again = {0};
    ck_assert_int_eq(pgs_pool_acquire(p, th_on_got, &again, NULL), PGS_OK);
    pgs_conn *c = acquire_wait(b, &again);
    int pid = th_backend_pid(c);
    ck_assert_msg(pid == pids[0] || pid == pids[1] || pid == pids[2],
                  "the pool opened a new connection instead of reusing an idle one");
    assert_encrypted(b, c);
    th_close(b, c);

    int done = 0;
    ck_assert_int_eq(pgs_pool_close(p, th_count_done, &done), PGS_OK);
    th_run_until(b, &done, 15);
    ck_assert_int_eq(done, 1);
    th_loop_end(b);
}
END_TEST

/* A pool whose conninfo names the wrong CA: the waiter learns why (PGS_ECONNECT with the
 * certificate error, not a bare timeout) once its acquire timeout passes. */
START_TEST(test_pool_with_the_wrong_ca_reports_the_certificate_error)
{
    const char *pw = server_password();
    struct event_base *b = th_loop_begin();
    pgs_pool_opts o = {.max_size = 2, .acquire_timeout_ms = 1000};
    pgs_pool *p = NULL;
    ck_assert_int_eq(pgs_pool_new(b,
                                  verify_full_with("PGSCOPE_TLS_OTHER_CA",
                                                   "host=localhost hostaddr=127.0.0.1"),
                                  &o, &p),
                     PGS_OK);
    got g = {0};
    ck_assert_int_eq(pgs_pool_acquire(p, th_on_got, &g, NULL), PGS_OK);
    th_run_until(b, &g.fired, 10);
    ck_assert_msg(g.code == PGS_ECONNECT, "got %s: %s", pgs_strerror(g.code), g.message);
    ck_assert_ptr_null(g.conn);
    ck_assert_msg(strstr(g.message, "certificate verify failed"), "%s", g.message);
    ck_assert_ptr_null(strstr(g.message, pw));
    pgs_pool_counts st;
    pgs_pool_stats(p, &st);
    ck_assert_uint_ge(st.connect_failures, 1);
    int done = 0;
    ck_assert_int_eq(pgs_pool_close(p, th_count_done, &done), PGS_OK);
    th_run_until(b, &done, 15);
    ck_assert_int_eq(done, 1);
    th_loop_end(b);
}
END_TEST

static Suite *tls_suite(void)
{
    Suite *s = suite_create("tls");
    TCase *t = tcase_create("tls");
    tcase_set_timeout(t, 30);
    tcase_add_test(t, test_verify_full_connects_encrypted_with_scram);
    tcase_add_test(t, test_verify_full_with_a_name_the_library_resolves);
    tcase_add_test(t, test_wrong_ca_fails_with_a_certificate_error);
    tcase_add_test(t, test_wrong_host_name_fails_with_a_mismatch_error);
    tcase_add_test(t, test_wrong_password_over_tls_is_an_auth_error);
    tcase_add_test(t, test_pool_hands_out_guards_over_tls);
    tcase_add_test(t, test_pool_with_the_wrong_ca_reports_the_certificate_error);
    suite_add_tcase(s, t);
    return s;
}

int main(void)
{
    return th_run_suite(tls_suite());
}

/* pgs_error: every code has a name, and passwords never survive into a message. No server. */
#include <stdio.h>
#include <string.h>

#include "error.h"
#include "helpers.h"

START_TEST(test_version_macros_match_the_library_and_the_build)
{
    const char *text = NULL;
    ck_assert_int_eq(pgs_version(&text), PGSCOPE_VERSION_NUMBER);
    ck_assert_str_eq(text, PGSCOPE_VERSION);
    ck_assert_str_eq(PGSCOPE_VERSION, PGS_PROJECT_VERSION); /* meson.build's version */
    char parts[32];
    snprintf(parts, sizeof parts, "%d.%d.%d", PGSCOPE_VERSION_MAJOR, PGSCOPE_VERSION_MINOR,
             PGSCOPE_VERSION_PATCH);
    ck_assert_str_eq(parts, PGSCOPE_VERSION);
    ck_assert_int_eq(pgs_version(NULL), PGSCOPE_VERSION_NUMBER);
    pgs_pool_counts counts = {0}; /* the stats type's name is its tag too */
    struct pgs_pool_counts *same = &counts;
    ck_assert_int_eq(same->size, 0);
}
END_TEST

START_TEST(test_every_code_has_its_own_name)
{
    for (int a = PGS_OK; a <= PGS_EAGAIN; a++) {
        ck_assert_ptr_nonnull(strstr(pgs_strerror(a), "PGS_"));
        for (int b = a + 1; b <= PGS_EAGAIN; b++)
            ck_assert_str_ne(pgs_strerror(a), pgs_strerror(b));
    }
    ck_assert_ptr_nonnull(strstr(pgs_strerror(PGS_ETIMEDOUT), "timed out"));
    ck_assert_ptr_nonnull(strstr(pgs_strerror(-5), "unknown"));
    ck_assert_ptr_nonnull(strstr(pgs_strerror(9999), "unknown"));
}
END_TEST

START_TEST(test_redacts_the_known_password_anywhere)
{
    pgs_error e;
    err_set(&e, PGS_ECONNECT, NULL, "could not connect as s3cr3tPW to s3cr3tPW-host", "s3cr3tPW");
    ck_assert_ptr_null(strstr(e.message, "s3cr3tPW"));
    ck_assert_ptr_nonnull(strstr(e.message, "could not connect as ***"));
    ck_assert_int_eq(e.code, PGS_ECONNECT);
    ck_assert_str_eq(e.sqlstate, "");
}
END_TEST

START_TEST(test_redacts_password_keyword_values_and_uris)
{
    char m[256];
    strcpy(m, "bad: host=x password=abc123 port=5");
    err_redact(m, NULL);
    ck_assert_str_eq(m, "bad: host=x password=*** port=5");
    strcpy(m, "bad: password = 'a b\\'c' dbname=y");
    err_redact(m, NULL);
    ck_assert_str_eq(m, "bad: password = *** dbname=y");
    strcpy(m, "uri postgresql://bob:hunter2@db:5432/x?password=zz");
    err_redact(m, NULL);
    ck_assert_str_eq(m, "uri postgresql://bob:***@db:5432/x?password=***");
    strcpy(m, "password authentication failed for user \"bob\"");
    err_redact(m, NULL);
    ck_assert_str_eq(m, "password authentication failed for user \"bob\"");
}
END_TEST

START_TEST(test_short_password_masks_only_whole_words)
{
    pgs_error e;
    err_set(&e, PGS_EAUTH, "28P01", "user ab said ab in cab", "ab");
    ck_assert_str_eq(e.message, "user *** said *** in cab");
    ck_assert_str_eq(e.sqlstate, "28P01");
}
END_TEST

START_TEST(test_long_message_cut_after_redaction)
{
    char big[2000];
    memset(big, 'x', sizeof big);
    memcpy(big + 505, "TOPSECRET", 9); /* straddles the 512-byte cut */
    big[sizeof big - 1] = '\0';
    pgs_error e;
    err_set(&e, PGS_ESQL, "XX000", big, "TOPSECRET");
    ck_assert_int_eq((int)strlen(e.message), (int)sizeof e.message - 1);
    ck_assert_ptr_null(strstr(e.message, "TOPSE"));
}
END_TEST

START_TEST(test_empty_message_uses_code_name)
{
    pgs_error e;
    err_set(&e, PGS_ECLOSED, NULL, "  \n", NULL);
    ck_assert_str_eq(e.message, pgs_strerror(PGS_ECLOSED));
    err_set(&e, PGS_ECLOSED, NULL, NULL, NULL);
    ck_assert_str_eq(e.message, pgs_strerror(PGS_ECLOSED));
}
END_TEST

int main(void)
{
    Suite *s = suite_create("error");
    TCase *t = tcase_create("error");
    tcase_add_test(t, test_version_macros_match_the_library_and_the_build);
    tcase_add_test(t, test_every_code_has_its_own_name);
    tcase_add_test(t, test_redacts_the_known_password_anywhere);
    tcase_add_test(t, test_redacts_password_keyword_values_and_uris);
    tcase_add_test(t, test_short_password_masks_only_whole_words);
    tcase_add_test(t, test_long_message_cut_after_redaction);
    tcase_add_test(t, test_empty_message_uses_code_name);
    suite_add_tcase(s, t);
    return th_run_suite(s);
}

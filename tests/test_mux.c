/* Multiplexed transactions (pgs_pool_opts.multiplex): placeholder until the suite lands. */
#include <check.h>
#include <stdlib.h>

START_TEST(test_placeholder)
{
    ck_assert_int_eq(1, 1);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("mux");
    TCase *t = tcase_create("mux");
    tcase_add_test(t, test_placeholder);
    suite_add_tcase(s, t);
    SRunner *r = srunner_create(s);
    srunner_run_all(r, CK_NORMAL);
    int failed = srunner_ntests_failed(r);
    srunner_free(r);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}

/* test_core.c — error convention, log, progress and profiling regions. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "support.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_log.h"
#include "surveyproc/sp_prof.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int inner(int fail)
{
    int status = SP_OK;
    double *buf = NULL;
    SP_ALLOC(buf, 16);
    SP_CHECK(!fail, SP_ERR_INPUT, "cat.csv:%d: column RA: 'x' is not a number", 7);
cleanup:
    free(buf);
    return status;
}

static int outer(int fail)
{
    int status = SP_OK;
    SP_TRY(inner(fail));
    status = 42; /* not reached on failure */
cleanup:
    if (status != SP_OK && status != 42) sp_err_context("while reading the catalog");
    return status == 42 ? SP_OK : status;
}

static void t_error_propagation(void **s)
{
    (void)s;
    sp_err_clear();
    assert_int_equal(outer(0), SP_OK);
    assert_int_equal(outer(1), SP_ERR_INPUT);
    assert_string_equal(sp_err_msg(), "while reading the catalog: cat.csv:7: column RA: 'x' is not a number");
    assert_non_null(strstr(sp_err_where(), "test_core.c:"));
    assert_int_equal(sp_err_code(), SP_ERR_INPUT);
    assert_int_equal(sp_status_exit_code(SP_ERR_INPUT), 3);
    assert_int_equal(sp_status_exit_code(SP_ERR_IO), 4);
    assert_int_equal(sp_status_exit_code(SP_ERR_NOTBUILT), 2);
    sp_err_clear();
    assert_string_equal(sp_err_msg(), "");
}

static void t_error_thread_local(void **s)
{
    (void)s;
    sp_err_clear();
    SP_FAIL(SP_ERR_IO, "main thread message");
    int other_ok = 1;
#pragma omp parallel num_threads(2)
    {
#pragma omp single
        {
#pragma omp task shared(other_ok)
            {
                /* a different thread (or the same one) — if different, its buffer is empty */
                SP_FAIL(SP_ERR_NUMERIC, "thread message");
                other_ok = strcmp(sp_err_msg(), "thread message") == 0;
            }
        }
    }
    assert_true(other_ok);
}

static void t_log_file(void **s)
{
    (void)s;
    char path[512];
    sp_test_path("run.log", path, sizeof path);
    sp_log_init(3, 4, SP_LOG_WARN);
    assert_int_equal(sp_log_open_file(path), SP_OK);
    SP_INFO("hello %d", 5);
    SP_WARN("careful");
    sp_log_close_file();
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    char line[512];
    assert_non_null(fgets(line, sizeof line, f));
    /* "YYYY-MM-DDTHH:MM:SS.mmm r3 INFO  hello 5" */
    assert_non_null(strstr(line, " r3 INFO  hello 5"));
    assert_int_equal(line[4], '-');
    assert_int_equal(line[10], 'T');
    assert_non_null(fgets(line, sizeof line, f));
    assert_non_null(strstr(line, " r3 WARN  careful"));
    fclose(f);
    assert_int_equal(sp_log_open_file("/nonexistent-dir/x.log"), SP_ERR_IO);
    assert_non_null(strstr(sp_err_msg(), "/nonexistent-dir/x.log"));
    sp_log_init(0, 1, SP_LOG_INFO);
}

static void spin(double sec)
{
    double t0 = sp_wtime();
    volatile double x = 0;
    while (sp_wtime() - t0 < sec) x += 1.0;
}

static void t_prof_nesting(void **s)
{
    (void)s;
    sp_prof_init(0);
    for (int i = 0; i < 3; i++) {
        sp_prof_push("cells");
        sp_prof_push("prep");
        spin(0.01);
        sp_prof_bytes(1000);
        sp_prof_pop();
        sp_prof_push("fit");
        spin(0.02);
        sp_prof_push_fine("inner"); /* fine disabled: not recorded */
        sp_prof_pop_fine();
        sp_prof_pop();
        sp_prof_pop();
    }
    sp_prof_push("finish");
    sp_prof_pop();
    sp_prof_row *rows = NULL;
    int n = 0;
    assert_int_equal(sp_prof_rows(&rows, &n), SP_OK);
    assert_int_equal(n, 4);
    assert_string_equal(rows[0].path, "cells");
    assert_string_equal(rows[1].path, "cells/prep");
    assert_string_equal(rows[2].path, "cells/fit");
    assert_string_equal(rows[3].path, "finish");
    assert_int_equal(rows[0].calls, 3);
    assert_int_equal(rows[1].depth, 1);
    assert_true(rows[1].wall >= 0.03 && rows[1].wall < 0.3);
    assert_true(rows[2].wall >= 0.06 && rows[2].wall < 0.6);
    /* own time of the parent excludes its children */
    assert_true(rows[0].own >= 0 && rows[0].own < 0.02);
    assert_true(fabs(rows[1].bytes - 3000) < 1e-9);
    free(rows);

    sp_prof_init(1);
    sp_prof_push_fine("inner");
    sp_prof_pop_fine();
    assert_int_equal(sp_prof_rows(&rows, &n), SP_OK);
    assert_int_equal(n, 1);
    free(rows);
}

static void t_prof_overhead(void **s)
{
    (void)s;
    /* Many pairs are counted, not timed (the cost is measured by tests/bench/bench_prof.c, not by a
     * timed test that a loaded machine or valgrind would fail). */
    sp_prof_init(0);
    for (int i = 0; i < 100000; i++) {
        sp_prof_push("x");
        sp_prof_pop();
    }
    sp_prof_row *rows = NULL;
    int n = 0;
    assert_int_equal(sp_prof_rows(&rows, &n), SP_OK);
    long calls = -1;
    for (int k = 0; k < n; k++)
        if (!strcmp(rows[k].path, "x")) calls = (long)rows[k].calls;
    free(rows);
    assert_int_equal(calls, 100000);
    assert_true(sp_prof_peak_rss() > 1e5);
}

static void t_progress(void **s)
{
    (void)s;
    sp_progress p;
    sp_progress_start(&p, "cells", 10, 0.001);
    for (int i = 1; i <= 10; i++) sp_progress_update(&p, i);
    sp_progress_finish(&p);
    assert_int_equal(p.done, 10);
    assert_int_equal(p.active, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(t_error_propagation), cmocka_unit_test(t_error_thread_local),
        cmocka_unit_test(t_log_file),          cmocka_unit_test(t_prof_nesting),
        cmocka_unit_test(t_prof_overhead),     cmocka_unit_test(t_progress),
    };
    return cmocka_run_group_tests_name("core", tests, NULL, NULL);
}

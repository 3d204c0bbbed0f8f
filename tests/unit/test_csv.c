/* test_csv.c — CSV catalog reader: quoting, lookup, verbatim IDs, NaN, errors, speed. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "support.h"
#include "surveyproc/sp_csv.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_prof.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static sp_csv *read_ok(const char *name, const char *text)
{
    char path[600];
    sp_test_write(name, text, path, sizeof path);
    sp_csv *t = NULL;
    int st = sp_csv_read(path, &t);
    if (st) fail_msg("%s: %s", name, sp_err_msg());
    assert_non_null(t);
    return t;
}

/* Expect failure `code` with a message starting "PATH:LINE: " and containing `what`. */
static void read_bad(const char *name, const char *text, int code, int line, const char *what)
{
    char path[600], want[700];
    sp_test_write(name, text, path, sizeof path);
    sp_csv *t = NULL;
    sp_err_clear();
    assert_int_equal(sp_csv_read(path, &t), code);
    assert_null(t);
    snprintf(want, sizeof want, "%s:%d: ", path, line);
    if (strncmp(sp_err_msg(), want, strlen(want)) != 0 || !strstr(sp_err_msg(), what))
        fail_msg("%s: got '%s', want prefix '%s' and '%s'", name, sp_err_msg(), want, what);
}

static void t_basic_and_quotes(void **s)
{
    (void)s;
    sp_csv *t = read_ok("q.csv",
                        "# a comment line\n"
                        "\n"
                        "ID, RA ,Dec,name,TYPE\n"
                        "007,150.1,2.2,\"Smith, J.\",STAR\n"
                        "  0042 ,150.2,  2.3 ,\"say \"\"hi\"\"\",EXP\n"
                        "\n"
                        "# comment between rows\n"
                        "A-1,150.3,2.4,\"\",\"  padded  \"\n"
                        "x,1,2,\"multi\nline\",DEV\n"
                        "last,3,4,plain,SERSIC"); /* no final newline */
    assert_int_equal(t->ncol, 5);
    assert_int_equal(t->nrow, 5);
    assert_string_equal(t->colnames[1], "RA"); /* trimmed */
    /* case-insensitive lookup */
    assert_int_equal(sp_csv_col(t, "ra"), 1);
    assert_int_equal(sp_csv_col(t, "DEC"), 2);
    assert_int_equal(sp_csv_col(t, "id"), 0);
    assert_int_equal(sp_csv_col(t, "FLUX_g"), -1);
    /* IDs verbatim: leading zeros kept, only surrounding blanks trimmed */
    assert_string_equal(sp_csv_cell(t, 0, 0), "007");
    assert_string_equal(sp_csv_cell(t, 1, 0), "0042");
    assert_string_equal(sp_csv_cell(t, 2, 0), "A-1");
    /* quoted commas, doubled quotes, empty quoted, inner blanks of quoted kept */
    assert_string_equal(sp_csv_cell(t, 0, 3), "Smith, J.");
    assert_string_equal(sp_csv_cell(t, 1, 3), "say \"hi\"");
    assert_string_equal(sp_csv_cell(t, 2, 3), "");
    assert_string_equal(sp_csv_cell(t, 2, 4), "  padded  ");
    assert_string_equal(sp_csv_cell(t, 3, 3), "multi\nline");
    assert_string_equal(sp_csv_cell(t, 4, 4), "SERSIC");
    /* physical line numbers of each row (comments, blanks, embedded newline counted) */
    assert_int_equal(t->lines[0], 4);
    assert_int_equal(t->lines[1], 5);
    assert_int_equal(t->lines[2], 8);
    assert_int_equal(t->lines[3], 9);
    assert_int_equal(t->lines[4], 11);
    /* out of range */
    assert_null(sp_csv_cell(t, 5, 0));
    assert_null(sp_csv_cell(t, 0, 5));
    assert_null(sp_csv_cell(t, -1, 0));

    double v[5];
    assert_int_equal(sp_csv_col_double(t, 2, v), SP_OK);
    assert_true(v[0] == 2.2 && v[1] == 2.3 && v[2] == 2.4 && v[3] == 2.0 && v[4] == 4.0);
    assert_string_equal(t->path + strlen(t->path) - 5, "q.csv");
    sp_csv_free(&t);
    assert_null(t);
    sp_csv_free(&t);
}

static void t_nan_and_numbers(void **s)
{
    (void)s;
    sp_csv *t = read_ok("n.csv", "ra,flux\n"
                                 "1.5,\n"
                                 "2,nan\n"
                                 "3,NaN\n"
                                 "4,  NAN \n"
                                 "5,-1.25e-3\n"
                                 "6,\"\"\n"
                                 "7,\"12.5\"\n"
                                 "8,+7\n");
    double f[8];
    assert_int_equal(sp_csv_col_double(t, sp_csv_col(t, "FLUX"), f), SP_OK);
    for (int i = 0; i < 4; i++) assert_true(isnan(f[i]));
    assert_true(f[4] == -1.25e-3);
    assert_true(isnan(f[5]));
    assert_true(f[6] == 12.5);
    assert_true(f[7] == 7.0);
    sp_csv_free(&t);

    t = read_ok("bad_num.csv", "ID,RA,DEC\n"
                               "1,150.0,2.0\n"
                               "# skipped\n"
                               "2,150.1x,2.1\n");
    double r[2];
    sp_err_clear();
    assert_int_equal(sp_csv_col_double(t, 1, r), SP_ERR_INPUT);
    assert_non_null(strstr(sp_err_msg(), "bad_num.csv:4: column RA: '150.1x' is not a number"));
    assert_int_equal(sp_csv_col_double(t, 0, r), SP_OK); /* numeric IDs still convert */
    assert_true(r[0] == 1.0 && r[1] == 2.0);
    assert_int_equal(sp_csv_col_double(t, 7, r), SP_ERR_INTERNAL);
    sp_csv_free(&t);

    t = read_ok("huge.csv", "x\n1e999\n");
    assert_int_equal(sp_csv_col_double(t, 0, r), SP_ERR_INPUT);
    assert_non_null(strstr(sp_err_msg(), "huge.csv:2:"));
    sp_csv_free(&t);
}

static void t_crlf_bom_header_only(void **s)
{
    (void)s;
    sp_csv *t = read_ok("crlf.csv", "\xEF\xBB\xBFID,RA,DEC\r\n"
                                    "a,1.0,2.0\r\n"
                                    "\r\n"
                                    "\"b\r\nc\",3.0,4.0\r\n");
    assert_int_equal(t->ncol, 3);
    assert_int_equal(t->nrow, 2);
    assert_string_equal(t->colnames[0], "ID"); /* BOM not part of the name */
    assert_int_equal(sp_csv_col(t, "id"), 0);
    assert_string_equal(sp_csv_cell(t, 0, 2), "2.0"); /* no stray \r */
    assert_string_equal(sp_csv_cell(t, 1, 0), "b\r\nc");
    assert_int_equal(t->lines[1], 4);
    double d[2];
    assert_int_equal(sp_csv_col_double(t, 2, d), SP_OK);
    assert_true(d[0] == 2.0 && d[1] == 4.0);
    sp_csv_free(&t);

    /* header only: a valid table with zero rows at this level */
    t = read_ok("hdr_only.csv", "# catalog\nRA,DEC\n\n");
    assert_int_equal(t->nrow, 0);
    assert_int_equal(t->ncol, 2);
    assert_int_equal(sp_csv_col_double(t, 0, d), SP_OK);
    sp_csv_free(&t);

    /* trailing blanks only on the last line, no newline */
    t = read_ok("tail.csv", "a,b\n1,2\n   ");
    assert_int_equal(t->nrow, 1);
    sp_csv_free(&t);
}

static void t_errors(void **s)
{
    (void)s;
    read_bad("short.csv", "ID,RA,DEC\n1,2,3\n# c\n4,5\n", SP_ERR_INPUT, 4, "row has 2 fields but the header (line 1) has 3");
    read_bad("long.csv", "ID,RA,DEC\n1,2,3,\n", SP_ERR_INPUT, 2, "row has 4 fields");
    read_bad("unquoted_comma.csv", "ID,RA,DEC\n\n1,Smith, J.,3\n", SP_ERR_INPUT, 3, "row has 4 fields");
    read_bad("empty.csv", "", SP_ERR_INPUT, 1, "empty CSV file");
    read_bad("blank.csv", "\n  \n# only comments\n", SP_ERR_INPUT, 3, "empty CSV file");
    read_bad("unterminated.csv", "ID,name\n1,ok\n2,\"never closed\n3,x\n", SP_ERR_INPUT, 3, "unterminated quoted field");
    read_bad("after_quote.csv", "ID,name\n1,\"a\"b\n", SP_ERR_INPUT, 2, "after a closing quote");
    read_bad("dup.csv", "ID,RA,ra\n1,2,3\n", SP_ERR_INPUT, 1, "duplicate column name 'ra'");
    read_bad("noname.csv", "\nID,,DEC\n1,2,3\n", SP_ERR_INPUT, 2, "column 2 of the header has no name");

    char path[600];
    sp_test_path("no_such.csv", path, sizeof path);
    sp_csv *t = NULL;
    sp_err_clear();
    assert_int_equal(sp_csv_read(path, &t), SP_ERR_IO);
    assert_non_null(strstr(sp_err_msg(), path));
    assert_null(t);
}

/* 1e5 rows x 8 columns: parse and convert quickly; values and IDs exact. */
static void t_large(void **s)
{
    (void)s;
    const long N = 100000;
    char path[600];
    sp_test_path("big.csv", path, sizeof path);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fprintf(f, "ID,RA,DEC,TYPE,FLUX_m400,FLUX_m625,ELL,NOTE\n");
    for (long i = 0; i < N; i++)
        fprintf(f, "%07ld,%.9f,%.9f,%s,%.6g,%s,%.3f,\"n%ld, ok\"\n", i, 150.0 + i * 1e-6, 2.0 - i * 1e-6,
                i % 3 ? "STAR" : "EXP", 1000.0 + i, i % 10 ? "12.5" : "", (i % 100) / 100.0, i);
    fclose(f);

    double t0 = sp_wtime();
    sp_csv *t = NULL;
    assert_int_equal(sp_csv_read(path, &t), SP_OK);
    double *ra = malloc(N * sizeof *ra), *fl = malloc(N * sizeof *fl);
    assert_int_equal(sp_csv_col_double(t, sp_csv_col(t, "ra"), ra), SP_OK);
    assert_int_equal(sp_csv_col_double(t, sp_csv_col(t, "flux_m625"), fl), SP_OK);
    double dt = sp_wtime() - t0;
    print_message("read 1e5 rows x 8 cols + 2 numeric columns in %.3f s\n", dt);
    assert_int_equal(t->nrow, N);
    assert_string_equal(sp_csv_cell(t, 42, 0), "0000042");
    assert_string_equal(sp_csv_cell(t, N - 1, 7), "n99999, ok");
    assert_int_equal(t->lines[N - 1], N + 1);
    for (long i = 0; i < N; i += 1237) {
        char want[32];
        snprintf(want, sizeof want, "%.9f", 150.0 + i * 1e-6);
        assert_true(ra[i] == strtod(want, NULL));
        assert_true(i % 10 ? fl[i] == 12.5 : isnan(fl[i]));
    }
    /* generous bound (ASan build on a shared 2-core box); release takes ~0.05 s */
    assert_true(dt < 5.0);
    free(ra), free(fl);
    sp_csv_free(&t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(t_basic_and_quotes), cmocka_unit_test(t_nan_and_numbers),
        cmocka_unit_test(t_crlf_bom_header_only), cmocka_unit_test(t_errors),
        cmocka_unit_test(t_large),
    };
    return cmocka_run_group_tests_name("csv", tests, NULL, NULL);
}

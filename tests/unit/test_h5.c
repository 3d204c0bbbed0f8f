/* test_h5.c — the HDF5 store layer, serial driver (MPI_COMM_NULL, no MPI_Init):
 * files, tables of every column type, fill values, row lists, column reads,
 * subsets of columns, arrays, attributes, groups, and error messages. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "support.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_h5.h"
#include "surveyproc/sp_plan.h"
#include "surveyproc/sp_store.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* The row of the all-types table as a C struct: the layer's offsets must match. */
typedef struct {
    char id[12];
    int8_t i8;
    uint8_t u8;
    int32_t i32;
    int64_t i64;
    float f32;
    double f64;
    uint8_t flag;
    char band[3];
} row_t;

static const sp_h5_col COLS[] = {
    {.name = "ID", .type = SP_H5_STR, .len = 12, .description = "source identifier"},
    {.name = "i8", .type = SP_H5_I8},
    {.name = "u8", .type = SP_H5_U8, .unit = "count"},
    {.name = "i32", .type = SP_H5_I32, .unit = "", .description = ""},
    {.name = "i64", .type = SP_H5_I64, .description = "big integer"},
    {.name = "f32", .type = SP_H5_F32, .unit = "pix"},
    {.name = "f64", .type = SP_H5_F64, .unit = "deg", .description = "right ascension (ICRS)"},
    {.name = "flag", .type = SP_H5_U8, .has_fill = 1, .fill = 7},
    {.name = "band", .type = SP_H5_STR, .len = 3},
};
#define NCOL (int)(sizeof COLS / sizeof COLS[0])

static void fill_row(row_t *r, long i)
{
    memset(r, 0, sizeof *r);
    snprintf(r->id, sizeof r->id, "src%ld", i);
    r->i8 = (int8_t)(i % 100 - 50);
    r->u8 = (uint8_t)(i % 250);
    r->i32 = (int32_t)(i * 1000 - 7);
    r->i64 = (int64_t)i * 10000000000LL;
    r->f32 = (float)i * 0.5f;
    r->f64 = 150.0 + (double)i * 1e-4;
    r->flag = (uint8_t)(i & 1);
    snprintf(r->band, sizeof r->band, "%c", "ugriz"[i % 5]);
}

static int is_fill_row(const row_t *r)
{
    return r->id[0] == '\0' && r->i8 == -1 && r->u8 == 0 && r->i32 == -1 && r->i64 == -1 && isnan(r->f32) &&
           isnan(r->f64) && r->flag == 7 && r->band[0] == '\0';
}

static sp_h5 *create_or_die(const char *name, char *path, size_t n)
{
    sp_h5 *h = NULL;
    sp_test_path(name, path, n);
    int st = sp_h5_create(path, MPI_COMM_NULL, &h);
    if (st) fprintf(stderr, "create: %s\n", sp_err_msg());
    assert_int_equal(st, SP_OK);
    assert_non_null(h);
    return h;
}

#define OK(call)                                                                                             \
    do {                                                                                                     \
        int st_ = (call);                                                                                    \
        if (st_ != SP_OK) fprintf(stderr, "%s -> %d: %s\n", #call, st_, sp_err_msg());                     \
        assert_int_equal(st_, SP_OK);                                                                        \
    } while (0)

static void t_layout(void **s)
{
    (void)s;
    size_t off[NCOL], rowsize = 0;
    OK(sp_h5_table_layout(COLS, NCOL, off, &rowsize));
    assert_int_equal(off[0], offsetof(row_t, id));
    assert_int_equal(off[1], offsetof(row_t, i8));
    assert_int_equal(off[2], offsetof(row_t, u8));
    assert_int_equal(off[3], offsetof(row_t, i32));
    assert_int_equal(off[4], offsetof(row_t, i64));
    assert_int_equal(off[5], offsetof(row_t, f32));
    assert_int_equal(off[6], offsetof(row_t, f64));
    assert_int_equal(off[7], offsetof(row_t, flag));
    assert_int_equal(off[8], offsetof(row_t, band));
    assert_int_equal(rowsize, sizeof(row_t));

    sp_h5_col bad[2] = {{.name = "a", .type = SP_H5_F64}, {.name = "a", .type = SP_H5_I32}};
    assert_int_equal(sp_h5_table_layout(bad, 2, off, &rowsize), SP_ERR_INTERNAL);
    assert_non_null(strstr(sp_err_msg(), "'a' appears twice"));
    bad[1] = (sp_h5_col){.name = "s", .type = SP_H5_STR, .len = 1};
    assert_int_equal(sp_h5_table_layout(bad, 2, off, &rowsize), SP_ERR_INTERNAL);
    assert_non_null(strstr(sp_err_msg(), "'s' needs len >= 2"));
    bad[1] = (sp_h5_col){.name = "x/y", .type = SP_H5_F32};
    assert_int_equal(sp_h5_table_layout(bad, 2, off, &rowsize), SP_ERR_INTERNAL);
    assert_non_null(strstr(sp_err_msg(), "x/y"));
    bad[1] = (sp_h5_col){.name = "n", .type = SP_H5_I32, .has_fill = 1, .fill = NAN};
    assert_int_equal(sp_h5_table_layout(bad, 2, off, &rowsize), SP_ERR_INTERNAL);
    assert_non_null(strstr(sp_err_msg(), "fill value"));
    assert_int_equal(sp_h5_table_layout(bad, 0, off, &rowsize), SP_ERR_INTERNAL);
}

static void t_table_all_types(void **s)
{
    (void)s;
    char path[512];
    const long N = 50;
    row_t *rows = calloc(N, sizeof *rows), *back = calloc(N, sizeof *back), *exp = calloc(N, sizeof *exp);
    assert_non_null(rows);
    sp_h5 *h = create_or_die("types.h5", path, sizeof path);
    assert_false(sp_h5_parallel(h));
    assert_true(sp_h5_writable(h));
    assert_string_equal(sp_h5_path(h), path);
    OK(sp_h5_table_create(h, "/cat/main", COLS, NCOL, N));
    long nrows = 0;
    OK(sp_h5_table_nrows(h, "/cat/main", &nrows));
    assert_int_equal(nrows, N);
    int ex = 0;
    OK(sp_h5_exists(h, "/cat", &ex));
    assert_true(ex);

    /* before any write every row is the fill row */
    OK(sp_h5_table_read(h, "/cat/main", COLS, NCOL, 0, N, back));
    for (long i = 0; i < N; i++) assert_true(is_fill_row(&back[i]));

    /* a range, then an unsorted list of rows; some rows stay unwritten */
    for (long i = 0; i < N; i++) fill_row(&exp[i], i);
    OK(sp_h5_table_write(h, "/cat/main", COLS, NCOL, 5, 10, &exp[5]));
    long idx[] = {40, 17, 33, 20, 49, 16};
    row_t lrows[6];
    for (int k = 0; k < 6; k++) lrows[k] = exp[idx[k]];
    OK(sp_h5_table_write_rows(h, "/cat/main", COLS, NCOL, idx, 6, lrows));
    OK(sp_h5_table_write_rows(h, "/cat/main", COLS, NCOL, NULL, 0, NULL)); /* nothing: fine */
    OK(sp_h5_flush(h));

    OK(sp_h5_table_read(h, "/cat/main", COLS, NCOL, 0, N, back));
    for (long i = 0; i < N; i++) {
        int written = (i >= 5 && i < 15);
        for (int k = 0; k < 6; k++) written |= idx[k] == i;
        if (written) assert_memory_equal(&back[i], &exp[i], sizeof(row_t));
        else assert_true(is_fill_row(&back[i]));
    }
    /* read a list in any order */
    row_t l2[3];
    long ridx[] = {49, 5, 33};
    OK(sp_h5_table_read_rows(h, "/cat/main", COLS, NCOL, ridx, 3, l2));
    for (int k = 0; k < 3; k++) assert_memory_equal(&l2[k], &exp[ridx[k]], sizeof(row_t));

    /* columns */
    double d[4];
    long l[4];
    char str[4][16];
    OK(sp_h5_table_read_col_double(h, "/cat/main", "f64", 13, 4, d));
    assert_true(d[0] == exp[13].f64 && d[1] == exp[14].f64 && isnan(d[2]) && d[3] == exp[16].f64);
    OK(sp_h5_table_read_col_double(h, "/cat/main", "i32", 14, 2, d)); /* int -> double, fill -1 */
    assert_true(d[0] == exp[14].i32 && d[1] == -1.0);
    OK(sp_h5_table_read_col_long(h, "/cat/main", "i64", 13, 3, l));
    assert_true(l[0] == exp[13].i64 && l[1] == exp[14].i64 && l[2] == -1);
    OK(sp_h5_table_read_col_long(h, "/cat/main", "u8", 14, 2, l));
    assert_true(l[0] == exp[14].u8 && l[1] == 0);
    OK(sp_h5_table_read_col_str(h, "/cat/main", "ID", 14, 3, &str[0][0], 16));
    assert_string_equal(str[0], "src14");
    assert_string_equal(str[1], "");
    assert_string_equal(str[2], "src16");
    assert_int_equal(sp_h5_table_read_col_str(h, "/cat/main", "ID", 0, 1, &str[0][0], 8), SP_ERR_INTERNAL);
    assert_non_null(strstr(sp_err_msg(), "width >= 12"));
    assert_int_equal(sp_h5_table_read_col_long(h, "/cat/main", "f32", 0, 1, l), SP_ERR_INPUT);
    assert_non_null(strstr(sp_err_msg(), "'f32' is not an integer column"));
    assert_int_equal(sp_h5_table_read_col_double(h, "/cat/main", "nope", 0, 1, d), SP_ERR_INPUT);
    assert_non_null(strstr(sp_err_msg(), "has no column 'nope'"));
    assert_int_equal(sp_h5_table_read_col_double(h, "/cat/main", "f64", 48, 3, d), SP_ERR_INPUT);
    assert_non_null(strstr(sp_err_msg(), "outside the table (50 rows)"));

    /* describe: what a generic exporter sees */
    sp_h5_table_info info;
    OK(sp_h5_table_describe(h, "/cat/main", &info));
    assert_int_equal(info.nrows, N);
    assert_int_equal(info.ncol, NCOL);
    for (int c = 0; c < NCOL; c++) {
        assert_string_equal(info.cols[c].name, COLS[c].name);
        assert_int_equal(info.cols[c].type, COLS[c].type);
        if (COLS[c].type == SP_H5_STR) assert_int_equal(info.cols[c].len, COLS[c].len);
        assert_string_equal(info.cols[c].unit, COLS[c].unit ? COLS[c].unit : "");
        assert_string_equal(info.cols[c].description, COLS[c].description ? COLS[c].description : "");
    }
    sp_h5_table_info_free(&info);
    assert_null(info.cols);

    /* unit attributes as h5py users read them */
    char *v = NULL;
    OK(sp_h5_attr_get_str(h, "/cat/main", "f64_unit", &v));
    assert_string_equal(v, "deg");
    free(v);
    OK(sp_h5_attr_exists(h, "/cat/main", "i32_unit", &ex));
    assert_false(ex); /* empty unit: no attribute */

    double wb = 0, rb = 0;
    sp_h5_bytes(h, &wb, &rb);
    assert_true(wb > 0 && rb > 0);
    OK(sp_h5_close(&h));
    assert_null(h);
    OK(sp_h5_close(&h)); /* NULL: no-op */

    /* reopen read-only: same contents; writes refused */
    OK(sp_h5_open(path, 0, MPI_COMM_NULL, &h));
    memset(back, 0, N * sizeof *back);
    OK(sp_h5_table_read(h, "/cat/main", COLS, NCOL, 0, N, back));
    assert_memory_equal(&back[7], &exp[7], sizeof(row_t));
    assert_true(is_fill_row(&back[0]));
    assert_int_equal(sp_h5_table_write(h, "/cat/main", COLS, NCOL, 0, 1, exp), SP_ERR_INTERNAL);
    assert_non_null(strstr(sp_err_msg(), "read-only"));
    OK(sp_h5_close(&h));

    /* reopen read-write and complete the table */
    OK(sp_h5_open(path, 1, MPI_COMM_NULL, &h));
    OK(sp_h5_table_write(h, "/cat/main", COLS, NCOL, 0, N, exp));
    OK(sp_h5_table_read(h, "/cat/main", COLS, NCOL, 0, N, back));
    assert_memory_equal(back, exp, N * sizeof(row_t));
    OK(sp_h5_close(&h));
    free(rows);
    free(back);
    free(exp);
}

/* A subset of the columns, in another order: HDF5 converts by name. */
static void t_table_subset(void **s)
{
    (void)s;
    char path[512];
    sp_h5 *h = create_or_die("subset.h5", path, sizeof path);
    OK(sp_h5_table_create(h, "/t", COLS, NCOL, 8));
    row_t all[8];
    for (int i = 0; i < 8; i++) fill_row(&all[i], i);
    OK(sp_h5_table_write(h, "/t", COLS, NCOL, 0, 8, all));

    struct {
        double mag;  /* new values for f64 */
        int64_t big; /* read-back of i64 */
    } sub[3];
    sp_h5_col sc[2] = {{.name = "f64", .type = SP_H5_F64}, {.name = "i64", .type = SP_H5_I64}};
    size_t off[2], rs;
    OK(sp_h5_table_layout(sc, 2, off, &rs));
    assert_int_equal(rs, sizeof sub[0]);
    for (int k = 0; k < 3; k++) {
        sub[k].mag = 20.0 + k;
        sub[k].big = all[2 + k].i64;
    }
    OK(sp_h5_table_write(h, "/t", sc, 2, 2, 3, sub)); /* only those two columns change */
    /* a float column read into double and an int column read into int32: converted */
    struct {
        int32_t i32v;
        double f32_as_f64;
    } r2[8];
    sp_h5_col rc[2] = {{.name = "i32", .type = SP_H5_I32}, {.name = "f32", .type = SP_H5_F64}};
    OK(sp_h5_table_read(h, "/t", rc, 2, 0, 8, r2));
    for (int i = 0; i < 8; i++) {
        assert_int_equal(r2[i].i32v, all[i].i32);
        assert_true(r2[i].f32_as_f64 == (double)all[i].f32);
    }
    row_t back[8];
    OK(sp_h5_table_read(h, "/t", COLS, NCOL, 0, 8, back));
    for (int i = 0; i < 8; i++) {
        row_t e = all[i];
        if (i >= 2 && i < 5) e.f64 = 20.0 + (i - 2);
        assert_memory_equal(&back[i], &e, sizeof e);
    }
    /* kind mismatch and missing column */
    sp_h5_col wrong = {.name = "ID", .type = SP_H5_F64};
    assert_int_equal(sp_h5_table_read(h, "/t", &wrong, 1, 0, 1, r2), SP_ERR_INPUT);
    assert_non_null(strstr(sp_err_msg(), "column 'ID' is a string in the file"));
    sp_h5_col missing = {.name = "FLUX_g", .type = SP_H5_F64};
    assert_int_equal(sp_h5_table_write(h, "/t", &missing, 1, 0, 1, r2), SP_ERR_INPUT);
    assert_non_null(strstr(sp_err_msg(), "/t has no column 'FLUX_g'"));
    /* bad row lists */
    long bad[] = {3, 8};
    assert_int_equal(sp_h5_table_write_rows(h, "/t", COLS, NCOL, bad, 2, all), SP_ERR_INPUT);
    assert_non_null(strstr(sp_err_msg(), "row index 8 (entry 1) is outside the table (8 rows)"));
    long dup[] = {3, 1, 3};
    assert_int_equal(sp_h5_table_write_rows(h, "/t", COLS, NCOL, dup, 3, all), SP_ERR_INTERNAL);
    assert_non_null(strstr(sp_err_msg(), "row index 3 appears twice"));
    assert_int_equal(sp_h5_table_write(h, "/t", COLS, NCOL, 6, 3, all), SP_ERR_INPUT);
    assert_non_null(strstr(sp_err_msg(), "rows 6..8 are outside the table (8 rows)"));
    /* creating it twice */
    assert_int_equal(sp_h5_table_create(h, "/t", COLS, NCOL, 8), SP_ERR_INPUT);
    assert_non_null(strstr(sp_err_msg(), "/t already exists"));
    /* zero-row table */
    OK(sp_h5_table_create(h, "/empty", COLS, NCOL, 0));
    long nr = -1;
    OK(sp_h5_table_nrows(h, "/empty", &nr));
    assert_int_equal(nr, 0);
    OK(sp_h5_table_read(h, "/empty", COLS, NCOL, 0, 0, back));
    OK(sp_h5_close(&h));
}

/* Many rows, big enough to go through several I/O pieces, by an unsorted list. */
static void t_table_large_list(void **s)
{
    (void)s;
    char path[512];
    const long N = 120000; /* rows of 48 bytes: > 8 MiB, so the I/O is split */
    sp_h5 *h = create_or_die("large.h5", path, sizeof path);
    OK(sp_h5_table_create(h, "/big", COLS, NCOL, N));
    row_t *w = malloc(N * sizeof *w), *r = malloc(N * sizeof *r);
    long *idx = malloc(N * sizeof *idx);
    assert_true(w && r && idx);
    /* a permutation of the even rows */
    long n = 0;
    for (long i = 0; i < N; i += 2) idx[n++] = (i * 7919) % N / 2 * 2;
    for (long k = 0; k < n; k++) fill_row(&w[k], idx[k]);
    /* (i*7919) % N over even i hits each even row once because gcd(7919, N/2) == 1 */
    OK(sp_h5_table_write_rows(h, "/big", COLS, NCOL, idx, n, w));
    OK(sp_h5_table_read(h, "/big", COLS, NCOL, 0, N, r));
    for (long i = 0; i < N; i++) {
        if (i % 2) {
            assert_true(is_fill_row(&r[i]));
        } else {
            row_t e;
            fill_row(&e, i);
            assert_memory_equal(&r[i], &e, sizeof e);
        }
    }
    memset(r, 0, N * sizeof *r);
    OK(sp_h5_table_read_rows(h, "/big", COLS, NCOL, idx, n, r));
    assert_memory_equal(r, w, n * sizeof *r);
    OK(sp_h5_close(&h));
    free(w);
    free(r);
    free(idx);
}

static void t_arrays(void **s)
{
    (void)s;
    char path[512];
    sp_h5 *h = create_or_die("arrays.h5", path, sizeof path);
    long dims[4] = {3, 4, 5, 5}, chunk[4] = {1, 1, 5, 5};
    OK(sp_h5_array_create(h, "/epsf/g", SP_H5_F32, 4, dims, chunk, NULL));
    long d2[2] = {3, 4};
    OK(sp_h5_array_create(h, "/epsf/nstars", SP_H5_I32, 2, d2, NULL, NULL));
    double z = 0;
    OK(sp_h5_array_create(h, "/epsf/fallback", SP_H5_U8, 2, d2, NULL, &z));
    long d1 = 6;
    OK(sp_h5_array_create(h, "/v", SP_H5_F64, 1, &d1, NULL, NULL));
    OK(sp_h5_array_create(h, "/i64", SP_H5_I64, 1, &d1, NULL, NULL));
    OK(sp_h5_array_create(h, "/i8", SP_H5_I8, 1, &d1, NULL, NULL));

    int nd = 0;
    long got[SP_H5_MAXDIM];
    OK(sp_h5_dims(h, "/epsf/g", &nd, got));
    assert_int_equal(nd, 4);
    assert_true(got[0] == 3 && got[1] == 4 && got[2] == 5 && got[3] == 5);

    /* one cell's PSF written from doubles into the float dataset */
    double psf[25];
    for (int i = 0; i < 25; i++) psf[i] = i / 25.0;
    long st[4] = {2, 1, 0, 0}, ct[4] = {1, 1, 5, 5};
    OK(sp_h5_array_write(h, "/epsf/g", SP_H5_F64, st, ct, psf));
    float all[3 * 4 * 25];
    OK(sp_h5_array_read(h, "/epsf/g", SP_H5_F32, NULL, NULL, all));
    for (int cy = 0; cy < 3; cy++)
        for (int cx = 0; cx < 4; cx++)
            for (int i = 0; i < 25; i++) {
                float v = all[(cy * 4 + cx) * 25 + i];
                if (cy == 2 && cx == 1) assert_true(v == (float)(i / 25.0));
                else assert_true(isnan(v));
            }
    int ns[12];
    OK(sp_h5_array_read(h, "/epsf/nstars", SP_H5_I32, NULL, NULL, ns));
    for (int i = 0; i < 12; i++) assert_int_equal(ns[i], -1);
    int one = 17;
    long s2[2] = {1, 3}, c2[2] = {1, 1};
    OK(sp_h5_array_write(h, "/epsf/nstars", SP_H5_I32, s2, c2, &one));
    long nsl[12];
    (void)nsl;
    double nsd[12];
    OK(sp_h5_array_read(h, "/epsf/nstars", SP_H5_F64, NULL, NULL, nsd));
    assert_true(nsd[7] == 17.0 && nsd[6] == -1.0);
    uint8_t fb[12];
    OK(sp_h5_array_read(h, "/epsf/fallback", SP_H5_U8, NULL, NULL, fb));
    for (int i = 0; i < 12; i++) assert_int_equal(fb[i], 0);
    int64_t big[6] = {1, -2, 3000000000000LL, 4, 5, 6}, bigr[6];
    OK(sp_h5_array_write(h, "/i64", SP_H5_I64, NULL, NULL, big));
    OK(sp_h5_array_read(h, "/i64", SP_H5_I64, NULL, NULL, bigr));
    assert_memory_equal(big, bigr, sizeof big);
    int8_t i8[6] = {-5, 0, 5, 127, -128, 1}, i8r[6];
    OK(sp_h5_array_write(h, "/i8", SP_H5_I8, NULL, NULL, i8));
    OK(sp_h5_array_read(h, "/i8", SP_H5_I8, NULL, NULL, i8r));
    assert_memory_equal(i8, i8r, sizeof i8);

    /* errors */
    long bad[4] = {3, 0, 0, 0};
    assert_int_equal(sp_h5_array_write(h, "/epsf/g", SP_H5_F64, bad, ct, psf), SP_ERR_INPUT);
    assert_non_null(strstr(sp_err_msg(), "dimension 0: 3..3 is outside 0..2"));
    assert_int_equal(sp_h5_array_create(h, "/s", SP_H5_STR, 1, &d1, NULL, NULL), SP_ERR_INTERNAL);
    long badchunk = 7;
    assert_int_equal(sp_h5_array_create(h, "/c", SP_H5_F32, 1, &d1, &badchunk, NULL), SP_ERR_INTERNAL);
    assert_non_null(strstr(sp_err_msg(), "chunk dimension 0 is 7"));
    assert_int_equal(sp_h5_array_read(h, "/epsf", SP_H5_F32, NULL, NULL, all), SP_ERR_INPUT);
    assert_non_null(strstr(sp_err_msg(), "/epsf is a group, not a dataset"));
    assert_int_equal(sp_h5_table_nrows(h, "/epsf/g", &d1), SP_ERR_INPUT);
    assert_int_equal(sp_h5_table_read(h, "/v", COLS, NCOL, 0, 1, all), SP_ERR_INPUT);
    assert_non_null(strstr(sp_err_msg(), "/v is not a table"));
    OK(sp_h5_close(&h));
}

static void t_attributes_groups(void **s)
{
    (void)s;
    char path[512];
    sp_h5 *h = create_or_die("attrs.h5", path, sizeof path);
    OK(sp_h5_group_create(h, "/provenance"));
    OK(sp_h5_group_create(h, "/provenance")); /* exists: fine */
    OK(sp_h5_group_create(h, "/a/b/c"));      /* parents too */
    int ex = 0;
    OK(sp_h5_exists(h, "/a/b", &ex));
    assert_true(ex);
    OK(sp_h5_exists(h, "/nope/deeper/still", &ex));
    assert_false(ex);
    OK(sp_h5_exists(h, "/", &ex));
    assert_true(ex);

    /* a long text (a config file) as a string attribute: no 64 KiB limit */
    size_t n = 200000;
    char *text = malloc(n + 1);
    for (size_t i = 0; i < n; i++) text[i] = (i % 61 == 60) ? '\n' : (char)('a' + i % 26);
    text[n] = '\0';
    OK(sp_h5_attr_set_str(h, "/provenance", "config", text));
    OK(sp_h5_attr_set_str(h, "/", "version", "0.1.0 (\xc3\xa9t\xc3\xa9)")); /* UTF-8 */
    OK(sp_h5_attr_set_str(h, "/", "empty", ""));
    OK(sp_h5_attr_set_double(h, "/provenance", "zp_ref", 25.0));
    OK(sp_h5_attr_set_long(h, "/provenance", "mpi_size", 4));
    OK(sp_h5_attr_set_long(h, "/provenance", "mpi_size", 8)); /* replace */
    double dv[3] = {1.5, NAN, -2};
    long lv[2] = {-3, 5000000000L};
    OK(sp_h5_attr_set_doubles(h, "/a/b/c", "bbox", dv, 3));
    OK(sp_h5_attr_set_longs(h, "/a/b/c", "shape", lv, 2));

    char *v = NULL;
    OK(sp_h5_attr_get_str(h, "/provenance", "config", &v));
    assert_string_equal(v, text);
    free(v);
    OK(sp_h5_attr_get_str(h, "/", "version", &v));
    assert_string_equal(v, "0.1.0 (\xc3\xa9t\xc3\xa9)");
    free(v);
    OK(sp_h5_attr_get_str(h, "/", "empty", &v));
    assert_string_equal(v, "");
    free(v);
    double d = 0;
    long l = 0;
    OK(sp_h5_attr_get_double(h, "/provenance", "zp_ref", &d));
    assert_true(d == 25.0);
    OK(sp_h5_attr_get_long(h, "/provenance", "mpi_size", &l));
    assert_int_equal(l, 8);
    OK(sp_h5_attr_get_double(h, "/provenance", "mpi_size", &d)); /* int read as double */
    assert_true(d == 8.0);
    double dr[4];
    long lr[4], cnt = 0;
    OK(sp_h5_attr_get_doubles(h, "/a/b/c", "bbox", dr, 4, &cnt));
    assert_int_equal(cnt, 3);
    assert_true(dr[0] == 1.5 && isnan(dr[1]) && dr[2] == -2);
    OK(sp_h5_attr_get_longs(h, "/a/b/c", "shape", lr, 4, &cnt));
    assert_true(cnt == 2 && lr[0] == -3 && lr[1] == 5000000000L);
    assert_int_equal(sp_h5_attr_get_longs(h, "/a/b/c", "shape", lr, 1, &cnt), SP_ERR_INPUT);
    assert_non_null(strstr(sp_err_msg(), "has 2 values, room for 1"));

    /* errors */
    assert_int_equal(sp_h5_attr_get_str(h, "/provenance", "git", &v), SP_ERR_INPUT);
    assert_non_null(strstr(sp_err_msg(), "/provenance has no attribute 'git'"));
    assert_int_equal(sp_h5_attr_get_long(h, "/provenance", "zp_ref", &l), SP_ERR_INPUT);
    assert_non_null(strstr(sp_err_msg(), "zp_ref is not an integer"));
    assert_int_equal(sp_h5_attr_get_str(h, "/provenance", "zp_ref", &v), SP_ERR_INPUT);
    assert_int_equal(sp_h5_attr_set_double(h, "/missing", "x", 1), SP_ERR_INPUT);
    assert_non_null(strstr(sp_err_msg(), "no object /missing"));
    assert_int_equal(sp_h5_attr_set_str(h, "relative", "x", "y"), SP_ERR_INTERNAL);
    long one = 1;
    OK(sp_h5_array_create(h, "/a/arr", SP_H5_F32, 1, &one, NULL, NULL));
    assert_int_equal(sp_h5_group_create(h, "/a/arr"), SP_ERR_INPUT);
    assert_non_null(strstr(sp_err_msg(), "/a/arr exists and is not a group"));
    OK(sp_h5_close(&h));
    free(text);
}

static void t_open_errors(void **s)
{
    (void)s;
    char path[512], dir[512];
    sp_h5 *h = NULL;
    /* missing file */
    sp_test_path("nope.h5", path, sizeof path);
    assert_int_equal(sp_h5_open(path, 0, MPI_COMM_NULL, &h), SP_ERR_IO);
    assert_null(h);
    assert_non_null(strstr(sp_err_msg(), path));
    assert_non_null(strstr(sp_err_msg(), "missing file"));
    /* not HDF5 */
    sp_test_write("text.h5", "RA,DEC\n1,2\n", path, sizeof path);
    assert_int_equal(sp_h5_open(path, 0, MPI_COMM_NULL, &h), SP_ERR_IO);
    assert_non_null(strstr(sp_err_msg(), "not an HDF5 file"));
    sp_test_write("empty.h5", "", path, sizeof path);
    assert_int_equal(sp_h5_open(path, 0, MPI_COMM_NULL, &h), SP_ERR_IO);
    assert_non_null(strstr(sp_err_msg(), "the file is empty"));
    /* a directory */
    assert_int_equal(sp_h5_open(sp_test_tmpdir(), 0, MPI_COMM_NULL, &h), SP_ERR_IO);
    assert_non_null(strstr(sp_err_msg(), "not a regular file"));
    /* create in a missing directory */
    snprintf(dir, sizeof dir, "%s/no/such/dir/out.h5", sp_test_tmpdir());
    assert_int_equal(sp_h5_create(dir, MPI_COMM_NULL, &h), SP_ERR_IO);
    assert_non_null(strstr(sp_err_msg(), "does not exist"));

    /* a truncated HDF5 file: HDF5's own reason comes through */
    h = create_or_die("trunc.h5", path, sizeof path);
    long big = 100000;
    OK(sp_h5_array_create(h, "/x", SP_H5_F64, 1, &big, NULL, NULL));
    OK(sp_h5_close(&h));
    assert_int_equal(truncate(path, 4000), 0);
    int st = sp_h5_open(path, 0, MPI_COMM_NULL, &h);
    assert_int_equal(st, SP_ERR_HDF5);
    assert_non_null(strstr(sp_err_msg(), path));
    assert_non_null(strstr(sp_err_msg(), "(HDF5: "));
    assert_non_null(strstr(sp_err_msg(), "truncated"));

    /* missing dataset in a good file */
    h = create_or_die("good.h5", path, sizeof path);
    double d[1];
    assert_int_equal(sp_h5_table_read_col_double(h, "/catalog", "RA", 0, 1, d), SP_ERR_INPUT);
    assert_non_null(strstr(sp_err_msg(), "no dataset /catalog in this file"));
    assert_non_null(strstr(sp_err_msg(), path));
    long dims[SP_H5_MAXDIM];
    int nd;
    assert_int_equal(sp_h5_dims(h, "/a/b", &nd, dims), SP_ERR_INPUT);
    OK(sp_h5_close(&h));
}

/* Too many columns for HDF5's 64 KiB datatype message: a clear message. */
static void t_too_many_columns(void **s)
{
    (void)s;
    char path[512];
    enum { NC = 1200 };
    sp_h5_col *c = calloc(NC, sizeof *c);
    char(*names)[24] = calloc(NC, 24);
    for (int i = 0; i < NC; i++) {
        snprintf(names[i], 24, "FLUXERR_band%04d", i);
        c[i] = (sp_h5_col){.name = names[i], .type = SP_H5_F32};
    }
    sp_h5 *h = create_or_die("wide.h5", path, sizeof path);
    OK(sp_h5_table_create(h, "/ok", c, 300, 10));
    assert_int_equal(sp_h5_table_create(h, "/wide", c, NC, 10), SP_ERR_INPUT);
    assert_non_null(strstr(sp_err_msg(), "1200 columns are too many"));
    OK(sp_h5_close(&h));
    free(c);
    free(names);
}

/* The store's /catalog spec for many bands (a 7DT tile has 40): every band gets its own columns,
 * named after it, and no two columns share an index or a name. (Until 2026-12-04 the column table
 * had a fixed capacity of 64 + 12 per band while a band has 16 columns: from 8 bands on, the
 * overflow's status code was taken for a column index and the last bands' columns aliased fixed
 * ones; the 32-band big tile ran and then stopped on a missing FLUX_m798_fit.) */
static void t_catalog_spec_many_bands(void **s)
{
    (void)s;
    for (int nb = 1; nb <= 48; nb += nb < 8 ? 1 : 8) {
        sp_plan plan;
        memset(&plan, 0, sizeof plan);
        plan.nbands = nb;
        plan.bands = calloc((size_t)nb, sizeof *plan.bands);
        for (int b = 0; b < nb; b++) snprintf(plan.bands[b], SP_BAND_MAX, "m%03d", 400 + 10 * b);
        sp_store_catalog spec;
        OK(sp_store_catalog_spec(&plan, &spec));
        assert_int_equal(spec.nbands, nb);
        int nfixed = spec.ncol - 16 * nb;
        assert_true(nfixed > 30 && nfixed < 64); /* 16 columns per band, the rest fixed */
        for (int i = 0; i < spec.ncol; i++)
            for (int j = i + 1; j < spec.ncol; j++) assert_string_not_equal(spec.cols[i].name, spec.cols[j].name);
        char want[64];
        for (int b = 0; b < nb; b++) {
            const sp_store_bandcols *c = &spec.band[b];
            const int idx[] = {c->flux_init, c->flux_aper, c->fluxerr_aper, c->aper_flags, c->flux_apcal,
                               c->fluxerr_apcal, c->apcal_flags, c->apcorr, c->flux_fit, c->fluxerr_fit,
                               c->fluxerr_cond, c->chi2dof, c->blend, c->psf_fallback, c->mag_fit, c->magerr_fit};
            for (int k = 0; k < 16; k++) {
                assert_true(idx[k] >= nfixed && idx[k] < spec.ncol);
                assert_non_null(strstr(spec.cols[idx[k]].name, plan.bands[b]));
            }
            snprintf(want, sizeof want, "FLUX_%s_fit", plan.bands[b]);
            assert_string_equal(spec.cols[c->flux_fit].name, want);
            snprintf(want, sizeof want, "MAGERR_%s_fit", plan.bands[b]);
            assert_string_equal(spec.cols[c->magerr_fit].name, want);
        }
        assert_string_equal(spec.cols[spec.fit_flags].name, "FIT_FLAGS");
        assert_true(spec.rowsize >= (size_t)spec.ncol);
        sp_store_catalog_spec_free(&spec);
        free(plan.bands);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(t_layout),       cmocka_unit_test(t_table_all_types),   cmocka_unit_test(t_table_subset),
        cmocka_unit_test(t_table_large_list), cmocka_unit_test(t_arrays), cmocka_unit_test(t_attributes_groups),
        cmocka_unit_test(t_open_errors),  cmocka_unit_test(t_too_many_columns),
        cmocka_unit_test(t_catalog_spec_many_bands),
    };
    return cmocka_run_group_tests_name("h5", tests, NULL, NULL);
}

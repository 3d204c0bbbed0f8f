/* test_fits.c — FITS subset reads, header keys, atomic writes, bad files. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "support.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_fits.h"

#include <dirent.h>
#include <fitsio.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* The value every test image holds at (x, y): unique per pixel, exact in float. */
static float pixval(long x, long y) { return (float)(x + 1000 * y) + 0.25f; }

static int exists(const char *p)
{
    struct stat st;
    return stat(p, &st) == 0;
}

/* Number of entries in the tmp dir whose name starts with prefix. */
static int count_prefix(const char *prefix)
{
    DIR *d = opendir(sp_test_tmpdir());
    int n = 0;
    struct dirent *e;
    while (d && (e = readdir(d)))
        if (strncmp(e->d_name, prefix, strlen(prefix)) == 0) n++;
    if (d) closedir(d);
    return n;
}

/* Write an nx x ny test image with our writer (rows in two chunks) and some keys. */
static void write_image(const char *path, long nx, long ny)
{
    sp_fits *f = NULL;
    float *data = malloc(sizeof(float) * nx * ny);
    assert_non_null(data);
    for (long y = 0; y < ny; y++)
        for (long x = 0; x < nx; x++) data[y * nx + x] = pixval(x, y);
    data[2 * nx + 3] = NAN; /* a null pixel */
    assert_int_equal(sp_fits_create(path, nx, ny, &f), SP_OK);
    assert_int_equal(sp_fits_write_key_string(f, "FILTER", "m625", "band name"), SP_OK);
    assert_int_equal(sp_fits_write_key_double(f, "ZP_AUTO", 23.123456789012345, "zero point"), SP_OK);
    assert_int_equal(sp_fits_write_key_double(f, "SKYSIG", 1.0 / 3.0, NULL), SP_OK);
    assert_int_equal(sp_fits_write_key_long(f, "NCOMBINE", 7, NULL), SP_OK);
    assert_int_equal(sp_fits_write_key_double(f, "HALF", 1.5, NULL), SP_OK);
    long half = ny / 2;
    assert_int_equal(sp_fits_write_rows(f, 0, half, data), SP_OK);
    assert_int_equal(sp_fits_write_rows(f, half, ny - half, data + half * nx), SP_OK);
    /* many keys after the data: cfitsio must make room without losing pixels */
    for (int i = 0; i < 60; i++) {
        char key[16];
        snprintf(key, sizeof key, "LATE%d", i);
        assert_int_equal(sp_fits_write_key_long(f, key, i, "written after the rows"), SP_OK);
    }
    assert_int_equal(sp_fits_commit(&f), SP_OK);
    assert_null(f);
    free(data);
}

static void t_roundtrip_and_subsets(void **s)
{
    (void)s;
    char path[600];
    sp_test_path("img.fits", path, sizeof path);
    const long NX = 37, NY = 23;
    write_image(path, NX, NY);
    assert_true(exists(path));
    assert_int_equal(count_prefix("img.fits.tmp"), 0);

    sp_fits *f = NULL;
    assert_int_equal(sp_fits_open(path, &f), SP_OK);
    long nx, ny;
    sp_fits_shape(f, &nx, &ny);
    assert_int_equal(nx, NX);
    assert_int_equal(ny, NY);
    assert_int_equal(sp_fits_hdu(f), 1);
    assert_string_equal(sp_fits_path(f), path);

    /* whole image */
    float *all = malloc(sizeof(float) * NX * NY);
    assert_int_equal(sp_fits_read_subset(f, 0, 0, NX, NY, all), SP_OK);
    for (long y = 0; y < NY; y++)
        for (long x = 0; x < NX; x++) {
            if (x == 3 && y == 2)
                assert_true(isnan(all[y * NX + x]));
            else
                assert_true(all[y * NX + x] == pixval(x, y));
        }
    free(all);

    /* rectangles crossing each edge and a corner, and one fully outside */
    const long boxes[][4] = {{-3, -2, 10, 8}, {30, 18, 12, 9}, {-5, 10, 50, 3}, {5, -4, 3, 40},
                             {100, 100, 4, 4}, {10, 5, 6, 7}, {-10, -10, 5, 5}};
    for (size_t b = 0; b < sizeof boxes / sizeof boxes[0]; b++) {
        long x0 = boxes[b][0], y0 = boxes[b][1], bw = boxes[b][2], bh = boxes[b][3];
        float *sub = malloc(sizeof(float) * bw * bh);
        for (long i = 0; i < bw * bh; i++) sub[i] = -1.0f; /* must all be overwritten */
        assert_int_equal(sp_fits_read_subset(f, x0, y0, bw, bh, sub), SP_OK);
        for (long j = 0; j < bh; j++)
            for (long i = 0; i < bw; i++) {
                long x = x0 + i, y = y0 + j;
                float v = sub[j * bw + i];
                if (x < 0 || y < 0 || x >= NX || y >= NY || (x == 3 && y == 2))
                    assert_true(isnan(v));
                else
                    assert_true(v == pixval(x, y));
            }
        free(sub);
    }
    /* zero-size request is fine and touches nothing */
    float dummy = 5.0f;
    assert_int_equal(sp_fits_read_subset(f, 0, 0, 0, 4, &dummy), SP_OK);
    assert_true(dummy == 5.0f);
    sp_fits_close(&f);
    assert_null(f);
    sp_fits_close(&f); /* safe on NULL */
}

static void t_header_keys(void **s)
{
    (void)s;
    char path[600];
    sp_test_path("keys.fits", path, sizeof path);
    write_image(path, 8, 6);
    sp_fits *f = NULL;
    assert_int_equal(sp_fits_open(path, &f), SP_OK);

    double d = 0;
    long l = 0;
    char str[32];
    int found = -1;
    assert_int_equal(sp_fits_key_double(f, "ZP_AUTO", 1, &d, NULL), SP_OK);
    assert_true(d == 23.123456789012345); /* 17 significant digits round-trip exactly */
    assert_int_equal(sp_fits_key_double(f, "SKYSIG", 1, &d, &found), SP_OK);
    assert_true(d == 1.0 / 3.0);
    assert_int_equal(found, 1);
    assert_int_equal(sp_fits_key_long(f, "NCOMBINE", 1, &l, NULL), SP_OK);
    assert_int_equal(l, 7);
    assert_int_equal(sp_fits_key_double(f, "NCOMBINE", 1, &d, NULL), SP_OK); /* int read as double */
    assert_true(d == 7.0);
    assert_int_equal(sp_fits_key_string(f, "FILTER", 1, str, sizeof str, NULL), SP_OK);
    assert_string_equal(str, "m625");
    assert_int_equal(sp_fits_key_string(f, "filter", 1, str, sizeof str, NULL), SP_OK); /* FITS keys: any case */
    assert_string_equal(str, "m625");
    assert_int_equal(sp_fits_key_long(f, "LATE59", 1, &l, NULL), SP_OK);
    assert_int_equal(l, 59);
    assert_int_equal(sp_fits_key_long(f, "NAXIS1", 1, &l, NULL), SP_OK);
    assert_int_equal(l, 8);

    /* missing: required -> message naming file, HDU and key; optional -> found = 0 */
    sp_err_clear();
    assert_int_equal(sp_fits_key_double(f, "SATURATE", 1, &d, NULL), SP_ERR_INPUT);
    char want[700];
    snprintf(want, sizeof want, "%s[HDU 1]: missing header key SATURATE", path);
    assert_string_equal(sp_err_msg(), want);
    d = -42;
    assert_int_equal(sp_fits_key_double(f, "SATURATE", 0, &d, &found), SP_OK);
    assert_int_equal(found, 0);
    assert_true(d == -42); /* untouched */
    assert_int_equal(sp_fits_key_string(f, "NOPE", 0, str, sizeof str, &found), SP_OK);
    assert_int_equal(found, 0);
    assert_int_equal(sp_fits_key_long(f, "NOPE", 1, &l, NULL), SP_ERR_INPUT);

    /* wrong types */
    assert_int_equal(sp_fits_key_double(f, "FILTER", 1, &d, NULL), SP_ERR_INPUT);
    assert_non_null(strstr(sp_err_msg(), "FILTER"));
    assert_non_null(strstr(sp_err_msg(), "m625"));
    assert_int_equal(sp_fits_key_long(f, "HALF", 1, &l, NULL), SP_ERR_INPUT);
    assert_non_null(strstr(sp_err_msg(), "not an integer"));
    /* a number read as string gives its text */
    assert_int_equal(sp_fits_key_string(f, "NCOMBINE", 1, str, sizeof str, NULL), SP_OK);
    assert_string_equal(str, "7");
    /* value longer than the caller's buffer */
    char tiny[3];
    assert_int_equal(sp_fits_key_string(f, "FILTER", 1, tiny, sizeof tiny, NULL), SP_ERR_INPUT);
    sp_fits_close(&f);
}

static void t_header_text_and_checksum(void **s)
{
    (void)s;
    char p1[600], p2[600];
    sp_test_path("h1.fits", p1, sizeof p1);
    sp_test_path("h2.fits", p2, sizeof p2);
    write_image(p1, 8, 6);

    /* a second file: same image, one key differs, plus raw cards (structural
     * cards in the input are skipped, not duplicated) */
    sp_fits *w = NULL;
    char cards[5 * 80 + 1];
    const char *c[5] = {"SIMPLE  =                    T", "NAXIS   =                    2",
                        "OBJECT  = 'tile 42'          / from raw cards", "AIRMASS =                1.234",
                        "END"};
    for (int i = 0; i < 5; i++) snprintf(cards + 80 * i, 81, "%-80s", c[i]);
    assert_int_equal(sp_fits_create(p2, 8, 6, &w), SP_OK);
    assert_int_equal(sp_fits_write_key_string(w, "FILTER", "m650", NULL), SP_OK);
    assert_int_equal(sp_fits_write_cards(w, cards, 5), SP_OK);
    float zero[48] = {0};
    assert_int_equal(sp_fits_write_rows(w, 0, 6, zero), SP_OK);
    assert_int_equal(sp_fits_write_rows(w, 5, 2, zero), SP_ERR_INTERNAL); /* past the last row */
    assert_int_equal(sp_fits_commit(&w), SP_OK);

    sp_fits *f = NULL;
    assert_int_equal(sp_fits_open(p2, &f), SP_OK);
    char str[32];
    double am = 0;
    assert_int_equal(sp_fits_key_string(f, "OBJECT", 1, str, sizeof str, NULL), SP_OK);
    assert_string_equal(str, "tile 42");
    assert_int_equal(sp_fits_key_double(f, "AIRMASS", 1, &am, NULL), SP_OK);
    assert_true(am == 1.234);
    char *hdr = NULL;
    int nkeys = 0;
    assert_int_equal(sp_fits_header(f, &hdr, &nkeys), SP_OK);
    assert_int_equal((int)strlen(hdr) % 80, 0);
    assert_true(nkeys >= 8 && (size_t)nkeys * 80 <= strlen(hdr));
    assert_non_null(strstr(hdr, "FILTER  = 'm650"));
    /* exactly one SIMPLE and one NAXIS card */
    assert_ptr_equal(strstr(hdr, "SIMPLE  ="), hdr);
    assert_null(strstr(hdr + 80, "SIMPLE  ="));
    char *nax = strstr(hdr, "NAXIS   =");
    assert_non_null(nax);
    assert_null(strstr(nax + 80, "NAXIS   ="));
    free(hdr);
    unsigned long sum2 = 0;
    assert_int_equal(sp_fits_header_checksum(f, &sum2), SP_OK);
    sp_fits_close(&f);

    unsigned long a = 0, b = 0;
    assert_int_equal(sp_fits_open(p1, &f), SP_OK);
    assert_int_equal(sp_fits_header_checksum(f, &a), SP_OK);
    sp_fits_close(&f);
    assert_int_equal(sp_fits_open(p1, &f), SP_OK);
    assert_int_equal(sp_fits_header_checksum(f, &b), SP_OK);
    sp_fits_close(&f);
    assert_true(a == b);      /* stable */
    assert_true(a != sum2);   /* and sensitive to the header */
    assert_true(a <= 0xFFFFFFFFul);
}

/* Copy the first `keep` bytes of src to dst. */
static void truncate_copy(const char *src, const char *dst, long keep)
{
    FILE *in = fopen(src, "rb"), *out = fopen(dst, "wb");
    assert_non_null(in);
    assert_non_null(out);
    char buf[4096];
    long left = keep;
    while (left > 0) {
        size_t n = fread(buf, 1, left < (long)sizeof buf ? (size_t)left : sizeof buf, in);
        if (n == 0) break;
        fwrite(buf, 1, n, out);
        left -= (long)n;
    }
    fclose(in);
    fclose(out);
}

static void t_truncated(void **s)
{
    (void)s;
    char full[600], cut[600], cuthdr[600];
    sp_test_path("full.fits", full, sizeof full);
    sp_test_path("cut.fits", cut, sizeof cut);
    sp_test_path("cuthdr.fits", cuthdr, sizeof cuthdr);
    write_image(full, 200, 150); /* 120000 bytes of data after a 2880-byte header */

    /* cut in the middle of the data */
    truncate_copy(full, cut, 2880 + 60000);
    sp_fits *f = NULL;
    sp_err_clear();
    assert_int_equal(sp_fits_open(cut, &f), SP_ERR_FITS);
    assert_null(f);
    const char *m = sp_err_msg();
    assert_non_null(strstr(m, cut));
    assert_non_null(strstr(m, "[HDU 1]"));
    assert_non_null(strstr(m, "truncated"));
    assert_non_null(strstr(m, "cfitsio error")); /* cfitsio's own words are included */

    /* cut inside the header */
    truncate_copy(full, cuthdr, 1000);
    sp_err_clear();
    assert_int_equal(sp_fits_open(cuthdr, &f), SP_ERR_FITS);
    assert_non_null(strstr(sp_err_msg(), cuthdr));
    assert_non_null(strstr(sp_err_msg(), "cfitsio error"));
}

static void t_not_fits_and_missing(void **s)
{
    (void)s;
    char txt[600], empty[600], missing[600];
    sp_test_write("notes.fits", "this is a text file, not FITS\n", txt, sizeof txt);
    sp_test_write("empty.fits", "", empty, sizeof empty);
    sp_test_path("does_not_exist.fits", missing, sizeof missing);
    sp_fits *f = NULL;

    sp_err_clear();
    assert_int_equal(sp_fits_open(txt, &f), SP_ERR_FITS);
    assert_non_null(strstr(sp_err_msg(), txt));
    assert_non_null(strstr(sp_err_msg(), "cfitsio error"));
    assert_null(f);

    assert_int_equal(sp_fits_open(empty, &f), SP_ERR_FITS);
    assert_non_null(strstr(sp_err_msg(), empty));

    sp_err_clear();
    assert_int_equal(sp_fits_open(missing, &f), SP_ERR_IO);
    assert_non_null(strstr(sp_err_msg(), missing));
    assert_non_null(strstr(sp_err_msg(), "No such file"));

    /* a directory is not an image */
    assert_int_equal(sp_fits_open(sp_test_tmpdir(), &f), SP_ERR_IO);
    assert_null(f);
}

/* Build files with cfitsio directly: an empty primary + image extension, an
 * integer image with BLANK and scaling, and a file with no 2-D image. */
static void t_extension_and_integer_images(void **s)
{
    (void)s;
    char ext[600], ints[600], cube[600];
    sp_test_path("ext.fits", ext, sizeof ext);
    sp_test_path("ints.fits", ints, sizeof ints);
    sp_test_path("cube.fits", cube, sizeof cube);
    int st = 0;
    fitsfile *fp = NULL;

    /* empty primary, then a 5 x 4 float image extension */
    long n2[2] = {5, 4};
    float v[20];
    for (int i = 0; i < 20; i++) v[i] = pixval(i % 5, i / 5);
    fits_create_diskfile(&fp, ext, &st);
    fits_create_img(fp, FLOAT_IMG, 0, NULL, &st);
    fits_update_key_str(fp, "ORIGIN", "primary", NULL, &st);
    fits_create_img(fp, FLOAT_IMG, 2, n2, &st);
    fits_update_key_str(fp, "FILTER", "ext-band", NULL, &st);
    fits_write_img(fp, TFLOAT, 1, 20, v, &st);
    fits_close_file(fp, &st);
    assert_int_equal(st, 0);
    sp_fits *f = NULL;
    assert_int_equal(sp_fits_open(ext, &f), SP_OK);
    assert_int_equal(sp_fits_hdu(f), 2);
    long nx, ny;
    sp_fits_shape(f, &nx, &ny);
    assert_int_equal(nx, 5);
    assert_int_equal(ny, 4);
    char str[32];
    assert_int_equal(sp_fits_key_string(f, "FILTER", 1, str, sizeof str, NULL), SP_OK);
    assert_string_equal(str, "ext-band");
    float out[6];
    assert_int_equal(sp_fits_read_subset(f, 3, 2, 3, 2, out), SP_OK);
    assert_true(out[0] == pixval(3, 2) && out[1] == pixval(4, 2) && isnan(out[2]));
    assert_true(out[3] == pixval(3, 3) && out[4] == pixval(4, 3) && isnan(out[5]));
    sp_err_clear();
    assert_int_equal(sp_fits_key_double(f, "ZP_AUTO", 1, NULL, NULL), SP_ERR_INPUT);
    assert_non_null(strstr(sp_err_msg(), "[HDU 2]: missing header key ZP_AUTO"));
    sp_fits_close(&f);

    /* 16-bit integers with BSCALE/BZERO and BLANK: scaled floats, BLANK -> NaN */
    short iv[6] = {0, 1, 2, -32768, 100, -5};
    long n3[2] = {3, 2};
    st = 0;
    fits_create_diskfile(&fp, ints, &st);
    fits_create_img(fp, SHORT_IMG, 2, n3, &st);
    fits_update_key_dbl(fp, "BSCALE", 0.5, -15, NULL, &st);
    fits_update_key_dbl(fp, "BZERO", 10.0, -15, NULL, &st);
    fits_update_key_lng(fp, "BLANK", -32768, NULL, &st);
    fits_set_bscale(fp, 1.0, 0.0, &st); /* write raw stored values */
    fits_write_img(fp, TSHORT, 1, 6, iv, &st);
    fits_close_file(fp, &st);
    assert_int_equal(st, 0);
    assert_int_equal(sp_fits_open(ints, &f), SP_OK);
    assert_int_equal(sp_fits_read_subset(f, 0, 0, 3, 2, out), SP_OK);
    assert_true(out[0] == 10.0f && out[1] == 10.5f && out[2] == 11.0f);
    assert_true(isnan(out[3]));
    assert_true(out[4] == 60.0f && out[5] == 7.5f);
    sp_fits_close(&f);

    /* only a 3-D cube and a table: no 2-D image anywhere */
    long n4[3] = {4, 4, 3};
    st = 0;
    fits_create_diskfile(&fp, cube, &st);
    fits_create_img(fp, FLOAT_IMG, 3, n4, &st);
    char *ttype[1] = {"RA"}, *tform[1] = {"1D"};
    fits_create_tbl(fp, BINARY_TBL, 0, 1, ttype, tform, NULL, "CAT", &st);
    fits_close_file(fp, &st);
    assert_int_equal(st, 0);
    sp_err_clear();
    assert_int_equal(sp_fits_open(cube, &f), SP_ERR_FITS);
    assert_non_null(strstr(sp_err_msg(), cube));
    assert_non_null(strstr(sp_err_msg(), "no 2-D image"));
    assert_null(f);
}

static void t_atomic_write(void **s)
{
    (void)s;
    char path[600], bad[600];
    sp_test_path("atomic.fits", path, sizeof path);
    snprintf(bad, sizeof bad, "%s/no/such/dir/x.fits", sp_test_tmpdir());

    /* abort: neither the file nor its temp remains */
    sp_fits *w = NULL;
    float row[10] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
    assert_int_equal(sp_fits_create(path, 10, 3, &w), SP_OK);
    assert_int_equal(sp_fits_write_rows(w, 0, 1, row), SP_OK);
    assert_false(exists(path)); /* nothing at the final path while writing */
    assert_int_equal(count_prefix("atomic.fits"), 1);
    sp_fits_abort(&w);
    assert_null(w);
    assert_int_equal(count_prefix("atomic.fits"), 0);
    sp_fits_abort(&w); /* safe on NULL */

    /* commit replaces an existing file at once */
    write_image(path, 6, 5);
    assert_int_equal(sp_fits_create(path, 4, 4, &w), SP_OK);
    sp_fits *r = NULL;
    assert_int_equal(sp_fits_open(path, &r), SP_OK); /* old file still readable meanwhile */
    long nx, ny;
    sp_fits_shape(r, &nx, &ny);
    assert_int_equal(nx, 6);
    sp_fits_close(&r);
    float z[16] = {0};
    assert_int_equal(sp_fits_write_rows(w, 0, 4, z), SP_OK);
    assert_int_equal(sp_fits_commit(&w), SP_OK);
    assert_int_equal(sp_fits_open(path, &r), SP_OK);
    sp_fits_shape(r, &nx, &ny);
    assert_int_equal(nx, 4);
    /* a read handle is not a writer */
    assert_int_equal(sp_fits_write_key_long(r, "X", 1, NULL), SP_ERR_STATE);
    assert_int_equal(sp_fits_commit(&r), SP_ERR_STATE);
    assert_non_null(r);
    sp_fits_close(&r);
    assert_int_equal(count_prefix("atomic.fits"), 1);

    /* unwritable place: I/O error naming the path */
    sp_err_clear();
    assert_int_equal(sp_fits_create(bad, 4, 4, &w), SP_ERR_IO);
    assert_null(w);
    assert_non_null(strstr(sp_err_msg(), bad));
    /* non-finite header values cannot be written */
    assert_int_equal(sp_fits_create(path, 2, 2, &w), SP_OK);
    assert_int_equal(sp_fits_write_key_double(w, "BAD", NAN, NULL), SP_ERR_INPUT);
    sp_fits_close(&w); /* closing a writer abandons it */
    assert_null(w);
    assert_int_equal(count_prefix("atomic.fits"), 1);
}

/* Two handles on one file, used from two threads at once: each must see its
 * own, correct pixels (cfitsio shares buffers between such handles). */
static void t_handles_independent(void **s)
{
    (void)s;
    char path[600];
    sp_test_path("shared.fits", path, sizeof path);
    const long NX = 300, NY = 200;
    write_image(path, NX, NY);
    int bad = 0;
#pragma omp parallel num_threads(2) reduction(+ : bad)
    {
        sp_fits *f = NULL;
        float buf[17 * 13];
        if (sp_fits_open(path, &f) != SP_OK) {
            bad++;
        } else {
            for (int it = 0; it < 300; it++) {
                long x0 = (it * 37) % (NX - 10) - 5, y0 = (it * 53) % (NY - 8) - 4;
                if (sp_fits_read_subset(f, x0, y0, 17, 13, buf) != SP_OK) {
                    bad++;
                    break;
                }
                for (long j = 0; j < 13; j++)
                    for (long i = 0; i < 17; i++) {
                        long x = x0 + i, y = y0 + j;
                        float v = buf[j * 17 + i];
                        int outside = x < 0 || y < 0 || x >= NX || y >= NY || (x == 3 && y == 2);
                        if (outside ? !isnan(v) : v != pixval(x, y)) bad++;
                    }
            }
            sp_fits_close(&f);
        }
    }
    assert_int_equal(bad, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(t_roundtrip_and_subsets),
        cmocka_unit_test(t_header_keys),
        cmocka_unit_test(t_header_text_and_checksum),
        cmocka_unit_test(t_truncated),
        cmocka_unit_test(t_not_fits_and_missing),
        cmocka_unit_test(t_extension_and_integer_images),
        cmocka_unit_test(t_atomic_write),
        cmocka_unit_test(t_handles_independent),
    };
    return cmocka_run_group_tests_name("fits", tests, NULL, NULL);
}

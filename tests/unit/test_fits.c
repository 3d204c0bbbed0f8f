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
#include <float.h>
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

/* ---- the direct read route against cfitsio ------------------------------------------- */

/* Write a 2-D image of `bitpix` with raw values `raw` (nx*ny of the C type of bitpix)
 * and optional BSCALE/BZERO/BLANK keys (raw values written as they are). */
static void write_raw(const char *path, int bitpix, long nx, long ny, const void *raw, double bscale, double bzero,
                      int has_blank, long blank, int compress)
{
    int st = 0;
    fitsfile *fp = NULL;
    long naxes[2] = {nx, ny};
    remove(path);
    fits_create_diskfile(&fp, path, &st);
    if (compress) fits_set_compression_type(fp, RICE_1, &st);
    fits_create_img(fp, bitpix, 2, naxes, &st);
    if (bscale != 1.0 || bzero != 0.0) {
        fits_update_key_dbl(fp, "BSCALE", bscale, -15, NULL, &st);
        fits_update_key_dbl(fp, "BZERO", bzero, -15, NULL, &st);
        fits_set_bscale(fp, 1.0, 0.0, &st); /* write the raw values */
    }
    if (has_blank) {
        fits_update_key_lng(fp, "BLANK", blank, NULL, &st);
        fits_set_imgnull(fp, 0, &st); /* raw values as they are */
    }
    int dt = bitpix == 8 ? TBYTE : bitpix == 16 ? TSHORT : bitpix == 32 ? TINT : bitpix == -32 ? TFLOAT : TDOUBLE;
    fits_write_img(fp, dt, 1, (LONGLONG)nx * ny, (void *)raw, &st);
    fits_close_file(fp, &st);
    if (st) fail_msg("%s: cfitsio status %d writing the test image", path, st);
}

/* Read the same ROIs with the direct route and with cfitsio's; the bytes must agree. */
static void compare_routes(const char *path, long nx, long ny, int want_direct)
{
    const long roi[][4] = {{0, 0, nx, ny},          {3, 2, 5, 4},          {-4, -3, 9, 7},  {nx - 3, ny - 2, 8, 6},
                           {-2, 1, nx + 4, 3},      {0, 1, nx, ny - 2},    {5, ny - 1, 1, 1}, {nx + 1, 0, 3, 3},
                           {2, -5, nx - 4, ny + 9}};
    sp_fits *fd = NULL, *fc = NULL;
    if (sp_fits_open(path, &fd) != SP_OK) fail_msg("%s", sp_err_msg());
    int old = sp_fits_set_direct(0);
    assert_int_equal(sp_fits_open(path, &fc), SP_OK);
    sp_fits_set_direct(old);
    if (sp_fits_direct(fd) != want_direct) fail_msg("%s: direct route %d, expected %d", path, sp_fits_direct(fd), want_direct);
    assert_int_equal(sp_fits_direct(fc), 0);
    for (size_t r = 0; r < sizeof roi / sizeof roi[0]; r++) {
        size_t n = (size_t)(roi[r][2] * roi[r][3]);
        float *a = malloc(n * sizeof(float)), *b = malloc(n * sizeof(float));
        memset(a, 0x55, n * sizeof(float));
        memset(b, 0xAA, n * sizeof(float));
        assert_int_equal(sp_fits_read_subset(fd, roi[r][0], roi[r][1], roi[r][2], roi[r][3], a), SP_OK);
        assert_int_equal(sp_fits_read_subset(fc, roi[r][0], roi[r][1], roi[r][2], roi[r][3], b), SP_OK);
        for (size_t i = 0; i < n; i++)
            if (memcmp(a + i, b + i, sizeof(float)))
                fail_msg("%s ROI %zu pixel %zu: direct %a, cfitsio %a", path, r, i, (double)a[i], (double)b[i]);
        free(a);
        free(b);
    }
    sp_fits_close(&fd);
    sp_fits_close(&fc);
}

static void t_direct_matches_cfitsio(void **s)
{
    (void)s;
    char path[600], gz[700], cmd[1600];
    const long nx = 37, ny = 23, n = nx * ny;
    unsigned seed = 777;
    float *f4 = malloc(n * sizeof *f4);
    double *f8 = malloc(n * sizeof *f8);
    int16_t *i2 = malloc(n * sizeof *i2);
    int32_t *i4 = malloc(n * sizeof *i4);
    uint8_t *u1 = malloc(n);
    for (long i = 0; i < n; i++) {
        seed = seed * 1103515245u + 12345u;
        double u = (seed >> 8) / 16777216.0;
        f4[i] = (float)((u - 0.3) * 1e4);
        f8[i] = (u - 0.3) * 1e5 + 1e-9;
        i2[i] = (int16_t)((int)(u * 65535) - 32768);
        i4[i] = (int32_t)((u - 0.5) * 4.2e9); /* beyond float's 24 bits: rounding */
        u1[i] = (uint8_t)(u * 255);
    }
    /* the special values cfitsio treats specially (null check with a NaN nulval):
     * NaN/Inf -> NaN, zero/denormal -> +0; the extremes of each type */
    const float fs[] = {NAN, INFINITY, -INFINITY, -0.0f, 0.0f, 1e-40f, -1e-42f, FLT_MAX, -FLT_MAX, FLT_MIN};
    const double ds[] = {NAN, INFINITY, -INFINITY, -0.0, 1e-310, 1e300, -1e300, 1e-300, DBL_MAX, 3.4028235e38};
    for (size_t k = 0; k < sizeof fs / sizeof fs[0]; k++) f4[7 * k + 1] = fs[k];
    for (size_t k = 0; k < sizeof ds / sizeof ds[0]; k++) f8[7 * k + 1] = ds[k];
    i2[0] = INT16_MIN, i2[1] = INT16_MAX, i4[0] = INT32_MIN, i4[1] = INT32_MAX, u1[0] = 0, u1[1] = 255;

    sp_test_path("d_f4.fits", path, sizeof path);
    write_raw(path, -32, nx, ny, f4, 1, 0, 0, 0, 0);
    compare_routes(path, nx, ny, 1);
    sp_test_path("d_f8.fits", path, sizeof path);
    write_raw(path, -64, nx, ny, f8, 1, 0, 0, 0, 0);
    compare_routes(path, nx, ny, 1);
    sp_test_path("d_i2.fits", path, sizeof path);
    write_raw(path, 16, nx, ny, i2, 1, 0, 0, 0, 0);
    compare_routes(path, nx, ny, 1);
    sp_test_path("d_u2.fits", path, sizeof path); /* unsigned 16-bit convention */
    write_raw(path, 16, nx, ny, i2, 1, 32768, 0, 0, 0);
    compare_routes(path, nx, ny, 1);
    sp_test_path("d_i2s.fits", path, sizeof path);
    write_raw(path, 16, nx, ny, i2, 0.37, -12.5, 0, 0, 0);
    compare_routes(path, nx, ny, 1);
    sp_test_path("d_i4.fits", path, sizeof path);
    write_raw(path, 32, nx, ny, i4, 1, 0, 0, 0, 0);
    compare_routes(path, nx, ny, 1);
    sp_test_path("d_u4.fits", path, sizeof path); /* unsigned 32-bit convention */
    write_raw(path, 32, nx, ny, i4, 1, 2147483648.0, 0, 0, 0);
    compare_routes(path, nx, ny, 1);
    sp_test_path("d_i4s.fits", path, sizeof path);
    write_raw(path, 32, nx, ny, i4, 2.5e-3, 1e5, 0, 0, 0);
    compare_routes(path, nx, ny, 1);
    sp_test_path("d_u1.fits", path, sizeof path);
    write_raw(path, 8, nx, ny, u1, 1, 0, 0, 0, 0);
    compare_routes(path, nx, ny, 1);
    sp_test_path("d_u1s.fits", path, sizeof path);
    write_raw(path, 8, nx, ny, u1, 0.5, -3, 0, 0, 0);
    compare_routes(path, nx, ny, 1);
    /* cfitsio's route: BLANK in an integer image, scaled floats, tile compression, gzip */
    sp_test_path("c_i2blank.fits", path, sizeof path);
    write_raw(path, 16, nx, ny, i2, 1, 0, 1, i2[5], 0);
    compare_routes(path, nx, ny, 0);
    sp_test_path("c_f4s.fits", path, sizeof path);
    write_raw(path, -32, nx, ny, f4, 2, 1, 0, 0, 0);
    compare_routes(path, nx, ny, 0);
    sp_test_path("c_rice.fits", path, sizeof path);
    write_raw(path, 16, nx, ny, i2, 1, 0, 0, 0, 1);
    compare_routes(path, nx, ny, 0);
    {
        /* lossless: the compressed file's pixels are the plain file's */
        char plain[600];
        sp_test_path("d_i2.fits", plain, sizeof plain);
        sp_fits *a = NULL, *b = NULL;
        float *pa = malloc(n * sizeof *pa), *pb = malloc(n * sizeof *pb);
        assert_int_equal(sp_fits_open(plain, &a), SP_OK);
        assert_int_equal(sp_fits_open(path, &b), SP_OK);
        assert_int_equal(sp_fits_read_subset(a, 0, 0, nx, ny, pa), SP_OK);
        assert_int_equal(sp_fits_read_subset(b, 0, 0, nx, ny, pb), SP_OK);
        assert_memory_equal(pa, pb, n * sizeof *pa);
        sp_fits_close(&a);
        sp_fits_close(&b);
        free(pa);
        free(pb);
    }
    sp_test_path("d_f4.fits", path, sizeof path);
    snprintf(gz, sizeof gz, "%s.gz", path);
    snprintf(cmd, sizeof cmd, "gzip -c '%s' > '%s'", path, gz);
    if (system(cmd) == 0) {
        compare_routes(gz, nx, ny, 0);
        /* cfitsio chooses the decompressor by ".Z" anywhere in the path: a gzip'ed file in a
         * folder named like mkdtemp's "sptest.Zab12c" (1 in 62 of this test's runs) must open */
        char zdir[700], zgz[800];
        snprintf(zdir, sizeof zdir, "%s/run.Zq3.bz2", sp_test_tmpdir());
        assert_int_equal(mkdir(zdir, 0700), 0);
        snprintf(zgz, sizeof zgz, "%s/d_f4.fits.gz", zdir);
        snprintf(cmd, sizeof cmd, "cp '%s' '%s'", gz, zgz);
        assert_int_equal(system(cmd), 0);
        compare_routes(zgz, nx, ny, 0);
    } else fprintf(stderr, "NOTE: gzip not available: the gzip'ed-file case of the direct route is not tested\n");

    /* rows longer than the read buffer (256 KB) and full-width spans */
    const long wx = 70001, wy = 3;
    float *w = malloc((size_t)(wx * wy) * sizeof *w);
    for (long i = 0; i < wx * wy; i++) w[i] = (float)i * 0.5f - 7.0f;
    sp_test_path("d_wide.fits", path, sizeof path);
    write_raw(path, -32, wx, wy, w, 1, 0, 0, 0, 0);
    compare_routes(path, wx, wy, 1);
    free(w);

    /* a file cut short after it was opened: the direct read says so, naming the file */
    sp_test_path("d_f4.fits", path, sizeof path);
    char cut[600];
    sp_test_path("d_cut.fits", cut, sizeof cut);
    truncate_copy(path, cut, 1L << 30);
    sp_fits *f = NULL;
    assert_int_equal(sp_fits_open(cut, &f), SP_OK);
    assert_int_equal(sp_fits_direct(f), 1);
    assert_int_equal(truncate(cut, 2880 + 4 * nx * 5), 0);
    float *out = malloc(n * sizeof *out);
    sp_err_clear();
    assert_int_equal(sp_fits_read_subset(f, 0, 0, nx, ny, out), SP_ERR_FITS);
    assert_non_null(strstr(sp_err_msg(), cut));
    assert_non_null(strstr(sp_err_msg(), "truncated"));
    /* rows before the cut still read */
    assert_int_equal(sp_fits_read_subset(f, 0, 1, nx, 3, out), SP_OK);
    assert_true(out[0] == f4[nx]);
    sp_fits_close(&f);
    free(out);
    free(f4);
    free(f8);
    free(i2);
    free(i4);
    free(u1);
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
        cmocka_unit_test(t_direct_matches_cfitsio),
    };
    return cmocka_run_group_tests_name("fits", tests, NULL, NULL);
}

/* test_psf.c — the oversampled ePSF: allocation rules, normalisation, the
 * interpolation accuracy against an analytic pixel-integrated Moffat, render vs
 * eval consistency, analytic position derivatives, blending and moments. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "support.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_psf.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

static void t_alloc_rules(void **s)
{
    (void)s;
    sp_psf *p = NULL;
    assert_int_equal(sp_psf_alloc(10, 4, &p), SP_ERR_INPUT);
    assert_null(p);
    assert_int_equal(sp_psf_alloc(1, 4, &p), SP_ERR_INPUT);
    assert_int_equal(sp_psf_alloc(11, 0, &p), SP_ERR_INPUT);
    assert_int_equal(sp_psf_alloc(11, 9, &p), SP_ERR_INPUT);
    assert_int_equal(sp_psf_alloc(11, 4, &p), SP_OK);
    assert_non_null(p);
    assert_int_equal(sp_psf_normalize(p), SP_ERR_NUMERIC); /* all zero */
    p->data[60] = 2.0f;
    assert_int_equal(sp_psf_normalize(p), SP_OK);
    assert_float_equal(p->data[60], 16.0, 1e-6);
    sp_psf *q = NULL;
    assert_int_equal(sp_psf_copy(p, &q), SP_OK);
    assert_float_equal(q->data[60], 16.0, 1e-6);
    sp_psf_free(&p);
    sp_psf_free(&q);
    assert_null(p);
    sp_psf_free(&p); /* safe on NULL */
    assert_int_equal(sp_psf_moffat(3.0, 0.9, 1.0, 0.0, 41, 4, &p), SP_ERR_INPUT);
    assert_null(p);
}

/* Normalisation: the sum of the rendered pixels of a centred and of an offset
 * source over a large grid is 1 (to the stamp truncation, which is zero here
 * since the stamp is normalised). */
static void t_unit_flux(void **s)
{
    (void)s;
    sp_psf *p = NULL;
    assert_int_equal(sp_psf_moffat(3.0, 3.0, 1.0, 0.0, 2 * 12 * 4 + 1, 4, &p), SP_OK);
    assert_int_equal(p->is_fallback, 1);
    double sum = 0.0;
    for (int j = -13; j <= 13; j++)
        for (int i = -13; i <= 13; i++) sum += sp_psf_eval(p, i, j);
    /* 2.5e-4 measured: the stamp is normalised by its Riemann sum over +-12 px,
     * the integer-offset sum reaches +-12.5 px of Moffat wing */
    assert_float_equal(sum, 1.0, 5e-4);
    enum { N = 31 };
    double *img = calloc(N * N, sizeof *img);
    sp_psf_render(p, 15.37, 14.81, N, N, img, NULL, NULL);
    sum = 0.0;
    for (int k = 0; k < N * N; k++) sum += img[k];
    assert_float_equal(sum, 1.0, 5e-4);
    assert_float_equal(sp_psf_eval(p, 40.0, 0.0), 0.0, 0.0);
    free(img);
    sp_psf_free(&p);
}

/* Interpolation error against the analytic pixel-integrated Moffat, and the
 * render derivatives against finite differences of the analytic function. The
 * bounds are twice the measured figures (psf.c header). */
static void t_interp_accuracy(void **s)
{
    (void)s;
    const double fwhm = 3.0, beta = 3.0, q = 0.8, th = 0.4;
    const int os = 4, half = 12;
    sp_psf *p = NULL;
    assert_int_equal(sp_psf_moffat(fwhm, beta, q, th, 2 * half * os + 1, os, &p), SP_OK);
    /* the stamp's normaliser, to compare with the same scale */
    double c = 0.5 * (p->size - 1), Z = 0.0, v;
    for (int j = 0; j < p->size; j++)
        for (int i = 0; i < p->size; i++) {
            sp_psf_moffat_pixel(fwhm, beta, q, th, (i - c) / os, (j - c) / os, &v);
            Z += v;
        }
    Z /= os * os;
    double peak;
    sp_psf_moffat_pixel(fwhm, beta, q, th, 0, 0, &peak);
    peak /= Z;
    enum { N = 17 };
    double img[N * N], gx[N * N], gy[N * N];
    double maxe = 0.0, maxd = 0.0, maxre = 0.0;
    srand(7);
    for (int t = 0; t < 12; t++) {
        double xc = 8.0 + rand() / (double)RAND_MAX - 0.5, yc = 8.0 + rand() / (double)RAND_MAX - 0.5;
        sp_psf_render(p, xc, yc, N, N, img, gx, gy);
        for (int j = 0; j < N; j++)
            for (int i = 0; i < N; i++) {
                double a, b1, b2, h = 1e-4;
                sp_psf_moffat_pixel(fwhm, beta, q, th, i - xc, j - yc, &a);
                a /= Z;
                double e = fabs(img[j * N + i] - a);
                if (e > maxe) maxe = e;
                double ev = fabs(sp_psf_eval(p, i - xc, j - yc) - img[j * N + i]);
                if (ev > maxre) maxre = ev;
                sp_psf_moffat_pixel(fwhm, beta, q, th, i - xc - h, j - yc, &b1);
                sp_psf_moffat_pixel(fwhm, beta, q, th, i - xc + h, j - yc, &b2);
                double d = fabs(gx[j * N + i] - (b1 - b2) / (2 * h) / Z);
                sp_psf_moffat_pixel(fwhm, beta, q, th, i - xc, j - yc - h, &b1);
                sp_psf_moffat_pixel(fwhm, beta, q, th, i - xc, j - yc + h, &b2);
                double dy = fabs(gy[j * N + i] - (b1 - b2) / (2 * h) / Z);
                if (d > maxd) maxd = d;
                if (dy > maxd) maxd = dy;
            }
    }
    printf("# interpolation: max|err|/peak %.2e, max|d err|/peak %.2e, eval-vs-render %.1e\n", maxe / peak,
           maxd / peak, maxre);
    assert_true(maxe / peak < 1e-4);
    assert_true(maxd / peak < 1e-3);
    assert_true(maxre < 1e-12);
    sp_psf_free(&p);
}

/* Rendering a source whose footprint is cut by the grid edge and one entirely
 * outside: no crash, zeros, and the visible part equals eval. */
static void t_render_edges(void **s)
{
    (void)s;
    sp_psf *p = NULL;
    assert_int_equal(sp_psf_moffat(2.5, 2.5, 1.0, 0.0, 61, 3, &p), SP_OK);
    enum { NX = 9, NY = 7 };
    double img[NX * NY], gx[NX * NY];
    sp_psf_render(p, -3.2, 8.9, NX, NY, img, gx, NULL);
    for (int j = 0; j < NY; j++)
        for (int i = 0; i < NX; i++) assert_float_equal(img[j * NX + i], sp_psf_eval(p, i + 3.2, j - 8.9), 1e-12);
    sp_psf_render(p, 500.0, -400.0, NX, NY, img, gx, NULL);
    for (int k = 0; k < NX * NY; k++) assert_float_equal(img[k], 0.0, 0.0);
    sp_psf_render(p, NAN, 3.0, NX, NY, img, NULL, NULL);
    for (int k = 0; k < NX * NY; k++) assert_float_equal(img[k], 0.0, 0.0);
    sp_psf_free(&p);
}

static void t_blend_moments(void **s)
{
    (void)s;
    sp_psf *a = NULL, *b = NULL, *o = NULL, *bad = NULL;
    assert_int_equal(sp_psf_moffat(2.0, 3.0, 1.0, 0.0, 81, 4, &a), SP_OK);
    assert_int_equal(sp_psf_moffat(4.0, 3.0, 1.0, 0.0, 81, 4, &b), SP_OK);
    assert_int_equal(sp_psf_alloc(81, 4, &o), SP_OK);
    assert_int_equal(sp_psf_alloc(41, 4, &bad), SP_OK);
    const sp_psf *in[2] = {a, b};
    double w[2] = {0.25, 0.75};
    assert_int_equal(sp_psf_blend(in, w, 2, o), SP_OK);
    assert_float_equal(o->fwhm, 3.5, 1e-12);
    double sum = 0.0;
    for (int k = 0; k < 81 * 81; k++) sum += o->data[k];
    assert_float_equal(sum / 16.0, 1.0, 1e-5);
    const sp_psf *in2[2] = {a, bad};
    assert_int_equal(sp_psf_blend(in2, w, 2, o), SP_ERR_INPUT);
    double cx, cy, fw;
    sp_psf_moments(a, &cx, &cy, &fw);
    assert_float_equal(cx, 0.0, 1e-6);
    assert_float_equal(cy, 0.0, 1e-6);
    /* the pixel-integrated (effective) PSF is broader than the Moffat itself */
    assert_true(fw > 2.0 && fw < 2.6);
    sp_psf_moments(b, &cx, &cy, &fw);
    assert_true(fw > 4.0 && fw < 4.4);
    sp_psf_free(&a);
    sp_psf_free(&b);
    sp_psf_free(&o);
    sp_psf_free(&bad);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(t_alloc_rules),  cmocka_unit_test(t_unit_flux),    cmocka_unit_test(t_interp_accuracy),
        cmocka_unit_test(t_render_edges), cmocka_unit_test(t_blend_moments),
    };
    return cmocka_run_group_tests_name("psf", tests, NULL, NULL);
}

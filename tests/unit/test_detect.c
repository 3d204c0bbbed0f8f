/* test_detect.c — detection on synthetic cells: completeness at SNR > 10 and
 * false positives at 5 sigma, centroid accuracy, shapes of round and
 * elliptical stars, deblending of touching peaks (and no split of one bright
 * star), edge / saturation flags, forced measurement, empty images. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "support.h"
#include "simimg.h"
#include "surveyproc/sp_background.h"
#include "surveyproc/sp_detect.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_prep.h"
#include "surveyproc/sp_psf.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FWHM 4.0
#define BETA 3.0

/* Optimal (PSF-weighted, sky-limited) SNR of a star of flux F: F sqrt(sum P^2) / sigma. */
static double psf_snr_per_flux(const sp_psf *truth, double sigma)
{
    double buf[41 * 41], s2 = 0;
    sp_psf_render(truth, 20.0, 20.0, 41, 41, buf, NULL, NULL);
    for (int k = 0; k < 41 * 41; k++) s2 += buf[k] * buf[k];
    return sqrt(s2) / sigma;
}

typedef struct {
    double x, y, flux, snr;
} star_t;

static void t_completeness(void **s)
{
    (void)s;
    const int nx = 1024, ny = 1024;
    const double sigma = 5.0;
    sp_psf *truth = NULL;
    assert_int_equal(sp_psf_moffat(FWHM, BETA, 1.0, 0.0, 4 * 30 + 1, 4, &truth), SP_OK);
    double k_snr = psf_snr_per_flux(truth, sigma);
    float *img = calloc((size_t)nx * ny, sizeof(float));
    double *scr = malloc(sizeof(double) * 40 * 40);
    sim_rng r;
    sim_seed(&r, 21);
    /* stars on a jittered 32-px grid (no blends), SNR log-uniform 3 .. 300 */
    int ns = 0;
    star_t *st = malloc(sizeof(star_t) * 1024);
    for (int gy = 0; gy < 31; gy++)
        for (int gx = 0; gx < 31; gx++) {
            star_t *t = &st[ns++];
            t->x = 24 + gx * 32 + 8 * (sim_unif(&r) - 0.5);
            t->y = 24 + gy * 32 + 8 * (sim_unif(&r) - 0.5);
            t->snr = 3.0 * pow(100.0, sim_unif(&r));
            t->flux = t->snr / k_snr;
            sim_add_star(img, nx, ny, truth, t->x, t->y, t->flux, scr);
        }
    sim_sky sky = {200.0, 0.01, 0.005, 20.0};
    sim_finish(img, NULL, nx, ny, &sky, sigma, 0.0, &r);

    sp_bkg *b = NULL;
    assert_int_equal(sp_bkg_estimate(img, NULL, NULL, nx, ny, NULL, &b), SP_OK);
    float *rms = malloc(sizeof(float) * nx * ny);
    assert_int_equal(sp_bkg_map(b, NULL, rms), SP_OK);
    assert_int_equal(sp_bkg_subtract(b, img), SP_OK);
    sp_bkg_free(&b);

    sp_psf *filt = NULL;
    assert_int_equal(sp_psf_moffat(FWHM, BETA, 1.0, 0.0, 41, 1, &filt), SP_OK);
    for (int mode = 0; mode < 2; mode++) {
        sp_detect_params p;
        sp_detect_params_default(&p);
        p.fwhm = FWHM;
        sp_source *src = NULL;
        int n = 0;
        assert_int_equal(sp_detect(img, rms, NULL, nx, ny, mode ? filt : NULL, &p, &src, &n), SP_OK);
        int n10 = 0, f10 = 0, nfalse = 0, n50 = 0;
        double dpos2 = 0, qmin = 1;
        int *hit = calloc((size_t)ns, sizeof(int));
        for (int k = 0; k < n; k++) {
            int best = -1;
            double bd = 1e9;
            for (int t = 0; t < ns; t++) {
                double d = hypot(src[k].x - st[t].x, src[k].y - st[t].y);
                if (d < bd) {
                    bd = d;
                    best = t;
                }
            }
            if (bd > 3.0)
                nfalse++;
            else {
                hit[best] = 1;
                if (st[best].snr > 50) {
                    dpos2 += bd * bd;
                    n50++;
                    if (src[k].q < qmin) qmin = src[k].q;
                }
            }
        }
        for (int t = 0; t < ns; t++)
            if (st[t].snr > 10) {
                n10++;
                f10 += hit[t];
            }
        double comp = (double)f10 / n10;
        printf("%s filter: %d detections, completeness(SNR>10) %d/%d = %.4f, false %d, "
               "centroid rms (SNR>50) %.4f px, min q %.3f\n",
               mode ? "PSF" : "Gaussian", n, f10, n10, comp, nfalse, sqrt(dpos2 / n50), qmin);
        assert_true(comp > 0.95);
        assert_true(nfalse <= 3);
        assert_true(sqrt(dpos2 / n50) < 0.05);
        assert_true(qmin > 0.85);
        /* sorted by flux, SNR consistent with the truth for bright stars */
        for (int k = 1; k < n; k++) assert_true(src[k - 1].flux >= src[k].flux);
        free(hit);
        free(src);
    }
    sp_psf_free(&filt);
    sp_psf_free(&truth);
    free(st);
    free(scr);
    free(rms);
    free(img);
}

/* A small noisy stamp with given stars; returns the background-subtracted image. */
static float *stamp(int nx, int ny, const sp_psf *psf, const double *xyf, int n, double sigma, uint64_t seed)
{
    float *img = calloc((size_t)nx * ny, sizeof(float));
    double *scr = malloc(sizeof(double) * 80 * 80);
    for (int k = 0; k < n; k++) sim_add_star(img, nx, ny, psf, xyf[3 * k], xyf[3 * k + 1], xyf[3 * k + 2], scr);
    sim_rng r;
    sim_seed(&r, seed);
    sim_sky sky = {0, 0, 0, 0};
    sim_finish(img, NULL, nx, ny, &sky, sigma, 0.0, &r);
    free(scr);
    return img;
}

static void t_deblend(void **s)
{
    (void)s;
    sp_psf *truth = NULL;
    assert_int_equal(sp_psf_moffat(FWHM, BETA, 1.0, 0.0, 4 * 30 + 1, 4, &truth), SP_OK);
    sp_detect_params p;
    sp_detect_params_default(&p);
    p.fwhm = FWHM;
    /* two equal stars 2.5 FWHM apart: two objects, both flagged blended */
    double two[6] = {60.3, 64.1, 2e4, 70.3, 64.6, 1.5e4};
    float *img = stamp(128, 128, truth, two, 2, 5.0, 3);
    sp_source *src = NULL;
    int n = 0;
    assert_int_equal(sp_detect(img, NULL, NULL, 128, 128, NULL, &p, &src, &n), SP_OK);
    printf("pair: %d objects", n);
    for (int k = 0; k < n; k++) printf(" (%.2f, %.2f flags %d)", src[k].x, src[k].y, src[k].flags);
    printf("\n");
    assert_int_equal(n, 2);
    assert_true(src[0].flags & SP_DET_BLENDED);
    assert_true(fabs(src[0].x - 60.3) < 0.5 || fabs(src[1].x - 60.3) < 0.5);
    free(src);
    free(img);
    /* with deblending off: one object */
    p.deblend = 0;
    img = stamp(128, 128, truth, two, 2, 5.0, 3);
    assert_int_equal(sp_detect(img, NULL, NULL, 128, 128, NULL, &p, &src, &n), SP_OK);
    assert_int_equal(n, 1);
    free(src);
    free(img);
    /* one very bright star with Poisson-like wings noise: not split */
    p.deblend = 1;
    double one[3] = {64.2, 63.7, 1e6};
    img = stamp(128, 128, truth, one, 1, 5.0, 4);
    assert_int_equal(sp_detect(img, NULL, NULL, 128, 128, NULL, &p, &src, &n), SP_OK);
    printf("bright star: %d objects, q %.3f, a %.3f\n", n, n ? src[0].q : 0, n ? src[0].a : 0);
    assert_int_equal(n, 1);
    assert_true(src[0].q > 0.95);
    assert_true(fabs(src[0].x - 64.2) < 0.02 && fabs(src[0].y - 63.7) < 0.02);
    free(src);
    free(img);
    sp_psf_free(&truth);
}

/* A faint star (SNR 20) 2.5 FWHM from one 10x brighter: the matched filter blurs the pair into
 * one peak with a shoulder; the deblender floods a narrower-filtered image (deblend_fwhm_frac) and
 * splits it. The old settings (detection image, 5 sigma, contrast 0.3) did not — kept as the
 * check that the test can tell. An extended source (FWHM 3x the seeing) stays whole. */
static void t_deblend_faint_neighbour(void **s)
{
    (void)s;
    sp_psf *truth = NULL, *wide = NULL;
    assert_int_equal(sp_psf_moffat(FWHM, BETA, 1.0, 0.0, 4 * 30 + 1, 4, &truth), SP_OK);
    assert_int_equal(sp_psf_moffat(3 * FWHM, BETA, 1.0, 0.0, 4 * 30 + 1, 4, &wide), SP_OK);
    double f20 = 20.0 / psf_snr_per_flux(truth, 5.0);
    int split_new = 0, split_old = 0, trials = 10;
    for (int t = 0; t < trials; t++) {
        double pair[6] = {60.3, 64.1, 10 * f20, 60.3 + 2.5 * FWHM, 64.6, f20};
        float *img = stamp(128, 128, truth, pair, 2, 5.0, 100 + t);
        sp_detect_params p;
        sp_detect_params_default(&p);
        p.fwhm = FWHM;
        sp_source *src = NULL;
        int n = 0;
        assert_int_equal(sp_detect(img, NULL, NULL, 128, 128, NULL, &p, &src, &n), SP_OK);
        for (int k = 0; k < n; k++) split_new += fabs(src[k].x - pair[3]) < 1.5 && fabs(src[k].y - pair[4]) < 1.5;
        free(src);
        p.deblend_fwhm_frac = 1;
        p.deblend_nsigma = 5;
        p.deblend_contrast = 0.3;
        assert_int_equal(sp_detect(img, NULL, NULL, 128, 128, NULL, &p, &src, &n), SP_OK);
        for (int k = 0; k < n; k++) split_old += fabs(src[k].x - pair[3]) < 1.5 && fabs(src[k].y - pair[4]) < 1.5;
        free(src);
        free(img);
    }
    printf("faint neighbour found in %d/%d trials (old settings %d/%d)\n", split_new, trials, split_old, trials);
    assert_true(split_new >= 9);
    assert_true(split_old <= 5);
    /* a bright extended source: one object */
    double one[3] = {64.2, 63.7, 3e5};
    float *img = stamp(128, 128, wide, one, 1, 5.0, 7);
    sp_detect_params p;
    sp_detect_params_default(&p);
    p.fwhm = FWHM;
    sp_source *src = NULL;
    int n = 0;
    assert_int_equal(sp_detect(img, NULL, NULL, 128, 128, NULL, &p, &src, &n), SP_OK);
    printf("extended source: %d objects\n", n);
    assert_int_equal(n, 1);
    free(src);
    free(img);
    sp_psf_free(&truth);
    sp_psf_free(&wide);
}

static void t_shape_and_flags(void **s)
{
    (void)s;
    /* elliptical Moffat: q 0.6, theta 30 deg */
    sp_psf *ell = NULL;
    double th = 30.0 * M_PI / 180.0;
    assert_int_equal(sp_psf_moffat(5.0, BETA, 0.6, th, 4 * 30 + 1, 4, &ell), SP_OK);
    double e1[3] = {50.4, 49.8, 5e4};
    float *img = stamp(100, 100, ell, e1, 1, 2.0, 7);
    sp_detect_params p;
    sp_detect_params_default(&p);
    p.fwhm = 4.0;
    sp_source *src = NULL;
    int n = 0;
    assert_int_equal(sp_detect(img, NULL, NULL, 100, 100, NULL, &p, &src, &n), SP_OK);
    assert_int_equal(n, 1);
    printf("ellipse: q %.3f theta %.2f deg (true 0.6, 30)\n", src[0].q, src[0].theta * 180 / M_PI);
    assert_true(fabs(src[0].q - 0.6) < 0.05);
    assert_true(fabs(src[0].theta - th) < 3.0 * M_PI / 180.0);
    free(src);
    free(img);
    sp_psf_free(&ell);

    /* edge and saturation flags */
    sp_psf *truth = NULL;
    assert_int_equal(sp_psf_moffat(FWHM, BETA, 1.0, 0.0, 4 * 30 + 1, 4, &truth), SP_OK);
    double two[6] = {2.5, 40.0, 2e4, 60.0, 40.0, 2e5};
    img = stamp(100, 80, truth, two, 2, 5.0, 9);
    uint8_t *mask = calloc(100 * 80, 1);
    for (int j = 38; j <= 42; j++)
        for (int i = 58; i <= 62; i++) mask[j * 100 + i] = SP_PIX_SAT | SP_PIX_BAD;
    p.fwhm = FWHM;
    assert_int_equal(sp_detect(img, NULL, mask, 100, 80, NULL, &p, &src, &n), SP_OK);
    int got_edge = 0, got_sat = 0;
    for (int k = 0; k < n; k++) {
        if (src[k].x < 10) got_edge |= src[k].flags & SP_DET_EDGE;
        if (fabs(src[k].x - 60) < 6) got_sat |= src[k].flags & SP_DET_SAT;
    }
    printf("flags: %d objects, edge %d sat %d\n", n, got_edge != 0, got_sat != 0);
    assert_true(got_edge);
    assert_true(got_sat);
    free(src);

    /* forced measurement at a reference position */
    sp_source m;
    assert_int_equal(sp_detect_measure(img, NULL, 5.0, mask, 100, 80, 3.0, 40.5, FWHM, SP_PIX_SAT, &m), SP_OK);
    assert_true(fabs(m.x - 2.5) < 0.2);
    assert_true(m.flags & SP_DET_EDGE);
    assert_true(m.snr > 100);
    assert_int_equal(sp_detect_measure(img, NULL, 5.0, mask, 100, 80, 60.0, 40.0, FWHM, SP_PIX_SAT, &m), SP_OK);
    assert_true(m.flags & SP_DET_SAT);
    assert_int_equal(sp_detect_measure(img, NULL, 5.0, mask, 100, 80, -5.0, 40.0, FWHM, SP_PIX_SAT, &m),
                     SP_ERR_INPUT);
    free(mask);
    free(img);
    sp_psf_free(&truth);
}

static void t_empty(void **s)
{
    (void)s;
    float *img = calloc(64 * 64, sizeof(float));
    sp_source *src = (sp_source *)0x1;
    int n = -1;
    assert_int_equal(sp_detect(img, NULL, NULL, 64, 64, NULL, NULL, &src, &n), SP_OK);
    assert_int_equal(n, 0);
    assert_null(src);
    sim_rng r;
    sim_seed(&r, 1);
    for (int k = 0; k < 64 * 64; k++) img[k] = (float)sim_gauss(&r);
    assert_int_equal(sp_detect(img, NULL, NULL, 64, 64, NULL, NULL, &src, &n), SP_OK);
    assert_int_equal(n, 0);
    sp_detect_params p;
    sp_detect_params_default(&p);
    p.minarea = 0;
    assert_int_equal(sp_detect(img, NULL, NULL, 64, 64, NULL, &p, &src, &n), SP_ERR_INPUT);
    free(img);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(t_completeness),
        cmocka_unit_test(t_deblend),
        cmocka_unit_test(t_deblend_faint_neighbour),
        cmocka_unit_test(t_shape_and_flags),
        cmocka_unit_test(t_empty),
    };
    return cmocka_run_group_tests_name("detect", tests, NULL, NULL);
}

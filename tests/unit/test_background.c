/* test_background.c — background mesh: clipped statistics, recovery of a known
 * sky (gradient + bowl) under stars and noise, masked / NaN / all-masked
 * regions, an empty image, parameter checks and the point evaluator. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "support.h"
#include "simimg.h"
#include "surveyproc/sp_background.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_prof.h"
#include "surveyproc/sp_psf.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void t_clipped_stats(void **s)
{
    (void)s;
    sim_rng r;
    sim_seed(&r, 11);
    size_t n = 20000;
    float *v = malloc(n * sizeof *v);
    for (size_t i = 0; i < n; i++) v[i] = (float)(10.0 + 2.0 * sim_gauss(&r));
    for (size_t i = 0; i < n / 20; i++) v[i] += 50.0f; /* 5% bright outliers */
    double mode, med, sig;
    size_t kept;
    assert_int_equal(sp_bkg_clipped_stats(v, n, 3.0, 10, &mode, &med, &sig, &kept), SP_OK);
    printf("clipped: mode %.4f median %.4f sigma %.4f kept %zu\n", mode, med, sig, kept);
    assert_true(fabs(med - 10.0) < 0.05);
    assert_true(fabs(mode - 10.0) < 0.1);
    assert_true(fabs(sig - 2.0) < 0.1);
    assert_true(kept < n - n / 20 + 50 && kept > n - n / 20 - 200);
    assert_int_equal(sp_bkg_clipped_stats(v, 0, 3.0, 5, &mode, NULL, NULL, NULL), SP_ERR_INPUT);
    assert_true(isnan(mode));
    free(v);
}

/* A 1024^2 cell: sky with a gradient and a bowl, 400 Moffat stars, Gaussian
 * noise with a Poisson term. */
typedef struct {
    int nx, ny;
    float *img, *ivar;
    sim_sky sky;
    double sigma;
} scene;

static void make_scene(scene *sc, int nx, int ny, int nstar, uint64_t seed)
{
    sc->nx = nx;
    sc->ny = ny;
    sc->sky = (sim_sky){100.0, 0.02, -0.012, 40.0};
    sc->sigma = 5.0;
    sc->img = calloc((size_t)nx * ny, sizeof(float));
    sc->ivar = calloc((size_t)nx * ny, sizeof(float));
    sp_psf *truth = NULL;
    assert_int_equal(sp_psf_moffat(4.0, 3.0, 1.0, 0.0, 4 * 40 + 1, 4, &truth), SP_OK);
    double *scr = malloc(sizeof(double) * 50 * 50);
    sim_rng r;
    sim_seed(&r, seed);
    for (int k = 0; k < nstar; k++) {
        double x = sim_unif(&r) * nx, y = sim_unif(&r) * ny;
        double flux = 300.0 * pow(300.0, sim_unif(&r)); /* 300 .. 9e4: SNR 15 .. 2000 */
        sim_add_star(sc->img, nx, ny, truth, x, y, flux, scr);
    }
    sim_finish(sc->img, sc->ivar, nx, ny, &sc->sky, sc->sigma, 2.0, &r);
    free(scr);
    sp_psf_free(&truth);
}

static void free_scene(scene *sc)
{
    free(sc->img);
    free(sc->ivar);
}

/* rms and max |error| of the background map against the truth, in sigma. */
static void map_error(const scene *sc, const float *back, int margin, double *rms, double *mx, double *mean)
{
    double s2 = 0, sm = 0, m = 0;
    long n = 0;
    for (int y = margin; y < sc->ny - margin; y++)
        for (int x = margin; x < sc->nx - margin; x++) {
            double d = (back[(size_t)y * sc->nx + x] - sim_sky_at(&sc->sky, sc->nx, sc->ny, x, y)) / sc->sigma;
            s2 += d * d;
            sm += d;
            if (fabs(d) > m) m = fabs(d);
            n++;
        }
    *rms = sqrt(s2 / n);
    *mx = m;
    *mean = sm / n;
}

static void t_gradient_recovery(void **s)
{
    (void)s;
    scene sc;
    make_scene(&sc, 1024, 1024, 150, 5);
    sp_bkg *b = NULL;
    float *back = malloc(sizeof(float) * 1024 * 1024), *rms = malloc(sizeof(float) * 1024 * 1024);
    double t0 = sp_wtime();
    assert_int_equal(sp_bkg_estimate(sc.img, sc.ivar, NULL, sc.nx, sc.ny, NULL, &b), SP_OK);
    double t1 = sp_wtime();
    assert_int_equal(sp_bkg_map(b, back, rms), SP_OK);
    double t2 = sp_wtime();
    assert_int_equal(b->nbx, 16);
    assert_int_equal(b->nby, 16);
    assert_int_equal(b->empty, 0);
    double e_rms, e_max, e_mean;
    map_error(&sc, back, 0, &e_rms, &e_max, &e_mean);
    double rr = 0;
    for (size_t k = 0; k < (size_t)1024 * 1024; k++) rr += rms[k];
    rr /= 1024.0 * 1024.0;
    printf("gradient: error rms %.4f max %.4f mean %+.4f sigma; rms map mean %.3f (true %.3f); "
           "masked %zu px; estimate %.1f ms, map %.1f ms\n",
           e_rms, e_max, e_mean, rr, sc.sigma, b->nsource_masked, 1e3 * (t1 - t0), 1e3 * (t2 - t1));
    assert_true(e_rms < 0.05);
    assert_true(e_max < 0.25);
    assert_true(fabs(e_mean) < 0.03);
    assert_true(fabs(rr / sc.sigma - 1.0) < 0.03);

    /* without the source mask the stars bias the sky up: the mask must help */
    sp_bkg_params p;
    sp_bkg_params_default(&p);
    p.mask_sigma = 0;
    sp_bkg *b1 = NULL;
    assert_int_equal(sp_bkg_estimate(sc.img, sc.ivar, NULL, sc.nx, sc.ny, &p, &b1), SP_OK);
    assert_int_equal(sp_bkg_map(b1, back, NULL), SP_OK);
    double u_rms, u_max, u_mean;
    map_error(&sc, back, 0, &u_rms, &u_max, &u_mean);
    printf("no source mask: error rms %.4f max %.4f mean %+.4f sigma\n", u_rms, u_max, u_mean);
    assert_true(u_mean > e_mean);

    /* subtract == img - map; the point evaluator agrees with the map */
    float *sub = malloc(sizeof(float) * 1024 * 1024);
    memcpy(sub, sc.img, sizeof(float) * 1024 * 1024);
    assert_int_equal(sp_bkg_map(b, back, NULL), SP_OK);
    assert_int_equal(sp_bkg_subtract(b, sub), SP_OK);
    for (size_t k = 0; k < (size_t)1024 * 1024; k += 997) assert_float_equal(sub[k], sc.img[k] - back[k], 1e-3);
    double er;
    for (int k = 0; k < 20; k++) {
        int x = (k * 397) % 1024, y = (k * 211) % 1024;
        double v = sp_bkg_eval(b, x, y, &er);
        assert_float_equal(v, back[(size_t)y * 1024 + x], 1e-3);
        assert_float_equal(er, rms[(size_t)y * 1024 + x], 1e-3);
    }
    free(sub);
    sp_bkg_free(&b);
    sp_bkg_free(&b1);
    assert_null(b);
    free(back);
    free(rms);
    free_scene(&sc);
}

/* NaN columns, a masked block larger than several boxes, ivar == 0 pixels. */
static void t_masked_regions(void **s)
{
    (void)s;
    scene sc;
    make_scene(&sc, 768, 640, 150, 9);
    int nx = sc.nx, ny = sc.ny;
    uint8_t *mask = calloc((size_t)nx * ny, 1);
    for (int y = 0; y < ny; y++)
        for (int x = 0; x < nx; x++) {
            size_t k = (size_t)y * nx + x;
            if (x >= 100 && x < 330 && y >= 200 && y < 420) { /* 3.5 x 3.5 boxes all masked */
                mask[k] = 1;
                sc.img[k] = 1e6f; /* garbage under the mask must not be read */
            }
            if (x == 500 || x == 501) sc.img[k] = NAN;
            if ((k % 13) == 0) sc.ivar[k] = 0.0f;
        }
    sp_bkg *b = NULL;
    float *back = malloc(sizeof(float) * nx * ny);
    assert_int_equal(sp_bkg_estimate(sc.img, sc.ivar, mask, nx, ny, NULL, &b), SP_OK);
    assert_int_equal(sp_bkg_map(b, back, NULL), SP_OK);
    for (size_t k = 0; k < (size_t)nx * ny; k++) assert_true(isfinite(back[k]));
    double e_rms, e_max, e_mean;
    map_error(&sc, back, 0, &e_rms, &e_max, &e_mean);
    printf("masked: %d boxes missing, error rms %.4f max %.4f mean %+.4f sigma\n", b->nmissing, e_rms, e_max,
           e_mean);
    assert_true(b->nmissing >= 4);
    assert_true(e_rms < 0.08);
    assert_true(e_max < 0.5);
    sp_bkg_free(&b);

    /* everything masked: not an error, empty maps */
    memset(mask, 1, (size_t)nx * ny);
    assert_int_equal(sp_bkg_estimate(sc.img, NULL, mask, nx, ny, NULL, &b), SP_OK);
    assert_int_equal(b->empty, 1);
    assert_int_equal(b->ngood, 0);
    assert_int_equal(sp_bkg_map(b, back, NULL), SP_OK);
    assert_float_equal(back[1234], 0.0, 0.0);
    sp_bkg_free(&b);
    free(mask);
    free(back);
    free_scene(&sc);
}

/* Tiny and odd-sized images: one box, two boxes, flat image (sigma 0). */
static void t_small_and_flat(void **s)
{
    (void)s;
    float img[37 * 23];
    for (int k = 0; k < 37 * 23; k++) img[k] = 7.0f;
    sp_bkg *b = NULL;
    assert_int_equal(sp_bkg_estimate(img, NULL, NULL, 37, 23, NULL, &b), SP_OK);
    assert_int_equal(b->nbx, 1);
    assert_int_equal(b->nby, 1);
    assert_float_equal(b->back[0], 7.0, 1e-6);
    assert_float_equal(b->rms[0], 0.0, 1e-6);
    float out[37 * 23], rms[37 * 23];
    assert_int_equal(sp_bkg_map(b, out, rms), SP_OK);
    assert_float_equal(out[100], 7.0, 1e-6);
    sp_bkg_free(&b);

    /* a linear ramp over 2 x 1 boxes is reproduced (linear spline) */
    sim_rng r;
    sim_seed(&r, 3);
    static float ramp[256 * 40];
    for (int y = 0; y < 40; y++)
        for (int x = 0; x < 256; x++) ramp[y * 256 + x] = (float)(50.0 + 0.05 * x + 0.5 * sim_gauss(&r));
    sp_bkg_params p;
    sp_bkg_params_default(&p);
    p.boxsize = 128;
    p.filtersize = 1;
    assert_int_equal(sp_bkg_estimate(ramp, NULL, NULL, 256, 40, &p, &b), SP_OK);
    assert_int_equal(b->nbx, 2);
    static float m2[256 * 40];
    assert_int_equal(sp_bkg_map(b, m2, NULL), SP_OK);
    for (int x = 0; x < 256; x += 15) assert_float_equal(m2[20 * 256 + x], 50.0 + 0.05 * x, 0.25);
    sp_bkg_free(&b);
}

static void t_bad_params(void **s)
{
    (void)s;
    float img[64];
    for (int k = 0; k < 64; k++) img[k] = (float)k;
    sp_bkg *b = NULL;
    sp_bkg_params p;
    sp_bkg_params_default(&p);
    p.boxsize = 2;
    assert_int_equal(sp_bkg_estimate(img, NULL, NULL, 8, 8, &p, &b), SP_ERR_INPUT);
    assert_null(b);
    assert_non_null(strstr(sp_err_msg(), "boxsize"));
    sp_bkg_params_default(&p);
    p.filtersize = 4;
    assert_int_equal(sp_bkg_estimate(img, NULL, NULL, 8, 8, &p, &b), SP_ERR_INPUT);
    sp_bkg_params_default(&p);
    assert_int_equal(sp_bkg_estimate(img, NULL, NULL, 0, 8, &p, &b), SP_ERR_INPUT);
    sp_bkg_free(&b); /* NULL-safe */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(t_clipped_stats),  cmocka_unit_test(t_gradient_recovery),
        cmocka_unit_test(t_masked_regions), cmocka_unit_test(t_small_and_flat),
        cmocka_unit_test(t_bad_params),
    };
    return cmocka_run_group_tests_name("background", tests, NULL, NULL);
}

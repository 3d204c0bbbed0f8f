/* test_sim.c — the simulator's truth is itself tested: random numbers (Philox
 * known answers, Poisson moments), the PSF (flux, pixel-integration accuracy,
 * centroid, FWHM), galaxies (flux, small-Re limit, oversampling convergence),
 * frames (a star's pixels sum to its flux, noise variance, saturation,
 * defects), the WCS with SIP against an independent TAN+SIP formula, config
 * round trip and errors, every output file, and identical bytes for 1 vs 2
 * threads and 1 vs 2 ranks. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "../../src/sim/sim_private.h"
#include "support.h"
#include "surveyproc/sp_csv.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_fits.h"
#include "surveyproc/sp_log.h"
#include "surveyproc/sp_sim.h"
#include "surveyproc/sp_wcs.h"

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define OK(expr)                                                                                                   \
    do {                                                                                                           \
        int st_ = (expr);                                                                                          \
        if (st_ != SP_OK) fail_msg("%s -> %d: %s", #expr, st_, sp_err_msg());                                      \
    } while (0)

/* A small, quick configuration on top of the tiny preset. */
static void small_cfg(sp_sim_config *c)
{
    OK(sp_sim_config_preset("tiny", c));
    c->nx = 128;
    c->ny = 112;
    c->nbands = 2;
    c->n_stars = 25;
    c->n_galaxies = 8;
    c->n_bright = 1;
    c->re_max = 3.0;
    c->cluster_radius = 8;
    c->psf_radius = 12;
    c->block_rows = 32; /* several blocks even on a small tile */
    c->seed = 7;
}

/* A clean frame: no noise, no sky, no defects, nothing saturates. */
static void clean_cfg(sp_sim_config *c)
{
    small_cfg(c);
    c->noise = 0;
    c->bg_residual = 0;
    c->sky_gradient = 0;
    c->n_bad_columns = 0;
    c->nan_fraction = 0;
    c->saturate = 1e12;
    c->n_bright = 0;
    c->n_clusters = 0;
}

static sp_sim_psf test_psf(double fwhm, double beta, double e, double theta, double wing)
{
    sp_sim_psf p = {fwhm, beta, e, theta, wing, 3 * fwhm, 2.0, 15.0};
    return p;
}

/* ---- random numbers ------------------------------------------------------- */

static void t_philox_kat(void **st)
{
    (void)st;
    /* Random123 known-answer vectors for Philox4x32-10 */
    uint32_t c0[4] = {0, 0, 0, 0}, k0[2] = {0, 0}, out[4];
    sp_sim_philox(c0, k0, out);
    assert_true(out[0] == 0x6627e8d5u && out[1] == 0xe169c58du && out[2] == 0xbc57ac4cu && out[3] == 0x9b00dbd8u);
    uint32_t c1[4] = {0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, k1[2] = {0xffffffffu, 0xffffffffu};
    sp_sim_philox(c1, k1, out);
    assert_true(out[0] == 0x408f276du && out[1] == 0x41c83b0eu && out[2] == 0xa20bc7c6u && out[3] == 0x6d5451fdu);
}

static void t_poisson_moments(void **st)
{
    (void)st;
    const double lams[] = {0.7, 4.0, 12.0, 35.0, 900.0};
    const long n = 200000;
    for (size_t k = 0; k < sizeof lams / sizeof lams[0]; k++) {
        double lam = lams[k], s1 = 0, s2 = 0;
        for (long i = 0; i < n; i++) {
            sim_rng r;
            sim_rng_init(&r, 99, SIM_D_NOISE, (uint32_t)k, (uint64_t)i);
            double v = sim_poisson(lam, &r);
            assert_true(v >= 0 && v == floor(v));
            s1 += v;
            s2 += v * v;
        }
        double mean = s1 / n, var = s2 / n - mean * mean;
        /* 5-sigma bounds: sd(mean) = sqrt(lam/n), sd(var) ~ lam sqrt(2/n) (+ excess kurtosis 1/lam) */
        assert_true(fabs(mean - lam) < 5 * sqrt(lam / n));
        assert_true(fabs(var / lam - 1) < 5 * sqrt((2.0 + 1.0 / lam) / n));
    }
}

static void t_gauss_moments(void **st)
{
    (void)st;
    const long n = 1000000;
    double s1 = 0, s2 = 0, s4 = 0;
    long beyond2 = 0, beyond35 = 0;
    sim_zig_init();
    for (long i = 0; i < n; i++) {
        sim_rng r;
        sim_rng_init(&r, 5, SIM_D_NOISE, 1, (uint64_t)i);
        double z = sim_rng_gauss(&r);
        s1 += z, s2 += z * z, s4 += z * z * z * z;
        beyond2 += fabs(z) > 2.0;
        beyond35 += fabs(z) > 3.5; /* beyond the ziggurat's base layer: the tail method */
    }
    double m = s1 / n, v = s2 / n - m * m, k = s4 / n / (v * v);
    double p2 = (double)beyond2 / n, p35 = (double)beyond35 / n;
    print_message("ziggurat: mean %.4f var %.4f kurtosis %.3f P(|z|>2) %.5f P(|z|>3.5) %.2e\n", m, v, k, p2, p35);
    assert_true(fabs(m) < 5e-3 && fabs(v - 1) < 5 * sqrt(2.0 / n) && fabs(k - 3) < 0.03);
    assert_true(fabs(p2 - 0.0455003) < 5 * sqrt(0.0455 / n));
    assert_true(fabs(p35 - 4.6525e-4) < 5 * sqrt(4.65e-4 / n));
}

/* ---- PSF ------------------------------------------------------------------ */

static double stamp_sum(const double *a, int n)
{
    double s = 0;
    for (int i = 0; i < n * n; i++) s += a[i];
    return s;
}

static void t_psf_flux_exact(void **st)
{
    (void)st;
    double *a = malloc(sizeof(double) * 41 * 41);
    sp_sim_psf ps[] = {test_psf(3.6, 3.0, 0.0, 0.0, 0.0), test_psf(4.1, 2.5, 0.12, 0.7, 0.03),
                       test_psf(2.2, 4.5, 0.3, -1.2, 0.05)};
    for (int k = 0; k < 3; k++) {
        OK(sp_sim_render_psf(&ps[k], 0.31, -0.27, 33, 1, a)); /* covers the radius-15 profile */
        assert_true(fabs(stamp_sum(a, 33) - 1.0) < 1e-12);
        OK(sp_sim_render_psf(&ps[k], 0.31, -0.27, 9, 1, a)); /* a small stamp holds its enclosed fraction */
        double s = stamp_sum(a, 9);
        assert_true(s > 0.5 && s < 0.999);
    }
    free(a);
}

/* Pixel integration against a brute-force 64x64-point midpoint rule per pixel. */
static void t_psf_pixel_integration(void **st)
{
    (void)st;
    const int n = 35, m = 64;
    double *a = malloc(sizeof(double) * n * n), *b = malloc(sizeof(double) * n * n);
    sp_sim_psf ps[] = {test_psf(3.6, 3.0, 0.05, 0.3, 0.03), test_psf(2.0, 2.5, 0.2, 1.0, 0.0)};
    for (int k = 0; k < 2; k++) {
        double dx = 0.37, dy = -0.18, tot = 0, peak = 0, maxd = 0;
        OK(sp_sim_render_psf(&ps[k], dx, dy, n, 1, a));
        for (int j = 0; j < n; j++)
            for (int i = 0; i < n; i++) {
                double s = 0;
                for (int q = 0; q < m; q++)
                    for (int p = 0; p < m; p++)
                        s += sp_sim_psf_density(&ps[k], i - 17 + (p + 0.5) / m - 0.5 - dx,
                                                j - 17 + (q + 0.5) / m - 0.5 - dy);
                b[j * n + i] = s / (m * m);
                tot += b[j * n + i];
            }
        for (int i = 0; i < n * n; i++) {
            b[i] /= tot;
            peak = fmax(peak, b[i]);
            maxd = fmax(maxd, fabs(a[i] - b[i]));
        }
        print_message("psf %d: max |adaptive - brute force| = %.2e of the peak pixel\n", k, maxd / peak);
        /* the brute force itself is good to ~ |lap f| h^2 / 24 with h = 1/64: ~1e-5 of the peak */
        assert_true(maxd / peak < 5e-5);
    }
    free(a);
    free(b);
}

static void t_psf_centroid(void **st)
{
    (void)st;
    const int n = 35;
    double *a = malloc(sizeof(double) * n * n);
    const double off[][2] = {{0.3, -0.2}, {-0.45, 0.1}, {0.0, 0.49}};
    sp_sim_psf p = test_psf(3.4, 2.8, 0.1, 0.5, 0.03);
    for (int k = 0; k < 3; k++) {
        OK(sp_sim_render_psf(&p, off[k][0], off[k][1], n, 1, a));
        double sx = 0, sy = 0, s = 0;
        for (int j = 0; j < n; j++)
            for (int i = 0; i < n; i++) {
                s += a[j * n + i];
                sx += a[j * n + i] * (i - 17);
                sy += a[j * n + i] * (j - 17);
            }
        print_message("centroid error (%.2f, %.2f): %.1e, %.1e pix\n", off[k][0], off[k][1], sx / s - off[k][0],
                      sy / s - off[k][1]);
        assert_true(fabs(sx / s - off[k][0]) < 1e-4 && fabs(sy / s - off[k][1]) < 1e-4);
    }
    free(a);
}

/* FWHM from the half-maximum area of a 20x oversampled rendering:
 * area = pi/4 FWHM_major FWHM_minor = pi/4 FWHM^2 for the geometric-mean FWHM. */
static double measured_fwhm(const sp_sim_psf *p)
{
    const int os = 20, n = 20 * 16 + 1;
    double *a = malloc(sizeof(double) * n * n);
    if (sp_sim_render_psf(p, 0, 0, n, os, a) != SP_OK) fail_msg("render: %s", sp_err_msg());
    double peak = 0;
    for (int i = 0; i < n * n; i++) peak = fmax(peak, a[i]);
    long cnt = 0;
    for (int i = 0; i < n * n; i++) cnt += a[i] >= 0.5 * peak;
    free(a);
    return sqrt(4.0 * cnt / (os * (double)os) / M_PI);
}

static void t_psf_fwhm(void **st)
{
    (void)st;
    sp_sim_psf ps[] = {test_psf(3.6, 3.0, 0.0, 0.0, 0.0), test_psf(4.5, 2.2, 0.15, 0.4, 0.0),
                       test_psf(2.5, 4.0, 0.08, -0.9, 0.0)};
    for (int k = 0; k < 3; k++) {
        double f = measured_fwhm(&ps[k]);
        print_message("FWHM asked %.3f measured %.4f\n", ps[k].fwhm, f);
        assert_true(fabs(f / ps[k].fwhm - 1) < 0.005);
    }
    /* a faint wing leaves the core FWHM nearly as asked */
    sp_sim_psf w = test_psf(3.6, 3.0, 0.0, 0.0, 0.03);
    assert_true(fabs(measured_fwhm(&w) / 3.6 - 1) < 0.03);
}

static void t_psf_field(void **st)
{
    (void)st;
    sp_sim_config c;
    sp_sim *s = NULL;
    small_cfg(&c);
    OK(sp_sim_create(&c, &s));
    sp_sim_psf a, b, z;
    double fmin_ = 1e9, fmax_ = 0;
    for (int band = 0; band < s->nbands; band++)
        for (int y = 0; y < c.ny; y += 8)
            for (int x = 0; x < c.nx; x += 8) {
                sp_sim_psf_params(s, band, x, y, &a);
                sp_sim_psf_params(s, band, x + 1, y, &b);
                fmin_ = fmin(fmin_, a.fwhm);
                fmax_ = fmax(fmax_, a.fwhm);
                assert_true(fabs(b.fwhm / a.fwhm - 1) < 0.01); /* smooth */
                assert_true(a.beta > 1.5 && a.e >= 0 && a.e <= 0.5 && a.radius == c.psf_radius);
            }
    assert_true(fmax_ / fmin_ > 1.02); /* it does vary */
    sp_sim_psf_params(s, 0, 60, 50, &a);
    sp_sim_psf_params(s, 1, 60, 50, &z);
    assert_true(fabs(a.fwhm - z.fwhm) > 1e-3); /* and between bands */
    /* the effective PSF at os = 1 is the centred star stamp */
    double *e = malloc(sizeof(double) * 27 * 27), *p = malloc(sizeof(double) * 27 * 27);
    OK(sp_sim_render_epsf(&a, 27, 1, e));
    OK(sp_sim_render_psf(&a, 0, 0, 27, 1, p));
    for (int i = 0; i < 27 * 27; i++) assert_true(fabs(e[i] - p[i]) < 1e-12);
    double *e4 = malloc(sizeof(double) * 109 * 109);
    OK(sp_sim_render_epsf(&a, 109, 4, e4));
    assert_true(fabs(stamp_sum(e4, 109) / 16.0 - 1) < 1e-4);
    free(e);
    free(p);
    free(e4);
    sp_sim_free(&s);
}

/* ---- galaxies ------------------------------------------------------------- */

static void t_galaxy_flux(void **st)
{
    (void)st;
    sp_sim_ws *ws = NULL;
    OK(sp_sim_ws_create(&ws));
    sp_sim_psf p = test_psf(3.6, 3.0, 0.05, 0.3, 0.03);
    p.radius = 12;
    const struct {
        sp_sim_type t;
        double re, q, th;
    } g[] = {{SP_SIM_EXP, 2.0, 0.6, 0.4}, {SP_SIM_DEV, 1.5, 0.8, -1.0}, {SP_SIM_EXP, 0.6, 0.3, 1.2},
             {SP_SIM_DEV, 3.0, 0.5, 0.1}};
    for (int k = 0; k < 4; k++) {
        long h = sp_sim_galaxy_halfsize(g[k].t, g[k].re, p.radius);
        int n = (int)(2 * h + 1);
        double *a = malloc(sizeof(double) * n * n);
        OK(sp_sim_render_galaxy(&p, g[k].t, g[k].re, g[k].q, g[k].th, 0.2, -0.4, n, 5, a, ws));
        double s = stamp_sum(a, n);
        print_message("galaxy %d: sum - 1 = %.1e\n", k, s - 1);
        assert_true(fabs(s - 1) < 1e-9);
        free(a);
    }
    sp_sim_ws_free(&ws);
}

/* A galaxy much smaller than a pixel is the PSF; a finer grid changes little. */
static void t_galaxy_accuracy(void **st)
{
    (void)st;
    sp_sim_ws *ws = NULL;
    OK(sp_sim_ws_create(&ws));
    sp_sim_psf p = test_psf(3.6, 3.0, 0.05, 0.3, 0.0);
    p.radius = 12;
    long h = sp_sim_galaxy_halfsize(SP_SIM_EXP, 0.05, p.radius);
    int n = (int)(2 * h + 1);
    double *a = malloc(sizeof(double) * n * n), *b = malloc(sizeof(double) * n * n);
    OK(sp_sim_render_galaxy(&p, SP_SIM_EXP, 0.05, 1.0, 0.0, 0.25, 0.1, n, 5, a, ws));
    OK(sp_sim_render_psf(&p, 0.25, 0.1, n, 1, b));
    double peak = 0, maxd = 0;
    for (int i = 0; i < n * n; i++) peak = fmax(peak, b[i]), maxd = fmax(maxd, fabs(a[i] - b[i]));
    print_message("point-like galaxy vs PSF: max diff %.2e of the peak\n", maxd / peak);
    assert_true(maxd / peak < 2e-3);
    free(a);
    free(b);
    /* oversampling 5 vs 9 for resolved EXP and DEV */
    const sp_sim_type types[] = {SP_SIM_EXP, SP_SIM_DEV};
    for (int k = 0; k < 2; k++) {
        h = sp_sim_galaxy_halfsize(types[k], 1.5, p.radius);
        n = (int)(2 * h + 1);
        a = malloc(sizeof(double) * n * n);
        b = malloc(sizeof(double) * n * n);
        OK(sp_sim_render_galaxy(&p, types[k], 1.5, 0.6, 0.5, 0.3, -0.2, n, 5, a, ws));
        OK(sp_sim_render_galaxy(&p, types[k], 1.5, 0.6, 0.5, 0.3, -0.2, n, 9, b, ws));
        peak = 0, maxd = 0;
        for (int i = 0; i < n * n; i++) peak = fmax(peak, b[i]), maxd = fmax(maxd, fabs(a[i] - b[i]));
        print_message("%s Re 1.5: os 5 vs 9 max diff %.2e of the peak\n", k ? "DEV" : "EXP", maxd / peak);
        assert_true(maxd / peak < 1.5e-3);
        free(a);
        free(b);
    }
    /* the pixel-resolution outer PSF part against the all-fine reference */
    p = test_psf(3.6, 3.0, 0.05, 0.3, 0.03);
    p.radius = 20;
    const struct {
        sp_sim_type t;
        double re, q;
    } g[] = {{SP_SIM_EXP, 0.7, 0.5}, {SP_SIM_EXP, 2.5, 0.7}, {SP_SIM_DEV, 1.2, 0.6}, {SP_SIM_DEV, 4.0, 0.9}};
    for (int k = 0; k < 4; k++) {
        h = sp_sim_galaxy_halfsize(g[k].t, g[k].re, p.radius);
        n = (int)(2 * h + 1);
        a = malloc(sizeof(double) * n * n);
        b = malloc(sizeof(double) * n * n);
        OK(sim_render_galaxy_split(&p, g[k].t, g[k].re, g[k].q, 0.7, -0.3, 0.45, n, 5, a, ws, 1));
        OK(sim_render_galaxy_split(&p, g[k].t, g[k].re, g[k].q, 0.7, -0.3, 0.45, n, 5, b, ws, 0));
        peak = 0, maxd = 0;
        for (int i = 0; i < n * n; i++) peak = fmax(peak, b[i]), maxd = fmax(maxd, fabs(a[i] - b[i]));
        print_message("%s Re %.1f: split vs all-fine max diff %.2e of the peak\n", g[k].t == SP_SIM_EXP ? "EXP" : "DEV",
                      g[k].re, maxd / peak);
        assert_true(maxd / peak < 2e-4);
        free(a);
        free(b);
    }
    sp_sim_ws_free(&ws);
}

/* ---- frames ---------------------------------------------------------------- */

static float *read_frame(const char *dir, const sp_sim_frame *f, long nx, long ny, sp_fits **keep)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, f->file);
    sp_fits *fh = NULL;
    OK(sp_fits_open(path, &fh));
    float *d = malloc(sizeof(float) * nx * ny);
    OK(sp_fits_read_subset(fh, 0, 0, nx, ny, d));
    if (keep) *keep = fh;
    else sp_fits_close(&fh);
    return d;
}

static void sim_dir(const char *name, char *buf, size_t n) { sp_test_path(name, buf, n); }

/* Noise-free frames: the pixels are exactly the sum of flux x rendered stamp
 * over sources (to float32 and the 2^-24 accumulator quantum), and an
 * isolated source's pixels sum to its flux. */
static void t_frame_flux(void **st)
{
    (void)st;
    const long counts[2][2] = {{6, 0}, {0, 4}}; /* stars only, then galaxies only */
    int checked[2] = {0, 0};
    for (int run = 0; run < 2; run++) {
        sp_sim_config c;
        sp_sim *s = NULL;
        sp_sim_ws *ws = NULL;
        char dir[512], name[32];
        clean_cfg(&c);
        c.nx = c.ny = 300;
        c.n_stars = counts[run][0];
        c.n_galaxies = counts[run][1];
        c.sky_mag = 22; /* sky is added and removed again: the frame holds the sources only */
        c.seed = 11;
        OK(sp_sim_create(&c, &s));
        OK(sp_sim_ws_create(&ws));
        snprintf(name, sizeof name, "flux%d", run);
        sim_dir(name, dir, sizeof dir);
        OK(sp_sim_write(s, dir, 0, 1, NULL));
        long hmax = s->lag, sw = 2 * hmax + 1;
        double *stamp = malloc(sizeof(double) * sw * sw), *model = malloc(sizeof(double) * c.nx * c.ny);
        for (int f = 0; f < s->nframes; f++) {
            const sp_sim_frame *fr = &s->frame[f];
            float *d = read_frame(dir, fr, c.nx, c.ny, NULL);
            double scale = pow(10.0, 0.4 * (fr->zp - SP_SIM_ZP_REF)), peak = 0, maxd = 0;
            memset(model, 0, sizeof(double) * c.nx * c.ny);
            for (long i = 0; i < s->nsrc; i++) {
                const sp_sim_source *src = &s->src[i];
                long ix, iy, h;
                OK(sim_render_source(s, src, fr->band, &ix, &iy, &h, stamp, ws));
                double raw = s->flux[i * s->nbands + fr->band] * scale, inside = 0, sum = 0;
                for (long y = iy - h; y <= iy + h; y++)
                    for (long x = ix - h; x <= ix + h; x++) {
                        double v = stamp[(y - iy + h) * (2 * h + 1) + (x - ix + h)];
                        if (x < 0 || y < 0 || x >= c.nx || y >= c.ny) continue;
                        model[y * c.nx + x] += raw * v;
                        inside += v;
                    }
                /* isolated and inside: its pixels in the frame sum to its flux */
                int iso = inside > 1 - 1e-12;
                for (long k = 0; k < s->nsrc && iso; k++)
                    if (k != i)
                        iso = fabs(s->src[k].x - src->x) > h + sim_source_halfsize(s, &s->src[k]) + 1 ||
                              fabs(s->src[k].y - src->y) > h + sim_source_halfsize(s, &s->src[k]) + 1;
                if (!iso) continue;
                for (long y = iy - h; y <= iy + h; y++)
                    for (long x = ix - h; x <= ix + h; x++) sum += d[y * c.nx + x];
                print_message("%s %ld band %d: sum / flux - 1 = %.1e\n",
                              src->type == SP_SIM_STAR ? "star" : "galaxy", src->id, fr->band, sum / raw - 1);
                assert_true(fabs(sum / raw - 1) < 1e-3);
                checked[run]++;
            }
            for (long k = 0; k < c.nx * c.ny; k++)
                peak = fmax(peak, model[k]), maxd = fmax(maxd, fabs(d[k] - model[k]));
            print_message("frame %d: max |frame - sum of stamps| = %.1e of the peak\n", f, maxd / peak);
            assert_true(maxd / peak < 1e-6);
            free(d);
        }
        free(stamp);
        free(model);
        sp_sim_ws_free(&ws);
        sp_sim_free(&s);
    }
    assert_true(checked[0] >= 2 && checked[1] >= 1);
}

/* Pure noise: (value - 0) / sqrt(expected variance) has unit variance. */
static void t_noise_variance(void **st)
{
    (void)st;
    const double skies[] = {24.0, 20.0, 15.0}; /* inversion, PTRS, large counts */
    for (int k = 0; k < 3; k++) {
        sp_sim_config c;
        sp_sim *s = NULL;
        char dir[512], name[32];
        small_cfg(&c);
        c.nx = c.ny = 192;
        c.nbands = 1;
        c.n_stars = c.n_galaxies = c.n_bright = 0;
        c.n_bad_columns = 0;
        c.nan_fraction = 0;
        c.bg_residual = 0;
        c.sky_mag = skies[k];
        c.sky_gradient = 0.2;
        OK(sp_sim_create(&c, &s));
        snprintf(name, sizeof name, "noise%d", k);
        sim_dir(name, dir, sizeof dir);
        OK(sp_sim_write(s, dir, 0, 1, NULL));
        const sp_sim_frame *fr = &s->frame[0];
        sp_fits *fh = NULL;
        float *d = read_frame(dir, fr, c.nx, c.ny, &fh);
        double skysig;
        OK(sp_fits_key_double(fh, "SKYSIG", 1, &skysig, NULL));
        assert_true(fabs(skysig - fr->skysig) < 1e-9 * skysig);
        sp_fits_close(&fh);
        double s1 = 0, s2 = 0, n = (double)c.nx * c.ny;
        for (long y = 0; y < c.ny; y++)
            for (long x = 0; x < c.nx; x++) {
                double u, v;
                sim_uv(s, x, y, &u, &v);
                double sky = fr->sky_adu * sim_sky_rel(fr, u, v);
                double var = (sky * fr->egain + fr->read_noise * fr->read_noise) / (fr->egain * fr->egain);
                double z = d[y * c.nx + x] / sqrt(var);
                s1 += z;
                s2 += z * z;
            }
        double mean = s1 / n, var = s2 / n - mean * mean;
        print_message("sky %.1f ADU (SKYSIG %.2f): noise mean %.4f, variance / expected %.4f\n", fr->sky_adu, skysig,
                      mean, var);
        assert_true(fabs(mean) < 5 / sqrt(n));
        assert_true(fabs(var - 1) < 5 * sqrt(2 / n) + 0.002); /* + float32 rounding of the values */
        free(d);
        sp_sim_free(&s);
    }
}

/* The forced bright star is clipped at SATURATE and flagged; bad columns and NaN pixels are NaN. */
static void t_saturation_defects(void **st)
{
    (void)st;
    sp_sim_config c;
    sp_sim *s = NULL;
    char dir[512];
    small_cfg(&c);
    c.n_bad_columns = 2;
    c.nan_fraction = 1e-3;
    OK(sp_sim_create(&c, &s));
    sim_dir("defects", dir, sizeof dir);
    OK(sp_sim_write(s, dir, 0, 1, NULL));
    long bright = -1;
    for (long i = 0; i < s->nsrc; i++)
        if (s->src[i].flags & SP_SIM_F_FORCED_BRIGHT) bright = i;
    assert_true(bright >= 0);
    assert_true(s->src[bright].flags & SP_SIM_F_SATURATED);
    long nsat = 0, any_sat = 0;
    for (int f = 0; f < s->nframes; f++) {
        const sp_sim_frame *fr = &s->frame[f];
        float *d = read_frame(dir, fr, c.nx, c.ny, NULL);
        long ix = lround(s->src[bright].x), iy = lround(s->src[bright].y);
        float mx = -1e30f;
        nsat = 0;
        for (long y = iy - 3; y <= iy + 3; y++)
            for (long x = ix - 3; x <= ix + 3; x++) {
                float v = d[y * c.nx + x];
                if (!isnan(v)) mx = fmaxf(mx, v), nsat += v == (float)fr->saturate;
            }
        assert_true(mx <= (float)fr->saturate);
        any_sat += nsat > 0;
        for (int b = 0; b < fr->n_badcol; b++)
            for (long y = fr->badcol[3 * b + 1]; y <= fr->badcol[3 * b + 2]; y++)
                assert_true(isnan(d[y * c.nx + fr->badcol[3 * b]]));
        assert_true(fr->n_nan > 0);
        for (long k = 0; k < fr->n_nan; k++) assert_true(isnan(d[fr->nan_pix[k]]));
        long nnan = 0;
        for (long i = 0; i < c.nx * c.ny; i++) nnan += isnan(d[i]);
        long expect_max = fr->n_nan;
        for (int b = 0; b < fr->n_badcol; b++) expect_max += fr->badcol[3 * b + 2] - fr->badcol[3 * b + 1] + 1;
        assert_true(nnan <= expect_max && nnan >= fr->n_nan);
        free(d);
    }
    assert_true(any_sat > 0); /* clipped in at least one band (red bands for cool stars) */
    sp_sim_free(&s);
}

/* ---- WCS ------------------------------------------------------------------- */

static double card_value(const char *cards, int n, const char *key)
{
    for (int i = 0; i < n; i++) {
        const char *c = cards + 80 * i;
        size_t k = strlen(key);
        if (!strncmp(c, key, k) && (c[k] == ' ' || c[k] == '=')) return atof(c + 10);
    }
    return 0.0;
}

/* Independent TAN + SIP (Calabretta & Greisen 2002; Shupe et al. 2005) as the oracle. */
static void oracle_pix2sky(const sp_sim *s, double x, double y, double *ra, double *dec)
{
    const char *cd = s->wcs_cards;
    int n = s->wcs_ncards;
    double u = x + 1 - card_value(cd, n, "CRPIX1"), v = y + 1 - card_value(cd, n, "CRPIX2");
    double up = u + card_value(cd, n, "A_2_0") * u * u + card_value(cd, n, "A_1_1") * u * v +
                card_value(cd, n, "A_0_2") * v * v;
    double vp = v + card_value(cd, n, "B_2_0") * u * u + card_value(cd, n, "B_1_1") * u * v +
                card_value(cd, n, "B_0_2") * v * v;
    double xi = (card_value(cd, n, "CD1_1") * up + card_value(cd, n, "CD1_2") * vp) * M_PI / 180;
    double eta = (card_value(cd, n, "CD2_1") * up + card_value(cd, n, "CD2_2") * vp) * M_PI / 180;
    double a0 = card_value(cd, n, "CRVAL1") * M_PI / 180, d0 = card_value(cd, n, "CRVAL2") * M_PI / 180;
    double den = cos(d0) - eta * sin(d0);
    *ra = (a0 + atan2(xi, den)) * 180 / M_PI;
    *dec = atan2(sin(d0) + eta * cos(d0), sqrt(xi * xi + den * den)) * 180 / M_PI;
}

static void t_wcs_sip(void **st)
{
    (void)st;
    sp_sim_config c;
    sp_sim *s = NULL;
    small_cfg(&c);
    c.sip_amp = 2.0;
    OK(sp_sim_create(&c, &s));
    assert_non_null(strstr(s->wcs_cards, "RA---TAN-SIP"));
    double maxd = 0;
    for (long i = 0; i < s->nsrc; i++) {
        double ra, dec;
        oracle_pix2sky(s, s->src[i].x, s->src[i].y, &ra, &dec);
        maxd = fmax(maxd, fmax(fabs(ra - s->src[i].ra) * cos(dec * M_PI / 180), fabs(dec - s->src[i].dec)));
    }
    print_message("truth RA/Dec vs independent TAN+SIP: max %.2e arcsec\n", maxd * 3600);
    assert_true(maxd * 3600 < 1e-5);
    /* and the SIP term is really there: without it the corner moves by ~sip_amp pixels */
    double ra, dec, x = c.nx - 1, y = c.ny - 1, rx, ry;
    oracle_pix2sky(s, x, y, &ra, &dec);
    OK(sp_wcs_sky2pix(s->wcs, 1, &ra, &dec, &rx, &ry, NULL));
    assert_true(fabs(rx - x) < 1e-6 && fabs(ry - y) < 1e-6);
    sp_sim_free(&s);
}

/* ---- config ----------------------------------------------------------------- */

static void t_config_roundtrip(void **st)
{
    (void)st;
    const char *presets[] = {"tiny", "demo", "bench", "big"};
    for (int k = 0; k < 4; k++) {
        sp_sim_config a, b;
        char path[512], *t1 = NULL, *t2 = NULL;
        size_t n1, n2;
        OK(sp_sim_config_preset(presets[k], &a));
        OK(sp_sim_config_validate(&a));
        a.seed = 12345678901234ull;
        a.fwhm = 3.1234567890123457;
        sp_test_path("rt.yaml", path, sizeof path);
        FILE *f = fopen(path, "w");
        OK(sp_sim_config_write(f, &a));
        fclose(f);
        OK(sp_sim_config_load(path, NULL, &b));
        FILE *m1 = open_memstream(&t1, &n1), *m2 = open_memstream(&t2, &n2);
        sp_sim_config_write(m1, &a);
        sp_sim_config_write(m2, &b);
        fclose(m1);
        fclose(m2);
        assert_string_equal(t1, t2);
        free(t1);
        free(t2);
    }
    /* overrides on a preset, and a band list */
    char path[512];
    sp_test_write("ov.yaml", "preset: demo\nnx: 300\nbands: [m425, m500, m875]\nnoise: false\nseed: 9\n", path,
                  sizeof path);
    sp_sim_config c;
    OK(sp_sim_config_load(path, NULL, &c));
    assert_int_equal(c.nx, 300);
    assert_int_equal(c.ny, 1024);
    assert_int_equal(c.nbands, 3);
    assert_string_equal(c.band_names[1], "m500");
    assert_int_equal(c.noise, 0);
    assert_int_equal(c.frames_per_band, 2);
    OK(sp_sim_config_load(path, "tiny", &c)); /* --preset wins over the file's preset */
    assert_int_equal(c.ny, 256);
}

static void t_config_errors(void **st)
{
    (void)st;
    struct {
        const char *text, *want;
    } bad[] = {
        {"nx: 256\nfoo: 1\n", ":2: unknown key 'foo'"},
        {"nx: big\n", ":1: nx: 'big' is not an integer"},
        {"fwhm: 0.1\n", ":1: fwhm: 0.1 is out of range"},
        {"bands: [m400, x5]\n", "'x5' is not a band name"},
        {"nx: [1\n", "malformed YAML"},
        {"preset: huge\n", "unknown simulator preset 'huge'"},
        {"oversample: 6\n", "must be odd"},
        {"- a\n- b\n", "must be a mapping"},
    };
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        char path[512];
        sp_sim_config c;
        sp_test_write("bad.yaml", bad[k].text, path, sizeof path);
        assert_int_equal(sp_sim_config_load(path, NULL, &c), SP_ERR_CONFIG);
        if (!strstr(sp_err_msg(), bad[k].want)) fail_msg("'%s' lacks '%s'", sp_err_msg(), bad[k].want);
    }
    sp_sim_config c;
    assert_int_equal(sp_sim_config_load("/nonexistent/sim.yaml", NULL, &c), SP_ERR_IO);
}

/* ---- outputs and determinism ------------------------------------------------ */

static int files_equal(const char *a, const char *b)
{
    FILE *fa = fopen(a, "rb"), *fb = fopen(b, "rb");
    int eq = fa && fb;
    while (eq) {
        int ca = fgetc(fa), cb = fgetc(fb);
        if (ca != cb) eq = 0;
        if (ca == EOF || cb == EOF) break;
    }
    if (fa) fclose(fa);
    if (fb) fclose(fb);
    return eq;
}

static void compare_dirs(const sp_sim *s, const char *a, const char *b)
{
    char pa[1024], pb[1024];
    const char *fixed[] = {"truth.csv", "input_catalog.csv", "reference_catalog.csv", "image_list.txt",
                           "config.yaml", "sim.yaml", "truth_psf.yaml"};
    for (size_t k = 0; k < sizeof fixed / sizeof fixed[0]; k++) {
        snprintf(pa, sizeof pa, "%s/%s", a, fixed[k]);
        snprintf(pb, sizeof pb, "%s/%s", b, fixed[k]);
        if (!files_equal(pa, pb)) fail_msg("%s differs between %s and %s", fixed[k], a, b);
    }
    for (int f = 0; f < s->nframes; f++) {
        snprintf(pa, sizeof pa, "%s/%s", a, s->frame[f].file);
        snprintf(pb, sizeof pb, "%s/%s", b, s->frame[f].file);
        if (!files_equal(pa, pb)) fail_msg("%s differs between %s and %s", s->frame[f].file, a, b);
    }
}

static void t_determinism(void **st)
{
    (void)st;
    sp_sim_config c;
    sp_sim *s = NULL;
    char d1[512], d2[512], d3[512];
    small_cfg(&c);
    c.frames_per_band = 2;
    OK(sp_sim_create(&c, &s));
    sim_dir("det1", d1, sizeof d1);
    sim_dir("det2", d2, sizeof d2);
    sim_dir("det3", d3, sizeof d3);
    int nt = omp_get_max_threads();
    omp_set_num_threads(1);
    OK(sp_sim_write(s, d1, 0, 1, NULL));
    omp_set_num_threads(2);
    OK(sp_sim_write(s, d2, 0, 1, NULL));
    OK(sp_sim_write(s, d3, 1, 2, NULL)); /* as two ranks would */
    OK(sp_sim_write(s, d3, 0, 2, NULL));
    omp_set_num_threads(nt);
    compare_dirs(s, d1, d2);
    compare_dirs(s, d1, d3);
    /* a reloaded simulation has exactly the same PSF model */
    sp_sim *r = NULL;
    OK(sp_sim_load(d1, &r));
    for (int b = 0; b < s->nbands; b++) {
        sp_sim_psf p1, p2;
        sp_sim_psf_params(s, b, 17.3, 90.1, &p1);
        sp_sim_psf_params(r, b, 17.3, 90.1, &p2);
        assert_memory_equal(&p1, &p2, sizeof p1);
        assert_string_equal(s->band[b].name, r->band[b].name);
    }
    assert_int_equal(r->nsrc, s->nsrc);
    assert_memory_equal(r->flux, s->flux, sizeof(double) * s->nsrc * s->nbands);
    sp_sim_free(&r);
    /* a different seed changes the frames */
    sp_sim *o = NULL;
    c.seed = 8;
    OK(sp_sim_create(&c, &o));
    char d4[512], pa[1024], pb[1024];
    sim_dir("det4", d4, sizeof d4);
    OK(sp_sim_write(o, d4, 0, 1, NULL));
    snprintf(pa, sizeof pa, "%s/%s", d1, s->frame[0].file);
    snprintf(pb, sizeof pb, "%s/%s", d4, o->frame[0].file);
    assert_false(files_equal(pa, pb));
    sp_sim_free(&o);
    sp_sim_free(&s);
}

static void t_outputs(void **st)
{
    (void)st;
    sp_sim_config c;
    sp_sim *s = NULL;
    char dir[512], path[1024];
    small_cfg(&c);
    OK(sp_sim_create(&c, &s));
    sim_dir("out", dir, sizeof dir);
    OK(sp_sim_write(s, dir, 0, 1, NULL));
    /* truth: one row per source */
    sp_csv *t = NULL;
    snprintf(path, sizeof path, "%s/truth.csv", dir);
    OK(sp_csv_read(path, &t));
    assert_int_equal(t->nrow, s->nsrc);
    const char *tcols[] = {"id", "type", "x", "y", "ra", "dec", "flux_m400", "flux_m875", "re", "q", "theta", "flags"};
    for (size_t k = 0; k < sizeof tcols / sizeof tcols[0]; k++) assert_true(sp_csv_col(t, tcols[k]) >= 0);
    sp_csv_free(&t);
    /* input catalog: the pipeline's columns, some blank TYPEs in a larger one */
    snprintf(path, sizeof path, "%s/input_catalog.csv", dir);
    OK(sp_csv_read(path, &t));
    assert_int_equal(t->nrow, s->nsrc);
    const char *icols[] = {"RA", "DEC", "ID", "TYPE", "FLUX_m400", "FLUX_m875", "ELL", "THETA", "Re"};
    for (size_t k = 0; k < sizeof icols / sizeof icols[0]; k++) assert_true(sp_csv_col(t, icols[k]) >= 0);
    double *ra = malloc(sizeof(double) * t->nrow);
    OK(sp_csv_col_double(t, sp_csv_col(t, "RA"), ra));
    for (long i = 0; i < t->nrow; i++) assert_true(fabs(ra[i] - s->src[i].ra) < 1e-4);
    free(ra);
    sp_csv_free(&t);
    /* reference catalog: unsaturated isolated stars with AB magnitudes */
    snprintf(path, sizeof path, "%s/reference_catalog.csv", dir);
    OK(sp_csv_read(path, &t));
    assert_true(sp_csv_col(t, "mag_m400") >= 0 && sp_csv_col(t, "RA") >= 0);
    sp_csv_free(&t);
    /* frames: headers and WCS */
    for (int f = 0; f < s->nframes; f++) {
        sp_fits *fh = NULL;
        sp_wcs *w = NULL;
        snprintf(path, sizeof path, "%s/%s", dir, s->frame[f].file);
        OK(sp_fits_open(path, &fh));
        char filt[32];
        double v;
        OK(sp_fits_key_string(fh, "FILTER", 1, filt, sizeof filt, NULL));
        assert_string_equal(filt, s->band[s->frame[f].band].name);
        const char *keys[] = {"ZP_AUTO", "SKYSIG", "EGAIN", "SATURATE", "EXPTIME"};
        for (int k = 0; k < 5; k++) OK(sp_fits_key_double(fh, keys[k], 1, &v, NULL));
        OK(sp_fits_key_double(fh, "ZP_AUTO", 1, &v, NULL));
        assert_true(v == s->frame[f].zp && v == s->frame[f].zp_header);
        OK(sp_fits_key_double(fh, "ZP_TRUE", 1, &v, NULL));
        assert_true(v == s->frame[f].zp);
        OK(sp_wcs_from_fits(fh, &w));
        double ra2, dec2, x = s->src[0].x, y = s->src[0].y;
        OK(sp_wcs_pix2sky(w, 1, &x, &y, &ra2, &dec2, NULL));
        assert_true(fabs(ra2 - s->src[0].ra) < 1e-10 && fabs(dec2 - s->src[0].dec) < 1e-10);
        sp_wcs_free(&w);
        sp_fits_close(&fh);
    }
    /* true PSF mosaic: one per band */
    for (int b = 0; b < s->nbands; b++) {
        sp_fits *fh = NULL;
        long ng, size, nx, ny;
        snprintf(path, sizeof path, "%s/truth_psf/%s.fits", dir, s->band[b].name);
        OK(sp_fits_open(path, &fh));
        OK(sp_fits_key_long(fh, "PSFNGRID", 1, &ng, NULL));
        OK(sp_fits_key_long(fh, "PSFSIZE", 1, &size, NULL));
        sp_fits_shape(fh, &nx, &ny);
        assert_int_equal(nx, ng * size);
        float *d = malloc(sizeof(float) * nx * ny);
        OK(sp_fits_read_subset(fh, 0, 0, size, size, d));
        double sum = 0;
        for (long i = 0; i < size * size; i++) sum += d[i];
        assert_true(fabs(sum - 1) < 1e-5);
        free(d);
        sp_fits_close(&fh);
    }
    const char *files[] = {"config.yaml", "sim.yaml", "truth_psf.yaml", "image_list.txt"};
    for (int k = 0; k < 4; k++) {
        struct stat sb;
        snprintf(path, sizeof path, "%s/%s", dir, files[k]);
        assert_int_equal(stat(path, &sb), 0);
        assert_true(sb.st_size > 0);
    }
    sp_sim_free(&s);
}

int main(void)
{
    sp_log_init(0, 1, SP_LOG_WARN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(t_philox_kat),        cmocka_unit_test(t_poisson_moments),
        cmocka_unit_test(t_gauss_moments),
        cmocka_unit_test(t_psf_flux_exact),    cmocka_unit_test(t_psf_pixel_integration),
        cmocka_unit_test(t_psf_centroid),      cmocka_unit_test(t_psf_fwhm),
        cmocka_unit_test(t_psf_field),         cmocka_unit_test(t_galaxy_flux),
        cmocka_unit_test(t_galaxy_accuracy),   cmocka_unit_test(t_frame_flux),
        cmocka_unit_test(t_noise_variance),    cmocka_unit_test(t_saturation_defects),
        cmocka_unit_test(t_wcs_sip),           cmocka_unit_test(t_config_roundtrip),
        cmocka_unit_test(t_config_errors),     cmocka_unit_test(t_determinism),
        cmocka_unit_test(t_outputs),
    };
    return cmocka_run_group_tests_name("sim", tests, NULL, NULL);
}

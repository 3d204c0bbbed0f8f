/* test_epsf.c — PSF-star selection and the ePSF builder on synthetic cells
 * with a known oversampled Moffat truth: fidelity ||m - t|| / ||t|| < 0.5% for
 * oversamp 1..4, flux normalisation within 0.2%, encircled energy at 2 FWHM
 * within 0.5%, no power at the image-pixel frequency of the oversampled grid;
 * a noiseless build reproduces the truth; the fallback with 3 stars and with
 * none; star-selection cuts; the cell-grid blend; parallel builds; wing pooling;
 * a band-wide build from the cutouts of many cells (polynomial variation); the
 * Moffat fit's rejection of contaminated pixels. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "support.h"
#include "simimg.h"
#include "surveyproc/sp_background.h"
#include "surveyproc/sp_detect.h"
#include "surveyproc/sp_epsf.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_prep.h"
#include "surveyproc/sp_prof.h"
#include "surveyproc/sp_psf.h"

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FWHM 4.0
#define BETA 3.0
#define QAX 0.9
#define THETA 0.35
#define FINAL 41

/* ---- metrics ------------------------------------------------------------ */

/* ||m - t|| / ||t|| over the stamp, every `step`-th node (step = oversamp:
 * the image-pixel grid). */
static double relres(const sp_psf *m, const sp_psf *t, int step)
{
    double a = 0, b = 0;
    int S = m->size;
    for (int j = 0; j < S; j += step)
        for (int i = 0; i < S; i += step) {
            double d = (double)m->data[j * S + i] - t->data[j * S + i];
            a += d * d;
            b += (double)t->data[j * S + i] * t->data[j * S + i];
        }
    return sqrt(a / b);
}

/* Flux a PSF fit with model m returns for a noiseless unit star drawn with t,
 * averaged over 16 sub-pixel phases: sum m t / sum m^2. */
static double flux_ratio(const sp_psf *m, const sp_psf *t)
{
    double tot = 0;
    static double mm[FINAL * FINAL], tt[FINAL * FINAL];
    for (int k = 0; k < 16; k++) {
        double px = (k % 4) * 0.25, py = (k / 4) * 0.25, c = 0.5 * (FINAL - 1);
        sp_psf_render(m, c + px, c + py, FINAL, FINAL, mm, NULL, NULL);
        sp_psf_render(t, c + px, c + py, FINAL, FINAL, tt, NULL, NULL);
        double a = 0, b = 0;
        for (int q = 0; q < FINAL * FINAL; q++) {
            a += mm[q] * tt[q];
            b += mm[q] * mm[q];
        }
        tot += a / b;
    }
    return tot / 16;
}

/* Grid artefacts: the residual's power along rows at the image-pixel
 * frequency and its harmonics (k / os cycles per sample), relative (a) to the
 * residual's power midway between them and (b, amplitude) to the truth's DC
 * power. */
static void grid_power(const sp_psf *m, const sp_psf *t, double *ratio_mid, double *rel_amp)
{
    int S = m->size, os = m->oversamp;
    double Pg = 0, Pm = 0, Pt = 0;
    for (int j = 0; j < S; j++) {
        double s = 0;
        for (int i = 0; i < S; i++) s += t->data[j * S + i];
        Pt += s * s;
        for (int k = 1; k < os; k++) {
            double f = (double)k / os, fm = (k - 0.5) / os;
            double re = 0, im = 0, re2 = 0, im2 = 0;
            for (int i = 0; i < S; i++) {
                double d = (double)m->data[j * S + i] - t->data[j * S + i];
                re += d * cos(2 * M_PI * f * i);
                im += d * sin(2 * M_PI * f * i);
                re2 += d * cos(2 * M_PI * fm * i);
                im2 += d * sin(2 * M_PI * fm * i);
            }
            Pg += re * re + im * im;
            Pm += re2 * re2 + im2 * im2;
        }
    }
    *ratio_mid = Pm > 0 ? Pg / Pm : 0;
    *rel_amp = Pt > 0 ? sqrt(Pg / Pt) : 0;
}

static int cmp_dbl(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* ---- scene -------------------------------------------------------------- */

typedef struct {
    int nx, ny;
    float *img, *ivar, *rms;
    double *x, *y, *f;
    int n;
} scene;

/* nst isolated stars (>= 45 px apart) of flux log-uniform in [fmin, fmax],
 * drawn from an oversampled Moffat truth, on a sky with a gradient; the
 * background is estimated and subtracted with sp_bkg. Noise: sky sigma and a
 * Poisson term of the given gain (<= 0: none). */
static void make_scene(scene *sc, int nx, int ny, int nst, double fmin, double fmax, double sigma, double gain,
                       uint64_t seed)
{
    memset(sc, 0, sizeof *sc);
    sc->nx = nx;
    sc->ny = ny;
    sc->img = calloc((size_t)nx * ny, sizeof(float));
    sc->ivar = calloc((size_t)nx * ny, sizeof(float));
    sc->rms = calloc((size_t)nx * ny, sizeof(float));
    sc->x = calloc(nst + 1, sizeof(double));
    sc->y = calloc(nst + 1, sizeof(double));
    sc->f = calloc(nst + 1, sizeof(double));
    sp_psf *truth = NULL;
    assert_int_equal(sp_psf_moffat(FWHM, BETA, QAX, THETA, 4 * (FINAL + 10) + 1, 4, &truth), SP_OK);
    double *scr = malloc(sizeof(double) * 60 * 60);
    sim_rng r;
    sim_seed(&r, seed);
    int n = 0, guard = 0;
    while (n < nst && guard++ < 100000) {
        double x = 45 + sim_unif(&r) * (nx - 90), y = 45 + sim_unif(&r) * (ny - 90);
        int ok = 1;
        for (int k = 0; k < n; k++)
            if (hypot(x - sc->x[k], y - sc->y[k]) < 45) ok = 0;
        if (!ok) continue;
        sc->x[n] = x;
        sc->y[n] = y;
        sc->f[n] = fmin * pow(fmax / fmin, sim_unif(&r));
        sim_add_star(sc->img, nx, ny, truth, x, y, sc->f[n], scr);
        n++;
    }
    sc->n = n;
    /* noiseless scenes (gain <= 0 and tiny sigma) get no sky: they test the
     * builder alone, not the background estimate */
    int with_sky = !(gain <= 0 && sigma < 0.01);
    sim_sky sky = {with_sky ? 100.0 : 0.0, with_sky ? 0.01 : 0.0, with_sky ? -0.005 : 0.0, with_sky ? 20.0 : 0.0};
    sim_finish(sc->img, sc->ivar, nx, ny, &sky, sigma, gain, &r);
    if (!with_sky) {
        for (size_t k = 0; k < (size_t)nx * ny; k++) sc->rms[k] = (float)sigma;
        free(scr);
        sp_psf_free(&truth);
        return;
    }
    sp_bkg *b = NULL;
    assert_int_equal(sp_bkg_estimate(sc->img, sc->ivar, NULL, nx, ny, NULL, &b), SP_OK);
    assert_int_equal(sp_bkg_map(b, NULL, sc->rms), SP_OK);
    assert_int_equal(sp_bkg_subtract(b, sc->img), SP_OK);
    sp_bkg_free(&b);
    free(scr);
    sp_psf_free(&truth);
}

static void free_scene(scene *sc)
{
    free(sc->img);
    free(sc->ivar);
    free(sc->rms);
    free(sc->x);
    free(sc->y);
    free(sc->f);
}

/* detect + select (detect mode) on a scene */
static void select_stars(const scene *sc, int max_stars, sp_psfstar **st, int *n)
{
    sp_detect_params dp;
    sp_detect_params_default(&dp);
    dp.fwhm = FWHM;
    dp.thresh_sigma = 10;
    sp_source *src = NULL;
    int ns = 0;
    assert_int_equal(sp_detect(sc->img, sc->rms, NULL, sc->nx, sc->ny, NULL, &dp, &src, &ns), SP_OK);
    sp_starsel_params sp;
    sp_starsel_params_default(&sp);
    sp.fwhm = FWHM;
    sp.stamp_size = FINAL;
    sp.max_stars = max_stars;
    sp_starsel_stats ss;
    assert_int_equal(sp_starsel_select(sc->img, sc->rms, NULL, sc->nx, sc->ny, src, ns, NULL, 0, &sp, st, n, &ss),
                     SP_OK);
    free(src);
}

/* ---- tests -------------------------------------------------------------- */

/* The bars, for oversamp 1..4 and 30 / 45 stars of SNR ~300-2000. */
static void t_fidelity(void **s)
{
    (void)s;
    const int counts[2] = {30, 45};
    for (int ci = 0; ci < 2; ci++) {
        scene sc;
        make_scene(&sc, 1024, 1024, counts[ci], 2e4, 5e5, 5.0, 2.0, 1 + ci);
        sp_psfstar *st = NULL;
        int nst = 0;
        select_stars(&sc, counts[ci], &st, &nst);
        printf("%d stars injected, %d selected\n", sc.n, nst);
        assert_true(nst >= counts[ci] - 2);
        for (int os = 1; os <= 4; os++) {
            sp_epsf_params ep;
            sp_epsf_params_default(&ep);
            ep.oversamp = os;
            ep.final_size = FINAL;
            sp_epsf_result *res = NULL;
            assert_int_equal(sp_epsf_build(sc.img, sc.ivar, NULL, sc.nx, sc.ny, st, nst, &ep, &res), SP_OK);
            assert_int_equal(res->kind, SP_EPSF_EMPIRICAL);
            assert_int_equal(res->is_fallback, 0);
            int S = os * (FINAL - 1) + 1;
            assert_int_equal(res->psf->size, S);
            assert_int_equal(res->psf->oversamp, os);
            sp_psf *t = NULL;
            assert_int_equal(sp_psf_moffat(FWHM, BETA, QAX, THETA, S, os, &t), SP_OK);
            double rr = relres(res->psf, t, 1), rp = relres(res->psf, t, os);
            double eem = sp_epsf_encircled(res->psf, 2 * FWHM), eet = sp_epsf_encircled(t, 2 * FWHM);
            double fr = flux_ratio(res->psf, t), gm = 0, ga = 0;
            grid_power(res->psf, t, &gm, &ga);
            double sum = 0;
            for (int k = 0; k < S * S; k++) sum += res->psf->data[k];
            printf("  n=%d os=%d: used %d, iters %d, relres %.3f%% (pixel grid %.3f%%), EE(2 FWHM) %+.3f%%, "
                   "flux %+.3f%%, grid power %.2f x midband, amplitude %.1e, FWHM %.3f\n",
                   counts[ci], os, res->nstars_used, res->iterations, 100 * rr, 100 * rp, 100 * (eem / eet - 1),
                   100 * (fr - 1), gm, ga, res->fwhm);
            assert_true(rr < 0.005);
            assert_true(fabs(eem / eet - 1) < 0.005);
            assert_true(fabs(fr - 1) < 0.002);
            assert_float_equal(sum / (os * os), 1.0, 1e-5);
            if (os > 1) {
                assert_true(gm < 1.0); /* no excess at the pixel frequency */
                assert_true(ga < 1e-3);
            }
            assert_true(fabs(res->fwhm - FWHM) < 0.25);
            sp_psf_free(&t);
            sp_epsf_result_free(&res);
        }
        free(st);
        free_scene(&sc);
    }
}

/* Noiseless stars: the ePSF reproduces the truth closely (this also guards
 * the builder's value-only Keys renderer against drifting from
 * sp_psf_render, which the star fits use). */
static void t_noiseless(void **s)
{
    (void)s;
    scene sc;
    make_scene(&sc, 600, 600, 25, 1e5, 1e6, 1e-3, 0.0, 7);
    sp_psfstar *st = calloc(sc.n, sizeof(sp_psfstar));
    for (int k = 0; k < sc.n; k++) {
        st[k].x = sc.x[k] + 0.05; /* start slightly off: the fits must recentre */
        st[k].y = sc.y[k] - 0.04;
        st[k].flux = sc.f[k];
        st[k].bkg_rms = 1e-3;
    }
    for (int os = 1; os <= 3; os += 2) {
        sp_epsf_params ep;
        sp_epsf_params_default(&ep);
        ep.oversamp = os;
        ep.final_size = FINAL;
        ep.max_iters = 8;
        sp_epsf_result *res = NULL;
        assert_int_equal(sp_epsf_build(sc.img, NULL, NULL, sc.nx, sc.ny, st, sc.n, &ep, &res), SP_OK);
        sp_psf *t = NULL;
        assert_int_equal(sp_psf_moffat(FWHM, BETA, QAX, THETA, res->psf->size, os, &t), SP_OK);
        double rr = relres(res->psf, t, 1), dpos = 0;
        for (int k = 0; k < sc.n; k++) dpos = fmax(dpos, hypot(res->star_x[k] - sc.x[k], res->star_y[k] - sc.y[k]));
        printf("noiseless os=%d: relres %.4f%%, max star position error %.4f px\n", os, 100 * rr, dpos);
        /* os = 1 keeps a floor: the ePSF is the best Keys-interpolable
         * representation of a FWHM-4 PSF at 1-pixel sampling (docs/psf.md) */
        assert_true(rr < (os == 1 ? 0.0035 : 0.002));
        assert_true(dpos < 0.01);
        sp_psf_free(&t);
        sp_epsf_result_free(&res);
    }
    free(st);
    free_scene(&sc);
}

static void t_fallback(void **s)
{
    (void)s;
    scene sc;
    make_scene(&sc, 400, 400, 3, 1e5, 3e5, 5.0, 2.0, 11);
    sp_psfstar *st = NULL;
    int nst = 0;
    select_stars(&sc, 10, &st, &nst);
    assert_int_equal(nst, 3);
    sp_epsf_params ep;
    sp_epsf_params_default(&ep);
    ep.final_size = FINAL;
    ep.min_stars = 5;
    sp_epsf_result *res = NULL;
    assert_int_equal(sp_epsf_build(sc.img, sc.ivar, NULL, sc.nx, sc.ny, st, nst, &ep, &res), SP_OK);
    printf("3 stars: kind %d, reason '%s', Moffat FWHM %.3f beta %.3f q %.3f theta %.3f\n", res->kind, res->reason,
           res->moffat_fwhm, res->moffat_beta, res->moffat_q, res->moffat_theta);
    assert_int_equal(res->kind, SP_EPSF_MOFFAT_FIT);
    assert_int_equal(res->is_fallback, 1);
    assert_int_equal(res->psf->is_fallback, 1);
    assert_int_equal(res->nstars_used, 3);
    assert_int_equal(res->psf->nstars, 3);
    assert_non_null(strstr(res->reason, "3 PSF stars < min_stars 5"));
    assert_true(fabs(res->moffat_fwhm - FWHM) < 0.1);
    assert_true(fabs(res->moffat_beta - BETA) < 0.4);
    assert_true(fabs(res->moffat_q - QAX) < 0.03);
    assert_true(fabs(res->moffat_theta - THETA) < 0.1);
    sp_psf *t = NULL;
    assert_int_equal(sp_psf_moffat(FWHM, BETA, QAX, THETA, res->psf->size, res->psf->oversamp, &t), SP_OK);
    printf("3-star Moffat fallback: relres %.3f%%\n", 100 * relres(res->psf, t, 1));
    assert_true(relres(res->psf, t, 1) < 0.02);
    sp_psf_free(&t);
    sp_epsf_result_free(&res);

    /* no star at all: the configured Moffat */
    assert_int_equal(sp_epsf_build(sc.img, sc.ivar, NULL, sc.nx, sc.ny, NULL, 0, &ep, &res), SP_OK);
    assert_int_equal(res->kind, SP_EPSF_MOFFAT_DEFAULT);
    assert_int_equal(res->is_fallback, 1);
    assert_float_equal(res->moffat_fwhm, ep.fallback_fwhm, 1e-12);
    assert_float_equal(res->moffat_beta, ep.fallback_beta, 1e-12);
    assert_true(fabs(res->fwhm - ep.fallback_fwhm) < 0.2);
    sp_epsf_result_free(&res);

    /* "stars" on empty sky: their fits fail -> fallback, flagged, not an error */
    sp_psfstar fake[6];
    memset(fake, 0, sizeof fake);
    for (int k = 0; k < 6; k++) {
        fake[k].x = 60 + 50 * k + 0.3;
        fake[k].y = 350.2;
        fake[k].flux = 1e4;
        fake[k].bkg_rms = 5;
    }
    assert_int_equal(sp_epsf_build(sc.img, sc.ivar, NULL, sc.nx, sc.ny, fake, 6, &ep, &res), SP_OK);
    printf("empty-sky stars: kind %d, reason '%s'\n", res->kind, res->reason);
    assert_int_equal(res->is_fallback, 1);
    assert_true(strlen(res->reason) > 0);
    sp_epsf_result_free(&res);

    /* analytic wings (core_fwhm): 3 stars pass min_stars 3; the wings become the fitted Moffat,
     * so far from the core the result equals a Moffat to float precision while the purely
     * empirical one carries the stars' noise there */
    ep.min_stars = 3;
    sp_epsf_result *emp = NULL;
    ep.core_fwhm = 0;
    assert_int_equal(sp_epsf_build(sc.img, sc.ivar, NULL, sc.nx, sc.ny, st, nst, &ep, &emp), SP_OK);
    ep.core_fwhm = 1.0;
    assert_int_equal(sp_epsf_build(sc.img, sc.ivar, NULL, sc.nx, sc.ny, st, nst, &ep, &res), SP_OK);
    assert_int_equal(res->kind, SP_EPSF_EMPIRICAL);
    assert_int_equal(emp->kind, SP_EPSF_EMPIRICAL);
    assert_true(isfinite(res->moffat_fwhm) && fabs(res->moffat_fwhm - FWHM) < 0.15);
    assert_true(isnan(emp->moffat_fwhm));
    {
        sp_psf *m2 = NULL;
        assert_int_equal(sp_psf_moffat(res->moffat_fwhm, res->moffat_beta, res->moffat_q, res->moffat_theta,
                                       res->psf->size, res->psf->oversamp, &m2),
                         SP_OK);
        assert_int_equal(sp_psf_moffat(FWHM, BETA, QAX, THETA, res->psf->size, res->psf->oversamp, &t), SP_OK);
        int S = res->psf->size, o2 = res->psf->oversamp;
        double cc = 0.5 * (S - 1), dw = 0, de = 0, pk = 0;
        for (int k = 0; k < S * S; k++) pk = fmax(pk, t->data[k]);
        for (int k = 0; k < S * S; k++) {
            double r = hypot(k % S - cc, k / S - cc) / o2;
            if (r < 2.5 * FWHM) continue;
            /* same normalisation up to the core's share: compare shapes through the ratio */
            dw = fmax(dw, fabs(res->psf->data[k] - m2->data[k]) / pk);
            de = fmax(de, fabs(emp->psf->data[k] - t->data[k]) / pk);
        }
        printf("analytic wings: max |wing - Moffat fit| %.2e of peak; empirical wings vs truth %.2e; relres %.3f%% "
               "(empirical %.3f%%)\n",
               dw, de, 100 * relres(res->psf, t, 1), 100 * relres(emp->psf, t, 1));
        assert_true(dw < 2e-3 * 1.0 && dw < de);
        assert_true(relres(res->psf, t, 1) < 0.03);
        sp_psf_free(&m2);
        sp_psf_free(&t);
    }
    sp_epsf_result_free(&emp);
    sp_epsf_result_free(&res);
    ep.core_fwhm = 0;
    ep.min_stars = 5;

    /* bad parameters are errors */
    ep.final_size = 40;
    assert_int_equal(sp_epsf_build(sc.img, NULL, NULL, sc.nx, sc.ny, st, nst, &ep, &res), SP_ERR_INPUT);
    assert_null(res);
    free(st);
    free_scene(&sc);
}

/* Diagnostics: growth curve, per-star stamps, residual rms. */
static void t_diagnostics(void **s)
{
    (void)s;
    scene sc;
    make_scene(&sc, 600, 600, 20, 3e4, 3e5, 5.0, 2.0, 5);
    sp_psfstar *st = NULL;
    int nst = 0;
    select_stars(&sc, 20, &st, &nst);
    sp_epsf_params ep;
    sp_epsf_params_default(&ep);
    ep.final_size = FINAL;
    sp_epsf_result *res = NULL;
    assert_int_equal(sp_epsf_build(sc.img, sc.ivar, NULL, sc.nx, sc.ny, st, nst, &ep, &res), SP_OK);
    assert_int_equal(res->kind, SP_EPSF_EMPIRICAL);
    assert_int_equal(res->ngrowth, FINAL - 1);
    for (int k = 1; k < res->ngrowth; k++) assert_true(res->growth_ee[k] >= res->growth_ee[k - 1] - 1e-6);
    assert_true(res->growth_ee[res->ngrowth - 1] > 0.99 && res->growth_ee[res->ngrowth - 1] <= 1.0 + 1e-6);
    /* the EE at r = 2 FWHM interpolated from the curve equals the direct value */
    assert_float_equal(res->growth_ee[15], sp_epsf_encircled(res->psf, 8.0), 1e-9);
    assert_non_null(res->star_stamps);
    assert_non_null(res->resid_stamps);
    /* a star's residual stamp is small against its data stamp */
    int N = res->stamp_size, c = (N - 1) / 2;
    double dpk = res->star_stamps[(size_t)c * N + c], rpk = 0;
    for (int k = 0; k < N * N; k++)
        if (isfinite(res->resid_stamps[k])) rpk = fmax(rpk, fabs(res->resid_stamps[k]));
    printf("diagnostics: resid_rms %.4f, star 0 data peak %.4f, |resid| max %.5f, chi2 %.2f\n", res->resid_rms,
           dpk, rpk, res->star_chi2[0]);
    assert_true(rpk < 0.1 * dpk);
    assert_true(res->resid_rms > 0 && res->resid_rms < 0.05);
    for (int k = 0; k < nst; k++) assert_int_equal(res->star_used[k], 1);
    /* median reduced chi2 near 1 (the brightest stars dominate the stack and
     * fit below 1: their own noise is partly in the model) */
    double chi[64];
    int nc = 0;
    for (int k = 0; k < nst && nc < 64; k++)
        if (isfinite(res->star_chi2[k])) chi[nc++] = res->star_chi2[k];
    for (int a2 = 0; a2 < nc; a2++)
        for (int b2 = a2 + 1; b2 < nc; b2++)
            if (chi[b2] < chi[a2]) {
                double t2 = chi[a2];
                chi[a2] = chi[b2];
                chi[b2] = t2;
            }
    printf("diagnostics: median reduced chi2 %.2f over %d stars\n", chi[nc / 2], nc);
    assert_true(chi[nc / 2] > 0.6 && chi[nc / 2] < 1.5);
    sp_epsf_result_free(&res);
    /* a catalogued neighbour is masked in the cutout (NaN in the stamp) */
    sp_source nb;
    memset(&nb, 0, sizeof nb);
    nb.x = st[0].x + 8.0;
    nb.y = st[0].y + 5.0;
    nb.a = 1.5;
    ep.neighbours = &nb;
    ep.nneighbours = 1;
    assert_int_equal(sp_epsf_build(sc.img, sc.ivar, NULL, sc.nx, sc.ny, st, nst, &ep, &res), SP_OK);
    assert_int_equal(res->kind, SP_EPSF_EMPIRICAL);
    int ix = (int)lround(st[0].x), iy = (int)lround(st[0].y);
    int pi = (int)lround(nb.x) - (ix - c), pj = (int)lround(nb.y) - (iy - c);
    assert_true(isnan(res->star_stamps[(size_t)pj * N + pi]));
    assert_true(isfinite(res->star_stamps[(size_t)c * N + c]));
    sp_epsf_result_free(&res);
    free(st);
    free_scene(&sc);
}

/* Star selection cuts, one candidate per reason. */
static void t_starsel(void **s)
{
    (void)s;
    const int nx = 500, ny = 400;
    float *img = calloc((size_t)nx * ny, sizeof(float));
    uint8_t *mask = calloc((size_t)nx * ny, 1);
    sp_psf *star = NULL, *gal = NULL;
    assert_int_equal(sp_psf_moffat(FWHM, BETA, 1.0, 0.0, 4 * 50 + 1, 4, &star), SP_OK);
    assert_int_equal(sp_psf_moffat(6.0, BETA, 0.5, 0.3, 4 * 50 + 1, 4, &gal), SP_OK);
    double *scr = malloc(sizeof(double) * 60 * 60);
    /* 0,1,2: good isolated stars; 3: near the edge; 4+5: a close pair;
     * 6: saturated core (masked); 7: elongated; 8: faint */
    double xs[9] = {100, 200, 300, 20, 400, 410, 100, 250, 400}, ys[9] = {100, 100, 100, 200, 100, 104, 300, 300, 300};
    double fl[9] = {1e5, 2e5, 3e5, 1e5, 1e5, 1e5, 2e5, 1e5, 300};
    for (int k = 0; k < 9; k++) sim_add_star(img, nx, ny, k == 7 ? gal : star, xs[k] + 0.2, ys[k] - 0.3, fl[k], scr);
    for (int j = 298; j <= 302; j++)
        for (int i = 98; i <= 102; i++) mask[j * nx + i] = SP_PIX_SAT | SP_PIX_BAD;
    sim_rng r;
    sim_seed(&r, 2);
    sim_sky sky = {0, 0, 0, 0};
    sim_finish(img, NULL, nx, ny, &sky, 5.0, 0.0, &r);
    sp_detect_params dp;
    sp_detect_params_default(&dp);
    dp.fwhm = FWHM;
    sp_source *src = NULL;
    int ns = 0;
    assert_int_equal(sp_detect(img, NULL, mask, nx, ny, NULL, &dp, &src, &ns), SP_OK);
    sp_starsel_params sp;
    sp_starsel_params_default(&sp);
    sp.stamp_size = FINAL;
    sp.fwhm = FWHM;
    sp_psfstar *st = NULL;
    int n = 0;
    sp_starsel_stats ss;
    assert_int_equal(sp_starsel_select(img, NULL, mask, nx, ny, src, ns, NULL, 0, &sp, &st, &n, &ss), SP_OK);
    printf("starsel: %d detections -> %d stars (edge %d flagged %d snr %d round %d crowded %d)\n", ns, n, ss.n_edge,
           ss.n_flagged, ss.n_snr, ss.n_round, ss.n_crowded);
    assert_int_equal(n, 3);
    assert_true(st[0].flux > st[1].flux && st[1].flux > st[2].flux);
    assert_true(fabs(st[0].x - 300.2) < 0.05 && fabs(st[0].y - 99.7) < 0.05);
    assert_true(ss.n_edge >= 1 && ss.n_crowded >= 2 && ss.n_flagged >= 1 && ss.n_round >= 1);
    assert_true(fabs(st[0].bkg) < 1.0);
    free(st);
    /* max_stars keeps the brightest */
    sp.max_stars = 2;
    assert_int_equal(sp_starsel_select(img, NULL, mask, nx, ny, src, ns, NULL, 0, &sp, &st, &n, NULL), SP_OK);
    assert_int_equal(n, 2);
    assert_true(fabs(st[1].x - 200.2) < 0.1);
    free(st);
    /* reference mode: positions only (slightly off), no detections needed */
    sp.max_stars = 30;
    sp.mode = SP_PSFSTAR_REFERENCE;
    double ref[6] = {100.5, 99.5, 199.8, 100.1, 250.0, 300.0};
    assert_int_equal(sp_starsel_select(img, NULL, mask, nx, ny, NULL, 0, ref, 3, &sp, &st, &n, &ss), SP_OK);
    assert_int_equal(n, 2); /* the elongated source is cut */
    assert_int_equal(st[0].origin, SP_PSFSTAR_REFERENCE);
    assert_true(fabs(st[0].x - 200.2) < 0.05);
    free(st);
    /* both: references snap to detections; unmatched detections follow */
    sp.mode = SP_PSFSTAR_BOTH;
    assert_int_equal(sp_starsel_select(img, NULL, mask, nx, ny, src, ns, ref, 3, &sp, &st, &n, &ss), SP_OK);
    assert_int_equal(n, 3);
    assert_int_equal(st[0].origin, SP_PSFSTAR_BOTH);
    assert_int_equal(st[1].origin, SP_PSFSTAR_BOTH);
    assert_int_equal(st[2].origin, SP_PSFSTAR_DETECT);
    free(st);
    /* a faint neighbour only counts when brighter than min_sep_flux_ratio */
    sp.mode = SP_PSFSTAR_DETECT;
    sp_source extra[1];
    memset(extra, 0, sizeof extra);
    sp_source *all = malloc(sizeof(sp_source) * (ns + 1));
    memcpy(all, src, sizeof(sp_source) * ns);
    all[ns] = extra[0];
    all[ns].x = 310;
    all[ns].y = 110;
    all[ns].flux = 100;
    assert_int_equal(sp_starsel_select(img, NULL, mask, nx, ny, all, ns + 1, NULL, 0, &sp, &st, &n, NULL), SP_OK);
    assert_int_equal(n, 2);
    free(st);
    sp.min_sep_flux_ratio = 0.01;
    assert_int_equal(sp_starsel_select(img, NULL, mask, nx, ny, all, ns + 1, NULL, 0, &sp, &st, &n, NULL), SP_OK);
    assert_int_equal(n, 3);
    free(st);
    /* the same faint neighbour closer than min_sep_always counts however faint */
    sp.min_sep_always = 15;
    assert_int_equal(sp_starsel_select(img, NULL, mask, nx, ny, all, ns + 1, NULL, 0, &sp, &st, &n, NULL), SP_OK);
    assert_int_equal(n, 2);
    free(st);
    sp.min_sep_always = 0;
    /* other sources (a catalog) for isolation only: a bright one crowds the star, a faint one does not,
     * one of unknown flux (<= 0) always does; none of them is a candidate */
    double oth[3] = {310, 110, 1e9};
    sp.others = oth;
    sp.nothers = 1;
    assert_int_equal(sp_starsel_select(img, NULL, mask, nx, ny, src, ns, NULL, 0, &sp, &st, &n, &ss), SP_OK);
    assert_int_equal(n, 2);
    assert_int_equal(ss.ncand, ns);
    free(st);
    oth[2] = 1.0;
    assert_int_equal(sp_starsel_select(img, NULL, mask, nx, ny, src, ns, NULL, 0, &sp, &st, &n, NULL), SP_OK);
    assert_int_equal(n, 3);
    free(st);
    oth[2] = -1.0;
    assert_int_equal(sp_starsel_select(img, NULL, mask, nx, ny, src, ns, NULL, 0, &sp, &st, &n, NULL), SP_OK);
    assert_int_equal(n, 2);
    free(st);
    sp.nothers = 0;
    sp.others = NULL;
    free(all);
    free(src);
    free(scr);
    free(img);
    free(mask);
    sp_psf_free(&star);
    sp_psf_free(&gal);
}

/* The stellar locus: round extended sources (what a compact galaxy looks like) pass every cut but
 * size; with size_tol they are rejected and the stars kept; a reference-backed one is exempt. */
static void t_starsel_locus(void **s)
{
    (void)s;
    const int nx = 620, ny = 600;
    float *img = calloc((size_t)nx * ny, sizeof(float));
    sp_psf *star = NULL, *ext = NULL;
    assert_int_equal(sp_psf_moffat(FWHM, BETA, 1.0, 0.0, 4 * 50 + 1, 4, &star), SP_OK);
    assert_int_equal(sp_psf_moffat(1.6 * FWHM, BETA, 1.0, 0.0, 4 * 50 + 1, 4, &ext), SP_OK);
    double *scr = malloc(sizeof(double) * 60 * 60);
    double xs[18], ys[18];
    int isext[18], next = 0;
    for (int k = 0; k < 18; k++) {
        xs[k] = 60 + 100 * (k % 6) + 0.13 * k;
        ys[k] = 100 + 200 * (k / 6) - 0.07 * k;
        isext[k] = k % 3 == 2;
        next += isext[k];
        sim_add_star(img, nx, ny, isext[k] ? ext : star, xs[k], ys[k], 5e4 * (1 + 0.1 * k), scr);
    }
    sim_rng r;
    sim_seed(&r, 5);
    sim_sky sky = {0, 0, 0, 0};
    sim_finish(img, NULL, nx, ny, &sky, 5.0, 0.0, &r);
    sp_detect_params dp;
    sp_detect_params_default(&dp);
    dp.fwhm = FWHM;
    sp_source *src = NULL;
    int ns = 0;
    assert_int_equal(sp_detect(img, NULL, NULL, nx, ny, NULL, &dp, &src, &ns), SP_OK);
    sp_starsel_params sp;
    sp_starsel_params_default(&sp);
    sp.stamp_size = FINAL;
    sp.fwhm = FWHM;
    sp_psfstar *st = NULL;
    int n = 0;
    sp_starsel_stats ss;
    assert_int_equal(sp_starsel_select(img, NULL, NULL, nx, ny, src, ns, NULL, 0, &sp, &st, &n, &ss), SP_OK);
    assert_int_equal(n, 18); /* without the cut every round source is a "star" */
    assert_int_equal(ss.n_size, 0);
    free(st);
    sp.size_tol = 0.15;
    assert_int_equal(sp_starsel_select(img, NULL, NULL, nx, ny, src, ns, NULL, 0, &sp, &st, &n, &ss), SP_OK);
    printf("starsel locus: %d detections -> %d stars, %d off the locus (%.3f px)\n", ns, n, ss.n_size, ss.locus);
    assert_int_equal(n, 18 - next);
    assert_int_equal(ss.n_size, next);
    assert_true(ss.locus > 0);
    for (int i = 0; i < n; i++) {
        int k = -1;
        for (int j = 0; j < 18; j++)
            if (hypot(st[i].x - xs[j], st[i].y - ys[j]) < 1.0) k = j;
        assert_true(k >= 0 && !isext[k]);
    }
    free(st);
    /* a reference star on an extended source is kept (the reference says it is a star) */
    sp.mode = SP_PSFSTAR_BOTH;
    double ref[2] = {xs[2] + 0.3, ys[2] - 0.2};
    assert_int_equal(sp_starsel_select(img, NULL, NULL, nx, ny, src, ns, ref, 1, &sp, &st, &n, &ss), SP_OK);
    assert_int_equal(n, 18 - next + 1);
    assert_int_equal(st[0].origin, SP_PSFSTAR_BOTH);
    free(st);
    free(src);
    free(scr);
    free(img);
    sp_psf_free(&star);
    sp_psf_free(&ext);
}

/* Cell grid: weights, continuity across cell borders, clamping, missing cells,
 * and fidelity between centres for a PSF whose FWHM varies linearly. */
static void t_grid(void **s)
{
    (void)s;
    const int nc = 3, os = 2, S = os * 20 + 1;
    double xe[4] = {0, 100, 200, 300}, ye[4] = {0, 100, 200, 300};
    sp_psf *cells[9];
    for (int j = 0; j < nc; j++)
        for (int i = 0; i < nc; i++)
            assert_int_equal(sp_psf_moffat(3.0 + 0.2 * i + 0.1 * j, BETA, 1.0, 0.0, S, os, &cells[j * nc + i]), SP_OK);
    sp_epsf_grid g = {nc, nc, xe, ye, (const sp_psf *const *)cells};
    int idx[4], n;
    double w[4];
    assert_int_equal(sp_epsf_grid_weights(&g, 150, 150, idx, w, &n), SP_OK);
    assert_int_equal(n, 1);
    assert_int_equal(idx[0], 4);
    assert_float_equal(w[0], 1.0, 1e-12);
    assert_int_equal(sp_epsf_grid_weights(&g, 100, 150, idx, w, &n), SP_OK);
    assert_int_equal(n, 2);
    assert_float_equal(w[0], 0.5, 1e-12);
    assert_int_equal(sp_epsf_grid_weights(&g, 10, 5, idx, w, &n), SP_OK); /* corner: clamped */
    assert_int_equal(n, 1);
    assert_int_equal(idx[0], 0);
    /* continuity across the border x = 200 */
    sp_psf *a = NULL, *b = NULL;
    assert_int_equal(sp_psf_alloc(S, os, &a), SP_OK);
    assert_int_equal(sp_psf_alloc(S, os, &b), SP_OK);
    assert_int_equal(sp_epsf_grid_at(&g, 200 - 1e-7, 170, a), SP_OK);
    assert_int_equal(sp_epsf_grid_at(&g, 200 + 1e-7, 170, b), SP_OK);
    assert_true(relres(a, b, 1) < 1e-6);
    /* between centres the blend of Moffats is close to the Moffat of the mean FWHM */
    assert_int_equal(sp_epsf_grid_at(&g, 100, 100, a), SP_OK);
    sp_psf *t = NULL;
    assert_int_equal(sp_psf_moffat(3.0 + 0.1 + 0.05, BETA, 1.0, 0.0, S, os, &t), SP_OK);
    printf("grid: blend at a 4-cell corner vs Moffat of the mean FWHM: %.3f%%\n", 100 * relres(a, t, 1));
    assert_true(relres(a, t, 1) < 0.01);
    /* a missing cell is skipped and the rest renormalised */
    sp_psf *keep = cells[4];
    cells[4] = NULL;
    assert_int_equal(sp_epsf_grid_weights(&g, 140, 160, idx, w, &n), SP_OK);
    double ws = 0;
    for (int k = 0; k < n; k++) {
        assert_true(idx[k] != 4);
        ws += w[k];
    }
    assert_float_equal(ws, 1.0, 1e-12);
    assert_int_equal(sp_epsf_grid_weights(&g, 150, 150, idx, w, &n), SP_ERR_INPUT);
    cells[4] = keep;
    for (int k = 0; k < 9; k++) sp_psf_free(&cells[k]);
    sp_psf_free(&a);
    sp_psf_free(&b);
    sp_psf_free(&t);
}

/* A PSF varying across the cell (FWHM +-5% from left to right edge, as a blend
 * of three Moffats): with spatial_degree 1 the result is the PSF at x_ref, not
 * the average over the stars, and the gradients are returned. */
static void t_spatial(void **s)
{
    (void)s;
    const int nx = 1024, ny = 1024, TS = 4 * (FINAL + 10) + 1;
    sp_psf *tl = NULL, *tc = NULL, *tr = NULL, *loc = NULL;
    assert_int_equal(sp_psf_moffat(FWHM * 0.95, BETA, QAX, THETA, TS, 4, &tl), SP_OK);
    assert_int_equal(sp_psf_moffat(FWHM, BETA, QAX, THETA, TS, 4, &tc), SP_OK);
    assert_int_equal(sp_psf_moffat(FWHM * 1.05, BETA, QAX, THETA, TS, 4, &tr), SP_OK);
    assert_int_equal(sp_psf_alloc(TS, 4, &loc), SP_OK);
    float *img = calloc((size_t)nx * ny, sizeof(float)), *ivar = calloc((size_t)nx * ny, sizeof(float));
    double *scr = malloc(sizeof(double) * 60 * 60);
    sim_rng r;
    sim_seed(&r, 3);
    sp_psfstar st[40];
    double xs[40], ys[40];
    int n = 0;
    while (n < 40) {
        double x = 45 + sim_unif(&r) * (nx - 90), y = 45 + sim_unif(&r) * (ny - 90);
        int ok = 1;
        for (int k = 0; k < n; k++)
            if (hypot(x - xs[k], y - ys[k]) < 45) ok = 0;
        if (!ok) continue;
        double u = x / nx; /* 0 .. 1: blend left -> centre -> right */
        const sp_psf *two[2] = {u < 0.5 ? tl : tc, u < 0.5 ? tc : tr};
        double w[2] = {u < 0.5 ? 1 - 2 * u : 2 - 2 * u, u < 0.5 ? 2 * u : 2 * u - 1};
        assert_int_equal(sp_psf_blend(two, w, 2, loc), SP_OK);
        double f = 2e4 * pow(25.0, sim_unif(&r));
        sim_add_star(img, nx, ny, loc, x, y, f, scr);
        memset(&st[n], 0, sizeof st[n]);
        xs[n] = st[n].x = x;
        ys[n] = st[n].y = y;
        st[n].flux = f;
        st[n].bkg_rms = 5;
        n++;
    }
    sim_sky sky = {0, 0, 0, 0};
    sim_finish(img, ivar, nx, ny, &sky, 5.0, 2.0, &r);
    double rr[2];
    for (int sd = 0; sd <= 1; sd++) {
        sp_epsf_params ep;
        sp_epsf_params_default(&ep);
        ep.final_size = FINAL;
        ep.spatial_degree = sd;
        ep.x_ref = 0.5 * nx;
        ep.y_ref = 0.5 * ny;
        sp_epsf_result *res = NULL;
        assert_int_equal(sp_epsf_build(img, ivar, NULL, nx, ny, st, n, &ep, &res), SP_OK);
        sp_psf *t = NULL;
        assert_int_equal(sp_psf_moffat(FWHM, BETA, QAX, THETA, res->psf->size, res->psf->oversamp, &t), SP_OK);
        rr[sd] = relres(res->psf, t, 1);
        assert_int_equal(res->spatial_degree, sd);
        if (sd) {
            assert_non_null(res->grad_x);
            /* the x gradient is wider-minus-narrower: negative at the core */
            int S = res->psf->size, c = (S - 1) / 2;
            assert_true(res->grad_x[c * S + c] < 0);
            assert_float_equal(res->x_ref, 512.0, 1e-9);
        } else {
            assert_null(res->grad_x);
        }
        sp_psf_free(&t);
        sp_epsf_result_free(&res);
    }
    printf("FWHM +-5%% across the cell: relres at the centre %.3f%% (one PSF) -> %.3f%% (linear variation)\n",
           100 * rr[0], 100 * rr[1]);
    assert_true(rr[1] < rr[0]);
    assert_true(rr[1] < 0.005);
    free(img);
    free(ivar);
    free(scr);
    sp_psf_free(&tl);
    sp_psf_free(&tc);
    sp_psf_free(&tr);
    sp_psf_free(&loc);
}


/* A band-wide build from the cutouts of several cells (sp_epsf_build_field):
 * a 1024^2 field cut into 4x4 cells of 256^2 with 7 stars each (flux
 * fmin .. 10 fmin, sky sigma 5), the PSF's FWHM varying quadratically over the field
 * (+6% at the x edges, -+4% along y). The degree-2 field model, built from all
 * 112 stars, must beat the cells' own ePSFs at the cell centres (median) and
 * stay under 1% there, and follow the variation (better than degree 0); with
 * 5x fainter stars, wing smoothing (wing_smooth_k) must lower the error. */
static double field_fwhm(double x, double y) { return FWHM * (1.0 + 0.06 * ((x - 512) / 512) * ((x - 512) / 512) - 0.04 * (y - 512) / 512); }

/* one field case: medians over the cells of relres at the cell centres of the cells' own
 * ePSFs, the field model of degree 0 and of degree 2 (med[0..2]) */
static void field_case(double fmin, double wing_k, double med[3])
{
    const int nc = 4, cw = 256, nper = 7, TS = 4 * (FINAL + 10) + 1;
    sim_rng r;
    sim_seed(&r, 11);
    double *scr = malloc(sizeof(double) * 60 * 60);
    sp_epsf_cutout *cuts = calloc(nc * nc * nper, sizeof *cuts);
    int ncut = 0;
    double rcell[16], rc[16], rf[3][16], allx[128], ally[128];
    int nall = 0;
    sp_epsf_params ep;
    sp_epsf_params_default(&ep);
    ep.final_size = FINAL;
    ep.spatial_degree = 0;
    ep.wing_smooth_k = wing_k;
    for (int cell = 0; cell < nc * nc; cell++) {
        const double x0 = (cell % nc) * cw, y0 = (cell / nc) * cw;
        float *img = calloc((size_t)cw * cw, sizeof(float)), *ivar = calloc((size_t)cw * cw, sizeof(float));
        sp_psfstar st[16];
        int n = 0;
        while (n < nper) {
            double x = 25 + sim_unif(&r) * (cw - 50), y = 25 + sim_unif(&r) * (cw - 50);
            int ok = 1;
            for (int k = 0; k < nall; k++) /* isolated across cell borders too */
                if (hypot(x + x0 - allx[k], y + y0 - ally[k]) < 45) ok = 0;
            if (!ok) continue;
            allx[nall] = x + x0;
            ally[nall++] = y + y0;
            sp_psf *t = NULL;
            assert_int_equal(sp_psf_moffat(field_fwhm(x + x0, y + y0), BETA, QAX, THETA, TS, 4, &t), SP_OK);
            double f = fmin * pow(10.0, sim_unif(&r));
            sim_add_star(img, cw, cw, t, x, y, f, scr);
            sp_psf_free(&t);
            memset(&st[n], 0, sizeof st[n]);
            st[n].x = x + 0.3 * (sim_unif(&r) - 0.5); /* a detection's centre is not exact */
            st[n].y = y + 0.3 * (sim_unif(&r) - 0.5);
            st[n].flux = f;
            st[n].bkg_rms = 5;
            n++;
        }
        sim_sky sky = {0, 0, 0, 0};
        sim_finish(img, ivar, cw, cw, &sky, 5.0, 2.0, &r);
        /* the cell's own ePSF at its centre */
        sp_epsf_params ec = ep;
        ec.x_ref = ec.y_ref = 0.5 * cw;
        sp_epsf_result *res = NULL;
        assert_int_equal(sp_epsf_build(img, ivar, NULL, cw, cw, st, n, &ec, &res), SP_OK);
        sp_psf *t = NULL;
        assert_int_equal(sp_psf_moffat(field_fwhm(x0 + 0.5 * cw, y0 + 0.5 * cw), BETA, QAX, THETA, res->psf->size,
                                       res->psf->oversamp, &t),
                         SP_OK);
        rcell[cell] = relres(res->psf, t, 1);
        sp_psf_free(&t);
        sp_epsf_result_free(&res);
        int got = 0;
        assert_int_equal(sp_epsf_cutouts(img, ivar, NULL, cw, cw, x0, y0, st, n, &ep, cuts + ncut, &got), SP_OK);
        assert_int_equal(got, n);
        assert_int_equal(cuts[ncut].n, FINAL);
        assert_int_equal(cuts[ncut].ix, (int)lround(st[0].x) + (int)x0);
        ncut += got;
        free(img);
        free(ivar);
    }
    for (int deg = 0; deg <= 2; deg += 2) {
        sp_epsf_params ef = ep;
        ef.spatial_degree = deg;
        ef.x_ref = ef.y_ref = 512;
        ef.spatial_scale = 512;
        sp_epsf_result *res = NULL;
        assert_int_equal(sp_epsf_build_field(cuts, ncut, &ef, &res), SP_OK);
        assert_int_equal(res->kind, SP_EPSF_EMPIRICAL);
        assert_int_equal(res->spatial_degree, deg);
        assert_int_equal(res->nterms, deg ? 5 : 0);
        /* every star is kept, and its position comes back in field pixels */
        int nu = 0;
        for (int q = 0; q < ncut; q++) nu += res->star_used[q];
        assert_int_equal(nu, ncut);
        assert_true(fabs(res->star_x[0] - cuts[0].x) < 0.5 && fabs(res->star_y[5] - cuts[5].y) < 0.5);
        sp_psf *ev = NULL;
        assert_int_equal(sp_psf_alloc(res->psf->size, res->psf->oversamp, &ev), SP_OK);
        double px[16], py[16];
        for (int k = 0; k < nc * nc; k++) {
            px[k] = (k % nc + 0.5) * cw;
            py[k] = (k / nc + 0.5) * cw;
        }
        for (int k = 0; k < nc * nc; k++) {
            assert_int_equal(sp_epsf_poly_eval(res->psf, res->terms, res->spatial_degree, (px[k] - 512) / 512,
                                               (py[k] - 512) / 512, ev),
                             SP_OK);
            sp_psf *t = NULL;
            assert_int_equal(sp_psf_moffat(field_fwhm(px[k], py[k]), BETA, QAX, THETA, ev->size, ev->oversamp, &t),
                             SP_OK);
            rf[deg][k] = relres(ev, t, 1);
            sp_psf_free(&t);
        }
        sp_psf_free(&ev);
        sp_epsf_result_free(&res);
    }
    /* medians over the cells */
    const double *src[3] = {rcell, rf[0], rf[2]};
    for (int m = 0; m < 3; m++) {
        memcpy(rc, src[m], sizeof rc);
        qsort(rc, 16, sizeof *rc, cmp_dbl);
        med[m] = 0.5 * (rc[7] + rc[8]);
    }
    for (int k = 0; k < ncut; k++) sp_epsf_cutout_free(&cuts[k]);
    free(cuts);
    free(scr);
}

static void t_field(void **s)
{
    (void)s;
    double med[3], mf[3], mw[3];
    field_case(2e4, 0.0, med);
    printf("field build, 4x4 cells x 7 stars of flux 2e4-2e5: relres at the cell centres (median): own cell ePSF "
           "%.2f%%, field degree 0 %.2f%%, field degree 2 %.2f%%\n",
           100 * med[0], 100 * med[1], 100 * med[2]);
    assert_true(med[2] < med[0]);
    assert_true(med[2] < med[1]);
    assert_true(med[2] < 0.01);
    /* 5x fainter stars: the faint outer pixels are noise; wing smoothing cuts it */
    field_case(4e3, 0.0, mf);
    field_case(4e3, 0.2, mw);
    printf("flux 4e3-4e4: field degree 2 %.2f%% -> %.2f%% with wing smoothing 0.2 (own cells %.2f%% -> %.2f%%)\n",
           100 * mf[2], 100 * mw[2], 100 * mf[0], 100 * mw[0]);
    assert_true(mw[2] < 0.85 * mf[2]);
    assert_true(mw[0] < mf[0]);
}

/* Bands built in parallel give the same result as serially. */
static void t_parallel(void **s)
{
    (void)s;
    scene sc;
    make_scene(&sc, 600, 600, 20, 3e4, 3e5, 5.0, 2.0, 8);
    sp_psfstar *st = NULL;
    int nst = 0;
    select_stars(&sc, 20, &st, &nst);
    sp_epsf_result *ser[4] = {0}, *par[4] = {0};
    int stat[4] = {0};
    for (int k = 0; k < 4; k++) {
        sp_epsf_params ep;
        sp_epsf_params_default(&ep);
        ep.oversamp = 1 + k;
        ep.final_size = FINAL;
        assert_int_equal(sp_epsf_build(sc.img, sc.ivar, NULL, sc.nx, sc.ny, st, nst, &ep, &ser[k]), SP_OK);
    }
#pragma omp parallel for num_threads(2) schedule(dynamic)
    for (int k = 0; k < 4; k++) {
        sp_epsf_params ep;
        sp_epsf_params_default(&ep);
        ep.oversamp = 1 + k;
        ep.final_size = FINAL;
        stat[k] = sp_epsf_build(sc.img, sc.ivar, NULL, sc.nx, sc.ny, st, nst, &ep, &par[k]);
    }
    for (int k = 0; k < 4; k++) {
        assert_int_equal(stat[k], SP_OK);
        int S = ser[k]->psf->size;
        assert_memory_equal(ser[k]->psf->data, par[k]->psf->data, sizeof(float) * S * S);
        sp_epsf_result_free(&ser[k]);
        sp_epsf_result_free(&par[k]);
    }
    free(st);
    free_scene(&sc);
}

/* Wing pooling (sp_epsf_pool_wings): 9 cells = a core + wide wing truth plus
 * independent noise; the pooled cells must (1) equal their own ePSF inside
 * rin up to the renormalisation, (2) be closer to the truth beyond rout than
 * any noisy cell by about sqrt(9) or more (mean + smoothing), (3) have unit
 * sum; a cell with weight 0 and apply 0 is untouched, and with no weight
 * nothing changes. */
static void t_pool(void **st)
{
    (void)st;
    enum { NC = 9 };
    const int N = 41, os = 2, S = os * (N - 1) + 1;
    sp_psf *core = NULL, *wing = NULL, *t = NULL, *cells[NC + 1], *orig[NC + 1];
    assert_int_equal(sp_psf_moffat(4.0, 3.0, 1.0, 0.0, S, os, &core), SP_OK);
    assert_int_equal(sp_psf_moffat(12.0, 2.0, 1.0, 0.0, S, os, &wing), SP_OK);
    assert_int_equal(sp_psf_alloc(S, os, &t), SP_OK);
    for (int q = 0; q < S * S; q++) t->data[q] = 0.97f * core->data[q] + 0.03f * wing->data[q];
    assert_int_equal(sp_psf_normalize(t), SP_OK);
    float pk = 0;
    for (int q = 0; q < S * S; q++) pk = t->data[q] > pk ? t->data[q] : pk;
    uint64_t rng = 12345;
    double w[NC + 1];
    uint8_t ap[NC + 1];
    for (int k = 0; k <= NC; k++) {
        assert_int_equal(sp_psf_alloc(S, os, &cells[k]), SP_OK);
        for (int q = 0; q < S * S; q++) {
            double g = 0; /* ~N(0,1): sum of 12 uniforms - 6 */
            for (int a = 0; a < 12; a++) {
                rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
                g += (double)(rng >> 11) / 9007199254740992.0;
            }
            cells[k]->data[q] = t->data[q] + (float)(0.005 * pk * (g - 6.0));
        }
        assert_int_equal(sp_psf_normalize(cells[k]), SP_OK);
        assert_int_equal(sp_psf_copy(cells[k], &orig[k]), SP_OK);
        w[k] = k < NC ? 10 : 0;
        ap[k] = k < NC;
    }
    /* outer-region rms error against the truth */
    const double c = 0.5 * (S - 1), rin = 2 * 4.0, rout = 3 * 4.0;
    double e_before = 0, e_after = 0, core_dev = 0;
    for (int k = 0; k < NC; k++) {
        double eb = 0;
        for (int q = 0; q < S * S; q++)
            if (hypot(q % S - c, q / S - c) / os > rout) eb += pow(cells[k]->data[q] - t->data[q], 2);
        e_before += eb / NC;
    }
    sp_epsf_pool_params pp;
    sp_epsf_pool_params_default(&pp);
    assert_int_equal(sp_epsf_pool_wings(cells, w, ap, NC + 1, &pp), SP_OK);
    for (int k = 0; k < NC; k++) {
        double ea = 0, s = 0, ratio = 0;
        int nr = 0;
        for (int q = 0; q < S * S; q++) {
            double r = hypot(q % S - c, q / S - c) / os;
            s += cells[k]->data[q];
            if (r > rout) ea += pow(cells[k]->data[q] - t->data[q], 2);
            if (r < rin && orig[k]->data[q] > 0.01 * pk) ratio += cells[k]->data[q] / orig[k]->data[q], nr++;
        }
        e_after += ea / NC;
        assert_true(fabs(s / (os * os) - 1.0) < 1e-5);
        /* inside rin: the cell's own ePSF times one renormalisation factor */
        ratio /= nr;
        for (int q = 0; q < S * S; q++) {
            double r = hypot(q % S - c, q / S - c) / os;
            if (r < rin) core_dev = fmax(core_dev, fabs(cells[k]->data[q] - ratio * orig[k]->data[q]));
        }
    }
    print_message("pool: outer rms error^2 %.3g -> %.3g (x%.1f lower), core deviation %.2g of peak\n", e_before, e_after, e_before / e_after, core_dev / pk);
    assert_true(core_dev < 1e-6 * pk);
    assert_true(e_after < e_before / 30.0); /* the mean of 9 alone gives ~9 */
    assert_memory_equal(cells[NC]->data, orig[NC]->data, sizeof(float) * S * S);
    /* no weight: nothing changes */
    double w0[NC + 1] = {0};
    sp_psf *keep = NULL;
    assert_int_equal(sp_psf_copy(cells[0], &keep), SP_OK);
    assert_int_equal(sp_epsf_pool_wings(cells, w0, ap, NC + 1, &pp), SP_OK);
    assert_memory_equal(cells[0]->data, keep->data, sizeof(float) * S * S);
    sp_psf_free(&keep);
    for (int k = 0; k <= NC; k++) sp_psf_free(&cells[k]), sp_psf_free(&orig[k]);
    sp_psf_free(&core), sp_psf_free(&wing), sp_psf_free(&t);
}

/* The Moffat fit's pixel rejection (sp_epsf_fit_moffat, reject_sigma): (1) each of
 * 10 stars has a neighbour of 25% of its flux 7 px away that no list knows of (a
 * merged detection): without rejection the Moffat comes out wide (FWHM, beta and
 * so every PSF flux off); with it, near the truth. (2) A PSF with a round wide wing
 * (3% of the light, 3x the FWHM) and no contamination: the rejection leaves the
 * fit as it is (the ring median keeps the wing in), where a rejection of plain
 * residuals would clip the wing and shrink the Moffat. */
static void wing_scene(const sp_psf *truth, int contaminate, uint64_t seed, float **img, float **ivar,
                       sp_psfstar *st, int *nst)
{
    const int nx = 360, ny = 180;
    double *scr = malloc(sizeof(double) * 80 * 80);
    *img = calloc((size_t)nx * ny, sizeof(float));
    *ivar = calloc((size_t)nx * ny, sizeof(float));
    sim_rng r;
    sim_seed(&r, seed);
    int n = 0;
    for (int j = 0; j < 2; j++)
        for (int i = 0; i < 5; i++, n++) {
            double x = 60 + 60 * i + sim_unif(&r), y = 60 + 60 * j + sim_unif(&r), f = 2e4 * pow(5.0, sim_unif(&r));
            sim_add_star(*img, nx, ny, truth, x, y, f, scr);
            if (contaminate) {
                double a = 2 * M_PI * sim_unif(&r);
                sim_add_star(*img, nx, ny, truth, x + 7 * cos(a), y + 7 * sin(a), 0.25 * f, scr);
            }
            memset(&st[n], 0, sizeof st[n]);
            st[n].x = x;
            st[n].y = y;
            st[n].flux = f;
            st[n].bkg = 0;
            st[n].bkg_rms = 5.0;
        }
    sim_sky sky = {0, 0, 0, 0};
    sim_finish(*img, *ivar, nx, ny, &sky, 5.0, 2.0, &r);
    *nst = n;
    free(scr);
}

static void t_moffat_reject(void **s)
{
    (void)s;
    const int TS = 4 * (FINAL + 10) + 1;
    sp_psf *core = NULL, *wing = NULL, *mix = NULL;
    assert_int_equal(sp_psf_moffat(FWHM, BETA, QAX, THETA, TS, 4, &core), SP_OK);
    assert_int_equal(sp_psf_moffat(3 * FWHM, 2.0, 1.0, 0.0, TS, 4, &wing), SP_OK);
    assert_int_equal(sp_psf_alloc(TS, 4, &mix), SP_OK);
    for (int q = 0; q < TS * TS; q++) mix->data[q] = 0.97f * core->data[q] + 0.03f * wing->data[q];
    assert_int_equal(sp_psf_normalize(mix), SP_OK);
    sp_psfstar st[10];
    int n = 0;
    float *img = NULL, *ivar = NULL;
    double f0, b0, q0, t0, f3, b3, q3, t3;
    /* (1) contaminated, Moffat truth */
    wing_scene(core, 1, 21, &img, &ivar, st, &n);
    assert_int_equal(sp_epsf_fit_moffat(img, ivar, NULL, 360, 180, st, n, FWHM, 3.5, 0.0, &f0, &b0, &q0, &t0), SP_OK);
    assert_int_equal(sp_epsf_fit_moffat(img, ivar, NULL, 360, 180, st, n, FWHM, 3.5, 3.0, &f3, &b3, &q3, &t3), SP_OK);
    print_message("neighbours of 25%% at 7 px: Moffat FWHM %.3f beta %.3f q %.3f without rejection, "
                  "FWHM %.3f beta %.3f q %.3f with (truth %.1f %.1f %.2f)\n",
                  f0, b0, q0, f3, b3, q3, FWHM, BETA, QAX);
    /* measured: 3.977 2.218 0.876 without, 4.076 2.789 0.887 with (what is left: the
     * neighbours' light within 1 FWHM of the stars and their faint wings) */
    assert_true(fabs(b0 - BETA) > 0.5);
    assert_true(fabs(f3 - FWHM) < 0.12 && fabs(b3 - BETA) < 0.3 && fabs(q3 - QAX) < 0.02);
    assert_true(fabs(b3 - BETA) < 0.4 * fabs(b0 - BETA));
    free(img);
    free(ivar);
    /* (2) clean stars, PSF with a round wide wing */
    wing_scene(mix, 0, 22, &img, &ivar, st, &n);
    double c0 = sp_cputime();
    assert_int_equal(sp_epsf_fit_moffat(img, ivar, NULL, 360, 180, st, n, FWHM, 3.5, 0.0, &f0, &b0, &q0, &t0), SP_OK);
    double c1 = sp_cputime();
    assert_int_equal(sp_epsf_fit_moffat(img, ivar, NULL, 360, 180, st, n, FWHM, 3.5, 3.0, &f3, &b3, &q3, &t3), SP_OK);
    double c2 = sp_cputime();
    print_message("3%% round wing, no neighbours: FWHM %.4f beta %.4f q %.4f without rejection, "
                  "FWHM %.4f beta %.4f q %.4f with (CPU %.1f / %.1f ms)\n", f0, b0, q0, f3, b3, q3,
                  1e3 * (c1 - c0), 1e3 * (c2 - c1));
    assert_true(fabs(f3 - f0) < 0.01 && fabs(b3 - b0) < 0.03 && fabs(q3 - q0) < 0.003);
    free(img);
    free(ivar);
    sp_psf_free(&core), sp_psf_free(&wing), sp_psf_free(&mix);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(t_fidelity), cmocka_unit_test(t_noiseless), cmocka_unit_test(t_fallback),
        cmocka_unit_test(t_diagnostics), cmocka_unit_test(t_starsel), cmocka_unit_test(t_starsel_locus), cmocka_unit_test(t_grid),
        cmocka_unit_test(t_spatial),     cmocka_unit_test(t_parallel), cmocka_unit_test(t_pool),
        cmocka_unit_test(t_field),       cmocka_unit_test(t_moffat_reject),
    };
    return cmocka_run_group_tests_name("epsf", tests, NULL, NULL);
}

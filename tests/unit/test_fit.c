/* test_fit.c — the patch fitting engine on synthetic images with a known
 * Moffat PSF and seeded Gaussian noise:
 *   isolated stars at the Cramér–Rao bound (flux, position, pulls, bias),
 *   EXP/DEV galaxies against an independent fine-grid reference,
 *   blends and halo neighbours (and a control proving the check can fail),
 *   multi-band shared geometry vs single-band, sky fitting,
 *   robustness (zero flux, ROI edge, all masked, coincident, bad input),
 *   model output and API checks.
 * Monte Carlo sizes are chosen so sampling noise sits well inside the bars
 * (e.g. 1500 realisations: the std of a std is 1.8%). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "support.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_fit.h"
#include "surveyproc/sp_psf.h"
#include "surveyproc/sp_sim.h"

#include "../../src/fit/fit_internal.h" /* white-box: analytic derivatives */

#include <fftw3.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------ helpers */

static uint64_t rng_s = 0x12345678abcdefULL;
static void rng_seed(uint64_t s) { rng_s = s * 2654435761ULL + 0x9E3779B97F4A7C15ULL; }
static double urand(void)
{
    rng_s ^= rng_s << 13;
    rng_s ^= rng_s >> 7;
    rng_s ^= rng_s << 17;
    return ((rng_s >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}
static double gauss(void) { return sqrt(-2.0 * log(urand())) * cos(2.0 * M_PI * urand()); }

static const double FWHM = 3.0, BETA = 3.0;
static const int OS = 4, HALF = 12;
static sp_psf *g_psf;
static double g_Z;
static double *g_prof_cache; /* star profiles cached by render_truth_stars; freed in teardown */ /* normaliser of the stamp: the truth uses the same flux convention */

static int setup(void **s)
{
    (void)s;
    if (sp_psf_moffat(FWHM, BETA, 1.0, 0.0, 2 * HALF * OS + 1, OS, &g_psf) != SP_OK) return -1;
    double c = 0.5 * (g_psf->size - 1), v;
    g_Z = 0.0;
    for (int j = 0; j < g_psf->size; j++)
        for (int i = 0; i < g_psf->size; i++) {
            sp_psf_moffat_pixel(FWHM, BETA, 1.0, 0.0, (i - c) / OS, (j - c) / OS, &v);
            g_Z += v;
        }
    g_Z /= OS * OS;
    return sp_fit_init();
}
static int teardown(void **s)
{
    (void)s;
    sp_psf_free(&g_psf);
    free(g_prof_cache);
    g_prof_cache = NULL;
    sp_fit_cleanup();
    return 0;
}

/* True (analytic, pixel-integrated) unit-flux star profile at offset, with the
 * stamp's support and normalisation. */
static double truth_star(double dx, double dy)
{
    if (fabs(dx) > HALF + 0.5 || fabs(dy) > HALF + 0.5) return 0.0;
    double v;
    sp_psf_moffat_pixel(FWHM, BETA, 1.0, 0.0, dx, dy, &v);
    return v / g_Z;
}

typedef struct {
    double mean, std, median;
} stat3;
static int cmpd(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}
static stat3 stats(double *v, int n)
{
    stat3 s = {0};
    for (int i = 0; i < n; i++) s.mean += v[i];
    s.mean /= n;
    for (int i = 0; i < n; i++) s.std += (v[i] - s.mean) * (v[i] - s.mean);
    s.std = sqrt(s.std / (n - 1));
    qsort(v, (size_t)n, sizeof *v, cmpd);
    s.median = n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
    return s;
}

/* 3x3 inverse (symmetric) -> element [0][0], [1][1] */
static void inv3_diag(double F[3][3], double *d0, double *d1, double *d2)
{
    double a = F[0][0], b = F[0][1], c = F[0][2], d = F[1][1], e = F[1][2], f = F[2][2];
    double det = a * (d * f - e * e) - b * (b * f - c * e) + c * (b * e - c * d);
    *d0 = (d * f - e * e) / det;
    *d1 = (a * f - c * c) / det;
    *d2 = (a * d - b * b) / det;
}

static void check_result_finite(const sp_fit_result *r, int nbands)
{
    /* "never NaN without a flag" */
    unsigned nodata = SP_FITF_NODATA | SP_FITF_NODATA_BAND | SP_FITF_NONFINITE | SP_FITF_SINGULAR;
    if (!(r->flags & nodata)) {
        assert_true(isfinite(r->x) && isfinite(r->y) && isfinite(r->x_err) && isfinite(r->y_err));
        for (int b = 0; b < nbands; b++) {
            assert_true(isfinite(r->flux[b]));
            assert_true(isfinite(r->flux_err[b]));
            assert_true(isfinite(r->flux_err_cond[b]));
            assert_true(isfinite(r->chi2dof[b]));
            assert_true(isfinite(r->blend[b]));
        }
    }
    for (int b = 0; b < nbands; b++)
        if (isnan(r->flux[b])) assert_true((r->band_flags[b] & SP_FITB_NODATA) || (r->flags & nodata));
    assert_true(isfinite(r->re) && isfinite(r->q) && isfinite(r->theta));
}

/* ------------------------------------------------------------ 1. stars at the CRLB */

static void t_star_crlb(void **s)
{
    (void)s;
    enum { N = 25, NPOS = 8, NREAL = 1500 };
    const double sig_sky = 1.0, gain = 5.0; /* variance = sky + F p / gain */
    static float data[N * N], ivar[N * N];
    static double prof[NPOS][N * N], pdx[NPOS][N * N], pdy[NPOS][N * N];
    double xt[NPOS], yt[NPOS];
    rng_seed(11);
    for (int p = 0; p < NPOS; p++) {
        xt[p] = 12.0 + urand() - 0.5;
        yt[p] = 12.0 + urand() - 0.5;
        const double h = 1e-4;
        for (int j = 0; j < N; j++)
            for (int i = 0; i < N; i++) {
                prof[p][j * N + i] = truth_star(i - xt[p], j - yt[p]);
                pdx[p][j * N + i] = (truth_star(i - xt[p] - h, j - yt[p]) - truth_star(i - xt[p] + h, j - yt[p])) / (2 * h);
                pdy[p][j * N + i] = (truth_star(i - xt[p], j - yt[p] - h) - truth_star(i - xt[p], j - yt[p] + h)) / (2 * h);
            }
    }
    sp_fit_workspace *ws = NULL;
    assert_int_equal(sp_fit_workspace_create(N * N, 4, 1, &ws), SP_OK);
    sp_fit_image im;
    sp_fit_image_aligned(&im, 0, 0, N, N);
    im.data = data;
    im.ivar = ivar;
    im.psf = g_psf;
    const double snrs[3] = {20.0, 100.0, 500.0};
    double *df = malloc(sizeof(double) * NREAL), *pull = malloc(sizeof(double) * NREAL),
           *dx = malloc(sizeof(double) * NREAL), *pullx = malloc(sizeof(double) * NREAL);
    for (int si = 0; si < 3; si++) {
        /* flux giving the requested SNR at the CRLB (sky-limited estimate, then exact below) */
        double sp2 = 0;
        for (int k = 0; k < N * N; k++) sp2 += prof[0][k] * prof[0][k];
        double F = snrs[si] * sig_sky / sqrt(sp2);
        for (int it = 0; it < 20; it++) { /* solve SNR(F) = snr with the Poisson term */
            double info = 0;
            for (int k = 0; k < N * N; k++) info += prof[0][k] * prof[0][k] / (sig_sky * sig_sky + F * prof[0][k] / gain);
            F *= snrs[si] / (F * sqrt(info));
        }
        double crlb_f = 0, crlb_x = 0;
        for (int p = 0; p < NPOS; p++) {
            double Fi[3][3] = {{0}};
            for (int k = 0; k < N * N; k++) {
                double var = sig_sky * sig_sky + F * prof[p][k] / gain;
                double g[3] = {prof[p][k], F * pdx[p][k], F * pdy[p][k]};
                for (int a = 0; a < 3; a++)
                    for (int b = 0; b < 3; b++) Fi[a][b] += g[a] * g[b] / var;
            }
            double v0, v1, v2;
            inv3_diag(Fi, &v0, &v1, &v2);
            crlb_f += v0 / NPOS;
            crlb_x += v1 / NPOS;
        }
        crlb_f = sqrt(crlb_f);
        crlb_x = sqrt(crlb_x);
        int nconv = 0;
        for (int r = 0; r < NREAL; r++) {
            int p = r % NPOS;
            for (int k = 0; k < N * N; k++) {
                double var = sig_sky * sig_sky + F * prof[p][k] / gain;
                data[k] = (float)(F * prof[p][k] + sqrt(var) * gauss());
                ivar[k] = (float)(1.0 / var);
            }
            sp_fit_source src;
            memset(&src, 0, sizeof src);
            src.type = SP_SRC_STAR;
            src.x = xt[p] + 0.4 * (urand() - 0.5);
            src.y = yt[p] + 0.4 * (urand() - 0.5);
            src.flux[0] = F * (0.8 + 0.4 * urand());
            sp_fit_result res;
            assert_int_equal(sp_fit_patch(ws, NULL, &im, 1, 1, &src, 1, &res, NULL, NULL), SP_OK);
            check_result_finite(&res, 1);
            df[r] = res.flux[0] - F;
            pull[r] = df[r] / res.flux_err[0];
            dx[r] = res.x - xt[p];
            pullx[r] = dx[r] / res.x_err;
            nconv += (res.flags & SP_FITF_CONVERGED) != 0;
        }
        stat3 sf = stats(df, NREAL), sp = stats(pull, NREAL), sx = stats(dx, NREAL), spx = stats(pullx, NREAL);
        printf("# star SNR %5.0f: F %.1f scatter/CRLB %.3f pull std %.3f bias %+.3f%% (median %+.3f%%) "
               "x scatter/bound %.3f x pull std %.3f converged %d/%d\n",
               snrs[si], F, sf.std / crlb_f, sp.std, 100 * sf.mean / F, 100 * sf.median / F, sx.std / crlb_x, spx.std,
               nconv, NREAL);
        assert_true(sf.std / crlb_f < 1.05 && sf.std / crlb_f > 0.95);
        assert_true(sp.std > 0.95 && sp.std < 1.05);
        assert_true(sx.std / crlb_x < 1.10 && sx.std / crlb_x > 0.90);
        if (snrs[si] > 100) assert_true(fabs(sf.median / F) < 0.002);
        assert_int_equal(nconv, NREAL);
    }
    free(df);
    free(pull);
    free(dx);
    free(pullx);
    sp_fit_workspace_free(&ws);
}

/* Faint stars whose ivar follows the data, as the pipeline's prep computes it
 * (var = sky^2 + max(data, 0) / gain): weights anti-correlated with the noise
 * bias the fluxes low by ~ N_eff / (2 gain). With sp_fit_image.poisson_k the
 * fitter replaces the data by its model in that term and must match the fit
 * with the true variance (position prior 0.3 px, as in the pipeline; the
 * remaining bias of either is that of fitting a position at low SNR). */
static void t_star_data_weights(void **s)
{
    (void)s;
    enum { N = 25, NREAL = 1500 };
    const double sig_sky = 1.0, gain = 2.0;
    static float data[N * N], ivar[N * N];
    static double prof[N * N];
    const double xt = 12.2, yt = 11.9;
    for (int j = 0; j < N; j++)
        for (int i = 0; i < N; i++) prof[j * N + i] = truth_star(i - xt, j - yt);
    double sp2 = 0;
    for (int k = 0; k < N * N; k++) sp2 += prof[k] * prof[k];
    sp_fit_workspace *ws = NULL;
    assert_int_equal(sp_fit_workspace_create(N * N, 4, 1, &ws), SP_OK);
    sp_fit_image im;
    sp_fit_image_aligned(&im, 0, 0, N, N);
    im.data = data;
    im.ivar = ivar;
    im.psf = g_psf;
    sp_fit_options o;
    sp_fit_options_default(&o);
    o.pos_prior_sigma = 0.3;
    const double snrs[3] = {10.0, 20.0, 100.0};
    static const char *what[3] = {"data", "model (poisson_k)", "truth"};
    double *df = malloc(sizeof(double) * NREAL), *pull = malloc(sizeof(double) * NREAL);
    for (int si = 0; si < 3; si++) {
        double F = snrs[si] * sig_sky / sqrt(sp2);
        for (int it = 0; it < 20; it++) { /* SNR(F) with the Poisson term */
            double info = 0;
            for (int k = 0; k < N * N; k++) info += prof[k] * prof[k] / (sig_sky * sig_sky + F * prof[k] / gain);
            F *= snrs[si] / (F * sqrt(info));
        }
        double bias[3], pstd[3];
        for (int mode = 0; mode < 3; mode++) { /* ivar from the data, the same with poisson_k, the truth */
            im.poisson_k = mode == 1 ? 1.0 / gain : 0.0;
            rng_seed(77 + si); /* the same noise for the three */
            for (int r = 0; r < NREAL; r++) {
                for (int k = 0; k < N * N; k++) {
                    double var = sig_sky * sig_sky + F * prof[k] / gain;
                    double d = F * prof[k] + sqrt(var) * gauss();
                    data[k] = (float)d;
                    ivar[k] = (float)(1.0 / (mode == 2 ? var : sig_sky * sig_sky + fmax(d, 0.0) / gain));
                }
                sp_fit_source src;
                memset(&src, 0, sizeof src);
                src.type = SP_SRC_STAR;
                src.x = xt + 0.2 * (urand() - 0.5);
                src.y = yt + 0.2 * (urand() - 0.5);
                src.flux[0] = F * (0.8 + 0.4 * urand());
                sp_fit_result res;
                assert_int_equal(sp_fit_patch(ws, &o, &im, 1, 1, &src, 1, &res, NULL, NULL), SP_OK);
                check_result_finite(&res, 1);
                df[r] = res.flux[0] - F;
                pull[r] = df[r] / res.flux_err[0];
            }
            stat3 sf = stats(df, NREAL), sp = stats(pull, NREAL);
            bias[mode] = sf.mean / F;
            pstd[mode] = sp.std;
            printf("# star SNR %3.0f, ivar from the %-17s: mean flux bias %+.2f%% (+-%.2f), pull std %.3f\n", snrs[si],
                   what[mode], 100 * sf.mean / F, 100 * sf.std / F / sqrt(NREAL), sp.std);
        }
        if (si < 2) assert_true(bias[0] < bias[2] - 0.015); /* the control: data weights fail */
        assert_true(fabs(bias[1] - bias[2]) < 0.003);
        assert_true(fabs(bias[1]) < 0.01);
        assert_true(pstd[1] > 0.95 && pstd[1] < 1.05);
    }
    free(df);
    free(pull);
    sp_fit_workspace_free(&ws);
}

/* The fitter's separable star renderer against sp_psf_render (the reference
 * interpolation): same values and derivatives, also where the box is larger
 * than the stamp or the source sits off the box. */
static void t_star_render_sep(void **s)
{
    (void)s;
    static double m0[61 * 61], dx0[61 * 61], dy0[61 * 61], m1[61 * 61], dx1[61 * 61], dy1[61 * 61];
    rng_seed(5);
    double worst = 0.0, peak = 0.0;
    for (int t = 0; t < 200; t++) {
        const int bw = 5 + (int)(56 * urand()), bh = 5 + (int)(56 * urand());
        const double xc = -6.0 + (bw + 12.0) * urand(), yc = -6.0 + (bh + 12.0) * urand();
        sp_fit_image im;
        sp_fit_image_aligned(&im, 0, 0, bw, bh);
        im.psf = g_psf;
        fit_geom g;
        memset(&g, 0, sizeof g);
        g.type = SP_SRC_STAR;
        g.p[P_X] = xc;
        g.p[P_Y] = yc;
        fit_box b = {0, 0, bw, bh};
        double *const dm[P_MAX] = {dx1, dy1};
        assert_int_equal(fit_render(&im, NULL, SP_FIT_CONV_GMIX, &g, &b, m1, dm, NULL), SP_OK);
        sp_psf_render(g_psf, xc, yc, bw, bh, m0, dx0, dy0);
        for (int k = 0; k < bw * bh; k++) {
            worst = fmax(worst, fmax(fabs(m1[k] - m0[k]), fmax(fabs(dx1[k] - dx0[k]), fabs(dy1[k] - dy0[k]))));
            peak = fmax(peak, fabs(m0[k]));
        }
    }
    printf("# separable star render vs sp_psf_render: max |difference| / peak %.2e\n", worst / peak);
    assert_true(peak > 0.01);
    assert_true(worst / peak < 1e-12);
}

/* ------------------------------------------------------------ 2. galaxies */

/* Independent reference: the galaxy mixture sampled on a fine grid (h = 1/8
 * px; components narrower than h/2 as bilinear deltas) convolved by FFT with
 * the analytic pixel-integrated Moffat (same support and normalisation as the
 * stamp), read at pixel centres. It shares no code with the fitter's
 * renderers; the Hogg & Lang coefficients are typed in again here. */
static const double HL_EXP_A[6] = {2.34853813e-03, 3.07995260e-02, 2.23364214e-01,
                                   1.17949102e+00, 4.33873750e+00, 5.99820770e+00};
static const double HL_EXP_V[6] = {1.20078965e-03, 8.84526493e-03, 3.91463084e-02,
                                   1.39976817e-01, 4.60962500e-01, 1.50159566e+00};
static const double HL_DEV_A[8] = {4.26347652e-02, 2.40127183e-01, 6.85907632e-01, 1.51937350e+00,
                                   2.83627243e+00, 4.46467501e+00, 5.72440830e+00, 5.60989349e+00};
static const double HL_DEV_V[8] = {2.23759216e-04, 1.00220099e-03, 4.18731126e-03, 1.69432589e-02,
                                   6.84850479e-02, 2.87207080e-01, 1.33320254e+00, 8.40215071e+00};

static void reference_galaxy(int type, double re, double q, double th, double xc, double yc, int N, double *out)
{
    const int FS = 8, P = 16, M = (N + 2 * P) * FS;
    const double h = 1.0 / FS;
    const double *A = type == SP_SRC_EXP ? HL_EXP_A : HL_DEV_A, *V = type == SP_SRC_EXP ? HL_EXP_V : HL_DEV_V;
    const int K = type == SP_SRC_EXP ? 6 : 8;
    double asum = 0;
    for (int k = 0; k < K; k++) asum += A[k];
    double *g = fftw_malloc(sizeof(double) * M * M), *p = fftw_malloc(sizeof(double) * M * M);
    fftw_complex *G = fftw_malloc(sizeof(fftw_complex) * M * (M / 2 + 1)),
                 *Pf = fftw_malloc(sizeof(fftw_complex) * M * (M / 2 + 1));
    memset(g, 0, sizeof(double) * M * M);
    memset(p, 0, sizeof(double) * M * M);
    double ct = cos(th), st = sin(th);
    for (int k = 0; k < K; k++) {
        double a = A[k] / asum, s2 = V[k] * re * re;
        double cxx = s2 * (ct * ct + q * q * st * st), cxy = s2 * (1 - q * q) * ct * st,
               cyy = s2 * (st * st + q * q * ct * ct);
        double smin = sqrt(s2) * q;
        if (smin < 0.5 * h) { /* delta, bilinear */
            double fx = (xc + P) * FS, fy = (yc + P) * FS;
            int ix = (int)floor(fx), iy = (int)floor(fy);
            double tx = fx - ix, ty = fy - iy;
            g[iy * M + ix] += a * (1 - tx) * (1 - ty);
            g[iy * M + ix + 1] += a * tx * (1 - ty);
            g[(iy + 1) * M + ix] += a * (1 - tx) * ty;
            g[(iy + 1) * M + ix + 1] += a * tx * ty;
            continue;
        }
        double det = cxx * cyy - cxy * cxy, ixx = cyy / det, ixy = -cxy / det, iyy = cxx / det;
        double norm = a * h * h / (2 * M_PI * sqrt(det));
        for (int j = 0; j < M; j++) {
            double dy = -P + j * h - yc;
            for (int i = 0; i < M; i++) {
                double dx = -P + i * h - xc;
                double qd = dx * dx * ixx + 2 * dx * dy * ixy + dy * dy * iyy;
                if (qd < 80) g[j * M + i] += norm * exp(-0.5 * qd);
            }
        }
    }
    /* ePSF on the fine grid, centred at index 0 (wrapped) */
    int R = HALF * FS;
    for (int j = -R; j <= R; j++)
        for (int i = -R; i <= R; i++) {
            double v;
            sp_psf_moffat_pixel(FWHM, BETA, 1.0, 0.0, i * h, j * h, &v);
            p[((j + M) % M) * M + (i + M) % M] = v / g_Z;
        }
    fftw_plan pg = fftw_plan_dft_r2c_2d(M, M, g, G, FFTW_ESTIMATE);
    fftw_plan pp = fftw_plan_dft_r2c_2d(M, M, p, Pf, FFTW_ESTIMATE);
    fftw_execute(pg);
    fftw_execute(pp);
    for (int k = 0; k < M * (M / 2 + 1); k++) {
        double re1 = G[k][0] * Pf[k][0] - G[k][1] * Pf[k][1], im1 = G[k][0] * Pf[k][1] + G[k][1] * Pf[k][0];
        G[k][0] = re1 / ((double)M * M);
        G[k][1] = im1 / ((double)M * M);
    }
    fftw_plan pi = fftw_plan_dft_c2r_2d(M, M, G, g, FFTW_ESTIMATE);
    fftw_execute(pi);
    for (int j = 0; j < N; j++)
        for (int i = 0; i < N; i++) out[j * N + i] = g[((j + P) * FS) * M + (i + P) * FS];
    fftw_destroy_plan(pg);
    fftw_destroy_plan(pp);
    fftw_destroy_plan(pi);
    fftw_free(g);
    fftw_free(p);
    fftw_free(G);
    fftw_free(Pf);
}

static void galaxy_case(sp_fit_workspace *ws, int type, double re, double snr, int nreal, int conv, double *bias_out,
                        double *pullstd_out)
{
    enum { N = 33 };
    static float data[N * N], ivar[N * N];
    static double truth[N * N];
    const double q = 0.7, th = 0.5, sig = 1.0;
    double xc = 16.0 + urand() - 0.5, yc = 16.0 + urand() - 0.5;
    reference_galaxy(type, re, q, th, xc, yc, N, truth);
    double sp2 = 0;
    for (int k = 0; k < N * N; k++) sp2 += truth[k] * truth[k];
    double F = snr * sig / sqrt(sp2);
    sp_fit_image im;
    sp_fit_image_aligned(&im, 0, 0, N, N);
    im.data = data;
    im.ivar = ivar;
    im.psf = g_psf;
    sp_fit_options o;
    sp_fit_options_default(&o);
    o.conv = conv;
    double *df = malloc(sizeof(double) * nreal), *pull = malloc(sizeof(double) * nreal);
    int nconv = 0;
    for (int r = 0; r < nreal; r++) {
        for (int k = 0; k < N * N; k++) {
            data[k] = (float)(F * truth[k] + sig * gauss());
            ivar[k] = (float)(1.0 / (sig * sig));
        }
        sp_fit_source s;
        memset(&s, 0, sizeof s);
        s.type = type;
        s.x = xc + 0.3 * (urand() - 0.5);
        s.y = yc + 0.3 * (urand() - 0.5);
        s.flux[0] = F * (0.8 + 0.4 * urand());
        s.re = re * (0.8 + 0.4 * urand());
        s.q = 0.8;
        s.theta = th + 0.2;
        sp_fit_result res;
        assert_int_equal(sp_fit_patch(ws, &o, &im, 1, 1, &s, 1, &res, NULL, NULL), SP_OK);
        check_result_finite(&res, 1);
        df[r] = (res.flux[0] - F) / F;
        pull[r] = (res.flux[0] - F) / res.flux_err[0];
        nconv += (res.flags & SP_FITF_CONVERGED) != 0;
    }
    stat3 a = stats(df, nreal), b = stats(pull, nreal);
    printf("# %s Re %.1f SNR %.0f conv %s: flux bias mean %+.3f%% median %+.3f%%, pull std %.3f, converged %d/%d\n",
           type == SP_SRC_EXP ? "EXP" : "DEV", re, snr, conv == SP_FIT_CONV_FFT ? "FFT " : "GMIX", 100 * a.mean,
           100 * a.median, b.std, nconv, nreal);
    *bias_out = a.mean;
    *pullstd_out = b.std;
    assert_true(nconv >= nreal * 9 / 10);
    free(df);
    free(pull);
}

static void t_galaxies(void **s)
{
    (void)s;
    sp_fit_workspace *ws = NULL;
    assert_int_equal(sp_fit_workspace_create(33 * 33, 4, 1, &ws), SP_OK);
    rng_seed(22);
    const struct {
        int type;
        double re;
        int conv;
        int n;
    } cases[] = {
        {SP_SRC_EXP, 1.0, SP_FIT_CONV_GMIX, 80}, {SP_SRC_EXP, 4.0, SP_FIT_CONV_GMIX, 80},
        {SP_SRC_DEV, 1.5, SP_FIT_CONV_GMIX, 80}, {SP_SRC_DEV, 4.0, SP_FIT_CONV_GMIX, 80},
        {SP_SRC_EXP, 2.0, SP_FIT_CONV_FFT, 40},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        double bias, pstd;
        galaxy_case(ws, cases[c].type, cases[c].re, 100.0, cases[c].n, cases[c].conv, &bias, &pstd);
        assert_true(fabs(bias) < 0.01);
        assert_true(pstd < 1.2);
    }
    sp_fit_workspace_free(&ws);
}

/* ------------------------------------------------------------ 3. blends and halo neighbours */

/* Noisy image of n stars: truth from the analytic Moffat, the unit profiles
 * computed once per (test, star) and cached in prof (n x N*N, NULL -> computed
 * each time). */
static void render_truth_stars(int N, const double *x, const double *y, const double *F, int n, double sig,
                               float *data, float *ivar)
{
    double *prof = g_prof_cache;
    static double px[64], py[64];
    static int pn = 0, pN = 0;
    int same = prof && pn == n && pN == N && n <= 64;
    for (int k = 0; same && k < n; k++) same = px[k] == x[k] && py[k] == y[k];
    if (!same) {
        free(prof);
        prof = g_prof_cache = malloc(sizeof(double) * (size_t)n * N * N);
        for (int k = 0; k < n; k++) {
            for (int q = 0; q < N * N; q++) prof[(size_t)k * N * N + q] = truth_star(q % N - x[k], q / N - y[k]);
            if (k < 64) {
                px[k] = x[k];
                py[k] = y[k];
            }
        }
        pn = n;
        pN = N;
        if (n > 64) pn = -1; /* not cacheable */
    }
    for (int q = 0; q < N * N; q++) {
        double v = 0;
        for (int k = 0; k < n; k++) v += F[k] * prof[(size_t)k * N * N + q];
        data[q] = (float)(v + sig * gauss());
        ivar[q] = (float)(1.0 / (sig * sig));
    }
}

static void t_blend_two_stars(void **s)
{
    (void)s;
    enum { N = 31, NREAL = 300 };
    static float data[N * N], ivar[N * N];
    sp_fit_workspace *ws = NULL;
    assert_int_equal(sp_fit_workspace_create(N * N, 4, 1, &ws), SP_OK);
    sp_fit_image im;
    sp_fit_image_aligned(&im, 0, 0, N, N);
    im.data = data;
    im.ivar = ivar;
    im.psf = g_psf;
    rng_seed(33);
    const double sep = 1.5 * FWHM;
    double x[2] = {15.2 - sep / 2, 15.2 + sep / 2}, y[2] = {14.9, 15.1}, F[2] = {800.0, 400.0};
    double d0[NREAL], d1[NREAL], p0[NREAL], p1[NREAL];
    int ok = 0;
    for (int r = 0; r < NREAL; r++) {
        render_truth_stars(N, x, y, F, 2, 1.0, data, ivar);
        sp_fit_source src[2];
        memset(src, 0, sizeof src);
        for (int k = 0; k < 2; k++) {
            src[k].type = SP_SRC_STAR;
            src[k].x = x[k] + 0.3 * (urand() - 0.5);
            src[k].y = y[k] + 0.3 * (urand() - 0.5);
            src[k].flux[0] = NAN; /* unknown: estimated */
            src[k].id = k;
        }
        sp_fit_result res[2];
        assert_int_equal(sp_fit_patch(ws, NULL, &im, 1, 1, src, 2, res, NULL, NULL), SP_OK);
        for (int k = 0; k < 2; k++) check_result_finite(&res[k], 1);
        assert_int_equal(res[0].group, res[1].group);
        assert_int_equal(res[0].group_size, 2);
        assert_true(res[0].blend[0] > 0.05 && res[1].blend[0] > res[0].blend[0]);
        d0[r] = (res[0].flux[0] - F[0]) / F[0];
        d1[r] = (res[1].flux[0] - F[1]) / F[1];
        p0[r] = (res[0].flux[0] - F[0]) / res[0].flux_err[0];
        p1[r] = (res[1].flux[0] - F[1]) / res[1].flux_err[0];
        ok += (res[0].flags & res[1].flags & SP_FITF_CONVERGED) != 0;
        /* the marginal error exceeds the conditional one in a blend */
        assert_true(res[0].flux_err[0] > res[0].flux_err_cond[0]);
    }
    stat3 a = stats(d0, NREAL), b = stats(d1, NREAL), c = stats(p0, NREAL), d = stats(p1, NREAL);
    printf("# blend at 1.5 FWHM: bias %+.2f%% / %+.2f%%, pull std %.3f / %.3f, converged %d/%d\n", 100 * a.mean,
           100 * b.mean, c.std, d.std, ok, NREAL);
    assert_true(fabs(a.mean) < 0.01 && fabs(b.mean) < 0.01);
    assert_true(c.std < 1.15 && d.std < 1.15 && c.std > 0.85 && d.std > 0.85);
    assert_int_equal(ok, NREAL);
    sp_fit_workspace_free(&ws);
}

/* A bright neighbour in the halo: modelled (fitted-and-discarded, or fixed at
 * its true values) the base source is unbiased; ignored, it is biased — the
 * control that shows the check can fail. */
static void t_halo_neighbour(void **s)
{
    (void)s;
    enum { N = 31, NREAL = 200 };
    static float data[N * N], ivar[N * N];
    sp_fit_workspace *ws = NULL;
    assert_int_equal(sp_fit_workspace_create(N * N, 4, 1, &ws), SP_OK);
    sp_fit_image im;
    sp_fit_image_aligned(&im, 0, 0, N, N);
    im.data = data;
    im.ivar = ivar;
    im.psf = g_psf;
    rng_seed(44);
    double x[2] = {15.0, 20.5}, y[2] = {15.0, 16.0}, F[2] = {500.0, 5000.0};
    double bias[3] = {0};
    for (int mode = 0; mode < 3; mode++) { /* 0 discard-fit, 1 fixed, 2 ignored */
        double acc = 0;
        for (int r = 0; r < NREAL; r++) {
            render_truth_stars(N, x, y, F, 2, 1.0, data, ivar);
            sp_fit_source src[2];
            memset(src, 0, sizeof src);
            for (int k = 0; k < 2; k++) {
                src[k].type = SP_SRC_STAR;
                src[k].x = x[k];
                src[k].y = y[k];
                src[k].flux[0] = F[k];
            }
            src[1].role = mode == 0 ? SP_ROLE_FIT_DISCARD : SP_ROLE_FIXED;
            sp_fit_result res[2];
            assert_int_equal(sp_fit_patch(ws, NULL, &im, 1, 1, src, mode == 2 ? 1 : 2, res, NULL, NULL), SP_OK);
            acc += (res[0].flux[0] - F[0]) / F[0];
            if (mode == 1) assert_true(res[1].flags & SP_FITF_FIXED);
        }
        bias[mode] = acc / NREAL;
    }
    printf("# halo neighbour: bias fitted %+.3f%%, fixed %+.3f%%, ignored %+.3f%%\n", 100 * bias[0], 100 * bias[1],
           100 * bias[2]);
    assert_true(fabs(bias[0]) < 0.005);
    assert_true(fabs(bias[1]) < 0.005);
    assert_true(bias[2] > 0.02);
    sp_fit_workspace_free(&ws);
}

/* ------------------------------------------------------------ 4. multi-band */

static void t_multiband(void **s)
{
    (void)s;
    enum { N = 25, NB = 3, NREAL = 300 };
    static float data[NB][N * N], ivar[NB][N * N];
    sp_fit_workspace *ws = NULL;
    assert_int_equal(sp_fit_workspace_create(NB * N * N, 4, NB, &ws), SP_OK);
    sp_fit_image im[NB];
    sp_psf *psfb[NB];
    const double fw[NB] = {2.6, 3.0, 3.6};
    for (int b = 0; b < NB; b++) {
        assert_int_equal(sp_psf_moffat(fw[b], BETA, 1.0, 0.0, 2 * HALF * OS + 1, OS, &psfb[b]), SP_OK);
        sp_fit_image_aligned(&im[b], 0, 0, N, N);
        im[b].data = data[b];
        im[b].ivar = ivar[b];
        im[b].psf = psfb[b];
        im[b].band = b;
    }
    const double F[NB] = {300.0, 600.0, 200.0};
    rng_seed(55);
    double ex_mb = 0, ex_sb = 0, dxm[NREAL], dxs[NREAL], pf[NB][NREAL];
    for (int mode = 0; mode < 2; mode++) {
        sp_fit_options o;
        sp_fit_options_default(&o);
        o.multiband = mode == 0;
        for (int r = 0; r < NREAL; r++) {
            double xt = 12 + urand() - 0.5, yt = 12 + urand() - 0.5;
            for (int b = 0; b < NB; b++) {
                sp_psf *pp = psfb[b];
                for (int k = 0; k < N * N; k++) {
                    int i = k % N, j = k / N;
                    data[b][k] = (float)(F[b] * sp_psf_eval(pp, i - xt, j - yt) + gauss());
                    ivar[b][k] = 1.0f;
                }
            }
            sp_fit_source src;
            memset(&src, 0, sizeof src);
            src.type = SP_SRC_STAR;
            src.x = xt + 0.2;
            src.y = yt - 0.2;
            for (int b = 0; b < NB; b++) src.flux[b] = NAN;
            sp_fit_result res;
            assert_int_equal(sp_fit_patch(ws, &o, im, NB, NB, &src, 1, &res, NULL, NULL), SP_OK);
            check_result_finite(&res, NB);
            assert_true(res.flags & SP_FITF_CONVERGED);
            if (mode == 0) {
                ex_mb += res.x_err / NREAL;
                dxm[r] = res.x - xt;
                for (int b = 0; b < NB; b++) pf[b][r] = (res.flux[b] - F[b]) / res.flux_err[b];
            } else {
                ex_sb += res.x_err / NREAL;
                dxs[r] = res.x - xt;
            }
        }
    }
    stat3 a = stats(dxm, NREAL), b = stats(dxs, NREAL);
    printf("# multiband: x err %.4f (scatter %.4f) vs single-band combined %.4f (scatter %.4f)\n", ex_mb, a.std, ex_sb,
           b.std);
    for (int k = 0; k < NB; k++) {
        stat3 p = stats(pf[k], NREAL);
        printf("#   band %d pull std %.3f\n", k, p.std);
        assert_true(p.std > 0.88 && p.std < 1.12);
    }
    assert_true(a.std < 1.15 * ex_mb && a.std > 0.85 * ex_mb);
    assert_true(ex_mb <= ex_sb * 1.05);
    for (int k = 0; k < NB; k++) sp_psf_free(&psfb[k]);
    sp_fit_workspace_free(&ws);
}

/* ------------------------------------------------------------ sky */

static void t_sky(void **s)
{
    (void)s;
    enum { N = 41, NREAL = 100 };
    static float data[N * N], ivar[N * N];
    sp_fit_workspace *ws = NULL;
    assert_int_equal(sp_fit_workspace_create(N * N, 4, 1, &ws), SP_OK);
    sp_fit_image im;
    sp_fit_image_aligned(&im, 0, 0, N, N);
    im.data = data;
    im.ivar = ivar;
    im.psf = g_psf;
    sp_fit_options o;
    sp_fit_options_default(&o);
    o.fit_sky = 1;
    rng_seed(66);
    double x[2] = {14.3, 26.8}, y[2] = {20.1, 22.4}, F[2] = {600.0, 900.0};
    double sky = 3.0, acc = 0, accs = 0, pulls[NREAL];
    for (int r = 0; r < NREAL; r++) {
        render_truth_stars(N, x, y, F, 2, 1.0, data, ivar);
        for (int k = 0; k < N * N; k++) data[k] += (float)sky;
        sp_fit_source src[2];
        memset(src, 0, sizeof src);
        for (int k = 0; k < 2; k++) {
            src[k].type = SP_SRC_STAR;
            src[k].x = x[k];
            src[k].y = y[k];
            src[k].flux[0] = NAN;
        }
        sp_fit_result res[2];
        sp_fit_patch_stats st;
        assert_int_equal(sp_fit_patch(ws, &o, &im, 1, 1, src, 2, res, &st, NULL), SP_OK);
        acc += (res[0].flux[0] - F[0]) / F[0] / NREAL;
        accs += (st.sky[0] - sky) / NREAL;
        pulls[r] = (res[1].flux[0] - F[1]) / res[1].flux_err[0];
        assert_true(st.sky_err[0] > 0);
    }
    stat3 p = stats(pulls, NREAL);
    printf("# sky: sky bias %+.4f, flux bias %+.3f%%, pull std %.3f\n", accs, 100 * acc, p.std);
    assert_true(fabs(accs) < 0.01);
    assert_true(fabs(acc) < 0.005);
    assert_true(p.std < 1.2 && p.std > 0.8);
    sp_fit_workspace_free(&ws);
}

/* ------------------------------------------------------------ 5. robustness */

static void t_robust(void **s)
{
    (void)s;
    enum { N = 40, NS = 7 };
    static float data[N * N], ivar[N * N];
    sp_fit_workspace *ws = NULL;
    assert_int_equal(sp_fit_workspace_create(N * N, NS, 1, &ws), SP_OK);
    sp_fit_image im;
    sp_fit_image_aligned(&im, 100, 50, N, N); /* ROI at tile (100, 50) */
    im.data = data;
    im.ivar = ivar;
    im.psf = g_psf;
    rng_seed(77);
    /* tile coordinates: zero-flux star, edge star, masked star, coincident pair, NaN input, galaxy */
    double x[NS] = {110, 100.5, 130, 120, 120, NAN, 112}, y[NS] = {60, 70, 80, 60, 60, 60, 80};
    double F[NS] = {0, 500, 500, 400, 400, 0, 800};
    for (int k = 0; k < N * N; k++) {
        int i = k % N, j = k / N;
        double v = 0;
        for (int t = 0; t < NS; t++)
            if (isfinite(x[t])) v += F[t] * truth_star(100 + i - x[t], 50 + j - y[t]);
        data[k] = (float)(v + gauss());
        ivar[k] = 1.0f;
        if (abs(100 + i - 130) <= 8 && abs(50 + j - 80) <= 8) ivar[k] = 0.0f; /* all masked around source 2 */
    }
    data[5] = NAN; /* a NaN pixel with a nonzero weight is masked, not propagated */
    sp_fit_source src[NS];
    memset(src, 0, sizeof src);
    for (int t = 0; t < NS; t++) {
        src[t].type = t == 6 ? SP_SRC_EXP : SP_SRC_STAR;
        src[t].x = x[t];
        src[t].y = y[t];
        src[t].flux[0] = NAN;
        src[t].re = 2.0;
        src[t].q = 0.6;
        src[t].id = 1000 + t;
    }
    sp_fit_result res[NS];
    sp_fit_patch_stats st;
    static float model[N * N];
    float *mp[1] = {model};
    for (int mode = 0; mode < 2; mode++) {
        sp_fit_options o;
        sp_fit_options_default(&o);
        o.staged = mode == 0;
        assert_int_equal(sp_fit_patch(ws, &o, &im, 1, 1, src, NS, res, &st, mp), SP_OK);
        for (int t = 0; t < NS; t++) {
            check_result_finite(&res[t], 1);
            assert_int_equal(res[t].id, 1000 + t);
        }
        /* zero flux: finite, consistent with 0, geometry held (too faint) */
        assert_true(fabs(res[0].flux[0]) < 5 * res[0].flux_err[0]);
        assert_true(res[0].flags & SP_FITF_GEOM_FROZEN);
        /* edge */
        assert_true(res[1].flags & SP_FITF_EDGE);
        assert_true(fabs(res[1].flux[0] - 500) < 6 * res[1].flux_err[0]);
        /* all masked */
        assert_true(res[2].flags & SP_FITF_NODATA);
        assert_true(isnan(res[2].flux[0]));
        /* coincident pair: flagged singular, total flux right */
        assert_true(res[3].flags & SP_FITF_SINGULAR);
        assert_true((res[3].flags & SP_FITF_UNRESOLVED) && (res[4].flags & SP_FITF_UNRESOLVED));
        assert_false(res[1].flags & SP_FITF_UNRESOLVED);
        assert_true(fabs(res[3].flux[0] + res[4].flux[0] - 800) < 60);
        /* bad input */
        assert_true(res[5].flags & SP_FITF_BAD_INPUT);
        assert_true(res[5].flags & SP_FITF_NODATA);
        /* galaxy (data is a star): fitted, finite, Re towards small */
        assert_true(isfinite(res[6].flux[0]) && res[6].re < 1.5);
        /* model output: finite, and the residual of the patch is noise-like */
        for (int k = 0; k < N * N; k++) assert_true(isfinite(model[k]));
        printf("# robust (%s): rms %.3f, groups %d, max group %d\n", mode ? "single-stage" : "staged", st.rms[0],
               st.ngroups, st.max_group_size);
        assert_true(st.rms[0] > 0.9 && st.rms[0] < 1.2);
    }
    /* empty source list and errors */
    assert_int_equal(sp_fit_patch(ws, NULL, &im, 1, 1, src, 0, res, &st, NULL), SP_OK);
    im.band = 3;
    assert_int_equal(sp_fit_patch(ws, NULL, &im, 1, 1, src, NS, res, &st, NULL), SP_ERR_INPUT);
    im.band = 0;
    im.psf = NULL;
    assert_int_equal(sp_fit_patch(ws, NULL, &im, 1, 1, src, NS, res, &st, NULL), SP_ERR_INPUT);
    sp_fit_workspace_free(&ws);
}

/* A crowded field: components larger than max_group are fitted in chunks. */
static void t_crowded_split(void **s)
{
    (void)s;
    enum { N = 80, NS = 60 };
    static float data[N * N], ivar[N * N];
    sp_fit_workspace *ws = NULL;
    assert_int_equal(sp_fit_workspace_create(N * N, NS, 1, &ws), SP_OK);
    sp_fit_image im;
    sp_fit_image_aligned(&im, 0, 0, N, N);
    im.data = data;
    im.ivar = ivar;
    im.psf = g_psf;
    rng_seed(88);
    double x[NS], y[NS], F[NS];
    for (int k = 0; k < NS; k++) {
        x[k] = 8 + 64 * urand();
        y[k] = 8 + 64 * urand();
        F[k] = 300 + 3000 * urand();
    }
    render_truth_stars(N, x, y, F, NS, 1.0, data, ivar);
    sp_fit_source src[NS];
    memset(src, 0, sizeof src);
    for (int k = 0; k < NS; k++) {
        src[k].type = SP_SRC_STAR;
        src[k].x = x[k] + 0.2 * (urand() - 0.5);
        src[k].y = y[k] + 0.2 * (urand() - 0.5);
        src[k].flux[0] = F[k];
    }
    static sp_fit_result res[2][NS];
    sp_fit_patch_stats st;
    double chi[2] = {0};
    for (int mode = 0; mode < 2; mode++) {
        sp_fit_options o;
        sp_fit_options_default(&o);
        o.max_group = mode == 0 ? 100 : 8;
        assert_int_equal(sp_fit_patch(ws, &o, &im, 1, 1, src, NS, res[mode], &st, NULL), SP_OK);
        for (int k = 0; k < NS; k++) {
            check_result_finite(&res[mode][k], 1);
            assert_true(res[mode][k].flags & SP_FITF_CONVERGED);
            double p = (res[mode][k].flux[0] - F[k]) / res[mode][k].flux_err[0];
            chi[mode] += p * p / NS;
        }
        printf("# crowded %d stars, max_group %d: components %d (largest %d), mean pull^2 %.3f, %.1f ms\n", NS,
               o.max_group, st.ngroups, st.max_group_size, chi[mode], 1e3 * st.seconds);
    }
    /* chunks of 8 fitted in turn reach the joint solution */
    double worst = 0, worst_e = 0;
    for (int k = 0; k < NS; k++) {
        double d = fabs(res[0][k].flux[0] - res[1][k].flux[0]) / res[0][k].flux_err[0];
        double e = fabs(res[1][k].flux_err[0] / res[0][k].flux_err[0] - 1);
        if (d > worst) worst = d;
        if (e > worst_e) worst_e = e;
    }
    printf("# split vs joint: max |dflux| %.3f sigma, max error ratio - 1 %.3f\n", worst, worst_e);
    assert_true(worst < 0.3 && worst_e < 0.15);
    assert_true(chi[0] < 1.6 && chi[1] < 1.6);
    sp_fit_workspace_free(&ws);
}

/* ------------------------------------------------------------ derivatives (white box) */

/* Every analytic derivative of every model (STAR; EXP, DEV, SERSIC by both
 * convolution routes) against central finite differences, on a rotated and
 * scaled image (general affine transform). */
static void t_derivatives(void **s)
{
    (void)s;
    enum { N = 29 };
    static double m[N * N], mp[N * N], mm[N * N], d[P_MAX][N * N];
    static float dummy[N * N];
    sp_fit_image im;
    sp_fit_image_aligned(&im, 0, 0, N, N);
    im.data = im.ivar = dummy;
    im.psf = g_psf;
    const double ang = 0.3, sc = 1.1;
    im.aff[0] = sc * cos(ang);
    im.aff[1] = -sc * sin(ang);
    im.aff[3] = sc * sin(ang);
    im.aff[4] = sc * cos(ang);
    im.aff[2] = 14.0 - (im.aff[0] * 50 + im.aff[1] * 60);
    im.aff[5] = 14.0 - (im.aff[3] * 50 + im.aff[4] * 60);
    im.flux_scale = 1.7;
    psf_cache_entry pc;
    memset(&pc, 0, sizeof pc);
    pc.psf = g_psf;
    double *scr = NULL;
    size_t cap = 0;
    assert_int_equal(fit_psf_mixture(g_psf, 4, &pc.mix, &scr, &cap), SP_OK);
    printf("# ePSF mixture K=4: rms residual / peak %.2e\n", pc.mix.rms_resid);
    assert_true(pc.mix.rms_resid < 1e-3);
    assert_int_equal(fit_fft_psf_spectrum(&pc, 32), SP_OK);
    fit_fft_scratch fs;
    memset(&fs, 0, sizeof fs);
    fit_box b = {0, 0, N, N};
    const int types[4] = {SP_SRC_STAR, SP_SRC_EXP, SP_SRC_DEV, SP_SRC_SERSIC};
    for (int t = 0; t < 4; t++)
        for (int conv = 0; conv < (t == 0 ? 1 : 2); conv++) {
            fit_geom g;
            memset(&g, 0, sizeof g);
            g.type = types[t];
            g.p[P_X] = 50.3;
            g.p[P_Y] = 59.6;
            fit_shape_to_eta(2.2, 0.6, 0.7, &g.p[P_LNS], &g.p[P_E1], &g.p[P_E2]);
            g.p[P_N] = 2.35;
            fit_gal_profile(g.type, g.p[P_N], SP_FIT_PROF_TRUNCATED, &g.prof);
            double *dm[P_MAX];
            int np = t == 0 ? 2 : (t == 3 ? 6 : 5);
            for (int j = 0; j < P_MAX; j++) dm[j] = j < np ? d[j] : NULL;
            assert_int_equal(fit_render(&im, &pc, conv, &g, &b, m, dm, &fs), SP_OK);
            double peak = 0;
            for (int k = 0; k < N * N; k++) peak = fmax(peak, fabs(m[k]));
            for (int j = 0; j < np; j++) {
                const double h = j == P_N ? 1e-4 : 1e-5;
                fit_geom gp = g, gm = g;
                gp.p[j] += h;
                gm.p[j] -= h;
                fit_gal_profile(g.type, gp.p[P_N], SP_FIT_PROF_TRUNCATED, &gp.prof);
                fit_gal_profile(g.type, gm.p[P_N], SP_FIT_PROF_TRUNCATED, &gm.prof);
                double *nod[P_MAX] = {0};
                assert_int_equal(fit_render(&im, &pc, conv, &gp, &b, mp, nod, &fs), SP_OK);
                assert_int_equal(fit_render(&im, &pc, conv, &gm, &b, mm, nod, &fs), SP_OK);
                double maxe = 0, maxd = 0;
                for (int k = 0; k < N * N; k++) {
                    double fd = (mp[k] - mm[k]) / (2 * h);
                    maxe = fmax(maxe, fabs(fd - d[j][k]));
                    maxd = fmax(maxd, fabs(fd));
                }
                if (maxe > 1e-5 * maxd + 1e-9 * peak)
                    printf("# derivative %s %s p%d: max err %.2e of max %.2e\n", sp_src_type_name(types[t]),
                           conv ? "FFT" : "GMIX", j, maxe, maxd);
                assert_true(maxe <= 1e-4 * maxd + 1e-9 * peak);
            }
        }
    fit_fft_free_entry(&pc);
    fit_fft_scratch_free(&fs);
    free(scr);
}

/* A star on a rotated, scaled image (the multi-visit geometry): the fit
 * returns scene (tile) coordinates. */
static void t_affine_image(void **s)
{
    (void)s;
    enum { N = 31, NREAL = 100 };
    static float data[N * N], ivar[N * N];
    sp_fit_workspace *ws = NULL;
    assert_int_equal(sp_fit_workspace_create(N * N, 2, 1, &ws), SP_OK);
    sp_fit_image im;
    sp_fit_image_aligned(&im, 0, 0, N, N);
    im.data = data;
    im.ivar = ivar;
    im.psf = g_psf;
    const double ang = -0.4, sc = 0.9, X = 500.0, Y = 700.0;
    im.aff[0] = sc * cos(ang);
    im.aff[1] = -sc * sin(ang);
    im.aff[3] = sc * sin(ang);
    im.aff[4] = sc * cos(ang);
    im.aff[2] = 15.0 - (im.aff[0] * X + im.aff[1] * Y);
    im.aff[5] = 15.0 - (im.aff[3] * X + im.aff[4] * Y);
    rng_seed(99);
    double sx = 0, sy = 0, px = 0;
    for (int r = 0; r < NREAL; r++) {
        double xt = X + urand() - 0.5, yt = Y + urand() - 0.5;
        double u = im.aff[0] * xt + im.aff[1] * yt + im.aff[2], v = im.aff[3] * xt + im.aff[4] * yt + im.aff[5];
        for (int k = 0; k < N * N; k++) {
            data[k] = (float)(1000.0 * truth_star(k % N - u, k / N - v) + gauss());
            ivar[k] = 1.0f;
        }
        sp_fit_source src;
        memset(&src, 0, sizeof src);
        src.type = SP_SRC_STAR;
        src.x = xt + 0.3;
        src.y = yt - 0.2;
        src.flux[0] = NAN;
        sp_fit_result res;
        assert_int_equal(sp_fit_patch(ws, NULL, &im, 1, 1, &src, 1, &res, NULL, NULL), SP_OK);
        assert_true(res.flags & SP_FITF_CONVERGED);
        sx += (res.x - xt) / NREAL;
        sy += (res.y - yt) / NREAL;
        px += (res.x - xt) * (res.x - xt) / (res.x_err * res.x_err) / NREAL;
    }
    printf("# affine image: mean dx %+.4f dy %+.4f, x pull rms %.3f\n", sx, sy, sqrt(px));
    assert_true(fabs(sx) < 0.01 && fabs(sy) < 0.01);
    assert_true(sqrt(px) > 0.8 && sqrt(px) < 1.2);
    sp_fit_workspace_free(&ws);
}

/* SERSIC with n free: data drawn with the fitter's own renderer (n = 2.5). */
/* The EXP/DEV mixtures against the laws they stand for: the enclosed light of
 * the default ("truncated") mixtures follows the SDSS-truncated exponential and
 * de Vaucouleurs laws (sp_sim_galaxy_profile, what the simulator draws) within
 * 2.5e-3 up to where the laws' cut begins (3 and 7 Re; tested to 6), with the same
 * half-light radius; the Tractor's DEV mixture
 * is the less concentrated one the docs describe (half light within 0.915 Re). */
static double law_enclosed(sp_sim_type t, double R, double *total)
{
    /* 2 pi int_0^R I(r) r dr, midpoint rule in u = r^1/4 (the DEV cusp) */
    const int n = 200000;
    double umax = sqrt(sqrt(R)), du = umax / n, sum = 0;
    for (int i = 0; i < n; i++) {
        double u = (i + 0.5) * du, r = u * u * u * u;
        sum += sp_sim_galaxy_profile(t, r) * r * 4.0 * u * u * u * du;
    }
    if (total) *total = 0;
    return 2.0 * M_PI * sum;
}
static double mix_enclosed(const gal_profile *p, double r)
{
    double L = 0;
    for (int i = 0; i < p->k; i++) L += p->amp[i] * (p->var[i] > 0 ? 1.0 - exp(-r * r / (2.0 * p->var[i])) : 1.0);
    return L;
}
static double half_light(const gal_profile *p)
{
    double lo = 0.01, hi = 10;
    for (int it = 0; it < 60; it++) {
        double m = 0.5 * (lo + hi);
        if (mix_enclosed(p, m) < 0.5) lo = m;
        else hi = m;
    }
    return 0.5 * (lo + hi);
}
static void t_profile_laws(void **st)
{
    (void)st;
    const sp_sim_type st_[2] = {SP_SIM_EXP, SP_SIM_DEV};
    const sp_src_type ft[2] = {SP_SRC_EXP, SP_SRC_DEV};
    const double law_hl[2] = {0.9818, 0.8921};
    for (int t = 0; t < 2; t++) {
        double tot = law_enclosed(st_[t], sp_sim_galaxy_rmax(st_[t]), NULL);
        gal_profile p;
        fit_gal_profile(ft[t], 0, SP_FIT_PROF_TRUNCATED, &p);
        double maxd = 0, asum = 0;
        for (int i = 0; i < p.k; i++) asum += p.amp[i];
        assert_true(fabs(asum - 1.0) < 1e-12);
        const double rcut = t ? 6.0 : 3.0; /* up to the laws' cut (7 and 3 Re) */
        for (double r = 0.01; r <= rcut; r *= 1.1) {
            double d = fabs(mix_enclosed(&p, r) - law_enclosed(st_[t], r, NULL) / tot);
            if (d > maxd) maxd = d;
        }
        double hl = half_light(&p);
        print_message("%s truncated mixture: max |L_mix - L_law| %.2e (r 0.01-%.0f Re), half-light %.4f Re (law %.4f)\n",
                      t ? "DEV" : "EXP", maxd, rcut, hl, law_hl[t]);
        assert_true(maxd < 2.5e-3);
        assert_true(fabs(hl - law_hl[t]) < 2e-3);
        fit_gal_profile(ft[t], 0, SP_FIT_PROF_TRACTOR, &p);
        double hlt = half_light(&p);
        print_message("%s Tractor mixture: half-light %.4f Re\n", t ? "DEV" : "EXP", hlt);
        assert_true(fabs(hlt - (t ? 0.915 : 0.986)) < 2e-3);
    }
}

static void t_sersic(void **s)
{
    (void)s;
    enum { N = 33, NREAL = 40 };
    static float data[N * N], ivar[N * N];
    static double unit[N * N];
    sp_fit_workspace *ws = NULL;
    assert_int_equal(sp_fit_workspace_create(N * N, 2, 1, &ws), SP_OK);
    sp_fit_image im;
    sp_fit_image_aligned(&im, 0, 0, N, N);
    im.data = data;
    im.ivar = ivar;
    im.psf = g_psf;
    sp_fit_source t;
    memset(&t, 0, sizeof t);
    t.type = SP_SRC_SERSIC;
    t.x = 16.2;
    t.y = 15.9;
    t.re = 3.0;
    t.q = 0.7;
    t.theta = 0.3;
    t.sersic_n = 2.5;
    assert_int_equal(sp_fit_render_source(ws, NULL, &im, &t, unit), SP_OK);
    rng_seed(123);
    const double F = 5000.0;
    double nb = 0, fb = 0, npull = 0;
    int conv = 0;
    for (int r = 0; r < NREAL; r++) {
        for (int k = 0; k < N * N; k++) {
            data[k] = (float)(F * unit[k] + gauss());
            ivar[k] = 1.0f;
        }
        sp_fit_source src = t;
        src.sersic_n = 1.5;
        src.re = 2.5;
        src.flux[0] = NAN;
        sp_fit_result res;
        assert_int_equal(sp_fit_patch(ws, NULL, &im, 1, 1, &src, 1, &res, NULL, NULL), SP_OK);
        check_result_finite(&res, 1);
        conv += (res.flags & SP_FITF_CONVERGED) != 0;
        nb += (res.sersic_n - 2.5) / NREAL;
        fb += (res.flux[0] - F) / F / NREAL;
        npull += (res.sersic_n - 2.5) * (res.sersic_n - 2.5) / (res.sersic_n_err * res.sersic_n_err) / NREAL;
    }
    printf("# sersic n=2.5: mean dn %+.3f (n pull rms %.2f), flux bias %+.3f%%, converged %d/%d\n", nb, sqrt(npull),
           100 * fb, conv, NREAL);
    assert_true(fabs(nb) < 0.1);
    assert_true(fabs(fb) < 0.01);
    assert_true(conv >= NREAL - 2);
    sp_fit_workspace_free(&ws);
}

/* One patch per thread with per-thread workspaces gives the serial answer
 * (both convolution routes: the FFT route creates PSF-spectrum plans in threads). */
static void t_threads(void **s)
{
    (void)s;
    enum { N = 48, NP = 4, NS = 4 };
    static float data[NP][N * N], ivar[N * N];
    static sp_fit_result ser[NP][NS], par[NP][NS];
    sp_fit_source src[NS];
    memset(src, 0, sizeof src);
    rng_seed(321);
    for (int k = 0; k < NS; k++) {
        src[k].type = k % 2 ? SP_SRC_EXP : SP_SRC_STAR;
        src[k].x = 10 + 28 * urand();
        src[k].y = 10 + 28 * urand();
        src[k].flux[0] = 2000;
        src[k].re = 2;
        src[k].q = 0.7;
    }
    for (int p = 0; p < NP; p++)
        for (int q = 0; q < N * N; q++) {
            double v = 0;
            for (int k = 0; k < NS; k++) v += 2000 * truth_star(q % N - src[k].x, q / N - src[k].y);
            data[p][q] = (float)(v + gauss());
            ivar[q] = 1.0f;
        }
    for (int conv = 0; conv < 2; conv++) {
        sp_fit_options o;
        sp_fit_options_default(&o);
        o.conv = conv;
        for (int pass = 0; pass < 2; pass++) {
            int fails = 0;
#pragma omp parallel for num_threads(pass ? 2 : 1) schedule(dynamic) reduction(+ : fails)
            for (int p = 0; p < NP; p++) {
                sp_fit_workspace *ws = NULL;
                if (sp_fit_workspace_create(N * N, NS, 1, &ws) != SP_OK) {
                    fails++;
                    continue;
                }
                sp_fit_image im;
                sp_fit_image_aligned(&im, 0, 0, N, N);
                im.data = data[p];
                im.ivar = ivar;
                im.psf = g_psf;
                if (sp_fit_patch(ws, &o, &im, 1, 1, src, NS, pass ? par[p] : ser[p], NULL, NULL) != SP_OK) fails++;
                sp_fit_workspace_free(&ws);
            }
            assert_int_equal(fails, 0);
        }
        for (int p = 0; p < NP; p++)
            for (int k = 0; k < NS; k++) {
                assert_float_equal(ser[p][k].flux[0], par[p][k].flux[0], 1e-9 * fabs(ser[p][k].flux[0]) + 1e-9);
                assert_float_equal(ser[p][k].x, par[p][k].x, 1e-9);
            }
    }
}

/* ------------------------------------------------------------ API */

static void t_api(void **s)
{
    (void)s;
    sp_fit_options o;
    sp_fit_options_default(&o);
    assert_int_equal(o.staged, 1);
    assert_int_equal(o.multiband, 1);
    assert_true(o.re_min == 0.1 && o.re_max == 50 && o.q_min == 0.05 && o.n_min == 0.5 && o.n_max == 6);
    assert_int_equal(sp_src_type_parse("star", SP_SRC_EXP), SP_SRC_STAR);
    assert_int_equal(sp_src_type_parse("Dev", SP_SRC_EXP), SP_SRC_DEV);
    assert_int_equal(sp_src_type_parse("", SP_SRC_EXP), SP_SRC_EXP);
    assert_int_equal(sp_src_type_parse("GAL", SP_SRC_DEV), SP_SRC_DEV);
    assert_int_equal(sp_src_type_parse("blob", SP_SRC_DEV), -1);
    assert_string_equal(sp_src_type_name(SP_SRC_SERSIC), "SERSIC");
    sp_fit_workspace *ws = NULL;
    assert_int_equal(sp_fit_workspace_create(0, 0, 0, &ws), SP_ERR_INPUT);
    assert_int_equal(sp_fit_workspace_create(0, 0, 1, &ws), SP_OK);
    /* render_source: a star equals the PSF render; a galaxy has unit flux */
    enum { N = 31 };
    static double out[N * N], ref[N * N];
    static float dummy[N * N];
    sp_fit_image im;
    sp_fit_image_aligned(&im, 10, 20, N, N);
    im.data = dummy;
    im.ivar = dummy;
    im.psf = g_psf;
    sp_fit_source src;
    memset(&src, 0, sizeof src);
    src.type = SP_SRC_STAR;
    src.x = 25.3;
    src.y = 34.8;
    assert_int_equal(sp_fit_render_source(ws, NULL, &im, &src, out), SP_OK);
    sp_psf_render(g_psf, 15.3, 14.8, N, N, ref, NULL, NULL);
    for (int k = 0; k < N * N; k++) assert_float_equal(out[k], ref[k], 1e-12);
    const int types[3] = {SP_SRC_EXP, SP_SRC_DEV, SP_SRC_SERSIC};
    for (int t = 0; t < 3; t++)
        for (int conv = 0; conv < 2; conv++) {
            sp_fit_options o;
            sp_fit_options_default(&o);
            o.conv = conv;
            src.type = types[t];
            src.re = 1.5;
            src.q = 0.5;
            src.theta = 0.3;
            src.sersic_n = 2.5;
            assert_int_equal(sp_fit_render_source(ws, &o, &im, &src, out), SP_OK);
            double sum = 0;
            for (int k = 0; k < N * N; k++) sum += out[k];
            printf("# render %s %s: sum %.4f\n", sp_src_type_name(types[t]), conv ? "FFT" : "GMIX", sum);
            assert_true(sum > 0.93 && sum < 1.01);
        }
    sp_fit_workspace_free(&ws);
    assert_null(ws);
}


/* A single-band image of nx x ny aligned with the tile, PSF g_psf. */
static void unit_image(sp_fit_image *im, float *data, float *ivar, int nx, int ny)
{
    sp_fit_image_aligned(im, 0, 0, nx, ny);
    im->data = data;
    im->ivar = ivar;
    im->psf = g_psf;
}

/* Untyped sources (type_auto): a blank-TYPE star must come out as a point source and a blank-TYPE
 * extended galaxy (EXP Re 3 px, q 0.6; PSF FWHM 3 px) as the galaxy model, both at SNR 40, in one
 * patch, with the library defaults and with the pipeline's options (sky, position prior, model
 * weights). Truth: the star from the analytic Moffat, the galaxy from the fitter's own GMIX render
 * (a classification test: its model error is 1e-4 of the peak). Over 40 draws a star taken for a
 * galaxy is a chi2 gain > 4 by noise with the size (one-sided) and ellipticity free (~4% of the
 * draws): allowed at most 5 times; the galaxy never. */
static void t_type_auto(void **s)
{
    (void)s;
    enum { NX = 80, NY = 40 };
    static float data[NX * NY], ivar[NX * NY];
    static double gal[NX * NY];
    sp_fit_workspace *ws = NULL;
    assert_int_equal(sp_fit_workspace_create(NX * NY, 2, 1, &ws), SP_OK);
    sp_fit_image im;
    unit_image(&im, data, ivar, NX, NY);
    sp_fit_source gt;
    memset(&gt, 0, sizeof gt);
    gt.type = SP_SRC_EXP;
    gt.x = 57.3;
    gt.y = 19.6;
    gt.re = 3.0;
    gt.q = 0.6;
    gt.theta = 0.5;
    assert_int_equal(sp_fit_render_source(ws, NULL, &im, &gt, gal), SP_OK);
    double sg = 0, ss = 0;
    const double xs = 20.4, ys = 20.2;
    for (int k = 0; k < NX * NY; k++) {
        sg += gal[k] * gal[k];
        double t = truth_star(k % NX - xs, k / NX - ys);
        ss += t * t;
    }
    rng_seed(77);
    for (int mode = 0; mode < 2; mode++) {
        /* fluxes for SNR 40 with the mode's variance (sky 1, + 0.5 x model with Poisson) */
        double Fg = 40.0 / sqrt(sg), Fs = 40.0 / sqrt(ss);
        for (int it = 0; mode && it < 30; it++) {
            double a = 0, b = 0;
            for (int k = 0; k < NX * NY; k++) {
                double ts = Fs * truth_star(k % NX - xs, k / NX - ys), tg = Fg * gal[k];
                a += ts * ts / (1.0 + 0.5 * ts);
                b += tg * tg / (1.0 + 0.5 * tg);
            }
            Fs *= 40.0 / sqrt(a);
            Fg *= 40.0 / sqrt(b);
        }
        sp_fit_options o;
        sp_fit_options_default(&o);
        if (mode) {
            o.fit_sky = 1;
            o.pos_prior_sigma = 0.3;
            o.max_group = 10;
        }
        im.poisson_k = mode ? 0.5 : 0.0;
        int star_as_gal = 0, gal_as_star = 0, both_conv = 0;
        const int ndraw = 40;
        for (int d = 0; d < ndraw; d++) {
            for (int k = 0; k < NX * NY; k++) {
                double m = Fs * truth_star(k % NX - xs, k / NX - ys) + Fg * gal[k];
                double var = 1.0 + (mode ? 0.5 * m : 0.0);
                double v = m + sqrt(var) * gauss();
                data[k] = (float)v;
                ivar[k] = (float)(1.0 / (mode ? 1.0 + 0.5 * fmax(v, 0.0) : 1.0));
            }
            sp_fit_source src[2];
            memset(src, 0, sizeof src);
            for (int q = 0; q < 2; q++) {
                src[q].type = SP_SRC_EXP; /* the configured model of blank types */
                src[q].type_auto = 1;
                src[q].re = 3.0; /* the catalog's fallback Re */
                src[q].q = 1.0;
                src[q].flux[0] = NAN;
                src[q].id = q;
            }
            src[0].x = xs + 0.2;
            src[0].y = ys - 0.1;
            src[1].x = gt.x - 0.2;
            src[1].y = gt.y + 0.15;
            sp_fit_result res[2];
            assert_int_equal(sp_fit_patch(ws, &o, &im, 1, 1, src, 2, res, NULL, NULL), SP_OK);
            for (int q = 0; q < 2; q++) check_result_finite(&res[q], 1);
            star_as_gal += res[0].type != SP_SRC_STAR;
            gal_as_star += res[1].type != SP_SRC_EXP;
            both_conv += (res[0].flags & res[1].flags & SP_FITF_CONVERGED) != 0;
            if (res[1].type == SP_SRC_EXP) assert_true(fabs(res[1].re / 3.0 - 1.0) < 0.3);
            assert_true(fabs(res[0].flux[0] / Fs - 1.0) < 0.25);
        }
        printf("# type_auto (%s): star as galaxy %d/%d, galaxy as star %d/%d, both converged %d\n",
               mode ? "pipeline options" : "defaults", star_as_gal, ndraw, gal_as_star, ndraw, both_conv);
        assert_true(star_as_gal <= 5);
        assert_int_equal(gal_as_star, 0);
        assert_true(both_conv >= ndraw - 2);
    }
    im.poisson_k = 0.0;
    sp_fit_workspace_free(&ws);
}

/* A galaxy source's type, position and shape (the other fields as they are). */
static void set_galaxy(sp_fit_source *g, sp_src_type type, double x, double y, double re, double q, double theta)
{
    g->type = type;
    g->x = x;
    g->y = y;
    g->re = re;
    g->q = q;
    g->theta = theta;
}

/* Blank-TYPE galaxies fitted as EXP (gal_model) with DEV as an alternative
 * (sp_fit_options.untyped_alt; type_auto 2, and type_auto 1: point first): on
 * the same noise draws (SNR 60, Re 3 px, FWHM 3 px, 30 draws) a DEV galaxy
 * must be taken for DEV and get the flux that the fit of a typed DEV gets,
 * and an EXP one must stay EXP with its typed flux; without the alternative
 * the DEV comes out ~20% faint, which is what the option is for. */
static void t_type_alt(void **s)
{
    (void)s;
    enum { NX = 130, NY = 64, NDRAW = 30 };
    static float data[NX * NY], ivar[NX * NY];
    static double gdev[NX * NY], gexp[NX * NY];
    sp_fit_workspace *ws = NULL;
    assert_int_equal(sp_fit_workspace_create(NX * NY, 2, 1, &ws), SP_OK);
    sp_fit_image im;
    unit_image(&im, data, ivar, NX, NY);
    sp_fit_source tr[2];
    memset(tr, 0, sizeof tr);
    set_galaxy(&tr[0], SP_SRC_DEV, 36.3, 31.6, 3.0, 0.7, 0.4);
    set_galaxy(&tr[1], SP_SRC_EXP, 96.2, 32.4, 3.0, 0.6, -0.7);
    assert_int_equal(sp_fit_render_source(ws, NULL, &im, &tr[0], gdev), SP_OK);
    assert_int_equal(sp_fit_render_source(ws, NULL, &im, &tr[1], gexp), SP_OK);
    double sd = 0, se = 0;
    for (int k = 0; k < NX * NY; k++) {
        sd += gdev[k] * gdev[k];
        se += gexp[k] * gexp[k];
    }
    const double F[2] = {60.0 / sqrt(sd), 60.0 / sqrt(se)}; /* SNR 60 on a unit sky */
    double typed[2][NDRAW];
    /* mode 0: typed (the reference), 1: blank, no alternative, 2: blank, DEV tried
     * after EXP, 3: blank, point first then EXP and DEV */
    for (int mode = 0; mode < 4; mode++) {
        rng_seed(91); /* the same draws in every mode */
        sp_fit_options o;
        sp_fit_options_default(&o);
        o.untyped_alt = mode >= 2 ? 1u << SP_SRC_DEV : 0u;
        int right[2] = {0, 0};
        double err[2][NDRAW], dif[2][NDRAW];
        for (int d = 0; d < NDRAW; d++) {
            for (int k = 0; k < NX * NY; k++) {
                data[k] = (float)(F[0] * gdev[k] + F[1] * gexp[k] + gauss());
                ivar[k] = 1.0f;
            }
            sp_fit_source src[2];
            memcpy(src, tr, sizeof src);
            for (int q = 0; q < 2; q++) {
                src[q].type = mode == 0 ? tr[q].type : SP_SRC_EXP; /* blank: gal_model */
                src[q].type_auto = mode == 0 ? 0 : mode == 3 ? 1 : 2;
                src[q].re *= 1.1; /* a catalog's Re */
                src[q].flux[0] = NAN;
                src[q].id = q;
                src[q].x += 0.2;
                src[q].y -= 0.15;
            }
            sp_fit_result res[2];
            assert_int_equal(sp_fit_patch(ws, &o, &im, 1, 1, src, 2, res, NULL, NULL), SP_OK);
            for (int q = 0; q < 2; q++) {
                check_result_finite(&res[q], 1);
                right[q] += res[q].type == tr[q].type;
                err[q][d] = res[q].flux[0] / F[q] - 1.0;
                if (mode == 0) typed[q][d] = err[q][d];
                dif[q][d] = fabs(err[q][d] - typed[q][d]);
            }
        }
        double mb[2], md[2];
        for (int q = 0; q < 2; q++) {
            mb[q] = stats(err[q], NDRAW).median;
            md[q] = stats(dif[q], NDRAW).median;
        }
        printf("# blank types (mode %d): DEV as DEV %d/%d, flux %+.4f (|- typed| %.4f); EXP as EXP %d/%d, flux %+.4f "
               "(|- typed| %.4f)\n",
               mode, right[0], NDRAW, mb[0], md[0], right[1], NDRAW, mb[1], md[1]);
        assert_true(fabs(mb[1]) < 0.01);
        if (mode == 0) {
            assert_true(fabs(mb[0]) < 0.015);
        } else if (mode == 1) {
            assert_int_equal(right[0], 0);
            assert_true(mb[0] < -0.05);
        } else {
            assert_true(right[0] >= NDRAW - 2);
            assert_true(right[1] >= NDRAW - 4);
            assert_true(md[0] < 0.003 && md[1] < 0.003);
        }
    }
    sp_fit_workspace_free(&ws);
}

/* The cost accounting of sp_fit_patch_stats: components are counted by kind
 * (point sources only / with a galaxy), a held (FIXED) source is no work, the
 * stages that ran have CPU, and stages + per-patch work add up to the total;
 * on both routes (the per-component fast path, and the model-image path of
 * the pipeline's options: sky fitted, weights from the model). */
static void t_fit_cost(void **s)
{
    (void)s;
    enum { NX = 96, NY = 40 };
    static float data[NX * NY], ivar[NX * NY];
    static double gal[NX * NY];
    sp_fit_workspace *ws = NULL;
    assert_int_equal(sp_fit_workspace_create(NX * NY, 3, 1, &ws), SP_OK);
    sp_fit_image im;
    unit_image(&im, data, ivar, NX, NY);
    sp_fit_source src[3];
    memset(src, 0, sizeof src);
    src[0].type = SP_SRC_STAR;
    src[0].x = 18.3;
    src[0].y = 20.1;
    set_galaxy(&src[1], SP_SRC_EXP, 52.4, 19.7, 3.0, 0.7, 0.4);
    src[2].type = SP_SRC_STAR; /* held: no work of its own */
    src[2].x = 84.0;
    src[2].y = 21.0;
    src[2].role = SP_ROLE_FIXED;
    assert_int_equal(sp_fit_render_source(ws, NULL, &im, &src[1], gal), SP_OK);
    rng_seed(5);
    for (int k = 0; k < NX * NY; k++) {
        double m = 800.0 * truth_star(k % NX - src[0].x, k / NX - src[0].y) + 1500.0 * gal[k] +
                   300.0 * truth_star(k % NX - src[2].x, k / NX - src[2].y);
        data[k] = (float)(m + gauss());
        ivar[k] = 1.0f;
    }
    for (int q = 0; q < 3; q++) {
        src[q].flux[0] = NAN;
        src[q].id = q;
    }
    src[2].flux[0] = 300.0;
    for (int mode = 0; mode < 2; mode++) {
        sp_fit_options o;
        sp_fit_options_default(&o);
        if (mode) {
            o.fit_sky = 1;
            im.poisson_k = 0.01;
        }
        sp_fit_result res[3];
        sp_fit_patch_stats st;
        assert_int_equal(sp_fit_patch(ws, &o, &im, 1, 1, src, 3, res, &st, NULL), SP_OK);
        assert_int_equal(st.groups[0], 1);
        assert_int_equal(st.groups[1], 1);
        assert_int_equal(st.srcband[0], 1);
        assert_int_equal(st.srcband[1], 1);
        double sum = st.cpu_patch;
        for (int q = 0; q < SP_FIT_NCOST; q++)
            for (int k = 0; k < 2; k++) {
                assert_true(st.cpu_stage[q][k] >= 0.0);
                sum += st.cpu_stage[q][k];
            }
        assert_true(st.cpu_total > 0.0);
        assert_true(fabs(sum - st.cpu_total) <= 1e-9 + 1e-9 * st.cpu_total);
        assert_true(st.cpu_stage[SP_FIT_COST_FLUX][0] > 0 && st.cpu_stage[SP_FIT_COST_FLUX][1] > 0);
        assert_true(st.cpu_stage[SP_FIT_COST_POS][0] > 0 && st.cpu_stage[SP_FIT_COST_POS][1] > 0);
        assert_true(st.cpu_stage[SP_FIT_COST_SHAPE][1] > 0);
        assert_true(st.cpu_stage[SP_FIT_COST_ERR][0] > 0 && st.cpu_stage[SP_FIT_COST_ERR][1] > 0);
        assert_true(st.cpu_stage[SP_FIT_COST_SPLIT][0] == 0 && st.cpu_stage[SP_FIT_COST_SPLIT][1] == 0);
        /* the galaxy's shape stage is its largest cost; the star has none (at most the check that skips it) */
        assert_true(st.cpu_stage[SP_FIT_COST_SHAPE][0] < 0.1 * st.cpu_stage[SP_FIT_COST_SHAPE][1]);
        printf("# fit cost (%s): point %.0f+%.0f+%.0f+%.0f us, galaxy %.0f+%.0f+%.0f+%.0f us, patch %.0f us, total "
               "%.0f us\n",
               mode ? "model-image path" : "fast path", 1e6 * st.cpu_stage[0][0], 1e6 * st.cpu_stage[1][0],
               1e6 * st.cpu_stage[2][0], 1e6 * st.cpu_stage[3][0], 1e6 * st.cpu_stage[0][1],
               1e6 * st.cpu_stage[1][1], 1e6 * st.cpu_stage[2][1], 1e6 * st.cpu_stage[3][1], 1e6 * st.cpu_patch,
               1e6 * st.cpu_total);
    }
    im.poisson_k = 0.0;
    sp_fit_workspace_free(&ws);
}

/* A galaxy whose Re grows well beyond its initial value is fitted in the box
 * made from the initial Re and flux: SP_FITF_BOX_TRUNC says so. The same
 * galaxy started at its true Re and flux is not flagged, nor is a faint one
 * whose wings the box cuts at the noise by design. */
static void t_box_trunc(void **s)
{
    (void)s;
    enum { NX = 120, NY = 120 };
    static float data[NX * NY], ivar[NX * NY];
    static double gal[NX * NY];
    sp_fit_workspace *ws = NULL;
    assert_int_equal(sp_fit_workspace_create(NX * NY, 1, 1, &ws), SP_OK);
    sp_fit_image im;
    unit_image(&im, data, ivar, NX, NY);
    const double re_true = 7.0;
    for (int faint = 0; faint < 2; faint++) {
        const double F = faint ? 150.0 : 40000.0;
        sp_fit_source t;
        memset(&t, 0, sizeof t);
        t.type = SP_SRC_EXP;
        t.x = 60.3;
        t.y = 59.6;
        t.re = re_true;
        t.q = 0.8;
        t.theta = 0.3;
        assert_int_equal(sp_fit_render_source(ws, NULL, &im, &t, gal), SP_OK);
        rng_seed(11 + faint);
        for (int k = 0; k < NX * NY; k++) {
            data[k] = (float)(F * gal[k] + gauss());
            ivar[k] = 1.0f;
        }
        for (int start = 0; start < (faint ? 1 : 2); start++) {
            sp_fit_source src = t;
            src.id = 1;
            if (start == 0) {
                src.flux[0] = F;
            } else { /* a compact start: Re 1 px and a tenth of the flux */
                src.re = 1.0;
                src.flux[0] = 0.1 * F;
            }
            sp_fit_options o;
            sp_fit_options_default(&o);
            sp_fit_result res;
            assert_int_equal(sp_fit_patch(ws, &o, &im, 1, 1, &src, 1, &res, NULL, NULL), SP_OK);
            printf("# box truncation (%s, start Re %.1f): Re %.2f, flux %.1f / %.1f, flags 0x%x\n",
                   faint ? "faint" : "bright", src.re, res.re, res.flux[0], F, res.flags);
            if (start == 1) {
                assert_true(res.re > 3.0 * src.re); /* it grew out of its box */
                assert_true(res.flags & SP_FITF_BOX_TRUNC);
            } else {
                assert_false(res.flags & SP_FITF_BOX_TRUNC);
            }
            assert_true(fabs(res.re / re_true - 1.0) < 0.05 || faint);
            assert_true(fabs(res.flux[0] / F - 1.0) < (faint ? 0.3 : 0.01));
        }
    }
    sp_fit_workspace_free(&ws);
}

/* The Gaussian mixture of a noisy empirical ePSF (tests/data/psfmix_noisy_epsf.f32: a band-wide
 * polynomial ePSF of the bench tile built from faint stars, 81x81 samples at oversampling 2). A
 * 4-component fit of it converged to near-duplicate components with amplitudes of opposite signs,
 * which convolved galaxies into models whose fluxes came out ~0 with tiny errors; the mixture must
 * now sum to ~1 with little cancellation, and still match the stamp. */
static void t_psfmix_noisy(void **s)
{
    (void)s;
    char path[1024];
    snprintf(path, sizeof path, "%s", __FILE__);
    char *u = strstr(path, "unit/test_fit.c");
    assert_non_null(u);
    snprintf(u, sizeof path - (size_t)(u - path), "data/psfmix_noisy_epsf.f32");
    sp_psf *p = NULL;
    assert_int_equal(sp_psf_alloc(81, 2, &p), SP_OK);
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    assert_int_equal(fread(p->data, sizeof(float), 81 * 81, f), 81 * 81);
    fclose(f);
    assert_int_equal(sp_psf_normalize(p), SP_OK);
    double *scr = NULL;
    size_t cap = 0;
    psf_mix m;
    assert_int_equal(fit_psf_mixture(p, 4, &m, &scr, &cap), SP_OK);
    double sa = 0, sabs = 0;
    for (int c = 0; c < m.k; c++) {
        sa += m.amp[c];
        sabs += fabs(m.amp[c]);
    }
    printf("# noisy ePSF mixture: K %d, amplitudes sum %.4f (|sum| %.4f), rms residual / peak %.2e\n", m.k, sa, sabs,
           m.rms_resid);
    assert_true(sa > 0.9 && sa < 1.1);
    assert_true(sabs <= 2.0 * sa);
    assert_true(m.k >= 2);
    assert_true(m.rms_resid < 0.01);
    free(scr);
    sp_psf_free(&p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(t_api),          cmocka_unit_test(t_star_crlb), cmocka_unit_test(t_star_data_weights), cmocka_unit_test(t_star_render_sep),      cmocka_unit_test(t_galaxies),
        cmocka_unit_test(t_blend_two_stars), cmocka_unit_test(t_halo_neighbour), cmocka_unit_test(t_multiband),
        cmocka_unit_test(t_sky),          cmocka_unit_test(t_robust),         cmocka_unit_test(t_crowded_split),
        cmocka_unit_test(t_derivatives),  cmocka_unit_test(t_affine_image),   cmocka_unit_test(t_sersic),      cmocka_unit_test(t_profile_laws),
        cmocka_unit_test(t_threads),      cmocka_unit_test(t_psfmix_noisy),   cmocka_unit_test(t_type_auto), cmocka_unit_test(t_type_alt),
        cmocka_unit_test(t_fit_cost),
        cmocka_unit_test(t_box_trunc),
    };
    return cmocka_run_group_tests_name("fit", tests, setup, teardown);
}

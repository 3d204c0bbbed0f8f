/* bench_fit.c — dev benchmark of the fitting engine (not a test; run by hand).
 *
 *   make bench-fit && ./build/rel/bench/bench_fit [section ...]
 *   sections: psf stars field fieldp halo gal (default: all); field1, fieldp1 for profiling;
 *   truepsf DIR: isolated stars with the true PSF of a simulation folder
 *
 *  psf    interpolation error of the ePSF (Keys cubic) against the analytic
 *         pixel-integrated Moffat, and render speed
 *  stars  isolated stars, one patch call per star (worst case for overhead)
 *  field  a patch: 6 bands, 200x200 px ROI, stars (and galaxies) of SNR 5-500 at the
 *         issue's density (one source per 760 px^2) and a crowded one; source-bands
 *         per core-second
 *  halo   halo sources FIT_DISCARD vs FIXED (exact and catalog-quality initial values)
 *  gal    galaxy x PSF convolution routes (GMIX, FFT) against a brute-force
 *         reference (fine grid h = 1/8 px, FFT convolution with the analytic
 *         Moffat): model error, flux bias of fits, render and fit time
 *
 * Single thread (OPENBLAS_NUM_THREADS=1 is set by the workspace). Times are process CPU
 * seconds (sp_cputime), so that other load on the machine does not inflate them.
 */
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_fit.h"
#include "surveyproc/sp_prof.h"
#include "surveyproc/sp_psf.h"
#include "surveyproc/sp_sim.h"

#include <fftw3.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t rng_s = 0x2545F4914F6CDD1DULL;
static double urand(void)
{
    rng_s ^= rng_s << 13;
    rng_s ^= rng_s >> 7;
    rng_s ^= rng_s << 17;
    return ((rng_s >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}
static double gauss(void) { return sqrt(-2.0 * log(urand())) * cos(2.0 * M_PI * urand()); }
static int cmpd_bench(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static const double FWHM = 3.0, BETA = 3.0;
static const int OS = 4, HALF = 12;

#define CHECK(x)                                                                                   \
    do {                                                                                           \
        int st_ = (x);                                                                             \
        if (st_ != SP_OK) {                                                                        \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, sp_err_msg());             \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

static double stamp_norm(void)
{
    double Z = 0, v, c = HALF * OS;
    for (int j = 0; j <= 2 * HALF * OS; j++)
        for (int i = 0; i <= 2 * HALF * OS; i++) {
            sp_psf_moffat_pixel(FWHM, BETA, 1, 0, (i - c) / OS, (j - c) / OS, &v);
            Z += v;
        }
    return Z / (OS * OS);
}

/* ------------------------------------------------------------------ psf */
static void bench_psf(void)
{
    printf("== psf: Keys-6 interpolation vs analytic pixel-integrated Moffat (beta 3)\n");
    const double fw[3] = {2.0, 3.0, 4.0};
    const int oss[3] = {2, 4, 5};
    for (int a = 0; a < 3; a++)
        for (int b = 0; b < 3; b++) {
            sp_psf *p;
            CHECK(sp_psf_moffat(fw[a], BETA, 1, 0, 2 * 15 * oss[b] + 1, oss[b], &p));
            double c = 15.0 * oss[b], Z = 0, v;
            for (int j = 0; j < p->size; j++)
                for (int i = 0; i < p->size; i++) {
                    sp_psf_moffat_pixel(fw[a], BETA, 1, 0, (i - c) / oss[b], (j - c) / oss[b], &v);
                    Z += v;
                }
            Z /= oss[b] * oss[b];
            double peak;
            sp_psf_moffat_pixel(fw[a], BETA, 1, 0, 0, 0, &peak);
            peak /= Z;
            double maxe = 0, se = 0, sw = 0;
            double out[21 * 21];
            for (int t = 0; t < 100; t++) {
                double xc = 10 + urand() - 0.5, yc = 10 + urand() - 0.5;
                sp_psf_render(p, xc, yc, 21, 21, out, NULL, NULL);
                for (int k = 0; k < 441; k++) {
                    sp_psf_moffat_pixel(fw[a], BETA, 1, 0, k % 21 - xc, k / 21 - yc, &v);
                    v /= Z;
                    double e = fabs(out[k] - v);
                    if (e > maxe) maxe = e;
                    se += e * e * v;
                    sw += v;
                }
            }
            printf("  FWHM %.1f oversamp %d: max|err|/peak %.1e  flux-weighted rms/peak %.1e\n", fw[a], oss[b],
                   maxe / peak, sqrt(se / sw) / peak);
            sp_psf_free(&p);
        }
    /* cost of the Gaussian-mixture fit of an ePSF (once per PSF per workspace,
     * route GMIX): first galaxy render with a new PSF minus a cached one */
    {
        sp_fit_workspace *ws;
        CHECK(sp_fit_workspace_create(0, 0, 1, &ws));
        static double img[41 * 41];
        static float dummy[41 * 41];
        sp_fit_image im;
        sp_fit_image_aligned(&im, 0, 0, 41, 41);
        im.data = im.ivar = dummy;
        sp_fit_source g;
        memset(&g, 0, sizeof g);
        g.type = SP_SRC_EXP;
        g.x = g.y = 20;
        g.re = 2;
        g.q = 0.7;
        double tnew = 0, tcached = 0;
        const int np = 10;
        for (int k = 0; k < np; k++) {
            sp_psf *pk;
            CHECK(sp_psf_moffat(2.5 + 0.1 * k, BETA, 0.9, 0.3, 2 * HALF * OS + 1, OS, &pk));
            im.psf = pk;
            double t0 = sp_cputime();
            CHECK(sp_fit_render_source(ws, NULL, &im, &g, img));
            double t1 = sp_cputime();
            CHECK(sp_fit_render_source(ws, NULL, &im, &g, img));
            double t2 = sp_cputime();
            tnew += t1 - t0;
            tcached += t2 - t1;
            sp_psf_free(&pk);
        }
        printf("  ePSF Gaussian-mixture fit (K=4, stamp 97x97 at x4): %.2f ms per PSF\n", 1e3 * (tnew - tcached) / np);
        sp_fit_workspace_free(&ws);
    }
    sp_psf *p;
    CHECK(sp_psf_moffat(FWHM, BETA, 1, 0, 2 * HALF * OS + 1, OS, &p));
    double out[25 * 25], dx[25 * 25], dy[25 * 25];
    int n = 200000;
    double t0 = sp_cputime();
    for (int t = 0; t < n; t++) sp_psf_render(p, 12 + 0.001 * (t % 500), 12.3, 19, 19, out, dx, dy);
    double t1 = sp_cputime();
    printf("  render 19x19 with both derivatives: %.2f us (%.1f ns/pixel)\n", 1e6 * (t1 - t0) / n,
           1e9 * (t1 - t0) / n / 361);
    sp_psf_free(&p);
}

/* ------------------------------------------------------------------ stars */
static void bench_stars(void)
{
    printf("== stars: isolated, one sp_fit_patch call per star (25x25 ROI), positions free\n");
    enum { N = 25 };
    sp_psf *psf;
    CHECK(sp_psf_moffat(FWHM, BETA, 1, 0, 2 * HALF * OS + 1, OS, &psf));
    static float data[N * N], ivar[N * N];
    sp_fit_workspace *ws;
    CHECK(sp_fit_workspace_create(N * N, 4, 1, &ws));
    sp_fit_image im;
    sp_fit_image_aligned(&im, 0, 0, N, N);
    im.data = data;
    im.ivar = ivar;
    im.psf = psf;
    const double snr[3] = {20, 100, 500};
    for (int si = 0; si < 3; si++) {
        double F = snr[si] * 5.94; /* SNR ~ F / 5.94 for sigma 1 */
        int nrep = 3000;
        double t = 0;
        long renders = 0;
        int iters = 0;
        for (int r = 0; r < nrep; r++) {
            double xt = 12 + urand() - 0.5, yt = 12 + urand() - 0.5;
            for (int k = 0; k < N * N; k++) {
                data[k] = (float)(F * sp_psf_eval(psf, k % N - xt, k / N - yt) + gauss());
                ivar[k] = 1.0f;
            }
            sp_fit_source s;
            memset(&s, 0, sizeof s);
            s.type = SP_SRC_STAR;
            s.x = xt + 0.2;
            s.y = yt - 0.2;
            s.flux[0] = F;
            sp_fit_result res;
            sp_fit_patch_stats st;
            double t0 = sp_cputime();
            CHECK(sp_fit_patch(ws, NULL, &im, 1, 1, &s, 1, &res, &st, NULL));
            t += sp_cputime() - t0;
            renders += st.renders;
            iters += res.iters[1];
        }
        printf("  SNR %3.0f: %.1f us per star (%.0f stars/s), %.1f renders, %.2f LM iterations\n", snr[si],
               1e6 * t / nrep, nrep / t, (double)renders / nrep, (double)iters / nrep);
    }
    sp_fit_workspace_free(&ws);
    sp_psf_free(&psf);
}

/* ------------------------------------------------------------------ field */
static void bench_field_opt(int nstar, int ngal, int pipe);
static void bench_field(int nstar, int ngal) { bench_field_opt(nstar, ngal, 0); }

/* pipe: the pipeline's use (patch_run defaults): fit_sky, chunks of 10, position
 * prior 0.3 px, n_opt_iters 20, a 22 px halo of FIT_DISCARD sources, and the
 * ivar computed from the data (sky + max(data, 0) / gain, gain 1) with poisson_k. */
static void bench_field_opt(int nstar, int ngal, int pipe)
{
    enum { N = 200, NB = 6 };
    const int NSTAR = nstar, NGAL = ngal;
    printf("== field%s: %dx%d ROI, %d bands, %d stars + %d galaxies (one per %.0f px^2), positions free, staged, "
           "multi-band\n",
           pipe ? " (pipeline options: sky, chunks of 10, prior 0.3 px, 22 px halo, data ivar + poisson_k)" : "", N,
           N, NB, NSTAR, NGAL, (double)N * N / (NSTAR + NGAL));
    sp_psf *psf[NB];
    static float data[NB][N * N], ivar[NB][N * N];
    sp_fit_image im[NB];
    for (int b = 0; b < NB; b++) {
        CHECK(sp_psf_moffat(2.6 + 0.2 * b, BETA, 1, 0, 2 * HALF * OS + 1, OS, &psf[b]));
        sp_fit_image_aligned(&im[b], 1000, 2000, N, N);
        im[b].data = data[b];
        im[b].ivar = ivar[b];
        im[b].psf = psf[b];
        im[b].band = b;
    }
    const int ns = NSTAR + NGAL;
    sp_fit_source *src = calloc((size_t)ns, sizeof *src);
    sp_fit_result *res = calloc((size_t)ns, sizeof *res);
    double *tx = malloc(sizeof(double) * ns), *ty = malloc(sizeof(double) * ns);
    sp_fit_workspace *ws;
    CHECK(sp_fit_workspace_create((size_t)NB * N * N, ns, NB, &ws));
    for (int k = 0; k < ns; k++) {
        tx[k] = 1000 + 6 + (N - 12) * urand();
        ty[k] = 2000 + 6 + (N - 12) * urand();
        src[k].type = k < NSTAR ? SP_SRC_STAR : (k % 2 ? SP_SRC_EXP : SP_SRC_DEV);
        src[k].x = tx[k] + 0.3 * (urand() - 0.5);
        src[k].y = ty[k] + 0.3 * (urand() - 0.5);
        double snr = exp(log(5.0) + (log(500.0) - log(5.0)) * urand());
        for (int b = 0; b < NB; b++) src[k].flux[b] = snr * 6.0 * (0.7 + 0.6 * urand());
        src[k].re = 1.0 + 3.0 * urand();
        src[k].q = 0.4 + 0.6 * urand();
        src[k].theta = M_PI * urand();
        src[k].id = k;
    }
    /* data: render each source with the fitter's own renderer (unit flux), plus noise;
     * SP_BENCH_PSF_MISMATCH=f: the data's PSF FWHM is (1 + f) x the fitter's */
    double *tmp = malloc(sizeof(double) * N * N);
    const double mis = getenv("SP_BENCH_PSF_MISMATCH") ? atof(getenv("SP_BENCH_PSF_MISMATCH")) : 0.0;
    sp_psf *psf_data[NB];
    for (int b = 0; b < NB; b++) {
        CHECK(sp_psf_moffat((2.6 + 0.2 * b) * (1.0 + mis), BETA, 1, 0, 2 * HALF * OS + 1, OS, &psf_data[b]));
        im[b].psf = psf_data[b];
    }
    for (int b = 0; b < NB; b++) {
        for (int q = 0; q < N * N; q++) {
            data[b][q] = pipe ? 0.0f : (float)gauss();
            ivar[b][q] = 1.0f;
        }
        for (int k = 0; k < ns; k++) {
            sp_fit_source t = src[k];
            t.x = tx[k];
            t.y = ty[k];
            CHECK(sp_fit_render_source(ws, NULL, &im[b], &t, tmp));
            for (int q = 0; q < N * N; q++) data[b][q] += (float)(src[k].flux[b] * tmp[q]);
        }
        if (pipe) { /* sky 1 + Poisson with gain 1; ivar from the data, as the pipeline's prep */
            for (int q = 0; q < N * N; q++) {
                double m = data[b][q], d = m + sqrt(1.0 + fmax(m, 0.0)) * gauss();
                data[b][q] = (float)d;
                ivar[b][q] = (float)(1.0 / (1.0 + fmax(d, 0.0)));
            }
            im[b].poisson_k = 1.0;
        }
    }
    for (int b = 0; b < NB; b++) im[b].psf = psf[b];
    sp_fit_options opt;
    sp_fit_options_default(&opt);
    if (pipe) {
        opt.fit_sky = 1;
        opt.max_group = 10;
        opt.pos_prior_sigma = 0.3;
        opt.n_opt_iters = 20;
        for (int k = 0; k < ns; k++)
            src[k].role = (tx[k] < 1022 || tx[k] >= 1178 || ty[k] < 2022 || ty[k] >= 2178) ? SP_ROLE_FIT_DISCARD
                                                                                           : SP_ROLE_FIT_REPORT;
    }
    for (int k = 0; k < ns; k++) /* initial fluxes perturbed by 20% */
        for (int b = 0; b < NB; b++) src[k].flux[b] *= 0.8 + 0.4 * urand();
    sp_fit_patch_stats st;
    int nrep = getenv("SP_BENCH_REPS") ? atoi(getenv("SP_BENCH_REPS")) : 5;
    double t = 0;
    for (int r = 0; r < nrep; r++) {
        double t0 = sp_cputime();
        CHECK(sp_fit_patch(ws, &opt, im, NB, NB, src, ns, res, &st, NULL));
        t += sp_cputime() - t0;
    }
    t /= nrep;
    int nconv = 0, nfrozen = 0, it2 = 0, it3 = 0;
    for (int k = 0; k < ns; k++) {
        nconv += (res[k].flags & SP_FITF_CONVERGED) != 0;
        nfrozen += (res[k].flags & SP_FITF_GEOM_FROZEN) != 0;
        it2 += res[k].iters[1];
        it3 += res[k].iters[2];
    }
    printf("  %.1f ms per patch: %.0f source-bands per core-second (%d sources x %d bands)\n", 1e3 * t, ns * NB / t,
           ns, NB);
    printf("  components %d (largest %d), renders %ld, converged %d/%d, geometry frozen (faint) %d, "
           "mean LM iterations stage 2 %.2f stage 3 %.2f\n",
           st.ngroups, st.max_group_size, st.renders, nconv, ns, nfrozen, (double)it2 / ns, (double)it3 / ns);
    double chi = 0;
    int nchi = 0;
    for (int k = 0; k < ns; k++)
        for (int b = 0; b < NB; b++)
            if (isfinite(res[k].flux_err[b]) && res[k].flux_err[b] > 0) {
                /* truth: the flux before the 20% perturbation is not kept; use the pull of the
                 * total model residual instead */
                chi += res[k].chi2dof[b];
                nchi++;
            }
    printf("  mean chi2/dof over source boxes %.3f, patch rms (band 0) %.3f\n", chi / nchi, st.rms[0]);
    free(tmp);
    free(src);
    free(res);
    free(tx);
    free(ty);
    sp_fit_workspace_free(&ws);
    for (int b = 0; b < NB; b++) {
        sp_psf_free(&psf[b]);
        sp_psf_free(&psf_data[b]);
    }
}

/* ------------------------------------------------------------------ truepsf */
/* Isolated stars with the simulator's TRUE PSF given to the fitter (the ePSF
 * rendered by sp_sim_render_epsf at the tile centre of each band; stars drawn
 * pixel-integrated with sp_sim_render_psf at random sub-pixel positions), the
 * pipeline's options (sky fitted, prior 0.3 px) and its noise handling (ivar
 * from the data with the source Poisson term, poisson_k): separates the
 * fitter's errors from the ePSF builder's. Noise: sky sigma 2.5, k = 0.5
 * (scaled units like the demo/bench frames). CRLB: (F, x, y) free, true
 * variance. Bars (issue 9): scatter/CRLB within 5%, pull std 0.95-1.05,
 * median bias < 0.2% at SNR > 100. */
static void bench_truepsf(const char *dir)
{
    sp_sim *sim = NULL;
    if (sp_sim_load(dir, &sim) != SP_OK) {
        printf("== truepsf: cannot load %s (a `surveyproc simulate --out DIR` folder)\n", dir);
        return;
    }
    enum { N = 45, NREAL = 600, OSP = 2, SZ = 41 * OSP + 1 };
    const double V = 2.5 * 2.5, K = 0.5;
    static float data[N * N], ivar[N * N];
    static double prof[N * N], px[N * N], py[N * N], tmp[N * N], st[SZ * SZ];
    printf("== truepsf (%s): true ePSF 41 px x%d, %d px ROI, sky sigma %.1f, k %.2f, %d draws per SNR; pipeline "
           "options (sky, prior 0.3 px)\n", dir, OSP, N, sqrt(V), K, NREAL);
    printf("  band  SNR   scatter/CRLB  pull std  median bias   mean bias  converged\n");
    sp_fit_workspace *ws;
    CHECK(sp_fit_workspace_create(N * N, 4, 1, &ws));
    sp_fit_options opt;
    sp_fit_options_default(&opt);
    opt.fit_sky = 1;
    opt.pos_prior_sigma = 0.3;
    opt.n_opt_iters = 20;
    opt.max_group = 10;
    double *df = malloc(sizeof(double) * NREAL), *pl = malloc(sizeof(double) * NREAL);
    for (int b = 0; b < sim->nbands; b++) {
        sp_sim_psf pp;
        sp_sim_psf_params(sim, b, 0.5 * (sim->cfg.nx - 1), 0.5 * (sim->cfg.ny - 1), &pp);
        sp_psf *psf;
        CHECK(sp_psf_alloc(SZ, OSP, &psf));
        CHECK(sp_sim_render_epsf(&pp, SZ, OSP, st));
        for (int q = 0; q < SZ * SZ; q++) psf->data[q] = (float)st[q];
        psf->fwhm = pp.fwhm;
        sp_fit_image im;
        sp_fit_image_aligned(&im, 0, 0, N, N);
        im.data = data;
        im.ivar = ivar;
        im.psf = psf;
        im.poisson_k = K;
        const double snrs[4] = {20, 50, 100, 500};
        for (int si = 0; si < 4; si++) {
            int nconv = 0;
            double crlb2 = 0.0;
            for (int r = 0; r < NREAL; r++) {
                const double xt = 22 + urand() - 0.5, yt = 22 + urand() - 0.5, h = 1e-3;
                CHECK(sp_sim_render_psf(&pp, xt - 22, yt - 22, N, 1, prof));
                CHECK(sp_sim_render_psf(&pp, xt - 22 + h, yt - 22, N, 1, px));
                CHECK(sp_sim_render_psf(&pp, xt - 22 - h, yt - 22, N, 1, tmp));
                for (int q = 0; q < N * N; q++) px[q] = (px[q] - tmp[q]) / (2 * h);
                CHECK(sp_sim_render_psf(&pp, xt - 22, yt - 22 + h, N, 1, py));
                CHECK(sp_sim_render_psf(&pp, xt - 22, yt - 22 - h, N, 1, tmp));
                for (int q = 0; q < N * N; q++) py[q] = (py[q] - tmp[q]) / (2 * h);
                /* F for the requested SNR (position known, Poisson included) */
                double F = 100.0;
                for (int it = 0; it < 30; it++) {
                    double info = 0;
                    for (int q = 0; q < N * N; q++) info += prof[q] * prof[q] / (V + K * F * prof[q]);
                    F *= snrs[si] / (F * sqrt(info));
                }
                double Fi[3][3] = {{0}};
                for (int q = 0; q < N * N; q++) {
                    const double var = V + K * F * prof[q], g[3] = {prof[q], F * px[q], F * py[q]};
                    for (int a = 0; a < 3; a++)
                        for (int c = 0; c < 3; c++) Fi[a][c] += g[a] * g[c] / var;
                }
                double a = Fi[0][0], bb = Fi[0][1], c = Fi[0][2], d = Fi[1][1], e = Fi[1][2], f = Fi[2][2];
                double det = a * (d * f - e * e) - bb * (bb * f - c * e) + c * (bb * e - c * d);
                const double vF = (d * f - e * e) / det;
                crlb2 += vF / (F * F);
                for (int q = 0; q < N * N; q++) {
                    const double m = F * prof[q], dd = m + sqrt(V + K * m) * gauss();
                    data[q] = (float)dd;
                    ivar[q] = (float)(1.0 / (V + K * fmax(dd, 0.0)));
                }
                sp_fit_source src;
                memset(&src, 0, sizeof src);
                src.type = SP_SRC_STAR;
                src.x = xt + 0.1 * gauss();
                src.y = yt + 0.1 * gauss();
                src.flux[0] = F * (0.8 + 0.4 * urand());
                sp_fit_result res;
                CHECK(sp_fit_patch(ws, &opt, &im, 1, 1, &src, 1, &res, NULL, NULL));
                df[r] = res.flux[0] / F - 1.0;
                pl[r] = (res.flux[0] - F) / res.flux_err[0];
                nconv += (res.flags & SP_FITF_CONVERGED) != 0;
            }
            double mean = 0, sd = 0, sp = 0, mp = 0;
            for (int r = 0; r < NREAL; r++) {
                mean += df[r] / NREAL;
                mp += pl[r] / NREAL;
            }
            for (int r = 0; r < NREAL; r++) {
                sd += (df[r] - mean) * (df[r] - mean) / (NREAL - 1);
                sp += (pl[r] - mp) * (pl[r] - mp) / (NREAL - 1);
            }
            qsort(df, NREAL, sizeof *df, cmpd_bench);
            printf("  %-5s %4.0f   %6.3f        %6.3f    %+7.3f%%    %+7.3f%%   %d/%d\n", sim->band[b].name, snrs[si],
                   sqrt(sd) / sqrt(crlb2 / NREAL), sqrt(sp), 100 * df[NREAL / 2], 100 * mean, nconv, NREAL);
        }
        sp_psf_free(&psf);
    }
    free(df);
    free(pl);
    sp_fit_workspace_free(&ws);
    sp_sim_free(&sim);
}

/* ------------------------------------------------------------------ halo */
/* Crowded patch: 100x100 ROI = 60x60 base + 20 px halo. Sources of the base
 * are reported; halo sources are FIT_DISCARD or FIXED at their catalog
 * values. Catalog values: exact, or as a catalog gives them (fluxes off by
 * 20% rms, positions by 0.3 px). Figure: base-source flux error / reported
 * error (rms pull) and mean bias, over many random fields. */
static void bench_halo(void)
{
    enum { N = 100, NS = 40 };
    printf("== halo: crowded patch (%d sources on %dx%d, one per %d px^2), base 60x60 + 20 px halo\n", NS, N, N,
           N * N / NS);
    sp_psf *psf;
    CHECK(sp_psf_moffat(FWHM, BETA, 1, 0, 2 * HALF * OS + 1, OS, &psf));
    static float data[N * N], ivar[N * N];
    sp_fit_workspace *ws;
    CHECK(sp_fit_workspace_create(N * N, NS, 1, &ws));
    sp_fit_image im;
    sp_fit_image_aligned(&im, 0, 0, N, N);
    im.data = data;
    im.ivar = ivar;
    im.psf = psf;
    double tx[NS], ty[NS], tf[NS];
    sp_fit_source src[NS];
    sp_fit_result res[NS];
    const char *names[4] = {"FIT_DISCARD, exact catalog", "FIXED, exact catalog", "FIT_DISCARD, catalog 20%/0.3px",
                            "FIXED, catalog 20%/0.3px"};
    double sum_p2[4] = {0}, sum_p[4] = {0}, tcpu[4] = {0};
    int cnt[4] = {0}, nout[4] = {0}, nunres[4] = {0};
    const int nfield = 60;
    for (int f = 0; f < nfield; f++) {
        for (int k = 0; k < NS; k++) {
            tx[k] = -5 + (N + 10) * urand();
            ty[k] = -5 + (N + 10) * urand();
            tf[k] = exp(log(200.0) + (log(20000.0) - log(200.0)) * urand());
        }
        for (int q = 0; q < N * N; q++) {
            double v = 0;
            for (int k = 0; k < NS; k++) v += tf[k] * sp_psf_eval(psf, q % N - tx[k], q / N - ty[k]);
            data[q] = (float)(v + gauss());
            ivar[q] = 1.0f;
        }
        double pert_f[NS], pert_x[NS], pert_y[NS];
        for (int k = 0; k < NS; k++) {
            pert_f[k] = 1.0 + 0.2 * gauss();
            pert_x[k] = 0.3 * gauss();
            pert_y[k] = 0.3 * gauss();
        }
        for (int mode = 0; mode < 4; mode++) {
            int n = 0;
            for (int k = 0; k < NS; k++) {
                /* sources entirely outside the ROI are not in the patch list */
                if (tx[k] < -3 || ty[k] < -3 || tx[k] > N + 2 || ty[k] > N + 2) continue;
                memset(&src[n], 0, sizeof src[n]);
                int base = tx[k] >= 20 && tx[k] < 80 && ty[k] >= 20 && ty[k] < 80;
                int pert = mode >= 2;
                src[n].type = SP_SRC_STAR;
                src[n].x = tx[k] + (pert ? pert_x[k] : 0);
                src[n].y = ty[k] + (pert ? pert_y[k] : 0);
                src[n].flux[0] = tf[k] * (pert ? pert_f[k] : 1.0);
                src[n].role = base ? SP_ROLE_FIT_REPORT : (mode % 2 ? SP_ROLE_FIXED : SP_ROLE_FIT_DISCARD);
                src[n].id = k;
                n++;
            }
            double t0 = sp_cputime();
            CHECK(sp_fit_patch(ws, NULL, &im, 1, 1, src, n, res, NULL, NULL));
            tcpu[mode] += sp_cputime() - t0;
            for (int i = 0; i < n; i++) {
                if (src[i].role != SP_ROLE_FIT_REPORT) continue;
                int k = (int)src[i].id;
                double pl = (res[i].flux[0] - tf[k]) / res[i].flux_err[0];
                if (!isfinite(pl)) continue;
                if (res[i].flags & SP_FITF_UNRESOLVED) { /* flagged: not counted */
                    nunres[mode]++;
                    continue;
                }
                if (fabs(pl) > 5) nout[mode]++;
                if (getenv("SP_BENCH_DEBUG") && fabs(pl) > 8)
                    printf("    field %d mode %d src %d (%.1f,%.1f) F %.0f fit %.1f +- %.1f pos (%.2f,%.2f) flags %x "
                           "grp %d size %d it %d %d\n",
                           f, mode, k, tx[k], ty[k], tf[k], res[i].flux[0], res[i].flux_err[0], res[i].x - tx[k],
                           res[i].y - ty[k], res[i].flags, res[i].group, res[i].group_size, res[i].iters[0],
                           res[i].iters[1]);
                sum_p2[mode] += pl * pl;
                sum_p[mode] += pl;
                cnt[mode]++;
            }
        }
    }
    for (int mode = 0; mode < 4; mode++)
        printf("  %-32s base sources %d (+%d flagged UNRESOLVED): rms pull %.3f, mean pull %+.3f, |pull| > 5: %d, "
               "%.1f ms per patch\n",
               names[mode], cnt[mode], nunres[mode], sqrt(sum_p2[mode] / cnt[mode]), sum_p[mode] / cnt[mode],
               nout[mode], 1e3 * tcpu[mode] / nfield);
    sp_fit_workspace_free(&ws);
    sp_psf_free(&psf);
}

/* ------------------------------------------------------------------ galaxies */
static const double HL_EXP_A[6] = {2.34853813e-03, 3.07995260e-02, 2.23364214e-01,
                                   1.17949102e+00, 4.33873750e+00, 5.99820770e+00};
static const double HL_EXP_V[6] = {1.20078965e-03, 8.84526493e-03, 3.91463084e-02,
                                   1.39976817e-01, 4.60962500e-01, 1.50159566e+00};
static const double HL_DEV_A[8] = {4.26347652e-02, 2.40127183e-01, 6.85907632e-01, 1.51937350e+00,
                                   2.83627243e+00, 4.46467501e+00, 5.72440830e+00, 5.60989349e+00};
static const double HL_DEV_V[8] = {2.23759216e-04, 1.00220099e-03, 4.18731126e-03, 1.69432589e-02,
                                   6.84850479e-02, 2.87207080e-01, 1.33320254e+00, 8.40215071e+00};

/* brute force: mixture sampled at h = 1/8 px (narrow components as bilinear
 * deltas), FFT-convolved with the analytic pixel-integrated Moffat over the
 * same +-HALF support and normalisation as the stamp */
static void reference(int type, double re, double q, double th, double xc, double yc, int N, double Z, double *out)
{
    const int FS = 8, P = 24, M = (N + 2 * P) * FS;
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
        if (sqrt(s2) * q < 0.5 * h) {
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
    int R = HALF * FS;
    for (int j = -R; j <= R; j++)
        for (int i = -R; i <= R; i++) {
            double v;
            sp_psf_moffat_pixel(FWHM, BETA, 1, 0, i * h, j * h, &v);
            p[((j + M) % M) * M + (i + M) % M] = v / Z;
        }
    fftw_plan pg = fftw_plan_dft_r2c_2d(M, M, g, G, FFTW_ESTIMATE);
    fftw_plan pp = fftw_plan_dft_r2c_2d(M, M, p, Pf, FFTW_ESTIMATE);
    fftw_execute(pg);
    fftw_execute(pp);
    for (int k = 0; k < M * (M / 2 + 1); k++) {
        double r1 = G[k][0] * Pf[k][0] - G[k][1] * Pf[k][1], i1 = G[k][0] * Pf[k][1] + G[k][1] * Pf[k][0];
        G[k][0] = r1 / ((double)M * M);
        G[k][1] = i1 / ((double)M * M);
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

static void bench_gal(void)
{
    printf("== gal: galaxy x PSF routes vs brute-force reference (Moffat FWHM 3, beta 3; q 0.6, theta 0.4)\n");
    enum { N = 65 };
    double Z = stamp_norm();
    sp_psf *psf;
    CHECK(sp_psf_moffat(FWHM, BETA, 1, 0, 2 * HALF * OS + 1, OS, &psf));
    sp_fit_workspace *ws;
    CHECK(sp_fit_workspace_create(N * N, 4, 1, &ws));
    static double ref[N * N], mod[N * N];
    static float data[N * N], ivar[N * N];
    sp_fit_image im;
    sp_fit_image_aligned(&im, 0, 0, N, N);
    im.data = data;
    im.ivar = ivar;
    im.psf = psf;
    const int types[2] = {SP_SRC_EXP, SP_SRC_DEV};
    const double res_[4] = {1.0, 2.0, 4.0, 6.0};
    printf("  %-4s %4s %-5s %11s %11s %9s | fits at SNR 100 (60 noise draws): %8s %8s %9s\n", "type", "Re", "route",
           "max|d|/peak", "sum(d)/flux", "render", "bias", "pull std", "ms/fit");
    for (int ti = 0; ti < 2; ti++)
        for (int ri = 0; ri < 4; ri++) {
            double re = res_[ri], xc = 32.3, yc = 31.8, q = 0.6, th = 0.4;
            reference(types[ti], re, q, th, xc, yc, N, Z, ref);
            double peak = 0, sref = 0;
            for (int k = 0; k < N * N; k++) {
                if (ref[k] > peak) peak = ref[k];
                sref += ref[k];
            }
            for (int conv = 0; conv < 2; conv++) {
                sp_fit_options o;
                sp_fit_options_default(&o);
                o.conv = conv;
                sp_fit_source s;
                memset(&s, 0, sizeof s);
                s.type = types[ti];
                s.x = xc;
                s.y = yc;
                s.re = re;
                s.q = q;
                s.theta = th;
                int nr = 20;
                double t0 = sp_cputime();
                for (int r = 0; r < nr; r++) CHECK(sp_fit_render_source(ws, &o, &im, &s, mod));
                double trend = (sp_cputime() - t0) / nr;
                double maxd = 0, sd = 0;
                for (int k = 0; k < N * N; k++) {
                    double d = mod[k] - ref[k];
                    if (fabs(d) > maxd) maxd = fabs(d);
                    sd += d;
                }
                /* fits: truth = reference, sigma 1, SNR 100 */
                double sp2 = 0;
                for (int k = 0; k < N * N; k++) sp2 += ref[k] * ref[k];
                double F = 100.0 / sqrt(sp2);
                double bias = 0, p1 = 0, p2 = 0, tf = 0;
                const int nfit = 60;
                for (int r = 0; r < nfit; r++) {
                    for (int k = 0; k < N * N; k++) {
                        data[k] = (float)(F * ref[k] + gauss());
                        ivar[k] = 1.0f;
                    }
                    sp_fit_source fs = s;
                    fs.flux[0] = F;
                    fs.re = re * 1.1;
                    fs.q = 0.7;
                    fs.x += 0.2;
                    sp_fit_result res;
                    double t1 = sp_cputime();
                    CHECK(sp_fit_patch(ws, &o, &im, 1, 1, &fs, 1, &res, NULL, NULL));
                    tf += sp_cputime() - t1;
                    bias += (res.flux[0] - F) / F / nfit;
                    double pl = (res.flux[0] - F) / res.flux_err[0];
                    p1 += pl / nfit;
                    p2 += pl * pl / nfit;
                }
                printf("  %-4s %4.1f %-5s %11.2e %+11.2e %7.0f us | %+7.3f%% %8.3f %9.2f\n",
                       types[ti] == SP_SRC_EXP ? "EXP" : "DEV", re, conv ? "FFT" : "GMIX", maxd / peak, sd / sref,
                       1e6 * trend, 100 * bias, sqrt(p2 - p1 * p1), 1e3 * tf / nfit);
            }
        }
    sp_fit_workspace_free(&ws);
    sp_psf_free(&psf);
}

int main(int argc, char **argv)
{
    CHECK(sp_fit_init());
    int all = argc < 2;
    for (int a = all ? 0 : 1; a < (all ? 1 : argc); a++) {
        const char *s = all ? "all" : argv[a];
        int any = !strcmp(s, "all");
        if (any || !strcmp(s, "psf")) bench_psf();
        if (any || !strcmp(s, "stars")) bench_stars();
        if (any || !strcmp(s, "field")) {
            /* the tile: 5,500 sources on 2048^2 px = one per 760 px^2 */
            bench_field(53, 0);
            bench_field(37, 16);
            bench_field(120, 0); /* crowded: one per 330 px^2 */
            bench_field(100, 40);
        }
        if (!strcmp(s, "field1")) bench_field(53, 0); /* for profiling: stars only, issue density */
        if (any || !strcmp(s, "fieldp")) { /* the pipeline's options */
            bench_field_opt(53, 0, 1);
            bench_field_opt(37, 16, 1);
            bench_field_opt(120, 0, 1);
        }
        if (!strcmp(s, "fieldp1")) bench_field_opt(53, 0, 1); /* for profiling */
        if (!strcmp(s, "truepsf") && a + 1 < argc) bench_truepsf(argv[++a]); /* truepsf DIR */
        if (any || !strcmp(s, "halo")) bench_halo();
        if (any || !strcmp(s, "gal")) bench_gal();
    }
    sp_fit_cleanup();
    return 0;
}

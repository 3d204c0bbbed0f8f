/* bench_epsf.c — dev benchmark (run by hand, not by the test runner): every
 * ePSF of a simulated 2048 x 2048, 6-band tile on a 4 x 4 cell grid, timed and
 * checked against the simulator's truth.
 *
 * Tile: per band a Moffat PSF whose FWHM, axis ratio and angle vary smoothly
 * over the tile (the truth at any position is the bilinear blend of a 3 x 3
 * grid of oversampled Moffat stamps); ~640 bright stars (shared positions,
 * per-band fluxes), 2500 faint stars and galaxies, sky 100 + gradient, sky
 * sigma 5 with a Poisson term.
 *
 * Per cell (512 x 512 base + 32-pixel halo ROI), as the pipeline runs it:
 * background of every band (sp_bkg), white stack, detection on the white
 * stack, then per band: PSF-star selection and the ePSF build. Cells x bands
 * run on OpenMP threads (dynamic schedule).
 *
 * Reports wall time per stage, Mpix/s of the background, and per band the
 * ePSF fidelity against the truth at the cell centres (median / max over
 * cells of ||m - t|| / ||t||, EE(2 FWHM), flux normalisation), and the fidelity
 * of the bilinear cell-grid PSF at random positions (median, max, corners).
 *
 * Build and run (from the repository root, after `make`):
 *   mpicc -O2 -fopenmp -std=c11 -D_GNU_SOURCE -Iinclude -Itests tests/bench/bench_epsf.c \
 *       lib/libsurveyproc.a -lm -o build/bench_epsf
 *   OMP_NUM_THREADS=2 ./build/bench_epsf [oversamp] [final_size] [nthreads] [vary 0|1] [reject_sigma]
 *       [n_faint (default 2500)] [mask detected neighbours 0|1 (default 1)] [spatial_degree 0|1]
 */
#include "unit/simimg.h"

#include "surveyproc/sp_background.h"
#include "surveyproc/sp_detect.h"
#include "surveyproc/sp_epsf.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_psf.h"

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define NX 2048
#define NY 2048
#define NB 6
#define NC 4
#define HALO 32
#define TG 3 /* truth grid per band */

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

/* process CPU seconds (all threads): on a shared machine wall times of a
 * 2-thread run swing with other load; CPU / threads is the idle-machine wall */
static double cpunow(void)
{
    struct timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof(double), cmp_d);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* truth PSF parameters of band b at tile position (x, y) */
static int vary = 1;          /* 0: one PSF per band (no spatial variation) */
static double reject_sigma = -1; /* < 0: the builder's default */
static int use_neighbours = 1;    /* mask the white-stack detections in the cutouts */
static int spatial_degree = 1;

static void truth_params(int b, double x, double y, double *fw, double *q, double *th)
{
    double u = vary * (x / NX - 0.5), v = vary * (y / NY - 0.5);
    *fw = (3.6 + 0.15 * b) * (1.0 + 0.12 * u + 0.08 * v);
    *q = 0.92 - 0.06 * u * u - 0.04 * v;
    *th = 0.3 + 0.4 * u;
}

static sp_psf *truth_grid[NB][TG * TG];
static const double truth_beta = 3.0;

/* truth at (x, y): bilinear blend of the truth grid (centres at (i+0.5) NX/TG) */
static void truth_at(int b, double x, double y, sp_psf *out)
{
    double xe[TG + 1], ye[TG + 1];
    for (int k = 0; k <= TG; k++) {
        xe[k] = (double)k * NX / TG;
        ye[k] = (double)k * NY / TG;
    }
    sp_epsf_grid g = {TG, TG, xe, ye, (const sp_psf *const *)truth_grid[b]};
    if (sp_epsf_grid_at(&g, x, y, out) != SP_OK) {
        fprintf(stderr, "truth_at failed: %s\n", sp_err_msg());
        exit(1);
    }
}

/* resample an os-4 truth (size 4*(F+10)+1) onto the ePSF geometry */
static void truth_on(const sp_psf *t4, sp_psf *out)
{
    int S = out->size, os = out->oversamp;
    double c = 0.5 * (S - 1);
    for (int j = 0; j < S; j++)
        for (int i = 0; i < S; i++) out->data[j * S + i] = (float)sp_psf_eval(t4, (i - c) / os, (j - c) / os);
    sp_psf_normalize(out);
}

static double relres(const sp_psf *m, const sp_psf *t)
{
    double a = 0, b = 0;
    for (int k = 0; k < m->size * m->size; k++) {
        double d = (double)m->data[k] - t->data[k];
        a += d * d;
        b += (double)t->data[k] * t->data[k];
    }
    return sqrt(a / b);
}

static double flux_ratio(const sp_psf *m, const sp_psf *t, int F)
{
    double *mm = malloc(sizeof(double) * F * F), *tt = malloc(sizeof(double) * F * F), tot = 0;
    for (int k = 0; k < 9; k++) {
        double c = 0.5 * (F - 1), px = (k % 3) / 3.0, py = (k / 3) / 3.0;
        sp_psf_render(m, c + px, c + py, F, F, mm, NULL, NULL);
        sp_psf_render(t, c + px, c + py, F, F, tt, NULL, NULL);
        double a = 0, bb = 0;
        for (int q = 0; q < F * F; q++) {
            a += mm[q] * tt[q];
            bb += mm[q] * mm[q];
        }
        tot += a / bb;
    }
    free(mm);
    free(tt);
    return tot / 9;
}

int main(int argc, char **argv)
{
    int os = argc > 1 ? atoi(argv[1]) : 2;
    int F = argc > 2 ? atoi(argv[2]) : 41;
    int nth = argc > 3 ? atoi(argv[3]) : omp_get_max_threads();
    vary = argc > 4 ? atoi(argv[4]) : 1;
    reject_sigma = argc > 5 ? atof(argv[5]) : -1;
    use_neighbours = argc > 7 ? atoi(argv[7]) : 1;
    spatial_degree = argc > 8 ? atoi(argv[8]) : 1;
    omp_set_num_threads(nth);
    printf("bench_epsf: %dx%d, %d bands, %dx%d cells, oversamp %d, final size %d, %d threads, PSF %s\n", NX, NY, NB,
           NC, NC, os, F, nth, vary ? "varying over the tile" : "constant per band");

    /* ---- simulate ---- */
    double t0 = now();
    int TS = 4 * (F + 10) + 1;
#pragma omp parallel for collapse(2) schedule(dynamic)
    for (int b = 0; b < NB; b++)
        for (int k = 0; k < TG * TG; k++) {
            double x = (k % TG + 0.5) * NX / TG, y = (k / TG + 0.5) * NY / TG, fw, q, th;
            truth_params(b, x, y, &fw, &q, &th);
            sp_psf_moffat(fw, truth_beta, q, th, TS, 4, &truth_grid[b][k]);
        }
    size_t npix = (size_t)NX * NY;
    float *img[NB], *ivar[NB];
    for (int b = 0; b < NB; b++) {
        img[b] = calloc(npix, sizeof(float));
        ivar[b] = calloc(npix, sizeof(float));
    }
    sim_rng r;
    sim_seed(&r, 2026);
    enum { NBRIGHT = 640, NFAINT_MAX = 2500 };
    int NFAINT = argc > 6 ? atoi(argv[6]) : NFAINT_MAX;
    if (NFAINT > NFAINT_MAX) NFAINT = NFAINT_MAX;
    static double sx[NBRIGHT + NFAINT_MAX], sy[NBRIGHT + NFAINT_MAX], sf[NBRIGHT + NFAINT_MAX][NB];
    static int gal[NBRIGHT + NFAINT_MAX];
    int ns = 0;
    while (ns < NBRIGHT) {
        double x = 20 + sim_unif(&r) * (NX - 40), y = 20 + sim_unif(&r) * (NY - 40);
        int ok = 1;
        for (int k = 0; k < ns && ok; k++)
            if (fabs(x - sx[k]) < 40 && fabs(y - sy[k]) < 40) ok = 0;
        if (!ok) continue;
        sx[ns] = x;
        sy[ns] = y;
        double f = 2e4 * pow(25.0, sim_unif(&r)), col = 0.3 * (sim_unif(&r) - 0.5);
        for (int b = 0; b < NB; b++) sf[ns][b] = f * pow(10.0, col * (b - 2.5) / 2.5);
        gal[ns] = 0;
        ns++;
    }
    for (; ns < NBRIGHT + NFAINT; ns++) {
        sx[ns] = sim_unif(&r) * NX;
        sy[ns] = sim_unif(&r) * NY;
        double f = 100.0 * pow(30.0, sim_unif(&r));
        for (int b = 0; b < NB; b++) sf[ns][b] = f;
        gal[ns] = sim_unif(&r) < 0.6;
    }
    sp_psf *galpsf = NULL;
    sp_psf_moffat(7.0, 2.0, 0.5, 1.0, 4 * 40 + 1, 4, &galpsf);
#pragma omp parallel for schedule(dynamic)
    for (int b = 0; b < NB; b++) {
        sp_psf *loc = NULL;
        sp_psf_alloc(TS, 4, &loc);
        double *scr = malloc(sizeof(double) * (F + 14) * (F + 14) * 4);
        sim_rng rb;
        sim_seed(&rb, 77 + b);
        for (int k = 0; k < NBRIGHT + NFAINT; k++) {
            if (gal[k]) {
                sim_add_star(img[b], NX, NY, galpsf, sx[k], sy[k], sf[k][b], scr);
            } else {
                truth_at(b, sx[k], sy[k], loc);
                sim_add_star(img[b], NX, NY, loc, sx[k], sy[k], sf[k][b], scr);
            }
        }
        sim_sky sky = {100.0, 0.004, -0.003, 30.0};
        sim_finish(img[b], ivar[b], NX, NY, &sky, 5.0, 2.0, &rb);
        free(scr);
        sp_psf_free(&loc);
    }
    double t1 = now();
    printf("simulated in %.1f s\n", t1 - t0);

    /* ---- background speed: one full 2048^2 band, one thread, best of 7 ---- */
    {
        float *cp = malloc(sizeof(float) * npix);
        double best = 1e9, best0 = 1e9;
        for (int rep = 0; rep < 7; rep++)
            for (int masked = 0; masked < 2; masked++) {
                memcpy(cp, img[0], sizeof(float) * npix);
                sp_bkg_params bp;
                sp_bkg_params_default(&bp);
                if (!masked) bp.mask_sigma = 0;
                double a = now();
                sp_bkg *bk = NULL;
                sp_bkg_estimate(cp, ivar[0], NULL, NX, NY, &bp, &bk);
                sp_bkg_subtract(bk, cp);
                double t = now() - a;
                sp_bkg_free(&bk);
                if (masked && t < best) best = t;
                if (!masked && t < best0) best0 = t;
            }
        printf("background estimate + subtract, 2048^2 with ivar, 1 thread, best of 7: %.1f ms = %.0f Mpix/s "
               "(source masking on); %.1f ms = %.0f Mpix/s (off)\n",
               1e3 * best, npix / 1e6 / best, 1e3 * best0, npix / 1e6 / best0);
        free(cp);
    }

    /* ---- cells ---- */
    int cw = NX / NC, ch = NY / NC, ncell = NC * NC;
    int rx0[NC * NC], ry0[NC * NC], rw[NC * NC], rh[NC * NC];
    for (int c = 0; c < ncell; c++) {
        int ci = c % NC, cj = c / NC;
        int x0 = ci * cw - HALO, y0 = cj * ch - HALO, x1 = (ci + 1) * cw + HALO, y1 = (cj + 1) * ch + HALO;
        if (x0 < 0) x0 = 0;
        if (y0 < 0) y0 = 0;
        if (x1 > NX) x1 = NX;
        if (y1 > NY) y1 = NY;
        rx0[c] = x0;
        ry0[c] = y0;
        rw[c] = x1 - x0;
        rh[c] = y1 - y0;
    }
    /* cell ROIs copied out, as the pipeline reads them */
    float *roi[NC * NC][NB], *rvar[NC * NC][NB], *rrms[NC * NC][NB], *white[NC * NC], *wrms[NC * NC];
    for (int c = 0; c < ncell; c++) {
        for (int b = 0; b < NB; b++) {
            roi[c][b] = malloc(sizeof(float) * rw[c] * rh[c]);
            rvar[c][b] = malloc(sizeof(float) * rw[c] * rh[c]);
            rrms[c][b] = malloc(sizeof(float) * rw[c] * rh[c]);
            for (int j = 0; j < rh[c]; j++) {
                size_t src = (size_t)(ry0[c] + j) * NX + rx0[c], dst = (size_t)j * rw[c];
                memcpy(roi[c][b] + dst, img[b] + src, sizeof(float) * rw[c]);
                memcpy(rvar[c][b] + dst, ivar[b] + src, sizeof(float) * rw[c]);
            }
        }
        white[c] = malloc(sizeof(float) * rw[c] * rh[c]);
        wrms[c] = malloc(sizeof(float) * rw[c] * rh[c]);
    }

    /* stage 1: background per cell per band */
    double tb0 = now(), cb0 = cpunow();
    double mpix = 0;
#pragma omp parallel for schedule(dynamic) reduction(+ : mpix)
    for (int cb = 0; cb < ncell * NB; cb++) {
        int c = cb / NB, b = cb % NB;
        sp_bkg *bk = NULL;
        if (sp_bkg_estimate(roi[c][b], rvar[c][b], NULL, rw[c], rh[c], NULL, &bk) != SP_OK) {
            fprintf(stderr, "bkg: %s\n", sp_err_msg());
            exit(1);
        }
        sp_bkg_map(bk, NULL, rrms[c][b]);
        sp_bkg_subtract(bk, roi[c][b]);
        sp_bkg_free(&bk);
        mpix += rw[c] * rh[c] / 1e6;
    }
    double tb1 = now(), cb1 = cpunow();

    /* stage 2: white stack (ivar-weighted mean) and detection per cell */
    sp_source *det[NC * NC];
    int ndet[NC * NC];
    double tdet[NC * NC];
#pragma omp parallel for schedule(dynamic)
    for (int c = 0; c < ncell; c++) {
        size_t n = (size_t)rw[c] * rh[c];
        for (size_t k = 0; k < n; k++) {
            double s = 0, w = 0;
            for (int b = 0; b < NB; b++) {
                s += (double)rvar[c][b][k] * roi[c][b][k];
                w += rvar[c][b][k];
            }
            white[c][k] = w > 0 ? (float)(s / w) : 0.0f;
            wrms[c][k] = w > 0 ? (float)(1.0 / sqrt(w)) : 0.0f;
        }
        sp_detect_params dp;
        sp_detect_params_default(&dp);
        dp.fwhm = 4.0;
        dp.thresh_sigma = 5.0;
        double a0 = now();
        if (sp_detect(white[c], wrms[c], NULL, rw[c], rh[c], NULL, &dp, &det[c], &ndet[c]) != SP_OK) {
            fprintf(stderr, "detect: %s\n", sp_err_msg());
            exit(1);
        }
        tdet[c] = now() - a0;
    }
    double td1 = now(), cd1 = cpunow();

    /* the simulator's source list per cell ROI (diagnostic neighbour masks) */
    static sp_source *truthsrc[NC * NC];
    static int ntruthsrc[NC * NC];
    for (int c = 0; c < ncell; c++) {
        truthsrc[c] = calloc(NBRIGHT + NFAINT, sizeof(sp_source));
        ntruthsrc[c] = 0;
        for (int k = 0; k < NBRIGHT + NFAINT; k++) {
            double x = sx[k] - rx0[c], y = sy[k] - ry0[c];
            if (x < -30 || y < -30 || x > rw[c] + 30 || y > rh[c] + 30) continue;
            sp_source *o = &truthsrc[c][ntruthsrc[c]++];
            o->x = x;
            o->y = y;
            o->a = gal[k] ? 3.0 : 1.7;
            o->flux = sf[k][0];
        }
    }

    /* stage 3: star selection + ePSF per cell per band */
    sp_epsf_result *res[NC * NC][NB];
    int nsel[NC * NC][NB];
    double tbuild[NC * NC][NB], tsel[NC * NC][NB];
#pragma omp parallel for schedule(dynamic)
    for (int cb = 0; cb < ncell * NB; cb++) {
        int c = cb / NB, b = cb % NB;
        sp_starsel_params sp;
        sp_starsel_params_default(&sp);
        sp.fwhm = 4.0;
        sp.stamp_size = F;
        sp.edge_pad = 2;
        sp.min_sep = 25;
        sp.min_sep_flux_ratio = 0.01;
        sp.max_stars = 200;
        sp_psfstar *st = NULL;
        int n = 0;
        double a0 = now();
        if (sp_starsel_select(roi[c][b], rrms[c][b], NULL, rw[c], rh[c], det[c], ndet[c], NULL, 0, &sp, &st, &n,
                              NULL) != SP_OK) {
            fprintf(stderr, "starsel: %s\n", sp_err_msg());
            exit(1);
        }
        tsel[c][b] = now() - a0;
        /* keep stars whose centre is in the cell's base region, brightest 40 */
        int m = 0, ci = c % NC, cj = c / NC;
        for (int k = 0; k < n && m < 40; k++) {
            double x = st[k].x + rx0[c], y = st[k].y + ry0[c];
            if (x >= ci * cw && x < (ci + 1) * cw && y >= cj * ch && y < (cj + 1) * ch) st[m++] = st[k];
        }
        nsel[c][b] = m;
        sp_epsf_params ep;
        sp_epsf_params_default(&ep);
        ep.oversamp = os;
        ep.final_size = F;
        if (reject_sigma >= 0) ep.reject_sigma = reject_sigma;
        ep.spatial_degree = spatial_degree;
        ep.x_ref = (ci + 0.5) * cw - rx0[c]; /* the cell centre, ROI pixels */
        ep.y_ref = (cj + 0.5) * ch - ry0[c];
        if (use_neighbours == 1) {
            ep.neighbours = det[c];
            ep.nneighbours = ndet[c];
        } else if (use_neighbours == 2) { /* diagnostic: the simulator's full source list */
            ep.neighbours = truthsrc[c];
            ep.nneighbours = ntruthsrc[c];
        }
        double a = now();
        if (sp_epsf_build(roi[c][b], rvar[c][b], NULL, rw[c], rh[c], st, m, &ep, &res[c][b]) != SP_OK) {
            fprintf(stderr, "epsf: %s\n", sp_err_msg());
            exit(1);
        }
        tbuild[c][b] = now() - a;
        free(st);
    }
    double te1 = now(), ce1 = cpunow();
    double cpu_build = 0, cpu_sel = 0, cpu_det = 0;
    int ndsum = 0;
    for (int c = 0; c < ncell; c++) {
        cpu_det += tdet[c];
        ndsum += ndet[c];
        for (int b = 0; b < NB; b++) {
            cpu_build += tbuild[c][b];
            cpu_sel += tsel[c][b];
        }
    }
    printf("\nstage                          wall (s)  CPU (s, all threads)\n");
    printf("background (96 cell-bands)     %.3f     %.3f   (%.0f Mpix/s per CPU second)\n", tb1 - tb0, cb1 - cb0,
           mpix / (cb1 - cb0));
    printf("white stack + detection (16)   %.3f     %.3f   (detection %.1f ms per cell, %d sources in all)\n",
           td1 - tb1, cd1 - cb1, 1e3 * cpu_det / ncell, ndsum);
    printf("star selection + ePSF (96)     %.3f     %.3f   (selection %.1f ms, build %.1f ms wall each on average)\n",
           te1 - td1, ce1 - cd1, 1e3 * cpu_sel / (ncell * NB), 1e3 * cpu_build / (ncell * NB));
    printf("total ePSF stage               %.3f     %.3f   (CPU / %d threads = %.3f s)\n", te1 - tb0, ce1 - cb0, nth,
           (ce1 - cb0) / nth);

    /* ---- accuracy at cell centres ---- */
    int S = os * (F - 1) + 1;
    sp_psf *loc = NULL, *t = NULL, *m = NULL;
    sp_psf_alloc(TS, 4, &loc);
    sp_psf_alloc(S, os, &t);
    sp_psf_alloc(S, os, &m);
    printf("\nband  FWHM   stars(min/med)  fallbacks  relres med / max     EE(2FWHM) worst    flux worst    "
           "grid relres med / max / corners max\n");
    for (int b = 0; b < NB; b++) {
        double rr[NC * NC], ee = 0, fl = 0, nsv[NC * NC];
        int nfb = 0, nmin = 1 << 30;
        for (int c = 0; c < ncell; c++) {
            double xc = (c % NC + 0.5) * cw, yc = (c / NC + 0.5) * ch;
            truth_at(b, xc, yc, loc);
            truth_on(loc, t);
            const sp_psf *e = res[c][b]->psf;
            rr[c] = relres(e, t);
            double fw, q, th;
            truth_params(b, xc, yc, &fw, &q, &th);
            double d = sp_epsf_encircled(e, 2 * fw) / sp_epsf_encircled(t, 2 * fw) - 1;
            if (fabs(d) > fabs(ee)) ee = d;
            d = flux_ratio(e, t, F) - 1;
            if (fabs(d) > fabs(fl)) fl = d;
            nfb += res[c][b]->is_fallback;
            nsv[c] = nsel[c][b];
            if (nsel[c][b] < nmin) nmin = nsel[c][b];
        }
        double rmax = 0;
        for (int c = 0; c < ncell; c++) rmax = fmax(rmax, rr[c]);
        double rmed = median(rr, ncell), nmed = median(nsv, ncell);
        /* grid interpolation at random positions */
        double xe[NC + 1], ye[NC + 1];
        for (int k = 0; k <= NC; k++) {
            xe[k] = k * cw;
            ye[k] = k * ch;
        }
        const sp_psf *cells[NC * NC];
        for (int c = 0; c < ncell; c++) cells[c] = res[c][b]->psf;
        sp_epsf_grid g = {NC, NC, xe, ye, cells};
        enum { NP = 120 };
        double gr[NP], gf[NP], gmax = 0, corner = 0;
        sim_rng rr2;
        sim_seed(&rr2, 5 + b);
        for (int k = 0; k < NP; k++) {
            double x, y;
            if (k < 4) {
                x = (k % 2) ? NX - 40 : 40;
                y = (k / 2) ? NY - 40 : 40;
            } else {
                x = sim_unif(&rr2) * NX;
                y = sim_unif(&rr2) * NY;
            }
            sp_epsf_grid_at(&g, x, y, m);
            truth_at(b, x, y, loc);
            truth_on(loc, t);
            gr[k] = relres(m, t);
            gf[k] = fabs(flux_ratio(m, t, F) - 1);
            gmax = fmax(gmax, gr[k]);
            if (k < 4) corner = fmax(corner, gr[k]);
        }
        double gmed = median(gr, NP), gfmed = median(gf, NP), gf90 = gf[(int)(0.9 * NP)];
        double fw, q, th;
        truth_params(b, NX / 2, NY / 2, &fw, &q, &th);
        printf("%4d  %.2f   %4d / %4.0f      %d          %.3f%% / %.3f%%     %+.3f%%        %+.3f%%       %.3f%% / "
               "%.3f%% / %.3f%%\n",
               b, fw, nmin, nmed, nfb, 100 * rmed, 100 * rmax, 100 * ee, 100 * fl, 100 * gmed, 100 * gmax,
               100 * corner);
        printf("      grid PSF-fit flux error |d|: median %.3f%%, 90th percentile %.3f%%\n", 100 * gfmed, 100 * gf90);
    }
    sp_psf_free(&loc);
    sp_psf_free(&t);
    sp_psf_free(&m);
    for (int c = 0; c < ncell; c++) {
        for (int b = 0; b < NB; b++) {
            sp_epsf_result_free(&res[c][b]);
            free(roi[c][b]);
            free(rvar[c][b]);
            free(rrms[c][b]);
        }
        free(white[c]);
        free(wrms[c]);
        free(det[c]);
        free(truthsrc[c]);
    }
    for (int b = 0; b < NB; b++) {
        free(img[b]);
        free(ivar[b]);
        for (int k = 0; k < TG * TG; k++) sp_psf_free(&truth_grid[b][k]);
    }
    sp_psf_free(&galpsf);
    return 0;
}

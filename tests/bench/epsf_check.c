/* epsf_check.c — dev tool (run by hand, not by the test runner): the ePSFs a
 * run stored, against the simulator's true PSF, per band and cell, on the
 * issue-5 bars (docs/psf.md):
 *   relres  ||m - t|| / ||t|| of the oversampled stamp /epsf/<band>_os against
 *           the truth at the cell centre on the same grid (both unit sum); the
 *           pixel stamp /epsf/<band> is what `surveyproc score` uses (pix);
 *   corner  relres of the corner cell's ePSF against the truth 40 px inside
 *           the tile corner (the grid PSF there is that cell's, clamped);
 *   EE      encircled energy within 2 FWHM (model - truth, both unit sum);
 *   flux    PSF-fit flux of a true star with the model: sum(m t)/sum(m m) - 1
 *           over 9 sub-pixel phases (pixel-integrated stamps, fixed centre).
 * Build: make build/bench/epsf_check
 * Run:   build/bench/epsf_check STORE SIMDIR
 */
#include "surveyproc/sp_epsf.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_h5.h"
#include "surveyproc/sp_psf.h"
#include "surveyproc/sp_sim.h"

#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int cmpd(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}
static double med(double *v, int n)
{
    if (n == 0) return NAN;
    qsort(v, n, sizeof *v, cmpd);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* truth on the stamp geometry (size S, oversamp os), unit sum over samples / os^2 */
static void truth_psf(const sp_sim *sim, int b, double x, double y, sp_psf *t)
{
    int S = t->size;
    double *buf = malloc(sizeof(double) * S * S);
    sp_sim_psf p;
    sp_sim_psf_params(sim, b, x, y, &p);
    sp_sim_render_epsf(&p, S, t->oversamp, buf);
    for (int k = 0; k < S * S; k++) t->data[k] = (float)buf[k];
    sp_psf_normalize(t);
    free(buf);
}

static double relres(const sp_psf *m, const sp_psf *t)
{
    double sm = 0, st = 0, a = 0, bb = 0;
    int n = m->size * m->size;
    for (int k = 0; k < n; k++) sm += m->data[k], st += t->data[k];
    for (int k = 0; k < n; k++) {
        double d = m->data[k] / sm - t->data[k] / st;
        a += d * d;
        bb += (t->data[k] / st) * (t->data[k] / st);
    }
    return sqrt(a / bb);
}

static double flux_err(const sp_psf *m, const sp_psf *t, int F)
{
    double *mm = malloc(sizeof(double) * F * F), *tt = malloc(sizeof(double) * F * F), tot = 0;
    for (int k = 0; k < 9; k++) {
        double c = 0.5 * (F - 1), px = (k % 3) / 3.0, py = (k / 3) / 3.0;
        sp_psf_render(m, c + px, c + py, F, F, mm, NULL, NULL);
        sp_psf_render(t, c + px, c + py, F, F, tt, NULL, NULL);
        double a = 0, bb = 0;
        for (int q = 0; q < F * F; q++) a += mm[q] * tt[q], bb += mm[q] * mm[q];
        tot += a / bb;
    }
    free(mm);
    free(tt);
    return tot / 9 - 1;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s STORE SIMDIR\n", argv[0]);
        return 2;
    }
    MPI_Init(&argc, &argv);
    sp_h5 *h = NULL;
    sp_sim *sim = NULL;
    if (sp_h5_open(argv[1], 0, MPI_COMM_SELF, &h) != SP_OK || sp_sim_load(argv[2], &sim) != SP_OK) {
        fprintf(stderr, "%s\n", sp_err_msg());
        return 1;
    }
    long nc = 0;
    sp_h5_table_nrows(h, "/cells", &nc);
    double *bx0 = calloc(nc, 8), *bx1 = calloc(nc, 8), *by0 = calloc(nc, 8), *by1 = calloc(nc, 8);
    double *cix = calloc(nc, 8), *ciy = calloc(nc, 8);
    sp_h5_table_read_col_double(h, "/cells", "bx0", 0, nc, bx0);
    sp_h5_table_read_col_double(h, "/cells", "bx1", 0, nc, bx1);
    sp_h5_table_read_col_double(h, "/cells", "by0", 0, nc, by0);
    sp_h5_table_read_col_double(h, "/cells", "by1", 0, nc, by1);
    sp_h5_table_read_col_double(h, "/cells", "ix", 0, nc, cix);
    sp_h5_table_read_col_double(h, "/cells", "iy", 0, nc, ciy);
    double NXT = sim->cfg.nx, NYT = sim->cfg.ny;
    printf("band  cells  relres med/max (pix med)  EE(2FWHM) worst  flux med/worst  corners max  kinds(E/M/D) nstars min-med\n");
    double allmed[64];
    for (int b = 0; b < sim->nbands; b++) {
        char path[160];
        const char *bn = sim->cfg.band_names[b];
        int nd;
        long d[8], dp[8];
        snprintf(path, sizeof path, "/epsf/%s_os", bn);
        if (sp_h5_dims(h, path, &nd, d) != SP_OK) continue;
        snprintf(path, sizeof path, "/epsf/%s", bn);
        sp_h5_dims(h, path, &nd, dp);
        long S = d[2], P = dp[2], ncx = d[1], ncy = d[0];
        float *cube = malloc(sizeof(float) * ncx * ncy * S * S), *pcube = malloc(sizeof(float) * ncx * ncy * P * P);
        int32_t *nst = malloc(4 * ncx * ncy), *kind = malloc(4 * ncx * ncy);
        snprintf(path, sizeof path, "/epsf/%s_os", bn);
        sp_h5_array_read(h, path, SP_H5_F32, NULL, NULL, cube);
        snprintf(path, sizeof path, "/epsf/%s", bn);
        sp_h5_array_read(h, path, SP_H5_F32, NULL, NULL, pcube);
        snprintf(path, sizeof path, "/epsf/%s_nstars", bn);
        sp_h5_array_read(h, path, SP_H5_I32, NULL, NULL, nst);
        snprintf(path, sizeof path, "/epsf/%s_fallback", bn);
        sp_h5_array_read(h, path, SP_H5_I32, NULL, NULL, kind);
        int os = (int)lround((S - 1.0) / (P - 1.0));
        sp_psf *m = NULL, *t = NULL, *mp = NULL, *tp = NULL;
        sp_psf_alloc((int)S, os, &m);
        sp_psf_alloc((int)S, os, &t);
        sp_psf_alloc((int)P, 1, &mp);
        sp_psf_alloc((int)P, 1, &tp);
        double rr[1024], rp[1024], fl[1024], eew = 0, flw = 0, cmax = 0;
        int n = 0, nk[3] = {0, 0, 0}, nsv[1024];
        for (long c = 0; c < nc; c++) {
            long ix = (long)cix[c], iy = (long)ciy[c], k = iy * ncx + ix;
            if (nst[k] < 0) continue;
            memcpy(m->data, cube + k * S * S, sizeof(float) * S * S);
            memcpy(mp->data, pcube + k * P * P, sizeof(float) * P * P);
            if (!isfinite(m->data[0])) continue;
            sp_psf_normalize(m);
            double xc = 0.5 * (bx0[c] + bx1[c]) - 0.5, yc = 0.5 * (by0[c] + by1[c]) - 0.5;
            truth_psf(sim, b, xc, yc, t);
            truth_psf(sim, b, xc, yc, tp);
            rr[n] = relres(m, t);
            rp[n] = relres(mp, tp);
            sp_sim_psf pp;
            sp_sim_psf_params(sim, b, xc, yc, &pp);
            double fw = pp.fwhm;
            double ee = sp_epsf_encircled(m, 2 * fw) - sp_epsf_encircled(t, 2 * fw);
            if (fabs(ee) > fabs(eew)) eew = ee;
            fl[n] = flux_err(m, t, 41);
            if (fabs(fl[n]) > fabs(flw)) flw = fl[n];
            nsv[n] = nst[k];
            if (getenv("EPSF_CHECK_CELLS")) {
                double cx_, cy_, fm, ft;
                sp_psf_moments(m, &cx_, &cy_, &fm);
                sp_psf_moments(t, &cx_, &cy_, &ft);
                printf("  %s cell %ld (%ld,%ld) kind %d nstars %d relres %.3f%% EE %+.3f%% flux %+.3f%% fwhm %.3f/%.3f\n", bn, c,
                       ix, iy, kind[k], nst[k], 100 * rr[n], 100 * ee, 100 * fl[n], fm, ft);
                /* radial profile of (m - t) / t_peak, image-pixel radii */
                double pr[24] = {0}, pn[24] = {0}, tpk = 0;
                int S2 = (int)S;
                double cc = 0.5 * (S2 - 1), sm = 0, stt = 0;
                for (int q = 0; q < S2 * S2; q++) sm += m->data[q], stt += t->data[q];
                for (int q = 0; q < S2 * S2; q++) tpk = t->data[q] / stt > tpk ? t->data[q] / stt : tpk;
                for (int q = 0; q < S2 * S2; q++) {
                    double rq = hypot(q % S2 - cc, q / S2 - cc) / os;
                    int bi = (int)lround(rq);
                    if (bi < 24) pr[bi] += m->data[q] / sm - t->data[q] / stt, pn[bi]++;
                }
                printf("    prof(m-t)/peak %%:");
                for (int bi = 0; bi < 21; bi += (bi < 6 ? 1 : 2)) printf(" r%d %+.2f", bi, 100 * pr[bi] / pn[bi] / tpk);
                printf("\n");
            }
            nk[kind[k] >= 0 && kind[k] < 3 ? kind[k] : 2]++;
            /* corners */
            int cxe = ix == 0 ? 0 : ix == ncx - 1 ? 1 : -1, cye = iy == 0 ? 0 : iy == ncy - 1 ? 1 : -1;
            if (cxe >= 0 && cye >= 0) {
                truth_psf(sim, b, cxe ? NXT - 41 : 40, cye ? NYT - 41 : 40, t);
                double r = relres(m, t);
                if (r > cmax) cmax = r;
            }
            n++;
        }
        double fa[1024];
        for (int i = 0; i < n; i++) fa[i] = fabs(fl[i]);
        int nsmin = 1 << 30;
        double nsd[1024];
        for (int i = 0; i < n; i++) nsd[i] = nsv[i], nsmin = nsv[i] < nsmin ? nsv[i] : nsmin;
        double rmax = 0;
        for (int i = 0; i < n; i++) rmax = rr[i] > rmax ? rr[i] : rmax;
        double mr = med(rr, n);
        allmed[b] = mr;
        printf("%-5s %5d  %.3f%% / %.3f%% (%.3f%%)   %+.3f%%        %.3f%% / %+.3f%%   %.3f%%     %d/%d/%d  %d-%.0f\n", bn, n,
               100 * mr, 100 * rmax, 100 * med(rp, n), 100 * eew, 100 * med(fa, n), 100 * flw, 100 * cmax, nk[0],
               nk[1], nk[2], nsmin, med(nsd, n));
        free(cube), free(pcube), free(nst), free(kind);
        sp_psf_free(&m), sp_psf_free(&t), sp_psf_free(&mp), sp_psf_free(&tp);
    }
    (void)allmed;
    sp_h5_close(&h);
    sp_sim_free(&sim);
    MPI_Finalize();
    return 0;
}

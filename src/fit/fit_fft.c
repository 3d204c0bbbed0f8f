/* fit_fft.c — galaxy x pixelized ePSF convolution in Fourier space (route
 * SP_FIT_CONV_FFT), and the FFTW plan table.
 *
 * The model at the pixel centres of an n x n box is the inverse DFT of
 *     X(q) = sum over aliases m of  G(k) E(k) exp(-2 pi i k.c),  k = q/n + m
 * (Poisson summation: sampling at integer pixels folds the continuous
 * spectrum into the band |k| < 1/2 cycle/px). G is the galaxy mixture's
 * analytic Fourier transform (exact: no galaxy sampling at all), E the
 * spectrum of the ePSF stamp (oversampled by os, zero-padded to L = n os
 * samples, one r2c per PSF and n, cached), c the sub-pixel centre. Aliases
 * where |E| < 1e-10 |E(0)| are skipped. Derivatives with respect to the
 * centre and the shape are analytic in k, one inverse c2r each.
 *
 * Plans: sp_fit_init() (serial) makes the c2r plans for the box sizes and
 * calls fftw_make_planner_thread_safe(); the r2c plans for the PSF spectra
 * (L x L, depending on the oversampling) are made on first use inside a
 * critical section. Threads execute plans with fftw_execute_dft_c2r/_r2c on
 * their own fftw_malloc'ed arrays (same alignment as at planning).
 */
#include "fit_internal.h"

#include "surveyproc/sp_error.h"

#include <fftw3.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static const int g_sizes[] = {16, 24, 32, 48, 64, 80, 96, 128, 160, 192, 256};
#define NSIZES ((int)(sizeof g_sizes / sizeof g_sizes[0]))
static fftw_plan g_c2r[NSIZES];
static int g_inited = 0;
#define NR2C 48
static struct {
    int l;
    fftw_plan p;
} g_r2c[NR2C];
static int g_nr2c = 0;

int sp_fit_init(void)
{
    int status = SP_OK;
    if (g_inited) return SP_OK;
    fftw_make_planner_thread_safe();
    for (int i = 0; i < NSIZES; i++) {
        int n = g_sizes[i];
        fftw_complex *in = fftw_malloc(sizeof(fftw_complex) * (size_t)n * (n / 2 + 1));
        double *out = fftw_malloc(sizeof(double) * (size_t)n * n);
        SP_CHECK(in && out, SP_ERR_NOMEM, "FFTW: out of memory planning %dx%d", n, n);
        g_c2r[i] = fftw_plan_dft_c2r_2d(n, n, in, out, FFTW_ESTIMATE);
        fftw_free(in);
        fftw_free(out);
        SP_CHECK(g_c2r[i] != NULL, SP_ERR_INTERNAL, "FFTW: could not plan a %dx%d c2r transform", n, n);
    }
    g_inited = 1;
cleanup:
    return status;
}

void sp_fit_cleanup(void)
{
    if (!g_inited) return;
    for (int i = 0; i < NSIZES; i++)
        if (g_c2r[i]) fftw_destroy_plan(g_c2r[i]);
    for (int i = 0; i < g_nr2c; i++) fftw_destroy_plan(g_r2c[i].p);
    g_nr2c = 0;
    memset(g_c2r, 0, sizeof g_c2r);
    g_inited = 0;
}

int fit_fft_inited(void) { return g_inited; }

int fit_fft_size_for(int need)
{
    for (int i = 0; i < NSIZES; i++)
        if (g_sizes[i] >= need) return g_sizes[i];
    return 0;
}

static fftw_plan c2r_plan(int n)
{
    for (int i = 0; i < NSIZES; i++)
        if (g_sizes[i] == n) return g_c2r[i];
    return NULL;
}

static fftw_plan r2c_plan(int l)
{
    fftw_plan p = NULL;
#pragma omp critical(sp_fit_fftw_planner)
    {
        for (int i = 0; i < g_nr2c && !p; i++)
            if (g_r2c[i].l == l) p = g_r2c[i].p;
        if (!p && g_nr2c < NR2C) {
            double *in = fftw_malloc(sizeof(double) * (size_t)l * l);
            fftw_complex *out = fftw_malloc(sizeof(fftw_complex) * (size_t)l * (l / 2 + 1));
            if (in && out) p = fftw_plan_dft_r2c_2d(l, l, in, out, FFTW_ESTIMATE);
            fftw_free(in);
            fftw_free(out);
            if (p) {
                g_r2c[g_nr2c].l = l;
                g_r2c[g_nr2c].p = p;
                g_nr2c++;
            }
        }
    }
    return p;
}

void fit_fft_free_entry(psf_cache_entry *pc)
{
    if (pc->fft_spec) fftw_free(pc->fft_spec);
    free(pc->fft_keep);
    pc->fft_spec = NULL;
    pc->fft_keep = NULL;
    pc->fft_n = 0;
}

void fit_fft_scratch_free(fit_fft_scratch *fs)
{
    if (fs->spec) fftw_free(fs->spec);
    if (fs->real) fftw_free(fs->real);
    memset(fs, 0, sizeof *fs);
}

int fit_fft_psf_spectrum(psf_cache_entry *pc, int n)
{
    int status = SP_OK;
    double *in = NULL;
    fftw_complex *half = NULL;
    if (pc->fft_n == n && pc->fft_spec) return SP_OK;
    fit_fft_free_entry(pc);
    const sp_psf *psf = pc->psf;
    const int os = psf->oversamp, size = psf->size, l = n * os;
    const int c = (size - 1) / 2;
    SP_CHECK(l >= size, SP_ERR_INTERNAL, "FFT: transform %d too small for the PSF stamp %d", l, size);
    fftw_plan p = r2c_plan(l);
    SP_CHECK(p != NULL, SP_ERR_NOMEM, "FFTW: no r2c plan for %dx%d", l, l);
    in = fftw_malloc(sizeof(double) * (size_t)l * l);
    half = fftw_malloc(sizeof(fftw_complex) * (size_t)l * (l / 2 + 1));
    fftw_complex *full = fftw_malloc(sizeof(fftw_complex) * (size_t)l * l);
    pc->fft_spec = full;
    pc->fft_keep = malloc((size_t)l * l);
    SP_CHECK(in && half && full && pc->fft_keep, SP_ERR_NOMEM, "FFT: out of memory for a %dx%d PSF spectrum", l, l);
    memset(in, 0, sizeof(double) * (size_t)l * l);
    for (int j = 0; j < size; j++)
        for (int i = 0; i < size; i++) {
            int ii = ((i - c) % l + l) % l, jj = ((j - c) % l + l) % l;
            in[(size_t)jj * l + ii] = psf->data[(size_t)j * size + i];
        }
    fftw_execute_dft_r2c(p, in, half);
    const double h2 = 1.0 / ((double)os * os);
    const int lh = l / 2 + 1;
    for (int jy = 0; jy < l; jy++)
        for (int jx = 0; jx < l; jx++) {
            double re, im;
            if (jx < lh) {
                re = half[(size_t)jy * lh + jx][0];
                im = half[(size_t)jy * lh + jx][1];
            } else { /* Hermitian: E(-k) = conj E(k) */
                int sx = l - jx, sy = (l - jy) % l;
                re = half[(size_t)sy * lh + sx][0];
                im = -half[(size_t)sy * lh + sx][1];
            }
            full[(size_t)jy * l + jx][0] = re * h2;
            full[(size_t)jy * l + jx][1] = im * h2;
        }
    double e0 = hypot(full[0][0], full[0][1]);
    for (size_t k = 0; k < (size_t)l * l; k++) pc->fft_keep[k] = hypot(full[k][0], full[k][1]) > 1e-10 * e0;
    pc->fft_n = n;
cleanup:
    if (in) fftw_free(in);
    if (half) fftw_free(half);
    if (status != SP_OK) fit_fft_free_entry(pc);
    return status;
}

int fit_render_gal_fft(const sp_fit_image *img, psf_cache_entry *pc, const fit_geom *g, const fit_box *b,
                       double *m, double *const dm[P_MAX], fit_fft_scratch *fs)
{
    int status = SP_OK;
    const int n = pc->fft_n;
    SP_CHECK(n > 0 && pc->fft_spec && b->bw <= n && b->bh <= n, SP_ERR_STATE,
             "FFT route: PSF spectrum not prepared for a %dx%d box", b->bw, b->bh);
    fftw_plan plan = c2r_plan(n);
    SP_CHECK(plan != NULL, SP_ERR_STATE, "FFT route: no plan for n = %d (sp_fit_init not called?)", n);
    const int nh = n / 2 + 1, os = pc->psf->oversamp, l = n * os;
    /* which outputs: 0 = value, 1 = d/du, 2 = d/dv, 3..5 shape, 6 = n */
    int want[7] = {1, dm[P_X] || dm[P_Y], dm[P_X] || dm[P_Y], dm[P_LNS] != NULL, dm[P_E1] != NULL,
                   dm[P_E2] != NULL, dm[P_N] != NULL && g->type == SP_SRC_SERSIC};
    size_t nspec = (size_t)n * nh, nreal = (size_t)n * n;
    if (fs->cap_spec < nspec * 7) {
        if (fs->spec) fftw_free(fs->spec);
        fs->spec = fftw_malloc(sizeof(fftw_complex) * nspec * 7);
        fs->cap_spec = fs->spec ? nspec * 7 : 0;
    }
    if (fs->cap_real < nreal) {
        if (fs->real) fftw_free(fs->real);
        fs->real = fftw_malloc(sizeof(double) * nreal);
        fs->cap_real = fs->real ? nreal : 0;
    }
    SP_CHECK(fs->spec && fs->real, SP_ERR_NOMEM, "FFT route: out of memory (n = %d)", n);
    fftw_complex *X = fs->spec;
    memset(X, 0, sizeof(fftw_complex) * nspec * 7);
    const double *a = img->aff;
    const double cu = a[0] * g->p[P_X] + a[1] * g->p[P_Y] + a[2] - b->bx0;
    const double cv = a[3] * g->p[P_X] + a[4] * g->p[P_Y] + a[5] - b->by0;
    double S0[3], dS0[3][3], Si[3], dSi[3][3];
    fit_shape_matrix(g->p[P_LNS], g->p[P_E1], g->p[P_E2], S0, dS0);
    {
        double A0 = a[0], A1 = a[1], A3 = a[3], A4 = a[4];
        const double *in[4] = {S0, dS0[0], dS0[1], dS0[2]};
        double *out[4] = {Si, dSi[0], dSi[1], dSi[2]};
        for (int t = 0; t < 4; t++) {
            const double *S = in[t];
            double m00 = A0 * S[0] + A1 * S[1], m01 = A0 * S[1] + A1 * S[2];
            double m10 = A3 * S[0] + A4 * S[1], m11 = A3 * S[1] + A4 * S[2];
            out[t][0] = m00 * A0 + m01 * A1;
            out[t][1] = m00 * A3 + m01 * A4;
            out[t][2] = m10 * A3 + m11 * A4;
        }
    }
    const gal_profile *pr = &g->prof;
    const fftw_complex *E = pc->fft_spec;
    const unsigned char *keep = pc->fft_keep;
    const double tp2 = 2.0 * M_PI * M_PI, tpi = 2.0 * M_PI;
    for (int jy = 0; jy < n; jy++) {
        for (int jx = 0; jx < nh; jx++) {
            double acc[7][2] = {{0}};
            for (int my = 0; my < os; my++) {
                int Jy = jy + n * my;
                double ky = (Jy < l / 2 ? Jy : Jy - l) / (double)n;
                for (int mx = 0; mx < os; mx++) {
                    int Jx = jx + n * mx;
                    if (Jx >= l) continue;
                    size_t J = (size_t)Jy * l + Jx;
                    if (!keep[J]) continue;
                    double kx = (Jx < l / 2 ? Jx : Jx - l) / (double)n;
                    double quad = kx * kx * Si[0] + 2.0 * kx * ky * Si[1] + ky * ky * Si[2];
                    double Gv = 0.0, Gn = 0.0, Gq = 0.0; /* sum a e, sum da e + a e (-2pi^2 dv quad), sum a v e */
                    for (int k = 0; k < pr->k; k++) {
                        double e = exp(-tp2 * pr->var[k] * quad);
                        Gv += pr->amp[k] * e;
                        Gq += pr->amp[k] * pr->var[k] * e;
                        if (want[6]) Gn += pr->damp[k] * e - pr->amp[k] * e * tp2 * pr->dvar[k] * quad;
                    }
                    /* E * phase */
                    double ph = -tpi * (kx * cu + ky * cv);
                    double cr = cos(ph), ci = sin(ph);
                    double er = E[J][0] * cr - E[J][1] * ci, ei = E[J][0] * ci + E[J][1] * cr;
                    acc[0][0] += Gv * er;
                    acc[0][1] += Gv * ei;
                    if (want[1]) { /* d/dcu: multiply by -2 pi i kx */
                        acc[1][0] += Gv * tpi * kx * ei;
                        acc[1][1] += -Gv * tpi * kx * er;
                        acc[2][0] += Gv * tpi * ky * ei;
                        acc[2][1] += -Gv * tpi * ky * er;
                    }
                    for (int p = 0; p < 3; p++) {
                        if (!want[3 + p]) continue;
                        double dq = kx * kx * dSi[p][0] + 2.0 * kx * ky * dSi[p][1] + ky * ky * dSi[p][2];
                        double f = -tp2 * dq * Gq;
                        acc[3 + p][0] += f * er;
                        acc[3 + p][1] += f * ei;
                    }
                    if (want[6]) {
                        acc[6][0] += Gn * er;
                        acc[6][1] += Gn * ei;
                    }
                }
            }
            for (int t = 0; t < 7; t++) {
                X[nspec * t + (size_t)jy * nh + jx][0] = acc[t][0];
                X[nspec * t + (size_t)jy * nh + jx][1] = acc[t][1];
            }
        }
    }
    const double norm = img->flux_scale / ((double)n * n);
    double *R = fs->real;
    double *dst[7] = {m, dm[P_X], dm[P_Y], dm[P_LNS], dm[P_E1], dm[P_E2], dm[P_N]};
    /* position outputs need both d/du and d/dv before mixing with the transform */
    double *du = NULL, *dv = NULL;
    for (int t = 0; t < 7; t++) {
        if (!want[t]) continue;
        fftw_execute_dft_c2r(plan, X + nspec * t, R);
        if (t == 1 || t == 2) {
            /* raw d/du into the dm[P_X] buffer, d/dv into dm[P_Y]; mixed by the
             * transform below (position derivatives come in pairs) */
            double *o = t == 1 ? dm[P_X] : dm[P_Y];
            if (!o) continue;
            for (int r = 0; r < b->bh; r++)
                for (int c = 0; c < b->bw; c++) o[(size_t)r * b->bw + c] = R[(size_t)r * n + c] * norm;
            if (t == 1) du = o;
            else dv = o;
            continue;
        }
        double *o = dst[t];
        if (!o) continue;
        for (int r = 0; r < b->bh; r++)
            for (int c = 0; c < b->bw; c++) o[(size_t)r * b->bw + c] = R[(size_t)r * n + c] * norm;
    }
    if (du && dv) {
        const size_t np = (size_t)b->bw * b->bh;
        for (size_t k = 0; k < np; k++) {
            double gu = du[k], gv = dv[k];
            du[k] = a[0] * gu + a[3] * gv;
            dv[k] = a[1] * gu + a[4] * gv;
        }
    }
cleanup:
    return status;
}

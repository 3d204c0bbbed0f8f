/* fit_psfmix.c — a K-Gaussian mixture approximation of an ePSF, for the
 * analytic galaxy convolution route (SP_FIT_CONV_GMIX).
 *
 * The ePSF stamp samples the pixel-convolved PSF, so a mixture fitted to it
 * convolves with a galaxy mixture analytically and the product is evaluated
 * at pixel centres — no pixel integration needed. The amplitudes are linear
 * (solved exactly at each step: variable projection); means and Cholesky
 * factors of the covariances take Levenberg-Marquardt steps. Samples have
 * uniform weight (absolute error), so the core, which carries the flux
 * information, is matched best; the amplitudes are NOT renormalised to unit
 * sum, so that a mixture missing some of the far wing still reproduces the
 * core at the right level (fluxes stay unbiased where the data constrain them).
 */
#include "fit_internal.h"

#include "surveyproc/sp_error.h"

#include <cblas.h>
#include <lapacke.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

uint64_t fit_psf_hash(const sp_psf *psf)
{
    /* every sample, word-wise (a few microseconds for a 97x97 stamp) */
    const size_t n = (size_t)psf->size * (size_t)psf->size;
    uint64_t h = 0x9E3779B97F4A7C15ULL ^ ((uint64_t)psf->size << 8 | (uint64_t)psf->oversamp);
    const float *d = psf->data;
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &d[i], sizeof u);
        h = (h ^ u) * 0x100000001B3ULL;
        h ^= h >> 29;
    }
    return h;
}

/* Small dense SPD solve in place (column-major == row-major for symmetric).
 * Returns 0 on success. */
static int spd_solve(int n, double *a, double *b)
{
    if (LAPACKE_dpotrf_work(LAPACK_COL_MAJOR, 'L', n, a, n) != 0) return -1;
    if (LAPACKE_dpotrs_work(LAPACK_COL_MAJOR, 'L', n, 1, a, n, b, n) != 0) return -1;
    return 0;
}

/* res = e - G^T amp (G: k rows of ns samples); returns |res|^2. */
static double residual(int k, int ns, const double *restrict g, const double *restrict e, const double *amp,
                       double *restrict res)
{
    memcpy(res, e, sizeof(double) * (size_t)ns);
    for (int c = 0; c < k; c++) {
        const double a = amp[c];
        const double *restrict gc = g + (size_t)c * ns;
#pragma omp simd
        for (int s = 0; s < ns; s++) res[s] -= a * gc[s];
    }
    double chi2 = 0.0;
#pragma omp simd reduction(+ : chi2)
    for (int s = 0; s < ns; s++) chi2 += res[s] * res[s];
    return chi2;
}

typedef struct {
    int k;
    double mx[PSFMIX_MAXK], my[PSFMIX_MAXK], l1[PSFMIX_MAXK], l2[PSFMIX_MAXK], l3[PSFMIX_MAXK];
} mixpar;

/* Evaluate the unit-amplitude components g[c][s] at the samples (and their
 * derivatives if jac != NULL: jac[(c*5+p)][s]). One tight loop per component
 * over the contiguous samples (the branch-free exp of fit_internal.h, plain
 * selects), built for AVX2 / AVX-512 too and dispatched at run time. */
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) static void
mix_eval(const mixpar *mp, int ns, const double *restrict sx, const double *restrict sy, double *restrict g,
         double *restrict jac)
{
    for (int c = 0; c < mp->k; c++) {
        const double L11 = exp(mp->l1[c]), L21 = mp->l2[c], L22 = exp(mp->l3[c]);
        const double cxx = L11 * L11, cxy = L11 * L21, cyy = L21 * L21 + L22 * L22;
        const double det = cxx * cyy - cxy * cxy;
        const double ixx = cyy / det, ixy = -cxy / det, iyy = cxx / det;
        const double norm = 1.0 / (2.0 * M_PI * sqrt(det));
        const double mx = mp->mx[c], my = mp->my[c];
        double *restrict gc = g + (size_t)c * ns;
        if (!jac) {
#pragma omp simd
            for (int s = 0; s < ns; s++) {
                const double dx = sx[s] - mx, dy = sy[s] - my;
                const double q = dx * (ixx * dx + ixy * dy) + dy * (ixy * dx + iyy * dy);
                const double y = q < 80.0 ? -0.5 * q : -40.0;
                const double e = norm * fit_exp_neg(y);
                gc[s] = q < 80.0 ? e : 0.0;
            }
            continue;
        }
        /* dC/dl: rows l1, l2, l3; columns xx, xy, yy; folded with the 1/2 of
         * d ln N / dC = (G G^T - C^-1) / 2 */
        const double a00 = cxx, a01 = cxy, a12 = L22 * L22;
        double *restrict j0 = jac + (size_t)(c * 5) * ns, *restrict j1 = j0 + ns, *restrict j2 = j1 + ns,
                         *restrict j3 = j2 + ns, *restrict j4 = j3 + ns;
#pragma omp simd
        for (int s = 0; s < ns; s++) {
            const double dx = sx[s] - mx, dy = sy[s] - my;
            const double Gx = ixx * dx + ixy * dy, Gy = ixy * dx + iyy * dy;
            const double q = dx * Gx + dy * Gy;
            const double y = q < 80.0 ? -0.5 * q : -40.0;
            const double e = norm * fit_exp_neg(y);
            const double v = q < 80.0 ? e : 0.0;
            gc[s] = v;
            j0[s] = v * Gx;
            j1[s] = v * Gy;
            const double mxx = Gx * Gx - ixx, mxy = Gx * Gy - ixy, myy = Gy * Gy - iyy;
            /* 0.5 v (mxx dC[p][0] + 2 mxy dC[p][1] + myy dC[p][2]) with
             * dC = {{2 cxx, cxy, 0}, {0, L11, 2 L21}, {0, 0, 2 L22^2}} */
            j2[s] = v * (mxx * a00 + mxy * a01);
            j3[s] = v * (mxy * L11 + myy * L21);
            j4[s] = v * (myy * a12);
        }
    }
}

/* Linear amplitudes for given components: min |e - G^T a|^2. Returns chi2.
 * G (k rows of ns samples) is column-major ns x k for BLAS: A = G^T G by
 * dsyrk, b = G^T e by dgemv (single-threaded inside the fitter's threads;
 * the same call on the same inputs gives the same bits). res: ns scratch. */
static double solve_amps(int k, int ns, const double *g, const double *e, double *amp, double *res)
{
    double A[PSFMIX_MAXK * PSFMIX_MAXK], b[PSFMIX_MAXK];
    cblas_dsyrk(CblasColMajor, CblasLower, CblasTrans, k, ns, 1.0, g, ns, 0.0, A, k);
    cblas_dgemv(CblasColMajor, CblasTrans, ns, k, 1.0, g, ns, e, 1, 0.0, b, 1);
    for (int i = 0; i < k; i++)
        for (int j = 0; j < i; j++) A[i * k + j] = A[j * k + i]; /* lower (col-major) -> full */
    double tr = 0.0;
    for (int i = 0; i < k; i++) tr += A[i * k + i];
    for (int i = 0; i < k; i++) A[i * k + i] += 1e-12 * tr; /* components may coincide */
    if (spd_solve(k, A, b) != 0) return INFINITY;
    memcpy(amp, b, sizeof(double) * (size_t)k);
    return residual(k, ns, g, e, amp, res);
}

static int grow(double **buf, size_t *cap, size_t n)
{
    if (n <= *cap) return 0;
    double *nb = realloc(*buf, n * sizeof(double));
    if (!nb) return -1;
    *buf = nb;
    *cap = n;
    return 0;
}

static int fit_mix_k(const sp_psf *psf, int k, psf_mix *out, double **scratch, size_t *scratch_cap)
{
    int status = SP_OK;
    if (k < 1) k = 1;
    if (k > PSFMIX_MAXK) k = PSFMIX_MAXK;
    const int size = psf->size, os = psf->oversamp;
    const double c0 = 0.5 * (size - 1);
    int st = (size + 39) / 40; /* stride: at most ~40x40 samples (0.75 px for a 97-sample stamp at x4) */
    int n1 = (size + st - 1) / st;
    int ns = n1 * n1;
    int np = 5 * k;
    const int ntot = np + k;
    size_t need = (size_t)ns * (3 + k + (size_t)np) + (size_t)ntot * (ntot + 2) + (size_t)k * ns + 16;
    SP_CHECK(grow(scratch, scratch_cap, need) == 0, SP_ERR_NOMEM, "PSF mixture: out of memory (%zu doubles)", need);
    double *sx = *scratch, *sy = sx + ns, *e = sy + ns, *g = e + ns, *jac = g + (size_t)k * ns;
    double *H = jac + (size_t)np * ns, *rhs = H + (size_t)ntot * ntot, *gt = rhs + ntot;
    double *gtrial = gt + ntot;
    double peak = 0.0, sum = 0.0, mx = 0.0, my = 0.0;
    int s = 0;
    for (int j = 0; j < size; j += st)
        for (int i = 0; i < size; i += st) {
            sx[s] = (i - c0) / os;
            sy[s] = (j - c0) / os;
            e[s] = psf->data[(size_t)j * size + i];
            if (e[s] > peak) peak = e[s];
            sum += e[s];
            mx += e[s] * sx[s];
            my += e[s] * sy[s];
            s++;
        }
    SP_CHECK(peak > 0.0 && sum > 0.0, SP_ERR_NUMERIC, "PSF mixture: the PSF stamp has no positive values");
    mx /= sum;
    my /= sum;
    double cx, cy, fwhm;
    sp_psf_moments(psf, &cx, &cy, &fwhm);
    double sig0 = fwhm > 0.3 ? fwhm / 2.3548 : 1.0;
    static const double fac[PSFMIX_MAXK] = {0.6, 0.95, 1.5, 2.5, 4.0, 6.5};
    mixpar mp = {.k = k}, trial;
    for (int c = 0; c < k; c++) {
        mp.mx[c] = mx;
        mp.my[c] = my;
        mp.l1[c] = mp.l3[c] = log(sig0 * (k == 1 ? 1.0 : fac[c]));
        mp.l2[c] = 0.0;
    }
    double amp[PSFMIX_MAXK];
    mix_eval(&mp, ns, sx, sy, g, jac);
    double chi2 = solve_amps(k, ns, g, e, amp, gtrial);
    /* Gauss-Newton / LM on amplitudes and shapes jointly (the amplitudes are
     * then re-solved exactly: variable projection). Joint steps converge
     * quadratically; alternating ones (shapes with the amplitudes frozen)
     * crawl. */
    const int nt = np + k; /* unknowns: k amplitudes, then 5 per component */
    double lambda = 1e-3;
    int done = 0;
    for (int it = 0; it < 60 && !done && isfinite(chi2); it++) {
        /* columns of the Jacobian J (ns x nt, column-major, contiguous):
         * g_c (amplitudes), then amp_c x the shape derivatives */
        for (int p = 0; p < np; p++) {
            const double a = amp[p / 5];
            double *restrict jp = jac + (size_t)p * ns;
#pragma omp simd
            for (int t = 0; t < ns; t++) jp[t] *= a;
        }
        (void)residual(k, ns, g, e, amp, gtrial);
        /* H = J^T J, gt = J^T r (BLAS: the J^T J was ~75% of this fit as scalar loops) */
        cblas_dsyrk(CblasColMajor, CblasLower, CblasTrans, nt, ns, 1.0, g, ns, 0.0, H, nt);
        cblas_dgemv(CblasColMajor, CblasTrans, ns, nt, 1.0, g, ns, gtrial, 1, 0.0, gt, 1);
        for (int p = 0; p < nt; p++)
            for (int q = 0; q < p; q++) H[p * nt + q] = H[q * nt + p];
        int accepted = 0;
        for (int tries = 0; tries < 12 && !accepted; tries++) {
            double Hd[(PSFMIX_MAXK * 6) * (PSFMIX_MAXK * 6)];
            memcpy(Hd, H, sizeof(double) * (size_t)nt * nt);
            for (int p = 0; p < nt; p++) {
                Hd[p * nt + p] = H[p * nt + p] * (1.0 + lambda) + 1e-30;
                rhs[p] = gt[p];
            }
            if (spd_solve(nt, Hd, rhs) != 0) {
                lambda *= 10.0;
                continue;
            }
            trial = mp;
            for (int c = 0; c < k; c++) {
                double *d = rhs + k + 5 * c;
                trial.mx[c] += fmax(fmin(d[0], 1.0), -1.0);
                trial.my[c] += fmax(fmin(d[1], 1.0), -1.0);
                /* keep every width within [0.05, 50] px */
                trial.l1[c] = fmin(fmax(trial.l1[c] + fmax(fmin(d[2], 1.0), -1.0), log(0.05)), log(50.0));
                trial.l2[c] += fmax(fmin(d[3], 1.0), -1.0);
                trial.l3[c] = fmin(fmax(trial.l3[c] + fmax(fmin(d[4], 1.0), -1.0), log(0.05)), log(50.0));
            }
            double at[PSFMIX_MAXK];
            mix_eval(&trial, ns, sx, sy, g, NULL);
            double c2 = solve_amps(k, ns, g, e, at, gtrial);
            if (isfinite(c2) && c2 < chi2) {
                double rel = (chi2 - c2) / chi2;
                mp = trial;
                memcpy(amp, at, sizeof amp);
                chi2 = c2;
                lambda = fmax(lambda * 0.2, 1e-9);
                accepted = 1;
                if (rel < 1e-6) done = 1;
            } else {
                lambda *= 10.0;
            }
        }
        if (!accepted) break;
        mix_eval(&mp, ns, sx, sy, g, jac);
    }
    SP_CHECK(isfinite(chi2), SP_ERR_NUMERIC, "PSF mixture fit failed (non-finite)");
    out->k = k;
    for (int c = 0; c < k; c++) {
        double L11 = exp(mp.l1[c]), L21 = mp.l2[c], L22 = exp(mp.l3[c]);
        out->amp[c] = amp[c];
        out->mx[c] = mp.mx[c];
        out->my[c] = mp.my[c];
        out->cxx[c] = L11 * L11;
        out->cxy[c] = L11 * L21;
        out->cyy[c] = L21 * L21 + L22 * L22;
    }
    out->rms_resid = sqrt(chi2 / ns) / peak;
cleanup:
    return status;
}

/* The mixture's amplitudes are free (linear): on a noisy or oddly shaped ePSF
 * two components can become near-duplicates whose amplitudes grow large with
 * opposite signs. Such a mixture matches the stamp but convolves a galaxy into
 * a model whose norm is nonsense (fluxes ~0 with tiny errors, measured on an
 * empirical ePSF of faint stars). A mixture is kept when its amplitudes sum to
 * 0.5 .. 1.5 and cancel little (sum |a| <= 2 sum a); otherwise one component
 * fewer is fitted, down to a single Gaussian. */
int fit_psf_mixture(const sp_psf *psf, int k, psf_mix *out, double **scratch, size_t *scratch_cap)
{
    int status = SP_OK;
    if (k < 1) k = 1;
    if (k > PSFMIX_MAXK) k = PSFMIX_MAXK;
    for (int kk = k; kk >= 1; kk--) {
        status = fit_mix_k(psf, kk, out, scratch, scratch_cap);
        if (status != SP_OK) {
            if (kk > 1) {
                sp_err_clear();
                continue;
            }
            return status;
        }
        double sa = 0.0, sabs = 0.0;
        for (int c = 0; c < out->k; c++) {
            sa += out->amp[c];
            sabs += fabs(out->amp[c]);
        }
        if ((sa >= 0.5 && sa <= 1.5 && sabs <= 2.0 * sa) || kk == 1) return SP_OK;
    }
    return status;
}

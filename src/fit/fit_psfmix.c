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

typedef struct {
    int k;
    double mx[PSFMIX_MAXK], my[PSFMIX_MAXK], l1[PSFMIX_MAXK], l2[PSFMIX_MAXK], l3[PSFMIX_MAXK];
} mixpar;

/* Evaluate the unit-amplitude components g[c][s] at the samples (and their
 * derivatives if jac != NULL: jac[(c*5+p)][s]). */
static void mix_eval(const mixpar *mp, int ns, const double *sx, const double *sy, double *g, double *jac)
{
    for (int c = 0; c < mp->k; c++) {
        double L11 = exp(mp->l1[c]), L21 = mp->l2[c], L22 = exp(mp->l3[c]);
        double cxx = L11 * L11, cxy = L11 * L21, cyy = L21 * L21 + L22 * L22;
        double det = cxx * cyy - cxy * cxy;
        double ixx = cyy / det, ixy = -cxy / det, iyy = cxx / det;
        double norm = 1.0 / (2.0 * M_PI * sqrt(det));
        /* dC/dl: rows l1, l2, l3; columns xx, xy, yy */
        double dC[3][3] = {{2 * cxx, cxy, 0.0}, {0.0, L11, 2 * L21}, {0.0, 0.0, 2 * L22 * L22}};
        double *gc = g + (size_t)c * ns;
        for (int s = 0; s < ns; s++) {
            double dx = sx[s] - mp->mx[c], dy = sy[s] - mp->my[c];
            double Gx = ixx * dx + ixy * dy, Gy = ixy * dx + iyy * dy;
            double q = dx * Gx + dy * Gy;
            double v = q < 80.0 ? norm * exp(-0.5 * q) : 0.0;
            gc[s] = v;
            if (jac) {
                double *j0 = jac + (size_t)(c * 5) * ns;
                j0[s] = v * Gx;
                j0[ns + s] = v * Gy;
                double mxx = Gx * Gx - ixx, mxy = Gx * Gy - ixy, myy = Gy * Gy - iyy;
                for (int p = 0; p < 3; p++)
                    j0[(size_t)(2 + p) * ns + s] = 0.5 * v * (mxx * dC[p][0] + 2.0 * mxy * dC[p][1] + myy * dC[p][2]);
            }
        }
    }
}

/* Linear amplitudes for given components: min |e - G^T a|^2. Returns chi2. */
static double solve_amps(int k, int ns, const double *g, const double *e, double *amp)
{
    double A[PSFMIX_MAXK * PSFMIX_MAXK], b[PSFMIX_MAXK];
    for (int i = 0; i < k; i++) {
        b[i] = 0.0;
        for (int s = 0; s < ns; s++) b[i] += g[(size_t)i * ns + s] * e[s];
        for (int j = 0; j <= i; j++) {
            double v = 0.0;
            for (int s = 0; s < ns; s++) v += g[(size_t)i * ns + s] * g[(size_t)j * ns + s];
            A[i * k + j] = A[j * k + i] = v;
        }
    }
    double tr = 0.0;
    for (int i = 0; i < k; i++) tr += A[i * k + i];
    for (int i = 0; i < k; i++) A[i * k + i] += 1e-12 * tr; /* components may coincide */
    if (spd_solve(k, A, b) != 0) return INFINITY;
    double chi2 = 0.0;
    for (int s = 0; s < ns; s++) {
        double m = 0.0;
        for (int i = 0; i < k; i++) m += b[i] * g[(size_t)i * ns + s];
        chi2 += (e[s] - m) * (e[s] - m);
    }
    memcpy(amp, b, sizeof(double) * (size_t)k);
    return chi2;
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
    double chi2 = solve_amps(k, ns, g, e, amp);
    /* Gauss-Newton / LM on amplitudes and shapes jointly (the amplitudes are
     * then re-solved exactly: variable projection). Joint steps converge
     * quadratically; alternating ones (shapes with the amplitudes frozen)
     * crawl. */
    const int nt = np + k; /* unknowns: k amplitudes, then 5 per component */
    double lambda = 1e-3;
    int done = 0;
    for (int it = 0; it < 60 && !done && isfinite(chi2); it++) {
        for (int p = 0; p < np; p++) {
            int c = p / 5;
            double *jp = jac + (size_t)p * ns;
            for (int t = 0; t < ns; t++) jp[t] *= amp[c];
        }
        for (int t = 0; t < ns; t++) {
            double m = 0.0;
            for (int c = 0; c < k; c++) m += amp[c] * g[(size_t)c * ns + t];
            gtrial[t] = e[t] - m; /* the residual */
        }
        /* columns: g_c (amplitudes) then jac_p */
        for (int p = 0; p < nt; p++) {
            const double *jp = p < k ? g + (size_t)p * ns : jac + (size_t)(p - k) * ns;
            double v = 0.0;
            for (int t = 0; t < ns; t++) v += jp[t] * gtrial[t];
            gt[p] = v;
            for (int q = 0; q <= p; q++) {
                const double *jq = q < k ? g + (size_t)q * ns : jac + (size_t)(q - k) * ns;
                double a = 0.0;
                for (int t = 0; t < ns; t++) a += jp[t] * jq[t];
                H[p * nt + q] = H[q * nt + p] = a;
            }
        }
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
            double c2 = solve_amps(k, ns, g, e, at);
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

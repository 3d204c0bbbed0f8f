/* prep.c — frame scaling, masks, noise model, coadd and white stack (see sp_prep.h). */
#include "surveyproc/sp_prep.h"
#include "surveyproc/sp_error.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* The k-th smallest of a[0..n-1] (0-based; a is reordered): Hoare's quickselect with a
 * median-of-three pivot, O(n) on average. Returns exactly the value a full sort would put at
 * a[k], so the sky estimate is the same as with qsort, ~10x cheaper on the 20,000-sample
 * subsample (the sky estimate was most of the prep time). */
static float select_k(float *a, size_t n, size_t k)
{
    size_t lo = 0, hi = n - 1;
    while (hi > lo) {
        size_t mid = lo + (hi - lo) / 2;
        /* order a[lo], a[mid], a[hi]; the median goes to a[mid] */
        if (a[mid] < a[lo]) { float t = a[mid]; a[mid] = a[lo]; a[lo] = t; }
        if (a[hi] < a[lo]) { float t = a[hi]; a[hi] = a[lo]; a[lo] = t; }
        if (a[hi] < a[mid]) { float t = a[hi]; a[hi] = a[mid]; a[mid] = t; }
        float piv = a[mid];
        size_t i = lo, j = hi;
        for (;;) {
            while (a[i] < piv) i++;
            while (piv < a[j]) j--;
            if (i >= j) break;
            float t = a[i]; a[i] = a[j]; a[j] = t;
            i++;
            j--;
        }
        /* now a[lo..j] <= piv <= a[j+1..hi] */
        if (k <= j) hi = j;
        else lo = j + 1;
    }
    return a[k];
}

/* Sigma-clipped median of a subsample of good pixels (deterministic stride). */
static double robust_sky(const float *raw, const uint8_t *mask, size_t npix)
{
    size_t stride = npix / 20000 + 1, n = 0;
    float *s = malloc((npix / stride + 1) * sizeof *s);
    float *d = malloc((npix / stride + 1) * sizeof *d);
    double med = NAN;
    if (!s || !d) goto done;
    for (size_t i = 0; i < npix; i += stride)
        if (!mask[i]) s[n++] = raw[i];
    for (int it = 0; it < 5 && n > 0; it++) {
        memcpy(d, s, n * sizeof *d);
        med = select_k(d, n, n / 2);
        /* robust sigma from the MAD */
        for (size_t k = 0; k < n; k++) d[k] = fabsf(s[k] - (float)med);
        double sig = 1.4826 * select_k(d, n, n / 2);
        if (!(sig > 0)) break;
        size_t m = 0;
        for (size_t k = 0; k < n; k++)
            if (fabs(s[k] - med) <= 3.0 * sig) s[m++] = s[k];
        if (m == n) break;
        n = m;
    }
done:
    free(s);
    free(d);
    return med;
}

int sp_prep_frame(const float *raw, size_t npix, const sp_prep_params *p, float *data, uint8_t *mask,
                  double *sky_raw, int nthreads)
{
    const double sat = (p->saturate > 0 && isfinite(p->saturate)) ? p->saturate * p->sat_level_frac : INFINITY;
    const float scale = (float)p->scale;
#pragma omp parallel for schedule(static) num_threads(nthreads > 0 ? nthreads : 1)
    for (size_t i = 0; i < npix; i++) {
        float r = raw[i];
        uint8_t m = 0;
        if (!isfinite(r)) m = SP_PIX_BAD;
        else if ((double)r >= sat) m = SP_PIX_SAT;
        mask[i] = m;
        data[i] = m ? 0.0f : r * scale;
    }
    if (sky_raw) *sky_raw = robust_sky(raw, mask, npix);
    return SP_OK;
}

int sp_prep_ivar(const float *data, const uint8_t *mask, size_t npix, const sp_prep_params *p, double sky_raw,
                 const float *bkg, float *ivar, int nthreads)
{
    const double s2 = p->scale * p->scale, var_sky = p->skysig * p->skysig;
    const double inv_gain = p->egain > 0 ? 1.0 / p->egain : 0.0;
    const double sky_scaled = isfinite(sky_raw) ? sky_raw * p->scale : 0.0;
    if (!(var_sky > 0)) return SP_FAIL(SP_ERR_INPUT, "SKYSIG must be > 0 (got %g)", p->skysig);
    /* var = (SKYSIG^2 + max(raw - sky, 0) / EGAIN) scale^2 = A + B max(data - bkg, 0) in scaled
     * units: one division per pixel, branch-free, so the loop vectorises */
    const float A = (float)(var_sky * s2), B = (float)(inv_gain * p->scale), sky_f = (float)sky_scaled;
#pragma omp parallel for schedule(static) num_threads(nthreads > 0 ? nthreads : 1)
    for (size_t i = 0; i < npix; i++) {
        float b = bkg ? bkg[i] : sky_f;
        float v = A + B * fmaxf(data[i] - b, 0.0f);
        ivar[i] = mask[i] ? 0.0f : 1.0f / v;
    }
    return SP_OK;
}

int sp_prep_coadd(int nf, const float *const *data, const float *const *ivar, const uint8_t *const *mask,
                  const double *wsky, size_t npix, float *out_data, float *out_ivar, uint8_t *out_mask,
                  int nthreads)
{
    if (nf < 1) return SP_FAIL(SP_ERR_INTERNAL, "coadd of %d frames", nf);
#pragma omp parallel for schedule(static) num_threads(nthreads > 0 ? nthreads : 1)
    for (size_t i = 0; i < npix; i++) {
        double sw = 0, swd = 0, sw2v = 0;
        uint8_t sat = 0, allbad = SP_PIX_BAD;
        for (int k = 0; k < nf; k++) {
            sat |= mask[k][i] & SP_PIX_SAT;
            if (ivar[k][i] <= 0) continue;
            allbad = 0;
            double w = wsky[k];
            sw += w;
            swd += w * data[k][i];
            sw2v += w * w / ivar[k][i];
        }
        if (sw > 0) {
            out_data[i] = (float)(swd / sw);
            out_ivar[i] = (float)(sw * sw / sw2v);
            out_mask[i] = sat;
        } else {
            out_data[i] = 0.0f;
            out_ivar[i] = 0.0f;
            out_mask[i] = (uint8_t)(allbad | sat);
        }
    }
    return SP_OK;
}

int sp_prep_white(int nb, const float *const *data, const float *const *ivar, size_t nx, size_t ny, float *out,
                  float *out_ivar, int nthreads)
{
    if (nb < 1) return SP_FAIL(SP_ERR_INTERNAL, "white stack of %d bands", nb);
    /* row chunks over threads: each row is independent, so any split gives the same bytes */
#pragma omp parallel for schedule(static) num_threads(nthreads > 0 ? nthreads : 1)
    for (size_t y = 0; y < ny; y++) {
        for (size_t x = 0; x < nx; x++) {
            size_t i = y * nx + x;
            double sw = 0, swd = 0;
            for (int b = 0; b < nb; b++) {
                double w = ivar[b][i];
                if (w <= 0) continue;
                sw += w;
                swd += w * data[b][i];
            }
            out[i] = sw > 0 ? (float)(swd / sw) : 0.0f;
            out_ivar[i] = (float)sw;
        }
    }
    return SP_OK;
}

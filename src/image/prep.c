/* prep.c — frame scaling, masks, noise model, coadd and white stack (see sp_prep.h). */
#include "surveyproc/sp_prep.h"
#include "surveyproc/sp_error.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static int cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* Sigma-clipped median of a subsample of good pixels (deterministic stride). */
static double robust_sky(const float *raw, const uint8_t *mask, size_t npix)
{
    size_t stride = npix / 20000 + 1, n = 0;
    float *s = malloc((npix / stride + 1) * sizeof *s);
    if (!s) return NAN;
    for (size_t i = 0; i < npix; i += stride)
        if (!mask[i]) s[n++] = raw[i];
    double med = NAN;
    for (int it = 0; it < 5 && n > 0; it++) {
        qsort(s, n, sizeof *s, cmp_float);
        med = s[n / 2];
        /* robust sigma from the MAD */
        float *d = malloc(n * sizeof *d);
        if (!d) break;
        for (size_t k = 0; k < n; k++) d[k] = fabsf(s[k] - (float)med);
        qsort(d, n, sizeof *d, cmp_float);
        double sig = 1.4826 * d[n / 2];
        free(d);
        if (!(sig > 0)) break;
        size_t m = 0;
        for (size_t k = 0; k < n; k++)
            if (fabs(s[k] - med) <= 3.0 * sig) s[m++] = s[k];
        if (m == n) break;
        n = m;
    }
    free(s);
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
#pragma omp parallel for schedule(static) num_threads(nthreads > 0 ? nthreads : 1)
    for (size_t i = 0; i < npix; i++) {
        if (mask[i]) {
            ivar[i] = 0.0f;
            continue;
        }
        double b = bkg ? (double)bkg[i] : sky_scaled;
        double src_raw = ((double)data[i] - b) / p->scale;
        double var = (var_sky + (src_raw > 0 ? src_raw * inv_gain : 0.0)) * s2;
        ivar[i] = (float)(1.0 / var);
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

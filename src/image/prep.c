/* prep.c — frame scaling, masks, noise model, coadd and white stack (see sp_prep.h). */
#include "surveyproc/sp_prep.h"
#include "surveyproc/sp_background.h"
#include "surveyproc/sp_error.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Order-preserving map of a float to an unsigned key (and back), for a radix sort. */
static inline uint32_t fkey(float v)
{
    uint32_t u;
    memcpy(&u, &v, 4);
    return u ^ ((uint32_t)((int32_t)u >> 31) | 0x80000000u);
}
static inline float kfloat(uint32_t k)
{
    uint32_t u = k ^ (((k >> 31) - 1u) | 0x80000000u);
    float v;
    memcpy(&v, &u, 4);
    return v;
}

/* sp_background.h */
void sp_sort_f32(float *a, uint32_t *k0, uint32_t *k1, size_t n)
{
    static const int shift[3] = {0, 11, 22};
    size_t cnt[3][2048];
    memset(cnt, 0, sizeof cnt);
    for (size_t i = 0; i < n; i++) {
        uint32_t k = fkey(a[i]);
        k0[i] = k;
        cnt[0][k & 2047]++;
        cnt[1][(k >> 11) & 2047]++;
        cnt[2][k >> 22]++;
    }
    uint32_t *src = k0, *dst = k1;
    for (int p = 0; p < 3; p++) {
        size_t sum = 0;
        for (int b = 0; b < 2048; b++) {
            size_t c = cnt[p][b];
            cnt[p][b] = sum;
            sum += c;
        }
        for (size_t i = 0; i < n; i++) {
            uint32_t k = src[i];
            dst[cnt[p][(k >> shift[p]) & 2047]++] = k;
        }
        uint32_t *t = src;
        src = dst;
        dst = t;
    }
    for (size_t i = 0; i < n; i++) a[i] = kfloat(src[i]);
}

/* Sigma-clipped median of a subsample of good pixels (deterministic stride): up to 5
 * rounds of median, sigma = 1.4826 MAD, keep |s - median| <= 3 sigma. The values are
 * those of the definition with a selection per round (tests/unit/test_prep.c keeps
 * that definition and compares bit for bit), computed on the subsample sorted once:
 * the kept set of a round is a contiguous range of the sorted samples (|s - med| is
 * monotone on each side of the median, also in rounded arithmetic), its median is the
 * middle element and its MAD the (n/2)-th of two sorted runs of deviations, merged. */
static double robust_sky(const float *raw, const uint8_t *mask, size_t npix)
{
    size_t stride = npix / 20000 + 1, n = 0, cap = npix / stride + 1;
    float *s = malloc(cap * sizeof *s);
    uint32_t *k = malloc(2 * cap * sizeof *k);
    double med = NAN;
    if (!s || !k) goto done;
    for (size_t i = 0; i < npix; i += stride)
        if (!mask[i]) s[n++] = raw[i];
    sp_sort_f32(s, k, k + cap, n);
    size_t lo = 0, hi = n;
    for (int it = 0; it < 5 && hi > lo; it++) {
        size_t m = hi - lo, mid = lo + m / 2;
        med = s[mid];
        const float medf = (float)med;
        /* MAD: the (m/2)-th smallest deviation of the two runs, both non-decreasing:
         * L[j] = |s[mid-1-j] - med| (j < mid - lo) and R[j] = |s[mid+j] - med| (j < hi - mid);
         * binary search for how many of the first m/2 + 1 come from L */
        const size_t nl = mid - lo, nr = hi - mid, take = m / 2 + 1;
        size_t ia = take > nr ? take - nr : 0, ib = take < nl ? take : nl, i = 0;
#define L_(j) fabsf(s[mid - 1 - (j)] - medf)
#define R_(j) fabsf(s[mid + (j)] - medf)
        for (;;) {
            i = ia + (ib - ia) / 2;
            size_t j = take - i;
            if (i > 0 && j < nr && L_(i - 1) > R_(j)) ib = i - 1;
            else if (j > 0 && i < nl && R_(j - 1) > L_(i)) ia = i + 1;
            else break;
        }
        float dk = 0.0f;
        if (i > 0) dk = L_(i - 1);
        if (take - i > 0 && R_(take - i - 1) > dk) dk = R_(take - i - 1);
#undef L_
#undef R_
        double sig = 1.4826 * dk;
        if (!(sig > 0)) break;
        size_t nlo = lo, nhi = hi;
        while (nlo < nhi && !(fabs(s[nlo] - med) <= 3.0 * sig)) nlo++;
        while (nhi > nlo && !(fabs(s[nhi - 1] - med) <= 3.0 * sig)) nhi--;
        if (nhi - nlo == m) break;
        lo = nlo;
        hi = nhi;
    }
done:
    free(s);
    free(k);
    return med;
}

/* The per-pixel kernels, compiled for AVX2 and for the baseline (picked at load time;
 * IEEE single-precision results are the same either way: no FMA contraction in ISO C). */
#define SP_KERNEL __attribute__((target_clones("avx2", "default")))

SP_KERNEL static void frame_kernel(const float *restrict raw, size_t n, float satf, float scale,
                                   float *restrict data, uint8_t *restrict mask)
{
    for (size_t i = 0; i < n; i++) {
        float r = raw[i];
        uint32_t u;
        memcpy(&u, &r, 4);
        /* exponent all ones: NaN or Inf */
        uint32_t bad = (u & 0x7F800000u) == 0x7F800000u;
        uint32_t sat = (r >= satf) & !bad;
        float d = r * scale;
        uint32_t db;
        memcpy(&db, &d, 4);
        db &= (bad | sat) - 1u; /* masked -> +0 (bit masks, not branches: the loop vectorises) */
        memcpy(&data[i], &db, 4);
        mask[i] = (uint8_t)(bad * SP_PIX_BAD + sat * SP_PIX_SAT);
    }
}

SP_KERNEL static void ivar_kernel(const float *restrict data, const uint8_t *restrict mask, const float *restrict bkg,
                                  float sky_f, size_t n, float A, float B, float *restrict ivar)
{
    if (bkg)
        for (size_t i = 0; i < n; i++) {
            float t = data[i] - bkg[i];
            t = t > 0.0f ? t : 0.0f;
            float q = 1.0f / (A + B * t);
            uint32_t qb;
            memcpy(&qb, &q, 4);
            qb &= (uint32_t)(mask[i] != 0) - 1u; /* masked -> +0 */
            memcpy(&ivar[i], &qb, 4);
        }
    else
        for (size_t i = 0; i < n; i++) {
            float t = data[i] - sky_f;
            t = t > 0.0f ? t : 0.0f;
            float q = 1.0f / (A + B * t);
            uint32_t qb;
            memcpy(&qb, &q, 4);
            qb &= (uint32_t)(mask[i] != 0) - 1u; /* masked -> +0 */
            memcpy(&ivar[i], &qb, 4);
        }
}

/* pixels per OpenMP work item: any split gives the same bytes (every pixel is independent) */
#define PREP_CHUNK 16384

int sp_prep_frame(const float *raw, size_t npix, const sp_prep_params *p, float *data, uint8_t *mask,
                  double *sky_raw, int nthreads)
{
    const double sat = (p->saturate > 0 && isfinite(p->saturate)) ? p->saturate * p->sat_level_frac : INFINITY;
    /* (double)r >= sat  <=>  r >= satf, satf the smallest float >= sat */
    float satf = (float)sat;
    if ((double)satf < sat) satf = nextafterf(satf, INFINITY);
    const float scale = (float)p->scale;
    long nchunk = (long)((npix + PREP_CHUNK - 1) / PREP_CHUNK);
#pragma omp parallel for schedule(static) num_threads(nthreads > 0 ? nthreads : 1) if (nthreads > 1)
    for (long c = 0; c < nchunk; c++) {
        size_t i0 = (size_t)c * PREP_CHUNK, n = npix - i0 < PREP_CHUNK ? npix - i0 : PREP_CHUNK;
        frame_kernel(raw + i0, n, satf, scale, data + i0, mask + i0);
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
    long nchunk = (long)((npix + PREP_CHUNK - 1) / PREP_CHUNK);
#pragma omp parallel for schedule(static) num_threads(nthreads > 0 ? nthreads : 1) if (nthreads > 1)
    for (long c = 0; c < nchunk; c++) {
        size_t i0 = (size_t)c * PREP_CHUNK, n = npix - i0 < PREP_CHUNK ? npix - i0 : PREP_CHUNK;
        ivar_kernel(data + i0, mask + i0, bkg ? bkg + i0 : NULL, sky_f, n, A, B, ivar + i0);
    }
    return SP_OK;
}

/* One chunk of the coadd: frames outer, pixels inner (so the loops vectorise), with the
 * per-pixel sums accumulated over frames in ascending order exactly as a per-pixel loop
 * would (a frame that is not good at a pixel adds +0, which changes no sum: the sums are
 * never -0). "Good" (!(ivar <= 0)) and the selects are bit masks: with -ftrapping-math GCC
 * does not if-convert a float comparison feeding a select. */
#define COADD_CHUNK 1024
static inline double dmask(double x, uint64_t m)
{
    uint64_t u;
    memcpy(&u, &x, 8);
    u &= m;
    memcpy(&x, &u, 8);
    return x;
}
static inline float fmask(float x, uint32_t m)
{
    uint32_t u;
    memcpy(&u, &x, 4);
    u &= m;
    memcpy(&x, &u, 4);
    return x;
}
SP_KERNEL static void coadd_kernel(int nf, const float *const *data, const float *const *ivar,
                                   const uint8_t *const *mask, const double *wsky, size_t i0, size_t n,
                                   float *restrict out_data, float *restrict out_ivar, uint8_t *restrict out_mask)
{
    double sw[COADD_CHUNK], swd[COADD_CHUNK], sw2v[COADD_CHUNK];
    uint8_t sat[COADD_CHUNK], good[COADD_CHUNK];
    memset(sw, 0, n * sizeof *sw);
    memset(swd, 0, n * sizeof *swd);
    memset(sw2v, 0, n * sizeof *sw2v);
    memset(sat, 0, n);
    memset(good, 0, n);
    for (int k = 0; k < nf; k++) {
        const float *restrict d = data[k] + i0, *restrict iv = ivar[k] + i0;
        const uint8_t *restrict m = mask[k] + i0;
        const double w = wsky[k], w2 = w * w;
        for (size_t i = 0; i < n; i++) {
            uint32_t b;
            memcpy(&b, &iv[i], 4);
            /* !(ivar <= 0): ivar > 0 (+Inf included) or NaN, as the per-pixel definition */
            uint32_t ok = (b - 1u < 0x7F800000u) | ((b & 0x7FFFFFFFu) > 0x7F800000u);
            uint64_t okm = (uint64_t)0 - (uint64_t)ok;
            sat[i] |= m[i] & SP_PIX_SAT;
            good[i] |= (uint8_t)ok;
            const double we = dmask(w, okm);
            sw[i] += we;
            swd[i] += we * dmask((double)d[i], okm);
            sw2v[i] += dmask(w2 / (double)iv[i], okm);
        }
    }
    for (size_t i = 0; i < n; i++) {
        uint64_t b;
        memcpy(&b, &sw[i], 8);
        uint32_t okm = (uint32_t)0 - (uint32_t)(b - 1u < 0x7FF0000000000000ull); /* sw > 0 */
        out_data[i0 + i] = fmask((float)(swd[i] / sw[i]), okm);
        out_ivar[i0 + i] = fmask((float)(sw[i] * sw[i] / sw2v[i]), okm);
        out_mask[i0 + i] = (uint8_t)(sat[i] | (good[i] ? 0 : SP_PIX_BAD));
    }
}

int sp_prep_coadd(int nf, const float *const *data, const float *const *ivar, const uint8_t *const *mask,
                  const double *wsky, size_t npix, float *out_data, float *out_ivar, uint8_t *out_mask,
                  int nthreads)
{
    if (nf < 1) return SP_FAIL(SP_ERR_INTERNAL, "coadd of %d frames", nf);
    long nchunk = (long)((npix + COADD_CHUNK - 1) / COADD_CHUNK);
#pragma omp parallel for schedule(static) num_threads(nthreads > 0 ? nthreads : 1) if (nthreads > 1)
    for (long c = 0; c < nchunk; c++) {
        size_t i0 = (size_t)c * COADD_CHUNK, n = npix - i0 < COADD_CHUNK ? npix - i0 : COADD_CHUNK;
        coadd_kernel(nf, data, ivar, mask, wsky, i0, n, out_data, out_ivar, out_mask);
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

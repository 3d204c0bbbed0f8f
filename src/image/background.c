/* background.c — SExtractor-style background mesh with source masking,
 * median filtering and bicubic-spline interpolation (sp_background.h).
 *
 * Speed. Per box the statistics take three passes over the box's pixels
 * (gather + moments, one coarse clip, a 256-bin histogram); the clipping
 * iterations, median and mode then run on the histogram (bins of 0.04 sigma,
 * rebuilt when the clipped sigma shrinks below four bins), so their cost does
 * not grow with the box. Pass 2 (sources masked) fills each box's histogram
 * straight from the image around the pass-1 value, in one read. Interpolation evaluates, per image row, one spline per
 * mesh column at that row and then a cubic polynomial per mesh interval along
 * the row (three multiply-adds per pixel and map). Measured figures are in
 * docs/psf.md.
 */
#include "surveyproc/sp_background.h"

#include "surveyproc/sp_error.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define HIST_NBIN 256
#define HIST_HALF 5.0    /* histogram spans median +- HIST_HALF sigma */
#define SKEW_LIMIT 0.3   /* |mean - median| / sigma above which the mode is the median */
#define MIN_BOX_PIX 8    /* a box needs at least this many usable pixels */
#define MBAD 2u          /* pixel-mask bit: unusable (bit 0: source, in pass 2) */

void sp_bkg_params_default(sp_bkg_params *p)
{
    p->boxsize = 64;
    p->filtersize = 3;
    p->mask_sigma = 3.0;
    p->mask_dilate = 2;
    p->clip_sigma = 3.0;
    p->clip_iters = 5;
    p->min_valid_frac = 0.5;
}

void sp_bkg_free(sp_bkg **bkg)
{
    if (!bkg || !*bkg) return;
    sp_bkg *b = *bkg;
    free(b->xedge);
    free(b->yedge);
    free(b->cx);
    free(b->cy);
    free(b->back);
    free(b->rms);
    free(b->missing);
    free(b);
    *bkg = NULL;
}

/* ------------------------------------------------------------------------ */
/* Order statistics                                                          */

/* k-th smallest of v[0..n) (Hoare quickselect, reorders v; see sp_background.h). */
float sp_select_k(float *v, size_t n, size_t k)
{
    size_t lo = 0, hi = n - 1;
    while (lo < hi) {
        /* median of three pivot */
        size_t mid = lo + (hi - lo) / 2;
        float a = v[lo], b = v[mid], c = v[hi];
        float piv = a < b ? (b < c ? b : (a < c ? c : a)) : (a < c ? a : (b < c ? c : b));
        size_t i = lo, j = hi;
        while (i <= j) {
            while (v[i] < piv) i++;
            while (v[j] > piv) j--;
            if (i <= j) {
                float t = v[i];
                v[i] = v[j];
                v[j] = t;
                i++;
                if (j == 0) break;
                j--;
            }
        }
        if (k <= j)
            hi = j;
        else if (k >= i)
            lo = i;
        else
            return v[k];
    }
    return v[k];
}

static double median_inplace(float *v, size_t n)
{
    if (n == 0) return NAN;
    float m = sp_select_k(v, n, n / 2);
    if (n % 2) return m;
    /* lower middle = max of the lower part */
    float lo = v[0];
    for (size_t i = 1; i < n / 2; i++)
        if (v[i] > lo) lo = v[i];
    return 0.5 * ((double)lo + m);
}

int sp_bkg_clipped_stats(float *v, size_t n, double clip_sigma, int iters, double *mode, double *median,
                         double *sigma, size_t *nkept)
{
    if (mode) *mode = NAN;
    if (median) *median = NAN;
    if (sigma) *sigma = NAN;
    if (nkept) *nkept = 0;
    if (n == 0 || !(clip_sigma > 0)) return SP_FAIL(SP_ERR_INPUT, "clipped statistics of an empty sample");
    size_t m = n;
    double med = 0, mean = 0, sd = 0;
    for (int it = 0; it <= iters; it++) {
        double s = 0, s2 = 0;
        for (size_t i = 0; i < m; i++) s += v[i];
        mean = s / (double)m;
        for (size_t i = 0; i < m; i++) s2 += ((double)v[i] - mean) * ((double)v[i] - mean);
        sd = m > 1 ? sqrt(s2 / (double)(m - 1)) : 0.0;
        med = median_inplace(v, m);
        if (it == iters || !(sd > 0)) break;
        double lo = med - clip_sigma * sd, hi = med + clip_sigma * sd;
        size_t k = 0;
        for (size_t i = 0; i < m; i++)
            if (v[i] >= lo && v[i] <= hi) v[k++] = v[i];
        if (k == m || k == 0) break;
        m = k;
    }
    if (mode) *mode = (sd > 0 && fabs(mean - med) > SKEW_LIMIT * sd) ? med : 2.5 * med - 1.5 * mean;
    if (median) *median = med;
    if (sigma) *sigma = sd;
    if (nkept) *nkept = m;
    return SP_OK;
}

/* ------------------------------------------------------------------------ */
/* Per-box statistics on a histogram                                          */

typedef struct {
    unsigned int h[HIST_NBIN];
} hist_t;

/* Fill the histogram of v over [lo, lo + HIST_NBIN * w). */
static void hist_fill(hist_t *H, const float *v, size_t n, double lo, double w)
{
    memset(H->h, 0, sizeof H->h);
    const float iw = (float)(1.0 / w), flo = (float)lo;
    for (size_t i = 0; i < n; i++) {
        float t = (v[i] - flo) * iw;
        if (t >= 0.0f && t < (float)HIST_NBIN) H->h[(int)t]++;
    }
}

/* Statistics of bins [b0, b1]: count, mean, sd (bin centres), median (linear
 * within the median bin). Returns the count. */
static double hist_stats(const hist_t *H, int b0, int b1, double lo, double w, double *mean, double *sd,
                         double *med)
{
    double c = 0, s = 0, s2 = 0;
    for (int b = b0; b <= b1; b++) {
        double x = b + 0.5;
        c += H->h[b];
        s += H->h[b] * x;
        s2 += H->h[b] * x * x;
    }
    if (c <= 0) return 0;
    double mb = s / c;
    double vb = s2 / c - mb * mb;
    if (vb < 0) vb = 0;
    *mean = lo + mb * w;
    *sd = sqrt(vb * c / (c > 1 ? c - 1 : 1)) * w;
    double half = 0.5 * c, cum = 0;
    *med = lo + (b1 + 1) * w;
    for (int b = b0; b <= b1; b++) {
        if (cum + H->h[b] >= half && H->h[b] > 0) {
            *med = lo + (b + (half - cum) / H->h[b]) * w;
            break;
        }
        cum += H->h[b];
    }
    return c;
}

/* Standard deviation of a unit Gaussian truncated at +-k: the clipped sigma
 * underestimates the true one by this factor (0.9866 at k = 3). */
static double clip_sd_factor(double k)
{
    if (!(k > 0) || k > 10) return 1.0;
    double phi = exp(-0.5 * k * k) / sqrt(2.0 * M_PI), P = erf(k / sqrt(2.0));
    double v = 1.0 - 2.0 * k * phi / P;
    return v > 0 ? sqrt(v) : 1.0;
}

/* Sigma clipping on a filled histogram (range lo + [0, HIST_NBIN) w), starting
 * from all bins. Returns the count kept; cm, csd, med: clipped mean, sd, median. */
static double hist_clip(const hist_t *H, double lo, double w, double clip, int iters, double *cm, double *csd,
                        double *med)
{
    int b0 = 0, b1 = HIST_NBIN - 1;
    double cnt = hist_stats(H, b0, b1, lo, w, cm, csd, med);
    if (cnt < MIN_BOX_PIX) return cnt;
    for (int it = 0; it < iters; it++) {
        int nb0 = (int)floor((*med - clip * *csd - lo) / w);
        int nb1 = (int)floor((*med + clip * *csd - lo) / w);
        if (nb0 < 0) nb0 = 0;
        if (nb1 > HIST_NBIN - 1) nb1 = HIST_NBIN - 1;
        if (nb0 == b0 && nb1 == b1) break;
        if (nb1 < nb0) break;
        double m2, s2b, md2, c2 = hist_stats(H, nb0, nb1, lo, w, &m2, &s2b, &md2);
        if (c2 < MIN_BOX_PIX) break;
        b0 = nb0;
        b1 = nb1;
        *cm = m2;
        *csd = s2b;
        *med = md2;
        cnt = c2;
    }
    return cnt;
}

static void box_result(double cm, double csd, double med, double clip, float *mode_out, float *sig_out)
{
    double mode = (csd > 0 && fabs(cm - med) > SKEW_LIMIT * csd) ? med : 2.5 * med - 1.5 * cm;
    *mode_out = (float)mode;
    *sig_out = (float)(csd / clip_sd_factor(clip));
}

/* Clipped mode and sigma of one box from its values. Returns 0 if unusable. */
static int box_stats(const float *v, size_t n, double clip, int iters, hist_t *H, float *mode_out,
                     float *sig_out)
{
    if (n < MIN_BOX_PIX) return 0;
    /* moments about the first value: one vectorised pass, float is exact
     * enough for offsets of a few sigma */
    const float v0 = v[0];
    float fs = 0.0f, fs2 = 0.0f;
#pragma omp simd reduction(+ : fs, fs2)
    for (size_t i = 0; i < n; i++) {
        float d = v[i] - v0;
        fs += d;
        fs2 += d * d;
    }
    double mean = (double)fs / (double)n, var = ((double)fs2 - (double)n * mean * mean) / (double)(n - 1);
    mean += v0;
    double sd = var > 0 ? sqrt(var) : 0.0;
    if (!(sd > 0)) {
        *mode_out = (float)mean;
        *sig_out = 0.0f;
        return 1;
    }
    /* one coarse clip around the mean drops bright outliers that inflate sd */
    {
        const float fm = (float)mean, flo = (float)(-clip * sd), fhi = (float)(clip * sd);
        float c = 0, t = 0, t2 = 0;
#pragma omp simd reduction(+ : c, t, t2)
        for (size_t i = 0; i < n; i++) {
            float x = v[i] - fm;
            float in = (x >= flo && x <= fhi) ? 1.0f : 0.0f;
            c += in;
            t += in * x;
            t2 += in * x * x;
        }
        if (c > 1) {
            double m1 = (double)t / c, v1 = ((double)t2 - c * m1 * m1) / (c - 1);
            if (v1 > 0) {
                mean += m1;
                sd = sqrt(v1);
            }
        }
    }
    double med = mean, cm = mean, csd = sd;
    for (int rebuild = 0; rebuild < 3; rebuild++) {
        double w = 2.0 * HIST_HALF * sd / HIST_NBIN;
        double lo = med - HIST_HALF * sd;
        hist_fill(H, v, n, lo, w);
        if (hist_clip(H, lo, w, clip, iters, &cm, &csd, &med) < MIN_BOX_PIX) break;
        /* histogram too coarse for the clipped width: rebuild around it */
        if (csd >= 4.0 * w || !(csd > 0)) break;
        sd = csd;
    }
    box_result(cm, csd, med, iters > 0 ? clip : 0.0, mode_out, sig_out);
    return 1;
}

/* Pass-2 statistics of the whole mesh in one read of the image: each box's
 * histogram is filled straight from the image (pixels with skip == 0) over
 * pass-1 mode +- HIST_HALF pass-1 sigma, so no value buffer and no moment
 * passes are needed. A box whose pass-1 values are unusable, or whose clipped
 * width turns out too narrow for that histogram, is redone the slow way.
 * Returns the number of valid boxes; *nkept: usable pixels read. */
static int mesh_stats_hist(const float *img, const uint8_t *skip, const sp_bkg *b, const sp_bkg_params *p,
                           const float *back1, const float *rms1, const uint8_t *valid1, float *buf, hist_t *H,
                           float *back, float *rms, uint8_t *valid, size_t *nkept)
{
    int nvalid = 0;
    size_t kept = 0;
    for (int by = 0; by < b->nby; by++)
        for (int bx = 0; bx < b->nbx; bx++) {
            int m = by * b->nbx + bx;
            int x0 = b->xedge[bx], x1 = b->xedge[bx + 1], y0 = b->yedge[by], y1 = b->yedge[by + 1];
            size_t area = (size_t)(x1 - x0) * (size_t)(y1 - y0), n = 0;
            valid[m] = 0;
            back[m] = rms[m] = 0.0f;
            int done = 0;
            if (valid1[m] && rms1[m] > 0.0f) {
                double w = 2.0 * HIST_HALF * rms1[m] / HIST_NBIN, lo = back1[m] - HIST_HALF * rms1[m];
                const float iw = (float)(1.0 / w), flo = (float)lo;
                /* four interleaved sub-histograms (plus an overflow slot) so
                 * runs of equal bins do not serialise on one counter */
                unsigned int h4[4][HIST_NBIN + 1];
                memset(h4, 0, sizeof h4);
                for (int y = y0; y < y1; y++) {
                    const float *row = img + (size_t)y * b->nx;
                    const uint8_t *sk = skip + (size_t)y * b->nx;
                    for (int x = x0; x < x1; x++) {
                        float t = (row[x] - flo) * iw;
                        int use = !sk[x];
                        int in = use & (t >= 0.0f) & (t < (float)HIST_NBIN); /* NaN: 0 */
                        float tc = in ? t : (float)HIST_NBIN;
                        h4[x & 3][(int)tc]++;
                        n += (size_t)use;
                    }
                }
                for (int k = 0; k < HIST_NBIN; k++) H->h[k] = h4[0][k] + h4[1][k] + h4[2][k] + h4[3][k];
                double cm, csd, med;
                if ((double)n < p->min_valid_frac * (double)area || n < MIN_BOX_PIX) {
                    done = 1; /* too few usable pixels: missing */
                } else if (hist_clip(H, lo, w, p->clip_sigma, p->clip_iters, &cm, &csd, &med) >= MIN_BOX_PIX &&
                           csd >= 4.0 * w) {
                    box_result(cm, csd, med, p->clip_iters > 0 ? p->clip_sigma : 0.0, &back[m], &rms[m]);
                    valid[m] = 1;
                    done = 1;
                }
            }
            if (!done) {
                n = 0;
                for (int y = y0; y < y1; y++) {
                    const float *row = img + (size_t)y * b->nx;
                    const uint8_t *sk = skip + (size_t)y * b->nx;
                    for (int x = x0; x < x1; x++) {
                        buf[n] = row[x];
                        n += !sk[x];
                    }
                }
                if ((double)n >= p->min_valid_frac * (double)area &&
                    box_stats(buf, n, p->clip_sigma, p->clip_iters, H, &back[m], &rms[m]))
                    valid[m] = 1;
            }
            kept += n;
            nvalid += valid[m];
        }
    if (nkept) *nkept = kept;
    return nvalid;
}

/* Box statistics over the whole mesh from the pixels with skip == 0, reading
 * every `step`-th pixel of every `step`-th row. Returns the number of valid
 * boxes. */
static int mesh_stats(const float *img, const uint8_t *skip, int step, const sp_bkg *b, const sp_bkg_params *p,
                      float *buf, hist_t *H, float *back, float *rms, uint8_t *valid)
{
    int nvalid = 0;
    for (int by = 0; by < b->nby; by++)
        for (int bx = 0; bx < b->nbx; bx++) {
            size_t n = 0, area = 0;
            int x0 = b->xedge[bx], x1 = b->xedge[bx + 1], y0 = b->yedge[by], y1 = b->yedge[by + 1];
            for (int y = y0; y < y1; y += step) {
                const float *row = img + (size_t)y * b->nx;
                const uint8_t *sk = skip + (size_t)y * b->nx;
                for (int x = x0; x < x1; x += step) { /* branch-free compaction */
                    buf[n] = row[x];
                    n += !sk[x];
                    area++;
                }
            }
            int m = by * b->nbx + bx;
            valid[m] = 0;
            back[m] = rms[m] = 0.0f;
            if ((double)n >= p->min_valid_frac * (double)area &&
                box_stats(buf, n, p->clip_sigma, p->clip_iters, H, &back[m], &rms[m])) {
                valid[m] = 1;
                nvalid++;
            }
        }
    return nvalid;
}

/* Fill invalid mesh nodes from the mean of valid 8-neighbours, growing
 * outwards. Returns 0 if nothing was valid (then all zero). */
static int mesh_fill(int nbx, int nby, float *back, float *rms, const uint8_t *valid, uint8_t *have)
{
    int n = nbx * nby, any = 0;
    for (int m = 0; m < n; m++) {
        have[m] = valid[m];
        any |= valid[m];
    }
    if (!any) {
        for (int m = 0; m < n; m++) back[m] = rms[m] = 0.0f;
        return 0;
    }
    for (;;) {
        int changed = 0;
        for (int j = 0; j < nby; j++)
            for (int i = 0; i < nbx; i++) {
                int m = j * nbx + i;
                if (have[m]) continue;
                double sb = 0, sr = 0;
                int c = 0;
                for (int dj = -1; dj <= 1; dj++)
                    for (int di = -1; di <= 1; di++) {
                        int ii = i + di, jj = j + dj;
                        if (ii < 0 || jj < 0 || ii >= nbx || jj >= nby) continue;
                        int q = jj * nbx + ii;
                        if (have[q] == 1) {
                            sb += back[q];
                            sr += rms[q];
                            c++;
                        }
                    }
                if (c) {
                    back[m] = (float)(sb / c);
                    rms[m] = (float)(sr / c);
                    have[m] = 2; /* usable from the next sweep on */
                    changed = 1;
                }
            }
        for (int m = 0; m < n; m++)
            if (have[m] == 2) have[m] = 1;
        if (!changed) break;
    }
    return 1;
}

static int cmp_f(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* Median filter (fs x fs) of one mesh. Near the border the window shrinks to
 * stay symmetric about the node (half-width min(h, distance to the border) per
 * axis), so a gradient is not biased at the edges as a one-sided window
 * would bias it. */
static void mesh_median(int nbx, int nby, int fs, const float *in, float *out)
{
    int h = fs / 2;
    float win[81 * 81];
    for (int j = 0; j < nby; j++)
        for (int i = 0; i < nbx; i++) {
            int c = 0;
            int hx = h, hy = h;
            if (hx > i) hx = i;
            if (hx > nbx - 1 - i) hx = nbx - 1 - i;
            if (hy > j) hy = j;
            if (hy > nby - 1 - j) hy = nby - 1 - j;
            for (int jj = j - hy; jj <= j + hy; jj++)
                for (int ii = i - hx; ii <= i + hx; ii++) win[c++] = in[jj * nbx + ii];
            qsort(win, (size_t)c, sizeof(float), cmp_f);
            out[j * nbx + i] = (c % 2) ? win[c / 2] : 0.5f * (win[c / 2 - 1] + win[c / 2]);
        }
}

/* ------------------------------------------------------------------------ */
/* Natural cubic splines                                                      */

/* Second derivatives of the natural spline through (x[i], y[i]); tmp[n]. */
static void spline_d2(const double *x, const double *y, int n, double *d2, double *tmp)
{
    if (n < 3) {
        for (int i = 0; i < n; i++) d2[i] = 0.0;
        return;
    }
    d2[0] = tmp[0] = 0.0;
    for (int i = 1; i < n - 1; i++) {
        double sig = (x[i] - x[i - 1]) / (x[i + 1] - x[i - 1]);
        double pp = sig * d2[i - 1] + 2.0;
        d2[i] = (sig - 1.0) / pp;
        double u = (y[i + 1] - y[i]) / (x[i + 1] - x[i]) - (y[i] - y[i - 1]) / (x[i] - x[i - 1]);
        tmp[i] = (6.0 * u / (x[i + 1] - x[i - 1]) - sig * tmp[i - 1]) / pp;
    }
    d2[n - 1] = 0.0;
    for (int k = n - 2; k >= 0; k--) d2[k] = d2[k] * d2[k + 1] + tmp[k];
}

/* Cubic coefficients of the spline on interval k in t = x - x[k]:
 * value = c0 + c1 t + c2 t^2 + c3 t^3. Beyond the ends (k = -1 or k = n-1):
 * linear extrapolation with the end slope (natural spline). */
static void spline_coef(const double *x, const double *y, const double *d2, int n, int k, double c[4])
{
    if (n == 1) {
        c[0] = y[0];
        c[1] = c[2] = c[3] = 0.0;
        return;
    }
    if (k < 0) { /* left of x[0], t = x - x[0] */
        double h = x[1] - x[0];
        c[0] = y[0];
        c[1] = (y[1] - y[0]) / h - h * (2.0 * d2[0] + d2[1]) / 6.0;
        c[2] = c[3] = 0.0;
        return;
    }
    if (k >= n - 1) { /* right of x[n-1], t = x - x[n-1] */
        double h = x[n - 1] - x[n - 2];
        c[0] = y[n - 1];
        c[1] = (y[n - 1] - y[n - 2]) / h + h * (d2[n - 2] + 2.0 * d2[n - 1]) / 6.0;
        c[2] = c[3] = 0.0;
        return;
    }
    double h = x[k + 1] - x[k];
    c[0] = y[k];
    c[1] = (y[k + 1] - y[k]) / h - h * (2.0 * d2[k] + d2[k + 1]) / 6.0;
    c[2] = 0.5 * d2[k];
    c[3] = (d2[k + 1] - d2[k]) / (6.0 * h);
}

static inline int spline_interval(const double *x, int n, double t)
{
    if (t < x[0]) return -1;
    if (t >= x[n - 1]) return n - 1;
    int lo = 0, hi = n - 1; /* x[lo] <= t < x[hi] */
    while (hi - lo > 1) {
        int mid = (lo + hi) / 2;
        if (x[mid] <= t)
            lo = mid;
        else
            hi = mid;
    }
    return lo;
}

static double spline_eval(const double *x, const double *y, const double *d2, int n, double t)
{
    int k = spline_interval(x, n, t);
    double c[4];
    spline_coef(x, y, d2, n, k, c);
    double u = t - x[k < 0 ? 0 : k];
    return c[0] + u * (c[1] + u * (c[2] + u * c[3]));
}

/* Interpolator over a mesh: columns along y prepared once, rows along x per
 * image row. */
typedef struct {
    int nbx, nby, nx;
    const double *cx, *cy;
    double *colb, *colr;     /* transposed mesh: [i * nby + j] */
    double *d2b, *d2r;       /* y-spline second derivatives per column */
    double *rowb, *rowr;     /* values at the current row (nbx) */
    double *rd2b, *rd2r, *tmp;
    double *fd, *fsig, *fipp, *fc, *fih; /* x-spline factorisation (nbx each) */
    int *seg_start;          /* first pixel x of interval k+1 (k = -1 .. nbx-1): nbx+1 entries */
} interp_t;

/* Factorise the natural-spline system over nodes x once; solve per row. */
static void spline_prep(const double *x, int n, double *d, double *sig, double *ipp, double *c, double *ih)
{
    for (int i = 0; i < n; i++) d[i] = sig[i] = ipp[i] = c[i] = ih[i] = 0.0;
    for (int i = 0; i + 1 < n; i++) ih[i] = 1.0 / (x[i + 1] - x[i]);
    for (int i = 1; i < n - 1; i++) {
        sig[i] = (x[i] - x[i - 1]) / (x[i + 1] - x[i - 1]);
        double pp = sig[i] * d[i - 1] + 2.0;
        d[i] = (sig[i] - 1.0) / pp;
        ipp[i] = 1.0 / pp;
        c[i] = 6.0 / (x[i + 1] - x[i - 1]);
    }
}

static void spline_solve(const interp_t *it, const double *y, double *d2)
{
    int n = it->nbx;
    double *tmp = it->tmp;
    if (n < 3) {
        for (int i = 0; i < n; i++) d2[i] = 0.0;
        return;
    }
    tmp[0] = 0.0;
    for (int i = 1; i < n - 1; i++) {
        double u = (y[i + 1] - y[i]) * it->fih[i] - (y[i] - y[i - 1]) * it->fih[i - 1];
        tmp[i] = (it->fc[i] * u - it->fsig[i] * tmp[i - 1]) * it->fipp[i];
    }
    d2[n - 1] = 0.0;
    for (int k = n - 2; k >= 0; k--) d2[k] = it->fd[k] * d2[k + 1] + tmp[k];
}

/* Weights of (y[k], y[k+1], d2[k], d2[k+1]) for the spline value at t
 * (natural spline; linear extrapolation beyond the end nodes). n >= 2. */
static int spline_weights(const double *x, int n, double t, double w[4])
{
    int k = spline_interval(x, n, t);
    if (k < 0) {
        double h = x[1] - x[0], u = t - x[0];
        w[0] = 1.0 - u / h;
        w[1] = u / h;
        w[2] = -u * h / 3.0;
        w[3] = -u * h / 6.0;
        return 0;
    }
    if (k >= n - 1) {
        double h = x[n - 1] - x[n - 2], u = t - x[n - 1];
        w[0] = -u / h;
        w[1] = 1.0 + u / h;
        w[2] = u * h / 6.0;
        w[3] = u * h / 3.0;
        return n - 2;
    }
    double h = x[k + 1] - x[k], A = (x[k + 1] - t) / h, B = 1.0 - A;
    w[0] = A;
    w[1] = B;
    w[2] = (A * A * A - A) * h * h / 6.0;
    w[3] = (B * B * B - B) * h * h / 6.0;
    return k;
}

static void interp_free(interp_t *it)
{
    free(it->colb);
    free(it->colr);
    free(it->d2b);
    free(it->d2r);
    free(it->rowb);
    free(it->rowr);
    free(it->rd2b);
    free(it->rd2r);
    free(it->tmp);
    free(it->fd);
    free(it->fsig);
    free(it->fipp);
    free(it->fc);
    free(it->fih);
    free(it->seg_start);
    memset(it, 0, sizeof *it);
}

static int interp_init(interp_t *it, const sp_bkg *b, const float *back, const float *rms)
{
    int status = SP_OK;
    memset(it, 0, sizeof *it);
    int nbx = b->nbx, nby = b->nby, nmax = nbx > nby ? nbx : nby;
    it->nbx = nbx;
    it->nby = nby;
    it->nx = b->nx;
    it->cx = b->cx;
    it->cy = b->cy;
    SP_ALLOC(it->colb, (size_t)nbx * nby);
    SP_ALLOC(it->colr, (size_t)nbx * nby);
    SP_ALLOC(it->d2b, (size_t)nbx * nby);
    SP_ALLOC(it->d2r, (size_t)nbx * nby);
    SP_ALLOC(it->rowb, nbx);
    SP_ALLOC(it->rowr, nbx);
    SP_ALLOC(it->rd2b, nbx);
    SP_ALLOC(it->rd2r, nbx);
    SP_ALLOC(it->tmp, nmax);
    SP_ALLOC(it->seg_start, nbx + 1);
    SP_ALLOC(it->fd, nbx);
    SP_ALLOC(it->fsig, nbx);
    SP_ALLOC(it->fipp, nbx);
    SP_ALLOC(it->fc, nbx);
    SP_ALLOC(it->fih, nbx);
    spline_prep(b->cx, nbx, it->fd, it->fsig, it->fipp, it->fc, it->fih);
    for (int i = 0; i < nbx; i++) {
        for (int j = 0; j < nby; j++) {
            it->colb[(size_t)i * nby + j] = back[j * nbx + i];
            it->colr[(size_t)i * nby + j] = rms ? rms[j * nbx + i] : 0.0;
        }
        spline_d2(b->cy, it->colb + (size_t)i * nby, nby, it->d2b + (size_t)i * nby, it->tmp);
        spline_d2(b->cy, it->colr + (size_t)i * nby, nby, it->d2r + (size_t)i * nby, it->tmp);
    }
    /* pixel x belongs to interval k when cx[k] <= x < cx[k+1]; seg_start[k+1]
     * is the first such x (k = -1: x < cx[0]). */
    it->seg_start[0] = 0;
    for (int k = 0; k < nbx; k++) {
        int s = (int)ceil(b->cx[k]);
        if (s < 0) s = 0;
        if (s > b->nx) s = b->nx;
        it->seg_start[k + 1] = s;
    }
cleanup:
    if (status != SP_OK) interp_free(it);
    return status;
}

/* Evaluate one image row y into ob / orms (either may be NULL). */
static void interp_row(interp_t *it, double y, float *ob, float *orms)
{
    const int nbx = it->nbx, nby = it->nby, nx = it->nx;
    if (nby == 1) {
        for (int i = 0; i < nbx; i++) {
            it->rowb[i] = it->colb[i];
            it->rowr[i] = it->colr[i];
        }
    } else {
        double w[4];
        int k = spline_weights(it->cy, nby, y, w);
        for (int i = 0; i < nbx; i++) {
            const double *cb = it->colb + (size_t)i * nby + k, *db = it->d2b + (size_t)i * nby + k;
            it->rowb[i] = w[0] * cb[0] + w[1] * cb[1] + w[2] * db[0] + w[3] * db[1];
            if (orms) {
                const double *cr = it->colr + (size_t)i * nby + k, *dr = it->d2r + (size_t)i * nby + k;
                it->rowr[i] = w[0] * cr[0] + w[1] * cr[1] + w[2] * dr[0] + w[3] * dr[1];
            }
        }
    }
    spline_solve(it, it->rowb, it->rd2b);
    if (orms) spline_solve(it, it->rowr, it->rd2r);
    for (int k = -1; k < nbx; k++) {
        int x0 = it->seg_start[k + 1], x1 = (k + 1 < nbx) ? it->seg_start[k + 2] : nx;
        if (x1 <= x0) continue;
        const float org = (float)it->cx[k < 0 ? 0 : k];
        double cb[4], cr[4];
        spline_coef(it->cx, it->rowb, it->rd2b, nbx, k, cb);
        if (ob) {
            const float c0 = (float)cb[0], c1 = (float)cb[1], c2 = (float)cb[2], c3 = (float)cb[3];
#pragma omp simd
            for (int x = x0; x < x1; x++) {
                float t = (float)x - org;
                ob[x] = c0 + t * (c1 + t * (c2 + t * c3));
            }
        }
        if (orms) {
            spline_coef(it->cx, it->rowr, it->rd2r, nbx, k, cr);
            const float c0 = (float)cr[0], c1 = (float)cr[1], c2 = (float)cr[2], c3 = (float)cr[3];
#pragma omp simd
            for (int x = x0; x < x1; x++) {
                float t = (float)x - org;
                float r = c0 + t * (c1 + t * (c2 + t * c3));
                orms[x] = r > 0.0f ? r : 0.0f;
            }
        }
    }
}

/* ------------------------------------------------------------------------ */
/* Source mask                                                                */

/* In-place square dilation of bit 0 of m by half-width r (separable): bit 0
 * becomes "a source pixel within r along both axes", other bits are kept.
 * Rows are dilated horizontally into a ring of 2r+1 rows; output row y is the
 * OR of ring rows y-r .. y+r and is written after the last read of the input
 * rows it needs (rows > y are read before they are overwritten). ring:
 * (2r+1) nx bytes. */
static void dilate(uint8_t *m, uint8_t *ring, int nx, int ny, int r)
{
    const int R = 2 * r + 1;
    if (r <= 0) return;
    for (int yy = 0; yy < ny && yy <= r; yy++) {
        const uint8_t *in = m + (size_t)yy * nx;
        uint8_t *h = ring + (size_t)(yy % R) * nx;
        for (int x = 0; x < nx; x++) h[x] = in[x] & 1u;
        for (int d = 1; d <= r && d < nx; d++) {
#pragma omp simd
            for (int x = d; x < nx; x++) h[x] |= in[x - d] & 1u;
#pragma omp simd
            for (int x = 0; x < nx - d; x++) h[x] |= in[x + d] & 1u;
        }
    }
    for (int y = 0; y < ny; y++) {
        int yn = y + r; /* newest ring row needed; rows <= y + r - 1 are in */
        if (y > 0 && yn < ny) {
            const uint8_t *in = m + (size_t)yn * nx;
            uint8_t *h = ring + (size_t)(yn % R) * nx;
            for (int x = 0; x < nx; x++) h[x] = in[x] & 1u;
            for (int d = 1; d <= r && d < nx; d++) {
#pragma omp simd
                for (int x = d; x < nx; x++) h[x] |= in[x - d] & 1u;
#pragma omp simd
                for (int x = 0; x < nx - d; x++) h[x] |= in[x + d] & 1u;
            }
        }
        uint8_t *out = m + (size_t)y * nx;
#pragma omp simd
        for (int x = 0; x < nx; x++) out[x] &= (uint8_t)~1u;
        for (int yy = y - r; yy <= y + r; yy++) {
            if (yy < 0 || yy >= ny) continue;
            const uint8_t *h = ring + (size_t)(yy % R) * nx;
#pragma omp simd
            for (int x = 0; x < nx; x++) out[x] |= h[x];
        }
    }
}

/* Horizontal 3-sums of usable values (s) and counts (c) of row y. Unusable
 * values (possibly NaN) are zeroed through their bit patterns so the loop
 * vectorises. ub: nx scratch. */
static void hsum_row(const float *img, const uint8_t *bad, int nx, int y, float *s, float *c, float *u, float *f,
                     uint32_t *ub)
{
    const float *row = img + (size_t)y * nx;
    const uint8_t *bd = bad + (size_t)y * nx;
    memcpy(ub, row, sizeof(float) * (size_t)nx);
#pragma omp simd
    for (int x = 0; x < nx; x++) {
        uint32_t g = (uint32_t)((bd[x] & MBAD) == 0);
        f[x] = (float)g;
        ub[x] &= 0u - g;
    }
    memcpy(u, ub, sizeof(float) * (size_t)nx);
    s[0] = u[0] + (nx > 1 ? u[1] : 0.0f);
    c[0] = f[0] + (nx > 1 ? f[1] : 0.0f);
#pragma omp simd
    for (int x = 1; x < nx - 1; x++) {
        s[x] = u[x - 1] + u[x] + u[x + 1];
        c[x] = f[x - 1] + f[x] + f[x + 1];
    }
    if (nx > 1) {
        s[nx - 1] = u[nx - 2] + u[nx - 1];
        c[nx - 1] = f[nx - 2] + f[nx - 1];
    }
}

/* Source mask (bit 0 of smask, which holds MBAD on entry): the 3x3 mean of
 * usable pixels exceeds the pass-1 background by mask_sigma times its own
 * noise (rms / sqrt(n)). Thresholding the 3x3 mean rather than single pixels
 * finds the faint wings of sources at ~1 sigma per pixel, which bias the sky
 * if left in (measured in docs/psf.md). hbuf: 8 nx. */
static void source_mask(const float *img, const uint8_t *bad, int nx, int ny, interp_t *it, double ms,
                        float *rowb, float *rowr, float *hbuf, uint32_t *ub, uint8_t *smask)
{
    float *s[3], *c[3], *u = hbuf + 6 * (size_t)nx, *f = hbuf + 7 * (size_t)nx;
    for (int k = 0; k < 3; k++) {
        s[k] = hbuf + (size_t)(2 * k) * nx;
        c[k] = hbuf + (size_t)(2 * k + 1) * nx;
    }
    const float fms = (float)ms;
    /* ring: row r lives in slot r % 3 */
    hsum_row(img, bad, nx, 0, s[0], c[0], u, f, ub);
    if (ny > 1) hsum_row(img, bad, nx, 1, s[1], c[1], u, f, ub);
    for (int y = 0; y < ny; y++) {
        if (y + 1 < ny && y >= 1) hsum_row(img, bad, nx, y + 1, s[(y + 1) % 3], c[(y + 1) % 3], u, f, ub);
        const float *s0 = s[y % 3], *c0 = c[y % 3];
        const float *sm = y > 0 ? s[(y - 1) % 3] : s0, *cm = y > 0 ? c[(y - 1) % 3] : c0;
        const float *sp = y + 1 < ny ? s[(y + 1) % 3] : s0, *cp = y + 1 < ny ? c[(y + 1) % 3] : c0;
        /* at the first/last row the missing neighbour row is replaced by a second
         * copy of the row itself: the same mean, noise treated as if 9 pixels */
        /* the threshold changes on the box scale: one evaluation per row pair */
        if (y % 2 == 0) interp_row(it, y + 1 < ny ? y + 0.5 : (double)y, rowb, rowr);
        uint8_t *out = smask + (size_t)y * nx;
#pragma omp simd
        for (int x = 0; x < nx; x++) {
            float S = s0[x] + sm[x] + sp[x];
            float C = c0[x] + cm[x] + cp[x];
            /* mean S/C above back + ms rms / sqrt(C), without the division */
            /* D = S - C back > ms rms sqrt(C), squared to stay branch-free
             * (C == 0 gives D == 0: unmasked) */
            float D = S - C * rowb[x], T = fms * rowr[x];
            out[x] |= (uint8_t)((D > 0.0f) & (D * D > T * T * C));
        }
    }
}

/* ------------------------------------------------------------------------ */

static int mesh_finish(sp_bkg *b, const sp_bkg_params *p, float *back, float *rms, const uint8_t *valid,
                       uint8_t *have, float *tmpb, float *tmpr)
{
    int any = mesh_fill(b->nbx, b->nby, back, rms, valid, have);
    if (any && p->filtersize > 1) {
        mesh_median(b->nbx, b->nby, p->filtersize, back, tmpb);
        mesh_median(b->nbx, b->nby, p->filtersize, rms, tmpr);
        memcpy(back, tmpb, sizeof(float) * (size_t)b->nbx * b->nby);
        memcpy(rms, tmpr, sizeof(float) * (size_t)b->nbx * b->nby);
    }
    return any;
}

int sp_bkg_estimate(const float *img, const float *ivar, const uint8_t *mask, int nx, int ny,
                    const sp_bkg_params *pin, sp_bkg **out)
{
    int status = SP_OK;
    sp_bkg *b = NULL;
    sp_bkg_params p;
    float *buf = NULL, *tmpb = NULL, *tmpr = NULL;
    uint8_t *valid = NULL, *have = NULL, *pm = NULL, *ring = NULL;
    hist_t *H = NULL;
    float *rowb = NULL, *rowr = NULL, *hbuf = NULL, *back1 = NULL, *rms1 = NULL;
    uint8_t *valid1 = NULL;
    uint32_t *ubits = NULL;
    interp_t it;
    memset(&it, 0, sizeof it);

    SP_CHECK(out != NULL && img != NULL, SP_ERR_INTERNAL, "sp_bkg_estimate: NULL argument");
    *out = NULL;
    if (pin)
        p = *pin;
    else
        sp_bkg_params_default(&p);
    SP_CHECK(nx >= 1 && ny >= 1, SP_ERR_INPUT, "background: image size %d x %d is empty", nx, ny);
    SP_CHECK(p.boxsize >= 4, SP_ERR_INPUT, "background: boxsize %d must be >= 4", p.boxsize);
    SP_CHECK(p.filtersize >= 1 && p.filtersize % 2 == 1 && p.filtersize <= 81, SP_ERR_INPUT,
             "background: filtersize %d must be odd and in 1..81", p.filtersize);
    SP_CHECK(p.clip_sigma > 0, SP_ERR_INPUT, "background: clip_sigma %g must be > 0", p.clip_sigma);
    SP_CHECK(p.clip_iters >= 0, SP_ERR_INPUT, "background: clip_iters %d must be >= 0", p.clip_iters);
    SP_CHECK(p.min_valid_frac >= 0 && p.min_valid_frac <= 1, SP_ERR_INPUT,
             "background: min_valid_frac %g must be in [0, 1]", p.min_valid_frac);
    SP_CHECK(p.mask_dilate >= 0 && p.mask_dilate <= 32, SP_ERR_INPUT,
             "background: mask_dilate %d must be in 0..32", p.mask_dilate);

    SP_ALLOC(b, 1);
    b->nx = nx;
    b->ny = ny;
    b->nbx = (nx + p.boxsize / 2) / p.boxsize;
    b->nby = (ny + p.boxsize / 2) / p.boxsize;
    if (b->nbx < 1) b->nbx = 1;
    if (b->nby < 1) b->nby = 1;
    int nbx = b->nbx, nby = b->nby, nm = nbx * nby;
    size_t npix = (size_t)nx * ny;
    SP_ALLOC(b->xedge, nbx + 1);
    SP_ALLOC(b->yedge, nby + 1);
    SP_ALLOC(b->cx, nbx);
    SP_ALLOC(b->cy, nby);
    SP_ALLOC(b->back, nm);
    SP_ALLOC(b->rms, nm);
    SP_ALLOC(b->missing, nm);
    for (int i = 0; i <= nbx; i++) b->xedge[i] = (int)((long)i * nx / nbx);
    for (int j = 0; j <= nby; j++) b->yedge[j] = (int)((long)j * ny / nby);
    for (int i = 0; i < nbx; i++) b->cx[i] = 0.5 * (b->xedge[i] + b->xedge[i + 1] - 1);
    for (int j = 0; j < nby; j++) b->cy[j] = 0.5 * (b->yedge[j] + b->yedge[j + 1] - 1);

    int maxbw = 0, maxbh = 0;
    for (int i = 0; i < nbx; i++)
        if (b->xedge[i + 1] - b->xedge[i] > maxbw) maxbw = b->xedge[i + 1] - b->xedge[i];
    for (int j = 0; j < nby; j++)
        if (b->yedge[j + 1] - b->yedge[j] > maxbh) maxbh = b->yedge[j + 1] - b->yedge[j];
    SP_ALLOC(buf, (size_t)maxbw * maxbh + 1);
    SP_ALLOC(H, 1);
    SP_ALLOC(valid, nm);
    SP_ALLOC(have, nm);
    SP_ALLOC(tmpb, nm);
    SP_ALLOC(tmpr, nm);

    /* unusable pixels, once */
    SP_ALLOC(pm, npix); /* MBAD: unusable; bit 0: source (pass 2) */
    size_t ngood = 0;
    if (!ivar && !mask) {
#pragma omp simd reduction(+ : ngood)
        for (size_t k = 0; k < npix; k++) {
            int ok = fabsf(img[k]) <= FLT_MAX; /* finite; vectorises, unlike isfinite */
            pm[k] = (uint8_t)(ok ? 0u : MBAD);
            ngood += (size_t)ok;
        }
    } else {
        for (size_t k = 0; k < npix; k++) {
            int ok = fabsf(img[k]) <= FLT_MAX && (!ivar || (ivar[k] > 0.0f && ivar[k] <= FLT_MAX)) &&
                     (!mask || !mask[k]);
            pm[k] = (uint8_t)(ok ? 0u : MBAD);
            ngood += (size_t)ok;
        }
    }
    b->ngood = ngood;

    /* pass 1: with source masking on, only a masking threshold comes out of
     * it, and every other pixel of every other row is plenty */
    int step = (p.mask_sigma > 0 && maxbh >= 16 && maxbw >= 16) ? 2 : 1;
    mesh_stats(img, pm, step, b, &p, buf, H, b->back, b->rms, valid);
    int any = mesh_finish(b, &p, b->back, b->rms, valid, have, tmpb, tmpr);

    if (any && p.mask_sigma > 0) {
        /* pass 2: mask sources above back + mask_sigma * rms, dilate, redo */
        SP_ALLOC(ring, (size_t)(2 * p.mask_dilate + 1) * nx);
        SP_ALLOC(rowb, nx);
        SP_ALLOC(rowr, nx);
        SP_ALLOC(hbuf, (size_t)8 * nx);
        SP_TRY(interp_init(&it, b, b->back, b->rms));
        SP_ALLOC(ubits, nx);
        source_mask(img, pm, nx, ny, &it, p.mask_sigma, rowb, rowr, hbuf, ubits, pm);
        interp_free(&it);
        dilate(pm, ring, nx, ny, p.mask_dilate);
        SP_ALLOC(back1, nm);
        SP_ALLOC(rms1, nm);
        SP_ALLOC(valid1, nm);
        memcpy(back1, b->back, sizeof(float) * nm);
        memcpy(rms1, b->rms, sizeof(float) * nm);
        memcpy(valid1, valid, nm);
        /* boxes unusable in pass 2 but fine in pass 1 are crowded: they are
         * filled from neighbours like missing boxes */
        size_t kept = 0;
        mesh_stats_hist(img, pm, b, &p, back1, rms1, valid1, buf, H, b->back, b->rms, valid, &kept);
        b->nsource_masked = ngood - kept;
        any = mesh_finish(b, &p, b->back, b->rms, valid, have, tmpb, tmpr);
        if (!any) {
            /* the source mask left no usable box (a field full of sources, or a
             * threshold so low that noise is masked): keep the pass-1 mesh */
            memcpy(b->back, back1, sizeof(float) * nm);
            memcpy(b->rms, rms1, sizeof(float) * nm);
            memcpy(valid, valid1, nm);
            b->nsource_masked = 0;
            any = 1;
        }
    } else if (any && step != 1) {
        mesh_stats(img, pm, 1, b, &p, buf, H, b->back, b->rms, valid);
        any = mesh_finish(b, &p, b->back, b->rms, valid, have, tmpb, tmpr);
    }
    b->nmissing = 0;
    for (int m = 0; m < nm; m++) {
        b->missing[m] = !valid[m];
        b->nmissing += !valid[m];
    }
    b->empty = !any;
    memcpy(tmpb, b->back, sizeof(float) * nm);
    memcpy(tmpr, b->rms, sizeof(float) * nm);
    b->global_back = median_inplace(tmpb, (size_t)nm);
    b->global_rms = median_inplace(tmpr, (size_t)nm);
    *out = b;
    b = NULL;
cleanup:
    interp_free(&it);
    sp_bkg_free(&b);
    free(buf);
    free(tmpb);
    free(tmpr);
    free(valid);
    free(have);
    free(pm);
    free(ring);
    free(H);
    free(rowb);
    free(rowr);
    free(hbuf);
    free(back1);
    free(rms1);
    free(valid1);
    free(ubits);
    return status;
}

static int render(const sp_bkg *b, float *back, float *rms, float *sub)
{
    int status = SP_OK;
    interp_t it;
    float *row = NULL;
    memset(&it, 0, sizeof it);
    SP_CHECK(b != NULL, SP_ERR_INTERNAL, "background: NULL mesh");
    SP_TRY(interp_init(&it, b, b->back, b->rms));
    if (sub) SP_ALLOC(row, b->nx);
    for (int y = 0; y < b->ny; y++) {
        size_t off = (size_t)y * b->nx;
        if (sub) {
            interp_row(&it, (double)y, row, NULL);
            float *sr = sub + off;
#pragma omp simd
            for (int x = 0; x < b->nx; x++) sr[x] -= row[x];
        } else {
            interp_row(&it, (double)y, back ? back + off : NULL, rms ? rms + off : NULL);
        }
    }
cleanup:
    interp_free(&it);
    free(row);
    return status;
}

int sp_bkg_map(const sp_bkg *b, float *back, float *rms)
{
    if (!back && !rms) return SP_OK;
    return render(b, back, rms, NULL);
}

int sp_bkg_subtract(const sp_bkg *b, float *img)
{
    return render(b, NULL, NULL, img);
}

double sp_bkg_eval(const sp_bkg *b, double x, double y, double *rms)
{
    int nbx = b->nbx, nby = b->nby, nmax = nbx > nby ? nbx : nby;
    double *col = malloc(sizeof(double) * (size_t)(5 * nmax + 2));
    if (!col) {
        if (rms) *rms = NAN;
        return NAN;
    }
    double *d2 = col + nmax, *tmp = d2 + nmax, *rowv = tmp + nmax, *rd2 = rowv + nmax;
    double out[2];
    for (int which = 0; which < 2; which++) {
        const float *mesh = which ? b->rms : b->back;
        for (int i = 0; i < nbx; i++) {
            for (int j = 0; j < nby; j++) col[j] = mesh[j * nbx + i];
            spline_d2(b->cy, col, nby, d2, tmp);
            rowv[i] = spline_eval(b->cy, col, d2, nby, y);
        }
        spline_d2(b->cx, rowv, nbx, rd2, tmp);
        out[which] = spline_eval(b->cx, rowv, rd2, nbx, x);
    }
    free(col);
    if (rms) *rms = out[1] > 0 ? out[1] : 0.0;
    return out[0];
}

/* aperture.c — forced aperture photometry (see sp_aperture.h). */
#include "surveyproc/sp_aperture.h"
#include "surveyproc/sp_background.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* The annulus values, and two key arrays of the same length for their radix sort. */
static size_t annulus_cap(double r_out)
{
    double r = r_out > 0 ? r_out + 1.5 : 1.5;
    return (size_t)(4.0 * r * r) + 16;
}

size_t sp_aper_scratch_size(double r_out) { return 3 * annulus_cap(r_out); }

/* ∫_a^b sqrt(r^2 - x^2) dx, with a, b clamped to [-r, r]. */
static double arc_int(double a, double b, double r)
{
    a = a < -r ? -r : a > r ? r : a;
    b = b < -r ? -r : b > r ? r : b;
    double sa = sqrt(fmax(r * r - a * a, 0)), sb = sqrt(fmax(r * r - b * b, 0));
    return 0.5 * (b * sb + r * r * asin(b / r)) - 0.5 * (a * sa + r * r * asin(a / r));
}

static void add_bp(double *bp, int *n, double v, double lo, double hi)
{
    if (v > lo && v < hi) bp[(*n)++] = v;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Exact area of the circle (centre 0, radius r) inside [x0,x1] x [y0,y1]:
 * integrate the clipped chord length over x, piecewise where the chord ends
 * switch between the rectangle edges and the circle. */
static double rect_circle_area(double x0, double x1, double y0, double y1, double r)
{
    double bp[8];
    int n = 0;
    bp[n++] = x0;
    add_bp(bp, &n, -r, x0, x1);
    add_bp(bp, &n, r, x0, x1);
    if (fabs(y0) < r) { double c = sqrt(r * r - y0 * y0); add_bp(bp, &n, -c, x0, x1); add_bp(bp, &n, c, x0, x1); }
    if (fabs(y1) < r) { double c = sqrt(r * r - y1 * y1); add_bp(bp, &n, -c, x0, x1); add_bp(bp, &n, c, x0, x1); }
    bp[n++] = x1;
    qsort(bp, (size_t)n, sizeof *bp, cmp_double);
    double area = 0;
    for (int k = 0; k + 1 < n; k++) {
        double a = bp[k], b = bp[k + 1];
        if (b <= a) continue;
        double m = 0.5 * (a + b), sm = sqrt(fmax(r * r - m * m, 0));
        if (fmin(y1, sm) <= fmax(y0, -sm)) continue;
        area += sm >= y1 ? y1 * (b - a) : arc_int(a, b, r);   /* upper end of the chord */
        area -= -sm <= y0 ? y0 * (b - a) : -arc_int(a, b, r); /* lower end */
    }
    return area;
}

/* Fraction of pixel (px, py) (unit square around its centre) inside the circle. */
static double overlap(double px, double py, double xc, double yc, double r)
{
    double dx = fabs(px - xc), dy = fabs(py - yc);
    double nx_ = dx > 0.5 ? dx - 0.5 : 0, ny_ = dy > 0.5 ? dy - 0.5 : 0;
    if (nx_ * nx_ + ny_ * ny_ >= r * r) return 0.0;
    double fx = dx + 0.5, fy = dy + 0.5;
    if (fx * fx + fy * fy <= r * r) return 1.0;
    return rect_circle_area(px - 0.5 - xc, px + 0.5 - xc, py - 0.5 - yc, py + 0.5 - yc, r);
}

/* Median with 3-sigma clipping (sigma from the interquartile range), three
 * rounds: each round the order statistics (the 3n/4-th, n/2-th, n/4-th) of the
 * values kept, which are kept as a contiguous range of the values sorted once
 * (|v - median| <= 3 sigma is an interval of v), so every round reads them off
 * the range: the same values as a selection per round. keys: 2 n. */
static double clipped_median(float *v, size_t n, uint32_t *keys)
{
    if (n == 0) return NAN;
    sp_sort_f32(v, keys, keys + n, n);
    double med = 0;
    size_t lo = 0;
    for (int it = 0; it < 3; it++) {
        const float *a = v + lo;
        size_t k3 = (3 * n) / 4, k2 = n / 2, k1 = n / 4;
        double q3 = a[k3];
        double m2 = a[k2];
        if (n % 2) med = m2;
        else med = 0.5 * (a[k2 - 1] + a[k2]); /* float sum, as a sort-based median computes it */
        double q1 = a[k1];
        double sig = (q3 - q1) / 1.349;
        if (!(sig > 0)) break;
        size_t b = 0, e = n;
        while (b < e && !(fabs(a[b] - med) <= 3.0 * sig)) b++;
        while (e > b && !(fabs(a[e - 1] - med) <= 3.0 * sig)) e--;
        size_t m = e - b;
        if (m == n || m < 5) break;
        lo += b;
        n = m;
    }
    return med;
}

/* Resets *res, then the annulus level (clipped median of the good pixels in [r_in, r_out)) into
 * res->bkg (0 and SP_APER_NOBKG with fewer than 8 of them); returns the variance
 * of that level. r_out <= 0: none (0). */
static double annulus_bkg(const float *data, const float *ivar, long nx, long ny, double xc, double yc, double r_in,
                          double r_out, float *scratch, sp_aper_result *res)
{
    /* res starts empty: flux NaN until measured */
    res->flux = res->fluxerr = NAN;
    res->bkg = 0;
    res->area = 0;
    res->masked_frac = 0;
    res->flags = 0;
    /* one pass, each row only over the x ranges the annulus can touch (the hole
     * and the box's corners skipped; the test on d2 decides as before) */
    double bkg_var = 0;
    if (r_out > 0) {
        size_t n = 0;
        double mv = 0, ri2 = r_in * r_in, ro2 = r_out * r_out;
        long y0 = (long)floor(yc - r_out), y1 = (long)ceil(yc + r_out);
        for (long y = y0; y <= y1; y++) {
            if (y < 0 || y >= ny) continue;
            double dy2 = (y - yc) * (y - yc);
            if (dy2 >= ro2) continue;
            double so = sqrt(ro2 - dy2), si = dy2 < ri2 ? sqrt(ri2 - dy2) : -1.0;
            long xa = (long)floor(xc - so) - 1, xb = (long)ceil(xc + so) + 1;
            /* inner hole: x strictly inside (xc - si, xc + si) has d2 < r_in^2 */
            long ha = si > 0 ? (long)floor(xc - si) + 2 : xb + 1, hb = si > 0 ? (long)ceil(xc + si) - 2 : xb;
            if (xa < 0) xa = 0;
            if (xb > nx - 1) xb = nx - 1;
            for (long x = xa; x <= xb; x++) {
                if (x == ha && hb >= ha) {
                    x = hb;
                    continue;
                }
                double d2 = (x - xc) * (x - xc) + dy2;
                if (d2 < ri2 || d2 >= ro2) continue;
                size_t i = (size_t)y * (size_t)nx + (size_t)x;
                if (ivar[i] > 0) {
                    scratch[n++] = data[i];
                    mv += 1.0 / ivar[i];
                }
            }
        }
        if (n >= 8) {
            /* variance of the annulus median: (pi/2) * mean pixel variance / n */
            bkg_var = M_PI / 2 * (mv / (double)n) / (double)n;
            res->bkg = clipped_median(scratch, n, (uint32_t *)(scratch + annulus_cap(r_out)));
        } else
            res->flags |= SP_APER_NOBKG;
    }
    return bkg_var;
}

void sp_aper_measure(const float *data, const float *ivar, long nx, long ny, double xc, double yc, double r,
                     double r_in, double r_out, float *scratch, sp_aper_result *res)
{
    double bkg_var = annulus_bkg(data, ivar, nx, ny, xc, yc, r_in, r_out, scratch, res);

    double sum = 0, var = 0, area = 0, masked = 0;
    long x0 = (long)floor(xc - r - 1), x1 = (long)ceil(xc + r + 1);
    long y0 = (long)floor(yc - r - 1), y1 = (long)ceil(yc + r + 1);
    for (long y = y0; y <= y1; y++) {
        for (long x = x0; x <= x1; x++) {
            double w = overlap((double)x, (double)y, xc, yc, r);
            if (w <= 0) continue;
            area += w;
            if (x < 0 || x >= nx || y < 0 || y >= ny) {
                res->flags |= SP_APER_EDGE;
                masked += w;
                continue;
            }
            size_t i = (size_t)y * (size_t)nx + (size_t)x;
            if (!(ivar[i] > 0)) {
                masked += w;
                continue;
            }
            sum += w * (data[i] - res->bkg);
            var += w * w / ivar[i];
        }
    }
    res->area = area;
    res->masked_frac = area > 0 ? masked / area : 1.0;
    if (masked > 0) res->flags |= SP_APER_MASKED;
    if (area - masked <= 0) {
        res->flags |= SP_APER_ALLMASKED;
        return;
    }
    /* masked pixels take the background value: they add nothing after subtraction */
    res->flux = sum;
    /* the background error is common to every aperture pixel */
    res->fluxerr = sqrt(var + area * area * bkg_var);
}

#define FILL_MAX_RINGS 256

void sp_aper_measure_fill(const float *data, const float *ivar, long nx, long ny, double xc, double yc, double r,
                          double r_in, double r_out, double min_cover, float *scratch, sp_aper_result *res)
{
    double bkg_var = annulus_bkg(data, ivar, nx, ny, xc, yc, r_in, r_out, scratch, res);
    /* rings of width dr (1 pixel up to r = 256): all area, good area, sum, variance */
    double dr = r > FILL_MAX_RINGS ? r / FILL_MAX_RINGS : 1.0;
    int nr = (int)ceil(r / dr);
    if (nr < 1) nr = 1;
    if (nr > FILL_MAX_RINGS) nr = FILL_MAX_RINGS;
    double aa[FILL_MAX_RINGS], ag[FILL_MAX_RINGS], sr[FILL_MAX_RINGS], vr[FILL_MAX_RINGS];
    for (int k = 0; k < nr; k++) aa[k] = ag[k] = sr[k] = vr[k] = 0.0;
    long x0 = (long)floor(xc - r - 1), x1 = (long)ceil(xc + r + 1);
    long y0 = (long)floor(yc - r - 1), y1 = (long)ceil(yc + r + 1);
    for (long y = y0; y <= y1; y++) {
        for (long x = x0; x <= x1; x++) {
            double w = overlap((double)x, (double)y, xc, yc, r);
            if (w <= 0) continue;
            int k = (int)(hypot((double)x - xc, (double)y - yc) / dr);
            if (k >= nr) k = nr - 1;
            aa[k] += w;
            if (x < 0 || x >= nx || y < 0 || y >= ny) {
                res->flags |= SP_APER_EDGE;
                continue;
            }
            size_t i = (size_t)y * (size_t)nx + (size_t)x;
            if (!(ivar[i] > 0)) continue;
            ag[k] += w;
            sr[k] += w * (data[i] - res->bkg);
            vr[k] += w * w / ivar[i];
        }
    }
    double sum = 0, var = 0, area = 0, good = 0;
    for (int k = 0; k < nr; k++) {
        area += aa[k];
        good += ag[k];
        if (aa[k] <= 0) continue;
        if (!(ag[k] >= min_cover * aa[k]) || ag[k] <= 0) res->flags |= SP_APER_MASKED;
        if (ag[k] <= 0) continue; /* no good pixel at this radius: the background value */
        double f = aa[k] / ag[k];
        sum += f * sr[k];
        var += f * f * vr[k];
    }
    res->area = area;
    res->masked_frac = area > 0 ? 1.0 - good / area : 1.0;
    if (!(good > 0)) {
        res->flags |= SP_APER_ALLMASKED;
        return;
    }
    res->flux = sum;
    res->fluxerr = sqrt(var + area * area * bkg_var);
}

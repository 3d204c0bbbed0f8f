/* score_stats.c — the scorer's numerical primitives: median, robust sigma, and the
 * Cramér–Rao bounds of a star from its pixels (see sp_score.h). */
#include "surveyproc/sp_score.h"
#include "surveyproc/sp_error.h"

#include <math.h>
#include <stdlib.h>

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Move the finite values to the front; returns how many. */
static long compact_finite(double *v, long n)
{
    long m = 0;
    for (long i = 0; i < n; i++)
        if (isfinite(v[i])) v[m++] = v[i];
    return m;
}

static double sorted_median(const double *v, long m)
{
    if (m <= 0) return NAN;
    return m % 2 ? v[m / 2] : 0.5 * (v[m / 2 - 1] + v[m / 2]);
}

double sp_score_median(double *v, long n)
{
    if (!v || n <= 0) return NAN;
    long m = compact_finite(v, n);
    qsort(v, (size_t)m, sizeof *v, cmp_double);
    return sorted_median(v, m);
}

double sp_score_rsigma(double *v, long n)
{
    if (!v || n <= 0) return NAN;
    long m = compact_finite(v, n);
    if (m < 2) return NAN;
    qsort(v, (size_t)m, sizeof *v, cmp_double);
    double med = sorted_median(v, m);
    for (long i = 0; i < m; i++) v[i] = fabs(v[i] - med);
    qsort(v, (size_t)m, sizeof *v, cmp_double);
    return 1.482602218505602 * sorted_median(v, m);
}

/* Inverse of a symmetric 3x3 matrix by cofactors; 0 if singular. */
static int inv3(const double a[3][3], double r[3][3])
{
    double c00 = a[1][1] * a[2][2] - a[1][2] * a[2][1];
    double c01 = a[1][2] * a[2][0] - a[1][0] * a[2][2];
    double c02 = a[1][0] * a[2][1] - a[1][1] * a[2][0];
    double det = a[0][0] * c00 + a[0][1] * c01 + a[0][2] * c02;
    double scale = fabs(a[0][0] * a[1][1] * a[2][2]);
    if (!(fabs(det) > 1e-14 * scale) || !isfinite(det)) return 0;
    r[0][0] = c00 / det;
    r[1][0] = c01 / det;
    r[2][0] = c02 / det;
    r[0][1] = (a[0][2] * a[2][1] - a[0][1] * a[2][2]) / det;
    r[1][1] = (a[0][0] * a[2][2] - a[0][2] * a[2][0]) / det;
    r[2][1] = (a[0][1] * a[2][0] - a[0][0] * a[2][1]) / det;
    r[0][2] = (a[0][1] * a[1][2] - a[0][2] * a[1][1]) / det;
    r[1][2] = (a[0][2] * a[1][0] - a[0][0] * a[1][2]) / det;
    r[2][2] = (a[0][0] * a[1][1] - a[0][1] * a[1][0]) / det;
    return 1;
}

int sp_score_crlb_pixels(const double *P, const double *dPx, const double *dPy, long npix, double flux,
                         const sp_score_noise *fr, int nfr, sp_score_crlb *out)
{
    if (out) out->sig_f_known = out->sig_f_free = out->sig_x = out->sig_y = NAN;
    if (!P || !out || !fr || nfr < 1 || npix < 1 || !isfinite(flux))
        return SP_FAIL(SP_ERR_INPUT, "sp_score_crlb_pixels: bad arguments (npix %ld, nframes %d, flux %g)", npix,
                       nfr, flux);
    const int pos = dPx && dPy;
    double f[3][3] = {{0}};
    for (int k = 0; k < nfr; k++) {
        double s = fr[k].scale, sky = fr[k].skysig, g = fr[k].egain;
        if (!(s > 0) || !(sky >= 0))
            return SP_FAIL(SP_ERR_INPUT, "sp_score_crlb_pixels: frame %d: scale %g, SKYSIG %g", k, s, sky);
        int poisson = isfinite(g) && g > 0;
        for (long i = 0; i < npix; i++) {
            double raw = flux * P[i] / s; /* the star's own counts in this frame (ADU) */
            double v = (sky * sky + (poisson && raw > 0 ? raw / g : 0)) * s * s;
            if (!(v > 0)) continue;
            double d[3] = {P[i], pos ? flux * dPx[i] : 0, pos ? flux * dPy[i] : 0};
            for (int a = 0; a < 3; a++)
                for (int b = 0; b < 3; b++) f[a][b] += d[a] * d[b] / v;
        }
    }
    if (!(f[0][0] > 0)) return SP_FAIL(SP_ERR_NUMERIC, "sp_score_crlb_pixels: no information on the flux");
    out->sig_f_known = 1.0 / sqrt(f[0][0]);
    if (!pos) return SP_OK;
    double r[3][3];
    if (!inv3(f, r) || !(r[0][0] > 0) || !(r[1][1] > 0) || !(r[2][2] > 0))
        return SP_FAIL(SP_ERR_NUMERIC, "sp_score_crlb_pixels: singular Fisher matrix over (F, x, y)");
    out->sig_f_free = sqrt(r[0][0]);
    out->sig_x = sqrt(r[1][1]);
    out->sig_y = sqrt(r[2][2]);
    return SP_OK;
}

/* fit_render.c — unit-flux source models in one image's box, with analytic
 * derivatives with respect to the geometry (scene position, ln s, eta1, eta2,
 * Sersic n).
 *
 * STAR: the ePSF interpolated at the sub-pixel position (sp_psf_render).
 * Galaxies, route GMIX: the galaxy mixture (in scene px, mapped to the image
 * by the affine transform: Sigma_img = A Sigma A^T) convolved analytically
 * with the Gaussian-mixture fit of the ePSF, evaluated at pixel centres.
 * Galaxies, route FFT: fit_fft.c.
 */
#include "fit_internal.h"

#include "surveyproc/sp_error.h"

#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* S' = A S A^T for symmetric 2x2 S = (xx, xy, yy), A = [[a0, a1], [a3, a4]]. */
static void sym_transform(const double *aff, const double S[3], double out[3])
{
    double a = aff[0], b = aff[1], c = aff[3], d = aff[4];
    /* M = A S */
    double m00 = a * S[0] + b * S[1], m01 = a * S[1] + b * S[2];
    double m10 = c * S[0] + d * S[1], m11 = c * S[1] + d * S[2];
    out[0] = m00 * a + m01 * b;
    out[1] = m00 * c + m01 * d;
    out[2] = m10 * c + m11 * d;
}

#define ROWMAX 512 /* box rows are at most 2 * box_max_half + 1 (<= 257) */

static int is_identity(const double *aff)
{
    return aff[0] == 1.0 && aff[1] == 0.0 && aff[3] == 0.0 && aff[4] == 1.0;
}

/* The ePSF at the sub-pixel position, separably: sp_psf_render's Keys
 * six-point kernel (same weights, same summation order: horizontal taps
 * first, then vertical), but each stamp row's horizontal pass is computed
 * once for all the output rows that use it (a ring of rows) and the loops run
 * over contiguous rows, so they vectorise. Values and d/dxc, d/dyc as
 * sp_psf_render (pixels whose taps miss the stamp are 0). */
static inline void keys6w(double s, double *w, double *dw)
{
    double a = fabs(s), sg = s < 0 ? -1.0 : 1.0;
    if (a < 1.0) {
        *w = (4.0 / 3.0 * a - 7.0 / 3.0) * a * a + 1.0;
        *dw = sg * (4.0 * a - 14.0 / 3.0) * a;
    } else if (a < 2.0) {
        *w = ((-7.0 / 12.0 * a + 3.0) * a - 59.0 / 12.0) * a + 15.0 / 6.0;
        *dw = sg * ((-7.0 / 4.0 * a + 6.0) * a - 59.0 / 12.0);
    } else if (a < 3.0) {
        *w = ((1.0 / 12.0 * a - 2.0 / 3.0) * a + 21.0 / 12.0) * a - 1.5;
        *dw = sg * ((0.25 * a - 4.0 / 3.0) * a + 21.0 / 12.0);
    } else {
        *w = 0.0;
        *dw = 0.0;
    }
}

#define SEP_RING 16 /* > NTAP + oversamp (<= 8) */

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) static void
star_render_sep(const sp_psf *psf, double xc, double yc, int nx, int ny, double *out, double *odx, double *ody)
{
    const int os = psf->oversamp, size = psf->size;
    const double c = 0.5 * (size - 1);
    const size_t npix = (size_t)nx * ny;
    if (!isfinite(xc) || !isfinite(yc) || nx <= 0 || ny <= 0 || nx > ROWMAX) {
        memset(out, 0, sizeof(double) * npix);
        if (odx) memset(odx, 0, sizeof(double) * npix);
        if (ody) memset(ody, 0, sizeof(double) * npix);
        return;
    }
    const double u0 = c - xc * os, v0 = c - yc * os;
    double wx[6], dwx[6], wy[6], dwy[6];
    double flu = floor(u0), flv = floor(v0);
    const int i00 = (int)flu - 2, j00 = (int)flv - 2;
    for (int a = 0; a < 6; a++) {
        keys6w(u0 - flu - (double)(a - 2), &wx[a], &dwx[a]);
        keys6w(v0 - flv - (double)(a - 2), &wy[a], &dwy[a]);
        dwx[a] *= -os;
        dwy[a] *= -os;
    }
    const int want_d = odx != NULL || ody != NULL;
    /* pixels whose taps touch the stamp (the rest is 0), as sp_psf_render */
    int ilo = (int)ceil((double)(-5 - i00) / os), ihi = (int)floor((double)(size - 1 - i00) / os);
    int jlo = (int)ceil((double)(-5 - j00) / os), jhi = (int)floor((double)(size - 1 - j00) / os);
    if (ilo < 0) ilo = 0;
    if (jlo < 0) jlo = 0;
    if (ihi > nx - 1) ihi = nx - 1;
    if (jhi > ny - 1) jhi = ny - 1;
    if (ilo > ihi || jlo > jhi || ilo > 0 || ihi < nx - 1 || jlo > 0 || jhi < ny - 1) {
        memset(out, 0, sizeof(double) * npix);
        if (odx) memset(odx, 0, sizeof(double) * npix);
        if (ody) memset(ody, 0, sizeof(double) * npix);
        if (ilo > ihi || jlo > jhi) return;
    }
    const int w = ihi - ilo + 1;
    /* interior pixels: all six taps inside the stamp columns */
    int ia = (int)ceil((double)(-i00) / os), ib = (int)floor((double)(size - 6 - i00) / os);
    if (ia < ilo) ia = ilo;
    if (ib > ihi) ib = ihi;
    double H[SEP_RING][ROWMAX], G[SEP_RING][ROWMAX];
    long done = LONG_MIN; /* highest stamp row in the ring */
    for (int j = jlo; j <= jhi; j++) {
        const long jb = (long)j00 + (long)j * os;
        for (long r = jb > done + 1 ? jb : done + 1; r <= jb + 5; r++) {
            double *h = H[r & (SEP_RING - 1)], *g = G[r & (SEP_RING - 1)];
            if (r < 0 || r >= size) {
                memset(h + ilo, 0, sizeof(double) * (size_t)w);
                if (want_d) memset(g + ilo, 0, sizeof(double) * (size_t)w);
                continue;
            }
            const float *row = psf->data + (size_t)r * size;
            for (int i = ilo; i <= ihi; i++) {
                if (i >= ia && i <= ib) {
                    /* interior: a straight run */
                    const int n = ib - ia + 1;
                    const float *p0 = row + i00 + (long)ia * os;
#pragma omp simd
                    for (int t = 0; t < n; t++) {
                        const float *q = p0 + (size_t)t * os;
                        double hv = 0.0, gv = 0.0;
                        for (int a = 0; a < 6; a++) {
                            hv += wx[a] * q[a];
                            gv += dwx[a] * q[a];
                        }
                        h[ia + t] = hv;
                        g[ia + t] = gv;
                    }
                    i = ib;
                    continue;
                }
                const long base = (long)i00 + (long)i * os;
                double hv = 0.0, gv = 0.0;
                for (int a = 0; a < 6; a++) {
                    const long k = base + a;
                    const double sv = (k >= 0 && k < size) ? row[k] : 0.0;
                    hv += wx[a] * sv;
                    gv += dwx[a] * sv;
                }
                h[i] = hv;
                g[i] = gv;
            }
        }
        if (jb + 5 > done) done = jb + 5;
        const double *h0 = H[(jb) & (SEP_RING - 1)], *h1 = H[(jb + 1) & (SEP_RING - 1)],
                     *h2 = H[(jb + 2) & (SEP_RING - 1)], *h3 = H[(jb + 3) & (SEP_RING - 1)],
                     *h4 = H[(jb + 4) & (SEP_RING - 1)], *h5 = H[(jb + 5) & (SEP_RING - 1)];
        double *o = out + (size_t)j * nx;
#pragma omp simd
        for (int i = ilo; i <= ihi; i++) {
            double v = 0.0;
            v += wy[0] * h0[i];
            v += wy[1] * h1[i];
            v += wy[2] * h2[i];
            v += wy[3] * h3[i];
            v += wy[4] * h4[i];
            v += wy[5] * h5[i];
            o[i] = v;
        }
        if (odx) {
            const double *g0 = G[(jb) & (SEP_RING - 1)], *g1 = G[(jb + 1) & (SEP_RING - 1)],
                         *g2 = G[(jb + 2) & (SEP_RING - 1)], *g3 = G[(jb + 3) & (SEP_RING - 1)],
                         *g4 = G[(jb + 4) & (SEP_RING - 1)], *g5 = G[(jb + 5) & (SEP_RING - 1)];
            double *ox = odx + (size_t)j * nx;
#pragma omp simd
            for (int i = ilo; i <= ihi; i++) {
                double v = 0.0;
                v += wy[0] * g0[i];
                v += wy[1] * g1[i];
                v += wy[2] * g2[i];
                v += wy[3] * g3[i];
                v += wy[4] * g4[i];
                v += wy[5] * g5[i];
                ox[i] = v;
            }
        }
        if (ody) {
            double *oy = ody + (size_t)j * nx;
#pragma omp simd
            for (int i = ilo; i <= ihi; i++) {
                double v = 0.0;
                v += dwy[0] * h0[i];
                v += dwy[1] * h1[i];
                v += dwy[2] * h2[i];
                v += dwy[3] * h3[i];
                v += dwy[4] * h4[i];
                v += dwy[5] * h5[i];
                oy[i] = v;
            }
        }
    }
}

static void render_star(const sp_fit_image *img, const fit_geom *g, const fit_box *b, double *m,
                        double *const dm[P_MAX])
{
    const double *a = img->aff;
    double u = a[0] * g->p[P_X] + a[1] * g->p[P_Y] + a[2];
    double v = a[3] * g->p[P_X] + a[4] * g->p[P_Y] + a[5];
    double *du = dm[P_X], *dv = dm[P_Y];
    star_render_sep(img->psf, u - b->bx0, v - b->by0, b->bw, b->bh, m, du, dv);
    const int n = b->bw * b->bh;
    const double fs = img->flux_scale;
    if (du && dv && !is_identity(a)) {
        for (int k = 0; k < n; k++) {
            double gu = du[k], gv = dv[k];
            du[k] = a[0] * gu + a[3] * gv;
            dv[k] = a[1] * gu + a[4] * gv;
        }
    }
    if (fs != 1.0) {
        for (int k = 0; k < n; k++) m[k] *= fs;
        if (du)
            for (int k = 0; k < n; k++) du[k] *= fs;
        if (dv)
            for (int k = 0; k < n; k++) dv[k] *= fs;
    }
}

/* One Gaussian of the galaxy x PSF mixture in image px (after convolution). */
typedef struct {
    double amp, damp;           /* amplitude (x flux_scale) and its d/dn */
    double cx, cy;              /* centre in box px */
    double ixx, ixy, iyy, norm; /* inverse covariance, 1 / (2 pi sqrt(det)) */
    double qmax;                /* evaluated where the quadratic form is <= qmax */
    double dC[4][3], tr[4];     /* dC/dp (ln s, eta1, eta2, n) and tr(C^-1 dC) */
} gmix_comp;

/* Which planes a render fills: values only (linear solves, the model),
 * + position (stage 2), + position and shape (stage 3), anything (Sersic n,
 * partial sets). */
enum { GM_VAL = 0, GM_POS = 1, GM_SHAPE = 2, GM_ANY = 3 };

/* One component over one row segment, every requested plane in one pass
 * (fused: the Gaussian and C^-1 d are computed once per pixel and feed all
 * planes). MODE is a compile-time constant after inlining. */
static inline __attribute__((always_inline)) void gmix_row(const int MODE, const gmix_comp *cp, const double *a,
                                                           int x0, int len, double dy, size_t o0, double *m,
                                                           double *const dm[P_MAX], const int want_sh[3],
                                                           int want_n)
{
    const double ixx = cp->ixx, ixy = cp->ixy, iyy = cp->iyy, norm = cp->norm, amp = cp->amp, cx = cp->cx;
    const double dyx = ixy * dy, dyy = iyy * dy;
    double *restrict mrow = m + o0;
    if (MODE == GM_VAL) {
#pragma omp simd
        for (int t = 0; t < len; t++) {
            const double dx = x0 + t - cx;
            const double Gx = ixx * dx + dyx, Gy = ixy * dx + dyy;
            mrow[t] += amp * (norm * fit_exp_neg(-0.5 * (dx * Gx + dy * Gy)));
        }
        return;
    }
    const double ax = amp * a[0], bx = amp * a[3], ay = amp * a[1], by = amp * a[4];
    double *restrict dxr = dm[P_X] ? dm[P_X] + o0 : NULL, *restrict dyr = dm[P_Y] ? dm[P_Y] + o0 : NULL;
    if (MODE == GM_POS) {
#pragma omp simd
        for (int t = 0; t < len; t++) {
            const double dx = x0 + t - cx;
            const double Gx = ixx * dx + dyx, Gy = ixy * dx + dyy;
            const double ev = norm * fit_exp_neg(-0.5 * (dx * Gx + dy * Gy));
            mrow[t] += amp * ev;
            dxr[t] += ev * (ax * Gx + bx * Gy);
            dyr[t] += ev * (ay * Gx + by * Gy);
        }
        return;
    }
    const double h = 0.5 * amp;
    const double s00 = cp->dC[0][0], s01 = 2.0 * cp->dC[0][1], s02 = cp->dC[0][2], t0 = cp->tr[0];
    const double s10 = cp->dC[1][0], s11 = 2.0 * cp->dC[1][1], s12 = cp->dC[1][2], t1 = cp->tr[1];
    const double s20 = cp->dC[2][0], s21 = 2.0 * cp->dC[2][1], s22 = cp->dC[2][2], t2 = cp->tr[2];
    if (MODE == GM_SHAPE) {
        double *restrict r0 = dm[P_LNS] + o0, *restrict r1 = dm[P_E1] + o0, *restrict r2 = dm[P_E2] + o0;
#pragma omp simd
        for (int t = 0; t < len; t++) {
            const double dx = x0 + t - cx;
            const double Gx = ixx * dx + dyx, Gy = ixy * dx + dyy;
            const double ev = norm * fit_exp_neg(-0.5 * (dx * Gx + dy * Gy));
            mrow[t] += amp * ev;
            dxr[t] += ev * (ax * Gx + bx * Gy);
            dyr[t] += ev * (ay * Gx + by * Gy);
            const double xx = Gx * Gx, xy = Gx * Gy, yy = Gy * Gy, he = h * ev;
            r0[t] += he * (xx * s00 + xy * s01 + yy * s02 - t0);
            r1[t] += he * (xx * s10 + xy * s11 + yy * s12 - t1);
            r2[t] += he * (xx * s20 + xy * s21 + yy * s22 - t2);
        }
        return;
    }
    /* anything: per-plane tests outside the pixel loop */
    double ev[ROWMAX], gxv[ROWMAX], gyv[ROWMAX];
#pragma omp simd
    for (int t = 0; t < len; t++) {
        const double dx = x0 + t - cx;
        const double Gx = ixx * dx + dyx, Gy = ixy * dx + dyy;
        gxv[t] = Gx;
        gyv[t] = Gy;
        ev[t] = norm * fit_exp_neg(-0.5 * (dx * Gx + dy * Gy));
        mrow[t] += amp * ev[t];
    }
    if (dm[P_X]) {
#pragma omp simd
        for (int t = 0; t < len; t++) dxr[t] += ev[t] * (ax * gxv[t] + bx * gyv[t]);
    }
    if (dm[P_Y]) {
#pragma omp simd
        for (int t = 0; t < len; t++) dyr[t] += ev[t] * (ay * gxv[t] + by * gyv[t]);
    }
    for (int p = 0; p < 3; p++) {
        if (!want_sh[p]) continue;
        double *restrict r = dm[P_LNS + p] + o0;
        const double c0 = cp->dC[p][0], c1 = 2.0 * cp->dC[p][1], c2 = cp->dC[p][2], tp = cp->tr[p];
#pragma omp simd
        for (int t = 0; t < len; t++)
            r[t] += h * ev[t] * (gxv[t] * gxv[t] * c0 + gxv[t] * gyv[t] * c1 + gyv[t] * gyv[t] * c2 - tp);
    }
    if (want_n) {
        double *restrict r = dm[P_N] + o0;
        const double c0 = cp->dC[3][0], c1 = 2.0 * cp->dC[3][1], c2 = cp->dC[3][2], tp = cp->tr[3];
        const double damp = cp->damp;
#pragma omp simd
        for (int t = 0; t < len; t++)
            r[t] += damp * ev[t] + h * ev[t] * (gxv[t] * gxv[t] * c0 + gxv[t] * gyv[t] * c1 + gyv[t] * gyv[t] * c2 - tp);
    }
}

/* A component over the box: rows within its ellipse q <= qmax, per row the
 * exact x interval. */
static inline __attribute__((always_inline)) void gmix_comp_render(const int MODE, const gmix_comp *cp,
                                                                   const double *a, int bw, int bh, double *m,
                                                                   double *const dm[P_MAX], const int want_sh[3],
                                                                   int want_n)
{
    const double Q = cp->qmax, ixx = cp->ixx, ixy = cp->ixy, iyy = cp->iyy, cx = cp->cx, cy = cp->cy;
    /* rows: |dy| <= sqrt(Q cyy), cyy = ixx det(C) = ixx / (ixx iyy - ixy^2) */
    const double cyy = ixx / (ixx * iyy - ixy * ixy);
    int y0 = (int)ceil(cy - sqrt(Q * cyy)), y1 = (int)floor(cy + sqrt(Q * cyy));
    if (y0 < 0) y0 = 0;
    if (y1 > bh - 1) y1 = bh - 1;
    for (int py = y0; py <= y1; py++) {
        const double dy = py - cy;
        /* ixx dx^2 + 2 ixy dy dx + iyy dy^2 - Q <= 0 */
        const double bq = ixy * dy, disc = bq * bq - ixx * (iyy * dy * dy - Q);
        if (disc < 0.0) continue;
        const double sq = sqrt(disc);
        int x0 = (int)ceil(cx + (-bq - sq) / ixx), x1 = (int)floor(cx + (-bq + sq) / ixx);
        if (x0 < 0) x0 = 0;
        if (x1 > bw - 1) x1 = bw - 1;
        if (x1 < x0) continue;
        gmix_row(MODE, cp, a, x0, x1 - x0 + 1, dy, (size_t)py * bw + x0, m, dm, want_sh, want_n);
    }
}

/* Contributions below this fraction of the model's peak are not evaluated:
 * components whose own peak is below it are skipped, the others only inside
 * the ellipse where they exceed it (at most q = 60, e^-30 of their peak). */
#define GMIX_REL_CUT 1e-8

/* Built for AVX2 / AVX-512 too, dispatched at run time (the row loops are
 * vectorised with #pragma omp simd). */
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) static void
render_gal_gmix(const sp_fit_image *img, const psf_mix *pm, const fit_geom *g, const fit_box *b, double *m,
                double *const dm[P_MAX])
{
    const double *a = img->aff;
    const int bw = b->bw, bh = b->bh, n = bw * bh;
    const double u = a[0] * g->p[P_X] + a[1] * g->p[P_Y] + a[2] - b->bx0;
    const double v = a[3] * g->p[P_X] + a[4] * g->p[P_Y] + a[5] - b->by0;
    double S0[3], dS0[3][3], Si[3], dSi[3][3];
    fit_shape_matrix(g->p[P_LNS], g->p[P_E1], g->p[P_E2], S0, dS0);
    sym_transform(a, S0, Si);
    for (int p = 0; p < 3; p++) sym_transform(a, dS0[p], dSi[p]);
    const int want_pos = dm[P_X] != NULL || dm[P_Y] != NULL;
    const int want_sh[3] = {dm[P_LNS] != NULL, dm[P_E1] != NULL, dm[P_E2] != NULL};
    const int want_n = dm[P_N] != NULL && g->type == SP_SRC_SERSIC;
    memset(m, 0, sizeof(double) * (size_t)n);
    for (int j = 0; j < P_MAX; j++)
        if (dm[j]) memset(dm[j], 0, sizeof(double) * (size_t)n);
    const gal_profile *pr = &g->prof;
    const double fs = img->flux_scale;
    /* the convolved components, and the model's peak (the sum of their
     * peaks: the value at the centre when the means coincide) */
    gmix_comp cs[GMIX_MAXK * PSFMIX_MAXK];
    int nc = 0;
    double peak = 0.0;
    for (int k = 0; k < pr->k; k++) {
        for (int c = 0; c < pm->k; c++) {
            gmix_comp *cp = &cs[nc];
            cp->amp = pr->amp[k] * pm->amp[c] * fs;
            cp->damp = pr->damp[k] * pm->amp[c] * fs;
            if (cp->amp == 0.0 && !(want_n && cp->damp != 0.0)) continue;
            const double vk = pr->var[k];
            const double cxx = vk * Si[0] + pm->cxx[c], cxy = vk * Si[1] + pm->cxy[c], cyy = vk * Si[2] + pm->cyy[c];
            const double det = cxx * cyy - cxy * cxy;
            if (!(det > 0.0)) continue;
            cp->ixx = cyy / det;
            cp->ixy = -cxy / det;
            cp->iyy = cxx / det;
            cp->norm = 1.0 / (2.0 * M_PI * sqrt(det));
            cp->cx = u + pm->mx[c];
            cp->cy = v + pm->my[c];
            /* dC/dp = vk dSi[p]; tr(C^-1 dC) */
            for (int p = 0; p < 3; p++) {
                for (int t = 0; t < 3; t++) cp->dC[p][t] = vk * dSi[p][t];
                cp->tr[p] = cp->ixx * cp->dC[p][0] + 2.0 * cp->ixy * cp->dC[p][1] + cp->iyy * cp->dC[p][2];
            }
            const double dvk = pr->dvar[k];
            for (int t = 0; t < 3; t++) cp->dC[3][t] = dvk * Si[t];
            cp->tr[3] = cp->ixx * cp->dC[3][0] + 2.0 * cp->ixy * cp->dC[3][1] + cp->iyy * cp->dC[3][2];
            peak += cp->amp * cp->norm;
            nc++;
        }
    }
    const double cut = GMIX_REL_CUT * fabs(peak);
    const int mode = !want_pos && !want_sh[0] && !want_sh[1] && !want_sh[2] && !want_n ? GM_VAL
                     : dm[P_X] && dm[P_Y] && !want_sh[0] && !want_sh[1] && !want_sh[2] && !want_n ? GM_POS
                     : dm[P_X] && dm[P_Y] && want_sh[0] && want_sh[1] && want_sh[2] && !want_n   ? GM_SHAPE
                                                                                                   : GM_ANY;
    for (int q = 0; q < nc; q++) {
        gmix_comp *cp = &cs[q];
        double top = fabs(cp->amp) * cp->norm;
        if (want_n) top = fmax(top, fabs(cp->damp) * cp->norm);
        if (!(top >= cut)) continue; /* below the cut everywhere (and NaN-safe) */
        const double qc = cut > 0.0 ? 2.0 * log(top / cut) : 60.0;
        cp->qmax = qc < 60.0 ? qc : 60.0;
        switch (mode) {
        case GM_VAL: gmix_comp_render(GM_VAL, cp, a, bw, bh, m, dm, want_sh, want_n); break;
        case GM_POS: gmix_comp_render(GM_POS, cp, a, bw, bh, m, dm, want_sh, want_n); break;
        case GM_SHAPE: gmix_comp_render(GM_SHAPE, cp, a, bw, bh, m, dm, want_sh, want_n); break;
        default: gmix_comp_render(GM_ANY, cp, a, bw, bh, m, dm, want_sh, want_n); break;
        }
    }
}

int fit_render(const sp_fit_image *img, psf_cache_entry *pc, int conv, const fit_geom *g, const fit_box *b,
               double *m, double *const dm[P_MAX], fit_fft_scratch *fs)
{
    if (b->bw <= 0 || b->bh <= 0) return SP_OK;
    if (g->type == SP_SRC_STAR) {
        render_star(img, g, b, m, dm);
        return SP_OK;
    }
    if (conv == SP_FIT_CONV_FFT) return fit_render_gal_fft(img, pc, g, b, m, dm, fs);
    render_gal_gmix(img, &pc->mix, g, b, m, dm);
    return SP_OK;
}

/* epsf.c — empirical PSF builder, quality gate, Moffat fallback, growth
 * curve and the cell-grid interpolation (sp_epsf.h). Method: sp_epsf.h and
 * docs/psf.md. */
#include "surveyproc/sp_epsf.h"

#include "surveyproc/sp_background.h"
#include "surveyproc/sp_error.h"
#include "psf_internal.h"

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FWHM2SIG 0.42466090014400953
#define CLIP_MODEL_FRAC 0.02 /* clipping tolerance floor, fraction of the local model */

void sp_epsf_params_default(sp_epsf_params *p)
{
    p->oversamp = 2;
    p->final_size = 41;
    p->max_iters = 4;
    p->conv_tol = 2e-4;
    p->clip_sigma = 5.0;
    p->reject_sigma = 3.0;
    p->fallback_reject_sigma = 0.0;
    p->neighbours = NULL;
    p->nneighbours = 0;
    p->neighbour_rscale = 3.0;
    p->core_fwhm = 0.0;
    p->core_taper_fwhm = 1.0;
    p->fallback_resid_fwhm = 0.0;
    p->smooth = 1;
    p->spatial_degree = 1;
    p->spatial_min_stars = 12;
    p->field_xy = NULL;
    p->spatial_scale = 0.0;
    p->wing_smooth_k = 0.0;
    p->wing_smooth_r0 = 1.5;
    p->x_ref = NAN;
    p->y_ref = NAN;
    p->fit_radius = 0.0;
    p->local_bkg = 1;
    p->bkg_radius = 0.0;
    p->min_stars = 5;
    p->fallback_fwhm = 4.0;
    p->fallback_beta = 3.5;
    p->max_center_offset = 0.25;
    p->max_neg_frac = 0.05;
    p->keep_stamps = 1;
}

void sp_epsf_result_free(sp_epsf_result **res)
{
    if (!res || !*res) return;
    sp_epsf_result *r = *res;
    sp_psf_free(&r->psf);
    free(r->growth_r);
    free(r->growth_ee);
    free(r->star_x);
    free(r->star_y);
    free(r->star_flux);
    free(r->star_bkg);
    free(r->star_chi2);
    free(r->star_used);
    free(r->star_stamps);
    free(r->resid_stamps);
    free(r->grad_x);
    free(r->grad_y);
    free(r->terms);
    free(r);
    *res = NULL;
}

static inline int pix_ok(const float *img, const float *ivar, const uint8_t *mask, size_t k)
{
    return fabsf(img[k]) <= FLT_MAX && !(mask && mask[k]) && !(ivar && !(ivar[k] > 0.0f && ivar[k] <= FLT_MAX));
}

/* ------------------------------------------------------------------------ */
/* Value-only rendering                                                       */

/* Keys (1981) six-point cubic convolution kernel: the interpolant of
 * sp_psf_eval / sp_psf_render (src/psf/psf.c). The builder renders each star
 * cutout several times per iteration and needs no derivatives there, so it
 * uses this separable value-only copy (about 3-8x cheaper); test_epsf checks
 * that it matches sp_psf_render to rounding. */
static inline double keys6w(double s)
{
    double a = fabs(s);
    if (a < 1.0) return (4.0 / 3.0 * a - 7.0 / 3.0) * a * a + 1.0;
    if (a < 2.0) return ((-7.0 / 12.0 * a + 3.0) * a - 59.0 / 12.0) * a + 15.0 / 6.0;
    if (a < 3.0) return ((1.0 / 12.0 * a - 2.0 / 3.0) * a + 21.0 / 12.0) * a - 1.5;
    return 0.0;
}

/* out[N*N] = the PSF centred at (xc, yc) in the N x N grid (pixel (i, j) at
 * (i, j)), values only. H: scratch of (size + 6) * N doubles. */
static void render_vals(const sp_psf *psf, double xc, double yc, int N, double *out, double *H)
{
    const int os = psf->oversamp, S = psf->size;
    const double c = 0.5 * (S - 1);
    const double u0 = c - xc * os, v0 = c - yc * os;
    const double fu = floor(u0), fv = floor(v0);
    const int i00 = (int)fu - 2, j00 = (int)fv - 2;
    double wx[6], wy[6];
    for (int a = 0; a < 6; a++) {
        wx[a] = keys6w(u0 - fu - (a - 2));
        wy[a] = keys6w(v0 - fv - (a - 2));
    }
    /* stamp rows r = j00 + j os + b that can be non-zero: r in [0, S) */
    int rlo = j00 < 0 ? 0 : j00, rhi = j00 + (N - 1) * os + 5;
    if (rhi > S - 1) rhi = S - 1;
    for (int r = rlo; r <= rhi; r++) {
        const float *row = psf->data + (size_t)r * S;
        double *h = H + (size_t)(r - rlo) * N;
        for (int i = 0; i < N; i++) {
            int ib = i00 + i * os;
            double v = 0;
            if (ib >= 0 && ib + 5 < S) {
                for (int a = 0; a < 6; a++) v += wx[a] * row[ib + a];
            } else {
                for (int a = 0; a < 6; a++) {
                    int ii = ib + a;
                    if (ii >= 0 && ii < S) v += wx[a] * row[ii];
                }
            }
            h[i] = v;
        }
    }
    for (int j = 0; j < N; j++) {
        double *o = out + (size_t)j * N;
        for (int i = 0; i < N; i++) o[i] = 0.0;
        for (int b = 0; b < 6; b++) {
            int r = j00 + j * os + b;
            if (r < rlo || r > rhi) continue;
            const double *h = H + (size_t)(r - rlo) * N;
            const double w = wy[b];
            for (int i = 0; i < N; i++) o[i] += w * h[i];
        }
    }
}

/* ------------------------------------------------------------------------ */
/* Geometry helpers                                                           */

double sp_epsf_encircled(const sp_psf *psf, double r)
{
    const int S = psf->size, os = psf->oversamp;
    const double c = 0.5 * (S - 1), rr = r * os;
    double s = 0;
    for (int j = 0; j < S; j++) {
        double dy = j - c;
        if (fabs(dy) > rr) continue;
        for (int i = 0; i < S; i++) {
            double dx = i - c;
            if (dx * dx + dy * dy <= rr * rr) s += psf->data[(size_t)j * S + i];
        }
    }
    return s / ((double)os * os);
}

/* FWHM from the area above half maximum, on a 0.2-pixel grid of the Keys
 * interpolant (finer than sp_psf_moments' node count at low oversampling). */
static double psf_fwhm(const sp_psf *psf)
{
    double cx, cy, f0;
    sp_psf_moments(psf, &cx, &cy, &f0);
    double peak = sp_psf_eval(psf, cx, cy);
    if (!(peak > 0) || !(f0 > 0)) return f0;
    double R = 1.5 * f0 + 1.0, st = 0.2;
    long n = 0;
    for (double y = -R; y <= R; y += st)
        for (double x = -R; x <= R; x += st)
            if (sp_psf_eval(psf, cx + x, cy + y) >= 0.5 * peak) n++;
    return 2.0 * sqrt(n * st * st / M_PI);
}

/* Windowed centroid of the PSF stamp (image pixels from the centre).
 * The Gaussian window is separable: one exp per row and column per step. */
static void psf_centroid(const sp_psf *psf, double fwhm, double *ox, double *oy)
{
    const int S = psf->size, os = psf->oversamp;
    const double c = 0.5 * (S - 1), sig = fmax(0.5, fwhm * FWHM2SIG) * os, is2 = 1.0 / (2 * sig * sig);
    double gxv[1024], gyv[1024];
    double x = 0, y = 0; /* grid units from c */
    if (S > 1024) {
        *ox = *oy = 0;
        return;
    }
    for (int it = 0; it < 20; it++) {
        for (int i = 0; i < S; i++) {
            double dx = i - c - x, dy = i - c - y;
            gxv[i] = exp(-dx * dx * is2);
            gyv[i] = exp(-dy * dy * is2);
        }
        double sw = 0, sx = 0, sy = 0;
        for (int j = 0; j < S; j++) {
            double dy = j - c - y;
            if (fabs(dy) > 4 * sig) continue;
            const float *row = psf->data + (size_t)j * S;
            double rw = 0, rx = 0;
            for (int i = 0; i < S; i++) {
                double w = gxv[i] * row[i];
                rw += w;
                rx += w * (i - c - x);
            }
            sw += gyv[j] * rw;
            sx += gyv[j] * rx;
            sy += gyv[j] * rw * dy;
        }
        if (!(sw > 0)) break;
        double ddx = 2 * sx / sw, ddy = 2 * sy / sw;
        x += ddx;
        y += ddy;
        if (fabs(ddx) < 1e-5 * os && fabs(ddy) < 1e-5 * os) break;
    }
    *ox = x / os;
    *oy = y / os;
}

/* Shift the PSF so that what was at (dx, dy) image pixels moves to 0: Keys
 * resampling, separable (every node has the same sub-sample phase).
 * tmp: size^2 floats. */
static void psf_shift(sp_psf *psf, double dx, double dy, float *tmp)
{
    const int S = psf->size, os = psf->oversamp;
    const double sx = dx * os, sy = dy * os; /* node units */
    const double fx = floor(sx), fy = floor(sy);
    const int ox = (int)fx - 2, oy = (int)fy - 2;
    double wx[6], wy[6];
    for (int a = 0; a < 6; a++) {
        wx[a] = keys6w(sx - fx - (a - 2));
        wy[a] = keys6w(sy - fy - (a - 2));
    }
    /* along x into tmp */
    for (int j = 0; j < S; j++) {
        const float *row = psf->data + (size_t)j * S;
        float *t = tmp + (size_t)j * S;
        for (int i = 0; i < S; i++) {
            double v = 0;
            for (int a = 0; a < 6; a++) {
                int ii = i + ox + a;
                if (ii >= 0 && ii < S) v += wx[a] * row[ii];
            }
            t[i] = (float)v;
        }
    }
    /* along y back into the PSF */
    for (int j = 0; j < S; j++) {
        float *o = psf->data + (size_t)j * S;
        for (int i = 0; i < S; i++) o[i] = 0.0f;
        for (int b = 0; b < 6; b++) {
            int jj = j + oy + b;
            if (jj < 0 || jj >= S) continue;
            const float *t = tmp + (size_t)jj * S;
            const float w = (float)wy[b];
            for (int i = 0; i < S; i++) o[i] += w * t[i];
        }
    }
}

/* Separable triangle smoothing (width 2 os - 1) of a size x size grid, zero
 * outside. tmp: size^2 doubles. */
static void tri_smooth(double *g, double *tmp, int S, int os)
{
    const int r = os - 1;
    double k[17];
    double ks = 0;
    for (int d = -r; d <= r; d++) ks += (k[d + r] = os - abs(d));
    for (int d = 0; d <= 2 * r; d++) k[d] /= ks;
    for (int j = 0; j < S; j++)
        for (int i = 0; i < S; i++) {
            double s = 0;
            for (int d = -r; d <= r; d++) {
                int ii = i + d;
                if (ii >= 0 && ii < S) s += k[d + r] * g[(size_t)j * S + ii];
            }
            tmp[(size_t)j * S + i] = s;
        }
    for (int j = 0; j < S; j++)
        for (int i = 0; i < S; i++) {
            double s = 0;
            for (int d = -r; d <= r; d++) {
                int jj = j + d;
                if (jj >= 0 && jj < S) s += k[d + r] * tmp[(size_t)jj * S + i];
            }
            g[(size_t)j * S + i] = s;
        }
}

/* Wing smoothing: a Gaussian whose sigma grows with the distance r from the
 * stamp centre, sigma = k (r - r0) (nodes; none inside r0), applied to the
 * stack's numerator and denominator alike (normalised convolution). A few
 * faint stars leave the ePSF's faint outer pixels as noisy as their sky; a
 * real PSF's wing varies slowly with r, so averaging over a neighbourhood that
 * widens outward cuts that noise where it dominates and keeps the core as
 * sharp as the data. Done as a blend of separable Gaussians of sigma 0, 1, 2,
 * 4, 8, 16 nodes, interpolated per node. scr: 7 S^2 doubles. */
#define WS_NSCALE 6
static void wing_smooth(double *g, int S, double r0, double k, double *scr)
{
    static const double sig[WS_NSCALE] = {0, 1, 2, 4, 8, 16};
    const size_t SS = (size_t)S * S;
    const double c = 0.5 * (S - 1);
    double *G = scr, *tmp = scr + (size_t)WS_NSCALE * SS;
    double smax = k * (M_SQRT2 * c - r0);
    memcpy(G, g, sizeof(double) * SS);
    int nsc = 1;
    for (int q = 1; q < WS_NSCALE && sig[q - 1] < smax; q++, nsc++) {
        double *o = G + (size_t)q * SS, kw[100];
        int rad = (int)ceil(3 * sig[q]);
        if (rad > 49) rad = 49;
        double ks = 0;
        for (int d = -rad; d <= rad; d++) ks += (kw[d + rad] = exp(-0.5 * d * d / (sig[q] * sig[q])));
        for (int d = 0; d <= 2 * rad; d++) kw[d] /= ks;
        for (int j = 0; j < S; j++)
            for (int i = 0; i < S; i++) {
                double a = 0;
                int d0 = i - rad < 0 ? -i : -rad, d1 = i + rad > S - 1 ? S - 1 - i : rad;
                for (int d = d0; d <= d1; d++) a += kw[d + rad] * g[(size_t)j * S + i + d];
                tmp[(size_t)j * S + i] = a;
            }
        for (int j = 0; j < S; j++)
            for (int i = 0; i < S; i++) {
                double a = 0;
                int d0 = j - rad < 0 ? -j : -rad, d1 = j + rad > S - 1 ? S - 1 - j : rad;
                for (int d = d0; d <= d1; d++) a += kw[d + rad] * tmp[(size_t)(j + d) * S + i];
                o[(size_t)j * S + i] = a;
            }
    }
    for (int j = 0; j < S; j++)
        for (int i = 0; i < S; i++) {
            double r = hypot(i - c, j - c), sg = k * (r - r0);
            if (!(sg > 0)) continue;
            int q = 0;
            while (q + 1 < nsc && sig[q + 1] <= sg) q++;
            size_t n = (size_t)j * S + i;
            if (q + 1 >= nsc) {
                g[n] = G[(size_t)q * SS + n];
                continue;
            }
            double t = (sg - sig[q]) / (sig[q + 1] - sig[q]);
            g[n] = (1 - t) * G[(size_t)q * SS + n] + t * G[(size_t)(q + 1) * SS + n];
        }
}

/* ------------------------------------------------------------------------ */
/* Stars                                                                      */

typedef struct {
    int ix, iy;        /* cutout centre pixel (fixed) */
    float *d, *w;      /* N*N data and weights (0: unusable / off image / rejected) */
    float *w0;         /* weights before rejection of contaminated pixels */
    double x, y, F, b; /* current centre (image px), flux, background */
    double x0, y0;
    double chi2;
    int used;
} bstar;

/* Gauss-Newton fit of (x, y, F) with b fixed on the box |i - ix| <= rf.
 * buf: 3 (2rf+1)^2 doubles. Returns 0 if the star is lost. */
static int fit_star(const sp_psf *psf, bstar *s, int N, int rf, int steps, double *buf)
{
    const int h = (N - 1) / 2, W = 2 * rf + 1;
    double *m = buf, *gx = buf + W * W, *gy = buf + 2 * W * W;
    /* The rejection of contaminated pixels (star_reject) can take most of a
     * bright star's core when the model is still off there by more than its
     * noise (early iterations, or a PSF that varies across the field faster
     * than the current model): the centre and flux are then fitted on the
     * weights before rejection rather than losing the star. */
    const float *wf = s->w;
    {
        int n0 = 0, n1 = 0;
        for (int bb = 0; bb < W; bb++)
            for (int a = 0; a < W; a++) {
                size_t kc = (size_t)(h - rf + bb) * N + (h - rf + a);
                n0 += s->w0[kc] > 0;
                n1 += s->w[kc] > 0;
            }
        if (2 * n1 < n0) wf = s->w0;
    }
    for (int it = 0; it < steps; it++) {
        /* box pixel (a, b) is image pixel (ix - rf + a, iy - rf + b) */
        sp_psf_render(psf, s->x - (s->ix - rf), s->y - (s->iy - rf), W, W, m, gx, gy);
        double A[9] = {0}, g[3] = {0};
        for (int bb = 0; bb < W; bb++)
            for (int a = 0; a < W; a++) {
                int ci = (h - rf + a), cj = (h - rf + bb); /* cutout coords */
                size_t kc = (size_t)cj * N + ci;
                double w = wf[kc];
                if (w <= 0) continue;
                int k = bb * W + a;
                double J[3] = {s->F * gx[k], s->F * gy[k], m[k]};
                double r = s->d[kc] - s->b - s->F * m[k];
                for (int p = 0; p < 3; p++) {
                    g[p] += w * J[p] * r;
                    for (int q = 0; q <= p; q++) A[p * 3 + q] += w * J[p] * J[q];
                }
            }
        for (int p = 0; p < 3; p++)
            for (int q = p + 1; q < 3; q++) A[p * 3 + q] = A[q * 3 + p];
        if (!chol_solve(A, g, 3)) return 0;
        double dx = g[0], dy = g[1];
        double st = hypot(dx, dy);
        if (st > 0.5) {
            dx *= 0.5 / st;
            dy *= 0.5 / st;
        }
        s->x += dx;
        s->y += dy;
        s->F += g[2];
        if (!(isfinite(s->x) && isfinite(s->y) && isfinite(s->F)) || s->F <= 0) return 0;
        if (hypot(s->x - s->x0, s->y - s->y0) > 2.0) return 0;
        if (st < 1e-4 && fabs(g[2]) < 1e-6 * s->F) break;
    }
    return 1;
}

/* Local background: weighted mean of d - F psi over the cutout pixels at
 * r >= rb, rejecting single pixels beyond clip_sigma (the same rule as the
 * stack). Faint sources below every rejection threshold then raise this
 * background exactly as much as they raise the stacked samples, so their
 * average light cancels instead of landing in the ePSF wings (a clip around
 * the median here would leave it in: docs/psf.md). */
static void star_bkg(bstar *s, const double *model, int N, double rb, double clip)
{
    const int h = (N - 1) / 2;
    double sw = 0, swe = 0;
    int n = 0;
    for (int j = 0; j < N; j++)
        for (int i = 0; i < N; i++) {
            size_t k = (size_t)j * N + i;
            double w = s->w[k];
            if (w <= 0) continue;
            double dx = s->ix - h + i - s->x, dy = s->iy - h + j - s->y;
            if (dx * dx + dy * dy < rb * rb) continue;
            double e = s->d[k] - s->F * model[k];
            double r = e - s->b;
            if (clip > 0 && r * r * w > clip * clip) continue;
            sw += w;
            swe += w * e;
            n++;
        }
    if (n >= 20 && sw > 0) s->b = swe / sw;
}

/* Reject pixels of a star's cutout that other sources contaminate: the 3x3
 * mean of the residual d - b - F psi (usable pixels) deviates from 0 by more
 * than nsig times its noise (with the model floor CLIP_MODEL_FRAC), so faint
 * neighbours and galaxies too weak to clip pixel by pixel are found; the
 * rejected pixels and their 8 neighbours get weight 0. Recomputed from w0
 * every iteration. Returns the number of rejected pixels. tmp: 3 N^2 floats. */
static int star_reject(bstar *s, const double *model, int N, double nsig, float *tmp)
{
    float *e = tmp, *v = tmp + (size_t)N * N, *rj = tmp + 2 * (size_t)N * N;
    for (int k = 0; k < N * N; k++) {
        if (s->w0[k] > 0) {
            double fm = CLIP_MODEL_FRAC * s->F * model[k];
            e[k] = (float)(s->d[k] - s->b - s->F * model[k]);
            v[k] = (float)(1.0 / s->w0[k] + fm * fm);
        } else {
            e[k] = v[k] = 0.0f;
        }
        rj[k] = 0.0f;
    }
    int nrej = 0;
    /* two scales: 3x3 (compact neighbours) and 5x5 (faint extended ones) */
    for (int sc = 1; sc <= 2; sc++)
        for (int j = 0; j < N; j++)
            for (int i = 0; i < N; i++) {
                double se = 0, sv = 0;
                int c = 0;
                for (int dj = -sc; dj <= sc; dj++)
                    for (int di = -sc; di <= sc; di++) {
                        int ii = i + di, jj = j + dj;
                        if (ii < 0 || jj < 0 || ii >= N || jj >= N) continue;
                        int k = jj * N + ii;
                        if (!(s->w0[k] > 0)) continue;
                        se += e[k];
                        sv += v[k];
                        c++;
                    }
                if (c >= 3 && se * se > nsig * nsig * sv) rj[j * N + i] = 1.0f;
            }
    for (int j = 0; j < N; j++)
        for (int i = 0; i < N; i++) {
            int bad = 0;
            for (int dj = -1; dj <= 1 && !bad; dj++)
                for (int di = -1; di <= 1; di++) {
                    int ii = i + di, jj = j + dj;
                    if (ii >= 0 && jj >= 0 && ii < N && jj < N && rj[jj * N + ii] > 0) {
                        bad = 1;
                        break;
                    }
                }
            int k = j * N + i;
            s->w[k] = bad ? 0.0f : s->w0[k];
            nrej += bad && s->w0[k] > 0;
        }
    return nrej;
}

/* ------------------------------------------------------------------------ */
/* Moffat fallback fit                                                        */

typedef struct {
    int ix, iy, R;      /* box centre and half-width */
    const float *img;
    const float *ivar;
    const uint8_t *mask;
    int nx, ny;
    double b, wdef;
} mstar;

/* The analytic Jacobian of moffat_resid's residuals (columns as its P; J = -d r / d P,
 * i.e. sqrt(w) d model / d P) into J[k * np + p] (rows of unusable pixels zero). The
 * e1, e2 columns go through (q, theta), which are singular at e = 0: there (e < 1e-6)
 * they are left to the caller (need_e = 1). */
static void moffat_jac(const mstar *ms, int ns, const double *P, int np, double *J, const int *off,
                       const uint8_t *rej, int *need_e)
{
    double fwhm = exp(P[0]), beta = 1.0 + exp(P[1]), e1 = P[2], e2 = P[3];
    double e = hypot(e1, e2), ec = e > 0.95 ? 0.95 : e;
    double q = (1 - ec) / (1 + ec), th = 0.5 * atan2(e2, e1), ct = cos(th), st = sin(th);
    double p2 = pow(2.0, 1.0 / beta), alpha = fwhm / (2.0 * sqrt(p2 - 1.0));
    double dalpha_dbeta = alpha * p2 * M_LN2 / (beta * beta) / (2.0 * (p2 - 1.0));
    *need_e = e < 1e-6;
    /* d(q, theta) / d(e1, e2); q is held where e is clamped */
    double dq_de = e > 0.95 ? 0.0 : -2.0 / ((1 + e) * (1 + e));
    double q_e1 = 0, q_e2 = 0, t_e1 = 0, t_e2 = 0;
    if (!*need_e) {
        q_e1 = dq_de * e1 / e;
        q_e2 = dq_de * e2 / e;
        t_e1 = -0.5 * e2 / (e * e);
        t_e2 = 0.5 * e1 / (e * e);
    }
    for (int s = 0; s < ns; s++) {
        const mstar *m = &ms[s];
        double x = P[4 + 3 * s], y = P[5 + 3 * s], F = P[6 + 3 * s];
        int k = off[s];
        for (int j = m->iy - m->R; j <= m->iy + m->R; j++)
            for (int i = m->ix - m->R; i <= m->ix + m->R; i++, k++) {
                double *Jk = J + (size_t)k * np;
                memset(Jk, 0, sizeof(double) * np);
                if (i < 0 || j < 0 || i >= m->nx || j >= m->ny || rej[k]) continue;
                size_t kk = (size_t)j * m->nx + i;
                if (!pix_ok(m->img, m->ivar, m->mask, kk)) continue;
                double sw = sqrt(m->ivar ? m->ivar[kk] : m->wdef), g[6];
                double v = moffat_pix_grad(i - x, j - y, alpha, beta, q, ct, st, g);
                double sF = sw * F;
                Jk[0] = sF * g[2] * alpha;                                 /* ln fwhm: alpha scales with it */
                Jk[1] = sF * (g[3] + g[2] * dalpha_dbeta) * (beta - 1.0); /* ln(beta - 1) */
                if (!*need_e) {
                    Jk[2] = sF * (g[4] * q_e1 + g[5] * t_e1);
                    Jk[3] = sF * (g[4] * q_e2 + g[5] * t_e2);
                }
                Jk[4 + 3 * s] = -sF * g[0]; /* dx = i - x */
                Jk[5 + 3 * s] = -sF * g[1];
                Jk[6 + 3 * s] = sw * v;
            }
    }
}

/* Residuals (weighted) of all stars for parameter vector P = [ln fwhm,
 * ln(beta-1), e1, e2, (x, y, F) per star]; only star `only` when >= 0 (others
 * left as they are in r). Returns chi2 of the evaluated part. */
static double moffat_resid(const mstar *ms, int ns, const double *P, int only, double *r, const int *off,
                           const uint8_t *rej)
{
    double fwhm = exp(P[0]), beta = 1.0 + exp(P[1]), e1 = P[2], e2 = P[3];
    double e = hypot(e1, e2);
    if (e > 0.95) e = 0.95;
    double q = (1 - e) / (1 + e), th = 0.5 * atan2(e2, e1), ct = cos(th), st = sin(th);
    double alpha = fwhm / (2.0 * sqrt(pow(2.0, 1.0 / beta) - 1.0));
    double chi2 = 0;
    for (int s = 0; s < ns; s++) {
        if (only >= 0 && s != only) continue;
        const mstar *m = &ms[s];
        double x = P[4 + 3 * s], y = P[5 + 3 * s], F = P[6 + 3 * s];
        int k = off[s];
        for (int j = m->iy - m->R; j <= m->iy + m->R; j++)
            for (int i = m->ix - m->R; i <= m->ix + m->R; i++, k++) {
                r[k] = 0;
                if (i < 0 || j < 0 || i >= m->nx || j >= m->ny || rej[k]) continue;
                size_t kk = (size_t)j * m->nx + i;
                if (!pix_ok(m->img, m->ivar, m->mask, kk)) continue;
                double w = m->ivar ? m->ivar[kk] : m->wdef;
                double mod = m->b + F * moffat_pix(i - x, j - y, alpha, beta, q, ct, st);
                r[k] = sqrt(w) * (m->img[kk] - mod);
                chi2 += r[k] * r[k];
            }
    }
    return chi2;
}

static int cmp_dbl(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Contaminated pixels of the Moffat fit, by the builder's star_reject rule on the
 * fitted Moffat: a pixel whose 3x3 or 5x5 mean residual exceeds nsig times its
 * noise (1/w plus CLIP_MODEL_FRAC of the local model) is rejected with its 8
 * neighbours. The residual is first taken relative to its median in 1-pixel rings
 * about the star: what is round is the Moffat's own shortfall (a PSF's wide wing:
 * rejecting it would shrink the Moffat and lose that light), contamination is not.
 * Pixels within rkeep of a star's centre are kept (its centre and flux stay
 * determined). Recomputed from scratch into rej (nr bytes; rnew nr bytes of
 * scratch, e and v nr doubles, ring (2R+1)^2 + 2R + 3 doubles, rid (2R+1)^2 + 4R + 8
 * ints; all stars share one R). Returns how many pixels changed state. */
static int moffat_reject(const mstar *ms, int ns, const double *P, const int *off, int nr, double nsig,
                         double rkeep, uint8_t *rej, uint8_t *rnew, double *e, double *v, double *ring, int *rid)
{
    double fwhm = exp(P[0]), beta = 1.0 + exp(P[1]), e1 = P[2], e2 = P[3];
    double ec = fmin(hypot(e1, e2), 0.95);
    double q = (1 - ec) / (1 + ec), th = 0.5 * atan2(e2, e1), ct = cos(th), st = sin(th);
    double alpha = fwhm / (2.0 * sqrt(pow(2.0, 1.0 / beta) - 1.0));
    memset(rnew, 0, (size_t)nr);
    for (int s = 0; s < ns; s++) {
        const mstar *m = &ms[s];
        double x = P[4 + 3 * s], y = P[5 + 3 * s], F = P[6 + 3 * s];
        int W = 2 * m->R + 1, k0 = off[s], nring = (int)ceil(M_SQRT2 * m->R) + 2;
        int *rcount = rid + W * W, *rfill = rcount + nring + 1;
        double *rmed = ring + W * W;
        for (int j = 0; j < W; j++)
            for (int i = 0; i < W; i++) {
                int k = k0 + j * W + i, ii = m->ix - m->R + i, jj = m->iy - m->R + j;
                e[k] = v[k] = 0.0;
                if (ii < 0 || jj < 0 || ii >= m->nx || jj >= m->ny) continue;
                size_t kk = (size_t)jj * m->nx + ii;
                if (!pix_ok(m->img, m->ivar, m->mask, kk)) continue;
                double w = m->ivar ? m->ivar[kk] : m->wdef;
                double mod = F * moffat_pix(ii - x, jj - y, alpha, beta, q, ct, st), fm = CLIP_MODEL_FRAC * mod;
                e[k] = m->img[kk] - m->b - mod;
                v[k] = 1.0 / w + fm * fm;
            }
        /* ring medians: pixels bucketed by ring (counting sort), each bucket sorted */
        for (int ir = 0; ir <= nring; ir++) rcount[ir] = 0;
        for (int j = 0; j < W; j++)
            for (int i = 0; i < W; i++) {
                int k = k0 + j * W + i, ir = (int)lround(hypot(m->ix - m->R + i - x, m->iy - m->R + j - y));
                rid[j * W + i] = v[k] > 0 && ir < nring ? ir : -1;
                if (rid[j * W + i] >= 0) rcount[ir + 1]++;
            }
        for (int ir = 0; ir < nring; ir++) rcount[ir + 1] += rcount[ir];
        for (int ir = 0; ir < nring; ir++) rfill[ir] = rcount[ir];
        for (int q = 0; q < W * W; q++)
            if (rid[q] >= 0) ring[rfill[rid[q]]++] = e[k0 + q];
        for (int ir = 0; ir < nring; ir++) {
            int n = rcount[ir + 1] - rcount[ir];
            double *rb = ring + rcount[ir];
            if (n < 3) {
                rmed[ir] = 0.0;
                continue;
            }
            qsort(rb, (size_t)n, sizeof *rb, cmp_dbl);
            rmed[ir] = n % 2 ? rb[n / 2] : 0.5 * (rb[n / 2 - 1] + rb[n / 2]);
        }
        for (int q = 0; q < W * W; q++)
            if (rid[q] >= 0) e[k0 + q] -= rmed[rid[q]];
        for (int sc = 1; sc <= 2; sc++)
            for (int j = 0; j < W; j++)
                for (int i = 0; i < W; i++) {
                    double se = 0, sv = 0;
                    int c = 0;
                    for (int dj = -sc; dj <= sc; dj++)
                        for (int di = -sc; di <= sc; di++) {
                            int a = i + di, b = j + dj;
                            if (a < 0 || b < 0 || a >= W || b >= W || !(v[k0 + b * W + a] > 0)) continue;
                            se += e[k0 + b * W + a];
                            sv += v[k0 + b * W + a];
                            c++;
                        }
                    if (c >= 3 && se * se > nsig * nsig * sv) rnew[k0 + j * W + i] |= 1;
                }
        /* dilate by one pixel; keep the core */
        for (int j = 0; j < W; j++)
            for (int i = 0; i < W; i++) {
                int bad = 0;
                for (int dj = -1; dj <= 1 && !bad; dj++)
                    for (int di = -1; di <= 1 && !bad; di++) {
                        int a = i + di, b = j + dj;
                        bad = a >= 0 && b >= 0 && a < W && b < W && (rnew[k0 + b * W + a] & 1);
                    }
                double dx = m->ix - m->R + i - x, dy = m->iy - m->R + j - y;
                if (bad && dx * dx + dy * dy > rkeep * rkeep) rnew[k0 + j * W + i] |= 2;
            }
    }
    int nchange = 0;
    for (int k = 0; k < nr; k++) {
        uint8_t b = (rnew[k] & 2) ? 1 : 0;
        nchange += b != rej[k];
        rej[k] = b;
    }
    return nchange;
}

int sp_epsf_fit_moffat(const float *img, const float *ivar, const uint8_t *mask, int nx, int ny,
                       const sp_psfstar *stars, int nstars, double fwhm0, double beta0, double reject_sigma,
                       double *fwhm, double *beta, double *q, double *theta)
{
    int status = SP_OK;
    mstar *ms = NULL;
    int *off = NULL;
    double *P = NULL, *Pt = NULL, *r = NULL, *rt = NULL, *J = NULL, *A = NULL, *g = NULL, *A2 = NULL;
    uint8_t *rej = NULL, *rnew = NULL;
    double *ring = NULL;
    int *rid = NULL;
    int ns = 0;
    SP_CHECK(nstars > 0 && stars, SP_ERR_INPUT, "Moffat fit: no star");
    SP_CHECK(fwhm0 > 0 && beta0 > 1, SP_ERR_INPUT, "Moffat fit: bad start (fwhm %g, beta %g)", fwhm0, beta0);
    if (nstars > 40) nstars = 40;
    SP_ALLOC(ms, nstars);
    SP_ALLOC(off, nstars + 1);
    int R = (int)ceil(fmax(3.0, 2.5 * fwhm0));
    for (int s = 0; s < nstars; s++) {
        int ix = (int)lround(stars[s].x), iy = (int)lround(stars[s].y);
        if (ix < 0 || iy < 0 || ix >= nx || iy >= ny || !(stars[s].flux > 0)) continue;
        mstar *m = &ms[ns];
        m->ix = ix;
        m->iy = iy;
        m->R = R;
        m->img = img;
        m->ivar = ivar;
        m->mask = mask;
        m->nx = nx;
        m->ny = ny;
        m->b = stars[s].bkg;
        m->wdef = stars[s].bkg_rms > 0 ? 1.0 / (stars[s].bkg_rms * stars[s].bkg_rms) : 1.0;
        off[ns + 1] = off[ns] + (2 * R + 1) * (2 * R + 1);
        ns++;
    }
    SP_CHECK(ns > 0, SP_ERR_INPUT, "Moffat fit: no star inside the image");
    int np = 4 + 3 * ns, nr = off[ns];
    SP_ALLOC(P, np);
    SP_ALLOC(Pt, np);
    SP_ALLOC(r, nr);
    SP_ALLOC(rt, nr);
    SP_ALLOC(J, (size_t)nr * np);
    SP_ALLOC(A, (size_t)np * np);
    SP_ALLOC(A2, (size_t)np * np);
    SP_ALLOC(g, np);
    SP_ALLOC(rej, nr);
    memset(rej, 0, (size_t)nr);
    P[0] = log(fwhm0);
    P[1] = log(beta0 - 1.0);
    P[2] = P[3] = 0.0;
    {
        int s2 = 0;
        for (int s = 0; s < nstars && s2 < ns; s++) {
            int ix = (int)lround(stars[s].x), iy = (int)lround(stars[s].y);
            if (ix < 0 || iy < 0 || ix >= nx || iy >= ny || !(stars[s].flux > 0)) continue;
            P[4 + 3 * s2] = stars[s].x;
            P[5 + 3 * s2] = stars[s].y;
            P[6 + 3 * s2] = stars[s].flux;
            s2++;
        }
    }
    /* Two passes with reject_sigma > 0: fit, reject the pixels the fitted Moffat
     * finds contaminated (undetected or merged neighbours, galaxies: nothing else
     * keeps their light out of the Moffat, which widens and grows a wing beyond the
     * fit box for it), fit again from there. One rejection pass: a second changed
     * the cells' Moffats by far less than the first (bench, docs/zeropoints.md). */
    double chi2 = 0;
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1) {
            if (!(reject_sigma > 0)) break;
            SP_ALLOC(rnew, nr);
            SP_ALLOC(ring, (size_t)(2 * R + 1) * (2 * R + 1) + 2 * R + 3);
            SP_ALLOC(rid, (size_t)(2 * R + 1) * (2 * R + 1) + 4 * R + 8);
            /* r, rt serve as scratch: both are recomputed below */
            if (moffat_reject(ms, ns, P, off, nr, reject_sigma, exp(P[0]), rej, rnew, r, rt, ring, rid) == 0)
                break;
        }
        double lam = 1e-3;
        chi2 = moffat_resid(ms, ns, P, -1, r, off, rej);
        int converged = 0;
        for (int it = 0; it < 60 && !converged; it++) {
            /* the Jacobian: analytic (moffat_jac); e1, e2 by forward differences at e = 0 */
            int need_e = 0;
            moffat_jac(ms, ns, P, np, J, off, rej, &need_e);
            for (int p = 2; need_e && p < 4; p++) {
                int only = -1;
                double h = p < 4 ? 1e-4 : (p % 3 == 0 ? 1e-4 * fabs(P[p]) + 1e-8 : 1e-4); /* F relative */
                memcpy(Pt, P, sizeof(double) * np);
                Pt[p] += h;
                memcpy(rt, r, sizeof(double) * nr);
                moffat_resid(ms, ns, Pt, only, rt, off, rej);
                for (int k = 0; k < nr; k++) J[(size_t)k * np + p] = -(rt[k] - r[k]) / h; /* d model */
            }
            memset(A, 0, sizeof(double) * np * np);
            memset(g, 0, sizeof(double) * np);
            for (int k = 0; k < nr; k++) {
                const double *Jk = J + (size_t)k * np;
                if (r[k] == 0.0) {
                    int any = 0;
                    for (int p = 0; p < np && !any; p++) any = Jk[p] != 0.0;
                    if (!any) continue;
                }
                for (int p = 0; p < np; p++) {
                    if (Jk[p] == 0.0) continue;
                    g[p] += Jk[p] * r[k];
                    for (int q2 = 0; q2 <= p; q2++) A[p * np + q2] += Jk[p] * Jk[q2];
                }
            }
            for (int p = 0; p < np; p++)
                for (int q2 = p + 1; q2 < np; q2++) A[p * np + q2] = A[q2 * np + p];
            int accepted = 0;
            for (int tries = 0; tries < 12 && !accepted; tries++) {
                memcpy(A2, A, sizeof(double) * np * np);
                for (int p = 0; p < np; p++) A2[p * np + p] *= 1.0 + lam;
                memcpy(Pt, g, sizeof(double) * np);
                if (!chol_solve(A2, Pt, np)) {
                    lam *= 10;
                    continue;
                }
                for (int p = 0; p < np; p++) Pt[p] += P[p];
                /* bounds */
                if (Pt[0] < log(0.5)) Pt[0] = log(0.5);
                if (Pt[0] > log(50.0)) Pt[0] = log(50.0);
                if (Pt[1] < log(0.1)) Pt[1] = log(0.1);
                if (Pt[1] > log(30.0)) Pt[1] = log(30.0);
                double chi2t = moffat_resid(ms, ns, Pt, -1, rt, off, rej);
                if (isfinite(chi2t) && chi2t <= chi2) {
                    converged = (chi2 - chi2t) < 1e-7 * chi2 + 1e-12;
                    memcpy(P, Pt, sizeof(double) * np);
                    memcpy(r, rt, sizeof(double) * nr);
                    chi2 = chi2t;
                    lam = fmax(lam * 0.2, 1e-9);
                    accepted = 1;
                } else {
                    lam *= 10;
                }
            }
            if (!accepted) converged = 1; /* no downhill step left: at the minimum (or stuck) */
        }
    }
    double e = hypot(P[2], P[3]);
    *fwhm = exp(P[0]);
    *beta = 1.0 + exp(P[1]);
    *q = (1 - fmin(e, 0.95)) / (1 + fmin(e, 0.95));
    *theta = 0.5 * atan2(P[3], P[2]);
    SP_CHECK(isfinite(chi2) && *fwhm > 0.51 && *fwhm < 49.0 && *beta > 1.11 && *beta < 30.9 && e < 0.9,
             SP_ERR_NUMERIC, "Moffat fit ran to a bound (FWHM %.3g, beta %.3g, q %.3g)", *fwhm, *beta, *q);
cleanup:
    free(rej);
    free(rnew);
    free(ring);
    free(rid);
    free(ms);
    free(off);
    free(P);
    free(Pt);
    free(r);
    free(rt);
    free(J);
    free(A);
    free(A2);
    free(g);
    return status;
}

/* Remove from a gradient stamp g its sum (flux) and its components along the
 * PSF's own x and y derivatives (a centroid shift), by least squares. */
static void grad_project(const sp_psf *psf, double *g, int S)
{
    const float *d = psf->data;
    double sgg[3] = {0}, sgu = 0, sgv = 0, suu = 0, suv = 0, svv = 0, sum = 0;
    (void)sgg;
    for (int k = 0; k < S * S; k++) sum += g[k];
    for (int k = 0; k < S * S; k++) g[k] -= sum / ((double)S * S);
    for (int j = 1; j < S - 1; j++)
        for (int i = 1; i < S - 1; i++) {
            int k = j * S + i;
            double u = 0.5 * (d[k + 1] - d[k - 1]), v = 0.5 * (d[k + S] - d[k - S]);
            sgu += g[k] * u;
            sgv += g[k] * v;
            suu += u * u;
            suv += u * v;
            svv += v * v;
        }
    double det = suu * svv - suv * suv;
    if (!(det > 0)) return;
    double a = (sgu * svv - sgv * suv) / det, b = (sgv * suu - sgu * suv) / det;
    for (int j = 1; j < S - 1; j++)
        for (int i = 1; i < S - 1; i++) {
            int k = j * S + i;
            g[k] -= a * 0.5 * (d[k + 1] - d[k - 1]) + b * 0.5 * (d[k + S] - d[k - S]);
        }
}

/* ------------------------------------------------------------------------ */
/* Builder                                                                    */

/* The cutout of one star (N x N around its nearest pixel), its weights (ivar,
 * or 1 / bkg_rms^2 without ivar; 0 where unusable or within a neighbour's mask
 * radius) and its starting flux (the sum within 0.8 h minus the background).
 * used = 0 when fewer than half the pixels are usable. */
static int cut_star(bstar *b, const float *img, const float *ivar, const uint8_t *mask, int nx, int ny,
                    const sp_psfstar *st, const sp_epsf_params *p, int N)
{
    int status = SP_OK;
    const int h = (N - 1) / 2;
    b->ix = (int)lround(st->x);
    b->iy = (int)lround(st->y);
    b->x = b->x0 = st->x;
    b->y = b->y0 = st->y;
    b->b = st->bkg;
    b->used = 1;
    SP_ALLOC(b->d, (size_t)N * N);
    SP_ALLOC(b->w, (size_t)N * N);
    SP_ALLOC(b->w0, (size_t)N * N);
    double wdef = st->bkg_rms > 0 ? 1.0 / (st->bkg_rms * st->bkg_rms) : 1.0;
    double fs = 0;
    int nus = 0;
    for (int j = 0; j < N; j++)
        for (int i = 0; i < N; i++) {
            int xi = b->ix - h + i, yj = b->iy - h + j;
            size_t kc = (size_t)j * N + i;
            if (xi < 0 || yj < 0 || xi >= nx || yj >= ny) continue;
            size_t k = (size_t)yj * nx + xi;
            if (!pix_ok(img, ivar, mask, k)) continue;
            b->d[kc] = img[k];
            b->w[kc] = (float)(ivar ? ivar[k] : wdef);
            double dx = xi - b->x, dy = yj - b->y;
            if (dx * dx + dy * dy <= 0.64 * h * h) fs += img[k] - b->b;
            nus++;
        }
    /* mask the other catalogued sources in the cutout */
    for (int q = 0; q < p->nneighbours; q++) {
        const sp_source *o = &p->neighbours[q];
        double dx0 = o->x - b->x0, dy0 = o->y - b->y0;
        if (dx0 * dx0 + dy0 * dy0 < 4.0) continue; /* the star itself */
        double rr = p->neighbour_rscale * (o->a > 0 ? o->a : 1.0) + 1.0;
        if (rr < 2.0) rr = 2.0;
        if (fabs(dx0) > h + rr + 1 || fabs(dy0) > h + rr + 1) continue;
        int i0 = (int)floor(o->x - rr) - (b->ix - h), i1 = (int)ceil(o->x + rr) - (b->ix - h);
        int j0 = (int)floor(o->y - rr) - (b->iy - h), j1 = (int)ceil(o->y + rr) - (b->iy - h);
        for (int j = j0 < 0 ? 0 : j0; j <= (j1 > N - 1 ? N - 1 : j1); j++)
            for (int i = i0 < 0 ? 0 : i0; i <= (i1 > N - 1 ? N - 1 : i1); i++) {
                double dx = b->ix - h + i - o->x, dy = b->iy - h + j - o->y;
                if (dx * dx + dy * dy <= rr * rr) b->w[(size_t)j * N + i] = 0.0f;
            }
    }
    memcpy(b->w0, b->w, sizeof(float) * (size_t)N * N);
    b->F = fs > 0 ? fs : (st->flux > 0 ? st->flux : 1.0);
    if (nus < N * N / 2) b->used = 0;
cleanup:
    return status;
}

/* Monomials of degree <= d in (u, v), ordered by degree: 1, u, v, u^2, u v,
 * v^2, u^3, ... phi[0] = 1; returns the count (d+1)(d+2)/2. */
static int monomials(int d, double u, double v, double *phi)
{
    int n = 0;
    for (int e = 0; e <= d; e++)
        for (int a = e; a >= 0; a--) {
            int bq = e - a;
            double t = 1.0;
            for (int k = 0; k < a; k++) t *= u;
            for (int k = 0; k < bq; k++) t *= v;
            phi[n++] = t;
        }
    return n;
}

int sp_epsf_poly_eval(const sp_psf *psf, const float *terms, int degree, double u, double v, sp_psf *out)
{
    int status = SP_OK;
    SP_CHECK(psf && out && psf != out && out->size == psf->size && out->oversamp == psf->oversamp && degree >= 0 &&
                 degree <= 4 && (degree == 0 || terms),
             SP_ERR_INPUT, "sp_epsf_poly_eval: bad arguments");
    double phi[15];
    int nt = monomials(degree, u, v, phi);
    const size_t SS = (size_t)psf->size * psf->size;
    for (size_t k = 0; k < SS; k++) {
        double a = psf->data[k];
        for (int t = 1; t < nt; t++) a += phi[t] * terms[(size_t)(t - 1) * SS + k];
        out->data[k] = (float)a;
    }
    out->fwhm = psf->fwhm;
    out->nstars = psf->nstars;
    out->is_fallback = psf->is_fallback;
    status = sp_psf_normalize(out);
cleanup:
    return status;
}


static int make_fallback(sp_epsf_result *res, const float *img, const float *ivar, const uint8_t *mask, int nx,
                         int ny, const sp_psfstar *stars, int nstars, const sp_epsf_params *p, int S,
                         double fwhm_guess)
{
    int status = SP_OK;
    double fw = p->fallback_fwhm, be = p->fallback_beta, q = 1.0, th = 0.0;
    res->kind = SP_EPSF_MOFFAT_DEFAULT;
    res->nstars_used = 0;
    if (nstars > 0) {
        double f0 = fwhm_guess > 0 ? fwhm_guess : p->fallback_fwhm;
        double f1, b1, q1, t1;
        int st = sp_epsf_fit_moffat(img, ivar, mask, nx, ny, stars, nstars, f0, p->fallback_beta, p->fallback_reject_sigma,
                                    &f1, &b1, &q1, &t1);
        if (st == SP_OK) {
            fw = f1;
            be = b1;
            q = q1;
            th = t1;
            res->kind = SP_EPSF_MOFFAT_FIT;
            res->nstars_used = nstars > 40 ? 40 : nstars;
        } else {
            size_t L = strlen(res->reason);
            snprintf(res->reason + L, sizeof res->reason - L, "; Moffat fit failed (%s): configured Moffat",
                     sp_err_msg());
            sp_err_clear();
        }
    }
    sp_psf_free(&res->psf);
    SP_TRY(sp_psf_moffat(fw, be, q, th, S, p->oversamp, &res->psf));
    res->is_fallback = 1;
    res->psf->is_fallback = 1;
    res->psf->nstars = res->nstars_used;
    res->psf->fwhm = fw;
    res->moffat_fwhm = fw;
    res->moffat_beta = be;
    res->moffat_q = q;
    res->moffat_theta = th;
cleanup:
    return status;
}

/* Analytic wings (p->core_fwhm > 0): the elliptical Moffat fitted to the used
 * stars (their refined centres and fluxes), plus the empirical ePSF's
 * difference from it inside core_fwhm FWHM, tapered (cosine) to 0 over
 * core_taper_fwhm more: psi = M + w(r) (E - M), renormalised. Far from the core
 * each node of E carries the noise of a few stars' faint pixels, which over
 * the ~1600 pixels of a 41 x 41 stamp dominates ||E - truth|| for 10-30 stars
 * of SNR 20-200 (docs/psf.md); the Moffat needs 4 numbers there. If the fit
 * fails, E is kept. */
static int hybrid_wings(sp_psf *psf, const float *img, const float *ivar, const uint8_t *mask, int nx, int ny,
                        const sp_psfstar *stars, const bstar *bs, int nstars, const sp_epsf_params *p, double fwhm,
                        sp_epsf_result *res)
{
    int status = SP_OK;
    sp_psfstar *fs = NULL;
    sp_psf *M = NULL;
    uint8_t *nmask = NULL;
    SP_ALLOC(fs, nstars + 1);
    int nf = 0;
    for (int s = 0; s < nstars; s++) {
        if (!bs[s].used) continue;
        fs[nf] = stars[s];
        fs[nf].x = bs[s].x;
        fs[nf].y = bs[s].y;
        fs[nf].flux = bs[s].F;
        fs[nf].bkg = bs[s].b;
        nf++;
    }
    /* the catalogued neighbours masked in the fit too (not the stars themselves) */
    if (p->nneighbours > 0) {
        SP_ALLOC(nmask, (size_t)nx * ny);
        if (mask) memcpy(nmask, mask, (size_t)nx * ny);
        for (int q = 0; q < p->nneighbours; q++) {
            const sp_source *o = &p->neighbours[q];
            int self = 0;
            for (int s = 0; s < nf && !self; s++) self = hypot(o->x - fs[s].x, o->y - fs[s].y) < 2.0;
            if (self) continue;
            double rr = p->neighbour_rscale * (o->a > 0 ? o->a : 1.0) + 1.0;
            if (rr < 2) rr = 2;
            int i0 = (int)floor(o->x - rr), i1 = (int)ceil(o->x + rr), j0 = (int)floor(o->y - rr),
                j1 = (int)ceil(o->y + rr);
            for (int j = j0 < 0 ? 0 : j0; j <= j1 && j < ny; j++)
                for (int i = i0 < 0 ? 0 : i0; i <= i1 && i < nx; i++)
                    if ((i - o->x) * (i - o->x) + (j - o->y) * (j - o->y) <= rr * rr) nmask[(size_t)j * nx + i] |= 0x80;
        }
    }
    double f1, b1, q1, t1;
    if (nf == 0 || sp_epsf_fit_moffat(img, ivar, nmask ? nmask : mask, nx, ny, fs, nf, fwhm > 0.5 ? fwhm : p->fallback_fwhm,
                                      p->fallback_beta, p->fallback_reject_sigma, &f1, &b1, &q1, &t1) != SP_OK) {
        sp_err_clear();
        goto cleanup;
    }
    int S = psf->size, os = psf->oversamp;
    SP_TRY(sp_psf_moffat(f1, b1, q1, t1, S, os, &M));
    double c = 0.5 * (S - 1), r1 = p->core_fwhm * f1, r2 = r1 + (p->core_taper_fwhm > 0 ? p->core_taper_fwhm : 0) * f1;
    for (int j = 0; j < S; j++)
        for (int i = 0; i < S; i++) {
            double r = hypot(i - c, j - c) / os, w;
            if (r <= r1) w = 1.0;
            else if (r >= r2) w = 0.0;
            else w = 0.5 * (1.0 + cos(M_PI * (r - r1) / (r2 - r1)));
            size_t k = (size_t)j * S + i;
            psf->data[k] = (float)(M->data[k] + w * (psf->data[k] - M->data[k]));
        }
    SP_TRY(sp_psf_normalize(psf));
    res->moffat_fwhm = f1;
    res->moffat_beta = b1;
    res->moffat_q = q1;
    res->moffat_theta = t1;
cleanup:
    free(fs);
    free(nmask);
    sp_psf_free(&M);
    return status;
}

/* The fallback Moffat M plus the used stars' residual from it beyond r0 =
 * p->fallback_resid_fwhm FWHM: each star's centre and flux refitted with M on
 * the core box (background: its annulus value, not the in-cutout estimate
 * made against the failed ePSF), (d - b - F M) / F stacked on the nearest
 * node with weights F^2 w (as the ePSF stack), smoothed like the ePSF start,
 * ramped in with cos^2 over r0 .. r0 + 1 FWHM, renormalised. */
static int fallback_residual(sp_psf *M, bstar *bs, const sp_psfstar *stars, int nstars, int N, int rf,
                             const sp_epsf_params *p, double *R, double *Wg, double *tmpd, double *model, double *rbuf,
                             double *fitbuf)
{
    const int os = M->oversamp, S = M->size, h = (N - 1) / 2;
    const double c = 0.5 * (S - 1), fw = M->fwhm > 0 ? M->fwhm : psf_fwhm(M);
    const double r0 = p->fallback_resid_fwhm * fw, r1 = r0 + fw;
    memset(R, 0, sizeof(double) * S * S);
    memset(Wg, 0, sizeof(double) * S * S);
    int nused = 0;
    for (int s = 0; s < nstars; s++) {
        bstar *b = &bs[s];
        if (!b->used) continue;
        bstar t = *b;
        t.b = stars[s].bkg;
        t.x = t.x0;
        t.y = t.y0;
        if (!fit_star(M, &t, N, rf, 4, fitbuf)) continue;
        render_vals(M, t.x - (t.ix - h), t.y - (t.iy - h), N, model, rbuf);
        const double F2 = t.F * t.F, iF = 1.0 / t.F;
        const long iu0 = lround(c + (t.ix - h - t.x) * os), jv0 = lround(c + (t.iy - h - t.y) * os);
        for (int j = 0; j < N; j++) {
            long jv = jv0 + (long)j * os;
            if (jv < 0 || jv >= S) continue;
            for (int i = 0; i < N; i++) {
                long iu = iu0 + (long)i * os;
                size_t kc = (size_t)j * N + i;
                if (iu < 0 || iu >= S || !(t.w[kc] > 0)) continue;
                double e = t.d[kc] - t.b - t.F * model[kc];
                /* the stack's pixel clip: single outliers (cosmic rays, neighbours) out */
                if (p->clip_sigma > 0) {
                    double fm = CLIP_MODEL_FRAC * t.F * model[kc];
                    if (e * e > p->clip_sigma * p->clip_sigma * (1.0 / t.w[kc] + fm * fm)) continue;
                }
                R[jv * S + iu] += F2 * t.w[kc] * e * iF;
                Wg[jv * S + iu] += F2 * t.w[kc];
            }
        }
        nused++;
    }
    if (nused == 0) return 0;
    if (os > 1) {
        tri_smooth(R, tmpd, S, os);
        tri_smooth(Wg, tmpd, S, os);
    }
    for (int j = 0; j < S; j++)
        for (int i = 0; i < S; i++) {
            const size_t k = (size_t)j * S + i;
            const double r = hypot(i - c, j - c) / os;
            if (r <= r0 || !(Wg[k] > 0)) continue;
            double t = r >= r1 ? 1.0 : sin(0.5 * M_PI * (r - r0) / (r1 - r0));
            M->data[k] += (float)(t * t * R[k] / Wg[k]);
        }
    if (sp_psf_normalize(M) != SP_OK) {
        sp_err_clear();
        return 0;
    }
    return nused;
}

int sp_epsf_build(const float *img, const float *ivar, const uint8_t *mask, int nx, int ny,
                  const sp_psfstar *stars, int nstars, const sp_epsf_params *pin, sp_epsf_result **out)
{
    int status = SP_OK;
    sp_epsf_params p;
    sp_epsf_result *res = NULL;
    bstar *bs = NULL;
    double *R = NULL, *Wg = NULL, *tmpd = NULL, *G = NULL, *NE = NULL, *phis = NULL;
    double *model = NULL, *fitbuf = NULL, *rbuf = NULL, *wsbuf = NULL;
    float *tmpf = NULL, *bkgbuf = NULL, *rejbuf = NULL;
    sp_psf *psf = NULL, *ps = NULL;

    SP_CHECK(out && img, SP_ERR_INTERNAL, "sp_epsf_build: NULL argument");
    *out = NULL;
    if (pin)
        p = *pin;
    else
        sp_epsf_params_default(&p);
    SP_CHECK(p.oversamp >= 1 && p.oversamp <= 8, SP_ERR_INPUT, "ePSF: oversamp %d must be in 1..8", p.oversamp);
    SP_CHECK(p.final_size >= 5 && p.final_size % 2 == 1, SP_ERR_INPUT,
             "ePSF: final_psf_size %d must be odd and >= 5", p.final_size);
    SP_CHECK(p.max_iters >= 1, SP_ERR_INPUT, "ePSF: max_iters %d must be >= 1", p.max_iters);
    SP_CHECK(p.fallback_fwhm > 0 && p.fallback_beta > 1, SP_ERR_INPUT,
             "ePSF: fallback FWHM %g must be > 0 and beta %g > 1", p.fallback_fwhm, p.fallback_beta);
    SP_CHECK(nstars >= 0 && (nstars == 0 || stars), SP_ERR_INPUT, "ePSF: bad star list");
    SP_CHECK(p.nneighbours >= 0 && (p.nneighbours == 0 || p.neighbours), SP_ERR_INPUT, "ePSF: bad neighbour list");

    const int os = p.oversamp, N = p.final_size, h = (N - 1) / 2, S = os * (N - 1) + 1;
    const double c = 0.5 * (S - 1);
    SP_ALLOC(res, 1);
    res->nstars_in = nstars;
    res->moffat_fwhm = res->moffat_beta = res->moffat_q = res->moffat_theta = NAN;
    res->stamp_size = N;
    SP_ALLOC(res->star_x, nstars + 1);
    SP_ALLOC(res->star_y, nstars + 1);
    SP_ALLOC(res->star_flux, nstars + 1);
    SP_ALLOC(res->star_bkg, nstars + 1);
    SP_ALLOC(res->star_chi2, nstars + 1);
    SP_ALLOC(res->star_used, nstars + 1);
    for (int s = 0; s < nstars; s++) {
        res->star_x[s] = stars[s].x;
        res->star_y[s] = stars[s].y;
        res->star_flux[s] = stars[s].flux;
        res->star_bkg[s] = stars[s].bkg;
        res->star_chi2[s] = NAN;
    }

    /* the FWHM guess: median of the stars' windowed sizes is not carried, so
     * start from the fallback FWHM; the first stack gives the real one */
    double fwhm = p.fallback_fwhm;

    if (nstars < p.min_stars) {
        snprintf(res->reason, sizeof res->reason, "%d PSF stars < min_stars %d", nstars, p.min_stars);
        SP_TRY(make_fallback(res, img, ivar, mask, nx, ny, stars, nstars, &p, S, fwhm));
        goto growth;
    }

    /* cutouts */
    SP_ALLOC(bs, nstars);
    for (int s = 0; s < nstars; s++) SP_TRY(cut_star(&bs[s], img, ivar, mask, nx, ny, &stars[s], &p, N));

    SP_ALLOC(R, (size_t)S * S);
    SP_ALLOC(Wg, (size_t)S * S);
    SP_ALLOC(tmpd, (size_t)S * S);
    SP_ALLOC(tmpf, (size_t)S * S);
    SP_ALLOC(model, (size_t)N * N);
    SP_ALLOC(rbuf, (size_t)(S + 6) * N);
    SP_ALLOC(bkgbuf, (size_t)N * N);
    SP_ALLOC(rejbuf, 3 * (size_t)N * N);
    SP_TRY(sp_psf_alloc(S, os, &psf));
    /* wing smoothing (nodes): starts at wing_smooth_r0 x the fallback FWHM (the
     * real FWHM is not known before the first stack) */
    const double wsk = p.wing_smooth_k, wsr0 = p.wing_smooth_r0 * p.fallback_fwhm * os;
    if (wsk > 0) SP_ALLOC(wsbuf, (size_t)(WS_NSCALE + 1) * S * S);

    /* initial stack: nearest-node weighted mean of (d - b)/F */
    for (int s = 0; s < nstars; s++) {
        bstar *b = &bs[s];
        if (!b->used) continue;
        double F2 = b->F * b->F;
        for (int j = 0; j < N; j++)
            for (int i = 0; i < N; i++) {
                size_t kc = (size_t)j * N + i;
                if (b->w[kc] <= 0) continue;
                double u = c + (b->ix - h + i - b->x) * os, v = c + (b->iy - h + j - b->y) * os;
                long iu = lround(u), jv = lround(v);
                if (iu < 0 || jv < 0 || iu >= S || jv >= S) continue;
                double ws = F2 * b->w[kc];
                R[jv * S + iu] += ws * (b->d[kc] - b->b) / b->F;
                Wg[jv * S + iu] += ws;
            }
    }
    if (os > 1) {
        tri_smooth(R, tmpd, S, os);
        tri_smooth(Wg, tmpd, S, os);
    }
    if (wsk > 0) {
        wing_smooth(R, S, wsr0, wsk, wsbuf);
        wing_smooth(Wg, S, wsr0, wsk, wsbuf);
    }
    for (int k = 0; k < S * S; k++) R[k] = Wg[k] > 0 ? R[k] / Wg[k] : 0.0;
    /* The weighted mean of an uneven sub-pixel coverage still carries the
     * coverage pattern (the ratio of two smoothed fields is not smooth at the
     * pixel frequency): smooth the estimate itself once. The updates cannot
     * change what the start has at that frequency, so the start must be clean;
     * the bias this smoothing puts at lower frequencies is removed by the
     * iterations. */
    if (os > 1) tri_smooth(R, tmpd, S, os);
    for (int k = 0; k < S * S; k++) psf->data[k] = (float)R[k];
    if (sp_psf_normalize(psf) != SP_OK) {
        sp_err_clear();
        snprintf(res->reason, sizeof res->reason, "initial stack of %d stars has no flux", nstars);
        SP_TRY(make_fallback(res, img, ivar, mask, nx, ny, stars, nstars, &p, S, fwhm));
        goto growth;
    }
    fwhm = psf_fwhm(psf);
    if (!(fwhm > 0.5)) fwhm = p.fallback_fwhm;
    {
        double ox, oy;
        psf_centroid(psf, fwhm, &ox, &oy);
        psf_shift(psf, ox, oy, tmpf);
    }

    const int rf = (int)ceil(p.fit_radius > 0 ? p.fit_radius : fmax(3.0, 1.5 * fwhm)) > h
                       ? h
                       : (int)ceil(p.fit_radius > 0 ? p.fit_radius : fmax(3.0, 1.5 * fwhm));
    const double rb = p.bkg_radius > 0 ? p.bkg_radius : fmax(3.0 * fwhm, 0.5 * h);
    SP_ALLOC(fitbuf, 3 * (size_t)(2 * rf + 1) * (2 * rf + 1));

    /* spatial variation: normalised star offsets from the reference point
     * (field positions when given) */
    double xref = p.x_ref, yref = p.y_ref, L = 1.0;
    int ngood = 0;
#define FX(s) (p.field_xy ? p.field_xy[2 * (s)] : bs[s].x0)
#define FY(s) (p.field_xy ? p.field_xy[2 * (s) + 1] : bs[s].y0)
    {
        double mx = 0, my = 0;
        for (int s = 0; s < nstars; s++)
            if (bs[s].used) {
                mx += FX(s);
                my += FY(s);
                ngood++;
            }
        if (!isfinite(xref)) xref = ngood ? mx / ngood : 0.5 * nx;
        if (!isfinite(yref)) yref = ngood ? my / ngood : 0.5 * ny;
        for (int s = 0; s < nstars; s++)
            if (bs[s].used) L = fmax(L, fmax(fabs(FX(s) - xref), fabs(FY(s) - yref)));
        if (p.spatial_scale > 0) L = p.spatial_scale;
    }
    /* the degree: as asked, lowered until there are spatial_min_stars / 3 usable
     * stars per unknown of a node (degree 1: spatial_min_stars) */
    int deg = p.spatial_degree > 4 ? 4 : p.spatial_degree;
    while (deg >= 1 && 3 * ngood < p.spatial_min_stars * (deg + 1) * (deg + 2) / 2) deg--;
    const int spatial = deg >= 1;
    /* nt terms per node (the constant first); the normal equations of a node
     * are RT[t] = sum w r phi_t (t >= 1; t = 0 is R) and AT[a,b] = sum w phi_a
     * phi_b (a <= b, (0,0) is Wg): nk = nt - 1 + nt (nt + 1) / 2 - 1 arrays */
    const int nt = (deg + 1) * (deg + 2) / 2, npair = nt * (nt + 1) / 2 - 1, nne = nt - 1 + npair;
    const size_t SS = (size_t)S * S;
    if (spatial) {
        SP_ALLOC(G, (size_t)(nt - 1) * SS);
        SP_ALLOC(NE, (size_t)(nne + nt - 1) * SS); /* + the solved updates of the terms */
        SP_ALLOC(phis, (size_t)nstars * (nt + npair + 1));
        for (int s = 0; s < nstars; s++) {
            double *ph = phis + (size_t)s * (nt + npair + 1);
            monomials(deg, (FX(s) - xref) / L, (FY(s) - yref) / L, ph);
            double *pp = ph + nt; /* products phi_a phi_b, a <= b, without (0, 0) */
            int m = 0;
            for (int a = 0; a < nt; a++)
                for (int bq = a; bq < nt; bq++)
                    if (a || bq) pp[m++] = ph[a] * ph[bq];
        }
        SP_TRY(sp_psf_alloc(S, os, &ps));
    }
#undef FX
#undef FY

    int iter;
    for (iter = 1; iter <= p.max_iters; iter++) {
        /* one pass per star: (1) fit centre and flux, (2) reject contaminated
         * pixels (from the 2nd iteration), (3) local background (first three
         * iterations only: later models change it by far less than its
         * noise), (4) residuals on the nearest node */
        memset(R, 0, sizeof(double) * S * S);
        memset(Wg, 0, sizeof(double) * S * S);
        const int clip = p.clip_sigma > 0 && iter >= 2;
        const int spat = spatial && iter >= 2; /* the gradients start once psi has settled */
        if (spat) memset(NE, 0, sizeof(double) * nne * SS);
        int nused = 0;
        for (int s = 0; s < nstars; s++) {
            bstar *b = &bs[s];
            if (!b->used) continue;
            const double *ph = spatial ? phis + (size_t)s * (nt + npair + 1) : NULL;
            const sp_psf *cur = psf;
            if (spat) {
                for (size_t k = 0; k < SS; k++) {
                    double a = psf->data[k];
                    for (int t = 1; t < nt; t++) a += ph[t] * G[(size_t)(t - 1) * SS + k];
                    ps->data[k] = (float)a;
                }
                cur = ps;
            }
            if (!fit_star(cur, b, N, rf, iter == 1 ? 4 : 2, fitbuf)) {
                b->used = 0;
                continue;
            }
            nused++;
            render_vals(cur, b->x - (b->ix - h), b->y - (b->iy - h), N, model, rbuf);
            /* contaminated pixels out first, so the background and the stack
             * both skip them */
            if (clip && p.reject_sigma > 0) star_reject(b, model, N, p.reject_sigma, rejbuf);
            if (p.local_bkg && rb < h && iter <= 3) star_bkg(b, model, N, rb, p.clip_sigma);
            double F2 = b->F * b->F, iF = 1.0 / b->F;
            /* nearest node of pixel (i, j): (iu0 + i os, jv0 + j os), the
             * sub-sample phase being the same for every pixel */
            const long iu0 = lround(c + (b->ix - h - b->x) * os), jv0 = lround(c + (b->iy - h - b->y) * os);
            for (int j = 0; j < N; j++) {
                long jv = jv0 + (long)j * os;
                if (jv < 0 || jv >= S) continue;
                for (int i = 0; i < N; i++) {
                    size_t kc = (size_t)j * N + i;
                    double w = b->w[kc];
                    if (w <= 0) continue;
                    long iu = iu0 + (long)i * os;
                    if (iu < 0 || iu >= S) continue;
                    double res_pix = b->d[kc] - b->b - b->F * model[kc];
                    /* outliers (cosmic rays, neighbours) in noise units, with a
                     * floor of CLIP_MODEL_FRAC of the model so that the model's
                     * own remaining error at a bright core is never clipped */
                    if (clip) {
                        double fm = CLIP_MODEL_FRAC * b->F * model[kc];
                        if (res_pix * res_pix > p.clip_sigma * p.clip_sigma * (1.0 / w + fm * fm)) continue;
                    }
                    const long nk = jv * S + iu;
                    const double ww = F2 * w, wr = ww * res_pix * iF;
                    R[nk] += wr;
                    Wg[nk] += ww;
                    if (spat) {
                        double *ne = NE + (size_t)nk;
                        for (int t = 1; t < nt; t++) ne[(size_t)(t - 1) * SS] += wr * ph[t];
                        const double *pp = ph + nt;
                        double *na = ne + (size_t)(nt - 1) * SS;
                        for (int m = 0; m < npair; m++) na[(size_t)m * SS] += ww * pp[m];
                    }
                }
            }
        }
        if (nused < p.min_stars) break;
        /* (4) smoothed update */
        if (os > 1 && p.smooth) {
            tri_smooth(R, tmpd, S, os);
            tri_smooth(Wg, tmpd, S, os);
            if (spat)
                for (int q = 0; q < nne; q++) tri_smooth(NE + (size_t)q * SS, tmpd, S, os);
        }
        if (wsk > 0) {
            wing_smooth(R, S, wsr0, wsk, wsbuf);
            wing_smooth(Wg, S, wsr0, wsk, wsbuf);
            if (spat)
                for (int q = 0; q < nne; q++) wing_smooth(NE + (size_t)q * SS, S, wsr0, wsk, wsbuf);
        }
        if (spat) {
            /* per node: the nt x nt normal equations [d0 d1 .. ] = [R RT..], with
             * a light ridge on the variable terms (no variation is the prior) */
            double A[225], bv[15];
            double *DU = NE + (size_t)nne * SS; /* solved updates of the terms */
            for (size_t k = 0; k < SS; k++) {
                double a00 = Wg[k];
                if (!(a00 > 0)) {
                    R[k] = 0;
                    for (int t = 1; t < nt; t++) DU[(size_t)(t - 1) * SS + k] = 0;
                    continue;
                }
                int m = 0;
                for (int a = 0; a < nt; a++)
                    for (int bq = a; bq < nt; bq++) {
                        double v = (a || bq) ? NE[(size_t)(nt - 1 + m++) * SS + k] : a00;
                        if (a == bq && a > 0) v += 0.01 * a00;
                        A[a * nt + bq] = A[bq * nt + a] = v;
                    }
                bv[0] = R[k];
                for (int t = 1; t < nt; t++) bv[t] = NE[(size_t)(t - 1) * SS + k];
                if (chol_solve(A, bv, nt)) {
                    R[k] = bv[0];
                    for (int t = 1; t < nt; t++) DU[(size_t)(t - 1) * SS + k] = bv[t];
                } else {
                    R[k] = R[k] / a00;
                    for (int t = 1; t < nt; t++) DU[(size_t)(t - 1) * SS + k] = 0;
                }
            }
            /* the variable terms carry no flux (star fluxes absorb it) and no
             * centroid shift (star positions absorb it): project both out */
            for (int t = 1; t < nt; t++) {
                double *g = G + (size_t)(t - 1) * SS;
                const double *du = DU + (size_t)(t - 1) * SS;
                for (size_t k = 0; k < SS; k++) g[k] += du[k];
                grad_project(psf, g, S);
            }
        } else {
            for (int k = 0; k < S * S; k++) R[k] = Wg[k] > 0 ? R[k] / Wg[k] : 0.0;
        }
        double dmax = 0, peak = 0;
        for (int k = 0; k < S * S; k++) {
            double dlt = R[k];
            psf->data[k] += (float)dlt;
            if (fabs(dlt) > dmax) dmax = fabs(dlt);
            if (psf->data[k] > peak) peak = psf->data[k];
        }
        /* (5) recentre, (6) normalise */
        double ox, oy;
        psf_centroid(psf, fwhm, &ox, &oy);
        if (hypot(ox, oy) > 1e-3) psf_shift(psf, ox, oy, tmpf);
        if (sp_psf_normalize(psf) != SP_OK) {
            sp_err_clear();
            break;
        }
        if (iter >= 2 && dmax < p.conv_tol * peak) {
            iter++;
            break;
        }
    }
    res->iterations = iter - 1;

    /* final fits, chi2, stamps, residual rms */
    {
        int nused = 0;
        double rn = 0, rd = 0;
        fwhm = psf_fwhm(psf);
        if (p.keep_stamps) {
            SP_ALLOC(res->star_stamps, (size_t)nstars * N * N);
            SP_ALLOC(res->resid_stamps, (size_t)nstars * N * N);
        }
        for (int s = 0; s < nstars; s++) {
            bstar *b = &bs[s];
            const sp_psf *cur = psf;
            if (spatial) {
                const double *ph = phis + (size_t)s * (nt + npair + 1);
                for (size_t k = 0; k < SS; k++) {
                    double a = psf->data[k];
                    for (int t = 1; t < nt; t++) a += ph[t] * G[(size_t)(t - 1) * SS + k];
                    ps->data[k] = (float)a;
                }
                cur = ps;
            }
            if (b->used && !fit_star(cur, b, N, rf, 2, fitbuf)) b->used = 0;
            render_vals(cur, b->x - (b->ix - h), b->y - (b->iy - h), N, model, rbuf);
            double chi = 0;
            int nc = 0;
            for (int k = 0; k < N * N; k++) {
                int i = k % N, j = k / N;
                double dx = b->ix - h + i - b->x, dy = b->iy - h + j - b->y;
                double rr = b->d[k] - b->b - b->F * model[k];
                if (p.keep_stamps) {
                    res->star_stamps[(size_t)s * N * N + k] = b->w[k] > 0 ? (float)((b->d[k] - b->b) / b->F) : NAN;
                    res->resid_stamps[(size_t)s * N * N + k] = b->w[k] > 0 ? (float)(rr / b->F) : NAN;
                }
                if (b->w[k] <= 0 || dx * dx + dy * dy > 4 * fwhm * fwhm) continue;
                chi += rr * rr * b->w[k];
                nc++;
                if (b->used) {
                    rn += b->w[k] * rr * rr;
                    rd += b->w[k] * (b->F * model[k]) * (b->F * model[k]);
                }
            }
            res->star_x[s] = b->x;
            res->star_y[s] = b->y;
            res->star_flux[s] = b->F;
            res->star_bkg[s] = b->b;
            res->star_chi2[s] = nc > 3 ? chi / (nc - 3) : NAN;
            res->star_used[s] = b->used;
            nused += b->used;
        }
        res->nstars_used = nused;
        res->resid_rms = rd > 0 ? sqrt(rn / rd) : NAN;
    }

    /* quality gate */
    {
        double mn = 0, pk = 0;
        int finite = 1;
        for (int k = 0; k < S * S; k++) {
            float v = psf->data[k];
            if (!isfinite(v)) finite = 0;
            if (v < mn) mn = v;
            if (v > pk) pk = v;
        }
        double ox = 0, oy = 0;
        if (finite) psf_centroid(psf, fwhm, &ox, &oy);
        res->reason[0] = 0;
        if (res->nstars_used < p.min_stars)
            snprintf(res->reason, sizeof res->reason, "%d usable PSF stars < min_stars %d", res->nstars_used,
                     p.min_stars);
        else if (!finite)
            snprintf(res->reason, sizeof res->reason, "ePSF has non-finite values");
        else if (!(pk > 0) || mn < -p.max_neg_frac * pk)
            snprintf(res->reason, sizeof res->reason, "ePSF strongly negative (min %.3g of peak)",
                     pk > 0 ? mn / pk : -1.0);
        else if (hypot(ox, oy) > p.max_center_offset)
            snprintf(res->reason, sizeof res->reason, "ePSF centroid off by %.3f px", hypot(ox, oy));
        else if (!(fwhm > 0.5 && fwhm < h))
            snprintf(res->reason, sizeof res->reason, "ePSF FWHM %.3g px implausible", fwhm);
        if (res->reason[0]) {
            /* fit the Moffat to the stars that survived (their refined centres) */
            sp_psfstar *fs = malloc(sizeof(sp_psfstar) * (size_t)nstars);
            SP_CHECK(fs, SP_ERR_NOMEM, "out of memory (fallback stars)");
            int nf = 0;
            for (int s = 0; s < nstars; s++) {
                fs[nf] = stars[s];
                if (bs[s].used) {
                    fs[nf].x = bs[s].x;
                    fs[nf].y = bs[s].y;
                    fs[nf].flux = bs[s].F;
                    fs[nf].bkg = bs[s].b;
                }
                nf++;
            }
            status = make_fallback(res, img, ivar, mask, nx, ny, fs, nf, &p, S,
                                   (fwhm > 0.5 && fwhm < h) ? fwhm : p.fallback_fwhm);
            free(fs);
            if (status != SP_OK) goto cleanup;
            if (res->kind == SP_EPSF_MOFFAT_FIT && p.fallback_resid_fwhm > 0) {
                sp_psf *M0 = NULL;
                SP_TRY(sp_psf_copy(res->psf, &M0));
                M0->fwhm = res->moffat_fwhm;
                if (!fallback_residual(M0, bs, stars, nstars, N, rf, &p, R, Wg, tmpd, model, rbuf, fitbuf)) {
                    sp_psf_free(&M0);
                } else {
                    M0->fwhm = res->psf->fwhm;
                    M0->nstars = res->psf->nstars;
                    M0->is_fallback = 1;
                    sp_psf_free(&res->psf);
                    res->psf = M0;
                }
            }
            goto growth;
        }
    }
    res->kind = SP_EPSF_EMPIRICAL;
    res->is_fallback = 0;
    if (p.core_fwhm > 0) SP_TRY(hybrid_wings(psf, img, ivar, mask, nx, ny, stars, bs, nstars, &p, fwhm, res));
    res->x_ref = xref;
    res->y_ref = yref;
    if (spatial) {
        res->spatial_degree = deg;
        res->nterms = nt - 1;
        res->spatial_scale = L;
        SP_ALLOC(res->grad_x, SS);
        SP_ALLOC(res->grad_y, SS);
        SP_ALLOC(res->terms, (size_t)(nt - 1) * SS);
        for (size_t k = 0; k < SS; k++) {
            res->grad_x[k] = (float)(G[k] / L);
            res->grad_y[k] = (float)(G[SS + k] / L);
        }
        for (size_t k = 0; k < (size_t)(nt - 1) * SS; k++) res->terms[k] = (float)G[k];
    }
    psf->fwhm = fwhm;
    psf->nstars = res->nstars_used;
    psf->is_fallback = 0;
    res->psf = psf;
    psf = NULL;

growth:
    res->fwhm = res->psf->fwhm > 0 ? res->psf->fwhm : psf_fwhm(res->psf);
    if (res->is_fallback) res->fwhm = psf_fwhm(res->psf);
    res->ngrowth = 2 * h;
    SP_ALLOC(res->growth_r, res->ngrowth);
    SP_ALLOC(res->growth_ee, res->ngrowth);
    for (int k = 0; k < res->ngrowth; k++) {
        res->growth_r[k] = 0.5 * (k + 1);
        res->growth_ee[k] = sp_epsf_encircled(res->psf, res->growth_r[k]);
    }
    *out = res;
    res = NULL;
cleanup:
    if (bs)
        for (int s = 0; s < nstars; s++) {
            free(bs[s].d);
            free(bs[s].w);
            free(bs[s].w0);
        }
    free(bs);
    free(R);
    free(Wg);
    free(tmpd);
    free(G);
    free(NE);
    free(phis);
    free(wsbuf);
    sp_psf_free(&ps);
    free(tmpf);
    free(model);
    free(fitbuf);
    free(rbuf);
    free(bkgbuf);
    free(rejbuf);
    sp_psf_free(&psf);
    sp_epsf_result_free(&res);
    return status;
}

/* ------------------------------------------------------------------------ */
/* Band-wide builds from cutouts                                              */

void sp_epsf_cutout_free(sp_epsf_cutout *c)
{
    if (!c) return;
    free(c->d);
    free(c->w);
    c->d = c->w = NULL;
}

int sp_epsf_cutouts(const float *img, const float *ivar, const uint8_t *mask, int nx, int ny, double x0, double y0,
                    const sp_psfstar *stars, int nstars, const sp_epsf_params *pin, sp_epsf_cutout *out, int *nout)
{
    int status = SP_OK;
    sp_epsf_params p;
    bstar b;
    memset(&b, 0, sizeof b);
    if (pin)
        p = *pin;
    else
        sp_epsf_params_default(&p);
    SP_CHECK(img && out && nout && nstars >= 0 && (nstars == 0 || stars), SP_ERR_INPUT,
             "sp_epsf_cutouts: bad arguments");
    SP_CHECK(p.final_size >= 5 && p.final_size % 2 == 1, SP_ERR_INPUT,
             "ePSF: final_psf_size %d must be odd and >= 5", p.final_size);
    SP_CHECK(x0 == floor(x0) && y0 == floor(y0), SP_ERR_INPUT, "sp_epsf_cutouts: the image origin must be whole pixels");
    *nout = 0;
    const int N = p.final_size;
    for (int s = 0; s < nstars; s++) {
        SP_TRY(cut_star(&b, img, ivar, mask, nx, ny, &stars[s], &p, N));
        if (b.used) {
            sp_epsf_cutout *c = &out[(*nout)++];
            memset(c, 0, sizeof *c);
            c->n = N;
            c->ix = b.ix + (int)x0;
            c->iy = b.iy + (int)y0;
            c->x = stars[s].x + x0;
            c->y = stars[s].y + y0;
            c->flux = stars[s].flux;
            c->bkg = stars[s].bkg;
            c->bkg_rms = stars[s].bkg_rms;
            c->snr = stars[s].snr;
            c->q = stars[s].q;
            c->d = b.d;
            c->w = b.w0;
            b.d = b.w0 = NULL;
        }
        free(b.d);
        free(b.w);
        free(b.w0);
        memset(&b, 0, sizeof b);
    }
cleanup:
    free(b.d);
    free(b.w);
    free(b.w0);
    return status;
}

int sp_epsf_build_field(const sp_epsf_cutout *cuts, int ncuts, const sp_epsf_params *pin, sp_epsf_result **res)
{
    int status = SP_OK;
    sp_epsf_params p;
    float *img = NULL, *iv = NULL;
    sp_psfstar *st = NULL;
    double *fxy = NULL;
    if (pin)
        p = *pin;
    else
        sp_epsf_params_default(&p);
    SP_CHECK(res && ncuts >= 0 && (ncuts == 0 || cuts), SP_ERR_INPUT, "sp_epsf_build_field: bad arguments");
    const int N = p.final_size, h = (N - 1) / 2, side = N + 1; /* one empty pixel between cutouts */
    for (int s = 0; s < ncuts; s++)
        SP_CHECK(cuts[s].n == N && cuts[s].d && cuts[s].w, SP_ERR_INPUT,
                 "sp_epsf_build_field: cutout %d has side %d, not final_size %d", s, cuts[s].n, N);
    int ncol = 1;
    while ((long)ncol * ncol < ncuts) ncol++;
    const int nrow = ncuts > 0 ? (ncuts + ncol - 1) / ncol : 1;
    const int mx = ncol * side + 1, my = nrow * side + 1;
    SP_ALLOC(img, (size_t)mx * my);
    SP_ALLOC(iv, (size_t)mx * my);
    SP_ALLOC(st, ncuts + 1);
    SP_ALLOC(fxy, 2 * (size_t)ncuts + 2);
    for (int s = 0; s < ncuts; s++) {
        const sp_epsf_cutout *c = &cuts[s];
        /* the cutout's centre pixel lands on mosaic pixel (X, Y) */
        int X = 1 + (s % ncol) * side + h, Y = 1 + (s / ncol) * side + h;
        for (int j = 0; j < N; j++)
            for (int i = 0; i < N; i++) {
                size_t k = (size_t)(Y - h + j) * mx + (X - h + i), kc = (size_t)j * N + i;
                img[k] = c->d[kc];
                iv[k] = c->w[kc] > 0 ? c->w[kc] : 0.0f;
            }
        st[s].x = X + (c->x - c->ix);
        st[s].y = Y + (c->y - c->iy);
        st[s].flux = c->flux;
        st[s].bkg = c->bkg;
        st[s].bkg_rms = c->bkg_rms;
        st[s].snr = c->snr;
        st[s].q = c->q;
        st[s].index = s;
        fxy[2 * s] = c->x;
        fxy[2 * s + 1] = c->y;
    }
    p.field_xy = fxy;
    p.neighbours = NULL;
    p.nneighbours = 0;
    SP_TRY(sp_epsf_build(img, iv, NULL, mx, my, st, ncuts, &p, res));
    /* star positions back to field pixels */
    for (int s = 0; s < ncuts; s++) {
        int X = 1 + (s % ncol) * side + h, Y = 1 + (s / ncol) * side + h;
        (*res)->star_x[s] += cuts[s].ix - X;
        (*res)->star_y[s] += cuts[s].iy - Y;
    }
cleanup:
    free(img);
    free(iv);
    free(st);
    free(fxy);
    return status;
}

/* ------------------------------------------------------------------------ */
/* Cell grid                                                                  */

/* Bracketing centres along one axis: i0, i1 and weight of i1. */
static void axis_weights(const double *edge, int n, double x, int *i0, int *i1, double *t)
{
    if (n == 1) {
        *i0 = *i1 = 0;
        *t = 0;
        return;
    }
    double c0 = 0.5 * (edge[0] + edge[1]);
    double cn = 0.5 * (edge[n - 1] + edge[n]);
    if (x <= c0) {
        *i0 = *i1 = 0;
        *t = 0;
        return;
    }
    if (x >= cn) {
        *i0 = *i1 = n - 1;
        *t = 0;
        return;
    }
    for (int i = 0; i < n - 1; i++) {
        double a = 0.5 * (edge[i] + edge[i + 1]), b = 0.5 * (edge[i + 1] + edge[i + 2]);
        if (x >= a && x <= b) {
            *i0 = i;
            *i1 = i + 1;
            *t = (x - a) / (b - a);
            return;
        }
    }
    *i0 = *i1 = n - 1;
    *t = 0;
}

int sp_epsf_grid_weights(const sp_epsf_grid *g, double x, double y, int idx[4], double w[4], int *n)
{
    int status = SP_OK;
    SP_CHECK(g && g->ncx >= 1 && g->ncy >= 1 && g->xedge && g->yedge && g->psfs, SP_ERR_INPUT,
             "ePSF grid: incomplete description");
    SP_CHECK(isfinite(x) && isfinite(y), SP_ERR_INPUT, "ePSF grid: position (%g, %g) not finite", x, y);
    int i0, i1, j0, j1;
    double tx, ty;
    axis_weights(g->xedge, g->ncx, x, &i0, &i1, &tx);
    axis_weights(g->yedge, g->ncy, y, &j0, &j1, &ty);
    int ci[4] = {j0 * g->ncx + i0, j0 * g->ncx + i1, j1 * g->ncx + i0, j1 * g->ncx + i1};
    double cw[4] = {(1 - tx) * (1 - ty), tx * (1 - ty), (1 - tx) * ty, tx * ty};
    int m = 0;
    double ws = 0;
    for (int k = 0; k < 4; k++) {
        if (cw[k] <= 0 || !g->psfs[ci[k]]) continue;
        int dup = -1;
        for (int q = 0; q < m; q++)
            if (idx[q] == ci[k]) dup = q;
        if (dup >= 0)
            w[dup] += cw[k];
        else {
            idx[m] = ci[k];
            w[m] = cw[k];
            m++;
        }
        ws += cw[k];
    }
    SP_CHECK(m > 0 && ws > 0, SP_ERR_INPUT, "ePSF grid: no cell PSF around (%.1f, %.1f)", x, y);
    for (int k = 0; k < m; k++) w[k] /= ws;
    *n = m;
cleanup:
    return status;
}

int sp_epsf_grid_at(const sp_epsf_grid *g, double x, double y, sp_psf *out)
{
    int status = SP_OK, idx[4], n = 0;
    double w[4];
    const sp_psf *ps[4];
    SP_CHECK(out, SP_ERR_INTERNAL, "sp_epsf_grid_at: NULL output");
    SP_TRY(sp_epsf_grid_weights(g, x, y, idx, w, &n));
    for (int k = 0; k < n; k++) ps[k] = g->psfs[idx[k]];
    SP_TRY(sp_psf_blend(ps, w, n, out));
cleanup:
    return status;
}

/* ------------------------------------------------------------------------ */
/* Band-wide wing                                                             */

void sp_epsf_pool_params_default(sp_epsf_pool_params *p)
{
    p->rin_fwhm = 2.0;
    p->rout_fwhm = 3.0;
    p->smooth_k = 0.15;
}

int sp_epsf_pool_wings(sp_psf *const *psfs, const double *w, const uint8_t *apply, int n,
                       const sp_epsf_pool_params *pin)
{
    int status = SP_OK;
    sp_epsf_pool_params p;
    double *mean = NULL, *sm = NULL;
    if (pin)
        p = *pin;
    else
        sp_epsf_pool_params_default(&p);
    SP_CHECK(n >= 0 && (n == 0 || (psfs && w && apply)), SP_ERR_INTERNAL, "sp_epsf_pool_wings: bad arguments");
    SP_CHECK(p.rin_fwhm >= 0 && p.rout_fwhm >= p.rin_fwhm && p.smooth_k >= 0, SP_ERR_INPUT,
             "ePSF wing pooling: need 0 <= rin (%g) <= rout (%g) and smooth_k (%g) >= 0", p.rin_fwhm, p.rout_fwhm,
             p.smooth_k);
    int S = 0, os = 0;
    double ws = 0;
    for (int k = 0; k < n; k++) {
        if (!psfs[k] || !(w[k] > 0)) continue;
        if (!S) S = psfs[k]->size, os = psfs[k]->oversamp;
        SP_CHECK(psfs[k]->size == S && psfs[k]->oversamp == os, SP_ERR_INTERNAL,
                 "ePSF wing pooling: cells of one band differ in stamp geometry");
        ws += w[k];
    }
    if (!(ws > 0)) return SP_OK;
    const size_t SS = (size_t)S * S;
    SP_ALLOC(mean, SS);
    SP_ALLOC(sm, SS);
    for (int k = 0; k < n; k++) {
        if (!psfs[k] || !(w[k] > 0)) continue;
        const double a = w[k] / ws;
        for (size_t q = 0; q < SS; q++) mean[q] += a * psfs[k]->data[q];
    }
    sp_psf *tmp = NULL;
    SP_TRY(sp_psf_alloc(S, os, &tmp));
    for (size_t q = 0; q < SS; q++) tmp->data[q] = (float)mean[q];
    double cx, cy, fwhm = 0;
    sp_psf_moments(tmp, &cx, &cy, &fwhm);
    sp_psf_free(&tmp);
    if (!(fwhm > 0.5)) goto cleanup; /* a degenerate mean: leave the cells alone */
    const double c = 0.5 * (S - 1), rin = p.rin_fwhm * fwhm, rout = p.rout_fwhm * fwhm;
    /* the mean's wing, smoothed with a Gaussian of sigma k (r - rin) (gather,
     * weights renormalised over the stamp) */
    for (int j = 0; j < S; j++)
        for (int i = 0; i < S; i++) {
            const double r = hypot(i - c, j - c) / os, sg = p.smooth_k * (r - rin) * os; /* samples */
            const size_t q = (size_t)j * S + i;
            if (!(sg > 0.25)) {
                sm[q] = mean[q];
                continue;
            }
            const int R = (int)ceil(3.0 * sg);
            const double i2 = 0.5 / (sg * sg);
            double a = 0, b = 0;
            for (int jj = j - R < 0 ? 0 : j - R; jj <= (j + R > S - 1 ? S - 1 : j + R); jj++) {
                const double dy2 = (double)(jj - j) * (jj - j);
                for (int ii = i - R < 0 ? 0 : i - R; ii <= (i + R > S - 1 ? S - 1 : i + R); ii++) {
                    const double d2 = dy2 + (double)(ii - i) * (ii - i);
                    if (d2 > 9.0 * sg * sg) continue;
                    const double g = exp(-d2 * i2);
                    a += g * mean[(size_t)jj * S + ii];
                    b += g;
                }
            }
            sm[q] = b > 0 ? a / b : mean[q];
        }
    for (int k = 0; k < n; k++) {
        if (!psfs[k] || !apply[k] || psfs[k]->size != S || psfs[k]->oversamp != os) continue;
        float *d = psfs[k]->data;
        for (int j = 0; j < S; j++)
            for (int i = 0; i < S; i++) {
                const double r = hypot(i - c, j - c) / os;
                double t = r <= rin ? 1.0 : r >= rout ? 0.0 : cos(0.5 * M_PI * (r - rin) / (rout - rin));
                t *= t;
                const size_t q = (size_t)j * S + i;
                d[q] = (float)(sm[q] + t * (d[q] - sm[q]));
            }
        SP_TRY(sp_psf_normalize(psfs[k]));
        sp_psf_moments(psfs[k], &cx, &cy, &psfs[k]->fwhm);
    }
cleanup:
    free(mean);
    free(sm);
    return status;
}

/* moffat_field.c — the band-wide Moffat (sp_epsf.h "Band-wide Moffat"): one
 * elliptical Moffat over a whole field whose ln FWHM, ln(beta - 1), e1, e2 are
 * polynomials in the position, fitted jointly to the PSF-star cutouts of every
 * cell of a band, each star with its own centre and flux.
 *
 * Why: with 5-20 stars per cell a cell's own Moffat is noisy (its FWHM scatters
 * by a few percent from cell to cell, which is a few percent of flux), and one
 * PSF per cell blended between cell centres cannot follow a PSF that varies
 * inside the cells; beyond the outer cell centres the blend is constant, so
 * near the tile's edges it is the PSF of a point 1/4 of a 2x2 grid inwards.
 * Fitted to all the band's stars, 6 terms per parameter (degree 2) are far
 * better determined than 4 x 4 cells' constants, and the model is evaluated
 * where each patch is.
 *
 * The fit: Levenberg-Marquardt over (global coefficients, per-star x, y, F).
 * Per pixel the Jacobian has 4 shape columns and 3 star columns; the shape
 * columns of a star's pixels share the star's monomials phi(u, v), so each
 * star's 7 x 7 normal block is accumulated first and expanded into the global
 * one after. The stars' 3 x 3 blocks are eliminated (Schur complement) so a
 * step solves one system of the global size (<= 60) whatever the star count.
 * Pixels are integrated by Gauss-Legendre 3 x 3 (moffat_gl3), closer to the
 * true pixel integral than the cell fit's midpoint rule; the rendered stamps
 * (sp_psf_moffat_into) integrate exactly too. Gaussian priors on the variable
 * terms keep a band with few stars from swinging where it has none. */
#include "surveyproc/sp_epsf.h"

#include "surveyproc/sp_error.h"
#include "psf_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define LNF_MIN (-0.6931471805599453) /* ln 0.5 */
#define LNF_MAX 3.912023005428146     /* ln 50 */
#define LNB_MIN (-2.302585092994046)  /* ln 0.1: beta >= 1.1 */
#define LNB_MAX 3.4011973816621555    /* ln 30 */
#define E_MAX 0.95
#define MAXG (4 * SP_MOFFAT_FIELD_MAXT)
#define MISFIT_FRAC 0.02 /* star clip: rms misfit over the star's own signal (see the clip) */

void sp_moffat_field_params_default(sp_moffat_field_params *p)
{
    memset(p, 0, sizeof *p);
    p->degree = 2;
    p->min_stars_per_term = 1.0;
    p->scale = 1.0;
    p->fwhm0 = 4.0;
    p->beta0 = 3.0;
    p->max_stars = 120;
    p->clip_sigma = 5.0;
    p->corner_fwhm_range = 1.5;
}

static int nterms(int d) { return (d + 1) * (d + 2) / 2; }

/* Monomials of degree <= d in (u, v), ordered by degree: 1, u, v, u^2, u v, v^2, ... */
static void monos(int d, double u, double v, double *phi)
{
    int k = 0;
    for (int n = 0; n <= d; n++)
        for (int j = 0; j <= n; j++) {
            double t = 1.0;
            for (int a = 0; a < n - j; a++) t *= u;
            for (int a = 0; a < j; a++) t *= v;
            phi[k++] = t;
        }
}

/* The Moffat's pixel integral and its derivatives, for the field fit:
 * Gauss-Legendre 3 x 3 (exact for polynomials of degree 5 across the pixel; the
 * cell fit's 3x3 midpoint rule is off by ~1e-3 of the peak in a FWHM-4 core,
 * which biases the fitted FWHM by 0.2-0.7% against bright stars), or, where the
 * profile is smooth across the pixel (moffat_pix's criterion), its second-order
 * expansion f + lap f / 24 (the same integral to fourth order; one pow). With g
 * non-NULL also g[0..5] = dV/d(dx, dy, alpha, beta, q, theta) as
 * moffat_pix_grad: from the same nodes in the core, at the pixel centre where
 * smooth (there the Jacobian only steers the steps). */
static double moffat_gl3(double dx, double dy, double alpha, double beta, double q, double ct, double st, double *g)
{
    static const double gx[3] = {-0.3872983346207417, 0.0, 0.3872983346207417};
    static const double gw[3] = {5.0 / 18.0, 8.0 / 18.0, 5.0 / 18.0};
    const double ia2 = 1.0 / (alpha * alpha), iq = 1.0 / q, N = (beta - 1.0) / (M_PI * alpha * alpha * q);
    const double u0 = ct * dx + st * dy, w0 = (-st * dx + ct * dy) * iq, Q0 = (u0 * u0 + w0 * w0) * ia2;
    const double iq2 = iq * iq, lapQ = 2.0 * (1.0 + iq2) * ia2, g2 = 4.0 * (u0 * u0 + w0 * w0 * iq2) * ia2 * ia2,
                 lim = 0.2 * (1.0 + Q0);
    if (beta * beta * g2 < 9.0 * lim * lim && beta * lapQ < 9.0 * lim) {
        const double t = 1.0 / (1.0 + Q0), f = pow(1.0 + Q0, -beta);
        if (g) {
            const double fq = -beta * f * t * ia2;
            g[0] = N * fq * 2.0 * (u0 * ct - w0 * st * iq);
            g[1] = N * fq * 2.0 * (u0 * st + w0 * ct * iq);
            g[2] = -2.0 / alpha * (N * fq * (u0 * u0 + w0 * w0) + f * N);
            g[3] = -N * f * log1p(Q0) + f * N / (beta - 1.0);
            g[4] = -2.0 * iq * N * fq * w0 * w0 - f * N * iq;
            g[5] = 2.0 * (q - iq) * N * fq * u0 * w0;
        }
        return (f + f * (-beta * t * lapQ + beta * (beta + 1.0) * t * t * g2) / 24.0) * N;
    }
    double sf = 0, sx = 0, sy = 0, sa = 0, sb = 0, sq = 0, sth = 0;
    for (int b = 0; b < 3; b++)
        for (int a = 0; a < 3; a++) {
            const double wt = gw[a] * gw[b], x = dx + gx[a], y = dy + gx[b];
            const double u = ct * x + st * y, w = (-st * x + ct * y) * iq, Q = (u * u + w * w) * ia2;
            if (!g) {
                sf += wt * pow(1.0 + Q, -beta);
                continue;
            }
            const double L = log1p(Q), f = exp(-beta * L), fq = -beta * f / (1.0 + Q) * ia2;
            sf += wt * f;
            sx += wt * fq * 2.0 * (u * ct - w * st * iq);
            sy += wt * fq * 2.0 * (u * st + w * ct * iq);
            sa += wt * fq * (u * u + w * w);
            sb -= wt * f * L;
            sq += wt * fq * w * w;
            sth += wt * fq * u * w;
        }
    if (g) {
        g[0] = sx * N;
        g[1] = sy * N;
        g[2] = -2.0 / alpha * (sa * N + sf * N);
        g[3] = sb * N + sf * N / (beta - 1.0);
        g[4] = -2.0 * iq * sq * N - sf * N * iq;
        g[5] = 2.0 * (q - iq) * sth * N;
    }
    return sf * N;
}

typedef struct {
    const sp_epsf_cutout *c;
    int R, h;                    /* box half-width, cutout half-width */
    double phi[SP_MOFFAT_FIELD_MAXT];
    double x, y, F, x0, y0, F0;  /* current and starting centre / flux */
    double chi2, ndof, s2; /* s2: sum w (F psf)^2, the star's own signal (squared SNR) */
    int used;
    double B[7][7], hv[7];       /* this star's normal block and gradient */
} fstar;

typedef struct {
    double fwhm, beta, alpha, q, ct, st, e, dalpha_dbeta;
    double q_e1, q_e2, t_e1, t_e2;
    int need_e;
} shape;

static void coef_params(const sp_moffat_field *m, const double *phi, double P[4])
{
    for (int k = 0; k < 4; k++) {
        double s = 0;
        for (int t = 0; t < m->nt[k]; t++) s += m->c[k][t] * phi[t];
        P[k] = s;
    }
}

static void shape_of(const double P[4], shape *s)
{
    double lf = fmin(fmax(P[0], LNF_MIN), LNF_MAX), lb = fmin(fmax(P[1], LNB_MIN), LNB_MAX);
    double e1 = P[2], e2 = P[3], e = hypot(e1, e2), ec = e > E_MAX ? E_MAX : e;
    s->fwhm = exp(lf);
    s->beta = 1.0 + exp(lb);
    s->e = e;
    s->q = (1 - ec) / (1 + ec);
    double th = 0.5 * atan2(e2, e1);
    s->ct = cos(th);
    s->st = sin(th);
    double p2 = pow(2.0, 1.0 / s->beta);
    s->alpha = s->fwhm / (2.0 * sqrt(p2 - 1.0));
    s->dalpha_dbeta = s->alpha * p2 * M_LN2 / (s->beta * s->beta) / (2.0 * (p2 - 1.0));
    s->need_e = e < 1e-6;
    double dq_de = e > E_MAX ? 0.0 : -2.0 / ((1 + e) * (1 + e));
    s->q_e1 = s->q_e2 = s->t_e1 = s->t_e2 = 0;
    if (!s->need_e) {
        s->q_e1 = dq_de * e1 / e;
        s->q_e2 = dq_de * e2 / e;
        s->t_e1 = -0.5 * e2 / (e * e);
        s->t_e2 = 0.5 * e1 / (e * e);
    }
}

/* chi2 of one star at (its x, y, F; model m). */
static double star_chi2(const sp_moffat_field *m, fstar *s, double x, double y, double F, double *ndof)
{
    double P[4];
    shape sh;
    coef_params(m, s->phi, P);
    shape_of(P, &sh);
    const sp_epsf_cutout *c = s->c;
    double chi2 = 0;
    int n = 0;
    for (int j = s->h - s->R; j <= s->h + s->R; j++)
        for (int i = s->h - s->R; i <= s->h + s->R; i++) {
            size_t k = (size_t)j * c->n + i;
            double w = c->w[k], d = c->d[k];
            if (!(w > 0) || !isfinite(d)) continue;
            double px = c->ix - s->h + i, py = c->iy - s->h + j;
            double mod = c->bkg + F * moffat_gl3(px - x, py - y, sh.alpha, sh.beta, sh.q, sh.ct, sh.st, NULL);
            double r = d - mod;
            chi2 += w * r * r;
            n++;
        }
    if (ndof) *ndof = n > 3 ? n - 3 : 1;
    return chi2;
}

/* This star's 7 x 7 normal block and gradient at the current parameters. */
static void star_normal(const sp_moffat_field *m, fstar *s)
{
    double P[4];
    shape sh;
    coef_params(m, s->phi, P);
    shape_of(P, &sh);
    const sp_epsf_cutout *c = s->c;
    memset(s->B, 0, sizeof s->B);
    memset(s->hv, 0, sizeof s->hv);
    /* at e = 0 the (q, theta) chain is singular: e1, e2 by forward differences */
    shape sh1, sh2;
    const double he = 1e-4;
    if (sh.need_e) {
        double Q[4] = {P[0], P[1], P[2] + he, P[3]};
        shape_of(Q, &sh1);
        Q[2] = P[2];
        Q[3] = P[3] + he;
        shape_of(Q, &sh2);
    }
    double chi2 = 0, s2 = 0;
    for (int j = s->h - s->R; j <= s->h + s->R; j++)
        for (int i = s->h - s->R; i <= s->h + s->R; i++) {
            size_t k = (size_t)j * c->n + i;
            double w = c->w[k], d = c->d[k];
            if (!(w > 0) || !isfinite(d)) continue;
            double px = c->ix - s->h + i - s->x, py = c->iy - s->h + j - s->y, g[6];
            double v = moffat_gl3(px, py, sh.alpha, sh.beta, sh.q, sh.ct, sh.st, g);
            double sw = sqrt(w), sF = sw * s->F, J[7];
            double r = sw * (d - c->bkg - s->F * v);
            J[0] = sF * g[2] * sh.alpha;
            J[1] = sF * (g[3] + g[2] * sh.dalpha_dbeta) * (sh.beta - 1.0);
            if (!sh.need_e) {
                J[2] = sF * (g[4] * sh.q_e1 + g[5] * sh.t_e1);
                J[3] = sF * (g[4] * sh.q_e2 + g[5] * sh.t_e2);
            } else {
                J[2] = sF * (moffat_gl3(px, py, sh1.alpha, sh1.beta, sh1.q, sh1.ct, sh1.st, NULL) - v) / he;
                J[3] = sF * (moffat_gl3(px, py, sh2.alpha, sh2.beta, sh2.q, sh2.ct, sh2.st, NULL) - v) / he;
            }
            J[4] = -sF * g[0];
            J[5] = -sF * g[1];
            J[6] = sw * v;
            for (int a = 0; a < 7; a++) {
                s->hv[a] += J[a] * r;
                for (int b = 0; b <= a; b++) s->B[a][b] += J[a] * J[b];
            }
            chi2 += r * r;
            s2 += J[6] * J[6] * s->F * s->F;
        }
    for (int a = 0; a < 7; a++)
        for (int b = a + 1; b < 7; b++) s->B[a][b] = s->B[b][a];
    s->chi2 = chi2;
    s->s2 = s2;
}

/* 3 x 3 SPD inverse (via Cholesky of a copy). 0: not SPD. */
static int inv3(const double A[3][3], double M[3][3])
{
    for (int c = 0; c < 3; c++) {
        double L[9], e[3] = {0, 0, 0};
        for (int a = 0; a < 3; a++)
            for (int b = 0; b < 3; b++) L[a * 3 + b] = A[a][b];
        e[c] = 1;
        if (!chol_solve(L, e, 3)) return 0;
        for (int a = 0; a < 3; a++) M[a][c] = e[a];
    }
    return 1;
}

/* Gaussian priors on the variable terms (degree >= 1) of each parameter, in units
 * of u, v in [-1, 1] over the field: sigma 0.15 on ln FWHM (15% per term), 0.3 on
 * ln(beta - 1), 0.1 on e1 and e2. Loose against real variations (a field's FWHM
 * changes by 10-30% edge to edge), they keep a band with few faint stars from
 * fitting large swings where it has no stars (the corners of a polynomial). */
static const double prior_w[4] = {1.0 / (0.15 * 0.15), 1.0 / (0.3 * 0.3), 1.0 / (0.1 * 0.1), 1.0 / (0.1 * 0.1)};

static double prior_chi2(const sp_moffat_field *m)
{
    double t = 0;
    for (int k = 0; k < 4; k++)
        for (int j = 1; j < m->nt[k]; j++) t += prior_w[k] * m->c[k][j] * m->c[k][j];
    return t;
}

static double total_chi2(const sp_moffat_field *m, fstar *st, int ns)
{
    double t = prior_chi2(m);
    for (int s = 0; s < ns; s++)
        if (st[s].used) t += st[s].chi2 = star_chi2(m, &st[s], st[s].x, st[s].y, st[s].F, &st[s].ndof);
    return t;
}

/* LM on the coefficients of m (its nt[]) and the used stars' (x, y, F). */
static int lm_fit(sp_moffat_field *m, fstar *st, int ns, int maxit)
{
    int off[5], ng = 0;
    for (int k = 0; k < 4; k++) {
        off[k] = ng;
        ng += m->nt[k];
    }
    off[4] = ng;
    double *Agl = malloc(sizeof(double) * (size_t)ns * ng * 3), *Mll = malloc(sizeof(double) * (size_t)ns * 9);
    double *xs = malloc(sizeof(double) * (size_t)ns * 6);
    if (!Agl || !Mll || !xs) {
        free(Agl);
        free(Mll);
        free(xs);
        return SP_FAIL(SP_ERR_NOMEM, "out of memory (band-wide Moffat fit)");
    }
    double Agg[MAXG * MAXG], gg[MAXG], S[MAXG * MAXG], rhs[MAXG];
    double lam = 1e-3, chi2 = total_chi2(m, st, ns);
    for (int it = 0; it < maxit; it++) {
        memset(Agg, 0, sizeof(double) * ng * ng);
        memset(gg, 0, sizeof(double) * ng);
        for (int s = 0; s < ns; s++) {
            if (!st[s].used) continue;
            fstar *f = &st[s];
            star_normal(m, f);
            double *A = Agl + (size_t)s * ng * 3;
            for (int k = 0; k < 4; k++)
                for (int t = 0; t < m->nt[k]; t++) {
                    int gi = off[k] + t;
                    gg[gi] += f->phi[t] * f->hv[k];
                    for (int l = 0; l < 3; l++) A[gi * 3 + l] = f->phi[t] * f->B[k][4 + l];
                    for (int k2 = 0; k2 < 4; k2++)
                        for (int t2 = 0; t2 < m->nt[k2]; t2++)
                            Agg[gi * ng + off[k2] + t2] += f->phi[t] * f->phi[t2] * f->B[k][k2];
                }
        }
        for (int k = 0; k < 4; k++)
            for (int t = 1; t < m->nt[k]; t++) {
                Agg[(off[k] + t) * ng + off[k] + t] += prior_w[k];
                gg[off[k] + t] -= prior_w[k] * m->c[k][t];
            }
        int accepted = 0, converged = 0;
        for (int tries = 0; tries < 12 && !accepted; tries++) {
            memcpy(S, Agg, sizeof(double) * ng * ng);
            for (int a = 0; a < ng; a++) S[a * ng + a] *= 1.0 + lam;
            memcpy(rhs, gg, sizeof(double) * ng);
            int ok = 1;
            for (int s = 0; s < ns && ok; s++) {
                if (!st[s].used) continue;
                fstar *f = &st[s];
                double All[3][3], M[3][3];
                for (int a = 0; a < 3; a++)
                    for (int b = 0; b < 3; b++) All[a][b] = f->B[4 + a][4 + b] * (a == b ? 1.0 + lam : 1.0);
                if (!inv3(All, M)) /* a star with no say on its own (x, y, F): held this step */
                    memset(M, 0, sizeof M);
                memcpy(Mll + (size_t)s * 9, M, sizeof M);
                const double *A = Agl + (size_t)s * ng * 3;
                /* S -= A M A^T, rhs -= A M g_l */
                double AM[MAXG][3];
                for (int a = 0; a < ng; a++)
                    for (int l = 0; l < 3; l++)
                        AM[a][l] = A[a * 3] * M[0][l] + A[a * 3 + 1] * M[1][l] + A[a * 3 + 2] * M[2][l];
                for (int a = 0; a < ng; a++) {
                    rhs[a] -= AM[a][0] * f->hv[4] + AM[a][1] * f->hv[5] + AM[a][2] * f->hv[6];
                    for (int b = 0; b < ng; b++)
                        S[a * ng + b] -= AM[a][0] * A[b * 3] + AM[a][1] * A[b * 3 + 1] + AM[a][2] * A[b * 3 + 2];
                }
            }
            if (!ok || !chol_solve(S, rhs, ng)) {
                lam *= 10;
                continue;
            }
            /* trial */
            sp_moffat_field mt = *m;
            for (int k = 0; k < 4; k++)
                for (int t = 0; t < m->nt[k]; t++) mt.c[k][t] += rhs[off[k] + t];
            double chi2t = prior_chi2(&mt);
            for (int s = 0; s < ns; s++) {
                if (!st[s].used) continue;
                fstar *f = &st[s];
                const double *A = Agl + (size_t)s * ng * 3, *M = Mll + (size_t)s * 9;
                double gl[3];
                for (int l = 0; l < 3; l++) {
                    double t = f->hv[4 + l];
                    for (int a = 0; a < ng; a++) t -= A[a * 3 + l] * rhs[a];
                    gl[l] = t;
                }
                double d[3];
                for (int l = 0; l < 3; l++) d[l] = M[l * 3] * gl[0] + M[l * 3 + 1] * gl[1] + M[l * 3 + 2] * gl[2];
                double x = f->x + d[0], y = f->y + d[1], F = f->F + d[2];
                if (fabs(x - f->x0) > 3.0) x = f->x0 + copysign(3.0, x - f->x0);
                if (fabs(y - f->y0) > 3.0) y = f->y0 + copysign(3.0, y - f->y0);
                if (!(F > 1e-6 * f->F0)) F = 1e-6 * f->F0;
                xs[s * 6 + 0] = x;
                xs[s * 6 + 1] = y;
                xs[s * 6 + 2] = F;
                chi2t += xs[s * 6 + 3] = star_chi2(&mt, f, x, y, F, &xs[s * 6 + 4]);
            }
            if (isfinite(chi2t) && chi2t <= chi2) {
                converged = chi2 - chi2t < 0.01 + 1e-9 * chi2; /* 0.01: a tenth of a sigma on any parameter */
                *m = mt;
                for (int s = 0; s < ns; s++) {
                    if (!st[s].used) continue;
                    st[s].x = xs[s * 6];
                    st[s].y = xs[s * 6 + 1];
                    st[s].F = xs[s * 6 + 2];
                    st[s].chi2 = xs[s * 6 + 3];
                    st[s].ndof = xs[s * 6 + 4];
                }
                chi2 = chi2t;
                lam = fmax(lam * 0.2, 1e-9);
                accepted = 1;
            } else {
                lam *= 10;
            }
        }
        if (!accepted || converged) break;
    }
    free(Agl);
    free(Mll);
    free(xs);
    return SP_OK;
}

/* The model's FWHM over a 9 x 9 grid of the area where it is used, against its
 * value at the reference point; also beta and e. 1: plausible. */
static int plausible(const sp_moffat_field *m, const sp_moffat_field_params *p)
{
    double f0, b0, q0, t0;
    sp_moffat_field_at(m, m->x_ref, m->y_ref, &f0, &b0, &q0, &t0);
    double rg = p->corner_fwhm_range > 1 ? p->corner_fwhm_range : 1.5;
    for (int j = 0; j < 9; j++)
        for (int i = 0; i < 9; i++) {
            double x = m->x_ref + m->scale * (i / 4.0 - 1.0), y = m->y_ref + m->scale * (j / 4.0 - 1.0);
            double u = (x - m->x_ref) / m->scale, v = (y - m->y_ref) / m->scale, phi[SP_MOFFAT_FIELD_MAXT], P[4];
            monos(4, u, v, phi);
            coef_params(m, phi, P);
            double e = hypot(P[2], P[3]), fw = exp(P[0]);
            if (!(fw < f0 * rg && fw > f0 / rg) || !(P[1] > LNB_MIN && P[1] < LNB_MAX) || !(e < 0.6)) return 0;
        }
    return 1;
}

static int cmp_snr(const void *a, const void *b)
{
    const double *x = a, *y = b; /* [-snr, index] */
    if (x[0] != y[0]) return (x[0] > y[0]) - (x[0] < y[0]);
    return (x[1] > y[1]) - (x[1] < y[1]);
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median_used(const fstar *st, int ns, double *buf, double (*val)(const fstar *))
{
    int n = 0;
    for (int s = 0; s < ns; s++)
        if (st[s].used) buf[n++] = val(&st[s]);
    if (n == 0) return NAN;
    qsort(buf, (size_t)n, sizeof *buf, cmp_d);
    return n % 2 ? buf[n / 2] : 0.5 * (buf[n / 2 - 1] + buf[n / 2]);
}

static double v_chi2dof(const fstar *s) { return s->chi2 / s->ndof; }

static void set_degree(sp_moffat_field *m, int d)
{
    int dd[4] = {d, d < 1 ? d : 1, d, d};
    for (int k = 0; k < 4; k++) {
        m->deg[k] = dd[k];
        m->nt[k] = nterms(dd[k]);
        for (int t = m->nt[k]; t < SP_MOFFAT_FIELD_MAXT; t++) m->c[k][t] = 0.0;
    }
}

int sp_moffat_field_fit(const sp_epsf_cutout *cuts, int ncuts, const sp_moffat_field_params *pin,
                        sp_moffat_field *out)
{
    int status = SP_OK;
    fstar *st = NULL, *sts[5] = {NULL, NULL, NULL, NULL, NULL};
    double *key = NULL, *buf = NULL;
    sp_moffat_field_params p;
    if (pin)
        p = *pin;
    else
        sp_moffat_field_params_default(&p);
    SP_CHECK(out && (ncuts == 0 || cuts) && ncuts >= 0, SP_ERR_INPUT, "sp_moffat_field_fit: bad arguments");
    SP_CHECK(p.scale > 0 && p.fwhm0 > 0 && p.beta0 > 1 && p.degree >= 0 && p.degree <= 4, SP_ERR_INPUT,
             "band-wide Moffat: bad parameters (scale %g, FWHM %g, beta %g, degree %d; degree 0..4)", p.scale,
             p.fwhm0, p.beta0, p.degree);
    memset(out, 0, sizeof *out);
    out->x_ref = p.x_ref;
    out->y_ref = p.y_ref;
    out->scale = p.scale;
    out->nstars_in = ncuts;
    /* stars by SNR, highest first (ties by input order), up to max_stars */
    SP_ALLOC(key, 2 * (size_t)(ncuts + 1));
    int nok = 0;
    for (int i = 0; i < ncuts; i++) {
        const sp_epsf_cutout *c = &cuts[i];
        if (!c->d || !c->w || c->n < 5 || !(c->flux > 0) || !isfinite(c->x) || !isfinite(c->y)) continue;
        key[2 * nok] = -(isfinite(c->snr) ? c->snr : 0.0);
        key[2 * nok + 1] = i;
        nok++;
    }
    qsort(key, (size_t)nok, 2 * sizeof *key, cmp_snr);
    int ns = p.max_stars > 0 && nok > p.max_stars ? p.max_stars : nok;
    SP_CHECK(ns >= 3, SP_ERR_INPUT, "band-wide Moffat: %d usable PSF star(s), at least 3 needed", ns);
    SP_ALLOC(st, ns);
    SP_ALLOC(buf, ns);
    int Rw = (int)ceil(fmax(3.0, 2.5 * p.fwhm0));
    for (int s = 0; s < ns; s++) {
        const sp_epsf_cutout *c = &cuts[(int)key[2 * s + 1]];
        fstar *f = &st[s];
        f->c = c;
        f->h = (c->n - 1) / 2;
        f->R = Rw < f->h ? Rw : f->h;
        monos(4, (c->x - p.x_ref) / p.scale, (c->y - p.y_ref) / p.scale, f->phi);
        f->x = f->x0 = c->x;
        f->y = f->y0 = c->y;
        f->F = f->F0 = c->flux;
        f->used = 1;
    }
    out->xmin = out->ymin = INFINITY;
    out->xmax = out->ymax = -INFINITY;
    for (int s = 0; s < ns; s++) {
        out->xmin = fmin(out->xmin, st[s].x0);
        out->xmax = fmax(out->xmax, st[s].x0);
        out->ymin = fmin(out->ymin, st[s].y0);
        out->ymax = fmax(out->ymax, st[s].y0);
    }
    /* degree: at most the one the stars can carry (min_stars_per_term x shape terms) */
    int dmax = p.degree;
    while (dmax > 0 && ns < p.min_stars_per_term * (3 * nterms(dmax) + nterms(dmax < 1 ? dmax : 1))) dmax--;
    /* degree 0 first (40 stars), then the full degree from there (new terms start at 0, held
     * near it by the priors where the stars say little); a model that is not
     * plausible over the field is refitted one degree lower */
    sp_moffat_field mods[5];
    set_degree(out, 0);
    out->c[0][0] = log(p.fwhm0);
    out->c[1][0] = log(p.beta0 - 1.0);
    out->c[2][0] = 1e-3; /* off e = 0, where the (q, theta) chain is singular */
    /* the constant model from the brightest 40 (it only starts the full fit) */
    for (int s = 40; s < ns; s++) st[s].used = 0;
    SP_TRY(lm_fit(out, st, ns, 60));
    for (int s = 40; s < ns; s++) st[s].used = 1;
    mods[0] = *out;
    SP_ALLOC(sts[0], ns);
    memcpy(sts[0], st, sizeof *st * (size_t)ns);
    int d = dmax;
    for (; d >= 0; d--) {
        *out = mods[0];
        memcpy(st, sts[0], sizeof *st * (size_t)ns);
        if (d > 0) {
            set_degree(out, d);
            SP_TRY(lm_fit(out, st, ns, 60));
        }
        mods[d] = *out;
        if (!sts[d]) SP_ALLOC(sts[d], ns);
        memcpy(sts[d], st, sizeof *st * (size_t)ns);
        if (plausible(out, &p)) break;
    }
    if (d < 0) {
        double f0, b0, q0, t0;
        sp_moffat_field_at(out, p.x_ref, p.y_ref, &f0, &b0, &q0, &t0);
        status = SP_FAIL(SP_ERR_NUMERIC, "band-wide Moffat: implausible even with one Moffat (FWHM %.3g, beta %.3g, q %.3g)",
                         f0, b0, q0);
    }
    if (status == SP_OK && p.clip_sigma > 0) {
        double med = median_used(st, ns, buf, v_chi2dof);
        int n = 0;
        for (int s = 0; s < ns; s++) buf[n++] = fabs(v_chi2dof(&st[s]) - med);
        qsort(buf, (size_t)n, sizeof *buf, cmp_d);
        double sig = 1.4826 * (n % 2 ? buf[n / 2] : 0.5 * (buf[n / 2 - 1] + buf[n / 2]));
        int nclip = 0, nused = 0;
        for (int s = 0; s < ns; s++) {
            double x2 = v_chi2dof(&st[s]);
            /* and the misfit is a real share of the star's own light (a bright
             * star's chi2 grows with the model's smallest imperfection) */
            double frac = sqrt(fmax(st[s].chi2 - st[s].ndof, 0.0) / fmax(st[s].s2, 1e-300));
            if (x2 > med + p.clip_sigma * sig && x2 > 1.2 * med && frac > MISFIT_FRAC) {
                st[s].used = 0;
                nclip++;
            } else
                nused++;
        }
        if (nclip > 0 && nused >= 3) {
            status = lm_fit(out, st, ns, 60);
            if (status == SP_OK && !plausible(out, &p)) {
                /* the clipped fit went astray: keep the unclipped one */
                *out = mods[d];
                memcpy(st, sts[d], sizeof *st * (size_t)ns);
            }
        } else if (nclip > 0)
            for (int s = 0; s < ns; s++) st[s].used = 1;
    }
    SP_TRY(status);
    out->nstars_used = 0;
    for (int s = 0; s < ns; s++) out->nstars_used += st[s].used;
    out->chi2dof = median_used(st, ns, buf, v_chi2dof);
    {
        double P0 = out->c[0][0], P1 = out->c[1][0];
        SP_CHECK(isfinite(P0) && isfinite(P1) && P0 > LNF_MIN + 1e-3 && P0 < LNF_MAX - 1e-3 && P1 > LNB_MIN + 1e-3 &&
                     P1 < LNB_MAX - 1e-3,
                 SP_ERR_NUMERIC, "band-wide Moffat ran to a bound (FWHM %.3g, beta %.3g)", exp(P0), 1 + exp(P1));
    }
cleanup:
    for (int k = 0; k < 5; k++) free(sts[k]);
    free(st);
    free(key);
    free(buf);
    return status;
}

void sp_moffat_field_at(const sp_moffat_field *m, double x, double y, double *fwhm, double *beta, double *q,
                        double *theta)
{
    double phi[SP_MOFFAT_FIELD_MAXT], P[4];
    monos(4, (x - m->x_ref) / m->scale, (y - m->y_ref) / m->scale, phi);
    coef_params(m, phi, P);
    shape sh;
    shape_of(P, &sh);
    *fwhm = sh.fwhm;
    *beta = sh.beta;
    *q = sh.q;
    *theta = 0.5 * atan2(P[3], P[2]);
}

int sp_moffat_field_render(const sp_moffat_field *m, double x, double y, sp_psf *out)
{
    double fw, be, q, th;
    sp_moffat_field_at(m, x, y, &fw, &be, &q, &th);
    return sp_psf_moffat_into(fw, be, q, th, out);
}

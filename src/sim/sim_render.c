/* sim_render.c — the true PSF and galaxy renderers.
 *
 * PSF: an elliptical Moffat core plus an optional circular Moffat wing, each
 * normalised analytically over the plane, multiplied by a C1 taper
 * w(r) = (1 - t^2)^2, t = (r - 0.7 R) / (0.3 R), that takes the profile to zero
 * at the radius R (a hard cut would leave a visible step around bright stars).
 * Pixels are integrated, not sampled: each cell gets a Gauss-Legendre rule
 * whose order follows the local curvature of the profile — 5x5 points in the
 * core, 3x3 on the shoulders, the midpoint in the far wing where the midpoint
 * rule's error |lap f| h^4 / 24 is below 1e-7 of the total flux per pixel.
 * A rendered stamp is then divided by its own sum, so a star's pixels add up
 * to its flux exactly. Measured against a 64x64-point midpoint brute force:
 * see tests/unit/test_sim.c and docs/simulator.md.
 *
 * Galaxies: the truncated Sersic profile is sampled on an os-times finer grid
 * (sub-sampled further near the centre, where DEV has its cusp), the PSF is
 * integrated over the same fine cells, both are normalised to unit sum,
 * convolved by FFT with zero padding (no wrap-around) and binned os x os, so
 * flux is conserved to FFT rounding (~1e-13).
 */
#include "sim_private.h"
#include "surveyproc/sp_error.h"

#include <fftw3.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* ---- PSF evaluation ------------------------------------------------------- */

typedef struct {
    int nc;
    double A[2], beta[2], mxx[2], mxy[2], myy[2], tr[2];
    int ibeta[2];  /* beta as a small integer (pow by multiplication), else 0 */
    const double *tv[2], *td[2]; /* tables of (1 + u^2)^-beta and its u-derivative, or NULL */
    int tn[2];
    double R, R2, r0, r02;
    int mode;      /* 0: whole PSF; 1: inner part P W(r); 2: outer part P (1 - W(r)) */
    double w1, w2; /* W = 1 inside w1, cos^2 down to 0 at w2 */
} peval;

double sim_moffat_alpha(double fwhm, double beta) { return fwhm / (2.0 * sqrt(pow(2.0, 1.0 / beta) - 1.0)); }

static void peval_init(const sp_sim_psf *p, peval *e)
{
    memset(e, 0, sizeof *e);
    double q = 1.0 - p->e;
    double al = sim_moffat_alpha(p->fwhm, p->beta);
    double aa = al / sqrt(q), ab = al * sqrt(q);
    double c = cos(p->theta), s = sin(p->theta);
    double ia = 1.0 / (aa * aa), ib = 1.0 / (ab * ab);
    double wf = p->wing_frac > 0 ? p->wing_frac : 0.0;
    e->mxx[0] = c * c * ia + s * s * ib;
    e->myy[0] = s * s * ia + c * c * ib;
    e->mxy[0] = c * s * (ia - ib);
    e->tr[0] = ia + ib;
    e->beta[0] = p->beta;
    e->A[0] = (1.0 - wf) * (p->beta - 1.0) / (M_PI * aa * ab);
    e->nc = 1;
    if (wf > 0) {
        double aw = sim_moffat_alpha(p->wing_fwhm, p->wing_beta);
        double iw = 1.0 / (aw * aw);
        e->mxx[1] = e->myy[1] = iw;
        e->mxy[1] = 0;
        e->tr[1] = 2 * iw;
        e->beta[1] = p->wing_beta;
        e->A[1] = wf * (p->wing_beta - 1.0) / (M_PI * aw * aw);
        e->nc = 2;
    }
    for (int k = 0; k < e->nc; k++)
        if (e->beta[k] == floor(e->beta[k]) && e->beta[k] <= 8) e->ibeta[k] = (int)e->beta[k];
    e->R = p->radius;
    e->R2 = p->radius * p->radius;
    e->r0 = 0.7 * p->radius;
    e->r02 = e->r0 * e->r0;
}

/* Rendering evaluates (1 + Q)^-beta thousands of times for one beta: a table
 * in u = sqrt(Q) (the profile is smooth and even in u) with cubic Hermite
 * interpolation from exact values and derivatives replaces exp(log1p()).
 * Interpolation error <= max|d4h/du4| du^4 / 384 ~ 4e-8 of the peak for
 * du = 0.02; beyond the table (u > 40), the exact expression. */
#define PT_DU 0.02
#define PT_MAX 2048
typedef struct {
    double v[2][PT_MAX], d[2][PT_MAX];
} ptable;

static void peval_table(peval *e, ptable *t)
{
    for (int k = 0; k < e->nc; k++) {
        if (e->ibeta[k]) continue;
        /* largest Q on the profile's disc: R^2 times M's largest eigenvalue */
        double mean = 0.5 * (e->mxx[k] + e->myy[k]), dif = 0.5 * (e->mxx[k] - e->myy[k]);
        double lmax = mean + sqrt(dif * dif + e->mxy[k] * e->mxy[k]);
        int n = (int)ceil(e->R * sqrt(lmax) / PT_DU) + 3;
        if (n > PT_MAX) n = PT_MAX;
        double b = e->beta[k];
        for (int i = 0; i < n; i++) {
            double u = i * PT_DU, q1 = 1.0 + u * u, v = exp(-b * log(q1));
            t->v[k][i] = v;
            t->d[k][i] = -2.0 * b * u * v / q1;
        }
        e->tv[k] = t->v[k];
        e->td[k] = t->d[k];
        e->tn[k] = n;
    }
}

/* (1 + Q)^-beta: the wing's default beta = 2 needs no transcendental. */
static inline double moffat_pow(const peval *e, int k, double Q)
{
    int n = e->ibeta[k];
    if (n) {
        double b = 1.0 / (1.0 + Q), r = b;
        for (int i = 1; i < n; i++) r *= b;
        return r;
    }
    if (e->tv[k]) {
        double x = sqrt(Q) * (1.0 / PT_DU);
        int i = (int)x;
        if (i < e->tn[k] - 1) {
            double t = x - i, t2 = t * t, t3 = t2 * t;
            return (2 * t3 - 3 * t2 + 1) * e->tv[k][i] + (t3 - 2 * t2 + t) * PT_DU * e->td[k][i] +
                   (-2 * t3 + 3 * t2) * e->tv[k][i + 1] + (t3 - t2) * PT_DU * e->td[k][i + 1];
        }
    }
    return exp(-e->beta[k] * log1p(Q));
}

/* Radial weight of the profile: the outer taper, times the inner/outer split. */
static inline double weight(const peval *e, double r2)
{
    if (r2 >= e->R2) return 0.0;
    double w = 1.0;
    if (r2 > e->r02) {
        double t = (sqrt(r2) - e->r0) / (e->R - e->r0), u = 1.0 - t * t;
        w = u * u;
    }
    if (e->mode) {
        double W = 1.0;
        if (r2 >= e->w2 * e->w2) W = 0.0;
        else if (r2 > e->w1 * e->w1) W = 0.5 * (1.0 + cos(M_PI * (sqrt(r2) - e->w1) / (e->w2 - e->w1)));
        w *= e->mode == 1 ? W : 1.0 - W;
    }
    return w;
}

static inline double peval_f(const peval *e, double x, double y)
{
    double r2 = x * x + y * y;
    double w = weight(e, r2);
    if (w == 0.0) return 0.0;
    double f = 0.0;
    for (int k = 0; k < e->nc; k++)
        f += e->A[k] * moffat_pow(e, k, e->mxx[k] * x * x + 2.0 * e->mxy[k] * x * y + e->myy[k] * y * y);
    return f * w;
}

/* Value, signed laplacian and a curvature scale (sum of |Hessian entries|)
 * summed over components (the
 * weights' own derivatives are left out: where they act the profile is ~1e-6
 * of its peak, or the caller uses Gauss-Legendre there). */
static inline double peval_f_lap(const peval *e, double x, double y, double *lap_abs, double *lap)
{
    double r2 = x * x + y * y, f = 0.0, L = 0.0, La = 0.0;
    double w = weight(e, r2);
    for (int k = 0; k < e->nc; k++) {
        double mx = e->mxx[k] * x + e->mxy[k] * y, my = e->mxy[k] * x + e->myy[k] * y;
        double Q = mx * x + my * y, b = e->beta[k];
        double g = e->A[k] * moffat_pow(e, k, Q), iq = 1.0 / (1.0 + Q);
        /* Hessian = c1 grad(Q) grad(Q)^T - c2 2M */
        double c2 = g * b * iq, c1 = c2 * (b + 1.0) * iq;
        double hxx = 4.0 * c1 * mx * mx - 2.0 * c2 * e->mxx[k], hyy = 4.0 * c1 * my * my - 2.0 * c2 * e->myy[k];
        double hxy = 4.0 * c1 * mx * my - 2.0 * c2 * e->mxy[k];
        f += g;
        L += hxx + hyy;
        /* a curvature scale that does not vanish where the laplacian changes sign */
        La += fabs(hxx) + fabs(hyy) + 2.0 * fabs(hxy);
    }
    *lap_abs = La;
    *lap = L * w;
    return f * w;
}

/* Gauss-Legendre nodes and weights on [-1/2, 1/2] (weights sum to 1). */
static const double gl3_t[3] = {-0.38729833462074170, 0.0, 0.38729833462074170};
static const double gl3_w[3] = {5.0 / 18.0, 8.0 / 18.0, 5.0 / 18.0};
static const double gl5_t[5] = {-0.45308992296933200, -0.26923465505284155, 0.0, 0.26923465505284155,
                                0.45308992296933200};
static const double gl5_w[5] = {0.11846344252809454, 0.23931433524968324, 0.28444444444444444,
                                0.23931433524968324, 0.11846344252809454};

/* Flux of the (unnormalised) profile in the square cell of side h centred at
 * (cx, cy) relative to the PSF centre. Where the profile is gentle on the
 * cell's scale: the midpoint rule corrected by its leading error term,
 * h^2 (f + h^2 lap f / 24), error O(h^4 d4f). In the core (midpoint error
 * above 1e-4 per unit area): Gauss-Legendre 5x5, error O(h^10 d10f). Where
 * the inner/outer split window bends across a whole pixel: Gauss-Legendre. */
static double cell_flux(const peval *e, double cx, double cy, double h)
{
    double hd = 0.70710678118654752 * h, r2 = cx * cx + cy * cy;
    double rout = (e->mode == 1 ? e->w2 : e->R) + hd;
    if (r2 >= rout * rout) return 0.0; /* the whole cell is outside the profile */
    if (e->mode == 2 && r2 <= (e->w1 - hd) * (e->w1 - hd) && e->w1 > hd) return 0.0;
    double la, lap, f0 = peval_f_lap(e, cx, cy, &la, &lap);
    int bend = 0;
    if (e->mode && h > 0.5) {
        double rr = sqrt(r2);
        bend = rr + hd > e->w1 && rr - hd < e->w2;
    }
    double crit = h * h * la / 24.0;
    if (!bend && crit < 3e-6) return h * h * (f0 + h * h / 24.0 * lap);
    const double *t = gl5_t, *w = gl5_w;
    int n = 5;
    if (crit < 1e-4) {
        t = gl3_t;
        w = gl3_w;
        n = 3;
    }
    double sum = 0.0;
    for (int j = 0; j < n; j++) {
        double y = cy + t[j] * h, rs = 0.0;
        for (int i = 0; i < n; i++) rs += w[i] * peval_f(e, cx + t[i] * h, y);
        sum += w[j] * rs;
    }
    return sum * h * h;
}

/* Cells (i, j) of side h centred at (x0 + i h, y0 + j h) relative to the PSF
 * centre, into out[ny*nx]. Returns the sum. */
static double render_grid(const peval *e, double x0, double y0, double h, int nx, int ny, double *out)
{
    double sum = 0.0;
    for (int j = 0; j < ny; j++) {
        double cy = y0 + j * h;
        double *row = out + (size_t)j * nx;
        if (fabs(cy) - 0.5 * h >= e->R) {
            memset(row, 0, sizeof(double) * (size_t)nx);
            continue;
        }
        for (int i = 0; i < nx; i++) {
            row[i] = cell_flux(e, x0 + i * h, cy, h);
            sum += row[i];
        }
    }
    return sum;
}

double sp_sim_psf_density(const sp_sim_psf *p, double dx, double dy)
{
    peval e;
    peval_init(p, &e);
    return peval_f(&e, dx, dy);
}

static int psf_check(const sp_sim_psf *p)
{
    if (!p || !(p->fwhm > 0.1) || !(p->beta > 1.0) || !(p->e >= 0 && p->e <= 0.9) || !(p->radius > 0) ||
        !isfinite(p->theta) || (p->wing_frac > 0 && (!(p->wing_fwhm > 0.1) || !(p->wing_beta > 1.0))) ||
        !(p->wing_frac >= 0 && p->wing_frac < 1))
        return SP_FAIL(SP_ERR_INPUT,
                       "simulator PSF: bad parameters (fwhm %g, beta %g, e %g, radius %g, wing %g/%g/%g)",
                       p ? p->fwhm : 0, p ? p->beta : 0, p ? p->e : 0, p ? p->radius : 0, p ? p->wing_frac : 0,
                       p ? p->wing_fwhm : 0, p ? p->wing_beta : 0);
    return SP_OK;
}

int sp_sim_render_psf(const sp_sim_psf *p, double dx, double dy, int size, int os, double *out)
{
    int status = SP_OK;
    double *box = NULL;
    ptable *tab = NULL;
    SP_TRY(psf_check(p));
    SP_CHECK(out && size >= 1 && os >= 1 && os <= 64 && isfinite(dx) && isfinite(dy), SP_ERR_INPUT,
             "sp_sim_render_psf: bad arguments (size %d, os %d)", size, os);
    peval e;
    peval_init(p, &e);
    SP_ALLOC(tab, 1);
    peval_table(&e, tab);
    double h = 1.0 / os, c = 0.5 * (size - 1);
    /* the cells the tapered profile touches, united with the stamp: the
     * normalisation needs all of them even when the stamp is smaller */
    long i0 = (long)floor(c + (dx - e.R) / h) - 1, i1 = (long)ceil(c + (dx + e.R) / h) + 1;
    long j0 = (long)floor(c + (dy - e.R) / h) - 1, j1 = (long)ceil(c + (dy + e.R) / h) + 1;
    if (i0 > 0) i0 = 0;
    if (j0 > 0) j0 = 0;
    if (i1 < size - 1) i1 = size - 1;
    if (j1 < size - 1) j1 = size - 1;
    long bw = i1 - i0 + 1, bh = j1 - j0 + 1;
    SP_ALLOC(box, bw * bh);
    double sum = render_grid(&e, (i0 - c) * h - dx, (j0 - c) * h - dy, h, (int)bw, (int)bh, box);
    SP_CHECK(sum > 0 && isfinite(sum), SP_ERR_NUMERIC, "sp_sim_render_psf: the profile integrates to %g", sum);
    for (int j = 0; j < size; j++)
        for (int i = 0; i < size; i++) out[(size_t)j * size + i] = box[(size_t)(j - j0) * bw + (i - i0)] / sum;
cleanup:
    free(box);
    free(tab);
    return status;
}

int sp_sim_render_epsf(const sp_sim_psf *p, int size, int os, double *out)
{
    int status = SP_OK;
    double *full = NULL;
    ptable *tab = NULL;
    SP_TRY(psf_check(p));
    SP_CHECK(out && size >= 1 && os >= 1 && os <= 64, SP_ERR_INPUT, "sp_sim_render_epsf: bad arguments");
    peval e;
    peval_init(p, &e);
    SP_ALLOC(tab, 1);
    peval_table(&e, tab);
    /* normalisation: the sum over whole pixels of a centred source */
    long hs = (long)ceil(e.R) + 1, n = 2 * hs + 1;
    SP_ALLOC(full, n * n);
    double sum = render_grid(&e, (double)-hs, (double)-hs, 1.0, (int)n, (int)n, full);
    SP_CHECK(sum > 0 && isfinite(sum), SP_ERR_NUMERIC, "sp_sim_render_epsf: the profile integrates to %g", sum);
    double c = 0.5 * (size - 1);
    for (int j = 0; j < size; j++)
        for (int i = 0; i < size; i++)
            out[(size_t)j * size + i] = cell_flux(&e, (i - c) / os, (j - c) / os, 1.0) / sum;
cleanup:
    free(full);
    free(tab);
    return status;
}

/* Normalised image-pixel stamp (2 hs + 1)^2 of a PSF centred at (dx, dy) from
 * the central pixel. */
static int psf_stamp(const sp_sim_psf *p, double dx, double dy, long hs, double *stamp)
{
    int status = SP_OK;
    ptable *tab = NULL;
    peval e;
    peval_init(p, &e);
    SP_ALLOC(tab, 1);
    peval_table(&e, tab);
    long n = 2 * hs + 1;
    double sum = render_grid(&e, (double)-hs - dx, (double)-hs - dy, 1.0, (int)n, (int)n, stamp);
    SP_CHECK(sum > 0 && isfinite(sum), SP_ERR_NUMERIC, "simulator PSF integrates to %g", sum);
    double inv = 1.0 / sum;
    for (long k = 0; k < n * n; k++) stamp[k] *= inv;
cleanup:
    free(tab);
    return status;
}

/* ---- galaxies ------------------------------------------------------------- */

#define B1 1.6783469900166610 /* Sersic b_n: half the light within Re */
#define B4 7.6692494425008039

static double soft_cut(double x, double x1, double x2)
{
    if (x <= x1) return 1.0;
    if (x >= x2) return 0.0;
    double t = (x - x1) / (x2 - x1), w = 1.0 - t * t;
    return w * w;
}

double sp_sim_galaxy_profile(sp_sim_type type, double x)
{
    if (x < 0) x = -x;
    switch (type) {
    case SP_SIM_EXP: return exp(-B1 * (x - 1.0)) * soft_cut(x, 3.0, 4.0);
    case SP_SIM_DEV: return exp(-B4 * (sqrt(sqrt(x)) - 1.0)) * soft_cut(x, 7.0, 8.0);
    default: return 0.0;
    }
}

double sp_sim_galaxy_rmax(sp_sim_type type) { return type == SP_SIM_DEV ? 8.0 : type == SP_SIM_EXP ? 4.0 : 0.0; }

long sp_sim_galaxy_halfsize(sp_sim_type type, double re, double psf_radius)
{
    return (long)ceil(sp_sim_galaxy_rmax(type) * re) + 2 + (long)ceil(psf_radius);
}

#define WS_NPLANS 32

typedef struct {
    int n;
    fftw_plan fwd, bwd;
} ws_plan;

struct sp_sim_ws {
    int nmax;
    double *a, *b;
    fftw_complex *A, *B;
    ws_plan plans[WS_NPLANS];
    int nplans, next;
};

/* FFTW's planner (plan creation and destruction) is not reentrant, and
 * fftw_make_planner_thread_safe() is a no-op in the OpenMP build we link
 * (libfftw3_omp: threads/openmp.c leaves the hooks empty). So install the
 * hooks ourselves: one process-wide mutex around every planner call, from
 * any module. Executing plans needs no lock. */
/* Exported by libfftw3 (api/apiplan.c, used by its threads library) but not
 * declared in fftw3.h. */
void fftw_set_planner_hooks(void (*before)(void), void (*after)(void));
static pthread_mutex_t planner_mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t planner_once = PTHREAD_ONCE_INIT;
static void planner_lock(void) { pthread_mutex_lock(&planner_mutex); }
static void planner_unlock(void) { pthread_mutex_unlock(&planner_mutex); }
static void planner_hooks(void) { fftw_set_planner_hooks(planner_lock, planner_unlock); }

int sp_sim_ws_create(sp_sim_ws **ws)
{
    int status = SP_OK;
    SP_CHECK(ws, SP_ERR_INTERNAL, "sp_sim_ws_create: NULL argument");
    pthread_once(&planner_once, planner_hooks);
    SP_ALLOC(*ws, 1);
cleanup:
    return status;
}

void sp_sim_ws_free(sp_sim_ws **ws)
{
    if (!ws || !*ws) return;
    sp_sim_ws *w = *ws;
    for (int i = 0; i < w->nplans; i++) {
        fftw_destroy_plan(w->plans[i].fwd);
        fftw_destroy_plan(w->plans[i].bwd);
    }
    fftw_free(w->a);
    fftw_free(w->b);
    fftw_free(w->A);
    fftw_free(w->B);
    free(w);
    *ws = NULL;
}

/* Smallest n >= m with only factors 2, 3, 5, 7 (fast FFT sizes), even. */
static int good_size(int m)
{
    /* multiples of 8 (of 2 below 64): fewer distinct sizes, so the plan cache hits */
    int step = m > 64 ? 8 : 2;
    for (int n = (m + step - 1) / step * step;; n += step) {
        int r = n;
        while (r % 2 == 0) r /= 2;
        while (r % 3 == 0) r /= 3;
        while (r % 5 == 0) r /= 5;
        while (r % 7 == 0) r /= 7;
        if (r == 1) return n;
    }
}

static int ws_plan_for(sp_sim_ws *w, int n, ws_plan **out)
{
    int status = SP_OK;
    for (int i = 0; i < w->nplans; i++)
        if (w->plans[i].n == n) {
            *out = &w->plans[i];
            return SP_OK;
        }
    if (n > w->nmax) {
        /* grow the buffers; existing plans stay valid for the new arrays
         * (new-array execute needs only the same alignment, which fftw_malloc
         * guarantees) */
        fftw_free(w->a);
        fftw_free(w->b);
        fftw_free(w->A);
        fftw_free(w->B);
        size_t nr = (size_t)n * n, nc = (size_t)n * (n / 2 + 1);
        w->a = fftw_malloc(sizeof(double) * nr);
        w->b = fftw_malloc(sizeof(double) * nr);
        w->A = fftw_malloc(sizeof(fftw_complex) * nc);
        w->B = fftw_malloc(sizeof(fftw_complex) * nc);
        w->nmax = n;
        if (!w->a || !w->b || !w->A || !w->B) {
            w->nmax = 0;
            return SP_FAIL(SP_ERR_NOMEM, "out of memory for a %d x %d galaxy FFT", n, n);
        }
    }
    ws_plan *pl;
    if (w->nplans < WS_NPLANS) {
        pl = &w->plans[w->nplans++];
    } else {
        pl = &w->plans[w->next];
        w->next = (w->next + 1) % WS_NPLANS;
        fftw_destroy_plan(pl->fwd);
        fftw_destroy_plan(pl->bwd);
    }
    pl->n = n;
    pl->fwd = fftw_plan_dft_r2c_2d(n, n, w->a, w->A, FFTW_ESTIMATE);
    pl->bwd = fftw_plan_dft_c2r_2d(n, n, w->A, w->a, FFTW_ESTIMATE);
    SP_CHECK(pl->fwd && pl->bwd, SP_ERR_INTERNAL, "FFTW could not plan a %d x %d transform", n, n);
    *out = pl;
cleanup:
    return status;
}

/* Galaxy light in one fine cell (side h, centre (u, v) relative to the galaxy
 * centre), sub-sampled where the profile curves on the cell's scale. */
static double gal_cell(sp_sim_type type, double re, double cth, double sth, double iq, double u, double v, double h)
{
    double xr = cth * u + sth * v, yr = (-sth * u + cth * v) * iq;
    double x2 = (xr * xr + yr * yr) / (re * re), xm = sp_sim_galaxy_rmax(type) + 0.75 * h / re;
    if (x2 > xm * xm) return 0.0; /* the whole cell lies beyond the truncation */
    double x = sqrt(x2);
    int ns = 1;
    if (x < 3.0 && h > 0.02 * re) ns = x < 1.0 ? 5 : 3;
    if (type == SP_SIM_DEV && x < 0.25) ns = 11; /* the r^1/4 cusp */
    if (ns == 1) return sp_sim_galaxy_profile(type, x);
    double sum = 0.0;
    for (int j = 0; j < ns; j++) {
        double vv = v + ((j + 0.5) / ns - 0.5) * h;
        for (int i = 0; i < ns; i++) {
            double uu = u + ((i + 0.5) / ns - 0.5) * h;
            double a = cth * uu + sth * vv, b = (-sth * uu + cth * vv) * iq;
            sum += sp_sim_galaxy_profile(type, sqrt(a * a + b * b) / re);
        }
    }
    return sum / (ns * ns);
}

/* The fine cell centred on the galaxy holds the profile's cusp (DEV's r^1/4
 * has an infinite slope there): split it 3x3 again and again, the middle
 * sub-cell recursively, so its light is right to ~1e-6. */
static double gal_center_cell(sp_sim_type type, double re, double cth, double sth, double iq, double h, int depth)
{
    double sum = 0.0, hs = h / 3.0;
    for (int j = -1; j <= 1; j++)
        for (int i = -1; i <= 1; i++) {
            if (i == 0 && j == 0 && depth > 0) sum += gal_center_cell(type, re, cth, sth, iq, hs, depth - 1);
            else sum += gal_cell(type, re, cth, sth, iq, i * hs, j * hs, hs);
        }
    return sum / 9.0;
}

/* Linear convolution of two real grids by FFT, zero-padded in ws: the first
 * grid is already in ws->a (n x n, row stride n), the second in ws->b. The
 * result (scaled by `scale`) replaces ws->a. */
static int fft_convolve(sp_sim_ws *ws, int n, double scale)
{
    int status = SP_OK;
    ws_plan *pl = NULL;
    SP_TRY(ws_plan_for(ws, n, &pl));
    fftw_execute_dft_r2c(pl->fwd, ws->a, ws->A);
    fftw_execute_dft_r2c(pl->fwd, ws->b, ws->B);
    size_t nc = (size_t)n * (n / 2 + 1);
    scale /= (double)n * (double)n;
    for (size_t k = 0; k < nc; k++) {
        double re1 = ws->A[k][0], im1 = ws->A[k][1], re2 = ws->B[k][0], im2 = ws->B[k][1];
        ws->A[k][0] = (re1 * re2 - im1 * im2) * scale;
        ws->A[k][1] = (re1 * im2 + im1 * re2) * scale;
    }
    fftw_execute_dft_c2r(pl->bwd, ws->A, ws->a);
cleanup:
    return status;
}

/* Make sure ws->a and ws->b hold at least n x n doubles, zeroed. */
static int ws_zero(sp_sim_ws *ws, int n)
{
    ws_plan *pl = NULL;
    int status = ws_plan_for(ws, n, &pl);
    if (status) return status;
    memset(ws->a, 0, sizeof(double) * (size_t)n * n);
    memset(ws->b, 0, sizeof(double) * (size_t)n * n);
    return SP_OK;
}

int sp_sim_render_galaxy(const sp_sim_psf *p, sp_sim_type type, double re, double q, double theta, double dx,
                         double dy, int size, int os, double *out, sp_sim_ws *ws)
{
    return sim_render_galaxy_split(p, type, re, q, theta, dx, dy, size, os, out, ws, 1);
}

int sim_render_galaxy_split(const sp_sim_psf *p, sp_sim_type type, double re, double q, double theta, double dx,
                            double dy, int size, int os, double *out, sp_sim_ws *ws, int allow_split)
{
    int status = SP_OK;
    double *gc = NULL, *pc = NULL;
    ptable *tab = NULL;
    SP_TRY(psf_check(p));
    SP_CHECK(type == SP_SIM_EXP || type == SP_SIM_DEV, SP_ERR_INPUT, "sp_sim_render_galaxy: type %d is not EXP/DEV",
             (int)type);
    SP_CHECK(re > 0 && re < 1000 && q > 0.01 && q <= 1.0 && isfinite(theta) && out && ws && os >= 3 && os % 2 == 1 &&
                 size >= 1 && size % 2 == 1 && fabs(dx) <= 1 && fabs(dy) <= 1,
             SP_ERR_INPUT, "sp_sim_render_galaxy: bad arguments (Re %g, q %g, os %d, size %d, offset %g,%g)", re, q,
             os, size, dx, dy);
    /* The PSF is split smoothly at w1..w2 into an inner part, convolved on
     * the fine grid, and a smooth outer part (the wing), convolved at pixel
     * resolution with the galaxy binned to pixels: the fine FFT then spans
     * the galaxy plus ~10 pixels instead of the whole PSF radius. The
     * galaxy sits on the centre of a fine cell (and so of a pixel) and the
     * PSF carries the sub-pixel offset: a PSF integrates exactly over
     * shifted cells, and a point-symmetric galaxy centred on a pixel makes
     * the pixel-resolution part's first-order error cancel. */
    peval ein, eout;
    peval_init(p, &ein);
    SP_ALLOC(tab, 1);
    peval_table(&ein, tab);
    eout = ein;
    double w1 = fmax(SIM_SPLIT_MIN, SIM_SPLIT_FWHM * p->fwhm), w2 = w1 + SIM_SPLIT_WIDTH;
    int split = allow_split && w2 < p->radius - 1.0;
    if (split) {
        ein.mode = 1;
        eout.mode = 2;
        ein.w1 = eout.w1 = w1;
        ein.w2 = eout.w2 = w2;
    }
    long ext = (long)ceil(sp_sim_galaxy_rmax(type) * re) + 1, rp = (long)ceil(p->radius) + 1;
    long rin = split ? (long)ceil(w2) + 1 : rp;
    int ng = (int)(os * (2 * ext + 1)), np = (int)(os * (2 * rin + 1)), nfull = ng + np - 1;
    int n = good_size(nfull);
    SP_CHECK(n <= 8192, SP_ERR_INPUT, "sp_sim_render_galaxy: Re %g needs a %d^2 FFT (too large)", re, n);
    SP_TRY(ws_zero(ws, n));
    double *a = ws->a, *b = ws->b;
    double h = 1.0 / os, cg = 0.5 * (ng - 1), cp = 0.5 * (np - 1);
    double cth = cos(theta), sth = sin(theta), iq = 1.0 / q, gs = 0.0;
    long gw = 2 * ext + 1, pw = 2 * rp + 1;
    SP_ALLOC(gc, gw * gw);
    for (int j = 0; j < ng; j++) {
        double v = (j - cg) * h;
        for (int i = 0; i < ng; i++) {
            double val = (i == (int)cg && j == (int)cg) ? gal_center_cell(type, re, cth, sth, iq, h, 6)
                                                         : gal_cell(type, re, cth, sth, iq, (i - cg) * h, v, h);
            a[(size_t)j * n + i] = val;
            gc[(j / os) * gw + i / os] += val; /* the galaxy binned to pixels */
            gs += val;
        }
    }
    SP_CHECK(gs > 0 && isfinite(gs), SP_ERR_NUMERIC, "galaxy profile sums to %g", gs);
    double ps = 0.0;
    for (int j = 0; j < np; j++) {
        double cy = (j - cp) * h - dy;
        for (int i = 0; i < np; i++) {
            double val = cell_flux(&ein, (i - cp) * h - dx, cy, h);
            b[(size_t)j * n + i] = val;
            ps += val;
        }
    }
    if (split) {
        SP_ALLOC(pc, pw * pw);
        for (long j = 0; j < pw; j++)
            for (long i = 0; i < pw; i++) {
                pc[j * pw + i] = cell_flux(&eout, (double)(i - rp) - dx, (double)(j - rp) - dy, 1.0);
                ps += pc[j * pw + i];
            }
    }
    SP_CHECK(ps > 0 && isfinite(ps), SP_ERR_NUMERIC, "PSF sums to %g", ps);
    SP_TRY(fft_convolve(ws, n, 1.0 / (gs * ps)));
    /* bin the fine convolution: fine index m sits at offset (m - cg - cp) h */
    long c = (size - 1) / 2, half = (os - 1) / 2, base = (long)(cg + cp);
    for (int j = 0; j < size; j++) {
        for (int i = 0; i < size; i++) {
            long mx0 = base + (i - c) * os - half, my0 = base + (j - c) * os - half;
            double sum = 0.0;
            for (long my = my0; my < my0 + os; my++) {
                if (my < 0 || my >= nfull) continue;
                for (long mx = mx0; mx < mx0 + os; mx++)
                    if (mx >= 0 && mx < nfull) sum += a[(size_t)my * n + mx];
            }
            out[(size_t)j * size + i] = sum;
        }
    }
    if (split) {
        /* pixel-resolution part: galaxy pixels (centred on the stamp centre)
         * with the outer PSF (pixel-integrated at the sub-pixel offset) */
        int nfc = (int)(gw + pw - 1), n2 = good_size(nfc);
        SP_TRY(ws_zero(ws, n2));
        for (long j = 0; j < gw; j++)
            for (long i = 0; i < gw; i++) ws->a[(size_t)j * n2 + i] = gc[j * gw + i];
        for (long j = 0; j < pw; j++)
            for (long i = 0; i < pw; i++) ws->b[(size_t)j * n2 + i] = pc[j * pw + i];
        SP_TRY(fft_convolve(ws, n2, 1.0 / (gs * ps)));
        /* index m sits at pixel offset m - ext - rp */
        for (int j = 0; j < size; j++) {
            long my = j - c + ext + rp;
            if (my < 0 || my >= nfc) continue;
            for (int i = 0; i < size; i++) {
                long mx = i - c + ext + rp;
                if (mx >= 0 && mx < nfc) out[(size_t)j * size + i] += ws->a[(size_t)my * n2 + mx];
            }
        }
    }
cleanup:
    free(gc);
    free(pc);
    free(tab);
    return status;
}

/* ---- one source of the tile ----------------------------------------------- */

long sim_source_halfsize(const sp_sim *s, const sp_sim_source *src)
{
    if (src->type == SP_SIM_STAR) return (long)ceil(s->cfg.psf_radius) + 1;
    return sp_sim_galaxy_halfsize(src->type, src->re, s->cfg.psf_radius);
}

int sim_render_source(const sp_sim *s, const sp_sim_source *src, int band, long *ix, long *iy, long *h,
                      double *stamp, sp_sim_ws *ws)
{
    sp_sim_psf p;
    sp_sim_psf_params(s, band, src->x, src->y, &p);
    *ix = lround(src->x);
    *iy = lround(src->y);
    *h = sim_source_halfsize(s, src);
    double dx = src->x - (double)*ix, dy = src->y - (double)*iy;
    if (src->type == SP_SIM_STAR) return psf_stamp(&p, dx, dy, *h, stamp);
    return sp_sim_render_galaxy(&p, src->type, src->re, src->q, src->theta, dx, dy, (int)(2 * *h + 1),
                                s->cfg.oversample, stamp, ws);
}

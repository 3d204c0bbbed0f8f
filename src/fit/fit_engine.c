/* fit_engine.c — the patch fitter: workspace, model boxes and groups, the
 * variable-projection Levenberg-Marquardt fit per group, staged fitting, sky,
 * errors and outputs. The method is described in sp_fit.h and
 * docs/fitting.md; this file is the bookkeeping.
 *
 * Data flow per patch (per band in single-band mode):
 *   per image: dp = data - sky - fixed sources, w = ivar (0 where data or ivar
 *   is not finite), mf = current model of the fitted sources (only kept when
 *   needed: split groups, sky fitting, outputs).
 *   per source and image: a model box (fixed for the patch) sized from the
 *   source's brightness: it reaches where flux * profile falls below
 *   box_nsigma x the pixel sigma, so boxes hold all the information and
 *   neighbours whose boxes do not touch are independent problems.
 *   components: connected components of touching boxes among fitted
 *   sources. An independent component (the usual case) runs the whole
 *   pipeline at once (fast_group): stage 1 also renders the position
 *   derivatives that stage 2 starts from, and the errors come from the last
 *   accepted evaluation. A component larger than max_group is cut into
 *   chunks by merging its most strongly coupled pairs first (blends stay
 *   together); chunks take LM steps in turn against the others' current
 *   models (block Gauss-Seidel, up to 8 sweeps, with a joint flux solve of
 *   the whole component between sweeps), and its flux errors are the joint
 *   linear ones plus each chunk's geometry increment. With fit_sky the sky
 *   alternates with joint flux solves.
 *   per group and stage: LM on the free geometry with the fluxes profiled
 *   out; inner products are accumulated over box overlaps only.
 */
#include "fit_internal.h"
#include "fit_acc.h"

#include "surveyproc/sp_error.h"
#include "surveyproc/sp_prof.h"

#include <cblas.h>
#include <lapacke.h>
#include <malloc.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define NCACHE 16
#define NOTCONV (1u << 31) /* internal flag: some stage of the group did not converge */

/* ---------------------------------------------------------------- types */

typedef struct {
    int idx;
    sp_src_type type;
    sp_src_role role;
    int ng;             /* geometry parameters used: 2 (star), 5 (EXP/DEV), 6 (SERSIC) */
    int ngc;            /* derivative planes per model-cache slot (the largest ng it may take) */
    int autot;          /* type_auto: 1 fitted as a point source, galaxy models (`gal`, untyped_alt)
                         * tried after; 2 fitted as `gal`, the untyped_alt models tried after */
    int retyped;        /* the trials changed its galaxy model (its chunk's geometry is refitted) */
    int profset;        /* sp_fit_options.gal_profiles */
    sp_src_type gal;
    fit_geom g, gt;     /* current and trial geometry */
    double p0[P_MAX];   /* initial */
    double lo[P_MAX], hi[P_MAX];
    unsigned hold;      /* parameters held for the whole fit */
    unsigned freemask;  /* free in the current stage */
    int group, chunk;   /* component and chunk indices */
    double R;           /* half-size of the model box in scene px */
    double snr;         /* combined flux SNR after stage 1 */
    unsigned flags;
    int iters[3];
    double perr[P_MAX];
    int nodata;         /* no valid pixel in any band of this run */
} wsrc;

typedef struct {
    const sp_fit_image *img;
    int slot;           /* band slot in this run */
    size_t off;         /* offset of its pixels in the per-pixel arrays */
    psf_cache_entry *pc;
    double sigma;       /* typical pixel sigma: 1/sqrt(median positive ivar) */
    double scale;       /* image px per scene px */
} wimg;

typedef struct {
    int start, n;       /* members: ws->gmem[start .. start+n) (indices into ws->s) */
    double dlnp;        /* ln p gained by the last nonlinear stage fit */
    int split;          /* part of a larger component */
    int pstart, npair;  /* overlapping pairs (local indices) in ws->pairs */
    unsigned flags;
    int iters[3];
    /* block Gauss-Seidel bookkeeping of split chunks (visit stamps) */
    int it_cap;         /* LM steps allowed in this visit (0: n_opt_iters) */
    int capped;         /* the last visit stopped at it_cap, unconverged */
    long visit[2];      /* stamp of the last visit per nonlinear stage */
    int conv[2];        /* that visit converged */
    long moved;         /* stamp of the last visit that accepted a step */
} wgroup;

typedef struct {
    double p[P_MAX];
    long used;     /* 0: empty */
    unsigned mask; /* derivative planes held (bit j: d/dp[j], plane 1 + j) */
} mc_key;

/* Accumulated inner products of one group evaluation. */
typedef struct {
    int n, nth, nb;
    double *D, *L, *y, *c, *B, *A, *z, *cz, *f;
    unsigned char *nod; /* nb x n: no valid pixel */
    double chi2;        /* chi2 up to a constant: -sum y.f */
    int singular, nonfinite;
    size_t cap;
    double *mem;
} gacc;

struct sp_fit_workspace {
    int nb_hint;
    /* per-pixel arrays (sum over images) */
    double *dp, *w, *mf, *mx, *vb; /* vb: background variance (images with poisson_k > 0) */
    size_t cap_pix;
    /* per source */
    wsrc *s;
    size_t cap_s;
    fit_box *box; /* nsrc x nimg */
    size_t cap_box;
    double *flux, *ferr, *ferrc, *snr_acc; /* nsrc x nb */
    size_t cap_flux;
    unsigned char *bflag;
    size_t cap_bflag;
    /* images */
    wimg *im;
    size_t cap_im;
    /* groups */
    wgroup *gr;
    size_t cap_gr;
    int *adjo, *adj; /* chunk adjacency (CSR) */
    const double **mptr; /* per group member: its packed model + planes (cache or arena) */
    size_t cap_mptr;
    size_t cap_adjo, cap_adj;
    int *gmem, *uf, *tmpi;
    size_t cap_gmem, cap_uf, cap_tmpi;
    int *pairs;
    size_t cap_pairs;
    /* per-group theta bookkeeping */
    int *th_src, *th_par, *th_off, *nf;
    size_t cap_th, cap_nf, cap_thsrc, cap_thpar;
    /* render arena */
    double *arena;
    size_t cap_arena;
    size_t *aoff;
    size_t cap_aoff;
    /* linear algebra scratch */
    double *la;
    size_t cap_la;
    gacc acc[2];
    /* final-model arena: own model per source and image */
    double *fin;
    size_t cap_fin;
    size_t *fin_off;
    size_t cap_fin_off;
    /* misc scratch */
    double *tmp, *vlin;
    size_t cap_tmp, cap_vlin;
    double *skyuv; /* joint sky solve: D^-1 y and D^-1 c per source and band */
    size_t cap_skyuv;
    unsigned *tmpu;
    size_t cap_tmpu;
    double *mixscr;
    size_t cap_mixscr;
    /* single-band mode: per band geometry results */
    double *bgeo; /* nsrc x nbands x 10 */
    size_t cap_bgeo;
    /* PSF cache */
    psf_cache_entry cache[NCACHE];
    long use_counter;
    fit_fft_scratch fft;
    long renders;
    /* model cache: per (source, image) two slots holding the unit-flux model
     * at a geometry and the derivative planes rendered with it (1 + ng planes
     * of the box), so that adding/subtracting a group's model, linear solves,
     * the start of a stage, the errors and the final model do not re-render */
    double *mc;
    size_t cap_mc;
    size_t *mc_off;       /* nsrc*nimg: offset of slot 0 (slot 1 follows) */
    size_t cap_mc_off;
    mc_key *mck;          /* nsrc*nimg*2 */
    size_t cap_mck;
    long mc_tick, mc_hits;
};

/* ---------------------------------------------------------------- helpers */

static int grow_(void **p, size_t *cap, size_t n, size_t el)
{
    if (n <= *cap && *p) return 0;
    size_t nc = n + n / 2 + 16;
    void *q = realloc(*p, nc * el);
    if (!q) return -1;
    *p = q;
    *cap = nc;
    return 0;
}
#define GROW(ptr, capv, n)                                                                          \
    do {                                                                                            \
        if (grow_((void **)&(ptr), &(capv), (size_t)(n), sizeof(*(ptr))) != 0) {                   \
            status = SP_FAIL(SP_ERR_NOMEM, "fit workspace: out of memory (%zu x %zu bytes)",       \
                             (size_t)(n), sizeof(*(ptr)));                                          \
            goto cleanup;                                                                           \
        }                                                                                           \
    } while (0)

static double clampd(double v, double lo, double hi) { return v < lo ? lo : (v > hi ? hi : v); }

/* quickselect: k-th smallest of a[0..n) (a is reordered) */
static double kth(double *a, int n, int k)
{
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        double piv = a[(lo + hi) / 2];
        int i = lo, j = hi;
        while (i <= j) {
            while (a[i] < piv) i++;
            while (a[j] > piv) j--;
            if (i <= j) {
                double t = a[i];
                a[i] = a[j];
                a[j] = t;
                i++;
                j--;
            }
        }
        if (k <= j) hi = j;
        else if (k >= i) lo = i;
        else break;
    }
    return a[k];
}

/* Cholesky factor L (lower, column-major == row-major for symmetric input)
 * of the n x n SPD matrix src. Rows with a zero or non-finite diagonal (no
 * data) become identity rows. If the matrix is singular or nearly so (a pivot^2
 * below 1e-11 x its diagonal), a growing ridge is added and *singular set.
 * Returns 0, or -1 if even the largest ridge failed (L is then diagonal). */
static int factor_spd(int n, const double *src, double *L, int *singular)
{
    double mean = 0.0;
    for (int i = 0; i < n; i++) {
        double d = src[(size_t)i * n + i];
        if (d > 0.0 && isfinite(d)) mean += d;
    }
    mean = mean > 0.0 ? mean / n : 1.0;
    static const double ridge[5] = {0.0, 1e-10, 1e-7, 1e-4, 1e-1};
    for (int t = 0; t < 5; t++) {
        memcpy(L, src, sizeof(double) * (size_t)n * n);
        for (int i = 0; i < n; i++) {
            double d = L[(size_t)i * n + i];
            if (!(d > 0.0) || !isfinite(d)) {
                for (int j = 0; j < n; j++) L[(size_t)i * n + j] = L[(size_t)j * n + i] = 0.0;
                L[(size_t)i * n + i] = 1.0;
            }
            L[(size_t)i * n + i] += ridge[t] * mean;
        }
        int ok;
        if (n == 1) {
            L[0] = sqrt(L[0]);
            ok = 1;
        } else {
            ok = LAPACKE_dpotrf_work(LAPACK_COL_MAJOR, 'L', n, L, n) == 0;
        }
        for (int i = 0; i < n && ok; i++) {
            double d = src[(size_t)i * n + i];
            double l = L[(size_t)i * n + i];
            if (!(l * l >= 1e-11 * (d > 0.0 && isfinite(d) ? d : 1.0)) || !isfinite(l)) ok = 0;
        }
        if (ok) {
            if (t > 0) *singular = 1;
            return 0;
        }
    }
    *singular = 1;
    memset(L, 0, sizeof(double) * (size_t)n * n);
    for (int i = 0; i < n; i++) {
        double d = src[(size_t)i * n + i];
        L[(size_t)i * n + i] = d > 0.0 && isfinite(d) ? sqrt(d) : 1.0;
    }
    return -1;
}

/* Solve L L^T X = B for nrhs columns (column-major, ld n). */
static void chol_solve(int n, const double *L, int nrhs, double *B)
{
    if (n == 1) {
        for (int j = 0; j < nrhs; j++) B[j] /= L[0] * L[0];
        return;
    }
    (void)LAPACKE_dpotrs_work(LAPACK_COL_MAJOR, 'L', n, nrhs, L, n, B, n);
}

/* Inverse from a Cholesky factor, in place, full symmetric matrix. */
static void chol_inverse(int n, double *L)
{
    if (n == 1) {
        L[0] = 1.0 / (L[0] * L[0]);
        return;
    }
    (void)LAPACKE_dpotri_work(LAPACK_COL_MAJOR, 'L', n, L, n);
    for (int j = 0; j < n; j++)
        for (int k = j + 1; k < n; k++) L[(size_t)k * n + j] = L[(size_t)j * n + k]; /* col-major lower -> full */
}

/* ---------------------------------------------------------------- public small API */

void sp_fit_options_default(sp_fit_options *o)
{
    memset(o, 0, sizeof *o);
    o->staged = 1;
    o->n_opt_iters = 30;
    o->dlnp_stop = 1e-2;
    o->multiband = 1;
    o->fit_sky = 0;
    o->fit_positions = 1;
    o->fit_shapes = 1;
    o->fit_sersic_n = 1;
    o->max_shift = 3.0;
    o->max_step = 1.0;
    o->pos_prior_sigma = 0.0;
    o->re_min = 0.1;
    o->re_max = 50.0;
    o->q_min = 0.05;
    o->n_min = 0.5;
    o->n_max = 6.0;
    o->min_snr_geom = 3.0;
    o->min_snr_shape = 10.0;
    o->box_nsigma = 0.1;
    o->box_max_half = 48;
    o->conv = SP_FIT_CONV_GMIX;
    o->psf_gmix_k = 4;
    o->max_group = 100;
    o->gs_iter_cap = 3;
    o->gs_skip_static = 0;
    o->lm_osc_damp = 0;
    o->sky_joint = 1;
}

void sp_fit_image_aligned(sp_fit_image *img, int x0, int y0, int nx, int ny)
{
    memset(img, 0, sizeof *img);
    img->nx = nx;
    img->ny = ny;
    img->x0 = x0;
    img->y0 = y0;
    img->aff[0] = 1.0;
    img->aff[2] = -(double)x0;
    img->aff[4] = 1.0;
    img->aff[5] = -(double)y0;
    img->flux_scale = 1.0;
}

const char *sp_src_type_name(sp_src_type t)
{
    switch (t) {
    case SP_SRC_STAR: return "STAR";
    case SP_SRC_EXP: return "EXP";
    case SP_SRC_DEV: return "DEV";
    case SP_SRC_SERSIC: return "SERSIC";
    }
    return "?";
}

int sp_src_type_parse(const char *name, sp_src_type fallback)
{
    if (!name || !*name || !strcasecmp(name, "GAL")) return (int)fallback;
    if (!strcasecmp(name, "STAR") || !strcasecmp(name, "PSF") || !strcasecmp(name, "POINT")) return SP_SRC_STAR;
    if (!strcasecmp(name, "EXP")) return SP_SRC_EXP;
    if (!strcasecmp(name, "DEV")) return SP_SRC_DEV;
    if (!strcasecmp(name, "SERSIC") || !strcasecmp(name, "SER")) return SP_SRC_SERSIC;
    return -1;
}

int sp_fit_workspace_create(size_t max_pixels, int max_sources, int nbands, sp_fit_workspace **ws)
{
    int status = SP_OK;
    sp_fit_workspace *w = NULL;
    SP_CHECK(ws != NULL, SP_ERR_INTERNAL, "sp_fit_workspace_create: NULL output");
    *ws = NULL;
    SP_CHECK(nbands >= 1 && nbands <= SP_FIT_MAX_BANDS, SP_ERR_INPUT, "fit: %d bands (allowed 1..%d)", nbands,
             SP_FIT_MAX_BANDS);
    if (!omp_in_parallel()) SP_TRY(sp_fit_init());
    openblas_set_num_threads(1);
    SP_ALLOC(w, 1);
    w->nb_hint = nbands;
    if (max_pixels > 0) {
        GROW(w->dp, w->cap_pix, max_pixels);
        size_t c = 0;
        GROW(w->w, c, max_pixels);
        c = 0;
        GROW(w->mf, c, max_pixels);
        c = 0;
        GROW(w->mx, c, max_pixels);
        c = 0;
        GROW(w->vb, c, max_pixels);
    }
    if (max_sources > 0) {
        GROW(w->s, w->cap_s, max_sources);
        GROW(w->flux, w->cap_flux, (size_t)max_sources * nbands);
    }
    *ws = w;
    w = NULL;
cleanup:
    if (w) sp_fit_workspace_free(&w);
    return status;
}

void sp_fit_workspace_free(sp_fit_workspace **wsp)
{
    if (!wsp || !*wsp) return;
    sp_fit_workspace *w = *wsp;
    /* dp and the other per-pixel arrays share cap_pix but are separate blocks */
    free(w->dp);
    free(w->w);
    free(w->mf);
    free(w->mx);
    free(w->vb);
    free(w->s);
    free(w->box);
    free(w->flux);
    free(w->ferr);
    free(w->ferrc);
    free(w->snr_acc);
    free(w->bflag);
    free(w->im);
    free(w->gr);
    free(w->skyuv);
    free(w->adjo);
    free(w->adj);
    free((void *)w->mptr);
    free(w->gmem);
    free(w->uf);
    free(w->tmpi);
    free(w->pairs);
    free(w->th_src);
    free(w->th_par);
    free(w->th_off);
    free(w->nf);
    free(w->arena);
    free(w->aoff);
    free(w->la);
    free(w->acc[0].mem);
    free(w->acc[1].mem);
    free(w->fin);
    free(w->fin_off);
    free(w->tmp);
    free(w->vlin);
    free(w->tmpu);
    free(w->mixscr);
    free(w->bgeo);
    free(w->mc);
    free(w->mc_off);
    free(w->mck);
    for (int i = 0; i < NCACHE; i++) {
        free(w->cache[i].prof);
        fit_fft_free_entry(&w->cache[i]);
    }
    fit_fft_scratch_free(&w->fft);
    free(w);
    *wsp = NULL;
}

/* ---------------------------------------------------------------- PSF cache */

static int cache_get(sp_fit_workspace *ws, const sp_psf *psf, int need_mix, int kmix, psf_cache_entry **out)
{
    int status = SP_OK;
    uint64_t h = fit_psf_hash(psf);
    psf_cache_entry *e = NULL, *lru = &ws->cache[0];
    for (int i = 0; i < NCACHE; i++) {
        psf_cache_entry *c = &ws->cache[i];
        if (c->psf == psf && c->hash == h) {
            e = c;
            break;
        }
        if (c->last_use < lru->last_use) lru = c;
    }
    if (!e) {
        e = lru;
        free(e->prof);
        fit_fft_free_entry(e);
        memset(e, 0, sizeof *e);
        e->psf = psf;
        e->hash = h;
        const int size = psf->size, os = psf->oversamp;
        const double c0 = 0.5 * (size - 1);
        e->half = c0 / os;
        e->nprof = (int)ceil(e->half * 1.4143) + 2;
        SP_ALLOC(e->prof, e->nprof);
        for (int j = 0; j < size; j++)
            for (int i = 0; i < size; i++) {
                double r = hypot(i - c0, j - c0) / os;
                int k = (int)r;
                if (k >= e->nprof) k = e->nprof - 1;
                double v = fabs(psf->data[(size_t)j * size + i]);
                if (v > e->prof[k]) e->prof[k] = v;
            }
        for (int k = e->nprof - 2; k >= 0; k--)
            if (e->prof[k + 1] > e->prof[k]) e->prof[k] = e->prof[k + 1];
        double cx, cy;
        sp_psf_moments(psf, &cx, &cy, &e->fwhm);
        if (!(e->fwhm > 0.5)) e->fwhm = 0.5;
    }
    e->last_use = ++ws->use_counter;
    if (need_mix && (!e->have_mix || e->mix.k != kmix)) {
        SP_TRY(fit_psf_mixture(psf, kmix, &e->mix, &ws->mixscr, &ws->cap_mixscr));
        e->have_mix = 1;
    }
    *out = e;
cleanup:
    return status;
}

/* ---------------------------------------------------------------- geometry */

static int ngeom(sp_src_type t) { return t == SP_SRC_STAR ? 2 : (t == SP_SRC_SERSIC ? 6 : 5); }

/* Project a geometry onto the bounds (shape: |eta| <= -ln q_min; Re bounds on
 * the major axis; n bounds). */
static void project(wsrc *s, fit_geom *g, const sp_fit_options *o)
{
    g->p[P_X] = clampd(g->p[P_X], s->lo[P_X], s->hi[P_X]);
    g->p[P_Y] = clampd(g->p[P_Y], s->lo[P_Y], s->hi[P_Y]);
    if (s->type == SP_SRC_STAR) return;
    double emax = -log(o->q_min);
    double e = hypot(g->p[P_E1], g->p[P_E2]);
    if (e > emax) {
        g->p[P_E1] *= emax / e;
        g->p[P_E2] *= emax / e;
        e = emax;
    }
    /* ln re = ln s + e/2 within [ln re_min, ln re_max] */
    double lnre = g->p[P_LNS] + 0.5 * e;
    double lr = clampd(lnre, log(o->re_min), log(o->re_max));
    g->p[P_LNS] += lr - lnre;
    if (s->type == SP_SRC_SERSIC) {
        double n0 = g->p[P_N];
        g->p[P_N] = clampd(g->p[P_N], o->n_min, o->n_max);
        if (g->p[P_N] != n0 || g->prof.k == 0) fit_gal_profile(s->type, g->p[P_N], s->profset, &g->prof);
    }
}

/* Gaussian prior on the shift from the input position (o->pos_prior_sigma > 0):
 * its -2 ln p over the group at geometry g (trial ? gt : g). */
static double pos_prior(const sp_fit_workspace *ws, const wgroup *G, const sp_fit_options *o, int trial)
{
    if (!(o->pos_prior_sigma > 0)) return 0.0;
    double s2 = o->pos_prior_sigma * o->pos_prior_sigma, v = 0.0;
    for (int l = 0; l < G->n; l++) {
        const wsrc *s = &ws->s[ws->gmem[G->start + l]];
        if (!(s->freemask & ((1u << P_X) | (1u << P_Y)))) continue;
        const fit_geom *g = trial ? &s->gt : &s->g;
        double dx = g->p[P_X] - s->p0[P_X], dy = g->p[P_Y] - s->p0[P_Y];
        v += (dx * dx + dy * dy) / s2;
    }
    return v;
}

static void refresh_profile(wsrc *s, fit_geom *g)
{
    if (s->type == SP_SRC_SERSIC) fit_gal_profile(s->type, g->p[P_N], s->profset, &g->prof);
}

/* ---------------------------------------------------------------- rendering helpers */

static int render_one(sp_fit_workspace *ws, const sp_fit_options *o, const wimg *wi, const fit_geom *g,
                      const fit_box *b, double *m, double *const dm[P_MAX])
{
    ws->renders++;
    if (o->conv == SP_FIT_CONV_FFT && g->type != SP_SRC_STAR) {
        /* the PSF spectrum is made for the largest galaxy box seen so far */
        int need = b->bw > b->bh ? b->bw : b->bh;
        const sp_psf *psf = wi->pc->psf;
        int smin = (psf->size + psf->oversamp - 1) / psf->oversamp;
        if (need < smin) need = smin;
        if (wi->pc->fft_n < need) {
            int n = fit_fft_size_for(need);
            if (n == 0) return SP_FAIL(SP_ERR_INPUT, "fit: galaxy box %d px exceeds the FFT sizes", need);
            int st = fit_fft_psf_spectrum(wi->pc, n);
            if (st != SP_OK) return st;
        }
    }
    return fit_render(wi->img, wi->pc, o->conv, g, b, m, dm, &ws->fft);
}

/* ---- model cache (two slots per source and image, keyed by the geometry) */

static size_t mc_np(const fit_box *bx) { return (size_t)bx->bw * bx->bh; }

/* Slot of s in image i holding geometry g with at least the planes `need`. */
static double *mc_find(sp_fit_workspace *ws, int nimg, const wsrc *s, int i, const fit_geom *g, const fit_box *bx,
                       unsigned need)
{
    const size_t q = (size_t)s->idx * nimg + i, sl = mc_np(bx) * (size_t)(1 + s->ngc);
    mc_key *k = ws->mck + 2 * q;
    for (int t = 0; t < 2; t++)
        if (k[t].used && (k[t].mask & need) == need && !memcmp(k[t].p, g->p, sizeof k[t].p)) {
            k[t].used = ++ws->mc_tick;
            ws->mc_hits++;
            return ws->mc + ws->mc_off[q] + (size_t)t * sl;
        }
    return NULL;
}

/* The slot that will hold a render at g: the one already at g if any, else
 * never the one holding the accepted geometry s->g (unless g is it), else the
 * least recently used. *keep: planes it already holds (same geometry). */
static double *mc_claim(sp_fit_workspace *ws, int nimg, const wsrc *s, int i, const fit_geom *g, const fit_box *bx,
                        unsigned *keep)
{
    const size_t q = (size_t)s->idx * nimg + i, sl = mc_np(bx) * (size_t)(1 + s->ngc);
    mc_key *k = ws->mck + 2 * q;
    const int gcur = !memcmp(g->p, s->g.p, sizeof g->p);
    int t = -1;
    *keep = 0;
    for (int u = 0; u < 2 && t < 0; u++)
        if (k[u].used && !memcmp(k[u].p, g->p, sizeof k[u].p)) {
            t = u;
            *keep = k[u].mask;
        }
    if (t < 0) {
        if (!gcur && k[0].used && !memcmp(k[0].p, s->g.p, sizeof k[0].p)) t = 1;
        else if (!gcur && k[1].used && !memcmp(k[1].p, s->g.p, sizeof k[1].p)) t = 0;
        else t = k[0].used <= k[1].used ? 0 : 1;
        k[t].mask = 0;
    }
    memcpy(k[t].p, g->p, sizeof k[t].p);
    k[t].used = ++ws->mc_tick;
    return ws->mc + ws->mc_off[q] + (size_t)t * sl;
}

static void mc_setmask(sp_fit_workspace *ws, int nimg, const wsrc *s, int i, const double *slot, unsigned mask)
{
    const size_t q = (size_t)s->idx * nimg + i;
    mc_key *k = ws->mck + 2 * q;
    k[slot == ws->mc + ws->mc_off[q] ? 0 : 1].mask = mask;
}

/* Unit-flux model (no derivatives) of s in image i at g: cached or rendered. */
static int mc_get(sp_fit_workspace *ws, const sp_fit_options *o, int nimg, const wimg *wi, const wsrc *s, int i,
                  const fit_geom *g, const fit_box *bx, const double **out)
{
    double *m = mc_find(ws, nimg, s, i, g, bx, 0);
    if (!m) {
        double *const nod[P_MAX] = {0};
        unsigned keep;
        m = mc_claim(ws, nimg, s, i, g, bx, &keep);
        int st = render_one(ws, o, wi, g, bx, m, nod);
        if (st != SP_OK) {
            ws->mck[2 * ((size_t)s->idx * nimg + i)].used = ws->mck[2 * ((size_t)s->idx * nimg + i) + 1].used = 0;
            return st;
        }
        mc_setmask(ws, nimg, s, i, m, keep);
    }
    *out = m;
    return SP_OK;
}

/* Model and the derivative planes of the free parameters `fm` of s in image
 * i at g, packed as the accumulation wants them (m, then one plane per free
 * parameter in index order): from the cache, or rendered (and cached). */
static int mc_get_derivs(sp_fit_workspace *ws, const sp_fit_options *o, int nimg, const wimg *wi, const wsrc *s,
                         int i, const fit_geom *g, const fit_box *bx, unsigned fm, double *out, const double **res)
{
    const size_t np = mc_np(bx);
    double *c = mc_find(ws, nimg, s, i, g, bx, fm);
    if (!c) {
        unsigned keep;
        c = mc_claim(ws, nimg, s, i, g, bx, &keep);
        double *dm[P_MAX] = {0};
        for (int j = 0; j < s->ng; j++)
            if (fm & (1u << j)) dm[j] = c + np * (size_t)(1 + j);
        int st = render_one(ws, o, wi, g, bx, c, dm);
        if (st != SP_OK) {
            ws->mck[2 * ((size_t)s->idx * nimg + i)].used = ws->mck[2 * ((size_t)s->idx * nimg + i) + 1].used = 0;
            return st;
        }
        mc_setmask(ws, nimg, s, i, c, keep | fm);
    }
    if ((fm & (fm + 1)) == 0) {
        /* the free parameters are the first ones (x, y [, shape]): the
         * slot already has the packed layout, no copy */
        *res = c;
        return SP_OK;
    }
    *res = out;
    memcpy(out, c, sizeof(double) * np);
    int q = 0;
    for (int j = 0; j < P_MAX; j++)
        if (fm & (1u << j)) memcpy(out + np * (size_t)(1 + q++), c + np * (size_t)(1 + j), sizeof(double) * np);
    return SP_OK;
}

/* Model box of source s in image i, centred on its initial position. */
static void make_box(const wimg *wi, const wsrc *s, double Rimg, fit_box *b, int *edge)
{
    const double *a = wi->img->aff;
    double u = a[0] * s->p0[P_X] + a[1] * s->p0[P_Y] + a[2];
    double v = a[3] * s->p0[P_X] + a[4] * s->p0[P_Y] + a[5];
    int R = (int)ceil(Rimg);
    long cu = lround(u), cv = lround(v);
    long x0 = cu - R, x1 = cu + R, y0 = cv - R, y1 = cv + R;
    *edge = 0;
    if (x0 < 0) { x0 = 0; *edge = 1; }
    if (y0 < 0) { y0 = 0; *edge = 1; }
    if (x1 > wi->img->nx - 1) { x1 = wi->img->nx - 1; *edge = 1; }
    if (y1 > wi->img->ny - 1) { y1 = wi->img->ny - 1; *edge = 1; }
    if (x1 < x0 || y1 < y0 || !isfinite(u) || !isfinite(v)) {
        b->bx0 = b->by0 = b->bw = b->bh = 0;
        return;
    }
    b->bx0 = (int)x0;
    b->by0 = (int)y0;
    b->bw = (int)(x1 - x0 + 1);
    b->bh = (int)(y1 - y0 + 1);
}

/* Radius (image px) where the model of flux F falls below box_nsigma sigma. */
static double box_radius_at(const wimg *wi, const wsrc *s, const double *p, double F, const sp_fit_options *o)
{
    const psf_cache_entry *pc = wi->pc;
    double thr = o->box_nsigma * wi->sigma;
    F = fabs(F);
    if (!isfinite(F)) F = 0.0;
    int r = 0;
    while (r < pc->nprof - 1 && F * pc->prof[r] >= thr) r++;
    double R = r;
    double Rmin = ceil(pc->fwhm) + 2.0;
    if (s->type != SP_SRC_STAR) {
        double re, q, th;
        fit_eta_to_shape(p[P_LNS], p[P_E1], p[P_E2], &re, &q, &th);
        re *= wi->scale;
        double sp2 = (pc->fwhm / 2.3548) * (pc->fwhm / 2.3548);
        const gal_profile *pr = &s->g.prof;
        double rg = R;
        for (rg = 0; rg < o->box_max_half; rg += 1.0) {
            double val = 0.0;
            for (int k = 0; k < pr->k; k++) {
                double a2 = pr->var[k] * re * re + sp2, b2 = pr->var[k] * re * re * q * q + sp2;
                val += pr->amp[k] / (2.0 * M_PI * sqrt(a2 * b2)) * exp(-0.5 * rg * rg / a2);
            }
            if (F * val * wi->img->flux_scale < thr) break;
        }
        if (rg > R) R = rg;
        /* at least the core of the profile */
        if (R < 2.0 * re) R = 2.0 * re;
    } else if (R > pc->half + 1.0) {
        R = pc->half + 1.0;
    }
    if (R < Rmin) R = Rmin;
    if (R > o->box_max_half) R = o->box_max_half;
    return R;
}

/* ... for the initial geometry (what the boxes are made from) */
static double box_radius(const wimg *wi, const wsrc *s, double F, const sp_fit_options *o)
{
    return box_radius_at(wi, s, s->p0, F, o);
}

/* Largest fraction, over the images, of galaxy k's final model flux that
 * falls outside its model box (sized from the initial flux and shape): an
 * upper bound, the flux of each convolved component beyond the circle of
 * radius d (the distance from the final centre to the nearest box side that
 * is not the ROI edge; those are SP_FITF_EDGE) along its major axis. Only
 * images where the final flux and shape need a box more than 1 px larger
 * than the one it had count. re: final effective radius (source px). */
static double box_trunc_frac(const sp_fit_workspace *ws, const sp_fit_options *o, int nimg, int nb, int k,
                             double re)
{
    const wsrc *s = &ws->s[k];
    const gal_profile *pr = &s->g.prof;
    double worst = 0.0;
    for (int i = 0; i < nimg; i++) {
        const wimg *wi = &ws->im[i];
        const fit_box *bx = &ws->box[(size_t)k * nimg + i];
        if (bx->bw <= 0 || bx->bh <= 0) continue;
        const double *a = wi->img->aff;
        const double u = a[0] * s->g.p[P_X] + a[1] * s->g.p[P_Y] + a[2];
        const double v = a[3] * s->g.p[P_X] + a[4] * s->g.p[P_Y] + a[5];
        double d = INFINITY;
        if (bx->bx0 > 0) d = fmin(d, u - bx->bx0 + 0.5);
        if (bx->by0 > 0) d = fmin(d, v - bx->by0 + 0.5);
        if (bx->bx0 + bx->bw < wi->img->nx) d = fmin(d, bx->bx0 + bx->bw - 0.5 - u);
        if (bx->by0 + bx->bh < wi->img->ny) d = fmin(d, bx->by0 + bx->bh - 0.5 - v);
        if (!isfinite(d)) continue;
        if (d < 0.0) d = 0.0;
        /* the box the final flux and shape would have been given (0.1 sigma
         * by default): faint wings cut there are below the noise by design */
        const double F = ws->flux[(size_t)k * nb + wi->slot] * wi->img->flux_scale;
        if (box_radius_at(wi, s, s->g.p, F, o) <= d + 1.0) continue;
        const double rei = re * wi->scale, sp2 = (wi->pc->fwhm / 2.3548) * (wi->pc->fwhm / 2.3548);
        double out = 0.0, tot = 0.0;
        for (int c = 0; c < pr->k; c++) {
            const double a2 = pr->var[c] * rei * rei + sp2;
            tot += pr->amp[c];
            out += pr->amp[c] * exp(-0.5 * d * d / a2);
        }
        if (tot > 0.0 && out / tot > worst) worst = out / tot;
    }
    return worst;
}

/* ---------------------------------------------------------------- accumulation */

static int acc_prepare(gacc *a, int n, int nth, int nb)
{
    size_t need = sp_fit_group_doubles(n, nth, nb);
    if (need > a->cap || !a->mem) {
        free(a->mem);
        a->mem = malloc((need + 16) * sizeof(double));
        a->nod = NULL;
        if (!a->mem) {
            a->cap = 0;
            return SP_FAIL(SP_ERR_NOMEM, "fit: out of memory for a group of %d sources", n);
        }
        a->cap = need;
    }
    a->n = n;
    a->nth = nth;
    a->nb = nb;
    double *p = a->mem;
    a->D = p; p += (size_t)nb * n * n;
    a->L = p; p += (size_t)nb * n * n;
    a->y = p; p += (size_t)nb * n;
    a->c = p; p += (size_t)nb * n;
    a->f = p; p += (size_t)nb * n;
    a->B = p; p += (size_t)nb * nth * n;
    a->A = p; p += (size_t)nb * nth * nth;
    a->z = p; p += (size_t)nb * nth;
    a->cz = p;
    memset(a->mem, 0, need * sizeof(double));
    a->singular = a->nonfinite = 0;
    return SP_OK;
}

typedef struct {
    const sp_fit_options *o;
    int nimg, nb;
    int use_mf; /* subtract other sources' current model (split groups) */
    double (*cost)[2]; /* sp_fit_patch_stats.cpu_stage, or NULL: not measured */
} runctx;

_Static_assert(SP_FIT_NCOST == sizeof(((sp_fit_patch_stats *)0)->cpu_stage) / sizeof(double[2]),
               "cpu_stage rows");

/* 1 if a member of G is a galaxy model, 0 if all are point sources. */
static int group_kind(const sp_fit_workspace *ws, const wgroup *G)
{
    for (int l = 0; l < G->n; l++)
        if (ws->s[ws->gmem[G->start + l]].type != SP_SRC_STAR) return 1;
    return 0;
}

/* Cost accounting: *t the last reading; the time since goes to (stage, kind). */
static inline void cost_add(const runctx *rc, int stage, int kind, double *t)
{
    if (!rc->cost) return;
    double now = sp_thread_cputime();
    rc->cost[stage][kind] += now - *t;
    *t = now;
}

/* Evaluate group G at geometry (trial ? gt : g) for all its sources: render,
 * accumulate, solve fluxes. Free parameters: s->freemask. */
static int group_eval(sp_fit_workspace *ws, const runctx *rc, const wgroup *G, int trial, gacc *a, int derivs)
{
    int status = SP_OK;
    const int n = G->n, nb = rc->nb;
    const int nth = derivs ? ws->th_off[n] : 0;
    SP_TRY(acc_prepare(a, n, nth, nb));
    for (int i = 0; i < rc->nimg; i++) {
        const wimg *wi = &ws->im[i];
        const int b = wi->slot, nx = wi->img->nx;
        const double *dp = ws->dp + wi->off, *w = ws->w + wi->off, *mf = ws->mf + wi->off;
        /* render every member into the arena */
        size_t pos = 0;
        for (int l = 0; l < n; l++) {
            const wsrc *s = &ws->s[ws->gmem[G->start + l]];
            const fit_box *bx = &ws->box[(size_t)s->idx * rc->nimg + i];
            ws->aoff[l] = pos;
            pos += (size_t)bx->bw * bx->bh * (1 + (derivs ? ws->nf[l] : 0));
        }
        if (pos == 0) continue;
        GROW(ws->arena, ws->cap_arena, pos);
        for (int l = 0; l < n; l++) {
            const wsrc *s = &ws->s[ws->gmem[G->start + l]];
            const fit_box *bx = &ws->box[(size_t)s->idx * rc->nimg + i];
            if (bx->bw == 0) continue;
            const size_t np = (size_t)bx->bw * bx->bh;
            double *m = ws->arena + ws->aoff[l];
            const fit_geom *gg = trial ? &s->gt : &s->g;
            (void)np;
            /* models are read in place from the cache (a slot is only
             * rewritten by a render of the same source and image, and each
             * is rendered at most once here) */
            if (derivs && ws->nf[l] > 0) {
                SP_TRY(mc_get_derivs(ws, rc->o, rc->nimg, wi, s, i, gg, bx, s->freemask, m, &ws->mptr[l]));
            } else {
                SP_TRY(mc_get(ws, rc->o, rc->nimg, wi, s, i, gg, bx, &ws->mptr[l]));
            }
        }
        /* self terms */
        for (int l = 0; l < n; l++) {
            const wsrc *s = &ws->s[ws->gmem[G->start + l]];
            const fit_box *bx = &ws->box[(size_t)s->idx * rc->nimg + i];
            if (bx->bw == 0) continue;
            const size_t np = (size_t)bx->bw * bx->bh;
            const double *m = ws->mptr[l];
            const int nfl = derivs ? ws->nf[l] : 0, j0 = derivs ? ws->th_off[l] : 0;
            const fit_acc_box ab = {bx->bx0, bx->by0, bx->bw, bx->bh, nx};
            fit_acc_self o;
            fit_acc_self_terms(nfl, &ab, w, dp, rc->use_mf ? mf : NULL, m, np, &o);
            const double sD = o.D, sy = o.y, sc = o.c;
            const double *sB = o.B, *sz = o.z, *scz = o.cz;
            double(*sA)[FIT_ACC_MAXP] = o.A;
            a->D[(size_t)b * n * n + (size_t)l * n + l] += sD;
            a->y[(size_t)b * n + l] += sy;
            a->c[(size_t)b * n + l] += sc;
            for (int j = 0; j < nfl; j++) {
                a->B[(size_t)b * nth * n + (size_t)(j0 + j) * n + l] += sB[j];
                a->z[(size_t)b * nth + j0 + j] += sz[j];
                a->cz[(size_t)b * nth + j0 + j] += scz[j];
                for (int k = 0; k <= j; k++) {
                    a->A[(size_t)b * nth * nth + (size_t)(j0 + j) * nth + j0 + k] += sA[j][k];
                    if (k != j) a->A[(size_t)b * nth * nth + (size_t)(j0 + k) * nth + j0 + j] += sA[j][k];
                }
            }
        }
        /* pair terms over box overlaps */
        for (int pi = 0; pi < G->npair; pi++) {
            const int l1 = ws->pairs[2 * (G->pstart + pi)], l2 = ws->pairs[2 * (G->pstart + pi) + 1];
            const wsrc *s1 = &ws->s[ws->gmem[G->start + l1]], *s2 = &ws->s[ws->gmem[G->start + l2]];
            const fit_box *b1 = &ws->box[(size_t)s1->idx * rc->nimg + i], *b2 = &ws->box[(size_t)s2->idx * rc->nimg + i];
            if (b1->bw == 0 || b2->bw == 0) continue;
            int xa = b1->bx0 > b2->bx0 ? b1->bx0 : b2->bx0, ya = b1->by0 > b2->by0 ? b1->by0 : b2->by0;
            int xb = b1->bx0 + b1->bw < b2->bx0 + b2->bw ? b1->bx0 + b1->bw : b2->bx0 + b2->bw;
            int yb = b1->by0 + b1->bh < b2->by0 + b2->bh ? b1->by0 + b1->bh : b2->by0 + b2->bh;
            if (xa >= xb || ya >= yb) continue;
            const size_t np1 = (size_t)b1->bw * b1->bh, np2 = (size_t)b2->bw * b2->bh;
            const double *m1 = ws->mptr[l1], *m2 = ws->mptr[l2];
            const int nf1 = derivs ? ws->nf[l1] : 0, nf2 = derivs ? ws->nf[l2] : 0;
            const int j1 = derivs ? ws->th_off[l1] : 0, j2 = derivs ? ws->th_off[l2] : 0;
            const fit_acc_pair_in pin = {w, nx, xa, xb, ya, yb, m1, m2, np1, np2,
                                         b1->bx0, b1->by0, b1->bw, b2->bx0, b2->by0, b2->bw};
            fit_acc_pair po;
            fit_acc_pair_terms(nf1, nf2, &pin, &po);
            const double sD = po.D, *sB12 = po.B12, *sB21 = po.B21;
            double(*sA)[FIT_ACC_MAXP] = po.A;
            double *Db = a->D + (size_t)b * n * n;
            Db[(size_t)l1 * n + l2] += sD;
            Db[(size_t)l2 * n + l1] += sD;
            for (int j = 0; j < nf1; j++) a->B[(size_t)b * nth * n + (size_t)(j1 + j) * n + l2] += sB12[j];
            for (int k = 0; k < nf2; k++) a->B[(size_t)b * nth * n + (size_t)(j2 + k) * n + l1] += sB21[k];
            for (int j = 0; j < nf1; j++)
                for (int k = 0; k < nf2; k++) {
                    a->A[(size_t)b * nth * nth + (size_t)(j1 + j) * nth + j2 + k] += sA[j][k];
                    a->A[(size_t)b * nth * nth + (size_t)(j2 + k) * nth + j1 + j] += sA[j][k];
                }
        }
    }
    /* fluxes per band */
    a->chi2 = 0.0;
    for (int b = 0; b < nb; b++) {
        const double *D = a->D + (size_t)b * n * n, *y = a->y + (size_t)b * n;
        double *L = a->L + (size_t)b * n * n, *f = a->f + (size_t)b * n;
        int sing = 0;
        (void)factor_spd(n, D, L, &sing);
        /* a source alone among coincident ones can look singular only with
         * itself: flag the group */
        if (sing) a->singular = 1;
        for (int l = 0; l < n; l++) f[l] = D[(size_t)l * n + l] > 0.0 ? y[l] : 0.0;
        chol_solve(n, L, 1, f);
        for (int l = 0; l < n; l++) {
            if (!isfinite(f[l])) {
                a->nonfinite = 1;
                f[l] = 0.0;
            }
            a->chi2 -= y[l] * f[l];
        }
    }
    if (!isfinite(a->chi2)) a->nonfinite = 1;
cleanup:
    return status;
}

/* Reduced (fluxes profiled) normal matrix S (nth x nth) and gradient g of
 * -chi2/2 from an accumulation. With sky: the sky of each band is profiled
 * too (Ssky[b] = sum of weights of the band; 0 = no sky). Returns in S, g. */
static int reduced_system(sp_fit_workspace *ws, const gacc *a, const double *Ssky, double *S, double *g)
{
    int status = SP_OK;
    const int n = a->n, nth = a->nth, nb = a->nb;
    const int ns = n + (Ssky ? 1 : 0);
    memset(S, 0, sizeof(double) * (size_t)nth * nth);
    memset(g, 0, sizeof(double) * (size_t)nth);
    GROW(ws->la, ws->cap_la, (size_t)ns * ns + 2 * (size_t)nth * ns + (size_t)ns * ns + 16);
    double *Lb = ws->la, *Bs = Lb + (size_t)ns * ns, *X = Bs + (size_t)nth * ns;
    for (int b = 0; b < nb; b++) {
        const double *A = a->A + (size_t)b * nth * nth, *B = a->B + (size_t)b * nth * n;
        const double *f = a->f + (size_t)b * n, *z = a->z + (size_t)b * nth;
        int any = 0;
        for (int l = 0; l < n; l++) any |= f[l] != 0.0;
        if (!any) continue;
        for (int j = 0; j < nth; j++) {
            const double Fj = f[ws->th_src[j]];
            double r = z[j];
            for (int l = 0; l < n; l++) r -= B[(size_t)j * n + l] * f[l];
            g[j] += Fj * r;
            for (int k = 0; k < nth; k++) S[(size_t)j * nth + k] += Fj * f[ws->th_src[k]] * A[(size_t)j * nth + k];
            for (int l = 0; l < n; l++) Bs[(size_t)l + (size_t)j * ns] = Fj * B[(size_t)j * n + l];
            if (Ssky) Bs[(size_t)n + (size_t)j * ns] = Fj * a->cz[(size_t)b * nth + j];
        }
        /* factor of D_b (augmented with the sky) */
        if (!Ssky) {
            memcpy(Lb, a->L + (size_t)b * n * n, sizeof(double) * (size_t)n * n);
        } else {
            const double *D = a->D + (size_t)b * n * n;
            double *Da = X; /* X is free until below */
            for (int r = 0; r < n; r++) {
                for (int c = 0; c < n; c++) Da[(size_t)r * ns + c] = D[(size_t)r * n + c];
                Da[(size_t)r * ns + n] = Da[(size_t)n * ns + r] = a->c[(size_t)b * n + r];
            }
            Da[(size_t)n * ns + n] = Ssky[b] > 0 ? Ssky[b] : 1.0;
            int sing = 0;
            (void)factor_spd(ns, Da, Lb, &sing);
        }
        /* X = D^-1 Bs^T: Bs stored column-major as ns x nth (column j = row j of Bs) */
        memcpy(X, Bs, sizeof(double) * (size_t)nth * ns);
        chol_solve(ns, Lb, nth, X);
        /* S -= Bs X  (Bs: nth x ns, X: ns x nth) */
        if (nth * ns <= 64) {
            for (int j = 0; j < nth; j++)
                for (int k = 0; k < nth; k++) {
                    double v = 0.0;
                    for (int l = 0; l < ns; l++) v += Bs[(size_t)j * ns + l] * X[(size_t)k * ns + l];
                    S[(size_t)j * nth + k] -= v;
                }
        } else {
            cblas_dgemm(CblasColMajor, CblasTrans, CblasNoTrans, nth, nth, ns, -1.0, Bs, ns, X, ns, 1.0, S, nth);
        }
    }
cleanup:
    return status;
}

/* Solve (S + lambda diag S) d = g by Cholesky; returns 0 on success. */
static int damped_solve(int nth, const double *S, const double *g, double lambda, const double *extra, double *Sd,
                        double *d)
{
    double maxd = 0.0;
    for (int j = 0; j < nth; j++)
        if (S[(size_t)j * nth + j] > maxd) maxd = S[(size_t)j * nth + j];
    if (!(maxd > 0.0) || !isfinite(maxd)) return -1;
    memcpy(Sd, S, sizeof(double) * (size_t)nth * nth);
    for (int j = 0; j < nth; j++) {
        double dj = S[(size_t)j * nth + j];
        if (dj < 1e-12 * maxd) dj = 1e-12 * maxd;
        Sd[(size_t)j * nth + j] = dj * (1.0 + lambda + (extra ? extra[j] : 0.0));
        d[j] = g[j];
    }
    if (LAPACKE_dpotrf_work(LAPACK_COL_MAJOR, 'L', nth, Sd, nth) != 0) return -1;
    if (LAPACKE_dpotrs_work(LAPACK_COL_MAJOR, 'L', nth, 1, Sd, nth, d, nth) != 0) return -1;
    for (int j = 0; j < nth; j++)
        if (!isfinite(d[j])) return -1;
    return 0;
}

/* ---------------------------------------------------------------- the group LM */

/* Theta bookkeeping of group G from its members' free masks: nf, th_off,
 * th_src, th_par. Returns nth (or -status on allocation failure). */
static int theta_map(sp_fit_workspace *ws, const wgroup *G)
{
    int status = SP_OK;
    const int n = G->n;
    int nth = 0;
    for (int l = 0; l < n; l++) nth += __builtin_popcount(ws->s[ws->gmem[G->start + l]].freemask);
    GROW(ws->nf, ws->cap_nf, n + 1);
    GROW(ws->th_off, ws->cap_th, n + 1);
    GROW(ws->th_src, ws->cap_thsrc, nth + 1);
    GROW(ws->th_par, ws->cap_thpar, nth + 1);
    int j = 0;
    for (int l = 0; l < n; l++) {
        const wsrc *s = &ws->s[ws->gmem[G->start + l]];
        ws->th_off[l] = j;
        int q = 0;
        for (int p = 0; p < P_MAX; p++)
            if (s->freemask & (1u << p)) {
                ws->th_src[j] = l;
                ws->th_par[j] = p;
                j++;
                q++;
            }
        ws->nf[l] = q;
    }
    ws->th_off[n] = j;
    return nth;
cleanup:
    return -status;
}

static void store_fluxes(sp_fit_workspace *ws, const wgroup *G, const gacc *a, int nb)
{
    for (int l = 0; l < G->n; l++) {
        const wsrc *s = &ws->s[ws->gmem[G->start + l]];
        for (int b = 0; b < nb; b++) ws->flux[(size_t)s->idx * nb + b] = a->f[(size_t)b * G->n + l];
    }
}

/* One stage of group G: linear_only -> the joint flux solve (geometry held);
 * else LM on the free geometry (members' freemask) with the fluxes profiled.
 * reuse: ws->acc[0] already holds an evaluation of G at the current geometry
 * with exactly this free set (skips the first render). On return ws->acc[0]
 * holds the evaluation at the returned geometry (with derivatives unless
 * linear_only). stage_idx < 0: not counted. */
static int fit_group_stage(sp_fit_workspace *ws, const runctx *rc, wgroup *G, int stage_idx, int linear_only,
                           int reuse)
{
    int status = SP_OK;
    const sp_fit_options *o = rc->o;
    const int n = G->n, nb = rc->nb;
    gacc *cur = &ws->acc[0], *tri = &ws->acc[1];
    if (linear_only)
        for (int l = 0; l < n; l++) ws->s[ws->gmem[G->start + l]].freemask = 0;
    int nth = theta_map(ws, G);
    if (nth < 0) {
        status = -nth;
        goto cleanup;
    }
    if (nth == 0) {
        if (!reuse) SP_TRY(group_eval(ws, rc, G, 0, cur, 0));
        store_fluxes(ws, G, cur, nb);
        for (int l = 0; l < n; l++)
            if (linear_only && stage_idx >= 0) ws->s[ws->gmem[G->start + l]].iters[stage_idx] += 1;
        if (cur->singular) G->flags |= SP_FITF_SINGULAR;
        goto cleanup;
    }
    GROW(ws->tmp, ws->cap_tmp, (size_t)nth * nth * 2 + (size_t)nth * 6 + 16);
    double *S = ws->tmp, *Sd = S + (size_t)nth * nth, *g = Sd + (size_t)nth * nth, *d = g + nth;
    /* per-parameter extra damping of parameters whose accepted steps flip
     * sign (the Gauss-Newton curvature underestimates theirs: a faint source
     * on a neighbour's residual), and the previous accepted step */
    double *osc = d + nth, *dprev = osc + nth, *d0 = dprev + nth;
    int any_osc = 0;
    for (int j = 0; j < nth; j++) osc[j] = dprev[j] = 0.0;
    G->dlnp = 0.0;
    if (!reuse) SP_TRY(group_eval(ws, rc, G, 0, cur, 1));
    if (cur->nonfinite) {
        G->flags |= SP_FITF_NONFINITE;
        goto cleanup;
    }
    /* the group's gain, per source, against dlnp_stop: each source converges
     * on its own terms in a group of any size */
    const double stop = o->dlnp_stop * n;
    double lambda = 1e-3;
    int it = 0, converged = 0;
    double prior_cur = pos_prior(ws, G, o, 0);
    const int itmax = G->it_cap > 0 && G->it_cap < o->n_opt_iters ? G->it_cap : o->n_opt_iters;
    G->capped = 0;
    while (it < itmax) {
        SP_TRY(reduced_system(ws, cur, NULL, S, g));
        if (o->pos_prior_sigma > 0) {
            const double is2 = 1.0 / (o->pos_prior_sigma * o->pos_prior_sigma);
            for (int j = 0; j < nth; j++) {
                int p = ws->th_par[j];
                if (p != P_X && p != P_Y) continue;
                const wsrc *s = &ws->s[ws->gmem[G->start + ws->th_src[j]]];
                S[(size_t)j * nth + j] += is2;
                g[j] -= (s->g.p[p] - s->p0[p]) * is2;
            }
        }
        int accepted = 0;
        for (int tries = 0; tries < 10 && it < itmax; tries++) {
            if (damped_solve(nth, S, g, lambda, any_osc ? osc : NULL, Sd, d) != 0) {
                lambda = lambda * 10.0 + 1e-6;
                G->flags |= SP_FITF_SINGULAR;
                if (lambda > 1e8) break;
                continue;
            }
            /* predicted gain of the (nearly Gauss-Newton) step: when it is
             * below the threshold we are converged without trying it */
            double pred = 0.0;
            for (int j = 0; j < nth; j++) {
                double Sdj = 0.0;
                for (int k = 0; k < nth; k++) Sdj += S[(size_t)j * nth + k] * d[k];
                pred += d[j] * g[j] - 0.5 * d[j] * Sdj;
            }
            if (lambda <= 1e-2 && pred >= 0.0 && pred < stop && any_osc) {
                /* damped per parameter: test the undamped step's gain */
                if (damped_solve(nth, S, g, lambda, NULL, Sd, d0) == 0) {
                    pred = 0.0;
                    for (int j = 0; j < nth; j++) {
                        double Sdj = 0.0;
                        for (int k = 0; k < nth; k++) Sdj += S[(size_t)j * nth + k] * d0[k];
                        pred += d0[j] * g[j] - 0.5 * d0[j] * Sdj;
                    }
                }
            }
            if (lambda <= 1e-2 && pred >= 0.0 && pred < stop) {
                converged = 1;
                accepted = 1;
                break;
            }
            /* trial geometry: capped steps, then bounds */
            double maxstep = 0.0;
            for (int l = 0; l < n; l++) {
                wsrc *s = &ws->s[ws->gmem[G->start + l]];
                s->gt = s->g;
            }
            for (int j = 0; j < nth; j++) {
                wsrc *s = &ws->s[ws->gmem[G->start + ws->th_src[j]]];
                int p = ws->th_par[j];
                double lim = p <= P_Y ? fmin(o->max_shift, o->max_step) : 0.5;
                double dj = clampd(d[j], -lim, lim);
                s->gt.p[p] += dj;
                if (fabs(dj) > maxstep) maxstep = fabs(dj);
            }
            double moved = 0.0;
            for (int l = 0; l < n; l++) {
                wsrc *s = &ws->s[ws->gmem[G->start + l]];
                refresh_profile(s, &s->gt);
                project(s, &s->gt, o);
                for (int p = 0; p < P_MAX; p++) moved = fmax(moved, fabs(s->gt.p[p] - s->g.p[p]));
            }
            if (!(moved > 1e-9)) { /* the step only pushes against bounds: a bounded optimum */
                converged = 1;
                accepted = 1;
                break;
            }
            it++;
            SP_TRY(group_eval(ws, rc, G, 1, tri, 1));
            double prior_tri = pos_prior(ws, G, o, 1);
            if (!tri->nonfinite && tri->chi2 + prior_tri < cur->chi2 + prior_cur) {
                double dlnp = 0.5 * (cur->chi2 + prior_cur - tri->chi2 - prior_tri);
                prior_cur = prior_tri;
                G->dlnp += dlnp;
                gacc t = *cur;
                *cur = *tri;
                *tri = t;
                if (o->lm_osc_damp)
                    for (int j = 0; j < nth; j++) {
                        const wsrc *s = &ws->s[ws->gmem[G->start + ws->th_src[j]]];
                        const int p = ws->th_par[j];
                        const double a = s->gt.p[p] - s->g.p[p];
                        if (a * dprev[j] < 0.0) {
                            osc[j] = osc[j] > 0.0 ? fmin(2.0 * osc[j], 64.0) : 1.0;
                            any_osc = 1;
                        } else if (a * dprev[j] > 0.0 && osc[j] > 0.0) {
                            osc[j] = osc[j] < 0.2 ? 0.0 : 0.5 * osc[j];
                        }
                        dprev[j] = a;
                    }
                for (int l = 0; l < n; l++) {
                    wsrc *s = &ws->s[ws->gmem[G->start + l]];
                    s->g = s->gt;
                }
                lambda = fmax(lambda * 0.3, 1e-7);
                accepted = 1;
                if (dlnp < stop || maxstep < 1e-7) converged = 1;
                break;
            }
            if (!(maxstep > 1e-9)) { /* no move possible: at a bound or at the optimum */
                converged = 1;
                accepted = 1;
                break;
            }
            /* rejected: damp enough to change the step (from the nearly
             * Gauss-Newton lambda 1e-3, x8 twice changed the diagonal by <7%
             * and cost two more renders of the group for nothing) */
            lambda = fmax(lambda * 8.0, 0.25);
        }
        if (converged) break;
        if (!accepted) {
            if (it < itmax) {
                /* damping exhausted: no step reduces chi2 — a (local) optimum */
                if (lambda > 1e6) converged = 1;
                else G->flags |= SP_FITF_DIVERGED;
            }
            break;
        }
    }
    if (!converged && it >= itmax && itmax < o->n_opt_iters) {
        /* an inexact block step of Gauss-Seidel: the next sweep goes on */
        G->capped = 1;
    } else if (!converged && it >= o->n_opt_iters) G->flags |= SP_FITF_MAXITER;
    if (stage_idx >= 0) G->iters[stage_idx] += it;
    if (!converged) G->flags |= NOTCONV;
    store_fluxes(ws, G, cur, nb);
    for (int l = 0; l < n; l++)
        if (stage_idx >= 0) ws->s[ws->gmem[G->start + l]].iters[stage_idx] += it;
    if (cur->singular) G->flags |= SP_FITF_SINGULAR;
cleanup:
    return status;
}

/* Final evaluation of a group at its solution: fluxes, marginal and
 * conditional errors, geometry errors. */
/* Errors from an evaluation `a` of group G at its solution (theta map
 * current): fluxes, marginal and conditional flux errors, geometry errors.
 * vlin (optional): the flux variances with the geometry held. */
static int errors_from_acc(sp_fit_workspace *ws, const runctx *rc, wgroup *G, gacc *a, const double *Ssky,
                           double *vlin)
{
    int status = SP_OK;
    const int n = G->n, nb = rc->nb, nth = ws->th_off[n];
    if (a->singular) G->flags |= SP_FITF_SINGULAR;
    const int ns = n + (Ssky ? 1 : 0);
    GROW(ws->tmp, ws->cap_tmp,
         (size_t)nth * nth * 2 + (size_t)nth * 2 + (size_t)ns * ns * 2 + (size_t)ns * (nth + 1) + 16);
    double *S = ws->tmp, *Si = S + (size_t)nth * nth, *g = Si + (size_t)nth * nth;
    double *Da = g + nth + 1, *Dinv = Da + (size_t)ns * ns, *W = Dinv + (size_t)ns * ns;
    if (nth > 0) {
        SP_TRY(reduced_system(ws, a, Ssky, S, g));
        int sing = 0;
        (void)factor_spd(nth, S, Si, &sing);
        if (sing) G->flags |= SP_FITF_SINGULAR;
        chol_inverse(nth, Si);
        for (int j = 0; j < nth; j++) {
            wsrc *s = &ws->s[ws->gmem[G->start + ws->th_src[j]]];
            double v = Si[(size_t)j * nth + j];
            s->perr[ws->th_par[j]] = v > 0 && isfinite(v) ? sqrt(v) : INFINITY;
        }
    }
    for (int b = 0; b < nb; b++) {
        const double *D = a->D + (size_t)b * n * n;
        const double *f = a->f + (size_t)b * n;
        /* D' = D augmented with the sky */
        for (int r = 0; r < ns; r++)
            for (int c = 0; c < ns; c++) {
                double v;
                if (r < n && c < n) v = D[(size_t)r * n + c];
                else if (r < n) v = a->c[(size_t)b * n + r];
                else if (c < n) v = a->c[(size_t)b * n + c];
                else v = Ssky[b] > 0 ? Ssky[b] : 1.0;
                Da[(size_t)r * ns + c] = v;
            }
        int sing = 0;
        (void)factor_spd(ns, Da, Dinv, &sing);
        if (sing) G->flags |= SP_FITF_SINGULAR;
        /* W = D'^-1 Bs'^T (ns x nth), with the factor, before inverting */
        if (nth > 0) {
            for (int j = 0; j < nth; j++) {
                const double Fj = f[ws->th_src[j]];
                for (int l = 0; l < n; l++) W[(size_t)j * ns + l] = Fj * a->B[(size_t)b * nth * n + (size_t)j * n + l];
                if (Ssky) W[(size_t)j * ns + n] = Fj * a->cz[(size_t)b * nth + j];
            }
            chol_solve(ns, Dinv, nth, W);
        }
        chol_inverse(ns, Dinv);
        for (int l = 0; l < n; l++) {
            wsrc *s = &ws->s[ws->gmem[G->start + l]];
            size_t fi = (size_t)s->idx * nb + b;
            ws->flux[fi] = f[l];
            if (D[(size_t)l * n + l] <= 0.0) {
                ws->bflag[fi] |= SP_FITB_NODATA;
                ws->ferr[fi] = ws->ferrc[fi] = NAN;
                continue;
            }
            double var = Dinv[(size_t)l * ns + l];
            if (vlin) vlin[fi] = var;
            if (nth > 0) {
                double add = 0.0;
                for (int j = 0; j < nth; j++) {
                    double wj = W[(size_t)j * ns + l];
                    if (wj == 0.0) continue;
                    for (int k = 0; k < nth; k++) add += wj * Si[(size_t)j * nth + k] * W[(size_t)k * ns + l];
                }
                var += add;
            }
            ws->ferr[fi] = var > 0 && isfinite(var) ? sqrt(var) : INFINITY;
            ws->ferrc[fi] = 1.0 / sqrt(D[(size_t)l * n + l]);
        }
    }
cleanup:
    return status;
}

/* Evaluate group G at its solution (free set = members' freemask) and
 * compute its errors. */
static int group_errors(sp_fit_workspace *ws, const runctx *rc, wgroup *G, const double *Ssky, double *vlin)
{
    int status = SP_OK;
    int nth = theta_map(ws, G);
    if (nth < 0) return -nth;
    SP_TRY(group_eval(ws, rc, G, 0, &ws->acc[0], nth > 0));
    SP_TRY(errors_from_acc(ws, rc, G, &ws->acc[0], Ssky, vlin));
cleanup:
    return status;
}

/* dst[box] += a * src (src packed bw x bh; dst rows of length nx): the same
 * sum as the scalar loop, vectorised (AVX2 / AVX-512 clones; no FMA
 * contraction in ISO C, so the same bits on every path). */
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) static void
add_rows(double *restrict dst, int nx, const fit_box *bx, double a, const double *restrict src)
{
    for (int r = 0; r < bx->bh; r++) {
        double *restrict row = dst + (size_t)(bx->by0 + r) * nx + bx->bx0;
        const double *restrict mr = src + (size_t)r * bx->bw;
#pragma omp simd
        for (int c = 0; c < bx->bw; c++) row[c] += a * mr[c];
    }
}

/* Add (sign +1) or subtract (-1) the current models of group G (times fluxes)
 * to/from ws->mf. */
static int group_to_mf(sp_fit_workspace *ws, const runctx *rc, const wgroup *G, double sign)
{
    int status = SP_OK;
    for (int l = 0; l < G->n; l++) {
        const wsrc *s = &ws->s[ws->gmem[G->start + l]];
        for (int i = 0; i < rc->nimg; i++) {
            const wimg *wi = &ws->im[i];
            const fit_box *bx = &ws->box[(size_t)s->idx * rc->nimg + i];
            if (bx->bw == 0) continue;
            double f = ws->flux[(size_t)s->idx * rc->nb + wi->slot];
            if (f == 0.0 || !isfinite(f)) continue;
            const double *mc;
            SP_TRY(mc_get(ws, rc->o, rc->nimg, wi, s, i, &s->g, bx, &mc));
            add_rows(ws->mf + wi->off, wi->img->nx, bx, sign * f, mc);
        }
    }
cleanup:
    return status;
}

/* Sky per band from the current models: weighted mean of dp - mf over all
 * valid pixels, added to the sky and removed from dp. */
static void update_sky(sp_fit_workspace *ws, const runctx *rc, double *sky)
{
    double num[SP_FIT_MAX_BANDS] = {0}, den[SP_FIT_MAX_BANDS] = {0};
    for (int i = 0; i < rc->nimg; i++) {
        const wimg *wi = &ws->im[i];
        const size_t np = (size_t)wi->img->nx * wi->img->ny;
        const double *dp = ws->dp + wi->off, *w = ws->w + wi->off, *mf = ws->mf + wi->off;
        for (size_t k = 0; k < np; k++) {
            num[wi->slot] += w[k] * (dp[k] - mf[k]);
            den[wi->slot] += w[k];
        }
    }
    for (int b = 0; b < rc->nb; b++) {
        double ds = den[b] > 0 ? num[b] / den[b] : 0.0;
        sky[b] += ds;
        for (int i = 0; i < rc->nimg; i++) {
            const wimg *wi = &ws->im[i];
            if (wi->slot != b) continue;
            const size_t np = (size_t)wi->img->nx * wi->img->ny;
            double *dp = ws->dp + wi->off;
            const double *w = ws->w + wi->off;
            for (size_t k = 0; k < np; k++)
                if (w[k] > 0) dp[k] -= ds;
        }
    }
}

/* Joint flux solve of group G with the geometry held, keeping the members'
 * free masks. Not counted as an iteration. */
static int linear_keep_masks(sp_fit_workspace *ws, runctx *rc, wgroup *G)
{
    int status = SP_OK;
    GROW(ws->tmpu, ws->cap_tmpu, G->n + 1);
    for (int l = 0; l < G->n; l++) ws->tmpu[l] = ws->s[ws->gmem[G->start + l]].freemask;
    int save = rc->use_mf;
    rc->use_mf = 1;
    status = fit_group_stage(ws, rc, G, -1, 1, 0);
    rc->use_mf = save;
    for (int l = 0; l < G->n; l++) ws->s[ws->gmem[G->start + l]].freemask = ws->tmpu[l];
cleanup:
    return status;
}

/* Alternate sky and fluxes (geometry held): rep rounds. mf holds every
 * fitted model on entry and on return. */
static int sky_alternate(sp_fit_workspace *ws, runctx *rc, wgroup *grs, int ngr, double *sky, int rep)
{
    int status = SP_OK;
    for (int r = 0; r < rep; r++) {
        update_sky(ws, rc, sky);
        for (int gi = 0; gi < ngr; gi++) {
            wgroup *G = &grs[gi];
            SP_TRY(group_to_mf(ws, rc, G, -1.0));
            SP_TRY(linear_keep_masks(ws, rc, G));
            SP_TRY(group_to_mf(ws, rc, G, +1.0));
        }
    }
cleanup:
    return status;
}

/* Sky and fluxes solved jointly (geometry held), exactly: components do not
 * overlap, so each one's fluxes are linear in the band's sky change ds,
 * f = D^-1 y - ds D^-1 c, and the sky equation sum w (dp - ds - model) = 0
 * gives ds = (sum w dp - sum c.D^-1 y) / (sum w - sum c.D^-1 c). One pass
 * over the components instead of alternating sky and flux solves (which
 * converge to the same point). mf holds every fitted model on entry and on
 * return. */
static int sky_joint(sp_fit_workspace *ws, runctx *rc, wgroup *grs, int ngr, double *sky)
{
    int status = SP_OK;
    const int nb = rc->nb;
    double num[SP_FIT_MAX_BANDS] = {0}, den[SP_FIT_MAX_BANDS] = {0};
    size_t tot = 0;
    const int save = rc->use_mf;
    rc->use_mf = 1;
    for (int gi = 0; gi < ngr; gi++) tot += (size_t)grs[gi].n;
    GROW(ws->skyuv, ws->cap_skyuv, 2 * tot * nb + 1);
    gacc *a = &ws->acc[0];
    size_t off = 0;
    for (int gi = 0; gi < ngr; gi++) {
        wgroup *G = &grs[gi];
        const int n = G->n;
        SP_TRY(group_to_mf(ws, rc, G, -1.0));
        GROW(ws->tmpu, ws->cap_tmpu, n + 1);
        for (int l = 0; l < n; l++) {
            wsrc *s = &ws->s[ws->gmem[G->start + l]];
            ws->tmpu[l] = s->freemask;
            s->freemask = 0;
        }
        int nth = theta_map(ws, G);
        if (nth < 0) {
            status = -nth;
            goto cleanup;
        }
        SP_TRY(group_eval(ws, rc, G, 0, a, 0));
        if (a->singular) G->flags |= SP_FITF_SINGULAR;
        double *u = ws->skyuv + off * 2 * nb, *v = u + (size_t)n * nb;
        for (int b = 0; b < nb; b++) {
            double *ub = u + (size_t)b * n, *vb = v + (size_t)b * n;
            const double *c = a->c + (size_t)b * n, *D = a->D + (size_t)b * n * n;
            memcpy(ub, a->f + (size_t)b * n, sizeof(double) * n);
            for (int l = 0; l < n; l++) vb[l] = D[(size_t)l * n + l] > 0.0 ? c[l] : 0.0;
            chol_solve(n, a->L + (size_t)b * n * n, 1, vb);
            for (int l = 0; l < n; l++) {
                if (!isfinite(vb[l])) vb[l] = 0.0;
                num[b] -= c[l] * ub[l];
                den[b] -= c[l] * vb[l];
            }
        }
        for (int l = 0; l < n; l++) ws->s[ws->gmem[G->start + l]].freemask = ws->tmpu[l];
        off += (size_t)n;
    }
    for (int i = 0; i < rc->nimg; i++) {
        const wimg *wi = &ws->im[i];
        const size_t np = (size_t)wi->img->nx * wi->img->ny;
        const double *dp = ws->dp + wi->off, *w = ws->w + wi->off, *mf = ws->mf + wi->off;
        /* mf now holds only what no component fits (nothing, unless a source
         * was left out): keep it in the sky equation */
        for (size_t k = 0; k < np; k++) {
            num[wi->slot] += w[k] * (dp[k] - mf[k]);
            den[wi->slot] += w[k];
        }
    }
    double ds[SP_FIT_MAX_BANDS];
    for (int b = 0; b < nb; b++) {
        ds[b] = den[b] > 0 && isfinite(num[b] / den[b]) ? num[b] / den[b] : 0.0;
        sky[b] += ds[b];
    }
    for (int i = 0; i < rc->nimg; i++) {
        const wimg *wi = &ws->im[i];
        const size_t np = (size_t)wi->img->nx * wi->img->ny;
        double *dp = ws->dp + wi->off;
        const double *w = ws->w + wi->off;
        const double d = ds[wi->slot];
        for (size_t k = 0; k < np; k++)
            if (w[k] > 0) dp[k] -= d;
    }
    off = 0;
    for (int gi = 0; gi < ngr; gi++) {
        wgroup *G = &grs[gi];
        const int n = G->n;
        const double *u = ws->skyuv + off * 2 * nb, *v = u + (size_t)n * nb;
        for (int l = 0; l < n; l++) {
            const wsrc *s = &ws->s[ws->gmem[G->start + l]];
            for (int b = 0; b < nb; b++) ws->flux[(size_t)s->idx * nb + b] = u[(size_t)b * n + l] - ds[b] * v[(size_t)b * n + l];
        }
        SP_TRY(group_to_mf(ws, rc, G, +1.0));
        off += (size_t)n;
    }
cleanup:
    rc->use_mf = save;
    return status;
}

/* Model-based weights (images with poisson_k > 0): w = 1 / (vb + k max(model, 0))
 * with the current model of every source (mf + mx); the sky's weight sums
 * follow. Returns 1 if some image was reweighted. */
static int reweight(sp_fit_workspace *ws, const runctx *rc, double *Ssky)
{
    int any = 0;
    if (Ssky)
        for (int b = 0; b < rc->nb; b++) Ssky[b] = 0.0;
    for (int i = 0; i < rc->nimg; i++) {
        const wimg *wi = &ws->im[i];
        const size_t np = (size_t)wi->img->nx * wi->img->ny;
        double *w = ws->w + wi->off;
        const double pk = wi->img->poisson_k;
        if (pk > 0) {
            const double *vb = ws->vb + wi->off, *mf = ws->mf + wi->off, *mx = ws->mx + wi->off;
            /* selects instead of a branch and an fmax call: vectorised, same
             * values (max(NaN, 0) = 0 both ways; vb > 0 keeps the sum away
             * from the sign of zero) */
#pragma omp simd
            for (size_t k = 0; k < np; k++) {
                const double t = mf[k] + mx[k], vk = vb[k];
                const double nw = 1.0 / ((vk > 0.0 ? vk : 1.0) + pk * (t > 0.0 ? t : 0.0));
                w[k] = vk > 0.0 ? nw : w[k];
            }
            any = 1;
        }
        if (Ssky) {
            double sw = Ssky[wi->slot];
            for (size_t k = 0; k < np; k++) sw += w[k];
            Ssky[wi->slot] = sw;
        }
    }
    return any;
}

/* Reweight from the current model, then re-solve every component's fluxes with the new weights
 * (with a sky, the caller's sky rounds re-solve them). */
static int refit_model_weights(sp_fit_workspace *ws, runctx *rc, wgroup *comps, int ncomp, double *Ssky)
{
    int status = SP_OK;
    reweight(ws, rc, Ssky);
    if (!Ssky)
        for (int gi = 0; gi < ncomp; gi++) {
            SP_TRY(group_to_mf(ws, rc, &comps[gi], -1.0));
            SP_TRY(linear_keep_masks(ws, rc, &comps[gi]));
            SP_TRY(group_to_mf(ws, rc, &comps[gi], +1.0));
        }
cleanup:
    return status;
}

/* ---------------------------------------------------------------- one run (all bands or one band) */

typedef struct {
    const int *imgidx; /* images of this run */
    int nimg;
    const int *slot_band; /* slot -> band */
    int nb;
    int indep; /* single-band run: geometry results go to ws->bgeo */
} runspec;

static void set_stage_free(sp_fit_workspace *ws, int nsrc_w, int stage)
{
    for (int k = 0; k < nsrc_w; k++) {
        wsrc *s = &ws->s[k];
        unsigned m = 0;
        if (s->role == SP_ROLE_FIXED || s->nodata) {
            s->freemask = 0;
            continue;
        }
        if (stage >= 2) m |= (1u << P_X) | (1u << P_Y);
        if (stage >= 3 && s->type != SP_SRC_STAR) {
            m |= (1u << P_LNS) | (1u << P_E1) | (1u << P_E2);
            if (s->type == SP_SRC_SERSIC) m |= 1u << P_N;
        }
        s->freemask = m & ~s->hold;
    }
}

static int find(int *uf, int a)
{
    while (uf[a] != a) {
        uf[a] = uf[uf[a]];
        a = uf[a];
    }
    return a;
}

static _Thread_local const double *cmp_w;
static int cmp_by_w(const void *a, const void *b)
{
    double wa = cmp_w[*(const int *)a], wb = cmp_w[*(const int *)b];
    return (wa < wb) - (wa > wb);
}

/* Free geometry of source s in a stage (2: positions; 3: + shape). */
static unsigned stage_mask(const wsrc *s, int stage)
{
    if (s->role == SP_ROLE_FIXED || s->nodata) return 0;
    unsigned m = 0;
    if (stage >= 2) m |= (1u << P_X) | (1u << P_Y);
    if (stage >= 3 && s->type != SP_SRC_STAR) {
        m |= (1u << P_LNS) | (1u << P_E1) | (1u << P_E2);
        if (s->type == SP_SRC_SERSIC) m |= 1u << P_N;
    }
    return m & ~s->hold;
}

/* SNR of the members of G from a joint linear evaluation, and the holds it
 * implies (geometry of sources fainter than min_snr_geom, shapes of galaxies
 * fainter than min_snr_shape). */
static void snr_holds(sp_fit_workspace *ws, const wgroup *G, const gacc *a, int nb, const sp_fit_options *o)
{
    const unsigned shape = (1u << P_LNS) | (1u << P_E1) | (1u << P_E2) | (1u << P_N);
    /* a component with no reported source (halo sources whose boxes touch
     * no base source): its light only matters through the sky, so its
     * fluxes are fitted with the geometry held (no LM, no new renders) */
    int report = 0;
    for (int l = 0; l < G->n; l++) report |= ws->s[ws->gmem[G->start + l]].role == SP_ROLE_FIT_REPORT;
    for (int l = 0; l < G->n; l++) {
        wsrc *s = &ws->s[ws->gmem[G->start + l]];
        if (!report) s->hold |= (1u << P_X) | (1u << P_Y) | shape;
    }
    for (int l = 0; l < G->n; l++) {
        wsrc *s = &ws->s[ws->gmem[G->start + l]];
        double s2 = 0.0;
        for (int b = 0; b < nb; b++) {
            double D = a->D[(size_t)b * G->n * G->n + (size_t)l * G->n + l];
            double f = a->f[(size_t)b * G->n + l];
            if (D > 0) s2 += f * f * D;
        }
        s->snr = sqrt(s2);
        if (s->snr < o->min_snr_geom) {
            s->hold |= (1u << P_X) | (1u << P_Y) | shape;
            s->flags |= SP_FITF_GEOM_FROZEN;
        } else if (s->type != SP_SRC_STAR && s->snr < o->min_snr_shape && !(s->hold & shape)) {
            s->hold |= shape;
            s->flags |= SP_FITF_SHAPE_FROZEN;
        }
    }
}

/* The whole fit of an independent component (not split, no sky): stage 1
 * renders the position derivatives too, so that stage 2 starts from its
 * evaluation, and the errors come from the last accepted evaluation. For an
 * isolated star: one render for stages 1-2 start, one per LM step, none for
 * the errors. */
static int fast_group(sp_fit_workspace *ws, runctx *rc, wgroup *G)
{
    int status = SP_OK;
    const sp_fit_options *o = rc->o;
    const int n = G->n, nb = rc->nb, first = o->staged ? 2 : 3, kind = group_kind(ws, G);
    double t = rc->cost ? sp_thread_cputime() : 0.0;
    gacc *cur = &ws->acc[0];
    for (int l = 0; l < n; l++) {
        wsrc *s = &ws->s[ws->gmem[G->start + l]];
        s->freemask = stage_mask(s, first);
    }
    int nth = theta_map(ws, G);
    if (nth < 0) return -nth;
    SP_TRY(group_eval(ws, rc, G, 0, cur, nth > 0));
    store_fluxes(ws, G, cur, nb);
    if (cur->singular) G->flags |= SP_FITF_SINGULAR;
    if (o->staged)
        for (int l = 0; l < n; l++) ws->s[ws->gmem[G->start + l]].iters[0] += 1;
    snr_holds(ws, G, cur, nb, o);
    int changed = 0, nfree = 0;
    for (int l = 0; l < n; l++) {
        wsrc *s = &ws->s[ws->gmem[G->start + l]];
        unsigned m = stage_mask(s, first);
        changed |= m != s->freemask;
        s->freemask = m;
        nfree += __builtin_popcount(m);
    }
    cost_add(rc, SP_FIT_COST_FLUX, kind, &t);
    if (nfree > 0) SP_TRY(fit_group_stage(ws, rc, G, o->staged ? 1 : 0, 0, !changed));
    cost_add(rc, o->staged ? SP_FIT_COST_POS : SP_FIT_COST_SHAPE, kind, &t);
    if (o->staged) {
        int nnew = 0;
        for (int l = 0; l < n; l++) {
            wsrc *s = &ws->s[ws->gmem[G->start + l]];
            unsigned m = stage_mask(s, 3);
            nnew += __builtin_popcount(m & ~s->freemask);
        }
        if (nnew > 0) {
            for (int l = 0; l < n; l++) {
                wsrc *s = &ws->s[ws->gmem[G->start + l]];
                s->freemask = stage_mask(s, 3);
            }
            SP_TRY(fit_group_stage(ws, rc, G, 2, 0, 0));
        }
        cost_add(rc, SP_FIT_COST_SHAPE, kind, &t);
    }
    if (nfree == 0 && nth > 0) {
        /* everything held after the SNR cut: errors with the geometry held */
        for (int l = 0; l < n; l++) ws->s[ws->gmem[G->start + l]].freemask = 0;
    }
    nth = theta_map(ws, G);
    if (nth < 0) return -nth;
    SP_TRY(errors_from_acc(ws, rc, G, cur, NULL, NULL));
    cost_add(rc, SP_FIT_COST_ERR, kind, &t);
cleanup:
    return status;
}

/* Chunks of component G (eval a: its joint linear accumulation): a
 * component no larger than maxg is one chunk; a larger one is cut by
 * Kruskal-style merging of its most strongly coupled pairs (normalised
 * overlap D_st / sqrt(D_ss D_tt), largest over bands) under a size cap, so
 * blended pairs stay together and the chunks interact weakly. Members of
 * split chunks are copied to gmem[*nmem...). */
static int make_chunks(sp_fit_workspace *ws, wgroup *G, const gacc *a, int maxg, int *nmem, int ncomp, int *nchk)
{
    int status = SP_OK;
    const int n = G->n, nb = a->nb;
    if (n <= maxg) {
        wgroup *C = &ws->gr[ncomp + (*nchk)++];
        memset(C, 0, sizeof *C);
        C->start = G->start;
        C->n = n;
        goto cleanup;
    }
    {
        const int npair = G->npair;
        GROW(ws->tmp, ws->cap_tmp, (size_t)npair + 1);
        GROW(ws->tmpi, ws->cap_tmpi, 3 * (size_t)n + (size_t)npair + 1);
        int *par = ws->tmpi, *size = par + n, *lab = size + n, *ord = lab + n;
        double *w = ws->tmp;
        for (int p = 0; p < npair; p++) {
            int l1 = ws->pairs[2 * (G->pstart + p)], l2 = ws->pairs[2 * (G->pstart + p) + 1];
            double best = 0.0;
            for (int b = 0; b < nb; b++) {
                const double *D = a->D + (size_t)b * n * n;
                double d1 = D[(size_t)l1 * n + l1], d2 = D[(size_t)l2 * n + l2];
                if (d1 > 0 && d2 > 0) {
                    double c = fabs(D[(size_t)l1 * n + l2]) / sqrt(d1 * d2);
                    if (c > best) best = c;
                }
            }
            w[p] = best;
            ord[p] = p;
        }
        /* sort pair indices by decreasing coupling (insertion sort on the
         * indices is too slow for big components: use qsort on a key array) */
        cmp_w = w;
        qsort(ord, (size_t)npair, sizeof(int), cmp_by_w);
        for (int l = 0; l < n; l++) {
            par[l] = l;
            size[l] = 1;
        }
        for (int q = 0; q < npair; q++) {
            int p = ord[q];
            int r1 = find(par, ws->pairs[2 * (G->pstart + p)]), r2 = find(par, ws->pairs[2 * (G->pstart + p) + 1]);
            if (r1 == r2 || size[r1] + size[r2] > maxg) continue;
            par[r1] = r2;
            size[r2] += size[r1];
        }
        /* emit chunks: members of each root, contiguous in gmem */
        for (int l = 0; l < n; l++) lab[l] = find(par, l);
        GROW(ws->gmem, ws->cap_gmem, (size_t)*nmem + n + 1);
        for (int r = 0; r < n; r++) {
            if (lab[r] != r) continue;
            wgroup *C = &ws->gr[ncomp + (*nchk)++];
            memset(C, 0, sizeof *C);
            C->start = *nmem;
            for (int l = 0; l < n; l++)
                if (lab[l] == r) ws->gmem[(*nmem)++] = ws->gmem[G->start + l];
            C->n = *nmem - C->start;
            C->split = 1;
        }
    }
cleanup:
    return status;
}

/* Forget the cached renders of source s (its type changed: the keys compare
 * the geometry only). */
static void mc_forget(sp_fit_workspace *ws, int nimg, const wsrc *s)
{
    for (int i = 0; i < nimg; i++) {
        mc_key *k = ws->mck + 2 * ((size_t)s->idx * nimg + i);
        k[0].used = k[1].used = 0;
        k[0].mask = k[1].mask = 0;
    }
}

static void set_type(wsrc *s, sp_src_type t)
{
    s->type = s->g.type = s->gt.type = t;
    s->ng = ngeom(t);
    if (t != SP_SRC_STAR) {
        fit_gal_profile(t, s->g.p[P_N], s->profset, &s->g.prof);
        s->gt.prof = s->g.prof;
    }
}

/* -2 ln prior of s's position at g (the MAP term of fit_group_stage), for
 * comparing models with and without free positions. */
static double prior_of(const wsrc *s, const fit_geom *g, const sp_fit_options *o)
{
    if (!(o->pos_prior_sigma > 0) || (s->hold & ((1u << P_X) | (1u << P_Y)))) return 0.0;
    const double dx = g->p[P_X] - s->p0[P_X], dy = g->p[P_Y] - s->p0[P_Y];
    return (dx * dx + dy * dy) / (o->pos_prior_sigma * o->pos_prior_sigma);
}

#define TYPE_AUTO_DCHI2 4.0  /* a galaxy model must lower chi2 by more than this over the point source */
#define TYPE_AUTO_SCREEN 2.0 /* shape held: the best fixed start may fall this short before its position fit */

/* The galaxy models an untyped source tries: with_gal, its `gal` first; then
 * the options' untyped_alt models other than `gal` (EXP, DEV). Returns the count. */
static int auto_types(const wsrc *s, const sp_fit_options *o, int with_gal, sp_src_type t[3])
{
    static const sp_src_type alt[2] = {SP_SRC_EXP, SP_SRC_DEV};
    int n = 0;
    if (with_gal) t[n++] = s->gal;
    for (int k = 0; k < 2; k++)
        if ((o->untyped_alt & (1u << alt[k])) && alt[k] != s->gal) t[n++] = alt[k];
    return n;
}

/* Galaxy start of an untyped source: geometry g0 (the point fit, or the first
 * galaxy fit) as model `type` with shape (re, q, theta). */
static void type_start(wsrc *s, const fit_geom *g0, sp_src_type type, double re, double q, double th,
                       const sp_fit_options *o)
{
    s->g = *g0;
    s->g.type = type;
    fit_shape_to_eta(re, q, th, &s->g.p[P_LNS], &s->g.p[P_E1], &s->g.p[P_E2]);
    s->g.p[P_N] = s->p0[P_N];
    set_type(s, type);
    project(s, &s->g, o);
}

/* Untyped sources (type_auto), after the first fit: with every other source
 * held (in mf), each candidate galaxy model (auto_types) is fitted alone over
 * the source's box (sized for the widest candidate), shape held below
 * min_snr_shape, position from the first fit. autot 1 (point first): starts
 * at the catalog Re, Re/3 and Re/10 (catalog q, theta); the best galaxy is
 * kept when its chi2 (+ position prior) beats the point source's by more than
 * TYPE_AUTO_DCHI2. autot 2 (fitted as `gal`): the other models start at the
 * catalog Re, the fitted Re and the catalog Re/3 (fitted q, theta), and the
 * lowest chi2 wins (the models have the same parameters). mf holds every
 * fitted model on entry and on return; the fluxes of a component whose member
 * changed model are re-solved jointly here unless the caller's weight / sky
 * rounds do it. */
static int type_trials(sp_fit_workspace *ws, runctx *rc, wgroup *comps, int ncomp, int nmem, int model_w)
{
    int status = SP_OK;
    const sp_fit_options *o = rc->o;
    const int nb = rc->nb, save = rc->use_mf;
    const unsigned xy = (1u << P_X) | (1u << P_Y), shape = (1u << P_LNS) | (1u << P_E1) | (1u << P_E2) | (1u << P_N);
    double fref[SP_FIT_MAX_BANDS], fbest[SP_FIT_MAX_BANDS];
    GROW(ws->gmem, ws->cap_gmem, (size_t)nmem + 1);
    GROW(ws->tmpi, ws->cap_tmpi, (size_t)ncomp + 1); /* components whose member changed model */
    for (int gi = 0; gi < ncomp; gi++) ws->tmpi[gi] = 0;
    rc->use_mf = 1;
    for (int gi = 0; gi < ncomp; gi++) {
        const wgroup *C = &comps[gi];
        for (int l = 0; l < C->n; l++) {
            wsrc *s = &ws->s[ws->gmem[C->start + l]];
            if (!s->autot || (s->hold & xy)) continue; /* too faint for a geometry, or held: stays as it is */
            const int point_first = s->autot == 1;
            sp_src_type cand[3];
            const int ncand = auto_types(s, o, point_first, cand);
            wgroup T;
            memset(&T, 0, sizeof T);
            T.start = nmem;
            T.n = 1;
            ws->gmem[nmem] = s->idx;
            SP_TRY(group_to_mf(ws, rc, &T, -1.0));
            /* the first fit's model over the same box, fluxes re-solved against the held neighbours */
            s->freemask = 0;
            if (theta_map(ws, &T) < 0) {
                status = SP_FAIL(SP_ERR_NOMEM, "fit: out of memory");
                goto cleanup;
            }
            SP_TRY(group_eval(ws, rc, &T, 0, &ws->acc[0], 0));
            const double chi2_ref = ws->acc[0].chi2 + prior_of(s, &s->g, o);
            for (int b = 0; b < nb; b++) fref[b] = ws->acc[0].f[b];
            const fit_geom gref = s->g;
            const sp_src_type tref = s->type;
            const double dchi2 = point_first ? TYPE_AUTO_DCHI2 : 0.0;
            double best = INFINITY;
            fit_geom gbest = gref;
            unsigned fbest_flags = 0;
            int it_best = 0;
            const unsigned hold0 = s->hold;
            const int it_ref = s->iters[2];
            double re0, q0, th0, starts[3];
            fit_eta_to_shape(s->p0[P_LNS], s->p0[P_E1], s->p0[P_E2], &re0, &q0, &th0);
            if (point_first) {
                starts[0] = re0;
                starts[1] = re0 / 3.0;
                starts[2] = re0 / 10.0;
            } else {
                double ref, qf, thf;
                fit_eta_to_shape(gref.p[P_LNS], gref.p[P_E1], gref.p[P_E2], &ref, &qf, &thf);
                starts[0] = re0;
                starts[1] = ref;
                starts[2] = re0 / 3.0;
                q0 = qf;
                th0 = thf;
            }
            for (int ci = 0; ci < ncand; ci++) {
                const sp_src_type ct = cand[ci];
                s->hold = hold0;
                if (s->snr < o->min_snr_shape) s->hold |= shape;
                set_type(s, ct);
                const int shape_free = (stage_mask(s, 3) & shape) != 0;
                /* the starts at the first fit's position, fluxes only (one render
                 * per image each). With the shape held they are three fixed
                 * models whose position refinement gains little: only the best
                 * one goes on, and only if it comes within TYPE_AUTO_SCREEN of
                 * winning. With the shape free, the LM runs from the best start
                 * and, point first, from those within TYPE_AUTO_DCHI2 of it (a
                 * start far worse than another one at the same position is on
                 * the wrong scale; LMs from all three did 3.3x the trials' galaxy
                 * render work on the bench tile and kept 34 galaxies instead of
                 * 33); after a galaxy fit the scale is known, and more LMs
                 * changed no result on the galaxy tile of docs/fitting.md */
                double lin[3];
                int order[3] = {0, 1, 2};
                for (int t = 0; t < 3; t++) {
                    type_start(s, &gref, ct, starts[t], q0, th0, o);
                    mc_forget(ws, rc->nimg, s);
                    s->freemask = 0;
                    if (theta_map(ws, &T) < 0) {
                        status = SP_FAIL(SP_ERR_NOMEM, "fit: out of memory");
                        goto cleanup;
                    }
                    SP_TRY(group_eval(ws, rc, &T, 0, &ws->acc[0], 0));
                    lin[t] = ws->acc[0].nonfinite ? INFINITY : ws->acc[0].chi2 + prior_of(s, &s->g, o);
                }
                for (int t = 1; t < 3; t++)
                    for (int u = t; u > 0 && lin[order[u]] < lin[order[u - 1]]; u--) {
                        int w = order[u];
                        order[u] = order[u - 1];
                        order[u - 1] = w;
                    }
                int ntry = chi2_ref - lin[order[0]] > dchi2 - TYPE_AUTO_SCREEN ? 1 : 0;
                if (shape_free) { /* point first, the scale is unknown: also the starts about as good */
                    ntry = 1;
                    if (point_first)
                        for (; ntry < 3 && lin[order[ntry]] < lin[order[0]] + TYPE_AUTO_DCHI2; ntry++) {}
                }
                for (int q = 0; q < ntry; q++) {
                    const int t = order[q];
                    type_start(s, &gref, ct, starts[t], q0, th0, o);
                    s->freemask = stage_mask(s, 3);
                    T.flags = 0;
                    T.iters[2] = 0;
                    s->iters[2] = 0;
                    SP_TRY(fit_group_stage(ws, rc, &T, s->freemask ? 2 : -1, s->freemask == 0, 0));
                    if (ws->acc[0].nonfinite) continue;
                    const double c2 = ws->acc[0].chi2 + prior_of(s, &s->g, o);
                    if (c2 < best) {
                        best = c2;
                        gbest = s->g;
                        for (int b = 0; b < nb; b++) fbest[b] = ws->acc[0].f[b];
                        fbest_flags = T.flags;
                        it_best = s->iters[2];
                    }
                }
            }
            const int keep = best < chi2_ref - dchi2;
            s->hold = hold0;
            if (keep) {
                s->g = gbest;
                set_type(s, gbest.type);
                if (s->snr < o->min_snr_shape && !(hold0 & shape)) {
                    s->hold |= shape;
                    s->flags |= SP_FITF_SHAPE_FROZEN;
                }
                s->flags |= fbest_flags & (SP_FITF_MAXITER | SP_FITF_SINGULAR | SP_FITF_DIVERGED | NOTCONV);
                s->iters[2] = it_best;
                for (int b = 0; b < nb; b++) ws->flux[(size_t)s->idx * nb + b] = fbest[b];
                ws->tmpi[gi] = 1;
                s->retyped = !point_first && gbest.type != tref;
            } else {
                s->g = gref;
                set_type(s, tref);
                s->iters[2] = point_first ? 0 : it_ref;
                for (int b = 0; b < nb; b++) ws->flux[(size_t)s->idx * nb + b] = fref[b];
            }
            s->gt = s->g;
            s->autot = 0;
            mc_forget(ws, rc->nimg, s);
            SP_TRY(group_to_mf(ws, rc, &T, +1.0));
        }
    }
    rc->use_mf = save;
    if (!o->fit_sky && !model_w)
        for (int gi = 0; gi < ncomp; gi++) {
            if (!ws->tmpi[gi]) continue;
            SP_TRY(group_to_mf(ws, rc, &comps[gi], -1.0));
            SP_TRY(linear_keep_masks(ws, rc, &comps[gi]));
            SP_TRY(group_to_mf(ws, rc, &comps[gi], +1.0));
        }
cleanup:
    rc->use_mf = save;
    return status;
}

static int run_fit(sp_fit_workspace *ws, const sp_fit_options *o, const sp_fit_image *imgs, const runspec *rs,
                   const sp_fit_source *src, int nsrc, sp_fit_result *res, sp_fit_patch_stats *st, float *const *model,
                   int nbands_total)
{
    int status = SP_OK;
    const int nimg = rs->nimg, nb = rs->nb;
    runctx rc = {.o = o, .nimg = nimg, .nb = nb, .use_mf = 0, .cost = st ? st->cpu_stage : NULL};
    double tc = 0.0; /* cost accounting: the last thread-CPU reading */
    double sky[SP_FIT_MAX_BANDS] = {0}, Ssky[SP_FIT_MAX_BANDS] = {0};
    int need_mix = 0;
    for (int k = 0; k < nsrc; k++)
        if (src[k].type != SP_SRC_STAR) need_mix = 1;
    need_mix = need_mix && o->conv == SP_FIT_CONV_GMIX;
    /* ---- images */
    GROW(ws->im, ws->cap_im, nimg);
    size_t totpix = 0;
    for (int i = 0; i < nimg; i++) {
        const sp_fit_image *img = &imgs[rs->imgidx[i]];
        wimg *wi = &ws->im[i];
        wi->img = img;
        wi->slot = -1;
        for (int b = 0; b < nb; b++)
            if (rs->slot_band[b] == img->band) wi->slot = b;
        wi->off = totpix;
        totpix += (size_t)img->nx * img->ny;
        wi->scale = sqrt(fabs(img->aff[0] * img->aff[4] - img->aff[1] * img->aff[3]));
        if (!(wi->scale > 0)) wi->scale = 1.0;
        SP_TRY(cache_get(ws, img->psf, need_mix, o->psf_gmix_k, &wi->pc));
    }
    if (totpix > ws->cap_pix || !ws->dp || !ws->vb) {
        size_t cap = 0;
        free(ws->dp);
        free(ws->w);
        free(ws->mf);
        free(ws->mx);
        free(ws->vb);
        ws->dp = ws->w = ws->mf = ws->mx = ws->vb = NULL;
        ws->cap_pix = 0;
        GROW(ws->dp, cap, totpix);
        cap = 0;
        GROW(ws->w, cap, totpix);
        cap = 0;
        GROW(ws->mf, cap, totpix);
        cap = 0;
        GROW(ws->mx, cap, totpix);
        cap = 0;
        GROW(ws->vb, cap, totpix);
        ws->cap_pix = totpix;
    }
    /* ---- pixels: weights, data, initial sky */
    for (int i = 0; i < nimg; i++) {
        wimg *wi = &ws->im[i];
        const size_t np = (size_t)wi->img->nx * wi->img->ny;
        double *dp = ws->dp + wi->off, *w = ws->w + wi->off;
        const float *d = wi->img->data, *iv = wi->img->ivar;
        for (size_t k = 0; k < np; k++) {
            double dv = d[k], wv = iv[k];
            if (!isfinite(dv) || !isfinite(wv) || wv <= 0.0) {
                dp[k] = 0.0;
                w[k] = 0.0;
            } else {
                dp[k] = dv;
                w[k] = wv;
            }
        }
        if (wi->img->poisson_k > 0) {
            /* background variance: the given variance minus its data-based
             * Poisson term, floored at half the typical background variance
             * (median over pixels without a Poisson term, data <= 0): coadds
             * and a re-subtracted background make the split approximate */
            const double pk = wi->img->poisson_k;
            double *vb = ws->vb + wi->off;
            GROW(ws->tmp, ws->cap_tmp, 4096);
            int n0 = 0;
            const size_t stp0 = np / 4096 + 1;
            for (size_t k = 0; k < np && n0 < 4096; k += stp0)
                if (w[k] > 0 && d[k] <= 0) ws->tmp[n0++] = 1.0 / w[k];
            const double vfloor = n0 > 0 ? 0.5 * kth(ws->tmp, n0, n0 / 2) : 0.0;
            /* selects, no branch or fmax/fmin call: vectorised (the
             * quotient of a masked pixel is computed and dropped) */
#pragma omp simd
            for (size_t k = 0; k < np; k++) {
                const double wk = w[k], dk = d[k];
                const double v = 1.0 / (wk > 0.0 ? wk : 1.0), b0 = v - pk * (dk > 0.0 ? dk : 0.0);
                const double alt = vfloor > 0 ? (vfloor < v ? vfloor : v) : v;
                vb[k] = wk > 0.0 ? (b0 > vfloor ? b0 : alt) : 0.0;
            }
        }
        memset(ws->mf + wi->off, 0, np * sizeof(double));
        memset(ws->mx + wi->off, 0, np * sizeof(double));
        /* typical sigma and (fit_sky) a robust initial sky: medians of a subsample */
        GROW(ws->tmp, ws->cap_tmp, 8192);
        int ns = 0, nsd = 0;
        size_t stp = np / 4096 + 1;
        for (size_t k = 0; k < np && ns < 4096; k += stp)
            if (w[k] > 0) ws->tmp[ns++] = w[k];
        wi->sigma = ns > 0 ? 1.0 / sqrt(kth(ws->tmp, ns, ns / 2)) : 1.0;
        if (o->fit_sky) {
            for (size_t k = 0; k < np && nsd < 4096; k += stp)
                if (w[k] > 0) ws->tmp[4096 + nsd++] = dp[k];
            double s0 = nsd > 0 ? kth(ws->tmp + 4096, nsd, nsd / 2) : 0.0;
            /* per image initial sky folded into dp; the band sky is their mean */
            for (size_t k = 0; k < np; k++)
                if (w[k] > 0) dp[k] -= s0;
            sky[wi->slot] += s0; /* corrected below to a mean over the band's images */
        }
    }
    if (o->fit_sky) {
        int cnt[SP_FIT_MAX_BANDS] = {0};
        for (int i = 0; i < nimg; i++) cnt[ws->im[i].slot]++;
        for (int b = 0; b < nb; b++)
            if (cnt[b] > 1) sky[b] /= cnt[b];
        for (int i = 0; i < nimg; i++) {
            const wimg *wi = &ws->im[i];
            const size_t np = (size_t)wi->img->nx * wi->img->ny;
            for (size_t k = 0; k < np; k++) Ssky[wi->slot] += ws->w[wi->off + k];
        }
    }
    /* ---- sources */
    GROW(ws->s, ws->cap_s, nsrc);
    GROW(ws->flux, ws->cap_flux, (size_t)nsrc * nb);
    {
        size_t cap = 0;
        if ((size_t)nsrc * nb > ws->cap_bflag || !ws->ferr) {
            free(ws->ferr);
            free(ws->ferrc);
            free(ws->bflag);
            ws->ferr = ws->ferrc = NULL;
            ws->bflag = NULL;
            GROW(ws->ferr, cap, (size_t)nsrc * nb);
            cap = 0;
            GROW(ws->ferrc, cap, (size_t)nsrc * nb);
            cap = 0;
            GROW(ws->bflag, cap, (size_t)nsrc * nb);
            ws->cap_bflag = cap;
        }
    }
    GROW(ws->box, ws->cap_box, (size_t)nsrc * nimg);
    for (int k = 0; k < nsrc; k++) {
        const sp_fit_source *in = &src[k];
        wsrc *s = &ws->s[k];
        memset(s, 0, sizeof *s);
        s->idx = k;
        s->type = in->type;
        s->role = in->role;
        s->ng = s->ngc = ngeom(in->type);
        s->g.type = in->type;
        s->gal = in->type;
        s->profset = o->gal_profiles;
        s->autot = in->type != SP_SRC_STAR && in->role != SP_ROLE_FIXED && !rs->indep ? in->type_auto : 0;
        if (s->autot != 1 && s->autot != 2) s->autot = 0;
        if (s->autot == 2) {
            sp_src_type t[3];
            if (auto_types(s, o, 0, t) == 0) s->autot = 0; /* no other model to try */
        }
        double x = in->x, y = in->y;
        if (!isfinite(x) || !isfinite(y)) {
            s->flags |= SP_FITF_BAD_INPUT | SP_FITF_NODATA;
            s->nodata = 1;
            x = y = 0.0;
        }
        s->g.p[P_X] = x;
        s->g.p[P_Y] = y;
        if (in->type != SP_SRC_STAR) {
            double re = in->re, q = in->q, th = in->theta;
            if (!(re > 0) || !isfinite(re)) {
                re = 2.0;
                s->flags |= SP_FITF_BAD_INPUT;
            }
            if (!(q > 0 && q <= 1.0)) {
                q = clampd(isfinite(q) ? q : 1.0, o->q_min, 1.0);
                s->flags |= SP_FITF_BAD_INPUT;
            }
            if (!isfinite(th)) th = 0.0;
            re = clampd(re, o->re_min, o->re_max);
            q = clampd(q, o->q_min, 1.0);
            fit_shape_to_eta(re, q, th, &s->g.p[P_LNS], &s->g.p[P_E1], &s->g.p[P_E2]);
            double n = in->type == SP_SRC_SERSIC ? in->sersic_n : (in->type == SP_SRC_EXP ? 1.0 : 4.0);
            if (in->type == SP_SRC_SERSIC && !isfinite(n)) {
                n = 1.0;
                s->flags |= SP_FITF_BAD_INPUT;
            }
            s->g.p[P_N] = clampd(n, o->n_min, o->n_max);
            fit_gal_profile(in->type, s->g.p[P_N], s->profset, &s->g.prof);
        }
        memcpy(s->p0, s->g.p, sizeof s->p0);
        s->lo[P_X] = x - o->max_shift;
        s->hi[P_X] = x + o->max_shift;
        s->lo[P_Y] = y - o->max_shift;
        s->hi[P_Y] = y + o->max_shift;
        if (!o->fit_positions) s->hold |= (1u << P_X) | (1u << P_Y);
        if (!o->fit_shapes) s->hold |= (1u << P_LNS) | (1u << P_E1) | (1u << P_E2) | (1u << P_N);
        if (!o->fit_sersic_n) s->hold |= 1u << P_N;
        if (s->role == SP_ROLE_FIXED) s->flags |= SP_FITF_FIXED;
        for (int b = 0; b < nb; b++) {
            size_t fi = (size_t)k * nb + b;
            ws->flux[fi] = in->flux[rs->slot_band[b]];
            ws->ferr[fi] = ws->ferrc[fi] = NAN;
            ws->bflag[fi] = 0;
        }
    }
    /* ---- initial fluxes where unknown: a quick weighted PSF/model fit of the
     * source alone in a small box (forced photometry at the input position) */
    for (int k = 0; k < nsrc; k++) {
        wsrc *s = &ws->s[k];
        if (s->nodata) continue;
        for (int b = 0; b < nb; b++) {
            size_t fi = (size_t)k * nb + b;
            if (isfinite(ws->flux[fi])) continue;
            double num = 0.0, den = 0.0;
            for (int i = 0; i < nimg; i++) {
                const wimg *wi = &ws->im[i];
                if (wi->slot != b) continue;
                fit_box bx;
                int edge;
                make_box(wi, s, ceil(wi->pc->fwhm) + 3.0 + (s->type != SP_SRC_STAR ? 2.0 * exp(s->g.p[P_LNS]) * wi->scale : 0.0), &bx, &edge);
                if (bx.bw == 0) continue;
                GROW(ws->arena, ws->cap_arena, (size_t)bx.bw * bx.bh);
                double *const nod[P_MAX] = {0};
                SP_TRY(render_one(ws, o, wi, &s->g, &bx, ws->arena, nod));
                for (int r = 0; r < bx.bh; r++)
                    for (int c = 0; c < bx.bw; c++) {
                        size_t io = wi->off + (size_t)(bx.by0 + r) * wi->img->nx + bx.bx0 + c;
                        double mm = ws->arena[(size_t)r * bx.bw + c];
                        num += ws->w[io] * mm * ws->dp[io];
                        den += ws->w[io] * mm * mm;
                    }
            }
            ws->flux[fi] = den > 0 ? num / den : 0.0;
        }
    }
    /* ---- boxes */
    for (int k = 0; k < nsrc; k++) {
        wsrc *s = &ws->s[k];
        int anyvalid = 0;
        for (int i = 0; i < nimg; i++) {
            const wimg *wi = &ws->im[i];
            fit_box *bx = &ws->box[(size_t)k * nimg + i];
            if (s->nodata) {
                memset(bx, 0, sizeof *bx);
                continue;
            }
            double F = ws->flux[(size_t)k * nb + wi->slot] * wi->img->flux_scale;
            double Ri = box_radius(wi, s, F, o);
            if (s->autot) { /* wide enough for every model it tries */
                const gal_profile prof0 = s->g.prof;
                sp_src_type t[3];
                const int nt = auto_types(s, o, 0, t);
                for (int j = 0; j < nt; j++) {
                    fit_gal_profile(t[j], s->p0[P_N], s->profset, &s->g.prof);
                    Ri = fmax(Ri, box_radius(wi, s, F, o));
                }
                s->g.prof = prof0;
            }
            Ri += o->fit_positions && s->role != SP_ROLE_FIXED ? 1.0 : 0.0;
            int edge = 0;
            make_box(wi, s, Ri, bx, &edge);
            if (edge) {
                s->flags |= SP_FITF_EDGE;
                ws->bflag[(size_t)k * nb + wi->slot] |= SP_FITB_EDGE;
            }
            double Rs = Ri / wi->scale;
            if (Rs > s->R) s->R = Rs;
            if (bx->bw > 0) {
                const double *w = ws->w + wi->off;
                int valid = 0;
                for (int r = 0; r < bx->bh && !valid; r++)
                    for (int c = 0; c < bx->bw; c++)
                        if (w[(size_t)(bx->by0 + r) * wi->img->nx + bx->bx0 + c] > 0) {
                            valid = 1;
                            break;
                        }
                if (!valid) memset(bx, 0, sizeof *bx);
                else anyvalid = 1;
            }
        }
        if (!anyvalid && !s->nodata) {
            s->nodata = 1;
            s->flags |= SP_FITF_NODATA;
        }
    }
    /* ---- untyped sources: boxes and cache slots were sized for the galaxy
     * model; the fit starts with the point source */
    int any_auto = 0;
    for (int k = 0; k < nsrc; k++) {
        wsrc *s = &ws->s[k];
        if (!s->autot) continue;
        if (s->nodata) {
            s->autot = 0;
            continue;
        }
        any_auto = 1;
        if (s->autot != 1) continue;
        s->type = s->g.type = SP_SRC_STAR;
        s->ng = ngeom(SP_SRC_STAR);
    }
    /* ---- model cache: two slots per source and image box */
    {
        size_t tot = 0;
        GROW(ws->mc_off, ws->cap_mc_off, (size_t)nsrc * nimg + 1);
        GROW(ws->mck, ws->cap_mck, 2 * (size_t)nsrc * nimg + 2);
        for (size_t q = 0; q < (size_t)nsrc * nimg; q++) {
            ws->mc_off[q] = tot;
            tot += 2 * (size_t)ws->box[q].bw * ws->box[q].bh * (size_t)(1 + ws->s[q / nimg].ngc);
        }
        GROW(ws->mc, ws->cap_mc, tot + 1);
        memset(ws->mck, 0, sizeof(mc_key) * 2 * (size_t)nsrc * nimg);
    }
    /* ---- fixed sources: subtract their models once */
    for (int k = 0; k < nsrc; k++) {
        wsrc *s = &ws->s[k];
        if (s->role != SP_ROLE_FIXED || s->nodata) continue;
        for (int i = 0; i < nimg; i++) {
            const wimg *wi = &ws->im[i];
            const fit_box *bx = &ws->box[(size_t)k * nimg + i];
            double f = ws->flux[(size_t)k * nb + wi->slot];
            if (bx->bw == 0 || !isfinite(f) || f == 0.0) continue;
            GROW(ws->arena, ws->cap_arena, (size_t)bx->bw * bx->bh);
            double *const nod[P_MAX] = {0};
            SP_TRY(render_one(ws, o, wi, &s->g, bx, ws->arena, nod));
            for (int r = 0; r < bx->bh; r++)
                for (int c = 0; c < bx->bw; c++) {
                    size_t io = wi->off + (size_t)(bx->by0 + r) * wi->img->nx + bx->bx0 + c;
                    double v = f * ws->arena[(size_t)r * bx->bw + c];
                    ws->mx[io] += v;
                    if (ws->w[io] > 0) ws->dp[io] -= v;
                }
        }
    }
    /* ---- groups: union-find over touching scene boxes of fitted sources */
    GROW(ws->uf, ws->cap_uf, nsrc + 1);
    GROW(ws->tmpi, ws->cap_tmpi, nsrc + 1);
    for (int k = 0; k < nsrc; k++) ws->uf[k] = k;
    for (int a = 0; a < nsrc; a++) {
        const wsrc *sa = &ws->s[a];
        if (sa->role == SP_ROLE_FIXED || sa->nodata) continue;
        for (int b = a + 1; b < nsrc; b++) {
            const wsrc *sb = &ws->s[b];
            if (sb->role == SP_ROLE_FIXED || sb->nodata) continue;
            double lim = sa->R + sb->R + 1.0;
            if (fabs(sa->p0[P_X] - sb->p0[P_X]) < lim && fabs(sa->p0[P_Y] - sb->p0[P_Y]) < lim) {
                int ra = find(ws->uf, a), rb = find(ws->uf, b);
                if (ra != rb) ws->uf[ra] = rb;
            }
        }
    }
    /* components (linear solves, sky, SNR, flux errors) in gr[0, ncomp);
     * chunks (nonlinear LM) in gr[ncomp, ncomp + nchk): a component no larger
     * than max_group is its own single chunk */
    int ncomp = 0, nchk = 0, nmem = 0, maxg = o->max_group > 0 ? o->max_group : 40;
    GROW(ws->gmem, ws->cap_gmem, 2 * (size_t)nsrc + 1);
    GROW(ws->gr, ws->cap_gr, 2 * (size_t)nsrc + 2);
    {
        int *root = ws->tmpi;
        for (int k = 0; k < nsrc; k++) {
            const wsrc *s = &ws->s[k];
            root[k] = (s->role == SP_ROLE_FIXED || s->nodata) ? -1 : find(ws->uf, k);
        }
        for (int r = 0; r < nsrc; r++) {
            if (find(ws->uf, r) != r) continue;
            int start = nmem;
            for (int k = 0; k < nsrc; k++)
                if (root[k] == r) ws->gmem[nmem++] = k;
            if (nmem == start) continue;
            wgroup *G = &ws->gr[ncomp++];
            memset(G, 0, sizeof *G);
            G->start = start;
            G->n = nmem - start;
        }
    }
    wgroup *comps = ws->gr, *chunks = ws->gr + ncomp;
    /* pairs of overlapping boxes within each component (local indices) */
    size_t npairs = 0;
    {
        size_t np = 0;
        for (int gi = 0; gi < ncomp; gi++) {
            wgroup *G = &ws->gr[gi];
            G->pstart = (int)np;
            for (int l1 = 0; l1 < G->n; l1++)
                for (int l2 = l1 + 1; l2 < G->n; l2++) {
                    const wsrc *a = &ws->s[ws->gmem[G->start + l1]], *b = &ws->s[ws->gmem[G->start + l2]];
                    double lim = a->R + b->R + 1.0;
                    if (fabs(a->p0[P_X] - b->p0[P_X]) < lim && fabs(a->p0[P_Y] - b->p0[P_Y]) < lim) {
                        GROW(ws->pairs, ws->cap_pairs, 2 * (np + 1));
                        ws->pairs[2 * np] = l1;
                        ws->pairs[2 * np + 1] = l2;
                        np++;
                    }
                }
            G->npair = (int)np - G->pstart;
            for (int l = 0; l < G->n; l++) ws->s[ws->gmem[G->start + l]].group = gi;
        }
        npairs = np;
        GROW(ws->aoff, ws->cap_aoff, nsrc + 1);
        GROW(ws->mptr, ws->cap_mptr, nsrc + 1);
    }
    int any_split = 0, maxgs = 0;
    for (int gi = 0; gi < ncomp; gi++) {
        comps[gi].split = comps[gi].n > maxg;
        any_split |= comps[gi].split;
        if (comps[gi].n > maxgs) maxgs = comps[gi].n;
    }
    int model_w = 0;
    for (int i = 0; i < nimg; i++) model_w |= ws->im[i].img->poisson_k > 0;
    const int keep_mf = any_split || o->fit_sky || model_w || any_auto;
    rc.use_mf = any_split;
    if (!keep_mf) {
        /* independent components: the per-component pipeline */
        for (int gi = 0; gi < ncomp; gi++) {
            wgroup *G = &comps[gi];
            SP_TRY(fast_group(ws, &rc, G));
            wgroup *C = &chunks[nchk++];
            *C = *G;
            for (int l = 0; l < G->n; l++) ws->s[ws->gmem[G->start + l]].chunk = nchk - 1;
        }
        set_stage_free(ws, nsrc, 3);
        goto final_model;
    }
    for (int gi = 0; gi < ncomp; gi++) SP_TRY(group_to_mf(ws, &rc, &comps[gi], +1.0));
    /* model weights from the initial values */
    if (model_w) reweight(ws, &rc, o->fit_sky ? Ssky : NULL);
    /* ---- stage 1: fluxes of whole components (always: it also gives the SNR
     * that decides which geometry is free); the sky alternates with them */
    if (rc.cost) tc = sp_thread_cputime();
    for (int gi = 0; gi < ncomp; gi++) {
        wgroup *G = &comps[gi];
        if (keep_mf) SP_TRY(group_to_mf(ws, &rc, G, -1.0));
        SP_TRY(fit_group_stage(ws, &rc, G, o->staged ? 0 : -1, 1, 0));
        if (keep_mf) SP_TRY(group_to_mf(ws, &rc, G, +1.0));
        cost_add(&rc, SP_FIT_COST_FLUX, group_kind(ws, G), &tc);
    }
    if (model_w) {
        /* weights from the stage-1 fluxes, and the fluxes again with them */
        SP_TRY(refit_model_weights(ws, &rc, comps, ncomp, o->fit_sky ? Ssky : NULL));
    }
    if (o->fit_sky) SP_TRY(o->sky_joint ? sky_joint(ws, &rc, comps, ncomp, sky) : sky_alternate(ws, &rc, comps, ncomp, sky, 3));
    {
        gacc *a = &ws->acc[0];
        for (int gi = 0; gi < ncomp; gi++) {
            wgroup *G = &comps[gi];
            for (int l = 0; l < G->n; l++) ws->s[ws->gmem[G->start + l]].freemask = 0;
            int save = rc.use_mf;
            if (keep_mf) {
                SP_TRY(group_to_mf(ws, &rc, G, -1.0));
                rc.use_mf = 1;
            }
            SP_TRY(group_eval(ws, &rc, G, 0, a, 0));
            rc.use_mf = save;
            if (keep_mf) SP_TRY(group_to_mf(ws, &rc, G, +1.0));
            snr_holds(ws, G, a, nb, o);
            SP_TRY(make_chunks(ws, G, a, maxg, &nmem, ncomp, &nchk));
        }
    }
    /* pairs of the chunks that are proper parts of a component */
    {
        size_t np = npairs;
        for (int gi = 0; gi < nchk; gi++) {
            wgroup *G = &chunks[gi];
            for (int l = 0; l < G->n; l++) ws->s[ws->gmem[G->start + l]].chunk = gi;
            if (!G->split) { /* the whole component: same pairs */
                const wgroup *C = &comps[ws->s[ws->gmem[G->start]].group];
                G->pstart = C->pstart;
                G->npair = C->npair;
                continue;
            }
            G->pstart = (int)np;
            for (int l1 = 0; l1 < G->n; l1++)
                for (int l2 = l1 + 1; l2 < G->n; l2++) {
                    const wsrc *a = &ws->s[ws->gmem[G->start + l1]], *b = &ws->s[ws->gmem[G->start + l2]];
                    double lim = a->R + b->R + 1.0;
                    if (fabs(a->p0[P_X] - b->p0[P_X]) < lim && fabs(a->p0[P_Y] - b->p0[P_Y]) < lim) {
                        GROW(ws->pairs, ws->cap_pairs, 2 * (np + 1));
                        ws->pairs[2 * np] = l1;
                        ws->pairs[2 * np + 1] = l2;
                        np++;
                    }
                }
            G->npair = (int)np - G->pstart;
        }
    }
    /* ---- nonlinear stages on chunks: 2 (+ positions) and 3 (+ shapes), or
     * one stage with everything free; split components: block Gauss-Seidel,
     * three sweeps with a joint flux solve of the component between sweeps */
    const int nsweep = any_split ? 8 : 1;
    /* chunk adjacency (split chunks touching across their component): a
     * chunk whose last visit converged and none of whose neighbours moved
     * since has nothing to gain from another visit */
    int *adj_off = NULL, *adj = NULL;
    if (any_split) {
        GROW(ws->adjo, ws->cap_adjo, (size_t)nchk + 2);
        adj_off = ws->adjo;
        for (int gi = 0; gi <= nchk; gi++) adj_off[gi] = 0;
        for (int pass = 0; pass < 2; pass++) {
            if (pass == 1) {
                for (int gi = 0; gi < nchk; gi++) adj_off[gi + 1] += adj_off[gi];
                GROW(ws->adj, ws->cap_adj, (size_t)adj_off[nchk] + 1);
                adj = ws->adj;
                GROW(ws->tmpi, ws->cap_tmpi, (size_t)nchk + 1);
                for (int gi = 0; gi < nchk; gi++) ws->tmpi[gi] = adj_off[gi];
            }
            for (int ci = 0; ci < ncomp; ci++) {
                const wgroup *C = &comps[ci];
                if (!C->split) continue;
                for (int pi = 0; pi < C->npair; pi++) {
                    int a = ws->s[ws->gmem[C->start + ws->pairs[2 * (C->pstart + pi)]]].chunk;
                    int b = ws->s[ws->gmem[C->start + ws->pairs[2 * (C->pstart + pi) + 1]]].chunk;
                    if (a == b) continue;
                    if (pass == 0) {
                        adj_off[a + 1]++;
                        adj_off[b + 1]++;
                    } else {
                        adj[ws->tmpi[a]++] = b;
                        adj[ws->tmpi[b]++] = a;
                    }
                }
            }
        }
        for (int gi = 0; gi < nchk; gi++) {
            wgroup *G = &chunks[gi];
            G->visit[0] = G->visit[1] = -1;
            G->conv[0] = G->conv[1] = 0;
            G->moved = -1;
        }
    }
    long stamp = 0;
    for (int sw = 0; sw < nsweep; sw++) {
        double gain = 0.0;
        int nsplitchk = 0, ncapped = 0;
        /* inexact block solves while more sweeps may follow */
        const int last = sw == nsweep - 1;
        for (int gi = 0; gi < nchk; gi++)
            if (chunks[gi].split) chunks[gi].it_cap = last ? 0 : o->gs_iter_cap;
        for (int stg = o->staged ? 2 : 3; stg <= 3; stg++) {
            set_stage_free(ws, nsrc, stg);
            for (int gi = 0; gi < nchk; gi++) {
                wgroup *G = &chunks[gi];
                if (sw > 0 && !G->split) continue; /* whole components are done after one sweep */
                int nfree = 0, nnew = 0;
                for (int l = 0; l < G->n; l++) {
                    const wsrc *s = &ws->s[ws->gmem[G->start + l]];
                    nfree += __builtin_popcount(s->freemask);
                    nnew += __builtin_popcount(s->freemask & ~((1u << P_X) | (1u << P_Y)));
                }
                if (nfree == 0 || (o->staged && stg == 3 && nnew == 0)) continue;
                const int si = stg - 2;
                if (G->split && sw > 0 && G->conv[si] && o->gs_skip_static) {
                    int fresh = G->moved > G->visit[si];
                    for (int q = adj_off[gi]; q < adj_off[gi + 1] && !fresh; q++)
                        fresh = chunks[adj[q]].moved > G->visit[si];
                    if (!fresh) continue;
                }
                if (G->split && stg == (o->staged ? 2 : 3)) G->flags &= ~(NOTCONV | SP_FITF_MAXITER);
                if (rc.cost) tc = sp_thread_cputime();
                if (keep_mf) SP_TRY(group_to_mf(ws, &rc, G, -1.0));
                SP_TRY(fit_group_stage(ws, &rc, G, o->staged ? stg - 1 : 0, 0, 0));
                if (keep_mf) SP_TRY(group_to_mf(ws, &rc, G, +1.0));
                cost_add(&rc, stg == 2 ? SP_FIT_COST_POS : SP_FIT_COST_SHAPE, group_kind(ws, G), &tc);
                if (G->split) {
                    G->visit[si] = ++stamp;
                    G->conv[si] = !G->capped && !(G->flags & NOTCONV);
                    if (G->dlnp > 0) G->moved = G->visit[si];
                    ncapped += G->capped;
                    gain += G->dlnp;
                    nsplitchk += G->n;
                }
            }
        }
        if (!any_split) break;
        /* joint fluxes of each split component between sweeps */
        for (int gi = 0; gi < ncomp; gi++) {
            wgroup *G = &comps[gi];
            if (!G->split) continue;
            if (rc.cost) tc = sp_thread_cputime();
            SP_TRY(group_to_mf(ws, &rc, G, -1.0));
            SP_TRY(linear_keep_masks(ws, &rc, G));
            SP_TRY(group_to_mf(ws, &rc, G, +1.0));
            cost_add(&rc, SP_FIT_COST_SPLIT, group_kind(ws, G), &tc);
        }
        if (sw >= 1 && ncapped == 0 && gain < o->dlnp_stop * (nsplitchk > 0 ? nsplitchk : 1)) break;
    }
    if (any_auto) {
        SP_TRY(type_trials(ws, &rc, comps, ncomp, nmem, model_w));
        /* a galaxy that changed model: its chunk's geometry once more, all
         * free (its neighbours had adapted to the first model; without this a
         * blank-TYPE DEV came out 1-4% below the same galaxy typed DEV) */
        set_stage_free(ws, nsrc, 3);
        for (int gi = 0; gi < nchk; gi++) {
            wgroup *G = &chunks[gi];
            int any = 0;
            for (int l = 0; l < G->n && !any; l++) any = ws->s[ws->gmem[G->start + l]].retyped;
            if (!any) continue;
            if (rc.cost) tc = sp_thread_cputime();
            SP_TRY(group_to_mf(ws, &rc, G, -1.0));
            SP_TRY(fit_group_stage(ws, &rc, G, o->staged ? 2 : 0, 0, 0));
            SP_TRY(group_to_mf(ws, &rc, G, +1.0));
            cost_add(&rc, SP_FIT_COST_SHAPE, group_kind(ws, G), &tc);
        }
    }
    if (model_w) {
        /* weights at the fitted geometry; fluxes (and sky) re-solved with them */
        SP_TRY(refit_model_weights(ws, &rc, comps, ncomp, o->fit_sky ? Ssky : NULL));
    }
    if (o->fit_sky) SP_TRY(o->sky_joint ? sky_joint(ws, &rc, comps, ncomp, sky) : sky_alternate(ws, &rc, comps, ncomp, sky, 2));
    /* ---- errors at the solution (free set of the last stage): per chunk
     * (geometry marginalised); for split components the flux variance is the
     * component's joint linear one plus the chunk's geometry increment */
    set_stage_free(ws, nsrc, 3);
    GROW(ws->vlin, ws->cap_vlin, 2 * (size_t)nsrc * nb + 1);
    if (rc.cost) tc = sp_thread_cputime();
    for (int gi = 0; gi < nchk; gi++) {
        wgroup *G = &chunks[gi];
        if (keep_mf) SP_TRY(group_to_mf(ws, &rc, G, -1.0));
        int save = rc.use_mf;
        if (keep_mf) rc.use_mf = 1;
        SP_TRY(group_errors(ws, &rc, G, o->fit_sky ? Ssky : NULL, ws->vlin));
        rc.use_mf = save;
        if (keep_mf) SP_TRY(group_to_mf(ws, &rc, G, +1.0));
        cost_add(&rc, SP_FIT_COST_ERR, group_kind(ws, G), &tc);
    }
    if (any_split) {
        double *marg2 = ws->vlin + (size_t)nsrc * nb;
        for (size_t q = 0; q < (size_t)nsrc * nb; q++) marg2[q] = ws->ferr[q] * ws->ferr[q];
        for (int gi = 0; gi < ncomp; gi++) {
            wgroup *G = &comps[gi];
            if (!G->split) continue;
            /* joint linear errors of the whole component (geometry held) */
            if (rc.cost) tc = sp_thread_cputime();
            GROW(ws->tmpu, ws->cap_tmpu, G->n + 1);
            for (int l = 0; l < G->n; l++) {
                wsrc *s = &ws->s[ws->gmem[G->start + l]];
                ws->tmpu[l] = s->freemask;
                s->freemask = 0;
            }
            SP_TRY(group_to_mf(ws, &rc, G, -1.0));
            int save = rc.use_mf;
            rc.use_mf = 1;
            SP_TRY(group_errors(ws, &rc, G, o->fit_sky ? Ssky : NULL, NULL));
            rc.use_mf = save;
            SP_TRY(group_to_mf(ws, &rc, G, +1.0));
            for (int l = 0; l < G->n; l++) {
                wsrc *s = &ws->s[ws->gmem[G->start + l]];
                s->freemask = ws->tmpu[l];
                for (int b = 0; b < nb; b++) {
                    size_t fi = (size_t)s->idx * nb + b;
                    double inc = marg2[fi] - ws->vlin[fi];
                    double v = ws->ferr[fi] * ws->ferr[fi] + (inc > 0 && isfinite(inc) ? inc : 0.0);
                    if (isfinite(ws->ferr[fi])) ws->ferr[fi] = sqrt(v);
                }
            }
            cost_add(&rc, SP_FIT_COST_ERR, group_kind(ws, G), &tc);
        }
    }
final_model:
    /* ---- final model: own model per source and image, totals in mf */
    {
        size_t tot = 0;
        GROW(ws->fin_off, ws->cap_fin_off, (size_t)nsrc * nimg + 1);
        for (int k = 0; k < nsrc; k++)
            for (int i = 0; i < nimg; i++) {
                const fit_box *bx = &ws->box[(size_t)k * nimg + i];
                ws->fin_off[(size_t)k * nimg + i] = tot;
                tot += (size_t)bx->bw * bx->bh;
            }
        GROW(ws->fin, ws->cap_fin, tot + 1);
        for (int i = 0; i < nimg; i++) {
            const wimg *wi = &ws->im[i];
            memset(ws->mf + wi->off, 0, sizeof(double) * (size_t)wi->img->nx * wi->img->ny);
        }
        for (int k = 0; k < nsrc; k++) {
            wsrc *s = &ws->s[k];
            for (int i = 0; i < nimg; i++) {
                const wimg *wi = &ws->im[i];
                const fit_box *bx = &ws->box[(size_t)k * nimg + i];
                if (bx->bw == 0) continue;
                double *m = ws->fin + ws->fin_off[(size_t)k * nimg + i];
                const double *mc;
                SP_TRY(mc_get(ws, o, nimg, wi, s, i, &s->g, bx, &mc));
                double f = ws->flux[(size_t)k * nb + wi->slot];
                if (!isfinite(f)) f = 0.0;
                const size_t np = (size_t)bx->bw * bx->bh;
                for (size_t q = 0; q < np; q++) m[q] = f * mc[q];
                if (s->role == SP_ROLE_FIXED) continue; /* already in mx */
                double *mf = ws->mf + wi->off;
                for (int r = 0; r < bx->bh; r++)
                    for (int c = 0; c < bx->bw; c++)
                        mf[(size_t)(bx->by0 + r) * wi->img->nx + bx->bx0 + c] += m[(size_t)r * bx->bw + c];
            }
        }
    }
    /* ---- per-source outputs */
    for (int k = 0; k < nsrc; k++) {
        wsrc *s = &ws->s[k];
        sp_fit_result *r = &res[k];
        const int fitted = s->role != SP_ROLE_FIXED && !s->nodata;
        const wgroup *G = fitted ? &comps[s->group] : NULL, *Ck = fitted ? &chunks[s->chunk] : NULL;
        unsigned gflags = G ? ((G->flags | Ck->flags) & ~NOTCONV) : 0;
        int gconv = G ? !(Ck->flags & NOTCONV) && !(s->flags & NOTCONV) : 0; /* s: its galaxy trial */
        r->id = src[k].id;
        r->index = k;
        r->type = s->type;
        r->role = s->role;
        for (int b = 0; b < nb; b++) {
            const int band = rs->slot_band[b];
            size_t fi = (size_t)k * nb + b;
            double chi2 = 0.0, own = 0.0, oth = 0.0;
            int npx = 0;
            for (int i = 0; i < nimg; i++) {
                const wimg *wi = &ws->im[i];
                if (wi->slot != b) continue;
                if (wi->img->psf_fallback) ws->bflag[fi] |= SP_FITB_FALLBACK;
                const fit_box *bx = &ws->box[(size_t)k * nimg + i];
                if (bx->bw == 0) continue;
                const double *m = ws->fin + ws->fin_off[(size_t)k * nimg + i];
                const double *dp = ws->dp + wi->off, *w = ws->w + wi->off, *mf = ws->mf + wi->off,
                             *mx = ws->mx + wi->off;
                for (int rr = 0; rr < bx->bh; rr++)
                    for (int c = 0; c < bx->bw; c++) {
                        size_t io = (size_t)(bx->by0 + rr) * wi->img->nx + bx->bx0 + c;
                        double mo = m[(size_t)rr * bx->bw + c];
                        double tot = mf[io] + mx[io];
                        own += fabs(mo);
                        oth += fabs(tot - mo);
                        if (w[io] > 0) {
                            double rsd = dp[io] - mf[io];
                            chi2 += w[io] * rsd * rsd;
                            npx++;
                        }
                    }
            }
            int nfree_geo = __builtin_popcount(s->freemask);
            double dof = npx - 1.0 - (double)nfree_geo / nb;
            if (dof < 1.0) dof = 1.0;
            r->flux[band] = ws->flux[fi];
            r->flux_err[band] = ws->ferr[fi];
            r->flux_err_cond[band] = ws->ferrc[fi];
            r->npix[band] = npx;
            r->chi2dof[band] = npx > 0 ? chi2 / dof : NAN;
            r->blend[band] = own + oth > 0 ? oth / (own + oth) : 0.0;
            r->band_flags[band] = ws->bflag[fi];
            if (npx == 0) r->band_flags[band] |= SP_FITB_NODATA;
            if (s->role == SP_ROLE_FIXED) {
                r->flux[band] = src[k].flux[band];
                if (!isfinite(r->flux[band])) r->flux[band] = ws->flux[fi];
                r->flux_err[band] = r->flux_err_cond[band] = 0.0;
            } else if (s->nodata || (r->band_flags[band] & SP_FITB_NODATA)) {
                r->flux[band] = r->flux_err[band] = r->flux_err_cond[band] = NAN;
                r->band_flags[band] |= SP_FITB_NODATA;
                s->flags |= SP_FITF_NODATA_BAND;
            }
            if (!isfinite(r->flux[band]) && !(r->band_flags[band] & SP_FITB_NODATA)) {
                r->flux[band] = NAN;
                s->flags |= SP_FITF_NONFINITE;
            }
            if (isnan(r->chi2dof[band]) && npx > 0) s->flags |= SP_FITF_NONFINITE;
            if (npx == 0) r->chi2dof[band] = NAN;
        }
        /* geometry */
        double gx = s->g.p[P_X], gy = s->g.p[P_Y];
        double ex = (s->freemask & (1u << P_X)) ? s->perr[P_X] : 0.0;
        double ey = (s->freemask & (1u << P_Y)) ? s->perr[P_Y] : 0.0;
        double re = 0, q = 1, th = 0, ere = 0, eq = 0, eth = 0, n = 0, en = 0;
        if (s->type != SP_SRC_STAR) {
            fit_eta_to_shape(s->g.p[P_LNS], s->g.p[P_E1], s->g.p[P_E2], &re, &q, &th);
            n = s->g.p[P_N];
            if (s->freemask & (1u << P_LNS)) {
                double e = hypot(s->g.p[P_E1], s->g.p[P_E2]);
                double sl = s->perr[P_LNS], s1 = s->perr[P_E1], s2 = s->perr[P_E2];
                /* diagonal propagation (cross terms neglected; see docs/fitting.md) */
                double c1 = e > 1e-6 ? s->g.p[P_E1] / e : 0.0, c2 = e > 1e-6 ? s->g.p[P_E2] / e : 0.0;
                double se = sqrt(c1 * c1 * s1 * s1 + c2 * c2 * s2 * s2);
                ere = re * sqrt(sl * sl + 0.25 * se * se);
                eq = q * se;
                eth = e > 1e-6 ? 0.5 * sqrt(c2 * c2 * s1 * s1 + c1 * c1 * s2 * s2) / e : M_PI / 2;
                if (!(eth < M_PI / 2)) eth = M_PI / 2;
            }
            if (s->freemask & (1u << P_N)) en = s->perr[P_N];
            double lnre = log(re);
            if (lnre <= log(o->re_min) + 1e-6 || lnre >= log(o->re_max) - 1e-6 || q <= o->q_min * (1 + 1e-6) ||
                (s->type == SP_SRC_SERSIC && (n <= o->n_min + 1e-6 || n >= o->n_max - 1e-6)))
                if (s->role != SP_ROLE_FIXED && (s->freemask & (1u << P_LNS))) s->flags |= SP_FITF_SHAPE_BOUND;
            if (s->type != SP_SRC_SERSIC) n = s->type == SP_SRC_EXP ? 1.0 : 4.0;
        }
        if ((s->freemask & (1u << P_X)) &&
            (fabs(gx - s->p0[P_X]) >= o->max_shift - 1e-6 || fabs(gy - s->p0[P_Y]) >= o->max_shift - 1e-6))
            s->flags |= SP_FITF_POS_BOUND;
        if (fitted && s->type != SP_SRC_STAR && s->role != SP_ROLE_FIXED && !s->nodata &&
            box_trunc_frac(ws, o, nimg, nb, k, re) > SP_FIT_BOX_TRUNC_FRAC)
            s->flags |= SP_FITF_BOX_TRUNC;
        if (fitted && G->n > 1) {
            /* another fitted source of the component within 0.5 FWHM (the
             * local Fisher error cannot describe a swap of such a pair) */
            double fw = 0.0;
            for (int i = 0; i < nimg; i++) fw = fmax(fw, ws->im[i].pc->fwhm / ws->im[i].scale);
            for (int l = 0; l < G->n; l++) {
                const wsrc *t = &ws->s[ws->gmem[G->start + l]];
                if (t == s) continue;
                /* closer than 0.5 FWHM at the end or in the input positions */
                if (hypot(t->g.p[P_X] - s->g.p[P_X], t->g.p[P_Y] - s->g.p[P_Y]) < 0.5 * fw ||
                    hypot(t->p0[P_X] - s->p0[P_X], t->p0[P_Y] - s->p0[P_Y]) < 0.5 * fw) {
                    s->flags |= SP_FITF_UNRESOLVED;
                    break;
                }
            }
        }
        unsigned flags = (s->flags & ~NOTCONV) | gflags;
        if (G && gconv && !(gflags & (SP_FITF_MAXITER | SP_FITF_DIVERGED))) flags |= SP_FITF_CONVERGED;
        if (!isfinite(ex) || !isfinite(ey)) {
            flags |= SP_FITF_SINGULAR;
            if (!isfinite(ex)) ex = NAN;
            if (!isfinite(ey)) ey = NAN;
        }
        if (s->nodata) {
            ex = ey = NAN;
            flags &= ~SP_FITF_CONVERGED;
        }
        if (rs->indep) {
            /* per band geometry, combined by the caller */
            int band = rs->slot_band[0];
            double *bg = ws->bgeo + ((size_t)k * nbands_total + band) * 12;
            bg[0] = gx; bg[1] = gy; bg[2] = ex; bg[3] = ey;
            bg[4] = re; bg[5] = ere; bg[6] = q; bg[7] = eq; bg[8] = th; bg[9] = eth; bg[10] = n; bg[11] = en;
            r->flags |= flags & ~SP_FITF_CONVERGED;
            if (!(flags & SP_FITF_CONVERGED)) r->flags |= NOTCONV;
            for (int t = 0; t < 3; t++)
                if (s->iters[t] > r->iters[t]) r->iters[t] = s->iters[t];
        } else {
            r->x = gx; r->y = gy; r->x_err = ex; r->y_err = ey;
            r->re = re; r->re_err = ere; r->q = q; r->q_err = eq; r->theta = th; r->theta_err = eth;
            r->sersic_n = n; r->sersic_n_err = en;
            r->flags = flags;
            for (int t = 0; t < 3; t++) r->iters[t] = s->iters[t];
        }
        r->group = s->role == SP_ROLE_FIXED || s->nodata ? -1 : s->group;
        r->group_size = G ? G->n : 0;
        if (s->role == SP_ROLE_FIXED) {
            r->x = src[k].x;
            r->y = src[k].y;
        }
    }
    /* ---- patch statistics and model output */
    if (st) {
        for (int i = 0; i < nimg; i++) {
            const wimg *wi = &ws->im[i];
            const int band = rs->slot_band[wi->slot];
            const size_t np = (size_t)wi->img->nx * wi->img->ny;
            const double *dp = ws->dp + wi->off, *w = ws->w + wi->off, *mf = ws->mf + wi->off;
            /* local sums (st may alias nothing, but the compiler cannot know):
             * same order, same bits */
            double c2 = st->chi2[band];
            long npx = 0;
            for (size_t q = 0; q < np; q++)
                if (w[q] > 0) {
                    double rr = dp[q] - mf[q];
                    c2 += w[q] * rr * rr;
                    npx++;
                }
            st->chi2[band] = c2;
            st->npix[band] += npx;
        }
        for (int b = 0; b < nb; b++) {
            const int band = rs->slot_band[b];
            st->sky[band] = sky[b];
            st->sky_err[band] = o->fit_sky && Ssky[b] > 0 ? 1.0 / sqrt(Ssky[b]) : 0.0;
        }
        st->ngroups += ncomp;
        if (maxgs > st->max_group_size) st->max_group_size = maxgs;
        for (int gi = 0; gi < ncomp; gi++) {
            const wgroup *G = &comps[gi];
            int kind = group_kind(ws, G), nf = 0;
            for (int l = 0; l < G->n; l++) nf += ws->s[ws->gmem[G->start + l]].role != SP_ROLE_FIXED;
            st->srcband[kind] += (long)nf * nb;
            st->groups[kind]++;
        }
    }
    if (model) {
        for (int i = 0; i < nimg; i++) {
            const wimg *wi = &ws->im[i];
            float *out = model[rs->imgidx[i]];
            if (!out) continue;
            const size_t np = (size_t)wi->img->nx * wi->img->ny;
            for (size_t q = 0; q < np; q++) out[q] = (float)(ws->mf[wi->off + q] + ws->mx[wi->off + q] + sky[wi->slot]);
        }
    }
cleanup:
    return status;
}

/* ---------------------------------------------------------------- entry point */

static void result_init(sp_fit_result *r)
{
    memset(r, 0, sizeof *r);
    for (int b = 0; b < SP_FIT_MAX_BANDS; b++) {
        r->flux[b] = r->flux_err[b] = r->flux_err_cond[b] = NAN;
        r->chi2dof[b] = NAN;
    }
}

int sp_fit_patch(sp_fit_workspace *ws, const sp_fit_options *opt, const sp_fit_image *imgs, int nimg, int nbands,
                 const sp_fit_source *src, int nsrc, sp_fit_result *res, sp_fit_patch_stats *stats,
                 float *const *model)
{
    int status = SP_OK;
    double t0 = sp_wtime(), c0 = stats ? sp_thread_cputime() : 0.0;
    sp_fit_options od;
    if (!opt) {
        sp_fit_options_default(&od);
        opt = &od;
    }
    SP_CHECK(ws != NULL && (nsrc == 0 || (src != NULL && res != NULL)), SP_ERR_INTERNAL, "sp_fit_patch: NULL argument");
    SP_CHECK(nbands >= 1 && nbands <= SP_FIT_MAX_BANDS, SP_ERR_INPUT, "fit: %d bands (allowed 1..%d)", nbands,
             SP_FIT_MAX_BANDS);
    SP_CHECK(nimg >= 1 && imgs != NULL, SP_ERR_INPUT, "fit: no image");
    for (int i = 0; i < nimg; i++) {
        const sp_fit_image *im = &imgs[i];
        SP_CHECK(im->nx > 0 && im->ny > 0 && im->data && im->ivar && im->psf && im->psf->data, SP_ERR_INPUT,
                 "fit: image %d: empty or missing data/ivar/psf", i);
        SP_CHECK(im->band >= 0 && im->band < nbands, SP_ERR_INPUT, "fit: image %d: band %d outside 0..%d", i,
                 im->band, nbands - 1);
        double det = im->aff[0] * im->aff[4] - im->aff[1] * im->aff[3];
        SP_CHECK(isfinite(det) && fabs(det) > 1e-12 && isfinite(im->aff[2]) && isfinite(im->aff[5]), SP_ERR_INPUT,
                 "fit: image %d: singular or non-finite pixel transform", i);
        SP_CHECK(im->flux_scale > 0 && isfinite(im->flux_scale), SP_ERR_INPUT,
                 "fit: image %d: flux_scale %g must be positive (use sp_fit_image_aligned)", i, im->flux_scale);
    }
    for (int k = 0; k < nsrc; k++)
        SP_CHECK(src[k].type >= SP_SRC_STAR && src[k].type <= SP_SRC_SERSIC && src[k].role >= SP_ROLE_FIT_REPORT &&
                     src[k].role <= SP_ROLE_FIXED,
                 SP_ERR_INPUT, "fit: source %d (id %ld): unknown type %d or role %d", k, src[k].id, (int)src[k].type,
                 (int)src[k].role);
    if (opt->conv == SP_FIT_CONV_FFT) {
        int gal = 0;
        for (int k = 0; k < nsrc; k++) gal |= src[k].type != SP_SRC_STAR;
        SP_CHECK(!gal || fit_fft_inited(), SP_ERR_STATE,
                 "fit: the FFT convolution route needs sp_fit_init() (serially, before threads)");
    }
    if (stats) {
        memset(stats, 0, sizeof *stats);
        stats->nbands = nbands;
    }
    ws->renders = 0;
    for (int k = 0; k < nsrc; k++) result_init(&res[k]);
    if (nsrc == 0) goto cleanup;
    int bands_present[SP_FIT_MAX_BANDS] = {0};
    for (int i = 0; i < nimg; i++) bands_present[imgs[i].band] = 1;
    int idx[512], *imgidx = nimg <= 512 ? idx : NULL;
    SP_CHECK(imgidx != NULL, SP_ERR_INPUT, "fit: %d images in one patch (at most 512)", nimg);
    if (opt->multiband || nbands == 1) {
        int slot_band[SP_FIT_MAX_BANDS], nb = 0;
        for (int b = 0; b < nbands; b++)
            if (bands_present[b]) slot_band[nb++] = b;
        for (int i = 0; i < nimg; i++) imgidx[i] = i;
        runspec rs = {.imgidx = imgidx, .nimg = nimg, .slot_band = slot_band, .nb = nb, .indep = 0};
        SP_TRY(run_fit(ws, opt, imgs, &rs, src, nsrc, res, stats, model, nbands));
    } else {
        GROW(ws->bgeo, ws->cap_bgeo, (size_t)nsrc * nbands * 12);
        for (size_t q = 0; q < (size_t)nsrc * nbands * 12; q++) ws->bgeo[q] = NAN;
        for (int b = 0; b < nbands; b++) {
            if (!bands_present[b]) continue;
            int n = 0;
            for (int i = 0; i < nimg; i++)
                if (imgs[i].band == b) imgidx[n++] = i;
            int slot_band[1] = {b};
            runspec rs = {.imgidx = imgidx, .nimg = n, .slot_band = slot_band, .nb = 1, .indep = 1};
            SP_TRY(run_fit(ws, opt, imgs, &rs, src, nsrc, res, stats, model, nbands));
        }
        /* combine per-band geometry: inverse-variance mean of positions; shape
         * from the band with the highest flux SNR */
        for (int k = 0; k < nsrc; k++) {
            sp_fit_result *r = &res[k];
            double sx = 0, sy = 0, wx = 0, wy = 0, best = -1;
            int bestb = -1, anyb = -1;
            for (int b = 0; b < nbands; b++) {
                const double *bg = ws->bgeo + ((size_t)k * nbands + b) * 12;
                if (!isfinite(bg[0])) continue;
                if (anyb < 0) anyb = b;
                if (bg[2] > 0 && isfinite(bg[2])) {
                    sx += bg[0] / (bg[2] * bg[2]);
                    wx += 1.0 / (bg[2] * bg[2]);
                }
                if (bg[3] > 0 && isfinite(bg[3])) {
                    sy += bg[1] / (bg[3] * bg[3]);
                    wy += 1.0 / (bg[3] * bg[3]);
                }
                double snr = r->flux_err[b] > 0 ? fabs(r->flux[b]) / r->flux_err[b] : 0;
                if (isfinite(snr) && snr > best) {
                    best = snr;
                    bestb = b;
                }
            }
            if (bestb < 0) bestb = anyb;
            if (bestb < 0) continue;
            const double *bg = ws->bgeo + ((size_t)k * nbands + bestb) * 12;
            r->x = wx > 0 ? sx / wx : bg[0];
            r->y = wy > 0 ? sy / wy : bg[1];
            r->x_err = wx > 0 ? 1.0 / sqrt(wx) : bg[2];
            r->y_err = wy > 0 ? 1.0 / sqrt(wy) : bg[3];
            r->re = bg[4]; r->re_err = bg[5]; r->q = bg[6]; r->q_err = bg[7];
            r->theta = bg[8]; r->theta_err = bg[9]; r->sersic_n = bg[10]; r->sersic_n_err = bg[11];
            int conv = !(r->flags & NOTCONV) && !(r->flags & (SP_FITF_MAXITER | SP_FITF_DIVERGED | SP_FITF_NODATA));
            r->flags &= ~NOTCONV;
            if (conv && r->role != SP_ROLE_FIXED) r->flags |= SP_FITF_CONVERGED;
            if (r->role == SP_ROLE_FIXED) {
                r->x = src[k].x;
                r->y = src[k].y;
            }
        }
    }
    if (stats) {
        for (int b = 0; b < nbands; b++)
            stats->rms[b] = stats->npix[b] > 0 ? sqrt(stats->chi2[b] / stats->npix[b]) : 0.0;
        for (int k = 0; k < nsrc; k++) {
            if (src[k].role == SP_ROLE_FIXED) stats->nfixed++;
            else stats->nfit++;
        }
        stats->renders = ws->renders;
    }
cleanup:
    if (stats) {
        stats->seconds = sp_wtime() - t0;
        stats->cpu_total = sp_thread_cputime() - c0;
        double staged = 0.0;
        for (int q = 0; q < SP_FIT_NCOST; q++) staged += stats->cpu_stage[q][0] + stats->cpu_stage[q][1];
        stats->cpu_patch = stats->cpu_total > staged ? stats->cpu_total - staged : 0.0;
    }
    return status;
}

int sp_fit_render_source(sp_fit_workspace *ws, const sp_fit_options *opt, const sp_fit_image *img,
                         const sp_fit_source *s, double *out)
{
    int status = SP_OK;
    sp_fit_options od;
    if (!opt) {
        sp_fit_options_default(&od);
        opt = &od;
    }
    SP_CHECK(ws && img && s && out && img->psf, SP_ERR_INTERNAL, "sp_fit_render_source: NULL argument");
    SP_CHECK(opt->conv != SP_FIT_CONV_FFT || s->type == SP_SRC_STAR || fit_fft_inited(), SP_ERR_STATE,
             "fit: the FFT convolution route needs sp_fit_init()");
    psf_cache_entry *pc = NULL;
    SP_TRY(cache_get(ws, img->psf, s->type != SP_SRC_STAR && opt->conv == SP_FIT_CONV_GMIX, opt->psf_gmix_k, &pc));
    fit_geom g;
    memset(&g, 0, sizeof g);
    g.type = s->type;
    g.p[P_X] = s->x;
    g.p[P_Y] = s->y;
    if (s->type != SP_SRC_STAR) {
        fit_shape_to_eta(s->re, s->q, s->theta, &g.p[P_LNS], &g.p[P_E1], &g.p[P_E2]);
        g.p[P_N] = s->sersic_n;
        fit_gal_profile(s->type, s->sersic_n, opt->gal_profiles, &g.prof);
    }
    fit_box b = {0, 0, img->nx, img->ny};
    double *const nod[P_MAX] = {0};
    wimg wi = {.img = img, .slot = 0, .off = 0, .pc = pc, .sigma = 1, .scale = 1};
    SP_TRY(render_one(ws, opt, &wi, &g, &b, out, nod));
cleanup:
    return status;
}

/* ---------------------------------------------------------------- memory accounting */

/* Bytes held by a workspace's arrays (capacities, not what the last patch
 * used): what the planner's per-thread term describes (sp_plan_cell_memory). */
size_t sp_fit_workspace_bytes(const sp_fit_workspace *w)
{
    if (!w) return 0;
    size_t b = sizeof *w;
#define WSB(ptr, capv) b += (ptr) ? (size_t)(capv) * sizeof(*(ptr)) : 0
    WSB(w->dp, w->cap_pix);
    WSB(w->w, w->cap_pix);
    WSB(w->mf, w->cap_pix);
    WSB(w->mx, w->cap_pix);
    WSB(w->vb, w->cap_pix);
    WSB(w->s, w->cap_s);
    WSB(w->box, w->cap_box);
    WSB(w->flux, w->cap_flux);
    WSB(w->ferr, w->cap_bflag);
    WSB(w->ferrc, w->cap_bflag);
    WSB(w->bflag, w->cap_bflag);
    WSB(w->im, w->cap_im);
    WSB(w->gr, w->cap_gr);
    WSB(w->adjo, w->cap_adjo);
    WSB(w->adj, w->cap_adj);
    WSB(w->mptr, w->cap_mptr);
    WSB(w->gmem, w->cap_gmem);
    WSB(w->uf, w->cap_uf);
    WSB(w->tmpi, w->cap_tmpi);
    WSB(w->pairs, w->cap_pairs);
    WSB(w->th_src, w->cap_thsrc);
    WSB(w->th_par, w->cap_thpar);
    WSB(w->th_off, w->cap_th);
    WSB(w->nf, w->cap_nf);
    WSB(w->arena, w->cap_arena);
    WSB(w->aoff, w->cap_aoff);
    WSB(w->la, w->cap_la);
    for (int k = 0; k < 2; k++) WSB(w->acc[k].mem, w->acc[k].cap);
    WSB(w->fin, w->cap_fin);
    WSB(w->fin_off, w->cap_fin_off);
    WSB(w->tmp, w->cap_tmp);
    WSB(w->vlin, w->cap_vlin);
    WSB(w->skyuv, w->cap_skyuv);
    WSB(w->tmpu, w->cap_tmpu);
    WSB(w->mixscr, w->cap_mixscr);
    WSB(w->bgeo, w->cap_bgeo);
    WSB(w->mc, w->cap_mc);
    WSB(w->mc_off, w->cap_mc_off);
    WSB(w->mck, w->cap_mck);
#undef WSB
    for (int i = 0; i < NCACHE; i++) {
        const psf_cache_entry *e = &w->cache[i];
        if (e->prof) b += (size_t)e->nprof * sizeof *e->prof;
        /* the spectrum is L x L complex and the keep mask L x L bytes; the entry's PSF may
         * be gone (the cache matches by address and hash), so L comes from the mask */
        if (e->fft_spec && e->fft_keep) b += malloc_usable_size(e->fft_keep) * (2 * sizeof(double) + 1);
    }
    if (w->fft.spec) b += w->fft.cap_spec * 2 * sizeof(double);
    if (w->fft.real) b += w->fft.cap_real * sizeof(double);
    return b;
}

/* Doubles of one group accumulator (acc_prepare: D, L n x n, y, c, f n, B nth x n,
 * A nth x nth, z, cz nth, per band). */
size_t sp_fit_group_doubles(int n, int nth, int nbands)
{
    if (n < 0) n = 0;
    if (nth < 0) nth = 0;
    if (nbands < 1) nbands = 1;
    return (size_t)nbands * ((size_t)n * n * 2 + (size_t)n * 3 + (size_t)nth * n + (size_t)nth * nth + (size_t)nth * 2);
}

/* The sizes (elements) a reservation gives each array; sp_fit_workspace_reserve
 * allocates exactly these and sp_fit_reserve_bytes adds them up, so the two agree. */
typedef struct {
    size_t pix, src, srcb, srci, mc, fin, arena, acc, la, tmp;
} reserve_sizes;

static void reserve_sizes_of(const sp_fit_reserve *r, reserve_sizes *z)
{
    memset(z, 0, sizeof *z);
    int nb = r->nbands > 0 ? r->nbands : 1, nimg = r->nimg > 0 ? r->nimg : nb;
    size_t n = r->nsrc > 0 ? (size_t)r->nsrc : 0;
    int gn = r->group_n > 0 ? r->group_n : 0, gth = r->group_nth > 0 ? r->group_nth : 0;
    int cn = r->comp_n > gn ? r->comp_n : gn;
    z->pix = r->pixels;
    z->src = n;
    z->srcb = n * nb;
    z->srci = n * nimg;
    z->mc = 2 * r->model_pixels + 1;          /* two slots per source and image */
    z->fin = r->box_pixels + 1;               /* the final model, one box per source and image */
    /* the arena holds one group's boxes with their derivative planes */
    z->arena = n > 0 ? (size_t)((double)r->model_pixels / nimg * ((double)gn / n)) + 1 : 0;
    size_t a1 = sp_fit_group_doubles(gn, gth, nb), a2 = sp_fit_group_doubles(cn, 0, nb);
    z->acc = a1 > a2 ? a1 : a2;
    size_t ns = (size_t)cn + 1, th = (size_t)gth;
    z->la = 2 * ns * ns + 2 * th * ns + 16;
    z->tmp = 2 * th * th + 2 * th + 2 * ns * ns + ns * (th + 1) + 16;
    if (z->tmp < 8192) z->tmp = 8192;
}

/* Write one byte per page: the pages become resident now. (A memset to zero after
 * malloc would not do: the compiler may turn the pair into calloc, whose fresh
 * pages stay unmapped until used.) */
static void touch_pages(void *p, size_t n)
{
    volatile char *c = p;
    for (size_t k = 0; k < n; k += 4096) c[k] = 0;
    if (n) c[n - 1] = 0;
}

static int reserve_(void **p, size_t *cap, size_t n, size_t el)
{
    if (n == 0) return SP_OK;
    if (n > *cap || !*p) {
        void *q = realloc(*p, n * el);
        if (!q) return SP_FAIL(SP_ERR_NOMEM, "fit workspace: out of memory reserving %zu x %zu bytes", n, el);
        *p = q;
        *cap = n;
    }
    touch_pages(*p, n * el); /* resident from the start, as the planner counts it */
    return SP_OK;
}
#define RESERVE(ptr, capv, n) SP_TRY(reserve_((void **)&(ptr), &(capv), (n), sizeof(*(ptr))))

int sp_fit_workspace_reserve(sp_fit_workspace *ws, const sp_fit_reserve *r)
{
    int status = SP_OK;
    SP_CHECK(ws && r, SP_ERR_INTERNAL, "sp_fit_workspace_reserve: NULL argument");
    reserve_sizes z;
    reserve_sizes_of(r, &z);
    if (z.pix > ws->cap_pix || !ws->dp) {
        /* the per-pixel arrays share cap_pix */
        size_t c = ws->cap_pix;
        RESERVE(ws->dp, c, z.pix);
        c = ws->cap_pix;
        RESERVE(ws->w, c, z.pix);
        c = ws->cap_pix;
        RESERVE(ws->mf, c, z.pix);
        c = ws->cap_pix;
        RESERVE(ws->mx, c, z.pix);
        c = ws->cap_pix;
        RESERVE(ws->vb, c, z.pix);
        ws->cap_pix = z.pix;
    }
    RESERVE(ws->s, ws->cap_s, z.src);
    RESERVE(ws->flux, ws->cap_flux, z.srcb);
    if (z.srcb > ws->cap_bflag || !ws->ferr) {
        /* ferr, ferrc and bflag share cap_bflag */
        size_t c = ws->cap_bflag;
        RESERVE(ws->ferr, c, z.srcb);
        c = ws->cap_bflag;
        RESERVE(ws->ferrc, c, z.srcb);
        c = ws->cap_bflag;
        RESERVE(ws->bflag, c, z.srcb);
        ws->cap_bflag = z.srcb;
    }
    RESERVE(ws->box, ws->cap_box, z.srci);
    RESERVE(ws->mc_off, ws->cap_mc_off, z.srci + 1);
    RESERVE(ws->mck, ws->cap_mck, 2 * z.srci + 2);
    RESERVE(ws->fin_off, ws->cap_fin_off, z.srci + 1);
    RESERVE(ws->mc, ws->cap_mc, z.mc);
    RESERVE(ws->fin, ws->cap_fin, z.fin);
    RESERVE(ws->arena, ws->cap_arena, z.arena);
    RESERVE(ws->la, ws->cap_la, z.la);
    RESERVE(ws->tmp, ws->cap_tmp, z.tmp);
    RESERVE(ws->vlin, ws->cap_vlin, 2 * z.srcb + 1);
    RESERVE(ws->gmem, ws->cap_gmem, 2 * z.src + 1);
    RESERVE(ws->gr, ws->cap_gr, 2 * z.src + 2);
    RESERVE(ws->uf, ws->cap_uf, z.src + 1);
    RESERVE(ws->tmpi, ws->cap_tmpi, z.src + 1);
    RESERVE(ws->aoff, ws->cap_aoff, z.src + 1);
    RESERVE(ws->mptr, ws->cap_mptr, z.src + 1);
    for (int k = 0; k < 2; k++)
        if (z.acc > ws->acc[k].cap || !ws->acc[k].mem) {
            free(ws->acc[k].mem);
            ws->acc[k].nod = NULL;
            ws->acc[k].cap = 0;
            /* acc_prepare's layout: need + 16 doubles */
            ws->acc[k].mem = malloc((z.acc + 16) * sizeof(double));
            SP_CHECK(ws->acc[k].mem, SP_ERR_NOMEM, "fit workspace: out of memory reserving a group of %d sources",
                     r->group_n);
            touch_pages(ws->acc[k].mem, (z.acc + 16) * sizeof(double));
            ws->acc[k].cap = z.acc;
        }
cleanup:
    return status;
}
#undef RESERVE

size_t sp_fit_reserve_bytes(const sp_fit_reserve *r)
{
    if (!r) return 0;
    reserve_sizes z;
    reserve_sizes_of(r, &z);
    size_t b = sizeof(sp_fit_workspace);
    b += 5 * z.pix * sizeof(double);
    b += z.src * sizeof(wsrc) + z.srcb * (3 * sizeof(double) + 1) + z.srci * sizeof(fit_box);
    b += (2 * z.srci + 2) * sizeof(size_t) + (2 * z.srci + 2) * sizeof(mc_key);
    b += (z.mc + z.fin + z.arena + z.la + z.tmp + 2 * z.srcb + 1) * sizeof(double);
    b += (2 * z.src + 2) * sizeof(wgroup) + (4 * z.src + 4) * sizeof(int) + (z.src + 1) * (sizeof(size_t) + sizeof(double *));
    b += 2 * (z.acc + 16) * sizeof(double);
    return b;
}

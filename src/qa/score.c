/* score.c — `surveyproc score`: a store's photometry against the simulator's truth
 * (sp_score.h; definitions in docs/scoring.md). Serial, OpenMP for the bounds. */
#include "surveyproc/sp_score.h"
#include "surveyproc/sp_config.h"
#include "surveyproc/sp_csv.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_fits.h"
#include "surveyproc/sp_h5.h"
#include "surveyproc/sp_sim.h"
#include "surveyproc/sp_zp.h"

#include <math.h>
#include <omp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

const char *const sp_score_type_names[SP_SCORE_NTYPE] = {"STAR", "EXP", "DEV", "GAL", "ALL"};

/* FIT_FLAGS bits that make a fit unusable (docs/outputs.md): singular, diverged, a band or
 * every band without pixels, a non-finite value replaced. */
#define FIT_BAD_FLAGS (4 | 8 | 64 | 128 | 1024)
#define MAXFR 256

void sp_score_opts_default(sp_score_opts *o)
{
    memset(o, 0, sizeof *o);
    o->flux = SP_SCORE_FLUX_FIT;
    o->mag_lo = 14;
    o->mag_hi = 22;
    o->mag_step = 1;
    o->snr_lo = 20;
    o->snr_hi = 500;
    o->gal_snr_min = 50;
    o->gal_re_lo = 1;
    o->gal_re_hi = 6;
    o->crowd_radius = 10;
    o->crowd_fraction = 0.1;
    o->aper_r = -1; /* auto: the run's patch_run.r_ap */
}


void sp_score_require_none(sp_score_require *q)
{
    q->pull_std_lo = q->pull_std_hi = q->scatter_crlb_max = q->bias_max = NAN;
    q->galaxy_bias_max = q->match_rate_min = q->pos_crlb_max = q->zp_error_max = NAN;
}

void sp_score_result_free(sp_score_result *r)
{
    if (!r) return;
    for (int b = 0; b < r->nbands && r->band; b++) {
        free(r->band[b].bin);
        free(r->band[b].crowd_bin);
    }
    free(r->band);
    free(r->store);
    free(r->truth);
    free(r->notes);
    memset(r, 0, sizeof *r);
}

static void note(sp_score_result *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void note(sp_score_result *r, const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    size_t old = r->notes ? strlen(r->notes) : 0, add = strlen(line) + 2;
    char *p = realloc(r->notes, old + add);
    if (!p) return;
    r->notes = p;
    snprintf(p + old, add, "%s\n", line);
}

/* patch_run.r_ap of the run that wrote the store (its /provenance config); 0 if unknown. */
static double run_aper_radius(sp_h5 *h, sp_score_result *r)
{
    char *text = NULL;
    sp_config cfg;
    double rap = 0;
    int ex = 0;
    memset(&cfg, 0, sizeof cfg);
    if (sp_h5_attr_exists(h, "/provenance", "config", &ex) == SP_OK && ex &&
        sp_h5_attr_get_str(h, "/provenance", "config", &text) == SP_OK &&
        sp_config_load_string(text, "/provenance config", NULL, &cfg) == SP_OK)
        rap = cfg.patch_run.r_ap;
    else
        note(r, "could not read patch_run.r_ap from /provenance (%s): aperture columns not corrected; "
                "give --aper-correct R", sp_err_msg());
    sp_err_clear();
    sp_config_free(&cfg);
    free(text);
    return rap;
}

static char *dupstr(const char *s)
{
    char *p = malloc(strlen(s) + 1);
    if (p) strcpy(p, s);
    return p;
}

/* ---- per-source record of one band ------------------------------------------------ */

typedef struct {
    int type;        /* SP_SCORE_STAR / EXP / DEV */
    unsigned tflags; /* truth flags */
    long row;        /* /catalog row, -1 unmatched */
    double ft, mag;  /* true flux (store units), true AB mag */
    double f, e;     /* measured flux and error */
    int flagged;
    double dx, dy;   /* fitted - true position (NaN: no fit) */
    sp_score_crlb cr;/* NaN unless an isolated star with the true PSF available */
} rec;

/* Truth flags that keep a crowded star out of the crowded sample: saturated, bad pixels, edge,
 * forced bright (what is measured there is not the crowding). */
#define CROWD_SKIP_FLAGS (1u | 2u | 4u | 32u)
static int crowd_ok(const rec *s, int crowded) { return crowded && !(s->tflags & CROWD_SKIP_FLAGS); }

static int rec_measured(const rec *s) { return s->row >= 0 && isfinite(s->f) && isfinite(s->e) && s->e > 0; }
static int rec_used(const rec *s) { return rec_measured(s) && !s->flagged; }
static int type_in(int t, int group)
{
    return group == SP_SCORE_ALL || t == group || (group == SP_SCORE_GAL && (t == SP_SCORE_EXP || t == SP_SCORE_DEV));
}

static void stats_clear(sp_score_stats *st, double lo, double hi)
{
    memset(st, 0, sizeof *st);
    st->mag_lo = lo;
    st->mag_hi = hi;
    st->bias = st->scatter = st->pull_median = st->pull_std = st->pos_rms = NAN;
    st->scatter_over_crlb_known = st->scatter_over_crlb_free = st->pos_over_crlb = st->snr_median = NAN;
}

/* Figures over the records with sel[i] != 0; crlb: also the bound ratios. work: 2n doubles. */
static void group_stats(const rec *s, const unsigned char *sel, long n, int crlb, double *work, sp_score_stats *st)
{
    long nu = 0, np = 0;
    double pos2 = 0;
    for (long i = 0; i < n; i++) {
        if (!sel[i]) continue;
        st->n_truth++;
        if (s[i].row < 0) continue;
        st->n_matched++;
        if (rec_measured(&s[i])) st->n_measured++;
        if (s[i].flagged) st->n_flagged++;
        if (!rec_used(&s[i])) continue;
        nu++;
        if (isfinite(s[i].dx) && isfinite(s[i].dy)) {
            np++;
            pos2 += s[i].dx * s[i].dx + s[i].dy * s[i].dy;
        }
    }
    st->n_used = nu;
    st->n_pos = np;
    if (np > 0) st->pos_rms = sqrt(pos2 / (double)np);
    if (nu == 0) return;
#define FILL(expr)                                                                                                 \
    do {                                                                                                           \
        long m_ = 0;                                                                                               \
        for (long i = 0; i < n; i++)                                                                               \
            if (sel[i] && rec_used(&s[i])) work[m_++] = (expr);                                                    \
        k = m_;                                                                                                    \
    } while (0)
    long k;
    FILL(s[i].f / s[i].ft - 1);
    st->bias = sp_score_median(work, k);
    FILL((s[i].f - s[i].ft) / s[i].ft);
    st->scatter = sp_score_rsigma(work, k);
    FILL((s[i].f - s[i].ft) / s[i].e);
    st->pull_median = sp_score_median(work, k);
    FILL((s[i].f - s[i].ft) / s[i].e);
    st->pull_std = sp_score_rsigma(work, k);
    if (!crlb) return;
    FILL((s[i].f - s[i].ft) / s[i].cr.sig_f_known);
    st->n_crlb = 0;
    for (long i = 0; i < k; i++) st->n_crlb += isfinite(work[i]);
    st->scatter_over_crlb_known = sp_score_rsigma(work, k);
    FILL((s[i].f - s[i].ft) / s[i].cr.sig_f_free);
    st->scatter_over_crlb_free = sp_score_rsigma(work, k);
    FILL(s[i].ft / s[i].cr.sig_f_known);
    st->snr_median = sp_score_median(work, k);
    long m = 0;
    for (long i = 0; i < n; i++)
        if (sel[i] && rec_used(&s[i])) {
            work[m++] = s[i].dx / s[i].cr.sig_x;
            work[m++] = s[i].dy / s[i].cr.sig_y;
        }
    st->pos_over_crlb = sp_score_rsigma(work, m);
#undef FILL
}

/* ---- inputs --------------------------------------------------------------------- */

typedef struct {
    long n;
    long *id;
    int *type;
    unsigned *flags;
    double *x, *y;
    double *re;   /* half-light radius (pix; NaN without the column) */
    double *flux; /* n * nbands, store units */
} truth_t;

static void truth_free(truth_t *t)
{
    free(t->id);
    free(t->type);
    free(t->flags);
    free(t->x);
    free(t->y);
    free(t->re);
    free(t->flux);
    memset(t, 0, sizeof *t);
}

static int truth_read(const char *path, char (*bands)[32], int nb, double zp_ref, truth_t *T)
{
    int status = SP_OK;
    sp_csv *t = NULL;
    double *col = NULL;
    memset(T, 0, sizeof *T);
    if (access(path, R_OK) != 0)
        return SP_FAIL(SP_ERR_IO, "%s: truth catalog not found or unreadable (give --truth DIR/truth.csv of "
                                  "`surveyproc simulate --out DIR`)", path);
    SP_TRY(sp_csv_read(path, &t));
    const char *need[] = {"id", "type", "x", "y", "flags"};
    int ci[5];
    for (int k = 0; k < 5; k++) {
        ci[k] = sp_csv_col(t, need[k]);
        SP_CHECK(ci[k] >= 0, SP_ERR_INPUT, "%s: truth catalog has no '%s' column (not a simulator truth.csv?)", path,
                 need[k]);
    }
    SP_CHECK(t->nrow > 0, SP_ERR_INPUT, "%s: truth catalog has no rows", path);
    long n = t->nrow;
    T->n = n;
    SP_ALLOC(T->id, n);
    SP_ALLOC(T->type, n);
    SP_ALLOC(T->flags, n);
    SP_ALLOC(T->x, n);
    SP_ALLOC(T->y, n);
    SP_ALLOC(T->re, n);
    SP_ALLOC(T->flux, (size_t)n * (nb > 0 ? nb : 1));
    SP_ALLOC(col, n);
    SP_TRY(sp_csv_col_double(t, ci[0], col));
    for (long i = 0; i < n; i++) {
        SP_CHECK(isfinite(col[i]) && col[i] == floor(col[i]), SP_ERR_INPUT, "%s:%ld: column id: '%s' is not an integer",
                 path, t->lines[i], sp_csv_cell(t, i, ci[0]));
        T->id[i] = (long)col[i];
    }
    SP_TRY(sp_csv_col_double(t, ci[4], col));
    for (long i = 0; i < n; i++) T->flags[i] = isfinite(col[i]) && col[i] > 0 ? (unsigned)col[i] : 0;
    SP_TRY(sp_csv_col_double(t, ci[2], T->x));
    SP_TRY(sp_csv_col_double(t, ci[3], T->y));
    {
        int cre = sp_csv_col(t, "re");
        if (cre >= 0) SP_TRY(sp_csv_col_double(t, cre, T->re));
        else
            for (long i = 0; i < n; i++) T->re[i] = NAN;
    }
    for (long i = 0; i < n; i++) {
        const char *ty = sp_csv_cell(t, i, ci[1]);
        if (!strcasecmp(ty, "STAR")) T->type[i] = SP_SCORE_STAR;
        else if (!strcasecmp(ty, "EXP")) T->type[i] = SP_SCORE_EXP;
        else if (!strcasecmp(ty, "DEV")) T->type[i] = SP_SCORE_DEV;
        else SP_CHECK(0, SP_ERR_INPUT, "%s:%ld: column type: '%s' is not STAR, EXP or DEV", path, t->lines[i], ty);
    }
    /* truth fluxes are in the zp_ref = 25 system; the store's unit is its own zp_ref */
    double conv = pow(10.0, 0.4 * (zp_ref - SP_SIM_ZP_REF));
    for (int b = 0; b < nb; b++) {
        char name[64];
        snprintf(name, sizeof name, "flux_%s", bands[b]);
        int c = sp_csv_col(t, name);
        SP_CHECK(c >= 0, SP_ERR_INPUT, "%s: truth catalog has no '%s' column, but the store has band %s", path, name,
                 bands[b]);
        SP_TRY(sp_csv_col_double(t, c, col));
        for (long i = 0; i < n; i++) T->flux[(size_t)i * nb + b] = col[i] * conv;
    }
cleanup:
    free(col);
    sp_csv_free(&t);
    if (status != SP_OK) truth_free(T);
    return status;
}

/* cnt[i] = truth sources within r of source i (itself not counted): a grid of r-sized buckets,
 * so O(n) for any density. */
static int neighbour_counts(const truth_t *T, double r, long *cnt)
{
    int status = SP_OK;
    long *head = NULL, *next = NULL;
    double x0 = INFINITY, y0 = INFINITY, x1 = -INFINITY, y1 = -INFINITY;
    for (long i = 0; i < T->n; i++) {
        cnt[i] = 0;
        if (!isfinite(T->x[i]) || !isfinite(T->y[i])) continue;
        x0 = fmin(x0, T->x[i]);
        x1 = fmax(x1, T->x[i]);
        y0 = fmin(y0, T->y[i]);
        y1 = fmax(y1, T->y[i]);
    }
    if (!(x1 >= x0) || !(r > 0)) return SP_OK;
    long gx = (long)((x1 - x0) / r) + 1, gy = (long)((y1 - y0) / r) + 1;
    SP_CHECK(gx * gy < 100000000L, SP_ERR_INPUT, "crowding radius %g pix is too small for a field of %.0f x %.0f pix", r,
             x1 - x0, y1 - y0);
    SP_ALLOC(head, gx * gy);
    SP_ALLOC(next, T->n);
    for (long k = 0; k < gx * gy; k++) head[k] = -1;
    for (long i = 0; i < T->n; i++) {
        next[i] = -1;
        if (!isfinite(T->x[i]) || !isfinite(T->y[i])) continue;
        long k = (long)((T->y[i] - y0) / r) * gx + (long)((T->x[i] - x0) / r);
        next[i] = head[k];
        head[k] = i;
    }
    for (long i = 0; i < T->n; i++) {
        if (!isfinite(T->x[i]) || !isfinite(T->y[i])) continue;
        long cx = (long)((T->x[i] - x0) / r), cy = (long)((T->y[i] - y0) / r);
        for (long v = cy - 1; v <= cy + 1; v++)
            for (long u = cx - 1; u <= cx + 1; u++) {
                if (u < 0 || v < 0 || u >= gx || v >= gy) continue;
                for (long j = head[v * gx + u]; j >= 0; j = next[j]) {
                    double dx = T->x[j] - T->x[i], dy = T->y[j] - T->y[i];
                    cnt[i] += j != i && dx * dx + dy * dy <= r * r;
                }
            }
    }
cleanup:
    free(head);
    free(next);
    return status;
}

/* Keep the truth sources whose id is an ID of path's /catalog (compacting T and crowded[]); *nkeep. */
static int store_ids_keep(const char *path, int nb, truth_t *T, unsigned char *crowded, long *nkeep)
{
    int status = SP_OK, idlen = 0;
    sp_h5 *h = NULL;
    sp_h5_table_info info = {0};
    char *ids = NULL;
    unsigned char *have = NULL;
    long idmax = 0;
    SP_TRY(sp_h5_open(path, 0, MPI_COMM_NULL, &h));
    SP_TRY(sp_h5_table_describe(h, "/catalog", &info));
    for (int c = 0; c < info.ncol; c++)
        if (!strcmp(info.cols[c].name, "ID") && info.cols[c].type == SP_H5_STR) idlen = info.cols[c].len;
    SP_CHECK(idlen > 0, SP_ERR_INPUT, "--ids-from %s: /catalog has no string column ID", path);
    for (long i = 0; i < T->n; i++)
        if (T->id[i] > idmax) idmax = T->id[i];
    SP_ALLOC(have, idmax + 1);
    SP_ALLOC(ids, (size_t)(info.nrows > 0 ? info.nrows : 1) * idlen);
    if (info.nrows > 0) SP_TRY(sp_h5_table_read_col_str(h, "/catalog", "ID", 0, info.nrows, ids, (size_t)idlen));
    for (long i = 0; i < info.nrows; i++) {
        char *end = NULL;
        const char *p = ids + (size_t)i * idlen;
        long v = strtol(p, &end, 10);
        if (p[0] && end != p && v >= 0 && v <= idmax) have[v] = 1;
    }
    long w = 0;
    for (long i = 0; i < T->n; i++) {
        if (T->id[i] < 0 || T->id[i] > idmax || !have[T->id[i]]) continue;
        T->id[w] = T->id[i];
        T->type[w] = T->type[i];
        T->flags[w] = T->flags[i];
        T->x[w] = T->x[i];
        T->y[w] = T->y[i];
        T->re[w] = T->re[i];
        for (int b = 0; b < nb; b++) T->flux[(size_t)w * nb + b] = T->flux[(size_t)i * nb + b]; /* w <= i */
        crowded[w] = crowded[i];
        w++;
    }
    T->n = w;
    *nkeep = w;
cleanup:
    sp_h5_table_info_free(&info);
    sp_h5_close(&h);
    free(ids);
    free(have);
    return status;
}

static int cmp_long(const void *a, const void *b)
{
    long x = *(const long *)a, y = *(const long *)b;
    return (x > y) - (x < y);
}

/* Folder of a file path ("." if none), into out. */
static void dirname_of(const char *path, char *out, size_t n)
{
    snprintf(out, n, "%s", path);
    char *s = strrchr(out, '/');
    if (!s) snprintf(out, n, ".");
    else if (s == out) out[1] = '\0';
    else *s = '\0';
}

typedef struct {
    int band;
    sp_score_noise nz;
    double zp_auto, zp_true;
} frame_t;

/* Frames of the simulation from DIR/image_list.txt and the images' headers. */
static int frames_read(const char *dir, char (*bands)[32], int nb, double zp_ref, frame_t *fr, int *nfr,
                       sp_score_result *r)
{
    int status = SP_OK;
    char path[4200], line[4096];
    FILE *f = NULL;
    sp_fits *ff = NULL;
    *nfr = 0;
    snprintf(path, sizeof path, "%s/image_list.txt", dir);
    f = fopen(path, "r");
    if (!f) {
        note(r, "%s not found: no frame noise model, so no Cramér–Rao bounds", path);
        return SP_OK;
    }
    while (fgets(line, sizeof line, f)) {
        char *s = line, *e;
        while (*s == ' ' || *s == '\t') s++;
        e = s + strlen(s);
        while (e > s && (e[-1] == '\n' || e[-1] == '\r' || e[-1] == ' ' || e[-1] == '\t')) *--e = '\0';
        if (!*s || *s == '#') continue;
        SP_CHECK(*nfr < MAXFR, SP_ERR_INPUT, "%s: more than %d frames", path, MAXFR);
        char img[8192];
        if (s[0] == '/') snprintf(img, sizeof img, "%s", s);
        else snprintf(img, sizeof img, "%s/%s", dir, s);
        char filt[72] = "";
        frame_t *w = &fr[*nfr];
        int found = 0;
        SP_TRY(sp_fits_open(img, &ff));
        SP_TRY(sp_fits_key_string(ff, "FILTER", 1, filt, sizeof filt, NULL));
        SP_TRY(sp_fits_key_double(ff, "ZP_AUTO", 1, &w->zp_auto, NULL));
        SP_TRY(sp_fits_key_double(ff, "SKYSIG", 1, &w->nz.skysig, NULL));
        SP_TRY(sp_fits_key_double(ff, "EGAIN", 1, &w->nz.egain, NULL));
        SP_TRY(sp_fits_key_double(ff, "ZP_TRUE", 0, &w->zp_true, &found));
        if (!found) w->zp_true = w->zp_auto;
        sp_fits_close(&ff);
        w->nz.scale = pow(10.0, -0.4 * (w->zp_auto - zp_ref));
        w->band = -1;
        for (int b = 0; b < nb; b++)
            if (!strcmp(bands[b], filt)) w->band = b;
        if (w->band < 0) note(r, "%s: FILTER %s is not a band of the store; frame ignored", img, filt);
        else (*nfr)++;
    }
cleanup:
    if (f) fclose(f);
    sp_fits_close(&ff);
    return status;
}

/* Column of /catalog as double; *have = 0 when the store lacks it. */
static int read_col(sp_h5 *h, const sp_h5_table_info *info, const char *name, long n, double *out, int required,
                    int *have)
{
    int k = -1;
    for (int c = 0; c < info->ncol; c++)
        if (!strcmp(info->cols[c].name, name)) k = c;
    if (have) *have = k >= 0;
    if (k < 0) {
        for (long i = 0; i < n; i++) out[i] = NAN;
        if (required)
            return SP_FAIL(SP_ERR_INPUT, "%s: /catalog has no column %s (`surveyproc export %s --list` lists them)",
                           sp_h5_path(h), name, sp_h5_path(h));
        return SP_OK;
    }
    return sp_h5_table_read_col_double(h, "/catalog", name, 0, n, out);
}

/* The true PSF of band b at (x, y) on a stamp centred on the nearest pixel, with its x/y
 * derivatives (central differences, h = 0.005 pix: the pixel-integrated profile is smooth in
 * the offset), clipped to the tile; bounds from the frames of the band. */
static int star_crlb(const sp_sim *sim, int b, double x, double y, double flux, const sp_score_noise *nz, int nnz,
                     double *buf, int size, sp_score_crlb *out)
{
    int status = SP_OK;
    sp_sim_psf p;
    const double h = 0.005;
    long npx = (long)size * size;
    double *P = buf, *Pxp = buf + npx, *Pxm = buf + 2 * npx, *Pyp = buf + 3 * npx, *Pym = buf + 4 * npx;
    double *dx = Pxp, *dy = Pyp;
    long cx = lround(x), cy = lround(y), half = (size - 1) / 2;
    double ox = x - (double)cx, oy = y - (double)cy;
    sp_sim_psf_params(sim, b, x, y, &p);
    SP_TRY(sp_sim_render_psf(&p, ox, oy, size, 1, P));
    SP_TRY(sp_sim_render_psf(&p, ox + h, oy, size, 1, Pxp));
    SP_TRY(sp_sim_render_psf(&p, ox - h, oy, size, 1, Pxm));
    SP_TRY(sp_sim_render_psf(&p, ox, oy + h, size, 1, Pyp));
    SP_TRY(sp_sim_render_psf(&p, ox, oy - h, size, 1, Pym));
    long m = 0;
    for (long j = 0; j < size; j++)
        for (long i = 0; i < size; i++) {
            long k = j * size + i, X = cx + i - half, Y = cy + j - half;
            if (X < 0 || Y < 0 || X >= sim->cfg.nx || Y >= sim->cfg.ny) continue; /* off the tile */
            double gx = (Pxp[k] - Pxm[k]) / (2 * h), gy = (Pyp[k] - Pym[k]) / (2 * h);
            P[m] = P[k];
            dx[m] = gx;
            dy[m] = gy;
            m++;
        }
    status = sp_score_crlb_pixels(P, dx, dy, m, flux, nz, nnz, out);
cleanup:
    return status;
}

/* Encircled energy of the true PSF within radius r of its centre (the PSF centred at offset
 * (ox, oy) from the stamp's central cell): cells of 1/4 pixel, those cut by the circle weighted by
 * the share of 8 x 8 sub-points inside (error ~1e-4 for r of a few pixels). */
static int encircled(const sp_sim_psf *p, double ox, double oy, double r, double *buf, int size, double *ee)
{
    const int os = 4, ns = 8;
    int status = sp_sim_render_psf(p, ox, oy, size, os, buf);
    if (status != SP_OK) return status;
    double c = (size - 1) / 2.0, sum = 0, hw = 0.5 / os, diag = hw * 1.4142135623730951;
    for (int j = 0; j < size; j++)
        for (int i = 0; i < size; i++) {
            /* cell centre relative to the star, in image pixels */
            double u = (i - c) / os - ox, v = (j - c) / os - oy, d = sqrt(u * u + v * v), w;
            if (d <= r - diag) w = 1;
            else if (d >= r + diag) w = 0;
            else {
                int in = 0;
                for (int b = 0; b < ns; b++)
                    for (int a = 0; a < ns; a++) {
                        double uu = u - hw + (a + 0.5) * 2 * hw / ns, vv = v - hw + (b + 0.5) * 2 * hw / ns;
                        in += uu * uu + vv * vv <= r * r;
                    }
                w = (double)in / (ns * ns);
            }
            sum += w * buf[(size_t)j * size + i];
        }
    *ee = sum;
    return SP_OK;
}

/* ePSF residual of one band: median over cells of ||m - t|| / ||t||, both at unit sum on the
 * store's stamp; oversampling inferred from the stamp's sum (sp_psf: sum = oversamp^2). */
static int epsf_resid(sp_h5 *h, const sp_sim *sim, int b, const char *band, double *out, double *ferr,
                      sp_score_result *r)
{
    int status = SP_OK, ex = 0, nd = 0;
    long dims[SP_H5_MAXDIM], nc = 0;
    float *cube = NULL;
    double *t = NULL, *res = NULL, *bx0 = NULL, *bx1 = NULL, *by0 = NULL, *by1 = NULL, *cix = NULL, *ciy = NULL;
    char path[128];
    *out = NAN;
    ferr[0] = ferr[1] = NAN;
    snprintf(path, sizeof path, "/epsf/%s", band);
    SP_TRY(sp_h5_exists(h, path, &ex));
    if (!ex || !sim) goto cleanup;
    SP_TRY(sp_h5_dims(h, path, &nd, dims));
    if (nd != 4 || dims[2] != dims[3] || dims[2] < 3) goto cleanup;
    long ny = dims[0], nx = dims[1], sz = dims[2], npx = sz * sz;
    SP_ALLOC(cube, (size_t)(ny * nx) * npx);
    SP_TRY(sp_h5_array_read(h, path, SP_H5_F32, NULL, NULL, cube));
    SP_TRY(sp_h5_table_nrows(h, "/cells", &nc));
    SP_ALLOC(bx0, nc);
    SP_ALLOC(bx1, nc);
    SP_ALLOC(by0, nc);
    SP_ALLOC(by1, nc);
    SP_ALLOC(cix, nc);
    SP_ALLOC(ciy, nc);
    SP_TRY(sp_h5_table_read_col_double(h, "/cells", "bx0", 0, nc, bx0));
    SP_TRY(sp_h5_table_read_col_double(h, "/cells", "bx1", 0, nc, bx1));
    SP_TRY(sp_h5_table_read_col_double(h, "/cells", "by0", 0, nc, by0));
    SP_TRY(sp_h5_table_read_col_double(h, "/cells", "by1", 0, nc, by1));
    SP_TRY(sp_h5_table_read_col_double(h, "/cells", "ix", 0, nc, cix));
    SP_TRY(sp_h5_table_read_col_double(h, "/cells", "iy", 0, nc, ciy));
    SP_ALLOC(t, npx);
    SP_ALLOC(res, 2 * (nc > 0 ? nc : 1));
    double *fr = res + (nc > 0 ? nc : 1);
    long nr = 0;
    for (long c = 0; c < nc; c++) {
        long ix = (long)cix[c], iy = (long)ciy[c];
        if (ix < 0 || iy < 0 || ix >= nx || iy >= ny) continue;
        const float *m = cube + (size_t)(iy * nx + ix) * npx;
        double sum = 0;
        int ok = 1;
        for (long i = 0; i < npx; i++) {
            if (!isfinite(m[i])) ok = 0;
            sum += m[i];
        }
        if (!ok || !(sum > 0)) continue; /* cell without an ePSF (not built, or skipped) */
        int os = (int)lround(sqrt(sum));
        if (os < 1) os = 1;
        if (os > 8) os = 8;
        sp_sim_psf p;
        sp_sim_psf_params(sim, b, 0.5 * (bx0[c] + bx1[c]) - 0.5, 0.5 * (by0[c] + by1[c]) - 0.5, &p);
        SP_TRY(sp_sim_render_epsf(&p, (int)sz, os, t));
        double st = 0, d2 = 0, t2 = 0, at = 0, a2 = 0;
        for (long i = 0; i < npx; i++) st += t[i];
        for (long i = 0; i < npx; i++) {
            double a = m[i] / sum, e = t[i] / st;
            d2 += (a - e) * (a - e);
            t2 += e * e;
            at += a * e;
            a2 += a * a;
        }
        /* the flux a PSF fit with this stamp gives a faint (sky-limited) star of the true PSF, over
         * its true flux, minus 1: sum m t / sum m^2 on the same stamp */
        fr[nr] = a2 > 0 ? at / a2 - 1.0 : NAN;
        res[nr++] = sqrt(d2 / t2);
    }
    if (nr > 0) {
        *out = sp_score_median(res, nr);
        double s2 = 0, mx = 0;
        for (long k = 0; k < nr; k++) {
            s2 += fr[k] * fr[k];
            if (fabs(fr[k]) > mx) mx = fabs(fr[k]);
        }
        ferr[0] = sqrt(s2 / nr);
        ferr[1] = mx;
    }
    else note(r, "%s: %s holds no finite ePSF stamp: epsf_resid_rms is null", sp_h5_path(h), path);
cleanup:
    free(cube);
    free(t);
    free(res);
    free(bx0);
    free(bx1);
    free(by0);
    free(by1);
    free(cix);
    free(ciy);
    return status;
}

static double median_over_bands(const sp_score_result *r, size_t off)
{
    double v[SP_SIM_MAX_BANDS * 4];
    long n = 0;
    for (int b = 0; b < r->nbands && n < (long)(sizeof v / sizeof v[0]); b++)
        v[n++] = *(const double *)((const char *)&r->band[b] + off);
    return sp_score_median(v, n);
}

int sp_score_run(const char *store, const char *truth_csv, const sp_score_opts *opts, sp_score_result *r)
{
    int status = SP_OK, ex = 0;
    sp_h5 *h = NULL;
    sp_h5_table_info info = {0};
    truth_t T = {0};
    sp_sim *sim = NULL;
    char (*bands)[32] = NULL;
    char *battr = NULL, *ids = NULL;
    long *row_of = NULL;
    double *excl = NULL, *conv = NULL, *ffl = NULL, *xf = NULL, *yf = NULL, *fl = NULL, *er = NULL, *af = NULL;
    double *work = NULL;
    rec *s = NULL;
    unsigned char *sel = NULL, *crowded = NULL;
    long *ncnt = NULL, *csort = NULL;
    frame_t *fr = NULL;
    sp_zp_result zp = {0};
    int nfr = 0, nb = 0;
    double t0 = omp_get_wtime();
    memset(r, 0, sizeof *r);
    sp_score_opts o;
    if (opts) o = *opts;
    else sp_score_opts_default(&o);
    r->opts = o;
    SP_CHECK(store && truth_csv, SP_ERR_INTERNAL, "sp_score_run: store and truth paths are required");
    SP_CHECK(o.mag_step > 0 && o.mag_hi > o.mag_lo, SP_ERR_CONFIG, "score: bad magnitude bins %g:%g:%g", o.mag_lo,
             o.mag_hi, o.mag_step);
    SP_CHECK(o.crowd_radius > 0 && o.crowd_fraction > 0 && o.crowd_fraction <= 1, SP_ERR_CONFIG,
             "score: crowding radius (%g pix) must be > 0 and the crowded fraction (%g) in (0, 1]", o.crowd_radius,
             o.crowd_fraction);
    r->store = dupstr(store);
    r->truth = dupstr(truth_csv);
    r->notes = dupstr("");
    SP_CHECK(r->store && r->truth && r->notes, SP_ERR_NOMEM, "out of memory");
    r->flux = o.flux;

    /* the store */
    SP_TRY(sp_h5_open(store, 0, MPI_COMM_NULL, &h));
    SP_TRY(sp_h5_exists(h, "/catalog", &ex));
    SP_CHECK(ex, SP_ERR_INPUT, "%s: no /catalog in this file (not a surveyproc store, or `run` has not planned yet)",
             store);
    SP_TRY(sp_h5_table_describe(h, "/catalog", &info));
    r->zp_ref = SP_SIM_ZP_REF;
    SP_TRY(sp_h5_attr_exists(h, "/", "zp_ref", &ex));
    if (ex) SP_TRY(sp_h5_attr_get_double(h, "/", "zp_ref", &r->zp_ref));
    SP_TRY(sp_h5_attr_exists(h, "/", "bands", &ex));
    SP_CHECK(ex, SP_ERR_INPUT, "%s: the store has no 'bands' attribute on / (not a surveyproc store?)", store);
    SP_TRY(sp_h5_attr_get_str(h, "/", "bands", &battr));
    SP_ALLOC(bands, SP_SIM_MAX_BANDS);
    for (char *tok = strtok(battr, ","); tok && nb < SP_SIM_MAX_BANDS; tok = strtok(NULL, ","))
        snprintf(bands[nb++], 32, "%s", tok);
    SP_CHECK(nb > 0, SP_ERR_INPUT, "%s: the store's 'bands' attribute is empty", store);
    r->nbands = nb;
    SP_ALLOC(r->band, nb);
    long n = info.nrows;
    r->n_rows = n;
    SP_CHECK(n > 0, SP_ERR_INPUT, "%s: /catalog has no rows", store);

    /* the truth, and the match by ID */
    SP_TRY(truth_read(truth_csv, bands, nb, r->zp_ref, &T));
    /* the crowded sample: sources with at least as many neighbours as the densest crowd_fraction */
    SP_ALLOC(ncnt, T.n);
    SP_ALLOC(csort, T.n);
    SP_ALLOC(crowded, T.n);
    SP_TRY(neighbour_counts(&T, o.crowd_radius, ncnt));
    memcpy(csort, ncnt, sizeof(long) * (size_t)T.n);
    qsort(csort, (size_t)T.n, sizeof(long), cmp_long);
    {
        long k = (long)floor((1.0 - o.crowd_fraction) * (double)T.n);
        if (k > T.n - 1) k = T.n - 1;
        if (k < 0) k = 0;
        r->crowd_min_neighbours = csort[k] > 1 ? csort[k] : 1;
    }
    for (long i = 0; i < T.n; i++) {
        crowded[i] = (unsigned char)(ncnt[i] >= r->crowd_min_neighbours);
        r->n_crowded += crowded[i];
    }

    /* --ids-from: keep the truth sources that another store has a row for (codes compared on the
     * same sources); the crowding above counted every source */
    if (o.ids_from) {
        long nk = 0;
        SP_TRY(store_ids_keep(o.ids_from, nb, &T, crowded, &nk));
        SP_CHECK(nk > 0, SP_ERR_INPUT, "--ids-from %s: no row of it has an ID of %s", o.ids_from, truth_csv);
        r->n_crowded = 0;
        for (long i = 0; i < T.n; i++) r->n_crowded += crowded[i];
    }
    r->n_truth = T.n;
    int idlen = 0;
    for (int c = 0; c < info.ncol; c++)
        if (!strcmp(info.cols[c].name, "ID") && info.cols[c].type == SP_H5_STR) idlen = info.cols[c].len;
    SP_CHECK(idlen > 0, SP_ERR_INPUT, "%s: /catalog has no string column ID", store);
    SP_ALLOC(ids, (size_t)n * idlen);
    SP_TRY(sp_h5_table_read_col_str(h, "/catalog", "ID", 0, n, ids, (size_t)idlen));
    long idmax = 0;
    for (long i = 0; i < T.n; i++) {
        SP_CHECK(T.id[i] >= 0 && T.id[i] < 100000000, SP_ERR_INPUT, "%s: id %ld out of range", truth_csv, T.id[i]);
        if (T.id[i] > idmax) idmax = T.id[i];
    }
    SP_ALLOC(row_of, idmax + 1);
    for (long i = 0; i <= idmax; i++) row_of[i] = -1;
    for (long i = 0; i < n; i++) {
        const char *p = ids + (size_t)i * idlen;
        char *end = NULL;
        long v = strtol(p, &end, 10);
        while (end && (*end == ' ')) end++;
        if (!p[0] || !end || *end || v < 0 || v > idmax || row_of[v] >= 0) {
            r->n_rows_unmatched++;
            continue;
        }
        row_of[v] = i;
    }
    for (long i = 0; i < T.n; i++) r->n_matched += row_of[T.id[i]] >= 0;
    r->n_rows_unmatched = n - r->n_matched;
    SP_CHECK(r->n_matched > 0, SP_ERR_INPUT,
             "no source of %s matches %s: /catalog ID must be the truth's integer id (the simulator's "
             "input_catalog.csv ID); is this the store of a run on this simulation?",
             truth_csv, store);
    r->match_rate = (double)r->n_matched / (double)T.n;

    /* per-row columns */
    SP_ALLOC(excl, n);
    SP_ALLOC(conv, n);
    SP_ALLOC(ffl, n);
    SP_ALLOC(xf, n);
    SP_ALLOC(yf, n);
    SP_ALLOC(fl, n);
    SP_ALLOC(er, n);
    SP_ALLOC(af, n);
    int have = 0;
    SP_TRY(read_col(h, &info, "excluded_any", n, excl, 1, NULL));
    SP_TRY(read_col(h, &info, "CONVERGED", n, conv, o.flux == SP_SCORE_FLUX_FIT, NULL));
    SP_TRY(read_col(h, &info, "FIT_FLAGS", n, ffl, 0, NULL));
    SP_TRY(read_col(h, &info, "X_FIT", n, xf, 0, &have));
    SP_TRY(read_col(h, &info, "Y_FIT", n, yf, 0, &have));
    long nxfit = 0;
    for (long i = 0; i < n; i++) nxfit += isfinite(xf[i]) && isfinite(yf[i]);
    if (nxfit == 0) note(r, "X_FIT/Y_FIT are NaN on every row: no position errors (pos_rms, pos/CRLB are null)");

    /* truth folder: frames' noise, the true PSF, zero points */
    char dir[4096];
    dirname_of(truth_csv, dir, sizeof dir);
    SP_ALLOC(fr, MAXFR);
    SP_TRY(frames_read(dir, bands, nb, r->zp_ref, fr, &nfr, r));
    {
        const char *pd = o.psf_dir ? o.psf_dir : dir;
        char sy[4200];
        snprintf(sy, sizeof sy, "%s/sim.yaml", pd);
        if (access(pd, F_OK) == 0 && access(sy, R_OK) != 0 && access(pd, R_OK) == 0 && strstr(pd, ".yaml"))
            snprintf(sy, sizeof sy, "%s", pd);
        if (access(sy, R_OK) != 0) {
            SP_CHECK(!o.psf_dir, SP_ERR_IO, "--psf %s: no simulator config there (sim.yaml) to rebuild the true PSF",
                     o.psf_dir);
            note(r, "%s not found: no true PSF, so no Cramér–Rao bounds or ePSF residuals", sy);
        } else {
            status = sp_sim_load(sy, &sim);
            if (status != SP_OK) {
                sp_err_context("true PSF model");
                goto cleanup;
            }
            for (int b = 0; b < nb; b++) {
                int k = -1;
                for (int j = 0; j < sim->nbands; j++)
                    if (!strcmp(sim->band[j].name, bands[b])) k = j;
                SP_CHECK(k == b, SP_ERR_INPUT, "%s: band %s of the store is not band %d of the simulation", sy,
                         bands[b], b);
            }
        }
    }
    SP_TRY(sp_h5_exists(h, "/zp/bands", &ex));
    if (ex) {
        status = sp_zp_read(h, &zp);
        if (status != SP_OK) {
            note(r, "/zp not usable (%s): no zero-point errors", sp_err_msg());
            sp_err_clear();
            status = SP_OK;
            memset(&zp, 0, sizeof zp);
        }
    } else {
        note(r, "%s has no /zp: zero-point errors are null", store);
    }

    if (o.flux == SP_SCORE_FLUX_APER && !(o.aper_r >= 0)) o.aper_r = run_aper_radius(h, r);
    if (o.flux != SP_SCORE_FLUX_APER || !(o.aper_r > 0)) o.aper_r = 0;
    r->opts.aper_r = o.aper_r;
    if (o.aper_r > 0 && !sim) {
        note(r, "no true PSF: aperture columns not corrected for the light outside r = %g pix", o.aper_r);
        o.aper_r = r->opts.aper_r = 0;
    }
    SP_ALLOC(s, T.n);
    SP_ALLOC(sel, T.n);
    SP_ALLOC(work, 2 * T.n + 2);
    int nbins = (int)ceil((o.mag_hi - o.mag_lo) / o.mag_step - 1e-9);
    if (nbins < 1) nbins = 1;
    int size = sim ? 2 * (int)ceil(sim->cfg.psf_radius) + 5 : 0;

    for (int b = 0; b < nb; b++) {
        sp_score_band *B = &r->band[b];
        snprintf(B->name, sizeof B->name, "%s", bands[b]);
        char cf[96], ce[96], ca[96];
        if (o.flux == SP_SCORE_FLUX_FIT) {
            snprintf(cf, sizeof cf, "FLUX_%s_fit", bands[b]);
            snprintf(ce, sizeof ce, "FLUXERR_%s_fit", bands[b]);
        } else {
            snprintf(cf, sizeof cf, "FLUX_%s_APER", bands[b]);
            snprintf(ce, sizeof ce, "FLUXERR_%s_APER", bands[b]);
        }
        snprintf(ca, sizeof ca, "APER_FLAGS_%s", bands[b]);
        SP_TRY(read_col(h, &info, cf, n, fl, 1, NULL));
        SP_TRY(read_col(h, &info, ce, n, er, 1, NULL));
        SP_TRY(read_col(h, &info, ca, n, af, o.flux == SP_SCORE_FLUX_APER, NULL));
        sp_score_noise nz[MAXFR];
        int nnz = 0;
        double dzp = 0;
        for (int k = 0; k < nfr; k++)
            if (fr[k].band == b) {
                nz[nnz++] = fr[k].nz;
                dzp += fr[k].zp_auto - fr[k].zp_true;
            }
        B->nframes = nnz;
        long nfin = 0;
        for (long i = 0; i < T.n; i++) {
            rec *q = &s[i];
            long row = row_of[T.id[i]];
            q->type = T.type[i];
            q->tflags = T.flags[i];
            q->row = row;
            q->ft = T.flux[(size_t)i * nb + b];
            q->mag = q->ft > 0 ? r->zp_ref - 2.5 * log10(q->ft) : NAN;
            q->f = row >= 0 ? fl[row] : NAN;
            q->e = row >= 0 ? er[row] : NAN;
            q->dx = row >= 0 ? xf[row] - T.x[i] : NAN;
            q->dy = row >= 0 ? yf[row] - T.y[i] : NAN;
            q->cr.sig_f_known = q->cr.sig_f_free = q->cr.sig_x = q->cr.sig_y = NAN;
            q->flagged = 0;
            if (row >= 0) {
                nfin += isfinite(q->f);
                if (excl[row] > 0) q->flagged = 1;
                if (o.flux == SP_SCORE_FLUX_FIT) {
                    if (conv[row] != 1) q->flagged = 1;
                    if (isfinite(ffl[row]) && ffl[row] > 0 && ((long)ffl[row] & FIT_BAD_FLAGS)) q->flagged = 1;
                } else if (af[row] > 0) {
                    q->flagged = 1;
                }
            }
        }
        if (nfin == 0) {
            B->flux_all_nan = 1;
            note(r, "%s is NaN on every matched row: band %s has no %s photometry in this store%s", cf, bands[b],
                 o.flux == SP_SCORE_FLUX_FIT ? "fitted" : "aperture",
                 o.flux == SP_SCORE_FLUX_FIT ? " (score the aperture columns with --flux aper)" : "");
        }
        /* point-source aperture correction from the true PSF */
        B->aper_corr = NAN;
        if (o.flux == SP_SCORE_FLUX_APER && sim && o.aper_r > 0) {
            /* the encircled energy of the continuous PSF does not depend on the sub-pixel phase and
             * varies smoothly over the field: tabulate it on a G x G grid of nodes, interpolate */
            enum { G = 8 };
            int esz = 2 * 4 * ((int)ceil(o.aper_r) + 1) + 1, fail = 0;
            double node[G * G], *ee = NULL;
            double nxt = (double)sim->cfg.nx, nyt = (double)sim->cfg.ny;
            SP_ALLOC(ee, T.n);
#pragma omp parallel
            {
                double *buf = malloc(sizeof(double) * (size_t)esz * esz);
                if (!buf) {
#pragma omp atomic write
                    fail = 1;
                }
#pragma omp for schedule(dynamic, 1)
                for (int k = 0; k < G * G; k++) {
                    sp_sim_psf p;
                    node[k] = NAN;
                    if (!buf) continue;
                    double x = (k % G) * (nxt - 1) / (G - 1), y = (k / G) * (nyt - 1) / (G - 1);
                    sp_sim_psf_params(sim, b, x, y, &p);
                    if (encircled(&p, 0, 0, o.aper_r, buf, esz, &node[k]) != SP_OK) {
#pragma omp atomic write
                        fail = 1;
                    }
                }
                free(buf);
            }
            if (fail) {
                free(ee);
                SP_CHECK(0, SP_ERR_NOMEM, "aperture correction: out of memory or bad PSF stamp");
            }
            for (long i = 0; i < T.n; i++) {
                double u = T.x[i] / (nxt - 1) * (G - 1), v = T.y[i] / (nyt - 1) * (G - 1);
                u = u < 0 ? 0 : u > G - 1 ? G - 1 : u;
                v = v < 0 ? 0 : v > G - 1 ? G - 1 : v;
                int iu = (int)u < G - 1 ? (int)u : G - 2, iv = (int)v < G - 1 ? (int)v : G - 2;
                double fu = u - iu, fv = v - iv;
                ee[i] = (1 - fu) * (1 - fv) * node[iv * G + iu] + fu * (1 - fv) * node[iv * G + iu + 1] +
                        (1 - fu) * fv * node[(iv + 1) * G + iu] + fu * fv * node[(iv + 1) * G + iu + 1];
                if (s[i].row < 0) ee[i] = NAN;
                if (ee[i] > 0) {
                    s[i].f /= ee[i];
                    s[i].e /= ee[i];
                }
            }
            B->aper_corr = sp_score_median(ee, T.n);
            free(ee);
        }
        /* bounds for the isolated stars (truth flags 0) */
        if (sim && nnz > 0) {
            int fail = 0;
            char msg[512] = "";
#pragma omp parallel
            {
                double *buf = malloc(sizeof(double) * 5 * (size_t)size * size);
                if (!buf) {
#pragma omp atomic write
                    fail = 1;
                }
#pragma omp for schedule(dynamic, 4)
                for (long i = 0; i < T.n; i++) {
                    rec *q = &s[i];
                    if (!buf || q->type != SP_SCORE_STAR || !(crowd_ok(q, crowded[i]) || !q->tflags) || q->row < 0 ||
                        !(q->ft > 0))
                        continue;
                    if (star_crlb(sim, b, T.x[i], T.y[i], q->ft, nz, nnz, buf, size, &q->cr) != SP_OK) {
#pragma omp critical(score_msg)
                        if (!msg[0]) snprintf(msg, sizeof msg, "source %ld band %s: %s", T.id[i], bands[b], sp_err_msg());
                    }
                }
                free(buf);
            }
            SP_CHECK(!fail, SP_ERR_NOMEM, "out of memory (CRLB stamps)");
            if (msg[0]) note(r, "CRLB not computed for some stars: %s", msg);
        }
        /* groups */
        for (int t = 0; t < SP_SCORE_NTYPE; t++) {
            for (long i = 0; i < T.n; i++) sel[i] = (unsigned char)type_in(s[i].type, t);
            stats_clear(&B->type[t], NAN, NAN);
            group_stats(s, sel, T.n, 0, work, &B->type[t]);
        }
        B->nbins = nbins;
        SP_ALLOC(B->bin, (size_t)nbins * SP_SCORE_NTYPE);
        for (int k = 0; k < nbins; k++) {
            double lo = o.mag_lo + k * o.mag_step, hi = lo + o.mag_step;
            for (int t = 0; t < SP_SCORE_NTYPE; t++) {
                for (long i = 0; i < T.n; i++)
                    sel[i] = (unsigned char)(type_in(s[i].type, t) && s[i].mag >= lo && s[i].mag < hi);
                sp_score_stats *st = &B->bin[k * SP_SCORE_NTYPE + t];
                stats_clear(st, lo, hi);
                group_stats(s, sel, T.n, 0, work, st);
            }
        }
        /* headline star sample: isolated, true SNR in range (the bound's SNR; the reported error's
         * when there is no true PSF) */
        for (long i = 0; i < T.n; i++) {
            const rec *q = &s[i];
            double snr = isfinite(q->cr.sig_f_known) ? q->ft / q->cr.sig_f_known : q->ft / q->e;
            sel[i] = (unsigned char)(q->type == SP_SCORE_STAR && !q->tflags && snr >= o.snr_lo && snr <= o.snr_hi);
        }
        stats_clear(&B->iso, NAN, NAN);
        group_stats(s, sel, T.n, 1, work, &B->iso);
        for (long i = 0; i < T.n; i++) {
            const rec *q = &s[i];
            sel[i] = (unsigned char)(q->type != SP_SCORE_STAR && !q->tflags && q->ft / q->e >= o.gal_snr_min &&
                                     T.re[i] >= o.gal_re_lo && T.re[i] <= o.gal_re_hi);
        }
        stats_clear(&B->gal, NAN, NAN);
        group_stats(s, sel, T.n, 0, work, &B->gal);
        /* crowded stars: in the SNR range (the figures of the isolated sample), and per bin */
        for (long i = 0; i < T.n; i++) {
            const rec *q = &s[i];
            double snr = isfinite(q->cr.sig_f_known) ? q->ft / q->cr.sig_f_known : q->ft / q->e;
            sel[i] = (unsigned char)(q->type == SP_SCORE_STAR && crowd_ok(q, crowded[i]) && snr >= o.snr_lo &&
                                     snr <= o.snr_hi);
        }
        stats_clear(&B->crowd, NAN, NAN);
        group_stats(s, sel, T.n, 1, work, &B->crowd);
        SP_ALLOC(B->crowd_bin, nbins);
        for (int k = 0; k < nbins; k++) {
            double lo = o.mag_lo + k * o.mag_step, hi = lo + o.mag_step;
            for (long i = 0; i < T.n; i++)
                sel[i] = (unsigned char)(s[i].type == SP_SCORE_STAR && crowd_ok(&s[i], crowded[i]) && s[i].mag >= lo &&
                                         s[i].mag < hi);
            stats_clear(&B->crowd_bin[k], lo, hi);
            group_stats(s, sel, T.n, 0, work, &B->crowd_bin[k]);
        }
        /* zero point: with ZP_AUTO off the truth by d, fluxes are off by 10^(0.4 d), so the right
         * calibration is zp_ref + d (mean over the band's frames) */
        B->zp = B->zp_expected = B->zp_error = NAN;
        for (int k = 0; k < zp.nbands; k++)
            if (!strcmp(zp.band[k].band, bands[b])) B->zp = zp.band[k].zp;
        if (nnz > 0) B->zp_expected = r->zp_ref + dzp / nnz;
        B->zp_error = B->zp - B->zp_expected;
        double fe[2];
        SP_TRY(epsf_resid(h, sim, b, bands[b], &B->epsf_resid, fe, r));
        B->epsf_flux_rms = fe[0];
        B->epsf_flux_max = fe[1];
    }

    /* headline figures */
#define MOB(field) median_over_bands(r, offsetof(sp_score_band, field))
    r->star_flux_scatter_over_crlb_known = MOB(iso.scatter_over_crlb_known);
    r->star_flux_scatter_over_crlb_free = MOB(iso.scatter_over_crlb_free);
    r->star_flux_scatter_over_crlb = o.flux == SP_SCORE_FLUX_FIT ? r->star_flux_scatter_over_crlb_free
                                                                 : r->star_flux_scatter_over_crlb_known;
    r->star_pull_std = MOB(iso.pull_std);
    r->star_flux_bias = MOB(iso.bias);
    r->star_pos_scatter_over_crlb = MOB(iso.pos_over_crlb);
    r->galaxy_flux_bias = MOB(gal.bias);
    r->galaxy_pull_std = MOB(gal.pull_std);
    r->crowd_star_scatter_over_crlb = o.flux == SP_SCORE_FLUX_FIT ? MOB(crowd.scatter_over_crlb_free)
                                                                  : MOB(crowd.scatter_over_crlb_known);
    r->crowd_star_pull_std = MOB(crowd.pull_std);
    r->crowd_star_flux_bias = MOB(crowd.bias);
    r->epsf_resid_rms = MOB(epsf_resid);
#undef MOB
    r->epsf_flux_err_max = NAN;
    for (int b = 0; b < nb; b++)
        if (isfinite(r->band[b].epsf_flux_max) && !(r->band[b].epsf_flux_max <= r->epsf_flux_err_max))
            r->epsf_flux_err_max = r->band[b].epsf_flux_max;
    r->zp_error_mag_max = NAN;
    for (int b = 0; b < nb; b++)
        if (isfinite(r->band[b].zp_error) &&
            !(fabs(r->band[b].zp_error) <= r->zp_error_mag_max))
            r->zp_error_mag_max = fabs(r->band[b].zp_error);
    r->seconds = omp_get_wtime() - t0;
cleanup:
    sp_h5_table_info_free(&info);
    sp_h5_close(&h);
    sp_zp_result_free(&zp);
    truth_free(&T);
    sp_sim_free(&sim);
    free(bands);
    free(battr);
    free(ids);
    free(row_of);
    free(excl);
    free(conv);
    free(ffl);
    free(xf);
    free(yf);
    free(fl);
    free(er);
    free(af);
    free(work);
    free(s);
    free(sel);
    free(crowded);
    free(ncnt);
    free(csort);
    free(fr);
    if (status != SP_OK) sp_score_result_free(r);
    return status;
}

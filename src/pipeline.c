/* pipeline.c — the run: config -> plan -> store -> cells -> finish, and the
 * per-cell stage table. Reading the two tables below tells the flow. */
#include "surveyproc/sp_pipeline.h"
#include "pipeline/cell.h"
#include "surveyproc/sp_aperture.h"
#include "surveyproc/sp_background.h"
#include "surveyproc/sp_coord.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_export.h" /* [issue 10] */
#include "surveyproc/sp_fits.h"
#include "surveyproc/sp_log.h"
#include "surveyproc/sp_mpi.h"
#include "surveyproc/sp_plan.h"
#include "surveyproc/sp_prep.h"
#include "surveyproc/sp_prof.h"
#include "surveyproc/sp_resources.h" /* [issue 6] */
#include "surveyproc/sp_store.h"
#include "surveyproc/sp_watchdog.h"
#include "surveyproc/sp_zp.h" /* [issue 10] */

#include <errno.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

/* run_t (the run) and cell_t (one cell while its stages run) are in
 * src/pipeline/cell.h, shared with the PSF and fit stages. */

/* ---- one cell ---------------------------------------------------------------------- */

/* ---- read+prep ---------------------------------------------------------------------- */

/* What read+prep keeps per rank from one cell to the next (a rank runs its cells one at
 * a time, on its main thread): the cell's band images (data, ivar, mask: the pool the
 * cells borrow), the raw ROI buffer and the per-frame buffers of multi-frame bands, all
 * sized for the largest cell and allocated on first use, and a bounded set of open
 * frames. Fresh buffers per cell cost a page fault per 4 KB at first touch, and opening a
 * frame (stat, header parse) ~30 us: together ~40% of read+prep on the bench tile
 * (docs/performance.md). Memory is what the planner already counts for the largest cell. */
typedef struct ioprep_state {
    size_t cap;          /* pixels per buffer: the largest cell ROI */
    int nb, maxf;        /* bands; frames of the largest band */
    float **data, **ivar; /* nb band images lent to the current cell */
    uint8_t **mask;
    float *raw;
    float **fd, **fi;    /* maxf frames of a multi-frame band (maxf > 1 only) */
    uint8_t **fm;
    double *wsky;
    sp_fits **open;      /* per frame of the plan; NULL: not open */
    long *stamp;         /* last use, for closing the least recently used */
    long clock;
    int nopen, maxopen;
} ioprep_state;

static void ioprep_free(run_t *r)
{
    ioprep_state *s = r->iop;
    if (!s) return;
    for (int b = 0; b < s->nb; b++) {
        if (s->data) free(s->data[b]);
        if (s->ivar) free(s->ivar[b]);
        if (s->mask) free(s->mask[b]);
    }
    for (int k = 0; k < s->maxf; k++) {
        if (s->fd) free(s->fd[k]);
        if (s->fi) free(s->fi[k]);
        if (s->fm) free(s->fm[k]);
    }
    if (s->open)
        for (int i = 0; i < r->plan->nframes; i++) sp_fits_close(&s->open[i]);
    free(s->data);
    free(s->ivar);
    free(s->mask);
    free(s->raw);
    free(s->fd);
    free(s->fi);
    free(s->fm);
    free(s->wsky);
    free(s->open);
    free(s->stamp);
    free(s);
    r->iop = NULL;
}

static int ioprep_init(run_t *r)
{
    int status = SP_OK;
    const sp_plan *p = r->plan;
    ioprep_state *s = NULL;
    if (r->iop) return SP_OK;
    SP_ALLOC(s, 1);
    r->iop = s;
    for (int k = 0; k < p->ncells; k++) {
        const sp_cell *ce = &p->cells[k];
        size_t n = (size_t)(ce->rx1 - ce->rx0) * (size_t)(ce->ry1 - ce->ry0);
        if (n > s->cap) s->cap = n;
    }
    if (!s->cap) s->cap = 1;
    s->nb = p->nbands;
    s->maxf = 1;
    for (int b = 0; b < p->nbands; b++)
        if (p->band_nframes[b] > s->maxf) s->maxf = p->band_nframes[b];
    /* malloc, not calloc: every pixel is written before it is read */
#define IOP_NEW(ptr, n)                                                                                   \
    do {                                                                                                  \
        (ptr) = malloc((size_t)(n) * sizeof *(ptr));                                                      \
        SP_CHECK((ptr), SP_ERR_NOMEM, "out of memory allocating %zu x %zu bytes (read+prep buffers)",      \
                 (size_t)(n), sizeof *(ptr));                                                             \
    } while (0)
    SP_ALLOC(s->data, s->nb);
    SP_ALLOC(s->ivar, s->nb);
    SP_ALLOC(s->mask, s->nb);
    for (int b = 0; b < s->nb; b++) {
        IOP_NEW(s->data[b], s->cap);
        IOP_NEW(s->ivar[b], s->cap);
        IOP_NEW(s->mask[b], s->cap);
    }
    IOP_NEW(s->raw, s->cap);
    SP_ALLOC(s->wsky, s->maxf);
    if (s->maxf > 1) {
        SP_ALLOC(s->fd, s->maxf);
        SP_ALLOC(s->fi, s->maxf);
        SP_ALLOC(s->fm, s->maxf);
        for (int k = 0; k < s->maxf; k++) {
            IOP_NEW(s->fd[k], s->cap);
            IOP_NEW(s->fi[k], s->cap);
            IOP_NEW(s->fm[k], s->cap);
        }
    }
#undef IOP_NEW
    /* open frames: at most 64, and each takes up to two descriptors (cfitsio's and the
     * direct reader's): leave most of the descriptor limit to everything else */
    struct rlimit rl;
    long fdmax = getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY ? (long)rl.rlim_cur : 1024;
    long mo = (fdmax - 256) / 4;
    s->maxopen = (int)(mo < 0 ? 0 : mo > 64 ? 64 : mo);
    if (s->maxopen > p->nframes) s->maxopen = p->nframes;
    SP_ALLOC(s->open, p->nframes);
    SP_ALLOC(s->stamp, p->nframes);
cleanup:
    if (status != SP_OK) ioprep_free(r);
    return status;
}

/* Read the cell's ROI of frame i into raw, through the set of open frames. A frame whose
 * read fails is closed (a later cell or a resumed run opens it afresh). */
static int read_frame_roi(run_t *r, int i, const cell_t *c, float *raw)
{
    ioprep_state *s = r->iop;
    int status = SP_OK;
    sp_fits *f = s->open[i];
    if (!f) {
        SP_TRY(sp_fits_open(r->plan->frames[i].path, &f));
        if (s->maxopen > 0) {
            if (s->nopen >= s->maxopen) {
                int old = -1;
                for (int k = 0; k < r->plan->nframes; k++)
                    if (s->open[k] && (old < 0 || s->stamp[k] < s->stamp[old])) old = k;
                sp_fits_close(&s->open[old]);
                s->nopen--;
            }
            s->open[i] = f;
            s->nopen++;
        }
    }
    s->stamp[i] = ++s->clock;
    status = sp_fits_read_subset(f, c->x0, c->y0, c->nx, c->ny, raw);
    if (status != SP_OK || !s->open[i]) {
        if (s->open[i]) s->nopen--;
        s->open[i] = NULL;
        sp_fits_close(&f);
    }
cleanup:
    return status;
}

/* The cell's band images: each frame's ROI read, scaled, masked and given its noise
 * model; a band of one frame is prepared straight into the cell's band image, several
 * frames of a band are coadded. */
static int stage_io_prep(cell_t *c)
{
    int status = SP_OK;
    run_t *r = c->run;
    const sp_plan *p = r->plan;
    ioprep_state *s = r->iop;
    int nb = p->nbands;
    for (int b = 0; b < nb; b++) {
        int nf = 0, single = p->band_nframes[b] == 1;
        for (int i = 0; i < p->nframes; i++) {
            const sp_frame *fr = &p->frames[i];
            if (fr->band_index != b) continue;
            /* the ROI of this frame only: never the whole frame */
            sp_prof_push("io");
            status = read_frame_roi(r, i, c, s->raw);
            sp_prof_bytes((double)c->npix * 4.0);
            sp_prof_pop();
            SP_TRY(status);
            c->bytes_read += (double)c->npix * 4.0;
            sp_prof_push("prep");
            sp_prep_params pp = {.scale = fr->scale, .skysig = fr->skysig, .egain = fr->egain,
                                 .saturate = fr->saturate,
                                 .sat_level_frac = r->cfg->image_scaling.saturation_fraction};
            float *d = single ? c->data[b] : s->fd[nf], *iv = single ? c->ivar[b] : s->fi[nf];
            uint8_t *m = single ? c->mask[b] : s->fm[nf];
            double sky = 0;
            status = sp_prep_frame(s->raw, c->npix, &pp, d, m, &sky, r->prep_threads);
            if (status == SP_OK) status = sp_prep_ivar(d, m, c->npix, &pp, sky, NULL, iv, r->prep_threads);
            s->wsky[nf] = 1.0 / (fr->skysig * fr->scale * fr->skysig * fr->scale);
            sp_prof_pop();
            SP_TRY(status);
            nf++;
            sp_coord_poll();
        }
        if (!single) {
            sp_prof_push("coadd");
            status = sp_prep_coadd(nf, (const float *const *)s->fd, (const float *const *)s->fi,
                                   (const uint8_t *const *)s->fm, s->wsky, c->npix, c->data[b], c->ivar[b],
                                   c->mask[b], r->prep_threads);
            sp_prof_pop();
            SP_TRY(status);
        }
    }
cleanup:
    return status;
}

static int stage_white(cell_t *c)
{
    const sp_plan *p = c->run->plan;
    return sp_prep_white(p->nbands, (const float *const *)c->data, (const float *const *)c->ivar, (size_t)c->nx,
                         (size_t)c->ny, c->white, c->white_ivar, c->run->white_threads);
}

/* Sources with saturated pixels within radius_pix (in any band, or all bands if
 * require_all_bands) are excluded: their model would be fitted to clipped data. */
static int stage_saturation(cell_t *c)
{
    const sp_config *cfg = c->run->cfg;
    const sp_plan *p = c->run->plan;
    if (!cfg->source_saturation_cut.enabled) return SP_OK;
    double rad = cfg->source_saturation_cut.radius_pix;
    int need = cfg->source_saturation_cut.min_saturated_pixels;
    for (long k = 0; k < c->nsrc; k++) {
        long i = c->src[k];
        double xs = p->cat.x[i] - c->x0, ys = p->cat.y[i] - c->y0;
        long xa = (long)floor(xs - rad), xb = (long)ceil(xs + rad);
        long ya = (long)floor(ys - rad), yb = (long)ceil(ys + rad);
        int bands_hit = 0;
        for (int b = 0; b < p->nbands; b++) {
            int nsat = 0;
            for (long y = ya < 0 ? 0 : ya; y <= yb && y < c->ny; y++)
                for (long x = xa < 0 ? 0 : xa; x <= xb && x < c->nx; x++) {
                    if ((x - xs) * (x - xs) + (y - ys) * (y - ys) > rad * rad) continue;
                    nsat += (c->mask[b][y * c->nx + x] & SP_PIX_SAT) != 0;
                }
            bands_hit += nsat >= need;
        }
        int hit = cfg->source_saturation_cut.require_all_bands ? bands_hit == p->nbands : bands_hit > 0;
        if (hit) c->excl[k] |= SP_EXCL_SATURATION;
    }
    return SP_OK;
}

static int stage_aperture(cell_t *c)
{
    int status = SP_OK;
    const sp_config *cfg = c->run->cfg;
    const sp_plan *p = c->run->plan;
    double r_ap = cfg->patch_run.r_ap, rin = cfg->epsf.star_local_bkg_annulus_rin_pix,
           rout = cfg->epsf.star_local_bkg_annulus_rout_pix;
    size_t ns = sp_aper_scratch_size(rout);
    int nb = p->nbands;
#pragma omp parallel num_threads(c->run->threads)
    {
        float *scratch = malloc(ns * sizeof *scratch);
        if (!scratch) {
#pragma omp atomic write
            status = SP_ERR_NOMEM;
        }
#pragma omp for schedule(dynamic, 16)
        for (long k = 0; k < c->nsrc; k++) {
            if (!scratch) continue;
            long i = c->src[k];
            double x = p->cat.x[i] - c->x0, y = p->cat.y[i] - c->y0;
            for (int b = 0; b < nb; b++) {
                sp_aper_measure(c->data[b], c->ivar[b], c->nx, c->ny, x, y, r_ap, rin, rout, scratch,
                                &c->aper[k * nb + b]);
                /* the calibration aperture is measured on the fit's residual (cell_fit.c) */
                c->apcal[k * nb + b] = (sp_aper_result){.flux = NAN, .fluxerr = NAN, .flags = -1}; /* not measured */
            }
        }
        free(scratch);
    }
    if (status != SP_OK) return SP_FAIL(status, "out of memory in aperture photometry");
    return SP_OK;
}

/* The calibration aperture's radius per band (zp.apcorr; measured in cell_fit.c), the same on every rank and
 * on a resume: zp.apcorr_radius_pix, or zp.apcorr_radius_fwhm x the median FWHM of
 * the band's cell PSFs (moments of the grid's stamps, the same on every rank and what the store holds;
 * epsf.fallback_fwhm_pix without a grid); at most the annulus's inner radius - 1. */
static int apcal_radii(run_t *r)
{
    int status = SP_OK;
    const sp_config *cfg = r->cfg;
    const sp_plan *p = r->plan;
    float *fw = NULL;
    free(r->apcal_r);
    r->apcal_r = NULL;
    if (!cfg->zp.apcorr) return SP_OK;
    SP_ALLOC(r->apcal_r, p->nbands > 0 ? p->nbands : 1);
    SP_ALLOC(fw, p->ncells > 0 ? p->ncells : 1);
    double rmax = cfg->epsf.star_local_bkg_annulus_rin_pix - 1.0;
    for (int b = 0; b < p->nbands; b++) {
        double rad = cfg->zp.apcorr_radius_pix;
        if (!(rad > 0)) {
            long n = 0;
            for (int k = 0; r->grid && k < p->ncells; k++) {
                const sp_psf *q = r->grid[(long)b * p->ncells + k];
                double cx, cy, f = NAN;
                if (q) sp_psf_moments(q, &cx, &cy, &f); /* from the stamp: q->fwhm is the builder's where it ran */
                if (isfinite(f) && f > 0) fw[n++] = (float)f;
            }
            double f = n > 0 ? sp_select_k(fw, (size_t)n, (size_t)(n / 2)) : cfg->epsf.fallback_fwhm_pix;
            if (n > 0 && n % 2 == 0) f = 0.5 * (f + sp_select_k(fw, (size_t)n, (size_t)(n / 2 - 1)));
            rad = cfg->zp.apcorr_radius_fwhm * f;
        }
        if (rad > rmax) {
            if (r->rank == 0)
                SP_WARN("zp.apcorr: band %s: the calibration aperture (%.1f px) is capped at %.1f px, 1 px inside "
                        "the local-background annulus (epsf.star_local_bkg_annulus_rin_pix = %g); raise the annulus "
                        "to measure the aperture correction farther out",
                        p->bands[b], rad, rmax, cfg->epsf.star_local_bkg_annulus_rin_pix);
            rad = rmax;
        }
        r->apcal_r[b] = rad;
        if (r->rank == 0) SP_INFO("zp.apcorr: band %s: calibration aperture radius %.2f px", p->bands[b], rad);
    }
cleanup:
    free(fw);
    return status;
}

static int stage_write(cell_t *c)
{
    int status = SP_OK;
    run_t *r = c->run;
    const sp_plan *p = r->plan;
    const sp_store_catalog *s = &r->store->cat;
    void *rows = NULL;
    SP_ALLOC(rows, (size_t)(c->nsrc > 0 ? c->nsrc : 1) * s->rowsize);
    sp_store_fill_rows(s, rows, c->nsrc);
    for (long k = 0; k < c->nsrc; k++) {
        long i = c->src[k];
        sp_store_input_row(s, p, i, rows, k);
        unsigned e = c->excl[k];
        sp_store_set_u8(s, rows, k, s->excl_sat, !!(e & SP_EXCL_SATURATION));
        sp_store_set_u8(s, rows, k, s->excl_any, e != 0);
        if (e & SP_EXCL_SATURATION) sp_store_set_str(s, rows, k, s->excl_reason, "saturation");
        sp_store_set_u8(s, rows, k, s->done, 1);
        cell_fit_row(c, k, rows, k);
        for (int b = 0; b < p->nbands; b++) {
            const sp_aper_result *a = &c->aper[k * p->nbands + b];
            sp_store_set_f64(s, rows, k, s->band[b].flux_aper, a->flux);
            sp_store_set_f64(s, rows, k, s->band[b].fluxerr_aper, a->fluxerr);
            sp_store_set_i32(s, rows, k, s->band[b].aper_flags, a->flags);
            const sp_aper_result *ac = &c->apcal[k * p->nbands + b];
            sp_store_set_f64(s, rows, k, s->band[b].flux_apcal, ac->flux);
            sp_store_set_f64(s, rows, k, s->band[b].fluxerr_apcal, ac->fluxerr);
            sp_store_set_i32(s, rows, k, s->band[b].apcal_flags, ac->flags);
        }
    }
    SP_TRY(sp_store_write_catalog_rows(r->store, c->src, c->nsrc, rows));
    if (c->prow) SP_TRY(sp_store_write_patches(r->store, c->prow, c->cell->npatch));
    SP_TRY(cell_qa_write(c));
cleanup:
    free(rows);
    return status;
}

/* The per-cell stage tables: name (profiling region), function. A run makes two
 * passes over its cells: the PSF pass builds every cell's ePSF (shared by all
 * ranks afterwards, so a patch's PSF can blend the neighbouring cells'), the fit
 * pass reads the pixels again and fits the patches. */
typedef struct {
    const char *name;
    int (*run)(cell_t *);
} cell_stage;

static const cell_stage psf_stages[] = {
    {"read+prep", stage_io_prep},     /* ROI reads (cfitsio subsets), scaling, masks, noise, coadd */
    {"background", stage_background}, /* background mesh + RMS per band, subtracted (cell_psf.c) */
    {"white", stage_white},           /* inverse-variance white stack */
    {"detect", stage_detect},         /* detections on the white stack (cell_psf.c) */
    {"epsf", stage_epsf},             /* PSF stars + ePSF per band -> grid, /epsf (cell_psf.c) */
    {"qa", stage_qa_maps},            /* block-averaged white stack and background maps -> /qa */
};

static const cell_stage fit_stages[] = {
    {"read+prep", stage_io_prep},     /* the same pixels again (streaming: no cell is kept) */
    {"sat", stage_saturation},        /* saturation exclusion per source */
    {"background", stage_background}, /* the same background, subtracted */
    {"aper", stage_aperture},         /* forced aperture photometry at the catalog positions */
    {"fit", stage_fit},               /* patch fits on the rank's threads (cell_fit.c) */
    {"write", stage_write},           /* catalog rows of the cell's sources, patch rows */
};

static void cell_free(cell_t *c, int nb)
{
    (void)nb; /* the band images belong to the rank's read+prep pool (ioprep_state) */
    c->data = c->ivar = NULL;
    c->mask = NULL;
    free(c->white);
    free(c->white_ivar);
    free(c->src);
    free(c->excl);
    free(c->aper);
    free(c->apcal);
    cell_psf_free(c);
    free(c->fit);
    free(c->fitted);
    free(c->fit_ra);
    free(c->fit_dec);
    free(c->prow);
    free(c->cut_slot);
    free(c->cut_slots);
    free(c->cut);
    free(c->ov_slot);
    free(c->ov_slots);
    free(c->ov);
}

/* A cell that failed is marked so in /cells (resume retries it); the cell's own
 * error stays the one reported. */
static void mark_failed(run_t *r, const sp_cell *ce, double seconds)
{
    char msg[2048], where[256];
    int code = sp_err_code(), line = 0;
    snprintf(msg, sizeof msg, "%s", sp_err_msg());
    snprintf(where, sizeof where, "%s", sp_err_where());
    char *colon = strrchr(where, ':');
    if (colon) {
        line = atoi(colon + 1);
        *colon = '\0';
    }
    sp_store_cellrow row = {.id = ce->id, .ix = ce->ix, .iy = ce->iy, .bx0 = ce->bx0, .by0 = ce->by0,
                            .bx1 = ce->bx1, .by1 = ce->by1, .rx0 = ce->rx0, .ry0 = ce->ry0, .rx1 = ce->rx1,
                            .ry1 = ce->ry1, .nsrc = ce->nsrc, .active = 1, .status = SP_CELL_FAILED,
                            .rank = r->rank, .seconds = seconds, .cost = ce->cost, .mem_est = ce->mem_bytes,
                            .bytes_read = 0};
    (void)sp_store_write_cell(r->store, &row);
    sp_err_set(code, where, line, "%s", msg);
}

static int process_cell(int cid, void *arg)
{
    int status = SP_OK;
    run_t *r = arg;
    const sp_plan *p = r->plan;
    const sp_cell *ce = &p->cells[cid];
    int nb = p->nbands;
    double t0 = sp_wtime();
    cell_t c = {.run = r, .cell = ce};
    c.x0 = ce->rx0;
    c.y0 = ce->ry0;
    c.nx = ce->rx1 - ce->rx0;
    c.ny = ce->ry1 - ce->ry0;
    c.npix = (size_t)c.nx * (size_t)c.ny;
    /* the band images: borrowed from the rank's pool, filled by read+prep */
    SP_TRY(ioprep_init(r));
    SP_CHECK(c.npix <= r->iop->cap, SP_ERR_INTERNAL, "cell %d: ROI of %zu pixels > the read+prep pool's %zu", cid,
             c.npix, r->iop->cap);
    c.data = r->iop->data;
    c.ivar = r->iop->ivar;
    c.mask = r->iop->mask;
    SP_ALLOC(c.white, c.npix);
    SP_ALLOC(c.white_ivar, c.npix);
    SP_ALLOC(c.src, ce->nsrc + 1);
    SP_ALLOC(c.excl, ce->nsrc + 1);
    SP_ALLOC(c.aper, (ce->nsrc + 1) * nb);
    SP_ALLOC(c.apcal, (ce->nsrc + 1) * nb);
    for (int j = 0; j < ce->npatch; j++) {
        const sp_patch *pt = &p->patches[ce->patch0 + j];
        for (long k = 0; k < pt->nsrc; k++) {
            c.src[c.nsrc] = p->patch_src[pt->src0 + k];
            c.excl[c.nsrc] = p->cat.excl[c.src[c.nsrc]];
            c.nsrc++;
        }
    }
    int psf_pass = r->phase == RUN_PSF_PASS;
    const cell_stage *stages = psf_pass ? psf_stages : fit_stages;
    size_t nstages = psf_pass ? sizeof psf_stages / sizeof psf_stages[0] : sizeof fit_stages / sizeof fit_stages[0];
    sp_prof_push(psf_pass ? "psf_cells" : "fit_cells");
    for (size_t k = 0; k < nstages && status == SP_OK; k++) {
        sp_prof_push(stages[k].name);
        status = stages[k].run(&c);
        sp_prof_pop();
        sp_coord_poll();
    }
    sp_prof_pop();
    if (status != SP_OK) {
        sp_err_context("cell %d (x %ld-%ld, y %ld-%ld), %s pass", cid, ce->bx0, ce->bx1, ce->by0, ce->by1,
                       psf_pass ? "PSF" : "fit");
        if (!psf_pass) mark_failed(r, ce, sp_wtime() - t0);
        goto cleanup;
    }
    if (psf_pass) {
        r->bytes_read += c.bytes_read;
        goto cleanup; /* the ePSFs are stored; the cell's status is the fit pass's */
    }
    /* the cell's status goes last: a cell marked done has all its rows */
    sp_store_cellrow row = {.id = ce->id, .ix = ce->ix, .iy = ce->iy, .bx0 = ce->bx0, .by0 = ce->by0,
                            .bx1 = ce->bx1, .by1 = ce->by1, .rx0 = ce->rx0, .ry0 = ce->ry0, .rx1 = ce->rx1,
                            .ry1 = ce->ry1, .nsrc = ce->nsrc, .active = 1, .status = SP_CELL_DONE,
                            .rank = r->rank, .seconds = sp_wtime() - t0, .cost = ce->cost,
                            .mem_est = ce->mem_bytes, .bytes_read = (int64_t)c.bytes_read};
    sp_prof_push("write");
    status = sp_store_write_cell(r->store, &row);
    sp_prof_pop();
    r->bytes_read += c.bytes_read;
cleanup:
    cell_free(&c, nb);
    return status;
}

/* [watchdog] the coordinator's watch (sp_coord_set_watch): the plan's estimate of a cell, and on
 * rank 0 the cell of a worker that went silent: marked failed in the fit pass (resume redoes it;
 * in the PSF pass its ePSF is rebuilt on resume anyway). */
static double watch_estimate(int cell, void *arg)
{
    const run_t *r = arg;
    return r->plan->cells[cell].cost;
}

static void watch_lost(int cell, int rank, char *desc, size_t ndesc, void *arg)
{
    run_t *r = arg;
    const sp_cell *ce = &r->plan->cells[cell];
    snprintf(desc, ndesc, "(x %ld-%ld, y %ld-%ld)", ce->bx0, ce->bx1, ce->by0, ce->by1);
    if (r->phase != RUN_FIT_PASS || !r->store) return;
    sp_store_cellrow row = {.id = ce->id, .ix = ce->ix, .iy = ce->iy, .bx0 = ce->bx0, .by0 = ce->by0,
                            .bx1 = ce->bx1, .by1 = ce->by1, .rx0 = ce->rx0, .ry0 = ce->ry0, .rx1 = ce->rx1,
                            .ry1 = ce->ry1, .nsrc = ce->nsrc, .active = 1, .status = SP_CELL_FAILED,
                            .rank = rank, .seconds = 0, .cost = ce->cost, .mem_est = ce->mem_bytes,
                            .bytes_read = 0};
    (void)sp_store_write_cell(r->store, &row); /* best effort: the cell is not done either way */
}

static void on_cell_done(int cell, int rank, double seconds, void *arg)
{
    run_t *r = arg;
    (void)cell;
    (void)rank;
    (void)seconds;
    r->ncells_done++;
    sp_progress_update(&r->progress, r->ncells_done);
}

/* ---- config ------------------------------------------------------------------------ */

int sp_pipeline_load_config(const char *path, int nsets, char **sets, sp_config *cfg, char **yaml_text)
{
    int status = SP_OK, rank = sp_mpi_rank();
    char *text = NULL, *dir = NULL;
    size_t len = 0, dlen = 0;
    memset(cfg, 0, sizeof *cfg);
    if (rank == 0) status = sp_config_read_file(path, &text, &dir);
    SP_TRY(sp_mpi_agree(status, MPI_COMM_WORLD));
    if (rank == 0) {
        len = strlen(text);
        dlen = strlen(dir);
    }
    SP_TRY(sp_mpi_bcast_bytes(&text, &len, 0, MPI_COMM_WORLD));
    SP_TRY(sp_mpi_bcast_bytes(&dir, &dlen, 0, MPI_COMM_WORLD));
    status = sp_config_load_string(text, path, dir, cfg);
    for (int i = 0; i < nsets && status == SP_OK; i++) {
        char key[256];
        const char *eq = strchr(sets[i], '=');
        if (!eq || (size_t)(eq - sets[i]) >= sizeof key) {
            status = SP_FAIL(SP_ERR_CONFIG, "--set %s: expected key=value", sets[i]);
            break;
        }
        memcpy(key, sets[i], (size_t)(eq - sets[i]));
        key[eq - sets[i]] = '\0';
        status = sp_config_set(cfg, key, eq + 1);
    }
    if (status == SP_OK && nsets > 0) status = sp_config_validate(cfg);
    if (status == SP_OK) status = sp_config_resolve_paths(cfg, dir);
    if (status == SP_OK) status = sp_config_check_inputs(cfg);
    if (status == SP_OK && yaml_text) status = sp_config_to_yaml_string(cfg, yaml_text);
    SP_TRY(sp_mpi_agree(status, MPI_COMM_WORLD));
cleanup:
    free(text);
    free(dir);
    if (status != SP_OK) sp_config_free(cfg);
    return status;
}

static void plan_opts_from_config(const sp_config *cfg, int threads, sp_plan_opts *o)
{
    memset(o, 0, sizeof *o);
    snprintf(o->image_list, sizeof o->image_list, "%s", cfg->inputs.image_list_file);
    snprintf(o->input_catalog, sizeof o->input_catalog, "%s", cfg->inputs.input_catalog);
    if (cfg->zp.enabled && cfg->inputs.reference_catalog) /* checked in the plan, used in finish */
        snprintf(o->reference_catalog, sizeof o->reference_catalog, "%s", cfg->inputs.reference_catalog);
    o->zp_ref = cfg->image_scaling.zp_ref;
    o->crop_margin = cfg->crop.enabled ? cfg->crop.margin : 0;
    /* alignment in pixels: the seed's CRPIX tolerance is the natural pixel scale of the check */
    o->wcs_tolerance = cfg->checks.require_wcs_alignment ? cfg->checks.wcs_tolerance.crpix : INFINITY;
    o->allow_unknown_bands = !cfg->checks.require_catalog_bands;
    o->shape_check_off = !cfg->checks.require_same_shape;
    o->epsf_ngrid = cfg->epsf.epsf_ngrid;
    o->ngrid = cfg->epsf.ngrid;
    o->psf_size = cfg->epsf.final_psf_size;
    o->psf_oversamp = cfg->epsf.oversamp;
    o->psf_field_stars = cfg->epsf.moffat_field ? psf_field_kept_max((long)cfg->epsf.epsf_ngrid * cfg->epsf.epsf_ngrid) : 0;
    o->psf_field_size = psf_field_cut_size(cfg->epsf.fallback_fwhm_pix, cfg->epsf.final_psf_size);
    o->inject_reference = cfg->zp.enabled && cfg->zp.inject_gaia_sources && cfg->inputs.reference_catalog;
    o->inject_match_arcsec = cfg->zp.match_radius_arcsec;
    o->inject_mag_min = cfg->zp.gaia_mag_min;
    o->inject_mag_max = cfg->zp.gaia_mag_max;
    o->halo_pix_min = cfg->patches.halo_pix_min;
    o->skip_empty_cells = cfg->epsf.skip_empty_epsf_patches;
    o->skip_empty_patches = cfg->patch_inputs.skip_empty_patch;
    switch (cfg->patch_run.gal_model) {
    case SP_CFG_GAL_DEV: o->gal_model = SP_SRC_DEV; break;
    case SP_CFG_GAL_SERSIC: o->gal_model = SP_SRC_SERSIC; break;
    case SP_CFG_GAL_STAR: o->gal_model = SP_SRC_STAR; break;
    default: o->gal_model = SP_SRC_EXP; break;
    }
    o->threads = threads;
    o->psf_fwhm = cfg->epsf.fallback_fwhm_pix;
    o->psf_beta = cfg->epsf.fallback_model == SP_CFG_FALLBACK_GAUSSIAN ? 20.0 : cfg->epsf.fallback_moffat_beta;
    o->re_fallback = cfg->patch_run.re_fallback_pix;
    o->max_group = cfg->patch_run.max_group_size;
    o->halo_fixed = cfg->patch_run.halo_source_mode == SP_CFG_HALO_FIXED;
}

/* [issue 6] threads per rank: decided by the resource planner (sp_resources_setup). */

static int mkdir_p(const char *dir)
{
    char buf[SP_PATH_MAX];
    snprintf(buf, sizeof buf, "%s", dir);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        if (mkdir(buf, 0777) != 0 && errno != EEXIST)
            return SP_FAIL(SP_ERR_IO, "%s: cannot create directory: %s", buf, strerror(errno));
        *p = '/';
    }
    if (mkdir(buf, 0777) != 0 && errno != EEXIST)
        return SP_FAIL(SP_ERR_IO, "%s: cannot create directory (outputs.work_dir): %s", buf, strerror(errno));
    return SP_OK;
}

/* ---- timing ------------------------------------------------------------------------ */

typedef struct {
    int32_t rank;
    char region[128];
    int64_t calls;
    double wall, own, cpu, bytes;
} timing_row;

static const sp_h5_col timing_cols[] = {
    {"rank", SP_H5_I32, 0, "", "MPI rank", 0, 0},
    {"region", SP_H5_STR, 128, "", "timing region path (parent/child)", 0, 0},
    {"calls", SP_H5_I64, 0, "", "times the region was entered", 0, 0},
    {"wall", SP_H5_F64, 0, "s", "wall seconds, children included", 0, 0},
    {"own", SP_H5_F64, 0, "s", "wall seconds minus children", 0, 0},
    {"cpu", SP_H5_F64, 0, "s", "process CPU seconds (all threads)", 0, 0},
    {"bytes", SP_H5_F64, 0, "byte", "bytes read or written in the region", 0, 0},
};

typedef struct {
    int32_t rank;
    double wall, busy, idle, overhead;
    int64_t cells;
    double peak_rss, bytes_read;
    int32_t threads;
} rank_row;

static const sp_h5_col rank_cols[] = {
    {"rank", SP_H5_I32, 0, "", "MPI rank", 0, 0},
    {"wall", SP_H5_F64, 0, "s", "seconds in the cell phase", 0, 0},
    {"busy", SP_H5_F64, 0, "s", "seconds processing cells", 0, 0},
    {"idle", SP_H5_F64, 0, "s", "seconds waiting for work", 0, 0},
    {"overhead", SP_H5_F64, 0, "s", "rank 0: CPU seconds answering workers (queue overhead)", 0, 0},
    {"cells", SP_H5_I64, 0, "", "cells processed", 0, 0},
    {"peak_rss", SP_H5_F64, 0, "byte", "peak resident memory", 0, 0},
    {"bytes_read", SP_H5_F64, 0, "byte", "FITS pixel bytes read", 0, 0},
    {"threads", SP_H5_I32, 0, "", "OpenMP threads", 0, 0},
};

/* /timing/fit_cost: where the fit's thread CPU went, by stage of the staged fit
 * and kind of group (docs/fitting.md "Where the fit's time goes"). */
typedef struct {
    int32_t rank;
    char stage[16];
    char kind[8];
    double cpu;
    int64_t source_bands, groups;
} fitcost_row;

static const sp_h5_col fitcost_cols[] = {
    {"rank", SP_H5_I32, 0, "", "MPI rank", 0, 0},
    {"stage", SP_H5_STR, 16, "",
     "flux (stage 1), positions (stage 2), shapes (stage 3; the one stage when the staged fit is off), errors, "
     "split_flux (joint flux solves of split components), stages (their sum), patch (images, boxes, grouping, "
     "weight and sky re-solves, type trials, final model), total",
     0, 0},
    {"kind", SP_H5_STR, 8, "", "point: components of point sources only; galaxy: components with a galaxy; all", 0, 0},
    {"cpu", SP_H5_F64, 0, "s", "thread CPU seconds summed over the rank's threads", 0, 0},
    {"source_bands", SP_H5_I64, 0, "", "fitted sources (not held) x bands of the components of this kind", 0, 0},
    {"groups", SP_H5_I64, 0, "", "components of this kind", 0, 0},
};
enum { NFITCOST_ROWS = 2 * SP_FIT_NCOST + 4 };

static int fitcost_rows(const run_t *r, fitcost_row *rows)
{
    static const char *stages[SP_FIT_NCOST] = {"flux", "positions", "shapes", "errors", "split_flux"};
    static const char *kinds[2] = {"point", "galaxy"};
    const sp_fit_patch_stats *c = &r->fitcost;
    int n = 0;
    for (int k = 0; k < 2; k++) {
        double sum = 0.0;
        for (int q = 0; q < SP_FIT_NCOST; q++) {
            fitcost_row *w = &rows[n++];
            memset(w, 0, sizeof *w);
            w->rank = r->rank;
            snprintf(w->stage, sizeof w->stage, "%s", stages[q]);
            snprintf(w->kind, sizeof w->kind, "%s", kinds[k]);
            w->cpu = c->cpu_stage[q][k];
            w->source_bands = c->srcband[k];
            w->groups = c->groups[k];
            sum += w->cpu;
        }
        fitcost_row *w = &rows[n++];
        *w = rows[n - 2];
        snprintf(w->stage, sizeof w->stage, "stages");
        w->cpu = sum;
    }
    for (int q = 0; q < 2; q++) {
        fitcost_row *w = &rows[n++];
        memset(w, 0, sizeof *w);
        w->rank = r->rank;
        snprintf(w->stage, sizeof w->stage, "%s", q ? "total" : "patch");
        snprintf(w->kind, sizeof w->kind, "all");
        w->cpu = q ? c->cpu_total : c->cpu_patch;
        w->source_bands = c->srcband[0] + c->srcband[1];
        w->groups = c->groups[0] + c->groups[1];
    }
    return n;
}

static int write_timing(run_t *r, const sp_coord_stats *st, double *imbalance)
{
    int status = SP_OK;
    sp_prof_row *pr = NULL;
    timing_row *tr = NULL;
    int npr = 0, *counts = NULL;
    SP_TRY(sp_prof_rows(&pr, &npr));
    SP_ALLOC(tr, npr + 1);
    for (int i = 0; i < npr; i++) {
        tr[i].rank = r->rank;
        snprintf(tr[i].region, sizeof tr[i].region, "%s", pr[i].path);
        tr[i].calls = pr[i].calls;
        tr[i].wall = pr[i].wall;
        tr[i].own = pr[i].own;
        tr[i].cpu = pr[i].cpu;
        tr[i].bytes = pr[i].bytes;
    }
    SP_ALLOC(counts, r->nranks);
    MPI_Allgather(&npr, 1, MPI_INT, counts, 1, MPI_INT, r->comm);
    long total = 0, mine = 0;
    for (int k = 0; k < r->nranks; k++) {
        if (k < r->rank) mine += counts[k];
        total += counts[k];
    }
    sp_h5 *h = r->store->h;
    /* a resumed run replaces the timing of the run before it */
    int had_timing = 0;
    SP_TRY(sp_h5_exists(h, "/timing", &had_timing));
    if (had_timing) SP_TRY(sp_h5_delete(h, "/timing"));
    SP_TRY(sp_h5_group_create(h, "/timing"));
    SP_TRY(sp_h5_table_create(h, "/timing/regions", timing_cols, 7, total));
    SP_TRY(sp_h5_table_create(h, "/timing/ranks", rank_cols, 9, r->nranks));
    SP_TRY(sp_h5_table_create(h, "/timing/fit_cost", fitcost_cols, 6, (long)NFITCOST_ROWS * r->nranks));
    status = sp_h5_table_write(h, "/timing/regions", timing_cols, 7, mine, npr, tr);
    if (status == SP_OK) {
        fitcost_row fc[NFITCOST_ROWS];
        int nfc = fitcost_rows(r, fc);
        status = sp_h5_table_write(h, "/timing/fit_cost", fitcost_cols, 6, (long)r->rank * NFITCOST_ROWS, nfc, fc);
    }
    rank_row rr = {.rank = r->rank, .wall = st->wall, .busy = st->busy, .idle = st->idle, .overhead = st->overhead,
                   .cells = st->cells, .peak_rss = sp_prof_peak_rss(), .bytes_read = r->bytes_read,
                   .threads = r->threads};
    if (status == SP_OK) status = sp_h5_table_write(h, "/timing/ranks", rank_cols, 9, r->rank, 1, &rr);
    SP_TRY(sp_mpi_agree(status, r->comm));
    double busy_max = 0, busy_sum = 0;
    MPI_Allreduce(&st->busy, &busy_max, 1, MPI_DOUBLE, MPI_MAX, r->comm);
    MPI_Allreduce(&st->busy, &busy_sum, 1, MPI_DOUBLE, MPI_SUM, r->comm);
    /* ranks that only coordinate have no busy time; exclude them from the mean */
    int working = st->cells > 0, nworking = 0;
    MPI_Allreduce(&working, &nworking, 1, MPI_INT, MPI_SUM, r->comm);
    *imbalance = busy_sum > 0 && nworking > 0 ? busy_max / (busy_sum / nworking) : 1.0;
    SP_TRY(sp_h5_attr_set_double(h, "/timing", "load_imbalance", *imbalance));
cleanup:
    free(pr);
    free(tr);
    free(counts);
    return status;
}

/* ---- the run ------------------------------------------------------------------------ */

static int cmp_cost_desc(const void *a, const void *b, void *arg)
{
    const sp_plan *p = arg;
    const sp_cell *x = &p->cells[*(const int *)a], *y = &p->cells[*(const int *)b];
    if (x->cost != y->cost) return x->cost < y->cost ? 1 : -1;
    return x->id - y->id;
}

int sp_pipeline_run(const sp_run_opts *o, int *agreed)
{
    int status = SP_OK;
    sp_config cfg;
    sp_plan plan;
    sp_store store;
    char *yaml = NULL;
    int8_t *cstat = NULL;
    int *order = NULL;
    uint8_t *need_psf = NULL;
    int have_cfg = 0, have_plan = 0, have_store = 0, have_stages = 0;
    run_t r = {0};
    sp_resources res; /* [issue 6] */
    memset(&plan, 0, sizeof plan);
    memset(&store, 0, sizeof store);
    *agreed = 1;
    r.comm = MPI_COMM_WORLD;
    MPI_Comm_rank(r.comm, &r.rank);
    MPI_Comm_size(r.comm, &r.nranks);
    double t_start = sp_wtime();

    sp_prof_push("config");
    status = sp_pipeline_load_config(o->config_path, o->nsets, o->sets, &cfg, &yaml);
    sp_prof_pop();
    SP_TRY(status);
    have_cfg = 1;
    r.cfg = &cfg;
    /* [watchdog] waits for other ranks end after performance.rank_timeout_s instead of never */
    if (r.nranks > 1) SP_TRY(sp_watchdog_start(cfg.performance.rank_timeout_s));
    /* [issue 6] resource planner: ranks, nodes, cores, binding, memory -> threads per rank */
    SP_TRY(sp_resources_setup(&cfg, r.comm, &res, &r.threads));
    r.prep_threads = cfg.performance.frame_prep_workers == SP_CONFIG_AUTO ? r.threads : cfg.performance.frame_prep_workers;
    r.white_threads = cfg.performance.white_stack_workers == SP_CONFIG_AUTO ? r.threads : cfg.performance.white_stack_workers;

    if (!o->plan_only) {
        status = r.rank == 0 ? mkdir_p(cfg.outputs.work_dir) : SP_OK;
        if (status == SP_OK && r.rank == 0 && cfg.outputs.save_white) {
            char wd[SP_PATH_MAX + 8];
            snprintf(wd, sizeof wd, "%s/white", cfg.outputs.work_dir);
            status = mkdir_p(wd);
        }
        SP_TRY(sp_mpi_agree(status, r.comm));
        if (r.rank == 0 && cfg.outputs.log_file) {
            status = sp_log_open_file(cfg.outputs.log_file);
            if (status != SP_OK) SP_WARN("%s (continuing without a log file)", sp_err_msg());
            status = SP_OK;
        }
    }
    if (r.rank == 0) SP_INFO("surveyproc %s (git %s): %s, %d rank(s) x %d thread(s)", SP_VERSION, SP_GIT_HASH,
                             o->config_path, r.nranks, r.threads);

    sp_plan_opts po;
    plan_opts_from_config(&cfg, r.threads, &po);
    sp_prof_push("plan");
    status = sp_plan_build(&po, r.comm, &plan);
    sp_prof_pop();
    SP_TRY(status);
    have_plan = 1;
    r.plan = &plan;
    /* [issue 6] memory and core verdict, BLAS speed; plan prints the layout report */
    SP_TRY(sp_resources_check(&res, &plan, 1, r.comm));
    if (r.rank == 0) {
        /* with `plan --emit` and no --emit-out the job script is stdout; the report goes to stderr */
        FILE *out = o->plan_only && !(o->emit && o->emit->kind && !o->emit->out[0]) ? stdout : stderr;
        if (o->plan_only || sp_log_get_level() <= SP_LOG_INFO) sp_plan_print(&plan, out, o->verbose_plan);
        if (o->plan_only) {
            sp_resources_print(&res, out);
            fprintf(out, "Store: %s\n", cfg.outputs.store);
        } else {
            sp_resources_log(&res);
        }
    }
    if (o->plan_only && o->emit && o->emit->kind) {
        /* the script is for another layout: this one's verdict does not apply */
        SP_TRY(sp_resources_emit_job(o->emit, &cfg, &plan, &res, o->config_path, r.comm));
        goto cleanup;
    }
    SP_TRY(sp_mpi_agree(sp_resources_refusal(&res), r.comm));
    if (o->plan_only) goto cleanup;
    /* [issue 6] FFTW wisdom (performance.fftw_wisdom_file): read before any plan is made */
    int wisdom_loaded = 0;
    SP_TRY(sp_resources_fftw_wisdom_load(cfg.performance.fftw_wisdom_file, r.comm, &wisdom_loaded));
    /* stage parameters, reference PSF stars, FFTW plans and the per-thread fit workspaces */
    status = cell_stages_setup(&r);
    have_stages = 1;
    SP_TRY(sp_mpi_agree(status, r.comm));

    /* store: new, or resume an interrupted one */
    uint64_t sh = 0;
    sp_config_science_hash(&cfg, &sh);
    sp_store_meta meta = {.config_yaml = yaml, .command = o->command_line, .science_hash = sh,
                          .inputs_hash = plan.inputs_hash ^ r.given_hash, .mpi_size = r.nranks, .threads = r.threads,
                          .epsf_size = cfg.epsf.final_psf_size, .epsf_oversamp = cfg.epsf.oversamp};
    if (cfg.epsf.interpolation == SP_CFG_EPSF_INTERP_POLYNOMIAL)
        meta.epsf_poly_terms = (cfg.epsf.poly_degree + 1) * (cfg.epsf.poly_degree + 2) / 2;
    meta.epsf_moffat_field = cfg.epsf.moffat_field;
    {
        long side = plan.nx > plan.ny ? plan.nx : plan.ny;
        meta.qa_white_ds = (int)((side + 2047) / 2048);
        meta.qa_bkg_ds = cfg.epsf.save_patch_background_diagnostics ? (int)((side + 511) / 512) : 0;
        meta.qa_growth_n = cfg.epsf.save_growth_curve ? cfg.epsf.final_psf_size - 1 : 0;
        meta.qa_resid = cfg.epsf.save_residual_diagnostics;
        const sp_cfg_patch_run *pr = &cfg.patch_run;
        long left = plan.cat.n - pr->cutout_start;
        long ncut = pr->cutout_max_sources == SP_CONFIG_NULL_INT ? left : pr->cutout_max_sources;
        meta.qa_cut_start = pr->cutout_start;
        meta.qa_cut_n = pr->no_cutouts || left <= 0 ? 0 : (ncut < left ? ncut : left);
        meta.qa_cut_size = pr->cutout_size;
        meta.qa_overview = !pr->no_patch_overview;
        r.qa = meta;
    }
    SP_ALLOC(cstat, plan.ncells);
    int exists = access(cfg.outputs.store, F_OK) == 0;
    sp_prof_push("store");
    sp_watchdog_arm("creating or opening the store (collective HDF5 calls)", 0);
    if (o->resume && exists) {
        status = sp_store_open_resume(cfg.outputs.store, &plan, &meta, r.comm, &store, cstat);
    } else if (exists && !cfg.outputs.overwrite && !o->resume) {
        status = SP_FAIL(SP_ERR_STATE,
                         "%s already exists; use `surveyproc run --resume` to finish it, set outputs.overwrite: true "
                         "to replace it, or choose another outputs.store",
                         cfg.outputs.store);
    } else {
        if (o->resume && r.rank == 0) SP_WARN("%s does not exist: starting a new run", cfg.outputs.store);
        status = sp_store_create(cfg.outputs.store, &plan, &meta, r.comm, &store);
        for (int k = 0; k < plan.ncells; k++) cstat[k] = plan.cells[k].active ? SP_CELL_TODO : SP_CELL_SKIPPED;
    }
    sp_watchdog_disarm();
    sp_prof_pop();
    SP_TRY(status);
    have_store = 1;
    r.store = &store;
    if (store.resumed) {
        /* the QA diagnostics are the ones the store was created with (their toggles are not
         * part of the science hash, so they may differ in this run's config) */
        int ex = 0;
        char q[160];
        SP_TRY(sp_h5_exists(store.h, "/qa/white", &ex));
        if (!ex) r.qa.qa_white_ds = 0;
        SP_TRY(sp_h5_exists(store.h, "/qa/background", &ex));
        if (!ex) r.qa.qa_bkg_ds = 0;
        snprintf(q, sizeof q, "/epsf/%s_growth_ee", plan.bands[0]);
        SP_TRY(sp_h5_exists(store.h, q, &ex));
        if (!ex) r.qa.qa_growth_n = 0;
        snprintf(q, sizeof q, "/epsf/%s_resid", plan.bands[0]);
        SP_TRY(sp_h5_exists(store.h, q, &ex));
        if (!ex) r.qa.qa_resid = 0;
        SP_TRY(sp_h5_exists(store.h, "/qa/cutouts", &ex));
        if (!ex) r.qa.qa_cut_n = 0;
        else {
            long dims[8] = {0};
            int ndim = 0;
            SP_TRY(sp_h5_dims(store.h, "/qa/cutouts/data", &ndim, dims));
            r.qa.qa_cut_n = dims[0];
            r.qa.qa_cut_size = (int)dims[2];
            long first = -1;
            long st1 = 0, n1 = 1;
            if (dims[0] > 0) SP_TRY(sp_h5_array_read(store.h, "/qa/cutouts/row", SP_H5_I64, &st1, &n1, &first));
            r.qa.qa_cut_start = first;
        }
        SP_TRY(sp_h5_exists(store.h, "/qa/patch_overview", &ex));
        if (!ex) r.qa.qa_overview = 0;
    }

    /* cells to do, most expensive first */
    SP_ALLOC(order, plan.ncells);
    SP_ALLOC(need_psf, plan.ncells);
    int ntodo = 0, ndone_before = 0, npsf = 0;
    SP_TRY(psf_grid_load(&r, need_psf));
    for (int k = 0; k < plan.ncells; k++)
        if (need_psf[k]) order[npsf++] = k;
    qsort_r(order, (size_t)npsf, sizeof *order, cmp_cost_desc, &plan);
    int dedicated = cfg.performance.dedicated_coordinator == SP_CFG_COORD_ALWAYS ||
                    (cfg.performance.dedicated_coordinator == SP_CFG_COORD_AUTO && r.nranks >= 16);
    sp_coord_stats st = {0}, st_psf = {0};
    sp_coord_watch watch = {.timeout_s = cfg.performance.rank_timeout_s, .estimate = watch_estimate,
                            .lost = watch_lost, .fatal = sp_fatal, .arg = &r, .pass = "PSF pass"};
    sp_coord_set_watch(&watch);
    /* PSF pass: the ePSF of every active cell that has none yet */
    r.phase = RUN_PSF_PASS;
    if (r.rank == 0) sp_progress_start(&r.progress, "ePSF cells", npsf, cfg.logging.progress_heartbeat_s);
    r.ncells_done = 0;
    sp_prof_push("psf_phase");
    status = sp_coord_run(order, npsf, dedicated, r.comm, process_cell, &r, on_cell_done, &r, &st_psf);
    sp_prof_pop();
    if (status != SP_OK) {
        *agreed = 0; /* other ranks may be blocked in the queue: the driver aborts */
        goto cleanup;
    }
    if (r.rank == 0) sp_progress_finish(&r.progress);
    sp_prof_push("psf_share");
    sp_watchdog_arm("sharing the ePSF grid after the PSF pass", 0);
    status = psf_grid_share(&r);
    sp_watchdog_disarm();
    sp_prof_pop();
    SP_TRY(status);
    SP_TRY(apcal_radii(&r));
    /* fit pass */
    for (int k = 0; k < plan.ncells; k++) {
        if (cstat[k] == SP_CELL_DONE) ndone_before++;
        else if (plan.cells[k].active) order[ntodo++] = k;
    }
    qsort_r(order, (size_t)ntodo, sizeof *order, cmp_cost_desc, &plan);
    r.phase = RUN_FIT_PASS;
    r.ncells_done = 0;
    if (r.rank == 0) {
        if (store.resumed)
            SP_INFO("resuming %s: %d cell(s) already done, %d to do (%d ePSF cell(s) rebuilt)", cfg.outputs.store,
                    ndone_before, ntodo, npsf);
        sp_progress_start(&r.progress, "cells", ntodo, cfg.logging.progress_heartbeat_s);
    }
    watch.pass = "fit pass";
    sp_coord_set_watch(&watch);
    sp_prof_push("cells_phase");
    status = sp_coord_run(order, ntodo, dedicated, r.comm, process_cell, &r, on_cell_done, &r, &st);
    sp_prof_pop();
    if (status != SP_OK) {
        *agreed = 0; /* other ranks may be blocked in the queue: the driver aborts */
        goto cleanup;
    }
    /* both passes count in the rank's totals (timing table, imbalance) */
    st.wall += st_psf.wall;
    st.busy += st_psf.busy;
    st.idle += st_psf.idle;
    st.overhead += st_psf.overhead;
    if (r.rank == 0) sp_progress_finish(&r.progress);

    /* finish: timing table, summary */
    sp_prof_push("finish");
    double imbalance = 1;
    sp_watchdog_arm("writing the timing tables (collective HDF5 calls)", 0);
    status = write_timing(&r, &st, &imbalance);
    sp_watchdog_disarm();
    sp_prof_pop();
    if (status != SP_OK) /* (agreed) e.g. a disk that filled up during the run */
        sp_err_context("finish phase (every cell is done and stored; fix this, then `surveyproc run --resume` "
                       "completes the store)");
    SP_TRY(status);
    SP_TRY(sp_resources_fftw_wisdom_save(cfg.performance.fftw_wisdom_file, r.comm)); /* [issue 6] */
    /* [issue 10] zero points and exports: every rank closes the store, then rank 0 calibrates it
     * and writes outputs.export_formats with the serial driver; the outcome is agreed. */
    sp_watchdog_arm("closing the store (a collective HDF5 call: every rank must take part)", 0);
    status = sp_store_close(&store);
    sp_watchdog_disarm();
    have_store = 0;
    SP_TRY(sp_mpi_agree(status, r.comm));
    if (r.rank == 0) {
        sp_prof_push("zp");
        status = sp_zp_calibrate_file(cfg.outputs.store, &cfg, NULL);
        sp_prof_pop();
        sp_prof_push("export");
        if (status == SP_OK) status = sp_export_run_outputs(&cfg, cfg.outputs.store);
        sp_prof_pop();
        if (status != SP_OK)
            sp_err_context("finish phase (the cells are done and stored: fix this, then `surveyproc zp CONFIG` "
                           "and `surveyproc export STORE`)");
    }
    SP_TRY(sp_mpi_agree(status, r.comm)); /* [/issue 10] */
    sp_prof_merged *mg = NULL;
    int nmg = 0;
    sp_watchdog_arm("merging the timing profiles of the ranks", 0);
    status = sp_prof_merge(r.comm, &mg, &nmg);
    double coord_over = st.overhead;
    MPI_Bcast(&coord_over, 1, MPI_DOUBLE, 0, r.comm);
    double wall = sp_wtime() - t_start;
    long nfit[2] = {r.nfit_sources, r.nfit_patches}, nfit_all[2] = {0, 0};
    MPI_Reduce(nfit, nfit_all, 2, MPI_LONG, MPI_SUM, 0, r.comm);
    /* the fit's CPU by kind of component: [point stages, galaxy stages, patch, total], source-bands */
    double fc[4] = {0, 0, r.fitcost.cpu_patch, r.fitcost.cpu_total}, fc_all[4] = {0, 0, 0, 0};
    for (int q = 0; q < SP_FIT_NCOST; q++) {
        fc[0] += r.fitcost.cpu_stage[q][0];
        fc[1] += r.fitcost.cpu_stage[q][1];
    }
    long fsb[2] = {r.fitcost.srcband[0], r.fitcost.srcband[1]}, fsb_all[2] = {0, 0};
    MPI_Reduce(fc, fc_all, 4, MPI_DOUBLE, MPI_SUM, 0, r.comm);
    MPI_Reduce(fsb, fsb_all, 2, MPI_LONG, MPI_SUM, 0, r.comm);
    sp_watchdog_disarm();
    SP_TRY(status);
    if (r.rank == 0) {
        if (cfg.logging.timing_report) sp_prof_print(stderr, mg, nmg, r.nranks);
        long nexcl = 0;
        for (long i = 0; i < plan.cat.n; i++) nexcl += plan.cat.excl[i] != 0;
        printf("Summary: %ld sources (%ld active, %ld excluded in plan), %d bands, %d cells (%d processed now, %d "
               "earlier, %d skipped empty)\n",
               plan.cat.n, plan.nsrc_active, nexcl, plan.nbands, plan.ncells, ntodo, ndone_before,
               plan.ncells - plan.ncells_active);
        printf("Fitted %ld source(s) in %ld patch(es) this run\n", nfit_all[0], nfit_all[1]);
        if (fc_all[3] > 0)
            printf("Fit CPU %.2f s: point-source components %ld source-bands at %.0f per core-second, components "
                   "with a galaxy %ld at %.0f, per-patch work %.0f%% (/timing/fit_cost)\n",
                   fc_all[3], fsb_all[0], fc_all[0] > 0 ? fsb_all[0] / fc_all[0] : 0.0, fsb_all[1],
                   fc_all[1] > 0 ? fsb_all[1] / fc_all[1] : 0.0, 100.0 * fc_all[2] / fc_all[3]);
        printf("Wall %.2f s on %d rank(s) x %d thread(s); load imbalance %.2f; coordinator overhead %.3f s "
               "(%.2f%%); store %s\n",
               wall, r.nranks, r.threads, imbalance, coord_over, wall > 0 ? 100 * coord_over / wall : 0,
               cfg.outputs.store);
        fflush(stdout);
    }
    free(mg);
cleanup:
    if (have_store && *agreed) {
        int st2 = sp_store_close(&store);
        if (status == SP_OK) status = st2;
    }
    if (have_stages) cell_stages_cleanup(&r);
    ioprep_free(&r);
    free(r.apcal_r);
    if (have_plan) sp_plan_free(&plan);
    if (have_cfg) sp_config_free(&cfg);
    free(yaml);
    free(cstat);
    free(order);
    free(need_psf);
    return status;
}

/* cell_psf.c — the PSF stages of a cell: background mesh per band, detection on
 * the white stack, PSF-star selection and the ePSF of every band (docs/psf.md),
 * and the ePSF cube written to /epsf/<band>. Also the run-level set-up of the
 * stage parameters from the config. */
#include "cell.h"

#include "surveyproc/sp_error.h"
#include "surveyproc/sp_mpi.h"
#include "surveyproc/sp_prep.h"
#include "surveyproc/sp_prof.h"
#include "surveyproc/sp_zp.h"
#include "surveyproc/sp_score.h" /* sp_score_median */

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* epsf.interpolation: polynomial (see cell.h) */
struct band_cuts {
    sp_epsf_cutout *c;
    int32_t *cell, *seq; /* the cell that cut each star out, and its order there */
    int n, cap;
};
struct poly_model {
    sp_psf *psf;         /* the constant term (the PSF at the tile centre); NULL: no model */
    float *terms;        /* the other terms (sp_epsf_poly_eval) */
    int degree, nstars, ncuts;
    double xref, yref, scale;
};

static void band_cuts_free(struct band_cuts *bc)
{
    for (int i = 0; i < bc->n; i++) sp_epsf_cutout_free(&bc->c[i]);
    free(bc->c);
    free(bc->cell);
    free(bc->seq);
    memset(bc, 0, sizeof *bc);
}

static void poly_model_free(struct poly_model *m)
{
    sp_psf_free(&m->psf);
    free(m->terms);
    memset(m, 0, sizeof *m);
}

/* The 8-value description of a model, as /epsf/poly_info stores it and the
 * share broadcasts it: built flag, degree, stars used, x_ref, y_ref, scale,
 * FWHM, stars given. */
static void poly_info_pack(const struct poly_model *m, double h[8])
{
    const double built[8] = {1, m->degree, m->nstars, m->xref, m->yref, m->scale, m->psf ? m->psf->fwhm : NAN,
                             m->ncuts};
    const double none[8] = {0, NAN, NAN, NAN, NAN, NAN, NAN, m->ncuts};
    memcpy(h, m->psf ? built : none, sizeof built);
}

/* The model's samples, constant term first then the other terms, into buf
 * (nterms x so^2 floats), or back from it into a model (allocated here) that
 * poly_info_unpack described. */
static void poly_terms_pack(const struct poly_model *m, int so, float *buf)
{
    const size_t ss = (size_t)so * so;
    int nt = (m->degree + 1) * (m->degree + 2) / 2;
    memcpy(buf, m->psf->data, sizeof *buf * ss);
    if (nt > 1) memcpy(buf + ss, m->terms, sizeof *buf * (size_t)(nt - 1) * ss);
}

static int poly_info_unpack(const double h[8], int so, int os, const float *buf, struct poly_model *m)
{
    int status = SP_OK;
    const size_t ss = (size_t)so * so;
    m->ncuts = (int)h[7];
    if (h[0] != 1) return SP_OK;
    m->degree = (int)h[1];
    m->nstars = (int)h[2];
    m->xref = h[3];
    m->yref = h[4];
    m->scale = h[5];
    int nt = (m->degree + 1) * (m->degree + 2) / 2;
    SP_TRY(sp_psf_alloc(so, os, &m->psf));
    memcpy(m->psf->data, buf, sizeof *buf * ss);
    m->psf->fwhm = h[6];
    m->psf->nstars = m->nstars;
    m->psf->is_fallback = 0;
    if (nt > 1) {
        SP_ALLOC(m->terms, (size_t)(nt - 1) * ss);
        memcpy(m->terms, buf + ss, sizeof *buf * (size_t)(nt - 1) * ss);
    }
cleanup:
    return status;
}

void thread_err_record(thread_err *e, int st, const char *what)
{
    if (st == SP_OK) return;
#pragma omp critical(sp_thread_err)
    if (e->status == SP_OK) {
        e->status = st;
        snprintf(e->msg, sizeof e->msg, "%s: %s", what, sp_err_msg());
    }
}

int thread_err_raise(const thread_err *e)
{
    return e->status == SP_OK ? SP_OK : sp_err_set(e->status, __FILE__, __LINE__, "%s", e->msg);
}

/* ---- set-up ------------------------------------------------------------------------- */

static void params_from_config(const sp_config *cfg, int threads, int nbands, stage_params *s)
{
    const sp_cfg_epsf *e = &cfg->epsf;
    const sp_cfg_patch_run *pr = &cfg->patch_run;
    memset(s, 0, sizeof *s);

    sp_bkg_params_default(&s->bkg);
    s->bkg.boxsize = e->background_boxsize;
    s->bkg.filtersize = e->background_filtersize;
    s->bkg.mask_sigma = e->background_source_mask_sigma;
    s->bkg.mask_dilate = e->background_mask_dilate;
    s->subtract_bkg = e->background_subtract_patch;

    sp_detect_params_default(&s->det);
    s->det.thresh_sigma = e->thresh_sigma;
    s->det.minarea = e->minarea;
    s->det.deblend = e->deblend;
    s->det.fwhm = e->fallback_fwhm_pix;

    sp_starsel_params_default(&s->sel);
    s->sel.mode = e->psfstar_mode == SP_CFG_PSFSTAR_DETECT      ? SP_PSFSTAR_DETECT
                  : e->psfstar_mode == SP_CFG_PSFSTAR_REFERENCE ? SP_PSFSTAR_REFERENCE
                                                                 : SP_PSFSTAR_BOTH;
    s->sel.stamp_size = e->final_psf_size;
    s->sel.edge_pad = e->edge_pad;
    s->sel.q_min = e->q_range[0];
    s->sel.q_max = e->q_range[1] < 1.0 ? e->q_range[1] : 1.0; /* q = b/a never exceeds 1 */
    s->sel.min_sep = e->min_sep;
    s->sel.min_sep_flux_ratio = e->min_sep_flux_ratio;
    s->sel.size_tol = e->psfstar_size_tol;
    s->sel.snr_min = e->snr_min;
    s->sel.max_stars = e->max_stars;
    s->sel.fwhm = e->fallback_fwhm_pix;
    if (e->star_local_bkg_subtract) {
        s->sel.bkg_rin = e->star_local_bkg_annulus_rin_pix;
        s->sel.bkg_rout = e->star_local_bkg_annulus_rout_pix;
    }
    s->sel.match_radius = e->reference_snap_to_detection ? e->reference_match_r_pix : 0.0;

    sp_epsf_params_default(&s->epsf);
    s->epsf.oversamp = e->oversamp;
    s->epsf.final_size = e->final_psf_size;
    s->epsf.max_iters = e->maxiters;
    s->epsf.clip_sigma = e->do_clip ? e->clip_sigma : 0.0;
    s->epsf.smooth = e->smoothing_kernel != SP_CFG_SMOOTH_NONE;
    /* one ePSF per cell, applying at its centre; across the tile the PSF is the
     * bilinear blend of neighbouring cells (psf_grid_at): measured better than a
     * linear model within each cell for the 10-30 stars a cell typically has */
    s->epsf.spatial_degree = 0;
    s->epsf.local_bkg = e->star_local_bkg_subtract;
    s->epsf.min_stars = pr->min_epsf_nstars_for_use > 0 ? pr->min_epsf_nstars_for_use : 1;
    s->epsf.fallback_fwhm = e->fallback_fwhm_pix;
    s->epsf.fallback_beta = e->fallback_model == SP_CFG_FALLBACK_GAUSSIAN ? 20.0 : e->fallback_moffat_beta;
    s->epsf.keep_stamps = e->save_residual_diagnostics;
    s->epsf.core_fwhm = e->empirical_core_fwhm;
    s->epsf.fallback_resid_fwhm = e->fallback_residual_fwhm;
    s->epsf.fallback_reject_sigma = e->fallback_reject_sigma;
    s->epsf.wing_smooth_k = e->wing_smoothing;
    /* polynomial: one model per band over the tile; a band whose model fails
     * its gate blends the cell grid as bilinear does */
    s->blend_psf = e->interpolation != SP_CFG_EPSF_INTERP_NONE;
    s->poly = e->interpolation == SP_CFG_EPSF_INTERP_POLYNOMIAL;
    s->poly_degree = e->poly_degree;
    s->use_catalog = e->psfstar_use_catalog;
    s->nb_mask_sigma = e->neighbour_mask_sigma;
    s->borrow = e->fallback_borrow;
    s->cross_validate = e->cross_validate;

    sp_fit_options_default(&s->fit);
    s->fit.staged = pr->enable_staged_fit;
    s->fit.n_opt_iters = pr->n_opt_iters;
    s->fit.dlnp_stop = pr->dlnp_stop;
    s->fit.multiband = pr->enable_multi_band_simultaneous_fitting;
    s->fit.fit_sky = pr->fit_sky;
    s->fit.max_shift = pr->max_shift_pix;
    s->fit.pos_prior_sigma = pr->position_prior_pix;
    s->fit.max_group = pr->max_group_size;
    s->fit.re_max = pr->re_max_pix;
    s->fit.q_min = pr->q_min;
    s->fit.n_min = pr->sersic_n_min;
    s->fit.n_max = pr->sersic_n_max;
    s->fit.conv = pr->psf_model == SP_CFG_PSF_PIXELIZED ? SP_FIT_CONV_FFT : SP_FIT_CONV_GMIX;
    s->fit.psf_gmix_k = pr->gaussian_mixture_n;
    s->fit.gal_profiles = pr->galaxy_profiles == SP_CFG_GALPROF_TRACTOR ? SP_FIT_PROF_TRACTOR : SP_FIT_PROF_TRUNCATED;
    s->fit.untyped_alt = 0;
    for (int k = 0; k < pr->untyped_alternatives.n; k++)
        s->fit.untyped_alt |= 1u << (strcmp(pr->untyped_alternatives.v[k], "dev") == 0 ? SP_SRC_DEV : SP_SRC_EXP);
    s->halo_fixed = pr->halo_source_mode == SP_CFG_HALO_FIXED;
    s->poisson_from_model = pr->poisson_from_model;

    int bt = e->max_workers == SP_CONFIG_AUTO ? threads : e->max_workers;
    if (bt > nbands) bt = nbands;
    if (bt > threads) bt = threads;
    s->band_threads = e->parallel_bands && bt > 1 ? bt : 1;
}

/* Reference stars (inputs.reference_catalog) as PSF-star candidates: read by
 * every rank (a small CSV), projected on the tile. */
static int load_refs(run_t *r)
{
    int status = SP_OK;
    const sp_plan *p = r->plan;
    sp_zp_refcat ref;
    memset(&ref, 0, sizeof ref);
    const char **bands = NULL;
    long nbad = 0;
    if (r->sp.sel.mode == SP_PSFSTAR_DETECT || !r->cfg->inputs.reference_catalog) {
        if (r->sp.sel.mode == SP_PSFSTAR_REFERENCE)
            return SP_FAIL(SP_ERR_CONFIG, "epsf.psfstar_mode: reference needs inputs.reference_catalog (set it, "
                                          "or use psfstar_mode: detect)");
        r->sp.sel.mode = SP_PSFSTAR_DETECT;
        return SP_OK;
    }
    SP_ALLOC(bands, p->nbands);
    for (int b = 0; b < p->nbands; b++) bands[b] = p->bands[b];
    status = sp_zp_refcat_read(r->cfg->inputs.reference_catalog, bands, p->nbands, &ref);
    if (status != SP_OK) {
        sp_err_context("inputs.reference_catalog (PSF-star candidates, epsf.psfstar_mode)");
        goto cleanup;
    }
    r->refs.n = ref.n;
    SP_ALLOC(r->refs.x, ref.n + 1);
    SP_ALLOC(r->refs.y, ref.n + 1);
    SP_ALLOC(r->refs.mag, (ref.n + 1) * p->nbands);
    if (ref.n > 0) SP_TRY(sp_wcs_sky2pix(p->wcs, ref.n, ref.ra, ref.dec, r->refs.x, r->refs.y, &nbad));
    memcpy(r->refs.mag, ref.mag, (size_t)ref.n * p->nbands * sizeof *ref.mag);
cleanup:
    sp_zp_refcat_free(&ref);
    free(bands);
    return status;
}

int cell_stages_setup(run_t *r)
{
    int status = SP_OK;
    const sp_plan *p = r->plan;
    params_from_config(r->cfg, r->threads, p->nbands, &r->sp);
    if (r->sp.poly) {
        SP_ALLOC(r->fcuts, p->nbands);
        SP_ALLOC(r->poly, p->nbands);
    }
    SP_TRY(psf_field_setup(r));
    long nc = p->ncells, ng = p->opts.epsf_ngrid;
    SP_ALLOC(r->grid, nc * p->nbands);
    SP_ALLOC(r->grid_nstars, nc * p->nbands);
    SP_ALLOC(r->grid_kind, nc * p->nbands);
    SP_ALLOC(r->grid_mine, nc);
    SP_ALLOC(r->xedge, ng + 1);
    SP_ALLOC(r->yedge, ng + 1);
    for (long k = 0; k < nc * p->nbands; k++) r->grid_nstars[k] = -1;
    for (long i = 0; i < ng; i++) {
        r->xedge[i] = p->cells[i].bx0 - 0.5;
        r->yedge[i] = p->cells[i * ng].by0 - 0.5;
    }
    r->xedge[ng] = p->cells[ng - 1].bx1 - 0.5;
    r->yedge[ng] = p->cells[(ng - 1) * ng].by1 - 0.5;
    if (r->cfg->patch_run.sky_order > 0 && r->rank == 0)
        SP_WARN("patch_run.sky_order = %d: the fitter fits a constant sky per band and patch; the background mesh "
                "(epsf.background_subtract_patch) takes the gradients",
                r->cfg->patch_run.sky_order);
    SP_ALLOC(r->band_satlevel, p->nbands);
    for (int b = 0; b < p->nbands; b++) r->band_satlevel[b] = INFINITY;
    for (int i = 0; i < p->nframes; i++) {
        const sp_frame *f = &p->frames[i];
        if (f->saturate > 0 && isfinite(f->saturate)) {
            double s = f->saturate * f->scale;
            if (s < r->band_satlevel[f->band_index]) r->band_satlevel[f->band_index] = s;
        }
    }
    SP_TRY(load_refs(r));
    SP_TRY(psf_given_load(r));
    /* FFTW plans serially, then one fit workspace per thread, reused by every patch */
    SP_TRY(sp_fit_init());
    SP_ALLOC(r->ws, r->threads);
    for (int t = 0; t < r->threads; t++) {
        SP_TRY(sp_fit_workspace_create(0, 0, p->nbands, &r->ws[t]));
        /* each thread's workspace at once for the largest patch of the plan: the memory is
         * resident from the start and is what the planner counts per thread */
        SP_TRY(sp_fit_workspace_reserve(r->ws[t], &p->fit_reserve));
    }
cleanup:
    return status;
}

void cell_stages_cleanup(run_t *r)
{
    if (r->ws)
        for (int t = 0; t < r->threads; t++) sp_fit_workspace_free(&r->ws[t]);
    free(r->ws);
    r->ws = NULL;
    free(r->refs.x);
    free(r->refs.y);
    free(r->refs.mag);
    memset(&r->refs, 0, sizeof r->refs);
    free(r->band_satlevel);
    r->band_satlevel = NULL;
    psf_given_free(r);
    if (r->grid)
        for (long k = 0; k < (long)r->plan->ncells * r->plan->nbands; k++) sp_psf_free(&r->grid[k]);
    free(r->grid);
    free(r->grid_nstars);
    free(r->grid_kind);
    free(r->grid_mine);
    free(r->xedge);
    free(r->yedge);
    r->grid = NULL;
    r->grid_nstars = r->grid_kind = NULL;
    r->grid_mine = NULL;
    r->xedge = r->yedge = NULL;
    if (r->fcuts)
        for (int b = 0; b < r->plan->nbands; b++) band_cuts_free(&r->fcuts[b]);
    free(r->fcuts);
    r->fcuts = NULL;
    if (r->poly)
        for (int b = 0; b < r->plan->nbands; b++) poly_model_free(&r->poly[b]);
    free(r->poly);
    r->poly = NULL;
    psf_field_free(r);
}

/* ---- background --------------------------------------------------------------------- */

/* Per band: the background mesh (sources masked), its RMS map, and (by
 * default) the background subtracted, so detection, the ePSF stars and the fit
 * see sky-free pixels. Bands run on the rank's threads. */
int stage_background(cell_t *c)
{
    int status = SP_OK;
    run_t *r = c->run;
    int nb = r->plan->nbands;
    thread_err te = {0};
    int keep_back = r->phase == RUN_PSF_PASS && r->qa.qa_bkg_ds > 0;
    SP_ALLOC(c->rms, nb);
    for (int b = 0; b < nb; b++) SP_ALLOC(c->rms[b], c->npix);
    if (keep_back) {
        SP_ALLOC(c->back, nb);
        for (int b = 0; b < nb; b++) SP_ALLOC(c->back[b], c->npix);
    }
#pragma omp parallel for schedule(dynamic, 1) num_threads(r->sp.band_threads)
    for (int b = 0; b < nb; b++) {
        sp_bkg *bk = NULL;
        int st = sp_bkg_estimate(c->data[b], c->ivar[b], c->mask[b], (int)c->nx, (int)c->ny, &r->sp.bkg, &bk);
        if (st == SP_OK) st = sp_bkg_map(bk, keep_back ? c->back[b] : NULL, c->rms[b]);
        if (st == SP_OK && r->sp.subtract_bkg) {
            st = sp_bkg_subtract(bk, c->data[b]);
            /* masked pixels stay 0: they never enter a sum */
            for (size_t k = 0; k < c->npix && st == SP_OK; k++)
                if (c->ivar[b][k] <= 0) c->data[b][k] = 0;
        }
        sp_bkg_free(&bk);
        if (st != SP_OK) {
            char what[96];
            snprintf(what, sizeof what, "background of band %s", r->plan->bands[b]);
            thread_err_record(&te, st, what);
        }
    }
    status = thread_err_raise(&te);
cleanup:
    return status;
}

/* ---- detection ---------------------------------------------------------------------- */

/* Detections on the white stack: the PSF-star candidates, and the neighbours
 * masked in the star cutouts. */
int stage_detect(cell_t *c)
{
    int status = SP_OK;
    float *wrms = NULL;
    uint8_t *wmask = NULL;
    SP_ALLOC(wrms, c->npix);
    SP_ALLOC(wmask, c->npix);
    for (size_t k = 0; k < c->npix; k++) {
        float iv = c->white_ivar[k];
        wrms[k] = iv > 0 ? 1.0f / sqrtf(iv) : 0.0f;
        wmask[k] = iv > 0 ? 0 : SP_PIX_BAD;
    }
    status = sp_detect(c->white, wrms, wmask, (int)c->nx, (int)c->ny, NULL, &c->run->sp.det, &c->det, &c->ndet);
cleanup:
    free(wrms);
    free(wmask);
    return status;
}

/* ---- ePSF --------------------------------------------------------------------------- */

/* The ePSF of band b sampled at the image-pixel grid (what /epsf/<band> holds). */
void psf_sample_pixels(const sp_psf *psf, int size, float *out)
{
    double c = 0.5 * (size - 1);
    for (int j = 0; j < size; j++)
        for (int i = 0; i < size; i++) out[j * size + i] = (float)sp_psf_eval(psf, i - c, j - c);
}

/* Mean of the used stars' residual stamps ((star - bkg)/flux - ePSF, NaN where
 * unusable) into out[size^2]; 0 if there is none (nothing to store). */
static int mean_resid(const sp_epsf_result *e, int size, float *out)
{
    if (!e->resid_stamps || e->stamp_size != size || e->nstars_in <= 0) return 0;
    size_t np = (size_t)size * size;
    int any = 0;
    for (size_t k = 0; k < np; k++) {
        double s = 0;
        int n = 0;
        for (int j = 0; j < e->nstars_in; j++) {
            if (e->star_used && !e->star_used[j]) continue;
            float v = e->resid_stamps[(size_t)j * np + k];
            if (!isfinite(v)) continue;
            s += v;
            n++;
        }
        out[k] = n > 0 ? (float)(s / n) : NAN;
        any |= n > 0;
    }
    return any;
}

/* One band of one cell to /epsf/<band>, <band>_os, _fallback, _nstars (nstars last). */
static int write_epsf_band(run_t *r, const sp_cell *ce, int b, const sp_psf *psf, int32_t nst, int32_t kind,
                           float *buf)
{
    int status = SP_OK;
    const sp_plan *p = r->plan;
    int size = r->cfg->epsf.final_psf_size;
    char path[160];
    psf_sample_pixels(psf, size, buf);
    long st4[4] = {ce->iy, ce->ix, 0, 0}, n4[4] = {1, 1, size, size};
    snprintf(path, sizeof path, "/epsf/%s", p->bands[b]);
    SP_TRY(sp_h5_array_write(r->store->h, path, SP_H5_F32, st4, n4, buf));
    long so = psf->size, no[4] = {1, 1, so, so};
    snprintf(path, sizeof path, "/epsf/%s_os", p->bands[b]);
    SP_TRY(sp_h5_array_write(r->store->h, path, SP_H5_F32, st4, no, psf->data));
    snprintf(path, sizeof path, "/epsf/%s_fallback", p->bands[b]);
    SP_TRY(sp_h5_array_write(r->store->h, path, SP_H5_I32, st4, n4, &kind));
    /* nstars last: >= 0 marks this band's ePSF of the cell as stored (resume) */
    snprintf(path, sizeof path, "/epsf/%s_nstars", p->bands[b]);
    SP_TRY(sp_h5_array_write(r->store->h, path, SP_H5_I32, st4, n4, &nst));
cleanup:
    return status;
}

static int write_epsf(cell_t *c)
{
    int status = SP_OK;
    run_t *r = c->run;
    int size = r->cfg->epsf.final_psf_size;
    float *buf = NULL;
    SP_ALLOC(buf, (size_t)size * size);
    for (int b = 0; b < r->plan->nbands; b++) {
        const sp_epsf_result *e = c->epsf[b];
        char path[160];
        long st4[4] = {c->cell->iy, c->cell->ix, 0, 0}, n4[4] = {1, 1, size, size};
        if (r->qa.qa_growth_n > 0) {
            int ngr = r->qa.qa_growth_n;
            float ee[1024];
            for (int k = 0; k < ngr && k < 1024; k++) ee[k] = (float)sp_epsf_encircled(e->psf, sp_store_growth_r(k));
            long s3[3] = {c->cell->iy, c->cell->ix, 0}, n3[3] = {1, 1, ngr < 1024 ? ngr : 1024};
            snprintf(path, sizeof path, "/epsf/%s_growth_ee", r->plan->bands[b]);
            SP_TRY(sp_h5_array_write(r->store->h, path, SP_H5_F32, s3, n3, ee));
        }
        if (r->qa.qa_resid && mean_resid(e, size, buf)) {
            snprintf(path, sizeof path, "/epsf/%s_resid", r->plan->bands[b]);
            SP_TRY(sp_h5_array_write(r->store->h, path, SP_H5_F32, st4, n4, buf));
        }
        /* the stamps and nstars last: nstars >= 0 marks the band's ePSF of the cell as stored */
        SP_TRY(write_epsf_band(r, c->cell, b, e->psf, e->nstars_used, e->kind, buf));
    }
cleanup:
    free(buf);
    return status;
}

/* Keep the cell's ePSFs in the run's grid (shared with the other ranks after the pass). */
static int keep_epsf(cell_t *c)
{
    int status = SP_OK;
    run_t *r = c->run;
    const sp_plan *p = r->plan;
    int id = c->cell->id;
    for (int b = 0; b < p->nbands; b++) {
        long k = (long)b * p->ncells + id;
        sp_psf_free(&r->grid[k]);
        SP_TRY(sp_psf_copy(c->epsf[b]->psf, &r->grid[k]));
        r->grid_nstars[k] = c->epsf[b]->nstars_used;
        r->grid_kind[k] = c->epsf[b]->kind;
    }
    r->grid_mine[id] = 1;
cleanup:
    return status;
}

/* Radius (pixels) out to which a source of flux f (this band) adds more than
 * k sigma per pixel, for a Moffat of the given FWHM and beta 3 (the catalog
 * neighbours masked in the star cutouts); 0 when its peak is below that. */
double psf_mask_radius(double f, double fwhm, double k_sigma)
{
    const double beta = 3.0;
    if (!(f > 0) || !(k_sigma > 0) || !(fwhm > 0)) return 0.0;
    double alpha = fwhm / (2.0 * sqrt(pow(2.0, 1.0 / beta) - 1.0));
    double i0 = f * (beta - 1.0) / (M_PI * alpha * alpha);
    if (i0 <= k_sigma) return 0.0;
    return alpha * sqrt(pow(i0 / k_sigma, 1.0 / beta) - 1.0);
}

/* The catalog sources near the cell ROI (within half a stamp), once per cell. */
static int cell_catalog(cell_t *c)
{
    int status = SP_OK;
    const sp_catalog *cat = &c->run->plan->cat;
    double m = 0.5 * c->run->cfg->epsf.final_psf_size + 2;
    c->ncat = 0;
    SP_ALLOC(c->cat, cat->n + 1);
    for (long k = 0; k < cat->n; k++) {
        if (cat->excl[k] & (SP_EXCL_NANCOORD | SP_EXCL_OUTSIDE)) continue;
        double x = cat->x[k] - c->x0, y = cat->y[k] - c->y0;
        if (x < -m || y < -m || x > c->nx - 1 + m || y > c->ny - 1 + m) continue;
        c->cat[c->ncat++] = k;
    }
cleanup:
    return status;
}

static int cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* Catalog-driven candidate lists of band b (epsf.psfstar_use_catalog):
 * cand: the catalog STARs inside the ROI (flux FLUX_<band>); others: (x, y,
 * flux) of every other catalog source near the ROI, and of detections with no
 * catalog source within 3 pixels (flux unknown: always counts); nb: every one
 * of them as a neighbour to mask, with a = radius / rscale so that the builder
 * masks out to psf_mask_radius. */
static int catalog_lists(cell_t *c, int b, const sp_epsf_params *ep, sp_source **cand, int *ncand, double **others,
                         int *nothers, sp_source **nb, int *nnb)
{
    int status = SP_OK;
    run_t *r = c->run;
    const sp_catalog *cat = &r->plan->cat;
    int nbd = r->plan->nbands;
    float *tmp = NULL;
    /* the band's typical noise per pixel */
    size_t stride = c->npix / 20000 + 1, ns = 0;
    SP_ALLOC(tmp, c->npix / stride + 1);
    for (size_t k = 0; k < c->npix; k += stride)
        if (c->rms[b][k] > 0 && isfinite(c->rms[b][k])) tmp[ns++] = c->rms[b][k];
    double sigma = 0;
    if (ns > 0) {
        qsort(tmp, ns, sizeof *tmp, cmp_float);
        sigma = tmp[ns / 2];
    }
    long nmax = c->ncat + c->ndet + 1;
    SP_ALLOC(*cand, nmax);
    SP_ALLOC(*others, 3 * nmax);
    SP_ALLOC(*nb, nmax);
    *ncand = *nothers = *nnb = 0;
    double fw = r->sp.sel.fwhm, rs = ep->neighbour_rscale > 0 ? ep->neighbour_rscale : 3.0;
    for (long q = 0; q < c->ncat; q++) {
        long k = c->cat[q];
        double x = cat->x[k] - c->x0, y = cat->y[k] - c->y0, f = cat->flux_init[k * nbd + b];
        int inside = x >= 0 && y >= 0 && x <= c->nx - 1 && y <= c->ny - 1;
        int star = cat->type[k] == SP_SRC_STAR && cat->type_given[k] && !(cat->excl[k] & SP_EXCL_SATURATION);
        double rad = psf_mask_radius(f, fw, r->sp.nb_mask_sigma * sigma);
        if (cat->type[k] != SP_SRC_STAR && isfinite(cat->re[k]) && cat->re[k] > 0 && rad > 0) rad += 1.5 * cat->re[k];
        if (!isfinite(f) || f <= 0) rad = 2.0 * fw; /* no flux: a fixed radius */
        if (rad > 0) {
            sp_source *o = &(*nb)[(*nnb)++];
            memset(o, 0, sizeof *o);
            o->x = x;
            o->y = y;
            o->flux = f;
            o->a = rad > 1 ? (rad - 1.0) / rs : 0.0;
        }
        if (star && inside) {
            sp_source *o = &(*cand)[(*ncand)++];
            memset(o, 0, sizeof *o);
            o->x = x;
            o->y = y;
            o->flux = isfinite(f) && f > 0 ? f : 0.0;
            o->q = 1;
        } else {
            double *o = *others + 3 * (*nothers)++;
            o[0] = x;
            o[1] = y;
            o[2] = isfinite(f) && f > 0 ? f : -1.0;
        }
    }
    /* detections the catalog does not explain (e.g. an incomplete catalog) */
    for (int d = 0; d < c->ndet; d++) {
        double x = c->det[d].x, y = c->det[d].y;
        int found = 0;
        for (long q = 0; q < c->ncat && !found; q++) {
            long k = c->cat[q];
            double dx = cat->x[k] - c->x0 - x, dy = cat->y[k] - c->y0 - y;
            found = dx * dx + dy * dy < 9.0;
        }
        if (found) continue;
        double *o = *others + 3 * (*nothers)++;
        o[0] = x;
        o[1] = y;
        o[2] = -1.0;
        (*nb)[(*nnb)++] = c->det[d];
    }
cleanup:
    free(tmp);
    return status;
}

/* Detection mode: the detections that the input catalog says are galaxies (a
 * source of given TYPE other than STAR, or of blank / unknown TYPE with a
 * catalog Re > 0, within max(1.5, FWHM / 2) pixels) are no PSF-star
 * candidates; they stay in the isolation list as neighbours of unknown flux
 * (others, flux -1: always count). A compact galaxy passes the roundness cut
 * (and the stellar-locus cut needs 5 candidates in the cell), and on a
 * galaxy-rich field such candidates broaden every cell's PSF: with only the
 * typed galaxies vetoed, 75 of 236 PSF stars of a tile whose blank-TYPE rows
 * are 10% were blank-TYPE galaxies (docs/psf.md).
 * *cand (NULL when nothing is vetoed: use the detections as they are). */
static int veto_catalog_galaxies(cell_t *c, sp_source **cand, int *ncand, double **others, int *nothers)
{
    int status = SP_OK;
    const sp_catalog *cat = &c->run->plan->cat;
    double rv = fmax(1.5, 0.5 * c->run->sp.sel.fwhm);
    unsigned char *veto = NULL;
    int nveto = 0;
    *cand = NULL;
    *others = NULL;
    *ncand = c->ndet;
    *nothers = 0;
    if (c->ndet == 0) return SP_OK;
    SP_ALLOC(veto, c->ndet);
    for (long q = 0; q < c->ncat; q++) {
        long k = c->cat[q];
        const int given = cat->type_given && cat->type_given[k];
        if (given ? cat->type[k] == SP_SRC_STAR : !(cat->re && isfinite(cat->re[k]) && cat->re[k] > 0)) continue;
        double x = cat->x[k] - c->x0, y = cat->y[k] - c->y0;
        for (int d = 0; d < c->ndet; d++) {
            double dx = c->det[d].x - x, dy = c->det[d].y - y;
            if (!veto[d] && dx * dx + dy * dy <= rv * rv) {
                veto[d] = 1;
                nveto++;
            }
        }
    }
    if (nveto == 0) goto cleanup;
    SP_ALLOC(*cand, c->ndet - nveto + 1);
    SP_ALLOC(*others, 3 * nveto);
    *ncand = 0;
    for (int d = 0; d < c->ndet; d++) {
        if (!veto[d]) {
            (*cand)[(*ncand)++] = c->det[d];
            continue;
        }
        double *o = *others + 3 * (*nothers)++;
        o[0] = c->det[d].x;
        o[1] = c->det[d].y;
        o[2] = -1.0;
    }
cleanup:
    free(veto);
    if (status != SP_OK) {
        free(*cand);
        free(*others);
        *cand = NULL;
        *others = NULL;
    }
    return status;
}

/* chi2/dof of one star against a model: data = F psf(x - xs, y - ys) + b on the
 * box of half-width h about the star (unmasked pixels, ivar weights, else the
 * star's background rms), F and b fitted (weighted linear least squares). NaN
 * when the box has too few pixels or no signal. buf: (2h+1)^2 doubles. */
static double star_chi2(const float *img, const float *ivar, const uint8_t *mask, int nx, int ny,
                        const sp_psf *psf, double xs, double ys, double bkg_rms, int h, double *buf)
{
    int ix = (int)floor(xs + 0.5), iy = (int)floor(ys + 0.5), n = 2 * h + 1;
    if (ix - h < 0 || iy - h < 0 || ix + h >= nx || iy + h >= ny) return NAN;
    sp_psf_render(psf, xs - (ix - h), ys - (iy - h), n, n, buf, NULL, NULL);
    double sw = 0, sm = 0, sd = 0, smm = 0, smd = 0, sdd = 0;
    int np = 0;
    double w0 = bkg_rms > 0 ? 1.0 / (bkg_rms * bkg_rms) : 1.0;
    for (int j = 0; j < n; j++)
        for (int i = 0; i < n; i++) {
            size_t q = (size_t)(iy - h + j) * nx + (ix - h + i);
            if (mask && mask[q]) continue;
            double w = ivar ? ivar[q] : w0, d = img[q], m = buf[j * n + i];
            if (!(w > 0) || !isfinite(d)) continue;
            sw += w; sm += w * m; sd += w * d; smm += w * m * m; smd += w * m * d; sdd += w * d * d;
            np++;
        }
    double det = sw * smm - sm * sm;
    if (np < 8 || !(det > 0)) return NAN;
    double F = (sw * smd - sm * sd) / det, b = (smm * sd - sm * smd) / det;
    if (!(F > 0)) return NAN;
    /* sum w (d - F m - b)^2 expanded */
    double chi = sdd - 2 * F * smd - 2 * b * sd + F * F * smm + 2 * F * b * sm + b * b * sw;
    return (chi > 0 ? chi : 0) / (np - 2);
}

/* epsf.cross_validate: an empirical ePSF (res, built from stars[nstars]) is kept
 * only if it predicts held-out stars better than a Moffat fitted to the same
 * stars. 2-fold: the stars are split by index parity; on each half an
 * empirical ePSF and a Moffat (the builder with its gate forced to fall back)
 * are built and scored on the other half's stars (star_chi2 at the full
 * build's refined centres). The median over the held-out stars of
 * chi2/dof(empirical) - chi2/dof(Moffat) decides: >= 0 -> *res is replaced by
 * the Moffat fitted to every star, with the reason recorded. A half whose
 * empirical build itself fails the gate counts for the Moffat. */
static int cross_validate_epsf(cell_t *c, int b, const sp_psfstar *stars, int nstars, const sp_epsf_params *ep0,
                               sp_epsf_result **res)
{
    int status = SP_OK;
    sp_psfstar *half = NULL;
    double *diff = NULL, *buf = NULL;
    sp_epsf_result *emp[2] = {NULL, NULL}, *mof[2] = {NULL, NULL}, *all = NULL;
    sp_epsf_params ep = *ep0, epm;
    ep.keep_stamps = 0;
    epm = ep;
    epm.min_stars = nstars + 1; /* the gate fails: the Moffat fitted to the stars given */
    double fw = (*res)->fwhm > 0 ? (*res)->fwhm : ep.fallback_fwhm;
    int h = (int)ceil(2.0 * fw);
    if (h < 3) h = 3;
    SP_ALLOC(half, nstars);
    SP_ALLOC(diff, nstars);
    SP_ALLOC(buf, (size_t)(2 * h + 1) * (2 * h + 1));
    int ndiff = 0, nemp_fail = 0;
    for (int f = 0; f < 2; f++) {
        int nh = 0;
        for (int s = f; s < nstars; s += 2) half[nh++] = stars[s];
        SP_TRY(sp_epsf_build(c->data[b], c->ivar[b], c->mask[b], (int)c->nx, (int)c->ny, half, nh, &ep, &emp[f]));
        SP_TRY(sp_epsf_build(c->data[b], c->ivar[b], c->mask[b], (int)c->nx, (int)c->ny, half, nh, &epm, &mof[f]));
        if (emp[f]->kind != SP_EPSF_EMPIRICAL) nemp_fail++;
    }
    for (int s = 0; s < nstars; s++) {
        int f = 1 - (s & 1); /* the half that did not contain star s */
        if (!(*res)->star_used[s] || mof[f]->kind != SP_EPSF_MOFFAT_FIT) continue;
        double xs = (*res)->star_x[s], ys = (*res)->star_y[s];
        double ce = emp[f]->kind == SP_EPSF_EMPIRICAL
                        ? star_chi2(c->data[b], c->ivar[b], c->mask[b], (int)c->nx, (int)c->ny, emp[f]->psf, xs, ys,
                                    stars[s].bkg_rms, h, buf)
                        : INFINITY;
        double cm = star_chi2(c->data[b], c->ivar[b], c->mask[b], (int)c->nx, (int)c->ny, mof[f]->psf, xs, ys,
                              stars[s].bkg_rms, h, buf);
        if (isnan(ce) || !isfinite(cm)) continue;
        diff[ndiff++] = isinf(ce) ? 1e30 : ce - cm;
    }
    if (ndiff < 4) goto cleanup; /* nothing to decide on: the empirical ePSF stays */
    double med = sp_score_median(diff, ndiff); /* (a failed empirical half counts as +1e30, finite) */
    SP_DEBUG("cell %d band %s: cross-validation of the ePSF on %d held-out star(s): median chi2/dof empirical - "
             "Moffat %+.3g (%d half-build(s) failed the gate%s%s) -> %s",
             c->cell->id, c->run->plan->bands[b], ndiff, med, nemp_fail, nemp_fail ? ": " : "",
             emp[0]->kind != SP_EPSF_EMPIRICAL ? emp[0]->reason : emp[1]->kind != SP_EPSF_EMPIRICAL ? emp[1]->reason : "",
             med < 0 ? "empirical" : "Moffat");
    if (med < 0) goto cleanup;
    epm = *ep0;
    epm.min_stars = nstars + 1;
    SP_TRY(sp_epsf_build(c->data[b], c->ivar[b], c->mask[b], (int)c->nx, (int)c->ny, stars, nstars, &epm, &all));
    if (all->kind != SP_EPSF_MOFFAT_FIT) goto cleanup; /* the Moffat fit failed: keep the empirical ePSF */
    snprintf(all->reason, sizeof all->reason,
             "cross-validation: the Moffat predicts %d held-out stars better (median chi2/dof %+.3g)", ndiff, med);
    sp_epsf_result_free(res);
    *res = all;
    all = NULL;
cleanup:
    for (int f = 0; f < 2; f++) {
        sp_epsf_result_free(&emp[f]);
        sp_epsf_result_free(&mof[f]);
    }
    sp_epsf_result_free(&all);
    free(half);
    free(diff);
    free(buf);
    return status;
}

/* Star selection + ePSF of one band. Candidates: the catalog STARs
 * (epsf.psfstar_use_catalog) or the white-stack detections; reference stars in
 * the cell ROI whose magnitude in this band is inside
 * epsf.reference_mag_min..max are candidates in the reference modes. */
static int build_band(cell_t *c, int b, sp_epsf_result **res)
{
    int status = SP_OK;
    run_t *r = c->run;
    const sp_cfg_epsf *e = &r->cfg->epsf;
    int nb = r->plan->nbands;
    double *rxy = NULL, *others = NULL;
    sp_psfstar *stars = NULL;
    sp_source *cand = NULL, *nbl = NULL;
    int nstars = 0, nref = 0, ncand = c->ndet, nothers = 0, nnb = c->ndet;
    const sp_source *candl = c->det, *nbs = c->det;
    sp_epsf_params ep = r->sp.epsf;
    sp_starsel_params sel = r->sp.sel;
    if (r->sp.use_catalog) {
        SP_TRY(catalog_lists(c, b, &ep, &cand, &ncand, &others, &nothers, &nbl, &nnb));
        candl = cand;
        nbs = nbl;
        sel.others = others;
        sel.nothers = nothers;
    } else {
        SP_TRY(veto_catalog_galaxies(c, &cand, &ncand, &others, &nothers));
        if (cand) {
            candl = cand;
            sel.others = others;
            sel.nothers = nothers;
        }
    }
    if (r->sp.sel.mode != SP_PSFSTAR_DETECT && r->refs.n > 0) {
        SP_ALLOC(rxy, 2 * r->refs.n);
        for (long k = 0; k < r->refs.n; k++) {
            double x = r->refs.x[k] - c->x0, y = r->refs.y[k] - c->y0, m = r->refs.mag[k * nb + b];
            if (!(x >= 0 && y >= 0 && x <= c->nx - 1 && y <= c->ny - 1)) continue;
            if (!(m >= e->reference_mag_min && m <= e->reference_mag_max)) continue;
            rxy[2 * nref] = x;
            rxy[2 * nref + 1] = y;
            nref++;
        }
    }
    double sat = r->band_satlevel[b];
    sel.peak_max = isfinite(sat) ? e->max_peak_fraction * sat : 0.0;
    /* a reference-only run with no reference star here falls back to detections */
    if (sel.mode == SP_PSFSTAR_REFERENCE && nref == 0) sel.mode = SP_PSFSTAR_DETECT;
    sp_starsel_stats ss;
    SP_TRY(sp_starsel_select(c->data[b], c->rms[b], c->mask[b], (int)c->nx, (int)c->ny, candl, ncand, rxy, nref, &sel,
                             &stars, &nstars, &ss));
    SP_DEBUG("cell %d band %s: %d %s, %d reference(s); PSF-star candidates %d: edge %d, flagged %d, snr %d, "
             "round %d, peak %d, crowded %d, off the stellar locus (%.3f px) %d -> %d selected",
             c->cell->id, r->plan->bands[b], ncand, r->sp.use_catalog ? "catalog star(s)" : "detection(s)", nref,
             ss.ncand, ss.n_edge, ss.n_flagged, ss.n_snr, ss.n_round, ss.n_peak, ss.n_crowded, ss.locus, ss.n_size,
             ss.n_selected);
    /* the ePSF applies at the centre of the cell's base region (ROI pixels) */
    ep.x_ref = 0.5 * (c->cell->bx0 + c->cell->bx1 - 1) - c->x0;
    ep.y_ref = 0.5 * (c->cell->by0 + c->cell->by1 - 1) - c->y0;
    ep.neighbours = nbs;
    ep.nneighbours = nnb;
    SP_TRY(sp_epsf_build(c->data[b], c->ivar[b], c->mask[b], (int)c->nx, (int)c->ny, stars, nstars, &ep, res));
    if (r->sp.cross_validate && (*res)->kind == SP_EPSF_EMPIRICAL && nstars >= 2 * (ep.min_stars > 2 ? ep.min_stars : 2))
        SP_TRY(cross_validate_epsf(c, b, stars, nstars, &ep, res));
    SP_TRY(psf_field_collect(c, b, stars, nstars, &ep, (*res)->psf ? (*res)->psf->fwhm : 0.0));
    if (r->sp.poly && nstars > 0) {
        /* the band-wide model's stars: the ones in this cell's base region (a star
         * is cut out by one cell only), with the same cutouts and masks */
        struct band_cuts *bc = &r->fcuts[b]; /* band b is on one thread at a time */
        int nown = 0, got = 0;
        for (int s = 0; s < nstars; s++) {
            double x = stars[s].x + c->x0, y = stars[s].y + c->y0;
            if (x >= c->cell->bx0 - 0.5 && x < c->cell->bx1 - 0.5 && y >= c->cell->by0 - 0.5 &&
                y < c->cell->by1 - 0.5)
                stars[nown++] = stars[s];
        }
        if (bc->n + nown > bc->cap) {
            int cap = 2 * bc->cap > bc->n + nown ? 2 * bc->cap : bc->n + nown + 16;
            sp_epsf_cutout *nc = realloc(bc->c, sizeof *nc * (size_t)cap);
            SP_CHECK(nc, SP_ERR_NOMEM, "out of memory (PSF-star cutouts)");
            bc->c = nc;
            int32_t *ncl = realloc(bc->cell, sizeof *ncl * (size_t)cap);
            SP_CHECK(ncl, SP_ERR_NOMEM, "out of memory (PSF-star cutouts)");
            bc->cell = ncl;
            int32_t *nsq = realloc(bc->seq, sizeof *nsq * (size_t)cap);
            SP_CHECK(nsq, SP_ERR_NOMEM, "out of memory (PSF-star cutouts)");
            bc->seq = nsq;
            bc->cap = cap;
        }
        SP_TRY(sp_epsf_cutouts(c->data[b], c->ivar[b], c->mask[b], (int)c->nx, (int)c->ny, (double)c->x0,
                               (double)c->y0, stars, nown, &ep, bc->c + bc->n, &got));
        for (int i = 0; i < got; i++) {
            bc->cell[bc->n + i] = c->cell->id;
            bc->seq[bc->n + i] = i;
        }
        bc->n += got;
    }
cleanup:
    free(rxy);
    free(stars);
    free(cand);
    free(others);
    free(nbl);
    return status;
}

int stage_epsf(cell_t *c)
{
    int status = SP_OK;
    run_t *r = c->run;
    int nb = r->plan->nbands;
    thread_err te = {0};
    SP_ALLOC(c->epsf, nb);
    SP_TRY(cell_catalog(c)); /* candidates (psfstar_use_catalog) or the galaxy veto */
#pragma omp parallel for schedule(dynamic, 1) num_threads(r->sp.band_threads)
    for (int b = 0; b < nb; b++) {
        int st = build_band(c, b, &c->epsf[b]);
        if (st != SP_OK) {
            char what[96];
            snprintf(what, sizeof what, "ePSF of band %s", r->plan->bands[b]);
            thread_err_record(&te, st, what);
        }
    }
    SP_TRY(thread_err_raise(&te));
    for (int b = 0; b < nb; b++)
        if (c->epsf[b]->is_fallback)
            SP_DEBUG("cell %d band %s: fallback PSF (%s), %d star(s)", c->cell->id, r->plan->bands[b],
                     c->epsf[b]->reason, c->epsf[b]->nstars_in);
    SP_TRY(keep_epsf(c));
    sp_prof_push("write");
    status = write_epsf(c);
    sp_prof_pop();
cleanup:
    return status;
}

/* ---- QA maps ------------------------------------------------------------------------- */

/* Block means (factor ds) of a ROI image over the output pixels this cell owns:
 * those whose block starts in its base region. Pixels with weight <= 0 (w may be
 * NULL) or not finite are left out; a block with none is NaN. */
static int write_block_means(cell_t *c, const char *path, const float *img, const float *w, int ds)
{
    int status = SP_OK;
    const sp_cell *ce = c->cell;
    const sp_plan *p = c->run->plan;
    long X0 = (ce->bx0 + ds - 1) / ds, X1 = (ce->bx1 + ds - 1) / ds;
    long Y0 = (ce->by0 + ds - 1) / ds, Y1 = (ce->by1 + ds - 1) / ds;
    float *out = NULL;
    if (X1 <= X0 || Y1 <= Y0) return SP_OK;
    SP_ALLOC(out, (size_t)(X1 - X0) * (Y1 - Y0));
    for (long Y = Y0; Y < Y1; Y++)
        for (long X = X0; X < X1; X++) {
            double s = 0;
            long n = 0;
            for (long y = Y * ds; y < (Y + 1) * ds && y < p->ny && y < c->y0 + c->ny; y++)
                for (long x = X * ds; x < (X + 1) * ds && x < p->nx && x < c->x0 + c->nx; x++) {
                    size_t k = (size_t)(y - c->y0) * c->nx + (size_t)(x - c->x0);
                    if ((w && !(w[k] > 0)) || !isfinite(img[k])) continue;
                    s += img[k];
                    n++;
                }
            out[(Y - Y0) * (X1 - X0) + (X - X0)] = n > 0 ? (float)(s / n) : NAN;
        }
    long st[2] = {Y0, X0}, n2[2] = {Y1 - Y0, X1 - X0};
    SP_TRY(sp_h5_array_write(c->run->store->h, path, SP_H5_F32, st, n2, out));
cleanup:
    free(out);
    return status;
}

/* outputs.save_white: the cell's base region of the white stack, its noise (1/sqrt(ivar)) and
 * the OR of the band masks as FITS images in work_dir/white/, each with the tile WCS shifted to
 * the cut (CRPIX - offset), so any FITS viewer overlays them on the sky. Written atomically
 * (temporary file + rename). */
static int save_white(cell_t *c)
{
    int status = SP_OK;
    run_t *r = c->run;
    const sp_cell *ce = c->cell;
    const sp_plan *p = r->plan;
    long bx = ce->bx0 - c->x0, by = ce->by0 - c->y0, nx = ce->bx1 - ce->bx0, ny = ce->by1 - ce->by0;
    float *img = NULL;
    char *cards = NULL, path[SP_PATH_MAX + 64];
    int ncards = 0;
    sp_fits *f = NULL;
    sp_wcs *w = NULL;
    static const char *const what[3] = {"white", "white_rms", "mask"};
    static const char *const desc[3] = {"inverse-variance white stack of the background-subtracted bands",
                                        "1-sigma noise of the white stack", "OR over bands of the pixel masks"};
    SP_ALLOC(img, (size_t)nx * ny);
    SP_TRY(sp_wcs_copy(p->wcs, &w));
    SP_TRY(sp_wcs_to_header(w, &cards, &ncards));
    for (int k = 0; k < 3; k++) {
        for (long y = 0; y < ny; y++)
            for (long x = 0; x < nx; x++) {
                size_t q = (size_t)(y + by) * c->nx + (size_t)(x + bx);
                float v;
                if (k == 0) v = c->white_ivar[q] > 0 ? c->white[q] : NAN;
                else if (k == 1) v = c->white_ivar[q] > 0 ? 1.0f / sqrtf(c->white_ivar[q]) : NAN;
                else {
                    unsigned m = 0;
                    for (int b = 0; b < p->nbands; b++) m |= c->mask[b][q];
                    v = (float)m;
                }
                img[(size_t)y * nx + x] = v;
            }
        snprintf(path, sizeof path, "%s/white/cell%03d_%s.fits", r->cfg->outputs.work_dir, ce->id, what[k]);
        SP_TRY(sp_fits_create(path, nx, ny, &f));
        SP_TRY(sp_fits_write_cards(f, cards, ncards));
        double crpix1 = 0, crpix2 = 0;
        /* the WCS cards carry CRPIX in the tile's 1-based pixels: shift them to the cut */
        for (int i = 0; i < ncards; i++) {
            const char *card = cards + (size_t)i * 80;
            if (!strncmp(card, "CRPIX1  =", 9)) crpix1 = atof(card + 10);
            if (!strncmp(card, "CRPIX2  =", 9)) crpix2 = atof(card + 10);
        }
        SP_TRY(sp_fits_write_key_double(f, "CRPIX1", crpix1 - ce->bx0, "tile CRPIX1 shifted to this cut"));
        SP_TRY(sp_fits_write_key_double(f, "CRPIX2", crpix2 - ce->by0, "tile CRPIX2 shifted to this cut"));
        SP_TRY(sp_fits_write_key_long(f, "SPCELL", ce->id, "surveyproc ePSF cell"));
        SP_TRY(sp_fits_write_key_long(f, "SPX0", ce->bx0, "first tile column of the cut (0-based)"));
        SP_TRY(sp_fits_write_key_long(f, "SPY0", ce->by0, "first tile row of the cut (0-based)"));
        SP_TRY(sp_fits_write_key_string(f, "CONTENT", what[k], desc[k]));
        SP_TRY(sp_fits_write_rows(f, 0, ny, img));
        SP_TRY(sp_fits_commit(&f));
    }
cleanup:
    sp_fits_abort(&f);
    sp_wcs_free(&w);
    free(cards);
    free(img);
    return status;
}

int stage_qa_maps(cell_t *c)
{
    int status = SP_OK;
    run_t *r = c->run;
    const sp_plan *p = r->plan;
    char path[160];
    if (r->cfg->outputs.save_white) SP_TRY(save_white(c));
    if (r->qa.qa_white_ds > 0) SP_TRY(write_block_means(c, "/qa/white", c->white, c->white_ivar, r->qa.qa_white_ds));
    for (int b = 0; b < p->nbands && r->qa.qa_bkg_ds > 0 && c->back; b++) {
        snprintf(path, sizeof path, "/qa/background/%s", p->bands[b]);
        SP_TRY(write_block_means(c, path, c->back[b], NULL, r->qa.qa_bkg_ds));
        snprintf(path, sizeof path, "/qa/background/%s_rms", p->bands[b]);
        SP_TRY(write_block_means(c, path, c->rms[b], NULL, r->qa.qa_bkg_ds));
    }
cleanup:
    return status;
}

/* ---- the grid across ranks ----------------------------------------------------------- */

static int grid_set(run_t *r, long k, const float *data, int size, int os, int nstars, int kind)
{
    int status = SP_OK;
    sp_psf_free(&r->grid[k]);
    SP_TRY(sp_psf_alloc(size, os, &r->grid[k]));
    sp_psf *q = r->grid[k];
    memcpy(q->data, data, (size_t)size * size * sizeof *q->data);
    double cx, cy;
    sp_psf_moments(q, &cx, &cy, &q->fwhm);
    q->nstars = nstars;
    q->is_fallback = kind != SP_EPSF_EMPIRICAL;
    r->grid_nstars[k] = nstars;
    r->grid_kind[k] = kind;
cleanup:
    return status;
}

int psf_grid_load(run_t *r, uint8_t *need)
{
    int status = SP_OK;
    const sp_plan *p = r->plan;
    long nc = p->ncells;
    int os = r->cfg->epsf.oversamp, so = os * (r->cfg->epsf.final_psf_size - 1) + 1;
    int32_t *nst = NULL, *kind = NULL;
    float *cube = NULL;
    double *info = NULL;
    for (long k = 0; k < nc; k++) need[k] = (uint8_t)(p->cells[k].active != 0);
    if (!r->store->resumed) return SP_OK;
    SP_ALLOC(nst, nc);
    SP_ALLOC(kind, nc);
    SP_ALLOC(cube, (size_t)nc * so * so);
    for (int b = 0; b < p->nbands; b++) {
        char path[160];
        snprintf(path, sizeof path, "/epsf/%s_nstars", p->bands[b]);
        status = sp_h5_array_read(r->store->h, path, SP_H5_I32, NULL, NULL, nst);
        snprintf(path, sizeof path, "/epsf/%s_fallback", p->bands[b]);
        if (status == SP_OK) status = sp_h5_array_read(r->store->h, path, SP_H5_I32, NULL, NULL, kind);
        snprintf(path, sizeof path, "/epsf/%s_os", p->bands[b]);
        if (status == SP_OK) status = sp_h5_array_read(r->store->h, path, SP_H5_F32, NULL, NULL, cube);
        if (status != SP_OK) break;
        for (long k = 0; k < nc && status == SP_OK; k++) {
            if (!p->cells[k].active || nst[k] < 0) continue;
            status = grid_set(r, (long)b * nc + k, cube + (size_t)k * so * so, so, os, nst[k], kind[k]);
        }
    }
    for (long k = 0; k < nc; k++) {
        int all = 1;
        for (int b = 0; b < p->nbands; b++) all &= r->grid[(long)b * nc + k] != NULL;
        need[k] = (uint8_t)(p->cells[k].active && !all);
    }
    if (r->sp.poly && status == SP_OK) {
        /* the band-wide models: read back when every band was decided; otherwise the
         * PSF pass runs again over every cell to gather the stars (the builds are
         * deterministic: the cells' ePSFs come out the same) */
        SP_ALLOC(info, (size_t)p->nbands * 8);
        status = sp_h5_array_read(r->store->h, "/epsf/poly_info", SP_H5_F64, NULL, NULL, info);
        int decided = status == SP_OK;
        for (int b = 0; b < p->nbands && decided; b++) decided = isfinite(info[b * 8]);
        for (int b = 0; b < p->nbands && decided && status == SP_OK; b++) {
            const double *h = info + (size_t)b * 8;
            int ntmax = (r->sp.poly_degree + 1) * (r->sp.poly_degree + 2) / 2;
            if (h[0] == 1 && ((int)h[1] + 1) * ((int)h[1] + 2) / 2 > ntmax)
                status = SP_FAIL(SP_ERR_STATE, "/epsf/poly_info: band %s has degree %d > %d", p->bands[b], (int)h[1],
                                 r->sp.poly_degree);
            float *buf = status == SP_OK ? calloc((size_t)ntmax * so * so, sizeof *buf) : NULL;
            if (status == SP_OK && !buf) status = SP_FAIL(SP_ERR_NOMEM, "out of memory (PSF model)");
            char path[160];
            snprintf(path, sizeof path, "/epsf/%s_poly", p->bands[b]);
            if (status == SP_OK && h[0] == 1) status = sp_h5_array_read(r->store->h, path, SP_H5_F32, NULL, NULL, buf);
            if (status == SP_OK) status = poly_info_unpack(h, so, os, buf, &r->poly[b]);
            free(buf);
        }
        if (status == SP_OK && decided) r->poly_decided = 1;
        if (status == SP_OK && !decided)
            for (long k = 0; k < nc; k++) need[k] = (uint8_t)(p->cells[k].active != 0);
    }
    if (status == SP_OK) status = psf_field_load(r, need);
cleanup:
    free(info);
    free(nst);
    free(kind);
    free(cube);
    return sp_mpi_agree(status, r->comm);
}

/* epsf.fallback_borrow: every cell whose ePSF fell back to a Moffat (kind 1, 2)
 * takes the star-weighted mean (weights nstars) of the empirical ePSFs of its
 * 8 neighbouring cells, else of every empirical cell of the band; kind
 * SP_EPSF_BORROWED, nstars their sum. Every rank computes the same grid (it
 * holds every cell after the share); the rank that built a cell rewrites it in
 * the store. Cells with no empirical ePSF in the band keep their Moffat. */
int psf_grid_borrow(run_t *r)
{
    int status = SP_OK;
    const sp_plan *p = r->plan;
    long nc = p->ncells;
    int ng = p->opts.epsf_ngrid, size = r->cfg->epsf.final_psf_size;
    int32_t *kind0 = NULL, *nst0 = NULL;
    float *buf = NULL;
    SP_ALLOC(kind0, nc);
    SP_ALLOC(nst0, nc);
    SP_ALLOC(buf, (size_t)size * size);
    for (int b = 0; b < p->nbands; b++) {
        sp_psf **g = r->grid + (long)b * nc;
        if (r->poly && r->poly[b].psf) continue; /* the band-wide model is used */
        for (long k = 0; k < nc; k++) {
            kind0[k] = r->grid_kind[(long)b * nc + k];
            nst0[k] = r->grid_nstars[(long)b * nc + k];
        }
        for (long k = 0; k < nc; k++) {
            if (!g[k] || (kind0[k] != SP_EPSF_MOFFAT_FIT && kind0[k] != SP_EPSF_MOFFAT_DEFAULT)) continue;
            int ix = p->cells[k].ix, iy = p->cells[k].iy;
            double wsum = 0;
            int32_t nsum = 0;
            for (int pass = 0; pass < 2 && wsum <= 0; pass++) {
                for (long j = 0; j < nc; j++) {
                    if (j == k || !g[j] || kind0[j] != SP_EPSF_EMPIRICAL || g[j]->size != g[k]->size) continue;
                    if (pass == 0 && (abs(p->cells[j].ix - ix) > 1 || abs(p->cells[j].iy - iy) > 1)) continue;
                    double w = nst0[j] > 0 ? nst0[j] : 1;
                    if (wsum == 0)
                        for (int q = 0; q < g[k]->size * g[k]->size; q++) g[k]->data[q] = 0;
                    for (int q = 0; q < g[k]->size * g[k]->size; q++) g[k]->data[q] += (float)(w * g[j]->data[q]);
                    wsum += w;
                    nsum += nst0[j];
                }
            }
            if (wsum <= 0) continue;
            SP_TRY(sp_psf_normalize(g[k]));
            double cx, cy;
            sp_psf_moments(g[k], &cx, &cy, &g[k]->fwhm);
            g[k]->nstars = nsum;
            g[k]->is_fallback = 1;
            r->grid_kind[(long)b * nc + k] = SP_EPSF_BORROWED;
            r->grid_nstars[(long)b * nc + k] = nsum;
            if (r->grid_mine[k]) SP_TRY(write_epsf_band(r, &p->cells[k], b, g[k], nsum, SP_EPSF_BORROWED, buf));
        }
    }
    (void)ng;
cleanup:
    free(kind0);
    free(nst0);
    free(buf);
    return status;
}

/* epsf.wing_pool: per band, every cell keeps its own ePSF in the core and takes
 * the band's nstars-weighted mean of the empirical cells (outer part smoothed)
 * in the wing (sp_epsf_pool_wings). Applied in memory after every share, from
 * the cells as built (or borrowed), which is what /epsf/<band>_os holds and a
 * resume reads: the grid is the same however the run was split or resumed.
 * The owning rank rewrites /epsf/<band> (image pixels) with the pooled PSF,
 * the one the fit uses at the cell centre. */
int psf_grid_pool(run_t *r)
{
    int status = SP_OK;
    const sp_plan *p = r->plan;
    long nc = p->ncells;
    int size = r->cfg->epsf.final_psf_size;
    double *w = NULL;
    uint8_t *apply = NULL;
    float *buf = NULL;
    SP_ALLOC(w, nc);
    SP_ALLOC(apply, nc);
    SP_ALLOC(buf, (size_t)size * size);
    const int resid = r->sp.epsf.fallback_resid_fwhm > 0;
    sp_epsf_pool_params pp;
    sp_epsf_pool_params_default(&pp);
    pp.rin_fwhm = r->cfg->epsf.wing_pool_fwhm[0];
    pp.rout_fwhm = r->cfg->epsf.wing_pool_fwhm[1];
    for (int b = 0; b < p->nbands; b++) {
        sp_psf **g = r->grid + (long)b * nc;
        const int32_t *kind = r->grid_kind + (long)b * nc, *nst = r->grid_nstars + (long)b * nc;
        if (r->poly && r->poly[b].psf) continue; /* the band-wide model is used */
        for (long k = 0; k < nc; k++) {
            /* contributors: cells whose wing comes from their own stars (empirical, or
             * the fitted Moffat plus the stars' residual, epsf.fallback_residual_fwhm);
             * they and the borrowed cells take the band's wing. A bare Moffat is left
             * alone, so with no empirical wing in the band nothing changes. */
            int own = kind[k] == SP_EPSF_EMPIRICAL || (kind[k] == SP_EPSF_MOFFAT_FIT && resid);
            w[k] = g[k] && own && nst[k] > 0 ? nst[k] : 0.0;
            apply[k] = (uint8_t)(g[k] && (own || kind[k] == SP_EPSF_BORROWED));
        }
        SP_TRY(sp_epsf_pool_wings(g, w, apply, (int)nc, &pp));
        for (long k = 0; k < nc; k++) {
            if (!apply[k] || !r->grid_mine[k]) continue;
            psf_sample_pixels(g[k], size, buf);
            long st4[4] = {p->cells[k].iy, p->cells[k].ix, 0, 0}, n4[4] = {1, 1, size, size};
            char path[160];
            snprintf(path, sizeof path, "/epsf/%s", p->bands[b]);
            SP_TRY(sp_h5_array_write(r->store->h, path, SP_H5_F32, st4, n4, buf));
        }
    }
cleanup:
    free(w);
    free(apply);
    free(buf);
    return status;
}

/* ---- the band-wide polynomial model (epsf.interpolation: polynomial) ---------------- */

#define POLY_HDR 11 /* doubles per cutout record: cell, seq, ix, iy, x, y, flux, bkg, bkg_rms, snr, q */

typedef struct {
    const sp_epsf_cutout *c;
    int32_t cell, seq;
} cut_ref;

static int cmp_cut_ref(const void *a, const void *b)
{
    const cut_ref *x = a, *y = b;
    if (x->cell != y->cell) return (x->cell > y->cell) - (x->cell < y->cell);
    return (x->seq > y->seq) - (x->seq < y->seq);
}

/* Build one band's model from its gathered cutouts (in cell, then star order:
 * the same whatever the rank layout). Returns SP_OK with m->psf == NULL and
 * why in `reason` when the model fails its quality gate. */
static int poly_build_band(run_t *r, cut_ref *refs, int n, struct poly_model *m, char *reason, size_t rlen)
{
    int status = SP_OK;
    sp_epsf_cutout *cuts = NULL;
    sp_epsf_result *res = NULL;
    const sp_plan *p = r->plan;
    qsort(refs, (size_t)n, sizeof *refs, cmp_cut_ref);
    SP_ALLOC(cuts, n + 1);
    for (int i = 0; i < n; i++) cuts[i] = *refs[i].c;
    sp_epsf_params ep = r->sp.epsf;
    ep.spatial_degree = r->sp.poly_degree;
    ep.x_ref = 0.5 * (p->nx - 1);
    ep.y_ref = 0.5 * (p->ny - 1);
    ep.spatial_scale = 0.5 * (p->nx > p->ny ? p->nx : p->ny);
    ep.keep_stamps = 0;
    m->ncuts = n;
    reason[0] = 0;
    SP_TRY(sp_epsf_build_field(cuts, n, &ep, &res));
    if (res->kind != SP_EPSF_EMPIRICAL) {
        snprintf(reason, rlen, "%s", res->reason[0] ? res->reason : "quality gate");
        goto cleanup;
    }
    m->degree = res->spatial_degree;
    m->nstars = res->nstars_used;
    m->xref = ep.x_ref;
    m->yref = ep.y_ref;
    m->scale = res->spatial_degree > 0 ? res->spatial_scale : ep.spatial_scale;
    m->psf = res->psf;
    res->psf = NULL;
    if (res->nterms > 0) {
        m->terms = res->terms;
        res->terms = NULL;
    }
cleanup:
    free(cuts);
    sp_epsf_result_free(&res);
    return status;
}

/* The model of band b at tile position (x, y) into out (the model's geometry). */
static int poly_at(const struct poly_model *m, double x, double y, sp_psf *out)
{
    return sp_epsf_poly_eval(m->psf, m->terms, m->degree, (x - m->xref) / m->scale, (y - m->yref) / m->scale, out);
}

/* The band owner stores its model: the terms, the info row, and the model at
 * every active cell's centre as /epsf/<band> (image pixels, what the fit uses there). */
static int poly_store_band(run_t *r, int b)
{
    int status = SP_OK;
    const sp_plan *p = r->plan;
    const struct poly_model *m = &r->poly[b];
    int os = r->cfg->epsf.oversamp, size = r->cfg->epsf.final_psf_size, so = os * (size - 1) + 1;
    int ntmax = (r->sp.poly_degree + 1) * (r->sp.poly_degree + 2) / 2;
    float *buf = NULL, *px = NULL;
    sp_psf *ev = NULL;
    char path[160];
    double info[8];
    poly_info_pack(m, info);
    if (m->psf) {
        SP_ALLOC(buf, (size_t)ntmax * so * so);
        poly_terms_pack(m, so, buf);
        long st3[3] = {0, 0, 0}, n3[3] = {ntmax, so, so};
        snprintf(path, sizeof path, "/epsf/%s_poly", p->bands[b]);
        SP_TRY(sp_h5_array_write(r->store->h, path, SP_H5_F32, st3, n3, buf));
        SP_ALLOC(px, (size_t)size * size);
        SP_TRY(sp_psf_alloc(so, os, &ev));
        snprintf(path, sizeof path, "/epsf/%s", p->bands[b]);
        for (long k = 0; k < p->ncells; k++) {
            const sp_cell *ce = &p->cells[k];
            if (!ce->active) continue;
            SP_TRY(poly_at(m, 0.5 * (ce->bx0 + ce->bx1 - 1), 0.5 * (ce->by0 + ce->by1 - 1), ev));
            psf_sample_pixels(ev, size, px);
            long st4[4] = {ce->iy, ce->ix, 0, 0}, n4[4] = {1, 1, size, size};
            SP_TRY(sp_h5_array_write(r->store->h, path, SP_H5_F32, st4, n4, px));
        }
    }
    long sti[2] = {b, 0}, ni[2] = {1, 8};
    SP_TRY(sp_h5_array_write(r->store->h, "/epsf/poly_info", SP_H5_F64, sti, ni, info));
cleanup:
    free(buf);
    free(px);
    sp_psf_free(&ev);
    return status;
}

void psf_cutout_unpack(const double *v, int n, const char *pix, sp_epsf_cutout *c)
{
    c->n = n;
    c->ix = (int)v[0];
    c->iy = (int)v[1];
    c->x = v[2];
    c->y = v[3];
    c->flux = v[4];
    c->bkg = v[5];
    c->bkg_rms = v[6];
    c->snr = v[7];
    c->q = v[8];
    c->d = (float *)(void *)pix;
    c->w = c->d + (size_t)n * n;
}

void psf_gather_bytes(const run_t *r, int owner, const char *band, const void *send, int sendn, int *counts,
                      int *displs, char **out, long *ntot, int *lst)
{
    MPI_Gather(&sendn, 1, MPI_INT, counts, 1, MPI_INT, owner, r->comm);
    long total = 0;
    if (r->rank == owner) {
        for (int i = 0; i < r->nranks; i++) {
            displs[i] = (int)total;
            total += counts[i];
        }
        /* checked on the owner only: the others learn of it through the caller's agreement */
        if (total >= 2147483647L && *lst == SP_OK)
            *lst = SP_FAIL(SP_ERR_RESOURCE, "band %s: the PSF-star cutouts (%ld bytes) are too many for one "
                                            "message; lower epsf.max_stars",
                           band, total);
        *out = malloc((size_t)total + 8);
        if (!*out && *lst == SP_OK) *lst = SP_FAIL(SP_ERR_NOMEM, "out of memory (PSF-star cutouts)");
        *ntot = total;
    }
    MPI_Gatherv(send, sendn, MPI_BYTE, (r->rank == owner && *out && *lst == SP_OK) ? *out : NULL, counts, displs,
                MPI_BYTE, owner, r->comm);
}

int psf_poly_build(run_t *r)
{
    int status = SP_OK, lst = SP_OK;
    const sp_plan *p = r->plan;
    const int nb = p->nbands, N = r->cfg->epsf.final_psf_size, os = r->cfg->epsf.oversamp, so = os * (N - 1) + 1;
    const size_t rec = POLY_HDR * sizeof(double) + 2 * sizeof(float) * (size_t)N * N;
    char *sendb = NULL;
    int *counts = NULL, *displs = NULL;
    char **mine = NULL;      /* per band owned by this rank: the gathered records */
    long *nmine = NULL;
    sp_epsf_cutout **ucuts = NULL;
    float *bc = NULL;
    char (*reason)[160] = NULL;
    thread_err te = {0};
    if (!r->sp.poly || r->poly_decided) return SP_OK;
    SP_ALLOC(counts, r->nranks);
    SP_ALLOC(displs, r->nranks);
    SP_ALLOC(mine, nb);
    SP_ALLOC(nmine, nb);
    SP_ALLOC(ucuts, nb);
    SP_ALLOC(reason, nb);
    /* 1. gather each band's cutouts on its owner (band b on rank b % nranks) */
    for (int b = 0; b < nb; b++) {
        struct band_cuts *bcut = &r->fcuts[b];
        const int owner = b % r->nranks;
        /* a local failure sends nothing and is agreed on after the gathers (no rank
         * may leave a collective the others are in) */
        int nsend = bcut->n;
        if (lst == SP_OK && !((double)nsend * rec < 2147483647.0))
            lst = SP_FAIL(SP_ERR_RESOURCE, "band %s: %d PSF-star cutouts are too many for one message; lower "
                                           "epsf.max_stars",
                          p->bands[b], nsend);
        free(sendb);
        sendb = lst == SP_OK ? malloc((size_t)nsend * rec + 1) : NULL;
        if (!sendb && lst == SP_OK) lst = SP_FAIL(SP_ERR_NOMEM, "out of memory (PSF-star cutouts)");
        if (lst != SP_OK) nsend = 0;
        for (int i = 0; i < nsend; i++) {
            char *o = sendb + (size_t)i * rec;
            const sp_epsf_cutout *c = &bcut->c[i];
            double h[POLY_HDR] = {bcut->cell[i], bcut->seq[i], c->ix, c->iy, c->x, c->y, c->flux, c->bkg,
                                  c->bkg_rms, c->snr, c->q};
            memcpy(o, h, sizeof h);
            memcpy(o + sizeof h, c->d, sizeof(float) * (size_t)N * N);
            memcpy(o + sizeof h + sizeof(float) * (size_t)N * N, c->w, sizeof(float) * (size_t)N * N);
        }
        long total = 0;
        psf_gather_bytes(r, owner, p->bands[b], sendb, (int)((size_t)nsend * rec), counts, displs, &mine[b], &total,
                         &lst);
        nmine[b] = total / (long)rec;
        band_cuts_free(bcut);
    }
    SP_TRY(sp_mpi_agree(lst, r->comm));
    /* 2. the owner builds its bands (OpenMP over them) */
    {
        int own[256], nown = 0;
        for (int b = 0; b < nb; b++)
            if (b % r->nranks == r->rank && nown < 256) own[nown++] = b;
        for (int q = 0; q < nown; q++) {
            int b = own[q];
            SP_ALLOC(ucuts[b], nmine[b] + 1);
        }
#pragma omp parallel for schedule(dynamic, 1) num_threads(r->sp.band_threads)
        for (int q = 0; q < nown; q++) {
            int b = own[q], n = (int)nmine[b];
            cut_ref *refs = calloc((size_t)n + 1, sizeof *refs);
            if (!refs) {
                thread_err_record(&te, SP_FAIL(SP_ERR_NOMEM, "out of memory (PSF-star cutouts)"), "PSF model");
                continue;
            }
            for (int i = 0; i < n; i++) {
                const char *o = mine[b] + (size_t)i * rec;
                double h[POLY_HDR];
                memcpy(h, o, sizeof h);
                sp_epsf_cutout *c = &ucuts[b][i];
                psf_cutout_unpack(h + 2, N, o + sizeof h, c); /* aligned: rec and the header are multiples of 8 */
                refs[i].c = c;
                refs[i].cell = (int32_t)h[0];
                refs[i].seq = (int32_t)h[1];
            }
            int st = poly_build_band(r, refs, n, &r->poly[b], reason[b], sizeof reason[b]);
            if (st != SP_OK) {
                char what[96];
                snprintf(what, sizeof what, "band-wide PSF model of band %s", p->bands[b]);
                thread_err_record(&te, st, what);
            }
            free(refs);
        }
        lst = thread_err_raise(&te);
        for (int q = 0; q < nown && lst == SP_OK; q++) lst = poly_store_band(r, own[q]);
    }
    SP_TRY(sp_mpi_agree(lst, r->comm));
    /* 3. every rank gets every model */
    SP_ALLOC(bc, 8 + (size_t)15 * so * so);
    for (int b = 0; b < nb; b++) {
        struct poly_model *m = &r->poly[b];
        const int owner = b % r->nranks;
        double h[8] = {0};
        if (r->rank == owner) poly_info_pack(m, h);
        MPI_Bcast(h, 8, MPI_DOUBLE, owner, r->comm);
        char rs[160];
        if (r->rank == owner) snprintf(rs, sizeof rs, "%s", reason[b]);
        MPI_Bcast(rs, sizeof rs, MPI_CHAR, owner, r->comm);
        rs[sizeof rs - 1] = 0;
        if (h[0] == 1) {
            int nt = ((int)h[1] + 1) * ((int)h[1] + 2) / 2;
            if (r->rank == owner) poly_terms_pack(m, so, bc);
            MPI_Bcast(bc, nt * so * so, MPI_FLOAT, owner, r->comm);
            if (r->rank != owner) SP_TRY(poly_info_unpack(h, so, os, bc, m));
            m->psf->nstars = m->nstars;
            m->psf->is_fallback = 0;
        }
        if (r->rank == 0) {
            if (h[0] == 1)
                SP_INFO("ePSF band %s: band-wide polynomial model, degree %d, %d of %d PSF stars used, FWHM %.2f px "
                        "at the tile centre",
                        p->bands[b], (int)h[1], (int)h[2], (int)h[7], h[6]);
            else
                SP_WARN("ePSF band %s: the band-wide polynomial model failed its quality gate (%s; %d PSF-star "
                        "cutouts); the cell grid is used%s",
                        p->bands[b], rs, (int)h[7],
                        r->sp.epsf.smooth || os == 1 ? ""
                                                     : " (epsf.smoothing_kernel is none: with oversamp > 1 the "
                                                       "stack needs quartic or quadratic, docs/psf.md)");
        }
    }
    r->poly_decided = 1;
cleanup:
    free(sendb);
    free(counts);
    free(displs);
    if (mine)
        for (int b = 0; b < nb; b++) free(mine[b]);
    free(mine);
    free(nmine);
    if (ucuts)
        for (int b = 0; b < nb; b++) free(ucuts[b]);
    free(ucuts);
    free(reason);
    free(bc);
    return sp_mpi_agree(status, r->comm);
}

/* Every rank sends the ePSFs it built; records are [cell, band, nstars, kind, S*S samples]. */
int psf_grid_share(run_t *r)
{
    int status = SP_OK;
    const sp_plan *p = r->plan;
    long nc = p->ncells;
    int nb = p->nbands, os = r->cfg->epsf.oversamp, so = os * (r->cfg->epsf.final_psf_size - 1) + 1;
    int rec = 4 + so * so, nmine = 0, *counts = NULL, *displs = NULL;
    float *sendb = NULL, *recvb = NULL;
    for (long k = 0; k < nc; k++) nmine += r->grid_mine[k] * nb;
    SP_ALLOC(counts, r->nranks);
    SP_ALLOC(displs, r->nranks);
    SP_ALLOC(sendb, (size_t)(nmine > 0 ? nmine : 1) * rec);
    int m = 0;
    for (long k = 0; k < nc; k++) {
        if (!r->grid_mine[k]) continue;
        for (int b = 0; b < nb; b++, m++) {
            float *o = sendb + (size_t)m * rec;
            const sp_psf *q = r->grid[(long)b * nc + k];
            o[0] = (float)k;
            o[1] = (float)b;
            o[2] = (float)r->grid_nstars[(long)b * nc + k];
            o[3] = (float)r->grid_kind[(long)b * nc + k];
            memcpy(o + 4, q->data, (size_t)so * so * sizeof *o);
        }
    }
    int sendn = nmine * rec;
    MPI_Allgather(&sendn, 1, MPI_INT, counts, 1, MPI_INT, r->comm);
    long total = 0;
    for (int i = 0; i < r->nranks; i++) {
        displs[i] = (int)total;
        total += counts[i];
    }
    SP_CHECK(total < 2147483647L, SP_ERR_RESOURCE,
             "the ePSF grid (%ld floats) is too large to share in one message; lower epsf.oversamp or final_psf_size",
             total);
    SP_ALLOC(recvb, total + 1);
    MPI_Allgatherv(sendb, sendn, MPI_FLOAT, recvb, counts, displs, MPI_FLOAT, r->comm);
    for (long j = 0; j < total / rec && status == SP_OK; j++) {
        const float *o = recvb + (size_t)j * rec;
        long k = (long)o[0];
        int b = (int)o[1];
        if (r->grid_mine[k]) continue;
        status = grid_set(r, (long)b * nc + k, o + 4, so, os, (int)o[2], (int)o[3]);
    }
    status = sp_mpi_agree(status, r->comm);
    if (status == SP_OK && r->sp.poly) status = psf_poly_build(r);
    if (status == SP_OK) status = psf_field_build(r);
    if (status == SP_OK && r->sp.borrow) status = psf_grid_borrow(r);
    if (status == SP_OK && r->cfg->epsf.wing_pool) status = psf_grid_pool(r);
    if (status == SP_OK) status = sp_mpi_agree(psf_field_apply(r), r->comm);
    if (status == SP_OK && r->rank == 0)
        for (int b = 0; b < nb; b++) {
            int nk[4] = {0, 0, 0, 0};
            for (long k = 0; k < nc; k++) {
                int kd = r->grid_kind[(long)b * nc + k];
                if (r->grid[(long)b * nc + k] && kd >= 0 && kd < 4) nk[kd]++;
            }
            /* the kinds decide the photometry: say so when the empirical ePSF lost
             * (not for a band that uses its band-wide model: said above) */
            if ((r->poly && r->poly[b].psf) || r->given) continue;
            const int field = psf_field_on(r, b);
            sp_log(nk[0] == 0 && nk[1] + nk[2] > 0 && !field ? SP_LOG_WARN : SP_LOG_INFO,
                   "ePSF band %s: %d cell(s) empirical, %d Moffat fitted to the stars, %d configured Moffat, %d "
                   "borrowed (quality-gate reasons: logging.level debug)%s",
                   p->bands[b], nk[0], nk[1], nk[2], nk[3],
                   field && nk[1] + nk[2] > 0 ? "; the Moffat cells use the band-wide Moffat" : "");
        }
cleanup:
    free(counts);
    free(displs);
    free(sendb);
    free(recvb);
    return sp_mpi_agree(status, r->comm);
}

int psf_grid_at(const run_t *r, int b, int cell, double x, double y, sp_psf **scratch, const sp_psf **out)
{
    int status = SP_OK;
    const sp_plan *p = r->plan;
    const sp_psf *own = r->grid[(long)b * p->ncells + cell];
    SP_CHECK(own != NULL, SP_ERR_INTERNAL, "cell %d band %s: no ePSF in the grid", cell, p->bands[b]);
    if (r->given) return psf_given_at(r, b, x, y, scratch, out);
    if (r->poly && r->poly[b].psf) {
        const sp_psf *m = r->poly[b].psf;
        if (!*scratch || (*scratch)->size != m->size || (*scratch)->oversamp != m->oversamp) {
            sp_psf_free(scratch);
            SP_TRY(sp_psf_alloc(m->size, m->oversamp, scratch));
        }
        SP_TRY(poly_at(&r->poly[b], x, y, *scratch));
        *out = *scratch;
        return SP_OK;
    }
    if (psf_field_on(r, b)) {
        if (!*scratch || (*scratch)->size != own->size || (*scratch)->oversamp != own->oversamp) {
            sp_psf_free(scratch);
            SP_TRY(sp_psf_alloc(own->size, own->oversamp, scratch));
        }
        SP_TRY(psf_field_at(r, b, cell, x, y, *scratch));
        (*scratch)->is_fallback = own->is_fallback;
        (*scratch)->nstars = own->nstars;
        *out = *scratch;
        return SP_OK;
    }
    if (!r->sp.blend_psf) {
        *out = own;
        return SP_OK;
    }
    if (!*scratch || (*scratch)->size != own->size || (*scratch)->oversamp != own->oversamp) {
        sp_psf_free(scratch);
        SP_TRY(sp_psf_alloc(own->size, own->oversamp, scratch));
    }
    int ng = p->opts.epsf_ngrid;
    sp_epsf_grid g = {ng, ng, r->xedge, r->yedge, (const sp_psf *const *)(r->grid + (long)b * p->ncells)};
    SP_TRY(sp_epsf_grid_at(&g, x, y, *scratch));
    (*scratch)->is_fallback = own->is_fallback;
    *out = *scratch;
cleanup:
    return status;
}

void cell_psf_free(cell_t *c)
{
    int nb = c->run->plan->nbands;
    if (c->back)
        for (int b = 0; b < nb; b++) free(c->back[b]);
    free(c->back);
    c->back = NULL;
    if (c->rms)
        for (int b = 0; b < nb; b++) free(c->rms[b]);
    free(c->rms);
    if (c->epsf)
        for (int b = 0; b < nb; b++) sp_epsf_result_free(&c->epsf[b]);
    free(c->epsf);
    free(c->det);
    free(c->cat);
    c->cat = NULL;
    c->ncat = 0;
    c->rms = NULL;
    c->epsf = NULL;
    c->det = NULL;
}

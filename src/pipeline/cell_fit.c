/* cell_fit.c — the patch fits of a cell (DESIGN §5, docs/fitting.md): for every
 * patch, its ROI (base + halo) of every band with the band's PSF at the patch,
 * its base sources (fitted and reported) and the halo sources around them
 * (fitted and discarded, or held fixed: patch_run.halo_source_mode), fitted by
 * sp_fit_patch on the rank's OpenMP threads, one patch per thread. Each source is
 * reported by exactly one patch (its own), so the result of a source does not
 * depend on which rank or thread ran it. */
#include "cell.h"

#include "surveyproc/sp_coord.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_prof.h"

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* calibration aperture: a ring with less than this share of its area unmasked flags the source */
#define APCAL_MIN_COVER 0.25

/* Per-thread scratch of the patch loop; grows with the largest patch met. */
typedef struct {
    long *idx;
    size_t cap_idx;
    sp_fit_source *src;
    size_t cap_src;
    sp_fit_result *res;
    size_t cap_res;
    float *data, *ivar, *model, *ann;
    size_t cap_data, cap_ivar, cap_model, cap_ann;
    float *bres, *bivar; /* the calibration aperture's box: residual, ivar with neighbours masked */
    double *bown;        /* ... and the source's own model */
    size_t cap_bres, cap_bivar, cap_bown;
    float **mptr;      /* per band: model buffer or NULL */
    sp_psf **local;    /* per band: the PSF at the patch centre (blend of neighbouring cell ePSFs) */
    sp_fit_image *img; /* per band */
    sp_fit_patch_stats cost; /* the thread's fit CPU by stage and kind, summed over its patches */
} fit_scratch;

/* a += b for the cost fields of the patch statistics */
static void cost_sum(sp_fit_patch_stats *a, const sp_fit_patch_stats *b)
{
    for (int q = 0; q < SP_FIT_NCOST; q++)
        for (int k = 0; k < 2; k++) a->cpu_stage[q][k] += b->cpu_stage[q][k];
    a->cpu_patch += b->cpu_patch;
    a->cpu_total += b->cpu_total;
    for (int k = 0; k < 2; k++) {
        a->srcband[k] += b->srcband[k];
        a->groups[k] += b->groups[k];
    }
}

static void scratch_free(fit_scratch *s, int nb)
{
    free(s->idx);
    free(s->src);
    free(s->res);
    free(s->data);
    free(s->ivar);
    free(s->model);
    free(s->ann);
    free(s->bres);
    free(s->bivar);
    free(s->bown);
    free(s->mptr);
    if (s->local)
        for (int b = 0; b < nb; b++) sp_psf_free(&s->local[b]);
    free(s->local);
    free(s->img);
    memset(s, 0, sizeof *s);
}

/* Make *p hold at least n elements of elsize bytes (contents kept). */
static int ensure(void **p, size_t n, size_t elsize, size_t *cap)
{
    if (n <= *cap && *p) return SP_OK;
    size_t nc = *cap ? *cap : 64;
    while (nc < n) nc *= 2;
    void *q = realloc(*p, nc * elsize);
    if (!q) return SP_FAIL(SP_ERR_NOMEM, "out of memory (%zu x %zu bytes) in the patch fit", nc, elsize);
    *p = q;
    *cap = nc;
    return SP_OK;
}

/* Initial values of catalog source i (DESIGN §2: FLUX_<band>, ELL, THETA, Re);
 * aper (may be NULL) gives the forced aperture fluxes where FLUX_<band> is absent. */
static void source_init(const run_t *r, long i, const sp_aper_result *aper, sp_fit_source *s)
{
    const sp_plan *p = r->plan;
    const sp_cfg_patch_run *pr = &r->cfg->patch_run;
    int nb = p->nbands;
    memset(s, 0, sizeof *s);
    s->type = (sp_src_type)p->cat.type[i];
    s->type_auto = p->cat.type_given[i] ? 0 : pr->untyped_point_first ? 1 : 2;
    s->x = p->cat.x[i];
    s->y = p->cat.y[i];
    for (int b = 0; b < nb; b++) {
        double f = p->cat.flux_init[i * nb + b];
        if (!isfinite(f) && aper && isfinite(aper[b].flux) && aper[b].flux > 0) f = aper[b].flux;
        s->flux[b] = isfinite(f) ? fmax(f, pr->eps_flux) : NAN;
    }
    double re = p->cat.re[i], ell = p->cat.ell[i], th = p->cat.theta[i], n = p->cat.sersic_n[i];
    s->re = isfinite(re) && re > 0 ? re : pr->re_fallback_pix;
    s->q = isfinite(ell) && ell >= 0 && ell < 1 ? 1.0 - ell : 1.0;
    s->theta = isfinite(th) ? th * (M_PI / 180.0) : 0.0;
    s->sersic_n = isfinite(n) && n > 0 ? n : pr->sersic_n_init;
    s->id = i;
}

/* QA: the s x s cutout of data, model, residual around base source k of the
 * patch (patch ROI arrays of every band) into the cell's slot buffer. */
static void qa_cutout(cell_t *c, const fit_scratch *s, const sp_patch *pt, long ck, int slot_i)
{
    const run_t *r = c->run;
    int nb = r->plan->nbands, S = r->qa.qa_cut_size;
    long pnx = pt->rx1 - pt->rx0, pny = pt->ry1 - pt->ry0;
    size_t npix = (size_t)pnx * pny, ss = (size_t)S * S;
    long i = c->src[ck];
    long cx = lround(r->plan->cat.x[i]) - pt->rx0 - S / 2, cy = lround(r->plan->cat.y[i]) - pt->ry0 - S / 2;
    float *out = c->cut + (size_t)slot_i * 3 * nb * ss;
    for (int b = 0; b < nb; b++)
        for (int y = 0; y < S; y++)
            for (int x = 0; x < S; x++) {
                long u = cx + x, v = cy + y;
                float d = NAN, m = NAN;
                if (u >= 0 && v >= 0 && u < pnx && v < pny) {
                    size_t k = (size_t)b * npix + (size_t)v * pnx + u;
                    m = s->model[k];
                    d = s->ivar[k] > 0 ? s->data[k] : NAN;
                }
                size_t o = (size_t)b * ss + (size_t)y * S + x;
                out[o] = d;
                out[(size_t)nb * ss + o] = m;
                out[(size_t)2 * nb * ss + o] = d - m;
            }
}

/* QA: block means of the patch's data, model and residual into overview slot slot_i. */
static void qa_overview(cell_t *c, const fit_scratch *s, const sp_patch *pt, int slot_i)
{
    int nb = c->run->plan->nbands, ds = c->ov_ds, H = c->ov_h, W = c->ov_w;
    long pnx = pt->rx1 - pt->rx0, pny = pt->ry1 - pt->ry0;
    size_t npix = (size_t)pnx * pny, hw = (size_t)H * W;
    float *out = c->ov + (size_t)slot_i * 3 * nb * hw;
    for (int b = 0; b < nb; b++)
        for (int Y = 0; Y < H; Y++)
            for (int X = 0; X < W; X++) {
                double sd = 0, sm = 0;
                int nd = 0, nm = 0;
                for (long y = (long)Y * ds; y < (long)(Y + 1) * ds && y < pny; y++)
                    for (long x = (long)X * ds; x < (long)(X + 1) * ds && x < pnx; x++) {
                        size_t k = (size_t)b * npix + (size_t)y * pnx + x;
                        sm += s->model[k];
                        nm++;
                        if (s->ivar[k] > 0) {
                            sd += s->data[k] - s->model[k];
                            nd++;
                        }
                    }
                size_t o = (size_t)b * hw + (size_t)Y * W + X;
                float m = nm ? (float)(sm / nm) : NAN, rr = nd ? (float)(sd / nd) : NAN;
                out[o] = nd ? rr + m : NAN;
                out[(size_t)nb * hw + o] = m;
                out[(size_t)2 * nb * hw + o] = rr;
            }
}

/* The data-based source Poisson term of band b's inverse variance, as
 * sp_fit_image.poisson_k: per frame var = (SKYSIG^2 + max(raw, 0)/EGAIN) scale^2
 * (sp_prep_ivar), i.e. k = scale/EGAIN per unit of scaled data; the coadd of
 * the band's frames with weights w = 1/(SKYSIG scale)^2 (sp_prep_coadd) has
 * k = sum w^2 k_f / (sum w)^2. 0 when a frame has no gain. */
static double band_poisson_k(const sp_plan *p, int b)
{
    double sw = 0.0, swk = 0.0;
    for (int i = 0; i < p->nframes; i++) {
        const sp_frame *fr = &p->frames[i];
        if (fr->band_index != b) continue;
        if (!(fr->egain > 0) || !(fr->skysig > 0) || !(fr->scale > 0)) return 0.0;
        double w = 1.0 / (fr->skysig * fr->scale * fr->skysig * fr->scale);
        sw += w;
        swk += w * w * fr->scale / fr->egain;
    }
    return sw > 0 ? swk / (sw * sw) : 0.0;
}

/* Fit patch pid of the cell; base sources of the patch are src[base0 ..). */
/* 1 if base source k is one the aperture correction can use in band b (zp.apcorr_snr_min,
 * zp.apcorr_blend_max; reported point sources with a fitted position). */
static int apcal_use(const sp_config *cfg, const fit_scratch *s, long k, int b)
{
    const sp_fit_result *f = &s->res[k];
    return s->src[k].role == SP_ROLE_FIT_REPORT && f->type == SP_SRC_STAR && isfinite(f->x) && isfinite(f->y) &&
           f->flux_err[b] > 0 && f->flux[b] >= cfg->zp.apcorr_snr_min * f->flux_err[b] &&
           f->blend[b] <= cfg->zp.apcorr_blend_max;
}

/* The calibration flux of the patch's reported point sources (zp.apcorr): the model flux
 * plus the residual light inside the calibration aperture, less the residual's level in
 * the local annulus (epsf.star_local_bkg_annulus_*):
 *     APCAL = F_fit + sum_pix overlap(pix) (resid - b),   resid = data - model,
 * the model being every source of the patch and its sky. So the neighbours are subtracted
 * (a data aperture with a data annulus is biased by them in crowded fields); b takes out
 * the local level a patch-wide sky cannot (the background mesh is high near bright stars);
 * what the PSF model lacks within the radius shows as residual light, and the model's own
 * light beyond the radius stays counted (an aperture-to-total correction by the model).
 * Where the neighbours' model is above zp.apcorr_mask_sigma pixel sigmas the pixels are
 * masked (their residual is the neighbours' model error as much as this source's missing
 * light: in a field of galaxies those errors moved the correction by 2%), in the annulus
 * too, and each 1-pixel ring of the aperture takes the mean residual of its unmasked
 * pixels (sp_aper_measure_fill): the missing PSF light is round, the neighbours' is not.
 * Measured only where the correction can use it (zp.apcorr_snr_min, zp.apcorr_blend_max);
 * the error is the residual sum's. Galaxies and other sources keep NaN (stage_aperture).
 * Converts s->model to the residual in the bands it measures. */
static int apcal_measure(cell_t *c, fit_scratch *s, const sp_patch *pt, long base0, size_t npix,
                         const sp_fit_patch_stats *st)
{
    int status = SP_OK;
    const run_t *r = c->run;
    const sp_config *cfg = r->cfg;
    int nb = r->plan->nbands;
    double rin = cfg->epsf.star_local_bkg_annulus_rin_pix, rout = cfg->epsf.star_local_bkg_annulus_rout_pix;
    double tmask = cfg->zp.apcorr_mask_sigma;
    long pnx = pt->rx1 - pt->rx0, pny = pt->ry1 - pt->ry0;
    for (int b = 0; b < nb; b++) {
        long k0 = 0;
        while (k0 < pt->nsrc && !apcal_use(cfg, s, k0, b)) k0++;
        if (k0 == pt->nsrc) continue; /* no source of the patch the correction can use in this band */
        SP_TRY(ensure((void **)&s->ann, sp_aper_scratch_size(rout), sizeof *s->ann, &s->cap_ann));
        long H = (long)ceil(fmax(rout, r->apcal_r[b])) + 2, bw = 2 * H + 1;
        SP_TRY(ensure((void **)&s->bres, (size_t)(bw * bw), sizeof *s->bres, &s->cap_bres));
        SP_TRY(ensure((void **)&s->bivar, (size_t)(bw * bw), sizeof *s->bivar, &s->cap_bivar));
        SP_TRY(ensure((void **)&s->bown, (size_t)(bw * bw), sizeof *s->bown, &s->cap_bown));
        float *m = s->model + (size_t)b * npix;
        const float *d = s->data + (size_t)b * npix, *iv = s->ivar + (size_t)b * npix;
        const double sky = st->sky[b];
        for (size_t i = 0; i < npix; i++) m[i] = d[i] - m[i];
        for (long k = k0; k < pt->nsrc; k++) {
            if (!apcal_use(cfg, s, k, b)) continue;
            const sp_fit_result *f = &s->res[k];
            double xp = f->x - pt->rx0, yp = f->y - pt->ry0; /* patch pixels */
            /* the box around the source, within the patch (an aperture that leaves the patch is
             * flagged SP_APER_EDGE by the measurement, as on the whole patch) */
            long bx0 = (long)floor(xp + 0.5) - H, by0 = (long)floor(yp + 0.5) - H;
            long bx1 = bx0 + bw < pnx ? bx0 + bw : pnx, by1 = by0 + bw < pny ? by0 + bw : pny;
            bx0 = bx0 > 0 ? bx0 : 0;
            by0 = by0 > 0 ? by0 : 0;
            long bnx = bx1 - bx0, bny = by1 - by0;
            double xb = xp - bx0, yb = yp - by0;
            /* the source's own model in the box; the rest of the model is its neighbours' (and the sky) */
            sp_psf_render(s->img[b].psf, xb, yb, (int)bnx, (int)bny, s->bown, NULL, NULL);
            for (long j = 0; j < bny; j++)
                for (long i = 0; i < bnx; i++) {
                    size_t o = (size_t)(j * bnx + i), q = (size_t)(by0 + j) * (size_t)pnx + (size_t)(bx0 + i);
                    float w = iv[q];
                    double nbr = (double)d[q] - (double)m[q] - sky - f->flux[b] * s->bown[o];
                    if (tmask > 0 && w > 0 && nbr > 0 && nbr * nbr * w > tmask * tmask) w = 0.0f;
                    s->bres[o] = m[q];
                    s->bivar[o] = w;
                }
            sp_aper_result a;
            sp_aper_measure_fill(s->bres, s->bivar, bnx, bny, xb, yb, r->apcal_r[b], rin, rout, APCAL_MIN_COVER,
                                 s->ann, &a);
            sp_aper_result *o = &c->apcal[(base0 + k) * nb + b];
            *o = a;
            o->flux = isfinite(a.flux) && isfinite(f->flux[b]) ? f->flux[b] + a.flux : NAN;
        }
    }
cleanup:
    return status;
}

static int fit_one(cell_t *c, fit_scratch *s, sp_fit_workspace *ws, int pid, long base0, sp_store_patchrow *row)
{
    int status = SP_OK;
    run_t *r = c->run;
    const sp_plan *p = r->plan;
    const sp_patch *pt = &p->patches[pid];
    int nb = p->nbands;
    double t0 = sp_wtime();
    /* sources in the ROI, base ones first; grow the buffer until they all fit */
    long n;
    SP_TRY(ensure((void **)&s->idx, 256, sizeof *s->idx, &s->cap_idx));
    for (;;) {
        n = sp_plan_patch_sources(p, pid, s->idx, (long)s->cap_idx);
        if (n < (long)s->cap_idx) break;
        SP_TRY(ensure((void **)&s->idx, 2 * s->cap_idx, sizeof *s->idx, &s->cap_idx));
    }
    SP_TRY(ensure((void **)&s->src, (size_t)n + 1, sizeof *s->src, &s->cap_src));
    SP_TRY(ensure((void **)&s->res, (size_t)n + 1, sizeof *s->res, &s->cap_res));
    for (long k = 0; k < n; k++) {
        long i = s->idx[k];
        int base = k < pt->nsrc;
        source_init(r, i, base ? &c->aper[(base0 + k) * nb] : NULL, &s->src[k]);
        if (base)
            /* saturated sources are modelled (their wings reach the neighbours) but not reported */
            s->src[k].role = (c->excl[base0 + k] & SP_EXCL_SATURATION) ? SP_ROLE_FIT_DISCARD : SP_ROLE_FIT_REPORT;
        else {
            /* a source outside the ROI shows the fit a sliver of its wing at most: held at its
             * initial values (catalog flux, or the fitter's estimate from the pixels it sees) so
             * it cannot make its group's normal matrix singular */
            double x = p->cat.x[i], y = p->cat.y[i];
            int inside = x >= pt->rx0 - 0.5 && x < pt->rx1 - 0.5 && y >= pt->ry0 - 0.5 && y < pt->ry1 - 0.5;
            s->src[k].role = r->sp.halo_fixed || !inside ? SP_ROLE_FIXED : SP_ROLE_FIT_DISCARD;
        }
    }
    /* images: the patch ROI cut out of the cell ROI, one per band */
    long px0 = pt->rx0 - c->x0, py0 = pt->ry0 - c->y0, pnx = pt->rx1 - pt->rx0, pny = pt->ry1 - pt->ry0;
    size_t npix = (size_t)pnx * (size_t)pny;
    SP_TRY(ensure((void **)&s->data, npix * nb, sizeof *s->data, &s->cap_data));
    SP_TRY(ensure((void **)&s->ivar, npix * nb, sizeof *s->ivar, &s->cap_ivar));
    double xc = 0.5 * (pt->bx0 + pt->bx1 - 1), yc = 0.5 * (pt->by0 + pt->by1 - 1); /* tile pixels */
    for (int b = 0; b < nb; b++) {
        float *d = s->data + (size_t)b * npix, *w = s->ivar + (size_t)b * npix;
        for (long y = 0; y < pny; y++) {
            size_t off = (size_t)(py0 + y) * c->nx + px0;
            memcpy(d + y * pnx, c->data[b] + off, pnx * sizeof *d);
            memcpy(w + y * pnx, c->ivar[b] + off, pnx * sizeof *w);
        }
        sp_fit_image *im = &s->img[b];
        sp_fit_image_aligned(im, (int)pt->rx0, (int)pt->ry0, (int)pnx, (int)pny);
        im->data = d;
        im->ivar = w;
        im->band = b;
        /* the ivar's Poisson term follows the data: let the fitter use the model's */
        im->poisson_k = r->sp.poisson_from_model ? band_poisson_k(p, b) : 0.0;
        SP_TRY(psf_grid_at(r, b, c->cell->id, xc, yc, &s->local[b], &im->psf));
        im->psf_fallback = im->psf->is_fallback;
    }
    /* the model image where QA keeps a cutout or an overview of this patch */
    int jp = pid - c->cell->patch0, want = c->ov_slot && c->ov_slot[jp] >= 0;
    for (long k = 0; k < pt->nsrc && !want; k++) want = c->cut_slot && c->cut_slot[base0 + k] >= 0;
    /* ... and for the calibration aperture (zp.apcorr), which is measured on the residual */
    int want_qa = want;
    want |= r->apcal_r != NULL;
    if (want) {
        SP_TRY(ensure((void **)&s->model, npix * nb, sizeof *s->model, &s->cap_model));
        for (int b = 0; b < nb; b++) s->mptr[b] = s->model + (size_t)b * npix;
    }
    sp_fit_patch_stats st;
    SP_TRY(sp_fit_patch(ws, &r->sp.fit, s->img, nb, nb, s->src, (int)n, s->res, &st, want ? s->mptr : NULL));
    cost_sum(&s->cost, &st);
    if (want_qa) {
        for (long k = 0; k < pt->nsrc; k++)
            if (c->cut_slot[base0 + k] >= 0) qa_cutout(c, s, pt, base0 + k, (int)c->cut_slot[base0 + k]);
        if (c->ov_slot[jp] >= 0) qa_overview(c, s, pt, c->ov_slot[jp]);
    }
    if (r->apcal_r) SP_TRY(apcal_measure(c, s, pt, base0, npix, &st));
    {
        char sky[256] = "";
        size_t off = 0;
        for (int b = 0; b < nb && off + 24 < sizeof sky; b++)
            off += (size_t)snprintf(sky + off, sizeof sky - off, "%s%.4f+-%.4f", b ? " " : "", st.sky[b], st.sky_err[b]);
        SP_DEBUG("patch %d: %ld source(s) (%ld base), %d group(s), largest %d, %ld render(s), %.3f s; sky %s", pid, n,
                 pt->nsrc, st.ngroups, st.max_group_size, st.renders, st.seconds, sky);
    }
    for (long k = 0; k < pt->nsrc; k++) {
        if (s->src[k].role != SP_ROLE_FIT_REPORT) continue;
        c->fit[base0 + k] = s->res[k];
        c->fitted[base0 + k] = 1;
    }
    double chi2 = 0, np = 0, rms = 0;
    for (int b = 0; b < nb; b++) {
        chi2 += st.chi2[b];
        np += (double)st.npix[b];
        rms += st.rms[b];
    }
    row->status = SP_CELL_DONE;
    row->nsrc_roi = n;
    row->seconds = sp_wtime() - t0;
    row->chi2dof = np > 0 ? chi2 / np : NAN;
    row->resid_rms = rms / nb;
cleanup:
    return status;
}

/* Which of the cell's sources and patches QA keeps, and their buffers. The
 * cutout slots of a cell are local (0 .. ncut-1) with cut_slots[] mapping them
 * to rows of /qa/cutouts; likewise for the overviews. */
static int qa_slots(cell_t *c)
{
    int status = SP_OK;
    const run_t *r = c->run;
    const sp_plan *p = r->plan;
    int nb = p->nbands;
    SP_ALLOC(c->cut_slot, c->nsrc + 1);
    SP_ALLOC(c->cut_slots, c->nsrc + 1);
    SP_ALLOC(c->ov_slot, c->cell->npatch + 1);
    SP_ALLOC(c->ov_slots, c->cell->npatch + 1);
    c->ncut = c->nov = 0;
    for (long k = 0; k < c->nsrc; k++) {
        long row = c->src[k] - r->qa.qa_cut_start;
        c->cut_slot[k] = -1;
        if (r->qa.qa_cut_n > 0 && row >= 0 && row < r->qa.qa_cut_n) {
            c->cut_slots[c->ncut] = row;
            c->cut_slot[k] = c->ncut++;
        }
    }
    int ids[SP_STORE_OVERVIEW_MAX], nid = 0;
    if (r->qa.qa_overview) nid = sp_store_overview_patches(p, ids, &c->ov_ds, &c->ov_h, &c->ov_w);
    for (int j = 0; j < c->cell->npatch; j++) {
        c->ov_slot[j] = -1;
        for (int q = 0; q < nid; q++)
            if (ids[q] == c->cell->patch0 + j) {
                c->ov_slots[c->nov] = q;
                c->ov_slot[j] = c->nov++;
            }
    }
    size_t S = (size_t)r->qa.qa_cut_size;
    if (c->ncut > 0) SP_ALLOC(c->cut, (size_t)c->ncut * 3 * nb * S * S);
    if (c->nov > 0) SP_ALLOC(c->ov, (size_t)c->nov * 3 * nb * c->ov_h * c->ov_w);
cleanup:
    return status;
}

int cell_qa_write(cell_t *c)
{
    int status = SP_OK;
    const run_t *r = c->run;
    int nb = r->plan->nbands;
    static const char *const kinds[3] = {"data", "model", "resid"};
    char path[96];
    size_t S = (size_t)r->qa.qa_cut_size;
    for (int q = 0; q < c->ncut; q++)
        for (int k = 0; k < 3; k++) {
            long st[4] = {c->cut_slots[q], 0, 0, 0}, n4[4] = {1, nb, (long)S, (long)S};
            snprintf(path, sizeof path, "/qa/cutouts/%s", kinds[k]);
            SP_TRY(sp_h5_array_write(r->store->h, path, SP_H5_F32, st, n4,
                                     c->cut + ((size_t)q * 3 + k) * nb * S * S));
        }
    size_t hw = (size_t)c->ov_h * c->ov_w;
    for (int q = 0; q < c->nov; q++)
        for (int k = 0; k < 3; k++) {
            long st[4] = {c->ov_slots[q], 0, 0, 0}, n4[4] = {1, nb, c->ov_h, c->ov_w};
            snprintf(path, sizeof path, "/qa/patch_overview/%s", kinds[k]);
            SP_TRY(sp_h5_array_write(r->store->h, path, SP_H5_F32, st, n4, c->ov + ((size_t)q * 3 + k) * nb * hw));
        }
cleanup:
    return status;
}

int stage_fit(cell_t *c)
{
    int status = SP_OK;
    run_t *r = c->run;
    const sp_plan *p = r->plan;
    const sp_cell *ce = c->cell;
    int nb = p->nbands;
    long *base0 = NULL;
    double *px = NULL, *py = NULL;
    thread_err te = {0};
    SP_ALLOC(c->fit, c->nsrc + 1);
    SP_ALLOC(c->fitted, c->nsrc + 1);
    SP_ALLOC(c->fit_ra, c->nsrc + 1);
    SP_ALLOC(c->fit_dec, c->nsrc + 1);
    SP_ALLOC(c->prow, ce->npatch);
    SP_ALLOC(base0, ce->npatch + 1);
    for (int j = 0; j < ce->npatch; j++) {
        const sp_patch *pt = &p->patches[ce->patch0 + j];
        base0[j + 1] = base0[j] + pt->nsrc;
        c->prow[j] = (sp_store_patchrow){.id = pt->id, .cell = pt->cell, .ix = pt->ix, .iy = pt->iy, .bx0 = pt->bx0,
                                         .by0 = pt->by0, .bx1 = pt->bx1, .by1 = pt->by1, .rx0 = pt->rx0,
                                         .ry0 = pt->ry0, .rx1 = pt->rx1, .ry1 = pt->ry1, .nsrc = pt->nsrc,
                                         .nsrc_roi = 0, .active = (uint8_t)pt->active, .status = SP_CELL_SKIPPED,
                                         .seconds = 0, .chi2dof = NAN, .resid_rms = NAN};
    }
    SP_TRY(qa_slots(c));
    SP_CHECK(base0[ce->npatch] == c->nsrc, SP_ERR_INTERNAL, "cell %d: patch sources %ld != cell sources %ld", ce->id,
             base0[ce->npatch], c->nsrc);
#pragma omp parallel num_threads(r->threads)
    {
        fit_scratch s;
        memset(&s, 0, sizeof s);
        int tid = omp_get_thread_num();
        s.local = calloc((size_t)nb, sizeof *s.local);
        s.img = calloc((size_t)nb, sizeof *s.img);
        s.mptr = calloc((size_t)nb, sizeof *s.mptr);
        if (!s.local || !s.img || !s.mptr) thread_err_record(&te, SP_FAIL(SP_ERR_NOMEM, "out of memory"), "patch fit");
#pragma omp for schedule(dynamic, 1)
        for (int j = 0; j < ce->npatch; j++) {
            const sp_patch *pt = &p->patches[ce->patch0 + j];
            if (te.status != SP_OK || !pt->active || pt->nsrc == 0) continue;
            int st = fit_one(c, &s, r->ws[tid], ce->patch0 + j, base0[j], &c->prow[j]);
            if (st != SP_OK) {
                char what[160];
                snprintf(what, sizeof what, "patch %d (x %ld-%ld, y %ld-%ld)", pt->id, pt->bx0, pt->bx1, pt->by0,
                         pt->by1);
                thread_err_record(&te, st, what);
            }
            sp_coord_poll(); /* thread 0 only: answers the workers between patches */
        }
#pragma omp critical(fit_cost)
        cost_sum(&r->fitcost, &s.cost);
        scratch_free(&s, nb);
    }
    SP_TRY(thread_err_raise(&te));
    /* sky positions of the fitted positions (wcslib objects are not shared across threads) */
    SP_ALLOC(px, c->nsrc + 1);
    SP_ALLOC(py, c->nsrc + 1);
    for (long k = 0; k < c->nsrc; k++) {
        px[k] = c->fitted[k] ? c->fit[k].x : NAN;
        py[k] = c->fitted[k] ? c->fit[k].y : NAN;
    }
    if (c->nsrc > 0) SP_TRY(sp_wcs_pix2sky(p->wcs, c->nsrc, px, py, c->fit_ra, c->fit_dec, NULL));
    for (int j = 0; j < ce->npatch; j++) r->nfit_patches += c->prow[j].status == SP_CELL_DONE;
    for (long k = 0; k < c->nsrc; k++) r->nfit_sources += c->fitted[k];
cleanup:
    free(base0);
    free(px);
    free(py);
    return status;
}

static double theta_sex(double rad)
{
    double d = fmod(rad * 180.0 / M_PI, 180.0);
    if (d <= -90) d += 180;
    if (d > 90) d -= 180;
    return d;
}

void cell_fit_row(const cell_t *c, long k, void *rows, long row)
{
    const run_t *r = c->run;
    const sp_store_catalog *s = &r->store->cat;
    int nb = r->plan->nbands;
    if (!c->fit || !c->fitted[k]) return;
    const sp_fit_result *f = &c->fit[k];
    sp_store_set_str(s, rows, row, s->type, sp_plan_type_name(f->type)); /* the model used */
    sp_store_set_f64(s, rows, row, s->x_fit, f->x);
    sp_store_set_f64(s, rows, row, s->y_fit, f->y);
    sp_store_set_f64(s, rows, row, s->xerr, f->x_err);
    sp_store_set_f64(s, rows, row, s->yerr, f->y_err);
    sp_store_set_f64(s, rows, row, s->ra_fit, c->fit_ra[k]);
    sp_store_set_f64(s, rows, row, s->dec_fit, c->fit_dec[k]);
    if (f->type != SP_SRC_STAR) {
        sp_store_set_f64(s, rows, row, s->re_fit, f->re);
        sp_store_set_f64(s, rows, row, s->re_err, f->re_err);
        sp_store_set_f64(s, rows, row, s->q_fit, f->q);
        sp_store_set_f64(s, rows, row, s->q_err, f->q_err);
        sp_store_set_f64(s, rows, row, s->theta_fit, theta_sex(f->theta));
        sp_store_set_f64(s, rows, row, s->theta_err, f->theta_err * 180.0 / M_PI);
    }
    if (f->type == SP_SRC_SERSIC) sp_store_set_f64(s, rows, row, s->sersic_n, f->sersic_n);
    sp_store_set_i32(s, rows, row, s->niter1, f->iters[0]);
    sp_store_set_i32(s, rows, row, s->niter2, f->iters[1]);
    sp_store_set_i32(s, rows, row, s->niter3, f->iters[2]);
    int conv = (f->flags & SP_FITF_CONVERGED) != 0;
    int most = f->iters[0] > f->iters[1] ? f->iters[0] : f->iters[1];
    if (f->iters[2] > most) most = f->iters[2];
    int hit = (f->flags & SP_FITF_MAXITER) ||
              (!conv && most >= r->cfg->patch_run.n_opt_iters - r->cfg->patch_run.flag_maxiter_margin);
    sp_store_set_i32(s, rows, row, s->converged, conv);
    sp_store_set_i32(s, rows, row, s->hit_maxiter, hit);
    sp_store_set_i32(s, rows, row, s->fit_flags, (int)f->flags);
    for (int b = 0; b < nb; b++) {
        const sp_store_bandcols *bc = &s->band[b];
        sp_store_set_f64(s, rows, row, bc->flux_fit, f->flux[b]);
        sp_store_set_f64(s, rows, row, bc->fluxerr_fit, f->flux_err[b]);
        sp_store_set_f64(s, rows, row, bc->fluxerr_cond, f->flux_err_cond[b]);
        sp_store_set_f64(s, rows, row, bc->chi2dof, f->chi2dof[b]);
        sp_store_set_f64(s, rows, row, bc->blend, f->blend[b]);
        sp_store_set_i32(s, rows, row, bc->psf_fallback, (f->band_flags[b] & SP_FITB_FALLBACK) != 0);
    }
}

/* psf_field.c — epsf.moffat_field: the band-wide Moffat (sp_moffat_field_fit)
 * that cells whose ePSF fell back to a Moffat use instead of their own.
 *
 * PSF pass: each cell keeps, per band, cutouts of up to `per_cell` of its PSF
 * stars (highest SNR, base region only, so a star belongs to one cell; the
 * builder's cutouts with neighbours masked, cropped to a box of ~3.3 of the
 * cell's FWHM). Share (collective, after the cells' ePSFs): band b's cutouts
 * are gathered on rank b % nranks, sorted by (cell, star) so the input does not
 * depend on the rank layout, and fitted; the model's description is broadcast
 * and stored in /epsf/moffat_field (row b, SP_MFIELD_INFO doubles):
 *   [0] 1 built, 0 refused (NaN: not decided yet), [1..4] degree of ln FWHM,
 *   ln(beta - 1), e1, e2, [5] stars given, [6] stars used, [7] x_ref, [8] y_ref,
 *   [9] scale, [10] median chi2/dof, [11] FWHM at the tile centre, [12..15] the used
 *   stars' bounding box xmin, xmax, ymin, ymax (the model is clamped into it),
 *   [16 + 15 k + t] coefficient t of parameter k.
 * Fit pass: a patch's PSF is the bilinear blend of the four cells around it as
 * before, each Moffat cell's node replaced by the band-wide Moffat at the
 * patch centre (so with every node a Moffat it is the model at that point);
 * /epsf/<band> of the Moffat cells holds the model at the cell centre.
 * Resume: the rows are read back when every band was decided; otherwise the
 * PSF pass runs again over every cell to regather the stars. */
#include "cell.h"

#include "surveyproc/sp_error.h"
#include "surveyproc/sp_mpi.h"
#include "surveyproc/sp_score.h" /* sp_score_median */

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MF_HDR 12        /* doubles per cutout record: cell, seq, n, ix, iy, x, y, flux, bkg, bkg_rms, snr, q */

struct mf_band {
    char *rec; /* this rank's cutout records of the PSF pass */
    size_t nbytes, cap;
    int n;
    sp_moffat_field model;
    int built;
    char reason[200];
};

struct mfield_state {
    struct mf_band *band;
    int decided, per_cell;
};

/* Stars kept per cell and band: 1.5x the fit's share of each cell, at least 2
 * (the fit keeps the highest SNR over the band; every cell keeps its best). */
/* stars per band in the fit (highest SNR): the library's default */
static int max_stars(void)
{
    sp_moffat_field_params d;
    sp_moffat_field_params_default(&d);
    return d.max_stars > 0 ? d.max_stars : 120;
}

static int per_cell(long nact)
{
    const int MF_MAX_STARS = max_stars();
    long pc = nact > 0 ? (long)ceil(1.5 * MF_MAX_STARS / (double)nact) : MF_MAX_STARS;
    return (int)(pc < 2 ? 2 : pc > MF_MAX_STARS ? MF_MAX_STARS : pc);
}

int psf_field_kept_max(long ncells)
{
    /* nact per_cell(nact) <= 1.5 max_stars + nact (the ceiling) or 2 nact (the floor) */
    return (int)(1.5 * max_stars()) + 2 * (int)(ncells < 100000 ? ncells : 100000);
}

int psf_field_cut_size(double fwhm, int final_size)
{
    /* 1.3 x the fit's box of 2.5 FWHM: room for the star's centre to move */
    int h = (int)ceil(fmax(3.0, 2.5 * 1.3 * (fwhm > 0 ? fwhm : 4.0))), hmax = (final_size - 1) / 2;
    return 2 * (h < hmax ? h : hmax) + 1;
}

static size_t rec_size(int n) { return sizeof(double) * MF_HDR + 2 * sizeof(float) * (size_t)n * n; }

int psf_field_setup(run_t *r)
{
    int status = SP_OK;
    const sp_plan *p = r->plan;
    if (!r->cfg->epsf.moffat_field) return SP_OK;
    SP_ALLOC(r->mf, 1);
    SP_ALLOC(r->mf->band, p->nbands);
    long nact = 0;
    for (long k = 0; k < p->ncells; k++) nact += p->cells[k].active != 0;
    r->mf->per_cell = per_cell(nact);
cleanup:
    return status;
}

void psf_field_free(run_t *r)
{
    if (!r->mf) return;
    for (int b = 0; b < r->plan->nbands; b++) free(r->mf->band[b].rec);
    free(r->mf->band);
    free(r->mf);
    r->mf = NULL;
}

static int cmp_snr_desc(const void *a, const void *b)
{
    const sp_psfstar *x = a, *y = b;
    if (x->snr != y->snr) return (x->snr < y->snr) - (x->snr > y->snr);
    if (x->y != y->y) return (x->y > y->y) - (x->y < y->y);
    return (x->x > y->x) - (x->x < y->x);
}

int psf_field_collect(cell_t *c, int b, const sp_psfstar *stars, int nstars, const sp_epsf_params *ep0,
                      double cell_fwhm)
{
    int status = SP_OK;
    run_t *r = c->run;
    sp_psfstar *own = NULL;
    sp_epsf_cutout *cuts = NULL;
    int got = 0;
    if (!r->mf || r->mf->decided || nstars <= 0) return SP_OK;
    struct mf_band *mb = &r->mf->band[b]; /* band b is on one thread at a time */
    SP_ALLOC(own, nstars);
    int nown = 0;
    for (int s = 0; s < nstars; s++) {
        double x = stars[s].x + c->x0, y = stars[s].y + c->y0;
        if (x >= c->cell->bx0 - 0.5 && x < c->cell->bx1 - 0.5 && y >= c->cell->by0 - 0.5 && y < c->cell->by1 - 0.5)
            own[nown++] = stars[s];
    }
    qsort(own, (size_t)nown, sizeof *own, cmp_snr_desc);
    if (nown > r->mf->per_cell) nown = r->mf->per_cell;
    if (nown == 0) goto cleanup;
    sp_epsf_params ep = *ep0;
    ep.final_size = psf_field_cut_size(cell_fwhm > 0 && isfinite(cell_fwhm) ? cell_fwhm : ep.fallback_fwhm,
                                       ep.final_size);
    SP_ALLOC(cuts, nown);
    SP_TRY(sp_epsf_cutouts(c->data[b], c->ivar[b], c->mask[b], (int)c->nx, (int)c->ny, (double)c->x0, (double)c->y0,
                           own, nown, &ep, cuts, &got));
    size_t rs = rec_size(ep.final_size);
    if (mb->nbytes + (size_t)got * rs > mb->cap) {
        size_t cap = 2 * mb->cap > mb->nbytes + (size_t)got * rs ? 2 * mb->cap : mb->nbytes + (size_t)got * rs + 4096;
        char *nr = realloc(mb->rec, cap);
        SP_CHECK(nr, SP_ERR_NOMEM, "out of memory (band-wide Moffat: PSF-star cutouts)");
        mb->rec = nr;
        mb->cap = cap;
    }
    for (int i = 0; i < got; i++) {
        const sp_epsf_cutout *q = &cuts[i];
        char *o = mb->rec + mb->nbytes;
        double hd[MF_HDR] = {c->cell->id, i, q->n, q->ix, q->iy, q->x, q->y, q->flux, q->bkg, q->bkg_rms, q->snr,
                             q->q};
        memcpy(o, hd, sizeof hd);
        memcpy(o + sizeof hd, q->d, sizeof(float) * (size_t)q->n * q->n);
        memcpy(o + sizeof hd + sizeof(float) * (size_t)q->n * q->n, q->w, sizeof(float) * (size_t)q->n * q->n);
        mb->nbytes += rs;
        mb->n++;
    }
cleanup:
    for (int i = 0; i < got; i++) sp_epsf_cutout_free(&cuts[i]);
    free(cuts);
    free(own);
    return status;
}

static void info_pack(const struct mf_band *mb, double *h)
{
    for (int i = 0; i < SP_MFIELD_INFO; i++) h[i] = NAN;
    const sp_moffat_field *m = &mb->model;
    h[0] = mb->built;
    h[5] = m->nstars_in;
    if (!mb->built) return;
    for (int k = 0; k < 4; k++) h[1 + k] = m->deg[k];
    h[6] = m->nstars_used;
    h[7] = m->x_ref;
    h[8] = m->y_ref;
    h[9] = m->scale;
    h[10] = m->chi2dof;
    double fw, be, q, th;
    sp_moffat_field_at(m, m->x_ref, m->y_ref, &fw, &be, &q, &th);
    h[11] = fw;
    h[12] = m->xmin;
    h[13] = m->xmax;
    h[14] = m->ymin;
    h[15] = m->ymax;
    for (int k = 0; k < 4; k++)
        for (int t = 0; t < SP_MOFFAT_FIELD_MAXT; t++) h[16 + SP_MOFFAT_FIELD_MAXT * k + t] = m->c[k][t];
}

static int info_unpack(const double *h, struct mf_band *mb)
{
    memset(&mb->model, 0, sizeof mb->model);
    mb->built = h[0] == 1;
    mb->model.nstars_in = (int)h[5];
    if (!mb->built) return SP_OK;
    sp_moffat_field *m = &mb->model;
    for (int k = 0; k < 4; k++) {
        m->deg[k] = (int)h[1 + k];
        if (m->deg[k] < 0 || m->deg[k] > 4) return SP_FAIL(SP_ERR_STATE, "/epsf/moffat_field: degree %d", m->deg[k]);
        m->nt[k] = (m->deg[k] + 1) * (m->deg[k] + 2) / 2;
        for (int t = 0; t < SP_MOFFAT_FIELD_MAXT; t++) m->c[k][t] = h[16 + SP_MOFFAT_FIELD_MAXT * k + t];
    }
    m->nstars_used = (int)h[6];
    m->x_ref = h[7];
    m->y_ref = h[8];
    m->scale = h[9];
    m->chi2dof = h[10];
    m->xmin = h[12];
    m->xmax = h[13];
    m->ymin = h[14];
    m->ymax = h[15];
    return SP_OK;
}

static int cmp_rec(const void *a, const void *b)
{
    const double *x = *(const double *const *)a, *y = *(const double *const *)b;
    if (x[0] != y[0]) return (x[0] > y[0]) - (x[0] < y[0]);
    return (x[1] > y[1]) - (x[1] < y[1]);
}

/* Fit band b from the gathered records buf[nbytes] (owner only). */
static int fit_band(run_t *r, int b, const char *buf, size_t nbytes, struct mf_band *mb)
{
    int status = SP_OK;
    const sp_plan *p = r->plan;
    const double **recs = NULL;
    sp_epsf_cutout *cuts = NULL;
    double *fws = NULL;
    int n = 0;
    for (size_t o = 0; o + sizeof(double) * MF_HDR <= nbytes; n++) {
        double hd[MF_HDR];
        memcpy(hd, buf + o, sizeof hd);
        o += rec_size((int)hd[2]);
    }
    SP_ALLOC(recs, n + 1);
    SP_ALLOC(cuts, n + 1);
    {
        size_t o = 0;
        for (int i = 0; i < n; i++) {
            recs[i] = (const double *)(const void *)(buf + o); /* records are multiples of 8 bytes */
            o += rec_size((int)recs[i][2]);
        }
    }
    qsort(recs, (size_t)n, sizeof *recs, cmp_rec);
    for (int i = 0; i < n; i++) {
        const double *hd = recs[i];
        sp_epsf_cutout *c = &cuts[i];
        psf_cutout_unpack(hd + 3, (int)hd[2], (const char *)(const void *)hd + sizeof(double) * MF_HDR, c);
    }
    /* start: the median FWHM of the band's cells as built, from their stamps (the
     * same on every rank: a cell built here carries its fit's FWHM, one received in
     * the share the stamp's) */
    SP_ALLOC(fws, p->ncells + 1);
    int nf = 0;
    for (long k = 0; k < p->ncells; k++) {
        const sp_psf *g = r->grid[(long)b * p->ncells + k];
        double cx, cy, fw = NAN;
        if (g) sp_psf_moments(g, &cx, &cy, &fw);
        if (fw > 0 && isfinite(fw)) fws[nf++] = fw;
    }
    sp_moffat_field_params mp;
    sp_moffat_field_params_default(&mp);
    mp.degree = r->sp.poly_degree;
    mp.x_ref = 0.5 * (p->nx - 1);
    mp.y_ref = 0.5 * (p->ny - 1);
    mp.scale = 0.5 * (p->nx > p->ny ? p->nx : p->ny);
    mp.fwhm0 = nf > 0 ? sp_score_median(fws, nf) : r->sp.epsf.fallback_fwhm;
    mp.beta0 = r->sp.epsf.fallback_beta > 1.2 && r->sp.epsf.fallback_beta < 10 ? r->sp.epsf.fallback_beta : 3.0;
    mb->reason[0] = 0;
    int st = sp_moffat_field_fit(cuts, n, &mp, &mb->model);
    mb->built = st == SP_OK;
    if (st == SP_ERR_NOMEM) {
        status = st;
        goto cleanup;
    }
    if (st != SP_OK) {
        snprintf(mb->reason, sizeof mb->reason, "%s", sp_err_msg());
        sp_err_clear();
        memset(&mb->model, 0, sizeof mb->model);
        mb->model.nstars_in = n;
    }
cleanup:
    free(recs);
    free(cuts);
    free(fws);
    return status;
}

int psf_field_build(run_t *r)
{
    int status = SP_OK, lst = SP_OK;
    const sp_plan *p = r->plan;
    const int nb = p->nbands;
    int *counts = NULL, *displs = NULL;
    char **mine = NULL;
    size_t *nmine = NULL;
    thread_err te = {0};
    if (!r->mf || r->mf->decided) return SP_OK;
    SP_ALLOC(counts, r->nranks);
    SP_ALLOC(displs, r->nranks);
    SP_ALLOC(mine, nb);
    SP_ALLOC(nmine, nb);
    /* 1. each band's records on its owner (a local failure sends nothing and is
     * agreed on after the gathers: no rank may leave a collective the others are in) */
    for (int b = 0; b < nb; b++) {
        struct mf_band *mb = &r->mf->band[b];
        const int owner = b % r->nranks;
        if (lst == SP_OK && !((double)mb->nbytes < 2147483647.0))
            lst = SP_FAIL(SP_ERR_RESOURCE, "band %s: %d PSF-star cutouts are too many for one message", p->bands[b],
                          mb->n);
        long total = 0;
        psf_gather_bytes(r, owner, p->bands[b], mb->rec, lst == SP_OK ? (int)mb->nbytes : 0, counts, displs, &mine[b],
                         &total, &lst);
        nmine[b] = (size_t)total;
        free(mb->rec);
        mb->rec = NULL;
        mb->nbytes = mb->cap = 0;
        mb->n = 0;
    }
    SP_TRY(sp_mpi_agree(lst, r->comm));
    /* 2. the owner fits its bands (OpenMP over them) and stores the rows */
    {
        int own[256], nown = 0;
        for (int b = 0; b < nb; b++)
            if (b % r->nranks == r->rank && nown < 256) own[nown++] = b;
#pragma omp parallel for schedule(dynamic, 1) num_threads(r->sp.band_threads)
        for (int q = 0; q < nown; q++) {
            int b = own[q];
            int st = fit_band(r, b, mine[b], nmine[b], &r->mf->band[b]);
            if (st != SP_OK) {
                char what[96];
                snprintf(what, sizeof what, "band-wide Moffat of band %s", p->bands[b]);
                thread_err_record(&te, st, what);
            }
        }
        lst = thread_err_raise(&te);
        for (int q = 0; q < nown && lst == SP_OK; q++) {
            double h[SP_MFIELD_INFO];
            info_pack(&r->mf->band[own[q]], h);
            long st2[2] = {own[q], 0}, n2[2] = {1, SP_MFIELD_INFO};
            lst = sp_h5_array_write(r->store->h, "/epsf/moffat_field", SP_H5_F64, st2, n2, h);
        }
    }
    SP_TRY(sp_mpi_agree(lst, r->comm));
    /* 3. every rank gets every model */
    for (int b = 0; b < nb; b++) {
        struct mf_band *mb = &r->mf->band[b];
        const int owner = b % r->nranks;
        double h[SP_MFIELD_INFO];
        if (r->rank == owner) info_pack(mb, h);
        MPI_Bcast(h, SP_MFIELD_INFO, MPI_DOUBLE, owner, r->comm);
        MPI_Bcast(mb->reason, sizeof mb->reason, MPI_CHAR, owner, r->comm);
        mb->reason[sizeof mb->reason - 1] = 0;
        if (r->rank != owner) SP_TRY(info_unpack(h, mb));
        if (r->rank == 0) {
            if (mb->built) {
                double fmin = INFINITY, fmax = 0;
                for (int j = 0; j <= 8; j++)
                    for (int i = 0; i <= 8; i++) {
                        double fw, be, q, th;
                        sp_moffat_field_at(&mb->model, (p->nx - 1) * i / 8.0, (p->ny - 1) * j / 8.0, &fw, &be, &q, &th);
                        fmin = fw < fmin ? fw : fmin;
                        fmax = fw > fmax ? fw : fmax;
                    }
                SP_INFO("ePSF band %s: band-wide Moffat, degree %d, %d of %d PSF stars, FWHM %.2f px at the tile "
                        "centre (%.2f-%.2f over the tile), chi2/dof %.2f",
                        p->bands[b], mb->model.deg[0], mb->model.nstars_used, mb->model.nstars_in, h[11], fmin, fmax,
                        mb->model.chi2dof);
            } else
                SP_WARN("ePSF band %s: the band-wide Moffat was not fitted (%s; %d PSF-star cutouts); its Moffat cells "
                        "keep their own",
                        p->bands[b], mb->reason[0] ? mb->reason : "no star", mb->model.nstars_in);
        }
    }
    r->mf->decided = 1;
cleanup:
    free(counts);
    free(displs);
    if (mine)
        for (int b = 0; b < nb; b++) free(mine[b]);
    free(mine);
    free(nmine);
    return sp_mpi_agree(status, r->comm);
}

int psf_field_load(run_t *r, uint8_t *need)
{
    int status = SP_OK;
    const sp_plan *p = r->plan;
    double *info = NULL;
    if (!r->mf || !r->store->resumed) return SP_OK;
    SP_ALLOC(info, (size_t)p->nbands * SP_MFIELD_INFO);
    status = sp_h5_array_read(r->store->h, "/epsf/moffat_field", SP_H5_F64, NULL, NULL, info);
    int decided = status == SP_OK;
    if (status != SP_OK) {
        /* a store made without the option cannot be resumed with it (science hash);
         * a missing row here is a store from before the option existed */
        sp_err_clear();
        status = SP_OK;
    }
    for (int b = 0; b < p->nbands && decided; b++) decided = isfinite(info[(size_t)b * SP_MFIELD_INFO]);
    for (int b = 0; b < p->nbands && decided && status == SP_OK; b++)
        status = info_unpack(info + (size_t)b * SP_MFIELD_INFO, &r->mf->band[b]);
    if (status == SP_OK && decided) r->mf->decided = 1;
    if (status == SP_OK && !decided)
        for (long k = 0; k < p->ncells; k++) need[k] = (uint8_t)(p->cells[k].active != 0);
cleanup:
    free(info);
    return status;
}

static int is_moffat(int kind) { return kind == SP_EPSF_MOFFAT_FIT || kind == SP_EPSF_MOFFAT_DEFAULT; }

int psf_field_on(const run_t *r, int b) { return r->mf && r->mf->decided && r->mf->band[b].built; }

int psf_field_apply(run_t *r)
{
    int status = SP_OK;
    const sp_plan *p = r->plan;
    long nc = p->ncells;
    int size = r->cfg->epsf.final_psf_size;
    float *buf = NULL;
    if (!r->mf) return SP_OK;
    SP_ALLOC(buf, (size_t)size * size);
    for (int b = 0; b < p->nbands; b++) {
        if (!psf_field_on(r, b)) continue;
        for (long k = 0; k < nc; k++) {
            sp_psf *g = r->grid[(long)b * nc + k];
            if (!g || !is_moffat(r->grid_kind[(long)b * nc + k])) continue;
            const sp_cell *ce = &p->cells[k];
            int nst = g->nstars;
            SP_TRY(sp_moffat_field_render(&r->mf->band[b].model, 0.5 * (ce->bx0 + ce->bx1 - 1),
                                          0.5 * (ce->by0 + ce->by1 - 1), g));
            g->nstars = nst;
            g->is_fallback = 1;
            if (b % r->nranks != r->rank) continue;
            /* the band's owner writes what the fit uses at the cell centre */
            psf_sample_pixels(g, size, buf);
            long st4[4] = {ce->iy, ce->ix, 0, 0}, n4[4] = {1, 1, size, size};
            char path[160];
            snprintf(path, sizeof path, "/epsf/%s", p->bands[b]);
            SP_TRY(sp_h5_array_write(r->store->h, path, SP_H5_F32, st4, n4, buf));
        }
    }
cleanup:
    free(buf);
    return status;
}

int psf_field_at(const run_t *r, int b, int cell, double x, double y, sp_psf *out)
{
    int status = SP_OK;
    const sp_plan *p = r->plan;
    const long nc = p->ncells;
    sp_psf *const *g = r->grid + (long)b * nc;
    const int32_t *kind = r->grid_kind + (long)b * nc;
    const sp_moffat_field *m = &r->mf->band[b].model;
    if (!r->sp.blend_psf) {
        if (is_moffat(kind[cell])) return sp_moffat_field_render(m, x, y, out);
        memcpy(out->data, g[cell]->data, sizeof *out->data * (size_t)out->size * out->size);
        out->fwhm = g[cell]->fwhm;
        return SP_OK;
    }
    int ng = p->opts.epsf_ngrid, idx[4], n = 0;
    double w[4], wm = 0;
    sp_epsf_grid eg = {ng, ng, r->xedge, r->yedge, (const sp_psf *const *)g};
    SP_TRY(sp_epsf_grid_weights(&eg, x, y, idx, w, &n));
    for (int i = 0; i < n; i++)
        if (is_moffat(kind[idx[i]])) wm += w[i];
    if (wm <= 0) return sp_epsf_grid_at(&eg, x, y, out);
    SP_TRY(sp_moffat_field_render(m, x, y, out));
    if (wm < 1.0 - 1e-12) {
        const size_t ss = (size_t)out->size * out->size;
        for (size_t q = 0; q < ss; q++) out->data[q] *= (float)wm;
        for (int i = 0; i < n; i++) {
            if (is_moffat(kind[idx[i]])) continue;
            const sp_psf *gi = g[idx[i]];
            SP_CHECK(gi->size == out->size && gi->oversamp == out->oversamp, SP_ERR_INTERNAL,
                     "band-wide Moffat: cell %d's ePSF geometry differs", idx[i]);
            for (size_t q = 0; q < ss; q++) out->data[q] += (float)(w[i] * gi->data[q]);
        }
        SP_TRY(sp_psf_normalize(out));
        double cx, cy;
        sp_psf_moments(out, &cx, &cy, &out->fwhm);
    }
cleanup:
    return status;
}

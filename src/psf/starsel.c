/* starsel.c — PSF-star selection per band per cell (sp_epsf.h). */
#include "surveyproc/sp_background.h"
#include "surveyproc/sp_epsf.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_prep.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

void sp_starsel_params_default(sp_starsel_params *p)
{
    p->mode = SP_PSFSTAR_DETECT;
    p->stamp_size = 41;
    p->edge_pad = 10.0;
    p->q_min = 0.8;
    p->q_max = 1.0;
    p->min_sep = 30.0;
    p->min_sep_flux_ratio = 0.0;
    p->min_sep_always = 0.0;
    p->others = NULL;
    p->nothers = 0;
    p->snr_min = 20.0;
    p->size_tol = 0.0;
    p->peak_max = 0.0;
    p->max_stars = 30;
    p->fwhm = 4.0;
    p->core_radius = 0.0;
    p->bkg_rin = 0.0; /* <= 0: stamp_size/2 + 2 */
    p->bkg_rout = 0.0; /* <= 0: rin + 8 */
    p->match_radius = 3.0;
    p->sat_bits = SP_PIX_SAT;
}

typedef struct {
    double x, y, flux;  /* input position, flux for the isolation ratio */
    int origin, index;
    int det_match;      /* detection index matched to a reference, -1 */
} cand_t;


static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static int cmp_star_flux(const void *a, const void *b)
{
    double fa = ((const sp_psfstar *)a)->flux, fb = ((const sp_psfstar *)b)->flux;
    return (fa < fb) - (fa > fb);
}

/* Clipped annulus background around (x, y). buf: scratch. Returns kept count. */
static size_t annulus_bkg(const float *img, const uint8_t *mask, int nx, int ny, double x, double y, double rin,
                          double rout, float *buf, double *bkg, double *sig)
{
    int i0 = (int)floor(x - rout), i1 = (int)ceil(x + rout), j0 = (int)floor(y - rout), j1 = (int)ceil(y + rout);
    size_t n = 0;
    for (int j = j0; j <= j1; j++) {
        if (j < 0 || j >= ny) continue;
        for (int i = i0; i <= i1; i++) {
            if (i < 0 || i >= nx) continue;
            double r2 = (i - x) * (i - x) + (j - y) * (j - y);
            if (r2 < rin * rin || r2 > rout * rout) continue;
            size_t k = (size_t)j * nx + i;
            if (!(fabsf(img[k]) <= FLT_MAX) || (mask && mask[k])) continue;
            buf[n++] = img[k];
        }
    }
    *bkg = 0.0;
    *sig = 0.0;
    if (n < 10) return 0;
    size_t kept = 0;
    sp_bkg_clipped_stats(buf, n, 3.0, 5, bkg, NULL, sig, &kept);
    return kept;
}

int sp_starsel_select(const float *img, const float *rms, const uint8_t *mask, int nx, int ny,
                      const sp_source *det, int ndet, const double *ref_xy, int nref, const sp_starsel_params *pin,
                      sp_psfstar **stars_out, int *nstars_out, sp_starsel_stats *stats)
{
    int status = SP_OK;
    sp_starsel_params p;
    cand_t *cand = NULL;
    sp_psfstar *stars = NULL;
    float *buf = NULL, *samp = NULL;
    int *used_det = NULL, *cell_head = NULL, *cell_next = NULL;
    double *allx = NULL, *ally = NULL, *allf = NULL, *size = NULL, *srt = NULL;
    int *allid = NULL;
    sp_starsel_stats st;
    memset(&st, 0, sizeof st);
    int ncand = 0, nstars = 0;

    SP_CHECK(stars_out && nstars_out && img, SP_ERR_INTERNAL, "sp_starsel_select: NULL argument");
    *stars_out = NULL;
    *nstars_out = 0;
    if (pin)
        p = *pin;
    else
        sp_starsel_params_default(&p);
    SP_CHECK(nx >= 1 && ny >= 1, SP_ERR_INPUT, "star selection: image size %d x %d is empty", nx, ny);
    SP_CHECK(p.stamp_size >= 3 && p.stamp_size % 2 == 1, SP_ERR_INPUT,
             "star selection: stamp_size %d must be odd and >= 3", p.stamp_size);
    SP_CHECK(p.fwhm > 0, SP_ERR_INPUT, "star selection: fwhm %g must be > 0", p.fwhm);
    SP_CHECK(p.q_min <= p.q_max, SP_ERR_INPUT, "star selection: q_range [%g, %g] is empty", p.q_min, p.q_max);
    SP_CHECK(p.max_stars >= 1, SP_ERR_INPUT, "star selection: max_stars %d must be >= 1", p.max_stars);
    SP_CHECK(ndet >= 0 && nref >= 0 && (ndet == 0 || det) && (nref == 0 || ref_xy), SP_ERR_INPUT,
             "star selection: bad candidate lists");
    SP_CHECK(p.nothers >= 0 && (p.nothers == 0 || p.others), SP_ERR_INPUT, "star selection: bad list of other sources");
    double rclose = p.min_sep_always > 0 ? p.min_sep_always : 1.5 * p.fwhm;
    double half = 0.5 * (p.stamp_size - 1);
    double rin = p.bkg_rin > 0 ? p.bkg_rin : half + 2.0;
    double rout = p.bkg_rout > rin ? p.bkg_rout : rin + 8.0;
    double rcore = p.core_radius > 0 ? p.core_radius : 1.5 * p.fwhm;

    /* global noise when no rms map is given */
    double noise = 0.0;
    if (!rms) {
        size_t npix = (size_t)nx * ny, stride = npix / 100000 + 1, ns = 0;
        SP_ALLOC(samp, npix / stride + 1);
        for (size_t k = 0; k < npix; k += stride)
            if (fabsf(img[k]) <= FLT_MAX && !(mask && mask[k])) samp[ns++] = img[k];
        if (ns > 0) sp_bkg_clipped_stats(samp, ns, 3.0, 5, NULL, NULL, &noise, NULL);
    }

    /* every source position, for isolation */
    int nall = ndet + nref + p.nothers;
    SP_ALLOC(allx, nall + 1);
    SP_ALLOC(ally, nall + 1);
    SP_ALLOC(allf, nall + 1);
    SP_ALLOC(allid, nall + 1);
    for (int k = 0; k < ndet; k++) {
        allx[k] = det[k].x;
        ally[k] = det[k].y;
        allf[k] = det[k].flux;
        allid[k] = k;
    }
    for (int k = 0; k < nref; k++) {
        allx[ndet + k] = ref_xy[2 * k];
        ally[ndet + k] = ref_xy[2 * k + 1];
        allf[ndet + k] = -1.0; /* unknown: measured below when it is a candidate, else always counts */
        allid[ndet + k] = ndet + k;
    }
    for (int k = 0; k < p.nothers; k++) {
        int q = ndet + nref + k;
        allx[q] = p.others[3 * k];
        ally[q] = p.others[3 * k + 1];
        allf[q] = p.others[3 * k + 2] > 0 ? p.others[3 * k + 2] : -1.0; /* NaN, <= 0: always counts */
        allid[q] = q;
    }

    /* candidates */
    SP_ALLOC(cand, nall + 1);
    SP_ALLOC(used_det, ndet + 1);
    for (int k = 0; k < ndet; k++) used_det[k] = -1;
    if ((p.mode == SP_PSFSTAR_REFERENCE || p.mode == SP_PSFSTAR_BOTH) && nref > 0) {
        for (int r = 0; r < nref; r++) {
            cand_t *c = &cand[ncand++];
            c->x = ref_xy[2 * r];
            c->y = ref_xy[2 * r + 1];
            c->origin = SP_PSFSTAR_REFERENCE;
            c->index = r;
            c->det_match = -1;
            c->flux = 0;
            if (p.mode == SP_PSFSTAR_BOTH) {
                int best = -1;
                double bd = p.match_radius;
                for (int k = 0; k < ndet; k++) {
                    if (used_det[k] >= 0) continue;
                    double d = hypot(det[k].x - c->x, det[k].y - c->y);
                    if (d <= bd) {
                        bd = d;
                        best = k;
                    }
                }
                if (best >= 0) {
                    used_det[best] = r;
                    c->x = det[best].x;
                    c->y = det[best].y;
                    c->origin = SP_PSFSTAR_BOTH;
                    c->det_match = best;
                    c->flux = det[best].flux;
                }
            }
        }
    }
    if (p.mode == SP_PSFSTAR_DETECT || p.mode == SP_PSFSTAR_BOTH) {
        for (int k = 0; k < ndet; k++) {
            if (used_det[k] >= 0) continue;
            cand_t *c = &cand[ncand++];
            c->x = det[k].x;
            c->y = det[k].y;
            c->origin = SP_PSFSTAR_DETECT;
            c->index = k;
            c->det_match = k;
            c->flux = det[k].flux;
        }
    }
    st.ncand = ncand;

    /* spatial hash of all positions for the isolation test */
    double cs = p.min_sep > 1 ? p.min_sep : 1.0;
    int gx = (int)(nx / cs) + 1, gy = (int)(ny / cs) + 1;
    if ((double)gx * gy > 4.0 * (nall + 16)) { /* sparse lists on huge images: coarser cells */
        double f = sqrt((double)gx * gy / (4.0 * (nall + 16)));
        cs *= f;
        gx = (int)(nx / cs) + 1;
        gy = (int)(ny / cs) + 1;
    }
    SP_ALLOC(cell_head, (size_t)gx * gy);
    SP_ALLOC(cell_next, nall + 1);
    for (int k = 0; k < gx * gy; k++) cell_head[k] = -1;
    for (int k = 0; k < nall; k++) {
        int cx = (int)floor(allx[k] / cs), cy = (int)floor(ally[k] / cs);
        if (cx < 0) cx = 0;
        if (cy < 0) cy = 0;
        if (cx >= gx) cx = gx - 1;
        if (cy >= gy) cy = gy - 1;
        cell_next[k] = cell_head[cy * gx + cx];
        cell_head[cy * gx + cx] = k;
    }

    /* measure and cut */
    int nbuf = (int)(M_PI * (rout + 2) * (rout + 2)) + 64;
    SP_ALLOC(buf, nbuf);
    SP_ALLOC(stars, ncand + 1);
    SP_ALLOC(size, ncand + 1);
    SP_ALLOC(srt, ncand + 1);
    double need = half + p.edge_pad;
    for (int ci = 0; ci < ncand; ci++) {
        cand_t *c = &cand[ci];
        if (!(c->x >= need && c->y >= need && c->x <= nx - 1 - need && c->y <= ny - 1 - need)) {
            st.n_edge++;
            continue;
        }
        sp_source m;
        if (sp_detect_measure(img, rms, noise, mask, nx, ny, c->x, c->y, p.fwhm, p.sat_bits, &m) != SP_OK) {
            sp_err_clear();
            st.n_edge++;
            continue;
        }
        /* unusable or saturated pixels in the core */
        int bad = 0;
        int r = (int)ceil(rcore);
        for (int j = (int)lround(m.y) - r; j <= (int)lround(m.y) + r && !bad; j++)
            for (int i = (int)lround(m.x) - r; i <= (int)lround(m.x) + r; i++) {
                if (i < 0 || j < 0 || i >= nx || j >= ny) {
                    bad = 1;
                    break;
                }
                if ((i - m.x) * (i - m.x) + (j - m.y) * (j - m.y) > rcore * rcore) continue;
                size_t k = (size_t)j * nx + i;
                if (!(fabsf(img[k]) <= FLT_MAX) || (mask && mask[k])) {
                    bad = 1;
                    break;
                }
            }
        if (bad || (m.flags & (SP_DET_SAT | SP_DET_WINFAIL))) {
            st.n_flagged++;
            continue;
        }
        if (!(m.snr >= p.snr_min)) {
            st.n_snr++;
            continue;
        }
        if (!(m.q >= p.q_min && m.q <= p.q_max) || (m.flags & SP_DET_MOMFAIL)) {
            st.n_round++;
            continue;
        }
        if (p.peak_max > 0 && m.peak > p.peak_max) {
            st.n_peak++;
            continue;
        }
        /* isolation: any other listed source within min_sep (brighter than the
         * flux-ratio floor, when one is set) */
        int crowded = 0;
        double fref = c->flux > 0 && isfinite(c->flux) ? c->flux : m.flux;
        if (p.min_sep > 0) {
            int cx0 = (int)floor((m.x - p.min_sep) / cs), cx1 = (int)floor((m.x + p.min_sep) / cs);
            int cy0 = (int)floor((m.y - p.min_sep) / cs), cy1 = (int)floor((m.y + p.min_sep) / cs);
            for (int yy = cy0 < 0 ? 0 : cy0; yy <= (cy1 >= gy ? gy - 1 : cy1) && !crowded; yy++)
                for (int xx = cx0 < 0 ? 0 : cx0; xx <= (cx1 >= gx ? gx - 1 : cx1) && !crowded; xx++)
                    for (int k = cell_head[yy * gx + xx]; k >= 0; k = cell_next[k]) {
                        int self = (k < ndet)          ? (k == c->det_match)
                                   : (k < ndet + nref) ? (c->origin != SP_PSFSTAR_DETECT && k - ndet == c->index)
                                                       : 0;
                        if (self) continue;
                        double d = hypot(allx[k] - m.x, ally[k] - m.y);
                        if (d >= p.min_sep) continue;
                        if (p.min_sep_flux_ratio > 0 && allf[k] >= 0 && d >= rclose &&
                            allf[k] < p.min_sep_flux_ratio * fref)
                            continue;
                        crowded = 1;
                        break;
                    }
        }
        if (crowded) {
            st.n_crowded++;
            continue;
        }
        sp_psfstar *s = &stars[nstars];
        size[nstars] = sqrt(m.a * m.a + m.b * m.b);
        s->x = m.x;
        s->y = m.y;
        s->flux = m.flux;
        s->snr = m.snr;
        s->q = m.q;
        s->origin = c->origin;
        s->index = c->origin == SP_PSFSTAR_DETECT ? c->index : (c->origin == SP_PSFSTAR_BOTH ? c->det_match : c->index);
        if (c->origin == SP_PSFSTAR_BOTH) s->index = c->det_match;
        double bk = 0, bs = 0;
        annulus_bkg(img, mask, nx, ny, m.x, m.y, rin, rout, buf, &bk, &bs);
        s->bkg = bk;
        s->bkg_rms = bs > 0 ? bs : (rms ? rms[(size_t)lround(m.y) * nx + lround(m.x)] : noise);
        nstars++;
    }
    /* the stellar locus: stars share one size, extended sources scatter above it */
    if (p.size_tol > 0 && nstars >= 5) {
        int nd = 0;
        for (int i = 0; i < nstars; i++) srt[nd++] = size[i];
        qsort(srt, (size_t)nd, sizeof *srt, cmp_double);
        int k = nd / 3 > 3 ? nd / 3 : 3, best = 0;
        for (int i = 1; i + k - 1 < nd; i++)
            if (srt[i + k - 1] - srt[i] < srt[best + k - 1] - srt[best]) best = i;
        double locus = srt[best + k / 2];
        st.locus = locus;
        int w = 0;
        for (int i = 0; i < nstars; i++) {
            if (stars[i].origin == SP_PSFSTAR_DETECT && locus > 0 && fabs(size[i] / locus - 1.0) > p.size_tol) {
                st.n_size++;
                continue;
            }
            stars[w] = stars[i];
            size[w] = size[i];
            w++;
        }
        nstars = w;
    }
    /* brightest first, references ahead of detections at equal priority */
    qsort(stars, (size_t)nstars, sizeof(sp_psfstar), cmp_star_flux);
    if (p.mode == SP_PSFSTAR_BOTH) {
        /* stable partition: reference-backed stars first */
        sp_psfstar *tmpv = malloc(sizeof(sp_psfstar) * (size_t)(nstars + 1));
        SP_CHECK(tmpv, SP_ERR_NOMEM, "out of memory (star selection)");
        int w = 0;
        for (int k = 0; k < nstars; k++)
            if (stars[k].origin != SP_PSFSTAR_DETECT) tmpv[w++] = stars[k];
        for (int k = 0; k < nstars; k++)
            if (stars[k].origin == SP_PSFSTAR_DETECT) tmpv[w++] = stars[k];
        memcpy(stars, tmpv, sizeof(sp_psfstar) * (size_t)nstars);
        free(tmpv);
    }
    if (nstars > p.max_stars) nstars = p.max_stars;
    st.n_selected = nstars;
    if (nstars > 0) {
        *stars_out = stars;
        stars = NULL;
    }
    *nstars_out = nstars;
cleanup:
    if (stats) *stats = st;
    free(cand);
    free(stars);
    free(buf);
    free(samp);
    free(used_det);
    free(cell_head);
    free(cell_next);
    free(allx);
    free(ally);
    free(allf);
    free(allid);
    free(size);
    free(srt);
    return status;
}

/* psf_given.c — epsf.given_psf: the fit uses a PSF grid given per band (a FITS
 * mosaic of stamps at regular nodes, the truth_psf/ format of `surveyproc
 * simulate`, docs/psf.md) instead of the ePSFs built from the data. Every rank
 * reads the files once in cell_stages_setup; psf_grid_at blends the four nodes
 * around a patch centre bilinearly (clamped beyond the outer nodes). The ePSF
 * stage still runs and stores its grid, for comparison. */
#include "cell.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_fits.h"
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

struct given_psf {
    int ng;         /* nodes per side */
    sp_psf **psfs;  /* ng * ng, [j * ng + i], unit flux */
    double *xedge, *yedge; /* ng + 1: node cells' edges (node = cell centre) */
};

/* `tmpl` with every "{band}" replaced by `band` (malloc'd). */
static char *band_path(const char *tmpl, const char *band)
{
    size_t nb = strlen(band), n = 1;
    for (const char *p = tmpl; *p;) {
        if (!strncmp(p, "{band}", 6)) {
            n += nb;
            p += 6;
        } else {
            n++;
            p++;
        }
    }
    char *out = malloc(n), *o = out;
    if (!out) return NULL;
    for (const char *p = tmpl; *p;) {
        if (!strncmp(p, "{band}", 6)) {
            memcpy(o, band, nb);
            o += nb;
            p += 6;
        } else
            *o++ = *p++;
    }
    *o = 0;
    return out;
}

static uint64_t fnv1a(uint64_t h, const void *data, size_t n)
{
    const unsigned char *p = data;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

static int load_band(const run_t *r, const char *path, const char *band, struct given_psf *g, uint64_t *hash)
{
    int status = SP_OK;
    sp_fits *f = NULL;
    float *mosaic = NULL;
    long ng = 0, S = 0, os = 1, tnx = 0, tny = 0, nx = 0, ny = 0;
    int found = 0;
    char filt[72] = "";
    struct stat st;
    SP_CHECK(stat(path, &st) == 0, SP_ERR_IO,
             "%s: cannot open the PSF grid of band %s: %s (epsf.given_psf names one FITS file per band, "
             "'{band}' standing for the band name)",
             path, band, strerror(errno));
    SP_TRY(sp_fits_open(path, &f));
    SP_TRY(sp_fits_key_long(f, "PSFNGRID", 1, &ng, NULL));
    SP_TRY(sp_fits_key_long(f, "PSFSIZE", 1, &S, NULL));
    SP_TRY(sp_fits_key_long(f, "PSFOVERS", 0, &os, &found));
    if (!found) os = 1;
    SP_TRY(sp_fits_key_long(f, "TILENX", 1, &tnx, NULL));
    SP_TRY(sp_fits_key_long(f, "TILENY", 1, &tny, NULL));
    SP_TRY(sp_fits_key_string(f, "FILTER", 0, filt, sizeof filt, &found));
    SP_CHECK(!found || !strcmp(filt, band), SP_ERR_INPUT,
             "%s: FILTER = '%s' but epsf.given_psf gave this file for band %s; check the {band} pattern", path,
             filt, band);
    SP_CHECK(ng >= 1 && ng <= 256, SP_ERR_INPUT, "%s: PSFNGRID = %ld, expected 1..256 stamps per side", path, ng);
    SP_CHECK(os >= 1 && os <= 8, SP_ERR_INPUT, "%s: PSFOVERS = %ld, expected 1..8 samples per pixel", path, os);
    SP_CHECK(S >= 3 && S % 2 == 1 && S <= 4001, SP_ERR_INPUT,
             "%s: PSFSIZE = %ld, expected an odd stamp side of 3..4001 samples (PSF on the middle one)", path, S);
    SP_CHECK(tnx == r->plan->nx && tny == r->plan->ny, SP_ERR_INPUT,
             "%s: TILENX x TILENY = %ld x %ld, but the frames are %ld x %ld; the nodes are placed on the "
             "tile's pixel grid, so the PSF grid must be made for this tile",
             path, tnx, tny, r->plan->nx, r->plan->ny);
    sp_fits_shape(f, &nx, &ny);
    SP_CHECK(nx == ng * S && ny == ng * S, SP_ERR_INPUT,
             "%s: image is %ld x %ld, expected PSFNGRID x PSFSIZE = %ld x %ld (a mosaic of the stamps)", path, nx,
             ny, ng * S, ng * S);
    SP_ALLOC(mosaic, (size_t)(nx * ny));
    SP_TRY(sp_fits_read_subset(f, 0, 0, nx, ny, mosaic));
    *hash = fnv1a(*hash, mosaic, sizeof *mosaic * (size_t)(nx * ny));
    g->ng = (int)ng;
    SP_ALLOC(g->psfs, ng * ng);
    SP_ALLOC(g->xedge, ng + 1);
    SP_ALLOC(g->yedge, ng + 1);
    for (long i = 0; i <= ng; i++) {
        g->xedge[i] = (double)i * tnx / ng - 0.5;
        g->yedge[i] = (double)i * tny / ng - 0.5;
    }
    for (long j = 0; j < ng; j++)
        for (long i = 0; i < ng; i++) {
            sp_psf *q = NULL;
            SP_TRY(sp_psf_alloc((int)S, (int)os, &q));
            g->psfs[j * ng + i] = q;
            for (long v = 0; v < S; v++)
                for (long u = 0; u < S; u++) {
                    float val = mosaic[(size_t)(j * S + v) * (size_t)nx + (size_t)(i * S + u)];
                    SP_CHECK(isfinite(val), SP_ERR_INPUT,
                             "%s: stamp (%ld, %ld) has a blank or non-finite sample at (%ld, %ld); a PSF grid "
                             "needs every sample",
                             path, i, j, u, v);
                    q->data[v * S + u] = val;
                }
            status = sp_psf_normalize(q);
            SP_CHECK(status == SP_OK, SP_ERR_INPUT, "%s: stamp (%ld, %ld) does not sum to a positive flux", path,
                     i, j);
            double cx, cy, fw;
            sp_psf_moments(q, &cx, &cy, &fw);
            q->fwhm = fw;
            SP_CHECK(fabs(cx) < 0.5 && fabs(cy) < 0.5, SP_ERR_INPUT,
                     "%s: stamp (%ld, %ld) is centred at (%+.2f, %+.2f) pixels from its middle sample; the "
                     "PSF must be centred on it",
                     path, i, j, cx, cy);
        }
cleanup:
    free(mosaic);
    sp_fits_close(&f);
    return status;
}

int psf_given_load(run_t *r)
{
    int status = SP_OK;
    const char *tmpl = r->cfg->epsf.given_psf;
    char *path = NULL;
    if (!tmpl || !tmpl[0]) return SP_OK;
    int nb = r->plan->nbands;
    SP_ALLOC(r->given, nb);
    uint64_t h = 0xcbf29ce484222325ULL;
    for (int b = 0; b < nb; b++) {
        path = band_path(tmpl, r->plan->bands[b]);
        SP_CHECK(path, SP_ERR_NOMEM, "out of memory");
        h = fnv1a(h, path, strlen(path) + 1);
        status = load_band(r, path, r->plan->bands[b], &r->given[b], &h);
        if (status != SP_OK) {
            sp_err_context("epsf.given_psf = '%s', band %s", tmpl, r->plan->bands[b]);
            goto cleanup;
        }
        if (r->rank == 0)
            SP_INFO("epsf.given_psf: band %s uses %s (%d x %d stamps of %d samples, %d per pixel, FWHM %.2f px at "
                    "the first node); the ePSFs built from the data are stored but not used by the fit",
                    r->plan->bands[b], path, r->given[b].ng, r->given[b].ng, r->given[b].psfs[0]->size,
                    r->given[b].psfs[0]->oversamp, r->given[b].psfs[0]->fwhm);
        free(path);
        path = NULL;
    }
    r->given_hash = h;
cleanup:
    free(path);
    return status;
}

void psf_given_free(run_t *r)
{
    if (!r->given) return;
    for (int b = 0; b < r->plan->nbands; b++) {
        struct given_psf *g = &r->given[b];
        for (int k = 0; g->psfs && k < g->ng * g->ng; k++) sp_psf_free(&g->psfs[k]);
        free(g->psfs);
        free(g->xedge);
        free(g->yedge);
    }
    free(r->given);
    r->given = NULL;
}

int psf_given_at(const run_t *r, int b, double x, double y, sp_psf **scratch, const sp_psf **out)
{
    int status = SP_OK;
    const struct given_psf *g = &r->given[b];
    const sp_psf *m = g->psfs[0];
    if (!*scratch || (*scratch)->size != m->size || (*scratch)->oversamp != m->oversamp) {
        sp_psf_free(scratch);
        SP_TRY(sp_psf_alloc(m->size, m->oversamp, scratch));
    }
    sp_epsf_grid eg = {g->ng, g->ng, g->xedge, g->yedge, (const sp_psf *const *)g->psfs};
    SP_TRY(sp_epsf_grid_at(&eg, x, y, *scratch));
    (*scratch)->is_fallback = 0;
    (*scratch)->nstars = 0;
    *out = *scratch;
cleanup:
    return status;
}

/* plan.c — frame table, checks, catalog projection, cell/patch grid, cost and
 * memory estimates (see sp_plan.h). Collective over the given communicator. */
#include "surveyproc/sp_plan.h"
#include "surveyproc/sp_csv.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_fits.h"
#include "surveyproc/sp_log.h"
#include "surveyproc/sp_mpi.h"
#include "surveyproc/sp_prof.h"
#include "surveyproc/sp_zp.h"

#include <ctype.h>
#include <errno.h>
#include <libgen.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

/* ---- small helpers ---------------------------------------------------------- */

static uint64_t fnv1a(uint64_t h, const void *data, size_t n)
{
    const unsigned char *p = data;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

static char *trim(char *s)
{
    while (isspace((unsigned char)*s)) s++;
    size_t n = strlen(s);
    while (n && isspace((unsigned char)s[n - 1])) s[--n] = '\0';
    return s;
}

int sp_plan_parse_type(const char *s)
{
    if (!s) return -1;
    while (isspace((unsigned char)*s)) s++;
    if (!strncasecmp(s, "STAR", 4) || !strncasecmp(s, "PSF", 3) || !strncasecmp(s, "POINT", 5)) return SP_SRC_STAR;
    if (!strncasecmp(s, "EXP", 3)) return SP_SRC_EXP;
    if (!strncasecmp(s, "DEV", 3)) return SP_SRC_DEV;
    if (!strncasecmp(s, "SERSIC", 6) || !strncasecmp(s, "SER", 3)) return SP_SRC_SERSIC;
    return -1;
}

const char *sp_plan_type_name(int type)
{
    switch (type) {
    case SP_SRC_STAR: return "STAR";
    case SP_SRC_EXP: return "EXP";
    case SP_SRC_DEV: return "DEV";
    case SP_SRC_SERSIC: return "SERSIC";
    default: return "?";
    }
}

int sp_plan_read_image_list(const char *list, char ***paths_out, int *n_out)
{
    return sp_plan_read_image_list_lines(list, paths_out, NULL, n_out);
}

int sp_plan_read_image_list_lines(const char *list, char ***paths_out, long **lines_out, int *n_out)
{
    int status = SP_OK, n = 0, cap = 0;
    char **paths = NULL, line[4096], dir[SP_PATH_MAX];
    long *lines = NULL;
    FILE *f = fopen(list, "r");
    SP_CHECK(f, SP_ERR_IO, "%s: cannot open image list: %s (check inputs.image_list_file)", list, strerror(errno));
    snprintf(dir, sizeof dir, "%s", list);
    char *d = dirname(dir);
    long lineno = 0;
    while (fgets(line, sizeof line, f)) {
        lineno++;
        SP_CHECK(strchr(line, '\n') || feof(f), SP_ERR_INPUT, "%s:%ld: line longer than %zu characters", list,
                 lineno, sizeof line - 1);
        char *hash = strchr(line, '#');
        if (hash) *hash = '\0';
        char *p = trim(line);
        if (!*p) continue;
        if (n == cap) {
            cap = cap ? 2 * cap : 16;
            char **np = realloc(paths, (size_t)cap * sizeof *np);
            SP_CHECK(np, SP_ERR_NOMEM, "out of memory reading %s", list);
            paths = np;
            long *nl = realloc(lines, (size_t)cap * sizeof *nl);
            SP_CHECK(nl, SP_ERR_NOMEM, "out of memory reading %s", list);
            lines = nl;
        }
        char full[SP_PATH_MAX];
        int w = p[0] == '/' ? snprintf(full, sizeof full, "%s", p) : snprintf(full, sizeof full, "%s/%s", d, p);
        SP_CHECK(w > 0 && (size_t)w < sizeof full, SP_ERR_INPUT, "%s:%ld: path too long", list, lineno);
        paths[n] = strdup(full);
        SP_CHECK(paths[n], SP_ERR_NOMEM, "out of memory reading %s", list);
        lines[n] = lineno;
        n++;
    }
    SP_CHECK(n > 0, SP_ERR_INPUT, "%s: the image list has no image paths (one FITS path per line expected)", list);
    *paths_out = paths;
    *n_out = n;
    paths = NULL;
    if (lines_out) {
        *lines_out = lines;
        lines = NULL;
    }
cleanup:
    free(lines);
    if (f) fclose(f);
    if (paths) {
        for (int i = 0; i < n; i++) free(paths[i]);
        free(paths);
    }
    return status;
}

/* The k-th smallest of a[0..n-1] (0-based; a is reordered), Hoare's quickselect with a
 * median-of-three pivot: the value a full sort would put at a[k]. No NaNs in a. */
static double select_kth(double *a, size_t n, size_t k)
{
    size_t lo = 0, hi = n - 1;
    while (hi > lo) {
        size_t mid = lo + (hi - lo) / 2;
        if (a[mid] < a[lo]) { double t = a[mid]; a[mid] = a[lo]; a[lo] = t; }
        if (a[hi] < a[lo]) { double t = a[hi]; a[hi] = a[lo]; a[lo] = t; }
        if (a[hi] < a[mid]) { double t = a[hi]; a[hi] = a[mid]; a[mid] = t; }
        double piv = a[mid];
        size_t i = lo, j = hi;
        for (;;) {
            while (a[i] < piv) i++;
            while (piv < a[j]) j--;
            if (i >= j) break;
            double t = a[i]; a[i] = a[j]; a[j] = t;
            i++;
            j--;
        }
        if (k <= j) hi = j;
        else lo = j + 1;
    }
    return a[k];
}

/* A required key that is missing or unreadable: say what it is for and what to do. */
static int key_advice(int status, const char *key)
{
    if (status == SP_OK) return status;
    char msg[1536];
    snprintf(msg, sizeof msg, "%s", sp_err_msg());
    const char *why = !strcmp(key, "FILTER")    ? "the band name"
                      : !strcmp(key, "ZP_AUTO") ? "the AB zero point that scales the frame to image_scaling.zp_ref"
                      : !strcmp(key, "SKYSIG")  ? "the sky noise in ADU, for the noise model"
                                                : "the gain in e-/ADU, for the source variance";
    return SP_FAIL(status, "%s; every frame needs %s (%s): add it to the header or remove the frame from the image list",
                   msg, key, why);
}

/* Header keys, shape and a cheap statistic from up to 32 evenly spaced rows. */
static int read_frame(const char *path, double zp_ref, sp_frame *fr)
{
    int status = SP_OK, found = 0;
    sp_fits *f = NULL;
    float *row = NULL;
    double *vals = NULL;
    struct stat st;
    memset(fr, 0, sizeof *fr);
    snprintf(fr->path, sizeof fr->path, "%s", path);
    SP_TRY(sp_fits_open(path, &f));
    fr->hdu = sp_fits_hdu(f);
    sp_fits_shape(f, &fr->nx, &fr->ny);
    char filt[80] = "";
    SP_TRY(key_advice(sp_fits_key_string(f, "FILTER", 1, filt, sizeof filt, NULL), "FILTER"));
    char *b = trim(filt);
    SP_CHECK(*b && strlen(b) < SP_BAND_MAX, SP_ERR_INPUT, "%s[HDU %d]: FILTER '%s' is empty or longer than %d characters",
             path, fr->hdu, b, SP_BAND_MAX - 1);
    snprintf(fr->band, sizeof fr->band, "%s", b);
    SP_TRY(key_advice(sp_fits_key_double(f, "ZP_AUTO", 1, &fr->zp_auto, NULL), "ZP_AUTO"));
    SP_TRY(key_advice(sp_fits_key_double(f, "SKYSIG", 1, &fr->skysig, NULL), "SKYSIG"));
    SP_TRY(key_advice(sp_fits_key_double(f, "EGAIN", 1, &fr->egain, NULL), "EGAIN"));
    SP_TRY(sp_fits_key_double(f, "SATURATE", 0, &fr->saturate, &found));
    if (!found) fr->saturate = NAN;
    SP_TRY(sp_fits_key_double(f, "EXPTIME", 0, &fr->exptime, &found));
    if (!found) fr->exptime = NAN;
    /* an implausible zero point scales the frame to 0 or infinity: every flux silently 0 or NaN */
    SP_CHECK(isfinite(fr->zp_auto) && fr->zp_auto > 0 && fr->zp_auto < 60, SP_ERR_INPUT,
             "%s[HDU %d]: ZP_AUTO = %g is not a plausible AB zero point (expected 0 < ZP_AUTO < 60; with "
             "image_scaling.zp_ref = %g the frame would be scaled by 10^%.3g): fix the header",
             path, fr->hdu, fr->zp_auto, zp_ref, -0.4 * (fr->zp_auto - zp_ref));
    SP_CHECK(fr->skysig > 0 && isfinite(fr->skysig), SP_ERR_INPUT,
             "%s[HDU %d]: SKYSIG = %g; it must be a positive sky noise in ADU", path, fr->hdu, fr->skysig);
    SP_CHECK(fr->egain > 0 && isfinite(fr->egain), SP_ERR_INPUT,
             "%s[HDU %d]: EGAIN = %g; it must be a positive gain in e-/ADU", path, fr->hdu, fr->egain);
    fr->scale = pow(10.0, -0.4 * (fr->zp_auto - zp_ref));
    SP_TRY(sp_fits_header_checksum(f, &fr->hdr_checksum));
    if (stat(path, &st) == 0) {
        fr->file_size = (long long)st.st_size;
        fr->dev = (unsigned long long)st.st_dev;
        fr->ino = (unsigned long long)st.st_ino;
    }

    /* statistics from sampled rows; an all-NaN sample triggers a full scan */
    int nrows = fr->ny < 32 ? (int)fr->ny : 32;
    SP_ALLOC(row, fr->nx);
    SP_ALLOC(vals, (size_t)fr->nx * (size_t)nrows);
    long nv = 0, ntot = 0;
    for (int k = 0; k < nrows; k++) {
        long y = (long)((k + 0.5) * (double)fr->ny / nrows);
        SP_TRY(sp_fits_read_subset(f, 0, y, fr->nx, 1, row));
        for (long x = 0; x < fr->nx; x++, ntot++)
            if (isfinite(row[x])) vals[nv++] = row[x];
    }
    if (nv == 0) {
        for (long y = 0; y < fr->ny && nv == 0; y++) {
            SP_TRY(sp_fits_read_subset(f, 0, y, fr->nx, 1, row));
            for (long x = 0; x < fr->nx; x++)
                if (isfinite(row[x])) nv++;
        }
        SP_CHECK(nv > 0, SP_ERR_INPUT, "%s[HDU %d]: every pixel is NaN or blank; remove it from the image list", path,
                 fr->hdu);
        fr->median = fr->rsigma = NAN;
        fr->nan_frac = NAN;
    } else {
        /* the (nv/2)-th values by selection, as a sort would give them (O(n): on an 8192-wide
         * frame the two sorts of 262,144 samples were most of the frame's planning time) */
        fr->median = select_kth(vals, (size_t)nv, (size_t)nv / 2);
        for (long i = 0; i < nv; i++) vals[i] = fabs(vals[i] - fr->median);
        fr->rsigma = 1.4826 * select_kth(vals, (size_t)nv, (size_t)nv / 2);
        fr->nan_frac = 1.0 - (double)nv / (double)ntot;
    }
    sp_prof_bytes((double)nrows * (double)fr->nx * 4.0);
cleanup:
    sp_fits_close(&f);
    free(row);
    free(vals);
    return status;
}

/* ---- frames ------------------------------------------------------------------- */

static int build_frames(const sp_plan_opts *o, MPI_Comm comm, sp_plan *p)
{
    int status = SP_OK, rank, size;
    char **paths = NULL;
    long *lines = NULL;
    int n = 0;
    sp_frame *mine = NULL;
    int *counts = NULL, *displs = NULL;
    sp_wcs *w = NULL;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &size);

    /* every rank reads the (small) list; errors are identical, agreed below */
    status = sp_plan_read_image_list_lines(o->image_list, &paths, &lines, &n);
    SP_TRY(sp_mpi_agree(status, comm));

    /* frame 0's header defines the tile WCS: rank 0 reads and broadcasts it */
    if (rank == 0) {
        sp_fits *f = NULL;
        status = sp_fits_open(paths[0], &f);
        if (status == SP_OK) status = sp_fits_header(f, &p->wcs_header, &p->wcs_nkeys);
        if (status == SP_OK) {
            sp_wcs *w0 = NULL;
            status = sp_wcs_from_fits(f, &w0);
            sp_wcs_free(&w0);
        }
        sp_fits_close(&f);
        if (status != SP_OK)
            sp_err_context("%s:%ld (the first frame, which defines the tile WCS)", o->image_list, lines[0]);
    }
    SP_TRY(sp_mpi_agree(status, comm));
    size_t hlen = rank == 0 ? strlen(p->wcs_header) : 0;
    SP_TRY(sp_mpi_bcast_bytes(&p->wcs_header, &hlen, 0, comm));
    MPI_Bcast(&p->wcs_nkeys, 1, MPI_INT, 0, comm);
    char what[SP_PATH_MAX + 16];
    snprintf(what, sizeof what, "%s", paths[0]);
    SP_TRY(sp_mpi_agree(sp_wcs_from_header(p->wcs_header, p->wcs_nkeys, what, &p->wcs), comm));

    /* partition visits: frame i is read by rank i % size */
    int nmine = 0;
    SP_ALLOC(mine, n / size + 1);
    status = SP_OK;
    for (int i = rank; i < n && status == SP_OK; i += size) {
        sp_frame *fr = &mine[nmine++];
        status = read_frame(paths[i], o->zp_ref, fr);
        if (status == SP_OK) {
            sp_fits *f = NULL;
            status = sp_fits_open(paths[i], &f);
            if (status == SP_OK) status = sp_wcs_from_fits(f, &w);
            sp_fits_close(&f);
            if (status == SP_OK) status = sp_wcs_max_offset(p->wcs, w, fr->nx, fr->ny, &fr->wcs_offset_pix);
            sp_wcs_free(&w);
        }
        fr->list_line = lines[i];
        if (status != SP_OK) sp_err_context("%s:%ld", o->image_list, lines[i]);
    }
    SP_TRY(sp_mpi_agree(status, comm));

    /* gather in file order: rank r holds frames r, r+size, ... */
    SP_ALLOC(counts, size);
    SP_ALLOC(displs, size);
    int nb = nmine * (int)sizeof(sp_frame);
    MPI_Allgather(&nb, 1, MPI_INT, counts, 1, MPI_INT, comm);
    for (int r = 0, off = 0; r < size; r++) { displs[r] = off; off += counts[r]; }
    sp_frame *gathered = NULL;
    SP_ALLOC(gathered, n);
    MPI_Allgatherv(mine, nb, MPI_BYTE, gathered, counts, displs, MPI_BYTE, comm);
    SP_ALLOC(p->frames, n);
    for (int r = 0, k = 0; r < size; r++)
        for (int j = 0; r + j * size < n; j++) p->frames[r + j * size] = gathered[k++];
    free(gathered);
    p->nframes = n;

    /* checks, in the seed pipeline's spirit: same shape, aligned WCS */
    p->nx = p->frames[0].nx;
    p->ny = p->frames[0].ny;
    for (int i = 1; i < n; i++) {
        sp_frame *fr = &p->frames[i];
        SP_CHECK(fr->nx == p->nx && fr->ny == p->ny, SP_ERR_INPUT,
                 "%s:%ld: %s[HDU %d]: shape %ldx%ld differs from %s (line %ld: %ldx%ld); all frames of a tile must "
                 "share one pixel grid (resample the frame onto the tile, or list it in another tile's image list)%s",
                 o->image_list, fr->list_line, fr->path, fr->hdu, fr->nx, fr->ny, p->frames[0].path,
                 p->frames[0].list_line, p->nx, p->ny,
                 o->shape_check_off ? "; checks.require_same_shape: false is accepted by the config, but frames of "
                                      "different shapes are not supported yet"
                                    : "");
        SP_CHECK(fr->wcs_offset_pix <= o->wcs_tolerance, SP_ERR_INPUT,
                 "%s:%ld: %s[HDU %d]: WCS differs from %s (line %ld) by up to %.3f pixels "
                 "(checks.wcs_tolerance.crpix = %g); all frames of a tile must be aligned on one pixel grid",
                 o->image_list, fr->list_line, fr->path, fr->hdu, p->frames[0].path, p->frames[0].list_line,
                 fr->wcs_offset_pix, o->wcs_tolerance);
    }
    /* the same file twice (a repeated line, a symlink, another spelling of the path) would count its
     * pixels twice in the coadd */
    for (int i = 1; i < n; i++)
        for (int j = 0; j < i; j++) {
            const sp_frame *a = &p->frames[j], *b = &p->frames[i];
            SP_CHECK(!(a->ino != 0 && a->dev == b->dev && a->ino == b->ino), SP_ERR_INPUT,
                     "%s:%ld: %s is the same file as line %ld (%s); list each frame once", o->image_list,
                     b->list_line, b->path, a->list_line, a->path);
        }
    /* bands in order of first appearance */
    SP_ALLOC(p->bands, n);
    SP_ALLOC(p->band_nframes, n);
    for (int i = 0; i < n; i++) {
        int b;
        for (b = 0; b < p->nbands; b++)
            if (!strcmp(p->bands[b], p->frames[i].band)) break;
        if (b == p->nbands) snprintf(p->bands[p->nbands++], SP_BAND_MAX, "%s", p->frames[i].band);
        p->frames[i].band_index = b;
        p->band_nframes[b]++;
    }
    SP_TRY(sp_wcs_pixscale(p->wcs, 0.5 * (double)(p->nx - 1), 0.5 * (double)(p->ny - 1), &p->pixscale));
cleanup:
    if (paths) {
        for (int i = 0; i < n; i++) free(paths[i]);
        free(paths);
    }
    free(lines);
    free(mine);
    free(counts);
    free(displs);
    return status;
}

/* ---- catalog ------------------------------------------------------------------ */

typedef struct {
    const char *id;
    long row;
} id_ref;

static int cmp_id_ref(const void *a, const void *b)
{
    const id_ref *x = a, *y = b;
    int c = strcmp(x->id, y->id);
    return c ? c : (x->row > y->row) - (x->row < y->row);
}

static int build_catalog(const sp_plan_opts *o, sp_plan *p, uint64_t *cat_hash)
{
    int status = SP_OK;
    sp_csv *t = NULL;
    sp_catalog *c = &p->cat;
    int *fluxcol = NULL;
    double *col = NULL;
    const char *path = o->input_catalog;

    status = sp_csv_read(path, &t);
    if (status != SP_OK) {
        sp_err_context("input catalog (inputs.input_catalog)");
        goto cleanup;
    }
    SP_CHECK(t->nrow > 0, SP_ERR_INPUT,
             "%s:1: the catalog has a header but no rows (inputs.input_catalog); give at least one source", path);
    int cra = sp_csv_col(t, "RA"), cdec = sp_csv_col(t, "DEC");
    SP_CHECK(cra >= 0 && cdec >= 0, SP_ERR_INPUT, "%s:%ld: the catalog needs RA and DEC columns (degrees); found: %s%s",
             path, 1L, cra < 0 ? "no RA" : "RA", cdec < 0 ? ", no DEC" : ", DEC");
    int cid = sp_csv_col(t, "ID"), ctype = sp_csv_col(t, "TYPE");
    int cell = sp_csv_col(t, "ELL"), ctheta = sp_csv_col(t, "THETA"), cre = sp_csv_col(t, "Re");
    int cn = sp_csv_col(t, "SERSIC_N");

    /* FLUX_<band> columns must name bands that exist among the frames */
    SP_ALLOC(fluxcol, p->nbands);
    for (int b = 0; b < p->nbands; b++) fluxcol[b] = -1;
    for (int k = 0; k < t->ncol; k++) {
        if (strncasecmp(t->colnames[k], "FLUX_", 5) != 0) continue;
        const char *band = t->colnames[k] + 5;
        int b;
        for (b = 0; b < p->nbands; b++)
            if (!strcasecmp(p->bands[b], band)) break;
        if (b == p->nbands && o->allow_unknown_bands) {
            if (sp_log_rank() == 0) /* every rank reads the catalog: say it once */
                SP_WARN("%s:1: column %s names band '%s', but no frame has FILTER = '%s': column ignored "
                    "(checks.require_catalog_bands: false)",
                    path, t->colnames[k], band, band);
            continue;
        }
        if (b == p->nbands) {
            char have[512] = "";
            for (int j = 0; j < p->nbands; j++)
                snprintf(have + strlen(have), sizeof have - strlen(have), "%s%s", j ? ", " : "", p->bands[j]);
            SP_CHECK(0, SP_ERR_INPUT,
                     "%s:1: column %s names band '%s', but no frame has FILTER = '%s' (frame bands: %s); "
                     "remove the column, add the band's frames to the image list, or set checks.require_catalog_bands: "
                     "false to ignore it",
                     path, t->colnames[k], band, band, have);
        }
        fluxcol[b] = k;
    }

    long n = t->nrow;
    int nb = p->nbands;
    c->n = n;
    c->nbands = nb;
    SP_ALLOC(c->id, n);
    SP_ALLOC(c->ra, n);
    SP_ALLOC(c->dec, n);
    SP_ALLOC(c->x, n);
    SP_ALLOC(c->y, n);
    SP_ALLOC(c->type, n);
    SP_ALLOC(c->type_given, n);
    SP_ALLOC(c->flux_init, (size_t)n * nb);
    SP_ALLOC(c->ell, n);
    SP_ALLOC(c->theta, n);
    SP_ALLOC(c->re, n);
    SP_ALLOC(c->sersic_n, n);
    SP_ALLOC(c->excl, n);
    SP_ALLOC(c->cell, n);
    SP_ALLOC(c->patch, n);
    SP_ALLOC(c->line, n);
    SP_TRY(sp_csv_col_double(t, cra, c->ra));
    SP_TRY(sp_csv_col_double(t, cdec, c->dec));
    SP_ALLOC(col, n);
    for (int b = 0; b < nb; b++) {
        if (fluxcol[b] >= 0) SP_TRY(sp_csv_col_double(t, fluxcol[b], col));
        for (long i = 0; i < n; i++) c->flux_init[i * nb + b] = fluxcol[b] >= 0 ? col[i] : NAN;
    }
    double *dst[4] = {c->ell, c->theta, c->re, c->sersic_n};
    int src[4] = {cell, ctheta, cre, cn};
    for (int k = 0; k < 4; k++) {
        if (src[k] >= 0) SP_TRY(sp_csv_col_double(t, src[k], dst[k]));
        else
            for (long i = 0; i < n; i++) dst[k][i] = NAN;
    }

    /* IDs verbatim, in one buffer; missing column -> the row number */
    size_t idlen = 0;
    for (long i = 0; i < n; i++) idlen += (cid >= 0 ? strlen(sp_csv_cell(t, i, cid)) : 20) + 1;
    SP_ALLOC(c->idbuf, idlen);
    char *q = c->idbuf;
    for (long i = 0; i < n; i++) {
        c->id[i] = q;
        if (cid >= 0) q += sprintf(q, "%s", sp_csv_cell(t, i, cid)) + 1;
        else q += sprintf(q, "%ld", i + 1) + 1;
        c->line[i] = t->lines[i];
        int ty = ctype >= 0 ? sp_plan_parse_type(sp_csv_cell(t, i, ctype)) : -1;
        c->type_given[i] = ty >= 0;
        c->type[i] = ty >= 0 ? ty : o->gal_model;
        if (!isfinite(c->ra[i]) || !isfinite(c->dec[i]) || fabs(c->dec[i]) > 90) c->excl[i] |= SP_EXCL_NANCOORD;
        c->cell[i] = c->patch[i] = -1;
    }
    /* DESIGN §8: a source without a position is a bad input, not a row to flag silently. Name the
     * first lines so the user can fix them all at once. */
    {
        long nnan = 0;
        char where[256] = "";
        for (long i = 0; i < n; i++) {
            if (!(c->excl[i] & SP_EXCL_NANCOORD)) continue;
            if (nnan < 5)
                snprintf(where + strlen(where), sizeof where - strlen(where), "%s%ld", nnan ? ", " : "", c->line[i]);
            nnan++;
        }
        if (nnan > 5) snprintf(where + strlen(where), sizeof where - strlen(where), ", ...");
        for (long i = 0; i < n && nnan; i++) {
            if (!(c->excl[i] & SP_EXCL_NANCOORD)) continue;
            SP_CHECK(0, SP_ERR_INPUT,
                     "%s:%ld: source '%s' has no valid position (RA = '%s', DEC = '%s'); %ld row(s) have blank, NaN "
                     "or out-of-range RA/DEC (lines %s): give every source finite coordinates in degrees "
                     "(|DEC| <= 90), or remove those rows",
                     path, c->line[i], c->id[i], sp_csv_cell(t, i, cra), sp_csv_cell(t, i, cdec), nnan, where);
        }
    }
    /* duplicate IDs make rows ambiguous for users joining on ID: refused (docs/troubleshooting.md) */
    if (cid >= 0) {
        id_ref *sorted = NULL;
        SP_ALLOC(sorted, n);
        for (long i = 0; i < n; i++) sorted[i] = (id_ref){c->id[i], i};
        qsort(sorted, (size_t)n, sizeof *sorted, cmp_id_ref); /* by ID, then by row */
        long ndup = 0, k1 = -1, k2 = -1;
        for (long i = 1; i < n; i++) {
            if (strcmp(sorted[i].id, sorted[i - 1].id) != 0) continue;
            ndup++;
            /* report the pair whose second row comes first in the file */
            if (k2 < 0 || sorted[i].row < k2) {
                long j = i - 1;
                while (j > 0 && !strcmp(sorted[j - 1].id, sorted[i].id)) j--;
                k1 = sorted[j].row;
                k2 = sorted[i].row;
            }
        }
        free(sorted);
        SP_CHECK(ndup == 0, SP_ERR_INPUT,
                 "%s:%ld: duplicate ID '%s' (first at line %ld; %ld duplicate row(s) in all); IDs must be unique so "
                 "that output rows can be joined on ID: make them unique, or drop the ID column to number the rows",
                 path, c->line[k2], c->id[k2], c->line[k1], ndup);
    }

    /* project onto the tile */
    long nbad = 0;
    SP_TRY(sp_wcs_sky2pix(p->wcs, n, c->ra, c->dec, c->x, c->y, &nbad));
    long ninside = 0;
    for (long i = 0; i < n; i++) {
        if (c->excl[i] & SP_EXCL_NANCOORD) continue;
        double x = c->x[i], y = c->y[i];
        if (!isfinite(x) || !isfinite(y) || x < -0.5 || y < -0.5 || x >= p->nx - 0.5 || y >= p->ny - 0.5) {
            c->excl[i] |= SP_EXCL_OUTSIDE;
            continue;
        }
        ninside++;
        double m = o->crop_margin;
        if (x < m - 0.5 || y < m - 0.5 || x >= p->nx - 0.5 - m || y >= p->ny - 0.5 - m) c->excl[i] |= SP_EXCL_CROP;
    }
    if (ninside == 0) {
        /* say where the tile is and where the catalog is, so the mismatch is obvious */
        double cx = 0.5 * (double)(p->nx - 1), cy = 0.5 * (double)(p->ny - 1), tra = NAN, tdec = NAN;
        long nb2 = 0;
        sp_wcs_pix2sky(p->wcs, 1, &cx, &cy, &tra, &tdec, &nb2);
        double ra0 = INFINITY, ra1 = -INFINITY, de0 = INFINITY, de1 = -INFINITY;
        for (long i = 0; i < n; i++) {
            if (c->ra[i] < ra0) ra0 = c->ra[i];
            if (c->ra[i] > ra1) ra1 = c->ra[i];
            if (c->dec[i] < de0) de0 = c->dec[i];
            if (c->dec[i] > de1) de1 = c->dec[i];
        }
        SP_CHECK(0, SP_ERR_INPUT,
                 "%s: none of the %ld sources falls on the tile: the %ldx%ld-pixel tile (%.1f x %.1f arcmin) is "
                 "centred on RA %.5f, Dec %.5f, the catalog spans RA %.5f..%.5f, Dec %.5f..%.5f; check that "
                 "inputs.input_catalog and the images (%s) cover the same field",
                 path, n, p->nx, p->ny, p->nx * p->pixscale / 60, p->ny * p->pixscale / 60, tra, tdec, ra0, ra1, de0,
                 de1, o->image_list);
    }
    /* the catalog's bytes are part of the inputs' identity */
    uint64_t h = 0xcbf29ce484222325ULL;
    for (long i = 0; i < n; i++)
        for (int k = 0; k < t->ncol; k++) {
            const char *s = sp_csv_cell(t, i, k);
            h = fnv1a(h, s, strlen(s) + 1);
        }
    *cat_hash = h;
cleanup:
    sp_csv_free(&t);
    free(fluxcol);
    free(col);
    return status;
}

/* ---- grid ---------------------------------------------------------------------- */

static long split(long n, int parts, int k) { return (long)((double)n * k / parts + 0.5); }

/* ---- memory model (docs/performance.md, "Memory: what the planner counts") ----------- */

/* The model box radius (image px) the fitter gives a source (fit_engine.c box_radius):
 * out to where flux x profile falls below box_nsigma x the pixel sigma, at least
 * ceil(FWHM) + 2, stars within the PSF stamp, galaxies at least 2 Re, at most
 * box_max_half; + 1 px when its position is fitted. The PSF is not built yet: a Moffat
 * of the fallback FWHM and beta stands for it, and a galaxy for a Gaussian of its Re
 * convolved with it. F: the catalog's initial flux (NaN: unknown, the smallest box). */
static double est_box_radius(const sp_plan *p, const sp_fit_options *fo, int type, double F, double re,
                             double sigma, int fitted)
{
    const sp_plan_opts *o = &p->opts;
    double fwhm = o->psf_fwhm > 0 ? o->psf_fwhm : 4.0, beta = o->psf_beta > 1 ? o->psf_beta : 3.5;
    double half = 0.5 * (o->psf_size - 1), rmin = ceil(fwhm) + 2.0;
    double thr = fo->box_nsigma * sigma;
    F = isfinite(F) ? fabs(F) : 0.0;
    double alpha = fwhm / (2.0 * sqrt(pow(2.0, 1.0 / beta) - 1.0));
    double peak = (beta - 1.0) / (M_PI * alpha * alpha);
    double R = 0;
    while (R < half && F * peak * pow(1.0 + R * R / (alpha * alpha), -beta) >= thr) R += 1.0;
    if (type != SP_SRC_STAR) {
        double r_e = isfinite(re) && re > 0 ? re : (o->re_fallback > 0 ? o->re_fallback : 3.0);
        double a2 = (r_e / 1.177) * (r_e / 1.177) + (fwhm / 2.3548) * (fwhm / 2.3548), rg = 0;
        while (rg < fo->box_max_half && F / (2.0 * M_PI * a2) * exp(-0.5 * rg * rg / a2) >= thr) rg += 1.0;
        if (rg > R) R = rg;
        if (R < 2.0 * r_e) R = 2.0 * r_e;
    }
    if (R < rmin) R = rmin;
    if (R > fo->box_max_half) R = fo->box_max_half;
    return R + (fitted ? 1.0 : 0.0);
}

static int geom_params(int type) { return type == SP_SRC_STAR ? 2 : type == SP_SRC_SERSIC ? 6 : 5; }

static int uf_find(int *uf, int a)
{
    while (uf[a] != a) a = uf[a] = uf[uf[a]];
    return a;
}

/* The fit of patch pid as sp_fit_reserve sizes: its ROI x bands, the sources in the ROI,
 * their model boxes (est_box_radius, clipped to the ROI) and the groups the fitter forms
 * from them (touching boxes of fitted sources; components above max_group are fitted in
 * chunks of max_group). Scratch: idx, R, sumng (cat.n), uf (2 cat.n + 1). */
static void patch_fit_sizes(const sp_plan *p, int pid, const double *sigma, long *idx, int *uf, double *R,
                            double *sumng, sp_fit_reserve *z)
{
    const sp_patch *pt = &p->patches[pid];
    const sp_plan_opts *o = &p->opts;
    sp_fit_options fo;
    sp_fit_options_default(&fo);
    int nb = p->nbands, maxg = o->max_group > 0 ? o->max_group : fo.max_group;
    long pnx = pt->rx1 - pt->rx0, pny = pt->ry1 - pt->ry0;
    memset(z, 0, sizeof *z);
    z->nbands = z->nimg = nb;
    z->pixels = (size_t)pnx * pny * nb;
    long n = sp_plan_patch_sources(p, pid, idx, p->cat.n > 0 ? p->cat.n : 1);
    z->nsrc = (int)n;
    for (long k = 0; k < n; k++) {
        long i = idx[k];
        int type = p->cat.type[i], base = k < pt->nsrc, fixed = !base && o->halo_fixed;
        double x = p->cat.x[i] - pt->rx0, y = p->cat.y[i] - pt->ry0;
        R[k] = 0;
        for (int b = 0; b < nb; b++) {
            double r = est_box_radius(p, &fo, type, p->cat.flux_init[i * nb + b], p->cat.re[i], sigma[b], !fixed);
            if (r > R[k]) R[k] = r;
            int Ri = (int)ceil(r);
            long cx = lround(x), cy = lround(y);
            long x0 = cx - Ri > 0 ? cx - Ri : 0, x1 = cx + Ri < pnx - 1 ? cx + Ri : pnx - 1;
            long y0 = cy - Ri > 0 ? cy - Ri : 0, y1 = cy + Ri < pny - 1 ? cy + Ri : pny - 1;
            if (x1 < x0 || y1 < y0) continue;
            size_t bp = (size_t)(x1 - x0 + 1) * (size_t)(y1 - y0 + 1);
            z->box_pixels += bp;
            z->model_pixels += bp * (size_t)(1 + geom_params(type));
        }
        uf[k] = fixed ? -1 : (int)k;
    }
    /* groups: union-find over touching boxes (the fitter's test, on the input positions) */
    for (long a = 0; a < n; a++) {
        if (uf[a] < 0) continue;
        for (long b = a + 1; b < n; b++) {
            if (uf[b] < 0) continue;
            double lim = R[a] + R[b] + 1.0;
            if (fabs(p->cat.x[idx[a]] - p->cat.x[idx[b]]) < lim && fabs(p->cat.y[idx[a]] - p->cat.y[idx[b]]) < lim) {
                int ra = uf_find(uf, (int)a), rb = uf_find(uf, (int)b);
                if (ra != rb) uf[ra] = rb;
            }
        }
    }
    /* per component (at its root): members and their geometry parameters */
    for (long k = 0; k < n; k++) sumng[k] = 0;
    int *cnt = uf + n;
    for (long k = 0; k < n; k++) cnt[k] = 0;
    for (long k = 0; k < n; k++) {
        if (uf[k] < 0) continue;
        int r = uf_find(uf, (int)k);
        cnt[r]++;
        sumng[r] += geom_params(p->cat.type[idx[k]]);
    }
    size_t best = 0;
    for (long k = 0; k < n; k++) {
        if (cnt[k] == 0) continue;
        int gn = cnt[k] < maxg ? cnt[k] : maxg;
        int gth = (int)ceil(sumng[k] * gn / cnt[k]);
        size_t d = sp_fit_group_doubles(gn, gth, nb);
        if (d > best) {
            best = d;
            z->group_n = gn;
            z->group_nth = gth;
        }
        if (cnt[k] > z->comp_n) z->comp_n = cnt[k];
    }
}

/* The patch loop's scratch per thread (src/pipeline/cell_fit.c fit_scratch): the patch's
 * data, ivar and model images (floats), its sources and results. */
static double fit_scratch_bytes(const sp_fit_reserve *z)
{
    return (double)z->pixels * 3.0 * sizeof(float) +
           (double)z->nsrc * (sizeof(sp_fit_source) + sizeof(sp_fit_result) + sizeof(long));
}

/* Fills p->fit_reserve (fieldwise max over the active patches) and p->fit_thread_mem. */
static int plan_fit_memory(sp_plan *p)
{
    int status = SP_OK;
    long *idx = NULL;
    int *uf = NULL;
    double *R = NULL, *sumng = NULL, *sigma = NULL, *wsum = NULL;
    long n = p->cat.n > 0 ? p->cat.n : 1;
    SP_ALLOC(idx, n);
    SP_ALLOC(uf, 2 * n + 1);
    SP_ALLOC(R, n);
    SP_ALLOC(sumng, n);
    SP_ALLOC(sigma, p->nbands);
    SP_ALLOC(wsum, p->nbands);
    /* pixel sigma per band: the inverse-variance coadd of its frames' sky noise */
    for (int f = 0; f < p->nframes; f++) {
        const sp_frame *fr = &p->frames[f];
        double s = fr->skysig * fr->scale;
        if (s > 0 && isfinite(s)) wsum[fr->band_index] += 1.0 / (s * s);
    }
    for (int b = 0; b < p->nbands; b++) sigma[b] = wsum[b] > 0 ? 1.0 / sqrt(wsum[b]) : 1.0;
    sp_fit_reserve *m = &p->fit_reserve;
    memset(m, 0, sizeof *m);
    m->nbands = m->nimg = p->nbands;
    for (int k = 0; k < p->npatches; k++) {
        const sp_patch *pt = &p->patches[k];
        if (!pt->active || pt->nsrc == 0 || !p->cells[pt->cell].active) continue;
        sp_fit_reserve z;
        patch_fit_sizes(p, k, sigma, idx, uf, R, sumng, &z);
#define FMAX(f) if (z.f > m->f) m->f = z.f
        FMAX(pixels);
        FMAX(nsrc);
        FMAX(box_pixels);
        FMAX(model_pixels);
        FMAX(comp_n);
#undef FMAX
        if (sp_fit_group_doubles(z.group_n, z.group_nth, p->nbands) >
            sp_fit_group_doubles(m->group_n, m->group_nth, p->nbands)) {
            m->group_n = z.group_n;
            m->group_nth = z.group_nth;
        }
    }
    p->fit_thread_mem = (double)sp_fit_reserve_bytes(m) + fit_scratch_bytes(m);
cleanup:
    free(idx);
    free(uf);
    free(R);
    free(sumng);
    free(sigma);
    free(wsum);
    return status;
}

double sp_plan_cell_memory(const sp_plan *p, const sp_cell *c, int threads)
{
    double npix = (double)(c->rx1 - c->rx0) * (double)(c->ry1 - c->ry0);
    int nb = p->nbands, maxf = 1;
    for (int b = 0; b < nb; b++)
        if (p->band_nframes[b] > maxf) maxf = p->band_nframes[b];
    if (threads < 1) threads = 1;
    /* kept per rank from cell to cell (src/pipeline.c ioprep_state): the band images (data 4,
     * ivar 4, mask 1), the raw ROI (4), the frames of a multi-frame band (9 each); per cell:
     * background and rms per band (8), white stack and its ivar (8), and the PSF pass's
     * passing buffers (~24: detection's filtered images, labels and the stage's rms and
     * mask; the ePSF stage's Moffat fit, whose Jacobian of up to 40 stars is gone before
     * the fit pass, stayed within it on the measured tiles) */
    double bytes = npix * (4.0 + (maxf > 1 ? 9.0 * maxf : 0.0) + 17.0 * nb + 8.0 + 24.0);
    /* the cell's sources: fit results, apertures, sky positions */
    bytes += (double)c->nsrc * (sizeof(sp_fit_result) + 64.0 * nb + 64.0);
    /* every thread's fit workspace, reserved once for the largest patch, and its scratch */
    if (npix > 0) bytes += threads * p->fit_thread_mem;
    /* the ePSF grid every rank holds after the PSF pass: an oversampled stamp per band per cell */
    int os = p->opts.psf_oversamp > 0 ? p->opts.psf_oversamp : 1;
    double so = (double)os * (p->opts.psf_size - 1) + 1;
    bytes += (double)p->ncells * nb * so * so * 4.0;
    /* epsf.moffat_field: the PSF-star cutouts each band keeps until the share (a record of
     * 12 doubles and 2 side^2 floats per star, the side set by the expected FWHM; the band's
     * owner gets them all) */
    if (p->opts.psf_field_stars > 0) {
        double side = p->opts.psf_field_size > 0 ? p->opts.psf_field_size : p->opts.psf_size;
        bytes += (double)nb * p->opts.psf_field_stars * (96.0 + 8.0 * side * side);
    }
    /* the store (HDF5's caches and the open file) and the run's set-up beyond the plan: ~10 MiB */
    if (npix > 0) bytes += 10.0 * 1048576.0;
    return bytes;
}

static int build_grid(const sp_plan_opts *o, sp_plan *p)
{
    int status = SP_OK;
    sp_catalog *c = &p->cat;
    long *count = NULL, *xpatch = NULL;
    int ng = o->epsf_ngrid, pg = o->ngrid;
    SP_CHECK(ng >= 1 && pg >= 1, SP_ERR_CONFIG, "epsf.epsf_ngrid and epsf.ngrid must be >= 1");
    SP_CHECK(p->nx / ((long)ng * pg) >= 8 && p->ny / ((long)ng * pg) >= 8, SP_ERR_CONFIG,
             "the %ldx%ld tile is too small for %dx%d cells of %dx%d patches (patches under 8 pixels); lower "
             "epsf.epsf_ngrid or epsf.ngrid",
             p->nx, p->ny, ng, ng, pg, pg);
    int halo = (o->psf_size - 1) / 2 + 2;
    if (o->halo_pix_min > halo) halo = o->halo_pix_min;
    p->halo = halo;
    p->outer = (o->psf_size - 1) / 2 + 1; /* a PSF centred further out puts no light in the ROI */
    p->ncells = ng * ng;
    p->npatches = ng * ng * pg * pg;
    SP_ALLOC(p->cells, p->ncells);
    SP_ALLOC(p->patches, p->npatches);
    long gx = (long)ng * pg; /* patches per tile side */
    for (int cy = 0; cy < ng; cy++)
        for (int cx = 0; cx < ng; cx++) {
            sp_cell *ce = &p->cells[cy * ng + cx];
            ce->id = cy * ng + cx;
            ce->ix = cx;
            ce->iy = cy;
            ce->bx0 = split(p->nx, ng, cx);
            ce->bx1 = split(p->nx, ng, cx + 1);
            ce->by0 = split(p->ny, ng, cy);
            ce->by1 = split(p->ny, ng, cy + 1);
            ce->rx0 = ce->bx0 - halo > 0 ? ce->bx0 - halo : 0;
            ce->ry0 = ce->by0 - halo > 0 ? ce->by0 - halo : 0;
            ce->rx1 = ce->bx1 + halo < p->nx ? ce->bx1 + halo : p->nx;
            ce->ry1 = ce->by1 + halo < p->ny ? ce->by1 + halo : p->ny;
            ce->patch0 = ce->id * pg * pg;
            ce->npatch = pg * pg;
            for (int py = 0; py < pg; py++)
                for (int px = 0; px < pg; px++) {
                    sp_patch *pt = &p->patches[ce->patch0 + py * pg + px];
                    pt->id = ce->patch0 + py * pg + px;
                    pt->cell = ce->id;
                    pt->ix = cx * pg + px;
                    pt->iy = cy * pg + py;
                    pt->bx0 = split(p->nx, (int)gx, pt->ix);
                    pt->bx1 = split(p->nx, (int)gx, pt->ix + 1);
                    pt->by0 = split(p->ny, (int)gx, pt->iy);
                    pt->by1 = split(p->ny, (int)gx, pt->iy + 1);
                    pt->rx0 = pt->bx0 - halo > 0 ? pt->bx0 - halo : 0;
                    pt->ry0 = pt->by0 - halo > 0 ? pt->by0 - halo : 0;
                    pt->rx1 = pt->bx1 + halo < p->nx ? pt->bx1 + halo : p->nx;
                    pt->ry1 = pt->by1 + halo < p->ny ? pt->by1 + halo : p->ny;
                }
        }
    /* assign active sources to the patch whose base region holds their pixel (crop-excluded
     * ones too, to a list of their own: they are modelled as neighbours, never reported) */
    SP_ALLOC(count, 2 * (p->npatches + 1));
    long *xcount = count + p->npatches + 1;
    SP_ALLOC(xpatch, c->n > 0 ? c->n : 1);
    for (long i = 0; i < c->n; i++) {
        xpatch[i] = -1;
        if (c->excl[i] && c->excl[i] != SP_EXCL_CROP) continue;
        long ix = lround(c->x[i]), iy = lround(c->y[i]);
        int pxg = (int)((double)ix * gx / p->nx), pyg = (int)((double)iy * gx / p->ny);
        /* split() rounds: step to the patch that really holds the pixel */
        while (pxg > 0 && ix < split(p->nx, (int)gx, pxg)) pxg--;
        while (pxg < gx - 1 && ix >= split(p->nx, (int)gx, pxg + 1)) pxg++;
        while (pyg > 0 && iy < split(p->ny, (int)gx, pyg)) pyg--;
        while (pyg < gx - 1 && iy >= split(p->ny, (int)gx, pyg + 1)) pyg++;
        int cx = pxg / pg, cy = pyg / pg;
        int pid = (cy * ng + cx) * pg * pg + (pyg % pg) * pg + (pxg % pg);
        if (c->excl[i]) {
            xpatch[i] = pid;
            xcount[pid]++;
            continue;
        }
        c->patch[i] = pid;
        c->cell[i] = cy * ng + cx;
        count[pid]++;
    }
    SP_ALLOC(p->patch_src, c->n > 0 ? c->n : 1);
    SP_ALLOC(p->patch_xsrc, c->n > 0 ? c->n : 1);
    long off = 0, xoff = 0;
    for (int k = 0; k < p->npatches; k++) {
        p->patches[k].src0 = off;
        p->patches[k].nsrc = 0;
        off += count[k];
        p->patches[k].xsrc0 = xoff;
        p->patches[k].nxsrc = 0;
        xoff += xcount[k];
    }
    for (long i = 0; i < c->n; i++) {
        if (c->patch[i] >= 0) {
            sp_patch *pt = &p->patches[c->patch[i]];
            p->patch_src[pt->src0 + pt->nsrc++] = i;
        } else if (xpatch[i] >= 0) {
            sp_patch *pt = &p->patches[xpatch[i]];
            p->patch_xsrc[pt->xsrc0 + pt->nxsrc++] = i;
        }
    }
    p->ncells_active = p->npatches_active = 0;
    p->nsrc_active = 0;
    p->max_cell_mem = 0;
    for (int k = 0; k < p->ncells; k++) {
        sp_cell *ce = &p->cells[k];
        ce->nsrc = 0;
        for (int j = 0; j < ce->npatch; j++) {
            sp_patch *pt = &p->patches[ce->patch0 + j];
            ce->nsrc += pt->nsrc;
            pt->active = !(o->skip_empty_patches && pt->nsrc == 0);
        }
        ce->active = !(o->skip_empty_cells && ce->nsrc == 0);
        if (!ce->active)
            for (int j = 0; j < ce->npatch; j++) p->patches[ce->patch0 + j].active = 0;
        if (ce->active) {
            p->ncells_active++;
            for (int j = 0; j < ce->npatch; j++) p->npatches_active += p->patches[ce->patch0 + j].active;
        }
        p->nsrc_active += ce->nsrc;
        /* cost model (nominal seconds): pixel work per frame + fit work per source-band */
        double npix = (double)(ce->rx1 - ce->rx0) * (double)(ce->ry1 - ce->ry0);
        ce->cost = ce->active ? npix * p->nframes * 2e-8 + (double)ce->nsrc * p->nbands * 2e-4 : 0;
    }
    SP_TRY(plan_fit_memory(p));
    for (int k = 0; k < p->ncells; k++) {
        sp_cell *ce = &p->cells[k];
        ce->mem_bytes = sp_plan_cell_memory(p, ce, o->threads > 0 ? o->threads : 1);
        if (ce->active && ce->mem_bytes > p->max_cell_mem) p->max_cell_mem = ce->mem_bytes;
    }
cleanup:
    free(count);
    free(xpatch);
    return status;
}

long sp_plan_patch_sources(const sp_plan *p, int pid, long *idx, long cap)
{
    const sp_patch *pt = &p->patches[pid];
    long n = 0;
    for (long k = 0; k < pt->nsrc; k++)
        if (n < cap) idx[n++] = p->patch_src[pt->src0 + k];
    for (long k = 0; k < pt->nxsrc; k++)
        if (n < cap) idx[n++] = p->patch_xsrc[pt->xsrc0 + k];
    long gx = (long)p->opts.epsf_ngrid * p->opts.ngrid, pg = p->opts.ngrid;
    /* neighbours whose base region may reach into this ROI grown by `outer` */
    long minw = p->nx / gx < p->ny / gx ? p->nx / gx : p->ny / gx;
    long reach = (p->halo + p->outer) / (minw > 0 ? minw : 1) + 1;
    double gx0 = pt->rx0 - 0.5 - p->outer, gx1 = pt->rx1 - 0.5 + p->outer;
    double gy0 = pt->ry0 - 0.5 - p->outer, gy1 = pt->ry1 - 0.5 + p->outer;
    for (long qy = pt->iy - reach; qy <= pt->iy + reach; qy++) {
        if (qy < 0 || qy >= gx) continue;
        for (long qx = pt->ix - reach; qx <= pt->ix + reach; qx++) {
            if (qx < 0 || qx >= gx || (qx == pt->ix && qy == pt->iy)) continue;
            long cid = (qy / pg) * p->opts.epsf_ngrid + qx / pg;
            const sp_patch *q = &p->patches[cid * pg * pg + (qy % pg) * pg + qx % pg];
            for (int list = 0; list < 2; list++) {
                const long *src = list ? p->patch_xsrc + q->xsrc0 : p->patch_src + q->src0;
                long ns = list ? q->nxsrc : q->nsrc;
                for (long k = 0; k < ns; k++) {
                    long i = src[k];
                    double x = p->cat.x[i], y = p->cat.y[i];
                    if (x >= gx0 && x < gx1 && y >= gy0 && y < gy1 && n < cap) idx[n++] = i;
                }
            }
        }
    }
    return n;
}

/* ---- reference catalog ---------------------------------------------------------- */

/* The zero points are computed at the very end; a reference catalog that cannot be read must not
 * cost the user the whole run, so it is read and checked here, before any pixel is touched (rank 0
 * reads, the outcome is agreed). No star on the tile is not an error: the run completes with the
 * zero points flagged, and the user is told now rather than after the run. */
static int check_reference(const sp_plan_opts *o, const sp_plan *p, MPI_Comm comm)
{
    int status = SP_OK, rank;
    sp_zp_refcat ref;
    const char **bands = NULL;
    double *x = NULL, *y = NULL;
    memset(&ref, 0, sizeof ref);
    MPI_Comm_rank(comm, &rank);
    if (!o->reference_catalog[0]) return SP_OK;
    if (rank == 0) {
        bands = calloc((size_t)(p->nbands > 0 ? p->nbands : 1), sizeof *bands);
        status = bands ? SP_OK : SP_FAIL(SP_ERR_NOMEM, "out of memory");
        for (int b = 0; b < p->nbands && bands; b++) bands[b] = p->bands[b];
        if (status == SP_OK) status = sp_zp_refcat_read(o->reference_catalog, bands, p->nbands, &ref);
        if (status == SP_OK) {
            long ninside = 0, nbad = 0;
            x = malloc((size_t)(ref.n > 0 ? ref.n : 1) * sizeof *x);
            y = malloc((size_t)(ref.n > 0 ? ref.n : 1) * sizeof *y);
            if (!x || !y) status = SP_FAIL(SP_ERR_NOMEM, "out of memory");
            if (status == SP_OK && ref.n > 0) status = sp_wcs_sky2pix(p->wcs, ref.n, ref.ra, ref.dec, x, y, &nbad);
            for (long j = 0; status == SP_OK && j < ref.n; j++)
                ninside += isfinite(x[j]) && isfinite(y[j]) && x[j] >= -0.5 && y[j] >= -0.5 &&
                           x[j] < p->nx - 0.5 && y[j] < p->ny - 0.5;
            if (status == SP_OK && ninside == 0)
                SP_WARN("%s: none of its %ld reference star(s) falls on the tile (inputs.reference_catalog does not "
                        "overlap the images): the run goes on, but no band gets a zero point (/zp flag 'no reference "
                        "star matched', MAG columns NaN)",
                        o->reference_catalog, ref.n);
            int nmiss = 0;
            char miss[256] = "";
            for (int b = 0; status == SP_OK && b < p->nbands; b++)
                if (!ref.has_band[b])
                    snprintf(miss + strlen(miss), sizeof miss - strlen(miss), "%smag_%s", nmiss++ ? ", " : "",
                             p->bands[b]);
            if (nmiss)
                SP_WARN("%s: no %s column: %s no zero point", o->reference_catalog, miss,
                        nmiss == 1 ? "that band gets" : "those bands get");
        }
        if (status != SP_OK) sp_err_context("checking the reference catalog before the run");
    }
    status = sp_mpi_agree(status, comm);
    free(bands);
    free(x);
    free(y);
    sp_zp_refcat_free(&ref);
    return status;
}

/* ---- injected reference stars (zp.inject_gaia_sources) ----------------------------- */

#define GROW_ARR(arr, n)                                                                                     \
    do {                                                                                                     \
        void *q_ = realloc((arr), (size_t)(n) * sizeof *(arr));                                              \
        SP_CHECK(q_ != NULL, SP_ERR_NOMEM, "out of memory appending reference stars to the catalog");       \
        (arr) = q_;                                                                                          \
    } while (0)

/* Reference stars with no catalog source within zp.match_radius_arcsec and a magnitude in
 * zp.gaia_mag_min..max are appended to the catalog as STAR sources (ID "REF<line>", flagged
 * injected), so the fitter measures them and they can calibrate the zero points. Every rank
 * does the same (the reference catalog is small), so the plans agree. */
static int inject_reference(const sp_plan_opts *o, sp_plan *p)
{
    int status = SP_OK;
    sp_catalog *c = &p->cat;
    sp_zp_refcat ref;
    sp_zp_inject inj;
    const char **bands = NULL;
    memset(&ref, 0, sizeof ref);
    memset(&inj, 0, sizeof inj);
    SP_ALLOC(bands, p->nbands);
    for (int b = 0; b < p->nbands; b++) bands[b] = p->bands[b];
    SP_TRY(sp_zp_refcat_read(o->reference_catalog, bands, p->nbands, &ref));
    sp_cfg_zp z;
    memset(&z, 0, sizeof z);
    z.match_radius_arcsec = o->inject_match_arcsec;
    z.gaia_mag_min = o->inject_mag_min;
    z.gaia_mag_max = o->inject_mag_max;
    SP_TRY(sp_zp_inject_sources(&ref, c->ra, c->dec, c->n, &z, o->zp_ref, &inj));
    SP_ALLOC(c->injected, c->n + inj.n + 1);
    if (inj.n > 0) {
        long n0 = c->n, n1 = c->n + inj.n;
        int nb = p->nbands;
        SP_ALLOC(c->idbuf_inj, (size_t)inj.n * 32);
        GROW_ARR(c->id, n1); GROW_ARR(c->ra, n1); GROW_ARR(c->dec, n1); GROW_ARR(c->x, n1); GROW_ARR(c->y, n1);
        GROW_ARR(c->type, n1); GROW_ARR(c->type_given, n1); GROW_ARR(c->flux_init, n1 * nb);
        GROW_ARR(c->ell, n1); GROW_ARR(c->theta, n1); GROW_ARR(c->re, n1); GROW_ARR(c->sersic_n, n1);
        GROW_ARR(c->excl, n1); GROW_ARR(c->cell, n1); GROW_ARR(c->patch, n1); GROW_ARR(c->line, n1);
        for (long k = 0; k < inj.n; k++) {
            long i = n0 + k;
            char *id = c->idbuf_inj + (size_t)k * 32;
            snprintf(id, 32, "%s", inj.id[k]);
            c->id[i] = id;
            c->ra[i] = inj.ra[k];
            c->dec[i] = inj.dec[k];
            c->type[i] = SP_SRC_STAR;
            c->type_given[i] = 1;
            for (int b = 0; b < nb; b++) c->flux_init[i * nb + b] = inj.flux_init[k * nb + b];
            c->ell[i] = c->theta[i] = c->re[i] = c->sersic_n[i] = NAN;
            c->excl[i] = 0;
            c->cell[i] = c->patch[i] = -1;
            c->line[i] = inj.ref_line[k];
            c->injected[i] = 1;
        }
        long nbad = 0;
        SP_TRY(sp_wcs_sky2pix(p->wcs, inj.n, c->ra + n0, c->dec + n0, c->x + n0, c->y + n0, &nbad));
        for (long i = n0; i < n1; i++) {
            double x = c->x[i], y = c->y[i], m = o->crop_margin;
            if (!isfinite(x) || !isfinite(y) || x < -0.5 || y < -0.5 || x >= p->nx - 0.5 || y >= p->ny - 0.5)
                c->excl[i] |= SP_EXCL_OUTSIDE;
            else if (x < m - 0.5 || y < m - 0.5 || x >= p->nx - 0.5 - m || y >= p->ny - 0.5 - m)
                c->excl[i] |= SP_EXCL_CROP;
        }
        c->n = n1;
        c->ninjected = inj.n;
    }
    if (sp_mpi_rank() == 0)
        SP_INFO("zp.inject_gaia_sources: %ld reference star(s) without a catalog source appended as STARs "
                "(INJECTED = 1)", inj.n);
cleanup:
    if (status != SP_OK) sp_err_context("zp.inject_gaia_sources (%s)", o->reference_catalog);
    sp_zp_inject_free(&inj);
    sp_zp_refcat_free(&ref);
    free(bands);
    return status;
}

/* ---- public --------------------------------------------------------------------- */

int sp_plan_build(const sp_plan_opts *o, MPI_Comm comm, sp_plan *p)
{
    int status = SP_OK;
    memset(p, 0, sizeof *p);
    p->opts = *o;
    uint64_t cat_hash = 0;
    sp_prof_push("frames");
    status = build_frames(o, comm, p);
    sp_prof_pop();
    SP_TRY(status);
    sp_prof_push("catalog");
    status = build_catalog(o, p, &cat_hash);
    sp_prof_pop();
    SP_TRY(sp_mpi_agree(status, comm));
    SP_TRY(check_reference(o, p, comm));
    if (o->inject_reference && o->reference_catalog[0]) SP_TRY(sp_mpi_agree(inject_reference(o, p), comm));
    SP_TRY(sp_mpi_agree(build_grid(o, p), comm));
    uint64_t h = 0xcbf29ce484222325ULL;
    for (int i = 0; i < p->nframes; i++) {
        const sp_frame *f = &p->frames[i];
        h = fnv1a(h, f->path, strlen(f->path));
        h = fnv1a(h, &f->file_size, sizeof f->file_size);
        h = fnv1a(h, &f->hdr_checksum, sizeof f->hdr_checksum);
    }
    p->inputs_hash = fnv1a(h, &cat_hash, sizeof cat_hash);
cleanup:
    return status;
}

void sp_plan_free(sp_plan *p)
{
    sp_catalog *c = &p->cat;
    free(c->id); free(c->ra); free(c->dec); free(c->x); free(c->y); free(c->type); free(c->type_given);
    free(c->flux_init); free(c->ell); free(c->theta); free(c->re); free(c->sersic_n); free(c->excl);
    free(c->cell); free(c->patch); free(c->line); free(c->idbuf); free(c->injected); free(c->idbuf_inj);
    free(p->frames);
    free(p->bands);
    free(p->band_nframes);
    free(p->wcs_header);
    sp_wcs_free(&p->wcs);
    free(p->cells);
    free(p->patches);
    free(p->patch_src);
    free(p->patch_xsrc);
    memset(p, 0, sizeof *p);
}

static void human_bytes(double b, char *buf, size_t n)
{
    if (b >= 1 << 30) snprintf(buf, n, "%.2f GiB", b / (1 << 30));
    else if (b >= 1 << 20) snprintf(buf, n, "%.1f MiB", b / (1 << 20));
    else snprintf(buf, n, "%.0f KiB", b / 1024);
}

void sp_plan_print(const sp_plan *p, FILE *f, int verbose)
{
    const sp_catalog *c = &p->cat;
    fprintf(f, "Tile: %ldx%ld pixels, %.3f arcsec/pixel, %d frame(s) in %d band(s)\n", p->nx, p->ny, p->pixscale,
            p->nframes, p->nbands);
    fprintf(f, "%-4s %-10s %-8s %8s %8s %7s %10s %9s %8s  %s\n", "#", "band", "ZP_AUTO", "SKYSIG", "EGAIN", "scale",
            "SATURATE", "median", "WCSoff", "path");
    for (int i = 0; i < p->nframes; i++) {
        const sp_frame *fr = &p->frames[i];
        fprintf(f, "%-4d %-10s %-8.3f %8.3g %8.3g %7.4f %10.4g %9.4g %8.2g  %s\n", i, fr->band, fr->zp_auto, fr->skysig,
                fr->egain, fr->scale, fr->saturate, fr->median, fr->wcs_offset_pix, fr->path);
    }
    long nexcl[4] = {0, 0, 0, 0};
    for (long i = 0; i < c->n; i++) {
        if (c->excl[i] & SP_EXCL_NANCOORD) nexcl[0]++;
        if (c->excl[i] & SP_EXCL_OUTSIDE) nexcl[1]++;
        if (c->excl[i] & SP_EXCL_CROP) nexcl[2]++;
    }
    long ntype[SP_SRC_NTYPES] = {0};
    for (long i = 0; i < c->n; i++)
        if (c->type[i] >= 0 && c->type[i] < SP_SRC_NTYPES) ntype[c->type[i]]++;
    fprintf(f, "Catalog: %ld sources (STAR %ld, EXP %ld, DEV %ld, SERSIC %ld); excluded: %ld NaN coordinates, %ld "
               "outside the tile, %ld in the crop margin; %ld active\n",
            c->n, ntype[0], ntype[1], ntype[2], ntype[3], nexcl[0], nexcl[1], nexcl[2], p->nsrc_active);
    char mem[32];
    human_bytes(p->max_cell_mem, mem, sizeof mem);
    fprintf(f, "Grid: %dx%d ePSF cells x %dx%d patches, halo %d pixels; %d/%d cells and %d/%d patches active; "
               "largest cell needs ~%s\n",
            p->opts.epsf_ngrid, p->opts.epsf_ngrid, p->opts.ngrid, p->opts.ngrid, p->halo, p->ncells_active,
            p->ncells, p->npatches_active, p->npatches, mem);
    if (p->fit_thread_mem > 0) {
        human_bytes(p->fit_thread_mem, mem, sizeof mem);
        const sp_fit_reserve *z = &p->fit_reserve;
        fprintf(f, "Fit workspace: ~%s per thread, reserved once (largest patch: %d sources, %zu pixels x bands; "
                   "largest group %d, component %d)\n",
                mem, z->nsrc, z->pixels, z->group_n, z->comp_n);
    }
    if (verbose) {
        fprintf(f, "%-5s %-7s %-23s %-23s %7s %9s %10s\n", "cell", "(ix,iy)", "base [x0,x1)x[y0,y1)", "ROI", "sources",
                "cost", "memory");
        for (int k = 0; k < p->ncells; k++) {
            const sp_cell *ce = &p->cells[k];
            char base[40], roi[40];
            snprintf(base, sizeof base, "[%ld,%ld)x[%ld,%ld)", ce->bx0, ce->bx1, ce->by0, ce->by1);
            snprintf(roi, sizeof roi, "[%ld,%ld)x[%ld,%ld)", ce->rx0, ce->rx1, ce->ry0, ce->ry1);
            human_bytes(ce->mem_bytes, mem, sizeof mem);
            fprintf(f, "%-5d (%d,%d)   %-23s %-23s %7ld %9.3f %10s%s\n", ce->id, ce->ix, ce->iy, base, roi, ce->nsrc,
                    ce->cost, mem, ce->active ? "" : "  (skipped: empty)");
        }
    }
}

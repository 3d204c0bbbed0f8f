/* zp.c — the zero-point stage on a store: reference catalog, selection,
 * per-band estimate, /zp, and the MAG/MAGERR columns (see sp_zp.h). */
#include "surveyproc/sp_zp.h"
#include "zp_internal.h"
#include "surveyproc/sp_csv.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_log.h"
#include "surveyproc/sp_prof.h"

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#define MAGERR_K 1.0857362047581294 /* 2.5 / ln 10 */
#define ZP_CHUNK 65536

/* ---- reference catalog -------------------------------------------------------- */

void sp_zp_refcat_free(sp_zp_refcat *r)
{
    if (!r) return;
    free(r->path);
    free(r->ra);
    free(r->dec);
    free(r->line);
    free(r->mag);
    free(r->magerr);
    free(r->has_band);
    free(r->has_err);
    memset(r, 0, sizeof *r);
}

int sp_zp_refcat_read(const char *path, const char *const *bands, int nbands, sp_zp_refcat *r)
{
    int status = SP_OK;
    sp_csv *t = NULL;
    double *ra = NULL, *dec = NULL, *col = NULL;
    memset(r, 0, sizeof *r);
    SP_CHECK(path && (nbands == 0 || bands) && nbands >= 0, SP_ERR_INTERNAL, "sp_zp_refcat_read: bad arguments");
    status = sp_csv_read(path, &t);
    if (status != SP_OK) {
        sp_err_context("reference catalog (inputs.reference_catalog)");
        goto cleanup;
    }
    int cra = sp_csv_col(t, "RA"), cdec = sp_csv_col(t, "DEC");
    SP_CHECK(cra >= 0 && cdec >= 0, SP_ERR_INPUT,
             "%s:1: the reference catalog needs RA and DEC columns (degrees); it has no %s column", path,
             cra < 0 ? "RA" : "DEC");
    long nr = t->nrow;
    SP_ALLOC(ra, nr);
    SP_ALLOC(dec, nr);
    SP_ALLOC(col, nr);
    SP_TRY(sp_csv_col_double(t, cra, ra));
    SP_TRY(sp_csv_col_double(t, cdec, dec));
    r->nbands = nbands;
    SP_ALLOC(r->path, strlen(path) + 1);
    strcpy(r->path, path);
    SP_ALLOC(r->has_band, nbands);
    SP_ALLOC(r->has_err, nbands);
    long n = 0;
    for (long i = 0; i < nr; i++) n += isfinite(ra[i]) && isfinite(dec[i]) && fabs(dec[i]) <= 90;
    r->n = n;
    r->nskipped = nr - n;
    SP_ALLOC(r->ra, n);
    SP_ALLOC(r->dec, n);
    SP_ALLOC(r->line, n);
    SP_ALLOC(r->mag, n * (nbands > 0 ? nbands : 1));
    SP_ALLOC(r->magerr, n * (nbands > 0 ? nbands : 1));
    for (long i = 0, j = 0; i < nr; i++) {
        if (!(isfinite(ra[i]) && isfinite(dec[i]) && fabs(dec[i]) <= 90)) continue;
        r->ra[j] = ra[i];
        r->dec[j] = dec[i];
        r->line[j] = t->lines[i];
        j++;
    }
    for (int b = 0; b < nbands; b++) {
        char name[SP_ZP_BAND_MAX + 16];
        snprintf(name, sizeof name, "mag_%s", bands[b]);
        int cm = sp_csv_col(t, name);
        snprintf(name, sizeof name, "magerr_%s", bands[b]);
        int ce = sp_csv_col(t, name);
        if (ce < 0) {
            snprintf(name, sizeof name, "e_mag_%s", bands[b]);
            ce = sp_csv_col(t, name);
        }
        r->has_band[b] = cm >= 0;
        r->has_err[b] = cm >= 0 && ce >= 0;
        for (long j = 0; j < n; j++) {
            r->mag[j * nbands + b] = NAN;
            r->magerr[j * nbands + b] = 0;
        }
        if (cm < 0) continue;
        SP_TRY(sp_csv_col_double(t, cm, col));
        for (long i = 0, j = 0; i < nr; i++)
            if (isfinite(ra[i]) && isfinite(dec[i]) && fabs(dec[i]) <= 90) r->mag[(j++) * nbands + b] = col[i];
        if (ce < 0) continue;
        SP_TRY(sp_csv_col_double(t, ce, col));
        for (long i = 0, j = 0; i < nr; i++)
            if (isfinite(ra[i]) && isfinite(dec[i]) && fabs(dec[i]) <= 90) {
                /* blank: no error known (0); negative: garbage, the magnitude is not used */
                double e = col[i];
                r->magerr[j * nbands + b] = isfinite(e) ? e : 0;
                if (e < 0) r->mag[j * nbands + b] = NAN;
                j++;
            }
    }
cleanup:
    sp_csv_free(&t);
    free(ra);
    free(dec);
    free(col);
    if (status != SP_OK) sp_zp_refcat_free(r);
    return status;
}

/* ---- results -------------------------------------------------------------------- */

void sp_zp_result_free(sp_zp_result *res)
{
    if (!res) return;
    free(res->band);
    memset(res, 0, sizeof *res);
}

const char *sp_zp_flag_text(int flag)
{
    if (flag & SP_ZP_F_NO_REF_BAND) return "no mag column in the reference catalog";
    if (flag & SP_ZP_F_NO_MATCH) return "no reference star matched";
    if (flag & SP_ZP_F_FEW_STARS) return "too few stars";
    if (flag & SP_ZP_F_HIGH_CLIP) return "more than half clipped";
    return "ok";
}

void sp_zp_result_print(FILE *f, const sp_zp_result *res)
{
    fprintf(f, "Zero points (%ld reference stars, %ld matched; mag = ZP - 2.5 log10(FLUX_<band>_fit)):\n",
            res->nref, res->nmatched);
    fprintf(f, "  %-10s %9s %8s %8s %6s %7s %8s  %s\n", "band", "ZP", "error", "scatter", "used", "clipped",
            "selected", "flag");
    for (int b = 0; b < res->nbands; b++) {
        const sp_zp_band_result *r = &res->band[b];
        fprintf(f, "  %-10s %9.4f %8.4f %8.4f %6ld %7ld %8ld  %s\n", r->band, r->zp, r->zp_err, r->scatter, r->nused,
                r->nclipped, r->nselected, sp_zp_flag_text(r->flag));
    }
}

/* ---- /zp tables ----------------------------------------------------------------- */

typedef struct {
    char band[SP_ZP_BAND_MAX];
    double zp, zp_err, scatter, sigma_int, n_eff;
    int64_t nmatched, nselected, nstars_used, nstars_clipped;
    int64_t nrej_converged, nrej_excluded, nrej_isolation, nrej_magrange, nrej_flux;
    int32_t niter, flag;
} band_row;

#define C(n, t, u, d) {n, t, 0, u, d, 0, 0}
static const sp_h5_col band_cols[] = {
    {"band", SP_H5_STR, SP_ZP_BAND_MAX, "", "band (FILTER)", 0, 0},
    C("zp", SP_H5_F64, "mag", "zero point: mag = zp - 2.5 log10(FLUX_<band>_fit); NaN when flagged 1 or 2"),
    C("zp_err", SP_H5_F64, "mag", "1-sigma error of zp: 1.2533 x weighted-MAD sigma / sqrt(n_eff)"),
    C("scatter", SP_H5_F64, "mag", "1.4826 x MAD of the used stars' zp_i"),
    C("sigma_int", SP_H5_F64, "mag", "scatter beyond the stars' errors (added to their errors in the weights)"),
    C("n_eff", SP_H5_F64, "", "effective number of stars (sum w)^2 / sum w^2"),
    C("nmatched", SP_H5_I64, "", "reference stars matched one-to-one to catalog sources"),
    C("nselected", SP_H5_I64, "", "matched stars passing every cut in this band"),
    C("nstars_used", SP_H5_I64, "", "selected stars kept by the clipping"),
    C("nstars_clipped", SP_H5_I64, "", "selected stars removed by the clipping"),
    C("nrej_converged", SP_H5_I64, "", "matched stars rejected: CONVERGED != 1"),
    C("nrej_excluded", SP_H5_I64, "", "matched stars rejected: excluded_any (saturation, crop, ...)"),
    C("nrej_isolation", SP_H5_I64, "", "matched stars rejected: a neighbour within isolation_radius_arcsec"),
    C("nrej_magrange", SP_H5_I64, "", "matched stars rejected: reference mag blank or outside the range"),
    C("nrej_flux", SP_H5_I64, "", "matched stars rejected: flux or its error not usable"),
    C("niter", SP_H5_I32, "", "clipping iterations that removed stars"),
    C("flag", SP_H5_I32, "", "0 ok; bits: 1 too few stars (no ZP), 2 no mag column, 4 over half clipped"),
};

typedef struct {
    char band[SP_ZP_BAND_MAX];
    int32_t band_index;
    int64_t row, ref_line;
    double ra, dec, sep_arcsec, mag_ref, magerr_ref, flux, fluxerr, zp, zp_err;
    uint8_t clipped;
} star_row;

static const sp_h5_col star_cols[] = {
    {"band", SP_H5_STR, SP_ZP_BAND_MAX, "", "band", 0, 0},
    C("band_index", SP_H5_I32, "", "index of the band in the store's bands attribute"),
    C("row", SP_H5_I64, "", "row of the source in /catalog (0-based)"),
    C("ref_line", SP_H5_I64, "", "line of the star in the reference CSV (1-based)"),
    C("ra", SP_H5_F64, "deg", "catalog position used for matching (RA_FIT, else RA)"),
    C("dec", SP_H5_F64, "deg", "catalog position used for matching (DEC_FIT, else DEC)"),
    C("sep_arcsec", SP_H5_F64, "arcsec", "distance to the reference star"),
    C("mag_ref", SP_H5_F64, "mag(AB)", "reference magnitude"),
    C("magerr_ref", SP_H5_F64, "mag", "reference magnitude error (0 if the catalog has none)"),
    C("flux", SP_H5_F64, "flux(zp_ref)", "FLUX_<band>_fit"),
    C("fluxerr", SP_H5_F64, "flux(zp_ref)", "FLUXERR_<band>_fit"),
    C("zp_i", SP_H5_F64, "mag", "this star's zero point mag_ref + 2.5 log10(flux)"),
    C("zp_err_i", SP_H5_F64, "mag", "its error sqrt((1.0857 fluxerr/f_ref)^2 + magerr_ref^2), f_ref the flux mag_ref predicts"),
    C("clipped", SP_H5_U8, "", "1 if removed by the clipping (or the band has no ZP), 0 if used"),
};
#undef C

static int check_layouts(void)
{
    int status = SP_OK;
    size_t off[32], rs;
    static const size_t boff[] = {offsetof(band_row, band), offsetof(band_row, zp), offsetof(band_row, zp_err),
                                  offsetof(band_row, scatter), offsetof(band_row, sigma_int),
                                  offsetof(band_row, n_eff), offsetof(band_row, nmatched),
                                  offsetof(band_row, nselected), offsetof(band_row, nstars_used),
                                  offsetof(band_row, nstars_clipped), offsetof(band_row, nrej_converged),
                                  offsetof(band_row, nrej_excluded), offsetof(band_row, nrej_isolation),
                                  offsetof(band_row, nrej_magrange), offsetof(band_row, nrej_flux),
                                  offsetof(band_row, niter), offsetof(band_row, flag)};
    static const size_t soff[] = {offsetof(star_row, band), offsetof(star_row, band_index),
                                  offsetof(star_row, row), offsetof(star_row, ref_line), offsetof(star_row, ra),
                                  offsetof(star_row, dec), offsetof(star_row, sep_arcsec),
                                  offsetof(star_row, mag_ref), offsetof(star_row, magerr_ref),
                                  offsetof(star_row, flux), offsetof(star_row, fluxerr), offsetof(star_row, zp),
                                  offsetof(star_row, zp_err), offsetof(star_row, clipped)};
    int nb = (int)(sizeof band_cols / sizeof band_cols[0]), ns = (int)(sizeof star_cols / sizeof star_cols[0]);
    SP_TRY(sp_h5_table_layout(band_cols, nb, off, &rs));
    SP_CHECK(rs == sizeof(band_row) && !memcmp(off, boff, sizeof boff), SP_ERR_INTERNAL,
             "band_row does not match the /zp/bands column spec");
    SP_TRY(sp_h5_table_layout(star_cols, ns, off, &rs));
    SP_CHECK(rs == sizeof(star_row) && !memcmp(off, soff, sizeof soff), SP_ERR_INTERNAL,
             "star_row does not match the /zp/stars column spec");
cleanup:
    return status;
}

/* ---- helpers -------------------------------------------------------------------- */

/* Split the store's "bands" attribute ("g,r,i") into names. */
int sp_zp_split_bands(const char *s, char (**out)[SP_ZP_BAND_MAX], int *nb)
{
    int status = SP_OK;
    char (*b)[SP_ZP_BAND_MAX] = NULL;
    int n = s[0] ? 1 : 0;
    for (const char *p = s; *p; p++) n += *p == ',';
    SP_ALLOC(b, n > 0 ? n : 1);
    int k = 0;
    const char *p = s;
    while (k < n) {
        const char *e = strchr(p, ',');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        SP_CHECK(len > 0 && len < SP_ZP_BAND_MAX, SP_ERR_INPUT, "store attribute bands = '%s': bad band name", s);
        memcpy(b[k], p, len);
        b[k][len] = '\0';
        k++;
        p = e ? e + 1 : p + len;
    }
    *out = b;
    *nb = n;
    b = NULL;
cleanup:
    free(b);
    return status;
}

int sp_zp_has_col(const sp_h5_table_info *t, const char *name)
{
    for (int c = 0; c < t->ncol; c++)
        if (!strcmp(t->cols[c].name, name)) return 1;
    return 0;
}

/* A column spec read/written as float64 (HDF5 converts the stored type). */
void sp_zp_f64_col(sp_h5_col *c, const char *name)
{
    memset(c, 0, sizeof *c);
    c->name = name;
    c->type = SP_H5_F64;
}

static int cmp_long(const void *a, const void *b)
{
    long x = *(const long *)a, y = *(const long *)b;
    return (x > y) - (x < y);
}

/* ---- the stage ------------------------------------------------------------------ */

int sp_zp_calibrate(sp_h5 *h, const sp_cfg_zp *z, const char *refcat_path, sp_zp_result *res_out)
{
    int status = SP_OK;
    double t0 = sp_wtime();
    char *bandstr = NULL;
    char (*bands)[SP_ZP_BAND_MAX] = NULL;
    const char **bandp = NULL;
    char (*names)[SP_ZP_BAND_MAX + 16] = NULL;
    sp_h5_table_info info = {0};
    sp_zp_refcat ref = {0};
    sp_zp_index *cidx = NULL, *ridx = NULL;
    double *ra = NULL, *dec = NULL, *posbuf = NULL, *sep = NULL, *mrow = NULL, *zpi = NULL, *erri = NULL;
    double *smag = NULL, *smagerr = NULL, *sflux = NULL, *sfluxerr = NULL;
    double *inbuf = NULL, *outbuf = NULL;
    long *cat_of_ref = NULL, *mref = NULL, *mcat = NULL, *cand = NULL;
    unsigned char *isolated = NULL, *clip = NULL;
    sp_h5_col *spec = NULL;
    star_row *stars = NULL;
    band_row *brow = NULL;
    sp_zp_result res = {0};
    int nb = 0;
    const char *store = sp_h5_path(h);

    SP_CHECK(h && z && refcat_path, SP_ERR_INTERNAL, "sp_zp_calibrate: NULL argument");
    SP_CHECK(!sp_h5_parallel(h), SP_ERR_STATE,
             "%s: zero points are computed by one process: open the store with MPI_COMM_SELF", store);
    SP_CHECK(sp_h5_writable(h), SP_ERR_STATE, "%s: the store must be opened writable for the zp stage", store);
    SP_TRY(check_layouts());

    /* bands and the catalog's columns */
    status = sp_h5_attr_get_str(h, "/", "bands", &bandstr);
    if (status != SP_OK) {
        sp_err_context("%s: not a surveyproc store (no root attribute 'bands')", store);
        goto cleanup;
    }
    SP_TRY(sp_zp_split_bands(bandstr, &bands, &nb));
    double zp_ref = NAN;
    if (sp_h5_attr_get_double(h, "/", "zp_ref", &zp_ref) != SP_OK) sp_err_clear();
    SP_TRY(sp_h5_table_describe(h, "/catalog", &info));
    long ncat = info.nrows;
    SP_ALLOC(bandp, nb > 0 ? nb : 1);
    SP_ALLOC(names, 4 * (nb > 0 ? nb : 1));
    for (int b = 0; b < nb; b++) {
        bandp[b] = bands[b];
        snprintf(names[4 * b], sizeof names[0], "FLUX_%s_fit", bands[b]);
        snprintf(names[4 * b + 1], sizeof names[0], "FLUXERR_%s_fit", bands[b]);
        snprintf(names[4 * b + 2], sizeof names[0], "MAG_%s_fit", bands[b]);
        snprintf(names[4 * b + 3], sizeof names[0], "MAGERR_%s_fit", bands[b]);
    }
    {
        const char *fixed[] = {"RA", "DEC", "CONVERGED", "excluded_any"};
        for (int k = 0; k < 4; k++)
            SP_CHECK(sp_zp_has_col(&info, fixed[k]), SP_ERR_INPUT, "%s: /catalog has no column %s (not a surveyproc store?)",
                     store, fixed[k]);
        for (int k = 0; k < 4 * nb; k++)
            SP_CHECK(sp_zp_has_col(&info, names[k]), SP_ERR_INPUT,
                     "%s: /catalog has no column %s although the store lists band %s", store, names[k],
                     bands[k / 4]);
    }
    int have_fitpos = sp_zp_has_col(&info, "RA_FIT") && sp_zp_has_col(&info, "DEC_FIT");

    /* positions: fitted where finite, else input */
    SP_ALLOC(ra, ncat);
    SP_ALLOC(dec, ncat);
    SP_ALLOC(spec, 4 * nb + 4);
    {
        const char *pn[] = {"RA", "DEC", "RA_FIT", "DEC_FIT"};
        int np = have_fitpos ? 4 : 2;
        for (int k = 0; k < np; k++) sp_zp_f64_col(&spec[k], pn[k]);
        SP_ALLOC(posbuf, (size_t)ZP_CHUNK * 4);
        for (long i0 = 0; i0 < ncat; i0 += ZP_CHUNK) {
            long m = ncat - i0 < ZP_CHUNK ? ncat - i0 : ZP_CHUNK;
            SP_TRY(sp_h5_table_read(h, "/catalog", spec, np, i0, m, posbuf));
            for (long r = 0; r < m; r++) {
                const double *p = posbuf + r * np;
                int fit = np == 4 && isfinite(p[2]) && isfinite(p[3]);
                ra[i0 + r] = fit ? p[2] : p[0];
                dec[i0 + r] = fit ? p[3] : p[1];
            }
        }
    }

    /* reference catalog, indexes, one-to-one match */
    SP_TRY(sp_zp_refcat_read(refcat_path, bandp, nb, &ref));
    if (ref.nskipped) SP_WARN("%s: %ld row(s) without finite RA/DEC ignored", refcat_path, ref.nskipped);
    double cell = z->match_radius_arcsec > z->isolation_radius_arcsec ? z->match_radius_arcsec
                                                                        : z->isolation_radius_arcsec;
    SP_TRY(sp_zp_index_build(ra, dec, ncat, cell, &cidx));
    SP_TRY(sp_zp_index_build(ref.ra, ref.dec, ref.n, z->match_radius_arcsec, &ridx));
    SP_ALLOC(cat_of_ref, ref.n);
    SP_ALLOC(sep, ref.n);
    long nmatch = 0;
    SP_TRY(sp_zp_match(cidx, ra, dec, ridx, ref.ra, ref.dec, ref.n, z->match_radius_arcsec, cat_of_ref, sep,
                       &nmatch));

    /* matched pairs in catalog-row order (the store reads them as a row list) */
    SP_ALLOC(mcat, nmatch);
    SP_ALLOC(mref, nmatch);
    {
        long *pairs = NULL;
        SP_ALLOC(pairs, 2 * (nmatch > 0 ? nmatch : 1));
        long k = 0;
        for (long j = 0; j < ref.n; j++)
            if (cat_of_ref[j] >= 0) {
                pairs[2 * k] = cat_of_ref[j];
                pairs[2 * k + 1] = j;
                k++;
            }
        qsort(pairs, (size_t)nmatch, 2 * sizeof *pairs, cmp_long);
        for (k = 0; k < nmatch; k++) {
            mcat[k] = pairs[2 * k];
            mref[k] = pairs[2 * k + 1];
        }
        free(pairs);
    }
    SP_ALLOC(isolated, nmatch);
    for (long k = 0; k < nmatch; k++)
        isolated[k] = z->isolation_radius_arcsec <= 0 ||
                      sp_zp_index_count(cidx, ra[mcat[k]], dec[mcat[k]], z->isolation_radius_arcsec, mcat[k]) == 0;

    /* what the selection needs from the matched rows */
    int nsel = 2 + 2 * nb;
    sp_zp_f64_col(&spec[0], "CONVERGED");
    sp_zp_f64_col(&spec[1], "excluded_any");
    for (int b = 0; b < nb; b++) {
        sp_zp_f64_col(&spec[2 + 2 * b], names[4 * b]);
        sp_zp_f64_col(&spec[3 + 2 * b], names[4 * b + 1]);
    }
    SP_ALLOC(mrow, (size_t)(nmatch > 0 ? nmatch : 1) * nsel);
    SP_TRY(sp_h5_table_read_rows(h, "/catalog", spec, nsel, mcat, nmatch, mrow));

    /* no overlap at all: one clear warning for the run (the bands are flagged below) */
    if (nmatch == 0) {
        if (ref.n == 0)
            SP_WARN("zp: the reference catalog %s has no star with a finite RA/DEC: no zero points (/zp flag "
                    "'no reference star matched', MAG columns NaN)",
                    refcat_path);
        else
            SP_WARN("zp: none of the %ld star(s) of the reference catalog %s lies within zp.match_radius_arcsec = "
                    "%g of a catalog source (the reference catalog does not overlap the tile?): no zero points "
                    "(/zp flag 'no reference star matched', MAG columns NaN)",
                    ref.n, refcat_path, z->match_radius_arcsec);
    }

    /* per band: cuts, estimate */
    res.nbands = nb;
    res.ncat = ncat;
    res.nref = ref.n;
    res.nmatched = nmatch;
    SP_ALLOC(res.band, nb > 0 ? nb : 1);
    SP_ALLOC(stars, (size_t)(nmatch > 0 ? nmatch : 1) * (nb > 0 ? nb : 1));
    SP_ALLOC(zpi, nmatch > 0 ? nmatch : 1);
    SP_ALLOC(erri, nmatch > 0 ? nmatch : 1);
    SP_ALLOC(cand, nmatch > 0 ? nmatch : 1);
    SP_ALLOC(smag, nmatch > 0 ? nmatch : 1);
    SP_ALLOC(smagerr, nmatch > 0 ? nmatch : 1);
    SP_ALLOC(sflux, nmatch > 0 ? nmatch : 1);
    SP_ALLOC(sfluxerr, nmatch > 0 ? nmatch : 1);
    SP_ALLOC(clip, nmatch > 0 ? nmatch : 1);
    long nstars = 0;
    for (int b = 0; b < nb; b++) {
        sp_zp_band_result *br = &res.band[b];
        snprintf(br->band, sizeof br->band, "%s", bands[b]);
        br->zp = br->zp_err = br->scatter = br->sigma_int = br->n_eff = NAN;
        br->nmatched = nmatch;
        if (!ref.has_band[b]) {
            br->flag = SP_ZP_F_NO_REF_BAND;
            SP_WARN("zp %s: the reference catalog %s has no mag_%s column: no zero point, MAG_%s_fit stays NaN",
                    bands[b], refcat_path, bands[b], bands[b]);
            continue;
        }
        long nc = 0;
        for (long k = 0; k < nmatch; k++) {
            const double *m = mrow + k * nsel;
            long j = mref[k];
            double mag = ref.mag[j * nb + b], merr = ref.magerr[j * nb + b];
            double f = m[2 + 2 * b], fe = m[3 + 2 * b];
            if (m[0] != 1) { br->nrej_converged++; continue; }
            if (m[1] != 0) { br->nrej_excluded++; continue; }
            if (!isolated[k]) { br->nrej_isolation++; continue; }
            if (!(isfinite(mag) && mag >= z->gaia_mag_min && mag <= z->gaia_mag_max)) { br->nrej_magrange++; continue; }
            if (!(isfinite(f) && f > 0 && isfinite(fe) && fe >= 0)) { br->nrej_flux++; continue; }
            if (!(fe > 0 || merr > 0)) { br->nrej_flux++; continue; } /* no error at all: cannot weight it */
            smag[nc] = mag;
            smagerr[nc] = merr;
            sflux[nc] = f;
            sfluxerr[nc] = fe;
            cand[nc++] = k;
        }
        br->nselected = nc;
        sp_zp_estimate est;
        SP_TRY(sp_zp_band_estimate(smag, smagerr, sflux, sfluxerr, nc, z->clip_sigma, z->clip_max_iters,
                                   z->min_stars, zpi, erri, clip, &est));
        br->zp = est.zp;
        br->zp_err = est.zp_err;
        br->scatter = est.scatter;
        br->sigma_int = est.sigma_int;
        br->n_eff = est.n_eff;
        br->nused = est.n_used;
        br->nclipped = est.n_clipped;
        br->niter = est.niter;
        br->flag = est.flag;
        if (!(br->flag & SP_ZP_F_FEW_STARS) && 2 * est.n_clipped > est.n_in) br->flag |= SP_ZP_F_HIGH_CLIP;
        if (nmatch == 0) br->flag |= SP_ZP_F_NO_MATCH;
        for (long c = 0; c < nc; c++) {
            long k = cand[c], j = mref[k];
            const double *m = mrow + k * nsel;
            star_row *s = &stars[nstars++];
            memset(s, 0, sizeof *s);
            snprintf(s->band, sizeof s->band, "%s", bands[b]);
            s->band_index = b;
            s->row = mcat[k];
            s->ref_line = ref.line[j];
            s->ra = ra[mcat[k]];
            s->dec = dec[mcat[k]];
            s->sep_arcsec = sep[j];
            s->mag_ref = ref.mag[j * nb + b];
            s->magerr_ref = ref.magerr[j * nb + b];
            s->flux = m[2 + 2 * b];
            s->fluxerr = m[3 + 2 * b];
            s->zp = zpi[c];
            s->zp_err = erri[c];
            s->clipped = (uint8_t)(clip[c] || (br->flag & SP_ZP_F_FEW_STARS));
        }
        if ((br->flag & SP_ZP_F_FEW_STARS) && nmatch > 0)
            SP_WARN("zp %s: %ld usable star(s) (zp.min_stars = %d; %ld matched, %ld selected, %ld clipped; rejected: "
                    "%ld not converged, %ld excluded, %ld not isolated, %ld outside mag %.1f..%.1f, %ld bad flux): "
                    "no zero point, MAG_%s_fit stays NaN",
                    bands[b], est.n_used, z->min_stars, nmatch, nc, est.n_clipped, br->nrej_converged,
                    br->nrej_excluded, br->nrej_isolation, br->nrej_magrange, z->gaia_mag_min, z->gaia_mag_max,
                    br->nrej_flux, bands[b]);
        else if (!(br->flag & SP_ZP_F_FEW_STARS))
            SP_INFO("zp %s: ZP %.4f +- %.4f mag from %ld star(s) (%ld clipped of %ld selected, %ld matched; scatter "
                    "%.4f)%s",
                    bands[b], br->zp, br->zp_err, br->nused, br->nclipped, nc, nmatch, br->scatter,
                    br->flag & SP_ZP_F_HIGH_CLIP ? "; WARNING: over half of the stars clipped" : "");
    }
    res.nstars = nstars;

    /* replace /zp */
    SP_TRY(sp_h5_delete(h, "/zp"));
    SP_TRY(sp_h5_group_create(h, "/zp"));
    SP_ALLOC(brow, nb > 0 ? nb : 1);
    for (int b = 0; b < nb; b++) {
        const sp_zp_band_result *r = &res.band[b];
        band_row *w = &brow[b];
        snprintf(w->band, sizeof w->band, "%s", r->band);
        w->zp = r->zp;
        w->zp_err = r->zp_err;
        w->scatter = r->scatter;
        w->sigma_int = r->sigma_int;
        w->n_eff = r->n_eff;
        w->nmatched = r->nmatched;
        w->nselected = r->nselected;
        w->nstars_used = r->nused;
        w->nstars_clipped = r->nclipped;
        w->nrej_converged = r->nrej_converged;
        w->nrej_excluded = r->nrej_excluded;
        w->nrej_isolation = r->nrej_isolation;
        w->nrej_magrange = r->nrej_magrange;
        w->nrej_flux = r->nrej_flux;
        w->niter = r->niter;
        w->flag = r->flag;
    }
    int nbc = (int)(sizeof band_cols / sizeof band_cols[0]), nsc = (int)(sizeof star_cols / sizeof star_cols[0]);
    SP_TRY(sp_h5_table_create(h, "/zp/bands", band_cols, nbc, nb));
    SP_TRY(sp_h5_table_write(h, "/zp/bands", band_cols, nbc, 0, nb, brow));
    SP_TRY(sp_h5_table_create(h, "/zp/stars", star_cols, nsc, nstars));
    SP_TRY(sp_h5_table_write(h, "/zp/stars", star_cols, nsc, 0, nstars, stars));
    SP_TRY(sp_h5_attr_set_str(h, "/zp", "method",
                              "one-to-one sky match; per star zp_i = mag_ref + 2.5 log10(FLUX_fit); iterative clip "
                              "|zp_i - median| > clip_sigma * max(1.4826 MAD, err_i); weighted median with weights "
                              "1/(err_i^2 + sigma_int^2); error 1.2533 * weighted-MAD sigma / sqrt(n_eff)"));
    SP_TRY(sp_h5_attr_set_str(h, "/zp", "reference_catalog", refcat_path));
    SP_TRY(sp_h5_attr_set_double(h, "/zp", "match_radius_arcsec", z->match_radius_arcsec));
    SP_TRY(sp_h5_attr_set_double(h, "/zp", "isolation_radius_arcsec", z->isolation_radius_arcsec));
    SP_TRY(sp_h5_attr_set_double(h, "/zp", "mag_min", z->gaia_mag_min));
    SP_TRY(sp_h5_attr_set_double(h, "/zp", "mag_max", z->gaia_mag_max));
    SP_TRY(sp_h5_attr_set_double(h, "/zp", "clip_sigma", z->clip_sigma));
    SP_TRY(sp_h5_attr_set_long(h, "/zp", "clip_max_iters", z->clip_max_iters));
    SP_TRY(sp_h5_attr_set_long(h, "/zp", "min_stars", z->min_stars));
    SP_TRY(sp_h5_attr_set_double(h, "/zp", "zp_ref", zp_ref));
    SP_TRY(sp_h5_attr_set_long(h, "/zp", "nref", ref.n));
    SP_TRY(sp_h5_attr_set_long(h, "/zp", "nmatched", nmatch));
    {
        char when[64];
        time_t now = time(NULL);
        struct tm tm;
        gmtime_r(&now, &tm);
        strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", &tm);
        SP_TRY(sp_h5_attr_set_str(h, "/zp", "created_utc", when));
    }
    SP_TRY(sp_h5_attr_set_long(h, "/zp", "complete", 0));

    /* MAG / MAGERR of every row, in chunks */
    {
        sp_h5_col *in = spec, *out = spec + 2 * nb;
        for (int b = 0; b < nb; b++) {
            sp_zp_f64_col(&in[2 * b], names[4 * b]);
            sp_zp_f64_col(&in[2 * b + 1], names[4 * b + 1]);
            sp_zp_f64_col(&out[2 * b], names[4 * b + 2]);
            sp_zp_f64_col(&out[2 * b + 1], names[4 * b + 3]);
        }
        size_t w = (size_t)2 * (nb > 0 ? nb : 1);
        SP_ALLOC(inbuf, (size_t)ZP_CHUNK * w);
        SP_ALLOC(outbuf, (size_t)ZP_CHUNK * w);
        for (long i0 = 0; i0 < ncat && nb > 0; i0 += ZP_CHUNK) {
            long m = ncat - i0 < ZP_CHUNK ? ncat - i0 : ZP_CHUNK;
            SP_TRY(sp_h5_table_read(h, "/catalog", in, 2 * nb, i0, m, inbuf));
            for (long r = 0; r < m; r++) {
                int any = 0;
                for (int b = 0; b < nb; b++) {
                    double f = inbuf[r * w + 2 * b], fe = inbuf[r * w + 2 * b + 1];
                    double zp = res.band[b].zp, ez = res.band[b].zp_err;
                    double mag = NAN, merr = NAN;
                    if (isfinite(zp) && isfinite(f) && f > 0) {
                        mag = zp - 2.5 * log10(f);
                        double ef = MAGERR_K * fe / f;
                        merr = sqrt(ef * ef + ez * ez); /* NaN when the flux error is */
                        any = 1;
                    }
                    outbuf[r * w + 2 * b] = mag;
                    outbuf[r * w + 2 * b + 1] = merr;
                }
                res.nmag += any;
            }
            SP_TRY(sp_h5_table_write(h, "/catalog", out, 2 * nb, i0, m, outbuf));
        }
    }
    SP_TRY(sp_h5_attr_set_long(h, "/zp", "complete", 1));
    SP_TRY(sp_h5_flush(h));
    res.seconds = sp_wtime() - t0;
    SP_INFO("zp: %ld catalog row(s), %ld reference star(s), %ld matched; magnitudes for %ld row(s) in %.2f s", ncat,
            ref.n, nmatch, res.nmag, res.seconds);
    if (res_out) {
        *res_out = res;
        memset(&res, 0, sizeof res);
    }
cleanup:
    sp_zp_result_free(&res);
    free(bandstr);
    free(bands);
    free(bandp);
    free(names);
    sp_h5_table_info_free(&info);
    sp_zp_refcat_free(&ref);
    sp_zp_index_free(&cidx);
    sp_zp_index_free(&ridx);
    free(ra);
    free(dec);
    free(posbuf);
    free(sep);
    free(mrow);
    free(zpi);
    free(erri);
    free(smag);
    free(smagerr);
    free(sflux);
    free(sfluxerr);
    free(inbuf);
    free(outbuf);
    free(cat_of_ref);
    free(mref);
    free(mcat);
    free(cand);
    free(isolated);
    free(clip);
    free(spec);
    free(stars);
    free(brow);
    return status;
}

int sp_zp_read(sp_h5 *h, sp_zp_result *res)
{
    int status = SP_OK, ex = 0;
    band_row *rows = NULL;
    long nb = 0, cpl = 0, v = 0;
    memset(res, 0, sizeof *res);
    SP_TRY(sp_h5_exists(h, "/zp/bands", &ex));
    SP_CHECK(ex, SP_ERR_INPUT, "%s: no /zp in this store (run `surveyproc zp CONFIG`)", sp_h5_path(h));
    SP_TRY(sp_h5_attr_get_long(h, "/zp", "complete", &cpl));
    SP_CHECK(cpl == 1, SP_ERR_INPUT, "%s: /zp is incomplete (an interrupted zp stage): run `surveyproc zp CONFIG`",
             sp_h5_path(h));
    SP_TRY(sp_h5_table_nrows(h, "/zp/bands", &nb));
    SP_ALLOC(rows, nb > 0 ? nb : 1);
    SP_ALLOC(res->band, nb > 0 ? nb : 1);
    SP_TRY(sp_h5_table_read(h, "/zp/bands", band_cols, (int)(sizeof band_cols / sizeof band_cols[0]), 0, nb, rows));
    res->nbands = (int)nb;
    for (long b = 0; b < nb; b++) {
        const band_row *w = &rows[b];
        sp_zp_band_result *r = &res->band[b];
        snprintf(r->band, sizeof r->band, "%s", w->band);
        r->zp = w->zp;
        r->zp_err = w->zp_err;
        r->scatter = w->scatter;
        r->sigma_int = w->sigma_int;
        r->n_eff = w->n_eff;
        r->nmatched = w->nmatched;
        r->nselected = w->nselected;
        r->nused = w->nstars_used;
        r->nclipped = w->nstars_clipped;
        r->nrej_converged = w->nrej_converged;
        r->nrej_excluded = w->nrej_excluded;
        r->nrej_isolation = w->nrej_isolation;
        r->nrej_magrange = w->nrej_magrange;
        r->nrej_flux = w->nrej_flux;
        r->niter = w->niter;
        r->flag = w->flag;
    }
    if (sp_h5_attr_get_long(h, "/zp", "nref", &v) == SP_OK) res->nref = v;
    if (sp_h5_attr_get_long(h, "/zp", "nmatched", &v) == SP_OK) res->nmatched = v;
    sp_err_clear();
    if (sp_h5_table_nrows(h, "/zp/stars", &v) == SP_OK) res->nstars = v;
    if (sp_h5_table_nrows(h, "/catalog", &v) == SP_OK) res->ncat = v;
    sp_err_clear();
cleanup:
    free(rows);
    if (status != SP_OK) sp_zp_result_free(res);
    return status;
}

int sp_zp_calibrate_file(const char *store_path, const sp_config *cfg, sp_zp_result *res)
{
    int status = SP_OK;
    sp_h5 *h = NULL;
    if (res) memset(res, 0, sizeof *res);
    int want_zp = cfg->zp.enabled && cfg->inputs.reference_catalog;
    if (!cfg->zp.enabled) SP_INFO("zp: zp.enabled is false: no zero points (MAG columns stay NaN)");
    else if (!cfg->inputs.reference_catalog)
        SP_WARN("zp: inputs.reference_catalog is not set: no zero points (MAG columns stay NaN)");
    SP_TRY(sp_h5_open(store_path, 1, MPI_COMM_SELF, &h));
    {
        /* also with zp.apcorr false: a correction of an earlier run is then undone */
        sp_apcorr_result ac = {0};
        status = sp_apcorr_store(h, &cfg->zp, &ac);
        sp_apcorr_result_free(&ac);
    }
    if (status == SP_OK && want_zp) status = sp_zp_calibrate(h, &cfg->zp, cfg->inputs.reference_catalog, res);
    int st2 = sp_h5_close(&h);
    if (status == SP_OK) status = st2;
cleanup:
    if (h) sp_h5_close(&h);
    return status;
}

/* ---- injection -------------------------------------------------------------------- */

void sp_zp_inject_free(sp_zp_inject *inj)
{
    if (!inj) return;
    free(inj->ra);
    free(inj->dec);
    free(inj->flux_init);
    free(inj->ref_line);
    free(inj->id);
    memset(inj, 0, sizeof *inj);
}

int sp_zp_inject_sources(const sp_zp_refcat *ref, const double *ra, const double *dec, long ncat,
                         const sp_cfg_zp *z, double zp_ref, sp_zp_inject *out)
{
    int status = SP_OK;
    sp_zp_index *cidx = NULL;
    long *pick = NULL;
    memset(out, 0, sizeof *out);
    int nb = ref->nbands;
    out->nbands = nb;
    SP_TRY(sp_zp_index_build(ra, dec, ncat, z->match_radius_arcsec, &cidx));
    SP_ALLOC(pick, ref->n > 0 ? ref->n : 1);
    long n = 0;
    for (long j = 0; j < ref->n; j++) {
        if (sp_zp_index_nearest(cidx, ref->ra[j], ref->dec[j], z->match_radius_arcsec, -1, NULL) >= 0) continue;
        int inrange = 0;
        for (int b = 0; b < nb; b++) {
            double m = ref->mag[j * nb + b];
            inrange |= isfinite(m) && m >= z->gaia_mag_min && m <= z->gaia_mag_max;
        }
        if (inrange) pick[n++] = j;
    }
    out->n = n;
    SP_ALLOC(out->ra, n > 0 ? n : 1);
    SP_ALLOC(out->dec, n > 0 ? n : 1);
    SP_ALLOC(out->ref_line, n > 0 ? n : 1);
    SP_ALLOC(out->id, n > 0 ? n : 1);
    SP_ALLOC(out->flux_init, (size_t)(n > 0 ? n : 1) * (nb > 0 ? nb : 1));
    for (long k = 0; k < n; k++) {
        long j = pick[k];
        out->ra[k] = ref->ra[j];
        out->dec[k] = ref->dec[j];
        out->ref_line[k] = ref->line[j];
        snprintf(out->id[k], sizeof out->id[k], "REF%ld", ref->line[j]);
        for (int b = 0; b < nb; b++) {
            double m = ref->mag[j * nb + b];
            out->flux_init[k * nb + b] = isfinite(m) ? pow(10.0, -0.4 * (m - zp_ref)) : NAN;
        }
    }
cleanup:
    sp_zp_index_free(&cidx);
    free(pick);
    if (status != SP_OK) sp_zp_inject_free(out);
    return status;
}

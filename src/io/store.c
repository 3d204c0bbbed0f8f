/* store.c — the run's store layout on sp_h5 (see sp_store.h). */
#include "surveyproc/sp_store.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_log.h"
#include "surveyproc/sp_mpi.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define CELLCOL(n, t, u, d) {n, t, 0, u, d, 0, 0}

static const sp_h5_col cell_cols[] = {
    CELLCOL("id", SP_H5_I32, "", "cell index (row-major over the cell grid)"),
    CELLCOL("ix", SP_H5_I32, "", "cell column in the grid"),
    CELLCOL("iy", SP_H5_I32, "", "cell row in the grid"),
    CELLCOL("bx0", SP_H5_I64, "pix", "base region x start (inclusive)"),
    CELLCOL("by0", SP_H5_I64, "pix", "base region y start (inclusive)"),
    CELLCOL("bx1", SP_H5_I64, "pix", "base region x end (exclusive)"),
    CELLCOL("by1", SP_H5_I64, "pix", "base region y end (exclusive)"),
    CELLCOL("rx0", SP_H5_I64, "pix", "ROI (base + halo) x start"),
    CELLCOL("ry0", SP_H5_I64, "pix", "ROI y start"),
    CELLCOL("rx1", SP_H5_I64, "pix", "ROI x end (exclusive)"),
    CELLCOL("ry1", SP_H5_I64, "pix", "ROI y end (exclusive)"),
    CELLCOL("nsrc", SP_H5_I64, "", "active sources in the base region"),
    CELLCOL("active", SP_H5_U8, "", "1 if processed, 0 if skipped as empty"),
    CELLCOL("status", SP_H5_I8, "", "0 todo, 1 done, 2 failed, 3 skipped"),
    CELLCOL("rank", SP_H5_I32, "", "MPI rank that processed the cell"),
    CELLCOL("seconds", SP_H5_F64, "s", "wall seconds to process the cell"),
    CELLCOL("cost", SP_H5_F64, "s", "planned cost estimate"),
    CELLCOL("mem_est", SP_H5_F64, "byte", "planned memory estimate"),
    CELLCOL("bytes_read", SP_H5_I64, "byte", "bytes of FITS pixels read for the cell"),
};

static const sp_h5_col patch_cols[] = {
    CELLCOL("id", SP_H5_I32, "", "patch index"),
    CELLCOL("cell", SP_H5_I32, "", "cell holding the patch"),
    CELLCOL("ix", SP_H5_I32, "", "patch column in the tile-wide patch grid"),
    CELLCOL("iy", SP_H5_I32, "", "patch row in the tile-wide patch grid"),
    CELLCOL("bx0", SP_H5_I64, "pix", "base region x start"),
    CELLCOL("by0", SP_H5_I64, "pix", "base region y start"),
    CELLCOL("bx1", SP_H5_I64, "pix", "base region x end (exclusive)"),
    CELLCOL("by1", SP_H5_I64, "pix", "base region y end (exclusive)"),
    CELLCOL("rx0", SP_H5_I64, "pix", "ROI x start"),
    CELLCOL("ry0", SP_H5_I64, "pix", "ROI y start"),
    CELLCOL("rx1", SP_H5_I64, "pix", "ROI x end (exclusive)"),
    CELLCOL("ry1", SP_H5_I64, "pix", "ROI y end (exclusive)"),
    CELLCOL("nsrc", SP_H5_I64, "", "sources reported by the patch (base region)"),
    CELLCOL("nsrc_roi", SP_H5_I64, "", "sources modelled in the ROI (base + halo)"),
    CELLCOL("active", SP_H5_U8, "", "1 if processed"),
    CELLCOL("status", SP_H5_I8, "", "0 todo, 1 done, 2 failed, 3 skipped"),
    CELLCOL("seconds", SP_H5_F64, "s", "wall seconds of the patch"),
    CELLCOL("chi2dof", SP_H5_F64, "", "residual chi2 per degree of freedom over the ROI"),
    CELLCOL("resid_rms", SP_H5_F64, "", "rms of (data - model) * sqrt(ivar) over the ROI"),
};

const sp_h5_col *sp_store_cell_cols(int *ncol)
{
    *ncol = (int)(sizeof cell_cols / sizeof cell_cols[0]);
    return cell_cols;
}

const sp_h5_col *sp_store_patch_cols(int *ncol)
{
    *ncol = (int)(sizeof patch_cols / sizeof patch_cols[0]);
    return patch_cols;
}

/* The structs must have exactly the layout sp_h5 computes for the specs. */
static int check_struct_layout(void)
{
    int status = SP_OK;
    size_t off[32], rs;
    static const size_t cell_off[] = {
        offsetof(sp_store_cellrow, id), offsetof(sp_store_cellrow, ix), offsetof(sp_store_cellrow, iy),
        offsetof(sp_store_cellrow, bx0), offsetof(sp_store_cellrow, by0), offsetof(sp_store_cellrow, bx1),
        offsetof(sp_store_cellrow, by1), offsetof(sp_store_cellrow, rx0), offsetof(sp_store_cellrow, ry0),
        offsetof(sp_store_cellrow, rx1), offsetof(sp_store_cellrow, ry1), offsetof(sp_store_cellrow, nsrc),
        offsetof(sp_store_cellrow, active), offsetof(sp_store_cellrow, status), offsetof(sp_store_cellrow, rank),
        offsetof(sp_store_cellrow, seconds), offsetof(sp_store_cellrow, cost), offsetof(sp_store_cellrow, mem_est),
        offsetof(sp_store_cellrow, bytes_read)};
    static const size_t patch_off[] = {
        offsetof(sp_store_patchrow, id), offsetof(sp_store_patchrow, cell), offsetof(sp_store_patchrow, ix),
        offsetof(sp_store_patchrow, iy), offsetof(sp_store_patchrow, bx0), offsetof(sp_store_patchrow, by0),
        offsetof(sp_store_patchrow, bx1), offsetof(sp_store_patchrow, by1), offsetof(sp_store_patchrow, rx0),
        offsetof(sp_store_patchrow, ry0), offsetof(sp_store_patchrow, rx1), offsetof(sp_store_patchrow, ry1),
        offsetof(sp_store_patchrow, nsrc), offsetof(sp_store_patchrow, nsrc_roi),
        offsetof(sp_store_patchrow, active), offsetof(sp_store_patchrow, status),
        offsetof(sp_store_patchrow, seconds), offsetof(sp_store_patchrow, chi2dof),
        offsetof(sp_store_patchrow, resid_rms)};
    int n;
    const sp_h5_col *c = sp_store_cell_cols(&n);
    SP_TRY(sp_h5_table_layout(c, n, off, &rs));
    SP_CHECK(rs == sizeof(sp_store_cellrow) && !memcmp(off, cell_off, sizeof cell_off), SP_ERR_INTERNAL,
             "sp_store_cellrow does not match the /cells column spec");
    c = sp_store_patch_cols(&n);
    SP_TRY(sp_h5_table_layout(c, n, off, &rs));
    SP_CHECK(rs == sizeof(sp_store_patchrow) && !memcmp(off, patch_off, sizeof patch_off), SP_ERR_INTERNAL,
             "sp_store_patchrow does not match the /patches column spec");
cleanup:
    return status;
}

/* ---- /catalog spec ----------------------------------------------------------------- */

typedef struct {
    sp_h5_col *cols;
    int n, cap;
    char *names;
    size_t nused, ncap;
} colbuf;

/* Appends a column; grows the tables as needed. Returns its index, or -1 (error set): never a
 * status code, which the caller would take for an index. Names are kept as offsets into
 * b->names until the spec is complete (the buffer may move when it grows). */
static int add_col(colbuf *b, const char *name, sp_h5_type t, int len, const char *unit, const char *desc)
{
    size_t l = strlen(name) + 1;
    if (b->n >= b->cap) {
        int cap = b->cap > 0 ? 2 * b->cap : 64;
        sp_h5_col *nc = realloc(b->cols, (size_t)cap * sizeof *nc);
        if (!nc) {
            SP_FAIL(SP_ERR_NOMEM, "out of memory for the catalog's column table (%d columns)", cap);
            return -1;
        }
        b->cols = nc;
        b->cap = cap;
    }
    if (b->nused + l > b->ncap) {
        size_t ncap = b->ncap > 0 ? 2 * b->ncap : 4096;
        while (ncap < b->nused + l) ncap *= 2;
        char *nn = realloc(b->names, ncap);
        if (!nn) {
            SP_FAIL(SP_ERR_NOMEM, "out of memory for the catalog's column names (%zu bytes)", ncap);
            return -1;
        }
        b->names = nn;
        b->ncap = ncap;
    }
    memcpy(b->names + b->nused, name, l);
    sp_h5_col *c = &b->cols[b->n];
    memset(c, 0, sizeof *c);
    c->name = (const char *)(uintptr_t)b->nused; /* an offset until the fix-up */
    c->type = t;
    c->len = len;
    c->unit = unit;
    c->description = desc;
    b->nused += l;
    return b->n++;
}

int sp_store_catalog_spec(const sp_plan *plan, sp_store_catalog *s)
{
    int status = SP_OK;
    memset(s, 0, sizeof *s);
    int nb = plan->nbands;
    colbuf b = {0};
    SP_ALLOC(s->band, nb);
    int idw = 16;
    for (long i = 0; i < plan->cat.n; i++) {
        int l = (int)strlen(plan->cat.id[i]) + 1;
        if (l > idw) idw = l;
    }
#define ADD(var, ...)                                                                                              \
    do {                                                                                                           \
        int k_ = add_col(&b, __VA_ARGS__);                                                                         \
        if (k_ < 0) { /* the error is set */                                                                       \
            status = SP_ERR_NOMEM;                                                                                 \
            goto cleanup;                                                                                          \
        }                                                                                                          \
        var = k_;                                                                                                  \
    } while (0)
    ADD(s->id, "ID", SP_H5_STR, idw, "", "source identifier, verbatim from the input catalog");
    ADD(s->ra, "RA", SP_H5_F64, 0, "deg", "input right ascension");
    ADD(s->dec, "DEC", SP_H5_F64, 0, "deg", "input declination");
    ADD(s->x_in, "X_INPUT", SP_H5_F64, 0, "pix", "input position projected on the tile (0-based)");
    ADD(s->y_in, "Y_INPUT", SP_H5_F64, 0, "pix", "input position projected on the tile (0-based)");
    ADD(s->type, "TYPE", SP_H5_STR, 8, "", "model type used: STAR, EXP, DEV or SERSIC");
    ADD(s->cell, "CELL", SP_H5_I32, 0, "", "ePSF cell of the source (-1 if excluded)");
    ADD(s->patch, "PATCH", SP_H5_I32, 0, "", "patch of the source (-1 if excluded)");
    ADD(s->line, "INPUT_LINE", SP_H5_I64, 0, "", "line of the source in the input catalog");
    ADD(s->excl_crop, "excluded_crop", SP_H5_U8, 0, "", "1 if within the crop margin of the tile edge");
    ADD(s->excl_sat, "excluded_saturation", SP_H5_U8, 0, "", "1 if saturated pixels near the source");
    ADD(s->excl_nan, "excluded_nan_coord", SP_H5_U8, 0, "", "1 if RA/DEC not finite");
    ADD(s->excl_outside, "excluded_outside", SP_H5_U8, 0, "", "1 if the position is off the tile");
    ADD(s->excl_any, "excluded_any", SP_H5_U8, 0, "", "1 if excluded for any reason");
    ADD(s->excl_reason, "excluded_reason", SP_H5_STR, 32, "", "why the source is excluded (empty if not)");
    ADD(s->injected, "INJECTED", SP_H5_U8, 0, "",
        "1 if the row is a reference star appended by zp.inject_gaia_sources (ID REF<line>)");
    ADD(s->done, "PROCESSED", SP_H5_U8, 0, "", "1 once the source's cell has been processed");
    ADD(s->x_fit, "X_FIT", SP_H5_F64, 0, "pix", "fitted position (0-based tile pixels)");
    ADD(s->y_fit, "Y_FIT", SP_H5_F64, 0, "pix", "fitted position (0-based tile pixels)");
    ADD(s->xerr, "XERR_FIT", SP_H5_F64, 0, "pix", "1-sigma error of X_FIT");
    ADD(s->yerr, "YERR_FIT", SP_H5_F64, 0, "pix", "1-sigma error of Y_FIT");
    ADD(s->ra_fit, "RA_FIT", SP_H5_F64, 0, "deg", "fitted right ascension");
    ADD(s->dec_fit, "DEC_FIT", SP_H5_F64, 0, "deg", "fitted declination");
    ADD(s->re_fit, "RE_FIT", SP_H5_F64, 0, "pix", "fitted half-light radius (galaxies)");
    ADD(s->re_err, "REERR_FIT", SP_H5_F64, 0, "pix", "1-sigma error of RE_FIT");
    ADD(s->q_fit, "Q_FIT", SP_H5_F64, 0, "", "fitted axis ratio b/a (galaxies)");
    ADD(s->q_err, "QERR_FIT", SP_H5_F64, 0, "", "1-sigma error of Q_FIT");
    ADD(s->theta_fit, "THETA_FIT", SP_H5_F64, 0, "deg", "fitted position angle (SExtractor convention)");
    ADD(s->theta_err, "THETAERR_FIT", SP_H5_F64, 0, "deg", "1-sigma error of THETA_FIT");
    ADD(s->sersic_n, "SERSIC_N_FIT", SP_H5_F64, 0, "", "fitted Sersic index (SERSIC sources)");
    ADD(s->niter1, "NITER_STAGE1", SP_H5_I32, 0, "", "iterations of fit stage 1 (fluxes)");
    ADD(s->niter2, "NITER_STAGE2", SP_H5_I32, 0, "", "iterations of fit stage 2 (+ positions)");
    ADD(s->niter3, "NITER_STAGE3", SP_H5_I32, 0, "", "iterations of fit stage 3 (+ shapes)");
    ADD(s->converged, "CONVERGED", SP_H5_I8, 0, "", "1 if the source's fit converged, 0 if not, -1 if not fitted");
    ADD(s->hit_maxiter, "HIT_MAX_ITERS", SP_H5_I8, 0, "", "1 if a stage stopped at n_opt_iters");
    ADD(s->fit_flags, "FIT_FLAGS", SP_H5_I32, 0, "", "bit flags of the fit (docs/outputs.md)");
    for (int k = 0; k < nb; k++) {
        const char *bn = plan->bands[k];
        char nm[96];
        sp_store_bandcols *c = &s->band[k];
#define BADD(var, fmt, ...)                                                                                        \
    do {                                                                                                           \
        snprintf(nm, sizeof nm, fmt, bn);                                                                          \
        ADD(var, nm, __VA_ARGS__);                                                                                 \
    } while (0)
        BADD(c->flux_init, "FLUX_%s_INIT", SP_H5_F64, 0, "flux(zp_ref)", "initial flux from the input catalog");
        BADD(c->flux_aper, "FLUX_%s_APER", SP_H5_F64, 0, "flux(zp_ref)", "forced aperture flux (annulus background)");
        BADD(c->fluxerr_aper, "FLUXERR_%s_APER", SP_H5_F64, 0, "flux(zp_ref)", "1-sigma error of the aperture flux");
        BADD(c->aper_flags, "APER_FLAGS_%s", SP_H5_I32, 0, "", "aperture flags: 1 edge, 2 masked, 4 no background, 8 all masked");
        BADD(c->flux_apcal, "FLUX_%s_APCAL", SP_H5_F64, 0, "flux(zp_ref)",
             "model flux + residual light in the calibration aperture (zp.apcorr_*; point sources it can use)");
        BADD(c->fluxerr_apcal, "FLUXERR_%s_APCAL", SP_H5_F64, 0, "flux(zp_ref)", "1-sigma error of the residual light in the aperture");
        BADD(c->apcal_flags, "APCAL_FLAGS_%s", SP_H5_I32, 0, "", "calibration-aperture flags (as APER_FLAGS; -1 not measured)");
        BADD(c->apcorr, "APCORR_%s", SP_H5_F64, 0, "", "aperture correction applied to FLUX/FLUXERR_<band>_fit (NaN: none)");
        BADD(c->flux_fit, "FLUX_%s_fit", SP_H5_F64, 0, "flux(zp_ref)", "fitted model flux x APCORR_<band> (aperture correction)");
        BADD(c->fluxerr_fit, "FLUXERR_%s_fit", SP_H5_F64, 0, "flux(zp_ref)", "marginal 1-sigma flux error (inverse Fisher)");
        BADD(c->fluxerr_cond, "FLUXERR_%s_cond", SP_H5_F64, 0, "flux(zp_ref)", "conditional flux error (other parameters fixed)");
        BADD(c->chi2dof, "CHI2DOF_%s", SP_H5_F64, 0, "", "chi2 per degree of freedom over the source footprint");
        BADD(c->blend, "BLEND_%s", SP_H5_F64, 0, "", "fraction of model flux in the footprint from neighbours");
        BADD(c->psf_fallback, "PSF_FALLBACK_%s", SP_H5_I8, 0, "", "1 if the analytic fallback PSF was used");
        BADD(c->mag_fit, "MAG_%s_fit", SP_H5_F64, 0, "mag(AB)", "AB magnitude after zero-point calibration");
        BADD(c->magerr_fit, "MAGERR_%s_fit", SP_H5_F64, 0, "mag", "magnitude error incl. the zero-point error");
#undef BADD
    }
#undef ADD
    for (int k = 0; k < b.n; k++) b.cols[k].name = b.names + (uintptr_t)b.cols[k].name; /* offsets -> names */
    s->ncol = b.n;
    s->cols = b.cols;
    s->names = b.names;
    s->nbands = nb;
    b.cols = NULL;
    b.names = NULL;
    SP_ALLOC(s->offsets, s->ncol);
    SP_TRY(sp_h5_table_layout(s->cols, s->ncol, s->offsets, &s->rowsize));
cleanup:
    free(b.cols);
    free(b.names);
    if (status != SP_OK) sp_store_catalog_spec_free(s);
    return status;
}

void sp_store_catalog_spec_free(sp_store_catalog *s)
{
    free(s->cols);
    free(s->names);
    free(s->offsets);
    free(s->band);
    memset(s, 0, sizeof *s);
}

static char *cell_ptr(const sp_store_catalog *s, void *rows, long r, int c)
{
    return (char *)rows + (size_t)r * s->rowsize + s->offsets[c];
}

void sp_store_set_f64(const sp_store_catalog *s, void *rows, long r, int c, double v)
{
    memcpy(cell_ptr(s, rows, r, c), &v, sizeof v);
}

void sp_store_set_i32(const sp_store_catalog *s, void *rows, long r, int c, int v)
{
    if (s->cols[c].type == SP_H5_I8 || s->cols[c].type == SP_H5_U8) {
        int8_t x = (int8_t)v;
        memcpy(cell_ptr(s, rows, r, c), &x, 1);
    } else if (s->cols[c].type == SP_H5_I64) {
        int64_t x = v;
        memcpy(cell_ptr(s, rows, r, c), &x, sizeof x);
    } else {
        int32_t x = v;
        memcpy(cell_ptr(s, rows, r, c), &x, sizeof x);
    }
}

void sp_store_set_u8(const sp_store_catalog *s, void *rows, long r, int c, int v)
{
    uint8_t x = (uint8_t)v;
    memcpy(cell_ptr(s, rows, r, c), &x, 1);
}

void sp_store_set_str(const sp_store_catalog *s, void *rows, long r, int c, const char *v)
{
    char *p = cell_ptr(s, rows, r, c);
    int len = s->cols[c].len;
    memset(p, 0, (size_t)len);
    strncpy(p, v, (size_t)len - 1);
}

void sp_store_fill_rows(const sp_store_catalog *s, void *rows, long n)
{
    for (long r = 0; r < n; r++)
        for (int c = 0; c < s->ncol; c++) {
            switch (s->cols[c].type) {
            case SP_H5_F64: sp_store_set_f64(s, rows, r, c, NAN); break;
            case SP_H5_F32: { float x = NAN; memcpy(cell_ptr(s, rows, r, c), &x, 4); } break;
            case SP_H5_U8: sp_store_set_u8(s, rows, r, c, 0); break;
            case SP_H5_STR: sp_store_set_str(s, rows, r, c, ""); break;
            case SP_H5_I64: { int64_t x = -1; memcpy(cell_ptr(s, rows, r, c), &x, 8); } break;
            default: sp_store_set_i32(s, rows, r, c, -1); break;
            }
        }
}

void sp_store_input_row(const sp_store_catalog *s, const sp_plan *p, long i, void *rows, long r)
{
    const sp_catalog *c = &p->cat;
    sp_store_set_str(s, rows, r, s->id, c->id[i]);
    sp_store_set_f64(s, rows, r, s->ra, c->ra[i]);
    sp_store_set_f64(s, rows, r, s->dec, c->dec[i]);
    sp_store_set_f64(s, rows, r, s->x_in, c->x[i]);
    sp_store_set_f64(s, rows, r, s->y_in, c->y[i]);
    sp_store_set_str(s, rows, r, s->type, sp_plan_type_name(c->type[i]));
    sp_store_set_i32(s, rows, r, s->cell, c->cell[i]);
    sp_store_set_i32(s, rows, r, s->patch, c->patch[i]);
    int64_t line = c->line[i];
    memcpy(cell_ptr(s, rows, r, s->line), &line, sizeof line);
    unsigned e = c->excl[i];
    sp_store_set_u8(s, rows, r, s->excl_crop, !!(e & SP_EXCL_CROP));
    sp_store_set_u8(s, rows, r, s->excl_sat, !!(e & SP_EXCL_SATURATION));
    sp_store_set_u8(s, rows, r, s->excl_nan, !!(e & SP_EXCL_NANCOORD));
    sp_store_set_u8(s, rows, r, s->excl_outside, !!(e & SP_EXCL_OUTSIDE));
    sp_store_set_u8(s, rows, r, s->excl_any, e != 0);
    const char *why = e & SP_EXCL_NANCOORD ? "nan_coord"
                      : e & SP_EXCL_OUTSIDE ? "outside_tile"
                      : e & SP_EXCL_CROP ? "crop"
                      : e & SP_EXCL_SATURATION ? "saturation"
                      : "";
    sp_store_set_str(s, rows, r, s->excl_reason, why);
    sp_store_set_u8(s, rows, r, s->injected, c->injected ? c->injected[i] : 0);
    for (int b = 0; b < p->nbands; b++)
        sp_store_set_f64(s, rows, r, s->band[b].flux_init, c->flux_init[i * p->nbands + b]);
}

/* ---- frames table ------------------------------------------------------------------ */

typedef struct {
    char path[SP_PATH_MAX];
    char band[SP_BAND_MAX];
    int32_t hdu;
    int64_t nx, ny;
    double zp_auto, skysig, egain, saturate, exptime, scale;
    int64_t hdr_checksum, file_size;
    double wcs_offset_pix, median, rsigma, nan_frac;
} frame_row;

static const sp_h5_col frame_cols[] = {
    {"path", SP_H5_STR, SP_PATH_MAX, "", "FITS path", 0, 0},
    {"band", SP_H5_STR, SP_BAND_MAX, "", "FILTER", 0, 0},
    CELLCOL("hdu", SP_H5_I32, "", "1-based HDU holding the image"),
    CELLCOL("nx", SP_H5_I64, "pix", "image width"),
    CELLCOL("ny", SP_H5_I64, "pix", "image height"),
    CELLCOL("ZP_AUTO", SP_H5_F64, "mag", "frame zero point from the header"),
    CELLCOL("SKYSIG", SP_H5_F64, "ADU", "sky noise from the header"),
    CELLCOL("EGAIN", SP_H5_F64, "e-/ADU", "gain from the header"),
    CELLCOL("SATURATE", SP_H5_F64, "ADU", "saturation level (NaN if absent)"),
    CELLCOL("EXPTIME", SP_H5_F64, "s", "exposure time (NaN if absent)"),
    CELLCOL("scale", SP_H5_F64, "", "10^(-0.4 (ZP_AUTO - zp_ref))"),
    CELLCOL("header_checksum", SP_H5_I64, "", "checksum of the header text"),
    CELLCOL("file_size", SP_H5_I64, "byte", "file size when planned"),
    CELLCOL("wcs_offset_pix", SP_H5_F64, "pix", "largest offset from frame 0's WCS"),
    CELLCOL("median", SP_H5_F64, "ADU", "median of sampled rows"),
    CELLCOL("rsigma", SP_H5_F64, "ADU", "robust sigma of sampled rows"),
    CELLCOL("nan_frac", SP_H5_F64, "", "fraction of NaN pixels in sampled rows"),
};

/* ---- create / open -------------------------------------------------------------- */

static int write_static(sp_store *s, const sp_plan *p, MPI_Comm comm)
{
    int status = SP_OK, rank;
    frame_row *fr = NULL;
    sp_store_cellrow *cr = NULL;
    sp_store_patchrow *pr = NULL;
    void *rows = NULL;
    long *idx = NULL;
    MPI_Comm_rank(comm, &rank);
    if (rank != 0) goto cleanup;
    SP_ALLOC(fr, p->nframes);
    for (int i = 0; i < p->nframes; i++) {
        const sp_frame *f = &p->frames[i];
        snprintf(fr[i].path, sizeof fr[i].path, "%s", f->path);
        snprintf(fr[i].band, sizeof fr[i].band, "%s", f->band);
        fr[i].hdu = f->hdu;
        fr[i].nx = f->nx;
        fr[i].ny = f->ny;
        fr[i].zp_auto = f->zp_auto;
        fr[i].skysig = f->skysig;
        fr[i].egain = f->egain;
        fr[i].saturate = f->saturate;
        fr[i].exptime = f->exptime;
        fr[i].scale = f->scale;
        fr[i].hdr_checksum = (int64_t)f->hdr_checksum;
        fr[i].file_size = f->file_size;
        fr[i].wcs_offset_pix = f->wcs_offset_pix;
        fr[i].median = f->median;
        fr[i].rsigma = f->rsigma;
        fr[i].nan_frac = f->nan_frac;
    }
    SP_TRY(sp_h5_table_write(s->h, "/frames", frame_cols, (int)(sizeof frame_cols / sizeof frame_cols[0]), 0,
                             p->nframes, fr));
    SP_ALLOC(cr, p->ncells);
    for (int k = 0; k < p->ncells; k++) {
        const sp_cell *c = &p->cells[k];
        cr[k] = (sp_store_cellrow){.id = c->id, .ix = c->ix, .iy = c->iy, .bx0 = c->bx0, .by0 = c->by0,
                                   .bx1 = c->bx1, .by1 = c->by1, .rx0 = c->rx0, .ry0 = c->ry0, .rx1 = c->rx1,
                                   .ry1 = c->ry1, .nsrc = c->nsrc, .active = (uint8_t)c->active,
                                   .status = c->active ? SP_CELL_TODO : SP_CELL_SKIPPED, .rank = -1,
                                   .seconds = NAN, .cost = c->cost, .mem_est = c->mem_bytes, .bytes_read = 0};
    }
    int n;
    const sp_h5_col *cc = sp_store_cell_cols(&n);
    SP_TRY(sp_h5_table_write(s->h, "/cells", cc, n, 0, p->ncells, cr));
    SP_ALLOC(pr, p->npatches);
    for (int k = 0; k < p->npatches; k++) {
        const sp_patch *c = &p->patches[k];
        pr[k] = (sp_store_patchrow){.id = c->id, .cell = c->cell, .ix = c->ix, .iy = c->iy, .bx0 = c->bx0,
                                    .by0 = c->by0, .bx1 = c->bx1, .by1 = c->by1, .rx0 = c->rx0, .ry0 = c->ry0,
                                    .rx1 = c->rx1, .ry1 = c->ry1, .nsrc = c->nsrc, .nsrc_roi = -1,
                                    .active = (uint8_t)c->active,
                                    .status = c->active ? SP_CELL_TODO : SP_CELL_SKIPPED, .seconds = NAN,
                                    .chi2dof = NAN, .resid_rms = NAN};
    }
    cc = sp_store_patch_cols(&n);
    SP_TRY(sp_h5_table_write(s->h, "/patches", cc, n, 0, p->npatches, pr));
    /* every source's input columns now; cells overwrite their rows when done */
    const long chunk = 65536;
    SP_ALLOC(rows, (size_t)chunk * s->cat.rowsize);
    for (long i0 = 0; i0 < p->cat.n; i0 += chunk) {
        long m = p->cat.n - i0 < chunk ? p->cat.n - i0 : chunk;
        sp_store_fill_rows(&s->cat, rows, m);
        for (long r = 0; r < m; r++) sp_store_input_row(&s->cat, p, i0 + r, rows, r);
        SP_TRY(sp_h5_table_write(s->h, "/catalog", s->cat.cols, s->cat.ncol, i0, m, rows));
    }
cleanup:
    free(fr);
    free(cr);
    free(pr);
    free(rows);
    free(idx);
    return status;
}

/* outputs.store must not name one of the run's inputs: with outputs.overwrite: true the file
 * would be truncated before anything else happens. Rank 0 looks, every rank agrees. */
static int check_not_an_input(const char *path, const sp_plan *p, MPI_Comm comm)
{
    int status = SP_OK, rank = 0;
    if (comm != MPI_COMM_NULL) MPI_Comm_rank(comm, &rank);
    struct stat st, si;
    if (rank == 0 && stat(path, &st) == 0) {
        const char *what[3] = {"inputs.image_list_file", "inputs.input_catalog", "inputs.reference_catalog"};
        const char *inp[3] = {p->opts.image_list, p->opts.input_catalog, p->opts.reference_catalog};
        for (int k = 0; k < 3 && status == SP_OK; k++)
            if (inp[k][0] && stat(inp[k], &si) == 0 && si.st_dev == st.st_dev && si.st_ino == st.st_ino)
                status = SP_FAIL(SP_ERR_CONFIG, "outputs.store = %s is the %s of this run; choose another store path",
                                 path, what[k]);
        for (int i = 0; i < p->nframes && status == SP_OK; i++)
            if (p->frames[i].ino && p->frames[i].dev == (unsigned long long)st.st_dev &&
                p->frames[i].ino == (unsigned long long)st.st_ino)
                status = SP_FAIL(SP_ERR_CONFIG, "outputs.store = %s is frame %d of the image list (line %ld); choose "
                                 "another store path",
                                 path, i, p->frames[i].list_line);
    }
    return comm != MPI_COMM_NULL ? sp_mpi_agree(status, comm) : status;
}

double sp_store_growth_r(int k) { return 0.5 * (k + 1); }

int sp_store_overview_patches(const sp_plan *p, int *ids, int *ds, int *h, int *w)
{
    long nact = 0, mx = 1, my = 1;
    for (int k = 0; k < p->npatches; k++) {
        const sp_patch *pt = &p->patches[k];
        if (!pt->active || pt->nsrc == 0) continue;
        nact++;
        if (pt->rx1 - pt->rx0 > mx) mx = pt->rx1 - pt->rx0;
        if (pt->ry1 - pt->ry0 > my) my = pt->ry1 - pt->ry0;
    }
    long side = mx > my ? mx : my;
    *ds = (int)((side + 127) / 128);
    *w = (int)((mx + *ds - 1) / *ds);
    *h = (int)((my + *ds - 1) / *ds);
    int n = nact < SP_STORE_OVERVIEW_MAX ? (int)nact : SP_STORE_OVERVIEW_MAX;
    long j = 0;
    int m = 0;
    for (int k = 0; k < p->npatches && m < n; k++) {
        const sp_patch *pt = &p->patches[k];
        if (!pt->active || pt->nsrc == 0) continue;
        /* the (m)th pick is the active patch of rank floor(m * nact / n) */
        if (j == (long)((double)m * nact / n)) ids[m++] = pt->id;
        j++;
    }
    return m;
}

void sp_store_qa_map_dims(const sp_plan *p, int ds, long *ny, long *nx)
{
    *ny = (p->ny + ds - 1) / ds;
    *nx = (p->nx + ds - 1) / ds;
}

/* COLLECTIVE. The QA diagnostics datasets (filled by the cells; NaN until then). */
static int create_qa(sp_store *s, const sp_plan *p, const sp_store_meta *m)
{
    int status = SP_OK;
    char path[160];
    long ng = p->opts.epsf_ngrid, sz = m->epsf_size > 0 ? m->epsf_size : p->opts.psf_size;
    double *r = NULL;
    SP_TRY(sp_h5_group_create(s->h, "/qa"));
    if (m->qa_white_ds > 0) {
        long d[2];
        sp_store_qa_map_dims(p, m->qa_white_ds, &d[0], &d[1]);
        SP_TRY(sp_h5_array_create(s->h, "/qa/white", SP_H5_F32, 2, d, NULL, NULL));
        SP_TRY(sp_h5_attr_set_long(s->h, "/qa/white", "downsample", m->qa_white_ds));
        SP_TRY(sp_h5_attr_set_str(s->h, "/qa/white", "description",
                                  "inverse-variance white stack of the background-subtracted bands, block means"));
    }
    if (m->qa_bkg_ds > 0) {
        long d[2];
        sp_store_qa_map_dims(p, m->qa_bkg_ds, &d[0], &d[1]);
        SP_TRY(sp_h5_group_create(s->h, "/qa/background"));
        SP_TRY(sp_h5_attr_set_long(s->h, "/qa/background", "downsample", m->qa_bkg_ds));
        for (int b = 0; b < p->nbands; b++) {
            snprintf(path, sizeof path, "/qa/background/%s", p->bands[b]);
            SP_TRY(sp_h5_array_create(s->h, path, SP_H5_F32, 2, d, NULL, NULL));
            snprintf(path, sizeof path, "/qa/background/%s_rms", p->bands[b]);
            SP_TRY(sp_h5_array_create(s->h, path, SP_H5_F32, 2, d, NULL, NULL));
        }
    }
    static const char *const kinds[3] = {"data", "model", "resid"};
    if (m->qa_cut_n > 0) {
        long s0 = m->qa_cut_size, d4[4] = {m->qa_cut_n, p->nbands, s0, s0}, c4[4] = {1, p->nbands, s0, s0};
        long n = m->qa_cut_n;
        SP_TRY(sp_h5_group_create(s->h, "/qa/cutouts"));
        for (int k = 0; k < 3; k++) {
            snprintf(path, sizeof path, "/qa/cutouts/%s", kinds[k]);
            SP_TRY(sp_h5_array_create(s->h, path, SP_H5_F32, 4, d4, c4, NULL));
        }
        SP_ALLOC(r, n);
        for (long k = 0; k < n; k++) r[k] = (double)(m->qa_cut_start + k);
        SP_TRY(sp_h5_array_create(s->h, "/qa/cutouts/row", SP_H5_I64, 1, &n, NULL, NULL));
        SP_TRY(sp_h5_array_write(s->h, "/qa/cutouts/row", SP_H5_F64, NULL, NULL, r));
        free(r);
        r = NULL;
    }
    if (m->qa_overview) {
        int ids[SP_STORE_OVERVIEW_MAX], ds, hh, ww;
        long n = sp_store_overview_patches(p, ids, &ds, &hh, &ww);
        if (n > 0) {
            long d4[4] = {n, p->nbands, hh, ww}, c4[4] = {1, p->nbands, hh, ww};
            SP_TRY(sp_h5_group_create(s->h, "/qa/patch_overview"));
            SP_TRY(sp_h5_attr_set_long(s->h, "/qa/patch_overview", "downsample", ds));
            for (int k = 0; k < 3; k++) {
                snprintf(path, sizeof path, "/qa/patch_overview/%s", kinds[k]);
                SP_TRY(sp_h5_array_create(s->h, path, SP_H5_F32, 4, d4, c4, NULL));
            }
            SP_ALLOC(r, n);
            for (long k = 0; k < n; k++) r[k] = ids[k];
            SP_TRY(sp_h5_array_create(s->h, "/qa/patch_overview/patch", SP_H5_I64, 1, &n, NULL, NULL));
            SP_TRY(sp_h5_array_write(s->h, "/qa/patch_overview/patch", SP_H5_F64, NULL, NULL, r));
            free(r);
            r = NULL;
        }
    }
    for (int b = 0; b < p->nbands; b++) {
        if (m->qa_growth_n > 0) {
            long n = m->qa_growth_n, d3[3] = {ng, ng, n};
            SP_ALLOC(r, n);
            for (long k = 0; k < n; k++) r[k] = sp_store_growth_r((int)k);
            snprintf(path, sizeof path, "/epsf/%s_growth_r", p->bands[b]);
            SP_TRY(sp_h5_array_create(s->h, path, SP_H5_F64, 1, &n, NULL, NULL));
            SP_TRY(sp_h5_array_write(s->h, path, SP_H5_F64, NULL, NULL, r));
            free(r);
            r = NULL;
            snprintf(path, sizeof path, "/epsf/%s_growth_ee", p->bands[b]);
            SP_TRY(sp_h5_array_create(s->h, path, SP_H5_F32, 3, d3, NULL, NULL));
        }
        if (m->qa_resid) {
            long d4[4] = {ng, ng, sz, sz}, c4[4] = {1, 1, sz, sz};
            snprintf(path, sizeof path, "/epsf/%s_resid", p->bands[b]);
            SP_TRY(sp_h5_array_create(s->h, path, SP_H5_F32, 4, d4, c4, NULL));
        }
    }
cleanup:
    free(r);
    return status;
}

/* One job per store. Rank 0 holds an open-file-description write lock (F_OFD_SETLK) on the
 * store while the run has it open: a second job on the same store (a resume started while
 * the ranks of a killed mpirun still run, two jobs given one outputs.store) is refused
 * instead of writing into the same file. The kernel drops the lock when the holder dies,
 * so kill -9 never leaves a stale lock. OFD locks are independent of HDF5's own flock() and
 * are not dropped when another descriptor of the file is closed. Where the file system has
 * no such locks the run goes on unlocked. Collective (agreed). */
static int lock_store(const char *path, MPI_Comm comm, int *fd1)
{
    int status = SP_OK, rank;
    MPI_Comm_rank(comm, &rank);
    *fd1 = 0;
    if (rank == 0) {
        int fd = open(path, O_RDWR | O_CLOEXEC);
        if (fd >= 0) {
            struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0};
            if (fcntl(fd, F_OFD_SETLK, &fl) == 0) *fd1 = fd + 1;
            else {
                int e = errno;
                close(fd);
                if (e == EAGAIN || e == EACCES)
                    status = SP_FAIL(SP_ERR_STATE,
                                     "%s: the store is in use by another surveyproc job (it holds the store's "
                                     "lock); wait until that job ends, or stop every one of its ranks, then run "
                                     "again",
                                     path);
            }
        }
    }
    status = sp_mpi_agree(status, comm);
    if (status != SP_OK && *fd1) {
        close(*fd1 - 1);
        *fd1 = 0;
    }
    return status;
}

static void unlock_store(int *fd1)
{
    if (*fd1) close(*fd1 - 1);
    *fd1 = 0;
}

int sp_store_create(const char *path, const sp_plan *p, const sp_store_meta *m, MPI_Comm comm, sp_store *s)
{
    int status = SP_OK;
    memset(s, 0, sizeof *s);
    SP_TRY(check_struct_layout());
    SP_TRY(check_not_an_input(path, p, comm));
    /* replacing a store (outputs.overwrite) that a running job writes is refused too */
    SP_TRY(lock_store(path, comm, &s->lock_fd1));
    unlock_store(&s->lock_fd1);
    SP_TRY(sp_store_catalog_spec(p, &s->cat));
    /* laid out as PATH.part, renamed once complete and flushed: a kill -9 or a full disk while
     * the datasets are created leaves no half-made store, and an old store stays until then */
    SP_TRY(sp_h5_create_atomic(path, comm, &s->h));
    status = sp_h5_table_create(s->h, "/catalog", s->cat.cols, s->cat.ncol, p->cat.n);
    if (status != SP_OK && s->cat.ncol > 800) /* the row type's description is over HDF5's 64 KiB */
        sp_err_context("%d bands need %d catalog columns (16 per band), more than one HDF5 table holds (56 bands "
                       "of 4-character names fit): process the bands in groups, one image list per run",
                       p->nbands, s->cat.ncol);
    SP_TRY(status);
    int n;
    const sp_h5_col *cc = sp_store_cell_cols(&n);
    SP_TRY(sp_h5_table_create(s->h, "/cells", cc, n, p->ncells));
    cc = sp_store_patch_cols(&n);
    SP_TRY(sp_h5_table_create(s->h, "/patches", cc, n, p->npatches));
    SP_TRY(sp_h5_table_create(s->h, "/frames", frame_cols, (int)(sizeof frame_cols / sizeof frame_cols[0]),
                              p->nframes));
    SP_TRY(sp_h5_group_create(s->h, "/epsf"));
    for (int b = 0; b < p->nbands; b++) {
        char path_b[128];
        long ng = p->opts.epsf_ngrid, sz = m->epsf_size > 0 ? m->epsf_size : p->opts.psf_size;
        long dims[4] = {ng, ng, sz, sz}, chunk[4] = {1, 1, sz, sz};
        snprintf(path_b, sizeof path_b, "/epsf/%s", p->bands[b]);
        SP_TRY(sp_h5_array_create(s->h, path_b, SP_H5_F32, 4, dims, chunk, NULL));
        long os = m->epsf_oversamp > 0 ? m->epsf_oversamp : 1, so = os * (sz - 1) + 1;
        long dos[4] = {ng, ng, so, so}, cos_[4] = {1, 1, so, so};
        snprintf(path_b, sizeof path_b, "/epsf/%s_os", p->bands[b]);
        SP_TRY(sp_h5_array_create(s->h, path_b, SP_H5_F32, 4, dos, cos_, NULL));
        snprintf(path_b, sizeof path_b, "/epsf/%s_nstars", p->bands[b]);
        SP_TRY(sp_h5_array_create(s->h, path_b, SP_H5_I32, 2, dims, NULL, NULL));
        snprintf(path_b, sizeof path_b, "/epsf/%s_fallback", p->bands[b]);
        SP_TRY(sp_h5_array_create(s->h, path_b, SP_H5_I32, 2, dims, NULL, NULL));
        if (m->epsf_poly_terms > 0) {
            long dp[3] = {m->epsf_poly_terms, so, so}, cp[3] = {1, so, so};
            snprintf(path_b, sizeof path_b, "/epsf/%s_poly", p->bands[b]);
            SP_TRY(sp_h5_array_create(s->h, path_b, SP_H5_F32, 3, dp, cp, NULL));
        }
    }
    if (m->epsf_poly_terms > 0) {
        long di[2] = {p->nbands, 8};
        SP_TRY(sp_h5_array_create(s->h, "/epsf/poly_info", SP_H5_F64, 2, di, NULL, NULL));
    }
    if (m->epsf_moffat_field) {
        long di[2] = {p->nbands, SP_MFIELD_INFO};
        SP_TRY(sp_h5_array_create(s->h, "/epsf/moffat_field", SP_H5_F64, 2, di, NULL, NULL));
    }
    SP_TRY(create_qa(s, p, m));
    SP_TRY(sp_h5_attr_set_long(s->h, "/epsf", "oversamp", m->epsf_oversamp > 0 ? m->epsf_oversamp : 1));
    SP_TRY(sp_h5_attr_set_long(s->h, "/epsf", "size", m->epsf_size > 0 ? m->epsf_size : p->opts.psf_size));
    SP_TRY(sp_h5_group_create(s->h, "/provenance"));
    const char *prov = "/provenance";
    SP_TRY(sp_h5_attr_set_str(s->h, prov, "config", m->config_yaml ? m->config_yaml : ""));
    SP_TRY(sp_h5_attr_set_str(s->h, prov, "command", m->command ? m->command : ""));
    SP_TRY(sp_h5_attr_set_str(s->h, prov, "version", SP_VERSION));
    SP_TRY(sp_h5_attr_set_str(s->h, prov, "git_hash", SP_GIT_HASH));
    SP_TRY(sp_h5_attr_set_long(s->h, prov, "mpi_size", m->mpi_size));
    SP_TRY(sp_h5_attr_set_long(s->h, prov, "threads_per_rank", m->threads));
    SP_TRY(sp_h5_attr_set_long(s->h, prov, "layout_version", SP_STORE_LAYOUT_VERSION));
    char hex[32];
    snprintf(hex, sizeof hex, "%016llx", (unsigned long long)m->science_hash);
    SP_TRY(sp_h5_attr_set_str(s->h, prov, "science_hash", hex));
    snprintf(hex, sizeof hex, "%016llx", (unsigned long long)m->inputs_hash);
    SP_TRY(sp_h5_attr_set_str(s->h, prov, "inputs_hash", hex));
    char when[64];
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", &tm);
    SP_TRY(sp_h5_attr_set_str(s->h, prov, "created_utc", when));
    SP_TRY(sp_h5_attr_set_str(s->h, "/", "bands", ""));
    {
        /* band list as one comma-separated string: readable without our code */
        char *bl = NULL;
        SP_ALLOC(bl, (size_t)p->nbands * (SP_BAND_MAX + 1) + 1);
        for (int b = 0; b < p->nbands; b++) {
            strcat(bl, p->bands[b]);
            if (b + 1 < p->nbands) strcat(bl, ",");
        }
        status = sp_h5_attr_set_str(s->h, "/", "bands", bl);
        free(bl);
        SP_TRY(status);
    }
    SP_TRY(sp_h5_attr_set_double(s->h, "/", "zp_ref", p->opts.zp_ref));
    SP_TRY(sp_h5_attr_set_long(s->h, "/", "tile_nx", p->nx));
    SP_TRY(sp_h5_attr_set_long(s->h, "/", "tile_ny", p->ny));
    SP_TRY(sp_h5_attr_set_str(s->h, "/", "tile_wcs_header", p->wcs_header));
    status = write_static(s, p, comm);
    SP_TRY(sp_mpi_agree(status, comm));
    SP_TRY(sp_h5_flush(s->h));
    SP_TRY(sp_h5_commit(s->h));
    SP_TRY(lock_store(path, comm, &s->lock_fd1));
cleanup:
    if (status != SP_OK) {
        sp_h5_close(&s->h); /* removes PATH.part if it was never committed */
        sp_store_catalog_spec_free(&s->cat);
        unlock_store(&s->lock_fd1);
    }
    return status;
}

int sp_store_open_resume(const char *path, const sp_plan *p, const sp_store_meta *m, MPI_Comm comm, sp_store *s,
                         int8_t *cell_status)
{
    int status = SP_OK, rank;
    char *sh = NULL, *ih = NULL;
    long *st = NULL;
    MPI_Comm_rank(comm, &rank);
    memset(s, 0, sizeof *s);
    SP_TRY(check_struct_layout());
    SP_TRY(sp_store_catalog_spec(p, &s->cat));
    SP_TRY(lock_store(path, comm, &s->lock_fd1));
    SP_TRY(sp_h5_open(path, 1, comm, &s->h));
    long ver = 0, nrows = 0;
    status = sp_h5_attr_get_long(s->h, "/provenance", "layout_version", &ver);
    if (status == SP_OK && ver != SP_STORE_LAYOUT_VERSION)
        status = SP_FAIL(SP_ERR_STATE, "%s: store layout version %ld, this surveyproc writes %d; start a new run", path,
                         ver, SP_STORE_LAYOUT_VERSION);
    char want[32];
    if (status == SP_OK) status = sp_h5_attr_get_str(s->h, "/provenance", "science_hash", &sh);
    snprintf(want, sizeof want, "%016llx", (unsigned long long)m->science_hash);
    if (status == SP_OK && strcmp(sh, want) != 0)
        status = SP_FAIL(SP_ERR_STATE,
                         "%s: the store was made with a different science configuration (hash %s, now %s); resume "
                         "only with the same settings, or start a new run without --resume (see `surveyproc inspect` "
                         "for the stored config)",
                         path, sh, want);
    if (status == SP_OK) status = sp_h5_attr_get_str(s->h, "/provenance", "inputs_hash", &ih);
    snprintf(want, sizeof want, "%016llx", (unsigned long long)m->inputs_hash);
    if (status == SP_OK && strcmp(ih, want) != 0)
        status = SP_FAIL(SP_ERR_STATE,
                         "%s: the inputs changed since the store was made (image list, frame sizes or headers, or the "
                         "catalog differ); resume needs the same inputs — start a new run without --resume",
                         path);
    if (status == SP_OK) status = sp_h5_table_nrows(s->h, "/cells", &nrows);
    if (status == SP_OK && nrows != p->ncells)
        status = SP_FAIL(SP_ERR_STATE, "%s: the store has %ld cells, the plan %d", path, nrows, p->ncells);
    if (status == SP_OK) status = sp_h5_table_nrows(s->h, "/catalog", &nrows);
    if (status == SP_OK && nrows != p->cat.n)
        status = SP_FAIL(SP_ERR_STATE, "%s: the store has %ld catalog rows, the input catalog %ld", path, nrows,
                         p->cat.n);
    if (status == SP_OK) {
        st = malloc((size_t)p->ncells * sizeof *st);
        if (!st) status = SP_FAIL(SP_ERR_NOMEM, "out of memory");
    }
    if (status == SP_OK) status = sp_h5_table_read_col_long(s->h, "/cells", "status", 0, p->ncells, st);
    SP_TRY(sp_mpi_agree(status, comm));
    for (int k = 0; k < p->ncells; k++) cell_status[k] = (int8_t)st[k];
    s->resumed = 1;
cleanup:
    free(sh);
    free(ih);
    free(st);
    if (status != SP_OK) {
        sp_h5_close(&s->h);
        sp_store_catalog_spec_free(&s->cat);
        unlock_store(&s->lock_fd1);
    }
    return status;
}

int sp_store_write_catalog_rows(sp_store *s, const long *idx, long n, const void *rows)
{
    if (n <= 0) return SP_OK;
    return sp_h5_table_write_rows(s->h, "/catalog", s->cat.cols, s->cat.ncol, idx, n, rows);
}

int sp_store_write_cell(sp_store *s, const sp_store_cellrow *row)
{
    int n;
    const sp_h5_col *c = sp_store_cell_cols(&n);
    return sp_h5_table_write(s->h, "/cells", c, n, row->id, 1, row);
}

int sp_store_write_patches(sp_store *s, const sp_store_patchrow *rows, long n)
{
    int status = SP_OK, nc;
    long *idx = NULL;
    const sp_h5_col *c = sp_store_patch_cols(&nc);
    SP_ALLOC(idx, n);
    for (long k = 0; k < n; k++) idx[k] = rows[k].id;
    status = sp_h5_table_write_rows(s->h, "/patches", c, nc, idx, n, rows);
cleanup:
    free(idx);
    return status;
}

int sp_store_close(sp_store *s)
{
    int status = sp_h5_close(&s->h);
    sp_store_catalog_spec_free(&s->cat);
    unlock_store(&s->lock_fd1);
    return status;
}

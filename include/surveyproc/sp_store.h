/* sp_store.h — the run's HDF5 store layout (DESIGN §6) on top of sp_h5:
 *
 *   /catalog     one row per input source: input columns, exclusion flags,
 *                aperture photometry and fit columns per band (units as attributes)
 *   /cells       geometry, sources, status (0 todo, 1 done, 2 failed, 3 skipped), rank, seconds
 *   /patches     geometry, sources, status, seconds
 *   /frames      per input frame: path, band, ZP_AUTO, SKYSIG, EGAIN, shape, checksum, stats
 *   /epsf/<band> [ncell_y, ncell_x, size, size] (sampled at image pixels) + <band>_nstars
 *                (-1 until built), <band>_fallback (0 ePSF, 1 Moffat fitted, 2 configured Moffat),
 *                <band>_os [ncell_y, ncell_x, S, S] the oversampled ePSF the fit uses
 *                (S = oversamp (size - 1) + 1; attribute /epsf oversamp); QA: <band>_growth_r,
 *                <band>_growth_ee (encircled energy), <band>_resid (mean star minus ePSF)
 *   /qa          white (block-averaged white stack), background/<band>[_rms] (docs/qa.md)
 *   /zp          per band: ZP, error, stars used / clipped (filled by the zp stage)
 *   /timing      per rank per region, written at the end of the run
 *   /provenance  attributes: config (YAML), command, version, git, MPI size, threads, hashes
 *
 * Every dataset is created in sp_store_create (collective) and flushed, so a
 * killed run leaves a valid file; cells then fill rows with independent writes,
 * catalog rows first and the cell's status last, so a cell marked done is
 * complete. sp_store_open_resume checks the science-config and inputs hashes.
 */
#ifndef SP_STORE_H
#define SP_STORE_H

#include "surveyproc/sp_h5.h"
#include "surveyproc/sp_plan.h"

#include <stdint.h>

enum { SP_CELL_TODO = 0, SP_CELL_DONE = 1, SP_CELL_FAILED = 2, SP_CELL_SKIPPED = 3 };

#define SP_STORE_LAYOUT_VERSION 3

/* Per-band catalog column indices. */
typedef struct {
    int flux_init, flux_aper, fluxerr_aper, aper_flags;
    int flux_apcal, fluxerr_apcal, apcal_flags, apcorr;
    int flux_fit, fluxerr_fit, fluxerr_cond, chi2dof, blend, psf_fallback, mag_fit, magerr_fit;
} sp_store_bandcols;

/* The /catalog table spec, built from the plan (band names, ID width). */
typedef struct {
    int ncol;
    sp_h5_col *cols;
    char *names;             /* storage for generated column names */
    size_t *offsets, rowsize;
    int nbands;
    /* fixed columns */
    int id, ra, dec, x_in, y_in, type, cell, patch, line;
    int excl_crop, excl_sat, excl_nan, excl_outside, excl_any, excl_reason, injected;
    int done, x_fit, y_fit, xerr, yerr, ra_fit, dec_fit, re_fit, q_fit, theta_fit, sersic_n;
    int re_err, q_err, theta_err, niter1, niter2, niter3, converged, hit_maxiter, fit_flags;
    sp_store_bandcols *band;
} sp_store_catalog;

int sp_store_catalog_spec(const sp_plan *plan, sp_store_catalog *spec);
void sp_store_catalog_spec_free(sp_store_catalog *spec);

/* Row buffer helpers: set column c of row r in a buffer of rows. */
void sp_store_set_f64(const sp_store_catalog *s, void *rows, long r, int c, double v);
void sp_store_set_i32(const sp_store_catalog *s, void *rows, long r, int c, int v);
void sp_store_set_u8(const sp_store_catalog *s, void *rows, long r, int c, int v);
void sp_store_set_str(const sp_store_catalog *s, void *rows, long r, int c, const char *v);
/* Fill n rows with each column's fill value (NaN, -1, 0, ""). */
void sp_store_fill_rows(const sp_store_catalog *s, void *rows, long n);
/* Input columns + exclusion flags of catalog source i into row r. */
void sp_store_input_row(const sp_store_catalog *s, const sp_plan *plan, long i, void *rows, long r);

/* Cell and patch rows. */
typedef struct {
    int32_t id, ix, iy;
    int64_t bx0, by0, bx1, by1, rx0, ry0, rx1, ry1;
    int64_t nsrc;
    uint8_t active;
    int8_t status;
    int32_t rank;
    double seconds, cost, mem_est;
    int64_t bytes_read;
} sp_store_cellrow;

typedef struct {
    int32_t id, cell, ix, iy;
    int64_t bx0, by0, bx1, by1, rx0, ry0, rx1, ry1;
    int64_t nsrc, nsrc_roi;
    uint8_t active;
    int8_t status;
    double seconds, chi2dof, resid_rms;
} sp_store_patchrow;

typedef struct {
    sp_h5 *h;
    sp_store_catalog cat;
    int resumed;
    int lock_fd1; /* rank 0: 1 + the fd holding the store's lock for the run (0: none) */
} sp_store;

#define SP_MFIELD_INFO 76

typedef struct {
    const char *config_yaml;
    const char *command;
    uint64_t science_hash, inputs_hash;
    int mpi_size, threads;
    int epsf_size;      /* stamp size of /epsf/<band> cubes */
    int epsf_oversamp;  /* oversampling of the /epsf/<band>_os cubes (<= 0: 1) */
    int epsf_poly_terms; /* > 0 (epsf.interpolation: polynomial): /epsf/<band>_poly [terms, so, so], the
                          * band-wide model's term stamps, and /epsf/poly_info [nbands, 8] (NaN until
                          * built: built flag, degree, stars used, x_ref, y_ref, scale, FWHM, stars given) */
    int epsf_moffat_field; /* epsf.moffat_field: /epsf/moffat_field [nbands, SP_MFIELD_INFO] (NaN until
                            * decided; layout in src/pipeline/psf_field.c and docs/outputs.md) */
    /* QA diagnostics (docs/qa.md); each is created only when its count/factor is > 0 */
    int qa_white_ds;    /* /qa/white [ceil(ny/ds), ceil(nx/ds)], block means of the white stack */
    int qa_bkg_ds;      /* /qa/background/<band>, <band>_rms: block means of the background maps */
    int qa_growth_n;    /* /epsf/<band>_growth_r [n], <band>_growth_ee [ncy, ncx, n] */
    int qa_resid;       /* /epsf/<band>_resid [ncy, ncx, size, size]: mean star - ePSF per cell */
    long qa_cut_start, qa_cut_n; /* /qa/cutouts {data,model,resid} [n, nbands, s, s] of catalog rows
                                  * start .. start+n-1, and row [n] */
    int qa_cut_size;             /* s */
    int qa_overview;             /* /qa/patch_overview {data,model,resid} [n, nbands, h, w], patch [n] */
} sp_store_meta;

/* COLLECTIVE. Create the store with every dataset, write the static tables
 * (frames, cells, patches geometry, provenance, input rows of every source),
 * flush. The file is written to `path` directly: the layout is valid as soon
 * as this returns. */
int sp_store_create(const char *path, const sp_plan *plan, const sp_store_meta *meta, MPI_Comm comm,
                    sp_store *s);

/* COLLECTIVE. Open an existing store for resume: checks the layout version, the
 * science hash and the inputs hash (SP_ERR_STATE with what differs), and
 * returns the status of every cell in cell_status[plan->ncells]. */
int sp_store_open_resume(const char *path, const sp_plan *plan, const sp_store_meta *meta, MPI_Comm comm,
                         sp_store *s, int8_t *cell_status);

/* INDEPENDENT. Write catalog rows (rows laid out per s->cat) for sources idx[n]. */
int sp_store_write_catalog_rows(sp_store *s, const long *idx, long n, const void *rows);
/* INDEPENDENT. Write one cell's row / a cell's patch rows. */
int sp_store_write_cell(sp_store *s, const sp_store_cellrow *row);
int sp_store_write_patches(sp_store *s, const sp_store_patchrow *rows, long n);

/* COLLECTIVE. Close (flush first). */
int sp_store_close(sp_store *s);

/* The patches whose data/model/residual the store keeps (/qa/patch_overview):
 * up to SP_STORE_OVERVIEW_MAX active patches with sources, evenly spread over
 * the tile. Returns the count; ids[SP_STORE_OVERVIEW_MAX]. *ds, *h, *w: the
 * block-mean factor and the stored image size (the largest patch ROI / ds). */
#define SP_STORE_OVERVIEW_MAX 24
int sp_store_overview_patches(const sp_plan *plan, int *ids, int *ds, int *h, int *w);

/* Radius of growth-curve point k (pixels): 0.5 (k + 1). */
double sp_store_growth_r(int k);
/* Shape of a block-averaged tile map with factor ds. */
void sp_store_qa_map_dims(const sp_plan *plan, int ds, long *ny, long *nx);

/* The cells / patches table specs (for readers). */
const sp_h5_col *sp_store_cell_cols(int *ncol);
const sp_h5_col *sp_store_patch_cols(int *ncol);

#endif

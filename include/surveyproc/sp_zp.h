/* sp_zp.h — zero-point calibration against a reference catalog (issue 10).
 *
 * Per band: match catalog sources to reference stars on the sky (one to one,
 * a 3-D grid on the unit sphere, O(N log N)); keep converged, unexcluded,
 * isolated stars with a reference magnitude in [zp.gaia_mag_min,
 * zp.gaia_mag_max] and a finite positive flux; per star
 *     ZP_i = mag_ref + 2.5 log10(FLUX_<b>_fit),
 *     err_i = sqrt((1.0857 FLUXERR/F)^2 + magerr_ref^2)
 * (F the measured flux in a first pass, then the flux mag_ref predicts);
 * MAD-based iterative clipping around the median; the ZP is the weighted
 * median of the survivors and its error 1.2533 * (weighted-MAD sigma) /
 * sqrt(n_eff). Then every row gets MAG_<b>_fit = ZP - 2.5 log10(FLUX) and
 * MAGERR_<b>_fit = sqrt((1.0857 FLUXERR/FLUX)^2 + sigma_ZP^2). The method and
 * the measured accuracy are in docs/zeropoints.md; the /zp layout in
 * docs/outputs.md.
 *
 * MPI: nothing here is collective. The store is calibrated by one process
 * through a serial sp_h5 handle (MPI_COMM_SELF or MPI_COMM_NULL): the run's
 * finish phase closes the store, then rank 0 calls sp_zp_calibrate_file();
 * `surveyproc zp CONFIG` does the same on an existing store.
 *
 * Thread safety: every function is reentrant; the store functions must not
 * run concurrently on one file (HDF5 is built without thread safety).
 */
#ifndef SP_ZP_H
#define SP_ZP_H

#include "surveyproc/sp_config.h"
#include "surveyproc/sp_h5.h"

#include <stdio.h>

#define SP_ZP_BAND_MAX 32 /* bytes of a band name, NUL included */

/* ---- sky index and matching ------------------------------------------------ */

/* Points on the sky bucketed in a 3-D grid of unit vectors (cell = chord of
 * cell_arcsec). Rows with non-finite RA/Dec are left out. Queries look at the
 * cells within the query radius, so any radius works; radii up to cell_arcsec
 * touch 27 cells. Built once, read-only afterwards (shareable between threads). */
typedef struct sp_zp_index sp_zp_index;

/* Given: ra, dec (deg) of n points (copied), cell_arcsec > 0.
 * Returned: *idx. SP_ERR_NOMEM, SP_ERR_INTERNAL (bad arguments). */
int sp_zp_index_build(const double *ra, const double *dec, long n, double cell_arcsec, sp_zp_index **idx);
void sp_zp_index_free(sp_zp_index **idx); /* sets *idx = NULL; safe on NULL */

/* Nearest indexed point to (ra, dec) within radius_arcsec, other than point
 * `exclude` (-1: none). Ties go to the lower index. Returns its index or -1;
 * *sep_arcsec (may be NULL) gets the separation. */
long sp_zp_index_nearest(const sp_zp_index *idx, double ra, double dec, double radius_arcsec, long exclude,
                         double *sep_arcsec);

/* Number of indexed points within radius_arcsec of (ra, dec), other than `exclude`. */
long sp_zp_index_count(const sp_zp_index *idx, double ra, double dec, double radius_arcsec, long exclude);

/* Angular separation in arcsec (haversine; exact at small and large angles). */
double sp_zp_sep_arcsec(double ra1, double dec1, double ra2, double dec2);

/* One-to-one match of reference stars (set R) to catalog sources (set C):
 * a pair (j, i) is kept when i is the nearest source of reference star j
 * within radius_arcsec AND j is the nearest reference star of source i
 * (ties go to the lower index). Cost O((|R| + |C|) log |C|) with the indexes.
 * Given: cat = index of cat_ra/cat_dec, ref = index of ref_ra/ref_dec[nref], radius.
 * Returned: cat_of_ref[nref] (source index or -1), sep_arcsec[nref] (NaN when
 * unmatched; may be NULL), *nmatch. SP_OK, or SP_ERR_INTERNAL for NULLs. */
int sp_zp_match(const sp_zp_index *cat, const double *cat_ra, const double *cat_dec, const sp_zp_index *ref,
                const double *ref_ra, const double *ref_dec, long nref, double radius_arcsec, long *cat_of_ref,
                double *sep_arcsec, long *nmatch);

/* ---- the reference catalog ------------------------------------------------- */

typedef struct {
    char *path;
    long n;              /* rows with finite RA and DEC */
    double *ra, *dec;    /* deg */
    long *line;          /* 1-based line in the CSV */
    int nbands;
    double *mag;         /* n * nbands, [j * nbands + b]; NaN when blank or no column */
    double *magerr;      /* n * nbands; 0 when the catalog has no error column for the band */
    int *has_band;       /* nbands: 1 if the CSV has mag_<band> */
    int *has_err;        /* nbands: 1 if it has magerr_<band> or e_mag_<band> */
    long nskipped;       /* rows dropped for non-finite RA/DEC */
} sp_zp_refcat;

/* Read a reference CSV: RA, DEC (deg, case-insensitive, required), per band
 * mag_<band> (AB) and optionally magerr_<band> or e_mag_<band> (mag). A band
 * without a mag column is has_band = 0 (the caller flags it). Errors:
 * SP_ERR_IO (missing/unreadable), SP_ERR_INPUT ("FILE: no RA column",
 * "FILE:LINE: column mag_g: 'x' is not a number"). */
int sp_zp_refcat_read(const char *path, const char *const *bands, int nbands, sp_zp_refcat *ref);
void sp_zp_refcat_free(sp_zp_refcat *ref);

/* ---- the estimator ----------------------------------------------------------- */

/* Band flags (bits) in sp_zp_band_result.flag and /zp/bands "flag". */
enum {
    SP_ZP_F_FEW_STARS = 1,   /* fewer than zp.min_stars stars survived: no ZP, MAG columns NaN */
    SP_ZP_F_NO_REF_BAND = 2, /* the reference catalog has no mag_<band> column: no ZP */
    SP_ZP_F_HIGH_CLIP = 4,   /* more than half of the selected stars were clipped (ZP kept: check the QA plot) */
    SP_ZP_F_NO_MATCH = 8     /* no reference star matched a catalog source (no overlap): no ZP; with FEW_STARS */
};

typedef struct {
    double zp;        /* weighted median of the surviving ZP_i (NaN when flagged FEW_STARS) */
    double zp_err;    /* 1.2533 * weighted-MAD sigma / sqrt(n_eff), floored at 1/sqrt(sum 1/err_i^2) */
    double scatter;   /* 1.4826 * MAD of the surviving ZP_i about their median */
    double sigma_int; /* extra scatter beyond the stars' errors, sqrt(max(0, scatter^2 - median err_i^2)) */
    double n_eff;     /* (sum w)^2 / sum w^2 of the survivors */
    long n_in, n_used, n_clipped;
    int niter;        /* clipping iterations that removed stars */
    int flag;         /* SP_ZP_F_FEW_STARS or 0 (HIGH_CLIP is set by the caller's policy here too) */
} sp_zp_estimate;

/* Sigma-clipped weighted median of n per-star zero points.
 * Clipping (each iteration, on the stars still kept): m = median, s = 1.4826 *
 * MAD; a star is clipped when |ZP_i - m| > clip_sigma * max(s, err_i). Stops
 * when an iteration clips nothing or after clip_max_iters iterations (0: no
 * clipping). The survivors are weighted 1 / (err_i^2 + sigma_int^2).
 * Given: zp[n], err[n] (finite, err > 0; other entries are ignored and
 * reported clipped), clip_sigma > 0, clip_max_iters >= 0, min_stars >= 1.
 * Returned: clipped[n] (1 clipped or ignored, 0 used; may be NULL), *est.
 * Fewer than min_stars survivors: est->flag = SP_ZP_F_FEW_STARS, zp = NaN.
 * SP_ERR_NOMEM only. Thread-safe. */
int sp_zp_estimate_run(const double *zp, const double *err, long n, double clip_sigma, int clip_max_iters,
                       int min_stars, unsigned char *clipped, sp_zp_estimate *est);

/* A band's ZP from its selected stars (mag_ref, magerr_ref >= 0, flux > 0,
 * fluxerr >= 0, all finite): zp_i = mag_ref + 2.5 log10(flux), then two
 * passes of sp_zp_estimate_run. Pass 1 uses err_i = sqrt((1.0857 fluxerr /
 * flux)^2 + magerr^2); pass 2 replaces flux in the error by the flux the
 * reference magnitude predicts with the pass-1 ZP, 10^(-0.4 (mag_ref - ZP1)),
 * so a star's weight does not depend on its own noise: with the measured
 * flux, upward fluctuations get smaller errors and more weight, which biases
 * the ZP upward (measured: +0.0006 mag when the faintest stars have 10% flux
 * errors, +0.002 at 20%; two passes: < 0.0001).
 * Returned: zp_i[n], err_i[n] (the errors used), clipped[n], *est. */
int sp_zp_band_estimate(const double *mag, const double *magerr, const double *flux, const double *fluxerr, long n,
                        double clip_sigma, int clip_max_iters, int min_stars, double *zp_i, double *err_i,
                        unsigned char *clipped, sp_zp_estimate *est);

/* Weighted median with midpoint interpolation: sorted values x_(k) sit at
 * cumulative weight positions (W_k - w_k / 2) / W, and the median is the
 * linear interpolation at 0.5 (equal weights give the ordinary median).
 * Entries with w <= 0 or non-finite x/w are ignored. NaN when none. work:
 * NULL or scratch of 2 n doubles. Returns SP_OK or SP_ERR_NOMEM. */
int sp_zp_weighted_median(const double *x, const double *w, long n, double *work, double *median);

/* ---- the store stage --------------------------------------------------------- */

typedef struct {
    char band[SP_ZP_BAND_MAX];
    double zp, zp_err, scatter, sigma_int, n_eff;
    long nmatched;        /* reference stars matched to a catalog source */
    long nselected;       /* matched and passing every cut in this band */
    long nused, nclipped;
    long nrej_converged;  /* matched but CONVERGED != 1 */
    long nrej_excluded;   /* matched but excluded_any != 0 */
    long nrej_isolation;  /* another catalog source within zp.isolation_radius_arcsec */
    long nrej_magrange;   /* reference mag blank or outside [gaia_mag_min, gaia_mag_max] */
    long nrej_flux;       /* flux not finite and positive, or its error not finite and >= 0 */
    int niter;
    int flag;             /* SP_ZP_F_* */
} sp_zp_band_result;

typedef struct {
    int nbands;
    sp_zp_band_result *band;
    long ncat;            /* catalog rows */
    long nref;            /* reference stars with finite positions */
    long nmatched;
    long nstars;          /* rows written to /zp/stars */
    long nmag;            /* catalog rows given a finite MAG in some band */
    double seconds;
} sp_zp_result;

void sp_zp_result_free(sp_zp_result *res);
/* One line per band: ZP, error, stars used/clipped/matched, flag text. */
void sp_zp_result_print(FILE *f, const sp_zp_result *res);
/* "few stars", "no reference band", ... for a flag value (static text). */
const char *sp_zp_flag_text(int flag);

/* Calibrate an open store (serial, writable handle): read /catalog and the
 * reference catalog, compute the ZPs, replace /zp (/zp/bands, /zp/stars,
 * attributes; "complete" = 1 written last), and rewrite MAG_<b>_fit and
 * MAGERR_<b>_fit of every row (NaN where the band has no ZP or the flux is not
 * positive). Memory: ~64 bytes per catalog row (positions and the sky
 * index) plus chunks of 65536 rows.
 * Given: h (serial, writable), z (the zp section), refcat_path.
 * Returned: res (may be NULL). Errors: SP_ERR_STATE (parallel or read-only
 * handle), SP_ERR_INPUT (store without /catalog, bands or the fit columns;
 * bad reference catalog), SP_ERR_IO, SP_ERR_HDF5, SP_ERR_NOMEM. A band
 * without enough stars is not an error: it is flagged and warned about. */
int sp_zp_calibrate(sp_h5 *h, const sp_cfg_zp *z, const char *refcat_path, sp_zp_result *res);

/* Read /zp/bands of a store back into res (for `inspect`, QA, exports):
 * band, zp, zp_err, scatter, sigma_int, n_eff, counts and flag; ncat, nref,
 * nmatched from the attributes. SP_ERR_INPUT "no /zp" if the store has none
 * (or an interrupted one: attribute complete != 1). Independent read. */
int sp_zp_read(sp_h5 *h, sp_zp_result *res);

/* The finish-phase entry: open `store_path` serially (MPI_COMM_SELF),
 * sp_zp_calibrate with cfg->zp and cfg->inputs.reference_catalog, close.
 * Not collective: call it on one rank after the store was closed by all.
 * cfg->zp.enabled false or no reference catalog: logs why, returns SP_OK with
 * res->nbands = 0 and leaves the store untouched. */
int sp_zp_calibrate_file(const char *store_path, const sp_config *cfg, sp_zp_result *res);

/* ---- optional injection of reference stars (zp.inject_gaia_sources) ------- */

/* Reference stars with no catalog source within zp.match_radius_arcsec and a
 * magnitude in [gaia_mag_min, gaia_mag_max] in at least one band: the plan
 * may append them to the catalog as extra STAR sources (flagged injected) so
 * the fitter measures them and they can calibrate the ZP. */
typedef struct {
    long n;
    double *ra, *dec;      /* deg */
    double *flux_init;     /* n * nbands, flux in the zp_ref system: 10^(-0.4 (mag - zp_ref)); NaN if no mag */
    long *ref_line;        /* line in the reference CSV */
    char (*id)[32];        /* "REF<line>": unique, never clashing with numeric IDs */
    int nbands;
} sp_zp_inject;

/* Given: ref (read with the run's bands, in the same order), the catalog's
 * ra/dec[ncat] (non-finite rows are ignored), z, zp_ref. Returned: out (free
 * with sp_zp_inject_free). SP_ERR_NOMEM. */
int sp_zp_inject_sources(const sp_zp_refcat *ref, const double *ra, const double *dec, long ncat,
                         const sp_cfg_zp *z, double zp_ref, sp_zp_inject *out);
void sp_zp_inject_free(sp_zp_inject *inj);

/* ---- the aperture correction (apcorr.c; before the zero points) -------------------- */

/* Band flags (bits) in sp_apcorr_band.flag and /apcorr/bands "flag". */
enum {
    SP_APCORR_F_FEW_STARS = 1, /* fewer than zp.apcorr_min_stars sources survived: not corrected */
    SP_APCORR_F_NO_COLUMN = 2, /* the store has no FLUX_<band>_APCAL / APCORR_<band> (earlier layout) */
    SP_APCORR_F_OFF = 4        /* zp.apcorr false: the rows hold the model fluxes */
};

typedef struct {
    char band[SP_ZP_BAND_MAX];
    double factor;      /* FLUX_<band>_fit = model flux x factor (1 when flagged) */
    double factor_err;  /* its 1-sigma error (NaN when flagged) */
    double scatter;     /* 1.4826 MAD of the used sources' APCAL / model flux */
    double sigma_extra; /* their scatter beyond the errors (chi2 = dof), added to each error */
    long ncand, nused, nclipped;
    int flag;           /* SP_APCORR_F_* */
} sp_apcorr_band;

typedef struct {
    int nbands;
    sp_apcorr_band *band;
} sp_apcorr_result;
void sp_apcorr_result_free(sp_apcorr_result *r);

/* One band's factor from n candidates (aperture flux and error, model flux and error):
 * x_i = apflux / flux, err_i = hypot(apfluxerr, fluxerr) / flux (linear: the log of a
 * noisy aperture flux is biased; the model flux in both denominators, the less noisy),
 * then sp_zp_estimate_run (clipping, weighted median); the survivors' scatter beyond
 * their errors (chi2 = dof about the weighted mean) is added to every error and the
 * estimate redone, so no single source carries the median; that gives the factor. Candidates
 * with a non-positive flux or aperture error, or a non-finite aperture flux, are ignored. Scratch x[n], e[n], clipped[n]. Fewer than min_stars
 * survivors: factor 1, flag SP_APCORR_F_FEW_STARS. SP_ERR_NOMEM only. */
int sp_apcorr_estimate(const double *apflux, const double *apfluxerr, const double *flux, const double *fluxerr,
                       long n, double clip_sigma, int clip_max_iters, int min_stars, double *x, double *e,
                       unsigned char *clipped, sp_apcorr_band *out);

/* The aperture correction of a store opened writable by one process: candidates are
 * converged (CONVERGED 1), unexcluded point sources (RE_FIT blank) with
 * FLUX_fit / FLUXERR_fit >= z->apcorr_snr_min, BLEND <= z->apcorr_blend_max and
 * APCAL_FLAGS 0; clipping as the zero points (z->clip_sigma, clip_max_iters).
 * Rewrites FLUX_<b>_fit, FLUXERR_<b>_fit, FLUXERR_<b>_cond (from the model fluxes:
 * stored / APCORR_<b>, so a re-run does not compound) and APCORR_<b> of every row,
 * and replaces /apcorr (bands table; attribute complete 0 while the rows are
 * rewritten). With z->apcorr false the rows go back to the model fluxes (flag
 * SP_APCORR_F_OFF). A store without the APCAL columns is left as it is (a warning). */
int sp_apcorr_store(sp_h5 *h, const sp_cfg_zp *z, sp_apcorr_result *res);

#endif

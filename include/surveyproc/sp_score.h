/* sp_score.h — accuracy of a store against a simulator's truth (`surveyproc score`).
 *
 * What it measures (docs/scoring.md has the definitions and why):
 *  - match rate: truth sources (truth.csv `id`) found in /catalog (`ID` parsed as an integer);
 *  - per band, per true type (STAR, EXP, DEV, galaxies, all) and per bin of true magnitude:
 *    counts (truth, matched, measured, flagged, used), median flux bias f/f_true - 1, robust
 *    scatter of (f - f_true)/f_true, median and robust std of the pulls (f - f_true)/sigma_f,
 *    rms position error (X_FIT/Y_FIT against the true x, y);
 *  - for isolated stars (no truth flag) with a true SNR in a range (20..500 by default): the
 *    robust scatter of (f - f_true) over the Cramér–Rao bound of each star, with the position
 *    known and with (F, x, y) free, and the position scatter over its bound;
 *  - galaxies (EXP/DEV, no truth flag, true Re in [gal_re_lo, gal_re_hi], f_true/sigma_f >=
 *    gal_snr_min; defaults 1-6 pix, 50): bias and pulls;
 *  - crowded stars: the densest `crowd_fraction` (default 0.1) of the truth sources by their count
 *    of truth neighbours within `crowd_radius` (default 10 pix), stars among them without a
 *    saturated / bad-pixel / edge / forced-bright flag: the same figures as the isolated sample
 *    (scatter over the star's own isolated-star bound) and per magnitude bin, to compare codes at
 *    fixed magnitude;
 *  - zero-point error per band (/zp against the truth), and the ePSF residual (/epsf/<band> against
 *    the true PSF at each cell centre) when the store has them.
 * The CRLB uses the simulator's exact PSF model at the star (sp_sim_load of the truth folder:
 * the same function that rendered the frames, not an interpolation of the truth_psf grid) and the
 * noise model of docs (GLOSSARY): per frame, V_i = (SKYSIG^2 + max(raw_i, 0)/EGAIN) scale^2 with
 * raw_i = F P_i / scale the star's own counts, scale = 10^(-0.4 (ZP_AUTO - zp_ref)), from the
 * frames' headers; the Fisher information of the frames of a band adds.
 *
 * Robust sigma = 1.4826 x MAD about the median. Figures are NaN when there is nothing to measure
 * (JSON null); counts are always set.
 *
 * Errors: int status (sp_error.h) with the file / column named: SP_ERR_IO (missing truth.csv,
 * store, image), SP_ERR_INPUT (store without /catalog or a column, truth without a column, no
 * matching ID), SP_ERR_HDF5, SP_ERR_FITS, SP_ERR_NOMEM.
 * Threads: sp_score_run uses OpenMP for the bounds; the primitives are thread-safe. Not MPI
 * (serial; the CLI runs it on rank 0).
 */
#ifndef SP_SCORE_H
#define SP_SCORE_H

#include <stddef.h>
#include <stdio.h>

/* ---- primitives (thread-safe, no allocation unless said) ------------------ */

/* Median of the finite values of v[0..n-1]; v is reordered. NaN if none. */
double sp_score_median(double *v, long n);

/* 1.4826 x median |v - median(v)| over the finite values; v is reordered. NaN if fewer than 2. */
double sp_score_rsigma(double *v, long n);

/* Noise of one frame, as its header gives it. */
typedef struct {
    double skysig; /* ADU, SKYSIG */
    double egain;  /* e-/ADU, EGAIN (<= 0 or non-finite: no source Poisson term) */
    double scale;  /* 10^(-0.4 (ZP_AUTO - zp_ref)) */
} sp_score_noise;

/* Cramér–Rao bounds of one star. */
typedef struct {
    double sig_f_known; /* flux, position known: 1 / sqrt(sum P^2 / V) */
    double sig_f_free;  /* flux, (F, x, y) free: sqrt of [Fisher^-1]_FF */
    double sig_x, sig_y;/* position (pix), (F, x, y) free */
} sp_score_crlb;

/* Bounds of a star of flux F (zp_ref units) from its PSF on npix pixels: P[i] (fraction of the
 * flux in pixel i) and its derivatives dPx[i], dPy[i] with respect to the star's x and y
 * (NULL: position bounds and sig_f_free are NaN), seen by nfr frames of the same band with
 * noise fr[]. Fisher matrix F_jk = sum_frames sum_i (dm_i/dθ_j)(dm_i/dθ_k) / V_i over
 * θ = (F, x, y), m_i = F P_i. SP_ERR_INPUT on bad arguments, SP_ERR_NUMERIC if the Fisher matrix
 * is singular (then the affected fields are NaN). */
int sp_score_crlb_pixels(const double *P, const double *dPx, const double *dPy, long npix, double flux,
                         const sp_score_noise *fr, int nfr, sp_score_crlb *out);

/* ---- the score ---------------------------------------------------------------- */

typedef enum { SP_SCORE_FLUX_FIT = 0, SP_SCORE_FLUX_APER = 1 } sp_score_flux;

enum { SP_SCORE_STAR = 0, SP_SCORE_EXP, SP_SCORE_DEV, SP_SCORE_GAL, SP_SCORE_ALL, SP_SCORE_NTYPE };
extern const char *const sp_score_type_names[SP_SCORE_NTYPE]; /* "STAR" "EXP" "DEV" "GAL" "ALL" */

typedef struct {
    sp_score_flux flux;      /* which columns: FLUX_<b>_fit (default) or FLUX_<b>_APER */
    double mag_lo, mag_hi, mag_step; /* bins of true AB magnitude (default 14, 22, 1) */
    double snr_lo, snr_hi;   /* isolated-star sample by true SNR F / sig_f_known (default 20, 500) */
    double gal_snr_min;      /* galaxy headline sample: f_true / sigma_f >= this (default 50) */
    double gal_re_lo, gal_re_hi; /* ... and true Re (pix) in this range (default 1, 6) */
    double crowd_radius;     /* crowded sample: neighbours counted within this (pix, default 10) */
    double crowd_fraction;   /* ... the densest this fraction of the truth sources (default 0.1) */
    const char *ids_from;    /* NULL, or a store: score only the truth sources it has a /catalog row
                              * for (two codes on the same sources; crowding still counts them all) */
    const char *psf_dir;     /* folder with sim.yaml for the true PSF (NULL: the truth's folder) */
    double aper_r;           /* aperture columns: divide flux and error by the true PSF's encircled
                              * energy within this radius (pix) at each source, i.e. a point-source
                              * aperture correction; <= 0 or NaN: none; the CLI takes the run's
                              * patch_run.r_ap from /provenance */
} sp_score_opts;

void sp_score_opts_default(sp_score_opts *o);

/* Figures of one group of sources. */
typedef struct {
    double mag_lo, mag_hi;   /* the bin (NaN for "all magnitudes") */
    long n_truth;            /* truth sources in the group */
    long n_matched;          /* ... with a /catalog row */
    long n_measured;         /* ... with a finite flux and a finite error > 0 */
    long n_flagged;          /* matched and flagged (excluded, not converged / fit or aperture flags) */
    long n_used;             /* measured and not flagged: the figures below */
    double bias;             /* median f/f_true - 1 */
    double scatter;          /* robust sigma of (f - f_true)/f_true */
    double pull_median, pull_std; /* median, robust sigma of (f - f_true)/sigma_f */
    long n_pos;              /* used sources with a finite X_FIT, Y_FIT */
    double pos_rms;          /* sqrt(mean(dx^2 + dy^2)) (pix) */
    /* isolated-star sample only (NaN elsewhere) */
    long n_crlb;
    double scatter_over_crlb_known, scatter_over_crlb_free; /* robust sigma of (f - f_true)/CRLB */
    double pos_over_crlb;    /* robust sigma of dx/sig_x and dy/sig_y together */
    double snr_median;       /* median true SNR of the sample */
} sp_score_stats;

typedef struct {
    char name[32];
    int nframes;
    int flux_all_nan;        /* 1 if the flux column is NaN on every matched row */
    double zp, zp_expected, zp_error; /* /zp zero point, the truth's, their difference (mag; NaN) */
    double epsf_resid;       /* median over cells of ||m - t|| / ||t|| (NaN: no ePSF in the store) */
    double epsf_flux_rms, epsf_flux_max; /* over cells: rms and max |e| of e = sum m t / sum m^2 - 1, the
                              * flux error the cell's stamp m makes on a faint star of the true PSF t */
    double aper_corr;        /* median encircled energy applied to the aperture columns (NaN: none) */
    sp_score_stats type[SP_SCORE_NTYPE];      /* all magnitudes */
    int nbins;
    sp_score_stats *bin;     /* nbins * SP_SCORE_NTYPE, [k * SP_SCORE_NTYPE + t] */
    sp_score_stats iso;      /* isolated stars in the SNR range (the headline star sample) */
    sp_score_stats gal;      /* galaxies, no truth flag, Re in range, f_true/sigma_f >= gal_snr_min */
    sp_score_stats crowd;    /* crowded stars in the SNR range (bounds: their isolated-star CRLB) */
    sp_score_stats *crowd_bin; /* nbins: crowded stars per bin of true magnitude (all SNR) */
} sp_score_band;

typedef struct {
    char *store, *truth;     /* paths */
    sp_score_flux flux;
    double zp_ref;
    long n_truth, n_rows, n_matched, n_rows_unmatched;
    double match_rate;       /* n_matched / n_truth */
    int nbands;
    sp_score_band *band;
    /* headline figures: medians over bands (NaN = null) */
    double star_flux_scatter_over_crlb; /* position-free bound for fit columns, known for aperture */
    double star_flux_scatter_over_crlb_known, star_flux_scatter_over_crlb_free;
    double star_pull_std, star_flux_bias, star_pos_scatter_over_crlb;
    double galaxy_flux_bias, galaxy_pull_std;
    double crowd_star_scatter_over_crlb, crowd_star_pull_std, crowd_star_flux_bias;
    long crowd_min_neighbours;  /* the crowded sample: sources with at least this many neighbours */
    long n_crowded;             /* truth sources in it (all types) */
    double zp_error_mag_max; /* max |zp_error| over bands with a ZP */
    double epsf_resid_rms;   /* median over bands and cells */
    double epsf_flux_err_max; /* largest epsf_flux_max over bands */
    double seconds;
    char *notes;             /* newline-separated remarks (NaN columns, missing /zp, ...), "" if none */
    sp_score_opts opts;
} sp_score_result;

/* Score `store` against the truth catalog `truth_csv` (its folder holds sim.yaml,
 * image_list.txt and the images). Given opts (NULL: defaults). Returned *r (free with
 * sp_score_result_free). */
int sp_score_run(const char *store, const char *truth_csv, const sp_score_opts *opts, sp_score_result *r);
void sp_score_result_free(sp_score_result *r);

/* The readable table. */
void sp_score_print(FILE *f, const sp_score_result *r);

/* The JSON report (NaN as null), written to a temporary file and renamed. SP_ERR_IO. */
int sp_score_write_json(const char *path, const sp_score_result *r);

/* Bars. NaN fields are not checked. A bar on a figure that is NaN fails ("not measured"). */
typedef struct {
    double pull_std_lo, pull_std_hi; /* star_pull_std in [lo, hi] */
    double scatter_crlb_max;         /* star_flux_scatter_over_crlb <= */
    double bias_max;                 /* |star_flux_bias| <= */
    double galaxy_bias_max;          /* |galaxy_flux_bias| <= */
    double match_rate_min;           /* match_rate >= */
    double pos_crlb_max;             /* star_pos_scatter_over_crlb <= */
    double zp_error_max;             /* zp_error_mag_max <= */
} sp_score_require;

void sp_score_require_none(sp_score_require *q);

/* Check the bars: *nfail missed bars, msg gets one line per bar ("PASS ..."/"FAIL ..."). */
void sp_score_check(const sp_score_result *r, const sp_score_require *q, char *msg, size_t n, int *nfail);

#endif

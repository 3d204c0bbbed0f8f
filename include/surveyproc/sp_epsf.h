/* sp_epsf.h — PSF-star selection, the empirical PSF (ePSF) builder with its
 * analytic fallback, and the PSF at any position of a tile from the grid of
 * cell ePSFs (issue 5). Method and measured accuracy: docs/psf.md.
 *
 * Images are one band of one cell, background-subtracted (sp_bkg_subtract),
 * pixel centres at integer coordinates. Unusable pixels: not finite, mask != 0,
 * or ivar <= 0 when ivar is given.
 *
 * ePSF builder (after Anderson & King 2000 and photutils' EPSFBuilder). The
 * ePSF is sampled on an oversampled grid (sp_psf convention, size
 * oversamp*(final_size-1)+1) and evaluated between samples with the same
 * Keys cubic kernel as sp_psf_render, so the model the builder fits is the
 * model the photometry uses. Each iteration: (1) fit every star's centre and
 * flux with the current ePSF (weighted Gauss-Newton on a core box);
 * (2) from the 2nd iteration, reject pixels contaminated by other sources
 * (3x3 / 5x5 residual means beyond reject_sigma) and mask catalogued
 * neighbours; re-estimate each star's local background from its cutout
 * outside the core (model-subtracted); (3) compute every cutout pixel's
 * residual (data - bkg)/flux - ePSF, clip outliers (> clip_sigma in noise
 * units, with a floor of 2% of the model), and accumulate them, weighted by
 * flux^2 ivar, on the nearest grid node; (4) add the weighted mean residual smoothed by a
 * triangle kernel of width 2*oversamp-1 (normalised convolution; the kernel
 * has zeros at the image-pixel frequency and its harmonics, so the uneven
 * sub-pixel coverage of a few stars cannot print a grid pattern, while every
 * lower frequency still converges to the data); (5) recentre (windowed
 * centroid -> Keys resampling), (6) normalise to unit flux. The first estimate
 * is the weighted nearest-node stack smoothed the same way. With
 * spatial_degree 1 the stack solves, per node, for the PSF at the cell's
 * reference point and its linear gradients across the cell (3x3 weighted least
 * squares), and each star is fitted with the PSF at its own position.
 *
 * Quality gate: fewer than min_stars usable stars, or a non-finite, strongly
 * negative (min < -max_neg_frac * peak) or off-centre (> max_center_offset)
 * result -> fallback: an elliptical Moffat (FWHM, beta, q, theta) fitted by
 * Levenberg-Marquardt jointly with the stars' centres and fluxes to whatever
 * stars there are, or, if there are none or that fit fails, the configured
 * fallback_fwhm / fallback_beta Moffat. The result records which and why.
 *
 * Thread safety: no globals; every function is reentrant, so the bands of a
 * cell may be built in parallel (OpenMP) by the caller. Not MPI-collective.
 */
#ifndef SP_EPSF_H
#define SP_EPSF_H

#include "surveyproc/sp_detect.h"
#include "surveyproc/sp_psf.h"

#include <stdint.h>

/* ------------------------------------------------------------------------ */
/* PSF-star selection                                                         */

typedef enum {
    SP_PSFSTAR_DETECT = 0,    /* candidates from detections */
    SP_PSFSTAR_REFERENCE = 1, /* candidates from reference-catalog positions */
    SP_PSFSTAR_BOTH = 2       /* references first (snapped to a detection within match_radius), then detections */
} sp_psfstar_mode;

typedef struct {
    sp_psfstar_mode mode;      /* psfstar_mode; default DETECT */
    int stamp_size;            /* star cutout side in image pixels (= final_psf_size, odd); default 41 */
    double edge_pad;           /* margin beyond half a stamp from the image border (pixels); default 10 */
    double q_min, q_max;       /* roundness q = b/a (q_range); default 0.8 .. 1.0 */
    double min_sep;            /* isolation: no other detection / reference within this (pixels); default 30 */
    double min_sep_flux_ratio; /* neighbours fainter than this fraction of the star's flux do not count
                                * for isolation (0: every neighbour counts); the star's flux is its
                                * list flux (detection or catalog) when > 0, else the one measured
                                * here; default 0 */
    double min_sep_always;     /* with a flux ratio: any neighbour closer than this counts, however
                                * faint (pixels; <= 0: 1.5 fwhm); default 0 */
    const double *others;      /* more sources for the isolation test only (e.g. the input catalog):
                                * nothers triples (x, y, flux) in image pixels; flux <= 0 or NaN:
                                * always counts; may be NULL */
    int nothers;
    double snr_min;            /* SNR floor (matched filter, this band); default 20 */
    double size_tol;           /* stellar locus: a detected candidate whose windowed size sqrt(a^2 + b^2)
                                * is off the locus (the densest size among the candidates that passed
                                * every other cut: the median of the narrowest run of a third of them)
                                * by more than this fraction is rejected (an extended source: a
                                * galaxy; or a defect); reference-backed candidates are exempt; applied
                                * with >= 5 candidates; <= 0: off; default 0 */
    double peak_max;           /* reject peaks above this (non-linearity; <= 0: off); default 0 */
    int max_stars;             /* keep at most this many, brightest first; default 30 */
    double fwhm;               /* expected FWHM in pixels (measurement window, core radius); default 4 */
    double core_radius;        /* no unusable / saturated pixel within (pixels; <= 0: 1.5 fwhm); default 0 */
    double bkg_rin, bkg_rout;  /* local background annulus (star_local_bkg_*; pixels); default
                                * stamp_size/2 + 2 .. stamp_size/2 + 10 */
    double match_radius;       /* reference <-> detection matching (pixels); default 3 */
    uint8_t sat_bits;          /* mask bits meaning saturated; default SP_PIX_SAT */
} sp_starsel_params;

typedef struct {
    double x, y;        /* centre: windowed centroid measured in this band */
    double flux;        /* flux estimate (window-matched, see sp_detect_measure) */
    double snr;         /* matched-filter SNR in this band */
    double q;           /* roundness b/a in this band */
    double bkg;         /* local annulus background per pixel (clipped mode) */
    double bkg_rms;     /* clipped sigma in the annulus */
    int origin;         /* SP_PSFSTAR_DETECT / REFERENCE / BOTH (found in both lists) */
    int index;          /* index into the detection list (DETECT, BOTH) or reference list (REFERENCE) */
} sp_psfstar;

/* Rejection counts (a candidate is counted under the first cut it fails). */
typedef struct {
    int ncand, n_edge, n_flagged, n_snr, n_round, n_peak, n_crowded, n_size, n_selected;
    double locus;       /* the stellar-locus size (pixels; 0 when the size cut did not apply) */
} sp_starsel_stats;

void sp_starsel_params_default(sp_starsel_params *p);

/* Select PSF stars in one band of a cell.
 * Given: img (background-subtracted), rms (per-pixel noise, may be NULL ->
 *        robust global sigma), mask (may be NULL); det[ndet] detections (from
 *        this band or the white stack; positions are re-measured here) and/or
 *        ref_xy[2*nref] reference positions (pixels) — either may be empty as
 *        the mode allows; p (NULL: defaults).
 * Returned: *stars (malloc'd, caller frees; NULL when none), *nstars, sorted by
 *        decreasing flux; stats (may be NULL).
 * Isolation considers every detection and every reference position.
 * Returns SP_OK, SP_ERR_INPUT (bad parameters), SP_ERR_NOMEM. */
int sp_starsel_select(const float *img, const float *rms, const uint8_t *mask, int nx, int ny,
                      const sp_source *det, int ndet, const double *ref_xy, int nref, const sp_starsel_params *p,
                      sp_psfstar **stars, int *nstars, sp_starsel_stats *stats);

/* ------------------------------------------------------------------------ */
/* ePSF builder                                                               */

/* SP_EPSF_BORROWED: set by the run (epsf.fallback_borrow), never by sp_epsf_build: a
 * cell whose own build fell back takes the star-weighted mean of its neighbouring
 * cells' empirical ePSFs (src/pipeline/cell_psf.c, psf_grid_borrow). */
enum { SP_EPSF_EMPIRICAL = 0, SP_EPSF_MOFFAT_FIT = 1, SP_EPSF_MOFFAT_DEFAULT = 2, SP_EPSF_BORROWED = 3 };

typedef struct {
    int oversamp;             /* samples per image pixel, 1..8 (1..4 typical); default 2 */
    int final_size;           /* final_psf_size: stamp side in image pixels, odd; default 41 */
    int max_iters;            /* iterations; default 4 (more fit noise: docs/psf.md) */
    double conv_tol;          /* stop when the largest update < conv_tol * peak; default 2e-4 */
    double clip_sigma;        /* residual clipping in noise units (<= 0: off); default 5 */
    double reject_sigma;      /* reject contaminated pixels (3x3-mean residual beyond this many sigma,
                               * dilated by 1 pixel) from the 2nd iteration on (<= 0: off); default 3 */
    double fallback_reject_sigma; /* the same rejection in the fallback's Moffat fit (sp_epsf_fit_moffat's
                               * reject_sigma; <= 0: off); default 0 (docs/zeropoints.md) */
    int smooth;               /* 1: triangle smoothing of updates when oversamp >= 2; default 1 */
    int spatial_degree;       /* d >= 1: fit a polynomial variation of degree d jointly (PSFEx-like):
                               * psi(x, y) = psf + sum_t phi_t(u, v) T_t with the monomials
                               * u, v, u^2, u v, v^2, u^3 ... of the normalised offsets
                               * u = (x - x_ref) / L, v = (y - y_ref) / L, so the result is the PSF at
                               * (x_ref, y_ref), not at the stars' weighted mean position (degree 1:
                               * psf + (x - x_ref) grad_x + (y - y_ref) grad_y); 0: one PSF for all
                               * stars; at most 4; default 1 */
    int spatial_min_stars;    /* fewer usable stars: degree 0; default 12. Degree d > 1 needs
                               * spatial_min_stars * nterms(d) / 3 usable stars, else the highest
                               * degree that has them is used (nterms(d) = (d+1)(d+2)/2) */
    const double *field_xy;   /* 2 per star: the position the spatial terms use (e.g. tile pixels when
                               * the image is a mosaic of cutouts, sp_epsf_build_field); NULL: the
                               * star's image position. x_ref, y_ref are then in the same frame */
    double spatial_scale;     /* offsets are divided by this (pixels; <= 0: the largest star offset) */
    double wing_smooth_k;     /* > 0: smooth the stack beyond wing_smooth_r0 x fallback_fwhm from the
                               * centre with a Gaussian of sigma wing_smooth_k (r - r0) (a wing that
                               * varies slowly with r, measured with the noise of a few faint
                               * stars); 0: off; default 0 */
    double wing_smooth_r0;    /* in FWHM (fallback_fwhm); default 1.5 */
    double x_ref, y_ref;      /* where the result applies (image pixels; the cell centre); NaN: the
                               * mean star position; default NaN */
    double fit_radius;        /* star-fit box half-width (pixels; <= 0: max(3, 1.5 fwhm)); default 0 */
    int local_bkg;            /* 1: re-estimate each star's background in iterations 1-3 as the
                               * weighted mean of the model-subtracted cutout beyond bkg_radius
                               * (same clipping as the stack); 0: use sp_psfstar.bkg; default 1 */
    double bkg_radius;        /* inner radius of that region (pixels; <= 0: max(3 fwhm, half stamp / 2)) */
    int min_stars;            /* patch_run.min_epsf_nstars_for_use; default 5 */
    double fallback_fwhm;     /* configured fallback FWHM (pixels); default 4 */
    double fallback_beta;     /* configured fallback beta; default 3.5 */
    double max_center_offset; /* gate: |centroid| of the result (pixels); default 0.25 */
    double max_neg_frac;      /* gate: min >= -max_neg_frac * peak; default 0.05 */
    int keep_stamps;          /* 1: fill per-star data / residual stamps; default 1 */
    /* Other sources to mask in the star cutouts (e.g. the detection list the
     * stars were selected from; may be NULL): pixels within
     * neighbour_rscale * a + 1 pixels (at least 2) of each are ignored. A
     * source within 2 pixels of a star's position is the star itself. Faint
     * neighbours otherwise add light to the ePSF wings (docs/psf.md). */
    const sp_source *neighbours;
    int nneighbours;
    double neighbour_rscale;  /* default 3 */
    /* Analytic wings: > 0: the result is the elliptical Moffat fitted to the used
     * stars plus the empirical ePSF's difference from it within core_fwhm x the
     * Moffat's FWHM, tapered to 0 over core_taper_fwhm FWHM more (moffat_* of
     * the result then hold that fit); <= 0: purely empirical; default 0 */
    double core_fwhm;
    double core_taper_fwhm;   /* default 1 */
    /* When the ePSF fails its gate and the Moffat fitted to the stars takes
     * over: add the stars' stacked residual from that Moffat beyond
     * fallback_resid_fwhm FWHM (cos^2 ramp over one more FWHM), so the light a
     * Moffat cannot hold (a real PSF's wide wing) is in the model; <= 0: the
     * bare Moffat. One cell's stars leave this noisy; the run pools it over
     * the band (sp_epsf_pool_wings). */
    double fallback_resid_fwhm;
} sp_epsf_params;

typedef struct {
    sp_psf *psf;              /* the PSF to use (ePSF or fallback); fwhm, nstars, is_fallback set */
    int kind;                 /* SP_EPSF_EMPIRICAL / MOFFAT_FIT / MOFFAT_DEFAULT */
    int is_fallback;          /* kind != EMPIRICAL */
    char reason[160];         /* why the fallback was used ("" otherwise) */
    int nstars_in;            /* stars given */
    int nstars_used;          /* stars that survived fitting (ePSF) or entered the Moffat fit */
    int iterations;           /* ePSF iterations run (0 for fallbacks built directly) */
    double fwhm;              /* FWHM of the result (pixels) */
    double moffat_fwhm, moffat_beta, moffat_q, moffat_theta; /* fallback parameters (NaN for an ePSF) */
    double resid_rms;         /* star-minus-model: sqrt(sum w (d - m)^2 / sum w m^2) within 2 FWHM */
    /* spatial variation (spatial_degree 1 and enough stars; else NULL): the PSF at
     * (x, y) of this cell is psf + (x - x_ref) grad_x + (y - y_ref) grad_y
     * (per image pixel; same geometry as psf; zero sum, no centroid shift) */
    int spatial_degree;       /* degree actually used (0 .. p->spatial_degree) */
    double x_ref, y_ref;
    float *grad_x, *grad_y;   /* degree >= 1: the linear terms per image pixel (T_1 / L, T_2 / L) */
    int nterms;               /* terms beyond the constant: (d+1)(d+2)/2 - 1 (0 for degree 0) */
    float *terms;             /* nterms stamps (psf geometry) T_t in normalised offsets, monomial order
                               * u, v, u^2, u v, v^2, ...: evaluate with sp_epsf_poly_eval */
    double spatial_scale;     /* L */
    /* growth curve of the result: encircled energy at radius growth_r[k] (pixels) */
    int ngrowth;
    double *growth_r, *growth_ee;
    /* per input star (nstars_in entries): fitted centre, flux, background, reduced chi2, used flag */
    double *star_x, *star_y, *star_flux, *star_bkg, *star_chi2;
    int *star_used;
    /* per input star stamps (keep_stamps): stamp_size^2 floats each, (data - bkg)/flux and
     * (data - bkg)/flux - model at the star's pixels; NaN where unusable */
    int stamp_size;
    float *star_stamps, *resid_stamps;
} sp_epsf_result;

void sp_epsf_params_default(sp_epsf_params *p);

/* Build the ePSF of one band of one cell from its PSF stars (quality gate and
 * fallback included: a fallback is not an error).
 * Given: img, ivar (NULL: each star's bkg_rms^2, else unit weights), mask (NULL),
 *        nx, ny; stars[nstars] (from sp_starsel_select or the caller; x, y, flux,
 *        bkg, bkg_rms used); p (NULL: defaults).
 * Returned: *res (free with sp_epsf_result_free).
 * Returns SP_OK; SP_ERR_INPUT (bad parameters), SP_ERR_NOMEM. */
int sp_epsf_build(const float *img, const float *ivar, const uint8_t *mask, int nx, int ny,
                  const sp_psfstar *stars, int nstars, const sp_epsf_params *p, sp_epsf_result **res);

void sp_epsf_result_free(sp_epsf_result **res);

/* The PSF of a polynomial model at normalised offsets (u, v): out = psf +
 * sum_t phi_t(u, v) terms[t] (monomials u, v, u^2, u v, v^2, ... up to degree),
 * renormalised to unit sum. out has psf's geometry (may not be psf itself).
 * Returns SP_OK, SP_ERR_INPUT (geometry), SP_ERR_NUMERIC (no flux). */
int sp_epsf_poly_eval(const sp_psf *psf, const float *terms, int degree, double u, double v, sp_psf *out);

/* ------------------------------------------------------------------------ */
/* Band-wide (field) builds: PSF stars cut out of many cells, one model       */

/* One PSF star cut out of its image for a build over a whole field: the same
 * n x n cutout (centre pixel ix, iy) and weights the builder would take,
 * neighbours already masked (w = 0). Positions in field pixels (the image's
 * pixel (i, j) is field pixel (i + x0, j + y0)). */
typedef struct {
    int n;                  /* side (p->final_size) */
    int ix, iy;             /* centre pixel, field pixels */
    double x, y;            /* star centre, field pixels */
    double flux, bkg, bkg_rms, snr, q;
    float *d, *w;           /* n*n each: data (background not subtracted) and weight (ivar, 0 unusable) */
} sp_epsf_cutout;

/* Cut out stars[nstars] of one image (same inputs as sp_epsf_build; the
 * neighbours of p are masked) into out[nstars] (caller's array; each d/w
 * malloc'd, free with sp_epsf_cutout_free). Stars whose cutout has fewer than
 * half its pixels usable are skipped: *nout <= nstars.
 * Returns SP_OK, SP_ERR_INPUT, SP_ERR_NOMEM. */
int sp_epsf_cutouts(const float *img, const float *ivar, const uint8_t *mask, int nx, int ny, double x0, double y0,
                    const sp_psfstar *stars, int nstars, const sp_epsf_params *p, sp_epsf_cutout *out, int *nout);
void sp_epsf_cutout_free(sp_epsf_cutout *c);

/* One ePSF from cutouts of a whole field (e.g. every cell of a band of a
 * tile): the cutouts are laid side by side in a mosaic and built with
 * sp_epsf_build, the spatial terms using their field positions (p->x_ref,
 * y_ref, spatial_scale in field pixels; p->neighbours ignored: already masked).
 * The result's star_x/star_y are field pixels. Deterministic for a given
 * order of cuts. Returns as sp_epsf_build. */
int sp_epsf_build_field(const sp_epsf_cutout *cuts, int ncuts, const sp_epsf_params *p, sp_epsf_result **res);

/* Encircled energy of a PSF within radius r (image pixels) of its centre
 * (sum of oversampled samples within r / oversamp^2; the stamp's sum is 1 for a
 * normalised PSF). */
double sp_epsf_encircled(const sp_psf *psf, double r);

/* Fit an elliptical Moffat (FWHM, beta, q, theta) jointly with the stars'
 * centres and fluxes (Levenberg-Marquardt) in boxes of half-width 2.5 fwhm0,
 * each star's bkg held. With reject_sigma > 0 (the builder passes its
 * fallback_reject_sigma), pixels whose 3x3 / 5x5 mean residual from the fitted Moffat
 * exceeds reject_sigma times its noise (+2% of the model) are rejected with
 * their 8 neighbours, outside 1 FWHM of each centre, and the fit repeated (at
 * most 3 rounds): light of undetected or merged neighbours otherwise widens the
 * Moffat. <= 0: no rejection. Used by the fallback; public for diagnostics.
 * Returns SP_OK, SP_ERR_NUMERIC (no convergence / parameters at their bounds),
 * SP_ERR_INPUT (no usable star). */
int sp_epsf_fit_moffat(const float *img, const float *ivar, const uint8_t *mask, int nx, int ny,
                       const sp_psfstar *stars, int nstars, double fwhm0, double beta0, double reject_sigma,
                       double *fwhm, double *beta, double *q, double *theta);

/* ------------------------------------------------------------------------ */
/* Band-wide Moffat: one analytic PSF over a whole field                      */

/* An elliptical Moffat whose parameters vary smoothly over the field:
 * P_k(x, y) = sum_t c[k][t] phi_t(u, v), u = (x - x_ref) / scale, v likewise,
 * phi the monomials of degree <= deg[k] (1, u, v, u^2, u v, v^2, ...), for
 * P = (ln FWHM, ln(beta - 1), e1, e2) with q = (1 - e) / (1 + e), theta =
 * atan2(e2, e1) / 2. Fitted to PSF-star cutouts of every cell of a band, it
 * follows the PSF's variation inside and between cells where a cell's own
 * Moffat (fitted to its 5-20 stars, one per cell) is constant and noisy. */
#define SP_MOFFAT_FIELD_MAXT 15 /* terms of degree 4 */
typedef struct {
    int deg[4], nt[4];       /* degree and terms per parameter */
    double c[4][SP_MOFFAT_FIELD_MAXT];
    double x_ref, y_ref, scale;
    double xmin, xmax, ymin, ymax; /* the used stars' bounding box: positions are clamped into it
                              * (a polynomial is not extrapolated beyond its stars) */
    int nstars_in, nstars_used; /* cutouts given, stars kept (after the cap and the star clip) */
    double chi2dof;          /* median over the kept stars of chi2 / dof in their boxes */
} sp_moffat_field;

typedef struct {
    int degree;              /* FWHM and ellipticity; beta takes min(degree, 1). Lowered (to 0)
                              * while the stars are fewer than min_stars_per_term x the model's
                              * shape terms (degree 1: 11, degree 2: 21) */
    double min_stars_per_term; /* default 1 */
    double x_ref, y_ref, scale; /* field pixels; scale > 0 */
    double fwhm0, beta0;     /* start (e.g. the median of the cells' fitted Moffats); box half-width
                              * max(3, 2.5 fwhm0) pixels around each cutout's centre pixel */
    int max_stars;           /* highest-SNR stars used (0: all); default 120 */
    double clip_sigma;       /* stars whose chi2/dof is above the median by more than this many
                              * robust sigmas are dropped and the fit repeated once; <= 0: none.
                              * Default 5 */
    double corner_fwhm_range; /* the model's FWHM at every point of a 9 x 9 grid over the stars'
                              * bounding box must lie within this factor of its value at the
                              * box centre (else the degree is lowered); default 1.5 */
} sp_moffat_field_params;

void sp_moffat_field_params_default(sp_moffat_field_params *p);

/* Fit the band-wide Moffat to cuts[ncuts] (sp_epsf_cutouts: data with the
 * background in, each star's bkg held, neighbours masked): per star (x, y, F)
 * free, the 4 parameter polynomials shared (Levenberg-Marquardt with the stars'
 * blocks eliminated: the cost grows linearly with the stars). Deterministic for
 * a given order of cuts. Returns SP_OK, SP_ERR_INPUT (fewer than 3 usable
 * stars), SP_ERR_NUMERIC (no convergence, parameters at their bounds even at
 * degree 0), SP_ERR_NOMEM. */
int sp_moffat_field_fit(const sp_epsf_cutout *cuts, int ncuts, const sp_moffat_field_params *p, sp_moffat_field *out);

/* The model's FWHM, beta, q, theta at field position (x, y), clamped into the stars' bounding
 * box (and the parameters to the fit's bounds). */
void sp_moffat_field_at(const sp_moffat_field *m, double x, double y, double *fwhm, double *beta, double *q,
                        double *theta);

/* The model at (x, y) rendered into out (its size and oversampling; unit sum;
 * sp_psf_moffat_into). Returns SP_OK, SP_ERR_INPUT. */
int sp_moffat_field_render(const sp_moffat_field *m, double x, double y, sp_psf *out);

/* ------------------------------------------------------------------------ */
/* The PSF anywhere in a tile: bilinear blend of cell ePSFs                   */

typedef struct {
    int ncx, ncy;               /* cells along x, y */
    const double *xedge;        /* ncx+1 cell edges in tile pixels (increasing) */
    const double *yedge;        /* ncy+1 */
    const sp_psf *const *psfs;  /* ncy*ncx, row-major (cell (i, j) at j*ncx+i); NULL: cell has none */
} sp_epsf_grid;

/* Weights of the (up to) four cells whose centres surround (x, y): bilinear in
 * the cell-centre grid, clamped (constant) beyond the outermost centres, so the
 * blend is continuous everywhere. Cells without a PSF get weight 0 and the
 * others are renormalised. Returned: idx[4], w[4], *n used entries.
 * Returns SP_OK or SP_ERR_INPUT (no PSF among the neighbours). */
int sp_epsf_grid_weights(const sp_epsf_grid *g, double x, double y, int idx[4], double w[4], int *n);

/* The PSF at (x, y): sp_psf_blend of the neighbouring cell PSFs into `out`
 * (same geometry as the cell PSFs). Returns SP_OK, SP_ERR_INPUT. */
int sp_epsf_grid_at(const sp_epsf_grid *g, double x, double y, sp_psf *out);

/* Band-wide outer profile ("wing pooling", docs/psf.md): every cell of a band
 * keeps its own ePSF within rin_fwhm FWHM, tapered (cos^2) to the band's mean
 * ePSF at rout_fwhm FWHM and beyond; the mean is the w-weighted mean of the
 * cells with w > 0, its outer part smoothed by a Gaussian whose sigma grows as
 * smooth_k (r - rin) (image pixels) so the faint wing carries the noise of all
 * the band's stars, not of one cell's. Every psf (same size and oversampling,
 * unit sum) with apply[k] set is replaced and renormalised; NULL entries are
 * skipped. Deterministic (no threads, fixed order). Returns SP_OK with nothing
 * changed when no cell has w > 0. */
typedef struct {
    double rin_fwhm, rout_fwhm; /* cell's own ePSF inside rin, band mean beyond rout (FWHM units) */
    double smooth_k;            /* smoothing sigma of the mean's wing per pixel beyond rin (0: none) */
} sp_epsf_pool_params;
void sp_epsf_pool_params_default(sp_epsf_pool_params *p);
int sp_epsf_pool_wings(sp_psf *const *psfs, const double *w, const uint8_t *apply, int n,
                       const sp_epsf_pool_params *p);

#endif

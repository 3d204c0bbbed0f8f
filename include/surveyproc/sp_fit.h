/* sp_fit.h — the patch fitting engine: multi-band model photometry of the
 * sources of one patch (DESIGN §5, issue 9). Knows nothing of files, MPI or the
 * store: the caller hands it images (pixels, inverse variance, PSF, pixel
 * transform) and sources (type, initial values, role), and gets back one result
 * per source.
 *
 * Method (docs/fitting.md has the figures):
 *  - Models. STAR = the ePSF rendered at the sub-pixel position (sp_psf_render,
 *    Keys cubic interpolation). EXP / DEV = the Gaussian-mixture profiles of
 *    Hogg & Lang (2013, PASP 125, 719); SERSIC(n) = Lang's mixtures for general
 *    n (the Tractor's sersic.py table); galaxies are convolved with the ePSF
 *    either analytically through a Gaussian-mixture fit of the ePSF
 *    (SP_FIT_CONV_GMIX) or with the pixelized ePSF in Fourier space via FFTW
 *    (SP_FIT_CONV_FFT).
 *  - Fluxes are linear and profiled out (variable projection): for given
 *    positions/shapes they are solved exactly by weighted least squares per
 *    band; the nonlinear parameters take damped Gauss-Newton
 *    (Levenberg-Marquardt) steps on the reduced (Schur-complement) normal
 *    matrix, with bounds.
 *  - Sources are fitted in groups: connected components of overlapping model
 *    footprints (boxes sized from each source's brightness and extent). Groups
 *    are independent problems, so each converges on its own terms; flags and
 *    iteration counts are per group (shared by its sources), never per patch.
 *  - Staged fit: stage 1 fluxes only, stage 2 + positions, stage 3 + shapes;
 *    each stage stops at dlnp_stop or n_opt_iters.
 *  - Errors: inverse Fisher matrix at the solution. flux_err marginalises the
 *    nonlinear parameters (and the sky, when fitted); flux_err_cond holds
 *    everything else fixed.
 *
 * Weights. `ivar` must come from the full noise model: 1 / (sky variance +
 * source Poisson variance) per pixel, in the image's flux units (GLOSSARY
 * "Noise model"). With sky noise alone the reported errors of bright sources
 * are too small by their Poisson share. Masked pixels have ivar = 0. When
 * that Poisson term was computed from the data (the pipeline's prep), set
 * sp_fit_image.poisson_k: the fitter then uses the model instead (weights that
 * follow the data's noise bias fluxes low).
 *
 * Coordinates. The scene lives in tile pixels (pixel centres at integers,
 * sp_fits.h convention). Each image maps scene -> its own pixels with an affine
 * transform (u = a[0] x + a[1] y + a[2], v = a[3] x + a[4] y + a[5]); aligned
 * tiles use identity + offset (sp_fit_image_aligned).
 *
 * Threads. One patch per thread, each with its own sp_fit_workspace; the
 * inputs (images, PSFs, sources) are read-only and may be shared. Call
 * sp_fit_init() once, serially, before threads start (it makes the FFTW plans;
 * sp_fit_workspace_create calls it when it runs outside a parallel region).
 * BLAS/LAPACK must run single-threaded inside the threads:
 * sp_fit_workspace_create calls openblas_set_num_threads(1) — a process-wide
 * setting.
 */
#ifndef SP_FIT_H
#define SP_FIT_H

#include "surveyproc/sp_psf.h"

#include <stddef.h>

#define SP_FIT_MAX_BANDS 64

typedef enum { SP_SRC_STAR = 0, SP_SRC_EXP = 1, SP_SRC_DEV = 2, SP_SRC_SERSIC = 3 } sp_src_type;

typedef enum {
    SP_ROLE_FIT_REPORT = 0,  /* base region: fitted and reported */
    SP_ROLE_FIT_DISCARD = 1, /* halo: fitted (so its light is modelled), not reported */
    SP_ROLE_FIXED = 2        /* halo: held at its initial values, model subtracted */
} sp_src_role;

typedef enum {
    SP_FIT_CONV_GMIX = 0, /* galaxy x Gaussian-mixture fit of the ePSF, analytic */
    SP_FIT_CONV_FFT = 1   /* galaxy x pixelized ePSF in Fourier space (FFTW) */
} sp_fit_conv;

/* One image of the patch ROI (one band; later one visit). */
typedef struct {
    int nx, ny;         /* ROI size in this image's pixels */
    int x0, y0;         /* ROI origin in tile pixels (information; the transform is aff) */
    double aff[6];      /* scene (tile px) -> image px: u = a0 x + a1 y + a2, v = a3 x + a4 y + a5 */
    const float *data;  /* nx*ny, row-major (y rows); sky-subtracted or not (see fit_sky) */
    const float *ivar;  /* nx*ny inverse variance from the full noise model; 0 = masked */
    const sp_psf *psf;  /* the PSF at this patch, in this image's pixels */
    int band;           /* 0 .. nbands-1 */
    int psf_fallback;   /* 1 if psf is the analytic fallback (reported per band) */
    double flux_scale;  /* model counts per unit source flux in this image (1 for a tile) */
    double poisson_k;   /* > 0: ivar holds a source Poisson term computed from the data,
                         * var = var_bkg + poisson_k * max(data, 0) (GLOSSARY noise model: poisson_k
                         * = scale / EGAIN in the image's units; an inverse-variance coadd:
                         * sum w_k^2 k_k / (sum w_k)^2). The fitter then replaces that term by
                         * poisson_k * max(model, 0), updated as the fit proceeds: weights that
                         * follow the data's own noise bias fluxes low (~ -N_eff / (2 gain) counts,
                         * a few % at SNR 10-20). 0 (default): ivar is used as given. */
} sp_fit_image;

/* Defaults: identity transform for a ROI at tile (x0, y0), flux_scale 1. */
void sp_fit_image_aligned(sp_fit_image *img, int x0, int y0, int nx, int ny);

/* One source: initial values and role. Shapes are in tile pixels. */
typedef struct {
    sp_src_type type;
    sp_src_role role;
    double x, y;                      /* initial position, tile pixels */
    double flux[SP_FIT_MAX_BANDS];    /* initial flux per band; NaN = unknown (estimated) */
    double re;                        /* half-light radius along the major axis, px (galaxies) */
    double q;                         /* axis ratio b/a in (0, 1] */
    double theta;                     /* position angle, radians, from +x towards +y */
    double sersic_n;                  /* Sersic index (SERSIC only) */
    long id;                          /* caller's tag, copied to the result */
    int type_auto;                    /* the catalog gave no type (0: it did). 1: fitted as a point
                                       * source first; then `type` (a galaxy model; re, q, theta,
                                       * sersic_n its start) and the options' untyped_alt models are
                                       * tried from Re, Re/3 and Re/10 with the neighbours held, and the
                                       * best is kept only if it lowers chi2 by more than 4. 2: fitted as
                                       * `type`; then the untyped_alt models are tried the same way (from
                                       * the catalog Re, the fitted Re and Re/3) and the lowest chi2 is
                                       * kept. The result's type is the model used. Ignored for role
                                       * FIXED, single-band mode (multiband = 0) and type STAR. */
} sp_fit_source;

/* Result flags (per source). */
enum {
    SP_FITF_CONVERGED = 1u << 0,   /* every stage of its group stopped on dlnp_stop */
    SP_FITF_MAXITER = 1u << 1,     /* a stage of its group hit n_opt_iters */
    SP_FITF_SINGULAR = 1u << 2,    /* a normal matrix was singular (degenerate sources): regularised */
    SP_FITF_DIVERGED = 1u << 3,    /* no step reduced chi2 (LM damping exhausted) */
    SP_FITF_POS_BOUND = 1u << 4,   /* position ended at its max_shift bound */
    SP_FITF_SHAPE_BOUND = 1u << 5, /* Re, q or n ended at a bound */
    SP_FITF_NODATA_BAND = 1u << 6, /* some band had no valid pixel: its flux is NaN */
    SP_FITF_NODATA = 1u << 7,      /* no valid pixel in any band: nothing fitted, values NaN */
    SP_FITF_GEOM_FROZEN = 1u << 8, /* too faint (combined SNR < min_snr_geom): geometry held */
    SP_FITF_EDGE = 1u << 9,        /* its model box is cut by the ROI edge in some image */
    SP_FITF_NONFINITE = 1u << 10,  /* a non-finite value was produced and replaced by NaN */
    SP_FITF_FIXED = 1u << 11,      /* role FIXED: values are the inputs */
    SP_FITF_BAD_INPUT = 1u << 12,  /* non-finite or out-of-range initial values (clamped/ignored) */
    SP_FITF_SHAPE_FROZEN = 1u << 13,/* galaxy too faint for its shape (SNR < min_snr_shape): shape held */
    SP_FITF_UNRESOLVED = 1u << 14,  /* another fitted source is (or was given) within 0.5 FWHM: their
                                       flux split is not described by the local (Fisher) error */
    SP_FITF_BOX_TRUNC = 1u << 15    /* galaxy: its model box (sized from the initial flux and Re) is
                                       smaller than the final flux and Re need, and more than
                                       SP_FIT_BOX_TRUNC_FRAC of the final model flux lies outside it
                                       (the fit did not see those wings) */
};

/* The model-box truncation that sets SP_FITF_BOX_TRUNC (fraction of the flux). */
#define SP_FIT_BOX_TRUNC_FRAC 0.01

/* Per-band flags in sp_fit_result.band_flags[b]. */
enum {
    SP_FITB_NODATA = 1u << 0,   /* no valid pixel in this band */
    SP_FITB_FALLBACK = 1u << 1, /* fitted with the fallback PSF */
    SP_FITB_EDGE = 1u << 2      /* box cut by the ROI edge */
};

typedef struct {
    long id;
    int index;                               /* index into the source array */
    sp_src_type type;
    sp_src_role role;
    double x, y, x_err, y_err;               /* fitted position (tile px) and 1-sigma errors */
    double flux[SP_FIT_MAX_BANDS];           /* fitted flux per band */
    double flux_err[SP_FIT_MAX_BANDS];       /* marginal 1-sigma (nonlinear parameters and sky marginalised) */
    double flux_err_cond[SP_FIT_MAX_BANDS];  /* conditional 1-sigma (everything else fixed) */
    double chi2dof[SP_FIT_MAX_BANDS];        /* chi2 / dof over the source's box, final model */
    double blend[SP_FIT_MAX_BANDS];          /* neighbours' share of the model flux in the box */
    int npix[SP_FIT_MAX_BANDS];              /* valid pixels in the box */
    unsigned char band_flags[SP_FIT_MAX_BANDS];
    double re, re_err, q, q_err, theta, theta_err, sersic_n, sersic_n_err; /* galaxies; errors 0 when held */
    int iters[3];                            /* LM iterations per stage (stage 1 counts its linear solve) */
    int group, group_size;
    unsigned flags;                          /* SP_FITF_* */
} sp_fit_result;

typedef struct {
    int nbands;
    double chi2[SP_FIT_MAX_BANDS];  /* sum w (data - model)^2 over the valid pixels of the band */
    long npix[SP_FIT_MAX_BANDS];
    double rms[SP_FIT_MAX_BANDS];   /* rms of the normalised residual sqrt(w) (data - model) */
    double sky[SP_FIT_MAX_BANDS];   /* fitted sky (0 if not fitted) */
    double sky_err[SP_FIT_MAX_BANDS];
    int ngroups, max_group_size, nfit, nfixed;
    long renders;                   /* source renders (a cost measure) */
    double seconds;                 /* wall time of sp_fit_patch */
    /* Where the thread's CPU went (CLOCK_THREAD_CPUTIME_ID), by stage of the
     * staged fit and by kind of group: [SP_FIT_COST_*][0] groups of point
     * sources only, [..][1] groups with a galaxy. Work done on the whole patch
     * (images, boxes, grouping, the model-weight and sky re-solves, the type
     * trials of untyped sources, the final model) is cpu_patch. The sum of all
     * of them is the thread CPU of sp_fit_patch, cpu_total. */
    double cpu_stage[5][2];
    double cpu_patch, cpu_total;
    long srcband[2];                /* fitted source x bands (not FIXED), by kind of group */
    long groups[2];                 /* components, by kind */
} sp_fit_patch_stats;

/* Stages of sp_fit_patch_stats.cpu_stage. With the staged fit off the one
 * all-free stage counts as SP_FIT_COST_SHAPE. */
enum {
    SP_FIT_COST_FLUX = 0, /* stage 1: the fluxes (joint linear solve; with no geometry free, all of it) */
    SP_FIT_COST_POS,      /* stage 2: + positions */
    SP_FIT_COST_SHAPE,    /* stage 3: + galaxy shapes */
    SP_FIT_COST_ERR,      /* errors at the solution (Fisher matrix, geometry marginalised) */
    SP_FIT_COST_SPLIT,    /* joint flux solves of split components between sweeps */
    SP_FIT_NCOST
};

typedef struct {
    int staged;             /* 1: stage 1 fluxes, 2 + positions, 3 + shapes; 0: one stage, all free */
    int n_opt_iters;        /* max LM iterations per stage (default 30) */
    double dlnp_stop;       /* stop when an accepted step improves ln p = -chi2/2 by less, per source
                             * of the group (1e-2: chi2 0.02, far below significance; 1e-3 cost
                             * 1.4x the fit CPU on the bench tile for the same accuracy) */
    int multiband;          /* 1: shared geometry, fluxes per band; 0: each band fitted alone */
    int fit_sky;            /* 1: a constant sky per band, one more linear parameter */
    int fit_positions;      /* 0 holds positions (forced photometry) (default 1) */
    int fit_shapes;         /* 0 holds galaxy shapes (default 1) */
    int fit_sersic_n;       /* 0 holds Sersic n (default 1) */
    double max_shift;       /* positions stay within this many px of the start (3) */
    double pos_prior_sigma; /* > 0: Gaussian prior of this sigma (px) on the shift from the input
                             * position (MAP fit; keeps faint and blended sources where the
                             * catalog put them); 0: none (0) */
    double max_step;        /* largest position change of one LM step, px (1): a trust region, so
                             * a poorly constrained source cannot spoil its group's steps */
    double re_min, re_max;  /* bounds on Re, px (0.1, 50) */
    double q_min;           /* lower bound on q (0.05) */
    double n_min, n_max;    /* bounds on Sersic n (0.5, 6) */
    double min_snr_geom;    /* hold positions of sources fainter than this combined SNR (3) */
    double min_snr_shape;   /* hold shapes of galaxies fainter than this (10) */
    double box_nsigma;      /* model box reaches where flux*profile falls below this x pixel sigma (0.1) */
    int box_max_half;       /* cap on the model box half-size, px (48) */
    sp_fit_conv conv;       /* galaxy PSF convolution route (default: see docs/fitting.md) */
    int psf_gmix_k;         /* Gaussians in the ePSF mixture fit (route GMIX; 4) */
    int max_group;          /* larger groups are fitted in chunks, in turn (block Gauss-Seidel) (100) */
    int gs_iter_cap;        /* LM steps per chunk visit while more Gauss-Seidel sweeps may follow
                             * (inexact block solves; the last sweep has n_opt_iters; 0 = always
                             * n_opt_iters) (3) */
    int gs_skip_static;     /* skip a chunk whose last visit converged and whose neighbours did not
                             * move since (0: saved < 2% of the visits on the bench tiles) */
    int sky_joint;          /* fit_sky: sky and fluxes solved jointly (exact, one pass) instead of
                             * alternated (3 + 2 rounds) (1) */
    int lm_osc_damp;        /* extra damping of parameters whose accepted LM steps flip sign (0:
                             * 5% fewer trials, accuracy mixed) */
    int gal_profiles;       /* EXP and DEV mixtures: SP_FIT_PROF_TRUNCATED (default) or _TRACTOR */
    unsigned untyped_alt;   /* galaxy models tried for type_auto sources besides their `type`: bits
                             * 1u << SP_SRC_EXP, 1u << SP_SRC_DEV (others ignored); default 0 */
} sp_fit_options;

/* sp_fit_options.gal_profiles */
enum {
    SP_FIT_PROF_TRUNCATED = 0, /* fitted to the SDSS-truncated exponential / de Vaucouleurs laws */
    SP_FIT_PROF_TRACTOR = 1    /* the Tractor's Hogg & Lang (2013) mixtures */
};

void sp_fit_options_default(sp_fit_options *opt);

typedef struct sp_fit_workspace sp_fit_workspace;

/* Serial, once per process (idempotent): FFTW plans for the FFT convolution
 * route. Not thread-safe; call before OpenMP regions. SP_ERR_NOMEM on failure. */
int sp_fit_init(void);
void sp_fit_cleanup(void); /* frees the plans; serial; after all workspaces are done */

/* Per-thread scratch, created once and reused for every patch; grows when a
 * patch needs more (the only allocations of a fit). Hints: total pixels over a
 * patch's images, sources per patch, bands. Sets OpenBLAS to one thread. */
int sp_fit_workspace_create(size_t max_pixels, int max_sources, int nbands, sp_fit_workspace **ws);
void sp_fit_workspace_free(sp_fit_workspace **ws); /* sets *ws = NULL; safe on NULL */

/* Bytes the workspace holds now (its arrays' capacities, PSF cache and FFT
 * scratch included); 0 for NULL. Thread-safe on a workspace no thread is
 * fitting with. */
size_t sp_fit_workspace_bytes(const sp_fit_workspace *ws);

/* The largest patch a workspace will fit, as sizes (docs/performance.md, "Memory:
 * what the planner counts"). The resource planner estimates them from the catalog
 * (src/parallel/plan.c); the run reserves every thread's workspace once with them. */
typedef struct {
    size_t pixels;       /* sum of the patch images' pixels */
    int nimg, nbands;    /* images (0: nbands) and bands */
    int nsrc;            /* sources handed to sp_fit_patch (every role) */
    size_t box_pixels;   /* sum over sources and images of the model box pixels */
    size_t model_pixels; /* the same, each box times 1 + its source's geometry parameters
                          * (2 STAR, 5 EXP/DEV, 6 SERSIC): model + derivative planes */
    int group_n;         /* sources of the largest group fitted at once (<= max_group) */
    int group_nth;       /* its free nonlinear parameters (positions, shapes) */
    int comp_n;          /* sources of the largest component (joint flux solves) */
} sp_fit_reserve;

/* Allocate the workspace's arrays for a patch of these sizes now, and touch them
 * (so they are resident from the start, not grown patch by patch). Later patches
 * that need more still grow it. SP_ERR_NOMEM. Not thread-safe on one workspace. */
int sp_fit_workspace_reserve(sp_fit_workspace *ws, const sp_fit_reserve *r);

/* Bytes sp_fit_workspace_reserve allocates for r in a fresh workspace (the
 * model cache, final models, group accumulators and per-pixel arrays, which are
 * nearly all of it); 0 for NULL. Pure, thread-safe. */
size_t sp_fit_reserve_bytes(const sp_fit_reserve *r);

/* Doubles of one group accumulator for a group of n sources with nth free
 * nonlinear parameters over nbands bands (a workspace holds two). Pure. */
size_t sp_fit_group_doubles(int n, int nth, int nbands);

/* Fit one patch.
 * Given:    ws (this thread's), opt (NULL = defaults), imgs[nimg] with band in
 *           [0, nbands), src[nsrc] (any roles; FIXED ones are only subtracted).
 * Returned: res[nsrc] (one per source, same order, every role; FIXED sources
 *           carry their inputs and SP_FITF_FIXED), stats (may be NULL),
 *           model[nimg] (may be NULL; each entry NULL or an nx*ny buffer that
 *           receives the full model of that image: sources + sky).
 * Errors:   SP_ERR_INPUT (bad image geometry, band out of range, nbands >
 *           SP_FIT_MAX_BANDS), SP_ERR_NOMEM, SP_ERR_STATE (FFT route without
 *           sp_fit_init). Numerical trouble in a group is not an error: it is
 *           flagged on its sources and the rest of the patch is fitted.
 * Thread safety: safe with distinct workspaces. */
int sp_fit_patch(sp_fit_workspace *ws, const sp_fit_options *opt, const sp_fit_image *imgs, int nimg, int nbands,
                 const sp_fit_source *src, int nsrc, sp_fit_result *res, sp_fit_patch_stats *stats,
                 float *const *model);

/* Render the unit-flux model of one source (its current values in *s, flux
 * ignored) into an image's pixel grid: out[img->ny * img->nx] is overwritten.
 * For simulators and QA; uses the same code as the fit. Thread-safe with a
 * per-thread workspace. */
int sp_fit_render_source(sp_fit_workspace *ws, const sp_fit_options *opt, const sp_fit_image *img,
                         const sp_fit_source *s, double *out);

/* Name of a source type ("STAR", "EXP", "DEV", "SERSIC") and the reverse
 * (case-insensitive; "GAL" and "" map to `fallback`). -1 if unknown. */
const char *sp_src_type_name(sp_src_type t);
int sp_src_type_parse(const char *name, sp_src_type fallback);

#endif

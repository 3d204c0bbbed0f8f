/* sp_config.h — the run configuration: one YAML file read into typed structs.
 *
 * One schema table (src/core/config_schema.c) describes every key: its dotted
 * name ("patch_run.n_opt_iters"), type, default, range or allowed values, unit,
 * a one-line doc, whether it changes science results, and where it lives in
 * sp_config. That table alone drives parsing and validation, the commented
 * template (`surveyproc config --dump`), the effective-config print, the
 * provenance text stored with results, the science hash used by resume, and
 * docs/config.md (`surveyproc config --markdown`).
 *
 * Section and key names follow the seed pipeline (tract7dt) wherever the
 * concept is the same; its keys that surveyproc renamed or dropped are known,
 * and using one gets a message naming the replacement (docs/config.md lists
 * them all).
 *
 * Rules a config file obeys:
 *  - One YAML mapping of sections; a key left out keeps its default.
 *  - Unknown keys, wrong types, out-of-range and non-allowed values are errors,
 *    reported as "FILE:LINE: key: what is wrong (allowed: ...)"; every error of
 *    a file is reported at once (up to a cap), not just the first.
 *  - Type "path": "~/" expands to $HOME; a relative path resolves against the
 *    config file's folder, except keys flagged SP_CFG_F_REL_WORKDIR (the
 *    outputs under outputs.work_dir), which resolve against outputs.work_dir.
 *  - Type "auto-or-int": the word `auto` (stored as SP_CONFIG_AUTO) lets the
 *    resource planner choose.
 *
 * MPI: nothing here is collective. Rank 0 reads the file
 * (sp_config_read_file), broadcasts the text and folder, and every rank calls
 * sp_config_load_string on the same text, so all ranks hold identical configs.
 *
 * Thread safety: all functions are reentrant; a loaded sp_config is read-only
 * and may be shared between threads.
 */
#ifndef SP_CONFIG_H
#define SP_CONFIG_H

#include "surveyproc/sp_log.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

/* Value of an "auto-or-int" key set to `auto`: the planner decides. */
#define SP_CONFIG_AUTO 0
/* Value of a nullable int key set to `null` (e.g. "no limit"). */
#define SP_CONFIG_NULL_INT (-1)

/* ---- enumerations (values are indices into the schema's allowed list) ---- */

/* epsf.psfstar_mode: where PSF star candidates come from. */
typedef enum {
    SP_CFG_PSFSTAR_DETECT = 0,           /* "detect": detections in the cell only */
    SP_CFG_PSFSTAR_REFERENCE = 1,        /* "reference": reference-catalog stars only */
    SP_CFG_PSFSTAR_DETECT_REFERENCE = 2  /* "detect+reference": reference stars first, detections fill up */
} sp_cfg_psfstar_mode;

/* epsf.interpolation: how the PSF varies between ePSF cells. */
typedef enum {
    SP_CFG_EPSF_INTERP_BILINEAR = 0,   /* bilinear between the 4 nearest cell ePSFs */
    SP_CFG_EPSF_INTERP_POLYNOMIAL = 1, /* PSFEx-like polynomial in (x, y), degree epsf.poly_degree */
    SP_CFG_EPSF_INTERP_NONE = 2        /* the cell's own ePSF, constant over the cell */
} sp_cfg_epsf_interp;

/* epsf.smoothing_kernel: smoothing of the oversampled ePSF between iterations. */
typedef enum {
    SP_CFG_SMOOTH_QUARTIC = 0,
    SP_CFG_SMOOTH_QUADRATIC = 1,
    SP_CFG_SMOOTH_NONE = 2
} sp_cfg_smoothing;

/* epsf.background_estimator: per-box statistic of the background mesh. */
typedef enum {
    SP_CFG_BKG_MODE = 0,  /* SExtractor's 2.5 median - 1.5 mean (median if skewed) */
    SP_CFG_BKG_MEDIAN = 1 /* sigma-clipped median */
} sp_cfg_bkg_estimator;

/* epsf.fallback_model: analytic PSF used when a cell's ePSF fails its quality gate. */
typedef enum { SP_CFG_FALLBACK_MOFFAT = 0, SP_CFG_FALLBACK_GAUSSIAN = 1 } sp_cfg_fallback_model;

/* patch_run.gal_model: model for sources whose TYPE is blank or unknown. */
typedef enum { SP_CFG_GAL_EXP = 0, SP_CFG_GAL_DEV = 1, SP_CFG_GAL_SERSIC = 2, SP_CFG_GAL_STAR = 3 } sp_cfg_gal_model;

/* patch_run.psf_model: how galaxy profiles are convolved with the PSF. */
typedef enum {
    SP_CFG_PSF_PIXELIZED = 0,       /* FFT convolution with the pixelized ePSF */
    SP_CFG_PSF_GAUSSIAN_MIXTURE = 1 /* analytic convolution with a Gaussian-mixture fit of the ePSF */
} sp_cfg_psf_model;

/* patch_run.galaxy_profiles: which Gaussian mixtures stand for EXP and DEV. */
typedef enum {
    SP_CFG_GALPROF_TRUNCATED = 0, /* fitted here to the SDSS-truncated laws (EXP 3-4 Re, DEV 7-8 Re) */
    SP_CFG_GALPROF_TRACTOR = 1    /* the Tractor's (Hogg & Lang 2013) K=6 / K=8 mixtures */
} sp_cfg_galprof;

/* patch_run.halo_source_mode: what is done with sources in a patch's halo. */
typedef enum {
    SP_CFG_HALO_FIT = 0,  /* fitted with the patch, results discarded (their own patch reports them) */
    SP_CFG_HALO_FIXED = 1 /* modelled at their initial values, not fitted */
} sp_cfg_halo_mode;

/* performance.dedicated_coordinator: whether rank 0 only hands out cells. */
typedef enum { SP_CFG_COORD_AUTO = 0, SP_CFG_COORD_ALWAYS = 1, SP_CFG_COORD_NEVER = 2 } sp_cfg_coordinator;

/* A list of strings (type "string-list"). Owned by the sp_config. */
typedef struct {
    int n;
    char **v;
} sp_cfg_strlist;

/* ---- the configuration, one struct per section ---- */

typedef struct {
    char *tile_name;         /* informational */
    char *image_list_file;   /* NULL if unset (required by run/plan: sp_config_check_inputs) */
    char *input_catalog;     /* NULL if unset (required) */
    char *reference_catalog; /* NULL if unset: no zero-point calibration */
} sp_cfg_inputs;

typedef struct {
    char *work_dir;
    char *store;             /* resolved against work_dir */
    char *log_file;          /* resolved against work_dir; NULL: no log file */
    char *qa_dir;            /* resolved against work_dir */
    char *export_basename;   /* resolved against work_dir; exports are <basename>.<format> */
    sp_cfg_strlist export_formats; /* subset of {fits, csv} */
    bool save_white;
    bool overwrite;
} sp_cfg_outputs;

typedef struct {
    double zp_ref;
    double saturation_fraction;
} sp_cfg_image_scaling;

typedef struct {
    bool enabled;
    int margin;
    bool plot_pre_crop;
    bool plot_post_crop;
    int display_downsample;
    int post_crop_display_downsample;
} sp_cfg_crop;

typedef struct {
    bool enabled;
    int downsample_full;
    bool zoom_enabled;
    int zoom_box[4]; /* x0, x1, y0, y1 (tile pixels) */
} sp_cfg_overlay;

typedef struct {
    double crval, crpix, cd, cdelt;
} sp_cfg_wcs_tolerance;

typedef struct {
    bool require_wcs_alignment;
    sp_cfg_wcs_tolerance wcs_tolerance;
    bool require_same_shape;
    bool require_catalog_bands;
} sp_cfg_checks;

typedef struct {
    bool enabled;
    double radius_pix;
    bool require_all_bands;
    int min_saturated_pixels;
} sp_cfg_saturation_cut;

typedef struct {
    sp_log_level level; /* SP_LOG_DEBUG .. SP_LOG_ERROR */
    double progress_heartbeat_s;
    bool timing_report;
    bool per_rank_log;
} sp_cfg_logging;

typedef struct {
    int dpi;
} sp_cfg_plotting;

typedef struct {
    int ranks;               /* SP_CONFIG_AUTO or a count */
    int threads_per_rank;    /* SP_CONFIG_AUTO or a count */
    int frame_prep_workers;  /* SP_CONFIG_AUTO or a count */
    int white_stack_workers; /* SP_CONFIG_AUTO or a count */
    int memory_per_rank_mb;  /* SP_CONFIG_AUTO or MiB */
    sp_cfg_coordinator dedicated_coordinator;
    char *blas_coretype;     /* "auto", "none" or an OpenBLAS core name */
    char *fftw_wisdom_file;  /* resolved against work_dir; NULL: no wisdom file */
    bool allow_oversubscribe; /* run even when ranks x threads > cores of a node (issue 6) */
    double rank_timeout_s;   /* watchdog: a silent rank / a blocked collective ends the job; 0: off */
} sp_cfg_performance;

typedef struct {
    int epsf_ngrid;
    int ngrid;
    bool skip_empty_epsf_patches;
    sp_cfg_psfstar_mode psfstar_mode;
    double thresh_sigma;
    int minarea;
    bool deblend;
    int cutout_size;
    int edge_pad;
    double min_sep;
    double min_sep_flux_ratio;
    double psfstar_size_tol;
    bool psfstar_use_catalog;
    double neighbour_mask_sigma;
    bool fallback_borrow;
    bool cross_validate;
    bool moffat_field;
    bool wing_pool;
    double fallback_residual_fwhm;
    double fallback_reject_sigma;
    double wing_smoothing;
    double wing_pool_fwhm[2];
    double empirical_core_fwhm;
    int max_stars;
    double q_range[2];
    double snr_min;
    double max_peak_fraction;
    double reference_mag_min;
    double reference_mag_max;
    bool reference_snap_to_detection;
    double reference_match_r_pix;
    int oversamp;
    int maxiters;
    bool do_clip;
    double clip_sigma;
    int recenter_boxsize;
    sp_cfg_smoothing smoothing_kernel;
    int final_psf_size;
    sp_cfg_epsf_interp interpolation;
    int poly_degree;
    char *given_psf;          /* NULL: the fit uses the ePSFs built from the data; else a path with {band} */
    sp_cfg_fallback_model fallback_model;
    double fallback_fwhm_pix;
    double fallback_moffat_beta;
    bool background_subtract_patch;
    sp_cfg_bkg_estimator background_estimator;
    int background_boxsize;
    int background_filtersize;
    double background_source_mask_sigma;
    int background_mask_dilate;
    bool star_local_bkg_subtract;
    double star_local_bkg_annulus_rin_pix;
    double star_local_bkg_annulus_rout_pix;
    double star_local_bkg_sigma;
    int star_local_bkg_minpix;
    bool save_patch_background_diagnostics;
    bool save_star_local_background_diagnostics;
    bool diagnostics_show_colorbar;
    bool save_growth_curve;
    bool save_residual_diagnostics;
    int residual_diag_max_stars;
    int save_star_montage_max;
    bool parallel_bands;
    int max_workers; /* SP_CONFIG_AUTO or a count */
} sp_cfg_epsf;

typedef struct {
    int halo_pix_min;
} sp_cfg_patches;

typedef struct {
    bool skip_empty_patch;
} sp_cfg_patch_inputs;

typedef struct {
    bool enable_multi_band_simultaneous_fitting;
    bool enable_staged_fit;
    int n_opt_iters;
    double dlnp_stop;
    int flag_maxiter_margin;
    int threads_per_process; /* SP_CONFIG_AUTO or a count */
    sp_cfg_gal_model gal_model;
    bool untyped_point_first;
    sp_cfg_strlist untyped_alternatives; /* subset of {exp, dev} */
    sp_cfg_psf_model psf_model;
    sp_cfg_galprof galaxy_profiles;
    int gaussian_mixture_n;
    int min_epsf_nstars_for_use;
    sp_cfg_halo_mode halo_source_mode;
    bool fit_sky;
    int sky_order;
    double r_ap;
    double eps_flux;
    double sersic_n_init;
    double sersic_n_min;
    double sersic_n_max;
    double re_fallback_pix;
    double re_max_pix;
    double q_min;
    double max_shift_pix;
    double position_prior_pix;
    bool poisson_from_model;
    int max_group_size;
    bool no_cutouts;
    bool no_patch_overview;
    int cutout_size;
    int cutout_max_sources; /* SP_CONFIG_NULL_INT: no limit */
    int cutout_start;
    double cutout_data_p_lo;
    double cutout_data_p_hi;
    double cutout_model_p_lo;
    double cutout_model_p_hi;
    double cutout_resid_p_abs;
} sp_cfg_patch_run;

typedef struct {
    bool enabled;
    double match_radius_arcsec;
    double isolation_radius_arcsec;
    double gaia_mag_min;
    double gaia_mag_max;
    double clip_sigma;
    int clip_max_iters;
    int min_stars;
    bool inject_gaia_sources;
    bool apcorr;
    double apcorr_radius_fwhm;
    double apcorr_radius_pix;
    double apcorr_snr_min;
    double apcorr_blend_max;
    double apcorr_mask_sigma;
    int apcorr_min_stars;
} sp_cfg_zp;

typedef struct sp_config {
    sp_cfg_inputs inputs;
    sp_cfg_outputs outputs;
    sp_cfg_image_scaling image_scaling;
    sp_cfg_crop crop;
    sp_cfg_overlay overlay;
    sp_cfg_checks checks;
    sp_cfg_saturation_cut source_saturation_cut;
    sp_cfg_logging logging;
    sp_cfg_plotting plotting;
    sp_cfg_performance performance;
    sp_cfg_epsf epsf;
    sp_cfg_patches patches;
    sp_cfg_patch_inputs patch_inputs;
    sp_cfg_patch_run patch_run;
    sp_cfg_zp zp;
    /* Not keys: where the config came from (NULL for defaults / code-built). */
    char *config_path; /* name given to load (file path or name_for_messages) */
    char *config_dir;  /* absolute folder relative paths were resolved against */
} sp_config;

/* ---- the schema ---- */

typedef enum {
    SP_CFG_T_BOOL,       /* bool */
    SP_CFG_T_INT,        /* int */
    SP_CFG_T_DOUBLE,     /* double; YAML ints accepted; must be finite */
    SP_CFG_T_STRING,     /* char * (malloc'd) */
    SP_CFG_T_PATH,       /* char * (malloc'd), resolved to an absolute path on load */
    SP_CFG_T_ENUM,       /* int-sized enum; index into `values` */
    SP_CFG_T_STRLIST,    /* sp_cfg_strlist; elements from `values` when given */
    SP_CFG_T_AUTO_INT,   /* int; `auto` -> SP_CONFIG_AUTO */
    SP_CFG_T_INT_VEC,    /* int[size/sizeof(int)], fixed length */
    SP_CFG_T_DOUBLE_VEC  /* double[size/sizeof(double)], fixed length */
} sp_cfg_type;

enum {
    SP_CFG_F_SCIENCE = 1u << 0,     /* changes science results: in the science hash */
    SP_CFG_F_NULLABLE = 1u << 1,    /* `null` allowed (string/path: NULL; int: SP_CONFIG_NULL_INT) */
    SP_CFG_F_REL_WORKDIR = 1u << 2, /* relative path resolves against outputs.work_dir */
    SP_CFG_F_ODD = 1u << 3,         /* int must be odd (stamp sizes with a central pixel) */
    SP_CFG_F_ORDERED = 1u << 4,     /* vector pairs ascending: v[0] <= v[1] (and v[2] <= v[3]) */
    SP_CFG_F_MIN_EXCL = 1u << 5     /* the minimum is exclusive: value > min */
};

typedef struct sp_config_key {
    const char *name;           /* dotted, e.g. "checks.wcs_tolerance.crval" */
    sp_cfg_type type;
    unsigned flags;             /* SP_CFG_F_* */
    size_t offset;              /* offsetof(sp_config, field) */
    size_t size;                /* sizeof the field */
    const char *def;            /* default as YAML text */
    double min, max;            /* numeric range, inclusive (min exclusive with SP_CFG_F_MIN_EXCL); none if min == max */
    const char *const *values;  /* enum / string-list allowed values, NULL-terminated (else NULL) */
    const char *const *aliases; /* enum synonyms: pairs "alias", "canonical", ..., NULL (else NULL) */
    const char *unit;           /* "pix", "arcsec", "mag", "" */
    const char *doc;            /* one line */
} sp_config_key;

/* Number of keys, and key i (0 <= i < n) in schema (= file) order. */
int sp_config_nkeys(void);
const sp_config_key *sp_config_key_at(int i);
/* The key with this dotted name, or NULL. */
const sp_config_key *sp_config_find_key(const char *name);
/* Doc line of a section ("epsf", "checks.wcs_tolerance"), or NULL if unknown. */
const char *sp_config_section_doc(const char *section);
/* "bool", "int", "double", "string", "path", "enum", "string-list", "auto-or-int", ... */
const char *sp_config_type_name(sp_cfg_type type);
/* Human text of what a key allows, e.g. "[1, 10000]", "one of: exp, dev, sersic, star". */
void sp_config_allowed_text(const sp_config_key *key, char *buf, size_t n);
/* The key's current value in cfg as YAML text (what the effective print writes). */
void sp_config_format_value(const sp_config *cfg, const sp_config_key *key, char *buf, size_t n);

/* ---- life cycle ---- */

/* Fill cfg with the schema defaults (relative paths stay relative).
 * Given: cfg uninitialised or freed (its contents are overwritten, not freed).
 * Returns SP_OK, SP_ERR_NOMEM, or SP_ERR_INTERNAL if a schema default is invalid. */
int sp_config_defaults(sp_config *cfg);

/* Read a YAML config file and resolve its paths against the file's folder.
 * Given: path. Returned: cfg (freed by sp_config_free; zeroed on failure).
 * Returns SP_OK; SP_ERR_IO if the file is missing/unreadable/too large;
 * SP_ERR_CONFIG for malformed YAML ("FILE:LINE:COL: malformed YAML: ...")
 * or bad keys/values ("FILE:LINE: key: what is wrong (allowed: ...)");
 * SP_ERR_NOMEM. */
int sp_config_load(const char *path, sp_config *cfg);

/* As sp_config_load, from YAML text (the broadcast copy on ranks != 0).
 * Given: text (NUL-terminated), name_for_messages (e.g. the original path),
 * base_dir (folder relative paths resolve against; NULL: the current
 * directory). Same results as sp_config_load on the file with that text. */
int sp_config_load_string(const char *text, const char *name_for_messages, const char *base_dir,
                          sp_config *cfg);

/* Rank 0 helper: the file's text and its absolute folder, for broadcasting.
 * Returned: *text and *dir malloc'd (caller frees). SP_ERR_IO, SP_ERR_NOMEM. */
int sp_config_read_file(const char *path, char **text, char **dir);

/* Free everything cfg owns and zero it. Safe on a zeroed or freed cfg. */
void sp_config_free(sp_config *cfg);

/* Deep copy: dst receives its own copy (dst uninitialised or freed). SP_ERR_NOMEM. */
int sp_config_copy(sp_config *dst, const sp_config *src);

/* Set one key from YAML value text ("30", "auto", "[fits, csv]", "null"),
 * with the same checks as a file. A relative path resolves against
 * cfg->config_dir when set (else stays relative). Cross-key checks are not run
 * (call sp_config_validate after a batch of sets).
 * Returns SP_OK or SP_ERR_CONFIG ("--set: key: ..."); cfg unchanged on error. */
int sp_config_set(sp_config *cfg, const char *name, const char *value_text);

/* Range, enum and cross-key checks (e.g. annulus rin < rout) on a config
 * built in code. Returns SP_OK or SP_ERR_CONFIG naming the keys. */
int sp_config_validate(const sp_config *cfg);

/* Make every relative path absolute: against base_dir (NULL: the current
 * directory), and SP_CFG_F_REL_WORKDIR keys against outputs.work_dir.
 * Idempotent. Sets cfg->config_dir. SP_ERR_NOMEM, SP_ERR_IO (no cwd). */
int sp_config_resolve_paths(sp_config *cfg, const char *base_dir);

/* Checks run/plan need beyond the file's validity: inputs.image_list_file and
 * inputs.input_catalog are set. SP_ERR_CONFIG naming the missing key. */
int sp_config_check_inputs(const sp_config *cfg);

/* ---- output ---- */

/* Complete commented YAML template: every key at its default with its doc,
 * type, range and science flag. Loading it gives the defaults. */
int sp_config_dump_template(FILE *f);

/* The effective config as valid YAML (every key, resolved paths; non-default
 * values carry a "# default: X" comment). */
int sp_config_print(FILE *f, const sp_config *cfg);

/* The effective config as a malloc'd YAML string (for provenance in the store).
 * Loading it back gives an equal config. SP_ERR_NOMEM. */
int sp_config_to_yaml_string(const sp_config *cfg, char **text);

/* docs/config.md: every key (type, default, allowed, unit, science, doc), the
 * path rules, and the mapping from tract7dt keys. */
int sp_config_write_markdown(FILE *f);

/* ---- comparison ---- */

/* 64-bit FNV-1a hash over "name=value\n" of every SP_CFG_F_SCIENCE key, in
 * schema order. Equal configs give equal hashes on any machine; resume
 * refuses a store whose hash differs. Paths are not science keys (inputs are
 * identified by the separate inputs hash). Returns SP_OK. */
int sp_config_science_hash(const sp_config *cfg, uint64_t *hash);

/* Number of keys whose values differ (only SP_CFG_F_SCIENCE keys if
 * science_only). When buf is given, writes "key: A -> B" lines (truncated to n). */
int sp_config_diff(const sp_config *a, const sp_config *b, int science_only, char *buf, size_t n);

#endif

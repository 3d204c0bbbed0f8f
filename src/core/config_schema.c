/* config_schema.c — THE table of configuration keys. Adding a key means adding
 * a field to sp_config (include/surveyproc/sp_config.h) and one line here;
 * parsing, validation, the template, the effective print, the science hash
 * and docs/config.md (regenerate: `surveyproc config --markdown`) follow.
 *
 * Defaults are YAML text parsed by the same code as a user's file, so a
 * default that does not pass its own checks fails sp_config_defaults (and
 * test_config). Mark a key SP_CFG_F_SCIENCE when changing it can change any
 * number in /catalog: resume refuses a store made with a different value. */
#include "config_internal.h"

#include <stddef.h>

#define FIELD(f) offsetof(sp_config, f), sizeof(((sp_config *)0)->f)
#define SC SP_CFG_F_SCIENCE
#define NUL SP_CFG_F_NULLABLE
#define WD SP_CFG_F_REL_WORKDIR
#define ODD SP_CFG_F_ODD
#define ORD SP_CFG_F_ORDERED
#define GT SP_CFG_F_MIN_EXCL

#define KB(n, f, fl, def, doc) {n, SP_CFG_T_BOOL, fl, FIELD(f), def, 0, 0, NULL, NULL, "", doc}
#define KI(n, f, fl, def, lo, hi, u, doc) {n, SP_CFG_T_INT, fl, FIELD(f), def, lo, hi, NULL, NULL, u, doc}
#define KD(n, f, fl, def, lo, hi, u, doc) {n, SP_CFG_T_DOUBLE, fl, FIELD(f), def, lo, hi, NULL, NULL, u, doc}
#define KS(n, f, fl, def, doc) {n, SP_CFG_T_STRING, fl, FIELD(f), def, 0, 0, NULL, NULL, "", doc}
#define KP(n, f, fl, def, doc) {n, SP_CFG_T_PATH, fl, FIELD(f), def, 0, 0, NULL, NULL, "", doc}
#define KE(n, f, fl, def, vals, als, doc) {n, SP_CFG_T_ENUM, fl, FIELD(f), def, 0, 0, vals, als, "", doc}
#define KL(n, f, fl, def, vals, doc) {n, SP_CFG_T_STRLIST, fl, FIELD(f), def, 0, 0, vals, NULL, "", doc}
#define KA(n, f, fl, def, lo, hi, u, doc) {n, SP_CFG_T_AUTO_INT, fl, FIELD(f), def, lo, hi, NULL, NULL, u, doc}
#define KIV(n, f, fl, def, lo, hi, u, doc) {n, SP_CFG_T_INT_VEC, fl, FIELD(f), def, lo, hi, NULL, NULL, u, doc}
#define KDV(n, f, fl, def, lo, hi, u, doc) {n, SP_CFG_T_DOUBLE_VEC, fl, FIELD(f), def, lo, hi, NULL, NULL, u, doc}

/* Allowed values; the order is the C enum's (sp_config.h). */
static const char *const v_export[] = {"fits", "csv", NULL};
static const char *const v_level[] = {"debug", "info", "warning", "error", NULL};
static const char *const a_level[] = {"warn", "warning", "critical", "error", NULL};
static const char *const v_coord[] = {"auto", "always", "never", NULL};
static const char *const v_psfstar[] = {"detect", "reference", "detect+reference", NULL};
/* tract7dt's spellings: SEP detections and Gaia XP stars. */
static const char *const a_psfstar[] = {"sep", "detect", "gaia", "reference", "sep+gaia", "detect+reference",
                                        "gaia+sep", "detect+reference", NULL};
static const char *const v_interp[] = {"bilinear", "polynomial", "none", NULL};
static const char *const v_smooth[] = {"quartic", "quadratic", "none", NULL};
static const char *const v_bkg[] = {"mode", "median", NULL};
static const char *const v_fallback[] = {"moffat", "gaussian", NULL};
static const char *const v_gal[] = {"exp", "dev", "sersic", "star", NULL};
static const char *const v_untyped_alt[] = {"exp", "dev", NULL};
static const char *const v_psfmodel[] = {"pixelized", "gaussian_mixture", NULL};
static const char *const v_galprof[] = {"truncated", "tractor", NULL};
static const char *const a_psfmodel[] = {"gaussian_mixture_from_stamp", "gaussian_mixture", NULL};
static const char *const v_halo[] = {"fit", "fixed", NULL};

const sp_config_key sp_cfg_schema[] = {
    /* ---------------------------------------------------------------- inputs */
    KS("inputs.tile_name", inputs.tile_name, 0, "\"tile\"",
       "Name of the tile, written to the store's provenance; does not change results."),
    KP("inputs.image_list_file", inputs.image_list_file, NUL, "null",
       "Text file listing the FITS frames, one path per line ('#' comments and blank lines ignored). "
       "Required by run and plan."),
    KP("inputs.input_catalog", inputs.input_catalog, NUL, "null",
       "CSV source catalog: RA, DEC (deg) required; optional ID, TYPE, FLUX_<band>, ELL, THETA, Re. "
       "Required by run and plan."),
    KP("inputs.reference_catalog", inputs.reference_catalog, NUL, "null",
       "Optional CSV of calibration stars (RA, DEC, mag_<band> AB) for zero points and PSF-star seeds; "
       "null: no zero-point calibration."),

    /* --------------------------------------------------------------- outputs */
    KP("outputs.work_dir", outputs.work_dir, 0, "\"work\"",
       "Folder for everything a run writes; created if missing."),
    KP("outputs.store", outputs.store, WD, "\"surveyproc.h5\"",
       "The HDF5 store: catalog, ePSFs, cells, patches, zero points, timing, provenance."),
    KP("outputs.log_file", outputs.log_file, WD | NUL, "\"surveyproc.log\"",
       "Log file of the run (appended to); null: log to stderr only."),
    KP("outputs.qa_dir", outputs.qa_dir, WD, "\"qa\"", "Folder of the QA report drawn by `surveyproc qa`."),
    KP("outputs.export_basename", outputs.export_basename, WD, "\"catalog\"",
       "Exported catalogs are written as <export_basename>.fits and/or .csv."),
    KL("outputs.export_formats", outputs.export_formats, 0, "[fits]", v_export,
       "Catalog exports written at the end of a run; [] for none (the store always holds the catalog)."),
    KB("outputs.save_white", outputs.save_white, 0, "false",
       "Also write the white stack, its noise map and the masks as FITS (work_dir/white/) for inspection."),
    KB("outputs.overwrite", outputs.overwrite, 0, "false",
       "Replace a store left by an earlier run; false refuses (continue one with `run --resume`)."),

    /* --------------------------------------------------------- image_scaling */
    KD("image_scaling.zp_ref", image_scaling.zp_ref, SC, "25.0", 0, 50, "mag",
       "Reference zero point: each frame is scaled by 10^(-0.4 (ZP_AUTO - zp_ref)), so a flux of 1 is "
       "magnitude zp_ref."),
    KD("image_scaling.saturation_fraction", image_scaling.saturation_fraction, SC | GT, "1.0", 0, 2, "",
       "A pixel is saturated (zero weight; counted by source_saturation_cut) when raw >= this fraction of "
       "its frame's SATURATE; frames without SATURATE get no saturation mask."),

    /* ------------------------------------------------------------------ crop */
    KB("crop.enabled", crop.enabled, SC, "true",
       "Exclude sources within crop.margin of the tile edge (stacks have noisy edges): flagged "
       "excluded_crop, not fitted."),
    KI("crop.margin", crop.margin, SC, "100", 0, 1000000, "pix", "Width of the excluded strip along each edge."),
    KB("crop.plot_pre_crop", crop.plot_pre_crop, 0, "true", "QA: draw the white stack before the crop, with the crop box."),
    KB("crop.plot_post_crop", crop.plot_post_crop, 0, "true", "QA: draw the white stack after the crop."),
    KI("crop.display_downsample", crop.display_downsample, 0, "4", 1, 256, "",
       "QA: block-averaging factor of the pre-crop drawing."),
    KI("crop.post_crop_display_downsample", crop.post_crop_display_downsample, 0, "4", 1, 256, "",
       "QA: block-averaging factor of the post-crop drawing."),

    /* --------------------------------------------------------------- overlay */
    KB("overlay.enabled", overlay.enabled, 0, "true",
       "QA: draw the white stack with the catalog sources marked by TYPE and exclusion."),
    KI("overlay.downsample_full", overlay.downsample_full, 0, "4", 1, 256, "",
       "QA: block-averaging factor of the full-tile overlay."),
    KB("overlay.zoom_enabled", overlay.zoom_enabled, 0, "true", "QA: add a full-resolution zoom on overlay.zoom_box."),
    KIV("overlay.zoom_box", overlay.zoom_box, ORD, "[0, 1000, 0, 1000]", 0, 1000000, "pix",
        "QA zoom region [x0, x1, y0, y1] in tile pixels (clipped to the tile)."),

    /* ---------------------------------------------------------------- checks */
    KB("checks.require_wcs_alignment", checks.require_wcs_alignment, 0, "true",
       "Refuse frames whose WCS differs beyond checks.wcs_tolerance: all frames of a tile share one pixel grid."),
    KD("checks.wcs_tolerance.crval", checks.wcs_tolerance.crval, 0, "1.0e-6", 0, 1, "deg",
       "Largest allowed difference of CRVAL between frames."),
    KD("checks.wcs_tolerance.crpix", checks.wcs_tolerance.crpix, 0, "1.0e-6", 0, 1000, "pix",
       "Largest allowed difference of CRPIX between frames."),
    KD("checks.wcs_tolerance.cd", checks.wcs_tolerance.cd, 0, "1.0e-9", 0, 1, "deg/pix",
       "Largest allowed difference of any CD (or PC x CDELT) element between frames."),
    KD("checks.wcs_tolerance.cdelt", checks.wcs_tolerance.cdelt, 0, "1.0e-9", 0, 1, "deg/pix",
       "Largest allowed difference of CDELT between frames."),
    KB("checks.require_same_shape", checks.require_same_shape, 0, "true",
       "Refuse frames whose (NAXIS2, NAXIS1) differ."),
    KB("checks.require_catalog_bands", checks.require_catalog_bands, 0, "true",
       "Refuse a catalog with FLUX_<band> columns for bands that no frame's FILTER provides."),

    /* ------------------------------------------------- source_saturation_cut */
    KB("source_saturation_cut.enabled", source_saturation_cut.enabled, SC, "true",
       "Flag sources near saturated pixels (excluded_saturation): kept in the catalog, not fitted."),
    KD("source_saturation_cut.radius_pix", source_saturation_cut.radius_pix, SC, "20.0", 0, 10000, "pix",
       "Radius around a source searched for saturated pixels."),
    KB("source_saturation_cut.require_all_bands", source_saturation_cut.require_all_bands, SC, "false",
       "false: saturation in any band flags the source; true: only saturation in every band does."),
    KI("source_saturation_cut.min_saturated_pixels", source_saturation_cut.min_saturated_pixels, SC, "1", 1,
       1000000, "pix", "Saturated pixels within radius_pix needed to flag a source."),

    /* --------------------------------------------------------------- logging */
    KE("logging.level", logging.level, 0, "info", v_level, a_level,
       "Threshold of log lines on stderr and in the log file (--quiet / --verbose override it)."),
    KD("logging.progress_heartbeat_s", logging.progress_heartbeat_s, 0, "30.0", 0.1, 86400, "s",
       "Seconds between progress lines when stderr is not a terminal."),
    KB("logging.timing_report", logging.timing_report, 0, "true",
       "Print the per-stage timing summary across ranks at the end of a run."),
    KB("logging.per_rank_log", logging.per_rank_log, 0, "false",
       "Every rank > 0 also writes its own log file <log_file>.rank<N>."),

    /* -------------------------------------------------------------- plotting */
    KI("plotting.dpi", plotting.dpi, 0, "150", 30, 1200, "dpi", "Resolution of the QA report's PNGs."),

    /* ----------------------------------------------------------- performance */
    KA("performance.ranks", performance.ranks, 0, "auto", 1, 1000000, "",
       "MPI ranks `plan --emit` writes into job scripts and run expects; auto: whatever the launcher starts."),
    KA("performance.threads_per_rank", performance.threads_per_rank, 0, "auto", 1, 4096, "",
       "OpenMP threads per rank; auto: SLURM_CPUS_PER_TASK, NCPUS, OMP_NUM_THREADS, the cgroup CPU limit, "
       "or cores / ranks per node."),
    KA("performance.frame_prep_workers", performance.frame_prep_workers, 0, "auto", 1, 4096, "",
       "Threads preparing a cell's frames (scaling, masks, noise); auto: min(frames, threads_per_rank)."),
    KA("performance.white_stack_workers", performance.white_stack_workers, 0, "auto", 1, 4096, "",
       "Threads accumulating the white stack by row chunks; auto: threads_per_rank."),
    KA("performance.memory_per_rank_mb", performance.memory_per_rank_mb, 0, "auto", 64, 1073741824, "MiB",
       "Memory budget per rank; the planner refuses or shrinks a layout above it. auto: cgroup limit, "
       "SLURM_MEM_PER_CPU or MemAvailable, shared by the node's ranks."),
    KB("performance.allow_oversubscribe", performance.allow_oversubscribe, 0, "false",
       "Run even when ranks x threads exceed the cores of a node (the planner refuses such a layout "
       "otherwise); for tests and shared debug nodes, slower than a fitting layout."),
    KE("performance.dedicated_coordinator", performance.dedicated_coordinator, 0, "auto", v_coord, NULL,
       "always: rank 0 only hands out cells; never: rank 0 fits cells too; auto: decided by job size."),
    KS("performance.blas_coretype", performance.blas_coretype, 0, "\"auto\"",
       "OpenBLAS kernels: auto (pick from CPU flags when OpenBLAS does not recognise the CPU), none "
       "(leave OpenBLAS alone), or a core name such as Haswell or SkylakeX."),
    KP("performance.fftw_wisdom_file", performance.fftw_wisdom_file, WD | NUL, "null",
       "FFTW wisdom read at start and saved at the end, so plans are made once; null: plan afresh each run."),
    KD("performance.rank_timeout_s", performance.rank_timeout_s, 0, "1800", 0, 1e7, "s",
       "Watchdog: a rank that sends nothing for this long while it holds a cell (or 10x the plan's cost "
       "estimate of that cell, if longer), or a wait for the other ranks in a collective step that lasts "
       "this long, ends the job with a message naming the rank, its host and the cell; the cell stays "
       "unfinished for `run --resume`. 0: no watchdog (a stopped rank then hangs the job)."),

    /* ------------------------------------------------------------------ epsf */
    KI("epsf.epsf_ngrid", epsf.epsf_ngrid, SC, "7", 1, 64, "",
       "The tile is split into epsf_ngrid x epsf_ngrid ePSF cells, each with its own ePSF per band; "
       "aim for >= 20 PSF stars per cell."),
    KI("epsf.ngrid", epsf.ngrid, SC, "6", 1, 64, "",
       "Each ePSF cell is split into ngrid x ngrid patches, the units of fitting."),
    KB("epsf.skip_empty_epsf_patches", epsf.skip_empty_epsf_patches, SC, "true",
       "Skip ePSF cells without an active (non-excluded) source: no ePSF, no patches there."),
    KE("epsf.psfstar_mode", epsf.psfstar_mode, SC, "detect+reference", v_psfstar, a_psfstar,
       "Where PSF-star candidates come from: detections in the cell, reference-catalog stars, or both "
       "(reference stars first); the reference modes need inputs.reference_catalog."),
    KD("epsf.thresh_sigma", epsf.thresh_sigma, SC | GT, "10.0", 0, 10000, "sigma",
       "Detection threshold for PSF-star candidates, in units of the background RMS."),
    KI("epsf.minarea", epsf.minarea, SC, "25", 1, 1000000, "pix",
       "Minimum connected pixels above the threshold for a detection."),
    KB("epsf.deblend", epsf.deblend, SC, "false",
       "Split detections with several peaks (simple deblending) instead of keeping them whole."),
    KI("epsf.cutout_size", epsf.cutout_size, SC | ODD, "51", 5, 1001, "pix",
       "Side of the star cutouts stacked into the ePSF (>= final_psf_size)."),
    KI("epsf.edge_pad", epsf.edge_pad, SC, "10", 0, 10000, "pix",
       "Candidates whose cutout comes closer than this to the tile edge are rejected."),
    KD("epsf.min_sep", epsf.min_sep, SC, "30.0", 0, 10000, "pix",
       "Candidates with another source closer than this are rejected (not isolated)."),
    KD("epsf.min_sep_flux_ratio", epsf.min_sep_flux_ratio, SC, "0", 0, 1, "",
       "Neighbours within min_sep fainter than this fraction of the candidate's flux do not make it crowded "
       "(they are masked in its cutout instead); any neighbour within 1.5 FWHM still counts; 0: every "
       "neighbour counts (default). docs/psf.md has the measurements behind the defaults."),
    KB("epsf.psfstar_use_catalog", epsf.psfstar_use_catalog, SC, "false",
       "PSF-star candidates are the input catalog's sources of TYPE STAR (at their projected positions) "
       "instead of the white-stack detections, and isolation and neighbour masking use every catalog "
       "source with its FLUX_<band>; false (default): detections only (measured better for the photometry "
       "on the demo and on a crowded tile, docs/psf.md)."),
    KD("epsf.neighbour_mask_sigma", epsf.neighbour_mask_sigma, SC | GT, "0.25", 0, 1000, "sigma",
       "Catalog neighbours are masked in the PSF-star cutouts out to the radius where their expected "
       "light (FLUX_<band> x a Moffat of fallback_fwhm_pix) falls below this many noise sigma."),
    KD("epsf.empirical_core_fwhm", epsf.empirical_core_fwhm, SC, "0", 0, 100, "",
       "The ePSF is empirical within this many FWHM of its centre and an elliptical Moffat fitted to the "
       "same stars beyond (cosine taper over one more FWHM): the noise of a few stars' faint pixels "
       "otherwise dominates the ePSF error 0 (default): empirical everywhere. A Moffat outside the core suits Moffat-like PSFs only (docs/psf.md)."),
    KB("epsf.cross_validate", epsf.cross_validate, SC, "true",
       "A cell's empirical ePSF that passes its quality gate is kept only if it predicts held-out PSF "
       "stars better than the Moffat fitted to the same stars (2-fold: each half's models against the "
       "other half; median chi2/dof difference); else the cell uses that Moffat. Cells with fewer than "
       "2 x patch_run.min_epsf_nstars_for_use stars are not tested (docs/psf.md)."),
    KB("epsf.moffat_field", epsf.moffat_field, SC, "true",
       "A cell whose ePSF falls back to a Moffat uses the band-wide Moffat instead of its own: one "
       "elliptical Moffat whose FWHM, beta and ellipticity are polynomials of the tile position "
       "(degree epsf.poly_degree; beta at most linear), fitted to the PSF stars of every cell of the "
       "band (the 120 of highest SNR) and evaluated at each patch, so it follows the PSF inside and "
       "between cells and its few parameters are set by all the band's stars (docs/psf.md). A band "
       "whose fit fails keeps the cells' own Moffats. false: the cells' own Moffats."),
    KB("epsf.fallback_borrow", epsf.fallback_borrow, SC, "true",
       "A cell whose ePSF fails its quality gate borrows the star-weighted mean of its neighbouring cells' "
       "empirical ePSFs (else of every empirical ePSF of the band) before the analytic fallback_model."),
    KD("epsf.wing_smoothing", epsf.wing_smoothing, SC, "0", 0, 2, "",
       "ePSF builder: beyond 1.5 FWHM from the centre the stack is smoothed by a Gaussian whose sigma "
       "grows as this x (r - 1.5 FWHM): a few faint stars leave the faint outer pixels as noisy as the "
       "sky, and a real wing varies slowly with r. 0: off (docs/psf.md has the measurements)."),
    KD("epsf.fallback_reject_sigma", epsf.fallback_reject_sigma, SC, "0", 0, 100, "sigma",
       "> 0: the fallback's Moffat fit rejects pixels whose local mean residual exceeds this many sigma "
       "(light of merged or undetected neighbours; a round wing is kept, the core never rejected) and fits "
       "again. 0 (default): with the galaxy veto and the stellar-locus cut of the star selection, measured "
       "to move the zero points further from the truth on 3 of 4 simulated tiles (docs/zeropoints.md)."),
    KD("epsf.fallback_residual_fwhm", epsf.fallback_residual_fwhm, SC, "0", 0, 100, "FWHM",
       "> 0: a cell whose ePSF fails its quality gate gets the Moffat fitted to its stars plus the stars' "
       "stacked residual from that Moffat beyond this many FWHM (ramped in over one more), pooled over the "
       "band by epsf.wing_pool, so light a Moffat cannot hold (a wide wing) can enter the PSF. 0 (default): "
       "the bare Moffat; with 10-30 stars of SNR 20-200 per cell the residual's sum is too noisy (each "
       "star's background error over the ~1400 wing pixels), measured worse (docs/psf.md)."),
    KB("epsf.wing_pool", epsf.wing_pool, SC, "true",
       "Every empirical or borrowed cell ePSF keeps its own profile within wing_pool_fwhm[0] FWHM, tapered to "
       "the band's mean empirical ePSF (outer part smoothed) at wing_pool_fwhm[1] FWHM and beyond: one "
       "cell's 5-30 stars leave its faint wing noisy (docs/psf.md). No effect on Moffat-fallback cells."),
    KDV("epsf.wing_pool_fwhm", epsf.wing_pool_fwhm, SC | ORD, "[2.0, 3.0]", 0, 100, "FWHM",
        "Inner and outer radius of the taper from a cell's own ePSF to the band's mean (epsf.wing_pool)."),
    KI("epsf.max_stars", epsf.max_stars, SC, "30", 1, 100000, "", "Most PSF stars used per band per cell."),
    KDV("epsf.q_range", epsf.q_range, SC | ORD, "[0.7, 1.3]", 0, 10, "",
        "Allowed [min, max] axis ratio of a candidate from its second moments (round stars are near 1)."),
    KD("epsf.snr_min", epsf.snr_min, SC, "20.0", 0, 1000000, "", "Minimum aperture SNR of a PSF star."),
    KD("epsf.psfstar_size_tol", epsf.psfstar_size_tol, SC, "0.15", 0, 10, "",
       "Stellar locus: a detected PSF-star candidate whose windowed size differs from the cell's stellar "
       "locus (the densest size among the candidates) by more than this fraction is rejected as extended "
       "(a galaxy the catalog does not type, a blend, a defect); reference stars are exempt; 0: off."),
    KD("epsf.max_peak_fraction", epsf.max_peak_fraction, SC | GT, "0.75", 0, 2, "",
       "Candidates whose peak pixel exceeds this fraction of SATURATE are rejected (non-linear regime)."),
    KD("epsf.reference_mag_min", epsf.reference_mag_min, SC, "10.0", -5, 40, "mag",
       "Reference stars brighter than this are not used as PSF stars."),
    KD("epsf.reference_mag_max", epsf.reference_mag_max, SC, "30.0", -5, 40, "mag",
       "Reference stars fainter than this are not used as PSF stars (snr_min usually cuts first)."),
    KB("epsf.reference_snap_to_detection", epsf.reference_snap_to_detection, SC, "true",
       "Move each reference star to the nearest detection within reference_match_r_pix."),
    KD("epsf.reference_match_r_pix", epsf.reference_match_r_pix, SC, "5.0", 0, 1000, "pix",
       "Largest reference-to-detection distance for snapping."),
    KI("epsf.oversamp", epsf.oversamp, SC, "2", 1, 8, "",
       "ePSF samples per image pixel (2-4 resolve undersampled PSFs; needs more stars)."),
    KI("epsf.maxiters", epsf.maxiters, SC, "4", 1, 1000, "",
       "Most iterations of the ePSF builder (recenter, stack, smooth); more iterations fit noise (docs/psf.md)."),
    KB("epsf.do_clip", epsf.do_clip, SC, "true", "Sigma-clip the stacked star samples in each ePSF pixel."),
    KD("epsf.clip_sigma", epsf.clip_sigma, SC | GT, "3.0", 0, 100, "sigma", "Clipping threshold of the stack."),
    KI("epsf.recenter_boxsize", epsf.recenter_boxsize, SC | ODD, "9", 3, 101, "pix",
       "Box in which each star is recentred on the current ePSF."),
    KE("epsf.smoothing_kernel", epsf.smoothing_kernel, SC, "none", v_smooth, NULL,
       "Smoothing of the ePSF updates between iterations: none (default) or quartic / quadratic (a "
       "triangle filter of 2 oversamp - 1 samples). With none and oversamp > 1 the run's 5-30 stars per "
       "cell grow a sub-pixel grid pattern that fails the quality gate, so every cell gets the Moffat "
       "fitted to its stars; that measured better photometry on the simulated tiles than the smoothed "
       "empirical stack (docs/psf.md)."),
    KI("epsf.final_psf_size", epsf.final_psf_size, SC | ODD, "41", 5, 1001, "pix",
       "Side of the ePSF stamp in image pixels; also sets the patch halo, "
       "max((final_psf_size-1)/2+2, patches.halo_pix_min)."),
    KE("epsf.interpolation", epsf.interpolation, SC, "bilinear", v_interp, NULL,
       "How the PSF varies across the tile: bilinear between neighbouring cell ePSFs (default), a "
       "polynomial in (x, y) fitted per band to the PSF stars of every cell at once (PSFEx-like; needs "
       "smoothing_kernel quartic with oversamp > 1; better only with bright PSF stars, docs/psf.md), or "
       "none (constant per cell)."),
    KP("epsf.given_psf", epsf.given_psf, SC | NUL, "null",
       "A PSF grid per band for the fit instead of the ePSFs built from the data: a path with {band} "
       "(e.g. psf/{band}.fits), each a FITS mosaic of PSFNGRID x PSFNGRID stamps of PSFSIZE samples "
       "(PSFOVERS per pixel, default 1) at nodes ((i + 0.5) TILENX / PSFNGRID - 0.5, same in y), the "
       "format `surveyproc simulate` writes as truth_psf/ (docs/psf.md). Blended bilinearly between "
       "nodes at each patch centre; the ePSFs are still built and stored. null: off."),
    KI("epsf.poly_degree", epsf.poly_degree, SC, "2", 0, 4, "",
       "Degree of the polynomial PSF variation (interpolation: polynomial); lowered for a band with fewer "
       "than 4 usable stars per term."),
    KE("epsf.fallback_model", epsf.fallback_model, SC, "moffat", v_fallback, NULL,
       "Analytic PSF used where the ePSF fails its quality gate (patch_run.min_epsf_nstars_for_use): fitted "
       "to the stars there are, else from fallback_fwhm_pix."),
    KD("epsf.fallback_fwhm_pix", epsf.fallback_fwhm_pix, SC | GT, "4.0", 0, 100, "pix",
       "FWHM of the fallback PSF when no star can constrain it."),
    KD("epsf.fallback_moffat_beta", epsf.fallback_moffat_beta, SC | GT, "3.5", 1, 20, "",
       "Moffat beta of the fallback PSF (beta > 1 for finite flux)."),
    KB("epsf.background_subtract_patch", epsf.background_subtract_patch, SC, "true",
       "Subtract a smooth background mesh per ePSF cell before selecting stars and building the ePSF."),
    KE("epsf.background_estimator", epsf.background_estimator, SC, "mode", v_bkg, NULL,
       "Statistic of each background box: SExtractor's mode (2.5 median - 1.5 mean) or the clipped median."),
    KI("epsf.background_boxsize", epsf.background_boxsize, SC, "96", 4, 4096, "pix", "Side of a background box."),
    KI("epsf.background_filtersize", epsf.background_filtersize, SC | ODD, "3", 1, 31, "boxes",
       "Median filter over the box grid."),
    KD("epsf.background_source_mask_sigma", epsf.background_source_mask_sigma, SC | GT, "3.0", 0, 100, "sigma",
       "Pixels above median + this x RMS are masked as sources when estimating the background."),
    KI("epsf.background_mask_dilate", epsf.background_mask_dilate, SC, "1", 0, 100, "pix",
       "Dilation of the source mask."),
    KB("epsf.star_local_bkg_subtract", epsf.star_local_bkg_subtract, SC, "true",
       "Subtract each PSF star's local background, from an annulus, before stacking."),
    KD("epsf.star_local_bkg_annulus_rin_pix", epsf.star_local_bkg_annulus_rin_pix, SC, "20.0", 0, 1000, "pix",
       "Inner radius of the annulus."),
    KD("epsf.star_local_bkg_annulus_rout_pix", epsf.star_local_bkg_annulus_rout_pix, SC | GT, "30.0", 0, 1000,
       "pix", "Outer radius of the annulus."),
    KD("epsf.star_local_bkg_sigma", epsf.star_local_bkg_sigma, SC | GT, "3.0", 0, 100, "sigma",
       "Sigma clipping of the annulus pixels."),
    KI("epsf.star_local_bkg_minpix", epsf.star_local_bkg_minpix, SC, "30", 1, 1000000, "pix",
       "Fewest usable annulus pixels; with fewer the local background is taken as 0."),
    KB("epsf.save_patch_background_diagnostics", epsf.save_patch_background_diagnostics, 0, "true",
       "Store each cell's background and RMS maps for QA."),
    KB("epsf.save_star_local_background_diagnostics", epsf.save_star_local_background_diagnostics, 0, "false",
       "Store every PSF star's annulus stamps for QA (large: one set per star per cell)."),
    KB("epsf.diagnostics_show_colorbar", epsf.diagnostics_show_colorbar, 0, "true",
       "QA: colour bars on the background drawings."),
    KB("epsf.save_growth_curve", epsf.save_growth_curve, 0, "true",
       "Store the encircled-energy curve of each ePSF for QA."),
    KB("epsf.save_residual_diagnostics", epsf.save_residual_diagnostics, 0, "true",
       "Store star-minus-ePSF residuals for QA."),
    KI("epsf.residual_diag_max_stars", epsf.residual_diag_max_stars, 0, "100", 0, 1000000, "",
       "Most stars per cell in the residual diagnostics."),
    KI("epsf.save_star_montage_max", epsf.save_star_montage_max, 0, "100", 0, 1000000, "",
       "Most stars per cell in the QA star montage."),
    KB("epsf.parallel_bands", epsf.parallel_bands, 0, "true",
       "Build the bands of a cell in parallel on the rank's threads."),
    KA("epsf.max_workers", epsf.max_workers, 0, "auto", 1, 4096, "",
       "Threads for the parallel band builds; auto: min(bands, threads_per_rank)."),

    /* --------------------------------------------------------------- patches */
    KI("patches.halo_pix_min", patches.halo_pix_min, SC, "20", 0, 10000, "pix",
       "Smallest halo around a patch; the halo is max((epsf.final_psf_size-1)/2+2, halo_pix_min). Sources "
       "in the halo are modelled so their light is not absorbed."),

    /* ---------------------------------------------------------- patch_inputs */
    KB("patch_inputs.skip_empty_patch", patch_inputs.skip_empty_patch, 0, "true",
       "Skip patches with no source to report."),

    /* ------------------------------------------------------------- patch_run */
    KB("patch_run.enable_multi_band_simultaneous_fitting", patch_run.enable_multi_band_simultaneous_fitting, SC,
       "true",
       "true: one position and shape per source shared by all bands, a flux per band; false: each band "
       "fitted on its own."),
    KB("patch_run.enable_staged_fit", patch_run.enable_staged_fit, SC, "true",
       "Fit in stages: fluxes only, then + positions, then + shapes; false: everything at once."),
    KI("patch_run.n_opt_iters", patch_run.n_opt_iters, SC, "20", 1, 10000, "",
       "Most optimizer iterations per stage."),
    KD("patch_run.dlnp_stop", patch_run.dlnp_stop, SC, "1.0e-2", 0, 1000000, "",
       "A source (group) has converged when an iteration improves its log-likelihood by less than this (per "
       "source of the group)."),
    KI("patch_run.flag_maxiter_margin", patch_run.flag_maxiter_margin, SC, "0", 0, 10000, "",
       "Flag hit_max_iters when an unconverged source used at least n_opt_iters - this iterations."),
    KA("patch_run.threads_per_process", patch_run.threads_per_process, 0, "auto", 1, 4096, "",
       "OpenMP threads fitting the patches of a cell in each rank; auto: performance.threads_per_rank."),
    KE("patch_run.gal_model", patch_run.gal_model, SC, "exp", v_gal, NULL,
       "Model of sources whose TYPE is blank or unknown."),
    KB("patch_run.untyped_point_first", patch_run.untyped_point_first, SC, "false",
       "true: sources whose TYPE is blank or unknown are fitted as point sources first; the gal_model galaxy is "
       "then tried (from Re, Re/3 and Re/10, neighbours held) and kept only if it lowers chi2 by more than 4; the "
       "catalog's TYPE records the model used. false (the seed's rule): they are fitted as gal_model. Measured "
       "trade-off (untyped stars much better, faint small untyped galaxies 5-20% low): docs/fitting.md."),
    KL("patch_run.untyped_alternatives", patch_run.untyped_alternatives, SC, "[dev]", v_untyped_alt,
       "Galaxy models also tried for sources whose TYPE is blank or unknown, besides gal_model: each is fitted "
       "with the neighbours held (from the catalog Re, the gal_model fit's Re and Re/3) and the model with the "
       "lowest chi2 is kept, its neighbours' geometry refitted when it changed (with untyped_point_first, the "
       "best galaxy must still beat the point source by 4); the catalog's TYPE records the model used. [] (the "
       "seed's rule): gal_model only. Measured (a blank-TYPE DEV fitted as EXP comes out 15-22% faint; fit CPU "
       "+25% with 10% of the sources blank): docs/fitting.md."),
    KE("patch_run.galaxy_profiles", patch_run.galaxy_profiles, SC, "truncated", v_galprof, NULL,
       "The Gaussian mixtures that stand for EXP and DEV (docs/fitting.md): truncated (default) = fitted "
       "to the exponential and de Vaucouleurs laws with the SDSS truncations (smoothly to zero between 3 "
       "and 4 Re, and 7 and 8 Re), enclosed light within 5e-4 of the law inside 4 Re; tractor = the "
       "Tractor's Hogg & Lang (2013) mixtures, as the seed pipeline fits (their DEV holds half its light "
       "within 0.915 Re of the truncated law's 0.892: DEV Re comes out ~4% small)."),
    KE("patch_run.psf_model", patch_run.psf_model, SC, "gaussian_mixture", v_psfmodel, a_psfmodel,
       "Galaxy-PSF convolution: FFT with the pixelized ePSF, or analytic with a Gaussian-mixture fit of it."),
    KI("patch_run.gaussian_mixture_n", patch_run.gaussian_mixture_n, SC, "4", 1, 10, "",
       "Gaussians in the mixture fit of the ePSF (psf_model: gaussian_mixture)."),
    KI("patch_run.min_epsf_nstars_for_use", patch_run.min_epsf_nstars_for_use, SC, "5", 0, 100000, "",
       "An ePSF built from fewer stars is not used: the cell gets the fallback PSF (epsf.fallback_model)."),
    KE("patch_run.halo_source_mode", patch_run.halo_source_mode, SC, "fit", v_halo, NULL,
       "Sources in a patch's halo: fitted with the patch and discarded (their own patch reports them), "
       "or held fixed at their initial values."),
    KB("patch_run.fit_sky", patch_run.fit_sky, SC, "true",
       "Fit a residual sky per band per patch (order sky_order) together with the fluxes."),
    KI("patch_run.sky_order", patch_run.sky_order, SC, "0", 0, 2, "",
       "Polynomial order of the fitted sky: 0 constant, 1 plane, 2 quadratic."),
    KD("patch_run.r_ap", patch_run.r_ap, SC | GT, "5.0", 0, 1000, "pix",
       "Aperture radius of the forced photometry that gives initial fluxes where FLUX_<band> is missing."),
    KD("patch_run.eps_flux", patch_run.eps_flux, SC, "1.0e-4", 0, 1000000, "",
       "Floor of initial fluxes (zp_ref-scaled units)."),
    KD("patch_run.sersic_n_init", patch_run.sersic_n_init, SC, "3.0", 0.1, 10, "",
       "Initial Sersic index of SERSIC sources."),
    KD("patch_run.sersic_n_min", patch_run.sersic_n_min, SC, "0.5", 0.1, 10, "", "Lower bound of the Sersic index."),
    KD("patch_run.sersic_n_max", patch_run.sersic_n_max, SC, "6.0", 0.1, 10, "", "Upper bound of the Sersic index."),
    KD("patch_run.re_fallback_pix", patch_run.re_fallback_pix, SC | GT, "3.0", 0, 1000, "pix",
       "Initial half-light radius of galaxies whose Re is missing."),
    KD("patch_run.re_max_pix", patch_run.re_max_pix, SC | GT, "100.0", 0, 100000, "pix",
       "Upper bound of the half-light radius."),
    KD("patch_run.q_min", patch_run.q_min, SC | GT, "0.05", 0, 1, "", "Lower bound of the galaxy axis ratio b/a."),
    KD("patch_run.max_shift_pix", patch_run.max_shift_pix, SC | GT, "3.0", 0, 1000, "pix",
       "Fitted positions stay within this distance of the catalog position."),
    KD("patch_run.position_prior_pix", patch_run.position_prior_pix, SC, "0.3", 0, 1000, "pix",
       "Gaussian prior (sigma) on each source's shift from its catalog position, so faint and blended "
       "sources stay where the catalog put them while bright ones move freely; 0: no prior (docs/fitting.md)."),
    KB("patch_run.poisson_from_model", patch_run.poisson_from_model, SC, "true",
       "Take the source Poisson variance of the weights from the fitted model as the fit proceeds, instead "
       "of from the noisy data (weights from the data bias fluxes low; docs/fitting.md); false: data weights."),
    KI("patch_run.max_group_size", patch_run.max_group_size, SC, "10", 1, 100000, "",
       "Overlapping sources are fitted jointly in groups of at most this many; larger blends are fitted in "
       "chunks in turn, so each converges on its own terms (docs/fitting.md)."),
    KB("patch_run.no_cutouts", patch_run.no_cutouts, 0, "false",
       "Store no per-source data/model/residual cutouts."),
    KB("patch_run.no_patch_overview", patch_run.no_patch_overview, 0, "false",
       "Store no per-patch data/model/residual overview."),
    KI("patch_run.cutout_size", patch_run.cutout_size, 0, "64", 8, 1024, "pix", "Side of the per-source cutouts."),
    KI("patch_run.cutout_max_sources", patch_run.cutout_max_sources, NUL, "100", 0, 1000000000, "",
       "Cutouts are stored for at most this many sources; null: all (large)."),
    KI("patch_run.cutout_start", patch_run.cutout_start, 0, "0", 0, 1000000000, "",
       "Index (catalog order) of the first source with cutouts."),
    KD("patch_run.cutout_data_p_lo", patch_run.cutout_data_p_lo, 0, "1.0", 0, 100, "%",
       "QA: low display percentile of data cutouts."),
    KD("patch_run.cutout_data_p_hi", patch_run.cutout_data_p_hi, 0, "99.0", 0, 100, "%",
       "QA: high display percentile of data cutouts."),
    KD("patch_run.cutout_model_p_lo", patch_run.cutout_model_p_lo, 0, "1.0", 0, 100, "%",
       "QA: low display percentile of model cutouts."),
    KD("patch_run.cutout_model_p_hi", patch_run.cutout_model_p_hi, 0, "99.0", 0, 100, "%",
       "QA: high display percentile of model cutouts."),
    KD("patch_run.cutout_resid_p_abs", patch_run.cutout_resid_p_abs, 0, "99.0", 0, 100, "%",
       "QA: percentile of |residual| setting the symmetric residual display range."),

    /* -------------------------------------------------------------------- zp */
    KB("zp.enabled", zp.enabled, SC, "true",
       "Calibrate zero points against inputs.reference_catalog (skipped with a warning when there is none)."),
    KD("zp.match_radius_arcsec", zp.match_radius_arcsec, SC | GT, "1.0", 0, 3600, "arcsec",
       "Largest distance between a fitted source and its reference star (one-to-one match)."),
    KD("zp.isolation_radius_arcsec", zp.isolation_radius_arcsec, SC, "3.0", 0, 3600, "arcsec",
       "Reference stars with another catalog source closer than this are not used."),
    KD("zp.gaia_mag_min", zp.gaia_mag_min, SC, "8.0", -5, 40, "mag",
       "Reference stars brighter than this are not used (saturation)."),
    KD("zp.gaia_mag_max", zp.gaia_mag_max, SC, "18.0", -5, 40, "mag",
       "Reference stars fainter than this are not used (noise)."),
    KD("zp.clip_sigma", zp.clip_sigma, SC | GT, "3.0", 0, 100, "sigma",
       "MAD-based sigma clipping of the per-star zero points."),
    KI("zp.clip_max_iters", zp.clip_max_iters, SC, "10", 0, 1000, "", "Most clipping iterations."),
    KI("zp.min_stars", zp.min_stars, SC, "5", 1, 1000000, "",
       "Fewest stars left after clipping for a band's zero point; with fewer the band gets no ZP (flagged)."),
    KB("zp.inject_gaia_sources", zp.inject_gaia_sources, SC, "false",
       "Add reference stars missing from the input catalog as extra fitted sources (flagged injected)."),
    KB("zp.apcorr", zp.apcorr, SC, "true",
       "Aperture correction, before the zero points: per band, scale FLUX_<band>_fit and its errors by the "
       "clipped weighted median of FLUX_<band>_APCAL / FLUX_<band>_fit over bright, isolated, converged point "
       "sources, so model fluxes count the PSF light the model lacks (a wide wing beyond a fallback Moffat or "
       "a cropped ePSF). The factor is recorded per row (APCORR_<band>) and per band (/apcorr)."),
    KD("zp.apcorr_radius_fwhm", zp.apcorr_radius_fwhm, SC | GT, "4.0", 0, 100, "FWHM",
       "Radius of the calibration aperture FLUX_<band>_APCAL in units of the band's PSF FWHM (median over "
       "the tile's cells); at most the local-background annulus's inner radius - 1 pixel."),
    KD("zp.apcorr_radius_pix", zp.apcorr_radius_pix, SC, "0.0", 0, 1000, "pix",
       "Fixed radius of the calibration aperture, all bands (0: zp.apcorr_radius_fwhm x the band's FWHM)."),
    KD("zp.apcorr_snr_min", zp.apcorr_snr_min, SC | GT, "50.0", 0, 1000000, "",
       "Point sources used for the aperture correction have FLUX_<band>_fit / FLUXERR_<band>_fit at least this."),
    KD("zp.apcorr_blend_max", zp.apcorr_blend_max, SC, "0.02", 0, 1, "",
       "... and BLEND_<band> (the neighbours' share of the model flux in the footprint) at most this."),
    KD("zp.apcorr_mask_sigma", zp.apcorr_mask_sigma, SC, "0.25", 0, 1000, "sigma",
       "In the calibration aperture, pixels where the neighbours' model (every other source of the patch) "
       "exceeds this many pixel sigmas are masked, and each ring of the aperture is filled with the mean "
       "residual of its unmasked pixels, so neighbours' model errors do not enter the correction "
       "(0: no neighbour mask; bad pixels are still filled)."),
    KI("zp.apcorr_min_stars", zp.apcorr_min_stars, SC, "5", 1, 1000000, "",
       "Fewest point sources left after clipping for a band's aperture correction; with fewer the band "
       "is not corrected (factor 1, flagged in /apcorr, a warning)."),
};
const int sp_cfg_nschema = (int)(sizeof sp_cfg_schema / sizeof sp_cfg_schema[0]);

const sp_cfg_section sp_cfg_sections[] = {
    {"inputs", "Input files. Relative paths resolve against this file's folder."},
    {"outputs", "Where results go. Relative paths other than work_dir resolve against work_dir."},
    {"image_scaling", "Photometric scaling of every frame to a common zero point, and saturation."},
    {"crop", "Exclusion of the noisy tile edges, and its QA drawings."},
    {"overlay", "QA drawing of the catalog over the white stack."},
    {"checks", "Consistency checks on the frames and catalog, made before any computing."},
    {"checks.wcs_tolerance", "How far frame WCS may differ and still count as one pixel grid."},
    {"source_saturation_cut", "Flagging of sources near saturated pixels before fitting."},
    {"logging", "Log lines, progress and the timing report."},
    {"plotting", "QA report drawings."},
    {"performance", "Parallel layout and resources; `auto` lets the planner (`surveyproc plan`) choose."},
    {"epsf", "Background, PSF-star selection and the empirical PSF per band per cell."},
    {"patches", "Patch geometry."},
    {"patch_inputs", "Which patches are built."},
    {"patch_run", "The model fit of each patch, and the per-source cutouts kept for QA."},
    {"zp", "Zero-point calibration against the reference catalog."},
};
const int sp_cfg_nsections = (int)(sizeof sp_cfg_sections / sizeof sp_cfg_sections[0]);

#define NOFIT "no payload files: cells keep their pixels in memory"
const sp_cfg_seed_key sp_cfg_seed_keys[] = {
    {"inputs.gaiaxp_synphot_csv", "inputs.reference_catalog", "any CSV with RA, DEC, mag_<band> (e.g. Gaia XP synthetic photometry)"},
    {"outputs.cropped_images_dir", "outputs.qa_dir", "QA drawings are made from the store by `surveyproc qa`"},
    {"outputs.overlay_dir", "outputs.qa_dir", "QA drawings are made from the store by `surveyproc qa`"},
    {"outputs.epsf_dir", "outputs.store", "ePSFs are /epsf/<band> in the store"},
    {"outputs.patches_dir", "outputs.store", "patch geometry is /patches in the store"},
    {"outputs.patch_inputs_dir", NULL, NOFIT},
    {"outputs.tractor_out_dir", "outputs.store", "fit results are /catalog in the store"},
    {"outputs.final_catalog", "outputs.export_basename", "with outputs.export_formats: [csv] for a CSV like tract7dt's"},
    {"crop.overlay_catalog", "overlay.enabled", "the overlay has its own section"},
    {"crop.overlay_downsample_full", "overlay.downsample_full", "the overlay has its own section"},
    {"crop.overlay_downsample_crop", NULL, "unused in tract7dt"},
    {"crop.overlay_crop_box", "overlay.zoom_box", "the overlay has its own section"},
    {"crop.overlay_crop_enabled", "overlay.zoom_enabled", "the overlay has its own section"},
    {"logging.file", "outputs.log_file", "null still means no log file"},
    {"logging.ignore_warnings", NULL, "Python warnings only"},
    {"logging.format", NULL, "log lines are always: time rank level message"},
    {"epsf.use_gaiaxp", "epsf.psfstar_mode", "reference-catalog seeds are chosen with psfstar_mode"},
    {"epsf.gaia_mag_min", "epsf.reference_mag_min", "same meaning, any reference catalog"},
    {"epsf.gaia_mag_max", "epsf.reference_mag_max", "same meaning, any reference catalog"},
    {"epsf.gaia_snap_to_sep", "epsf.reference_snap_to_detection", "same meaning"},
    {"epsf.gaia_match_r_pix", "epsf.reference_match_r_pix", "same meaning"},
    {"epsf.gaia_snr_min", "epsf.snr_min", "applies to every PSF-star candidate"},
    {"epsf.gaia_forced_k_fwhm", NULL, "the ePSF builder sizes the SNR aperture from the measured FWHM"},
    {"epsf.gaia_forced_rmin_pix", NULL, "the ePSF builder sizes the SNR aperture from the measured FWHM"},
    {"epsf.gaia_forced_rmax_pix", NULL, "the ePSF builder sizes the SNR aperture from the measured FWHM"},
    {"epsf.gaia_seed_sat_r", NULL, "saturation is tested over the whole star cutout"},
    {"epsf.gaia_seed_sat_div", "epsf.max_peak_fraction", "max_peak_fraction = 1 / gaia_seed_sat_div"},
    {"patch_inputs.save_patch_inputs", NULL, NOFIT},
    {"patch_inputs.include_wcs_in_payload", NULL, NOFIT},
    {"patch_inputs.max_workers", NULL, NOFIT},
    {"patch_inputs.gzip_compresslevel", NULL, NOFIT},
    {"patch_inputs.keep_payloads_in_memory", NULL, NOFIT},
    {"patch_run.python_exe", NULL, "fits run in-process, in C"},
    {"patch_run.resume", NULL, "use `surveyproc run --resume`: it refuses a store made with another config"},
    {"patch_run.max_workers", "patch_run.threads_per_process", "patches run on the threads of every MPI rank"},
    {"patch_run.psf_fallback_model", "epsf.fallback_model", "moffat or gaussian"},
    {"patch_run.fallback_default_fwhm_pix", "epsf.fallback_fwhm_pix", "same meaning"},
    {"patch_run.fallback_stamp_radius_pix", NULL, "the fallback PSF has the ePSF's size, epsf.final_psf_size"},
    {"patch_run.ncircular_gaussian_n", NULL, "the fallback is a Moffat or a Gaussian (epsf.fallback_model)"},
    {"patch_run.hybrid_psf_n", NULL, "no hybrid PSF; patch_run.psf_model is pixelized or gaussian_mixture"},
    {"moffat_psf.fwhm_default_pix", "epsf.fallback_fwhm_pix", "the fallback PSF lives in epsf"},
    {"moffat_psf.beta", "epsf.fallback_moffat_beta", "the fallback PSF lives in epsf"},
    {"moffat_psf.radius_pix", NULL, "the fallback PSF has the ePSF's size, epsf.final_psf_size"},
    {"moffat_psf.module_path", NULL, "legacy in tract7dt"},
    {"merge", NULL, "rows go to the store as cells finish, so there is nothing to merge"},
    {"zp.min_box_size_pix", NULL, "reference stars are taken over the whole tile"},
};
const int sp_cfg_nseed_keys = (int)(sizeof sp_cfg_seed_keys / sizeof sp_cfg_seed_keys[0]);

const sp_cfg_changed_default sp_cfg_changed_defaults[] = {
    {"crop.margin", "500", "500 suits 7DT's 10k-pixel stacks; set it to your frames' noisy edge width"},
    {"epsf.cutout_size", "61", "follows final_psf_size"},
    {"epsf.final_psf_size", "55", "41 pixels hold > 99.9% of a 4-pixel-FWHM Moffat's flux; smaller stamps make "
                                  "halos and fits cheaper"},
    {"epsf.oversamp", "1", "a 2x oversampled ePSF resolves the undersampled cores of 3-4 pixel FWHM stars"},
    {"epsf.maxiters", "30", "photutils' own default; the builder converges in 3-4 iterations and later ones fit noise "
                            "(docs/psf.md)"},
    {"epsf.background_filtersize", "9", "SExtractor's default; 9 boxes smooth over most of a cell"},
    {"epsf.save_star_local_background_diagnostics", "true", "tract7dt's docs call it the costliest diagnostic"},
    {"patch_run.dlnp_stop", "1e-6", "a log-likelihood change of 1e-2 per source (chi2 0.02) is far below significance; "
                                    "1e-3 cost 1.4x the fit CPU for the same accuracy, 1e-6 ran the seed's patches to "
                                    "the iteration cap (docs/fitting.md)"},
    {"epsf.smoothing_kernel", "quartic", "smoothing the updates flattened the ePSF peaks by up to 9%: residuals "
                                         "against the true PSF 0.1-0.3% without, 0.15-1.4% with (docs/psf.md)"},
    {"patch_run.psf_model", "pixelized", "the Gaussian-mixture route is 25-30x faster at ~1e-4 model accuracy "
                                         "(docs/fitting.md); pixelized stays selectable"},
    {"patch_run.threads_per_process", "1", "auto lets the planner fill each rank's cores"},
    {"patch_run.min_epsf_nstars_for_use", "2", "an ePSF from 2 stars is mostly noise"},
    {"patch_run.cutout_size", "100", "cutouts are stored in the HDF5 store"},
    {"patch_run.cutout_max_sources", "null", "cutouts are stored in the HDF5 store; null (all) is still allowed"},
    {"zp.match_radius_arcsec", "3.0", "it matches fitted positions to reference stars, not catalogs to each other"},
    {"plotting.dpi", "300", "QA pages load faster; 300 is still allowed"},
};
const int sp_cfg_nchanged_defaults = (int)(sizeof sp_cfg_changed_defaults / sizeof sp_cfg_changed_defaults[0]);

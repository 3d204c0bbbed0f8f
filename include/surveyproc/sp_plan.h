/* sp_plan.h — the plan of a run: frame table, bands, tile WCS, input catalog
 * projected onto the tile, the grid of ePSF cells and patches with halos, and
 * each cell's cost and memory estimate (DESIGN §3 "plan", issue 4).
 *
 * sp_plan_build() is MPI-collective over `comm`: frames are split over ranks
 * to read headers and statistics ("partition visits"), gathered and shared;
 * every rank reads the catalog; every rank ends with the same plan. Errors are
 * agreed (sp_mpi_agree): every rank returns the same status and message.
 */
#ifndef SP_PLAN_H
#define SP_PLAN_H

#include <mpi.h>
#include <stdint.h>
#include <stdio.h>

#include "surveyproc/sp_fit.h"
#include "surveyproc/sp_wcs.h"

#define SP_BAND_MAX 24
#define SP_PATH_MAX 1024

/* What the plan needs from the configuration (filled by sp_plan_opts_from_config). */
typedef struct {
    char image_list[SP_PATH_MAX];
    char input_catalog[SP_PATH_MAX];
    char reference_catalog[SP_PATH_MAX]; /* "" when zero points are off: not checked */
    int inject_reference;     /* zp.inject_gaia_sources: append unmatched reference stars as STARs */
    double inject_match_arcsec, inject_mag_min, inject_mag_max; /* zp.match_radius_arcsec, gaia_mag_min/max */
    double zp_ref;
    double crop_margin;       /* pixels from the tile edge that are excluded_crop */
    double wcs_tolerance;     /* pixels */
    int allow_unknown_bands;  /* !checks.require_catalog_bands: FLUX_<band> of a band no frame has is ignored */
    int shape_check_off;      /* !checks.require_same_shape: asked for, not supported (the message says so) */
    int epsf_ngrid;           /* cells per side */
    int ngrid;                /* patches per cell side */
    int psf_size;             /* final PSF stamp size (pixels, odd) */
    int psf_oversamp;         /* ePSF oversampling (epsf.oversamp; the ePSF grid's memory) */
    int psf_field_stars;      /* > 0 (epsf.moffat_field): PSF-star cutouts kept per band for the
                               * band-wide Moffat (their memory; src/pipeline/psf_field.c) */
    int psf_field_size;       /* their side (pixels), as cropped for the expected FWHM */
    int halo_pix_min;
    int skip_empty_cells;     /* epsf.skip_empty_epsf_patches */
    int skip_empty_patches;   /* patch_inputs.skip_empty_patch */
    int gal_model;            /* source type used for blank/unknown TYPE */
    int threads;              /* OpenMP threads per rank (for the memory estimate) */
    /* the fit's model boxes and groups, for the memory estimate (0: the defaults 4 px, 3.5,
     * 100, 3 px): epsf.fallback_fwhm_pix / fallback_moffat_beta (the PSF before any is built),
     * patch_run.max_group_size, patch_run.re_fallback_pix; halo_fixed: halo_source_mode fixed */
    double psf_fwhm, psf_beta, re_fallback;
    int max_group, halo_fixed;
} sp_plan_opts;

typedef struct {
    char path[SP_PATH_MAX];
    char band[SP_BAND_MAX];
    int band_index;
    int hdu;
    long nx, ny;
    double zp_auto, skysig, egain, saturate, exptime;
    double scale;                 /* 10^(-0.4 (ZP_AUTO - zp_ref)) */
    unsigned long hdr_checksum;
    long long file_size;
    double wcs_offset_pix;        /* max offset against frame 0's WCS */
    double median, rsigma, nan_frac; /* from sampled rows, raw ADU */
    long list_line;               /* line of the image list that names it */
    unsigned long long dev, ino;  /* file identity: the same file listed twice is refused */
} sp_frame;

/* source types (SP_SRC_STAR, SP_SRC_EXP, SP_SRC_DEV, SP_SRC_SERSIC) are the fitter's */
#define SP_SRC_NTYPES 4

/* exclusion flags of a catalog row */
enum {
    SP_EXCL_CROP = 1,       /* inside the crop margin */
    SP_EXCL_NANCOORD = 2,   /* RA/DEC not finite */
    SP_EXCL_OUTSIDE = 4,    /* projects outside the tile */
    SP_EXCL_SATURATION = 8, /* saturated (set per cell) */
};

typedef struct {
    long n;
    int nbands;
    char **id;          /* verbatim (row number if the catalog has no ID column) */
    double *ra, *dec;   /* degrees */
    double *x, *y;      /* tile pixels, 0-based */
    int *type;          /* SP_SRC_* */
    int *type_given;    /* 1 if TYPE was in the catalog and recognised */
    double *flux_init;  /* n * nbands, NaN when absent */
    double *ell, *theta, *re; /* NaN when absent */
    double *sersic_n;
    unsigned *excl;     /* SP_EXCL_* */
    int *cell, *patch;  /* -1 when excluded */
    long *line;         /* line in the CSV (the reference CSV's for injected rows) */
    uint8_t *injected;  /* 1: a reference star appended by zp.inject_gaia_sources */
    long ninjected;
    char *idbuf;
    char *idbuf_inj;    /* IDs of the injected rows ("REF<line>") */
} sp_catalog;

typedef struct {
    int id, ix, iy;
    long bx0, by0, bx1, by1;  /* base region [bx0, bx1) x [by0, by1) */
    long rx0, ry0, rx1, ry1;  /* ROI = base + halo, clipped to the tile */
    int patch0, npatch;       /* patches of the cell: [patch0, patch0 + npatch) */
    long nsrc;                /* active sources in the base region */
    int active;               /* 0 if skipped (empty) */
    double cost;              /* relative cost estimate (seconds on a nominal core) */
    double mem_bytes;         /* peak memory estimate to process it */
} sp_cell;

typedef struct {
    int id, cell, ix, iy;
    long bx0, by0, bx1, by1;
    long rx0, ry0, rx1, ry1;
    long src0, nsrc;          /* base sources: plan->patch_src[src0 .. src0+nsrc) */
    long xsrc0, nxsrc;        /* crop-excluded sources whose pixel is in the base region:
                               * plan->patch_xsrc[xsrc0 .. xsrc0+nxsrc) (modelled, never reported) */
    int active;
} sp_patch;

typedef struct {
    sp_plan_opts opts;
    int nframes;
    sp_frame *frames;
    int nbands;
    char (*bands)[SP_BAND_MAX];
    int *band_nframes;
    long nx, ny;                 /* tile shape */
    char *wcs_header;            /* frame 0's header (80-char cards) */
    int wcs_nkeys;
    sp_wcs *wcs;                 /* tile WCS (this rank's copy) */
    double pixscale;             /* arcsec / pixel at the tile centre */
    sp_catalog cat;
    int halo;
    int ncells, npatches, ncells_active, npatches_active;
    sp_cell *cells;
    sp_patch *patches;
    long *patch_src;             /* sources ordered by patch */
    long *patch_xsrc;            /* crop-excluded sources ordered by patch (their light is modelled) */
    int outer;                   /* sources this far outside a patch ROI (pixels) are modelled too */
    uint64_t inputs_hash;        /* paths, sizes, header checksums, catalog bytes */
    double max_cell_mem;         /* largest cell memory estimate (bytes) */
    sp_fit_reserve fit_reserve;  /* the largest patch fit (fieldwise max over active patches): what each
                                  * thread's fit workspace is reserved for (sp_fit_workspace_reserve) */
    double fit_thread_mem;       /* bytes per fitting thread: that workspace + the patch loop's scratch */
    long nsrc_active;
} sp_plan;

int sp_plan_build(const sp_plan_opts *opts, MPI_Comm comm, sp_plan *plan);
void sp_plan_free(sp_plan *plan);

/* Read an image list: one path per line, '#' comments and blanks ignored,
 * relative paths resolved against the list's folder. Not collective.
 * sp_plan_read_image_list_lines also returns each path's line number
 * (*lines, malloc'ed, may be NULL to skip). */
int sp_plan_read_image_list(const char *list, char ***paths, int *n);
int sp_plan_read_image_list_lines(const char *list, char ***paths, long **lines, int *n);

/* Print the plan (frames, bands, grid, cells, costs, memory) — rank 0 usually. */
void sp_plan_print(const sp_plan *plan, FILE *f, int verbose);

/* Parse a TYPE cell: STAR/PSF/POINT, EXP, DEV, SERSIC; GAL/blank/unknown -> -1. */
int sp_plan_parse_type(const char *s);
const char *sp_plan_type_name(int type);

/* The sources a fit of patch p models: its base sources first, then every
 * other source whose light may reach its ROI (base + halo) — active or
 * crop-excluded, with its position in the ROI grown by plan->outer pixels (a
 * bright star just outside the ROI pours its PSF into it). Returns the count;
 * fills idx (capacity cap). */
long sp_plan_patch_sources(const sp_plan *plan, int p, long *idx, long cap);

/* Memory estimate of processing a cell with `threads` OpenMP threads: its pixel
 * buffers, the per-cell rows, the ePSF grid, and `threads` x plan->fit_thread_mem
 * (docs/performance.md, "Memory: what the planner counts"). */
double sp_plan_cell_memory(const sp_plan *plan, const sp_cell *c, int threads);

#endif

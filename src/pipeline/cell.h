/* cell.h — private to the run (src/pipeline.c and the files of src/pipeline/): the state
 * of a run and of one ePSF cell while its stages run. The stage table itself is
 * in src/pipeline.c; the PSF stages (background, detection, ePSF) are in
 * cell_psf.c and the patch fits in cell_fit.c. */
#ifndef SP_PIPELINE_CELL_H
#define SP_PIPELINE_CELL_H

#include "surveyproc/sp_aperture.h"
#include "surveyproc/sp_background.h"
#include "surveyproc/sp_config.h"
#include "surveyproc/sp_detect.h"
#include "surveyproc/sp_epsf.h"
#include "surveyproc/sp_fit.h"
#include "surveyproc/sp_log.h"
#include "surveyproc/sp_plan.h"
#include "surveyproc/sp_store.h"

#include <mpi.h>
#include <stdint.h>

/* Parameters of the PSF and fit stages, derived once from the config. */
typedef struct {
    sp_bkg_params bkg;
    sp_detect_params det;
    sp_starsel_params sel;
    sp_epsf_params epsf;
    sp_fit_options fit;
    int subtract_bkg;     /* epsf.background_subtract_patch */
    int blend_psf;        /* 1: the PSF of a patch blends the neighbouring cells' ePSFs at its
                           * centre (epsf.interpolation bilinear); 0: its cell's own ePSF */
    int halo_fixed;       /* patch_run.halo_source_mode == fixed */
    int poisson_from_model; /* patch_run.poisson_from_model: sp_fit_image.poisson_k (cell_fit.c) */
    int band_threads;     /* threads building the bands of a cell (epsf.parallel_bands) */
    int use_catalog;      /* epsf.psfstar_use_catalog: catalog STARs as candidates, catalog isolation/masking */
    double nb_mask_sigma; /* epsf.neighbour_mask_sigma */
    int borrow;           /* epsf.fallback_borrow */
    int cross_validate;   /* epsf.cross_validate */
    int poly, poly_degree; /* epsf.interpolation: polynomial, epsf.poly_degree */
} stage_params;

/* Reference-catalog stars projected on the tile (PSF-star candidates). */
typedef struct {
    long n;
    double *x, *y;        /* tile pixels */
    double *mag;          /* n * nbands, NaN where blank */
} ref_stars;

enum { RUN_PSF_PASS = 0, RUN_FIT_PASS = 1 };

typedef struct {
    const sp_config *cfg;
    const sp_plan *plan;
    sp_store *store;
    MPI_Comm comm;
    int rank, nranks;
    int threads, prep_threads, white_threads;
    sp_progress progress;
    long ncells_todo, ncells_done;
    double bytes_read;
    stage_params sp;
    ref_stars refs;
    double *band_satlevel;          /* per band: lowest SATURATE x scale of its frames (scaled; inf: none) */
    sp_fit_workspace **ws;          /* one per thread, created once per run */
    /* The ePSF grid: every active cell's oversampled ePSF per band, held by every
     * rank after the PSF pass (built here, shared by psf_grid_share, or read
     * back from the store on resume), so a patch's PSF can blend neighbours. */
    int phase;                      /* RUN_PSF_PASS or RUN_FIT_PASS */
    sp_psf **grid;                  /* nbands * ncells, [b * ncells + cell]; NULL: none */
    int32_t *grid_nstars, *grid_kind; /* same index: stars used, SP_EPSF_* kind */
    uint8_t *grid_mine;             /* ncells: built by this rank in this run */
    double *xedge, *yedge;          /* cell edges in tile pixels (epsf_ngrid + 1 each) */
    /* epsf.interpolation: polynomial — one model per band over the whole tile, built
     * after the PSF pass from every cell's PSF-star cutouts (psf_poly_build) */
    struct band_cuts *fcuts;        /* nbands: this rank's cutouts of the PSF pass */
    struct poly_model *poly;        /* nbands: the band's model, or psf == NULL (cell grid used) */
    int poly_decided;               /* 1 once every band's model is built or refused (or loaded) */
    struct mfield_state *mf;        /* epsf.moffat_field (psf_field.c); NULL: off */
    sp_store_meta qa;               /* which QA diagnostics the store holds (qa_* fields) */
    long nfit_sources, nfit_patches; /* this rank's totals (summary) */
    sp_fit_patch_stats fitcost;     /* this rank's fit CPU by stage and kind of group (cpu_*, srcband, groups) */
    struct ioprep_state *iop;       /* read+prep buffers and open frames kept across cells (pipeline.c) */
    double *apcal_r;                /* nbands: calibration-aperture radius (pixels), set before the fit pass */
    struct given_psf *given;        /* nbands: epsf.given_psf grids (psf_given.c), NULL: off */
    uint64_t given_hash;            /* their paths and samples (folded into the store's inputs hash) */
} run_t;

typedef struct {
    run_t *run;
    const sp_cell *cell;
    long x0, y0, nx, ny;         /* ROI in tile pixels */
    size_t npix;
    float **data, **ivar;        /* per band, ROI-sized */
    uint8_t **mask;
    float **rms;                 /* per band background RMS map (NULL until the background stage) */
    float **back;                /* per band background map, kept only for the QA maps (else NULL) */
    float *white, *white_ivar;
    long *src;                   /* base sources of the cell (catalog indices), patch by patch */
    long nsrc;
    unsigned *excl;              /* exclusion flags of src[] (plan's + saturation) */
    sp_aper_result *aper;        /* nsrc * nbands */
    sp_aper_result *apcal;       /* nsrc * nbands: the calibration aperture (zp.apcorr) */
    sp_source *det;              /* detections on the white stack (ROI pixels) */
    int ndet;
    long *cat, ncat;             /* catalog rows near the ROI (psfstar_use_catalog) */
    sp_epsf_result **epsf;       /* per band */
    sp_fit_result *fit;          /* nsrc: the fit of each base source */
    uint8_t *fitted;             /* nsrc: 1 where fit[] holds a reported result */
    double *fit_ra, *fit_dec;    /* nsrc: sky position of the fitted position */
    sp_store_patchrow *prow;     /* the cell's patch rows */
    /* QA: cutouts of the cell's sources among /qa/cutouts' rows, and overviews of its patches
     * among /qa/patch_overview's (filled by the fit threads, written by the main thread) */
    int ncut;
    long *cut_slot;              /* nsrc: slot in /qa/cutouts, -1 if none */
    float *cut;                  /* ncut x 3 (data, model, resid) x nbands x s x s */
    long *cut_slots;             /* ncut: the slots, in cell order */
    int nov;
    int *ov_slot;                /* npatch: slot in /qa/patch_overview, -1 if none */
    float *ov;                   /* nov x 3 x nbands x h x w */
    int *ov_slots;               /* nov */
    int ov_ds, ov_h, ov_w;
    double bytes_read;
} cell_t;

/* Run-level set-up of the stages (serial part before the cell phase) and its end. */
int cell_stages_setup(run_t *r);
void cell_stages_cleanup(run_t *r);

/* Stages (cell_psf.c, cell_fit.c). Each returns an sp_status. */
int stage_background(cell_t *c);
int stage_detect(cell_t *c);
int stage_epsf(cell_t *c);
int stage_fit(cell_t *c);
int stage_qa_maps(cell_t *c);

/* Fill the fit columns of catalog row `row` from the fit of base source k (cell_fit.c). */
void cell_fit_row(const cell_t *c, long k, void *rows, long row);
/* Write the cell's QA cutouts and patch overviews (main thread; cell_fit.c). */
int cell_qa_write(cell_t *c);

void cell_psf_free(cell_t *c);

/* epsf.given_psf (psf_given.c): read every band's grid (all ranks; SP_OK and nothing
 * done when unset), free them, and the blend of the nodes around (x, y) (tile pixels). */
int psf_given_load(run_t *r);
void psf_given_free(run_t *r);
int psf_given_at(const run_t *r, int b, double x, double y, sp_psf **scratch, const sp_psf **out);

/* Radius (pixels) out to which a source of flux f adds more than k_sigma per
 * pixel, for a beta-3 Moffat of the given FWHM (0: never); cell_psf.c. */
double psf_mask_radius(double f, double fwhm, double k_sigma);

/* The ePSF grid (cell_psf.c). psf_grid_load: COLLECTIVE; on a resumed store
 * reads the ePSFs built by an earlier run and sets need[cell] = 1 for active
 * cells still without one (a new store: every active cell). psf_grid_share:
 * COLLECTIVE; every rank receives the ePSFs the others built. */
int psf_grid_load(run_t *r, uint8_t *need);
int psf_grid_share(run_t *r);
/* epsf.fallback_borrow (called by psf_grid_share): fallback cells take their
 * empirical neighbours' mean ePSF; not collective, same result on every rank. */
int psf_grid_borrow(run_t *r);
int psf_grid_pool(run_t *r);
/* The PSF of band b at tile position (x, y) for a source of cell `cell`:
 * epsf.interpolation bilinear blends the neighbouring cells' ePSFs into *scratch
 * (allocated on first use, same geometry); none returns the cell's own. */
int psf_grid_at(const run_t *r, int b, int cell, double x, double y, sp_psf **scratch, const sp_psf **out);
/* COLLECTIVE (called by psf_grid_share): per band, the cutouts gathered on rank
 * b % nranks, one sp_epsf_build_field there, the model broadcast and stored. */
int psf_poly_build(run_t *r);
/* A gathered PSF-star cutout record: v = ix, iy, x, y, flux, bkg, bkg_rms, snr, q; pix = its n^2
 * data floats then n^2 weights (8-byte aligned; c points into it). */
void psf_cutout_unpack(const double *v, int n, const char *pix, sp_epsf_cutout *c);
/* Gather sendn bytes of every rank on `owner` (collective): there *out (malloc'd, total + 8
 * bytes; the caller frees it) and *ntot; a failure on the owner (too large for one message, no
 * memory) goes to *lst, which the caller agrees on after its gathers. counts, displs: nranks ints. */
void psf_gather_bytes(const run_t *r, int owner, const char *band, const void *send, int sendn, int *counts,
                      int *displs, char **out, long *ntot, int *lst);

/* epsf.moffat_field (psf_field.c): the band-wide Moffat the Moffat cells use.
 * setup/free with the stages; collect in a cell's band build (its PSF stars);
 * load on resume (need[] all set when a band is undecided); build (collective)
 * and apply (the Moffat cells' stamps and /epsf/<band>) in the share; at gives
 * a patch's PSF when psf_field_on. */
int psf_field_setup(run_t *r);
int psf_field_kept_max(long ncells); /* an upper bound of the cutouts kept per band (the planner's memory) */
int psf_field_cut_size(double fwhm, int final_size); /* their side for a cell of that FWHM */
void psf_field_free(run_t *r);
int psf_field_collect(cell_t *c, int b, const sp_psfstar *stars, int nstars, const sp_epsf_params *ep,
                      double cell_fwhm);
int psf_field_load(run_t *r, uint8_t *need);
int psf_field_build(run_t *r);
int psf_field_apply(run_t *r);
int psf_field_on(const run_t *r, int b);
int psf_field_at(const run_t *r, int b, int cell, double x, double y, sp_psf *out);
/* The oversampled PSF sampled at the image pixels of a size x size stamp (cell_psf.c). */
void psf_sample_pixels(const sp_psf *psf, int size, float *out);

/* An error raised on a worker thread of an OpenMP region: sp_err_msg() is
 * thread-local, so the first failing thread copies its message here and the
 * main thread re-raises it after the region. */
typedef struct {
    int status;
    char msg[1024];
} thread_err;

/* Record (first one wins; thread-safe) `st` with the calling thread's message prefixed by `what`. */
void thread_err_record(thread_err *e, int st, const char *what);
/* On the main thread after the region: SP_OK, or the recorded status with its message. */
int thread_err_raise(const thread_err *e);

#endif

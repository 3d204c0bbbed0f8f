/* sp_sim.h — synthetic survey generator: a 7DT-like aligned multi-band tile
 * with known truth (`surveyproc simulate`), and the true PSF model the scorer
 * and tests re-render.
 *
 * What is modelled (docs/simulator.md says why and how accurately):
 *  - N bands (m400..m875), one or more float32 frames per band, TAN (+SIP) WCS
 *    with a CD matrix, headers FILTER ZP_AUTO SKYSIG EGAIN SATURATE EXPTIME.
 *  - PSF: elliptical Moffat core (FWHM, beta, ellipticity, angle varying
 *    smoothly over the field and between bands) plus an optional faint wide
 *    circular Moffat wing, smoothly tapered to zero at `radius`, integrated
 *    over pixels (Gauss-Legendre per pixel, adaptively 1..5 points per axis),
 *    normalised so a rendered source's pixels sum to its flux exactly.
 *  - Stars (power-law counts, Plummer clusters for dense patches, a few
 *    forced saturating stars), EXP and DEV galaxies (SDSS-style truncated
 *    Sersic n=1/4) convolved with the PSF by FFT on a 5x (odd) oversampled grid.
 *  - Smooth SEDs (blackbodies for stars, power law + soft break for galaxies),
 *    sky with a gradient, Poisson noise in electrons (EGAIN) plus read noise,
 *    a residual background left after the "survey's" sky subtraction,
 *    clipping at SATURATE (no bleeding), bad columns and NaN pixels.
 *
 * Determinism: every random number comes from Philox4x32-10 keyed by the seed
 * and a counter made of (what, source/frame id, pixel index, draw), never from a
 * sequential stream, and rendered light is accumulated in 64-bit fixed point
 * (integer sums do not depend on order). So the same config and seed give the
 * same bytes for any number of threads or MPI ranks.
 *
 * Coordinates: 0-based tile pixels, pixel (x, y) is data[y * nx + x] and has its
 * centre at integer (x, y) (see sp_fits.h). Angles theta are radians from +x
 * towards +y in the sp_sim structs and degrees (SExtractor convention, same
 * sense) in the CSV files. Fluxes are in the zp_ref = 25 system: flux 1 is AB
 * magnitude 25; a frame's raw ADU = flux * 10^(0.4 (ZP_AUTO - 25)).
 *
 * Thread safety: a created sp_sim is read-only and may be shared between
 * threads; sp_sim_ws is per thread. FFTW plans are made in threads: the first
 * sp_sim_ws_create installs process-wide FFTW planner hooks (a mutex), because
 * fftw_make_planner_thread_safe() does nothing in libfftw3_omp. Nothing here is MPI-collective;
 * sp_sim_write takes (rank, nranks) and splits bands between ranks.
 */
#ifndef SP_SIM_H
#define SP_SIM_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define SP_SIM_MAX_BANDS 64
#define SP_SIM_NAME_LEN 16
#define SP_SIM_ZP_REF 25.0

/* ---- configuration -------------------------------------------------------- */

/* The simulator's own settings (separate from the pipeline config). Every
 * field is a key of the simulator YAML with the same name (see
 * sp_sim_config_write or `surveyproc simulate --help`). */
typedef struct {
    char preset[SP_SIM_NAME_LEN]; /* tiny | demo | bench | big: the defaults the rest overrides */
    uint64_t seed;
    long nx, ny;                  /* tile size in pixels */
    int nbands;
    char band_names[SP_SIM_MAX_BANDS][SP_SIM_NAME_LEN]; /* "m<nm>"; all "" -> spread over m400..m875 */
    int frames_per_band;          /* frames per band, each with its own noise, ZP and sky */
    long n_stars, n_galaxies;     /* including cluster members */
    int n_bright;                 /* extra stars at star_bright_mag..+1.5 that saturate */
    double star_mag_min, star_mag_max, star_slope;   /* at 625 nm; dN/dm ~ 10^(slope m) */
    double star_bright_mag;
    double gal_mag_min, gal_mag_max, gal_slope;
    double dev_fraction;          /* share of galaxies that are DEV (rest EXP) */
    double re_median, re_max;     /* pixels: median Re at mag 18, largest Re */
    int n_clusters;               /* dense star clusters (Plummer spheres) */
    double cluster_fraction, cluster_radius;          /* share of stars in clusters; Plummer a (pix) */
    double pixscale;              /* arcsec / pixel */
    double ra0, dec0, rotation;   /* tile centre (deg), position angle of +y from north (deg) */
    double sip_amp;               /* SIP distortion at the tile corners (pixels); 0: plain TAN */
    double fwhm;                  /* core FWHM at 625 nm, tile centre (pixels) */
    double fwhm_var;              /* relative FWHM variation amplitude over the field */
    double beta;                  /* Moffat beta at the tile centre */
    double ell_max;               /* PSF ellipticity scale (1 - b/a) */
    double wing_frac, wing_fwhm_factor, wing_beta;    /* optional wide wing; wing_frac 0: none */
    double psf_radius;            /* PSF taper reaches 0 at this radius (pixels) */
    int oversample;               /* galaxy convolution grid (odd, >= 5) */
    double zp;                    /* ZP_AUTO at the most sensitive band */
    double sky_mag;               /* sky brightness at 400 nm (AB mag / arcsec^2); redder is brighter */
    double sky_gradient;          /* relative sky change from the tile centre to an edge */
    int sky_subtracted;           /* 1: frames are sky-subtracted, a residual remains; 0: sky kept */
    double bg_residual;           /* residual background amplitude in units of SKYSIG */
    double egain, read_noise, saturate, exptime; /* e-/ADU, e-, ADU, s */
    double frame_zp_jitter;       /* mag: ZP scatter between frames of a band */
    double zp_header_error;       /* mag: ZP_AUTO = true ZP + N(0, this), for calibration tests */
    int noise;                    /* 0: noise-free frames (tests) */
    int n_bad_columns;            /* per frame */
    double nan_fraction;          /* per frame, scattered NaN pixels */
    double flux_perturb;          /* input catalog: FLUX_b = true * exp(N(0, flux_perturb)) */
    double pos_perturb;           /* input catalog: position noise (pixels, per axis) */
    double shape_perturb;         /* input catalog: relative noise on Re, ELL, THETA */
    double type_blank_fraction;   /* input catalog: share of blank TYPE */
    double ref_mag_min, ref_mag_max, ref_mag_noise;   /* reference catalog selection and noise */
    int epsf_ngrid, ngrid;        /* written into DIR/config.yaml for the pipeline */
    int truth_psf_ngrid;          /* grid of true PSF stamps per band (0: epsf_ngrid) */
    int truth_psf_oversamp;       /* samples per image pixel of those stamps (0: 1) */
    int block_rows;               /* rows rendered per block (memory vs. overhead) */
} sp_sim_config;

/* Defaults of a preset ("tiny", "demo", "bench", "big"). SP_ERR_CONFIG for an
 * unknown name. */
int sp_sim_config_preset(const char *preset, sp_sim_config *c);

/* Read a simulator YAML file: a flat mapping of the keys above. The `preset`
 * key (or `preset_override` when non-NULL, as given by --preset) picks the
 * defaults, the other keys override them. `bands` is either a count or a list
 * of names like [m400, m525]. Errors: SP_ERR_IO, SP_ERR_CONFIG naming
 * "FILE:LINE: key: what is wrong". */
int sp_sim_config_load(const char *path, const char *preset_override, sp_sim_config *c);

/* Range and consistency checks. SP_ERR_CONFIG naming the key. */
int sp_sim_config_validate(const sp_sim_config *c);

/* Write the config as YAML (every key, commented); loading it gives the same
 * config exactly (doubles printed with 17 digits). */
int sp_sim_config_write(FILE *f, const sp_sim_config *c);

/* Print the keys with their meaning (for --help). */
void sp_sim_config_help(FILE *f);

/* ---- the model -------------------------------------------------------------- */

typedef enum { SP_SIM_STAR = 0, SP_SIM_EXP = 1, SP_SIM_DEV = 2 } sp_sim_type;

/* Truth flags (truth.csv `flags`). */
enum {
    SP_SIM_F_SATURATED = 1,   /* its peak may reach SATURATE in some frame */
    SP_SIM_F_BAD_PIXELS = 2,  /* a NaN pixel or bad column within max(2, FWHM) pix in some frame */
    SP_SIM_F_EDGE = 4,        /* within 3 FWHM of the tile edge */
    SP_SIM_F_CROWDED = 8,     /* a neighbour within 2 FWHM with >= 10% of its flux, or any within 1 FWHM */
    SP_SIM_F_CLUSTER = 16,    /* member of a dense cluster */
    SP_SIM_F_FORCED_BRIGHT = 32 /* one of the n_bright saturating stars */
};

/* PSF parameters at one place in one band (what sp_sim_render_psf needs). */
typedef struct {
    double fwhm;      /* core FWHM, geometric mean of major and minor axes (pixels) */
    double beta;      /* core Moffat beta (> 1) */
    double e;         /* core ellipticity 1 - b/a, [0, 0.9] */
    double theta;     /* core major-axis angle, radians from +x towards +y */
    double wing_frac; /* share of the flux in the wing (0: none) */
    double wing_fwhm; /* wing FWHM (pixels), circular */
    double wing_beta; /* wing Moffat beta (> 1) */
    double radius;    /* the profile is multiplied by a taper going from 1 at 0.7 radius to 0 at radius */
} sp_sim_psf;

/* Per band: name, wavelength and the smooth PSF-field coefficients. */
typedef struct {
    char name[SP_SIM_NAME_LEN];
    double lambda_nm;
    double zp;          /* band ZP (frames scatter around it by frame_zp_jitter) */
    double sky_mag;     /* sky AB mag / arcsec^2 */
    double fwhm0;       /* FWHM at the tile centre */
    double fw[5];       /* FWHM field terms: u, v, u^2+v^2, uv, u^2-v^2 (relative) */
    double beta0, bt[2];/* beta at the centre, u and v terms */
    double e1c[4], e2c[4]; /* ellipticity components: const, u, v, quadratic */
    double wing_frac, wing_fwhm_factor, wing_beta;
} sp_sim_band;

typedef struct {
    int band;           /* band index */
    int index;          /* frame index within the band */
    int id;             /* global frame id (RNG stream) */
    char file[64];      /* "images/<band>_<k>.fits", relative to the output folder */
    double zp, egain, read_noise, saturate, exptime; /* zp: the true zero point (ZP_TRUE) */
    double zp_header;   /* ZP_AUTO written in the header (= zp unless zp_header_error > 0) */
    double sky_adu;     /* mean true sky level (ADU) */
    double skysig;      /* sqrt(sky * egain + read_noise^2) / egain at the mean sky (ADU) */
    double sky_grad[2]; /* relative sky gradient per unit u, v */
    double resid[3];    /* residual background (ADU): const, u, v */
    int n_badcol;
    long *badcol;       /* n_badcol * 3: x, y0, y1 (inclusive) */
    long n_nan;
    long *nan_pix;      /* n_nan pixel indices y * nx + x, ascending */
} sp_sim_frame;

typedef struct {
    long id;            /* 1-based, as in the catalogs */
    sp_sim_type type;
    double x, y;        /* true position, tile pixels */
    double ra, dec;     /* degrees, through the WCS */
    double re, q, theta;/* galaxies: half-light semi-major axis (pix), axis ratio b/a, angle (rad) */
    unsigned flags;     /* SP_SIM_F_* */
    int cluster;        /* cluster index or -1 */
} sp_sim_source;

typedef struct sp_wcs sp_wcs;

typedef struct sp_sim {
    sp_sim_config cfg;
    int nbands, nframes;
    sp_sim_band band[SP_SIM_MAX_BANDS];
    sp_sim_frame *frame;    /* nframes, band-major */
    long nsrc;
    sp_sim_source *src;     /* nsrc, stars first then galaxies */
    double *flux;           /* nsrc * nbands true fluxes (zp_ref system), [i * nbands + b] */
    char *wcs_cards;        /* the WCS header cards (80-char, no END) */
    int wcs_ncards;
    sp_wcs *wcs;
    long lag;               /* largest stamp half-size of any source (rows) */
    long *order;            /* sources sorted by nearest row */
} sp_sim;

/* Build the model: bands, frames, WCS, sources, fluxes and truth flags.
 * Cheap (no pixels). Errors: SP_ERR_CONFIG, SP_ERR_NOMEM, SP_ERR_WCS. */
int sp_sim_create(const sp_sim_config *c, sp_sim **s);
void sp_sim_free(sp_sim **s); /* sets *s = NULL; safe on NULL */

/* Rebuild the model a simulation was made with, from its folder (reads
 * DIR/sim.yaml) or from a simulator YAML path. The PSF model is then exactly
 * the one used for the frames. */
int sp_sim_load(const char *dir_or_yaml, sp_sim **s);

/* True PSF parameters of `band` at tile pixel (x, y). Thread-safe. */
void sp_sim_psf_params(const sp_sim *s, int band, double x, double y, sp_sim_psf *p);

/* Continuous PSF surface density at offset (dx, dy) pixels from its centre,
 * before normalisation: integrate it (or use the renderers) for fractions. */
double sp_sim_psf_density(const sp_sim_psf *p, double dx, double dy);

/* Render the PSF integrated over grid cells of 1/os image pixels.
 * Given: p; (dx, dy) the PSF centre's offset in image pixels from the centre
 * of the stamp's central cell c = (size-1)/2; size (odd or even, >= 1); os >= 1.
 * Returned: out[size*size] (row-major, y rows) = fraction of a unit flux falling
 * in each cell. The normalisation is taken over the whole tapered profile, so
 * a stamp covering it (size/os >= 2 radius + 2) sums to 1 to rounding and a
 * smaller one sums to its enclosed fraction. os = 1 gives what a star of unit
 * flux looks like. SP_ERR_INPUT on bad arguments, SP_ERR_NOMEM. Thread-safe. */
int sp_sim_render_psf(const sp_sim_psf *p, double dx, double dy, int size, int os, double *out);

/* The effective PSF (Anderson & King; the sp_psf.h convention): out[j*size+i]
 * = fraction of a unit flux falling in an image pixel centred at offset
 * ((i-c)/os, (j-c)/os) from the source, c = (size-1)/2; sums to os^2 over a
 * covering stamp. Directly comparable to a built sp_psf. Thread-safe. */
int sp_sim_render_epsf(const sp_sim_psf *p, int size, int os, double *out);

/* Galaxy surface brightness profile (unnormalised) at elliptical radius
 * r_ell / Re = x: EXP exp(-b1 (x - 1)) tapered to 0 between 3 and 4 Re, DEV
 * exp(-b4 (x^1/4 - 1)) tapered between 7 and 8 Re (SDSS convention). STAR: 0. */
double sp_sim_galaxy_profile(sp_sim_type type, double x);
/* Outer truncation radius in units of Re (4 for EXP, 8 for DEV). */
double sp_sim_galaxy_rmax(sp_sim_type type);

/* Per-thread scratch for galaxy rendering (FFTW buffers and plans). */
typedef struct sp_sim_ws sp_sim_ws;
int sp_sim_ws_create(sp_sim_ws **ws);
void sp_sim_ws_free(sp_sim_ws **ws);

/* Stamp half-size (image pixels) a galaxy of this type and Re needs with a
 * PSF of this radius: the stamp is (2h+1)^2 centred on the nearest pixel. */
long sp_sim_galaxy_halfsize(sp_sim_type type, double re, double psf_radius);

/* Render a unit-flux galaxy (type, Re pixels, axis ratio q, angle theta
 * radians) convolved with PSF p into out[size*size] image pixels, the galaxy
 * centre at (dx, dy) from the stamp's central pixel. The galaxy and the PSF are
 * sampled on an os-times finer grid (os odd >= 3; 5 is the simulator's),
 * convolved by FFT (zero-padded, no wrap-around), and binned, so the result
 * sums to 1 over a stamp of size 2 * sp_sim_galaxy_halfsize + 1.
 * SP_ERR_INPUT, SP_ERR_NOMEM. Thread-safe with one ws per thread. */
int sp_sim_render_galaxy(const sp_sim_psf *p, sp_sim_type type, double re, double q, double theta, double dx,
                         double dy, int size, int os, double *out, sp_sim_ws *ws);

/* ---- writing -------------------------------------------------------------- */

typedef struct {
    double seconds;         /* wall time of sp_sim_write on this rank */
    double render_seconds;  /* sources into the accumulators */
    double noise_seconds;   /* noise, defects, conversion */
    double io_seconds;      /* sp_fits writes and catalogs */
    double mpix;            /* megapixels of frames written by this rank */
    double mbytes;          /* MB of frame data written by this rank */
    long nframes;           /* frames written by this rank */
} sp_sim_stats;

/* Write the simulation into folder `dir` (created if missing):
 *   images/<band>_<k>.fits, image_list.txt, input_catalog.csv,
 *   reference_catalog.csv, truth.csv, truth_psf/<band>.fits, truth_psf.yaml,
 *   sim.yaml (the resolved simulator config: sp_sim_load reads it back),
 *   config.yaml (pipeline config; outputs under DIR/work).
 * Frames stream per band per block of rows: memory is O(nx * (block_rows +
 * 2 lag)) per band, never a whole frame. Bands are split between ranks
 * (band b on rank b % nranks); rank 0 writes every other file. Each call is
 * independent (no MPI inside); the caller synchronises. OpenMP threads are used
 * inside. Errors: SP_ERR_IO (folder, disk), SP_ERR_FITS, SP_ERR_NOMEM. */
int sp_sim_write(const sp_sim *s, const char *dir, int rank, int nranks, sp_sim_stats *st);

/* ---- random numbers (exposed for tests and the scorer) ------------------- */

/* Philox4x32-10 (Salmon et al. 2011): ctr in, out = 4 random 32-bit words. */
void sp_sim_philox(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]);

#endif

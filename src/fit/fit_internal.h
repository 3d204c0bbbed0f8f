/* fit_internal.h — private pieces of the fitting engine (src/fit/): galaxy
 * mixture profiles, the Gaussian-mixture fit of an ePSF, the per-PSF cache,
 * source rendering and the FFT plan table. Not installed. */
#ifndef SP_FIT_INTERNAL_H
#define SP_FIT_INTERNAL_H

#include "surveyproc/sp_fit.h"

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* exp(y) for y in [-40, 0] (no clamp, so the loops vectorise): y = n ln2 + r, |r| <= ln2/2, degree-11 Taylor
 * polynomial (relative error < 2e-15 over the range), 2^n from the exponent
 * bits. Branch-free, so the row loops below vectorise. */
static inline double fit_exp_neg(double y) /* callers guarantee y >= -40 */
{
    const double l2e = 1.4426950408889634, ln2hi = 6.93147180369123816490e-01, ln2lo = 1.90821492927058770002e-10;
    const double shifter = 6755399441055744.0; /* 1.5 * 2^52: t's low mantissa bits hold round(y l2e) */
    double t = y * l2e + shifter;
    double n = t - shifter;
    double r = (y - n * ln2hi) - n * ln2lo;
    double p = 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    uint64_t ti, si;
    memcpy(&ti, &t, sizeof ti);
    si = (ti + 1023u) << 52;
    double sc;
    memcpy(&sc, &si, sizeof sc);
    return p * sc;
}

/* ---- galaxy profiles (fit_profiles.c) ---------------------------------- */

#define GMIX_MAXK 10 /* components of a galaxy profile (Sersic: up to 8 + core) */

/* Circular unit profile: sum_k amp[k] N(0, var[k] * re^2 I); sum amp = 1.
 * damp/dvar: derivatives with respect to the Sersic index (0 for EXP/DEV). */
typedef struct {
    int k;
    double amp[GMIX_MAXK], var[GMIX_MAXK];
    double damp[GMIX_MAXK], dvar[GMIX_MAXK];
} gal_profile;

/* Profile of a type (SERSIC uses n, clamped to the table range 0.5..6.3; set: the
 * EXP/DEV mixtures, SP_FIT_PROF_*). */
void fit_gal_profile(sp_src_type type, double n, int set, gal_profile *p);

/* Shape parametrisation: (ln s, eta1, eta2) with s the circularised radius
 * sqrt(a b) and Sigma0 = s^2 expm(eta1 sigma3 + eta2 sigma1) — smooth through
 * the round shape (unlike e = (1-q)/(1+q), whose modulus has a cone at 0).
 * q = exp(-|eta|), theta = atan2(eta2, eta1) / 2, Re (major axis) = s exp(|eta|/2).
 * S = (Sxx, Sxy, Syy) in px^2; dS[p][c]: derivative of component c with
 * respect to parameter p (ln s, eta1, eta2). */
void fit_shape_matrix(double lns, double eta1, double eta2, double S[3], double dS[3][3]);
void fit_shape_to_eta(double re, double q, double theta, double *lns, double *eta1, double *eta2);
void fit_eta_to_shape(double lns, double eta1, double eta2, double *re, double *q, double *theta);

/* ---- PSF mixture and per-PSF cache (fit_psfmix.c) ---------------------- */

#define PSFMIX_MAXK 6

typedef struct {
    int k;
    double amp[PSFMIX_MAXK];
    double mx[PSFMIX_MAXK], my[PSFMIX_MAXK];         /* offsets from the ePSF centre, image px */
    double cxx[PSFMIX_MAXK], cxy[PSFMIX_MAXK], cyy[PSFMIX_MAXK]; /* covariances, image px^2 */
    double rms_resid;                                 /* rms residual of the fit / peak */
} psf_mix;

/* Fit a K-Gaussian mixture to the ePSF samples (variable projection on the
 * amplitudes, LM on means and Cholesky factors). Thread-safe; uses `scratch`
 * (grown as needed; caller frees). */
int fit_psf_mixture(const sp_psf *psf, int k, psf_mix *out, double **scratch, size_t *scratch_cap);

/* Cached facts about one PSF (per workspace). */
typedef struct {
    const sp_psf *psf;
    uint64_t hash;
    int have_mix;
    psf_mix mix;
    int nprof;
    double *prof;     /* prof[r]: max ePSF value at radius >= r px (r = 0..nprof-1) */
    double fwhm;      /* from sp_psf_moments */
    double half;      /* stamp half-size in image px */
    /* FFT route: spectrum of the stamp at one transform size n (0 = none) */
    int fft_n;
    void *fft_spec;   /* fftw_complex[L*L], L = n*oversamp, full (not half) spectrum */
    unsigned char *fft_keep; /* L*L: 1 where |spectrum| is not negligible */
    long last_use;
} psf_cache_entry;

uint64_t fit_psf_hash(const sp_psf *psf);

/* ---- rendering (fit_render.c) ------------------------------------------ */

typedef struct {
    int bx0, by0, bw, bh; /* box in image pixels, clipped to the ROI; bw == 0: none */
} fit_box;

/* Geometry parameters of a source: p = (x, y, ln s, eta1, eta2, n). */
enum { P_X = 0, P_Y = 1, P_LNS = 2, P_E1 = 3, P_E2 = 4, P_N = 5, P_MAX = 6 };

typedef struct {
    sp_src_type type;
    double p[P_MAX];
    gal_profile prof; /* profile at p[P_N] (galaxies) */
} fit_geom;

/* Per-thread scratch for the FFT route. */
typedef struct {
    void *spec;       /* fftw_complex[n*(n/2+1)] x P_MAX+1 */
    double *real;     /* n*n x (P_MAX+1) */
    size_t cap_spec, cap_real;
} fit_fft_scratch;

/* Render the unit-flux model of a source (times img->flux_scale) into m[bw*bh]
 * over box b of image img, and d m / d p[j] into dm[j] for every non-NULL
 * dm[j] (j < P_MAX). The position derivatives dm[P_X], dm[P_Y] must be
 * requested together (a general affine transform mixes them). conv: SP_FIT_CONV_*. Returns SP_OK, or SP_ERR_* for the
 * FFT route when it cannot run (no plan / no memory). */
int fit_render(const sp_fit_image *img, psf_cache_entry *pc, int conv, const fit_geom *g, const fit_box *b,
               double *m, double *const dm[P_MAX], fit_fft_scratch *fs);

/* ---- FFT plans and PSF spectra (fit_fft.c) ------------------------------ */

int fit_fft_inited(void);
int fit_fft_size_for(int need); /* smallest planned transform size >= need; 0 if none */
/* Make (once) the spectrum of pc->psf for transform size n (cached in pc). */
int fit_fft_psf_spectrum(psf_cache_entry *pc, int n);
void fit_fft_free_entry(psf_cache_entry *pc);
int fit_render_gal_fft(const sp_fit_image *img, psf_cache_entry *pc, const fit_geom *g, const fit_box *b,
                       double *m, double *const dm[P_MAX], fit_fft_scratch *fs);
void fit_fft_scratch_free(fit_fft_scratch *fs);

#endif

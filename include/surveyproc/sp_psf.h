/* sp_psf.h — the PSF as the rest of surveyproc sees it: an oversampled,
 * pixel-convolved ("effective", Anderson & King 2000) PSF stamp, plus the
 * analytic Moffat fallback and the blending of neighbouring cell ePSFs.
 *
 * Convention: `data` samples the effective PSF — the fraction of a unit-flux
 * source's light that falls in an image pixel whose centre is at offset
 * (dx, dy) pixels from the source — at dx = (i - c) / oversamp,
 * dy = (j - c) / oversamp, c = (size - 1) / 2, i, j in [0, size). Hence
 * sum(data) / oversamp^2 == 1 for a normalised PSF, and sp_psf_eval at integer
 * offsets summed over a large stamp == 1.
 *
 * Thread safety: a built sp_psf is read-only and may be shared by threads.
 */
#ifndef SP_PSF_H
#define SP_PSF_H

typedef struct {
    int size;        /* side of the oversampled stamp (odd) */
    int oversamp;    /* samples per image pixel (1..8) */
    float *data;     /* size*size, row-major (j * size + i), y rows */
    double fwhm;     /* FWHM estimate in image pixels */
    int nstars;      /* stars used to build it (0 for analytic) */
    int is_fallback; /* 1 if analytic Moffat fallback */
} sp_psf;

/* Allocate a zeroed PSF. SP_ERR_INPUT if size is even or < 3, oversamp out of 1..8. */
int sp_psf_alloc(int size, int oversamp, sp_psf **psf);
void sp_psf_free(sp_psf **psf);
int sp_psf_copy(const sp_psf *src, sp_psf **dst);

/* Scale so the PSF has unit flux (sum(data)/oversamp^2 == 1). SP_ERR_NUMERIC if the sum is <= 0 or not finite. */
int sp_psf_normalize(sp_psf *psf);

/* Value of the effective PSF at offset (dx, dy) image pixels (interpolated);
 * 0 outside the stamp. */
double sp_psf_eval(const sp_psf *psf, double dx, double dy);

/* Render a unit-flux source centred at (xc, yc) (coordinates in the same frame as
 * the output grid: pixel (i, j) of out has centre (i, j)) into out[ny*nx], with
 * optional derivatives d/dxc and d/dyc (NULL to skip). Pixels beyond the stamp
 * are zero. Thread-safe, no allocation. */
void sp_psf_render(const sp_psf *psf, double xc, double yc, int nx, int ny, double *out, double *dout_dx,
                   double *dout_dy);

/* Analytic elliptical Moffat I(r) ∝ (1 + (r/alpha)^2)^-beta, integrated over
 * pixels (sub-sampled), with FWHM along the major axis, axis ratio q (minor/major,
 * 0<q<=1) and position angle theta (radians, from +x towards +y). Normalised. */
int sp_psf_moffat(double fwhm, double beta, double q, double theta, int size, int oversamp, sp_psf **psf);
/* The same Moffat rendered into an allocated psf (its size and oversampling);
 * no allocation. Returns SP_OK, SP_ERR_INPUT. */
int sp_psf_moffat_into(double fwhm, double beta, double q, double theta, sp_psf *psf);

/* Analytic elliptical Moffat (parameters as sp_psf_moffat, normalised to unit
 * flux over the infinite plane) integrated over the image pixel whose centre is
 * at offset (dx, dy) from the source (8x8 Gauss-Legendre; ~1e-9 relative for
 * FWHM >= 1.5 px). The reference that the interpolation error is measured
 * against, and a truth generator for tests. Returns SP_ERR_INPUT on bad
 * parameters. Thread-safe. */
int sp_psf_moffat_pixel(double fwhm, double beta, double q, double theta, double dx, double dy, double *val);

/* Weighted blend of n PSFs of identical geometry (bilinear interpolation
 * between cell ePSFs): out = sum w_k psf_k, normalised. */
int sp_psf_blend(const sp_psf *const *psfs, const double *w, int n, sp_psf *out);

/* Flux-weighted centroid (image pixels, relative to the stamp centre) and a FWHM
 * estimate from the half-maximum area. */
void sp_psf_moments(const sp_psf *psf, double *cx, double *cy, double *fwhm);

#endif

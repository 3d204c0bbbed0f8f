/* sp_prep.h — per-cell image preparation: frame scaling to zp_ref, bad and
 * saturation masks, the noise model, per-band inverse-variance coadd and the
 * white stack (DESIGN §2, issue 4).
 *
 * All arrays are ROI-sized (npix = nx*ny), row-major. Data are in scaled units
 * (flux 1 == magnitude zp_ref). Masked pixels have ivar == 0 (data set to 0 so
 * they never poison sums).
 *
 * Threading: the functions take `nthreads` and split rows over OpenMP threads
 * (nthreads <= 1: serial). Results are bit-identical for any thread count:
 * every output pixel depends only on its own inputs.
 */
#ifndef SP_PREP_H
#define SP_PREP_H

#include <stddef.h>
#include <stdint.h>

enum { SP_PIX_BAD = 1, SP_PIX_SAT = 2, SP_PIX_OUTSIDE = 4 };

typedef struct {
    double scale;      /* 10^(-0.4 (ZP_AUTO - zp_ref)) */
    double skysig;     /* SKYSIG, ADU */
    double egain;      /* EGAIN, e-/ADU (<= 0: no source Poisson term) */
    double saturate;   /* SATURATE, ADU (<= 0 or NaN: none) */
    double sat_level_frac; /* mask raw >= sat_level_frac * saturate */
} sp_prep_params;

/* Scale a raw ROI and build its mask. raw may contain NaN (outside the frame or
 * blank) -> BAD (OUTSIDE if it came from outside the frame is not known here).
 * Given raw[npix]; returns data[npix] (scaled, 0 where masked) and mask[npix]
 * (OR of SP_PIX_*). Also returns a robust sky estimate of the raw ROI in ADU
 * (sigma-clipped median of good pixels; NaN if none), used for the Poisson term
 * until the background mesh replaces it. */
int sp_prep_frame(const float *raw, size_t npix, const sp_prep_params *p, float *data, uint8_t *mask,
                  double *sky_raw, int nthreads);

/* Inverse variance from the noise model, in scaled units:
 *   var = (SKYSIG^2 + max(raw - sky_raw, 0) / EGAIN) * scale^2,  raw = data/scale
 * with `bkg` (scaled background image, may be NULL -> use sky_raw*scale).
 * ivar = 0 where mask != 0. */
int sp_prep_ivar(const float *data, const uint8_t *mask, size_t npix, const sp_prep_params *p, double sky_raw,
                 const float *bkg, float *ivar, int nthreads);

/* Inverse-variance coadd of nf aligned frames of one band. Weights use the sky
 * noise only (w_i = 1/(skysig_i scale_i)^2, so bright sources are not biased by
 * data-dependent weights); the coadd's ivar is propagated from each frame's full
 * noise model: var = sum w_i^2 var_i / (sum w_i)^2 over frames good at the pixel.
 * Given data[k], ivar[k], mask[k], wsky[k] for k < nf. Returns out_data, out_ivar
 * (0 where no frame is good) and out_mask (AND of BAD over frames: a pixel is bad
 * only if bad everywhere; SAT is OR-ed). */
int sp_prep_coadd(int nf, const float *const *data, const float *const *ivar, const uint8_t *const *mask,
                  const double *wsky, size_t npix, float *out_data, float *out_ivar, uint8_t *out_mask,
                  int nthreads);

/* White stack: inverse-variance weighted mean over nb bands per pixel (row
 * chunks over threads). out_ivar = sum of ivars. */
int sp_prep_white(int nb, const float *const *data, const float *const *ivar, size_t nx, size_t ny,
                  float *out, float *out_ivar, int nthreads);

#endif

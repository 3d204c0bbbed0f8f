/* sp_background.h — sky background and background RMS of a cell image
 * (SExtractor-style mesh; issue 5).
 *
 * Method. The image is cut into a mesh of nbx x nby boxes of about `boxsize`
 * pixels (box edges at floor(k nx / nbx), so every box has nearly the same
 * size and none is a thin sliver). In each box the good pixels are
 * sigma-clipped around their median (clip_sigma, clip_iters) and the box value
 * is the SExtractor mode 2.5 median - 1.5 mean, or the median when the
 * distribution is skewed (|mean - median| > 0.3 sigma: crowded box); the box
 * RMS is the clipped standard deviation (corrected for the truncation of a
 * Gaussian at clip_sigma). Sources are masked in a second pass: pixels whose
 * 3x3 mean exceeds back + mask_sigma * rms / 3 of the first-pass mesh (taken
 * on every other pixel and row) are masked, the mask is dilated by a
 * (2 mask_dilate + 1)^2 square, and the box statistics are recomputed without
 * them (if that leaves no usable box, the pass-1 mesh is kept). Boxes with fewer than
 * min_valid_frac of their pixels usable are "missing" and filled from their
 * neighbours. A filtersize x filtersize median filter runs over the mesh, and
 * natural bicubic splines through the box centres (along y per mesh column,
 * then along x per image row) give the full-resolution maps.
 *
 * Pixels. A pixel is unusable when it is not finite, when ivar is given and
 * ivar <= 0 (or not finite), or when mask is given and mask != 0 (any
 * SP_PIX_* bit of sp_prep.h). Unusable pixels are never read as data.
 *
 * Thread safety: no globals; every function is reentrant. A built sp_bkg is
 * read-only and may be shared by threads. Not MPI-collective.
 */
#ifndef SP_BACKGROUND_H
#define SP_BACKGROUND_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    int boxsize;           /* box side in pixels (epsf.background_boxsize); default 64 */
    int filtersize;        /* median filter over boxes, odd (1 = none); default 3 */
    double mask_sigma;     /* source mask threshold in RMS units (<= 0: one pass, no
                            * source mask); default 3.0 */
    int mask_dilate;       /* dilation half-width of the source mask in pixels (0..32); default 2 */
    double clip_sigma;     /* sigma clipping in each box; default 3.0 */
    int clip_iters;        /* clipping iterations; default 5 */
    double min_valid_frac; /* a box with fewer usable pixels than this fraction is
                            * missing and filled from its neighbours; default 0.5 */
} sp_bkg_params;

/* The background mesh (plain data; read it freely). */
typedef struct {
    int nx, ny;            /* image size */
    int nbx, nby;          /* mesh size */
    int *xedge, *yedge;    /* box edges: box i spans [xedge[i], xedge[i+1]) (nbx+1, nby+1) */
    double *cx, *cy;       /* box centres in pixel coordinates (nbx, nby) */
    float *back, *rms;     /* final (filled, median-filtered) mesh values, nby*nbx row-major */
    uint8_t *missing;      /* 1 where the box was missing before filling (nby*nbx) */
    int nmissing;          /* boxes filled from neighbours */
    double global_back;    /* median of the mesh background */
    double global_rms;     /* median of the mesh RMS */
    size_t ngood;          /* usable pixels in the image */
    size_t nsource_masked; /* usable pixels masked as source in pass 2 */
    int empty;             /* 1 if the image had no usable pixel (maps are 0) */
} sp_bkg;

/* k-th smallest of v[0..n) (n >= 1, k < n), moved to v[k] with smaller values before it and larger
 * after (quickselect, median-of-three pivot; reorders v). Values must be comparable (no NaN). */
float sp_select_k(float *v, size_t n, size_t k);

/* v[0..n) sorted ascending by a 3-pass LSD radix sort of order-preserving integer keys
 * (11 + 11 + 10 bits; no NaN); k0 and k1 hold n keys each (scratch). Used where the order
 * statistics of one sample are read many times (sky subsamples, aperture annuli). */
void sp_sort_f32(float *v, uint32_t *k0, uint32_t *k1, size_t n);

/* Defaults listed in sp_bkg_params. */
void sp_bkg_params_default(sp_bkg_params *p);

/* Estimate the background mesh of an image.
 * Given: img[ny*nx] row-major; ivar (may be NULL); mask (may be NULL);
 *        nx, ny >= 1; p (NULL -> defaults).
 * Returned: *bkg, allocated (free with sp_bkg_free).
 * Returns SP_OK; SP_ERR_INPUT for bad sizes or parameters (boxsize < 4,
 * filtersize even, clip_sigma <= 0, min_valid_frac outside [0, 1]);
 * SP_ERR_NOMEM. An image with no usable pixel is not an error: the result has
 * empty = 1 and zero maps. Uses O(nx*ny) bytes of scratch (the source mask). */
int sp_bkg_estimate(const float *img, const float *ivar, const uint8_t *mask, int nx, int ny,
                    const sp_bkg_params *p, sp_bkg **bkg);

/* Full-resolution maps by bicubic-spline interpolation of the mesh.
 * Returned: back[ny*nx] and/or rms[ny*nx] (either may be NULL). rms >= 0.
 * Returns SP_OK or SP_ERR_NOMEM (row scratch). */
int sp_bkg_map(const sp_bkg *bkg, float *back, float *rms);

/* Subtract the interpolated background in place: img -= back for every pixel
 * (unusable pixels are changed too, which is harmless: they stay unusable
 * through mask/ivar; NaN stays NaN). Returns SP_OK or SP_ERR_NOMEM. */
int sp_bkg_subtract(const sp_bkg *bkg, float *img);

/* Background and RMS at one position (same spline as sp_bkg_map; slower per
 * pixel, for spot checks). rms may be NULL. */
double sp_bkg_eval(const sp_bkg *bkg, double x, double y, double *rms);

void sp_bkg_free(sp_bkg **bkg);

/* Sigma-clipped statistics of a sample (used per box, and by the PSF-star
 * selection for annulus backgrounds). Clips around the median at clip_sigma
 * times the clipped standard deviation for up to `iters` iterations.
 * Given: v[n] (finite values; reordered in place), clip_sigma > 0.
 * Returned (any may be NULL): mode (SExtractor 2.5 med - 1.5 mean, or med when
 * |mean - med| > 0.3 sigma), median, sigma (clipped standard deviation), and
 * the number of values kept. Returns SP_OK, or SP_ERR_INPUT when n == 0 (then
 * outputs are NaN / 0). Exact median (quickselect), O(n) per iteration. */
int sp_bkg_clipped_stats(float *v, size_t n, double clip_sigma, int iters, double *mode, double *median,
                         double *sigma, size_t *nkept);

#endif

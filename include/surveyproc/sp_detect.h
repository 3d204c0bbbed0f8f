/* sp_detect.h — source detection and measurement on a background-subtracted
 * cell image (issue 5).
 *
 * Method. The image (unusable pixels set to 0) is convolved with a matched
 * filter: the PSF sampled at whole-pixel offsets (an sp_psf, cropped to radius
 * ~1.5 FWHM) or a Gaussian of the given FWHM (separable), normalised to unit
 * sum. A pixel is above threshold when filtered / (rms sqrt(sum K^2)) >
 * thresh_sigma, i.e. in units of the filtered noise (rms: the per-pixel noise
 * map, e.g. the background RMS map). Above-threshold pixels are grouped into
 * 8-connected components; components with fewer than minarea pixels are
 * dropped. With deblending on, a component is flooded from its highest
 * filtered pixel down (watershed): two basins that meet stay separate objects
 * when each rises above the saddle by at least deblend_nsigma filtered-noise
 * units and by deblend_contrast of its own peak; otherwise the lesser is
 * merged into the greater. The flooding runs on the detection image, or (deblend_fwhm_frac
 * < 1) on the image filtered with a narrower Gaussian, in its own noise units.
 *
 * Measurements (on the unfiltered image): isophotal flux and error, peak,
 * windowed centroid (SExtractor XWIN-like: Gaussian window of the filter's
 * sigma, iterated), window-weighted second moments corrected for the window
 * (adaptive-moment style) -> a, b, theta and roundness q = b/a (isophotal
 * moments when the correction is not defined), and SNR = the matched-filter
 * peak in noise units (the optimal PSF-flux SNR when the filter is the PSF).
 *
 * Pixels. Unusable = not finite, or mask != 0 (any SP_PIX_* bit of
 * sp_prep.h); `sat_bits` of the mask mark saturation.
 *
 * Thread safety: no globals; reentrant; safe to run on different images from
 * different threads. Not MPI-collective.
 */
#ifndef SP_DETECT_H
#define SP_DETECT_H

#include "surveyproc/sp_psf.h"

#include <stdint.h>

/* Source flags (OR-ed). */
enum {
    SP_DET_EDGE = 1,      /* the object or its centroid window touches the image border */
    SP_DET_SAT = 2,       /* a saturated pixel (mask & sat_bits) in or next to the object */
    SP_DET_MASKED = 4,    /* an unusable pixel in or next to the object / inside the window core */
    SP_DET_BLENDED = 8,   /* split from a component by the deblender */
    SP_DET_WINFAIL = 16,  /* windowed centroid did not converge: barycentre used */
    SP_DET_MOMFAIL = 32   /* windowed moments undefined: isophotal a, b, theta used */
};

typedef struct {
    double thresh_sigma;     /* detection threshold, filtered-noise units; default 5 */
    int minarea;             /* minimum pixels above threshold; default 5 */
    double fwhm;             /* Gaussian filter FWHM (pixels) when no PSF is given;
                              * also the window size when > 0; default 3 */
    int deblend;             /* 1: split touching peaks; default 1 */
    double deblend_nsigma;   /* a peak must rise this far above the saddle (filtered
                              * noise units); default 3 */
    double deblend_contrast; /* ... and by this fraction of its own peak; default 0.1 */
    double deblend_fwhm_frac;/* the deblender floods an image filtered with a Gaussian of this
                              * fraction of the detection filter's FWHM (a matched filter blurs
                              * close pairs into one peak); 1 (or <= 0): the detection image
                              * itself; default 0.6 */
    uint8_t sat_bits;        /* mask bits meaning saturated; default SP_PIX_SAT (2) */
    int max_sources;         /* stop after this many (0: no limit); default 0 */
} sp_detect_params;

typedef struct {
    double x, y;          /* windowed centroid (pixel centres at integers) */
    double xbar, ybar;    /* isophotal barycentre */
    int xpeak, ypeak;     /* brightest filtered pixel */
    int xmin, xmax, ymin, ymax; /* bounding box */
    int npix;             /* pixels above threshold */
    double flux, flux_err;/* isophotal flux (sum over the object's pixels) and error */
    double peak;          /* highest unfiltered pixel value */
    double snr;           /* matched-filter peak / filtered noise */
    double a, b, theta;   /* RMS extent along major/minor axes (pixels); theta radians from +x */
    double q;             /* b / a */
    int flags;            /* SP_DET_* */
} sp_source;

void sp_detect_params_default(sp_detect_params *p);

/* Detect and measure sources.
 * Given: img[ny*nx] background-subtracted; rms[ny*nx] per-pixel noise (NULL:
 *        one global robust sigma estimated from the image); mask (NULL: none);
 *        psf (NULL: Gaussian of p->fwhm); p (NULL: defaults).
 * Returned: *src (malloc'd array, caller frees; NULL when none) and *nsrc,
 *        sorted by decreasing flux.
 * Returns SP_OK, SP_ERR_INPUT (bad sizes/parameters), SP_ERR_NOMEM.
 * Scratch: ~16 bytes per pixel. */
int sp_detect(const float *img, const float *rms, const uint8_t *mask, int nx, int ny, const sp_psf *psf,
              const sp_detect_params *p, sp_source **src, int *nsrc);

/* Measure one source at a given position (forced; for reference-catalog
 * positions and per-band re-measurement of detections): windowed centroid
 * starting at (x, y), window-corrected moments (a, b, theta, q), peak within
 * the window core, SNR of the Gaussian-window matched flux
 * (sum w I / sqrt(sum w^2 rms^2), w the window), flux = that matched flux
 * scaled to a total for a Gaussian source of the window's size, flags (EDGE,
 * SAT, MASKED within 2 window sigmas). fwhm: window FWHM (> 0).
 * rms may be NULL (then `noise` is used for every pixel). npix, bbox and
 * isophotal fields are set to the window's footprint.
 * Returns SP_OK or SP_ERR_INPUT (fwhm <= 0, position outside the image). */
int sp_detect_measure(const float *img, const float *rms, double noise, const uint8_t *mask, int nx, int ny,
                      double x, double y, double fwhm, uint8_t sat_bits, sp_source *out);

#endif

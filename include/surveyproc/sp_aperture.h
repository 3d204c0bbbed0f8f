/* sp_aperture.h — forced circular-aperture photometry at given positions, with
 * a local annulus background. The fitter uses it for initial fluxes where the
 * catalog has none, and the store keeps it as a product of its own.
 *
 * Pixel overlap is the exact area of the circle inside each pixel, so the
 * aperture area equals pi r^2 to rounding. Masked pixels (ivar == 0)
 * inside the aperture are replaced by the annulus background and counted.
 * Thread-safe; no allocation.
 */
#ifndef SP_APERTURE_H
#define SP_APERTURE_H

#include <stddef.h>

enum {
    SP_APER_EDGE = 1,     /* aperture extends beyond the image */
    SP_APER_MASKED = 2,   /* >= 1 masked pixel inside the aperture */
    SP_APER_NOBKG = 4,    /* annulus had too few good pixels: background 0 */
    SP_APER_ALLMASKED = 8 /* no good pixel in the aperture: flux NaN */
};

typedef struct {
    double flux, fluxerr;   /* background-subtracted flux and 1-sigma error */
    double bkg;             /* annulus background per pixel (sigma-clipped median) */
    double area;            /* aperture area in pixels */
    double masked_frac;     /* fraction of the aperture area that was masked */
    int flags;              /* SP_APER_* */
} sp_aper_result;

/* Measure at (xc, yc) in the image's own pixel frame (pixel centres at integers).
 * r: aperture radius, [r_in, r_out): annulus (r_in <= r_out; r_out <= 0 -> no
 * background subtraction). `scratch` must hold sp_aper_scratch_size(r_out) floats
 * (the annulus values and the keys of their sort). */
void sp_aper_measure(const float *data, const float *ivar, long nx, long ny, double xc, double yc, double r,
                     double r_in, double r_out, float *scratch, sp_aper_result *res);

size_t sp_aper_scratch_size(double r_out);

/* As sp_aper_measure, but masked pixels (ivar == 0, or outside the image) inside
 * the aperture take the mean of (data - background) of the good pixels at the
 * same distance from the centre (rings 1 pixel wide; r / 256 beyond r = 256)
 * instead of the background: the right sum for a round profile part of which is
 * masked (a star's residual light with its neighbours masked out). The error
 * follows (each good pixel stands for its ring's share). SP_APER_MASKED is set
 * only when some ring has less than min_cover of its area good (a ring with no
 * good pixel adds nothing); masked_frac is the masked share of the area.
 * Scratch as sp_aper_measure. Thread-safe; no allocation. */
void sp_aper_measure_fill(const float *data, const float *ivar, long nx, long ny, double xc, double yc, double r,
                          double r_in, double r_out, double min_cover, float *scratch, sp_aper_result *res);

#endif

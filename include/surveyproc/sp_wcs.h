/* sp_wcs.h — celestial WCS through wcslib: FITS header -> wcsprm, pixel <-> sky,
 * and the local affine linearisation used by the fitter's per-image transforms.
 *
 * Pixel coordinates are 0-based (see sp_fits.h): FITS pixel p = our x + 1.
 * Sky coordinates are degrees (RA, Dec) in the header's celestial frame.
 *
 * Thread safety: a wcsprm is not safe to share between threads; use
 * sp_wcs_copy() to give each thread its own.
 */
#ifndef SP_WCS_H
#define SP_WCS_H

#include "surveyproc/sp_fits.h"

typedef struct sp_wcs sp_wcs;

/* Local affine map around (x0, y0):  (ra, dec) ~ (ra0, dec0) + J * (x - x0, y - y0)
 * with J in degrees of (RA * cos(dec0), Dec) per pixel; Jinv its inverse. */
typedef struct {
    double x0, y0, ra0, dec0;
    double J[2][2];
    double Jinv[2][2];
} sp_affine;

/* Parse the first celestial WCS of a header string (80-char cards, nkeys).
 * `what` names the source in messages ("FILE[HDU 1]"). SP_ERR_WCS if there is
 * no celestial WCS or wcslib rejects it. */
int sp_wcs_from_header(const char *hdr, int nkeys, const char *what, sp_wcs **w);
int sp_wcs_from_fits(sp_fits *f, sp_wcs **w);
int sp_wcs_copy(const sp_wcs *src, sp_wcs **dst);
void sp_wcs_free(sp_wcs **w);

/* n points; arrays may not alias. Points that fail (outside the projection)
 * get NaN and the call still returns SP_OK; *nbad (may be NULL) counts them. */
int sp_wcs_pix2sky(sp_wcs *w, long n, const double *x, const double *y, double *ra, double *dec, long *nbad);
int sp_wcs_sky2pix(sp_wcs *w, long n, const double *ra, const double *dec, double *x, double *y, long *nbad);

/* Linearise at pixel (x0, y0) by central differences of +-0.5 pixel. */
int sp_wcs_local_affine(sp_wcs *w, double x0, double y0, sp_affine *a);

/* Pixel scale (arcsec/pixel, sqrt|det J|) at pixel (x, y). */
int sp_wcs_pixscale(sp_wcs *w, double x, double y, double *arcsec);

/* Largest separation in pixels between where w1 and w2 put the same sky points,
 * sampled on a grid over an nx x ny image (the seed's WCS-alignment check). */
int sp_wcs_max_offset(sp_wcs *w1, sp_wcs *w2, long nx, long ny, double *max_pix);

/* The WCS as FITS header cards (wcshdo, 17 significant digits; SIP written as
 * A_p_q/B_p_q cards that astropy reads too): *cards is malloc'd, ncards*80 chars
 * plus a NUL, no END card; free() it. Feed to sp_fits_write_cards(). Not
 * thread-safe on the same w (use a copy). */
int sp_wcs_to_header(const sp_wcs *w, char **cards, int *ncards);

/* The source name given at parse time ("FILE[HDU n]"), for messages. */
const char *sp_wcs_name(const sp_wcs *w);

#endif

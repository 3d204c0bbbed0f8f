/* detect_check.c — dev/bench tool (not a test): our detection on one whole
 * frame, written as CSV, for the completeness comparison with source-extractor
 * (scripts/bench/detect_compare.py, issue 5: "detection completeness at
 * SNR > 10 at least that of source-extractor on the same frame").
 *
 * What it runs is the pipeline's detection path on a frame: NaN pixels masked,
 * the background mesh (sp_bkg_estimate, default 64 px boxes, source-masked) and
 * its RMS map, subtraction, then sp_detect with a Gaussian matched filter of
 * FWHM (the pipeline filters with its current PSF estimate; a Gaussian of the
 * seeing is what it starts from and what source-extractor's default filter is).
 *
 * Build: make build/rel/bench/detect_check
 * Run:   build/rel/bench/detect_check FRAME.fits OUT.csv [thresh_sigma minarea fwhm deblend]
 *          [deblend_nsigma deblend_contrast deblend_fwhm_frac]
 *        defaults 5 5 (FWHM: header key FWHM, else SEEING / PIXSCALE, else 3 px) 1 5 0.3 1
 * Output columns: x,y (0-based pixel centres),snr,flux,flux_err,q,npix,flags.
 */
#include "surveyproc/sp_background.h"
#include "surveyproc/sp_detect.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_fits.h"
#include "surveyproc/sp_log.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s FRAME.fits OUT.csv [thresh_sigma minarea fwhm deblend deblend_nsigma deblend_contrast]\n", argv[0]);
        return 2;
    }
    int status = SP_OK;
    sp_fits *f = NULL;
    float *img = NULL, *back = NULL, *rms = NULL;
    uint8_t *mask = NULL;
    sp_bkg *bkg = NULL;
    sp_source *src = NULL;
    int nsrc = 0;
    FILE *out = NULL;
    long nx = 0, ny = 0;
    SP_TRY(sp_fits_open(argv[1], &f));
    sp_fits_shape(f, &nx, &ny);
    double fwhm = 3.0;
    int found = 0;
    SP_TRY(sp_fits_key_double(f, "FWHM", 0, &fwhm, &found));
    if (!found || !(fwhm > 0)) {
        double seeing = 0, pixscale = 0;
        int f1 = 0, f2 = 0;
        SP_TRY(sp_fits_key_double(f, "SEEING", 0, &seeing, &f1));
        SP_TRY(sp_fits_key_double(f, "PIXSCALE", 0, &pixscale, &f2));
        fwhm = f1 && f2 && pixscale > 0 ? seeing / pixscale : 3.0;
    }
    sp_detect_params dp;
    sp_detect_params_default(&dp);
    if (argc > 3) dp.thresh_sigma = atof(argv[3]);
    if (argc > 4) dp.minarea = atoi(argv[4]);
    if (argc > 5 && atof(argv[5]) > 0) fwhm = atof(argv[5]);
    if (argc > 6) dp.deblend = atoi(argv[6]);
    if (argc > 7) dp.deblend_nsigma = atof(argv[7]);
    if (argc > 8) dp.deblend_contrast = atof(argv[8]);
    if (argc > 9) dp.deblend_fwhm_frac = atof(argv[9]);
    dp.fwhm = fwhm;
    size_t n = (size_t)nx * (size_t)ny;
    SP_ALLOC(img, n);
    SP_ALLOC(back, n);
    SP_ALLOC(rms, n);
    SP_ALLOC(mask, n);
    SP_TRY(sp_fits_read_subset(f, 0, 0, nx, ny, img));
    double t0 = now();
    for (size_t i = 0; i < n; i++) {
        mask[i] = !isfinite(img[i]);
        if (mask[i]) img[i] = 0;
    }
    SP_TRY(sp_bkg_estimate(img, NULL, mask, (int)nx, (int)ny, NULL, &bkg));
    SP_TRY(sp_bkg_map(bkg, back, rms));
    for (size_t i = 0; i < n; i++) img[i] -= back[i];
    double t1 = now();
    SP_TRY(sp_detect(img, rms, mask, (int)nx, (int)ny, NULL, &dp, &src, &nsrc));
    double t2 = now();
    out = fopen(argv[2], "w");
    SP_CHECK(out, SP_ERR_IO, "%s: cannot write", argv[2]);
    fprintf(out, "x,y,snr,flux,flux_err,q,npix,flags\n");
    for (int k = 0; k < nsrc; k++)
        fprintf(out, "%.4f,%.4f,%.3f,%.6g,%.6g,%.4f,%d,%d\n", src[k].x, src[k].y, src[k].snr, src[k].flux,
                src[k].flux_err, src[k].q, src[k].npix, src[k].flags);
    int rc = fclose(out);
    out = NULL;
    SP_CHECK(rc == 0, SP_ERR_IO, "%s: write failed", argv[2]);
    printf("{\"frame\": \"%s\", \"nx\": %ld, \"ny\": %ld, \"fwhm\": %.3f, \"thresh_sigma\": %g, \"minarea\": %d, "
           "\"deblend\": %d, \"ndet\": %d, \"cpu_background\": %.4f, \"cpu_detect\": %.4f}\n",
           argv[1], nx, ny, fwhm, dp.thresh_sigma, dp.minarea, dp.deblend, nsrc, t1 - t0, t2 - t1);
cleanup:
    if (out) fclose(out);
    if (status != SP_OK) fprintf(stderr, "detect_check: %s\n", sp_err_msg());
    sp_fits_close(&f);
    sp_bkg_free(&bkg);
    free(src);
    free(img);
    free(back);
    free(rms);
    free(mask);
    return status == SP_OK ? 0 : 1;
}

/* fuzz_fits_wcs.c — libFuzzer harness for the FITS header and WCS readers: bytes as a FITS
 * file. (1) cfitsio memory file -> every HDU's header (fits_hdr2str) -> sp_wcs_from_header
 * (wcspih, wcsset, our checks) -> pix2sky / sky2pix / pixel scale / local affine / header
 * round trip; (2) the same bytes as a file -> sp_fits_open (our HDU choice and checks),
 * the keys the plan reads, sp_wcs_from_fits. Errors must come back as a status. */
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_fits.h"
#include "surveyproc/sp_wcs.h"

#include <fitsio.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char path[256];
static void drop_file(void) { unlink(path); }

static void exercise(sp_wcs *w)
{
    double x[3] = {1, 50.5, -3}, y[3] = {1, 20, 1e4}, ra[3], dec[3], xb[3], yb[3], s;
    long nbad = 0;
    if (sp_wcs_pix2sky(w, 3, x, y, ra, dec, &nbad) == SP_OK) (void)sp_wcs_sky2pix(w, 3, ra, dec, xb, yb, &nbad);
    sp_err_clear();
    (void)sp_wcs_pixscale(w, 10, 10, &s);
    sp_err_clear();
    sp_affine a;
    (void)sp_wcs_local_affine(w, 10, 10, &a);
    sp_err_clear();
    char *cards = NULL;
    int nc = 0;
    if (sp_wcs_to_header(w, &cards, &nc) == SP_OK) {
        sp_wcs *w2 = NULL;
        if (sp_wcs_from_header(cards, nc, "round trip", &w2) == SP_OK) sp_wcs_free(&w2);
        free(cards);
    }
    sp_err_clear();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* (1) memory file; cfitsio may realloc the buffer it is given */
    size_t msize = size;
    void *mem = malloc(size ? size : 1);
    if (!mem) return 0;
    memcpy(mem, data, size);
    fitsfile *fp = NULL;
    int st = 0;
    if (!fits_open_memfile(&fp, "fuzz.fits", READONLY, &mem, &msize, 0, NULL, &st)) {
        int nhdu = 0;
        fits_get_num_hdus(fp, &nhdu, &st);
        for (int k = 1; k <= nhdu && k <= 4 && !st; k++) {
            int type = 0;
            if (fits_movabs_hdu(fp, k, &type, &st)) break;
            char *hdr = NULL;
            int nkeys = 0;
            if (!fits_hdr2str(fp, 0, NULL, 0, &hdr, &nkeys, &st)) {
                sp_wcs *w = NULL;
                if (sp_wcs_from_header(hdr, nkeys, "fuzz.fits", &w) == SP_OK) {
                    exercise(w);
                    sp_wcs_free(&w);
                }
                sp_err_clear();
                fits_free_memory(hdr, &st);
            }
        }
        st = 0;
        fits_close_file(fp, &st);
    }
    free(mem);

    /* (2) our reader on the same bytes */
    if (!path[0]) {
        const char *dir = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
        snprintf(path, sizeof path, "%s/sp_fuzz_fits.%d.fits", dir, (int)getpid());
        atexit(drop_file);
    }
    FILE *f = fopen(path, "wb");
    if (!f) return 0;
    if (size) fwrite(data, 1, size, f);
    fclose(f);
    sp_fits *sf = NULL;
    if (sp_fits_open(path, &sf) == SP_OK) {
        double v;
        long l;
        char s[80];
        int found = 0;
        (void)sp_fits_key_double(sf, "SKYSIG", 0, &v, &found);
        (void)sp_fits_key_double(sf, "ZP_AUTO", 0, &v, &found);
        (void)sp_fits_key_long(sf, "NAXIS1", 0, &l, &found);
        (void)sp_fits_key_string(sf, "FILTER", 0, s, sizeof s, &found);
        sp_err_clear();
        sp_wcs *w = NULL;
        if (sp_wcs_from_fits(sf, &w) == SP_OK) {
            exercise(w);
            sp_wcs_free(&w);
        }
        sp_err_clear();
        sp_fits_close(&sf);
    }
    sp_err_clear();
    return 0;
}

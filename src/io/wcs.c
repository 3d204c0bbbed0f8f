/* wcs.c — celestial WCS through wcslib (see sp_wcs.h).
 *
 * We keep one deep-copied wcsprm per sp_wcs (wcssub copies distortions such as
 * SIP too), so the wcspih array can be freed at once and copies for threads are
 * independent. wcspih/wcsset/wcssub are serialised by a lock: they are cheap
 * and rare, and older wcslib parsers kept scanner state in globals.
 */
#include "surveyproc/sp_wcs.h"
#include "surveyproc/sp_error.h"

#include <wcslib/dis.h>
#include <wcslib/wcs.h>
#include <wcslib/wcserr.h>
#include <wcslib/wcsfix.h>
#include <wcslib/wcshdr.h>
#include <wcslib/wcsutil.h>

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct sp_wcs {
    struct wcsprm *wcs; /* set up (wcsset done), celestial, 2 axes */
    char *what;         /* source name for messages, e.g. "img.fits[HDU 1]" */
};

static pthread_mutex_t wcs_lock = PTHREAD_MUTEX_INITIALIZER;

/* Points per wcslib call: bounds the scratch memory for huge n. */
#define SP_WCS_CHUNK 4096

static char *dupstr(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

static void free_wcsprm(struct wcsprm **p)
{
    if (!p || !*p) return;
    wcsfree(*p);
    free(*p);
    *p = NULL;
}

/* wcslib's own explanation of the last failure of w, or its generic text. */
static const char *wcs_why(const struct wcsprm *w, int st)
{
    if (w && w->err && w->err->msg[0]) return w->err->msg;
    if (st > 0 && st <= WCSERR_NON_SEPARABLE) return wcs_errmsg[st];
    return "unknown wcslib error";
}

/* Drop the error records a failed transformation left in w. wcslib 7.12 leaks the
 * message of the previous record when a second transformation fails on the same wcsprm
 * (found by tests/fuzz/fuzz_fits_wcs: 50-89 bytes per failing call, e.g. points outside
 * a SIN projection); wcserr_clear frees them. */
static void clear_errors(struct wcsprm *w)
{
    wcserr_clear(&w->err);
    wcserr_clear(&w->lin.err);
    if (w->lin.dispre) wcserr_clear(&w->lin.dispre->err); /* distortions (SIP, TPV) */
    if (w->lin.disseq) wcserr_clear(&w->lin.disseq->err);
    wcserr_clear(&w->cel.err);
    wcserr_clear(&w->cel.prj.err);
}

/* The first card (1-based) whose string value has no closing quote, else 0. Such a card is
 * not valid FITS, and wcslib 7.12's header parser (wcspih) then copies the rest of the card
 * past the end of a fixed-size field: a buffer overflow (found by tests/fuzz/fuzz_fits_wcs;
 * glibc's fortify check aborts the program). */
static int unterminated_string_card(const char *hdr, int ncards)
{
    for (int c = 0; c < ncards; c++) {
        const char *k = hdr + (size_t)c * 80;
        if (k[8] != '=' || k[9] != ' ') continue;
        int i = 10;
        while (i < 80 && k[i] == ' ') i++;
        if (i >= 80 || k[i] != '\'') continue;
        int closed = 0;
        for (i++; i < 80; i++) {
            if (k[i] != '\'') continue;
            if (i + 1 < 80 && k[i + 1] == '\'') { /* '' is a quote inside the string */
                i++;
                continue;
            }
            closed = 1;
            break;
        }
        if (!closed) return c + 1;
    }
    return 0;
}

/* Is every CUNITi of w (its two celestial axes) an angle unit? 0 if so, else the axis
 * (1-based), with the reason in why. wcsset would refuse other units too, but wcslib 7.12
 * leaks memory when its unit parser meets a string it cannot parse (in wcsulexe and again in
 * wcsset; found by tests/fuzz/fuzz_fits_wcs), so such strings never reach wcslib: only the
 * angle units a celestial axis can have pass (after unitfix, which turns 'DEG', 'degrees' and
 * the like into 'deg'). */
static int bad_unit(const struct wcsprm *w, char *why, size_t n)
{
    static const char *const angle[] = {"deg", "arcmin", "arcsec", "mas", "uas", "rad", "mrad"};
    for (int i = 0; i < w->naxis; i++) {
        char u[72];
        const char *c = w->cunit[i];
        while (*c == ' ') c++;
        snprintf(u, sizeof u, "%s", c);
        for (size_t l = strlen(u); l > 0 && u[l - 1] == ' '; l--) u[l - 1] = '\0';
        if (!u[0]) continue;
        int ok = 0;
        for (size_t k = 0; k < sizeof angle / sizeof angle[0]; k++) ok |= !strcmp(u, angle[k]);
        if (ok) continue;
        snprintf(why, n, "not an angle unit (a celestial axis needs deg, arcmin, arcsec, mas or rad)");
        return i + 1;
    }
    return 0;
}

/* Deep copy src (with distortions) into a freshly allocated, set-up wcsprm.
 * Caller holds wcs_lock. */
static int copy_setup(const struct wcsprm *src, const char *what, struct wcsprm **dst)
{
    int status = SP_OK, st;
    struct wcsprm *w = NULL;
    SP_ALLOC(w, 1);
    w->flag = -1;
    st = wcssub(1, src, NULL, NULL, w);
    SP_CHECK(st == 0, SP_ERR_WCS, "%s: cannot copy the WCS: wcslib error %d (%s)", what, st, wcs_why(w, st));
    st = wcsset(w);
    SP_CHECK(st == 0, SP_ERR_WCS, "%s: wcslib rejects the WCS: %s (check CTYPE/CRVAL/CD/PC keys)", what,
             wcs_why(w, st));
    *dst = w;
    w = NULL;
cleanup:
    free_wcsprm(&w);
    return status;
}

int sp_wcs_from_header(const char *hdr, int nkeys, const char *what, sp_wcs **out)
{
    int status = SP_OK, st, nreject = 0, nwcs = 0, locked = 0;
    struct wcsprm *all = NULL, *cel = NULL;
    char *copy = NULL;
    sp_wcs *w = NULL;
    if (!what) what = "header";
    SP_CHECK(hdr && out && nkeys >= 0, SP_ERR_INTERNAL, "sp_wcs_from_header: NULL argument");
    *out = NULL;
    /* wcspih takes a writable buffer; give it its own copy of exactly nkeys cards */
    size_t len = strnlen(hdr, (size_t)nkeys * 80);
    SP_ALLOC(copy, len + 1);
    memcpy(copy, hdr, len);
    copy[len] = '\0';

    int bad = unterminated_string_card(copy, (int)(len / 80));
    SP_CHECK(!bad, SP_ERR_WCS,
             "%s: header card %d (%.8s) has a string value without its closing quote (not valid FITS); fix or "
             "regenerate the header",
             what, bad, copy + (size_t)(bad - 1) * 80);

    pthread_mutex_lock(&wcs_lock);
    locked = 1;
    wcserr_enable(1); /* detailed messages in wcsprm::err (a global switch) */
    st = wcspih(copy, (int)(len / 80), WCSHDR_all, 0, &nreject, &nwcs, &all);
    SP_CHECK(st == 0, SP_ERR_WCS, "%s: wcslib cannot parse the header: wcspih error %d (%s)", what, st,
             st > 0 && st <= WCSHDRERR_BAD_TABULAR_PARAMS ? wcshdr_errmsg[st] : "unknown");
    /* wcspih returns a default (linear, no CTYPE) description for any header
     * with NAXIS, so "no WCS" means: no CTYPE on any axis */
    int any_ctype = 0;
    for (int i = 0; i < nwcs; i++)
        for (int k = 0; k < all[i].naxis; k++)
            if (all[i].ctype[k][0]) any_ctype = 1;
    SP_CHECK(nwcs > 0 && any_ctype, SP_ERR_WCS,
             "%s: no WCS in the header (need CTYPE1/2 = 'RA---TAN'/'DEC--TAN' or similar, CRVAL, CRPIX and CD or "
             "CDELT/PC); re-run astrometry on this image",
             what);
    /* Primary description first (alt ' ' comes first in wcspih's array), then
     * the alternates: the first one with a celestial pair wins. */
    char ctypes[160] = "";
    for (int i = 0; i < nwcs && !cel; i++) {
        struct wcsprm *cand = NULL;
        /* one combined code extracts both celestial axes in their original
         * order, so pixel axis 1 stays x; wcssub returns their numbers */
        int nsub = 1, axes[4] = {WCSSUB_LONGITUDE | WCSSUB_LATITUDE, 0, 0, 0};
        if (i == 0 && all[i].naxis >= 2)
            snprintf(ctypes, sizeof ctypes, "CTYPE1 = '%s', CTYPE2 = '%s'", all[i].ctype[0], all[i].ctype[1]);
        SP_ALLOC(cand, 1);
        cand->flag = -1;
        /* extract just the celestial axes: wcssub fills axes[] with the
         * original axis numbers it found (0 entries are missing ones) */
        st = wcssub(1, &all[i], &nsub, axes, cand);
        if (st != 0 || nsub != 2) {
            free_wcsprm(&cand);
            continue;
        }
        /* The image axes of a 2-D frame are 1 and 2; a celestial pair on other
         * pixel axes would need a different pixel mapping. */
        if (axes[0] != 1 || axes[1] != 2) {
            free_wcsprm(&cand);
            continue;
        }
        /* Non-standard unit strings ('DEG', 'degrees'), as astropy fixes by
         * default. Not cdfix: it would turn a degenerate CD matrix into
         * 1 deg/pixel instead of an error. Not celfix: it calls wcsset
         * itself, and a failed wcsset must not be repeated (wcslib then leaks
         * its error record); NCP/GLS headers are not met in survey data. */
        unitfix(1, cand);
        char why[160];
        int ubad = bad_unit(cand, why, sizeof why);
        if (ubad) {
            if (i == 0) { /* the primary WCS is broken: say why */
                status = SP_FAIL(SP_ERR_WCS, "%s: wcslib rejects the WCS: CUNIT%d = '%s': %s", what, axes[ubad - 1],
                                 cand->cunit[ubad - 1], why);
                free_wcsprm(&cand);
                goto cleanup;
            }
            free_wcsprm(&cand);
            continue;
        }
        st = wcsset(cand);
        if (st != 0 || cand->lng < 0 || cand->lat < 0) {
            if (i == 0 && st != 0) { /* the primary WCS is broken: say why */
                status = SP_FAIL(SP_ERR_WCS, "%s: wcslib rejects the WCS: %s (check CTYPE/CRVAL/CD/PC keys)", what,
                                 wcs_why(cand, st));
                free_wcsprm(&cand);
                goto cleanup;
            }
            free_wcsprm(&cand);
            continue;
        }
        cel = cand;
    }
    SP_CHECK(cel, SP_ERR_WCS,
             "%s: the header has WCS keys but no celestial coordinate pair (%s); need RA/DEC (or GLON/GLAT...) "
             "axes on pixel axes 1 and 2",
             what, ctypes[0] ? ctypes : "no CTYPE");
    pthread_mutex_unlock(&wcs_lock);
    locked = 0;

    SP_ALLOC(w, 1);
    w->what = dupstr(what);
    SP_CHECK(w->what, SP_ERR_NOMEM, "out of memory");
    w->wcs = cel;
    cel = NULL;
    *out = w;
    w = NULL;
cleanup:
    if (all) wcsvfree(&nwcs, &all);
    free_wcsprm(&cel);
    if (locked) pthread_mutex_unlock(&wcs_lock);
    if (w) sp_wcs_free(&w);
    free(copy);
    return status;
}

int sp_wcs_from_fits(sp_fits *f, sp_wcs **out)
{
    int status = SP_OK, nkeys = 0;
    char *hdr = NULL, what[1100];
    SP_CHECK(f && out, SP_ERR_INTERNAL, "sp_wcs_from_fits: NULL argument");
    SP_TRY(sp_fits_header(f, &hdr, &nkeys));
    snprintf(what, sizeof what, "%s[HDU %d]", sp_fits_path(f), sp_fits_hdu(f));
    SP_TRY(sp_wcs_from_header(hdr, nkeys, what, out));
cleanup:
    free(hdr);
    return status;
}

int sp_wcs_copy(const sp_wcs *src, sp_wcs **dst)
{
    int status = SP_OK;
    sp_wcs *w = NULL;
    SP_CHECK(src && src->wcs && dst, SP_ERR_INTERNAL, "sp_wcs_copy: NULL argument");
    *dst = NULL;
    SP_ALLOC(w, 1);
    w->what = dupstr(src->what);
    SP_CHECK(w->what, SP_ERR_NOMEM, "out of memory");
    pthread_mutex_lock(&wcs_lock);
    status = copy_setup(src->wcs, src->what, &w->wcs);
    pthread_mutex_unlock(&wcs_lock);
    if (status) goto cleanup;
    *dst = w;
    w = NULL;
cleanup:
    if (w) sp_wcs_free(&w);
    return status;
}

void sp_wcs_free(sp_wcs **w)
{
    if (!w || !*w) return;
    free_wcsprm(&(*w)->wcs);
    free((*w)->what);
    free(*w);
    *w = NULL;
}

/* RA into [0, 360): wcslib may return e.g. -0.5 near RA = 0. */
static double wrap360(double a)
{
    a = fmod(a, 360.0);
    if (a < 0) a += 360.0;
    if (a >= 360.0) a -= 360.0;
    return a;
}

/* Both directions share the chunking, NaN handling and status mapping:
 * to_sky = 1: (in1, in2) = 0-based pixels -> (out1, out2) = (RA, Dec);
 * to_sky = 0: (in1, in2) = (RA, Dec) -> 0-based pixels. */
static int transform(sp_wcs *w, int to_sky, long n, const double *in1, const double *in2, double *out1,
                     double *out2, long *nbad)
{
    int status = SP_OK;
    double *pix = NULL, *img = NULL, *wld = NULL, *phi = NULL, *theta = NULL;
    int *stat = NULL;
    long bad = 0;
    const char *fn = to_sky ? "sp_wcs_pix2sky" : "sp_wcs_sky2pix";
    SP_CHECK(w && w->wcs && n >= 0 && (n == 0 || (in1 && in2 && out1 && out2)), SP_ERR_INTERNAL,
             "%s: NULL argument", fn);
    struct wcsprm *p = w->wcs;
    int ilng = p->lng, ilat = p->lat;
    long chunk = n < SP_WCS_CHUNK ? n : SP_WCS_CHUNK;
    SP_ALLOC(pix, 2 * chunk);
    SP_ALLOC(img, 2 * chunk);
    SP_ALLOC(wld, 2 * chunk);
    SP_ALLOC(phi, chunk);
    SP_ALLOC(theta, chunk);
    SP_ALLOC(stat, chunk);
    for (long i0 = 0; i0 < n; i0 += chunk) {
        long m = n - i0 < chunk ? n - i0 : chunk, k = 0;
        long idx[SP_WCS_CHUNK];
        for (long j = 0; j < m; j++) {
            long i = i0 + j;
            if (!isfinite(in1[i]) || !isfinite(in2[i]) || (!to_sky && fabs(in2[i]) > 90.0)) {
                out1[i] = out2[i] = NAN;
                bad++;
                continue;
            }
            if (to_sky) {
                /* FITS pixel = 0-based + 1 */
                pix[2 * k] = in1[i] + 1.0;
                pix[2 * k + 1] = in2[i] + 1.0;
            } else {
                wld[2 * k + ilng] = in1[i];
                wld[2 * k + ilat] = in2[i];
            }
            idx[k++] = i;
        }
        if (k == 0) continue;
        clear_errors(p); /* a record left from before would be overwritten and leak */
        int st = to_sky ? wcsp2s(p, (int)k, 2, pix, img, phi, theta, wld, stat)
                        : wcss2p(p, (int)k, 2, wld, phi, theta, img, pix, stat);
        int bad_st = to_sky ? WCSERR_BAD_PIX : WCSERR_BAD_WORLD;
        int ok = st == 0 || st == bad_st;
        if (!ok)
            status = SP_FAIL(SP_ERR_WCS, "%s: %s failed: %s", w->what, to_sky ? "pixel -> sky" : "sky -> pixel",
                             wcs_why(p, st));
        if (st) clear_errors(p);
        if (!ok) goto cleanup;
        for (long j = 0; j < k; j++) {
            long i = idx[j];
            double u = to_sky ? wld[2 * j + ilng] : pix[2 * j] - 1.0;
            double v = to_sky ? wld[2 * j + ilat] : pix[2 * j + 1] - 1.0;
            if (stat[j] || !isfinite(u) || !isfinite(v)) {
                out1[i] = out2[i] = NAN;
                bad++;
            } else {
                out1[i] = to_sky ? wrap360(u) : u;
                out2[i] = v;
            }
        }
    }
cleanup:
    if (nbad) *nbad = bad;
    free(pix);
    free(img);
    free(wld);
    free(phi);
    free(theta);
    free(stat);
    return status;
}

int sp_wcs_pix2sky(sp_wcs *w, long n, const double *x, const double *y, double *ra, double *dec, long *nbad)
{
    return transform(w, 1, n, x, y, ra, dec, nbad);
}

int sp_wcs_sky2pix(sp_wcs *w, long n, const double *ra, const double *dec, double *x, double *y, long *nbad)
{
    return transform(w, 0, n, ra, dec, x, y, nbad);
}

/* Signed RA difference a - b in degrees, folded into (-180, 180]. */
static double dra(double a, double b)
{
    double d = fmod(a - b, 360.0);
    if (d > 180.0) d -= 360.0;
    if (d <= -180.0) d += 360.0;
    return d;
}

int sp_wcs_local_affine(sp_wcs *w, double x0, double y0, sp_affine *a)
{
    int status = SP_OK;
    long nbad = 0;
    SP_CHECK(w && a, SP_ERR_INTERNAL, "sp_wcs_local_affine: NULL argument");
    /* centre, x-0.5, x+0.5, y-0.5, y+0.5 */
    double px[5] = {x0, x0 - 0.5, x0 + 0.5, x0, x0};
    double py[5] = {y0, y0, y0, y0 - 0.5, y0 + 0.5};
    double r[5], d[5];
    SP_TRY(sp_wcs_pix2sky(w, 5, px, py, r, d, &nbad));
    SP_CHECK(nbad == 0, SP_ERR_WCS, "%s: pixel (%.3f, %.3f) is outside the projection; cannot linearise there",
             w->what, x0, y0);
    double c = cos(d[0] * M_PI / 180.0);
    a->x0 = x0;
    a->y0 = y0;
    a->ra0 = r[0];
    a->dec0 = d[0];
    /* central differences over a 1-pixel baseline */
    a->J[0][0] = dra(r[2], r[1]) * c;
    a->J[0][1] = dra(r[4], r[3]) * c;
    a->J[1][0] = d[2] - d[1];
    a->J[1][1] = d[4] - d[3];
    double det = a->J[0][0] * a->J[1][1] - a->J[0][1] * a->J[1][0];
    SP_CHECK(isfinite(det) && det != 0.0, SP_ERR_NUMERIC, "%s: the WCS is singular at pixel (%.3f, %.3f)",
             w->what, x0, y0);
    a->Jinv[0][0] = a->J[1][1] / det;
    a->Jinv[0][1] = -a->J[0][1] / det;
    a->Jinv[1][0] = -a->J[1][0] / det;
    a->Jinv[1][1] = a->J[0][0] / det;
cleanup:
    return status;
}

int sp_wcs_pixscale(sp_wcs *w, double x, double y, double *arcsec)
{
    int status = SP_OK;
    sp_affine a;
    SP_CHECK(arcsec, SP_ERR_INTERNAL, "sp_wcs_pixscale: NULL argument");
    SP_TRY(sp_wcs_local_affine(w, x, y, &a));
    *arcsec = 3600.0 * sqrt(fabs(a.J[0][0] * a.J[1][1] - a.J[0][1] * a.J[1][0]));
cleanup:
    return status;
}

int sp_wcs_max_offset(sp_wcs *w1, sp_wcs *w2, long nx, long ny, double *max_pix)
{
    enum { G = 9 }; /* 9 x 9 samples: corners, edges and interior */
    int status = SP_OK;
    double px[G * G], py[G * G], ra[G * G], dec[G * G], qx[G * G], qy[G * G];
    long nb1 = 0, nb2 = 0;
    SP_CHECK(w1 && w2 && max_pix && nx > 0 && ny > 0, SP_ERR_INTERNAL, "sp_wcs_max_offset: bad argument");
    for (int j = 0; j < G; j++)
        for (int i = 0; i < G; i++) {
            px[j * G + i] = (double)(nx - 1) * i / (G - 1);
            py[j * G + i] = (double)(ny - 1) * j / (G - 1);
        }
    SP_TRY(sp_wcs_pix2sky(w1, G * G, px, py, ra, dec, &nb1));
    SP_TRY(sp_wcs_sky2pix(w2, G * G, ra, dec, qx, qy, &nb2));
    double m = 0.0;
    for (int k = 0; k < G * G; k++) {
        /* a point one WCS cannot place at all is as misaligned as it gets */
        if (!isfinite(qx[k]) || !isfinite(qy[k])) {
            m = INFINITY;
            break;
        }
        double d = hypot(qx[k] - px[k], qy[k] - py[k]);
        if (d > m) m = d;
    }
    *max_pix = m;
cleanup:
    return status;
}

int sp_wcs_to_header(const sp_wcs *w, char **cards, int *ncards)
{
    int status = SP_OK, n = 0, st;
    char *h = NULL;
    SP_CHECK(w && w->wcs && cards && ncards, SP_ERR_INTERNAL, "sp_wcs_to_header: NULL argument");
    *cards = NULL;
    *ncards = 0;
    pthread_mutex_lock(&wcs_lock);
    /* WCSHDO_P17: 17 significant digits, so a header written and read back
     * gives the same transformation to the last bit that matters */
    st = wcshdo(WCSHDO_safe | WCSHDO_P17, w->wcs, &n, &h);
    pthread_mutex_unlock(&wcs_lock);
    SP_CHECK(st == 0 && h, SP_ERR_WCS, "%s: cannot write the WCS as FITS cards: %s", w->what, wcs_why(w->wcs, st));
    *cards = malloc((size_t)n * 80 + 1);
    SP_CHECK(*cards, SP_ERR_NOMEM, "out of memory");
    memcpy(*cards, h, (size_t)n * 80);
    (*cards)[(size_t)n * 80] = '\0';
    *ncards = n;
cleanup:
    wcsdealloc(h);
    return status;
}

const char *sp_wcs_name(const sp_wcs *w) { return w ? w->what : NULL; }

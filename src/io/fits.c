/* fits.c — FITS image access through cfitsio (see sp_fits.h).
 *
 * Threads: Debian's cfitsio is built reentrant (fits_is_reentrant() = 1) and
 * gives every fits_open_diskfile its own buffers, even for the same path
 * (checked: two handles on one file have different Fptr), so separate sp_fits
 * handles can read in parallel without a lock. Only cfitsio's error-message
 * stack is process-wide; msg_lock keeps our reads of it whole.
 */
#include "surveyproc/sp_fits.h"
#include "surveyproc/sp_error.h"

#include <fitsio.h>

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define SP_FITS_MAXDIM 9

struct sp_fits {
    fitsfile *fp;
    char *path;    /* the user's path (final path when writing) */
    char *tmppath; /* writing only: where the data go until commit */
    int hdu;       /* 1-based */
    int naxis;
    long nx, ny;
    int writing;
    /* Direct reads (see sp_fits_read_subset): an uncompressed image whose pixels
     * cfitsio would only byte-swap and convert is read with pread(2) on our own
     * descriptor. fd < 0: every read goes through cfitsio. */
    int fd;
    int bitpix;
    double bscale, bzero;
    long long datastart; /* byte offset of the data unit in the file */
};

static int direct_enabled = 1;

int sp_fits_set_direct(int enable)
{
    int old = direct_enabled;
    direct_enabled = enable != 0;
    return old;
}

int sp_fits_direct(const sp_fits *f) { return f && f->fd >= 0; }

static pthread_mutex_t msg_lock = PTHREAD_MUTEX_INITIALIZER;

/* Drop whatever cfitsio left on its (process-wide) message stack. */
static void clear_msgs(void)
{
    pthread_mutex_lock(&msg_lock);
    fits_clear_errmsg();
    pthread_mutex_unlock(&msg_lock);
}

/* Build an SP_ERR_FITS (or `code`) message from a cfitsio status: our context,
 * cfitsio's short text for the code, and the detail lines on its message stack.
 * Call with the lock held (the message stack is global in cfitsio). */
static int cfitsio_fail(int code, int cfst, const char *file, int line, const char *path, int hdu,
                        const char *what)
{
    char text[FLEN_STATUS] = "", msg[FLEN_ERRMSG], detail[1024] = "";
    size_t used = 0;
    fits_get_errstatus(cfst, text);
    pthread_mutex_lock(&msg_lock);
    /* keep the last few stack lines: they carry the specific reason
     * (e.g. "attempt to read past end of file") */
    while (fits_read_errmsg(msg)) {
        size_t len = strlen(msg);
        while (len && (msg[len - 1] == ' ' || msg[len - 1] == '\n')) msg[--len] = '\0';
        if (!len || used + len + 4 >= sizeof detail) continue;
        /* cfitsio splits "... of file:" and the file name over two lines */
        const char *sep = !used ? "" : detail[used - 1] == ':' ? " " : "; ";
        used += (size_t)snprintf(detail + used, sizeof detail - used, "%s%s", sep, msg);
    }
    fits_clear_errmsg();
    pthread_mutex_unlock(&msg_lock);
    if (hdu > 0)
        return sp_err_set(code, file, line, "%s[HDU %d]: %s: cfitsio error %d (%s)%s%s", path, hdu, what,
                          cfst, text, used ? ": " : "", detail);
    return sp_err_set(code, file, line, "%s: %s: cfitsio error %d (%s)%s%s", path, what, cfst, text,
                      used ? ": " : "", detail);
}
#define CFITSIO_FAIL(cfst, f, what)                                                              \
    cfitsio_fail(SP_ERR_FITS, (cfst), __FILE__, __LINE__, (f)->path, (f)->hdu, (what))

static char *dupstr(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

/* Is the current HDU an image with two axes of length > 1 at most (extra axes of
 * length 1 allowed, e.g. NAXIS3 = 1)? Fills naxis/nx/ny. */
static int hdu_is_2d_image(fitsfile *fp, int *naxis, long *nx, long *ny, int *cfst)
{
    int type = 0;
    if (fits_get_hdu_type(fp, &type, cfst)) return 0;
    if (type != IMAGE_HDU) return 0;
    long naxes[SP_FITS_MAXDIM] = {0};
    int nax = 0;
    if (fits_get_img_dim(fp, &nax, cfst)) return 0;
    if (nax < 2 || nax > SP_FITS_MAXDIM) return 0;
    if (fits_get_img_size(fp, nax, naxes, cfst)) return 0;
    for (int i = 2; i < nax; i++)
        if (naxes[i] != 1) return 0;
    if (naxes[0] < 1 || naxes[1] < 1) return 0;
    *naxis = nax;
    *nx = naxes[0];
    *ny = naxes[1];
    return 1;
}


/* Can the current HDU be read directly (pread + byte swap + conversion) with
 * exactly the pixels cfitsio's fits_read_subset(TFLOAT, nulval = NaN) returns?
 * Yes for a plain (not tile-compressed) image in a plain FITS file (the file
 * starts with "SIMPLE  =": not gzip'ed, which cfitsio inflates in memory) with
 * BITPIX 8/16/32 without BLANK (any BSCALE/BZERO) or BITPIX -32/-64 without
 * BSCALE/BZERO. Everything else (compressed, BLANK, scaled floats, BITPIX 64)
 * keeps cfitsio's reader. Any doubt -> cfitsio; never an error here. */
static void direct_setup(sp_fits *f, long long datastart)
{
    int cfst = 0, bitpix = 0;
#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
    goto no; /* the conversion below byte-swaps: little-endian hosts only */
#endif
    if (fits_is_compressed_image(f->fp, &cfst) || cfst) goto no;
    if (fits_get_img_type(f->fp, &bitpix, &cfst)) goto no;
    if (bitpix != 8 && bitpix != 16 && bitpix != 32 && bitpix != -32 && bitpix != -64) goto no;
    double bscale = 1.0, bzero = 0.0;
    long blank = 0;
    char comment[FLEN_COMMENT];
    if (fits_read_key(f->fp, TDOUBLE, "BSCALE", &bscale, comment, &cfst)) {
        if (cfst != KEY_NO_EXIST) goto no;
        cfst = 0;
        bscale = 1.0;
    }
    if (fits_read_key(f->fp, TDOUBLE, "BZERO", &bzero, comment, &cfst)) {
        if (cfst != KEY_NO_EXIST) goto no;
        cfst = 0;
        bzero = 0.0;
    }
    if (bitpix > 0) {
        if (!fits_read_key(f->fp, TLONG, "BLANK", &blank, comment, &cfst)) goto no;
        if (cfst != KEY_NO_EXIST) goto no;
        cfst = 0;
    } else if (bscale != 1.0 || bzero != 0.0) {
        goto no;
    }
    int fd = open(f->path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) goto no;
    char head[9];
    if (pread(fd, head, 9, 0) != 9 || memcmp(head, "SIMPLE  =", 9) != 0) {
        close(fd);
        goto no;
    }
    f->fd = fd;
    f->bitpix = bitpix;
    f->bscale = bscale;
    f->bzero = bzero;
    f->datastart = datastart;
    return;
no:
    clear_msgs();
}

static int is_gzip(const char *path)
{
    unsigned char m[2] = {0, 0};
    FILE *fp = fopen(path, "rb");
    if (!fp) return 0;
    size_t n = fread(m, 1, 2, fp);
    fclose(fp);
    return n == 2 && m[0] == 0x1f && m[1] == 0x8b;
}

int sp_fits_open(const char *path, sp_fits **out)
{
    int status = SP_OK, cfst = 0;
    sp_fits *f = NULL;
    struct stat st;
    SP_CHECK(path && out, SP_ERR_INTERNAL, "sp_fits_open: NULL argument");
    *out = NULL;
    SP_CHECK(stat(path, &st) == 0, SP_ERR_IO, "%s: cannot open FITS file: %s (check the path in the image list)",
             path, strerror(errno));
    SP_CHECK(S_ISREG(st.st_mode), SP_ERR_IO, "%s: not a regular file (expected a FITS image)", path);
    SP_CHECK(access(path, R_OK) == 0, SP_ERR_IO, "%s: cannot read FITS file: %s", path, strerror(errno));

    SP_ALLOC(f, 1);
    f->fd = -1;
    f->path = dupstr(path);
    SP_CHECK(f->path, SP_ERR_NOMEM, "out of memory");

    f->hdu = 1; /* failures while opening are about the primary header */
    /* fits_open_diskfile: no extended-filename parsing, so paths with brackets
     * or a leading '!' are taken literally. cfitsio picks the decompressor of a
     * compressed file by looking for ".Z" (then ".bz2") anywhere in the path
     * (drvrmem.c, mem_uncompress2mem), so a gzip'ed file under e.g.
     * /tmp/run.Zk3/ fails as "unrecognized compression format": such a file is
     * opened through /dev/fd/N (cfitsio inflates it into memory while opening,
     * so the descriptor is closed right after). */
    const char *open_path = path;
    char alias[64];
    int afd = -1;
    if ((strstr(path, ".Z") || strstr(path, ".bz2")) && is_gzip(path)) {
        afd = open(path, O_RDONLY | O_CLOEXEC);
        SP_CHECK(afd >= 0, SP_ERR_IO, "%s: cannot open FITS file: %s", path, strerror(errno));
        snprintf(alias, sizeof alias, "/dev/fd/%d", afd);
        open_path = alias;
    }
    int opened = fits_open_diskfile(&f->fp, open_path, READONLY, &cfst);
    if (afd >= 0) close(afd);
    if (opened) {
        f->fp = NULL;
        status = CFITSIO_FAIL(cfst, f, "not a readable FITS file (truncated or not FITS?)");
        goto cleanup;
    }
    int nhdu = 0;
    if (fits_get_num_hdus(f->fp, &nhdu, &cfst)) {
        status = CFITSIO_FAIL(cfst, f, "cannot count HDUs");
        goto cleanup;
    }
    f->hdu = 0;
    for (int h = 1; h <= nhdu; h++) {
        int type = 0;
        if (fits_movabs_hdu(f->fp, h, &type, &cfst)) {
            f->hdu = h;
            status = CFITSIO_FAIL(cfst, f, "cannot read this HDU (truncated file?)");
            goto cleanup;
        }
        if (hdu_is_2d_image(f->fp, &f->naxis, &f->nx, &f->ny, &cfst)) {
            f->hdu = h;
            break;
        }
        if (cfst) {
            f->hdu = h;
            status = CFITSIO_FAIL(cfst, f, "cannot read the image header");
            goto cleanup;
        }
    }
    SP_CHECK(f->hdu > 0, SP_ERR_FITS,
             "%s: no 2-D image found in the primary HDU or any of the %d extension(s) (need a float image with "
             "NAXIS = 2)",
             path, nhdu - 1);

    /* A data unit cut short is only noticed by cfitsio when the missing bytes
     * are read; check the size now so planning fails early and clearly. */
    LONGLONG headstart = 0, datastart = 0, dataend = 0;
    if (fits_get_hduaddrll(f->fp, &headstart, &datastart, &dataend, &cfst)) {
        status = CFITSIO_FAIL(cfst, f, "cannot locate the data unit");
        goto cleanup;
    }
    /* (a gzip'ed file, which cfitsio inflates in memory when opening it, has no such size) */
    if ((LONGLONG)st.st_size < dataend && !is_gzip(path)) {
        char what[300];
        snprintf(what, sizeof what,
                 "truncated FITS file: the %ld x %ld image needs %lld bytes up to the end of its data, the file "
                 "has %lld (re-copy or regenerate the file)",
                 f->nx, f->ny, (long long)dataend, (long long)st.st_size);
        /* let cfitsio say it too: read the last pixel */
        float v = 0.0f, nul = NAN;
        int anynul = 0;
        fits_read_img(f->fp, TFLOAT, (LONGLONG)f->nx * f->ny, 1, &nul, &v, &anynul, &cfst);
        if (cfst)
            status = CFITSIO_FAIL(cfst, f, what);
        else
            status = SP_FAIL(SP_ERR_FITS, "%s[HDU %d]: %s", path, f->hdu, what);
        goto cleanup;
    }
    if (direct_enabled) direct_setup(f, datastart);
    *out = f;
    f = NULL;
cleanup:
    if (f) {
        if (f->fd >= 0) close(f->fd);
        if (f->fp) {
            int c2 = 0;
            fits_close_file(f->fp, &c2);
            clear_msgs();
        }
        free(f->path);
        free(f);
    }
    return status;
}

void sp_fits_close(sp_fits **fp)
{
    if (!fp || !*fp) return;
    sp_fits *f = *fp;
    if (f->writing) {
        sp_fits_abort(fp);
        return;
    }
    if (f->fd >= 0) close(f->fd);
    if (f->fp) {
        int cfst = 0;
        fits_close_file(f->fp, &cfst);
        clear_msgs();
    }
    free(f->path);
    free(f);
    *fp = NULL;
}

const char *sp_fits_path(const sp_fits *f) { return f ? f->path : NULL; }
int sp_fits_hdu(const sp_fits *f) { return f ? f->hdu : 0; }
void sp_fits_shape(const sp_fits *f, long *nx, long *ny)
{
    if (nx) *nx = f ? f->nx : 0;
    if (ny) *ny = f ? f->ny : 0;
}

/* Big-endian FITS pixels of one BITPIX -> float, as cfitsio converts them for
 * TFLOAT with nulval = NaN: floats whose exponent is all ones (NaN, Inf) -> NaN,
 * exponent zero (0, -0, denormals) -> +0 (cfitsio's fnan/dnan "underflow");
 * integers (no BLANK here) -> (float)v, or (float)(v * BSCALE + BZERO) in double.
 * The loops are branch-free so the compiler vectorises them. */
__attribute__((target_clones("avx2", "default"))) static void convert_row(const unsigned char *in, long n, int bitpix, double bscale, double bzero, float *out)
{
    const int scaled = !(bscale == 1.0 && bzero == 0.0);
    switch (bitpix) {
    case -32: {
        const float fnan = NAN;
        uint32_t nanbits;
        memcpy(&nanbits, &fnan, 4);
        uint32_t *o = (uint32_t *)out;
        for (long i = 0; i < n; i++) {
            uint32_t u;
            memcpy(&u, in + 4 * i, 4);
            u = __builtin_bswap32(u);
            uint32_t e = u & 0x7F800000u;
            u = e == 0x7F800000u ? nanbits : u;
            o[i] = e == 0 ? 0u : u;
        }
        break;
    }
    case -64:
        for (long i = 0; i < n; i++) {
            uint64_t u;
            memcpy(&u, in + 8 * i, 8);
            u = __builtin_bswap64(u);
            uint64_t e = u & 0x7FF0000000000000ull;
            double d;
            memcpy(&d, &u, 8);
            out[i] = e == 0x7FF0000000000000ull ? NAN : e == 0 ? 0.0f : (float)d;
        }
        break;
    case 8:
        if (!scaled)
            for (long i = 0; i < n; i++) out[i] = (float)in[i];
        else
            for (long i = 0; i < n; i++) out[i] = (float)(in[i] * bscale + bzero);
        break;
    case 16:
        for (long i = 0; i < n; i++) {
            uint16_t u;
            memcpy(&u, in + 2 * i, 2);
            int16_t v = (int16_t)__builtin_bswap16(u);
            out[i] = scaled ? (float)(v * bscale + bzero) : (float)v;
        }
        break;
    case 32:
        for (long i = 0; i < n; i++) {
            uint32_t u;
            memcpy(&u, in + 4 * i, 4);
            int32_t v = (int32_t)__builtin_bswap32(u);
            out[i] = scaled ? (float)(v * bscale + bzero) : (float)v;
        }
        break;
    }
}

/* pread exactly n bytes at off; a short file is an error naming the byte. */
static int pread_all(sp_fits *f, void *buf, size_t n, long long off)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = pread(f->fd, (char *)buf + got, n - got, (off_t)(off + (long long)got));
        if (r < 0 && errno == EINTR) continue;
        if (r < 0)
            return SP_FAIL(SP_ERR_IO, "%s[HDU %d]: read error at byte %lld: %s", f->path, f->hdu,
                           off + (long long)got, strerror(errno));
        if (r == 0)
            return SP_FAIL(SP_ERR_FITS,
                           "%s[HDU %d]: truncated FITS file: the file ends at byte %lld, the image data need bytes up "
                           "to %lld (re-copy or regenerate the file)",
                           f->path, f->hdu, off + (long long)got, off + (long long)n);
        got += (size_t)r;
    }
    return SP_OK;
}

/* Rows [ay0, ay1) x columns [ax0, ax1) of the image into dst (row stride dstride
 * floats) through a small cache-resident buffer: rows whose gap in the file is
 * at most 8 KB are fetched together by one pread (here a pread of a short row
 * costs about as much as copying 8 KB more: bench_ioprep on the bench tile, ROI
 * rows of 2.2 KB 6 KB apart, 5% less CPU than a pread per row), wider gaps one
 * pread per row (in pieces if a row is larger than the buffer). mmap with
 * MAP_POPULATE of the rows was measured too: 40-70% more CPU than pread (and a
 * file truncated while mapped would raise SIGBUS instead of an error). */
#define DIRECT_BUF (256 * 1024)
static int direct_read(sp_fits *f, long ax0, long ay0, long ax1, long ay1, float *dst, size_t dstride)
{
    int status = SP_OK;
    const size_t bp = (size_t)(f->bitpix < 0 ? -f->bitpix : f->bitpix) / 8;
    const size_t rowb = (size_t)(ax1 - ax0) * bp, strideb = (size_t)f->nx * bp, gap = strideb - rowb;
    unsigned char *buf = NULL;
    SP_ALLOC(buf, DIRECT_BUF);
    long rows_per = 1;
    if (gap <= 8192 && strideb <= DIRECT_BUF) rows_per = (long)((DIRECT_BUF - rowb) / strideb) + 1;
    for (long y = ay0; y < ay1;) {
        long k = ay1 - y < rows_per ? ay1 - y : rows_per;
        long long off = f->datastart + ((long long)y * f->nx + ax0) * (long long)bp;
        if (rowb <= DIRECT_BUF) {
            SP_TRY(pread_all(f, buf, (size_t)(k - 1) * strideb + rowb, off));
            for (long j = 0; j < k; j++)
                convert_row(buf + (size_t)j * strideb, ax1 - ax0, f->bitpix, f->bscale, f->bzero,
                            dst + (size_t)(y + j - ay0) * dstride);
        } else {
            size_t per = DIRECT_BUF / bp, done = 0, nrow = (size_t)(ax1 - ax0);
            while (done < nrow) {
                size_t m = nrow - done < per ? nrow - done : per;
                SP_TRY(pread_all(f, buf, m * bp, off + (long long)(done * bp)));
                convert_row(buf, (long)m, f->bitpix, f->bscale, f->bzero, dst + (size_t)(y - ay0) * dstride + done);
                done += m;
            }
        }
        y += k;
    }
cleanup:
    free(buf);
    return status;
}

int sp_fits_read_subset(sp_fits *f, long x0, long y0, long nx, long ny, float *out)
{
    int status = SP_OK, cfst = 0;
    float *tmp = NULL;
    SP_CHECK(f && f->fp && out, SP_ERR_INTERNAL, "sp_fits_read_subset: NULL argument");
    SP_CHECK(nx >= 0 && ny >= 0, SP_ERR_INTERNAL, "%s[HDU %d]: negative subset size %ld x %ld", f->path, f->hdu,
             nx, ny);
    const float fnan = NAN;
    size_t total = (size_t)nx * (size_t)ny;
    /* intersection with the image, 0-based half-open */
    long ax0 = x0 > 0 ? x0 : 0, ay0 = y0 > 0 ? y0 : 0;
    long ax1 = x0 + nx < f->nx ? x0 + nx : f->nx, ay1 = y0 + ny < f->ny ? y0 + ny : f->ny;
    if (ax1 <= ax0 || ay1 <= ay0) {
        for (size_t i = 0; i < total; i++) out[i] = fnan;
        goto cleanup;
    }
    long inx = ax1 - ax0, iny = ay1 - ay0;
    int inside = (inx == nx && iny == ny);
    if (f->fd >= 0) {
        /* direct: straight into out, NaN around the part inside the image */
        if (!inside)
            for (size_t i = 0; i < total; i++) out[i] = fnan;
        status = direct_read(f, ax0, ay0, ax1, ay1, out + (size_t)(ay0 - y0) * (size_t)nx + (size_t)(ax0 - x0),
                             (size_t)nx);
        goto cleanup;
    }
    float *dst = out;
    if (!inside) {
        SP_ALLOC(tmp, (size_t)inx * (size_t)iny);
        dst = tmp;
    }

    long fpix[SP_FITS_MAXDIM], lpix[SP_FITS_MAXDIM], inc[SP_FITS_MAXDIM];
    for (int i = 0; i < SP_FITS_MAXDIM; i++) fpix[i] = lpix[i] = inc[i] = 1;
    fpix[0] = ax0 + 1;
    fpix[1] = ay0 + 1;
    lpix[0] = ax1;
    lpix[1] = ay1;
    float nulval = fnan;
    int anynul = 0;
    if (fits_read_subset(f->fp, TFLOAT, fpix, lpix, inc, &nulval, dst, &anynul, &cfst)) {
        char what[160];
        snprintf(what, sizeof what, "cannot read pixels [%ld:%ld, %ld:%ld) (truncated or damaged file?)", ax0, ax1,
                 ay0, ay1);
        status = CFITSIO_FAIL(cfst, f, what);
        goto cleanup;
    }
    if (!inside) {
        for (size_t i = 0; i < total; i++) out[i] = fnan;
        for (long y = 0; y < iny; y++)
            memcpy(out + (size_t)(ay0 - y0 + y) * (size_t)nx + (size_t)(ax0 - x0), tmp + (size_t)y * (size_t)inx,
                   (size_t)inx * sizeof(float));
    }
cleanup:
    free(tmp);
    return status;
}

/* Shared front half of the key readers: reads the key as `dtype` into `buf`.
 * Returns SP_OK with *found set, or an error. Missing/undefined keys honour
 * `required`. */
static int read_key(sp_fits *f, const char *key, int dtype, void *buf, int required, int *found)
{
    int status = SP_OK, cfst = 0;
    if (found) *found = 0;
    SP_CHECK(f && f->fp && key, SP_ERR_INTERNAL, "sp_fits_key: NULL argument");
    fits_read_key(f->fp, dtype, key, buf, NULL, &cfst);
    if (cfst == KEY_NO_EXIST || cfst == VALUE_UNDEFINED) {
        clear_msgs();
        SP_CHECK(!required, SP_ERR_INPUT, "%s[HDU %d]: missing header key %s%s", f->path, f->hdu, key,
                 cfst == VALUE_UNDEFINED ? " (present but has no value)" : "");
        goto cleanup;
    }
    if (cfst) {
        char raw[FLEN_VALUE] = "";
        int c2 = 0;
        clear_msgs();
        fits_read_keyword(f->fp, key, raw, NULL, &c2);
        clear_msgs();
        status = SP_FAIL(SP_ERR_INPUT, "%s[HDU %d]: header key %s = %s is not a valid %s (cfitsio error %d)",
                         f->path, f->hdu, key, raw, dtype == TSTRING ? "string" : "number", cfst);
        goto cleanup;
    }
    if (found) *found = 1;
cleanup:
    return status;
}

int sp_fits_key_double(sp_fits *f, const char *key, int required, double *val, int *found)
{
    int status = SP_OK, fnd = 0;
    double v = NAN;
    SP_TRY(read_key(f, key, TDOUBLE, &v, required, &fnd));
    if (fnd) {
        SP_CHECK(isfinite(v), SP_ERR_INPUT, "%s[HDU %d]: header key %s is not a finite number", f->path, f->hdu,
                 key);
        if (val) *val = v;
    }
    if (found) *found = fnd;
cleanup:
    return status;
}

int sp_fits_key_long(sp_fits *f, const char *key, int required, long *val, int *found)
{
    int status = SP_OK, fnd = 0;
    double v = NAN;
    /* read as double so a value like 1.5 is rejected rather than silently truncated */
    SP_TRY(read_key(f, key, TDOUBLE, &v, required, &fnd));
    if (fnd) {
        SP_CHECK(isfinite(v) && v == floor(v) && fabs(v) < 9.0e18, SP_ERR_INPUT,
                 "%s[HDU %d]: header key %s = %.17g is not an integer", f->path, f->hdu, key, v);
        if (val) *val = (long)v;
    }
    if (found) *found = fnd;
cleanup:
    return status;
}

int sp_fits_key_string(sp_fits *f, const char *key, int required, char *val, size_t n, int *found)
{
    int status = SP_OK, fnd = 0;
    char buf[FLEN_VALUE] = "";
    SP_TRY(read_key(f, key, TSTRING, buf, required, &fnd));
    if (fnd && val) {
        size_t len = strlen(buf);
        SP_CHECK(len < n, SP_ERR_INPUT, "%s[HDU %d]: header key %s = '%s' is longer than %zu characters", f->path,
                 f->hdu, key, buf, n ? n - 1 : 0);
        memcpy(val, buf, len + 1);
    }
    if (found) *found = fnd;
cleanup:
    return status;
}

int sp_fits_header(sp_fits *f, char **hdr, int *nkeys)
{
    int status = SP_OK, cfst = 0;
    char *h = NULL;
    SP_CHECK(f && f->fp && hdr, SP_ERR_INTERNAL, "sp_fits_header: NULL argument");
    *hdr = NULL;
    int n = 0;
    if (fits_hdr2str(f->fp, 0, NULL, 0, &h, &n, &cfst)) {
        status = CFITSIO_FAIL(cfst, f, "cannot read the header");
        h = NULL;
        goto cleanup;
    }
    /* hand back plain malloc'd memory so callers free() it as documented */
    size_t len = strlen(h);
    *hdr = malloc(len + 1);
    SP_CHECK(*hdr, SP_ERR_NOMEM, "out of memory copying the header of %s", f->path);
    memcpy(*hdr, h, len + 1);
    if (nkeys) *nkeys = n;
cleanup:
    if (h) {
        int c2 = 0;
        fits_free_memory(h, &c2);
    }
    return status;
}

/* CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320), table built once. */
static uint32_t crc_table[256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;
static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

int sp_fits_header_checksum(sp_fits *f, unsigned long *sum)
{
    int status = SP_OK, n = 0;
    char *h = NULL;
    SP_CHECK(sum, SP_ERR_INTERNAL, "sp_fits_header_checksum: NULL argument");
    SP_TRY(sp_fits_header(f, &h, &n));
    pthread_once(&crc_once, crc_init);
    uint32_t c = 0xFFFFFFFFu;
    for (const unsigned char *p = (const unsigned char *)h; *p; p++) c = crc_table[(c ^ *p) & 0xFF] ^ (c >> 8);
    *sum = (unsigned long)(c ^ 0xFFFFFFFFu);
cleanup:
    free(h);
    return status;
}

/* ---- writing ------------------------------------------------------------- */

int sp_fits_create(const char *path, long nx, long ny, sp_fits **out)
{
    int status = SP_OK, cfst = 0;
    sp_fits *f = NULL;
    SP_CHECK(path && out, SP_ERR_INTERNAL, "sp_fits_create: NULL argument");
    *out = NULL;
    SP_CHECK(nx > 0 && ny > 0, SP_ERR_INPUT, "%s: cannot create a %ld x %ld image", path, nx, ny);
    SP_ALLOC(f, 1);
    f->fd = -1;
    f->path = dupstr(path);
    size_t tl = strlen(path) + 32;
    f->tmppath = malloc(tl);
    SP_CHECK(f->path && f->tmppath, SP_ERR_NOMEM, "out of memory");
    snprintf(f->tmppath, tl, "%s.tmp-%ld", path, (long)getpid());
    f->hdu = 1;
    f->naxis = 2;
    f->nx = nx;
    f->ny = ny;
    f->writing = 1;
    unlink(f->tmppath); /* a leftover from a crashed process with our pid */

    if (fits_create_diskfile(&f->fp, f->tmppath, &cfst)) {
        f->fp = NULL;
        int e = errno;
        clear_msgs();
        status = SP_FAIL(SP_ERR_IO, "%s: cannot create FITS file (temporary %s): cfitsio error %d%s%s", path,
                         f->tmppath, cfst, e ? ", " : "", e ? strerror(e) : "");
        goto cleanup;
    }
    long naxes[2] = {nx, ny};
    if (fits_create_img(f->fp, FLOAT_IMG, 2, naxes, &cfst)) {
        status = CFITSIO_FAIL(cfst, f, "cannot create the image HDU");
        goto cleanup;
    }
    *out = f;
    f = NULL;
cleanup:
    if (f) sp_fits_abort(&f);
    return status;
}

static int check_writing(const sp_fits *f, const char *what)
{
    if (!f || !f->fp || !f->writing)
        return SP_FAIL(SP_ERR_STATE, "%s: handle is not a file being created with sp_fits_create", what);
    return SP_OK;
}

/* cfitsio write failures are mostly the disk (full, quota, removed): report as I/O. */
static int write_fail(sp_fits *f, int cfst, const char *what)
{
    int code = (cfst == WRITE_ERROR || cfst == FILE_NOT_CREATED) ? SP_ERR_IO : SP_ERR_FITS;
    return cfitsio_fail(code, cfst, __FILE__, __LINE__, f->path, f->hdu, what);
}

int sp_fits_write_key_double(sp_fits *f, const char *key, double val, const char *comment)
{
    int status = SP_OK, cfst = 0;
    SP_TRY(check_writing(f, "sp_fits_write_key_double"));
    SP_CHECK(isfinite(val), SP_ERR_INPUT, "%s: cannot write non-finite value for header key %s", f->path, key);
    /* -17: G format with 17 significant digits, so doubles round-trip exactly */
    if (fits_update_key_dbl(f->fp, key, val, -17, comment, &cfst)) status = write_fail(f, cfst, key);
cleanup:
    return status;
}

int sp_fits_write_key_long(sp_fits *f, const char *key, long val, const char *comment)
{
    int status = SP_OK, cfst = 0;
    SP_TRY(check_writing(f, "sp_fits_write_key_long"));
    if (fits_update_key_lng(f->fp, key, (LONGLONG)val, comment, &cfst)) status = write_fail(f, cfst, key);
cleanup:
    return status;
}

int sp_fits_write_key_string(sp_fits *f, const char *key, const char *val, const char *comment)
{
    int status = SP_OK, cfst = 0;
    SP_TRY(check_writing(f, "sp_fits_write_key_string"));
    SP_CHECK(val, SP_ERR_INTERNAL, "sp_fits_write_key_string: NULL value for %s", key);
    if (fits_update_key_str(f->fp, key, val, comment, &cfst)) status = write_fail(f, cfst, key);
cleanup:
    return status;
}

/* Cards that describe the HDU structure: cfitsio writes them itself, so a
 * header copied from another file must not repeat them. */
static int structural_card(const char *card)
{
    static const char *names[] = {"SIMPLE  ", "BITPIX  ", "NAXIS   ", "EXTEND  ", "XTENSION",
                                  "PCOUNT  ", "GCOUNT  ", "END     "};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (strncmp(card, names[i], 8) == 0) return 1;
    if (strncmp(card, "NAXIS", 5) == 0 && card[5] >= '0' && card[5] <= '9') return 1;
    if (strncmp(card, "END", 3) == 0) {
        for (int i = 3; i < 80 && card[i]; i++)
            if (card[i] != ' ') return 0;
        return 1;
    }
    return 0;
}

int sp_fits_write_cards(sp_fits *f, const char *cards, int ncards)
{
    int status = SP_OK, cfst = 0;
    SP_TRY(check_writing(f, "sp_fits_write_cards"));
    SP_CHECK(cards && ncards >= 0, SP_ERR_INTERNAL, "sp_fits_write_cards: NULL cards");
    for (int i = 0; i < ncards; i++) {
        char card[81];
        const char *src = cards + (size_t)i * 80;
        size_t len = strnlen(src, 80);
        memcpy(card, src, len);
        card[len] = '\0';
        if (len == 0) break; /* string shorter than ncards*80: stop at its end */
        if (structural_card(card)) continue;
        if (fits_write_record(f->fp, card, &cfst)) {
            status = write_fail(f, cfst, "cannot write header card");
            break;
        }
    }
cleanup:
    return status;
}

int sp_fits_write_rows(sp_fits *f, long y0, long ny, const float *data)
{
    int status = SP_OK, cfst = 0;
    SP_TRY(check_writing(f, "sp_fits_write_rows"));
    SP_CHECK(data && y0 >= 0 && ny >= 0 && y0 + ny <= f->ny, SP_ERR_INTERNAL,
             "%s: rows [%ld, %ld) outside the image of %ld rows", f->path, y0, y0 + ny, f->ny);
    if (ny == 0) goto cleanup;
    /* cfitsio's write API takes a non-const buffer but does not modify it for TFLOAT */
    if (fits_write_img(f->fp, TFLOAT, (LONGLONG)y0 * f->nx + 1, (LONGLONG)ny * f->nx, (void *)(uintptr_t)data,
                       &cfst))
        status = write_fail(f, cfst, "cannot write image rows");
cleanup:
    return status;
}

int sp_fits_commit(sp_fits **fp)
{
    int status = SP_OK, cfst = 0;
    sp_fits *f = fp ? *fp : NULL;
    /* not ours to free: report and leave the handle alone */
    if (check_writing(f, "sp_fits_commit")) return SP_ERR_STATE;
    fits_close_file(f->fp, &cfst);
    f->fp = NULL;
    if (cfst) status = write_fail(f, cfst, "cannot finish writing");
    if (status) goto cleanup;
    /* flush to disk before the rename so a crash cannot leave an empty file at path */
    int fd = open(f->tmppath, O_RDONLY);
    SP_CHECK(fd >= 0, SP_ERR_IO, "%s: cannot reopen temporary %s: %s", f->path, f->tmppath, strerror(errno));
    int syncerr = fsync(fd) != 0 ? errno : 0;
    close(fd);
    SP_CHECK(!syncerr, SP_ERR_IO, "%s: cannot flush %s to disk: %s", f->path, f->tmppath, strerror(syncerr));
    SP_CHECK(rename(f->tmppath, f->path) == 0, SP_ERR_IO, "%s: cannot move %s into place: %s", f->path,
             f->tmppath, strerror(errno));
    free(f->tmppath);
    f->tmppath = NULL;
cleanup:
    {
        if (f->tmppath) unlink(f->tmppath);
        free(f->tmppath);
        free(f->path);
        free(f);
        *fp = NULL;
    }
    return status;
}

void sp_fits_abort(sp_fits **fp)
{
    if (!fp || !*fp) return;
    sp_fits *f = *fp;
    if (f->fp) {
        int cfst = 0;
        fits_close_file(f->fp, &cfst);
        clear_msgs();
    }
    if (f->tmppath) unlink(f->tmppath);
    free(f->tmppath);
    free(f->path);
    free(f);
    *fp = NULL;
}

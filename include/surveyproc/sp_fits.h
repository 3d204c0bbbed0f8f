/* sp_fits.h — FITS image access through cfitsio: subset reads of one image HDU,
 * typed header keys, and atomic image writes.
 *
 * Pixel convention everywhere in surveyproc: 0-based C indices, pixel (x, y)
 * is data[y * nx + x]; FITS pixel (1,1) is our (0,0), and pixel centres are at
 * integer coordinates.
 *
 * Thread safety: one sp_fits handle must be used by one thread at a time;
 * different handles (even on the same file) are independent and may read in
 * parallel (cfitsio is built reentrant and does not share buffers between
 * handles). When writing, keys may come before or after the rows (before is
 * cheaper: cfitsio then need not move the data).
 */
#ifndef SP_FITS_H
#define SP_FITS_H

#include <stddef.h>

typedef struct sp_fits sp_fits;

/* Open `path` read-only at its primary HDU if that holds a 2-D image, else the
 * first 2-D image extension (tile-compressed images count; extra axes of length
 * 1, e.g. NAXIS3 = 1, are accepted). The path is taken literally (no cfitsio
 * extended syntax). Errors: SP_ERR_IO (missing/unreadable), SP_ERR_FITS
 * (not FITS, truncated — the data unit is checked against the file size here —
 * or no 2-D image) — message names the file and HDU and includes cfitsio's text. */
int sp_fits_open(const char *path, sp_fits **f);
void sp_fits_close(sp_fits **f); /* sets *f = NULL; safe on NULL */

const char *sp_fits_path(const sp_fits *f);
int sp_fits_hdu(const sp_fits *f); /* 1-based HDU number (cfitsio convention) */
void sp_fits_shape(const sp_fits *f, long *nx, long *ny);

/* Read the rectangle [x0, x0+nx) x [y0, y0+ny) (0-based) as float into out
 * (nx*ny, row-major). Parts outside the image are filled with NaN. BLANK/null
 * pixels become NaN. Returns SP_ERR_FITS with the file/HDU on failure (e.g. a
 * truncated file), SP_ERR_IO on a read error.
 *
 * Two routes, same pixels: a plain uncompressed image (BITPIX 8/16/32 without
 * BLANK, or -32/-64 without BSCALE/BZERO, in a file that is not gzip'ed) is read
 * "directly": pread(2) of the ROI rows into a small buffer, byte swap and
 * conversion into out, bit-identical to what cfitsio's fits_read_subset with a
 * NaN null value returns (NaN/Inf -> NaN, zero/denormal floats -> +0, integers
 * (float)(v * BSCALE + BZERO)); tests/unit/test_fits.c compares the two over
 * every BITPIX. Everything else (tile-compressed, gzip, BLANK, scaled floats)
 * goes through fits_read_subset. */
int sp_fits_read_subset(sp_fits *f, long x0, long y0, long nx, long ny, float *out);

/* Process-wide switch for the direct route of sp_fits_read_subset, for tests
 * and benchmarks (default on; affects handles opened afterwards; call before
 * threads open files). Returns the previous setting. */
int sp_fits_set_direct(int enable);
/* 1 if reads of this handle take the direct route. */
int sp_fits_direct(const sp_fits *f);

/* Header keys. `required`: 1 -> a missing key is SP_ERR_INPUT with the message
 * "FILE[HDU n]: missing header key KEY", 0 -> *found=0 and SP_OK (found may be NULL
 * when required). */
int sp_fits_key_double(sp_fits *f, const char *key, int required, double *val, int *found);
int sp_fits_key_long(sp_fits *f, const char *key, int required, long *val, int *found);
int sp_fits_key_string(sp_fits *f, const char *key, int required, char *val, size_t n, int *found);

/* The whole header of the current HDU as one string of 80-char cards (for
 * wcslib). *hdr is malloc'd; free() it. */
int sp_fits_header(sp_fits *f, char **hdr, int *nkeys);

/* CRC-32 (IEEE 802.3) of the header text as sp_fits_header() returns it:
 * a stable identity for resume checks (data are not included). */
int sp_fits_header_checksum(sp_fits *f, unsigned long *sum);

/* ---- writing ------------------------------------------------------------- */

/* Create a 2-D float32 image. The file is written to "path.tmp-PID" and renamed
 * to `path` by sp_fits_commit(), so a crash never leaves a half-written file at
 * `path`. Overwrites an existing `path` at commit. */
int sp_fits_create(const char *path, long nx, long ny, sp_fits **f);
int sp_fits_write_key_double(sp_fits *f, const char *key, double val, const char *comment);
int sp_fits_write_key_long(sp_fits *f, const char *key, long val, const char *comment);
int sp_fits_write_key_string(sp_fits *f, const char *key, const char *val, const char *comment);
/* Append raw header cards (e.g. a WCS header from sp_wcs_to_header): 80-char cards.
 * Structural cards (SIMPLE, BITPIX, NAXIS*, EXTEND, XTENSION, PCOUNT, GCOUNT, END)
 * are skipped, so a header from sp_fits_header() can be copied in. */
int sp_fits_write_cards(sp_fits *f, const char *cards, int ncards);
/* Write rows [y0, y0+ny) of the image from data (nx*ny floats). */
int sp_fits_write_rows(sp_fits *f, long y0, long ny, const float *data);
/* Flush (fsync), close and rename into place; frees *f and sets it NULL. On
 * failure removes the temp file (and still frees *f). SP_ERR_STATE, leaving *f
 * alone, if *f is not a handle from sp_fits_create. Write errors (disk full)
 * are SP_ERR_IO. */
int sp_fits_commit(sp_fits **f);
/* Abandon a file being created: close and remove the temp file. Safe on NULL.
 * sp_fits_close() on a handle being written does the same. */
void sp_fits_abort(sp_fits **f);

#endif

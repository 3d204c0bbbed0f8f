/* export.c — store tables to FITS binary tables and CSV (see sp_export.h). */
#include "surveyproc/sp_export.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_log.h"
#include "surveyproc/sp_prof.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <fitsio.h>
#include <fnmatch.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#define EXPORT_MAX_CHUNK_BYTES (64L << 20)
#define EXPORT_DEFAULT_CHUNK 65536L

int sp_export_format_parse(const char *s, sp_export_format *f)
{
    if (s && (!strcasecmp(s, "fits") || !strcasecmp(s, "fit"))) {
        *f = SP_EXPORT_FITS;
        return SP_OK;
    }
    if (s && !strcasecmp(s, "csv")) {
        *f = SP_EXPORT_CSV;
        return SP_OK;
    }
    return SP_FAIL(SP_ERR_CONFIG, "export format '%s' is not known (allowed: fits, csv)", s ? s : "(none)");
}

const char *sp_export_format_ext(sp_export_format f) { return f == SP_EXPORT_CSV ? "csv" : "fits"; }

/* ---- column selection ----------------------------------------------------------- */

/* Case-insensitive Levenshtein distance (names are short). */
static int edit_distance(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    if (la > 120 || lb > 120) return 1000;
    int d[121][121];
    for (size_t i = 0; i <= la; i++) d[i][0] = (int)i;
    for (size_t j = 0; j <= lb; j++) d[0][j] = (int)j;
    for (size_t i = 1; i <= la; i++)
        for (size_t j = 1; j <= lb; j++) {
            int c = tolower((unsigned char)a[i - 1]) != tolower((unsigned char)b[j - 1]);
            int v = d[i - 1][j] + 1;
            if (d[i][j - 1] + 1 < v) v = d[i][j - 1] + 1;
            if (d[i - 1][j - 1] + c < v) v = d[i - 1][j - 1] + c;
            d[i][j] = v;
        }
    return d[la][lb];
}

/* "A, B or C" of the closest names to `want` (at most 3), or "" if none is close. */
static void suggest(const sp_h5_table_info *info, const char *want, char *out, size_t n)
{
    int best[3] = {-1, -1, -1}, bd[3] = {1 << 30, 1 << 30, 1 << 30};
    int lim = (int)strlen(want) / 3;
    if (lim < 2) lim = 2;
    for (int c = 0; c < info->ncol; c++) {
        int d = edit_distance(want, info->cols[c].name);
        if (d > lim && !strcasestr(info->cols[c].name, want)) continue;
        if (d > lim) d = lim + 1; /* substring matches rank after close spellings */
        for (int k = 0; k < 3; k++)
            if (d < bd[k]) {
                for (int m = 2; m > k; m--) {
                    bd[m] = bd[m - 1];
                    best[m] = best[m - 1];
                }
                bd[k] = d;
                best[k] = c;
                break;
            }
    }
    out[0] = '\0';
    for (int k = 0; k < 3 && best[k] >= 0; k++) {
        size_t l = strlen(out);
        snprintf(out + l, n - l, "%s%s", k == 0 ? "" : (k == 2 || best[k + 1 < 3 ? k + 1 : 2] < 0) ? " or " : ", ",
                 info->cols[best[k]].name);
    }
}

int sp_export_select(const sp_h5_table_info *info, const char *columns, int **sel_out, int *nsel_out)
{
    int status = SP_OK;
    int *sel = NULL, nsel = 0;
    char *buf = NULL;
    unsigned char *taken = NULL;
    SP_ALLOC(sel, info->ncol > 0 ? info->ncol : 1);
    SP_ALLOC(taken, info->ncol > 0 ? info->ncol : 1);
    if (!columns || !columns[0]) {
        for (int c = 0; c < info->ncol; c++) sel[nsel++] = c;
        goto done;
    }
    SP_ALLOC(buf, strlen(columns) + 1);
    strcpy(buf, columns);
    char *save = NULL;
    for (char *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        while (isspace((unsigned char)*tok)) tok++;
        char *e = tok + strlen(tok);
        while (e > tok && isspace((unsigned char)e[-1])) *--e = '\0';
        if (!*tok) continue;
        if (strpbrk(tok, "*?[")) {
            int hit = 0;
            for (int c = 0; c < info->ncol; c++)
                if (!fnmatch(tok, info->cols[c].name, 0)) {
                    hit = 1;
                    if (!taken[c]) {
                        taken[c] = 1;
                        sel[nsel++] = c;
                    }
                }
            SP_CHECK(hit, SP_ERR_INPUT, "--columns: the pattern '%s' matches no column of the table (%d columns; "
                     "`surveyproc export STORE --list` shows them)", tok, info->ncol);
            continue;
        }
        int found = -1, nci = 0, ci = -1;
        for (int c = 0; c < info->ncol; c++) {
            if (!strcmp(info->cols[c].name, tok)) found = c;
            if (!strcasecmp(info->cols[c].name, tok)) {
                nci++;
                ci = c;
            }
        }
        if (found < 0 && nci == 1) found = ci;
        if (found < 0) {
            char sug[400];
            suggest(info, tok, sug, sizeof sug);
            SP_CHECK(0, SP_ERR_INPUT, "--columns: unknown column '%s'%s%s%s (`surveyproc export STORE --list` shows "
                     "the %d columns)", tok, sug[0] ? " (did you mean " : "", sug, sug[0] ? "?)" : "", info->ncol);
        }
        SP_CHECK(!taken[found], SP_ERR_INPUT, "--columns: column '%s' is selected twice", info->cols[found].name);
        taken[found] = 1;
        sel[nsel++] = found;
    }
    SP_CHECK(nsel > 0, SP_ERR_INPUT, "--columns '%s' selects no column", columns);
done:
    *sel_out = sel;
    *nsel_out = nsel;
    sel = NULL;
cleanup:
    free(sel);
    free(buf);
    free(taken);
    return status;
}

/* ---- atomic output file ------------------------------------------------------------ */

static int sync_and_rename(const char *tmp, const char *path)
{
    int status = SP_OK;
    int fd = open(tmp, O_RDONLY);
    SP_CHECK(fd >= 0, SP_ERR_IO, "%s: cannot reopen the temporary file %s: %s", path, tmp, strerror(errno));
    int err = fsync(fd) != 0 ? errno : 0;
    close(fd);
    SP_CHECK(!err, SP_ERR_IO, "%s: cannot flush %s to disk: %s", path, tmp, strerror(err));
    SP_CHECK(rename(tmp, path) == 0, SP_ERR_IO, "%s: cannot move %s into place: %s", path, tmp, strerror(errno));
cleanup:
    return status;
}

/* ---- FITS --------------------------------------------------------------------------- */

static int fits_fail(int cfst, const char *path, const char *what)
{
    char txt[FLEN_STATUS] = "", msg[FLEN_ERRMSG] = "", last[FLEN_ERRMSG] = "";
    fits_get_errstatus(cfst, txt);
    while (fits_read_errmsg(msg)) snprintf(last, sizeof last, "%s", msg);
    int code = cfst == FILE_NOT_CREATED || cfst == WRITE_ERROR ? SP_ERR_IO : SP_ERR_FITS;
    return SP_FAIL(code, "%s: %s: cfitsio error %d (%s)%s%s", path, what, cfst, txt, last[0] ? ": " : "", last);
}

#define CF(call, what)                                                                                             \
    do {                                                                                                           \
        call;                                                                                                      \
        if (cfst) {                                                                                                \
            status = fits_fail(cfst, out_path, what);                                                              \
            goto cleanup;                                                                                          \
        }                                                                                                          \
    } while (0)

static uint64_t be64(uint64_t v)
{
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    return __builtin_bswap64(v);
#else
    return v;
#endif
}
static uint32_t be32(uint32_t v)
{
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    return __builtin_bswap32(v);
#else
    return v;
#endif
}
static uint16_t be16(uint16_t v)
{
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    return __builtin_bswap16(v);
#else
    return v;
#endif
}

static const char *tdisp_for(const char *unit)
{
    if (!unit) return NULL;
    if (!strcmp(unit, "deg")) return "F13.8";
    if (!strncmp(unit, "mag", 3)) return "F9.4";
    if (!strcmp(unit, "pix")) return "F10.4";
    return NULL;
}

/* The band zero points of /zp as header keys of the table HDU. */
static void zp_keys(sp_h5 *h, fitsfile *fp)
{
    int ex = 0, cfst = 0;
    long nb = 0;
    char *bands = NULL;
    double *zp = NULL, *ze = NULL;
    long *fl = NULL;
    if (sp_h5_attr_get_str(h, "/", "bands", &bands) == SP_OK)
        fits_write_key_longstr(fp, "BANDS", bands, "bands of the store", &cfst);
    double zpref;
    if (sp_h5_attr_get_double(h, "/", "zp_ref", &zpref) == SP_OK)
        fits_write_key_dbl(fp, "ZP_REF", zpref, 10, "flux unit: flux 1 is AB mag ZP_REF", &cfst);
    if (sp_h5_exists(h, "/zp/bands", &ex) != SP_OK || !ex || sp_h5_table_nrows(h, "/zp/bands", &nb) != SP_OK ||
        nb <= 0 || nb > 999)
        goto done;
    char (*bn)[SP_H5_MAXDIM * 8] = calloc((size_t)nb, sizeof *bn);
    zp = calloc((size_t)nb, sizeof *zp);
    ze = calloc((size_t)nb, sizeof *ze);
    fl = calloc((size_t)nb, sizeof *fl);
    if (bn && zp && ze && fl && sp_h5_table_read_col_str(h, "/zp/bands", "band", 0, nb, (char *)bn, sizeof *bn) == SP_OK &&
        sp_h5_table_read_col_double(h, "/zp/bands", "zp", 0, nb, zp) == SP_OK &&
        sp_h5_table_read_col_double(h, "/zp/bands", "zp_err", 0, nb, ze) == SP_OK &&
        sp_h5_table_read_col_long(h, "/zp/bands", "flag", 0, nb, fl) == SP_OK) {
        for (int b = 0; b < (int)nb; b++) {
            char k[32];
            snprintf(k, sizeof k, "ZPB%d", b + 1);
            fits_write_key_str(fp, k, bn[b], "band of ZPn", &cfst);
            snprintf(k, sizeof k, "ZP%d", b + 1);
            if (isfinite(zp[b])) fits_write_key_dbl(fp, k, zp[b], 8, "zero point: MAG = ZP - 2.5 log10(FLUX)", &cfst);
            else fits_write_key_null(fp, k, "no zero point for this band", &cfst);
            snprintf(k, sizeof k, "ZPE%d", b + 1);
            if (isfinite(ze[b])) fits_write_key_dbl(fp, k, ze[b], 4, "zero-point error (mag)", &cfst);
            else fits_write_key_null(fp, k, "no zero point for this band", &cfst);
            snprintf(k, sizeof k, "ZPF%d", b + 1);
            fits_write_key_lng(fp, k, fl[b], "ZP flag: 1 few stars, 2 no ref mag, 4 over half clipped", &cfst);
        }
    }
    free(bn);
done:
    sp_err_clear();
    free(bands);
    free(zp);
    free(ze);
    free(fl);
}

static int write_fits(sp_h5 *h, const char *table, const sp_h5_table_info *info, const int *sel, int nsel,
                      long chunk, const char *out_path, const char *tmp)
{
    int status = SP_OK, cfst = 0;
    fitsfile *fp = NULL;
    char **ttype = NULL, **tform = NULL, **tunit = NULL, *formbuf = NULL;
    sp_h5_col *spec = NULL;
    size_t *off = NULL, rowsize = 0;
    unsigned char *rows = NULL, *fbuf = NULL;
    size_t *foff = NULL, *fwid = NULL, frow = 0;
    long nrows = info->nrows;
    char extname[72];
    if (!strcmp(table, "/catalog")) snprintf(extname, sizeof extname, "CATALOG");
    else {
        snprintf(extname, sizeof extname, "%s", table + 1);
        for (char *p = extname; *p; p++) *p = *p == '/' ? '_' : (char)toupper((unsigned char)*p);
    }
    SP_ALLOC(ttype, nsel);
    SP_ALLOC(tform, nsel);
    SP_ALLOC(tunit, nsel);
    SP_ALLOC(formbuf, (size_t)nsel * 16);
    SP_ALLOC(spec, nsel);
    SP_ALLOC(off, nsel);
    SP_ALLOC(foff, nsel);
    SP_ALLOC(fwid, nsel);
    for (int k = 0; k < nsel; k++) {
        const sp_h5_col *c = &info->cols[sel[k]];
        spec[k] = *c;
        ttype[k] = (char *)c->name;
        tunit[k] = (char *)(c->unit ? c->unit : "");
        tform[k] = formbuf + 16 * k;
        switch (c->type) {
        case SP_H5_F64: strcpy(tform[k], "1D"); break;
        case SP_H5_F32: strcpy(tform[k], "1E"); break;
        case SP_H5_I64: strcpy(tform[k], "1K"); break;
        case SP_H5_I32: strcpy(tform[k], "1J"); break;
        case SP_H5_U8: strcpy(tform[k], "1B"); break;
        case SP_H5_I8: strcpy(tform[k], "1I"); break; /* int16: astropy reads no signed-byte convention */
        case SP_H5_STR: snprintf(tform[k], 16, "%dA", c->len > 1 ? c->len - 1 : 1); break;
        }
        static const size_t width[] = {0, 2, 1, 4, 8, 4, 8, 0}; /* by sp_h5_type (I8 as int16) */
        fwid[k] = c->type == SP_H5_STR ? (size_t)(c->len > 1 ? c->len - 1 : 1) : width[c->type];
        foff[k] = frow;
        frow += fwid[k];
    }
    SP_TRY(sp_h5_table_layout(spec, nsel, off, &rowsize));
    SP_ALLOC(rows, (size_t)chunk * rowsize);
    SP_ALLOC(fbuf, (size_t)chunk * frow);

    unlink(tmp);
    CF(fits_create_diskfile(&fp, tmp, &cfst), "cannot create the file");
    CF(fits_create_img(fp, BYTE_IMG, 0, NULL, &cfst), "cannot write the primary HDU");
    CF(fits_write_key_str(fp, "ORIGIN", "surveyproc " SP_VERSION, "software that wrote this file", &cfst),
       "cannot write a header key");
    CF(fits_write_date(fp, &cfst), "cannot write a header key");
    CF(fits_create_tbl(fp, BINARY_TBL, nrows, nsel, ttype, tform, tunit, extname, &cfst),
       "cannot create the binary table");
    for (int k = 0; k < nsel; k++) {
        const sp_h5_col *c = &info->cols[sel[k]];
        char key[16];
        if (c->description && c->description[0]) {
            char com[FLEN_COMMENT];
            /* the card has 80 chars: "TTYPEn  = 'name' / " leaves 80 - 14 - len(name) for the comment */
            int room = 80 - 14 - (int)strlen(c->name) - 3;
            if (room > 8) {
                snprintf(com, sizeof com, "%.*s", room < FLEN_COMMENT - 1 ? room : FLEN_COMMENT - 1, c->description);
                snprintf(key, sizeof key, "TTYPE%d", k + 1);
                CF(fits_modify_comment(fp, key, com, &cfst), "cannot write a column description");
            }
        }
        if (c->type == SP_H5_I8 || c->type == SP_H5_I32 || c->type == SP_H5_I64) {
            snprintf(key, sizeof key, "TNULL%d", k + 1);
            CF(fits_write_key_lng(fp, key, -1, "store fill value -1: not set", &cfst), "cannot write TNULL");
        }
        const char *td = tdisp_for(c->unit);
        if (td && (c->type == SP_H5_F64 || c->type == SP_H5_F32)) {
            snprintf(key, sizeof key, "TDISP%d", k + 1);
            CF(fits_write_key_str(fp, key, td, "display format", &cfst), "cannot write TDISP");
        }
    }
    CF(fits_write_key_str(fp, "ORIGIN", "surveyproc " SP_VERSION, "software that wrote this file", &cfst),
       "cannot write a header key");
    CF(fits_write_key_longstr(fp, "STORE", sp_h5_path(h), "HDF5 store this table was exported from", &cfst),
       "cannot write a header key");
    CF(fits_write_key_str(fp, "STOREOBJ", table, "object in the store", &cfst), "cannot write a header key");
    if (!strcmp(table, "/catalog")) zp_keys(h, fp);
    CF(fits_write_key_longwarn(fp, &cfst), "cannot write a header key");
    if (cfst) goto cleanup;
    /* cfitsio needs the table structure re-read after the keys above (TNULL, TZERO) */
    CF(fits_set_hdustruc(fp, &cfst), "cannot re-read the table structure");

    /* rows are assembled in FITS layout (big-endian, strings NUL-padded) and
     * written a chunk at a time: one cfitsio call per chunk */
    for (long i0 = 0; i0 < nrows; i0 += chunk) {
        long m = nrows - i0 < chunk ? nrows - i0 : chunk;
        SP_TRY(sp_h5_table_read(h, table, spec, nsel, i0, m, rows));
        memset(fbuf, 0, (size_t)m * frow);
        for (long r = 0; r < m; r++) {
            const unsigned char *src = rows + (size_t)r * rowsize;
            unsigned char *dst = fbuf + (size_t)r * frow;
            for (int k = 0; k < nsel; k++) {
                const unsigned char *p = src + off[k];
                unsigned char *q = dst + foff[k];
                switch (spec[k].type) {
                case SP_H5_F64: case SP_H5_I64: { uint64_t v; memcpy(&v, p, 8); v = be64(v); memcpy(q, &v, 8); } break;
                case SP_H5_F32: case SP_H5_I32: { uint32_t v; memcpy(&v, p, 4); v = be32(v); memcpy(q, &v, 4); } break;
                case SP_H5_U8: *q = *p; break;
                case SP_H5_I8: { int16_t v = (int8_t)*p; uint16_t u = be16((uint16_t)v); memcpy(q, &u, 2); } break;
                case SP_H5_STR: memcpy(q, p, strnlen((const char *)p, fwid[k])); break;
                }
            }
        }
        CF(fits_write_tblbytes(fp, i0 + 1, 1, (LONGLONG)m * (LONGLONG)frow, fbuf, &cfst), "cannot write table rows");
        sp_prof_bytes((double)m * (double)rowsize);
    }
    CF(fits_close_file(fp, &cfst), "cannot close the file (disk full?)");
    fp = NULL;
    SP_TRY(sync_and_rename(tmp, out_path));
cleanup:
    if (fp) {
        int s2 = 0;
        fits_close_file(fp, &s2);
    }
    free(ttype);
    free(tform);
    free(tunit);
    free(formbuf);
    free(spec);
    free(off);
    free(rows);
    free(fbuf);
    free(foff);
    free(fwid);
    return status;
}

/* ---- CSV ---------------------------------------------------------------------------- */

/* A growable text buffer; formatting threads each fill their own. */
typedef struct {
    char *p;
    size_t n, cap;
    int oom;
} strbuf;

static char *sb_room(strbuf *b, size_t k)
{
    if (b->n + k > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->n + k) cap *= 2;
        char *q = realloc(b->p, cap);
        if (!q) {
            b->oom = 1;
            return NULL;
        }
        b->p = q;
        b->cap = cap;
    }
    return b->p + b->n;
}

static void sb_put(strbuf *b, const char *s, size_t k)
{
    char *q = sb_room(b, k);
    if (!q) return;
    memcpy(q, s, k);
    b->n += k;
}

static void sb_putc(strbuf *b, char c) { sb_put(b, &c, 1); }

/* Shortest text that reads back as the same double (15, 16 or 17 digits). */
static void put_double(strbuf *b, double v)
{
    if (isnan(v)) return; /* empty field */
    if (isinf(v)) {
        sb_put(b, v > 0 ? "inf" : "-inf", v > 0 ? 3 : 4);
        return;
    }
    char t[40];
    int len = 0;
    for (int p = 15; p <= 17; p++) {
        len = snprintf(t, sizeof t, "%.*g", p, v);
        if (p == 17 || strtod(t, NULL) == v) break;
    }
    sb_put(b, t, (size_t)len);
}

static void put_float(strbuf *b, float v)
{
    if (isnan(v)) return;
    if (isinf(v)) {
        sb_put(b, v > 0 ? "inf" : "-inf", v > 0 ? 3 : 4);
        return;
    }
    char t[32];
    int len = 0;
    for (int p = 6; p <= 9; p++) {
        len = snprintf(t, sizeof t, "%.*g", p, (double)v);
        if (p == 9 || strtof(t, NULL) == v) break;
    }
    sb_put(b, t, (size_t)len);
}

static void put_long(strbuf *b, long long v)
{
    char t[24];
    int len = snprintf(t, sizeof t, "%lld", v);
    sb_put(b, t, (size_t)len);
}

static void put_string(strbuf *b, const char *s, size_t maxlen)
{
    size_t n = strnlen(s, maxlen);
    int quote = n > 0 && (isspace((unsigned char)s[0]) || isspace((unsigned char)s[n - 1]));
    for (size_t i = 0; i < n && !quote; i++) quote = s[i] == ',' || s[i] == '"' || s[i] == '\n' || s[i] == '\r';
    if (!quote) {
        sb_put(b, s, n);
        return;
    }
    sb_putc(b, '"');
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '"') sb_putc(b, '"');
        sb_putc(b, s[i]);
    }
    sb_putc(b, '"');
}

static void format_rows(strbuf *b, const unsigned char *rows, long r0, long r1, size_t rowsize, const sp_h5_col *spec,
                        const size_t *off, int nsel)
{
    for (long r = r0; r < r1; r++) {
        const unsigned char *row = rows + (size_t)r * rowsize;
        for (int k = 0; k < nsel; k++) {
            const void *p = row + off[k];
            if (k) sb_putc(b, ',');
            switch (spec[k].type) {
            case SP_H5_F64: { double v; memcpy(&v, p, 8); put_double(b, v); } break;
            case SP_H5_F32: { float v; memcpy(&v, p, 4); put_float(b, v); } break;
            case SP_H5_I64: { int64_t v; memcpy(&v, p, 8); put_long(b, (long long)v); } break;
            case SP_H5_I32: { int32_t v; memcpy(&v, p, 4); put_long(b, v); } break;
            case SP_H5_U8: put_long(b, *(const uint8_t *)p); break;
            case SP_H5_I8: put_long(b, *(const int8_t *)p); break;
            case SP_H5_STR: put_string(b, p, (size_t)spec[k].len); break;
            }
        }
        sb_putc(b, '\n');
    }
}

#define CSV_MAX_THREADS 64

static int write_csv(sp_h5 *h, const char *table, const sp_h5_table_info *info, const int *sel, int nsel,
                     long chunk, const char *out_path, const char *tmp)
{
    int status = SP_OK;
    FILE *f = NULL;
    sp_h5_col *spec = NULL;
    size_t *off = NULL, rowsize = 0;
    unsigned char *rows = NULL;
    strbuf sb[CSV_MAX_THREADS];
    memset(sb, 0, sizeof sb);
    long nrows = info->nrows;
    int nt = omp_get_max_threads();
    if (nt > CSV_MAX_THREADS) nt = CSV_MAX_THREADS;
    if (nt < 1) nt = 1;
    SP_ALLOC(spec, nsel);
    SP_ALLOC(off, nsel);
    for (int k = 0; k < nsel; k++) spec[k] = info->cols[sel[k]];
    SP_TRY(sp_h5_table_layout(spec, nsel, off, &rowsize));
    SP_ALLOC(rows, (size_t)chunk * rowsize);
    f = fopen(tmp, "w");
    SP_CHECK(f, SP_ERR_IO, "%s: cannot create %s: %s", out_path, tmp, strerror(errno));
    for (int k = 0; k < nsel; k++) {
        if (k) sb_putc(&sb[0], ',');
        put_string(&sb[0], spec[k].name, strlen(spec[k].name));
    }
    sb_putc(&sb[0], '\n');
    SP_CHECK(!sb[0].oom, SP_ERR_NOMEM, "out of memory formatting CSV");
    fwrite(sb[0].p, 1, sb[0].n, f);
    for (long i0 = 0; i0 < nrows; i0 += chunk) {
        long m = nrows - i0 < chunk ? nrows - i0 : chunk;
        SP_TRY(sp_h5_table_read(h, table, spec, nsel, i0, m, rows));
        /* text formatting (the slow part) in parallel over row blocks, written in order */
        int nb = m >= 4096 ? nt : 1;
#pragma omp parallel for num_threads(nb) schedule(static, 1)
        for (int t = 0; t < nb; t++) {
            sb[t].n = 0;
            format_rows(&sb[t], rows, m * t / nb, m * (t + 1) / nb, rowsize, spec, off, nsel);
        }
        for (int t = 0; t < nb; t++) {
            SP_CHECK(!sb[t].oom, SP_ERR_NOMEM, "out of memory formatting CSV");
            fwrite(sb[t].p, 1, sb[t].n, f);
        }
        sp_prof_bytes((double)m * (double)rowsize);
        SP_CHECK(!ferror(f), SP_ERR_IO, "%s: cannot write %s: %s", out_path, tmp, strerror(errno));
    }
    SP_CHECK(fflush(f) == 0 && !ferror(f), SP_ERR_IO, "%s: cannot write %s: %s", out_path, tmp, strerror(errno));
    int ce = fclose(f);
    f = NULL;
    SP_CHECK(ce == 0, SP_ERR_IO, "%s: cannot close %s: %s", out_path, tmp, strerror(errno));
    SP_TRY(sync_and_rename(tmp, out_path));
cleanup:
    if (f) fclose(f);
    for (int t = 0; t < CSV_MAX_THREADS; t++) free(sb[t].p);
    free(spec);
    free(off);
    free(rows);
    return status;
}

/* ---- entry points ------------------------------------------------------------------- */

int sp_export_h5(sp_h5 *h, const char *out_path, const sp_export_opts *o, long *nrows)
{
    int status = SP_OK;
    sp_h5_table_info info = {0};
    int *sel = NULL, nsel = 0;
    char *tmp = NULL;
    const char *table = o->table && o->table[0] ? o->table : "/catalog";
    double t0 = sp_wtime();
    if (nrows) *nrows = 0;
    SP_CHECK(out_path && out_path[0], SP_ERR_INTERNAL, "sp_export_h5: no output path");
    status = sp_h5_table_describe(h, table, &info);
    if (status != SP_OK) {
        sp_err_context("export");
        goto cleanup;
    }
    SP_TRY(sp_export_select(&info, o->columns, &sel, &nsel));
    /* chunk: default rows, capped by bytes */
    size_t rowsize = 0;
    {
        size_t *off = NULL;
        sp_h5_col *spec = NULL;
        SP_ALLOC(off, nsel);
        spec = calloc((size_t)nsel, sizeof *spec);
        if (!spec) {
            free(off);
            SP_CHECK(0, SP_ERR_NOMEM, "out of memory");
        }
        for (int k = 0; k < nsel; k++) spec[k] = info.cols[sel[k]];
        status = sp_h5_table_layout(spec, nsel, off, &rowsize);
        free(off);
        free(spec);
        SP_TRY(status);
    }
    long chunk = o->chunk_rows > 0 ? o->chunk_rows : EXPORT_DEFAULT_CHUNK;
    const char *ev = getenv("SP_EXPORT_CHUNK_ROWS"); /* tests: exercise chunk boundaries */
    if (o->chunk_rows <= 0 && ev && atol(ev) > 0) chunk = atol(ev);
    if ((double)chunk * (double)rowsize > (double)EXPORT_MAX_CHUNK_BYTES)
        chunk = (long)(EXPORT_MAX_CHUNK_BYTES / (long)(rowsize > 0 ? rowsize : 1));
    if (chunk < 1) chunk = 1;
    if (info.nrows > 0 && chunk > info.nrows) chunk = info.nrows;
    size_t tl = strlen(out_path) + 32;
    SP_ALLOC(tmp, tl);
    snprintf(tmp, tl, "%s.tmp-%ld", out_path, (long)getpid());
    if (o->format == SP_EXPORT_FITS) status = write_fits(h, table, &info, sel, nsel, chunk, out_path, tmp);
    else status = write_csv(h, table, &info, sel, nsel, chunk, out_path, tmp);
    if (status != SP_OK) {
        unlink(tmp);
        goto cleanup;
    }
    if (nrows) *nrows = info.nrows;
    SP_INFO("export: %s %s -> %s (%ld rows x %d columns, %.2f s)", sp_h5_path(h), table, out_path, info.nrows, nsel,
            sp_wtime() - t0);
cleanup:
    sp_h5_table_info_free(&info);
    free(sel);
    free(tmp);
    return status;
}

int sp_export_store(const char *store_path, const char *out_path, const sp_export_opts *o, long *nrows)
{
    int status = SP_OK;
    sp_h5 *h = NULL;
    SP_TRY(sp_h5_open(store_path, 0, MPI_COMM_SELF, &h));
    SP_TRY(sp_export_h5(h, out_path, o, nrows));
cleanup:
    sp_h5_close(&h);
    return status;
}

int sp_export_run_outputs(const sp_config *cfg, const char *store_path)
{
    int status = SP_OK;
    char *out = NULL;
    for (int i = 0; i < cfg->outputs.export_formats.n; i++) {
        sp_export_opts o = {0};
        SP_TRY(sp_export_format_parse(cfg->outputs.export_formats.v[i], &o.format));
        const char *base = cfg->outputs.export_basename ? cfg->outputs.export_basename : "catalog";
        size_t l = strlen(base) + 8;
        free(out);
        SP_ALLOC(out, l);
        snprintf(out, l, "%s.%s", base, sp_export_format_ext(o.format));
        status = sp_export_store(store_path, out, &o, NULL);
        if (status != SP_OK) {
            sp_err_context("outputs.export_formats (%s)", cfg->outputs.export_formats.v[i]);
            goto cleanup;
        }
    }
cleanup:
    free(out);
    return status;
}

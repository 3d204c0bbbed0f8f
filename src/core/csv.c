/* csv.c — CSV catalog reader (see sp_csv.h).
 *
 * The file is read once into one buffer and parsed in place: unquoting only
 * ever shortens a field, so every cell is written back into the bytes it came
 * from and NUL-terminated there. Cells are pointers into that buffer, which
 * keeps millions of rows to one allocation plus the pointer table.
 */
#include "surveyproc/sp_csv.h"
#include "surveyproc/sp_error.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

/* The public struct plus what only we need to free. */
typedef struct {
    sp_csv pub;
    char *buf;
} csv_impl;

static int is_space(char c) { return c == ' ' || c == '\t'; }

/* Read a whole file into a NUL-terminated buffer. */
static int slurp(const char *path, char **out, size_t *len)
{
    int status = SP_OK;
    FILE *fp = NULL;
    char *buf = NULL;
    size_t cap = 0, n = 0;
    fp = fopen(path, "rb");
    SP_CHECK(fp, SP_ERR_IO, "%s: cannot open CSV file: %s (check the path in the config)", path, strerror(errno));
    struct stat st;
    if (fstat(fileno(fp), &st) == 0 && S_ISREG(st.st_mode) && st.st_size > 0) cap = (size_t)st.st_size + 1;
    if (cap < 4096) cap = 4096;
    buf = malloc(cap);
    SP_CHECK(buf, SP_ERR_NOMEM, "%s: out of memory reading %zu bytes", path, cap);
    for (;;) {
        if (n + 1 >= cap) { /* grows only for pipes or files changing under us */
            char *nb = realloc(buf, cap * 2);
            SP_CHECK(nb, SP_ERR_NOMEM, "%s: out of memory reading %zu bytes", path, cap * 2);
            buf = nb;
            cap *= 2;
        }
        size_t got = fread(buf + n, 1, cap - 1 - n, fp);
        n += got;
        if (got == 0) break;
    }
    SP_CHECK(!ferror(fp), SP_ERR_IO, "%s: read error: %s", path, strerror(errno));
    buf[n] = '\0';
    *out = buf;
    *len = n;
    buf = NULL;
cleanup:
    if (fp) fclose(fp);
    free(buf);
    return status;
}

/* Growable array of cell pointers and row line numbers. */
typedef struct {
    char **cells;
    size_t ncell, capcell;
    long *lines;
    long nrow, caprow;
} rows_t;

static int push_cell(rows_t *r, char *c)
{
    if (r->ncell == r->capcell) {
        size_t nc = r->capcell ? r->capcell * 2 : 1024;
        char **p = realloc(r->cells, nc * sizeof *p);
        if (!p) return SP_FAIL(SP_ERR_NOMEM, "out of memory growing the CSV cell table to %zu cells", nc);
        r->cells = p;
        r->capcell = nc;
    }
    r->cells[r->ncell++] = c;
    return SP_OK;
}

static int push_line(rows_t *r, long line)
{
    if (r->nrow == r->caprow) {
        long nc = r->caprow ? r->caprow * 2 : 256;
        long *p = realloc(r->lines, (size_t)nc * sizeof *p);
        if (!p) return SP_FAIL(SP_ERR_NOMEM, "out of memory growing the CSV row table to %ld rows", nc);
        r->lines = p;
        r->caprow = nc;
    }
    r->lines[r->nrow++] = line;
    return SP_OK;
}

/* Parse one record starting at *pp (which is at the first byte of a line that
 * is neither blank nor a comment). Pushes its fields, advances *pp past the
 * line end and *line past every newline consumed (quoted fields may span
 * lines). Returns the number of fields in *nf. */
static int parse_record(const char *path, char **pp, char *end, long *line, rows_t *r, int *nf)
{
    int status = SP_OK;
    char *p = *pp;
    long start_line = *line;
    int nfield = 0;
    for (;;) {
        while (p < end && is_space(*p)) p++;
        char *w = p; /* write position for the unquoted value */
        char *cell = p;
        if (p < end && *p == '"') {
            p++;
            cell = w = p - 1; /* value overwrites the opening quote onwards */
            for (;;) {
                SP_CHECK(p < end, SP_ERR_INPUT,
                         "%s:%ld: unterminated quoted field (column %d opens a quote that never closes)", path,
                         start_line, nfield + 1);
                if (*p == '"') {
                    if (p + 1 < end && p[1] == '"') { /* "" -> " */
                        *w++ = '"';
                        p += 2;
                        continue;
                    }
                    p++;
                    break;
                }
                if (*p == '\n') (*line)++;
                *w++ = *p++;
            }
            while (p < end && is_space(*p)) p++;
            SP_CHECK(p >= end || *p == ',' || *p == '\n' || *p == '\r', SP_ERR_INPUT,
                     "%s:%ld: column %d: unexpected text after a closing quote (quote the whole field and "
                     "double any quote inside it)",
                     path, *line, nfield + 1);
        } else {
            while (p < end && *p != ',' && *p != '\n' && *p != '\r') p++;
            w = p;
            while (w > cell && is_space(w[-1])) w--; /* trim trailing blanks */
        }
        char delim = p < end ? *p : '\0';
        *w = '\0'; /* may overwrite the delimiter: it is saved in delim */
        SP_TRY(push_cell(r, cell));
        nfield++;
        if (delim == ',') {
            p++;
            continue;
        }
        /* end of record: CRLF, LF, lone CR or end of buffer */
        if (delim == '\r') {
            p++;
            if (p < end && *p == '\n') p++;
            (*line)++;
        } else if (delim == '\n') {
            p++;
            (*line)++;
        }
        break;
    }
    *pp = p;
    *nf = nfield;
cleanup:
    return status;
}

int sp_csv_read(const char *path, sp_csv **out)
{
    int status = SP_OK;
    char *buf = NULL;
    size_t len = 0;
    rows_t r = {0};
    csv_impl *t = NULL;
    SP_CHECK(path && out, SP_ERR_INTERNAL, "sp_csv_read: NULL argument");
    *out = NULL;
    SP_TRY(slurp(path, &buf, &len));
    char *p = buf, *end = buf + len;
    if (len >= 3 && (unsigned char)p[0] == 0xEF && (unsigned char)p[1] == 0xBB && (unsigned char)p[2] == 0xBF)
        p += 3; /* UTF-8 BOM written by spreadsheet programs */

    long line = 1, header_line = 0;
    int ncol = -1;
    while (p < end) {
        /* skip blank and comment lines */
        char *q = p;
        while (q < end && is_space(*q)) q++;
        if (q >= end) break;
        if (*q == '\n' || *q == '\r' || *q == '#') {
            while (q < end && *q != '\n' && *q != '\r') q++;
            if (q < end && *q == '\r') {
                q++;
                if (q < end && *q == '\n') q++;
            } else if (q < end && *q == '\n') {
                q++;
            }
            line++;
            p = q;
            continue;
        }
        long rec_line = line;
        int nf = 0;
        SP_TRY(parse_record(path, &p, end, &line, &r, &nf));
        if (ncol < 0) {
            ncol = nf;
            header_line = rec_line;
            continue;
        }
        SP_CHECK(nf == ncol, SP_ERR_INPUT,
                 "%s:%ld: row has %d field%s but the header (line %ld) has %d columns; check for a missing or "
                 "extra comma, or quote fields that contain commas",
                 path, rec_line, nf, nf == 1 ? "" : "s", header_line, ncol);
        SP_TRY(push_line(&r, rec_line));
    }
    SP_CHECK(ncol > 0, SP_ERR_INPUT, "%s:%ld: empty CSV file: no header line (need e.g. 'ID,RA,DEC')", path,
             line > 1 ? line - 1 : 1);

    /* header checks: names present and unique regardless of case */
    for (int i = 0; i < ncol; i++) {
        SP_CHECK(r.cells[i][0] != '\0', SP_ERR_INPUT, "%s:%ld: column %d of the header has no name", path,
                 header_line, i + 1);
        for (int j = 0; j < i; j++)
            SP_CHECK(strcasecmp(r.cells[i], r.cells[j]) != 0, SP_ERR_INPUT,
                     "%s:%ld: duplicate column name '%s' (columns %d and %d; names are case-insensitive)", path,
                     header_line, r.cells[i], j + 1, i + 1);
    }

    SP_ALLOC(t, 1);
    t->buf = buf;
    buf = NULL;
    t->pub.path = strdup(path);
    SP_CHECK(t->pub.path, SP_ERR_NOMEM, "out of memory");
    t->pub.ncol = ncol;
    t->pub.nrow = r.nrow;
    SP_ALLOC(t->pub.colnames, ncol);
    memcpy(t->pub.colnames, r.cells, (size_t)ncol * sizeof(char *));
    /* the data cells follow the header cells in r.cells: shift them down
     * rather than copy the (possibly large) table */
    memmove(r.cells, r.cells + ncol, (size_t)r.nrow * (size_t)ncol * sizeof(char *));
    t->pub.cells = r.cells;
    r.cells = NULL;
    if (r.nrow == 0) {
        t->pub.lines = r.lines ? r.lines : calloc(1, sizeof(long));
        r.lines = NULL;
        SP_CHECK(t->pub.lines, SP_ERR_NOMEM, "out of memory");
    } else {
        t->pub.lines = r.lines;
        r.lines = NULL;
    }
    *out = &t->pub;
    t = NULL;
cleanup:
    if (t) {
        sp_csv *pt = &t->pub;
        sp_csv_free(&pt);
    }
    free(r.cells);
    free(r.lines);
    free(buf);
    return status;
}

void sp_csv_free(sp_csv **tp)
{
    if (!tp || !*tp) return;
    /* pub is the first member, so the sp_csv pointer is the csv_impl pointer */
    csv_impl *t = (csv_impl *)*tp;
    free(t->pub.path);
    free(t->pub.colnames);
    free(t->pub.cells);
    free(t->pub.lines);
    free(t->buf);
    free(t);
    *tp = NULL;
}

int sp_csv_col(const sp_csv *t, const char *name)
{
    if (!t || !name) return -1;
    for (int i = 0; i < t->ncol; i++)
        if (strcasecmp(t->colnames[i], name) == 0) return i;
    return -1;
}

const char *sp_csv_cell(const sp_csv *t, long row, int col)
{
    if (!t || row < 0 || row >= t->nrow || col < 0 || col >= t->ncol) return NULL;
    return t->cells[(size_t)row * (size_t)t->ncol + (size_t)col];
}

int sp_csv_col_double(const sp_csv *t, int col, double *out)
{
    int status = SP_OK;
    SP_CHECK(t && out, SP_ERR_INTERNAL, "sp_csv_col_double: NULL argument");
    SP_CHECK(col >= 0 && col < t->ncol, SP_ERR_INTERNAL, "%s: column index %d out of range (%d columns)", t->path,
             col, t->ncol);
    for (long i = 0; i < t->nrow; i++) {
        const char *s = t->cells[(size_t)i * (size_t)t->ncol + (size_t)col];
        if (s[0] == '\0' || strcasecmp(s, "nan") == 0) {
            out[i] = NAN;
            continue;
        }
        char *e = NULL;
        errno = 0;
        double v = strtod(s, &e);
        /* strtod also takes hex floats and "inf"; catalogs do not use the
         * former, and the latter is caught later as a bad coordinate/flux */
        SP_CHECK(e != s && *e == '\0', SP_ERR_INPUT, "%s:%ld: column %s: '%s' is not a number", t->path,
                 t->lines[i], t->colnames[col], s);
        SP_CHECK(errno != ERANGE || fabs(v) < 1.0, SP_ERR_INPUT, "%s:%ld: column %s: '%s' is out of range",
                 t->path, t->lines[i], t->colnames[col], s);
        out[i] = v;
    }
cleanup:
    return status;
}

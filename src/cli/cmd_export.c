/* cmd_export.c — `surveyproc export STORE --format fits|csv [--columns A,B] [--out FILE]`:
 * a store table (the /catalog by default) as a FITS binary table or CSV (serial). */
#include "commands.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_export.h"
#include "surveyproc/sp_h5.h"
#include "surveyproc/sp_mpi.h"

#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

static void usage(FILE *f)
{
    fprintf(f,
            "usage: surveyproc export STORE.h5 [--format fits|csv] [--columns A,B,...] [--out FILE]\n"
            "                         [--table /catalog] [--list]\n\n"
            "Writes a table of the store (the catalog by default) as a FITS binary table (EXTNAME CATALOG;\n"
            "TUNITn from the store's units, TNULLn = -1 on integer columns, NaN for missing floats) or as\n"
            "CSV (header row; missing floats as empty fields; strings quoted when needed). Rows are streamed\n"
            "in chunks; the output appears atomically (temporary file, then rename).\n\n"
            "  --format fits|csv   output format (default: from the --out extension, else fits)\n"
            "  --columns LIST      comma-separated column names or shell patterns, in output order,\n"
            "                      e.g. ID,RA,DEC,'MAG_*_fit' (default: every column)\n"
            "  --out FILE          output path (default: the store's path with .fits / .csv)\n"
            "  --table PATH        another table of the store, e.g. /zp/stars, /zp/bands, /cells\n"
            "  --list              print the table's columns (type, unit, description) and exit\n");
}

static const char *type_text(const sp_h5_col *c, char *buf, size_t n)
{
    switch (c->type) {
    case SP_H5_I8: return "int8";
    case SP_H5_U8: return "uint8";
    case SP_H5_I32: return "int32";
    case SP_H5_I64: return "int64";
    case SP_H5_F32: return "float32";
    case SP_H5_F64: return "float64";
    case SP_H5_STR: snprintf(buf, n, "str%d", c->len - 1); return buf;
    }
    return "?";
}

static int list_columns(const char *store, const char *table)
{
    int status = SP_OK;
    sp_h5 *h = NULL;
    sp_h5_table_info info = {0};
    SP_TRY(sp_h5_open(store, 0, MPI_COMM_SELF, &h));
    SP_TRY(sp_h5_table_describe(h, table, &info));
    printf("%s %s: %ld rows, %d columns\n", store, table, info.nrows, info.ncol);
    for (int c = 0; c < info.ncol; c++) {
        char tb[32];
        printf("  %-22s %-8s %-13s %s\n", info.cols[c].name, type_text(&info.cols[c], tb, sizeof tb),
               info.cols[c].unit, info.cols[c].description);
    }
cleanup:
    sp_h5_table_info_free(&info);
    sp_h5_close(&h);
    return status;
}

int sp_cmd_export(int argc, char **argv)
{
    int status = SP_OK, list = 0, have_format = 0;
    const char *store = NULL, *out = NULL, *columns = NULL, *table = "/catalog", *fmt = NULL;
    char *outbuf = NULL;
    sp_export_opts o = {0};
    if (sp_cli_wants_help(argc, argv)) {
        usage(stdout);
        return SP_OK;
    }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--format") && i + 1 < argc) fmt = argv[++i];
        else if (!strncmp(a, "--format=", 9)) fmt = a + 9;
        else if (!strcmp(a, "--columns") && i + 1 < argc) columns = argv[++i];
        else if (!strncmp(a, "--columns=", 10)) columns = a + 10;
        else if (!strcmp(a, "--out") && i + 1 < argc) out = argv[++i];
        else if (!strncmp(a, "--out=", 6)) out = a + 6;
        else if (!strcmp(a, "--table") && i + 1 < argc) table = argv[++i];
        else if (!strncmp(a, "--table=", 8)) table = a + 8;
        else if (!strcmp(a, "--list")) list = 1;
        else if (a[0] == '-') SP_CHECK(0, SP_ERR_CONFIG, "surveyproc export: unknown option '%s' (see --help)", a);
        else if (!store) store = a;
        else SP_CHECK(0, SP_ERR_CONFIG, "surveyproc export: one store expected, got '%s' and '%s'", store, a);
    }
    SP_CHECK(store, SP_ERR_CONFIG, "surveyproc export: missing STORE.h5 (see --help)");
    SP_CHECK(table[0] == '/', SP_ERR_CONFIG, "surveyproc export: --table %s: give the path from the root, e.g. /%s",
             table, table);
    if (sp_mpi_rank() != 0) goto agree; /* serial: under mpirun only rank 0 works */
    if (list) {
        status = list_columns(store, table);
        goto agree;
    }
    if (fmt) {
        status = sp_export_format_parse(fmt, &o.format);
        have_format = status == SP_OK;
    } else if (out) {
        const char *dot = strrchr(out, '.');
        if (dot && !strcasecmp(dot, ".csv")) o.format = SP_EXPORT_CSV;
        have_format = 1;
    } else {
        have_format = 1;
    }
    if (status == SP_OK && have_format && !out) {
        /* default: next to the store, <stem>[_<table>].<ext> */
        size_t l = strlen(store) + strlen(table) + 16;
        outbuf = malloc(l);
        if (!outbuf) status = SP_FAIL(SP_ERR_NOMEM, "out of memory");
        else {
            snprintf(outbuf, l, "%s", store);
            char *dot = strrchr(outbuf, '.'), *slash = strrchr(outbuf, '/');
            if (dot && (!slash || dot > slash)) *dot = '\0';
            if (strcmp(table, "/catalog") != 0) {
                size_t k = strlen(outbuf);
                snprintf(outbuf + k, l - k, "%s", table);
                for (char *p = outbuf + k; *p; p++)
                    if (*p == '/') *p = '_';
            }
            size_t k = strlen(outbuf);
            snprintf(outbuf + k, l - k, ".%s", sp_export_format_ext(o.format));
            out = outbuf;
        }
    }
    if (status == SP_OK) {
        o.table = table;
        o.columns = columns;
        long n = 0;
        status = sp_export_store(store, out, &o, &n);
        if (status == SP_OK) printf("Wrote %s (%ld rows, %s)\n", out, n, sp_export_format_ext(o.format));
    }
agree:
    SP_TRY(sp_mpi_agree(status, MPI_COMM_WORLD));
cleanup:
    free(outbuf);
    return status;
}

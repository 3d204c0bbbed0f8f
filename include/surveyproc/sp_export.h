/* sp_export.h — export a store table (the /catalog by default) as a FITS
 * binary table or CSV, generic over whatever columns the table has.
 *
 * FITS (cfitsio): a primary HDU (header only: origin, store, bands, zp_ref
 * and the zero points of /zp when present) and one BINTABLE extension,
 * EXTNAME = 'CATALOG' (or the table's name), one column per field:
 *     float64 -> D, float32 -> E, int64 -> K, int32 -> J, uint8 -> B,
 *     int8 -> B with TZERO = -128 (signed bytes, the FITS convention),
 *     string char[len] -> (len-1)A;
 * TUNITn from the store's "<col>_unit" attribute; the description as the
 * TTYPEn comment (truncated to fit the card); TNULLn = -1 on signed integer
 * columns (the store's fill value: "not set", e.g. CONVERGED of a source
 * never fitted), so astropy and TOPCAT show those as masked/blank; floats
 * keep IEEE NaN (the FITS null for floating columns); TDISPn for degrees
 * (F13.8), magnitudes (F9.4) and pixels (F10.4).
 *
 * CSV: one header row of column names, then one line per row, "\n" line
 * ends. Floats are written with the shortest text that reads back to the
 * same double (or float), NaN as an EMPTY field (what pandas, astropy and
 * TOPCAT read as missing, and what the seed pipeline's pandas CSVs hold);
 * integers as written in the store (-1 "not set" stays -1); strings verbatim,
 * quoted ("" doubling quotes) when they contain a comma, a quote, a line
 * break or leading/trailing blanks.
 *
 * Streaming: rows are read in chunks (default 65536 rows, at most ~64 MiB),
 * so memory is O(chunk x row size) whatever the table size. Output is
 * atomic: written to "<out>.tmp-<pid>", flushed (fsync) and renamed; on any
 * error the temporary file is removed and <out> is untouched.
 *
 * Not collective: one process reads the store through the serial driver.
 * Thread safety: one export at a time per process (HDF5 is not thread-safe).
 */
#ifndef SP_EXPORT_H
#define SP_EXPORT_H

#include "surveyproc/sp_config.h"
#include "surveyproc/sp_h5.h"

typedef enum { SP_EXPORT_FITS = 0, SP_EXPORT_CSV = 1 } sp_export_format;

typedef struct {
    sp_export_format format;
    const char *table;   /* NULL: "/catalog" */
    const char *columns; /* NULL or "": all, in table order; else comma-separated names or
                            shell patterns ("RA,DEC,FLUX_*_fit"), in the order given; names match
                            exactly, else case-insensitively when that is unique */
    long chunk_rows;     /* 0: automatic (env SP_EXPORT_CHUNK_ROWS overrides, for tests) */
} sp_export_opts;

/* "fits" (or "fit") / "csv", case-insensitive -> *f. SP_ERR_CONFIG naming
 * the allowed values otherwise. */
int sp_export_format_parse(const char *s, sp_export_format *f);
const char *sp_export_format_ext(sp_export_format f); /* "fits", "csv" */

/* Resolve a column selection against a table's columns.
 * Returned: *sel (malloc'd column indices, in output order), *nsel.
 * Errors: SP_ERR_INPUT "unknown column 'FLUX_g_fitt' (did you mean
 * FLUX_g_fit?)" with up to three close names, or a pattern matching nothing;
 * a column selected twice is an error too. */
int sp_export_select(const sp_h5_table_info *info, const char *columns, int **sel, int *nsel);

/* Export a table of an open store (any handle; only independent reads).
 * Given: h, out_path, o. Returned: *nrows (may be NULL) = rows written.
 * Errors: SP_ERR_INPUT (no such table, bad selection), SP_ERR_IO (cannot
 * write out_path, disk full), SP_ERR_FITS, SP_ERR_HDF5, SP_ERR_NOMEM. */
int sp_export_h5(sp_h5 *h, const char *out_path, const sp_export_opts *o, long *nrows);

/* The same on a store path (opened read-only with the serial driver). */
int sp_export_store(const char *store_path, const char *out_path, const sp_export_opts *o, long *nrows);

/* End-of-run exports: for each format in cfg->outputs.export_formats write
 * the whole /catalog to "<outputs.export_basename>.<fits|csv>". Not
 * collective: call it on one rank after the store is closed (and after the
 * zp stage, so the MAG columns are filled). SP_OK when the list is empty. */
int sp_export_run_outputs(const sp_config *cfg, const char *store_path);

#endif

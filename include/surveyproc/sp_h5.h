/* sp_h5.h — the generic (parallel) HDF5 store layer: files, groups, compound
 * tables, N-d arrays and attributes. The pipeline's store layout (/catalog,
 * /cells, /epsf/<band>, ...) is built on top of this; see docs/store-layer.md.
 *
 * Drivers. A handle opened with a communicator of more than one rank uses the
 * MPI-IO driver (H5Pset_fapl_mpio); with MPI_COMM_NULL or a communicator of
 * one rank it uses the plain POSIX (sec2) driver, so serial tools work without
 * mpirun and without MPI_Init (MPI_COMM_NULL). Files are written with HDF5's
 * default (oldest possible) format versions, so h5py, astropy, h5dump and
 * HDF5 >= 1.8 read them.
 *
 * MPI rules (all ranks of the handle's communicator):
 *   COLLECTIVE — every rank calls it, in the same order, with the same
 *     arguments (same path, spec, sizes, attribute values): create, open,
 *     close, flush, group_create, table_create, array_create, attr_set_*.
 *     A collective call returns the same status on every rank: if it fails on
 *     one rank, the others fail too with "rank R: <that rank's message>".
 *   INDEPENDENT — any rank may call it alone, any number of times, in any
 *     order: table/array writes and reads, attribute and metadata reads,
 *     exists, nrows, dims, describe. Ranks must write disjoint rows/elements.
 *     An independent failure is reported only on the rank that saw it.
 * Raw-data writes never change the file's metadata (every dataset is created
 * with its full size and its storage allocated at creation, filled with the
 * fill value), so after sp_h5_flush() the file stays valid on disk whatever
 * happens to the writers later (kill -9 included): unwritten rows read as the
 * fill value.
 *
 * Errors: SP_ERR_IO (missing/unreadable file, not an HDF5 file, disk full),
 * SP_ERR_HDF5 (HDF5 reported an error; the message names the file, the object
 * and HDF5's innermost error), SP_ERR_INPUT (missing object or column, wrong
 * kind of object, index out of range), SP_ERR_INTERNAL (bad arguments),
 * SP_ERR_MPI. HDF5's automatic error printing is turned off by create/open.
 * Disk full: table/array creation first checks the free space on rank 0
 * (needed size vs free bytes; env SP_H5_SKIP_SPACE_CHECK=1 skips it, for
 * tests), and an ENOSPC inside HDF5 is reported as "disk full" too. A rank
 * whose collective call failed waits at most SP_H5_AGREE_TIMEOUT seconds (env,
 * default 60) for ranks that may be blocked inside HDF5, then returns its
 * error; after that the handle must not be used collectively (abort the job).
 *
 * Threads: HDF5 here is built without thread safety. Call sp_h5 functions from
 * one thread at a time per process (e.g. the main thread, outside OpenMP
 * regions).
 *
 * Paths name objects from the root ("/catalog", "/epsf/g"); missing
 * intermediate groups are created by every *_create function.
 */
#ifndef SP_H5_H
#define SP_H5_H

#include <mpi.h>
#include <stddef.h>

typedef struct sp_h5 sp_h5;

#define SP_H5_MAXDIM 8

/* Element types of table columns and arrays. SP_H5_STR is tables only. */
typedef enum {
    SP_H5_I8 = 1, /* int8_t          fill -1   */
    SP_H5_U8,     /* uint8_t         fill 0    */
    SP_H5_I32,    /* int32_t         fill -1   */
    SP_H5_I64,    /* int64_t         fill -1   */
    SP_H5_F32,    /* float           fill NaN  */
    SP_H5_F64,    /* double          fill NaN  */
    SP_H5_STR     /* char[len]       fill ""   (fixed length, NUL-terminated) */
} sp_h5_type;

/* One column of a compound table.
 * name:        member name in the file (unique in the table, no '/' ).
 * type:        element type.
 * len:         SP_H5_STR only: bytes per value including the terminating NUL
 *              (>= 2): a value holds at most len-1 characters. h5py shows it
 *              as numpy dtype 'S<len>'. Ignored for other types.
 * unit:        physical unit ("deg", "pix", "nJy", "mag", ""), may be NULL.
 * description: one line, may be NULL.
 * has_fill, fill: override the default fill value of a numeric column (e.g.
 *              0 for a flag column). Ignored for strings.
 * Stored attributes on the table dataset (readable with h5py as
 * ds.attrs["<name>_unit"] and ds.attrs["<name>_description"]): one scalar
 * UTF-8 string each, written only when the unit / description is non-empty. */
typedef struct {
    const char *name;
    sp_h5_type type;
    int len;
    const char *unit;
    const char *description;
    int has_fill;
    double fill;
} sp_h5_col;

/* ---- files ---------------------------------------------------------------- */

/* COLLECTIVE. Create (truncate if it exists) the HDF5 file `path`. comm: the
 * ranks that will share the file (duplicated internally; MPI_COMM_NULL or a
 * one-rank communicator -> serial sec2 driver). Returns *h (NULL on error).
 * Errors: SP_ERR_IO (directory missing, no permission, disk full), SP_ERR_HDF5. */
int sp_h5_create(const char *path, MPI_Comm comm, sp_h5 **h);

/* COLLECTIVE. Like sp_h5_create, but the file is written as PATH.part and only becomes PATH
 * at sp_h5_commit (a rename by rank 0): a job killed while it lays out the file leaves no
 * half-made PATH, and an existing PATH is replaced only by a complete file. Closing the
 * handle before the commit removes PATH.part. Messages name PATH. Errors: as sp_h5_create. */
int sp_h5_create_atomic(const char *path, MPI_Comm comm, sp_h5 **h);

/* COLLECTIVE. Move the file of sp_h5_create_atomic into place (flush first: what is renamed
 * is what is on disk). No-op for other handles. Errors: SP_ERR_IO (the rename failed). */
int sp_h5_commit(sp_h5 *h);

/* COLLECTIVE. Open an existing file read-only (writable = 0) or read-write.
 * Errors: SP_ERR_IO "missing file" / "not an HDF5 file" / unreadable, SP_ERR_HDF5. */
int sp_h5_open(const char *path, int writable, MPI_Comm comm, sp_h5 **h);

/* COLLECTIVE. Write every cached piece of metadata and data to the file
 * (H5Fflush, then fsync on the serial driver / MPI_File_sync on MPI-IO). Call it after
 * creating all datasets: from then on the file on disk is complete and valid. */
int sp_h5_flush(sp_h5 *h);

/* COLLECTIVE. Flush and close; frees *h and sets it to NULL (no-op on NULL).
 * Returns the close status (a full disk can first show up here). */
int sp_h5_close(sp_h5 **h);

const char *sp_h5_path(const sp_h5 *h);
int sp_h5_writable(const sp_h5 *h);
/* 1 when the MPI-IO driver is in use (communicator of more than one rank). */
int sp_h5_parallel(const sp_h5 *h);
/* Bytes of raw data this rank wrote / read through h (table and array calls). */
void sp_h5_bytes(const sp_h5 *h, double *written, double *read);

/* ---- groups and objects ---------------------------------------------------- */

/* COLLECTIVE. Create group `path` and any missing parents; SP_OK if it exists
 * already as a group (SP_ERR_INPUT if it exists as something else). */
int sp_h5_group_create(sp_h5 *h, const char *path);

/* COLLECTIVE. Remove the object at `path` (a dataset, or a group with
 * everything under it); SP_OK if nothing is there. HDF5 does not give the
 * space back to the file system (h5repack does); fine for small objects that
 * are replaced, such as /zp. */
int sp_h5_delete(sp_h5 *h, const char *path);

/* INDEPENDENT. *exists = 1 if an object exists at `path` (missing parents -> 0). */
int sp_h5_exists(sp_h5 *h, const char *path, int *exists);

/* INDEPENDENT. Shape of a dataset: *ndim and dims[0 .. ndim-1] (dims has room
 * for SP_H5_MAXDIM). */
int sp_h5_dims(sp_h5 *h, const char *path, int *ndim, long *dims);

/* ---- compound tables ------------------------------------------------------- */

/* Memory layout of a row for the spec: offsets[ncol] (byte offset of each
 * column) and *rowsize. Columns are laid out in order, each aligned to its
 * natural alignment (strings to 1) and the row padded to the largest
 * alignment: exactly the layout of a C struct with the same members in the
 * same order (int8_t/uint8_t/int32_t/int64_t/float/double/char[len]), so a
 * caller may use such a struct and check offsetof() against offsets.
 * Validates the spec (names non-empty, unique, no '/', valid types, len >= 2
 * for strings): SP_ERR_INTERNAL with the column named. Not MPI, thread-safe. */
int sp_h5_table_layout(const sp_h5_col *cols, int ncol, size_t *offsets, size_t *rowsize);

/* COLLECTIVE. Create the compound dataset `path` of nrows rows (fixed size,
 * contiguous, storage allocated now and filled with the fill values) and the
 * unit/description attributes. The file stores the columns packed (no
 * padding) in spec order. */
int sp_h5_table_create(sp_h5 *h, const char *path, const sp_h5_col *cols, int ncol, long nrows);

/* INDEPENDENT. Number of rows of a 1-D dataset. */
int sp_h5_table_nrows(sp_h5 *h, const char *path, long *nrows);

/* INDEPENDENT. Write rows [start, start+n) from `rows` (n rows laid out as by
 * sp_h5_table_layout for cols). The spec may be any subset of the table's
 * columns, in any order (matched by name; types converted); with a subset
 * HDF5 reads the rows first and rewrites them whole, so two ranks must not
 * write different columns of the same rows at the same time. */
int sp_h5_table_write(sp_h5 *h, const char *path, const sp_h5_col *cols, int ncol, long start, long n,
                      const void *rows);

/* INDEPENDENT. Write n rows to the row numbers idx[0..n-1] (any order, no
 * duplicates, each in [0, nrows)): row k of `rows` goes to row idx[k]. */
int sp_h5_table_write_rows(sp_h5 *h, const char *path, const sp_h5_col *cols, int ncol, const long *idx,
                           long n, const void *rows);

/* INDEPENDENT. Read rows [start, start+n) (or the rows idx[0..n-1]) into `rows`
 * laid out for cols. cols may be a subset of the file's columns; a column of
 * cols that the file lacks is SP_ERR_INPUT naming it. */
int sp_h5_table_read(sp_h5 *h, const char *path, const sp_h5_col *cols, int ncol, long start, long n,
                     void *rows);
int sp_h5_table_read_rows(sp_h5 *h, const char *path, const sp_h5_col *cols, int ncol, const long *idx,
                          long n, void *rows);

/* INDEPENDENT. Read column `col` of rows [start, start+n) converted to double
 * (any numeric column; integer fill -1 reads as -1.0), to long (integer
 * columns only) or to strings (string columns only; out holds n entries of
 * `width` bytes each, NUL-terminated; width must be >= the column's len). */
int sp_h5_table_read_col_double(sp_h5 *h, const char *path, const char *col, long start, long n, double *out);
int sp_h5_table_read_col_long(sp_h5 *h, const char *path, const char *col, long start, long n, long *out);
int sp_h5_table_read_col_str(sp_h5 *h, const char *path, const char *col, long start, long n, char *out,
                             size_t width);

/* A table's description as found in the file (for generic exporters). */
typedef struct {
    long nrows;
    int ncol;
    sp_h5_col *cols; /* names/units/descriptions are owned by the info ("" when absent) */
} sp_h5_table_info;

/* INDEPENDENT. Describe the compound dataset `path`: columns (types mapped to
 * sp_h5_type; other integer/float sizes -> SP_ERR_INPUT), units and
 * descriptions from the attributes, number of rows. Free with
 * sp_h5_table_info_free(). */
int sp_h5_table_describe(sp_h5 *h, const char *path, sp_h5_table_info *info);
void sp_h5_table_info_free(sp_h5_table_info *info);

/* ---- N-d arrays ------------------------------------------------------------ */

/* COLLECTIVE. Create an N-d dataset (1 <= ndim <= SP_H5_MAXDIM) of a numeric
 * type. chunk: NULL -> contiguous, else chunk dims (each 1 .. dims[i]).
 * Storage is allocated now and filled with *fill (NULL -> the type's default
 * fill: NaN, -1 or 0 for U8). */
int sp_h5_array_create(sp_h5 *h, const char *path, sp_h5_type type, int ndim, const long *dims,
                       const long *chunk, const double *fill);

/* INDEPENDENT. Write / read the hyperslab start[i] .. start[i]+count[i]-1 of
 * every dimension from / into buf (row-major, count[0]*...*count[ndim-1]
 * elements of `type`; converted to / from the dataset's type). start and
 * count have the dataset's ndim entries; start = count = NULL means the whole
 * dataset. */
int sp_h5_array_write(sp_h5 *h, const char *path, sp_h5_type type, const long *start, const long *count,
                      const void *buf);
int sp_h5_array_read(sp_h5 *h, const char *path, sp_h5_type type, const long *start, const long *count,
                     void *buf);

/* ---- attributes ------------------------------------------------------------ */
/* `obj` is the path of a group or dataset ("/" for the file). Setting an
 * attribute that exists replaces it. Strings are stored as scalar
 * variable-length UTF-8 strings (no size limit; h5py gives a str). */

/* COLLECTIVE (same value on every rank). */
int sp_h5_attr_set_str(sp_h5 *h, const char *obj, const char *name, const char *value);
int sp_h5_attr_set_double(sp_h5 *h, const char *obj, const char *name, double value);
int sp_h5_attr_set_long(sp_h5 *h, const char *obj, const char *name, long value);
/* 1-D arrays of n >= 1 values. */
int sp_h5_attr_set_doubles(sp_h5 *h, const char *obj, const char *name, const double *v, long n);
int sp_h5_attr_set_longs(sp_h5 *h, const char *obj, const char *name, const long *v, long n);

/* INDEPENDENT. *exists = 1 if obj has attribute `name`. */
int sp_h5_attr_exists(sp_h5 *h, const char *obj, const char *name, int *exists);
/* INDEPENDENT. Read a string attribute (variable- or fixed-length, as written by
 * us, h5py or astropy) into a malloc'd *value (caller frees). */
int sp_h5_attr_get_str(sp_h5 *h, const char *obj, const char *name, char **value);
/* INDEPENDENT. Read a numeric scalar (or the first element of an array). */
int sp_h5_attr_get_double(sp_h5 *h, const char *obj, const char *name, double *value);
int sp_h5_attr_get_long(sp_h5 *h, const char *obj, const char *name, long *value);
/* INDEPENDENT. Read a numeric 1-D attribute of up to nmax values into v; *n gets
 * its length (SP_ERR_INPUT if longer than nmax). */
int sp_h5_attr_get_doubles(sp_h5 *h, const char *obj, const char *name, double *v, long nmax, long *n);
int sp_h5_attr_get_longs(sp_h5 *h, const char *obj, const char *name, long *v, long nmax, long *n);

#endif

/* h5.c — the generic (parallel) HDF5 store layer (see sp_h5.h, docs/store-layer.md).
 *
 * Design notes (why):
 * - Every object is created once with its final size and H5D_ALLOC_TIME_EARLY
 *   plus a fill value, so raw-data writes later never touch metadata. That is
 *   what makes independent writes from any rank safe without collective
 *   metadata traffic, and what keeps a flushed file valid after kill -9.
 * - Collective calls end with agree(): one MPI_Allreduce(MAXLOC) on the
 *   status, and on failure the failing rank's message is broadcast, so every
 *   rank returns the same error instead of some ranks continuing into the next
 *   collective call and hanging.
 * - HDF5 errors are turned into our messages right at the failing call (the
 *   next HDF5 API call would clear the error stack): the innermost entry of the
 *   stack says what really went wrong ("errno = 28, No space left on device").
 * - Tables are stored packed (no padding) so numpy/h5py see a plain dtype;
 *   rows in memory use C-struct alignment so callers can use a struct. HDF5
 *   converts between the two layouts.
 */
#include "surveyproc/sp_h5.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_prof.h"

#include <hdf5.h>

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

struct sp_h5 {
    hid_t fid;
    char *path;
    char *tmp;     /* sp_h5_create_atomic: the file being written, renamed to path by sp_h5_commit */
    MPI_Comm comm; /* our duplicate; MPI_COMM_NULL for the serial driver */
    int rank, size;
    int parallel;
    int writable;
    double bytes_w, bytes_r;
};

/* ------------------------------------------------------------------------- */
/* errors                                                                     */

typedef struct {
    char inner[600];
    char minor[160];
    int have;
    int enospc;
} h5_err_info;

static int has_enospc_text(const char *s)
{
    if (!s) return 0;
    char pat[64];
    snprintf(pat, sizeof pat, "errno = %d,", ENOSPC);
    return strstr(s, pat) || strstr(s, "No space left") || strstr(s, "MPI_ERR_NO_SPACE") ||
           strstr(s, "MPI_ERR_QUOTA") || strstr(s, "not enough space");
}

static herr_t walk_cb(unsigned n, const H5E_error2_t *e, void *data)
{
    (void)n;
    h5_err_info *x = data;
    if (!x->have) {
        snprintf(x->inner, sizeof x->inner, "%s%s%s", e->desc ? e->desc : "", e->func_name ? " in " : "",
                 e->func_name ? e->func_name : "");
        ssize_t m = H5Eget_msg(e->min_num, NULL, x->minor, sizeof x->minor);
        if (m < 0) x->minor[0] = '\0';
        x->have = 1;
    }
    if (has_enospc_text(e->desc)) x->enospc = 1;
    return 0;
}

/* Copy the current HDF5 error stack (this clears it) and summarise it. */
static void collect_h5_error(h5_err_info *x)
{
    memset(x, 0, sizeof *x);
    hid_t st = H5Eget_current_stack();
    if (st < 0) return;
    H5Ewalk2(st, H5E_WALK_UPWARD, walk_cb, x);
    H5Eclose_stack(st);
}

/* Almost no free space left on the file system holding `path`? */
static int fs_nearly_full(const char *path, double *free_bytes)
{
    char dir[PATH_MAX];
    snprintf(dir, sizeof dir, "%s", path ? path : ".");
    char *slash = strrchr(dir, '/');
    if (slash == dir) dir[1] = '\0';
    else if (slash) *slash = '\0';
    else snprintf(dir, sizeof dir, ".");
    struct statvfs s;
    if (statvfs(dir, &s) != 0 || s.f_blocks == 0) return 0; /* f_blocks 0: /proc and the like */
    double avail = (double)(geteuid() == 0 ? s.f_bfree : s.f_bavail) * (double)s.f_frsize;
    if (free_bytes) *free_bytes = avail;
    return avail < 1024.0 * 1024.0;
}

/* Before creating a dataset of `need` bytes (rank 0 only; agreed by the
 * caller): is there room? Checking first matters in parallel: a write that
 * fails inside HDF5's collective fill of a new dataset leaves the other ranks
 * blocked in HDF5. SP_H5_SKIP_SPACE_CHECK=1 skips it (tests of the HDF5 path). */
static int space_check(const char *fpath, const char *obj, int rank, double need)
{
    if (rank != 0 || getenv("SP_H5_SKIP_SPACE_CHECK")) return SP_OK;
    char dir[PATH_MAX];
    snprintf(dir, sizeof dir, "%s", fpath);
    char *slash = strrchr(dir, '/');
    if (slash == dir) dir[1] = '\0';
    else if (slash) *slash = '\0';
    else snprintf(dir, sizeof dir, ".");
    struct statvfs s;
    if (statvfs(dir, &s) != 0 || s.f_blocks == 0) return SP_OK;
    double avail = (double)(geteuid() == 0 ? s.f_bfree : s.f_bavail) * (double)s.f_frsize;
    double margin = 1048576.0; /* metadata */
    if (need + margin <= avail) return SP_OK;
    /* KiB below 1 MiB: "needs 0.0 MiB, 0.0 MiB free" said nothing */
    int kib = need + margin < 1048576.0;
    double u = kib ? 1024.0 : 1048576.0;
    return SP_FAIL(SP_ERR_IO,
                   "%s: %s: disk full: creating it needs %.1f %s (with %.0f KiB for metadata) but only %.1f %s are "
                   "free on the device holding the file; free some space or write the store elsewhere, then run "
                   "again",
                   fpath, obj, need / u, kib ? "KiB" : "MiB", margin / 1024.0, avail / u, kib ? "KiB" : "MiB");
}

/* Record an HDF5 failure on object `obj` of the file: SP_ERR_HDF5 with HDF5's
 * innermost message, or SP_ERR_IO "disk full" when the write failed for lack
 * of space. */
static int h5_fail(const char *fpath, const char *obj, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
static int h5_fail(const char *fpath, const char *obj, const char *file, int line, const char *fmt, ...)
{
    h5_err_info x;
    collect_h5_error(&x);
    char what[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    double freeb = -1;
    int full = x.enospc || fs_nearly_full(fpath, &freeb);
    /* obj NULL: an operation on the whole file */
    const char *o = obj ? obj : "", *sep = obj ? ": " : "";
    if (full)
        return sp_err_set(SP_ERR_IO, file, line,
                          "%s: %s%s%s: disk full (no space left on the device holding the file); free some "
                          "space or write the store elsewhere, then run again",
                          fpath, o, sep, what);
    if (!x.have)
        return sp_err_set(SP_ERR_HDF5, file, line, "%s: %s%s%s (HDF5 gave no detail)", fpath, o, sep, what);
    return sp_err_set(SP_ERR_HDF5, file, line, "%s: %s%s%s (HDF5: %s%s%s)", fpath, o, sep, what, x.inner,
                      x.minor[0] ? "; " : "", x.minor);
}

#define H5FAIL(h, obj, ...) h5_fail((h)->path, (obj), __FILE__, __LINE__, __VA_ARGS__)

/* Run an HDF5 call; a negative result records the error and jumps to cleanup. */
#define H5C(call, h, obj, ...)                                                                            \
    do {                                                                                                  \
        if ((call) < 0) {                                                                                 \
            status = H5FAIL((h), (obj), __VA_ARGS__);                                                     \
            goto cleanup;                                                                                 \
        }                                                                                                 \
    } while (0)

/* Assign an hid_t from an HDF5 call, failing as H5C does. */
#define H5ID(var, call, h, obj, ...)                                                                      \
    do {                                                                                                  \
        (var) = (call);                                                                                   \
        if ((var) < 0) {                                                                                  \
            status = H5FAIL((h), (obj), __VA_ARGS__);                                                     \
            goto cleanup;                                                                                 \
        }                                                                                                 \
    } while (0)

/* Close helpers that keep going on error (used in cleanup). Each close is
 * its own API call, so it cannot spoil a message recorded earlier. */
static void close_id(hid_t *id)
{
    if (*id < 0) return;
    switch (H5Iget_type(*id)) {
    case H5I_DATASET: H5Dclose(*id); break;
    case H5I_DATASPACE: H5Sclose(*id); break;
    case H5I_DATATYPE: H5Tclose(*id); break;
    case H5I_ATTR: H5Aclose(*id); break;
    case H5I_GROUP: H5Gclose(*id); break;
    case H5I_GENPROP_LST: H5Pclose(*id); break;
    case H5I_FILE: H5Fclose(*id); break;
    default: H5Oclose(*id); break;
    }
    *id = H5I_INVALID_HID;
}

/* Every rank of comm learns whether any rank failed; a failing rank's
 * message is broadcast to the others. Collective over comm (no-op on
 * MPI_COMM_NULL).
 * A rank that failed waits at most SP_H5_AGREE_TIMEOUT seconds (env, default
 * 60) for the others: when a write fails inside one of HDF5's own collective
 * steps (e.g. the fill of a new dataset on a full disk), the other ranks stay
 * blocked inside HDF5 and would never arrive; returning the error lets the
 * driver abort the job with this rank's message instead of hanging. After
 * that, collective calls on this rank fail at once (the job must stop). */
static int agree_broken;
static struct {
    int st;
    int rank;
} agree_in, agree_out; /* static: a timed-out request may still write them */

static int agree_comm(MPI_Comm comm, int status)
{
    if (comm == MPI_COMM_NULL) return status;
    if (agree_broken)
        return status ? status
                      : SP_FAIL(SP_ERR_MPI, "an earlier collective HDF5 call failed on this rank and the other "
                                            "ranks did not answer; the job must stop");
    int rank = 0;
    MPI_Comm_rank(comm, &rank);
    MPI_Request req;
    agree_in.st = status;
    agree_in.rank = rank;
    if (MPI_Iallreduce(&agree_in, &agree_out, 1, MPI_2INT, MPI_MAXLOC, comm, &req) != MPI_SUCCESS)
        return status ? status : SP_FAIL(SP_ERR_MPI, "MPI_Iallreduce failed while checking an HDF5 call");
    if (status == SP_OK) {
        MPI_Wait(&req, MPI_STATUS_IGNORE);
    } else {
        const char *e = getenv("SP_H5_AGREE_TIMEOUT");
        double limit = e && atof(e) > 0 ? atof(e) : 60.0, t0 = MPI_Wtime();
        int done = 0;
        while (!done) {
            MPI_Test(&req, &done, MPI_STATUS_IGNORE);
            if (done) break;
            if (MPI_Wtime() - t0 > limit) {
                agree_broken = 1;
                char m[1024];
                snprintf(m, sizeof m, "%s", sp_err_msg());
                return sp_err_set(status, __FILE__, __LINE__,
                                  "%s (the other ranks did not answer within %.0f s: they are likely blocked in "
                                  "HDF5; abort the job)",
                                  m, limit);
            }
            usleep(1000);
        }
    }
    if (agree_out.st == SP_OK) return SP_OK;
    int who = agree_out.rank, code = agree_out.st;
    char msg[1024];
    if (rank == who) snprintf(msg, sizeof msg, "%s", sp_err_msg());
    MPI_Bcast(msg, (int)sizeof msg, MPI_CHAR, who, comm);
    if (status != SP_OK) return status;
    return SP_FAIL(code, "rank %d: %s", who, msg);
}

static int agree(const sp_h5 *h, int status) { return agree_comm(h ? h->comm : MPI_COMM_NULL, status); }

/* ------------------------------------------------------------------------- */
/* small helpers                                                              */

static char *dupstr(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

static void quiet_hdf5(void)
{
    /* HDF5 would print its whole error stack to stderr on every failure; we
     * report one message instead. Also for "does it exist" probes. */
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
}

static int check_handle(const sp_h5 *h, const char *path, const char *fn)
{
    if (!h || h->fid < 0) return SP_FAIL(SP_ERR_INTERNAL, "%s: NULL or closed store handle", fn);
    if (!path || path[0] != '/')
        return SP_FAIL(SP_ERR_INTERNAL, "%s: %s: object paths must start with '/'", fn, path ? path : "(null)");
    size_t n = strlen(path);
    if (strstr(path, "//") || (n > 1 && path[n - 1] == '/') || n >= 1024)
        return SP_FAIL(SP_ERR_INTERNAL, "%s: bad object path '%s' (no '//', no trailing '/', < 1024 chars)", fn,
                       path);
    return SP_OK;
}

/* Does an object exist at path? Walks the components so that a missing parent
 * is "no" rather than an error. */
static int exists_path(const sp_h5 *h, const char *path, int *exists)
{
    int status = SP_OK;
    char buf[1024];
    *exists = 0;
    if (!strcmp(path, "/")) {
        *exists = 1;
        return SP_OK;
    }
    size_t len = strlen(path);
    SP_CHECK(len < sizeof buf, SP_ERR_INTERNAL, "%s: object path too long: %s", h->path, path);
    memcpy(buf, path, len + 1);
    for (size_t i = 1; i <= len; i++) {
        if (buf[i] != '/' && buf[i] != '\0') continue;
        char c = buf[i];
        buf[i] = '\0';
        htri_t e = H5Lexists(h->fid, buf, H5P_DEFAULT);
        buf[i] = c;
        if (e < 0) {
            status = H5FAIL(h, path, "cannot look up the object");
            goto cleanup;
        }
        if (e == 0) goto cleanup;
    }
    htri_t e = H5Oexists_by_name(h->fid, path, H5P_DEFAULT);
    if (e < 0) {
        status = H5FAIL(h, path, "cannot look up the object");
        goto cleanup;
    }
    *exists = e > 0;
cleanup:
    return status;
}

/* Open a dataset, with "missing" and "not a dataset" reported clearly. */
static int open_dset(const sp_h5 *h, const char *path, hid_t *did)
{
    int status = SP_OK, ex = 0;
    hid_t oid = H5I_INVALID_HID;
    *did = H5I_INVALID_HID;
    SP_TRY(exists_path(h, path, &ex));
    SP_CHECK(ex, SP_ERR_INPUT, "%s: no dataset %s in this file (missing object)", h->path, path);
    H5ID(oid, H5Oopen(h->fid, path, H5P_DEFAULT), h, path, "cannot open the object");
    SP_CHECK(H5Iget_type(oid) == H5I_DATASET, SP_ERR_INPUT, "%s: %s is a group, not a dataset", h->path, path);
    *did = oid;
    oid = H5I_INVALID_HID;
cleanup:
    close_id(&oid);
    return status;
}

/* Link creation property list that creates missing parent groups. */
static hid_t make_lcpl(void)
{
    hid_t lcpl = H5Pcreate(H5P_LINK_CREATE);
    if (lcpl >= 0 && H5Pset_create_intermediate_group(lcpl, 1) < 0) {
        H5Pclose(lcpl);
        return H5I_INVALID_HID;
    }
    return lcpl;
}

static const char *type_name(sp_h5_type t)
{
    switch (t) {
    case SP_H5_I8: return "int8";
    case SP_H5_U8: return "uint8";
    case SP_H5_I32: return "int32";
    case SP_H5_I64: return "int64";
    case SP_H5_F32: return "float32";
    case SP_H5_F64: return "float64";
    case SP_H5_STR: return "string";
    }
    return "unknown";
}

static size_t type_size(sp_h5_type t, int len)
{
    switch (t) {
    case SP_H5_I8:
    case SP_H5_U8: return 1;
    case SP_H5_I32:
    case SP_H5_F32: return 4;
    case SP_H5_I64:
    case SP_H5_F64: return 8;
    case SP_H5_STR: return (size_t)len;
    }
    return 0;
}

static size_t type_align(sp_h5_type t) { return t == SP_H5_STR ? 1 : type_size(t, 0); }

static int valid_numeric(sp_h5_type t) { return t >= SP_H5_I8 && t <= SP_H5_F64; }

/* Native HDF5 type for a numeric sp_h5_type (predefined: do not close). */
static hid_t native_of(sp_h5_type t)
{
    switch (t) {
    case SP_H5_I8: return H5T_NATIVE_SCHAR;
    case SP_H5_U8: return H5T_NATIVE_UCHAR;
    case SP_H5_I32: return H5T_NATIVE_INT32;
    case SP_H5_I64: return H5T_NATIVE_INT64;
    case SP_H5_F32: return H5T_NATIVE_FLOAT;
    case SP_H5_F64: return H5T_NATIVE_DOUBLE;
    default: return H5I_INVALID_HID;
    }
}

static double default_fill(sp_h5_type t)
{
    switch (t) {
    case SP_H5_U8: return 0.0;
    case SP_H5_F32:
    case SP_H5_F64: return NAN;
    default: return -1.0;
    }
}

/* Store v (a double) as type t at p. */
static void put_value(void *p, sp_h5_type t, double v)
{
    switch (t) {
    case SP_H5_I8: { int8_t x = (int8_t)v; memcpy(p, &x, 1); break; }
    case SP_H5_U8: { uint8_t x = (uint8_t)v; memcpy(p, &x, 1); break; }
    case SP_H5_I32: { int32_t x = (int32_t)v; memcpy(p, &x, 4); break; }
    case SP_H5_I64: { int64_t x = (int64_t)v; memcpy(p, &x, 8); break; }
    case SP_H5_F32: { float x = (float)v; memcpy(p, &x, 4); break; }
    case SP_H5_F64: memcpy(p, &v, 8); break;
    default: break;
    }
}

/* A fill value must be representable in an integer type (no NaN there). */
static int fill_ok(sp_h5_type t, double v)
{
    switch (t) {
    case SP_H5_I8: return v == v && v >= INT8_MIN && v <= INT8_MAX;
    case SP_H5_U8: return v == v && v >= 0 && v <= UINT8_MAX;
    case SP_H5_I32: return v == v && v >= INT32_MIN && v <= INT32_MAX;
    case SP_H5_I64: return v == v && fabs(v) < 9.2e18;
    default: return 1;
    }
}

/* ------------------------------------------------------------------------- */
/* files                                                                      */

/* Decide the driver: MPI-IO for a communicator of more than one rank. Fills
 * *dup (our duplicate, or MPI_COMM_NULL), rank and size. */
static int setup_comm(MPI_Comm comm, MPI_Comm *dup, int *rank, int *size)
{
    *dup = MPI_COMM_NULL;
    *rank = 0;
    *size = 1;
    if (comm == MPI_COMM_NULL) return SP_OK;
    int inited = 0, finalized = 0;
    MPI_Initialized(&inited);
    MPI_Finalized(&finalized);
    if (!inited || finalized)
        return SP_FAIL(SP_ERR_INTERNAL, "sp_h5: a communicator was given but MPI is not running "
                                        "(pass MPI_COMM_NULL for serial use)");
    if (MPI_Comm_size(comm, size) != MPI_SUCCESS || MPI_Comm_rank(comm, rank) != MPI_SUCCESS)
        return SP_FAIL(SP_ERR_MPI, "sp_h5: invalid communicator");
    if (*size > 1 && MPI_Comm_dup(comm, dup) != MPI_SUCCESS)
        return SP_FAIL(SP_ERR_MPI, "sp_h5: MPI_Comm_dup failed");
    if (*size <= 1) *dup = MPI_COMM_NULL;
    return SP_OK;
}

static hid_t make_fapl(const sp_h5 *h)
{
    hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
    if (fapl < 0) return fapl;
    herr_t r = h->parallel ? H5Pset_fapl_mpio(fapl, h->comm, MPI_INFO_NULL) : H5Pset_fapl_sec2(fapl);
    /* No data sieve buffer: with rows scattered over a large table every
     * write would read and write a whole 64 KiB window (measured 3x slower
     * for lists of row numbers); large contiguous writes never use it. */
    if (r >= 0 && !h->parallel) r = H5Pset_sieve_buf_size(fapl, 0);
    if (r < 0) {
        H5Pclose(fapl);
        return H5I_INVALID_HID;
    }
    return fapl;
}

static void free_handle(sp_h5 *h)
{
    if (!h) return;
    if (h->comm != MPI_COMM_NULL) MPI_Comm_free(&h->comm);
    free(h->path);
    free(h->tmp);
    free(h);
}

static int new_handle(const char *path, MPI_Comm comm, int writable, sp_h5 **out)
{
    int status = SP_OK;
    sp_h5 *h = NULL;
    SP_ALLOC(h, 1);
    h->fid = H5I_INVALID_HID;
    h->comm = MPI_COMM_NULL;
    h->writable = writable;
    h->path = dupstr(path);
    SP_CHECK(h->path, SP_ERR_NOMEM, "out of memory");
    SP_TRY(setup_comm(comm, &h->comm, &h->rank, &h->size));
    h->parallel = h->comm != MPI_COMM_NULL;
    *out = h;
    h = NULL;
cleanup:
    free_handle(h);
    return status;
}

static int create_local(sp_h5 *h)
{
    int status = SP_OK;
    hid_t fapl = H5I_INVALID_HID;
    char dir[PATH_MAX];
    snprintf(dir, sizeof dir, "%s", h->path);
    char *slash = strrchr(dir, '/');
    if (slash == dir) dir[1] = '\0';
    else if (slash) *slash = '\0';
    else snprintf(dir, sizeof dir, ".");
    struct stat st;
    SP_CHECK(stat(dir, &st) == 0 && S_ISDIR(st.st_mode), SP_ERR_IO,
             "%s: cannot create the file: directory %s does not exist", h->path, dir);
    SP_CHECK(access(dir, W_OK) == 0, SP_ERR_IO, "%s: cannot create the file: directory %s is not writable (%s)",
             h->path, dir, strerror(errno));
    /* only a regular file is ever replaced: never a directory, a device or a pipe */
    SP_CHECK(stat(h->path, &st) != 0 || S_ISREG(st.st_mode), SP_ERR_IO,
             "%s: cannot create the file: the path exists and is not a regular file (a directory?); give "
             "outputs.store a file name",
             h->path);
    H5ID(fapl, make_fapl(h), h, NULL, "cannot set up file access (MPI-IO)");
    H5ID(h->fid, H5Fcreate(h->tmp ? h->tmp : h->path, H5F_ACC_TRUNC, H5P_DEFAULT, fapl), h, NULL,
         "cannot create the file");
cleanup:
    close_id(&fapl);
    return status;
}

/* Rank 0 removes the never-committed file of sp_h5_create_atomic (after its close). */
static void drop_tmp(sp_h5 *h)
{
    if (h && h->tmp && h->rank == 0) unlink(h->tmp);
}

int sp_h5_create(const char *path, MPI_Comm comm, sp_h5 **out)
{
    int status = SP_OK;
    sp_h5 *h = NULL;
    quiet_hdf5();
    if (!path || !out) return SP_FAIL(SP_ERR_INTERNAL, "sp_h5_create: NULL argument");
    *out = NULL;
    SP_TRY(new_handle(path, comm, 1, &h));
    status = agree(h, create_local(h));
    if (status != SP_OK) goto cleanup;
    *out = h;
    h = NULL;
cleanup:
    if (h) {
        close_id(&h->fid);
        free_handle(h);
    }
    return status;
}

int sp_h5_create_atomic(const char *path, MPI_Comm comm, sp_h5 **out)
{
    int status = SP_OK;
    sp_h5 *h = NULL;
    quiet_hdf5();
    if (!path || !out) return SP_FAIL(SP_ERR_INTERNAL, "sp_h5_create_atomic: NULL argument");
    *out = NULL;
    SP_TRY(new_handle(path, comm, 1, &h));
    size_t n = strlen(path) + 6;
    SP_ALLOC(h->tmp, n);
    snprintf(h->tmp, n, "%s.part", path);
    status = agree(h, create_local(h));
    if (status != SP_OK) goto cleanup;
    *out = h;
    h = NULL;
cleanup:
    if (h) {
        close_id(&h->fid);
        if (h->comm != MPI_COMM_NULL) MPI_Barrier(h->comm); /* every rank closed it before rank 0 unlinks */
        drop_tmp(h);
        free_handle(h);
    }
    return status;
}

static int commit_local(sp_h5 *h)
{
    if (h->rank != 0 || !h->tmp) return SP_OK;
    if (rename(h->tmp, h->path) != 0)
        return SP_FAIL(SP_ERR_IO, "%s: cannot move the new file %s into place: %s", h->path, h->tmp,
                       strerror(errno));
    return SP_OK;
}

int sp_h5_commit(sp_h5 *h)
{
    if (!h) return SP_FAIL(SP_ERR_INTERNAL, "sp_h5_commit: NULL handle");
    int status = agree(h, commit_local(h));
    if (status == SP_OK) {
        free(h->tmp);
        h->tmp = NULL;
    }
    return status;
}

static int open_local(sp_h5 *h)
{
    int status = SP_OK;
    hid_t fapl = H5I_INVALID_HID;
    struct stat st;
    SP_CHECK(stat(h->path, &st) == 0, SP_ERR_IO, "%s: missing file (%s)", h->path, strerror(errno));
    SP_CHECK(S_ISREG(st.st_mode), SP_ERR_IO, "%s: not a regular file (expected an HDF5 file)", h->path);
    SP_CHECK(access(h->path, h->writable ? (R_OK | W_OK) : R_OK) == 0, SP_ERR_IO, "%s: cannot %s the file: %s",
             h->path, h->writable ? "write" : "read", strerror(errno));
    htri_t is = H5Fis_hdf5(h->path);
    SP_CHECK(is > 0, SP_ERR_IO, "%s: not an HDF5 file (%s)", h->path,
             st.st_size == 0 ? "the file is empty" : "no HDF5 signature found; truncated or another format?");
    H5ID(fapl, make_fapl(h), h, NULL, "cannot set up file access (MPI-IO)");
    H5ID(h->fid, H5Fopen(h->path, h->writable ? H5F_ACC_RDWR : H5F_ACC_RDONLY, fapl), h, NULL,
         "cannot open the file%s", h->writable ? " for writing" : "");
cleanup:
    close_id(&fapl);
    return status;
}

int sp_h5_open(const char *path, int writable, MPI_Comm comm, sp_h5 **out)
{
    int status = SP_OK;
    sp_h5 *h = NULL;
    quiet_hdf5();
    if (!path || !out) return SP_FAIL(SP_ERR_INTERNAL, "sp_h5_open: NULL argument");
    *out = NULL;
    SP_TRY(new_handle(path, comm, writable != 0, &h));
    status = agree(h, open_local(h));
    if (status != SP_OK) goto cleanup;
    *out = h;
    h = NULL;
cleanup:
    if (h) {
        close_id(&h->fid);
        free_handle(h);
    }
    return status;
}

static int flush_local(sp_h5 *h)
{
    int status = SP_OK;
    void *vfd = NULL;
    SP_CHECK(h && h->fid >= 0, SP_ERR_INTERNAL, "sp_h5_flush: NULL or closed store handle");
    if (!h->writable) goto cleanup;
    H5C(H5Fflush(h->fid, H5F_SCOPE_GLOBAL), h, NULL, "cannot flush the file");
    /* Push the bytes to the device too, so the file is durable beyond the
     * page cache (a crash of the node, not only of the process). */
    H5C(H5Fget_vfd_handle(h->fid, H5P_DEFAULT, &vfd), h, NULL, "cannot get the file handle");
    if (h->parallel) {
        int rc = MPI_File_sync(*(MPI_File *)vfd);
        SP_CHECK(rc == MPI_SUCCESS, SP_ERR_IO, "%s: MPI_File_sync failed%s", h->path,
                 fs_nearly_full(h->path, NULL) ? ": disk full" : "");
    } else {
        int fd = *(int *)vfd;
        if (fsync(fd) != 0) {
            int e = errno;
            SP_CHECK(e == EINVAL || e == EROFS, SP_ERR_IO, "%s: fsync failed: %s%s", h->path, strerror(e),
                     e == ENOSPC ? " (disk full)" : "");
        }
    }
cleanup:
    return status;
}

int sp_h5_flush(sp_h5 *h)
{
    if (!h) return SP_FAIL(SP_ERR_INTERNAL, "sp_h5_flush: NULL handle");
    return agree(h, flush_local(h));
}

int sp_h5_close(sp_h5 **hp)
{
    int status = SP_OK;
    if (!hp || !*hp) return SP_OK;
    sp_h5 *h = *hp;
    if (h->fid >= 0) {
        /* Anything still open would keep the file open (and unflushed). */
        ssize_t nopen = H5Fget_obj_count(h->fid, H5F_OBJ_DATASET | H5F_OBJ_GROUP | H5F_OBJ_DATATYPE |
                                                     H5F_OBJ_ATTR | H5F_OBJ_LOCAL);
        if (H5Fclose(h->fid) < 0) status = H5FAIL(h, NULL, "cannot close the file (data may not be written)");
        else if (nopen > 0)
            status = SP_FAIL(SP_ERR_INTERNAL, "%s: %zd HDF5 object(s) were still open at close (leak in sp_h5)",
                             h->path, nopen);
        h->fid = H5I_INVALID_HID;
    }
    status = agree(h, status); /* every rank has closed the file */
    drop_tmp(h);               /* an atomic create that was never committed leaves nothing */
    free_handle(h);
    *hp = NULL;
    return status;
}

const char *sp_h5_path(const sp_h5 *h) { return h ? h->path : NULL; }
int sp_h5_writable(const sp_h5 *h) { return h ? h->writable : 0; }
int sp_h5_parallel(const sp_h5 *h) { return h ? h->parallel : 0; }
void sp_h5_bytes(const sp_h5 *h, double *written, double *read)
{
    if (written) *written = h ? h->bytes_w : 0;
    if (read) *read = h ? h->bytes_r : 0;
}

static void count_bytes(sp_h5 *h, int write, double n)
{
    if (write) h->bytes_w += n;
    else h->bytes_r += n;
    sp_prof_bytes(n);
}

/* ------------------------------------------------------------------------- */
/* groups, objects                                                            */

static int writable_check(const sp_h5 *h, const char *obj)
{
    if (!h->writable) return SP_FAIL(SP_ERR_INTERNAL, "%s: %s: the file was opened read-only", h->path, obj);
    return SP_OK;
}

static int group_create_local(sp_h5 *h, const char *path)
{
    int status = SP_OK, ex = 0;
    hid_t lcpl = H5I_INVALID_HID, gid = H5I_INVALID_HID, oid = H5I_INVALID_HID;
    SP_TRY(check_handle(h, path, "sp_h5_group_create"));
    SP_TRY(writable_check(h, path));
    SP_TRY(exists_path(h, path, &ex));
    if (ex) {
        H5ID(oid, H5Oopen(h->fid, path, H5P_DEFAULT), h, path, "cannot open the object");
        SP_CHECK(H5Iget_type(oid) == H5I_GROUP, SP_ERR_INPUT, "%s: %s exists and is not a group", h->path, path);
        goto cleanup;
    }
    H5ID(lcpl, make_lcpl(), h, path, "cannot make a link property list");
    H5ID(gid, H5Gcreate2(h->fid, path, lcpl, H5P_DEFAULT, H5P_DEFAULT), h, path, "cannot create the group");
cleanup:
    close_id(&oid);
    close_id(&gid);
    close_id(&lcpl);
    return status;
}

int sp_h5_group_create(sp_h5 *h, const char *path) { return agree(h, group_create_local(h, path)); }

/* Added for the zp stage (re-running it replaces /zp). */
static int delete_local(sp_h5 *h, const char *path)
{
    int status = SP_OK, ex = 0;
    SP_TRY(check_handle(h, path, "sp_h5_delete"));
    SP_CHECK(strcmp(path, "/") != 0, SP_ERR_INTERNAL, "%s: sp_h5_delete: cannot delete the root group", h->path);
    SP_TRY(writable_check(h, path));
    SP_TRY(exists_path(h, path, &ex));
    if (!ex) goto cleanup;
    H5C(H5Ldelete(h->fid, path, H5P_DEFAULT), h, path, "cannot delete the object");
cleanup:
    return status;
}

int sp_h5_delete(sp_h5 *h, const char *path) { return agree(h, delete_local(h, path)); }

int sp_h5_exists(sp_h5 *h, const char *path, int *exists)
{
    int status = SP_OK;
    SP_CHECK(exists, SP_ERR_INTERNAL, "sp_h5_exists: NULL argument");
    *exists = 0;
    SP_TRY(check_handle(h, path, "sp_h5_exists"));
    SP_TRY(exists_path(h, path, exists));
cleanup:
    return status;
}

int sp_h5_dims(sp_h5 *h, const char *path, int *ndim, long *dims)
{
    int status = SP_OK;
    hid_t did = H5I_INVALID_HID, sid = H5I_INVALID_HID;
    hsize_t d[H5S_MAX_RANK];
    SP_CHECK(ndim && dims, SP_ERR_INTERNAL, "sp_h5_dims: NULL argument");
    SP_TRY(check_handle(h, path, "sp_h5_dims"));
    SP_TRY(open_dset(h, path, &did));
    H5ID(sid, H5Dget_space(did), h, path, "cannot get the dataspace");
    int nd = H5Sget_simple_extent_ndims(sid);
    H5C(nd, h, path, "cannot get the rank");
    SP_CHECK(nd <= SP_H5_MAXDIM, SP_ERR_INPUT, "%s: %s has %d dimensions (at most %d supported)", h->path, path,
             nd, SP_H5_MAXDIM);
    H5C(H5Sget_simple_extent_dims(sid, d, NULL), h, path, "cannot get the dimensions");
    *ndim = nd;
    for (int i = 0; i < nd; i++) dims[i] = (long)d[i];
cleanup:
    close_id(&sid);
    close_id(&did);
    return status;
}

/* ------------------------------------------------------------------------- */
/* tables                                                                     */

static hid_t vlen_str_type(void);
static int attr_write_id(const sp_h5 *h, hid_t oid, const char *obj, const char *name, hid_t type, long n,
                         const void *data);

int sp_h5_table_layout(const sp_h5_col *cols, int ncol, size_t *offsets, size_t *rowsize)
{
    int status = SP_OK;
    size_t off = 0, maxal = 1;
    SP_CHECK(cols && offsets && rowsize, SP_ERR_INTERNAL, "sp_h5_table_layout: NULL argument");
    SP_CHECK(ncol >= 1, SP_ERR_INTERNAL, "sp_h5_table_layout: a table needs at least one column (ncol = %d)", ncol);
    for (int i = 0; i < ncol; i++) {
        const sp_h5_col *c = &cols[i];
        SP_CHECK(c->name && c->name[0], SP_ERR_INTERNAL, "table spec: column %d has no name", i);
        SP_CHECK(!strchr(c->name, '/') && strcmp(c->name, "."), SP_ERR_INTERNAL,
                 "table spec: column name '%s' is not allowed (no '/')", c->name);
        SP_CHECK(valid_numeric(c->type) || c->type == SP_H5_STR, SP_ERR_INTERNAL,
                 "table spec: column '%s' has an invalid type %d", c->name, (int)c->type);
        SP_CHECK(c->type != SP_H5_STR || c->len >= 2, SP_ERR_INTERNAL,
                 "table spec: string column '%s' needs len >= 2 (bytes including the NUL), got %d", c->name,
                 c->len);
        SP_CHECK(c->type == SP_H5_STR || !c->has_fill || fill_ok(c->type, c->fill), SP_ERR_INTERNAL,
                 "table spec: column '%s': fill value %g does not fit type %s", c->name, c->fill,
                 type_name(c->type));
        for (int j = 0; j < i; j++)
            SP_CHECK(strcmp(cols[j].name, c->name), SP_ERR_INTERNAL, "table spec: column name '%s' appears twice",
                     c->name);
        size_t al = type_align(c->type);
        off = (off + al - 1) / al * al;
        offsets[i] = off;
        off += type_size(c->type, c->len);
        if (al > maxal) maxal = al;
    }
    *rowsize = (off + maxal - 1) / maxal * maxal;
cleanup:
    return status;
}

/* Element type of one column (caller closes). */
static hid_t col_type(const sp_h5_col *c)
{
    if (c->type == SP_H5_STR) {
        hid_t t = H5Tcopy(H5T_C_S1);
        if (t < 0) return t;
        if (H5Tset_size(t, (size_t)c->len) < 0 || H5Tset_strpad(t, H5T_STR_NULLTERM) < 0) {
            H5Tclose(t);
            return H5I_INVALID_HID;
        }
        return t;
    }
    return H5Tcopy(native_of(c->type));
}

/* Memory compound type for the spec (caller closes). */
static hid_t mem_type(const sp_h5_col *cols, int ncol, const size_t *offsets, size_t rowsize)
{
    hid_t t = H5Tcreate(H5T_COMPOUND, rowsize);
    if (t < 0) return t;
    for (int i = 0; i < ncol; i++) {
        hid_t ct = col_type(&cols[i]);
        herr_t r = ct < 0 ? -1 : H5Tinsert(t, cols[i].name, offsets[i], ct);
        if (ct >= 0) H5Tclose(ct);
        if (r < 0) {
            H5Tclose(t);
            return H5I_INVALID_HID;
        }
    }
    return t;
}

/* check_only: validate, check the name is free and the disk has room, and
 * stop (the first, agreed step of the collective create). */
static int table_create_local(sp_h5 *h, const char *path, const sp_h5_col *cols, int ncol, long nrows,
                              int check_only)
{
    int status = SP_OK, ex = 0;
    size_t *offsets = NULL, rowsize = 0;
    unsigned char *fill = NULL;
    hid_t mt = H5I_INVALID_HID, ft = H5I_INVALID_HID, sid = H5I_INVALID_HID, dcpl = H5I_INVALID_HID;
    hid_t lcpl = H5I_INVALID_HID, did = H5I_INVALID_HID, vst = H5I_INVALID_HID;
    SP_TRY(check_handle(h, path, "sp_h5_table_create"));
    SP_TRY(writable_check(h, path));
    SP_CHECK(nrows >= 0, SP_ERR_INTERNAL, "%s: %s: negative number of rows %ld", h->path, path, nrows);
    SP_ALLOC(offsets, ncol > 0 ? ncol : 1);
    SP_TRY(sp_h5_table_layout(cols, ncol, offsets, &rowsize));
    SP_TRY(exists_path(h, path, &ex));
    SP_CHECK(!ex, SP_ERR_INPUT, "%s: %s already exists (tables are created once)", h->path, path);
    if (check_only) {
        double packed = 0;
        for (int i = 0; i < ncol; i++) packed += (double)type_size(cols[i].type, cols[i].len);
        SP_TRY(space_check(h->path, path, h->rank, packed * (double)nrows));
        goto cleanup;
    }

    H5ID(mt, mem_type(cols, ncol, offsets, rowsize), h, path, "cannot build the row type");
    H5ID(ft, H5Tcopy(mt), h, path, "cannot copy the row type");
    H5C(H5Tpack(ft), h, path, "cannot pack the row type");
    size_t frow = H5Tget_size(ft);

    SP_ALLOC(fill, rowsize);
    for (int i = 0; i < ncol; i++)
        if (cols[i].type != SP_H5_STR)
            put_value(fill + offsets[i], cols[i].type, cols[i].has_fill ? cols[i].fill : default_fill(cols[i].type));

    hsize_t dim = (hsize_t)nrows;
    H5ID(sid, H5Screate_simple(1, &dim, NULL), h, path, "cannot make the dataspace");
    H5ID(dcpl, H5Pcreate(H5P_DATASET_CREATE), h, path, "cannot make a property list");
    H5C(H5Pset_layout(dcpl, H5D_CONTIGUOUS), h, path, "cannot set the layout");
    H5C(H5Pset_alloc_time(dcpl, H5D_ALLOC_TIME_EARLY), h, path, "cannot set early allocation");
    H5C(H5Pset_fill_time(dcpl, H5D_FILL_TIME_ALLOC), h, path, "cannot set the fill time");
    H5C(H5Pset_fill_value(dcpl, mt, fill), h, path, "cannot set the fill value");
    H5ID(lcpl, make_lcpl(), h, path, "cannot make a link property list");
    did = H5Dcreate2(h->fid, path, ft, sid, lcpl, dcpl, H5P_DEFAULT);
    if (did < 0) {
        status = H5FAIL(h, path, "cannot create the table (%ld rows x %zu bytes)", nrows, frow);
        if (status == SP_ERR_HDF5 && strstr(sp_err_msg(), "message is too large")) {
            char m[1024];
            snprintf(m, sizeof m, "%s", sp_err_msg());
            status = SP_FAIL(SP_ERR_INPUT,
                             "%s; %d columns are too many for one table: HDF5 limits the description of the row "
                             "type to 64 KiB (about 900 columns of 16-character names): split the table or "
                             "shorten the names", m, ncol);
        }
        goto cleanup;
    }

    /* units and descriptions: "<col>_unit", "<col>_description", written
     * through the open dataset (reopening it per attribute would decode the
     * row type every time) */
    H5ID(vst, vlen_str_type(), h, path, "cannot make a string type");
    for (int i = 0; i < ncol; i++) {
        char an[512];
        if (cols[i].unit && cols[i].unit[0]) {
            snprintf(an, sizeof an, "%s_unit", cols[i].name);
            SP_TRY(attr_write_id(h, did, path, an, vst, -1, &cols[i].unit));
        }
        if (cols[i].description && cols[i].description[0]) {
            snprintf(an, sizeof an, "%s_description", cols[i].name);
            SP_TRY(attr_write_id(h, did, path, an, vst, -1, &cols[i].description));
        }
    }
cleanup:
    close_id(&vst);
    close_id(&did);
    close_id(&lcpl);
    close_id(&dcpl);
    close_id(&sid);
    close_id(&ft);
    close_id(&mt);
    free(fill);
    free(offsets);
    return status;
}

int sp_h5_table_create(sp_h5 *h, const char *path, const sp_h5_col *cols, int ncol, long nrows)
{
    int status = agree(h, table_create_local(h, path, cols, ncol, nrows, 1));
    if (status == SP_OK) status = agree(h, table_create_local(h, path, cols, ncol, nrows, 0));
    return status;
}

/* Open a 1-D dataset of a compound type and get its row count. */
static int open_table(const sp_h5 *h, const char *path, hid_t *did, hid_t *ftype, long *nrows)
{
    int status = SP_OK;
    hid_t sid = H5I_INVALID_HID;
    *ftype = H5I_INVALID_HID;
    SP_TRY(open_dset(h, path, did));
    H5ID(*ftype, H5Dget_type(*did), h, path, "cannot get the datatype");
    SP_CHECK(H5Tget_class(*ftype) == H5T_COMPOUND, SP_ERR_INPUT, "%s: %s is not a table (not a compound dataset)",
             h->path, path);
    H5ID(sid, H5Dget_space(*did), h, path, "cannot get the dataspace");
    int nd = H5Sget_simple_extent_ndims(sid);
    SP_CHECK(nd == 1, SP_ERR_INPUT, "%s: %s is not a table (rank %d, expected 1)", h->path, path, nd);
    hsize_t d = 0;
    H5C(H5Sget_simple_extent_dims(sid, &d, NULL), h, path, "cannot get the dimensions");
    *nrows = (long)d;
cleanup:
    close_id(&sid);
    if (status != SP_OK) {
        close_id(ftype);
        close_id(did);
    }
    return status;
}

/* Check that every column of the spec exists in the file's row type with a
 * compatible class (numbers <-> numbers, strings <-> strings). */
static int check_columns(const sp_h5 *h, const char *path, hid_t ftype, const sp_h5_col *cols, int ncol)
{
    int status = SP_OK;
    hid_t mt = H5I_INVALID_HID;
    for (int i = 0; i < ncol; i++) {
        int idx = H5Tget_member_index(ftype, cols[i].name);
        SP_CHECK(idx >= 0, SP_ERR_INPUT, "%s: %s has no column '%s'", h->path, path, cols[i].name);
        H5ID(mt, H5Tget_member_type(ftype, (unsigned)idx), h, path, "cannot get the type of column '%s'",
             cols[i].name);
        H5T_class_t cl = H5Tget_class(mt);
        int is_str = cl == H5T_STRING, is_num = cl == H5T_INTEGER || cl == H5T_FLOAT;
        SP_CHECK(cols[i].type == SP_H5_STR ? is_str : is_num, SP_ERR_INPUT,
                 "%s: %s: column '%s' is %s in the file, not %s", h->path, path, cols[i].name,
                 is_str ? "a string" : is_num ? "numeric" : "of another kind",
                 cols[i].type == SP_H5_STR ? "a string" : "numeric");
        close_id(&mt);
    }
cleanup:
    close_id(&mt);
    return status;
}

int sp_h5_table_nrows(sp_h5 *h, const char *path, long *nrows)
{
    int status = SP_OK;
    hid_t did = H5I_INVALID_HID, sid = H5I_INVALID_HID;
    SP_CHECK(nrows, SP_ERR_INTERNAL, "sp_h5_table_nrows: NULL argument");
    SP_TRY(check_handle(h, path, "sp_h5_table_nrows"));
    SP_TRY(open_dset(h, path, &did));
    H5ID(sid, H5Dget_space(did), h, path, "cannot get the dataspace");
    int nd = H5Sget_simple_extent_ndims(sid);
    SP_CHECK(nd == 1, SP_ERR_INPUT, "%s: %s is not a table (rank %d, expected 1)", h->path, path, nd);
    hsize_t d = 0;
    H5C(H5Sget_simple_extent_dims(sid, &d, NULL), h, path, "cannot get the dimensions");
    *nrows = (long)d;
cleanup:
    close_id(&sid);
    close_id(&did);
    return status;
}

typedef struct {
    long idx;
    long pos;
} idx_pos;

static int cmp_idx_pos(const void *a, const void *b)
{
    const idx_pos *x = a, *y = b;
    return (x->idx > y->idx) - (x->idx < y->idx);
}

/* Check a list of row numbers and sort it: coords[k] is the k-th row in file
 * order; for a list that was not strictly increasing, *perm[k].pos tells
 * which entry of the caller's list (and buffer) it is. Sorting lets HDF5 see
 * runs of consecutive rows and write each run in one go. */
static int sort_rows(const sp_h5 *h, const char *path, long nrows, const long *idx, long n, hsize_t **coords,
                     idx_pos **perm)
{
    int status = SP_OK;
    hsize_t *c = NULL;
    idx_pos *p = NULL;
    int sorted = 1;
    *coords = NULL;
    *perm = NULL;
    for (long k = 0; k < n; k++) {
        SP_CHECK(idx[k] >= 0 && idx[k] < nrows, SP_ERR_INPUT,
                 "%s: %s: row index %ld (entry %ld) is outside the table (%ld rows)", h->path, path, idx[k], k,
                 nrows);
        if (k && idx[k] <= idx[k - 1]) sorted = 0;
    }
    SP_ALLOC(c, n);
    if (sorted) {
        for (long k = 0; k < n; k++) c[k] = (hsize_t)idx[k];
    } else {
        SP_ALLOC(p, n);
        for (long k = 0; k < n; k++) {
            p[k].idx = idx[k];
            p[k].pos = k;
        }
        qsort(p, (size_t)n, sizeof *p, cmp_idx_pos);
        for (long k = 0; k < n; k++) {
            SP_CHECK(!k || p[k].idx != p[k - 1].idx, SP_ERR_INTERNAL, "%s: %s: row index %ld appears twice",
                     h->path, path, p[k].idx);
            c[k] = (hsize_t)p[k].idx;
        }
    }
    *coords = c;
    *perm = p;
    c = NULL;
    p = NULL;
cleanup:
    free(p);
    free(c);
    return status;
}

typedef struct {
    size_t mem, packed, len;
} copy_seg;

/* Rows go through HDF5 in pieces of at most this many bytes, so a large
 * write needs little extra memory. */
#define SP_H5_IO_BYTES ((size_t)8 << 20)

/* The one table I/O routine: write or read n rows (a range, or a list of row
 * numbers when idx != NULL).
 * Fast path: when the spec is the table's full row type (same columns, order
 * and types), rows are packed/unpacked here with memcpy and HDF5 moves bytes
 * without converting (HDF5's compound conversion costs ~6x in bandwidth and
 * much more with row lists). Otherwise (a subset or another order of
 * columns) HDF5 converts, matching columns by name. */
static int table_io(sp_h5 *h, const char *path, const sp_h5_col *cols, int ncol, long start, long n,
                    const long *idx, void *rows, int write)
{
    int status = SP_OK;
    size_t *offsets = NULL, rowsize = 0;
    copy_seg *seg = NULL;
    long nrows = 0;
    idx_pos *perm = NULL;
    hsize_t *coords = NULL;
    unsigned char *tmp = NULL;
    hid_t did = H5I_INVALID_HID, ftype = H5I_INVALID_HID, mt = H5I_INVALID_HID, pt = H5I_INVALID_HID;
    hid_t fsid = H5I_INVALID_HID, msid = H5I_INVALID_HID;
    const char *fn = write ? "sp_h5_table_write" : "sp_h5_table_read";
    SP_TRY(check_handle(h, path, fn));
    SP_CHECK(n >= 0 && (rows || n == 0), SP_ERR_INTERNAL, "%s: %s: NULL buffer or negative row count", fn, path);
    if (write) SP_TRY(writable_check(h, path));
    SP_ALLOC(offsets, ncol > 0 ? ncol : 1);
    SP_TRY(sp_h5_table_layout(cols, ncol, offsets, &rowsize));
    SP_TRY(open_table(h, path, &did, &ftype, &nrows));
    SP_TRY(check_columns(h, path, ftype, cols, ncol));
    if (!idx)
        SP_CHECK(start >= 0 && start <= nrows && n <= nrows - start, SP_ERR_INPUT,
                 "%s: %s: rows %ld..%ld are outside the table (%ld rows)", h->path, path, start, start + n - 1,
                 nrows);
    if (n == 0) goto cleanup;
    if (idx) SP_TRY(sort_rows(h, path, nrows, idx, n, &coords, &perm));

    H5ID(mt, mem_type(cols, ncol, offsets, rowsize), h, path, "cannot build the row type");
    H5ID(pt, H5Tcopy(mt), h, path, "cannot copy the row type");
    H5C(H5Tpack(pt), h, path, "cannot pack the row type");
    htri_t same = H5Tequal(pt, ftype);
    H5C(same, h, path, "cannot compare row types");
    /* copy plan between the aligned and the packed row: runs of columns
     * that are adjacent in both layouts are copied with one memcpy */
    size_t psize = 0;
    int nseg = 0;
    SP_ALLOC(seg, ncol > 0 ? ncol : 1);
    for (int c = 0; c < ncol; c++) {
        size_t sz = type_size(cols[c].type, cols[c].len);
        if (nseg && seg[nseg - 1].mem + seg[nseg - 1].len == offsets[c] &&
            seg[nseg - 1].packed + seg[nseg - 1].len == psize)
            seg[nseg - 1].len += sz;
        else
            seg[nseg++] = (copy_seg){offsets[c], psize, sz};
        psize += sz;
    }
    /* bytes per row in the I/O buffer, and the row type HDF5 sees in memory */
    size_t iosize = same > 0 ? psize : rowsize;
    hid_t iot = same > 0 ? pt : mt;
    int staged = same > 0 || perm; /* rows copied through tmp */
    long chunk = (long)(SP_H5_IO_BYTES / iosize);
    if (chunk < 1) chunk = 1;
    if (chunk > n) chunk = n;
    if (staged) SP_ALLOC(tmp, (size_t)chunk * iosize);
    H5ID(fsid, H5Dget_space(did), h, path, "cannot get the dataspace");

    for (long k0 = 0; k0 < n; k0 += chunk) {
        long m = n - k0 < chunk ? n - k0 : chunk;
        if (idx) {
            H5C(H5Sselect_elements(fsid, H5S_SELECT_SET, (size_t)m, coords + k0), h, path,
                "cannot select %ld rows", m);
        } else {
            hsize_t s0 = (hsize_t)(start + k0), cnt = (hsize_t)m;
            H5C(H5Sselect_hyperslab(fsid, H5S_SELECT_SET, &s0, NULL, &cnt, NULL), h, path, "cannot select rows");
        }
        hsize_t mdim = (hsize_t)m;
        close_id(&msid);
        H5ID(msid, H5Screate_simple(1, &mdim, NULL), h, path, "cannot make the memory dataspace");
        unsigned char *user = rows;
        unsigned char *buf = staged ? tmp : user + (size_t)k0 * rowsize;
        if (write) {
            if (staged)
                for (long j = 0; j < m; j++) {
                    const unsigned char *src = user + (size_t)(perm ? perm[k0 + j].pos : k0 + j) * rowsize;
                    unsigned char *dst = tmp + (size_t)j * iosize;
                    if (same > 0)
                        for (int g = 0; g < nseg; g++) memcpy(dst + seg[g].packed, src + seg[g].mem, seg[g].len);
                    else
                        memcpy(dst, src, rowsize);
                }
            H5C(H5Dwrite(did, iot, msid, fsid, H5P_DEFAULT, buf), h, path, "cannot write %ld row(s)%s%ld", m,
                idx ? " starting at row " : " from row ", idx ? (long)coords[k0] : start + k0);
        } else {
            H5C(H5Dread(did, iot, msid, fsid, H5P_DEFAULT, buf), h, path, "cannot read %ld row(s)%s%ld", m,
                idx ? " starting at row " : " from row ", idx ? (long)coords[k0] : start + k0);
            if (staged)
                for (long j = 0; j < m; j++) {
                    unsigned char *dst = user + (size_t)(perm ? perm[k0 + j].pos : k0 + j) * rowsize;
                    const unsigned char *src = tmp + (size_t)j * iosize;
                    if (same > 0) {
                        memset(dst, 0, rowsize); /* padding bytes too: rows compare with memcmp */
                        for (int g = 0; g < nseg; g++) memcpy(dst + seg[g].mem, src + seg[g].packed, seg[g].len);
                    } else {
                        memcpy(dst, src, rowsize);
                    }
                }
        }
    }
    count_bytes(h, write, (double)n * (double)psize);
cleanup:
    close_id(&pt);
    close_id(&mt);
    close_id(&msid);
    close_id(&fsid);
    close_id(&ftype);
    close_id(&did);
    free(tmp);
    free(coords);
    free(perm);
    free(seg);
    free(offsets);
    return status;
}

int sp_h5_table_write(sp_h5 *h, const char *path, const sp_h5_col *cols, int ncol, long start, long n,
                      const void *rows)
{
    return table_io(h, path, cols, ncol, start, n, NULL, (void *)rows, 1);
}

int sp_h5_table_write_rows(sp_h5 *h, const char *path, const sp_h5_col *cols, int ncol, const long *idx, long n,
                           const void *rows)
{
    if (!idx && n > 0) return SP_FAIL(SP_ERR_INTERNAL, "sp_h5_table_write_rows: %s: NULL index list", path);
    static const long none = 0;
    return table_io(h, path, cols, ncol, 0, n, idx ? idx : &none, (void *)rows, 1);
}

int sp_h5_table_read(sp_h5 *h, const char *path, const sp_h5_col *cols, int ncol, long start, long n, void *rows)
{
    return table_io(h, path, cols, ncol, start, n, NULL, rows, 0);
}

int sp_h5_table_read_rows(sp_h5 *h, const char *path, const sp_h5_col *cols, int ncol, const long *idx, long n,
                          void *rows)
{
    if (!idx && n > 0) return SP_FAIL(SP_ERR_INTERNAL, "sp_h5_table_read_rows: %s: NULL index list", path);
    static const long none = 0;
    return table_io(h, path, cols, ncol, 0, n, idx ? idx : &none, rows, 0);
}

/* Read one column of rows [start, start+n) into out through a one-member
 * compound of element type etype (size esize). want: 'd' numeric, 'l'
 * integer, 's' string. */
static int read_col(sp_h5 *h, const char *path, const char *col, long start, long n, void *out, hid_t etype,
                    size_t esize, char want)
{
    int status = SP_OK;
    long nrows = 0;
    hid_t did = H5I_INVALID_HID, ftype = H5I_INVALID_HID, ctype = H5I_INVALID_HID, mt = H5I_INVALID_HID;
    hid_t fsid = H5I_INVALID_HID, msid = H5I_INVALID_HID;
    SP_TRY(check_handle(h, path, "sp_h5_table_read_col"));
    SP_CHECK(col && (out || n == 0), SP_ERR_INTERNAL, "sp_h5_table_read_col: %s: NULL argument", path);
    SP_TRY(open_table(h, path, &did, &ftype, &nrows));
    int mi = H5Tget_member_index(ftype, col);
    SP_CHECK(mi >= 0, SP_ERR_INPUT, "%s: %s has no column '%s'", h->path, path, col);
    H5ID(ctype, H5Tget_member_type(ftype, (unsigned)mi), h, path, "cannot get the type of column '%s'", col);
    H5T_class_t cl = H5Tget_class(ctype);
    if (want == 'd')
        SP_CHECK(cl == H5T_INTEGER || cl == H5T_FLOAT, SP_ERR_INPUT, "%s: %s: column '%s' is not numeric", h->path,
                 path, col);
    if (want == 'l')
        SP_CHECK(cl == H5T_INTEGER, SP_ERR_INPUT, "%s: %s: column '%s' is not an integer column (read it as double)",
                 h->path, path, col);
    if (want == 's') {
        SP_CHECK(cl == H5T_STRING && !H5Tis_variable_str(ctype), SP_ERR_INPUT,
                 "%s: %s: column '%s' is not a fixed-length string column", h->path, path, col);
        size_t need = H5Tget_size(ctype) + (H5Tget_strpad(ctype) == H5T_STR_NULLTERM ? 0 : 1);
        SP_CHECK(esize >= need, SP_ERR_INTERNAL, "%s: %s: column '%s' needs string width >= %zu, got %zu", h->path,
                 path, col, need, esize);
    }
    if (n == 0) goto cleanup;
    H5ID(fsid, H5Dget_space(did), h, path, "cannot get the dataspace");
    SP_CHECK(start >= 0 && start <= nrows && n <= nrows - start, SP_ERR_INPUT,
             "%s: %s: rows %ld..%ld are outside the table (%ld rows)", h->path, path, start, start + n - 1, nrows);
    hsize_t s0 = (hsize_t)start, cnt = (hsize_t)n;
    H5C(H5Sselect_hyperslab(fsid, H5S_SELECT_SET, &s0, NULL, &cnt, NULL), h, path, "cannot select rows");
    hsize_t mdim = (hsize_t)n;
    H5ID(msid, H5Screate_simple(1, &mdim, NULL), h, path, "cannot make the memory dataspace");
    H5ID(mt, H5Tcreate(H5T_COMPOUND, esize), h, path, "cannot build the column type");
    H5C(H5Tinsert(mt, col, 0, etype), h, path, "cannot build the column type");
    H5C(H5Dread(did, mt, msid, fsid, H5P_DEFAULT, out), h, path, "cannot read column '%s' (rows %ld..%ld)", col,
        start, start + n - 1);
    count_bytes(h, 0, (double)n * (double)esize);
cleanup:
    close_id(&mt);
    close_id(&msid);
    close_id(&fsid);
    close_id(&ctype);
    close_id(&ftype);
    close_id(&did);
    return status;
}

int sp_h5_table_read_col_double(sp_h5 *h, const char *path, const char *col, long start, long n, double *out)
{
    return read_col(h, path, col, start, n, out, H5T_NATIVE_DOUBLE, sizeof(double), 'd');
}

int sp_h5_table_read_col_long(sp_h5 *h, const char *path, const char *col, long start, long n, long *out)
{
    return read_col(h, path, col, start, n, out, H5T_NATIVE_LONG, sizeof(long), 'l');
}

int sp_h5_table_read_col_str(sp_h5 *h, const char *path, const char *col, long start, long n, char *out,
                             size_t width)
{
    int status = SP_OK;
    hid_t st = H5I_INVALID_HID;
    SP_TRY(check_handle(h, path, "sp_h5_table_read_col_str"));
    SP_CHECK(width >= 2, SP_ERR_INTERNAL, "sp_h5_table_read_col_str: %s: width must be >= 2", path);
    st = H5Tcopy(H5T_C_S1);
    if (st < 0 || H5Tset_size(st, width) < 0 || H5Tset_strpad(st, H5T_STR_NULLTERM) < 0) {
        status = H5FAIL(h, path, "cannot build a string type");
        goto cleanup;
    }
    SP_TRY(read_col(h, path, col, start, n, out, st, width, 's'));
cleanup:
    close_id(&st);
    return status;
}

static char *attr_str_or_empty(sp_h5 *h, const char *obj, const char *name)
{
    int ex = 0;
    char *v = NULL;
    if (sp_h5_attr_exists(h, obj, name, &ex) == SP_OK && ex && sp_h5_attr_get_str(h, obj, name, &v) == SP_OK)
        return v;
    sp_err_clear();
    return dupstr("");
}

int sp_h5_table_describe(sp_h5 *h, const char *path, sp_h5_table_info *info)
{
    int status = SP_OK;
    hid_t did = H5I_INVALID_HID, ftype = H5I_INVALID_HID, mt = H5I_INVALID_HID;
    char *mname = NULL;
    SP_CHECK(info, SP_ERR_INTERNAL, "sp_h5_table_describe: NULL argument");
    memset(info, 0, sizeof *info);
    SP_TRY(check_handle(h, path, "sp_h5_table_describe"));
    SP_TRY(open_table(h, path, &did, &ftype, &info->nrows));
    int nm = H5Tget_nmembers(ftype);
    H5C(nm, h, path, "cannot count the columns");
    SP_ALLOC(info->cols, nm > 0 ? nm : 1);
    for (int i = 0; i < nm; i++) {
        sp_h5_col *c = &info->cols[i];
        mname = H5Tget_member_name(ftype, (unsigned)i);
        SP_CHECK(mname, SP_ERR_HDF5, "%s: %s: cannot get the name of column %d", h->path, path, i);
        c->name = dupstr(mname);
        H5free_memory(mname);
        mname = NULL;
        SP_CHECK(c->name, SP_ERR_NOMEM, "out of memory");
        info->ncol = i + 1;
        H5ID(mt, H5Tget_member_type(ftype, (unsigned)i), h, path, "cannot get the type of column '%s'", c->name);
        H5T_class_t cl = H5Tget_class(mt);
        size_t sz = H5Tget_size(mt);
        if (cl == H5T_INTEGER) {
            int sgn = H5Tget_sign(mt) == H5T_SGN_2;
            if (sz == 1) c->type = sgn ? SP_H5_I8 : SP_H5_U8;
            else if (sz == 2 || (sz == 4 && sgn)) c->type = SP_H5_I32; /* lossless widening */
            else if (sz == 4 || (sz == 8 && sgn)) c->type = SP_H5_I64;
            else SP_CHECK(0, SP_ERR_INPUT, "%s: %s: column '%s' is a %s %zu-byte integer (not supported)", h->path,
                          path, c->name, sgn ? "signed" : "unsigned", sz);
        } else if (cl == H5T_FLOAT) {
            SP_CHECK(sz == 4 || sz == 8, SP_ERR_INPUT, "%s: %s: column '%s' is a %zu-byte float (not supported)",
                     h->path, path, c->name, sz);
            c->type = sz == 4 ? SP_H5_F32 : SP_H5_F64;
        } else if (cl == H5T_STRING && !H5Tis_variable_str(mt)) {
            c->type = SP_H5_STR;
            c->len = (int)sz + (H5Tget_strpad(mt) == H5T_STR_NULLTERM ? 0 : 1);
        } else {
            SP_CHECK(0, SP_ERR_INPUT, "%s: %s: column '%s' has a type surveyproc tables do not use (class %d)",
                     h->path, path, c->name, (int)cl);
        }
        close_id(&mt);
        char an[512];
        snprintf(an, sizeof an, "%s_unit", c->name);
        c->unit = attr_str_or_empty(h, path, an);
        snprintf(an, sizeof an, "%s_description", c->name);
        c->description = attr_str_or_empty(h, path, an);
        SP_CHECK(c->unit && c->description, SP_ERR_NOMEM, "out of memory");
    }
cleanup:
    if (mname) H5free_memory(mname);
    close_id(&mt);
    close_id(&ftype);
    close_id(&did);
    if (status != SP_OK && info) sp_h5_table_info_free(info);
    return status;
}

void sp_h5_table_info_free(sp_h5_table_info *info)
{
    if (!info) return;
    if (info->cols)
        for (int i = 0; i < info->ncol; i++) {
            free((char *)info->cols[i].name);
            free((char *)info->cols[i].unit);
            free((char *)info->cols[i].description);
        }
    free(info->cols);
    memset(info, 0, sizeof *info);
}

/* ------------------------------------------------------------------------- */
/* arrays                                                                     */

static int array_create_local(sp_h5 *h, const char *path, sp_h5_type type, int ndim, const long *dims,
                              const long *chunk, const double *fill, int check_only)
{
    int status = SP_OK, ex = 0;
    hid_t sid = H5I_INVALID_HID, dcpl = H5I_INVALID_HID, lcpl = H5I_INVALID_HID, did = H5I_INVALID_HID;
    hsize_t d[SP_H5_MAXDIM], c[SP_H5_MAXDIM];
    unsigned char fv[8];
    SP_TRY(check_handle(h, path, "sp_h5_array_create"));
    SP_TRY(writable_check(h, path));
    SP_CHECK(valid_numeric(type), SP_ERR_INTERNAL, "%s: %s: arrays need a numeric type (got %s)", h->path, path,
             type_name(type));
    SP_CHECK(ndim >= 1 && ndim <= SP_H5_MAXDIM && dims, SP_ERR_INTERNAL, "%s: %s: bad rank %d (1..%d)", h->path,
             path, ndim, SP_H5_MAXDIM);
    for (int i = 0; i < ndim; i++) {
        SP_CHECK(dims[i] >= 0, SP_ERR_INTERNAL, "%s: %s: negative dimension %ld", h->path, path, dims[i]);
        d[i] = (hsize_t)dims[i];
        if (chunk) {
            SP_CHECK(chunk[i] >= 1 && (chunk[i] <= dims[i] || dims[i] == 0), SP_ERR_INTERNAL,
                     "%s: %s: chunk dimension %d is %ld (must be 1..%ld)", h->path, path, i, chunk[i], dims[i]);
            c[i] = (hsize_t)chunk[i];
        }
    }
    double fvd = fill ? *fill : default_fill(type);
    SP_CHECK(fill_ok(type, fvd), SP_ERR_INTERNAL, "%s: %s: fill value %g does not fit type %s", h->path, path, fvd,
             type_name(type));
    put_value(fv, type, fvd);
    SP_TRY(exists_path(h, path, &ex));
    SP_CHECK(!ex, SP_ERR_INPUT, "%s: %s already exists (arrays are created once)", h->path, path);
    if (check_only) {
        double need = (double)type_size(type, 0); /* chunks are allocated whole */
        for (int i = 0; i < ndim; i++)
            need *= chunk ? (double)((d[i] + c[i] - 1) / c[i]) * (double)c[i] : (double)d[i];
        SP_TRY(space_check(h->path, path, h->rank, need));
        goto cleanup;
    }
    H5ID(sid, H5Screate_simple(ndim, d, NULL), h, path, "cannot make the dataspace");
    H5ID(dcpl, H5Pcreate(H5P_DATASET_CREATE), h, path, "cannot make a property list");
    if (chunk) H5C(H5Pset_chunk(dcpl, ndim, c), h, path, "cannot set the chunk shape");
    else H5C(H5Pset_layout(dcpl, H5D_CONTIGUOUS), h, path, "cannot set the layout");
    H5C(H5Pset_alloc_time(dcpl, H5D_ALLOC_TIME_EARLY), h, path, "cannot set early allocation");
    H5C(H5Pset_fill_time(dcpl, H5D_FILL_TIME_ALLOC), h, path, "cannot set the fill time");
    H5C(H5Pset_fill_value(dcpl, native_of(type), fv), h, path, "cannot set the fill value");
    H5ID(lcpl, make_lcpl(), h, path, "cannot make a link property list");
    H5ID(did, H5Dcreate2(h->fid, path, native_of(type), sid, lcpl, dcpl, H5P_DEFAULT), h, path,
         "cannot create the %s array", type_name(type));
cleanup:
    close_id(&did);
    close_id(&lcpl);
    close_id(&dcpl);
    close_id(&sid);
    return status;
}

int sp_h5_array_create(sp_h5 *h, const char *path, sp_h5_type type, int ndim, const long *dims, const long *chunk,
                       const double *fill)
{
    int status = agree(h, array_create_local(h, path, type, ndim, dims, chunk, fill, 1));
    if (status == SP_OK) status = agree(h, array_create_local(h, path, type, ndim, dims, chunk, fill, 0));
    return status;
}

static int array_io(sp_h5 *h, const char *path, sp_h5_type type, const long *start, const long *count, void *buf,
                    int write)
{
    int status = SP_OK;
    hid_t did = H5I_INVALID_HID, fsid = H5I_INVALID_HID, msid = H5I_INVALID_HID;
    hsize_t d[H5S_MAX_RANK], s[H5S_MAX_RANK], c[H5S_MAX_RANK];
    const char *fn = write ? "sp_h5_array_write" : "sp_h5_array_read";
    SP_TRY(check_handle(h, path, fn));
    if (write) SP_TRY(writable_check(h, path));
    SP_CHECK(valid_numeric(type), SP_ERR_INTERNAL, "%s: %s: %s: arrays need a numeric type", fn, h->path, path);
    SP_CHECK(!start == !count, SP_ERR_INTERNAL, "%s: %s: give both start and count, or neither", fn, path);
    SP_TRY(open_dset(h, path, &did));
    H5ID(fsid, H5Dget_space(did), h, path, "cannot get the dataspace");
    int nd = H5Sget_simple_extent_ndims(fsid);
    H5C(nd, h, path, "cannot get the rank");
    H5C(H5Sget_simple_extent_dims(fsid, d, NULL), h, path, "cannot get the dimensions");
    double nel = 1;
    for (int i = 0; i < nd; i++) {
        if (start) {
            SP_CHECK(start[i] >= 0 && count[i] >= 0 && (hsize_t)start[i] + (hsize_t)count[i] <= d[i], SP_ERR_INPUT,
                     "%s: %s: dimension %d: %ld..%ld is outside 0..%llu", h->path, path, i, start[i],
                     start[i] + count[i] - 1, (unsigned long long)d[i] - 1);
            s[i] = (hsize_t)start[i];
            c[i] = (hsize_t)count[i];
        } else {
            s[i] = 0;
            c[i] = d[i];
        }
        nel *= (double)c[i];
    }
    if (nel == 0) goto cleanup;
    SP_CHECK(buf, SP_ERR_INTERNAL, "%s: %s: NULL buffer", fn, path);
    H5C(H5Sselect_hyperslab(fsid, H5S_SELECT_SET, s, NULL, c, NULL), h, path, "cannot select the hyperslab");
    H5ID(msid, H5Screate_simple(nd, c, NULL), h, path, "cannot make the memory dataspace");
    if (write)
        H5C(H5Dwrite(did, native_of(type), msid, fsid, H5P_DEFAULT, buf), h, path, "cannot write %.0f element(s)",
            nel);
    else
        H5C(H5Dread(did, native_of(type), msid, fsid, H5P_DEFAULT, buf), h, path, "cannot read %.0f element(s)",
            nel);
    count_bytes(h, write, nel * (double)type_size(type, 0));
cleanup:
    close_id(&msid);
    close_id(&fsid);
    close_id(&did);
    return status;
}

int sp_h5_array_write(sp_h5 *h, const char *path, sp_h5_type type, const long *start, const long *count,
                      const void *buf)
{
    return array_io(h, path, type, start, count, (void *)buf, 1);
}

int sp_h5_array_read(sp_h5 *h, const char *path, sp_h5_type type, const long *start, const long *count, void *buf)
{
    return array_io(h, path, type, start, count, buf, 0);
}

/* ------------------------------------------------------------------------- */
/* attributes                                                                 */

static int open_obj(const sp_h5 *h, const char *obj, hid_t *oid)
{
    int status = SP_OK, ex = 0;
    *oid = H5I_INVALID_HID;
    SP_TRY(exists_path(h, obj, &ex));
    SP_CHECK(ex, SP_ERR_INPUT, "%s: no object %s in this file (missing object)", h->path, obj);
    H5ID(*oid, H5Oopen(h->fid, obj, H5P_DEFAULT), h, obj, "cannot open the object");
cleanup:
    return status;
}

/* Create (replacing) attribute `name` on the open object oid (path obj) with
 * file/memory type `type`, a dataspace of n elements (n < 0: scalar), and
 * write data. */
static int attr_write_id(const sp_h5 *h, hid_t oid, const char *obj, const char *name, hid_t type, long n,
                         const void *data)
{
    int status = SP_OK;
    hid_t sid = H5I_INVALID_HID, aid = H5I_INVALID_HID;
    SP_CHECK(name && name[0], SP_ERR_INTERNAL, "%s: %s: empty attribute name", h->path, obj);
    SP_CHECK(n != 0, SP_ERR_INTERNAL, "%s: %s: attribute %s: empty array", h->path, obj, name);
    htri_t ex = H5Aexists(oid, name);
    H5C(ex, h, obj, "cannot look up attribute %s", name);
    if (ex > 0) H5C(H5Adelete(oid, name), h, obj, "cannot replace attribute %s", name);
    if (n < 0) H5ID(sid, H5Screate(H5S_SCALAR), h, obj, "cannot make a dataspace");
    else {
        hsize_t d = (hsize_t)n;
        H5ID(sid, H5Screate_simple(1, &d, NULL), h, obj, "cannot make a dataspace");
    }
    H5ID(aid, H5Acreate2(oid, name, type, sid, H5P_DEFAULT, H5P_DEFAULT), h, obj, "cannot create attribute %s",
         name);
    H5C(H5Awrite(aid, type, data), h, obj, "cannot write attribute %s", name);
cleanup:
    close_id(&aid);
    close_id(&sid);
    return status;
}

/* attr_write_id on the object at path obj. */
static int attr_set(sp_h5 *h, const char *obj, const char *name, hid_t type, long n, const void *data)
{
    int status = SP_OK;
    hid_t oid = H5I_INVALID_HID;
    SP_TRY(check_handle(h, obj, "sp_h5_attr_set"));
    SP_TRY(writable_check(h, obj));
    SP_TRY(open_obj(h, obj, &oid));
    SP_TRY(attr_write_id(h, oid, obj, name, type, n, data));
cleanup:
    close_id(&oid);
    return status;
}

static hid_t vlen_str_type(void)
{
    hid_t t = H5Tcopy(H5T_C_S1);
    if (t < 0) return t;
    if (H5Tset_size(t, H5T_VARIABLE) < 0 || H5Tset_cset(t, H5T_CSET_UTF8) < 0) {
        H5Tclose(t);
        return H5I_INVALID_HID;
    }
    return t;
}

static int attr_set_str_local(sp_h5 *h, const char *obj, const char *name, const char *value)
{
    int status = SP_OK;
    hid_t t = H5I_INVALID_HID;
    SP_CHECK(h && value, SP_ERR_INTERNAL, "sp_h5_attr_set_str: NULL argument");
    SP_TRY(check_handle(h, obj, "sp_h5_attr_set_str"));
    H5ID(t, vlen_str_type(), h, obj, "cannot make a string type");
    SP_TRY(attr_set(h, obj, name, t, -1, &value));
cleanup:
    close_id(&t);
    return status;
}

int sp_h5_attr_set_str(sp_h5 *h, const char *obj, const char *name, const char *value)
{
    return agree(h, attr_set_str_local(h, obj, name, value));
}

int sp_h5_attr_set_double(sp_h5 *h, const char *obj, const char *name, double value)
{
    return agree(h, attr_set(h, obj, name, H5T_NATIVE_DOUBLE, -1, &value));
}

int sp_h5_attr_set_long(sp_h5 *h, const char *obj, const char *name, long value)
{
    int64_t v = value;
    return agree(h, attr_set(h, obj, name, H5T_NATIVE_INT64, -1, &v));
}

int sp_h5_attr_set_doubles(sp_h5 *h, const char *obj, const char *name, const double *v, long n)
{
    int st = (v && n >= 1) ? attr_set(h, obj, name, H5T_NATIVE_DOUBLE, n, v)
                           : SP_FAIL(SP_ERR_INTERNAL, "sp_h5_attr_set_doubles: need n >= 1 values");
    return agree(h, st);
}

int sp_h5_attr_set_longs(sp_h5 *h, const char *obj, const char *name, const long *v, long n)
{
    int status = SP_OK;
    int64_t *tmp = NULL;
    SP_CHECK(v && n >= 1, SP_ERR_INTERNAL, "sp_h5_attr_set_longs: need n >= 1 values");
    SP_ALLOC(tmp, n);
    for (long i = 0; i < n; i++) tmp[i] = v[i];
    status = attr_set(h, obj, name, H5T_NATIVE_INT64, n, tmp);
cleanup:
    free(tmp);
    return agree(h, status);
}

int sp_h5_attr_exists(sp_h5 *h, const char *obj, const char *name, int *exists)
{
    int status = SP_OK;
    hid_t oid = H5I_INVALID_HID;
    SP_CHECK(name && exists, SP_ERR_INTERNAL, "sp_h5_attr_exists: NULL argument");
    *exists = 0;
    SP_TRY(check_handle(h, obj, "sp_h5_attr_exists"));
    SP_TRY(open_obj(h, obj, &oid));
    htri_t ex = H5Aexists(oid, name);
    H5C(ex, h, obj, "cannot look up attribute %s", name);
    *exists = ex > 0;
cleanup:
    close_id(&oid);
    return status;
}

/* Open attribute `name` of obj; missing -> SP_ERR_INPUT naming both. */
static int open_attr(const sp_h5 *h, const char *obj, const char *name, hid_t *aid)
{
    int status = SP_OK;
    hid_t oid = H5I_INVALID_HID;
    *aid = H5I_INVALID_HID;
    SP_CHECK(name, SP_ERR_INTERNAL, "sp_h5_attr_get: NULL name");
    SP_TRY(open_obj(h, obj, &oid));
    htri_t ex = H5Aexists(oid, name);
    H5C(ex, h, obj, "cannot look up attribute %s", name);
    SP_CHECK(ex > 0, SP_ERR_INPUT, "%s: %s has no attribute '%s'", h->path, obj, name);
    H5ID(*aid, H5Aopen(oid, name, H5P_DEFAULT), h, obj, "cannot open attribute %s", name);
cleanup:
    close_id(&oid);
    return status;
}

int sp_h5_attr_get_str(sp_h5 *h, const char *obj, const char *name, char **value)
{
    int status = SP_OK;
    hid_t aid = H5I_INVALID_HID, ft = H5I_INVALID_HID, mt = H5I_INVALID_HID, sid = H5I_INVALID_HID;
    char *vl = NULL, *buf = NULL;
    SP_CHECK(value, SP_ERR_INTERNAL, "sp_h5_attr_get_str: NULL argument");
    *value = NULL;
    SP_TRY(check_handle(h, obj, "sp_h5_attr_get_str"));
    SP_TRY(open_attr(h, obj, name, &aid));
    H5ID(ft, H5Aget_type(aid), h, obj, "cannot get the type of attribute %s", name);
    SP_CHECK(H5Tget_class(ft) == H5T_STRING, SP_ERR_INPUT, "%s: %s: attribute %s is not a string", h->path, obj,
             name);
    H5ID(sid, H5Aget_space(aid), h, obj, "cannot get the dataspace of attribute %s", name);
    SP_CHECK(H5Sget_simple_extent_npoints(sid) == 1, SP_ERR_INPUT,
             "%s: %s: attribute %s is an array of strings, expected one string", h->path, obj, name);
    if (H5Tis_variable_str(ft) > 0) {
        H5ID(mt, vlen_str_type(), h, obj, "cannot make a string type");
        H5C(H5Aread(aid, mt, &vl), h, obj, "cannot read attribute %s", name);
        buf = dupstr(vl ? vl : "");
        SP_CHECK(buf, SP_ERR_NOMEM, "out of memory");
    } else {
        size_t sz = H5Tget_size(ft);
        H5ID(mt, H5Tcopy(H5T_C_S1), h, obj, "cannot make a string type");
        H5C(H5Tset_size(mt, sz + 1), h, obj, "cannot make a string type");
        H5C(H5Tset_strpad(mt, H5T_STR_NULLTERM), h, obj, "cannot make a string type");
        SP_ALLOC(buf, sz + 1);
        H5C(H5Aread(aid, mt, buf), h, obj, "cannot read attribute %s", name);
        buf[sz] = '\0';
    }
    *value = buf;
    buf = NULL;
cleanup:
    if (vl) H5free_memory(vl);
    free(buf);
    close_id(&sid);
    close_id(&mt);
    close_id(&ft);
    close_id(&aid);
    return status;
}

/* Read a numeric attribute (scalar or 1-D) into v[0..nmax-1] as memory type mt. */
static int attr_get_num(sp_h5 *h, const char *obj, const char *name, hid_t mt, size_t esize, void *v, long nmax,
                        long *n, int want_int)
{
    int status = SP_OK;
    hid_t aid = H5I_INVALID_HID, ft = H5I_INVALID_HID, sid = H5I_INVALID_HID;
    void *tmp = NULL;
    SP_TRY(check_handle(h, obj, "sp_h5_attr_get"));
    SP_CHECK(v && nmax >= 1, SP_ERR_INTERNAL, "sp_h5_attr_get: NULL buffer");
    SP_TRY(open_attr(h, obj, name, &aid));
    H5ID(ft, H5Aget_type(aid), h, obj, "cannot get the type of attribute %s", name);
    H5T_class_t cl = H5Tget_class(ft);
    SP_CHECK(cl == H5T_INTEGER || (!want_int && cl == H5T_FLOAT), SP_ERR_INPUT,
             "%s: %s: attribute %s is not %s", h->path, obj, name, want_int ? "an integer" : "numeric");
    H5ID(sid, H5Aget_space(aid), h, obj, "cannot get the dataspace of attribute %s", name);
    hssize_t np = H5Sget_simple_extent_npoints(sid);
    SP_CHECK(np >= 1, SP_ERR_INPUT, "%s: %s: attribute %s is empty", h->path, obj, name);
    if (n) *n = (long)np;
    if (np <= nmax) {
        H5C(H5Aread(aid, mt, v), h, obj, "cannot read attribute %s", name);
    } else {
        SP_CHECK(!n, SP_ERR_INPUT, "%s: %s: attribute %s has %lld values, room for %ld", h->path, obj, name,
                 (long long)np, nmax);
        tmp = malloc((size_t)np * esize);
        SP_CHECK(tmp, SP_ERR_NOMEM, "out of memory");
        H5C(H5Aread(aid, mt, tmp), h, obj, "cannot read attribute %s", name);
        memcpy(v, tmp, esize * (size_t)nmax);
    }
cleanup:
    free(tmp);
    close_id(&sid);
    close_id(&ft);
    close_id(&aid);
    return status;
}

int sp_h5_attr_get_double(sp_h5 *h, const char *obj, const char *name, double *value)
{
    return attr_get_num(h, obj, name, H5T_NATIVE_DOUBLE, sizeof(double), value, 1, NULL, 0);
}

int sp_h5_attr_get_long(sp_h5 *h, const char *obj, const char *name, long *value)
{
    return attr_get_num(h, obj, name, H5T_NATIVE_LONG, sizeof(long), value, 1, NULL, 1);
}

int sp_h5_attr_get_doubles(sp_h5 *h, const char *obj, const char *name, double *v, long nmax, long *n)
{
    long dummy = 0;
    return attr_get_num(h, obj, name, H5T_NATIVE_DOUBLE, sizeof(double), v, nmax, n ? n : &dummy, 0);
}

int sp_h5_attr_get_longs(sp_h5 *h, const char *obj, const char *name, long *v, long nmax, long *n)
{
    long dummy = 0;
    return attr_get_num(h, obj, name, H5T_NATIVE_LONG, sizeof(long), v, nmax, n ? n : &dummy, 1);
}

/* sp_error.h — one error convention for all of surveyproc.
 *
 * Every fallible function returns an int status: SP_OK (0) or one of the
 * sp_status codes below. The human-readable detail (what failed, naming the
 * file / line / key / HDU and what to do) lives in a thread-local buffer set by
 * SP_FAIL() and read with sp_err_msg(). Callers may add context with
 * sp_err_context() while the error propagates ("while reading catalog: ...").
 *
 * Library code never calls exit() or MPI_Abort(); only the driver (src/cli)
 * decides to abort, via sp_die().
 *
 * Function shape used throughout:
 *
 *     int sp_thing_do(...) {
 *         int status = SP_OK;
 *         double *buf = NULL;
 *         SP_CHECK(n > 0, SP_ERR_INPUT, "%s: empty table", path);
 *         SP_ALLOC(buf, n);
 *         SP_TRY(sp_other(buf, n));
 *     cleanup:
 *         free(buf);
 *         return status;
 *     }
 *
 * Thread safety: the message buffer is thread-local; every function is safe.
 */
#ifndef SP_ERROR_H
#define SP_ERROR_H

#include <stddef.h>

typedef enum {
    SP_OK = 0,
    SP_ERR_NOMEM = 1,    /* allocation failed */
    SP_ERR_IO = 2,       /* file missing, unreadable, disk full */
    SP_ERR_INPUT = 3,    /* bad user input: catalog, image list, header contents */
    SP_ERR_CONFIG = 4,   /* bad configuration: YAML syntax, unknown key, type, range */
    SP_ERR_FITS = 5,     /* cfitsio reported an error */
    SP_ERR_WCS = 6,      /* wcslib reported an error or no celestial WCS */
    SP_ERR_HDF5 = 7,     /* HDF5 reported an error */
    SP_ERR_MPI = 8,      /* MPI failure or a peer rank failed */
    SP_ERR_NUMERIC = 9,  /* singular matrix, non-finite result */
    SP_ERR_STATE = 10,   /* wrong order of calls, resume mismatch */
    SP_ERR_RESOURCE = 11,/* layout would oversubscribe cores or memory */
    SP_ERR_INTERNAL = 12,/* a bug: an invariant did not hold */
    SP_ERR_NOTBUILT = 13 /* feature not built yet */
} sp_status;

/* Exit code the CLI uses for a status (2 usage/not built, 3 input/config, 4 I/O, 5 other). */
int sp_status_exit_code(int status);

/* Short name of a status code ("input error", "I/O error", ...). */
const char *sp_status_name(int status);

/* Record an error: formats the message into the thread-local buffer, remembers
 * file:line of the call site, and returns `code` (so `return SP_FAIL(...)` works). */
int sp_err_set(int code, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Prefix the current message with context: "context: old message". Returns the
 * current code. */
int sp_err_context(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

const char *sp_err_msg(void);  /* the current message ("" if none) */
const char *sp_err_where(void);/* "file.c:123" of the first SP_FAIL, "" if none */
int sp_err_code(void);         /* the current code (SP_OK if none) */
void sp_err_clear(void);

#define SP_FAIL(code, ...) sp_err_set((code), __FILE__, __LINE__, __VA_ARGS__)

/* Propagate a failing status to the function's `cleanup:` label. Requires a
 * local `int status`. */
#define SP_TRY(expr)                                                           \
    do {                                                                       \
        int sp_try_st_ = (expr);                                               \
        if (sp_try_st_ != SP_OK) {                                             \
            status = sp_try_st_;                                               \
            goto cleanup;                                                      \
        }                                                                      \
    } while (0)

/* Check a condition; on failure set the message and go to `cleanup:`. */
#define SP_CHECK(cond, code, ...)                                              \
    do {                                                                       \
        if (!(cond)) {                                                         \
            status = SP_FAIL((code), __VA_ARGS__);                             \
            goto cleanup;                                                      \
        }                                                                      \
    } while (0)

/* Allocate n elements of *ptr (zeroed); on failure SP_ERR_NOMEM and cleanup. */
#define SP_ALLOC(ptr, n)                                                       \
    do {                                                                       \
        size_t sp_alloc_n_ = (size_t)(n);                                      \
        (ptr) = calloc(sp_alloc_n_ ? sp_alloc_n_ : 1, sizeof(*(ptr)));         \
        if (!(ptr)) {                                                          \
            status = SP_FAIL(SP_ERR_NOMEM, "out of memory allocating %zu x %zu bytes", \
                             sp_alloc_n_, sizeof(*(ptr)));                     \
            goto cleanup;                                                      \
        }                                                                      \
    } while (0)

#endif

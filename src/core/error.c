/* error.c — thread-local error message and status codes (see sp_error.h). */
#include "surveyproc/sp_error.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#define SP_ERR_MSG_MAX 2048

static _Thread_local char err_msg[SP_ERR_MSG_MAX];
static _Thread_local char err_where[256];
static _Thread_local int err_code;

int sp_err_set(int code, const char *file, int line, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err_msg, sizeof err_msg, fmt, ap);
    va_end(ap);
    const char *base = strrchr(file, '/');
    snprintf(err_where, sizeof err_where, "%s:%d", base ? base + 1 : file, line);
    err_code = code;
    return code;
}

int sp_err_context(const char *fmt, ...)
{
    char ctx[512], old[SP_ERR_MSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ctx, sizeof ctx, fmt, ap);
    va_end(ap);
    memcpy(old, err_msg, sizeof old);
    /* keep the newest context and as much of the old message as fits */
    size_t n = strlen(ctx);
    if (n > sizeof err_msg - 3) n = sizeof err_msg - 3;
    memcpy(err_msg, ctx, n);
    memcpy(err_msg + n, ": ", 2);
    size_t room = sizeof err_msg - n - 3, olen = strnlen(old, sizeof old - 1);
    if (olen > room) olen = room;
    memcpy(err_msg + n + 2, old, olen);
    err_msg[n + 2 + olen] = '\0';
    return err_code;
}

const char *sp_err_msg(void) { return err_msg; }
const char *sp_err_where(void) { return err_where; }
int sp_err_code(void) { return err_code; }

void sp_err_clear(void)
{
    err_msg[0] = '\0';
    err_where[0] = '\0';
    err_code = SP_OK;
}

const char *sp_status_name(int status)
{
    switch (status) {
    case SP_OK: return "ok";
    case SP_ERR_NOMEM: return "out of memory";
    case SP_ERR_IO: return "I/O error";
    case SP_ERR_INPUT: return "input error";
    case SP_ERR_CONFIG: return "config error";
    case SP_ERR_FITS: return "FITS error";
    case SP_ERR_WCS: return "WCS error";
    case SP_ERR_HDF5: return "HDF5 error";
    case SP_ERR_MPI: return "MPI error";
    case SP_ERR_NUMERIC: return "numerical error";
    case SP_ERR_STATE: return "state error";
    case SP_ERR_RESOURCE: return "resource error";
    case SP_ERR_INTERNAL: return "internal error";
    case SP_ERR_NOTBUILT: return "not built yet";
    default: return "error";
    }
}

int sp_status_exit_code(int status)
{
    switch (status) {
    case SP_OK: return 0;
    case SP_ERR_NOTBUILT: return 2;
    case SP_ERR_INPUT:
    case SP_ERR_CONFIG:
    case SP_ERR_FITS:
    case SP_ERR_WCS: return 3;
    case SP_ERR_IO:
    case SP_ERR_HDF5: return 4;
    case SP_ERR_RESOURCE: return 6;
    default: return 5;
    }
}

/* mpi_util.c — error agreement and broadcasts (see sp_mpi.h). */
#include "surveyproc/sp_mpi.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_watchdog.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int sp_mpi_rank(void)
{
    int inited = 0, r = 0;
    MPI_Initialized(&inited);
    if (inited) MPI_Comm_rank(MPI_COMM_WORLD, &r);
    return r;
}

int sp_mpi_size(void)
{
    int inited = 0, n = 1;
    MPI_Initialized(&inited);
    if (inited) MPI_Comm_size(MPI_COMM_WORLD, &n);
    return n;
}

int sp_mpi_agree_at(int status, MPI_Comm comm, const char *file_at, int line_at)
{
    int rank, size;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &size);
    /* lowest failing rank: min over (status ? rank : size) */
    int mine = status != SP_OK ? rank : size, first = size;
    if (size > 1) sp_watchdog_arm_at("agreeing on the outcome of a step", 0, file_at, line_at);
    MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, comm);
    if (size > 1) sp_watchdog_disarm();
    if (first == size) return SP_OK;
    int code = status;
    char msg[2048], where[256];
    if (rank == first) {
        snprintf(msg, sizeof msg, "%s", sp_err_msg());
        snprintf(where, sizeof where, "%s", sp_err_where());
    }
    MPI_Bcast(&code, 1, MPI_INT, first, comm);
    MPI_Bcast(msg, sizeof msg, MPI_CHAR, first, comm);
    MPI_Bcast(where, sizeof where, MPI_CHAR, first, comm);
    msg[sizeof msg - 1] = where[sizeof where - 1] = '\0';
    /* keep the original call site in the message's where-field */
    char file[200] = "";
    int line = 0;
    const char *colon = strrchr(where, ':');
    if (colon) {
        size_t n = (size_t)(colon - where) < sizeof file - 1 ? (size_t)(colon - where) : sizeof file - 1;
        memcpy(file, where, n);
        file[n] = '\0';
        line = atoi(colon + 1);
    }
    if (size > 1 && first != 0)
        sp_err_set(code, file[0] ? file : "?", line, "rank %d: %s", first, msg);
    else
        sp_err_set(code, file[0] ? file : "?", line, "%s", msg);
    return code;
}

int sp_mpi_bcast_bytes(char **buf, size_t *len, int root, MPI_Comm comm)
{
    int status = SP_OK, rank;
    MPI_Comm_rank(comm, &rank);
    unsigned long long n = rank == root ? (unsigned long long)*len : 0;
    MPI_Bcast(&n, 1, MPI_UNSIGNED_LONG_LONG, root, comm);
    if (rank != root) {
        char *b = NULL;
        SP_ALLOC(b, n + 1);
        *buf = b;
        *len = (size_t)n;
    }
    /* chunk to stay below INT_MAX counts */
    for (unsigned long long off = 0; off < n; off += (1ULL << 30)) {
        unsigned long long c = n - off < (1ULL << 30) ? n - off : (1ULL << 30);
        MPI_Bcast(*buf + off, (int)c, MPI_BYTE, root, comm);
    }
cleanup:
    return status;
}

static int read_whole(const char *path, char **text, size_t *len)
{
    int status = SP_OK;
    char *b = NULL;
    FILE *f = fopen(path, "rb");
    SP_CHECK(f, SP_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    SP_CHECK(fseek(f, 0, SEEK_END) == 0, SP_ERR_IO, "%s: cannot seek: %s", path, strerror(errno));
    long n = ftell(f);
    SP_CHECK(n >= 0, SP_ERR_IO, "%s: cannot size: %s", path, strerror(errno));
    rewind(f);
    SP_ALLOC(b, (size_t)n + 1);
    SP_CHECK(fread(b, 1, (size_t)n, f) == (size_t)n, SP_ERR_IO, "%s: read failed: %s", path, strerror(errno));
    b[n] = '\0';
    *text = b;
    *len = (size_t)n;
    b = NULL;
cleanup:
    if (f) fclose(f);
    free(b);
    return status;
}

int sp_mpi_read_file_bcast(const char *path, char **text, size_t *len, int root, MPI_Comm comm)
{
    int status = SP_OK, rank;
    MPI_Comm_rank(comm, &rank);
    *text = NULL;
    *len = 0;
    if (rank == root) status = read_whole(path, text, len);
    status = sp_mpi_agree(status, comm);
    if (status != SP_OK) {
        free(*text);
        *text = NULL;
        return status;
    }
    return sp_mpi_bcast_bytes(text, len, root, comm);
}

/* support.c — test helpers (see support.h). */
#include "support.h"

#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char tmpdir[512];

static void rm_tmpdir(void)
{
    if (!tmpdir[0] || getenv("SP_KEEP_TMP")) return;
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (system(cmd) != 0) fprintf(stderr, "warning: could not remove %s\n", tmpdir);
}

const char *sp_test_tmpdir(void)
{
    if (tmpdir[0]) return tmpdir;
    const char *base = getenv("TMPDIR");
    snprintf(tmpdir, sizeof tmpdir, "%s/sptest.XXXXXX", base && base[0] ? base : "/tmp");
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        abort();
    }
    atexit(rm_tmpdir);
    return tmpdir;
}

const char *sp_test_path(const char *name, char *buf, size_t n)
{
    snprintf(buf, n, "%s/%s", sp_test_tmpdir(), name);
    return buf;
}

const char *sp_test_write(const char *name, const char *text, char *buf, size_t n)
{
    sp_test_path(name, buf, n);
    FILE *f = fopen(buf, "w");
    if (!f) {
        perror(buf);
        abort();
    }
    fputs(text, f);
    fclose(f);
    return buf;
}

const char *sp_test_srcdir(void)
{
    const char *s = getenv("SP_SRCDIR");
    return s && s[0] ? s : ".";
}

int sp_test_all_ranks(int ok)
{
    int inited = 0, all = ok;
    MPI_Initialized(&inited);
    if (inited) MPI_Allreduce(&ok, &all, 1, MPI_INT, MPI_LAND, MPI_COMM_WORLD);
    return all;
}

void sp_test_quiet_nonroot(void)
{
    int rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    if (rank != 0) {
        if (!freopen("/dev/null", "w", stdout)) abort();
        if (!freopen("/dev/null", "w", stderr)) abort();
    }
}

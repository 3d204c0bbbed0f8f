/* exit_shim.c — LD_PRELOAD fault injector for tests/scripts/test_faults.sh (not linked into
 * surveyproc). It wraps MPI_Send and MPI_Finalize through the MPI profiling interface (PMPI), and
 * H5Fclose through dlsym(RTLD_NEXT), and makes one rank leave the job abruptly, as a node crash or an OOM kill
 * would, or stop dead, as a hung node would, without touching the program:
 *
 *   SP_FAULT_RANK=R        the rank that leaves (MPI_COMM_WORLD rank)
 *   SP_FAULT_AFTER=N       ... when it sends its N-th cell-queue "ready" message (tag 7101,
 *                          src/parallel/coordinator.c), i.e. after N-1 finished cells of the pass
 *   SP_FAULT_H5FCLOSE=N    ... or when it enters its N-th H5Fclose (every HDF5 file it closes;
 *                          the store's final close is a collective call in parallel HDF5)
 *   SP_FAULT_FINALIZE=1    ... or when it enters MPI_Finalize (the command has finished; the
 *                          other ranks wait for it in their own MPI_Finalize)
 *   SP_FAULT_CODE=C        exit status (default 0: a clean-looking exit without MPI_Finalize)
 *   SP_FAULT_ACTION=stop   instead of exiting, stop the process with SIGSTOP (a hang: no socket
 *                          closes, the launcher sees nothing; only a watchdog can end the job)
 *   SP_FAULT_STAMP=FILE    write the wall-clock time of the fault there (seconds since the epoch),
 *                          so the test can measure how long the job takes to end after it
 *
 * _exit() skips atexit handlers and MPI_Finalize: the launcher sees a process end while the
 * others are still inside MPI calls. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <mpi.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define TAG_READY 7101

static int my_rank(void)
{
    int rank = -1, inited = 0;
    PMPI_Initialized(&inited);
    if (inited) PMPI_Comm_rank(MPI_COMM_WORLD, &rank);
    return rank;
}

static void fault(void)
{
    const char *c = getenv("SP_FAULT_CODE"), *stamp = getenv("SP_FAULT_STAMP"), *a = getenv("SP_FAULT_ACTION");
    if (stamp) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        FILE *f = fopen(stamp, "w");
        if (f) {
            fprintf(f, "%ld.%06ld\n", (long)ts.tv_sec, ts.tv_nsec / 1000);
            fclose(f);
        }
    }
    if (a && strcmp(a, "stop") == 0) {
        raise(SIGSTOP); /* every thread of the process stops; SIGKILL still ends it */
        return;
    }
    _exit(c ? atoi(c) : 0);
}

int MPI_Send(const void *buf, int count, MPI_Datatype type, int dest, int tag, MPI_Comm comm)
{
    static int nready = 0;
    const char *r = getenv("SP_FAULT_RANK"), *n = getenv("SP_FAULT_AFTER");
    if (tag == TAG_READY && r && n && my_rank() == atoi(r) && ++nready >= atoi(n)) fault();
    return PMPI_Send(buf, count, type, dest, tag, comm);
}

int MPI_Finalize(void)
{
    const char *r = getenv("SP_FAULT_RANK"), *f = getenv("SP_FAULT_FINALIZE");
    if (r && f && atoi(f) > 0 && my_rank() == atoi(r)) fault();
    return PMPI_Finalize();
}

/* hid_t is int64_t and herr_t int in HDF5 >= 1.10; declared here so the shim needs no HDF5 headers */
int H5Fclose(int64_t file_id)
{
    static int nclose = 0;
    static int (*real)(int64_t) = NULL;
    if (!real) real = (int (*)(int64_t))dlsym(RTLD_NEXT, "H5Fclose");
    const char *r = getenv("SP_FAULT_RANK"), *n = getenv("SP_FAULT_H5FCLOSE");
    if (r && n && my_rank() == atoi(r)) {
        ++nclose;
        if (getenv("SP_FAULT_TRACE")) fprintf(stderr, "exit_shim: rank %s H5Fclose #%d\n", r, nclose);
        if (nclose == atoi(n)) fault();
    }
    return real(file_id);
}

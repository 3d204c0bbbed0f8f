/* exit_shim.c — LD_PRELOAD fault injector for tests/scripts/test_faults.sh (not linked into
 * surveyproc). It wraps MPI_Send through the MPI profiling interface (PMPI) and makes one rank
 * leave the job abruptly, as a node crash or an OOM kill would, without touching the program:
 *
 *   SP_FAULT_RANK=R        the rank that leaves (MPI_COMM_WORLD rank)
 *   SP_FAULT_AFTER=N       ... when it sends its N-th cell-queue "ready" message (tag 7101,
 *                          src/parallel/coordinator.c), i.e. after N-1 finished cells of the pass
 *   SP_FAULT_CODE=C        exit status (default 0: a clean-looking exit without MPI_Finalize)
 *   SP_FAULT_STAMP=FILE    write the wall-clock time of the exit there (seconds since the epoch),
 *                          so the test can measure how long the job takes to end after it
 *
 * _exit() skips atexit handlers and MPI_Finalize: the launcher sees a process end while the
 * others are still inside MPI calls. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#define TAG_READY 7101

int MPI_Send(const void *buf, int count, MPI_Datatype type, int dest, int tag, MPI_Comm comm)
{
    static int nready = 0;
    const char *r = getenv("SP_FAULT_RANK"), *n = getenv("SP_FAULT_AFTER");
    if (tag == TAG_READY && r && n) {
        int rank = -1;
        PMPI_Comm_rank(MPI_COMM_WORLD, &rank);
        if (rank == atoi(r) && ++nready >= atoi(n)) {
            const char *c = getenv("SP_FAULT_CODE"), *stamp = getenv("SP_FAULT_STAMP");
            if (stamp) {
                struct timespec ts;
                clock_gettime(CLOCK_REALTIME, &ts);
                FILE *f = fopen(stamp, "w");
                if (f) {
                    fprintf(f, "%ld.%06ld\n", (long)ts.tv_sec, ts.tv_nsec / 1000);
                    fclose(f);
                }
            }
            _exit(c ? atoi(c) : 0);
        }
    }
    return PMPI_Send(buf, count, type, dest, tag, comm);
}

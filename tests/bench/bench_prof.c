/* bench_prof.c — the cost of a profiling region (sp_prof_push/pop), for docs/performance.md:
 * `make build/rel/bench/bench_prof && build/rel/bench/bench_prof`. Times N push/pop pairs of a
 * region nested two deep (as the cell stages are), best of 5, and prints ns per pair. */
#include "surveyproc/sp_prof.h"

#include <mpi.h>
#include <stdio.h>
#include <time.h>

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    const long n = 1000000;
    double best = 1e30, best_fine_off = 1e30;
    for (int rep = 0; rep < 5; rep++) {
        sp_prof_init(0);
        sp_prof_push("outer");
        double t0 = now();
        for (long i = 0; i < n; i++) {
            sp_prof_push("stage");
            sp_prof_pop();
        }
        double t1 = now();
        for (long i = 0; i < n; i++) {
            sp_prof_push_fine("fine");
            sp_prof_pop_fine();
        }
        double t2 = now();
        sp_prof_pop();
        if (t1 - t0 < best) best = t1 - t0;
        if (t2 - t1 < best_fine_off) best_fine_off = t2 - t1;
    }
    printf("sp_prof_push+pop: %.1f ns per pair; fine region with --profile off: %.1f ns per pair\n",
           1e9 * best / n, 1e9 * best_fine_off / n);
    MPI_Finalize();
    return 0;
}

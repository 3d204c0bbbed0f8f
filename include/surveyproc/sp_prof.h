/* sp_prof.h — built-in profiling: named, nested timing regions (the C analog of
 * cProfile's cumulative view), merged across MPI ranks.
 *
 * Usage (main thread; calls from inside an OpenMP parallel region are ignored,
 * time those by wrapping the whole parallel loop):
 *
 *     sp_prof_push("prep");  ... sp_prof_bytes(nread); ...  sp_prof_pop();
 *
 * Regions nest by call order, so the same name under different parents is a
 * different node ("cells/prep" vs "plan/prep"). Each node keeps calls, wall
 * seconds (cumulative and own = cumulative minus children), process CPU seconds,
 * and bytes moved. Fine-grained regions (sp_prof_push_fine) are recorded only
 * when enabled with `--profile`.
 *
 * Overhead: two clock reads and a short child scan per push/pop (see
 * docs/performance.md for the measured figure).
 */
#ifndef SP_PROF_H
#define SP_PROF_H

#include <mpi.h>
#include <stddef.h>
#include <stdio.h>

void sp_prof_init(int fine_enabled); /* reset the tree; not collective */
void sp_prof_push(const char *name); /* name must outlive the run (string literal) */
void sp_prof_push_fine(const char *name);
void sp_prof_pop(void);
void sp_prof_pop_fine(void);
void sp_prof_bytes(double nbytes);   /* add bytes moved to the current region */
int sp_prof_fine_enabled(void);

/* One region of one rank, flattened. */
typedef struct {
    char path[128];   /* "run/cells/prep" */
    int depth;
    long calls;
    double wall, own, cpu, bytes;
} sp_prof_row;

/* Flatten this rank's tree (pre-order). *rows is malloc'd; caller frees. */
int sp_prof_rows(sp_prof_row **rows, int *nrows);

/* A region merged over ranks. */
typedef struct {
    char path[128];
    int depth;
    int nranks;       /* ranks that have this region */
    long calls;       /* summed */
    double wall_min, wall_med, wall_max, wall_mean;
    double own_med, cpu_sum, bytes_sum;
    double imbalance; /* max / mean over ranks that ran it */
} sp_prof_merged;

/* Collective over comm: gather every rank's rows and merge them on every rank
 * (all ranks get the same table). *out malloc'd; caller frees. */
int sp_prof_merge(MPI_Comm comm, sp_prof_merged **out, int *nout);

/* Print a merged table (rank 0 usually). */
void sp_prof_print(FILE *f, const sp_prof_merged *m, int n, int nranks);

/* Peak resident set size of this process in bytes (getrusage). */
double sp_prof_peak_rss(void);

/* Wall-clock, process CPU and calling-thread CPU seconds (monotonic). */
double sp_wtime(void);
double sp_cputime(void);
double sp_thread_cputime(void);

#endif

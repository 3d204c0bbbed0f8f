/* sp_coord.h — the rank-0 coordinator: a dynamic queue of cells, most
 * expensive first, handed to whichever rank asks (DESIGN §4).
 *
 * Protocol (tags are private): a worker sends "ready" (with the cell it just
 * finished, or -1) and receives the next cell, or -1 when the queue is empty;
 * it asks one cell ahead (the request for the next cell goes out when a cell
 * starts), then sends a last message with its final cell and stops. Rank 0
 * works too unless `dedicated`; while it processes a cell it answers requests
 * whenever the cell code calls sp_coord_poll() (between stages and patches,
 * from the main thread) — the one-ahead request hides that latency.
 *
 * MPI: sp_coord_run is collective over comm; only the main thread calls MPI
 * (MPI_THREAD_FUNNELED). sp_coord_poll is a no-op except on rank 0 during a run.
 */
#ifndef SP_COORD_H
#define SP_COORD_H

#include <mpi.h>

/* Process one cell; return an sp_status. Called on the main thread. */
typedef int (*sp_coord_cell_fn)(int cell, void *arg);
/* Rank 0: called after each finished cell (own or a worker's), for progress. */
typedef void (*sp_coord_done_fn)(int cell, int rank, double seconds, void *arg);

typedef struct {
    double wall;          /* seconds inside sp_coord_run */
    double busy;          /* seconds processing cells */
    double idle;          /* seconds waiting for an assignment (workers) */
    double overhead;      /* rank 0: CPU seconds serving requests (CPU, not wall: with more ranks
                           * than cores, wall time in MPI calls is the other ranks running) */
    long cells;           /* cells this rank processed */
} sp_coord_stats;

/* order[n]: cells in the order to hand out. dedicated: rank 0 only coordinates
 * (ignored with one rank). Returns the first error of this rank's cells; a
 * failing rank stops asking for work and returns its status — the caller
 * aborts the job (other ranks cannot agree while they may be blocked). */
int sp_coord_run(const int *order, int n, int dedicated, MPI_Comm comm, sp_coord_cell_fn fn, void *arg,
                 sp_coord_done_fn done, void *done_arg, sp_coord_stats *st);

/* Answer pending worker requests (rank 0, main thread, during sp_coord_run). */
void sp_coord_poll(void);

#endif

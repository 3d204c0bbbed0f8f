/* sp_coord.h — the rank-0 coordinator: a dynamic queue of cells, most
 * expensive first, handed to whichever rank asks (DESIGN §4).
 *
 * Protocol (tags are private): a worker sends "ready" (with the cell it just
 * finished, or -1) and receives the next cell, or -1 when the queue is empty;
 * it asks one cell ahead (the request for the next cell goes out when a cell
 * starts; once fewer cells are left than computing ranks that request is
 * deferred and repeated when the cell ends), then sends a last message with
 * its final cell and stops. Rank 0
 * works too unless `dedicated`; while it processes a cell it answers requests
 * whenever the cell code calls sp_coord_poll() (between stages and patches,
 * from the main thread) — the one-ahead request hides that latency.
 *
 * Watch (sp_coord_set_watch, performance.rank_timeout_s): rank 0 knows which cell each worker
 * holds, since when, and when it last heard from it. A worker sends a heartbeat (a "ready" message
 * with cell -2 that needs no answer, MPI_Isend, at most one in flight) from sp_coord_poll() at most
 * every min(timeout/8, 30 s). When a worker has sent nothing for max(timeout, 10 x the plan's
 * estimate of its cell), rank 0 marks the cell (watch.lost), sets an SP_ERR_MPI message naming the
 * rank, its host, the cell and the silence, and ends the job: from sp_coord_run by returning the
 * status, from inside sp_coord_poll (rank 0 busy with its own cell) through watch.fatal. A worker
 * whose request for a cell is not answered within max(timeout, 10 x the largest estimate) returns
 * SP_ERR_MPI naming rank 0 (stuck, stopped or lost). Heartbeats use the "ready" tag, so they
 * arrive in order before the worker's last "ready" and none is left unreceived after the run.
 *
 * MPI: sp_coord_run is collective over comm; only the main thread calls MPI
 * (MPI_THREAD_FUNNELED). sp_coord_poll is a no-op except on rank 0 during a run, and on workers
 * inside a cell when a watch is set (a clock read per call; a heartbeat when one is due).
 */
#ifndef SP_COORD_H
#define SP_COORD_H

#include <mpi.h>
#include <stddef.h>

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
    long heartbeats;      /* watch: heartbeats this worker sent, or rank 0 received */
} sp_coord_stats;

/* order[n]: cells in the order to hand out. dedicated: rank 0 only coordinates
 * (ignored with one rank). Returns the first error of this rank's cells; a
 * failing rank stops asking for work and returns its status — the caller
 * aborts the job (other ranks cannot agree while they may be blocked). */
int sp_coord_run(const int *order, int n, int dedicated, MPI_Comm comm, sp_coord_cell_fn fn, void *arg,
                 sp_coord_done_fn done, void *done_arg, sp_coord_stats *st);

typedef struct {
    double timeout_s; /* performance.rank_timeout_s; <= 0: no watch */
    /* the plan's estimate of a cell in seconds (may be NULL: the timeout alone) */
    double (*estimate)(int cell, void *arg);
    /* rank 0: a worker went silent holding `cell` (>= 0): mark it unfinished/failed and describe
     * it in desc (e.g. "(x 0-128, y 0-128)"); called before the job ends. May be NULL. */
    void (*lost)(int cell, int rank, char *desc, size_t ndesc, void *arg);
    /* ends the job and does not return (the driver's sp_fatal): needed when rank 0 finds the
     * silence inside sp_coord_poll, where no status can be returned. NULL: the status is
     * returned when rank 0's current cell ends. */
    void (*fatal)(int status);
    void *arg;
    const char *pass; /* "PSF pass", "fit pass": for the message */
} sp_coord_watch;

/* Set the watch for the following sp_coord_run calls (copied; every rank, same timeout).
 * NULL or timeout_s <= 0: no watch. */
void sp_coord_set_watch(const sp_coord_watch *w);

/* Answer pending worker requests (rank 0, main thread, during sp_coord_run). */
void sp_coord_poll(void);

#endif

/* sp_watchdog.h — a per-rank deadline for waits that MPI cannot bound (DESIGN §8: an error or a
 * hang on one rank ends the whole job with a message, never a silent wait).
 *
 * A blocking collective (MPI_Allreduce, a collective HDF5 close) waits forever when another rank
 * is stopped, deadlocked or on a lost node. The main thread arms a deadline before such a wait
 * and disarms it after; a helper thread (started once, it never calls MPI) wakes every 0.25 s,
 * and when an armed deadline has passed it writes one FATAL line to stderr naming this rank, its
 * host, what it was waiting for and for how long, and ends the process with _exit(5). The
 * launcher then ends the job (mpirun on a non-zero exit; srun with --kill-on-bad-exit=1). Nothing
 * is flushed: the store is left as the last completed write left it, and `run --resume` redoes
 * what is unfinished.
 *
 * The cell queue (sp_coord.h) has its own, finer check (heartbeats, per-cell limits); this one
 * covers the waits outside it.
 *
 * Thread safety: arm/disarm from the main thread only (they are nestable, up to 8 levels: disarm
 * restores the outer deadline). Not collective.
 */
#ifndef SP_WATCHDOG_H
#define SP_WATCHDOG_H

/* Start the helper thread once. timeout_s: the default wait limit (performance.rank_timeout_s);
 * 0 disables the watchdog (arm/disarm become no-ops). Returns an sp_status (SP_ERR_INTERNAL if
 * the thread cannot be created). Calling it again only changes the default limit. */
int sp_watchdog_start(double timeout_s);

/* The default limit given to sp_watchdog_start (0: off). */
double sp_watchdog_timeout(void);

/* Arm a deadline `seconds` from now (<= 0: the default limit) for a wait described by `what`
 * ("closing the store"; copied) at file:line. No-op when the watchdog is off. */
void sp_watchdog_arm_at(const char *what, double seconds, const char *file, int line);
#define sp_watchdog_arm(what, seconds) sp_watchdog_arm_at((what), (seconds), __FILE__, __LINE__)

/* The same with the FATAL line's last clause given: what the user has and should do, for a wait
 * where the default ("`surveyproc run --resume` redoes the unfinished cells") is not true, e.g.
 * MPI_Finalize after the command's results are complete. ending NULL: the default. */
void sp_watchdog_arm_end_at(const char *what, double seconds, const char *ending, const char *file, int line);
#define sp_watchdog_arm_ending(what, seconds, ending) \
    sp_watchdog_arm_end_at((what), (seconds), (ending), __FILE__, __LINE__)

/* Disarm the innermost deadline (the outer one, if any, applies again). */
void sp_watchdog_disarm(void);

#endif

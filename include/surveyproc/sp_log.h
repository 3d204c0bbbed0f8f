/* sp_log.h — log lines "time rank level message", to stderr and a per-run log file.
 *
 * sp_log_init() is called once by the driver after MPI_Init (rank known).
 * Any thread may log; lines are written whole (one fprintf under a lock).
 * Levels below the threshold are dropped cheaply.
 */
#ifndef SP_LOG_H
#define SP_LOG_H

#include <stdio.h>

typedef enum { SP_LOG_DEBUG = 0, SP_LOG_INFO = 1, SP_LOG_WARN = 2, SP_LOG_ERROR = 3, SP_LOG_QUIET = 4 } sp_log_level;

/* Given: rank and nranks of this process, threshold level for stderr.
 * Not collective. Safe to call again (re-sets). */
void sp_log_init(int rank, int nranks, sp_log_level level);

/* Open (append) a log file for this run; every level >= DEBUG... goes there
 * at level INFO or lower threshold. Returns SP_OK or SP_ERR_IO. Only rank 0
 * usually opens one; other ranks may open their own (path per rank). */
int sp_log_open_file(const char *path);
void sp_log_close_file(void);

void sp_log(sp_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
sp_log_level sp_log_get_level(void);
int sp_log_rank(void);
int sp_log_nranks(void);

/* Seconds since sp_log_init (monotonic); the "time" of log lines is wall clock. */
double sp_log_elapsed(void);

#define SP_DEBUG(...) sp_log(SP_LOG_DEBUG, __VA_ARGS__)
#define SP_INFO(...) sp_log(SP_LOG_INFO, __VA_ARGS__)
#define SP_WARN(...) sp_log(SP_LOG_WARN, __VA_ARGS__)
#define SP_ERROR(...) sp_log(SP_LOG_ERROR, __VA_ARGS__)

/* Progress reporter for long loops (rank 0): "cells 12/40  0.8/s  ETA 35 s".
 * On a TTY it rewrites one line in place; otherwise it prints a heartbeat line
 * at most every `heartbeat_s` seconds. Not thread-safe: call from one thread. */
typedef struct {
    const char *what;
    long total;
    long done;
    double t0, last_print;
    double heartbeat_s;
    int tty;
    int active;
} sp_progress;

void sp_progress_start(sp_progress *p, const char *what, long total, double heartbeat_s);
void sp_progress_update(sp_progress *p, long done);
void sp_progress_finish(sp_progress *p);
/* A heartbeat of the progress started last (if still active): reprints it when heartbeat_s (0.2 s
 * on a TTY) has passed without an update, so a cell that runs for minutes still shows the run
 * alive. Cheap (a clock read); a no-op on OpenMP threads other than 0 and where no progress is
 * active (ranks other than 0). The coordinator's poll calls it. */
void sp_progress_heartbeat(void);

/* Driver only: print "FATAL rank R [where] status: message" to stderr and the
 * log file, flush, and end the job: MPI_Abort on all ranks when MPI is running
 * with more than one rank, exit otherwise. Exit code from sp_status_exit_code(). */
void sp_fatal(int status) __attribute__((noreturn));

#endif

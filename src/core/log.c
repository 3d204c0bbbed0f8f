/* log.c — timestamped, rank-tagged log lines; progress; fatal abort (see sp_log.h). */
#include "surveyproc/sp_log.h"
#include "surveyproc/sp_error.h"

#include <errno.h>
#include <mpi.h>
#include <omp.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static int log_rank = 0, log_nranks = 1;
static sp_log_level log_level = SP_LOG_INFO;
static FILE *log_file = NULL;
static double log_t0 = -1.0;
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;

static double mono_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

void sp_log_init(int rank, int nranks, sp_log_level level)
{
    log_rank = rank;
    log_nranks = nranks;
    log_level = level;
    if (log_t0 < 0) log_t0 = mono_now();
}

double sp_log_elapsed(void)
{
    if (log_t0 < 0) log_t0 = mono_now();
    return mono_now() - log_t0;
}

sp_log_level sp_log_get_level(void) { return log_level; }
int sp_log_rank(void) { return log_rank; }
int sp_log_nranks(void) { return log_nranks; }

int sp_log_open_file(const char *path)
{
    FILE *f = fopen(path, "a");
    if (!f) return SP_FAIL(SP_ERR_IO, "%s: cannot open log file: %s", path, strerror(errno));
    pthread_mutex_lock(&log_lock);
    if (log_file) fclose(log_file);
    log_file = f;
    pthread_mutex_unlock(&log_lock);
    return SP_OK;
}

void sp_log_close_file(void)
{
    pthread_mutex_lock(&log_lock);
    if (log_file) fclose(log_file);
    log_file = NULL;
    pthread_mutex_unlock(&log_lock);
}

static const char *level_name(sp_log_level l)
{
    switch (l) {
    case SP_LOG_DEBUG: return "DEBUG";
    case SP_LOG_INFO: return "INFO ";
    case SP_LOG_WARN: return "WARN ";
    default: return "ERROR";
    }
}

static void vlog(sp_log_level level, const char *fmt, va_list ap)
{
    if (level < log_level && !log_file) return;
    char msg[4096], stamp[64];
    vsnprintf(msg, sizeof msg, fmt, ap);
    struct timeval tv;
    gettimeofday(&tv, NULL);
    struct tm tm;
    localtime_r(&tv.tv_sec, &tm);
    size_t n = strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(stamp + n, sizeof stamp - n, ".%03d", (int)(tv.tv_usec / 1000));
    pthread_mutex_lock(&log_lock);
    if (level >= log_level) {
        fprintf(stderr, "%s r%d %s %s\n", stamp, log_rank, level_name(level), msg);
        fflush(stderr);
    }
    if (log_file) {
        fprintf(log_file, "%s r%d %s %s\n", stamp, log_rank, level_name(level), msg);
        fflush(log_file);
    }
    pthread_mutex_unlock(&log_lock);
}

void sp_log(sp_log_level level, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vlog(level, fmt, ap);
    va_end(ap);
}

/* ---- progress ---------------------------------------------------------------- */

static sp_progress *g_progress; /* the progress started last, for sp_progress_heartbeat */

void sp_progress_start(sp_progress *p, const char *what, long total, double heartbeat_s)
{
    memset(p, 0, sizeof *p);
    g_progress = p;
    p->what = what;
    p->total = total;
    p->t0 = mono_now();
    p->last_print = p->t0;
    p->heartbeat_s = heartbeat_s > 0 ? heartbeat_s : 10.0;
    p->tty = isatty(STDERR_FILENO) && log_level <= SP_LOG_INFO;
    p->active = 1;
}

static void fmt_eta(char *buf, size_t n, double s)
{
    if (!(s >= 0) || s > 1e7) snprintf(buf, n, "?");
    else if (s < 90) snprintf(buf, n, "%.0f s", s);
    else if (s < 5400) snprintf(buf, n, "%.1f min", s / 60);
    else snprintf(buf, n, "%.1f h", s / 3600);
}

static void progress_print(sp_progress *p, int final)
{
    double now = mono_now(), el = now - p->t0;
    double rate = el > 0 ? (double)p->done / el : 0;
    char eta[32];
    fmt_eta(eta, sizeof eta, rate > 0 ? (double)(p->total - p->done) / rate : -1);
    if (p->tty) {
        fprintf(stderr, "\r%s %ld/%ld  %.2f/s  elapsed %.1f s  ETA %s   %s", p->what, p->done, p->total,
                rate, el, final ? "0 s" : eta, final ? "\n" : "");
        fflush(stderr);
    } else if (log_level <= SP_LOG_INFO || log_file) {
        sp_log(SP_LOG_INFO, "progress: %s %ld/%ld (%.0f%%), %.2f/s, elapsed %.1f s, ETA %s", p->what, p->done,
               p->total, p->total ? 100.0 * (double)p->done / (double)p->total : 100.0, rate, el,
               final ? "0 s" : eta);
    }
    p->last_print = now;
}

void sp_progress_update(sp_progress *p, long done)
{
    if (!p->active) return;
    p->done = done;
    double now = mono_now();
    double every = p->tty ? 0.2 : p->heartbeat_s;
    if (now - p->last_print >= every) progress_print(p, 0);
}

void sp_progress_finish(sp_progress *p)
{
    if (g_progress == p) g_progress = NULL;
    if (!p->active) return;
    progress_print(p, 1);
    p->active = 0;
}

void sp_progress_heartbeat(void)
{
    sp_progress *p = g_progress;
    if (!p || !p->active || (omp_in_parallel() && omp_get_thread_num() != 0)) return;
    sp_progress_update(p, p->done);
}

/* ---- fatal ------------------------------------------------------------------- */

void sp_fatal(int status)
{
    const char *where = sp_err_where();
    sp_log(SP_LOG_ERROR, "FATAL%s%s%s %s: %s", where[0] ? " [" : "", where, where[0] ? "]" : "",
           sp_status_name(status), sp_err_msg()[0] ? sp_err_msg() : "(no detail)");
    fflush(stdout);
    fflush(stderr);
    sp_log_close_file();
    int code = sp_status_exit_code(status);
    if (code == 0) code = 5;
    int inited = 0, finalized = 0;
    MPI_Initialized(&inited);
    MPI_Finalized(&finalized);
    if (inited && !finalized) {
        int size = 1;
        MPI_Comm_size(MPI_COMM_WORLD, &size);
        if (size > 1) MPI_Abort(MPI_COMM_WORLD, code);
        MPI_Finalize();
    }
    exit(code);
}

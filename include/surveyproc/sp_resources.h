/* sp_resources.h — the resource planner (issue 6): what the launcher gave the
 * job, the layout surveyproc uses, whether it fits, and the linear-algebra
 * libraries it runs on.
 *
 *   detect   ranks and nodes (MPI_Comm_split_type SHARED), the cores of each
 *            node (online CPUs, cgroup cpuset and CPU quota, SLURM_CPUS_ON_NODE,
 *            PBS_NUM_PPN / NCPUS), each rank's affinity mask, threads asked for
 *            (config, SLURM_CPUS_PER_TASK, PBS_NUM_PPN, NCPUS, OMP_NUM_THREADS),
 *            memory per rank (cgroup limit, SLURM_MEM_PER_CPU / _PER_NODE,
 *            MemAvailable, or performance.memory_per_rank_mb)
 *   decide   threads per rank (auto: node cores / ranks on the node, never more
 *            than the affinity mask); BLAS and FFTW single-threaded (they run
 *            inside OpenMP regions: one level of parallelism per layer)
 *   check    cores: ranks x threads per node <= cores (else refused, unless
 *            performance.allow_oversubscribe or an oversubscribing launcher
 *            with 1 thread per rank); memory: baseline RSS + the plan's largest
 *            cell <= memory per rank (else refused); each refusal names the knob
 *   BLAS     which BLAS/LAPACK/FFTW are linked, the OpenBLAS core, a 256^3
 *            dgemm's GFLOP/s; sp_resources_blas_reexec() re-executes the binary
 *            once with OPENBLAS_CORETYPE when OpenBLAS runs generic kernels on a
 *            CPU with AVX2/AVX-512 (OpenBLAS reads it only at load time)
 *   FFTW     wisdom: rank 0 reads and broadcasts it; every rank's wisdom is
 *            gathered and saved after planning
 *   jobs     SLURM / PBS job scripts for a tile (`surveyproc plan --emit`)
 *
 * Thread safety: call from the main thread, outside OpenMP regions. Functions
 * marked "collective" must be called by every rank of `comm`.
 */
#ifndef SP_RESOURCES_H
#define SP_RESOURCES_H

#include <mpi.h>
#include <stdio.h>

#include "surveyproc/sp_config.h"
#include "surveyproc/sp_plan.h"

/* ---- facts: what the environment says about one rank ---------------------------- */

/* Filled by sp_resources_detect (or by hand in tests). 0 means "not set /
 * unknown / no limit" for every field. Memory in bytes. */
typedef struct {
    int nranks, nnodes;        /* MPI ranks of the job, distinct nodes */
    int node_ranks;            /* ranks on this rank's node */
    int cpus_online;           /* sysconf(_SC_NPROCESSORS_ONLN) */
    int cpuset_cpus;           /* CPUs of the cgroup cpuset */
    double cpu_quota;          /* cgroup CPU quota in cores (cfs_quota/period, cpu.max) */
    int affinity_cpus;         /* CPUs in this rank's affinity mask (sched_getaffinity) */
    char affinity_list[64];    /* the mask as a list, "0-3,8" */
    int slurm_cpus_per_task;   /* SLURM_CPUS_PER_TASK */
    int slurm_cpus_on_node;    /* SLURM_CPUS_ON_NODE */
    int pbs_num_ppn;           /* PBS_NUM_PPN (Torque: cores per node) */
    int pbs_ncpus;             /* NCPUS (PBS Pro: ncpus of the chunk; read only inside a PBS job) */
    int omp_num_threads;       /* first number of OMP_NUM_THREADS */
    int launcher_oversubscribe;/* OMPI_MCA_rmaps_base_oversubscribe / OMPI_MCA_mpi_oversubscribe / SLURM_OVERCOMMIT */
    double cgroup_mem;         /* cgroup memory limit (v1 memory.limit_in_bytes, v2 memory.max), smallest up the tree */
    double meminfo_avail;      /* MemAvailable of /proc/meminfo */
    double slurm_mem_per_cpu;  /* SLURM_MEM_PER_CPU (MiB in the environment) */
    double slurm_mem_per_node; /* SLURM_MEM_PER_NODE (MiB in the environment) */
} sp_res_facts;

/* What the config asks (from sp_config; SP_CONFIG_AUTO = 0 = decide). */
typedef struct {
    int threads;            /* patch_run.threads_per_process, else performance.threads_per_rank */
    const char *threads_key;/* which of the two keys (for messages) */
    int memory_per_rank_mb; /* performance.memory_per_rank_mb */
    int allow_oversubscribe;/* performance.allow_oversubscribe */
    int ranks;              /* performance.ranks (0: whatever the launcher starts) */
    const char *blas_coretype;  /* performance.blas_coretype ("auto", "none", a core name) */
    const char *wisdom_file;    /* performance.fftw_wisdom_file (NULL: none) */
} sp_res_request;

/* ---- linear algebra ---------------------------------------------------------------- */

enum { SP_ISA_SSE = 0, SP_ISA_AVX = 1, SP_ISA_AVX2 = 2, SP_ISA_AVX512 = 3, SP_ISA_UNKNOWN = -1 };

typedef struct {
    int openblas;          /* 1 if OpenBLAS is linked (its symbols resolve) */
    char config[256];      /* openblas_get_config() */
    char core[64];         /* openblas_get_corename() */
    int parallel;          /* openblas_get_parallel(): 0 sequential, 1 pthreads, 2 OpenMP */
    int dynamic_arch;      /* built with DYNAMIC_ARCH: OPENBLAS_CORETYPE can choose the kernels */
    int cpu_isa;           /* SP_ISA_* of this CPU (/proc/cpuinfo flags) */
    int core_isa;          /* SP_ISA_* the core's kernels use (SP_ISA_UNKNOWN: unknown name) */
    int generic;           /* the kernels use fewer vector units than the CPU has (below AVX2) */
    char core_note[256];   /* how the core was chosen ("detected by OpenBLAS", "set by surveyproc: ...") */
    double gflops;         /* 256^3 dgemm, best of a few (0: not measured) */
    char libs[768];        /* BLAS / LAPACK / FFTW libraries mapped in this process (resolved paths) */
    char fftw[64];         /* fftw_version */
} sp_res_blas;

/* ---- the layout ---------------------------------------------------------------------- */

typedef enum { SP_RES_OK = 0, SP_RES_WARN = 1, SP_RES_REFUSE = 2 } sp_res_level;

#define SP_RES_NOTES 10
typedef struct {
    sp_res_level level;
    char text[600];
} sp_res_note;

typedef struct {
    sp_res_facts f;            /* this rank's facts */
    sp_res_request req;
    /* decided for this rank */
    int node_cores;            /* cores usable on this node */
    char node_cores_source[160];
    int threads_wanted;        /* before the affinity cap */
    int threads;               /* OpenMP threads per rank */
    char threads_source[160];
    int blas_threads, fftw_threads;
    double mem_per_rank;       /* bytes this rank may use */
    char mem_source[200];
    int mem_node_shared;       /* the limit is the node's, shared by its ranks (fewer ranks -> more each) */
    /* job-wide (agreed over ranks by detect / check) */
    int node_ranks_max, node_cores_min, affinity_min, threads_min, threads_max;
    double mem_per_rank_min;
    char nodes_text[256];      /* "host-a: 2 ranks, host-b: 2 ranks" */
    /* sp_resources_check */
    double baseline_rss;       /* largest resident size over ranks after planning */
    double cell_mem;           /* the plan's largest cell estimate */
    double peak_mem;           /* baseline_rss + cell_mem */
    int checked;
    /* libraries */
    sp_res_blas blas;
    char wisdom[256];          /* FFTW wisdom status line ("" when none) */
    /* verdict: the worst note; the notes say what and which knob */
    sp_res_level verdict;
    int nnotes;
    sp_res_note notes[SP_RES_NOTES];
} sp_resources;

/* ---- calls --------------------------------------------------------------------------- */

/* The request a config makes (threads, memory budget, oversubscription). */
void sp_resources_request_from_config(const sp_config *cfg, sp_res_request *req);

/* Collective over comm. Gather this rank's facts (MPI, CPUs, affinity,
 * cgroups, launcher environment, memory), decide threads and memory per rank
 * (sp_resources_decide), agree the job-wide figures, and read the BLAS/FFTW
 * identity (no timing). Returns SP_OK (detection problems are notes, not
 * errors) or SP_ERR_MPI. */
int sp_resources_detect(const sp_config *cfg, MPI_Comm comm, sp_resources *res);

/* Not collective, pure: decide node cores, threads and memory per rank from
 * res->f and res->req; adds notes (binding starvation, oversubscription,
 * threads asked vs OMP_NUM_THREADS). Used by sp_resources_detect; exposed for
 * tests. */
void sp_resources_decide(sp_resources *res);

/* Make the decision effective in this process: omp_set_num_threads(threads),
 * OpenBLAS 1 thread (openblas_set_num_threads(1): BLAS runs inside OpenMP).
 * FFTW plans are single-threaded (fftw_plan_with_nthreads is never raised). */
void sp_resources_apply(sp_resources *res);

/* Detect + apply, for the pipeline: returns the threads per rank in *threads.
 * Collective. */
int sp_resources_setup(const sp_config *cfg, MPI_Comm comm, sp_resources *res, int *threads);

/* Collective. After the plan is built: baseline RSS (largest over ranks),
 * the plan's largest cell, the memory verdict, the dgemm speed (rank 0; with
 * measure_blas), and the job-wide verdict with the worst rank's message.
 * Returns SP_OK (the verdict is in res) or SP_ERR_MPI. */
int sp_resources_check(sp_resources *res, const sp_plan *plan, int measure_blas, MPI_Comm comm);

/* Not collective, pure: the memory verdict of a rank with `mem_per_rank`
 * bytes for a plan needing peak_mem = baseline + cell bytes; adds the note
 * (with the epsf.epsf_ngrid that would fit). Exposed for tests. */
void sp_resources_judge_memory(sp_resources *res, const sp_plan *plan);

/* SP_OK, or SP_ERR_RESOURCE with the refusal message (which setting to change)
 * when the verdict is SP_RES_REFUSE. Same result on every rank after
 * sp_resources_check. */
int sp_resources_refusal(const sp_resources *res);

/* The layout report of `surveyproc plan` (rank 0). */
void sp_resources_print(const sp_resources *res, FILE *f);

/* One INFO line per topic and a WARN per warning note (run mode, rank 0). */
void sp_resources_log(const sp_resources *res);

/* Add a note (printf-style); the verdict becomes the worst level noted. */
void sp_resources_note(sp_resources *res, sp_res_level level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* ---- BLAS --------------------------------------------------------------------------- */

/* At the very top of main(), before MPI_Init. Reads performance.blas_coretype
 * (from the config given to `run` / `plan`, and --set; default auto). When
 * OpenBLAS (DYNAMIC_ARCH) runs kernels below AVX2 on a CPU with AVX-512F or
 * AVX2 ("auto"), or when a core name is forced and differs from the running
 * one, sets OPENBLAS_CORETYPE (SkylakeX / Haswell / the name) and re-executes
 * /proc/self/exe with the same argv — once: SP_BLAS_REEXEC guards it. A forced
 * core the CPU cannot run (SIGILL) is not set. "none" leaves OpenBLAS alone.
 * Returns only when no re-exec happened (or execv failed: then it carries on). */
void sp_resources_blas_reexec(int argc, char **argv);

/* The ISA tier of an OpenBLAS core name (case-insensitive; SP_ISA_UNKNOWN
 * for names it does not know) and of this CPU (/proc/cpuinfo flags). */
int sp_resources_core_isa(const char *core);
int sp_resources_cpu_isa(void);
/* The core "auto" selects: NULL when the running core is fine, else
 * "SkylakeX" (CPU with AVX-512F) or "Haswell" (AVX2). */
const char *sp_resources_auto_coretype(const char *running_core, int cpu_isa);

/* Fill b: library identity, core, how it was chosen, mapped libraries.
 * measure: also time a 256^3 dgemm (best of 5, ~1-15 ms). */
void sp_resources_blas_info(sp_res_blas *b, int measure);

/* ---- FFTW wisdom --------------------------------------------------------------------- */

/* comm MPI_COMM_NULL: this process alone, no MPI calls (serial tools, tests). */

/* Collective. Rank 0 reads `path` (missing file: nothing to load, not an
 * error) and broadcasts it; every rank imports it. *loaded = 1 when wisdom
 * was imported. Wisdom that does not import (another FFTW version, corrupt)
 * is ignored with a warning. path NULL: nothing. Call before plans are made
 * (before sp_fit_init) so that FFTW_ESTIMATE plans reuse measured wisdom. */
int sp_resources_fftw_wisdom_load(const char *path, MPI_Comm comm, int *loaded);

/* Collective. Every rank exports its wisdom; rank 0 merges them and writes
 * `path` atomically (temporary file + rename). path NULL: nothing. */
int sp_resources_fftw_wisdom_save(const char *path, MPI_Comm comm);

/* Not collective, serial (no plan may be made concurrently). Make measured
 * (FFTW_MEASURE) wisdom for n x n r2c and c2r transforms of each size not yet
 * in the wisdom; *made (may be NULL) = number of transforms planned. Costs
 * ~0.05-0.5 s per size the first time, nothing once the wisdom has them. */
int sp_resources_fftw_wisdom_measure(const int *sizes, int nsizes, int *made);

/* Collective. The whole wisdom cycle before planning, for the fitter: load `path`
 * (rank 0 reads, broadcasts), rank 0 measures the n x n r2c/c2r sizes the file
 * lacks (sp_resources_fftw_wisdom_measure) and broadcasts the new wisdom, so no
 * other rank measures. *made (may be NULL) = transforms measured. Then plan with
 * FFTW_ESTIMATE (the measured plans are reused) and call
 * sp_resources_fftw_wisdom_save at the end. path NULL: nothing. */
int sp_resources_fftw_wisdom_prepare(const char *path, const int *sizes, int nsizes, MPI_Comm comm, int *made);

/* ---- job scripts --------------------------------------------------------------------- */

typedef enum { SP_RES_EMIT_NONE = 0, SP_RES_EMIT_SLURM = 1, SP_RES_EMIT_PBS = 2 } sp_res_emit_kind;

typedef struct sp_res_emit {
    sp_res_emit_kind kind;
    int nodes;           /* 0: 1 */
    int ranks_per_node;  /* 0: performance.ranks / nodes, else min(active cells, 4) */
    int threads;         /* 0: performance.threads_per_rank, else 4 */
    char time[32];       /* HH:MM:SS; "": estimated from the plan's cost */
    char out[SP_PATH_MAX]; /* --emit-out FILE; "": stdout */
} sp_res_emit;

/* CLI helper for `surveyproc plan`: if argv[*i] is one of --emit, --nodes,
 * --ranks-per-node, --threads, --time, --emit-out, consume it (and its value,
 * advancing *i) into e and set *consumed = 1. Returns SP_OK or SP_ERR_CONFIG
 * for a bad value. */
int sp_resources_emit_arg(int argc, char **argv, int *i, sp_res_emit *e, int *consumed);

/* Write a job script for this tile (rank 0). The layout comes from e (or the
 * defaults above); memory per CPU from the plan's peak estimate; wall time
 * from the plan's cost unless given. Also notes (in res) when the emitted
 * layout would be refused. Returns SP_OK or SP_ERR_IO. */
int sp_resources_emit_script(const sp_res_emit *e, const sp_config *cfg, const sp_plan *plan,
                             const sp_resources *res, const char *config_path, FILE *out);

/* Collective. `plan --emit`: rank 0 writes the script to e->out (or stdout);
 * the status is agreed. */
int sp_resources_emit_job(const sp_res_emit *e, const sp_config *cfg, const sp_plan *plan, const sp_resources *res,
                          const char *config_path, MPI_Comm comm);

/* ---- small parsers (exposed for tests) ------------------------------------------------ */

/* Count the CPUs of a list "0-3,8,10-11" (-1 if malformed). */
int sp_resources_count_cpulist(const char *list);

/* The memory limit and CPU quota of the calling process's cgroup (v1 or v2),
 * walking up to the mount point and keeping the smallest. Given the files
 * normally at /proc/self/cgroup and /proc/self/mountinfo (tests pass fakes).
 * Returned: *mem bytes (0 none), *quota cores (0 none), *cpus cpuset count
 * (0 unknown). */
void sp_resources_cgroup_limits(const char *proc_cgroup, const char *mountinfo, double *mem, double *quota,
                                int *cpus);

#endif

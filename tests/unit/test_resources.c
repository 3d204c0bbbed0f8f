/* test_resources.c — the resource planner: parsers, cgroup reading, the
 * threads / cores / memory decisions and their messages, OpenBLAS core choice,
 * FFTW wisdom round trip, job-script emission.
 *
 * SP_BENCH_FFTW=1: print the FFTW wisdom figures of docs/performance.md instead. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "support.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_resources.h"

#include <fftw3.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#define MIB 1048576.0

static void test_cpulist(void **state)
{
    (void)state;
    assert_int_equal(sp_resources_count_cpulist("0-3"), 4);
    assert_int_equal(sp_resources_count_cpulist("0-3,8,10-11\n"), 7);
    assert_int_equal(sp_resources_count_cpulist("5"), 1);
    assert_int_equal(sp_resources_count_cpulist(""), 0);
    assert_int_equal(sp_resources_count_cpulist("3-1"), -1);
    assert_int_equal(sp_resources_count_cpulist("x"), -1);
}

static void test_coretype_choice(void **state)
{
    (void)state;
    assert_int_equal(sp_resources_core_isa("Prescott"), SP_ISA_SSE);
    assert_int_equal(sp_resources_core_isa("skylakex"), SP_ISA_AVX512);
    assert_int_equal(sp_resources_core_isa("Zen"), SP_ISA_AVX2);
    assert_int_equal(sp_resources_core_isa("NoSuchCore"), SP_ISA_UNKNOWN);
    /* generic kernels on a capable CPU are replaced */
    assert_string_equal(sp_resources_auto_coretype("Prescott", SP_ISA_AVX512), "SkylakeX");
    assert_string_equal(sp_resources_auto_coretype("Prescott", SP_ISA_AVX2), "Haswell");
    assert_string_equal(sp_resources_auto_coretype("Sandybridge", SP_ISA_AVX2), "Haswell");
    assert_string_equal(sp_resources_auto_coretype("Core2", SP_ISA_AVX512), "SkylakeX");
    /* OpenBLAS's own modern choice is trusted; an old CPU is left alone */
    assert_null(sp_resources_auto_coretype("Cooperlake", SP_ISA_AVX512));
    assert_null(sp_resources_auto_coretype("Zen", SP_ISA_AVX512));
    assert_null(sp_resources_auto_coretype("Haswell", SP_ISA_AVX2));
    assert_null(sp_resources_auto_coretype("Prescott", SP_ISA_AVX));
    assert_null(sp_resources_auto_coretype("Prescott", SP_ISA_SSE));
    assert_null(sp_resources_auto_coretype("SomethingNew", SP_ISA_AVX512));
}

static void mkdirs(const char *path)
{
    char b[1024];
    snprintf(b, sizeof b, "%s", path);
    for (char *p = b + 1; *p; p++)
        if (*p == '/') {
            *p = '\0';
            mkdir(b, 0755);
            *p = '/';
        }
    mkdir(b, 0755);
}

static void put(const char *dir, const char *file, const char *text)
{
    char p[1200];
    snprintf(p, sizeof p, "%s/%s", dir, file);
    FILE *f = fopen(p, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

/* A cgroup v1 tree (memory, cpu, cpuset) and a v2 one, as a container or a SLURM job sees them. */
static void test_cgroup_v1_v2(void **state)
{
    (void)state;
    char base[600], d[900], mi[1000], cg[1000];
    snprintf(base, sizeof base, "%s/cg", sp_test_tmpdir());
    /* v1: limits at two levels; the smaller (inner) one wins for memory, the outer one for CPU */
    snprintf(d, sizeof d, "%s/memory/slurm/job_1/step_0", base);
    mkdirs(d);
    put(d, "memory.limit_in_bytes", "2147483648\n");
    snprintf(d, sizeof d, "%s/memory/slurm", base);
    put(d, "memory.limit_in_bytes", "9223372036854771712\n"); /* v1's "no limit" */
    snprintf(d, sizeof d, "%s/cpu/slurm/job_1/step_0", base);
    mkdirs(d);
    put(d, "cpu.cfs_quota_us", "-1\n");
    put(d, "cpu.cfs_period_us", "100000\n");
    snprintf(d, sizeof d, "%s/cpu/slurm", base);
    put(d, "cpu.cfs_quota_us", "300000\n");
    put(d, "cpu.cfs_period_us", "100000\n");
    snprintf(d, sizeof d, "%s/cpuset/slurm/job_1/step_0", base);
    mkdirs(d);
    put(d, "cpuset.cpus", "2-5\n");
    snprintf(mi, sizeof mi, "%s/mountinfo", base);
    FILE *f = fopen(mi, "w");
    assert_non_null(f);
    fprintf(f, "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n");
    fprintf(f, "32 31 0:29 / %s/cpu rw,relatime - cgroup cgroup rw,cpu,cpuacct\n", base);
    fprintf(f, "34 31 0:31 / %s/cpuset rw,relatime - cgroup cgroup rw,cpuset\n", base);
    fprintf(f, "35 31 0:32 / %s/memory rw,relatime - cgroup cgroup rw,memory\n", base);
    fclose(f);
    snprintf(cg, sizeof cg, "%s/cgroup", base);
    f = fopen(cg, "w");
    assert_non_null(f);
    fprintf(f, "9:name=systemd:/\n4:memory:/slurm/job_1/step_0\n3:cpuset:/slurm/job_1/step_0\n"
               "1:cpu,cpuacct:/slurm/job_1/step_0\n0::/\n");
    fclose(f);
    double mem = -1, quota = -1;
    int cpus = -1;
    sp_resources_cgroup_limits(cg, mi, &mem, &quota, &cpus);
    assert_true(fabs(mem - 2147483648.0) < 1);
    assert_true(fabs(quota - 3.0) < 1e-9);
    assert_int_equal(cpus, 4);

    /* v2 in a cgroup namespace: the mount's root is the process's own cgroup */
    snprintf(d, sizeof d, "%s/v2/job", base);
    mkdirs(d);
    put(d, "memory.max", "1073741824\n");
    put(d, "cpu.max", "150000 100000\n");
    put(d, "cpuset.cpus.effective", "0-7\n");
    snprintf(d, sizeof d, "%s/v2", base);
    put(d, "memory.max", "max\n");
    snprintf(mi, sizeof mi, "%s/mountinfo2", base);
    f = fopen(mi, "w");
    fprintf(f, "41 31 0:38 /job %s/v2/job rw,relatime - cgroup2 cgroup2 rw\n", base);
    fclose(f);
    snprintf(cg, sizeof cg, "%s/cgroup2", base);
    f = fopen(cg, "w");
    fprintf(f, "0::/job\n");
    fclose(f);
    sp_resources_cgroup_limits(cg, mi, &mem, &quota, &cpus);
    assert_true(fabs(mem - 1073741824.0) < 1);
    assert_true(fabs(quota - 1.5) < 1e-9);
    assert_int_equal(cpus, 8);

    /* nothing readable: no limits, no crash */
    sp_resources_cgroup_limits("/nonexistent/cgroup", "/nonexistent/mountinfo", &mem, &quota, &cpus);
    assert_true(mem == 0 && quota == 0 && cpus == 0);
}

static void base_res(sp_resources *r, int node_ranks, int cores, int affinity)
{
    memset(r, 0, sizeof *r);
    r->f.nranks = node_ranks;
    r->f.nnodes = 1;
    r->f.node_ranks = node_ranks;
    r->f.cpus_online = cores;
    r->f.affinity_cpus = affinity;
    snprintf(r->f.affinity_list, sizeof r->f.affinity_list, "0-%d", affinity - 1);
    r->f.meminfo_avail = 16384 * MIB;
    r->req.threads_key = "performance.threads_per_rank";
}

static int has_note(const sp_resources *r, sp_res_level l, const char *needle)
{
    for (int k = 0; k < r->nnotes; k++)
        if (r->notes[k].level == l && strstr(r->notes[k].text, needle)) return 1;
    return 0;
}

static void test_threads_sources(void **state)
{
    (void)state;
    sp_resources r;
    /* auto: node cores / ranks on the node */
    base_res(&r, 4, 16, 16);
    sp_resources_decide(&r);
    assert_int_equal(r.threads, 4);
    assert_int_equal(r.verdict, SP_RES_OK);
    assert_non_null(strstr(r.threads_source, "auto"));
    /* OMP_NUM_THREADS */
    base_res(&r, 2, 16, 16);
    r.f.omp_num_threads = 3;
    sp_resources_decide(&r);
    assert_int_equal(r.threads, 3);
    assert_non_null(strstr(r.threads_source, "OMP_NUM_THREADS=3"));
    /* SLURM_CPUS_PER_TASK beats OMP_NUM_THREADS (with a warning that they differ) */
    r.f.slurm_cpus_per_task = 4;
    r.nnotes = 0;
    r.verdict = SP_RES_OK;
    sp_resources_decide(&r);
    assert_int_equal(r.threads, 4);
    assert_true(has_note(&r, SP_RES_WARN, "OMP_NUM_THREADS=3 differs"));
    /* PBS: cores per node shared by the node's ranks */
    base_res(&r, 2, 32, 32);
    r.f.pbs_num_ppn = 16;
    sp_resources_decide(&r);
    assert_int_equal(r.node_cores, 16);
    assert_int_equal(r.threads, 8);
    /* the config beats everything */
    base_res(&r, 2, 16, 16);
    r.f.slurm_cpus_per_task = 8;
    r.req.threads = 2;
    sp_resources_decide(&r);
    assert_int_equal(r.threads, 2);
    assert_non_null(strstr(r.threads_source, "performance.threads_per_rank"));
    /* the cgroup quota and SLURM_CPUS_ON_NODE bound the node's cores */
    base_res(&r, 1, 64, 64);
    r.f.cpu_quota = 6.5;
    sp_resources_decide(&r);
    assert_int_equal(r.node_cores, 6);
    assert_int_equal(r.threads, 6);
    r.f.slurm_cpus_on_node = 4;
    sp_resources_decide(&r);
    assert_int_equal(r.node_cores, 4);
    assert_string_equal(r.node_cores_source, "SLURM_CPUS_ON_NODE");
    assert_int_equal(r.blas_threads, 1);
    assert_int_equal(r.fftw_threads, 1);
}

static void test_binding_starvation(void **state)
{
    (void)state;
    sp_resources r;
    /* mpirun -np 1 binds to one core on a 2-core node: auto wants 2, runs 1, warns */
    base_res(&r, 1, 2, 1);
    sp_resources_decide(&r);
    assert_int_equal(r.threads_wanted, 2);
    assert_int_equal(r.threads, 1);
    assert_int_equal(r.verdict, SP_RES_WARN);
    assert_true(has_note(&r, SP_RES_WARN, "--bind-to none"));
    assert_true(has_note(&r, SP_RES_WARN, "ppr:1:node:pe=2"));
    /* asking more than the node holds: the advice is the threads that fit */
    base_res(&r, 2, 2, 1);
    r.f.omp_num_threads = 2;
    sp_resources_decide(&r);
    assert_int_equal(r.threads, 1);
    assert_true(has_note(&r, SP_RES_WARN, "at most 1 thread(s) per rank"));
}

static void test_oversubscription(void **state)
{
    (void)state;
    sp_resources r;
    /* 2 ranks x 4 threads on 4 cores: refused, knob = threads per rank 2 */
    base_res(&r, 2, 4, 4);
    r.req.threads = 4;
    sp_resources_decide(&r);
    assert_int_equal(r.verdict, SP_RES_REFUSE);
    assert_true(has_note(&r, SP_RES_REFUSE, "performance.threads_per_rank: 2"));
    assert_int_equal(sp_resources_refusal(&r), SP_ERR_RESOURCE);
    assert_non_null(strstr(sp_err_msg(), "layout refused"));
    sp_err_clear();
    /* allowed explicitly */
    base_res(&r, 2, 4, 4);
    r.req.threads = 4;
    r.req.allow_oversubscribe = 1;
    sp_resources_decide(&r);
    assert_int_equal(r.verdict, SP_RES_WARN);
    assert_true(has_note(&r, SP_RES_WARN, "allowed by performance.allow_oversubscribe"));
    assert_int_equal(sp_resources_refusal(&r), SP_OK);
    /* more ranks than cores: refused with the ranks knob ... */
    base_res(&r, 4, 2, 2);
    sp_resources_decide(&r);
    assert_int_equal(r.threads, 1);
    assert_int_equal(r.verdict, SP_RES_REFUSE);
    assert_true(has_note(&r, SP_RES_REFUSE, "at most 2 rank(s) per node"));
    /* ... unless the launcher was told to oversubscribe (1 thread per rank) */
    base_res(&r, 4, 2, 2);
    r.f.launcher_oversubscribe = 1;
    sp_resources_decide(&r);
    assert_int_equal(r.verdict, SP_RES_WARN);
    /* but not with threads on top */
    base_res(&r, 4, 2, 2);
    r.f.launcher_oversubscribe = 1;
    r.req.threads = 2;
    sp_resources_decide(&r);
    assert_int_equal(r.verdict, SP_RES_REFUSE);
}

static void test_memory_sources(void **state)
{
    (void)state;
    sp_resources r;
    base_res(&r, 4, 16, 16);
    r.f.meminfo_avail = 64000 * MIB;
    r.f.cgroup_mem = 8000 * MIB;
    sp_resources_decide(&r);
    assert_true(fabs(r.mem_per_rank - 2000 * MIB) < 1);
    assert_non_null(strstr(r.mem_source, "cgroup"));
    assert_int_equal(r.mem_node_shared, 1);
    r.f.slurm_mem_per_cpu = 1000 * MIB;
    r.f.slurm_cpus_per_task = 1;
    sp_resources_decide(&r);
    assert_true(fabs(r.mem_per_rank - 1000 * MIB) < 1);
    assert_non_null(strstr(r.mem_source, "SLURM_MEM_PER_CPU"));
    assert_int_equal(r.mem_node_shared, 0);
    r.f.slurm_mem_per_node = 2000 * MIB;
    sp_resources_decide(&r);
    assert_true(fabs(r.mem_per_rank - 500 * MIB) < 1);
    /* an explicit budget wins */
    r.req.memory_per_rank_mb = 3000;
    sp_resources_decide(&r);
    assert_true(fabs(r.mem_per_rank - 3000 * MIB) < 1);
    assert_non_null(strstr(r.mem_source, "performance.memory_per_rank_mb"));
}

static void test_memory_verdict(void **state)
{
    (void)state;
    /* a 4096^2 tile in 2x2 cells of 2072^2 ROI pixels (halo 24) */
    sp_plan p;
    sp_cell cells[4];
    memset(&p, 0, sizeof p);
    memset(cells, 0, sizeof cells);
    p.nx = p.ny = 4096;
    p.halo = 24;
    p.ncells = 4;
    p.cells = cells;
    p.opts.epsf_ngrid = 2;
    for (int k = 0; k < 4; k++) {
        cells[k].rx0 = cells[k].ry0 = 0;
        cells[k].rx1 = cells[k].ry1 = 2072;
        cells[k].mem_bytes = 1600 * MIB;
    }
    sp_resources r;
    base_res(&r, 1, 4, 4);
    r.mem_per_rank = 1000 * MIB;
    snprintf(r.mem_source, sizeof r.mem_source, "test");
    r.baseline_rss = 100 * MIB;
    r.cell_mem = 1600 * MIB;
    sp_resources_judge_memory(&r, &p);
    assert_int_equal(r.verdict, SP_RES_REFUSE);
    /* room 900 MiB of 1600: side x 0.75 -> 1554 - 48 = 1506 base pixels -> 3 cells per side */
    assert_true(has_note(&r, SP_RES_REFUSE, "epsf.epsf_ngrid: 3 instead of 2"));
    assert_true(has_note(&r, SP_RES_REFUSE, "fewer ranks per node"));
    assert_true(has_note(&r, SP_RES_REFUSE, "--mem-per-cpu"));
    /* a node-wide limit shared by 4 ranks: 4 x 1000 MiB hold 2 ranks of 1700 MiB */
    base_res(&r, 4, 4, 4);
    r.mem_per_rank = 1000 * MIB;
    r.mem_node_shared = 1;
    r.baseline_rss = 100 * MIB;
    r.cell_mem = 1600 * MIB;
    sp_resources_judge_memory(&r, &p);
    assert_true(has_note(&r, SP_RES_REFUSE, "fewer ranks per node (2 of this size fit)"));
    /* close to the limit: a warning */
    base_res(&r, 1, 4, 4);
    r.mem_per_rank = 1000 * MIB;
    r.baseline_rss = 100 * MIB;
    r.cell_mem = 750 * MIB;
    sp_resources_judge_memory(&r, &p);
    assert_int_equal(r.verdict, SP_RES_WARN);
    /* plenty */
    base_res(&r, 1, 4, 4);
    r.mem_per_rank = 10000 * MIB;
    r.baseline_rss = 100 * MIB;
    r.cell_mem = 750 * MIB;
    sp_resources_judge_memory(&r, &p);
    assert_int_equal(r.verdict, SP_RES_OK);
    assert_true(fabs(r.peak_mem - 850 * MIB) < 1);
}

static void test_blas_identity(void **state)
{
    (void)state;
    sp_res_blas b;
    sp_resources_blas_info(&b, 1);
    assert_int_equal(b.openblas, 1);
    assert_true(strlen(b.core) > 0);
    assert_non_null(strstr(b.config, "OpenBLAS"));
    assert_non_null(strstr(b.fftw, "fftw-3"));
    assert_true(b.gflops > 0.1);
    print_message("OpenBLAS core %s (%s), CPU isa %d, dgemm 256^3 %.1f GFLOP/s; libs %s\n", b.core, b.core_note,
                  b.cpu_isa, b.gflops, b.libs);
}

static void test_emit_args_and_script(void **state)
{
    (void)state;
    sp_res_emit e;
    memset(&e, 0, sizeof e);
    char *argv[] = {"plan", "--emit", "slurm", "--nodes", "2", "--ranks-per-node", "3", "--threads", "4",
                    "--time", "2:30:00", "--emit", "lsf", "--nodes", "0", "--time", "99", "--cells", NULL};
    int argc = 18, used = 0, i;
    for (i = 1; i <= 9; i += 2) {
        int j = i;
        assert_int_equal(sp_resources_emit_arg(argc, argv, &j, &e, &used), SP_OK);
        assert_int_equal(used, 1);
        assert_int_equal(j, i + 1);
    }
    assert_int_equal(e.kind, SP_RES_EMIT_SLURM);
    assert_int_equal(e.nodes, 2);
    assert_int_equal(e.ranks_per_node, 3);
    assert_int_equal(e.threads, 4);
    assert_string_equal(e.time, "02:30:00");
    for (i = 11; i <= 15; i += 2) {
        int j = i;
        sp_res_emit bad = e;
        assert_int_equal(sp_resources_emit_arg(argc, argv, &j, &bad, &used), SP_ERR_CONFIG);
    }
    sp_err_clear();
    i = 17;
    assert_int_equal(sp_resources_emit_arg(argc, argv, &i, &e, &used), SP_OK);
    assert_int_equal(used, 0);

    sp_config cfg;
    assert_int_equal(sp_config_defaults(&cfg), SP_OK);
    sp_plan p;
    sp_cell cells[2];
    memset(&p, 0, sizeof p);
    memset(cells, 0, sizeof cells);
    int nframes[6] = {1, 1, 1, 1, 1, 1};
    p.nx = p.ny = 2048;
    p.nbands = 6;
    p.band_nframes = nframes;
    p.ncells = 2;
    p.ncells_active = 2;
    p.cells = cells;
    cells[0].active = cells[1].active = 1;
    cells[0].cost = cells[1].cost = 3600;
    sp_resources r;
    base_res(&r, 1, 4, 4);
    r.baseline_rss = 3000 * MIB; /* cells of 0 pixels: the peak is the baseline */
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    assert_int_equal(sp_resources_emit_script(&e, &cfg, &p, &r, "config.yaml", f), SP_OK);
    fclose(f);
    assert_non_null(strstr(buf, "#SBATCH --nodes=2\n"));
    assert_non_null(strstr(buf, "#SBATCH --ntasks-per-node=3\n"));
    assert_non_null(strstr(buf, "#SBATCH --cpus-per-task=4\n"));
    assert_non_null(strstr(buf, "#SBATCH --mem-per-cpu=938M\n")); /* 3000 x 1.25 / 4 */
    assert_non_null(strstr(buf, "#SBATCH --time=02:30:00\n"));
    assert_non_null(strstr(buf, "srun --mpi=pmix"));
    assert_non_null(strstr(buf, "OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK"));
    assert_null(strstr(buf, "allow-run-as-root"));
    free(buf);
    /* PBS, default layout: min(active cells, 4) ranks, time from the cost: 7200 / 8 x 3 + 600 = 3300 s -> 01:00:00 */
    sp_res_emit ep;
    memset(&ep, 0, sizeof ep);
    ep.kind = SP_RES_EMIT_PBS;
    f = open_memstream(&buf, &len);
    assert_int_equal(sp_resources_emit_script(&ep, &cfg, &p, &r, "config.yaml", f), SP_OK);
    fclose(f);
    assert_non_null(strstr(buf, "#PBS -l nodes=1:ppn=8\n"));
    assert_non_null(strstr(buf, "#PBS -l walltime=01:00:00\n"));
    assert_non_null(strstr(buf, "--map-by ppr:$RANKS_PER_NODE:node:pe=$THREADS"));
    assert_non_null(strstr(buf, "NP=2\n"));
    free(buf);
    sp_config_free(&cfg);
}

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void test_fftw_wisdom_roundtrip(void **state)
{
    (void)state;
    char path[1024];
    sp_test_path("wisdom.txt", path, sizeof path);
    fftw_forget_wisdom();
    int loaded = 1, made = -1;
    /* no file yet: nothing loaded, no error */
    assert_int_equal(sp_resources_fftw_wisdom_load(path, MPI_COMM_NULL, &loaded), SP_OK);
    assert_int_equal(loaded, 0);
    int sizes[] = {16, 24};
    assert_int_equal(sp_resources_fftw_wisdom_measure(sizes, 2, &made), SP_OK);
    assert_int_equal(made, 4);
    assert_int_equal(sp_resources_fftw_wisdom_measure(sizes, 2, &made), SP_OK);
    assert_int_equal(made, 0); /* already in the wisdom */
    assert_int_equal(sp_resources_fftw_wisdom_save(path, MPI_COMM_NULL), SP_OK);
    fftw_forget_wisdom();
    assert_int_equal(sp_resources_fftw_wisdom_load(path, MPI_COMM_NULL, &loaded), SP_OK);
    assert_int_equal(loaded, 1);
    double *r = fftw_alloc_real(24 * 24);
    fftw_complex *c = fftw_alloc_complex(24 * 13);
    fftw_plan p = fftw_plan_dft_r2c_2d(24, 24, r, c, FFTW_MEASURE | FFTW_WISDOM_ONLY);
    assert_non_null(p); /* from the file, no measuring */
    fftw_destroy_plan(p);
    fftw_free(r);
    fftw_free(c);
    /* damaged wisdom: ignored with a warning */
    sp_test_write("bad_wisdom.txt", "(not wisdom at all", path, sizeof path);
    assert_int_equal(sp_resources_fftw_wisdom_load(path, MPI_COMM_NULL, &loaded), SP_OK);
    assert_int_equal(loaded, 0);
    /* the whole cycle: prepare measures what the file lacks, save, a new process finds it all */
    fftw_forget_wisdom();
    sp_test_path("wisdom2.txt", path, sizeof path);
    int s32[] = {32};
    assert_int_equal(sp_resources_fftw_wisdom_prepare(path, s32, 1, MPI_COMM_NULL, &made), SP_OK);
    assert_int_equal(made, 2);
    assert_int_equal(sp_resources_fftw_wisdom_save(path, MPI_COMM_NULL), SP_OK);
    fftw_forget_wisdom();
    assert_int_equal(sp_resources_fftw_wisdom_prepare(path, s32, 1, MPI_COMM_NULL, &made), SP_OK);
    assert_int_equal(made, 0);
    /* nothing configured */
    assert_int_equal(sp_resources_fftw_wisdom_load(NULL, MPI_COMM_NULL, &loaded), SP_OK);
    assert_int_equal(sp_resources_fftw_wisdom_save(NULL, MPI_COMM_NULL), SP_OK);
    fftw_forget_wisdom();
}

/* The figures of docs/performance.md: per size, r2c planning and execution with
 * FFTW_ESTIMATE (what the fitter uses), FFTW_MEASURE, and FFTW_ESTIMATE after
 * loading measured wisdom. Only with SP_BENCH_FFTW=1 (a few seconds; not a test). */
static double exec_time(fftw_plan p, int n)
{
    int reps = 4000000 / (n * n) + 20;
    double best = 1e9;
    for (int k = 0; k < 5; k++) {
        double t = now_s();
        for (int i = 0; i < reps; i++) fftw_execute(p);
        t = (now_s() - t) / reps;
        if (t < best) best = t;
    }
    return best;
}

static void fftw_wisdom_bench(void)
{
    int sizes[] = {64, 96, 128, 192, 256};
    printf("   n | plan EST ms | exec EST us | plan MEASURE ms | exec MEASURE us | plan EST+wisdom ms | exec "
           "EST+wisdom us\n");
    for (int s = 0; s < 5; s++) {
        int n = sizes[s];
        fftw_forget_wisdom();
        double *in = fftw_alloc_real((size_t)n * n);
        fftw_complex *out = fftw_alloc_complex((size_t)n * (n / 2 + 1));
        double t = now_s();
        fftw_plan pe = fftw_plan_dft_r2c_2d(n, n, in, out, FFTW_ESTIMATE);
        double te = now_s() - t;
        for (int i = 0; i < n * n; i++) in[i] = (double)(i % 17);
        double xe = exec_time(pe, n);
        fftw_destroy_plan(pe);
        t = now_s();
        fftw_plan pm = fftw_plan_dft_r2c_2d(n, n, in, out, FFTW_MEASURE);
        double tm = now_s() - t;
        for (int i = 0; i < n * n; i++) in[i] = (double)(i % 17);
        double xm = exec_time(pm, n);
        fftw_destroy_plan(pm);
        /* wisdom now holds the measured plan: an ESTIMATE request reuses it */
        char *w = fftw_export_wisdom_to_string();
        fftw_forget_wisdom();
        fftw_import_wisdom_from_string(w);
        free(w);
        t = now_s();
        fftw_plan pw = fftw_plan_dft_r2c_2d(n, n, in, out, FFTW_ESTIMATE);
        double tw = now_s() - t;
        double xw = exec_time(pw, n);
        fftw_destroy_plan(pw);
        printf("%4d | %11.3f | %11.2f | %15.1f | %15.2f | %18.3f | %16.2f\n", n, te * 1e3, xe * 1e6, tm * 1e3,
               xm * 1e6, tw * 1e3, xw * 1e6);
        fftw_free(in);
        fftw_free(out);
    }
    fftw_forget_wisdom();
}

int main(int argc, char **argv)
{
    (void)argc;
    (void)argv;
    if (getenv("SP_BENCH_FFTW")) {
        fftw_wisdom_bench();
        return 0;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cpulist),
        cmocka_unit_test(test_coretype_choice),
        cmocka_unit_test(test_cgroup_v1_v2),
        cmocka_unit_test(test_threads_sources),
        cmocka_unit_test(test_binding_starvation),
        cmocka_unit_test(test_oversubscription),
        cmocka_unit_test(test_memory_sources),
        cmocka_unit_test(test_memory_verdict),
        cmocka_unit_test(test_blas_identity),
        cmocka_unit_test(test_emit_args_and_script),
        cmocka_unit_test(test_fftw_wisdom_roundtrip),
    };
    return cmocka_run_group_tests_name("resources", tests, NULL, NULL);
}

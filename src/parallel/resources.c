/* resources.c — the resource planner: detect what the launcher gave the job,
 * decide threads per rank, refuse layouts that oversubscribe cores or memory,
 * know the BLAS/FFTW that are linked, FFTW wisdom, and job scripts.
 * See include/surveyproc/sp_resources.h for the contract. */
#include "surveyproc/sp_resources.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_log.h"
#include "surveyproc/sp_mpi.h"

#include <cblas.h>
#include <ctype.h>
#include <errno.h>
#include <fftw3.h>
#include <math.h>
#include <omp.h>
#include <sched.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* OpenBLAS extensions (declared in OpenBLAS's cblas.h, not in other BLAS'):
 * weak, so that a build against another BLAS still links and reports "not OpenBLAS". */
#pragma weak openblas_get_config
#pragma weak openblas_get_corename
#pragma weak openblas_get_parallel
#pragma weak openblas_set_num_threads

#define MIB 1048576.0
#define GUARD_ENV "SP_BLAS_REEXEC"

/* ---- small helpers --------------------------------------------------------------- */

/* Whole small file (procfs, sysfs) into buf; returns bytes or -1. */
static long read_small(const char *path, char *buf, size_t n)
{
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    size_t k = fread(buf, 1, n - 1, f);
    fclose(f);
    buf[k] = '\0';
    return (long)k;
}

/* A positive integer from the environment (leading number; "4(x2)" -> 4), 0 if unset. */
static long env_long(const char *name)
{
    const char *v = getenv(name);
    if (!v || !*v) return 0;
    char *end = NULL;
    long x = strtol(v, &end, 10);
    return end != v && x > 0 ? x : 0;
}

static void fmt_bytes(double b, char *buf, size_t n)
{
    if (b >= 1024.0 * MIB) snprintf(buf, n, "%.1f GiB", b / (1024.0 * MIB));
    else snprintf(buf, n, "%.0f MiB", b / MIB);
}

int sp_resources_count_cpulist(const char *list)
{
    int n = 0;
    const char *p = list;
    while (*p && isspace((unsigned char)*p)) p++;
    if (!*p) return 0;
    while (*p && !isspace((unsigned char)*p)) {
        char *end;
        long a = strtol(p, &end, 10);
        if (end == p || a < 0) return -1;
        long b = a;
        p = end;
        if (*p == '-') {
            b = strtol(p + 1, &end, 10);
            if (end == p + 1 || b < a) return -1;
            p = end;
        }
        n += (int)(b - a + 1);
        if (*p == ',') p++;
        else if (*p && !isspace((unsigned char)*p)) return -1;
    }
    return n;
}

static void format_cpuset(const cpu_set_t *set, char *buf, size_t n)
{
    size_t len = 0;
    buf[0] = '\0';
    for (int c = 0; c < CPU_SETSIZE; c++) {
        if (!CPU_ISSET(c, set)) continue;
        int e = c;
        while (e + 1 < CPU_SETSIZE && CPU_ISSET(e + 1, set)) e++;
        int w = e > c ? snprintf(buf + len, n - len, "%s%d-%d", len ? "," : "", c, e)
                      : snprintf(buf + len, n - len, "%s%d", len ? "," : "", c);
        if (w < 0 || (size_t)w >= n - len) {
            if (n > 4) snprintf(buf + (n > 5 ? n - 5 : 0), 5, "...");
            return;
        }
        len += (size_t)w;
        c = e;
    }
}

/* ---- cgroups (v1 and v2) ----------------------------------------------------------- */

typedef struct {
    char mount[512], root[512];
} cg_mount;

/* Mount point and root of the v1 hierarchy holding `controller`, or of cgroup2 (controller NULL). */
static int find_cg_mount(const char *mountinfo, const char *controller, cg_mount *m)
{
    FILE *f = fopen(mountinfo, "r");
    if (!f) return 0;
    char line[2048];
    int found = 0;
    while (!found && fgets(line, sizeof line, f)) {
        /* id parent maj:min root mount opts [optional...] - fstype source superopts */
        char root[512], mnt[512];
        if (sscanf(line, "%*s %*s %*s %511s %511s", root, mnt) != 2) continue;
        const char *dash = strstr(line, " - ");
        if (!dash) continue;
        char fstype[64], src[256], sopts[1024] = "";
        if (sscanf(dash + 3, "%63s %255s %1023s", fstype, src, sopts) < 2) continue;
        if (!controller) {
            if (strcmp(fstype, "cgroup2")) continue;
        } else {
            if (strcmp(fstype, "cgroup")) continue;
            int has = 0;
            for (char *tok = strtok(sopts, ","); tok; tok = strtok(NULL, ","))
                if (!strcmp(tok, controller)) has = 1;
            if (!has) continue;
        }
        snprintf(m->mount, sizeof m->mount, "%s", mnt);
        snprintf(m->root, sizeof m->root, "%s", root);
        found = 1;
    }
    fclose(f);
    return found;
}

/* The process's path in the hierarchy with `controller` (v1), or the v2 path (controller NULL). */
static int find_cg_path(const char *proc_cgroup, const char *controller, char *path, size_t n)
{
    FILE *f = fopen(proc_cgroup, "r");
    if (!f) return 0;
    char line[2048];
    int found = 0;
    while (!found && fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = '\0';
        char *c1 = strchr(line, ':');
        if (!c1) continue;
        char *c2 = strchr(c1 + 1, ':');
        if (!c2) continue;
        *c2 = '\0';
        const char *ctrls = c1 + 1, *p = c2 + 1;
        if (!controller) {
            if (strncmp(line, "0:", 2) || *ctrls) continue;
        } else {
            char tmp[256];
            snprintf(tmp, sizeof tmp, "%s", ctrls);
            int has = 0;
            for (char *tok = strtok(tmp, ","); tok; tok = strtok(NULL, ","))
                if (!strcmp(tok, controller)) has = 1;
            if (!has) continue;
        }
        snprintf(path, n, "%s", p);
        found = 1;
    }
    fclose(f);
    return found;
}

/* Directory of the process's cgroup in the mounted tree. */
static int cg_dir(const char *proc_cgroup, const char *mountinfo, const char *controller, char *dir, size_t n,
                  cg_mount *m)
{
    char path[1024];
    if (!find_cg_mount(mountinfo, controller, m) || !find_cg_path(proc_cgroup, controller, path, sizeof path))
        return 0;
    const char *rel = path;
    size_t rl = strlen(m->root);
    /* in a cgroup namespace the mount's root is the process's own cgroup */
    if (strcmp(m->root, "/") && !strncmp(path, m->root, rl)) rel = path + rl;
    else if (strcmp(m->root, "/")) rel = "";
    snprintf(dir, n, "%s%s", m->mount, rel);
    size_t l = strlen(dir);
    while (l > 1 && dir[l - 1] == '/') dir[--l] = '\0';
    return 1;
}

/* Walk from dir up to the mount point reading `file`; call fn on each value found. */
typedef void (*cg_visit)(const char *text, void *arg);
static void cg_walk(const char *dir, const char *mount, const char *file, cg_visit fn, void *arg)
{
    char d[2048], p[2100], buf[512];
    snprintf(d, sizeof d, "%s", dir);
    size_t ml = strlen(mount);
    for (;;) {
        snprintf(p, sizeof p, "%s/%s", d, file);
        if (read_small(p, buf, sizeof buf) > 0) fn(buf, arg);
        if (strlen(d) <= ml) break;
        char *slash = strrchr(d, '/');
        if (!slash || (size_t)(slash - d) < ml) break;
        *slash = '\0';
        if (strlen(d) < ml) break;
    }
}

static void visit_mem(const char *t, void *arg)
{
    double *m = arg;
    if (!strncmp(t, "max", 3)) return;
    double v = strtod(t, NULL);
    /* v1 reports "no limit" as a huge page-rounded number */
    if (v <= 0 || v >= 1e18) return;
    if (*m == 0 || v < *m) *m = v;
}

static void visit_cpu_max(const char *t, void *arg)
{
    double *q = arg;
    if (!strncmp(t, "max", 3)) return;
    double a = 0, b = 0;
    if (sscanf(t, "%lf %lf", &a, &b) == 2 && a > 0 && b > 0 && (*q == 0 || a / b < *q)) *q = a / b;
}

static void visit_text(const char *t, void *arg)
{
    /* keep the first (deepest) value */
    char *s = arg;
    if (!s[0]) snprintf(s, 256, "%s", t);
}

void sp_resources_cgroup_limits(const char *proc_cgroup, const char *mountinfo, double *mem, double *quota, int *cpus)
{
    char dir[2048];
    cg_mount m;
    *mem = 0;
    *quota = 0;
    *cpus = 0;
    /* v1 memory */
    if (cg_dir(proc_cgroup, mountinfo, "memory", dir, sizeof dir, &m))
        cg_walk(dir, m.mount, "memory.limit_in_bytes", visit_mem, mem);
    /* v1 cpu quota: cpu.cfs_quota_us / cpu.cfs_period_us at each level */
    if (cg_dir(proc_cgroup, mountinfo, "cpu", dir, sizeof dir, &m)) {
        char d[2048], p[2100], a[64], b[64];
        snprintf(d, sizeof d, "%s", dir);
        size_t ml = strlen(m.mount);
        for (;;) {
            snprintf(p, sizeof p, "%s/cpu.cfs_quota_us", d);
            if (read_small(p, a, sizeof a) > 0) {
                snprintf(p, sizeof p, "%s/cpu.cfs_period_us", d);
                if (read_small(p, b, sizeof b) > 0) {
                    double qa = strtod(a, NULL), qb = strtod(b, NULL);
                    if (qa > 0 && qb > 0 && (*quota == 0 || qa / qb < *quota)) *quota = qa / qb;
                }
            }
            char *slash = strrchr(d, '/');
            if (strlen(d) <= ml || !slash || (size_t)(slash - d) < ml) break;
            *slash = '\0';
        }
    }
    /* v1 cpuset */
    if (cg_dir(proc_cgroup, mountinfo, "cpuset", dir, sizeof dir, &m)) {
        char s[256] = "";
        cg_walk(dir, m.mount, "cpuset.effective_cpus", visit_text, s);
        if (!s[0]) cg_walk(dir, m.mount, "cpuset.cpus", visit_text, s);
        int c = sp_resources_count_cpulist(s);
        if (c > 0) *cpus = c;
    }
    /* v2 (also mounted beside v1 in hybrid setups; the smaller limit wins) */
    if (cg_dir(proc_cgroup, mountinfo, NULL, dir, sizeof dir, &m)) {
        cg_walk(dir, m.mount, "memory.max", visit_mem, mem);
        cg_walk(dir, m.mount, "cpu.max", visit_cpu_max, quota);
        char s[256] = "";
        cg_walk(dir, m.mount, "cpuset.cpus.effective", visit_text, s);
        int c = sp_resources_count_cpulist(s);
        if (c > 0 && (*cpus == 0 || c < *cpus)) *cpus = c;
    }
}

static double meminfo_available(void)
{
    char buf[8192];
    if (read_small("/proc/meminfo", buf, sizeof buf) <= 0) return 0;
    const char *p = strstr(buf, "MemAvailable:");
    if (!p) return 0;
    return strtod(p + 13, NULL) * 1024.0;
}

static double current_rss(void)
{
    char buf[8192];
    if (read_small("/proc/self/status", buf, sizeof buf) <= 0) return 0;
    const char *p = strstr(buf, "VmRSS:");
    return p ? strtod(p + 6, NULL) * 1024.0 : 0;
}

/* ---- CPU and OpenBLAS cores -------------------------------------------------------- */

int sp_resources_cpu_isa(void)
{
    char *buf = malloc(1 << 16);
    int isa = SP_ISA_SSE;
    if (buf && read_small("/proc/cpuinfo", buf, 1 << 16) > 0) {
        char *fl = strstr(buf, "\nflags");
        char *end = fl ? strchr(fl + 1, '\n') : NULL;
        if (end) *end = '\0';
        if (fl) {
            if (strstr(fl, " avx512f")) isa = SP_ISA_AVX512;
            else if (strstr(fl, " avx2")) isa = SP_ISA_AVX2;
            else if (strstr(fl, " avx")) isa = SP_ISA_AVX;
        }
    } else {
        /* no /proc: ask the CPU (also checks OS support of the registers) */
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx512f")) isa = SP_ISA_AVX512;
        else if (__builtin_cpu_supports("avx2")) isa = SP_ISA_AVX2;
        else if (__builtin_cpu_supports("avx")) isa = SP_ISA_AVX;
    }
    free(buf);
    return isa;
}

int sp_resources_core_isa(const char *core)
{
    static const struct {
        const char *name;
        int isa;
    } cores[] = {
        {"skylakex", SP_ISA_AVX512}, {"cooperlake", SP_ISA_AVX512}, {"sapphirerapids", SP_ISA_AVX512},
        {"haswell", SP_ISA_AVX2},    {"zen", SP_ISA_AVX2},          {"excavator", SP_ISA_AVX2},
        {"sandybridge", SP_ISA_AVX}, {"bulldozer", SP_ISA_AVX},     {"piledriver", SP_ISA_AVX},
        {"steamroller", SP_ISA_AVX}, {"prescott", SP_ISA_SSE},      {"core2", SP_ISA_SSE},
        {"penryn", SP_ISA_SSE},      {"dunnington", SP_ISA_SSE},    {"nehalem", SP_ISA_SSE},
        {"atom", SP_ISA_SSE},        {"opteron", SP_ISA_SSE},       {"opteron(sse3)", SP_ISA_SSE},
        {"barcelona", SP_ISA_SSE},   {"bobcat", SP_ISA_SSE},        {"katmai", SP_ISA_SSE},
        {"coppermine", SP_ISA_SSE},  {"northwood", SP_ISA_SSE},     {"banias", SP_ISA_SSE},
        {"athlon", SP_ISA_SSE},      {"nano", SP_ISA_SSE},          {"generic", SP_ISA_SSE},
    };
    if (!core) return SP_ISA_UNKNOWN;
    for (size_t i = 0; i < sizeof cores / sizeof cores[0]; i++)
        if (!strcasecmp(core, cores[i].name)) return cores[i].isa;
    return SP_ISA_UNKNOWN;
}

const char *sp_resources_auto_coretype(const char *running_core, int cpu_isa)
{
    int core = sp_resources_core_isa(running_core);
    /* only generic kernels (below AVX2) are replaced: OpenBLAS's own choice of a
     * modern core (e.g. Zen, Cooperlake) is trusted */
    if (core == SP_ISA_UNKNOWN || core >= SP_ISA_AVX2) return NULL;
    if (cpu_isa >= SP_ISA_AVX512) return "SkylakeX";
    if (cpu_isa >= SP_ISA_AVX2) return "Haswell";
    return NULL;
}

static const char *isa_name(int isa)
{
    switch (isa) {
    case SP_ISA_AVX512: return "avx512f";
    case SP_ISA_AVX2: return "avx2";
    case SP_ISA_AVX: return "avx";
    case SP_ISA_SSE: return "sse only";
    default: return "unknown";
    }
}

static int have_openblas(void) { return openblas_get_corename != NULL && openblas_get_config != NULL; }

/* The config's performance.blas_coretype for `run`/`plan` argv, before MPI: the
 * file's value, then --set overrides; "auto" when anything fails (the real
 * load reports errors later). */
static void early_coretype(int argc, char **argv, char *out, size_t n)
{
    snprintf(out, n, "auto");
    int ai = 1;
    while (ai < argc && argv[ai][0] == '-') ai++;
    if (ai >= argc || (strcmp(argv[ai], "run") && strcmp(argv[ai], "plan"))) {
        snprintf(out, n, "none"); /* commands without BLAS: leave OpenBLAS alone */
        return;
    }
    static const char *const with_value[] = {"--set", "--emit", "--nodes", "--ranks-per-node", "--threads",
                                             "--time", "--emit-out", NULL};
    const char *cfgpath = NULL, *set = NULL;
    for (int i = ai + 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            snprintf(out, n, "none");
            return;
        }
        int takes = 0;
        for (int k = 0; with_value[k]; k++)
            if (!strcmp(a, with_value[k])) takes = 1;
        if (takes && i + 1 < argc) {
            if (!strcmp(a, "--set") && !strncmp(argv[i + 1], "performance.blas_coretype=", 26))
                set = argv[i + 1] + 26;
            i++;
        } else if (!strncmp(a, "--set=performance.blas_coretype=", 32)) {
            set = a + 32;
        } else if (a[0] != '-' && !cfgpath) {
            cfgpath = a;
        }
    }
    if (set) {
        while (*set == '"' || *set == '\'' || *set == ' ') set++;
        snprintf(out, n, "%s", set);
        size_t l = strlen(out);
        while (l && (out[l - 1] == '"' || out[l - 1] == '\'' || out[l - 1] == ' ')) out[--l] = '\0';
        return;
    }
    if (!cfgpath) return;
    sp_config cfg;
    if (sp_config_load(cfgpath, &cfg) == SP_OK) {
        if (cfg.performance.blas_coretype) snprintf(out, n, "%s", cfg.performance.blas_coretype);
        sp_config_free(&cfg);
    }
    sp_err_clear();
}

void sp_resources_blas_reexec(int argc, char **argv)
{
    char mode[64];
    if (getenv(GUARD_ENV)) return; /* once: this process is the re-executed one (or a child of one) */
    if (!have_openblas()) return;
    if (!strstr(openblas_get_config(), "DYNAMIC_ARCH")) return; /* one compiled core: nothing to choose */
    early_coretype(argc, argv, mode, sizeof mode);
    if (!strcasecmp(mode, "none") || !mode[0]) return;
    const char *running = openblas_get_corename();
    int cpu = sp_resources_cpu_isa();
    const char *target = NULL;
    int forced = strcasecmp(mode, "auto") != 0;
    if (!forced) {
        target = sp_resources_auto_coretype(running, cpu);
    } else if (strcasecmp(running, mode)) {
        int want = sp_resources_core_isa(mode);
        /* kernels the CPU cannot execute would die with SIGILL: refuse to force them */
        if (want == SP_ISA_UNKNOWN || want <= cpu) target = mode;
    }
    if (!target) return;
    char guard[256];
    snprintf(guard, sizeof guard, "%ld:%s:%s:%s", (long)getpid(), running, target, forced ? "forced" : "auto");
    if (setenv("OPENBLAS_CORETYPE", target, 1) || setenv(GUARD_ENV, guard, 1)) return;
    fflush(stdout);
    fflush(stderr);
    execv("/proc/self/exe", argv);
    /* exec failed (no /proc?): carry on with the kernels we have */
    unsetenv("OPENBLAS_CORETYPE");
}

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* 256^3 dgemm, best of 5 after a warm-up: ~0.2 GFLOP in all, under 20 ms even on generic kernels. */
static double dgemm_gflops(void)
{
    enum { N = 256 };
    double *a = malloc(sizeof(double) * N * N), *b = malloc(sizeof(double) * N * N),
           *c = malloc(sizeof(double) * N * N);
    double best = 0;
    if (a && b && c) {
        for (int i = 0; i < N * N; i++) {
            a[i] = 1.0 / (1.0 + i % 97);
            b[i] = (double)(i % 13) - 6.0;
        }
        cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, N, N, 1.0, a, N, b, N, 0.0, c, N);
        for (int r = 0; r < 5; r++) {
            double t = now_s();
            cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, N, N, 1.0, a, N, b, N, 0.0, c, N);
            t = now_s() - t;
            double g = t > 0 ? 2.0 * N * N * N / t / 1e9 : 0;
            if (g > best) best = g;
        }
    }
    free(a);
    free(b);
    free(c);
    return best;
}

/* The resolved paths of BLAS / LAPACK / FFTW libraries mapped into this process. */
static void mapped_libs(char *out, size_t n)
{
    FILE *f = fopen("/proc/self/maps", "r");
    size_t len = 0;
    out[0] = '\0';
    if (!f) return;
    char line[1024];
    while (fgets(line, sizeof line, f)) {
        char *path = strchr(line, '/');
        if (!path) continue;
        path[strcspn(path, "\n")] = '\0';
        const char *base = strrchr(path, '/') + 1;
        if (!strstr(base, "blas") && !strstr(base, "lapack") && !strstr(base, "fftw") && !strstr(base, "mkl"))
            continue;
        char real[1024];
        if (!realpath(path, real)) snprintf(real, sizeof real, "%s", path);
        if (strstr(out, real)) continue;
        int w = snprintf(out + len, n - len, "%s%s", len ? ", " : "", real);
        if (w < 0 || (size_t)w >= n - len) break;
        len += (size_t)w;
    }
    fclose(f);
}

void sp_resources_blas_info(sp_res_blas *b, int measure)
{
    memset(b, 0, sizeof *b);
    b->cpu_isa = sp_resources_cpu_isa();
    snprintf(b->fftw, sizeof b->fftw, "%s", fftw_version);
    mapped_libs(b->libs, sizeof b->libs);
    b->openblas = have_openblas();
    if (b->openblas) {
        snprintf(b->config, sizeof b->config, "%s", openblas_get_config());
        size_t l = strlen(b->config);
        while (l && b->config[l - 1] == ' ') b->config[--l] = '\0';
        snprintf(b->core, sizeof b->core, "%s", openblas_get_corename());
        b->parallel = openblas_get_parallel ? openblas_get_parallel() : -1;
        b->dynamic_arch = strstr(b->config, "DYNAMIC_ARCH") != NULL;
        b->core_isa = sp_resources_core_isa(b->core);
        b->generic = b->core_isa != SP_ISA_UNKNOWN && b->core_isa < SP_ISA_AVX2 && b->cpu_isa >= SP_ISA_AVX2;
        /* how the core was chosen */
        const char *guard = getenv(GUARD_ENV), *env = getenv("OPENBLAS_CORETYPE");
        long gpid = 0;
        char from[64] = "", to[64] = "", how[16] = "";
        if (guard && sscanf(guard, "%ld:%63[^:]:%63[^:]:%15s", &gpid, from, to, how) == 4 && gpid == (long)getpid()) {
            if (strcasecmp(b->core, to))
                snprintf(b->core_note, sizeof b->core_note,
                         "OPENBLAS_CORETYPE=%s had no effect (OpenBLAS does not know it); OpenBLAS chose %s", to,
                         b->core);
            else if (!strcmp(how, "auto"))
                snprintf(b->core_note, sizeof b->core_note,
                         "set by surveyproc (blas_coretype auto): OpenBLAS chose generic %s kernels on a CPU with "
                         "%s; re-executed with OPENBLAS_CORETYPE=%s",
                         from, isa_name(b->cpu_isa), to);
            else
                snprintf(b->core_note, sizeof b->core_note,
                         "forced by performance.blas_coretype (OpenBLAS chose %s); re-executed with "
                         "OPENBLAS_CORETYPE=%s",
                         from, to);
        } else if (env && *env) {
            snprintf(b->core_note, sizeof b->core_note, "from OPENBLAS_CORETYPE=%s in the environment", env);
        } else if (!b->dynamic_arch) {
            snprintf(b->core_note, sizeof b->core_note, "compiled in (OpenBLAS built for one core)");
        } else {
            snprintf(b->core_note, sizeof b->core_note, "detected by OpenBLAS");
        }
    }
    if (measure) b->gflops = dgemm_gflops();
}

/* ---- notes ------------------------------------------------------------------------ */

void sp_resources_note(sp_resources *res, sp_res_level level, const char *fmt, ...)
{
    if (level > res->verdict) res->verdict = level;
    if (res->nnotes >= SP_RES_NOTES) return;
    sp_res_note *n = &res->notes[res->nnotes++];
    n->level = level;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(n->text, sizeof n->text, fmt, ap);
    va_end(ap);
}

static const char *level_name(sp_res_level l)
{
    return l == SP_RES_REFUSE ? "refused" : l == SP_RES_WARN ? "warning" : "ok";
}

/* ---- request, facts, decision ------------------------------------------------------ */

void sp_resources_request_from_config(const sp_config *cfg, sp_res_request *req)
{
    memset(req, 0, sizeof *req);
    req->threads = cfg->patch_run.threads_per_process;
    req->threads_key = "patch_run.threads_per_process";
    if (req->threads == SP_CONFIG_AUTO) {
        req->threads = cfg->performance.threads_per_rank;
        req->threads_key = "performance.threads_per_rank";
    }
    req->memory_per_rank_mb = cfg->performance.memory_per_rank_mb;
    req->allow_oversubscribe = cfg->performance.allow_oversubscribe;
    req->ranks = cfg->performance.ranks;
    req->blas_coretype = cfg->performance.blas_coretype;
    req->wisdom_file = cfg->performance.fftw_wisdom_file;
}

static void gather_local_facts(sp_res_facts *f)
{
    f->cpus_online = (int)sysconf(_SC_NPROCESSORS_ONLN);
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        f->affinity_cpus = CPU_COUNT(&set);
        format_cpuset(&set, f->affinity_list, sizeof f->affinity_list);
    }
    sp_resources_cgroup_limits("/proc/self/cgroup", "/proc/self/mountinfo", &f->cgroup_mem, &f->cpu_quota,
                               &f->cpuset_cpus);
    f->meminfo_avail = meminfo_available();
    f->slurm_cpus_per_task = (int)env_long("SLURM_CPUS_PER_TASK");
    f->slurm_cpus_on_node = (int)env_long("SLURM_CPUS_ON_NODE");
    f->pbs_num_ppn = (int)env_long("PBS_NUM_PPN");
    /* NCPUS is a common name: only a PBS job's is the allocation */
    if (getenv("PBS_JOBID") || getenv("PBS_ENVIRONMENT")) f->pbs_ncpus = (int)env_long("NCPUS");
    f->omp_num_threads = (int)env_long("OMP_NUM_THREADS");
    f->slurm_mem_per_cpu = (double)env_long("SLURM_MEM_PER_CPU") * MIB;
    f->slurm_mem_per_node = (double)env_long("SLURM_MEM_PER_NODE") * MIB;
    const char *o1 = getenv("OMPI_MCA_rmaps_base_oversubscribe"), *o2 = getenv("OMPI_MCA_mpi_oversubscribe"),
               *o3 = getenv("SLURM_OVERCOMMIT");
    f->launcher_oversubscribe = (o1 && (!strcmp(o1, "1") || !strcasecmp(o1, "true"))) ||
                                (o2 && (!strcmp(o2, "1") || !strcasecmp(o2, "true"))) ||
                                (o3 && (!strcmp(o3, "1") || !strcasecmp(o3, "yes")));
}

void sp_resources_decide(sp_resources *res)
{
    const sp_res_facts *f = &res->f;
    const sp_res_request *q = &res->req;
    int R = f->node_ranks > 0 ? f->node_ranks : 1;

    /* cores of this node: the smallest of what the machine, the cgroup and the launcher allow */
    int cores = f->cpus_online > 0 ? f->cpus_online : 1;
    snprintf(res->node_cores_source, sizeof res->node_cores_source, "online CPUs");
    if (f->cpuset_cpus > 0 && f->cpuset_cpus < cores) {
        cores = f->cpuset_cpus;
        snprintf(res->node_cores_source, sizeof res->node_cores_source, "cgroup cpuset");
    }
    if (f->cpu_quota > 0 && (int)floor(f->cpu_quota + 1e-9) < cores) {
        cores = (int)floor(f->cpu_quota + 1e-9) > 0 ? (int)floor(f->cpu_quota + 1e-9) : 1;
        snprintf(res->node_cores_source, sizeof res->node_cores_source, "cgroup CPU quota %.2f cores", f->cpu_quota);
    }
    if (f->slurm_cpus_on_node > 0 && f->slurm_cpus_on_node < cores) {
        cores = f->slurm_cpus_on_node;
        snprintf(res->node_cores_source, sizeof res->node_cores_source, "SLURM_CPUS_ON_NODE");
    }
    if (f->pbs_num_ppn > 0 && f->pbs_num_ppn < cores) {
        cores = f->pbs_num_ppn;
        snprintf(res->node_cores_source, sizeof res->node_cores_source, "PBS_NUM_PPN");
    } else if (f->pbs_ncpus > 0 && f->pbs_ncpus < cores) {
        cores = f->pbs_ncpus;
        snprintf(res->node_cores_source, sizeof res->node_cores_source, "NCPUS (PBS)");
    }
    res->node_cores = cores;

    /* threads asked for, in order: config, launcher allocation, OMP_NUM_THREADS, auto share */
    int want = 0;
    if (q->threads > 0) {
        want = q->threads;
        snprintf(res->threads_source, sizeof res->threads_source, "%s: %d", q->threads_key ? q->threads_key : "config",
                 q->threads);
    } else if (f->slurm_cpus_per_task > 0) {
        want = f->slurm_cpus_per_task;
        snprintf(res->threads_source, sizeof res->threads_source, "SLURM_CPUS_PER_TASK=%d", want);
    } else if (f->pbs_num_ppn > 0) {
        want = f->pbs_num_ppn / R > 0 ? f->pbs_num_ppn / R : 1;
        snprintf(res->threads_source, sizeof res->threads_source, "PBS_NUM_PPN=%d / %d rank(s) on the node",
                 f->pbs_num_ppn, R);
    } else if (f->pbs_ncpus > 0) {
        want = f->pbs_ncpus / R > 0 ? f->pbs_ncpus / R : 1;
        snprintf(res->threads_source, sizeof res->threads_source, "NCPUS=%d / %d rank(s) on the node", f->pbs_ncpus,
                 R);
    } else if (f->omp_num_threads > 0) {
        want = f->omp_num_threads;
        snprintf(res->threads_source, sizeof res->threads_source, "OMP_NUM_THREADS=%d", want);
    } else {
        want = cores / R > 0 ? cores / R : 1;
        snprintf(res->threads_source, sizeof res->threads_source, "auto: %d core(s) / %d rank(s) on the node", cores,
                 R);
    }
    res->threads_wanted = want;
    int t = want;
    if (f->omp_num_threads > 0 && f->omp_num_threads != want && q->threads <= 0)
        sp_resources_note(res, SP_RES_WARN,
                          "OMP_NUM_THREADS=%d differs from %s: using %d thread(s); set "
                          "performance.threads_per_rank to choose explicitly",
                          f->omp_num_threads, res->threads_source, want);
    /* never more threads than the cores this rank may run on */
    if (f->affinity_cpus > 0 && t > f->affinity_cpus) {
        t = f->affinity_cpus;
        int fit = cores / R > 0 ? cores / R : 1; /* threads per rank the node holds */
        char launch[200];
        if (want <= fit)
            snprintf(launch, sizeof launch, "`mpirun --bind-to none` or `mpirun --map-by ppr:%d:node:pe=%d`", R, want);
        else
            snprintf(launch, sizeof launch,
                     "at most %d thread(s) per rank for %d rank(s) on %d core(s): `mpirun --map-by ppr:%d:node:pe=%d` "
                     "with OMP_NUM_THREADS=%d",
                     fit, R, cores, R, fit, fit);
        sp_resources_note(res, SP_RES_WARN,
                          "this rank is bound to %d core(s) [%s] but %d thread(s) were asked (%s): running %d. "
                          "mpirun binds each rank to one core when it starts <= 2 ranks; launch with %s "
                          "(srun: --cpus-per-task=%d)",
                          f->affinity_cpus, f->affinity_list, want, res->threads_source, t, launch,
                          want <= fit ? want : fit);
    }
    res->threads = t > 0 ? t : 1;
    /* BLAS and FFTW run inside OpenMP regions: one level of threads only */
    res->blas_threads = 1;
    res->fftw_threads = 1;

    /* cores: ranks x threads on this node */
    long need = (long)R * res->threads;
    if (need > cores) {
        if (q->allow_oversubscribe) {
            sp_resources_note(res, SP_RES_WARN,
                              "%d rank(s) x %d thread(s) = %ld on %d core(s) (%s): oversubscribed, allowed by "
                              "performance.allow_oversubscribe (expect each rank to run slower)",
                              R, res->threads, need, cores, res->node_cores_source);
        } else if (f->launcher_oversubscribe && res->threads == 1) {
            sp_resources_note(res, SP_RES_WARN,
                              "%d rank(s) on %d core(s) (%s): oversubscribed, as the launcher was told to "
                              "(--oversubscribe / --overcommit); each rank gets a share of a core",
                              R, cores, res->node_cores_source);
        } else if (R > cores) {
            sp_resources_note(res, SP_RES_REFUSE,
                              "%d rank(s) on a node with %d core(s) (%s) would oversubscribe it: start at most %d "
                              "rank(s) per node (mpirun -np / --map-by ppr:%d:node, srun --ntasks-per-node=%d), or "
                              "set performance.allow_oversubscribe: true",
                              R, cores, res->node_cores_source, cores, cores, cores);
        } else {
            int tmax = cores / R > 0 ? cores / R : 1;
            sp_resources_note(res, SP_RES_REFUSE,
                              "%d rank(s) x %d thread(s) = %ld exceed the %d core(s) of the node (%s): use fewer "
                              "threads per rank (performance.threads_per_rank: %d, or OMP_NUM_THREADS / "
                              "--cpus-per-task=%d), fewer ranks per node, or set performance.allow_oversubscribe: "
                              "true",
                              R, res->threads, need, cores, res->node_cores_source, tmax, tmax);
        }
    }

    /* memory per rank: the configured budget, else the tightest detected limit */
    double best = 0;
    char src[200] = "", b1[32];
    res->mem_node_shared = 0;
    if (q->memory_per_rank_mb > 0) {
        best = q->memory_per_rank_mb * MIB;
        snprintf(src, sizeof src, "performance.memory_per_rank_mb: %d", q->memory_per_rank_mb);
    } else {
        struct {
            double v;
            int shared;
            char what[200];
        } c[4];
        int nc = 0;
        if (f->cgroup_mem > 0) {
            c[nc].v = f->cgroup_mem / R;
            c[nc].shared = 1;
            fmt_bytes(f->cgroup_mem, b1, sizeof b1);
            snprintf(c[nc++].what, sizeof c[0].what, "cgroup memory limit %s / %d rank(s)", b1, R);
        }
        if (f->slurm_mem_per_cpu > 0) {
            int cpt = f->slurm_cpus_per_task > 0 ? f->slurm_cpus_per_task : 1;
            c[nc].v = f->slurm_mem_per_cpu * cpt;
            c[nc].shared = 0;
            fmt_bytes(f->slurm_mem_per_cpu, b1, sizeof b1);
            snprintf(c[nc++].what, sizeof c[0].what, "SLURM_MEM_PER_CPU %s x %d CPU(s) per task", b1, cpt);
        }
        if (f->slurm_mem_per_node > 0) {
            c[nc].v = f->slurm_mem_per_node / R;
            c[nc].shared = 1;
            fmt_bytes(f->slurm_mem_per_node, b1, sizeof b1);
            snprintf(c[nc++].what, sizeof c[0].what, "SLURM_MEM_PER_NODE %s / %d rank(s)", b1, R);
        }
        if (f->meminfo_avail > 0) {
            c[nc].v = f->meminfo_avail / R;
            c[nc].shared = 1;
            fmt_bytes(f->meminfo_avail, b1, sizeof b1);
            snprintf(c[nc++].what, sizeof c[0].what, "MemAvailable %s / %d rank(s)", b1, R);
        }
        for (int k = 0; k < nc; k++)
            if (best == 0 || c[k].v < best) {
                best = c[k].v;
                res->mem_node_shared = c[k].shared;
                snprintf(src, sizeof src, "%s", c[k].what);
            }
        if (nc == 0) snprintf(src, sizeof src, "unknown (no cgroup limit, SLURM memory or /proc/meminfo)");
    }
    res->mem_per_rank = best;
    snprintf(res->mem_source, sizeof res->mem_source, "%s", src);
}

/* ---- detection (collective) -------------------------------------------------------- */

int sp_resources_detect(const sp_config *cfg, MPI_Comm comm, sp_resources *res)
{
    int status = SP_OK, rank, size;
    char *names = NULL;
    memset(res, 0, sizeof *res);
    sp_resources_request_from_config(cfg, &res->req);
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &size);
    MPI_Comm node = MPI_COMM_NULL;
    int node_rank = 0, node_size = 1;
    if (MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node) != MPI_SUCCESS)
        return SP_FAIL(SP_ERR_MPI, "MPI_Comm_split_type(SHARED) failed: cannot tell which ranks share a node");
    MPI_Comm_rank(node, &node_rank);
    MPI_Comm_size(node, &node_size);
    MPI_Comm_free(&node);
    int leader = node_rank == 0, nnodes = 0;
    MPI_Allreduce(&leader, &nnodes, 1, MPI_INT, MPI_SUM, comm);

    res->f.nranks = size;
    res->f.nnodes = nnodes;
    res->f.node_ranks = node_size;
    gather_local_facts(&res->f);
    sp_resources_decide(res);

    /* job-wide figures */
    int mx[1] = {node_size}, mn[4] = {res->node_cores, res->f.affinity_cpus, res->threads, -res->threads};
    MPI_Allreduce(MPI_IN_PLACE, mx, 1, MPI_INT, MPI_MAX, comm);
    MPI_Allreduce(MPI_IN_PLACE, mn, 4, MPI_INT, MPI_MIN, comm);
    res->node_ranks_max = mx[0];
    res->node_cores_min = mn[0];
    res->affinity_min = mn[1];
    res->threads_min = mn[2];
    res->threads_max = -mn[3];
    double mem = res->mem_per_rank > 0 ? res->mem_per_rank : INFINITY;
    MPI_Allreduce(MPI_IN_PLACE, &mem, 1, MPI_DOUBLE, MPI_MIN, comm);
    res->mem_per_rank_min = isfinite(mem) ? mem : 0;

    /* node names: leaders' name and rank count, listed by rank 0 */
    char me[MPI_MAX_PROCESSOR_NAME + 16];
    int nl = 0;
    memset(me, 0, sizeof me);
    MPI_Get_processor_name(me, &nl);
    snprintf(me + strlen(me), sizeof me - strlen(me), "|%d", leader ? node_size : 0);
    int w = (int)sizeof me;
    if (rank == 0) SP_ALLOC(names, (size_t)size * (size_t)w);
    MPI_Gather(me, w, MPI_CHAR, names, w, MPI_CHAR, 0, comm);
    if (rank == 0) {
        size_t len = 0;
        int shown = 0;
        for (int r = 0; r < size; r++) {
            char *s = names + (size_t)r * (size_t)w;
            s[w - 1] = '\0';
            char *bar = strrchr(s, '|');
            if (!bar || atoi(bar + 1) == 0) continue;
            *bar = '\0';
            if (shown < 8) {
                int k = snprintf(res->nodes_text + len, sizeof res->nodes_text - len, "%s%s: %d rank(s)",
                                 len ? ", " : "", s, atoi(bar + 1));
                if (k > 0 && (size_t)k < sizeof res->nodes_text - len) len += (size_t)k;
            }
            shown++;
        }
        if (shown > 8) snprintf(res->nodes_text + len, sizeof res->nodes_text - len, ", ... (%d nodes)", shown);
    }
    MPI_Bcast(res->nodes_text, sizeof res->nodes_text, MPI_CHAR, 0, comm);

    sp_resources_blas_info(&res->blas, 0);
    if (res->req.wisdom_file) {
        struct stat st;
        if (stat(res->req.wisdom_file, &st) == 0)
            snprintf(res->wisdom, sizeof res->wisdom, "%s (%lld bytes; read at start, updated at the end)",
                     res->req.wisdom_file, (long long)st.st_size);
        else
            snprintf(res->wisdom, sizeof res->wisdom, "%s (not yet written; saved at the end of the run)",
                     res->req.wisdom_file);
    }
cleanup:
    free(names);
    return status;
}

void sp_resources_apply(sp_resources *res)
{
    omp_set_num_threads(res->threads);
    if (openblas_set_num_threads) openblas_set_num_threads(res->blas_threads);
}

int sp_resources_setup(const sp_config *cfg, MPI_Comm comm, sp_resources *res, int *threads)
{
    int status = sp_resources_detect(cfg, comm, res);
    if (status != SP_OK) return status;
    sp_resources_apply(res);
    *threads = res->threads;
    return SP_OK;
}

/* ---- memory check, verdict ---------------------------------------------------------- */

void sp_resources_judge_memory(sp_resources *res, const sp_plan *plan)
{
    char a[32], b[32], c[32];
    res->peak_mem = res->baseline_rss + res->cell_mem;
    double have = res->mem_per_rank;
    if (have <= 0) return; /* unknown: nothing to compare */
    fmt_bytes(have, a, sizeof a);
    fmt_bytes(res->peak_mem, b, sizeof b);
    if (res->peak_mem > have) {
        /* cells shrink with the square of epsf_ngrid (the halo stays): which grid fits? */
        char grid[200] = "";
        double room = have - res->baseline_rss;
        if (plan && plan->ncells > 0 && room > 0 && res->cell_mem > 0) {
            const sp_cell *big = NULL;
            for (int k = 0; k < plan->ncells; k++)
                if (!big || plan->cells[k].mem_bytes > big->mem_bytes) big = &plan->cells[k];
            double side = (double)((big->rx1 - big->rx0) > (big->ry1 - big->ry0) ? big->rx1 - big->rx0
                                                                                  : big->ry1 - big->ry0);
            double target = side * sqrt(room / res->cell_mem) - 2.0 * plan->halo;
            long tile = plan->nx > plan->ny ? plan->nx : plan->ny;
            if (target > 16) {
                int ng = (int)ceil((double)tile / target);
                if (ng > plan->opts.epsf_ngrid)
                    snprintf(grid, sizeof grid, "smaller cells (epsf.epsf_ngrid: %d instead of %d), ", ng,
                             plan->opts.epsf_ngrid);
            }
        }
        if (!grid[0]) snprintf(grid, sizeof grid, "smaller cells (a larger epsf.epsf_ngrid), ");
        /* a node-wide limit shared by R ranks: how many ranks of this size fit */
        char fewer[120] = "fewer ranks per node";
        int R = res->f.node_ranks > 0 ? res->f.node_ranks : 1;
        if (res->mem_node_shared && R > 1) {
            int k = (int)floor(have * R / res->peak_mem);
            if (k >= 1 && k < R) snprintf(fewer, sizeof fewer, "fewer ranks per node (%d of this size fit)", k);
        }
        fmt_bytes(res->cell_mem, c, sizeof c);
        char base[32];
        fmt_bytes(res->baseline_rss, base, sizeof base);
        sp_resources_note(res, SP_RES_REFUSE,
                          "estimated peak memory per rank %s (baseline %s + largest cell %s) exceeds the %s a rank "
                          "has (%s): use %s%s, or more memory per task (sbatch --mem-per-cpu / --mem, or "
                          "performance.memory_per_rank_mb if the detection is wrong)",
                          b, base, c, a, res->mem_source, grid, fewer);
    } else if (res->peak_mem > 0.8 * have) {
        sp_resources_note(res, SP_RES_WARN,
                          "estimated peak memory per rank %s is over 80%% of the %s a rank has (%s): little headroom",
                          b, a, res->mem_source);
    }
}

int sp_resources_check(sp_resources *res, const sp_plan *plan, int measure_blas, MPI_Comm comm)
{
    int rank;
    MPI_Comm_rank(comm, &rank);
    double rss = current_rss();
    MPI_Allreduce(MPI_IN_PLACE, &rss, 1, MPI_DOUBLE, MPI_MAX, comm);
    res->baseline_rss = rss;
    res->cell_mem = plan ? plan->max_cell_mem : 0;
    sp_resources_judge_memory(res, plan);
    res->checked = 1;

    if (measure_blas && rank == 0) res->blas.gflops = dgemm_gflops();
    /* BLAS notes (same on every rank: same binary, same environment) */
    const sp_res_blas *b = &res->blas;
    const char *mode = res->req.blas_coretype ? res->req.blas_coretype : "auto";
    if (b->openblas && b->generic) {
        if (!strcasecmp(mode, "none"))
            sp_resources_note(res, SP_RES_WARN,
                              "OpenBLAS runs generic %s kernels on a CPU with %s (2-4x slower dgemm) and "
                              "performance.blas_coretype is none: set it to auto (or %s)",
                              b->core, isa_name(b->cpu_isa), b->cpu_isa >= SP_ISA_AVX512 ? "SkylakeX" : "Haswell");
        else
            sp_resources_note(res, SP_RES_WARN,
                              "OpenBLAS runs generic %s kernels on a CPU with %s (2-4x slower dgemm)%s; set "
                              "OPENBLAS_CORETYPE=%s in the job script",
                              b->core, isa_name(b->cpu_isa),
                              b->dynamic_arch ? "" : " and was built without DYNAMIC_ARCH",
                              b->cpu_isa >= SP_ISA_AVX512 ? "SkylakeX" : "Haswell");
    }
    if (b->openblas && strcasecmp(mode, "auto") && strcasecmp(mode, "none") && strcasecmp(mode, b->core)) {
        int want = sp_resources_core_isa(mode);
        if (want != SP_ISA_UNKNOWN && want > b->cpu_isa)
            sp_resources_note(res, SP_RES_WARN,
                              "performance.blas_coretype: %s needs %s, which this CPU lacks (it would crash with "
                              "SIGILL): running %s",
                              mode, isa_name(want), b->core);
        else
            sp_resources_note(res, SP_RES_WARN,
                              "performance.blas_coretype: %s was not applied (%s): running %s", mode,
                              b->dynamic_arch ? "OpenBLAS does not know that core" : "OpenBLAS has one compiled core",
                              b->core);
    }
    if (res->req.ranks > 0 && res->req.ranks != res->f.nranks)
        sp_resources_note(res, SP_RES_WARN, "performance.ranks is %d but the launcher started %d rank(s)",
                          res->req.ranks, res->f.nranks);

    /* the job-wide verdict: the worst level, with the message of the lowest rank that has it */
    int worst[2] = {(int)res->verdict, -rank}, agreed[2];
    MPI_Allreduce(worst, agreed, 1, MPI_2INT, MPI_MAXLOC, comm);
    int from = -agreed[1];
    if (agreed[0] > (int)SP_RES_OK && from != 0) {
        char msg[600] = "";
        if (rank == from)
            for (int k = 0; k < res->nnotes; k++)
                if ((int)res->notes[k].level == agreed[0]) {
                    snprintf(msg, sizeof msg, "%s", res->notes[k].text);
                    break;
                }
        MPI_Bcast(msg, sizeof msg, MPI_CHAR, from, comm);
        if ((int)res->verdict < agreed[0]) sp_resources_note(res, (sp_res_level)agreed[0], "rank %d: %s", from, msg);
    }
    return SP_OK;
}

int sp_resources_refusal(const sp_resources *res)
{
    if (res->verdict != SP_RES_REFUSE) return SP_OK;
    for (int k = 0; k < res->nnotes; k++)
        if (res->notes[k].level == SP_RES_REFUSE)
            return SP_FAIL(SP_ERR_RESOURCE, "layout refused: %s", res->notes[k].text);
    return SP_FAIL(SP_ERR_RESOURCE, "layout refused (see `surveyproc plan`)");
}

/* ---- report ---------------------------------------------------------------------------- */

static const char *parallel_name(int p)
{
    return p == 0 ? "sequential" : p == 1 ? "pthreads" : p == 2 ? "OpenMP" : "?";
}

void sp_resources_print(const sp_resources *res, FILE *f)
{
    const sp_res_facts *x = &res->f;
    char a[32], b[32], c[32];
    fprintf(f, "Resources:\n");
    fprintf(f, "  ranks          %d on %d node(s) (%s)\n", x->nranks, x->nnodes, res->nodes_text);
    fprintf(f, "  cores/node     %d (%s; %d online", res->node_cores, res->node_cores_source, x->cpus_online);
    if (x->cpuset_cpus) fprintf(f, ", cpuset %d", x->cpuset_cpus);
    if (x->cpu_quota > 0) fprintf(f, ", CPU quota %.2f", x->cpu_quota);
    if (x->slurm_cpus_on_node) fprintf(f, ", SLURM_CPUS_ON_NODE %d", x->slurm_cpus_on_node);
    fprintf(f, ")%s\n", res->node_cores_min != res->node_cores ? " (smallest node differs)" : "");
    fprintf(f, "  affinity       rank 0 may run on %d core(s) [%s]; smallest mask over ranks %d\n", x->affinity_cpus,
            x->affinity_list, res->affinity_min);
    fprintf(f, "  threads/rank   %d (%s%s)", res->threads, res->threads_source,
            res->threads != res->threads_wanted ? ", capped by the affinity mask" : "");
    if (res->threads_min != res->threads_max) fprintf(f, "; %d-%d over ranks", res->threads_min, res->threads_max);
    fprintf(f, "; ranks x threads on the busiest node %d x %d on %d core(s)\n", res->node_ranks_max, res->threads,
            res->node_cores);
    fprintf(f, "  BLAS/FFTW      1 thread each inside OpenMP regions (openblas_set_num_threads(1); FFTW plans "
               "single-threaded)\n");
    if (res->mem_per_rank > 0) fmt_bytes(res->mem_per_rank, a, sizeof a);
    else snprintf(a, sizeof a, "unknown");
    fmt_bytes(res->peak_mem, b, sizeof b);
    fmt_bytes(res->cell_mem, c, sizeof c);
    char base[32];
    fmt_bytes(res->baseline_rss, base, sizeof base);
    fprintf(f, "  memory/rank    %s available (%s); needs ~%s (baseline RSS %s + largest cell %s)\n", a,
            res->mem_source, b, base, c);
    const sp_res_blas *bl = &res->blas;
    if (bl->openblas) {
        fprintf(f, "  BLAS/LAPACK    OpenBLAS (%s, %s), core %s (%s); CPU %s", parallel_name(bl->parallel),
                bl->dynamic_arch ? "DYNAMIC_ARCH" : "one core", bl->core, bl->core_note, isa_name(bl->cpu_isa));
        if (bl->gflops > 0) fprintf(f, "; dgemm 256^3 %.1f GFLOP/s on 1 thread", bl->gflops);
        fprintf(f, "\n                 %s\n", bl->config);
    } else {
        fprintf(f, "  BLAS/LAPACK    not OpenBLAS (no openblas_get_config)");
        if (bl->gflops > 0) fprintf(f, "; dgemm 256^3 %.1f GFLOP/s on 1 thread", bl->gflops);
        fprintf(f, "\n");
    }
    fprintf(f, "  FFTW           %s; wisdom: %s\n", bl->fftw,
            res->wisdom[0] ? res->wisdom : "none (performance.fftw_wisdom_file: null)");
    if (bl->libs[0]) fprintf(f, "  libraries      %s\n", bl->libs);
    fprintf(f, "  verdict        %s\n", level_name(res->verdict));
    for (int k = 0; k < res->nnotes; k++)
        fprintf(f, "    %-8s %s\n", res->notes[k].level == SP_RES_REFUSE ? "REFUSED" : "warning", res->notes[k].text);
}

void sp_resources_log(const sp_resources *res)
{
    char a[32], b[32];
    if (res->mem_per_rank > 0) fmt_bytes(res->mem_per_rank, a, sizeof a);
    else snprintf(a, sizeof a, "unknown");
    fmt_bytes(res->peak_mem, b, sizeof b);
    SP_INFO("layout: %d rank(s) on %d node(s), %d thread(s) per rank (%s), %d core(s) per node (%s); memory per "
            "rank %s (%s), needs ~%s",
            res->f.nranks, res->f.nnodes, res->threads, res->threads_source, res->node_cores, res->node_cores_source,
            a, res->mem_source, b);
    if (res->blas.openblas)
        SP_INFO("BLAS: OpenBLAS core %s (%s)%s%.1f%s; FFTW %s", res->blas.core, res->blas.core_note,
                res->blas.gflops > 0 ? ", dgemm 256^3 " : "", res->blas.gflops > 0 ? res->blas.gflops : 0.0,
                res->blas.gflops > 0 ? " GFLOP/s" : "", res->blas.fftw);
    for (int k = 0; k < res->nnotes; k++)
        if (res->notes[k].level == SP_RES_WARN) SP_WARN("%s", res->notes[k].text);
}

/* ---- FFTW wisdom ----------------------------------------------------------------------- */

int sp_resources_fftw_wisdom_load(const char *path, MPI_Comm comm, int *loaded)
{
    int status = SP_OK, rank;
    char *text = NULL;
    size_t len = 0;
    *loaded = 0;
    if (!path) return SP_OK;
    int serial = comm == MPI_COMM_NULL;
    rank = 0;
    if (!serial) MPI_Comm_rank(comm, &rank);
    if (rank == 0) {
        FILE *f = fopen(path, "rb");
        if (f) {
            if (fseek(f, 0, SEEK_END) == 0) {
                long n = ftell(f);
                if (n > 0 && n < (64L << 20) && fseek(f, 0, SEEK_SET) == 0) {
                    text = malloc((size_t)n + 1);
                    if (text && fread(text, 1, (size_t)n, f) == (size_t)n) {
                        text[n] = '\0';
                        len = (size_t)n;
                    } else {
                        free(text);
                        text = NULL;
                    }
                }
            }
            fclose(f);
        }
    }
    if (!serial) SP_TRY(sp_mpi_bcast_bytes(&text, &len, 0, comm));
    if (len > 0) {
        *loaded = fftw_import_wisdom_from_string(text) != 0;
        if (!*loaded && rank == 0)
            SP_WARN("%s: FFTW wisdom does not import (another FFTW version or a damaged file): planning afresh; it "
                    "is rewritten at the end of the run",
                    path);
    }
cleanup:
    free(text);
    return status;
}

int sp_resources_fftw_wisdom_save(const char *path, MPI_Comm comm)
{
    int status = SP_OK, rank, size;
    char *mine = NULL, *all = NULL;
    int *lens = NULL, *displs = NULL;
    if (!path) return SP_OK;
    int serial = comm == MPI_COMM_NULL;
    rank = 0;
    size = 1;
    if (!serial) {
        MPI_Comm_rank(comm, &rank);
        MPI_Comm_size(comm, &size);
    }
    mine = fftw_export_wisdom_to_string();
    int n = mine ? (int)strlen(mine) + 1 : 0;
    if (rank == 0) {
        SP_ALLOC(lens, size);
        SP_ALLOC(displs, size);
    }
    if (serial) lens[0] = n;
    else MPI_Gather(&n, 1, MPI_INT, lens, 1, MPI_INT, 0, comm);
    long total = 0;
    if (rank == 0) {
        for (int r = 0; r < size; r++) {
            displs[r] = (int)total;
            total += lens[r];
        }
        SP_ALLOC(all, total + 1);
    }
    if (serial) memcpy(all, mine ? mine : "", (size_t)n);
    else MPI_Gatherv(mine ? mine : "", n, MPI_CHAR, all, lens, displs, MPI_CHAR, 0, comm);
    if (rank == 0) {
        /* merge: other ranks may have planned sizes rank 0 never saw */
        for (int r = 1; r < size; r++)
            if (lens[r] > 1) fftw_import_wisdom_from_string(all + displs[r]);
        char *merged = fftw_export_wisdom_to_string();
        char tmp[SP_PATH_MAX + 32];
        snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
        FILE *f = fopen(tmp, "w");
        int ok = f && merged && fputs(merged, f) >= 0;
        if (f && fclose(f) != 0) ok = 0;
        if (ok && rename(tmp, path) != 0) ok = 0;
        if (!ok) {
            unlink(tmp);
            status = SP_FAIL(SP_ERR_IO, "%s: cannot write FFTW wisdom (performance.fftw_wisdom_file): %s", path,
                             strerror(errno));
        }
        free(merged);
    }
    if (!serial) status = sp_mpi_agree(status, comm);
cleanup:
    free(mine);
    free(all);
    free(lens);
    free(displs);
    return status;
}

int sp_resources_fftw_wisdom_measure(const int *sizes, int nsizes, int *made)
{
    int status = SP_OK, count = 0;
    for (int i = 0; i < nsizes; i++) {
        int n = sizes[i];
        if (n <= 0) continue;
        double *r = fftw_alloc_real((size_t)n * n);
        fftw_complex *c = fftw_alloc_complex((size_t)n * (n / 2 + 1));
        if (!r || !c) {
            fftw_free(r);
            fftw_free(c);
            return SP_FAIL(SP_ERR_NOMEM, "FFTW: out of memory measuring %dx%d transforms", n, n);
        }
        fftw_plan p = fftw_plan_dft_r2c_2d(n, n, r, c, FFTW_MEASURE | FFTW_WISDOM_ONLY);
        if (!p) {
            p = fftw_plan_dft_r2c_2d(n, n, r, c, FFTW_MEASURE);
            count++;
        }
        if (p) fftw_destroy_plan(p);
        p = fftw_plan_dft_c2r_2d(n, n, c, r, FFTW_MEASURE | FFTW_WISDOM_ONLY);
        if (!p) {
            p = fftw_plan_dft_c2r_2d(n, n, c, r, FFTW_MEASURE);
            count++;
        }
        if (p) fftw_destroy_plan(p);
        fftw_free(r);
        fftw_free(c);
    }
    if (made) *made = count;
    return status;
}

int sp_resources_fftw_wisdom_prepare(const char *path, const int *sizes, int nsizes, MPI_Comm comm, int *made)
{
    int status = SP_OK, rank = 0, loaded = 0, n = 0;
    char *text = NULL;
    size_t len = 0;
    if (made) *made = 0;
    if (!path) return SP_OK;
    SP_TRY(sp_resources_fftw_wisdom_load(path, comm, &loaded));
    if (comm != MPI_COMM_NULL) MPI_Comm_rank(comm, &rank);
    /* rank 0 measures what the file lacks, once for every rank */
    if (rank == 0) status = sp_resources_fftw_wisdom_measure(sizes, nsizes, &n);
    if (comm == MPI_COMM_NULL) SP_TRY(status);
    else SP_TRY(sp_mpi_agree(status, comm));
    if (comm != MPI_COMM_NULL) MPI_Bcast(&n, 1, MPI_INT, 0, comm);
    if (n > 0 && comm != MPI_COMM_NULL) {
        if (rank == 0) {
            text = fftw_export_wisdom_to_string();
            len = text ? strlen(text) : 0;
        }
        SP_TRY(sp_mpi_bcast_bytes(&text, &len, 0, comm));
        if (rank != 0 && len > 0) fftw_import_wisdom_from_string(text);
    }
    if (made) *made = n;
cleanup:
    free(text);
    return status;
}

/* ---- job scripts ------------------------------------------------------------------------ */

int sp_resources_emit_arg(int argc, char **argv, int *i, sp_res_emit *e, int *consumed)
{
    const char *a = argv[*i];
    static const char *const keys[] = {"--emit", "--nodes", "--ranks-per-node", "--threads", "--time", "--emit-out",
                                       NULL};
    *consumed = 0;
    int k = 0;
    for (; keys[k]; k++)
        if (!strcmp(a, keys[k])) break;
    if (!keys[k]) return SP_OK;
    if (*i + 1 >= argc) return SP_FAIL(SP_ERR_CONFIG, "plan: %s needs a value (see --help)", a);
    const char *v = argv[++*i];
    *consumed = 1;
    char *end = NULL;
    long x = 0;
    switch (k) {
    case 0:
        if (!strcmp(v, "slurm")) e->kind = SP_RES_EMIT_SLURM;
        else if (!strcmp(v, "pbs")) e->kind = SP_RES_EMIT_PBS;
        else return SP_FAIL(SP_ERR_CONFIG, "plan: --emit %s: expected slurm or pbs", v);
        return SP_OK;
    case 1:
    case 2:
    case 3:
        x = strtol(v, &end, 10);
        if (end == v || *end || x < 1 || x > 1000000)
            return SP_FAIL(SP_ERR_CONFIG, "plan: %s %s: expected a positive integer", a, v);
        if (k == 1) e->nodes = (int)x;
        else if (k == 2) e->ranks_per_node = (int)x;
        else e->threads = (int)x;
        return SP_OK;
    case 4: {
        int h, m, s;
        char tail;
        if (sscanf(v, "%d:%d:%d%c", &h, &m, &s, &tail) != 3 || h < 0 || m < 0 || m > 59 || s < 0 || s > 59)
            return SP_FAIL(SP_ERR_CONFIG, "plan: --time %s: expected HH:MM:SS", v);
        snprintf(e->time, sizeof e->time, "%02d:%02d:%02d", h, m, s);
        return SP_OK;
    }
    default:
        snprintf(e->out, sizeof e->out, "%s", v);
        return SP_OK;
    }
}

int sp_resources_emit_script(const sp_res_emit *e, const sp_config *cfg, const sp_plan *plan,
                             const sp_resources *res, const char *config_path, FILE *out)
{
    int nodes = e->nodes > 0 ? e->nodes : 1;
    int active = plan && plan->ncells_active > 0 ? plan->ncells_active : 1;
    int rpn = e->ranks_per_node;
    if (rpn <= 0) {
        /* no more ranks than active cells: a rank without a cell only waits */
        int total = cfg->performance.ranks > 0 ? cfg->performance.ranks : active < 4 * nodes ? active : 4 * nodes;
        rpn = (total + nodes - 1) / nodes;
        if (rpn < 1) rpn = 1;
    }
    int t = e->threads > 0 ? e->threads : cfg->performance.threads_per_rank > 0 ? cfg->performance.threads_per_rank
                                                                                : 4;
    int ranks = nodes * rpn;
    /* memory: peak per rank for the emitted thread count (the fit workspace is per thread) with 25%
     * headroom, spread over the rank's CPUs, at least 512 MiB per rank */
    double cell = 0;
    for (int k = 0; plan && k < plan->ncells; k++)
        if (plan->cells[k].active) {
            double m = sp_plan_cell_memory(plan, &plan->cells[k], t);
            if (m > cell) cell = m;
        }
    double peak_mem = (res ? res->baseline_rss : 0) + cell;
    double per_rank = peak_mem > 0 ? peak_mem * 1.25 : 1024.0 * MIB;
    if (per_rank < 512.0 * MIB) per_rank = 512.0 * MIB;
    long mem_per_cpu_mb = (long)ceil(per_rank / t / MIB);
    long mem_node_mb = mem_per_cpu_mb * t * rpn, mem_job_mb = mem_node_mb * nodes;
    /* wall time: the plan's cost (nominal core-seconds) over the cores, x3 + 10 min, in 15-minute steps */
    char tbuf[32];
    if (e->time[0]) {
        snprintf(tbuf, sizeof tbuf, "%s", e->time);
    } else {
        double cost = 0;
        for (int k = 0; plan && k < plan->ncells; k++)
            if (plan->cells[k].active) cost += plan->cells[k].cost;
        double sec = cost / ((double)ranks * t) * 3.0 + 600.0;
        long q = (long)ceil(sec / 900.0) * 900;
        snprintf(tbuf, sizeof tbuf, "%02ld:%02ld:00", q / 3600, (q % 3600) / 60);
    }
    char exe[SP_PATH_MAX], cfgabs[SP_PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n > 0) exe[n] = '\0';
    else snprintf(exe, sizeof exe, "surveyproc");
    if (!realpath(config_path, cfgabs)) snprintf(cfgabs, sizeof cfgabs, "%s", config_path);
    const char *name = cfg->inputs.tile_name ? cfg->inputs.tile_name : "tile";
    char peak[32];
    fmt_bytes(peak_mem, peak, sizeof peak);

    if (e->kind == SP_RES_EMIT_SLURM) {
        fprintf(out,
                "#!/bin/bash\n"
                "# Written by `surveyproc plan --emit slurm` for %s: %ldx%ld pixels, %d band(s), %d active cell(s).\n"
                "# Layout: %d node(s) x %d rank(s) x %d thread(s). Memory: peak ~%s per rank (+25%%). Time: %s.\n"
                "# Submit: sbatch THIS_FILE    (resubmit with `run --resume` if the wall time runs out:\n"
                "#          jobs/slurm/chain.sh submits a tile job plus resume jobs that run only then)\n"
                "#SBATCH --job-name=sp-%s\n"
                "#SBATCH --nodes=%d\n"
                "#SBATCH --ntasks-per-node=%d\n"
                "#SBATCH --cpus-per-task=%d\n"
                "#SBATCH --mem-per-cpu=%ldM\n"
                "#SBATCH --time=%s\n"
                "#SBATCH --output=%%x-%%j.out\n"
                "set -euo pipefail\n"
                "SURVEYPROC=${SURVEYPROC:-%s}\n"
                "CONFIG=${CONFIG:-%s}\n"
                "# one OpenMP thread per CPU of the task, pinned; BLAS single-threaded inside OpenMP\n"
                "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-%d}\n"
                "export OMP_PROC_BIND=${OMP_PROC_BIND:-close} OMP_PLACES=${OMP_PLACES:-cores}\n"
                "export OPENBLAS_NUM_THREADS=1\n"
                "# NFS/Lustre without flock: HDF5 cannot lock the store\n"
                "export HDF5_USE_FILE_LOCKING=${HDF5_USE_FILE_LOCKING:-FALSE}\n"
                "# srun does not pass --cpus-per-task on to the tasks by itself (SLURM >= 22.05);\n"
                "# --kill-on-bad-exit=1: a rank that dies or fails ends the whole step at once\n"
                "srun --mpi=pmix --kill-on-bad-exit=1 --cpus-per-task=\"$OMP_NUM_THREADS\" \"$SURVEYPROC\" run \"$CONFIG\" \"$@\"\n",
                name, plan ? plan->nx : 0L, plan ? plan->ny : 0L, plan ? plan->nbands : 0, active, nodes, rpn, t,
                peak, tbuf, name, nodes, rpn, t, mem_per_cpu_mb, tbuf, exe, cfgabs, t);
    } else {
        fprintf(out,
                "#!/bin/bash\n"
                "# Written by `surveyproc plan --emit pbs` for %s: %ldx%ld pixels, %d band(s), %d active cell(s).\n"
                "# Layout: %d node(s) x %d rank(s) x %d thread(s). Memory: peak ~%s per rank (+25%%). Time: %s.\n"
                "# Submit: qsub THIS_FILE   (Torque syntax; PBS Pro instead of -l nodes:\n"
                "#   -l select=%d:ncpus=%d:mpiprocs=%d:ompthreads=%d:mem=%ldmb)\n"
                "#PBS -N sp-%s\n"
                "#PBS -l nodes=%d:ppn=%d\n"
                "#PBS -l walltime=%s\n"
                "#PBS -l mem=%ldmb\n"
                "#PBS -j oe\n"
                "set -euo pipefail\n"
                "cd \"${PBS_O_WORKDIR:-$PWD}\"\n"
                "SURVEYPROC=${SURVEYPROC:-%s}\n"
                "CONFIG=${CONFIG:-%s}\n"
                "THREADS=%d\n"
                "RANKS_PER_NODE=%d\n"
                "export OMP_NUM_THREADS=$THREADS\n"
                "export OMP_PROC_BIND=${OMP_PROC_BIND:-close} OMP_PLACES=${OMP_PLACES:-cores}\n"
                "export OPENBLAS_NUM_THREADS=1\n"
                "export HDF5_USE_FILE_LOCKING=${HDF5_USE_FILE_LOCKING:-FALSE}\n"
                "NP=%d\n"
                "# each rank gets THREADS cores (pe=), ranks placed RANKS_PER_NODE per node\n"
                "mpirun -np \"$NP\" --map-by ppr:$RANKS_PER_NODE:node:pe=$THREADS -x OMP_NUM_THREADS -x "
                "OMP_PROC_BIND -x OMP_PLACES -x OPENBLAS_NUM_THREADS -x HDF5_USE_FILE_LOCKING \\\n"
                "  \"$SURVEYPROC\" run \"$CONFIG\" \"$@\"\n",
                name, plan ? plan->nx : 0L, plan ? plan->ny : 0L, plan ? plan->nbands : 0, active, nodes, rpn, t,
                peak, tbuf, nodes, rpn * t, rpn, t, mem_node_mb, name, nodes, rpn * t, tbuf, mem_job_mb, exe, cfgabs,
                t, rpn, ranks);
    }
    if (ferror(out)) return SP_FAIL(SP_ERR_IO, "cannot write the job script: %s", strerror(errno));
    return SP_OK;
}

int sp_resources_emit_job(const sp_res_emit *e, const sp_config *cfg, const sp_plan *plan, const sp_resources *res,
                          const char *config_path, MPI_Comm comm)
{
    int status = SP_OK, rank;
    MPI_Comm_rank(comm, &rank);
    if (rank == 0) {
        FILE *js = e->out[0] ? fopen(e->out, "w") : stdout;
        if (!js) status = SP_FAIL(SP_ERR_IO, "%s: cannot write the job script: %s", e->out, strerror(errno));
        else status = sp_resources_emit_script(e, cfg, plan, res, config_path, js);
        if (js && js != stdout && fclose(js) != 0 && status == SP_OK)
            status = SP_FAIL(SP_ERR_IO, "%s: cannot write the job script: %s", e->out, strerror(errno));
        if (js == stdout) fflush(stdout);
    }
    return sp_mpi_agree(status, comm);
}

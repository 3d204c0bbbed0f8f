/* cmd_simulate.c — `surveyproc simulate`: write a synthetic tile with known truth.
 * Wiring only: config -> sp_sim_create -> sp_sim_write -> report. Under mpirun
 * the bands are split between ranks; the bytes do not depend on the layout. */
#include "commands.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_log.h"
#include "surveyproc/sp_prof.h"
#include "surveyproc/sp_sim.h"

#include <errno.h>
#include <mpi.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void usage(FILE *f)
{
    fprintf(f,
            "usage: surveyproc simulate [CONFIG.yaml] --out DIR [--preset tiny|demo|bench|big] [--seed N]\n"
            "                           [--threads N]\n\n"
            "Writes a 7DT-like aligned multi-band tile with known truth into DIR:\n"
            "  images/<band>_<k>.fits  image_list.txt  input_catalog.csv  reference_catalog.csv\n"
            "  truth.csv  truth_psf/<band>.fits  truth_psf.yaml  sim.yaml  config.yaml\n"
            "then `surveyproc run DIR/config.yaml` runs the pipeline on it (store under DIR/work/).\n\n"
            "  CONFIG        simulator YAML (flat key: value; overrides the preset's defaults)\n"
            "  --out DIR     output folder (created)\n"
            "  --preset P    tiny (256^2, 3 bands, seconds), demo (1024^2, 4 bands x 2 frames),\n"
            "                bench (2048^2, 6 bands, 5,500 sources), big (8192^2 x 32 bands = 8.6 GB)\n"
            "  --seed N      random seed (same seed -> same bytes for any threads/ranks)\n"
            "  --threads N   OpenMP threads (default: OMP_NUM_THREADS or all cores)\n\n");
    sp_sim_config_help(f);
}

static int parse_long(const char *opt, const char *s, long lo, long hi, long *v)
{
    char *end = NULL;
    errno = 0;
    long x = strtol(s ? s : "", &end, 10);
    if (!s || !*s || *end || errno || x < lo || x > hi)
        return SP_FAIL(SP_ERR_CONFIG, "surveyproc simulate: %s needs an integer in [%ld, %ld], got '%s'", opt, lo, hi,
                       s ? s : "");
    *v = x;
    return SP_OK;
}

int sp_cmd_simulate(int argc, char **argv)
{
    int status = SP_OK, rank = 0, nranks = 1;
    const char *cfgpath = NULL, *out = NULL, *preset = NULL;
    long threads = 0;
    int have_seed = 0;
    unsigned long long seed = 0;
    sp_sim *s = NULL;
    if (sp_cli_wants_help(argc, argv)) {
        usage(stdout);
        return SP_OK;
    }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--out") || !strcmp(a, "--preset") || !strcmp(a, "--seed") || !strcmp(a, "--threads")) {
            SP_CHECK(i + 1 < argc, SP_ERR_CONFIG, "surveyproc simulate: %s needs a value", a);
            const char *v = argv[++i];
            if (!strcmp(a, "--out")) out = v;
            else if (!strcmp(a, "--preset")) preset = v;
            else if (!strcmp(a, "--threads")) SP_TRY(parse_long(a, v, 1, 4096, &threads));
            else {
                char *end = NULL;
                errno = 0;
                seed = strtoull(v, &end, 10);
                SP_CHECK(*v && *v != '-' && !*end && !errno, SP_ERR_CONFIG,
                         "surveyproc simulate: --seed needs a non-negative integer, got '%s'", v);
                have_seed = 1;
            }
        } else if (a[0] == '-') {
            SP_CHECK(0, SP_ERR_CONFIG, "surveyproc simulate: unknown option '%s' (see surveyproc simulate --help)", a);
        } else {
            SP_CHECK(!cfgpath, SP_ERR_CONFIG, "surveyproc simulate: more than one config file ('%s', '%s')", cfgpath,
                     a);
            cfgpath = a;
        }
    }
    SP_CHECK(out, SP_ERR_CONFIG, "surveyproc simulate: --out DIR is required (see surveyproc simulate --help)");
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &nranks);
    if (threads > 0) omp_set_num_threads((int)threads);

    sp_sim_config c;
    if (cfgpath) SP_TRY(sp_sim_config_load(cfgpath, preset, &c));
    else SP_TRY(sp_sim_config_preset(preset ? preset : "tiny", &c));
    if (have_seed) c.seed = (uint64_t)seed;
    SP_TRY(sp_sim_config_validate(&c));

    double t0 = sp_wtime();
    sp_prof_push("simulate");
    SP_TRY(sp_sim_create(&c, &s));
    double gb = (double)s->nframes * (double)c.nx * (double)c.ny * 4.0 / 1e9;
    SP_INFO("simulate: preset %s, seed %llu, %ld x %ld pixels, %d bands x %d frames (%.2f GB), %ld sources, "
            "%d rank(s) x %d thread(s) -> %s",
            c.preset, (unsigned long long)c.seed, c.nx, c.ny, s->nbands, c.frames_per_band, gb, s->nsrc, nranks,
            omp_get_max_threads(), out);
    sp_sim_stats st;
    status = sp_sim_write(s, out, rank, nranks, &st);
    sp_prof_pop();
    if (status) goto cleanup;

    double mpix = st.mpix, mpix_all = 0, tmax = 0, t = sp_wtime() - t0;
    MPI_Reduce(&mpix, &mpix_all, 1, MPI_DOUBLE, MPI_SUM, 0, MPI_COMM_WORLD);
    MPI_Reduce(&t, &tmax, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
    if (rank == 0) {
        SP_INFO("simulate: rank 0 times: render %.2f s, noise %.2f s, write %.2f s", st.render_seconds,
                st.noise_seconds, st.io_seconds);
        printf("simulate: wrote %s: %d frames, %.1f Mpix (%.2f GB) in %.2f s = %.1f Mpix/s (%d rank(s) x %d "
               "thread(s))\n",
               out, s->nframes, mpix_all, mpix_all * 4e-3, tmax, tmax > 0 ? mpix_all / tmax : 0.0, nranks,
               omp_get_max_threads());
        fflush(stdout);
    }
cleanup:
    sp_sim_free(&s);
    return status;
}

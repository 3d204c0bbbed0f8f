/* cmd_config.c — `surveyproc config`: check a config and print the effective
 * configuration, or write the commented template / the markdown reference.
 * Serial: only rank 0 works when launched under mpirun. */
#include "commands.h"
#include "surveyproc/sp_config.h"
#include "surveyproc/sp_error.h"

#include <errno.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void usage(FILE *f)
{
    fprintf(f,
            "usage: surveyproc config FILE [--check] [--hash] [--set KEY=VALUE]...\n"
            "       surveyproc config --dump [--out PATH]\n"
            "       surveyproc config --markdown [--out PATH]\n\n"
            "  FILE             check a YAML config and print the effective configuration (every key,\n"
            "                   paths resolved, non-default values marked) to stdout\n"
            "  --check          only check FILE; print \"FILE: ok\"\n"
            "  --hash           print only the science hash of FILE (what run --resume compares)\n"
            "  --set KEY=VALUE  override a key after loading FILE (YAML value: 30, auto, \"[fits, csv]\")\n"
            "  --dump           write a commented template with every key at its default\n"
            "  --markdown       write the config reference (docs/config.md)\n"
            "  --out PATH       write to PATH instead of stdout (replaced whole, never half-written)\n\n"
            "Errors name FILE:LINE, the key, what is wrong and what is allowed; exit code 3.\n");
}

/* What to write: the template, the markdown reference, or a config. */
typedef struct {
    int what; /* 0 template, 1 markdown, 2 effective config */
    const sp_config *cfg;
} output_t;

static int write_to(FILE *f, const output_t *o)
{
    if (o->what == 0) return sp_config_dump_template(f);
    if (o->what == 1) return sp_config_write_markdown(f);
    return sp_config_print(f, o->cfg);
}

/* Write to path (NULL: stdout) through a temporary file renamed into place,
 * so a failure never leaves a truncated file behind. */
static int write_out(const char *path, const output_t *o)
{
    int status = SP_OK;
    char tmp[4096];
    FILE *f = NULL;
    if (!path) return write_to(stdout, o);
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
    f = fopen(tmp, "w");
    SP_CHECK(f, SP_ERR_IO, "%s: cannot write: %s", tmp, strerror(errno));
    status = write_to(f, o);
    if (fclose(f) != 0 && status == SP_OK) status = SP_FAIL(SP_ERR_IO, "%s: write failed: %s", tmp, strerror(errno));
    f = NULL;
    if (status == SP_OK && rename(tmp, path) != 0)
        status = SP_FAIL(SP_ERR_IO, "%s: cannot rename to %s: %s", tmp, path, strerror(errno));
cleanup:
    if (status != SP_OK) remove(tmp);
    return status;
}

int sp_cmd_config(int argc, char **argv)
{
    int status = SP_OK;
    const char *file = NULL, *out = NULL;
    int dump = 0, markdown = 0, check = 0, hash = 0, nset = 0;
    const char **sets = NULL;
    sp_config cfg;
    memset(&cfg, 0, sizeof cfg);

    if (sp_cli_wants_help(argc, argv)) {
        usage(stdout);
        return SP_OK;
    }
    int rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    if (rank != 0) return SP_OK;

    SP_ALLOC(sets, argc);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--dump")) dump = 1;
        else if (!strcmp(a, "--markdown")) markdown = 1;
        else if (!strcmp(a, "--check")) check = 1;
        else if (!strcmp(a, "--hash")) hash = 1;
        else if (!strcmp(a, "--out") || !strcmp(a, "--set")) {
            SP_CHECK(i + 1 < argc, SP_ERR_CONFIG, "config: %s needs a value", a);
            if (!strcmp(a, "--out")) out = argv[++i];
            else sets[nset++] = argv[++i];
        } else if (a[0] == '-' && a[1]) {
            usage(stderr);
            SP_CHECK(0, SP_ERR_CONFIG, "config: unknown option '%s'", a);
        } else {
            SP_CHECK(!file, SP_ERR_CONFIG, "config: one FILE at a time ('%s' and '%s')", file, a);
            file = a;
        }
    }
    SP_CHECK(dump + markdown + (file != NULL) == 1, SP_ERR_CONFIG,
             "config: give exactly one of FILE, --dump or --markdown (see surveyproc config --help)");

    if (dump) {
        SP_TRY(write_out(out, &(output_t){0, NULL}));
        goto cleanup;
    }
    if (markdown) {
        SP_TRY(write_out(out, &(output_t){1, NULL}));
        goto cleanup;
    }
    SP_TRY(sp_config_load(file, &cfg));
    for (int i = 0; i < nset; i++) {
        char key[256];
        const char *eq = strchr(sets[i], '=');
        SP_CHECK(eq && eq != sets[i] && (size_t)(eq - sets[i]) < sizeof key, SP_ERR_CONFIG,
                 "--set '%s': expected KEY=VALUE, e.g. --set patch_run.n_opt_iters=30", sets[i]);
        snprintf(key, sizeof key, "%.*s", (int)(eq - sets[i]), sets[i]);
        SP_TRY(sp_config_set(&cfg, key, eq + 1));
    }
    if (nset) SP_TRY(sp_config_validate(&cfg));
    if (hash) {
        uint64_t h;
        sp_config_science_hash(&cfg, &h);
        printf("%016llx\n", (unsigned long long)h);
    } else if (check) {
        printf("%s: ok\n", file);
    } else {
        SP_TRY(write_out(out, &(output_t){2, &cfg}));
    }
cleanup:
    sp_config_free(&cfg);
    free(sets);
    return status;
}

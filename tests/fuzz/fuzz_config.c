/* fuzz_config.c — libFuzzer harness: YAML config text -> sp_config_load_string (the schema
 * parser, validation, type and range checks). A failed load must leave a status and a
 * message, never a crash, a leak or a hang. `make fuzz` builds and runs it. */
#include "surveyproc/sp_config.h"
#include "surveyproc/sp_error.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *text = malloc(size + 1);
    if (!text) return 0;
    memcpy(text, data, size);
    text[size] = '\0'; /* the config arrives as a C string: embedded NULs end it */
    sp_config cfg;
    int st = sp_config_load_string(text, "fuzz.yaml", "/nonexistent-fuzz-dir", &cfg);
    if (st == SP_OK) {
        char *yaml = NULL;
        /* a config that loads must also dump (the provenance copy in every store) */
        if (sp_config_to_yaml_string(&cfg, &yaml) == SP_OK) free(yaml);
        sp_config_free(&cfg);
    } else {
        /* every failure has a message */
        if (!sp_err_msg()[0]) abort();
        sp_config_free(&cfg);
    }
    sp_err_clear();
    free(text);
    return 0;
}

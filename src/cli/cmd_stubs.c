/* cmd_stubs.c — subcommands whose issue has not landed yet. They say so and exit 2;
 * none pretends to work. Each moves to its own cmd_<name>.c when built. */
#include "commands.h"
#include "surveyproc/sp_error.h"

#include <stdio.h>

#define NOT_BUILT(fn, name, what)                                                                  \
    int fn(int argc, char **argv)                                                                  \
    {                                                                                              \
        if (sp_cli_wants_help(argc, argv)) {                                                       \
            printf("surveyproc " name ": " what "\n(not built yet)\n");                            \
            return SP_OK;                                                                          \
        }                                                                                          \
        return SP_FAIL(SP_ERR_NOTBUILT, "surveyproc " name ": not built yet (" what ")");         \
    }

NOT_BUILT(sp_cmd_score, "score", "accuracy scoring against truth")

/* commands.h — the subcommands of bin/surveyproc. Each one parses its own
 * arguments (argv[0] is the subcommand name), returns an sp_status, and leaves
 * the message in sp_err_msg() on failure. MPI is initialised before any runs. */
#ifndef SP_CLI_COMMANDS_H
#define SP_CLI_COMMANDS_H

typedef struct {
    int quiet, verbose, profile;
} sp_global_opts;

extern sp_global_opts sp_gopts;

int sp_cmd_run(int argc, char **argv);
int sp_cmd_plan(int argc, char **argv);
int sp_cmd_simulate(int argc, char **argv);
int sp_cmd_config(int argc, char **argv);
int sp_cmd_export(int argc, char **argv);
int sp_cmd_zp(int argc, char **argv);
int sp_cmd_inspect(int argc, char **argv);
int sp_cmd_score(int argc, char **argv);
int sp_cmd_qa(int argc, char **argv);

/* A failure every rank agrees on (collective phases): rank 0 prints it once,
 * every rank finalises MPI and exits with the status's exit code. */
void sp_cli_exit_agreed(int status) __attribute__((noreturn));

/* Shared by the subcommands: true if argv has -h/--help (then print usage and return 0). */
int sp_cli_wants_help(int argc, char **argv);

#endif

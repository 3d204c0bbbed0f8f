/* support.h — helpers shared by the cmocka test programs. Include after cmocka's prerequisites:
 *   #include <stdarg.h> <stddef.h> <setjmp.h> <stdint.h> <cmocka.h> then "support.h". */
#ifndef SP_TEST_SUPPORT_H
#define SP_TEST_SUPPORT_H

#include <stddef.h>

/* A fresh temporary directory for this test program (created once, under
 * $TMPDIR or /tmp, removed at exit unless SP_KEEP_TMP is set). */
const char *sp_test_tmpdir(void);

/* Join the tmp dir and a file name into a static-per-call buffer (caller copies). */
const char *sp_test_path(const char *name, char *buf, size_t n);

/* Write text to a file in the tmp dir; returns its full path in buf. */
const char *sp_test_write(const char *name, const char *text, char *buf, size_t n);

/* Repository root (from the SP_SRCDIR env var set by the runner, else "."). */
const char *sp_test_srcdir(void);

/* MPI tests: 1 if `ok` on every rank of MPI_COMM_WORLD. */
int sp_test_all_ranks(int ok);

/* MPI tests: silence stdout/stderr of ranks other than 0 (call after MPI_Init). */
void sp_test_quiet_nonroot(void);

#endif

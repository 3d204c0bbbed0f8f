/* sp_mpi.h — small MPI helpers shared by the plan and the coordinator.
 *
 * Error agreement: collective phases (plan, store creation) end with
 * sp_mpi_agree(), so a failure on any rank becomes the same status and message
 * on every rank, and the driver can print it once (rank 0) and exit cleanly
 * without MPI_Abort. Asynchronous phases (cells) cannot agree; there a failing
 * rank reports and the driver aborts the job (sp_fatal).
 */
#ifndef SP_MPI_H
#define SP_MPI_H

#include <mpi.h>
#include <stddef.h>

/* Collective. Given this rank's status (its message in sp_err_msg()). Returns
 * SP_OK if every rank had SP_OK; otherwise the status of the lowest failing
 * rank, whose message (prefixed with "rank R: " when R is not rank 0)
 * is installed as the current error on every rank.
 * The wait is bounded by the watchdog (sp_watchdog.h, performance.rank_timeout_s): a rank that
 * never arrives (stuck, stopped, lost node) ends the job with a message naming file:line of the
 * call, instead of a silent hang. */
int sp_mpi_agree_at(int status, MPI_Comm comm, const char *file, int line);
#define sp_mpi_agree(status, comm) sp_mpi_agree_at((status), (comm), __FILE__, __LINE__)

/* Collective. Broadcast a malloc'd byte buffer from root: on root *buf and *len are
 * given; elsewhere *buf is allocated (with a trailing NUL) and *len set. */
int sp_mpi_bcast_bytes(char **buf, size_t *len, int root, MPI_Comm comm);

/* Read a whole file on root and broadcast it (collective; error agreed).
 * *text is NUL-terminated. */
int sp_mpi_read_file_bcast(const char *path, char **text, size_t *len, int root, MPI_Comm comm);

/* Rank, size of MPI_COMM_WORLD (1/0 when MPI is not initialised). */
int sp_mpi_rank(void);
int sp_mpi_size(void);

#endif

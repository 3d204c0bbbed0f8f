#!/bin/bash
# Submit a tile job and N resume jobs behind it. Resume job k starts only if the tile job and every
# resume job before it ended without success (afternotok: failed, timed out, node failure,
# cancelled); as soon as one of them succeeds the rest can never start and SLURM removes them
# (--kill-on-invalid-dep). A tile larger than one wall-time window finishes across the chain.
#
#   jobs/slurm/chain.sh CONFIG.yaml [N_RESUMES=3] [extra sbatch options, e.g. --time=04:00:00]
#
# (Each resume depends on all jobs before it, not only the previous one: a job SLURM removed
# counts as "not ok", so a plain chain would start the second resume after a successful tile.)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
CONFIG=${1:?usage: chain.sh CONFIG.yaml [N_RESUMES] [sbatch options]}
N=${2:-3}
shift $(( $# >= 2 ? 2 : 1 ))
jid=$(sbatch --parsable "$@" "$here/tile.sbatch" "$CONFIG")
jid=${jid%%;*}
echo "tile job $jid"
deps=$jid
for _ in $(seq 1 "$N"); do
  rid=$(sbatch --parsable --dependency=afternotok:"$deps" --kill-on-invalid-dep=yes "$@" \
        "$here/resume.sbatch" "$CONFIG")
  rid=${rid%%;*}
  echo "resume job $rid (runs only if every job before it failed or timed out)"
  deps=$deps:$rid
done

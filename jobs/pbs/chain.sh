#!/bin/bash
# Submit a tile job and N resume jobs behind it. Resume job k starts only if the tile job and every
# resume job before it ended without success (afternotok on all of them), so a tile larger than one
# walltime window finishes across the chain and nothing runs after a success.
#
#   jobs/pbs/chain.sh CONFIG.yaml [N_RESUMES=3]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
CONFIG=${1:?usage: chain.sh CONFIG.yaml [N_RESUMES]}
N=${2:-3}
jid=$(qsub -v "CONFIG=$CONFIG" "$here/tile.pbs")
echo "tile job $jid"
deps=$jid
for _ in $(seq 1 "$N"); do
  rid=$(qsub -W depend=afternotok:"$deps" -v "CONFIG=$CONFIG" "$here/resume.pbs")
  echo "resume job $rid (runs only if every job before it failed or exceeded its walltime)"
  deps=$deps:$rid
done

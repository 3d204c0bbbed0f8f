#!/usr/bin/env bash
# make demo: simulate a small multi-band tile with known truth, run surveyproc on it under mpirun,
# and print the run's summary and the accuracy report against the truth.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$PWD/bin/surveyproc
OUT=${SP_DEMO_DIR:-$PWD/demo}
NP=${SP_DEMO_RANKS:-2}

# As root (CI, containers) Open MPI needs explicit consent; more ranks than cores need oversubscribe.
# Cluster users do not need these; they are for this test rig only.
MPIFLAGS=(--bind-to none)
if [ "$(id -u)" -eq 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
export OMPI_MCA_rmaps_base_oversubscribe=1

echo "== surveyproc demo: simulate a tile into $OUT"
rm -rf "$OUT"
"$BIN" simulate --preset demo --out "$OUT"
echo
echo "== plan (dry run)"
mpirun -np "$NP" "${MPIFLAGS[@]}" "$BIN" plan "$OUT/config.yaml"
echo
echo "== run on $NP MPI ranks"
mpirun -np "$NP" "${MPIFLAGS[@]}" "$BIN" run "$OUT/config.yaml"
echo
STORE=$(ls "$OUT"/work/*.h5 | head -1)
"$BIN" inspect "$STORE"
if "$BIN" score --help >/dev/null 2>&1 && ! "$BIN" score --help 2>&1 | grep -q "not built yet"; then
  echo
  echo "== accuracy against the simulator's truth"
  "$BIN" score "$STORE" --truth "$OUT/truth.csv" --json "$OUT/work/score.json"
fi
echo
echo "Demo done. Store: $STORE"

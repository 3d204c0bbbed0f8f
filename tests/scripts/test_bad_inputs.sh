#!/usr/bin/env bash
# test_bad_inputs.sh — the bad-input suite (tests/bad_inputs/run.sh): every class of bad
# input gets the exact exit code, one message naming the file and line/key/HDU, and no
# store or a valid one; under 2 ranks one rank's error ends the job with its message.
# Prints PASS:/FAIL:/SKIP: lines (tests/run_all.sh counts them). Well under 2 minutes.
set -u
cd "$(dirname "$0")/../.."
if ! command -v mpirun >/dev/null 2>&1; then
  echo "SKIP: bad_inputs_np2 (mpirun not found: the 2-rank cases run with 1 rank)"
fi
bash tests/bad_inputs/run.sh
exit 0

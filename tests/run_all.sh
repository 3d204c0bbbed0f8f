#!/usr/bin/env bash
# Runs every test suite and prints one closing line "N passed, N failed, N skipped".
#  - tests/unit/test_*    cmocka programs, serial
#  - tests/mpi/test_*     cmocka programs run under mpirun at 1, 2 and 4 ranks
#  - tests/scripts/test_*.sh  end-to-end scripts; each prints "PASS: name" / "FAIL: name" / "SKIP: name"
#  - the same unit + MPI (2 ranks) programs built with ASan+UBSan (build/san), unless SP_SKIP_SANITIZE=1
#  - valgrind memcheck on the fast serial unit tests (SP_VALGRIND_TESTS; SP_VALGRIND_ALL=1 for every
#    serial one but test_resources and test_zp, whose speed checks cannot hold under valgrind), unless
#    SP_SKIP_VALGRIND=1: any memcheck error or definite leak fails the program (exit 99)
# Usage: tests/run_all.sh BUILD_DIR      (called by make check)
set -u
cd "$(dirname "$0")/.."
BUILD=${1:-build/rel}
export SP_SRCDIR=$PWD
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OPENBLAS_NUM_THREADS=1
export SP_BIN=$PWD/bin/surveyproc
LOGDIR=build/test-logs; mkdir -p "$LOGDIR"
pass=0; fail=0; skip=0; failed_names=()

# cmocka prints "[  PASSED  ] N test(s)." and "[  FAILED  ] N test(s), listed below:" on stderr.
count_cmocka() {  # $1 log file, $2 label
  local p f s
  p=$(grep -Eo '^\[  PASSED  \] [0-9]+' "$1" | tail -1 | grep -Eo '[0-9]+$' || true)
  f=$(grep -Eo '^\[  FAILED  \] [0-9]+ test' "$1" | tail -1 | grep -Eo '[0-9]+' || true)
  s=$(grep -Eo '^\[  SKIPPED \] [0-9]+' "$1" | tail -1 | grep -Eo '[0-9]+$' || true)
  p=${p:-0}; f=${f:-0}; s=${s:-0}
  echo "$p $f $s"
}

run_cmocka() {  # $1 label, rest: command
  local label=$1; shift
  local log="$LOGDIR/$(echo "$label" | tr '/ ' '__').log"
  local t0=$SECONDS
  timeout 600 "$@" >"$log" 2>&1; local rc=$?
  read -r p f s < <(count_cmocka "$log")
  if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then f=1; fi   # crashed before/after cmocka's summary
  if [ "$p" -eq 0 ] && [ "$f" -eq 0 ] && [ "$s" -eq 0 ]; then f=1; fi  # ran nothing: a failure
  pass=$((pass+p)); fail=$((fail+f)); skip=$((skip+s))
  if [ "$f" -ne 0 ]; then
    failed_names+=("$label"); echo "FAIL  $label ($p passed, $f failed; rc=$rc; log $log)"
    grep -E '^\[  (ERROR|LINE|FAILED) ' "$log" | head -20 | sed 's/^/      /'
    tail -5 "$log" | sed 's/^/      | /'
  else
    echo "ok    $label ($p passed${s:+, $s skipped}, $((SECONDS-t0)) s)"
  fi
}

for t in "$BUILD"/tests/unit/test_*; do
  [ -x "$t" ] || continue
  run_cmocka "unit/$(basename "$t")" "$t"
done
for t in "$BUILD"/tests/mpi/test_*; do
  [ -x "$t" ] || continue
  for n in 1 2 4; do
    run_cmocka "mpi/$(basename "$t") np=$n" mpirun -np "$n" --bind-to none "$t"
  done
done

if [ "${SP_SKIP_SANITIZE:-0}" != 1 ] && [ -d build/san/tests ]; then
  export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:halt_on_error=1
  export LSAN_OPTIONS=suppressions=$PWD/tests/lsan.supp:print_suppressions=0
  export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
  for t in build/san/tests/unit/test_*; do
    [ -x "$t" ] || continue
    run_cmocka "asan/unit/$(basename "$t")" "$t"
  done
  # Open MPI's runtime (dlopen'ed MCA components) leaks at exit and its frames cannot be unwound
  # for suppression: under mpirun, ASan checks memory errors but not leaks. The serial programs
  # above keep leak checking.
  for t in build/san/tests/mpi/test_*; do
    [ -x "$t" ] || continue
    ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 run_cmocka "asan/mpi/$(basename "$t") np=2" mpirun -np 2 --bind-to none -x ASAN_OPTIONS "$t"
  done
  unset ASAN_OPTIONS LSAN_OPTIONS UBSAN_OPTIONS
fi

if [ "${SP_SKIP_VALGRIND:-0}" != 1 ]; then
  if ! command -v valgrind >/dev/null 2>&1; then
    echo "SKIP  valgrind (not installed: apt-get install valgrind)"; skip=$((skip+1))
  else
    # ~20-50x slower than native: by default the unit tests that take < 0.6 s natively
    vg_list=${SP_VALGRIND_TESTS:-"config core csv fits wcs h5 prep psf score"}
    if [ "${SP_VALGRIND_ALL:-0}" = 1 ]; then
      vg_list=$(for t in "$BUILD"/tests/unit/test_*; do [ -x "$t" ] && basename "$t" | sed 's/^test_//'; done | grep -vxE 'resources|zp')
    fi
    for n in $vg_list; do
      t=$BUILD/tests/unit/test_$n
      [ -x "$t" ] || { echo "FAIL  valgrind/unit/test_$n (no such test)"; fail=$((fail+1)); failed_names+=("valgrind/unit/test_$n"); continue; }
      run_cmocka "valgrind/unit/test_$n" valgrind --error-exitcode=99 --leak-check=full --show-leak-kinds=definite \
        --errors-for-leak-kinds=definite --suppressions="$PWD/tests/valgrind.supp" --num-callers=30 -q "$t"
    done
  fi
fi

for s in tests/scripts/test_*.sh; do
  [ -f "$s" ] || continue
  label="script/$(basename "$s" .sh)"; log="$LOGDIR/$(basename "$s" .sh).log"; t0=$SECONDS
  timeout 900 bash "$s" >"$log" 2>&1; rc=$?
  p=$(grep -c '^PASS: ' "$log"); f=$(grep -c '^FAIL: ' "$log"); s_=$(grep -c '^SKIP: ' "$log")
  if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then f=1; fi
  if [ "$p" -eq 0 ] && [ "$f" -eq 0 ] && [ "$s_" -eq 0 ]; then f=1; fi
  pass=$((pass+p)); fail=$((fail+f)); skip=$((skip+s_))
  if [ "$f" -ne 0 ]; then
    failed_names+=("$label"); echo "FAIL  $label ($p passed, $f failed; rc=$rc; log $log)"
    grep -E '^FAIL: ' "$log" | head -20 | sed 's/^/      /'; tail -8 "$log" | sed 's/^/      | /'
  else
    echo "ok    $label ($p passed, $((SECONDS-t0)) s)"
    grep -E '^SKIP: ' "$log" | sed 's/^/      /'
  fi
done

[ ${#failed_names[@]} -gt 0 ] && echo "failed suites: ${failed_names[*]}"
echo "$pass passed, $fail failed, $skip skipped"
[ "$fail" -eq 0 ]

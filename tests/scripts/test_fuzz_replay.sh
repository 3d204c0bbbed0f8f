#!/usr/bin/env bash
# test_fuzz_replay.sh — the fuzz harnesses (tests/fuzz/fuzz_*.c) replayed without libFuzzer on
# their seed corpora (tests/fuzz/corpus/NAME) and on every input that once failed
# (tests/fuzz/regress/NAME): built with ASan+UBSan (build/san, leaks checked) when that build
# exists, and under valgrind memcheck for the regression inputs. A few seconds.
# Prints PASS:/FAIL:/SKIP: lines. `make fuzz` is the fuzzing itself (not part of make check).
set -u
cd "$(dirname "$0")/../.."
export ASAN_OPTIONS=detect_leaks=1:halt_on_error=1:fast_unwind_on_malloc=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export LSAN_OPTIONS=suppressions=$PWD/tests/lsan.supp:print_suppressions=0
for n in config csv fits_wcs; do
  files=(tests/fuzz/corpus/"$n"/* tests/fuzz/regress/"$n"/*)
  existing=(); for f in "${files[@]}"; do [ -f "$f" ] && existing+=("$f"); done
  nreg=$(ls tests/fuzz/regress/"$n" 2>/dev/null | wc -l)
  for b in build/san build/rel; do
    bin=$b/tests/fuzz/replay_$n
    [ -x "$bin" ] || continue
    if out=$(timeout 120 "$bin" "${existing[@]}" 2>&1); then
      echo "PASS: fuzz_replay_${n}_$(basename $b) (${#existing[@]} inputs, $nreg regression)"
    else
      echo "FAIL: fuzz_replay_${n}_$(basename $b)"; echo "$out" | grep -E 'ERROR|SUMMARY|runtime error' | head -5 | sed 's/^/      /'
    fi
    break
  done
  [ -x build/rel/tests/fuzz/replay_$n ] || { echo "FAIL: fuzz_replay_$n (build/rel/tests/fuzz/replay_$n missing: make tests)"; continue; }
  if [ "$nreg" -gt 0 ] && command -v valgrind >/dev/null 2>&1; then
    if out=$(timeout 300 valgrind --error-exitcode=99 --leak-check=full --show-leak-kinds=definite \
          --errors-for-leak-kinds=definite --suppressions=tests/valgrind.supp -q \
          build/rel/tests/fuzz/replay_$n tests/fuzz/regress/"$n"/* 2>&1); then
      echo "PASS: fuzz_regress_${n}_valgrind ($nreg input(s), 0 errors, 0 definite leaks)"
    else
      echo "FAIL: fuzz_regress_${n}_valgrind"; echo "$out" | grep -E '==[0-9]+== [A-Z]' | head -5 | sed 's/^/      /'
    fi
  fi
done

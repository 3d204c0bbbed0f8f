#!/usr/bin/env bash
# tests/fuzz/run.sh SECONDS NAME... — `make fuzz`: run each libFuzzer harness build/fuzz/fuzz_NAME
# for SECONDS on a working corpus (build/fuzz/corpus/NAME, seeded from tests/fuzz/corpus/NAME and
# tests/fuzz/regress/NAME). A crash leaves its input in build/fuzz/artifacts/NAME/; copy it to
# tests/fuzz/regress/NAME/ once fixed, and make check replays it. Prints one line per harness:
# executions, corpus size, coverage, findings. Exit 1 if any harness found something.
set -u
cd "$(dirname "$0")/../.."
secs=$1; shift
bad=0
for n in "$@"; do
  bin=build/fuzz/fuzz_$n corp=build/fuzz/corpus/$n art=build/fuzz/artifacts/$n
  mkdir -p "$corp" "$art"
  cp -n tests/fuzz/corpus/"$n"/* "$corp"/ 2>/dev/null
  cp -n tests/fuzz/regress/"$n"/* "$corp"/ 2>/dev/null
  dict=(); [ -f tests/fuzz/$n.dict ] && dict=(-dict=tests/fuzz/$n.dict)
  log=build/fuzz/$n.log
  # one worker: the machine is shared; leaks count as findings (detect_leaks=1)
  LSAN_OPTIONS=suppressions=$PWD/tests/fuzz/lsan_fuzz.supp:print_suppressions=0 \
  ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=1:fast_unwind_on_malloc=0 "$bin" "${dict[@]}" -max_total_time="$secs" -max_len=65536 \
    -timeout=10 -rss_limit_mb=2048 -artifact_prefix="$art/" -print_final_stats=1 "$corp" >"$log" 2>&1
  rc=$?
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$')
  cov=$(grep -Eo 'cov: [0-9]+' "$log" | tail -1 | grep -Eo '[0-9]+')
  ncorp=$(ls "$corp" | wc -l)
  nart=$(ls "$art" | wc -l)
  printf 'fuzz %-9s %4ss: %9s executions, coverage %s edges, corpus %s inputs, findings %s (rc %s; log %s)\n' \
    "$n" "$secs" "${execs:-?}" "${cov:-?}" "$ncorp" "$nart" "$rc" "$log"
  if [ "$rc" -ne 0 ] || [ "$nart" -gt 0 ]; then
    bad=1; grep -E 'ERROR: |SUMMARY: ' "$log" | head -4 | sed 's/^/    /'; ls "$art" | head -5 | sed "s#^#    $art/#"
  fi
done
exit $bad

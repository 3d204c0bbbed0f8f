#!/usr/bin/env bash
# test_resources.sh — the resource planner end to end on a tiny simulated tile:
#  1. `plan` prints the layout report: ranks, threads and where they came from, memory, the BLAS
#     line naming OpenBLAS, its core and a dgemm GFLOP/s, FFTW, a verdict
#  2. the OpenBLAS core is not the generic Prescott fallback, also when OpenBLAS is made to pick it
#     (OPENBLAS_CORETYPE=Prescott): surveyproc re-executes itself with SkylakeX/Haswell kernels;
#     blas_coretype: none leaves it and warns; a forced name is applied
#  3. `run` refuses ranks x threads > cores (exit 6, naming the setting), runs with
#     performance.allow_oversubscribe; no store is written by a refused run
#  4. mpirun's default binding (1 core per rank with <= 2 ranks) is detected and the warning says
#     --bind-to none / --map-by ppr:N:node:pe=T
#  5. a rank without the memory the plan needs is refused (exit 6) with the knobs; an explicit
#     performance.memory_per_rank_mb budget is honoured
#  6. `plan --emit slurm|pbs` writes job scripts that parse, with the layout asked for
#  7. performance.fftw_wisdom_file is written by a run
#  8. on the demo tile, 1 rank x 1 and x 2 threads: the peak RSS of the run (/timing/ranks) is
#     within 10% of the plan's "needs ~N MiB" (issues 4 and 7; docs/performance.md)
# Prints PASS:/FAIL:/SKIP: lines (see tests/run_all.sh).
set -u
cd "$(dirname "$0")/../.."
BIN=${SP_BIN:-$PWD/bin/surveyproc}
if [ ! -x "$BIN" ]; then echo "SKIP: resources (no $BIN; run make)"; exit 0; fi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
T=$(mktemp -d "${TMPDIR:-/tmp}/sptest_res.XXXXXX")
trap 'rm -rf "$T"' EXIT
# a private copy: a concurrent `make` relinking bin/surveyproc cannot pull it away mid-test
cp "$BIN" "$T/surveyproc" && BIN=$T/surveyproc
pass() { echo "PASS: $1"; }
fail() { echo "FAIL: $1"; shift; for l in "$@"; do echo "      $l"; done; }
skip() { echo "SKIP: $1"; }
NCPU=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # (nproc honours OMP_NUM_THREADS)

if ! "$BIN" -q simulate --preset tiny --out "$T/tile" >"$T/sim.log" 2>&1; then
  fail resources_simulate "$(tail -5 "$T/sim.log")"; exit 0
fi
CFG=$T/tile/config.yaml

# 1. the report
"$BIN" -q plan "$CFG" >"$T/plan.txt" 2>&1; rc=$?
if [ $rc -eq 0 ] && grep -q '^Resources:' "$T/plan.txt" && grep -Eq 'threads/rank +[0-9]+ \(' "$T/plan.txt" &&
   grep -Eq 'BLAS/LAPACK +OpenBLAS .*core [A-Za-z0-9]+ .*dgemm 256\^3 [0-9.]+ GFLOP/s' "$T/plan.txt" &&
   grep -Eq 'memory/rank +.* available .*needs ~' "$T/plan.txt" && grep -q 'FFTW *fftw-3' "$T/plan.txt" &&
   grep -Eq 'verdict +(ok|warning)' "$T/plan.txt"; then
  pass "resources_plan_report ($(grep -o 'core [A-Za-z0-9]*' "$T/plan.txt" | head -1), $(grep -o '[0-9.]* GFLOP/s' "$T/plan.txt"))"
else
  fail resources_plan_report "rc=$rc" "$(sed -n '/^Resources:/,$p' "$T/plan.txt" | head -20)"
fi

# 2. the OpenBLAS core. Each case sets OPENBLAS_CORETYPE itself; a value inherited from the
# machine's environment (some hosts set one) would otherwise win over performance.blas_coretype.
unset OPENBLAS_CORETYPE
core_of() { grep -o 'core [A-Za-z0-9]*' "$1" | head -1 | cut -d' ' -f2; }
if ! grep -qw -e avx2 -e avx512f /proc/cpuinfo; then
  skip "resources_blas_core (this CPU has neither avx2 nor avx512f: generic kernels are all it can run)"
else
  want=Haswell; grep -qw avx512f /proc/cpuinfo && want=SkylakeX
  # p0/p3 must not inherit an OPENBLAS_CORETYPE from the caller's shell (some machines export one):
  # it would be reported as "from the environment" instead of the default / the forced setting
  env -u OPENBLAS_CORETYPE "$BIN" -q plan "$CFG" >"$T/p0.txt" 2>&1
  OPENBLAS_CORETYPE=Prescott "$BIN" -q plan "$CFG" >"$T/p1.txt" 2>&1
  c0=$(core_of "$T/p0.txt"); c1=$(core_of "$T/p1.txt")
  if [ -n "$c0" ] && [ "$c0" != Prescott ] && [ "$c1" = "$want" ] && grep -q "re-executed with OPENBLAS_CORETYPE=$want" "$T/p1.txt"; then
    g0=$(grep -o '[0-9.]* GFLOP/s' "$T/p1.txt")
    pass "resources_blas_core (default: $c0; made to run Prescott: re-executed with $want, $g0)"
  else
    fail resources_blas_core "default core '$c0', with OPENBLAS_CORETYPE=Prescott '$c1' (want $want)" "$(grep BLAS "$T/p1.txt")"
  fi
  OPENBLAS_CORETYPE=Prescott "$BIN" -q plan "$CFG" --set performance.blas_coretype=none >"$T/p2.txt" 2>&1
  env -u OPENBLAS_CORETYPE "$BIN" -q plan "$CFG" --set performance.blas_coretype=Haswell >"$T/p3.txt" 2>&1
  if [ "$(core_of "$T/p2.txt")" = Prescott ] && grep -q "warning .*generic Prescott kernels.*blas_coretype is none" "$T/p2.txt" &&
     [ "$(core_of "$T/p3.txt")" = Haswell ] && grep -q "forced by performance.blas_coretype" "$T/p3.txt"; then
    pass "resources_blas_coretype_setting (none: left alone with a warning; Haswell: forced)"
  else
    fail resources_blas_coretype_setting "$(grep -E 'BLAS|warning' "$T/p2.txt" "$T/p3.txt")"
  fi
fi

# 3. oversubscription: 2 ranks x NCPU threads on NCPU cores
mpirun -np 2 --bind-to none "$BIN" run "$CFG" --set performance.threads_per_rank="$NCPU" >"$T/o1.txt" 2>&1; rc=$?
if [ $rc -eq 6 ] && grep -q "layout refused: 2 rank(s) x $NCPU thread(s)" "$T/o1.txt" &&
   grep -q "performance.threads_per_rank: $((NCPU / 2 > 0 ? NCPU / 2 : 1))" "$T/o1.txt" && [ ! -e "$T/tile/work/surveyproc.h5" ]; then
  pass "resources_refuse_oversubscribe (exit 6, names performance.threads_per_rank, no store)"
else
  fail resources_refuse_oversubscribe "rc=$rc" "$(grep -E 'FATAL|refused' "$T/o1.txt" | head -3)"
fi
mpirun -np 2 --bind-to none "$BIN" run "$CFG" --set performance.threads_per_rank="$NCPU" \
  --set performance.allow_oversubscribe=true >"$T/o2.txt" 2>&1; rc=$?
if [ $rc -eq 0 ] && grep -q "allowed by performance.allow_oversubscribe" "$T/o2.txt" && grep -q "^Summary:" "$T/o2.txt"; then
  pass "resources_allow_oversubscribe (warned, ran)"
else
  fail resources_allow_oversubscribe "rc=$rc" "$(tail -5 "$T/o2.txt")"
fi

# 4. binding starvation: mpirun binds a single rank to one core
if [ "$NCPU" -lt 2 ]; then
  skip "resources_binding_warning (1 CPU: no binding to starve)"
else
  env -u OMP_NUM_THREADS mpirun -np 1 "$BIN" -q plan "$CFG" >"$T/b1.txt" 2>&1
  env -u OMP_NUM_THREADS mpirun -np 1 --bind-to none "$BIN" -q plan "$CFG" >"$T/b2.txt" 2>&1
  if grep -q "bound to 1 core(s).*--bind-to none.*ppr:1:node:pe=$NCPU" "$T/b1.txt" &&
     grep -Eq "threads/rank +$NCPU " "$T/b2.txt" && ! grep -q "bound to" "$T/b2.txt"; then
    pass "resources_binding_warning (mpirun -np 1: bound to 1 core, warned; --bind-to none: $NCPU threads)"
  else
    fail resources_binding_warning "$(grep -E 'threads/rank|warning' "$T/b1.txt" "$T/b2.txt")"
  fi
fi

# 5. memory: 1 MiB per CPU (as SLURM would say) cannot hold the process
SLURM_MEM_PER_CPU=1 "$BIN" -q run "$CFG" >"$T/m1.txt" 2>&1; rc=$?
SLURM_MEM_PER_CPU=1 "$BIN" -q run "$CFG" --set performance.memory_per_rank_mb=4096 \
  --set outputs.store=mem_ok.h5 >"$T/m2.txt" 2>&1; rc2=$?
if [ $rc -eq 6 ] && grep -q "estimated peak memory per rank .* exceeds the 1 MiB a rank has (SLURM_MEM_PER_CPU" "$T/m1.txt" &&
   grep -q "epsf.epsf_ngrid" "$T/m1.txt" && grep -q -- "--mem-per-cpu" "$T/m1.txt" && [ $rc2 -eq 0 ]; then
  pass "resources_refuse_memory (exit 6 with the knobs; performance.memory_per_rank_mb honoured)"
else
  fail resources_refuse_memory "rc=$rc rc2=$rc2" "$(grep -E 'FATAL' "$T/m1.txt" "$T/m2.txt" | head -3)"
fi

# 6. job scripts
"$BIN" -q plan "$CFG" --emit slurm --nodes 2 --ranks-per-node 3 --threads 4 --time 01:30:00 >"$T/job.sbatch" 2>"$T/e1.err"; r1=$?
"$BIN" -q plan "$CFG" --emit pbs --emit-out "$T/job.pbs" >"$T/e2.out" 2>&1; r2=$?
if [ $r1 -eq 0 ] && [ $r2 -eq 0 ] && bash -n "$T/job.sbatch" && bash -n "$T/job.pbs" &&
   head -1 "$T/job.sbatch" | grep -q '^#!/bin/bash' && grep -q '^#SBATCH --nodes=2$' "$T/job.sbatch" &&
   grep -q '^#SBATCH --ntasks-per-node=3$' "$T/job.sbatch" && grep -q '^#SBATCH --cpus-per-task=4$' "$T/job.sbatch" &&
   grep -q '^#SBATCH --time=01:30:00$' "$T/job.sbatch" && grep -q 'srun --mpi=pmix' "$T/job.sbatch" &&
   grep -q "CONFIG=\${CONFIG:-$CFG}" "$T/job.sbatch" && grep -q '^#PBS -l nodes=1:ppn=' "$T/job.pbs" &&
   grep -q '^Resources:' "$T/e1.err" && ! grep -Eq 'allow-run-as-root|oversubscribe' "$T/job.sbatch" "$T/job.pbs"; then
  pass "resources_emit_jobs (slurm to stdout with the layout asked; pbs to --emit-out)"
else
  fail resources_emit_jobs "rc=$r1/$r2" "$(head -20 "$T/job.sbatch")" "$(cat "$T/e1.err" | tail -3)"
fi
"$BIN" -q plan "$CFG" --emit lsf >/dev/null 2>"$T/e3.err"; rc=$?
if [ $rc -eq 3 ] && grep -q "expected slurm or pbs" "$T/e3.err"; then pass resources_emit_bad_kind; else
  fail resources_emit_bad_kind "rc=$rc" "$(cat "$T/e3.err")"; fi

# 7. FFTW wisdom file written by a run
"$BIN" -q run "$CFG" --set performance.fftw_wisdom_file=fftw.wisdom --set outputs.store=wisdom.h5 >"$T/w.txt" 2>&1; rc=$?
wf=$T/tile/work/fftw.wisdom
if [ $rc -eq 0 ] && [ -s "$wf" ] && head -c 40 "$wf" | grep -q 'fftw-3.*fftw_wisdom'; then
  "$BIN" -q plan "$CFG" --set performance.fftw_wisdom_file=fftw.wisdom >"$T/w2.txt" 2>&1
  if grep -q "wisdom: .*fftw.wisdom ([0-9]* bytes" "$T/w2.txt"; then pass "resources_fftw_wisdom_file (written, reported by plan)";
  else fail resources_fftw_wisdom_file "plan does not report it" "$(grep FFTW "$T/w2.txt")"; fi
else
  fail resources_fftw_wisdom_file "rc=$rc" "$(ls -la "$T/tile/work" 2>&1 | head)" "$(tail -3 "$T/w.txt")"
fi

# 8. the memory estimate against the peak RSS, demo tile (SP_SKIP_MEMEST=1 skips: ~30 s)
if [ "${SP_SKIP_MEMEST:-0}" = 1 ]; then skip "resources_memory_estimate (SP_SKIP_MEMEST=1)"
elif ! "$BIN" -q simulate --preset demo --out "$T/demo" >"$T/simd.log" 2>&1; then
  fail resources_memory_estimate "simulate --preset demo failed" "$(tail -3 "$T/simd.log")"
else
  ok=1; msg=""
  for th in 1 2; do
    "$BIN" -q plan "$T/demo/config.yaml" --set performance.threads_per_rank=$th \
      --set performance.allow_oversubscribe=true >"$T/pd$th.txt" 2>&1
    est=$(grep 'memory/rank' "$T/pd$th.txt" | grep -o 'needs ~[0-9.]* [MG]iB' | head -1 | sed 's/needs ~//')
    "$BIN" -q run "$T/demo/config.yaml" --set performance.threads_per_rank=$th \
      --set performance.allow_oversubscribe=true --set outputs.store=mem$th.h5 >"$T/rd$th.txt" 2>&1; rc=$?
    # inspect prints the peak in MB (10^6 bytes)
    peak=$("$BIN" inspect "$T/demo/work/mem$th.h5" 2>/dev/null | awk '/^Timing per rank/ {t=1; next} t && $1 ~ /^[0-9]+$/ {print $5}' | sort -g | tail -1)
    r=$(awk -v e="$est" -v p="$peak" 'BEGIN { split(e, a, " "); m = a[1] * (a[2] == "GiB" ? 1024 : 1);
        if (m > 0 && p > 0) printf "%.3f", p * 1e6 / 1048576 / m }')
    msg="$msg 1x$th: peak ${peak:-?} MB, estimate ${est:-?}, ratio ${r:-?};"
    if [ $rc -ne 0 ] || [ -z "$r" ] || ! awk -v r="$r" 'BEGIN { exit !(r >= 0.9 && r <= 1.1) }'; then ok=0; fi
  done
  if [ $ok = 1 ]; then pass "resources_memory_estimate (within 10%:$msg)"
  else fail resources_memory_estimate "$msg" "$(tail -n 3 "$T/rd1.txt" "$T/rd2.txt")"; fi
fi

#!/usr/bin/env bash
# test_faults.sh — faults under MPI, end to end with `surveyproc run` (issue 8, DESIGN §8), on the
# tiny simulated tile (256x256, 161 sources) cut into 4x4 cells, 2 ranks:
#  1. one rank dies mid-run: kill -9 of rank 1 (a worker, fit pass) and of rank 0 (the coordinator,
#     PSF pass), found by pid (`pgrep -P mpirun` + OMPI_COMM_WORLD_RANK); rank 1 leaving with
#     _exit(0) and with _exit(3), without MPI_Finalize (tests/faults/exit_shim.c, LD_PRELOAD).
#     Each time: the job ends within FAULT_END_MAX seconds (measured from the fault), mpirun's
#     message names the rank, the store opens in h5py with every catalog row, and
#     `run --resume` completes it with a catalog and ePSFs identical to an uninterrupted run;
#  2. kill -9 of the whole job (mpirun and every rank at once) at seeded random moments spread over
#     the run's duration, FAULT_TRIALS (10) trials -> the killed store opens in h5py (or there is
#     none yet: it is laid out as STORE.part and renamed when complete), resume -> identical;
#     a second job on a store that a running job holds is refused (exit 5), the first goes on;
#  3. disk full (tmpfs in a private mount namespace, `unshare -m`): a tmpfs too small for the
#     store -> a "disk full" message naming the store, no store left; a tmpfs that fills up
#     during the run -> "disk full" naming the store, the cells finished before stay done,
#     and after space is freed `run --resume` completes it identically.
#  4. one rank hangs (SIGSTOP: no socket closes, mpirun sees nothing), with
#     performance.rank_timeout_s = HANG_TIMEOUT (6 s): rank 1 in the fit pass -> rank 0 names it,
#     its host and its cell, marks the cell failed, exit 5; rank 0 in the fit pass -> rank 1 names
#     rank 0; rank 1 stopped inside the final store close (exit_shim's H5Fclose hook) -> rank 0's
#     watchdog thread ends the job; rank 1 stopped on entering MPI_Finalize (the command done) ->
#     rank 0's watchdog ends its own MPI_Finalize wait, saying the store is complete. (The first
#     two stops can land after the tiny run has finished, in a rank's cleanup: then the other rank
#     waits in MPI_Finalize and that message is the right one too.) Each time: the job ends within
#     HANG_TIMEOUT + FAULT_END_MAX s
#     of the stop, the store opens, resume -> identical. Rank 1 dying (exit 3) in that close: the
#     same checks. A stop shorter than the timeout (2 s, then SIGCONT) is no alarm: the run
#     completes, identical.
# Prints PASS:/FAIL:/SKIP: lines and one "figures:" line per part. About 100 s on 2 cores.
# Knobs: SP_FAULT_SEED (delays), FAULT_TRIALS, HANG_TIMEOUT, SP_KEEP=1 (keep the folder).
set -u
cd "$(dirname "$0")/../.."
ROOT=$PWD
BIN=${SP_BIN:-$ROOT/bin/surveyproc}
PY=/usr/bin/python3
TRIALS=${FAULT_TRIALS:-10}
SEED=${SP_FAULT_SEED:-8}
FAULT_END_MAX=${FAULT_END_MAX:-10}   # seconds from the fault to the end of the job
HANG_TIMEOUT=${HANG_TIMEOUT:-6}      # performance.rank_timeout_s of the hang cases (part 4)
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
if [ ! -x "$BIN" ]; then echo "FAIL: faults_setup (bin/surveyproc is not built; run make)"; exit 1; fi
if ! command -v mpirun >/dev/null 2>&1; then echo "SKIP: faults (no mpirun)"; exit 0; fi
if ! "$PY" -c 'import h5py, numpy' 2>/dev/null; then
  echo "SKIP: faults (no /usr/bin/python3 with h5py and numpy: apt-get install python3-h5py)"; exit 0
fi
T=$(mktemp -d "${TMPDIR:-/tmp}/spfault.XXXXXX")
chmod 755 "$T"
[ "${SP_KEEP:-0}" = 1 ] && echo "  keeping $T" || trap 'rm -rf "$T"' EXIT
pass() { echo "PASS: $1"; }
fail() { echo "FAIL: $1"; shift; for l in "$@"; do echo "      $l"; done; }
now() { echo "$EPOCHREALTIME"; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

# a private copy: a concurrent `make` relinking bin/surveyproc cannot pull it away mid-suite
cp "$BIN" "$T/surveyproc" && BIN=$T/surveyproc
SHIM=$T/exit_shim.so
mpicc -shared -fPIC -O1 "$ROOT/tests/faults/exit_shim.c" -o "$SHIM" -ldl 2>"$T/shim.log" || SHIM=""
if ! "$BIN" -q simulate --preset tiny --seed 5 --out "$T/sim" >"$T/sim.log" 2>&1; then
  fail faults_setup "simulate failed: $(tail -3 "$T/sim.log")"; exit 1
fi
NROWS=$(($(wc -l <"$T/sim/input_catalog.csv") - 1))
SETS=(--set epsf.epsf_ngrid=4 --set epsf.ngrid=2 --set 'outputs.export_formats=[]' --set performance.threads_per_rank=1)
XSETS=()  # extra --set options of the next start (part 4)

# start NAME STORE [args]: the job in the background, in its own process group; sets JOB (mpirun's pid)
start() {
  local name=$1 store=$2; shift 2
  : >"$T/$name.log"
  setsid mpirun -np 2 --bind-to none "$@" "$BIN" -v run "$T/sim/config.yaml" "${SETS[@]}" ${XSETS[@]+"${XSETS[@]}"} \
    --set outputs.store="$store" >"$T/$name.log" 2>&1 &
  JOB=$!
}
# wait_for FILE PATTERN N [SECONDS]: until FILE has N lines matching PATTERN (0: the job ended first)
wait_for() {
  local t0=$SECONDS
  while [ "$(grep -c -- "$2" "$1")" -lt "$3" ]; do
    kill -0 "$JOB" 2>/dev/null || return 1
    [ $((SECONDS - t0)) -lt "${4:-120}" ] || return 1
    sleep 0.02
  done
}
# kill_job: kill -9 of the whole job at once: mpirun and every rank. Open MPI puts each rank in a
# process group of its own, so `kill -- -PGID` of mpirun's group leaves the ranks running as
# orphans for seconds (measured 2-3 s), still writing the store.
kill_job() { kill -9 "$JOB" $(pgrep -P "$JOB") 2>/dev/null; }
# rank_pid R: the pid of MPI rank R among mpirun's children
rank_pid() {
  local p
  for p in $(pgrep -P "$JOB"); do
    tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null | grep -qx "OMPI_COMM_WORLD_RANK=$1" && { echo "$p"; return; }
  done
}
# wait_end MAX: wait up to MAX s for the job to end; sets RC and END_S (from now); kills a hang
# (unless NOKILL is set: then the job is left running, RC 124)
wait_end() {
  local t0; t0=$(now)
  local i n=$(($1 * 20))
  for ((i = 0; i < n; i++)); do kill -0 "$JOB" 2>/dev/null || break; sleep 0.05; done
  END_S=$(elapsed "$t0" "$(now)")
  if kill -0 "$JOB" 2>/dev/null; then
    [ -n "${NOKILL:-}" ] && { RC=124; return 1; }  # the caller looks at the hang first
    kill_job; wait "$JOB" 2>/dev/null; RC=124; return 1
  fi
  wait "$JOB"; RC=$?
}
# store_state STORE: "cells done/total" if h5py opens it with every catalog row, else the error
store_state() {
  "$PY" - "$1" "$NROWS" <<'EOF' 2>&1 | tail -1
import sys, h5py
with h5py.File(sys.argv[1], "r") as f:
    n = f["catalog"].shape[0]
    assert n == int(sys.argv[2]), "catalog has %d rows, the input %s" % (n, sys.argv[2])
    f["catalog"][...]
    st = f["cells"]["status"][:]
    print("%d/%d cells done" % ((st == 1).sum(), len(st)) + (" (%d failed)" % (st == 2).sum() if (st == 2).any() else ""))
EOF
}
# resume_same NAME STORE: `run --resume` (timeout) -> the reference catalog; sets WHY
resume_same() {
  local out
  if ! timeout -k 5 180 mpirun -np 2 --bind-to none "$BIN" run "$T/sim/config.yaml" "${SETS[@]}" \
       --set outputs.store="$2" --resume >"$T/$1.resume.log" 2>&1; then
    WHY="resume failed (rc $?): $(grep -E 'ERROR|FATAL' "$T/$1.resume.log" | head -2)"; return 1
  fi
  if ! out=$("$PY" "$ROOT/tests/scripts/same_store.py" "$REF" "$2" 2>&1); then WHY="after resume: $out"; return 1; fi
}

# ---- the reference: an uninterrupted run ----------------------------------------------------------
REF=$T/ref.h5
t0=$(now)
start ref "$REF"
wait_end 300
REF_S=$(elapsed "$t0" "$(now)")
if [ "$RC" -ne 0 ]; then fail faults_reference "rc $RC: $(grep -E 'ERROR|FATAL' "$T/ref.log" | head -3)"; exit 1; fi
echo "  reference run: ${REF_S} s wall on 2 ranks ($(grep -c 'DEBUG patch' "$T/ref.log") patches)"

# ---- 1. one rank dies -------------------------------------------------------------------------
ends=()
# one_rank NAME WHAT PATTERN N MSG_REGEX [mpirun args]: run, inject WHAT (kill0, kill1 or shim) once
# PATTERN was logged N times, then check the end, the message, the store and the resume
one_rank() {
  local name=$1 what=$2 pat=$3 n=$4 msg=$5; shift 5
  local s=$T/$name.h5 t_fault pid="" end_max=${END_MAX:-$FAULT_END_MAX}
  STATE=""
  start "$name" "$s" "$@" -x SP_FAULT_STAMP="$T/$name.stamp"
  if ! wait_for "$T/$name.log" "$pat" "$n"; then
    [ "$what" = shim ] || { fail "$name" "the run ended before the fault"; wait_end 30; return; }
  fi
  t_fault=$(now)
  case $what in
    kill*) pid=$(rank_pid "${what#kill}")
           if [ -z "$pid" ]; then fail "$name" "no pid for rank ${what#kill}"; kill_job; wait_end 5; return; fi
           kill -9 "$pid" ;;
    stop*) pid=$(rank_pid "${what#stop}")
           if [ -z "$pid" ]; then fail "$name" "no pid for rank ${what#stop}"; kill_job; wait_end 5; return; fi
           kill -STOP "$pid" ;;
    shim) t_fault=$(now) ;;
  esac
  local nokill=""
  case $what in stop*) nokill=1 ;; esac
  if ! NOKILL=$nokill wait_end $((end_max + 50)); then
    # A stop that lands after the run has finished (a loaded machine reads the log late: the tiny
    # run takes 0.3-1 s) in the last rank still alive, e.g. inside its MPI_Finalize after the
    # other rank has left: no process is left to notice, only the launcher's time limit ends such
    # a job (docs/reliability.md). The run's results are complete: SIGCONT, and it must end 0.
    if [ -n "$nokill" ] && grep -q '^Summary:' "$T/$name.log" && [ "$(pgrep -P "$JOB" | wc -l)" -le 1 ] &&
       kill -0 "$pid" 2>/dev/null; then
      kill -CONT "$pid"
      if wait_end 20 && [ "$RC" = 0 ]; then
        STATE=$(store_state "$s")
        pass "$name (the stop landed after the run had finished, in the last rank alive: the job waited for it; continued, it ended 0; store $STATE)"
        return
      fi
    fi
    kill_job; wait "$JOB" 2>/dev/null
    # what each rank logged last: where the hang is
    fail "$name" "the job still ran $((end_max + 50)) s after the fault (hang)" \
      "$(for r in 0 1; do grep " r$r " "$T/$name.log" | tail -3; done)"
    return
  fi
  # a stopped rank that outlived mpirun (it should not: mpirun SIGKILLs it) must not linger
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [ "$(ps -o stat= -p "$pid" | cut -c1)" != Z ]; then
    kill -9 "$pid" 2>/dev/null; fail "$name" "the stopped rank (pid $pid) was still alive after the job ended"; return
  fi
  local took; took=$(elapsed "$t_fault" "$(now)")
  if [ "$what" = shim ]; then  # the exit happened inside the program: the shim stamped its time
    [ -s "$T/$name.stamp" ] || { fail "$name" "the injected exit did not happen (no $name.stamp)"; return; }
    took=$(elapsed "$(cat "$T/$name.stamp")" "$(now)")
  fi
  ends+=("$took")
  local state; state=$(store_state "$s"); STATE=$state
  local said; said=$(grep -E -m1 -- "$msg" "$T/$name.log")
  if [ "$RC" -eq 0 ]; then fail "$name" "exit 0 after a rank died"; return; fi
  if [ -n "${RC_WANT:-}" ] && [ "$RC" -ne "$RC_WANT" ]; then fail "$name" "exit $RC, expected $RC_WANT" "$(grep -m2 ERROR "$T/$name.log")"; return; fi
  if [ -z "$said" ]; then fail "$name" "no message naming the rank (/$msg/)" "$(tail -4 "$T/$name.log")"; return; fi
  if ! echo "$state" | grep -q 'cells done'; then fail "$name" "the store does not open in h5py: $state"; return; fi
  if awk -v t="$took" -v m="$end_max" 'BEGIN { exit !(t > m) }'; then
    fail "$name" "the job took $took s to end after the fault (> $end_max s)"; return
  fi
  if ! resume_same "$name" "$s"; then fail "$name" "$WHY"; return; fi
  pass "$name (exit $RC; ${took} s from the fault to the end of the job; '$(echo "$said" | sed 's/^ *//; s/^.*MPI error: //' | cut -c1-110)'; store $state; resume: identical)"
}
one_rank fault_kill9_worker_fit_pass kill1 'r1 DEBUG patch' 3 'process rank 1 with PID .* signal 9'
one_rank fault_kill9_coordinator_psf_pass kill0 'r0 DEBUG cell .*PSF-star' 4 'process rank 0 with PID .* signal 9'
if [ -n "$SHIM" ]; then
  SHIMENV=(-x LD_PRELOAD="$SHIM" -x SP_FAULT_RANK=1)
  # rank 1's 11th "ready": the PSF pass gives it about 8 cells, so this is early in the fit pass.
  one_rank fault_exit0_worker shim 'x^' 0 'process rank 1 with PID [0-9]+ on' \
    "${SHIMENV[@]}" -x SP_FAULT_AFTER=11 -x SP_FAULT_CODE=0
  one_rank fault_exit3_worker shim 'x^' 0 'Process name: \[\[[0-9]+,[0-9]+\],1\]' \
    "${SHIMENV[@]}" -x SP_FAULT_AFTER=4 -x SP_FAULT_CODE=3
else
  echo "SKIP: fault_exit_worker (mpicc could not build tests/faults/exit_shim.c: $(head -1 "$T/shim.log"))"
fi
echo "figures: one rank dies: ${#ends[@]} fault(s), seconds from the fault to the end of the job: ${ends[*]}"

# ---- 2. kill -9 of the whole job at random moments ----------------------------------------------
RANDOM=$SEED
np=0; nf=0; kinds=()
for ((i = 0; i < TRIALS; i++)); do
  # trial i is killed in the i-th tenth of the reference run's duration, at a random point of it
  d=$(awk -v i="$i" -v n="$TRIALS" -v r="$RANDOM" -v T="$REF_S" 'BEGIN { printf "%.2f", 1.25 * T * (i + r / 32768) / n }')
  s=$T/rand$i.h5 name=fault_kill9_job_$i
  # a loaded machine runs faster or slower than the reference: a run that ended before its kill
  # is tried again with 0.6x the delay (at most 3 times), so that every trial is a real kill
  for try in 1 2 3 4; do
    rm -f "$s"
    start "$name" "$s"
    sleep "$d"
    if kill -0 "$JOB" 2>/dev/null; then
      kill_job; wait "$JOB" 2>/dev/null
      # a rank forked between pgrep and the kill would live on: find it by its unique store path
      orph=$(pgrep -f -- "outputs.store=$s\$" || true)
      [ -z "$orph" ] || { echo "  trial $i: killing late-born rank(s) $orph"; kill -9 $orph 2>/dev/null; sleep 0.2; }
      break
    fi
    wait "$JOB"; echo "  trial $i: the run had finished before ${d} s (rc $?); again with 0.6x the delay"
    d=$(awk -v d="$d" 'BEGIN { printf "%.2f", d * 0.6 }')
  done
  if [ -e "$s" ]; then
    state=$(store_state "$s")
    if ! echo "$state" | grep -q 'cells done'; then
      fail "$name" "killed at ${d} s: the store does not open in h5py: $state"; nf=$((nf + 1)); continue
    fi
  else
    state="no store yet"
  fi
  if resume_same "$name" "$s"; then
    np=$((np + 1)); kinds+=("${d}s:${state% cells done}")
    echo "  trial $i: killed at ${d} s ($state); $(grep -o 'resuming[^(]*\|does not exist: starting a new run' "$T/$name.resume.log" | head -1); identical"
  else
    fail "$name" "killed at ${d} s ($state): $WHY"; nf=$((nf + 1))
  fi
done
if [ "$nf" -eq 0 ]; then pass "fault_kill9_job_random ($TRIALS trials, seed $SEED, resume identical every time)"; fi
echo "figures: kill -9 of the job: $TRIALS trials, $np identical after resume, $nf failed; delay:state ${kinds[*]}"

# a second job on the store of a running job (the lock; e.g. resume while a killed mpirun's ranks live on)
s=$T/busy.h5
start busy "$s"
if wait_for "$T/busy.log" 'DEBUG cell' 1; then
  # hold the first job's ranks while the second tries (a fast tile could finish before the second
  # job's mpirun is up, and it would then find a finished store); they hold the lock meanwhile
  ranks=$(pgrep -P "$JOB")
  kill -STOP $ranks 2>/dev/null
  timeout -k 5 60 mpirun -np 2 --bind-to none "$BIN" run "$T/sim/config.yaml" "${SETS[@]}" --set outputs.store="$s" \
    --resume >"$T/busy2.log" 2>&1; rc2=$?
  kill -CONT $ranks 2>/dev/null
  wait_end 120
  msg=$(grep -m1 ERROR "$T/busy2.log")
  if [ "$rc2" = 5 ] && echo "$msg" | grep -q "busy.h5: the store is in use by another surveyproc job" && [ "$RC" = 0 ] &&
     out=$("$PY" "$ROOT/tests/scripts/same_store.py" "$REF" "$s" 2>&1); then
    pass "fault_store_in_use (a second job on a running job's store: exit 5, '$(echo "$msg" | sed 's/.*error: //' | cut -c1-110)'; the first job completes, identical)"
  else
    fail fault_store_in_use "second job rc $rc2, first job rc $RC; ${out:-}" "$msg"
  fi
else
  fail fault_store_in_use "the first job ended before the second started"; wait_end 30
fi

# ---- 4. one rank hangs (SIGSTOP) ----------------------------------------------------------------------
XSETS=(--set performance.rank_timeout_s="$HANG_TIMEOUT")
ends=()
# (the tiny run ends about 1 s after the 3rd patch line: on a loaded machine the stop can land
# after the store is closed, in rank 1's cleanup; rank 0 then waits in MPI_Finalize, whose
# watchdog ends the job saying the store is complete)
FINALIZE_MSG='has waited [0-9.]+ s for the other ranks while finalizing MPI after the command finished.*store.*complete'
END_MAX=$((HANG_TIMEOUT + FAULT_END_MAX)) RC_WANT=5 one_rank fault_sigstop_worker_fit_pass stop1 'r1 DEBUG patch' 3 \
  "r0 ERROR FATAL .*(rank 1 \(host [^)]+\) has sent nothing for [0-9.]+ s while it holds cell [0-9]+ \(x [0-9]+-[0-9]+, y [0-9]+-[0-9]+\) of the fit pass|rank 0 \(host [^)]+\) $FINALIZE_MSG)"
# the store as the stopped job left it (before the resume): rank 0 marked the stopped rank's cell
# failed, unless the rank itself finished that cell when mpirun's teardown continued it (Open MPI
# sends SIGCONT before SIGTERM; its rows are written before its status, so "done" is then true)
if echo "$STATE" | grep -q '(1 failed)'; then
  pass "fault_sigstop_worker_marks_cell (the stopped rank's cell is 'failed' in /cells: $STATE)"
elif echo "$STATE" | grep -q '^16/16 cells done$'; then
  pass "fault_sigstop_worker_marks_cell (every cell done: the stopped rank finished its cell during the teardown)"
elif echo "$STATE" | grep -q '^15/16 cells done$'; then
  # the mark is an independent write that the abort can overtake (parallel HDF5 cannot flush
  # without the stopped rank); the cell is then simply not done, and the resume above redid it
  pass "fault_sigstop_worker_marks_cell (the stopped rank's cell is not done: the failed mark did not reach the file before the abort)"
else
  fail fault_sigstop_worker_marks_cell "store after the stop: '$STATE' (expected one failed cell, the stopped cell not done, or every cell done)"
fi
# rank 1 asks rank 0 for its next cell and names it; when the stop lands after rank 0 handed out
# the last cell (a loaded machine: the log is read late), rank 1 finishes its cells and waits in
# the next agreement instead, whose watchdog ends the job (it cannot tell which rank is stuck), or,
# the run finished, in MPI_Finalize
END_MAX=$((HANG_TIMEOUT + FAULT_END_MAX)) RC_WANT=5 one_rank fault_sigstop_coordinator_fit_pass stop0 'r0 DEBUG patch' 3 \
  "r1 ERROR FATAL .*(rank 0 \(the coordinator, host [^)]+\) has not answered the request of rank 1|rank 1 \(host [^)]+\) has waited [0-9.]+ s for the other ranks while agreeing|rank 1 \(host [^)]+\) $FINALIZE_MSG)"
if [ -n "$SHIM" ]; then
  # rank 1's only H5Fclose is the store's final close: rank 0 waits in it, its watchdog thread ends the job
  END_MAX=$((HANG_TIMEOUT + FAULT_END_MAX)) RC_WANT=5 one_rank fault_sigstop_in_store_close shim 'x^' 0 \
    'r0 ERROR FATAL .*rank 0 \(host [^)]+\) has waited [0-9.]+ s for the other ranks while closing the store' \
    -x LD_PRELOAD="$SHIM" -x SP_FAULT_RANK=1 -x SP_FAULT_H5FCLOSE=1 -x SP_FAULT_ACTION=stop
  # rank 1 stops on entering MPI_Finalize (its command has finished, the store is closed): rank 0
  # waits for it in its own MPI_Finalize, which the watchdog bounds too; the store is complete
  END_MAX=$((HANG_TIMEOUT + FAULT_END_MAX)) RC_WANT=5 one_rank fault_sigstop_in_mpi_finalize shim 'x^' 0 \
    "r0 ERROR FATAL .*rank 0 \(host [^)]+\) $FINALIZE_MSG" \
    -x LD_PRELOAD="$SHIM" -x SP_FAULT_RANK=1 -x SP_FAULT_FINALIZE=1 -x SP_FAULT_ACTION=stop
  if [ -n "$STATE" ] && ! echo "$STATE" | grep -q '^16/16 cells done$'; then
    fail fault_sigstop_in_mpi_finalize_store "the store after a stop in MPI_Finalize is '$STATE', expected every cell done"
  fi
  # the same close, rank 1 dying in it (exit 3, as a node crash): mpirun ends the job; the store
  # (every cell done, the finish phase's metadata not yet flushed) is completed by resume
  RC_WANT=3 one_rank fault_exit3_in_store_close shim 'x^' 0 'Process name: \[\[[0-9]+,[0-9]+\],1\]' \
    -x LD_PRELOAD="$SHIM" -x SP_FAULT_RANK=1 -x SP_FAULT_H5FCLOSE=1 -x SP_FAULT_CODE=3
else
  echo "SKIP: fault_sigstop_in_store_close (mpicc could not build tests/faults/exit_shim.c)"
fi
echo "figures: one rank hangs (rank_timeout_s = $HANG_TIMEOUT): ${#ends[@]} stop(s), seconds from the stop to the end of the job: ${ends[*]}"
# a pause shorter than the timeout is no alarm
s=$T/pause.h5
start pause "$s"
if wait_for "$T/pause.log" 'r1 DEBUG patch' 3; then
  pid=$(rank_pid 1); kill -STOP "$pid"; sleep 2; kill -CONT "$pid"
  wait_end 120
  if [ "$RC" = 0 ] && out=$("$PY" "$ROOT/tests/scripts/same_store.py" "$REF" "$s" 2>&1); then
    pass "fault_sigstop_short_pause (rank 1 stopped for 2 s < rank_timeout_s = $HANG_TIMEOUT s, then continued: the run completes, identical)"
  else
    fail fault_sigstop_short_pause "rc $RC; ${out:-}" "$(grep -m2 ERROR "$T/pause.log")"
  fi
else
  fail fault_sigstop_short_pause "the run ended before the pause"; wait_end 30
fi
XSETS=()

# ---- 3. disk full -----------------------------------------------------------------------------------
MNT=$T/mnt; mkdir -p "$MNT"
if ! unshare -m true 2>/dev/null; then
  echo "SKIP: fault_disk_full (cannot make a private mount namespace here: unshare -m failed)"
  exit 0
fi
STORE_MB=$(( ($(stat -c %s "$REF") + 1048575) / 1048576 ))
# in_ns SIZE_MB SCRIPT: run SCRIPT in a private mount namespace with a tmpfs of SIZE_MB on $MNT
in_ns() { unshare -m bash -c "mount -t tmpfs -o size=${1}m tmpfs '$MNT' && $2"; }
RUN="timeout -k 5 120 mpirun -np 2 --bind-to none '$BIN' -v run '$T/sim/config.yaml' ${SETS[*]} --set outputs.store='$MNT/s.h5'"

# 3a. the store does not fit at all
in_ns $((STORE_MB / 2)) "$RUN; echo rc=\$? >'$T/full_a.rc'; ls -A '$MNT' >'$T/full_a.ls'" >"$T/full_a.log" 2>&1
rc=$(sed 's/rc=//' "$T/full_a.rc" 2>/dev/null)
msg=$(grep -m1 'ERROR' "$T/full_a.log")
if [ "$rc" = 4 ] && echo "$msg" | grep -q "$MNT/s.h5.*disk full" && [ ! -s "$T/full_a.ls" ]; then
  pass "fault_disk_full_create (tmpfs of $((STORE_MB / 2)) MiB for a ${STORE_MB} MiB store: exit 4, no store left; '$(echo "$msg" | sed 's/.*error: //' | cut -c1-140)')"
else
  fail fault_disk_full_create "rc ${rc:-?}, left on the tmpfs: '$(cat "$T/full_a.ls" 2>/dev/null)'" "$msg" "$(tail -3 "$T/full_a.log")"
fi

# 3b. the disk fills up during the run (another writer takes the rest of the space), then the space
#     is freed and the run resumed, in the same namespace (the tmpfs lives as long as it). Twice:
#     in the fit pass (after 8 patches: cell rows) and in the PSF pass (after 2 cells' PSF stars:
#     the /epsf writes). Both write into space allocated when the store was made, so the error
#     comes at the finish phase's first new allocation, with every cell stored.
# full_during NAME PATTERN N: fill the disk once the run's log has N lines matching PATTERN
full_during() {
  local name=$1 pat=$2 n=$3
  cat >"$T/$name.sh" <<EOF
set -u
rm -f '$MNT/s.h5' '$MNT/filler'
$RUN >'$T/$name.run.log' 2>&1 &
job=\$!
for i in \$(seq 2400); do [ "\$(grep -c '$pat' '$T/$name.run.log')" -ge $n ] && break; kill -0 \$job 2>/dev/null || break; sleep 0.05; done
head -c 1G /dev/zero >'$MNT/filler' 2>/dev/null
wait \$job; echo "rc=\$?"
cp '$MNT/s.h5' '$T/$name.killed.h5' 2>/dev/null || echo "copy failed"
rm -f '$MNT/filler'
timeout -k 5 120 mpirun -np 2 --bind-to none '$BIN' run '$T/sim/config.yaml' ${SETS[*]} --set outputs.store='$MNT/s.h5' --resume >'$T/$name.resume.log' 2>&1
echo "resume_rc=\$?"
cp '$MNT/s.h5' '$T/$name.h5'
EOF
  in_ns $((STORE_MB + 4)) "bash '$T/$name.sh'" >"$T/$name.log" 2>&1
  local rc rrc msg state out
  rc=$(grep -o '^rc=[0-9]*' "$T/$name.log" | cut -d= -f2)
  rrc=$(grep -o '^resume_rc=[0-9]*' "$T/$name.log" | cut -d= -f2)
  msg=$(grep -m1 'ERROR' "$T/$name.run.log")
  state=$(store_state "$T/$name.killed.h5")
  if [ "$rc" != 4 ] || ! echo "$msg" | grep -q "$MNT/s.h5.*disk full"; then
    fail "$name" "rc ${rc:-?}; expected 4 and a 'disk full' message naming the store" "$msg" "$(tail -3 "$T/$name.run.log")"
  elif ! echo "$state" | grep -q 'cells done'; then
    fail "$name" "the store does not open in h5py after the disk-full error: $state"
  elif [ "$rrc" != 0 ]; then
    fail "$name" "resume after freeing space: rc ${rrc:-?}: $(grep -m2 ERROR "$T/$name.resume.log")"
  elif ! out=$("$PY" "$ROOT/tests/scripts/same_store.py" "$REF" "$T/$name.h5" 2>&1); then
    fail "$name" "after resume: $out"
  else
    pass "$name (exit 4, store left with $state; resume after freeing space: identical; '$(echo "$msg" | sed 's/.*error: //' | cut -c1-160)')"
  fi
}
full_during fault_disk_full_during_run 'DEBUG patch' 8
full_during fault_disk_full_during_psf_pass 'DEBUG cell .*PSF-star' 2

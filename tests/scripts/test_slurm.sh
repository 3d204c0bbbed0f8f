#!/usr/bin/env bash
# test_slurm.sh — part of `make check` (alone: `make check-slurm`): the job scripts of jobs/ on a real single-node SLURM.
#
# Starts a private SLURM cluster on localhost (its own slurm.conf, ports, state and log folders under
# a temporary directory; nothing in /etc/slurm is touched, a slurmctld already running is left
# alone), then:
#   1. jobs/slurm/tile.sbatch        sbatch, 2 tasks, srun --mpi=pmix: store complete, 2 ranks
#   2. jobs/slurm/resume.sbatch      on the finished store: nothing to do, exits 0
#   3. jobs/slurm/tract-array.sbatch an array of 2 tiles: both stores complete
#   4. jobs/slurm/chain.sh           tile + resume jobs behind it (afternotok): tile done, resumes never run
#   5. the same chain with the tile job cancelled mid-run (as at its wall time): the first resume job
#      finishes the store (cells kept + cells redone), the second is removed
#   6. jobs/pbs/tile.pbs             through slurm-wlm-torque's qsub wrapper: store complete
#   7. the script `surveyproc plan --emit slurm` writes, submitted as is: store complete
#   8. faults under srun (tests/faults/exit_shim.c, LD_PRELOAD through a wrapper of the binary):
#      rank 1 exits with status 3 mid-run -> srun --kill-on-bad-exit=1 ends the step, the job is
#      FAILED within seconds; rank 1 stops dead (SIGSTOP) with performance.rank_timeout_s = 5 ->
#      rank 0 names it and ends the job (FAILED) within 5 + 30 s; both stores resumable (inspect)
# and stops the daemons it started (trap), by their PIDs. Prints PASS:/FAIL:/SKIP: lines and the
# duration. Installs slurm-wlm, munge and slurm-wlm-torque when missing (scripts/install-deps.sh).
#
# The job scripts carry no as-root flags; this rig runs as root, so the Open MPI root permission is
# set here in the environment, which sbatch/qsub pass on to the jobs.
set -u
cd "$(dirname "$0")/../.."
ROOT=$PWD
BIN=${SP_BIN:-$ROOT/bin/surveyproc}
T0=$SECONDS
pass() { echo "PASS: $1"; }
fail() { echo "FAIL: $1"; shift; for l in "$@"; do echo "      $l"; done; FAILED=1; }
skip() { echo "SKIP: $1"; }
FAILED=0

if [ ! -x "$BIN" ]; then skip "slurm (no $BIN; run make)"; exit 0; fi
if [ "$(id -u)" -ne 0 ]; then skip "slurm (starting slurmctld/slurmd/munged needs root)"; exit 0; fi
if ! command -v slurmctld >/dev/null || ! command -v qsub >/dev/null || ! command -v munged >/dev/null; then
  echo "test_slurm: installing slurm-wlm, munge, slurm-wlm-torque"
  if ! bash scripts/install-deps.sh --with-slurm; then skip "slurm (could not install slurm-wlm/munge)"; exit 0; fi
fi
if ! compgen -G '/usr/lib/*/slurm*/mpi_pmix*.so' >/dev/null && ! compgen -G '/usr/lib*/slurm/mpi_pmix*.so' >/dev/null; then
  skip "slurm (no pmix MPI plugin in this SLURM: Debian's Open MPI needs srun --mpi=pmix)"; exit 0; fi

T=$(mktemp -d "${TMPDIR:-/tmp}/sp_slurm.XXXXXX")
chmod 755 "$T"
# a private copy: a concurrent `make` relinking bin/surveyproc cannot pull it away from the jobs
cp "$BIN" "$T/surveyproc" && BIN=$T/surveyproc
STARTED_MUNGE=0
cleanup() {
  # our jobs first, then our daemons, each by the PID it wrote
  if [ -f "$T/slurm.conf" ] && [ -s "$T/slurmctld.pid" ]; then
    SLURM_CONF=$T/slurm.conf scancel --quiet --user=root >/dev/null 2>&1 || true
  fi
  for f in "$T/slurmd.pid" "$T/slurmctld.pid"; do stop_pid "$f"; done
  [ "$STARTED_MUNGE" = 1 ] && stop_pid "$T/munge/munged.pid"
  if [ -n "${SP_KEEP_TMP:-}" ]; then echo "kept $T"; else rm -rf "$T"; fi
  echo "test_slurm: $((SECONDS - T0)) s in all, daemons stopped"
}
stop_pid() {
  [ -s "$1" ] || return 0
  local pid; pid=$(cat "$1")
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  echo "test_slurm: $1 ($pid) did not stop; sending KILL"; kill -KILL "$pid" 2>/dev/null
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- munge: a private munged on its own socket (AuthInfo below), so a concurrent run of this
# test (another worktree, another CI job) neither shares nor stops ours ----
if [ ! -s /etc/munge/munge.key ]; then skip "slurm (no /etc/munge/munge.key)"; exit 0; fi
mkdir -p "$T/munge"; chown munge:munge "$T/munge"; chmod 0755 "$T/munge"
MSOCK=$T/munge/munge.socket
runuser -u munge -- /usr/sbin/munged --socket="$MSOCK" --pid-file="$T/munge/munged.pid" \
  --log-file="$T/munge/munged.log" --seed-file="$T/munge/munged.seed" ||
  { fail slurm_start "munged did not start" "$(tail -3 "$T/munge/munged.log" 2>/dev/null)"; exit 1; }
STARTED_MUNGE=1
for _ in $(seq 1 50); do (munge -n --socket="$MSOCK" | unmunge --socket="$MSOCK") >/dev/null 2>&1 && break; sleep 0.1; done

# ---- a private cluster: free ports, own state ----
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
P1=""; P2=""
for p in $(seq $((6900 + RANDOM % 50)) 6999); do
  port_free "$p" || continue
  if [ -z "$P1" ]; then P1=$p; elif [ -z "$P2" ]; then P2=$p; break; fi
done
NCPU=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
[ "$NCPU" -ge 2 ] || { skip "slurm (needs 2 CPUs for a 2-task job, have $NCPU)"; exit 0; }
MEMMB=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)
mkdir -p "$T/state" "$T/spool" "$T/jobs"
cat >"$T/slurm.conf" <<EOF
# private single-node cluster of tests/scripts/test_slurm.sh
ClusterName=sptest
SlurmctldHost=localhost
SlurmctldPort=$P1
SlurmdPort=$P2
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MSOCK
MpiDefault=pmix
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
MinJobAge=600
SlurmctldPidFile=$T/slurmctld.pid
SlurmdPidFile=$T/slurmd.pid
StateSaveLocation=$T/state
SlurmdSpoolDir=$T/spool
SlurmctldLogFile=$T/slurmctld.log
SlurmdLogFile=$T/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=localhost CPUs=$NCPU RealMemory=$MEMMB State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
# PMIx's per-step folders default to /tmp/spmix_appdir_<uid>_<job>.<step>: keep ours apart from
# another cluster's job of the same number
mkdir -p "$T/pmix"
echo "PMIxCliTmpDirBase=$T/pmix" >"$T/mpi.conf"
export SLURM_CONF=$T/slurm.conf
/usr/sbin/slurmctld -f "$SLURM_CONF" || { fail slurm_start "slurmctld did not start" "$(tail -5 "$T/slurmctld.log" 2>/dev/null)"; exit 1; }
/usr/sbin/slurmd -f "$SLURM_CONF" -N localhost || { fail slurm_start "slurmd did not start" "$(tail -5 "$T/slurmd.log" 2>/dev/null)"; exit 1; }
up=0
for _ in $(seq 1 100); do
  if sinfo -h -o '%T' 2>/dev/null | grep -qx idle; then up=1; break; fi
  sleep 0.2
done
if [ $up = 1 ]; then pass "slurm_start (private cluster on ports $P1/$P2 in $((SECONDS - T0)) s)"; else
  fail slurm_start "node not idle" "$(sinfo 2>&1 | tail -3)" "$(tail -5 "$T/slurmd.log")"; exit 1; fi

# ---- the environment the jobs inherit (sbatch exports it) ----
export SURVEYPROC=$BIN
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
unset OMP_NUM_THREADS OMPI_MCA_rmaps_base_oversubscribe SLURM_CPUS_PER_TASK

# wait_job ID SECONDS -> prints the final JobState (or TIMEOUT_WAIT)
wait_job() {
  local id=$1 lim=$2 st="" t=$SECONDS
  while [ $((SECONDS - t)) -lt "$lim" ]; do
    st=$(scontrol show job "$id" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | head -1 | cut -d= -f2)
    case "$st" in COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL|DEADLINE|PREEMPTED) echo "$st"; return;; esac
    sleep 0.3
  done
  echo "TIMEOUT_WAIT($st)"
}
# store_done STORE NCELLS_EXPECTED_MIN -> 0 if every cell is done
store_done() {
  "$BIN" inspect "$1" >"$T/inspect.txt" 2>&1 && grep -Eq '^Cells: ([0-9]+) total: \1 done, 0 to do' "$T/inspect.txt"
}

"$BIN" simulate --preset tiny --out "$T/tile" >"$T/sim.log" 2>&1 || { fail slurm_simulate "$(tail -5 "$T/sim.log")"; exit 1; }
for s in a b c e; do sed "s|work_dir: work|work_dir: work_$s|" "$T/tile/config.yaml" >"$T/tile/config_$s.yaml"; done

# 1. single tile
t=$SECONDS
jid=$(cd "$T/jobs" && sbatch --parsable "$ROOT/jobs/slurm/tile.sbatch" "$T/tile/config.yaml" 2>"$T/sbatch.err")
if [ -z "$jid" ]; then fail slurm_tile_sbatch "sbatch refused the script" "$(cat "$T/sbatch.err")"; else
  st=$(wait_job "$jid" 120); out="$T/jobs/surveyproc-tile-$jid.out"
  if [ "$st" = COMPLETED ] && store_done "$T/tile/work/surveyproc.h5" && grep -q "on 2 rank(s)" "$out"; then
    pass "slurm_tile_sbatch (job $jid, 2 tasks x srun --mpi=pmix, all cells done, $((SECONDS - t)) s)"
  else
    fail slurm_tile_sbatch "job $jid: $st" "$(tail -8 "$out" 2>/dev/null)" "$(cat "$T/inspect.txt" 2>/dev/null | grep Cells)"
  fi
  if grep -Eq -- '--allow-run-as-root|OMPI_ALLOW_RUN_AS_ROOT|--oversubscribe|rmaps_base_oversubscribe|--overcommit' \
       "$ROOT"/jobs/slurm/* "$ROOT"/jobs/pbs/*; then
    fail slurm_scripts_clean "a job script carries a test-rig flag (allow-run-as-root / oversubscribe)"; fi
fi

# 2. resume on the finished store: nothing to do, success
jid=$(cd "$T/jobs" && sbatch --parsable "$ROOT/jobs/slurm/resume.sbatch" "$T/tile/config.yaml" 2>"$T/sbatch.err")
st=$(wait_job "${jid:-0}" 90); out="$T/jobs/surveyproc-resume-$jid.out"
if [ "$st" = COMPLETED ] && grep -q "0 processed now, 4 earlier" "$out"; then
  pass "slurm_resume_sbatch (job $jid: finished store, nothing redone)"
else
  fail slurm_resume_sbatch "job ${jid:-none}: $st" "$(cat "$T/sbatch.err")" "$(tail -8 "$out" 2>/dev/null)"
fi

# 3. an array over two tiles of a "tract"
printf '# two tiles\nconfig_a.yaml\n\n%s\n' "$T/tile/config_b.yaml" >"$T/tile/tiles.txt"
jid=$(cd "$T/jobs" && sbatch --parsable --array=1-2 "$ROOT/jobs/slurm/tract-array.sbatch" "$T/tile/tiles.txt" 2>"$T/sbatch.err")
# an array's tasks are split off one by one: wait until none is queued or running, then read each state
t=$SECONDS
while [ $((SECONDS - t)) -lt 150 ] && [ -n "$(squeue -h -j "${jid:-0}" 2>/dev/null)" ]; do sleep 0.3; done
s1=$(wait_job "${jid:-0}_1" 10); s2=$(wait_job "${jid:-0}_2" 10)
if [ "$s1" = COMPLETED ] && [ "$s2" = COMPLETED ] && store_done "$T/tile/work_a/surveyproc.h5" &&
   store_done "$T/tile/work_b/surveyproc.h5"; then
  pass "slurm_tract_array (job $jid: 2 tiles, both stores complete)"
else
  fail slurm_tract_array "job ${jid:-none}: $s1 $s2" "$(cat "$T/sbatch.err")" "$(tail -5 "$T"/jobs/surveyproc-tract-*.out 2>/dev/null)"
fi

# 4. a chain: the tile job succeeds, so the resume jobs behind it never run
chain=$(cd "$T/jobs" && bash "$ROOT/jobs/slurm/chain.sh" "$T/tile/config_c.yaml" 2 2>&1)
ids=$(echo "$chain" | grep -Eo 'job [0-9]+' | awk '{print $2}')
first=$(echo "$ids" | head -1)
st=$(wait_job "${first:-0}" 120); rs=""
for r in $(echo "$ids" | tail -n +2); do rs="$rs $(wait_job "$r" 30)"; done
ran=$(ls "$T"/jobs/surveyproc-resume-*.out 2>/dev/null | wc -l)
if [ "$st" = COMPLETED ] && store_done "$T/tile/work_c/surveyproc.h5" && ! echo "$rs" | grep -q COMPLETED; then
  pass "slurm_chain (tile $first completed; resume jobs:$rs)"
else
  fail slurm_chain "tile: $st; resumes:$rs" "$chain"
fi

# 5. a wall-time kill: the tile job is cancelled (SIGTERM, as at its time limit) in the middle of
#    its cells; the first resume job of the chain starts and finishes the store, the second never runs
if "$BIN" -q simulate --preset demo --out "$T/demo" >"$T/sim2.log" 2>&1; then
  sed 's/epsf_ngrid: 2/epsf_ngrid: 4/' "$T/demo/config.yaml" >"$T/demo/config_i.yaml"
  printf 'logging:\n  progress_heartbeat_s: 0.1\n' >>"$T/demo/config_i.yaml"
  chain=$(cd "$T/jobs" && bash "$ROOT/jobs/slurm/chain.sh" "$T/demo/config_i.yaml" 2 --ntasks-per-node=1 2>&1)
  ids=$(echo "$chain" | grep -Eo 'job [0-9]+' | awk '{print $2}')
  first=$(echo "$ids" | head -1); r1=$(echo "$ids" | sed -n 2p); r2=$(echo "$ids" | sed -n 3p)
  out="$T/jobs/surveyproc-tile-$first.out"; cut=0; t=$SECONDS
  while [ $((SECONDS - t)) -lt 90 ]; do
    if grep -Eq 'progress: cells ([3-9]|1[0-2])/16' "$out" 2>/dev/null; then scancel "$first"; cut=1; break; fi
    st=$(scontrol show job "$first" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2)
    case "$st" in COMPLETED|FAILED|CANCELLED|TIMEOUT) break;; esac
    sleep 0.05
  done
  st=$(wait_job "${first:-0}" 60); s1=$(wait_job "${r1:-0}" 120); s2=$(wait_job "${r2:-0}" 30)
  rout="$T/jobs/surveyproc-resume-$r1.out"
  summary=$(grep -o 'cells ([0-9]* processed now, [0-9]* earlier' "$rout" 2>/dev/null)
  now=$(echo "$summary" | grep -o '[0-9]* processed' | grep -o '[0-9]*'); before=$(echo "$summary" | grep -o '[0-9]* earlier' | grep -o '[0-9]*')
  if [ $cut = 0 ]; then
    skip "slurm_chain_interrupted (the tile job ended ($st) before it could be cancelled mid-run)"
  elif [ "$st" = CANCELLED ] && [ "$s1" = COMPLETED ] && [ "$s2" = CANCELLED ] && store_done "$T/demo/work/surveyproc.h5" &&
       [ "${now:-0}" -gt 0 ] && [ "${before:-0}" -gt 0 ]; then
    pass "slurm_chain_interrupted (tile $first cancelled mid-run; resume $r1 did $now cell(s), kept $before; resume $r2 removed)"
  else
    fail slurm_chain_interrupted "tile $first: $st; resume $r1: $s1; resume $r2: $s2; $summary" "$chain" \
         "$(tail -4 "$out" 2>/dev/null)" "$(tail -6 "$rout" 2>/dev/null)"
  fi
else
  fail slurm_chain_interrupted "simulate --preset demo failed" "$(tail -3 "$T/sim2.log")"
fi

# 6. PBS script through slurm-wlm-torque's qsub (a wrapper over sbatch, not a PBS server)
rm -rf "$T/tile/work_a"
qid=$(cd "$T/jobs" && qsub -v "CONFIG=$T/tile/config_a.yaml,SURVEYPROC=$BIN,OMPI_ALLOW_RUN_AS_ROOT=1,OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1" \
      "$ROOT/jobs/pbs/tile.pbs" 2>"$T/qsub.err" | tail -1)
qid=${qid%%.*}
st=$(wait_job "${qid:-0}" 120)
pbsout=$(ls "$T"/jobs/*"$qid"* 2>/dev/null | head -3)
if [ "$st" = COMPLETED ] && store_done "$T/tile/work_a/surveyproc.h5"; then
  pass "pbs_tile_qsub (job $qid via slurm-wlm-torque qsub, mpirun --map-by ppr:N:node:pe=T)"
else
  fail pbs_tile_qsub "job ${qid:-none}: $st" "$(cat "$T/qsub.err")" "$(for f in $pbsout; do tail -6 "$f"; done)"
fi

# 7. the job script `plan --emit slurm` writes for the tile, submitted as is
"$BIN" -q plan "$T/tile/config_e.yaml" --emit slurm --ranks-per-node 2 --threads 1 --time 00:05:00 \
  --emit-out "$T/jobs/emitted.sbatch" >"$T/emit.log" 2>&1
jid=$(cd "$T/jobs" && sbatch --parsable "$T/jobs/emitted.sbatch" 2>"$T/sbatch.err")
st=$(wait_job "${jid:-0}" 90)
if [ "$st" = COMPLETED ] && store_done "$T/tile/work_e/surveyproc.h5"; then
  pass "slurm_emitted_script (plan --emit slurm, 2 ranks x 1 thread: store complete)"
else
  fail slurm_emitted_script "job ${jid:-none}: $st" "$(cat "$T/emit.log" "$T/sbatch.err" | tail -5)" \
       "$(tail -5 "$T"/jobs/sp-*"$jid".out 2>/dev/null)"
fi

# 8. faults under srun: a rank that exits non-zero, a rank that hangs
SHIM=$T/exit_shim.so
if mpicc -shared -fPIC -O1 "$ROOT/tests/faults/exit_shim.c" -o "$SHIM" -ldl 2>"$T/shim.log"; then
  # fault_job NAME ACTION(exit3|stop) [run options]: tile.sbatch with rank 1 faulting at its 4th "ready"
  fault_job() {
    local name=$1 action=$2; shift 2
    local wrap=$T/wrap_$name.sh stamp=$T/$name.stamp cfg=$T/tile/config_$name.yaml
    sed "s|work_dir: work|work_dir: work_$name|" "$T/tile/config.yaml" >"$cfg"
    { echo '#!/bin/sh'
      echo "export LD_PRELOAD='$SHIM' SP_FAULT_RANK=1 SP_FAULT_AFTER=4 SP_FAULT_STAMP='$stamp'"
      [ "$action" = stop ] && echo "export SP_FAULT_ACTION=stop" || echo "export SP_FAULT_CODE=3"
      echo "exec '$BIN' \"\$@\""; } >"$wrap"
    chmod +x "$wrap"
    FJ=$(cd "$T/jobs" && SURVEYPROC=$wrap sbatch --parsable "$ROOT/jobs/slurm/tile.sbatch" "$cfg" \
         --set epsf.epsf_ngrid=4 "$@" 2>"$T/sbatch.err")
    FST=$(wait_job "${FJ:-0}" 120)
    FTOOK=$( [ -s "$stamp" ] && awk -v a="$(cat "$stamp")" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }' || echo "?")
    FOUT=$T/jobs/surveyproc-tile-$FJ.out
    "$BIN" inspect "$T/tile/work_$name/surveyproc.h5" >"$T/inspect_$name.txt" 2>&1
  }
  fault_job exit3 exit3
  if [ "$FST" = FAILED ] && [ "$FTOOK" != "?" ] && awk -v t="$FTOOK" 'BEGIN { exit !(t < 30) }' &&
     grep -q '^Cells: 16 total' "$T/inspect_exit3.txt"; then
    pass "slurm_rank_exit_kills_step (rank 1 exited 3: job $FJ $FST ${FTOOK} s after the exit; store opens: $(grep '^Cells' "$T/inspect_exit3.txt"))"
  else
    fail slurm_rank_exit_kills_step "job ${FJ:-none}: $FST, ${FTOOK} s after the exit" "$(tail -6 "$FOUT" 2>/dev/null)" "$(head -3 "$T/inspect_exit3.txt")"
  fi
  fault_job stop stop --set performance.rank_timeout_s=5
  msg=$(grep -m1 'has sent nothing for\|has not answered the request' "$FOUT" 2>/dev/null)
  if [ "$FST" = FAILED ] && [ -n "$msg" ] && [ "$FTOOK" != "?" ] && awk -v t="$FTOOK" 'BEGIN { exit !(t < 35) }' &&
     grep -q '^Cells: 16 total' "$T/inspect_stop.txt"; then
    pass "slurm_rank_hang_ends_job (rank 1 stopped: job $FJ $FST ${FTOOK} s after the stop; '$(echo "$msg" | sed 's/.*MPI error: //' | cut -c1-90)')"
  else
    fail slurm_rank_hang_ends_job "job ${FJ:-none}: $FST, ${FTOOK} s after the stop" "$(tail -6 "$FOUT" 2>/dev/null)"
    scancel "${FJ:-0}" 2>/dev/null
  fi
else
  skip "slurm_faults (mpicc could not build tests/faults/exit_shim.c: $(head -1 "$T/shim.log"))"
fi

[ "$FAILED" = 0 ]

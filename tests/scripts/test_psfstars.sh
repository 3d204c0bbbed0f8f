#!/usr/bin/env bash
# test_psfstars.sh — PSF stars on a galaxy-rich tile whose catalog leaves every TYPE blank:
# the catalog's Re (given for the galaxies only, as the simulator writes it) keeps the
# galaxies out of the PSF stars (src/pipeline/cell_psf.c veto_catalog_galaxies). The same
# frames are run twice, with the catalog as written and with its Re column emptied (then a
# compact galaxy looks like a star to the selection); with the Re, every band's ePSF must be
# closer to the true PSF (`surveyproc score` epsf_resid) and use fewer candidates. Without the
# veto both runs are the same and the test fails.
# Prints PASS:/FAIL:/SKIP: lines (tests/run_all.sh counts them).
set -u
cd "$(dirname "$0")/../.."
BIN=${SP_BIN:-$PWD/bin/surveyproc}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OPENBLAS_NUM_THREADS=1
PY=/usr/bin/python3
[ -x "$PY" ] || PY=$(command -v python3 || true)
TMP=$(mktemp -d "${TMPDIR:-/tmp}/sptest_psfstars.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
pass() { echo "PASS: $1"; }
fail() { echo "FAIL: $1${2:+ — $2}"; }
skip() { echo "SKIP: $1${2:+ — $2}"; }

if [ ! -x "$BIN" ]; then fail psfstars_binary "$BIN missing (make first)"; exit 0; fi
if [ -z "$PY" ]; then skip psfstars "python3 not found"; exit 0; fi

D=$TMP/sim
cat >"$TMP/sim.yaml" <<'EOF'
preset: tiny
seed: 7
nx: 512
ny: 512
n_stars: 400
n_galaxies: 150
gal_mag_min: 15.5
gal_mag_max: 18
re_median: 1.5
n_clusters: 0
type_blank_fraction: 1
EOF
if ! "$BIN" -q simulate "$TMP/sim.yaml" --out "$D" >"$TMP/sim.log" 2>&1; then
  fail psfstars_setup "simulate: $(tail -3 "$TMP/sim.log")"; exit 0
fi
cp "$D/input_catalog.csv" "$TMP/with_re.csv"
# the same catalog without Re (the last column)
awk -F, 'BEGIN { OFS = "," } NR > 1 { $NF = "" } { print }' "$TMP/with_re.csv" >"$TMP/no_re.csv"
for v in with_re no_re; do
  if ! mpirun -np 2 --bind-to none "$BIN" -q run "$D/config.yaml" --set "inputs.input_catalog=$TMP/$v.csv" \
       --set "outputs.work_dir=$TMP/w_$v" >"$TMP/run_$v.log" 2>&1; then
    fail psfstars_run "$v: $(tail -3 "$TMP/run_$v.log")"; exit 0
  fi
  if ! "$BIN" score "$TMP/w_$v/surveyproc.h5" "$D" --json "$TMP/$v.json" --quiet-table >"$TMP/score_$v.log" 2>&1; then
    fail psfstars_score "$v: $(tail -3 "$TMP/score_$v.log")"; exit 0
  fi
done
out=$("$PY" - "$TMP/with_re.json" "$TMP/no_re.json" <<'EOF'
import json, sys
a = json.load(open(sys.argv[1]))["per_band"]
b = json.load(open(sys.argv[2]))["per_band"]
worse = [k for k in a if not (a[k]["epsf_resid"] < b[k]["epsf_resid"])]
print(" ".join(f"{k} {100 * a[k]['epsf_resid']:.1f}% vs {100 * b[k]['epsf_resid']:.1f}%" for k in a))
sys.exit(1 if worse or not a else 0)
EOF
)
if [ $? -eq 0 ]; then pass psfstars_blank_galaxies_vetoed; else fail psfstars_blank_galaxies_vetoed "ePSF residual with Re vs without: $out"; fi
echo "  | ePSF residual against the truth, with Re vs without: $out"
if "$PY" -c 'import h5py' 2>/dev/null; then
  n=$("$PY" - "$TMP/w_with_re/surveyproc.h5" "$TMP/w_no_re/surveyproc.h5" <<'EOF'
import h5py, sys
def total(p):
    with h5py.File(p, "r") as f:
        return sum(int(f["epsf"][k][()].sum()) for k in f["epsf"] if k.endswith("_nstars"))
print(total(sys.argv[1]), total(sys.argv[2]))
EOF
)
  set -- $n
  if [ "${1:-x}" != x ] && [ "$1" -lt "$2" ]; then pass psfstars_fewer_candidates; else fail psfstars_fewer_candidates "PSF stars with Re $1, without $2"; fi
else
  skip psfstars_fewer_candidates "python3-h5py not installed"
fi

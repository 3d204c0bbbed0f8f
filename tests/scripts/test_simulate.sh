#!/usr/bin/env bash
# test_simulate.sh — `surveyproc simulate --preset tiny` end to end: every output
# file is written, the image list and catalogs parse, FITS headers carry the
# keys the pipeline reads, the same seed gives the same bytes with 1 or 2
# threads and 1 or 2 MPI ranks, bad input fails cleanly, and (when python3 has
# astropy) an independent WCS reader agrees with truth.csv.
# Prints PASS:/FAIL:/SKIP: lines (tests/run_all.sh counts them).
set -u
cd "$(dirname "$0")/../.."
BIN=${SP_BIN:-$PWD/bin/surveyproc}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
TMP=$(mktemp -d "${TMPDIR:-/tmp}/sptest_sim.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
pass() { echo "PASS: $1"; }
fail() { echo "FAIL: $1${2:+ — $2}"; }
skip() { echo "SKIP: $1${2:+ — $2}"; }

if [ ! -x "$BIN" ]; then fail simulate_binary "$BIN missing (make first)"; exit 0; fi

# 1. the tiny preset runs in seconds
D=$TMP/t
t0=$(date +%s.%N)
if "$BIN" -q simulate --preset tiny --seed 3 --out "$D" >"$TMP/run.out" 2>"$TMP/run.err"; then
  t1=$(date +%s.%N)
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}')
  if awk -v s="$secs" 'BEGIN{exit !(s < 30)}'; then pass simulate_tiny_runs; else fail simulate_tiny_runs "took $secs s"; fi
  sed 's/^/  /' "$TMP/run.out"
else
  fail simulate_tiny_runs "exit $?: $(tail -3 "$TMP/run.err")"
  exit 0
fi

# 2. every output file
missing=""
for f in image_list.txt input_catalog.csv reference_catalog.csv truth.csv truth_psf.yaml sim.yaml config.yaml \
         images/m400_0.fits images/m650_0.fits images/m875_0.fits \
         truth_psf/m400.fits truth_psf/m650.fits truth_psf/m875.fits; do
  [ -s "$D/$f" ] || missing="$missing $f"
done
leftover=$(find "$D" -name '*.tmp-*' | head -3)
if [ -z "$missing" ] && [ -z "$leftover" ]; then pass simulate_files; else fail simulate_files "missing:$missing leftover: $leftover"; fi

# 3. image list: 3 frames, paths relative to the list's folder
n=0; bad=""
while IFS= read -r line; do
  case "$line" in ''|'#'*) continue ;; esac
  n=$((n+1)); [ -f "$D/$line" ] || bad="$bad $line"
done <"$D/image_list.txt"
if [ "$n" -eq 3 ] && [ -z "$bad" ]; then pass simulate_image_list; else fail simulate_image_list "n=$n bad:$bad"; fi

# 4. catalogs: columns, one input row per truth row, some blank TYPEs, numeric fluxes
hdr_in=$(head -1 "$D/input_catalog.csv"); hdr_tr=$(head -1 "$D/truth.csv"); hdr_ref=$(head -1 "$D/reference_catalog.csv")
ok=1; why=""
for c in ID RA DEC TYPE FLUX_m400 FLUX_m650 FLUX_m875 ELL THETA Re; do
  echo ",$hdr_in," | grep -q ",$c," || { ok=0; why="$why input:$c"; }
done
for c in id type x y ra dec flux_m400 flux_m875 re q theta flags; do
  echo ",$hdr_tr," | grep -q ",$c," || { ok=0; why="$why truth:$c"; }
done
for c in RA DEC mag_m400 mag_m650 mag_m875; do
  echo ",$hdr_ref," | grep -q ",$c," || { ok=0; why="$why ref:$c"; }
done
nin=$(($(wc -l <"$D/input_catalog.csv") - 1)); ntr=$(($(wc -l <"$D/truth.csv") - 1)); nref=$(($(wc -l <"$D/reference_catalog.csv") - 1))
[ "$nin" -eq "$ntr" ] && [ "$nin" -gt 100 ] || { ok=0; why="$why rows $nin vs $ntr"; }
[ "$nref" -ge 1 ] || { ok=0; why="$why no reference stars"; }
blank=$(awk -F, 'NR>1 && $4=="" {n++} END{print n+0}' "$D/input_catalog.csv")
[ "$blank" -ge 1 ] || { ok=0; why="$why no blank TYPE"; }
nonnum=$(awk -F, 'NR>1 { for (i=5;i<=7;i++) if ($i !~ /^[-+0-9.eE]+$/) n++ } END{print n+0}' "$D/input_catalog.csv")
[ "$nonnum" -eq 0 ] || { ok=0; why="$why $nonnum non-numeric fluxes"; }
types=$(awk -F, 'NR>1 {print $2}' "$D/truth.csv" | sort -u | tr '\n' ' ')
[ "$types" = "DEV EXP STAR " ] || { ok=0; why="$why types '$types'"; }
if [ $ok -eq 1 ]; then pass simulate_catalogs; else fail simulate_catalogs "$why"; fi

# 5. FITS headers (plain text cards: no FITS tool needed)
hdr=$(head -c 8640 "$D/images/m650_0.fits" | tr -d '\000' | fold -w80)
ok=1; why=""
for k in "SIMPLE  =                    T" "BITPIX  =                  -32" "NAXIS1  =                  256" \
         "FILTER  = 'm650" "ZP_AUTO =" "SKYSIG  =" "EGAIN   =" "SATURATE=" "EXPTIME =" \
         "CTYPE1  = 'RA---TAN-SIP'" "CTYPE2  = 'DEC--TAN-SIP'" "CD1_1   =" "CD2_2   =" "CRVAL1  =" "A_ORDER =" "B_2_0   ="; do
  echo "$hdr" | grep -qF "$k" || { ok=0; why="$why [$k]"; }
done
if [ $ok -eq 1 ]; then pass simulate_fits_headers; else fail simulate_fits_headers "missing$why"; fi

# 6. same seed, 1 vs 2 threads: identical bytes
cmp_dirs() {  # $1 $2 -> prints the first differing file
  (cd "$1" && find . -type f | sort) | while read -r f; do cmp -s "$1/$f" "$2/$f" || { echo "$f"; break; }; done
}
"$BIN" -q simulate --preset tiny --seed 3 --threads 1 --out "$TMP/th1" >/dev/null 2>&1
"$BIN" -q simulate --preset tiny --seed 3 --threads 2 --out "$TMP/th2" >/dev/null 2>&1
d=$(cmp_dirs "$TMP/th1" "$TMP/th2")
if [ -z "$d" ] && [ -s "$TMP/th2/truth.csv" ]; then pass simulate_deterministic_threads; else fail simulate_deterministic_threads "$d differs"; fi
d=$(cmp_dirs "$D" "$TMP/th1")
if [ -z "$d" ]; then pass simulate_deterministic_rerun; else fail simulate_deterministic_rerun "$d differs"; fi

# 7. 2 MPI ranks (bands split between them): identical bytes
if command -v mpirun >/dev/null 2>&1; then
  if mpirun -np 2 --bind-to none "$BIN" -q simulate --preset tiny --seed 3 --out "$TMP/mpi" >"$TMP/mpi.log" 2>&1; then
    d=$(cmp_dirs "$TMP/th1" "$TMP/mpi")
    if [ -z "$d" ]; then pass simulate_deterministic_ranks; else fail simulate_deterministic_ranks "$d differs"; fi
  else
    fail simulate_deterministic_ranks "mpirun failed: $(tail -3 "$TMP/mpi.log")"
  fi
else
  skip simulate_deterministic_ranks "mpirun not found"
fi

# 8. a simulator YAML with overrides; bad input fails with file:line and exit 3
cat >"$TMP/sim.yaml" <<'EOF'
preset: tiny
nx: 160
ny: 128
bands: [m425, m575]
frames_per_band: 2
n_galaxies: 5
EOF
if "$BIN" -q simulate "$TMP/sim.yaml" --out "$TMP/ov" >/dev/null 2>&1 && [ -s "$TMP/ov/images/m575_1.fits" ] &&
   [ "$(grep -vc '^#' "$TMP/ov/image_list.txt")" -eq 4 ] && head -c 2880 "$TMP/ov/images/m425_0.fits" | fold -w80 | grep -q "NAXIS1  =                  160"; then
  pass simulate_config_overrides
else
  fail simulate_config_overrides
fi
printf 'nx: 128\nwhatever: 3\n' >"$TMP/bad.yaml"
"$BIN" -q simulate "$TMP/bad.yaml" --out "$TMP/bad" >/dev/null 2>"$TMP/bad.err"; rc=$?
if [ $rc -eq 3 ] && grep -q "bad.yaml:2: unknown key 'whatever'" "$TMP/bad.err" && [ ! -e "$TMP/bad" ]; then
  pass simulate_bad_config
else
  fail simulate_bad_config "rc=$rc: $(tail -1 "$TMP/bad.err")"
fi
"$BIN" -q simulate --preset tiny >/dev/null 2>"$TMP/noout.err"; rc=$?
if [ $rc -eq 3 ] && grep -q -- "--out DIR is required" "$TMP/noout.err"; then pass simulate_needs_out; else fail simulate_needs_out "rc=$rc"; fi

# 9. the pipeline config it writes is accepted by `surveyproc config` (when that command is built)
if "$BIN" config --help 2>/dev/null | grep -q "not built"; then
  skip simulate_pipeline_config "surveyproc config is not built yet"
elif "$BIN" -q config "$D/config.yaml" >"$TMP/cfg.out" 2>&1; then
  pass simulate_pipeline_config
else
  fail simulate_pipeline_config "$(tail -2 "$TMP/cfg.out")"
fi

# 10. an independent WCS reader (astropy) agrees with truth.csv
PY=/usr/bin/python3; [ -x "$PY" ] || PY=python3
if "$PY" -c 'import astropy, numpy' 2>/dev/null; then
  if "$PY" - "$D" <<'EOF'
import sys, csv
from astropy.io import fits
from astropy.wcs import WCS
d = sys.argv[1]
h = fits.open(d + "/images/m650_0.fits")[0]
for k in ("FILTER", "ZP_AUTO", "SKYSIG", "EGAIN", "SATURATE", "EXPTIME"):
    assert k in h.header, k
assert h.data.shape == (256, 256) and h.data.dtype.kind == "f"
w = WCS(h.header)
rows = list(csv.DictReader(open(d + "/truth.csv")))[:50]
worst = 0.0
for r in rows:
    ra, dec = w.all_pix2world([[float(r["x"]), float(r["y"])]], 0)[0]
    worst = max(worst, abs(ra - float(r["ra"])), abs(dec - float(r["dec"])))
assert worst < 1e-7, worst
EOF
  then pass simulate_astropy_wcs; else fail simulate_astropy_wcs "astropy disagrees with truth.csv"; fi
else
  skip simulate_astropy_wcs "python3 astropy/numpy not installed (headers checked as text above)"
fi
exit 0

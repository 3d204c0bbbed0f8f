#!/usr/bin/env bash
# tests/bad_inputs/run.sh — the bad-input suite (issue 8, DESIGN §8).
#
# Each case copies the tiny simulated tile (`surveyproc simulate --preset tiny`),
# damages one thing (YAML, image list, a FITS frame, the catalog, the reference
# catalog, the store), runs `surveyproc run` — under `mpirun -np 2` where one
# rank's error must end the whole job — with a timeout, and asserts:
#   - the exact exit status (include/surveyproc/sp_error.h: 3 input/config, 4 I/O, 5 other),
#   - that stderr carries every expected fragment (file and line / key / HDU, what to do),
#     and, for errors, exactly one ERROR line (one message, not one per rank),
#   - the store: "none" (no store, only the log in work/), or "valid" (h5py opens it,
#     /catalog has one row per input source, `surveyproc inspect` works), and no
#     temporary files left behind.
# Prints one PASS:/FAIL:/SKIP: line per case (tests/run_all.sh counts them) and a summary.
# Usage: tests/bad_inputs/run.sh [CASE_NAME_REGEX]     (SP_BIN, SP_KEEP=1 to keep the folders)
set -u
cd "$(dirname "$0")/../.."
ROOT=$PWD
BIN=${SP_BIN:-$ROOT/bin/surveyproc}
DAMAGE=$ROOT/tests/bad_inputs/damage.py
ONLY=${1:-}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
TMP=$(mktemp -d "${TMPDIR:-/tmp}/sp_badin.XXXXXX")
[ "${SP_KEEP:-0}" = 1 ] || trap 'chmod -R u+rwX "$TMP" 2>/dev/null; rm -rf "$TMP"' EXIT
chmod 755 "$TMP"
TIMEOUT=60
npass=0; nfail=0; nskip=0; t_start=$SECONDS

if [ ! -x "$BIN" ]; then echo "FAIL: bad_inputs_setup ($BIN missing: run make)"; exit 0; fi
# a private copy: a concurrent `make` relinking bin/surveyproc cannot pull it away mid-suite
cp "$BIN" "$TMP/surveyproc" && BIN=$TMP/surveyproc && chmod 755 "$BIN"
PY=""
if /usr/bin/python3 -c 'import astropy, h5py, numpy' 2>/dev/null; then PY=/usr/bin/python3; fi
HAVE_MPI=0; command -v mpirun >/dev/null 2>&1 && HAVE_MPI=1

BASE=$TMP/base
if ! "$BIN" -q simulate --preset tiny --seed 5 --out "$BASE" >"$TMP/sim.log" 2>&1; then
  echo "FAIL: bad_inputs_setup (simulate failed: $(tail -2 "$TMP/sim.log"))"; exit 0
fi
NROWS=$(($(wc -l <"$BASE/input_catalog.csv") - 1))

# ---- helpers ------------------------------------------------------------------------
# new_case NAME: a fresh copy of the tile in $D; $CFG $LIST $CAT $REF $F0 $F1 $F2 name its files.
# F1 (m650, the 2nd frame) is read by rank 1 under 2 ranks.
new_case() {
  CASE=$1; D=$TMP/$1
  cp -r "$BASE" "$D"
  CFG=$D/config.yaml LIST=$D/image_list.txt CAT=$D/input_catalog.csv REF=$D/reference_catalog.csv
  F0=$D/images/m400_0.fits F1=$D/images/m650_0.fits F2=$D/images/m875_0.fits
  RUN_AS=""; EXTRA_ARGS=()
}
want() { [ -z "$ONLY" ] || echo "$1" | grep -Eq "$ONLY"; }
pass() { echo "PASS: $1"; npass=$((npass+1)); }
fail() { echo "FAIL: $1 — $2"; nfail=$((nfail+1)); sed 's/^/    | /' "$D/err" 2>/dev/null | grep -v '^    | *$' | head -6; }
skip() { echo "SKIP: $1 — $2"; nskip=$((nskip+1)); }

# run NP: run the pipeline on $CFG with NP ranks (1 = singleton, no mpirun); sets RC.
run() {
  local np=$1
  if [ "$np" -gt 1 ]; then
    (cd "$D" && $RUN_AS timeout -k 5 $TIMEOUT mpirun -np "$np" --bind-to none "$BIN" run "$CFG" "${EXTRA_ARGS[@]}" \
       >"$D/out" 2>"$D/err")
  else
    (cd "$D" && $RUN_AS timeout -k 5 $TIMEOUT "$BIN" run "$CFG" "${EXTRA_ARGS[@]}" >"$D/out" 2>"$D/err")
  fi
  RC=$?
}

# store_check none|valid|keep: sets WHY on failure.
store_check() {
  local want=$1 st=$D/work/surveyproc.h5
  local tmpf; tmpf=$(find "$D" \( -name '*.tmp*' -o -name '*.part' \) 2>/dev/null | head -3)
  [ -z "$tmpf" ] || { WHY="temporary files left: $tmpf"; return 1; }
  case $want in
    none)
      [ ! -e "$st" ] || { WHY="a store was left behind"; return 1; }
      local other; other=$(ls "$D/work" 2>/dev/null | grep -v '^surveyproc.log$' | tr '\n' ' ')
      [ -z "$other" ] || { WHY="outputs left behind: $other"; return 1; }
      ;;
    valid)
      [ -f "$st" ] || { WHY="no store"; return 1; }
      "$BIN" -q inspect "$st" >"$D/inspect.out" 2>&1 || { WHY="surveyproc inspect failed: $(tail -1 "$D/inspect.out")"; return 1; }
      if [ -n "$PY" ]; then
        "$PY" - "$st" "$NROWS" >"$D/h5py.out" 2>&1 <<'EOF' || { WHY="h5py: $(tail -1 "$D/h5py.out")"; return 1; }
import sys, h5py
with h5py.File(sys.argv[1], "r") as f:
    n = f["catalog"].shape[0]
    assert n == int(sys.argv[2]), "catalog has %d rows, input %s" % (n, sys.argv[2])
    f["cells"][...]
EOF
      fi
      ;;
  esac
  return 0
}

# expect NAME RC STORE FRAGMENT...: check the last run.
expect() {
  local name=$1 rc=$2 store=$3; shift 3
  WHY=""
  if [ "$RC" -eq 124 ] || [ "$RC" -eq 137 ]; then fail "$name" "timed out after $TIMEOUT s (hang)"; return; fi
  if [ "$RC" -ne "$rc" ]; then fail "$name" "exit $RC, expected $rc"; return; fi
  local frag
  for frag in "$@"; do
    grep -qF -- "$frag" "$D/err" || { fail "$name" "stderr lacks: $frag"; return; }
  done
  if [ "$rc" -ne 0 ]; then
    local nerr; nerr=$(grep -c ' ERROR ' "$D/err")
    [ "$nerr" -eq 1 ] || { fail "$name" "$nerr ERROR lines (one message expected)"; return; }
    grep -q 'Segmentation\|Aborted\|core dumped' "$D/err" && { fail "$name" "crash instead of a clean exit"; return; }
    # plan-phase errors are agreed (every rank exits with the code); only a cell-phase error,
    # where the ranks are in different places, may end the job with MPI_Abort
    [ "${ALLOW_ABORT:-0}" = 1 ] || ! grep -q 'MPI_ABORT' "$D/err" || { fail "$name" "MPI_Abort in a phase that agrees errors"; return; }
  fi
  store_check "$store" || { fail "$name" "$WHY"; return; }
  pass "$name"
  echo "    exit $RC: $(grep -m1 ' ERROR \| WARN ' "$D/err" | sed 's/^[^ ]* r[0-9]* //' | cut -c1-300)" | sed "s#$TMP/##g"
}

# np2: 2 ranks when mpirun exists, else 1 (the case still runs, the rank part is skipped)
NP2=2; [ $HAVE_MPI = 1 ] || NP2=1
r1() { [ "$NP2" -gt 1 ] && echo "rank 1: /" || echo ""; }  # the message of the rank that read frame 1

# ---- 0. the undamaged tile runs ---------------------------------------------------------
if want control; then
  new_case control; run 1
  expect control_good_tile 0 valid
fi

# ---- 1. configuration ---------------------------------------------------------------------
if want yaml; then
  new_case yaml_malformed
  sed -i 's/^  input_catalog: input_catalog.csv/  input_catalog: [input_catalog.csv/' "$CFG"; run 1
  expect yaml_malformed 3 none "config.yaml:8:20: malformed YAML" "(while parsing a flow sequence at line 7)"

  new_case yaml_unknown_key
  sed -i 's/^  zp_ref: 25.0/  zp_ref: 25.0\n  zp_rf: 24.0/' "$CFG"; run "$NP2"
  expect yaml_unknown_key 3 none "config.yaml:13: image_scaling.zp_rf: unknown key" "did you mean image_scaling.zp_ref"

  new_case yaml_out_of_range
  sed -i 's/^  epsf_ngrid: 2/  epsf_ngrid: 0/' "$CFG"; run 1
  expect yaml_out_of_range 3 none "config.yaml:16: epsf.epsf_ngrid: 0 is out of range" "[1, 64]"

  new_case yaml_wrong_type
  sed -i 's/^  zp_ref: 25.0/  zp_ref: twenty-five/' "$CFG"; run 1
  expect yaml_wrong_type 3 none "config.yaml:12: image_scaling.zp_ref:" "twenty-five"

  new_case yaml_duplicate_section
  printf 'epsf:\n  ngrid: 3\n' >>"$CFG"; run 1
  expect yaml_duplicate_section 3 none "config.yaml:18: epsf: duplicate key (first given at line 15)"

  new_case yaml_tab_indent
  printf 'crop:\n\tmargin: 4\n' >>"$CFG"; run 1
  expect yaml_tab_indent 3 none "config.yaml:19:" "malformed YAML"

  new_case yaml_not_a_mapping
  head -c 400 "$F0" >"$CFG"; run 1
  expect yaml_not_a_mapping 3 none "config.yaml:1: the config must be a mapping of sections"

  new_case yaml_required_key_missing
  sed -i '/^  input_catalog:/d' "$CFG"; run 1
  expect yaml_required_key_missing 3 none "config.yaml: inputs.input_catalog: not set; the source catalog CSV is required"

  new_case yaml_empty_file
  : >"$CFG"; run 1
  expect yaml_empty_file 3 none "config.yaml: inputs.image_list_file: not set"

  new_case yaml_missing_file
  rm "$CFG"; run 1
  expect yaml_missing_file 4 none "config.yaml: cannot open config file: No such file or directory"
fi

# ---- 2. image list --------------------------------------------------------------------------
if want list; then
  new_case list_missing
  rm "$LIST"; run 1
  expect list_missing 4 none "image_list.txt: cannot open image list" "inputs.image_list_file"

  new_case list_empty
  printf '# nothing here\n\n' >"$LIST"; run 1
  expect list_empty 3 none "image_list.txt: the image list has no image paths"

  new_case list_frame_twice
  echo "./images/m400_0.fits" >>"$LIST"; run 1
  expect list_frame_twice 3 none "image_list.txt:5: " "m400_0.fits is the same file as line 2"
fi

# ---- 3. frames --------------------------------------------------------------------------------
if want image; then
  new_case image_missing
  rm "$F1"; run "$NP2"
  expect image_missing 4 none "$(r1)" "image_list.txt:3: " "m650_0.fits: cannot open FITS file: No such file or directory"

  new_case image_unreadable
  chmod 000 "$F1"
  if [ "$(id -u)" -eq 0 ]; then
    # root reads anything: run this case as nobody (the folder must be theirs to write work/)
    chmod -R a+rwX "$D"; chmod 000 "$F1"
    if command -v setpriv >/dev/null && setpriv --reuid=65534 --regid=65534 --clear-groups true 2>/dev/null; then
      RUN_AS="setpriv --reuid=65534 --regid=65534 --clear-groups env HOME=$D"
    else
      RUN_AS="skip"
    fi
  fi
  if [ "$RUN_AS" = skip ]; then skip image_unreadable "root, and no setpriv to drop privileges"
  else run 1; expect image_unreadable 4 none "image_list.txt:3: " "m650_0.fits: cannot read FITS file: Permission denied"; fi

  new_case image_is_directory
  rm "$F1"; mkdir "$F1"; run 1
  expect image_is_directory 4 none "image_list.txt:3: " "m650_0.fits: not a regular file"

  new_case image_table_only   # a FITS file with no 2-D image HDU
  printf 'SIMPLE  =                    T%50sBITPIX  =                    8%50sNAXIS   =                    0%50sEND%77s' '' '' '' '' >"$F1"
  truncate -s 2880 "$F1"; run 1
  expect image_table_only 3 none "image_list.txt:3: " "m650_0.fits: no 2-D image found in the primary HDU"

  new_case image_not_fits
  echo "this is not a FITS file" >"$F1"; run 1
  expect image_not_fits 3 none "m650_0.fits[HDU 1]: not a readable FITS file"
fi

if want fits; then
  new_case fits_truncated_data
  truncate -s 100000 "$F1"; run "$NP2"
  expect fits_truncated_data 3 none "$(r1)" "image_list.txt:3: " "m650_0.fits[HDU 1]: truncated FITS file" "the file has 100000"

  new_case fits_truncated_header
  truncate -s 1000 "$F2"; run 1
  expect fits_truncated_header 3 none "image_list.txt:4: " "m875_0.fits[HDU 1]: not a readable FITS file"

  new_case fits_zero_bytes
  : >"$F2"; run 1
  expect fits_zero_bytes 3 none "image_list.txt:4: " "m875_0.fits"
fi

if [ -z "$PY" ] && want 'frame|header|nan'; then
  skip frame_cases "Debian's python3 with astropy/h5py is missing (apt-get install python3-astropy python3-h5py)"
elif want 'frame|header|nan'; then
  new_case frame_no_wcs
  $DAMAGE nowcs "$F1"; run "$NP2"
  expect frame_no_wcs 3 none "$(r1)" "image_list.txt:3: " "m650_0.fits[HDU 1]: no WCS in the header"

  new_case frame_first_no_wcs
  $DAMAGE nowcs "$F0"; run 1
  expect frame_first_no_wcs 3 none "image_list.txt:2 (the first frame, which defines the tile WCS)" "m400_0.fits[HDU 1]: no WCS"

  new_case frame_wcs_differs
  $DAMAGE shiftwcs "$F2" 3.5; run 1
  expect frame_wcs_differs 3 none "image_list.txt:4: " "m875_0.fits[HDU 1]: WCS differs from" "by up to 3.500 pixels" "checks.wcs_tolerance.crpix"

  new_case frame_shape_check_off   # checks.require_same_shape: false is not supported: said so
  $DAMAGE crop "$F2" 200 256; printf 'checks:\n  require_same_shape: false\n' >>"$CFG"; run 1
  expect frame_shape_check_off 3 none "shape 200x256 differs" "checks.require_same_shape: false is accepted by the config, but frames of different shapes are not supported yet"

  new_case frame_shape_differs
  $DAMAGE crop "$F2" 200 256; run "$NP2"
  expect frame_shape_differs 3 none "image_list.txt:4: " "m875_0.fits[HDU 1]: shape 200x256 differs" "(line 2: 256x256)"

  for k in FILTER ZP_AUTO SKYSIG EGAIN; do
    new_case header_missing_$k
    $DAMAGE delkey "$F1" "$k"; run "$NP2"
    expect header_missing_$k 3 none "$(r1)" "image_list.txt:3: " "m650_0.fits[HDU 1]: missing header key $k" "every frame needs $k"
  done

  new_case header_bad_skysig
  $DAMAGE setkey "$F1" SKYSIG -1; run 1
  expect header_bad_skysig 3 none "image_list.txt:3: " "m650_0.fits[HDU 1]: SKYSIG = -1; it must be a positive"

  new_case header_zp_implausible   # used to run, with every flux of the band 0
  $DAMAGE setkey "$F1" ZP_AUTO 1e30; run 1
  expect header_zp_implausible 3 none "image_list.txt:3: " "m650_0.fits[HDU 1]: ZP_AUTO = 1e+30 is not a plausible AB zero point"

  new_case frame_partly_nan_ok   # a NaN quadrant in every band: rows flagged, run completes
  /usr/bin/python3 -c "
from astropy.io import fits; import numpy as np, sys
for f in sys.argv[1:]:
    with fits.open(f, mode='update') as hl: hl[0].data[:128, :128] = np.nan
" "$F0" "$F1" "$F2"
  run "$NP2"
  expect frame_partly_nan_ok 0 valid
  if [ -n "$PY" ] && [ "$RC" -eq 0 ]; then
    if "$PY" - "$D/work/surveyproc.h5" >"$D/flags.out" 2>&1 <<'EOF'
import sys, h5py, numpy as np
a = h5py.File(sys.argv[1], "r")["catalog"][...]
bad = np.isnan(a["FLUX_m650_APER"]) & (a["excluded_any"] == 0)
assert bad.sum() > 0, "no source lost its aperture flux?"
assert np.all(a["APER_FLAGS_m650"][bad] & 8), "a NaN flux without the all-masked flag"
EOF
    then pass frame_partly_nan_flagged; else fail frame_partly_nan_flagged "$(tail -1 "$D/flags.out")"; fi
  fi

  new_case header_egain_not_number
  $DAMAGE setkey "$F1" EGAIN abc; run 1
  expect header_egain_not_number 3 none "m650_0.fits[HDU 1]: header key EGAIN = 'abc" "is not a valid number"

  new_case frame_cube   # NAXIS = 3
  /usr/bin/python3 -c "
from astropy.io import fits; import numpy as np, sys
h = fits.open(sys.argv[1])[0]; fits.PrimaryHDU(np.stack([h.data, h.data]), h.header).writeto(sys.argv[1], overwrite=True)" "$F1"
  run 1
  expect frame_cube 3 none "image_list.txt:3: " "m650_0.fits: no 2-D image found" "NAXIS = 2"

  new_case frame_in_extension_ok   # DESIGN §2: the primary HDU or the first image HDU
  /usr/bin/python3 -c "
from astropy.io import fits; import sys
h = fits.open(sys.argv[1])[0]; fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(h.data, h.header)]).writeto(sys.argv[1], overwrite=True)" "$F1"
  run "$NP2"
  expect frame_in_extension_ok 0 valid

  new_case frame_int16_ok   # integer pixels are read as float
  /usr/bin/python3 -c "
from astropy.io import fits; import numpy as np, sys
h = fits.open(sys.argv[1])[0]; fits.PrimaryHDU(np.round(h.data + 100).astype(np.int16), h.header).writeto(sys.argv[1], overwrite=True)" "$F1"
  run 1
  expect frame_int16_ok 0 valid

  new_case header_filter_too_long
  $DAMAGE setkey "$F1" FILTER abcdefghijklmnopqrstuvwxyz0123; run 1
  expect header_filter_too_long 3 none "image_list.txt:3: " "FILTER 'abcdefghijklmnopqrstuvwxyz0123' is empty or longer than 23 characters"

  new_case frame_damaged_tile   # found only by the cell that reads it: the cell phase's abort path
  $DAMAGE fzcorrupt "$F1"; run "$NP2"
  ALLOW_ABORT=1 expect frame_damaged_tile 3 valid "cell 0 (x 0-128, y 0-128), PSF pass: " \
    "m650_0.fits[HDU 2]: cannot read pixels [0:150, 0:150) (truncated or damaged file?)" "decompression error"
  "$BIN" -q inspect "$D/work/surveyproc.h5" 2>&1 | grep -q 'to do' && pass frame_damaged_tile_store_resumable ||
    fail frame_damaged_tile_store_resumable "inspect does not show cells to do"

  new_case frame_all_nan
  $DAMAGE allnan "$F1"; run "$NP2"
  expect frame_all_nan 3 none "$(r1)" "image_list.txt:3: " "m650_0.fits[HDU 1]: every pixel is NaN or blank"
fi

# ---- 4. input catalog ---------------------------------------------------------------------------
if want catalog; then
  new_case catalog_missing
  rm "$CAT"; run 1
  expect catalog_missing 4 none "input catalog (inputs.input_catalog)" "input_catalog.csv: cannot open CSV file"

  new_case catalog_no_ra
  sed -i '1s/^ID,RA,/ID,RAJ2000,/' "$CAT"; run 1
  expect catalog_no_ra 3 none "input_catalog.csv:1: the catalog needs RA and DEC columns" "no RA"

  new_case catalog_short_row
  sed -i '20s/,[^,]*$//' "$CAT"; run 1
  expect catalog_short_row 3 none "input_catalog.csv:20: row has 9 fields but the header (line 1) has 10 columns"

  new_case catalog_long_row
  sed -i '21s/$/,7/' "$CAT"; run 1
  expect catalog_long_row 3 none "input_catalog.csv:21: row has 11 fields"

  new_case catalog_not_a_number
  sed -i '31s/^\([^,]*\),[^,]*,/\1,abc,/' "$CAT"; run 1
  expect catalog_not_a_number 3 none "input_catalog.csv:31: column RA: 'abc' is not a number"

  new_case catalog_nan_coord
  sed -i '30s/^\([^,]*\),[^,]*,/\1,nan,/; 50s/^\([^,]*\),\([^,]*\),[^,]*,/\1,\2,NaN,/' "$CAT"; run "$NP2"
  expect catalog_nan_coord 3 none "input_catalog.csv:30: source '29' has no valid position (RA = 'nan'" "lines 30, 50"

  new_case catalog_blank_coord
  sed -i '30s/^\([^,]*\),[^,]*,/\1,,/' "$CAT"; run 1
  expect catalog_blank_coord 3 none "input_catalog.csv:30: source '29' has no valid position (RA = ''"

  new_case catalog_dec_out_of_range
  sed -i '30s/^\([^,]*\),\([^,]*\),[^,]*,/\1,\2,95.0,/' "$CAT"; run 1
  expect catalog_dec_out_of_range 3 none "input_catalog.csv:30: source '29' has no valid position" "DEC = '95.0'"

  new_case catalog_duplicate_id
  sed -i '40s/^[^,]*,/7,/; 60s/^[^,]*,/12,/' "$CAT"; run "$NP2"
  expect catalog_duplicate_id 3 none "input_catalog.csv:40: duplicate ID '7' (first at line 8; 2 duplicate row(s)"

  new_case catalog_band_not_in_frames
  sed -i '1s/$/,FLUX_m999/; 2,$s/$/,1.0/' "$CAT"; run 1
  expect catalog_band_not_in_frames 3 none "input_catalog.csv:1: column FLUX_m999 names band 'm999'" "frame bands: m400, m650, m875"

  new_case catalog_band_not_in_frames_allowed   # checks.require_catalog_bands: false -> ignored, warned once
  sed -i '1s/$/,FLUX_m999/; 2,$s/$/,1.0/' "$CAT"; printf 'checks:\n  require_catalog_bands: false\n' >>"$CFG"; run "$NP2"
  expect catalog_band_not_in_frames_allowed 0 valid "input_catalog.csv:1: column FLUX_m999 names band 'm999'" "column ignored"
  [ "$(grep -c 'column FLUX_m999' "$D/err")" -eq 1 ] && pass catalog_band_warned_once || fail catalog_band_warned_once "warned $(grep -c 'column FLUX_m999' "$D/err") times"

  new_case catalog_header_only
  sed -i '2,$d' "$CAT"; run 1
  expect catalog_header_only 3 none "input_catalog.csv:1: the catalog has a header but no rows"

  new_case catalog_zero_bytes
  : >"$CAT"; run 1
  expect catalog_zero_bytes 3 none "input_catalog.csv:1: empty CSV file"

  new_case catalog_outside_tile
  awk -F, 'BEGIN{OFS=","} NR>1{$2=$2+10} {print}' "$CAT" >"$D/x" && mv "$D/x" "$CAT"; run 1
  expect catalog_outside_tile 3 none "input_catalog.csv: none of the $NROWS sources falls on the tile" "centred on RA 150.0" "the catalog spans RA 159.98"

  new_case catalog_is_directory
  rm "$CAT"; mkdir "$CAT"; run 1
  expect catalog_is_directory 4 none "input catalog (inputs.input_catalog)" "input_catalog.csv: read error: Is a directory"

  new_case catalog_unterminated_quote
  sed -i '25s/^\([^,]*\),/\1,"/' "$CAT"; run 1
  expect catalog_unterminated_quote 3 none "input_catalog.csv:25: unterminated quoted field (column 2"

  new_case catalog_crlf_bom_ok   # a spreadsheet's CSV: Windows line ends and a UTF-8 BOM are not errors
  sed -i 's/$/\r/; 1s/^/\xef\xbb\xbf/; 2s/^1,/src1,/' "$CAT"; run 1
  expect catalog_crlf_bom_ok 0 valid
  if [ -n "$PY" ] && [ "$RC" -eq 0 ]; then
    "$PY" -c "import h5py, sys; a = h5py.File(sys.argv[1], 'r')['catalog'][...]; assert a['ID'][0] == b'src1', a['ID'][0]" \
      "$D/work/surveyproc.h5" 2>"$D/id.out" && pass catalog_bom_keeps_id_column || fail catalog_bom_keeps_id_column "$(tail -1 "$D/id.out")"
  fi
fi

# ---- 5. reference catalog -------------------------------------------------------------------------
if want refcat; then
  new_case refcat_no_overlap
  awk -F, 'BEGIN{OFS=","} NR>1{$2=$2+10} {print}' "$REF" >"$D/x" && mv "$D/x" "$REF"; run "$NP2"
  expect refcat_no_overlap 0 valid "reference_catalog.csv: none of its" "falls on the tile" \
         "lies within zp.match_radius_arcsec" "no reference star matched"
  if [ -n "$PY" ] && [ "$RC" -eq 0 ]; then
    if "$PY" - "$D/work/surveyproc.h5" <<'EOF' >"$D/zp.out" 2>&1
import sys, h5py, numpy as np
with h5py.File(sys.argv[1], "r") as f:
    z = f["zp/bands"][...]
    assert len(z) == 3 and np.all(z["flag"] & 8) and np.all(z["flag"] & 1) and np.all(np.isnan(z["zp"])), z
EOF
    then pass refcat_no_overlap_zp_flagged; else fail refcat_no_overlap_zp_flagged "$(tail -1 "$D/zp.out")"; fi
  fi

  new_case refcat_missing
  rm "$REF"; run 1
  expect refcat_missing 4 none "checking the reference catalog before the run" "reference catalog (inputs.reference_catalog)" "cannot open CSV file"

  new_case refcat_no_ra
  sed -i '1s/^RA,/R_A,/' "$REF"; run 1
  expect refcat_no_ra 3 none "reference_catalog.csv:1: the reference catalog needs RA and DEC columns" "no RA column"

  new_case refcat_short_row
  sed -i '3s/,[^,]*$//' "$REF"; run 1
  expect refcat_short_row 3 none "reference_catalog.csv:3: row has 4 fields"

  new_case refcat_missing_band
  cut -d, -f1-4 "$REF" >"$D/x" && mv "$D/x" "$REF"; run 1
  expect refcat_missing_band 0 valid "reference_catalog.csv: no mag_m875 column" "no mag_m875 column"
fi

# ---- 6. store -----------------------------------------------------------------------------------------
if want store; then
  new_case store_exists
  run 1; cp "$D/work/surveyproc.h5" "$D/first.h5"; run "$NP2"
  expect store_exists 5 valid "surveyproc.h5 already exists; use \`surveyproc run --resume\`"
  cmp -s "$D/first.h5" "$D/work/surveyproc.h5" && pass store_exists_untouched || fail store_exists_untouched "the store changed"

  new_case store_overwrite_bad_input   # overwrite: true, but the new inputs are bad: the old store stays
  run 1; cp "$D/work/surveyproc.h5" "$D/first.h5"
  sed -i 's/^  work_dir: work/  work_dir: work\n  overwrite: true/' "$CFG"; sed -i '40s/^[^,]*,/7,/' "$CAT"; run "$NP2"
  expect store_overwrite_bad_input 3 valid "input_catalog.csv:40: duplicate ID '7'"
  cmp -s "$D/first.h5" "$D/work/surveyproc.h5" && pass store_overwrite_bad_input_untouched || fail store_overwrite_bad_input_untouched "the old store changed"

  new_case store_is_directory
  sed -i "s#^  work_dir: work#  work_dir: work\n  store: $D/images\n  overwrite: true#" "$CFG"; run 1
  expect store_is_directory 4 none "images: cannot create the file: the path exists and is not a regular file"

  new_case store_is_an_input   # overwrite: true must never truncate an input
  cp "$CAT" "$D/cat.orig"
  sed -i "s#^  work_dir: work#  work_dir: work\n  store: $CAT\n  overwrite: true#" "$CFG"; run "$NP2"
  expect store_is_an_input 3 none "outputs.store = " "input_catalog.csv is the inputs.input_catalog of this run"
  cmp -s "$CAT" "$D/cat.orig" && pass store_is_an_input_untouched || fail store_is_an_input_untouched "the catalog changed"

  new_case store_is_a_frame
  sed -i "s#^  work_dir: work#  work_dir: work\n  store: $F2\n  overwrite: true#" "$CFG"; run 1
  expect store_is_a_frame 3 none "m875_0.fits is frame 2 of the image list (line 4)"

  new_case work_dir_not_a_directory
  sed -i 's#^  work_dir: work#  work_dir: config.yaml/work#' "$CFG"; run 1
  expect work_dir_not_a_directory 4 none "config.yaml/work: cannot create directory (outputs.work_dir): Not a directory"

  new_case store_resume_other_config
  run 1; sed -i 's/^  zp_ref: 25.0/  zp_ref: 24.0/' "$CFG"; EXTRA_ARGS=(--resume); run "$NP2"
  expect store_resume_other_config 5 valid "surveyproc.h5" "science"
fi

# ---- more bands than one HDF5 table holds ---------------------------------------------------------
# 16 catalog columns per band: 64 bands are over HDF5's 64 KiB row-type description. Refused when
# the store is made (before any cell), saying how many bands fit and what to do; no store left.
if want too_many_bands; then
  CASE=too_many_bands; D=$TMP/too_many_bands; RUN_AS=""; EXTRA_ARGS=()
  printf 'preset: tiny\nseed: 3\nbands: 64\nn_stars: 60\nn_galaxies: 10\n' >"$TMP/b64.yaml"
  if "$BIN" -q simulate "$TMP/b64.yaml" --out "$D" >"$TMP/b64.log" 2>&1; then
    CFG=$D/config.yaml; run "$NP2"
    expect too_many_bands 3 none "64 bands need" "catalog columns (16 per band), more than one HDF5 table holds" \
      "process the bands in groups"
  else
    fail too_many_bands "simulate failed: $(tail -2 "$TMP/b64.log")"
  fi
fi

echo "bad inputs: $npass passed, $nfail failed, $nskip skipped in $((SECONDS - t_start)) s"
[ "$nfail" -eq 0 ]

#!/usr/bin/env bash
# test_qa.sh — `surveyproc qa STORE --out DIR` end to end (docs/qa.md):
#  1. simulate the tiny tile, run it under mpirun -np 2, draw the report: index.html and every
#     figure the store has material for exist, are PNGs of real size with more than one colour,
#     every <img> of the page exists, skipped figures carry a note;
#  2. a copy filled with every QA dataset of docs/qa.md (tests/scripts/qa_fixture.py: fit columns,
#     ePSFs, growth curves, star residuals, backgrounds, patch overviews, cutouts; then `surveyproc
#     zp`): all 22 figures are drawn;
#  3. the run's plot toggles (in /provenance config) switch figures off, with a note naming the key;
#  4. errors: missing store, missing script, missing matplotlib -> non-zero exit, message naming it;
#  5. headless Chromium (Debian chromium) loads the page and takes a screenshot, when installed.
# Prints PASS:/FAIL:/SKIP: lines.
set -u
cd "$(dirname "$0")/../.."
ROOT=$PWD
PY=/usr/bin/python3
if [ ! -x "$PY" ] || ! "$PY" -c 'import h5py, numpy, matplotlib, astropy.io.fits' 2>/dev/null; then
  echo "SKIP: qa (/usr/bin/python3 with h5py, numpy, matplotlib, astropy not found; apt-get install python3-h5py python3-matplotlib python3-astropy)"
  exit 0
fi
BIN=${SP_BIN:-$ROOT/bin/surveyproc}
if [ ! -x "$BIN" ]; then echo "FAIL: qa (bin/surveyproc is not built; run make)"; exit 1; fi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OPENBLAS_NUM_THREADS=1
DIR=$(mktemp -d "${TMPDIR:-/tmp}/spqa.XXXXXX")
trap 'rm -rf "$DIR"' EXIT
ok() { echo "PASS: $1"; }
bad() { echo "FAIL: $1"; }

if ! "$BIN" -q simulate --preset tiny --out "$DIR/sim" >"$DIR/sim.log" 2>&1; then
  cat "$DIR/sim.log"; bad "qa_setup (simulate failed)"; exit 1
fi
if ! mpirun -np 2 --bind-to none "$BIN" -q run "$DIR/sim/config.yaml" >"$DIR/run.log" 2>&1; then
  cat "$DIR/run.log"; bad "qa_setup (run failed)"; exit 1
fi
STORE=$DIR/sim/work/surveyproc.h5

# check_report DIR [EXPECTED...]: index.html, the PNGs (exist, PNG, >= 200x150, not one colour),
# every <img> present; EXPECTED '+auto' adds what the store has material for
check_report() {
  "$PY" - "$@" <<'EOF'
import sys, os, re, h5py, numpy as np
import matplotlib; matplotlib.use("Agg")
import matplotlib.image as mpimg
out, store, expected = sys.argv[1], sys.argv[2], sys.argv[3:]
errs = []
idx = os.path.join(out, "index.html")
if not os.path.isfile(idx):
    print("no index.html"); sys.exit(1)
page = open(idx).read()
if "<h2>Summary</h2>" not in page or "sources" not in page:
    errs.append("index.html has no summary table")
if "+auto" in expected:
    expected.remove("+auto")
    f = h5py.File(store, "r")
    bands = f.attrs["bands"].split(",")
    expected += ["white_pre_crop.png", "white_post_crop.png", "overlay.png", "overlay_zoom.png", "cells.png",
                 "timing_stages.png", "timing_ranks.png"]
    expected += ["epsf_%s.png" % b for b in bands if np.isfinite(f["epsf/" + b][...]).any()]
    if "zp/stars" in f and f["zp/stars"].shape[0] > 0:
        expected.append("zp_mag.png")
    if "apcorr/bands" in f:
        expected.append("apcorr.png")
    c = f["catalog"][:]
    if any((np.isfinite(c["FLUX_%s_fit" % b]) & np.isfinite(c["FLUX_%s_APER" % b])).sum() >= 2 for b in bands):
        expected += ["flux_fit_vs_aper.png", "flux_pulls.png"]
imgs = re.findall(r"<img src='([^']+)'", page)
for im in imgs:
    if not os.path.isfile(os.path.join(out, im)):
        errs.append("index.html shows %s, which is missing" % im)
for e in expected:
    p = os.path.join(out, e)
    if not os.path.isfile(p):
        errs.append("%s missing" % e); continue
    if e not in imgs:
        errs.append("%s not on the page" % e)
    if open(p, "rb").read(8) != b"\x89PNG\r\n\x1a\n":
        errs.append("%s is not a PNG" % e); continue
    a = mpimg.imread(p)
    if a.shape[0] < 150 or a.shape[1] < 200 or os.path.getsize(p) < 5000:
        errs.append("%s is tiny (%s, %d bytes)" % (e, a.shape, os.path.getsize(p)))
    if float(a[..., :3].std()) < 0.02:
        errs.append("%s is (nearly) one colour" % e)
print("%d figures on the page, %d checked, %d notes" % (len(imgs), len(expected), page.count("class=note")))
for e in errs: print("  " + e)
sys.exit(1 if errs else 0)
EOF
}

# ---- 1. the run's own store ----------------------------------------------------------------
if "$BIN" -q qa "$STORE" --out "$DIR/qa" >"$DIR/qa.log" 2>&1 && check_report "$DIR/qa" "$STORE" +auto; then
  ok "qa_report_run"
else
  cat "$DIR/qa.log"; bad "qa_report_run"
fi
# what the run does not hold is named on the page, not silently missing
nskip=$(grep -c '^  skipped ' "$DIR/qa.log"); nnote=$(grep -o "class=note>[^<]*not drawn" "$DIR/qa/index.html" | wc -l)
if [ "$nskip" -eq "$nnote" ]; then
  ok "qa_skip_notes ($nskip figures skipped, each with a note)"
else
  bad "qa_skip_notes ($nskip skipped, $nnote notes in index.html)"
fi

# ---- 2. every QA dataset present ------------------------------------------------------------
FULL=$DIR/full.h5
cp "$STORE" "$FULL"
if "$PY" tests/scripts/qa_fixture.py "$FULL" "$DIR/sim" >"$DIR/fix.log" 2>&1 &&
   "$BIN" -q zp "$DIR/sim/config.yaml" --store "$FULL" --set zp.min_stars=1 >>"$DIR/fix.log" 2>&1; then
  ALL="white_pre_crop.png white_post_crop.png overlay.png overlay_zoom.png cells.png epsf_growth.png
       background.png patch_overview_1.png cutouts_1.png apcorr.png zp_mag.png flux_fit_vs_aper.png flux_pulls.png
       timing_stages.png timing_ranks.png"
  for b in m400 m650 m875; do ALL="$ALL epsf_$b.png epsf_resid_$b.png epsf_field_$b.png"; done
  if "$BIN" -q qa "$FULL" --out "$DIR/qa_full" >"$DIR/qa_full.log" 2>&1 && check_report "$DIR/qa_full" "$FULL" $ALL &&
     grep -q "0 skipped" "$DIR/qa_full.log"; then
    ok "qa_report_all_figures"
  else
    cat "$DIR/fix.log" "$DIR/qa_full.log"; bad "qa_report_all_figures"
  fi
else
  cat "$DIR/fix.log"; bad "qa_report_all_figures (fixture failed)"
fi

# ---- 3. plot toggles of the run's config ----------------------------------------------------
TOG=$DIR/toggles.h5
cp "$FULL" "$TOG"
"$PY" - "$TOG" <<'EOF'
import sys, h5py, re
f = h5py.File(sys.argv[1], "r+")
c = f["provenance"].attrs["config"]
c = c.decode() if isinstance(c, bytes) else c
for sec, key, val in (("overlay", "enabled", "false"), ("patch_run", "no_cutouts", "true"),
                      ("epsf", "save_growth_curve", "false"), ("crop", "plot_pre_crop", "false")):
    c = re.sub(r"(?m)^(%s:\n(?:  .*\n)*?  %s: )\S+" % (sec, key), r"\g<1>" + val, c)
f["provenance"].attrs["config"] = c
EOF
if "$BIN" -q qa "$TOG" --out "$DIR/qa_tog" >"$DIR/qa_tog.log" 2>&1; then
  miss=""
  for p in overlay.png overlay_zoom.png cutouts_1.png epsf_growth.png white_pre_crop.png; do
    [ -e "$DIR/qa_tog/$p" ] && miss="$miss $p(drawn)"
  done
  for k in overlay.enabled patch_run.no_cutouts epsf.save_growth_curve crop.plot_pre_crop; do
    grep -q "$k" "$DIR/qa_tog/index.html" || miss="$miss $k(no note)"
  done
  [ -e "$DIR/qa_tog/white_post_crop.png" ] && [ -e "$DIR/qa_tog/patch_overview_1.png" ] || miss="$miss (others lost)"
  if [ -z "$miss" ]; then ok "qa_toggles"; else bad "qa_toggles:$miss"; fi
else
  cat "$DIR/qa_tog.log"; bad "qa_toggles (qa failed)"
fi

# ---- 4. errors --------------------------------------------------------------------------------
"$BIN" -q qa "$DIR/no_such.h5" --out "$DIR/qa_err" >"$DIR/err1.log" 2>&1; rc=$?
if [ "$rc" -ne 0 ] && grep -q "no_such.h5" "$DIR/err1.log" && grep -qi "not found" "$DIR/err1.log"; then
  ok "qa_error_missing_store"
else
  cat "$DIR/err1.log"; bad "qa_error_missing_store (rc=$rc)"
fi
SURVEYPROC_QA_SCRIPT=$DIR/nowhere/qa.py "$BIN" -q qa "$STORE" --out "$DIR/qa_err" >"$DIR/err2.log" 2>&1; rc=$?
if [ "$rc" -ne 0 ] && grep -q "nowhere/qa.py" "$DIR/err2.log"; then
  ok "qa_error_missing_script"
else
  cat "$DIR/err2.log"; bad "qa_error_missing_script (rc=$rc)"
fi
mkdir -p "$DIR/fakemods/matplotlib"
echo 'raise ImportError("hidden by test_qa.sh")' >"$DIR/fakemods/matplotlib/__init__.py"
PYTHONPATH=$DIR/fakemods "$BIN" -q qa "$STORE" --out "$DIR/qa_err" >"$DIR/err3.log" 2>&1; rc=$?
if [ "$rc" -ne 0 ] && grep -q "python3-matplotlib" "$DIR/err3.log"; then
  ok "qa_error_missing_matplotlib"
else
  cat "$DIR/err3.log"; bad "qa_error_missing_matplotlib (rc=$rc)"
fi
echo "not hdf5" >"$DIR/junk.h5"
"$BIN" -q qa "$DIR/junk.h5" --out "$DIR/qa_err" >"$DIR/err4.log" 2>&1; rc=$?
if [ "$rc" -ne 0 ] && grep -q "junk.h5" "$DIR/err4.log"; then ok "qa_error_not_hdf5"; else cat "$DIR/err4.log"; bad "qa_error_not_hdf5 (rc=$rc)"; fi

# ---- 5. the page in headless Chromium ---------------------------------------------------------
CHROME=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$CHROME" ] && [ "$(id -u)" -eq 0 ]; then
  # as the SLURM test does for slurm-wlm: install what the test needs (apt-get, only if missing)
  echo "test_qa: installing chromium (scripts/install-deps.sh --with-qa)"
  bash scripts/install-deps.sh --with-qa >"$DIR/deps.log" 2>&1 || tail -3 "$DIR/deps.log"
  CHROME=$(command -v chromium || command -v chromium-browser || true)
fi
if [ -z "$CHROME" ]; then
  echo "SKIP: qa_chromium (Debian chromium not installed: scripts/install-deps.sh --with-qa)"
else
  # every image decoded in the browser (naturalWidth > 0), then a screenshot of the page
  sed 's#</body>#<script>window.onload=function(){var b=0,i=document.images;for(var k=0;k<i.length;k++)if(!i[k].complete||i[k].naturalWidth==0)b++;document.title="IMGS "+i.length+" BROKEN "+b;}</script></body>#' \
    "$DIR/qa_full/index.html" >"$DIR/qa_full/check.html"
  timeout 120 "$CHROME" --headless --no-sandbox --disable-gpu --virtual-time-budget=10000 \
    --dump-dom "file://$DIR/qa_full/check.html" >"$DIR/dom.html" 2>"$DIR/chrome.log"
  timeout 120 "$CHROME" --headless --no-sandbox --disable-gpu --window-size=1280,4000 \
    --screenshot="$DIR/shot.png" "file://$DIR/qa_full/index.html" >>"$DIR/chrome.log" 2>&1
  if grep -q "<title>IMGS [1-9][0-9]* BROKEN 0</title>" "$DIR/dom.html" && [ -s "$DIR/shot.png" ]; then
    ok "qa_chromium ($(grep -o 'IMGS [0-9]*' "$DIR/dom.html"), screenshot $(stat -c %s "$DIR/shot.png") bytes)"
  else
    grep -o "<title>[^<]*</title>" "$DIR/dom.html"; tail -5 "$DIR/chrome.log"; bad "qa_chromium"
  fi
fi

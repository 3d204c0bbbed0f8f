#!/usr/bin/env bash
# test_wcs_astropy.sh — our WCS (wcslib through sp_wcs, read from FITS files
# through sp_fits) against astropy, live, on many points and several kinds of
# headers (TAN with CD, rotated+flipped PC/CDELT, TAN-SIP order 4 across RA=0,
# near the pole, SIN, ZEA, TPV, galactic).
#
# Python (Debian's astropy) writes DIR/<case>.fits plus reference tables;
# build/*/tests/unit/test_wcs in live mode (SP_WCS_ASTROPY_DIR=DIR) compares:
# pix->sky within 1e-9 deg, sky->pix within 1e-6 pix. A control run on
# references nudged by 5e-9 deg must fail, so the comparison can fail.
# Prints PASS:/FAIL:/SKIP: lines.
set -u
cd "$(dirname "$0")/../.."
PY=/usr/bin/python3
[ -x "$PY" ] || PY=$(command -v python3 || true)
if [ -z "$PY" ] || ! "$PY" -c 'import astropy.wcs, numpy' 2>/dev/null; then
  echo "SKIP: wcs_astropy (python3 with astropy and numpy not found; apt-get install python3-astropy)"
  exit 0
fi
BIN=""
for b in "${SP_BUILD:-build/rel}" build/rel build/san; do
  if [ -x "$b/tests/unit/test_wcs" ]; then BIN=$b/tests/unit/test_wcs; break; fi
done
if [ -z "$BIN" ]; then
  echo "FAIL: wcs_astropy (test_wcs is not built; run make tests)"
  exit 1
fi
DIR=$(mktemp -d "${TMPDIR:-/tmp}/spwcs.XXXXXX")
trap 'rm -rf "$DIR"' EXIT

"$PY" - "$DIR" <<'EOF'
import sys, warnings
import numpy as np
from astropy.io import fits
from astropy.wcs import WCS
warnings.simplefilter("ignore")
out = sys.argv[1]
rng = np.random.default_rng(20240611)

def rot(deg, sx, sy, flip=True):
    t = np.radians(deg); c, s = np.cos(t), np.sin(t)
    m = np.array([[c, -s], [s, c]]) @ np.diag([sx, sy])
    if flip: m = np.diag([-1.0, 1.0]) @ m
    return m

cases = {}
def base(ctype1, ctype2, crval, crpix, cd, extra=None, nx=2048, ny=2048):
    h = {"CTYPE1": ctype1, "CTYPE2": ctype2, "CRVAL1": crval[0], "CRVAL2": crval[1],
         "CRPIX1": crpix[0], "CRPIX2": crpix[1], "CD1_1": cd[0][0], "CD1_2": cd[0][1],
         "CD2_1": cd[1][0], "CD2_2": cd[1][1], "NX": nx, "NY": ny}
    h.update(extra or {})
    return h

s7 = 0.505 / 3600
cases["tan_cd"] = base("RA---TAN", "DEC--TAN", (150.11913, 2.20583), (4872.3, 3250.1), rot(0.7, s7, s7), nx=9576, ny=6388)
cases["tan_near_pole"] = base("RA---TAN", "DEC--TAN", (47.3, 89.71), (1024.5, 1024.5), rot(-12.0, 1 / 3600, 1 / 3600))
cases["sin_rot"] = base("RA---SIN", "DEC--SIN", (210.8, -60.2), (512.0, 700.0), rot(33.0, 2e-4, 2.2e-4))
cases["zea_south"] = base("RA---ZEA", "DEC--ZEA", (85.0, -75.5), (1000.0, 900.0), rot(100.0, 3e-4, 3e-4))
cases["glon_tan"] = base("GLON-TAN", "GLAT-TAN", (359.95, 0.3), (800.0, 800.0), rot(0.0, 5e-4, 5e-4, flip=True))
sip = {"A_ORDER": 4, "B_ORDER": 4}
for p in range(5):
    for q in range(5):
        if 2 <= p + q <= 4:
            # a few pixels of distortion at the field edge, like a real camera
            sig = {2: 2e-6, 3: 1e-9, 4: 1e-12}[p + q]
            sip[f"A_{p}_{q}"] = float(rng.normal(0, sig))
            sip[f"B_{p}_{q}"] = float(rng.normal(0, sig))
cases["tan_sip_ra0"] = base("RA---TAN-SIP", "DEC--TAN-SIP", (0.03, -30.5), (751.3, 598.7), rot(2.0, 2.77e-4, 2.78e-4), sip, nx=1500, ny=1200)
tpv = {"PV1_0": 0.0, "PV1_1": 1.0, "PV1_2": 0.0, "PV1_4": 2.1e-3, "PV1_5": -1.4e-3, "PV1_6": 8e-4, "PV1_7": 0.05,
       "PV2_0": 0.0, "PV2_1": 1.0, "PV2_2": 0.0, "PV2_4": -9e-4, "PV2_5": 1.7e-3, "PV2_6": 3e-4, "PV2_7": -0.04}
cases["tpv"] = base("RA---TPV", "DEC--TPV", (36.2, -4.7), (1024.0, 2048.0), rot(90.0, 7.3e-5, 7.3e-5, flip=False), tpv, nx=2048, ny=4096)
# PC + CDELT instead of CD
pc = base("RA---TAN", "DEC--TAN", (300.0, 45.0), (100.0, -50.0), rot(-47.0, 1.0, 1.0))
for k in ("CD1_1", "CD1_2", "CD2_1", "CD2_2"):
    pc["PC" + k[2:]] = pc.pop(k)
pc.update({"CDELT1": 1.1e-4, "CDELT2": 1.1e-4})
cases["tan_pc_cdelt"] = pc

for name, kv in cases.items():
    nx, ny = kv.pop("NX"), kv.pop("NY")
    hdr = fits.Header()
    for k, v in kv.items():
        hdr[k] = v
    hdr["RADESYS"] = "ICRS"
    hdu = fits.PrimaryHDU(np.zeros((8, 8), np.float32), header=hdr)
    hdu.writeto(f"{out}/{name}.fits", overwrite=True)
    w = WCS(fits.getheader(f"{out}/{name}.fits"))
    n = 3000
    x = rng.uniform(-0.05 * nx, 1.05 * nx, n); y = rng.uniform(-0.05 * ny, 1.05 * ny, n)
    x[:4] = [0, nx - 1, 0, nx - 1]; y[:4] = [0, 0, ny - 1, ny - 1]
    ra, dec = w.all_pix2world(x, y, 0)
    np.savetxt(f"{out}/{name}.csv", np.c_[x, y, ra, dec], delimiter=",", header="x,y,ra,dec", comments="", fmt="%.17g")
    # sky points inside the field: perturb the pixel->sky points, then invert
    r2 = ra[:n // 2] + rng.normal(0, 1e-3, n // 2); d2 = dec[:n // 2] + rng.normal(0, 1e-3, n // 2)
    px, py = w.all_world2pix(r2, d2, 0, tolerance=1e-12, maxiter=200)
    np.savetxt(f"{out}/{name}.s2p.csv", np.c_[r2, d2, px, py], delimiter=",", header="RA,Dec,X,Y", comments="# astropy all_world2pix\n", fmt="%.17g")
print(f"astropy wrote {len(cases)} cases")
EOF
if [ $? -ne 0 ]; then echo "FAIL: wcs_astropy (python reference generation failed)"; exit 1; fi

if SP_WCS_ASTROPY_DIR=$DIR "$BIN" >"$DIR/live.log" 2>&1; then
  grep -E '^(ok|FAIL-CASE)|cases compared' "$DIR/live.log"
  echo "PASS: wcs_astropy"
else
  cat "$DIR/live.log"
  echo "FAIL: wcs_astropy"
fi

# control: references shifted by 5e-9 deg in Dec (beyond the 1e-9 tolerance) must be caught
mkdir -p "$DIR/ctl"
cp "$DIR/tan_cd.fits" "$DIR/ctl/"
cp "$DIR/tan_cd.s2p.csv" "$DIR/ctl/"
"$PY" - "$DIR" <<'EOF'
import sys, numpy as np
d = sys.argv[1]
a = np.loadtxt(f"{d}/tan_cd.csv", delimiter=",", skiprows=1)
a[:, 3] += 5e-9
np.savetxt(f"{d}/ctl/tan_cd.csv", a, delimiter=",", header="x,y,ra,dec", comments="", fmt="%.17g")
EOF
if SP_WCS_ASTROPY_DIR=$DIR/ctl "$BIN" >"$DIR/ctl.log" 2>&1; then
  cat "$DIR/ctl.log"
  echo "FAIL: wcs_astropy_control (a 5e-9 deg error went unnoticed)"
else
  echo "PASS: wcs_astropy_control"
fi

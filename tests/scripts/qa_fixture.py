#!/usr/bin/python3
"""qa_fixture.py STORE SIMDIR — fill a copy of a tiny-tile store with everything `surveyproc qa`
can draw, in the layout docs/qa.md describes, so the test exercises every figure before the
pipeline writes these datasets itself:

  fit columns     FLUX_<b>_fit = truth + noise of the aperture error, FLUXERR_<b>_fit, CONVERGED = 1
  /epsf/<b>       the simulator's true PSF at each cell (truth_psf/<b>.fits), nstars, one fallback cell
  /epsf/<b>_growth_r [n], /epsf/<b>_growth_ee [ncy, ncx, n]
  /epsf/moffat_field [nb, 76]  a fitted band-wide Moffat per band (FWHM 3.5 px, varying 3-8% over the tile)
  /qa/epsf/<b>/stars, /qa/epsf/<b>/resid [N, s, s], /qa/epsf/<b>/cell [N]
  /qa/background/<b>, /qa/background/<b>_rms [my, mx] (tile mesh)
  /qa/patch_overview/{data,model,resid} [npatch, nband, h, w] + patch [npatch]
  /qa/cutouts/{data,model,resid} [nsrc, nband, s, s] + row [nsrc]

Not a model of the pipeline's numbers: "models" are smoothed data. Then `surveyproc zp` fills /zp.
"""
import csv
import sys

import h5py
import numpy as np
from astropy.io import fits

store, simdir = sys.argv[1:3]
rng = np.random.default_rng(5)
f = h5py.File(store, "r+")
# the run writes most of these itself now (docs/qa.md); the fixture replaces them with its own
# known content, in every layout the reader accepts
if "qa" in f:
    del f["qa"]
for n in [k for k in f["epsf"] if k.endswith(("_growth_r", "_growth_ee", "_resid"))]:
    del f["epsf"][n]
bands = f.attrs["bands"].split(",")
nx, ny = int(f.attrs["tile_nx"]), int(f.attrs["tile_ny"])
cat = f["catalog"][:]
truth = {r["id"]: r for r in csv.DictReader(open(simdir + "/truth.csv"))}
act = cat["excluded_any"] == 0
for b in bands:
    tf = np.array([float(truth.get(i.decode(), {}).get("flux_" + b, "nan")) for i in cat["ID"]])
    err = np.where(np.isfinite(cat["FLUXERR_%s_APER" % b]), cat["FLUXERR_%s_APER" % b], 0.1)
    cat["FLUX_%s_fit" % b] = np.where(act, tf + rng.normal(0, 1, len(cat)) * err * 0.8, np.nan)
    cat["FLUXERR_%s_fit" % b] = np.where(act, err * 0.8, np.nan)
cat["CONVERGED"] = np.where(act, 1, -1)
cat["X_FIT"], cat["Y_FIT"] = cat["X_INPUT"], cat["Y_INPUT"]
cat["RA_FIT"], cat["DEC_FIT"] = cat["RA"], cat["DEC"]
f["catalog"][...] = cat

# ePSFs from the true PSF stamps (PSFNGRID x PSFNGRID stamps of PSFSIZE), padded to the cube's size
for b in bands:
    cube = f["epsf/" + b]
    ncy, ncx, sz, _ = cube.shape
    with fits.open("%s/truth_psf/%s.fits" % (simdir, b)) as h:
        img, n, ps = h[0].data.astype(np.float32), h[0].header["PSFNGRID"], h[0].header["PSFSIZE"]
    out = np.zeros(cube.shape, np.float32)
    pad = (sz - ps) // 2
    for iy in range(ncy):
        for ix in range(ncx):
            st = img[(iy % n) * ps:(iy % n + 1) * ps, (ix % n) * ps:(ix % n + 1) * ps]
            out[iy, ix, pad:pad + ps, pad:pad + ps] = st / st.sum()
    cube[...] = out
    with fits.open("%s/truth_psf/%s.fits" % (simdir, b)) as h:
        tnx, tny = h[0].header["TILENX"], h[0].header["TILENY"]
    row = np.full(76, np.nan)
    row[0], row[1:5], row[5], row[6] = 1, [2, 1, 2, 2], 64, 60
    row[7], row[8], row[9], row[10], row[11] = (tnx - 1) / 2, (tny - 1) / 2, max(tnx, tny) / 2, 1.02, 3.5
    row[12:16] = [10, tnx - 10, 10, tny - 10]
    coef = np.zeros((4, 15))
    coef[0, :6] = [np.log(3.5), 0.03, 0.02, 0.04, 0.0, 0.04]
    coef[1, :3] = [np.log(2.0), 0.1, 0.0]
    coef[2, 1], coef[3, 2] = 0.02, 0.01
    row[16:] = coef.ravel()
    if "epsf/moffat_field" not in f:
        f.create_dataset("epsf/moffat_field", data=np.full((len(bands), 76), np.nan))
    f["epsf/moffat_field"][bands.index(b)] = row
    f["epsf/%s_nstars" % b][...] = rng.integers(5, 30, (ncy, ncx))
    fb = np.zeros((ncy, ncx), np.int32)
    fb[0, -1] = 1
    f["epsf/%s_fallback" % b][...] = fb
    r = np.arange(1, sz // 2 + 1, dtype=np.float64)
    yy, xx = np.mgrid[:sz, :sz] - sz // 2
    rr = np.hypot(xx, yy)
    ee = np.array([[[out[iy, ix][rr <= rk].sum() for rk in r] for ix in range(ncx)] for iy in range(ncy)])
    f.create_dataset("epsf/%s_growth_r" % b, data=r)
    f.create_dataset("epsf/%s_growth_ee" % b, data=ee)
    nst = 12
    stars = np.repeat(out.reshape(-1, sz, sz)[:1], nst, axis=0) * rng.uniform(0.9, 1.1, (nst, 1, 1))
    stars += rng.normal(0, 2e-4, stars.shape)
    g = f.require_group("qa/epsf/" + b)
    g.create_dataset("stars", data=stars.astype(np.float32))
    g.create_dataset("resid", data=(stars - out.reshape(-1, sz, sz)[:1]).astype(np.float32))
    g.create_dataset("cell", data=np.arange(nst) % (ncx * ncy))
    yy, xx = np.mgrid[:ny // 16, :nx // 16]
    f.create_dataset("qa/background/" + b, data=(0.02 * xx + 0.01 * yy + rng.normal(0, 0.05, xx.shape)).astype(np.float32))
    f.create_dataset("qa/background/%s_rms" % b, data=(4 + 0.01 * yy).astype(np.float32))

# data from the frames; "model" = 3x3-smoothed data
frames = f["frames"][:]
tile = {}
for fr in frames:
    with fits.open(fr["path"].decode()) as h:
        tile[fr["band"].decode()] = h[0].data.astype(np.float32) * fr["scale"]


def smooth(a):
    p = np.pad(a, 1, mode="edge")
    return sum(p[i:i + a.shape[0], j:j + a.shape[1]] for i in range(3) for j in range(3)) / 9.0


pt = f["patches"][:]
sel = pt[pt["nsrc"] > 0][:8]
h0 = int((sel["by1"] - sel["by0"]).max()); w0 = int((sel["bx1"] - sel["bx0"]).max())
d = np.full((len(sel), len(bands), h0, w0), np.nan, np.float32)
for i, p in enumerate(sel):
    for j, b in enumerate(bands):
        a = tile[b][p["by0"]:p["by1"], p["bx0"]:p["bx1"]]
        d[i, j, :a.shape[0], :a.shape[1]] = a
m = np.array([[smooth(np.nan_to_num(x)) for x in y] for y in d], np.float32)
g = f.require_group("qa/patch_overview")
g.create_dataset("data", data=d); g.create_dataset("model", data=m); g.create_dataset("resid", data=d - m)
g.create_dataset("patch", data=sel["id"])

rows = np.flatnonzero(act)[:10]
cs = 32
d = np.full((len(rows), len(bands), cs, cs), np.nan, np.float32)
for i, r in enumerate(rows):
    x, y = int(round(cat["X_INPUT"][r])), int(round(cat["Y_INPUT"][r]))
    for j, b in enumerate(bands):
        x0, y0 = max(0, x - cs // 2), max(0, y - cs // 2)
        a = tile[b][y0:y0 + cs, x0:x0 + cs]
        d[i, j, :a.shape[0], :a.shape[1]] = a
m = np.array([[smooth(np.nan_to_num(x)) for x in y] for y in d], np.float32)
g = f.require_group("qa/cutouts")
g.create_dataset("data", data=d); g.create_dataset("model", data=m); g.create_dataset("resid", data=d - m)
g.create_dataset("row", data=rows.astype(np.int64))
f.close()

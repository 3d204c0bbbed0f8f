#!/usr/bin/python3
"""detect_compare.py SIMDIR OUT.json [--bin build/rel/bench/detect_check] [--frames N]

Detection completeness of ours against source-extractor on the same simulated frames (issue 5:
"detection completeness at SNR > 10 at least that of source-extractor on the same frame").

Per frame (the first N of the image list, one per band):
  ours   build/rel/bench/detect_check: background mesh (64 px, source-masked) + RMS map, Gaussian
         matched filter of the FWHM the pipeline starts from (`epsf.fallback_fwhm_pix` of the tile's
         config, default 3.5 px), thresh 5 filtered-noise sigma, minarea 5, deblending on;
  sextr  source-extractor 2.25 with its defaults (DETECT_THRESH 1.5, DETECT_MINAREA 5, default.conv,
         DEBLEND_NTHRESH 32 / MINCONT 0.005, BACK_SIZE 64), and again with a Gaussian filter of the
         same FWHM (gauss_*.conv closest to it) — whichever is more complete is reported as its best.
Truth: truth.csv fluxes (zp_ref system -> ADU with the frame's ZP_AUTO) and the true PSF
(truth_psf/<band>.fits, the node of the source's grid cell): SNR = F / sqrt(F / EGAIN + SKYSIG^2 Neff), Neff = 1 / sum p^2
for stars; galaxies: Neff of a Gaussian of variance sigma_psf^2 + (Re / 1.1774)^2 (an approximation,
stated as such). Sample: SNR > 10, truth flags without saturated (1), bad pixels (2), edge (4);
"isolated" also without crowded (8) and cluster (16). A truth source is detected when a detection
lies within max(1.5, 0.5 FWHM) px (one detection per truth source, brightest first). False: a
detection with no truth source of any flux within 2 px.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
from astropy.io import fits
from scipy.spatial import cKDTree


def read_truth(simdir):
    t = np.genfromtxt(os.path.join(simdir, "truth.csv"), delimiter=",", names=True, dtype=None, encoding="utf-8")
    return t


def neff_star(psf):
    p = psf / psf.sum()
    return 1.0 / float((p * p).sum())


def psf_nodes(simdir, band):
    path = os.path.join(simdir, "truth_psf", band + ".fits")
    with fits.open(path) as h:
        mos = np.asarray(h[0].data, dtype=float)
        hd = h[0].header
    ng, S = int(hd["PSFNGRID"]), int(hd["PSFSIZE"])  # a mosaic: stamp (i, j) at rows j*S.., columns i*S..
    cube = np.array([mos[j * S:(j + 1) * S, i * S:(i + 1) * S] for j in range(ng) for i in range(ng)])
    return cube, ng, hd


def fallback_fwhm(simdir):
    txt = open(os.path.join(simdir, "config.yaml")).read()
    m = re.search(r"fallback_fwhm_pix:\s*([0-9.]+)", txt)
    return float(m.group(1)) if m else 3.5


def match(tx, ty, order, dx, dy, rad):
    """Greedy one-to-one: truth sources in `order` (brightest first) take the nearest free detection."""
    got = np.zeros(len(tx), bool)
    if len(dx) == 0:
        return got
    tree = cKDTree(np.c_[dx, dy])
    used = np.zeros(len(dx), bool)
    for i in order:
        for j in tree.query_ball_point([tx[i], ty[i]], rad):
            if not used[j]:
                used[j] = True
                got[i] = True
                break
    return got


def run_sextractor(img, tmp, conv, fwhm):
    cat = os.path.join(tmp, "se.cat")
    par = os.path.join(tmp, "se.param")
    open(par, "w").write("X_IMAGE\nY_IMAGE\nFLUX_AUTO\nFLAGS\n")
    cmd = ["source-extractor", img, "-c", "/dev/null", "-CATALOG_NAME", cat, "-CATALOG_TYPE", "ASCII",
           "-PARAMETERS_NAME", par, "-FILTER", "Y", "-FILTER_NAME", conv, "-NTHREADS", "1", "-VERBOSE_TYPE",
           "QUIET", "-BACK_SIZE", "64", "-DETECT_THRESH", "1.5", "-DETECT_MINAREA", "5", "-SEEING_FWHM",
           "%.3f" % fwhm, "-STARNNW_NAME", "/usr/share/source-extractor/default.nnw", "-CHECKIMAGE_TYPE", "NONE"]
    t0 = time.process_time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    cpu = time.process_time() - t0
    ru = os.times()
    if r.returncode != 0:
        raise SystemExit("source-extractor failed: %s" % r.stderr[-1000:])
    d = np.loadtxt(cat, ndmin=2)
    if d.size == 0:
        return np.zeros(0), np.zeros(0), cpu
    return d[:, 0] - 1.0, d[:, 1] - 1.0, cpu  # 1-based -> 0-based pixel centres


def best_gauss_conv(fwhm):
    best, bd = None, 1e9
    for f in os.listdir("/usr/share/source-extractor"):
        m = re.match(r"gauss_([0-9.]+)_(\d+)x\d+\.conv$", f)
        if m and abs(float(m.group(1)) - fwhm) < bd - 1e-9:
            best, bd = f, abs(float(m.group(1)) - fwhm)
    return os.path.join("/usr/share/source-extractor", best) if best else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("simdir")
    ap.add_argument("out")
    ap.add_argument("--bin", default="build/rel/bench/detect_check")
    ap.add_argument("--frames", type=int, default=99)
    a = ap.parse_args()
    t = read_truth(a.simdir)
    frames = [l.split("#")[0].strip() for l in open(os.path.join(a.simdir, "image_list.txt"))]
    frames = [os.path.join(a.simdir, f) for f in frames if f]
    seen, todo = set(), []
    for f in frames:
        b = fits.getheader(f)["FILTER"].strip()
        if b not in seen:
            seen.add(b)
            todo.append((f, b))
    todo = todo[: a.frames]
    fw_cfg = fallback_fwhm(a.simdir)
    res = dict(simdir=a.simdir, fallback_fwhm_pix=fw_cfg, frames=[])
    for path, band in todo:
        h = fits.getheader(path)
        nx, ny = h["NAXIS1"], h["NAXIS2"]
        scale = 10 ** (0.4 * (float(h["ZP_AUTO"]) - 25.0))
        F = np.asarray(t["flux_" + band], float) * scale
        cube, ng, ph = psf_nodes(a.simdir, band)
        # nearest node per source
        ix = np.clip(np.floor((t["x"] + 0.5) * ng / nx).astype(int), 0, ng - 1)  # node (i + 0.5) nx / ng - 0.5
        iy = np.clip(np.floor((t["y"] + 0.5) * ng / ny).astype(int), 0, ng - 1)
        ne = np.array([neff_star(cube[k]) for k in range(cube.shape[0])])
        neff = ne[iy * ng + ix]
        sig_psf2 = neff / (4 * np.pi)  # a Gaussian of variance s^2 has Neff = 4 pi s^2
        isgal = np.array([str(x).strip() != "STAR" for x in t["type"]])
        re_ = np.asarray(t["re"], float)
        neff = np.where(isgal, 4 * np.pi * (sig_psf2 + (re_ / 1.1774) ** 2), neff)
        snr = F / np.sqrt(np.maximum(F, 0) / float(h["EGAIN"]) + float(h["SKYSIG"]) ** 2 * neff)
        fl = np.asarray(t["flags"], int)
        fwhm_true = 2.3548 * float(np.sqrt(np.median(sig_psf2)))
        sample = (snr > 10) & ((fl & 7) == 0)
        iso = sample & ((fl & 24) == 0)
        order = np.argsort(-F)
        rad = max(1.5, 0.5 * fwhm_true)
        fr = dict(frame=os.path.relpath(path, a.simdir), band=band, n_snr10=int(sample.sum()),
                  n_snr10_isolated=int(iso.sum()), match_radius=rad, fwhm_psf_approx=fwhm_true, codes={})
        with tempfile.TemporaryDirectory() as tmp:
            runs = []
            oc = os.path.join(tmp, "ours.csv")
            t0 = time.time()
            r = subprocess.run([a.bin, path, oc, "5", "5", "%.3f" % fw_cfg, "1"], capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit("detect_check failed: %s" % r.stderr)
            info = json.loads(r.stdout.strip().splitlines()[-1])
            d = np.genfromtxt(oc, delimiter=",", names=True)
            d = np.atleast_1d(d)
            runs.append(("ours (fwhm %.2f, 5 sigma, minarea 5)" % fw_cfg, "ours", d["x"], d["y"],
                         info["cpu_background"] + info["cpu_detect"]))
            for conv, lab in (("/usr/share/source-extractor/default.conv", "default.conv"),
                              (best_gauss_conv(fw_cfg), None)):
                if not conv:
                    continue
                sx, sy, cpu = run_sextractor(path, tmp, conv, fw_cfg)
                runs.append(("source-extractor (%s, 1.5 sigma, minarea 5)" % (lab or os.path.basename(conv)),
                             "sextractor", sx, sy, None))
            for name, code, dx, dy, cpu in runs:
                got = match(t["x"], t["y"], order, dx, dy, rad)
                # false: no truth source within 2 px
                tt = cKDTree(np.c_[t["x"], t["y"]])
                dd, _ = tt.query(np.c_[dx, dy]) if len(dx) else (np.zeros(0), None)
                inside = (dx > 8) & (dx < nx - 9) & (dy > 8) & (dy < ny - 9)
                fr["codes"][name] = dict(code=code, ndet=int(len(dx)), complete=float(got[sample].mean()),
                                         complete_isolated=float(got[iso].mean()),
                                         missed=int((~got[sample]).sum()),
                                         false=int(((dd > 2.0) & inside).sum()), cpu=cpu)
        res["frames"].append(fr)
        print("%s: %d sources SNR>10 (%d isolated)" % (band, fr["n_snr10"], fr["n_snr10_isolated"]))
        for k, v in fr["codes"].items():
            print("   %-55s complete %.4f (isolated %.4f)  missed %d  false %d  detections %d" %
                  (k, v["complete"], v["complete_isolated"], v["missed"], v["false"], v["ndet"]))
    json.dump(res, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()

#!/usr/bin/python3
"""peers.py — the peer photometry codes on a simulated tile, timed, with their outputs written as a
minimal surveyproc-like store so that `surveyproc score` measures them with exactly the same
definitions (docs/scoring.md) as our own store.

    peers.py sep|photutils|sextractor SIMDIR OUTDIR [--box N]

Writes OUTDIR/<peer>.h5 (/catalog with ID, excluded_any, CONVERGED, FIT_FLAGS, X_FIT, Y_FIT and
FLUX_<b>_fit / FLUXERR_<b>_fit, or FLUX_<b>_APER / FLUXERR_<b>_APER / APER_FLAGS_<b> for sep;
root attributes bands, zp_ref) and OUTDIR/<peer>.json (wall and CPU seconds per step, counts).

ePSF fidelity (photutils, sextractor): the peer's PSF model against the simulator's true PSF at
the nodes of SIMDIR/truth_psf/<band>.fits, on the same image-pixel stamp (PSFSIZE, both unit
sum there), relres = ||m - t|| / ||t|| as in issue 5 and tests/bench/epsf_check.c; JSON key
epsf_relres: per band the median and max over the nodes and the max over the 4 corner nodes.
photutils' EPSFBuilder gives one PSF per frame (compared at every node); PSFEx's degree-2
model is evaluated at each node (frame pixel = tile pixel, as the simulator writes them).

Every peer works frame by frame (none of them coadds); fluxes are scaled to zp_ref = 25 with the
frame's ZP_AUTO, as our pipeline does, and the frames of a band are combined by the
inverse-variance weighted mean (error 1/sqrt(sum w)). Only catalog rows a peer measured are
written; the scorer counts the others as unmatched (match_rate < 1).

  sep         sep.Background (64 px mesh, NaN masked) + subtract + sep.extract (1.5 sigma) per frame,
              then forced circular apertures (r = 5 pix, our patch_run.r_ap) at the catalog
              positions with the background rms map and EGAIN: scored as aperture fluxes with the
              true-PSF aperture correction (score --flux aper --aper-correct 5).
  photutils   Background2D (64 px mesh, median) subtracted; EPSFBuilder (oversampling 2, 10
              iterations, norm_radius 14) on the 60 brightest isolated unsaturated catalog stars; forced PSF
              photometry (BasicPSFPhotometry, LevMarLSQFitter, DAOGroup 2 FWHM, positions fixed at
              the catalog's) of every catalog source inside a central box of --box pixels (it is too
              slow for a whole tile). photutils 1.6 takes no error map: its flux_unc is the
              fitter's covariance scaled by the residuals.
  sextractor  SExtractor pass 1 (FITS_LDAC vignettes) -> PSFEx (PSFVAR_DEGREES 2) -> SExtractor
              pass 2 with the PSF model: FLUX_PSF / FLUXERR_PSF, GAIN = EGAIN, SATUR_LEVEL =
              SATURATE, NaN pixels given weight 0 (MAP_WEIGHT); detections associated with the
              catalog (ASSOC, nearest within 2 pix) to get the ID. Detection-based, not forced:
              undetected sources are unmatched. NTHREADS 1.
"""
import json
import os
import resource
import subprocess
import sys
import time

import h5py
import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

ZP_REF = 25.0
R_AP = 5.0


class Clock:
    """wall and CPU (self + children) seconds of named steps"""

    def __init__(self):
        self.steps = {}

    def cpu(self):
        s = resource.getrusage(resource.RUSAGE_SELF)
        c = resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

    def start(self):
        return (time.perf_counter(), self.cpu())

    def stop(self, name, t):
        w, c = time.perf_counter() - t[0], self.cpu() - t[1]
        d = self.steps.setdefault(name, [0.0, 0.0])
        d[0] += w
        d[1] += c


def read_sim(simdir):
    frames = []
    with open(os.path.join(simdir, "image_list.txt")) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line:
                p = line if os.path.isabs(line) else os.path.join(simdir, line)
                h = fits.getheader(p)
                frames.append(dict(path=p, band=h["FILTER"].strip(), zp=float(h["ZP_AUTO"]),
                                   skysig=float(h["SKYSIG"]), egain=float(h["EGAIN"]),
                                   satur=float(h.get("SATURATE", 6e4)), nx=h["NAXIS1"], ny=h["NAXIS2"],
                                   scale=10 ** (-0.4 * (float(h["ZP_AUTO"]) - ZP_REF))))
    bands = []
    for fr in frames:
        if fr["band"] not in bands:
            bands.append(fr["band"])
    cat = np.genfromtxt(os.path.join(simdir, "input_catalog.csv"), delimiter=",", names=True, dtype=None,
                        encoding="utf-8")
    return frames, bands, cat


def truth_nodes(simdir, band):
    """[(x, y, stamp)] of the true PSF at the nodes of truth_psf/<band>.fits (tile pixels, 0-based)"""
    h = fits.open(os.path.join(simdir, "truth_psf", band + ".fits"))
    d, hd = h[0].data.astype(float), h[0].header
    ng, S, nx, ny = hd["PSFNGRID"], hd["PSFSIZE"], hd["TILENX"], hd["TILENY"]
    out = []
    for gj in range(ng):
        for gi in range(ng):
            out.append(((gi + 0.5) * nx / ng - 0.5, (gj + 0.5) * ny / ng - 0.5, gi in (0, ng - 1) and gj in (0, ng - 1),
                        d[gj * S:(gj + 1) * S, gi * S:(gi + 1) * S]))
    return out


def relres(m, t, recentre=False):
    """||m - t|| / ||t||, both unit sum; recentre: m first shifted (cubic spline) so that its
    centroid within 2 x the truth's FWHM-ish radius (6 pix) is the truth's (a peer that fits
    positions is not hurt by an offset model centre)"""
    m = m / m.sum()
    t = t / t.sum()
    if recentre:
        from scipy.ndimage import shift
        S = t.shape[0]
        o = np.arange(S) - (S - 1) / 2.0
        yy, xx = np.meshgrid(o, o, indexing="ij")
        w = (xx ** 2 + yy ** 2) < 36.0
        def cen(a):
            a = np.where(w, a, 0.0)
            return (a * xx).sum() / a.sum(), (a * yy).sum() / a.sum()
        for _ in range(3):
            (mx, my), (tx, ty) = cen(m), cen(t)
            m = shift(m, (ty - my, tx - mx), order=3, mode="constant")
        m = m / m.sum()
    return float(np.sqrt(((m - t) ** 2).sum() / (t ** 2).sum()))


def relres_summary(rr, corner):
    """rr: [(relres, relres recentred)] per node"""
    rr, corner = np.asarray(rr), np.asarray(corner, bool)
    out = dict(nodes=int(len(rr)))
    for k, tag in ((0, ""), (1, "_recentred")):
        out["median" + tag] = float(np.median(rr[:, k]))
        out["max" + tag] = float(rr[:, k].max())
        out["corners_max" + tag] = float(rr[corner, k].max()) if corner.any() else None
    return out


def psfex_eval(psf_path, x, y, S):
    """PSFEx model (.psf: PSF_MASK polynomial in X_IMAGE, Y_IMAGE, 1-based) at 0-based frame pixel
    (x, y), sampled at image pixels on an S x S stamp centred on the source (cubic resampling
    of the PSF_SAMP grid)"""
    from scipy.ndimage import map_coordinates
    h = fits.open(psf_path)[1]
    hd = h.header
    mask = np.asarray(h.data["PSF_MASK"][0], float)  # (ncoeff, ny, nx)
    deg = int(hd.get("POLDEG1", 0))
    u = (x + 1 - hd.get("POLZERO1", 0.0)) / hd.get("POLSCAL1", 1.0)
    v = (y + 1 - hd.get("POLZERO2", 0.0)) / hd.get("POLSCAL2", 1.0)
    terms = [u ** i * v ** j for j in range(deg + 1) for i in range(deg + 1 - j)]  # PSFEx order: x fastest
    img = np.tensordot(np.asarray(terms[:mask.shape[0]]), mask, axes=1)
    samp = float(hd.get("PSF_SAMP", 1.0))
    cx, cy = img.shape[1] // 2, img.shape[0] // 2  # PSFEx centres the model on sample (n/2, n/2)
    off = np.arange(S) - (S - 1) / 2.0
    yy, xx = np.meshgrid(off / samp + cy, off / samp + cx, indexing="ij")
    return map_coordinates(img, [yy, xx], order=3, mode="constant", cval=0.0)


def cat_pixels(cat, path):
    """0-based pixel positions of the catalog in a frame (its TAN-SIP WCS)"""
    w = WCS(fits.getheader(path))
    x, y = w.all_world2pix(cat["RA"], cat["DEC"], 0)
    return x, y


def combine(frames, bands, per_frame, n):
    """per_frame[k] = (flux_adu, err_adu) arrays of length n (NaN: not measured); inverse-variance
    weighted mean over the frames of each band, in zp_ref units"""
    out = {}
    for b in bands:
        sw = np.zeros(n)
        swf = np.zeros(n)
        for k, fr in enumerate(frames):
            if fr["band"] != b or per_frame[k] is None:
                continue
            f, e = per_frame[k]
            f = f * fr["scale"]
            e = e * fr["scale"]
            ok = np.isfinite(f) & np.isfinite(e) & (e > 0)
            w = np.where(ok, 1.0 / np.where(ok, e, 1.0) ** 2, 0.0)
            sw += w
            swf += np.where(ok, w * np.where(ok, f, 0.0), 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[b] = (np.where(sw > 0, swf / sw, np.nan), np.where(sw > 0, 1.0 / np.sqrt(sw), np.nan))
    return out


def write_store(path, cat, rows, bands, fluxes, kind, x=None, y=None, conv=None, aflags=None):
    """a /catalog that `surveyproc score` reads; rows: indices of the catalog rows to write"""
    n = len(rows)
    cols = [("ID", "S24"), ("excluded_any", "i1"), ("CONVERGED", "i1"), ("FIT_FLAGS", "i4"),
            ("X_FIT", "f8"), ("Y_FIT", "f8")]
    suf = "fit" if kind == "fit" else "APER"
    for b in bands:
        cols += [("FLUX_%s_%s" % (b, suf), "f8"), ("FLUXERR_%s_%s" % (b, suf), "f8")]
        if kind == "aper":
            cols += [("APER_FLAGS_%s" % b, "i4")]
    t = np.zeros(n, dtype=cols)
    t["ID"] = np.array([str(v) for v in cat["ID"][rows]], dtype="S24")
    t["CONVERGED"] = 1 if conv is None else conv[rows]
    t["X_FIT"] = np.nan if x is None else x[rows]
    t["Y_FIT"] = np.nan if y is None else y[rows]
    for b in bands:
        f, e = fluxes[b]
        t["FLUX_%s_%s" % (b, suf)] = f[rows]
        t["FLUXERR_%s_%s" % (b, suf)] = e[rows]
        if kind == "aper":
            t["APER_FLAGS_%s" % b] = 0 if aflags is None else aflags[b][rows]
    tmp = path + ".tmp"
    with h5py.File(tmp, "w") as h:
        h.attrs["bands"] = ",".join(bands)
        h.attrs["zp_ref"] = ZP_REF
        h.create_dataset("catalog", data=t)
    os.replace(tmp, path)


def load_frame(fr):
    return fits.getdata(fr["path"]).astype(np.float32)


# ---------------------------------------------------------------------------------------------------


def run_sep(simdir, outdir, args):
    import sep
    clk = Clock()
    frames, bands, cat = read_sim(simdir)
    n = len(cat)
    per = []
    ndet = 0
    npix = 0
    aflags = {b: np.zeros(n, dtype=np.int32) for b in bands}
    for fr in frames:
        t = clk.start()
        data = load_frame(fr)
        clk.stop("read", t)
        x, y = cat_pixels(cat, fr["path"])
        npix += data.size
        t = clk.start()
        mask = ~np.isfinite(data)
        data = np.where(mask, 0, data).astype(np.float32)
        bkg = sep.Background(data, mask=mask, bw=64, bh=64, fw=3, fh=3)
        bkg.subfrom(data)
        clk.stop("background", t)
        t = clk.start()
        sep.set_extract_pixstack(3000000)
        sep.set_sub_object_limit(4096)
        obj = sep.extract(data, 1.5, err=bkg.globalrms, mask=mask, minarea=5)
        ndet += len(obj)
        clk.stop("extract", t)
        t = clk.start()
        inside = (x > R_AP) & (y > R_AP) & (x < fr["nx"] - 1 - R_AP) & (y < fr["ny"] - 1 - R_AP)
        f = np.full(n, np.nan)
        e = np.full(n, np.nan)
        ff, ee, fl = sep.sum_circle(data, x[inside], y[inside], R_AP, err=bkg.rms(), gain=fr["egain"], mask=mask)
        f[inside] = ff
        e[inside] = ee
        aflags[fr["band"]][np.flatnonzero(inside)] |= (fl != 0).astype(np.int32) * 2
        per.append((f, e))
        clk.stop("forced_aper", t)
    fluxes = combine(frames, bands, per, n)
    rows = np.flatnonzero(np.any([np.isfinite(fluxes[b][0]) for b in bands], axis=0))
    write_store(os.path.join(outdir, "sep.h5"), cat, rows, bands, fluxes, "aper", aflags=aflags)
    return dict(peer="sep", version=sep.__version__, steps=clk.steps, nframes=len(frames), nbands=len(bands),
                npix=npix, ndetected=ndet, nsources=int(len(rows)), nsource_frames=int(len(rows)) * len(frames))


def run_photutils(simdir, outdir, args):
    import warnings

    import photutils
    from astropy.modeling.fitting import LevMarLSQFitter
    from astropy.nddata import NDData
    from astropy.table import Table
    from photutils.background import Background2D, MedianBackground
    from photutils.psf import BasicPSFPhotometry, DAOGroup, EPSFBuilder, extract_stars
    warnings.filterwarnings("ignore")
    sys.setrecursionlimit(100000)  # photutils 1.6 nests one compound model per group member: crowded groups recurse deeply
    clk = Clock()
    frames, bands, cat = read_sim(simdir)
    n = len(cat)
    box = args.box
    per = []
    fid = {}
    nfit = 0
    conv = np.zeros(n, dtype=np.int8)
    inbox_any = np.zeros(n, bool)
    for fr in frames:
        t = clk.start()
        data = load_frame(fr)
        clk.stop("read", t)
        x, y = cat_pixels(cat, fr["path"])
        nx, ny = fr["nx"], fr["ny"]
        b = min(box, nx, ny)
        x0, y0 = (nx - b) // 2, (ny - b) // 2
        inbox = (x >= x0) & (x < x0 + b) & (y >= y0) & (y < y0 + b)
        inbox_any |= inbox
        t = clk.start()
        mask = ~np.isfinite(data)
        bk = Background2D(np.where(mask, 0, data), 64, mask=mask, filter_size=3, bkg_estimator=MedianBackground())
        sub = np.where(mask, 0, data - bk.background)
        clk.stop("background", t)
        # PSF stars: catalog STARs, bright, isolated (no catalog neighbour within 15 pix), away from
        # the edges and from bad pixels, nearest the box centre
        t = clk.start()
        isstar = np.array([str(v).strip().upper() == "STAR" for v in cat["TYPE"]])
        fl = cat["FLUX_" + fr["band"]] / fr["scale"]
        cand = np.flatnonzero(isstar & (x > 20) & (y > 20) & (x < nx - 21) & (y < ny - 21) &
                              (fl > 100 * fr["skysig"]) & (fl < 7 * fr["satur"]))
        from scipy.spatial import cKDTree
        tree = cKDTree(np.c_[x, y])
        iso = [i for i in cand if len(tree.query_ball_point([x[i], y[i]], 15.0)) == 1]
        iso = [i for i in iso if not mask[int(y[i]) - 15:int(y[i]) + 16, int(x[i]) - 15:int(x[i]) + 16].any()]
        iso = sorted(iso, key=lambda i: -fl[i])[:60]
        stars = extract_stars(NDData(data=sub), Table(dict(x=x[iso], y=y[iso])), size=31)
        epsf, _ = EPSFBuilder(oversampling=2, maxiters=10, norm_radius=14, progress_bar=False)(stars)
        clk.stop("epsf", t)
        nodes = truth_nodes(simdir, fr["band"])
        S = nodes[0][3].shape[0]
        off = np.arange(S) - (S - 1) / 2.0
        gx, gy = np.meshgrid(off, off)
        m = epsf.evaluate(gx, gy, flux=1.0, x_0=0.0, y_0=0.0)
        fid.setdefault(fr["band"], []).append(([(relres(m, t), relres(m, t, True)) for (_, _, _, t) in nodes],
                                               [c for (_, _, c, _) in nodes]))
        t = clk.start()
        sel = np.flatnonzero(inbox)
        pad = 20
        cx0, cy0 = max(0, x0 - pad), max(0, y0 - pad)
        cut = sub[cy0:min(ny, y0 + b + pad), cx0:min(nx, x0 + b + pad)]
        cmask = mask[cy0:min(ny, y0 + b + pad), cx0:min(nx, x0 + b + pad)]
        psf = epsf.copy()
        psf.x_0.fixed = True
        psf.y_0.fixed = True
        init = Table(dict(id=np.arange(len(sel)) + 1, x_0=x[sel] - cx0, y_0=y[sel] - cy0,
                          flux_0=np.nan_to_num(fl[sel], nan=100.0)))
        phot = BasicPSFPhotometry(group_maker=DAOGroup(8.0), bkg_estimator=None, psf_model=psf, fitshape=(11, 11),
                                  fitter=LevMarLSQFitter())
        res = phot(image=cut, init_guesses=init, mask=cmask)
        clk.stop("psf_photometry", t)
        nfit += len(sel)
        f = np.full(n, np.nan)
        e = np.full(n, np.nan)
        order = np.asarray(res["id"]) - 1
        f[sel[order]] = np.asarray(res["flux_fit"], float)
        if "flux_unc" in res.colnames:
            e[sel[order]] = np.asarray(res["flux_unc"], float)
        conv[sel[order]] = 1
        per.append((f, e))
    fluxes = combine(frames, bands, per, n)
    rows = np.flatnonzero(inbox_any)
    write_store(os.path.join(outdir, "photutils.h5"), cat, rows, bands, fluxes, "fit", conv=conv)
    return dict(peer="photutils", version=photutils.__version__, steps=clk.steps, nframes=len(frames),
                nbands=len(bands), box=box, nsources=int(len(rows)), nsource_frames=int(nfit),
                epsf_relres={b: relres_summary(sum((r for r, _ in v), []), sum((c for _, c in v), []))
                             for b, v in fid.items()})


SEX_PARAMS1 = ["VIGNET(35,35)", "X_IMAGE", "Y_IMAGE", "FLUX_RADIUS", "FLUX_APER(1)", "FLUXERR_APER(1)",
               "ELONGATION", "FLAGS", "SNR_WIN"]
SEX_PARAMS2 = ["NUMBER", "XPSF_IMAGE", "YPSF_IMAGE", "FLUX_PSF", "FLUXERR_PSF", "FLAGS", "VECTOR_ASSOC(1)",
               "NUMBER_ASSOC"]


def run_sextractor(simdir, outdir, args):
    clk = Clock()
    frames, bands, cat = read_sim(simdir)
    n = len(cat)
    wd = os.path.abspath(os.path.join(outdir, "sextractor"))
    os.makedirs(wd, exist_ok=True)
    conv_file = "/usr/share/source-extractor/default.conv"
    nnw = "/usr/share/source-extractor/default.nnw"
    with open(os.path.join(wd, "p1.param"), "w") as f:
        f.write("\n".join(SEX_PARAMS1) + "\n")
    with open(os.path.join(wd, "p2.param"), "w") as f:
        f.write("\n".join(SEX_PARAMS2) + "\n")
    per = []
    xs = np.full(n, np.nan)
    ys = np.full(n, np.nan)
    conv = np.zeros(n, dtype=np.int8)
    ndet = 0
    nmatch = 0
    fid = {}
    ver = subprocess.run(["source-extractor", "-v"], capture_output=True, text=True).stdout.strip()
    pver = subprocess.run(["psfex", "-v"], capture_output=True, text=True).stdout.strip()

    def sex(img, extra):
        cmd = ["source-extractor", img, "-c", "/dev/null", "-FILTER_NAME", conv_file, "-STARNNW_NAME", nnw,
               "-NTHREADS", "1", "-VERBOSE_TYPE", "QUIET", "-BACK_SIZE", "64", "-DETECT_THRESH", "1.5",
               "-PHOT_APERTURES", "30", "-WEIGHT_TYPE", "MAP_WEIGHT", "-WEIGHT_GAIN", "N"] + extra
        r = subprocess.run(cmd, cwd=wd, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit("source-extractor failed (%s): %s" % (" ".join(cmd), r.stderr[-2000:]))

    for k, fr in enumerate(frames):
        base = os.path.join(wd, "f%d" % k)
        x, y = cat_pixels(cat, fr["path"])
        # what a SExtractor user does with NaN pixels: 0 and weight 0
        t = clk.start()
        data = load_frame(fr)
        bad = ~np.isfinite(data)
        hdr = fits.getheader(fr["path"])
        fits.writeto(base + ".fits", np.where(bad, 0, data).astype(np.float32), hdr, overwrite=True)
        fits.writeto(base + ".weight.fits", (~bad).astype(np.float32), overwrite=True)
        clk.stop("nan_to_weight", t)
        with open(base + ".assoc", "w") as f:
            for i in range(n):
                f.write("%.4f %.4f %s\n" % (x[i] + 1, y[i] + 1, cat["ID"][i]))
        common = ["-WEIGHT_IMAGE", base + ".weight.fits", "-GAIN", "%g" % fr["egain"], "-SATUR_LEVEL",
                  "%g" % fr["satur"]]
        t = clk.start()
        sex(base + ".fits", common + ["-CATALOG_NAME", base + ".ldac", "-CATALOG_TYPE", "FITS_LDAC",
                                      "-PARAMETERS_NAME", "p1.param"])
        clk.stop("sextractor_pass1", t)
        t = clk.start()
        r = subprocess.run(["psfex", base + ".ldac", "-c", "/dev/null", "-PSFVAR_DEGREES", "2", "-PSF_SIZE", "35,35",
                            "-SAMPLE_FWHMRANGE", "2.0,10.0", "-SAMPLE_MINSN", "20", "-NTHREADS", "1",
                            "-CHECKPLOT_DEV", "NULL", "-CHECKPLOT_TYPE", "NONE", "-CHECKIMAGE_TYPE", "NONE",
                            "-WRITE_XML", "N", "-VERBOSE_TYPE", "QUIET", "-PSF_DIR", wd],
                           cwd=wd, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit("psfex failed: " + r.stderr[-2000:])
        clk.stop("psfex", t)
        nodes = truth_nodes(simdir, fr["band"])
        S = nodes[0][3].shape[0]
        rr = []
        for (xn, yn, _, t) in nodes:
            m = psfex_eval(base + ".psf", xn, yn, S)
            rr.append((relres(m, t), relres(m, t, True)))
        fid.setdefault(fr["band"], []).append((rr, [c for (_, _, c, _) in nodes]))
        t = clk.start()
        sex(base + ".fits", common + ["-CATALOG_NAME", base + ".cat.fits", "-CATALOG_TYPE", "FITS_1.0",
                                      "-PARAMETERS_NAME", "p2.param", "-PSF_NAME", base + ".psf",
                                      "-ASSOC_NAME", base + ".assoc", "-ASSOC_PARAMS", "1,2", "-ASSOC_DATA", "3",
                                      "-ASSOC_RADIUS", "2.0", "-ASSOC_TYPE", "NEAREST",
                                      "-ASSOCSELEC_TYPE", "ALL"])
        clk.stop("sextractor_pass2_psf", t)
        d = fits.getdata(base + ".cat.fits", 1)
        ndet += len(d)
        va = np.asarray(d["VECTOR_ASSOC"]).reshape(len(d), -1)[:, 0]
        m = np.asarray(d["NUMBER_ASSOC"]) > 0
        nmatch += int(m.sum())
        idx = {str(v): i for i, v in enumerate(cat["ID"])}
        f = np.full(n, np.nan)
        e = np.full(n, np.nan)
        for j in np.flatnonzero(m):
            i = idx.get(str(int(round(va[j]))))
            if i is None:
                continue
            # one detection per source: keep the nearest (ASSOC_TYPE NEAREST gives one source per
            # detection; a source may be the nearest of two detections: keep the brighter)
            if np.isfinite(f[i]) and f[i] >= d["FLUX_PSF"][j]:
                continue
            f[i] = d["FLUX_PSF"][j]
            e[i] = d["FLUXERR_PSF"][j]
            if k == 0 or not np.isfinite(xs[i]):
                xs[i] = d["XPSF_IMAGE"][j] - 1
                ys[i] = d["YPSF_IMAGE"][j] - 1
            conv[i] = 1 if (d["FLAGS"][j] < 4 and e[i] > 0) else 0
        per.append((f, e))
        for ext in (".fits", ".weight.fits"):
            os.remove(base + ext)
    fluxes = combine(frames, bands, per, n)
    rows = np.flatnonzero(np.any([np.isfinite(fluxes[b][0]) for b in bands], axis=0))
    write_store(os.path.join(outdir, "sextractor.h5"), cat, rows, bands, fluxes, "fit", x=xs, y=ys, conv=conv)
    return dict(peer="sextractor+psfex", version=ver + "; " + pver, steps=clk.steps, nframes=len(frames),
                nbands=len(bands), ndetected=ndet, nassociated=nmatch, nsources=int(len(rows)),
                nsource_frames=int(nmatch),
                epsf_relres={b: relres_summary(sum((r for r, _ in v), []), sum((c for _, c in v), []))
                             for b, v in fid.items()})


def main():
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("peer", choices=["sep", "photutils", "sextractor"])
    ap.add_argument("simdir")
    ap.add_argument("outdir")
    ap.add_argument("--box", type=int, default=512, help="photutils: side of the central box (pix)")
    a = ap.parse_args()
    os.makedirs(a.outdir, exist_ok=True)
    t0 = time.perf_counter()
    r = dict(sep=run_sep, photutils=run_photutils, sextractor=run_sextractor)[a.peer](a.simdir, a.outdir, a)
    r["wall_total"] = time.perf_counter() - t0
    r["simdir"] = a.simdir
    with open(os.path.join(a.outdir, a.peer + ".json"), "w") as f:
        json.dump(r, f, indent=1)
    print(json.dumps({k: v for k, v in r.items()}, default=str))


if __name__ == "__main__":
    main()

#!/usr/bin/python3
"""surveyproc qa STORE --out DIR: the QA report of a surveyproc store (docs/qa.md).

Draws PNG figures from what the store holds and ties them together in DIR/index.html. Every
figure is optional: it is drawn when its datasets exist (and the run's config toggle allows it),
and skipped with a note in index.html when they do not. Reads the store with h5py only; the white
stack comes from /qa/white when the store holds one, else from the frames listed in /frames
(astropy, read in row blocks so memory stays bounded).

Uses Debian's python3-numpy, python3-h5py, python3-matplotlib (Agg) and, for frames,
python3-astropy. Exit codes: 0 ok, 2 usage, 3 bad input (not HDF5 / not a surveyproc store),
4 I/O (store missing, cannot write DIR), 5 a Python package is missing or a figure failed unexpectedly.
"""
import argparse
import html
import math
import os
import re
import sys
import time
import traceback

PROG = "surveyproc qa"
EXIT_USAGE, EXIT_INPUT, EXIT_IO, EXIT_DEPS = 2, 3, 4, 5


def die(code, msg):
    sys.stderr.write("%s: %s\n" % (PROG, msg))
    sys.exit(code)


# ---- dependencies: name the Debian package that is missing --------------------------------------
_missing = []
try:
    import numpy as np
except ImportError:
    _missing.append(("numpy", "python3-numpy"))
try:
    import h5py
except ImportError:
    _missing.append(("h5py", "python3-h5py"))
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
except ImportError:
    _missing.append(("matplotlib", "python3-matplotlib"))
if _missing:
    die(EXIT_DEPS, "missing Python module%s for %s: %s; install the Debian package%s: apt-get install %s"
        % ("s" if len(_missing) > 1 else "", sys.executable, ", ".join(m for m, _ in _missing),
           "s" if len(_missing) > 1 else "", " ".join(p for _, p in _missing)))


# ---- small helpers ------------------------------------------------------------------------------
def s(v):
    """bytes / numpy bytes -> str."""
    if isinstance(v, (bytes, np.bytes_)):
        return v.decode("utf-8", "replace").rstrip("\x00")
    return str(v)


def fmt(v, nd=4):
    try:
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return "–"
        if isinstance(v, (int, np.integer)):
            return str(int(v))
        return ("%%.%dg" % nd) % float(v)
    except (TypeError, ValueError):
        return html.escape(str(v))


def parse_config(text):
    """The run's effective YAML (/provenance config) as nested dicts. PyYAML when installed, else
    a small parser for the generated format (sections, 'key: value  # comment', [lists])."""
    try:
        import yaml
        d = yaml.safe_load(text)
        if isinstance(d, dict):
            return d
    except Exception:
        pass

    def scalar(v):
        v = v.strip()
        if v.startswith('"') and v.endswith('"'):
            return v[1:-1]
        if v.startswith("[") and v.endswith("]"):
            return [scalar(x) for x in v[1:-1].split(",") if x.strip()]
        if v in ("true", "false"):
            return v == "true"
        if v in ("null", "~", ""):
            return None
        try:
            return int(v)
        except ValueError:
            pass
        try:
            return float(v)
        except ValueError:
            return v

    root, stack = {}, [(-1, None)]
    stack[0] = (-1, root)
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        body = re.sub(r'\s+#.*$', "", line) if '"' not in line else re.sub(r'("[^"]*")\s+#.*$', r"\1", line)
        ind = len(body) - len(body.lstrip())
        if ":" not in body:
            continue
        k, v = body.strip().split(":", 1)
        while stack and stack[-1][0] >= ind:
            stack.pop()
        parent = stack[-1][1]
        if v.strip() == "":
            parent[k] = {}
            stack.append((ind, parent[k]))
        else:
            parent[k] = scalar(v)
    return root


class Config:
    def __init__(self, d):
        self.d = d or {}

    def get(self, key, default):
        cur = self.d
        for part in key.split("."):
            if not isinstance(cur, dict) or part not in cur:
                return default
            cur = cur[part]
        return default if cur is None and default is not None else cur


def stretch_limits(img, plo=1.0, phi=99.5):
    v = img[np.isfinite(img)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(v, [plo, phi])
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def show_image(ax, img, extent=None, plo=1.0, phi=99.5, cmap="gray", asinh=True):
    """An image with an asinh stretch between the plo..phi percentiles (origin lower)."""
    lo, hi = stretch_limits(img, plo, phi)
    if asinh:
        med = float(np.nanmedian(img)) if np.isfinite(img).any() else 0.0
        soft = max((hi - med) / 30.0, 1e-12)
        disp = np.arcsinh((img - med) / soft)
        vmin, vmax = np.arcsinh((lo - med) / soft), np.arcsinh((hi - med) / soft)
    else:
        disp, vmin, vmax = img, lo, hi
    return ax.imshow(disp, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax, extent=extent,
                     interpolation="nearest")


def block_mean(img, k):
    """Block-average by k (NaN-aware); edge blocks that do not fill k x k are averaged as they are."""
    if k <= 1:
        return img.astype(np.float32)
    ny, nx = img.shape
    py, px = (-ny) % k, (-nx) % k
    a = np.pad(img.astype(np.float64), ((0, py), (0, px)), constant_values=np.nan)
    a = a.reshape(a.shape[0] // k, k, a.shape[1] // k, k)
    good = np.isfinite(a)
    n = good.sum(axis=(1, 3))
    tot = np.where(good, a, 0.0).sum(axis=(1, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, tot / np.maximum(n, 1), np.nan).astype(np.float32)


# ---- the report ---------------------------------------------------------------------------------
class Report:
    def __init__(self, store, out, dpi=None, max_pages=None):
        self.store_path = store
        self.out = out
        self.f = h5py.File(store, "r")
        f = self.f
        if "catalog" not in f:
            die(EXIT_INPUT, "'%s' is not a surveyproc store (no /catalog)" % store)
        self.bands = [b for b in s(f.attrs.get("bands", "")).split(",") if b]
        self.nx = int(f.attrs.get("tile_nx", 0))
        self.ny = int(f.attrs.get("tile_ny", 0))
        self.zp_ref = float(f.attrs.get("zp_ref", 25.0))
        prov = f["provenance"].attrs if "provenance" in f else {}
        self.prov = {k: prov[k] for k in prov.keys()}
        self.cfg = Config(parse_config(s(self.prov.get("config", ""))))
        self.dpi = int(dpi or self.cfg.get("plotting.dpi", 150) or 150)
        self.max_pages = max_pages
        self.cat = f["catalog"][:]
        self.sections = []   # (title, [items]); item = ("fig", file, caption) | ("note", text) | ("html", s)
        self.figures = []
        self.skipped = []
        self.paths = []
        f.visititems(lambda name, obj: self.paths.append(name) if isinstance(obj, h5py.Dataset) else None)
        self._white = None

    # -- dataset discovery: exact layout first (docs/qa.md), then by keywords in the path --
    def find(self, exact, keywords=(), band=None, exclude=()):
        for p in exact:
            p = p.strip("/")
            if p in self.f and isinstance(self.f[p], h5py.Dataset):
                return p
        if not keywords:
            return None
        for p in self.paths:
            low = p.lower()
            if not all(k in low for k in keywords):
                continue
            if any(x in low for x in exclude):
                continue
            if band is not None and not re.search(r"(^|[/_.])%s($|[/_.])" % re.escape(band.lower()), low):
                continue
            return p
        return None

    def section(self, title):
        items = []
        self.sections.append((title, items))
        return items

    def save(self, fig, name, items, caption):
        path = os.path.join(self.out, name)
        fig.savefig(path, dpi=self.dpi, bbox_inches="tight")
        plt.close(fig)
        items.append(("fig", name, caption))
        self.figures.append(name)

    def skip(self, items, what, why):
        items.append(("note", "%s: not drawn — %s." % (what, why)))
        self.skipped.append((what, why))

    # -- the white stack ---------------------------------------------------------------------
    def white_stack(self, factors, zoom):
        """Returns ({factor: image downsampled by factor}, zoom image or None, source text) or
        raises RuntimeError with why there is none. zoom = (x0, x1, y0, y1) full-resolution box."""
        p = self.find(["qa/white", "white", "qa/white_stack"], ("white",), exclude=("rms", "noise", "mask"))
        if p:
            img = self.f[p][...].astype(np.float32)
            ds = int(self.f[p].attrs.get("downsample", 1))
            out = {k: block_mean(img, max(1, k // ds)) for k in factors}
            z = None
            if zoom and ds == 1:
                x0, x1, y0, y1 = zoom
                z = img[y0:y1, x0:x1]
            return out, z, "the store's /%s%s" % (p, " (downsampled %dx)" % ds if ds > 1 else "")
        return self._white_from_frames(factors, zoom)

    def _white_from_frames(self, factors, zoom):
        if "frames" not in self.f or self.f["frames"].shape[0] == 0:
            raise RuntimeError("the store holds no white stack and no /frames")
        try:
            from astropy.io import fits
        except ImportError:
            raise RuntimeError("the store holds no white stack, and reading the frames needs astropy "
                               "(apt-get install python3-astropy)")
        fr = self.f["frames"][:]
        nx, ny = self.nx, self.ny
        acc = {k: [np.zeros(((ny + k - 1) // k, (nx + k - 1) // k)), np.zeros(((ny + k - 1) // k, (nx + k - 1) // k))]
               for k in factors}
        zacc = None
        if zoom:
            x0, x1, y0, y1 = zoom
            zacc = [np.zeros((y1 - y0, x1 - x0)), np.zeros((y1 - y0, x1 - x0))]
        used, missing = 0, []
        step = 0
        for k in factors:
            step = max(step, k)
        blk = max(1, 1024 // step) * step
        for r in fr:
            path = s(r["path"])
            if not os.path.exists(path):
                missing.append(path)
                continue
            scale = float(r["scale"]) if np.isfinite(r["scale"]) else 1.0
            sig = float(r["SKYSIG"]) * scale if np.isfinite(r["SKYSIG"]) and r["SKYSIG"] > 0 else 1.0
            w = 1.0 / (sig * sig)
            hdu = max(int(r["hdu"]) - 1, 0)
            with fits.open(path, memmap=True) as hl:
                data = hl[hdu].data
                if data is None or data.shape != (ny, nx):
                    missing.append(path + " (shape differs from the tile)")
                    continue
                for y in range(0, ny, blk):
                    chunk = np.asarray(data[y:y + blk], dtype=np.float64) * scale
                    good = np.isfinite(chunk)
                    val = np.where(good, chunk, 0.0)
                    wt = good * w
                    for k in factors:
                        a = acc[k]
                        yk = y // k
                        sv, sw = _block_sum(val * wt, k), _block_sum(wt, k)
                        a[0][yk:yk + sv.shape[0], :sv.shape[1]] += sv
                        a[1][yk:yk + sw.shape[0], :sw.shape[1]] += sw
                    if zacc is not None:
                        x0, x1, y0, y1 = zoom
                        lo, hi = max(y, y0), min(y + chunk.shape[0], y1)
                        if lo < hi:
                            zacc[0][lo - y0:hi - y0] += (val * wt)[lo - y:hi - y, x0:x1]
                            zacc[1][lo - y0:hi - y0] += wt[lo - y:hi - y, x0:x1]
            used += 1
        if used == 0:
            raise RuntimeError("the store holds no white stack and none of its %d frames can be read (%s)"
                               % (len(fr), ", ".join(missing[:3])))
        with np.errstate(invalid="ignore", divide="ignore"):
            out = {k: (a[0] / a[1]).astype(np.float32) for k, a in acc.items()}
            z = (zacc[0] / zacc[1]).astype(np.float32) if zacc is not None else None
        src = "the %d frame%s of /frames (inverse-variance weighted mean of the scaled frames)" % (
            used, "s" if used > 1 else "")
        if missing:
            src += "; %d not readable: %s" % (len(missing), ", ".join(missing[:3]))
        return out, z, src

    # -- figures -----------------------------------------------------------------------------
    def fig_white(self):
        items = self.section("White stack and sources")
        cfg = self.cfg
        want_over = bool(cfg.get("overlay.enabled", True))
        want_zoom = want_over and bool(cfg.get("overlay.zoom_enabled", True))
        want_pre = bool(cfg.get("crop.plot_pre_crop", True))
        want_post = bool(cfg.get("crop.plot_post_crop", True)) and bool(cfg.get("crop.enabled", True))
        ds_over = int(cfg.get("overlay.downsample_full", 4) or 1)
        ds_pre = int(cfg.get("crop.display_downsample", 4) or 1)
        ds_post = int(cfg.get("crop.post_crop_display_downsample", 4) or 1)
        margin = int(cfg.get("crop.margin", 0) or 0) if cfg.get("crop.enabled", True) else 0
        if not (want_over or want_pre or want_post):
            self.skip(items, "White stack drawings", "overlay.enabled, crop.plot_pre_crop and crop.plot_post_crop are false")
            return
        if self.nx <= 0 or self.ny <= 0:
            self.skip(items, "White stack drawings", "the store has no tile_nx / tile_ny")
            return
        zoom = None
        if want_zoom:
            zb = cfg.get("overlay.zoom_box", [0, 1000, 0, 1000])
            try:
                x0, x1, y0, y1 = [int(v) for v in zb]
                x0, x1 = max(0, min(x0, self.nx)), max(0, min(x1, self.nx))
                y0, y1 = max(0, min(y0, self.ny)), max(0, min(y1, self.ny))
                if x1 > x0 and y1 > y0:
                    zoom = (x0, x1, y0, y1)
            except (TypeError, ValueError):
                zoom = None
        factors = sorted({k for k, w in ((ds_over, want_over), (ds_pre, want_pre), (ds_post, want_post)) if w})
        try:
            imgs, zimg, src = self.white_stack(factors, zoom)
        except RuntimeError as e:
            self.skip(items, "White stack drawings", str(e))
            return
        items.append(("html", "<p class=small>White stack from %s.</p>" % html.escape(src)))
        cat = self.cat
        x, y = cat["X_INPUT"], cat["Y_INPUT"]
        types = np.array([s(t).strip().upper() for t in cat["TYPE"]])
        excl = cat["excluded_any"].astype(bool)
        reasons = np.array([s(t) for t in cat["excluded_reason"]])
        nx, ny = self.nx, self.ny
        ext = (-0.5, nx - 0.5, -0.5, ny - 0.5)

        def overlay_sources(ax, box=None, size=16):
            sel = np.isfinite(x) & np.isfinite(y)
            if box:
                bx0, bx1, by0, by1 = box
                sel &= (x >= bx0 - 0.5) & (x < bx1 - 0.5) & (y >= by0 - 0.5) & (y < by1 - 0.5)
            style = {"STAR": ("*", "#00e5ff"), "EXP": ("o", "#7CFC00"), "DEV": ("s", "#ffa500"),
                     "SERSIC": ("D", "#ff66ff")}
            for t in sorted(set(types[sel & ~excl])):
                m, c = style.get(t, ("^", "#ffff00"))
                k = sel & ~excl & (types == t)
                ax.scatter(x[k], y[k], s=size * (1.6 if m == "*" else 1), marker=m, facecolors="none",
                           edgecolors=c, linewidths=0.8, label="%s (%d)" % (t or "?", k.sum()))
            rstyle = {"crop": "#ff3030", "saturation": "#ff00ff", "outside_tile": "#ffffff", "nan_coord": "#ffffff"}
            for r in sorted(set(reasons[sel & excl])):
                k = sel & excl & (reasons == r)
                ax.scatter(x[k], y[k], s=size, marker="x", c=rstyle.get(r, "#ff3030"), linewidths=0.9,
                           label="excluded: %s (%d)" % (r or "?", k.sum()))
            ax.legend(loc="upper right", fontsize=6, framealpha=0.6, markerscale=0.8)

        if want_pre:
            fig, ax = plt.subplots(figsize=(7, 7 * ny / max(nx, 1)))
            show_image(ax, imgs[ds_pre], extent=ext)
            if margin > 0:
                ax.add_patch(Rectangle((margin - 0.5, margin - 0.5), nx - 2 * margin, ny - 2 * margin,
                                       fill=False, ec="#ff3030", lw=1.2, ls="--"))
            ax.set_title("white stack, pre-crop (downsampled %dx); crop box: margin %d pix" % (ds_pre, margin), fontsize=9)
            ax.set_xlabel("x (pix)"); ax.set_ylabel("y (pix)")
            self.save(fig, "white_pre_crop.png", items,
                      "The white stack of the whole tile (block-averaged %dx, crop.display_downsample) with the "
                      "crop box (dashed red, crop.margin = %d pix): sources outside it are excluded_crop." % (ds_pre, margin))
        else:
            self.skip(items, "Pre-crop white stack", "crop.plot_pre_crop is false")
        if want_post:
            img = imgs[ds_post]
            k = ds_post
            m0 = margin // k
            m1y, m1x = img.shape[0] - (margin + k - 1) // k, img.shape[1] - (margin + k - 1) // k
            sub = img[m0:max(m1y, m0 + 1), m0:max(m1x, m0 + 1)]
            fig, ax = plt.subplots(figsize=(7, 7 * ny / max(nx, 1)))
            show_image(ax, sub, extent=(margin - 0.5, nx - margin - 0.5, margin - 0.5, ny - margin - 0.5))
            ax.set_title("white stack, post-crop (downsampled %dx)" % k, fontsize=9)
            ax.set_xlabel("x (pix)"); ax.set_ylabel("y (pix)")
            self.save(fig, "white_post_crop.png", items,
                      "The white stack inside the crop box (block-averaged %dx, crop.post_crop_display_downsample): "
                      "the region whose sources are fitted." % k)
        else:
            self.skip(items, "Post-crop white stack", "crop.plot_post_crop is false or crop.enabled is false")
        if want_over:
            fig, ax = plt.subplots(figsize=(8, 8 * ny / max(nx, 1)))
            show_image(ax, imgs[ds_over], extent=ext)
            overlay_sources(ax, size=14)
            if zoom:
                x0, x1, y0, y1 = zoom
                ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec="#ffff00", lw=1.0))
            ax.set_xlim(ext[0], ext[1]); ax.set_ylim(ext[2], ext[3])
            ax.set_title("sources by TYPE and exclusion (white stack downsampled %dx)" % ds_over, fontsize=9)
            ax.set_xlabel("x (pix)"); ax.set_ylabel("y (pix)")
            self.save(fig, "overlay.png", items,
                      "Every catalog source at its input position (X_INPUT, Y_INPUT) over the white stack "
                      "(block-averaged %dx, overlay.downsample_full): open markers by TYPE, crosses for excluded "
                      "sources by excluded_reason; the yellow box is overlay.zoom_box." % ds_over)
            if zoom and zimg is not None:
                x0, x1, y0, y1 = zoom
                fig, ax = plt.subplots(figsize=(8, 8 * (y1 - y0) / max(x1 - x0, 1)))
                show_image(ax, zimg, extent=(x0 - 0.5, x1 - 0.5, y0 - 0.5, y1 - 0.5))
                overlay_sources(ax, box=zoom, size=40)
                ax.set_xlim(x0 - 0.5, x1 - 0.5); ax.set_ylim(y0 - 0.5, y1 - 0.5)
                ax.set_title("zoom x %d..%d, y %d..%d (full resolution)" % (x0, x1, y0, y1), fontsize=9)
                ax.set_xlabel("x (pix)"); ax.set_ylabel("y (pix)")
                self.save(fig, "overlay_zoom.png", items,
                          "The overlay at full resolution on overlay.zoom_box = [%d, %d, %d, %d] (clipped to the tile)."
                          % (x0, x1, y0, y1))
            elif want_zoom:
                self.skip(items, "Overlay zoom", "overlay.zoom_box does not overlap the tile, or the stored white stack is downsampled")
        else:
            self.skip(items, "Source overlay", "overlay.enabled is false")

    def fig_cells(self):
        items = self.section("Cells and patches")
        if "cells" not in self.f or self.f["cells"].shape[0] == 0:
            self.skip(items, "Cell map", "the store has no /cells")
            return
        c = self.f["cells"][:]
        p = self.f["patches"][:] if "patches" in self.f else None
        fig, axes = plt.subplots(1, 2, figsize=(11, 5))
        names = {0: "todo", 1: "done", 2: "failed", 3: "skipped"}
        colors = {0: "#bbbbbb", 1: "#66bb66", 2: "#dd3333", 3: "#ffffff"}
        ax = axes[0]
        for r in c:
            ax.add_patch(Rectangle((r["bx0"], r["by0"]), r["bx1"] - r["bx0"], r["by1"] - r["by0"],
                                   fc=colors.get(int(r["status"]), "#bbbbbb"), ec="k", lw=0.8))
            ax.text((r["bx0"] + r["bx1"]) / 2, (r["by0"] + r["by1"]) / 2,
                    "cell %d\n%s\nrank %d\n%d src\n%.2f s" % (r["id"], names.get(int(r["status"]), "?"), r["rank"],
                                                             r["nsrc"], r["seconds"] if np.isfinite(r["seconds"]) else float("nan")),
                    ha="center", va="center", fontsize=6 if len(c) <= 16 else 4)
        ax.set_xlim(0, max(self.nx, c["bx1"].max())); ax.set_ylim(0, max(self.ny, c["by1"].max()))
        ax.set_aspect("equal"); ax.set_title("ePSF cells: status, rank, sources, seconds", fontsize=9)
        ax.set_xlabel("x (pix)"); ax.set_ylabel("y (pix)")
        ax = axes[1]
        if p is not None and len(p):
            val = p["nsrc"].astype(float)
            vmax = max(val.max(), 1)
            cm = plt.get_cmap("viridis")
            for r in p:
                ax.add_patch(Rectangle((r["bx0"], r["by0"]), r["bx1"] - r["bx0"], r["by1"] - r["by0"],
                                       fc=cm(r["nsrc"] / vmax) if r["active"] else "#ffffff", ec="k", lw=0.4,
                                       hatch=None if int(r["status"]) != 2 else "xx"))
            sm = plt.cm.ScalarMappable(cmap=cm, norm=plt.Normalize(0, vmax))
            fig.colorbar(sm, ax=ax, label="sources in the patch base region")
            ax.set_xlim(0, max(self.nx, p["bx1"].max())); ax.set_ylim(0, max(self.ny, p["by1"].max()))
            ax.set_aspect("equal")
            ax.set_title("patches: sources (white: inactive, hatched: failed)", fontsize=9)
            ax.set_xlabel("x (pix)")
        else:
            ax.set_visible(False)
        self.save(fig, "cells.png", items,
                  "Left: the ePSF cells (the unit of distribution over MPI ranks) coloured by status (green done, "
                  "grey todo, red failed, white skipped) with the rank that ran each, its sources and wall seconds. "
                  "Right: the fit patches coloured by their number of base-region sources.")

    def fig_epsf(self):
        items = self.section("ePSF grid per band")
        any_drawn = False
        for b in self.bands:
            p = "epsf/" + b
            if p not in self.f:
                self.skip(items, "ePSF %s" % b, "the store has no /%s" % p)
                continue
            cube = self.f[p][...]
            if cube.ndim != 4 or not np.isfinite(cube).any():
                self.skip(items, "ePSF %s" % b, "/%s holds no values yet (the ePSF stage did not run)" % p)
                continue
            ncy, ncx, sz, _ = cube.shape
            nst = self.f[p + "_nstars"][...] if p + "_nstars" in self.f else np.full((ncy, ncx), -1)
            fb = self.f[p + "_fallback"][...] if p + "_fallback" in self.f else np.zeros((ncy, ncx), int)
            peak = np.nanmax(cube)
            w = min(2.0, 10.0 / max(ncx, 1))
            fig, axes = plt.subplots(ncy, ncx, figsize=(w * ncx + 0.6, w * ncy + 0.6), squeeze=False)
            for iy in range(ncy):
                for ix in range(ncx):
                    ax = axes[ncy - 1 - iy, ix]   # cell iy = 0 at the bottom, like the tile
                    st = cube[iy, ix]
                    ax.set_xticks([]); ax.set_yticks([])
                    if not np.isfinite(st).any():
                        ax.text(0.5, 0.5, "none", ha="center", va="center", transform=ax.transAxes, fontsize=7)
                    else:
                        ax.imshow(np.log10(np.clip(st / peak, 1e-5, None)), origin="lower", cmap="magma",
                                  vmin=-4.5, vmax=0, interpolation="nearest")
                    isfb = int(fb[iy, ix]) == 1
                    ax.set_title("(%d,%d) n=%s%s" % (ix, iy, int(nst[iy, ix]) if nst[iy, ix] >= 0 else "–",
                                                     " FB" if isfb else ""), fontsize=6,
                                 color="#cc0000" if isfb else "k")
                    if isfb:
                        for sp in ax.spines.values():
                            sp.set_edgecolor("#cc0000"); sp.set_linewidth(2)
            fig.suptitle("ePSF %s: %dx%d cells, %d pix stamps (log10 of stamp / peak)" % (b, ncx, ncy, sz), fontsize=9)
            self.save(fig, "epsf_%s.png" % b, items,
                      "Band %s: the ePSF of every cell (x to the right, y up, log scale down to 10^-4.5 of the peak); "
                      "the title gives the cell (ix,iy) and the PSF stars used (n); a red frame and FB mark "
                      "cells that use the analytic fallback PSF." % b)
            any_drawn = True
            self.fig_moffat_field(items, b)
        if not self.bands:
            self.skip(items, "ePSF grid", "the store lists no bands")
        return any_drawn

    def fig_moffat_field(self, items, b):
        """epsf.moffat_field: the band-wide Moffat's FWHM and beta over the tile (docs/outputs.md layout)."""
        if "epsf/moffat_field" not in self.f:
            return
        info = self.f["epsf/moffat_field"][...]
        k = self.bands.index(b)
        if k >= info.shape[0] or info[k, 0] != 1:
            self.skip(items, "band-wide Moffat %s" % b, "not fitted for this band (the log says why)")
            return
        h = info[k]
        deg = [int(x) for x in h[1:5]]
        xr, yr, sc = h[7], h[8], h[9]
        C = h[16:16 + 60].reshape(4, 15)
        cube = self.f["epsf/" + b]
        ncy, ncx = cube.shape[0], cube.shape[1]
        nx, ny = 2 * xr + 1, 2 * yr + 1
        gx, gy = np.meshgrid(np.linspace(0, nx - 1, 65), np.linspace(0, ny - 1, 65))
        u, v = (gx - xr) / sc, (gy - yr) / sc
        mono = [u ** (n - j) * v ** j for n in range(5) for j in range(n + 1)]
        P = [sum(C[q][t] * mono[t] for t in range((deg[q] + 1) * (deg[q] + 2) // 2)) for q in range(4)]
        fw, beta = np.exp(P[0]), 1 + np.exp(P[1])
        fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.8))
        fig.subplots_adjust(wspace=0.55, left=0.08, right=0.93, bottom=0.14)
        for ax, img, lab in ((axes[0], fw, "FWHM (pix)"), (axes[1], beta, "beta")):
            im = ax.imshow(img, origin="lower", extent=(0, nx, 0, ny), cmap="viridis")
            fig.colorbar(im, ax=ax, fraction=0.046, label=lab)
            for i in range(1, ncx):
                ax.axvline(i * nx / ncx, color="w", lw=0.5)
            for j in range(1, ncy):
                ax.axhline(j * ny / ncy, color="w", lw=0.5)
            ax.set_xlabel("x (pix)")
            ax.set_ylabel("y (pix)")
        fig.suptitle("Band-wide Moffat %s: degree %d, %d of %d PSF stars, median chi2/dof %.2f" %
                     (b, deg[0], int(h[6]), int(h[5]), h[10]), fontsize=9)
        self.save(fig, "epsf_field_%s.png" % b, items,
                  "Band %s: the band-wide Moffat (epsf.moffat_field) the fallback cells use, its FWHM and beta over "
                  "the tile (white lines: the ePSF cells)." % b)

    def fig_growth(self):
        items = self.section("ePSF growth curves")
        if not self.cfg.get("epsf.save_growth_curve", True):
            self.skip(items, "Growth curves", "epsf.save_growth_curve is false")
            return
        curves = []
        for b in self.bands:
            pe = self.find(["qa/epsf/%s/growth_ee" % b, "epsf/%s_growth_ee" % b, "epsf/%s_growth" % b,
                            "qa/epsf/%s_growth_ee" % b, "qa/growth/%s" % b], ("growth",), band=b,
                           exclude=("_r", "radius", "radii"))
            if not pe:
                continue
            pr = self.find(["qa/epsf/%s/growth_r" % b, "epsf/%s_growth_r" % b, "qa/epsf/%s_growth_r" % b,
                            "qa/growth/%s_r" % b])
            ee = self.f[pe][...].astype(float)
            r = self.f[pr][...].astype(float) if pr else None
            if ee.ndim >= 1 and ee.shape[-1] == 2 and r is None and ee.ndim >= 2:
                r, ee = ee[..., 0], ee[..., 1]
            if r is None:
                r = np.arange(1, ee.shape[-1] + 1, dtype=float)
            ee2 = ee.reshape(-1, ee.shape[-1])
            r2 = r.reshape(-1, r.shape[-1]) if r.ndim > 1 else r[None, :]
            if r2.shape[0] != ee2.shape[0]:
                r2 = np.repeat(r2[:1], ee2.shape[0], axis=0)
            if r2.shape[1] != ee2.shape[1]:
                self.skip(items, "Growth curve %s" % b, "/%s and its radii have different lengths" % pe)
                continue
            curves.append((b, r2, ee2, pe))
        if not curves:
            self.skip(items, "Growth curves", "the store has no growth-curve datasets (/epsf/<band>_growth_ee)")
            return
        n = len(curves)
        nc = min(n, 4)
        nr = (n + nc - 1) // nc
        fig, axes = plt.subplots(nr, nc, figsize=(3.4 * nc, 2.8 * nr), squeeze=False)
        for i, (b, r, ee, pe) in enumerate(curves):
            ax = axes[i // nc, i % nc]
            rr = r
            for k in range(ee.shape[0]):
                if np.isfinite(ee[k]).any():
                    ax.plot(rr[k], ee[k], lw=0.8, alpha=0.8)
            ax.axhline(1.0, color="k", lw=0.5, ls=":")
            ax.set_title("%s (%d curves)" % (b, ee.shape[0]), fontsize=8)
            ax.set_xlabel("radius (pix)", fontsize=7); ax.set_ylabel("encircled energy", fontsize=7)
            ax.tick_params(labelsize=6)
        for j in range(n, nr * nc):
            axes[j // nc, j % nc].set_visible(False)
        self.save(fig, "epsf_growth.png", items,
                  "Encircled energy vs radius of the ePSF of each cell (one line per cell), per band: curves "
                  "that spread apart show the PSF varying across the field; curves that do not reach 1 "
                  "have light outside the stamp.")

    def fig_epsf_resid(self):
        items = self.section("Star-minus-ePSF residuals")
        if not self.cfg.get("epsf.save_residual_diagnostics", True):
            self.skip(items, "Star residuals", "epsf.save_residual_diagnostics is false")
            return
        maxst = int(self.cfg.get("epsf.residual_diag_max_stars", 100) or 0)
        maxmont = int(self.cfg.get("epsf.save_star_montage_max", 100) or 0)
        drawn = 0
        for b in self.bands:
            pr = self.find(["qa/epsf/%s/resid" % b, "epsf/%s_resid" % b, "qa/epsf/%s_resid" % b,
                            "qa/epsf_resid/%s" % b], ("resid",), band=b, exclude=("cutout", "patch", "overview"))
            if not pr:
                continue
            ps = self.find(["qa/epsf/%s/stars" % b, "epsf/%s_stars" % b, "qa/epsf/%s_stars" % b])
            res = self.f[pr][...].astype(np.float32)
            sta = self.f[ps][...].astype(np.float32) if ps else None
            if res.ndim == 5:   # [ncy, ncx, nstar, s, s]
                res = res.reshape(-1, res.shape[-2], res.shape[-1])
                sta = sta.reshape(-1, sta.shape[-2], sta.shape[-1]) if sta is not None and sta.ndim == 5 else None
            elif res.ndim == 4:  # [ncy, ncx, s, s]: a mean residual per cell
                res = res.reshape(-1, res.shape[-2], res.shape[-1])
                sta = None
            elif res.ndim != 3:
                self.skip(items, "Star residuals %s" % b, "/%s has an unexpected shape %s" % (pr, res.shape))
                continue
            keep = [i for i in range(res.shape[0]) if np.isfinite(res[i]).any()]
            nmax = max(1, min(maxst or len(keep), 64))
            keep = keep[:nmax]
            if not keep:
                self.skip(items, "Star residuals %s" % b, "/%s holds no values" % pr)
                continue
            with_st = sta is not None and sta.shape == self.f[pr].shape[-3:] or (sta is not None and sta.shape[0] == res.shape[0])
            with_st = with_st and maxmont > 0
            n = len(keep)
            nc = min(n, 8)
            nr = (n + nc - 1) // nc
            rows = nr * (2 if with_st else 1)
            fig, axes = plt.subplots(rows, nc, figsize=(1.2 * nc + 0.4, 1.25 * rows + 0.6), squeeze=False)
            for a in axes.flat:
                a.set_xticks([]); a.set_yticks([])
                a.set_visible(False)
            peak = None
            if with_st:
                peak = np.nanmax(np.abs(sta[keep]))
            lim = np.nanpercentile(np.abs(res[keep]), 99.0) if peak is None else 0.05 * peak
            lim = lim if np.isfinite(lim) and lim > 0 else 1.0
            for j, i in enumerate(keep):
                rr, cc = j // nc, j % nc
                if with_st:
                    ax = axes[2 * rr, cc]
                    ax.set_visible(True)
                    ax.imshow(np.log10(np.clip(sta[i] / peak, 1e-4, None)), origin="lower", cmap="magma",
                              vmin=-4, vmax=0, interpolation="nearest")
                    ax.set_title("star %d" % i, fontsize=5)
                    ax = axes[2 * rr + 1, cc]
                else:
                    ax = axes[rr, cc]
                ax.set_visible(True)
                ax.imshow(res[i], origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
                if not with_st:
                    ax.set_title("#%d" % i, fontsize=5)
            fig.suptitle("%s: star-minus-ePSF residuals (%d of %d; colour ±%.2g%s)" %
                         (b, n, res.shape[0], lim, " = 5% of the star peak" if with_st else ""), fontsize=8)
            self.save(fig, "epsf_resid_%s.png" % b, items,
                      "Band %s: %s residuals (star normalised to unit flux minus the ePSF), blue negative, red "
                      "positive, at most epsf.residual_diag_max_stars (and 64) stars%s. Structure that repeats "
                      "from star to star is PSF-model error; isolated blobs are neighbours."
                      % (b, "each PSF star (log scale, top) and its" if with_st else "the", ""))
            drawn += 1
        if drawn == 0:
            self.skip(items, "Star residuals", "the store has no star-residual datasets (/qa/epsf/<band>/resid)")

    def fig_background(self):
        items = self.section("Background maps")
        if not self.cfg.get("epsf.save_patch_background_diagnostics", True):
            self.skip(items, "Background maps", "epsf.save_patch_background_diagnostics is false")
            return
        cbar = bool(self.cfg.get("epsf.diagnostics_show_colorbar", True))
        found = []
        for b in self.bands:
            pb = self.find(["qa/background/%s" % b, "qa/background/%s_bkg" % b, "qa/bkg/%s" % b],
                           ("background",), band=b, exclude=("rms", "star", "local"))
            if not pb:
                pb = self.find([], ("bkg",), band=b, exclude=("rms", "star", "local", "resid"))
            if not pb:
                continue
            prms = self.find(["qa/background/%s_rms" % b, "qa/background/%s/rms" % b, "qa/bkg/%s_rms" % b])
            found.append((b, pb, prms))
        if not found:
            self.skip(items, "Background maps", "the store has no background datasets (/qa/background/<band>)")
            return

        def tile_map(a):
            a = a.astype(np.float32)
            if a.ndim == 4:   # [ncy, ncx, h, w] per cell -> mosaic
                return np.concatenate([np.concatenate(list(row), axis=1) for row in a], axis=0)
            return a

        n = len(found)
        nc = 2 if any(p for _, _, p in found) else 1
        fig, axes = plt.subplots(n, nc, figsize=(4.2 * nc, 3.6 * n), squeeze=False)
        for i, (b, pb, prms) in enumerate(found):
            for j, (p, lab) in enumerate(((pb, "background"), (prms, "RMS"))):
                if j >= nc:
                    continue
                ax = axes[i, j]
                if not p:
                    ax.set_visible(False)
                    continue
                m = tile_map(self.f[p][...])
                lo, hi = stretch_limits(m, 1, 99)
                im = ax.imshow(m, origin="lower", cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest",
                               extent=(-0.5, self.nx - 0.5, -0.5, self.ny - 0.5) if self.nx else None)
                ax.set_title("%s %s (/%s)" % (b, lab, p), fontsize=7)
                ax.tick_params(labelsize=6)
                if cbar:
                    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
        self.save(fig, "background.png", items,
                  "The background (and its RMS) each cell subtracted before building its PSF stars, per band, "
                  "on the tile grid: gradients or cell-to-cell steps point to scattered light or a bad mesh "
                  "(epsf.background_boxsize).")

    def _stamp_sets(self, kind):
        """Patch overviews / source cutouts: a list of (label, {data, model, resid} arrays [nb, h, w])."""
        f = self.f
        base = {"overview": ["qa/patch_overview", "qa/patches", "qa/overview"],
                "cutouts": ["qa/cutouts", "qa/cutout"]}[kind]
        for g in base:
            if g in f and isinstance(f[g], h5py.Group):
                grp = f[g]
                if all(k in grp and isinstance(grp[k], h5py.Dataset) for k in ("data", "model")):
                    d, m = grp["data"], grp["model"]
                    r = grp["resid"] if "resid" in grp else None
                    ids = None
                    for idn in ("row", "rows", "patch", "patch_id", "id", "ids"):
                        if idn in grp:
                            ids = grp[idn][...]
                            break
                    out = []
                    for i in range(d.shape[0]):
                        dd = d[i].astype(np.float32)
                        mm = m[i].astype(np.float32)
                        rr = r[i].astype(np.float32) if r is not None else dd - mm
                        if dd.ndim == 2:
                            dd, mm, rr = dd[None], mm[None], rr[None]
                        if not np.isfinite(dd).any():
                            continue
                        out.append((int(ids[i]) if ids is not None else i, {"data": dd, "model": mm, "resid": rr}))
                    return out, g
                subs = [k for k in grp.keys() if isinstance(grp[k], h5py.Group) and "data" in grp[k]]
                if subs:
                    out = []
                    for k in sorted(subs, key=lambda t: (len(t), t)):
                        sg = grp[k]
                        dd = sg["data"][...].astype(np.float32)
                        mm = sg["model"][...].astype(np.float32) if "model" in sg else np.full_like(dd, np.nan)
                        rr = sg["resid"][...].astype(np.float32) if "resid" in sg else dd - mm
                        if dd.ndim == 2:
                            dd, mm, rr = dd[None], mm[None], rr[None]
                        lab = re.sub(r"\D", "", k)
                        out.append((int(lab) if lab else k, {"data": dd, "model": mm, "resid": rr}))
                    return out, g
        return None, None

    def _triptych_rows(self, sets, title_fn, fname_fn, items, what, per_page, caption):
        pl = self.cfg
        dlo, dhi = float(pl.get("patch_run.cutout_data_p_lo", 1.0)), float(pl.get("patch_run.cutout_data_p_hi", 99.0))
        mlo, mhi = float(pl.get("patch_run.cutout_model_p_lo", 1.0)), float(pl.get("patch_run.cutout_model_p_hi", 99.0))
        rabs = float(pl.get("patch_run.cutout_resid_p_abs", 99.0))
        pages = [sets[i:i + per_page] for i in range(0, len(sets), per_page)]
        if self.max_pages is not None:
            pages = pages[:self.max_pages]
        for pi, page in enumerate(pages):
            nb = max(st["data"].shape[0] for _, st in page)
            nrow = len(page)
            ncol = 3 * nb
            h0, w0 = page[0][1]["data"].shape[1:]
            cw = 1.15
            fig, axes = plt.subplots(nrow, ncol, figsize=(cw * ncol + 0.5, cw * nrow * h0 / max(w0, 1) + 0.8),
                                     squeeze=False)
            for r, (lab, st) in enumerate(page):
                for bi in range(nb):
                    bname = self.bands[bi] if bi < len(self.bands) and nb == len(self.bands) else str(bi)
                    for k, (key, cmap) in enumerate((("data", "gray"), ("model", "gray"), ("resid", "RdBu_r"))):
                        ax = axes[r, 3 * bi + k]
                        ax.set_xticks([]); ax.set_yticks([])
                        if bi >= st["data"].shape[0]:
                            ax.set_visible(False)
                            continue
                        im = st[key][bi]
                        if key == "resid":
                            v = np.abs(im[np.isfinite(im)])
                            lim = float(np.percentile(v, rabs)) if v.size else 1.0
                            lim = lim if lim > 0 else 1.0
                            ax.imshow(im, origin="lower", cmap=cmap, vmin=-lim, vmax=lim, interpolation="nearest")
                        else:
                            lo, hi = (dlo, dhi) if key == "data" else (mlo, mhi)
                            # model shown on the data's scale so the two compare by eye
                            ref = st["data"][bi] if key == "model" else im
                            vlo, vhi = stretch_limits(ref, lo, hi)
                            ax.imshow(im, origin="lower", cmap=cmap, vmin=vlo, vmax=vhi, interpolation="nearest")
                        if r == 0:
                            ax.set_title("%s %s" % (bname, key), fontsize=6)
                        if bi == 0 and k == 0:
                            ax.set_ylabel(title_fn(lab), fontsize=6)
            fig.suptitle("%s (page %d of %d)" % (what, pi + 1, len(pages)), fontsize=8)
            self.save(fig, fname_fn(pi), items, caption + (" Page %d of %d." % (pi + 1, len(pages)) if len(pages) > 1 else ""))
        return len(pages)

    def fig_patch_overview(self):
        items = self.section("Patch data / model / residual")
        if self.cfg.get("patch_run.no_patch_overview", False):
            self.skip(items, "Patch overviews", "patch_run.no_patch_overview is true")
            return
        sets, g = self._stamp_sets("overview")
        if not sets:
            self.skip(items, "Patch overviews", "the store has no patch overview datasets (/qa/patch_overview)")
            return
        # the worst patches first when /patches has chi2dof
        chi = {}
        if "patches" in self.f:
            pt = self.f["patches"][:]
            chi = {int(r["id"]): float(r["chi2dof"]) for r in pt}
        sets.sort(key=lambda t: -(chi.get(t[0], float("-inf")) if isinstance(t[0], int) and np.isfinite(chi.get(t[0], np.nan)) else -1e300))
        limit = 24
        note = ""
        if len(sets) > limit:
            note = " Showing %d of %d patches, highest chi2/dof first." % (limit, len(sets))
            sets = sets[:limit]
        self._triptych_rows(sets, lambda l: "patch %s%s" % (l, " χ²=%.2f" % chi[l] if l in chi and np.isfinite(chi[l]) else ""),
                            lambda i: "patch_overview_%d.png" % (i + 1), items, "patch overviews (/%s)" % g, 6,
                            "Each row a patch: per band the data, the fitted model (on the data's display range, "
                            "patch_run.cutout_*_p_* percentiles) and the residual (symmetric, "
                            "patch_run.cutout_resid_p_abs)." + note)

    def fig_cutouts(self):
        items = self.section("Source cutouts")
        if self.cfg.get("patch_run.no_cutouts", False):
            self.skip(items, "Source cutouts", "patch_run.no_cutouts is true")
            return
        sets, g = self._stamp_sets("cutouts")
        if not sets:
            self.skip(items, "Source cutouts", "the store has no cutout datasets (/qa/cutouts)")
            return
        mx = self.cfg.get("patch_run.cutout_max_sources", 100)
        if mx is not None:
            sets = sets[:int(mx)]
        ids = self.cat["ID"]
        types = self.cat["TYPE"]

        def label(row):
            if isinstance(row, int) and 0 <= row < len(ids):
                return "%s %s" % (s(ids[row]), s(types[row]))
            return str(row)

        self._triptych_rows(sets, label, lambda i: "cutouts_%d.png" % (i + 1), items, "source cutouts (/%s)" % g, 8,
                            "Each row a source (ID and TYPE): per band the data, the model of the whole scene and "
                            "the residual; at most patch_run.cutout_max_sources sources.")

    def fig_zp(self):
        items = self.section("Zero points")
        if "zp/bands" not in self.f:
            self.skip(items, "ZP vs magnitude", "the store has no /zp (the run had no reference catalog, or zp.enabled is false)")
            return
        zb = self.f["zp/bands"][:]
        st = self.f["zp/stars"][:] if "zp/stars" in self.f else None
        if st is None or len(st) == 0:
            why = "; ".join("%s: %d matched, %d selected (rejected: %d not converged, %d excluded, %d not isolated, "
                            "%d magnitude range, %d flux)" % (s(r["band"]), r["nmatched"], r["nselected"],
                                                              r["nrej_converged"], r["nrej_excluded"], r["nrej_isolation"],
                                                              r["nrej_magrange"], r["nrej_flux"]) for r in zb)
            self.skip(items, "ZP vs magnitude", "/zp/stars is empty (no star passed the cuts) — " + why)
            return
        bands = [s(r["band"]) for r in zb]
        n = len(bands)
        nc = min(n, 3)
        nr = (n + nc - 1) // nc
        fig, axes = plt.subplots(nr, nc, figsize=(4.2 * nc, 3.2 * nr), squeeze=False)
        sb = np.array([s(b) for b in st["band"]])
        for i, (b, r) in enumerate(zip(bands, zb)):
            ax = axes[i // nc, i % nc]
            k = sb == b
            cl = st["clipped"][k].astype(bool)
            m, z, e = st["mag_ref"][k], st["zp_i"][k], st["zp_err_i"][k]
            ax.errorbar(m[~cl], z[~cl], yerr=e[~cl], fmt="o", ms=3, lw=0.6, color="#1f77b4", label="used (%d)" % (~cl).sum())
            if cl.any():
                ax.errorbar(m[cl], z[cl], yerr=e[cl], fmt="x", ms=4, lw=0.6, color="#d62728", label="clipped (%d)" % cl.sum())
            if np.isfinite(r["zp"]):
                ax.axhline(r["zp"], color="k", lw=0.8)
                ax.axhspan(r["zp"] - r["zp_err"], r["zp"] + r["zp_err"], color="k", alpha=0.15)
                t = "%s: ZP %.4f ± %.4f (scatter %.3f)" % (b, r["zp"], r["zp_err"], r["scatter"])
            else:
                t = "%s: no ZP (flag %d)" % (b, r["flag"])
            ax.set_title(t, fontsize=8)
            ax.set_xlabel("reference mag (AB)", fontsize=7); ax.set_ylabel("zp_i = mag_ref + 2.5 log10 F", fontsize=7)
            ax.tick_params(labelsize=6)
            if k.any():
                zz = z[~cl] if (~cl).any() else z
                med = np.nanmedian(zz)
                spread = max(5 * 1.4826 * np.nanmedian(np.abs(zz - med)), 0.05)
                ax.set_ylim(med - spread, med + spread)
            ax.legend(fontsize=6)
        for j in range(n, nr * nc):
            axes[j // nc, j % nc].set_visible(False)
        self.save(fig, "zp_mag.png", items,
                  "Per band the zero point each selected reference star gives (/zp/stars zp_i, with its error) vs "
                  "its reference magnitude; red crosses were sigma-clipped; the line and band are the weighted-"
                  "median ZP and its error (/zp/bands). A slope means non-linearity or a magnitude-dependent "
                  "error (saturation at the bright end, background at the faint end).")

    def fig_apcorr(self):
        items = self.section("Aperture correction")
        if "apcorr/bands" not in self.f:
            self.skip(items, "aperture correction", "the store has no /apcorr (a store of an earlier version)")
            return
        ab = self.f["apcorr/bands"][:]
        cat = self.cat
        bands = [s(r["band"]) for r in ab]
        have = [b for b in bands if "FLUX_%s_APCAL" % b in cat.dtype.names]
        if not have:
            self.skip(items, "aperture correction", "/catalog has no FLUX_<band>_APCAL columns")
            return
        n = len(have)
        nc = min(n, 3)
        nr = (n + nc - 1) // nc
        fig, axes = plt.subplots(nr, nc, figsize=(4.2 * nc, 3.2 * nr), squeeze=False)
        for i, b in enumerate(have):
            ax = axes[i // nc, i % nc]
            r = ab[bands.index(b)]
            ac = cat["APCORR_%s" % b]
            ac = np.where(np.isfinite(ac) & (ac > 0), ac, 1.0)
            f = cat["FLUX_%s_fit" % b] / ac
            a = cat["FLUX_%s_APCAL" % b]
            ae = cat["FLUXERR_%s_APCAL" % b]
            k = np.isfinite(a) & np.isfinite(f) & (f > 0)
            if k.any():
                mag = self.zp_ref - 2.5 * np.log10(f[k])
                ax.errorbar(mag, a[k] / f[k], yerr=ae[k] / f[k], fmt="o", ms=2.5, lw=0.5, color="#1f77b4",
                            label="measured (%d)" % k.sum())
                ax.set_ylim(0.9, 1.1)
            ax.axhline(1.0, color="0.6", lw=0.6, ls=":")
            if r["flag"] == 0:
                ax.axhline(r["factor"], color="k", lw=0.8)
                ax.axhspan(r["factor"] - r["factor_err"], r["factor"] + r["factor_err"], color="k", alpha=0.15)
                t = "%s: factor %.4f ± %.4f (%d used)" % (b, r["factor"], r["factor_err"], r["nused"])
            else:
                t = "%s: not corrected (flag %d)" % (b, r["flag"])
            ax.set_title(t, fontsize=8)
            ax.set_xlabel("model mag (zp_ref)", fontsize=7); ax.set_ylabel("FLUX_APCAL / model flux", fontsize=7)
            ax.tick_params(labelsize=6)
            ax.legend(fontsize=6)
        for j in range(n, nr * nc):
            axes[j // nc, j % nc].set_visible(False)
        self.save(fig, "apcorr.png", items,
                  "Per band the calibration flux (the model flux plus the residual light in the calibration aperture, "
                  "FLUX_<band>_APCAL) over the model flux for the bright isolated point sources the cells measured, "
                  "against their magnitude; the line and band are the band's factor applied to every flux and its "
                  "error (/apcorr/bands; docs/zeropoints.md). A trend with magnitude means a background or a "
                  "flux-dependent PSF error.")

    def fig_flux(self):
        items = self.section("Fitted vs aperture fluxes")
        cat = self.cat
        have = []
        for b in self.bands:
            ff, fa = "FLUX_%s_fit" % b, "FLUX_%s_APER" % b
            if ff in cat.dtype.names and fa in cat.dtype.names:
                k = np.isfinite(cat[ff]) & np.isfinite(cat[fa])
                if k.sum() >= 2:
                    have.append(b)
        if not have:
            self.skip(items, "Flux comparison and pulls", "no band has finite FLUX_<band>_fit and FLUX_<band>_APER (the fit stage did not fill the catalog)")
            return
        n = len(have)
        nc = min(n, 3)
        nr = (n + nc - 1) // nc
        types = np.array([s(t).strip().upper() for t in cat["TYPE"]])
        fig, axes = plt.subplots(nr, nc, figsize=(4.2 * nc, 3.6 * nr), squeeze=False)
        fig2, axes2 = plt.subplots(nr, nc, figsize=(4.2 * nc, 3.0 * nr), squeeze=False)
        for i, b in enumerate(have):
            ff, fa = cat["FLUX_%s_fit" % b], cat["FLUX_%s_APER" % b]
            ef, ea = cat["FLUXERR_%s_fit" % b], cat["FLUXERR_%s_APER" % b]
            k = np.isfinite(ff) & np.isfinite(fa)
            ax = axes[i // nc, i % nc]
            for t, c in (("STAR", "#1f77b4"), ("EXP", "#2ca02c"), ("DEV", "#ff7f0e"), ("SERSIC", "#9467bd")):
                kk = k & (types == t)
                if kk.any():
                    ax.scatter(fa[kk], ff[kk], s=5, c=c, label="%s (%d)" % (t, kk.sum()), alpha=0.7)
            pos = k & (fa > 0) & (ff > 0)
            if pos.sum() >= 2:
                lo, hi = min(fa[pos].min(), ff[pos].min()), max(fa[pos].max(), ff[pos].max())
                ax.set_xscale("log"); ax.set_yscale("log")
                ax.plot([lo, hi], [lo, hi], "k-", lw=0.6)
            ax.set_title("%s: %d sources" % (b, k.sum()), fontsize=8)
            ax.set_xlabel("FLUX_%s_APER" % b, fontsize=7); ax.set_ylabel("FLUX_%s_fit" % b, fontsize=7)
            ax.tick_params(labelsize=6); ax.legend(fontsize=6)
            ax2 = axes2[i // nc, i % nc]
            with np.errstate(invalid="ignore", divide="ignore"):
                pull = (ff - fa) / np.sqrt(ef ** 2 + ea ** 2)
            pk = k & np.isfinite(pull) & (types == "STAR")
            label = "stars"
            if pk.sum() < 5:
                pk = k & np.isfinite(pull)
                label = "all"
            pv = pull[pk]
            if pv.size:
                ax2.hist(np.clip(pv, -8, 8), bins=np.linspace(-8, 8, 41), color="#1f77b4", alpha=0.8)
                med = np.median(pv)
                rs = 1.4826 * np.median(np.abs(pv - med))
                g = np.linspace(-8, 8, 200)
                ax2.plot(g, pv.size * 0.4 * np.exp(-0.5 * g * g) / math.sqrt(2 * math.pi), "k--", lw=0.7)
                ax2.set_title("%s (%s, %d): median %.2f, robust σ %.2f" % (b, label, pv.size, med, rs), fontsize=8)
            ax2.set_xlabel("(fit − aper) / sqrt(err_fit² + err_aper²), clipped to ±8", fontsize=7)
            ax2.tick_params(labelsize=6)
        for j in range(n, nr * nc):
            axes[j // nc, j % nc].set_visible(False)
            axes2[j // nc, j % nc].set_visible(False)
        self.save(fig, "flux_fit_vs_aper.png", items,
                  "Fitted model flux vs forced aperture flux per band, by TYPE (log axes, one-to-one line). "
                  "Galaxies sit above the line (the aperture misses their wings); stars should follow it at "
                  "the aperture correction of the ePSF.")
        self.save(fig2, "flux_pulls.png", items,
                  "Pulls of the fitted flux against the aperture flux, (fit − aper)/combined error, for stars "
                  "(all sources when fewer than 5 stars); the dashed curve is a unit Gaussian. The two are "
                  "measured on the same pixels, so a width below 1 is expected; a shifted median is an "
                  "aperture-correction or PSF-normalisation offset.")

    def fig_timing(self):
        items = self.section("Timing")
        if "timing/regions" not in self.f or "timing/ranks" not in self.f:
            self.skip(items, "Timing", "the store has no /timing (the run did not reach its finish phase)")
            return
        reg = self.f["timing/regions"][:]
        rk = self.f["timing/ranks"][:]
        imb = float(self.f["timing"].attrs.get("load_imbalance", float("nan")))
        if len(reg) == 0 or len(rk) == 0:
            self.skip(items, "Timing", "/timing is empty")
            return
        names = []
        for r in reg:
            nm = s(r["region"])
            if nm not in names:
                names.append(nm)
        ranks = sorted(set(int(r) for r in reg["rank"]))
        wall = np.zeros((len(names), len(ranks)))
        own = np.zeros_like(wall)
        for r in reg:
            i, j = names.index(s(r["region"])), ranks.index(int(r["rank"]))
            wall[i, j] = r["wall"]
            own[i, j] = r["own"]
        depth = [n.count("/") for n in names]
        keep = [i for i in range(len(names)) if depth[i] <= 3 and wall[i].max() > 0]
        fig, ax = plt.subplots(figsize=(9, 0.28 * len(keep) + 1.4))
        yy = np.arange(len(keep))
        nr = len(ranks)
        h = 0.8 / max(nr, 1)
        cm = plt.get_cmap("tab10" if nr <= 10 else "viridis")
        for j, rnk in enumerate(ranks):
            ax.barh(yy + (j - (nr - 1) / 2) * h, wall[keep, j], height=h, color=cm(j % 10 if nr <= 10 else j / max(nr - 1, 1)),
                    label="rank %d" % rnk)
        ax.set_yticks(yy)
        ax.set_yticklabels(["  " * depth[i] + names[i].split("/")[-1] for i in keep], fontsize=7, family="monospace")
        ax.invert_yaxis()
        ax.set_xlabel("wall seconds (inclusive)")
        ax.set_title("time per stage and rank (load imbalance %.3f)" % imb, fontsize=9)
        if nr <= 16:
            ax.legend(fontsize=6, loc="lower right")
        self.save(fig, "timing_stages.png", items,
                  "Wall time of every timing region (nested regions indented, inclusive of their children) per "
                  "rank, from /timing/regions. The cell stages (read+prep, white, sat, aper, ePSF, fit ...) sum "
                  "over the cells a rank ran.")
        fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(rk) + 3), 3.6))
        x = np.arange(len(rk))
        ax.bar(x, rk["busy"], color="#2ca02c", label="busy (cells)")
        ax.bar(x, rk["overhead"], bottom=rk["busy"], color="#ff7f0e", label="coordinator overhead")
        ax.bar(x, rk["idle"], bottom=rk["busy"] + rk["overhead"], color="#bbbbbb", label="idle (waiting)")
        for i, r in enumerate(rk):
            ax.text(i, r["busy"] + r["overhead"] + r["idle"], "%d cells" % r["cells"], ha="center", va="bottom", fontsize=6)
        ax.set_xticks(x)
        ax.set_xticklabels([str(int(r)) for r in rk["rank"]], fontsize=7)
        ax.set_xlabel("rank"); ax.set_ylabel("seconds in the cell phase")
        ax.set_title("per rank: load imbalance (max busy / mean busy) = %.3f" % imb, fontsize=9)
        ax.legend(fontsize=6, loc="lower right")
        self.save(fig, "timing_ranks.png", items,
                  "Each rank's cell phase split into busy (processing cells), coordinator overhead and idle time, "
                  "with the cells it ran (/timing/ranks). The load imbalance (attribute of /timing) is the busiest "
                  "rank over the mean; near 1 means the dynamic queue balanced the cells.")

    # -- summary and page ---------------------------------------------------------------------
    def summary_html(self):
        cat = self.cat
        n = len(cat)
        rows = []
        excl = cat["excluded_any"].astype(bool)
        rows.append(("sources", "%d (%d active, %d excluded)" % (n, n - excl.sum(), excl.sum())))
        reasons = [s(r) for r in cat["excluded_reason"][excl]]
        for r in sorted(set(reasons)):
            rows.append(("&nbsp;&nbsp;excluded: " + html.escape(r or "?"), str(reasons.count(r))))
        types = [s(t) for t in cat["TYPE"]]
        rows.append(("types", ", ".join("%s %d" % (t, types.count(t)) for t in sorted(set(types)))))
        conv = cat["CONVERGED"]
        fitted = (conv >= 0).sum()
        act = n - excl.sum()
        rows.append(("fitted", "%d of %d active" % (fitted, act)))
        rows.append(("converged", "%d (%s of the fitted)" % ((conv == 1).sum(),
                                                             "%.1f%%" % (100.0 * (conv == 1).sum() / fitted) if fitted else "–")))
        rows.append(("processed", "%d" % cat["PROCESSED"].astype(bool).sum()))
        rows.append(("bands", ", ".join(self.bands) or "–"))
        rows.append(("tile", "%d x %d pix, zp_ref %g" % (self.nx, self.ny, self.zp_ref)))
        if "cells" in self.f:
            c = self.f["cells"][:]
            st = c["status"]
            rows.append(("cells", "%d: %d done, %d todo, %d failed, %d skipped" % (
                len(c), (st == 1).sum(), (st == 0).sum(), (st == 2).sum(), (st == 3).sum())))
        if "frames" in self.f:
            rows.append(("frames", str(self.f["frames"].shape[0])))
        if "timing" in self.f:
            rows.append(("load imbalance", fmt(float(self.f["timing"].attrs.get("load_imbalance", float("nan"))))))
        for k in ("command", "version", "git_hash", "mpi_size", "threads_per_rank", "created_utc", "science_hash"):
            if k in self.prov:
                rows.append((k, html.escape(s(self.prov[k]))))
        t = "<table class=sum>" + "".join("<tr><th>%s</th><td>%s</td></tr>" % r for r in rows) + "</table>"
        if "apcorr/bands" in self.f:
            t += ("<h3>Aperture correction (/apcorr/bands)</h3><table class=grid><tr><th>band</th><th>factor</th>"
                  "<th>error</th><th>used</th><th>clipped</th><th>candidates</th><th>flag</th></tr>")
            for r in self.f["apcorr/bands"][:]:
                t += "<tr><td>%s</td><td>%s</td><td>%s</td><td>%d</td><td>%d</td><td>%d</td><td>%d</td></tr>" % (
                    html.escape(s(r["band"])), fmt(r["factor"], 5), fmt(r["factor_err"], 2), r["nused"],
                    r["nclipped"], r["ncand"], r["flag"])
            t += "</table>"
        if "zp/bands" in self.f:
            zb = self.f["zp/bands"][:]
            t += ("<h3>Zero points (/zp/bands)</h3><table class=grid><tr><th>band</th><th>ZP</th><th>error</th>"
                  "<th>scatter</th><th>used</th><th>clipped</th><th>selected</th><th>matched</th><th>flag</th></tr>")
            for r in zb:
                t += "<tr><td>%s</td><td>%s</td><td>%s</td><td>%s</td><td>%d</td><td>%d</td><td>%d</td><td>%d</td><td>%d</td></tr>" % (
                    html.escape(s(r["band"])), fmt(r["zp"], 7), fmt(r["zp_err"], 2), fmt(r["scatter"], 3),
                    r["nstars_used"], r["nstars_clipped"], r["nselected"], r["nmatched"], r["flag"])
            t += "</table>"
        return t

    def write_index(self, elapsed):
        title = "surveyproc QA — %s" % html.escape(os.path.basename(self.store_path))
        out = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>%s</title><style>"
               "body{font-family:sans-serif;max-width:1200px;margin:1em auto;padding:0 1em;color:#222}"
               "img{max-width:100%%;border:1px solid #ccc}figure{margin:1em 0}figcaption{font-size:0.9em;color:#444;max-width:900px}"
               "table{border-collapse:collapse;font-size:0.9em}th,td{border:1px solid #ccc;padding:2px 8px;text-align:left}"
               "table.sum th{background:#f4f4f4}.note{color:#8a5a00;font-size:0.9em}.small{font-size:0.85em;color:#555}"
               "nav a{margin-right:1em}</style></head><body>" % title,
               "<h1>%s</h1><p class=small>Store <code>%s</code>; report drawn %s in %.1f s by "
               "<code>surveyproc qa</code> (docs/qa.md). %d figures, %d skipped.</p>" % (
                   title, html.escape(os.path.abspath(self.store_path)),
                   time.strftime("%Y-%m-%d %H:%M:%S"), elapsed, len(self.figures), len(self.skipped))]
        out.append("<nav>" + "".join("<a href='#s%d'>%s</a>" % (i, html.escape(t)) for i, (t, _) in enumerate(self.sections)) + "</nav>")
        out.append("<h2>Summary</h2>" + self.summary_html())
        for i, (t, its) in enumerate(self.sections):
            out.append("<h2 id='s%d'>%s</h2>" % (i, html.escape(t)))
            for it in its:
                if it[0] == "fig":
                    out.append("<figure><a href='%s'><img src='%s' alt='%s'></a><figcaption>%s</figcaption></figure>"
                               % (it[1], it[1], html.escape(it[1]), html.escape(it[2])))
                elif it[0] == "note":
                    out.append("<p class=note>%s</p>" % html.escape(it[1]))
                else:
                    out.append(it[1])
        out.append("</body></html>\n")
        tmp = os.path.join(self.out, ".index.html.tmp")
        with open(tmp, "w") as fh:
            fh.write("\n".join(out))
        os.replace(tmp, os.path.join(self.out, "index.html"))


def _block_sum(a, k):
    ny, nx = a.shape
    py, px = (-ny) % k, (-nx) % k
    if py or px:
        a = np.pad(a, ((0, py), (0, px)))
    return a.reshape(a.shape[0] // k, k, a.shape[1] // k, k).sum(axis=(1, 3))


def main(argv):
    ap = argparse.ArgumentParser(prog=PROG, description="Draw the QA report (PNG figures + index.html) of a surveyproc store.")
    ap.add_argument("store", help="the run's HDF5 store (outputs.store)")
    ap.add_argument("--out", help="output folder (default: the run's outputs.qa_dir, else <store folder>/qa)")
    ap.add_argument("--dpi", type=int, help="figure resolution (default: the run's plotting.dpi)")
    ap.add_argument("--max-pages", type=int, help="at most this many pages of patch overviews / cutouts")
    a = ap.parse_args(argv)
    if not os.path.exists(a.store):
        die(EXIT_IO, "store '%s' not found" % a.store)
    try:
        probe = h5py.File(a.store, "r")
        probe.close()
    except (OSError, IOError) as e:
        die(EXIT_INPUT, "store '%s' cannot be opened as HDF5 (%s)" % (a.store, e))
    t0 = time.time()
    rep = None
    out = a.out
    try:
        rep = Report(a.store, out or ".", a.dpi, a.max_pages)
    except KeyError as e:
        die(EXIT_INPUT, "'%s' is not a complete surveyproc store (%s)" % (a.store, e))
    if not out:
        qd = rep.cfg.get("outputs.qa_dir", None)
        out = qd if qd else os.path.join(os.path.dirname(os.path.abspath(a.store)), "qa")
        rep.out = out
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".write-test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        die(EXIT_IO, "cannot write the QA folder '%s' (%s)" % (out, e.strerror or e))
    failures = []
    for fn in (rep.fig_white, rep.fig_cells, rep.fig_epsf, rep.fig_growth, rep.fig_epsf_resid, rep.fig_background,
               rep.fig_patch_overview, rep.fig_cutouts, rep.fig_apcorr, rep.fig_zp, rep.fig_flux, rep.fig_timing):
        try:
            fn()
        except Exception as e:  # one broken figure must not cost the rest of the report
            plt.close("all")
            name = fn.__name__[4:]
            failures.append(name)
            if rep.sections:
                rep.sections[-1][1].append(("note", "%s: failed — %s: %s." % (name, type(e).__name__, e)))
            sys.stderr.write("%s: figure '%s' failed:\n%s" % (PROG, name, traceback.format_exc()))
    rep.write_index(time.time() - t0)
    print("%s: wrote %s (%d figures, %d skipped%s)" % (PROG, os.path.join(out, "index.html"), len(rep.figures),
                                                      len(rep.skipped), ", %d failed: %s" % (len(failures), ", ".join(failures)) if failures else ""))
    for what, why in rep.skipped:
        print("  skipped %s: %s" % (what, why))
    return EXIT_DEPS if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

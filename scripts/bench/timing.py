#!/usr/bin/python3
"""timing.py STORE.h5 RUNLOG OUT.json [key=value ...] — the figures of one `surveyproc run`, from
its store (/timing, /cells, /catalog, /provenance) and its log (Summary/Wall lines, planner
estimate). Extra key=value pairs are copied into the JSON (tile, layout, rep, ...).

Throughputs are per core-second: work divided by the region's CPU seconds summed over the ranks
(`/timing/regions` cpu = process CPU of all threads), so a loaded machine slows the wall clock
but not the figure much; the wall-clock versions (work / wall summed over ranks x threads) are
kept as *_wall. Both passes (PSF and fit) read, prepare and background-subtract every cell, so
those stages count the pixels of both.
"""
import hashlib
import json
import os
import re
import sys

import h5py
import numpy as np


def main():
    store, log, out = sys.argv[1:4]
    extra = dict(a.split("=", 1) for a in sys.argv[4:])
    r = dict(extra)
    r["store_MB"] = os.path.getsize(store) / 1e6
    with h5py.File(store, "r") as f:
        bands = f.attrs["bands"]
        bands = (bands.decode() if isinstance(bands, bytes) else str(bands)).split(",")
        nb = len(bands)
        prov = f["provenance"].attrs
        r["mpi_size"] = int(prov["mpi_size"])
        r["threads_per_rank"] = int(prov["threads_per_rank"])
        r["git_hash"] = str(prov["git_hash"])
        reg = f["timing/regions"][:]
        names = np.array([x.decode() for x in reg["region"]])
        ranks = f["timing/ranks"][:]
        cells = f["cells"][:]
        cat = f["catalog"][:]
        r["load_imbalance_attr"] = float(f["timing"].attrs.get("load_imbalance", np.nan))
        # a digest of the science columns: bit-identical across layouts (docs/architecture.md)
        cols = [c for c in cat.dtype.names if c.endswith("_fit") or c in ("X_FIT", "Y_FIT", "CONVERGED")]
        h = hashlib.sha1()
        for c in cols:
            h.update(np.ascontiguousarray(cat[c]).tobytes())
        r["catalog_sha1"] = h.hexdigest()[:16]
        # the fit's thread CPU by stage and kind of component (stores of before it have none)
        if "timing/fit_cost" in f:
            fc = f["timing/fit_cost"][:]
            cost = {}
            for row in fc:
                key = "%s/%s" % (row["stage"].decode(), row["kind"].decode())
                c = cost.setdefault(key, dict(cpu=0.0, source_bands=0, groups=0))
                c["cpu"] += float(row["cpu"])
                c["source_bands"] += int(row["source_bands"])
                c["groups"] += int(row["groups"])
            r["fit_cost"] = cost
    nthr = r["threads_per_rank"]

    def tot(region, col):
        m = names == region
        return float(reg[col][m].sum()) if m.any() else float("nan")

    roi = float(((cells["rx1"] - cells["rx0"]) * (cells["ry1"] - cells["ry0"]) * (cells["active"] > 0)).sum())
    ncell = int((cells["active"] > 0).sum())
    io_bytes = tot("psf_phase/psf_cells/read+prep/io", "bytes") + tot("cells_phase/fit_cells/read+prep/io", "bytes")
    stages = {}

    def stage(name, regions, work, unit):
        cpu = sum(tot(x, "cpu") for x in regions)
        wall = sum(tot(x, "wall") for x in regions)
        stages[name] = dict(work=work, unit=unit, cpu=cpu, wall=wall, per_core_s=work / cpu if cpu > 0 else None,
                            per_core_s_wall=work / (wall * nthr) if wall > 0 else None)

    stage("read+prep", ["psf_phase/psf_cells/read+prep", "cells_phase/fit_cells/read+prep"], io_bytes / 4e6, "Mpix")
    stage("io (ROI reads)", ["psf_phase/psf_cells/read+prep/io", "cells_phase/fit_cells/read+prep/io"], io_bytes / 4e6,
          "Mpix")
    stage("background", ["psf_phase/psf_cells/background", "cells_phase/fit_cells/background"], 2 * roi * nb / 1e6,
          "Mpix")
    stage("white stack", ["psf_phase/psf_cells/white"], roi * nb / 1e6, "Mpix")
    stage("detect", ["psf_phase/psf_cells/detect"], roi / 1e6, "Mpix")
    stage("ePSF", ["psf_phase/psf_cells/epsf"], ncell * nb, "ePSF")
    stage("aperture", ["cells_phase/fit_cells/aper"], None or 0, "src-band")
    conv = cat["CONVERGED"]
    fitted = conv >= 0
    types = np.array([t.decode().strip() if isinstance(t, bytes) else str(t) for t in cat["TYPE"]])
    nfit = int(fitted.sum())
    nstar = int((fitted & (types == "STAR")).sum())
    stages["aperture"]["work"] = nfit * nb
    stage("aperture", ["cells_phase/fit_cells/aper"], nfit * nb, "src-band")
    stage("fit", ["cells_phase/fit_cells/fit"], nfit * nb, "src-band")
    wbytes = tot("cells_phase/fit_cells/write", "bytes") + tot("psf_phase/psf_cells/epsf/write", "bytes")
    wwall = tot("cells_phase/fit_cells/write", "wall") + tot("psf_phase/psf_cells/epsf/write", "wall")
    r["store_write_MBps"] = wbytes / 1e6 / wwall if wwall > 0 else None
    r["stages"] = stages
    top = np.array(["/" not in x for x in names])
    r["cpu_total"] = float(reg["cpu"][top].sum())  # every top-level region, all ranks: config to export
    r["nbands"] = nb
    r["ncells"] = ncell
    r["nfitted"] = nfit
    r["nfitted_star"] = nstar
    r["nconverged"] = int((conv == 1).sum())
    r["fit_cpu"] = stages["fit"]["cpu"]
    r["peak_rss_MiB"] = [float(x) / 2**20 for x in ranks["peak_rss"]]
    r["rank_overhead_s"] = [float(x) for x in ranks["overhead"]]
    r["rank_busy_s"] = [float(x) for x in ranks["busy"]]
    r["rank_idle_s"] = [float(x) for x in ranks["idle"]]
    r["rank_cells"] = [int(x) for x in ranks["cells"]]
    r["cells_phase_wall"] = float(ranks["wall"].max())
    txt = open(log, errors="replace").read()
    m = re.search(r"Wall ([0-9.]+) s on (\d+) rank\(s\) x (\d+) thread\(s\); load imbalance ([0-9.]+); "
                  r"coordinator overhead ([0-9.]+) s \(([0-9.]+)%\)", txt)
    if m:
        r["wall"] = float(m.group(1))
        r["load_imbalance"] = float(m.group(4))
        r["coord_overhead_s"] = float(m.group(5))
        r["coord_overhead_pct"] = float(m.group(6))
    mul = dict(K=1 / 1024, M=1, G=1024)
    m = re.search(r"layout: .*needs ~([0-9.]+) ([KMG])iB", txt)
    if m:
        r["plan_mem_est_MiB"] = float(m.group(1)) * mul[m.group(2)]
    m = re.search(r"largest cell needs ~([0-9.]+) ([KMG])iB", txt)
    if m:
        r["plan_cell_MiB"] = float(m.group(1)) * mul[m.group(2)]
        if "plan_mem_est_MiB" in r:
            r["plan_baseline_MiB"] = r["plan_mem_est_MiB"] - r["plan_cell_MiB"]
    m = re.search(r"dgemm 256\^3 ([0-9.]+) GFLOP/s", txt)
    if m:
        r["dgemm_gflops"] = float(m.group(1))
    m = re.search(r"BLAS: (OpenBLAS core \S+)", txt)
    if m:
        r["blas_core"] = m.group(1)
    with open(out, "w") as f:
        json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()

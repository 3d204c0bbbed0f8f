#!/usr/bin/env python3
"""same_store.py A.h5 B.h5 — are two surveyproc stores the same result?

Compares /catalog (every column, bit for bit, NaN == NaN) and every /epsf dataset.
Prints "identical" (exit 0) or the first differences (exit 1). Used by test_run.sh and
test_faults.sh. Needs h5py and numpy (Debian: python3-h5py)."""
import sys

import h5py
import numpy as np

a, b = h5py.File(sys.argv[1], "r"), h5py.File(sys.argv[2], "r")
bad = []
ca, cb = a["catalog"][:], b["catalog"][:]
if ca.dtype != cb.dtype or len(ca) != len(cb):
    bad.append("catalog layout differs")
else:
    for n in ca.dtype.names:
        if ca[n].tobytes() != cb[n].tobytes():
            k = int(np.nonzero(ca[n] != cb[n])[0][0]) if ca[n].dtype.kind != "f" else \
                int(np.nonzero(~((ca[n] == cb[n]) | (np.isnan(ca[n]) & np.isnan(cb[n]))))[0][0])
            bad.append("catalog column %s differs (row %d: %r vs %r)" % (n, k, ca[n][k], cb[n][k]))
for n in a["epsf"]:
    if n not in b["epsf"]:
        bad.append("epsf/%s missing" % n)
    elif a["epsf"][n][()].tobytes() != b["epsf"][n][()].tobytes():
        bad.append("epsf/%s differs" % n)
print("; ".join(bad[:6]) if bad else "identical")
sys.exit(1 if bad else 0)

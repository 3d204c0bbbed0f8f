#!/usr/bin/python3
"""damage.py — make one bad FITS frame from a good one (tests/bad_inputs).

usage: damage.py OP FILE [ARGS]   (FILE is rewritten in place)
  delkey KEY        remove header keyword KEY from the image HDU
  nowcs             remove every WCS keyword (CTYPE*, CRVAL*, CRPIX*, CD*, PC*, CDELT*, SIP A_/B_ ...)
  shiftwcs DPIX     move CRPIX1 by DPIX pixels (a different WCS, same shape)
  crop NX NY        keep only the first NY rows and NX columns (a different shape)
  allnan            every pixel NaN
  setkey KEY VALUE  set KEY to VALUE (number if it parses, else string)
Uses Debian's python3-astropy only.
"""
import sys
import numpy as np
from astropy.io import fits

WCS_PREFIX = ("CTYPE", "CRVAL", "CRPIX", "CDELT", "CUNIT", "CD1_", "CD2_", "PC1_", "PC2_", "CROTA",
              "A_", "B_", "AP_", "BP_", "LONPOLE", "LATPOLE", "RADESYS", "EQUINOX", "WCSAXES")


def main():
    op, path = sys.argv[1], sys.argv[2]
    args = sys.argv[3:]
    with fits.open(path, mode="update") as hl:
        h = hl[0].header
        if op == "delkey":
            del h[args[0]]
        elif op == "nowcs":
            for k in [k for k in h.keys() if k.startswith(WCS_PREFIX)]:
                del h[k]
        elif op == "shiftwcs":
            h["CRPIX1"] = h["CRPIX1"] + float(args[0])
        elif op == "crop":
            nx, ny = int(args[0]), int(args[1])
            hl[0].data = np.ascontiguousarray(hl[0].data[:ny, :nx])
        elif op == "allnan":
            hl[0].data = np.full_like(hl[0].data, np.nan)
        elif op == "setkey":
            try:
                v = float(args[1])
            except ValueError:
                v = args[1]
            h[args[0]] = v
        else:
            sys.exit("damage.py: unknown op " + op)


if __name__ == "__main__":
    main()

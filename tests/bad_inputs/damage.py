#!/usr/bin/python3
"""damage.py — make one bad FITS frame from a good one (tests/bad_inputs).

usage: damage.py OP FILE [ARGS]   (FILE is rewritten in place)
  delkey KEY        remove header keyword KEY from the image HDU
  nowcs             remove every WCS keyword (CTYPE*, CRVAL*, CRPIX*, CD*, PC*, CDELT*, SIP A_/B_ ...)
  shiftwcs DPIX     move CRPIX1 by DPIX pixels (a different WCS, same shape)
  crop NX NY        keep only the first NY rows and NX columns (a different shape)
  allnan            every pixel NaN
  setkey KEY VALUE  set KEY to VALUE (number if it parses, else string)
  fzcorrupt         rewrite as a RICE tile-compressed image (tiles of 4 rows x 64 columns, behind an
                    empty primary HDU) and cut tile 0 (rows 0-3, columns 0-63) short: the
                    header and the rows the plan samples stay readable, the cell that reads tile 0 fails
Uses Debian's python3-astropy only.
"""
import sys
import numpy as np
from astropy.io import fits

WCS_PREFIX = ("CTYPE", "CRVAL", "CRPIX", "CDELT", "CUNIT", "CD1_", "CD2_", "PC1_", "PC2_", "CROTA",
              "A_", "B_", "AP_", "BP_", "LONPOLE", "LATPOLE", "RADESYS", "EQUINOX", "WCSAXES")


def fzcorrupt(path):
    h = fits.open(path)[0]
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(h.data, h.header, compression_type="RICE_1", tile_size=(64, 4),
                                                       )]).writeto(path, overwrite=True)
    with fits.open(path, disable_image_compression=True) as hl:
        t = hl[1]
        assert t.columns.names[0] == "COMPRESSED_DATA", t.columns.names
        data_off = t._data_offset
        theap = t.header.get("THEAP", t.header["NAXIS1"] * t.header["NAXIS2"])
    # tile 0's heap descriptor (nbytes, offset): claim 6 bytes, so the RICE decoder runs out of input
    b = bytearray(open(path, "rb").read())
    b[data_off:data_off + 4] = np.array([6], dtype=">i4").tobytes()
    open(path, "wb").write(bytes(b))


def main():
    op, path = sys.argv[1], sys.argv[2]
    args = sys.argv[3:]
    if op == "fzcorrupt":
        return fzcorrupt(path)
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

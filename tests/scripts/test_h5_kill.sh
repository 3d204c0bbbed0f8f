#!/usr/bin/env bash
# test_h5_kill.sh — durability and interoperability of the HDF5 store layer (src/io/h5.c).
#  1. kill -9 writers (1 rank: POSIX driver, 2 ranks: MPI-IO) in the middle of their
#     independent raw writes, after the store was created and flushed: our reader
#     opens the file and every row is either the fill value or exactly what was
#     written; h5py (if present) opens it too and agrees.
#  2. a complete store written by 2 ranks reads in h5py as a structured array with
#     the right field names, dtypes, values, fill values and unit attributes
#     (and with astropy's Table.read if astropy is present).
#  3. disk full (a 2 MiB tmpfs in a private mount namespace): a clear "disk full"
#     message from the free-space check (1 and 2 ranks) and from HDF5's own
#     ENOSPC (1 rank), and no hang.
# Prints PASS:/FAIL:/SKIP: lines. The writer, checker and demo are modes of
# build/rel/tests/mpi/test_h5_mpi (env vars SP_H5_KILL_WRITER / _KILL_CHECK / _DEMO / _FILL).
set -u
cd "$(dirname "$0")/../.."
BUILD=${SP_BUILD:-build/rel}
T=$PWD/$BUILD/tests/mpi/test_h5_mpi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export OMP_NUM_THREADS=1
tmp=$(mktemp -d "${TMPDIR:-/tmp}/sph5kill.XXXXXX")
cleanup() { rm -rf "$tmp"; }
trap cleanup EXIT

if [ ! -x "$T" ]; then
  echo "FAIL: h5_kill_setup ($T is missing: run make tests)"
  exit 1
fi

# A python with h5py: the user's python3 first, then Debian's (python3-h5py).
PY=""
for p in python3 /usr/bin/python3; do
  if command -v "$p" >/dev/null 2>&1 && "$p" -c 'import h5py, numpy' >/dev/null 2>&1; then PY=$p; break; fi
done

# ---- 1. kill -9 in the middle of raw writes ---------------------------------
kill_test() {  # $1 = number of ranks
  local np=$1 f="$tmp/killed_np$1.h5" name="h5_kill9_np$1"
  SP_H5_KILL_WRITER="$f" mpirun -np "$np" --bind-to none -x SP_H5_KILL_WRITER "$T" >"$tmp/writer$np.log" 2>&1 &
  local mp=$!
  local i
  for i in $(seq 300); do [ -f "$f.ready" ] && break; sleep 0.1; done
  if [ ! -f "$f.ready" ]; then
    echo "FAIL: $name (writer never became ready)"; sed 's/^/    | /' "$tmp/writer$np.log" | tail -5
    kill "$mp" 2>/dev/null; wait "$mp" 2>/dev/null; return
  fi
  sleep 0.8   # let the ranks write part of the table
  local pids; pids=$(cat "$f.ready")
  # shellcheck disable=SC2086
  kill -9 $pids 2>/dev/null
  # mpirun notices its ranks died and exits; make sure it does.
  for i in $(seq 100); do kill -0 "$mp" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$mp" 2>/dev/null; then echo "  note: mpirun still running 10 s after its ranks died; killing it"; kill -9 "$mp" 2>/dev/null; fi
  wait "$mp" 2>/dev/null
  local out rc
  out=$(SP_H5_KILL_CHECK="$f" "$T" 2>&1); rc=$?
  echo "  np=$np after kill -9: $out"
  if [ $rc -ne 0 ]; then echo "FAIL: $name (our reader: rc=$rc)"; return; fi
  local written; written=$(echo "$out" | grep -o 'state=[a-z]* rows: [0-9]*' | grep -o '[0-9]*$')
  if echo "$out" | grep -q ' 0 fill,'; then
    echo "  note: the writers had finished before the kill (no fill rows left)"
  fi
  echo "PASS: $name"
  if [ -z "$PY" ]; then echo "SKIP: ${name}_h5py (no python3 with h5py; install python3-h5py)"; return; fi
  if "$PY" - "$f" "$written" <<'EOF'
import sys, h5py, numpy as np
f = h5py.File(sys.argv[1], "r")
want = int(sys.argv[2])
d = f["catalog"]
assert d.dtype.names == ("ID", "i", "ra", "dec", "flux_g", "flag"), d.dtype.names
a = d[...]
ok = a["i"] >= 0
i = a["i"][ok]
idx = np.nonzero(ok)[0]
assert np.array_equal(i, idx), "row number column wrong"
assert np.allclose(a["ra"][ok], 150.0 + i * 1e-6, rtol=0, atol=1e-12)
assert all(s == b"obj%07d" % k for s, k in zip(a["ID"][ok][:1000], i[:1000]))
fill = ~ok
assert np.all(np.isnan(a["ra"][fill])) and np.all(a["ID"][fill] == b"") and np.all(a["flag"][fill] == 0)
assert abs(int(ok.sum()) - want) <= 2, (int(ok.sum()), want)
assert d.attrs["ra_unit"] == "deg"
img = f["img"][...]
assert img.shape == (800, 1000)
assert f.attrs["state"] == "writing"
print("  h5py: %d written rows, %d fill rows, image %s" % (ok.sum(), fill.sum(), img.shape))
EOF
  then echo "PASS: ${name}_h5py"; else echo "FAIL: ${name}_h5py"; fi
}
kill_test 1
kill_test 2

# ---- 2. a complete store in h5py / astropy ----------------------------------
demo="$tmp/demo.h5"
if SP_H5_DEMO="$demo" mpirun -np 2 --bind-to none -x SP_H5_DEMO "$T" >"$tmp/demo.log" 2>&1; then
  echo "PASS: h5_demo_write_np2"
else
  echo "FAIL: h5_demo_write_np2"; sed 's/^/    | /' "$tmp/demo.log" | tail -5
fi
if [ -z "$PY" ]; then
  echo "SKIP: h5_h5py_table (no python3 with h5py; install python3-h5py)"
elif [ -f "$demo" ]; then
  if "$PY" - "$demo" <<'EOF'
import sys, h5py, numpy as np
f = h5py.File(sys.argv[1], "r")
d = f["catalog"]
# a packed structured array with our field names and dtypes
assert d.dtype.names == ("ID", "RA", "x", "i8", "u8", "n", "big"), d.dtype.names
kinds = [d.dtype[n].str for n in d.dtype.names]
assert kinds == ["|S10", "<f8", "<f4", "|i1", "|u1", "<i4", "<i8"], kinds
assert d.dtype.itemsize == 36, d.dtype.itemsize
a = d[...]
assert isinstance(a, np.ndarray) and a.shape == (10,)
for i in range(9):
    r = a[i]
    assert r["ID"] == b"id%d" % i and r["RA"] == 10.0 + i and r["x"] == np.float32(0.5 * i)
    assert r["i8"] == -i and r["u8"] == 200 + i and r["n"] == 3 * i and r["big"] == 5000000000 * i
z = a[9]  # never written: the fill values
assert z["ID"] == b"" and np.isnan(z["RA"]) and np.isnan(z["x"]) and z["i8"] == -1 and z["u8"] == 0
assert z["n"] == -1 and z["big"] == -1
# units and descriptions as plain str attributes
assert d.attrs["RA_unit"] == "deg" and d.attrs["x_unit"] == "pix", dict(d.attrs)
assert d.attrs["RA_description"] == "right ascension" and d.attrs["ID_description"] == "source identifier"
assert "n_unit" not in d.attrs
units = {c: d.attrs.get(c + "_unit", "") for c in d.dtype.names}
assert units["RA"] == "deg"
assert f.attrs["version"] == "demo"
g = f["epsf/g"][...]
assert g.shape == (2, 2, 3, 3) and g.dtype == np.float32
assert np.array_equal(g[1, 0], np.arange(9, dtype=np.float32).reshape(3, 3))
assert np.all(np.isnan(g[0])) and np.all(np.isnan(g[1, 1]))
print("  h5py: catalog dtype", d.dtype, "units", units)
try:
    from astropy.table import Table
except Exception:
    print("  astropy: not installed, not checked")
else:
    t = Table.read(sys.argv[1], path="catalog")
    assert t.colnames == list(d.dtype.names) and len(t) == 10
    for c in t.colnames:
        if d.attrs.get(c + "_unit"):
            t[c].unit = d.attrs[c + "_unit"]
    assert str(t["RA"].unit) == "deg"
    print("  astropy: Table.read ok,", len(t), "rows,", t["RA"].unit)
EOF
  then echo "PASS: h5_h5py_table"; else echo "FAIL: h5_h5py_table"; fi
fi
if command -v h5dump >/dev/null 2>&1 && [ -f "$demo" ]; then
  if h5dump -d /catalog "$demo" 2>&1 | grep -q '"id3"'; then echo "PASS: h5_h5dump_reads"; else echo "FAIL: h5_h5dump_reads"; fi
fi

# ---- 3. disk full ------------------------------------------------------------
mnt="$tmp/mnt"; mkdir -p "$mnt"
if ! unshare -m true 2>/dev/null; then
  echo "SKIP: h5_disk_full (cannot make a private mount namespace here: unshare -m failed)"
else
  full_test() {  # $1 ranks, $2 name, $3 extra env
    local out
    out=$(unshare -m sh -c "mount -t tmpfs -o size=2m tmpfs '$mnt' && \
          env SP_H5_FILL='$mnt/full.h5' SP_H5_FILL_MB=8 SP_H5_AGREE_TIMEOUT=5 $3 \
          timeout 120 mpirun -np $1 --bind-to none $T" 2>&1)
    if echo "$out" | grep -q '^rank 0 status 2 (I/O error): .*disk full'; then
      echo "  $(echo "$out" | grep -m1 '^rank 0 status')"
      echo "PASS: $2"
    else
      echo "FAIL: $2"; echo "$out" | tail -5 | sed 's/^/    | /'
    fi
  }
  full_test 1 h5_disk_full_check_np1 ""
  full_test 2 h5_disk_full_check_np2 ""
  full_test 1 h5_disk_full_hdf5_enospc_np1 "SP_H5_SKIP_SPACE_CHECK=1"
fi

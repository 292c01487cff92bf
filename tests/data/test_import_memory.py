"""Imports stream: a 256 MiB source converts with far less memory than the source holds.

Each import runs in a fresh process; its peak resident memory (VmHWM) is compared with that of
the same process importing a tiny source, so the libraries' own footprint cancels out.
"""
from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import ROOT

SOURCE_MIB = 256
ROW = 1024                       # float32 values per example: 4 KiB
BUDGET_MIB = 128                 # what the conversion may add: half the source (slices are 32 MiB)

CHILD = """
import sys
from pathlib import Path
from fedmpi.data.natural import Options
kind, source, out, test = sys.argv[1:5]
if kind == "tff":
    from fedmpi.data.tff import import_tff
    import_tff(Path(source), Path(test), "x", "y", Options(Path(out)))
else:
    from fedmpi.data.npz import import_npz
    import_npz(Path(source), Options(Path(out), test_fraction=0.1))
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent through fork and exec.
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) // 1024)
"""


def tff_source(path, rows):
    """A TFF file of four clients; the first holds half of the rows."""
    block = np.random.default_rng(0).random((1024, ROW), dtype=np.float32)
    with h5py.File(path, "w") as f:
        for client, n in enumerate((rows // 2, rows // 4, rows // 8, rows - rows // 2 - rows // 4 - rows // 8)):
            x = f.create_dataset(f"examples/c{client}/x", (n, ROW), np.float32)
            for start in range(0, n, len(block)):
                x[start:start + len(block)] = block[:n - start]
            f[f"examples/c{client}/y"] = np.arange(n) % 7
    return path


def npz_source(path, rows):
    """A compressed npz (members stream through zlib); compressible, so it is quick to write."""
    x = np.tile(np.random.default_rng(0).random((64, ROW), dtype=np.float32), (rows // 64, 1))
    np.savez_compressed(path, x=x, y=np.arange(rows) % 7, client_id=np.arange(rows) % 9)
    return path


def peak_mib(kind, source, out, test) -> int:
    proc = subprocess.run([sys.executable, "-c", CHILD, kind, str(source), str(out), str(test)], capture_output=True,
                          text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.split()[-1])


@pytest.mark.parametrize("kind, make", [("tff", tff_source), ("npz", npz_source)])
def test_memory_stays_far_below_the_source_size(tmp_path, kind, make):
    rows = SOURCE_MIB * 2**20 // (4 * ROW)
    big = make(tmp_path / f"big.{kind}", rows)
    small = make(tmp_path / f"small.{kind}", 64 * 4)  # also the TFF test file: a few rows of each client
    baseline = peak_mib(kind, small, tmp_path / "small.h5", small)
    peak = peak_mib(kind, big, tmp_path / "big.h5", small)
    with h5py.File(tmp_path / "big.h5") as f:
        assert len(f["train/x"]) + (len(f["local_test/x"]) if kind == "npz" else 0) == rows  # all of the source
    print(f"{kind}: peak {peak} MiB, baseline {baseline} MiB, source {SOURCE_MIB} MiB")
    assert peak - baseline < BUDGET_MIB, (peak, baseline)

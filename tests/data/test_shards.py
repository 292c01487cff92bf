import subprocess
import sys

import h5py
import numpy as np
import pytest

from fedmpi.data.partition import offsets_of
from fedmpi.data.shards import FORMAT_VERSION, read_attrs, read_nodes, read_test, write_shards
from fedmpi.errors import DataError


def make_file(path, sizes=(3, 0, 5, 2)):
    parts = [np.full(n, i) for i, n in enumerate(sizes)]
    offsets = offsets_of(parts)
    x = np.arange(offsets[-1] * 4, dtype=np.uint8).reshape(-1, 1, 2, 2)
    y = np.concatenate(parts).astype(np.int64)  # row's label = its node id
    test = (np.ones((6, 1, 2, 2), np.uint8), np.arange(6))
    write_shards(path, {"dataset": "t", "num_nodes": len(sizes), "input_shape": [1, 2, 2]},
                 train=(x, y, offsets), local_test=(x[:4], y[:4], np.array([0, 1, 2, 3, 4])), test=test)
    return x, y, offsets


def test_round_trip_reads_exactly_the_rows_of_the_requested_nodes(tmp_path):
    path = tmp_path / "s.h5"
    x, y, offsets = make_file(path)
    block = read_nodes(path, "train", 1, 3)  # nodes 1 (empty) and 2
    assert block.offsets.tolist() == [0, 0, 5] and block.counts.tolist() == [0, 5]
    assert np.array_equal(block.x, x[3:8]) and set(block.y.tolist()) == {2}
    nx, ny = block.node(2)
    assert np.array_equal(nx, x[3:8]) and len(block.node(1)[1]) == 0
    tx, ty = read_test(path)
    assert tx.shape == (6, 1, 2, 2) and ty.tolist() == list(range(6))
    attrs = read_attrs(path)
    assert attrs["format_version"] == FORMAT_VERSION and attrs["input_shape"] == [1, 2, 2]


def test_file_is_opened_read_only_without_locking(tmp_path):
    path = tmp_path / "s.h5"
    make_file(path)
    # Another process holds the file with an HDF5 write lock, as a stuck job might on a cluster FS.
    holder = subprocess.Popen([sys.executable, "-c", "import h5py, sys, time\n"
                               f"f = h5py.File({str(path)!r}, 'r+', locking=True)\nprint('held', flush=True)\n"
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OSError):
            h5py.File(path, "r", locking=True)  # a locking reader is refused...
        assert read_nodes(path, "train", 0, 1).counts.tolist() == [3]  # ...fedmpi's reader is not
    finally:
        holder.kill()
        holder.wait()


def test_missing_file_not_hdf5_other_version_and_missing_dataset(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_attrs(tmp_path / "nope.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not an hdf5 file at all")
    with pytest.raises(DataError, match=f"{junk} is not a readable HDF5 file"):
        read_attrs(junk)
    old = tmp_path / "old.h5"
    make_file(old)
    with h5py.File(old, "r+") as f:
        f.attrs["format_version"] = 99
        del f["test/y"]
    with pytest.raises(DataError, match="format_version 99, fedmpi reads 1"):
        read_test(old)
    with h5py.File(old, "r+") as f:
        f.attrs["format_version"] = FORMAT_VERSION
    with pytest.raises(DataError, match="dataset /test/y is missing"):
        read_test(old)


def test_asking_for_nodes_beyond_the_file_is_an_error(tmp_path):
    path = tmp_path / "s.h5"
    make_file(path)
    with pytest.raises(DataError, match="nodes 2..4 not in /train .4 nodes"):
        read_nodes(path, "train", 2, 5)


def test_write_is_atomic_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "sub" / "s.h5"
    make_file(path)
    assert [p.name for p in path.parent.iterdir()] == ["s.h5"]

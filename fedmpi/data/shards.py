"""The HDF5 shard file: node-contiguous training shards, local test splits and the test set.

Layout (FORMAT_VERSION 1):
  /train/x        uint8 [N, C, H, W]  all nodes' training images, node after node
  /train/y        int64 [N]
  /train/offsets  int64 [nodes + 1]   node i owns rows offsets[i]:offsets[i+1]
  /local_test/{x,y,offsets}           each node's local test split, same scheme
  /test/{x,y}                         the whole test set (the main model is scored on it)
  attrs: format_version, dataset, partition, seed, num_nodes, classes, input_shape,
         samples_per_node, test_per_node, pixel_scale

Files are opened read-only with HDF5 file locking off: cluster file systems (Lustre, GPFS,
NFS) often refuse or hang on flock, and nothing here writes while ranks read.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..errors import DataError

FORMAT_VERSION = 1
GROUPS = ("train", "local_test")
# What h5py raises for damaged metadata or data; each becomes a DataError naming the file.
READ_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError)


@dataclass
class NodeShards:
    """A contiguous block of nodes' rows (x uint8, y int64) and their offsets, rebased to 0."""

    first_node: int
    x: np.ndarray
    y: np.ndarray
    offsets: np.ndarray

    def node(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i - self.first_node], self.offsets[i - self.first_node + 1]
        return self.x[a:b], self.y[a:b]

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)


def write_shards(path: Path, attrs: dict, train: tuple, local_test: tuple, test: tuple) -> None:
    """Write the file atomically: a reader never sees half a file (temp name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with h5py.File(tmp, "w", locking=False) as f:
        for name, (x, y, offsets) in zip(GROUPS, (train, local_test)):
            g = f.create_group(name)
            g.create_dataset("x", data=x)
            g.create_dataset("y", data=y.astype(np.int64))
            g.create_dataset("offsets", data=offsets.astype(np.int64))
        g = f.create_group("test")
        g.create_dataset("x", data=test[0])
        g.create_dataset("y", data=test[1].astype(np.int64))
        f.attrs["format_version"] = FORMAT_VERSION
        for key, value in attrs.items():
            f.attrs[key] = value
    os.replace(tmp, path)


def open_shards(path: Path) -> h5py.File:
    if not path.is_file():
        raise DataError(f"shard file {path} does not exist (run `fedmpi prepare` or let `fedmpi run` create it)")
    try:
        f = h5py.File(path, "r", locking=False)
    except READ_ERRORS as err:
        raise DataError(f"shard file {path} is not a readable HDF5 file: {err}") from None
    try:
        version = f.attrs.get("format_version")
        # An array or string attribute must not reach `!=`: its truth value is not a bool.
        ok = isinstance(version, (int, np.integer)) and version == FORMAT_VERSION
    except READ_ERRORS as err:
        f.close()
        raise DataError(f"shard file {path}: attribute format_version cannot be read ({err})") from None
    if not ok:
        f.close()
        shown = version.tolist() if isinstance(version, (np.ndarray, np.generic)) else version
        raise DataError(f"shard file {path} has format_version {shown!r}, fedmpi reads {FORMAT_VERSION}")
    return f


def read_attrs(path: Path) -> dict:
    with open_shards(path) as f:
        return {k: (v.tolist() if isinstance(v, (np.ndarray, np.generic)) else v) for k, v in f.attrs.items()}


def read_nodes(path: Path, group: str, first: int, stop: int) -> NodeShards:
    """Read only the rows of nodes first..stop-1 from `group` ('train' or 'local_test')."""
    with open_shards(path) as f:
        try:
            g = f[group]
            offsets = g["offsets"][:]
            if stop >= len(offsets) or first < 0:
                raise DataError(f"shard file {path}: nodes {first}..{stop - 1} not in /{group} "
                                f"({len(offsets) - 1} nodes)")
            a, b = int(offsets[first]), int(offsets[stop])
            x, y = g["x"][a:b], g["y"][a:b]
        except READ_ERRORS as err:
            raise DataError(f"shard file {path}: missing dataset or damaged data ({err})") from None
    return NodeShards(first, x, y, offsets[first:stop + 1] - offsets[first])


def read_offsets(path: Path, group: str) -> np.ndarray:
    """Every node's row offsets in `group` (small: nodes + 1 integers)."""
    with open_shards(path) as f:
        try:
            return f[group]["offsets"][:]
        except KeyError as err:
            raise DataError(f"shard file {path}: missing dataset ({err})") from None


def read_test(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open_shards(path) as f:
        try:
            return f["test/x"][:], f["test/y"][:]
        except READ_ERRORS as err:
            raise DataError(f"shard file {path}: missing dataset or damaged data ({err})") from None

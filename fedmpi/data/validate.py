"""Check a whole shard file before any rank trains on it: one DataError line naming file, dataset and problem.

Everything but the labels is metadata (attributes, shapes, dtypes, the small offsets arrays);
labels are read in chunks so a file of any size is checked in bounded memory.
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from ..errors import DataError
from .shards import GROUPS, READ_ERRORS, open_shards

LABEL_CHUNK = 1 << 20  # labels read per step: 8 MiB of int64
INT_ATTRS = ("seed", "num_nodes", "classes", "samples_per_node", "test_per_node")
STR_ATTRS = ("dataset", "partition")


def validate_shards(path: Path) -> dict:
    """Raise DataError unless `path` is a complete, consistent shard file; returns its attributes."""
    with open_shards(path) as f:
        try:
            attrs = check_attrs(path, f.attrs)
            for group in GROUPS:
                check_group(path, f, group, attrs, empty_nodes_ok=group != "train")
            n = check_xy(path, f, "test", attrs)
            if n == 0:
                raise DataError(f"shard file {path}: /test has no samples")
        except DataError:
            raise
        except READ_ERRORS as err:
            # h5py reports damaged metadata or chunks in many ways; all of them mean a bad file.
            raise DataError(f"shard file {path}: cannot be read ({one_line(err)})") from None
    return attrs


def check_attrs(path: Path, raw: h5py.AttributeManager) -> dict:
    """Every attribute fedmpi uses is present and of the right type and range."""
    attrs = {k: raw[k] for k in raw.keys()}
    for key in INT_ATTRS + STR_ATTRS + ("input_shape", "pixel_scale"):
        if key not in attrs:
            raise DataError(f"shard file {path}: attribute '{key}' is missing")
    for key in INT_ATTRS:
        if not is_int(attrs[key]) or attrs[key] < 0:
            raise DataError(f"shard file {path}: attribute '{key}' must be a non-negative integer, "
                            f"got {show(attrs[key])}")
    for key in ("num_nodes", "classes"):
        if attrs[key] < 1:
            raise DataError(f"shard file {path}: attribute '{key}' must be >= 1, got {show(attrs[key])}")
    for key in STR_ATTRS:
        if not isinstance(attrs[key], str):
            raise DataError(f"shard file {path}: attribute '{key}' must be a string, got {show(attrs[key])}")
    shape = np.asarray(attrs["input_shape"])
    if shape.ndim != 1 or len(shape) == 0 or shape.dtype.kind not in "iu" or (shape < 1).any():
        raise DataError(f"shard file {path}: attribute 'input_shape' must be positive integers, got {show(shape)}")
    scale = attrs["pixel_scale"]
    if not isinstance(scale, (float, np.floating)) or not np.isfinite(scale) or scale <= 0:
        raise DataError(f"shard file {path}: attribute 'pixel_scale' must be a positive float, got {show(scale)}")
    return {k: plain(v) for k, v in attrs.items()}


def check_group(path: Path, f: h5py.File, group: str, attrs: dict, empty_nodes_ok: bool) -> None:
    """x, y and offsets of a node-sharded group agree with each other and with the attributes."""
    n = check_xy(path, f, group, attrs)
    offsets = dataset(path, f, f"{group}/offsets")
    where = f"shard file {path}: /{group}/offsets"
    if offsets.dtype.kind not in "iu" or offsets.ndim != 1:
        raise DataError(f"{where} must be a 1-d integer array, got {offsets.dtype} {list(offsets.shape)}")
    if len(offsets) != attrs["num_nodes"] + 1:
        nodes = attrs["num_nodes"]
        raise DataError(f"{where} has {len(offsets)} entries, num_nodes={nodes} needs {nodes + 1}")
    o = offsets[:].astype(np.int64)
    if o[0] != 0:
        raise DataError(f"{where} must start at 0, starts at {o[0]}")
    steps = np.diff(o)
    if (steps < 0).any():
        i = int(np.flatnonzero(steps < 0)[0])
        raise DataError(f"{where} is not monotonic: offsets[{i}]={o[i]} > offsets[{i + 1}]={o[i + 1]}")
    if o[-1] != n:
        side = "past" if o[-1] > n else "short of"
        raise DataError(f"{where} ends {side} the data: at {o[-1]}, /{group}/x has {n} rows")
    if not empty_nodes_ok and (steps == 0).any():
        raise DataError(f"{where}: node {int(np.flatnonzero(steps == 0)[0])} has zero samples")


def check_xy(path: Path, f: h5py.File, group: str, attrs: dict) -> int:
    """x is uint8 [N, *input_shape], y integer [N] with labels in [0, classes); returns N."""
    x, y = dataset(path, f, f"{group}/x"), dataset(path, f, f"{group}/y")
    shape = tuple(attrs["input_shape"])
    if x.dtype != np.uint8:
        raise DataError(f"shard file {path}: /{group}/x has dtype {x.dtype}, expected uint8")
    if x.ndim != 1 + len(shape) or tuple(x.shape[1:]) != shape:
        want = ", ".join(["N", *map(str, shape)])
        raise DataError(f"shard file {path}: /{group}/x has shape {list(x.shape)}, expected [{want}]")
    if y.dtype.kind not in "iu" or y.shape != (x.shape[0],):
        raise DataError(f"shard file {path}: /{group}/y is {y.dtype} {list(y.shape)}, expected integer [{x.shape[0]}]")
    check_labels(path, y, f"/{group}/y", attrs["classes"])
    return x.shape[0]


def check_labels(path: Path, y: h5py.Dataset, name: str, classes: int) -> None:
    """Every label in [0, classes), read LABEL_CHUNK rows at a time."""
    for start in range(0, y.shape[0], LABEL_CHUNK):
        chunk = y[start:start + LABEL_CHUNK]
        bad = np.flatnonzero((chunk < 0) | (chunk >= classes))
        if len(bad):
            row = start + int(bad[0])
            raise DataError(f"shard file {path}: {name}[{row}] = {chunk[bad[0]]} is outside the classes [0, {classes})")


def dataset(path: Path, f: h5py.File, name: str) -> h5py.Dataset:
    """The dataset at `name`, or a DataError naming it."""
    obj = f.get(name)
    if not isinstance(obj, h5py.Dataset):
        raise DataError(f"shard file {path}: dataset /{name} is missing")
    return obj


def is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def plain(value):
    """numpy scalars and arrays as Python values (so messages read `2`, not `np.int64(2)`)."""
    return value.tolist() if isinstance(value, (np.ndarray, np.generic)) else value


def show(value) -> str:
    return repr(plain(value))


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__

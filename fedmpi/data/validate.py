"""Check a whole shard file before any rank trains on it: one DataError line naming file, dataset and problem.

First everything that costs no data: the file's links (h5check.check_links, in open_shards), its
attributes, every dataset's shape, dtype and storage (all of it must be in the file: h5check), and
the sizes against fixed caps. Only then the data: the small offsets arrays, the client ids, and the
labels in chunks, so a file of any size is checked in bounded memory and in time bounded by what it
really holds. float32 inputs are checked for NaN and Inf where they are read (shards.read_nodes,
read_test): each rank reads its own rows anyway, so no rank reads the whole file for that check.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import h5py
import numpy as np

from ..errors import DataError
from .files import quote, reason
from .h5check import READ_ERRORS, attr_names, attr_value, read_rows, stored_dataset
from .shards import GROUPS, open_shards, plain

LABEL_CHUNK = 1 << 20  # labels read per step: 8 MiB of int64
INT_ATTRS = ("seed", "num_nodes", "classes", "samples_per_node", "test_per_node")
STR_ATTRS = ("dataset", "partition")
# Far beyond any dataset fedmpi trains on, and small enough that what they imply can be allocated.
MAX_NODES = 1_000_000               # offsets arrays of 8 MB
MAX_CLASSES = 100_000               # the model's output layer; ImageNet-21k has 21,841
MAX_ROWS = 1_000_000_000            # rows of one group
MAX_SAMPLE_VALUES = 1 << 24         # values of one image (4096 x 4096)
MAX_INPUT_DIMS = 8
MAX_HISTOGRAM_CELLS = 1 << 24       # nodes x classes label counts (describe, report)
MAX_ID_BYTES = 256                  # one client id, UTF-8 (TFF's are about 10)
ID_CHUNK = 1 << 16                  # client ids decoded per step
X_DTYPES = (np.dtype("uint8"), np.dtype("<f4"))  # little-endian float32: what torch reads without a copy


ALL_LABELS = ("train", "local_test", "test")
RUN_LABELS = ("test",)  # a run: rank 0 scans the test set's, each rank its own nodes' (check_block_labels)


def validate_shards(path: Path, labels: tuple[str, ...] = ALL_LABELS) -> dict:
    """Raise DataError unless `path` is a complete, consistent shard file; returns its attributes.

    `labels`: the groups whose labels are scanned besides the structure (attributes, datasets, offsets,
    ids); a run passes RUN_LABELS, as each rank checks its own nodes' labels (check_block_labels), so no
    rank reads them all.
    """
    with open_shards(path) as f:
        try:
            attrs = check_attrs(path, f.attrs)
            data = {group: check_xy(path, f, group, attrs) for group in (*GROUPS, "test")}
            check_x_dtype(path, attrs, {group: x.dtype for group, (x, _) in data.items()})
            offsets = {group: check_offsets_meta(path, f, group, attrs) for group in GROUPS}
            ids = check_ids_meta(path, f, attrs)
            for group in GROUPS:  # metadata all checked: now the data
                check_offsets(path, group, read_rows(path, offsets[group]), len(data[group][1]),
                              empty_nodes_ok=group != "train")
            if ids is not None:
                check_ids(path, ids)
            for group, (_, y) in ((g, d) for g, d in data.items() if g in labels):
                check_labels(path, y, f"/{group}/y", attrs["classes"])
            if len(data["test"][1]) == 0:
                raise DataError(f"shard file {path}: /test has no samples")
        except READ_ERRORS as err:
            # h5py reports damaged metadata or chunks in many ways; all of them mean a bad file.
            raise DataError(f"shard file {path}: cannot be read ({reason(err)})") from None
    return attrs


def check_attrs(path: Path, raw: h5py.AttributeManager) -> dict:
    """Every attribute fedmpi uses is present and of the right type and range."""
    attrs = {k: attr_value(path, raw, k) for k in attr_names(path, raw)}
    for key in INT_ATTRS + STR_ATTRS + ("input_shape",):
        if key not in attrs:
            raise DataError(f"shard file {path}: attribute '{key}' is missing")
    for key in INT_ATTRS:
        if not is_int(attrs[key]) or attrs[key] < 0:
            raise DataError(f"shard file {path}: attribute '{key}' must be a non-negative integer, "
                            f"got {quote(attrs[key])}")
    for key, cap in (("num_nodes", MAX_NODES), ("classes", MAX_CLASSES)):
        if not 1 <= attrs[key] <= cap:
            raise DataError(f"shard file {path}: attribute '{key}' must be in [1, {cap:,}], got {attrs[key]}")
    for key in STR_ATTRS:
        if not isinstance(attrs[key], str):
            raise DataError(f"shard file {path}: attribute '{key}' must be a string, got {quote(attrs[key])}")
    check_input_shape(path, attrs["input_shape"])
    scale = attrs.get("pixel_scale", 1.0)  # required for uint8 inputs: check_x_dtype
    if not isinstance(scale, (float, np.floating)) or not np.isfinite(scale) or scale <= 0:
        raise DataError(f"shard file {path}: attribute 'pixel_scale' must be a positive float, got {quote(scale)}")
    return {k: plain(v) for k, v in attrs.items()}


def check_x_dtype(path: Path, attrs: dict, dtypes: dict) -> None:
    """One input dtype in every group; uint8 images need pixel_scale (float32 inputs are used as they are)."""
    first = dtypes["train"]
    for group, dtype in dtypes.items():
        if dtype != first:
            raise DataError(f"shard file {path}: /{group}/x has dtype {dtype}, /train/x has {first}; "
                            f"every group holds the same input dtype")
    if first == np.uint8 and "pixel_scale" not in attrs:
        raise DataError(f"shard file {path}: attribute 'pixel_scale' is missing (uint8 inputs need it)")


def check_input_shape(path: Path, value) -> None:
    shape = np.asarray(value)
    if shape.ndim != 1 or not 0 < len(shape) <= MAX_INPUT_DIMS or shape.dtype.kind not in "iu" or (shape < 1).any():
        raise DataError(f"shard file {path}: attribute 'input_shape' must be 1 to {MAX_INPUT_DIMS} positive "
                        f"integers, got {quote(value)}")
    if math.prod(shape.tolist()) > MAX_SAMPLE_VALUES:
        raise DataError(f"shard file {path}: attribute 'input_shape' {shape.tolist()} has more than "
                        f"{MAX_SAMPLE_VALUES:,} values per sample")


def check_xy(path: Path, f: h5py.File, group: str, attrs: dict) -> tuple[h5py.Dataset, h5py.Dataset]:
    """x is uint8 or float32 [N, *input_shape], y integer [N], both wholly in the file; returns (x, y).
    Reads no data."""
    x, y = stored_dataset(path, f, f"{group}/x"), stored_dataset(path, f, f"{group}/y")
    shape = tuple(attrs["input_shape"])
    if x.dtype not in X_DTYPES:
        raise DataError(f"shard file {path}: /{group}/x has dtype {x.dtype.str}, expected uint8 or float32 "
                        f"(little-endian)")
    if x.ndim != 1 + len(shape) or tuple(x.shape[1:]) != shape:
        want = ", ".join(["N", *map(str, shape)])
        raise DataError(f"shard file {path}: /{group}/x has shape {list(x.shape)}, expected [{want}]")
    if y.dtype.kind not in "iu" or y.shape != (x.shape[0],):
        raise DataError(f"shard file {path}: /{group}/y is {y.dtype} {list(y.shape)}, expected integer [{x.shape[0]}]")
    if x.shape[0] > MAX_ROWS:
        raise DataError(f"shard file {path}: /{group} has {x.shape[0]:,} rows, more than the {MAX_ROWS:,} "
                        f"fedmpi reads")
    return x, y


def check_offsets_meta(path: Path, f: h5py.File, group: str, attrs: dict) -> h5py.Dataset:
    """offsets is a 1-d integer array of num_nodes + 1 entries, wholly in the file. Reads no data."""
    offsets = stored_dataset(path, f, f"{group}/offsets")
    where = f"shard file {path}: /{group}/offsets"
    if offsets.dtype.kind not in "iu" or offsets.ndim != 1:
        raise DataError(f"{where} must be a 1-d integer array, got {offsets.dtype} {list(offsets.shape)}")
    if len(offsets) != attrs["num_nodes"] + 1:
        nodes = attrs["num_nodes"]
        raise DataError(f"{where} has {len(offsets):,} entries, num_nodes={nodes} needs {nodes + 1}")
    return offsets


def check_ids_meta(path: Path, f: h5py.File, attrs: dict) -> h5py.Dataset | None:
    """/train/client_ids, when present: fixed-length strings, one per node. Reads no data."""
    if "client_ids" not in f["train"]:
        return None
    ids = stored_dataset(path, f, "train/client_ids")
    where = f"shard file {path}: /train/client_ids"
    if ids.dtype.kind != "S" or not 0 < ids.dtype.itemsize <= MAX_ID_BYTES:
        raise DataError(f"{where} must hold fixed-length strings of at most {MAX_ID_BYTES} bytes, "
                        f"got {ids.dtype} {list(ids.shape)}")
    if ids.shape != (attrs["num_nodes"],):
        raise DataError(f"{where} has shape {list(ids.shape)}, num_nodes={attrs['num_nodes']} needs "
                        f"[{attrs['num_nodes']}]")
    return ids


def check_ids(path: Path, ids: h5py.Dataset) -> None:
    """Every client id is non-empty UTF-8 text, read ID_CHUNK ids at a time."""
    for start in range(0, len(ids), ID_CHUNK):
        decode_ids(path, read_rows(path, ids, start, start + ID_CHUNK), start)


def decode_ids(path: Path, raw: np.ndarray, start: int) -> list[str]:
    """Client ids as text; one that is empty or not UTF-8 is a DataError naming its node."""
    out = []
    for i, value in enumerate(raw.tolist()):
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"shard file {path}: /train/client_ids[{start + i}] = {quote(value)} is not "
                            f"UTF-8 text") from None
        if not text:
            raise DataError(f"shard file {path}: /train/client_ids[{start + i}] is empty")
        out.append(text)
    return out


def check_offsets(path: Path, group: str, offsets: np.ndarray, n: int, empty_nodes_ok: bool) -> None:
    """offsets start at 0, never decrease and end at the row count n."""
    where = f"shard file {path}: /{group}/offsets"
    if offsets.dtype.kind == "u" and offsets.max(initial=0) > np.iinfo(np.int64).max:
        raise DataError(f"{where} holds {offsets.max()}, more than any row count")
    o = offsets.astype(np.int64)
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


def check_labels(path: Path, y: h5py.Dataset, name: str, classes: int, first: int = 0,
                 stop: Optional[int] = None) -> None:
    """Every label of rows first..stop-1 (all by default) in [0, classes), read LABEL_CHUNK rows at a time."""
    stop = y.shape[0] if stop is None else stop
    for start in range(first, stop, LABEL_CHUNK):
        chunk = read_rows(path, y, start, min(stop, start + LABEL_CHUNK))
        bad = np.flatnonzero((chunk < 0) | (chunk >= classes))
        if len(bad):
            row = start + int(bad[0])
            raise DataError(f"shard file {path}: {name}[{row}] = {chunk[bad[0]]} is outside the classes [0, {classes})")


def check_block_labels(path: Path, ranks: int, rank: int) -> None:
    """The labels of this rank's nodes (placed as the run places them) in /train and /local_test, of a
    file whose structure rank 0 has checked: each rank reads its own share, no rank all of them."""
    from .partition import node_ranges

    with open_shards(path) as f:
        try:
            classes = int(attr_value(path, f.attrs, "classes"))
            groups = {g: read_rows(path, stored_dataset(path, f, f"{g}/offsets")).astype(np.int64) for g in GROUPS}
            mine = node_ranges(len(groups["train"]) - 1, ranks, groups["train"])[rank]
            for group, offsets in groups.items():
                y = stored_dataset(path, f, f"{group}/y")
                check_labels(path, y, f"/{group}/y", classes, int(offsets[mine.start]), int(offsets[mine.stop]))
        except READ_ERRORS as err:
            raise DataError(f"shard file {path}: cannot be read ({reason(err)})") from None


def histogram_fits(attrs: dict) -> bool:
    """Whether a [nodes, classes] table of label counts is small enough to build."""
    return attrs["num_nodes"] * attrs["classes"] <= MAX_HISTOGRAM_CELLS


def label_counts(path: Path, attrs: dict) -> np.ndarray:
    """[nodes, classes] training label counts of a validated file, reading LABEL_CHUNK labels at a time."""
    nodes, classes = attrs["num_nodes"], attrs["classes"]
    counts = np.zeros((nodes, classes), np.int64)
    with open_shards(path) as f:
        try:
            offsets = read_rows(path, stored_dataset(path, f, "train/offsets")).astype(np.int64)
            y = stored_dataset(path, f, "train/y")
            for start in range(0, len(y), LABEL_CHUNK):
                labels = read_rows(path, y, start, start + LABEL_CHUNK).astype(np.int64)
                node = np.searchsorted(offsets, np.arange(start, start + len(labels)), side="right") - 1
                lo, hi = int(node[0]), int(node[-1]) + 1  # only the nodes this chunk touches
                cells = np.bincount((node - lo) * classes + labels, minlength=(hi - lo) * classes)
                counts[lo:hi] += cells.reshape(hi - lo, classes)
        except READ_ERRORS as err:
            raise DataError(f"shard file {path}: /train cannot be read ({reason(err)})") from None
    return counts


def is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))

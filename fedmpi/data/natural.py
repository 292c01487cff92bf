"""What the importers share (tff.py, npz.py): one node per client of the source data, a "natural" partition.

A source is untrusted: every client id, input dtype and shape and every label is checked, and an
error names the file, the client and the field. Inputs are converted a bounded slice at a time:
uint8 stays uint8 (pixel_scale 1/255 unless --pixel-scale), every other numeric dtype becomes float32
and must be finite.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, TextIO

import numpy as np

from ..errors import DataError
from .files import clip, quote
from .validate import MAX_CLASSES, MAX_ID_BYTES, MAX_INPUT_DIMS, MAX_NODES, MAX_ROWS, MAX_SAMPLE_VALUES

COPY_BYTES = 32 << 20  # source inputs read and converted per step
FLOAT32 = np.dtype("<f4")


@dataclass(frozen=True)
class Options:
    """How to import: the command line's choices."""

    out: Path
    classes: Optional[int] = None          # None: the largest label + 1
    sample_shape: Optional[tuple] = None   # --reshape: each sample's new shape (same number of values)
    channels_last: bool = False            # move the last axis of a sample first (HWC -> CHW)
    pixel_scale: Optional[float] = None    # None: 1/255 for uint8 inputs, 1.0 for the others
    seed: int = 0
    test_fraction: float = 0.2             # npz without x_test: each client's share of test examples


@dataclass(frozen=True)
class InputSpec:
    """A source's inputs (dtype and per-sample shape) and what the shard file holds of them."""

    src_dtype: np.dtype
    src_shape: tuple
    out_shape: tuple
    channels_last: bool

    @property
    def out_dtype(self) -> np.dtype:
        return np.dtype(np.uint8) if self.src_dtype == np.uint8 else FLOAT32

    @property
    def row_values(self) -> int:
        return math.prod(self.src_shape)

    def rows_per_step(self) -> int:
        """Rows converted at a time: COPY_BYTES of source or output, whichever is larger."""
        return max(1, COPY_BYTES // (self.row_values * max(self.src_dtype.itemsize, 4)))

    def convert(self, x: np.ndarray, where: str, first_row: int) -> np.ndarray:
        """Source rows -> the file's rows: cast, NaN/Inf refused (naming the row), reshaped."""
        out = x.astype(self.out_dtype, copy=False)
        if out.dtype.kind == "f":
            bad = np.flatnonzero(~np.isfinite(out.reshape(len(out), -1)).all(axis=1))
            if len(bad):
                row = int(bad[0])
                value = float(x[row].reshape(-1)[~np.isfinite(out[row].reshape(-1))][0])
                raise DataError(f"{where} row {first_row + row} holds {value} (inputs must be finite float32 "
                                f"numbers)")
        if self.channels_last:
            out = np.moveaxis(out, -1, 1)
        return np.ascontiguousarray(out).reshape(len(out), *self.out_shape)


def input_spec(dtype: np.dtype, shape: tuple, opts: Options, where: str) -> InputSpec:
    """Check a source's input dtype and per-sample shape (and --reshape, --channels-last) against the caps."""
    check_input_dtype(dtype, where)
    if not 1 <= len(shape) <= MAX_INPUT_DIMS:
        raise DataError(f"{where} has samples of shape {list(shape)}; fedmpi takes 1 to {MAX_INPUT_DIMS} dimensions "
                        f"per sample")
    values = math.prod(shape)
    if values == 0 or values > MAX_SAMPLE_VALUES:
        raise DataError(f"{where} has samples of shape {list(shape)} ({values:,} values); fedmpi takes 1 to "
                        f"{MAX_SAMPLE_VALUES:,} values per sample")
    moved = (shape[-1], *shape[:-1]) if opts.channels_last else tuple(shape)
    if opts.channels_last and len(shape) < 2:
        raise DataError(f"{where} has samples of shape {list(shape)}: --channels-last needs 2 or more dimensions")
    out = tuple(opts.sample_shape) if opts.sample_shape else moved
    if math.prod(out) != values:
        raise DataError(f"--reshape {','.join(map(str, out))} has {math.prod(out):,} values, the samples of {where} "
                        f"have {values:,} (shape {list(shape)})")
    return InputSpec(np.dtype(dtype), tuple(shape), out, opts.channels_last)


def check_input_dtype(dtype: np.dtype, where: str) -> None:
    if dtype.kind not in "uif" or dtype.names or dtype.subdtype:
        raise DataError(f"{where} has dtype {dtype}; fedmpi imports numeric inputs (integers or floats; strings "
                        f"must be turned into numbers first)")


def same_inputs(spec: InputSpec, dtype: np.dtype, shape: tuple, where: str, first: str) -> None:
    """Every client's inputs have the first client's dtype and sample shape."""
    check_input_dtype(np.dtype(dtype), where)
    if np.dtype(dtype) != spec.src_dtype or tuple(shape) != spec.src_shape:
        raise DataError(f"{where} is {np.dtype(dtype)} with samples {list(shape)}, {first} is {spec.src_dtype} with "
                        f"samples {list(spec.src_shape)}; inputs must agree between clients")


def check_label_dtype(dtype: np.dtype, where: str) -> None:
    if dtype.kind not in "iu":
        raise DataError(f"{where} has dtype {dtype}; labels must be integers (class indices 0, 1, ...)")


def label_max(y: np.ndarray, where: str, first_row: int) -> int:
    """The largest label in `y` (integers); a negative one or one beyond the class cap is a DataError."""
    if len(y) == 0:
        return -1
    low, high = y.min(), y.max()
    if low < 0:
        row = int(np.flatnonzero(y < 0)[0])
        raise DataError(f"{where} row {first_row + row} is {y[row]}; labels must be class indices 0, 1, ...")
    if high >= MAX_CLASSES:
        row = int(np.flatnonzero(y >= MAX_CLASSES)[0])
        raise DataError(f"{where} row {first_row + row} is {y[row]}; a shard file holds at most {MAX_CLASSES:,} "
                        f"classes")
    return int(high)


def classes_of(max_label: int, opts: Options, where: str) -> int:
    """--classes, or the largest label + 1; a label at or beyond --classes is refused."""
    if opts.classes is None:
        return max_label + 1
    if max_label >= opts.classes:
        raise DataError(f"{where} holds label {max_label}, outside --classes {opts.classes} "
                        f"(labels 0..{opts.classes - 1})")
    return opts.classes


def client_id(raw, where: str) -> str:
    """A client id (bytes or str) as text: non-empty UTF-8 of at most MAX_ID_BYTES bytes, no NUL."""
    try:
        data = raw if isinstance(raw, bytes) else str(raw).encode("utf-8")
        text = data.decode("utf-8")
    except UnicodeError:
        raise DataError(f"{where}: client id {quote(raw)} is not valid UTF-8") from None
    if not data or "\0" in text or len(data) > MAX_ID_BYTES:
        raise DataError(f"{where}: client id {quote(raw)} must be 1 to {MAX_ID_BYTES} bytes of UTF-8 without NUL")
    return text


def check_counts(nodes: int, rows: int, where: str) -> None:
    """Clients and examples within the shard file's caps."""
    if nodes > MAX_NODES:
        raise DataError(f"{where} has {nodes:,} clients, a shard file holds at most {MAX_NODES:,} nodes")
    if rows > MAX_ROWS:
        raise DataError(f"{where} has {rows:,} examples, a shard file holds at most {MAX_ROWS:,} per group")


def natural_attrs(kind: str, sources: list[Path], nodes: int, classes: int, spec: InputSpec, opts: Options,
                  scheme: str) -> dict:
    """The attributes of an imported file (validate.check_attrs checks them as for any shard file)."""
    scale = opts.pixel_scale if opts.pixel_scale is not None else (1 / 255 if spec.out_dtype == np.uint8 else 1.0)
    attrs = dict(dataset=kind, partition="natural", seed=opts.seed, num_nodes=nodes, classes=classes,
                 input_shape=list(spec.out_shape), samples_per_node=0, test_per_node=0, pixel_scale=float(scale),
                 local_test_scheme=scheme, source=clip(", ".join(p.name for p in sources)))
    if scheme == "split":
        attrs["test_fraction"] = float(opts.test_fraction)
    return attrs


def note(text: str) -> None:
    print(f"fedmpi import: note: {text}", file=sys.stderr, flush=True)


class Progress:
    """A line per 10% of the examples written, only on a terminal (never in batch logs)."""

    def __init__(self, total: int, stream: Optional[TextIO] = None, what: str = "fedmpi import",
                 unit: str = "examples") -> None:
        self.total, self.done, self.shown, self.what, self.unit = total, 0, 0, what, unit
        self.stream = stream if stream is not None else sys.stderr
        self.on = self.total > 0 and self.stream.isatty()

    def advance(self, rows: int) -> None:
        self.done += rows
        tenth = self.done * 10 // self.total if self.total else 10
        if self.on and tenth > self.shown:
            self.shown = tenth
            print(f"{self.what}: {10 * tenth}% ({self.done:,} of {self.total:,} {self.unit})", file=self.stream,
                  flush=True)

"""`fedmpi prepare` of a large partition: the shard file written node block by node block (writer.ShardWriter).

shards.write_shards gathers every node's rows and builds the file's image in memory (about three
copies of the data); above STREAM_FILE_BYTES prepare instead gathers at most STREAM_ROWS rows at a
time and writes them straight to their place in the file, so its memory beyond the raw dataset is
bounded. The datasets and attributes are those write_shards writes (tested); the HDF5 layout differs
(contiguous datasets), which readers do not see.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from .natural import Progress
from .partition import offsets_of
from .writer import LABEL_DTYPE, Layout, ShardWriter

STREAM_FILE_BYTES = 256 << 20  # shard files larger than this are streamed
STREAM_ROWS = 1 << 16          # rows gathered per write


def file_bytes(rows: int, pixels: int, itemsize: int = 1) -> int:
    """Bytes of a shard file's data: `rows` inputs of `pixels` values and their int64 labels."""
    return rows * (pixels * itemsize + LABEL_DTYPE.itemsize)


def node_blocks(parts: list[np.ndarray], rows: Optional[int] = None) -> list[tuple[int, int]]:
    """[first, stop) node ranges of at most `rows` (STREAM_ROWS) rows each (a larger node on its own)."""
    rows = STREAM_ROWS if rows is None else rows
    blocks, first, held = [], 0, 0
    for k, part in enumerate(parts):
        if held and held + len(part) > rows:
            blocks.append((first, k))
            first, held = k, 0
        held += len(part)
    if first < len(parts):
        blocks.append((first, len(parts)))
    return blocks


def write_streamed(path: Path, attrs: dict, raw, train_parts: list[np.ndarray], test_parts: list[np.ndarray]) -> None:
    """The shard file of `raw`'s rows `train_parts` / `test_parts` (one index array per node), written
    block by block under a temp name, checked whole and renamed (ShardWriter); a progress line per 10%
    on a terminal."""
    groups = (("train", train_parts, raw.train_x, raw.train_y), ("local_test", test_parts, raw.test_x, raw.test_y))
    rows = {name: sum(len(p) for p in parts) for name, parts, _, _ in groups}
    rows["test"] = len(raw.test_y)
    dtype = np.dtype(raw.train_x.dtype).newbyteorder("<")
    layout = Layout(len(train_parts), rows, tuple(raw.train_x.shape[1:]), dtype)
    progress = Progress(rows["train"] + rows["local_test"] + rows["test"], what="fedmpi prepare", unit="rows")
    with ShardWriter(path, layout, attrs) as out:
        for name, parts, x, y in groups:
            out.write(f"{name}/offsets", 0, offsets_of(parts).astype(LABEL_DTYPE))
            at = 0
            for a, b in node_blocks(parts):
                idx = np.concatenate(parts[a:b]).astype(np.int64) if b > a else np.zeros(0, np.int64)
                out.write(f"{name}/x", at, x[idx].astype(dtype, copy=False))
                out.write(f"{name}/y", at, y[idx].astype(LABEL_DTYPE))
                at += len(idx)
                progress.advance(len(idx))
        for start in range(0, rows["test"], STREAM_ROWS):
            stop = start + STREAM_ROWS
            out.write("test/x", start, raw.test_x[start:stop].astype(dtype, copy=False))
            out.write("test/y", start, raw.test_y[start:stop].astype(LABEL_DTYPE))
            progress.advance(len(raw.test_y[start:stop]))
        out.commit()

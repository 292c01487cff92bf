"""Training rows read per round: a rank whose block exceeds data_resident_bytes reads only the round's
selected nodes from the shard file, and the next round's in a background thread while this one trains.

The selection of every round is a function of (seed, round) alone (fl/sampling.py), so round r+1's
nodes are known while round r trains. At most one round is read ahead. The rows read are checked
as at startup (finite inputs, labels in [0, classes)); a failed read is a DataError naming the file,
raised on the main thread when the round that needs it begins.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..errors import DataError
from .files import reason
from .h5check import READ_ERRORS, read_rows, stored_dataset
from .shards import check_finite, open_shards


def runs(nodes: np.ndarray) -> list[tuple[int, int]]:
    """Sorted node ids as [first, stop) runs of consecutive ids (one read per run)."""
    if len(nodes) == 0:
        return []
    cut = np.flatnonzero(np.diff(nodes) != 1) + 1
    return [(int(part[0]), int(part[-1]) + 1) for part in np.split(nodes, cut)]


def read_selected(path: Path, offsets: np.ndarray, nodes: np.ndarray, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The training rows (x as stored, y as int64) of the sorted node ids `nodes`, node after node.

    `offsets`: every node's row offsets in /train, as read at startup.
    """
    with open_shards(path) as f:
        try:
            x_set, y_set = stored_dataset(path, f, "train/x"), stored_dataset(path, f, "train/y")
            xs, ys = [np.zeros((0, *x_set.shape[1:]), dtype=x_set.dtype)], [np.zeros(0, dtype=np.int64)]
            for a, b in runs(nodes):
                lo, hi = int(offsets[a]), int(offsets[b])
                x, y = read_rows(path, x_set, lo, hi), read_rows(path, y_set, lo, hi).astype(np.int64, copy=False)
                if len(x) != hi - lo or len(y) != hi - lo:
                    raise DataError(f"shard file {path}: /train rows {lo}..{hi - 1} are missing (the file shrank)")
                check_finite(path, "/train/x", x, lo)
                bad = np.flatnonzero((y < 0) | (y >= classes))
                if len(bad):
                    raise DataError(f"shard file {path}: /train/y[{lo + int(bad[0])}] = {y[bad[0]]} is outside "
                                    f"the classes [0, {classes})")
                xs.append(x)
                ys.append(y)
        except READ_ERRORS as err:
            raise DataError(f"shard file {path}: /train cannot be read ({reason(err)})") from None
    return np.concatenate(xs), np.concatenate(ys)


def block_bytes(path: Path, offsets: np.ndarray, nodes: range) -> int:
    """Bytes of the training rows of `nodes` as stored (inputs in the file's dtype, int64 labels)."""
    with open_shards(path) as f:
        x = stored_dataset(path, f, "train/x")
        row = int(np.prod(x.shape[1:], dtype=np.int64)) * x.dtype.itemsize + 8
    return int(offsets[nodes.stop] - offsets[nodes.start]) * row


def compact_offsets(counts: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Row offsets over all local nodes of a block holding only nodes `rows`, in order: every other node
    has no rows, so an engine indexing node k finds exactly its own rows."""
    kept = np.zeros(len(counts), dtype=np.int64)
    kept[rows] = counts[rows]
    return np.concatenate([[0], np.cumsum(kept)]).astype(np.int64)


class RoundReader:
    """Reads each round's selected local nodes; the next round's in a background thread."""

    def __init__(self, path: Path, offsets: np.ndarray, first: int, counts: np.ndarray, classes: int,
                 to_device: Callable[[np.ndarray, np.ndarray], tuple], rows_of: Callable[[int], np.ndarray],
                 last_round: int) -> None:
        self.path, self.offsets, self.first, self.counts, self.classes = path, offsets, first, counts, classes
        self.to_device, self.rows_of, self.last_round = to_device, rows_of, last_round
        self.ahead: Optional[tuple[int, np.ndarray, threading.Thread, dict]] = None  # (round, rows, thread, result)

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The rows of local nodes `rows` (ascending), as stored."""
        return read_selected(self.path, self.offsets, self.first + np.asarray(rows, dtype=np.int64), self.classes)

    def _start(self, rnd: int) -> None:
        rows, result = self.rows_of(rnd), {}

        def work() -> None:
            try:
                result["data"] = self.read(rows)
            except BaseException as err:  # handed to the main thread, which raises it
                result["error"] = err

        thread = threading.Thread(target=work, name="fedmpi-prefetch", daemon=True)
        thread.start()
        self.ahead = (rnd, rows, thread, result)

    def block(self, rnd: int, rows: np.ndarray) -> tuple:
        """(x, y, offsets) of round `rnd`'s nodes `rows` on the device; starts reading round rnd+1's."""
        data = None
        if self.ahead is not None:
            ahead_rnd, ahead_rows, thread, result = self.ahead
            self.ahead = None
            thread.join()
            if "error" in result:
                err = result["error"]
                raise err if isinstance(err, DataError) else DataError(
                    f"shard file {self.path}: reading round {ahead_rnd}'s nodes failed ({reason(err)})")
            if ahead_rnd == rnd and np.array_equal(ahead_rows, rows):
                data = result["data"]
        if data is None:  # the first round, or a round whose selection was not the one read ahead
            data = self.read(rows)
        if rnd < self.last_round:
            self._start(rnd + 1)
        x, y = self.to_device(*data)
        return x, y, compact_offsets(self.counts, np.asarray(rows, dtype=np.int64))


def load_round(engine, reader: RoundReader, rnd: int, rows: np.ndarray) -> None:
    """Point `engine` at round `rnd`'s rows (its x, y and offsets: only the selected nodes have rows)."""
    engine.x, engine.y, engine.offsets = reader.block(rnd, rows)


def placeholder(shape: tuple, to_device: Callable) -> tuple:
    """A one-row block to build an engine on before the first round's rows are read (sizes its chunks)."""
    return to_device(np.zeros((1, *shape), dtype=np.uint8), np.zeros(1, dtype=np.int64))

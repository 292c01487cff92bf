"""The centralized baseline's training rows streamed from the shard file in each epoch's shuffled order.

The baseline's batch order is one torch.randperm over all training rows per epoch (engine/sequential.py,
sgd_epochs). `epoch(order)` is handed that same permutation before the epoch runs; the rows are then
read CHUNK_ROWS positions of the permutation at a time (sorted, as HDF5 reads them fastest), so rank 0
holds one chunk instead of every shard, and every batch is the one the whole block would give: the
same results. Rows are checked as they are read (finite inputs, labels in [0, classes)).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..engine.rows import batch_rows
from ..errors import DataError
from .files import reason
from .h5check import READ_ERRORS, stored_dataset
from .shards import check_finite, open_shards

CHUNK_ROWS = 1 << 16  # rows of the permutation read at once (64 Ki rows of MNIST: 51 MB)


class ShuffledRows:
    """Inputs x of the whole training set, served batch by batch in the epoch's order; `labels` its y."""

    dtype = torch.float32

    def __init__(self, path: Path, rows: int, classes: int, scale: float, device: torch.device,
                 chunk_rows: int = CHUNK_ROWS) -> None:
        self.path, self.rows, self.classes, self.scale, self.device = path, rows, classes, scale, device
        self.chunk_rows = chunk_rows
        self.order: Optional[np.ndarray] = None
        self.at = 0                    # position in the order of the next batch
        self.chunk = (0, 0, None, None)  # (first position, stop, x rows in order, y rows in order)
        self.last: Optional[tuple] = None  # (x, y) of the batch served last, whose labels `labels` gives
        self.labels = Labels(self)

    def __len__(self) -> int:
        return self.rows

    def epoch(self, order: torch.Tensor) -> None:
        """The permutation the coming epoch draws its batches from."""
        self.order, self.at, self.chunk = order.cpu().numpy(), 0, (0, 0, None, None)

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        x, _ = self._batch(idx)
        return batch_rows(x, slice(None), self.scale)

    def _batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of the batch `idx`: the next len(idx) positions of the order (checked)."""
        n = len(idx)
        if self.order is None or not np.array_equal(self.order[self.at:self.at + n], idx.cpu().numpy()):
            raise DataError(f"shard file {self.path}: the baseline's batch is not the next one of its epoch")
        first, stop, x, y = self.chunk
        if not first <= self.at < stop or self.at + n > stop:
            self._read(self.at, n)
            first, stop, x, y = self.chunk
        a = self.at - first
        self.last = (x[a:a + n], y[a:a + n])
        self.at += n
        return self.last

    def _read(self, start: int, batch: int) -> None:
        """Positions start.. of the order (a chunk, at least one batch), read in row order."""
        want = self.order[start:start + max(self.chunk_rows, batch)]
        sorted_rows, back = np.unique(want, return_inverse=True)
        with open_shards(self.path) as f:
            try:
                x_set, y_set = stored_dataset(self.path, f, "train/x"), stored_dataset(self.path, f, "train/y")
                x, y = x_set[sorted_rows], y_set[sorted_rows].astype(np.int64, copy=False)
            except READ_ERRORS as err:
                raise DataError(f"shard file {self.path}: /train cannot be read ({reason(err)})") from None
        check_finite(self.path, "/train/x", x, 0)
        bad = np.flatnonzero((y < 0) | (y >= self.classes))
        if len(bad):
            raise DataError(f"shard file {self.path}: /train/y[{int(sorted_rows[bad[0]])}] = {y[bad[0]]} is outside "
                            f"the classes [0, {self.classes})")
        self.chunk = (start, start + len(want), torch.from_numpy(x[back]).to(self.device),
                      torch.from_numpy(y[back]).to(self.device))


class Labels:
    """y of ShuffledRows: the labels of the batch its inputs were just served for."""

    def __init__(self, rows: ShuffledRows) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return self.rows.rows

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        return self.rows.last[1]

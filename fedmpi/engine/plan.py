"""A chunk's batch schedule: which rows each of K nodes reads at each step, drawn as the sequential engine draws them.

Each node keeps its own math exactly as in `sgd_epochs`: the same shuffles (same generator,
same randperm calls), the mean loss over its own batch. Nodes of a chunk take their t-th step
together; rows beyond a node's batch (a short last batch, a smaller shard) are padded and
weighted zero, and a node that has run out of batches in an epoch skips the step entirely.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .sequential import batch_generator


@dataclass
class Plan:
    """One round's batch schedule for a chunk: S steps of K nodes x B rows."""

    idx: torch.Tensor        # [S, K, B] int64 rows of x (padding points at a real row: the node's first, else row 0)
    weight: torch.Tensor     # [S, K, B] 1/batch size on real rows, 0 on padding
    active: torch.Tensor     # [S, K] 1.0 where the node takes this step
    full: np.ndarray         # [S] bool, host side: every node steps (the fast path)


def make_plan(offsets: np.ndarray, rows: np.ndarray, first_node: int, cfg, rnd: int, device, dtype) -> Plan:
    """The batch order of nodes `rows` (local indices), drawn exactly as sgd_epochs draws it."""
    B, E = cfg.batch_size, cfg.local_epochs
    rows = np.asarray(rows, dtype=np.int64)
    counts = np.diff(offsets)[rows]
    per_epoch = max(1, int(-(-counts.max() // B))) if len(counts) else 1
    S, K = E * per_epoch, len(rows)
    idx = np.zeros((S, K, B), dtype=np.int64)
    real = np.zeros((S, K, B), dtype=bool)
    for j, k in enumerate(rows):
        n, start = int(counts[j]), int(offsets[k])
        # Padding must index a real row even for a node without data, whose offset may be one past
        # the last row (a zero-sample node at the end of the block); its weight is 0 either way.
        pad = start if n else 0
        gen = batch_generator(cfg.seed, first_node + int(k), rnd)
        for e in range(E):
            # The epoch's order laid flat over its steps: row t goes to step t // B, slot t % B.
            order = np.full(per_epoch * B, pad, dtype=np.int64)
            order[:n] = start + torch.randperm(n, generator=gen).numpy()
            idx[e * per_epoch:(e + 1) * per_epoch, j] = order.reshape(per_epoch, B)
            real[e * per_epoch:(e + 1) * per_epoch, j] = (np.arange(per_epoch * B) < n).reshape(per_epoch, B)
    size = real.sum(2)
    weight = np.where(real, 1.0 / np.maximum(size, 1)[..., None], 0.0)
    active = size > 0
    return Plan(torch.from_numpy(idx).to(device), torch.from_numpy(weight).to(device, dtype),
                torch.from_numpy(active).to(device, dtype), active.all(1))

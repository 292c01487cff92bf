"""Local training: models, the sequential and batched engines, evaluation, the centralized baseline."""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Protocol

import numpy as np
import torch
from torch import nn

from .batched import BatchedEngine
from .sequential import Chunk, SequentialEngine
from .state import NodeState


class Engine(Protocol):
    """What the round loop asks of an engine (SequentialEngine, BatchedEngine)."""

    def train(self, main: torch.Tensor, rnd: int, rows: Optional[np.ndarray] = None,
              tick: Optional[Callable[[], None]] = None) -> Iterator[Chunk]:
        """Train the local nodes `rows` (all when None) from `main`; yield them in node order.
        `tick()` runs before every training step; an exception it raises ends the training."""

    def state(self) -> dict[str, torch.Tensor]:
        """Per-node state kept across rounds, to checkpoint ({"momentum": [nodes, P]}, or {} when stateless)."""

    store: NodeState  # that state by name; store.reset_row(k) starts a diverged node afresh


ENGINES: dict[str, type] = {"sequential": SequentialEngine, "batched": BatchedEngine}


def make_engine(cfg, model: nn.Module, x: torch.Tensor, y: torch.Tensor, offsets: np.ndarray,
                first_node: int, ranks_on_device: int = 1) -> Engine:
    """The engine named by cfg.engine; `ranks_on_device` ranks share this rank's GPU (batched: its memory budget)."""
    if cfg.engine == "batched":
        return BatchedEngine(model, x, y, offsets, first_node, cfg, ranks_on_device)
    return ENGINES[cfg.engine](model, x, y, offsets, first_node, cfg)

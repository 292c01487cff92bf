"""The training loss: cross-entropy (the built-in, default) or a user's per-sample loss function.

A user loss is `fn(outputs, targets) -> losses` of shape [B], one value per row; a node's loss is
their mean over its real rows, as with cross-entropy. A loss that gives NaN or Inf makes that node's
parameters NaN or Inf, and the node is dropped from the round like any other diverged node.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..errors import ConfigError
from ..plugins import load

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def loss_function(name: str) -> Optional[Loss]:
    """None for cross_entropy (the engines' own, hand-written where it applies), else the checked user loss."""
    if name == "cross_entropy":
        return None
    fn = load("loss", name)

    def per_sample(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        losses = fn(outputs, targets)
        if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != tuple(targets.shape):
            got = list(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ConfigError(f"config key 'loss' {name!r} must return one loss per row (shape "
                              f"{list(targets.shape)}), got {got}")
        return losses

    return per_sample

"""Flat parameter vectors: a model's parameters as one [P] vector, or K models' as a [K, P] matrix.

The Allreduce, the checkpoints and the engines all work on flat vectors; these views turn them
back into per-tensor shapes without a copy.
"""
from __future__ import annotations

import torch


def views(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views into a flat vector shaped like `like` (no copy)."""
    out, start = [], 0
    for t in like:
        out.append(flat[start:start + t.numel()].view_as(t))
        start += t.numel()
    return out


def views_k(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Column blocks of a [K, P] matrix, one per parameter of `like` (no copy)."""
    out, start = [], 0
    for t in like:
        out.append(flat[:, start:start + t.numel()])
        start += t.numel()
    return out


def flatten(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


@torch.no_grad()
def load_flat(params: list[torch.Tensor], flat: torch.Tensor) -> None:
    torch._foreach_copy_(params, views(flat, params))

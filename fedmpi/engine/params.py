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


def float_buffers(model) -> list[torch.Tensor]:
    """The model's floating-point buffers (BatchNorm's running_mean and running_var), in module order.
    They travel after the parameters in the main vector; integer ones (num_batches_tracked) stay out."""
    return [b for b in model.buffers() if b.is_floating_point()]


def float_buffer_names(model) -> list[str]:
    """Names of float_buffers(model), as functional_call and state_dict spell them."""
    return [n for n, b in model.named_buffers() if b.is_floating_point()]


def model_tensors(model) -> list[torch.Tensor]:
    """What the main vector holds: the parameters, then the float buffers."""
    return list(model.parameters()) + float_buffers(model)


def parameter_count(model) -> int:
    """P: the parameters' share at the front of the main vector (momentum and control variates are [*, P])."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def reset_counters(model) -> None:
    """Integer buffers (BatchNorm's num_batches_tracked) back to zero, so no count leaks from one node to
    the next: with BatchNorm's momentum set (the default) it never enters the math."""
    for b in model.buffers():
        if not b.is_floating_point():
            b.zero_()

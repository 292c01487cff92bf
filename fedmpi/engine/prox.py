"""FedProx (Li et al. 2020): the proximal term mu/2 ||w - w_main||^2 added to each node's local loss.

Its gradient mu (w - w_main) is added to the loss gradient before the SGD step, so local
training keeps one autograd pass and needs no change to the model's loss.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def add_proximal_(grads: list[torch.Tensor], params: list[torch.Tensor], anchor: list[torch.Tensor],
                  mu: float) -> None:
    """grads[i] += mu * (params[i] - anchor[i]) in place; anchor: the round's main model, shaped like params."""
    if mu == 0:
        return
    torch._foreach_add_(grads, torch._foreach_sub(params, anchor), alpha=mu)

"""Dropout for the batched engine: each node's masks drawn from its own generator, as the sequential engine draws.

The sequential engine runs torch's Dropout with the global generator seeded from (seed, node, round)
(sequential.node_random); torch draws one bernoulli(1 - p) tensor shaped like the layer's input per
forward, then scales it by 1 / (1 - p). Here every node has a generator seeded the same way, and each
step draws, node by node and layer by layer in forward order, exactly those tensors for the node's
real rows: the same masks, so the same result at any chunk or rank count.
"""
from __future__ import annotations

import torch
from torch import nn

from .batchnorm import StepRows
from .evaluate import scoring


class MaskedDropout(nn.Module):
    """nn.Dropout multiplying by the mask this step drew for the node (padding rows: 1)."""

    def __init__(self, p: float, prefix: str, rows: StepRows) -> None:
        super().__init__()
        self.p, self.prefix, self.rows = p, prefix, rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not self.rows.noise:
            return x
        return x * self.rows.noise[self.prefix]


def is_dropout(module: nn.Module) -> bool:
    """Plain nn.Dropout, the one the batched engine draws per node (not Dropout1d/2d/3d, AlphaDropout)."""
    return type(module) is nn.Dropout


@torch.no_grad()
def dropout_shapes(model: nn.Module, x: torch.Tensor) -> dict[str, tuple]:
    """Per-sample input shape of every Dropout, in forward order, from one eval-mode forward on a row of `x`."""
    shapes: dict[str, tuple] = {}

    def record(name: str):
        def hook(_module, inputs) -> None:  # returns None: the inputs go on unchanged
            shapes.setdefault(name, tuple(inputs[0].shape[1:]))
        return hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in model.named_modules() if is_dropout(m)]
    try:
        with scoring(model):
            model(x[:1])
    finally:
        for h in hooks:
            h.remove()
    return shapes


def draw_masks(layers: list[tuple[str, float, tuple]], gens: list[torch.Generator], real: torch.Tensor,
               width: int, like: torch.Tensor) -> dict[str, torch.Tensor]:
    """This step's masks [K, width, *shape] per Dropout (dtype and device of `like`): node k's first real[k]
    rows drawn from gens[k] in the order torch's Dropout draws them in the sequential engine (layer by layer
    within the node's forward)."""
    if not layers:
        return {}
    noise = {name: like.new_ones(len(gens), width, *shape) for name, _, shape in layers}
    for k, (gen, n) in enumerate(zip(gens, real.tolist())):
        if n == 0:
            continue  # a node sitting the step out runs no forward: it draws nothing
        for name, p, shape in layers:
            block = noise[name][k, :n]
            if p >= 1:
                block.zero_()
            else:
                block.bernoulli_(1 - p, generator=gen).div_(1 - p)
    return noise

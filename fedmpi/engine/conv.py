"""The batched engine's path for convolutional models: one plain autograd pass per node of the chunk.

vmap turns a conv into one grouped convolution over the K nodes, which oneDNN runs no faster than
K separate convolutions (measured on a 2-core Xeon with AMX, 1 thread: the cnn's 32->64 5x5 conv,
forward and backward, K=8, float32 21 against 23 GFLOP/s, bfloat16 62 against 76), while vmap's
batching rules and the concat of the per-parameter gradients cost extra. The update still runs on
the whole [K, P] matrices, exactly as VmapKernel's.
"""
from __future__ import annotations

import copy
import threading
from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .losses import Loss
from .plan import Plan


def fits_conv_kernel(model: nn.Module) -> bool:
    """Models with a convolution and nothing kept or drawn per node (no buffers, no Dropout)."""
    mods = list(model.modules())
    has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in mods)
    stateful = any(isinstance(m, nn.modules.dropout._DropoutNd) or next(m.buffers(recurse=False), None) is not None
                   for m in mods)
    return has_conv and not stateful


class ConvKernel:
    """Per-node gradients by one autograd pass per node, taken on the node's row of the [K, P] matrix."""

    def __init__(self, model: nn.Module, dtype=None, loss_fn: Optional[Loss] = None) -> None:
        self.dtype = dtype
        self.loss_fn = loss_fn or partial(F.cross_entropy, reduction="none")
        self.names = [n for n, _ in model.named_parameters()]
        self.sizes = [p.numel() for p in model.parameters()]
        self.shapes = [p.shape for p in model.parameters()]
        # Each thread trains its own copy: functional_call swaps a module's parameters while it runs.
        self._template = copy.deepcopy(model)
        self._local = threading.local()

    def _model(self) -> nn.Module:
        if not hasattr(self._local, "model"):
            self._local.model = copy.deepcopy(self._template)
        return self._local.model

    def _grad(self, model: nn.Module, row: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
              w: torch.Tensor) -> torch.Tensor:
        """d/d(row) of the node's weighted loss; `row` is the node's flat [P] parameters."""
        leaf = row.detach().requires_grad_()
        params = dict(zip(self.names, [v.view(s) for v, s in zip(torch.split(leaf, self.sizes), self.shapes)]))
        with torch.enable_grad(), torch.autocast(x.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            loss = (self.loss_fn(functional_call(model, params, (x,)), y) * w).sum()
        return torch.autograd.grad(loss, leaf)[0]

    def run(self, main: torch.Tensor, mom: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
            plan: Plan, lr: float, m: float, mu: float = 0.0,
            tick: Optional[Callable[[], None]] = None, corr: Optional[torch.Tensor] = None,
            start: Optional[torch.Tensor] = None) -> torch.Tensor:
        """As VmapKernel.run: train K nodes from `main` (or from `start` [K, P]) along `plan`, momentum `mom`
        [K, P] in place; the proximal term pulls to `main`."""
        K, model = mom.shape[0], self._model()
        flat = (main.expand(K, -1) if start is None else start).clone()
        g = torch.empty_like(flat)
        for s in range(plan.idx.shape[0]):
            if tick is not None:
                tick()
            idx, weight, active = plan.idx[s], plan.weight[s], plan.active[s]
            for k in range(K):
                if plan.full[s] or active[k] > 0:
                    g[k] = self._grad(model, flat[k], x[idx[k]], y[idx[k]], weight[k])
                else:  # all its rows weigh 0: the gradient vmap would compute is exactly 0
                    g[k].zero_()
            if mu:  # FedProx; nodes sitting this step out are masked below with their gradient
                g.add_((flat - main).mul_(mu * active.unsqueeze(1)))
            if corr is not None:
                g.add_(corr if plan.full[s] else corr * active.unsqueeze(1))
            if plan.full[s]:
                mom.mul_(m).add_(g)
                flat.add_(mom, alpha=-lr)
            else:
                act = active.unsqueeze(1)
                mom.mul_(torch.where(act > 0, m, 1.0).to(mom.dtype)).add_(g)
                flat.addcmul_(mom, act, value=-lr)
        return flat

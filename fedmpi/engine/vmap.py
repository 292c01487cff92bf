"""The batched engine's path for any model: per-node gradients by vmap(grad(functional_call))."""
from __future__ import annotations

import copy
import threading
from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from .batchnorm import masked_copy
from .dropout import draw_masks, dropout_shapes, is_dropout
from .losses import Loss
from .params import float_buffer_names, float_buffers, views_k
from .plan import Plan


class VmapKernel:
    """Any model: per-node gradients by vmap(grad(functional_call)) over stacked parameters.

    vmap turns each conv of the cnn into one grouped convolution over the K nodes; the update
    then runs on the whole [K, P] matrices (two passes over memory per step).
    """

    def __init__(self, model: nn.Module, dtype=None, loss_fn: Optional[Loss] = None) -> None:
        self.model, self.dtype = model, dtype
        # Per-row losses, weighted per row (1/n on a node's real rows, 0 on padding) and summed.
        self.loss_fn = loss_fn or partial(F.cross_entropy, reduction="none")
        self.names = [n for n, _ in model.named_parameters()]
        self.like = list(model.parameters())
        self.buffer_names, self.buffer_like = float_buffer_names(model), float_buffers(model)
        # The threads copy this private template, never `model` itself: the round's scoring runs
        # functional_call on `model` (swapping its parameters) while workers may still start up.
        self._template = copy.deepcopy(model)
        self._local = threading.local()
        self._probe, self._layers = threading.Lock(), None

    def _grads(self):
        """vmap(grad(loss)) over this thread's own copy of the model: functional_call swaps the
        module's parameters while it runs, so two threads must never share one module."""
        if not hasattr(self._local, "grads"):
            (model, rows), per_row = masked_copy(self._template), self.loss_fn
            model.train()

            def loss(params: dict, buffers: dict, noise: dict, x: torch.Tensor, y: torch.Tensor,
                     w: torch.Tensor, dense: bool = False) -> tuple:
                # BatchNorm's statistics over the rows this step weights (the node's real rows); Dropout's masks
                rows.mask, rows.out, rows.noise, rows.dense = w > 0, [], noise, dense
                try:
                    value = (per_row(functional_call(model, {**params, **buffers}, (x,)), y) * w).sum()
                    return value, dict(rows.out)
                finally:
                    rows.mask, rows.out, rows.noise, rows.dense = None, [], None, False

            self._local.grads = vmap(grad(loss, has_aux=True), in_dims=(0, 0, 0, 0, 0, 0, None))
        return self._local.grads

    def _dropouts(self, x: torch.Tensor) -> list:
        """(name, p, per-sample input shape) of every Dropout, in forward order (found once, on a row of x)."""
        with self._probe:  # the worker threads' first steps: one forward on the template, not two at once
            if self._layers is None:
                shapes = dropout_shapes(self._template, x)
                ps = {n: m.p for n, m in self._template.named_modules() if is_dropout(m)}
                self._layers = [(name, ps[name], tuple(shape)) for name, shape in shapes.items()]
        return self._layers

    def run(self, main: torch.Tensor, mom: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
            plan: Plan, lr: float, m: float, mu: float = 0.0,
            tick: Optional[Callable[[], None]] = None, corr: Optional[torch.Tensor] = None,
            buffers: Optional[torch.Tensor] = None, gens: Optional[list] = None,
            start: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Train K nodes from `main` (or from `start` [K, P]) along `plan`; momentum `mom` [K, P] is updated
        in place. `tick()` runs before each step (progress, and a stop signal raising out of the chunk);
        `corr` [K, P] (SCAFFOLD's c - c_i) is added to every step's gradient; the proximal term pulls to
        `main`; `buffers` [K, B] (the float buffers, BatchNorm's running statistics) are updated in place;
        `gens` (one per node) draw Dropout's masks."""
        K, grads = mom.shape[0], self._grads()
        flat = (main.expand(K, -1) if start is None else start).clone()
        params = dict(zip(self.names, [v.view(K, *t.shape) for v, t in
                                       zip(views_k(flat, self.like), self.like)]))
        bufs = {} if buffers is None else dict(zip(self.buffer_names, [
            v.view(K, *t.shape) for v, t in zip(views_k(buffers, self.buffer_like), self.buffer_like)]))
        dense = (plan.weight > 0).all(2).all(1).cpu().numpy() if bufs else None  # steps without padding rows
        for s in range(plan.idx.shape[0]):
            if tick is not None:
                tick()
            idx = plan.idx[s]
            with torch.autocast(x.device.type, dtype=self.dtype, enabled=self.dtype is not None):
                noise = {} if gens is None else \
                    draw_masks(self._dropouts(x), gens, (plan.weight[s] > 0).sum(1), idx.shape[1], plan.weight[s])
                g, stats = grads(params, bufs, noise, x[idx], y[idx], plan.weight[s],
                                 dense is not None and bool(dense[s]))
            for name, value in stats.items():
                bufs[name].copy_(value)
            g = torch.cat([g[n].reshape(K, -1) for n in self.names], 1)
            if mu:  # FedProx; nodes sitting this step out are masked below with their gradient
                g.add_((flat - main).mul_(mu * plan.active[s].unsqueeze(1)))
            if corr is not None:  # masked like FedProx's term: a node sitting the step out gets none
                g.add_(corr if plan.full[s] else corr * plan.active[s].unsqueeze(1))
            if plan.full[s]:
                mom.mul_(m).add_(g)
                flat.add_(mom, alpha=-lr)
            else:
                act = plan.active[s].unsqueeze(1)
                mom.mul_(torch.where(act > 0, m, 1.0).to(mom.dtype)).add_(g)
                flat.addcmul_(mom, act, value=-lr)
        return flat

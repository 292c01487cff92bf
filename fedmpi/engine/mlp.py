"""The batched engine's fast path for MLPs: stacked Linear/ReLU layers with a hand-written backward."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from .plan import Plan


def mlp_layers(model: nn.Module) -> Optional[list[tuple[nn.Linear, bool]]]:
    """[(Linear, followed by ReLU)] when the model is Flatten? (Linear ReLU?)* Linear, else None."""
    mods = list(model.children()) if isinstance(model, nn.Sequential) else []
    if mods and isinstance(mods[0], nn.Flatten):
        mods = mods[1:]
    layers: list[tuple[nn.Linear, bool]] = []
    for m in mods:
        if isinstance(m, nn.Linear) and m.bias is not None:
            layers.append((m, False))
        elif isinstance(m, nn.ReLU) and layers and not layers[-1][1]:
            layers[-1] = (layers[-1][0], True)
        else:
            return None
    # The hand-written backward starts from the logits: a ReLU after the last layer goes to vmap.
    return layers if layers and not layers[-1][1] else None


class MLPKernel:
    """Stacked Linear/ReLU layers with a hand-written backward.

    The weight-gradient matmul is a baddbmm straight into the momentum buffer (buf = m*buf +
    g^T a in one pass over buf), which is what makes the 2nn fast: its first layer's weights
    and buffers are most of the memory traffic of a step.

    With a bfloat16 `dtype` the forward matmuls and the gradient matmuls through the hidden layers
    read bfloat16 shadow copies of the weights, refreshed right after each parameter pass (one
    foreach copy, not a cast per matmul); the masters, the momentum and the weight-gradient matmul
    into it stay float32 (a bfloat16 product cannot accumulate into a float32 buffer within
    baddbmm_, and the separate add it would need costs more than the bfloat16 matmul saves).
    """

    def __init__(self, model: nn.Module, layers: list[tuple[nn.Linear, bool]], dtype=None) -> None:
        self.relu = [r for _, r in layers]
        self.dtype = dtype  # of the matmuls (None: the data's); bfloat16 mirrors torch.autocast
        params = list(model.parameters())
        where = dict(zip(map(id, params), np.cumsum([0] + [p.numel() for p in params]).tolist()))
        # Slots W0, b0, W1, b1, ...: each one's offset and shape in the flat vector of model.parameters().
        self.slots = [(where[id(t)], tuple(t.shape)) for lin, _ in layers for t in (lin.weight, lin.bias)]

    def run(self, main: torch.Tensor, mom: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
            plan: Plan, lr: float, m: float, mu: float = 0.0,
            tick: Optional[Callable[[], None]] = None, corr: Optional[torch.Tensor] = None,
            start: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Train K nodes from `main` (or from `start` [K, P]) along `plan`; momentum `mom` [K, P] is updated
        in place. `tick()` runs before each step (progress, and a stop signal raising out of the chunk);
        `corr` [K, P] (SCAFFOLD's c - c_i) is added to every step's gradient; the proximal term pulls to `main`."""
        K = mom.shape[0]
        params = self._split(main.expand(K, -1) if start is None else start)
        bufs = self._split(mom)
        anchor = self._split(main[None]) if mu else None
        corr = self._split(corr.to(mom.dtype)) if corr is not None else None
        xs = x.reshape(len(x), -1)
        weights, shadows = params[0::2], self.shadows(params)
        for s in range(plan.idx.shape[0]):
            if tick is not None:
                tick()
            scale = None if plan.full[s] else plan.active[s]
            self._step(params, bufs, xs, y, plan.idx[s], plan.weight[s], scale, m, shadows)
            if mu:
                self._proximal(params, bufs, anchor, scale, mu)
            if corr is not None:
                self._correct(bufs, corr, scale)
            self._update(params, bufs, scale, lr)
            if shadows[0] is not weights[0]:
                torch._foreach_copy_(shadows, weights)
        mom.copy_(self._join(bufs))
        return self._join(params)

    def shadows(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The weights [K, out, in] the matmuls read: the float32 masters themselves, or bfloat16 copies."""
        weights = params[0::2]
        return weights if self.dtype in (None, weights[0].dtype) else [w.to(self.dtype) for w in weights]

    def _split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Contiguous per-slot copies [K, out, in] and [K, out] of a flat [K, P] matrix."""
        K = flat.shape[0]
        return [flat[:, o:o + int(np.prod(s))].reshape(K, *s).clone() for o, s in self.slots]

    def _join(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The flat [K, P] matrix, in model.parameters() order, from per-slot tensors."""
        K = parts[0].shape[0]
        flat = torch.empty(K, sum(p[0].numel() for p in parts), dtype=parts[0].dtype, device=parts[0].device)
        for (o, s), part in zip(self.slots, parts):
            flat[:, o:o + int(np.prod(s))] = part.reshape(K, -1)
        return flat

    def _step(self, params, bufs, xs, y, idx, weight, scale, m: float, weights=None) -> None:
        """Forward, backward and momentum of one step; the parameters move in _update.
        `weights`: what the matmuls read (self.shadows(params), the default)."""
        K, B = idx.shape
        fd = xs.dtype
        cd = self.dtype or fd  # without autocast every .to() below is a no-op
        weights = self.shadows(params) if weights is None else weights
        acts = [xs[idx.reshape(-1)].view(K, B, -1)]  # rows gathered as float32 (engine/rows.py)
        for layer, relu in enumerate(self.relu):
            z = torch.baddbmm(params[2 * layer + 1].to(cd).unsqueeze(1), acts[-1].to(cd),
                              weights[layer].transpose(1, 2))
            acts.append(z.relu_() if relu else z)
        # d(sum_i w_i CE_i)/d logits = w_i (softmax_i - onehot_i): each node's mean loss, padding weighted 0.
        g = torch.softmax(acts.pop().to(fd), dim=2)
        g.scatter_add_(2, y[idx].unsqueeze(2), torch.full((K, B, 1), -1.0, dtype=g.dtype, device=g.device))
        g.mul_(weight.unsqueeze(2))
        beta = m
        if scale is not None:
            # Some nodes sit this step out: their buffers must not decay (beta 1, zero gradient).
            beta = 1.0
            decay = torch.where(scale > 0, m, 1.0).to(g.dtype)
            for b in bufs:
                b.mul_(decay.view(-1, *[1] * (b.dim() - 1)))
        for layer in reversed(range(len(self.relu))):
            a = acts[layer]
            bufs[2 * layer].baddbmm_(g.transpose(1, 2), a.to(fd), beta=beta)
            bufs[2 * layer + 1].mul_(beta).add_(g.sum(1))
            if layer:  # through the ReLU: one fused op, no boolean mask tensor
                back = torch.bmm(g.to(cd), weights[layer])
                g = torch.ops.aten.threshold_backward(back, a, 0).to(fd)

    @staticmethod
    def _update(params, bufs, scale, lr: float) -> None:
        """p -= lr * buf, only for the nodes that take this step."""
        if scale is None:
            torch._foreach_add_(params, bufs, alpha=-lr)
        else:
            for p, b in zip(params, bufs):
                p.addcmul_(b, scale.view(-1, *[1] * (b.dim() - 1)), value=-lr)

    @staticmethod
    def _correct(bufs, corr, scale) -> None:
        """SCAFFOLD: buf += c - c_i for the nodes that take this step (after the decay: a gradient term)."""
        if scale is None:
            torch._foreach_add_(bufs, corr)
        else:
            for b, c in zip(bufs, corr):
                b.addcmul_(c, scale.view(-1, *[1] * (c.dim() - 1)))

    @staticmethod
    def _proximal(params, bufs, anchor, scale, mu: float) -> None:
        """FedProx: buf += mu (w - w_main), for the nodes that take this step."""
        for p, b, a in zip(params, bufs, anchor):
            d = (p - a).mul_(mu)
            if scale is not None:
                d.mul_(scale.view(-1, *[1] * (d.dim() - 1)))
            b.add_(d)

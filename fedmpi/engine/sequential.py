"""Local training: plain SGD with momentum over one node's shard, and the sequential engine.

The math is torch.optim.SGD's (buf = m*buf + g; p -= lr*buf; the first step's buf is g),
written with foreach ops on the node's own momentum buffer so a node's state survives
between rounds without one optimizer object per node.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..fl.algorithms import ditto_start, scaffold_correction, scaffold_node_controls
from .losses import Loss, loss_function
from .params import flatten, float_buffers, load_flat, model_tensors, reset_counters, views
from .prox import add_proximal_
from .state import layer_columns, make_state, with_own_layers

CENTRAL_STREAM = 1  # seed stream of the centralized baseline; nodes use stream 0
DROPOUT_STREAM = 2  # seed stream of a node's random draws inside the model (Dropout)


def batch_generator(seed: int, node: int, rnd: int, stream: int = 0) -> torch.Generator:
    """Batch order depends on (seed, node, round) only, never on the rank: same run at any -n."""
    state = np.random.SeedSequence([seed, stream, node, rnd]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def compute_dtype(cfg) -> Optional[torch.dtype]:
    """Config key autocast: bfloat16 for local training's matmuls, or None (the data's own dtype).
    Weights and momentum keep their dtype either way."""
    return torch.bfloat16 if getattr(cfg, "autocast", "none") == "bf16" else None


def sgd_epochs(model: nn.Module, bufs: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
               epochs: int, batch_size: int, lr: float, momentum: float, gen: torch.Generator,
               prox_mu: float = 0.0, anchor: Optional[list[torch.Tensor]] = None,
               dtype: Optional[torch.dtype] = None, tick: Optional[Callable[[], None]] = None,
               loss_fn: Optional[Loss] = None, correction: Optional[list[torch.Tensor]] = None) -> None:
    """Train `model` in place for `epochs` over (x, y) with a fresh shuffle each epoch.

    The last batch of an epoch may be short, as with a DataLoader's default drop_last=False.
    With prox_mu > 0 (FedProx) the gradient of mu/2 ||w - anchor||^2 is added to each step's.
    dtype bfloat16: the forward and its backward run under torch.autocast (mixed precision).
    `tick()` runs before each step (progress, and a stop signal raising out of training).
    `loss_fn`: a per-sample loss (engine/losses.py) averaged over the batch; None: cross-entropy.
    `correction` (SCAFFOLD's c - c_i, shaped like params) is added to every step's gradient.
    """
    params = list(model.parameters())
    n = len(y)
    model.train()  # Dropout on, BatchNorm on batch statistics; scoring switches to eval and back
    autocast = torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(x.device)
        for start in range(0, n, batch_size):
            if tick is not None:
                tick()
            idx = order[start:start + batch_size]
            with autocast:
                if loss_fn is None:
                    loss = F.cross_entropy(model(x[idx]), y[idx])
                else:
                    loss = loss_fn(model(x[idx]), y[idx]).mean()
            grads = list(torch.autograd.grad(loss, params))
            if prox_mu:
                add_proximal_(grads, params, anchor, prox_mu)
            if correction is not None:
                torch._foreach_add_(grads, correction)
            with torch.no_grad():
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, grads)
                torch._foreach_add_(params, bufs, alpha=-lr)


@contextmanager
def node_random(device: torch.device, seed: int, node: int, rnd: int) -> Iterator[None]:
    """torch's global generator (Dropout's draws) seeded from (seed, node, round), as the batch order is:
    the same draws at any rank count; the caller's generator state is restored after."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(dropout_seed(seed, node, rnd))
        yield


def dropout_seed(seed: int, node: int, rnd: int) -> int:
    """The seed of a node's random draws inside the model in a round: both engines draw Dropout from it."""
    return int(batch_generator(seed, node, rnd, stream=DROPOUT_STREAM).initial_seed())


def check_buffers(cfg, model: nn.Module) -> None:
    """Refuse float buffers (BatchNorm's running statistics) where they would enter math made for parameters:
    SCAFFOLD's control variates, FedNova's normalized steps, DP's clip and noise, Ditto's personal models
    and personal layers' columns (both [nodes, P] of parameters only)."""
    plain = getattr(cfg, "algorithm", "fedavg") == "fedavg" and getattr(cfg, "dp", "none") == "none" \
        and getattr(cfg, "personalize", "none") == "none" and not getattr(cfg, "personal_layers", [])
    if float_buffers(model) and not plain:
        raise ConfigError(f"config key 'buffers': a model with running statistics ({type(model).__name__} holds "
                          f"float buffers) runs with algorithm: fedavg, dp: none, personalize: none and no "
                          f"personal_layers")


@dataclass
class Chunk:
    """Nodes finished by the engine: their ids and flat parameters [k, P]."""

    nodes: list[int]
    params: torch.Tensor
    control_delta: Optional[torch.Tensor] = None  # SCAFFOLD: c_i+ - c_i [k, P]
    personal: Optional[torch.Tensor] = None  # Ditto: the nodes' personal models v_k after this round [k, P]


class SequentialEngine:
    """Trains this rank's nodes one after another on one working model (the reference engine)."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, offsets: np.ndarray,
                 first_node: int, cfg) -> None:
        self.model, self.x, self.y, self.cfg = model, x, y, cfg
        self.offsets, self.first_node = offsets, first_node
        check_buffers(cfg, model)
        self.params = list(model.parameters())
        self.tensors = model_tensors(model)  # what the main vector holds: parameters, then float buffers
        size = sum(p.numel() for p in self.params)
        # local_state keep: each node keeps its momentum across rounds, as with one optimizer per node
        # in the tutorial; stateless, one zero buffer is reused by every node (a fresh optimizer each round).
        self.cols, self.shared = layer_columns(cfg, model, size, x.device)  # personal layers' columns, or None
        self.store = make_state(cfg, len(offsets) - 1, size, x.device,
                                widths=None if self.cols is None else {"layers": len(self.cols)},
                                initial_buffers=flatten(self.tensors)[size:])
        self.layers = self.store.get("layers")  # each node's own values of its personal layers
        self.size, self.buffers = size, self.store.get("buffers")  # buffers: local keeps each node's own
        self.momentum = self.store.get("momentum")
        self.fresh = None if self.momentum is not None else torch.zeros(size, device=x.device)
        self.loss = loss_function(getattr(cfg, "loss", "cross_entropy"))
        self.control, self.server_control = scaffold_state(self.store, size)
        self.personal = self.store.get("personal")  # Ditto's v_k, or None

    def train(self, main: torch.Tensor, rnd: int, rows: Optional[np.ndarray] = None,
              tick: Optional[Callable[[], None]] = None) -> Iterator[Chunk]:
        """Yield each node trained from `main`; `rows` (local indices) limits it to the round's selection;
        `tick()` runs before every step."""
        cfg = self.cfg
        anchor = views(main, self.params)
        for k in (range(len(self.offsets) - 1) if rows is None else rows):
            node = self.first_node + int(k)
            a, b = int(self.offsets[k]), int(self.offsets[k + 1])
            load_flat(self.tensors, main if self.layers is None else
                      with_own_layers(main, self.layers[k:k + 1], self.cols)[0])
            if self.buffers is not None:  # FedBN: the node's own running statistics, not the average
                load_flat(self.tensors[len(self.params):], self.buffers[k])
            reset_counters(self.model)
            corr = None
            if self.control is not None:
                corr = views(scaffold_correction(self.server_control, self.control[k:k + 1])[0], self.params)
            if self.fresh is not None:
                self.fresh.zero_()
            buf = self.fresh if self.momentum is None else self.momentum[k]
            with node_random(self.x.device, cfg.seed, node, rnd):
                sgd_epochs(self.model, views(buf, self.params), self.x[a:b], self.y[a:b],
                           cfg.local_epochs, cfg.batch_size, cfg.lr, cfg.momentum,
                           batch_generator(cfg.seed, node, rnd), cfg.prox_mu, anchor, compute_dtype(cfg), tick,
                           self.loss, corr)
            params = flatten(self.tensors)[None]
            if self.layers is not None:
                self.layers[k] = params[0, self.cols]
            if self.buffers is not None:
                self.buffers[k] = params[0, self.size:]
            delta = None
            if self.control is not None:
                steps = torch.tensor([cfg.local_epochs * -(-(b - a) // cfg.batch_size)], device=params.device)
                self.control[k:k + 1], delta = scaffold_node_controls(self.control[k:k + 1], self.server_control,
                                                                      main, params, steps, cfg.lr)
            yield Chunk([node], params, delta, self._personal(int(k), rnd, main, anchor, tick))

    def _personal(self, k: int, rnd: int, main: torch.Tensor, anchor: list, tick) -> Optional[torch.Tensor]:
        """Ditto: node k's personal model trained on the same batches from its kept v_k, pulled to `main`
        by ditto_lambda, with a fresh momentum buffer; stored and returned [1, P] (None without Ditto)."""
        if self.personal is None:
            return None
        cfg, node = self.cfg, self.first_node + k
        a, b = int(self.offsets[k]), int(self.offsets[k + 1])
        load_flat(self.params, ditto_start(self.personal[k:k + 1], main)[0])
        buf = torch.zeros_like(main)
        with node_random(self.x.device, cfg.seed, node, rnd):
            sgd_epochs(self.model, views(buf, self.params), self.x[a:b], self.y[a:b], cfg.local_epochs,
                       cfg.batch_size, cfg.lr, cfg.momentum, batch_generator(cfg.seed, node, rnd),
                       cfg.ditto_lambda, anchor, compute_dtype(cfg), tick, self.loss)
        self.personal[k] = flatten(self.params)
        return self.personal[k:k + 1].clone()

    def state(self) -> dict[str, torch.Tensor]:
        """Per-node state kept across rounds, in node order: momentum (local_state keep, momentum > 0) and
        SCAFFOLD's control variates c_i, each [nodes, P]; {} for a stateless FedAvg run."""
        return self.store.as_dict()


def scaffold_state(store, size: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(c_i [nodes, P] from the store, the server's c [P], zero) under `algorithm: scaffold`; else (None, None)."""
    control = store.get("control")
    if control is None:
        return None, None
    return control, torch.zeros(size, device=control.device)

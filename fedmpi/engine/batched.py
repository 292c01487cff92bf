"""The batched engine: a chunk of K nodes trained as one stacked model [K, ...].

Each node keeps its own math exactly as in `sgd_epochs`: the same shuffles (same generator,
same randperm calls), the mean cross-entropy over its own batch, its own momentum buffer.
Nodes of a chunk take their t-th step together; rows beyond a node's batch (a short last
batch, a smaller shard) are padded and weighted zero, and a node that has run out of
batches in an epoch skips the step entirely (no momentum decay, no parameter move).
"""
from __future__ import annotations

import copy
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from .train import Chunk, SequentialEngine, batch_generator, compute_dtype, views_k

# CPU working-set budget for one chunk (params + momentum + grads + activations). About the
# size of the last-level cache: measured on a 2-core EPYC (32 MiB L3), K=16..32 was fastest for
# the 2nn, larger chunks spill to DRAM on every step and get slower again.
CPU_CHUNK_BYTES = 48 << 20
GPU_MEMORY_SHARE = 0.25  # of free device memory; leaves room for evaluation and the allocator


@dataclass
class Plan:
    """One round's batch schedule for a chunk: S steps of K nodes x B rows."""

    idx: torch.Tensor        # [S, K, B] int64 rows of x (padding points at a real row)
    weight: torch.Tensor     # [S, K, B] 1/batch size on real rows, 0 on padding
    active: torch.Tensor     # [S, K] 1.0 where the node takes this step
    full: np.ndarray         # [S] bool, host side: every node steps (the fast path)


def make_plan(offsets: np.ndarray, rows: np.ndarray, first_node: int, cfg, rnd: int, device, dtype) -> Plan:
    """The batch order of nodes `rows` (local indices), drawn exactly as sgd_epochs draws it."""
    B, E = cfg.batch_size, cfg.local_epochs
    rows = np.asarray(rows, dtype=np.int64)
    counts = np.diff(offsets)[rows]
    per_epoch = max(1, int(-(-counts.max() // B))) if len(counts) else 1
    S, K = E * per_epoch, len(rows)
    idx = np.zeros((S, K, B), dtype=np.int64)
    real = np.zeros((S, K, B), dtype=bool)
    for j, k in enumerate(rows):
        n, start = int(counts[j]), int(offsets[k])
        gen = batch_generator(cfg.seed, first_node + int(k), rnd)
        for e in range(E):
            # The epoch's order laid flat over its steps: row t goes to step t // B, slot t % B.
            order = np.full(per_epoch * B, start, dtype=np.int64)
            order[:n] += torch.randperm(n, generator=gen).numpy()
            idx[e * per_epoch:(e + 1) * per_epoch, j] = order.reshape(per_epoch, B)
            real[e * per_epoch:(e + 1) * per_epoch, j] = (np.arange(per_epoch * B) < n).reshape(per_epoch, B)
    size = real.sum(2)
    weight = np.where(real, 1.0 / np.maximum(size, 1)[..., None], 0.0)
    active = size > 0
    return Plan(torch.from_numpy(idx).to(device), torch.from_numpy(weight).to(device, dtype),
                torch.from_numpy(active).to(device, dtype), active.all(1))


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
    """

    def __init__(self, model: nn.Module, layers: list[tuple[nn.Linear, bool]], dtype=None) -> None:
        self.relu = [r for _, r in layers]
        self.dtype = dtype  # of the matmuls (None: the data's); bfloat16 mirrors torch.autocast
        params = list(model.parameters())
        where = dict(zip(map(id, params), np.cumsum([0] + [p.numel() for p in params]).tolist()))
        # Slots W0, b0, W1, b1, ...: each one's offset and shape in the flat vector of model.parameters().
        self.slots = [(where[id(t)], tuple(t.shape)) for lin, _ in layers for t in (lin.weight, lin.bias)]

    def run(self, main: torch.Tensor, mom: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
            plan: Plan, lr: float, m: float, mu: float = 0.0) -> torch.Tensor:
        """Train K nodes from `main` along `plan`; momentum `mom` [K, P] is updated in place."""
        K = mom.shape[0]
        params = self._split(main.expand(K, -1))
        bufs = self._split(mom)
        anchor = self._split(main[None]) if mu else None
        xs = x.reshape(len(x), -1)
        for s in range(plan.idx.shape[0]):
            scale = None if plan.full[s] else plan.active[s]
            self._step(params, bufs, xs, y, plan.idx[s], plan.weight[s], scale, m)
            if mu:
                self._proximal(params, bufs, anchor, scale, mu)
            self._update(params, bufs, scale, lr)
        mom.copy_(self._join(bufs))
        return self._join(params)

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

    def _step(self, params, bufs, xs, y, idx, weight, scale, m: float) -> None:
        """Forward, backward and momentum of one step; the parameters move in _update."""
        K, B = idx.shape
        fd = xs.dtype
        cd = self.dtype or fd  # without autocast every .to() below is a no-op
        acts = [xs.index_select(0, idx.reshape(-1)).view(K, B, -1).to(cd)]
        weights = [params[2 * layer].to(cd) for layer in range(len(self.relu))]  # cast once, used twice
        for layer, relu in enumerate(self.relu):
            z = torch.baddbmm(params[2 * layer + 1].to(cd).unsqueeze(1), acts[-1], weights[layer].transpose(1, 2))
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
            if cd == fd:
                bufs[2 * layer].baddbmm_(g.transpose(1, 2), a, beta=beta)
            else:  # a bfloat16 product cannot accumulate into the float32 buffer within baddbmm_
                bufs[2 * layer].mul_(beta).add_(torch.bmm(g.to(cd).transpose(1, 2), a))
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
    def _proximal(params, bufs, anchor, scale, mu: float) -> None:
        """FedProx: buf += mu (w - w_main), for the nodes that take this step."""
        for p, b, a in zip(params, bufs, anchor):
            d = (p - a).mul_(mu)
            if scale is not None:
                d.mul_(scale.view(-1, *[1] * (d.dim() - 1)))
            b.add_(d)


class VmapKernel:
    """Any model: per-node gradients by vmap(grad(functional_call)) over stacked parameters.

    vmap turns each conv of the cnn into one grouped convolution over the K nodes; the update
    then runs on the whole [K, P] matrices (two passes over memory per step).
    """

    def __init__(self, model: nn.Module, dtype=None) -> None:
        self.model, self.dtype = model, dtype
        self.names = [n for n, _ in model.named_parameters()]
        self.like = list(model.parameters())
        self._local = threading.local()

    def _grads(self):
        """vmap(grad(loss)) over this thread's own copy of the model: functional_call swaps the
        module's parameters while it runs, so two threads must never share one module."""
        if not hasattr(self._local, "grads"):
            model = copy.deepcopy(self.model)

            def loss(params: dict, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
                return (F.cross_entropy(functional_call(model, params, (x,)), y, reduction="none") * w).sum()

            self._local.grads = vmap(grad(loss))
        return self._local.grads

    def run(self, main: torch.Tensor, mom: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
            plan: Plan, lr: float, m: float, mu: float = 0.0) -> torch.Tensor:
        """Train K nodes from `main` along `plan`; momentum `mom` [K, P] is updated in place."""
        K, grads = mom.shape[0], self._grads()
        flat = main.expand(K, -1).clone()
        params = dict(zip(self.names, [v.view(K, *t.shape) for v, t in
                                       zip(views_k(flat, self.like), self.like)]))
        for s in range(plan.idx.shape[0]):
            idx = plan.idx[s]
            with torch.autocast(x.device.type, dtype=self.dtype, enabled=self.dtype is not None):
                g = grads(params, x[idx], y[idx], plan.weight[s])
            g = torch.cat([g[n].reshape(K, -1) for n in self.names], 1)
            if mu:  # FedProx; nodes sitting this step out are masked below with their gradient
                g.add_((flat - main).mul_(mu * plan.active[s].unsqueeze(1)))
            if plan.full[s]:
                mom.mul_(m).add_(g)
                flat.add_(mom, alpha=-lr)
            else:
                act = plan.active[s].unsqueeze(1)
                mom.mul_(torch.where(act > 0, m, 1.0).to(mom.dtype)).add_(g)
                flat.addcmul_(mom, act, value=-lr)
        return flat


def auto_chunk(model: nn.Module, x: torch.Tensor, batch_size: int, nodes: int) -> int:
    """Nodes per chunk from a memory budget: the cache on a CPU, a share of free memory on a GPU."""
    size = sum(p.numel() for p in model.parameters()) * x.element_size()
    per_node = 3 * size + batch_size * activation_bytes(model, x)  # params, momentum, grads
    if x.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(x.device)
        budget = GPU_MEMORY_SHARE * free
    else:
        budget = CPU_CHUNK_BYTES
    return int(max(1, min(nodes, budget // per_node)))


@torch.no_grad()
def activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of every module output for one sample, x2 for their gradients."""
    total = [0]
    hooks = [m.register_forward_hook(lambda _m, _i, out: total.__setitem__(0, total[0] + out.numel()))
             for m in model.modules() if not list(m.children())]
    try:
        model(x[:1])
    finally:
        for h in hooks:
            h.remove()
    return 2 * total[0] * x.element_size()


class BatchedEngine:
    """Trains this rank's nodes in chunks of at most K at once; same results as SequentialEngine.

    On a CPU with T torch threads the chunks run T at a time, each on its own thread with
    single-threaded kernels: the kernels' own OpenMP split of small per-step ops costs more
    than it gains (measured: 15-20% faster on 2 cores). The same chunks give the same bits
    whatever T; T only evens out the chunk cut (split_rows), which moves results by rounding.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, offsets: np.ndarray,
                 first_node: int, cfg) -> None:
        self.model, self.x, self.y, self.cfg = model, x, y, cfg
        self.offsets, self.first_node = offsets, first_node
        nodes = len(offsets) - 1
        size = sum(p.numel() for p in model.parameters())
        self.momentum = torch.zeros(nodes, size, device=x.device, dtype=x.dtype)
        layers = mlp_layers(model)
        dtype = compute_dtype(cfg)
        self.kernel = MLPKernel(model, layers, dtype) if layers else VmapKernel(model, dtype)
        chunk = getattr(cfg, "chunk_nodes", 0)
        self.chunk = chunk if chunk > 0 else (auto_chunk(model, x, cfg.batch_size, nodes) if len(x) else 1)
        self.workers = torch.get_num_threads() if x.device.type == "cpu" else 1

    def train(self, main: torch.Tensor, rnd: int, rows: Optional[np.ndarray] = None) -> Iterator[Chunk]:
        """Yield trained chunks in node order, each node started from `main`; `rows` limits the nodes."""
        rows = np.arange(len(self.offsets) - 1) if rows is None else np.asarray(rows, dtype=np.int64)
        parts = split_rows(rows, self.chunk, self.workers)
        train_part = lambda part: self._train_part(main, rnd, part)  # noqa: E731
        if self.workers == 1 or len(parts) == 1:
            yield from map(train_part, parts)
        else:
            yield from parallel_in_order(train_part, parts, self.workers)

    def _train_part(self, main: torch.Tensor, rnd: int, part: np.ndarray) -> Chunk:
        ids = [self.first_node + int(k) for k in part]
        if np.diff(self.offsets)[part].sum() == 0:  # no data at all: the nodes keep `main`
            return Chunk(ids, main.expand(len(part), -1).clone())
        cfg = self.cfg
        plan = make_plan(self.offsets, part, self.first_node, cfg, rnd, self.x.device, self.x.dtype)
        # A contiguous block trains in place; a sampled subset is gathered and written back.
        block = part[-1] - part[0] + 1 == len(part)
        mom = self.momentum[part[0]:part[-1] + 1] if block else self.momentum[torch.from_numpy(part)]
        params = self.kernel.run(main, mom, self.x, self.y, plan, cfg.lr, cfg.momentum, cfg.prox_mu)
        if not block:
            self.momentum[torch.from_numpy(part)] = mom
        return Chunk(ids, params)

    def state(self) -> dict[str, torch.Tensor]:
        """Per-node momentum [nodes, P], in node order (as SequentialEngine.state)."""
        return {"momentum": self.momentum}


def split_rows(rows: np.ndarray, chunk: int, workers: int = 1) -> list[np.ndarray]:
    """`rows` in order, cut into the fewest near-equal parts of at most `chunk` rows, their count a
    multiple of `workers` where there are enough rows (so no worker idles at the end of a round)."""
    if len(rows) == 0:
        return []
    parts = -(-len(rows) // chunk)
    if len(rows) >= workers:
        parts = -(-parts // workers) * workers
    return [p for p in np.array_split(rows, parts) if len(p)]


def parallel_in_order(fn, items: list, workers: int) -> Iterator:
    """fn(item) on `workers` threads, one torch thread each, yielded in item order.

    At most `workers` results wait ahead of the consumer, so memory stays bounded at any node
    count. Torch's thread count is restored when the generator ends or is closed.
    """
    previous, grad_mode = torch.get_num_threads(), torch.is_grad_enabled()

    def one_thread(item):
        torch.set_num_threads(1)  # per-thread OpenMP setting: each worker sets its own
        with torch.set_grad_enabled(grad_mode):  # grad mode is per thread too
            return fn(item)

    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="fedmpi-chunk")
    todo = iter(items)
    pending = deque(pool.submit(one_thread, item) for item in islice(todo, workers))
    try:
        while pending:
            done = pending.popleft().result()
            for item in islice(todo, 1):  # keep the workers busy while the consumer takes `done`
                pending.append(pool.submit(one_thread, item))
            yield done
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True)
        torch.set_num_threads(previous)


ENGINES = {"sequential": SequentialEngine, "batched": BatchedEngine}


def make_engine(cfg, model: nn.Module, x: torch.Tensor, y: torch.Tensor, offsets: np.ndarray, first_node: int):
    """The engine named by cfg.engine."""
    return ENGINES[cfg.engine](model, x, y, offsets, first_node, cfg)

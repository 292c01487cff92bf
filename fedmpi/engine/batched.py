"""The batched engine: a chunk of K nodes trained as one stacked model [K, ...].

Each node keeps its own math exactly as in `sgd_epochs`: the same shuffles (same generator,
same randperm calls), the mean cross-entropy over its own batch, its own momentum buffer.
Nodes of a chunk take their t-th step together; rows beyond a node's batch (a short last
batch, a smaller shard) are padded and weighted zero, and a node that has run out of
batches in an epoch skips the step entirely (no momentum decay, no parameter move).
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..fl.algorithms import ditto_start, scaffold_correction, scaffold_node_controls
from .batchnorm import check_batchnorm
from .conv import ConvKernel, fits_conv_kernel
from .dropout import is_dropout
from .evaluate import scoring
from .losses import loss_function
from .mlp import MLPKernel, mlp_layers
from .params import flatten, float_buffers, model_tensors
from .plan import make_plan
from .sequential import Chunk, check_buffers, compute_dtype, dropout_seed, scaffold_state
from .state import layer_columns, make_state, with_own_layers
from .vmap import VmapKernel

# CPU working-set budget for one chunk (params + momentum + grads + activations). About the
# size of the last-level cache: measured on a 2-core EPYC (32 MiB L3), K=16..32 was fastest for
# the 2nn, larger chunks spill to DRAM on every step and get slower again.
CPU_CHUNK_BYTES = 48 << 20
GPU_MEMORY_SHARE = 0.25  # of free device memory, for all the ranks on it; leaves room for evaluation and the allocator


def gpu_chunk_budget(free_bytes: int, ranks_on_device: int) -> float:
    """Bytes one rank's chunk may take on its GPU: the share of free memory, split among the ranks
    that use that GPU (each sees the same free memory, so each taking the whole share oversubscribes)."""
    return GPU_MEMORY_SHARE * free_bytes / max(1, ranks_on_device)


def auto_chunk(model: nn.Module, x: torch.Tensor, batch_size: int, nodes: int, ranks_on_device: int = 1) -> int:
    """Nodes per chunk from a memory budget: the cache on a CPU, a share of free memory on a GPU."""
    size = sum(p.numel() for p in model.parameters()) * x.element_size()
    per_node = 3 * size + batch_size * activation_bytes(model, x)  # params, momentum, grads
    if x.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(x.device)
        budget = gpu_chunk_budget(free, ranks_on_device)
    else:
        budget = CPU_CHUNK_BYTES
    return int(max(1, min(nodes, budget // per_node)))


def check_stackable(model: nn.Module) -> None:
    """Refuse a module the stacked training does not handle: buffers other than BatchNorm's (a running
    state nobody updates per node), random draws other than nn.Dropout's (Dropout1d/2d/3d, AlphaDropout)."""
    for module in model.modules():
        if check_batchnorm(module) or is_dropout(module):
            continue
        if isinstance(module, nn.modules.dropout._DropoutNd) or next(module.buffers(recurse=False), None) is not None:
            raise ConfigError(f"config key 'engine': the batched engine cannot train a model with "
                              f"{type(module).__name__} (buffers or random draws per node); set engine: sequential")


@torch.no_grad()
def activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of every module output for one sample, x2 for their gradients."""
    total = [0]
    hooks = [m.register_forward_hook(lambda _m, _i, out: total.__setitem__(0, total[0] + out.numel()))
             for m in model.modules() if not list(m.children())]
    try:
        with scoring(model):  # eval: a one-row batch is fine for BatchNorm, and no running statistic moves
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
                 first_node: int, cfg, ranks_on_device: int = 1) -> None:
        self.model, self.x, self.y, self.cfg = model, x, y, cfg
        self.offsets, self.first_node = offsets, first_node
        check_stackable(model)
        check_buffers(cfg, model)
        nodes = len(offsets) - 1
        size = sum(p.numel() for p in model.parameters())
        self.size, self.buffer_size = size, sum(b.numel() for b in float_buffers(model))
        initial = flatten(model_tensors(model))[size:]
        self.cols, self.shared = layer_columns(cfg, model, size, x.device)  # personal layers' columns, or None
        self.store = make_state(cfg, nodes, size, x.device, x.dtype,
                                None if self.cols is None else {"layers": len(self.cols)}, initial_buffers=initial)
        self.layers = self.store.get("layers")  # each node's own values of its personal layers
        self.buffers = self.store.get("buffers")  # buffers: local, each node's own
        self.random = any(is_dropout(m) for m in model.modules())  # Dropout: masks drawn per node
        self.momentum = self.store.get("momentum")  # None: stateless, each chunk starts from zeros
        self.control, self.server_control = scaffold_state(self.store, size)
        self.personal = self.store.get("personal")  # Ditto's v_k, or None
        loss = loss_function(getattr(cfg, "loss", "cross_entropy"))
        layers = mlp_layers(model) if loss is None else None  # the MLP kernel's backward is cross-entropy's
        dtype = compute_dtype(cfg)
        generic = ConvKernel if fits_conv_kernel(model) else VmapKernel
        self.kernel = MLPKernel(model, layers, dtype) if layers else generic(model, dtype, loss)
        chunk = getattr(cfg, "chunk_nodes", 0)
        if chunk <= 0:
            chunk = auto_chunk(model, x, cfg.batch_size, nodes, ranks_on_device) if len(x) else 1
        self.chunk = chunk
        self.workers = torch.get_num_threads() if x.device.type == "cpu" else 1

    def train(self, main: torch.Tensor, rnd: int, rows: Optional[np.ndarray] = None,
              tick: Optional[Callable[[], None]] = None) -> Iterator[Chunk]:
        """Yield trained chunks in node order, each node started from `main`; `rows` limits the nodes;
        `tick()` runs before every step, on the worker threads too (an exception from it ends training)."""
        rows = np.arange(len(self.offsets) - 1) if rows is None else np.asarray(rows, dtype=np.int64)
        parts = split_rows(rows, self.chunk, self.workers)
        train_part = lambda part: self._train_part(main, rnd, part, tick)  # noqa: E731
        if self.workers == 1 or len(parts) == 1:
            yield from map(train_part, parts)
        else:
            yield from parallel_in_order(train_part, parts, self.workers)

    def _train_part(self, main: torch.Tensor, rnd: int, part: np.ndarray, tick: Optional[Callable[[], None]]) -> Chunk:
        ids = [self.first_node + int(k) for k in part]
        where = torch.from_numpy(part).to(self.x.device)
        start = None if self.layers is None else with_own_layers(main, self.layers[where], self.cols)
        if np.diff(self.offsets)[part].sum() == 0:  # no data at all: the nodes keep `main` (and their own layers)
            params = main.expand(len(part), -1).clone() if start is None else start
            return Chunk(ids, params, personal=self._personal(main, part))
        cfg = self.cfg
        plan = make_plan(self.offsets, part, self.first_node, cfg, rnd, self.x.device, self.x.dtype)
        # A contiguous block trains in place; a sampled subset is gathered and written back.
        block = part[-1] - part[0] + 1 == len(part)
        if self.momentum is None:
            mom = torch.zeros(len(part), main.numel(), device=self.x.device, dtype=main.dtype)
        else:
            mom = self.momentum[part[0]:part[-1] + 1] if block else self.momentum[torch.from_numpy(part)]
        corr = None if self.control is None else scaffold_correction(self.server_control, self.control[where])
        params, buffers = self.kernel_run(main, mom, plan, part, tick, corr, self._generators(ids, rnd), start)
        if self.layers is not None:
            self.layers[where] = params[:, self.cols]
        if not block and self.momentum is not None:
            self.momentum[torch.from_numpy(part)] = mom
        delta = None
        if self.control is not None:
            new, delta = scaffold_node_controls(self.control[where], self.server_control, main, params,
                                                plan.active.sum(0), cfg.lr)
            self.control[where] = new
        personal = self._personal(main, part, plan, tick, self._generators(ids, rnd))
        return Chunk(ids, params if buffers is None else torch.cat([params, buffers], 1), delta, personal)

    def _generators(self, ids: list[int], rnd: int) -> Optional[list]:
        """One generator per node seeded from (seed, node, round), for a model with Dropout (else None)."""
        if not self.random:
            return None
        return [torch.Generator(self.x.device).manual_seed(dropout_seed(self.cfg.seed, node, rnd)) for node in ids]

    def _personal(self, main: torch.Tensor, part: np.ndarray, plan=None, tick=None,
                  gens=None) -> Optional[torch.Tensor]:
        """Ditto: the nodes' personal models trained along the same plan from their kept v_k, pulled to
        `main` by ditto_lambda, with a fresh momentum buffer and the same Dropout draws as the global
        pass; stored and returned [K, P] (None without Ditto)."""
        if self.personal is None:
            return None
        where = torch.from_numpy(part).to(self.x.device)
        start = ditto_start(self.personal[where], main)
        if plan is not None:
            mom, extra = torch.zeros_like(start), {} if gens is None else {"gens": gens}
            start = self.kernel.run(main, mom, self.x, self.y, plan, self.cfg.lr, self.cfg.momentum,
                                    self.cfg.ditto_lambda, tick, None, start=start, **extra)
        self.personal[where] = start
        return start

    def kernel_run(self, main: torch.Tensor, mom: torch.Tensor, plan, part: np.ndarray, tick, corr, gens,
                   start: Optional[torch.Tensor] = None) -> tuple:
        """The kernel's trained parameters [K, P] and, for a model with float buffers, the buffers [K, B]
        the nodes ended with (started from `main`'s, or with `buffers: local` from each node's own);
        `start` [K, P]: where the nodes start instead of `main` (personal layers)."""
        cfg, size = self.cfg, self.size
        if not self.buffer_size:
            extra = {} if gens is None else {"gens": gens}  # the MLP kernel never sees a Dropout
            return self.kernel.run(main, mom, self.x, self.y, plan, cfg.lr, cfg.momentum, cfg.prox_mu, tick,
                                   corr, start=start, **extra), None
        where = torch.from_numpy(part).to(self.x.device)
        buffers = main[size:].expand(len(part), -1).clone() if self.buffers is None else self.buffers[where]
        params = self.kernel.run(main[:size], mom, self.x, self.y, plan, cfg.lr, cfg.momentum, cfg.prox_mu, tick,
                                 corr, buffers=buffers, gens=gens)
        if self.buffers is not None:
            self.buffers[where] = buffers
        return params, buffers

    def state(self) -> dict[str, torch.Tensor]:
        """Per-node state kept across rounds, in node order (as SequentialEngine.state)."""
        return self.store.as_dict()


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

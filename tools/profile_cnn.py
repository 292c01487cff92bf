"""Where one step of the batched CNN (VmapKernel, McMahan et al.'s cnn) spends its time, on one thread.

    python tools/profile_cnn.py [--nodes 8] [--batch 32] [--reps 30] [--sizes 4,8,16]

Times whole steps of K nodes (batch rows gathered, per-node gradients, momentum and parameter passes)
done in different ways that compute the same math, interleaved in one loop (the order reversed every
other repetition), so a slow spell of a shared machine hits every row:
  vmap          VmapKernel's own step: vmap(grad(functional_call)) (convs become one grouped conv),
                the gradients concatenated to [K, P], then the momentum and parameter passes
  vmap parts    the same step's pieces alone: the vmap'd forward only, the vmap'd gradient, the concat,
                the update passes; Python overhead is the step minus the parts
  loop          one plain autograd forward/backward per node of the chunk (no vmap), gradient taken
                with respect to the node's flat parameter row, so no concat is needed
  loop, channels_last   the same with the batch and conv weights in channels_last memory format
  vmap, bf16 autocast   VmapKernel's step with autocast bfloat16 (AMX through oneDNN where present)
  loop, bf16 autocast   the per-node loop with autocast bfloat16
Rows: median milliseconds per step and per node-step, and the ratio to VmapKernel's float32 step.
--sizes: whole steps at several chunk sizes, per node-step: VmapKernel's, the loop's, the loop's in bf16.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedmpi.engine.models import build_model  # noqa: E402
from fedmpi.engine.params import flatten, views_k  # noqa: E402
from fedmpi.engine.vmap import VmapKernel  # noqa: E402

M, LR = 0.9, 0.01


def setup(K: int, B: int):
    """The cnn, a VmapKernel for it, K nodes' flat parameters and momentum, data and one step's rows."""
    torch.manual_seed(0)
    model = build_model("cnn", (1, 28, 28), 10, seed=0)
    main = flatten(list(model.parameters()))
    x = torch.rand(max(K, 8) * 450, 1, 28, 28)
    y = torch.randint(0, 10, (len(x),))
    idx = torch.randint(0, len(x), (K, B))
    weight = torch.full((K, B), 1.0 / B)
    return model, main, x, y, idx, weight


def vmap_step(K: int, B: int, dtype=None):
    """VmapKernel's loop body for one full step (every node active), and its pieces."""
    model, main, x, y, idx, weight = setup(K, B)
    kernel = VmapKernel(model, dtype)
    grads, like, names = kernel._grads(), kernel.like, kernel.names
    flat, mom = main.expand(K, -1).clone(), torch.zeros(K, main.numel())
    params = dict(zip(names, [v.view(K, *t.shape) for v, t in zip(views_k(flat, like), like)]))
    from torch.func import vmap

    fwd = vmap(lambda p, xb: functional_call(model, p, (xb,)))
    ac = lambda: torch.autocast("cpu", dtype=dtype, enabled=dtype is not None)  # noqa: E731
    state = {}

    def grad_only():
        with ac():
            state["g"] = grads(params, x[idx], y[idx], weight)

    def cat():
        return torch.cat([state["g"][n].reshape(K, -1) for n in names], 1)

    def update(g):
        mom.mul_(M).add_(g)
        flat.add_(mom, alpha=-LR)

    def step():
        grad_only()
        update(cat())

    def forward_only():
        with torch.no_grad(), ac():
            fwd(params, x[idx])

    pieces = {"vmap: forward only (no grad)": forward_only, "vmap: vmap(grad) forward+backward": grad_only,
              "vmap: concat of the gradients to [K, P]": cat,
              "vmap: momentum + parameter passes": lambda: update(state["g_flat"])}
    grad_only()
    state["g_flat"] = cat()
    return step, pieces


def loop_step(K: int, B: int, channels_last: bool = False, dtype=None):
    """One plain autograd forward/backward per node, the gradient taken on the node's flat row."""
    model, main, x, y, idx, weight = setup(K, B)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    like, names = list(model.parameters()), [n for n, _ in model.named_parameters()]
    flat, mom = main.expand(K, -1).clone(), torch.zeros(K, main.numel())
    g = torch.empty_like(flat)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def step():
        for k in range(K):
            row = flat[k].detach().requires_grad_()
            views = [v.view_as(t) for v, t in zip(torch.split(row, [t.numel() for t in like]), like)]
            if channels_last:
                views = [v.contiguous(memory_format=fmt) if v.dim() == 4 else v for v in views]
            xb = x[idx[k]].contiguous(memory_format=fmt)
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                out = functional_call(model, dict(zip(names, views)), (xb,))
                loss = (F.cross_entropy(out.float(), y[idx[k]], reduction="none") * weight[k]).sum()
            g[k] = torch.autograd.grad(loss, row)[0]
        mom.mul_(M).add_(g)
        flat.add_(mom, alpha=-LR)
    return step


def timeit(runs: dict, reps: int) -> dict:
    """Median seconds of each callable, interleaved, order reversed every other repetition."""
    times = {k: [] for k in runs}
    names = list(runs)
    for rep in range(reps + 3):
        for name in (names if rep % 2 else names[::-1]):
            t0 = time.perf_counter()
            runs[name]()
            if rep >= 3:  # warm-up
                times[name].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--sizes", default="", help="comma list of chunk sizes K: only VmapKernel's step per node at each")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    K, B = args.nodes, args.batch
    if args.sizes:
        ks = [int(k) for k in args.sizes.split(",")]
        runs = {**{("vmap", k): vmap_step(k, B)[0] for k in ks}, **{("loop", k): loop_step(k, B) for k in ks},
                **{("loop bf16", k): loop_step(k, B, dtype=torch.bfloat16) for k in ks}}
        med = timeit(runs, args.reps)
        ref = med[("vmap", 1)] if 1 in ks else None
        print(f"cnn step per node-step (ms), batch {B}, 1 thread, {args.reps} interleaved repetitions, medians"
              + (" (ratio to VmapKernel at K=1)" if ref else ""))
        print("\n| K | vmap | loop | loop, bf16 autocast |\n|---:|---:|---:|---:|")
        for k in ks:
            cells = [f"{med[(w, k)] / k * 1e3:.1f}" + (f" ({med[(w, k)] / k / ref:.2f})" if ref else "")
                     for w in ("vmap", "loop", "loop bf16")]
            print(f"| {k} | " + " | ".join(cells) + " |")
        return
    step, pieces = vmap_step(K, B)
    runs = {"vmap (VmapKernel step)": step, **pieces,
            "loop: per-node autograd": loop_step(K, B),
            "loop, channels_last": loop_step(K, B, channels_last=True),
            "vmap, bf16 autocast": vmap_step(K, B, torch.bfloat16)[0],
            "loop, bf16 autocast": loop_step(K, B, dtype=torch.bfloat16)}
    med = timeit(runs, args.reps)
    ref = med["vmap (VmapKernel step)"]
    print(f"cnn step, K={K} nodes, batch {B}, 1 thread, torch {torch.__version__}, {args.reps} interleaved "
          f"repetitions, medians")
    print("\n| way | ms per step | ms per node-step | vs VmapKernel step |\n|---|---:|---:|---:|")
    for name, t in med.items():
        print(f"| {name} | {t * 1e3:.1f} | {t / K * 1e3:.2f} | {t / ref:.2f} |")
    parts = sum(med[n] for n in pieces if n != "vmap: forward only (no grad)")
    print(f"| vmap: Python overhead (step - its three parts) | {(ref - parts) * 1e3:.1f} | "
          f"{(ref - parts) / K * 1e3:.2f} | {(ref - parts) / ref:.2f} |")


if __name__ == "__main__":
    main()

"""Where one step of the batched 2nn kernel spends its time, on one thread.

    python tools/profile_step.py [--nodes 17] [--batch 32] [--reps 300] [--autocast none|bf16] [--compare]
                                 [--sizes 4,8,17,32]

Each part of MLPKernel's step (the batch-row gather, the three forward matmuls, softmax and
cross-entropy, ReLU forward and backward, the weight-gradient matmuls into the momentum, the
gradient matmuls through the hidden layers, the parameter pass) is run alone on the tensors of
a real step, in the kernel's order, and the whole step (MLPKernel._step + _update) is timed
beside them in the same repetition; the repetitions interleave all parts, so a slow spell of a
shared machine hits every row. Python overhead is the whole step minus the sum of the parts.
A bare bmm of the first layer's forward and weight-gradient shapes is timed in the same loop.
Rows: median microseconds, share of the whole step, GFLOP/s for the matmuls. --compare times only
whole steps, float32 and bf16 matmuls alternating, and prints their ratio; --sizes times whole steps
at several chunk sizes, alternating, per node.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedmpi.engine.mlp import MLPKernel, mlp_layers  # noqa: E402
from fedmpi.engine.models import build_model  # noqa: E402
from fedmpi.engine.params import flatten  # noqa: E402


def setup(K: int, B: int, autocast: str):
    """A kernel for the 2nn, its per-slot tensors for K nodes and one step's batch rows."""
    torch.manual_seed(0)
    model = build_model("2nn", (1, 28, 28), 10, seed=0)
    kernel = MLPKernel(model, mlp_layers(model), torch.bfloat16 if autocast == "bf16" else None)
    main = flatten(list(model.parameters()))
    x = torch.rand(K * 450, 784)
    y = torch.randint(0, 10, (K * 450,))
    params = kernel._split(main.expand(K, -1))
    bufs = kernel._split(torch.zeros(K, main.numel()))
    idx = torch.randint(0, len(x), (K, B))
    weight = torch.full((K, B), 1.0 / B)
    return kernel, params, bufs, x, y, idx, weight


def parts(kernel, params, bufs, x, y, idx, weight, m: float, lr: float) -> dict:
    """name -> (callable that runs that part of a step alone, its flops or 0)."""
    K, B = idx.shape
    cd = kernel.dtype or x.dtype
    st = {}
    st["a0"] = x.index_select(0, idx.reshape(-1)).view(K, B, -1).to(cd)
    ws = kernel.shadows(params)
    bs = [params[2 * i + 1].to(cd).unsqueeze(1) for i in range(3)]
    acts = [st["a0"]]
    for i in range(3):
        z = torch.baddbmm(bs[i], acts[-1], ws[i].transpose(1, 2))
        acts.append(z.relu_() if i < 2 else z)
    g = torch.softmax(acts[3].float(), 2)
    gs = [g, torch.rand(K, B, 200), torch.rand(K, B, 200)]  # the gradients at layers 2, 1, 0
    dims = [(784, 200), (200, 200), (200, 10)]  # (in, out)
    ones = torch.full((K, B, 1), -1.0)

    def wgrad(i):
        bufs[2 * i].baddbmm_(gs[2 - i].transpose(1, 2), acts[i].to(x.dtype), beta=m)

    def ce():
        h = torch.softmax(acts[3].to(x.dtype), dim=2)
        h.scatter_add_(2, y[idx].unsqueeze(2), ones)
        h.mul_(weight.unsqueeze(2))

    fl = lambda i: 2.0 * K * B * dims[i][0] * dims[i][1]  # noqa: E731
    table = {
        "gather of the batch rows": (lambda: x.index_select(0, idx.reshape(-1)).view(K, B, -1).to(cd), 0),
    }
    for i in range(3):
        table[f"forward matmul {i + 1} ({dims[i][0]}->{dims[i][1]})"] = (
            lambda i=i: torch.baddbmm(bs[i], acts[i], ws[i].transpose(1, 2)), fl(i))
    table["ReLU forward (x2)"] = (lambda: (acts[1].relu_(), acts[2].relu_()), 0)
    table["softmax / cross-entropy gradient"] = (ce, 0)
    for i in reversed(range(3)):
        table[f"weight-gradient matmul {i + 1} + momentum"] = (lambda i=i: wgrad(i), fl(i))
    table["bias gradients + momentum (x3)"] = (lambda: [bufs[2 * i + 1].mul_(m).add_(gs[2 - i].sum(1))
                                                        for i in range(3)], 0)
    for i in (2, 1):
        table[f"gradient matmul through layer {i + 1}"] = (
            lambda i=i: torch.bmm(gs[2 - i].to(cd), ws[i]), fl(i))
    table["ReLU backward (x2)"] = (lambda: [torch.ops.aten.threshold_backward(gs[j].to(cd), acts[j], 0).float()
                                            for j in (1, 2)], 0)
    table["parameter pass (p -= lr buf)"] = (lambda: torch._foreach_add_(params, bufs, alpha=-lr), 0)
    if ws[0] is not params[0]:
        table["bfloat16 shadow refresh"] = (lambda: torch._foreach_copy_(ws, params[0::2]), 0)
    return table


def whole_step(K: int, B: int, autocast: str, m: float, lr: float):
    """A callable running one whole step (MLPKernel._step + _update, as MLPKernel.run's loop does)."""
    kernel, params, bufs, x, y, idx, weight = setup(K, B, autocast)
    weights, shadows = params[0::2], kernel.shadows(params)

    def step():
        kernel._step(params, bufs, x, y, idx, weight, None, m, shadows)
        kernel._update(params, bufs, None, lr)
        if shadows[0] is not weights[0]:
            torch._foreach_copy_(shadows, weights)
    return step


def compare(K: int, B: int, reps: int) -> None:
    """Whole steps in float32 and with bfloat16 matmuls, alternating in one loop: the ratio."""
    steps = {mode: whole_step(K, B, mode, 0.9, 0.01) for mode in ("none", "bf16")}
    times = {mode: [] for mode in steps}
    for rep in range(reps + 10):
        for mode in (("none", "bf16") if rep % 2 else ("bf16", "none")):
            t0 = time.perf_counter()
            steps[mode]()
            if rep >= 10:
                times[mode].append(time.perf_counter() - t0)
    f32, b16 = (np.array(times[k]) for k in ("none", "bf16"))
    print(f"whole step, K={K}, batch {B}, {reps} alternating repetitions: float32 {np.median(f32) * 1e6:.0f} us, "
          f"bf16 matmuls {np.median(b16) * 1e6:.0f} us; float32 / bf16 per-pair median {np.median(f32 / b16):.3f}")


def sizes(chunks: list[int], B: int, reps: int, autocast: str) -> None:
    """Whole steps at several chunk sizes K, alternating in one loop: microseconds per node-step."""
    steps = {k: whole_step(k, B, autocast, 0.9, 0.01) for k in chunks}
    times = {k: [] for k in chunks}
    for rep in range(reps + 10):
        for k in (chunks if rep % 2 else chunks[::-1]):
            t0 = time.perf_counter()
            steps[k]()
            if rep >= 10:
                times[k].append((time.perf_counter() - t0) / k)
    print(f"whole step per node, batch {B}, autocast {autocast}, {reps} alternating repetitions:")
    for k in chunks:
        print(f"  K={k:3d}: {np.median(times[k]) * 1e6:7.0f} us per node-step")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[2])
    p.add_argument("--nodes", type=int, default=17)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=300)
    p.add_argument("--autocast", choices=("none", "bf16"), default="none")
    p.add_argument("--compare", action="store_true", help="only the whole step, float32 against bf16, alternating")
    p.add_argument("--sizes", default="", help="comma list of chunk sizes K: only the whole step per node at each")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    K, B, m, lr = args.nodes, args.batch, 0.9, 0.01
    if args.compare:
        return compare(K, B, args.reps)
    if args.sizes:
        return sizes([int(k) for k in args.sizes.split(",")], B, args.reps, args.autocast)
    kernel, params, bufs, x, y, idx, weight = setup(K, B, args.autocast)
    table = parts(kernel, params, bufs, x, y, idx, weight, m, lr)
    step = whole_step(K, B, args.autocast, m, lr)

    bf = torch.bfloat16 if args.autocast == "bf16" else torch.float32
    a, w = torch.rand(K, B, 784, dtype=bf), torch.rand(K, 200, 784, dtype=bf)
    g = torch.rand(K, B, 200, dtype=bf)
    flops0 = 2.0 * K * B * 784 * 200
    extra = {"whole step": (step, 0),
             "bare bmm, forward shape": (lambda: torch.bmm(a, w.transpose(1, 2)), flops0),
             "bare bmm, weight-gradient shape": (lambda: torch.bmm(g.transpose(1, 2), a), flops0)}
    runs = {**table, **extra}
    times = {k: [] for k in runs}
    for rep in range(args.reps + 10):
        for name, (fn, _) in runs.items():
            t0 = time.perf_counter()
            fn()
            if rep >= 10:  # warm-up
                times[name].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) * 1e6 for k, v in times.items()}
    total = med["whole step"]
    overhead = total - sum(med[k] for k in table)
    print(f"2nn step, K={K} nodes, batch {B}, autocast {args.autocast}, 1 thread, torch {torch.__version__}, "
          f"{args.reps} interleaved repetitions, medians")
    print("\n| part | us | share of step | GFLOP/s |\n|---|---:|---:|---:|")
    for name in table:
        fl = runs[name][1]
        rate = f"{fl / med[name] / 1e3:.1f}" if fl else ""
        print(f"| {name} | {med[name]:.0f} | {med[name] / total:.1%} | {rate} |")
    print(f"| Python overhead (step - parts) | {overhead:.0f} | {overhead / total:.1%} | |")
    step_flops = 3 * sum(f for n, (_, f) in table.items() if n.startswith("forward"))
    step_flops -= 2.0 * K * B * 784 * 200  # no gradient is propagated into the input
    print(f"| **whole step** | **{total:.0f}** | 100% | {step_flops / total / 1e3:.1f} |")
    for name in ("bare bmm, forward shape", "bare bmm, weight-gradient shape"):
        print(f"\n{name} ({bf}): {flops0 / med[name] / 1e3:.1f} GFLOP/s", end="")
    print(f"\nwhole step at {step_flops / total / flops0 * med['bare bmm, forward shape']:.0%} of the bare "
          f"forward-shape bmm's rate")


if __name__ == "__main__":
    main()

"""Benchmark: the tutorial's loop vs fedmpi's sequential and batched engines, communication, scaling.

    python tools/bench.py [--rounds N] [--quick] [--device cpu|cuda] [--bf16] [--data-dir DIR]

Training: the tutorial setup (100 nodes x 450 MNIST images, 2nn, 10 local epochs, batch 32, lr 0.01,
momentum 0.9), the three contenders interleaved round by round in one process (A B C A B C ...) so
a noisy neighbour hurts all of them alike; ratios are medians of the per-round pairs. Then fedmpi's
aggregation step vs a raw MPI Allreduce (tools/bench_mpi.py under mpirun) and one round of the same
work at 1 rank x 2 threads vs 2 ranks x 1 thread. --bf16 adds a fourth contender, the batched
engine with autocast bf16, with its accuracy curve beside float32's.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedmpi.config import Config  # noqa: E402
from fedmpi.data.prepare import prepare  # noqa: E402
from fedmpi.data.shards import read_attrs, read_nodes, read_test  # noqa: E402
from fedmpi.engine.batched import BatchedEngine  # noqa: E402
from fedmpi.engine.evaluate import accuracy_loss  # noqa: E402
from fedmpi.engine.mlp import mlp_layers  # noqa: E402
from fedmpi.engine.models import build_model  # noqa: E402
from fedmpi.engine.params import flatten, load_flat  # noqa: E402
from fedmpi.engine.sequential import SequentialEngine  # noqa: E402
from fedmpi.fl.aggregate import UpdateSum, apply_update  # noqa: E402
from fedmpi.runtime.device import configure_torch, host_cores  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[1] / "shared" / "data" / "mnist"  # ../shared beside the checkout
NAMES = {"A": "tutorial loop", "B": "engine sequential", "C": "engine batched", "D": "batched, bf16 autocast"}


def sync(device: torch.device) -> float:
    """A wall-clock reading after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class Tutorial:
    """The tutorial's loop: per node an nn.Module, a torch.optim.SGD and a shuffling DataLoader (bench only)."""

    def __init__(self, model, x, y, offsets, cfg) -> None:
        self.models, self.opts, self.loaders = [], [], []
        for k in range(len(offsets) - 1):
            a, b = int(offsets[k]), int(offsets[k + 1])
            m = copy.deepcopy(model)
            self.models.append(m)
            self.opts.append(torch.optim.SGD(m.parameters(), lr=cfg.lr, momentum=cfg.momentum))
            self.loaders.append(DataLoader(TensorDataset(x[a:b], y[a:b]), batch_size=cfg.batch_size, shuffle=True))
        self.epochs = cfg.local_epochs

    def round(self, main: torch.Tensor, rnd: int) -> torch.Tensor:
        """Each node from `main` in turn, then the plain mean of the node models."""
        total = torch.zeros_like(main, dtype=torch.float64)
        for m, opt, loader in zip(self.models, self.opts, self.loaders):
            load_flat(list(m.parameters()), main)
            m.train()
            for _ in range(self.epochs):
                for xb, yb in loader:
                    opt.zero_grad()
                    F.cross_entropy(m(xb), yb).backward()
                    opt.step()
            total += flatten(list(m.parameters())).double()
        return (total / len(self.models)).to(main.dtype)


def engine_round(engine, main: torch.Tensor, rnd: int) -> torch.Tensor:
    """fedmpi's local part of a round: train, sum the updates, apply (the Allreduce of one rank is a no-op)."""
    update = UpdateSum(main)
    for chunk in engine.train(main, rnd):
        update.add(chunk.params, np.ones(len(chunk.nodes)))
    return apply_update(main, update.pack())


def load_setup(args):
    """Config, shard file and device tensors of the tutorial setup."""
    cfg = Config(data_dir=str(args.data_dir), data_file=str(args.work / "mnist-balanced-100x450-seed0.h5"),
                 local_epochs=args.epochs, device=args.device, chunk_nodes=args.chunk)
    path = prepare(cfg)
    attrs = read_attrs(path)
    shape, scale = tuple(attrs["input_shape"]), float(attrs["pixel_scale"])
    train, (tx, ty) = read_nodes(path, "train", 0, cfg.nodes), read_test(path)
    dev = torch.device(args.device)
    as_float = lambda a: torch.from_numpy(a).to(dev).float().mul_(scale)  # noqa: E731
    data = (as_float(train.x), torch.from_numpy(train.y).to(dev), train.offsets, as_float(tx), torch.from_numpy(ty).to(dev))
    return cfg, path, shape, data


def contenders(cfg, shape, data, dev, only: str = "ABC"):
    """The round functions of the contenders in `only`, each with its own copy of the initial model."""
    model = build_model(cfg.model, shape, 10, cfg.seed).to(dev)
    x, y, offsets = data[:3]
    bf16 = dataclasses.replace(cfg, autocast="bf16")
    make = {"A": lambda: Tutorial(model, x, y, offsets, cfg).round,
            "B": lambda: (lambda m, r, e=SequentialEngine(copy.deepcopy(model), x, y, offsets, 0, cfg): engine_round(e, m, r)),
            "C": lambda: (lambda m, r, e=BatchedEngine(copy.deepcopy(model), x, y, offsets, 0, cfg): engine_round(e, m, r)),
            "D": lambda: (lambda m, r, e=BatchedEngine(copy.deepcopy(model), x, y, offsets, 0, bf16): engine_round(e, m, r))}
    return model, {k: make[k]() for k in only}


def train_part(args) -> dict:
    """Interleaved rounds; returns per-contender times (s) and test accuracy per round."""
    cfg, path, shape, data = load_setup(args)
    dev = torch.device(args.device)
    model, fns = contenders(cfg, shape, data, dev, only="ABCD" if args.bf16 else "ABC")
    mains = {k: flatten(list(model.parameters())) for k in fns}
    times, cpu, acc = ({k: [] for k in fns} for _ in range(3))
    for rnd in range(1, args.rounds + 1):
        for k, fn in fns.items():
            t0, c0 = sync(dev), time.process_time()
            mains[k] = fn(mains[k], rnd)
            times[k].append(sync(dev) - t0)
            # CPU seconds of this process: with one thread, robust to other processes on the host.
            cpu[k].append(time.process_time() - c0)
            acc[k].append(accuracy_loss(model, mains[k], data[3], data[4])[0])
            print(f"  round {rnd} {NAMES[k]:<24} {times[k][-1]:7.2f} s  test acc {acc[k][-1]:.4f}", flush=True)
    chunk = BatchedEngine(model, *data[:3], 0, cfg).chunk
    return dict(times=times, cpu=cpu, acc=acc, cfg=cfg, path=path, model=model, chunk=chunk, shape=shape)


def train_flops(model) -> float:
    """FLOPs of one training sample of an MLP: forward, weight gradients, input gradients (not layer 1's)."""
    layers = mlp_layers(model)
    if not layers:
        return float("nan")
    macs = [lin.in_features * lin.out_features for lin, _ in layers]
    return 2.0 * (2 * sum(macs) + sum(macs[1:]))


def matmul_rate(shape_k: int, batch: int, n_in: int, n_out: int, dev: torch.device) -> tuple[float, float]:
    """GFLOP/s of a bmm shaped like the batched first layer, and of a large square sgemm (the reachable rate)."""
    def rate(fn, flops: float) -> float:
        fn()
        best = float("inf")
        for _ in range(5):
            t0 = sync(dev)
            for _ in range(10):
                fn()
            best = min(best, (sync(dev) - t0) / 10)
        return flops / best / 1e9
    a, w = torch.rand(shape_k, batch, n_in, device=dev), torch.rand(shape_k, n_out, n_in, device=dev)
    big = torch.rand(2048, 2048, device=dev)
    return (rate(lambda: torch.bmm(a, w.transpose(1, 2)), 2.0 * shape_k * batch * n_in * n_out),
            rate(lambda: big @ big, 2.0 * 2048 ** 3))


def memory_probe(args) -> None:
    """One round of one contender in a fresh process; prints its peak RSS (MiB) as JSON."""
    cfg, _, shape, data = load_setup(args)
    dev = torch.device(args.device)
    if args.probe != "none":
        model, fns = contenders(cfg, shape, data, dev, only=args.probe)
        fns[args.probe](flatten(list(model.parameters())), 1)
    out = dict(maxrss_mib=peak_rss_mib())
    if dev.type == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated(dev) / 2 ** 20
    print(json.dumps(out))


def peak_rss_mib() -> float:
    """Peak RSS of this process. VmHWM first: Linux carries ru_maxrss over fork+exec, so a probe
    started by a big parent would report the parent's peak; getrusage where /proc is absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def probe_memory(args) -> dict:
    """Peak memory of each contender alone (fresh processes; 'none' is the data and model without training)."""
    out = {}
    for k in ("none", "A", "B", "C") + (("D",) if args.bf16 else ()):
        cmd = [sys.executable, __file__, "--probe", k, "--epochs", "1", "--device", args.device,
               "--data-dir", str(args.data_dir), "--work", str(args.work), "--threads", str(args.threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[k] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def mpirun() -> str:
    beside = Path(sys.executable).parent / "mpirun"
    return str(beside) if beside.exists() else "mpirun"


def run_mpi(ranks: int, args: list[str]) -> list[dict]:
    """tools/bench_mpi.py under mpirun; its JSON lines (rank 0 prints them)."""
    cmd = [mpirun(), "-n", str(ranks), sys.executable, str(HERE / "bench_mpi.py"), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def median_ratio(num: list[float], den: list[float]) -> float:
    return float(np.median(np.array(num) / np.array(den)))


def report(res: dict, args, mem: dict, comm: list, scale: list) -> None:
    """The tables, printed (the PERFORMANCE.md text is this output)."""
    t, cfg, model = res["times"], res["cfg"], res["model"]
    node_epochs = cfg.nodes * cfg.local_epochs
    flops = train_flops(model) * cfg.nodes * cfg.samples_per_node * cfg.local_epochs
    bmm, peak = matmul_rate(res["chunk"], cfg.batch_size, 784, 200, torch.device(args.device))
    print(f"\n## Training: {cfg.nodes} nodes x {cfg.samples_per_node}, {cfg.model}, {cfg.local_epochs} epochs, batch "
          f"{cfg.batch_size}; {args.rounds} rounds interleaved; device {args.device}, {torch.get_num_threads()} threads; "
          f"batched chunk {res['chunk']} nodes\n")
    print("| contender | wall ms / node-epoch | CPU ms / node-epoch | GFLOP/s (wall) | of bmm-like | of 2048^3 sgemm "
          "| peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for k in t:
        sec = float(np.median(t[k]))
        rate = flops / sec / 1e9
        gpu = f" (GPU {mem[k]['cuda_peak_mib']:.0f})" if "cuda_peak_mib" in mem[k] else ""
        cpu = float(np.median(res["cpu"][k]))
        print(f"| {k}: {NAMES[k]} | {sec / node_epochs * 1e3:.2f} | {cpu / node_epochs * 1e3:.2f} | {rate:.1f} | {rate / bmm:.0%} | {rate / peak:.0%} "
              f"| {mem[k]['maxrss_mib']:.0f}{gpu} |")
    print(f"\nreference matmuls in the same run: bmm [{res['chunk']}x{cfg.batch_size}x784]@[784x200] {bmm:.1f} GFLOP/s, "
          f"2048^3 sgemm {peak:.1f} GFLOP/s; RSS of data + model without training {mem['none']['maxrss_mib']:.0f} MiB")
    print(f"\nspeedup (median of per-round pairs): batched / tutorial {median_ratio(t['A'], t['C']):.2f}x, "
          f"batched / sequential {median_ratio(t['B'], t['C']):.2f}x, sequential / tutorial {median_ratio(t['A'], t['B']):.2f}x")
    c = res["cpu"]
    print(f"by CPU time: batched / tutorial {median_ratio(c['A'], c['C']):.2f}x, "
          f"batched / sequential {median_ratio(c['B'], c['C']):.2f}x, sequential / tutorial {median_ratio(c['A'], c['B']):.2f}x"
          f"{'' if torch.get_num_threads() == 1 else ' (with several threads CPU time counts spinning too)'}")
    if "D" in t:
        print(f"bf16 autocast: batched bf16 / batched fp32 {median_ratio(t['C'], t['D']):.2f}x (above 1: bf16 faster)")
    print("\ntest accuracy per round:")
    for k in t:
        print(f"  {NAMES[k]:<24} " + " ".join(f"{a:.4f}" for a in res["acc"][k]))
    spread = np.max(np.ptp(np.array([res["acc"][k] for k in "ABC"]), axis=0))
    print(f"  largest spread between the float32 contenders in a round: {spread:.4f}")
    if "D" in t:
        gap = np.array(res["acc"]["D"]) - np.array(res["acc"]["C"])
        print("  bf16 autocast minus float32 (batched): " + " ".join(f"{g:+.4f}" for g in gap))
    if comm:
        print("\n## Aggregation step: fedmpi (pack + allreduce_sum + apply_update) vs raw mpi4py Allreduce, same buffer\n")
        print("| ranks | payload bytes | fedmpi ms | of which allreduce ms | raw Allreduce ms | fedmpi / raw |")
        print("|---|---|---|---|---|---|")
        for r in comm:
            print(f"| {r['ranks']} | {r['bytes']:,} | {r['fedmpi_ms']:.2f} | {r['allreduce_ms']:.2f} | {r['raw_ms']:.2f} "
                  f"| {r['fedmpi_ms'] / r['raw_ms']:.2f} |")
    if scale:
        print(f"\n## Scaling: one round of the same {cfg.nodes} nodes (batched engine), wall time of the slowest rank\n")
        print("| layout | train s | round s |")
        print("|---|---|---|")
        for r in scale:
            print(f"| {r['ranks']} rank(s) x {r['threads']} thread(s) | {r['train_s']:.2f} | {r['round_s']:.2f} |")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5, --quick 2)")
    p.add_argument("--quick", action="store_true", help="2 rounds of 2 local epochs, comm at -n 2/4: about 2 minutes")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("FEDMPI_DATA", DEFAULT_DATA)))
    p.add_argument("--work", type=Path, default=Path("/tmp/fedmpi-bench"), help="where the shard file is written")
    p.add_argument("--threads", type=int, default=host_cores())
    p.add_argument("--chunk", type=int, default=0, help="chunk_nodes of the batched engine (0: auto)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--bf16", action="store_true", help="add contender D: the batched engine with autocast bf16")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.epochs = args.epochs or (2 if args.quick else 10)
    return args


def mpi_parts(args, res: dict) -> tuple[list, list]:
    """The aggregation and scaling rows, each from tools/bench_mpi.py under mpirun (none without an mpirun)."""
    if not shutil.which(mpirun()):
        print("\nno mpirun found: the aggregation and scaling parts are skipped (pip install -e '.[mpich]')")
        return [], []
    size = sum(p.numel() for p in res["model"].parameters())
    reps = "20" if args.quick else "100"
    comm = [r for n in ((2, 4) if args.quick else (2, 4, 8, 16))
            for r in run_mpi(n, ["comm", "--size", str(size), "--reps", reps, "--device", args.device])]
    common = ["--data-file", str(res["path"]), "--epochs", str(args.epochs), "--chunk", str(args.chunk),
              "--data-dir", str(args.data_dir)]
    # The scaling part shares out CPU cores; with one GPU there is nothing to share out.
    scale = [] if args.device == "cuda" else \
        [r for n, th in ((1, 2), (2, 1)) for r in run_mpi(n, ["scale", "--threads", str(th), *common])]
    return comm, scale


def main() -> None:
    args = parse_args()
    configure_torch(args.threads)
    if args.probe:
        return memory_probe(args)
    print(f"$ python tools/bench.py {' '.join(sys.argv[1:])}\ntorch {torch.__version__}, {host_cores()} cores, "
          f"load average at start {os.getloadavg()[0]:.1f} (other processes on the host skew absolute times)", flush=True)
    mem = probe_memory(args)  # before training: keeps this process small while the probes run
    res = train_part(args)
    comm, scale = mpi_parts(args, res)
    report(res, args, mem, comm, scale)
    print(f"\nload average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

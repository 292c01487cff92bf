"""Many nodes on one device: one round of N tutorial-sized nodes with the batched engine.

    python tools/bench_nodes.py --nodes 1000 [--device cuda] [--epochs 10] [--autocast bf16]

Nodes of the tutorial's size (450 images of 28x28, 2nn, batch 32) on random data held once on
the device: the chunk size comes from the memory budget as in a real run, so this shows whether
N nodes fit (the goal: 1,000 nodes on one GPU) and what a round of them costs. Prints one
JSON line: nodes, chunk, seconds per round, ms per node-epoch, peak memory.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import peak_rss_mib, sync  # noqa: E402

from fedmpi.config import Config  # noqa: E402
from fedmpi.engine.batched import BatchedEngine  # noqa: E402
from fedmpi.engine.models import build_model  # noqa: E402
from fedmpi.engine.params import flatten  # noqa: E402
from fedmpi.fl.aggregate import UpdateSum, apply_update  # noqa: E402
from fedmpi.runtime.device import configure_torch, host_cores  # noqa: E402


def one_round(engine: BatchedEngine, main: torch.Tensor, rnd: int) -> torch.Tensor:
    update = UpdateSum(main)
    for chunk in engine.train(main, rnd):
        update.add(chunk.params, np.ones(len(chunk.nodes)))
    return apply_update(main, update.pack())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--samples", type=int, default=450)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2, help="the last round is timed (the first warms up)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--autocast", default="none", choices=("none", "bf16"))
    p.add_argument("--threads", type=int, default=host_cores())
    args = p.parse_args()
    configure_torch(args.threads)
    dev = torch.device(args.device)
    cfg = Config(nodes=args.nodes, samples_per_node=args.samples, local_epochs=args.epochs, device=args.device,
                 autocast=args.autocast)
    gen = torch.Generator().manual_seed(0)
    total = args.nodes * args.samples
    x = torch.rand(total, 1, 28, 28, generator=gen).to(dev)  # the rank's data, once, on the device
    y = torch.randint(0, 10, (total,), generator=gen).to(dev)
    offsets = np.arange(args.nodes + 1, dtype=np.int64) * args.samples
    model = build_model("2nn", (1, 28, 28), 10, 0).to(dev)
    engine = BatchedEngine(model, x, y, offsets, 0, cfg)
    main_model = flatten(list(model.parameters()))
    for rnd in range(1, args.rounds + 1):
        t0 = sync(dev)
        main_model = one_round(engine, main_model, rnd)
        seconds = sync(dev) - t0
    out = dict(nodes=args.nodes, device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
               autocast=args.autocast, chunk=engine.chunk, workers=engine.workers, round_s=round(seconds, 3),
               ms_per_node_epoch=round(1e3 * seconds / (args.nodes * args.epochs), 3),
               finite=bool(torch.isfinite(main_model).all()), peak_rss_mib=round(peak_rss_mib()))
    if dev.type == "cuda":
        out["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated(dev) / 2 ** 20)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

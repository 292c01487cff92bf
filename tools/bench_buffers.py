"""Batched vs sequential engine on the example CNN (BatchNorm, Dropout), interleaved, one process, s/round.

    python tools/bench_buffers.py --nodes 16 --samples 40 --rounds 4

Rounds alternate between the engines on the same synthetic data, so both see the same machine load;
prints the median seconds per round of each and their ratio (sequential / batched: > 1 is batched faster).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs" / "examples"))
from models import small_cnn  # noqa: E402

from fedmpi.engine.batched import BatchedEngine  # noqa: E402
from fedmpi.engine.params import flatten, model_tensors  # noqa: E402
from fedmpi.engine.sequential import SequentialEngine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--samples", type=int, default=40, help="per node")
    parser.add_argument("--rounds", type=int, default=4, help="per engine")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.nodes * args.samples, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (len(x),), generator=gen)
    offsets = np.arange(args.nodes + 1, dtype=np.int64) * args.samples
    cfg = SimpleNamespace(seed=1, local_epochs=1, batch_size=8, lr=0.01, momentum=0.9, chunk_nodes=0, prox_mu=0.0,
                          buffers="average")
    torch.manual_seed(1)
    engines = {name: cls(small_cnn((1, 28, 28), 10, width=8), x, y, offsets, 0, cfg)
               for name, cls in (("sequential", SequentialEngine), ("batched", BatchedEngine))}
    main_vec = flatten(model_tensors(engines["batched"].model))
    times: dict[str, list[float]] = {name: [] for name in engines}
    for rnd in range(1, args.rounds + 2):  # round 1 of each warms up and is not counted
        for name, engine in engines.items():
            t0 = time.perf_counter()
            for _ in engine.train(main_vec, rnd):
                pass
            if rnd > 1:
                times[name].append(time.perf_counter() - t0)
    seq, bat = (statistics.median(times[n]) for n in ("sequential", "batched"))
    print(f"example CNN (width 8, BatchNorm, Dropout), {args.nodes} nodes x {args.samples} samples, batch 8, "
          f"{args.threads} thread(s): sequential {seq:.3f} s/round, batched {bat:.3f} s/round, "
          f"sequential/batched {seq / bat:.2f}x")


if __name__ == "__main__":
    main()

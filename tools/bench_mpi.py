"""The MPI parts of tools/bench.py, run under mpirun; rank 0 prints one JSON line per result.

    mpirun -n N python tools/bench_mpi.py comm --size P [--reps R] [--device cuda]
    mpirun -n N python tools/bench_mpi.py scale --threads T --data-file F [--epochs E] [--chunk K]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedmpi.config import Config  # noqa: E402
from fedmpi.data.partition import node_ranges  # noqa: E402
from fedmpi.data.shards import read_attrs, read_nodes  # noqa: E402
from fedmpi.engine.batched import BatchedEngine  # noqa: E402
from fedmpi.engine.models import build_model  # noqa: E402
from fedmpi.engine.params import flatten  # noqa: E402
from fedmpi.fl.aggregate import TRAILER, UpdateSum, apply_update  # noqa: E402
from fedmpi.rounds import sync  # noqa: E402
from fedmpi.runtime.comm import world  # noqa: E402
from fedmpi.runtime.device import configure_torch  # noqa: E402


def slowest(comm, seconds: float) -> float:
    """The largest value over the ranks: a collective step ends when its last rank does."""
    return max(comm.allgather(seconds))


def bench_comm(size: int, reps: int, device: str = "cpu") -> None:
    """fedmpi's aggregation (pack + allreduce_sum + apply_update) vs a raw Allreduce of the same float32 buffer.

    On cuda the updates and the main model live on the GPU: pack copies them into pinned host
    memory, and apply copies the sum back, both inside the timed step."""
    comm = world()
    torch.set_num_threads(1)
    dev = torch.device(device)
    main = torch.zeros(size, device=dev)
    update = UpdateSum(main)
    raw = np.ones(size + TRAILER, dtype=np.float32)
    fed, inner, plain = [], [], []
    for rep in range(reps + 2):  # the first two warm up the transport
        # As in a round: the nodes' updates have just been summed into the payload (untimed).
        update.total.fill_(1e-3 * (comm.rank + 1))
        update.weight = 1.0
        raw.fill(1.0)
        comm.barrier()
        t0 = sync(dev)
        buf = update.pack()
        timing = comm.allreduce_sum(buf)
        apply_update(main, buf)
        t1 = sync(dev)
        comm.barrier()
        t2 = time.perf_counter()
        MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, raw, op=MPI.SUM)
        t3 = time.perf_counter()
        if rep >= 2:
            fed.append(slowest(comm, t1 - t0))
            inner.append(min(comm.allgather(timing.t_collective)))  # the transfer, as fedmpi reports it
            plain.append(slowest(comm, t3 - t2))
    if comm.rank == 0:
        print(json.dumps(dict(ranks=comm.size, device=device, bytes=raw.nbytes, fedmpi_ms=1e3 * np.median(fed),
                              allreduce_ms=1e3 * np.median(inner), raw_ms=1e3 * np.median(plain))))


def bench_scale(args) -> None:
    """Two rounds of this rank's share of the nodes with the batched engine; the faster round is reported."""
    comm = world()
    cfg = Config(data_dir=args.data_dir, data_file=args.data_file, local_epochs=args.epochs, chunk_nodes=args.chunk,
                 threads=args.threads)
    configure_torch(args.threads)
    attrs = read_attrs(cfg.data_path)
    shape, scale = tuple(attrs["input_shape"]), float(attrs["pixel_scale"])
    mine = node_ranges(cfg.nodes, comm.size)[comm.rank]
    shards = read_nodes(cfg.data_path, "train", mine.start, mine.stop)
    x, y = torch.from_numpy(shards.x).float().mul_(scale), torch.from_numpy(shards.y)
    model = build_model(cfg.model, shape, 10, cfg.seed)
    engine = BatchedEngine(model, x, y, shards.offsets, mine.start, cfg)
    main, best = flatten(list(model.parameters())), None
    for rnd in (1, 2):
        comm.barrier()
        t0 = time.perf_counter()
        update = UpdateSum(main)
        for chunk in engine.train(main, rnd):
            update.add(chunk.params, np.ones(len(chunk.nodes)))
        t1 = time.perf_counter()
        buf = update.pack()
        comm.allreduce_sum(buf)
        main = apply_update(main, buf)
        t2 = time.perf_counter()
        row = (slowest(comm, t1 - t0), slowest(comm, t2 - t0))
        best = row if best is None or row[1] < best[1] else best
    if comm.rank == 0:
        print(json.dumps(dict(ranks=comm.size, threads=args.threads, train_s=best[0], round_s=best[1])))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="part", required=True)
    c = sub.add_parser("comm")
    c.add_argument("--size", type=int, required=True, help="parameters P (the buffer holds P + trailer floats)")
    c.add_argument("--reps", type=int, default=30)
    c.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the updates and main model live")
    s = sub.add_parser("scale")
    s.add_argument("--threads", type=int, required=True)
    s.add_argument("--data-file", required=True)
    s.add_argument("--data-dir", default=None)
    s.add_argument("--epochs", type=int, default=10)
    s.add_argument("--chunk", type=int, default=0)
    args = p.parse_args()
    if args.part == "comm":
        bench_comm(args.size, args.reps, args.device)
    else:
        bench_scale(args)


if __name__ == "__main__":
    main()

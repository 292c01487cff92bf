"""Allreduce of an update buffer in fp32, fp16 and bf16: the MPI's own type and the user-defined op.

  mpirun -n 2 python tools/bench_compress.py [--repeat 20]

Prints, per model size and wire format: bytes per rank, median Allreduce time, encode + decode
time, the error of the sum against a float64 sum of the float32 inputs, and whether every rank
got the same bits. Inputs are update-like: N(0, 1e-3^2) per rank, a different draw on each rank.
"""
from __future__ import annotations

import argparse
import hashlib
import time

import numpy as np
import torch
from mpi4py import MPI

from fedmpi.fl.compress import decode, encode, payload_bytes
from fedmpi.runtime.comm import reduction_for

SIZES = {"2nn": 199_210, "cnn": 1_663_370}


def update_of(rank: int, n: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng([rank, n]).normal(0, 1e-3, n).astype(np.float32))


def measure(comm, n: int, wire: str, repeat: int) -> dict:
    """One wire format: time and error of `repeat` Allreduces of this rank's encoded update."""
    dtype = wire.split("-")[0]
    datatype, op, _ = reduction_for(MPI, dtype, builtin=not wire.endswith("userop"))
    mine = update_of(comm.rank, n)
    t0 = time.perf_counter()
    enc = encode(mine, dtype)
    t_encode = time.perf_counter() - t0
    times = []
    for _ in range(repeat + 2):  # two warm-up rounds
        buf = enc.copy()
        comm.Barrier()
        t0 = MPI.Wtime()
        comm.Allreduce(MPI.IN_PLACE, [buf, datatype], op=op)
        times.append(MPI.Wtime() - t0)
    t0 = time.perf_counter()
    got = decode(buf, dtype).double()
    t_decode = time.perf_counter() - t0
    ref = sum(update_of(r, n).double() for r in range(comm.size))
    same = len(set(comm.allgather(hashlib.sha256(buf.tobytes()).hexdigest()))) == 1
    return dict(bytes=payload_bytes(n, dtype), t_allreduce=float(np.median(times[2:])), t_codec=t_encode + t_decode,
                rel_l2=float((got - ref).norm() / ref.norm()), max_rel=float(((got - ref).abs() / ref.abs().clamp_min(1e-6)).max()),
                same=same)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    if comm.rank == 0:
        print(f"{comm.size} ranks, {MPI.Get_library_version().splitlines()[0]}; builtin fp16: "
              f"{reduction_for(MPI, 'fp16')[2]}, bf16: {reduction_for(MPI, 'bf16')[2]}")
        print(f"{'model':>5} {'wire':>12} {'bytes/rank':>11} {'allreduce ms':>13} {'codec ms':>9} "
              f"{'rel L2 err':>11} {'same bits':>9}")
    for model, n in SIZES.items():
        for wire in ("fp32", "fp16", "fp16-userop", "bf16", "bf16-userop"):
            row = measure(comm, n, wire, args.repeat)
            t = max(comm.allgather(row["t_allreduce"]))
            if comm.rank == 0:
                print(f"{model:>5} {wire:>12} {row['bytes']:>11,} {t * 1e3:>13.2f} {row['t_codec'] * 1e3:>9.2f} "
                      f"{row['rel_l2']:>11.2e} {str(row['same']):>9}", flush=True)


if __name__ == "__main__":
    main()

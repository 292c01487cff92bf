"""Cost of secure aggregation per round: mask generation and quantization vs the Allreduce of the same buffer.

  mpirun -n 4 python tools/bench_secagg.py [--sizes 199210 1663370] [--bits 64 32] [--repeat 10]

Per model size (default: the 2NN and CNN of McMahan et al.) and ring, rank 0 prints one JSON line:
buffer bytes; the median time to mask the buffer on one rank (R-1 ChaCha20 streams and ring
additions; the largest over the ranks), in ms and ms per MB; the keystream alone per MB; the
fixed-point quantization of one node's update; the median Allreduce of the masked integer buffer
and of a float32 buffer of the same length (today's unmasked payload); mask / Allreduce; and
whether the masked sum equalled the unmasked one bit for bit. Absolute times depend on the
machine and its load; the ratios are the result.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from mpi4py import MPI

from fedmpi.fl.ring import FixedPoint
from fedmpi.fl.secagg import PairwiseMasks, keystream_into

TRAILER = 4  # participants, unclipped count, dropped, stop vote


def median_time(fn, repeat: int, barrier=None) -> float:
    """Median seconds of `repeat` calls after one warm-up; `barrier` lines the ranks up before each."""
    times = []
    for i in range(repeat + 1):
        if barrier is not None:
            barrier()
        t0 = time.perf_counter()
        fn()
        if i:
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure(comm, masks: PairwiseMasks, params: int, bits: int, repeat: int) -> dict:
    fp = FixedPoint(clip=1.0, max_nodes=1000, bits=bits)
    rng = np.random.default_rng([comm.rank, params])
    update = torch.from_numpy(rng.normal(0, 1e-3, (1, params)).astype(np.float32))
    plain = np.zeros(params + TRAILER, fp.dtype)
    t_quant = median_time(lambda: fp.add_rows(plain[:params], update), repeat)
    plain[:] = 0
    fp.add_rows(plain[:params], update)
    buf = plain.copy()
    t_mask = median_time(lambda: masks.mask_into(buf, 1), repeat)
    scratch = np.empty_like(buf)
    t_stream = median_time(lambda: keystream_into(bytes(32), 1, scratch), repeat)
    masked = masks.mask_into(plain.copy(), 2)

    def allreduce(x):
        return lambda: comm.Allreduce(MPI.IN_PLACE, x.copy(), op=MPI.SUM)

    t_ring = median_time(allreduce(masked), repeat, comm.Barrier)
    t_fp32 = median_time(allreduce(np.zeros(params + TRAILER, np.float32)), repeat, comm.Barrier)
    total, expected = masked.copy(), plain.copy()
    comm.Allreduce(MPI.IN_PLACE, total, op=MPI.SUM)
    comm.Allreduce(MPI.IN_PLACE, expected, op=MPI.SUM)
    mb = buf.nbytes / 2 ** 20
    t_mask_max = comm.allreduce(t_mask, op=MPI.MAX)
    return dict(ranks=comm.size, params=params, bits=bits, bytes=buf.nbytes, mask_ms=1e3 * t_mask_max,
                mask_ms_per_mb=1e3 * t_mask_max / mb, stream_ms_per_mb=1e3 * t_stream / mb,
                quantize_node_ms=1e3 * t_quant, allreduce_ms=1e3 * t_ring, allreduce_fp32_ms=1e3 * t_fp32,
                allreduce_ms_per_mb=1e3 * t_ring / mb, mask_over_allreduce=t_mask_max / t_ring,
                exact=bool(comm.allreduce(int(np.array_equal(total, expected)), op=MPI.MIN)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[199_210, 1_663_370])
    parser.add_argument("--bits", type=int, nargs="+", default=[64, 32], choices=[32, 64])
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    masks = PairwiseMasks.setup(comm.rank, comm.size, comm.allgather)
    for params in args.sizes:
        for bits in args.bits:
            row = measure(comm, masks, params, bits, args.repeat)
            if comm.rank == 0:
                print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()

"""Run under `mpirun -n R`: key exchange by allgather, masked integer Allreduce, compared with the unmasked sum.

  mpirun -n 3 python tests/fl/secagg_mpi_check.py 3 [bits]

Every rank quantizes its own block of NODES synthetic clipped updates into the ring, adds the
trailer (its node count), masks the buffer and takes part in one Allreduce(SUM). Every rank also
computes the unmasked ring sum of all nodes alone, as the reference. Rank 0 prints one JSON line:
whether the Allreduce gave the reference bit for bit on every rank, whether each rank's masked
buffer differed from its unmasked one, and the result's digest (the same at any rank count).
"""
import hashlib
import json
import sys

import numpy as np
import torch

from fedmpi.fl.privacy import clip_updates
from fedmpi.fl.ring import FixedPoint, from_ring, to_ring
from fedmpi.fl.secagg import PairwiseMasks
from fedmpi.runtime.comm import install_excepthook, world

NODES, PARAMS, CLIP, ROUND = 10, 1000, 1.0, 3


def node_updates(nodes: range) -> torch.Tensor:
    """Clipped synthetic updates, seeded by node id only."""
    rows = [torch.from_numpy(np.random.default_rng([5, k]).normal(0, 0.1, PARAMS).astype(np.float32)) for k in nodes]
    return clip_updates(torch.stack(rows), CLIP)[0] if rows else torch.zeros(0, PARAMS)


def ring_buffer(fp: FixedPoint, nodes: range) -> np.ndarray:
    """[ring sum of the nodes' quantized updates | node count]."""
    buf = np.zeros(PARAMS + 1, dtype=fp.dtype)
    if len(nodes):
        fp.add_rows(buf[:PARAMS], node_updates(nodes))
    buf[PARAMS:] = to_ring([len(nodes)], fp.bits)
    return buf


def main() -> None:
    install_excepthook()  # a failing rank ends the job rather than leaving the others in a collective
    comm = world()
    expected_ranks, bits = int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 64
    assert comm.size == expected_ranks, f"started {comm.size} ranks, expected {expected_ranks}"
    masks = PairwiseMasks.setup(comm.rank, comm.size, comm.allgather)
    fp = FixedPoint(CLIP, NODES, bits)
    per = -(-NODES // comm.size)
    mine = range(min(NODES, comm.rank * per), min(NODES, (comm.rank + 1) * per))
    plain = ring_buffer(fp, mine)
    buf = masks.mask_into(plain.copy(), ROUND)
    masked_differs = comm.size == 1 or not np.array_equal(buf, plain)
    comm.allreduce_sum(buf)
    reference = ring_buffer(fp, range(NODES))
    equal = bool(np.array_equal(buf, reference))
    rows = comm.gather(dict(equal=equal, masked_differs=bool(masked_differs)))
    if comm.rank == 0:
        nodes = int(from_ring(buf[PARAMS:], bits)[0])
        error = np.abs(fp.decode(buf[:PARAMS], nodes) - node_updates(range(NODES)).double().sum(0).numpy()).max()
        print(json.dumps(dict(ranks=comm.size, equal=all(r["equal"] for r in rows), nodes=nodes,
                              masked_differs=all(r["masked_differs"] for r in rows), max_error=float(error),
                              error_bound=fp.error_bound(NODES), digest=hashlib.sha256(buf.tobytes()).hexdigest())))


if __name__ == "__main__":
    main()

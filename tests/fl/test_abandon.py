"""The INTERRUPTED stop vote survives the sum of every update dtype, as the Allreduce adds them."""
import numpy as np
import pytest
import torch

from fedmpi.fl.aggregate import INTERRUPTED, UpdateSum, Wire, round_abandoned, trailer
from fedmpi.fl.compress import bf16_add_into, fp16_add_into


def wire(dtype, rank=0):
    return Wire(dtype, ranks=3, rank=rank, most_nodes=2)


def packed(vote, dtype, rank, ranks_weight=3.0):
    update = UpdateSum(torch.zeros(5))
    update.add(torch.ones(1, 5), np.array([1.0]))
    return update.pack(dropped=1, stop=vote, wire=wire(dtype, rank), round_weight=ranks_weight)


def all_reduced(bufs, dtype):
    """What MPI's SUM leaves on every rank (the user ops comm.py uses for fp16/bf16 where MPI has none)."""
    total = bufs[0].copy()
    for buf in bufs[1:]:
        if dtype == "fp32":
            total += buf
        else:
            (fp16_add_into if dtype == "fp16" else bf16_add_into)(buf.view(np.uint16), total.view(np.uint16))
    return total


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("votes,abandoned,stop", [
    ((0.0, 0.0, 0.0), False, False),
    ((0.0, 1.0, 1.0), False, True),
    ((0.0, INTERRUPTED, 0.0), True, True),
    ((INTERRUPTED, 1.0, INTERRUPTED), True, True),
])
def test_one_interrupted_rank_makes_every_rank_abandon(dtype, votes, abandoned, stop):
    reduced = all_reduced([packed(v, dtype, rank) for rank, v in enumerate(votes)], dtype)
    assert round_abandoned(reduced, wire(dtype)) is abandoned
    assert trailer(reduced, wire(dtype))[2] is stop
    assert trailer(reduced, wire(dtype))[1] == 3  # the other trailer values are untouched by the vote

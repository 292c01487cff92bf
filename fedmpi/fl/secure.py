"""Secure aggregation in the round: each node's clipped update in fixed point, summed in Z_2^b, masked per rank.

The round's one Allreduce then carries a uint64 (or uint32) buffer

    [ ring sum of this rank's nodes' quantized updates (P) | dropped, unclipped, stop, interrupted ]

masked as a whole by fl/secagg.py's pairwise masks: the trailer's counts travel masked too, so no
rank learns how many of another rank's nodes took part, diverged or stayed inside the clip. The
masks cancel in the SUM (MPI's unsigned addition wraps modulo 2^b), so the all-reduced buffer is
the unmasked ring sum bit for bit. Integer addition is exact and associative and each node is
quantized on its own, so that sum, and the decoded update, are the same at any rank count.

A stop vote cannot be infinity in a ring: the interrupted ranks are counted in the last slot
instead, and any count above zero abandons the round, as INTERRUPTED does in a float buffer.
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np
import torch

from ..errors import FedmpiError
from .aggregate import INTERRUPTED
from .ring import FixedPoint, from_ring, to_ring
from .secagg import PairwiseMasks

TAIL = 4  # dropped, unclipped, stop, interrupted


class RingSum:
    """This rank's nodes' clipped updates, each quantized to fixed point and summed into the ring."""

    def __init__(self, main: torch.Tensor, fixed: FixedPoint) -> None:
        self.main, self.fixed = main, fixed
        self.buf = np.zeros(main.numel() + TAIL, dtype=fixed.dtype)
        self.weight = 0.0

    def add(self, params: torch.Tensor, weights: np.ndarray, scale: Optional[torch.Tensor] = None) -> None:
        """Quantize and add rows params[j] - main, each times scale[j] (its clip factor); weights are all 1."""
        if len(weights):
            rows = params.float() - self.main.float()
            if scale is not None:
                rows.mul_(scale.to(rows.device, torch.float32)[:, None])
            self.fixed.add_rows(self.buf[:-TAIL], rows)
            self.weight += float(np.sum(weights))

    def pack(self, dropped: int, vote: float, unclipped: int) -> np.ndarray:
        """The unmasked buffer with its trailer (the stop vote as two counts: stop, interrupted)."""
        interrupted = vote == INTERRUPTED
        self.buf[-TAIL:] = to_ring([dropped, unclipped, int(interrupted or vote > 0), int(interrupted)],
                                   self.fixed.bits)
        return self.buf


class MaskError(FedmpiError):
    """The masks did not cancel: some rank masked with other keys (or another round)."""


def counts(reduced: np.ndarray, bits: int, selected: int = 1 << 62, ranks: int = 1 << 62) -> tuple:
    """(dropped, unclipped, any rank voted to stop, some rank was interrupted) from the all-reduced buffer.

    Masks that did not cancel leave the counts uniform over the ring: counts beyond the round's
    `selected` nodes or the job's `ranks` are refused (every rank sees the same sum and ends alike).
    """
    dropped, unclipped, stop, interrupted = (int(v) for v in from_ring(reduced[-TAIL:], bits))
    if not (0 <= dropped <= selected and 0 <= unclipped <= selected - dropped and 0 <= interrupted <= stop <= ranks):
        raise MaskError("secure aggregation: the masked sum does not decode (its counts are out of range): the "
                        "ranks' masks did not cancel; the last checkpoint is kept")
    return dropped, unclipped, stop > 0, interrupted > 0


def decoded_sum(reduced: np.ndarray, fixed: FixedPoint, participants: int) -> torch.Tensor:
    """The float32 sum of the participants' clipped updates from the all-reduced ring sum."""
    return torch.from_numpy(fixed.decode(reduced[:-TAIL], participants)).float()


def masked(masks: PairwiseMasks, buf: np.ndarray, rnd: int) -> float:
    """Mask `buf` in place for round `rnd`; returns the seconds it took (the secure-aggregation cost)."""
    t0 = time.perf_counter()
    masks.mask_into(buf, rnd)
    return time.perf_counter() - t0


def setup_masks(comm) -> PairwiseMasks:
    """Collective, once per run: fresh X25519 keys, one allgather of the public keys, the pair keys."""
    return PairwiseMasks.setup(comm.rank, comm.size, comm.allgather)

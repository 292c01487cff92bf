"""Aggregation math, pure torch: no MPI here, so it is tested with hand-computed arrays.

Each rank packs sum_k w_k * (theta_k - theta_main) over its nodes, followed by a trailer of
sum_k w_k, the count of nodes dropped (NaN/Inf) and the rank's stop vote (0, 1 after a signal,
INTERRUPTED when the signal cut its training short), into one flat buffer; one Allreduce(SUM)
adds the ranks, so the ranks agree on the average, on the dropped count, on stopping and on
abandoning the round without another round trip; `apply_update` divides and adds
the mean update to the main model in one pass. Summing updates rather than weights keeps the
rounding error of the float32 sums at the scale of the update, far below the weights' own last
bit, so the result hardly depends on how many ranks took part.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .compress import decode, encode


def node_weights(aggregation: str, samples: np.ndarray) -> np.ndarray:
    """'mean': every node counts once (the tutorial); 'weighted': by its sample count (FedAvg)."""
    if aggregation == "mean":
        return np.ones(len(samples))
    if aggregation == "weighted":
        return np.asarray(samples, dtype=np.float64)
    raise ValueError(f"unknown aggregation {aggregation!r}")


class UpdateSum:
    """Accumulates this rank's weighted node updates straight into the collective's payload.

    The payload is float32 [P updates | weight, dropped, stop]. On a CPU the running sum lives in
    the payload itself, so `pack` only writes the trailer; on a GPU the sum stays on the device
    and `pack` copies it once into a pinned (page-locked) host payload, one DMA with no bounce
    buffer. float32 sums of updates round at the update's own scale, far below the weights' last
    bit.
    """

    def __init__(self, main: torch.Tensor) -> None:
        self.main = main
        size, on_gpu = main.numel(), main.device.type == "cuda"
        self.payload = torch.zeros(size + TRAILER, dtype=torch.float32, pin_memory=on_gpu)
        self.total = torch.zeros(size, dtype=torch.float32, device=main.device) if on_gpu else self.payload[:size]
        self.weight = 0.0

    def add(self, params: torch.Tensor, weights: np.ndarray) -> None:
        """Add rows params[j] with weights[j] (params: [k, P])."""
        if len(weights):
            w = torch.as_tensor(weights, dtype=torch.float32, device=params.device)
            self.total.addmv_((params.float() - self.main.float()).t(), w)
            self.weight += float(np.sum(weights))

    def pack(self, dropped: int = 0, stop: float = 0.0, dtype: str = "fp32", round_weight: float = 1.0) -> np.ndarray:
        """The collective's payload: [updates, weight, dropped nodes, stop vote] (P + 3 values).

        fp32: the payload itself (the Allreduce sums it in place), divided after the Allreduce.
        fp16/bf16: the sum divided by the round's total weight first (known on every rank), so
        the values sit at the update's own scale, well inside fp16's range, and the buffer sums
        to the mean update itself.
        """
        size = self.main.numel()
        if dtype == "fp32":
            if self.total.data_ptr() != self.payload.data_ptr():
                self.payload[:size].copy_(self.total)
            buf = self.payload.numpy()
            buf[size:] = (self.weight, dropped, float(stop))
            return buf
        tail = torch.tensor([self.weight / round_weight, dropped, float(stop)], dtype=torch.float64,
                            device=self.total.device)
        return encode(torch.cat([self.total.double() / round_weight, tail]), dtype)


TRAILER = 3
# A stop vote: this rank's training was interrupted, its sum is incomplete. Infinity survives the sum in
# every update dtype (inf + x = inf), so every rank sees it and abandons the round.
INTERRUPTED = math.inf


def trailer(reduced: np.ndarray, dtype: str = "fp32") -> tuple[float, int, bool]:
    """(total weight, nodes dropped, any rank voted to stop) from an all-reduced buffer.

    Compressed buffers carry the weight as the share of the round's weight that took part.
    """
    values = reduced[-TRAILER:] if dtype == "fp32" else decode(reduced[-TRAILER:], dtype).numpy()
    weight, dropped, stop = (float(v) for v in values)
    return weight, int(round(dropped)), stop > 0


def round_abandoned(reduced: np.ndarray, dtype: str = "fp32") -> bool:
    """Whether some rank voted INTERRUPTED in an all-reduced buffer: nobody may apply this round."""
    stop = reduced[-TRAILER:][2:]
    return not math.isfinite(float(stop[0] if dtype == "fp32" else decode(stop, dtype)[0]))


def summed_update(reduced: np.ndarray, dtype: str = "fp32") -> tuple[torch.Tensor, float]:
    """(u, s) with the round's mean update = s * u, with no pass over the buffer: for fp32, u is
    the all-reduced sum itself (a view) and s = 1 / total weight."""
    weight, dropped, _ = trailer(reduced, dtype)
    if weight <= 0:
        raise ValueError("no node contributed to this round (total weight is zero)")
    if dtype == "fp32":
        return torch.from_numpy(reduced[:-TRAILER]), 1.0 / weight
    # Pre-divided by the whole round's weight: rescale only when dropped nodes left a share out,
    # since the half-precision share itself carries rounding error.
    return decode(reduced[:-TRAILER], dtype), (1.0 / weight if dropped else 1.0)


def apply_update(main: torch.Tensor, reduced: np.ndarray) -> torch.Tensor:
    """Plain FedAvg in one pass, in place: main += (sum of w*update) / (sum of w), from an fp32
    all-reduced buffer; returns main."""
    update, scale = summed_update(reduced)
    return main.add_(update.to(main.device, main.dtype), alpha=scale)


def wire_bytes_estimate(payload_bytes: int, ranks: int) -> int:
    """Bytes one rank sends in a ring Allreduce: 2 (P-1)/P x payload (reduce-scatter + allgather)."""
    return 0 if ranks <= 1 else int(round(2 * (ranks - 1) / ranks * payload_bytes))

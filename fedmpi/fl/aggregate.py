"""Aggregation math, pure torch: no MPI here, so it is tested with hand-computed arrays.

Each rank packs sum_k w_k * (theta_k - theta_main) over its nodes, followed by a trailer of
sum_k w_k, the count of nodes dropped (NaN/Inf) and the rank's stop vote (0, 1 after a signal,
INTERRUPTED when the signal cut its training short), into one flat buffer; one Allreduce(SUM)
adds the ranks, so the ranks agree on the average, on the dropped count, on stopping and on
abandoning the round without another round trip; `apply_update` divides and adds
the mean update to the main model in one pass. Summing updates rather than weights keeps the
rounding error of the float32 sums at the scale of the update, far below the weights' own last
bit, so the result hardly depends on how many ranks took part.

What the trailer's sums are worth: float32 holds every count up to 2^24 nodes exactly. In fp16
and bf16 (integers exact only to 2048 and 256) the dropped count travels as small digits
(compress.CountCode), exact at any rank and node count. The stop vote is one slot: a sum of
non-negative votes rounds to at least its largest vote, so "some rank voted" is always read
right. The weight share (the included share of the round's weight) is a fraction carrying the
codec's own rounding, like the update it rescales.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .compress import CountCode, count_code, decode, decode_count, encode, encode_count


def node_weights(aggregation: str, samples: np.ndarray) -> np.ndarray:
    """'mean': every node counts once (the tutorial); 'weighted': by its sample count (FedAvg)."""
    if aggregation == "mean":
        return np.ones(len(samples))
    if aggregation == "weighted":
        return np.asarray(samples, dtype=np.float64)
    raise ValueError(f"unknown aggregation {aggregation!r}")


TRAILER = 3  # fp32: weight, dropped, stop (plus the unclipped count before stop when clipping)


@dataclass(frozen=True)
class Wire:
    """How a rank's buffer travels: its dtype and, for fp16/bf16, who sends it among how many
    ranks holding at most `most_nodes` nodes each (the layout of the exact dropped count)."""

    dtype: str = "fp32"
    ranks: int = 1
    rank: int = 0
    most_nodes: int = 1
    extra: int = 0  # values between the update and the trailer (SCAFFOLD: the control-variate deltas, fp32 only)
    unclipped: bool = False  # DP: a second exact count, the nodes inside the clip, before the stop vote

    @property
    def code(self) -> CountCode:
        return count_code(self.dtype, self.ranks, self.most_nodes)

    @property
    def tail(self) -> int:
        """Values after the update: fp32 [weight, dropped, (unclipped,) stop]; fp16/bf16 [share, count
        slots, (unclipped count slots,) stop]."""
        counts = 2 if self.unclipped else 1
        return TRAILER - 1 + counts if self.dtype == "fp32" else 2 + counts * self.code.slots


FP32 = Wire()


class UpdateSum:
    """Accumulates this rank's weighted node updates straight into the collective's payload.

    The payload is float32 [P updates | weight, dropped, stop]. On a CPU the running sum lives in
    the payload itself, so `pack` only writes the trailer; on a GPU the sum stays on the device
    and `pack` copies it once into a pinned (page-locked) host payload, one DMA with no bounce
    buffer. float32 sums of updates round at the update's own scale, far below the weights' last
    bit.
    """

    def __init__(self, main: torch.Tensor, wire: Wire = FP32) -> None:
        self.main = main
        size, extra, on_gpu = main.numel(), wire.extra, main.device.type == "cuda"
        self.payload = torch.zeros(size + extra + (wire.tail if wire.dtype == "fp32" else TRAILER),
                                   dtype=torch.float32, pin_memory=on_gpu)
        self.total = torch.zeros(size, dtype=torch.float32, device=main.device) if on_gpu else self.payload[:size]
        # Unweighted sum of extra rows (SCAFFOLD's control deltas), after the update in the same payload.
        self.extra = (torch.zeros(extra, dtype=torch.float32, device=main.device) if on_gpu
                      else self.payload[size:size + extra])
        self.weight = 0.0

    def add(self, params: torch.Tensor, weights: np.ndarray, extra_rows: Optional[torch.Tensor] = None,
            tally: Optional[np.ndarray] = None, scale: Optional[torch.Tensor] = None) -> None:
        """Add rows params[j] with weights[j] (params: [k, P]), each also times scale[j] (its clip factor)
        when given, and the rows of `extra_rows` unweighted; the trailer's weight counts `tally`
        (default: `weights`; FedNova weights its updates otherwise)."""
        if len(weights):
            w = torch.as_tensor(weights, dtype=torch.float32, device=params.device)
            if scale is not None:
                w = w * scale.to(w.device, torch.float32)
            self.total.addmv_((params.float() - self.main.float()).t(), w)
            self.weight += float(np.sum(weights if tally is None else tally))
        if extra_rows is not None and len(extra_rows):
            self.extra.add_(extra_rows.float().sum(0).to(self.extra.device))

    def pack(self, dropped: int = 0, stop: float = 0.0, wire: Wire = FP32, round_weight: float = 1.0,
             unclipped: int = 0) -> np.ndarray:
        """The collective's payload: the updates, then the trailer (`Wire.tail` values).

        fp32: the payload itself (the Allreduce sums it in place), divided after the Allreduce.
        fp16/bf16: the sum divided by the round's total weight first (known on every rank), so
        the values sit at the update's own scale, well inside fp16's range, and the buffer sums
        to the mean update itself; the dropped count as exact digits.
        """
        size = self.main.numel()
        if wire.dtype == "fp32":
            if self.total.data_ptr() != self.payload.data_ptr():
                self.payload[:size].copy_(self.total)
                self.payload[size:size + len(self.extra)].copy_(self.extra)
            buf = self.payload.numpy()
            counts = (dropped, unclipped) if wire.unclipped else (dropped,)
            buf[size + len(self.extra):] = (self.weight, *counts, float(stop))
            return buf
        if len(self.extra):
            raise ValueError("extra values travel only in fp32")
        count = encode_count(dropped, wire.rank, wire.code)
        if wire.unclipped:
            count = np.concatenate([count, encode_count(unclipped, wire.rank, wire.code)])
        tail = torch.from_numpy(np.concatenate([[self.weight / round_weight], count, [float(stop)]]))
        return encode(torch.cat([self.total.double() / round_weight, tail.to(self.total.device)]), wire.dtype)


# A stop vote: this rank's training was interrupted, its sum is incomplete. Infinity survives the sum in
# every update dtype (inf + x = inf), so every rank sees it and abandons the round.
INTERRUPTED = math.inf


def trailer(reduced: np.ndarray, wire: Wire = FP32) -> tuple[float, int, bool]:
    """(total weight, nodes dropped, any rank voted to stop) from an all-reduced buffer.

    Compressed buffers carry the weight as the share of the round's weight that took part.
    """
    if wire.dtype == "fp32":
        weight, dropped, stop = (float(v) for v in reduced[[-wire.tail, 1 - wire.tail, -1]])
        return weight, int(round(dropped)), stop > 0
    values = decode(reduced[-wire.tail:], wire.dtype).numpy()
    return float(values[0]), decode_count(values[1:1 + wire.code.slots], wire.code), bool(values[-1] > 0)


def unclipped_count(reduced: np.ndarray, wire: Wire) -> int:
    """The all-reduced count of nodes inside the clip (a Wire with `unclipped`)."""
    if wire.dtype == "fp32":
        return int(round(float(reduced[-2])))
    slots = wire.code.slots
    return decode_count(decode(reduced[-wire.tail:], wire.dtype).numpy()[1 + slots:1 + 2 * slots], wire.code)


def round_abandoned(reduced: np.ndarray, wire: Wire = FP32) -> bool:
    """Whether some rank voted INTERRUPTED in an all-reduced buffer: nobody may apply this round."""
    stop = reduced[-1:]  # the stop vote is the trailer's last value in every layout
    return not math.isfinite(float(stop[0] if wire.dtype == "fp32" else decode(stop, wire.dtype)[0]))


def summed_update(reduced: np.ndarray, wire: Wire = FP32) -> tuple[torch.Tensor, float]:
    """(u, s) with the round's mean update = s * u, with no pass over the buffer: for fp32, u is
    the all-reduced sum itself (a view) and s = 1 / total weight."""
    weight, dropped, _ = trailer(reduced, wire)
    if weight <= 0:
        raise ValueError("no node contributed to this round (total weight is zero)")
    if wire.dtype == "fp32":
        return torch.from_numpy(reduced[:len(reduced) - wire.tail - wire.extra]), 1.0 / weight
    # Pre-divided by the whole round's weight: rescale only when dropped nodes left a share out,
    # since the half-precision share itself carries rounding error.
    return decode(reduced[:-wire.tail], wire.dtype), (1.0 / weight if dropped else 1.0)


def extra_sum(reduced: np.ndarray, wire: Wire) -> torch.Tensor:
    """The all-reduced extra values (a view): fp32 [update | extra | trailer]."""
    end = len(reduced) - wire.tail
    return torch.from_numpy(reduced[end - wire.extra:end])


def summed_total(reduced: np.ndarray, wire: Wire, round_weight: float) -> torch.Tensor:
    """The all-reduced sum of the weighted updates itself: fp32 a view; fp16/bf16 decoded and times the
    round weight `pack` divided by."""
    if wire.dtype == "fp32":
        return torch.from_numpy(reduced[:len(reduced) - wire.tail - wire.extra])
    return decode(reduced[:-wire.tail], wire.dtype) * round_weight


def apply_update(main: torch.Tensor, reduced: np.ndarray) -> torch.Tensor:
    """Plain FedAvg in one pass, in place: main += (sum of w*update) / (sum of w), from an fp32
    all-reduced buffer; returns main."""
    update, scale = summed_update(reduced)
    return main.add_(update.to(main.device, main.dtype), alpha=scale)


def wire_bytes_estimate(payload_bytes: int, ranks: int) -> int:
    """Bytes one rank sends in a ring Allreduce: 2 (P-1)/P x payload (reduce-scatter + allgather)."""
    return 0 if ranks <= 1 else int(round(2 * (ranks - 1) / ranks * payload_bytes))

"""Fixed-point updates in the integer ring Z_{2^b} that secure aggregation sums (b = 64 or 32).

Each node's clipped update is quantized on its own, q_k = round(2^f * Delta_k), saturated at
+-Q with Q <= floor(2^f S) + 1 (S the clip; Q the largest float32 there), and stored modulo 2^b;
ranks and the Allreduce add q's modulo 2^b. Integer addition is exact and associative, so the ring sum, and the decoded
update, are the same bits at any rank count and in any order of summation (unlike a float sum).

The scale 2^f is a power of two: x * 2^f is exact in floating point, so quantization is the same
on every device. f is the largest integer with

    n_max * Q <= 2^(b-1) - 1                                      (overflow bound)

for n_max the most nodes one round can sum: then |sum_k q_k| < 2^(b-1) and the sum read as a
signed integer is the true integer sum; no wrap-around can corrupt it. Per coordinate, each node
contributes a rounding error of at most 2^-(f+1), so for k nodes

    |decode(sum_k q_k) - sum_k Delta_k| <= k * 2^-(f+1)  per coordinate   (error bound)

(plus the float64 rounding of the decoded value, relative 2^-53), as long as no coordinate lies
beyond +-S (a clipped update's coordinates cannot, except by float rounding of the clip, which the
saturation absorbs). b = 64: for S = 1 and n_max = 1000, f = 53 and the error is 2^-54 ~ 6e-17 per
node, far below float32's own rounding of the update (float32 values above 2^-29 in size are
multiples of 2^-53 and quantize exactly). b = 32 halves the bytes (those of the float32 payload)
with f = 21: 2^-22 ~ 2.4e-7 per node and coordinate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

RINGS = {32: (np.uint32, np.int32), 64: (np.uint64, np.int64)}
BLOCK_VALUES = 1 << 18  # values quantized per step in add_rows


@dataclass(frozen=True)
class FixedPoint:
    """Quantization of updates of L2 norm <= clip into Z_{2^bits} for sums of at most max_nodes nodes."""

    clip: float
    max_nodes: int
    bits: int = 64

    def __post_init__(self) -> None:
        if self.bits not in RINGS:
            raise ValueError(f"ring bits must be one of {sorted(RINGS)}, got {self.bits!r}")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip must be a finite number > 0, got {self.clip!r}")
        if not (isinstance(self.max_nodes, int) and self.max_nodes >= 1):
            raise ValueError(f"max_nodes must be an integer >= 1, got {self.max_nodes!r}")
        # Q >= 2 must fit (else the search below finds no scale), and the clip must span a step at least.
        if 2 * self.max_nodes > (1 << (self.bits - 1)) - 1 or math.floor(self.clip * 2.0 ** self.frac_bits) < 1:
            raise ValueError(f"a {self.bits}-bit ring cannot hold sums of {self.max_nodes} nodes at clip {self.clip:g}")

    @property
    def dtype(self) -> type:
        return RINGS[self.bits][0]

    @property
    def frac_bits(self) -> int:
        """f: the largest integer with max_nodes * (floor(2^f clip) + 1) <= 2^(bits-1) - 1."""
        limit = (1 << (self.bits - 1)) - 1
        f = math.floor(math.log2(limit / self.max_nodes / self.clip)) + 1  # a guess at or above the answer
        while self.max_nodes * (math.floor(self.clip * 2.0 ** f) + 1) > limit:
            f -= 1
        return f

    @property
    def saturation(self) -> int:
        """Q: the largest |q| one node contributes, the largest float32 <= floor(2^f clip) + 1.

        A float32 value, so that float32 and float64 rows saturate alike; no float32 value inside
        the clip reaches past it.
        """
        return int(_float_at_most(math.floor(self.clip * 2.0 ** self.frac_bits) + 1, torch.float32))

    def error_bound(self, nodes: int) -> float:
        """Largest error per coordinate of a decoded sum of `nodes` updates inside the clip: nodes * 2^-(f+1)."""
        return nodes * 2.0 ** -(self.frac_bits + 1)

    def quantize(self, rows: torch.Tensor) -> torch.Tensor:
        """q_k = clamp(round(2^f Delta_k), -Q, Q) as int64 [k, P] on the rows' device (non-finite -> 0 or +-Q).

        Computed in float32 for float32 (or half) rows: a power-of-two scale is exact in any binary
        float format, as is rounding the product, so float64 would give the same integers at twice
        the memory traffic; half types are widened first (2^f S overflows them).
        """
        work = torch.float64 if rows.dtype == torch.float64 else torch.float32
        q_max = float(self.saturation)  # exact in both work types
        scaled = rows.to(work) * 2.0 ** self.frac_bits  # a new tensor: the in-place steps below may write it
        torch.nan_to_num_(scaled, nan=0.0, posinf=q_max, neginf=-q_max)
        return torch.round_(scaled).clamp_(-q_max, q_max).to(torch.int64)

    def add_rows(self, acc: np.ndarray, rows: torch.Tensor) -> None:
        """acc += sum_k q_k (mod 2^bits), in place: acc a ring array [P], rows [k, P] clipped updates."""
        if acc.dtype != self.dtype or acc.shape != (rows.shape[-1],):
            raise ValueError(f"accumulator must be {np.dtype(self.dtype)} [{rows.shape[-1]}], got {acc.dtype} "
                             f"{acc.shape}")
        if rows.dim() != 2 or rows.shape[0] > self.max_nodes:
            raise ValueError(f"rows must be [k <= {self.max_nodes}, P], got {tuple(rows.shape)}")
        # Column blocks of ~2^18 values keep the temporaries small and reused (one large allocation
        # per step costs a page fault per 4 KiB). k <= max_nodes rows of |q| <= Q sum exactly in
        # int64 (the overflow bound); the ring sum wraps.
        width = max(1024, BLOCK_VALUES // max(1, rows.shape[0]))
        for start in range(0, rows.shape[1], width):
            q = self.quantize(rows[:, start:start + width])
            block = (q[0] if q.shape[0] == 1 else q.sum(dim=0)).cpu().numpy()
            part = acc[start:start + width]
            np.add(part, to_ring(block, self.bits), out=part)

    def decode(self, ring_sum: np.ndarray, nodes: int) -> np.ndarray:
        """sum_k Delta_k (float64) from the ring sum of `nodes` nodes' q_k; refuses more nodes than max_nodes."""
        if not 0 <= nodes <= self.max_nodes:
            raise ValueError(f"a sum of {nodes} nodes can overflow a ring sized for {self.max_nodes}")
        return from_ring(ring_sum, self.bits).astype(np.float64) * 2.0 ** -self.frac_bits


def _float_at_most(n: int, dtype: torch.dtype) -> float:
    """The largest value of float `dtype` <= n (converting n alone may round up, past the overflow bound)."""
    x = torch.tensor(float(n), dtype=torch.float64).to(dtype)
    while int(x.item()) > n:
        x = torch.nextafter(x, torch.zeros_like(x))
    return float(x.item())


def to_ring(values: np.ndarray | Sequence[int], bits: int = 64) -> np.ndarray:
    """Signed integers -> their residues in Z_{2^bits} (two's complement bits), as uint32/uint64."""
    as64 = np.asarray(values, dtype=np.int64).view(np.uint64)
    return as64 if bits == 64 else as64.astype(np.uint32)  # uint64 -> uint32 keeps the residue mod 2^32


def from_ring(residues: np.ndarray, bits: int = 64) -> np.ndarray:
    """Residues in Z_{2^bits} -> the signed integers in [-2^(bits-1), 2^(bits-1)) they stand for (int64)."""
    unsigned, signed = RINGS[bits]
    if residues.dtype != unsigned:
        raise ValueError(f"expected {np.dtype(unsigned)} residues, got {residues.dtype}")
    return residues.view(signed).astype(np.int64)

"""Compressed updates: the averaged-update buffer sent in fp16 or bf16 through the same Allreduce.

Pure numpy/torch, no MPI. The round loop encodes this rank's share of the round's mean update
(sum over its selected nodes of w_k / W * (theta_k - main), W the round's total weight, known on
every rank), so the buffer sums to the mean update itself: no weight slot to divide by, and
values at the update's own scale, where fp16's range (|x| <= 65504) is ample.

fp16: numpy float16; mpi4py sends it as MPIX_C_FLOAT16 under MPICH, which sums it natively.
bf16: numpy has no bfloat16, so the bits travel as uint16. MPI's SUM on uint16 would add the bit
patterns as integers, which is not a bf16 sum: comm.py sums them as MPIX_BFLOAT16 where MPICH
offers it, else with a user-defined op built on `bf16_add_into` below.

Counts in the same buffer (the nodes dropped in a round) would be exact only up to 2048 (fp16)
or 256 (bf16): `CountCode` sends them as small digits instead, exact at any rank count.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DTYPES = ("fp32", "fp16", "bf16")
ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2}
# Unit roundoff: one encode moves a value by at most this relative amount (normal range).
UNIT_ROUNDOFF = {"fp32": 2.0 ** -24, "fp16": 2.0 ** -11, "bf16": 2.0 ** -8}
_TORCH = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Every integer 0..2^p is exact in a format with p significant bits, and so is the sum of two such
# integers while it stays within that range: fp16 has 11, bf16 8 (float32 24).
EXACT_INTEGERS = {"fp32": 2 ** 24, "fp16": 2 ** 11, "bf16": 2 ** 8}


def _check(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"unknown update dtype {dtype!r}: one of {', '.join(DTYPES)}")


def encode(update: torch.Tensor, dtype: str) -> np.ndarray:
    """A float update (any device) -> the collective's CPU buffer: float32, float16, or bf16 bits as uint16."""
    _check(dtype)
    # Round to nearest even on the update's device; copy=True: the Allreduce writes into the buffer
    # in place, and an fp32 update would otherwise be that very buffer.
    low = update.detach().to(_TORCH[dtype], copy=True)
    overflow = torch.isinf(low) & torch.isfinite(update)
    if bool(overflow.any()):
        raise OverflowError(f"update has values beyond {dtype}'s range (max |x| = {update.abs().max().item():.3g}); "
                            f"use update_dtype bf16 or fp32")
    if dtype == "bf16":
        return low.view(torch.int16).cpu().numpy().view(np.uint16)
    return low.cpu().numpy()


def decode(buf: np.ndarray, dtype: str) -> torch.Tensor:
    """The collective's buffer -> a float32 CPU tensor (exact: every fp16/bf16 value is a float32)."""
    _check(dtype)
    if dtype == "bf16":
        return torch.from_numpy(np.ascontiguousarray(buf).view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(np.asarray(buf)).float()


def payload_bytes(num_values: int, dtype: str) -> int:
    """Bytes of one rank's buffer of num_values entries in `dtype`."""
    _check(dtype)
    return ITEMSIZE[dtype] * num_values


def bytes_saved(num_values: int, dtype: str) -> int:
    """Bytes per rank saved against sending the same values in fp32."""
    return payload_bytes(num_values, "fp32") - payload_bytes(num_values, dtype)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) -> float32: the top half of a float32's bits."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits, rounded to nearest even (as torch does); NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    # Rounding could carry a NaN's payload into the exponent's neighbour: keep a quiet NaN.
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


def fp16_add_into(inbuf: np.ndarray, inout: np.ndarray) -> None:
    """inout = fp16(inbuf + inout), both fp16 bits (uint16): a user-defined fp16 SUM where MPI has no fp16 type."""
    total = inbuf.view(np.float16).astype(np.float32) + inout.view(np.float16).astype(np.float32)
    with np.errstate(over="ignore"):  # a sum beyond 65504 becomes inf, as IEEE fp16 addition gives
        inout.view(np.float16)[:] = total.astype(np.float16)


def bf16_add_into(inbuf: np.ndarray, inout: np.ndarray) -> None:
    """inout = bf16(inbuf + inout), both bf16 bits (uint16): the body of MPI's user-defined bf16 SUM."""
    inout[:] = f32_to_bf16(bf16_to_f32(inbuf) + bf16_to_f32(inout))


@dataclass(frozen=True)
class CountCode:
    """How a per-rank count 0..most crosses a half-precision SUM exactly.

    Each rank writes its count as base-`base` digits into its group's `digits` slots (rank r in
    group r % groups; the other groups' slots hold 0). A slot then sums at most ceil(ranks/groups)
    digits of at most base-1, never more than EXACT_INTEGERS: every partial sum, in whatever order
    MPI adds, is an integer the format holds exactly, so the total is exact at any rank count.
    """

    groups: int
    base: int
    digits: int

    @property
    def slots(self) -> int:
        return self.groups * self.digits


def count_code(dtype: str, ranks: int, most: int) -> CountCode:
    """The fewest slots that carry counts 0..most from each of `ranks` ranks exactly in `dtype`."""
    _check(dtype)
    limit = EXACT_INTEGERS[dtype]
    groups = -(-ranks // limit)             # ranks per group <= limit, so the base is at least 2
    base = limit // -(-ranks // groups) + 1
    digits = 1
    while base ** digits <= most:
        digits += 1
    return CountCode(groups, base, digits)


def encode_count(count: int, rank: int, code: CountCode) -> np.ndarray:
    """Rank `rank`'s count as slot values (float64, small integers)."""
    if not 0 <= count < code.base ** code.digits:
        raise ValueError(f"count {count} outside 0..{code.base ** code.digits - 1}")
    slots = np.zeros(code.slots)
    first = (rank % code.groups) * code.digits
    for i in range(code.digits):
        count, slots[first + i] = divmod(count, code.base)
    return slots


def decode_count(summed: np.ndarray, code: CountCode) -> int:
    """The total of every rank's count from the summed slots."""
    digits = np.rint(np.asarray(summed, dtype=np.float64)).astype(np.int64).reshape(code.groups, code.digits)
    return int(sum(int(d) * code.base ** i for row in digits for i, d in enumerate(row)))

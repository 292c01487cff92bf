"""Fixed-size summaries of per-node scores: what each rank sends rank 0 per round, whatever its node count.

A summary of accuracies is a float64 vector [count, sum, min, max, hist_0 .. hist_{BINS-1}] over the
finite values (NaN: a node that was not scored). Summaries merge by adding counts, sums and histograms
and taking the min of mins and the max of maxes, so rank 0's work per round does not grow with the
federation. The mean is sum / count: at one rank the same value as numpy's mean of the scores; at
more ranks it adds the ranks' sums, which may differ from one sum over every node in the last bit.
"""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np

BINS = 10  # equal-width bins over [0, 1]: a accuracy's tenths
SIZE = 4 + BINS


def summary(values: np.ndarray) -> np.ndarray:
    """The summary of the finite entries of `values` (accuracies in [0, 1])."""
    finite = values[np.isfinite(values)]
    out = np.zeros(SIZE)
    out[0] = len(finite)
    if len(finite):
        out[1], out[2], out[3] = finite.sum(), finite.min(), finite.max()
        out[4:] = np.histogram(np.clip(finite, 0.0, 1.0), bins=BINS, range=(0.0, 1.0))[0]
    return out


def merge(parts: Iterable[Optional[np.ndarray]]) -> Optional[np.ndarray]:
    """One summary of several (None entries skipped; None when all are)."""
    present = [p for p in parts if p is not None]
    if not present:
        return None
    counted = [p for p in present if p[0] > 0]
    out = np.zeros(SIZE)
    out[0] = sum(p[0] for p in present)
    if counted:
        total = counted[0][1]
        for p in counted[1:]:
            total += p[1]
        out[1], out[2], out[3] = total, min(p[2] for p in counted), max(p[3] for p in counted)
        out[4:] = np.sum([p[4:] for p in present], axis=0)
    return out


def row_fields(prefix: str, s: Optional[np.ndarray]) -> dict:
    """`<prefix>_mean/_min/_max` (None without a finite score) and `<prefix>_hist` (counts per tenth)."""
    if s is None or s[0] == 0:
        out = {f"{prefix}_{k}": None for k in ("mean", "min", "max")}
        out[f"{prefix}_hist"] = None if s is None else [0] * BINS
        return out
    return {f"{prefix}_mean": float(s[1] / s[0]), f"{prefix}_min": float(s[2]), f"{prefix}_max": float(s[3]),
            f"{prefix}_hist": [int(v) for v in s[4:]]}

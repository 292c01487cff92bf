"""Client sampling: which nodes train in a round. Pure: a function of (nodes, fraction, seed, round).

Every rank calls `select_nodes` with the same arguments and gets the same nodes without any
message: the draw never depends on the rank or the number of ranks.
"""
from __future__ import annotations

import math

import numpy as np

SAMPLING_STREAM = 3  # seed stream, apart from partition (1, 2, 4-7) and batch-order streams


def sample_count(num_nodes: int, fraction: float) -> int:
    """max(1, C*N rounded to the nearest integer, halves up), as McMahan's m = max(C*K, 1)."""
    # floor(x + 0.5) rather than round(): Python's round sends halves to even (2.5 -> 2).
    # The tiny slack keeps C*N that float arithmetic puts just under a half (2.5/7 * 7 = 2.4999999999999996)
    # from rounding down.
    return max(1, min(num_nodes, math.floor(fraction * num_nodes + 0.5 + 1e-9)))


def select_nodes(num_nodes: int, fraction: float, seed: int, rnd: int) -> np.ndarray:
    """The sorted node ids that train in round `rnd` (1-based), seeded by (seed, round) only."""
    if num_nodes < 1 or not 0 < fraction <= 1:
        raise ValueError(f"select_nodes needs num_nodes >= 1 and 0 < fraction <= 1, got {num_nodes}, {fraction}")
    m = sample_count(num_nodes, fraction)
    if m == num_nodes:
        return np.arange(num_nodes, dtype=np.int64)
    rng = np.random.default_rng([seed, SAMPLING_STREAM, rnd])
    return np.sort(rng.choice(num_nodes, size=m, replace=False)).astype(np.int64)


def local_selection(selected: np.ndarray, first: int, stop: int) -> np.ndarray:
    """The selected node ids in this rank's block first..stop-1 (may be empty: weight zero this round)."""
    return selected[(selected >= first) & (selected < stop)]

"""Node-level (epsilon, delta) accounting of DP-FedAvg with Google's `dp_accounting`: RDP and PLD.

One round of DP-FedAvg releases the noised sum of the clipped updates of a random sample of
nodes (and, with adaptive clipping, the noised count of unclipped nodes): a sampled Gaussian
mechanism. The rounds compose (SelfComposedDpEvent over the rounds run or planned).

Sampling -> dp_accounting event and neighbouring relation:

- `poisson` (each node independently with probability q): PoissonSampledDpEvent(q, Gaussian(z))
  under add/remove-one-node, where the sum's L2 sensitivity is the clip S, so the Gaussian's
  noise multiplier is z itself. Both RDP and PLD support it.
- `fixed` (m of N without replacement, fedmpi's default sampling): SampledWithoutReplacementDpEvent
  (N, m, Gaussian(z / 2)) under replace-one-node (N is public), RDP only (Wang, Balle and
  Kasiviswanathan 2019, Thm. 27). Replacing one node moves the sum by up to 2S, so the noise
  multiplier relative to the sensitivity is z / 2. dp_accounting's PLD accountant has no event
  for sampling without replacement: `pld` with `fixed` is refused.

Adaptive clipping (Andrew et al. 2021, Sec. 3): the round also releases sum_k (b_k - 1/2) + N(0,
sigma_b^2), sensitivity 1/2 under add/remove (1 under replace-one). Two Gaussian releases of the
same sample are one Gaussian release with noise multiplier (z_1^-2 + z_2^-2)^(-1/2) (Mironov,
Talwar and Zhang 2019, Sec. 3), so with z_b = 2 sigma_b:

    z_eff = (z^-2 + (2 sigma_b)^-2)^(-1/2)        (TFF's adaptive_clip_noise_params, inverted)

under add/remove, and half of that under replace-one.
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import dp_accounting
from dp_accounting import pld, rdp

from .sampling import sample_count

ACCOUNTANTS = ("rdp", "pld")
SAMPLINGS = ("poisson", "fixed")
# The solver's search range: beyond MAX a model learns nothing; below MIN any target is met anyway.
MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER = 1e-3, 1000.0
_Relation = dp_accounting.NeighboringRelation


def default_delta(nodes: int) -> float:
    """delta = 1 / N^1.1: below 1/N, as a meaningful guarantee for N nodes needs."""
    if nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {nodes}")
    return 1.0 / nodes ** 1.1


def effective_noise_multiplier(noise_multiplier: float, count_stddev: float = 0.0) -> float:
    """z_eff = (z^-2 + (2 sigma_b)^-2)^(-1/2) (add/remove): the update sum and the unclipped count as one Gaussian.

    count_stddev 0 means no count is released (fixed clipping): z_eff = z.
    """
    if not noise_multiplier > 0:
        return 0.0
    if count_stddev == 0:
        return float(noise_multiplier)
    return (noise_multiplier ** -2 + (2.0 * count_stddev) ** -2) ** -0.5


@dataclass(frozen=True)
class Accountant:
    """Privacy of `rounds` DP-FedAvg rounds over `nodes` nodes sampled with `fraction` (q, or m = qN for fixed)."""

    nodes: int
    fraction: float
    sampling: str = "poisson"
    method: str = "rdp"  # the accountant: rdp or pld
    count_stddev: float = 0.0  # sigma_b of adaptive clipping's count; 0 with a fixed clip

    def __post_init__(self) -> None:
        if not (isinstance(self.nodes, int) and self.nodes >= 1):
            raise ValueError(f"nodes must be an integer >= 1, got {self.nodes!r}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must lie in (0, 1], got {self.fraction!r}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {self.sampling!r}")
        if self.method not in ACCOUNTANTS:
            raise ValueError(f"dp_accountant must be one of {', '.join(ACCOUNTANTS)}, got {self.method!r}")
        if not (math.isfinite(self.count_stddev) and self.count_stddev >= 0):
            raise ValueError(f"dp_clip_count_stddev must be finite and >= 0, got {self.count_stddev!r}")
        if self.method == "pld" and self.sampling == "fixed":
            raise ValueError("dp_accountant pld cannot account sampling fixed (m of N without replacement): "
                             "dp_accounting's PLD accountant has no event for it; use dp_accountant rdp or "
                             "sampling poisson")

    @property
    def expected_nodes(self) -> float:
        """W, the fixed denominator: qN for Poisson sampling, m for fixed."""
        if self.sampling == "fixed":
            return float(sample_count(self.nodes, self.fraction))
        return self.fraction * self.nodes

    @property
    def relation(self) -> dp_accounting.NeighboringRelation:
        return _Relation.REPLACE_ONE if self.sampling == "fixed" else _Relation.ADD_OR_REMOVE_ONE

    def round_event(self, noise_multiplier: float) -> dp_accounting.DpEvent:
        """One round as a dp_accounting event (noise_multiplier z = stddev of the sum's noise / clip)."""
        z_eff = effective_noise_multiplier(noise_multiplier, self.count_stddev)
        if self.sampling == "fixed":
            m = sample_count(self.nodes, self.fraction)
            # replace-one: sensitivity 2S for the sum, 1 for the centred count -> half the multiplier
            gaussian = dp_accounting.GaussianDpEvent(z_eff / 2)
            return dp_accounting.SampledWithoutReplacementDpEvent(self.nodes, m, gaussian)
        return dp_accounting.PoissonSampledDpEvent(self.fraction, dp_accounting.GaussianDpEvent(z_eff))

    def event(self, noise_multiplier: float, rounds: int) -> dp_accounting.DpEvent:
        """`rounds` rounds composed."""
        if not (isinstance(rounds, int) and rounds >= 0):
            raise ValueError(f"rounds must be an integer >= 0, got {rounds!r}")
        return dp_accounting.SelfComposedDpEvent(self.round_event(noise_multiplier), rounds)

    def _fresh(self) -> dp_accounting.PrivacyAccountant:
        if self.method == "pld":
            return pld.PLDAccountant(neighboring_relation=self.relation)
        return rdp.RdpAccountant(neighboring_relation=self.relation)

    def epsilon(self, noise_multiplier: float, rounds: int, delta: float) -> float:
        """epsilon at `delta` after `rounds` rounds with noise multiplier z (inf without noise)."""
        _check_delta(delta)
        if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
            raise ValueError(f"dp_noise_multiplier must be finite and >= 0, got {noise_multiplier!r}")
        if rounds == 0:
            return 0.0
        if noise_multiplier == 0:
            return math.inf
        with _quiet_absl():
            return float(self._fresh().compose(self.event(noise_multiplier, rounds)).get_epsilon(delta))

    def solve_noise_multiplier(self, target_epsilon: float, rounds: int, delta: float,
                               rel_tol: float = 1e-3) -> float:
        """The smallest z (within a factor 1 + rel_tol) whose epsilon after `rounds` rounds is <= target_epsilon.

        Bisection on log z over [MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER]; epsilon falls as z grows.
        Raises ValueError naming the reason when no z in range reaches the target.
        """
        if not (math.isfinite(target_epsilon) and target_epsilon > 0):
            raise ValueError(f"dp_target_epsilon must be a finite number > 0, got {target_epsilon!r}")
        if not (isinstance(rounds, int) and rounds >= 1):
            raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
        floor = self.epsilon(MAX_NOISE_MULTIPLIER, rounds, delta)
        if floor > target_epsilon:
            raise ValueError(self._unreachable(target_epsilon, rounds, delta, floor))
        hi = 1.0
        while self.epsilon(hi, rounds, delta) > target_epsilon:  # ends: eps(MAX) <= target
            hi = min(hi * 2, MAX_NOISE_MULTIPLIER)
        lo = hi / 2
        while self.epsilon(lo, rounds, delta) <= target_epsilon:
            if lo < MIN_NOISE_MULTIPLIER:
                return lo
            hi, lo = lo, lo / 2
        while hi / lo > 1 + rel_tol:  # invariant: eps(lo) > target >= eps(hi)
            mid = math.sqrt(lo * hi)
            if self.epsilon(mid, rounds, delta) > target_epsilon:
                lo = mid
            else:
                hi = mid
        return hi

    def _unreachable(self, target: float, rounds: int, delta: float, floor: float) -> str:
        why = f"even dp_noise_multiplier {MAX_NOISE_MULTIPLIER:g} gives epsilon {floor:.4g}"
        if self.count_stddev > 0:
            why += (f"; the clip count's own noise (dp_clip_count_stddev {self.count_stddev:g}) caps the effective "
                    f"multiplier below {2 * self.count_stddev:g}: raise dp_clip_count_stddev")
        return (f"dp_target_epsilon {target:g} cannot be reached in {rounds} rounds at dp_delta {delta:g} "
                f"(sampling {self.sampling}, {self.nodes} nodes, fraction {self.fraction:g}): {why}")


def _check_delta(delta: float) -> None:
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"dp_delta must lie in (0, 1), got {delta!r}")


@contextmanager
def _quiet_absl() -> Iterator[None]:
    """RDP logs a warning per order it drops as unconvergent (harmless: it then uses the other orders)."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)

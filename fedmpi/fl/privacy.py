"""DP-FedAvg's arithmetic, pure torch/numpy (no MPI): clipping, the server's noise, adaptive clipping.

McMahan et al. 2018, "Learning differentially private recurrent language models" (Algorithm 1,
DP-FedAvg with the fixed-denominator estimator f~_f): each selected node's update
Delta_k = theta_k - theta_main is projected onto the L2 ball of radius S,

    pi(Delta, S) = Delta * min(1, S / ||Delta||),

the projected updates are summed, Gaussian noise N(0, (z S)^2 I) is added to the sum, and the
result is divided by the expected number of nodes per round W = qN (a fixed denominator: the
real number of participants is itself private under Poisson sampling).

Adaptive clipping (Andrew et al. 2021, "Differentially private learning with adaptive clipping",
Sec. 2 and Alg. 1): each node also reports b_k = 1[||Delta_k|| <= S]; the server releases the
noised fraction b~ = (sum_k (b_k - 1/2) + N(0, sigma_b^2)) / W + 1/2 (centring the indicators
halves the count's sensitivity, as TF Privacy's quantile estimator does) and moves the clip
geometrically, S <- S * exp(-eta_C (b~ - gamma)), which is online gradient descent on the
pinball loss of the gamma-quantile of the update norms.

Noise is drawn on the CPU from a numpy generator seeded by (seed, stream, round) only, then moved
to the caller's device: every rank draws the same bits at any rank count and on any device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

# Seed streams, apart from partition (1, 2, 4-7), fixed sampling (3) and the data source (7919).
UPDATE_NOISE_STREAM = 11
COUNT_NOISE_STREAM = 12
POISSON_STREAM = 13


def poisson_selection(num_nodes: int, fraction: float, seed: int, rnd: int) -> np.ndarray:
    """Sorted ids of the nodes in round `rnd`, each in independently with probability q (seeded by round only).

    The sampling that PoissonSampledDpEvent accounts (McMahan et al. 2018, Alg. 1: C^t with
    probability q per user); the round may be empty, and its size is itself private.
    """
    if num_nodes < 1 or not 0 < fraction <= 1:
        raise ValueError(f"poisson_selection needs num_nodes >= 1 and 0 < fraction <= 1, got {num_nodes}, {fraction}")
    draws = np.random.default_rng([seed, POISSON_STREAM, rnd]).random(num_nodes)
    return np.flatnonzero(draws < fraction).astype(np.int64)


@dataclass(frozen=True)
class Clipping:
    """Per-row clipping of a [k, P] block of updates: the factor each row is scaled by, and its norm."""

    scale: torch.Tensor  # [k] float32: min(1, S / ||Delta_k||)
    norms: torch.Tensor  # [k] float32: ||Delta_k|| before clipping
    clip: float

    @property
    def unclipped(self) -> torch.Tensor:
        """b_k = 1[||Delta_k|| <= S] (Andrew et al. 2021, Algorithm 1), as a bool tensor [k]."""
        return self.norms <= self.clip

    def count_unclipped(self) -> int:
        return int(self.unclipped.sum().item())


def clip_factors(updates: torch.Tensor, clip: float) -> Clipping:
    """Norms of the rows of `updates` [k, P] and the factors that project them onto the ball ||x|| <= clip.

    One pass over the data (the norm); the factors fold into the weights of the sum that follows
    (sum_k w_k s_k Delta_k), so the clipped rows never need to be written.
    """
    _check_clip(clip)
    if updates.dim() != 2:
        raise ValueError(f"updates must be [k, P], got shape {tuple(updates.shape)}")
    norms = torch.linalg.vector_norm(updates.float(), dim=1)
    # A zero row keeps factor 1 (clip / 0 = inf); a NaN norm gives a NaN factor, so a broken node
    # stays visible to the caller's non-finite check instead of being silently zeroed.
    scale = torch.clamp(clip / norms, max=1.0)
    return Clipping(scale=scale, norms=norms, clip=float(clip))


def clip_updates(updates: torch.Tensor, clip: float) -> tuple[torch.Tensor, Clipping]:
    """The rows of `updates` [k, P] projected onto the L2 ball of radius `clip` (a new tensor) and the Clipping."""
    clipping = clip_factors(updates, clip)
    return updates * clipping.scale.to(updates.dtype)[:, None], clipping


def _check_clip(clip: float) -> None:
    if not (isinstance(clip, (int, float)) and math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip must be a finite number > 0, got {clip!r}")


def gaussian_noise(size: int, stddev: float, seed: int, rnd: int, stream: int = UPDATE_NOISE_STREAM,
                   device: Optional[torch.device] = None) -> torch.Tensor:
    """N(0, stddev^2) float32 noise of `size` values for round `rnd`, seeded by (seed, stream, rnd) only.

    Drawn on the CPU, then moved: the bits are the same on every rank, at any rank count and for
    any target device.
    """
    if not (math.isfinite(stddev) and stddev >= 0):
        raise ValueError(f"noise stddev must be finite and >= 0, got {stddev!r}")
    rng = np.random.default_rng([seed, stream, rnd])
    noise = torch.from_numpy(rng.standard_normal(size, dtype=np.float32))
    noise.mul_(stddev)
    return noise if device is None else noise.to(device)


def noised_mean(summed: torch.Tensor, clip: float, noise_multiplier: float, expected_nodes: float,
                seed: int, rnd: int) -> torch.Tensor:
    """(sum_k pi(Delta_k, S) + N(0, (z S)^2 I)) / W: DP-FedAvg's f~_f estimator (McMahan et al. 2018, Alg. 1)."""
    if not expected_nodes > 0:
        raise ValueError(f"expected nodes per round must be > 0, got {expected_nodes!r}")
    noise = gaussian_noise(summed.numel(), noise_multiplier * clip, seed, rnd, device=summed.device)
    return (summed.float() + noise.view_as(summed)) / float(expected_nodes)


def noised_unclipped_fraction(unclipped: int, participants: int, expected_nodes: float, count_stddev: float,
                              seed: int, rnd: int) -> float:
    """b~ = (sum_k (b_k - 1/2) + N(0, sigma_b^2)) / W + 1/2, clamped to [0, 1] (Andrew et al. 2021, Alg. 1).

    `unclipped` = sum_k b_k and `participants` = the number of nodes summed, both from the
    all-reduced trailer. Centring at 1/2 gives the released sum sensitivity 1/2 (add/remove one
    node), which is what the accountant assumes.
    """
    if not 0 <= unclipped <= participants:
        raise ValueError(f"unclipped count {unclipped} must lie in [0, participants={participants}]")
    if not expected_nodes > 0:
        raise ValueError(f"expected nodes per round must be > 0, got {expected_nodes!r}")
    noise = float(gaussian_noise(1, count_stddev, seed, rnd, stream=COUNT_NOISE_STREAM)[0])
    fraction = (unclipped - participants / 2 + noise) / expected_nodes + 0.5
    return min(1.0, max(0.0, fraction))


def next_clip(clip: float, unclipped_fraction: float, target_quantile: float, clip_lr: float) -> float:
    """S <- S exp(-eta_C (b~ - gamma)): the geometric clip update of Andrew et al. 2021 (Sec. 2, Alg. 1)."""
    _check_clip(clip)
    if not 0 <= target_quantile <= 1:
        raise ValueError(f"target quantile must lie in [0, 1], got {target_quantile!r}")
    return clip * math.exp(-clip_lr * (unclipped_fraction - target_quantile))


@dataclass(frozen=True)
class NoisedRound:
    """What the server releases in one DP round: the mean update, the next clip, and the round's numbers."""

    mean: torch.Tensor
    clip: float            # the clip used this round
    next_clip: float       # the clip for the next round (== clip without adaptive clipping)
    noise_stddev: float    # stddev of the noise added to the summed update: z * clip
    unclipped_fraction: Optional[float]  # b~ (noised) with adaptive clipping, else None


def server_round(summed: torch.Tensor, clip: float, noise_multiplier: float, expected_nodes: float, seed: int,
                 rnd: int, adaptive: Optional[dict] = None) -> NoisedRound:
    """One DP-FedAvg server step after the Allreduce: noise, fixed denominator, and (optionally) the clip update.

    `adaptive`: None for a fixed clip, else dict(unclipped=sum b_k, participants=k, count_stddev=sigma_b,
    target_quantile=gamma, clip_lr=eta_C).
    """
    mean = noised_mean(summed, clip, noise_multiplier, expected_nodes, seed, rnd)
    fraction, new_clip = None, clip
    if adaptive is not None:
        fraction = noised_unclipped_fraction(adaptive["unclipped"], adaptive["participants"], expected_nodes,
                                             adaptive["count_stddev"], seed, rnd)
        new_clip = next_clip(clip, fraction, adaptive["target_quantile"], adaptive["clip_lr"])
    return NoisedRound(mean=mean, clip=clip, next_clip=new_clip, noise_stddev=noise_multiplier * clip,
                       unclipped_fraction=fraction)

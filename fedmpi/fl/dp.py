"""DP-FedAvg in the round loop: the privacy keys' checks, the run's plan, and one round's release.

Pure functions of the config and the all-reduced trailer (no MPI): every rank computes the same
selection, clip, noise and next clip, so the main model stays identical on every rank and does
not depend on the rank count. The arithmetic itself is in fl/privacy.py, the accounting in
fl/accounting.py, the masked integer sum in fl/secure.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from ..errors import ConfigError
from .privacy import clip_factors, next_clip, noised_mean, noised_unclipped_fraction, poisson_selection
from .sampling import sample_count, select_nodes

# Keys that only mean something with dp: gaussian (null unless set).
DP_ONLY = ("dp_noise_multiplier", "dp_target_epsilon", "dp_delta", "dp_clip_quantile", "dp_clip_count_stddev")


def check_privacy_keys(cfg) -> dict:
    """One ConfigError naming the key for a combination that cannot work; returns resolved values (none yet)."""
    if cfg.dp == "none":
        for key in DP_ONLY:
            if getattr(cfg, key) is not None:
                raise ConfigError(f"config key '{key}' needs dp: gaussian (dp is none)")
    else:
        _check_gaussian(cfg)
    if cfg.secagg_bits not in (32, 64):
        raise ConfigError(f"config key 'secagg_bits' must be 32 or 64, got {cfg.secagg_bits}")
    if cfg.secure_aggregation:
        _check_secure(cfg)
    return {}


def _check_gaussian(cfg) -> None:
    if cfg.aggregation != "mean":
        raise ConfigError("config key 'aggregation' must be mean with dp: gaussian (one node, one vote: the "
                          "clipped sum's sensitivity is dp_clip only when every node weighs 1)")
    if (cfg.dp_noise_multiplier is None) == (cfg.dp_target_epsilon is None):
        raise ConfigError("config key 'dp_noise_multiplier': dp: gaussian needs exactly one of dp_noise_multiplier "
                          "and dp_target_epsilon")
    if cfg.dp_accountant == "pld" and cfg.sampling == "fixed":
        raise ConfigError("config key 'dp_accountant': pld cannot account sampling fixed (dp_accounting's PLD has "
                          "no event for sampling without replacement); use dp_accountant rdp or sampling poisson")
    if cfg.dp_clip_quantile is None and cfg.dp_clip_count_stddev is not None:
        raise ConfigError("config key 'dp_clip_count_stddev' needs dp_clip_quantile (adaptive clipping)")


def _check_secure(cfg) -> None:
    from .ring import FixedPoint

    if cfg.update_dtype != "fp32":
        raise ConfigError("config key 'update_dtype' must be fp32 with secure_aggregation (the masked sum travels "
                          "as integers; secagg_bits 32 gives the fp32 payload's size)")
    if cfg.aggregation != "mean":
        raise ConfigError("config key 'aggregation' must be mean with secure_aggregation (the fixed-point range "
                          "holds clipped updates of weight 1)")
    try:
        FixedPoint(cfg.dp_clip, max_round_nodes(cfg), cfg.secagg_bits)
    except ValueError as err:
        raise ConfigError(f"config key 'secagg_bits': {err}") from None


def max_round_nodes(cfg) -> int:
    """The most nodes one round can sum: m for fixed sampling, every node for Poisson."""
    return cfg.nodes if cfg.sampling == "poisson" else sample_count(cfg.nodes, cfg.fraction)


def expected_nodes(cfg) -> float:
    """W, DP-FedAvg's fixed denominator: qN under Poisson sampling, m under fixed."""
    return cfg.fraction * cfg.nodes if cfg.sampling == "poisson" else float(sample_count(cfg.nodes, cfg.fraction))


def count_stddev(cfg) -> float:
    """sigma_b of the unclipped count: the key, or W / 20 (Andrew et al. 2021, Sec. 3's recommendation)."""
    if cfg.dp_clip_quantile is None:
        return 0.0
    return cfg.dp_clip_count_stddev if cfg.dp_clip_count_stddev is not None else expected_nodes(cfg) / 20


def select(cfg, rnd: int) -> np.ndarray:
    """The round's node ids by the configured sampling, seeded by (seed, round) only."""
    if cfg.sampling == "poisson":
        return poisson_selection(cfg.nodes, cfg.fraction, cfg.seed, rnd)
    return select_nodes(cfg.nodes, cfg.fraction, cfg.seed, rnd)


@dataclass
class Privacy:
    """The run's privacy plan, the same on every rank; `clip` moves with adaptive clipping."""

    dp: bool
    clip: float
    noise_multiplier: float = 0.0
    delta: Optional[float] = None
    accountant: object = None  # fl.accounting.Accountant, or None without DP
    quantile: Optional[float] = None
    clip_lr: float = 0.0
    count_stddev: float = 0.0
    expected_nodes: float = 1.0
    epsilon_every: int = 1
    secure: bool = False
    bits: int = 64
    notes: list = field(default_factory=list)  # lines rank 0 prints at start

    @property
    def clipping(self) -> bool:
        """Whether updates are clipped: under DP, and for the fixed-point range of secure aggregation."""
        return self.dp or self.secure

    def epsilon(self, rounds: int) -> float:
        """epsilon at delta after `rounds` rounds (inf without noise)."""
        return self.accountant.epsilon(self.noise_multiplier, rounds, self.delta)

    def record(self) -> dict:
        """What run.json keeps of the plan."""
        if not self.dp:
            return dict(secure_aggregation=self.secure)
        return dict(dp_noise_multiplier=self.noise_multiplier, dp_delta=self.delta,
                    dp_accountant=self.accountant.method, dp_sampling=self.accountant.sampling,
                    dp_clip_count_stddev=self.count_stddev,
                    dp_expected_nodes=self.expected_nodes, secure_aggregation=self.secure)


def plan(cfg) -> Privacy:
    """The run's Privacy; solves the noise multiplier for dp_target_epsilon (seconds: call on one rank).

    Raises ConfigError naming dp_target_epsilon when the target cannot be reached.
    """
    base = dict(clip=cfg.dp_clip, secure=cfg.secure_aggregation, bits=cfg.secagg_bits,
                expected_nodes=expected_nodes(cfg), epsilon_every=cfg.dp_epsilon_every)
    if cfg.dp == "none":
        return Privacy(dp=False, **base)
    from .accounting import Accountant, default_delta

    notes, delta = [], cfg.dp_delta
    if delta is None:
        delta = default_delta(cfg.nodes)
        notes.append(f"dp_delta not set: using 1/nodes^1.1 = {delta:.3g}")
    sigma_b = count_stddev(cfg)
    accountant = Accountant(cfg.nodes, cfg.fraction, cfg.sampling, cfg.dp_accountant, sigma_b)
    z = cfg.dp_noise_multiplier
    if z is None:
        try:
            z = accountant.solve_noise_multiplier(cfg.dp_target_epsilon, cfg.rounds, delta)
        except ValueError as err:
            raise ConfigError(f"config key 'dp_target_epsilon': {err}") from None
        notes.append(f"dp_noise_multiplier {z:.4g} reaches epsilon {cfg.dp_target_epsilon:g} at delta {delta:.3g} "
                     f"after {cfg.rounds} rounds ({cfg.dp_accountant})")
    return Privacy(dp=True, noise_multiplier=float(z), delta=delta, accountant=accountant,
                   quantile=cfg.dp_clip_quantile, clip_lr=cfg.dp_clip_lr, count_stddev=sigma_b, notes=notes, **base)


def clip_rows(privacy: Privacy, updates: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Factors [k] that clip each row of `updates` [k, P] to privacy.clip (ones when not clipping), and how
    many rows were inside the clip."""
    if not privacy.clipping:
        return torch.ones(len(updates), device=updates.device), len(updates)
    clipping = clip_factors(updates, privacy.clip)
    return clipping.scale, clipping.count_unclipped()


def release(privacy: Privacy, summed: torch.Tensor, participants: int, unclipped: int, seed: int,
            rnd: int) -> tuple[Optional[torch.Tensor], dict]:
    """The round's mean update from the all-reduced sum of clipped updates, and its metrics; moves the clip.

    DP: (sum + N(0, (z S)^2)) / W, noised even when no node took part. Without DP (secure
    aggregation alone): sum / participants, or None when nobody took part.
    """
    clip = privacy.clip
    row = dict(dp_clip=clip)
    if not privacy.dp:
        return (summed.float() / participants if participants else None), row
    mean = noised_mean(summed, clip, privacy.noise_multiplier, privacy.expected_nodes, seed, rnd)
    row.update(dp_noise_stddev=privacy.noise_multiplier * clip)
    if privacy.quantile is not None:
        fraction = noised_unclipped_fraction(unclipped, participants, privacy.expected_nodes, privacy.count_stddev,
                                             seed, rnd)
        privacy.clip = next_clip(clip, fraction, privacy.quantile, privacy.clip_lr)
        row.update(dp_clipped_share=1.0 - fraction, dp_next_clip=privacy.clip)  # the noised, released share
    else:  # a fixed clip releases no count: the share is the server's own diagnostic, not protected
        row.update(dp_clipped_share=1.0 - unclipped / participants if participants else None)
    return mean, row


def epsilon_due(privacy: Privacy, rnd: int, last: int) -> bool:
    """Whether round `rnd` reports epsilon: every dp_epsilon_every rounds and the last one."""
    return privacy.dp and (rnd % privacy.epsilon_every == 0 or rnd == last)


def saved_state(privacy: Privacy) -> Optional[dict]:
    """What a checkpoint keeps: the clip (adaptive clipping moves it) and the noise multiplier (a resume
    may change `rounds`, which would re-solve a dp_target_epsilon's multiplier)."""
    if not privacy.clipping:
        return None
    return dict(dp_clip=privacy.clip, dp_noise_multiplier=privacy.noise_multiplier)


def resume(privacy: Privacy, meta: dict) -> None:
    """Take the clip and the noise multiplier from a checkpoint's meta.json (checked: hostile input)."""
    if not privacy.clipping:
        return
    for key, low in (("dp_clip", 0.0), ("dp_noise_multiplier", None)):
        value = meta.get(key)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or (value <= 0 if low is not None else value < 0):
            raise ValueError(f"'{key}' must be a finite number {'> 0' if low is not None else '>= 0'}, "
                             f"got {str(value)[:40]}")
    privacy.clip = float(meta["dp_clip"])
    if privacy.dp:
        privacy.noise_multiplier = float(meta["dp_noise_multiplier"])

"""A round's combination of node updates: the accumulator, the one Allreduce of [updates | extra |
trailer], the checks on its totals (diverged nodes, an abandoned round), and the server's step (plain,
DP's release, FedNova's scale, SCAFFOLD's control, personal layers' columns kept out)."""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import numpy as np
import torch

from .engine.params import parameter_count
from .errors import FedmpiError
from .fl import dp, secure
from .fl.aggregate import (
    UpdateSum,
    Wire,
    extra_sum,
    round_abandoned,
    summed_total,
    summed_update,
    trailer,
    unclipped_count,
)
from .fl.algorithms import fednova_scale, scaffold_server_control
from .fl.ring import FixedPoint

if TYPE_CHECKING:  # the rank's state, only named here
    from .rank import Rank

DIVERGED_EXIT_CODE = 3


class DivergedError(FedmpiError):
    """More nodes than max_dropped_fraction produced NaN/Inf in one round."""

    exit_code = DIVERGED_EXIT_CODE


def extra_values(st: Rank) -> int:
    """Values the Allreduce carries after the model update: SCAFFOLD's control deltas (P), FedNova's
    weighted step count (1), else none."""
    return {"scaffold": st.main.numel(), "fednova": 1}.get(st.cfg.algorithm, 0)


def new_sum(st: Rank):
    """The round's accumulator: float updates (UpdateSum), or fixed-point ones in the ring (secure aggregation)."""
    if st.privacy.secure:
        return secure.RingSum(st.main, FixedPoint(st.privacy.clip, dp.max_round_nodes(st.cfg), st.privacy.bits))
    shared = getattr(st.engine, "shared", None)  # personal layers: only the shared columns travel
    return UpdateSum(st.main if shared is None else st.main[shared], wire(st))


def wire(st: Rank) -> Wire:
    """How this rank's buffer travels: dtype, the fp16/bf16 count layout, SCAFFOLD/FedNova's extra values,
    DP's count inside the clip."""
    return Wire(st.cfg.update_dtype, st.comm.size, st.comm.rank, st.most_nodes, extra_values(st),
                unclipped=st.privacy.clipping)


def aggregate(st: Rank, rnd: int, update, counts: tuple, vote: float, selected: np.ndarray) -> tuple:
    """Allreduce(SUM) of [updates | extra | weight, dropped, (unclipped,) stop votes] (a rank without
    selected nodes sends zeros; secure aggregation: the masked ring buffer), then move the main model
    unless the round is abandoned; returns the buffer, timings, dropped total, agreed stop, abandoned,
    and the round's privacy metrics."""
    cfg = st.cfg
    buf, timing, summed, (dropped_total, unclipped, stop_all, abandoned), released = reduce(st, rnd, update, counts,
                                                                                            vote, selected)
    if abandoned:
        return buf, timing, dropped_total, True, True, released
    if dropped_total > cfg.max_dropped_fraction * len(selected):
        raise DivergedError(f"{dropped_total} of {len(selected)} nodes diverged (NaN/Inf) in round {rnd}, more than "
                            f"max_dropped_fraction={cfg.max_dropped_fraction}; the last checkpoint is kept")
    participants = len(selected) - dropped_total
    if st.privacy.clipping:  # noise, the fixed denominator and the clip's next value (fl/dp.py)
        mean, row = dp.release(st.privacy, summed(participants), participants, unclipped, cfg.seed, rnd)
        released.update(row)
        if mean is not None:
            st.main = st.server.step(st.main, mean)
    elif participants > 0:
        server_step(st, buf, wire(st))
    elif len(selected) and st.comm.rank == 0:  # only max_dropped_fraction 1 lets a round lose every node
        print(f"fedmpi: all {len(selected)} nodes diverged (NaN/Inf) in round {rnd}; the main model and the server "
              f"optimizer stay as they were", file=sys.stderr, flush=True)
    return buf, timing, dropped_total, stop_all, False, released


def server_step(st: Rank, buf: np.ndarray, w: Wire) -> None:
    """The server optimizer's step along the mean update; FedNova rescales it, SCAFFOLD moves c too."""
    update_sum, scale = summed_update(buf, w)
    shared = getattr(st.engine, "shared", None)
    if shared is not None:  # personal layers: the main model's own values of them never move
        full = torch.zeros(st.main.numel(), dtype=update_sum.dtype)
        full[shared.cpu()] = update_sum
        update_sum = full
    if st.cfg.algorithm == "fednova":  # tau_eff times the mean normalized update
        scale = fednova_scale(trailer(buf, w)[0], float(extra_sum(buf, w)[0]))
    size = parameter_count(st.model)
    buffers = st.main[size:].clone() if st.main.numel() > size else None
    st.main = st.server.step(st.main, update_sum, scale)
    if buffers is not None:  # running statistics: the plain weighted mean, whatever the server optimizer
        st.main[size:] = buffers + update_sum[size:].to(buffers) * scale
    if st.cfg.algorithm == "scaffold":  # SCAFFOLD: c += (|S| / N) * the mean control delta
        scaffold_server_control(st.engine.server_control, extra_sum(buf, w), st.cfg.nodes)


def reduce(st: Rank, rnd: int, update, counts: tuple, vote: float, selected: np.ndarray) -> tuple:
    """The round's one Allreduce; returns the buffer, timing, sum(participants) -> summed update, the
    all-reduced (dropped, unclipped, stop, abandoned), and secure aggregation's metrics."""
    comm, dropped, unclipped = st.comm, *counts
    if st.privacy.secure:
        buf = update.pack(dropped, vote, unclipped)
        t_mask = secure.masked(st.masks, buf, rnd)
        timing = comm.allreduce_sum(buf)
        totals = secure.counts(buf, st.privacy.bits, len(selected), comm.size)
        return (buf, timing, lambda n: secure.decoded_sum(buf, update.fixed, n), totals,
                dict(secagg_t_mask=t_mask, secagg_bytes=buf.nbytes))
    w = wire(st)
    # DP divides by the fixed denominator W; fp16/bf16 carry the sum pre-divided by it (or the round's weight)
    round_weight = st.privacy.expected_nodes if st.privacy.dp else float(st.all_weights[selected].sum()) or 1.0
    buf = update.pack(dropped, vote, w, round_weight, unclipped)
    timing = comm.allreduce_sum(buf, None if st.cfg.update_dtype == "fp32" else st.cfg.update_dtype)
    _, dropped_total, stop_all = trailer(buf, w)
    totals = (dropped_total, unclipped_count(buf, w) if w.unclipped else 0, stop_all, round_abandoned(buf, w))
    return buf, timing, lambda n: summed_total(buf, w, round_weight), totals, {}

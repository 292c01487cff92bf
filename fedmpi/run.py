"""`fedmpi run`: the round loop (select, train, allreduce, evaluate, record) and the run around it."""
from __future__ import annotations

import json
import math
import platform
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import __version__
from .config import Config, config_text
from .data.rounds import load_round
from .engine.evaluate import accuracy_loss, per_node_accuracy, stacked_accuracy
from .engine.losses import loss_function
from .engine.params import load_flat, model_tensors, parameter_count, reset_counters
from .errors import FedmpiError
from .fl import dp, secure
from .fl.aggregate import (
    INTERRUPTED,
    UpdateSum,
    Wire,
    extra_sum,
    round_abandoned,
    summed_total,
    summed_update,
    trailer,
    unclipped_count,
)
from .fl.algorithms import fednova_rows, fednova_scale, scaffold_server_control
from .fl.compress import payload_bytes
from .fl.ring import FixedPoint
from .fl.sampling import local_selection
from .output import tensorboard
from .output.metrics import MetricsWriter, describe_round, elapsed_before, metrics_row, write_atomic, write_nodes_csv
from .output.summary import summary
from .output.tensorboard import TensorBoardWriter
from .rank import Rank, setup
from .runtime import checkpoint, faults, watchdog
from .runtime.agree import on_rank0
from .runtime.comm import agreed
from .runtime.stop import Interrupted, StopFlag, abort_on_second_interrupt

DIVERGED_EXIT_CODE = 3


class DivergedError(FedmpiError):
    """More nodes than max_dropped_fraction produced NaN/Inf in one round."""

    exit_code = DIVERGED_EXIT_CODE


@dataclass
class RoundResult:
    row: Optional[dict]   # the metrics row, rank 0 only
    nodes: Optional[list]  # every rank's block of node scores, rank 0 in a nodes.csv round only
    stop: bool            # some rank got a stop signal: every rank sees the same value
    complete: bool = True  # False: a signal interrupted some rank's training; nobody applied the round


class MomentumUndo:
    """The per-node state (momentum, SCAFFOLD's c_i) of a round's nodes before training, put back when
    the round is abandoned.

    Only what the run keeps across rounds (engine.state(): momentum with local_state keep and
    momentum > 0, SCAFFOLD's c_i): a stateless run has nothing to undo. Costs one copy of the selected
    nodes' state per round, on its device.
    """

    def __init__(self, st: Rank, rows: np.ndarray) -> None:
        self.state = st.engine.state()
        self.saved = {}
        if self.state and len(rows) > 0:
            self.index = torch.as_tensor(rows, dtype=torch.int64, device=next(iter(self.state.values())).device)
            self.saved = {k: t.index_select(0, self.index) for k, t in self.state.items()}

    def restore(self) -> None:
        for name, rows in self.saved.items():
            self.state[name].index_copy_(0, self.index, rows)


def extra_values(st: Rank) -> int:
    """Values the Allreduce carries after the model update: SCAFFOLD's control deltas (P), FedNova's
    weighted step count (1), else none."""
    return {"scaffold": st.main.numel(), "fednova": 1}.get(st.cfg.algorithm, 0)


def sync(device: torch.device) -> float:
    """A wall-clock reading after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def train_or_interrupt(st: Rank, rnd: int, rows: np.ndarray, stop: StopFlag) -> tuple:
    """train_local, and whether a stop signal interrupted it (then with an empty update: the round
    will be abandoned)."""
    watchdog.stage("training", rnd)

    def tick() -> None:  # before every training step, on the engine's worker threads too
        watchdog.progress()
        stop.check()

    try:
        with stop.interruptible():
            faults.maybe_inject(st.comm.rank, rnd, "training")
            update, local_acc, personal_acc, dropped, unclipped, t_train = train_local(st, rnd, rows, tick)
    except Interrupted:
        return new_sum(st), None, None, 0, 0, 0.0, True
    return update, local_acc, personal_acc, dropped, unclipped, t_train, False


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


def train_local(st: Rank, rnd: int, rows: np.ndarray, tick: Optional[Callable[[], None]] = None) -> tuple:
    """Train this rank's selected nodes (local indices `rows`, ascending); returns their summed (clipped)
    update, their local-model accuracies (aligned with `rows`; NaN for a dropped node), their personal
    models' accuracies (Ditto; else None), dropped count, count inside the clip, seconds."""
    update, local_acc, dropped, unclipped = new_sum(st), np.full(len(rows), np.nan), 0, 0
    personal = st.cfg.personalize != "none" or bool(st.cfg.personal_layers)
    personal_acc = np.full(len(rows), np.nan) if personal else None
    lx, ly, loffsets = st.local_test
    chunks, t_train = st.engine.train(st.main, rnd, rows, tick), 0.0
    while True:
        t0 = sync(st.device)
        chunk = next(chunks, None)
        t_train += sync(st.device) - t0
        if chunk is None:
            return update, local_acc, personal_acc, dropped, unclipped, t_train
        ks = np.array([n - st.first for n in chunk.nodes])
        at = np.searchsorted(rows, ks)
        for row, node in enumerate(chunk.nodes):
            if faults.poison_node(node, rnd):
                chunk.params[row] = float("nan")
        starts, ends = loffsets[ks], loffsets[ks + 1]
        local_acc[at] = stacked_accuracy(st.model, chunk.params, lx, ly, starts, ends - starts)
        if personal_acc is not None:  # personal layers: the node's trained model is its personal model
            personal_acc[at] = local_acc[at] if chunk.personal is None else \
                stacked_accuracy(st.model, chunk.personal, lx, ly, starts, ends - starts)
        # A row with a NaN or an Inf sums to NaN or Inf (so would weights beyond ~1e33, diverged
        # anyway): one pass over the chunk, no [k, P] boolean tensor.
        finite = torch.isfinite(chunk.params.sum(dim=1))
        finite_host = finite.cpu().numpy()
        local_acc[at[~finite_host]] = np.nan  # a dropped node has no local model to score
        if personal_acc is not None:
            personal_acc[at[~finite_host]] = np.nan  # nor a personal one: its per-node state starts afresh
        dropped += drop_diverged(st, chunk.nodes, finite_host, rnd)
        kept, scale = chunk.params[finite], None
        if st.privacy.clipping:  # DP-FedAvg: each node's update projected onto the clip ball before the sum
            scale, inside = dp.clip_rows(st.privacy, kept - st.main)
            unclipped += inside
        weights, tally = st.weights[ks[finite_host]], None
        extra = None if chunk.control_delta is None else chunk.control_delta[finite]
        if st.cfg.algorithm == "fednova":
            weights, tally, extra = fednova_rows(weights, st.samples[ks[finite_host]], st.cfg.local_epochs,
                                                 st.cfg.batch_size)
        if getattr(st.engine, "shared", None) is not None:
            kept = kept[:, st.engine.shared]
        if extra is None and tally is None:
            update.add(kept, weights, scale=scale)
        else:
            update.add(kept, weights, extra, tally)
        progress(st, ks[-1] + 1)


def drop_diverged(st: Rank, nodes: list[int], finite: np.ndarray, rnd: int) -> int:
    """Nodes with NaN/Inf parameters get weight zero this round and a fresh per-node state (momentum, c_i)."""
    for node, ok in zip(nodes, finite):
        if not ok:
            print(f"fedmpi: node {node} (rank {st.comm.rank}) diverged (NaN/Inf) in round {rnd}; "
                  f"left out of the average", file=sys.stderr, flush=True)
            st.engine.store.reset_row(node - st.first)
    return int((~finite).sum())


def run_round(st: Rank, rnd: int, stop: StopFlag) -> RoundResult:
    """One round on this rank; every rank calls the same collectives in the same order."""
    t0, cfg = time.perf_counter(), st.cfg
    # 1. select: no message; every rank holds the main model after the last Allreduce and
    #    computes the round's node selection itself (seeded by round, not by rank).
    selected = dp.select(cfg, rnd)
    rows = local_selection(selected, st.first, st.end) - st.first
    t_select = time.perf_counter() - t0
    t_read = 0.0
    if st.reader is not None:  # the block exceeds data_resident_bytes: this round's nodes from the file
        watchdog.stage("reading the round's shards", rnd)
        t1 = time.perf_counter()
        load_round(st.engine, st.reader, rnd, rows)
        t_read = time.perf_counter() - t1
    # 2. local training of this rank's selected nodes, starting from the main model; a stop signal
    #    interrupts it within a step, and the rank votes to abandon the round.
    undo = MomentumUndo(st, rows)
    update, local_acc, personal_acc, dropped, unclipped, t_train, interrupted = train_or_interrupt(st, rnd, rows,
                                                                                                   stop)
    faults.maybe_inject(st.comm.rank, rnd)
    # 3. one Allreduce, then the server optimizer's step along the mean update; the stop vote: 1 for
    #    a signal that came after training (the round completes), INTERRUPTED for one during it.
    vote = INTERRUPTED if interrupted else float(stop.requested)
    buf, timing, dropped_total, stop_all, abandoned, released = aggregate(st, rnd, update, (dropped, unclipped), vote,
                                                                           selected)
    if abandoned:  # some rank's sum is incomplete: every rank drops the round; a resume reruns it
        undo.restore()
        return RoundResult(None, None, stop=True, complete=False)
    # 4. evaluate: the main model on the test set at rank 0 and, when scored this round, on each local
    #    test split here.
    watchdog.stage("evaluating", rnd)
    t1 = sync(st.device)
    evaluated, listed = evaluated_round(cfg, rnd), nodes_round(cfg, rnd)
    main_on_local = per_node_accuracy(st.model, st.main, *st.local_test) if evaluated or listed else None
    test = (accuracy_loss(st.model, st.main, *st.test, loss_function(cfg.loss)) if st.test is not None and evaluated
            else (None, None))
    t_eval = sync(st.device) - t1
    # 5. record: rank 0 gathers every rank's timings and fixed-size score summaries; every node's
    #    scores only in a nodes.csv round.
    t2 = time.perf_counter()
    per_rank = st.comm.gather(round_part(st, t_train, timing.t_collective, rows, local_acc, main_on_local, listed,
                                         personal_acc))
    if per_rank is None:
        return RoundResult(None, None, stop_all)
    row = metrics_row(rnd, test, per_rank, st.central, buf.nbytes, st.comm.size, t_eval, time.perf_counter() - t0)
    row.update(t_select=t_select, t_read=t_read, t_gather=time.perf_counter() - t2,
               nodes_selected=len(selected), nodes_dropped=dropped_total, update_dtype=cfg.update_dtype,
               bytes_saved=payload_bytes(buf.size, "fp32") - buf.nbytes, **released)
    if st.privacy.dp and cfg.sampling == "poisson":  # the real number of participants is private
        row.update(nodes_selected=None, nodes_dropped=None)
    if dp.epsilon_due(st.privacy, rnd, cfg.rounds):
        eps = st.privacy.epsilon(rnd)
        row["dp_epsilon"] = eps if math.isfinite(eps) else None  # no noise: no guarantee (strict JSON has no inf)
    row["t_elapsed"] = time.perf_counter() - st.clock_zero
    return RoundResult(row, [r["block"] for r in per_rank] if listed else None, stop_all)


def round_part(st: Rank, t_train: float, t_collective: float, rows: np.ndarray, local_acc: np.ndarray,
               main_on_local: Optional[np.ndarray], listed: bool, personal_acc: Optional[np.ndarray] = None) -> dict:
    """What this rank sends rank 0 for the row: timings and fixed-size score summaries, and in a
    nodes.csv round its block of every node's scores (NaN local_acc for a node that did not train).
    With personalization also the summaries of the round's personal models and of the new main model on
    the same nodes' splits."""
    part = dict(t_train=t_train, t_collective=t_collective, nodes=len(st.samples), local=summary(local_acc),
                main_on_local=None if main_on_local is None else summary(main_on_local))
    if personal_acc is not None:
        part["personal_local"] = summary(personal_acc)
        part["main_on_trained"] = None if main_on_local is None else summary(main_on_local[rows])
    if listed:
        everyone = np.full(len(st.samples), np.nan)
        everyone[rows] = local_acc
        part["block"] = dict(first=st.first, rank=st.comm.rank, samples=st.samples, local_acc=everyone,
                             main_on_local_acc=main_on_local)
        if personal_acc is not None:  # personalization: the round's personal models, NaN for the others
            part["block"]["personal_local_acc"] = np.full(len(st.samples), np.nan)
            part["block"]["personal_local_acc"][rows] = personal_acc
    return part


def evaluated_round(cfg: Config, rnd: int) -> bool:
    """The main model is scored on the test set every eval_every rounds and in the last one."""
    return rnd % cfg.eval_every == 0 or rnd == cfg.rounds


def nodes_round(cfg: Config, rnd: int) -> bool:
    """nodes.csv is rewritten every node_metrics_every rounds and in the last one (0: every evaluated round)."""
    if cfg.node_metrics_every == 0:
        return evaluated_round(cfg, rnd)
    return rnd % cfg.node_metrics_every == 0 or rnd == cfg.rounds


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


def progress(st: Rank, done: int) -> None:
    """A live count of trained nodes on rank 0, only when stderr is a terminal (never in batch logs)."""
    if st.comm.rank == 0 and sys.stderr.isatty():
        print(f"\r  training: {done}/{len(st.samples)} nodes on rank 0", end="", file=sys.stderr, flush=True)


def run_info(st: Rank, ranks: list) -> dict:
    """run.json: who ran where, with what (from every rank's `rank_info`)."""
    return dict(fedmpi_version=__version__, world_size=st.comm.size, mpi_library=st.comm.library_version(),
                torch_version=torch.__version__, python=platform.python_version(),
                hosts=sorted({r["host"] for r in ranks}), nodes_per_rank=[r["nodes"] for r in ranks],
                devices=[r["device"] for r in ranks], threads_per_rank=[r["threads"] for r in ranks],
                resumed_from_round=st.done_rounds, **st.privacy.record())


def rank_info(st: Rank) -> dict:
    """This rank's part of run.json."""
    return dict(rank=st.comm.rank, host=platform.node(), device=str(st.device), nodes=len(st.samples),
                threads=torch.get_num_threads())


def start_files(st: Rank, run_dir: Path) -> Optional[MetricsWriter]:
    """Collective, once every rank has set up (checkpoint included): rank 0 writes config.yaml (when it
    changed), run.json, central.json and the metrics so far; a failed write ends every rank."""
    ranks = st.comm.gather(rank_info(st))

    def write() -> MetricsWriter:
        config_yaml = run_dir / "config.yaml"
        text = config_text(st.cfg)
        # Unchanged on a plain resume: never rewritten (the other ranks have read it).
        if not (config_yaml.is_file() and config_yaml.read_bytes() == text.encode()):
            write_atomic(config_yaml, text)
        write_atomic(run_dir / "run.json", json.dumps(run_info(st, ranks), indent=2) + "\n")
        if st.central is not None:
            write_atomic(run_dir / "central.json", json.dumps(st.central, indent=2) + "\n")
        return MetricsWriter(run_dir, st.rows)

    return on_rank0(st.comm, write)


def record(st: Rank, run_dir: Path, writer: Optional[MetricsWriter], result: RoundResult,
           board: Optional[TensorBoardWriter] = None) -> None:
    """Rank 0: append the row (and its scalars to TensorBoard), print one line, rewrite nodes.csv in the
    rounds that list every node."""
    if result.row is None:
        return
    watchdog.stage("writing metrics", result.row["round"])
    st.rows.append(result.row)
    writer.write(result.row)
    if board is not None:
        board.write(result.row)
    print(("\r" if sys.stderr.isatty() else "") + describe_round(result.row, st.cfg.rounds), flush=True)
    if result.nodes is not None:
        write_nodes_csv(run_dir / "nodes.csv", result.nodes, st.client_ids)


def run(cfg: Config, run_dir: Path, comm, resumed: Optional[tuple] = None) -> int:
    """The whole job on this rank; returns the exit code (0, or 75 when stopped by a signal).

    `resumed`: the checkpoint folder and its checked meta.json (rundir.open_run_dir) to continue from.
    """
    started = time.perf_counter()
    stop = StopFlag(abort_on_second_interrupt(comm)).install()
    watch = watchdog.start(run_dir, comm, cfg.stall_timeout_s)
    with agreed(comm):  # before anything is written: the same one line everywhere
        faults.active()  # a malformed FEDMPI_FAULT fails now, not after the start-up
        if cfg.tensorboard:
            tensorboard.require()
    st = setup(cfg, comm, resumed)
    st.clock_zero = started - elapsed_before(st.rows)
    writer = start_files(st, run_dir)
    board = TensorBoardWriter(run_dir, st.rows) if comm.rank == 0 and cfg.tensorboard else None
    comm.barrier()  # rank 0 may have trained the baseline: keep that wait out of round 1's t_wait
    code = run_rounds(st, run_dir, writer, board, stop)
    stop.settle()  # from here on a signal changes nothing: the exit code stays what was decided
    if code == 0:
        on_rank0(comm, lambda: save_model(st, run_dir / "model.pt"))
        if st.privacy.dp:
            on_rank0(comm, lambda: final_epsilon(st, run_dir / "run.json"))
    watch.close()
    if code == checkpoint.STOP_EXIT_CODE:
        comm.finish(code)  # all written and flushed: leave now, not after seconds of teardown
    return code


def run_rounds(st: Rank, run_dir: Path, writer: Optional[MetricsWriter], board: Optional[TensorBoardWriter],
               stop: StopFlag) -> int:
    """The rounds after the checkpoint's; 0 when all are done, 75 when a signal stopped them."""
    cfg = st.cfg
    for rnd in range(st.done_rounds + 1, cfg.rounds + 1):
        result = run_round(st, rnd, stop)
        record(st, run_dir, writer, result, board)
        if result.stop and not (result.complete and rnd == cfg.rounds):  # a complete last round just ends
            return stop_job(st, run_dir, stop, rnd if result.complete else rnd - 1, result.complete)
        if cfg.checkpoint_every and rnd % cfg.checkpoint_every == 0:
            save_checkpoint(st, run_dir, rnd)
    return 0


def save_checkpoint(st: Rank, run_dir: Path, rnd: int) -> None:
    watchdog.stage("writing the checkpoint", rnd)
    checkpoint.save(run_dir, st.comm, st.cfg, rnd, st.main, st.server.state(), st.engine.state(),
                    st.first, st.end, st.rows, getattr(st.engine, "server_control", None), dp.saved_state(st.privacy))


def stop_job(st: Rank, run_dir: Path, stop: StopFlag, done: int, complete: bool) -> int:
    """Checkpoint the last complete round, say so once for the job (rank 0); exit code 75."""
    save_checkpoint(st, run_dir, done)
    if st.comm.rank == 0:
        by = f"by {signal.Signals(stop.signum).name}" if stop.requested else "by a signal"
        when = f"after round {done}" if complete else f"during round {done + 1} (abandoned: it reruns on resume)"
        print(f"stopped {by} {when}; checkpoint of round {done} in {run_dir}/checkpoint; "
              f"continue with: fedmpi run --resume {run_dir}", flush=True)
    return checkpoint.STOP_EXIT_CODE


def final_epsilon(st: Rank, path: Path) -> None:
    """run.json gains the epsilon after the last round (rank 0, at the end of a complete run)."""
    info = json.loads(path.read_text())
    info["dp_epsilon"] = st.rows[-1].get("dp_epsilon") if st.rows else None
    write_atomic(path, json.dumps(info, indent=2) + "\n")


def save_model(st: Rank, path: Path) -> None:
    """The final main model as a plain state_dict (loads with torch.load(..., weights_only=True)), atomically."""
    load_flat(model_tensors(st.model), st.main)  # the parameters and the float buffers the round carried
    reset_counters(st.model)  # num_batches_tracked: the last trained node's count on this rank, not a result
    write_atomic(path, checkpoint.tensor_bytes({k: v.detach().cpu() for k, v in st.model.state_dict().items()}))

"""`fedmpi run`: the round loop (select, train, allreduce, evaluate, record) and the run around it."""
from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .combine import aggregate, new_sum
from .config import Config
from .data.rounds import load_round
from .engine.evaluate import accuracy_loss, per_node_accuracy, stacked_accuracy
from .engine.losses import loss_function
from .fl import dp
from .fl.aggregate import INTERRUPTED
from .fl.algorithms import fednova_rows
from .fl.compress import payload_bytes
from .fl.sampling import local_selection
from .output import tensorboard
from .output.metrics import MetricsWriter, elapsed_before, metrics_row
from .output.runfiles import final_epsilon, progress, record, save_model, start_files
from .output.summary import summary
from .output.tensorboard import TensorBoardWriter
from .rank import Rank, setup
from .runtime import checkpoint, faults, watchdog
from .runtime.agree import on_rank0
from .runtime.comm import agreed
from .runtime.stop import Interrupted, StopFlag, abort_on_second_interrupt


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


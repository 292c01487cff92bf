"""`fedmpi run`: the round loop (select, train, allreduce, evaluate, record) and the run around it."""
from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import __version__
from .config import Config, config_text
from .data.partition import node_ranges
from .engine.evaluate import accuracy_loss, per_node_accuracy, stacked_accuracy
from .engine.params import load_flat
from .errors import FedmpiError
from .fl.aggregate import UpdateSum, Wire, summed_update, trailer
from .fl.compress import payload_bytes
from .fl.sampling import local_selection, select_nodes
from .output import tensorboard
from .output.metrics import MetricsWriter, describe_round, elapsed_before, metrics_row, write_atomic, write_nodes_csv
from .output.tensorboard import TensorBoardWriter
from .rank import Rank, setup
from .runtime import checkpoint, faults
from .runtime.agree import on_rank0
from .runtime.comm import agreed
from .runtime.stop import StopFlag

DIVERGED_EXIT_CODE = 3


class DivergedError(FedmpiError):
    """More nodes than max_dropped_fraction produced NaN/Inf in one round."""

    exit_code = DIVERGED_EXIT_CODE


@dataclass
class RoundResult:
    row: Optional[dict]   # the metrics row, rank 0 only
    nodes: Optional[list]  # per-node scores, rank 0 only
    stop: bool            # some rank got a stop signal: every rank sees the same value


def sync(device: torch.device) -> float:
    """A wall-clock reading after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def train_local(st: Rank, rnd: int, rows: np.ndarray) -> tuple[UpdateSum, np.ndarray, int, float]:
    """Train this rank's selected nodes (local indices `rows`); returns their summed update,
    local-model accuracies (NaN for nodes that sat the round out), dropped count, seconds."""
    update, local_acc, dropped = UpdateSum(st.main), np.full(len(st.samples), np.nan), 0
    lx, ly, loffsets = st.local_test
    chunks, t_train = st.engine.train(st.main, rnd, rows), 0.0
    while True:
        t0 = sync(st.device)
        chunk = next(chunks, None)
        t_train += sync(st.device) - t0
        if chunk is None:
            return update, local_acc, dropped, t_train
        ks = np.array([n - st.first for n in chunk.nodes])
        for row, node in enumerate(chunk.nodes):
            if faults.poison_node(node, rnd):
                chunk.params[row] = float("nan")
        starts, ends = loffsets[ks], loffsets[ks + 1]
        local_acc[ks] = stacked_accuracy(st.model, chunk.params, lx, ly, starts, ends - starts)
        # A row with a NaN or an Inf sums to NaN or Inf (so would weights beyond ~1e33, diverged
        # anyway): one pass over the chunk, no [k, P] boolean tensor.
        finite = torch.isfinite(chunk.params.sum(dim=1))
        finite_host = finite.cpu().numpy()
        local_acc[ks[~finite_host]] = np.nan  # a dropped node has no local model to score
        dropped += drop_diverged(st, chunk.nodes, finite_host, rnd)
        update.add(chunk.params[finite], st.weights[ks[finite_host]])
        progress(st, ks[-1] + 1)


def drop_diverged(st: Rank, nodes: list[int], finite: np.ndarray, rnd: int) -> int:
    """Nodes with NaN/Inf parameters get weight zero this round and a fresh momentum buffer."""
    for node, ok in zip(nodes, finite):
        if not ok:
            print(f"fedmpi: node {node} (rank {st.comm.rank}) diverged (NaN/Inf) in round {rnd}; "
                  f"left out of the average", file=sys.stderr, flush=True)
            st.engine.state()["momentum"][node - st.first].zero_()
    return int((~finite).sum())


def run_round(st: Rank, rnd: int, stop: StopFlag) -> RoundResult:
    """One round on this rank; every rank calls the same collectives in the same order."""
    t0, cfg = time.perf_counter(), st.cfg
    # 1. select: no message; every rank holds the main model after the last Allreduce and
    #    computes the round's node selection itself (seeded by round, not by rank).
    selected = select_nodes(cfg.nodes, cfg.fraction, cfg.seed, rnd)
    # 2. local training of this rank's selected nodes, starting from the main model.
    update, local_acc, dropped, t_train = train_local(st, rnd, local_selection(selected, st.first, st.end) - st.first)
    faults.maybe_inject(st.comm.rank, rnd)
    # 3. one Allreduce, then the server optimizer's step along the mean update.
    buf, timing, dropped_total, stop_all = aggregate(st, rnd, update, dropped, stop.requested, selected)
    # 4. evaluate: the main model on each local test split here, on the test set at rank 0.
    t1 = sync(st.device)
    main_on_local = per_node_accuracy(st.model, st.main, *st.local_test)
    evaluated = rnd % cfg.eval_every == 0 or rnd == cfg.rounds
    test = accuracy_loss(st.model, st.main, *st.test) if st.test is not None and evaluated else (None, None)
    t_eval = sync(st.device) - t1
    # 5. record: rank 0 gathers every rank's timings and node scores.
    nodes = [dict(node=st.first + k, rank=st.comm.rank, samples=int(st.samples[k]), local_acc=float(local_acc[k]),
                  main_on_local_acc=float(main_on_local[k])) for k in range(len(st.samples))]
    per_rank = st.comm.gather(dict(t_train=t_train, t_collective=timing.t_collective, nodes=nodes))
    if per_rank is None:
        return RoundResult(None, None, stop_all)
    row = metrics_row(rnd, test, per_rank, st.central, buf.nbytes, st.comm.size, t_eval, time.perf_counter() - t0)
    row.update(nodes_selected=len(selected), nodes_dropped=dropped_total, update_dtype=cfg.update_dtype,
               bytes_saved=payload_bytes(buf.size, "fp32") - buf.nbytes, t_elapsed=time.perf_counter() - st.clock_zero)
    return RoundResult(row, [n for r in per_rank for n in r["nodes"]], stop_all)


def aggregate(st: Rank, rnd: int, update: UpdateSum, dropped: int, stop: bool, selected: np.ndarray) -> tuple:
    """Allreduce(SUM) of [updates, weight, dropped, stop votes] (a rank without selected nodes sends
    zeros), then move the main model; returns the buffer, timings, dropped total, agreed stop."""
    cfg, comm = st.cfg, st.comm
    most_nodes = len(node_ranges(cfg.nodes, comm.size)[0])  # rank 0 holds the largest block
    wire = Wire(cfg.update_dtype, comm.size, comm.rank, most_nodes)
    buf = update.pack(dropped, stop, wire, float(st.all_weights[selected].sum()))
    timing = comm.allreduce_sum(buf, None if cfg.update_dtype == "fp32" else cfg.update_dtype)
    _, dropped_total, stop_all = trailer(buf, wire)
    if dropped_total > cfg.max_dropped_fraction * len(selected):
        raise DivergedError(f"{dropped_total} of {len(selected)} nodes diverged (NaN/Inf) in round {rnd}, more than "
                            f"max_dropped_fraction={cfg.max_dropped_fraction}; the last checkpoint is kept")
    if dropped_total < len(selected):
        st.main = st.server.step(st.main, *summed_update(buf, wire))
    elif comm.rank == 0:  # only max_dropped_fraction 1 lets a round lose every node: nothing to average
        print(f"fedmpi: all {len(selected)} nodes diverged (NaN/Inf) in round {rnd}; the main model and the server "
              f"optimizer stay as they were", file=sys.stderr, flush=True)
    return buf, timing, dropped_total, stop_all


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
                resumed_from_round=st.done_rounds)


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
    """Rank 0: append the row (and its scalars to TensorBoard), print one line, keep nodes.csv of the
    last evaluated round."""
    if result.row is None:
        return
    st.rows.append(result.row)
    writer.write(result.row)
    if board is not None:
        board.write(result.row)
    print(("\r" if sys.stderr.isatty() else "") + describe_round(result.row, st.cfg.rounds), flush=True)
    if result.row["test_acc"] is not None:
        write_nodes_csv(run_dir / "nodes.csv", result.nodes)


def run(cfg: Config, run_dir: Path, comm, resumed: Optional[tuple] = None) -> int:
    """The whole job on this rank; returns the exit code (0, or 75 when stopped by a signal).

    `resumed`: the checkpoint folder and its checked meta.json (rundir.open_run_dir) to continue from.
    """
    started = time.perf_counter()
    if cfg.tensorboard:
        with agreed(comm):  # before anything is written: the same one line everywhere
            tensorboard.require()
    stop = StopFlag().install()
    st = setup(cfg, comm, resumed)
    st.clock_zero = started - elapsed_before(st.rows)
    writer = start_files(st, run_dir)
    board = TensorBoardWriter(run_dir, st.rows) if comm.rank == 0 and cfg.tensorboard else None
    comm.barrier()  # rank 0 may have trained the baseline: keep that wait out of round 1's t_wait
    for rnd in range(st.done_rounds + 1, cfg.rounds + 1):
        result = run_round(st, rnd, stop)
        record(st, run_dir, writer, result, board)
        # A stop in the last round has nothing left to resume: the run ends as complete, with its model.
        stopping = result.stop and rnd < cfg.rounds
        if stopping or (cfg.checkpoint_every and rnd % cfg.checkpoint_every == 0):
            checkpoint.save(run_dir, comm, cfg, rnd, st.main, st.server.state(), st.engine.state()["momentum"],
                            st.first, st.rows)
        if result.stop and not stopping and comm.rank == 0:
            print(f"a stop signal came in the last round ({rnd}): the run is complete", flush=True)
        if stopping:
            if comm.rank == 0:
                print(f"stopped after round {rnd} by a signal; checkpoint in {run_dir}/checkpoint; "
                      f"continue with: fedmpi run --resume {run_dir}", flush=True)
            return checkpoint.STOP_EXIT_CODE
    on_rank0(comm, lambda: save_model(st, run_dir / "model.pt"))
    return 0


def save_model(st: Rank, path: Path) -> None:
    """The final main model as a plain state_dict (loads with torch.load(..., weights_only=True)), atomically."""
    load_flat(list(st.model.parameters()), st.main)
    write_atomic(path, checkpoint.tensor_bytes({k: v.detach().cpu() for k, v in st.model.state_dict().items()}))

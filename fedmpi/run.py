"""`fedmpi run`: set up one rank, then the round loop (broadcast, train, allreduce, evaluate, record)."""
from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from . import __version__, faults
from .aggregate import UpdateSum, apply_update, node_weights, wire_bytes_estimate
from .central import central_baseline
from .config import Config, save_config
from .device import configure_torch, pick_device, pick_threads
from .evaluate import accuracy_loss, per_node_accuracy
from .metrics import MetricsWriter, summarize, write_nodes_csv
from .models import build_model
from .partition import node_ranges
from .prepare import check_matches, prepare
from .shards import read_attrs, read_nodes, read_test
from .train import SequentialEngine, flatten, load_flat


@dataclass
class Rank:
    """Everything one rank holds during a run."""

    cfg: Config
    comm: Any
    device: torch.device
    model: torch.nn.Module
    engine: SequentialEngine
    main: torch.Tensor            # the main model, flat; identical on every rank
    first: int                    # this rank's first node id
    samples: np.ndarray           # training samples per local node
    weights: np.ndarray           # aggregation weight per local node
    local_test: tuple             # (x, y, offsets) of the local nodes' test splits
    test: Optional[tuple]         # (x, y) of the whole test set, rank 0 only
    central: Optional[dict]       # the centralized baseline, rank 0 only


def to_device(x: np.ndarray, y: np.ndarray, scale: float, device: torch.device) -> tuple:
    """uint8 images -> float32 in [0, 1] on the device, held once per rank for the whole run."""
    return torch.from_numpy(x).to(device).float().mul_(scale), torch.from_numpy(y).to(device)


def ensure_data(cfg: Config, comm) -> Path:
    """Rank 0 prepares the shard file when missing; the others wait for it, then all check it."""
    if comm.rank == 0:
        prepare(cfg)
    comm.barrier()
    check_matches(cfg, cfg.data_path)
    return cfg.data_path


def setup(cfg: Config, comm) -> Rank:
    device = pick_device(cfg.device, comm.local_rank)
    configure_torch(pick_threads(cfg.threads, comm.local_size))
    mine = node_ranges(cfg.nodes, comm.size)[comm.rank]
    path = ensure_data(cfg, comm)
    attrs = read_attrs(path)
    shape, classes, scale = tuple(attrs["input_shape"]), int(attrs["classes"]), float(attrs["pixel_scale"])
    train = read_nodes(path, "train", mine.start, mine.stop)
    local = read_nodes(path, "local_test", mine.start, mine.stop)
    model = build_model(cfg.model, shape, classes, cfg.seed).to(device)
    main = flatten(list(model.parameters()))
    x, y = to_device(train.x, train.y, scale, device)
    engine = SequentialEngine(model, x, y, train.offsets, mine.start, cfg)
    test = central = None
    if comm.rank == 0:
        test = to_device(*read_test(path), scale, device)
        if cfg.central_epochs:
            everything = read_nodes(path, "train", 0, cfg.nodes)
            central = central_baseline(cfg, *to_device(everything.x, everything.y, scale, device), *test, shape, classes)
    return Rank(cfg, comm, device, model, engine, main, mine.start, train.counts,
                node_weights(cfg.aggregation, train.counts), (*to_device(local.x, local.y, scale, device), local.offsets),
                test, central)


def sync(device: torch.device) -> float:
    """A wall-clock reading after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def train_local(st: Rank, rnd: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Train this rank's nodes; returns the packed update, each node's local-model accuracy, train seconds."""
    update, local_acc = UpdateSum(st.main), np.full(len(st.samples), np.nan)
    lx, ly, loffsets = st.local_test
    chunks, t_train = st.engine.train(st.main, rnd), 0.0
    while True:
        t0 = sync(st.device)
        chunk = next(chunks, None)
        t_train += sync(st.device) - t0
        if chunk is None:
            return update.pack(), local_acc, t_train
        for row, node in enumerate(chunk.nodes):
            k = node - st.first
            a, b = int(loffsets[k]), int(loffsets[k + 1])
            local_acc[k] = per_node_accuracy(st.model, chunk.params[row], lx[a:b], ly[a:b], np.array([0, b - a]))[0]
        update.add(chunk.params, st.weights[[n - st.first for n in chunk.nodes]])
        progress(st, chunk.nodes[-1] - st.first + 1)


def run_round(st: Rank, rnd: int) -> Optional[dict]:
    """One round; returns the metrics row on rank 0 (None elsewhere)."""
    t0 = time.perf_counter()
    # 1. broadcast: nothing to send, every rank holds the main model after the last Allreduce.
    # 2. local training of this rank's nodes, starting from the main model.
    buf, local_acc, t_train = train_local(st, rnd)
    faults.maybe_inject(st.comm.rank, rnd)
    # 3. one Allreduce(SUM) of [sum w*update, sum w], then divide.
    timing = st.comm.allreduce_sum(buf)
    st.main = apply_update(st.main, buf)
    # 4. evaluate: the main model on each local test split here, on the test set at rank 0.
    t1 = sync(st.device)
    lx, ly, loffsets = st.local_test
    main_on_local = per_node_accuracy(st.model, st.main, lx, ly, loffsets)
    evaluated = rnd % st.cfg.eval_every == 0 or rnd == st.cfg.rounds
    test = accuracy_loss(st.model, st.main, *st.test) if st.test is not None and evaluated else (None, None)
    t_eval = sync(st.device) - t1
    nodes = [dict(node=st.first + k, rank=st.comm.rank, samples=int(st.samples[k]), local_acc=float(local_acc[k]),
                  main_on_local_acc=float(main_on_local[k])) for k in range(len(st.samples))]
    per_rank = st.comm.gather(dict(t_train=t_train, t_wait=timing.t_wait, t_allreduce=timing.t_allreduce, nodes=nodes))
    # 5. record (rank 0).
    if per_rank is None:
        return None
    return metrics_row(st, rnd, buf.nbytes, test, per_rank, t_eval, time.perf_counter() - t0)


def metrics_row(st: Rank, rnd: int, payload: int, test: tuple, per_rank: list, t_eval: float, t_round: float) -> dict:
    t_train = np.array([r["t_train"] for r in per_rank])
    t_wait = np.array([r["t_wait"] for r in per_rank])
    nodes = [n for r in per_rank for n in r["nodes"]]
    central = st.central or {}
    row = dict(round=rnd, test_acc=test[0], test_loss=test[1],
               central_acc=(central.get("test_acc") or [None])[-1], central_loss=(central.get("test_loss") or [None])[-1],
               t_round=t_round, t_train_max=float(t_train.max()), t_train_mean=float(t_train.mean()),
               t_wait=float(t_wait.mean()), t_wait_max=float(t_wait.max()),
               t_allreduce=max(r["t_allreduce"] for r in per_rank), t_eval=t_eval,
               payload_bytes=payload, wire_bytes_est=wire_bytes_estimate(payload, st.comm.size),
               ranks=st.comm.size, nodes=len(nodes))
    row.update(summarize("local_acc", np.array([n["local_acc"] for n in nodes])))
    row.update(summarize("main_on_local_acc", np.array([n["main_on_local_acc"] for n in nodes])))
    row["_nodes"] = nodes
    return row


def progress(st: Rank, done: int) -> None:
    """A live count of trained nodes on rank 0, only when stderr is a terminal (never in batch logs)."""
    if st.comm.rank == 0 and sys.stderr.isatty():
        print(f"\r  training: {done}/{len(st.samples)} nodes on rank 0", end="", file=sys.stderr, flush=True)


def describe_round(row: dict, rounds: int) -> str:
    acc = "  -   " if row["test_acc"] is None else f"{row['test_acc']:.4f}"
    central = "" if row["central_acc"] is None else f"  central {row['central_acc']:.4f}"
    return (f"round {row['round']:>3}/{rounds}  test_acc {acc}{central}  local_acc {row['local_acc_mean'] or 0:.4f}"
            f"  t {row['t_round']:.2f}s (train max {row['t_train_max']:.2f}, wait {row['t_wait']:.3f},"
            f" allreduce {row['t_allreduce'] * 1e3:.1f} ms)  payload {row['payload_bytes']:,} B")


def run_info(st: Rank, run_dir: Path) -> None:
    """run.json: who ran where, with what (written by rank 0, gathered from every rank)."""
    me = dict(rank=st.comm.rank, host=platform.node(), device=str(st.device), nodes=len(st.samples),
              threads=torch.get_num_threads())
    ranks = st.comm.gather(me)
    if ranks is None:
        return
    info = dict(fedmpi_version=__version__, world_size=st.comm.size, mpi_library=st.comm.library_version(),
                torch_version=torch.__version__, python=platform.python_version(),
                hosts=sorted({r["host"] for r in ranks}), nodes_per_rank=[r["nodes"] for r in ranks],
                devices=[r["device"] for r in ranks], threads_per_rank=[r["threads"] for r in ranks])
    (run_dir / "run.json").write_text(json.dumps(info, indent=2) + "\n")


def run(cfg: Config, run_dir: Path, comm) -> list[dict]:
    """The whole job on this rank; returns the metrics rows on rank 0."""
    if comm.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    st = setup(cfg, comm)
    run_info(st, run_dir)
    comm.barrier()  # rank 0 may have trained the baseline: keep that wait out of round 1's t_wait
    writer = MetricsWriter(run_dir) if comm.rank == 0 else None
    if st.central is not None:
        (run_dir / "central.json").write_text(json.dumps(st.central, indent=2) + "\n")
    rows = []
    for rnd in range(1, cfg.rounds + 1):
        row = run_round(st, rnd)
        if row is None:
            continue
        nodes = row.pop("_nodes")
        writer.write(row)
        rows.append(row)
        print(("\r" if sys.stderr.isatty() else "") + describe_round(row, cfg.rounds), flush=True)
        if row["test_acc"] is not None:
            write_nodes_csv(run_dir / "nodes.csv", nodes)
    if comm.rank == 0:
        save_model(st, run_dir / "model.pt")
    return rows


def save_model(st: Rank, path: Path) -> None:
    """The final main model as a plain state_dict (loads with torch.load(..., weights_only=True))."""
    load_flat(list(st.model.parameters()), st.main)
    torch.save({k: v.detach().cpu() for k, v in st.model.state_dict().items()}, path)

"""Setting up one rank: device, data on the device, model, engine, baseline, resumed state."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .config import Config
from .data.partition import node_ranges
from .data.prepare import check_matches, prepare
from .data.shards import read_attrs, read_client_ids, read_nodes, read_offsets, read_test
from .engine import Engine, make_engine
from .engine.central import central_baseline
from .engine.models import build_model
from .engine.params import flatten
from .fl import server
from .fl.server import ServerOptimizer
from .fl.aggregate import node_weights
from .runtime import checkpoint
from .runtime.comm import Comm
from .runtime.device import configure_torch, pick_device, pick_threads


@dataclass
class Rank:
    """Everything one rank holds during a run."""

    cfg: Config
    comm: Comm
    device: torch.device
    model: torch.nn.Module
    engine: Engine                # SequentialEngine or BatchedEngine: train(main, rnd) -> chunks
    main: torch.Tensor            # the main model, flat; identical on every rank
    first: int                    # this rank's first node id
    samples: np.ndarray           # training samples per local node
    weights: np.ndarray           # aggregation weight per local node
    local_test: tuple             # (x, y, offsets) of the local nodes' test splits
    test: Optional[tuple] = None  # (x, y) of the whole test set, rank 0 only
    central: Optional[dict] = None  # the centralized baseline, rank 0 only
    done_rounds: int = 0          # rounds finished before this process started (resume)
    rows: Optional[list] = None   # metrics rows so far, rank 0 only
    all_weights: Optional[np.ndarray] = None  # aggregation weight of every node (the round's total weight)
    server: Optional[ServerOptimizer] = None  # the server optimizer applied to the mean update
    client_ids: Optional[list] = None  # each node's client id when the shard file has them, rank 0 only

    @property
    def end(self) -> int:
        """One past this rank's last node id."""
        return self.first + len(self.samples)


def to_device(x: np.ndarray, y: np.ndarray, scale: float, device: torch.device) -> tuple:
    """Inputs as float32 times pixel_scale on the device (uint8 images converted there), held once per rank."""
    x = torch.from_numpy(x).to(device)
    if x.dtype != torch.float32 or scale != 1.0:  # float32 inputs at scale 1 are used as they are
        x = x.float().mul_(scale)
    return x, torch.from_numpy(y).to(device)


def ensure_data(cfg: Config, comm) -> Path:
    """Rank 0 prepares the shard file when missing; the others wait for it, then all check it."""
    if comm.rank == 0:
        prepare(cfg)
    comm.barrier()
    check_matches(cfg, cfg.data_path)
    return cfg.data_path


def setup(cfg: Config, comm, resume_dir: Optional[Path] = None) -> Rank:
    """Load this rank's nodes onto its device and build everything the round loop needs."""
    device = pick_device(cfg.device, comm.local_rank)
    configure_torch(pick_threads(cfg.threads, comm.local_size))
    mine = node_ranges(cfg.nodes, comm.size)[comm.rank]
    resumed = checkpoint.load_meta(resume_dir, cfg) if resume_dir is not None else None
    path = ensure_data(cfg, comm)
    attrs = read_attrs(path)
    shape, classes, scale = tuple(attrs["input_shape"]), int(attrs["classes"]), float(attrs.get("pixel_scale", 1.0))
    train = read_nodes(path, "train", mine.start, mine.stop)
    local = read_nodes(path, "local_test", mine.start, mine.stop)
    model = build_model(cfg.model, shape, classes, cfg.seed).to(device)
    x, y = to_device(train.x, train.y, scale, device)
    st = Rank(cfg, comm, device, model, make_engine(cfg, model, x, y, train.offsets, mine.start),
              flatten(list(model.parameters())), mine.start, train.counts,
              node_weights(cfg.aggregation, train.counts), (*to_device(local.x, local.y, scale, device), local.offsets))
    st.all_weights = node_weights(cfg.aggregation, np.diff(read_offsets(path, "train")))
    st.server = server.from_config(cfg)
    if resumed is not None:
        restore(st, *resumed, mine.stop)
    if comm.rank == 0:
        st.test = to_device(*read_test(path), scale, device)
        st.rows, st.client_ids = st.rows or [], read_client_ids(path)
        if cfg.central_epochs:
            def load_all_shards() -> tuple:
                everything = read_nodes(path, "train", 0, cfg.nodes)
                return to_device(everything.x, everything.y, scale, device)

            st.central = central_baseline(cfg, load_all_shards, *st.test, shape, classes)
    return st


def restore(st: Rank, folder: Path, meta: dict, stop: int) -> None:
    """Continue from a checkpoint: main model, every local node's momentum, rounds done, metrics."""
    main = checkpoint.load_main(folder)
    if main.shape != st.main.shape:
        raise checkpoint.CheckpointError(f"checkpoint {folder}/main.pt holds {tuple(main.shape)} parameters, "
                                         f"the model has {tuple(st.main.shape)}")
    st.main = main.to(st.device)
    st.server.load_state(checkpoint.load_server(folder))
    momentum = st.engine.state()["momentum"]
    momentum.copy_(checkpoint.load_momentum(folder, meta, st.first, stop, momentum.shape[1]).to(st.device))
    st.done_rounds = meta["round"]
    st.rows = list(meta.get("metrics") or []) if st.comm.rank == 0 else None

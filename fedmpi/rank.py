"""Setting up one rank: device, data on the device, model, engine, baseline, resumed state."""
from __future__ import annotations

import math
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .config import Config, node_state_names
from .data.partition import node_ranges
from .data.prepare import prepare
from .data.rounds import RoundReader, block_bytes, compact_offsets, placeholder
from .data.shards import open_shards, read_attrs, read_client_ids, read_nodes, read_offsets, read_test
from .data.shuffled import CHUNK_ROWS, ShuffledRows
from .engine import Engine, make_engine
from .engine.batched import activation_bytes, auto_chunk
from .engine.central import cache_path, central_baseline, load_cached
from .engine.models import build_model
from .engine.params import flatten, model_tensors
from .engine.rows import Inputs
from .errors import ConfigError
from .fl import dp, secure, server
from .fl.aggregate import node_weights
from .fl.algorithms import personal_columns
from .fl.sampling import local_selection, sample_count
from .fl.server import ServerOptimizer
from .runtime import checkpoint, memory, watchdog
from .runtime.agree import on_every_rank, on_rank0
from .runtime.comm import Comm, agreed
from .runtime.device import configure_torch, pick_device, pick_threads, ranks_on_device


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
    clock_zero: float = 0.0       # perf_counter() reading at which the run's wall time (t_elapsed) was 0
    client_ids: Optional[list] = None  # each node's client id when the shard file has them, rank 0 only
    most_nodes: int = 1           # the largest rank's node count (the fp16/bf16 wire's dropped-count layout)
    privacy: Optional[dp.Privacy] = None  # DP and secure aggregation: the same plan on every rank
    masks: Optional[object] = None  # secure aggregation: this rank's pairwise masks (fl/secagg.py)
    reader: Optional[RoundReader] = None  # training rows read per round (block above data_resident_bytes)

    @property
    def end(self) -> int:
        """One past this rank's last node id."""
        return self.first + len(self.samples)


def to_device(x: np.ndarray, y: np.ndarray, scale: float, device: torch.device) -> tuple:
    """Inputs in the file's dtype on the device (engine/rows.py: float32 times pixel_scale once gathered),
    int64 labels; held once per rank."""
    return Inputs(torch.from_numpy(x).to(device), scale), torch.from_numpy(y).to(device)


def announce(comm, text: str) -> None:
    """One progress line on rank 0's stdout (startup can take a minute: say what it is doing)."""
    if comm.rank == 0:
        print(text, flush=True)


def plural(n: int, word: str) -> str:
    return word if n == 1 else word + "s"


def ensure_data(cfg: Config, comm) -> Path:
    """Rank 0 prepares the shard file when missing; the others wait for it.

    `fedmpi run` has checked an existing file's structure and test labels on rank 0, and each rank the
    labels of its own nodes (cli.cmd_run): no rank scans the whole file.
    """
    with agreed(comm):  # rank 0: no dataset, not enough memory, a bad file: every rank ends cleanly
        if comm.rank == 0 and not cfg.data_path.exists():
            watchdog.stage("preparing the shard file")
            prepare(cfg)
    return cfg.data_path


def setup(cfg: Config, comm, resumed: Optional[tuple] = None) -> Rank:
    """Load this rank's nodes onto its device and build everything the round loop needs.

    `resumed`: (checkpoint folder, its checked meta.json) to continue from; a checkpoint file any rank
    finds bad ends every rank with that rank's line.
    """
    with agreed(comm):  # a rank without its GPU or with too many threads for its host: every rank ends
        device = pick_device(cfg.device, comm.local_rank)
        threads = pick_threads(cfg.threads, comm.local_size)
    configure_torch(threads)
    path = ensure_data(cfg, comm)
    watchdog.stage("reading this rank's shards")
    train_offsets = read_offsets(path, "train")
    blocks = node_ranges(cfg.nodes, comm.size, train_offsets)  # equal samples (work) per rank, not equal nodes
    mine = blocks[comm.rank]
    attrs = read_attrs(path)
    shape, classes, scale = tuple(attrs["input_shape"]), int(attrs["classes"]), float(attrs.get("pixel_scale", 1.0))
    model = build_model(cfg.model, shape, classes, cfg.seed, cfg.model_args).to(device)
    resident = block_bytes(path, train_offsets, mine) <= cfg.data_resident_bytes
    check_personal_layers(cfg, model)
    check_memory(cfg, comm, device, model, path, mine, shape, resident)
    announce(comm, f"reading the shards of {cfg.nodes} nodes ({comm.size} {plural(comm.size, 'rank')}) from {path}")
    x, y, offsets, counts, reader = training_rows(cfg, path, train_offsets, mine, resident, shape, classes,
                                                  lambda xs, ys: to_device(xs, ys, scale, device))
    local = read_nodes(path, "local_test", mine.start, mine.stop)
    sharing = ranks_on_device(device, comm.local_rank, comm.local_size)
    st = Rank(cfg, comm, device, model, make_engine(cfg, model, x, y, offsets, mine.start, sharing),
              flatten(model_tensors(model)), mine.start, counts,
              node_weights(cfg.aggregation, counts), (*to_device(local.x, local.y, scale, device), local.offsets))
    st.reader = reader
    st.all_weights = node_weights(cfg.aggregation, np.diff(train_offsets))
    st.most_nodes = max(len(b) for b in blocks)
    st.server = server.from_config(cfg)
    st.privacy, st.masks = plan_privacy(cfg, comm)
    if resumed is not None:
        on_every_rank(comm, lambda: restore(st, *resumed, mine.stop))
    if comm.rank == 0:
        watchdog.stage("reading the test set")
        st.test = to_device(*read_test(path), scale, device)
        st.rows, st.client_ids = st.rows or [], read_client_ids(path)
        if cfg.central_epochs:
            def load_all_shards() -> tuple:  # streamed in each epoch's shuffled order, a chunk at a time
                rows = ShuffledRows(path, int(train_offsets[-1]), classes, scale, device)
                return rows, rows.labels

            announce(comm, f"centralized baseline: cached in {cache_path(cfg)}" if load_cached(cfg) else
                     f"centralized baseline: training {cfg.central_epochs} {plural(cfg.central_epochs, 'epoch')} "
                     f"on every node's samples")
            watchdog.stage("training the centralized baseline")
            st.central = central_baseline(cfg, load_all_shards, *st.test, shape, classes, watchdog.progress)
    announce(comm, f"{'resuming at' if st.done_rounds else 'starting'} round {st.done_rounds + 1} of {cfg.rounds}")
    watchdog.stage("set up")
    return st


def training_rows(cfg: Config, path: Path, offsets: np.ndarray, mine: range, resident: bool, shape: tuple,
                  classes: int, put) -> tuple:
    """(x, y, offsets, counts, reader) of this rank's nodes: the whole block on the device, or (its block
    above data_resident_bytes) a one-row placeholder and a RoundReader that reads each round's nodes."""
    counts = np.diff(offsets[mine.start:mine.stop + 1])
    if resident:
        train = read_nodes(path, "train", mine.start, mine.stop)
        return (*put(train.x, train.y), train.offsets, train.counts, None)

    def local_rows(rnd: int) -> np.ndarray:  # as run_round computes the round's rows
        return local_selection(dp.select(cfg, rnd), mine.start, mine.stop) - mine.start

    reader = RoundReader(path, offsets, mine.start, counts, classes, put, local_rows, cfg.rounds)
    return (*placeholder(shape, put), compact_offsets(counts, np.zeros(0, np.int64)), counts, reader)


def plan_privacy(cfg: Config, comm) -> tuple:
    """Collective: the privacy plan, solved on rank 0 (the noise solver takes seconds) and broadcast; an
    unreachable dp_target_epsilon ends every rank with one line. Secure aggregation's key agreement."""
    if cfg.dp == "gaussian" and cfg.dp_noise_multiplier is None:
        watchdog.stage("solving the noise multiplier")
    privacy = comm.bcast(on_rank0(comm, lambda: dp.plan(cfg)))
    for note in privacy.notes:
        announce(comm, f"fedmpi: {note}")
    return privacy, secure.setup_masks(comm) if privacy.secure else None


def check_memory(cfg: Config, comm, device: torch.device, model: torch.nn.Module, path: Path, mine: range,
                 shape: tuple, resident: bool = True) -> None:
    """Every rank's estimated need against its host's (and GPU's) memory, before any shard is read.

    The reports are allgathered, so every rank decides on the same list: a refusal is raised on all
    of them alike (everywhere) and the job ends cleanly with rank 0's line.
    """
    train, local = read_offsets(path, "train"), read_offsets(path, "local_test")
    with open_shards(path) as f:
        test_rows = len(f["test/y"]) if comm.rank == 0 else 0
        pixel_bytes = f["train/x"].dtype.itemsize  # uint8 or float32, checked by validate_shards
    central = min(int(train[-1]), CHUNK_ROWS) if comm.rank == 0 and cfg.central_epochs and load_cached(cfg) is None \
        else 0  # the baseline's rows are streamed, one chunk of its shuffled order at a time
    counts, local_counts = np.diff(train[mine.start:mine.stop + 1]), np.diff(local[mine.start:mine.stop + 1])
    held = int(counts.sum())
    if not resident:  # read per round: this round's nodes and the next one's, at most the largest of them
        largest = np.sort(counts)[::-1][:sample_count(cfg.nodes, cfg.fraction)]
        held = min(held, 2 * int(largest.sum()))
    rows = memory.RankRows(len(mine), held, int(local_counts.sum()), int(counts.max(initial=0)),
                           int(local_counts.max(initial=0)), test_rows, central)
    sample = torch.zeros(1, *shape, device=device)
    chunk = (cfg.chunk_nodes or auto_chunk(model, sample, cfg.batch_size, len(mine))) if cfg.engine == "batched" else 1
    workers = torch.get_num_threads() if cfg.engine == "batched" and device.type == "cpu" else 1
    work = memory.Work(math.prod(sample.shape[1:]), sum(p.numel() for p in model.parameters()),
                       activation_bytes(model, sample), min(chunk, max(1, len(mine))), workers,
                       cfg.batch_size, cfg.local_epochs, node_state=node_state_names(cfg).count("momentum"),
                       control=cfg.algorithm == "scaffold", pixel_bytes=pixel_bytes,
                       personal=cfg.personalize == "ditto",
                       own_layers=len(personal_columns([(n, p.numel()) for n, p in model.named_parameters()],
                                                       cfg.personal_layers)) if cfg.personal_layers else 0)
    gpu = device.type == "cuda"
    report = memory.Report(comm.rank, platform.node(), str(device) if gpu else "cpu",
                           memory.rank_parts(rows, work, gpu), memory.host_available(),
                           torch.cuda.mem_get_info(device)[0] if gpu else None, memory.host_staging(rows, work))
    problem = memory.refusal(comm.allgather(report))
    if problem:
        err = ConfigError(problem)
        err.everywhere = True  # decided from the allgathered reports: the same on every rank
        raise err


def check_personal_layers(cfg: Config, model) -> None:
    """personal_layers name parameters of this model, checked before any node's data is read; every rank
    builds the same model, so every rank refuses alike."""
    if cfg.personal_layers:
        try:
            personal_columns([(n, p.numel()) for n, p in model.named_parameters()], cfg.personal_layers)
        except ConfigError as err:
            err.everywhere = True
            raise


def restore(st: Rank, folder: Path, meta: dict, stop: int) -> None:
    """Continue from a checkpoint: main model, every local node's kept state (momentum, SCAFFOLD's c_i),
    rounds done, metrics."""
    nodes = st.engine.state()  # {} for a stateless run, whose checkpoint has no node files
    scaffold = "control" in nodes
    main, state = checkpoint.load_main(folder, st.main, st.server.STATE_NAMES if meta["round"] else (), scaffold)
    st.main = main.to(st.device)
    if scaffold:
        st.engine.server_control.copy_(state.pop("control").to(st.device))
    st.server.load_state(state, st.device)  # on the main model's device, or its step mixes devices
    row_values = sum(t.shape[1] for t in nodes.values())  # a node file's values per node, all tensors together
    for key, tensor in nodes.items():
        tensor.copy_(checkpoint.load_momentum(folder, meta, st.first, stop, tensor, key, row_values=row_values)
                     .to(st.device))
    st.done_rounds = meta["round"]
    try:
        dp.resume(st.privacy, meta)
    except ValueError as err:
        raise checkpoint.CheckpointError(f"checkpoint file {folder / 'meta.json'} is corrupt: {err}") from None
    st.rows = list(meta.get("metrics") or []) if st.comm.rank == 0 else None

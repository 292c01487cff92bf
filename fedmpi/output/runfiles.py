"""What a run writes besides checkpoints: config.yaml, run.json, central.json, the metrics rows and their
one-line summaries, nodes.csv, and the final model.pt; all on rank 0, all atomic."""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from .. import __version__
from ..config import config_text
from ..engine.params import load_flat, model_tensors, reset_counters
from ..runtime import checkpoint, watchdog
from ..runtime.agree import on_rank0
from .metrics import MetricsWriter, describe_round, write_atomic, write_nodes_csv
from .tensorboard import TensorBoardWriter

if TYPE_CHECKING:  # the rank's state and a round's result, only named here
    from ..rank import Rank
    from ..rounds import RoundResult


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

"""Checkpoints: written by all ranks together, read back at any rank count.

RUN_DIR/checkpoint/ holds
  meta.json           round, config hash, metrics rows so far, the file list
  main.pt             the main model (flat float32) and the server optimizer's state
  nodes-A-B.pt        momentum of nodes A..B-1 ([B-A, P]), one file per writing rank

Every node's randomness is derived from (seed, node, round), so no RNG state needs saving.
A new checkpoint is built in checkpoint.tmp/ and swapped in by renames; until the swap is
complete the previous one (checkpoint/ or, mid-swap, checkpoint.old/) stays valid.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import Config
from ..errors import FedmpiError

# Keys that do not change the result: a resumed run may change them (e.g. rounds to run longer).
FREE_KEYS = ("rounds", "eval_every", "device", "threads", "engine", "checkpoint_every", "data_dir", "stall_timeout_s")
STOP_EXIT_CODE = 75  # stopped early by SIGTERM/SIGUSR1, checkpoint written: resume with --resume


class CheckpointError(FedmpiError):
    """A checkpoint is missing, corrupt, or from another config."""


def identity(cfg: Config) -> str:
    """Hash of every key that shapes the result."""
    return cfg.digest(tuple(k for k in cfg.to_dict() if k not in FREE_KEYS))


def _sync_write(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def save(run_dir: Path, comm, cfg: Config, rnd: int, main: torch.Tensor, server: dict, momentum: torch.Tensor,
         first: int, rows: Optional[list]) -> None:
    """Collective: every rank writes its nodes' state, rank 0 the rest, then rank 0 swaps it in."""
    tmp, final, old = run_dir / "checkpoint.tmp", run_dir / "checkpoint", run_dir / "checkpoint.old"
    if comm.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    comm.barrier()
    name = f"nodes-{first}-{first + len(momentum)}.pt"
    _sync_write(tmp / name, lambda f: torch.save({"first": first, "momentum": momentum.cpu()}, f))
    names = comm.gather(name)
    if comm.rank == 0:
        state = {"main": main.cpu(), "server": {k: v.cpu() for k, v in server.items()}}
        _sync_write(tmp / "main.pt", lambda f: torch.save(state, f))
        meta = {"round": rnd, "identity": identity(cfg), "node_files": names, "metrics": rows}
        _sync_write(tmp / "meta.json", lambda f: f.write(json.dumps(meta).encode()))
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    comm.barrier()


def find(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint folder, if any."""
    for name in ("checkpoint", "checkpoint.old"):
        if (run_dir / name / "meta.json").is_file():
            return run_dir / name
    return None


def load_meta(run_dir: Path, cfg: Config) -> tuple[Path, dict]:
    """The checkpoint's folder and meta.json, refused when corrupt or made with another config."""
    folder = find(run_dir)
    if folder is None:
        raise CheckpointError(f"--resume {run_dir}: no checkpoint in {run_dir}/checkpoint")
    try:
        meta = json.loads((folder / "meta.json").read_text())
        rnd, ident = int(meta["round"]), meta["identity"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {folder}/meta.json is corrupt ({type(err).__name__})") from None
    if ident != identity(cfg):
        raise CheckpointError(f"checkpoint {folder} was made with another config (keys other than "
                              f"{', '.join(FREE_KEYS)} differ); start a new run directory instead")
    return folder, dict(meta, round=rnd)


def _load(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file
        raise CheckpointError(f"checkpoint file {path} is unreadable ({type(err).__name__})") from None


def load_main(folder: Path) -> torch.Tensor:
    return _load(folder / "main.pt")["main"]


def load_server(folder: Path) -> dict:
    """The server optimizer's tensors (empty for plain FedAvg)."""
    return _load(folder / "main.pt").get("server", {})


def load_momentum(folder: Path, meta: dict, first: int, stop: int, size: int) -> torch.Tensor:
    """Momentum of nodes first..stop-1, assembled from whichever rank files hold them."""
    out, filled = torch.zeros(stop - first, size), torch.zeros(stop - first, dtype=torch.bool)
    for name in meta["node_files"]:
        a, b = (int(v) for v in name[len("nodes-"):-len(".pt")].split("-"))
        if b <= first or a >= stop:
            continue
        block = _load(folder / name)["momentum"]
        if block.shape != (b - a, size):
            raise CheckpointError(f"checkpoint file {folder / name} holds {tuple(block.shape)}, expected {(b - a, size)}")
        lo, hi = max(a, first), min(b, stop)
        out[lo - first:hi - first] = block[lo - a:hi - a]
        filled[lo - first:hi - first] = True
    if not filled.all():
        raise CheckpointError(f"checkpoint {folder} lacks the optimizer state of some of nodes {first}..{stop - 1}")
    return out

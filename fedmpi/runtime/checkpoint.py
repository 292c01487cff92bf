"""Checkpoints: written by all ranks together, read back at any rank count, checked as untrusted input.

RUN_DIR/checkpoint/ holds
  meta.json           round, config hash, metrics rows so far, the file list
  main.pt             the main model (flat float32), the server optimizer's state (float64) and,
                      with algorithm scaffold, the server's control variate c ('control', float32)
  nodes-A-B.pt        the per-node state of nodes A..B-1, one file per writing rank: momentum ([B-A, P])
                      and, with scaffold, their control variates c_i ('control'); none when the run
                      keeps no per-node state (local_state reset, or momentum 0, without scaffold)

Every node's randomness is derived from (seed, node, round), so no RNG state needs saving.
A new checkpoint is built in checkpoint.tmp/ (each file fsynced) and swapped in by renames; until the
swap is complete the previous one (checkpoint/ or, mid-swap, checkpoint.old/) stays valid. A failed
write on any rank removes checkpoint.tmp/ and ends every rank with one line naming the file.

Reading: every file must be a regular file of bounded size (a FIFO would block the open forever),
meta.json is checked field by field before any tensor is read, and tensors load with
weights_only=True and must have the shapes and dtypes this run expects.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ..config import Config, node_state_names
from ..errors import FedmpiError, OutputError
from ..output.metrics import fsync_dir, write_atomic
from .agree import on_every_rank, on_rank0

if TYPE_CHECKING:  # torch is imported where tensors are touched: meta.json is checked before it loads
    import torch

# Keys that do not change the result: a resumed run may change them (e.g. rounds to run longer).
FREE_KEYS = ("rounds", "eval_every", "dp_epsilon_every", "device", "threads", "engine", "checkpoint_every", "data_dir",
             "tensorboard", "stall_timeout_s", "node_metrics_every", "data_resident_bytes")
STOP_EXIT_CODE = 75  # stopped early by SIGTERM/SIGUSR1, checkpoint written: resume with --resume
META_KEYS = ("round", "identity", "node_files", "metrics")
META_MAX_BYTES = 64 << 20  # about 90,000 rounds of metrics rows
TORCH_SLACK = 1 << 20      # torch.save's zip framing and pickled structure around the tensor bytes
NODE_FILE = re.compile(r"nodes-(\d{1,12})-(\d{1,12})\.pt")


class CheckpointError(FedmpiError):
    """A checkpoint is missing, corrupt, or from another config."""


def identity(cfg: Config) -> str:
    """Hash of every key that shapes the result."""
    return cfg.digest(tuple(k for k in cfg.to_dict() if k not in FREE_KEYS))


def short(value: Any, limit: int = 40) -> str:
    """repr(value), cut to `limit` characters: an error line quotes untrusted values, never all of one."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --- writing -----------------------------------------------------------------------------------------

def tensor_bytes(obj: Any) -> bytes:
    """torch.save of `obj` into memory, so the file itself is written (and fails) in one place."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save(run_dir: Path, comm, cfg: Config, rnd: int, main: torch.Tensor, server: dict,
         node_state: dict[str, torch.Tensor], first: int, stop: int, rows: Optional[list],
         control: Optional[torch.Tensor] = None, extra: Optional[dict] = None) -> None:
    """Collective: every rank writes its nodes' state (when the run keeps any), rank 0 the rest, then
    rank 0 swaps it in. `control`: SCAFFOLD's server control variate c, kept in main.pt; `extra`: more
    meta.json entries (the adaptive clip of DP)."""
    tmp = run_dir / "checkpoint.tmp"
    name = f"nodes-{first}-{stop}.pt"
    try:
        on_rank0(comm, lambda: _fresh_dir(tmp))
        block = {"first": first, **{k: v.cpu() for k, v in node_state.items()}}
        names = on_every_rank(comm, lambda: _write(tmp / name, block) if node_state else None)
        names = [n for n in names if n is not None]
        state = {"main": main.cpu(), "server": {k: v.cpu() for k, v in server.items()}}
        if control is not None:
            state["control"] = control.cpu()
        meta = {"round": rnd, "identity": identity(cfg), "node_files": names, "metrics": rows, **(extra or {})}
        on_rank0(comm, lambda: _swap_in(run_dir, tmp, state, meta))
    except FedmpiError:
        if comm.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fresh_dir(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)  # left by a job killed while writing
    try:
        tmp.mkdir(parents=True)
    except OSError as err:
        raise OutputError(f"cannot write checkpoint {tmp}: {err.strerror}; "
                          f"the last complete checkpoint is kept") from None


def _write(path: Path, obj: Any) -> str:
    try:
        write_atomic(path, tensor_bytes(obj) if not isinstance(obj, str) else obj)
    except OutputError as err:
        raise OutputError(f"{err}; the last complete checkpoint is kept") from None
    return path.name


def _swap_in(run_dir: Path, tmp: Path, state: dict, meta: dict) -> None:
    """Rank 0: main.pt and meta.json into tmp, then tmp becomes checkpoint/ (the old one kept until then)."""
    final, old = run_dir / "checkpoint", run_dir / "checkpoint.old"
    _write(tmp / "main.pt", state)
    _write(tmp / "meta.json", json.dumps(meta))
    try:
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
    except OSError as err:
        raise OutputError(f"cannot rename {tmp} to {final}: {err.strerror}; "
                          f"the last complete checkpoint is kept") from None
    shutil.rmtree(old, ignore_errors=True)
    fsync_dir(run_dir)


# --- reading: files ----------------------------------------------------------------------------------

def find(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint folder, if any."""
    for name in ("checkpoint", "checkpoint.old"):
        if (run_dir / name / "meta.json").exists():
            return run_dir / name
    return None


def read_bounded(path: Path, limit: int) -> bytes:
    """The bytes of `path`, refused unless it is a regular file of at most `limit` bytes."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the open, a device never end
            raise CheckpointError(f"checkpoint file {path} is not a regular file")
        # O_NONBLOCK: a file swapped for a FIFO after the stat still does not block; fstat then refuses it.
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise CheckpointError(f"checkpoint file {path} is not a regular file")
            if info.st_size > limit:
                raise CheckpointError(f"checkpoint file {path} holds {info.st_size:,} bytes, more than the "
                                      f"{limit:,} a checkpoint of this run can")
            data = f.read(limit + 1)
    except OSError as err:
        raise CheckpointError(f"checkpoint file {path} cannot be read ({err.strerror})") from None
    if len(data) > limit:
        raise CheckpointError(f"checkpoint file {path} grew beyond {limit:,} bytes while being read")
    return data


def _load(path: Path, limit: int) -> Any:
    import torch

    data = read_bounded(path, limit)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file, or one that asks to run code
        raise CheckpointError(f"checkpoint file {path} is unreadable ({type(err).__name__})") from None


def _check_tensor(value: Any, shape: tuple, dtype: Any, what: str) -> torch.Tensor:
    import torch

    if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
        raise CheckpointError(f"{what} is not a tensor (got {type(value).__name__})")
    if tuple(value.shape) != shape or value.dtype != dtype:
        raise CheckpointError(f"{what} is {value.dtype} {tuple(value.shape)}, expected {dtype} {shape}")
    if not bool(torch.isfinite(value).all()):
        raise CheckpointError(f"{what} holds NaN or Inf")
    return value


# --- reading: meta.json ------------------------------------------------------------------------------

def load_meta(run_dir: Path, cfg: Config) -> tuple[Path, dict]:
    """The checkpoint's folder and meta.json, every field checked; refused when made with another config."""
    folder = find(run_dir)
    if folder is None:
        raise CheckpointError(f"--resume {run_dir}: no checkpoint in {run_dir}/checkpoint")
    path = folder / "meta.json"
    try:
        meta = json.loads(read_bounded(path, META_MAX_BYTES))
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"checkpoint file {path} is corrupt (not JSON: {type(err).__name__})") from None
    check_meta(meta, cfg, path)
    return folder, meta


def check_meta(meta: Any, cfg: Config, path: Path) -> None:
    """Every field of a meta.json against the run's config; CheckpointError naming the file and field."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint file {path} is corrupt: {what}")

    if not isinstance(meta, dict):
        raise bad(f"not a JSON object (got {type(meta).__name__})")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise bad(f"no '{missing[0]}' field")
    rnd, ident = meta["round"], meta["identity"]
    if type(rnd) is not int or rnd < 0:
        raise bad(f"'round' must be an integer >= 0, got {short(rnd)}")
    if not isinstance(ident, str):
        raise bad(f"'identity' must be a string, got {short(ident)}")
    if ident != identity(cfg):
        raise CheckpointError(f"checkpoint {path.parent} was made with another config (keys other than "
                              f"{', '.join(FREE_KEYS)} differ); start a new run directory instead")
    if rnd > cfg.rounds:
        raise CheckpointError(f"checkpoint {path.parent} holds {rnd} rounds, more than rounds={cfg.rounds}: "
                              f"resume with --set rounds={rnd} or more")
    if node_state_names(cfg):
        check_node_files(meta["node_files"], cfg.nodes, bad)
    elif meta["node_files"] != []:
        raise bad(f"'node_files' must be [] for a run that keeps no per-node state, got {short(meta['node_files'])}")
    check_rows(meta["metrics"], rnd, bad)


def check_node_files(names: Any, nodes: int, bad) -> list[tuple[int, int]]:
    """node_files must be nodes-A-B.pt names whose ranges tile 0..nodes-1 exactly; returns the ranges."""
    if not isinstance(names, list) or not names:
        raise bad(f"'node_files' must be a non-empty list of nodes-A-B.pt names, got {short(names)}")
    spans = []
    for name in names:
        match = NODE_FILE.fullmatch(name) if isinstance(name, str) else None
        if match is None:
            raise bad(f"'node_files' holds {short(name)}, not a nodes-A-B.pt name")
        spans.append((int(match[1]), int(match[2])))
    at = 0
    for a, b in sorted(spans):
        if a != at or b <= a:
            raise bad(f"'node_files' do not cover nodes 0..{nodes - 1} once each (at node {at}: nodes-{a}-{b}.pt)")
        at = b
    if at != nodes:
        raise bad(f"'node_files' end at node {at}, the run has {nodes} nodes")
    return spans


def check_rows(rows: Any, rnd: int, bad) -> None:
    """metrics must be one JSON object per round done, with "round" 1..rnd in order."""
    if not isinstance(rows, list):
        raise bad(f"'metrics' must be a list of rows, got {type(rows).__name__}")
    if len(rows) != rnd:
        raise bad(f"'metrics' holds {len(rows)} rows for {rnd} rounds")
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or type(row.get("round")) is not int or row["round"] != i:
            raise bad(f"'metrics' row {i} is not a JSON object with \"round\": {i} (got {short(row)})")


# --- reading: tensors --------------------------------------------------------------------------------

def load_main(folder: Path, like: torch.Tensor, state_names: tuple[str, ...],
              control: bool = False) -> tuple[torch.Tensor, dict]:
    """main.pt: the main model (shaped and typed like `like`) and the server state (`state_names`, float64);
    with `control` (SCAFFOLD) the server's control variate too, in the returned dict as 'control'."""
    import torch

    path, size = folder / "main.pt", like.numel()
    limit = size * (like.element_size() * (1 + control) + 8 * len(state_names)) + TORCH_SLACK
    state = _load(path, limit)
    if not isinstance(state, dict) or "main" not in state or "server" not in state:
        raise CheckpointError(f"checkpoint file {path} is corrupt: not a dict with 'main' and 'server'")
    main = _check_tensor(state["main"], (size,), like.dtype, f"checkpoint file {path}: 'main'")
    server = state["server"]
    if not isinstance(server, dict) or set(server) != set(state_names):
        got = sorted(map(str, server)) if isinstance(server, dict) else type(server).__name__
        raise CheckpointError(f"checkpoint file {path}: 'server' must hold {list(state_names)} for this "
                              f"run's server_opt, got {short(got)}")
    for key, value in server.items():
        _check_tensor(value, (size,), torch.float64, f"checkpoint file {path}: 'server' {key!r}")
    if control:
        if "control" not in state:
            raise CheckpointError(f"checkpoint file {path} lacks 'control', the server control variate of scaffold")
        server = {**server, "control": _check_tensor(state["control"], (size,), like.dtype,
                                                     f"checkpoint file {path}: 'control'")}
    return main, server


def load_momentum(folder: Path, meta: dict, first: int, stop: int, like: torch.Tensor, key: str = "momentum",
                  tensors: int = 1, row_values: Optional[int] = None) -> torch.Tensor:
    """Per-node state `key` (momentum, scaffold's control, kept buffers) of nodes first..stop-1 (typed like
    `like`, [*, width]), from whichever rank files hold them; each file holds `tensors` such tensors,
    `row_values` values per node in all (default: `tensors` times this one's width)."""
    import torch

    size = like.shape[1]
    out = torch.zeros(stop - first, size, dtype=like.dtype)
    filled = torch.zeros(stop - first, dtype=torch.bool)
    for name in meta["node_files"]:
        a, b = (int(v) for v in NODE_FILE.fullmatch(name).groups())
        if b <= first or a >= stop:
            continue
        path = folder / name
        per_node = tensors * size if row_values is None else row_values
        block = _load(path, (b - a) * per_node * like.element_size() + TORCH_SLACK)
        if not isinstance(block, dict) or type(block.get("first")) is not int or block["first"] != a \
                or key not in block:
            raise CheckpointError(f"checkpoint file {path} is corrupt: not a dict with 'first': {a} and {key!r}")
        block = _check_tensor(block[key], (b - a, size), like.dtype, f"checkpoint file {path}: {key!r}")
        lo, hi = max(a, first), min(b, stop)
        out[lo - first:hi - first] = block[lo - a:hi - a]
        filled[lo - first:hi - first] = True
    if not filled.all():
        raise CheckpointError(f"checkpoint {folder} lacks the optimizer state of some of nodes {first}..{stop - 1}")
    return out

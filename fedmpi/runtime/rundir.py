"""The run directory: one job at a time (a lock), nothing of an earlier run replaced unasked.

Rank 0 calls `open_run_dir` before anything of the run is written: it takes RUN_DIR/.lock, checks
that the directory is writable and what it holds, and on resume that the config and the checkpoint
may be continued. Every refusal is one line; the caller broadcasts it so every rank ends.
"""
from __future__ import annotations

import fcntl
import os
import platform
import shutil
import stat
import sys
import time
from pathlib import Path
from typing import Optional

from ..config import Config, load_config
from ..errors import ConfigError, OutputError
from . import checkpoint

LOCK_NAME = ".lock"
# What `fedmpi run` writes into a run directory; a new run removes the previous run's copies first.
RUN_FILES = ("model.pt", "metrics.jsonl", "metrics.csv", "nodes.csv", "central.json", "run.json", "config.yaml",
             "checkpoint", "checkpoint.old", "checkpoint.tmp", "tensorboard")
MAX_LISTED = 4  # changed keys quoted in a refused resume; the rest are counted

_held: list[int] = []  # descriptors of the locks this process holds: a lock lasts until the process ends


def open_run_dir(run_dir: Path, cfg: Config, resume: bool, overwrite: bool) -> Optional[tuple[Path, dict]]:
    """Rank 0: lock RUN_DIR and check it; returns the checkpoint folder and meta.json when resuming."""
    flag = "--resume" if resume else "--out"
    if not resume:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"--out {run_dir}: cannot write there ({err.strerror})") from None
    lock(run_dir, flag)
    check_writable(run_dir, flag)
    if resume:
        check_resume_config(run_dir, cfg)
        return checkpoint.load_meta(run_dir, cfg)
    if checkpoint.find(run_dir) is not None and not (run_dir / "model.pt").exists() and not overwrite:
        raise ConfigError(f"--out {run_dir} holds a checkpoint of an unfinished run: continue it with "
                          f"--resume {run_dir}, replace it with --overwrite, or choose another --out")
    if (run_dir / "model.pt").exists() and not overwrite:
        raise ConfigError(f"--out {run_dir} holds a finished run (model.pt): replace it with --overwrite, "
                          f"or choose another --out")
    return None


def lock(run_dir: Path, flag: str) -> None:
    """Hold an exclusive flock on RUN_DIR/.lock until this process ends (the kernel drops it on any death)."""
    path = run_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        raise ConfigError(f"{flag} {run_dir}: cannot write there ({path}: {err.strerror})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:  # never truncate a file linked from elsewhere
        os.close(fd)
        raise ConfigError(f"{flag} {run_dir}: {path} is not a plain file; remove it")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = holder_of(fd)
        os.close(fd)
        raise ConfigError(f"{flag} {run_dir} is in use by another fedmpi job ({holder}); wait for it to end, "
                          f"or choose another run directory") from None
    except OSError as err:  # ENOLCK, EOPNOTSUPP, ENOSYS: some NFS and Lustre mounts offer no locks
        print(f"fedmpi: warning: {flag} {run_dir}: its file system refuses locks ({err.strerror}); "
              f"nothing stops a second job from using this run directory", file=sys.stderr, flush=True)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {platform.node()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode(), 0)
    except OSError as err:
        os.close(fd)
        raise ConfigError(f"{flag} {run_dir}: cannot write there ({path}: {err.strerror})") from None
    _held.append(fd)


def holder_of(fd: int) -> str:
    """The first line of a lock file, printable and short (another user's job may have written it)."""
    try:
        text = os.pread(fd, 200, 0).decode("ascii", "replace")
    except OSError:
        text = ""
    line = "".join(c if c.isprintable() else "?" for c in text.split("\n")[0]).strip()
    return line[:120] or "holder unknown"


def check_writable(run_dir: Path, flag: str) -> None:
    """A file can be created in RUN_DIR (a lock file there may be writable in a read-only directory)."""
    probe = run_dir / f".write-test.{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"{flag} {run_dir}: cannot write there ({err.strerror})") from None


def check_resume_config(run_dir: Path, cfg: Config) -> None:
    """--set on resume may change only checkpoint.FREE_KEYS: the message names the others, old and new."""
    saved = load_config(str(run_dir / "config.yaml"))
    changed = [k for k in cfg.to_dict() if k not in checkpoint.FREE_KEYS and getattr(saved, k) != getattr(cfg, k)]
    if not changed:
        return
    listed = [f"{k} {checkpoint.short(getattr(saved, k))} -> {checkpoint.short(getattr(cfg, k))}"
              for k in changed[:MAX_LISTED]]
    more = f" and {len(changed) - MAX_LISTED} more" if len(changed) > MAX_LISTED else ""
    raise ConfigError(f"--resume {run_dir}: --set changes {', '.join(listed)}{more}, which the checkpoint "
                      f"depends on; a resumed run may change only {', '.join(checkpoint.FREE_KEYS)} "
                      f"(nothing was written)")


def clear_previous(run_dir: Path) -> None:
    """Rank 0, a new run: remove what an earlier run left (allowed by then: crashed, or --overwrite)."""
    stale = [run_dir / name for name in RUN_FILES] + list(run_dir.glob(".*.tmp"))
    for path in stale:
        try:
            _remove(path)
        except OSError as err:
            raise OutputError(f"cannot remove {path} of the previous run: {err.strerror}") from None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.is_symlink() or path.exists():  # a file, a link, or a FIFO or socket in the way
        path.unlink()

"""Rounds started one at a time by tools/bench_peers.py, through two small files in a control folder.

A paced process calls `wait(k)` before round k: its announcing process (rank 0) writes k to `ready`,
then every process polls `go` until it reads k or more. The benchmark writes `go` only while every
other contender is idle, so contenders never overlap, and the wait is outside each round's time.
Standard library only: the drivers import this in their own virtual environments.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

ENV = "FEDMPI_BENCH_CTL"   # the control folder; unset: no pacing (a driver run by hand)
POLL_S = 0.02
IDLE_LIMIT_S = 3 * 3600    # a benchmark that vanished must not leave processes waiting for ever


def write_int(path: Path, value: int) -> None:
    """Replace `path` with the number, so a reader sees the old value or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{value}\n")
    os.replace(tmp, path)


def read_int(path: Path) -> int:
    """The number in `path`, or 0 while it is missing or unreadable."""
    try:
        return int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


class Pacer:
    """wait(k): announce that this process is ready for round k, then block until the benchmark says go."""

    def __init__(self, ctl: Optional[Path], announce: bool, idle_limit_s: float = IDLE_LIMIT_S) -> None:
        self.ctl, self.announce, self.idle_limit_s = ctl, announce, idle_limit_s

    @classmethod
    def from_env(cls, announce: bool) -> "Pacer":
        """The pacer of the control folder in $FEDMPI_BENCH_CTL (a no-op when unset)."""
        ctl = os.environ.get(ENV)
        return cls(Path(ctl) if ctl else None, announce)

    def wait(self, k: int) -> None:
        if self.ctl is None:
            return
        if self.announce:
            write_int(self.ctl / "ready", k)
        deadline = time.monotonic() + self.idle_limit_s
        while read_int(self.ctl / "go") < k:
            if time.monotonic() > deadline:
                raise SystemExit(f"pacing: no go for round {k} in {self.ctl} after {self.idle_limit_s:.0f} s; "
                                 "the benchmark is gone")
            time.sleep(POLL_S)

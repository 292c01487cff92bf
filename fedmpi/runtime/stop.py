"""Graceful stop: SIGTERM or SIGUSR1 only set a flag.

The ranks agree on it through the round's own Allreduce (a stop vote in the buffer), so a
signal reaching one rank, or every rank two or three times (scancel does that), stops all of
them after the same round, with a checkpoint, and no extra round trip.
"""
from __future__ import annotations

import signal
import sys
from typing import Optional


class StopFlag:
    """Remembers the first stop signal; later ones change nothing (the handler is idempotent)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signum: Optional[int] = None

    def install(self) -> "StopFlag":
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:  # noqa: ANN001 - signature fixed by signal
        if self.signum is None:
            self.signum = signum
            print(f"fedmpi: got {signal.Signals(signum).name}; stopping after this round", file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        return self.signum is not None

"""Stopping on a signal: SIGTERM, SIGUSR1 and SIGINT (Ctrl-C) only set a flag.

A signal that arrives while this rank trains interrupts the engines within one training step
(`Interrupted`); the rank then votes "abandon" in the round's own Allreduce, so every rank drops
that round together and checkpoints the last complete one: the stop takes seconds, not the rest of
a long round. A signal outside training is a vote to stop after the round. Repeated signals change
nothing (scancel sends two or three); a SIGINT while a stop is pending aborts the job at once.
Once the stop is settled every further signal is ignored, so a late SIGTERM during the exit cannot
turn exit code 75 into death by signal (a batch script would then not requeue the job).
"""
from __future__ import annotations

import signal
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

INTERRUPT_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


class Interrupted(Exception):
    """A stop signal arrived while this rank trained: the round is abandoned."""


class StopFlag:
    """Remembers the first stop signal; `check` raises Interrupted with it during training."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, abort: Optional[Callable[[], None]] = None) -> None:
        self.signum: Optional[int] = None
        self.training = False
        self._abort = abort  # called on a SIGINT while a stop is already pending

    def install(self) -> "StopFlag":
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:  # noqa: ANN001 - signature fixed by signal
        if self.signum is None:
            self.signum = signum
        elif signum == signal.SIGINT and self._abort is not None:
            self._abort()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """While inside, `check` raises Interrupted once a signal has come (local training)."""
        self.training = True
        try:
            yield
        finally:
            self.training = False

    def check(self) -> None:
        """Called between training steps, on any thread: raise Interrupted when a stop is pending."""
        if self.training and self.signum is not None:
            raise Interrupted(f"stopped by {signal.Signals(self.signum).name} during training")

    def settle(self) -> None:
        """The stop (or the end) is decided: ignore every further signal until the process exits."""
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


def abort_on_second_interrupt(comm) -> Callable[[], None]:
    """The abort for StopFlag: one line for the job, then every rank ends with exit code 130."""

    def abort() -> None:
        if comm.size > 1 and comm.rank != 0:
            time.sleep(1.0)  # rank 0 was interrupted too and aborts first: one line, not one per rank
        where = f" (rank {comm.rank}/{comm.size})" if comm.size > 1 else ""
        print(f"fedmpi: interrupted again{where}; aborting the job without a checkpoint of this round",
              file=sys.stderr, flush=True)
        comm.abort(INTERRUPT_EXIT_CODE)

    return abort

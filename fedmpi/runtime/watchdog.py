"""The watchdog: a rank that makes no progress for stall_timeout_s ends the job with one line.

Every rank reports progress (each training step, each stage of setup and of a round) through
`stage()` and `progress()`; a thread checks it every `interval` seconds. A rank stuck outside a
collective (blocked I/O, a stage that never returns) reports itself. A rank waiting inside a
collective is not at fault: it names the rank that is from the heartbeat files each rank's thread
writes into RUN_DIR/.heartbeat/ (the run directory is shared across nodes, as the checkpoints are).
A frozen (SIGSTOP) or dead process stops writing its heartbeat; a rank that works, however slowly
(rank 0 preparing the shard file or training the baseline while the others wait), keeps both its
heartbeat and its progress fresh and trips nothing. The first rank to create
RUN_DIR/.heartbeat/stalled (O_EXCL) prints the line; MPI_Abort then ends every rank.

A waiting rank reads the heartbeats of its next NEIGHBOURS ranks only (and rank 0 all of them, to
catch every rank waiting in a different collective), so the reads stay bounded at any rank count.
A C-level timer (Python's faulthandler) backs the thread up: when the thread itself cannot run (C
code holding the interpreter lock: HDF5 opening a FIFO does that), the process ends, printing where
it was stuck, BACKSTOP_S after the thread would have fired.
"""
from __future__ import annotations

import atexit
import faulthandler
import json
import os
import stat
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

STALL_EXIT_CODE = 124  # as timeout(1): nothing moved for stall_timeout_s
FOLDER = ".heartbeat"  # inside the run directory; removed on a normal end
MARKER = "stalled"     # created O_EXCL by the one rank that prints the line
NEIGHBOURS = 4
BACKSTOP_S = 10.0
CLAIMED_WAIT_S = 2.0   # a rank that lost the O_EXCL race waits this long for the winner's abort


def interval_for(timeout: float) -> float:
    """Seconds between checks and heartbeat writes: a tenth of the timeout, within [0.2, 10]. A stage
    change also writes the heartbeat, at once and on the calling thread, so a rank that blocks right
    after it (C code holding the interpreter lock) is named in the stage it blocked in."""
    return min(10.0, max(0.2, timeout / 10))


@dataclass
class Beat:
    """One heartbeat file: who, where in the run, and when it last moved (unix times)."""

    rank: int
    pid: int
    stage: str
    round: Optional[int]
    waiting: Optional[str]  # the collective this rank waits in, if any
    progress: float
    written: float

    def describe(self) -> str:
        return describe(self.stage, self.round, self.waiting)


def describe(stage: str, rnd: Optional[int], waiting: Optional[str]) -> str:
    """'training, round 3' or 'evaluating, round 3; waiting in gather'."""
    return stage + (f", round {rnd}" if rnd is not None else "") + (f"; waiting in {waiting}" if waiting else "")


def read_beat(path: Path) -> Optional[Beat]:
    """A heartbeat file's contents, or None when absent, not a small regular file, or malformed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = json.loads(os.read(fd, 4096))
        beat = Beat(**{k: data[k] for k in Beat.__dataclass_fields__})
    except (OSError, ValueError, TypeError, KeyError):
        return None
    finally:
        os.close(fd)
    ok = (isinstance(beat.rank, int) and isinstance(beat.stage, str) and len(beat.stage) < 200
          and isinstance(beat.round, (int, type(None))) and isinstance(beat.waiting, (str, type(None)))
          and all(isinstance(v, (int, float)) for v in (beat.progress, beat.written)))
    return beat if ok else None


class Watchdog:
    """One rank's progress clock, heartbeat writer and stall check (a daemon thread)."""

    def __init__(self, folder: Optional[Path], rank: int, size: int, timeout: float,
                 abort: Callable[[int], None], backstop: bool = True) -> None:
        self.folder, self.rank, self.size, self.timeout = folder, rank, size, timeout
        self.interval, self.abort, self.backstop = interval_for(timeout), abort, backstop
        self.stage, self.round, self.waiting = "starting", None, None
        self.last = time.monotonic()
        self.wrote = False  # this rank's own heartbeat reached the folder: the folder works
        self._closed = threading.Event()
        self._writing = threading.Lock()  # the thread and a stage change share the temp file
        self._thread = threading.Thread(target=self._run, name="fedmpi-watchdog", daemon=True)

    @property
    def path(self) -> Optional[Path]:
        return None if self.folder is None else self.folder / f"rank-{self.rank}.json"

    def start(self) -> "Watchdog":
        if self.rank == 0 and self.folder is not None:
            self._clear_leftovers()
        self._arm()
        self._write_beat()
        self._thread.start()
        return self

    def set_stage(self, stage: str, rnd: Optional[int] = None) -> None:
        """A few per round: each writes the heartbeat (one small file) before the stage's work starts."""
        self.stage, self.round, self.last = stage, rnd, time.monotonic()
        if not self._closed.is_set():
            self._arm()
            self._write_beat()

    def _run(self) -> None:
        while not self._closed.wait(self.interval):
            self._check()

    def _check(self) -> None:
        """One round of the thread: re-arm the backstop, fire on a stall, write the heartbeat."""
        self._arm()
        idle = time.monotonic() - self.last
        if idle >= self.timeout and self.waiting is None:
            self._fire(self.rank, describe(self.stage, self.round, None), idle)
        self._write_beat()
        if idle >= self.timeout and self.waiting is not None:
            culprit = self._culprit(idle)
            if culprit is not None:
                self._fire(*culprit)

    def _arm(self) -> None:
        """(Re)start the C timer. Armed at the start and at each stage change too, on the calling thread:
        a job may block in C before this thread's first check."""
        if self.backstop:
            faulthandler.dump_traceback_later(self.timeout + self.interval + BACKSTOP_S, exit=True)

    def beat(self) -> Beat:
        """This rank's heartbeat now."""
        now = time.time()
        return Beat(self.rank, os.getpid(), self.stage, self.round, self.waiting,
                    now - (time.monotonic() - self.last), now)

    def _write_beat(self) -> None:
        if self.folder is None:
            return
        tmp = self.folder / f".rank-{self.rank}.{os.getpid()}.tmp"
        with self._writing:
            try:
                if self.folder.parent.is_dir():  # inside the run directory; never the run directory itself
                    self.folder.mkdir(exist_ok=True)
                tmp.write_text(json.dumps(asdict(self.beat())))
                os.replace(tmp, self.path)
                self.wrote = True
            except OSError:
                pass  # a full or read-only disk must not end the job; the check itself needs no file

    def _culprit(self, idle: float) -> Optional[tuple[int, str, float]]:
        """(rank, stage, seconds) of a rank that stopped, read from the heartbeats; None while all move."""
        now, late = time.time(), self.timeout + 3 * self.interval
        peers = range(self.size) if self.rank == 0 else \
            sorted({(self.rank + k) % self.size for k in range(1, min(NEIGHBOURS, self.size - 1) + 1)})
        beats = {p: self.beat() if p == self.rank else read_beat(self.folder / f"rank-{p}.json") for p in peers}
        for p, b in beats.items():
            if b is None:
                if self.wrote and idle >= late:  # the folder works, yet this rank never wrote: it never started
                    return p, "starting (no heartbeat)", idle
            elif now - b.written > self.timeout:  # frozen or dead: its thread stopped writing
                return p, b.describe(), now - b.progress
            elif b.waiting is None and now - b.progress > late:  # alive, stuck, and its own check did not fire
                return p, b.describe(), now - b.progress
        if len(beats) == self.size and all(b is not None and b.waiting and now - b.progress > late
                                           for b in beats.values()):
            p = min(beats, key=lambda p: beats[p].progress)  # every rank waits: ranks in different collectives
            return p, beats[p].describe(), now - beats[p].progress
        return None

    def _fire(self, rank: int, stage: str, idle: float) -> None:
        line = (f"fedmpi: error: rank {rank}/{self.size} made no progress for {idle:.0f} s (stage: {stage}); "
                f"ending the job")
        if self._claim(line):
            print(line, file=sys.stderr, flush=True)
        else:
            time.sleep(CLAIMED_WAIT_S)  # the rank that claimed it prints, then its abort ends this one too
        self.abort(STALL_EXIT_CODE)

    def _claim(self, line: str) -> bool:
        """True for the one rank that reports (O_EXCL marker); True too where no marker can be made."""
        if self.size == 1 or self.folder is None:
            return True
        try:
            fd = os.open(self.folder / MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError:
            return True
        os.write(fd, (line + "\n").encode())
        os.close(fd)
        return True

    def _clear_leftovers(self) -> None:
        """Rank 0 at the start: a marker of an earlier aborted job, heartbeats of ranks beyond this job's."""
        stale = [self.folder / MARKER]
        if self.folder.is_dir():
            stale += [p for p in self.folder.glob("rank-*.json") if not _rank_below(p, self.size)]
        for p in stale:
            _unlink(p)

    def close(self) -> None:
        """Stop the thread and remove this rank's heartbeat; the last rank to leave removes the folder."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=self.interval + 5)
        if self.backstop:
            faulthandler.cancel_dump_traceback_later()
        if self.folder is None:
            return
        mine = read_beat(self.path)
        if mine is not None and mine.pid == os.getpid():
            _unlink(self.path)
        try:
            self.folder.rmdir()
        except OSError:
            pass  # not empty yet: another rank still runs, and the last one removes it


def _rank_below(path: Path, size: int) -> bool:
    number = path.stem[len("rank-"):]
    return number.isdigit() and int(number) < size


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


class _Off:
    """The watchdog when stall_timeout_s is 0: no thread, no files."""

    def set_stage(self, stage: str, rnd: Optional[int] = None) -> None:
        pass

    def close(self) -> None:
        pass


_ACTIVE: Optional[Watchdog] = None


def start(run_dir: Path, comm, timeout: float) -> "Watchdog | _Off":
    """This rank's watchdog for the job (timeout 0: off); closed at exit if not before."""
    global _ACTIVE
    if not timeout:
        return _Off()
    _ACTIVE = Watchdog(Path(run_dir) / FOLDER, comm.rank, comm.size, timeout, comm.abort).start()
    atexit.register(_ACTIVE.close)
    return _ACTIVE


def stage(name: str, rnd: Optional[int] = None) -> None:
    """This rank entered stage `name` (of round `rnd`): progress, and what a stall message names."""
    if _ACTIVE is not None:
        _ACTIVE.set_stage(name, rnd)


def progress() -> None:
    """This rank moved on within its stage (a training step, a node); cheap, callable on any thread."""
    watch = _ACTIVE
    if watch is not None:
        watch.last = time.monotonic()


@contextmanager
def waiting(collective: str) -> Iterator[None]:
    """Inside a collective this rank waits for the others: a stall there is someone else's."""
    watch = _ACTIVE
    if watch is None:
        yield
        return
    watch.waiting = collective
    try:
        yield
    finally:
        watch.waiting, watch.last = None, time.monotonic()

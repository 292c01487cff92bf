"""Fault injection for tests, off unless $FEDMPI_FAULT is set.

FEDMPI_FAULT=SPEC[,SPEC...], each SPEC one of
  raise:rank=R:round=T               rank R raises RuntimeError after training round T
  exit:rank=R:round=T                rank R leaves with os._exit(70): no traceback, no MPI_Finalize
  kill:rank=R:round=T                rank R sends itself SIGKILL (as the OOM killer would)
  delay:rank=R:round=T[:seconds=S]   rank R sleeps S seconds (default 1, at most 3600) before the collective
  hang:rank=R:round=T                rank R sleeps forever, its watchdog thread still running (stuck I/O)
  block:rank=R:round=T               rank R blocks forever in C code holding the interpreter lock (HDF5 on a FIFO)
  freeze:rank=R:round=T              rank R stops itself with SIGSTOP: the whole process, watchdog thread and all
  term:rank=R:round=T                rank R sends itself SIGTERM as its training of round T starts
  nan:node=K:round=T                 poison_node(K, T) is True: the training loop makes node K's update NaN
The other rank faults fire after local training, before the round's collective (the watchdog names a
stalled rank's stage as "training, round T").
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Optional

from ..errors import ConfigError

ENV = "FEDMPI_FAULT"
RANK_KINDS = ("raise", "exit", "kill", "delay", "hang", "block", "freeze", "term")
POINTS = dict.fromkeys(RANK_KINDS, "after training") | {"term": "training"}  # where in the round each fires
KINDS = RANK_KINDS + ("nan",)
USAGE = f"expected KIND:rank=R:round=T[:seconds=S] or nan:node=K:round=T, KIND one of {', '.join(RANK_KINDS)}"
EXIT_CODE = 70  # EX_SOFTWARE: apart from fedmpi's own codes (1, 2, 3, 75, 124, 130); mpirun passes it on
MAX_DELAY_S = 3600.0


@dataclass(frozen=True)
class Fault:
    """One injected fault: where (rank or node), when (round) and, for delay, how long."""

    kind: str
    round: int
    rank: Optional[int] = None
    node: Optional[int] = None
    seconds: float = 1.0


def parse(spec: str) -> list[Fault]:
    """All faults in a FEDMPI_FAULT value; ConfigError naming the variable for anything malformed."""
    return [parse_one(part.strip(), spec) for part in spec.split(",") if part.strip()]


def parse_one(part: str, spec: str) -> Fault:
    kind, *fields = part.split(":")
    bad = f"{ENV}={spec if len(spec) <= 200 else spec[:200] + '...'!r}"
    if kind not in KINDS:
        raise ConfigError(f"{bad}: unknown fault kind {kind!r}; {USAGE}")
    allowed = {"round", "node"} if kind == "nan" else {"round", "rank"} | ({"seconds"} if kind == "delay" else set())
    params: dict[str, str] = {}
    for field in fields:
        key, sep, value = field.partition("=")
        if not sep or key not in allowed or key in params:
            raise ConfigError(f"{bad}: bad field {field!r} for {kind}; {USAGE}")
        params[key] = value
    missing = sorted(allowed - {"seconds"} - set(params))
    if missing:
        raise ConfigError(f"{bad}: {kind} needs {', '.join(k + '=' for k in missing)}; {USAGE}")
    try:
        ints = {k: int(v) for k, v in params.items() if k != "seconds"}
        seconds = float(params.get("seconds", 1.0))
    except ValueError:
        raise ConfigError(f"{bad}: rank, node and round must be integers, seconds a number") from None
    if min(ints.values()) < 0 or not seconds >= 0:
        raise ConfigError(f"{bad}: values must be >= 0")
    if not seconds <= MAX_DELAY_S:
        raise ConfigError(f"{bad}: seconds must be at most {MAX_DELAY_S:.0f} (a straggler; `hang` never returns)")
    return Fault(kind, seconds=seconds, **ints)


def active() -> list[Fault]:
    """The faults $FEDMPI_FAULT asks for (none when unset or empty)."""
    return parse(os.environ.get(ENV, ""))


def maybe_inject(rank: int, rnd: int, point: str = "after training") -> None:
    """Called on every rank at two points of each round: "training" (as it starts) and "after
    training" (before the collective)."""
    for fault in active():
        if fault.kind not in RANK_KINDS or fault.rank != rank or fault.round != rnd or POINTS[fault.kind] != point:
            continue
        # The wall-clock instant lets a test measure how long the job takes to end after the fault.
        print(f"fedmpi: fault injection: {fault.kind} on rank {rank}, round {rnd}, at unix time {time.time():.3f}",
              file=sys.stderr, flush=True)
        fire(fault, rank, rnd)


def fire(fault: Fault, rank: int, rnd: int) -> None:
    """Do what the fault says, on this process."""
    if fault.kind == "raise":
        raise RuntimeError(f"injected fault ({ENV}) on rank {rank} in round {rnd}")
    if fault.kind == "exit":
        os._exit(EXIT_CODE)
    if fault.kind in ("kill", "freeze", "term"):
        os.kill(os.getpid(), {"kill": signal.SIGKILL, "freeze": signal.SIGSTOP, "term": signal.SIGTERM}[fault.kind])
    elif fault.kind == "block":
        while True:  # PyDLL keeps the interpreter lock through the call: no Python thread runs
            ctypes.PyDLL(None).sleep(3600)
    elif fault.kind == "hang":
        while True:
            time.sleep(3600)
    elif fault.kind == "delay":
        time.sleep(fault.seconds)


def poison_node(node: int, rnd: int) -> bool:
    """True when $FEDMPI_FAULT asks for node `node`'s update to be NaN in round `rnd`."""
    return any(f.kind == "nan" and f.node == node and f.round == rnd for f in active())

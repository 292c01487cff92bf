"""Fault injection for tests, off unless $FEDMPI_FAULT is set.

FEDMPI_FAULT=KIND:rank=R:round=T[:seconds=S]   KIND is raise, exit or delay;
FEDMPI_FAULT=nan:node=K:round=T                  node K's update becomes NaN in round T.
"""
from __future__ import annotations

import os
import time

from .errors import ConfigError

KINDS = ("raise", "exit", "delay", "nan")


def parse(spec: str) -> tuple[str, dict[str, float]]:
    kind, *parts = spec.split(":")
    try:
        params = {k: float(v) for k, v in (p.split("=", 1) for p in parts)}
    except ValueError:
        raise ConfigError(f"FEDMPI_FAULT={spec!r}: expected KIND:rank=R:round=T[:seconds=S]") from None
    target = "node" if kind == "nan" else "rank"
    if kind not in KINDS or target not in params or "round" not in params:
        raise ConfigError(f"FEDMPI_FAULT={spec!r}: KIND must be one of {', '.join(KINDS)}, "
                          f"with rank= (node= for nan) and round=")
    return kind, params


def poison_node(node: int, rnd: int) -> bool:
    """True when FEDMPI_FAULT asks for node's update to be NaN in this round."""
    spec = os.environ.get("FEDMPI_FAULT")
    if not spec or not spec.startswith("nan"):
        return False
    _, params = parse(spec)
    return int(params["node"]) == node and int(params["round"]) == rnd


def maybe_inject(rank: int, rnd: int) -> None:
    """Called once per round on every rank, after local training."""
    spec = os.environ.get("FEDMPI_FAULT")
    if not spec:
        return
    kind, params = parse(spec)
    if kind == "nan" or int(params["rank"]) != rank or int(params["round"]) != rnd:
        return
    if kind == "raise":
        raise RuntimeError(f"injected fault (FEDMPI_FAULT) on rank {rank} in round {rnd}")
    if kind == "exit":
        os._exit(3)
    time.sleep(params.get("seconds", 1.0))

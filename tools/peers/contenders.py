"""The command line, environment and semantics of each contender of tools/bench_peers.py.

Layouts are PROCESSESxTHREADS: fedmpi ranks x torch threads; pfl worker processes (torchrun) x torch
threads; Flower Ray backend workers running at once (cores / client num_cpus) x num_cpus threads.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# Who restarts the local optimizer each round, and in what order each node sees its batches:
# a short label for the table, and the sentence under it.
SEMANTICS = {
    "fedmpi": ("momentum kept; reshuffled", "fedmpi: each node's momentum buffer is kept across rounds (one optimizer "
               "per node, as in the tutorial); batches reshuffled each epoch, seeded by (seed, node, round)"),
    "fedmpi reset": ("fresh optimizer; reshuffled", "fedmpi with `local_state: reset`: a fresh local optimizer each "
                     "round; batches reshuffled each epoch, seeded by (seed, node, round)"),
    "pfl": ("fresh optimizer; fixed order", "pfl-research: `local_optimizer_create` makes a new optimizer for each "
            "user each round; fixed batch order: pfl slices each user's data in stored order, the same every epoch and "
            "round (the driver shuffles each node's rows once, seeded by node: the shard file stores them label by "
            "label)"),
    "flwr": ("fresh optimizer; reshuffled", "Flower: the ClientApp lives for one message, so its optimizer is new "
             "each round; batches reshuffled each epoch (randperm seeded by node and round, as a shuffling "
             "DataLoader would)"),
}


@dataclass
class Contender:
    """One line of the table: how to start it and where its per-round records appear."""

    name: str
    peer: str
    semantics: str
    cmd: list[str]
    env: dict = field(default_factory=dict)
    run_dir: Optional[Path] = None      # fedmpi: RUN_DIR/metrics.jsonl; peers: JSON lines on stdout


@dataclass
class Workload:
    """What every contender of one model trains (the benchmark's settings)."""

    model: str
    rounds: int
    epochs: int
    data_file: Path
    init: Path
    data_dir: Path
    work: Path
    device: str
    nodes: int = 100


def layout(text: str) -> tuple[int, int]:
    """'2x1' -> (2 processes, 1 thread); ValueError naming the text otherwise."""
    procs, sep, threads = text.partition("x")
    if not (sep and procs.isdigit() and threads.isdigit() and int(procs) > 0 and int(threads) > 0):
        raise ValueError(f"layout {text!r}: expected PROCESSESxTHREADS such as 2x1")
    return int(procs), int(threads)


def mpirun() -> str:
    beside = Path(sys.executable).parent / "mpirun"
    return str(beside) if beside.exists() else "mpirun"


def fedmpi(w: Workload, ranks: int, threads: int, reset: bool = False, bf16: bool = False) -> Contender:
    """fedmpi's CLI under mpirun (tools/peers/fedmpi_paced.py: `fedmpi` with paced rounds)."""
    name = f"fedmpi -n {ranks}" + (", local_state: reset" if reset else "") + (", autocast: bf16" if bf16 else "")
    run_dir = w.work / "runs" / f"{w.model}-fedmpi-n{ranks}{'-reset' if reset else ''}{'-bf16' if bf16 else ''}"
    sets = [f"threads={threads}", f"rounds={w.rounds}", f"local_epochs={w.epochs}", "central_epochs=0",
            f"data_file={w.data_file}", f"model={w.model}", f"device={w.device}", f"nodes={w.nodes}",
            # The paced wait between rounds is no progress to the watchdog: the runner's round timeout
            # catches a hang instead (waits for slow peers' rounds exceeded the default 300 s).
            "stall_timeout_s=0"]
    sets += (["local_state=reset"] if reset else []) + (["autocast=bf16"] if bf16 else [])
    cmd = [mpirun(), "-n", str(ranks), sys.executable, str(HERE / "fedmpi_paced.py"), "run",
           "--config", str(ROOT / "jobs" / "mnist_iid.yaml"), "--data-dir", str(w.data_dir), "--out", str(run_dir),
           "--set", *sets]
    return Contender(name, "fedmpi", SEMANTICS["fedmpi reset" if reset else "fedmpi"][0], cmd,
                     dict(OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT)), run_dir)


def driver_args(w: Workload, threads: int) -> list[str]:
    return ["--data-file", str(w.data_file), "--init", str(w.init), "--model", w.model, "--rounds", str(w.rounds),
            "--epochs", str(w.epochs), "--threads", str(threads), "--device", w.device]


def peer_env(python: Path, threads: int) -> dict:
    """The peer's own venv first on PATH, nothing of fedmpi's environment on its import path."""
    return dict(PATH=f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}", VIRTUAL_ENV=str(python.parents[1]),
                OMP_NUM_THREADS=str(threads), PYTHONPATH="")


def pfl(w: Workload, python: Path, procs: int, threads: int) -> Contender:
    """pfl-research: one process, or `torchrun --standalone` with `procs` worker processes."""
    script = [str(HERE / "pfl_tutorial.py"), *driver_args(w, threads)]
    launch = [str(python)] if procs == 1 else \
        [str(python.parent / "torchrun"), "--standalone", "--nnodes=1", f"--nproc_per_node={procs}"]
    env = dict(peer_env(python, threads), PFL_PYTORCH_DEVICE=w.device)
    return Contender(f"pfl {procs}x{threads}", "pfl", SEMANTICS["pfl"][0], launch + script, env)


def flwr(w: Workload, python: Path, workers: int, threads: int, cores: int) -> Contender:
    """Flower's simulation engine; `workers` Ray backend workers of num_cpus=threads each (cores // threads)."""
    if workers * threads > cores:
        raise ValueError(f"flwr layout {workers}x{threads}: Ray runs at most {cores} // num_cpus workers here")
    gpus = f"{1 / workers:g}" if w.device == "cuda" else "0"
    cmd = [str(python), str(HERE / "flwr_tutorial.py"), *driver_args(w, threads), "--gpus-per-client", gpus,
           "--nodes", str(w.nodes)]
    # Ray runs cores // num_cpus workers: with fewer workers than that, say so by exposing fewer cores.
    env = dict(peer_env(python, threads), RAY_DISABLE_USAGE_STATS="1")
    if workers * threads < cores:
        cmd += ["--ray-num-cpus", str(workers * threads)]
    return Contender(f"flwr {workers}x{threads}", "flwr", SEMANTICS["flwr"][0], cmd, env)


def read_rounds(c: Contender, log: Path) -> dict[int, dict]:
    """Per-round records so far: fedmpi's metrics.jsonl (t_round, test_acc), a peer's JSON lines on stdout."""
    out: dict[int, dict] = {}
    if c.run_dir is not None:
        path, keys = c.run_dir / "metrics.jsonl", ("t_round", "test_acc")
    else:
        path, keys = log, ("seconds", "test_acc")
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        if not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("round"), int) and keys[0] in rec:
            out[rec["round"]] = dict(seconds=float(rec[keys[0]]), test_acc=rec.get(keys[1]))
    return out


def events(log: Path) -> list[dict]:
    """The driver's start/end JSON events (versions, its own peak RSS)."""
    found = []
    try:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith('{"event"'):
                found.append(json.loads(line))
    except (OSError, ValueError):
        pass
    return found

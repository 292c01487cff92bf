"""Shared helpers: real `mpirun` processes and small real HDF5 shard files."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist"


def mpirun_path() -> str:
    beside = Path(sys.executable).parent / "mpirun"
    found = str(beside) if beside.exists() else shutil.which("mpirun")
    if not found:
        pytest.fail("no mpirun found: install the test extras (pip install -e '.[mpich,test]')")
    return found


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def fedmpi(args: list[str], ranks: int = 1, timeout: float = 120, env: dict | None = None, cwd: Path = ROOT) -> Result:
    """Run `python -m fedmpi ARGS` under a real `mpirun -n RANKS`, killed after `timeout` seconds."""
    cmd = [mpirun_path(), "-n", str(ranks), sys.executable, "-m", "fedmpi", *args]
    full_env = dict(os.environ, **(env or {}))
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd)
    return Result(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


SMALL = ["dataset=synthetic", "nodes=8", "samples_per_node=40", "test_per_node=20", "rounds=3",
         "local_epochs=1", "batch_size=8", "central_epochs=1", "lr=0.01"]


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> str:
    """A synthetic shard file prepared once by the real `fedmpi prepare`; returns its data_file override."""
    path = tmp_path_factory.mktemp("data") / "synthetic.h5"
    result = fedmpi(["prepare", "--set", *SMALL, f"data_file={path}"])
    assert result.returncode == 0, result.stderr
    return f"data_file={path}"

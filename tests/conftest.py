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


# FEDMPI_TEST_MPI picks the MPI the tests run under: "mpich" (the PyPI wheel beside the venv's python,
# the default) or "openmpi" (Debian's openmpi-bin, loaded by the same mpi4py wheel through MPI4PY_LIBMPI).
MPI_IMPLS = {"mpich": "MPICH", "openmpi": "Open MPI"}   # -> what MPI_Get_library_version must name
OPENMPI_ENV = {"MPI4PY_LIBMPI": "libmpi.so.40", "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
               "OMPI_MCA_rmaps_base_oversubscribe": "1",                  # Open MPI 4: more ranks than cores
               "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe"}  # Open MPI 5 ignores the 4.x variable


def chosen_mpi() -> str:
    """The MPI implementation chosen by FEDMPI_TEST_MPI (default mpich); a typo fails, never falls back."""
    impl = os.environ.get("FEDMPI_TEST_MPI", "mpich")
    if impl not in MPI_IMPLS:
        pytest.fail(f"FEDMPI_TEST_MPI={impl!r}: expected one of {sorted(MPI_IMPLS)}")
    return impl


def expected_mpi_library() -> str:
    """The name run.json's mpi_library must contain under the chosen MPI ("MPICH" or "Open MPI")."""
    return MPI_IMPLS[chosen_mpi()]


def mpirun_path() -> str:
    if chosen_mpi() == "openmpi":
        if not Path("/usr/bin/mpirun").exists():
            pytest.fail("FEDMPI_TEST_MPI=openmpi but /usr/bin/mpirun is missing: apt-get install openmpi-bin")
        return "/usr/bin/mpirun"
    beside = Path(sys.executable).parent / "mpirun"
    found = str(beside) if beside.exists() else shutil.which("mpirun")
    if not found:
        pytest.fail("no mpirun found: install the test extras (pip install -e '.[mpich,test]')")
    return found


def mpi_env() -> dict:
    """Extra environment for the chosen MPI's launcher and ranks."""
    return dict(OPENMPI_ENV) if chosen_mpi() == "openmpi" else {}


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


# `python -m fedmpi` with a file-size limit set once MPI is up (MPI_Init writes shared-memory files that
# the limit would refuse): a disk full for files growing past it. Python ignores SIGXFSZ: write() fails (EFBIG).
LIMITED_FEDMPI = """
import resource, runpy, sys
from mpi4py import MPI
limit = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
runpy.run_module("fedmpi", run_name="__main__", alter_sys=True)
"""


def fedmpi(args: list[str], ranks: int = 1, timeout: float = 120, env: dict | None = None, cwd: Path = ROOT,
           max_file_bytes: int | None = None) -> Result:
    """Run `python -m fedmpi ARGS` under a real `mpirun -n RANKS`, killed after `timeout` seconds.

    max_file_bytes: no rank can write a file larger than this (RLIMIT_FSIZE, see LIMITED_FEDMPI).
    """
    python = [sys.executable, "-m", "fedmpi"] if max_file_bytes is None else \
        [sys.executable, "-c", LIMITED_FEDMPI, str(max_file_bytes)]
    cmd = [mpirun_path(), "-n", str(ranks), *python, *args]
    full_env = dict(os.environ, **mpi_env(), **(env or {}))
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd)
    return Result(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def assert_world(run_dir: Path, ranks: int, library: str | None = None) -> dict:
    """run.json names `ranks` ranks and the expected MPI: a wrong launcher setup starts singletons silently."""
    info = json.loads((run_dir / "run.json").read_text())
    assert info["world_size"] == ranks, f"world_size {info['world_size']}, expected {ranks}"
    assert (library or expected_mpi_library()) in info["mpi_library"], info["mpi_library"]
    return info


SMALL = ["dataset=synthetic", "nodes=8", "samples_per_node=40", "test_per_node=20", "rounds=3",
         "local_epochs=1", "batch_size=8", "central_epochs=1", "lr=0.01"]


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> str:
    """A synthetic shard file prepared once by the real `fedmpi prepare`; returns its data_file override."""
    path = tmp_path_factory.mktemp("data") / "synthetic.h5"
    result = fedmpi(["prepare", "--set", *SMALL, f"data_file={path}"])
    assert result.returncode == 0, result.stderr
    return f"data_file={path}"


@pytest.fixture
def one_thread():
    """One torch thread (engine tests: latency-bound, and spinning OpenMP threads crawl on a busy CI host)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

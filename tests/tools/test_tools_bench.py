"""The benchmark scripts still run: the MPI aggregation benchmark under real mpirun, the many-nodes round."""
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import MNIST_DIR, ROOT, mpi_env, mpirun_path


def test_aggregation_benchmark_times_fedmpi_and_a_raw_allreduce_of_the_same_buffer_under_mpirun():
    cmd = [mpirun_path(), "-n", "2", sys.executable, str(ROOT / "tools" / "bench_mpi.py"), "comm", "--size", "1000",
           "--reps", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=dict(os.environ, **mpi_env()))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 1  # rank 0 reports for both
    row = rows[0]
    assert row["ranks"] == 2 and row["bytes"] == 4 * (1000 + 3)
    assert 0 < row["allreduce_ms"] <= row["fedmpi_ms"] and row["raw_ms"] > 0


def test_many_nodes_benchmark_trains_a_round_in_worker_threads_and_stays_finite():
    cmd = [sys.executable, str(ROOT / "tools" / "bench_nodes.py"), "--nodes", "12", "--samples", "40", "--epochs", "1",
           "--rounds", "1", "--device", "cpu", "--threads", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["nodes"] == 12 and row["finite"] and row["workers"] == 2 and 1 <= row["chunk"] <= 12
    assert row["round_s"] > 0 and row["peak_rss_mib"] > 0


@pytest.mark.skipif(not (MNIST_DIR / "train-images-idx3-ubyte.gz").exists(), reason=f"no MNIST in {MNIST_DIR}")
def test_the_benchmark_runs_end_to_end_with_one_command(tmp_path):
    """`tools/bench.py` as the README runs it, shortened: every part prints its table."""
    cmd = [sys.executable, str(ROOT / "tools" / "bench.py"), "--quick", "--rounds", "1", "--epochs", "1", "--bf16",
           "--data-dir", str(MNIST_DIR), "--work", str(tmp_path)]
    # A hang catcher only: on a busy 2-core machine the tutorial loop alone has taken 150 s a round.
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=dict(os.environ, **mpi_env()))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for name in ("A: tutorial loop", "B: engine sequential", "C: engine batched", "D: batched, bf16 autocast"):
        assert f"| {name} |" in out
    assert re.search(r"batched / tutorial \d+\.\d\dx, batched / sequential \d+\.\d\dx", out)
    assert re.search(r"^\| 2 \| 796,852 \|", out, re.M) and re.search(r"^\| 4 \| 796,852 \|", out, re.M)
    assert "| 1 rank(s) x 2 thread(s) |" in out and "| 2 rank(s) x 1 thread(s) |" in out

"""The benchmark scripts still run: the MPI aggregation benchmark under real mpirun, the many-nodes round."""
import json
import os
import subprocess
import sys

from conftest import ROOT, mpi_env, mpirun_path


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

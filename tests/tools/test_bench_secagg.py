"""The secure-aggregation benchmark runs under real mpirun and reports an exact masked sum."""
import json
import os
import subprocess
import sys

from conftest import ROOT, mpi_env, mpirun_path


def test_secagg_benchmark_times_masking_and_the_allreduce_and_checks_the_masked_sum():
    cmd = [mpirun_path(), "-n", "2", sys.executable, str(ROOT / "tools" / "bench_secagg.py"), "--sizes", "1000",
           "--repeat", "2"]
    env = dict(os.environ, **mpi_env(), PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(r["ranks"], r["params"], r["bits"]) for r in rows] == [(2, 1000, 64), (2, 1000, 32)]
    for row in rows:
        assert row["exact"] and row["bytes"] == (1000 + 4) * row["bits"] // 8
        assert row["mask_ms"] > 0 and row["allreduce_ms"] > 0 and row["quantize_node_ms"] > 0

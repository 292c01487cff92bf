"""tools/bench_scale.py runs end to end on a small federation and reads its rows right."""
import json
import subprocess
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import bench_scale  # noqa: E402


def test_the_split_takes_the_middle_rounds_and_the_gap_between_rows_as_recording():
    rows = [dict(t_round=r, t_select=0.001, t_train_max=r / 2, t_wait=0.0, t_allreduce=0.01, t_eval=0.0,
                 t_gather=0.002, t_elapsed=t) for r, t in ((9.0, 10.0), (1.0, 11.5), (1.0, 12.6), (5.0, 18.0))]
    m = bench_scale.split(rows)
    assert m["t_round"] == 1.0 and m["t_train_max"] == 0.5
    # recording after round 2 is what lies between its row and round 3's start (12.6 - 1.0 - 11.5), after
    # round 3 the same up to round 4 (18.0 - 5.0 - 12.6): their median
    assert abs(m["t_record"] - 0.25) < 1e-9
    assert abs(m["outside"] - (0.001 + 0.01 + 0.002 + 0.25)) < 1e-9


def test_a_small_federation_runs_from_one_command(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_scale.py"), "--sizes", "200", "--ranks", "2",
                           "--rounds", "3", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
    assert result["nodes"] == 200 and len(result["rss_mib"]) == 2 and min(result["rss_mib"]) > 50
    assert result["split"]["t_train_max"] > 0 and "| 200 |" in proc.stdout
    assert not (tmp_path / "scale-200.h5").exists()  # the file is removed after its run


def test_the_tutorial_line_reads_every_rounds_nodes_from_the_file(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_scale.py"), "--tutorial", "--sizes", "200",
                           "--ranks", "2", "--rounds", "3", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
    assert result["nodes"] == 200 and result["split"]["t_read"] > 0  # waited for rows read from the file
    assert "--tutorial --sizes 200" in proc.stdout and "| read ms |" in proc.stdout

"""`fedmpi report` on run directories made by real tiny `fedmpi run`s, plus the pure time/bytes helpers."""
import json
import os
import subprocess
import sys

import matplotlib.image as plt_image  # in the test extra: a missing matplotlib is a failure, not a skip
import pytest
from conftest import ROOT, SMALL, fedmpi, read_metrics

from fedmpi.output.report import Run, bytes_sent, cumulative, summary_table, time_split, wall_time


def report(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m fedmpi report ARGS` as a user runs it (no launcher), with this checkout first on the path."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "fedmpi", "report", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)

@pytest.fixture(scope="module")
def run_dirs(small_data, tmp_path_factory):
    """The same small job at -n 1 and -n 2."""
    out = {}
    for n in (1, 2):
        run_dir = tmp_path_factory.mktemp("report") / f"n{n}"
        result = fedmpi(["run", "--set", *SMALL, small_data, "--out", str(run_dir)], ranks=n)
        assert result.returncode == 0, result.stderr
        out[n] = run_dir
    return out

def image(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    pixels = plt_image.imread(path)
    assert pixels.std() > 0.05, f"{path} looks blank"  # something was drawn
    return pixels

def test_one_run_writes_table_and_plots_into_the_run_directory(run_dirs):
    result = report(str(run_dirs[2]))
    assert result.returncode == 0, result.stderr
    md = (run_dirs[2] / "report.md").read_text()
    rows = read_metrics(run_dirs[2])
    for row in rows:  # one table line per round, carrying that round's accuracies
        line = next(x for x in md.splitlines() if x.startswith(f"| {row['round']} |"))
        assert f"| {row['test_acc']:.4f} | {row['central_acc']:.4f} |" in line, line
    assert "1.59 MB" in md  # 2 ranks x 2 (2-1)/2 x 796,844 B sent in one round's Allreduce
    for name in ("accuracy.png", "time.png", "bytes.png", "accuracy_vs_bytes.png", "labels.png"):
        image(run_dirs[2] / name)
        assert f"]({name})" in md
    assert not (run_dirs[2] / "accuracy_vs_epsilon.png").exists()  # no DP run: no epsilon to plot against


def test_label_plot_is_left_out_when_the_shard_file_is_gone(run_dirs, tmp_path):
    moved = tmp_path / "run"
    moved.mkdir()
    for name in ("metrics.jsonl", "run.json"):
        (moved / name).write_bytes((run_dirs[1] / name).read_bytes())
    (moved / "config.yaml").write_text((run_dirs[1] / "config.yaml").read_text().replace(".h5", "-gone.h5"))
    assert report(str(moved)).returncode == 0
    assert (moved / "accuracy_vs_bytes.png").exists() and not (moved / "labels.png").exists()
    assert "labels.png" not in (moved / "report.md").read_text()

def test_several_runs_side_by_side(run_dirs, tmp_path):
    result = report(str(run_dirs[1]), str(run_dirs[2]), "--out", str(tmp_path / "cmp"))
    assert result.returncode == 0, result.stderr
    md = (tmp_path / "cmp" / "report.md").read_text()
    summary = [x for x in md.splitlines() if x.startswith("| n1 |") or x.startswith("| n2 |")]
    assert [x.split("|")[2].strip() for x in summary] == ["1", "2"]  # the ranks column
    assert "## n1 (-n 1)" in md and "## n2 (-n 2)" in md
    header = next(x for x in md.splitlines() if x.startswith("| run |")).split("|")
    wall, in_rounds = header.index(" wall time (s) "), header.index(" in rounds (s) ")
    for line in summary:  # the rounds lie within the run: setup (shard file, baseline) comes on top
        cells = line.split("|")
        assert float(cells[wall]) >= float(cells[in_rounds]) > 0
    single = tmp_path / "single"
    assert report(str(run_dirs[1]), "--out", str(single)).returncode == 0
    # time.png has one panel per run: two runs make a wider figure than one.
    assert image(tmp_path / "cmp" / "time.png").shape[1] > image(single / "time.png").shape[1]

def test_a_directory_without_metrics_is_one_line_and_exit_code_2(tmp_path):
    result = report(str(tmp_path / "nowhere"))
    assert result.returncode == 2
    errors = [x for x in result.stderr.splitlines() if x.startswith("fedmpi: error")]
    assert len(errors) == 1 and "metrics.jsonl not found" in errors[0], result.stderr

def test_a_corrupt_metrics_line_names_the_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"round": 1}) + "\n{not json\n")
    result = report(str(tmp_path))
    assert result.returncode == 2 and "metrics.jsonl line 2 is not JSON" in result.stderr, result.stderr

def test_time_split_adds_up_to_the_round_and_bytes_accumulate():
    row = dict(t_round=1.0, t_train_mean=0.5, t_wait=0.2, t_allreduce=0.1, wire_bytes_est=1000, ranks=4)
    parts = time_split(row)
    assert parts == pytest.approx(dict(compute=0.5, wait=0.2, transfer=0.1, other=0.2))
    assert sum(parts.values()) == pytest.approx(row["t_round"])
    assert bytes_sent(row) == 4000 and bytes_sent(dict(row, wire_bytes_est=None)) == 0
    assert cumulative([1.0, 2.0, 3.0]) == [1.0, 3.0, 6.0]


def test_the_summary_gives_the_wall_time_and_the_time_in_rounds_apart(tmp_path):
    """Two 2 s rounds after 56 s of setup (the shard file, the baseline): wall 62.5 s, rounds 4 s."""
    rows = [dict(round=r, test_acc=0.5, t_round=2.0, t_train_mean=1.0, t_wait=0.5, t_allreduce=0.1, t_elapsed=e)
            for r, e in ((1, 60.0), (2, 62.5))]
    header, _, line = summary_table([Run(tmp_path / "r", rows, {"world_size": 2}, {})])
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in line.split("|")]))
    assert cells["wall time (s)"] == "62.50" and cells["in rounds (s)"] == "4.00"
    assert cells["compute"] == "2.00 s (50%)" and cells["wait"] == "1.00 s (25%)"
    assert wall_time(rows) == 62.5 and wall_time([dict(round=1, t_round=2.0)]) is None  # rows from before t_elapsed
    older = summary_table([Run(tmp_path / "r", [dict(round=1, t_round=2.0)], {}, {})])[2]
    assert older.split("|")[6].strip() == "-"


def test_a_dp_run_adds_accuracy_against_epsilon_beside_a_run_without_dp(run_dirs, small_data, tmp_path):
    dp_dir = tmp_path / "dp"
    result = fedmpi(["run", "--set", *SMALL, small_data, "dp=gaussian", "dp_noise_multiplier=1", "dp_clip=0.1",
                     "--out", str(dp_dir)])
    assert result.returncode == 0, result.stderr
    out = tmp_path / "cmp"
    assert report(str(dp_dir), str(run_dirs[1]), "--out", str(out)).returncode == 0
    pixels = image(out / "accuracy_vs_epsilon.png")
    assert "](accuracy_vs_epsilon.png)" in (out / "report.md").read_text()
    with_line = report(str(dp_dir), "--out", str(tmp_path / "alone"))
    assert with_line.returncode == 0
    # the run without DP adds its dashed line: the two images differ
    alone = image(tmp_path / "alone" / "accuracy_vs_epsilon.png")
    assert alone.shape != pixels.shape or abs(alone - pixels).max() > 0


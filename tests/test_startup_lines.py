"""Rank 0 says what startup is doing, one stdout line per stage, once at any rank count."""
from conftest import SMALL, fedmpi


def stage_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if not line.startswith(("round ", "run directory"))]


def test_each_startup_stage_prints_one_line_on_rank_0(tmp_path):
    data = tmp_path / "data" / "s.h5"
    first = fedmpi(["run", "--set", *SMALL, f"data_file={data}", "--out", str(tmp_path / "a")], ranks=3, timeout=180)
    assert first.returncode == 0, first.stderr
    assert stage_lines(first.stdout) == [
        f"preparing the shard file {data} (synthetic, balanced, 8 nodes x 40 samples)",
        f"reading the shards of 8 nodes (3 ranks) from {data}",
        "centralized baseline: training 1 epoch on every node's samples",
        "starting round 1 of 3"]
    assert "preparing" not in first.stderr and "starting round" not in first.stderr
    again = fedmpi(["run", "--set", *SMALL, f"data_file={data}", "--out", str(tmp_path / "b")], ranks=2, timeout=180)
    assert again.returncode == 0, again.stderr
    lines = stage_lines(again.stdout)
    assert lines[0] == f"reading the shards of 8 nodes (2 ranks) from {data}" and lines[-1] == "starting round 1 of 3"
    assert len(lines) == 3 and lines[1].startswith(f"centralized baseline: cached in {tmp_path}/data/s.central-")

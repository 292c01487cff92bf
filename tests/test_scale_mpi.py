"""Stateless clients and bookkeeping that scales, under real mpirun: the same results at any rank count."""
import csv
import json

import numpy as np
import pytest
from conftest import SMALL, assert_world, fedmpi, read_metrics

from fedmpi.data.partition import node_ranges


@pytest.fixture(scope="module")
def reset_runs(small_data, tmp_path_factory):
    """The small job with local_state reset at -n 1, 2 and 4, and with keep at -n 1."""
    out = {}
    for name, ranks, state in (("reset1", 1, "reset"), ("reset2", 2, "reset"), ("reset4", 4, "reset"),
                               ("keep1", 1, "keep")):
        run_dir = tmp_path_factory.mktemp(name)
        result = fedmpi(["run", "--set", *SMALL, small_data, f"local_state={state}", "checkpoint_every=1",
                         "--out", str(run_dir)], ranks=ranks)
        assert result.returncode == 0, result.stderr
        assert_world(run_dir, ranks)
        out[name] = run_dir
    return out


def test_reset_gives_the_same_accuracy_at_any_rank_count_and_differs_from_keep(reset_runs):
    acc = {k: [r["test_acc"] for r in read_metrics(d)] for k, d in reset_runs.items()}
    assert len(set(acc["reset1"])) > 1
    for n in ("reset2", "reset4"):
        assert np.max(np.abs(np.array(acc[n]) - np.array(acc["reset1"]))) <= 1e-4
    # round 1 starts every node from zero momentum either way; from round 2 keep carries it
    assert acc["keep1"][0] == acc["reset1"][0] and acc["keep1"][1:] != acc["reset1"][1:]


def test_a_stateless_checkpoint_has_no_node_files_and_resumes(reset_runs, small_data, tmp_path):
    for name in ("reset1", "reset4"):
        folder = reset_runs[name] / "checkpoint"
        assert json.loads((folder / "meta.json").read_text())["node_files"] == []
        assert not list(folder.glob("nodes-*.pt"))
    kept = reset_runs["keep1"] / "checkpoint"
    assert json.loads((kept / "meta.json").read_text())["node_files"] == ["nodes-0-8.pt"]
    # a 2-round stateless run resumed for its third round at another rank count matches the 3-round run
    short = tmp_path / "short"
    result = fedmpi(["run", "--set", *SMALL, small_data, "local_state=reset", "rounds=2", "checkpoint_every=1",
                     "--out", str(short)], ranks=2)
    assert result.returncode == 0, result.stderr
    result = fedmpi(["run", "--resume", str(short), "--set", "rounds=3"], ranks=3)
    assert result.returncode == 0, result.stderr
    got = [r["test_acc"] for r in read_metrics(short)]
    want = [r["test_acc"] for r in read_metrics(reset_runs["reset1"])]
    assert len(got) == 3 and np.max(np.abs(np.array(got) - np.array(want))) <= 1e-4



SKEWED = [*SMALL, "partition=quantity", "quantity_sigma=1.5", "nodes=9", "fraction=0.5", "rounds=2"]


def test_blocks_cut_by_samples_on_a_skewed_partition_give_the_same_results_at_1_2_3_ranks(tmp_path):
    data = f"data_file={tmp_path}/quantity.h5"
    result = fedmpi(["prepare", "--set", *SKEWED, data])
    assert result.returncode == 0, result.stderr
    acc, per_rank = {}, {}
    for n in (1, 2, 3):
        result = fedmpi(["run", "--set", *SKEWED, data, "--out", str(tmp_path / f"n{n}")], ranks=n)
        assert result.returncode == 0, result.stderr
        acc[n] = [r["test_acc"] for r in read_metrics(tmp_path / f"n{n}")]
        per_rank[n] = assert_world(tmp_path / f"n{n}", n)["nodes_per_rank"]
    assert len(set(acc[1])) > 1
    for n in (2, 3):
        assert np.max(np.abs(np.array(acc[n]) - np.array(acc[1]))) <= 1e-4
    with open(tmp_path / "n3" / "nodes.csv") as f:
        rows = list(csv.DictReader(f))
    work = [sum(int(r["samples"]) for r in rows if r["rank"] == str(k)) for k in range(3)]
    even = [len(b) for b in node_ranges(9, 3)]
    assert per_rank[3] != even  # the skew moved the cuts away from equal node counts
    assert max(work) < max(sum(int(r["samples"]) for r in rows[a:a + c]) for a, c in ((0, 3), (3, 3), (6, 3)))

"""End to end under real `mpirun`: import a TFF-layout file and an npz, then run them with `dataset: file`
at -n 1 and -n 2 (the same accuracy every round), and find the clients in nodes.csv, --describe and report."""
from __future__ import annotations

import csv

import numpy as np
import pytest
from conftest import assert_world, fedmpi, read_metrics
from importfiles import learnable_data, write_npz, write_tff

TFF_TRAIN = {"f0003_10": 40, "f0001_07": 25, "f0012_33": 60, "f0002_41": 18, "f0010_02": 33}
TFF_TEST = {"f0003_10": 8, "f0001_07": 6, "f0012_33": 12, "f0010_02": 5, "f0099_99": 9}  # f0002_41: none
RUN = ["rounds=3", "local_epochs=1", "batch_size=8", "lr=0.05", "central_epochs=1", "fraction=1.0",
       "eval_every=1", "model=2nn"]


def npz_source(path):
    """Seven clients with integer ids (9 < 10 < 100 numerically), their examples interleaved."""
    rng = np.random.default_rng(5)
    owners = rng.permutation([c for c, n in ((9, 30), (10, 22), (100, 41), (7, 15), (55, 27), (3, 19), (21, 35))
                              for _ in range(n)])
    xs, ys = zip(*(learnable_data(str(c), 1, (5,)) for c in owners))
    x = np.concatenate(xs) + rng.normal(0, 0.3, (len(owners), 5)).astype(np.float32)
    return write_npz(path, dict(x=x, y=np.concatenate(ys).astype(np.int64), client_id=owners), compressed=True)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The two shard files, made by the real `fedmpi import` (the TFF one at -n 2: rank 0 writes)."""
    folder = tmp_path_factory.mktemp("sources")
    train = write_tff(folder / "train.h5", TFF_TRAIN, data=learnable_data)
    test = write_tff(folder / "test.h5", TFF_TEST, "test", data=learnable_data)
    files = {"tff": folder / "tff.h5", "npz": folder / "npz.h5"}
    result = fedmpi(["import", "tff", str(train), str(test), "--x", "pixels", "--y", "label", "--out",
                     str(files["tff"])], ranks=2)
    assert result.returncode == 0 and result.stdout.count("shard file:") == 1, result.stderr
    assert "not in" in result.stderr and "'f0099_99'" in result.stderr  # the test-only client, noted
    result = fedmpi(["import", "npz", str(npz_source(folder / "a.npz")), "--test-fraction", "0.25", "--out",
                     str(files["npz"])])
    assert result.returncode == 0, result.stderr
    return files


@pytest.fixture(scope="module")
def runs(imported, tmp_path_factory):
    """Each file run at -n 1 and -n 2; the TFF one through jobs/examples/federated_file.yaml."""
    out = {}
    for kind, path in imported.items():
        for n in (1, 2):
            run_dir = tmp_path_factory.mktemp(f"{kind}-n{n}")
            config = ["--config", "jobs/examples/federated_file.yaml"] if kind == "tff" else []
            result = fedmpi(["run", *config, "--set", "dataset=file", f"data_file={path}", *RUN,
                             "--out", str(run_dir)], ranks=n)
            assert result.returncode == 0, result.stderr
            assert_world(run_dir, n)
            out[kind, n] = run_dir
    return out


@pytest.mark.parametrize("kind", ["tff", "npz"])
def test_the_same_accuracy_every_round_at_one_and_two_ranks(runs, kind):
    rows = {n: read_metrics(runs[kind, n]) for n in (1, 2)}
    acc = {n: [r["test_acc"] for r in rows[n]] for n in (1, 2)}
    assert len(acc[1]) == 3 and acc[1][-1] > 0.5 and len(set(acc[1])) > 1  # learning: a real comparison
    # Test sets of under 10^4 examples: a difference of at most 1e-4 means the very same predictions.
    assert np.max(np.abs(np.array(acc[2]) - np.array(acc[1]))) <= 1e-4, acc
    local = {n: [r["main_on_local_acc_mean"] for r in rows[n]] for n in (1, 2)}
    assert np.allclose(local[1], local[2], atol=1e-4) and rows[1][0]["central_acc"] is not None


def test_nodes_csv_names_each_client_in_sorted_id_order(runs):
    with open(runs["tff", 2] / "nodes.csv", newline="") as f:
        nodes = list(csv.DictReader(f))
    assert [r["client_id"] for r in nodes] == sorted(TFF_TRAIN)
    assert [int(r["samples"]) for r in nodes] == [TFF_TRAIN[c] for c in sorted(TFF_TRAIN)]
    assert [r["rank"] for r in nodes] == ["0", "0", "0", "1", "1"]
    empty = nodes[sorted(TFF_TRAIN).index("f0002_41")]
    assert empty["main_on_local_acc"] == ""  # no local test examples: no score, not a zero
    with open(runs["npz", 1] / "nodes.csv", newline="") as f:
        assert [r["client_id"] for r in csv.DictReader(f)] == ["3", "7", "9", "10", "21", "55", "100"]


def test_describe_and_report_show_the_clients(imported, runs):
    result = fedmpi(["prepare", "--describe", "--set", "dataset=file", f"data_file={imported['tff']}"])
    assert result.returncode == 0, result.stderr
    assert "partition: natural" in result.stdout and "local_test_scheme: client" in result.stdout
    rows = [line.split() for line in result.stdout.splitlines() if line.split()[:1] in (["0"], ["3"])]
    assert rows[0][:4] == ["0", "f0001_07", "25", "6"] and rows[1][:4] == ["3", "f0010_02", "33", "5"]
    pytest.importorskip("matplotlib")
    result = fedmpi(["report", str(runs["npz", 2])])
    assert result.returncode == 0, result.stderr
    text = (runs["npz", 2] / "report.md").read_text()
    assert "## Nodes of" in text and "client_id" in text and "local test examples per node" in text
    assert (runs["npz", 2] / "labels.png").stat().st_size > 0

"""Ditto under real `mpirun`: the same run at any rank count, the wire unchanged, personal models resumed."""
import json

import numpy as np
import pytest
import torch
from conftest import SMALL, assert_world, fedmpi, read_metrics

DITTO = ["personalize=ditto", "ditto_lambda=0.5", "fraction=0.5", "lr=0.05"]
P = 199_210  # the 2nn's parameters
PERSONAL = ("personal_local_acc_mean", "personal_local_acc_min", "personal_local_acc_max",
            "main_on_trained_acc_mean")


def run(small_data, run_dir, ranks, *extra, env=None):
    return fedmpi(["run", "--set", *SMALL, small_data, *extra, "--out", str(run_dir)], ranks=ranks, env=env)


@pytest.fixture(scope="module")
def runs(small_data, tmp_path_factory):
    """Ditto at -n 1, 2 and 4, and FedAvg with the same settings at -n 1."""
    out = {}
    for n in (1, 2, 4):
        out[n] = tmp_path_factory.mktemp(f"ditto{n}")
        result = run(small_data, out[n], n, *DITTO)
        assert result.returncode == 0, result.stderr
        assert_world(out[n], n)
    out["fedavg"] = tmp_path_factory.mktemp("fedavg")
    assert run(small_data, out["fedavg"], 1, *DITTO, "personalize=none").returncode == 0
    return out


def weights(run_dir):
    return torch.load(run_dir / "model.pt", weights_only=True)


def personal(run_dir):
    return [[r[k] for k in PERSONAL] for r in read_metrics(run_dir)]


def test_ditto_gives_the_same_run_at_any_rank_count(runs):
    ref = np.array(personal(runs[1]), dtype=float)
    assert ref.shape == (3, len(PERSONAL)) and np.isfinite(ref).all()
    for n in (2, 4):
        assert np.max(np.abs(np.array(personal(runs[n]), dtype=float) - ref)) <= 1e-4
        for name, w in weights(runs[n]).items():
            assert torch.allclose(w, weights(runs[1])[name], rtol=1e-4, atol=1e-6), name


def test_the_global_model_and_the_wire_are_fedavgs(runs):
    """Personal models never enter the Allreduce: FedAvg's payload and FedAvg's main model."""
    for n in (1, 2, 4):
        assert all(r["payload_bytes"] == 4 * P + 12 for r in read_metrics(runs[n]))
    a, b = weights(runs[1]), weights(runs["fedavg"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(k.startswith("personal") for k in read_metrics(runs["fedavg"])[0])


def test_resume_restores_the_personal_models(small_data, tmp_path):
    """Crash at -n 2 in round 3, resume at -n 3: the same personal scores as the uninterrupted run."""
    args = [*DITTO, "rounds=4", "checkpoint_every=1"]
    reference = tmp_path / "reference"
    assert run(small_data, reference, 2, *args).returncode == 0
    crashed = run(small_data, tmp_path / "run", 2, *args, env={"FEDMPI_FAULT": "raise:rank=1:round=3"})
    assert crashed.returncode != 0
    assert json.loads((tmp_path / "run" / "checkpoint" / "meta.json").read_text())["round"] == 2
    node_file = torch.load(next((tmp_path / "run" / "checkpoint").glob("nodes-*.pt")), weights_only=True)
    assert set(node_file) == {"first", "momentum", "personal"}
    resumed = fedmpi(["run", "--resume", str(tmp_path / "run")], ranks=3)
    assert resumed.returncode == 0, resumed.stderr
    a, b = np.array(personal(reference), dtype=float), np.array(personal(tmp_path / "run"), dtype=float)
    assert a.shape == b.shape == (4, len(PERSONAL)) and np.max(np.abs(a - b)) <= 1e-4


@pytest.mark.parametrize("privacy", [["dp=gaussian", "dp_noise_multiplier=0.8", "dp_clip=0.05", "sampling=poisson"],
                                     ["secure_aggregation=true"]], ids=["dp", "secure_aggregation"])
def test_dp_and_secure_aggregation_see_fedavgs_update(small_data, tmp_path, privacy):
    """They act on the global update only: with Ditto the same main model as without it, at -n 2."""
    with_ditto, without = tmp_path / "ditto", tmp_path / "plain"
    assert run(small_data, with_ditto, 2, *DITTO, *privacy).returncode == 0
    assert run(small_data, without, 2, *DITTO, *privacy, "personalize=none").returncode == 0
    a, b = weights(with_ditto), weights(without)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(r["personal_local_acc_mean"] is not None for r in read_metrics(with_ditto))


def test_nodes_csv_lists_the_last_rounds_personal_scores(runs):
    import csv

    tables = {n: list(csv.DictReader((runs[n] / "nodes.csv").open())) for n in (1, 2, 4)}
    assert list(tables[1][0])[-1] == "personal_local_acc"
    scored = [r for r in tables[1] if r["personal_local_acc"] != ""]
    assert len(scored) == 4 and all(r["local_acc"] != "" for r in scored)  # fraction 0.5 of 8 nodes trained
    for n in (2, 4):
        assert [r["personal_local_acc"] != "" for r in tables[n]] == [r["personal_local_acc"] != "" for r in tables[1]]
        for a, b in zip(tables[n], tables[1]):
            assert a["personal_local_acc"] == "" or abs(float(a["personal_local_acc"]) -
                                                       float(b["personal_local_acc"])) <= 1e-4
    assert "personal_local_acc" not in next(csv.DictReader((runs["fedavg"] / "nodes.csv").open()))

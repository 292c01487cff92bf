"""Personal layers under real `mpirun`: a shorter wire, the same run at any rank count, resumed exactly."""
import json

import numpy as np
import pytest
import torch
from conftest import SMALL, assert_world, fedmpi, read_metrics

from fedmpi.engine.models import build_model

FEDPER = ["personal_layers=[5]", "fraction=0.5", "lr=0.05"]
P, HEAD = 199_210, 200 * 10 + 10  # the 2nn's parameters; its last Linear ("5.weight", "5.bias")


def run(small_data, run_dir, ranks, *extra, env=None):
    return fedmpi(["run", "--set", *SMALL, small_data, *extra, "--out", str(run_dir)], ranks=ranks, env=env)


@pytest.fixture(scope="module")
def runs(small_data, tmp_path_factory):
    out = {}
    for n in (1, 2, 4):
        out[n] = tmp_path_factory.mktemp(f"fedper{n}")
        result = run(small_data, out[n], n, *FEDPER)
        assert result.returncode == 0, result.stderr
        assert_world(out[n], n)
    return out


def weights(run_dir):
    return torch.load(run_dir / "model.pt", weights_only=True)


def scores(run_dir):
    return [[r["test_acc"], r["local_acc_mean"], r["personal_local_acc_mean"]] for r in read_metrics(run_dir)]


def test_the_personal_layers_leave_the_wire(runs):
    for n in (1, 2, 4):
        assert all(r["payload_bytes"] == 4 * (P - HEAD) + 12 for r in read_metrics(runs[n]))


def test_the_same_run_at_any_rank_count(runs):
    ref = np.array(scores(runs[1]), dtype=float)
    assert ref.shape == (3, 3) and np.isfinite(ref).all()
    for n in (2, 4):
        assert np.max(np.abs(np.array(scores(runs[n]), dtype=float) - ref)) <= 1e-4
        for name, w in weights(runs[n]).items():
            assert torch.allclose(w, weights(runs[1])[name], rtol=1e-4, atol=1e-6), name


def test_the_main_models_personal_layers_keep_their_initial_values(runs):
    initial = dict(build_model("2nn", (1, 28, 28), 10, seed=0).named_parameters())
    final = weights(runs[1])
    assert torch.equal(final["5.weight"], initial["5.weight"].detach())
    assert not torch.equal(final["3.weight"], initial["3.weight"].detach())


def test_resume_restores_each_nodes_layers(small_data, tmp_path):
    args = [*FEDPER, "rounds=4", "checkpoint_every=1"]
    reference = tmp_path / "reference"
    assert run(small_data, reference, 2, *args).returncode == 0
    crashed = run(small_data, tmp_path / "run", 2, *args, env={"FEDMPI_FAULT": "raise:rank=1:round=3"})
    assert crashed.returncode != 0
    assert json.loads((tmp_path / "run" / "checkpoint" / "meta.json").read_text())["round"] == 2
    node_file = torch.load(next((tmp_path / "run" / "checkpoint").glob("nodes-*.pt")), weights_only=True)
    assert set(node_file) == {"first", "momentum", "layers"} and node_file["layers"].shape[1] == HEAD
    resumed = fedmpi(["run", "--resume", str(tmp_path / "run")], ranks=3)
    assert resumed.returncode == 0, resumed.stderr
    a, b = np.array(scores(reference), dtype=float), np.array(scores(tmp_path / "run"), dtype=float)
    assert a.shape == b.shape == (4, 3) and np.max(np.abs(a - b)) <= 1e-4

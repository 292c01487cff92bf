"""SCAFFOLD under real `mpirun`: the same run at any rank count, both halves in one Allreduce, resume."""
import json

import numpy as np
import pytest
import torch
from conftest import SMALL, assert_world, fedmpi, read_metrics

SCAFFOLD = ["algorithm=scaffold", "fraction=0.5", "lr=0.05"]
P = 199_210  # the 2nn's parameters


def run(small_data, run_dir, ranks, *extra, env=None):
    result = fedmpi(["run", "--set", *SMALL, small_data, *extra, "--out", str(run_dir)], ranks=ranks, env=env)
    return result


@pytest.fixture(scope="module")
def runs(small_data, tmp_path_factory):
    """SCAFFOLD at -n 1, 2 and 4, and FedAvg with the same settings at -n 1."""
    out = {}
    for n in (1, 2, 4):
        out[n] = tmp_path_factory.mktemp(f"scaffold{n}")
        result = run(small_data, out[n], n, *SCAFFOLD)
        assert result.returncode == 0, result.stderr
        assert_world(out[n], n)
    out["fedavg"] = tmp_path_factory.mktemp("fedavg")
    assert run(small_data, out["fedavg"], 1, *SCAFFOLD, "algorithm=fedavg").returncode == 0
    return out


def weights(run_dir):
    return torch.load(run_dir / "model.pt", weights_only=True)


def test_scaffold_gives_the_same_run_at_any_rank_count(runs):
    acc = {n: [r["test_acc"] for r in read_metrics(runs[n])] for n in (1, 2, 4)}
    assert len(acc[1]) == 3 and len(set(acc[1])) > 1
    for n in (2, 4):
        assert np.max(np.abs(np.subtract(acc[n], acc[1]))) <= 1e-4
        for name, w in weights(runs[n]).items():
            assert torch.allclose(w, weights(runs[1])[name], rtol=1e-4, atol=1e-6), name


def test_the_allreduce_carries_update_and_control_deltas_in_one_buffer(runs):
    for n in (1, 2, 4):
        for row in read_metrics(runs[n]):
            assert row["payload_bytes"] == 4 * 2 * P + 12  # [update | control delta | 3-value trailer]
            assert row["wire_bytes_est"] == round(2 * (n - 1) / n * row["payload_bytes"])
    assert all(r["payload_bytes"] == 4 * P + 12 for r in read_metrics(runs["fedavg"]))


def test_round_one_is_fedavgs_and_the_correction_acts_after_it(runs):
    scaffold, fedavg = read_metrics(runs[1]), read_metrics(runs["fedavg"])
    assert scaffold[0]["test_acc"] == fedavg[0]["test_acc"] and scaffold[0]["test_loss"] == fedavg[0]["test_loss"]
    a, b = weights(runs[1]), weights(runs["fedavg"])
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-4


def test_resume_restores_the_control_variates(small_data, tmp_path):
    """Crash at -n 2 in round 3, resume at -n 3: the same model as the uninterrupted run."""
    args = [*SCAFFOLD, "rounds=4", "checkpoint_every=1"]
    reference = tmp_path / "reference"
    assert run(small_data, reference, 2, *args).returncode == 0
    crashed = run(small_data, tmp_path / "run", 2, *args, env={"FEDMPI_FAULT": "raise:rank=1:round=3"})
    assert crashed.returncode != 0
    assert json.loads((tmp_path / "run" / "checkpoint" / "meta.json").read_text())["round"] == 2
    node_file = torch.load(next((tmp_path / "run" / "checkpoint").glob("nodes-*.pt")), weights_only=True)
    assert set(node_file) == {"first", "momentum", "control"}
    resumed = fedmpi(["run", "--resume", str(tmp_path / "run")], ranks=3)
    assert resumed.returncode == 0, resumed.stderr
    acc_a = [r["test_acc"] for r in read_metrics(reference)]
    acc_b = [r["test_acc"] for r in read_metrics(tmp_path / "run")]
    assert len(acc_b) == 4 and np.max(np.abs(np.subtract(acc_a, acc_b))) <= 1e-4
    wa, wb = weights(reference), weights(tmp_path / "run")
    for name in wa:
        assert torch.allclose(wa[name], wb[name], rtol=0, atol=1e-6), name


def test_an_abandoned_round_puts_the_control_variates_back():
    """A stop signal during training abandons the round: the trained nodes' c_i return to their values before it."""
    from types import SimpleNamespace

    from fedmpi.rounds import MomentumUndo

    state = {"momentum": torch.zeros(4, 3), "control": torch.arange(12.0).view(4, 3)}
    st = SimpleNamespace(engine=SimpleNamespace(state=lambda: state), cfg=SimpleNamespace(momentum=0.0))
    undo = MomentumUndo(st, np.array([1, 3]))
    before = state["control"].clone()
    state["control"][[1, 3]] = -1.0  # training moved them
    state["control"][0] = 7.0        # not in the round: not undone
    undo.restore()
    assert torch.equal(state["control"][[1, 3]], before[[1, 3]]) and (state["control"][0] == 7.0).all()


def test_scaffold_with_a_server_optimizer_is_the_same_at_1_and_3_ranks(small_data, tmp_path):
    args = [*SCAFFOLD, "server_opt=fedavgm", "server_lr=0.5"]
    one, three = (tmp_path / "n1"), (tmp_path / "n3")
    assert run(small_data, one, 1, *args).returncode == 0 and run(small_data, three, 3, *args).returncode == 0
    acc = [[r["test_acc"] for r in read_metrics(d)] for d in (one, three)]
    assert len(set(acc[0])) > 1 and np.max(np.abs(np.subtract(*acc))) <= 1e-4
    for name, w in weights(three).items():
        assert torch.allclose(w, weights(one)[name], rtol=1e-4, atol=1e-6), name

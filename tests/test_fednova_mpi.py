"""FedNova under real `mpirun`: FedAvg when steps are equal, the same run at any rank count under quantity skew."""
import numpy as np
import pytest
import torch
from conftest import SMALL, assert_world, fedmpi, read_metrics

PLAIN = ["momentum=0", "lr=0.05"]  # FedNova's normalization counts plain SGD steps
P = 199_210


def run(args, run_dir, ranks):
    result = fedmpi(["run", "--set", *SMALL, *PLAIN, *args, "--out", str(run_dir)], ranks=ranks)
    assert result.returncode == 0, result.stderr
    assert_world(run_dir, ranks)
    return run_dir


def weights(run_dir):
    return torch.load(run_dir / "model.pt", weights_only=True)


def max_diff(a, b):
    wa, wb = weights(a), weights(b)
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def test_with_equal_step_counts_fednova_is_fedavg(small_data, tmp_path):
    """Every node of the balanced split takes the same steps: tau_eff / tau_i = 1, up to rounding."""
    fedavg = run([small_data], tmp_path / "fedavg", 2)
    fednova = run([small_data, "algorithm=fednova"], tmp_path / "fednova", 2)
    assert max_diff(fedavg, fednova) <= 1e-6
    a, b = read_metrics(fedavg), read_metrics(fednova)
    assert np.max(np.abs(np.subtract([r["test_acc"] for r in a], [r["test_acc"] for r in b]))) <= 1e-4
    assert all(r["payload_bytes"] == 4 * (P + 1) + 12 for r in b)  # the step tally rides in the same buffer


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    """Quantity skew (node sizes from a lognormal), FedNova at -n 1, 2 and 4 and FedAvg at -n 1."""
    data = tmp_path_factory.mktemp("data") / "quantity.h5"
    skew = ["partition=quantity", "quantity_sigma=1.0", "samples_per_node=60", f"data_file={data}"]
    out = {n: run([*skew, "algorithm=fednova"], tmp_path_factory.mktemp(f"nova{n}"), n) for n in (1, 2, 4)}
    out["fedavg"] = run(skew, tmp_path_factory.mktemp("fedavg"), 1)
    return out


def test_fednova_under_quantity_skew_is_the_same_at_any_rank_count(skewed):
    acc = {n: [r["test_acc"] for r in read_metrics(skewed[n])] for n in (1, 2, 4)}
    assert len(set(acc[1])) > 1
    for n in (2, 4):
        assert np.max(np.abs(np.subtract(acc[n], acc[1]))) <= 1e-4
        assert max_diff(skewed[n], skewed[1]) <= 1e-5


def test_under_quantity_skew_fednova_moves_otherwise_than_fedavg(skewed):
    assert max_diff(skewed[1], skewed["fedavg"]) > 1e-4

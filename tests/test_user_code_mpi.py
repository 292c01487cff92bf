"""End to end under real `mpirun`: a model and a loss from the user's own module, named by import path."""
from __future__ import annotations

import pytest
import torch
from conftest import ROOT, SMALL, assert_world, fedmpi, read_metrics
from usercode import write_user_code

USER = ["model=usercode:small", "model_args={width: 12}", "loss=usercode:squared", "rounds=2", "central_epochs=0"]


def run(tmp_path, name, small_data, ranks, *values):
    out = tmp_path / name
    result = fedmpi(["run", "--set", *SMALL, small_data, *USER, "threads=1", *values, "--out", str(out)],
                    ranks=ranks, cwd=tmp_path, env={"PYTHONPATH": str(ROOT)}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert_world(out, ranks)
    return out


def relative_difference(a, b) -> float:
    wa, wb = (torch.load(d / "model.pt", weights_only=True) for d in (a, b))
    num = sum(float((wa[k] - wb[k]).pow(2).sum()) for k in wa)
    return (num / sum(float(wb[k].pow(2).sum()) for k in wb)) ** 0.5


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_data):
    folder = write_user_code(tmp_path_factory.mktemp("user"))
    return {(engine, ranks): run(folder, f"{engine}-{ranks}", small_data, ranks, f"engine={engine}")
            for engine, ranks in (("sequential", 1), ("batched", 2), ("batched", 1))}


def test_a_user_loss_trains_alike_in_the_batched_and_the_sequential_engine(runs):
    assert relative_difference(runs["batched", 2], runs["sequential", 1]) <= 1e-5
    assert relative_difference(runs["batched", 1], runs["sequential", 1]) <= 1e-5


def test_the_user_model_and_its_args_are_what_ran(runs):
    state = torch.load(runs["batched", 2] / "model.pt", weights_only=True)
    assert state["1.weight"].shape == (12, 784) and state["3.weight"].shape == (10, 12)  # width from model_args
    config = (runs["batched", 2] / "config.yaml").read_text()
    assert "model: usercode:small" in config and "width: 12" in config and "loss: usercode:squared" in config


def test_test_loss_is_the_user_loss(runs):
    # The squared error of a softmax against one-hot targets lies in [0, 2]; cross-entropy of an
    # untrained 10-class model starts near ln 10 = 2.3, so the reported loss is the user's.
    rows = read_metrics(runs["sequential", 1])
    assert len(rows) == 2 and all(0 <= r["test_loss"] <= 2 for r in rows)
    batched = read_metrics(runs["batched", 2])
    assert all(abs(r["test_acc"] - b["test_acc"]) <= 0.01 for r, b in zip(rows, batched))


def test_a_dropout_model_gives_the_same_accuracy_at_one_two_and_four_ranks(tmp_path, small_data):
    folder = write_user_code(tmp_path)
    accs, outs = {}, {}
    for engine, ranks in (("sequential", 1), ("batched", 1), ("batched", 2), ("batched", 4)):
        out = run(folder, f"dropout-{engine}-{ranks}", small_data, ranks, "model=usercode:dropout", "model_args={}",
                  "loss=cross_entropy", f"engine={engine}", "rounds=2", "lr=0.05")
        accs[engine, ranks], outs[engine, ranks] = [r["test_acc"] for r in read_metrics(out)], out
    assert accs["batched", 1] == accs["batched", 2] == accs["batched", 4], accs
    assert relative_difference(outs["batched", 2], outs["sequential", 1]) <= 1e-5  # the same masks, per node


def test_a_user_server_optimizer_steps_as_the_built_in_it_copies_and_resumes_from_its_checkpoint(tmp_path, small_data):
    folder = write_user_code(tmp_path)
    plain = ["model=2nn", "model_args={}", "loss=cross_entropy", "rounds=3", "checkpoint_every=1"]
    builtin = run(folder, "fedavgm", small_data, 2, *plain, "server_opt=fedavgm")
    user = run(folder, "velocity", small_data, 2, *plain, "server_opt=usercode:Velocity")
    assert relative_difference(user, builtin) <= 1e-6
    crashed = fedmpi(["run", "--set", *SMALL, small_data, *USER, "threads=1", *plain, "server_opt=usercode:Velocity",
                      "--out", str(folder / "crashed")], ranks=2, cwd=folder, timeout=300,
                     env={"PYTHONPATH": str(ROOT), "FEDMPI_FAULT": "raise:rank=1:round=3"})
    assert crashed.returncode != 0 and (folder / "crashed" / "checkpoint").is_dir()
    resumed = fedmpi(["run", "--resume", str(folder / "crashed")], ranks=3, cwd=folder, timeout=300,
                     env={"PYTHONPATH": str(ROOT)})
    assert resumed.returncode == 0, resumed.stderr
    assert relative_difference(folder / "crashed", user) <= 1e-6


@pytest.mark.parametrize("engine", ["batched", "sequential"])
def test_a_loss_giving_nan_makes_its_nodes_diverge_and_ends_the_job_with_exit_3(tmp_path, small_data, engine):
    folder = write_user_code(tmp_path)
    result = fedmpi(["run", "--set", *SMALL, small_data, *USER, "threads=1", "loss=usercode:loss_nan",
                     f"engine={engine}", "--out", str(folder / "nan")], ranks=2, cwd=folder, timeout=300,
                    env={"PYTHONPATH": str(ROOT)})
    assert result.returncode == 3, result.stderr
    assert "diverged (NaN/Inf) in round 1" in result.stderr and not (folder / "nan" / "model.pt").exists()

"""The README's "Your own model and data" under real `mpirun -n 2`: a TFF-layout file and an npz made with
h5py / numpy, imported by the real `fedmpi import`, run with the example model file (by import path, from
jobs/examples/user_model.yaml) and with the example script using the Python API."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, assert_world, fedmpi, mpi_env, mpirun_path, read_metrics
from importfiles import learnable_data, write_npz, write_tff

EXAMPLES = ROOT / "jobs" / "examples"
TRAIN = {"w01": 40, "w02": 30, "w03": 50, "w04": 25, "w05": 35}
TEST = {"w01": 10, "w02": 8, "w03": 12, "w04": 6, "w05": 9}
ENV = {"PYTHONPATH": f"{EXAMPLES}:{ROOT}"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The two shard files, made by `fedmpi import` from files written as users' tools write them."""
    folder = tmp_path_factory.mktemp("own")
    train = write_tff(folder / "train.h5", TRAIN, data=learnable_data, shape=(1, 8, 8))
    test = write_tff(folder / "test.h5", TEST, "test", data=learnable_data, shape=(1, 8, 8))
    result = fedmpi(["import", "tff", str(train), str(test), "--x", "pixels", "--y", "label", "--out",
                     str(folder / "tff.h5")])
    assert result.returncode == 0, result.stderr
    owners = np.repeat(np.arange(6), 30)
    xs, ys = zip(*(learnable_data(str(c), 1, (5,)) for c in owners))
    source = write_npz(folder / "arrays.npz", dict(x=np.concatenate(xs), y=np.concatenate(ys).astype(np.int64),
                                                   client_id=owners))
    result = fedmpi(["import", "npz", str(source), "--test-fraction", "0.25", "--out", str(folder / "npz.h5")])
    assert result.returncode == 0, result.stderr
    return folder


def script(args: list[str], ranks: int, cwd):
    """`mpirun -n RANKS python jobs/examples/my_experiment.py ARGS`, as the README shows it."""
    cmd = [mpirun_path(), "-n", str(ranks), sys.executable, str(EXAMPLES / "my_experiment.py"), *args]
    env = dict(os.environ, **mpi_env(), PYTHONPATH=str(ROOT))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


def test_the_example_model_file_runs_a_converted_federated_file(files):
    out = files / "user_model"
    result = fedmpi(["run", "--config", str(EXAMPLES / "user_model.yaml"), "--set", f"data_file={files}/tff.h5",
                     "threads=1", "--out", str(out)], ranks=2, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr
    assert_world(out, 2)
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [1, 2, 3] and rows[-1]["test_acc"] > 1 / 6  # better than chance
    state = torch.load(out / "model.pt", weights_only=True)
    assert state["0.weight"].shape == (8, 1, 3, 3) and "1.running_mean" in state  # width 8, BatchNorm2d
    assert "model: models:small_cnn" in (out / "config.yaml").read_text()


def test_the_batched_engine_trains_the_example_model_as_the_sequential_one(files):
    runs = {}
    for engine in ("sequential", "batched"):
        out = files / f"example-{engine}"
        result = fedmpi(["run", "--config", str(EXAMPLES / "user_model.yaml"), "--set", f"data_file={files}/tff.h5",
                         f"engine={engine}", "threads=1", "--out", str(out)], ranks=2, env=ENV, timeout=300)
        assert result.returncode == 0, result.stderr
        runs[engine] = torch.load(out / "model.pt", weights_only=True)
    seq, bat = runs["sequential"], runs["batched"]
    keys = [k for k in seq if seq[k].is_floating_point()]  # BatchNorm's running statistics among them
    assert any("running_var" in k for k in keys)
    num = sum(float((bat[k] - seq[k]).pow(2).sum()) for k in keys)
    assert (num / sum(float(seq[k].pow(2).sum()) for k in keys)) ** 0.5 <= 1e-5


@pytest.mark.parametrize("name", ["tff", "npz"])
def test_the_example_script_runs_both_files_alike_at_one_and_two_ranks(files, name):
    runs = {}
    for ranks in (1, 2):
        out = files / f"script-{name}-{ranks}"
        result = script([str(files / f"{name}.h5"), "--out", str(out), "--rounds", "3"], ranks, files)
        assert result.returncode == 0, result.stderr
        lines = [line for line in result.stdout.splitlines() if line.startswith("round ") and "test accuracy" in line]
        assert [line.split(":")[0] for line in lines] == ["round 1", "round 2", "round 3"]  # rank 0 alone prints
        assert_world(out, ranks)
        runs[ranks] = read_metrics(out)
    assert [r["test_acc"] for r in runs[1]] == [r["test_acc"] for r in runs[2]]
    assert runs[2][-1]["test_acc"] > runs[2][0]["test_acc"] or runs[2][0]["test_acc"] == 1.0
    config = (files / f"script-{name}-2" / "config.yaml").read_text()
    assert "model: __main__:Classifier" in config and "hidden: 32" in config
    assert "loss: __main__:squared_error" in config

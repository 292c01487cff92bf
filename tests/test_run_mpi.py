"""The real job under real `mpirun`: rank invariance, outputs, and failures that must end every rank."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import SMALL, assert_world, expected_mpi_library, fedmpi, read_metrics

FIELDS = ["round", "test_acc", "test_loss", "central_acc", "t_round", "t_train_max", "t_train_mean", "t_wait",
          "t_allreduce", "payload_bytes", "wire_bytes_est", "local_acc_mean", "local_acc_min", "local_acc_max",
          "main_on_local_acc_mean", "main_on_local_acc_min", "main_on_local_acc_max"]


@pytest.fixture(scope="module")
def runs(small_data, tmp_path_factory):
    """The same small job at -n 1, 2 and 4."""
    out = {}
    for n in (1, 2, 4):
        run_dir = tmp_path_factory.mktemp(f"n{n}")
        result = fedmpi(["run", "--set", *SMALL, small_data, "--out", str(run_dir)], ranks=n)
        assert result.returncode == 0, result.stderr
        assert_world(run_dir, n)
        out[n] = run_dir
    return out


def test_same_accuracy_per_round_and_near_equal_weights_at_any_rank_count(runs):
    acc = {n: [r["test_acc"] for r in read_metrics(d)] for n, d in runs.items()}
    assert len(acc[1]) == 3 and len(set(acc[1])) > 1  # the model is still learning: a real comparison
    for n in (2, 4):
        assert np.max(np.abs(np.array(acc[n]) - np.array(acc[1]))) <= 1e-4
        for name, w in torch.load(runs[n] / "model.pt", weights_only=True).items():
            w1 = torch.load(runs[1] / "model.pt", weights_only=True)[name]
            assert torch.allclose(w, w1, rtol=1e-4, atol=1e-6), name


def test_metrics_rows_carry_the_communication_cost(runs):
    for n, run_dir in runs.items():
        rows = read_metrics(run_dir)
        assert [r["round"] for r in rows] == [1, 2, 3]
        for row in rows:
            assert all(row.get(k) is not None for k in FIELDS), [k for k in FIELDS if row.get(k) is None]
            assert row["payload_bytes"] == 4 * 199_210 + 12
            assert row["wire_bytes_est"] == round(2 * (n - 1) / n * row["payload_bytes"])
            # t_train_max >= t_train_mean is arithmetic (max and mean of the same numbers); nothing
            # orders t_round against them: another rank may train longer than rank 0's round.
            assert row["t_train_max"] >= row["t_train_mean"] > 0 and row["t_round"] > 0
            assert 0 <= row["local_acc_min"] <= row["local_acc_mean"] <= row["local_acc_max"] <= 1
        with open(run_dir / "metrics.csv") as f:
            assert [int(r["round"]) for r in csv.DictReader(f)] == [1, 2, 3]


def test_run_directory_outputs(runs):
    run_dir = runs[4]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["world_size"] == 4 and info["nodes_per_rank"] == [2, 2, 2, 2]
    assert info["devices"] == ["cpu"] * 4 and expected_mpi_library() in info["mpi_library"] and info["torch_version"]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["nodes"] == 8
    with open(run_dir / "nodes.csv") as f:
        nodes = list(csv.DictReader(f))
    assert [int(r["node"]) for r in nodes] == list(range(8))
    assert [int(r["rank"]) for r in nodes] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert {r["samples"] for r in nodes} == {"40"}
    last = read_metrics(run_dir)[-1]
    assert np.isclose(np.mean([float(r["main_on_local_acc"]) for r in nodes]), last["main_on_local_acc_mean"])
    state = torch.load(run_dir / "model.pt", weights_only=True)
    assert sum(v.numel() for v in state.values()) == 199_210


def test_central_baseline_is_cached_for_a_rerun(small_data, tmp_path):
    for expected in (False, True):
        result = fedmpi(["run", "--set", *SMALL, small_data, "rounds=1", "--out", str(tmp_path), "--overwrite"],
                        ranks=2)
        assert result.returncode == 0, result.stderr
    central = json.loads((tmp_path / "central.json").read_text())
    assert central["cached"] is True and len(central["test_acc"]) == 1
    assert read_metrics(tmp_path)[0]["central_acc"] == central["test_acc"][-1]


def test_run_prepares_a_missing_shard_file_on_rank_0(tmp_path):
    data = tmp_path / "made-by-run.h5"
    result = fedmpi(["run", "--set", *SMALL, f"data_file={data}", "rounds=1", "central_epochs=0",
                     "--out", str(tmp_path / "run")], ranks=3)
    assert result.returncode == 0, result.stderr
    assert data.is_file() and read_metrics(tmp_path / "run")[0]["central_acc"] is None


def test_an_exception_on_one_rank_ends_the_whole_job_quickly(small_data, tmp_path):
    result = fedmpi(["run", "--set", *SMALL, small_data, "--out", str(tmp_path)], ranks=3, timeout=180,
                    env={"FEDMPI_FAULT": "raise:rank=1:round=2"})
    assert result.returncode != 0
    assert result.stderr.count("injected fault (FEDMPI_FAULT) on rank 1 in round 2") == 1
    assert [r["round"] for r in read_metrics(tmp_path)] == [1]  # the finished round is on disk


@pytest.mark.parametrize("args,message", [
    (["--set", "nodes=2"], "3 MPI ranks but only 2 nodes"),
    (["--set", "learning_rate=0.1"], "unknown config key 'learning_rate'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--set", "dataset=mnist", "data_dir=/nonexistent/dir"], "data_dir /nonexistent/dir does not exist"),
])
def test_bad_input_gives_one_line_and_exit_code_2_on_every_rank_count(small_data, tmp_path, args, message):
    full = ["run", "--set", *SMALL, small_data] if "nodes=2" in args else ["run"]
    if "data_dir=/nonexistent/dir" in args:
        full = ["run", "--set", *SMALL, f"data_file={tmp_path}/absent.h5"]
    result = fedmpi(full + args + ["--out", str(tmp_path)], ranks=3, timeout=180)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("fedmpi: error")]
    assert len(errors) == 1 and message in errors[0], result.stderr


def test_a_diverged_node_is_left_out_of_that_rounds_average_and_scores(small_data, tmp_path):
    result = fedmpi(["run", "--set", *SMALL, small_data, "--out", str(tmp_path)], ranks=2,
                    env={"FEDMPI_FAULT": "nan:node=5:round=2,nan:node=2:round=3"})
    assert result.returncode == 0, result.stderr
    assert "node 5 (rank 1) diverged (NaN/Inf) in round 2" in result.stderr
    rows = read_metrics(tmp_path)
    assert [r["nodes_dropped"] for r in rows] == [0, 1, 1]
    assert all(np.isfinite(r["test_loss"]) for r in rows)
    # nodes.csv holds round 3: node 2 has no local model to score, and the row's mean leaves it out.
    with open(tmp_path / "nodes.csv") as f:
        local = {int(r["node"]): r["local_acc"] for r in csv.DictReader(f)}
    assert local[2] == "" and all(local[n] != "" for n in local if n != 2)
    kept = [float(a) for n, a in local.items() if n != 2]
    assert np.isclose(rows[2]["local_acc_mean"], np.mean(kept)) and rows[2]["local_acc_min"] == min(kept)
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values())


def test_too_many_diverged_nodes_stop_the_job_and_keep_the_last_checkpoint(small_data, tmp_path):
    result = fedmpi(["run", "--set", *SMALL, small_data, "max_dropped_fraction=0", "checkpoint_every=1",
                     "--out", str(tmp_path)], ranks=2, env={"FEDMPI_FAULT": "nan:node=0:round=2"})
    assert result.returncode == 3
    assert "1 of 8 nodes diverged (NaN/Inf) in round 2" in result.stderr
    assert json.loads((tmp_path / "checkpoint" / "meta.json").read_text())["round"] == 1
    assert [r["round"] for r in read_metrics(tmp_path)] == [1]


def test_sampling_compression_and_a_server_optimizer_agree_across_rank_counts(small_data, tmp_path):
    """C=0.5 of the nodes per round, the update sent in fp16, FedAvgM on the server: -n 1 == -n 3."""
    from fedmpi.fl.sampling import select_nodes

    extra = ["fraction=0.5", "update_dtype=fp16", "server_opt=fedavgm", "server_momentum=0.5"]
    rows = {}
    for n in (1, 3):
        result = fedmpi(["run", "--set", *SMALL, small_data, *extra, "--out", str(tmp_path / f"n{n}")], ranks=n)
        assert result.returncode == 0, result.stderr
        rows[n] = read_metrics(tmp_path / f"n{n}")
    assert [r["test_acc"] for r in rows[1]] == [r["test_acc"] for r in rows[3]]
    for row in rows[3]:
        assert row["nodes_selected"] == 4 and row["update_dtype"] == "fp16"
        assert row["payload_bytes"] == 2 * (199_210 + 3) and row["bytes_saved"] == row["payload_bytes"]
    with open(tmp_path / "n3" / "nodes.csv") as f:
        trained = [int(r["node"]) for r in csv.DictReader(f) if r["local_acc"] != ""]
    assert trained == select_nodes(8, 0.5, 0, 3).tolist()  # only the round's selection trained


def test_the_server_optimizer_changes_the_trajectory(small_data, tmp_path):
    accs = {}
    for opt in ("none", "fedadam"):
        result = fedmpi(["run", "--set", *SMALL, small_data, f"server_opt={opt}", "--out", str(tmp_path / opt)],
                        ranks=2)
        assert result.returncode == 0, result.stderr
        accs[opt] = [r["test_acc"] for r in read_metrics(tmp_path / opt)]
    assert accs["none"] != accs["fedadam"]


def test_a_round_in_which_every_node_diverges_leaves_the_main_model_as_it_was(small_data, tmp_path):
    """max_dropped_fraction 1 lets a round lose all its nodes: nothing to average, one line, the row says so."""
    every = ",".join(f"nan:node={n}:round=2" for n in range(8))
    result = fedmpi(["run", "--set", *SMALL, small_data, "central_epochs=0", "max_dropped_fraction=1.0",
                     "--out", str(tmp_path)], ranks=2, env={"FEDMPI_FAULT": every})
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("all 8 nodes diverged (NaN/Inf) in round 2; the main model") == 1
    assert "Traceback" not in result.stderr
    first, second, third = read_metrics(tmp_path)
    assert second["nodes_dropped"] == second["nodes_selected"] == 8 and second["local_acc_mean"] is None
    # The main model did not move: the same scores as after round 1, then round 3 trains on.
    for key in ("test_acc", "test_loss", "main_on_local_acc_mean"):
        assert second[key] == first[key], key
    assert third["nodes_dropped"] == 0 and third["test_loss"] != second["test_loss"]


def distance_moved(run_dir, reference, start):
    """||w - w_ref|| / ||w_ref - w_start|| over all parameters of two runs' model.pt."""
    w = torch.load(run_dir / "model.pt", weights_only=True)
    diff = sum(float((w[k] - reference[k]).double().norm() ** 2) for k in w) ** 0.5
    moved = sum(float((reference[k] - start[k]).double().norm() ** 2) for k in w) ** 0.5
    return diff / moved


def test_compressed_updates_with_dropped_nodes_follow_fp32_within_the_codecs_rounding(small_data, tmp_path):
    """Half the nodes (both ranks) diverge in round 2 of 2: the mean over the other half must be
    rescaled the same way in fp16 and bf16 as in fp32. Measured: the codec's rounding moves the
    final model by 2.4e-4 (fp16) and 4.0e-3 (bf16) of the distance it travelled; leaving the share
    out (no rescale) moved it by 0.34."""
    from fedmpi.data.shards import read_attrs
    from fedmpi.engine.models import build_model

    fault = {"FEDMPI_FAULT": ",".join(f"nan:node={n}:round=2" for n in (1, 2, 5, 6))}
    for dtype in ("fp32", "fp16", "bf16"):
        result = fedmpi(["run", "--set", *SMALL, small_data, "rounds=2", "central_epochs=0", f"update_dtype={dtype}",
                         "--out", str(tmp_path / dtype)], ranks=2, env=fault)
        assert result.returncode == 0, result.stderr
        assert [r["nodes_dropped"] for r in read_metrics(tmp_path / dtype)] == [0, 4]
    attrs = read_attrs(Path(small_data.split("=", 1)[1]))
    model = build_model("2nn", tuple(attrs["input_shape"]), int(attrs["classes"]), 0)
    start = model.state_dict()
    reference = torch.load(tmp_path / "fp32" / "model.pt", weights_only=True)
    assert distance_moved(tmp_path / "fp32", reference, start) == 0
    for dtype, bound in (("fp16", 2e-3), ("bf16", 1.5e-2)):
        assert 0 < distance_moved(tmp_path / dtype, reference, start) <= bound, dtype


def test_unequal_shards_and_short_batches_give_the_same_accuracy_at_1_and_3_ranks(tmp_path):
    """quantity partition: node sizes from 3 to ~150 samples with batch 8, most epochs ending on a short batch."""
    data = f"data_file={tmp_path / 'quantity.h5'}"
    common = [*SMALL, "partition=quantity", "quantity_sigma=1.0", "central_epochs=0", "local_epochs=2", data]
    rows = {}
    for n in (1, 3):
        result = fedmpi(["run", "--set", *common, "--out", str(tmp_path / f"n{n}")], ranks=n)
        assert result.returncode == 0, result.stderr
        rows[n] = read_metrics(tmp_path / f"n{n}")
    with open(tmp_path / "n3" / "nodes.csv") as f:
        sizes = [int(r["samples"]) for r in csv.DictReader(f)]
    assert len(set(sizes)) > 4 and sum(s % 8 != 0 for s in sizes) >= 4  # really unequal, really short batches
    acc = {n: [r["test_acc"] for r in rows[n]] for n in rows}
    assert len(set(acc[1])) > 1 and acc[3] == acc[1]
    assert [r["local_acc_mean"] for r in rows[3]] == [r["local_acc_mean"] for r in rows[1]]

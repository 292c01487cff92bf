"""DP-FedAvg and secure aggregation in the real job under real `mpirun`: rank invariance, the accountant,
the masked sum, checkpoint and resume."""
import json

import dp_accounting
import numpy as np
import pytest
import torch
from conftest import SMALL, assert_world, fedmpi, read_metrics

from fedmpi.fl.accounting import default_delta

PARAMS = 199_210  # the 2nn on the synthetic 28x28 inputs
# Poisson sampling, adaptive clipping from a clip small enough that most updates are clipped at first.
DP = ["dp=gaussian", "dp_noise_multiplier=0.8", "dp_clip=0.05", "fraction=0.5", "sampling=poisson",
      "dp_clip_quantile=0.5", "dp_clip_lr=0.5", "threads=1"]


def job(small_data, run_dir, ranks, *extra):
    result = fedmpi(["run", "--set", *SMALL, small_data, *DP, *extra, "--out", str(run_dir)], ranks=ranks, timeout=300)
    assert result.returncode == 0, result.stderr
    assert_world(run_dir, ranks)
    return run_dir


def model(run_dir):
    return torch.load(run_dir / "model.pt", weights_only=True)


@pytest.fixture(scope="module")
def dp_runs(small_data, tmp_path_factory):
    return {n: job(small_data, tmp_path_factory.mktemp(f"dp{n}"), n) for n in (1, 2, 4)}


@pytest.fixture(scope="module")
def secure_runs(small_data, tmp_path_factory):
    return {n: job(small_data, tmp_path_factory.mktemp(f"sa{n}"), n, "secure_aggregation=true") for n in (1, 2, 3, 4)}


def test_dp_results_and_the_adaptive_clip_are_the_same_at_any_rank_count(dp_runs):
    rows = {n: read_metrics(d) for n, d in dp_runs.items()}
    clips = [r["dp_clip"] for r in rows[1]]
    assert clips[0] == 0.05 and len(set(clips)) == 3  # the clip moved every round
    for n in (2, 4):
        assert [r["dp_epsilon"] for r in rows[n]] == [r["dp_epsilon"] for r in rows[1]]
        assert np.allclose([r["dp_clip"] for r in rows[n]], clips, rtol=1e-6)
        assert np.allclose([r["test_acc"] for r in rows[n]], [r["test_acc"] for r in rows[1]], atol=1e-4)
        for name, w in model(dp_runs[n]).items():
            assert torch.allclose(w, model(dp_runs[1])[name], rtol=1e-4, atol=1e-6), name


def test_each_round_reports_clip_share_clipped_noise_and_hides_the_participant_count(dp_runs):
    for row in read_metrics(dp_runs[2]):
        assert row["dp_noise_stddev"] == pytest.approx(0.8 * row["dp_clip"])
        assert 0 <= row["dp_clipped_share"] <= 1 and row["dp_next_clip"] > 0
        assert row["nodes_selected"] is None  # under Poisson sampling the round's size is private
        assert row["payload_bytes"] == 4 * (PARAMS + 4)  # one more trailer slot: the unclipped count


def test_epsilon_equals_a_direct_dp_accounting_computation(dp_runs):
    nodes, q, z = 8, 0.5, 0.8
    sigma_b = q * nodes / 20  # the default count stddev: expected nodes / 20
    z_eff = (z ** -2 + (2 * sigma_b) ** -2) ** -0.5
    delta = 1 / nodes ** 1.1
    assert default_delta(nodes) == pytest.approx(delta)
    rows = read_metrics(dp_runs[1])
    assert len(rows) == 3
    for rnd, row in enumerate(rows, 1):
        event = dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z_eff)), rnd)
        direct = dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(delta)
        assert row["dp_epsilon"] == pytest.approx(direct, rel=1e-9)
    info = json.loads((dp_runs[1] / "run.json").read_text())
    assert info["dp_epsilon"] == rows[-1]["dp_epsilon"] and info["dp_noise_multiplier"] == z
    assert info["dp_delta"] == pytest.approx(delta) and info["dp_clip_count_stddev"] == pytest.approx(sigma_b)


def test_secure_aggregation_gives_the_unmasked_quantized_sum_bit_for_bit_at_any_rank_count(secure_runs):
    # -n 1 has no peer and adds no mask: its ring sum is the unmasked quantized sum. Every other rank
    # count masks each rank's buffer; equal weights bit for bit mean the masks cancelled exactly, and
    # (the noise being added after the sum on every rank) that every rank drew the same noise: a rank
    # with other noise would have trained its nodes from another main model in rounds 2 and 3.
    ref = model(secure_runs[1])
    for n in (2, 3, 4):
        for name, w in model(secure_runs[n]).items():
            assert torch.equal(w, ref[name]), (n, name)
        rows = read_metrics(secure_runs[n])
        assert [r["dp_clip"] for r in rows] == [r["dp_clip"] for r in read_metrics(secure_runs[1])]
        for row in rows:
            assert row["secagg_bytes"] == row["payload_bytes"] == 8 * (PARAMS + 4)
            assert row["secagg_t_mask"] > 0


def test_secure_aggregation_matches_the_float_sum_within_the_quantization_error(secure_runs, dp_runs):
    float_acc = [r["test_acc"] for r in read_metrics(dp_runs[1])]
    assert np.allclose([r["test_acc"] for r in read_metrics(secure_runs[1])], float_acc, atol=1e-3)


def test_dp_with_fp16_updates_carries_the_unclipped_count_exactly(small_data, tmp_path):
    ref = read_metrics(job(small_data, tmp_path / "n1", 1, "update_dtype=fp16"))
    rows = read_metrics(job(small_data, tmp_path / "n3", 3, "update_dtype=fp16"))
    assert [r["dp_clipped_share"] for r in rows] == [r["dp_clipped_share"] for r in ref]
    assert [r["dp_clip"] for r in rows] == [r["dp_clip"] for r in ref]


def test_a_resumed_dp_run_carries_the_adaptive_clip_and_equals_an_uninterrupted_one(small_data, tmp_path):
    whole = job(small_data, tmp_path / "whole", 2, "rounds=4")
    part = job(small_data, tmp_path / "part", 2, "rounds=2", "checkpoint_every=2")
    meta = json.loads((part / "checkpoint" / "meta.json").read_text())
    assert meta["dp_clip"] == read_metrics(part)[-1]["dp_next_clip"]
    result = fedmpi(["run", "--resume", str(part), "--set", "rounds=4"], ranks=2, timeout=300)
    assert result.returncode == 0, result.stderr
    a, b = read_metrics(whole), read_metrics(part)
    for key in ("dp_clip", "dp_epsilon", "test_acc"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    for name, w in model(whole).items():
        assert torch.equal(w, model(part)[name]), name


def test_a_checkpoint_with_a_hostile_clip_is_one_line_naming_its_file(small_data, tmp_path):
    part = job(small_data, tmp_path / "part", 1, "rounds=2", "checkpoint_every=1")
    path = part / "checkpoint" / "meta.json"
    meta = json.loads(path.read_text())
    meta["dp_clip"] = -1e308
    path.write_text(json.dumps(meta))
    result = fedmpi(["run", "--resume", str(part), "--set", "rounds=3"], ranks=2, timeout=120)
    errors = [line for line in result.stderr.splitlines() if line.startswith("fedmpi: error")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert "meta.json" in errors[0] and "'dp_clip' must be a finite number > 0" in errors[0]


def test_each_update_is_clipped_before_the_sum_so_a_tiny_clip_holds_the_model_still(small_data, tmp_path):
    from fedmpi.data.shards import read_attrs
    from fedmpi.engine.models import build_model

    args = ["run", "--set", *SMALL, small_data, "dp=gaussian", "dp_noise_multiplier=0", "dp_clip=1e-4",
            "--out", str(tmp_path / "r")]
    assert fedmpi(args, ranks=2, timeout=300).returncode == 0
    attrs = read_attrs(small_data.partition("=")[2])
    start = build_model("2nn", tuple(attrs["input_shape"]), int(attrs["classes"]), 0).state_dict()
    moved = torch.cat([(w - start[name]).flatten() for name, w in model(tmp_path / "r").items()])
    # 3 rounds, each moving by the mean of 8 updates of norm <= 1e-4 (server_lr 1): unclipped, they move ~0.1
    assert 0 < torch.linalg.vector_norm(moved.double()) <= 3e-4 * (1 + 1e-4)
    assert read_metrics(tmp_path / "r")[0]["dp_clipped_share"] == 1.0

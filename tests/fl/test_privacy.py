"""DP-FedAvg's pure pieces against hand-computed arrays: clipping, the server's noise, adaptive clipping."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

from fedmpi.fl.privacy import (
    COUNT_NOISE_STREAM,
    UPDATE_NOISE_STREAM,
    clip_factors,
    clip_updates,
    gaussian_noise,
    next_clip,
    noised_mean,
    noised_unclipped_fraction,
    poisson_selection,
    server_round,
)


def test_clipping_projects_each_row_onto_the_ball_and_reports_norms_and_which_rows_were_clipped():
    updates = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0], [0.0, -1.0]])
    clipped, clipping = clip_updates(updates, clip=1.0)
    assert torch.allclose(clipped, torch.tensor([[0.6, 0.8], [0.3, 0.4], [0.0, 0.0], [0.0, -1.0]]))
    assert torch.allclose(clipping.norms, torch.tensor([5.0, 0.5, 0.0, 1.0]))
    assert torch.allclose(clipping.scale, torch.tensor([0.2, 1.0, 1.0, 1.0]))
    # b_k = 1[norm <= S]: a row exactly at the clip counts as unclipped (Andrew et al. 2021)
    assert clipping.unclipped.tolist() == [False, True, True, True]
    assert clipping.count_unclipped() == 3


def test_clip_factors_fold_into_a_weighted_sum_equal_to_summing_the_clipped_rows():
    gen = torch.Generator().manual_seed(0)
    updates = torch.randn(16, 50, generator=gen) * torch.logspace(-2, 1, 16)[:, None]
    clipped, _ = clip_updates(updates, clip=0.7)
    scale = clip_factors(updates, clip=0.7).scale
    assert torch.allclose(updates.t() @ scale, clipped.sum(0), rtol=1e-5, atol=1e-6)
    norms = torch.linalg.vector_norm(clipped, dim=1)
    assert bool((norms <= 0.7 * (1 + 1e-6)).all())
    small = torch.linalg.vector_norm(updates, dim=1) <= 0.7
    assert torch.equal(clipped[small], updates[small])  # rows inside the ball are untouched


def test_a_nan_row_stays_visible_instead_of_being_clipped_to_something_finite():
    clipped, clipping = clip_updates(torch.tensor([[float("nan"), 1.0], [0.5, 0.0]]), clip=1.0)
    assert torch.isnan(clipped[0]).all() and torch.equal(clipped[1], torch.tensor([0.5, 0.0]))
    assert clipping.unclipped.tolist() == [False, True]


@pytest.mark.parametrize("clip", [0.0, -1.0, float("inf"), float("nan")])
def test_clipping_rejects_a_clip_that_is_not_a_positive_finite_number(clip):
    with pytest.raises(ValueError, match="clip"):
        clip_factors(torch.ones(2, 3), clip)


def test_noise_is_a_function_of_seed_and_round_only_with_the_requested_stddev():
    a = gaussian_noise(200_000, 0.5, seed=7, rnd=3)
    assert a.dtype == torch.float32
    assert torch.equal(a, gaussian_noise(200_000, 0.5, seed=7, rnd=3))
    assert not torch.equal(a[:100], gaussian_noise(100, 0.5, seed=7, rnd=4))
    assert not torch.equal(a[:100], gaussian_noise(100, 0.5, seed=8, rnd=3))
    assert not torch.equal(a[:100], gaussian_noise(100, 0.5, seed=7, rnd=3, stream=COUNT_NOISE_STREAM))
    assert abs(float(a.std()) - 0.5) < 0.005 and abs(float(a.mean())) < 0.005
    # the first values are a prefix-stable draw: a longer vector starts with the shorter one
    assert torch.equal(a[:1000], gaussian_noise(1000, 0.5, seed=7, rnd=3))


def test_noise_is_the_numpy_stream_of_seed_stream_round_scaled():
    expected = np.random.default_rng([5, UPDATE_NOISE_STREAM, 2]).standard_normal(10, dtype=np.float32) * np.float32(3)
    assert np.array_equal(gaussian_noise(10, 3.0, seed=5, rnd=2).numpy(), expected)


def test_noise_bits_are_the_same_in_another_process_with_another_hash_seed():
    """What every rank does: an independent interpreter draws the same bits (no hash() or global state)."""
    code = "from fedmpi.fl.privacy import gaussian_noise; print(gaussian_noise(64, 1.5, 11, 9).numpy().tobytes().hex())"
    env = dict(os.environ, PYTHONHASHSEED="123", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True)
    assert out.stdout.strip() == gaussian_noise(64, 1.5, 11, 9).numpy().tobytes().hex()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_noise_on_a_gpu_has_the_cpu_bits():
    on_gpu = gaussian_noise(1000, 2.0, 1, 1, device=torch.device("cuda"))
    assert on_gpu.is_cuda and torch.equal(on_gpu.cpu(), gaussian_noise(1000, 2.0, 1, 1))


def test_noised_mean_adds_z_times_clip_noise_to_the_sum_and_divides_by_the_expected_count():
    summed = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(noised_mean(summed, clip=0.5, noise_multiplier=0.0, expected_nodes=4, seed=1, rnd=1),
                       torch.tensor([0.25, 0.5, 0.75]))
    draw = np.random.default_rng([1, UPDATE_NOISE_STREAM, 6]).standard_normal(3, dtype=np.float32)
    expected = (np.array([1, 2, 3], np.float32) + draw * np.float32(2 * 0.5)) / np.float32(4)
    got = noised_mean(summed, clip=0.5, noise_multiplier=2.0, expected_nodes=4, seed=1, rnd=6)
    assert np.allclose(got.numpy(), expected, rtol=1e-6, atol=0)


def test_noised_fraction_centres_the_count_and_uses_the_fixed_denominator():
    # sigma_b = 0: (u - k/2) / W + 1/2
    assert noised_unclipped_fraction(3, 4, 4, 0.0, seed=1, rnd=1) == 0.75
    assert noised_unclipped_fraction(3, 4, 8, 0.0, seed=1, rnd=1) == 0.625  # (3 - 2) / 8 + 0.5
    assert noised_unclipped_fraction(10, 10, 5, 0.0, seed=1, rnd=1) == 1.0   # 1.5 clamped
    assert noised_unclipped_fraction(0, 10, 5, 0.0, seed=1, rnd=1) == 0.0    # -0.5 clamped
    noise = float(np.random.default_rng([1, COUNT_NOISE_STREAM, 2]).standard_normal(1, dtype=np.float32)[0]) * 2.0
    got = noised_unclipped_fraction(30, 50, 50, 2.0, seed=1, rnd=2)
    assert math.isclose(got, (30 - 25 + noise) / 50 + 0.5, rel_tol=1e-6)
    with pytest.raises(ValueError, match="unclipped count"):
        noised_unclipped_fraction(5, 4, 4, 0.0, seed=1, rnd=1)


def test_the_clip_moves_geometrically_against_the_gap_to_the_target_quantile():
    assert math.isclose(next_clip(1.0, 0.75, 0.5, 0.2), math.exp(-0.05))  # too many unclipped: shrink
    assert math.isclose(next_clip(2.0, 0.0, 0.5, 0.2), 2.0 * math.exp(0.1))  # all clipped: grow
    assert next_clip(2.0, 0.5, 0.5, 0.2) == 2.0


def test_adaptive_clip_converges_to_the_target_quantile_of_a_synthetic_norm_distribution():
    """Andrew et al. 2021: with noised counts, the clip settles where a fraction gamma of norms lie below it."""
    rng = np.random.default_rng(0)
    for gamma in (0.3, 0.5, 0.8):
        clip, levels = 0.01, []
        for rnd in range(1, 601):
            norms = rng.lognormal(mean=0.0, sigma=1.0, size=100)
            unclipped = int((norms <= clip).sum())
            fraction = noised_unclipped_fraction(unclipped, 100, 100, count_stddev=2.0, seed=3, rnd=rnd)
            clip = next_clip(clip, fraction, gamma, clip_lr=0.2)
            if rnd > 300:
                levels.append(float((rng.lognormal(0.0, 1.0, 20_000) <= clip).mean()))
        assert abs(np.mean(levels) - gamma) < 0.03, (gamma, np.mean(levels))


def test_server_round_with_adaptive_clipping_reports_the_clip_used_and_the_next_one():
    summed = torch.zeros(5)
    out = server_round(summed, 1.0, 0.0, 10, seed=1, rnd=1,
                       adaptive=dict(unclipped=10, participants=10, count_stddev=0.0, target_quantile=0.5, clip_lr=0.2))
    assert out.clip == 1.0 and out.unclipped_fraction == 1.0 and math.isclose(out.next_clip, math.exp(-0.1))
    assert out.noise_stddev == 0.0 and torch.equal(out.mean, torch.zeros(5))
    fixed = server_round(summed, 1.0, 1.2, 10, seed=1, rnd=1)
    assert fixed.next_clip == 1.0 and fixed.unclipped_fraction is None and math.isclose(fixed.noise_stddev, 1.2)
    assert torch.equal(fixed.mean, gaussian_noise(5, 1.2, 1, 1) / 10)


def test_poisson_selection_takes_each_node_independently_with_probability_q_seeded_by_round_only():
    rounds = [poisson_selection(200, 0.1, seed=4, rnd=r) for r in range(1, 2001)]
    assert np.array_equal(rounds[0], poisson_selection(200, 0.1, seed=4, rnd=1))
    assert all(np.all(np.diff(r) > 0) and (len(r) == 0 or (r[0] >= 0 and r[-1] < 200)) for r in rounds)
    counts = np.zeros(200)
    for r in rounds:
        counts[r] += 1
    assert abs(counts.mean() / 2000 - 0.1) < 0.003 and counts.min() > 140 and counts.max() < 270  # ~ Bin(2000, 0.1)
    sizes = np.array([len(r) for r in rounds])
    assert len(set(sizes.tolist())) > 10 and abs(sizes.var() - 200 * 0.1 * 0.9) < 3  # the size is random: Bin(200, q)
    assert len(poisson_selection(5, 1.0, 1, 1)) == 5
    assert any(len(poisson_selection(3, 0.01, 1, r)) == 0 for r in range(1, 50))  # an empty round can happen
    with pytest.raises(ValueError, match="fraction"):
        poisson_selection(10, 0.0, 1, 1)

"""The round's DP pieces (fl/dp.py, fl/secure.py) against hand-computed values: the release, the plan, resume."""
import math

import numpy as np
import pytest
import torch

from fedmpi.config import Config
from fedmpi.errors import ConfigError
from fedmpi.fl import dp, secure
from fedmpi.fl.aggregate import INTERRUPTED
from fedmpi.fl.privacy import gaussian_noise
from fedmpi.fl.ring import FixedPoint

GAUSS = dict(dp="gaussian", dp_noise_multiplier=2.0, nodes=1000, fraction=0.1, sampling="poisson", dp_clip=0.5)


def test_the_release_adds_z_clip_noise_and_divides_by_the_expected_count_not_the_participants():
    privacy = dp.plan(Config(**GAUSS))
    summed = torch.arange(6, dtype=torch.float32)
    mean, row = dp.release(privacy, summed, participants=37, unclipped=30, seed=0, rnd=4)
    noise = gaussian_noise(6, 2.0 * 0.5, 0, 4)
    assert torch.allclose(mean, (summed + noise) / 100.0)  # W = qN = 100, whatever the 37 who took part
    assert row == dict(dp_clip=0.5, dp_noise_stddev=1.0, dp_clipped_share=pytest.approx(7 / 37))
    assert privacy.clip == 0.5  # a fixed clip stays


def test_an_empty_poisson_round_is_still_noised_and_counted():
    privacy = dp.plan(Config(**GAUSS))
    mean, row = dp.release(privacy, torch.zeros(4), participants=0, unclipped=0, seed=1, rnd=2)
    assert torch.equal(mean, gaussian_noise(4, 1.0, 1, 2) / 100.0) and row["dp_clipped_share"] is None


def test_adaptive_clipping_moves_the_clip_by_the_noised_share_and_reports_the_released_share():
    privacy = dp.plan(Config(**GAUSS, dp_clip_quantile=0.5, dp_clip_lr=0.2))
    assert privacy.count_stddev == 5.0  # W / 20
    _, row = dp.release(privacy, torch.zeros(3), participants=100, unclipped=80, seed=0, rnd=1)
    count_noise = float(gaussian_noise(1, 5.0, 0, 1, stream=12)[0])
    fraction = (80 - 50 + count_noise) / 100 + 0.5
    assert row["dp_clipped_share"] == pytest.approx(1 - fraction)
    assert privacy.clip == pytest.approx(0.5 * math.exp(-0.2 * (fraction - 0.5))) == row["dp_next_clip"]


def test_without_dp_secure_aggregation_divides_by_the_participants():
    privacy = dp.plan(Config(secure_aggregation=True, fraction=0.1))
    mean, row = dp.release(privacy, torch.tensor([3.0, 6.0]), participants=3, unclipped=3, seed=0, rnd=1)
    assert mean.tolist() == [1.0, 2.0] and row == dict(dp_clip=1.0)
    assert dp.release(privacy, torch.zeros(2), 0, 0, 0, 1)[0] is None  # nobody took part: no step


def test_clip_rows_gives_the_projection_factors_and_the_count_inside():
    privacy = dp.plan(Config(**GAUSS))
    scale, inside = dp.clip_rows(privacy, torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]]))
    assert torch.allclose(scale, torch.tensor([0.1, 1.0, 1.0])) and inside == 2
    assert dp.clip_rows(dp.plan(Config()), torch.ones(2, 3))[0].tolist() == [1.0, 1.0]  # no DP: no clipping


def test_the_plan_notes_the_default_delta_and_solves_a_target_epsilon():
    privacy = dp.plan(Config(**{**GAUSS, "dp_noise_multiplier": None}, dp_target_epsilon=5.0, rounds=50))
    assert privacy.delta == pytest.approx(1000 ** -1.1) and "dp_delta not set" in privacy.notes[0]
    assert privacy.epsilon(50) <= 5.0 < privacy.accountant.epsilon(privacy.noise_multiplier * 0.99, 50, privacy.delta)
    assert privacy.record()["dp_noise_multiplier"] == privacy.noise_multiplier


def test_an_unreachable_target_names_the_key():
    cfg = Config(**{**GAUSS, "dp_noise_multiplier": None}, dp_target_epsilon=0.01, rounds=10, dp_clip_quantile=0.5,
                 dp_clip_count_stddev=0.001)
    with pytest.raises(ConfigError, match="config key 'dp_target_epsilon'.*cannot be reached"):
        dp.plan(cfg)


def test_selection_follows_the_sampling_key():
    fixed, poisson = Config(nodes=50, fraction=0.2), Config(nodes=50, fraction=0.2, sampling="poisson")
    assert len(dp.select(fixed, 3)) == 10
    sizes = {len(dp.select(poisson, r)) for r in range(1, 30)}
    assert len(sizes) > 1  # Poisson rounds vary in size
    assert dp.max_round_nodes(poisson) == 50 and dp.max_round_nodes(fixed) == 10


@pytest.mark.parametrize("meta,match", [({"dp_clip": 0.0, "dp_noise_multiplier": 1.0}, "'dp_clip'"),
                                        ({"dp_clip": float("nan"), "dp_noise_multiplier": 1.0}, "'dp_clip'"),
                                        ({"dp_clip": True, "dp_noise_multiplier": 1.0}, "'dp_clip'"),
                                        ({"dp_noise_multiplier": 1.0}, "'dp_clip'"),
                                        ({"dp_clip": 0.3, "dp_noise_multiplier": -1}, "'dp_noise_multiplier'"),
                                        ({"dp_clip": 0.3, "dp_noise_multiplier": "2"}, "'dp_noise_multiplier'")])
def test_a_hostile_checkpoint_state_is_refused(meta, match):
    with pytest.raises(ValueError, match=match):
        dp.resume(dp.plan(Config(**GAUSS)), meta)


def test_resume_takes_the_saved_clip_and_multiplier():
    privacy = dp.plan(Config(**GAUSS, dp_clip_quantile=0.5))
    privacy.clip = 0.123
    restored = dp.plan(Config(**GAUSS, dp_clip_quantile=0.5))
    dp.resume(restored, dp.saved_state(privacy))
    assert restored.clip == 0.123 and restored.noise_multiplier == 2.0


def test_the_ring_sums_trailer_counts_and_stop_votes_exactly():
    fixed = FixedPoint(1.0, 4, 64)
    a, b = secure.RingSum(torch.zeros(2), fixed), secure.RingSum(torch.zeros(2), fixed)
    a.add(torch.tensor([[0.25, -0.5]]), np.ones(1))
    b.add(torch.tensor([[3.0, 4.0]]), np.ones(1), scale=torch.tensor([0.2]))
    total = a.pack(1, 0.0, 1) + b.pack(0, INTERRUPTED, 0)  # uint64 addition wraps: the ring sum
    assert secure.counts(total, 64) == (1, 1, True, True)
    assert torch.allclose(secure.decoded_sum(total, fixed, 2), torch.tensor([0.85, 0.3]))
    assert secure.counts(a.pack(0, 1.0, 0) + b.pack(0, 0.0, 0), 64)[2:] == (True, False)


def test_masks_that_do_not_cancel_end_the_job_with_one_line_instead_of_a_garbage_model():
    from fedmpi.fl.secagg import PairwiseMasks

    fixed = FixedPoint(1.0, 4, 64)
    right = [PairwiseMasks(r, 3, {j: bytes([min(r, j), max(r, j)]) * 16 for j in range(3) if j != r}) for r in range(3)]
    wrong = PairwiseMasks(2, 3, {0: bytes(32), 1: bytes([1, 2]) * 16})  # rank 2 holds another key for pair (0, 2)
    bufs = [secure.RingSum(torch.zeros(5), fixed).pack(0, 0.0, 1) for _ in range(3)]
    good = sum(m.mask_into(b.copy(), 7) for m, b in zip(right, bufs))
    assert secure.counts(good, 64, selected=4, ranks=3) == (0, 3, False, False)
    bad = right[0].mask_into(bufs[0].copy(), 7) + right[1].mask_into(bufs[1].copy(), 7) + wrong.mask_into(bufs[2], 7)
    with pytest.raises(secure.MaskError, match="masks did not cancel"):
        secure.counts(bad, 64, selected=4, ranks=3)

"""Hostile privacy settings against the real `fedmpi` under real mpirun: one line naming the key, exit 2.

The same promise as test_config_inputs.py (no traceback, no MPI_Abort, nothing written); the
unreachable target epsilon is found only at start-up (the solver runs on rank 0), after the shard
file exists, and must still end every rank with one line.
"""
from __future__ import annotations

import pytest
from conftest import SMALL
from test_config_inputs import RANKS, base, refused

GAUSSIAN = ["dp=gaussian", "dp_noise_multiplier=1"]
CASES = [  # --set values, what the one line must say
    (["dp=laplace"], "config key 'dp' must be one of none, gaussian"),
    (["sampling=shuffle"], "config key 'sampling' must be one of fixed, poisson"),
    (["dp_accountant=prv", *GAUSSIAN], "config key 'dp_accountant' must be one of rdp, pld"),
    (["dp=gaussian"], "config key 'dp_noise_multiplier': dp: gaussian needs exactly one of"),
    ([*GAUSSIAN, "dp_target_epsilon=3"], "needs exactly one of dp_noise_multiplier and dp_target_epsilon"),
    ([*GAUSSIAN, "aggregation=weighted"], "config key 'aggregation' must be mean with dp: gaussian"),
    ([*GAUSSIAN, "dp_accountant=pld"], "config key 'dp_accountant': pld cannot account sampling fixed"),
    (["dp_noise_multiplier=1"], "config key 'dp_noise_multiplier' needs dp: gaussian"),
    (["dp_clip_quantile=0.5"], "config key 'dp_clip_quantile' needs dp: gaussian"),
    ([*GAUSSIAN, "dp_clip_count_stddev=1"], "config key 'dp_clip_count_stddev' needs dp_clip_quantile"),
    ([*GAUSSIAN, "dp_clip=0"], "config key 'dp_clip' must be in [1e-06, 1000000.0]"),
    ([*GAUSSIAN, "dp_clip=nan"], "config key 'dp_clip' must be in"),
    (["dp=gaussian", "dp_noise_multiplier=-1"], "config key 'dp_noise_multiplier' must be in [0.0, 1000.0]"),
    (["dp=gaussian", "dp_noise_multiplier=inf"], "config key 'dp_noise_multiplier' must be in"),
    (["dp=gaussian", "dp_target_epsilon=0"], "config key 'dp_target_epsilon' must be in (0.0, 1000000.0]"),
    ([*GAUSSIAN, "dp_delta=1"], "config key 'dp_delta' must be in (0.0, 1.0)"),
    ([*GAUSSIAN, "dp_delta=0"], "config key 'dp_delta' must be in (0.0, 1.0)"),
    ([*GAUSSIAN, "dp_clip_quantile=1.5"], "config key 'dp_clip_quantile' must be in [0.0, 1.0]"),
    ([*GAUSSIAN, "dp_clip_quantile=0.5", "dp_clip_lr=-1"], "config key 'dp_clip_lr' must be in [0.0, 10.0]"),
    ([*GAUSSIAN, "dp_clip_quantile=0.5", "dp_clip_count_stddev=0"], "config key 'dp_clip_count_stddev' must be in"),
    ([*GAUSSIAN, "dp_epsilon_every=0"], "config key 'dp_epsilon_every' must be in [1, 10000000]"),
    (["secure_aggregation=maybe"], "config key 'secure_aggregation' must be true or false"),
    (["secagg_bits=48"], "config key 'secagg_bits' must be 32 or 64"),
    (["secagg_bits=128"], "config key 'secagg_bits' must be in [32, 64]"),
    (["secure_aggregation=true", "update_dtype=fp16"], "config key 'update_dtype' must be fp32 with secure_agg"),
    (["secure_aggregation=true", "aggregation=weighted"], "config key 'aggregation' must be mean with secure_agg"),
]


@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize("values,expect", CASES, ids=[" ".join(v)[:40] for v, _ in CASES])
def test_a_hostile_privacy_setting_is_one_line_naming_the_key(tmp_path, ranks, values, expect):
    refused(base(tmp_path) + values + ["--out", "out"], ranks, tmp_path, expect)


@pytest.mark.parametrize("ranks", RANKS)
def test_an_unreachable_target_epsilon_ends_every_rank_with_one_line(small_data, tmp_path, ranks):
    # 0.1 over 3 rounds of half the nodes is beyond reach only because the clip count's noise caps
    # the effective multiplier (dp_clip_count_stddev 0.01): the line says to raise it.
    args = ["run", "--set", *SMALL, small_data, "dp=gaussian", "dp_target_epsilon=0.1", "fraction=0.5",
            "sampling=poisson", "dp_clip_quantile=0.5", "dp_clip_count_stddev=0.01", "--out", "out"]
    line = refused(args, ranks, tmp_path, "config key 'dp_target_epsilon': dp_target_epsilon 0.1 cannot be reached",
                   written=frozenset({("out", True), ("out/.lock", False), ("out/heartbeat.json", False),
                                      ("out/config.yaml", False)}))
    assert "raise dp_clip_count_stddev" in line

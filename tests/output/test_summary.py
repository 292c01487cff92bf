"""Fixed-size score summaries: merged over ranks they give what one summary over all nodes gives."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmpi.output.summary import BINS, SIZE, merge, row_fields, summary


def test_a_summary_counts_only_finite_scores():
    s = summary(np.array([0.5, np.nan, 1.0, 0.05]))
    assert s.shape == (SIZE,) and s[0] == 3 and s[1] == 1.55 and s[2] == 0.05 and s[3] == 1.0
    assert s[4:].tolist() == [1, 0, 0, 0, 0, 1, 0, 0, 0, 1]  # 1.0 falls in the last tenth
    fields = row_fields("a", s)
    assert fields == {"a_mean": 1.55 / 3, "a_min": 0.05, "a_max": 1.0, "a_hist": [1, 0, 0, 0, 0, 1, 0, 0, 0, 1]}


def test_nothing_scored_gives_nulls():
    assert row_fields("a", summary(np.array([np.nan])))["a_mean"] is None
    assert row_fields("a", summary(np.array([])))["a_hist"] == [0] * BINS
    assert row_fields("a", merge([None, None])) == {"a_mean": None, "a_min": None, "a_max": None, "a_hist": None}


def test_at_one_rank_the_mean_is_numpys():
    values = np.random.default_rng(0).integers(0, 91, 1000) / 90
    assert row_fields("a", merge([summary(values)]))["a_mean"] == values.mean()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.floats(0, 1), st.just(float("nan"))), max_size=60), st.integers(1, 5))
def test_merged_rank_summaries_equal_one_summary_of_every_node(values, ranks):
    values = np.array(values, dtype=float)
    whole = summary(values)
    parts = [summary(p) for p in np.array_split(values, ranks)]
    merged = merge(parts)
    assert merged[0] == whole[0] and np.array_equal(merged[4:], whole[4:])
    if whole[0]:
        assert merged[2] == whole[2] and merged[3] == whole[3] and np.isclose(merged[1], whole[1], rtol=1e-12)

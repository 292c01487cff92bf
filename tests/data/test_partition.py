import numpy as np
import pytest

from fedmpi.data.partition import balanced, iid, node_ranges, offsets_of
from fedmpi.errors import ConfigError


def labels(per_class: int, classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(classes), per_class))


def test_balanced_gives_every_node_the_same_count_of_each_label_without_overlap():
    y = labels(500)
    parts = balanced(y, nodes=100, per_node=40, classes=10, seed=0)
    assert len(parts) == 100
    for part in parts:
        assert np.array_equal(np.bincount(y[part], minlength=10), np.full(10, 4))
    everything = np.concatenate(parts)
    assert len(np.unique(everything)) == len(everything) == 4000


def test_balanced_depends_on_the_seed_only():
    y = labels(50)
    a, b, c = (balanced(y, 5, 20, 10, seed=s) for s in (1, 1, 2))
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c))


def test_balanced_refuses_short_labels_unless_reuse_is_allowed():
    y = np.concatenate([labels(10), np.zeros(0, int)])
    y = y[~((y == 3) & (np.cumsum(y == 3) > 5))]  # label 3 keeps 5 samples
    with pytest.raises(ConfigError, match="label 3 has 5 samples"):
        balanced(y, nodes=4, per_node=20, classes=10, seed=0)
    parts = balanced(y, nodes=4, per_node=20, classes=10, seed=0, allow_reuse=True)
    assert all(np.bincount(y[p], minlength=10)[3] == 2 for p in parts)


def test_balanced_needs_per_node_divisible_by_classes():
    with pytest.raises(ConfigError, match="divisible by classes"):
        balanced(labels(100), 10, 45, 10, 0)


def test_iid_is_an_equal_disjoint_random_split():
    y = labels(30)
    parts = iid(y, nodes=6, per_node=50, classes=10, seed=0)
    assert [len(p) for p in parts] == [50] * 6
    assert len(np.unique(np.concatenate(parts))) == 300
    with pytest.raises(ConfigError, match="need 400"):
        iid(y, nodes=8, per_node=50, classes=10, seed=0)


def test_offsets_are_cumulative_sizes():
    assert offsets_of([np.arange(3), np.arange(0), np.arange(5)]).tolist() == [0, 3, 3, 8]


@pytest.mark.parametrize("nodes,ranks", [(100, 1), (100, 3), (100, 16), (7, 7), (10, 4)])
def test_node_ranges_are_contiguous_and_cover_every_node_once(nodes, ranks):
    ranges = node_ranges(nodes, ranks)
    assert [n for r in ranges for n in r] == list(range(nodes))
    sizes = [len(r) for r in ranges]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_more_ranks_than_nodes_is_an_error():
    with pytest.raises(ConfigError, match="5 MPI ranks but only 4 nodes"):
        node_ranges(4, 5)
    with pytest.raises(ConfigError, match="5 MPI ranks but only 4 nodes"):
        node_ranges(4, 5, np.arange(5))


def test_blocks_by_sample_count_balance_the_work():
    # one huge node first: by node count rank 0 would hold 100 + 3 of 206 samples
    offsets = offsets_of([np.arange(n) for n in [100, 1, 1, 1, 1, 1, 1, 100]])
    assert [(b.start, b.stop) for b in node_ranges(8, 3, offsets)] == [(0, 1), (1, 7), (7, 8)]
    assert [(b.start, b.stop) for b in node_ranges(8, 3)] == [(0, 3), (3, 6), (6, 8)]
    # each rank at least one node, even where one node holds nearly everything
    assert [len(b) for b in node_ranges(4, 4, offsets_of([np.arange(n) for n in [1000, 1, 1, 1]]))] == [1, 1, 1, 1]
    assert [len(b) for b in node_ranges(5, 2, offsets_of([np.arange(n) for n in [1, 1, 1, 1, 1000]]))] == [4, 1]
    # equal sizes: equal blocks; no samples at all: by node count
    assert [len(b) for b in node_ranges(9, 3, np.arange(10) * 40)] == [3, 3, 3]
    assert [len(b) for b in node_ranges(5, 2, np.zeros(6, np.int64))] == [3, 2]

"""Non-IID partitions (shards, dirichlet, quantity), the local test splits that follow them, --describe."""
import numpy as np
import pytest

from fedmpi.config import Config
from fedmpi.data.partition import dirichlet, like_train, quantity, shards
from fedmpi.data.prepare import expected_attrs, label_table, partition_options
from fedmpi.errors import ConfigError


def mnist_like(per_class: int = 6000, classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(classes), per_class))


def labels_per_node(y, parts):
    return np.array([len(np.unique(y[p])) for p in parts])


def test_shards_give_every_node_exactly_two_labels_and_use_every_sample_once():
    y = mnist_like()
    parts = shards(y, nodes=100, per_node=600, classes=10, seed=0)
    assert [len(p) for p in parts] == [600] * 100
    assert labels_per_node(y, parts).tolist() == [2] * 100
    for p in parts:  # two whole shards of 300: each label present holds exactly 300
        assert sorted(np.bincount(y[p], minlength=10)[np.unique(y[p])]) == [300, 300]
    everything = np.concatenate(parts)
    assert len(np.unique(everything)) == len(everything) == 60000


def test_shards_with_more_shards_per_node_and_a_larger_dataset():
    parts = shards(mnist_like(600), nodes=20, per_node=300, classes=10, seed=3, shards_per_node=3)
    assert labels_per_node(mnist_like(600), parts).tolist() == [3] * 20
    y = mnist_like(1000)  # a random 6000 of 10000: label counts uneven, some shards straddle two labels
    parts = shards(y, nodes=20, per_node=300, classes=10, seed=3, shards_per_node=3)
    assert len(np.unique(np.concatenate(parts))) == 6000 and {len(p) for p in parts} == {300}
    assert 3 <= labels_per_node(y, parts).mean() < 4


def test_shards_refuse_sizes_that_do_not_cut_into_equal_shards():
    with pytest.raises(ConfigError, match="samples_per_node .601. divisible by shards_per_node .2."):
        shards(mnist_like(), 100, 601, 10, 0)


def skew(y, parts, classes=10):
    """Mean over nodes of the largest label's share: 0.1 for uniform labels, 1.0 for a single label."""
    return np.mean([np.bincount(y[p], minlength=classes).max() / len(p) for p in parts])


def test_dirichlet_skew_grows_as_alpha_shrinks():
    y = mnist_like(600)
    s = [skew(y, dirichlet(y, 50, 120, 10, seed=0, alpha=a)) for a in (100.0, 1.0, 0.1)]
    assert s[0] < 0.2 < s[1] < s[2] and s[2] > 0.6, s


def test_dirichlet_uses_each_sample_once_has_mean_size_and_no_empty_node():
    y = mnist_like(600)
    parts = dirichlet(y, nodes=100, per_node=60, classes=10, seed=1, alpha=0.01)
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 1 and sizes.sum() == 6000 and sizes.max() > 60
    assert len(np.unique(np.concatenate(parts))) == 6000
    with pytest.raises(ConfigError, match="cannot give each of 10 nodes one"):
        dirichlet(y, nodes=10, per_node=0, classes=10, seed=0)


def test_quantity_sizes_are_unequal_with_the_right_mean_and_labels_iid():
    y = mnist_like(600)
    parts = quantity(y, nodes=50, per_node=120, classes=10, seed=0, sigma=1.0)
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 1 and sizes.mean() == 120 and sizes.max() > 2 * sizes.min()
    assert len(np.unique(np.concatenate(parts))) == 6000
    big = parts[int(np.argmax(sizes))]
    assert np.bincount(y[big], minlength=10).min() > 0  # labels ignored: a large node sees every label
    equal = quantity(y, nodes=50, per_node=120, classes=10, seed=0, sigma=0.0)
    assert {len(p) for p in equal} == {120}


def test_quantity_with_extreme_sigma_still_leaves_no_node_empty():
    sizes = [len(p) for p in quantity(mnist_like(100), nodes=100, per_node=5, classes=10, seed=0, sigma=4.0)]
    assert min(sizes) == 1 and sum(sizes) == 500


@pytest.mark.parametrize("split,extra", [(shards, {}), (dirichlet, {"alpha": 0.3}), (quantity, {"sigma": 1.0})])
def test_non_iid_splits_depend_on_the_seed_only(split, extra):
    y = mnist_like(200)
    a, b, c = (split(y, 10, 100, 10, seed=s, **extra) for s in (5, 5, 6))
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not all(len(p) == len(q) and np.array_equal(p, q) for p, q in zip(a, c))


def test_local_test_split_follows_each_nodes_training_labels():
    y, y_test = mnist_like(600), mnist_like(100, seed=1)
    parts = [np.flatnonzero(y == 2)[:30], np.concatenate([np.flatnonzero(y == 0)[:10], np.flatnonzero(y == 7)[:30]])]
    tests = like_train(parts, y, y_test, per_node=20, classes=10, seed=0)
    assert np.bincount(y_test[tests[0]], minlength=10).tolist() == [0, 0, 20] + [0] * 7
    assert np.bincount(y_test[tests[1]], minlength=10).tolist() == [5, 0, 0, 0, 0, 0, 0, 15, 0, 0]
    assert all(len(np.unique(t)) == len(t) for t in tests)


def test_partition_keys_reach_the_partitioner_and_the_file_attributes():
    cfg = Config(partition="dirichlet", alpha=0.25)
    assert partition_options(cfg) == {"alpha": 0.25}
    assert expected_attrs(cfg)["alpha"] == 0.25 and expected_attrs(cfg)["local_test_scheme"] == "like_train"
    assert partition_options(Config(partition="quantity", quantity_sigma=2)) == {"sigma": 2.0}
    balanced = expected_attrs(Config())
    assert "alpha" not in balanced and "local_test_scheme" not in balanced  # old files still match


def test_label_table_has_one_row_per_node_and_a_summary():
    rows = label_table(np.array([[2, 1, 0], [0, 0, 0], [0, 0, 3]]))
    assert rows[1].split() == ["node", "samples", "0", "1", "2"]
    assert [r.split() for r in rows[2:5]] == [["0", "3", "2", "1", "0"], ["1", "0", "0", "0", "0"],
                                              ["2", "3", "0", "0", "3"]]
    assert rows[-1] == "samples per node: min 0, mean 2.0, max 3; labels per node: min 0, mean 1.00, max 2"


def test_prepared_shards_file_keeps_two_labels_per_node_and_refuses_other_params(tmp_path):
    from fedmpi.data.prepare import check_matches, describe, prepare
    from fedmpi.data.shards import read_nodes
    from fedmpi.errors import DataError

    cfg = Config(dataset="synthetic", partition="shards", nodes=10, samples_per_node=40, test_per_node=10,
                 data_file=str(tmp_path / "s.h5"))
    path = prepare(cfg)
    train, local = read_nodes(path, "train", 0, 10), read_nodes(path, "local_test", 0, 10)
    for node in range(10):
        train_labels, test_labels = set(train.node(node)[1].tolist()), set(local.node(node)[1].tolist())
        assert len(train_labels) == 2 and test_labels == train_labels
    assert describe(path).splitlines()[-1].endswith("labels per node: min 2, mean 2.00, max 2")
    with pytest.raises(DataError, match="made with shards_per_node=2, the config says 4"):
        check_matches(Config(**{**cfg.to_dict(), "shards_per_node": 4}), path)

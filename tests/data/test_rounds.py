"""Training rows read per round: the selected nodes' rows as the whole block holds them, checked, prefetched."""
import h5py
import numpy as np
import pytest
import torch
from shardfiles import make_valid

from fedmpi.config import Config, parse_overrides
from fedmpi.data.rounds import RoundReader, block_bytes, compact_offsets, read_selected, runs
from fedmpi.data.shards import read_nodes, read_offsets
from fedmpi.engine.rows import Inputs
from fedmpi.errors import ConfigError, DataError


def put(x, y):
    return Inputs(torch.from_numpy(x), 1 / 255), torch.from_numpy(y)


def test_runs_cut_sorted_ids_into_consecutive_stretches():
    assert runs(np.array([0, 1, 2, 5, 7, 8])) == [(0, 3), (5, 6), (7, 9)]
    assert runs(np.array([], dtype=np.int64)) == []


def test_compact_offsets_give_each_kept_node_its_own_rows_and_the_others_none():
    offsets = compact_offsets(np.array([3, 0, 5, 2, 4]), np.array([0, 2, 4]))
    assert offsets.tolist() == [0, 3, 3, 8, 8, 12]


def test_the_selected_rows_are_the_whole_blocks_rows_of_those_nodes(tmp_path):
    path = make_valid(tmp_path / "s.h5", nodes=6, per_node=5)
    whole = read_nodes(path, "train", 0, 6)
    nodes = np.array([1, 2, 4])
    x, y = read_selected(path, read_offsets(path, "train"), nodes, 3)
    want = np.concatenate([np.arange(5, 15), np.arange(20, 25)])
    assert x.dtype == np.uint8 and np.array_equal(x, whole.x[want]) and np.array_equal(y, whole.y[want])
    empty_x, empty_y = read_selected(path, read_offsets(path, "train"), np.array([], dtype=np.int64), 3)
    assert empty_x.shape == (0, 1, 2, 2) and empty_y.dtype == np.int64
    assert block_bytes(path, read_offsets(path, "train"), range(1, 3)) == 10 * (4 + 8)


def poison_label(path, row):
    with h5py.File(path, "r+") as f:
        y = f["train/y"][:]
        y[row] = 7
        f["train/y"][:] = y


def reader(path, selections, rounds=3):
    offsets = read_offsets(path, "train")
    return RoundReader(path, offsets, 0, np.diff(offsets), 3, put, lambda rnd: selections[rnd], rounds)


def test_a_bad_label_in_the_prefetched_round_is_raised_on_the_main_thread_naming_the_file(tmp_path):
    path = make_valid(tmp_path / "p.h5", nodes=4, per_node=6)
    poison_label(path, 6 * 3 + 2)  # node 3, read only ahead of round 2
    rounds = reader(path, {1: np.array([0, 1]), 2: np.array([2, 3]), 3: np.array([0])})
    x, y, offsets = rounds.block(1, np.array([0, 1]))  # round 1 is fine; round 2's read starts behind it
    assert len(x) == 12 and offsets.tolist() == [0, 6, 12, 12, 12]
    with pytest.raises(DataError, match=rf"shard file {path}: /train/y\[20\] = 7 is outside the classes \[0, 3\)"):
        rounds.block(2, np.array([2, 3]))


@pytest.mark.parametrize("ahead, message", [
    (np.array([9]), "/train cannot be read"),  # no node 9: h5py's error, wrapped in the thread
    (np.array(["x"]), "reading round 2's nodes failed"),  # any other exception of the thread
])
def test_a_failed_prefetch_read_is_one_data_error_naming_the_file(tmp_path, ahead, message):
    path = make_valid(tmp_path / "f.h5", nodes=4, per_node=6)
    rounds = reader(path, {2: ahead})
    rounds.block(1, np.array([0]))
    with pytest.raises(DataError, match=rf"^shard file {path}: {message}") as caught:
        rounds.block(2, np.array([1]))
    assert "\n" not in str(caught.value)


def test_prefetched_rows_equal_a_direct_read_and_a_changed_selection_is_read_again(tmp_path):
    path = make_valid(tmp_path / "r.h5", nodes=4, per_node=6)
    whole = read_nodes(path, "train", 0, 4)
    rounds = reader(path, {2: np.array([1, 3]), 3: np.array([2])})
    rounds.block(1, np.array([0]))
    x, y, offsets = rounds.block(2, np.array([1, 3]))
    assert torch.equal(x[:], Inputs(torch.from_numpy(whole.x[np.r_[6:12, 18:24]]), 1 / 255)[:])
    assert offsets.tolist() == [0, 0, 6, 6, 12]
    x, y, _ = rounds.block(3, np.array([0, 2]))  # not what was read ahead
    assert np.array_equal(y.numpy(), whole.y[np.r_[0:6, 12:18]])
    assert rounds.ahead is None  # nothing read beyond the last round


@pytest.mark.parametrize("value", ["-1", "1.5", "true", "lots", "1e30"])
def test_a_bad_residency_budget_is_refused_naming_the_key(value):
    with pytest.raises(ConfigError, match="config key 'data_resident_bytes'"):
        Config(**parse_overrides([f"data_resident_bytes={value}"]))
    assert Config(**parse_overrides(["data_resident_bytes=0"])).data_resident_bytes == 0

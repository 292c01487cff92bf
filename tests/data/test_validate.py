"""The shard-file check: each way a real HDF5 file can be broken gives one DataError line naming file and problem."""
import h5py
import numpy as np
import pytest
from shardfiles import CORRUPTIONS, corrupted, make_valid

from fedmpi.config import Config
from fedmpi.data import validate
from fedmpi.data.prepare import check_matches
from fedmpi.data.validate import validate_shards
from fedmpi.errors import DataError


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_valid(tmp_path_factory.mktemp("good") / "good.h5")


def test_a_valid_file_passes_and_returns_its_attributes(good):
    attrs = validate_shards(good)
    assert attrs["num_nodes"] == 4 and attrs["classes"] == 3 and attrs["input_shape"] == [1, 2, 2]


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_each_corruption_is_one_line_naming_the_file_and_problem(good, tmp_path, name):
    bad = corrupted(good, name, tmp_path / f"{name}.h5")
    with pytest.raises(DataError) as info:
        validate_shards(bad)
    message = str(info.value)
    assert "\n" not in message and str(bad) in message and CORRUPTIONS[name][1] in message, message


def test_empty_local_test_nodes_are_allowed_but_empty_training_nodes_are_not(tmp_path):
    path = make_valid(tmp_path / "no-local-test.h5", test_per_node=0)
    assert validate_shards(path)["test_per_node"] == 0


@pytest.mark.parametrize("key,value,fragment", [
    ("num_nodes", 3, "/train/offsets has 5 entries, num_nodes=3 needs 4"),
    ("classes", "ten", "attribute 'classes' must be a non-negative integer"),
    ("classes", 0, "attribute 'classes' must be in [1, 100,000], got 0"),
    ("input_shape", [1, 4], "/train/x has shape [24, 1, 2, 2], expected [N, 1, 4]"),
    ("input_shape", [0, 2], "attribute 'input_shape' must be 1 to 8 positive integers, got [0, 2]"),
    ("pixel_scale", -1.0, "attribute 'pixel_scale' must be a positive float"),
    ("dataset", 7, "attribute 'dataset' must be a string"),
    ("format_version", np.array([1, 1]), "format_version [1, 1], fedmpi reads 1"),
])
def test_attributes_of_the_wrong_type_or_value(good, tmp_path, key, value, fragment):
    bad = tmp_path / "attr.h5"
    bad.write_bytes(good.read_bytes())
    with h5py.File(bad, "r+") as f:
        f.attrs[key] = value
    with pytest.raises(DataError, match=f"{bad}.*"):
        validate_shards(bad)
    with pytest.raises(DataError) as info:
        validate_shards(bad)
    assert fragment in str(info.value)


def test_labels_are_checked_in_chunks_to_the_last_row(tmp_path, monkeypatch):
    path = make_valid(tmp_path / "s.h5", nodes=4, per_node=6)
    with h5py.File(path, "r+") as f:
        f["train/y"][23] = 3  # the very last row, in the last of several chunks
    monkeypatch.setattr(validate, "LABEL_CHUNK", 5)
    with pytest.raises(DataError, match=r"/train/y\[23\] = 3 is outside the classes \[0, 3\)"):
        validate_shards(path)


def test_check_matches_validates_before_comparing_with_the_config(good, tmp_path):
    cfg = Config(dataset="synthetic", partition="iid", nodes=4, samples_per_node=6, test_per_node=2,
                 data_file=str(tmp_path / "x.h5"))
    check_matches(cfg, good)  # valid and made from this config
    bad = corrupted(good, "label_outside", tmp_path / "x.h5")
    with pytest.raises(DataError, match="outside the classes"):
        check_matches(cfg, bad)

"""Hostile shard files, built with h5py: links and storage out of the file, data declared but not held,
attributes too large, non-regular paths. Each is one short DataError line, found from metadata alone."""
import os
import socket

import h5py
import numpy as np
import pytest
from shardfiles import HOSTILE, hostile, in_child, make_valid

from fedmpi.data import h5check, shards, validate
from fedmpi.data.prepare import describe
from fedmpi.data.shards import read_attrs, read_nodes, read_test
from fedmpi.data.validate import label_counts, validate_shards
from fedmpi.errors import DataError

MAX_MESSAGE = 600  # the longest one-line message any case may print


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_valid(tmp_path_factory.mktemp("good") / "good.h5")


def refused(fn, *args) -> str:
    """fn(*args) in a child process (a FIFO cannot hang the tests) must raise DataError; its message."""
    kind, message = in_child(fn, *args)
    assert kind == "DataError", (kind, message)
    assert "\n" not in message and len(message) <= MAX_MESSAGE, message
    return message


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_each_hostile_file_is_refused_in_one_short_line_naming_file_and_problem(good, tmp_path, name):
    bad = hostile(good, name, tmp_path / f"{name}.h5")
    message = refused(validate_shards, bad)
    assert str(bad) in message and HOSTILE[name][1] in message, message


@pytest.mark.parametrize("name", ["external_storage_regular_file", "external_storage_fifo", "virtual_dataset_of_fifo",
                                  "external_link_to_fifo", "unused_external_link"])
def test_every_reader_refuses_a_file_that_reaches_outside_itself_anywhere(good, tmp_path, name):
    bad = hostile(good, name, tmp_path / f"{name}.h5")
    for read in (lambda: read_nodes(bad, "train", 0, 4), lambda: read_test(bad), lambda: read_attrs(bad)):
        assert str(bad) in refused(read)


def test_readers_check_the_storage_of_what_they_read(good, tmp_path):
    bad = hostile(good, "huge_rows_chunked", tmp_path / "huge.h5")
    assert "/train/x declares shape" in refused(read_nodes, bad, "train", 0, 1)
    assert len(read_test(bad)[1]) == 5  # /test is whole: reading it is fine


def test_external_storage_of_a_readable_file_is_refused_though_hdf5_would_read_it(good, tmp_path):
    bad = hostile(good, "external_storage_regular_file", tmp_path / "bad.h5")
    with h5py.File(bad, "r") as f:  # the hostile part is real: plain h5py reads the other file as pixels
        assert bytes(f["train/x"][:].reshape(-1)[:4]) == b"root"
    assert "bad.secret.txt" in refused(validate_shards, bad)


def test_a_soft_link_inside_the_file_is_fine(good, tmp_path):
    path = tmp_path / "soft.h5"
    path.write_bytes(good.read_bytes())
    with h5py.File(path, "r+") as f:
        f["elsewhere/y"] = f["train/y"][:]
        del f["train/y"]
        f["train/y"] = h5py.SoftLink("/elsewhere/y")
    assert validate_shards(path)["num_nodes"] == 4


@pytest.mark.parametrize("options", [dict(compression="gzip", shuffle=True, fletcher32=True, chunks=(4,)),
                                     dict(compression="lzf", chunks=(5,)), dict(chunks=(7,))],
                         ids=["gzip-shuffle-fletcher32", "lzf", "chunked"])
def test_compressed_and_chunked_datasets_held_in_full_are_accepted(good, tmp_path, options):
    path = tmp_path / "ok.h5"
    path.write_bytes(good.read_bytes())
    with h5py.File(path, "r+") as f:
        y = f["train/y"][:]
        del f["train/y"]
        f.create_dataset("train/y", data=y, **options)
    validate_shards(path)
    assert read_nodes(path, "train", 0, 4).y.tolist() == y.tolist()


def test_a_chunk_allocated_early_and_filled_is_data_the_file_holds(good, tmp_path):
    path = tmp_path / "early.h5"
    path.write_bytes(good.read_bytes())
    with h5py.File(path, "r+") as f:
        n = len(f["train/y"])
        del f["train/y"]
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_chunk((4,))
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        h5py.h5d.create(f["train"].id, b"y", h5py.h5t.STD_I64LE, h5py.h5s.create_simple((n,)), dcpl=dcpl)
    validate_shards(path)  # every chunk is in the file (zeros written at creation): label 0 everywhere


@pytest.mark.parametrize("kind", ["fifo", "directory", "char_device", "socket", "symlink_to_fifo"])
def test_non_regular_files_are_refused_before_they_are_opened(tmp_path, kind):
    path = tmp_path / "data.h5"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "char_device":
        path = type(path)("/dev/null")
    elif kind == "socket":
        path = tmp_path / "s.h5"  # AF_UNIX paths are short
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
    else:
        os.mkfifo(tmp_path / "fifo")
        path.symlink_to(tmp_path / "fifo")
    words = {"fifo": "is a FIFO (named pipe)", "directory": "is a directory", "char_device": "is a character device",
             "socket": "is a socket", "symlink_to_fifo": "is a FIFO (named pipe)"}[kind]
    message = refused(validate_shards, path)
    assert f"shard file {path} {words}, not a regular file" in message


def test_a_symlink_to_a_regular_file_is_fine_and_a_dangling_one_does_not_exist(good, tmp_path):
    (tmp_path / "link.h5").symlink_to(good)
    assert validate_shards(tmp_path / "link.h5")["classes"] == 3
    (tmp_path / "dangling.h5").symlink_to(tmp_path / "gone.h5")
    assert "dangling.h5 does not exist" in refused(validate_shards, tmp_path / "dangling.h5")


def test_too_many_objects_are_refused_without_walking_them_all(good, tmp_path, monkeypatch):
    path = tmp_path / "many.h5"
    path.write_bytes(good.read_bytes())
    with h5py.File(path, "r+") as f:
        for i in range(30):
            f.create_group(f"junk/{i}")
    monkeypatch.setattr(h5check, "MAX_LINKS", 20)
    with pytest.raises(DataError, match="holds more than 20 objects"):
        validate_shards(path)
    monkeypatch.setattr(h5check, "MAX_LINKS", 60)
    validate_shards(path)


def test_rows_beyond_the_cap_are_refused_before_the_labels_are_read(good, monkeypatch):
    monkeypatch.setattr(validate, "MAX_ROWS", 23)
    monkeypatch.setattr(validate, "check_labels", lambda *a: pytest.fail("labels read before the row cap"))
    with pytest.raises(DataError, match=r"/train has 24 rows, more than the 23 fedmpi reads"):
        validate_shards(good)


def test_an_attribute_just_under_the_byte_cap_is_read_and_one_over_is_refused(good, tmp_path, monkeypatch):
    path = tmp_path / "attr.h5"
    path.write_bytes(good.read_bytes())
    with h5py.File(path, "r+") as f:
        f.attrs["notes"] = np.zeros(100, np.int64)  # 800 bytes
    monkeypatch.setattr(h5check, "MAX_ATTR_BYTES", 800)
    assert read_attrs(path)["notes"] == [0] * 100
    monkeypatch.setattr(h5check, "MAX_ATTR_BYTES", 799)
    with pytest.raises(DataError, match="attribute 'notes' holds 100 values of int64"):
        read_attrs(path)


def test_a_long_string_attribute_is_quoted_in_bounded_length(good, tmp_path):
    from fedmpi.config import Config
    from fedmpi.data.prepare import check_matches

    path = tmp_path / "long.h5"
    path.write_bytes(good.read_bytes())
    with h5py.File(path, "r+") as f:
        f.attrs["dataset"] = "y" * 50_000  # under the attribute cap: valid, but not this config's dataset
    cfg = Config(dataset="synthetic", partition="iid", nodes=4, samples_per_node=6, test_per_node=2,
                 data_file=str(path))
    with pytest.raises(DataError) as info:
        check_matches(cfg, path)
    assert "made with dataset='yyy" in str(info.value) and "(50,000 characters)" in str(info.value)
    assert len(str(info.value)) < MAX_MESSAGE


def test_reading_more_than_the_memory_available_is_refused_with_the_estimate(good, monkeypatch):
    monkeypatch.setattr(shards, "available_memory", lambda: 100)
    with pytest.raises(DataError, match=r"reading /train rows 0..23 needs 0.0 GiB, only 0.0 GiB"):
        read_nodes(good, "train", 0, 4)
    monkeypatch.setattr(shards, "available_memory", lambda: 24 * (4 + 8))  # exactly the rows' bytes
    assert len(read_nodes(good, "train", 0, 4).y) == 24


def test_label_counts_match_a_direct_count_across_chunk_boundaries(tmp_path, monkeypatch):
    path = make_valid(tmp_path / "s.h5", nodes=5, per_node=7, classes=4)
    with h5py.File(path, "r") as f:
        y, offsets = f["train/y"][:], f["train/offsets"][:]
    want = np.stack([np.bincount(y[a:b], minlength=4) for a, b in zip(offsets[:-1], offsets[1:])])
    monkeypatch.setattr(validate, "LABEL_CHUNK", 3)  # chunks that cut nodes in the middle
    assert np.array_equal(label_counts(path, validate_shards(path)), want)


def test_describe_leaves_out_a_label_table_too_large_to_print(good, monkeypatch):
    assert "training label counts per node" in describe(good)
    monkeypatch.setattr(validate, "MAX_HISTOGRAM_CELLS", 11)  # 4 nodes x 3 classes = 12 cells
    text = describe(good)
    assert "no label counts: 4 nodes x 3 classes is too large" in text and "training label counts" not in text
    assert "training samples per node" in text and text.splitlines()[-1].startswith("samples per node: min 6")

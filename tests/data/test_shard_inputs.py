"""Shard files beyond uint8 images: float32 inputs of any shape, integer labels of any width, client ids."""
from __future__ import annotations

import csv

import h5py
import numpy as np
import pytest
import torch
from shardfiles import make_valid

from fedmpi.data import shards
from fedmpi.data.shards import read_client_ids, read_nodes, read_test
from fedmpi.data.validate import validate_shards
from fedmpi.errors import DataError
from fedmpi.output.metrics import write_nodes_csv
from fedmpi.rank import to_device


def edit(path, fn):
    with h5py.File(path, "r+") as f:
        fn(f)
    return path


def replace(f, name, data, **options):
    del f[name]
    f.create_dataset(name, data=data, **options)


def test_float32_inputs_of_any_shape_validate_without_pixel_scale_and_reach_the_model_unchanged(tmp_path):
    path = make_valid(tmp_path / "f.h5", shape=(7,), dtype=np.float32)
    attrs = validate_shards(path)
    assert "pixel_scale" not in attrs and attrs["input_shape"] == [7]
    block = read_nodes(path, "train", 1, 3)
    assert block.x.dtype == np.float32 and block.x.shape == (12, 7)
    x, _ = to_device(block.x.copy(), block.y, 1.0, torch.device("cpu"))
    assert x.dtype == torch.float32 and torch.equal(x[:], torch.from_numpy(block.x))


def test_to_device_scales_uint8_images_and_float_inputs_by_pixel_scale():
    cpu = torch.device("cpu")
    x, y = to_device(np.array([[0, 255]], np.uint8), np.array([1]), 1 / 255, cpu)
    assert x.data.dtype == torch.uint8  # kept as read; rows become float32 when gathered
    assert x[:].dtype == torch.float32 and x[:].tolist() == [[0.0, 1.0]] and y.dtype == torch.int64
    x, _ = to_device(np.array([[2.0, -4.0]], np.float32), np.array([0]), 0.5, cpu)
    assert x[:].tolist() == [[1.0, -2.0]]


def test_uint8_inputs_need_pixel_scale(tmp_path):
    path = edit(make_valid(tmp_path / "u.h5"), lambda f: f.attrs.__delitem__("pixel_scale"))
    with pytest.raises(DataError, match="attribute 'pixel_scale' is missing \\(uint8 inputs need it\\)"):
        validate_shards(path)


@pytest.mark.parametrize("dtype, fragment", [(">f4", "dtype >f4, expected uint8 or float32 (little-endian)"),
                                             ("<f2", "dtype <f2, expected uint8 or float32")])
def test_other_input_dtypes_are_refused(tmp_path, dtype, fragment):
    path = edit(make_valid(tmp_path / "d.h5", dtype=np.float32),
                lambda f: replace(f, "test/x", f["test/x"][:].astype(dtype)))
    with pytest.raises(DataError, match=fragment.replace("(", "\\(").replace(")", "\\)")):
        validate_shards(path)


def test_every_group_holds_the_same_input_dtype(tmp_path):
    path = edit(make_valid(tmp_path / "m.h5"), lambda f: replace(f, "test/x", f["test/x"][:].astype(np.float32)))
    with pytest.raises(DataError, match="/test/x has dtype float32, /train/x has uint8"):
        validate_shards(path)


@pytest.mark.parametrize("group, row", [("train", 9), ("local_test", 3)])
def test_a_nan_input_is_refused_where_a_rank_reads_it_naming_the_row(tmp_path, group, row, monkeypatch):
    def poison(f):
        x = f[f"{group}/x"][:]
        x[row, 0, 1, 0] = np.nan
        f[f"{group}/x"][:] = x

    path = edit(make_valid(tmp_path / "n.h5", dtype=np.float32), poison)
    validate_shards(path)  # the whole-file check reads no inputs: bounded by the labels
    read_nodes(path, group, 0, 1)  # rows of other nodes are not read, so not refused
    monkeypatch.setattr(shards, "FINITE_CHUNK", 5)  # the row is found across chunk boundaries too
    with pytest.raises(DataError, match=f"/{group}/x\\[{row}\\] holds nan \\(inputs must be finite"):
        read_nodes(path, group, 0, 4)


def test_an_infinite_test_input_is_refused(tmp_path):
    def poison(f):
        x = f["test/x"][:]
        x[4] = np.inf
        f["test/x"][:] = x

    path = edit(make_valid(tmp_path / "i.h5", dtype=np.float32), poison)
    with pytest.raises(DataError, match="/test/x\\[4\\] holds inf"):
        read_test(path)


def test_labels_of_any_integer_width_are_read_as_int64(tmp_path):
    path = edit(make_valid(tmp_path / "y.h5"), lambda f: replace(f, "train/y", f["train/y"][:].astype(">i4")))
    validate_shards(path)
    y = read_nodes(path, "train", 0, 4).y
    assert y.dtype == np.int64 and y.dtype.isnative


def test_client_ids_round_trip_and_appear_in_nodes_csv(tmp_path):
    ids = ["f0007_12", "writer 9", "ünï", "10"]
    path = make_valid(tmp_path / "c.h5", client_ids=ids)
    validate_shards(path)
    assert read_client_ids(path) == ids and read_client_ids(make_valid(tmp_path / "none.h5")) is None
    blocks = [dict(first=first, rank=rank, samples=np.full(2, 6), local_acc=np.full(2, 0.5),
                   main_on_local_acc=np.full(2, 0.25)) for first, rank in ((2, 1), (0, 0))]
    write_nodes_csv(tmp_path / "nodes.csv", blocks, read_client_ids(path))
    with open(tmp_path / "nodes.csv", newline="") as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == ["node", "client_id", "rank", "samples", "local_acc", "main_on_local_acc"]
    assert [(r["node"], r["client_id"]) for r in got] == [(str(i), c) for i, c in enumerate(ids)]


@pytest.mark.parametrize("make, fragment", [
    (lambda f: np.array([b"a", b"b", b"c"]), "has shape [3], num_nodes=4 needs [4]"),
    (lambda f: np.array([b"a", b"\xff\xfe", b"c", b"d"]), "/train/client_ids[1] = b'\\xff\\xfe' is not UTF-8 text"),
    (lambda f: np.array([b"a", b"b", b"", b"d"]), "/train/client_ids[2] is empty"),
    (lambda f: np.array([b"x" * 300] * 4), "must hold fixed-length strings of at most 256 bytes"),
    (lambda f: np.array([1, 2, 3, 4]), "must hold fixed-length strings"),
])
def test_bad_client_ids_are_refused(tmp_path, make, fragment):
    path = make_valid(tmp_path / "b.h5", client_ids=["a", "b", "c", "d"])
    edit(path, lambda f: replace(f, "train/client_ids", make(f)))
    with pytest.raises(DataError) as err:
        validate_shards(path)
    assert fragment in str(err.value)


def test_variable_length_client_ids_are_refused(tmp_path):
    path = make_valid(tmp_path / "v.h5")
    edit(path, lambda f: f["train"].create_dataset("client_ids", data=["a", "b", "c", "d"], dtype=h5py.string_dtype()))
    with pytest.raises(DataError, match="client_ids must hold fixed-length strings"):
        validate_shards(path)

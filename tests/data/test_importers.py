"""`fedmpi import` in-process: TFF client data and npz arrays -> shard files, checked row by row against
what the source holds, streamed in slices of any size, and never left half-written."""
from __future__ import annotations

import io
import os
import signal

import h5py
import numpy as np
import pytest
from importfiles import CLASSES, SHAPE, TEST_SIZES, TRAIN_SIZES, client_data, npz_arrays, tff_pair, write_npz

from fedmpi.data import natural, writer
from fedmpi.data.natural import Options, Progress
from fedmpi.data.npz import import_npz
from fedmpi.data.shards import read_attrs, read_client_ids, read_nodes, read_offsets, read_test
from fedmpi.data.tff import import_tff
from fedmpi.data.validate import validate_shards
from fedmpi.errors import DataError


def contents(path):
    """Every dataset of a shard file as arrays, and its attributes."""
    with h5py.File(path, "r") as f:
        data = {}
        f.visititems(lambda name, obj: data.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        return data, {k: np.asarray(v).tolist() for k, v in f.attrs.items()}


def test_tff_clients_become_nodes_in_sorted_id_order_with_their_own_test_examples(tmp_path, capsys):
    train, test = tff_pair(tmp_path)
    out = import_tff(train, test, "pixels", "label", Options(tmp_path / "out.h5", sample_shape=(1, *SHAPE)))
    ids = sorted(TRAIN_SIZES)
    assert ids == ["10", "100", "9", "a"] and read_client_ids(out) == ids
    attrs = validate_shards(out)
    assert attrs["num_nodes"] == 4 and attrs["partition"] == "natural" and attrs["local_test_scheme"] == "client"
    assert attrs["input_shape"] == [1, 4, 4] and attrs["classes"] == CLASSES and attrs["pixel_scale"] == 1.0
    for node, cid in enumerate(ids):
        x, y = read_nodes(out, "train", 0, 4).node(node)
        want_x, want_y = client_data(cid, TRAIN_SIZES[cid])
        assert x.dtype == np.float32 and np.array_equal(x[:, 0], want_x) and np.array_equal(y, want_y)
        tx, ty = read_nodes(out, "local_test", 0, 4).node(node)
        want_tx, want_ty = client_data(cid, TEST_SIZES.get(cid, 0), split="test")
        assert np.array_equal(tx[:, 0], want_tx) and np.array_equal(ty, want_ty)
    assert read_offsets(out, "local_test").tolist() == [0, 2, 2, 3, 3]  # "100" and "a": empty splits
    x, y = read_test(out)  # the local splits in node order, then the test-only client "zz"
    parts = [client_data(c, TEST_SIZES[c], split="test") for c in ("10", "100", "9", "zz")]
    assert np.array_equal(x[:, 0], np.concatenate([p[0] for p in parts]))
    assert np.array_equal(y, np.concatenate([p[1] for p in parts]))
    err = capsys.readouterr().err
    assert "clients without examples in" in err and "(first: '100')" in err
    assert "not in" in err and "'zz'" in err and "3 examples join the test set only" in err


def test_tff_streams_each_client_in_slices_with_the_same_result(tmp_path, monkeypatch):
    train, test = tff_pair(tmp_path, compression="gzip", shuffle=True)
    whole = import_tff(train, test, "pixels", "label", Options(tmp_path / "whole.h5"))
    monkeypatch.setattr(natural, "COPY_BYTES", 1)  # one row per read and write
    sliced = import_tff(train, test, "pixels", "label", Options(tmp_path / "sliced.h5"))
    (a, attrs_a), (b, attrs_b) = contents(whole), contents(sliced)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a) and attrs_a == attrs_b


def test_uint8_images_stay_uint8_and_channels_last_become_channels_first(tmp_path):
    train, test = tff_pair(tmp_path, shape=(2, 3, 3), dtype=np.uint8)
    out = import_tff(train, test, "pixels", "label", Options(tmp_path / "u.h5", channels_last=True))
    attrs = read_attrs(out)
    assert attrs["input_shape"] == [3, 2, 3] and attrs["pixel_scale"] == pytest.approx(1 / 255)
    x, _ = read_nodes(out, "train", 0, 1).node(0)
    want, _ = client_data("10", TRAIN_SIZES["10"], (2, 3, 3), np.uint8)
    assert x.dtype == np.uint8 and np.array_equal(x, np.moveaxis(want, -1, 1))


def test_classes_can_be_given_and_a_label_beyond_them_is_refused(tmp_path):
    train, test = tff_pair(tmp_path)
    assert read_attrs(import_tff(train, test, "pixels", "label", Options(tmp_path / "c.h5", classes=62)))[
        "classes"] == 62
    with pytest.raises(DataError, match="outside --classes 2"):
        import_tff(train, test, "pixels", "label", Options(tmp_path / "d.h5", classes=2))
    assert not (tmp_path / "d.h5").exists()


def reference_npz(arrays, given: bool):
    """What a shard file of `arrays` holds, computed the plain way (one client at a time)."""
    ids = sorted(set(arrays["client_id"].tolist()))
    train = [np.flatnonzero(arrays["client_id"] == c) for c in ids]
    if not given:
        return ids, train, None
    local = [np.flatnonzero(arrays["client_id_test"] == c) for c in ids]
    extra = [np.flatnonzero(arrays["client_id_test"] == c) for c in sorted(set(arrays["client_id_test"].tolist()))
             if c not in ids]
    return ids, train, (local, extra)


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_integer_ids_sort_numerically_and_given_test_arrays_are_the_local_splits(tmp_path, compressed,
                                                                                   monkeypatch):
    arrays = npz_arrays([10, 9, 100, 9, 10, 100, 100, 9, 10, 10], [10, 55, 9, 10, 55], dtype=np.float64)
    monkeypatch.setattr(natural, "COPY_BYTES", 150)  # slices of 3 rows (48 bytes each), cutting clients apart
    out = import_npz(write_npz(tmp_path / "a.npz", arrays, compressed), Options(tmp_path / "a.h5"))
    ids, train, (local, extra) = reference_npz(arrays, given=True)
    assert ids == [9, 10, 100] and read_client_ids(out) == ["9", "10", "100"]
    block, split = read_nodes(out, "train", 0, 3), read_nodes(out, "local_test", 0, 3)
    for node in range(3):
        assert np.array_equal(block.node(node)[0], arrays["x"][train[node]].astype(np.float32))
        assert np.array_equal(block.node(node)[1], arrays["y"][train[node]])
        assert np.array_equal(split.node(node)[0], arrays["x_test"][local[node]].astype(np.float32))
    assert split.counts.tolist() == [1, 2, 0]
    x, y = read_test(out)
    rows = np.concatenate(local + extra)
    assert np.array_equal(x, arrays["x_test"][rows].astype(np.float32)) and np.array_equal(y, arrays["y_test"][rows])
    assert read_attrs(out)["local_test_scheme"] == "client"


def test_npz_string_ids_sort_by_code_point_and_compressed_equals_stored(tmp_path):
    arrays = npz_arrays(["b", "ä", "B", "b", "10", "9", "ä", "B"], shape=(5,), dtype=np.uint8)
    stored = import_npz(write_npz(tmp_path / "s.npz", arrays), Options(tmp_path / "s.h5", test_fraction=0.5))
    packed = import_npz(write_npz(tmp_path / "c.npz", arrays, True), Options(tmp_path / "c.h5", test_fraction=0.5))
    assert read_client_ids(stored) == ["10", "9", "B", "b", "ä"]
    (a, _), (b, _) = contents(stored), contents(packed)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert a["train/x"].dtype == np.uint8


def test_npz_test_fraction_splits_each_client_by_the_seed_and_keeps_every_example_once(tmp_path):
    owners = [c for c, n in (("p", 20), ("q", 7), ("r", 1), ("s", 2)) for _ in range(n)]
    arrays = npz_arrays(list(np.random.default_rng(3).permutation(owners)), shape=(1,))
    source = write_npz(tmp_path / "f.npz", arrays)
    out = import_npz(source, Options(tmp_path / "f.h5", test_fraction=0.25, seed=4))
    train, local = read_offsets(out, "train"), read_offsets(out, "local_test")
    assert np.diff(local).tolist() == [5, 2, 0, 1]  # round(0.25 n), halves up; one example stays for training
    assert np.diff(train).tolist() == [15, 5, 1, 1]
    data, attrs = contents(out)
    assert attrs["local_test_scheme"] == "split" and attrs["test_fraction"] == 0.25
    seen = np.sort(np.concatenate([data["train/x"][:, 0], data["local_test/x"][:, 0]]))
    assert np.array_equal(seen, np.sort(arrays["x"][:, 0]))  # every example exactly once
    assert np.array_equal(data["test/x"], data["local_test/x"])
    again = import_npz(source, Options(tmp_path / "g.h5", test_fraction=0.25, seed=4))
    other = import_npz(source, Options(tmp_path / "h.h5", test_fraction=0.25, seed=5))
    assert np.array_equal(contents(again)[0]["local_test/x"], data["local_test/x"])
    assert not np.array_equal(contents(other)[0]["local_test/x"], data["local_test/x"])


def test_progress_prints_a_line_per_tenth_only_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term, log = Terminal(), io.StringIO()
    for stream in (term, log):
        progress = Progress(40, stream)
        for _ in range(40):
            progress.advance(1)
    lines = term.getvalue().splitlines()
    assert [line.split()[2] for line in lines] == [f"{p}%" for p in range(10, 101, 10)] and log.getvalue() == ""


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError, signal.SIGTERM])
def test_an_interrupted_or_failing_import_leaves_no_output_and_no_temp_file(tmp_path, monkeypatch, failure):
    train, test = tff_pair(tmp_path)
    writes, real = [], writer.ShardWriter.write

    def write(self, name, row, array):
        writes.append(name)
        if len(writes) == 6:  # in the middle of the clients' rows
            if failure is OSError:
                os.close(self.fd)  # the pwrite below fails (EBADF) as one to a full disk would (ENOSPC)
                return real(self, name, row, array)
            if failure is signal.SIGTERM:  # scancel: the handler turns it into KeyboardInterrupt
                os.kill(os.getpid(), signal.SIGTERM)
                return real(self, name, row, array)
            raise KeyboardInterrupt
        return real(self, name, row, array)

    monkeypatch.setattr(writer.ShardWriter, "write", write)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(DataError if failure is OSError else KeyboardInterrupt):
        import_tff(train, test, "pixels", "label", Options(tmp_path / "out" / "o.h5"))
    assert not (tmp_path / "out" / "o.h5").exists() and leftovers(tmp_path / "out") == []
    assert signal.getsignal(signal.SIGTERM) == before  # the import's handler is gone again


def test_an_output_larger_than_the_free_space_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    train, test = tff_pair(tmp_path)

    class Full:
        f_bavail, f_frsize = 0, 4096

    monkeypatch.setattr(writer.os, "statvfs", lambda path: Full())
    with pytest.raises(DataError, match="needs 0.00 GiB, only 0.00 GiB is free in"):
        import_tff(train, test, "pixels", "label", Options(tmp_path / "o.h5"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.h5", "train.h5"]

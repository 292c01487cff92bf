"""`fedmpi prepare` of a large partition streams the file block by block: the same contents, bounded memory."""
import io

import h5py
import numpy as np
import pytest

from fedmpi.config import Config
from fedmpi.data import prepare as prepare_module
from fedmpi.data import streamed
from fedmpi.data.prepare import prepare
from fedmpi.data.streamed import node_blocks
from fedmpi.data.validate import validate_shards
from fedmpi.errors import DataError


def contents(path):
    """Every dataset's dtype and values and every attribute of a shard file."""
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, (obj.dtype.str, obj[()].tolist()))
                     if isinstance(obj, h5py.Dataset) else None)
        attrs = {k: np.asarray(v).tolist() for k, v in f.attrs.items()}
    return out, attrs


def config(tmp_path, name, **keys):
    return Config(dataset="synthetic", synthetic_shape="1x4x4", nodes=7, samples_per_node=9, test_per_node=3,
                  partition=keys.pop("partition", "quantity"), data_file=str(tmp_path / name), **keys)


@pytest.mark.parametrize("partition", ["quantity", "dirichlet"])
def test_a_streamed_file_holds_exactly_what_the_in_memory_writer_writes(tmp_path, monkeypatch, partition):
    whole = prepare(config(tmp_path, "whole.h5", partition=partition))
    monkeypatch.setattr(prepare_module, "STREAM_FILE_BYTES", 0)  # every file streamed,
    monkeypatch.setattr(streamed, "STREAM_ROWS", 10)             # in blocks of a node or two
    streamed_path = prepare(config(tmp_path, "streamed.h5", partition=partition))
    assert len(node_blocks([np.zeros(9)] * 7)) >= 4  # the training rows really went in several blocks
    want, got = contents(whole), contents(streamed_path)
    assert got == want and len(want[0]["train/x"][1]) == 63  # 7 nodes x 9 samples
    assert validate_shards(streamed_path)["num_nodes"] == 7
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".json")) == ["streamed.h5", "whole.h5"]


def test_node_blocks_hold_at_most_the_row_budget_and_a_larger_node_alone():
    parts = [np.zeros(n) for n in (4, 4, 3, 12, 0, 2)]
    assert node_blocks(parts, rows=8) == [(0, 2), (2, 3), (3, 4), (4, 6)]
    assert node_blocks([], rows=8) == []


def test_progress_is_a_line_per_tenth_on_a_terminal(tmp_path, monkeypatch, capsys):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(prepare_module, "STREAM_FILE_BYTES", 0)
    monkeypatch.setattr(streamed, "STREAM_ROWS", 10)
    monkeypatch.setattr("sys.stderr", term)
    prepare(config(tmp_path, "p.h5"))
    lines = term.getvalue().splitlines()
    assert lines[-1] == "fedmpi prepare: 100% (1,084 of 1,084 rows)"  # 63 train + 21 local test + 1,000 test
    assert 2 <= len(lines) <= 10 and all(line.startswith("fedmpi prepare: ") for line in lines)


def test_a_failure_while_streaming_leaves_no_file_and_no_temp_file(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module, "STREAM_FILE_BYTES", 0)
    monkeypatch.setattr(streamed, "STREAM_ROWS", 10)
    calls = []

    def failing_blocks(parts):
        calls.append(1)
        if len(calls) == 2:  # the local test group, after the training rows were written
            raise DataError("shard file: a write failed")
        return node_blocks(parts)

    monkeypatch.setattr(streamed, "node_blocks", failing_blocks)
    with pytest.raises(DataError, match="a write failed"):
        prepare(config(tmp_path, "f.h5"))
    assert list(tmp_path.iterdir()) == []

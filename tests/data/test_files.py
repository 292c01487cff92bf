"""Untrusted files other than HDF5: regular files only, bounded reads, bounded quotes in messages."""
import os

import numpy as np
import pytest
from shardfiles import in_child

from fedmpi.data.files import clip, quote, read_text, reason, stat_regular
from fedmpi.errors import DataError


def test_quote_keeps_small_values_whole_and_cuts_large_ones_with_their_size():
    assert quote(3) == "3" and quote("iid") == "'iid'" and quote(np.int64(2)) == "2"
    assert quote([1, 28, 28]) == "[1, 28, 28]"
    big = quote(np.zeros(8 * 2**20))
    assert big.startswith("[0.0, 0.0,") and "8,388,608 values, shape [8388608], float64" in big and len(big) < 250
    long = quote("x" * 10**6)
    assert long.startswith("'xxx") and long.endswith("... (1,000,000 characters)") and len(long) < 250
    assert quote(list(range(10**5))) == "list of 100,000 items"
    assert len(quote({"k" * 500: 1})) < 260


def test_clip_flattens_newlines_and_cuts_at_the_limit():
    assert clip("a\nb\t c") == "a b c"
    assert clip("y" * 300, 10) == "yyyyyyyyyy... (300 characters)"


def test_reason_finds_the_cause_in_an_hdf5_error_stack():
    stack = OSError("Can't write data (file write failed: time = x, errno = 28, error message = 'No space left on "
                    "device', buf = 0x1, total write size = 4096)")
    assert reason(stack) == "No space left on device"
    assert reason(PermissionError(13, "Permission denied")) == "Permission denied"
    assert reason(ValueError("")) == "ValueError"


def test_read_text_refuses_a_fifo_without_blocking(tmp_path):
    fifo = tmp_path / "metrics.jsonl"
    os.mkfifo(fifo)
    kind, message = in_child(read_text, fifo, "report:", 100, timeout=60)
    assert kind == "DataError" and message == f"report: {fifo} is a FIFO (named pipe), not a regular file"


def test_read_text_bounds_the_size_and_needs_utf8(tmp_path):
    path = tmp_path / "run.json"
    path.write_text("x" * 100)
    assert read_text(path, "report:", 100) == "x" * 100
    with pytest.raises(DataError, match="is larger than 99 bytes"):
        read_text(path, "report:", 99)
    path.write_bytes(b'{"a": "\xff\xfe"}')
    with pytest.raises(DataError, match=r"is not UTF-8 text \(byte 7\)"):
        read_text(path, "report:", 100)


def test_stat_regular_names_what_the_path_is(tmp_path):
    with pytest.raises(DataError, match=r"missing.h5 does not exist \(hint\)"):
        stat_regular(tmp_path / "missing.h5", "x", missing=" (hint)")
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match=r"cannot be read \(Not a directory\)"):
        stat_regular(tmp_path / "file" / "below", "x")
    with pytest.raises(DataError, match="is a directory, not a regular file"):
        stat_regular(tmp_path, "x")
    assert stat_regular(tmp_path / "file", "x").st_size == 0

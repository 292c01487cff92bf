"""The baseline cache beside the shard file: only a regular, well-formed one is read; writing it never fails a run."""
import json
import os

import pytest
from shardfiles import in_child

from fedmpi.config import Config
from fedmpi.engine.central import cache_path, is_baseline, load_cached, write_cache

GOOD = {"test_acc": [0.5, 0.75], "test_loss": [1.2, 0.8], "samples": 40, "epochs": 2}


@pytest.fixture
def cfg(tmp_path):
    return Config(dataset="synthetic", central_epochs=2, data_file=str(tmp_path / "d.h5"))


def test_a_written_cache_is_read_back(cfg):
    write_cache(cache_path(cfg), GOOD)
    assert load_cached(cfg) == GOOD
    assert [p.name for p in cache_path(cfg).parent.iterdir()] == [cache_path(cfg).name]


@pytest.mark.parametrize("content", ["[1, 2]", '{"test_acc": "high", "test_loss": [], "samples": 1}',
                                     json.dumps(dict(GOOD, test_acc=[0.5, 7.0])), json.dumps(dict(GOOD, samples="x")),
                                     json.dumps(dict(GOOD, test_loss=[1.0])), "{truncated", "[" * 100_000])
def test_a_cache_of_the_wrong_shape_is_ignored_and_retrained(cfg, content):
    cache_path(cfg).write_text(content)
    assert load_cached(cfg) is None


def test_a_cache_that_is_a_fifo_is_ignored_without_blocking(cfg):
    os.mkfifo(cache_path(cfg))
    assert in_child(load_cached, cfg) == ("ok", "None")


def test_is_baseline_wants_one_accuracy_and_loss_per_epoch():
    assert is_baseline(GOOD, 2) and not is_baseline(GOOD, 3)
    assert is_baseline(dict(GOOD, test_loss=[float("nan"), 0.8]), 2)  # a diverged baseline is still a result


def test_a_cache_that_cannot_be_written_is_a_note_and_leaves_no_temp_file(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    write_cache(tmp_path / "a-file" / "c.json", GOOD)  # a directory below a file: ENOTDIR, for root too
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a-file/c.json not written (Not a directory)" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "c.json").mkdir()  # the rename over a directory fails after the temp file is written
    write_cache(tmp_path / "d" / "c.json", GOOD)
    err = capsys.readouterr().err
    assert err.startswith("fedmpi: note: baseline cache") and "not written (Is a directory)" in err, err
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["c.json"]

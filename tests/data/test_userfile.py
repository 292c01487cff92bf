"""`dataset: file`: the shard file sets the nodes; conflicting keys are refused; nothing is ever written."""
from __future__ import annotations

import os

import numpy as np
import pytest
import yaml
from shardfiles import make_valid

from fedmpi.config import Config, load_config
from fedmpi.data.describe import describe, label_table
from fedmpi.data.prepare import check_matches, prepare
from fedmpi.engine.central import cache_path
from fedmpi.errors import ConfigError, DataError


@pytest.fixture
def shard(tmp_path):
    return make_valid(tmp_path / "mine.h5", nodes=5, shape=(6,), dtype=np.float32,
                      client_ids=["u1", "u10", "u2", "x", "y"])


def test_nodes_come_from_the_file_and_a_run_checks_it_as_any_shard_file(shard):
    cfg = load_config(None, {"dataset": "file", "data_file": str(shard)})
    assert cfg.nodes == 5 and cfg.data_path == shard
    assert prepare(cfg) == shard  # checks, never writes
    assert load_config(None, {"dataset": "file", "data_file": str(shard), "nodes": 5}).nodes == 5


def test_a_resumed_runs_saved_config_loads_again(shard, tmp_path):
    cfg = load_config(None, {"dataset": "file", "data_file": str(shard)})
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(cfg.to_dict()))  # every key named, the defaults among them
    assert load_config(str(saved)) == cfg


@pytest.mark.parametrize("key, value, fragment", [
    ("nodes", 50, "config key 'nodes' is 50, the shard file"),
    ("partition", "dirichlet", "config key 'partition' does not apply to dataset 'file'"),
    ("samples_per_node", 30, "config key 'samples_per_node' does not apply"),
    ("data_dir", "/data", "config key 'data_dir' does not apply"),
])
def test_a_config_naming_other_values_is_refused_naming_the_key(shard, key, value, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, {"dataset": "file", "data_file": str(shard), key: value})


def test_data_file_must_name_an_existing_shard_file_and_none_is_ever_made(tmp_path):
    with pytest.raises(ConfigError, match="dataset 'file' needs data_file"):
        load_config(None, {"dataset": "file"})
    with pytest.raises(ConfigError, match="must be a plain path"):
        load_config(None, {"dataset": "file", "data_file": str(tmp_path / "{nodes}.h5")})
    with pytest.raises(DataError, match="does not exist \\(dataset: file runs on an existing shard file: make one"):
        load_config(None, {"dataset": "file", "data_file": str(tmp_path / "absent.h5")})
    os.mkfifo(tmp_path / "fifo.h5")
    with pytest.raises(DataError, match="is a FIFO"):
        load_config(None, {"dataset": "file", "data_file": str(tmp_path / "fifo.h5")})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo.h5"]


def test_prepare_force_and_a_config_made_without_load_config_are_refused(shard):
    cfg = Config(dataset="file", data_file=str(shard))  # nodes left at 100
    with pytest.raises(ConfigError, match="config key 'nodes' is 100, the shard file .* has 5 nodes"):
        check_matches(cfg, shard)
    with pytest.raises(ConfigError, match="prepare --force: with dataset 'file' fedmpi never writes data_file"):
        prepare(Config(dataset="file", data_file=str(shard), nodes=5), force=True)


def test_the_cnn_needs_channels_height_and_width(shard):
    cfg = load_config(None, {"dataset": "file", "data_file": str(shard), "model": "cnn"})
    with pytest.raises(ConfigError, match="config key 'model' is 'cnn', which needs inputs \\[C, H, W\\]"):
        prepare(cfg)


def test_the_baseline_cache_follows_the_file_itself(shard, tmp_path):
    cfg = load_config(None, {"dataset": "file", "data_file": str(shard)})
    before = cache_path(cfg)
    make_valid(tmp_path / "other.h5", nodes=5, shape=(6,), dtype=np.float32, seed=3)
    os.replace(tmp_path / "other.h5", shard)  # imported again under the same name: other data
    os.utime(shard, ns=(1, 1))
    assert cache_path(cfg) != before and cache_path(cfg).parent == shard.parent


def test_describe_shows_client_ids_local_splits_and_stays_bounded(tmp_path, shard):
    text = describe(shard)
    assert "partition: iid" in text and " u10 " in text and "local_test" in text
    counts = np.ones((1000, 3), np.int64)
    lines = label_table(counts, [f"c{i}" for i in range(1000)], np.zeros(1000, np.int64))
    assert len(lines) == 2 + 10 + 1 + 10 + 2 and "(980 nodes not shown)" in lines[12]
    assert lines[2].split()[:2] == ["0", "c0"] and lines[-3].split()[:2] == ["999", "c999"]
    assert "nodes without any: 1,000" in lines[-2]
    many = label_table(np.eye(3, 62, dtype=np.int64) * 7)  # 62 classes: the most frequent labels per node
    assert many[2].split()[-3:] == ["0x7", "(1", "labels)"] and len(many[1]) < 80


def test_describe_keeps_sizes_and_ids_when_label_counts_are_too_many(shard, monkeypatch):
    from fedmpi.data import validate

    monkeypatch.setattr(validate, "MAX_HISTOGRAM_CELLS", 5)  # 5 nodes x 3 classes = 15 cells
    lines = describe(shard).splitlines()
    table = lines[lines.index("training samples per node") + 1:]
    assert table[0].split() == ["node", "client_id", "samples", "local_test"]
    assert table[2].split() == ["1", "u10", "6", "2"] and table[-1] == "samples per node: min 6, mean 6.0, max 6"

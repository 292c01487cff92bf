"""The prepare stage: raw dataset -> partition -> one HDF5 shard file (see shards.py for the layout)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import Config
from .errors import DataError
from .partition import PARTITIONERS, offsets_of
from .shards import read_attrs, write_shards
from .sources import load_dataset
from .validate import validate_shards


def expected_attrs(cfg: Config) -> dict:
    """The attributes a shard file made from `cfg` carries; a run checks them before training."""
    return {"dataset": cfg.dataset, "partition": cfg.partition, "seed": cfg.seed, "num_nodes": cfg.nodes,
            "samples_per_node": cfg.samples_per_node, "test_per_node": cfg.test_per_node}


def prepare(cfg: Config, force: bool = False) -> Path:
    """Write cfg's shard file unless a matching one exists; returns its path."""
    path = cfg.data_path
    if path.exists() and not force:
        check_matches(cfg, path)
        return path
    raw = load_dataset(cfg.dataset, cfg.data_dir, cfg.seed, synthetic_size=cfg.nodes * cfg.samples_per_node)
    split = PARTITIONERS[cfg.partition]
    train_parts = split(raw.train_y, cfg.nodes, cfg.samples_per_node, raw.classes, cfg.seed)
    # Local test splits may reuse a few test images when a label is short (MNIST has 892 fives).
    test_parts = split(raw.test_y, cfg.nodes, cfg.test_per_node, raw.classes, cfg.seed, allow_reuse=True) \
        if cfg.test_per_node else [np.zeros(0, np.int64)] * cfg.nodes
    train_idx, test_idx = np.concatenate(train_parts), np.concatenate(test_parts).astype(np.int64)
    attrs = dict(expected_attrs(cfg), classes=raw.classes, input_shape=list(raw.train_x.shape[1:]),
                 pixel_scale=1.0 / 255.0)
    write_shards(path, attrs,
                 train=(raw.train_x[train_idx], raw.train_y[train_idx], offsets_of(train_parts)),
                 local_test=(raw.test_x[test_idx], raw.test_y[test_idx], offsets_of(test_parts)),
                 test=(raw.test_x, raw.test_y))
    return path


def check_matches(cfg: Config, path: Path) -> None:
    """Refuse a malformed shard file, or one made from another dataset, partition, seed or size."""
    attrs = validate_shards(path)
    for key, want in expected_attrs(cfg).items():
        if attrs.get(key) != want:
            raise DataError(f"shard file {path} was made with {key}={attrs.get(key)!r}, the config says {want!r}; "
                            f"delete it, choose another data_file, or run `fedmpi prepare --force`")


def describe(path: Path) -> str:
    attrs = read_attrs(path)
    return "\n".join(f"{k}: {v}" for k, v in sorted(attrs.items()))

"""The prepare stage: raw dataset -> partition -> one HDF5 shard file (see shards.py for the layout)."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from ..config import Config, placeholders, synthetic_dims
from ..errors import ConfigError, DataError
from ..runtime.memory import check_prepare
from .describe import describe, label_table  # noqa: F401 - `fedmpi prepare --describe` and its tests use them
from .files import quote
from .partition import PARTITIONERS, iid, like_train, offsets_of
from .shards import make_parent, write_shards
from .sources import check_data_dir, load_dataset
from .streamed import STREAM_FILE_BYTES, file_bytes, write_streamed
from .userfile import check_model
from .validate import ALL_LABELS, MAX_NODES, MAX_ROWS, validate_shards

# Partitions whose local test splits copy each node's training label proportions (see like_train).
LABEL_SKEWED = ("shards", "dirichlet")


# Each partitioner's own hyperparameters: config key -> the partitioner's keyword argument.
PARTITION_KEYS = {"shards": {"shards_per_node": "shards_per_node"}, "dirichlet": {"alpha": "alpha"},
                  "quantity": {"quantity_sigma": "sigma"}}


def partition_options(cfg: Config) -> dict:
    """The keyword arguments of cfg's partitioner, taken from their config keys."""
    return {arg: getattr(cfg, key) for key, arg in PARTITION_KEYS.get(cfg.partition, {}).items()}


DEFAULT_SHAPE = Config.__dataclass_fields__["synthetic_shape"].default


def expected_attrs(cfg: Config) -> dict:
    """The attributes a shard file made from `cfg` carries; a run checks them before training."""
    if cfg.dataset == "file":  # the file says how it was made; only the node count must agree
        return {"num_nodes": cfg.nodes}
    attrs = {"dataset": cfg.dataset, "partition": cfg.partition, "seed": cfg.seed, "num_nodes": cfg.nodes,
             "samples_per_node": cfg.samples_per_node, "test_per_node": cfg.test_per_node}
    # Only the chosen partition's keys: files of the IID partitions carry none of the non-IID attributes.
    attrs.update({key: getattr(cfg, key) for key in PARTITION_KEYS.get(cfg.partition, {})})
    if cfg.partition in PARTITION_KEYS:
        attrs["local_test_scheme"] = local_test_scheme(cfg.partition)
    if cfg.dataset == "synthetic" and cfg.synthetic_shape != DEFAULT_SHAPE:
        # Only a shape asked for: a synthetic file of any shape (as the tests make) runs by default, the
        # model being built from the file's own input_shape.
        attrs["input_shape"] = list(synthetic_dims(cfg.synthetic_shape))
    return attrs


def local_test_scheme(partition: str) -> str:
    """How local test splits are drawn: label-skewed ones follow the node's training labels."""
    if partition in LABEL_SKEWED:
        return "like_train"
    return "iid" if partition == "quantity" else partition


def local_test_parts(cfg: Config, raw, train_parts: list[np.ndarray]) -> list[np.ndarray]:
    """Each node's local test split, test_per_node samples (test images may repeat across nodes)."""
    if not cfg.test_per_node:
        return [np.zeros(0, np.int64)] * cfg.nodes
    scheme = local_test_scheme(cfg.partition)
    if scheme == "like_train":
        return like_train(train_parts, raw.train_y, raw.test_y, cfg.test_per_node, raw.classes, cfg.seed)
    # quantity skew has IID labels: equal-size IID test splits keep per-node accuracies comparable.
    split = iid if scheme == "iid" else PARTITIONERS[scheme]
    # Local test splits may reuse a few test images when a label is short (MNIST has 892 fives).
    return split(raw.test_y, cfg.nodes, cfg.test_per_node, raw.classes, cfg.seed, allow_reuse=True)


def prepare(cfg: Config, force: bool = False, labels: tuple[str, ...] = ALL_LABELS) -> Path:
    """Write cfg's shard file unless a matching one exists; returns its path. An existing file is
    checked, with the labels of the groups `labels` (validate_shards)."""
    path = cfg.data_path
    if cfg.dataset == "file":
        if force:
            raise ConfigError("prepare --force: with dataset 'file' fedmpi never writes data_file, it is the data")
        check_matches(cfg, path, labels)
        return path
    if os.path.exists(path) and not force:
        check_matches(cfg, path, labels)
        return path
    check_preparable(cfg)
    print(f"preparing the shard file {path} ({cfg.dataset}, {cfg.partition}, {cfg.nodes} nodes x "
          f"{cfg.samples_per_node} samples)", flush=True)
    raw = load_dataset(cfg.dataset, cfg.data_dir, cfg.seed, synthetic_size=cfg.nodes * cfg.samples_per_node,
                       synthetic_shape=synthetic_dims(cfg.synthetic_shape))
    split = PARTITIONERS[cfg.partition]
    train_parts = split(raw.train_y, cfg.nodes, cfg.samples_per_node, raw.classes, cfg.seed,
                        **partition_options(cfg))
    test_parts = local_test_parts(cfg, raw, train_parts)
    attrs = dict(expected_attrs(cfg), classes=raw.classes, input_shape=list(raw.train_x.shape[1:]),
                 pixel_scale=1.0 / 255.0)
    rows = sum(map(len, train_parts)) + sum(map(len, test_parts)) + len(raw.test_y)
    if file_bytes(rows, math.prod(raw.train_x.shape[1:]), raw.train_x.dtype.itemsize) > STREAM_FILE_BYTES:
        write_streamed(path, attrs, raw, train_parts, test_parts)  # bounded memory: block by block
        return path
    train_idx, test_idx = np.concatenate(train_parts), np.concatenate(test_parts).astype(np.int64)
    write_shards(path, attrs,
                 train=(raw.train_x[train_idx], raw.train_y[train_idx], offsets_of(train_parts)),
                 local_test=(raw.test_x[test_idx], raw.test_y[test_idx], offsets_of(test_parts)),
                 test=(raw.test_x, raw.test_y))
    return path


def check_preparable(cfg: Config) -> None:
    """Refuse, before the raw dataset is loaded (minutes for a large one), a shard file that cannot be
    made: beyond the shard file's caps, too big for this host's memory (runtime/memory.py), data_dir
    unreadable, or nowhere to write it."""
    check_sizes(cfg)
    check_prepare(cfg.dataset, cfg.nodes, cfg.samples_per_node, cfg.test_per_node,
                  math.prod(synthetic_dims(cfg.synthetic_shape)))
    if cfg.data_dir and cfg.dataset != "synthetic":
        check_data_dir(cfg.data_dir)
    make_parent(cfg.data_path)


def check_sizes(cfg: Config) -> None:
    """A file fedmpi writes must be one it will read back: within the shard file's caps."""
    if cfg.nodes > MAX_NODES:
        raise ConfigError(f"config key 'nodes' is {cfg.nodes:,}, a shard file holds at most {MAX_NODES:,} nodes")
    for key, per_node in (("samples_per_node", cfg.samples_per_node), ("test_per_node", cfg.test_per_node)):
        if cfg.nodes * per_node > MAX_ROWS:
            raise ConfigError(f"config keys 'nodes' x '{key}' make {cfg.nodes * per_node:,} rows, a shard file "
                              f"holds at most {MAX_ROWS:,}")


def check_matches(cfg: Config, path: Path, labels: tuple[str, ...] = ALL_LABELS) -> None:
    """Refuse a malformed shard file, or one made from another dataset, partition, seed or size
    (scanning the labels of the groups `labels`, see validate_shards)."""
    attrs = validate_shards(path, labels)
    for key, want in expected_attrs(cfg).items():
        if attrs.get(key) != want and cfg.dataset == "file":
            raise ConfigError(f"config key 'nodes' is {cfg.nodes}, the shard file {path} has {attrs[key]} nodes")
        if attrs.get(key) != want:
            raise DataError(f"shard file {path} was made with {key}={quote(attrs.get(key))}, the config says "
                            f"{quote(want)}; " + mismatch_advice(cfg, key))
    check_model(cfg.model, attrs["input_shape"], path)


# Shard-file attributes named otherwise in the config; local_test_scheme follows from partition.
ATTR_KEYS = {"num_nodes": "nodes", "local_test_scheme": "partition", "input_shape": "synthetic_shape"}


def mismatch_advice(cfg: Config, attr: str) -> str:
    """What to do about a shard file made with another value of `attr`.

    Rewriting it (`prepare --force`) is advised only when data_file's name is built from that key:
    then the name says the config's value and the content is what is wrong. Otherwise the file may
    well be another config's (a fixed name, or one missing this key), and the safe way out is a name
    that depends on the key, so each value gets its own file.
    """
    key = ATTR_KEYS.get(attr, attr)
    if attr == "local_test_scheme" or key in placeholders(cfg.data_file):
        return "delete it, or rewrite it with `fedmpi prepare --force`"
    stem, dot, suffix = cfg.data_file.rpartition(".")
    named = f"{stem}-{key}{{{key}}}.{suffix}" if dot and "/" not in suffix else f"{cfg.data_file}-{key}{{{key}}}"
    return (f"data_file does not depend on {key}, so that file may be another config's: give data_file a "
            f"{{{key}}} placeholder, e.g. --set data_file='{named}'")

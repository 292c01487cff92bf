"""`dataset: file`: run on any valid shard file (one made by `fedmpi import`, or by hand).

The file says what the data are: the node count, input shape and dtype, and classes come from its
attributes. A config that names a different node count, or any key of how fedmpi would make a
file (partition, samples_per_node, ...), is refused naming the key, so no run silently trains on
something else than its config says. The file is never written: a missing one is an error.
"""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from ..errors import ConfigError, DataError
from .files import quote, stat_regular
from .shards import read_attrs
from .validate import MAX_NODES, is_int

# Keys that describe how fedmpi makes a shard file: the file itself answers them.
MAKING_KEYS = ("data_dir", "partition", "samples_per_node", "test_per_node", "alpha", "shards_per_node",
               "quantity_sigma")
MISSING = " (dataset: file runs on an existing shard file: make one with `fedmpi import`)"


def file_values(values: dict) -> dict:
    """Config values with `nodes` taken from the shard file that data_file names; refuses conflicting keys."""
    from ..config import Config, coerce  # config.py calls this module: imported here, not at the top

    template = values.get("data_file")
    if "data_file" not in values or not isinstance(template, str) or not template:
        raise ConfigError("dataset 'file' needs data_file: the path of a shard file (made by `fedmpi import`)")
    if "{" in template or "}" in template:
        raise ConfigError(f"config key 'data_file' must be a plain path with dataset 'file', got {quote(template)}")
    defaults = {f.name: f.default for f in fields(Config)}
    types = {f.name: f.type for f in fields(Config)}
    for key in MAKING_KEYS:  # values as read (text from a file or --set): compared as their key's type
        if key in values and coerce(key, types[key], values[key]) != defaults[key]:
            raise ConfigError(f"config key '{key}' does not apply to dataset 'file': the shard file {template} "
                              f"says how its data were split; drop the key")
    path = Path(template)
    stat_regular(path, "shard file", missing=MISSING)
    nodes = read_attrs(path).get("num_nodes")
    if not is_int(nodes) or not 1 <= nodes <= MAX_NODES:
        raise DataError(f"shard file {path}: attribute 'num_nodes' must be in [1, {MAX_NODES:,}], got {quote(nodes)}")
    if "nodes" in values and coerce("nodes", types["nodes"], values["nodes"]) != nodes:
        raise ConfigError(f"config key 'nodes' is {quote(values['nodes'])}, the shard file {path} has {nodes} nodes; "
                          f"with dataset 'file' the file sets it: drop the key")
    return dict(values, nodes=int(nodes))


def check_model(model: str, input_shape: list, path: Path) -> None:
    """The built-in cnn needs [channels, height, width] inputs (import with --reshape 1,28,28 for 28x28)."""
    if model == "cnn" and len(input_shape) != 3:
        raise ConfigError(f"config key 'model' is 'cnn', which needs inputs [C, H, W]; the shard file {path} holds "
                          f"{list(input_shape)} (import it with --reshape, e.g. --reshape 1,28,28)")

"""Run configuration: a frozen dataclass read from YAML plus `--set key=value` overrides.

Every check names the bad key, so a typo in a batch script fails at once with one line
instead of after an hour in the queue.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import ConfigError

DATASETS = ("mnist", "fashion-mnist", "cifar10", "synthetic", "file")
PARTITIONS = ("balanced", "iid", "shards", "dirichlet", "quantity")
MODELS = ("2nn", "cnn")
AGGREGATIONS = ("mean", "weighted")
DEVICES = ("auto", "cpu", "cuda")
ENGINES = ("batched", "sequential")
AUTOCASTS = ("none", "bf16")
SERVER_OPTS = ("none", "fedavgm", "fedadam", "fedyogi")
UPDATE_DTYPES = ("fp32", "fp16", "bf16")
# server_lr when the config leaves it null: FedAvg and FedAvgM step by the whole averaged update;
# the adaptive ones step about server_lr per coordinate, so 1.0 would wreck the model
# (Reddi et al. 2021 tune it near 10^-2 for Adam and Yogi on their image tasks).
SERVER_LR_DEFAULTS = {"none": 1.0, "fedavgm": 1.0, "fedadam": 0.01, "fedyogi": 0.01}


@dataclass(frozen=True)
class Config:
    """Everything that defines a run; the resolved copy is saved as config.yaml in the run directory."""

    dataset: str = "mnist"
    data_dir: Optional[str] = None
    data_file: str = "data/{dataset}-{partition}-{nodes}x{samples_per_node}-seed{seed}.h5"
    nodes: int = 100
    partition: str = "balanced"
    samples_per_node: int = 450
    test_per_node: int = 90
    model: str = "2nn"
    rounds: int = 11
    local_epochs: int = 10
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    aggregation: str = "mean"
    central_epochs: int = 10
    eval_every: int = 1
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    checkpoint_every: int = 0     # rounds between checkpoints; 0: only on a stop signal
    max_dropped_fraction: float = 0.5  # stop with an error when more nodes than this diverge in a round
    engine: str = "batched"
    chunk_nodes: int = 0          # batched engine: nodes trained together; 0 = from the memory budget
    autocast: str = "none"        # bf16: matmuls of local training in bfloat16 (weights, momentum stay float32)
    # Non-IID partitions.
    alpha: float = 0.5              # dirichlet: concentration; smaller is more label skew
    shards_per_node: int = 2        # shards: label-sorted shards dealt to each node (McMahan: 2)
    quantity_sigma: float = 1.0     # quantity: sigma of the lognormal node sizes; 0 is equal sizes
    # Client sampling, server optimizer, FedProx, compressed updates.
    fraction: float = 1.0           # C: share of nodes that train in a round
    server_opt: str = "none"
    server_lr: Optional[float] = None   # null: SERVER_LR_DEFAULTS[server_opt], resolved below
    server_momentum: float = 0.9
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    prox_mu: float = 0.0
    update_dtype: str = "fp32"

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, f.type, getattr(self, f.name)))
        _check_choice("dataset", self.dataset, DATASETS)
        _check_choice("partition", self.partition, PARTITIONS)
        _check_choice("model", self.model, MODELS)
        _check_choice("aggregation", self.aggregation, AGGREGATIONS)
        _check_choice("device", self.device, DEVICES)
        _check_choice("engine", self.engine, ENGINES)
        _check_choice("autocast", self.autocast, AUTOCASTS)
        for name in ("nodes", "samples_per_node", "rounds", "local_epochs", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config key '{name}' must be >= 1, got {getattr(self, name)}")
        for name in ("test_per_node", "central_epochs", "threads", "seed", "chunk_nodes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config key '{name}' must be >= 0, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"config key 'checkpoint_every' must be >= 0, got {self.checkpoint_every}")
        if not 0 <= self.max_dropped_fraction <= 1:
            raise ConfigError(f"config key 'max_dropped_fraction' must be in [0, 1], got {self.max_dropped_fraction}")
        if not self.lr > 0:
            raise ConfigError(f"config key 'lr' must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"config key 'momentum' must be in [0, 1), got {self.momentum}")
        if not self.data_file:
            raise ConfigError("config key 'data_file' must not be empty")
        self._check_federated()

    def _check_federated(self) -> None:
        """The federated keys: partitions, sampling, server optimizer, FedProx, update dtype."""
        _check_choice("server_opt", self.server_opt, SERVER_OPTS)
        _check_choice("update_dtype", self.update_dtype, UPDATE_DTYPES)
        if self.server_lr is None:
            object.__setattr__(self, "server_lr", SERVER_LR_DEFAULTS[self.server_opt])
        _check_range("alpha", self.alpha, low=0.0, low_open=True)
        _check_range("shards_per_node", self.shards_per_node, low=1)
        _check_range("quantity_sigma", self.quantity_sigma, low=0.0)
        _check_range("fraction", self.fraction, low=0.0, low_open=True, high=1.0)
        _check_range("server_lr", self.server_lr, low=0.0, low_open=True)
        _check_range("server_momentum", self.server_momentum, low=0.0, high=1.0, high_open=True)
        _check_range("server_beta1", self.server_beta1, low=0.0, high=1.0, high_open=True)
        _check_range("server_beta2", self.server_beta2, low=0.0, high=1.0, high_open=True)
        _check_range("server_tau", self.server_tau, low=0.0, low_open=True)
        _check_range("prox_mu", self.prox_mu, low=0.0)

    @property
    def data_path(self) -> Path:
        """The HDF5 file, with `{key}` placeholders in data_file filled from this config."""
        try:
            return Path(self.data_file.format(**self.to_dict()))
        except (KeyError, IndexError, ValueError) as err:
            raise ConfigError(f"config key 'data_file' has a bad placeholder: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self, keys: tuple[str, ...]) -> str:
        """A short stable hash of the named keys (cache and checkpoint identity)."""
        picked = {k: getattr(self, k) for k in keys}
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]



def _coerce(name: str, type_name: Any, value: Any) -> Any:
    """Check one value against its field type; ints are accepted for floats."""
    kind = type_name if isinstance(type_name, str) else getattr(type_name, "__name__", str(type_name))
    if kind == "Optional[str]":
        if value is None or isinstance(value, str):
            return value
        raise ConfigError(f"config key '{name}' must be a string or null, got {value!r}")
    if kind == "Optional[float]":
        if value is None:
            return value
        kind = "float"
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind == "str" and isinstance(value, str):
        return value
    raise ConfigError(f"config key '{name}' must be of type {kind}, got {value!r}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"config key '{name}' must be one of {', '.join(choices)}; got {value!r}")


def _check_range(name: str, value: float, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    """Raise ConfigError naming the key unless low <= value <= high (strict where *_open)."""
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high or value != value:  # value != value: NaN
        left = "(" if low_open else "["
        right = ")" if high_open or high is None else "]"
        span = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise ConfigError(f"config key '{name}' must be in {span}, got {value}")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ['lr=0.1', 'model=cnn'] into {'lr': 0.1, 'model': 'cnn'}; values are read as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def load_config(path: Optional[str], overrides: Optional[dict[str, Any]] = None) -> Config:
    """Read a YAML config file (or defaults when path is None) and apply overrides."""
    values: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        where = path
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values")
        values.update(loaded or {})
    known = {f.name for f in fields(Config)}
    for source, mapping in ((where, values), ("--set", overrides or {})):
        for key in mapping:
            if key not in known:
                raise ConfigError(f"unknown config key '{key}' (from {source}); known keys: {', '.join(sorted(known))}")
    values.update(overrides or {})
    if values.get("dataset") == "file":  # nodes come from the shard file's attributes
        from .data.userfile import file_values
        values = file_values(values)
    return Config(**values)


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

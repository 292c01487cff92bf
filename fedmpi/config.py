"""Run configuration: a frozen dataclass read from YAML plus `--set key=value` overrides.

Every check names the bad key, so a typo in a batch script fails at once with one line
instead of after an hour in the queue. Every numeric key has bounds (configkeys.BOUNDS): a value
that cannot work is refused here, before anything is allocated, alike on every rank. How values are
read from text, and what each key may hold: configkeys.py.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import string
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from .configfile import parse_config_text, read_config_file
from .configkeys import (
    BOUNDS,
    CHOICES,
    LOSSES,
    MAX_TEXT,
    MODELS,
    NULLS,
    SERVER_LR_DEFAULTS,
    SERVER_OPTS,
    check_choice,
    check_choice_or_path,
    check_range,
    coerce,
    show,
    synthetic_dims,
)
from .errors import ConfigError


@dataclass(frozen=True)
class Config:
    """Everything that defines a run; the resolved copy is saved as config.yaml in the run directory."""

    dataset: str = "mnist"
    synthetic_shape: str = "1x28x28"  # synthetic: one image's shape, "CxHxW" (or a YAML list [1, 8, 8])
    data_dir: Optional[str] = None
    data_file: str = "data/{dataset}-{partition}-{nodes}x{samples_per_node}-seed{seed}.h5"
    nodes: int = 100
    partition: str = "balanced"
    samples_per_node: int = 450
    test_per_node: int = 90
    model: str = "2nn"            # a built-in (2nn, cnn) or an import path package.module:callable
    model_args: dict = field(default_factory=dict)  # keyword arguments of an imported model builder
    loss: str = "cross_entropy"   # or an import path to fn(outputs, targets) -> per-sample losses [B]
    rounds: int = 11
    local_epochs: int = 10
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    local_state: str = "keep"     # keep: each node's momentum lives across rounds; reset: a fresh optimizer a round
    buffers: str = "average"      # BatchNorm's running statistics: averaged with the parameters, or kept per node
    aggregation: str = "mean"
    central_epochs: int = 10
    eval_every: int = 1
    node_metrics_every: int = 0   # rounds between nodes.csv rewrites; 0: at every evaluated round
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    checkpoint_every: int = 0     # rounds between checkpoints; 0: only on a stop signal
    max_dropped_fraction: float = 0.5  # stop with an error when more nodes than this diverge in a round
    engine: str = "batched"
    chunk_nodes: int = 0          # batched engine: nodes trained together; 0 = from the memory budget
    data_resident_bytes: int = 4 << 30  # a rank's training rows above this are read per round from the file
    autocast: str = "none"        # bf16: matmuls of local training in bfloat16 (weights, momentum stay float32)
    stall_timeout_s: float = 300.0  # end the job when a rank makes no progress this long; 0: no watchdog
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
    algorithm: str = "fedavg"       # scaffold: SCAFFOLD's control variates (Karimireddy et al. 2020, option II)
    personalize: str = "none"       # ditto: a personal model per node beside the global one (Li et al. 2021)
    ditto_lambda: float = 1.0       # ditto: the personal model's proximal pull lambda/2 ||v - w||^2 to the global model
    personal_layers: list = field(default_factory=list)  # FedPer: parameter name prefixes that stay on each node
    tensorboard: bool = False       # every round's scalars under RUN_DIR/tensorboard/ (the tensorboard extra)
    # Differential privacy and secure aggregation (fl/dp.py, fl/secure.py; README "Differential privacy").
    sampling: str = "fixed"         # fixed: m = C*N of N without replacement; poisson: each node with probability C
    dp: str = "none"                # gaussian: DP-FedAvg (clip, server noise, fixed denominator)
    dp_clip: float = 1.0            # L2 clip of each node's update (the start value with dp_clip_quantile)
    dp_noise_multiplier: Optional[float] = None  # z: noise stddev z * dp_clip on the summed update
    dp_target_epsilon: Optional[float] = None    # or: solve z for this epsilon after `rounds` rounds
    dp_delta: Optional[float] = None             # null: 1 / nodes^1.1
    dp_accountant: str = "rdp"
    dp_clip_quantile: Optional[float] = None     # adaptive clipping's target quantile; null: fixed clip
    dp_clip_lr: float = 0.2                      # eta_C of the geometric clip update
    dp_clip_count_stddev: Optional[float] = None  # sigma_b; null: expected nodes per round / 20
    dp_epsilon_every: int = 1       # rounds between epsilon computations (and the last round): PLD is slow
    secure_aggregation: bool = False  # pairwise-masked integer sum across ranks
    secagg_bits: int = 64           # the ring Z_2^bits of the masked sum: 64 or 32

    def __post_init__(self) -> None:
        if isinstance(self.synthetic_shape, (list, tuple)):  # YAML [1, 8, 8]: the same as "1x8x8"
            object.__setattr__(self, "synthetic_shape", "x".join(str(v).strip() for v in self.synthetic_shape))
        for f in fields(self):
            object.__setattr__(self, f.name, coerce(f.name, f.type, getattr(self, f.name)))
        for name, choices in CHOICES.items():
            check_choice(name, getattr(self, name), choices)
        for name, choices in (("model", MODELS), ("loss", LOSSES), ("server_opt", SERVER_OPTS)):
            check_choice_or_path(name, getattr(self, name), choices)
        if self.model_args and self.model in MODELS:
            raise ConfigError(f"config key 'model_args' applies to an imported model; the built-in "
                              f"{self.model!r} takes none")
        if self.server_lr is None:
            object.__setattr__(self, "server_lr", SERVER_LR_DEFAULTS.get(self.server_opt, 1.0))
        for name, (low, high, low_open, high_open) in BOUNDS.items():
            if getattr(self, name) is not None:
                check_range(name, getattr(self, name), low, high, low_open, high_open)
        self._check_data_file()
        self._check_algorithm()
        from .fl.dp import check_privacy_keys  # the privacy keys' combinations and defaults
        for name, value in check_privacy_keys(self).items():
            object.__setattr__(self, name, value)
        self._check_synthetic_shape()

    def _check_algorithm(self) -> None:
        """Combinations the algorithm cannot take."""
        if self.algorithm == "scaffold" and self.update_dtype != "fp32":
            raise ConfigError(f"config key 'algorithm': scaffold sends its control variates in fp32 only; "
                              f"set update_dtype: fp32 (got {self.update_dtype})")
        if self.algorithm == "scaffold" and self.local_state == "reset":
            raise ConfigError("config key 'algorithm': scaffold keeps per-node control variates across rounds; "
                              "it cannot run with local_state: reset")
        if self.algorithm != "fedavg" and (self.dp != "none" or self.secure_aggregation):
            # Their extra values (control deltas, step counts) would need their own clip, noise and ring.
            raise ConfigError(f"config key 'algorithm': {self.algorithm} runs without dp and secure_aggregation")
        self._check_personalize()
        if self.algorithm == "fednova":
            # Its normalization counts plain SGD steps: a momentum buffer kept across rounds, a proximal
            # term or a pre-divided half-precision update would each need another rule.
            for key, bad in (("momentum", self.momentum != 0), ("prox_mu", self.prox_mu != 0),
                             ("update_dtype", self.update_dtype != "fp32")):
                if bad:
                    raise ConfigError(f"config key 'algorithm': fednova takes plain local SGD with fp32 updates; "
                                      f"'{key}' is {getattr(self, key)!r}")

    def _check_personalize(self) -> None:
        """Ditto keeps each node's personal model across rounds, beside plain FedAvg-style local training;
        personal layers keep part of each node's model out of the average."""
        if self.personal_layers:
            self._check_personal_layers()
        if self.personalize != "ditto":
            return
        if self.algorithm != "fedavg":
            raise ConfigError(f"config key 'personalize': ditto runs with algorithm fedavg, got {self.algorithm!r}")
        if self.personal_layers:
            raise ConfigError("config key 'personal_layers': choose one personalization, ditto or personal layers")
        if self.local_state == "reset":
            raise ConfigError("config key 'personalize': ditto keeps each node's personal model across rounds; "
                              "it cannot run with local_state: reset")

    def _check_personal_layers(self) -> None:
        """What personal layers combine with: plain fp32 FedAvg-style updates of the shared layers only."""
        for key, bad in (("algorithm", self.algorithm != "fedavg"), ("local_state", self.local_state == "reset"),
                         ("dp", self.dp != "none"), ("secure_aggregation", self.secure_aggregation),
                         ("update_dtype", self.update_dtype != "fp32"), ("prox_mu", self.prox_mu != 0)):
            if bad:
                raise ConfigError(f"config key 'personal_layers' runs with fedavg, local_state keep, fp32 updates, "
                                  f"no dp, secure aggregation or prox_mu; '{key}' is {getattr(self, key)!r}")

    def _check_synthetic_shape(self) -> None:
        dims = synthetic_dims(self.synthetic_shape)
        if self.dataset != "synthetic" and dims != (1, 28, 28):
            raise ConfigError(f"config key 'synthetic_shape' applies to dataset synthetic only; dataset is "
                              f"{self.dataset!r}")
        object.__setattr__(self, "synthetic_shape", "x".join(map(str, dims)))

    def _check_data_file(self) -> None:
        """Placeholders are plain config keys, and the filled-in name is a usable path."""
        name = fill_placeholders(self.data_file, self.to_dict())
        if not name:
            raise ConfigError("config key 'data_file' must not be empty")
        if len(os.fsencode(name)) > MAX_TEXT:
            raise ConfigError(f"config key 'data_file' gives a path of {len(name):,} characters, more than {MAX_TEXT}")
        long = next((part for part in Path(name).parts if len(os.fsencode(part)) > 255), None)
        if long is not None:
            raise ConfigError(f"config key 'data_file': the name {show(long)} is longer than 255 bytes")

    @property
    def data_path(self) -> Path:
        """The HDF5 file, with `{key}` placeholders in data_file filled from this config."""
        return Path(fill_placeholders(self.data_file, self.to_dict()))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self, keys: tuple[str, ...]) -> str:
        """A short stable hash of the named keys (cache and checkpoint identity)."""
        picked = {k: getattr(self, k) for k in keys}
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]



def node_state_names(cfg: Any) -> tuple[str, ...]:
    """The per-node tensors a run keeps across rounds (what its checkpoints carry): momentum with
    local_state keep and momentum > 0 (at momentum 0 a buffer never reaches the next round's math, so
    keeping one would only cost memory); SCAFFOLD's control variates under algorithm: scaffold; Ditto's
    personal models under personalize: ditto; each node's own values of its personal layers; each node's
    float buffers (BatchNorm's running statistics) under buffers: local."""
    keep = getattr(cfg, "local_state", "keep") == "keep" and getattr(cfg, "momentum", 0.0) > 0
    scaffold = getattr(cfg, "algorithm", "fedavg") == "scaffold"  # SCAFFOLD's c_i
    ditto = getattr(cfg, "personalize", "none") == "ditto"  # Ditto's personal models v_k
    layers = bool(getattr(cfg, "personal_layers", []))  # FedPer: each node's own values of those layers
    local = getattr(cfg, "buffers", "average") == "local"  # each node's own float buffers (FedBN)
    return ("momentum",) * keep + ("control",) * scaffold + ("personal",) * ditto + ("layers",) * layers \
        + ("buffers",) * local


def placeholders(template: str) -> list[str]:
    """The config keys named by `template`'s `{key}` placeholders; anything else in braces is refused.

    Only a plain key: str.format would also run attribute and index lookups ({seed.real},
    {seed[0]}), conversions ({seed!r}) and format specs ({seed:>100000000000} builds a 100 GB string).
    """
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as err:  # a lone { or }
        raise ConfigError(f"config key 'data_file' {show(template)}: {err} (write {{{{ or }}}} for a literal "
                          f"brace)") from None
    keys = []
    for _, key, spec, conversion in parts:
        if key is None:
            continue
        if key in PLACEHOLDER_KEYS and not spec and conversion is None:
            keys.append(key)
            continue
        shown = "{" + key + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        raise ConfigError(f"config key 'data_file' has the placeholder {show(shown)}: only a plain config key "
                          f"in braces is allowed, such as {{seed}} or {{nodes}}")
    return keys


def fill_placeholders(template: str, values: dict[str, Any]) -> str:
    """`template` with each `{key}` replaced by str(values[key]) (checked by `placeholders`)."""
    placeholders(template)
    return "".join(literal + ("" if key is None else str(values[key]))
                   for literal, key, _, _ in string.Formatter().parse(template))




FIELD_TYPES = {f.name: f.type for f in fields(Config)}
PLACEHOLDER_KEYS = frozenset(FIELD_TYPES) - {"data_file", "model_args", "personal_layers"}


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ['lr=1e-3', 'model=cnn'] into {'lr': 0.001, 'model': 'cnn'}: each value read by its key's type."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {show(item)}")
        if len(raw) > MAX_TEXT:
            raise ConfigError(f"--set {show(key)}: the value has {len(raw):,} characters, at most {MAX_TEXT}")
        kind = FIELD_TYPES.get(key)
        if kind is None:
            out[key] = raw  # refused by load_config, which names where it came from
        elif str(kind).startswith("Optional[") and raw.strip() in NULLS:
            out[key] = None
        else:
            out[key] = coerce(key, kind, raw)
    return out


def load_config(path: Optional[str], overrides: Optional[dict[str, Any]] = None) -> Config:
    """Read a YAML config file (or defaults when path is None) and apply overrides."""
    values: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        where = f"config file {path}"
        loaded = parse_config_text(read_config_file(path), where)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values")
        values.update(loaded or {})
    for source, mapping in ((where, values), ("--set", overrides or {})):
        for key in mapping:
            if key not in FIELD_TYPES:
                raise ConfigError(f"unknown config key {show(str(key))} (from {source}); known keys: "
                                  f"{', '.join(sorted(FIELD_TYPES))}")
    values.update(overrides or {})
    if values.get("dataset") == "file":  # nodes come from the shard file's attributes
        from .data.userfile import file_values
        values = file_values(values)
    return Config(**values)


def config_text(cfg: Config) -> str:
    """config.yaml of a run directory: the resolved config (written atomically by output/runfiles.py)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)

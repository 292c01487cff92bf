"""Run configuration: a frozen dataclass read from YAML plus `--set key=value` overrides.

Every check names the bad key, so a typo in a batch script fails at once with one line
instead of after an hour in the queue. Every numeric key has bounds (BOUNDS): a value that
cannot work is refused here, before anything is allocated, alike on every rank.

Values are read by each key's type, the same from a file and from `--set` (configfile.py keeps
plain YAML scalars as text): an int key takes a whole decimal number, also written `1e6` or
`2.5e3`; a float key takes `0.01`, `1e-3` or `1E-3`; `nan` and `inf` read as floats and are then
refused by the bounds; `true`/`false` are not numbers; null only where the default is null.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import string
from dataclasses import dataclass, field, fields
from decimal import Decimal
from pathlib import Path
from typing import Any, Optional

import yaml

from .configfile import parse_config_text, read_config_file
from .errors import ConfigError
from .plugins import is_import_path, keyword_args

DATASETS = ("mnist", "fashion-mnist", "cifar10", "synthetic", "file")
PARTITIONS = ("balanced", "iid", "shards", "dirichlet", "quantity")
MODELS = ("2nn", "cnn")
AGGREGATIONS = ("mean", "weighted")
DEVICES = ("auto", "cpu", "cuda")
ENGINES = ("batched", "sequential")
AUTOCASTS = ("none", "bf16")
SERVER_OPTS = ("none", "fedavgm", "fedadam", "fedyogi")
UPDATE_DTYPES = ("fp32", "fp16", "bf16")
LOSSES = ("cross_entropy",)
ALGORITHMS = ("fedavg", "scaffold", "fednova")
PERSONALIZE = ("none", "ditto")
LOCAL_STATES = ("keep", "reset")
BUFFER_MODES = ("average", "local")
DP_MODES = ("none", "gaussian")
SAMPLINGS = ("fixed", "poisson")
DP_ACCOUNTANTS = ("rdp", "pld")
CHOICES = {"dataset": DATASETS, "partition": PARTITIONS, "aggregation": AGGREGATIONS,
           "device": DEVICES, "engine": ENGINES, "autocast": AUTOCASTS,
           "update_dtype": UPDATE_DTYPES, "algorithm": ALGORITHMS, "local_state": LOCAL_STATES,
           "personalize": PERSONALIZE, "buffers": BUFFER_MODES,
           "dp": DP_MODES, "sampling": SAMPLINGS, "dp_accountant": DP_ACCOUNTANTS}
# server_lr when the config leaves it null: FedAvg and FedAvgM step by the whole averaged update;
# the adaptive ones step about server_lr per coordinate, so 1.0 would wreck the model
# (Reddi et al. 2021 tune it near 10^-2 for Adam and Yogi on their image tasks).
SERVER_LR_DEFAULTS = {"none": 1.0, "fedavgm": 1.0, "fedadam": 0.01, "fedyogi": 0.01}

# key: (low, high, low_open, high_open). The README's Configuration table gives the reasons.
BOUNDS: dict[str, tuple] = {
    "nodes": (1, 10**7, False, False),            # 10^7: large cross-device federations
    "samples_per_node": (1, 10**7, False, False),
    "test_per_node": (0, 10**7, False, False),
    "rounds": (1, 10**7, False, False),
    "local_epochs": (1, 10**4, False, False),
    "batch_size": (1, 2**20, False, False),       # the batched engine pads every batch to this many rows
    "central_epochs": (0, 10**4, False, False),
    "eval_every": (1, 10**7, False, False),
    "seed": (0, 2**63 - 1, False, False),         # numpy SeedSequence, torch.manual_seed and an int64 HDF5 attribute
    "threads": (0, 1024, False, False),           # and at most THREADS_PER_CORE x the host's cores (runtime/device.py)
    "checkpoint_every": (0, 10**7, False, False),
    "stall_timeout_s": (0, 86400, False, False),
    "chunk_nodes": (0, 10**7, False, False),
    "node_metrics_every": (0, 10**7, False, False),
    "data_resident_bytes": (0, 2**60, False, False),  # 0: every round reads its nodes; 2^60: an exabyte
    "shards_per_node": (1, 1000, False, False),
    "lr": (0.0, 100.0, True, False),
    "momentum": (0.0, 1.0, False, True),
    "max_dropped_fraction": (0.0, 1.0, False, False),
    "alpha": (1e-4, 1e4, False, False),           # Dir(alpha): 1e-4 gives one label a node, 1e4 is IID
    "quantity_sigma": (0.0, 10.0, False, False),  # lognormal sizes: at 10 one node holds nearly all samples
    "fraction": (0.0, 1.0, True, False),
    "server_lr": (0.0, 100.0, True, False),
    "server_momentum": (0.0, 1.0, False, True),
    "server_beta1": (0.0, 1.0, False, True),
    "server_beta2": (0.0, 1.0, False, True),
    "server_tau": (1e-12, 10.0, False, False),    # tau^2 must stay a normal float32
    "prox_mu": (0.0, 1000.0, False, False),
    "ditto_lambda": (0.0, 1e6, False, False),
    # Privacy (fl/dp.py); an Optional key left null skips its bounds.
    "dp_clip": (1e-6, 1e6, False, False),          # the fixed-point ring needs 2^f * clip >= 1
    "dp_noise_multiplier": (0.0, 1000.0, False, False),  # the accountant's solver range ends at 1000
    "dp_target_epsilon": (0.0, 1e6, True, False),
    "dp_delta": (0.0, 1.0, True, True),
    "dp_clip_quantile": (0.0, 1.0, False, False),
    "dp_clip_lr": (0.0, 10.0, False, False),       # exp(-10) per round already collapses any clip
    "dp_clip_count_stddev": (0.0, 1e7, True, False),  # the released count must be noised
    "dp_epsilon_every": (1, 10**7, False, False),
    "secagg_bits": (32, 64, False, False),         # and one of 32, 64 (fl/ring.py)
}
MAX_TEXT = 4096  # characters of a string value (PATH_MAX), and of a --set value
DIGITS = r"\d+(?:_\d+)*"
NUMBER = re.compile(rf"[+-]?(?:{DIGITS}(?:\.(?:{DIGITS})?)?|\.{DIGITS})(?:[eE][+-]?\d+)?")
NOT_FINITE = re.compile(r"[+-]?\.?(?:inf|infinity|nan)", re.IGNORECASE)
NULLS = ("", "null", "Null", "NULL", "~")  # how --set writes null (a file's YAML reads these as null too)


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
            _check_choice(name, getattr(self, name), choices)
        for name, choices in (("model", MODELS), ("loss", LOSSES), ("server_opt", SERVER_OPTS)):
            _check_choice_or_path(name, getattr(self, name), choices)
        if self.model_args and self.model in MODELS:
            raise ConfigError(f"config key 'model_args' applies to an imported model; the built-in "
                              f"{self.model!r} takes none")
        if self.server_lr is None:
            object.__setattr__(self, "server_lr", SERVER_LR_DEFAULTS.get(self.server_opt, 1.0))
        for name, (low, high, low_open, high_open) in BOUNDS.items():
            if getattr(self, name) is not None:
                _check_range(name, getattr(self, name), low, high, low_open, high_open)
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
            raise ConfigError(f"config key 'data_file': the name {_show(long)} is longer than 255 bytes")

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


MAX_SYNTHETIC_VALUES = 1 << 24  # values of one synthetic image, as a shard file allows (4096 x 4096)


def synthetic_dims(text: str) -> tuple[int, ...]:
    """ "1x8x8" or "[1, 8, 8]" -> (1, 8, 8): one to three whole numbers >= 1, at most MAX_SYNTHETIC_VALUES
    values in all."""
    text = str(text).strip()
    inner = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    parts = [p.strip() for p in re.split(r"[x,]", inner.lower())]
    if not 1 <= len(parts) <= 3 or not all(p.isdigit() and len(p) <= 9 for p in parts):
        raise ConfigError(f"config key 'synthetic_shape' must be 1 to 3 whole numbers such as 1x8x8 or [1, 8, 8], "
                          f"got {_show(text)}")
    dims = tuple(int(p) for p in parts)
    if min(dims) < 1 or math.prod(dims) > MAX_SYNTHETIC_VALUES:
        raise ConfigError(f"config key 'synthetic_shape' must have dimensions >= 1 and at most "
                          f"{MAX_SYNTHETIC_VALUES:,} values, got {_show(text)}")
    return dims


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
        raise ConfigError(f"config key 'data_file' {_show(template)}: {err} (write {{{{ or }}}} for a literal "
                          f"brace)") from None
    keys = []
    for _, key, spec, conversion in parts:
        if key is None:
            continue
        if key in PLACEHOLDER_KEYS and not spec and conversion is None:
            keys.append(key)
            continue
        shown = "{" + key + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        raise ConfigError(f"config key 'data_file' has the placeholder {_show(shown)}: only a plain config key "
                          f"in braces is allowed, such as {{seed}} or {{nodes}}")
    return keys


def fill_placeholders(template: str, values: dict[str, Any]) -> str:
    """`template` with each `{key}` replaced by str(values[key]) (checked by `placeholders`)."""
    placeholders(template)
    return "".join(literal + ("" if key is None else str(values[key]))
                   for literal, key, _, _ in string.Formatter().parse(template))


def coerce(name: str, type_name: Any, value: Any) -> Any:
    """`value` as key `name`'s type (int, float, str, Optional[...]), read from text where need be."""
    kind = type_name if isinstance(type_name, str) else getattr(type_name, "__name__", str(type_name))
    if kind.startswith("Optional["):
        if value is None:
            return None
        kind = kind[len("Optional["):-1]
    if kind == "int":
        return _int_value(name, value)
    if kind == "float":
        return _float_value(name, value)
    if kind == "bool":
        return _bool_value(name, value)
    if kind == "dict":
        return keyword_args(name, value)
    if kind == "list":
        return _names_value(name, value)
    if isinstance(value, str):
        if "\x00" in value:
            raise ConfigError(f"config key '{name}' must be text without NUL bytes, got {_show(value)}")
        if len(value) > MAX_TEXT:
            raise ConfigError(f"config key '{name}' must be at most {MAX_TEXT} characters, got {len(value):,}")
        return value
    null = " or null" if type_name != "str" else ""
    raise ConfigError(f"config key '{name}' must be a string{null}, got {_show(value)}")


MAX_NAMES = 64  # entries of a list of names (personal_layers)


def _names_value(name: str, value: Any) -> list:
    """A list of names: a YAML list of strings, or text "a, b" / "[a, b]" (from --set); each 1..255 characters."""
    if value is None:
        return []
    if isinstance(value, str):
        inner = value.strip()
        inner = inner[1:-1] if inner.startswith("[") and inner.endswith("]") else inner
        value = [part.strip() for part in inner.split(",")] if inner.strip() else []
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"config key '{name}' must be a list of names, got {_show(value)}")
    if len(value) > MAX_NAMES:
        raise ConfigError(f"config key '{name}' has {len(value)} entries, at most {MAX_NAMES}")
    for item in value:
        if not isinstance(item, str) or not 1 <= len(item) <= 255 or "\x00" in item or item != item.strip():
            raise ConfigError(f"config key '{name}' must hold names of 1 to 255 characters, got {_show(item)}")
    return list(value)


def _int_value(name: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        return int(value)
    if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
        number = Decimal(value.strip().replace("_", ""))
        if number.is_zero():
            return 0
        if number.adjusted() > 30:  # beyond every int key's bound: refuse before building a huge int
            low, high = BOUNDS.get(name, (None, None))[:2]
            raise ConfigError(f"config key '{name}' must be in {_span(low, high, False, False)}, "
                              f"got {_show(value.strip())}")
        if number.adjusted() >= 0 and number == number.to_integral_value():  # adjusted() < 0: 0 < |number| < 1
            return int(number)
    raise ConfigError(f"config key '{name}' must be a whole number, got {_show(value)}")


def _float_value(name: str, value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an int beyond 1e308
            return math.inf if value > 0 else -math.inf
    if isinstance(value, str):
        text = value.strip()
        if NUMBER.fullmatch(text):
            return float(text.replace("_", ""))
        if NOT_FINITE.fullmatch(text):  # read, then refused by the bounds with the key named
            return float(text.replace(".", ""))
    raise ConfigError(f"config key '{name}' must be a number, got {_show(value)}")


def _bool_value(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ConfigError(f"config key '{name}' must be true or false, got {_show(value)}")


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _check_choice_or_path(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices and not is_import_path(value):
        raise ConfigError(f"config key '{name}' must be {', '.join(choices)} or an import path "
                          f"package.module:callable; got {_show(value)}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"config key '{name}' must be one of {', '.join(choices)}; got {_show(value)}")


def _span(low: Any, high: Any, low_open: bool, high_open: bool) -> str:
    left, right = "(" if low_open else "[", ")" if high_open or high is None else "]"
    return f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"


def _check_range(name: str, value: float, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    """Raise ConfigError naming the key unless low <= value <= high (strict where *_open); NaN never passes."""
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high or value != value:  # value != value: NaN
        raise ConfigError(f"config key '{name}' must be in {_span(low, high, low_open, high_open)}, "
                          f"got {_show(value)}")


FIELD_TYPES = {f.name: f.type for f in fields(Config)}
PLACEHOLDER_KEYS = frozenset(FIELD_TYPES) - {"data_file", "model_args", "personal_layers"}


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ['lr=1e-3', 'model=cnn'] into {'lr': 0.001, 'model': 'cnn'}: each value read by its key's type."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {_show(item)}")
        if len(raw) > MAX_TEXT:
            raise ConfigError(f"--set {_show(key)}: the value has {len(raw):,} characters, at most {MAX_TEXT}")
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
                raise ConfigError(f"unknown config key {_show(str(key))} (from {source}); known keys: "
                                  f"{', '.join(sorted(FIELD_TYPES))}")
    values.update(overrides or {})
    if values.get("dataset") == "file":  # nodes come from the shard file's attributes
        from .data.userfile import file_values
        values = file_values(values)
    return Config(**values)


def config_text(cfg: Config) -> str:
    """config.yaml of a run directory: the resolved config (written atomically by run.py)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)

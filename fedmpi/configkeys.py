"""What each config key may hold: the choices, the numeric bounds, and readers that turn a value from a
file or from `--set` into the key's type (each refusal names the key).

Values are read by each key's type, the same from a file and from `--set` (configfile.py keeps plain YAML
scalars as text): an int key takes a whole decimal number, also written `1e6` or `2.5e3`; a float key takes
`0.01`, `1e-3` or `1E-3`; `nan` and `inf` read as floats and are then refused by the bounds; `true`/`false`
are not numbers; null only where the default is null.
"""
from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import Any, Optional

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


MAX_SYNTHETIC_VALUES = 1 << 24  # values of one synthetic image, as a shard file allows (4096 x 4096)


def synthetic_dims(text: str) -> tuple[int, ...]:
    """ "1x8x8" or "[1, 8, 8]" -> (1, 8, 8): one to three whole numbers >= 1, at most MAX_SYNTHETIC_VALUES
    values in all."""
    text = str(text).strip()
    inner = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    parts = [p.strip() for p in re.split(r"[x,]", inner.lower())]
    if not 1 <= len(parts) <= 3 or not all(p.isdigit() and len(p) <= 9 for p in parts):
        raise ConfigError(f"config key 'synthetic_shape' must be 1 to 3 whole numbers such as 1x8x8 or [1, 8, 8], "
                          f"got {show(text)}")
    dims = tuple(int(p) for p in parts)
    if min(dims) < 1 or math.prod(dims) > MAX_SYNTHETIC_VALUES:
        raise ConfigError(f"config key 'synthetic_shape' must have dimensions >= 1 and at most "
                          f"{MAX_SYNTHETIC_VALUES:,} values, got {show(text)}")
    return dims



def coerce(name: str, type_name: Any, value: Any) -> Any:
    """`value` as key `name`'s type (int, float, str, Optional[...]), read from text where need be."""
    kind = type_name if isinstance(type_name, str) else getattr(type_name, "__name__", str(type_name))
    if kind.startswith("Optional["):
        if value is None:
            return None
        kind = kind[len("Optional["):-1]
    if kind == "int":
        return int_value(name, value)
    if kind == "float":
        return float_value(name, value)
    if kind == "bool":
        return bool_value(name, value)
    if kind == "dict":
        return keyword_args(name, value)
    if kind == "list":
        return names_value(name, value)
    if isinstance(value, str):
        if "\x00" in value:
            raise ConfigError(f"config key '{name}' must be text without NUL bytes, got {show(value)}")
        if len(value) > MAX_TEXT:
            raise ConfigError(f"config key '{name}' must be at most {MAX_TEXT} characters, got {len(value):,}")
        return value
    null = " or null" if type_name != "str" else ""
    raise ConfigError(f"config key '{name}' must be a string{null}, got {show(value)}")


MAX_NAMES = 64  # entries of a list of names (personal_layers)


def names_value(name: str, value: Any) -> list:
    """A list of names: a YAML list of strings, or text "a, b" / "[a, b]" (from --set); each 1..255 characters."""
    if value is None:
        return []
    if isinstance(value, str):
        inner = value.strip()
        inner = inner[1:-1] if inner.startswith("[") and inner.endswith("]") else inner
        value = [part.strip() for part in inner.split(",")] if inner.strip() else []
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"config key '{name}' must be a list of names, got {show(value)}")
    if len(value) > MAX_NAMES:
        raise ConfigError(f"config key '{name}' has {len(value)} entries, at most {MAX_NAMES}")
    for item in value:
        if not isinstance(item, str) or not 1 <= len(item) <= 255 or "\x00" in item or item != item.strip():
            raise ConfigError(f"config key '{name}' must hold names of 1 to 255 characters, got {show(item)}")
    return list(value)


def int_value(name: str, value: Any) -> int:
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
            raise ConfigError(f"config key '{name}' must be in {span(low, high, False, False)}, "
                              f"got {show(value.strip())}")
        if number.adjusted() >= 0 and number == number.to_integral_value():  # adjusted() < 0: 0 < |number| < 1
            return int(number)
    raise ConfigError(f"config key '{name}' must be a whole number, got {show(value)}")


def float_value(name: str, value: Any) -> float:
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
    raise ConfigError(f"config key '{name}' must be a number, got {show(value)}")


def bool_value(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ConfigError(f"config key '{name}' must be true or false, got {show(value)}")


def show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_choice_or_path(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices and not is_import_path(value):
        raise ConfigError(f"config key '{name}' must be {', '.join(choices)} or an import path "
                          f"package.module:callable; got {show(value)}")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"config key '{name}' must be one of {', '.join(choices)}; got {show(value)}")


def span(low: Any, high: Any, low_open: bool, high_open: bool) -> str:
    left, right = "(" if low_open else "[", ")" if high_open or high is None else "]"
    return f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"


def check_range(name: str, value: float, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    """Raise ConfigError naming the key unless low <= value <= high (strict where *_open); NaN never passes."""
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high or value != value:  # value != value: NaN
        raise ConfigError(f"config key '{name}' must be in {span(low, high, low_open, high_open)}, "
                          f"got {show(value)}")

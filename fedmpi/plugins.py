"""User code named by the config: `package.module:attribute` import paths for model, loss and server_opt.

An import path runs code the user chose on purpose, like a Python script they start; it comes from
the config file, `--set` or the Python API, never from a data file or a checkpoint. Every failure
(no such module, no such attribute, not callable, the module raising on import) is one ConfigError
naming the config key and the path. Objects handed to the Python API directly are registered under
their `module:qualname`, which is what config.yaml records.
"""
from __future__ import annotations

import importlib
import re
import sys
from typing import Any

from .errors import ConfigError

MAX_ARGS = 32      # keyword arguments in model_args
MAX_ITEMS = 64     # items of a list value
MAX_VALUE = 256    # characters of a text value
RESERVED = ("input_shape", "classes")  # passed by fedmpi from the shard file
NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")

IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
MAX_PATH = 256
_given: dict[tuple[str, str], Any] = {}  # (key, path) -> an object handed to fedmpi.run directly


def is_import_path(text: Any) -> bool:
    """Whether `text` has the form package.module:callable (checked before anything is imported)."""
    return isinstance(text, str) and len(text) <= MAX_PATH and IMPORT_PATH.fullmatch(text) is not None


def give(key: str, obj: Any) -> str:
    """Register `obj` (a model builder, loss or server optimizer class) for `key`; returns its path."""
    if not callable(obj):
        raise ConfigError(f"{key}=: expected a function or class, got {type(obj).__name__}")
    path = f"{getattr(obj, '__module__', None)}:{getattr(obj, '__qualname__', None)}"
    if not is_import_path(path):
        raise ConfigError(f"{key}=: {path!r} has no module-level name (a lambda or a nested function): "
                          f"define it at the top level of a module or script, so config.yaml can name it")
    _given[(key, path)] = obj
    return path


def forget() -> None:
    """Drop the objects registered by `give` (the end of a fedmpi.run)."""
    _given.clear()


def load(key: str, path: str) -> Any:
    """The callable that `path` names for config key `key`; one ConfigError naming both when it cannot be had."""
    if (key, path) in _given:
        return _given[(key, path)]
    where = f"config key '{key}' {path!r}"
    if not is_import_path(path):
        raise ConfigError(f"{where} is not an import path of the form package.module:callable")
    module_name, _, attribute = path.partition(":")
    obj = _import(where, module_name)
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{where}: {module_name} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{where}: {attribute} is a {type(obj).__name__}, not a function or class")
    return obj


def _import(where: str, module_name: str) -> Any:
    """The module, importable from the current directory as a script's own modules are."""
    if "" not in sys.path and "." not in sys.path:
        sys.path.append("")  # `fedmpi` is an installed command: the working directory is not on its path
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ConfigError(f"{where}: no module named {err.name!r} (is it on PYTHONPATH or in the working "
                          f"directory?)") from None
    except (Exception, SystemExit) as err:  # noqa: BLE001 - user code: whatever it raises is one line
        raise ConfigError(f"{where}: importing {module_name} raised {describe(err)}") from None


def describe(err: BaseException) -> str:
    """`TypeError: message`, its first line, bounded (a user's exception may carry a long text)."""
    lines = str(err).splitlines()
    text = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def keyword_args(key: str, value: Any) -> dict:
    """model_args as a dict of plain values: at most MAX_ARGS names, each a scalar or a short list of them.

    Text from a config file or `--set` (a YAML mapping there, e.g. --set model_args='{width: 64}')
    reads numbers as numbers and true/false as booleans; anything else stays text.
    """
    if value is None:
        return {}
    if isinstance(value, str):
        from .configfile import parse_config_text

        value = parse_config_text(value, f"config key '{key}'") if value.strip() else {}
        value = {} if value is None else value
    if not isinstance(value, dict):
        raise ConfigError(f"config key '{key}' must be a mapping of names to values, got {type(value).__name__}")
    if len(value) > MAX_ARGS:
        raise ConfigError(f"config key '{key}' has {len(value)} entries, at most {MAX_ARGS}")
    out = {}
    for name, item in value.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"config key '{key}': {str(name)[:60]!r} is not a keyword argument name")
        if name in RESERVED:
            raise ConfigError(f"config key '{key}': {name!r} is passed by fedmpi from the data; drop it")
        where = f"config key '{key}' entry {name!r}"
        if isinstance(item, (list, tuple)):
            if len(item) > MAX_ITEMS:
                raise ConfigError(f"{where} is a list of {len(item)} items, at most {MAX_ITEMS}")
            out[name] = [_scalar(where, v) for v in item]
        else:
            out[name] = _scalar(where, item)
    return out


def _scalar(where: str, value: Any) -> Any:
    """None, a bool, an int, a finite float or a short text; text of a number or true/false read as such."""
    if isinstance(value, str):
        text = value.strip()
        if len(value) > MAX_VALUE or "\x00" in value:
            raise ConfigError(f"{where} must be a text of at most {MAX_VALUE} characters without NUL bytes")
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        if NUMBER.fullmatch(text) and len(text) <= 40:
            return int(text) if text.lstrip("+-").isdigit() else _finite(where, float(text))
        return value
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if abs(value) > 2**63:
            raise ConfigError(f"{where} is too large: {str(value)[:40]}...")
        return value
    if isinstance(value, float):
        return _finite(where, value)
    raise ConfigError(f"{where} must be a number, true/false, a text or a list of them, got {type(value).__name__}")


def _finite(where: str, value: float) -> float:
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"{where} must be finite, got {value}")
    return value

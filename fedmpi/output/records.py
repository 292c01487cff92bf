"""Reading a run directory for `fedmpi report`: metrics.jsonl, run.json, config.yaml and the shard file.

A run directory may come from anywhere (copied off a cluster, edited by hand), so every file is
checked before it is opened (a FIFO or a device is refused: it would block the read), read in
bounded size, and every field the report uses is checked for its type. Any problem is one
DataError line naming the file and, where there is one, the line or key.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from ..data.files import clip, quote, read_text
from ..errors import DataError

MAX_METRICS_BYTES = 256 << 20  # about 200,000 rounds of rows
MAX_SMALL_BYTES = 1 << 20      # run.json, config.yaml: a few kB when fedmpi writes them
NUMBER_KEYS = ("t_train_mean", "t_wait", "t_allreduce", "t_round", "wire_bytes_est", "ranks", "payload_bytes",
               "test_acc", "central_acc")
# {key} fills in a config value, {{ and }} are literal braces; anything else with a brace is refused.
PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_]\w*)\}|[{}]")


@dataclass
class Run:
    """One run directory's records."""

    path: Path
    rows: list[dict[str, Any]]
    info: dict[str, Any]
    config: dict[str, Any]

    @property
    def ranks(self) -> Optional[int]:
        return self.info.get("world_size") or (self.rows[0].get("ranks") if self.rows else None)

    @property
    def label(self) -> str:
        return f"{self.path.name} (-n {self.ranks})" if self.ranks else self.path.name


def load_run(path: Path) -> Run:
    """Read a run directory; a missing, unreadable or malformed file is one clear error."""
    metrics = path / "metrics.jsonl"
    if not os.path.lexists(metrics):
        raise DataError(f"report: {metrics} not found ({path} is not a fedmpi run directory?)")
    rows = [check_row(metrics, n, row) for n, row in jsonl_rows(metrics)]
    if not rows:
        raise DataError(f"report: {metrics} has no rounds yet")
    return Run(path, rows, load_info(path / "run.json"), load_config(path / "config.yaml"))


def jsonl_rows(metrics: Path) -> list[tuple[int, Any]]:
    """(line number, parsed value) of every non-empty line."""
    out = []
    for n, line in enumerate(read_text(metrics, "report:", MAX_METRICS_BYTES).splitlines(), 1):
        if line.strip():
            try:
                out.append((n, json.loads(line)))
            except (ValueError, RecursionError):  # ValueError: bad JSON, or an integer of 5000 digits
                raise DataError(f"report: {metrics} line {n} is not JSON") from None
    return out


def check_row(metrics: Path, n: int, row: Any) -> dict[str, Any]:
    """A metrics row: a JSON object whose round is an integer and whose numbers are numbers."""
    where = f"report: {metrics} line {n}"
    if not isinstance(row, dict):
        raise DataError(f"{where} is not a JSON object (got {type(row).__name__} {quote(row)})")
    if not is_int(row.get("round")) or row["round"] < 0:
        raise DataError(f"{where}: 'round' must be a non-negative integer, got {quote(row.get('round'))}")
    for key in NUMBER_KEYS:
        if row.get(key) is not None and not is_number(row[key]):
            raise DataError(f"{where}: '{key}' must be a finite number or null, got {quote(row[key])}")
    if not isinstance(row.get("update_dtype", ""), str):
        raise DataError(f"{where}: 'update_dtype' must be a string, got {quote(row['update_dtype'])}")
    return row


def load_info(path: Path) -> dict[str, Any]:
    """run.json (optional): world_size, mpi_library and hosts, type-checked."""
    if not os.path.lexists(path):
        return {}
    try:
        info = json.loads(read_text(path, "report:", MAX_SMALL_BYTES))
    except (ValueError, RecursionError):
        raise DataError(f"report: {path} is not JSON (truncated?)") from None
    if not isinstance(info, dict):
        raise DataError(f"report: {path} must hold a JSON object, got {type(info).__name__}")
    checks = {"world_size": lambda v: is_int(v) and v >= 1, "mpi_library": lambda v: isinstance(v, str),
              "hosts": lambda v: isinstance(v, list) and all(isinstance(h, str) for h in v)}
    for key, ok in checks.items():
        if key in info and not ok(info[key]):
            raise DataError(f"report: {path}: '{key}' has the wrong type or value: {quote(info[key])}")
    return info


class _NoAliasLoader(yaml.SafeLoader):
    """safe_load without anchors and aliases: a few lines of aliases can stand for a billion nodes."""

    def compose_node(self, parent, index):  # noqa: ANN001, ANN201 - PyYAML's signature
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError("aliases (*name) are not allowed here")
        return super().compose_node(parent, index)


def load_config(path: Path) -> dict[str, Any]:
    """config.yaml (optional): a YAML mapping, read without aliases and in bounded size."""
    if not os.path.lexists(path):
        return {}
    try:
        config = yaml.load(read_text(path, "report:", MAX_SMALL_BYTES), Loader=_NoAliasLoader)
    except (yaml.YAMLError, RecursionError, ValueError) as err:
        problem = clip(str(err).splitlines()[0] if str(err) else type(err).__name__)
        raise DataError(f"report: {path} is not valid YAML ({problem})") from None
    if config is None:
        return {}
    if not isinstance(config, dict) or not all(isinstance(k, str) for k in config):
        raise DataError(f"report: {path} must hold a mapping of config keys, got {quote(config)}")
    return config


def shard_path(run: Run) -> Optional[Path]:
    """The run's shard file, its data_file's {key} placeholders filled from the config; None when unnamed."""
    template = run.config.get("data_file")
    if template is None:
        return None
    where = f"report: {run.path / 'config.yaml'}: data_file {quote(template)}"
    if not isinstance(template, str):
        raise DataError(f"{where} must be a string")
    out, pos = [], 0
    for m in PLACEHOLDER.finditer(template):
        out.append(template[pos:m.start()])
        pos, token, key = m.end(), m.group(0), m.group(1)
        if token in ("{{", "}}"):
            out.append(token[0])
        elif key is None:
            raise DataError(f"{where} has a bad placeholder: only {{key}} with a config key is filled in")
        elif key not in run.config or not isinstance(run.config[key], (str, int, float, bool)):
            raise DataError(f"{where} has a bad placeholder: {{{clip(key)}}} is not a plain config value")
        else:
            out.append(str(run.config[key]))
    return Path("".join(out) + template[pos:])


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or float that float() can hold; NaN is allowed (the report shows it as 0), infinities not."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return not math.isinf(float(value))
    except OverflowError:  # an integer of 400 digits
        return False

"""Per-round records written by rank 0: metrics.jsonl (one JSON object a line) and metrics.csv."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np


def summarize(prefix: str, values: np.ndarray) -> dict[str, float]:
    """mean/min/max of the finite values, under `<prefix>_mean` etc. (None when there are none)."""
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        return {f"{prefix}_{k}": None for k in ("mean", "min", "max")}
    return {f"{prefix}_mean": float(finite.mean()), f"{prefix}_min": float(finite.min()),
            f"{prefix}_max": float(finite.max())}


class MetricsWriter:
    """Appends one row per round and flushes it, so a killed job keeps every finished round."""

    def __init__(self, run_dir: Path) -> None:
        self.jsonl = run_dir / "metrics.jsonl"
        self.csv = run_dir / "metrics.csv"
        for path in (self.jsonl, self.csv):
            path.write_text("")
        self.columns: list[str] = []

    def write(self, row: dict[str, Any]) -> None:
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if not self.columns:
            self.columns = list(row)
            with self.csv.open("a", newline="") as f:
                csv.writer(f).writerow(self.columns)
        with self.csv.open("a", newline="") as f:
            csv.writer(f).writerow([_cell(row.get(c)) for c in self.columns])


def _cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value


def write_nodes_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """One row per node: node, rank, samples, local_acc, main_on_local_acc."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["node", "rank", "samples", "local_acc", "main_on_local_acc"])
        writer.writeheader()
        for row in sorted(rows, key=lambda r: r["node"]):
            writer.writerow({k: _cell(v) for k, v in row.items()})

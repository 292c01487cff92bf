"""Per-round records written by rank 0: metrics.jsonl (one JSON object a line) and metrics.csv."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .aggregate import wire_bytes_estimate


def summarize(prefix: str, values: np.ndarray) -> dict[str, float]:
    """mean/min/max of the finite values, under `<prefix>_mean` etc. (None when there are none)."""
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        return {f"{prefix}_{k}": None for k in ("mean", "min", "max")}
    return {f"{prefix}_mean": float(finite.mean()), f"{prefix}_min": float(finite.min()),
            f"{prefix}_max": float(finite.max())}


class MetricsWriter:
    """Appends one row per round and flushes it, so a killed job keeps every finished round."""

    def __init__(self, run_dir: Path, rows: Optional[list] = None) -> None:
        """Start the files afresh, holding `rows` (a resumed run's rows up to its checkpoint)."""
        self.jsonl = run_dir / "metrics.jsonl"
        self.csv = run_dir / "metrics.csv"
        for path in (self.jsonl, self.csv):
            path.write_text("")
        self.columns: list[str] = []
        for row in rows or []:
            self.write(row)

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


def metrics_row(rnd: int, test: tuple, per_rank: list, central: Optional[dict], payload: int, ranks: int,
                t_eval: float, t_round: float) -> dict:
    """One round's row from rank 0's scores and every rank's timings and node scores."""
    t_train = np.array([r["t_train"] for r in per_rank])
    t_wait = np.array([r["t_wait"] for r in per_rank])
    nodes = [n for r in per_rank for n in r["nodes"]]
    central = central or {}
    row = dict(round=rnd, test_acc=test[0], test_loss=test[1],
               central_acc=(central.get("test_acc") or [None])[-1], central_loss=(central.get("test_loss") or [None])[-1],
               t_round=t_round, t_train_max=float(t_train.max()), t_train_mean=float(t_train.mean()),
               t_wait=float(t_wait.mean()), t_wait_max=float(t_wait.max()),
               t_allreduce=max(r["t_allreduce"] for r in per_rank), t_eval=t_eval,
               payload_bytes=payload, wire_bytes_est=wire_bytes_estimate(payload, ranks), ranks=ranks, nodes=len(nodes))
    row.update(summarize("local_acc", np.array([n["local_acc"] for n in nodes])))
    row.update(summarize("main_on_local_acc", np.array([n["main_on_local_acc"] for n in nodes])))
    return row


def describe_round(row: dict, rounds: int) -> str:
    """The one line rank 0 prints per round."""
    acc = "  -   " if row["test_acc"] is None else f"{row['test_acc']:.4f}"
    central = "" if row["central_acc"] is None else f"  central {row['central_acc']:.4f}"
    dropped = f"  dropped {row['nodes_dropped']}" if row.get("nodes_dropped") else ""
    return (f"round {row['round']:>3}/{rounds}  test_acc {acc}{central}  local_acc {row['local_acc_mean'] or 0:.4f}"
            f"  t {row['t_round']:.2f}s (train max {row['t_train_max']:.2f}, wait {row['t_wait']:.3f},"
            f" allreduce {row['t_allreduce'] * 1e3:.1f} ms)  payload {row['payload_bytes']:,} B{dropped}")

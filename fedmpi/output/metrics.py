"""Per-round records written by rank 0: metrics.jsonl (one JSON object a line), metrics.csv, nodes.csv
(every node's scores, every node_metrics_every rounds).

Every file is replaced atomically (temp file, fsync, rename), so a crash never leaves half a row.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from ..errors import OutputError
from ..fl.aggregate import wire_bytes_estimate
from .summary import merge, row_fields


class MetricsWriter:
    """Rewrites metrics.jsonl and metrics.csv whole after each round, atomically.

    A job killed at any instant, even inside a write, leaves both files parseable with every
    finished round: the new content goes to a temp file that replaces the old one only once complete.
    """

    def __init__(self, run_dir: Path, rows: Optional[list] = None) -> None:
        """Start the files afresh, holding `rows` (a resumed run's rows up to its checkpoint)."""
        self.jsonl = run_dir / "metrics.jsonl"
        self.csv = run_dir / "metrics.csv"
        self.rows: list[dict[str, Any]] = []
        self.columns: list[str] = []
        for row in rows or []:
            self.write(row)
        self._flush()

    def write(self, row: dict[str, Any]) -> None:
        if not self.columns:
            self.columns = list(row)
        self.rows.append(row)
        self._flush()

    def _flush(self) -> None:
        write_atomic(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.rows))
        lines = io.StringIO()
        if self.columns:
            out = csv.writer(lines)
            out.writerow(self.columns)
            out.writerows([_cell(r.get(c)) for c in self.columns] for r in self.rows)
        write_atomic(self.csv, lines.getvalue())


def _cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value


def write_nodes_csv(path: Path, parts: list[dict[str, Any]], client_ids: Optional[list[str]] = None) -> None:
    """One row per node: node, [client_id,] rank, samples, local_acc, main_on_local_acc[, personal_local_acc]
    (replaced atomically).

    `parts`: each rank's block in rank order (first node, rank, and arrays samples, local_acc,
    main_on_local_acc; NaN where a node was not scored). client_id (each node's client in the imported
    data) is there when the shard file has ids.
    """
    lines = io.StringIO()
    personal = bool(parts) and "personal_local_acc" in parts[0]  # personalization: every rank sends it
    names = ["node", *(["client_id"] if client_ids is not None else []), "rank", "samples", "local_acc",
             "main_on_local_acc", *(["personal_local_acc"] if personal else [])]
    out = csv.writer(lines)
    out.writerow(names)
    for part in sorted(parts, key=lambda p: p["first"]):
        first, rank = part["first"], part["rank"]
        own = part["personal_local_acc"].tolist() if personal else [None] * len(part["samples"])
        for k, (samples, local, main, mine) in enumerate(zip(part["samples"].tolist(), part["local_acc"].tolist(),
                                                             part["main_on_local_acc"].tolist(), own)):
            ids = [client_ids[first + k]] if client_ids is not None else []
            out.writerow([first + k, *ids, rank, samples, _cell(local), _cell(main),
                          *([_cell(mine)] if personal else [])])
    write_atomic(path, lines.getvalue())


def write_atomic(path: Path, data: Union[str, bytes]) -> None:
    """Replace `path` with `data` (str: UTF-8) so a reader or a crash sees the old file or the new one.

    A failed write (disk full, file too large, no permission) leaves the old file as it was, removes
    the temp file, and raises OutputError naming `path`.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    raw = data.encode() if isinstance(data, str) else data
    try:
        tmp.unlink(missing_ok=True)  # a stale temp of a killed job with this pid, or a planted symlink
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with open(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())  # the data must be on disk before the rename makes it the file
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise OutputError(f"cannot write {path}: {err.strerror or err}") from None
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (a power loss could otherwise bring back the old name)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the rename is still atomic
    finally:
        os.close(fd)


def metrics_row(rnd: int, test: tuple, per_rank: list, central: Optional[dict], payload: int, ranks: int,
                t_eval: float, t_round: float) -> dict:
    """One round's row from rank 0's scores and every rank's timings and fixed-size score summaries."""
    t_train = np.array([r["t_train"] for r in per_rank])
    t_wait, t_transfer = split_collective(np.array([r["t_collective"] for r in per_rank]))
    central = central or {}
    row = dict(round=rnd, test_acc=test[0], test_loss=test[1], central_acc=(central.get("test_acc") or [None])[-1],
               central_loss=(central.get("test_loss") or [None])[-1],
               t_round=t_round, t_train_max=float(t_train.max()), t_train_mean=float(t_train.mean()),
               t_wait=float(t_wait.mean()), t_wait_max=float(t_wait.max()),
               t_allreduce=t_transfer, t_eval=t_eval,
               payload_bytes=payload, wire_bytes_est=wire_bytes_estimate(payload, ranks), ranks=ranks,
               nodes=sum(r["nodes"] for r in per_rank))
    row.update(row_fields("local_acc", merge(r["local"] for r in per_rank)))
    row.update(row_fields("main_on_local_acc", merge(r["main_on_local"] for r in per_rank)))
    if "personal_local" in per_rank[0]:  # personalization: every rank sends both or neither
        row.update(row_fields("personal_local_acc", merge(r["personal_local"] for r in per_rank)))
        row.update(row_fields("main_on_trained_acc", merge(r["main_on_trained"] for r in per_rank)))
    return row


def elapsed_before(rows: Optional[list]) -> float:
    """t_elapsed of a resumed run's last row (0 for a new run): the next rows count on from there, so
    t_elapsed is the wall time of all the work behind the rows, whatever the number of restarts."""
    last = rows[-1] if rows and isinstance(rows[-1], dict) else {}
    value = last.get("t_elapsed")
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    return float(value) if ok else 0.0


def split_collective(t_collective: np.ndarray) -> tuple[np.ndarray, float]:
    """Each rank's wait for the last arrival, and the transfer: the last rank to arrive waits least,
    so the smallest time in the collective is the transfer and the excess over it is waiting."""
    transfer = float(t_collective.min())
    return t_collective - transfer, transfer


def describe_round(row: dict, rounds: int) -> str:
    """The one line rank 0 prints per round."""
    acc = "  -   " if row["test_acc"] is None else f"{row['test_acc']:.4f}"
    central = "" if row["central_acc"] is None else f"  central {row['central_acc']:.4f}"
    dropped = f"  dropped {row['nodes_dropped']}" if row.get("nodes_dropped") else ""
    # No local test splits (test_per_node 0), or every node dropped: nothing was scored.
    local = "  -   " if row["local_acc_mean"] is None else f"{row['local_acc_mean']:.4f}"
    return (f"round {row['round']:>3}/{rounds}  test_acc {acc}{central}  local_acc {local}"
            f"  t {row['t_round']:.2f}s (train max {row['t_train_max']:.2f}, wait {row['t_wait']:.3f},"
            f" allreduce {row['t_allreduce'] * 1e3:.1f} ms)  payload {row['payload_bytes']:,} B{dropped}")

"""Optional TensorBoard logging (`tensorboard: true`): every round's scalars under RUN_DIR/tensorboard/.

An extra (`pip install 'fedmpi[tensorboard]'`), written by rank 0 through torch's SummaryWriter.
Like metrics.jsonl, the event files start afresh at every start of a run and hold the rows known
so far (a resumed run's rows up to its checkpoint), so a round that a resumed run repeats shows
once, whichever TensorBoard reads the directory. Each round is flushed as it ends.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional

from ..errors import ConfigError

FOLDER = "tensorboard"
EVENT_PREFIX = "events.out.tfevents."
INSTALL = "pip install 'fedmpi[tensorboard]'"
# Row fields by what they measure: TensorBoard draws one section per tag prefix.
GROUPS = (("accuracy", lambda k: k.endswith("_acc") or "_acc_" in k), ("loss", lambda k: k.endswith("_loss")),
          ("time", lambda k: k.startswith("t_")), ("bytes", lambda k: "bytes" in k),
          ("nodes", lambda k: k.startswith("nodes") or k == "ranks"))


def require() -> None:
    """One line (ConfigError) when `tensorboard: true` but the package cannot be imported."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"config key 'tensorboard' is true but the tensorboard package cannot be used ({err}); "
                          f"install it with: {INSTALL}") from None


def tag(key: str) -> str:
    """The TensorBoard tag of a row field, e.g. test_acc -> accuracy/test_acc."""
    return next((f"{group}/{key}" for group, match in GROUPS if match(key)), f"other/{key}")


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The row's finite numbers by tag (the round is the step; null, text and NaN are left out)."""
    out = {}
    for key, value in row.items():
        if key == "round" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[tag(key)] = float(value)
    return out


class TensorBoardWriter:
    """Rank 0's event files: the rows so far at the start, then one flush per finished round."""

    def __init__(self, run_dir: Path, rows: Optional[list] = None) -> None:
        require()
        from torch.utils.tensorboard import SummaryWriter

        folder = run_dir / FOLDER
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise ConfigError(f"{folder} is not a directory: TensorBoard writes its event files there")
        folder.mkdir(exist_ok=True)
        clear_events(folder)
        self.writer = SummaryWriter(str(folder), flush_secs=3600)  # flushed by write(), not by a timer
        for row in rows or []:
            self.write(row)

    def write(self, row: dict[str, Any]) -> None:
        for name, value in scalars(row).items():
            self.writer.add_scalar(name, value, global_step=int(row["round"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def clear_events(folder: Path) -> None:
    """Remove earlier event files (only those, and no link's target): the new file holds every row."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith(EVENT_PREFIX) and not entry.is_dir(follow_symlinks=False):
                os.unlink(entry.path)

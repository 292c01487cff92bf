"""Each peer in its own virtual environment, made on first use (never in fedmpi's own environment).

The environments live under ~/.cache/fedmpi/bench-venvs/<peer> (or --venvs DIR) and are remade when the
package list changes: a stamp file inside holds the list that was installed.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional

DEFAULT_ROOT = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fedmpi" / "bench-venvs"
STAMP = ".fedmpi-bench-packages.json"
INSTALL_TIMEOUT_S = 3600


def peer_packages(torch_version: str) -> dict[str, list[str]]:
    """The pip requirements of each peer: the versions measured, and fedmpi's torch (its public part)."""
    torch_req = f"torch=={torch_version.split('+')[0]}"
    return {"pfl": ["pfl==0.6.0", torch_req, "h5py"],
            "flwr": ["flwr[simulation]==1.42.0", torch_req, "h5py"]}


def tail(path: Path, lines: int = 1) -> str:
    """The last non-empty, non-warning lines of a log (pip's error is at the end)."""
    try:
        plain = re.sub(r"\x1b\[[0-9;]*m", "", path.read_text(errors="replace"))   # colour codes of loggers
        text = [t for t in plain.splitlines() if t.strip() and "WARNING" not in t]
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def ensure(peer: str, packages: list[str], root: Path = DEFAULT_ROOT, say=print) -> Optional[Path]:
    """The python of `peer`'s environment, made (or remade) when missing; None, after one line, if that fails."""
    venv = root / peer
    python = venv / "bin" / "python"
    stamp = venv / STAMP
    try:
        if python.exists() and json.loads(stamp.read_text()) == packages:
            return python
    except (OSError, ValueError):
        pass
    root.mkdir(parents=True, exist_ok=True)
    log = root / f"{peer}-install.log"
    say(f"{peer}: installing {' '.join(packages)} into {venv} (first use; several minutes; log {log})")
    try:
        with open(log, "w") as out:
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], stdout=out, stderr=subprocess.STDOUT,
                           check=True, timeout=600)
            subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", *packages],
                           stdout=out, stderr=subprocess.STDOUT, check=True, timeout=INSTALL_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as err:
        reason = tail(log) or str(err)
        say(f"{peer}: left out: installing {' '.join(packages)} into {venv} failed (no network?): {reason} "
            f"(log {log})")
        return None
    stamp.write_text(json.dumps(packages))
    return python

"""Run a fedmpi job and stop it gracefully once its test accuracy reaches a target.

    python tools/run_to_target.py runs/x --target 0.97 -- mpirun -n 2 python -m fedmpi run ... --out runs/x

Polls RUN_DIR/metrics.jsonl; at the first round with test_acc >= target it sends SIGUSR1 to the
launcher (MPICH's mpiexec forwards it to every rank), and fedmpi stops after the round in flight,
with a checkpoint (exit code 75). Saves the rounds after the target; the target round is unchanged.
"""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path


def reached(metrics: Path, target: float) -> bool:
    if not metrics.exists():
        return False
    for line in metrics.read_text().splitlines():
        try:
            acc = json.loads(line).get("test_acc")
        except json.JSONDecodeError:  # a line being written
            continue
        if acc is not None and acc >= target - 1e-6:  # as tools/rounds_to_target.py
            return True
    return False


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--target", type=float, required=True)
    argv = sys.argv[1:]
    if "--" not in argv:
        p.error("give the command after --")
    cut = argv.index("--")
    args, cmd = p.parse_args(argv[:cut]), argv[cut + 1:]
    proc, signalled = subprocess.Popen(cmd), False
    while proc.poll() is None:
        time.sleep(0.5)
        if not signalled and reached(args.run_dir / "metrics.jsonl", args.target):
            print(f"run_to_target: {args.run_dir} reached {args.target}; stopping it", file=sys.stderr, flush=True)
            proc.send_signal(signal.SIGUSR1)
            signalled = True
    return 0 if signalled and proc.returncode == 75 else proc.returncode


if __name__ == "__main__":
    sys.exit(main())

"""Running the contenders of tools/bench_peers.py: all started at once, then one round of one contender at a time.

Each contender is a process group (its own session) with a control folder (tools/peers/pacing.py) and a
log of its stdout and stderr. Only the contender whose `go` was just written computes; the others sleep
in their pacers. A contender that dies, or takes longer than the limit, is stopped, reported with the last
line of its log, and the others go on.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

from . import report
from .contenders import Contender, events, read_rounds
from .pacing import POLL_S, read_int, write_int
from .venvs import tail


class Running:
    """One started contender: its process, control folder, log and what it has reported."""

    def __init__(self, c: Contender, work: Path, model: str) -> None:
        self.c = c
        slug = c.name.replace(" ", "").replace(",", "-").replace(":", "")
        self.ctl = work / "ctl" / f"{model}-{slug}"
        self.log = work / "logs" / f"{model}-{slug}.log"
        for path in (self.ctl, c.run_dir):
            if path is not None and path.exists():
                shutil.rmtree(path)
        self.ctl.mkdir(parents=True)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, **c.env, FEDMPI_BENCH_CTL=str(self.ctl), FLWR_TELEMETRY_ENABLED="0")
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(c.cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, start_new_session=True)
        self.status = "ok"
        self.rss: dict = {}

    def ready(self) -> int:
        return read_int(self.ctl / "ready")

    def wait_ready(self, k: int, limit_s: float) -> bool:
        """Block until the contender waits for round k; False (and stopped, status set) if it dies or stalls."""
        deadline = time.monotonic() + limit_s
        while self.ready() < k:
            if self.proc.poll() is not None:
                return self.fail(f"exited with code {self.proc.returncode}")
            if time.monotonic() > deadline:
                return self.fail(f"no progress in {limit_s:.0f} s")
            time.sleep(POLL_S)
        return True

    def go(self, k: int) -> None:
        write_int(self.ctl / "go", k)

    def fail(self, why: str) -> bool:
        last = tail(self.log)
        self.status = f"stopped: {why}" + (f"; last output: {last[-300:]}" if last else "")
        self.stop()
        return False

    def stop(self, grace_s: float = 10.0) -> None:
        """End the contender: SIGTERM to its group and every process below it, SIGKILL to what is left after
        `grace_s`. Launchers put their children in groups of their own (mpirun's ranks, torchrun's workers),
        so the tree is listed by parent id first."""
        if self.proc.poll() is not None:
            return
        tree = descendants(self.proc.pid)
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            _signal(self.proc.pid, tree, sig)
            try:
                self.proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                continue
            if sig == signal.SIGTERM:
                time.sleep(0.5)   # the launcher is gone; give its children a moment, then make sure
                _signal(self.proc.pid, tree, signal.SIGKILL)
            return

    def rounds(self) -> dict[int, dict]:
        return read_rounds(self.c, self.log)

    def result(self) -> dict:
        """The contender's record for the report and the JSON file."""
        return dict(name=self.c.name, peer=self.c.peer, semantics=self.c.semantics, rounds=self.rounds(),
                    status=self.status, command=" ".join(self.c.cmd), log=str(self.log),
                    events=events(self.log), **self.rss)


def _signal(root: int, tree: list[int], sig: int) -> None:
    """`sig` to the group of `root` and to each listed process (those already gone are skipped)."""
    for send, target in [(os.killpg, root)] + [(os.kill, pid) for pid in tree]:
        try:
            send(target, sig)
        except (ProcessLookupError, PermissionError):
            pass


def descendants(root: int) -> list[int]:
    """Every process below `root` (by parent id, from /proc), not `root` itself."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def tree_rss(root: int) -> dict:
    """Peak RSS (VmHWM) summed over `root` and every process below it, the largest one, and their count.
    Pages shared between processes (libraries, Ray's object store) count once per process."""
    peaks = []
    for pid in [root] + descendants(root):
        try:
            hwm = [ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("VmHWM:")]
        except OSError:
            continue
        if hwm:
            peaks.append(int(hwm[0].split()[1]) / 1024)
    return dict(rss_sum_mib=sum(peaks), rss_max_mib=max(peaks, default=0.0), processes=len(peaks))


def run_all(contenders: list[Contender], work: Path, model: str, rounds: int, limits: tuple[float, float],
            say: Callable[[str], None] = print) -> list[dict]:
    """Start every contender, run the rounds in report.schedule order, read memory, stop them; their results."""
    start_s, round_s = limits
    running = {c.name: Running(c, work, model) for c in contenders}
    try:
        for r in running.values():
            if not r.wait_ready(1, start_s):
                say(f"  {r.c.name}: {r.status}")
        for rnd, name in report.schedule(list(running), rounds):
            r = running[name]
            if r.status != "ok":
                continue
            r.go(rnd)
            if r.wait_ready(rnd + 1, round_s):
                rec: Optional[dict] = r.rounds().get(rnd)
                say(f"  round {rnd} {name:<32} " + (f"{rec['seconds']:7.2f} s  test acc {rec['test_acc']:.4f}"
                                                     if rec else "no record of this round"))
            else:
                say(f"  round {rnd} {name}: {r.status}")
        for r in running.values():
            if r.status == "ok":
                r.rss = tree_rss(r.proc.pid)
                r.go(rounds + 1)
                try:
                    r.proc.wait(300)
                except subprocess.TimeoutExpired:
                    r.fail("did not exit within 300 s after its last round")
    finally:
        for r in running.values():
            r.stop()
    return [r.result() for r in running.values()]

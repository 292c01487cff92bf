"""Helpers of the adversarial run-directory suites: real jobs, snapshots of what is on disk, refusals."""
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from contextlib import contextmanager

from conftest import ROOT, SMALL, fedmpi, mpi_env, mpirun_path

RANKS = [1, 3]
RUN = [*SMALL, "central_epochs=0", "rounds=2", "checkpoint_every=1", "server_opt=fedavgm"]
LIMIT_S = 60  # a refusal takes seconds; this only catches a hang


def snapshot(run_dir, skip=(".lock",)):
    """Every entry under run_dir: kind and content hash (FIFOs by kind only: reading one would block)."""
    out = {}
    for path in sorted(run_dir.rglob("*")):
        rel = str(path.relative_to(run_dir))
        if rel in skip:
            continue
        info = os.lstat(path)
        if stat.S_ISREG(info.st_mode) and info.st_size < 64 << 20:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif stat.S_ISREG(info.st_mode):  # the sparse giants of the size cases
            out[rel] = (info.st_size, info.st_mtime_ns)
        else:
            out[rel] = stat.filemode(info.st_mode)[0]
    return out


def error_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("fedmpi: error")]


def assert_refused(result, *fragments, code=2):
    """Exit `code`, one error line holding every fragment, no traceback, ended in seconds."""
    errors = error_lines(result)
    assert result.returncode == code, result.stderr[-3000:]
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert "Traceback" not in result.stderr and len(errors[0]) < 600, result.stderr[-3000:]
    assert result.seconds < LIMIT_S


def no_temp_files(run_dir):
    """No .X.PID.tmp file and no checkpoint.tmp/ anywhere under run_dir."""
    return [p.name for p in run_dir.rglob("*") if p.name.endswith(".tmp")] == []


def crashed_run(small_data, run_dir):
    """A run that crashed in round 2 at -n 2, leaving round 1's checkpoint: nodes-0-4.pt and nodes-4-8.pt."""
    result = fedmpi(["run", "--set", *RUN, small_data, "--out", str(run_dir)], ranks=2,
                    env={"FEDMPI_FAULT": "raise:rank=0:round=2"})
    assert result.returncode != 0
    meta = json.loads((run_dir / "checkpoint" / "meta.json").read_text())
    assert meta["round"] == 1 and sorted(meta["node_files"]) == ["nodes-0-4.pt", "nodes-4-8.pt"]
    # The crash leaves the watchdog's heartbeats behind (a next job there replaces them); the copies the
    # tests corrupt need none of them.
    shutil.rmtree(run_dir / ".heartbeat", ignore_errors=True)
    return run_dir


def unblock(fifo):
    """Release a reader stuck on `fifo` (only if the code under test regressed), so no rank is left behind."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


def make_fifo(path):
    path.unlink()
    os.mkfifo(path)


def rank_pids(marker):
    """Pids of the python processes whose command line holds `marker` (the ranks of one job)."""
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith((b"python", b"python3")) and marker.encode() in cmd:
            pids.append(int(entry))
    return pids


def lock_holder(run_dir):
    """The pid rank 0 wrote into RUN_DIR/.lock."""
    return int((run_dir / ".lock").read_text().split()[1])


def wait_for(condition, proc, what, timeout=90):
    """Poll `condition` while the job `proc` runs; fail if it ends first or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the job ended before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@contextmanager
def running(args, ranks, fault, stderr_file=None):
    """A job in the background (`mpirun -n RANKS python -m fedmpi ARGS` with FEDMPI_FAULT=fault), ended on exit.
    With `stderr_file` its stderr goes there (readable while it runs) instead of a pipe."""
    err = open(stderr_file, "w") if stderr_file else subprocess.PIPE
    job = subprocess.Popen([mpirun_path(), "-n", str(ranks), sys.executable, "-m", "fedmpi", *args], cwd=ROOT,
                           env=dict(os.environ, **mpi_env(), FEDMPI_FAULT=fault),
                           stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        yield job
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
        if stderr_file:
            err.close()


def kill_ranks(marker, sig=signal.SIGKILL):
    """Send `sig` to every rank of the job whose command line holds `marker`."""
    for pid in rank_pids(marker):
        os.kill(pid, sig)

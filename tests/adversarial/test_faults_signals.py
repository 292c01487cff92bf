"""Frozen, stuck and failing ranks, signals and a missing mpi4py, under real `mpirun -n 1` and `-n 3`.

Each case asserts the exit code, the one line that names what happened (rank and stage for a stall),
what is on disk afterwards (checkpoint, metrics, no heartbeat files after a normal end or a stop),
and that the job ends within a generous limit: these catch hangs, they do not time anything.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SMALL, chosen_mpi, mpi_env, mpirun_path, read_metrics

from fedmpi.runtime import faults
from fedmpi.runtime.watchdog import FOLDER, STALL_EXIT_CODE, read_beat

RANKS = [1, 3]
BASE = [*SMALL, "central_epochs=0", "threads=1"]  # one thread: OpenMP threads crawl on a busy machine
STALL = 6          # stall_timeout_s of the jobs meant to trip the watchdog
LIMIT = 240        # seconds any one job may take before the test calls it a hang
LONG_ROUND = "local_epochs=5000"  # a round of minutes: a stop must not wait for it
STALL_LINE = re.compile(r"^fedmpi: error: rank (\d+)/(\d+) made no progress for (\d+) s \(stage: (.*)\); "
                        r"ending the job$", re.M)


class Job:
    """`mpirun -n RANKS python -m fedmpi run ARGS` in its own process group; output goes to files."""

    def __init__(self, args: list[str], ranks: int, folder: Path, env: dict | None = None) -> None:
        self.ranks, self.run_dir = ranks, folder / "run"
        self.out, self.err = folder / "stdout.txt", folder / "stderr.txt"
        cmd = [mpirun_path(), "-n", str(ranks), sys.executable, "-m", "fedmpi", "run", *args]
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, start_new_session=True,
                                         env=dict(os.environ, **mpi_env(), **(env or {})))

    def stderr(self) -> str:
        return self.err.read_text()

    def wait_for(self, what: str, check, timeout: float = LIMIT) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"{what}: not seen (exit {self.proc.returncode})\n{self.stderr()}")
            time.sleep(0.05)

    def beats(self) -> dict:
        """Each rank's heartbeat (rank -> Beat), for the ranks that wrote one."""
        found = {r: read_beat(self.run_dir / FOLDER / f"rank-{r}.json") for r in range(self.ranks)}
        return {r: b for r, b in found.items() if b is not None}

    def wait_stage(self, stage: str, rnd, ranks=None) -> dict:
        """Wait until the ranks' heartbeats show `stage` of round `rnd`; returns rank -> pid."""
        ranks = range(self.ranks) if ranks is None else ranks

        def there() -> bool:
            beats = self.beats()
            return all(r in beats and (beats[r].stage, beats[r].round) == (stage, rnd) for r in ranks)

        self.wait_for(f"{stage}, round {rnd} on ranks {list(ranks)}", there)
        return {r: b.pid for r, b in self.beats().items()}

    def signal(self, pids, sig: int) -> float:
        for pid in pids:
            os.kill(pid, sig)
        return time.monotonic()

    def finish(self, timeout: float = LIMIT) -> tuple[int, str, str]:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the job did not end within {timeout} s (a hang)\n{self.stderr()}")
        return self.proc.returncode, self.out.read_text(), self.stderr()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=60)


@pytest.fixture
def job(tmp_path):
    """job(args, ranks, env) starts a Job; any still running at the end of the test is killed."""
    started = []

    def start(args, ranks, env=None, name="job") -> Job:
        folder = tmp_path / name
        folder.mkdir()
        started.append(Job([*args, "--out", str(folder / "run")], ranks, folder, env))
        return started[-1]

    yield start
    for j in started:
        j.kill()


def run_job(job, args, ranks, env=None, name="job", timeout=LIMIT):
    j = job(args, ranks, env, name)
    return (*j.finish(timeout), j)


def stall_lines(stderr: str) -> list[tuple]:
    return [(int(r), int(p), int(s), stage) for r, p, s, stage in STALL_LINE.findall(stderr)]


def injected_at(stderr: str) -> float:
    found = re.findall(r"fedmpi: fault injection: \w+ on rank \d+, round \d+, at unix time ([\d.]+)", stderr)
    assert found, stderr
    return float(found[0])


def assert_gone(pid: int, timeout: float = 30) -> None:
    """The process has left (a frozen rank must not outlive its job)."""
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        state = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "X"
        if state in ("Z", "X"):
            return
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"process {pid} outlived its job (state {state})")
        time.sleep(0.1)


def stop_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("stopped by")]


def same_model(a: Path, b: Path) -> bool:
    wa, wb = (torch.load(d / "model.pt", weights_only=True) for d in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def checkpoint_round(run_dir: Path) -> int:
    return json.loads((run_dir / "checkpoint" / "meta.json").read_text())["round"]


# --- the watchdog ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("ranks", RANKS)
def test_a_rank_stuck_in_a_stage_ends_the_job_with_one_line_naming_it(small_data, job, ranks):
    rank = ranks - 1
    code, _, err, j = run_job(job, ["--set", *BASE, small_data, f"stall_timeout_s={STALL}"], ranks,
                              {"FEDMPI_FAULT": f"hang:rank={rank}:round=2"})
    assert code == STALL_EXIT_CODE, err
    [(who, size, seconds, stage)] = stall_lines(err)
    assert (who, size, stage) == (rank, ranks, "training, round 2") and seconds >= STALL - 1
    assert time.time() - injected_at(err) >= STALL - 1  # it waited the timeout, not less
    assert [r["round"] for r in read_metrics(j.run_dir)] == [1] and "Traceback" not in err


@pytest.mark.parametrize("rank", [0, 2])
def test_a_frozen_rank_is_named_by_the_ranks_that_wait_for_it(small_data, job, rank):
    # Training of a few tenths of a second: a heartbeat shows a new stage within a tenth of the check interval.
    j = job(["--set", *BASE, small_data, "local_epochs=5", f"stall_timeout_s={STALL}"], 3,
            {"FEDMPI_FAULT": f"freeze:rank={rank}:round=2"})
    j.wait_for("the freeze", lambda: "fault injection: freeze" in j.stderr())
    pid = j.beats()[rank].pid
    code, _, err = j.finish()
    assert code == STALL_EXIT_CODE, err
    [(who, size, seconds, stage)] = stall_lines(err)
    assert (who, size, stage) == (rank, 3, "training, round 2") and seconds >= STALL - 1
    assert_gone(pid)
    assert [r["round"] for r in read_metrics(j.run_dir)] == [1]


def test_sigstop_from_outside_mid_training_is_named_with_its_stage(small_data, job):
    # Rounds of some seconds: the others finish theirs, then wait for rank 1 in the Allreduce.
    j = job(["--set", *BASE, small_data, "local_epochs=400", f"stall_timeout_s={STALL}"], 3)
    pids = j.wait_stage("training", 1)
    j.signal([pids[1]], signal.SIGSTOP)
    code, _, err = j.finish()
    assert code == STALL_EXIT_CODE, err
    [(who, size, _, stage)] = stall_lines(err)
    assert (who, size) == (1, 3) and stage.startswith("training, round 1")
    assert_gone(pids[1])
    assert not (j.run_dir / "metrics.jsonl").exists() or read_metrics(j.run_dir) == []


@pytest.mark.parametrize("ranks", RANKS)
def test_c_code_that_holds_the_interpreter_lock_cannot_hang_the_job(small_data, job, ranks):
    """The stuck rank's own thread cannot run: at -n 3 its peers name it, at -n 1 the C timer ends it."""
    rank = ranks - 1
    code, _, err, _ = run_job(job, ["--set", *BASE, small_data, "local_epochs=5", f"stall_timeout_s={STALL}"], ranks,
                              {"FEDMPI_FAULT": f"block:rank={rank}:round=2"})
    if ranks == 1:
        assert code == 1 and "Timeout (0:00:" in err and "in fire" in err, err  # where it was stuck
    else:
        assert code == STALL_EXIT_CODE, err
        [(who, size, _, stage)] = stall_lines(err)
        assert (who, size, stage) == (rank, ranks, "training, round 2")


@pytest.mark.parametrize("ranks", RANKS)
def test_a_long_centralized_baseline_on_rank_0_does_not_trip_the_watchdog(small_data, job, ranks):
    """About 7 s of baseline training on rank 0 (the others wait in a barrier) against a 2 s timeout."""
    code, _, err, j = run_job(job, ["--set", *SMALL, small_data, "rounds=1", "central_epochs=40", "threads=1",
                                    "stall_timeout_s=2"], ranks, name=f"baseline{ranks}")
    assert code == 0 and stall_lines(err) == [], err
    assert json.loads((j.run_dir / "central.json").read_text())["epochs"] == 40
    assert not (j.run_dir / FOLDER).exists()


@pytest.mark.parametrize("ranks", RANKS)
def test_a_straggler_longer_than_the_stall_timeout_is_a_stall(small_data, job, ranks):
    code, _, err, _ = run_job(job, ["--set", *BASE, small_data, "stall_timeout_s=1"], ranks,
                              {"FEDMPI_FAULT": f"delay:rank={ranks - 1}:round=2:seconds=30"})
    assert code == STALL_EXIT_CODE, err
    [(who, _, _, stage)] = stall_lines(err)
    assert (who, stage) == (ranks - 1, "training, round 2")


@pytest.mark.parametrize("ranks", RANKS)
def test_stall_timeout_0_turns_the_watchdog_off(small_data, job, ranks):
    j = job(["--set", *BASE, small_data, "stall_timeout_s=0"], ranks,
            {"FEDMPI_FAULT": f"delay:rank={ranks - 1}:round=2:seconds=3"})
    j.wait_for("the delay", lambda: "fault injection: delay" in j.stderr())
    assert not (j.run_dir / FOLDER).exists()  # no heartbeats while the job runs
    code, _, err = j.finish()
    assert code == 0 and [r["round"] for r in read_metrics(j.run_dir)] == [1, 2, 3], err


# --- signals ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ranks,extra", [(1, []), (3, []), (3, ["update_dtype=fp16"]), (3, ["engine=sequential"])],
                         ids=["n1", "n3", "n3-fp16", "n3-sequential"])
def test_a_signal_mid_training_abandons_the_round_and_the_resume_is_bitwise_equal(small_data, job, ranks, extra):
    args = ["--set", *BASE, small_data, "rounds=4", "local_epochs=2", *extra]
    code, _, err, reference = run_job(job, args, ranks, name="reference")
    assert code == 0, err
    code, out, err, stopped = run_job(job, args, ranks, {"FEDMPI_FAULT": f"term:rank={ranks - 1}:round=3"},
                                      name="stopped")
    assert code == 75, err
    [line] = stop_lines(out)
    assert "during round 3 (abandoned: it reruns on resume); checkpoint of round 2" in line
    assert checkpoint_round(stopped.run_dir) == 2 and [r["round"] for r in read_metrics(stopped.run_dir)] == [1, 2]
    assert not (stopped.run_dir / FOLDER).exists() and "Traceback" not in err
    resumed = subprocess.run([mpirun_path(), "-n", str(ranks), sys.executable, "-m", "fedmpi", "run", "--resume",
                              str(stopped.run_dir)], cwd=ROOT, capture_output=True, text=True, timeout=LIMIT,
                             env=dict(os.environ, **mpi_env()))
    assert resumed.returncode == 0, resumed.stderr
    rows, ref_rows = read_metrics(stopped.run_dir), read_metrics(reference.run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert [r["test_acc"] for r in rows] == [r["test_acc"] for r in ref_rows]
    assert same_model(stopped.run_dir, reference.run_dir)  # bitwise: momentum and model as if never stopped


@pytest.mark.parametrize("sig,ranks,to", [("SIGTERM", 1, "ranks"), ("SIGTERM", 3, "ranks"), ("SIGINT", 3, "ranks"),
                                          ("SIGINT", 3, "mpirun")])
def test_a_stop_signal_ends_a_long_round_within_seconds(small_data, job, sig, ranks, to):
    if to == "mpirun" and chosen_mpi() != "mpich":
        pytest.skip("Open MPI's mpirun ends the job on SIGINT itself; MPICH's forwards the first one")
    j = job(["--set", *BASE, small_data, LONG_ROUND], ranks)
    pids = j.wait_stage("training", 1)
    sent = j.signal(pids.values() if to == "ranks" else [j.proc.pid], getattr(signal, sig))
    code, out, err = j.finish()
    took = time.monotonic() - sent
    print(f"{sig} to the {to} at -n {ranks}: the job ended {took:.1f} s after the signal")
    assert took < 60  # the round alone would take minutes
    assert code == 75, err
    [line] = stop_lines(out)
    assert "during round 1 (abandoned: it reruns on resume); checkpoint of round 0" in line
    assert checkpoint_round(j.run_dir) == 0
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert not (j.run_dir / FOLDER).exists()


def test_a_stopped_job_skips_the_interpreters_teardown(small_data, job, tmp_path):
    """The teardown takes 2-3 s once torch is loaded: under srun that outlived SLURM's KillWait (5 s in
    tools/slurm_local.sh) and the job ended killed (0:9). A stop finalizes MPI and leaves at once, so no
    atexit hook runs; a normal end still tears down as usual."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text("import atexit, os, pathlib\n"
                                           f"atexit.register(lambda: pathlib.Path({str(hook)!r}, "
                                           "f'teardown-{os.getpid()}').touch())\n")
    env = {"PYTHONPATH": os.pathsep.join([str(hook), str(ROOT)])}
    code, _, err, _ = run_job(job, ["--set", *BASE, small_data], 3, dict(env, FEDMPI_FAULT="term:rank=1:round=2"),
                              name="stopped")
    assert code == 75 and not list(hook.glob("teardown-*")), err
    code, _, err, _ = run_job(job, ["--set", *BASE, small_data], 3, env, name="plain")
    assert code == 0 and len(list(hook.glob("teardown-*"))) == 3, err  # the hook itself works


@pytest.mark.parametrize("ranks", RANKS)
def test_a_second_sigint_aborts_at_once_with_one_line(small_data, job, ranks):
    delays = ",".join(f"delay:rank={r}:round=1:seconds=120" for r in range(ranks))  # the stop cannot finish soon
    j = job(["--set", *BASE, small_data], ranks, {"FEDMPI_FAULT": delays})
    j.wait_for("every rank's delay", lambda: j.stderr().count("fault injection: delay") == ranks)
    pids = [b.pid for b in j.beats().values()]
    j.signal(pids, signal.SIGINT)
    time.sleep(0.5)
    sent = j.signal(pids, signal.SIGINT)
    code, _, err = j.finish()
    assert time.monotonic() - sent < 60
    assert code == 130, err
    assert err.count("fedmpi: interrupted again") == 1 and "Traceback" not in err
    assert not (j.run_dir / "checkpoint").exists()


@pytest.mark.parametrize("ranks", RANKS)
def test_sigterm_again_and_again_until_the_job_is_gone_still_exits_75(small_data, job, ranks):
    """scancel sends TERM two or three times; here every 50 ms, into the checkpoint and the exit."""
    j = job(["--set", *BASE, small_data, "rounds=400"], ranks)
    j.wait_for("two rounds", lambda: (j.run_dir / "metrics.jsonl").exists() and len(read_metrics(j.run_dir)) >= 2)
    pids = [b.pid for b in j.beats().values()]
    while j.proc.poll() is None:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    code, out, err = j.finish()
    assert code == 75, err
    [line] = stop_lines(out)
    done = checkpoint_round(j.run_dir)
    assert [r["round"] for r in read_metrics(j.run_dir)] == list(range(1, done + 1))
    assert f"checkpoint of round {done}" in line and not (j.run_dir / FOLDER).exists()


@pytest.mark.parametrize("ranks", RANKS)
def test_a_signal_after_training_completes_the_round(small_data, job, ranks):
    j = job(["--set", *BASE, small_data, "rounds=4"], ranks, {"FEDMPI_FAULT": "delay:rank=0:round=2:seconds=3"})
    j.wait_for("the delay", lambda: "fault injection: delay" in j.stderr())
    j.signal([b.pid for b in j.beats().values()], signal.SIGTERM)
    code, out, err = j.finish()
    assert code == 75, err
    [line] = stop_lines(out)
    assert "after round 2; checkpoint of round 2" in line
    assert checkpoint_round(j.run_dir) == 2 and [r["round"] for r in read_metrics(j.run_dir)] == [1, 2]


@pytest.mark.parametrize("ranks", RANKS)
def test_a_stop_after_the_last_rounds_training_finishes_the_run(small_data, job, ranks):
    j = job(["--set", *BASE, small_data], ranks, {"FEDMPI_FAULT": "delay:rank=0:round=3:seconds=3"})
    j.wait_for("the delay", lambda: "fault injection: delay" in j.stderr())
    j.signal([b.pid for b in j.beats().values()], signal.SIGTERM)
    code, out, err = j.finish()
    assert code == 0 and stop_lines(out) == [], err
    assert (j.run_dir / "model.pt").is_file() and [r["round"] for r in read_metrics(j.run_dir)] == [1, 2, 3]
    assert not (j.run_dir / "checkpoint").exists() and not (j.run_dir / FOLDER).exists()


def test_a_signal_during_the_start_up_abandons_round_1_and_the_resume_equals_a_plain_run(small_data, job):
    args = ["--set", *SMALL, small_data, "central_epochs=400"]  # a baseline of seconds: the signal lands in it
    j = job(args, 3, name="stopped")
    pids = j.wait_stage("training the centralized baseline", None, ranks=[0])
    j.signal(pids.values(), signal.SIGTERM)
    code, out, err = j.finish()
    assert code == 75, err
    assert "during round 1 (abandoned: it reruns on resume); checkpoint of round 0" in stop_lines(out)[0]
    resumed = subprocess.run([mpirun_path(), "-n", "3", sys.executable, "-m", "fedmpi", "run", "--resume",
                              str(j.run_dir)], cwd=ROOT, capture_output=True, text=True, timeout=LIMIT,
                             env=dict(os.environ, **mpi_env()))
    assert resumed.returncode == 0, resumed.stderr
    code, _, err, plain = run_job(job, args, 3, name="plain")
    assert code == 0, err
    assert [r["test_acc"] for r in read_metrics(j.run_dir)] == [r["test_acc"] for r in read_metrics(plain.run_dir)]
    assert same_model(j.run_dir, plain.run_dir)


# --- injected faults and their exit codes -----------------------------------------------------------------

@pytest.mark.parametrize("ranks", RANKS)
def test_the_exit_fault_ends_the_job_with_its_own_code(small_data, job, ranks):
    code, _, err, _ = run_job(job, ["--set", *BASE, small_data], ranks,
                              {"FEDMPI_FAULT": f"exit:rank={ranks - 1}:round=2"})
    # Open MPI's mpirun returns the rank's own code; MPICH's does at -n 1 and 2, and at -n 3 and more
    # reports a rank it killed itself (9) when that one comes first in its list.
    allowed = {faults.EXIT_CODE} if ranks == 1 or chosen_mpi() == "openmpi" else {faults.EXIT_CODE, 9}
    assert code in allowed and faults.EXIT_CODE == 70, err


@pytest.mark.parametrize("ranks", RANKS)
def test_a_raise_ends_the_job_promptly_with_its_traceback_once(small_data, job, ranks):
    code, _, err, _ = run_job(job, ["--set", *BASE, small_data], ranks,
                              {"FEDMPI_FAULT": f"raise:rank={ranks - 1}:round=2"})
    ended = time.time()
    print(f"-n {ranks}: the job ended {ended - injected_at(err):.2f} s after the raise")
    assert code == 1 and err.count("Traceback") == 1, err
    assert ended - injected_at(err) < 30


@pytest.mark.parametrize("ranks,seconds", [(1, "inf"), (3, "nan"), (3, "1e9")])
def test_a_delay_beyond_its_bound_is_one_line_and_exit_2(small_data, job, ranks, seconds):
    code, _, err, j = run_job(job, ["--set", *BASE, small_data], ranks,
                              {"FEDMPI_FAULT": f"delay:rank=0:round=1:seconds={seconds}"}, timeout=120)
    errors = [line for line in err.splitlines() if line.startswith("fedmpi: error")]
    assert code == 2 and len(errors) == 1 and "FEDMPI_FAULT=" in errors[0], err
    assert "Traceback" not in err and not (j.run_dir / "metrics.jsonl").exists()


@pytest.mark.parametrize("ranks,value", [(1, "-1"), (3, ".inf")])
def test_a_bad_stall_timeout_is_one_line_naming_the_key(small_data, job, ranks, value):
    code, _, err, _ = run_job(job, ["--set", *BASE, small_data, f"stall_timeout_s={value}"], ranks, timeout=120)
    errors = [line for line in err.splitlines() if line.startswith("fedmpi: error")]
    assert code == 2 and len(errors) == 1 and "'stall_timeout_s'" in errors[0], err


# --- no mpi4py ---------------------------------------------------------------------------------------------

@pytest.fixture
def no_mpi4py(tmp_path):
    """PYTHONPATH with an mpi4py package that cannot be imported (as when its libmpi is missing)."""
    fake = tmp_path / "fake" / "mpi4py"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('libmpi.so.12: cannot open shared object file')\n")
    return {"PYTHONPATH": os.pathsep.join([str(fake.parent), str(ROOT)])}


@pytest.mark.parametrize("ranks", [2, 3])
def test_without_mpi4py_several_copies_under_a_launcher_are_refused(small_data, job, no_mpi4py, ranks):
    code, out, err, j = run_job(job, ["--set", *BASE, small_data], ranks, no_mpi4py, timeout=120)
    errors = [line for line in err.splitlines() if line.startswith("fedmpi: error")]
    assert code == 2 and len(errors) == 1, err
    assert "mpi4py cannot be imported (libmpi.so.12" in errors[0] and "started several processes" in errors[0]
    assert not j.run_dir.exists() and "round" not in out  # nothing ran, nothing was written


def test_without_mpi4py_one_copy_runs_alone(small_data, job, no_mpi4py):
    code, _, err, j = run_job(job, ["--set", *BASE, small_data], 1, no_mpi4py, timeout=120)
    assert code == 0, err
    info = json.loads((j.run_dir / "run.json").read_text())
    assert info["world_size"] == 1 and info["mpi_library"].startswith("none")

"""The fault suite: injected faults and bad input under real `mpirun -n 2` and `-n 4`.

Every case asserts the exit code, the message and what is left on disk; a generous timeout
catches a hang. No assertion depends on how fast a busy machine runs.
"""
import csv
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, SMALL, fedmpi, read_metrics
from shardfiles import CORRUPTIONS, corrupted

from fedmpi.errors import ConfigError
from fedmpi.runtime import faults

RANKS = [2, 4]
FAST = [*SMALL, "central_epochs=0"]  # the baseline is not under test here


def injected_at(stderr: str) -> float:
    """The unix time at which the fault fired, from the line maybe_inject prints."""
    found = re.findall(r"fedmpi: fault injection: \w+ on rank \d+, round \d+, at unix time ([\d.]+)", stderr)
    assert len(found) == 1, stderr
    return float(found[0])


def run_with_fault(small_data, out, ranks, spec, timeout=240):
    result = fedmpi(["run", "--set", *FAST, small_data, "--out", str(out)], ranks=ranks, timeout=timeout,
                    env={"FEDMPI_FAULT": spec})
    return result, time.time()


def assert_intact_after_fault_in_round_3(run_dir):
    """metrics.jsonl and metrics.csv parse whole and hold rounds 1..k in order.

    Round 1 is surely there: a rank reaches round 3 only after round 2's Allreduce, which rank 0
    enters after writing round 1. Round 2 may or may not be: the abort races rank 0's write of it.
    """
    jsonl = [r["round"] for r in read_metrics(run_dir)]
    with open(run_dir / "metrics.csv", newline="") as f:
        csv_rounds = [int(r["round"]) for r in csv.DictReader(f)]
    assert jsonl in ([1], [1, 2]) and csv_rounds in ([1], [1, 2])
    assert len(csv_rounds) <= len(jsonl)  # jsonl is replaced first, then csv


# --- the faults, one real job each -------------------------------------------------------------------

@pytest.mark.parametrize("ranks", RANKS)
def test_raise_on_one_rank_ends_the_job_with_that_rank_error_once(small_data, tmp_path, ranks):
    result, _ = run_with_fault(small_data, tmp_path, ranks, "raise:rank=1:round=3")
    assert result.returncode != 0
    assert result.stderr.count("RuntimeError: injected fault (FEDMPI_FAULT) on rank 1 in round 3") == 1
    assert result.stderr.count("Traceback") == 1 and f"rank 1/{ranks} failed; aborting the job" in result.stderr
    injected_at(result.stderr)  # the fault fired, once
    assert_intact_after_fault_in_round_3(tmp_path)


@pytest.mark.parametrize("ranks", RANKS)
def test_exit_on_one_rank_ends_the_job(small_data, tmp_path, ranks):
    result, _ = run_with_fault(small_data, tmp_path, ranks, f"exit:rank={ranks - 1}:round=3")
    # Open MPI's mpirun returns the rank's own code; MPICH's returns it or 9 (for the ranks it killed).
    assert result.returncode in (faults.EXIT_CODE, 9)
    injected_at(result.stderr)  # the fault fired, once
    assert_intact_after_fault_in_round_3(tmp_path)


@pytest.mark.parametrize("ranks", RANKS)
def test_sigkill_of_one_rank_ends_the_job_and_metrics_stay_intact(small_data, tmp_path, ranks):
    result, _ = run_with_fault(small_data, tmp_path, ranks, f"kill:rank={ranks - 1}:round=3")
    assert result.returncode != 0
    assert "Killed" in result.stdout + result.stderr  # the launcher's own report of the signal
    injected_at(result.stderr)  # the fault fired, once
    assert_intact_after_fault_in_round_3(tmp_path)


@pytest.mark.parametrize("ranks", RANKS)
def test_a_straggler_breaks_nothing(small_data, tmp_path, ranks):
    # How long the others waited is a timing, load-dependent: tools/bench_mpi.py measures such things.
    result, _ = run_with_fault(small_data, tmp_path, ranks, "delay:rank=1:round=2:seconds=2")
    assert result.returncode == 0, result.stderr
    injected_at(result.stderr)  # the delay fired, once
    rows = read_metrics(tmp_path)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(r["t_wait_max"] >= r["t_wait"] >= 0 for r in rows)
    assert all(r["test_acc"] is not None for r in rows)


# --- bad input: one line, exit code 2, fast, at every rank count -------------------------------------

@pytest.fixture(scope="module")
def broken_files(small_data, tmp_path_factory):
    """Each corruption of the small shard file, made once with h5py from the good file."""
    good = small_data.split("=", 1)[1]
    folder = tmp_path_factory.mktemp("broken")
    return {name: corrupted(good, name, folder / f"{name}.h5") for name in CORRUPTIONS}


def bad_input_cases():
    """(id, how to build the args from (small_data, broken_files, tmp_path), fragment of the message)."""
    cases = [(name, lambda d, b, t, name=name: ["--set", *FAST, f"data_file={b[name]}", "--out", str(t / "o")],
              fragment) for name, (_, fragment) in CORRUPTIONS.items()
             if name not in ("missing_attr", "test_label_negative", "offsets_float")]  # unit-tested, same path
    cases += [
        ("unwritable_out", lambda d, b, t: _unwritable_out(d, t), "cannot write there (Not a directory)"),
        ("more_ranks_than_nodes", lambda d, b, t: ["--set", *FAST, d, "nodes=1", "--out", str(t / "o")],
         "MPI ranks but only 1 nodes"),
        ("missing_data_dir", lambda d, b, t: ["--set", *FAST, "dataset=mnist", "data_dir=/nonexistent/dir",
                                              f"data_file={t}/absent.h5", "--out", str(t / "o")],
         "data_dir /nonexistent/dir does not exist"),
    ]
    return cases


def _unwritable_out(small_data, tmp_path):
    # As root, permissions do not stop a write; a directory below a regular file cannot exist for anyone.
    (tmp_path / "a-file").write_text("")
    return ["--set", *FAST, small_data, "--out", str(tmp_path / "a-file" / "run")]


CASES = bad_input_cases()


@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_naming_the_problem_and_exit_code_2(small_data, broken_files, tmp_path, case, ranks):
    name, build, fragment = case
    result = fedmpi(["run", *build(small_data, broken_files, tmp_path)], ranks=ranks, timeout=180)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("fedmpi: error")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr
    if name in broken_files:
        assert str(broken_files[name]) in errors[0]
    assert "Traceback" not in result.stderr


# --- fault specs and in-process behaviour --------------------------------------------------------------

def test_fault_specs_parse_into_faults():
    assert faults.parse("") == []
    assert faults.parse("raise:rank=1:round=2, delay:round=3:rank=0:seconds=0.5") == [
        faults.Fault("raise", round=2, rank=1), faults.Fault("delay", round=3, rank=0, seconds=0.5)]
    assert faults.parse("nan:node=7:round=1") == [faults.Fault("nan", round=1, node=7)]


@pytest.mark.parametrize("spec,fragment", [
    ("boom:rank=1:round=2", "unknown fault kind 'boom'"),
    ("raise:rank=1", "raise needs round="),
    ("nan:rank=1:round=2", "bad field 'rank=1' for nan"),
    ("exit:rank=1:round=2:seconds=3", "bad field 'seconds=3' for exit"),
    ("raise:rank=one:round=2", "must be integers"),
    ("delay:rank=1:round=2:seconds=-1", "values must be >= 0"),
    ("raise:rank=1:rank=2:round=1", "bad field 'rank=2'"),
])
def test_a_malformed_spec_is_a_config_error_naming_the_variable(spec, fragment):
    with pytest.raises(ConfigError) as info:
        faults.parse(spec)
    assert str(info.value).startswith(f"FEDMPI_FAULT={spec!r}") and fragment in str(info.value)


def test_poison_node_is_true_only_for_that_node_and_round(monkeypatch):
    monkeypatch.delenv("FEDMPI_FAULT", raising=False)
    assert not faults.poison_node(3, 2)
    monkeypatch.setenv("FEDMPI_FAULT", "nan:node=3:round=2,raise:rank=3:round=2")
    assert faults.poison_node(3, 2)
    assert not any(faults.poison_node(n, r) for n, r in [(3, 1), (2, 2), (4, 2), (3, 3)])
    faults.maybe_inject(0, 2)  # a nan fault does nothing to ranks; rank 3's raise is not rank 0's


def test_raise_and_delay_fire_only_on_their_rank_and_round(monkeypatch):
    monkeypatch.setenv("FEDMPI_FAULT", "raise:rank=1:round=2,delay:rank=0:round=1:seconds=0.3")
    faults.maybe_inject(0, 2)
    faults.maybe_inject(1, 1)
    start = time.monotonic()
    faults.maybe_inject(0, 1)
    assert time.monotonic() - start >= 0.3
    with pytest.raises(RuntimeError, match="injected fault .FEDMPI_FAULT. on rank 1 in round 2"):
        faults.maybe_inject(1, 2)


@pytest.mark.parametrize("kind,code", [("exit", faults.EXIT_CODE), ("kill", -signal.SIGKILL)])
def test_exit_and_kill_end_a_real_process(kind, code):
    script = ("from fedmpi.runtime import faults\nfaults.maybe_inject(0, 1)\nfaults.maybe_inject(2, 5)\n"
              "print('survived')")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env=dict(os.environ, FEDMPI_FAULT=f"{kind}:rank=2:round=5"))
    assert proc.returncode == code and "survived" not in proc.stdout
    assert f"fault injection: {kind} on rank 2, round 5" in proc.stderr

"""Metrics files survive a writer killed at any instant: a real process, SIGKILLed mid-write."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT

from fedmpi.output.metrics import MetricsWriter, describe_round, metrics_row, write_atomic, write_nodes_csv
from fedmpi.output.summary import summary

# The writer process stalls half-way through a write and is SIGKILLed there: every open() for
# writing is wrapped so that, in round KILL_AT, write() puts half its text on disk and then hangs.
WRITER = """
import builtins, io, os, sys, time
from pathlib import Path
real_open, state, KILL_AT = io.open, {"round": 0}, int(sys.argv[2])

class HalfThenHang:
    def __init__(self, f): self.f = f
    def __getattr__(self, name): return getattr(self.f, name)
    def __enter__(self): return self
    def __exit__(self, *exc): return self.f.__exit__(*exc)
    def write(self, text):
        if state["round"] == KILL_AT:
            self.f.write(text[:len(text) // 2]); self.f.flush(); os.fsync(self.f.fileno())
            print("mid-write", flush=True); time.sleep(60)
        return self.f.write(text)

def patched(file, mode="r", *args, **kwargs):
    f = real_open(file, mode, *args, **kwargs)
    return HalfThenHang(f) if set(mode) & set("wa") else f

builtins.open = io.open = patched
from fedmpi.output.summary import summary
from fedmpi.output.metrics import MetricsWriter
w = MetricsWriter(Path(sys.argv[1]))
for rnd in range(1, 10_000):
    state["round"] = rnd
    w.write({"round": rnd, "test_acc": 0.5, "blob": "x" * int(sys.argv[3])})
    print(rnd, flush=True)
"""


def check_intact(run_dir, acknowledged, blob):
    """Both files parse, hold rounds 1..k in order, and k covers every write the writer finished."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rounds = [json.loads(line)["round"] for line in lines]
    assert rounds == list(range(1, len(rounds) + 1))
    assert acknowledged <= len(rounds) <= acknowledged + 1
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["round"]) for r in rows] == list(range(1, len(rows) + 1))
    assert all(len(r["blob"]) == blob for r in rows)
    assert len(rounds) - 1 <= len(rows) <= len(rounds)  # jsonl is replaced first, then csv


def kill_writer(run_dir, kill_at, blob, delay=None):
    """Start the writer, SIGKILL it mid-write (or `delay` s after round 1); returns the rounds it finished."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(run_dir), str(kill_at), str(blob)],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        lines = []
        if delay is None:
            while not lines or lines[-1] != "mid-write":
                lines.append(proc.stdout.readline().strip())
                assert lines[-1], "the writer ended before reaching the write to interrupt"
        else:
            lines.append(proc.stdout.readline().strip())  # round 1 is written: the kill lands in a later write
            assert lines == ["1"], lines
            time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        lines += proc.communicate(timeout=30)[0].split()
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    return max([int(x) for x in lines if x.isdigit()], default=0)


@pytest.mark.parametrize("kill_at", [1, 3])
def test_a_writer_killed_mid_write_leaves_the_previous_version_intact(tmp_path, kill_at):
    done = kill_writer(tmp_path, kill_at, blob=1000)
    assert done == kill_at - 1
    check_intact(tmp_path, done, blob=1000)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == kill_at - 1  # exactly the old version


@pytest.mark.parametrize("delay", [0.4, 0.9])
def test_a_writer_killed_at_an_arbitrary_instant_keeps_every_finished_round(tmp_path, delay):
    check_intact(tmp_path, kill_writer(tmp_path, -1, blob=100_000, delay=delay), blob=100_000)


def test_rows_are_written_in_order_with_empty_cells_for_missing_values(tmp_path):
    writer = MetricsWriter(tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == "" and (tmp_path / "metrics.csv").read_text() == ""
    writer.write({"round": 1, "test_acc": None, "t": 0.5})
    writer.write({"round": 2, "test_acc": 0.75, "t": float("nan")})
    assert [json.loads(x)["round"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (tmp_path / "metrics.csv").read_text().splitlines() == ["round,test_acc,t", "1,,0.5", "2,0.75,"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv", "metrics.jsonl"]  # no temp files left


def block(first, rank, local, main):
    return dict(first=first, rank=rank, samples=np.full(len(local), 4), local_acc=np.array(local),
                main_on_local_acc=np.array(main))


def test_nodes_csv_is_sorted_by_node(tmp_path):
    parts = [block(2, 1, [0.5, np.nan], [0.25, 0.75]), block(0, 0, [0.5, 1.0], [np.nan, 0.5])]
    write_nodes_csv(tmp_path / "nodes.csv", parts, ["a", "b", "c", "d"])
    with open(tmp_path / "nodes.csv") as f:
        got = list(csv.DictReader(f))
    assert [r["node"] for r in got] == ["0", "1", "2", "3"] and got[0]["main_on_local_acc"] == ""
    assert [r["client_id"] for r in got] == ["a", "b", "c", "d"] and [r["rank"] for r in got] == ["0", "0", "1", "1"]
    assert got[3]["local_acc"] == "" and got[3]["main_on_local_acc"] == "0.75" and got[1]["samples"] == "4"


FULL_DISK_WRITER = """
import resource, sys
from pathlib import Path
from fedmpi.errors import OutputError
from fedmpi.output.summary import summary
from fedmpi.output.metrics import write_atomic
path = Path(sys.argv[1])
write_atomic(path, "old\\n")
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # python ignores SIGXFSZ: write() fails with EFBIG
try:
    write_atomic(path, b"x" * 100_000)
except OutputError as err:
    print(err)
"""


def test_a_failed_write_keeps_the_old_file_names_it_and_leaves_no_temp(tmp_path):
    """A real EFBIG (the file-size limit, as a full disk): one OutputError naming the file, the old file intact."""
    path = tmp_path / "m.bin"
    proc = subprocess.run([sys.executable, "-c", FULL_DISK_WRITER, str(path)], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"cannot write {path}: File too large"
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["m.bin"]


def test_an_interrupted_write_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "m.txt"
    write_atomic(path, "old\n")

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr("os.fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, "new\n")  # fails inside the write, after the temp file exists
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["m.txt"]


def test_a_planted_temp_symlink_is_replaced_not_followed(tmp_path):
    target, path = tmp_path / "victim", tmp_path / "m.txt"
    target.write_text("keep\n")
    (tmp_path / f".m.txt.{os.getpid()}.tmp").symlink_to(target)
    write_atomic(path, "new\n")
    assert target.read_text() == "keep\n" and path.read_text() == "new\n" and not path.is_symlink()


def one_rank(local_acc):
    s = summary(np.array(local_acc))
    return [dict(t_train=0.5, t_collective=0.01, nodes=len(local_acc), local=s, main_on_local=s)]


def test_the_console_line_shows_a_dash_when_no_local_split_was_scored():
    # No local test splits (test_per_node 0): every local accuracy is NaN, the row holds null.
    row = metrics_row(1, (0.5, 1.2), one_rank([np.nan, np.nan]), None, 1000, 1, 0.1, 1.0)
    assert row["local_acc_mean"] is None
    line = describe_round(row, 3)
    assert "local_acc   -  " in line and "0.0000" not in line
    scored = describe_round(metrics_row(1, (0.5, 1.2), one_rank([0.25, np.nan]), None, 1000, 1, 0.1, 1.0), 3)
    assert "local_acc 0.2500" in scored

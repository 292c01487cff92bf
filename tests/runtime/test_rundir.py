"""The run-directory checks in one process: the lock, what a new run clears, the refused-resume message.

The same checks under real `mpirun`, with real second jobs and full disks: tests/adversarial/test_run_dirs.py.
"""
import errno
import fcntl
import os

import pytest
import yaml

from fedmpi.config import Config
from fedmpi.errors import ConfigError
from fedmpi.runtime import checkpoint, rundir


@pytest.fixture
def fresh_locks():
    """Locks taken by a test are dropped after it (in a job they last until the process ends)."""
    yield
    while rundir._held:
        os.close(rundir._held.pop())


def test_the_lock_holds_against_a_second_open_and_names_its_holder(tmp_path, fresh_locks):
    rundir.lock(tmp_path, "--out")
    assert (tmp_path / ".lock").read_text().startswith(f"pid {os.getpid()} on ")
    with pytest.raises(ConfigError, match=f"--out {tmp_path} is in use by another fedmpi job \\(pid {os.getpid()} on "):
        rundir.lock(tmp_path, "--out")  # flock belongs to the open file: a second open is a second job
    os.close(rundir._held.pop())
    rundir.lock(tmp_path, "--out")  # released with its descriptor, as the kernel does when a job dies


def test_a_holder_line_from_a_hostile_lock_file_stays_one_short_line(tmp_path, fresh_locks):
    fd = os.open(tmp_path / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"\x1b[2Jevil\rline" + b"x" * 5000 + b"\nsecond line")
    try:
        with pytest.raises(ConfigError) as refused:
            rundir.lock(tmp_path, "--out")
    finally:
        os.close(fd)
    message = str(refused.value)
    assert "(?[2Jevil?linexxx" in message and "\r" not in message and "second" not in message
    assert len(message) < 300


def test_without_lock_support_the_run_goes_on_with_a_warning(tmp_path, monkeypatch, capsys, fresh_locks):
    def no_locks(fd, how):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    rundir.lock(tmp_path, "--out")
    warning = capsys.readouterr().err
    assert warning.startswith(f"fedmpi: warning: --out {tmp_path}: its file system refuses locks (No locks")
    assert "nothing stops a second job" in warning


def test_a_new_run_clears_the_previous_runs_files_and_nothing_else(tmp_path):
    for name in ("model.pt", "metrics.jsonl", "nodes.csv", ".metrics.csv.123.tmp", "notes.txt", "report.md"):
        (tmp_path / name).write_text("x")
    (tmp_path / "checkpoint.old").mkdir()
    (tmp_path / "checkpoint.old" / "meta.json").write_text("{}")
    (tmp_path / "central.json").symlink_to(tmp_path / "notes.txt")
    rundir.clear_previous(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "report.md"]
    assert (tmp_path / "notes.txt").read_text() == "x"  # a link is removed, never what it points to


def test_a_refused_resume_names_old_and_new_values_of_the_changed_keys(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(Config().to_dict()))
    rundir.check_resume_config(tmp_path, Config(rounds=50, device="cpu"))  # free keys may change
    with pytest.raises(ConfigError) as refused:
        rundir.check_resume_config(tmp_path, Config(lr=0.5, seed=3))
    message = str(refused.value)
    assert "--set changes lr 0.01 -> 0.5, seed 0 -> 3, which the checkpoint depends on" in message
    assert "may change only " + ", ".join(checkpoint.FREE_KEYS) in message


def test_a_stored_value_quoted_in_a_message_is_cut_short():
    assert checkpoint.short("x" * 1000) == repr("x" * 1000)[:37] + "..."
    assert checkpoint.short(12) == "12"

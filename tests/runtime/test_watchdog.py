"""The watchdog in one process: its stall check, the heartbeat files, who reports, what it leaves behind.

The real thing (MPI_Abort of a real job, frozen and stuck ranks) is in tests/adversarial/test_faults_signals.py.
"""
import json
import os
import threading
import time

import pytest

from fedmpi.runtime import watchdog
from fedmpi.runtime.watchdog import MARKER, STALL_EXIT_CODE, Beat, Watchdog, interval_for, read_beat

T = 0.6  # seconds without progress that count as a stall here
CALM = 2.0  # the timeout where nothing may fire: a busy machine may pause this process for a while


class Recorder:
    """Stands in for comm.abort: remembers the code and stops the watchdog's thread."""

    def __init__(self):
        self.codes, self.watch = [], None

    def __call__(self, code):
        self.codes.append(code)
        self.watch._closed.set()


def make(folder, rank=0, size=1, timeout=T):
    rec = Recorder()
    watch = Watchdog(folder, rank, size, timeout, rec, backstop=False)
    rec.watch = watch
    return watch, rec


def wait_until(check, timeout=20):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the time limit"
        time.sleep(0.02)


def write_beat(folder, rank, age=0.0, idle=0.0, waiting=None, stage="training", rnd=2):
    folder.mkdir(exist_ok=True)
    now = time.time()
    beat = Beat(rank, 4242, stage, rnd, waiting, now - idle, now - age)
    tmp = folder / f".rank-{rank}.test.tmp"  # replaced whole, as the watchdog writes: a reader never sees half
    tmp.write_text(json.dumps(beat.__dict__))
    os.replace(tmp, folder / f"rank-{rank}.json")


def test_interval_is_a_tenth_of_the_timeout_within_bounds():
    assert interval_for(300) == 10 and interval_for(30) == 3 and interval_for(1) == 0.2


def test_a_rank_without_progress_reports_itself_with_its_stage(tmp_path, capsys):
    watch, rec = make(tmp_path / "hb")
    watch.start()
    watch.set_stage("training", 3)
    wait_until(lambda: rec.codes)
    assert rec.codes == [STALL_EXIT_CODE]
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"fedmpi: error: rank 0/1 made no progress for {lines[0].split(' for ')[1].split()[0]} s "
                     f"(stage: training, round 3); ending the job"]
    watch.close()


def test_progress_keeps_a_slow_stage_alive(tmp_path):
    watch, rec = make(tmp_path / "hb", timeout=CALM)
    watch.start()
    watch.set_stage("training the centralized baseline")
    end = time.monotonic() + 3 * CALM
    while time.monotonic() < end:  # 3 timeouts long, but moving
        watchdog_progress(watch)
        time.sleep(0.05)
    assert rec.codes == []
    watch.close()


def watchdog_progress(watch):
    watch.last = time.monotonic()  # what watchdog.progress() does for the active watchdog


def test_a_waiting_rank_does_not_blame_itself_while_its_peer_moves(tmp_path):
    folder = tmp_path / "hb"
    watch, rec = make(folder, rank=1, size=2, timeout=CALM)
    watch.start()
    watch.waiting = "allreduce"
    end = time.monotonic() + 3 * CALM
    while time.monotonic() < end:
        write_beat(folder, 0, stage="preparing the shard file", rnd=None)  # rank 0 alive and working
        time.sleep(0.05)
    assert rec.codes == []
    watch.close()


def test_a_waiting_rank_names_a_frozen_peer(tmp_path, capsys):
    folder = tmp_path / "hb"
    watch, rec = make(folder, rank=1, size=2)
    watch.start()
    watch.waiting = "allreduce"
    write_beat(folder, 0, age=5 * T, idle=5 * T, stage="training", rnd=4)  # nothing written for 5 timeouts
    wait_until(lambda: rec.codes)
    err = capsys.readouterr().err
    assert err.count("fedmpi: error:") == 1 and "rank 0/2 made no progress for" in err
    assert "(stage: training, round 4); ending the job" in err
    assert (folder / MARKER).read_text() == err  # the marker holds the one line printed
    watch.close()


def test_a_waiting_rank_gives_a_stuck_but_alive_peer_time_to_report_itself(tmp_path, capsys):
    folder = tmp_path / "hb"
    watch, rec = make(folder, rank=1, size=2)
    watch.start()
    watch.waiting = "barrier"
    started = time.monotonic()
    while not rec.codes:  # rank 0's heartbeat stays fresh, its progress does not: its own check should fire
        write_beat(folder, 0, idle=time.monotonic() - started, stage="writing the checkpoint", rnd=1)
        time.sleep(T / 10)
        assert time.monotonic() - started < 20
    # ... and when it does not within three more intervals, the waiting rank names it.
    assert time.monotonic() - started >= T + 3 * watch.interval - 0.1
    assert "rank 0/2 made no progress" in capsys.readouterr().err
    watch.close()


def test_a_peer_that_never_wrote_a_heartbeat_is_named_as_not_started(tmp_path, capsys):
    watch, rec = make(tmp_path / "hb", rank=0, size=3)
    watch.start()
    watch.waiting = "barrier"
    while not rec.codes:  # rank 1 waits too, alive; rank 2 never wrote anything
        write_beat(tmp_path / "hb", 1, waiting="barrier")
        time.sleep(T / 10)
    err = capsys.readouterr().err
    assert "rank 2/3 made no progress" in err and "(stage: starting (no heartbeat))" in err
    watch.close()


def test_when_every_rank_waits_rank_0_names_the_one_waiting_longest(tmp_path, capsys):
    folder = tmp_path / "hb"
    watch, rec = make(folder, rank=0, size=2)
    watch.start()
    watch.waiting = "allreduce"
    while not rec.codes:
        write_beat(folder, 1, idle=60, waiting="barrier", stage="writing the checkpoint", rnd=2)
        time.sleep(T / 10)
    err = capsys.readouterr().err
    assert "rank 1/2 made no progress for 60 s (stage: writing the checkpoint, round 2; waiting in barrier)" in err
    watch.close()


def test_only_the_first_of_two_reporting_ranks_prints(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(watchdog, "CLAIMED_WAIT_S", 0.0)
    folder = tmp_path / "hb"
    folder.mkdir()
    watches = [make(folder, rank=r, size=2) for r in (0, 1)]
    for watch, _ in watches:
        watch.start()
    for watch, _ in watches:
        watch.set_stage("training", 1)
    wait_until(lambda: all(rec.codes for _, rec in watches))
    assert capsys.readouterr().err.count("made no progress") == 1
    assert [rec.codes for _, rec in watches] == [[STALL_EXIT_CODE]] * 2  # both end; the loser silently
    for watch, _ in watches:
        watch.close()


def test_heartbeats_name_pid_stage_and_are_removed_by_the_last_rank_to_close(tmp_path):
    folder = tmp_path / "hb"
    a, _ = make(folder, rank=0, size=2, timeout=30)
    b, _ = make(folder, rank=1, size=2, timeout=30)
    a.start()
    b.start()
    b.set_stage("evaluating", 7)
    beat = read_beat(folder / "rank-1.json")  # written by the stage change itself: a rank that blocks next is named
    assert (beat.rank, beat.pid, beat.stage, beat.round, beat.waiting) == (1, os.getpid(), "evaluating", 7, None)
    a.close()
    assert sorted(p.name for p in folder.iterdir()) == ["rank-1.json"]  # rank 1 still runs
    b.close()
    assert not folder.exists()


def test_close_leaves_another_process_heartbeat_alone(tmp_path):
    folder = tmp_path / "hb"
    watch, _ = make(folder, rank=0, size=1, timeout=30)
    watch.start()
    write_beat(folder, 0)  # the same rank of another job (pid 4242) has taken the file over
    watch.close()
    assert read_beat(folder / "rank-0.json").pid == 4242


def test_rank_0_clears_an_old_marker_and_heartbeats_of_ranks_beyond_this_job(tmp_path):
    folder = tmp_path / "hb"
    for r in (0, 1, 5):
        write_beat(folder, r)
    (folder / MARKER).write_text("old\n")
    watch, _ = make(folder, rank=0, size=2, timeout=30)
    watch.start()
    assert sorted(p.name for p in folder.iterdir()) == ["rank-0.json", "rank-1.json"]
    watch.close()


def test_no_heartbeat_folder_is_made_without_a_run_directory(tmp_path):
    watch, _ = make(tmp_path / "absent" / "hb", timeout=30)
    watch.start()
    time.sleep(0.3)
    watch.close()
    assert not (tmp_path / "absent").exists()


@pytest.mark.parametrize("content", [b"", b"not json", b"[1, 2]", b'{"rank": 1}', b"x" * 100_000,
                                     json.dumps(dict(rank=1, pid=2, stage=3, round=None, waiting=None, progress=1.0,
                                                     written=1.0)).encode()])
def test_a_malformed_heartbeat_reads_as_none(tmp_path, content):
    path = tmp_path / "rank-1.json"
    path.write_bytes(content)
    assert read_beat(path) is None


def test_a_fifo_or_symlink_heartbeat_reads_as_none_at_once(tmp_path):
    os.mkfifo(tmp_path / "rank-1.json")  # a plain open() would block here forever
    write_beat(tmp_path / "real", 2)
    os.symlink(tmp_path / "real" / "rank-2.json", tmp_path / "rank-2.json")
    done = []
    reader = threading.Thread(target=lambda: done.extend(read_beat(tmp_path / f"rank-{r}.json") for r in (1, 2)))
    reader.start()
    reader.join(timeout=10)
    assert done == [None, None]


def test_off_means_no_thread_and_no_files(tmp_path):
    class Comm:
        rank, size = 0, 1

        def abort(self, code):
            raise AssertionError("no abort without a watchdog")

    off = watchdog.start(tmp_path, Comm(), 0)
    watchdog.stage("training", 1)
    watchdog.progress()
    with watchdog.waiting("allreduce"):
        pass
    off.close()
    assert list(tmp_path.iterdir()) == []


def test_waiting_marks_the_active_watchdog_and_progress_after(tmp_path, monkeypatch):
    watch, _ = make(tmp_path / "hb", timeout=30)
    monkeypatch.setattr(watchdog, "_ACTIVE", watch)
    watch.last = 0.0
    with watchdog.waiting("gather"):
        assert watch.beat().waiting == "gather"
    assert watch.waiting is None and time.monotonic() - watch.last < 5
    watchdog.stage("evaluating", 2)
    assert (watch.stage, watch.round) == ("evaluating", 2)

"""Hostile run directories under real `mpirun` at -n 1 and -n 3: refused resumes, finished and unfinished
runs with and without --overwrite, a directory in use by another job (or a killed one), full disks,
unusable directories, a stop signal in the last round.

Every case asserts the exit code, exactly one error line naming the file, key or flag, no traceback,
that the job ended well inside its timeout, and what is on disk afterwards (nothing changed, nothing
half-written, no temp file left behind).
"""
import fcntl
import json
import os
import shutil
import signal

import pytest
import torch
from conftest import SMALL, fedmpi, read_metrics
from rundirs import (
    RANKS,
    RUN,
    assert_refused,
    crashed_run,
    kill_ranks,
    lock_holder,
    no_temp_files,
    running,
    snapshot,
    wait_for,
)


@pytest.fixture(scope="module")
def checkpointed(small_data, tmp_path_factory):
    return crashed_run(small_data, tmp_path_factory.mktemp("checkpointed"))


@pytest.fixture
def run_copy(checkpointed, tmp_path):
    """A fresh copy of the crashed run."""
    return shutil.copytree(checkpointed, tmp_path / "run", symlinks=True)


# --- refused resumes write nothing ------------------------------------------------------------------------

@pytest.mark.parametrize("ranks", RANKS)
def test_a_refused_resume_leaves_config_yaml_byte_identical_and_a_plain_resume_still_works(run_copy, ranks):
    before = snapshot(run_copy)
    result = fedmpi(["run", "--resume", str(run_copy), "--set", "lr=0.5", "rounds=3"], ranks=ranks)
    assert_refused(result, f"--resume {run_copy}: --set changes lr 0.01 -> 0.5, which the checkpoint depends on",
                   "a resumed run may change only rounds, eval_every, ")
    assert snapshot(run_copy) == before
    result = fedmpi(["run", "--resume", str(run_copy)], ranks=ranks)
    assert result.returncode == 0, result.stderr
    assert [r["round"] for r in read_metrics(run_copy)] == [1, 2] and (run_copy / "model.pt").is_file()


@pytest.mark.parametrize("ranks", RANKS)
def test_a_resume_changing_many_keys_names_a_few_and_counts_the_rest(run_copy, ranks):
    long = "/".join(["x" * 200] * 15)  # 3,000 characters: within --set's cap, far beyond what a message quotes
    result = fedmpi(["run", "--resume", str(run_copy), "--set", "seed=7", "momentum=0.5", "batch_size=4",
                     "prox_mu=0.1", "fraction=0.5", f"data_file=/tmp/{long}.h5"], ranks=ranks)
    assert_refused(result, "--set changes data_file ",
                   "..., batch_size 8 -> 4, momentum 0.9 -> 0.5, seed 0 -> 7 and 2 more")
    assert long not in result.stderr


@pytest.mark.parametrize("ranks", RANKS)
def test_overwrite_does_not_go_with_resume(run_copy, ranks):
    before = snapshot(run_copy)
    assert_refused(fedmpi(["run", "--resume", str(run_copy), "--overwrite"], ranks=ranks),
                   "drop --config, --out and --overwrite")
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("ranks", RANKS)
def test_a_changed_free_key_rewrites_config_yaml_whole(run_copy, ranks):
    result = fedmpi(["run", "--resume", str(run_copy), "--set", "rounds=3"], ranks=ranks)
    assert result.returncode == 0, result.stderr
    assert "rounds: 3\n" in (run_copy / "config.yaml").read_text() and no_temp_files(run_copy)
    assert [r["round"] for r in read_metrics(run_copy)] == [1, 2, 3]


# --- a finished run, an unfinished one -------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(small_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("finished")
    result = fedmpi(["run", "--set", *RUN, small_data, "--out", str(run_dir)], ranks=2)
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.mark.parametrize("ranks", RANKS)
def test_a_finished_run_is_replaced_only_with_overwrite(small_data, finished, tmp_path, ranks):
    run_dir = shutil.copytree(finished, tmp_path / "run")
    before = snapshot(run_dir)
    args = ["run", "--set", *SMALL, "central_epochs=0", "lr=0.02", small_data, "--out", str(run_dir)]
    assert_refused(fedmpi(args, ranks=ranks), f"--out {run_dir} holds a finished run (model.pt)", "--overwrite")
    assert snapshot(run_dir) == before
    result = fedmpi([*args, "--overwrite"], ranks=ranks)
    assert result.returncode == 0, result.stderr
    assert [r["round"] for r in read_metrics(run_dir)] == [1, 2, 3]  # SMALL's 3 rounds, not the old 2
    assert not (run_dir / "checkpoint").exists()  # the old run's checkpoint went with it
    old, new = (torch.load(d / "model.pt", weights_only=True) for d in (finished, run_dir))
    assert not all(torch.equal(old[k], new[k]) for k in old)


@pytest.mark.parametrize("ranks", RANKS)
def test_an_unfinished_runs_checkpoint_is_kept_unless_overwrite(small_data, run_copy, ranks):
    before = snapshot(run_copy)
    args = ["run", "--set", *RUN, "checkpoint_every=0", small_data, "--out", str(run_copy)]
    assert_refused(fedmpi(args, ranks=ranks), "holds a checkpoint of an unfinished run",
                   f"--resume {run_copy}", "--overwrite")
    assert snapshot(run_copy) == before
    result = fedmpi([*args, "--overwrite"], ranks=ranks)
    assert result.returncode == 0, result.stderr
    assert not (run_copy / "checkpoint").exists() and (run_copy / "model.pt").is_file()


# --- one job per run directory -------------------------------------------------------------------------

def hold_lock(run_dir):
    """The test process holds RUN_DIR/.lock as a running job's rank 0 would."""
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.ftruncate(fd, 0)
    os.write(fd, b"pid 4242 on somehost since 2030-01-01 00:00:00\n")
    return fd


@pytest.mark.parametrize("ranks", RANKS)
def test_a_run_directory_in_use_is_refused_before_anything_is_written(small_data, run_copy, ranks):
    fd = hold_lock(run_copy)
    try:
        before = snapshot(run_copy, skip=())
        for args in (["--resume", str(run_copy)], ["--set", *RUN, small_data, "--out", str(run_copy), "--overwrite"]):
            result = fedmpi(["run", *args], ranks=ranks)
            assert_refused(result, f"{run_copy} is in use by another fedmpi job (pid 4242 on somehost")
            assert snapshot(run_copy, skip=()) == before
    finally:
        os.close(fd)
    result = fedmpi(["run", "--resume", str(run_copy)], ranks=ranks)  # free again: the same resume works
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("ranks", RANKS)
def test_a_second_job_is_refused_and_a_killed_jobs_lock_does_not_outlive_it(small_data, tmp_path, ranks):
    run_dir = tmp_path / "run"
    args = ["run", "--set", *RUN, "checkpoint_every=0", small_data, "--out", str(run_dir)]
    with running(args, ranks, "delay:rank=0:round=1:seconds=60") as first:
        wait_for(lambda: (run_dir / "run.json").exists(), first, "the first job set up")
        second = fedmpi(args, ranks=ranks)
        assert_refused(second, f"--out {run_dir} is in use by another fedmpi job (pid {lock_holder(run_dir)} on ")
        kill_ranks(str(run_dir))  # the first job dies without any cleanup
        first.communicate(timeout=60)
    third = fedmpi(args, ranks=ranks)
    assert third.returncode == 0, third.stderr
    assert [r["round"] for r in read_metrics(run_dir)] == [1, 2]


# --- a full disk ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("ranks", RANKS)
def test_a_full_disk_at_model_pt_keeps_every_row_and_leaves_no_half_model(small_data, tmp_path, ranks):
    run_dir = tmp_path / "run"
    result = fedmpi(["run", "--set", *RUN, "checkpoint_every=0", small_data, "--out", str(run_dir)], ranks=ranks,
                    max_file_bytes=600_000)  # model.pt is 799 KB
    assert_refused(result, f"cannot write {run_dir}/model.pt: File too large")
    assert [r["round"] for r in read_metrics(run_dir)] == [1, 2]
    assert not (run_dir / "model.pt").exists() and no_temp_files(run_dir)


@pytest.mark.parametrize("ranks", RANKS)
def test_a_full_disk_at_the_metrics_keeps_the_rows_written_so_far(small_data, tmp_path, ranks):
    """Rows of about 1 KB against a 2.5 KB limit: a round from the second on finds metrics.jsonl full
    while the other ranks are already in the next round's Allreduce."""
    run_dir = tmp_path / "run"
    result = fedmpi(["run", "--set", *RUN, "rounds=6", "checkpoint_every=0", small_data, "--out", str(run_dir)],
                    ranks=ranks, max_file_bytes=2500)
    assert_refused(result, f"cannot write {run_dir}/metrics.", "File too large")
    rounds = [r["round"] for r in read_metrics(run_dir)]
    assert rounds == list(range(1, len(rounds) + 1)) and 1 <= len(rounds) < 6
    assert not (run_dir / "model.pt").exists() and no_temp_files(run_dir)


@pytest.mark.parametrize("ranks", RANKS)
def test_a_full_disk_at_a_checkpoint_keeps_the_last_one_and_the_rows(run_copy, ranks):
    """Round 2's checkpoint cannot be written (node files are 2.4-6.4 MB): round 1's stays, as do rows 1 and 2."""
    result = fedmpi(["run", "--resume", str(run_copy)], ranks=ranks, max_file_bytes=1_200_000)
    assert_refused(result, f"cannot write {run_copy}/checkpoint.tmp/nodes-0-", "File too large",
                   "the last complete checkpoint is kept")
    assert json.loads((run_copy / "checkpoint" / "meta.json").read_text())["round"] == 1
    assert [r["round"] for r in read_metrics(run_copy)] == [1, 2] and no_temp_files(run_copy)
    assert not (run_copy / "model.pt").exists()
    result = fedmpi(["run", "--resume", str(run_copy)], ranks=ranks)  # room again: the same resume finishes
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def three_nodes(tmp_path_factory):
    """A shard file of 3 nodes: at -n 1 the node file (2.4 MB) is smaller than fedadam's main.pt (4 MB)."""
    path = tmp_path_factory.mktemp("three") / "three.h5"
    result = fedmpi(["prepare", "--set", *SMALL, "nodes=3", f"data_file={path}"])
    assert result.returncode == 0, result.stderr
    return [*SMALL, "nodes=3", f"data_file={path}", "central_epochs=0", "rounds=2", "checkpoint_every=1"]


@pytest.mark.parametrize("ranks", RANKS)
def test_a_full_disk_at_main_pt_removes_the_half_built_checkpoint(three_nodes, tmp_path, ranks):
    run_dir = tmp_path / "run"
    result = fedmpi(["run", "--set", *three_nodes, "server_opt=fedadam", "--out", str(run_dir)], ranks=ranks,
                    max_file_bytes=3_000_000)
    assert_refused(result, f"cannot write {run_dir}/checkpoint.tmp/main.pt: File too large")
    assert [r["round"] for r in read_metrics(run_dir)] == [1]
    assert not (run_dir / "checkpoint").exists() and no_temp_files(run_dir)


@pytest.mark.parametrize("ranks", RANKS)
def test_a_full_disk_at_config_yaml_on_resume_keeps_the_old_one(run_copy, ranks):
    before = snapshot(run_copy)
    result = fedmpi(["run", "--resume", str(run_copy), "--set", "rounds=3"], ranks=ranks, max_file_bytes=300)
    assert_refused(result, f"cannot write {run_copy}/config.yaml: File too large")
    assert snapshot(run_copy) == before and no_temp_files(run_copy)


@pytest.mark.parametrize("ranks", RANKS)
def test_a_full_disk_at_config_yaml_of_a_new_run_leaves_nothing_half(small_data, tmp_path, ranks):
    run_dir = tmp_path / "run"
    result = fedmpi(["run", "--set", *RUN, small_data, "--out", str(run_dir)], ranks=ranks, max_file_bytes=300)
    assert_refused(result, f"cannot write {run_dir}/config.yaml: File too large")
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]


# --- run directories that cannot be used ---------------------------------------------------------------

def below_a_file(tmp_path):
    (tmp_path / "a-file").write_text("")
    return tmp_path / "a-file" / "run", "cannot write there (Not a directory)"


def is_a_file(tmp_path):
    (tmp_path / "a-file").write_text("keep")
    return tmp_path / "a-file", "cannot write there (File exists)"


def lock_is_a_symlink(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "victim").write_text("keep")
    (tmp_path / "run" / ".lock").symlink_to(tmp_path / "victim")
    return tmp_path / "run", "cannot write there (" + str(tmp_path / "run" / ".lock")


def lock_is_a_directory(tmp_path):
    (tmp_path / "run" / ".lock").mkdir(parents=True)
    return tmp_path / "run", "Is a directory"


def lock_is_a_hard_link(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "victim").write_text("keep")
    os.link(tmp_path / "victim", tmp_path / "run" / ".lock")
    return tmp_path / "run", ".lock is not a plain file"


UNUSABLE = [below_a_file, is_a_file, lock_is_a_symlink, lock_is_a_directory, lock_is_a_hard_link]


@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize("make", UNUSABLE, ids=[f.__name__ for f in UNUSABLE])
def test_an_unusable_run_directory_is_one_line_and_nothing_outside_it_changes(small_data, tmp_path, make, ranks):
    out, fragment = make(tmp_path)
    before = snapshot(tmp_path, skip=())
    result = fedmpi(["run", "--set", *RUN, small_data, "--out", str(out)], ranks=ranks)
    assert_refused(result, f"--out {out}", fragment)
    assert snapshot(tmp_path, skip=()) == before


# --- a stop signal in the last round -------------------------------------------------------------------

@pytest.mark.parametrize("ranks", RANKS)
def test_a_stop_signal_in_the_last_round_finishes_the_run(small_data, tmp_path, ranks):
    """SIGTERM reaches rank 0 while the delay fault holds it in round 2 of 2, before its stop vote: the run is
    complete, so exit 0 with model.pt, not 75. (Were the signal to come after the vote, on a machine stalled
    for 10 s, the run would end the same way, only without a stop vote.)"""
    run_dir = tmp_path / "run"
    args = ["run", "--set", *RUN, "checkpoint_every=0", small_data, "--out", str(run_dir)]
    err = tmp_path / "stderr.txt"
    with running(args, ranks, "delay:rank=0:round=2:seconds=10", stderr_file=err) as job:
        # The delay's own line: rank 0 has trained round 2 and sits before its vote (a busy machine may take
        # seconds from round 1's metrics row to there, and a signal in training abandons the round instead).
        wait_for(lambda: "fault injection: delay on rank 0, round 2" in err.read_text(), job, "the delay")
        os.kill(lock_holder(run_dir), signal.SIGTERM)
        job.communicate(timeout=90)
    assert job.returncode == 0, err.read_text()
    assert [r["round"] for r in read_metrics(run_dir)] == [1, 2] and (run_dir / "model.pt").is_file()
    assert not (run_dir / "checkpoint").exists()

"""Hostile run directories and checkpoints, under real `mpirun` at -n 1 and -n 3.

Every case asserts the exit code, exactly one error line naming the file, key or flag, no traceback,
that the job ended well inside its timeout, and what is on disk afterwards (nothing changed, nothing
half-written, no temp file left behind).
"""
import hashlib
import json
import os
import stat

import pytest
import torch
from conftest import SMALL, fedmpi, read_metrics

RANKS = [1, 3]
RUN = [*SMALL, "central_epochs=0", "rounds=2", "checkpoint_every=1", "server_opt=fedavgm"]
P = 199_210  # parameters of the 2nn on 28x28 inputs
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


@pytest.fixture(scope="module")
def checkpointed(small_data, tmp_path_factory):
    """A run that crashed in round 2 at -n 2, leaving round 1's checkpoint: nodes-0-4.pt and nodes-4-8.pt."""
    run_dir = tmp_path_factory.mktemp("checkpointed")
    result = fedmpi(["run", "--set", *RUN, small_data, "--out", str(run_dir)], ranks=2,
                    env={"FEDMPI_FAULT": "raise:rank=0:round=2"})
    assert result.returncode != 0
    meta = json.loads((run_dir / "checkpoint" / "meta.json").read_text())
    assert meta["round"] == 1 and sorted(meta["node_files"]) == ["nodes-0-4.pt", "nodes-4-8.pt"]
    return run_dir


@pytest.fixture
def run_copy(checkpointed, tmp_path):
    """A fresh copy of the crashed run to corrupt."""
    import shutil

    return shutil.copytree(checkpointed, tmp_path / "run", symlinks=True)


def unblock(fifo):
    """Release a reader stuck on `fifo` (only if the code under test regressed), so no rank is left behind."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


def make_fifo(path):
    path.unlink()
    os.mkfifo(path)


# --- meta.json -----------------------------------------------------------------------------------------

def edit_meta(**fields):
    def edit(folder):
        meta = json.loads((folder / "meta.json").read_text())
        for key, value in fields.items():
            if value is KeyError:
                del meta[key]
            else:
                meta[key] = value
        (folder / "meta.json").write_text(json.dumps(meta))
    return edit


def raw_meta(text):
    def edit(folder):
        (folder / "meta.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    return edit


def round_as(literal):
    """meta.json with the round written as `literal`, verbatim (1e999 is not something json.dumps writes)."""
    def edit(folder):
        meta = json.loads((folder / "meta.json").read_text())
        meta["round"] = "@ROUND@"
        (folder / "meta.json").write_text(json.dumps(meta).replace('"@ROUND@"', literal))
    return edit


def huge_meta(folder):
    with open(folder / "meta.json", "r+b") as f:
        f.truncate(100 << 20)  # sparse: 100 MiB on paper, nothing on disk


def fifo_meta(folder):
    make_fifo(folder / "meta.json")


META_CASES = [
    ("round_1e999", round_as("1e999"), "'round' must be an integer >= 0, got inf"),
    ("round_negative", round_as("-5"), "'round' must be an integer >= 0, got -5"),
    ("round_string", round_as('"1"'), "'round' must be an integer >= 0, got '1'"),
    ("round_bool", round_as("true"), "got True"),
    ("round_beyond_rounds", edit_meta(round=7), "holds 7 rounds, more than rounds=2: resume with --set rounds=7"),
    ("round_missing", edit_meta(round=KeyError), "no 'round' field"),
    ("identity_not_string", edit_meta(identity=12), "'identity' must be a string, got 12"),
    ("identity_other", edit_meta(identity="0123456789abcdef"), "was made with another config"),
    ("node_files_missing", edit_meta(node_files=KeyError), "no 'node_files' field"),
    ("node_files_garbage", edit_meta(node_files="garbage"), "'node_files' must be a non-empty list"),
    ("node_files_path", edit_meta(node_files=["../../../etc/passwd"]), "not a nodes-A-B.pt name"),
    ("node_files_gap", edit_meta(node_files=["nodes-0-4.pt"]), "'node_files' end at node 4, the run has 8"),
    ("node_files_overlap", edit_meta(node_files=["nodes-0-4.pt", "nodes-3-8.pt"]), "do not cover nodes 0..7"),
    ("metrics_not_list", edit_meta(metrics={"round": 1}), "'metrics' must be a list of rows, got dict"),
    ("metrics_row_not_object", edit_meta(metrics=[1]), "'metrics' row 1 is not a JSON object"),
    ("metrics_row_misnumbered", edit_meta(metrics=[{"round": 2}]), "'metrics' row 1 is not a JSON object"),
    ("meta_not_object", raw_meta("[1, 2]"), "not a JSON object (got list)"),
    ("meta_not_json", raw_meta("{not json"), "meta.json is corrupt (not JSON: JSONDecodeError)"),
    ("meta_deep_nesting", raw_meta("[" * 200_000), "meta.json is corrupt (not JSON: RecursionError)"),
    ("meta_not_utf8", raw_meta(b'{"round": "\xff\xfe"}'), "meta.json is corrupt (not JSON: UnicodeDecodeError)"),
    ("meta_huge", huge_meta, "meta.json holds 104,857,600 bytes, more than the 67,108,864"),
    ("meta_fifo", fifo_meta, "meta.json is not a regular file"),
]


@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize("case", META_CASES, ids=[c[0] for c in META_CASES])
def test_a_bad_meta_json_is_one_line_and_changes_nothing(run_copy, case, ranks):
    _, corrupt, fragment = case
    corrupt(run_copy / "checkpoint")
    before = snapshot(run_copy)
    try:
        result = fedmpi(["run", "--resume", str(run_copy)], ranks=ranks, timeout=120)
    finally:
        unblock(run_copy / "checkpoint" / "meta.json")
    assert_refused(result, fragment, f"{run_copy}/checkpoint")
    assert snapshot(run_copy) == before and no_temp_files(run_copy)


# --- main.pt and the node files ---------------------------------------------------------------------------

class RunsCode:
    """Unpickling this would run a shell command; weights_only=True must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def edit_pt(name, change):
    def edit(folder):
        state = torch.load(folder / name, weights_only=True)
        torch.save(change(state, folder), folder / name)
    return edit


def replace(key, value, inner=None):
    def change(state, folder):
        target = state if inner is None else state[inner]
        if value is KeyError:
            del target[key]
        else:
            target[key] = value(folder) if callable(value) else value
        return state
    return change


def truncate(name):
    def edit(folder):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[:len(data) // 2])
    return edit


def fifo(name):
    def edit(folder):
        make_fifo(folder / name)
    return edit


def huge(name):
    def edit(folder):
        with open(folder / name, "r+b") as f:
            f.truncate(1 << 30)  # sparse
    return edit


def device_link(name):
    def edit(folder):
        (folder / name).unlink()
        (folder / name).symlink_to("/dev/zero")
    return edit


TENSOR_CASES = [
    ("main_key_missing", edit_pt("main.pt", replace("main", KeyError)), "main.pt is corrupt: not a dict with 'main'"),
    ("main_not_tensor", edit_pt("main.pt", replace("main", [1.0, 2.0])), "main.pt: 'main' is not a tensor (got list)"),
    ("main_wrong_shape", edit_pt("main.pt", replace("main", torch.zeros(10))),
     f"main.pt: 'main' is torch.float32 (10,), expected torch.float32 ({P},)"),
    ("main_nan", edit_pt("main.pt", replace("main", torch.full((P,), float("nan")))), "'main' holds NaN or Inf"),
    ("main_runs_code", edit_pt("main.pt", replace("main", lambda folder: RunsCode(folder / "ran"))),
     "main.pt is unreadable (UnpicklingError)"),
    ("server_wrong_type", edit_pt("main.pt", replace("server", [1, 2])), "'server' must hold ['momentum']"),
    ("server_key_missing", edit_pt("main.pt", replace("momentum", KeyError, inner="server")),
     "'server' must hold ['momentum'] for this run's server_opt, got []"),
    ("server_wrong_shape", edit_pt("main.pt", replace("momentum", torch.zeros(3, dtype=torch.float64), "server")),
     f"'server' 'momentum' is torch.float64 (3,), expected torch.float64 ({P},)"),
    ("server_wrong_dtype", edit_pt("main.pt", replace("momentum", torch.zeros(P), "server")),
     "'server' 'momentum' is torch.float32"),
    ("main_truncated", truncate("main.pt"), "main.pt is unreadable"),
    ("main_fifo", fifo("main.pt"), "main.pt is not a regular file"),
    ("main_huge", huge("main.pt"), "main.pt holds 1,073,741,824 bytes, more than the"),
    ("main_device", device_link("main.pt"), "main.pt is not a regular file"),
    ("main_missing", lambda folder: (folder / "main.pt").unlink(), "main.pt cannot be read (No such file"),
    ("node_wrong_shape", edit_pt("nodes-4-8.pt", replace("momentum", torch.zeros(4, 10))),
     f"nodes-4-8.pt: 'momentum' is torch.float32 (4, 10), expected torch.float32 (4, {P})"),
    ("node_key_missing", edit_pt("nodes-4-8.pt", replace("momentum", KeyError)),
     "nodes-4-8.pt is corrupt: not a dict with 'first': 4 and 'momentum'"),
    ("node_wrong_first", edit_pt("nodes-4-8.pt", replace("first", 0)), "nodes-4-8.pt is corrupt"),
    ("node_truncated", truncate("nodes-4-8.pt"), "nodes-4-8.pt is unreadable"),
    ("node_fifo", fifo("nodes-4-8.pt"), "nodes-4-8.pt is not a regular file"),
    ("node_file_absent", edit_meta(node_files=["nodes-0-4.pt", "nodes-4-6.pt", "nodes-6-8.pt"]),
     "nodes-4-6.pt cannot be read (No such file or directory)"),
]


@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize("case", TENSOR_CASES, ids=[c[0] for c in TENSOR_CASES])
def test_a_bad_checkpoint_tensor_file_is_one_line_on_every_rank_count(run_copy, case, ranks):
    """main.pt is read by every rank, nodes-4-8.pt by the ranks holding nodes 4..7: any of them may refuse."""
    _, corrupt, fragment = case
    folder = run_copy / "checkpoint"
    corrupt(folder)
    before = snapshot(run_copy)
    try:
        result = fedmpi(["run", "--resume", str(run_copy)], ranks=ranks, timeout=120)
    finally:
        for name in ("main.pt", "nodes-4-8.pt"):
            unblock(folder / name)
    assert_refused(result, fragment, f"checkpoint file {folder}/")
    assert snapshot(run_copy) == before and no_temp_files(run_copy)
    assert not (folder / "ran").exists()  # the pickled command never ran


# --- refused resumes write nothing ------------------------------------------------------------------------

@pytest.mark.parametrize("ranks", RANKS)
def test_a_refused_resume_leaves_config_yaml_byte_identical_and_a_plain_resume_still_works(run_copy, ranks):
    before = snapshot(run_copy)
    result = fedmpi(["run", "--resume", str(run_copy), "--set", "lr=0.5", "rounds=3"], ranks=ranks)
    assert_refused(result, f"--resume {run_copy}: --set changes lr 0.01 -> 0.5, which the checkpoint depends on",
                   "may change only rounds, eval_every, device, threads, engine, checkpoint_every, data_dir")
    assert snapshot(run_copy) == before
    result = fedmpi(["run", "--resume", str(run_copy)], ranks=ranks)
    assert result.returncode == 0, result.stderr
    assert [r["round"] for r in read_metrics(run_copy)] == [1, 2] and (run_copy / "model.pt").is_file()


@pytest.mark.parametrize("ranks", RANKS)
def test_a_resume_changing_many_keys_names_a_few_and_counts_the_rest(run_copy, ranks):
    long = "x" * 5000
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
    import shutil

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
    import fcntl

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
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the job ended before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.parametrize("ranks", RANKS)
def test_a_second_job_is_refused_and_a_killed_jobs_lock_does_not_outlive_it(small_data, tmp_path, ranks):
    import signal
    import subprocess
    import sys

    from conftest import ROOT, mpi_env, mpirun_path

    run_dir = tmp_path / "run"
    args = ["run", "--set", *RUN, "checkpoint_every=0", small_data, "--out", str(run_dir)]
    first = subprocess.Popen([mpirun_path(), "-n", str(ranks), sys.executable, "-m", "fedmpi", *args], cwd=ROOT,
                             env=dict(os.environ, **mpi_env(), FEDMPI_FAULT="delay:rank=0:round=1:seconds=60"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: (run_dir / "run.json").exists(), first, "the first job set up")
        second = fedmpi(args, ranks=ranks)
        assert_refused(second, f"--out {run_dir} is in use by another fedmpi job (pid {lock_holder(run_dir)} on ")
        for p in rank_pids(str(run_dir)):
            os.kill(p, signal.SIGKILL)  # the first job dies without any cleanup
        first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
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
    import signal
    import subprocess
    import sys

    from conftest import ROOT, mpi_env, mpirun_path

    run_dir = tmp_path / "run"
    args = ["run", "--set", *RUN, "checkpoint_every=0", small_data, "--out", str(run_dir)]
    job = subprocess.Popen([mpirun_path(), "-n", str(ranks), sys.executable, "-m", "fedmpi", *args], cwd=ROOT,
                           env=dict(os.environ, **mpi_env(), FEDMPI_FAULT="delay:rank=0:round=2:seconds=10"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (run_dir / "metrics.jsonl").exists() and read_metrics(run_dir), job, "round 1")
        os.kill(lock_holder(run_dir), signal.SIGTERM)
        stdout, stderr = job.communicate(timeout=90)
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
    assert job.returncode == 0, stderr
    assert [r["round"] for r in read_metrics(run_dir)] == [1, 2] and (run_dir / "model.pt").is_file()
    assert not (run_dir / "checkpoint").exists()

"""Hostile data through the real CLI under real `mpirun` at -n 1 and -n 3: shard files that reach outside
themselves or declare what they do not hold, non-regular paths, places the shard file cannot be written,
raw dataset folders, and run directories given to `fedmpi report`.

Every case asserts: exit code 2; exactly one error line, naming the file and the problem; no traceback;
the job ends (a generous timeout only catches hangs); nothing left behind (no temp file, no output).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
from conftest import ROOT, Result, fedmpi, mpi_env, mpirun_path
from shardfiles import HOSTILE, hostile, make_valid, without_permission_bypass

TIMEOUT = 120
# The config make_valid's file was made from; a hostile copy fails validation before the config is compared.
MATCHING = ["dataset=synthetic", "partition=iid", "seed=0", "nodes=4", "samples_per_node=6", "test_per_node=2",
            "rounds=1", "central_epochs=0", "batch_size=2"]
NEW = ["dataset=synthetic", "nodes=4", "samples_per_node=10", "test_per_node=10", "rounds=1", "central_epochs=0"]


# --- helpers ---------------------------------------------------------------------------------------------

def snapshot(*folders: Path) -> dict:
    """Every file under the folders with its size and mtime: what a case must leave as it found it."""
    out = {}
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(folder):
            for name in dirnames + filenames:
                st = os.lstat(os.path.join(dirpath, name))
                out[os.path.join(dirpath, name)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def assert_one_line(result: Result, *fragments: str) -> str:
    """Exit code 2, no traceback, and exactly one error line, holding every fragment (file and problem)."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "Segmentation" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if "error" in line.lower() or fragments[-1] in line]
    assert len(lines) == 1, result.stderr
    assert all(f in lines[0] for f in fragments), (fragments, lines[0])
    assert len(lines[0]) < 1000, lines[0]
    return lines[0]


def assert_no_output(run_dir: Path) -> None:
    """Nothing in the run directory but the lock rank 0 takes before the shard file is made."""
    assert not run_dir.exists() or [p.name for p in run_dir.iterdir()] in ([], [".lock"]), list(run_dir.iterdir())


def launch(prefix: list[str], args: list[str], ranks: int) -> Result:
    """Like conftest.fedmpi, with a command (setpriv, unshare) wrapped around the whole launch."""
    cmd = [*prefix, mpirun_path(), "-n", str(ranks), sys.executable, "-m", "fedmpi", *args]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT,
                          env=dict(os.environ, **mpi_env()))
    return Result(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return make_valid(tmp_path_factory.mktemp("good") / "good.h5")


@pytest.fixture(scope="module")
def hostile_files(good, tmp_path_factory) -> dict[str, Path]:
    """Each HOSTILE file in its own folder (with what lies beside it: FIFOs, other files)."""
    root = tmp_path_factory.mktemp("hostile")
    files = {}
    for name in HOSTILE:
        (root / name).mkdir()
        files[name] = hostile(good, name, root / name / "data.h5")
    return files


def test_the_matching_config_runs_on_the_intact_file(good, tmp_path):
    """The control: the settings below are sound, so each refusal is the hostile file's doing."""
    shutil.copyfile(good, tmp_path / "data.h5")
    result = fedmpi(["run", "--set", *MATCHING, f"data_file={tmp_path / 'data.h5'}", "--out", str(tmp_path / "o")],
                    ranks=1, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "o" / "metrics.jsonl").is_file()


# --- hostile shard files -----------------------------------------------------------------------------------

@pytest.mark.parametrize("ranks", [1, 3])
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_shard_file_is_refused(hostile_files, tmp_path, name, ranks):
    path = hostile_files[name]
    before = snapshot(path.parent)
    result = fedmpi(["run", "--set", *MATCHING, f"data_file={path}", "--out", str(tmp_path / "o")], ranks=ranks,
                    timeout=TIMEOUT)
    assert_one_line(result, str(path), HOSTILE[name][1])
    assert snapshot(path.parent) == before
    assert_no_output(tmp_path / "o")


@pytest.mark.parametrize("ranks", [1, 3])
@pytest.mark.parametrize("group,row", [("train", 20), ("local_test", 7)])
def test_a_label_outside_the_classes_is_found_by_the_rank_that_reads_it(good, tmp_path, ranks, group, row):
    """Rank 0 checks the structure, each rank its own nodes' labels: row 20 of /train and row 7 of
    /local_test belong to the last node, on the last rank at -n 3; still one line, nothing written."""
    path = tmp_path / "data" / "data.h5"
    path.parent.mkdir()
    shutil.copyfile(good, path)
    with h5py.File(path, "r+") as f:
        f[f"{group}/y"][row] = 7
    result = fedmpi(["run", "--set", *MATCHING, f"data_file={path}", "--out", str(tmp_path / "o")], ranks=ranks,
                    timeout=TIMEOUT)
    assert_one_line(result, str(path), f"/{group}/y[{row}] = 7 is outside the classes [0, 3)")
    assert_no_output(tmp_path / "o")


# --- the shard file's path is not a regular file -------------------------------------------------------------

def non_regular(kind: str, folder: Path) -> tuple[Path, str]:
    path = folder / "data.h5"
    if kind == "fifo":
        os.mkfifo(path)
        return path, "is a FIFO (named pipe), not a regular file"
    if kind == "directory":
        path.mkdir()
        return path, "is a directory, not a regular file"
    if kind == "char_device":
        return Path("/dev/null"), "is a character device, not a regular file"
    os.mkfifo(folder / "fifo")
    path.symlink_to(folder / "fifo")
    return path, "is a FIFO (named pipe), not a regular file"


@pytest.mark.parametrize("ranks", [1, 3])
@pytest.mark.parametrize("kind", ["fifo", "directory", "char_device", "symlink_to_fifo"])
def test_a_shard_file_that_is_not_a_regular_file_is_refused_before_it_is_opened(tmp_path, kind, ranks):
    (tmp_path / "data").mkdir()
    path, problem = non_regular(kind, tmp_path / "data")
    before = snapshot(tmp_path / "data")
    result = fedmpi(["run", "--set", *MATCHING, f"data_file={path}", "--out", str(tmp_path / "o")], ranks=ranks,
                    timeout=TIMEOUT)
    assert_one_line(result, f"shard file {path}", problem)
    assert snapshot(tmp_path / "data") == before
    assert_no_output(tmp_path / "o")


# --- the shard file cannot be written ------------------------------------------------------------------------

@pytest.mark.parametrize("ranks", [1, 3])
def test_a_data_file_below_a_regular_file_is_one_line(tmp_path, ranks):
    result = fedmpi(["run", "--set", *NEW, "data_file=/etc/passwd/x.h5", "--out", str(tmp_path / "o")], ranks=ranks,
                    timeout=TIMEOUT)
    assert_one_line(result, "shard file /etc/passwd/x.h5", "cannot create its directory, /etc/passwd is not a "
                    "directory")
    assert_no_output(tmp_path / "o")


def test_a_data_file_below_a_fifo_is_one_line(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    result = fedmpi(["prepare", "--set", *NEW, f"data_file={tmp_path}/fifo/x.h5"], timeout=TIMEOUT)
    assert_one_line(result, f"shard file {tmp_path}/fifo/x.h5", f"{tmp_path}/fifo is not a directory")
    assert [p.name for p in tmp_path.iterdir()] == ["fifo"]


def test_prepare_force_over_a_directory_is_one_line_and_leaves_no_temp_file(tmp_path):
    (tmp_path / "x.h5").mkdir()
    result = fedmpi(["prepare", "--force", "--set", *NEW, f"data_file={tmp_path}/x.h5"], timeout=TIMEOUT)
    assert_one_line(result, f"shard file {tmp_path}/x.h5", "cannot write it (Is a directory)")
    assert [p.name for p in tmp_path.iterdir()] == ["x.h5"] and list((tmp_path / "x.h5").iterdir()) == []


@pytest.mark.parametrize("ranks", [1, 3])
def test_a_read_only_data_directory_is_one_line(tmp_path, ranks):
    prefix = without_permission_bypass()
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    result = launch(prefix, ["run", "--set", *NEW, f"data_file={folder}/x.h5", "--out", str(tmp_path / "o")], ranks)
    assert_one_line(result, f"shard file {folder}/x.h5", f"cannot write in {folder} (Permission denied)")
    assert list(folder.iterdir()) == []


def small_filesystem_prefix(mount_point: Path) -> list[str]:
    """Run the launch in a private mount namespace with a 64 kB tmpfs on mount_point, then list what it left."""
    script = ('mount -t tmpfs -o size=64k tmpfs "$0" || exit 97; "$@"; rc=$?; '
              'echo "left behind: [$(ls -A "$0" | tr "\\n" " ")]"; exit $rc')
    user = [] if os.geteuid() == 0 else ["-r"]
    probe = subprocess.run(["unshare", *user, "-m", "sh", "-c", 'mount -t tmpfs tmpfs "$0"', str(mount_point)],
                           capture_output=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (unshare -m): a full disk cannot be made")
    return ["unshare", *user, "-m", "sh", "-c", script, str(mount_point)]


@pytest.mark.parametrize("ranks", [1, 3])
def test_a_full_disk_is_one_line_and_leaves_no_temp_file(tmp_path, ranks):
    (tmp_path / "full").mkdir()
    prefix = small_filesystem_prefix(tmp_path / "full")
    result = launch(prefix, ["run", "--set", *NEW, f"data_file={tmp_path}/full/d.h5", "--out", str(tmp_path / "o")],
                    ranks)
    assert_one_line(result, f"shard file {tmp_path}/full/d.h5", "cannot write it (No space left on device)")
    assert "left behind: []" in result.stdout, result.stdout
    assert_no_output(tmp_path / "o")


# --- raw dataset folders ------------------------------------------------------------------------------------

@pytest.mark.parametrize("ranks", [1, 3])
def test_an_unreadable_data_dir_is_one_line(tmp_path, ranks):
    prefix = without_permission_bypass()
    (tmp_path / "locked").mkdir(mode=0o000)
    args = ["run", "--set", *NEW, "dataset=mnist", f"data_dir={tmp_path}/locked", f"data_file={tmp_path}/d/x.h5",
            "--out", str(tmp_path / "o")]
    try:
        result = launch(prefix, args, ranks)
    finally:
        (tmp_path / "locked").chmod(0o755)
    assert_one_line(result, f"data_dir {tmp_path}/locked", "cannot be read (Permission denied)")
    assert not (tmp_path / "d").exists()


def test_a_data_dir_that_is_a_fifo_is_one_line(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    result = fedmpi(["prepare", "--set", *NEW, "dataset=mnist", f"data_dir={tmp_path}/fifo",
                     f"data_file={tmp_path}/x.h5"], timeout=TIMEOUT)
    assert_one_line(result, f"data_dir {tmp_path}/fifo", "is a FIFO (named pipe), not a directory")


def idx_folder(folder: Path, fifo: str) -> None:
    """The four MNIST IDX files (20 tiny samples each), one of them a FIFO."""
    folder.mkdir()
    for stem, shape in (("train-images-idx3-ubyte", (20, 28, 28)), ("train-labels-idx1-ubyte", (20,)),
                        ("t10k-images-idx3-ubyte", (20, 28, 28)), ("t10k-labels-idx1-ubyte", (20,))):
        if stem == fifo:
            os.mkfifo(folder / stem)
            continue
        header = bytes([0, 0, 8, len(shape)]) + b"".join(d.to_bytes(4, "big") for d in shape)
        (folder / stem).write_bytes(header + bytes(math.prod(shape)))


@pytest.mark.parametrize("ranks", [1, 3])
def test_an_idx_file_that_is_a_fifo_is_one_line(tmp_path, ranks):
    idx_folder(tmp_path / "raw", fifo="t10k-images-idx3-ubyte")
    result = fedmpi(["prepare", "--set", *NEW, "dataset=mnist", f"data_dir={tmp_path}/raw",
                     f"data_file={tmp_path}/x.h5"], ranks=ranks, timeout=TIMEOUT)
    assert_one_line(result, f"IDX file {tmp_path}/raw/t10k-images-idx3-ubyte", "is a FIFO (named pipe)")
    assert not (tmp_path / "x.h5").exists() and not list(tmp_path.glob(".*.tmp"))


# --- fedmpi report on hostile run directories ----------------------------------------------------------------

ROW = {"round": 1, "test_acc": 0.5, "test_loss": 1.0, "central_acc": None, "t_round": 0.2, "t_train_max": 0.1,
       "t_train_mean": 0.1, "t_wait": 0.01, "t_allreduce": 0.001, "wire_bytes_est": 1000, "ranks": 1,
       "payload_bytes": 1000, "update_dtype": "fp32"}


def run_dir(folder: Path, data_file: Path) -> Path:
    """A run directory as fedmpi run writes one (two rounds), naming `data_file` as its shard file."""
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps(dict(ROW, round=r)) + "\n" for r in (1, 2)))
    (folder / "run.json").write_text(json.dumps({"world_size": 1, "mpi_library": "MPICH", "hosts": ["h"]}))
    (folder / "config.yaml").write_text(f"dataset: synthetic\nnodes: 4\nseed: 0\npartition: iid\n"
                                        f"data_file: {data_file}\n")
    return folder


def spoil(kind: str, run: Path, hostile_files: dict) -> tuple[str, str]:
    """Break one file of the run directory; returns (the file the message names, the problem)."""
    metrics, info, config = run / "metrics.jsonl", run / "run.json", run / "config.yaml"
    text = config.read_text()
    if kind == "row_not_an_object":
        metrics.write_text(json.dumps(ROW) + "\n[1, 2, 3]\n")
        return str(metrics), "line 2 is not a JSON object"
    if kind == "round_not_an_integer":
        metrics.write_text(json.dumps(dict(ROW, round="one")) + "\n")
        return str(metrics), "line 1: 'round' must be a non-negative integer, got 'one'"
    if kind == "time_not_a_number":
        metrics.write_text(json.dumps(dict(ROW, t_round="slow")) + "\n")
        return str(metrics), "'t_round' must be a finite number or null"
    if kind == "metrics_fifo":
        metrics.unlink()
        os.mkfifo(metrics)
        return str(metrics), "is a FIFO (named pipe), not a regular file"
    if kind == "truncated_run_json":
        info.write_text(info.read_text()[:12])
        return str(info), "is not JSON (truncated?)"
    if kind == "run_json_fifo":
        info.unlink()
        os.mkfifo(info)
        return str(info), "is a FIFO (named pipe), not a regular file"
    if kind == "truncated_config":
        config.write_text("dataset: synthetic\nnodes: [4,\n")
        return str(config), "is not valid YAML"
    if kind == "config_alias_bomb":
        config.write_text("a: &a [x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\n" + text)
        return str(config), "aliases (*name) are not allowed here"
    if kind == "config_not_utf8":
        config.write_bytes(b"dataset: caf\xe9\n")
        return str(config), "is not UTF-8 text"
    if kind.startswith("placeholder"):
        bad = {"placeholder_attribute": "{seed.real.nope}", "placeholder_width": "{seed:>100000000000}",
               "placeholder_index": "{seed[0]}"}[kind]
        config.write_text(text.replace("data_file: ", f"data_file: d/{bad}-"))
        return str(config), "has a bad placeholder"
    if kind == "shard_file_fifo":
        os.mkfifo(run / "labels.h5")
        config.write_text(text.split("data_file:")[0] + f"data_file: {run / 'labels.h5'}\n")
        return str(run / "labels.h5"), "is a FIFO (named pipe), not a regular file"
    name = kind.removeprefix("shard_file_")  # a hostile shard file named as the run's data_file
    config.write_text(text.split("data_file:")[0] + f"data_file: {hostile_files[name]}\n")
    return str(hostile_files[name]), HOSTILE[name][1]


REPORT_CASES = ["row_not_an_object", "round_not_an_integer", "time_not_a_number", "metrics_fifo", "truncated_run_json",
                "run_json_fifo", "truncated_config", "config_alias_bomb", "config_not_utf8", "placeholder_attribute",
                "placeholder_width", "placeholder_index", "shard_file_fifo", "shard_file_external_storage_fifo",
                "shard_file_huge_rows_chunked", "shard_file_virtual_dataset_of_fifo"]


def test_report_on_the_intact_run_directory_writes_the_report(good, tmp_path):
    """The control: the run directory below is one the report reads; each case breaks one thing in it."""
    run = run_dir(tmp_path / "run", good)
    result = fedmpi(["report", str(run)], ranks=1, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert "labels.png" in (run / "report.md").read_text()


@pytest.mark.parametrize("kind", REPORT_CASES)
def test_report_on_a_hostile_run_directory_is_one_line_and_writes_nothing(good, hostile_files, tmp_path, kind):
    run = run_dir(tmp_path / "run", good)
    names, problem = spoil(kind, run, hostile_files)
    before = snapshot(run)
    result = fedmpi(["report", str(run)], ranks=1, timeout=TIMEOUT)
    assert_one_line(result, names, problem)
    assert snapshot(run) == before  # no report.md, no PNG, no temp file


@pytest.mark.parametrize("kind", ["row_not_an_object", "shard_file_fifo"])
def test_report_under_three_ranks_is_one_line_too(good, hostile_files, tmp_path, kind):
    run = run_dir(tmp_path / "run", good)
    names, problem = spoil(kind, run, hostile_files)
    result = fedmpi(["report", str(run), "--out", str(tmp_path / "out")], ranks=3, timeout=TIMEOUT)
    assert_one_line(result, names, problem)
    assert_no_output(tmp_path / "out")

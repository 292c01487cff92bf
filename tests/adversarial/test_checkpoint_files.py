"""Hostile checkpoint files under real `mpirun` at -n 1 and -n 3: every field of meta.json, main.pt and
the node files (wrong shapes and types, FIFOs, sparse giants, pickles that would run code).

Every case asserts the exit code, exactly one error line naming the file and field, no traceback, that
the job ended well inside its timeout, and that the run directory is exactly as it was.
"""
import json
import os
import shutil

import pytest
import torch
from conftest import fedmpi
from rundirs import RANKS, assert_refused, crashed_run, make_fifo, no_temp_files, snapshot, unblock

P = 199_210  # parameters of the 2nn on 28x28 inputs


@pytest.fixture(scope="module")
def checkpointed(small_data, tmp_path_factory):
    return crashed_run(small_data, tmp_path_factory.mktemp("checkpointed"))


@pytest.fixture
def run_copy(checkpointed, tmp_path):
    """A fresh copy of the crashed run to corrupt."""
    return shutil.copytree(checkpointed, tmp_path / "run", symlinks=True)


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

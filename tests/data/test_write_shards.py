"""Writing the shard file when the disk, the directory or the path says no: one line, no temp file left."""
import os
import resource
import signal
import subprocess
import sys

import pytest
from conftest import ROOT
from shardfiles import in_child, make_valid, without_permission_bypass

from fedmpi.config import Config
from fedmpi.data import prepare as prepare_module
from fedmpi.data.prepare import prepare
from fedmpi.errors import DataError


def write_with_size_limit(path, limit):
    """make_valid under RLIMIT_FSIZE: a write past `limit` bytes fails with EFBIG, as a full disk fails."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    make_valid(path, nodes=4, per_node=500, shape=(1, 8, 8))


def test_a_write_that_fails_midway_is_one_line_and_leaves_no_temp_file(tmp_path):
    kind, message = in_child(write_with_size_limit, tmp_path / "s.h5", 20_000)
    assert kind == "DataError" and message == f"shard file {tmp_path / 's.h5'}: cannot write it (File too large)"
    assert list(tmp_path.iterdir()) == []
    assert in_child(write_with_size_limit, tmp_path / "s.h5", 10**9)[0] == "ok"  # the same write, room enough
    assert [p.name for p in tmp_path.iterdir()] == ["s.h5"]


def config(data_file) -> Config:
    return Config(dataset="synthetic", partition="iid", nodes=4, samples_per_node=6, test_per_node=2,
                  data_file=str(data_file))


@pytest.fixture
def no_dataset(monkeypatch):
    """prepare must refuse an unwritable path before it loads (maybe for minutes) the raw dataset."""
    monkeypatch.setattr(prepare_module, "load_dataset", lambda *a, **k: pytest.fail("dataset loaded first"))


def test_a_directory_below_a_regular_file_is_refused_before_the_dataset_is_loaded(tmp_path, no_dataset):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(DataError) as info:
        prepare(config(tmp_path / "a-file" / "sub" / "x.h5"))
    assert str(info.value) == (f"shard file {tmp_path}/a-file/sub/x.h5: cannot create its directory, "
                               f"{tmp_path}/a-file is not a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_rewriting_over_a_directory_is_one_line_and_leaves_no_temp_file(tmp_path):
    (tmp_path / "x.h5").mkdir()
    with pytest.raises(DataError, match=r"x.h5: cannot write it \(Is a directory\)"):
        prepare(config(tmp_path / "x.h5"), force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["x.h5"] and (tmp_path / "x.h5").is_dir()


def test_a_read_only_directory_is_one_line_naming_it(tmp_path):
    prefix = without_permission_bypass()
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    code = ("import sys; from fedmpi.config import Config; from fedmpi.data.prepare import prepare\n"
            "from fedmpi.errors import DataError\n"
            f"cfg = Config(dataset='synthetic', nodes=4, samples_per_node=10, data_file={str(folder / 'x.h5')!r})\n"
            "try: prepare(cfg)\n"
            "except DataError as err: print(err); sys.exit(2)\n")
    proc = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout.strip() == f"shard file {folder}/x.h5: cannot write in {folder} (Permission denied)"
    assert list(folder.iterdir()) == []

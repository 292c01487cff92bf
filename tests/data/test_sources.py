import gzip
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from shardfiles import in_child, without_permission_bypass

from fedmpi.data import sources
from fedmpi.data.sources import IDX_FILES, find_idx_dir, load_dataset, read_idx, synthetic
from fedmpi.errors import DataError


def write_idx(path, array, compress):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def fake_mnist(folder, compress=True, n=20):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for key, stem in IDX_FILES.items():
        shape = (n, 28, 28) if key.endswith("x") else (n,)
        high = 256 if key.endswith("x") else 10
        write_idx(folder / stem, rng.integers(0, high, shape), compress)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_round_trip(tmp_path, compress):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / "a-idx3-ubyte", array, compress)
    assert np.array_equal(read_idx(path), array)


def test_truncated_and_foreign_idx_files_are_named(tmp_path):
    path = write_idx(tmp_path / "a-idx3-ubyte", np.zeros((2, 3, 4)), compress=False)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match=f"{path} is truncated"):
        read_idx(path)
    path.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="bad magic number"):
        read_idx(path)


def test_lookup_order_data_dir_then_env_then_cache(tmp_path, monkeypatch):
    fake_mnist(tmp_path / "explicit", n=20)
    fake_mnist(tmp_path / "env" / "raw", n=30)  # torchvision's raw/ layout is found too
    fake_mnist(tmp_path / "cache" / "fedmpi" / "mnist", n=40)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("FEDMPI_DATA", str(tmp_path / "env"))
    assert len(load_dataset("mnist", str(tmp_path / "explicit")).train_y) == 20
    assert len(load_dataset("mnist", None).train_y) == 30
    monkeypatch.delenv("FEDMPI_DATA")
    raw = load_dataset("mnist", None)
    assert len(raw.train_y) == 40 and raw.train_x.shape == (40, 1, 28, 28) and raw.classes == 10


def test_nothing_found_and_no_network_gives_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("FEDMPI_DATA", raising=False)
    import socket
    monkeypatch.setattr(socket.socket, "connect", lambda *a: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(DataError, match="dataset 'fashion-mnist' not found in .* pass --data-dir DIR"):
        load_dataset("fashion-mnist", str(tmp_path))
    with pytest.raises(DataError, match="data_dir .*missing does not exist"):
        load_dataset("mnist", str(tmp_path / "missing"))


def test_find_idx_dir_needs_all_four_files(tmp_path):
    fake_mnist(tmp_path)
    assert find_idx_dir(tmp_path) == tmp_path
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    assert find_idx_dir(tmp_path) is None


def test_synthetic_is_deterministic_and_label_balanced():
    a, b = synthetic(100, seed=1), synthetic(100, seed=1)
    assert np.array_equal(a.train_x, b.train_x) and np.array_equal(a.test_y, b.test_y)
    assert np.bincount(a.train_y).tolist() == [10] * 10
    assert not np.array_equal(a.train_x, synthetic(100, seed=2).train_x)


def test_synthetic_images_of_another_shape_drawn_in_blocks_are_the_same_bits(monkeypatch):
    small = synthetic(300, seed=4, shape=(1, 8, 8))
    assert small.train_x.shape == (300, 1, 8, 8) and small.test_x.shape == (1000, 1, 8, 8)
    assert small.train_x.dtype == np.uint8 and small.train_x.std() > 10  # noisy images, not a constant
    from fedmpi.data import sources
    monkeypatch.setattr(sources, "SYNTHETIC_BLOCK", 7)  # many blocks: the same numbers as in one
    again = sources.synthetic(300, seed=4, shape=(1, 8, 8))
    assert np.array_equal(small.train_x, again.train_x) and np.array_equal(small.test_x, again.test_x)


def test_an_idx_file_that_is_a_fifo_is_refused_without_opening_it(tmp_path):
    fake_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    os.mkfifo(tmp_path / "train-labels-idx1-ubyte.gz")
    kind, message = in_child(load_dataset, "mnist", str(tmp_path))
    assert kind == "DataError"
    assert message == f"IDX file {tmp_path}/train-labels-idx1-ubyte.gz is a FIFO (named pipe), not a regular file"


def test_idx_labels_outside_0_to_9_are_refused(tmp_path):
    fake_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.full(20, 200), compress=True)
    with pytest.raises(DataError, match=f"IDX test labels in {tmp_path} hold label 200, expected 0..9"):
        load_dataset("mnist", str(tmp_path))


def test_a_truncated_idx_file_is_refused(tmp_path):
    path = write_idx(tmp_path / "a-idx3-ubyte", np.zeros((50, 10, 10)), compress=False)
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DataError, match="is truncated or too long"):
        read_idx(path)


def test_an_idx_file_unpacking_beyond_the_cap_is_refused(tmp_path, monkeypatch):
    path = write_idx(tmp_path / "a-idx3-ubyte", np.zeros((50, 10, 10)), compress=True)  # 5 kB of zeros, unpacked
    monkeypatch.setattr(sources, "MAX_IDX_BYTES", 4096)
    with pytest.raises(DataError, match="unpacks to more than 4,096 bytes"):
        read_idx(path)


def test_idx_dimensions_whose_product_overflows_int64_do_not_pass_as_the_right_size(tmp_path):
    path = tmp_path / "a-idx3-ubyte"
    # 2^32-1 cubed wraps to a small number in int64 arithmetic; the true product is astronomically large.
    path.write_bytes(bytes([0, 0, 8, 4]) + (2**32 - 1).to_bytes(4, "big") * 3 + (1).to_bytes(4, "big") + b"\0" * 64)
    with pytest.raises(DataError, match="unpacks to more than"):
        read_idx(path)


def test_a_data_dir_that_is_a_file_or_a_fifo_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(DataError, match=r"data_dir .*/file is a regular file, not a directory"):
        load_dataset("mnist", str(tmp_path / "file"))
    kind, message = in_child(load_dataset, "mnist", str(tmp_path / "fifo"))
    assert kind == "DataError" and message == f"data_dir {tmp_path}/fifo is a FIFO (named pipe), not a directory"


def test_an_unreadable_data_dir_is_one_line_naming_it(tmp_path):
    prefix = without_permission_bypass()
    fake_mnist(tmp_path / "locked")
    (tmp_path / "locked").chmod(0o000)
    code = ("import sys; from fedmpi.data.sources import load_dataset; from fedmpi.errors import DataError\n"
            f"try: load_dataset('mnist', {str(tmp_path / 'locked')!r})\n"
            "except DataError as err: print(err); sys.exit(2)\n")
    try:
        proc = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    finally:
        (tmp_path / "locked").chmod(0o755)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout.strip() == f"data_dir {tmp_path}/locked cannot be read (Permission denied)"

"""Bad and hostile sources for `fedmpi import` through the real CLI under real `mpirun` (-n 1, a few at -n 3).

Every case asserts: exit code 2; exactly one error line naming the file and the problem (and the client
and the field where there is one); no traceback; no output file and no temp file left.
"""
from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest
from conftest import fedmpi
from importfiles import TEST_SIZES, TRAIN_SIZES, npz_arrays, write_npz, write_tff
from test_data_inputs import assert_one_line

TIMEOUT = 120


def tff(train: Callable[[h5py.File], None] | None = None, test: Callable[[h5py.File], None] | None = None,
        extra: tuple = ()) -> Callable[[Path], list[str]]:
    """A case: the good TRAIN/TEST pair with `train` and `test` applied to them, and extra flags."""
    def make(folder: Path) -> list[str]:
        paths = write_tff(folder / "train.h5", TRAIN_SIZES), write_tff(folder / "test.h5", TEST_SIZES, "test")
        for path, edit in zip(paths, (train, test)):
            if edit is not None:
                with h5py.File(path, "r+") as f:
                    edit(f)
        return ["tff", str(paths[0]), str(paths[1]), "--out", str(folder / "out" / "o.h5"), *extra]
    return make


def npz(edit: Callable[[dict], dict] = lambda a: a, extra: tuple = (), raw: Callable[[Path], None] | None = None
        ) -> Callable[[Path], list[str]]:
    """A case: good arrays changed by `edit` (or the written file changed by `raw`), and extra flags."""
    def make(folder: Path) -> list[str]:
        path = write_npz(folder / "a.npz", edit(npz_arrays([3, 1, 2, 1, 3, 3], [1, 3])))
        if raw is not None:
            raw(path)
        return ["npz", str(path), "--out", str(folder / "out" / "o.h5"), *extra]
    return make


def replace(name: str, make: Callable[[np.ndarray], np.ndarray], **options) -> Callable[[h5py.File], None]:
    def fn(f: h5py.File) -> None:
        data = make(f[name][()])
        del f[name]
        f.create_dataset(name, data=data, **options)
    return fn


def set_row(name: str, row: int, value) -> Callable[[h5py.File], None]:  # noqa: ANN001 - any value
    def fn(f: h5py.File) -> None:
        f[name][row] = value
    return fn


def fifo_beside(folder: Path) -> Path:
    if not (folder / "pipe").exists():
        os.mkfifo(folder / "pipe")
    return folder / "pipe"


def external_storage(f: h5py.File) -> None:
    del f["examples/9/pixels"]
    f.create_dataset("examples/9/pixels", shape=(3, 4, 4), dtype=np.float32,
                     external=[(str(fifo_beside(Path(f.filename).parent)), 0, 3 * 64)])


def huge(f: h5py.File) -> None:
    del f["examples/9/pixels"], f["examples/9/label"]
    f.create_dataset("examples/9/pixels", shape=(10 ** 12, 4, 4), dtype=np.float32, chunks=(1024, 4, 4))
    f.create_dataset("examples/9/label", shape=(10 ** 12,), dtype=np.int32, chunks=(1 << 16,))


def external_examples(f: h5py.File) -> None:
    other = Path(f.filename).with_name("other.h5")
    write_tff(other, {"b": 2})
    del f["examples"]
    f["examples"] = h5py.ExternalLink(str(other), "/examples")


def soft_client(f: h5py.File) -> None:
    del f["examples/a"]
    f["examples/a"] = h5py.SoftLink("/examples/9")


def bad_name(f: h5py.File) -> None:
    f.create_group(b"examples/\xff\xfe")


def empty_client(f: h5py.File) -> None:
    for name in ("pixels", "label"):
        replace(f"examples/a/{name}", lambda data: data[:0])(f)


def not_hdf5(folder: Path) -> list[str]:
    (folder / "x.h5").write_text("hello\n" * 50)
    return ["tff", str(folder / "x.h5"), str(folder / "x.h5"), "--out", str(folder / "out/o.h5")]


def fortran(path: Path) -> None:
    arrays = dict(np.load(path))
    arrays["x"] = np.asfortranarray(arrays["x"])
    np.savez(path, **arrays)


def truncated_member(path: Path) -> None:
    """x.npy's header claims 10^12 rows; the member holds six."""
    with zipfile.ZipFile(path) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    header = np.lib.format.header_data_from_array_1_0(np.zeros((6, 3, 2), np.float32))
    header["shape"] = (10 ** 12, 3, 2)
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    members["x.npy"] = buf.getvalue() + members["x.npy"][128:]
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def with_arrays(**changes) -> Callable[[dict], dict]:
    def fn(arrays: dict) -> dict:
        out = {**arrays, **{k: v(arrays) for k, v in changes.items() if v is not None}}
        return {k: v for k, v in out.items() if k not in [k for k, v in changes.items() if v is None]}
    return fn


def nan_at(name: str, row: int, value: float) -> Callable[[dict], np.ndarray]:
    def fn(arrays: dict) -> np.ndarray:
        x = arrays[name].copy()
        x[row] = value
        return x
    return fn


# name -> (make the case in a folder: the CLI arguments, fragments the one error line must hold)
CASES: dict[str, tuple[Callable[[Path], list[str]], tuple[str, ...]]] = {
    "train_missing": (lambda d: ["tff", str(d / "none.h5"), str(d / "none2.h5"), "--out", str(d / "out/o.h5")],
                      ("TFF file", "none.h5 does not exist")),
    "train_is_fifo": (lambda d: ["tff", str(fifo_beside(d)), str(d / "t.h5"), "--out", str(d / "out/o.h5")],
                      ("TFF file", "pipe is a FIFO (named pipe), not a regular file")),
    "train_not_hdf5": (not_hdf5,
                       ("x.h5 is not a readable HDF5 file",)),
    "no_examples_group": (tff(lambda f: f.move("examples", "clients")), ("train.h5: /examples is missing",)),
    "examples_external_link": (tff(external_examples), ("/examples is an external link",)),
    "client_soft_link": (tff(soft_client), ("client 'a' is a soft link",)),
    "feature_missing": (tff(extra=("--x", "image")),
                        ("train.h5: client '10': feature 'image' is missing (the client has: label, pixels)",)),
    "labels_float": (tff(replace("examples/9/label", lambda y: y.astype(np.float32))),
                     ("client '9': feature 'label' has dtype float32; labels must be integers",)),
    "label_negative": (tff(set_row("examples/100/label", 2, -1)),
                       ("client '100': feature 'label' row 2 is -1; labels must be class indices",)),
    "shapes_differ": (tff(replace("examples/9/pixels", lambda x: x.reshape(3, 16))),
                      ("client '9': feature 'pixels' is float32 with samples [16], client '10' is float32 with "
                       "samples [4, 4]; inputs must agree between clients",)),
    "dtypes_differ": (tff(replace("examples/a/pixels", lambda x: x.astype(np.float64))),
                      ("client 'a': feature 'pixels' is float64", "inputs must agree between clients")),
    "test_shape_differs": (tff(test=replace("examples/zz/pixels", lambda x: x[:, :2])),
                           ("test.h5: client 'zz'", "train.h5's clients", "inputs must agree")),
    "client_without_examples": (tff(empty_client),
                                ("train.h5: client 'a' has no examples (every training client needs one)",)),
    "string_feature": (tff(replace("examples/9/pixels", lambda x: np.array(["a", "b", "c"], dtype=object),
                                   dtype=h5py.string_dtype())),
                       ("client '9': feature 'pixels' has dtype object; fedmpi imports numeric inputs",)),
    "nan_input": (tff(set_row("examples/100/pixels", 4, np.nan)),
                  ("client '100': feature 'pixels' row 4 holds nan (inputs must be finite",)),
    "name_not_utf8": (tff(bad_name), ("/examples: client id b'\\xff\\xfe' is not valid UTF-8",)),
    "huge_declared_shape": (tff(huge), ("/examples/9/pixels declares shape [1000000000000, 4, 4]",)),
    "external_storage": (tff(external_storage), ("/examples/9/pixels keeps its data in external storage",)),
    "label_rows_differ": (tff(replace("examples/10/label", lambda y: y[:3])),
                          ("client '10': feature 'label' has shape [3], 'pixels' has 5 rows",)),
    "unknown_filter": (tff(replace("examples/10/label", lambda y: y, scaleoffset=0, chunks=(2,))),
                       ("/examples/10/label uses HDF5 filter 6 (scaleoffset)",)),
    "test_file_empty": (tff(test=lambda f: [f.__delitem__(f"examples/{c}") for c in ("10", "9", "zz")]),
                        ("test.h5 holds no examples: the shard file needs a test set",)),
    "npz_not_zip": (npz(raw=lambda p: p.write_bytes(b"PK not really" * 20)), ("a.npz is not an .npz (zip) archive",)),
    "npz_is_fifo": (lambda d: ["npz", str(fifo_beside(d)), "--out", str(d / "out/o.h5")], ("npz file", "is a FIFO")),
    "npz_object_array": (npz(with_arrays(client_id=lambda a: np.array([3, "b", 2, 1, 3, 3], dtype=object))),
                         ("a.npz: client_id holds Python objects (dtype object); fedmpi never unpickles",)),
    "npz_missing_y": (npz(with_arrays(y=None)), ("a.npz has no array 'y' (it has: 'client_id', 'client_id_test'",)),
    "npz_half_test": (npz(with_arrays(y_test=None)),
                      ("a.npz has client_id_test, x_test but not y_test: give all three or none",)),
    "npz_float_labels": (npz(with_arrays(y=lambda a: a["y"] + 0.5)), ("a.npz: y has dtype float64; labels must be",)),
    "npz_negative_label": (npz(with_arrays(y_test=lambda a: a["y_test"] - 9)), ("a.npz: y_test row 0 is",)),
    "npz_float_ids": (npz(with_arrays(client_id=lambda a: a["client_id"] * 1.5)),
                      ("a.npz: client_id is float64 [6]; expected [6] integers or strings",)),
    "npz_id_not_utf8": (npz(with_arrays(client_id=lambda a: np.array([b"\xff", b"a", b"b", b"a", b"\xff", b"c"]),
                                        client_id_test=lambda a: np.array([b"a", b"c"]))),
                        ("a.npz: client_id: client id b'\\xff' is not valid UTF-8",)),
    "npz_rows_differ": (npz(with_arrays(y=lambda a: a["y"][:4])), ("a.npz: y has shape [4], x has 6 rows",)),
    "npz_declares_more": (npz(raw=truncated_member),
                          ("a.npz: x declares shape [1000000000000, 3, 2] of float32", "but holds 144 bytes")),
    "npz_fortran": (npz(raw=fortran), ("a.npz: x is stored in Fortran order",)),
    "npz_test_shape_differs": (npz(with_arrays(x_test=lambda a: a["x_test"][:, :2])),
                               ("a.npz: x_test is float32 with samples [2, 2], x is float32 with samples [3, 2]",)),
    "npz_inf_input": (npz(with_arrays(x=nan_at("x", 5, np.inf))), ("a.npz: x row 5 holds inf",)),
    "npz_no_test_left": (npz(with_arrays(x_test=None, y_test=None, client_id_test=None), ("--test-fraction", "0")),
                         ("--test-fraction 0.0 leaves no test examples",)),
    "out_exists": (npz(extra=("--out", "{folder}/exists.h5")), ("--out", "exists.h5 exists; pass --force",)),
    "out_is_directory": (npz(extra=("--out", "{folder}", "--force")), ("is a directory, not a regular file",)),
    "out_below_a_file": (npz(extra=("--out", "{folder}/a.npz/o.h5")), ("cannot create its directory",)),
    "reshape_mismatch": (npz(extra=("--reshape", "2,2")),
                         ("--reshape 2,2 has 4 values", "a.npz: x have 6 (shape [3, 2])")),
    "bad_test_fraction": (npz(extra=("--test-fraction", "1.5")), ("--test-fraction must be in [0, 1), got 1.5",)),
    "bad_classes": (npz(extra=("--classes", "0")), ("--classes must be in [1, 100,000], got 0",)),
}
AT_THREE_RANKS = ("train_is_fifo", "label_negative", "npz_object_array", "feature_missing", "out_exists")


def run_case(name: str, folder: Path, ranks: int):
    args = [a.replace("{folder}", str(folder)) for a in CASES[name][0](folder)]
    (folder / "exists.h5").write_text("an older file\n")
    before = sorted(p.name for p in folder.iterdir())
    result = fedmpi(["import", *args], ranks=ranks, timeout=TIMEOUT)
    line = assert_one_line(result, *CASES[name][1])
    out = folder / "out"
    assert not out.exists() or list(out.iterdir()) == [], list(out.iterdir())  # no output, no temp file
    assert sorted(p.name for p in folder.iterdir() if p.name != "out") == before  # (out/ may be made, empty)
    assert (folder / "exists.h5").read_text() == "an older file\n"
    return line


@pytest.mark.parametrize("name", CASES)
def test_bad_import_input_is_one_line_and_exit_2(name, tmp_path):
    run_case(name, tmp_path, 1)


@pytest.mark.parametrize("name", AT_THREE_RANKS)
def test_bad_import_input_at_three_ranks(name, tmp_path):
    assert "(rank 0/3)" in run_case(name, tmp_path, 3)  # only rank 0 reads and writes


def test_only_rank_0_writes_at_three_ranks(tmp_path):
    args = npz()(tmp_path)
    result = fedmpi(["import", *args], ranks=3, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("shard file:") == 1 and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["o.h5"]

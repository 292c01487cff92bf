"""Real HDF5 shard files for tests: a small valid one, and named ways to break a copy of it with h5py."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from fedmpi.data.partition import offsets_of
from fedmpi.data.shards import write_shards


def make_valid(path: Path, nodes: int = 4, per_node: int = 6, test_per_node: int = 2, classes: int = 3,
               shape: tuple = (1, 2, 2), seed: int = 0, dtype=np.uint8, client_ids=None) -> Path:
    """A consistent shard file with every attribute fedmpi checks (float32 inputs: no pixel_scale)."""
    rng = np.random.default_rng(seed)

    def inputs(n):
        if dtype == np.uint8:
            return rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        return rng.normal(0, 1, (n, *shape)).astype(dtype)

    def group(n_per_node):
        offsets = offsets_of([np.zeros(n_per_node)] * nodes)
        n = int(offsets[-1])
        return inputs(n), rng.integers(0, classes, n), offsets

    attrs = dict(dataset="synthetic", partition="iid", seed=seed, num_nodes=nodes, classes=classes,
                 input_shape=list(shape), samples_per_node=per_node, test_per_node=test_per_node)
    if dtype == np.uint8:
        attrs["pixel_scale"] = 1.0 / 255.0
    test = inputs(5), rng.integers(0, classes, 5)
    write_shards(path, attrs, train=group(per_node), local_test=group(test_per_node), test=test,
                 client_ids=client_ids)
    return path


def _edit(fn: Callable[[h5py.File], None]) -> Callable[[Path], None]:
    def corrupt(path: Path) -> None:
        with h5py.File(path, "r+") as f:
            fn(f)
    return corrupt


def _replace(name: str, make: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], None]:
    def fn(f: h5py.File) -> None:
        data = make(f[name][:])
        del f[name]
        f.create_dataset(name, data=data)
    return _edit(fn)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _set(name: str, index: int, value: int) -> Callable[[Path], None]:
    def fn(f: h5py.File) -> None:
        f[name][index] = value
    return _edit(fn)


def _zero_node(f: h5py.File) -> None:
    o = f["train/offsets"][:]
    o[2] = o[1]  # node 1 ends where it starts; still monotonic and still ending at N
    f["train/offsets"][:] = o


def _offsets_past_end(f: h5py.File) -> None:
    f["train/offsets"][-1] += 5


def _swap_offsets(f: h5py.File) -> None:
    o = f["train/offsets"][:]
    o[1], o[2] = o[2], o[1]
    f["train/offsets"][:] = o


# name -> (corrupt a copy in place, a fragment the one-line error must contain)
CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated": (_truncate, "is not a readable HDF5 file"),
    "not_hdf5": (lambda p: p.write_bytes(b"just some text, not HDF5\n" * 100), "is not a readable HDF5 file"),
    "other_version": (_edit(lambda f: f.attrs.__setitem__("format_version", 2)), "format_version 2, fedmpi reads 1"),
    "missing_dataset": (_edit(lambda f: f.__delitem__("train/y")), "dataset /train/y is missing"),
    "missing_attr": (_edit(lambda f: f.attrs.__delitem__("classes")), "attribute 'classes' is missing"),
    "wrong_shape": (_replace("train/x", lambda x: x.reshape(len(x), -1)), "/train/x has shape"),
    "wrong_dtype": (_replace("train/x", lambda x: x.astype(np.float64)),
                    "/train/x has dtype <f8, expected uint8 or float32"),
    "label_outside": (_set("train/y", 5, 99), "/train/y[5] = 99 is outside the classes"),
    "test_label_negative": (_set("test/y", 1, -1), "/test/y[1] = -1 is outside the classes"),
    "offsets_not_monotonic": (_edit(_swap_offsets), "/train/offsets is not monotonic"),
    "offsets_not_matching": (_edit(_offsets_past_end), "/train/offsets ends past the data"),
    "offsets_float": (_replace("local_test/offsets", lambda o: o.astype(np.float64)),
                      "/local_test/offsets must be a 1-d integer array"),
    "zero_sample_node": (_edit(_zero_node), "/train/offsets: node 1 has zero samples"),
}


def corrupted(good: Path, name: str, dest: Path) -> Path:
    """A copy of `good` at `dest`, broken the way CORRUPTIONS[name] says."""
    shutil.copyfile(good, dest)
    CORRUPTIONS[name][0](dest)
    return dest


# --- hostile files: each reaches outside itself, declares more than it holds, or is too large to quote -----

def _beside(path: Path, name: str) -> Path:
    return path.with_name(f"{path.stem}.{name}")


def _fifo_beside(path: Path) -> Path:
    fifo = _beside(path, "fifo")
    if not fifo.exists():
        os.mkfifo(fifo)
    return fifo


def _external_link(target: Callable[[Path], Path], obj: str, at: str = "train/y") -> Callable[[Path], None]:
    def fn(path: Path) -> None:
        with h5py.File(path, "r+") as f:
            if at in f:
                del f[at]
            f[at] = h5py.ExternalLink(str(target(path)), obj)
    return fn


def _valid_copy_beside(path: Path) -> Path:
    return make_valid(_beside(path, "other.h5"))


def _soft_through_external(path: Path) -> None:
    with h5py.File(path, "r+") as f:
        del f["train/y"]
        f["outside"] = h5py.ExternalLink(str(_valid_copy_beside(path)), "/train")
        f["train/y"] = h5py.SoftLink("/outside/y")


def _soft_loop(f: h5py.File) -> None:
    del f["train/y"]
    f["train/y"] = h5py.SoftLink("/train/y")


def _virtual(source: Callable[[Path], Path]) -> Callable[[Path], None]:
    def fn(path: Path) -> None:
        src = source(path)
        with h5py.File(path, "r+") as f:
            y = f["test/y"][:]
            del f["test/y"]
            layout = h5py.VirtualLayout(shape=y.shape, dtype=y.dtype)
            layout[:] = h5py.VirtualSource(str(src), "test/y", shape=y.shape)
            f.create_virtual_dataset("test/y", layout)
    return fn


def _external_storage(target: Callable[[Path], Path], name: str = "test/x") -> Callable[[Path], None]:
    def fn(path: Path) -> None:
        where = target(path)
        with h5py.File(path, "r+") as f:
            x = f[name]
            shape, size = x.shape, x.size
            del f[name]
            f.create_dataset(name, shape=shape, dtype=np.uint8, external=[(str(where), 0, size)])
    return fn


def _secret_beside(path: Path) -> Path:
    secret = _beside(path, "secret.txt")
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n" * 20)
    return secret


def _huge_chunked(f: h5py.File) -> None:
    """10^12 rows declared, a handful written: every unwritten chunk would read as fill values."""
    n = 10 ** 12
    del f["train/x"], f["train/y"]
    f.create_dataset("train/x", shape=(n, 1, 2, 2), dtype=np.uint8, chunks=(4096, 1, 2, 2))
    f.create_dataset("train/y", shape=(n,), dtype=np.int64, chunks=(1 << 16,))
    f["train/y"][:10] = 1
    f["train/offsets"][:] = np.linspace(0, n, len(f["train/offsets"])).astype(np.int64)


def _huge_contiguous(f: h5py.File) -> None:
    """10^8 labels declared in contiguous layout and never written: no storage allocated at all."""
    n = 10 ** 8
    del f["local_test/y"]
    f.create_dataset("local_test/y", shape=(n,), dtype=np.int64)


def _partly_written(f: h5py.File) -> None:
    y = f["train/y"][:]
    del f["train/y"]
    f.create_dataset("train/y", shape=y.shape, dtype=y.dtype, chunks=(4,))
    f["train/y"][:4] = y[:4]  # 1 of the 6 chunks


def _rebuild_latest(extra: dict) -> Callable[[Path], None]:
    """Rewrite the file with HDF5's newest format (dense attribute storage: attributes of any size)."""
    def fn(path: Path) -> None:
        tmp = _beside(path, "latest.h5")
        with h5py.File(path, "r") as src, h5py.File(tmp, "w", libver="latest") as dst:
            for key in src:
                src.copy(src[key], dst, name=key)
            for key, value in {**src.attrs, **extra}.items():
                dst.attrs[key] = value
        os.replace(tmp, path)
    return fn


def _damaged_chunk(path: Path) -> None:
    with h5py.File(path, "r+") as f:
        y = f["train/y"][:]
        del f["train/y"]
        f.create_dataset("train/y", data=y, compression="gzip", chunks=(8,))
        info = f["train/y"].id.get_chunk_info(1)
    with open(path, "r+b") as raw:
        raw.seek(info.byte_offset)
        raw.write(b"\xff" * info.size)


def _refilter(**options) -> Callable[[Path], None]:
    return _replace_with("train/y", **options)


def _replace_with(name: str, **options) -> Callable[[Path], None]:
    def fn(f: h5py.File) -> None:
        data = f[name][:]
        del f[name]
        f.create_dataset(name, data=data, **options)
    return _edit(fn)


def _set_attr(key: str, value) -> Callable[[Path], None]:
    return _edit(lambda f: f.attrs.__setitem__(key, value))


def _offsets_beyond_int64(f: h5py.File) -> None:
    o = f["train/offsets"][:].astype(np.uint64)
    o[-1] = np.iinfo(np.uint64).max
    del f["train/offsets"]
    f.create_dataset("train/offsets", data=o)


HUGE = 8 * 2 ** 20  # values: 64 MiB of float64 as one attribute
# name -> (make a copy hostile in place, a fragment the one-line error must contain)
HOSTILE: dict[str, tuple[Callable[[Path], None], str]] = {
    "external_link_to_fifo": (_external_link(_fifo_beside, "/y"), "/train/y is an external link to"),
    "external_link_to_valid_file": (_external_link(_valid_copy_beside, "/train/y"), "/train/y is an external link"),
    "unused_external_link": (_external_link(_valid_copy_beside, "/", at="extra/elsewhere"),
                             "/extra/elsewhere is an external link"),
    "soft_link_through_external": (_soft_through_external, "/outside is an external link"),
    "soft_link_loop": (_edit(_soft_loop), "dataset /train/y cannot be opened"),
    "virtual_dataset_of_fifo": (_virtual(_fifo_beside), "/test/y is a virtual dataset"),
    "virtual_dataset_of_valid_file": (_virtual(_valid_copy_beside), "/test/y is a virtual dataset"),
    "external_storage_fifo": (_external_storage(_fifo_beside), "/test/x keeps its data in external storage"),
    "external_storage_regular_file": (_external_storage(_secret_beside, "train/x"),
                                      "/train/x keeps its data in external storage"),
    "huge_rows_chunked": (_edit(_huge_chunked), "/train/x declares shape [1000000000000, 1, 2, 2]"),
    "huge_rows_contiguous": (_edit(_huge_contiguous), "/local_test/y declares shape [100000000]"),
    "partly_written_chunks": (_edit(_partly_written), "needs 6 chunks, but the file holds 1 of them"),
    "huge_classes": (_set_attr("classes", 10 ** 12), "attribute 'classes' must be in [1, 100,000]"),
    "huge_num_nodes": (_set_attr("num_nodes", 10 ** 9), "attribute 'num_nodes' must be in [1, 1,000,000]"),
    "huge_input_shape": (_set_attr("input_shape", [100_000, 100_000, 100_000]), "values per sample"),
    "huge_attribute": (_rebuild_latest({"notes": np.zeros(HUGE)}), "attribute 'notes' holds 8,388,608 values"),
    "huge_format_version": (_rebuild_latest({"format_version": np.ones(HUGE, np.int64)}),
                            "attribute 'format_version' holds 8,388,608 values"),
    "huge_string_attribute": (_set_attr("partition", "x" * 10 ** 6), "attribute 'partition' is 'xxx"),
    "unknown_filter": (_refilter(scaleoffset=0, chunks=(4,)), "/train/y uses HDF5 filter 6 (scaleoffset)"),
    "damaged_chunk": (_damaged_chunk, "/train/y rows "),  # which rows: the whole file, or the reading rank's
    "offsets_beyond_int64": (_edit(_offsets_beyond_int64), "/train/offsets holds 18446744073709551615"),
}


def hostile(good: Path, name: str, dest: Path) -> Path:
    """A copy of `good` at `dest`, made hostile the way HOSTILE[name] says (helpers lie beside it)."""
    shutil.copyfile(good, dest)
    HOSTILE[name][0](dest)
    return dest


def in_child(fn: Callable, *args, timeout: float = 60) -> tuple[str, str]:
    """Call fn(*args) in a forked child: ("ok", repr(result)) or (exception type name, message).

    A FIFO that blocks open() would hang the test run forever; here it fails the test after `timeout`.
    """
    import multiprocessing

    def child(conn) -> None:
        try:
            conn.send(("ok", repr(fn(*args))))
        except BaseException as err:  # noqa: BLE001 - everything goes back to the parent
            conn.send((type(err).__name__, str(err)))

    ctx = multiprocessing.get_context("fork")
    parent, end = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=child, args=(end,))
    proc.start()
    try:
        if not parent.poll(timeout):
            raise AssertionError(f"{getattr(fn, '__name__', fn)} still running after {timeout} s (blocked?)")
        return parent.recv()
    finally:
        proc.kill()
        proc.join()


def without_permission_bypass() -> list[str]:
    """A command prefix under which file permissions apply: none for a normal user; for root, setpriv
    dropping the two capabilities that let root read and write anything (CAP_DAC_OVERRIDE/READ_SEARCH)."""
    import pytest

    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: permissions cannot be made to apply")
    drop = "-dac_override,-dac_read_search"
    return ["setpriv", "--inh-caps", drop, "--bounding-set", drop, "--"]

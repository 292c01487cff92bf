"""Real HDF5 shard files for tests: a small valid one, and named ways to break a copy of it with h5py."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from fedmpi.data.partition import offsets_of
from fedmpi.data.shards import write_shards


def make_valid(path: Path, nodes: int = 4, per_node: int = 6, test_per_node: int = 2, classes: int = 3,
               shape: tuple = (1, 2, 2), seed: int = 0) -> Path:
    """A consistent shard file with every attribute fedmpi checks."""
    rng = np.random.default_rng(seed)

    def group(n_per_node):
        offsets = offsets_of([np.zeros(n_per_node)] * nodes)
        n = int(offsets[-1])
        return rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, classes, n), offsets

    attrs = dict(dataset="synthetic", partition="iid", seed=seed, num_nodes=nodes, classes=classes,
                 input_shape=list(shape), samples_per_node=per_node, test_per_node=test_per_node,
                 pixel_scale=1.0 / 255.0)
    test = rng.integers(0, 256, (5, *shape), dtype=np.uint8), rng.integers(0, classes, 5)
    write_shards(path, attrs, train=group(per_node), local_test=group(test_per_node), test=test)
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
    "wrong_dtype": (_replace("train/x", lambda x: x.astype(np.float32)), "/train/x has dtype float32, expected uint8"),
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

"""A shard file streamed to disk, for imports larger than memory (shards.write_shards builds small ones in memory).

HDF5 only lays the file out: every dataset contiguous, its space allocated when it is created and
never filled, then the file is closed (a few kB of metadata). fedmpi writes all data itself with
pwrite(2) at each dataset's offset, so a full disk or a quota fails a plain write fedmpi controls,
never an HDF5 flush (which can leave the library unable to close the file). The space is checked
and reserved (posix_fallocate) before the first byte of data, so a disk that is too small fails at
once. The file is written under a temp name beside the output, fsynced, checked whole with
validate_shards, then renamed; on any error, KeyboardInterrupt or SIGTERM the temp file is removed.
"""
from __future__ import annotations

import errno
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import h5py
import numpy as np

from ..errors import DataError
from .files import reason, remove_quietly
from .shards import FORMAT_VERSION, GROUPS, make_parent, sync_dir, temp_path

ALL_GROUPS = (*GROUPS, "test")
LABEL_DTYPE = np.dtype("<i8")


@dataclass(frozen=True)
class Layout:
    """Sizes of everything in the file: rows per group, the sample shape and dtype, the client ids' width."""

    nodes: int
    rows: dict            # group -> rows: train, local_test, test
    sample_shape: tuple
    x_dtype: np.dtype     # uint8 or little-endian float32
    id_bytes: int = 0     # width of /train/client_ids; 0: the file has no ids

    def datasets(self) -> dict[str, tuple[tuple, np.dtype]]:
        """Dataset name -> (shape, dtype)."""
        out = {}
        for group in ALL_GROUPS:
            out[f"{group}/x"] = ((self.rows[group], *self.sample_shape), np.dtype(self.x_dtype))
            out[f"{group}/y"] = ((self.rows[group],), LABEL_DTYPE)
        for group in GROUPS:
            out[f"{group}/offsets"] = ((self.nodes + 1,), LABEL_DTYPE)
        if self.id_bytes:
            out["train/client_ids"] = ((self.nodes,), h5py.string_dtype("utf-8", self.id_bytes))
        return out

    def nbytes(self) -> int:
        """Bytes of data the file holds (its metadata adds a few kB)."""
        return sum(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize for shape, dtype in self.datasets().values())


class ShardWriter:
    """Write a shard file of a known layout piece by piece: `with ShardWriter(...) as w: w.write(...); w.commit()`."""

    def __init__(self, path: Path, layout: Layout, attrs: dict) -> None:
        self.path, self.tmp, self.layout = Path(path), temp_path(Path(path)), layout
        self.fd: Optional[int] = None
        self.places: dict[str, tuple[Optional[int], int]] = {}  # name -> (byte offset, bytes per row)
        self.done = False
        self._old_term = None
        make_parent(self.path)
        check_space(self.path, layout.nbytes())
        try:
            self._lay_out(attrs)
            self.fd = os.open(self.tmp, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
            reserve(self.fd, os.fstat(self.fd).st_size)
        except OSError as err:
            self.abort()
            raise DataError(f"shard file {self.path}: cannot write it ({reason(err)})") from None
        except BaseException:
            self.abort()
            raise

    def _lay_out(self, attrs: dict) -> None:
        """Create the temp file's groups, contiguous datasets (allocated now, never filled) and attributes."""
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
        with h5py.File(self.tmp, "w", locking=False) as f:
            for group in ALL_GROUPS:
                f.create_group(group)
            for name, (shape, dtype) in self.layout.datasets().items():
                dset = h5py.h5d.create(f.id, name.encode(), h5py.h5t.py_create(dtype, logical=True),
                                       h5py.h5s.create_simple(shape), dcpl=dcpl)
                row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
                self.places[name] = (dset.get_offset(), row)
            f.attrs["format_version"] = FORMAT_VERSION
            for key, value in attrs.items():
                f.attrs[key] = value

    def __enter__(self) -> "ShardWriter":
        if threading.current_thread() is threading.main_thread():  # scancel: clean up as for Ctrl-C
            self._old_term = signal.signal(signal.SIGTERM, _interrupt)
        return self

    def __exit__(self, kind, value, tb) -> None:  # noqa: ANN001 - the context manager protocol
        if self._old_term is not None:
            signal.signal(signal.SIGTERM, self._old_term)
        if not self.done:
            self.abort()

    def write(self, name: str, row: int, array: np.ndarray) -> None:
        """Write `array` (rows of dataset `name`, its exact dtype) starting at row `row`."""
        offset, row_bytes = self.places[name]
        data = np.ascontiguousarray(array)
        if data.size == 0:
            return
        view = memoryview(data.reshape(-1).view(np.uint8))
        at = offset + row * row_bytes
        try:
            while len(view):
                done = os.pwrite(self.fd, view, at)
                view, at = view[done:], at + done
        except OSError as err:
            raise DataError(f"shard file {self.path}: cannot write it ({reason(err)})") from None

    def write_rows(self, name: str, positions: np.ndarray, array: np.ndarray) -> None:
        """Write array[i] to row positions[i] (increasing): one write per run of consecutive rows."""
        if len(positions) == 0:
            return
        breaks = np.flatnonzero(np.diff(positions) != 1) + 1
        for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(positions)]):
            self.write(name, int(positions[a]), array[a:b])

    def commit(self) -> None:
        """fsync, check the whole file as a run would, rename it into place, fsync the directory."""
        from .validate import validate_shards

        try:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None
            validate_shards(self.tmp)
            os.replace(self.tmp, self.path)
            sync_dir(self.path.parent)
        except OSError as err:
            raise DataError(f"shard file {self.path}: cannot write it ({reason(err)})") from None
        self.done = True

    def abort(self) -> None:
        """Close and remove the temp file (whatever state it is in)."""
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
        remove_quietly(self.tmp)


def _interrupt(signum, frame) -> None:  # noqa: ANN001 - a signal handler's signature
    raise KeyboardInterrupt(f"signal {signum}")


def check_space(path: Path, need: int) -> None:
    """Refuse, before anything is written, an output larger than the free space where it goes."""
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    if need > free:
        raise DataError(f"shard file {path}: needs {need / 2**30:.2f} GiB, only {free / 2**30:.2f} GiB is free "
                        f"in {path.parent}")


def reserve(fd: int, size: int) -> None:
    """Allocate the file's blocks now, where the file system can (a quota or full disk fails here, at once)."""
    if size == 0 or not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return  # not supported here (some network file systems): writes then fail where they fail
        raise

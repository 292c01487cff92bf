"""The HDF5 shard file: node-contiguous training shards, local test splits and the test set.

Layout (FORMAT_VERSION 1):
  /train/x           uint8 or float32 [N, *input_shape]  all nodes' training inputs, node after node
  /train/y           int64 [N]
  /train/offsets     int64 [nodes + 1]   node i owns rows offsets[i]:offsets[i+1]
  /train/client_ids  fixed-length UTF-8 strings [nodes], optional: each node's client in the source data
  /local_test/{x,y,offsets}              each node's local test split, same scheme
  /test/{x,y}                            the whole test set (the main model is scored on it)
  attrs: format_version, dataset, partition, seed, num_nodes, classes, input_shape,
         samples_per_node, test_per_node, pixel_scale (model input = x * pixel_scale; required for uint8)

Files are written whole (write_shards, or streamed by writer.ShardWriter for imports) and opened
read-only with HDF5 file locking off: cluster file systems (Lustre, GPFS, NFS) often refuse or hang on
flock, and nothing here writes while ranks read.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import h5py
import numpy as np

from ..errors import DataError
from .files import quote, reason, remove_quietly, stat_regular
from .h5check import READ_ERRORS, attr_names, attr_value, check_links, read_rows, stored_dataset

FORMAT_VERSION = 1
GROUPS = ("train", "local_test")
MISSING = " (run `fedmpi prepare` or let `fedmpi run` create it)"
FINITE_CHUNK = 1 << 22  # input values checked for NaN/Inf per step (16 MiB of float32)


@dataclass
class NodeShards:
    """A contiguous block of nodes' rows (x uint8 or float32, y int64) and their offsets, rebased to 0."""

    first_node: int
    x: np.ndarray
    y: np.ndarray
    offsets: np.ndarray

    def node(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i - self.first_node], self.offsets[i - self.first_node + 1]
        return self.x[a:b], self.y[a:b]

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)


def write_shards(path: Path, attrs: dict, train: tuple, local_test: tuple, test: tuple,
                 client_ids: Optional[list[str]] = None) -> None:
    """Write the file atomically: a reader never sees half a file (temp name, fsync, then rename).

    HDF5 builds the file in memory and fedmpi writes the bytes: a full disk or a quota then fails a
    plain write(2), never an HDF5 flush (which leaves the library unable to close the file, and the
    process crashing at exit). Any failure is one DataError line naming the file, and the temp file
    is removed whatever happened.
    """
    tmp = temp_path(path)
    make_parent(path)
    image = io.BytesIO()
    with h5py.File(image, "w") as f:
        fill(f, attrs, train, local_test, test)
        if client_ids is not None:
            encoded = [c.encode("utf-8") for c in client_ids]
            width = max(1, max(map(len, encoded), default=1))
            ids = f["train"].create_dataset("client_ids", (len(encoded),), dtype=h5py.string_dtype("utf-8", width))
            if encoded:  # bytes as they are: HDF5 converts no ASCII strings to UTF-8 ones
                ids.id.write(h5py.h5s.ALL, h5py.h5s.ALL, np.array(encoded, f"S{width}"), mtype=ids.id.get_type())
    try:
        with open(tmp, "wb") as out:
            out.write(image.getbuffer())
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        sync_dir(path.parent)
    except OSError as err:
        raise DataError(f"shard file {path}: cannot write it ({reason(err)})") from None
    finally:
        remove_quietly(tmp)


def fill(f: h5py.File, attrs: dict, train: tuple, local_test: tuple, test: tuple) -> None:
    """The datasets and attributes of the layout above."""
    for name, (x, y, offsets) in zip(GROUPS, (train, local_test)):
        g = f.create_group(name)
        g.create_dataset("x", data=x)
        g.create_dataset("y", data=y.astype(np.int64))
        g.create_dataset("offsets", data=offsets.astype(np.int64))
    g = f.create_group("test")
    g.create_dataset("x", data=test[0])
    g.create_dataset("y", data=test[1].astype(np.int64))
    f.attrs["format_version"] = FORMAT_VERSION
    for key, value in attrs.items():
        f.attrs[key] = value


def sync_dir(folder: Path) -> None:
    """fsync a directory, so a rename in it survives a crash (where the file system allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """Where the shard file is written before its rename: beside it, so the rename is atomic."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def make_parent(path: Path) -> None:
    """Create the shard file's directory and check that a file can be created in it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next(p for p in [path.parent, *path.parent.parents] if p.exists() and not p.is_dir())
        raise DataError(f"shard file {path}: cannot create its directory, {blocker} is not a directory") from None
    except OSError as err:
        raise DataError(f"shard file {path}: cannot create its directory {path.parent} ({reason(err)})") from None
    probe = temp_path(path)
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except OSError as err:
        raise DataError(f"shard file {path}: cannot write in {path.parent} ({reason(err)})") from None
    remove_quietly(probe)


def open_shards(path: Path) -> h5py.File:
    """The file opened read-only, after checking it is a regular file that reaches no other file."""
    stat_regular(path, "shard file", missing=MISSING)
    try:
        f = h5py.File(path, "r", locking=False)
    except READ_ERRORS as err:
        raise DataError(f"shard file {path} is not a readable HDF5 file: {reason(err)}") from None
    try:
        check_links(path, f)
        check_version(path, f)
    except READ_ERRORS as err:
        f.close()
        raise DataError(f"shard file {path}: cannot be read ({reason(err)})") from None
    except BaseException:
        f.close()
        raise
    return f


def check_version(path: Path, f: h5py.File) -> None:
    version = attr_value(path, f.attrs, "format_version") if "format_version" in f.attrs else None
    # An array or string attribute must not reach `!=`: its truth value is not a bool.
    if not (isinstance(version, (int, np.integer)) and version == FORMAT_VERSION):
        raise DataError(f"shard file {path} has format_version {quote(version)}, fedmpi reads {FORMAT_VERSION}")


def read_attrs(path: Path) -> dict:
    """Every attribute of the file as plain Python values (each bounded in size)."""
    with open_shards(path) as f:
        try:
            return {k: plain(attr_value(path, f.attrs, k)) for k in attr_names(path, f.attrs)}
        except READ_ERRORS as err:
            raise DataError(f"shard file {path}: an attribute cannot be read ({reason(err)})") from None


def plain(value):
    """numpy scalars and arrays as Python values (so messages read `2`, not `np.int64(2)`)."""
    return value.tolist() if isinstance(value, (np.ndarray, np.generic)) else value


def read_nodes(path: Path, group: str, first: int, stop: int) -> NodeShards:
    """Read only the rows of nodes first..stop-1 from `group` ('train' or 'local_test')."""
    with open_shards(path) as f:
        try:
            offsets = read_rows(path, stored_dataset(path, f, f"{group}/offsets"))
            if stop >= len(offsets) or first < 0 or first > stop:
                raise DataError(f"shard file {path}: nodes {first}..{stop - 1} not in /{group} "
                                f"({len(offsets) - 1} nodes)")
            a, b = int(offsets[first]), int(offsets[stop])
            x, y = stored_dataset(path, f, f"{group}/x"), stored_dataset(path, f, f"{group}/y")
            check_memory(path, f"/{group} rows {a}..{b - 1}", (b - a) * row_bytes(x, y))
            x, y = read_rows(path, x, a, b), read_rows(path, y, a, b).astype(np.int64, copy=False)
            check_finite(path, f"/{group}/x", x, a)
        except READ_ERRORS as err:
            raise DataError(f"shard file {path}: /{group} cannot be read ({reason(err)})") from None
    return NodeShards(first, x, y, offsets[first:stop + 1] - offsets[first])


def check_finite(path: Path, name: str, x: np.ndarray, first_row: int) -> None:
    """float inputs hold no NaN or Inf (they would make every update of their node NaN): DataError naming the row."""
    if x.dtype.kind != "f" or x.size == 0:
        return
    flat, per_row = x.reshape(-1), x[0].size
    for start in range(0, flat.size, FINITE_CHUNK):
        bad = np.flatnonzero(~np.isfinite(flat[start:start + FINITE_CHUNK]))
        if len(bad):
            at = start + int(bad[0])
            raise DataError(f"shard file {path}: {name}[{first_row + at // per_row}] holds {flat[at]} "
                            f"(inputs must be finite numbers)")


def read_offsets(path: Path, group: str) -> np.ndarray:
    """Every node's row offsets in `group` (small: nodes + 1 integers)."""
    with open_shards(path) as f:
        try:
            return read_rows(path, stored_dataset(path, f, f"{group}/offsets"))
        except READ_ERRORS as err:
            raise DataError(f"shard file {path}: /{group}/offsets cannot be read ({reason(err)})") from None


def read_test(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open_shards(path) as f:
        try:
            x, y = stored_dataset(path, f, "test/x"), stored_dataset(path, f, "test/y")
            check_memory(path, "/test", len(x) * row_bytes(x, y))
            x, y = read_rows(path, x), read_rows(path, y).astype(np.int64, copy=False)
            check_finite(path, "/test/x", x, 0)
            return x, y
        except READ_ERRORS as err:
            raise DataError(f"shard file {path}: /test cannot be read ({reason(err)})") from None


def read_client_ids(path: Path) -> Optional[list[str]]:
    """Each node's client id (a validated file's /train/client_ids), or None when the file has none."""
    from .validate import decode_ids

    with open_shards(path) as f:
        try:
            if "client_ids" not in f["train"]:
                return None
            return decode_ids(path, read_rows(path, stored_dataset(path, f, "train/client_ids")), 0)
        except READ_ERRORS as err:
            raise DataError(f"shard file {path}: /train/client_ids cannot be read ({reason(err)})") from None


def row_bytes(x: h5py.Dataset, y: h5py.Dataset) -> int:
    return int(np.prod(x.shape[1:], dtype=np.int64)) * x.dtype.itemsize + y.dtype.itemsize


def check_memory(path: Path, what: str, need: int) -> None:
    """Refuse, with the estimate, to read more than the memory this process may still use."""
    free = available_memory()
    if free is not None and need > free:
        raise DataError(f"shard file {path}: reading {what} needs {need / 2**30:.1f} GiB, only "
                        f"{free / 2**30:.1f} GiB of memory is available")


def available_memory() -> Optional[int]:
    """MemAvailable, or less under a cgroup v2 memory limit (a SLURM job's --mem); None when unknown."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
        with open("/proc/self/cgroup") as f:
            group = next((line.strip()[3:] for line in f if line.startswith("0::")), None)
        if group is not None:
            folder = Path("/sys/fs/cgroup") / group.lstrip("/")
            limit = (folder / "memory.max").read_text().strip()
            if limit != "max":
                found.append(int(limit) - int((folder / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None

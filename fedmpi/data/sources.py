"""Raw datasets as uint8 arrays: IDX files (MNIST, Fashion-MNIST), torchvision, or synthetic.

Lookup order for real datasets: the `data_dir` key / `--data-dir`, then $FEDMPI_DATA, then the
cache directory (~/.cache/fedmpi/<dataset>), then a torchvision download into that cache.
"""
from __future__ import annotations

import gzip
import math
import os
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import DataError
from ..runtime.memory import SYNTHETIC_BLOCK
from .files import kind_of, reason

IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
TORCHVISION_NAMES = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10"}
# Subfolders where torchvision and common mirrors keep the same files.
IDX_SUBDIRS = ("", "raw", "MNIST/raw", "FashionMNIST/raw", "mnist", "fashion-mnist")
MAX_IDX_BYTES = 1 << 30  # one IDX file, unpacked (MNIST's largest is 47 MB): bounds a gzip bomb
IDX_CLASSES = 10


@dataclass
class RawDataset:
    """Images as uint8 [n, C, H, W] and integer labels, for train and test."""

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: int


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (gzip or raw): magic 0x00 0x00 0x08 ndim, big-endian dims, uint8 data.

    The header is read first and the data only as far as it says (at most MAX_IDX_BYTES), so a
    hostile header or a gzip bomb costs no more memory than the data it claims.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            magic = f.read(4)
            if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] != 0x08:
                raise DataError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
            head = f.read(4 * magic[3])
            dims = tuple(int.from_bytes(head[4 * i: 4 * i + 4], "big") for i in range(len(head) // 4))
            size = math.prod(dims)
            if size > MAX_IDX_BYTES:
                raise DataError(f"IDX file {path} unpacks to more than {MAX_IDX_BYTES:,} bytes")
            data = f.read(size + 1)
    except (OSError, EOFError, ValueError, zlib.error) as err:  # zlib.error: a damaged gzip stream
        raise DataError(f"cannot read IDX file {path}: {reason(err)}") from None
    if len(head) != 4 * magic[3] or len(data) != size:
        raise DataError(f"{path} is truncated or too long: header says {dims}, file holds {len(data)} bytes of data")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def find_idx_dir(root: Path) -> Optional[Path]:
    """The folder under `root` that holds all four IDX files (.gz or raw), if any."""
    for sub in IDX_SUBDIRS:
        folder = root / sub
        if all(_idx_file(folder, stem) for stem in IDX_FILES.values()):
            return folder
    return None


def _idx_file(folder: Path, stem: str) -> Optional[Path]:
    """The IDX file `stem` (.gz or raw) in `folder`; one that is there but not a regular file is refused."""
    for name in (stem + ".gz", stem):
        try:
            mode = os.stat(folder / name).st_mode
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as err:
            raise DataError(f"IDX file {folder / name} cannot be read ({reason(err)})") from None
        if not stat.S_ISREG(mode):
            raise DataError(f"IDX file {folder / name} is {kind_of(mode)}, not a regular file")
        return folder / name
    return None


def load_idx_dir(name: str, folder: Path) -> RawDataset:
    arrays = {key: read_idx(_idx_file(folder, stem)) for key, stem in IDX_FILES.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"IDX {split} files in {folder} disagree: images {x.shape}, labels {y.shape}")
        if len(y) and y.max() >= IDX_CLASSES:
            raise DataError(f"IDX {split} labels in {folder} hold label {y.max()}, expected 0..{IDX_CLASSES - 1}")
    return RawDataset(name, arrays["train_x"][:, None], arrays["train_y"].astype(np.int64),
                      arrays["test_x"][:, None], arrays["test_y"].astype(np.int64), classes=IDX_CLASSES)


def cache_dir(name: str) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fedmpi" / name


def candidate_dirs(name: str, data_dir: Optional[str]) -> list[Path]:
    dirs = [Path(d) for d in (data_dir, os.environ.get("FEDMPI_DATA")) if d]
    return dirs + [cache_dir(name)]


def load_dataset(name: str, data_dir: Optional[str], seed: int = 0, synthetic_size: int = 0,
                 synthetic_shape: tuple[int, ...] = (1, 28, 28)) -> RawDataset:
    """Find and load `name`; one clear error when it is nowhere and cannot be downloaded."""
    if name == "synthetic":
        return synthetic(synthetic_size, seed, shape=synthetic_shape)
    if data_dir:
        check_data_dir(data_dir)
    searched = candidate_dirs(name, data_dir)
    for folder in searched:
        try:
            found = _load_local(name, folder)
        except OSError as err:  # an unreadable folder on the way (EACCES, ELOOP)
            raise DataError(f"dataset folder {folder} cannot be read ({reason(err)})") from None
        if found is not None:
            return found
    try:
        return _torchvision(name, searched[-1], download=True)
    except Exception as err:  # no network, a mirror down: all end in the same advice
        where = ", ".join(str(d) for d in searched)
        raise DataError(
            f"dataset '{name}' not found in {where} and download failed ({type(err).__name__}); "
            f"put the four IDX files (train-images-idx3-ubyte.gz, ...) or the torchvision folder in a directory "
            f"and pass --data-dir DIR (or --set data_dir=DIR, or export FEDMPI_DATA=DIR)") from None


def check_data_dir(data_dir: str) -> None:
    """data_dir exists, is a directory and can be listed; else one line naming it."""
    try:
        mode = os.stat(data_dir).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise DataError(f"data_dir {data_dir} does not exist or is not a directory") from None
    except OSError as err:
        raise DataError(f"data_dir {data_dir} cannot be read ({reason(err)})") from None
    if not stat.S_ISDIR(mode):
        raise DataError(f"data_dir {data_dir} is {kind_of(mode)}, not a directory")
    try:
        with os.scandir(data_dir) as entries:
            next(entries, None)
    except OSError as err:
        raise DataError(f"data_dir {data_dir} cannot be read ({reason(err)})") from None


def _load_local(name: str, folder: Path) -> Optional[RawDataset]:
    if not folder.is_dir():
        return None
    if name != "cifar10":
        idx = find_idx_dir(folder)
        return load_idx_dir(name, idx) if idx is not None else None
    if (folder / "cifar-10-batches-py").is_dir():
        try:  # torchvision checks each batch file's MD5 before unpickling it: nothing else is loaded
            return _torchvision(name, folder, download=False)
        except (RuntimeError, OSError, ValueError) as err:
            raise DataError(f"CIFAR-10 files in {folder / 'cifar-10-batches-py'} cannot be loaded "
                            f"({reason(err)})") from None
    return None


def _torchvision(name: str, root: Path, download: bool) -> RawDataset:
    import torchvision.datasets as tvd  # imported late: torchvision is slow to import

    cls = getattr(tvd, TORCHVISION_NAMES[name])
    root.mkdir(parents=True, exist_ok=True)
    parts = [cls(str(root), train=train, download=download) for train in (True, False)]
    xs, ys = [], []
    for part in parts:
        x = np.asarray(part.data)
        xs.append(x.transpose(0, 3, 1, 2) if x.ndim == 4 else x[:, None])  # CIFAR is NHWC
        ys.append(np.asarray(part.targets, dtype=np.int64))
    return RawDataset(name, np.ascontiguousarray(xs[0]), ys[0], np.ascontiguousarray(xs[1]), ys[1], classes=10)




def synthetic(train_size: int, seed: int, test_size: int = 1000, classes: int = 10,
              shape: tuple[int, ...] = (1, 28, 28)) -> RawDataset:
    """Deterministic images of `shape` (1x28x28 by default): a fixed random prototype per class plus
    noise; learnable in seconds. A small shape (1x8x8) lets a million-node file fit on a laptop."""
    rng = np.random.default_rng([seed, 7919])
    shape = tuple(shape)
    prototypes = rng.uniform(0, 255, size=(classes, *shape))

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % classes
        rng.shuffle(y)
        x = np.empty((n, *shape), np.uint8)
        # In blocks: the float64 noise of a block at a time, not of every image (the generator yields
        # the same numbers in one call or in several).
        for a in range(0, n, SYNTHETIC_BLOCK):
            b = min(n, a + SYNTHETIC_BLOCK)
            x[a:b] = np.clip(prototypes[y[a:b]] + rng.normal(0, 90, size=(b - a, *shape)), 0, 255)
        return x, y.astype(np.int64)

    train_x, train_y = draw(max(train_size, classes))
    test_x, test_y = draw(test_size)
    return RawDataset("synthetic", train_x, train_y, test_x, test_y, classes)

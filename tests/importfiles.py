"""Small source files for `fedmpi import`, built with h5py and numpy: TFF client data and npz arrays."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

# Ids that sort differently as strings ("10" < "100" < "9") and as numbers; "a" has no test examples,
# "100" an empty test group, "zz" only test examples.
TRAIN_SIZES = {"10": 5, "9": 3, "100": 7, "a": 2}
TEST_SIZES = {"10": 2, "9": 1, "100": 0, "zz": 3}
SHAPE = (4, 4)
CLASSES = 6


def client_data(cid: str, n: int, shape: tuple = SHAPE, dtype=np.float32, split: str = "train") -> tuple:
    """Deterministic examples of one client: inputs and labels (labels 0..CLASSES-1)."""
    rng = np.random.default_rng([sum(map(ord, cid)), len(cid), n, split == "test"])
    if np.dtype(dtype) == np.uint8:
        x = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    else:
        x = rng.random((n, *shape)).astype(dtype)
    return x, rng.integers(0, CLASSES, n).astype(np.int32)


def learnable_data(cid: str, n: int, shape: tuple = SHAPE, dtype=np.float32, split: str = "train") -> tuple:
    """Examples a model can learn: a fixed prototype per label plus noise; each client favours two labels."""
    prototypes = np.random.default_rng(99).normal(0, 1, (CLASSES, *shape))
    rng = np.random.default_rng([sum(map(ord, cid)), len(cid), n, split == "test"])
    favourite = sum(map(ord, cid)) % CLASSES
    y = np.where(rng.random(n) < 0.6, (favourite + rng.integers(0, 2, n)) % CLASSES, rng.integers(0, CLASSES, n))
    x = prototypes[y] + rng.normal(0, 0.8, (n, *shape))
    return x.astype(dtype), y.astype(np.int32)


def write_tff(path: Path, sizes: dict, split: str = "train", xname: str = "pixels", yname: str = "label",
              shape: tuple = SHAPE, dtype=np.float32, data=client_data, **dataset_options) -> Path:
    """A TFF-layout file: /examples/<client id>/<xname, yname>."""
    with h5py.File(path, "w") as f:
        for cid, n in sizes.items():
            x, y = data(cid, n, shape, dtype, split)
            group = f.create_group(f"examples/{cid}")
            group.create_dataset(xname, data=x, **dataset_options)
            group.create_dataset(yname, data=y)
    return path


def tff_pair(folder: Path, **options) -> tuple[Path, Path]:
    """The TRAIN and TEST files of TRAIN_SIZES / TEST_SIZES."""
    return (write_tff(folder / "train.h5", TRAIN_SIZES, "train", **options),
            write_tff(folder / "test.h5", TEST_SIZES, "test", **options))


def npz_arrays(ids: list, test_ids: list | None = None, shape: tuple = (3, 2), dtype=np.float32, seed: int = 0) -> dict:
    """x, y, client_id (and the *_test arrays when test_ids is given), examples of clients interleaved."""
    rng = np.random.default_rng(seed)

    def part(owner: list) -> tuple:
        n = len(owner)
        x = rng.integers(0, 256, (n, *shape)).astype(dtype) if np.dtype(dtype) == np.uint8 else \
            rng.random((n, *shape)).astype(dtype)
        return x, rng.integers(0, CLASSES, n), np.array(owner)

    x, y, cid = part(ids)
    out = dict(x=x, y=y, client_id=cid)
    if test_ids is not None:
        out.update(zip(("x_test", "y_test", "client_id_test"), part(test_ids)))
    return out


def write_npz(path: Path, arrays: dict, compressed: bool = False) -> Path:
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path

"""What an untrusted HDF5 shard file must not do, checked from metadata before any of its data is read.

- Reach outside itself: an external link (or a soft link through one), a virtual dataset or external
  storage would make HDF5 open another file, which may be any local file or a FIFO that blocks forever.
- Declare more than it holds: a dataset whose shape needs chunks the file never wrote reads as fill
  values, so a 1 MB file can "hold" 10^12 rows whose scan takes hours. Every chunk the shape needs
  must be allocated (contiguous and compact data: every byte), and no dataset may claim more storage
  than the whole file has. Only filters of bounded expansion are read (gzip, lzf, shuffle, fletcher32).
- Hold attributes too large to read, compare or quote in a message.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import h5py
import numpy as np

from ..errors import DataError
from .files import clip, quote, reason

MAX_LINKS = 10_000          # a shard file has 12; walking more would only cost time
MAX_ATTRS = 1_000           # attributes of the root group (fedmpi writes about 14)
MAX_ATTR_BYTES = 64 * 1024  # one attribute's values; fedmpi's own are a few bytes each
FILTERS = {h5py.h5z.FILTER_DEFLATE: "gzip", h5py.h5z.FILTER_LZF: "lzf", h5py.h5z.FILTER_SHUFFLE: "shuffle",
           h5py.h5z.FILTER_FLETCHER32: "fletcher32"}
OUTSIDE = "; fedmpi reads only data stored in the shard file itself"
# What h5py and numpy raise for damaged metadata or data; each becomes a DataError naming the file.
READ_ERRORS = (OSError, LookupError, ValueError, TypeError, RuntimeError, ArithmeticError, MemoryError)


def check_links(path: Path, f: h5py.File) -> None:
    """No external or user-defined link, virtual dataset or external storage anywhere in the file.

    Links are listed, never followed; each dataset is opened (its header only, no data) to see where
    its data lie, so even a dataset fedmpi does not use cannot point elsewhere.
    """
    seen, bad, datasets = [0], [], []

    def visit(name: bytes, info) -> bool | None:
        seen[0] += 1
        if seen[0] > MAX_LINKS or info.type not in (h5py.h5l.TYPE_HARD, h5py.h5l.TYPE_SOFT):
            bad.append((name, info.type))
            return True  # stop the walk
        if info.type == h5py.h5l.TYPE_HARD:
            datasets.append(name)
        return None

    f.id.links.visit(visit, info=True)
    if seen[0] > MAX_LINKS:
        raise DataError(f"shard file {path} holds more than {MAX_LINKS:,} objects; a shard file has a dozen")
    if bad:
        name, kind = bad[0]
        where = f"shard file {path}: /{clip(name.decode('utf-8', 'replace'))}"
        if kind == h5py.h5l.TYPE_EXTERNAL:
            target, obj = (part.decode("utf-8", "replace") for part in f.id.links.get_val(name))
            raise DataError(f"{where} is an external link to {clip(target)}:{clip(obj)}{OUTSIDE}")
        raise DataError(f"{where} is a user-defined link (type {kind}){OUTSIDE}")
    for name in datasets:
        if h5py.h5o.get_info(f.id, name).type == h5py.h5o.TYPE_DATASET:
            check_inside(path, name.decode("utf-8", "replace"), h5py.h5d.open(f.id, name).get_create_plist())


def check_inside(path: Path, name: str, plist, what: str = "shard file") -> None:
    """The dataset's data lie in this file: not mapped from others (VDS), not in external storage."""
    where = f"{what} {path}: /{clip(name)}"
    if plist.get_layout() == h5py.h5d.VIRTUAL:
        raise DataError(f"{where} is a virtual dataset (its data are mapped from other files){OUTSIDE}")
    if plist.get_external_count():
        target = plist.get_external(0)[0].decode("utf-8", "replace")
        raise DataError(f"{where} keeps its data in external storage ({clip(target)}){OUTSIDE}")


def stored_dataset(path: Path, f: h5py.File, name: str) -> h5py.Dataset:
    """The dataset at `name`, after checking that the file itself holds all of its data."""
    try:
        obj = f.get(name)
        if isinstance(obj, h5py.Dataset):
            check_storage(path, name, obj, f.id.get_filesize())
    except READ_ERRORS as err:  # a soft link loop, a damaged object header
        raise DataError(f"shard file {path}: dataset /{name} cannot be opened ({reason(err)})") from None
    if not isinstance(obj, h5py.Dataset):
        raise DataError(f"shard file {path}: dataset /{name} is missing")
    return obj


def check_storage(path: Path, name: str, dset: h5py.Dataset, file_size: int, what: str = "shard file") -> None:
    """The data of `dset` lie in the file, allocated in full, through filters fedmpi accepts.

    `what` names the kind of file in messages: a shard file, or a source file being imported.
    """
    plist = dset.id.get_create_plist()
    layout, where = plist.get_layout(), f"{what} {path}: /{clip(name)}"
    check_inside(path, name, plist, what)
    filters = [plist.get_filter(i) for i in range(plist.get_nfilters())]
    unknown = [(code, name.decode("utf-8", "replace")) for code, _, _, name in filters if code not in FILTERS]
    if unknown:
        raise DataError(f"{where} uses HDF5 filter {unknown[0][0]} ({clip(unknown[0][1], 40)}); fedmpi reads only "
                        f"{', '.join(FILTERS.values())}")
    shape, stored = list(dset.shape), dset.id.get_storage_size()
    if layout == h5py.h5d.CHUNKED:
        need = math.prod(-(-size // chunk) for size, chunk in zip(dset.shape, dset.chunks))
        have = dset.id.get_num_chunks()
        if have != need:
            raise DataError(f"{where} declares shape {shape}, which needs {need:,} chunks, but the file holds "
                            f"{have:,} of them (the rest would read as fill values, not data)")
    elif stored < dset.size * dset.dtype.itemsize:
        raise DataError(f"{where} declares shape {shape} ({dset.size * dset.dtype.itemsize:,} bytes), but the "
                        f"file holds {stored:,} bytes of it")
    if stored > file_size:
        raise DataError(f"{where} claims {stored:,} bytes of storage, more than the whole file ({file_size:,} bytes)")


def read_rows(path: Path, dset: h5py.Dataset, start: int = 0, stop: Optional[int] = None,
              what: str = "shard file") -> np.ndarray:
    """dset[start:stop]; a damaged chunk or a failed read is a DataError naming the dataset and rows."""
    try:
        return dset[start:stop]
    except READ_ERRORS as err:
        rows = f"rows {start}..{(len(dset) if stop is None else min(stop, len(dset))) - 1}" if dset.ndim else "data"
        raise DataError(f"{what} {path}: {clip(dset.name)} {rows} cannot be read ({reason(err)})") from None


def attr_names(path: Path, attrs: h5py.AttributeManager) -> list[str]:
    """The attribute names, at most MAX_ATTRS of them."""
    count = len(attrs)
    if count > MAX_ATTRS:
        raise DataError(f"shard file {path} has {count:,} attributes, more than the {MAX_ATTRS:,} fedmpi reads")
    return list(attrs.keys())


def attr_value(path: Path, attrs: h5py.AttributeManager, name: str):
    """One attribute's value, refused from its shape alone when it is larger than MAX_ATTR_BYTES."""
    where = f"shard file {path}: attribute '{clip(name)}'"
    try:
        aid = attrs.get_id(name)
        count = math.prod(aid.shape) if aid.shape is not None else 0
        if count * aid.dtype.itemsize > MAX_ATTR_BYTES:
            raise DataError(f"{where} holds {count:,} values of {aid.dtype} (shape {list(aid.shape)}), more than "
                            f"the {MAX_ATTR_BYTES:,} bytes fedmpi reads from one attribute")
        value = attrs[name]
    except READ_ERRORS as err:
        raise DataError(f"{where} cannot be read ({reason(err)})") from None
    if isinstance(value, np.ndarray) and value.dtype == object:  # variable-length strings or sequences
        size = sum(len(v) if hasattr(v, "__len__") else 1 for v in value.reshape(-1))
    else:
        size = len(value) if isinstance(value, (str, bytes)) else 0
    if size > MAX_ATTR_BYTES:
        raise DataError(f"{where} is {quote(value)}, longer than the {MAX_ATTR_BYTES:,} bytes fedmpi reads")
    return value

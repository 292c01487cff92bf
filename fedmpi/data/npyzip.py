"""Arrays of an .npz file read as streams: bounded memory for stored and compressed members alike.

np.load reads a whole member into memory (its mmap_mode does not apply to .npz), so fedmpi reads
each member itself: zipfile decompresses it as a stream, numpy.lib.format parses the .npy header
(a Python literal, never code), and the data come a slice of rows at a time. An object dtype (what
np.load would unpickle with allow_pickle=True) is refused from the header, before any data; nothing
here can unpickle. Each member must hold exactly the bytes its header declares.
"""
from __future__ import annotations

import lzma
import math
import os
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import DataError
from .files import clip, kind_of, quote, reason, stat_regular

WHAT = "npz file"
MAX_HEADER = 10_000  # numpy's own limit for a .npy header
READ_PIECE = 1 << 20
# What zipfile, zlib, bz2, lzma and numpy's header parser raise for a damaged or hostile archive.
NPZ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, RuntimeError, NotImplementedError,
              KeyError, SyntaxError, OverflowError, MemoryError, lzma.LZMAError)


@dataclass
class Member:
    """One array of the archive: its name, shape and dtype (from the header) and where its data start."""

    path: Path
    info: zipfile.ZipInfo
    shape: tuple
    dtype: np.dtype
    header: int  # bytes before the data

    @property
    def name(self) -> str:
        return self.info.filename[:-4]

    @property
    def where(self) -> str:
        return f"{WHAT} {self.path}: {clip(self.name)}"

    def rows(self, zf: zipfile.ZipFile, step: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, array of up to `step` rows), in order, reading only those rows' bytes at a time."""
        row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize
        try:
            with zf.open(self.info) as fp:
                read_exact(fp, self.header, self.where)
                for start in range(0, self.shape[0], step):
                    n = min(step, self.shape[0] - start)
                    data = read_exact(fp, n * row_bytes, self.where)
                    yield start, np.frombuffer(data, self.dtype).reshape(n, *self.shape[1:])
        except NPZ_ERRORS as err:
            raise DataError(f"{self.where} cannot be read ({reason(err)})") from None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def read_all(self, zf: zipfile.ZipFile) -> np.ndarray:
        """The whole array (for the small per-example ones: labels, client ids; npz.check_memory first)."""
        parts = [part for _, part in self.rows(zf, max(1, self.shape[0]))] if self.shape[0] else []
        return parts[0] if parts else np.zeros(self.shape, self.dtype)


def read_exact(fp, n: int, where: str) -> bytearray:  # noqa: ANN001 - a zipfile member stream
    """n bytes, read a MiB at a time into one buffer (one large read would briefly hold them twice)."""
    data, pos = bytearray(n), 0
    view = memoryview(data)
    while pos < n:
        piece = fp.read(min(READ_PIECE, n - pos))
        if not piece:
            raise DataError(f"{where} is truncated: {pos:,} of {n:,} bytes")
        view[pos:pos + len(piece)] = piece
        pos += len(piece)
    return data


def open_npz(path: Path) -> zipfile.ZipFile:
    """The archive, after checking that it is a regular file (also on the open descriptor: no FIFO race)."""
    stat_regular(path, WHAT)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise DataError(f"{WHAT} {path} cannot be read ({reason(err)})") from None
    f = os.fdopen(fd, "rb")
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        f.close()
        raise DataError(f"{WHAT} {path} is {kind_of(mode)}, not a regular file")
    try:
        return zipfile.ZipFile(f)
    except NPZ_ERRORS as err:
        f.close()
        raise DataError(f"{WHAT} {path} is not an .npz (zip) archive ({reason(err)})") from None


def members(path: Path, zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """name -> entry of every .npy member; a name twice in the archive is refused (which one would count?)."""
    out: dict[str, zipfile.ZipInfo] = {}
    for info in zf.infolist():
        if info.filename.endswith(".npy"):
            name = info.filename[:-4]
            if name in out:
                raise DataError(f"{WHAT} {path} holds the array {quote(name)} twice")
            out[name] = info
    return out


def member(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Member:
    """Parse a member's header and check it: a plain dtype, C order, and exactly the bytes it declares."""
    where = f"{WHAT} {path}: {clip(info.filename[:-4])}"
    try:
        with zf.open(info) as fp:
            version = np.lib.format.read_magic(fp)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp, max_header_size=MAX_HEADER)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp, max_header_size=MAX_HEADER)
            else:
                raise DataError(f"{where} is .npy format {version[0]}.{version[1]}; fedmpi reads 1.0 and 2.0")
            header = fp.tell()
    except NPZ_ERRORS as err:
        raise DataError(f"{where} is not a readable .npy array ({reason(err)})") from None
    if dtype.hasobject:
        raise DataError(f"{where} holds Python objects (dtype object); fedmpi never unpickles: save plain numeric "
                        f"or string arrays")
    if dtype.names or dtype.subdtype:
        raise DataError(f"{where} has the structured dtype {clip(str(dtype))}; fedmpi reads plain arrays")
    if fortran and len(shape) > 1:
        raise DataError(f"{where} is stored in Fortran order; save np.ascontiguousarray(...) instead")
    need = header + math.prod(shape) * dtype.itemsize
    if info.file_size != need:
        raise DataError(f"{where} declares shape {list(shape)} of {dtype} ({need - header:,} bytes) but holds "
                        f"{info.file_size - header:,} bytes")
    return Member(path, info, tuple(shape), dtype, header)

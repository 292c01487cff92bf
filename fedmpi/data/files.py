"""Files fedmpi did not write itself: refuse what is not a regular file before opening it, read text in
bounded size, and quote a bounded amount of anything in an error message.

A FIFO blocks `open()` until a writer appears, a device may never end: both are refused from `os.stat`,
which neither opens nor blocks. Symlinks are followed (a symlink to a regular file is fine).
"""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import numpy as np

from ..errors import DataError

QUOTE_CHARS = 200    # the most of one value an error message quotes
QUOTE_ITEMS = 8      # array elements quoted before "..."
KINDS = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
         (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def kind_of(mode: int) -> str:
    """What kind of file a mode says, in words."""
    return next((name for test, name in KINDS if test(mode)), "of an unknown kind")


def reason(err: BaseException) -> str:
    """An error's cause in a few words ('No space left on device'), on one line, never a traceback."""
    text = str(err.strerror) if isinstance(err, OSError) and err.strerror else str(err)
    # HDF5 reports a failed write(2) inside a long error stack: "..., error message = 'No space left on device'"
    found = re.search(r"error message = '([^']*)'", text)
    return clip(found.group(1) if found else (text or type(err).__name__))


def stat_regular(path: Path, what: str, missing: str = "") -> os.stat_result:
    """os.stat of `path`, or a DataError when it is missing, unreachable or not a regular file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"{what} {path} does not exist{missing}") from None
    except (OSError, ValueError) as err:  # EACCES on a parent, ELOOP, ENOTDIR, a NUL byte in the name
        raise DataError(f"{what} {path} cannot be read ({reason(err)})") from None
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{what} {path} is {kind_of(st.st_mode)}, not a regular file")
    return st


def read_text(path: Path, what: str, limit: int) -> str:
    """The UTF-8 text of a regular file of at most `limit` bytes; DataError otherwise.

    Opened non-blocking and checked again on the open descriptor, so a FIFO swapped in after the
    stat cannot block the read either.
    """
    stat_regular(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise DataError(f"{what} {path} cannot be read ({reason(err)})") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise DataError(f"{what} {path} is {kind_of(mode)}, not a regular file")
        try:
            data = f.read(limit + 1)
        except OSError as err:
            raise DataError(f"{what} {path} cannot be read ({reason(err)})") from None
    if len(data) > limit:
        raise DataError(f"{what} {path} is larger than {limit:,} bytes, more than fedmpi ever writes there")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{what} {path} is not UTF-8 text (byte {err.start})") from None


def remove_quietly(path: Path) -> None:
    """Remove a temp file if it is there (a rename may have taken it already)."""
    try:
        path.unlink()
    except OSError:
        pass


def clip(text: str, limit: int = QUOTE_CHARS) -> str:
    """`text` on one line, cut to `limit` characters with '...' and its full length when longer."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else f"{flat[:limit]}... ({len(flat):,} characters)"


def quote(value) -> str:
    """A bounded repr of a value read from a file: numpy arrays show their first elements and shape."""
    if isinstance(value, np.ndarray) and value.size > QUOTE_ITEMS:
        head = ", ".join(repr(v) for v in value.reshape(-1)[:QUOTE_ITEMS].tolist())
        return clip(f"[{head}, ...] ({value.size:,} values, shape {list(value.shape)}, {value.dtype})")
    if isinstance(value, (np.ndarray, np.generic)):
        value = value.tolist()
    if isinstance(value, (str, bytes)) and len(value) > QUOTE_CHARS:
        return f"{value[:QUOTE_CHARS]!r}... ({len(value):,} characters)"
    if isinstance(value, (list, tuple, dict)) and len(value) > QUOTE_ITEMS:
        return clip(f"{type(value).__name__} of {len(value):,} items")
    return clip(repr(value))

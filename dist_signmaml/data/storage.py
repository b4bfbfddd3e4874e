"""Where shard bytes come from: a local directory now (object storage is added in the same place).

A *location* is a local path. Every opener returns a readable binary file object positioned at the start, after
checking that it is a regular file: a FIFO would block `open()` forever and a device such as /dev/zero never ends.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class StorageError(OSError):
    """A shard or index that cannot be fetched (missing, not a regular file, unreachable); the message names it."""


def join(root, name: str):
    """`root/name` for a local root."""
    return Path(root) / name


def _kind_of(mode: int) -> str:
    for test, word in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return word
    return "not a regular file"


def open_local(path) -> tuple[object, int]:
    """(binary file object, size in bytes) of a regular local file; symlinks to regular files are fine.

    Opened non-blocking first so that a FIFO cannot hang here, then checked with fstat (no race with a swap)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as error:
        raise StorageError(f"{path}: cannot open ({error.strerror or error})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise StorageError(f"{path}: {_kind_of(info.st_mode)}; shards and indexes must be regular files")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), info.st_size
    except BaseException:
        os.close(fd)
        raise


def read_small(location, limit: int) -> bytes:
    """The whole content of a small file (an index), refusing more than `limit` bytes."""
    handle, size = open_local(location)
    with handle:
        if size > limit:
            raise StorageError(f"{location}: {size} bytes, more than the {limit} an index may have")
        return handle.read(limit + 1)


def open_shard(location) -> tuple[object, int | None]:
    """(binary file object, size if known) of a shard."""
    return open_local(location)


def is_remote(location) -> bool:
    return False


def exists(location) -> bool:
    return Path(location).exists()


def list_dirs(location) -> list:
    """Sub-folders of a dataset root, sorted."""
    path = Path(location)
    return sorted(p for p in path.iterdir() if p.is_dir()) if path.is_dir() else []


def list_names(location) -> list[str]:
    """File names directly inside a split directory (used to find stray shards)."""
    path = Path(location)
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []

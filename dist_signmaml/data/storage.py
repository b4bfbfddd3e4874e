"""Where shard bytes come from: a local directory, or object storage (`http(s)://`, `s3://`, `gs://`) through fsspec.

A *location* is a local path or a `Url`, a URL string that joins like a Path (`url / "train"`), so callers build
`root / split / shard` the same way for both. Only the scheme of the root the user gives is ever used: names below
it (splits, `index.json`, shard names from an index) are plain file names, checked before they are joined, so an
index can never point at another host, another scheme or a `pipe:` command.

S3 credentials and region come from the usual AWS variables and files; an S3-compatible store is named with
AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3). Local files must be regular files (a FIFO would block `open()` forever and /dev/zero never ends). Remote objects
are read sequentially; a transient failure (a dropped connection, a timeout, a 5xx or 429 answer, an object that
ends before the size the index gives it) is retried with exponential backoff by reopening at the byte reached, and
a permanent one (missing, forbidden, or retries spent) is one StorageError naming the URL.

With a cache directory (`ShardOpener(cache_dir=..., cache_gb=...)`), a remote shard is downloaded to a temporary
file while it is hashed, kept only if its sha256 is the index's (renamed to `<sha256>.tar`, so a half-written or
corrupt file is never used), and the least recently used shards are removed beyond `cache_gb`.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import tempfile
import time
from pathlib import Path

REMOTE_SCHEMES = ("http", "https", "s3", "gs", "gcs")
RETRIES = 5
BACKOFF_S = 0.2  # first wait; doubles after each failed attempt
STREAM_BLOCK = 1 << 20
PLAIN_NAME = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,200}$")


class StorageError(OSError):
    """A shard or index that cannot be fetched (missing, not a regular file, unreachable); the message names it."""


class Url(str):
    """A remote location, e.g. `s3://bucket/prefix`, that joins plain names like a Path does."""

    def __truediv__(self, name: str) -> "Url":
        return Url(join(self, name))

    @property
    def name(self) -> str:
        return self.rstrip("/").rsplit("/", 1)[-1]

    def resolve(self) -> "Url":
        return self


def scheme_of(location) -> str | None:
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.\-]*):", str(location))
    return match.group(1).lower() if match else None


def is_remote(location) -> bool:
    return isinstance(location, str) and scheme_of(location) in REMOTE_SCHEMES and "://" in location


def data_root(value: str):
    """The location of a user's `--data`: a Url for object storage, else a local Path. Anything that looks like
    another scheme (`pipe:`, `file:`, `ftp://`) is refused rather than read as a relative path."""
    value = str(value)
    scheme = scheme_of(value)
    if is_remote(value):
        return Url(value.rstrip("/"))
    if scheme is not None and len(scheme) > 1:  # (one letter is a Windows drive)
        raise ValueError(f"--data={value!r}: the scheme {scheme + ':'!r} is not supported; expected a local path or "
                         f"one of {', '.join(s + '://' for s in REMOTE_SCHEMES)}")
    return Path(value)


def join(root, name: str):
    """`root/name`; `name` must be a plain file name (no path, no scheme)."""
    if not PLAIN_NAME.match(name) or name in (".", ".."):
        raise ValueError(f"{name!r} is not a plain file name")
    if is_remote(root):
        return Url(str(root).rstrip("/") + "/" + name)
    return Path(root) / name


# ---- local ---------------------------------------------------------------------------------------------------------
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
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing") from None
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


# ---- remote --------------------------------------------------------------------------------------------------------
def _filesystem(url: str):
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec comes with the runtime dependencies
        raise StorageError(f"{url}: reading object storage needs fsspec (pip install fsspec)") from None
    try:
        # no listings cache: a shard rewritten under the same name must not be read with a stale size
        options: dict = {"use_listings_cache": False}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if scheme_of(url) == "s3" and endpoint:  # S3-compatible stores (MinIO, Ceph, moto); explicit, so that
            options["endpoint_url"] = endpoint  # fsspec's per-settings cache of clients follows a change
        return fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as error:
        package = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}.get(scheme_of(url) or "", "aiohttp")
        raise StorageError(f"{url}: cannot read {scheme_of(url)}:// URLs ({error}); pip install {package}") from None


def _is_transient(error: BaseException) -> bool:
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    status = getattr(error, "status", None) or getattr(error, "code", None)
    if isinstance(status, int):
        return status >= 500 or status in (408, 429)
    module = type(error).__module__ or ""
    return isinstance(error, (OSError, TimeoutError, EOFError, ConnectionError)) or module.startswith(
        ("aiohttp", "botocore", "aiobotocore", "fsspec", "urllib3", "asyncio"))


def _describe(error: BaseException) -> str:
    if isinstance(error, FileNotFoundError):
        return "not found"
    if isinstance(error, PermissionError):
        return "access denied"
    return f"{type(error).__name__}: {str(error)[:200]}"


class RemoteReader:
    """Sequential reads of one remote object; after a transient failure it reopens the object at the byte reached
    (a range read where the store has them, else reading past what was already delivered) and goes on."""

    def __init__(self, url: str, size: int | None = None, retries: int | None = None, backoff_s: float | None = None):
        self.url, self.size = str(url), size
        self.retries = RETRIES if retries is None else retries
        self.backoff_s = BACKOFF_S if backoff_s is None else backoff_s
        self.position = 0
        self.handle = None
        self.attempts = 0  # opens so far (1 + reopenings), for tests and logs
        self._call(lambda: None)  # fail early, with the URL, when the object is missing

    def _open(self):
        fs, path = _filesystem(self.url)
        streaming = scheme_of(self.url) in ("http", "https")  # HTTP: one GET streamed, no range requests needed
        handle = fs.open(path, "rb", block_size=0 if streaming else STREAM_BLOCK)
        self.attempts += 1
        if self.position:
            try:
                handle.seek(self.position)
            except (ValueError, OSError, NotImplementedError):  # a plain stream: skip what was delivered already
                left = self.position
                while left:
                    skipped = handle.read(min(left, STREAM_BLOCK))
                    if not skipped:
                        raise EOFError(f"ended at byte {self.position - left} while resuming at {self.position}")
                    left -= len(skipped)
        self.handle = handle

    def _call(self, action):
        for attempt in range(self.retries + 1):
            try:
                if self.handle is None:
                    self._open()
                return action()
            except StorageError:
                raise
            except Exception as error:  # noqa: BLE001 - classified below; nothing is swallowed
                self.close()
                if not _is_transient(error):
                    raise (FileNotFoundError if isinstance(error, FileNotFoundError) else StorageError)(
                        f"{self.url}: {_describe(error)}") from None
                if attempt == self.retries:
                    raise StorageError(f"{self.url}: {_describe(error)} (gave up after {attempt + 1} attempts)") from None
                time.sleep(self.backoff_s * 2 ** attempt)
        raise AssertionError("unreachable")

    def read(self, size: int = -1) -> bytes:
        def once() -> bytes:
            data = self.handle.read(size if size is not None and size >= 0 else STREAM_BLOCK)
            if not data and size != 0 and self.size is not None and self.position < self.size:
                raise EOFError(f"the connection ended at byte {self.position} of {self.size}")
            return data

        data = self._call(once)
        self.position += len(data)
        return data

    def close(self) -> None:
        handle, self.handle = self.handle, None
        if handle is not None:
            try:
                handle.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close; it is dropped either way
                pass

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()


# ---- one opener for shards, local or remote, with an optional verified cache ---------------------------------------
class ShardOpener:
    """Opens shards: `opener(location, sha256, size) -> (binary file object, size or None)`. Picklable, so a
    DataLoader worker gets its own (it holds only settings)."""

    def __init__(self, cache_dir: str | os.PathLike | None = None, cache_gb: float = 0.0):
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.cache_bytes = int(float(cache_gb) * 1e9) if cache_gb else 0

    def __call__(self, location, sha256: str | None = None, size: int | None = None):
        if not is_remote(location):
            return open_local(location)
        if self.cache_dir is None or sha256 is None:
            return RemoteReader(location, size), None
        cached = self.cache_dir / f"{sha256}.tar"
        try:
            handle, found = open_local(cached)
            os.utime(cached)  # most recently used
            return handle, found
        except FileNotFoundError:
            pass
        return self._download(location, sha256, size, cached)

    def _download(self, location, sha256: str, size: int | None, cached: Path):
        """Stream to a temporary file while hashing; keep it as `<sha256>.tar` only if the hash is the index's."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        fd, temporary = tempfile.mkstemp(dir=self.cache_dir, prefix=".download-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, RemoteReader(location, size) as reader:
                for block in iter(lambda: reader.read(STREAM_BLOCK), b""):
                    digest.update(block)
                    out.write(block)
                    if size is not None and reader.position > size:
                        break  # longer than the index says: the shard reader reports it from the copy
            handle, found = open_local(temporary)
        except BaseException:
            os.unlink(temporary)
            raise
        if digest.hexdigest() == sha256:
            os.replace(temporary, cached)
            self._evict(keep=cached)
        else:
            os.unlink(temporary)  # never cached; the open handle still reads it, and the reader reports the checksum
        return handle, found

    def _evict(self, keep: Path) -> None:
        if not self.cache_bytes:
            return
        entries = []
        for path in self.cache_dir.glob("*.tar"):
            try:
                info = path.stat()
            except FileNotFoundError:  # removed by another process sharing the cache
                continue
            entries.append((info.st_mtime, info.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries, key=lambda e: e[0]):
            if total <= self.cache_bytes:
                break
            if path != keep:
                path.unlink(missing_ok=True)
                total -= size


def open_shard(location, sha256: str | None = None, size: int | None = None):
    """(binary file object, size if known) of a shard, without a cache."""
    return ShardOpener()(location, sha256, size)


def read_small(location, limit: int) -> bytes:
    """The whole content of a small file (an index), refusing more than `limit` bytes."""
    if is_remote(location):
        with RemoteReader(location) as reader:
            chunks, total = [], 0
            for block in iter(lambda: reader.read(STREAM_BLOCK), b""):
                chunks.append(block)
                total += len(block)
                if total > limit:
                    raise StorageError(f"{location}: more than the {limit} bytes an index may have")
            return b"".join(chunks)
    handle, size = open_local(location)
    with handle:
        if size > limit:
            raise StorageError(f"{location}: {size} bytes, more than the {limit} an index may have")
        return handle.read(limit + 1)


def upload_tree(local_root, url) -> list[str]:
    """Copy a built dataset folder to object storage; in each folder `index.json` goes last, so a reader never sees
    an index whose shards are not all there yet. Returns the URLs written."""
    local_root = Path(local_root)
    fs, _ = _filesystem(str(url))
    written = []
    files = sorted((p for p in local_root.rglob("*") if p.is_file()),
                   key=lambda p: (p.parent.as_posix(), p.name == "index.json", p.name))
    for path in files:
        target = str(url).rstrip("/") + "/" + path.relative_to(local_root).as_posix()
        _, remote_path = _filesystem(target)
        try:
            fs.put_file(str(path), remote_path)
        except Exception as error:  # noqa: BLE001 - one line naming the URL
            raise StorageError(f"{target}: upload failed ({_describe(error)})") from None
        written.append(target)
    return written


def exists(location) -> bool:
    if not is_remote(location):
        return Path(location).exists()
    try:
        RemoteReader(location, retries=1).close()
        return True
    except FileNotFoundError:
        return False


def _remote_children(location) -> list[str]:
    """Names directly below a remote prefix (S3/GCS listings, or an HTTP server's index page); [] if not listable."""
    try:
        fs, path = _filesystem(str(location))
        entries = fs.ls(path.rstrip("/") + ("/" if scheme_of(location) in ("http", "https") else ""), detail=False)
    except Exception:  # noqa: BLE001 - listing is optional (many HTTP servers have none)
        return []
    names = {str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries}
    return sorted(n for n in names if PLAIN_NAME.match(n))


def list_dirs(location) -> list:
    """Sub-folders of a dataset root, sorted (remote: listed names, or train/val/test when nothing can be listed)."""
    if is_remote(location):
        names = _remote_children(location) or ["train", "val", "test"]
        return [join(location, n) for n in names if "." not in n]
    path = Path(location)
    return sorted(p for p in path.iterdir() if p.is_dir()) if path.is_dir() else []


def list_names(location) -> list[str]:
    """File names directly inside a split directory (used to find stray shards)."""
    if is_remote(location):
        return _remote_children(location)
    path = Path(location)
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []

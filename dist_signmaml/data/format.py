"""The shard format, defined once. `shards/` writes it, `dist_signmaml.data.episode_loader` reads it.

Full description with examples: docs/shard_format.md. In short, a dataset split is a directory:

    <split_dir>/index.json            what is in the split (see `write_index`)
    <split_dir>/shard-000000.tar ...  uncompressed tar shards (WebDataset layout: members `KEY.SUFFIX`, grouped by KEY)

There are two kinds of split directory, told apart by `index.json`'s "kind":

* "classes" (training/evaluation data). One sample = one class, or one chunk of a class's images; all chunks of a
  class are in the same shard, so an episode of any ways/shots/queries can be assembled at train time from whole
  classes. Members of a sample with key K:

      K.images.npy   uint8 [n, H, W, C] (C = 1 grey, 3 RGB), raw pixels saved with numpy.save, never pickled
      K.class.json   {"name": str, "label": int (index of the class inside the split), "chunk": int}

* "episodes" (fixed evaluation tasks, `python -m shards episodes`). One sample = one whole episode:

      K.support.npy  uint8 [ways*shots, H, W, C], class-major (all shots of label 0, then label 1, ...)
      K.query.npy    uint8 [ways*queries, H, W, C], class-major
      K.episode.json {"id": int, "classes": [class name of label 0, 1, ...]}

Nothing else is allowed in a shard. The reader below is strict because shards may come from anywhere: only regular
members named `KEY.SUFFIX` with a known suffix, no links or directories, no compression, no pickles; it reads into
memory and never extracts, so a hostile shard cannot write files or run code. Every problem is a ShardFormatError
naming the shard and the member.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import tarfile
import warnings
from collections import deque
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from dist_signmaml.data import storage

FORMAT_VERSION = 1
INDEX_NAME = "index.json"
SHARD_PATTERN = "shard-%06d.tar"
KIND_CLASSES = "classes"
KIND_EPISODES = "episodes"
IMAGES_MEMBER = "images.npy"
CLASS_MEMBER = "class.json"
SUPPORT_MEMBER = "support.npy"
QUERY_MEMBER = "query.npy"
EPISODE_MEMBER = "episode.json"
MEMBERS = {KIND_CLASSES: frozenset({IMAGES_MEMBER, CLASS_MEMBER}),
           KIND_EPISODES: frozenset({SUPPORT_MEMBER, QUERY_MEMBER, EPISODE_MEMBER})}
ALLOWED_MEMBERS = MEMBERS[KIND_CLASSES]
SAMPLE_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")
# Shard file names listed in index.json: a plain file name inside the split directory (no path, no URL scheme such
# as webdataset's `pipe:`, which would run a shell command).
SHARD_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,200}\.tar$")
BAD_SAMPLE_POLICIES = ("error", "skip")


class ShardFormatError(ValueError):
    """A shard or index that does not follow the format; the message names the file and member."""


class ShardChecksumError(ShardFormatError):
    """A shard whose bytes differ from its index entry; found at its end, so nothing read from it may be kept."""


@dataclass(frozen=True)
class ClassChunk:
    """One decoded sample: the images of one class (or a chunk of them)."""

    name: str
    label: int
    images: np.ndarray  # uint8 [n, H, W, C]
    chunk: int = 0  # position among the chunks of a class bigger than a shard


@dataclass(frozen=True)
class StoredEpisode:
    """One decoded episode sample; labels are implied by the class-major order (see the module docstring)."""

    id: int
    classes: tuple[str, ...]
    support: np.ndarray  # uint8 [ways*shots, H, W, C]
    query: np.ndarray  # uint8 [ways*queries, H, W, C]


# ---- encoding ------------------------------------------------------------------------------------------------------
def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def check_images(images: np.ndarray, what: str) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ShardFormatError(f"{what}: images must be uint8 [n, H, W, C] with C 1 or 3, got "
                               f"{getattr(images, 'dtype', type(images))} {getattr(images, 'shape', '')}")


def encode_sample(key: str, name: str, label: int, images: np.ndarray, chunk: int = 0) -> dict:
    """The dict `webdataset.TarWriter.write` takes for one class chunk (members already bytes)."""
    if not SAMPLE_KEY_PATTERN.match(key):
        raise ShardFormatError(f"sample key {key!r} must match {SAMPLE_KEY_PATTERN.pattern}")
    check_images(images, f"class {name!r}")
    meta = json.dumps({"name": name, "label": int(label), "chunk": int(chunk)}, sort_keys=True)
    return {"__key__": key, IMAGES_MEMBER: npy_bytes(images), CLASS_MEMBER: meta.encode()}


def encode_episode(key: str, episode_id: int, classes, support: np.ndarray, query: np.ndarray) -> dict:
    """The TarWriter dict of one materialised episode."""
    if not SAMPLE_KEY_PATTERN.match(key):
        raise ShardFormatError(f"sample key {key!r} must match {SAMPLE_KEY_PATTERN.pattern}")
    check_images(support, f"episode {episode_id} support")
    check_images(query, f"episode {episode_id} query")
    meta = json.dumps({"id": int(episode_id), "classes": [str(c) for c in classes]}, sort_keys=True)
    return {"__key__": key, SUPPORT_MEMBER: npy_bytes(support), QUERY_MEMBER: npy_bytes(query),
            EPISODE_MEMBER: meta.encode()}


# ---- strict tar reading --------------------------------------------------------------------------------------------
MAX_MEMBER_BYTES = 1 << 31  # a member can never be bigger than its shard; this caps it when no index gives the size
MAX_HEADER_BYTES = 1 << 16  # a pax or GNU long-name header: real ones are a few hundred bytes
MAX_TRAILER_BYTES = 1 << 20  # zeros after the end-of-archive marker (tar pads to 10 kB records); more is not a shard
MAX_INDEX_BYTES = 1 << 28
READ_BLOCK = 1 << 16
MESSAGE_VALUE_CHARS = 80


def shown(value, limit: int = MESSAGE_VALUE_CHARS) -> str:
    """repr(value) cut to `limit` characters: names come from files, and a 20 MB class name must not reach a log."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"


class _OversizedHeader(tarfile.TarError):
    pass


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads a pax or GNU long-name header whole before yielding the member it describes: refuse big ones
    before they are read (a hostile 6 GB pax header is otherwise a MemoryError)."""

    def _check_header_size(self, tar):
        if self.size > MAX_HEADER_BYTES:
            raise _OversizedHeader(f"a {self.size}-byte extended tar header (at most {MAX_HEADER_BYTES} are accepted)")

    def _proc_pax(self, tar):
        self._check_header_size(tar)
        return super()._proc_pax(tar)

    def _proc_gnulong(self, tar):
        self._check_header_size(tar)
        return super()._proc_gnulong(tar)


class HashingReader:
    """A read-only byte stream that hashes everything read through it, refuses to go past `limit` bytes, and keeps
    the last bytes read (tarfile reads ahead; the bytes it pulled past the last member are checked as the trailer)."""

    def __init__(self, raw, where: str, limit: int | None, keep: int = 4 * READ_BLOCK):
        self.raw, self.where, self.limit, self.keep = raw, where, limit, keep
        self.digest = hashlib.sha256()
        self.position = 0
        self.tail: deque[bytes] = deque()
        self.tail_bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size if size is not None and size >= 0 else READ_BLOCK)
        self.position += len(data)
        if self.limit is not None and self.position > self.limit:
            raise ShardFormatError(f"{self.where}: longer than the {self.limit} bytes the index gives it")
        self.digest.update(data)
        self.tail.append(data)
        self.tail_bytes += len(data)
        while self.tail and self.tail_bytes - len(self.tail[0]) >= self.keep:
            self.tail_bytes -= len(self.tail.popleft())
        return data

    def since(self, offset: int) -> bytes:
        """The bytes from stream offset `offset` to what has been read so far (must be within the kept tail)."""
        missing = self.position - offset
        if missing > self.tail_bytes:
            raise RuntimeError(f"tar read-ahead of {missing} bytes exceeds the kept {self.tail_bytes}")
        return b"".join(self.tail)[self.tail_bytes - missing:] if missing > 0 else b""


def _check_trailer(reader: HashingReader, end: int, url: str, last: str) -> ShardFormatError | None:
    """After the last member: only zeros, at least the two-block end-of-archive marker, at most MAX_TRAILER_BYTES."""
    pending = reader.since(end)
    trailer = len(pending)
    clean = pending.count(0) == len(pending)
    while clean and trailer <= MAX_TRAILER_BYTES:
        block = reader.read(READ_BLOCK)
        if not block:
            break
        trailer += len(block)
        clean = block.count(0) == len(block)
    # tarfile stops silently at a header it cannot parse after the first one, and at the end of the file, so
    # anything but zeros there means the shard is corrupt at that point or was cut short between two members.
    if not clean:
        return ShardFormatError(f"{url}: corrupt tar header at byte {end} after member {shown(last)}")
    if trailer > MAX_TRAILER_BYTES:
        return ShardFormatError(f"{url}: more than {MAX_TRAILER_BYTES} bytes after the end of the archive")
    if trailer < 2 * tarfile.BLOCKSIZE:
        return ShardFormatError(f"{url}: truncated tar (no end-of-archive marker) after member {shown(last)}")
    return None


def iter_raw_samples(path, kind: str = KIND_CLASSES, *, sha256: str | None = None, size: int | None = None,
                     opener: Callable | None = None) -> Iterator[dict | ShardFormatError]:
    """Stream the samples of one shard as dicts {"__key__", "__url__", suffix: bytes}, without extracting anything.

    `path` is a shard location, opened by `opener` (default `storage.open_shard`; a `storage.ShardOpener` adds a
    verified local cache); `sha256` and `size` are what the index says of the shard: the bytes
    are hashed while they stream, and no member bigger than the shard is ever read (without a size, a member may
    have at most MAX_MEMBER_BYTES). Problems confined to one sample (an unexpected member name, a link, a duplicate
    member) are *yielded* as ShardFormatError values so the caller can skip that sample and go on; problems that
    make the rest of the shard untrustworthy (truncation, a corrupt header, compression, an oversized member, a
    checksum that differs from the index) are yielded last and end the iteration; a checksum error comes after
    the shard's samples, so a caller must drop what it read from that shard.
    Python's tarfile is used in pure streaming mode ("r|"): it reads headers and bytes in order and never touches the
    file system, and "r|" refuses compressed streams, so a decompression bomb cannot be smuggled in.
    """
    url = str(path)
    allowed = MEMBERS[kind]
    current: dict | None = None
    bad_keys: set[str] = set()
    finished_keys: set[str] = set()
    last = "(start of file)"
    member_limit = min(size, MAX_MEMBER_BYTES) if size else MAX_MEMBER_BYTES

    def flush():
        nonlocal current
        sample, current = current, None
        if sample is not None and sample["__key__"] not in bad_keys:
            finished_keys.add(sample["__key__"])
            return sample
        return None

    try:
        handle, found_size = (opener or storage.open_shard)(path, sha256, size)
    except OSError as error:  # the message names the location: missing, not a regular file, unreachable
        yield ShardFormatError(str(error))
        return
    with handle:
        if size and found_size is not None and found_size != size:
            yield ShardFormatError(f"{url}: {found_size} bytes, the index says {size}")
            return
        reader = HashingReader(handle, url, size or None)
        try:
            archive = tarfile.open(fileobj=reader, mode="r|", tarinfo=_BoundedTarInfo, bufsize=READ_BLOCK)
            for member in archive:
                archive.members = []  # streaming: do not keep every header of a large shard in memory
                name = member.name
                where = f"{url} member {shown(name)}"
                match = re.match(r"^([^/.]+)\.([^/]+)$", name)
                key = match.group(1) if match else None
                if current is not None and key != current["__key__"]:
                    done = flush()
                    if done is not None:
                        yield done
                if not member.isreg():
                    kind_word = "link" if (member.issym() or member.islnk()) else "directory" if member.isdir() else "special file"
                    yield ShardFormatError(f"{where}: a {kind_word}; shards may only hold regular files")
                    if key:
                        bad_keys.add(key)
                    last = name
                    continue
                if member.size > member_limit:  # refused before a byte of it is read
                    yield ShardFormatError(f"{where}: {member.size} bytes, more than the {member_limit} "
                                           f"{'the index gives the whole shard' if size else 'a member may have'}")
                    return
                if match is None or not SAMPLE_KEY_PATTERN.match(key) or match.group(2) not in allowed:
                    yield ShardFormatError(f"{where}: unexpected member name; expected KEY.SUFFIX with KEY matching "
                                           f"{SAMPLE_KEY_PATTERN.pattern} and SUFFIX one of {sorted(allowed)}")
                    if key:
                        bad_keys.add(key)
                    last = name
                    continue
                suffix = match.group(2)
                if current is None:
                    if key in finished_keys:
                        yield ShardFormatError(f"{where}: sample key {key!r} appears twice (members of a sample must be adjacent)")
                        bad_keys.add(key)
                    current = {"__key__": key, "__url__": url}
                if suffix in current:
                    yield ShardFormatError(f"{where}: duplicate member {suffix!r} in sample {key!r}")
                    bad_keys.add(key)
                current[suffix] = archive.extractfile(member).read()
                if len(current[suffix]) != member.size:
                    raise tarfile.ReadError(f"member {shown(name)} is cut short")
                last = name
            done = flush()
            if done is not None:
                yield done
            problem = _check_trailer(reader, archive.offset, url, last)
            if problem is not None:
                yield problem
            elif sha256 is not None and reader.digest.hexdigest() != sha256:
                yield ShardChecksumError(f"{url}: sha256 differs from the index (corrupt or modified shard: "
                                         f"{reader.digest.hexdigest()[:16]}..., the index says {sha256[:16]}...)")
        except ShardFormatError as error:
            yield error
        except storage.StorageError as error:  # a remote read that failed for good (retries spent)
            yield ShardFormatError(str(error))
        except _OversizedHeader as error:
            yield ShardFormatError(f"{url}: {error} after member {shown(last)}")
        except (tarfile.TarError, EOFError, OSError) as error:
            yield ShardFormatError(f"{url}: truncated or corrupt tar after member {shown(last)} ({error})")


def load_npy(data: bytes, where: str) -> np.ndarray:
    if not data.startswith(b"\x93NUMPY"):
        raise ShardFormatError(f"{where}: not a readable .npy array (no .npy header; pickles are never loaded)")
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as error:  # numpy raises several types for bad bytes
        reason = ("it holds pickled objects, which are never loaded from shards" if "pickle" in str(error)
                  else f"{type(error).__name__}: {error}")
        raise ShardFormatError(f"{where}: not a readable .npy array ({reason})") from None
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != 4 or array.shape[0] < 1:
        raise ShardFormatError(f"{where}: expected uint8 [n>0, H, W, C], got {getattr(array, 'dtype', '?')} "
                               f"{getattr(array, 'shape', '?')}")
    return array


def load_json(data: bytes, where: str) -> dict:
    try:
        value = json.loads(data.decode("utf-8"))
    except Exception as error:
        raise ShardFormatError(f"{where}: not valid UTF-8 JSON ({error})") from None
    if not isinstance(value, dict):
        raise ShardFormatError(f"{where}: expected a JSON object")
    return value


def check_members(sample: dict, kind: str) -> str:
    where = f"{sample.get('__url__', '?')} member {sample.get('__key__', '?')}"
    if not SAMPLE_KEY_PATTERN.match(str(sample.get("__key__", ""))):
        raise ShardFormatError(f"{where}: invalid sample key (expected {SAMPLE_KEY_PATTERN.pattern})")
    members = {k for k in sample if not k.startswith("__")}
    if members != MEMBERS[kind]:
        raise ShardFormatError(f"{where}: members {sorted(members)}, expected exactly {sorted(MEMBERS[kind])}")
    return where


def check_shape(images: np.ndarray, image_shape, where: str) -> None:
    if image_shape is not None and tuple(images.shape[1:]) != tuple(image_shape):
        raise ShardFormatError(f"{where}: image shape {tuple(images.shape[1:])}, the index says {tuple(image_shape)}")


def decode_sample(sample: dict, image_shape: tuple[int, int, int] | None = None) -> ClassChunk:
    """Decode one raw class sample (member name -> bytes) without ever unpickling.

    Raises ShardFormatError naming the shard URL and the member when anything is off.
    """
    where = check_members(sample, KIND_CLASSES)
    images = load_npy(sample[IMAGES_MEMBER], f"{where}.{IMAGES_MEMBER}")
    check_shape(images, image_shape, f"{where}.{IMAGES_MEMBER}")
    meta = load_json(sample[CLASS_MEMBER], f"{where}.{CLASS_MEMBER}")
    try:
        return ClassChunk(name=str(meta["name"]), label=int(meta["label"]), images=images, chunk=int(meta.get("chunk", 0)))
    except (KeyError, TypeError, ValueError) as error:
        raise ShardFormatError(f"{where}.{CLASS_MEMBER}: expected JSON with name and label ({error})") from None


def decode_episode(sample: dict, image_shape, ways: int, shots: int, queries: int) -> StoredEpisode:
    """Decode one raw episode sample and check it against the episode index's ways/shots/queries."""
    where = check_members(sample, KIND_EPISODES)
    support = load_npy(sample[SUPPORT_MEMBER], f"{where}.{SUPPORT_MEMBER}")
    query = load_npy(sample[QUERY_MEMBER], f"{where}.{QUERY_MEMBER}")
    for images, member, expected in ((support, SUPPORT_MEMBER, ways * shots), (query, QUERY_MEMBER, ways * queries)):
        check_shape(images, image_shape, f"{where}.{member}")
        if len(images) != expected:
            raise ShardFormatError(f"{where}.{member}: {len(images)} images, the index says {expected}")
    meta = load_json(sample[EPISODE_MEMBER], f"{where}.{EPISODE_MEMBER}")
    try:
        classes = tuple(str(c) for c in meta["classes"])
        episode_id = int(meta["id"])
    except (KeyError, TypeError, ValueError) as error:
        raise ShardFormatError(f"{where}.{EPISODE_MEMBER}: expected JSON with id and classes ({error})") from None
    if len(classes) != ways:
        raise ShardFormatError(f"{where}.{EPISODE_MEMBER}: {len(classes)} classes, the index says ways={ways}")
    return StoredEpisode(id=episode_id, classes=classes, support=support, query=query)


# ---- bad samples ---------------------------------------------------------------------------------------------------
class BadSamples:
    """What happens to a sample that cannot be read: policy "error" raises its ShardFormatError; "skip" counts it
    (each distinct problem once, however often its shard is re-read) and the caller goes on without it.

    Skips are warned one by one only for the first SHOWN_ONE_BY_ONE; after that a summary line at 100, 1000, ...
    keeps stderr bounded (50,000 bad members are 5 lines, not 50,000), and the count reaches TensorBoard."""

    SHOWN_ONE_BY_ONE = 10

    def __init__(self, policy: str = "error", on_count: Callable[[int], None] | None = None):
        if policy not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"--on_bad_sample={policy!r} is invalid: expected one of {', '.join(BAD_SAMPLE_POLICIES)}")
        self.policy = policy
        self.seen: set[bytes] = set()  # digests, so 50,000 long messages do not stay in memory
        self.on_count = on_count

    @property
    def count(self) -> int:
        return len(self.seen)

    def __call__(self, error: ShardFormatError) -> None:
        if self.policy == "error":
            raise error
        message = str(error)
        digest = hashlib.sha1(message.encode("utf-8", "replace")).digest()
        if digest in self.seen:
            return
        self.seen.add(digest)
        n = self.count
        if n <= self.SHOWN_ONE_BY_ONE:
            more = "; further ones are counted, with a summary at 100, 1000, ..." if n == self.SHOWN_ONE_BY_ONE else ""
            warnings.warn(f"skipped bad sample #{n} (--on_bad_sample skip): {message[:1000]}{more}", stacklevel=3)
        elif n >= 100 and str(n).strip("0") == "1":
            warnings.warn(f"skipped {n} bad samples so far (--on_bad_sample skip; the first "
                          f"{self.SHOWN_ONE_BY_ONE} were shown one by one)", stacklevel=3)
        if self.on_count is not None:
            self.on_count(n)


class ClassAssembler:
    """The classes of one shard, chunk by chunk. A class name may appear in several samples only as consecutive
    chunks 0, 1, 2, ... with one label (how the writer splits a class bigger than a shard); anything else, such as
    two samples with the same class name, is an error instead of a silent merge."""

    def __init__(self, url: str):
        self.url = url
        self.parts: dict[str, list[np.ndarray]] = {}
        self.first_key: dict[str, str] = {}
        self.label: dict[str, int] = {}
        self.previous: str | None = None

    def add(self, chunk: ClassChunk, key: str) -> None:
        name = chunk.name
        if name in self.parts:
            follows = (self.previous == name and chunk.chunk == len(self.parts[name])
                       and chunk.label == self.label[name])
            if not follows:
                self.previous = None
                raise ShardFormatError(f"{self.url} member {key}: class {shown(name)} is also sample "
                                       f"{self.first_key[name]}; two samples of one shard may share a class name "
                                       f"only as its consecutive chunks 0, 1, ... with one label")
            self.parts[name].append(chunk.images)
        else:
            if chunk.chunk != 0:
                self.previous = None
                raise ShardFormatError(f"{self.url} member {key}: class {shown(name)} starts at chunk {chunk.chunk}, "
                                       f"expected chunk 0")
            self.parts[name], self.first_key[name], self.label[name] = [chunk.images], key, chunk.label
        self.previous = name

    def drop(self, name: str) -> None:
        self.parts.pop(name, None)

    def classes(self) -> dict[str, np.ndarray]:
        return {name: np.concatenate(p) if len(p) > 1 else p[0] for name, p in self.parts.items()}


def read_class_shard(path, image_shape=None, bad: BadSamples | None = None,
                     expected: dict[str, int] | None = None, *, sha256: str | None = None,
                     size: int | None = None, opener: Callable | None = None) -> dict[str, np.ndarray]:
    """All classes of one class shard: name -> uint8 [n, H, W, C] (chunks of a class concatenated in order).

    With `expected` (class name -> image count, from the index) the content must match it exactly: a class that is
    missing, has another image count, or is not listed is a bad sample (raised, or skipped and counted). With
    `sha256`, a shard whose bytes differ from the index yields nothing (one bad sample)."""
    bad = bad or BadSamples("error")
    assembler = ClassAssembler(str(path))
    broken: set[str] = set()
    skipped = 0
    for item in iter_raw_samples(path, KIND_CLASSES, sha256=sha256, size=size, opener=opener):
        try:
            if isinstance(item, ShardFormatError):
                if isinstance(item, ShardChecksumError):
                    bad(item)
                    return {}
                raise item
            chunk = decode_sample(item, image_shape)
            if chunk.name in broken:
                continue
            try:
                assembler.add(chunk, item["__key__"])
            except ShardFormatError:
                broken.add(chunk.name)  # ambiguous: never train on a merge of two classes
                assembler.drop(chunk.name)
                raise
        except ShardFormatError as error:
            bad(error)
            skipped += 1
            continue
    classes = assembler.classes()
    if expected is not None:
        for name in sorted(set(expected) | set(classes)):
            found = len(classes[name]) if name in classes else 0
            if name not in expected or found != expected[name]:
                classes.pop(name, None)  # incomplete or unknown: never train on part of a class
                if not skipped:  # after a skipped sample this is its consequence, already reported and counted
                    listed = f"listed in the index with {expected[name]} images" if name in expected else "not in the index"
                    bad(ShardFormatError(f"{path}: class {shown(name)} {listed}, but the shard holds {found} readable images"))
    return classes


def read_episode_shard(path, index: "EpisodeIndex", bad: BadSamples | None = None, *,
                       opener: Callable | None = None) -> list[StoredEpisode]:
    """The episodes of one episode shard (all of them: a checksum mismatch, found at the end, drops the shard)."""
    bad = bad or BadSamples("error")
    name = str(path).rsplit("/", 1)[-1]
    episodes = []
    for item in iter_raw_samples(path, KIND_EPISODES, sha256=index.shard_sha256.get(name),
                                 size=index.shard_bytes.get(name), opener=opener):
        try:
            if isinstance(item, ShardFormatError):
                if isinstance(item, ShardChecksumError):
                    bad(item)
                    return []
                raise item
            episodes.append(decode_episode(item, index.image_shape, index.ways, index.shots, index.queries))
        except ShardFormatError as error:
            bad(error)
    return episodes


# ---- index ---------------------------------------------------------------------------------------------------------
def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class SplitIndex:
    """What `index.json` says about one class split. `classes` maps class name -> (shard file, image count)."""

    root: Path | str  # a local directory or an object-storage URL (see storage)
    dataset: str
    split: str
    image_shape: tuple[int, int, int]  # H, W, C
    mean: tuple[float, ...]
    std: tuple[float, ...]
    shards: tuple[str, ...]
    classes: dict[str, tuple[str, int]]
    shard_sha256: dict[str, str]
    shard_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def shard_paths(self) -> list:
        return [self.location(name) for name in self.shards]

    def location(self, shard: str):
        return storage.join(self.root, shard)

    def classes_with_at_least(self, images: int) -> list[str]:
        return [name for name, (_, count) in self.classes.items() if count >= images]

    @cached_property
    def shard_contents(self) -> dict[str, dict[str, int]]:
        """shard file -> {class name: image count}, in index order."""
        contents: dict[str, dict[str, int]] = {shard: {} for shard in self.shards}
        for name, (shard, count) in self.classes.items():
            contents[shard][name] = count
        return contents


@dataclass(frozen=True)
class EpisodeIndex:
    """What `index.json` says about a directory of materialised episodes."""

    root: Path | str
    dataset: str
    split: str
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    ways: int
    shots: int
    queries: int
    seed: int
    shards: tuple[str, ...]
    episodes_per_shard: tuple[int, ...]
    shard_sha256: dict[str, str]
    shard_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def episodes(self) -> int:
        return sum(self.episodes_per_shard)

    def location(self, shard: str):
        return storage.join(self.root, shard)

    def locate(self, episode_id: int) -> tuple[int, int]:
        """(shard position, position inside the shard) of an episode id."""
        start = 0
        for position, count in enumerate(self.episodes_per_shard):
            if episode_id < start + count:
                return position, episode_id - start
            start += count
        raise IndexError(f"{self.root}: episode {episode_id} requested but only {self.episodes} were materialised")


def _shard_entries(split_dir: Path, shard_items: dict[str, dict]) -> list[dict]:
    entries = []
    for shard_name in sorted(shard_items):
        path = split_dir / shard_name
        entries.append({"name": shard_name, "bytes": path.stat().st_size, "sha256": sha256_of(path)} | shard_items[shard_name])
    return entries


def write_index(split_dir: Path, *, dataset: str, split: str, image_shape, mean, std, shard_classes,
                source: dict | None = None) -> dict:
    """Write a class split's `index.json`. `shard_classes` maps shard file -> list of (class name, image count).
    `source` records how the split was built (builder options; no timestamps, so rebuilds stay byte-identical)."""
    items = {s: {"classes": [{"name": n, "images": int(c)} for n, c in classes]} for s, classes in shard_classes.items()}
    shards = _shard_entries(split_dir, items)
    counts = [x["images"] for s in shards for x in s["classes"]]
    index = {
        "format_version": FORMAT_VERSION, "kind": KIND_CLASSES, "dataset": dataset, "split": split,
        "image_shape": [int(v) for v in image_shape], "channels": int(image_shape[-1]),
        "image_encoding": "npy-uint8-NHWC",
        "mean": [float(v) for v in mean], "std": [float(v) for v in std],
        "num_classes": len(counts), "num_images": int(sum(counts)),
        "images_per_class": {"min": int(min(counts)), "max": int(max(counts))},
        "source": source or {}, "shards": shards,
    }
    (split_dir / INDEX_NAME).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    return index


def write_episode_index(out_dir: Path, *, dataset: str, split: str, image_shape, mean, std, ways: int, shots: int,
                        queries: int, seed: int, shard_episodes: dict[str, int], source: dict | None = None) -> dict:
    shards = _shard_entries(out_dir, {s: {"episodes": int(n)} for s, n in shard_episodes.items()})
    index = {
        "format_version": FORMAT_VERSION, "kind": KIND_EPISODES, "dataset": dataset, "split": split,
        "image_shape": [int(v) for v in image_shape], "channels": int(image_shape[-1]),
        "image_encoding": "npy-uint8-NHWC", "mean": [float(v) for v in mean], "std": [float(v) for v in std],
        "ways": int(ways), "shots": int(shots), "queries": int(queries), "seed": int(seed),
        "num_episodes": int(sum(shard_episodes.values())), "source": source or {}, "shards": shards,
    }
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    return index


MAX_IMAGE_SIDE = 4096  # pixels; bigger "images" in an index are a lie that would size a model of many GB


def _load_raw_index(split_dir) -> tuple[str, dict]:
    path = storage.join(split_dir, INDEX_NAME)
    if not storage.is_remote(split_dir):
        if not Path(split_dir).is_dir():
            raise FileNotFoundError(f"data split directory {split_dir} does not exist (expected a folder with "
                                    f"{INDEX_NAME} and shard-*.tar)")
        if not Path(path).exists():
            raise FileNotFoundError(f"{path} is missing: {split_dir} is not a shard directory (build one with "
                                    f"`python -m shards build`)")
    try:
        data = storage.read_small(path, MAX_INDEX_BYTES)
    except FileNotFoundError:
        raise
    except OSError as error:
        raise ShardFormatError(f"unreadable index ({error})") from None
    try:
        raw = json.loads(data.decode("utf-8"))
    except RecursionError:
        raise ShardFormatError(f"{path}: unreadable index (JSON nested too deeply)") from None
    except Exception as error:
        raise ShardFormatError(f"{path}: unreadable index ({type(error).__name__}: {str(error)[:200]})") from None
    if not isinstance(raw, dict):
        raise ShardFormatError(f"{path}: unreadable index (expected a JSON object)")
    if raw.get("format_version") != FORMAT_VERSION:
        raise ShardFormatError(f"{path}: format_version {shown(raw.get('format_version'))}, this code reads {FORMAT_VERSION}")
    shards = raw.get("shards")
    if not isinstance(shards, list) or not shards:
        raise ShardFormatError(f"{path}: 'shards' must be a non-empty list of shard entries")
    for shard in shards:
        name = shard.get("name") if isinstance(shard, dict) else None
        if not isinstance(name, str) or not SHARD_NAME_PATTERN.match(name):
            raise ShardFormatError(f"{path}: shard name {shown(name)} is not a plain file name matching {SHARD_NAME_PATTERN.pattern}")
        size, digest = shard.get("bytes"), shard.get("sha256")
        if not isinstance(size, int) or isinstance(size, bool) or size < 2 * tarfile.BLOCKSIZE:
            raise ShardFormatError(f"{path}: shard {name}: 'bytes' {shown(size)} must be the shard's size in bytes")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ShardFormatError(f"{path}: shard {name}: 'sha256' {shown(digest)} must be 64 hex digits")
    _check_image_facts(path, raw)
    return path, raw


def _check_image_facts(path, raw: dict) -> None:
    """image_shape [H, W, C] within sane bounds and per-channel finite statistics (std > 0), before anything is
    sized from them."""
    shape = raw.get("image_shape")
    if (not isinstance(shape, list) or len(shape) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in shape)):
        raise ShardFormatError(f"{path}: image_shape {shown(shape)} must be [height, width, channels] (3 integers)")
    height, width, channels = shape
    if not (1 <= height <= MAX_IMAGE_SIDE and 1 <= width <= MAX_IMAGE_SIDE) or channels not in (1, 3):
        raise ShardFormatError(f"{path}: image_shape {shape} is out of bounds: height and width 1..{MAX_IMAGE_SIDE}, "
                               f"channels 1 or 3")
    for name in ("mean", "std"):
        values = raw.get(name)
        if not isinstance(values, list) or len(values) != channels:
            raise ShardFormatError(f"{path}: {name} {shown(values)} must list one number per channel ({channels})")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise ShardFormatError(f"{path}: {name} {shown(values)} must be finite numbers")
        if name == "std" and not all(v > 0 for v in values):
            raise ShardFormatError(f"{path}: std {shown(values)} must be > 0 (inputs are divided by it)")


def _root(split_dir):
    return storage.Url(split_dir) if storage.is_remote(split_dir) else Path(split_dir)


def _check_pixels_fit(path, shard: str, images: int, image_shape, size: int) -> None:
    """The images the index puts in a shard must fit in its bytes: an image_shape that lies is caught here."""
    pixels = images * math.prod(image_shape)
    if pixels > size:
        raise ShardFormatError(f"{path}: shard {shard} is {size} bytes but would hold {images} images of "
                               f"{tuple(image_shape)} = {pixels} bytes of pixels; image_shape or the counts are wrong")


def index_kind(split_dir: str | Path) -> str:
    """"classes" or "episodes" (indexes written before "kind" existed are class splits)."""
    _, raw = _load_raw_index(split_dir)
    return str(raw.get("kind", KIND_CLASSES))


def read_index(split_dir: str | Path) -> SplitIndex:
    """Read and check a class split's `index.json`; every problem is reported with the file it concerns."""
    path, raw = _load_raw_index(split_dir)
    kind = raw.get("kind", KIND_CLASSES)
    if kind != KIND_CLASSES:
        raise ShardFormatError(f"{path}: kind {kind!r}, expected a class split ({KIND_CLASSES!r}); episode "
                               f"directories are read by fixed_episodes")
    try:
        classes = {}
        for shard in raw["shards"]:
            for entry in shard["classes"]:
                if entry["name"] in classes:
                    raise ShardFormatError(f"{path}: class {shown(entry['name'])} listed twice")
                classes[entry["name"]] = (shard["name"], int(entry["images"]))
            _check_pixels_fit(path, shard["name"], sum(int(e["images"]) for e in shard["classes"]),
                              raw["image_shape"], shard["bytes"])
        return SplitIndex(
            root=_root(split_dir), dataset=str(raw["dataset"]), split=str(raw["split"]),
            image_shape=tuple(int(v) for v in raw["image_shape"]),
            mean=tuple(float(v) for v in raw["mean"]), std=tuple(float(v) for v in raw["std"]),
            shards=tuple(s["name"] for s in raw["shards"]), classes=classes,
            shard_sha256={s["name"]: s["sha256"] for s in raw["shards"]},
            shard_bytes={s["name"]: int(s["bytes"]) for s in raw["shards"]},
        )
    except ShardFormatError:
        raise
    except Exception as error:
        raise ShardFormatError(f"{path}: unreadable index ({type(error).__name__}: {shown(error, 200)})") from None


def read_episode_index(split_dir: str | Path) -> EpisodeIndex:
    path, raw = _load_raw_index(split_dir)
    if raw.get("kind") != KIND_EPISODES:
        raise ShardFormatError(f"{path}: kind {raw.get('kind', KIND_CLASSES)!r}, expected {KIND_EPISODES!r}")
    try:
        per_episode = int(raw["ways"]) * (int(raw["shots"]) + int(raw["queries"]))
        for shard in raw["shards"]:
            _check_pixels_fit(path, shard["name"], int(shard["episodes"]) * per_episode, raw["image_shape"], shard["bytes"])
        return EpisodeIndex(
            root=_root(split_dir), dataset=str(raw["dataset"]), split=str(raw["split"]),
            image_shape=tuple(int(v) for v in raw["image_shape"]),
            mean=tuple(float(v) for v in raw["mean"]), std=tuple(float(v) for v in raw["std"]),
            ways=int(raw["ways"]), shots=int(raw["shots"]), queries=int(raw["queries"]), seed=int(raw["seed"]),
            shards=tuple(s["name"] for s in raw["shards"]),
            episodes_per_shard=tuple(int(s["episodes"]) for s in raw["shards"]),
            shard_sha256={s["name"]: s["sha256"] for s in raw["shards"]},
            shard_bytes={s["name"]: int(s["bytes"]) for s in raw["shards"]},
        )
    except ShardFormatError:
        raise
    except Exception as error:
        raise ShardFormatError(f"{path}: unreadable episode index ({type(error).__name__}: {shown(error, 200)})") from None

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
import re
import tarfile
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

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


@dataclass(frozen=True)
class ClassChunk:
    """One decoded sample: the images of one class (or a chunk of them)."""

    name: str
    label: int
    images: np.ndarray  # uint8 [n, H, W, C]


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
def iter_raw_samples(path: str | Path, kind: str = KIND_CLASSES) -> Iterator[dict | ShardFormatError]:
    """Stream the samples of one shard as dicts {"__key__", "__url__", suffix: bytes}, without extracting anything.

    Problems confined to one sample (an unexpected member name, a link, a duplicate member) are *yielded* as
    ShardFormatError values so the caller can skip that sample and go on; problems that make the rest of the tar
    untrustworthy (truncation, a corrupt header, compression) are yielded last and end the iteration.
    Python's tarfile is used in pure streaming mode ("r|"): it reads headers and bytes in order and never touches the
    file system, and "r|" refuses compressed streams, so a decompression bomb cannot be smuggled in.
    """
    url = str(path)
    allowed = MEMBERS[kind]
    current: dict | None = None
    bad_keys: set[str] = set()
    finished_keys: set[str] = set()
    last = "(start of file)"

    def flush():
        nonlocal current
        sample, current = current, None
        if sample is not None and sample["__key__"] not in bad_keys:
            finished_keys.add(sample["__key__"])
            return sample
        return None

    try:
        handle = open(path, "rb")
    except OSError as error:
        yield ShardFormatError(f"{url}: cannot open shard ({error.strerror or error})")
        return
    with handle:
        try:
            archive = tarfile.open(fileobj=handle, mode="r|")
            for member in archive:
                archive.members = []  # streaming: do not keep every header of a large shard in memory
                name = member.name
                where = f"{url} member {name!r}"
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
                    raise tarfile.ReadError(f"member {name!r} is cut short")
                last = name
            done = flush()
            if done is not None:
                yield done
            # tarfile stops silently at a header it cannot parse after the first one, and at the end of the file;
            # a complete shard ends in (at least two) zero blocks, so anything else there means the shard is
            # corrupt at that point or was cut short between two members.
            end = archive.offset
            handle.seek(end)
            trailer = 0
            for block in iter(lambda: handle.read(1 << 16), b""):
                if block.count(0) != len(block):
                    yield ShardFormatError(f"{url}: corrupt tar header at byte {end} after member {last!r}")
                    return
                trailer += len(block)
            if trailer < 2 * tarfile.BLOCKSIZE:
                yield ShardFormatError(f"{url}: truncated tar (no end-of-archive marker) after member {last!r}")
        except (tarfile.TarError, EOFError, OSError) as error:
            yield ShardFormatError(f"{url}: truncated or corrupt tar after member {last!r} ({error})")


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
        return ClassChunk(name=str(meta["name"]), label=int(meta["label"]), images=images)
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
    """What happens to a sample that cannot be read: policy "error" raises its ShardFormatError; "skip" warns and
    counts it (each distinct problem once, however often its shard is re-read) and the caller goes on without it."""

    def __init__(self, policy: str = "error", on_count: Callable[[int], None] | None = None):
        if policy not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"--on_bad_sample={policy!r} is invalid: expected one of {', '.join(BAD_SAMPLE_POLICIES)}")
        self.policy = policy
        self.seen: set[str] = set()
        self.on_count = on_count

    @property
    def count(self) -> int:
        return len(self.seen)

    def __call__(self, error: ShardFormatError) -> None:
        if self.policy == "error":
            raise error
        message = str(error)
        if message not in self.seen:
            self.seen.add(message)
            warnings.warn(f"skipped bad sample #{self.count} (--on_bad_sample skip): {message}", stacklevel=3)
            if self.on_count is not None:
                self.on_count(self.count)


def read_class_shard(path: str | Path, image_shape=None, bad: BadSamples | None = None,
                     expected: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """All classes of one class shard: name -> uint8 [n, H, W, C] (chunks of a class concatenated in order).

    With `expected` (class name -> image count, from the index) the content must match it exactly: a class that is
    missing, has another image count, or is not listed is a bad sample (raised, or skipped and counted)."""
    bad = bad or BadSamples("error")
    parts: dict[str, list[np.ndarray]] = {}
    skipped = 0
    for item in iter_raw_samples(path, KIND_CLASSES):
        try:
            if isinstance(item, ShardFormatError):
                raise item
            chunk = decode_sample(item, image_shape)
        except ShardFormatError as error:
            bad(error)
            skipped += 1
            continue
        parts.setdefault(chunk.name, []).append(chunk.images)
    classes = {name: np.concatenate(p) if len(p) > 1 else p[0] for name, p in parts.items()}
    if expected is not None:
        for name in sorted(set(expected) | set(classes)):
            found = len(classes[name]) if name in classes else 0
            if name not in expected or found != expected[name]:
                classes.pop(name, None)  # incomplete or unknown: never train on part of a class
                if not skipped:  # after a skipped sample this is its consequence, already reported and counted
                    listed = f"listed in the index with {expected[name]} images" if name in expected else "not in the index"
                    bad(ShardFormatError(f"{path}: class {name!r} {listed}, but the shard holds {found} readable images"))
    return classes


def read_episode_shard(path: str | Path, index: "EpisodeIndex", bad: BadSamples | None = None) -> Iterator[StoredEpisode]:
    bad = bad or BadSamples("error")
    for item in iter_raw_samples(path, KIND_EPISODES):
        try:
            if isinstance(item, ShardFormatError):
                raise item
            yield decode_episode(item, index.image_shape, index.ways, index.shots, index.queries)
        except ShardFormatError as error:
            bad(error)


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

    root: Path
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
    def shard_paths(self) -> list[Path]:
        return [self.root / name for name in self.shards]

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

    root: Path
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


def _load_raw_index(split_dir: str | Path) -> tuple[Path, dict]:
    split_dir = Path(split_dir)
    path = split_dir / INDEX_NAME
    if not split_dir.is_dir():
        raise FileNotFoundError(f"data split directory {split_dir} does not exist (expected a folder with {INDEX_NAME} and shard-*.tar)")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {split_dir} is not a shard directory (build one with `python -m shards build`)")
    try:
        raw = json.loads(path.read_text())
    except Exception as error:
        raise ShardFormatError(f"{path}: unreadable index ({type(error).__name__}: {error})") from None
    if not isinstance(raw, dict):
        raise ShardFormatError(f"{path}: unreadable index (expected a JSON object)")
    if raw.get("format_version") != FORMAT_VERSION:
        raise ShardFormatError(f"{path}: format_version {raw.get('format_version')!r}, this code reads {FORMAT_VERSION}")
    for shard in raw.get("shards", []):
        name = shard.get("name") if isinstance(shard, dict) else None
        if not isinstance(name, str) or not SHARD_NAME_PATTERN.match(name):
            raise ShardFormatError(f"{path}: shard name {name!r} is not a plain file name matching {SHARD_NAME_PATTERN.pattern}")
    return path, raw


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
                    raise ShardFormatError(f"{path}: class {entry['name']!r} listed twice")
                classes[entry["name"]] = (shard["name"], int(entry["images"]))
        if not raw["shards"]:
            raise ShardFormatError(f"{path}: lists no shards")
        return SplitIndex(
            root=Path(split_dir), dataset=str(raw["dataset"]), split=str(raw["split"]),
            image_shape=tuple(int(v) for v in raw["image_shape"]),
            mean=tuple(float(v) for v in raw["mean"]), std=tuple(float(v) for v in raw["std"]),
            shards=tuple(s["name"] for s in raw["shards"]), classes=classes,
            shard_sha256={s["name"]: s["sha256"] for s in raw["shards"]},
            shard_bytes={s["name"]: int(s.get("bytes", 0)) for s in raw["shards"]},
        )
    except ShardFormatError:
        raise
    except Exception as error:
        raise ShardFormatError(f"{path}: unreadable index ({type(error).__name__}: {error})") from None


def read_episode_index(split_dir: str | Path) -> EpisodeIndex:
    path, raw = _load_raw_index(split_dir)
    if raw.get("kind") != KIND_EPISODES:
        raise ShardFormatError(f"{path}: kind {raw.get('kind', KIND_CLASSES)!r}, expected {KIND_EPISODES!r}")
    try:
        return EpisodeIndex(
            root=Path(split_dir), dataset=str(raw["dataset"]), split=str(raw["split"]),
            image_shape=tuple(int(v) for v in raw["image_shape"]),
            mean=tuple(float(v) for v in raw["mean"]), std=tuple(float(v) for v in raw["std"]),
            ways=int(raw["ways"]), shots=int(raw["shots"]), queries=int(raw["queries"]), seed=int(raw["seed"]),
            shards=tuple(s["name"] for s in raw["shards"]),
            episodes_per_shard=tuple(int(s["episodes"]) for s in raw["shards"]),
            shard_sha256={s["name"]: s["sha256"] for s in raw["shards"]},
            shard_bytes={s["name"]: int(s.get("bytes", 0)) for s in raw["shards"]},
        )
    except Exception as error:
        raise ShardFormatError(f"{path}: unreadable episode index ({type(error).__name__}: {error})") from None

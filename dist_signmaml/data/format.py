"""The shard format, defined once. `shards/` writes it, `dist_signmaml.data.episodes` reads it.

A dataset split is a directory:

    <split_dir>/index.json            what is in the split (see `write_index`)
    <split_dir>/shard-000000.tar ...  WebDataset tar shards

One *sample* of a shard is one class, or one chunk of a class's images; the images of a class are never spread
over several shards, so an episode of any ways/shots/queries can be assembled at train time from whole classes.
Members of a sample with key ``K`` (``K`` matches ``SAMPLE_KEY_PATTERN``):

    K.images.npy   uint8 array [n, H, W, C] (C = 1 grey, 3 RGB), saved with numpy.save, never pickled
    K.class.json   {"name": str, "label": int (index of the class inside the split), "chunk": int}

Nothing else is allowed in a shard: unknown members are an error, so a shard cannot smuggle a pickle in.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
INDEX_NAME = "index.json"
SHARD_PATTERN = "shard-%06d.tar"
IMAGES_MEMBER = "images.npy"
CLASS_MEMBER = "class.json"
ALLOWED_MEMBERS = frozenset({IMAGES_MEMBER, CLASS_MEMBER})
SAMPLE_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")


class ShardFormatError(ValueError):
    """A shard or index that does not follow the format; the message names the file and member."""


@dataclass(frozen=True)
class ClassChunk:
    """One decoded sample: the images of one class (or a chunk of them)."""

    name: str
    label: int
    images: np.ndarray  # uint8 [n, H, W, C]


def encode_sample(key: str, name: str, label: int, images: np.ndarray, chunk: int = 0) -> dict:
    """The dict `webdataset.TarWriter.write` takes for one class chunk (members already bytes)."""
    if not SAMPLE_KEY_PATTERN.match(key):
        raise ShardFormatError(f"sample key {key!r} must match {SAMPLE_KEY_PATTERN.pattern}")
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ShardFormatError(f"class {name!r}: images must be uint8 [n, H, W, C], got {images.dtype} {images.shape}")
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(images), allow_pickle=False)
    meta = json.dumps({"name": name, "label": int(label), "chunk": int(chunk)}, sort_keys=True)
    return {"__key__": key, IMAGES_MEMBER: buffer.getvalue(), CLASS_MEMBER: meta.encode()}


def decode_sample(sample: dict, image_shape: tuple[int, int, int] | None = None) -> ClassChunk:
    """Decode one raw webdataset sample (member name -> bytes) without ever unpickling.

    Raises ShardFormatError naming the shard URL and the member when anything is off.
    """
    url, key = sample.get("__url__", "?"), sample.get("__key__", "?")
    where = f"{url} member {key}"
    if not SAMPLE_KEY_PATTERN.match(str(key)):
        raise ShardFormatError(f"{where}: invalid sample key (expected {SAMPLE_KEY_PATTERN.pattern})")
    members = {k for k in sample if not k.startswith("__")}
    if members != ALLOWED_MEMBERS:
        raise ShardFormatError(f"{where}: members {sorted(members)}, expected exactly {sorted(ALLOWED_MEMBERS)}")
    try:
        images = np.load(io.BytesIO(sample[IMAGES_MEMBER]), allow_pickle=False)
    except Exception as error:  # numpy raises several types for bad bytes
        raise ShardFormatError(f"{where}.{IMAGES_MEMBER}: not a readable .npy array ({error})") from None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ShardFormatError(f"{where}.{IMAGES_MEMBER}: expected uint8 [n,H,W,C], got {images.dtype} {images.shape}")
    if image_shape is not None and tuple(images.shape[1:]) != tuple(image_shape):
        raise ShardFormatError(f"{where}.{IMAGES_MEMBER}: image shape {images.shape[1:]}, index says {tuple(image_shape)}")
    try:
        meta = json.loads(sample[CLASS_MEMBER].decode())
        return ClassChunk(name=str(meta["name"]), label=int(meta["label"]), images=images)
    except Exception as error:
        raise ShardFormatError(f"{where}.{CLASS_MEMBER}: expected JSON with name and label ({error})") from None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class SplitIndex:
    """What `index.json` says about one split. `classes` maps class name -> (shard file, image count)."""

    root: Path
    dataset: str
    split: str
    image_shape: tuple[int, int, int]  # H, W, C
    mean: tuple[float, ...]
    std: tuple[float, ...]
    shards: tuple[str, ...]
    classes: dict[str, tuple[str, int]]
    shard_sha256: dict[str, str]

    @property
    def shard_paths(self) -> list[Path]:
        return [self.root / name for name in self.shards]

    def classes_with_at_least(self, images: int) -> list[str]:
        return [name for name, (_, count) in self.classes.items() if count >= images]


def write_index(split_dir: Path, *, dataset: str, split: str, image_shape, mean, std, shard_classes) -> dict:
    """Write `index.json`. `shard_classes` maps shard file name -> list of (class name, image count)."""
    shards = []
    for shard_name in sorted(shard_classes):
        path = split_dir / shard_name
        shards.append({"name": shard_name, "bytes": path.stat().st_size, "sha256": sha256_of(path),
                       "classes": [{"name": n, "images": int(c)} for n, c in shard_classes[shard_name]]})
    counts = [c for s in shards for c in (x["images"] for x in s["classes"])]
    index = {
        "format_version": FORMAT_VERSION, "dataset": dataset, "split": split,
        "image_shape": [int(v) for v in image_shape], "mean": [float(v) for v in mean], "std": [float(v) for v in std],
        "num_classes": len(counts), "num_images": int(sum(counts)),
        "images_per_class": {"min": int(min(counts)), "max": int(max(counts))},
        "shards": shards,
    }
    (split_dir / INDEX_NAME).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    return index


def read_index(split_dir: str | Path) -> SplitIndex:
    """Read and check `index.json`; every problem is reported with the file it concerns."""
    split_dir = Path(split_dir)
    path = split_dir / INDEX_NAME
    if not split_dir.is_dir():
        raise FileNotFoundError(f"data split directory {split_dir} does not exist (expected a folder with {INDEX_NAME} and shard-*.tar)")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {split_dir} is not a shard directory (build one with `python -m shards build`)")
    try:
        raw = json.loads(path.read_text())
        if raw.get("format_version") != FORMAT_VERSION:
            raise ShardFormatError(f"{path}: format_version {raw.get('format_version')!r}, this code reads {FORMAT_VERSION}")
        classes = {}
        for shard in raw["shards"]:
            for entry in shard["classes"]:
                if entry["name"] in classes:
                    raise ShardFormatError(f"{path}: class {entry['name']!r} listed twice")
                classes[entry["name"]] = (shard["name"], int(entry["images"]))
        return SplitIndex(
            root=split_dir, dataset=str(raw["dataset"]), split=str(raw["split"]),
            image_shape=tuple(int(v) for v in raw["image_shape"]),
            mean=tuple(float(v) for v in raw["mean"]), std=tuple(float(v) for v in raw["std"]),
            shards=tuple(s["name"] for s in raw["shards"]), classes=classes,
            shard_sha256={s["name"]: s["sha256"] for s in raw["shards"]},
        )
    except ShardFormatError:
        raise
    except Exception as error:
        raise ShardFormatError(f"{path}: unreadable index ({type(error).__name__}: {error})") from None

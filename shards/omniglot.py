"""Omniglot -> shards. Vinyals et al. split (each rotation its own class) or Lake's background/evaluation split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dist_signmaml.config import REPO_ROOT
from shards.writer import ordered_map, write_split

OMNIGLOT_DIR = REPO_ROOT / "data" / "omniglot"
VINYALS_SPLITS = ("train", "val", "test", "trainval")
LAKE_SPLITS = ("background", "evaluation")
SPLITS = VINYALS_SPLITS + LAKE_SPLITS
# 4 MB shards give the 28 px train split 17 shards, so the default window of 8 shards holds about half of it and
# slides (memory stays bounded); the general 64 MB default would put the whole split in one shard.
DEFAULT_SHARD_MB = 4.0


def load_characters(source: Path = OMNIGLOT_DIR) -> dict[str, np.ndarray]:
    """'Alphabet/characterNN' -> uint8 [20, 105, 105] with ink = 255 (the usual network polarity)."""
    characters = {}
    for set_name in LAKE_SPLITS:
        path = source / f"images_{set_name}.npz"
        if not path.is_file():
            raise FileNotFoundError(f"Omniglot archive {path} is missing (expected the vendored data/omniglot)")
        with np.load(path, allow_pickle=False) as archive:
            images, alphabets, names = archive["images"], archive["alphabets"], archive["characters"]
            for k in range(len(images)):
                characters[f"{alphabets[k]}/{names[k]}"] = np.where(images[k] == 0, 255, 0).astype(np.uint8)
    return characters


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """[n, H, W] uint8 -> [n, size, size] uint8 with Lanczos filtering (identity when already that size)."""
    if images.shape[1:] == (size, size):
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.LANCZOS)) for im in images])


def _resize_job(job: tuple[np.ndarray, int]) -> np.ndarray:
    images, size = job
    return resize(images, size)


def split_class_names(split: str, source: Path = OMNIGLOT_DIR) -> list[str]:
    """Class names of a split in file order: 'Alphabet/characterNN/rotDDD' (Vinyals) or 'Alphabet/characterNN' (Lake)."""
    if split in VINYALS_SPLITS:
        return (source / "splits" / "vinyals" / f"{split}.txt").read_text().split()
    if split in LAKE_SPLITS:
        import csv
        with open(source / "characters.csv") as handle:
            return [f"{r['alphabet']}/{r['character']}" for r in csv.DictReader(handle) if r["set"] == split]
    raise ValueError(f"unknown Omniglot split {split!r}; expected one of {', '.join(SPLITS)}")


def iter_split_classes(split: str, image_size: int = 28, source: Path = OMNIGLOT_DIR, workers: int = 0,
                       characters: dict[str, np.ndarray] | None = None):
    """Yield (class name, uint8 [20, s, s, 1]) of one split in the order of its split file. Resizing runs on
    `workers` processes; each character is resized once and its rotations are derived from the resized images."""
    names = split_class_names(split, source)
    if image_size < 1:
        raise ValueError(f"--image_size={image_size} is invalid: expected a positive number of pixels")
    characters = characters if characters is not None else load_characters(source)
    character_of = [name.rsplit("/", 1)[0] if split in VINYALS_SPLITS else name for name in names]
    order = list(dict.fromkeys(character_of))  # distinct characters, first-use order
    missing = [c for c in order if c not in characters]
    if missing:
        raise ValueError(f"Omniglot split {split!r} names characters missing from the archives: {missing[:5]}")
    resized_stream = ordered_map(_resize_job, ((characters[c], image_size) for c in order), workers)
    resized: dict[str, np.ndarray] = {}
    for name, character in zip(names, character_of):
        while character not in resized:
            resized[order[len(resized)]] = next(resized_stream)
        images = resized[character]
        if split in VINYALS_SPLITS:
            quarter_turns = int(name.rsplit("/", 1)[1].removeprefix("rot")) // 90  # rot090 = 90 degrees counter-clockwise
            images = np.rot90(images, k=quarter_turns, axes=(1, 2))
        yield name, np.ascontiguousarray(images[..., None])


def split_classes(split: str, image_size: int = 28, source: Path = OMNIGLOT_DIR, workers: int = 0) -> list[tuple[str, np.ndarray]]:
    """The (class name, uint8 [20, s, s, 1]) list of one split, in the order of its split file."""
    return list(iter_split_classes(split, image_size, source, workers))


def build(out: str | Path, splits=("train", "val", "test"), image_size: int = 28,
          shard_mb: float = DEFAULT_SHARD_MB, progress: bool = True, workers: int = 0) -> dict[str, dict]:
    """Build `out/<split>/` for each split (Vinyals train/val/test/trainval, Lake background/evaluation)."""
    out = Path(out)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"--splits: unknown Omniglot split(s) {unknown}; expected some of {', '.join(SPLITS)}")
    characters = load_characters()
    indexes = {}
    for split in splits:
        names = split_class_names(split)
        classes = iter_split_classes(split, image_size, workers=workers, characters=characters)
        indexes[split] = write_split(classes, out / split, dataset=f"omniglot-{image_size}", split=split,
                                     num_classes=len(names), shard_mb=shard_mb, progress=progress,
                                     source={"builder": "omniglot", "image_size": int(image_size),
                                             "split_protocol": "vinyals" if split in VINYALS_SPLITS else "lake"})
    return indexes

"""Omniglot -> shards. Vinyals et al. split (each rotation its own class) or Lake's background/evaluation split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from shards.writer import write_split

REPO_ROOT = Path(__file__).resolve().parents[1]
OMNIGLOT_DIR = REPO_ROOT / "data" / "omniglot"
VINYALS_SPLITS = ("train", "val", "test", "trainval")
LAKE_SPLITS = ("background", "evaluation")


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


def split_classes(split: str, image_size: int = 28, source: Path = OMNIGLOT_DIR) -> list[tuple[str, np.ndarray]]:
    """The (class name, uint8 [20, s, s, 1]) list of one split, in the order of its split file."""
    characters = load_characters(source)
    if split in VINYALS_SPLITS:
        lines = (source / "splits" / "vinyals" / f"{split}.txt").read_text().split()
        resized = {}
        out = []
        for line in lines:
            character, rotation = line.rsplit("/", 1)
            if character not in resized:
                resized[character] = resize(characters[character], image_size)
            quarter_turns = int(rotation.removeprefix("rot")) // 90  # rot090 = 90 degrees counter-clockwise
            out.append((line, np.rot90(resized[character], k=quarter_turns, axes=(1, 2))[..., None].copy()))
        return out
    if split in LAKE_SPLITS:
        import csv
        with open(source / "characters.csv") as handle:
            rows = [r for r in csv.DictReader(handle) if r["set"] == split]
        return [(f"{r['alphabet']}/{r['character']}",
                 resize(characters[f"{r['alphabet']}/{r['character']}"], image_size)[..., None]) for r in rows]
    raise ValueError(f"unknown Omniglot split {split!r}; expected one of {VINYALS_SPLITS + LAKE_SPLITS}")


def build(out: str | Path, splits=("train", "val", "test"), image_size: int = 28, shard_mb: float = 4.0,
          progress: bool = True) -> dict[str, dict]:
    """Build `out/<split>/` for each split. Omniglot's default of 4 MB shards gives the 28 px train split
    17 shards, enough for each of 2 ranks x 2 loader workers to own several."""
    out = Path(out)
    indexes = {}
    for split in splits:
        classes = split_classes(split, image_size)
        indexes[split] = write_split(classes, out / split, dataset=f"omniglot-{image_size}", split=split,
                                     num_classes=len(classes), shard_mb=shard_mb, progress=progress)
    return indexes

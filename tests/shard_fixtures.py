"""Small generated datasets for the data-pipeline tests: class splits whose pixels identify (class, image), and
ImageFolder trees of JPEG/PNG files."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from shards.writer import write_split


def identifiable_classes(n_classes: int, images_per_class, size: int = 8, channels: int = 1, seed: int = 0):
    """(name, uint8 [n, size, size, C]) where pixel (0,0) of channel 0 is the class id and pixel (0,1) the image's
    position in its class, so any episode image can be traced back to where it came from."""
    rng = np.random.default_rng(seed)
    counts = [images_per_class] * n_classes if isinstance(images_per_class, int) else list(images_per_class)
    classes = []
    for c, n in enumerate(counts):
        images = rng.integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)
        images[:, 0, 0, 0] = c
        images[:, 0, 1, 0] = np.arange(n)
        classes.append((f"class{c:03d}", images))
    return classes


def write_identifiable_split(split_dir: Path, n_classes: int = 48, images_per_class=10, shard_mb: float = 0.01,
                             size: int = 8, channels: int = 1) -> dict:
    classes = identifiable_classes(n_classes, images_per_class, size, channels)
    return write_split(classes, split_dir, dataset="ids", split=Path(split_dir).name, num_classes=len(classes),
                       shard_mb=shard_mb, progress=False)


def trace(images: torch.Tensor, index) -> np.ndarray:
    """Normalised images [..., C, H, W] -> int array [..., 2] of (class id, image position), undoing the Normalizer."""
    mean, std = index.mean[0], index.std[0]
    pixels = torch.round((images[..., 0, 0, :2].double() * std + mean) * 255).long().numpy()
    return pixels


def write_tar(path: Path, members: list[tuple], *, mode: str = "w") -> Path:
    """A tar with arbitrary members: (name, bytes) regular files, or (name, None, TarInfo-type, linkname) specials."""
    with tarfile.open(path, mode) as archive:
        for member in members:
            info = tarfile.TarInfo(member[0])
            if member[1] is None:
                info.type, info.linkname = member[2], member[3]
                archive.addfile(info)
            else:
                info.size = len(member[1])
                archive.addfile(info, io.BytesIO(member[1]))
    return path


def make_image_folder(root: Path, classes: dict[str, int], *, size=(20, 14), seed: int = 0) -> Path:
    """root/<class>/<i>.png|jpg: even images PNG, odd JPEG; class 'grey*' stored as greyscale files, others RGB;
    every third image a different size, so resizing and cropping are exercised."""
    rng = np.random.default_rng(seed)
    for name, count in classes.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            w, h = (size if i % 3 else (size[1] + 6, size[0]))
            pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            image = Image.fromarray(pixels).convert("L" if name.startswith("grey") else "RGB")
            image.save(folder / f"{name}_{i:03d}.{'png' if i % 2 == 0 else 'jpg'}")
    return root


def reindex(split_dir: Path) -> None:
    """Record the current size and sha256 of every shard in index.json, as an index written by whoever rewrote the
    shards would: the reader's member checks are then exercised behind a matching checksum."""
    import hashlib
    import json

    path = Path(split_dir) / "index.json"
    raw = json.loads(path.read_text())
    for shard in raw["shards"]:
        data = (Path(split_dir) / shard["name"]).read_bytes()
        shard["bytes"], shard["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    path.write_text(json.dumps(raw, indent=1, sort_keys=True) + "\n")

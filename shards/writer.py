"""Write a split's classes into size-bounded WebDataset shards plus index.json (format: dist_signmaml.data.format)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable

import numpy as np
import webdataset as wds
from tqdm import tqdm

from dist_signmaml.data.format import SHARD_PATTERN, encode_sample, write_index


def write_split(classes: Iterable[tuple[str, np.ndarray]], out_dir: str | Path, *, dataset: str, split: str,
                num_classes: int, shard_mb: float = 64.0, progress: bool = True) -> dict:
    """Write `classes` (name, uint8 [n,H,W,C]) in the given order; return the index written.

    Output is byte-identical for identical input: tar headers carry mtime 0 and fixed owner names.
    Shards are written to a temporary sibling folder and renamed at the end, so an interrupted build never
    leaves a half-written split that looks complete.
    """
    out_dir = Path(out_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    max_bytes = shard_mb * 1e6
    shard_classes: dict[str, list[tuple[str, int]]] = {}
    pixel_sum = pixel_sq_sum = None
    pixel_count = 0
    image_shape = None
    writer, shard_number, shard_bytes = None, -1, 0.0
    for label, (name, images) in enumerate(tqdm(classes, total=num_classes, desc=f"{dataset}/{split}",
                                                unit="class", disable=not progress)):
        if image_shape is None:
            image_shape = images.shape[1:]
        elif images.shape[1:] != image_shape:
            raise ValueError(f"class {name!r}: image shape {images.shape[1:]} differs from {image_shape} of earlier classes")
        sample = encode_sample(f"c{label:07d}", name, label, images)
        sample_bytes = sum(len(v) for k, v in sample.items() if k != "__key__")
        if writer is None or (shard_bytes + sample_bytes > max_bytes and shard_bytes > 0):
            if writer is not None:
                writer.close()
            shard_number, shard_bytes = shard_number + 1, 0.0
            shard_name = SHARD_PATTERN % shard_number
            writer = wds.TarWriter(str(partial / shard_name), encoder=False, mtime=0.0, user="dsm", group="dsm")
            shard_classes[shard_name] = []
        writer.write(sample)
        shard_bytes += sample_bytes
        shard_classes[SHARD_PATTERN % shard_number].append((name, len(images)))
        # per-channel statistics in float64 so the result does not depend on summation order within a class
        flat = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
        pixel_sum = flat.sum(0) if pixel_sum is None else pixel_sum + flat.sum(0)
        pixel_sq_sum = (flat**2).sum(0) if pixel_sq_sum is None else pixel_sq_sum + (flat**2).sum(0)
        pixel_count += flat.shape[0]
    if writer is None:
        raise ValueError(f"{dataset}/{split}: no classes to write")
    writer.close()
    mean = pixel_sum / pixel_count
    std = np.sqrt(np.maximum(pixel_sq_sum / pixel_count - mean**2, 1e-12))
    index = write_index(partial, dataset=dataset, split=split, image_shape=image_shape, mean=mean, std=std,
                        shard_classes=shard_classes)
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.rename(out_dir)
    return index

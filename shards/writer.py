"""Write a split's classes into size-bounded WebDataset shards plus index.json (format: dist_signmaml.data.format)."""

from __future__ import annotations

import shutil
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import webdataset as wds
from tqdm import tqdm

from dist_signmaml.data.format import SHARD_PATTERN, encode_sample, write_index

DEFAULT_SHARD_MB = 64.0  # like typical WebDataset deployments; Omniglot uses a smaller default (see omniglot.py)


def ordered_map(function: Callable, items: Iterable, workers: int) -> Iterator:
    """`map(function, items)` over `workers` processes (0 = in this process), results in input order so the output
    does not depend on the worker count; at most 2 x workers items are in flight, so memory stays bounded."""
    if workers <= 0:
        yield from map(function, items)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class ChannelStats:
    """Exact per-channel pixel mean/std from integer histograms: independent of class order, chunking and workers."""

    def __init__(self):
        self.histograms: np.ndarray | None = None

    def add(self, images: np.ndarray) -> None:
        channels = images.shape[-1]
        if self.histograms is None:
            self.histograms = np.zeros((channels, 256), dtype=np.int64)
        flat = images.reshape(-1, channels)
        for c in range(channels):
            self.histograms[c] += np.bincount(flat[:, c], minlength=256)

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        values = np.arange(256, dtype=np.float64) / 255.0
        count = self.histograms.sum(1)
        mean = (self.histograms * values).sum(1) / count
        var = (self.histograms * (values[None, :] - mean[:, None]) ** 2).sum(1) / count
        return mean, np.sqrt(np.maximum(var, 1e-12))


def tar_bytes(sample: dict) -> int:
    """Bytes a sample takes in a tar: a 512-byte header per member plus its data padded to 512-byte blocks."""
    return sum(512 + -(-len(value) // 512) * 512 for key, value in sample.items() if key != "__key__")


def class_chunks(images: np.ndarray, max_bytes: float) -> list[np.ndarray]:
    """Split one class's images into consecutive chunks of at most `max_bytes` each (at least one image each), so
    no single sample needs more memory to decode than a shard's target size."""
    room = max_bytes - 2304  # tar headers and padding, the .npy header and the class.json member (< 2.3 kB)
    per_chunk = max(1, int(room // images[0].nbytes))
    return [images[i: i + per_chunk] for i in range(0, len(images), per_chunk)]


def write_split(classes: Iterable[tuple[str, np.ndarray]], out_dir: str | Path, *, dataset: str, split: str,
                num_classes: int, shard_mb: float = DEFAULT_SHARD_MB, progress: bool = True,
                source: dict | None = None) -> dict:
    """Write `classes` (name, uint8 [n,H,W,C]) in the given order; return the index written.

    A new shard starts when the next class would push the current one past `shard_mb`; a class is never split
    over shards (a class bigger than `shard_mb` gets a shard of its own, written as several chunk samples).
    Output is byte-identical for identical input: tar headers carry mtime 0 and fixed owner names, and nothing
    time- or machine-dependent goes into index.json. Shards are written to a temporary sibling folder and renamed
    at the end, so an interrupted build never leaves a half-written split that looks complete.
    """
    if shard_mb <= 0:
        raise ValueError(f"--shard_mb={shard_mb} is invalid: expected a positive size in MB")
    out_dir = Path(out_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    max_bytes = shard_mb * 1e6
    shard_classes: dict[str, list[tuple[str, int]]] = {}
    stats = ChannelStats()
    image_shape = None
    writer, shard_number, shard_bytes = None, -1, 0.0
    names_seen: set[str] = set()
    for label, (name, images) in enumerate(tqdm(classes, total=num_classes, desc=f"{dataset}/{split}",
                                                unit="class", disable=not progress)):
        if name in names_seen:
            raise ValueError(f"{dataset}/{split}: class {name!r} appears twice")
        names_seen.add(name)
        if len(images) == 0:
            raise ValueError(f"{dataset}/{split}: class {name!r} has no images")
        if image_shape is None:
            image_shape = images.shape[1:]
        elif images.shape[1:] != image_shape:
            raise ValueError(f"{dataset}/{split}: class {name!r} has image shape {images.shape[1:]} but earlier classes "
                             f"have {image_shape}; all images of a split must share one shape (use --image_size)")
        chunks = class_chunks(images, max_bytes)
        samples = [encode_sample(f"c{label:07d}" if len(chunks) == 1 else f"c{label:07d}-{k:04d}", name, label, chunk, k)
                   for k, chunk in enumerate(chunks)]
        class_bytes = sum(tar_bytes(sample) for sample in samples)
        if writer is None or (shard_bytes + class_bytes > max_bytes and shard_bytes > 0):
            if writer is not None:
                writer.close()
            shard_number, shard_bytes = shard_number + 1, 0.0
            shard_name = SHARD_PATTERN % shard_number
            writer = wds.TarWriter(str(partial / shard_name), encoder=False, mtime=0.0, user="dsm", group="dsm")
            shard_classes[shard_name] = []
        for sample in samples:
            writer.write(sample)
        shard_bytes += class_bytes
        shard_classes[SHARD_PATTERN % shard_number].append((name, len(images)))
        stats.add(images)
    if writer is None:
        raise ValueError(f"{dataset}/{split}: no classes to write")
    writer.close()
    mean, std = stats.mean_std()
    index = write_index(partial, dataset=dataset, split=split, image_shape=image_shape, mean=mean, std=std,
                        shard_classes=shard_classes, source=source)
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.rename(out_dir)
    return index

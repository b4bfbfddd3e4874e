"""Streaming few-shot episodes from class-grouped shards, with a per-(rank, worker) disjoint, resumable schedule.

Design in one paragraph. Each (rank, loader worker) owns a disjoint slice of the shards and walks an endless,
seeded sequence of them (a fresh permutation every cycle). At any moment it holds only a *window* of the last
`window_shards` shards in memory, and meta-batch `b` is drawn from the window with an RNG seeded by
(seed, rank, b). Which shards are in the window is itself a function of `b`, so the whole stream is a pure
function of (seed, rank, world size, workers, b): resuming at batch `b` only re-reads the window's shards, and
sees exactly the episodes an uninterrupted run would have seen.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dist_signmaml.data.format import SplitIndex, decode_sample, read_index


class Episodes(NamedTuple):
    """A batch of tasks. Images are float [tasks, ways*k, C, H, W], labels long [tasks, ways*k] in 0..ways-1."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    def to(self, device) -> "Episodes":
        return Episodes(*(t.to(device, non_blocking=True) for t in self))


@dataclass(frozen=True)
class EpisodeShape:
    ways: int
    shots: int
    queries: int  # per class

    @property
    def images_per_class(self) -> int:
        return self.shots + self.queries


def load_shard_classes(path, image_shape) -> dict[str, np.ndarray]:
    """All classes of one shard, read with webdataset and decoded without unpickling: name -> uint8 [n,H,W,C]."""
    classes: dict[str, list[np.ndarray]] = {}
    for sample in wds.tarfile_samples([{"url": str(path)}]):
        chunk = decode_sample(sample, image_shape)
        classes.setdefault(chunk.name, []).append(chunk.images)
    return {name: np.concatenate(parts) if len(parts) > 1 else parts[0] for name, parts in classes.items()}


def draw_episode(rng: np.random.Generator, pool: list[np.ndarray], shape: EpisodeShape):
    """Pick `ways` classes from `pool` and `shots + queries` distinct images of each; labels are 0..ways-1 in the
    order the classes were drawn (a random order, so a label carries no information across episodes)."""
    chosen = rng.choice(len(pool), size=shape.ways, replace=False)
    support, query = [], []
    for images in (pool[c] for c in chosen):
        picked = images[rng.choice(len(images), size=shape.images_per_class, replace=False)]
        support.append(picked[: shape.shots])
        query.append(picked[shape.shots:])
    labels = np.arange(shape.ways)
    return (np.concatenate(support), np.repeat(labels, shape.shots),
            np.concatenate(query), np.repeat(labels, shape.queries))


class Normalizer:
    """uint8 [..., H, W, C] -> float [..., C, H, W], standardised with the split's channel mean/std."""

    def __init__(self, mean, std):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(images).movedim(-1, -3).float().div_(255.0)
        return (x - self.mean) / self.std


def stack_tasks(tasks, normalize: Normalizer) -> Episodes:
    sx, sy, qx, qy = (np.stack(parts) for parts in zip(*tasks))
    return Episodes(normalize(sx), torch.from_numpy(sy).long(), normalize(qx), torch.from_numpy(qy).long())


def usable_classes(index: SplitIndex, shape: EpisodeShape, split_dir) -> set[str]:
    """Classes with at least shots+queries images; warns with the list of those left out, errors if too few remain."""
    usable = set(index.classes_with_at_least(shape.images_per_class))
    excluded = sorted(set(index.classes) - usable)
    if excluded:
        shown = ", ".join(excluded[:10]) + (" ..." if len(excluded) > 10 else "")
        warnings.warn(f"{split_dir}: {len(excluded)} classes have fewer than shots+queries="
                      f"{shape.images_per_class} images and are left out: {shown}", stacklevel=2)
    if len(usable) < shape.ways:
        raise ValueError(f"--ways={shape.ways} needs {shape.ways} classes with at least shots+queries="
                         f"{shape.images_per_class} images, but {split_dir} has only {len(usable)}")
    return usable


class EpisodeStream(IterableDataset):
    """Endless meta-batches of `tasks_per_batch` episodes for one rank, starting at batch `start_batch`.

    With a DataLoader of `num_workers` workers, worker i produces batches start_batch + i, + num_workers, ...,
    which is the order the DataLoader hands them out in, so batch b is always the b-th batch of the rank.
    """

    def __init__(self, split_dir, shape: EpisodeShape, tasks_per_batch: int, *, seed: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, start_batch: int = 0, window_shards: int = 8,
                 batches_per_shard: int = 0):
        self.index = read_index(split_dir)
        self.shape, self.tasks_per_batch, self.seed = shape, int(tasks_per_batch), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.streams = max(1, int(num_workers))  # virtual workers: identical schedule with 0 or 1 worker
        self.start_batch, self.window_shards = int(start_batch), int(window_shards)
        self.normalize = Normalizer(self.index.mean, self.index.std)
        self.usable = usable_classes(self.index, shape, split_dir)
        slices = self.world_size * self.streams
        if len(self.index.shards) < slices:
            raise ValueError(f"{split_dir} has {len(self.index.shards)} shards but {self.world_size} ranks x "
                             f"{self.streams} loader workers need at least {slices} (one each, disjoint); rebuild "
                             f"the shards smaller (--shard_mb) or use fewer workers")
        per_shard = {name: 0 for name in self.index.shards}
        for name in self.usable:
            per_shard[self.index.classes[name][0]] += 1
        self.classes_per_shard = per_shard
        for stream in range(self.streams):
            own = self.own_shards(stream)
            smallest_window = sum(sorted(per_shard[s] for s in own)[: self.window_shards])
            if smallest_window < shape.ways:
                raise ValueError(f"--ways={shape.ways}: rank {self.rank} worker {stream} owns shards {own} whose "
                                 f"smallest window of {self.window_shards} holds only {smallest_window} usable classes")
        mean_classes = len(self.usable) / len(self.index.shards)
        # By default a shard stays in the window until about as many classes as it holds have been drawn.
        self.batches_per_shard = int(batches_per_shard) or max(1, math.ceil(mean_classes / (shape.ways * self.tasks_per_batch)))
        self._cache: dict[str, dict[str, np.ndarray]] = {}

    def own_shards(self, stream: int) -> list[str]:
        """The shards of (this rank, virtual worker `stream`): disjoint across all ranks and workers."""
        slot = self.rank * self.streams + stream
        return list(self.index.shards[slot:: self.world_size * self.streams])

    def window(self, batch: int) -> list[str]:
        """Shards in memory when batch `batch` is drawn (a function of `batch` alone)."""
        stream, local = batch % self.streams, batch // self.streams
        own = self.own_shards(stream)
        if len(own) <= self.window_shards:
            return own
        first = local // self.batches_per_shard
        names = []
        for position in range(first, first + self.window_shards):
            cycle, offset = divmod(position, len(own))
            order = np.random.default_rng([self.seed, self.rank, stream, cycle, 7]).permutation(len(own))
            name = own[order[offset]]
            if name not in names:
                names.append(name)
        return names

    def _pool(self, shard_names: list[str]) -> list[np.ndarray]:
        for stale in set(self._cache) - set(shard_names):
            del self._cache[stale]  # bounded memory: only the window's shards stay loaded
        pool = []
        for name in shard_names:
            if name not in self._cache:
                self._cache[name] = load_shard_classes(self.index.root / name, self.index.image_shape)
            pool.extend(images for cls, images in sorted(self._cache[name].items()) if cls in self.usable)
        return pool

    def batch(self, b: int) -> Episodes:
        pool = self._pool(self.window(b))
        rng = np.random.default_rng([self.seed, self.rank, b])
        return stack_tasks([draw_episode(rng, pool, self.shape) for _ in range(self.tasks_per_batch)], self.normalize)

    def __iter__(self) -> Iterator[Episodes]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        b = self.start_batch + worker
        while True:
            yield self.batch(b)
            b += max(1, info.num_workers if info is not None else 1)


def train_loader(stream: EpisodeStream, num_workers: int) -> DataLoader:
    """A DataLoader over an EpisodeStream (already batched). Not to be passed to accelerator.prepare: the stream
    splits ranks itself, and prepare would re-shard or broadcast on top."""
    if max(1, num_workers) != stream.streams:
        raise ValueError(f"the stream was built for {stream.streams} workers, the loader has {num_workers}")
    return DataLoader(stream, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0,
                      prefetch_factor=4 if num_workers > 0 else None)


def fixed_episodes(split_dir, shape: EpisodeShape, episode_ids, *, seed: int, tasks_per_batch: int) -> Iterator[Episodes]:
    """Evaluation episodes: episode i is a function of (seed, i) alone, drawn from all usable classes of the split,
    so every method, run and rank count scores the same tasks. Loads the whole split (evaluation splits are small;
    materialised episode shards are the bounded-memory alternative)."""
    index = read_index(split_dir)
    usable = usable_classes(index, shape, split_dir)
    pool = []
    for shard in index.shards:
        pool.extend(images for cls, images in sorted(load_shard_classes(index.root / shard, index.image_shape).items())
                    if cls in usable)
    normalize = Normalizer(index.mean, index.std)
    episode_ids = list(episode_ids)
    for start in range(0, len(episode_ids), tasks_per_batch):
        ids = episode_ids[start: start + tasks_per_batch]
        yield stack_tasks([draw_episode(np.random.default_rng([seed, i]), pool, shape) for i in ids], normalize)

"""Streaming few-shot episodes from class-grouped shards, with a resumable schedule whose task distribution does
not depend on the number of ranks or loader workers.

Design in one paragraph. Each (rank, loader worker) walks its own endless, seeded sequence of permutations of the
whole split's shards. At any moment it holds only a *window* of `window_shards` consecutive shards of that sequence
in memory (a split of at most `window_shards` shards is held whole), and meta-batch `b` is drawn from the window
with an RNG seeded by (seed, rank, b). Which shards are in the window is itself a function of `b`, so the whole
stream is a pure function of (seed, rank, world size, workers, b): resuming at batch `b` only re-reads the window's
shards, and sees exactly the episodes an uninterrupted run would have seen. Windows are drawn from the whole split
on every rank, so every class combination can occur on every rank, as with one process (an endless resampled
stream gains nothing from disjoint slices). Memory is bounded by the window, never by the dataset: at most
`window_shards` shards are decoded at any time (each shard is at most ~`--shard_mb`, or one class). The rule is
stated for users in docs/data.md.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dist_signmaml.data.format import (
    KIND_EPISODES,
    BadSamples,
    ShardFormatError,
    SplitIndex,
    index_kind,
    read_class_shard,
    read_episode_index,
    read_episode_shard,
    read_index,
)
from dist_signmaml.data.storage import ShardOpener

CLASS_SAMPLING = ("balanced", "proportional")


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


def load_shard_classes(index: SplitIndex, shard: str, bad: BadSamples | None = None,
                       opener: ShardOpener | None = None) -> dict[str, np.ndarray]:
    """All classes of one shard of `index`, decoded without unpickling and checked against the index (content,
    size and sha256, hashed while it streams): name -> uint8 [n,H,W,C]."""
    return read_class_shard(index.location(shard), index.image_shape, bad, index.shard_contents[shard],
                            sha256=index.shard_sha256[shard], size=index.shard_bytes[shard], opener=opener)


def plan_episode(rng: np.random.Generator, class_sizes: Sequence[int], shape: EpisodeShape,
                 class_sampling: str = "balanced") -> list[tuple[int, np.ndarray]]:
    """Which classes (positions in `class_sizes`) and which of their images one episode uses, from the sizes alone.

    "balanced": every class is equally likely, however many images it has (the few-shot convention);
    "proportional": classes are drawn with probability proportional to their image count (what sampling images
    uniformly would give on an imbalanced dataset). Labels are 0..ways-1 in the order the classes were drawn, a
    random order, so a label carries no information across episodes.
    """
    if class_sampling == "balanced":
        chosen = rng.choice(len(class_sizes), size=shape.ways, replace=False)
    else:
        sizes = np.asarray(class_sizes, dtype=np.float64)
        chosen = rng.choice(len(class_sizes), size=shape.ways, replace=False, p=sizes / sizes.sum())
    return [(int(c), rng.choice(class_sizes[c], size=shape.images_per_class, replace=False)) for c in chosen]


def gather_episode(plan, pool: Sequence[np.ndarray], shape: EpisodeShape):
    """Images and labels of a planned episode: support/query uint8 arrays, class-major, and their labels."""
    support, query = [], []
    for c, picks in plan:
        picked = pool[c][picks]
        support.append(picked[: shape.shots])
        query.append(picked[shape.shots:])
    labels = np.arange(shape.ways)
    return (np.concatenate(support), np.repeat(labels, shape.shots),
            np.concatenate(query), np.repeat(labels, shape.queries))


def draw_episode(rng: np.random.Generator, pool: list[np.ndarray], shape: EpisodeShape, class_sampling: str = "balanced"):
    """Pick `ways` classes from `pool` and `shots + queries` distinct images of each (see plan_episode)."""
    return gather_episode(plan_episode(rng, [len(images) for images in pool], shape, class_sampling), pool, shape)


class Normalizer:
    """uint8 [..., H, W, C] -> float [..., C, H, W], standardised with the split's channel mean/std:
    (x / 255 - mean) / std, computed as one in-place multiply-add in channel-last order (the loader's hot spot)."""

    def __init__(self, mean, std):
        std64 = np.asarray(std, dtype=np.float64)
        self.scale = torch.tensor(1.0 / (255.0 * std64), dtype=torch.float32)
        self.shift = torch.tensor(-np.asarray(mean, dtype=np.float64) / std64, dtype=torch.float32)

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(images).to(torch.float32).mul_(self.scale).add_(self.shift)
        return x.movedim(-1, -3).contiguous()


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
        split = str(split_dir).rstrip("/").rsplit("/", 1)[-1]
        evaluation = "" if split == "train" else "; or do without this split: --eval_episodes 0 --test_episodes 0"
        raise ValueError(f"--ways={shape.ways} needs {shape.ways} classes with at least shots+queries="
                         f"{shape.images_per_class} images, but {split_dir} has only {len(usable)}: use --ways "
                         f"{len(usable)} or fewer, fewer --shots/--queries, or a split with more classes{evaluation}")
    return usable


def check_window(index: SplitIndex, classes_per_shard: dict[str, int], ways: int, window_shards: int, split_dir) -> None:
    """Every window of `window_shards` shards must hold `ways` usable classes; else say which option would do."""
    counts = sorted(classes_per_shard.values())
    smallest = sum(counts[:window_shards])
    if smallest >= ways:
        return
    needed = next(k for k in range(1, len(counts) + 1) if sum(counts[:k]) >= ways)  # all together hold >= ways
    per_class_mb = max(index.shard_bytes[s] / max(1, len(c)) for s, c in index.shard_contents.items()) / 1e6
    shard_mb = math.ceil(per_class_mb * math.ceil(ways / window_shards) * 1.05 + 0.5)
    raise ValueError(f"--ways={ways}: the smallest window of --window_shards={window_shards} shards of {split_dir} "
                     f"holds only {smallest} usable classes; use --window_shards {needed}, fewer --ways, or rebuild "
                     f"the split with bigger shards (shards build --shard_mb {shard_mb})")


def check_policy(class_sampling: str, on_bad_sample: str) -> None:
    if class_sampling not in CLASS_SAMPLING:
        raise ValueError(f"--class_sampling={class_sampling!r} is invalid: expected one of {', '.join(CLASS_SAMPLING)}")
    BadSamples(on_bad_sample)  # validates the policy name


class EpisodeStream(IterableDataset):
    """Endless meta-batches of `tasks_per_batch` episodes for one rank, starting at batch `start_batch`.

    With a DataLoader of `num_workers` workers, worker i produces batches start_batch + i, + num_workers, ...,
    which is the order the DataLoader hands them out in, so batch b is always the b-th batch of the rank.
    `on_bad_sample="skip"` drops unreadable samples with a warning instead of failing; `bad_samples_skipped` counts
    them (a shared-memory counter per loader worker, so the training loop can log it).
    """

    def __init__(self, split_dir, shape: EpisodeShape, tasks_per_batch: int, *, seed: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, start_batch: int = 0, window_shards: int = 8,
                 batches_per_shard: int = 0, class_sampling: str = "balanced", on_bad_sample: str = "error",
                 cache_dir: str | None = None, cache_gb: float = 0.0):
        check_policy(class_sampling, on_bad_sample)
        self.opener = ShardOpener(cache_dir, cache_gb)  # local files, or object storage with an optional verified cache
        self.index = read_index(split_dir)
        self.shape, self.tasks_per_batch, self.seed = shape, int(tasks_per_batch), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.loader_workers = max(1, int(num_workers))  # virtual workers: identical schedule with 0 or 1 worker
        self.start_batch, self.window_shards = int(start_batch), int(window_shards)
        self.class_sampling, self.on_bad_sample = class_sampling, on_bad_sample
        self.normalize = Normalizer(self.index.mean, self.index.std)
        self.usable = usable_classes(self.index, shape, split_dir)
        per_shard = {name: 0 for name in self.index.shards}
        for name in self.usable:
            per_shard[self.index.classes[name][0]] += 1
        self.classes_per_shard = per_shard
        check_window(self.index, per_shard, shape.ways, self.window_shards, split_dir)
        mean_classes = len(self.usable) / len(self.index.shards)
        # By default a shard stays in the window until about as many classes as it holds have been drawn.
        self.batches_per_shard = int(batches_per_shard) or max(1, math.ceil(mean_classes / (shape.ways * self.tasks_per_batch)))
        self._cache: dict[str, dict[str, np.ndarray]] = {}
        self._bad: BadSamples | None = None  # created in the process that reads (a DataLoader worker or this one)
        self._bad_counts = torch.zeros(self.loader_workers, dtype=torch.int64).share_memory_()
        self.shards_loaded = 0  # shard reads by this process (a window slide re-reads only the new shards)

    # ---- the schedule: a pure function of (seed, rank, world size, workers, batch) ------------------------------
    def window(self, batch: int) -> list[str]:
        """Shards in memory when batch `batch` is drawn (a function of `batch` alone).

        Every (rank, virtual worker) walks its own seeded sequence of permutations of the *whole* split and holds
        `window_shards` consecutive distinct shards of it, sliding by one every `batches_per_shard` batches; a split
        of at most `window_shards` shards is held whole. So the task distribution is the same on every rank and
        for any number of ranks and workers: any class combination that fits in a window can occur anywhere."""
        stream, local = batch % self.loader_workers, batch // self.loader_workers
        shards = self.index.shards
        if len(shards) <= self.window_shards:
            return list(shards)
        names: list[str] = []
        position = local // self.batches_per_shard
        orders: dict[int, np.ndarray] = {}
        while len(names) < self.window_shards:  # at a cycle boundary a shard can repeat: take the next one instead
            cycle, offset = divmod(position, len(shards))
            if cycle not in orders:
                orders[cycle] = np.random.default_rng([self.seed, self.rank, stream, cycle, 7]).permutation(len(shards))
            name = shards[orders[cycle][offset]]
            if name not in names:
                names.append(name)
            position += 1
        return names

    def __getstate__(self):
        # What a DataLoader worker receives: the schedule and the shared counter, not this process's loaded shards
        # or its BadSamples (whose callback is a closure).
        state = self.__dict__.copy()
        state.update(_cache={}, _bad=None)
        return state

    # ---- reading ------------------------------------------------------------------------------------------------
    def _bad_samples(self, stream: int) -> BadSamples:
        if self._bad is None:
            counts = self._bad_counts
            self._bad = BadSamples(self.on_bad_sample, on_count=lambda n: counts.__setitem__(stream, n))
        return self._bad

    @property
    def bad_samples_skipped(self) -> int:
        """Distinct unreadable samples skipped so far (0 unless policy 'skip'): the most any loader worker of this
        rank has met, since every worker walks the whole split and so meets the same bad samples."""
        return int(self._bad_counts.max())

    def _pool(self, shard_names: list[str], stream: int) -> list[np.ndarray]:
        for stale in set(self._cache) - set(shard_names):
            del self._cache[stale]  # bounded memory: only the window's shards stay loaded
        pool = []
        for name in shard_names:
            if name not in self._cache:
                self._cache[name] = load_shard_classes(self.index, name, self._bad_samples(stream), self.opener)
                self.shards_loaded += 1
            pool.extend(images for cls, images in sorted(self._cache[name].items())
                        if cls in self.usable and len(images) >= self.shape.images_per_class)
        if len(pool) < self.shape.ways:
            raise ValueError(f"--ways={self.shape.ways}: after skipping bad samples, shards {shard_names} of "
                             f"{self.index.root} hold only {len(pool)} usable classes")
        return pool

    def batch(self, b: int) -> Episodes:
        pool = self._pool(self.window(b), b % self.loader_workers)
        rng = np.random.default_rng([self.seed, self.rank, b])
        tasks = [draw_episode(rng, pool, self.shape, self.class_sampling) for _ in range(self.tasks_per_batch)]
        return stack_tasks(tasks, self.normalize)

    def __iter__(self) -> Iterator[Episodes]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        b = self.start_batch + worker
        while True:
            yield self.batch(b)
            b += max(1, info.num_workers if info is not None else 1)

    # ---- resumable state ----------------------------------------------------------------------------------------
    def state_dict(self, next_batch: int) -> dict:
        """Everything that decides the stream, plus the position. Saved in checkpoints: restarting a stream with
        the same values at start_batch=next_batch yields exactly the batches an uninterrupted stream would have."""
        shards = hashlib.sha256("".join(self.index.shard_sha256[s] for s in self.index.shards).encode()).hexdigest()
        return {"next_batch": int(next_batch), "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "workers": self.loader_workers, "ways": self.shape.ways, "shots": self.shape.shots,
                "queries": self.shape.queries, "tasks_per_batch": self.tasks_per_batch,
                "window_shards": self.window_shards, "batches_per_shard": self.batches_per_shard,
                "class_sampling": self.class_sampling, "shards_sha256": shards}

    def resume_differences(self, state: dict) -> list[str]:
        """Settings in a saved stream state that differ from this stream's: if any, a resumed run will not see the
        episodes the interrupted run would have seen (e.g. a relaunch with another number of ranks or workers)."""
        mine = self.state_dict(state.get("next_batch", 0))
        mine.pop("rank")  # the main process saves its own state; every rank's stream is derived from the same settings
        return [f"{k}: saved {state[k]!r}, now {mine[k]!r}" for k in sorted(mine) if k in state and state[k] != mine[k]]


def train_loader(stream: EpisodeStream, num_workers: int) -> DataLoader:
    """A DataLoader over an EpisodeStream (already batched). Not to be passed to accelerator.prepare: the stream
    splits ranks itself, and prepare would re-shard or broadcast on top."""
    if max(1, num_workers) != stream.loader_workers:
        raise ValueError(f"the stream was built for {stream.loader_workers} workers, the loader has {num_workers}")
    return DataLoader(stream, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0,
                      prefetch_factor=4 if num_workers > 0 else None)


# ---- fixed evaluation episodes ---------------------------------------------------------------------------------
def fixed_episodes(split_dir, shape: EpisodeShape, episode_ids, *, seed: int, tasks_per_batch: int,
                   on_bad_sample: str = "error") -> Iterator[Episodes]:
    """Evaluation episodes in batches of `tasks_per_batch`, in the order of `episode_ids`.

    `split_dir` is either a directory of materialised episodes (`python -m shards episodes`; its episodes are used
    as stored, `seed` is not needed) or a class split, from which episode i is drawn as a function of (seed, i)
    alone — the same draw `shards episodes --seed` materialises, so both give identical tasks. Either way every
    method, run and rank count scores the same tasks. The class-split fallback loads the whole split (evaluation
    splits are small); materialised episodes are read one shard at a time.
    """
    if index_kind(split_dir) == KIND_EPISODES:
        yield from stored_episodes(split_dir, shape, episode_ids, tasks_per_batch=tasks_per_batch,
                                   on_bad_sample=on_bad_sample)
        return
    index = read_index(split_dir)
    usable = usable_classes(index, shape, split_dir)
    bad = BadSamples(on_bad_sample)
    pool = []
    for shard in index.shards:
        classes = load_shard_classes(index, shard, bad)
        pool.extend(images for cls, images in sorted(classes.items())
                    if cls in usable and len(images) >= shape.images_per_class)
    if len(pool) < shape.ways:
        raise ValueError(f"--ways={shape.ways}: {split_dir} holds only {len(pool)} readable usable classes")
    normalize = Normalizer(index.mean, index.std)
    episode_ids = list(episode_ids)
    for start in range(0, len(episode_ids), tasks_per_batch):
        ids = episode_ids[start: start + tasks_per_batch]
        yield stack_tasks([draw_episode(np.random.default_rng([seed, i]), pool, shape) for i in ids], normalize)


def stored_episodes(episode_dir, shape: EpisodeShape, episode_ids, *, tasks_per_batch: int,
                    on_bad_sample: str = "error") -> Iterator[Episodes]:
    """Batches of materialised episodes `episode_ids`; only one shard is decoded at a time (ids in ascending order
    read each shard once)."""
    index = read_episode_index(episode_dir)
    if (index.ways, index.shots, index.queries) != (shape.ways, shape.shots, shape.queries):
        raise ValueError(f"{episode_dir} holds {index.ways}-way {index.shots}-shot {index.queries}-query episodes, "
                         f"but {shape.ways}-way {shape.shots}-shot {shape.queries}-query were requested")
    episode_ids = [int(i) for i in episode_ids]
    if episode_ids and (min(episode_ids) < 0 or max(episode_ids) >= index.episodes):
        raise ValueError(f"{episode_dir} holds {index.episodes} episodes (ids 0..{index.episodes - 1}), but episode "
                         f"ids up to {max(episode_ids)} were requested; materialise more with --episodes")
    bad = BadSamples(on_bad_sample)
    normalize = Normalizer(index.mean, index.std)
    loaded_shard, loaded = None, {}
    labels_s, labels_q = np.repeat(np.arange(shape.ways), shape.shots), np.repeat(np.arange(shape.ways), shape.queries)
    batch = []
    for episode_id in episode_ids:
        shard, _ = index.locate(episode_id)
        if shard != loaded_shard:
            loaded_shard = shard
            loaded = {e.id: e for e in read_episode_shard(index.location(index.shards[shard]), index, bad)}
        if episode_id not in loaded:
            bad(ShardFormatError(f"{index.location(index.shards[shard])}: episode {episode_id} is missing"))
            continue
        episode = loaded[episode_id]
        batch.append((episode.support, labels_s, episode.query, labels_q))
        if len(batch) == tasks_per_batch:
            yield stack_tasks(batch, normalize)
            batch = []
    if batch:
        yield stack_tasks(batch, normalize)

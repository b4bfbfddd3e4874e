"""`python -m shards episodes SPLIT_DIR --out DIR`: materialise N fixed evaluation episodes into episode shards.

Episode i is planned exactly as `dist_signmaml.data.fixed_episodes` draws it from a class split (RNG seeded with
(seed, i), classes in the same pool order), so reading the materialised episodes gives the same tensors as the
on-the-fly fallback with the same seed, and every method, run and rank count evaluates the same tasks. The plan
needs only the index's image counts; images are then gathered through a small cache of decoded shards, so memory
stays bounded by `cache_shards` shards however large the split is.
"""

from __future__ import annotations

import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from dist_signmaml.data.episode_loader import (
    EpisodeShape,
    gather_episode,
    load_shard_classes,
    plan_episode,
    usable_classes,
)
from dist_signmaml.data.format import SHARD_PATTERN, BadSamples, encode_episode, read_index, write_episode_index
from shards.writer import DEFAULT_SHARD_MB, tar_bytes


class ShardCache:
    """Decoded class shards, least recently used evicted first."""

    def __init__(self, index, capacity: int):
        self.index, self.capacity = index, max(1, int(capacity))
        self.loaded: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        self.bad = BadSamples("error")

    def images(self, shard: str, class_name: str) -> np.ndarray:
        if shard not in self.loaded:
            while len(self.loaded) >= self.capacity:
                self.loaded.popitem(last=False)
            self.loaded[shard] = load_shard_classes(self.index, shard, self.bad)
        self.loaded.move_to_end(shard)
        classes = self.loaded[shard]
        if class_name not in classes:
            raise ValueError(f"{self.index.root / shard}: class {class_name!r} listed in the index is missing")
        return classes[class_name]


def materialise(split_dir, out, *, ways: int = 5, shots: int = 1, queries: int = 15, episodes: int = 1000,
                seed: int = 2021, shard_mb: float = DEFAULT_SHARD_MB, cache_shards: int = 16,
                progress: bool = True) -> dict:
    """Write `episodes` episodes of `split_dir` to `out` (episode shards + index.json); returns the index."""
    for flag, value, low in (("ways", ways, 2), ("shots", shots, 1), ("queries", queries, 1), ("episodes", episodes, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"--{flag}={value!r} is invalid: expected an integer >= {low}")
    shape = EpisodeShape(ways, shots, queries)
    index = read_index(split_dir)
    usable = usable_classes(index, shape, split_dir)
    # The pool order of fixed_episodes: shards in index order, classes sorted by name inside each shard.
    pool = [(shard, name) for shard in index.shards for name in sorted(index.shard_contents[shard]) if name in usable]
    sizes = [index.classes[name][1] for _, name in pool]
    cache = ShardCache(index, cache_shards)
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    max_bytes, shard_episodes = shard_mb * 1e6, {}
    writer, shard_bytes, shard_number = None, 0.0, -1
    for episode_id in tqdm(range(episodes), desc=f"episodes {index.dataset}/{index.split}", disable=not progress):
        plan = plan_episode(np.random.default_rng([seed, episode_id]), sizes, shape)
        images = {c: cache.images(*pool[c]) for c, _ in plan}
        support, _, query, _ = gather_episode(plan, images, shape)
        sample = encode_episode(f"e{episode_id:07d}", episode_id, [pool[c][1] for c, _ in plan], support, query)
        sample_bytes = tar_bytes(sample)
        if writer is None or (shard_bytes + sample_bytes > max_bytes and shard_bytes > 0):
            if writer is not None:
                writer.close()
            shard_number, shard_bytes = shard_number + 1, 0.0
            writer = wds.TarWriter(str(partial / (SHARD_PATTERN % shard_number)), encoder=False, mtime=0.0,
                                   user="dsm", group="dsm")
            shard_episodes[SHARD_PATTERN % shard_number] = 0
        writer.write(sample)
        shard_bytes += sample_bytes
        shard_episodes[SHARD_PATTERN % shard_number] += 1
    writer.close()
    written = write_episode_index(
        partial, dataset=index.dataset, split=index.split, image_shape=index.image_shape, mean=index.mean,
        std=index.std, ways=ways, shots=shots, queries=queries, seed=seed, shard_episodes=shard_episodes,
        source={"split_dir_name": Path(split_dir).name, "split_shards_sha256": [index.shard_sha256[s] for s in index.shards]})
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return written

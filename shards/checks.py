"""`python -m shards inspect DIR` (what is there) and `python -m shards verify DIR` (is all of it intact).

DIR is a split directory (with index.json) or a dataset root whose sub-folders are split directories.
"""

from __future__ import annotations

import json
from pathlib import Path

from dist_signmaml.data.format import (INDEX_NAME, KIND_CLASSES, KIND_EPISODES, ShardFormatError, decode_episode,
                                       decode_sample, index_kind, iter_raw_samples, read_episode_index, read_index,
                                       sha256_of)


def split_dirs(path: str | Path) -> list[Path]:
    """`path` itself if it holds index.json, else its sub-folders that do (sorted)."""
    path = Path(path)
    if (path / INDEX_NAME).is_file():
        return [path]
    found = sorted(p for p in path.iterdir() if (p / INDEX_NAME).is_file()) if path.is_dir() else []
    if not found:
        raise FileNotFoundError(f"{path}: neither a split directory ({INDEX_NAME}) nor a folder of split directories")
    return found


def summary(split_dir: Path) -> dict:
    """The index's key facts as a flat dict (no shard is read)."""
    raw = json.loads((split_dir / INDEX_NAME).read_text())
    kind = index_kind(split_dir)
    shards = raw["shards"]
    facts = {"dir": str(split_dir), "kind": kind, "dataset": raw["dataset"], "split": raw["split"],
             "image_shape": raw["image_shape"], "shards": len(shards),
             "bytes": sum(int(s["bytes"]) for s in shards),
             "largest_shard_bytes": max(int(s["bytes"]) for s in shards)}
    if kind == KIND_EPISODES:
        index = read_episode_index(split_dir)
        facts |= {"episodes": index.episodes, "ways": index.ways, "shots": index.shots, "queries": index.queries,
                  "seed": index.seed}
    else:
        index = read_index(split_dir)
        counts = [n for _, n in index.classes.values()]
        facts |= {"classes": len(counts), "images": sum(counts), "images_per_class_min": min(counts),
                  "images_per_class_max": max(counts), "mean": [round(v, 4) for v in index.mean],
                  "std": [round(v, 4) for v in index.std]}
    return facts


def verify_split(split_dir: Path) -> tuple[list[str], dict]:
    """Every shard: present, size and sha256 as in the index, every sample decodes (no unpickling), and the classes
    (or episodes) found, their image counts and shapes are exactly what the index lists. Returns (problems, counts)."""
    problems: list[str] = []
    kind = index_kind(split_dir)
    index = read_episode_index(split_dir) if kind == KIND_EPISODES else read_index(split_dir)
    raw = json.loads((split_dir / INDEX_NAME).read_text())
    listed = set(index.shards)
    for stray in sorted(p.name for p in split_dir.glob("*.tar") if p.name not in listed):
        problems.append(f"{split_dir / stray}: shard not listed in {INDEX_NAME}")
    found_images: dict[str, int] = {}
    found_where: dict[str, str] = {}
    episodes_seen = 0
    for position, shard in enumerate(index.shards):
        path = split_dir / shard
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        if path.stat().st_size != index.shard_bytes.get(shard, path.stat().st_size):
            problems.append(f"{path}: {path.stat().st_size} bytes, the index says {index.shard_bytes[shard]}")
        if sha256_of(path) != index.shard_sha256[shard]:
            problems.append(f"{path}: sha256 differs from the index (corrupt or modified)")
        in_shard = 0
        for item in iter_raw_samples(path, kind):
            try:
                if isinstance(item, ShardFormatError):
                    raise item
                if kind == KIND_EPISODES:
                    decode_episode(item, index.image_shape, index.ways, index.shots, index.queries)
                    in_shard += 1
                else:
                    chunk = decode_sample(item, index.image_shape)
                    found_images[chunk.name] = found_images.get(chunk.name, 0) + len(chunk.images)
                    if found_where.setdefault(chunk.name, shard) != shard:
                        problems.append(f"{path} member {item['__key__']}: class {chunk.name!r} also in {found_where[chunk.name]}")
            except ShardFormatError as error:
                problems.append(str(error))
        if kind == KIND_EPISODES:
            episodes_seen += in_shard
            if in_shard != index.episodes_per_shard[position]:
                problems.append(f"{path}: {in_shard} readable episodes, the index says {index.episodes_per_shard[position]}")
    if kind == KIND_CLASSES:
        for name, (shard, count) in index.classes.items():
            if name not in found_images:
                problems.append(f"{split_dir / shard}: class {name!r} listed in the index is missing or unreadable")
            elif found_images[name] != count:
                problems.append(f"{split_dir / shard}: class {name!r} has {found_images[name]} readable images, the index says {count}")
            elif found_where[name] != shard:
                problems.append(f"{split_dir / found_where[name]}: class {name!r} found here, the index says {shard}")
        for name in sorted(set(found_images) - set(index.classes)):
            problems.append(f"{split_dir / found_where[name]}: class {name!r} is not listed in the index")
        if raw.get("num_images") not in (None, sum(found_images.values())):
            problems.append(f"{split_dir / INDEX_NAME}: num_images {raw['num_images']}, the shards hold {sum(found_images.values())}")
        counts = {"classes": len(found_images), "images": sum(found_images.values())}
    else:
        counts = {"episodes": episodes_seen}
    return problems, counts

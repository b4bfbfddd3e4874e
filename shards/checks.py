"""`python -m shards inspect DIR` (what is there) and `python -m shards verify DIR` (is all of it intact).

DIR is a split directory (with index.json) or a dataset root whose sub-folders are split directories.
"""

from __future__ import annotations

from pathlib import Path

from dist_signmaml.data import storage
from dist_signmaml.data.format import (
    INDEX_NAME,
    KIND_CLASSES,
    KIND_EPISODES,
    ClassAssembler,
    ShardFormatError,
    decode_episode,
    decode_sample,
    index_kind,
    iter_raw_samples,
    read_episode_index,
    read_index,
    shown,
)


def split_dirs(path) -> list:
    """`path` itself if it holds index.json, else its sub-folders that do (sorted)."""
    if storage.exists(storage.join(path, INDEX_NAME)):
        return [path if storage.is_remote(path) else Path(path)]
    found = [d for d in storage.list_dirs(path) if storage.exists(storage.join(d, INDEX_NAME))]
    if not found:
        raise FileNotFoundError(f"{path}: neither a split directory ({INDEX_NAME}) nor a folder of split directories")
    return found


def summary(split_dir) -> dict:
    """The index's key facts as a flat dict (no shard is read)."""
    kind = index_kind(split_dir)
    index = read_episode_index(split_dir) if kind == KIND_EPISODES else read_index(split_dir)
    sizes = [index.shard_bytes[s] for s in index.shards]
    facts = {"dir": str(split_dir), "kind": kind, "dataset": index.dataset, "split": index.split,
             "image_shape": list(index.image_shape), "shards": len(index.shards), "bytes": sum(sizes),
             "largest_shard_bytes": max(sizes)}
    if kind == KIND_EPISODES:
        facts |= {"episodes": index.episodes, "ways": index.ways, "shots": index.shots, "queries": index.queries,
                  "seed": index.seed}
    else:
        counts = [n for _, n in index.classes.values()]
        facts |= {"classes": len(counts), "images": sum(counts), "images_per_class_min": min(counts),
                  "images_per_class_max": max(counts), "mean": [round(v, 4) for v in index.mean],
                  "std": [round(v, 4) for v in index.std]}
    return facts


def verify_split(split_dir) -> tuple[list[str], dict]:
    """Every shard: present, a regular file, size and sha256 as in the index (hashed while it streams), every
    sample decodes (no unpickling), no class name in two samples, and the classes (or episodes) found, their image
    counts and shapes are exactly what the index lists. Returns (problems, counts)."""
    problems: list[str] = []
    kind = index_kind(split_dir)
    index = read_episode_index(split_dir) if kind == KIND_EPISODES else read_index(split_dir)
    listed = set(index.shards)
    for stray in sorted(n for n in storage.list_names(split_dir) if n.endswith(".tar") and n not in listed):
        problems.append(f"{storage.join(split_dir, stray)}: shard not listed in {INDEX_NAME}")
    found_images: dict[str, int] = {}
    found_where: dict[str, str] = {}
    episodes_seen = 0
    for position, shard in enumerate(index.shards):
        path = index.location(shard)
        in_shard = 0
        assembler = ClassAssembler(str(path))
        for item in iter_raw_samples(path, kind, sha256=index.shard_sha256[shard], size=index.shard_bytes[shard]):
            try:
                if isinstance(item, ShardFormatError):
                    raise item
                if kind == KIND_EPISODES:
                    decode_episode(item, index.image_shape, index.ways, index.shots, index.queries)
                    in_shard += 1
                else:
                    chunk = decode_sample(item, index.image_shape)
                    assembler.add(chunk, item["__key__"])
                    found_images[chunk.name] = found_images.get(chunk.name, 0) + len(chunk.images)
                    if found_where.setdefault(chunk.name, shard) != shard:
                        problems.append(f"{path} member {item['__key__']}: class {shown(chunk.name)} also in "
                                        f"{found_where[chunk.name]}")
            except ShardFormatError as error:
                problems.append(str(error))
        if kind == KIND_EPISODES:
            episodes_seen += in_shard
            if in_shard != index.episodes_per_shard[position]:
                problems.append(f"{path}: {in_shard} readable episodes, the index says {index.episodes_per_shard[position]}")
    if kind == KIND_CLASSES:
        for name, (shard, count) in index.classes.items():
            where = index.location(shard)
            if name not in found_images:
                problems.append(f"{where}: class {shown(name)} listed in the index is missing or unreadable")
            elif found_images[name] != count:
                problems.append(f"{where}: class {shown(name)} has {found_images[name]} readable images, the index says {count}")
            elif found_where[name] != shard:
                problems.append(f"{index.location(found_where[name])}: class {shown(name)} found here, the index says {shard}")
        for name in sorted(set(found_images) - set(index.classes)):
            problems.append(f"{index.location(found_where[name])}: class {shown(name)} is not listed in the index")
        counts = {"classes": len(found_images), "images": sum(found_images.values())}
    else:
        counts = {"episodes": episodes_seen}
    return problems, counts

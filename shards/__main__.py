"""`python -m shards build omniglot --out DIR` (more builders and `inspect`/`verify` live beside it)."""

from __future__ import annotations

import fire

from shards import omniglot


def build(dataset: str, out: str, splits: str = "train,val,test", image_size: int = 28, shard_mb: float = 4.0):
    """Build shards for DATASET (omniglot) into OUT/<split>/.

    Args:
        dataset: omniglot.
        out: output folder; each split becomes OUT/<split>/ with shard-*.tar and index.json.
        splits: comma-separated split names (omniglot: train,val,test,trainval,background,evaluation).
        image_size: side length of the square images written.
        shard_mb: target shard size in MB.
    """
    split_list = [s for s in str(splits).split(",") if s] if isinstance(splits, str) else list(splits)
    if dataset != "omniglot":
        raise SystemExit(f"error: dataset {dataset!r} is not known; expected omniglot")
    indexes = omniglot.build(out, splits=split_list, image_size=image_size, shard_mb=shard_mb)
    for split, index in indexes.items():
        print(f"{out}/{split}: {index['num_classes']} classes, {index['num_images']} images, {len(index['shards'])} shards")


if __name__ == "__main__":
    fire.Fire({"build": build})

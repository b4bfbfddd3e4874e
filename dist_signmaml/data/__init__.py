"""Data: the shard format and the streaming episode assembler. No accelerate here.

Names are imported lazily so that `shards` builders (which only need `dist_signmaml.data.format`) do not pay for
importing torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    **{name: "episode_loader" for name in ("EpisodeShape", "Episodes", "EpisodeStream", "fixed_episodes",
                                           "stored_episodes", "train_loader", "usable_classes", "CLASS_SAMPLING")},
    "read_index": "format", "read_episode_index": "format", "index_kind": "format", "ShardFormatError": "format",
    "BAD_SAMPLE_POLICIES": "format",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"dist_signmaml.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'dist_signmaml.data' has no attribute {name!r}")

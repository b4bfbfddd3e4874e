"""Data: the shard format and the streaming episode assembler. No accelerate here."""

from dist_signmaml.data.episodes import EpisodeShape, Episodes, EpisodeStream, fixed_episodes, train_loader
from dist_signmaml.data.format import read_index

__all__ = ["EpisodeShape", "Episodes", "EpisodeStream", "fixed_episodes", "read_index", "train_loader"]

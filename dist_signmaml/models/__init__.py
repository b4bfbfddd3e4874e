"""Backbones: single-device and vmap-safe; BatchNorm always uses the statistics of the batch it sees."""

from dist_signmaml.models.registry import BACKBONES, build_backbone

__all__ = ["BACKBONES", "build_backbone"]

"""`--backbone NAME` -> an nn.Module. The algorithms never special-case a backbone."""

from __future__ import annotations

from typing import Callable

from torch import nn

from dist_signmaml.models.conv4 import Conv4

# name -> builder(in_channels, ways, hidden, image_size); hidden=0 means the backbone's own default width
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "conv4": lambda in_channels, ways, hidden, image_size: Conv4(in_channels, ways, hidden or (32 if image_size >= 64 else 64), image_size),
}


def build_backbone(name: str, *, in_channels: int, ways: int, hidden: int = 0, image_size: int = 28) -> nn.Module:
    if name not in BACKBONES:
        raise ValueError(f"--backbone={name!r} is not known; expected one of {sorted(BACKBONES)}")
    return BACKBONES[name](in_channels, ways, hidden, image_size)

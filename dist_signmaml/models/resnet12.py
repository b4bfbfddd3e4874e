"""ResNet-12, the standard few-shot backbone (Lee et al. 2019, MetaOptNet; also learn2learn's): four residual
blocks of widths 64-160-320-640, each [3 x (conv3x3 -> BatchNorm -> LeakyReLU 0.1), conv1x1 shortcut], then a 2x2
max-pool; global average pooling and a linear head.

84 px inputs end as 5x5 maps of 640 channels (84 -> 42 -> 21 -> 10 -> 5). DropBlock, used by some ResNet-12 recipes,
is left out: it needs randomness inside the inner loop, and MAML-style training does not use it.
"""

from __future__ import annotations

from torch import nn

from dist_signmaml.models.blocks import Backbone, run_blocks
from dist_signmaml.models.conv4 import task_batchnorm

# The standard widths are the base width 64 times these factors (64-160-320-640).
WIDTH_FACTORS = (1.0, 2.5, 5.0, 10.0)


def block_widths(base: int) -> tuple[int, ...]:
    return tuple(max(1, round(base * factor)) for factor in WIDTH_FACTORS)


class ResidualBlock12(nn.Module):
    """Three 3x3 convolutions on the main path, a 1x1 convolution on the shortcut, sum, LeakyReLU, 2x2 max-pool.

    Convolutions carry no bias: each is followed by BatchNorm, whose shift plays that role.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = task_batchnorm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = task_batchnorm(out_channels)
        self.conv3 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn3 = task_batchnorm(out_channels)
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), task_batchnorm(out_channels))
        self.activation = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        out = self.activation(self.bn1(self.conv1(x)))
        out = self.activation(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.pool(self.activation(out + self.shortcut(x)))


class ResNet12(Backbone):
    """ResNet-12 with base width `hidden` (64 gives the standard 64-160-320-640)."""

    def __init__(self, in_channels: int, ways: int, hidden: int = 64, image_size: int = 84):
        super().__init__()
        if image_size < 16:
            raise ValueError(f"resnet12 halves the image four times and needs at least 16 px, got {image_size}")
        widths = block_widths(hidden)
        channels = (in_channels,) + widths
        self.blocks = nn.Sequential(*[ResidualBlock12(channels[i], channels[i + 1]) for i in range(len(widths))])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(widths[-1], ways)

    def adaptation_blocks(self) -> list[tuple[str, ...]]:
        return [(f"blocks.{i}",) for i in range(len(self.blocks))]

    def logits(self, x):
        features = run_blocks(self.blocks, x, self.activation_checkpointing)
        return self.head(self.pool(features).flatten(1))

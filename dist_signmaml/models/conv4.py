"""The paper's 4-layer CNN: 4 x [conv3x3 -> BatchNorm -> ReLU -> 2x2 max-pool], then a linear head (paper §5.1).

Each block runs the max-pool before the ReLU. The two commute exactly (ReLU is monotone, so the max of the ReLUs is
the ReLU of the max, and the gradient reaches the same element or, when the max is <= 0, none), values and
gradients alike (tested in float64); pooling first makes the ReLU and its backward run on a quarter of the
elements. The module order (and so the state-dict names) is conv, BatchNorm, ReLU, max-pool as in the paper.
"""

from __future__ import annotations

from torch import nn

from dist_signmaml.models.blocks import Backbone, run_blocks
from dist_signmaml.models.norm import TaskBatchNorm2d


def task_batchnorm(channels: int) -> TaskBatchNorm2d:
    return TaskBatchNorm2d(channels)


class ConvBlock(nn.Sequential):
    """conv3x3 -> BatchNorm -> ReLU -> 2x2 max-pool, computed as conv -> BatchNorm -> max-pool -> ReLU (same
    numbers, see the module docstring). Indices 0-3 are conv, BatchNorm, ReLU, max-pool."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.Conv2d(in_channels, out_channels, 3, padding=1), task_batchnorm(out_channels),
                         nn.ReLU(), nn.MaxPool2d(2))

    def forward(self, x):
        convolution, norm, activation, pool = self
        return activation(pool(norm(convolution(x))))



class Conv4(Backbone):
    """conv4 with `hidden` filters per layer (64 for 28/32 px inputs, 32 for 84 px in the paper)."""

    def __init__(self, in_channels: int, ways: int, hidden: int = 64, image_size: int = 28):
        super().__init__()
        self.features = nn.Sequential(ConvBlock(in_channels, hidden), ConvBlock(hidden, hidden),
                                      ConvBlock(hidden, hidden), ConvBlock(hidden, hidden), nn.Flatten())
        side = image_size
        for _ in range(4):
            side //= 2
        if side < 1:
            raise ValueError(f"conv4 needs images of at least 16 px, got {image_size}")
        self.head = nn.Linear(hidden * side * side, ways)

    def adaptation_blocks(self) -> list[tuple[str, ...]]:
        return [(f"features.{i}",) for i in range(4)]

    def logits(self, x):
        features = run_blocks(self.features[:4], x, self.activation_checkpointing)
        return self.head(self.features[4](features))

"""torchvision's ResNet-18/34 as few-shot backbones.

The residual blocks are torchvision's own (`torchvision.models.resnet18/34(weights=None, norm_layer=...)`), built
with BatchNorm that uses per-task batch statistics and keeps no buffers (like every backbone here), so the network is
vmap-safe and its parameters are all there is to adapt. Module names follow torchvision (conv1, bn1, layer1.0, ...)
except the classifier, which is `head` with `ways` outputs; a torchvision state dict therefore loads by name
(`load_weights`). Nothing is ever downloaded: `weights=None` always, and pretrained weights come from a local file.
"""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet18, resnet34

from dist_signmaml.models.blocks import Backbone, run_blocks
from dist_signmaml.models.conv4 import task_batchnorm

TORCHVISION_RESNETS = {"resnet18": resnet18, "resnet34": resnet34}
STEMS = ("auto", "small", "imagenet")
SMALL_STEM_BELOW = 64  # px; `--stem auto` uses the small stem for smaller images (Omniglot 28, CIFAR-FS 32)


def resolve_stem(stem: str, image_size: int) -> str:
    """'auto' -> 'small' below 64 px, else 'imagenet'.

    The ImageNet stem (7x7 stride-2 conv + 3x3 stride-2 max-pool) divides the side by 4 before layer1: 84 px ends as
    3x3 maps, 28 px as 1x1. The small stem (3x3 stride-1 conv, no max-pool) keeps full resolution: 32 px ends as 4x4,
    84 px as 11x11, at about 16x the compute of the ImageNet stem.
    """
    if stem not in STEMS:
        raise ValueError(f"--stem={stem!r} is not known; expected one of {STEMS}")
    if stem == "auto":
        return "small" if image_size < SMALL_STEM_BELOW else "imagenet"
    return stem


class TorchvisionResNet(Backbone):
    def __init__(self, depth_name: str, in_channels: int, ways: int, image_size: int, stem: str = "auto"):
        super().__init__()
        trunk = TORCHVISION_RESNETS[depth_name](weights=None, norm_layer=task_batchnorm)
        self.stem = resolve_stem(stem, image_size)
        if self.stem == "small":
            self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = (trunk.conv1 if in_channels == 3 else
                          nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False))
            self.maxpool = trunk.maxpool
        self.bn1, self.relu = trunk.bn1, trunk.relu
        self.layer1, self.layer2, self.layer3, self.layer4 = trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4
        self.avgpool = trunk.avgpool
        self.head = nn.Linear(trunk.fc.in_features, ways)

    def residual_blocks(self) -> list[nn.Module]:
        return [block for layer in (self.layer1, self.layer2, self.layer3, self.layer4) for block in layer]

    def adaptation_blocks(self) -> list[tuple[str, ...]]:
        blocks = [("conv1", "bn1")]
        for layer_name in ("layer1", "layer2", "layer3", "layer4"):
            blocks += [(f"{layer_name}.{i}",) for i in range(len(getattr(self, layer_name)))]
        return blocks

    def logits(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = run_blocks(self.residual_blocks(), x, self.activation_checkpointing)
        return self.head(self.avgpool(x).flatten(1))

"""The conv4 backbone and the per-task BatchNorm it (and every other backbone) uses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dist_signmaml.models import build_backbone
from dist_signmaml.models.norm import TaskBatchNorm2d


def test_task_batchnorm_matches_batchnorm_without_running_stats():
    """The layer as a whole (its two kernels are compared in tests/test_layout.py)."""
    torch.manual_seed(0)
    x = torch.randn(6, 5, 7, 7, dtype=torch.float64) * 3 + 1
    reference = nn.BatchNorm2d(5, track_running_stats=False).double()
    ours = TaskBatchNorm2d(5).double()
    with torch.no_grad():
        for module in (reference, ours):
            module.weight.copy_(torch.linspace(0.5, 2, 5))
            module.bias.copy_(torch.linspace(-1, 1, 5))
    out = ours(x)
    torch.testing.assert_close(out, reference(x))
    assert not list(ours.buffers()), "per-task BatchNorm must keep no running statistics"


@pytest.mark.parametrize("size,hidden,features", [(28, 0, 64), (84, 0, 32 * 5 * 5), (32, 16, 16 * 2 * 2)])
def test_conv4_shapes_and_paper_widths(size, hidden, features):
    model = build_backbone("conv4", in_channels=3, ways=7, hidden=hidden, image_size=size)
    assert model.head.in_features == features
    assert model(torch.randn(4, 3, size, size)).shape == (4, 7)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4 and all(c.kernel_size == (3, 3) for c in convs)


def test_unknown_backbone_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="--backbone='vgg'.*conv4"):
        build_backbone("vgg", in_channels=1, ways=5)

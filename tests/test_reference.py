"""Our meta-gradients against an independent third-party-style implementation: the per-task clone/adapt loop of
learn2learn and the Sign-MAML paper's code, built on `higher` (bench/reference.py)."""

from __future__ import annotations

import pytest
import torch

from bench.reference import CloneLoopMetaStep, reference_conv4
from dist_signmaml.algorithms import MetaLearner, make_rule
from dist_signmaml.models import build_backbone


from bench.reference import learn2learn_available

@pytest.mark.parametrize("algo,lr", [("sign", 0.01), ("fo", 0.3), ("maml", 0.3)])
@pytest.mark.parametrize("task_parallel,backend", [("loop", "higher"), ("vmap", "higher"), ("loop", "learn2learn")])
def test_meta_gradient_equals_clone_loop_reference(algo, lr, task_parallel, backend):
    if backend == "learn2learn" and not learn2learn_available():
        pytest.skip("learn2learn not installed (build it with bench/install_learn2learn.sh); the higher backend covers the same loop")
    torch.manual_seed(0)
    ours = build_backbone("conv4", in_channels=1, ways=5, hidden=8, image_size=28).double()
    reference = reference_conv4(1, 5, hidden=8, image_size=28).double()
    with torch.no_grad():  # same initial weights (same parameter order: conv, bn, ... , head)
        for a, b in zip(ours.parameters(), reference.parameters(), strict=True):
            b.copy_(a)
    support_x = torch.randn(3, 5, 1, 28, 28, dtype=torch.float64)
    support_y = torch.arange(5).expand(3, -1).clone()
    query_x = torch.randn(3, 10, 1, 28, 28, dtype=torch.float64)
    query_y = torch.arange(5).repeat(2).expand(3, -1).clone()

    loss = MetaLearner(ours, make_rule(algo), lr, 2, task_parallel)(support_x, support_y, query_x, query_y).loss
    loss.backward()
    reference_loss = CloneLoopMetaStep(reference, algo, lr, 2, backend=backend).accumulate_meta_gradient(support_x, support_y, query_x, query_y)

    assert abs(loss.item() - reference_loss) < 1e-12
    for a, b in zip(ours.parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)

"""bf16 autocast, channels-last weights and torch.compile against fp32 / contiguous / eager, with stated tolerances.

Tolerances (measured on this code, CPU, then given ~1.5x headroom):
- channels_last and compile change no arithmetic that matters: float64 results agree to 1e-9 relative.
- bf16 rounds every convolution input and output-gradient to 8 significant bits. Forward logits stay within ~2%
  (bound 4%), and a plain backward's gradient keeps cosine >= 0.96 to fp32 (bound 0.9). Through a sign inner step
  the meta-gradient drifts further — the noisy bf16 support gradients flip sign(g) on coordinates where g is small
  — so the meta-loss is bounded at 6% relative and the meta-gradient cosine at 0.75 (conv4, measured 0.88-0.95) /
  0.35 (ResNet-12 at width 8, measured 0.50-0.67). bf16 meta-training still makes the same progress (tested).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist_signmaml.algorithms import MetaLearner, make_rule
from dist_signmaml.models import build_backbone

from tests.test_backbones import episode_batch, meta_gradient


pytestmark = pytest.mark.usefixtures("one_torch_thread")



def flat(grads: dict) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads.values()])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / a.norm()).item()


# ---- bf16 ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,hidden,size", [("conv4", 16, 32), ("resnet12", 8, 32), ("resnet18", 0, 16)])
def test_bf16_runs_convolutions_in_bfloat16_and_keeps_fp32_weights_and_logits(name, hidden, size):
    """resnet18 only at 16 px with its ImageNet stem and forward only (1x1 maps: too degenerate to compare numbers,
    enough to see the dtypes): bf16 is emulated on CPUs without bf16 units, and its backward is slow there."""
    torch.manual_seed(0)
    model = build_backbone(name, in_channels=3, ways=5, hidden=hidden, image_size=size, stem="imagenet",
                           precision="bf16")
    conv_outputs = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(lambda m, args, out: conv_outputs.append(out.dtype))
    x, y, _, _ = episode_batch(1, 5, 3, 1, size)
    logits = model(x[0])
    assert len(conv_outputs) == len([m for m in model.modules() if isinstance(m, nn.Conv2d)])
    assert set(conv_outputs) == {torch.bfloat16} and logits.dtype == torch.float32
    if name == "resnet18":  # its bf16 backward alone takes ~7 s on this emulating CPU
        return
    F.cross_entropy(logits, y[0]).backward()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    reference = build_backbone(name, in_channels=3, ways=5, hidden=hidden, image_size=size)
    reference.load_state_dict(model.state_dict())
    reference_logits = reference(x[0])
    F.cross_entropy(reference_logits, y[0]).backward()
    assert relative(reference_logits, logits) < 0.04
    grads = lambda m: torch.cat([p.grad.flatten() for p in m.parameters()])  # noqa: E731
    assert F.cosine_similarity(grads(reference), grads(model), dim=0) > 0.9


@pytest.mark.parametrize("name,hidden,min_cosine", [("conv4", 16, 0.75), ("resnet12", 8, 0.35)])
@pytest.mark.parametrize("task_parallel", ["loop", "vmap"])
def test_bf16_meta_step_agrees_with_fp32(name, hidden, min_cosine, task_parallel):
    batch = episode_batch(2, 5, 1, 3, 32, seed=1)
    results = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(1)
        model = build_backbone(name, in_channels=3, ways=5, hidden=hidden, image_size=32, precision=precision)
        results[precision] = meta_gradient(MetaLearner(model, make_rule("sign"), 0.005, 1, task_parallel), batch)
    (loss32, grads32), (loss16, grads16) = results["fp32"], results["bf16"]
    assert abs(loss16 - loss32) / loss32 < 0.06
    assert F.cosine_similarity(flat(grads32), flat(grads16), dim=0) > min_cosine


def test_bf16_meta_training_makes_progress_like_fp32():
    batch = episode_batch(1, 2, 1, 2, 84, seed=2)
    final = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = build_backbone("resnet12", in_channels=3, ways=2, hidden=4, image_size=84, precision=precision)
        learner = MetaLearner(model, make_rule("sign"), 0.005, 1, "loop")
        optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
        first = None
        for _ in range(4):
            output = learner(*batch)
            first = output.loss.item() if first is None else first
            optimizer.zero_grad()
            output.loss.backward()
            optimizer.step()
        with torch.no_grad():
            final[precision] = learner(*batch).loss.item() / first
    assert final["fp32"] < 0.7 and final["bf16"] < 0.7, final


# ---- channels_last -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["conv4", "resnet12"])
@pytest.mark.parametrize("task_parallel", ["loop", "vmap"])
def test_channels_last_agrees_with_contiguous(name, task_parallel):
    batch = episode_batch(2, 3, 2, 1, 16, dtype=torch.float64)
    results = {}
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = build_backbone(name, in_channels=3, ways=3, hidden=4, image_size=16,
                               channels_last=channels_last).double()
        kernels = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
        assert all(w.is_contiguous(memory_format=torch.channels_last) == channels_last for w in kernels)
        results[channels_last] = meta_gradient(MetaLearner(model, make_rule("sign"), 0.01, 2, task_parallel), batch)
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(flat(results[True][1]), flat(results[False][1]), rtol=1e-9, atol=1e-11)


# ---- torch.compile -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task_parallel,algo", [("loop", "sign"), ("vmap", "maml")])
def test_compiled_tasks_agree_with_eager(task_parallel, algo):
    """The compiled region (inner loop with torch.func.grad, vmap, query loss) is traced whole by dynamo and run
    through AOTAutograd; 'aot_eager' checks exactly that capture without paying inductor's C++ build in CI (the
    benchmark runs inductor). Also checks the compiled function is reused across steps (no recompilation)."""
    import torch._dynamo

    torch._dynamo.reset()
    batch = episode_batch(2, 3, 2, 1, 16, dtype=torch.float64)
    torch.manual_seed(0)
    model = build_backbone("conv4", in_channels=3, ways=3, hidden=4, image_size=16).double()
    lr = 0.01 if algo == "sign" else 0.1
    eager = meta_gradient(MetaLearner(model, make_rule(algo), lr, 2, task_parallel), batch)
    compiled_learner = MetaLearner(model, make_rule(algo), lr, 2, task_parallel).compile_tasks("aot_eager")
    counters = torch._dynamo.utils.counters
    counters.clear()
    for _ in range(2):
        compiled = meta_gradient(compiled_learner, batch)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(flat(compiled[1]), flat(eager[1]), rtol=1e-9, atol=1e-11)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])

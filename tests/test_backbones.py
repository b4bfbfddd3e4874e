"""Backbones beyond conv4: ResNet-12 and torchvision ResNet-18/34 through the one inner loop.

CPU-sized: ResNets run at small widths / few images wherever the property does not depend on size; shapes are also
checked at full width, and training at 84 px.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from dist_signmaml.algorithms import MetaLearner, make_rule
from dist_signmaml.algorithms.rules import sign_step
from dist_signmaml.models import adapted_parameter_names, build_backbone, load_weights, parameter_blocks
from dist_signmaml.models.norm import TaskBatchNorm2d

ALL_BACKBONES = ["conv4", "resnet12", "resnet18", "resnet34"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_WIDTH = {"conv4": 4, "resnet12": 2, "resnet18": 0, "resnet34": 0}  # torchvision widths are fixed


def episode_batch(tasks: int, ways: int, shots: int, queries: int, size: int, channels: int = 3, seed: int = 0,
                  dtype=torch.float32):
    """Synthetic learnable tasks: each class is a fixed random pattern plus per-image noise, labels 0..ways-1."""
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(tasks, ways, channels, size, size, generator=generator, dtype=dtype)

    def images(k):
        x = prototypes.repeat_interleave(k, dim=1)
        return x + 0.5 * torch.randn(x.shape, generator=generator, dtype=dtype)

    labels = lambda k: torch.arange(ways).repeat_interleave(k).expand(tasks, -1).clone()  # noqa: E731
    return images(shots), labels(shots), images(queries), labels(queries)


def meta_gradient(learner: MetaLearner, batch):
    learner.zero_grad()
    output = learner(*batch)
    output.loss.backward()
    return output.loss.detach(), {n: p.grad.clone() for n, p in learner.model.named_parameters()}


def assert_all_close(a: dict, b: dict, **tolerance):
    for name in a:
        torch.testing.assert_close(a[name], b[name], **tolerance, msg=lambda m: f"{name}: {m}")


# ---- shapes and structure ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,size", [("conv4", 32), ("conv4", 84), ("resnet12", 32), ("resnet12", 84),
                                       ("resnet18", 32), ("resnet18", 84), ("resnet34", 84)])
def test_forward_shapes_and_per_task_batchnorm(name, size):
    model = build_backbone(name, in_channels=3, ways=5, hidden=TINY_WIDTH[name], image_size=size)
    x = torch.randn(3, 3, size, size)
    assert model(x).shape == (3, 5)
    assert not list(model.buffers()), "BatchNorm must keep no running statistics (vmap/DDP-safe, per-task)"
    norms = [m for m in model.modules() if "BatchNorm" in type(m).__name__ or isinstance(m, TaskBatchNorm2d)]
    assert norms and all(isinstance(m, TaskBatchNorm2d) for m in norms)
    # Per-task statistics in train and eval mode alike: an image's logits depend on the batch it comes with.
    model.eval()
    alone, with_others = model(x[:1]), model(x)[:1]
    assert not torch.allclose(alone, with_others, atol=1e-4)


def test_resnet12_standard_widths_and_84px_feature_map():
    model = build_backbone("resnet12", in_channels=3, ways=5, image_size=84)
    widths = [block.conv1.out_channels for block in model.blocks]
    assert widths == [64, 160, 320, 640] and model.head.in_features == 640
    maps = []
    model.blocks[-1].register_forward_hook(lambda module, args, out: maps.append(out.shape))
    with torch.no_grad():
        assert model(torch.randn(2, 3, 84, 84)).shape == (2, 5)
    assert maps == [(2, 640, 5, 5)]  # 84 -> 42 -> 21 -> 10 -> 5
    assert len([m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]) == 12


@pytest.mark.parametrize("stem,size,first_kernel,has_pool,final_side", [
    ("auto", 32, 3, False, 4), ("auto", 84, 7, True, 3), ("small", 84, 3, False, 11), ("imagenet", 32, 7, True, 1)])
def test_torchvision_stem_options(stem, size, first_kernel, has_pool, final_side):
    model = build_backbone("resnet18", in_channels=1, ways=4, image_size=size, stem=stem)
    assert model.conv1.kernel_size == (first_kernel, first_kernel) and model.conv1.in_channels == 1
    assert isinstance(model.maxpool, nn.MaxPool2d) == has_pool
    sides = []
    model.layer4[-1].register_forward_hook(lambda module, args, out: sides.append(out.shape[-1]))
    with torch.no_grad():
        assert model(torch.randn(2, 1, size, size)).shape == (2, 4)
    assert sides == [final_side]


@pytest.mark.parametrize("name", ALL_BACKBONES)
def test_blocks_partition_the_parameters(name):
    """Every parameter belongs to exactly one feature block or the head; --adapt resolves against that."""
    model = build_backbone(name, in_channels=3, ways=5, hidden=TINY_WIDTH[name], image_size=32)
    groups = parameter_blocks(model)
    flat = [n for group in groups for n in group]
    assert sorted(flat) == sorted(n for n, _ in model.named_parameters()) and len(flat) == len(set(flat))
    assert all(groups) and groups[-1] == ["head.weight", "head.bias"]
    assert adapted_parameter_names(model, "all") is None
    assert adapted_parameter_names(model, "head") == {"head.weight", "head.bias"}
    assert adapted_parameter_names(model, "last:1") == set(groups[-2] + groups[-1])
    assert adapted_parameter_names(model, f"last:{len(groups) - 1}") == set(flat)
    with pytest.raises(ValueError, match=f"--adapt=last:{len(groups)} asks for {len(groups)} blocks"):
        adapted_parameter_names(model, f"last:{len(groups)}")


def test_torchvision_widths_are_fixed():
    with pytest.raises(ValueError, match="--hidden=16 does not apply to --backbone=resnet18"):
        build_backbone("resnet18", in_channels=3, ways=5, hidden=16, image_size=32)


# ---- the same inner loop for every backbone ----------------------------------------------------------------------

@pytest.mark.parametrize("name,algo,steps", [("resnet12", "sign", 2), ("resnet12", "maml", 2), ("resnet18", "sign", 1)])
def test_vmap_equals_loop(name, algo, steps):
    """Tasks vectorised with vmap give the loop's numbers, in float64 (in float32 a single inner step of an
    11M-parameter ResNet already amplifies rounding differences to ~1e-2 in the meta-gradient). ResNet-34 is the
    same adapter class and block type as ResNet-18 with more blocks, at twice the CPU time, so it is left out."""
    torch.manual_seed(0)
    model = build_backbone(name, in_channels=3, ways=2, hidden=TINY_WIDTH[name], image_size=16).double()
    shots = 2 if name == "resnet12" else 1
    batch = episode_batch(2, 2, shots, 1, 16, dtype=torch.float64)
    lr = 0.01 if algo == "sign" else 0.1
    loop_loss, loop = meta_gradient(MetaLearner(model, make_rule(algo), lr, steps, "loop"), batch)
    vmap_loss, vmapped = meta_gradient(MetaLearner(model, make_rule(algo), lr, steps, "vmap"), batch)
    torch.testing.assert_close(loop_loss, vmap_loss, rtol=1e-10, atol=1e-12)
    assert_all_close(loop, vmapped, rtol=1e-8, atol=1e-10)


def unrolled_reference(model, batch, steps, lr, update):
    """Per-task unroll with torch.autograd.grad(create_graph=True): differentiates through every inner step."""
    support_x, support_y, query_x, query_y = batch
    params = dict(model.named_parameters())
    total = 0.0
    for t in range(len(support_x)):
        fast = dict(params)
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(model, fast, (support_x[t],)), support_y[t])
            fast = update(fast, dict(zip(fast, torch.autograd.grad(loss, list(fast.values()), create_graph=True))), lr)
        total = total + F.cross_entropy(functional_call(model, fast, (query_x[t],)), query_y[t])
    grads = torch.autograd.grad(total / len(support_x), list(params.values()))
    return dict(zip(params, grads))


@pytest.mark.parametrize("algo,steps", [("sign", 2), ("maml", 1)])
def test_resnet12_meta_gradient_equals_full_unroll(algo, steps):
    """Eq. 14 on ResNet-12 (residual sums, LeakyReLU, 1x1 shortcuts): the first-order Sign-MAML gradient equals
    autograd through the whole create_graph unroll; MAML's second-order gradient equals it too (eq. 5)."""
    torch.manual_seed(1)
    model = build_backbone("resnet12", in_channels=3, ways=3, hidden=2, image_size=16).double()
    batch = episode_batch(2, 3, 2, 2, 16, dtype=torch.float64, seed=1)
    lr = 0.02 if algo == "sign" else 0.2
    step = (lambda p, g, lr: sign_step(p, g, lr)) if algo == "sign" else (lambda p, g, lr: {n: p[n] - lr * g[n] for n in p})
    _, ours = meta_gradient(MetaLearner(model, make_rule(algo), lr, steps, "loop"), batch)
    assert_all_close(ours, unrolled_reference(model, batch, steps, lr, step), rtol=1e-9, atol=1e-11)
    if algo == "sign":  # teeth: an SGD inner step at the same lr gives another meta-gradient
        _, fo = meta_gradient(MetaLearner(model, make_rule("fo"), lr, steps, "loop"), batch)
        assert max((ours[n] - fo[n]).abs().max().item() for n in ours) > 1e-4


# ---- training at 84 px -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,hidden", [("conv4", 8), ("resnet12", 4), ("resnet18", 0), ("resnet34", 0)])
def test_a_few_meta_steps_decrease_the_loss_at_84px(name, hidden):
    """Sign-MAML meta-training on a fixed 84 px task batch: the post-adaptation query loss goes down."""
    torch.manual_seed(0)
    model = build_backbone(name, in_channels=3, ways=2, hidden=hidden, image_size=84)
    learner = MetaLearner(model, make_rule("sign"), 0.005, 1, "loop")
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    batch = episode_batch(1, 2, 1, 2, 84, seed=2)
    losses = []
    for _ in range(4):
        output = learner(*batch)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        losses.append(output.loss.item())
    with torch.no_grad():
        final = learner(*batch).loss.item()
    assert final < 0.7 * losses[0], (losses, final)


# ---- activation checkpointing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,dtype", [("conv4", torch.float64), ("resnet12", torch.float64),
                                        ("resnet18", torch.float32)])
def test_activation_checkpointing_recomputes_blocks_and_keeps_gradients(name, dtype):
    """The recomputation replays the same operations on the same tensors (the task's adapted weights, the same
    BatchNorm kernel), so the meta-gradient is unchanged — to rounding in float32, where kernels may order sums
    differently."""
    batch = episode_batch(2, 2, 1, 1, 16, dtype=dtype)
    results = {}
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = build_backbone(name, in_channels=3, ways=2, hidden=TINY_WIDTH[name], image_size=16,
                               activation_checkpointing=checkpointed).to(dtype)
        block = model.adaptation_blocks()[-1][0]
        calls = []
        # a pre-hook: the recomputation stops as soon as it has rebuilt what backward needs, before forward hooks
        model.get_submodule(block).register_forward_pre_hook(lambda *args: calls.append(1))
        learner = MetaLearner(model, make_rule("sign"), 0.01, 1, "loop")
        learner.zero_grad()
        output = learner(*batch)
        forwards = len(calls)
        output.loss.backward()
        results[checkpointed] = (output.loss.detach(), {n: p.grad for n, p in model.named_parameters()},
                                 forwards, len(calls) - forwards)
    plain, checkpointed = results[False], results[True]
    exact = dtype == torch.float64
    torch.testing.assert_close(plain[0], checkpointed[0], rtol=1e-12 if exact else 1e-6, atol=0)
    assert_all_close(plain[1], checkpointed[1], rtol=1e-10 if exact else 1e-4, atol=1e-12 if exact else 1e-6)
    assert plain[3] == 0
    assert checkpointed[3] == 2  # the query forward of each of the 2 tasks is recomputed in backward


# ---- local weights -----------------------------------------------------------------------------------------------

def test_torchvision_weights_load_from_a_local_file(tmp_path, monkeypatch):
    import torch.hub
    import torchvision

    def no_downloads(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_downloads)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_downloads)
    torch.manual_seed(3)
    reference = torchvision.models.resnet18(weights=None)  # a torchvision-format state dict, ImageNet head
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, nn.BatchNorm2d):  # non-default values so that a skipped copy would show
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    path = tmp_path / "resnet18-local.pth"
    torch.save(reference.state_dict(), path)

    model = build_backbone("resnet18", in_channels=3, ways=5, image_size=84, stem="imagenet")
    head_before = model.head.weight.clone()
    fresh = load_weights(model, path)
    assert fresh == ["head.weight", "head.bias"]  # 1000 ImageNet classes vs 5 ways: the head stays new
    torch.testing.assert_close(model.head.weight, head_before)
    ours = dict(model.named_parameters())
    for name, tensor in reference.state_dict().items():
        if name.startswith("fc.") or name.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked"):
            continue
        torch.testing.assert_close(ours[name], tensor, msg=name)

    small = build_backbone("resnet18", in_channels=3, ways=5, image_size=84, stem="small")
    with pytest.raises(ValueError, match=r"'conv1.weight' has shape \(64, 3, 7, 7\).*\(64, 3, 3, 3\)"):
        load_weights(small, path)
    with pytest.raises(ValueError, match="tensors not in this backbone"):
        load_weights(build_backbone("resnet12", in_channels=3, ways=5, hidden=2, image_size=84), path)
    with pytest.raises(ValueError, match="no such file"):
        load_weights(model, tmp_path / "missing.pth")


def test_own_safetensors_export_round_trips(tmp_path):
    from safetensors.torch import save_file

    source = build_backbone("resnet12", in_channels=3, ways=5, hidden=2, image_size=32)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "model.safetensors"))
    target = build_backbone("resnet12", in_channels=3, ways=5, hidden=2, image_size=32)
    assert load_weights(target, tmp_path / "model.safetensors") == []
    assert_all_close(dict(target.named_parameters()), dict(source.named_parameters()), rtol=0, atol=0)

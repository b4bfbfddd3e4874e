"""Memory layout and kernel choice: the BatchNorm layer's two kernels, conv4's pool-before-ReLU order and the
channels-last path, each checked in float64 against the plain computation (same numbers), and the memory format
of activations, support gradients, adapted weights and meta-gradients asserted through a real meta-step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

from dist_signmaml.algorithms import MetaLearner, make_rule
from dist_signmaml.algorithms.rules import InnerRule
from dist_signmaml.config import ConfigError, TrainConfig
from dist_signmaml.models import build_backbone, resolve_channels_last
from dist_signmaml.models import norm
from dist_signmaml.models.blocks import as_channels_last
from dist_signmaml.models.conv4 import ConvBlock

from tests.test_backbones import episode_batch, meta_gradient

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CHANNELS_LAST = torch.channels_last


# ---- BatchNorm: two kernels, one set of numbers --------------------------------------------------------------------

def batchnorm_inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 5, 7, 7, dtype=torch.float64, generator=generator) * 3 + 1
    weight = torch.linspace(0.5, 2, 5, dtype=torch.float64)
    bias = torch.linspace(-1, 1, 5, dtype=torch.float64)
    return x, weight, bias


@pytest.mark.parametrize("kernel", [norm.batchnorm_fused, norm.batchnorm_composed])
def test_both_batchnorm_kernels_match_torch_batchnorm_without_running_statistics(kernel):
    x, weight, bias = batchnorm_inputs()
    reference = nn.BatchNorm2d(5, track_running_stats=False).double()
    with torch.no_grad():
        reference.weight.copy_(weight)
        reference.bias.copy_(bias)
    torch.testing.assert_close(kernel(x, weight, bias, 1e-5), reference(x), rtol=1e-12, atol=1e-12)


def test_fused_and_composed_batchnorm_agree_in_value_gradient_and_second_derivative():
    """The MAML meta-gradient differentiates BatchNorm twice: compare a Hessian-vector product of a loss through
    each kernel (outside vmap, where the fused one is used)."""
    x, weight, bias = batchnorm_inputs()
    target = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def loss(kernel):
        return lambda x, w, b: (kernel(x, w, b, 1e-5) * target).tanh().sum()

    def gradient_norm(kernel):  # its gradient is a Hessian-vector product of the loss
        return lambda x, w, b: sum(g.square().sum() for g in grad(loss(kernel), argnums=(0, 1, 2))(x, w, b))

    for order in (loss, gradient_norm):
        fused = grad(order(norm.batchnorm_fused), argnums=(0, 1, 2))(x, weight, bias)
        composed = grad(order(norm.batchnorm_composed), argnums=(0, 1, 2))(x, weight, bias)
        for a, b in zip(fused, composed):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_batchnorm_layer_uses_the_fused_kernel_outside_vmap_and_the_composed_one_under_vmap(monkeypatch):
    calls = []
    for name in ("batchnorm_fused", "batchnorm_composed"):
        kernel = getattr(norm, name)
        monkeypatch.setattr(norm, name, lambda *args, _kernel=kernel, _name=name: calls.append(_name) or _kernel(*args))
    layer = norm.TaskBatchNorm2d(5).double()
    x = batchnorm_inputs()[0]
    layer(x)
    grad(lambda x: layer(x).sum())(x)
    assert calls == ["batchnorm_fused", "batchnorm_fused"]
    calls.clear()
    vmap(lambda x: layer(x).sum())(x.unsqueeze(0).expand(2, *x.shape))
    vmap(grad(lambda x: layer(x).sum()))(x.unsqueeze(0).expand(2, *x.shape))
    assert calls == ["batchnorm_composed", "batchnorm_composed"]


def test_maml_meta_gradient_under_vmap_equals_the_task_loop():
    """The reason for the kernel switch: with the fused kernel under vmap MAML's meta-gradient is off by ~1e-3."""
    batch = episode_batch(2, 3, 2, 1, 16, dtype=torch.float64)
    results = {}
    for mode in ("loop", "vmap"):
        torch.manual_seed(0)
        model = build_backbone("conv4", in_channels=3, ways=3, hidden=4, image_size=16, channels_last=False).double()
        results[mode] = meta_gradient(MetaLearner(model, make_rule("maml"), 0.1, 2, mode), batch)
    torch.testing.assert_close(results["vmap"][0], results["loop"][0], rtol=1e-10, atol=1e-12)
    for name, value in results["loop"][1].items():
        torch.testing.assert_close(results["vmap"][1][name], value, rtol=1e-9, atol=1e-11)


# ---- conv4: pooling before the ReLU --------------------------------------------------------------------------------

def test_conv_block_pooling_before_relu_gives_the_papers_values_and_gradients():
    """max-pool(ReLU(z)) == ReLU(max-pool(z)) exactly, and their gradients agree, ties at zero included: the
    second half of the batch is shifted down so that whole pooling windows are negative."""
    torch.manual_seed(0)
    block = ConvBlock(3, 4).double()
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    x[3:] -= 3.0
    x.requires_grad_(True)
    paper_order = lambda x: block[3](block[2](block[1](block[0](x))))  # noqa: E731 - conv, BN, ReLU, pool
    outputs = [block(x), paper_order(x)]
    assert (outputs[1] == 0).any(), "the check needs windows where the ReLU zeroes everything"
    weights = torch.randn(outputs[0].shape, dtype=torch.float64)
    grads = [torch.autograd.grad((out * weights).sum(), [x, *block.parameters()]) for out in outputs]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    for ours, paper in zip(*grads):
        torch.testing.assert_close(ours, paper, rtol=1e-12, atol=1e-14)


# ---- channels-last end to end --------------------------------------------------------------------------------------

class RecordingSignRule(InnerRule):
    """Sign-MAML's rule, recording the memory format of the support gradients and of the adapted weights."""

    def step(self, params, grads, lr, state):
        adapted, state = make_rule("sign").step(params, grads, lr, state)
        for name in params:
            if grads[name].dim() == 4:
                self.record.setdefault("support_gradients", []).append(
                    grads[name].is_contiguous(memory_format=CHANNELS_LAST))
                self.record.setdefault("adapted_weights", []).append(
                    adapted[name].is_contiguous(memory_format=CHANNELS_LAST))
        return adapted, state


def recording_sign_rule(record: dict) -> InnerRule:
    sign = make_rule("sign")
    rule = RecordingSignRule(sign.name, sign.second_order, sign.direction, "sign, recording layouts",
                             exact_first_order=sign.exact_first_order)
    object.__setattr__(rule, "record", record)  # a frozen dataclass: the record rides along as an attribute
    return rule


@pytest.mark.parametrize("name,size,hidden,channels", [("conv4", 28, 8, 1), ("conv4", 84, 4, 3), ("resnet12", 32, 4, 3)])
def test_channels_last_holds_through_functional_call_grad_and_the_sign_step(name, size, hidden, channels):
    torch.manual_seed(0)
    model = build_backbone(name, in_channels=channels, ways=3, hidden=hidden, image_size=size, channels_last=True)
    batch = episode_batch(2, 3, 1, 2, size, channels=channels)
    record: dict[str, list[bool]] = {}

    # The last map goes to the head through Flatten (conv4) or global average pooling (ResNet-12): the gradient
    # arriving there is the head's input gradient reshaped, NCHW by construction (C*h*w numbers per image, h*w = 25
    # or 4 here); the next backward op returns to channels-last.
    feeds_flatten = model.features[3][2] if name == "conv4" else model.blocks[-1].pool

    def hook(module, args, output):
        if output.dim() == 4:
            record.setdefault("activations", []).append(output.is_contiguous(memory_format=CHANNELS_LAST))
            query_pass = output.requires_grad and torch._C._functorch.peek_interpreter_stack() is None
            if query_pass and module is not feeds_flatten:
                output.register_hook(lambda g: record.setdefault("activation_gradients", []).append(
                    g.is_contiguous(memory_format=CHANNELS_LAST)))

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, norm.TaskBatchNorm2d, nn.ReLU, nn.LeakyReLU,
                                                           nn.MaxPool2d))]
    for layer in layers:
        layer.register_forward_hook(hook)
    with torch.no_grad():
        model(batch[0][0])
    calls_per_forward, record["activations"] = len(record["activations"]), []
    learner = MetaLearner(model, recording_sign_rule(record), 0.01, 1, "loop")
    learner(*batch).loss.backward()
    meta_gradients = [p.grad.is_contiguous(memory_format=CHANNELS_LAST) for p in model.parameters() if p.dim() == 4]
    # every layer ran twice per task (support inside torch.func.grad, query under plain autograd)
    assert len(record["activations"]) == 2 * 2 * calls_per_forward >= 2 * 2 * len(layers)
    assert record["activation_gradients"] and record["support_gradients"] and meta_gradients
    for what in ("activations", "activation_gradients", "support_gradients", "adapted_weights"):
        assert all(record[what]), f"{what}: {record[what].count(False)} of {len(record[what])} not channels-last"
    assert all(meta_gradients)


@pytest.mark.parametrize("algo", ["sign", "maml"])
def test_channels_last_with_the_fast_kernels_gives_the_numbers_of_nchw(algo):
    """Float64, the task loop (fused BatchNorm), 3 inner steps: the layout changes no number."""
    batch = episode_batch(2, 3, 2, 2, 28, dtype=torch.float64, seed=3)
    results = {}
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = build_backbone("conv4", in_channels=3, ways=3, hidden=6, image_size=28,
                               channels_last=channels_last).double()
        results[channels_last] = meta_gradient(MetaLearner(model, make_rule(algo), 0.05, 3, "loop"), batch)
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-11, atol=1e-13)
    for name, value in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], value, rtol=1e-9, atol=1e-12)


def test_channels_last_auto_resolves_per_device_and_bad_values_are_named():
    assert resolve_channels_last("auto", "cpu")[0] is True
    assert resolve_channels_last("auto", "cuda")[0] is False
    assert resolve_channels_last(False, "cpu")[0] is False and resolve_channels_last(True, "cuda")[0] is True
    assert "auto" in resolve_channels_last("auto", "cpu")[1]
    with pytest.raises(ValueError, match="--channels_last='yes'"):
        resolve_channels_last("yes", "cpu")
    with pytest.raises(ConfigError, match="channels_last"):
        TrainConfig(channels_last="yes").validate()
    for given, meant in (("auto", "auto"), (True, True), (False, False), ("true", True), ("false", False)):
        config = TrainConfig(channels_last=given)
        config.validate()
        assert config.channels_last == meant


def test_one_channel_images_get_strides_that_make_the_first_convolution_channels_last():
    """[n, 1, H, W] is 'channels-last contiguous' already, yet with NCHW strides PyTorch runs the convolution NCHW."""
    x = torch.randn(5, 1, 28, 28)
    kernel = torch.randn(4, 1, 3, 3)
    assert not F.conv2d(x.contiguous(memory_format=CHANNELS_LAST), kernel).is_contiguous(memory_format=CHANNELS_LAST)
    converted = as_channels_last(x)
    assert torch.equal(converted, x) and converted.stride(1) == 1
    assert F.conv2d(converted, kernel).is_contiguous(memory_format=CHANNELS_LAST)

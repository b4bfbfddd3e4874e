"""`--backbone NAME` -> an nn.Module; `--adapt SPEC` -> the names of the parameters the inner loop adapts;
`--weights FILE` -> a local state dict loaded into the backbone. The algorithms never special-case a backbone."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from dist_signmaml.models.blocks import Backbone
from dist_signmaml.models.conv4 import Conv4
from dist_signmaml.models.resnet12 import ResNet12
from dist_signmaml.models.torchvision_resnet import TorchvisionResNet

# name -> builder(in_channels, ways, hidden, image_size, stem); hidden=0 means the backbone's own default width
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "conv4": lambda in_channels, ways, hidden, image_size, stem: Conv4(in_channels, ways, hidden or (32 if image_size >= 64 else 64), image_size),
    "resnet12": lambda in_channels, ways, hidden, image_size, stem: ResNet12(in_channels, ways, hidden or 64, image_size),
    "resnet18": lambda in_channels, ways, hidden, image_size, stem: TorchvisionResNet("resnet18", in_channels, ways, image_size, stem),
    "resnet34": lambda in_channels, ways, hidden, image_size, stem: TorchvisionResNet("resnet34", in_channels, ways, image_size, stem),
}
FIXED_WIDTH = ("resnet18", "resnet34")  # torchvision's BasicBlock only exists at width 64: --hidden does not apply


def build_backbone(name: str, *, in_channels: int, ways: int, hidden: int = 0, image_size: int = 28,
                   stem: str = "auto", precision: str = "fp32", channels_last: bool = False,
                   activation_checkpointing: bool = False) -> Backbone:
    """The backbone `name` for `ways`-way tasks on square `image_size` px images with `in_channels` channels.

    precision                 fp32 | bf16 (autocast inside the backbone's forward, see Backbone)
    channels_last             run the whole forward NHWC: weights stored channels-last, images converted on
                              entry (Backbone.set_channels_last); see resolve_channels_last for `--channels_last auto`
    activation_checkpointing  recompute each block's activations in backward instead of keeping them
    """
    if name not in BACKBONES:
        raise ValueError(f"--backbone={name!r} is not known; expected one of {sorted(BACKBONES)}")
    if hidden and name in FIXED_WIDTH:
        raise ValueError(f"--hidden={hidden} does not apply to --backbone={name} (torchvision's widths are fixed); "
                         f"use --hidden 0")
    model = BACKBONES[name](in_channels, ways, hidden, image_size, stem)
    model.set_precision(precision).set_activation_checkpointing(activation_checkpointing)
    return model.set_channels_last(channels_last)


# ---- memory layout -----------------------------------------------------------------------------------------------

CHANNELS_LAST_CHOICES = (True, False, "auto")


def resolve_channels_last(choice: bool | str, device: torch.device | str) -> tuple[bool, str]:
    """`--channels_last true | false | auto` -> (use channels-last, why), the reason for the run's log.

    auto: channels-last on CPU, where an idle core measured it faster on conv4 at 84 px and ResNet-12 (1.17-1.51x at
    1 and 15 queries) and level with NCHW at 28 px (docs/benchmarks.md, bench/results/layout_cpu.json,
    backbones_layout_q*_cpu.json); NCHW elsewhere, until it is measured there (bench/gpu.sh measures it on CUDA).
    """
    if choice not in CHANNELS_LAST_CHOICES:
        raise ValueError(f"--channels_last={choice!r} is not known; expected true, false or auto")
    if choice != "auto":
        return bool(choice), f"--channels_last {str(choice).lower()}"
    if torch.device(device).type == "cpu":
        return True, "--channels_last auto: channels-last on CPU (faster on larger inputs, level at 28 px: docs/benchmarks.md)"
    return False, f"--channels_last auto: NCHW on {torch.device(device).type} (channels-last not measured faster there)"


# ---- partial adaptation ------------------------------------------------------------------------------------------

ADAPT_PATTERN = re.compile(r"^(all|head|last:(\d+))$")


def check_adapt_spec(spec: str) -> None:
    if not isinstance(spec, str) or not ADAPT_PATTERN.match(spec):
        raise ValueError(f"--adapt={spec!r} is invalid: expected all, head, or last:K with K >= 1 blocks")
    if spec.startswith("last:") and int(spec[5:]) < 1:
        raise ValueError(f"--adapt={spec!r} is invalid: K must be >= 1 (use --adapt head for the head alone)")


def parameter_blocks(model: Backbone) -> list[list[str]]:
    """Parameter names per feature block (forward order), then the head's as the last group."""
    names = [name for name, _ in model.named_parameters()]

    def under(prefixes: tuple[str, ...]) -> list[str]:
        return [n for n in names if any(n.startswith(prefix + ".") for prefix in prefixes)]

    return [under(prefixes) for prefixes in model.adaptation_blocks()] + [under(("head",))]


def adapted_parameter_names(model: Backbone, spec: str) -> frozenset[str] | None:
    """The parameters the inner loop adapts for `--adapt spec`; None means all of them.

    head      only the linear classifier (ANIL-style): the support gradient never backpropagates into the body;
    last:K    the last K feature blocks plus the head (a ResNet's residual blocks; conv4's conv blocks);
    all       every parameter (MAML / Sign-MAML as in the paper).
    The parameters left out are shared by all tasks: the inner loop does not touch them, and they learn from the
    meta-gradient of the query loss alone.
    """
    check_adapt_spec(spec)
    if spec == "all":
        return None
    groups = parameter_blocks(model)
    feature_blocks, head = groups[:-1], groups[-1]
    k = 0 if spec == "head" else int(spec[5:])
    if k > len(feature_blocks):
        raise ValueError(f"--adapt={spec} asks for {k} blocks but this backbone has {len(feature_blocks)}; "
                         f"use K <= {len(feature_blocks)} or --adapt all")
    return frozenset(head + [name for block in feature_blocks[len(feature_blocks) - k:] for name in block])


# ---- local weights -----------------------------------------------------------------------------------------------

BATCHNORM_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local .safetensors file or a torch file (read with weights_only=True: never unpickles
    arbitrary objects)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--weights={str(path)!r}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--weights={str(path)!r}: expected a state dict of tensors")
    return state


def load_weights(model: nn.Module, path: str | Path) -> list[str]:
    """Load a local state dict into `model` by parameter name; return the names left at their initialisation.

    Accepted: this project's exports (model.safetensors) and torchvision ResNet state dicts (`fc.*` is read as
    `head.*`). BatchNorm running statistics are dropped: our BatchNorm always uses the batch's statistics. A head of
    another shape (a different number of ways or ImageNet's 1000 classes) is skipped and stays freshly initialised;
    any other missing, unknown or mis-shaped tensor is an error, so a wrong file fails loudly.
    """
    state = {("head." + k[3:] if k.startswith("fc.") else k): v for k, v in read_state_dict(path).items()
             if k.rsplit(".", 1)[-1] not in BATCHNORM_STATISTICS}
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ValueError(f"--weights={str(path)!r}: tensors not in this backbone: {', '.join(unknown[:5])}"
                         f"{' ...' if len(unknown) > 5 else ''}")
    fresh = []
    for name, tensor in own.items():
        if name not in state:
            if not name.startswith("head."):
                raise ValueError(f"--weights={str(path)!r}: missing tensor {name!r}")
            fresh.append(name)
        elif state[name].shape != tensor.shape:
            if not name.startswith("head."):
                raise ValueError(f"--weights={str(path)!r}: {name!r} has shape {tuple(state[name].shape)}, "
                                 f"this backbone expects {tuple(tensor.shape)} (another --stem or --backbone?)")
            fresh.append(name)
            del state[name]
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor)
    return fresh

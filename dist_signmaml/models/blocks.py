"""Pieces every backbone shares: running a sequence of blocks (optionally with activation checkpointing), and the
declaration of which parameters form which block, used by partial adaptation (`--adapt head | last:K`)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint


def run_blocks(blocks: Iterable[nn.Module], x: torch.Tensor, checkpointed: bool) -> torch.Tensor:
    """Apply `blocks` in order. With `checkpointed`, each block keeps only its input for the backward pass and
    recomputes its activations there: memory of the graph drops to one block's activations plus the block inputs,
    for about one extra forward of compute.

    Recomputation is exact here because every BatchNorm normalises with the batch's own statistics and keeps no
    running averages, so the second forward sees the same numbers as the first (no state changes in between).

    Checkpointing needs saved-tensor hooks, which torch.func transforms do not support (grad raises, vmap fails), so
    it applies only to forwards recorded by plain autograd: in the task loop that is each task's query forward — the
    graph a meta-step keeps alive until backward. Inside the support gradient (torch.func.grad) and under vmap the
    blocks run normally.
    """
    checkpointed = checkpointed and torch.is_grad_enabled() and not inside_function_transform()
    for block in blocks:
        if checkpointed:
            # The recomputation runs later, inside backward, when torch.func.functional_call has already put the
            # module's own parameters back: hand it the tensors this forward used (e.g. a task's adapted weights),
            # so that it recomputes exactly what was computed here (outside any transform, as here, BatchNorm picks
            # the same kernel).
            x = checkpoint(functional_call, block, dict(block.named_parameters()), (x,), use_reentrant=False)
        else:
            x = block(x)
    return x


def inside_function_transform() -> bool:
    """True while a torch.func transform (grad, vjp, vmap, ...) is running."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def inside_vmap() -> bool:
    """True while torch.func.vmap runs at any level of the current transform stack (vmap of grad, grad of vmap).
    Eager only: dynamo cannot trace the transform stack (callers ask torch.compiler.is_compiling() first)."""
    return any(interpreter.key() == TransformType.Vmap for interpreter in retrieve_all_functorch_interpreters())


def under_vmap_in_eager() -> bool:
    return not torch.compiler.is_compiling() and inside_vmap()


def as_channels_last(x: torch.Tensor) -> torch.Tensor:
    """`x` with NHWC strides that the convolution recognises. For 1-channel images `x.contiguous(channels_last)`
    keeps the NCHW strides (the bytes are the same in both layouts), and PyTorch then reads the batch as NCHW and
    runs the first convolution, and its output, NCHW; giving the channel dim stride 1 makes it NHWC."""
    if x.stride(1) == 1 and x.is_contiguous(memory_format=torch.channels_last):
        return x
    return torch.empty_like(x, memory_format=torch.channels_last).copy_(x)


PRECISIONS = ("fp32", "bf16")


class Backbone(nn.Module):
    """A feature extractor followed by a linear classifier called `head`; subclasses implement `logits(x)`.

    Subclasses list their feature blocks in forward order in `adaptation_blocks()`, each block as the module-name
    prefixes it is made of; together with `head` these cover every parameter exactly once (tested), which is what
    `--adapt last:K` relies on.

    `precision='bf16'` runs the forward under torch.autocast(bfloat16) on the input's device type (CPU or CUDA):
    convolutions and matmuls in bfloat16, parameters (and so the inner-loop updates, the optimizer and the
    checkpoints) stay float32. It lives here, in the backbone, so that every forward — support and query, training,
    evaluation and benchmarks — runs at the same precision without each caller opening its own autocast region.
    The logits are returned in float32 so the loss is computed in float32.

    `channels_last` (set_channels_last) keeps the whole forward NHWC: the convolution weights are stored
    channels-last, and forward converts each task's images on entry. The conversion lives here, where the layout
    is chosen, rather than in the episode stream, which does not know the backbone's layout: it copies one task's
    images once, against dozens of convolutions over them. Every later activation, the adapted weights (w - beta * update, elementwise) and the
    support and query gradients then stay channels-last (tested through functional_call, torch.func.grad and the
    inner step), so no layer converts back and forth.
    """

    head: nn.Linear
    activation_checkpointing: bool = False
    precision: str = "fp32"
    channels_last: bool = False

    def adaptation_blocks(self) -> list[tuple[str, ...]]:
        raise NotImplementedError

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and not under_vmap_in_eager():  # under vmap the batching rules own the layout
            x = as_channels_last(x)
        if self.precision == "fp32":
            return self.logits(x)
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return self.logits(x).float()

    def set_activation_checkpointing(self, enabled: bool) -> "Backbone":
        self.activation_checkpointing = bool(enabled)
        return self

    def set_channels_last(self, enabled: bool) -> "Backbone":
        self.channels_last = bool(enabled)
        return self.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)

    def set_precision(self, precision: str) -> "Backbone":
        if precision not in PRECISIONS:
            raise ValueError(f"--precision={precision!r} is not known; expected one of {PRECISIONS}")
        self.precision = precision
        return self

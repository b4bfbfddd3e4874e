"""Pieces every backbone shares: running a sequence of blocks (optionally with activation checkpointing), and the
declaration of which parameters form which block, used by partial adaptation (`--adapt head | last:K`)."""

from __future__ import annotations

import contextvars
from typing import Iterable

import torch
from torch import nn
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
            # module's own parameters back: hand it the tensors this forward used (e.g. a task's adapted weights)
            # and this forward's context variables (which BatchNorm kernel is selected), so that it recomputes
            # exactly what was computed here.
            x = checkpoint(_recomputable_call, contextvars.copy_context(), block, dict(block.named_parameters()), x,
                           use_reentrant=False)
        else:
            x = block(x)
    return x


def _recomputable_call(context: contextvars.Context, block: nn.Module, params: dict, x: torch.Tensor):
    return context.run(functional_call, block, params, (x,))


def inside_function_transform() -> bool:
    """True while a torch.func transform (grad, vjp, vmap, ...) is running."""
    return torch._C._functorch.peek_interpreter_stack() is not None


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
    """

    head: nn.Linear
    activation_checkpointing: bool = False
    precision: str = "fp32"

    def adaptation_blocks(self) -> list[tuple[str, ...]]:
        raise NotImplementedError

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.precision == "fp32":
            return self.logits(x)
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return self.logits(x).float()

    def set_activation_checkpointing(self, enabled: bool) -> "Backbone":
        self.activation_checkpointing = bool(enabled)
        return self

    def set_precision(self, precision: str) -> "Backbone":
        if precision not in PRECISIONS:
            raise ValueError(f"--precision={precision!r} is not known; expected one of {PRECISIONS}")
        self.precision = precision
        return self

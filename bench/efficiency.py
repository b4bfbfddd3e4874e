"""Kernel efficiency of the meta-step: its achieved FLOP/s next to a dense matmul's FLOP/s on the same core, in the
same run (interleaved rounds), so every change shows how close the meta-step is to the machine's limit.

    python -m bench.efficiency                                   # conv4 28 px, sign, 5-way 1-shot, 1 and 15 queries
    python -m bench.efficiency --queries 15 --meta_batch 32 --layouts nchw,channels_last --out bench/results/e.json

FLOPs are counted from the layer shapes (`meta_step_flops`), for a first-order rule (sign, fo, signum), where the
meta-step is exactly: per task, m support passes and one query pass, each a forward and a backward. For a layer
with input channels C_in, output channels C_out, a k x k kernel, an output map H x W and a batch of n images:

    forward      F = 2 n C_out H W C_in k^2          (a multiply and an add per weight per output; Linear: k = H = W = 1)
    backward     F for the weight gradient, plus F for the input gradient except in the first layer (the images
                 need no gradient)
    meta-step    FLOPs = P * [ m * FB(ways * shots) + FB(ways * queries) ],  FB(n) = sum over layers of 3F (2F first)

Normalisation, ReLU, pooling, the loss and the optimizer are not counted (elementwise: a few FLOPs per element,
under 2% of the total for conv4-64), so the figure is the rate of useful convolution/matmul work, the same
convention as `torch.utils.flop_counter.FlopCounterMode`, which the tests check this count against.

The matmul is an n x n x n float32 product (2 n^3 FLOPs), the best rate the core's BLAS reaches; the efficiency is
meta-step FLOP/s / matmul FLOP/s. Prints JSON.
"""

from __future__ import annotations

import fire
import torch
from torch import nn

from bench.common import bench_learner, interleaved_medians, machine, machine_load, meta_step, write_json
from bench.cost import as_list  # fire hands "1,15" over as a tuple
from dist_signmaml.config import DEFAULT_DATA
from dist_signmaml.data import EpisodeShape, EpisodeStream

FIRST_ORDER = ("sign", "fo", "signum")
LAYOUTS = {"nchw": False, "channels_last": True}


def layer_forward_flops(model: nn.Module, image_shape: tuple[int, int, int], images: int) -> list[int]:
    """Forward FLOPs (2 per multiply-add) of every Conv2d and Linear of `model`, in call order, for `images`
    images of (C, H, W) `image_shape`; output shapes come from one forward on a zero batch of one image."""
    counts: list[int] = []

    def record(module, args, output):
        if isinstance(module, nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            counts.append(2 * images * output[0].numel() * kernel)
        else:
            counts.append(2 * images * module.in_features * module.out_features)

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *image_shape))
    finally:
        for hook in hooks:
            hook.remove()
    return counts


def pass_flops(model: nn.Module, image_shape, images: int) -> int:
    """FB(n): forward + weight gradient + input gradient (none for the first layer) of one pass over n images."""
    forward = layer_forward_flops(model, image_shape, images)
    return sum(forward) * 3 - forward[0]


def meta_step_flops(model: nn.Module, image_shape, *, tasks: int, ways: int, shots: int, queries: int,
                    inner_steps: int) -> int:
    """The module docstring's count for a first-order rule."""
    return tasks * (inner_steps * pass_flops(model, image_shape, ways * shots)
                    + pass_flops(model, image_shape, ways * queries))


def main(ways: int = 5, shots: int = 1, queries="1,15", meta_batch="4", algo: str = "sign", inner_steps: int = 1,
         layouts: str = "nchw,channels_last", matmul_size: int = 2048, repeats: int = 10, warmup: int = 2,
         threads: int = 1, data: str = str(DEFAULT_DATA), out: str = ""):
    """Print JSON: per (queries, meta-batch, layout) the meta-step's median ms, FLOPs and GFLOP/s, and the matmul's
    GFLOP/s from the same interleaved rounds; efficiency = meta-step rate / matmul rate."""
    if algo not in FIRST_ORDER:
        raise SystemExit(f"error: --algo={algo!r}: the FLOP count covers first-order rules {FIRST_ORDER}")
    layout_list = as_list(layouts, str)
    if not layout_list or set(layout_list) - set(LAYOUTS):
        raise SystemExit(f"error: --layouts={layouts!r}: expected a comma-separated subset of {tuple(LAYOUTS)}")
    torch.set_num_threads(threads)
    query_list, batch_list = as_list(queries), as_list(meta_batch)
    a, b = torch.randn(matmul_size, matmul_size), torch.randn(matmul_size, matmul_size)
    steps = {"matmul": lambda: torch.mm(a, b)}
    flops = {"matmul": 2 * matmul_size ** 3}
    settings = {}
    for q in query_list:
        for p in batch_list:
            batch = EpisodeStream(f"{data}/train", EpisodeShape(ways, shots, q), p, seed=0).batch(0)
            channels, size = batch.support_x.shape[2], batch.support_x.shape[-1]
            for layout in layout_list:
                torch.manual_seed(0)
                learner, optimizer = bench_learner((size, size, channels), "cpu", algo=algo, ways=ways, shots=shots,
                                                   queries=q, inner_steps=inner_steps, channels_last=LAYOUTS[layout])
                name = f"{q}q/P{p}/{layout}"
                steps[name] = lambda learner=learner, optimizer=optimizer, batch=batch: meta_step(learner, optimizer, batch)
                flops[name] = meta_step_flops(learner.model, (channels, size, size), tasks=p, ways=ways, shots=shots,
                                              queries=q, inner_steps=inner_steps)
                settings[name] = {"queries": q, "meta_batch": p, "layout": layout}
    load_before = machine_load()
    timing = interleaved_medians(steps, repeats, warmup)
    matmul_rate = flops["matmul"] / timing["matmul"]["median_s"]
    rows = []
    for name, setting in settings.items():
        rate = flops[name] / timing[name]["median_s"]
        rows.append(setting | {"median_ms": round(1000 * timing[name]["median_s"], 2),
                               "q1_ms": round(1000 * timing[name]["q1_s"], 2), "q3_ms": round(1000 * timing[name]["q3_s"], 2),
                               "gflop_per_step": round(flops[name] / 1e9, 4), "gflops": round(rate / 1e9, 2),
                               "efficiency_vs_matmul": round(rate / matmul_rate, 3)})
    write_json({"benchmark": "meta-step FLOP/s against a float32 matmul on the same core (bench/efficiency.py)",
                "episode": f"{ways}-way {shots}-shot, algo {algo}, m={inner_steps}, conv4 (the trainer's default width)",
                "flop_formula": "P * [m * FB(ways*shots) + FB(ways*queries)], FB(n) = sum_layers 3 * 2 n C_out H W C_in k^2 "
                                "(2x for the first layer: no input gradient); elementwise ops not counted",
                "matmul": {"size": matmul_size, "median_ms": round(1000 * timing["matmul"]["median_s"], 2),
                           "gflops": round(matmul_rate / 1e9, 2)},
                "rows": rows, "repeats": repeats, "warmup": warmup, "machine": machine(),
                "load_before": load_before, "load_after": machine_load()}, out)


if __name__ == "__main__":
    fire.Fire(main)

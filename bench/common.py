"""Helpers shared by the benchmarks: interleaved timing, saved-activation memory, JSON output."""

from __future__ import annotations

import json
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def machine() -> dict:
    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version()}


REFERENCE_WORK = "one thread, a 3x3 convolution 64->64 channels on 40 images of 14x14, forward and backward"


def reference_seconds(repeats: int = 9) -> float:
    """Median seconds of a fixed workload (REFERENCE_WORK, about conv4's middle layer on a 20-way episode) on one
    thread of this process's cores. Load averages say whether the machine was busy, not how fast a core was that
    day: runs measured on different days are compared through this figure."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(40, 64, 14, 14, generator=generator, requires_grad=True)
        kernel = torch.randn(64, 64, 3, 3, generator=generator, requires_grad=True)
        times = []
        for _ in range(repeats + 1):  # the first pass allocates: not timed
            started = time.perf_counter()
            torch.nn.functional.conv2d(images, kernel, padding=1).square().sum().backward()
            times.append(time.perf_counter() - started)
        return statistics.median(times[1:])
    finally:
        torch.set_num_threads(threads)


def machine_load() -> dict:
    """How busy the machine was, for a table's header: `uptime`'s load averages, the cores, and the processes
    other than this one using a CPU right now (from /proc: more than 10% of a core since they started, which is
    what a long run or test suite shows). The benchmark pins itself to the cores it was given (taskset)."""
    import os
    import subprocess

    busy = []
    try:
        lister = subprocess.Popen(["ps", "-eo", "pid,psr,pcpu,comm", "--no-headers"], stdout=subprocess.PIPE,
                                  text=True)
        listing = lister.communicate(timeout=10)[0].splitlines()
        for line in listing:
            pid, core, cpu, command = line.split(None, 3)
            # ps lists itself, at a high share of the few milliseconds it has lived
            if int(pid) not in (os.getpid(), lister.pid) and float(cpu) > 10:
                busy.append(f"{command.strip()} (core {core}, {cpu}%)")
    except (OSError, ValueError, subprocess.SubprocessError):
        busy = ["unknown (ps failed)"]
    return {"load_average_1_5_15min": [round(v, 2) for v in os.getloadavg()], "cpu_cores": os.cpu_count(),
            "pinned_to_cores": sorted(os.sched_getaffinity(0)), "busy_processes": busy,
            "reference_seconds": reference_seconds(), "reference_work": REFERENCE_WORK,
            "time": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved_medians(steps: dict[str, Callable[[], None]], repeats: int, warmup: int) -> dict[str, dict]:
    """Run every configuration once per round, `warmup + repeats` rounds, and report per configuration the median
    and quartiles of the timed rounds. Interleaving spreads machine noise evenly over the configurations, so their
    ratios are meaningful even when absolute times drift."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(warmup + repeats):
        for name, step in steps.items():
            synchronize()
            started = time.perf_counter()
            step()
            synchronize()
            if round_index >= warmup:
                times[name].append(time.perf_counter() - started)
    out = {}
    for name, values in times.items():
        q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        out[name] = {"median_s": statistics.median(values), "q1_s": q[0], "q3_s": q[2], "n": len(values)}
    return out


def peak_memory_bytes(fn: Callable[[], None], device: torch.device | None = None) -> int:
    """Peak bytes of tensors alive while `fn` runs, above those alive when it started.

    CUDA: torch.cuda.max_memory_allocated. CPU, where torch keeps no such counter: the profiler
    (profile_memory=True) records every allocation and free made through torch's CPU allocator with its time stamp
    (temporaries inside a single op included); replaying them in time order, the running total's maximum is the
    peak, independent of the OS allocator's caching.
    """
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    changes = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    running = peak = 0
    for _, change in changes:
        running += change
        peak = max(peak, running)
    return peak


def write_json(result: dict, path: str | None):
    text = json.dumps(result, indent=1, sort_keys=True)
    print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")


# ---- the one meta-step every benchmark times ---------------------------------------------------------------------

def bench_learner(image_shape, device, **options):
    """The trainer's own MetaLearner (build_learner) for `options` (TrainConfig fields, e.g. algo, backbone,
    channels_last, compile), with the trainer's optimizer (builders.build_optimizer). Per-algorithm constants
    (the inner learning rate) come from the config's defaults, as in training."""
    from dist_signmaml.builders import build_learner, build_optimizer
    from dist_signmaml.config import TrainConfig

    config = TrainConfig.from_options(**options)
    learner = build_learner(config, image_shape, device).to(device)
    return learner, build_optimizer(config, learner)


def meta_step(learner, optimizer, batch) -> None:
    """One single-device meta-step in the engine's order (Engine.meta_step without the distributed wrapper)."""
    from dist_signmaml.builders import local_meta_step

    local_meta_step(learner, optimizer, batch)


# ---- variants: a method and the options it trains with, as bench.fidelity's runs and bench.cost's grid name them --

VARIANT_PATTERN = r"([a-z]+)((?:-lsl|-msl|-b[0-9.e-]+)*)"


def variant_options(variant: str) -> dict:
    """`sign-lsl-msl` -> the method and its options: -lsl learned step sizes per tensor and inner step, -msl the
    multi-step loss, -b<beta> a fixed beta (None: the method's default, or a grid's)."""
    from dist_signmaml.config import DEFAULT_INNER_LR

    match = re.fullmatch(VARIANT_PATTERN, variant.strip())
    if not match or match.group(1) not in DEFAULT_INNER_LR:
        raise ValueError(f"{variant!r} is not a variant: expected a method ({', '.join(DEFAULT_INNER_LR)}) followed by "
                         f"any of -lsl, -msl, -b<beta>, e.g. sign-lsl-msl")
    algo, suffix = match.groups()
    beta = re.search(r"-b([0-9.e-]+)", suffix)
    return {"algo": algo, "learned": "-lsl" in suffix, "multi_step_loss": "-msl" in suffix,
            "beta": float(beta.group(1)) if beta else None}


def variant_train_options(variant: str) -> dict:
    """The TrainConfig options of a variant (beta only when it is fixed by -b)."""
    v = variant_options(variant)
    return ({"algo": v["algo"], "learn_inner_lr": "layer_step" if v["learned"] else "none",
             "multi_step_loss": v["multi_step_loss"]} | ({"inner_lr": v["beta"]} if v["beta"] is not None else {}))

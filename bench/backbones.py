"""Backbones x algorithms: meta-step time and peak memory, with bf16 / compile / channels-last / partial adaptation /
activation checkpointing side by side in the same run.

    python -m bench.backbones --quick                 # small sizes, a few minutes on 2 CPU cores
    python -m bench.backbones                         # the full grid: 15 queries, ResNet-12 at 64-160-320-640
    python -m bench.backbones --backbones resnet12 --algos sign,maml --inner_steps 1,5,10 --out bench/results/b.json

Setting (issue 6): 5-way 1-shot, 84x84 RGB, meta-batch 2, each cell a real meta-step — inner loop, query loss,
outer backward, Adam step — on one fixed synthetic episode batch (class patterns plus noise; the content does not
change the cost, and data loading is not timed). Tasks run the way training runs them on the device (`auto`: the
task loop on CPU, vmap on CUDA), except the activation-checkpointing cell, which needs the loop. Every cell is the
trainer's own learner (build_learner, the config's default inner learning rate per algorithm) stepped by the one
bench meta-step (bench.common.meta_step); the fp32 cell is NCHW eager, and each extra changes one option from it
(VARIANT_OPTIONS): `channels_last` is --channels_last true, what `auto` picks on CPU.

Each backbone runs in its own subprocess (a crash or timeout costs only that backbone, and every backbone starts
from the same clean process). Within it, all cells are warmed up once (the first call, reported as
`first_call_s`, includes torch.compile's compilation and oneDNN's kernel generation), then timed in interleaved
rounds so machine noise spreads evenly and the ratios stay meaningful.

Peak memory is the most bytes of tensors alive during one meta-step above what was alive when it started (weights,
Adam state and the batch are the baseline), i.e. what the step itself needs:
- CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated() before.
- CPU: torch keeps no such counter, and process RSS mixes in the allocator's caching and fragmentation. The
  profiler (profile_memory=True) records every allocation and free made through torch's CPU allocator, with its
  size and time — including temporaries inside an op (e.g. convolution workspaces); replaying those events in time
  order and taking the running total's maximum gives the same quantity as on CUDA. Memory made outside torch's
  allocator (oneDNN's private scratchpads, Python objects) is not counted on either device.

Ratios in `summary`, per backbone: memory and time at m=5 over m=1 per algorithm (target: sign/fo memory <= 1.2,
maml growing), and speedups of bf16, torch.compile and channels-last over fp32 eager (sign, m=1), plus head-only
adaptation and activation checkpointing against full adaptation (sign, largest m).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import fire
import torch

from bench.common import bench_learner, interleaved_medians, machine, machine_load, meta_step, peak_memory_bytes, write_json
from dist_signmaml.algorithms.rules import ALGORITHMS

BACKBONES = ("conv4", "resnet12", "resnet18", "resnet34")
EXTRAS = ("bf16", "compile", "channels_last", "head", "checkpointing")
# The --quick grid: every backbone x algo x inner steps at 1 query per class and ResNet-12 at base width 16, with the
# extras where they fit a CPU: bf16 is emulated (slow) on CPUs without bf16 units, inductor needs ~1-3 min per graph.
QUICK_EXTRAS = "conv4:bf16+compile+channels_last+head+checkpointing,resnet12:bf16+channels_last+head+checkpointing," \
               "resnet18:head+checkpointing,resnet34:head"


def as_list(value, cast=str) -> list:
    if isinstance(value, (list, tuple)):
        return [cast(v) for v in value]
    return [cast(v) for v in str(value).split(",") if v != ""]


def parse_extras(spec: str, backbones: list[str]) -> dict[str, list[str]]:
    """'all' -> every extra for every backbone; 'none'; or 'conv4:bf16+compile,resnet12:head'."""
    if spec == "all":
        return {b: list(EXTRAS) for b in backbones}
    if spec in ("", "none"):
        return {b: [] for b in backbones}
    chosen = {b: [] for b in backbones}
    for item in spec.split(","):
        backbone, _, names = item.partition(":")
        extras = [n for n in names.split("+") if n]
        unknown = [n for n in extras if n not in EXTRAS]
        if backbone not in BACKBONES or unknown:
            raise SystemExit(f"--extras={spec!r}: expected BACKBONE:EXTRA+EXTRA,... with backbones {BACKBONES} "
                             f"and extras {EXTRAS}")
        if backbone in chosen:
            chosen[backbone] = extras
    return chosen


# ---- one backbone, in a worker process ----------------------------------------------------------------------------

def synthetic_batch(tasks: int, ways: int, shots: int, queries: int, size: int, device):
    generator = torch.Generator().manual_seed(0)
    prototypes = torch.randn(tasks, ways, 3, size, size, generator=generator)

    def images(k):
        x = prototypes.repeat_interleave(k, dim=1)
        return (x + 0.5 * torch.randn(x.shape, generator=generator)).to(device)

    labels = lambda k: torch.arange(ways).repeat_interleave(k).expand(tasks, -1).contiguous().to(device)  # noqa: E731
    return images(shots), labels(shots), images(queries), labels(queries)


def cells(backbone: str, algos: list[str], inner_steps: list[int], extras: list[str]) -> list[dict]:
    grid = [dict(algo=a, inner_steps=m, variant="fp32") for a in algos for m in inner_steps]
    base = "sign" if "sign" in algos else algos[0]
    for extra in extras:
        m = min(inner_steps) if extra in ("bf16", "compile", "channels_last") else max(inner_steps)
        grid.append(dict(algo=base, inner_steps=m, variant=extra))
    return [dict(cell, backbone=backbone) for cell in grid]


# variant -> the trainer options it changes from the fp32 cell (NCHW eager, every parameter adapted)
VARIANT_OPTIONS = {"fp32": {}, "bf16": {"precision": "bf16"}, "compile": {"compile": True},
                   "channels_last": {"channels_last": True}, "head": {"adapt": "head"},
                   "checkpointing": {"activation_checkpointing": True}}


def build_cell(cell: dict, spec: dict, device, batch):
    """A closure running one full meta-step of `cell` (the trainer's build_learner and the one bench meta_step),
    and the task-parallel mode it uses. The inner learning rate is the trainer's default for the algorithm."""
    torch.manual_seed(0)
    options = dict(backbone=cell["backbone"], algo=cell["algo"], inner_steps=cell["inner_steps"], ways=spec["ways"],
                   hidden=spec["resnet12_width"] if cell["backbone"] == "resnet12" else 0, channels_last=False)
    options |= VARIANT_OPTIONS[cell["variant"]]
    learner, optimizer = bench_learner((spec["size"], spec["size"], 3), device, **options)
    parameters = sum(p.numel() for p in learner.model.parameters())
    return (lambda: meta_step(learner, optimizer, batch)), learner.task_parallel, parameters


def run_worker(spec: dict) -> list[dict]:
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    batch = synthetic_batch(spec["meta_batch"], spec["ways"], spec["shots"], spec["queries"], spec["size"], device)
    steps, rows = {}, []
    for cell in spec["cells"]:
        name = f"{cell['algo']}/m={cell['inner_steps']}/{cell['variant']}"
        step, task_parallel, parameters = build_cell(cell, spec, device, batch)
        started = time.perf_counter()
        step()  # warm-up: compilation, kernel generation, Adam state
        if device.type == "cuda":
            torch.cuda.synchronize()
        first_call = time.perf_counter() - started
        steps[name] = step
        rows.append(dict(cell, name=name, task_parallel=task_parallel, parameters=parameters,
                         first_call_s=round(first_call, 3)))
        print(f"  {cell['backbone']} {name}: first call {first_call:.1f} s", file=sys.stderr, flush=True)
    timings = interleaved_medians(steps, repeats=spec["repeats"], warmup=0)
    for row in rows:
        row.update({k: round(v, 4) if isinstance(v, float) else v for k, v in timings[row["name"]].items()})
        row["peak_mib"] = round(peak_memory_bytes(steps[row["name"]], device) / 2**20, 2)
    return rows


# ---- the grid, one subprocess per backbone ------------------------------------------------------------------------

def summarize(rows: list[dict], inner_steps: list[int]) -> dict:
    lo, hi = min(inner_steps), max(inner_steps)
    by = {(r["backbone"], r["algo"], r["inner_steps"], r["variant"]): r for r in rows}
    ratio = lambda a, b, key: round(a[key] / b[key], 3) if a and b and b[key] else None  # noqa: E731
    summary = {}
    for backbone in sorted({r["backbone"] for r in rows}):
        algos = sorted({r["algo"] for r in rows if r["backbone"] == backbone and r["variant"] == "fp32"})
        get = lambda algo, m, variant="fp32": by.get((backbone, algo, m, variant))  # noqa: E731
        entry = {f"memory_m{hi}_over_m{lo}": {a: ratio(get(a, hi), get(a, lo), "peak_mib") for a in algos},
                 f"time_m{hi}_over_m{lo}": {a: ratio(get(a, hi), get(a, lo), "median_s") for a in algos}}
        memory = entry[f"memory_m{hi}_over_m{lo}"]
        if get("sign", lo) and get("sign", hi):
            # For first-order rules the only step-dependent memory is the previous step's adapted weights, alive
            # while the next are computed (from m=2 on; at m=1 they are the initialisation itself): at most one
            # parameter copy, flat from m=2 to any m. It shows in the ratio when activations are small (--quick).
            entry["parameters_mib"] = round(get("sign", lo)["parameters"] * 4 / 2**20, 2)
            entry[f"sign_memory_m{hi}_minus_m{lo}_mib"] = round(get("sign", hi)["peak_mib"] - get("sign", lo)["peak_mib"], 2)
        first_order = [memory[a] for a in ("sign", "fo") if memory.get(a) is not None]
        if first_order and lo != hi:
            entry["sign_fo_memory_flat_target_1.2_met"] = all(r <= 1.2 for r in first_order)
        if memory.get("maml") is not None and lo != hi:
            entry["maml_memory_grows"] = memory["maml"] > 1.2
        for extra in ("bf16", "compile", "channels_last"):
            cell = get("sign", lo, extra)
            if cell:
                entry[f"{extra}_speedup_vs_fp32_eager"] = ratio(get("sign", lo), cell, "median_s")
                entry[f"{extra}_memory_ratio"] = ratio(cell, get("sign", lo), "peak_mib")
        if get("sign", lo, "compile"):
            entry["compile_first_call_s"] = get("sign", lo, "compile")["first_call_s"]
        for extra in ("head", "checkpointing"):
            cell = get("sign", hi, extra)
            if cell:
                entry[f"{extra}_time_ratio_vs_all"] = ratio(cell, get("sign", hi), "median_s")
                entry[f"{extra}_memory_ratio_vs_all"] = ratio(cell, get("sign", hi), "peak_mib")
        summary[backbone] = entry
    return summary


def main(quick: bool = False, backbones: str = ",".join(BACKBONES), algos: str = "sign,fo,maml",
         inner_steps: str = "1,5", ways: int = 5, shots: int = 1, queries: int = 0, size: int = 84,
         meta_batch: int = 2, resnet12_width: int = 0, extras: str = "", repeats: int = 0, device: str = "auto",
         threads: int = 0, timeout: int = 3600, out: str | None = None, worker: bool = False):
    """Print the JSON of the grid. 0 / '' arguments take the --quick or full default (see the module docstring).

    quick: 1 query per class, ResNet-12 base width 16, 2 timed rounds, extras QUICK_EXTRAS
    full:  15 queries per class, ResNet-12 base width 64 (64-160-320-640), 5 timed rounds, every extra everywhere
    threads: torch intra-op threads per worker (0 = torch's default)
    """
    if worker:  # the cells of one backbone, as JSON on stdin (see below)
        print(json.dumps(run_worker(json.loads(sys.stdin.read()))))
        return
    backbone_list, algo_list = as_list(backbones), as_list(algos)
    steps_list = as_list(inner_steps, int)
    unknown = [b for b in backbone_list if b not in BACKBONES] + [a for a in algo_list if a not in ALGORITHMS]
    if unknown:
        raise SystemExit(f"unknown backbone/algo {unknown}; expected backbones {BACKBONES}, algos {ALGORITHMS}")
    resolved_device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    spec = dict(ways=ways, shots=shots, queries=queries or (1 if quick else 15), size=size, meta_batch=meta_batch,
                resnet12_width=resnet12_width or (16 if quick else 64), repeats=repeats or (2 if quick else 5),
                device=resolved_device, threads=threads)
    chosen_extras = parse_extras(extras or (QUICK_EXTRAS if quick else "all"), backbone_list)
    rows, failures = [], {}
    load_before = machine_load()
    started = time.perf_counter()
    for backbone in backbone_list:
        worker_spec = dict(spec, cells=cells(backbone, algo_list, steps_list, chosen_extras[backbone]))
        print(f"{backbone}: {len(worker_spec['cells'])} cells", file=sys.stderr, flush=True)
        try:
            done = subprocess.run([sys.executable, "-m", "bench.backbones", "--worker"], input=json.dumps(worker_spec),
                                  capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
        except subprocess.TimeoutExpired:
            failures[backbone] = f"timed out after {timeout} s"
            continue
        sys.stderr.write(done.stderr[-4000:] if done.returncode else "".join(
            line + "\n" for line in done.stderr.splitlines() if line.startswith("  ")))
        if done.returncode:
            failures[backbone] = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
            continue
        rows += json.loads(done.stdout.strip().splitlines()[-1])
    result = {"setting": {k: v for k, v in spec.items() if k != "device"} | {"quick": quick, "algos": algo_list,
                                                                         "inner_steps": steps_list},
              "machine": machine() | {"device_used": spec["device"]},
              "load_before": load_before, "load_after": machine_load(),
              "memory_method": "cuda max_memory_allocated" if spec["device"] == "cuda"
                               else "torch profiler allocation events (live tensor bytes), see bench/backbones.py",
              "summary": summarize(rows, steps_list), "rows": rows, "failures": failures,
              "wall_s": round(time.perf_counter() - started, 1)}
    write_json(result, out)


if __name__ == "__main__":
    fire.Fire(main)

"""Meta-step cost side by side: sign / fo / maml, our loop vs vmap vs a clone-loop reference; time and memory.

    python -m bench.cost --ways 5,20 --queries 1,15 --inner_steps 1,5,10 --meta_batch 4,32 --repeats 20
    python -m bench.cost --implementations ours,compile,reference --meta_batch 32   # ours vs the clone-loop reference
    python -m bench.cost --ways 20 --queries 1 --inner_steps 1,5 --algos sign,sign-lsl,sign-lsl-msl,fo,maml
    bash bench/run.sh                                                        # every grid of the README's tables

`--algos` takes bench.fidelity's variants as well as methods (sign-lsl: learned step sizes per tensor and step,
-msl: the multi-step loss, -b<beta>: a fixed beta), so the fidelity table's time goal (Sign-MAML at most 0.5x
MAML's seconds per meta-step) can be read from one interleaved run instead of training runs timed on different days.

Every configuration runs a real meta-step (forward, outer backward, Adam step) on real Omniglot episodes drawn once
up front (data loading is not timed). Timed rounds are interleaved across the configurations of a setting, so
their ratios stay meaningful on a noisy machine. Implementations (all but the reference are the trainer's own
MetaLearner, built by build_learner and stepped by bench.common.meta_step):
  ours           the trainer's defaults (on CPU: the per-task loop, channels-last by --channels_last auto)
  nchw           ours with --channels_last false (the NCHW layout)
  channels_last  ours with --channels_last true
  compile        ours with --channels_last true --compile (torch.compile, inductor; compiled before timing)
  compile_nchw   ours with --channels_last false --compile
  vmap           torch.func.vmap over tasks (--task_parallel vmap, NCHW; the GPU default)
  reference      the per-task clone/adapt loop of the paper's code: learn2learn's MAML.clone()/adapt() when
                 installed (bench/install_learn2learn.sh), else the same loop on `higher` (bench/reference.py); the
                 JSON says which
"""

from __future__ import annotations

import itertools

import fire
import torch

from bench.common import (bench_learner, interleaved_medians, machine, machine_load, meta_step, peak_memory_bytes,
                          variant_train_options, write_json)
from bench.reference import CloneLoopMetaStep, learn2learn_available, reference_conv4
from dist_signmaml.config import DEFAULT_DATA, DEFAULT_INNER_LR
from dist_signmaml.cpu_allocator import keep_freed_memory
from dist_signmaml.data import EpisodeShape, EpisodeStream

# implementation -> the trainer options it sets (the reference is not ours, see bench/reference.py)
OPTIONS = {"ours": {}, "nchw": {"channels_last": False}, "channels_last": {"channels_last": True},
           "compile": {"channels_last": True, "compile": True}, "compile_nchw": {"channels_last": False, "compile": True},
           "vmap": {"task_parallel": "vmap", "channels_last": False}}
IMPLEMENTATIONS = tuple(OPTIONS) + ("reference",)
REFERENCE_BACKEND = "learn2learn" if learn2learn_available() else "higher"


def as_list(value, cast=int) -> list:
    if isinstance(value, (list, tuple)):
        return [cast(v) for v in value]
    return [cast(v) for v in str(value).split(",") if v != ""]


def build_step(variant: str, implementation: str, inner_steps: int, batch, ways: int):
    """A closure running one full meta-step of (variant, implementation) on `batch`."""
    torch.manual_seed(0)
    channels, size = batch.support_x.shape[2], batch.support_x.shape[-1]
    device = batch.support_x.device
    options = variant_train_options(variant)
    if implementation == "reference":
        model = reference_conv4(channels, ways, image_size=size).to(device)
        beta = options.get("inner_lr", DEFAULT_INNER_LR[options["algo"]])
        reference = CloneLoopMetaStep(model, options["algo"], beta, inner_steps, backend=REFERENCE_BACKEND)
        return lambda: reference(*batch) and None
    learner, optimizer = bench_learner((size, size, channels), device, ways=ways, inner_steps=inner_steps,
                                       **options, **OPTIONS[implementation])
    return lambda: meta_step(learner, optimizer, batch)


def check_variants(variants: list[str], implementations: list[str]) -> None:
    """Refuse, before any work, a variant that is not one, or one the clone-loop reference cannot run."""
    for variant in variants:
        try:
            options = variant_train_options(variant)
        except ValueError as error:
            raise SystemExit(f"error: --algos: {error}") from None
        if "reference" in implementations and (options["learn_inner_lr"] != "none" or options["multi_step_loss"]):
            raise SystemExit(f"error: --algos {variant}: the clone-loop reference has fixed step sizes and the "
                             f"final-step loss only; time it with --implementations other than reference")


def method_ratios(median: dict[str, float], variants: list[str]) -> dict[str, float]:
    """Each variant's median over FO-MAML's and MAML's (ours), e.g. 'sign/fo', 'sign-lsl-msl/maml'."""
    return {f"{v}/{base}": median[f"{v}@ours"] / median[f"{base}@ours"]
            for v in variants for base in ("fo", "maml")
            if v != base and f"{v}@ours" in median and f"{base}@ours" in median}


def main(ways="5", shots: int = 1, queries="1,15", inner_steps="1", meta_batch="4", algos="sign,fo,maml",
         implementations="ours", repeats: int = 20, warmup: int = 3, threads: int = 2, memory: bool = True,
         data: str = str(DEFAULT_DATA), out: str = ""):
    """Print JSON: per setting, each configuration's median step time (and peak memory), plus the ratios
    sign/fo and sign/maml (ours), implementation/reference and implementation/ours.

    Args:
        ways, queries, inner_steps, meta_batch: comma-separated lists; every combination is a setting.
        algos: comma-separated methods (sign, fo, maml, signum) or variants of them (module docstring).
        implementations: comma-separated subset of IMPLEMENTATIONS (module docstring).
        repeats, warmup: timed and untimed interleaved rounds per setting.
        threads: torch intra-op threads.
        memory: also measure peak memory of one step per configuration.
        out: also write the JSON to this file.
    """
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":  # what build_learner does for ours, applied up front so the reference runs alike
        keep_freed_memory()
    algos, implementations = as_list(algos, str), as_list(implementations, str)
    unknown = sorted(set(implementations) - set(IMPLEMENTATIONS))
    if unknown:
        raise SystemExit(f"error: --implementations has {unknown}; expected a subset of {IMPLEMENTATIONS}")
    check_variants(algos, implementations)
    results = {"machine": machine(), "load_before": machine_load(), "reference_backend": REFERENCE_BACKEND,
               "shots": shots, "repeats": repeats, "warmup": warmup, "settings": []}
    for w, q, m, p in itertools.product(as_list(ways), as_list(queries), as_list(inner_steps), as_list(meta_batch)):
        batch = EpisodeStream(f"{data}/train", EpisodeShape(w, shots, q), p, seed=0).batch(0).to(device)
        steps = {f"{algo}@{impl}": build_step(algo, impl, m, batch, w) for algo in algos for impl in implementations}
        entry = {"ways": w, "queries": q, "inner_steps": m, "meta_batch": p}
        if memory:
            entry["peak_memory_mib"] = {name: peak_memory_bytes(step) / 2**20 for name, step in steps.items()}
        timing = interleaved_medians(steps, repeats, warmup)
        entry["step_s"] = timing
        median = {name: t["median_s"] for name, t in timing.items()}
        ratios = method_ratios(median, algos)
        for algo in algos:
            for impl in implementations:
                if impl != "reference" and f"{algo}@reference" in median:
                    ratios[f"{algo}: {impl}/reference"] = median[f"{algo}@{impl}"] / median[f"{algo}@reference"]
                if impl not in ("ours", "reference") and f"{algo}@ours" in median:
                    ratios[f"{algo}: {impl}/ours"] = median[f"{algo}@{impl}"] / median[f"{algo}@ours"]
                if impl not in ("nchw", "reference") and f"{algo}@nchw" in median:
                    ratios[f"{algo}: {impl}/nchw"] = median[f"{algo}@{impl}"] / median[f"{algo}@nchw"]
        entry["ratios"] = ratios
        results["settings"].append(entry)
        print(f"# {w}-way {q}q m={m} P={p}: " + ", ".join(f"{k}={v:.3f}" for k, v in ratios.items()), flush=True)
    results["load_after"] = machine_load()
    write_json(results, out)


if __name__ == "__main__":
    fire.Fire(main)

"""Meta-step cost side by side: sign / fo / maml, our loop vs vmap vs a clone-loop reference; time and memory.

    python -m bench.cost --ways 5,20 --queries 1,15 --inner_steps 1,5,10 --meta_batch 4,32 --repeats 20
    python -m bench.cost --implementations ours,compile,reference --meta_batch 32   # ours vs the clone-loop reference
    bash bench/run.sh                                                        # every grid of the README's tables

Every configuration runs a real meta-step (forward, outer backward, Adam step) on real Omniglot episodes drawn once
up front (data loading is not timed). Timed rounds are interleaved across the configurations of a setting, so
their ratios stay meaningful on a noisy machine. Implementations (the first four run our own inner loop):
  ours           MetaLearner with the per-task loop and the trainer's defaults (the CPU default)
  channels_last  ours with --channels_last (NHWC convolutions)
  compile        ours with --channels_last --compile (torch.compile, inductor; compiled before timing starts)
  vmap           MetaLearner with torch.func.vmap over tasks (the GPU default)
  reference      the per-task clone/adapt loop of the paper's code: learn2learn's MAML.clone()/adapt() when
                 installed (bench/install_learn2learn.sh), else the same loop on `higher` (bench/reference.py); the
                 JSON says which
"""

from __future__ import annotations

import itertools

import fire
import torch

from bench.common import interleaved_medians, machine, peak_memory_bytes, write_json
from bench.reference import CloneLoopMetaStep, learn2learn_available, reference_conv4
from dist_signmaml.algorithms import MetaLearner, make_rule
from dist_signmaml.config import DEFAULT_DATA, DEFAULT_INNER_LR
from dist_signmaml.data import EpisodeShape, EpisodeStream
from dist_signmaml.models import build_backbone

IMPLEMENTATIONS = ("ours", "channels_last", "compile", "vmap", "reference")
REFERENCE_BACKEND = "learn2learn" if learn2learn_available() else "higher"


def as_list(value, cast=int) -> list:
    if isinstance(value, (list, tuple)):
        return [cast(v) for v in value]
    return [cast(v) for v in str(value).split(",") if v != ""]


def build_step(algo: str, implementation: str, inner_steps: int, batch, ways: int):
    """A closure running one full meta-step of (algo, implementation) on `batch`."""
    torch.manual_seed(0)
    channels, size = batch.support_x.shape[2], batch.support_x.shape[-1]
    lr = DEFAULT_INNER_LR[algo]
    if implementation == "reference":
        model = reference_conv4(channels, ways, image_size=size).to(batch.support_x.device)
        reference = CloneLoopMetaStep(model, algo, lr, inner_steps, backend=REFERENCE_BACKEND)
        return lambda: reference(*batch) and None
    model = build_backbone("conv4", in_channels=channels, ways=ways, image_size=size,
                           channels_last=implementation in ("channels_last", "compile")).to(batch.support_x.device)
    learner = MetaLearner(model, make_rule(algo), lr, inner_steps, "vmap" if implementation == "vmap" else "loop")
    if implementation == "compile":
        learner.compile_tasks()
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)

    def step():
        learner(*batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main(ways="5", shots: int = 1, queries="1,15", inner_steps="1", meta_batch="4", algos="sign,fo,maml",
         implementations="ours", repeats: int = 20, warmup: int = 3, threads: int = 2, memory: bool = True,
         data: str = str(DEFAULT_DATA), out: str = ""):
    """Print JSON: per setting, each configuration's median step time (and peak memory), plus the ratios
    sign/fo and sign/maml (ours), implementation/reference and implementation/ours.

    Args:
        ways, queries, inner_steps, meta_batch: comma-separated lists; every combination is a setting.
        algos: comma-separated subset of sign,fo,maml.
        implementations: comma-separated subset of ours,vmap,reference.
        repeats, warmup: timed and untimed interleaved rounds per setting.
        threads: torch intra-op threads.
        memory: also measure peak memory of one step per configuration.
        out: also write the JSON to this file.
    """
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    algos, implementations = as_list(algos, str), as_list(implementations, str)
    unknown = sorted(set(implementations) - set(IMPLEMENTATIONS))
    if unknown:
        raise SystemExit(f"error: --implementations has {unknown}; expected a subset of {IMPLEMENTATIONS}")
    results = {"machine": machine(), "reference_backend": REFERENCE_BACKEND, "shots": shots, "repeats": repeats, "warmup": warmup, "settings": []}
    for w, q, m, p in itertools.product(as_list(ways), as_list(queries), as_list(inner_steps), as_list(meta_batch)):
        batch = EpisodeStream(f"{data}/train", EpisodeShape(w, shots, q), p, seed=0).batch(0).to(device)
        steps = {f"{algo}@{impl}": build_step(algo, impl, m, batch, w) for algo in algos for impl in implementations}
        entry = {"ways": w, "queries": q, "inner_steps": m, "meta_batch": p}
        if memory:
            entry["peak_memory_mib"] = {name: peak_memory_bytes(step) / 2**20 for name, step in steps.items()}
        timing = interleaved_medians(steps, repeats, warmup)
        entry["step_s"] = timing
        median = {name: t["median_s"] for name, t in timing.items()}
        ratios = {}
        for a, b in (("sign", "fo"), ("sign", "maml")):
            if f"{a}@ours" in median and f"{b}@ours" in median:
                ratios[f"{a}/{b}"] = median[f"{a}@ours"] / median[f"{b}@ours"]
        for algo in algos:
            for impl in implementations:
                if impl != "reference" and f"{algo}@reference" in median:
                    ratios[f"{algo}: {impl}/reference"] = median[f"{algo}@{impl}"] / median[f"{algo}@reference"]
                if impl not in ("ours", "reference") and f"{algo}@ours" in median:
                    ratios[f"{algo}: {impl}/ours"] = median[f"{algo}@{impl}"] / median[f"{algo}@ours"]
        entry["ratios"] = ratios
        results["settings"].append(entry)
        print(f"# {w}-way {q}q m={m} P={p}: " + ", ".join(f"{k}={v:.3f}" for k, v in ratios.items()), flush=True)
    write_json(results, out)


if __name__ == "__main__":
    fire.Fire(main)

"""Meta-step cost of sign / fo / maml side by side: median step time and peak memory.

    python -m bench.cost --ways 5 --queries 1,15 --inner_steps 1 --meta_batch 4 --repeats 50

Every configuration runs the real MetaLearner + Adam step on real Omniglot episodes (drawn once up front, so data
loading is not timed); rounds are interleaved across configurations and ratios are reported per setting.
"""

from __future__ import annotations

import itertools

import fire
import torch

from bench.common import interleaved_medians, machine, peak_memory_bytes, write_json
from dist_signmaml.algorithms import MetaLearner, make_rule
from dist_signmaml.config import DEFAULT_DATA, DEFAULT_INNER_LR
from dist_signmaml.data import EpisodeShape, EpisodeStream
from dist_signmaml.models import build_backbone


def _as_list(value) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    return [type_(v) for v in str(value).split(",")] if (type_ := (float if "." in str(value) else int)) else []


def build_step(algo: str, inner_steps: int, episodes, ways: int, task_parallel: str, device):
    torch.manual_seed(0)
    channels = episodes.support_x.shape[2]
    model = build_backbone("conv4", in_channels=channels, ways=ways, image_size=episodes.support_x.shape[-1]).to(device)
    learner = MetaLearner(model, make_rule(algo), DEFAULT_INNER_LR[algo], inner_steps, task_parallel)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    batch = episodes.to(device)

    def step():
        output = learner(*batch)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def peak_mib() -> float:
        return peak_memory_bytes(step) / 2**20

    return step, peak_mib


def main(ways="5", shots: int = 1, queries="1,15", inner_steps="1", meta_batch="4", algos="sign,fo,maml",
         repeats: int = 50, warmup: int = 5, threads: int = 2, task_parallel: str = "loop", data: str = str(DEFAULT_DATA),
         out: str = ""):
    """Print JSON with per-configuration medians and sign/fo, sign/maml ratios.

    Args:
        ways, queries, inner_steps, meta_batch: comma-separated lists; every combination is measured.
        algos: comma-separated algorithms.
        repeats, warmup: timed and untimed interleaved rounds.
        threads: torch intra-op threads.
        task_parallel: loop | vmap.
        out: also write the JSON here.
    """
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    algos = str(algos).split(",") if isinstance(algos, str) else list(algos)
    settings = list(itertools.product(_as_list(ways), _as_list(queries), _as_list(inner_steps), _as_list(meta_batch)))
    results = {"machine": machine(), "shots": shots, "repeats": repeats, "task_parallel": task_parallel, "settings": []}
    for w, q, m, p in settings:
        episodes = EpisodeStream(f"{data}/train", EpisodeShape(w, shots, q), p, seed=0).batch(0)
        steps, memory = {}, {}
        for algo in algos:
            steps[algo], activation = build_step(algo, m, episodes, w, task_parallel, device)
            memory[algo] = activation()
        timing = interleaved_medians(steps, repeats, warmup)
        entry = {"ways": w, "queries": q, "inner_steps": m, "meta_batch": p,
                 "step_s": {a: timing[a] for a in algos}, "peak_memory_mib": memory}
        for a, b in (("sign", "fo"), ("sign", "maml")):
            if a in timing and b in timing:
                entry[f"{a}/{b}"] = timing[a]["median_s"] / timing[b]["median_s"]
        results["settings"].append(entry)
    write_json(results, out)


if __name__ == "__main__":
    fire.Fire(main)

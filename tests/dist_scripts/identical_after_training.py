"""Train a few meta-steps the way train.py does (each rank its own disjoint episodes, Adam, the engine's meta-step),
starting from a *different* initialisation on every rank, and check that all ranks end with identical parameters:
DDP's initial broadcast plus one averaged meta-gradient per step keep them in lockstep. Launched by
tests/test_multinode.py as two "machines" (network namespaces, or localhost).

    accelerate launch ... tests/dist_scripts/identical_after_training.py --data D --out O --world_size 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from dist_signmaml.engine import Engine
from meta_harness import flat_parameters, make_learner, rank_batches


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--world_size", type=int, required=True)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    engine = Engine(args.out, seed=0, log_with=None)
    assert engine.world_size == args.world_size, f"expected {args.world_size} ranks, got {engine.world_size}"
    learner = make_learner("sign", seed=100 + engine.rank)  # a different start on every rank
    initial = flat_parameters(learner)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-2)
    prepared, optimizer = engine.prepare(learner, optimizer, tasks_per_rank=2)
    losses = []
    for batch in rank_batches(args.data, 2, args.steps, seed=0, rank=engine.rank, world=engine.world_size):
        losses.append(float(engine.meta_step(prepared, optimizer, batch).loss))
    final = flat_parameters(engine.unwrap(prepared))
    rows = engine.gather(final[None])
    assert torch.equal(rows, rows[:1].expand_as(rows)), "ranks ended with different parameters"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({"final": final, "initial": initial}, str(out / f"params_rank{engine.rank}.safetensors"))
    (out / f"rank{engine.rank}.json").write_text(json.dumps({"rank": engine.rank, "losses": losses}))
    engine.wait()
    engine.end()


if __name__ == "__main__":
    main()

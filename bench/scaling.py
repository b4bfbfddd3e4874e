"""Data-parallel scaling of the meta-step: tasks/s on 1 rank vs 2 ranks (one thread each) at the same global
meta-batch, side by side in one run, plus the DDP all-reduce per step (bytes and time). Prints JSON.

    python bench/scaling.py                      # 5-way 1-shot, 15 queries, conv4-64, global meta-batch 8
    python bench/scaling.py --meta_batch 16 --steps 10

Each configuration is a real `accelerate launch` (gloo on CPU) running the engine's production meta-step on the
rank's own episodes, drawn before the timed loop (in training the loader's workers draw them in parallel).
Target on 2 cores: 2 ranks >= 1.8x the tasks/s of 1 rank. The all-reduce is measured twice: inside DDP (a comm
hook timing each bucket from launch to completion, so it includes waiting for the slower rank) and alone (the same
number of bytes all-reduced after a barrier). `cpu_share_per_rank` (CPU time / wall time) shows whether a rank had
its core to itself; `cpu_time_efficiency_two_vs_one` compares tasks per CPU-second, which other load on the
machine does not distort.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from dist_signmaml.algorithms import MetaLearner, make_rule
    from dist_signmaml.config import DEFAULT_INNER_LR
    from dist_signmaml.data import EpisodeShape, EpisodeStream
    from dist_signmaml.engine import Engine
    from dist_signmaml.models import build_backbone

    torch.set_num_threads(1)
    engine = Engine(args.out, seed=0, log_with=None)
    tasks = engine.tasks_per_rank(args.meta_batch)
    shape = EpisodeShape(args.ways, args.shots, args.queries)
    stream = EpisodeStream(Path(args.data) / "train", shape, tasks, seed=0, rank=engine.rank,
                           world_size=engine.world_size)
    batches = [stream.batch(b) for b in range(args.warmup + args.steps)]
    torch.manual_seed(0)
    model = build_backbone("conv4", in_channels=stream.index.image_shape[2], ways=args.ways, hidden=64, image_size=28)
    learner = MetaLearner(model, make_rule("sign"), DEFAULT_INNER_LR["sign"], inner_steps=1, task_parallel="loop")
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    prepared, optimizer = engine.prepare(learner, optimizer, tasks)

    buckets: list[tuple[float, int]] = []  # (seconds from launch to completion, bytes) per DDP bucket
    if engine.world_size > 1:
        def timed_allreduce(process_group, bucket):
            launched, size = time.perf_counter(), bucket.buffer().numel() * bucket.buffer().element_size()

            def done(future):
                buckets.append((time.perf_counter() - launched, size))
                return future.value()
            return default_hooks.allreduce_hook(process_group, bucket).then(done)
        prepared.register_comm_hook(None, timed_allreduce)

    for batch in batches[:args.warmup]:
        engine.meta_step(prepared, optimizer, batch)
    buckets.clear()
    engine.wait()
    started, cpu_started = time.perf_counter(), time.process_time()
    for batch in batches[args.warmup:]:
        engine.meta_step(prepared, optimizer, batch)
    engine.wait()
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    # CPU time of each rank over the loop's wall time: well below 1 means the rank was starved of a core (other
    # work on the machine), which the speedup then reflects rather than the method.
    cpu_share = engine.gather(torch.tensor([cpu / elapsed])).tolist()

    result = {"world_size": engine.world_size, "tasks_per_rank": tasks, "seconds_per_step": elapsed / args.steps,
              "tasks_per_second": args.meta_batch * args.steps / elapsed,
              "cpu_share_per_rank": [round(share, 3) for share in cpu_share]}
    if engine.world_size > 1:
        step_bytes = sum(size for _, size in buckets) / args.steps
        flat = torch.zeros(int(step_bytes) // 4)
        engine.wait()
        alone = time.perf_counter()
        for _ in range(args.steps):
            dist.all_reduce(flat)
        result |= {"allreduce_bytes_per_step": int(step_bytes), "allreduce_buckets_per_step": len(buckets) / args.steps,
                   "allreduce_seconds_per_step_in_ddp": sum(t for t, _ in buckets) / args.steps,
                   "allreduce_seconds_per_step_alone": (time.perf_counter() - alone) / args.steps,
                   "parameter_bytes": sum(p.numel() * p.element_size() for p in learner.parameters())}
    if engine.is_main:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "result.json").write_text(json.dumps(result))
    engine.end()


def launch(world: int, args, out: Path) -> dict:
    preset = "cpu_1proc.yaml" if world == 1 else "cpu_2proc.yaml"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    env.pop("ACCELERATE_USE_CPU", None)
    if world > 1:
        env["ACCELERATE_USE_CPU"] = "1"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO_ROOT / "launch" / preset),
               "--num_processes", str(world), __file__, "--worker", "--out", str(out), "--data", args.data,
               "--meta_batch", str(args.meta_batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--ways", str(args.ways), "--shots", str(args.shots), "--queries", str(args.queries)]
    if world > 1:
        command[3:3] = ["--main_process_port", str(29600 + os.getpid() % 1000)]
    finished = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    if finished.returncode != 0:
        raise SystemExit(f"the {world}-rank run failed:\n{finished.stdout[-3000:]}\n{finished.stderr[-3000:]}")
    return json.loads((out / "result.json").read_text())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO_ROOT / "data" / "shards" / "omniglot-28"))
    parser.add_argument("--meta_batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if not (Path(args.data) / "train" / "index.json").is_file():
        raise SystemExit(f"--data={args.data!r}: no train/index.json (build the bundled shards: "
                         f"python -m shards build omniglot --out {args.data})")
    load_before = os.getloadavg()[0]  # other work on the machine skews the 2-rank run first
    with tempfile.TemporaryDirectory() as scratch:
        one = launch(1, args, Path(scratch, "one"))
        two = launch(2, args, Path(scratch, "two"))
    speedup = two["tasks_per_second"] / one["tasks_per_second"]
    # Tasks per CPU-second, summed over ranks: the work the 2-rank run adds (communication, duplicated overhead),
    # independent of how many cores other processes left free. 1.0 = none; the wall speedup can then reach ~2x
    # only if both ranks get a whole core.
    per_cpu = {name: run["tasks_per_second"] / sum(run["cpu_share_per_rank"]) for name, run in (("one", one), ("two", two))}
    print(json.dumps({"benchmark": "data-parallel meta-step scaling (sign, conv4-64, CPU gloo, 1 thread per rank)",
                      "episode": f"{args.ways}-way {args.shots}-shot {args.queries} queries", "global_meta_batch":
                      args.meta_batch, "timed_steps": args.steps, "cpu_cores": os.cpu_count(),
                      "load_average_1min_before": round(load_before, 2),
                      "one_rank": one, "two_ranks": two, "speedup": round(speedup, 3), "target_speedup": 1.8,
                      "meets_target": speedup >= 1.8,
                      "cpu_time_efficiency_two_vs_one": round(per_cpu["two"] / per_cpu["one"], 3)}, indent=1))


if __name__ == "__main__":
    main()

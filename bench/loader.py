"""Episode loader throughput from local disk and object storage against the trainer's consumption, and the
loader's peak memory at 1x and 10x data.

    python -m bench.loader [--batches 200] [--trainer_steps 4] [--sources local,http,s3,s3_cached] [--rss True]
                           [--out bench/results/loader.json]

Prints one JSON object (the command line is in its "command" field):
* loader_episodes_per_s: Omniglot 28 px train split, 5-way and 20-way 1-shot with 15 queries, meta-batches of 4
  tasks through `train_loader` with 0, 1 and 2 DataLoader workers (after a warm-up that covers worker start-up),
  for each source: local disk; a local HTTP server (the handler of `python -m http.server`) serving the shards;
  moto's S3-compatible server on 127.0.0.1 (streamed, and with a verified --cache_dir). The servers run in this
  process, on the same CPUs, so the remote figures include serving the bytes as well as fetching them.
* trainer_episodes_per_s: in the same run, conv4 Sign-MAML meta-steps (the trainer's MetaLearner, forward + backward
  + Adam step, 1 inner step as in training) on batches the loader made: the rate at which training consumes episodes.
* loader_over_trainer: their ratios; the target is >= 10 for every configuration.
* peak_rss: peak resident memory of a fresh process that streams a full cycle of the train split, and of one that
  streams the same number of batches from the split replicated 10x (10x the classes and shards). Bounded memory
  means the two peaks are about equal although the second dataset is 10x larger.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dist_signmaml.builders import ensure_bundled_data
from dist_signmaml.config import DEFAULT_DATA, TrainConfig
from dist_signmaml.data import EpisodeShape, EpisodeStream, read_index, train_loader

SHAPES = {"5w1s15q": EpisodeShape(5, 1, 15), "20w1s15q": EpisodeShape(20, 1, 15)}
TASKS_PER_BATCH = 4  # the paper's meta-batch P
TARGET_RATIO = 10.0


def omniglot_train() -> Path:
    ensure_bundled_data(DEFAULT_DATA, progress=False)
    return DEFAULT_DATA / "train"


def loader_rate(split, shape: EpisodeShape, workers: int, batches: int, warmup: int, cache_dir: str | None = None) -> float:
    """Episodes per second through the DataLoader, after `warmup` batches (worker start-up, first shard reads)."""
    stream = EpisodeStream(split, shape, TASKS_PER_BATCH, seed=0, num_workers=workers, cache_dir=cache_dir)
    loader = iter(train_loader(stream, workers))
    for _ in range(warmup):
        next(loader)
    started = time.perf_counter()
    for _ in range(batches):
        next(loader)
    elapsed = time.perf_counter() - started
    del loader  # stops the worker processes
    return batches * TASKS_PER_BATCH / elapsed


def trainer_rate(split: Path, shape: EpisodeShape, steps: int, device: torch.device) -> float:
    """Episodes per second the trainer consumes: conv4 Sign-MAML meta-steps built exactly as train.py builds them
    (on a GPU its tasks run vmapped, as train.py's --task_parallel auto does)."""
    from dist_signmaml.builders import build_learner

    config = TrainConfig.from_options(ways=shape.ways, shots=shape.shots, queries=shape.queries, algo="sign",
                                      backbone="conv4", meta_batch=TASKS_PER_BATCH, data=str(split.parent))
    torch.manual_seed(0)
    learner = build_learner(config, read_index(split).image_shape, device).to(device)
    optimizer = torch.optim.Adam(learner.parameters(), lr=config.outer_lr)
    stream = EpisodeStream(split, shape, TASKS_PER_BATCH, seed=1)
    episodes = [stream.batch(b).to(device) for b in range(steps + 1)]  # made before timing: only the trainer is timed

    def meta_step(batch):
        output = learner(*batch)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    meta_step(episodes[0])  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for batch in episodes[1:]:
        meta_step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * TASKS_PER_BATCH / (time.perf_counter() - started)


def replicate(split: Path, out: Path, copies: int) -> Path:
    """The split written `copies` times over as one split (class names prefixed by the copy), read shard by shard."""
    from dist_signmaml.data.format import read_class_shard
    from shards.writer import write_split

    index = read_index(split)

    def classes():
        for copy in range(copies):
            for shard in index.shards:
                for name, images in sorted(read_class_shard(split / shard, index.image_shape).items()):
                    yield f"copy{copy}/{name}", images

    raw = json.loads((split / "index.json").read_text())
    shard_mb = max(s["bytes"] for s in raw["shards"]) / 1e6
    write_split(classes(), out, dataset=f"{index.dataset}-x{copies}", split=index.split,
                num_classes=copies * len(index.classes), shard_mb=shard_mb, progress=False)
    return out


def peak_rss_mb() -> float:
    """This process's peak resident set size. Linux: VmHWM, which starts afresh at exec (ru_maxrss would carry the
    parent's peak over into a child started with fork + exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 1024 ** 2)


def measure_rss_in_this_process(split: str, batches: int) -> None:
    """Run in a fresh process: stream `batches` meta-batches, print peak RSS (and RSS before the first batch)."""
    torch.set_num_threads(1)
    stream = EpisodeStream(Path(split), SHAPES["5w1s15q"], TASKS_PER_BATCH, seed=0)
    before = peak_rss_mb()
    for b in range(batches):
        stream.batch(b)
    peak = peak_rss_mb()
    print(json.dumps({"rss_before_first_batch_mb": round(before, 1), "peak_rss_mb": round(peak, 1),
                      "growth_while_streaming_mb": round(peak - before, 1),
                      "shards_loaded": stream.shards_loaded, "shards": len(stream.index.shards),
                      "window_shards": stream.window_shards}))


def peak_rss(split: Path, workdir: Path) -> dict:
    big = replicate(split, workdir / "x10" / "train", 10)
    probe = EpisodeStream(big, SHAPES["5w1s15q"], TASKS_PER_BATCH, seed=0)
    batches = len(probe.index.shards) * probe.batches_per_shard + 1  # one full cycle through the 10x shards
    results = {}
    for name, path in (("1x", split), ("10x", big)):
        done = subprocess.run([sys.executable, "-m", "bench.loader", "--rss_child", str(path), "--batches", str(batches)],
                              capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1],
                              env=os.environ | {"OMP_NUM_THREADS": "1"})
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        raw = json.loads((path / "index.json").read_text())
        results[name] |= {"dataset_mb": round(sum(s["bytes"] for s in raw["shards"]) / 1e6, 1),
                          "classes": raw["num_classes"]}
    results["batches_streamed"] = batches
    results["peak_ratio_10x_over_1x"] = round(results["10x"]["peak_rss_mb"] / results["1x"]["peak_rss_mb"], 3)
    return results


@contextlib.contextmanager
def served(source: str, split: Path, scratch: Path):
    """(split location, cache dir or None) of `split` served from `source`; servers stop on exit."""
    from tests.remote_servers import http_server, s3_server, upload_tree

    if source == "local":
        yield split, None
    elif source == "http":
        with http_server(split.parent) as (url, _, _):
            yield f"{url}/{split.name}", None
    elif source in ("s3", "s3_cached"):
        with s3_server():
            upload_tree("dsm-bench", "data", split.parent / split.name)
            cache = str(scratch / "cache") if source == "s3_cached" else None
            yield "s3://dsm-bench/data", cache
    else:
        raise ValueError(f"--sources: {source!r} is not one of {', '.join(SOURCES)}")


SOURCES = ("local", "http", "s3", "s3_cached")


def main(batches: int = 200, warmup: int = 20, trainer_steps: int = 4, rss: bool = True, throughput: bool = True,
         sources: str = ",".join(SOURCES), workers: str = "0,1,2", out: str = "", device: str = "auto",
         rss_child: str = "", workdir: str = "", note: str = ""):
    """See the module docstring. device: where the trainer runs (auto = cuda if available, else cpu);
    throughput/rss: run that part (both by default); sources/workers: comma-separated lists; note: free text
    recorded in the JSON (e.g. that the machine was shared)."""
    if rss_child:
        return measure_rss_in_this_process(rss_child, batches)
    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device)
    split = omniglot_train()
    source_list = [s for s in str(sources).split(",") if s] if isinstance(sources, str) else list(sources)
    worker_list = [int(w) for w in str(workers).split(",")] if isinstance(workers, str) else [int(w) for w in (
        workers if isinstance(workers, (list, tuple)) else [workers])]
    result = {"command": "python -m bench.loader " + " ".join(sys.argv[1:]), "note": note,
              "machine": {"cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "torch": torch.__version__,
                          "torch_threads": torch.get_num_threads(), "trainer_device": str(device)},
              "data": str(split), "data_mb": round(sum(read_index(split).shard_bytes.values()) / 1e6, 1),
              "tasks_per_batch": TASKS_PER_BATCH, "batches_timed": batches, "loader_episodes_per_s": {},
              "trainer_episodes_per_s": {}, "loader_over_trainer": {}, "target_ratio": TARGET_RATIO}
    with tempfile.TemporaryDirectory(dir=workdir or None) as scratch:
        for name, shape in SHAPES.items() if throughput else ():
            consumed = trainer_rate(split, shape, trainer_steps, device)
            result["trainer_episodes_per_s"][name] = round(consumed, 2)
            for source in source_list:
                with served(source, split, Path(scratch)) as (location, cache):
                    rates = {f"workers_{w}": round(loader_rate(location, shape, w, batches, warmup, cache), 1)
                             for w in worker_list}
                result["loader_episodes_per_s"].setdefault(source, {})[name] = rates
                result["loader_over_trainer"].setdefault(source, {})[name] = {k: round(v / consumed, 1)
                                                                             for k, v in rates.items()}
    result["meets_target"] = None if not throughput else all(
        r >= TARGET_RATIO for per_source in result["loader_over_trainer"].values() for v in per_source.values()
        for r in v.values())
    if rss:
        with tempfile.TemporaryDirectory(dir=workdir or None) as scratch:
            result["peak_rss"] = peak_rss(split, Path(scratch))
    text = json.dumps(result, indent=1, sort_keys=True)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")


if __name__ == "__main__":
    import fire

    fire.Fire(main)

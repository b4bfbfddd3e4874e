"""What a run is built from, shared by train, evaluate, bench and the tests: the learner of a config, the data checks,
the training stream, the initial weights and the optimizer. No Accelerate here: the engine is passed in where a
rank or the world size is needed.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
from pathlib import Path

import torch

from dist_signmaml import optim
from dist_signmaml.algorithms import MetaLearner, make_rule
from dist_signmaml.algorithms.learner import resolve_task_parallel
from dist_signmaml.artifacts import WeightsFileError
from dist_signmaml.config import DEFAULT_DATA, PAPER_META_BATCH, ConfigError, TrainConfig
from dist_signmaml.data import EpisodeShape, EpisodeStream, read_index
from dist_signmaml.data.episode_loader import usable_classes
from dist_signmaml.data.storage import data_root as resolve_data_root
from dist_signmaml.cpu_allocator import keep_freed_memory
from dist_signmaml.models import adapted_parameter_names, build_backbone, load_weights, resolve_channels_last

# Images beyond this side length are not few-shot benchmarks; the bound stops a corrupt index from sizing a model of
# many gigabytes before anything else is read (conv4 at 2048 px is already ~1 GB of activations per task).
MAX_IMAGE_SIDE = 2048


def episode_shape(config: TrainConfig) -> EpisodeShape:
    return EpisodeShape(config.ways, config.shots, config.queries)


def is_option_error(error: ValueError) -> bool:
    """Backbone constructors report a bad option or an image too small for the backbone with a ValueError whose
    message names the flag (`--adapt=...`) or the image size; anything else raised while building is a bug."""
    text = str(error)
    return text.startswith("--") or "needs images of at least" in text or "needs at least" in text


def build_learner(config: TrainConfig, image_shape, device) -> MetaLearner:
    """The MetaLearner of `config` for images of `image_shape` (H, W, C). `evaluate` rebuilds trained weights
    with this same function, so a meta-test runs exactly the trained model and inner loop."""
    height, width, channels = check_image_shape(image_shape, "image_shape")
    if str(device).split(":")[0] == "cpu":
        keep_freed_memory()  # no page faults on every step's fresh graph (cpu_allocator)
    channels_last, _ = resolve_channels_last(config.channels_last, device)
    try:
        model = build_backbone(config.backbone, in_channels=channels, ways=config.ways, hidden=config.hidden,
                               image_size=height, stem=config.stem, precision=config.precision,
                               channels_last=channels_last,
                               activation_checkpointing=config.activation_checkpointing)
        adapted_names = adapted_parameter_names(model, config.adapt)
    except ValueError as error:
        if not is_option_error(error):
            raise  # a bug, not bad input: keep its traceback
        raise ConfigError(str(error)) from error
    # Checkpointing works only outside torch.func transforms, i.e. in the task loop: 'auto' picks it then.
    task_parallel = resolve_task_parallel("loop" if config.activation_checkpointing and config.task_parallel == "auto"
                                          else config.task_parallel, device)
    learner = MetaLearner(model, make_rule(config.algo, config.inner_momentum), config.inner_lr, config.inner_steps,
                          task_parallel, adapted_names=adapted_names, learn_inner_lr=config.learn_inner_lr,
                          multi_step_loss=config.multi_step_loss)
    return learner.compile_tasks(config.compile_backend) if config.compile else learner


def build_optimizer(config: TrainConfig, learner) -> torch.optim.Optimizer:
    """Adam at alpha on the meta-initialisation (the outer update), and at --inner_lr_lr on learned step sizes."""
    return optim.build_optimizer(learner, config.outer_lr, config.inner_lr_lr)


def local_meta_step(learner, optimizer, episodes) -> object:
    """One meta-update on one device (benchmarks and tests); the engine's meta_step is the distributed one."""
    output = learner(*episodes)
    output.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return output


def resolved_width(learner) -> int | None:
    """The width the backbone was built with (--hidden 0 picks one from the image size): its first convolution's."""
    return next((m.out_channels for m in learner.model.modules() if isinstance(m, torch.nn.Conv2d)), None)


# ---- data -------------------------------------------------------------------------------------------------------

def check_image_shape(image_shape, where: str) -> tuple[int, int, int]:
    """(H, W, C) with C in {1, 3} and sides in [1, MAX_IMAGE_SIDE]: checked before it sizes a model."""
    shape = tuple(image_shape) if isinstance(image_shape, (list, tuple)) else ()
    if (len(shape) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in shape)
            or not (1 <= shape[0] <= MAX_IMAGE_SIDE and 1 <= shape[1] <= MAX_IMAGE_SIDE) or shape[2] not in (1, 3)):
        raise ConfigError(f"{where}: image_shape {list(image_shape) if isinstance(image_shape, (list, tuple)) else image_shape!r} "
                          f"is invalid: expected [H, W, C] with 1 <= H, W <= {MAX_IMAGE_SIDE} and C 1 or 3")
    return shape


BUNDLED_SPLITS = ("train", "val", "test")


def ensure_bundled_data(data: str | Path, bundled: Path | None = None, progress: bool = True) -> None:
    """The bundled Omniglot shards are built on first use, by whatever reads them first: a run, an evaluation, the
    test protocol of a run trained in another checkout. Only the missing splits are built. Processes that start at
    once on one machine take turns on a lock file beside the root, so none reads a split while another writes it,
    and each split is built once. Any other --data is left alone. `bundled`: the root built here (DEFAULT_DATA)."""
    root = Path(data)
    # realpath: the bundled root reached through a link is still the bundled root, and a broken link is no error here
    if os.path.realpath(root) != os.path.realpath(bundled or DEFAULT_DATA):
        return

    def missing() -> tuple[str, ...]:
        return tuple(split for split in BUNDLED_SPLITS if not (root / split / "index.json").is_file())

    if not missing():
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.with_name(root.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when the process dies
        splits = missing()  # another process may have built them while this one waited
        if splits:
            from shards import omniglot

            print(f"building the bundled Omniglot shards in {root}: {', '.join(splits)} (once)", flush=True)
            omniglot.build(root, splits=splits, progress=progress)


def build_bundled_data(config: TrainConfig, engine) -> None:
    """ensure_bundled_data for a run: the main process builds, the others wait for it."""
    with engine.main_process_first():
        if engine.is_main:
            ensure_bundled_data(config.data)


def check_data(config: TrainConfig) -> Path:
    """Every split the run reads: a readable index, sane image shape and statistics, and enough classes with
    shots+queries images for `--ways`. Returns the shard root: a local Path, or a storage.Url for object storage
    (s3://, gs://, https://)."""
    try:
        root = resolve_data_root(config.data)
    except ValueError as error:  # e.g. a pipe: or unknown scheme: the message names --data
        raise ConfigError(str(error)) from None
    shape = episode_shape(config)
    for split in ("train",) + (("val",) if config.eval_episodes else ()) + (("test",) if config.test_episodes else ()):
        try:
            index = read_index(root / split)
        except FileNotFoundError as error:
            raise ConfigError(f"--data={config.data!r}: {error}") from None
        where = f"{root / split / 'index.json'}"
        check_image_shape(index.image_shape, where)
        # (the statistics are checked by the index reader itself: finite, std > 0, one per channel)
        try:
            usable_classes(index, shape, root / split)
        except ValueError as error:  # too few classes for --ways: the message names the flag
            raise ConfigError(str(error)) from None
    return root


def train_stream(config: TrainConfig, data_root: Path, engine, start_batch: int = 0) -> EpisodeStream:
    """This rank's share of the training episodes, from meta-step `start_batch` on (resumable: see its state_dict)."""
    try:
        return EpisodeStream(data_root / "train", episode_shape(config), engine.tasks_per_rank(config.meta_batch),
                             seed=config.seed, rank=engine.rank, world_size=engine.world_size,
                             num_workers=config.workers, start_batch=start_batch, window_shards=config.window_shards,
                             class_sampling=config.class_sampling, on_bad_sample=config.on_bad_sample,
                             cache_dir=config.cache_dir or None, cache_gb=config.cache_gb)
    except ValueError as error:
        if not str(error).startswith("--") and "shards but" not in str(error):
            raise
        raise ConfigError(str(error)) from None  # e.g. too few shards for the ranks x workers


def check_weights_fit(config: TrainConfig, image_shape, file: str | Path) -> None:
    """Refuse an export whose stored config would build another learner than its tensors describe, BEFORE anything is
    allocated: the learner is built on the meta device (no memory) and its tensor shapes are compared with the
    file's header. A hostile or mismatched `hidden`/`image_shape` in the metadata would otherwise size a model of
    many GB first and fail afterwards."""
    from safetensors import safe_open

    from dist_signmaml.algorithms.learner import to_learner_names

    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in build_learner(config, image_shape, "meta").state_dict().items()}
    try:
        with safe_open(str(file), framework="pt") as handle:
            stored = to_learner_names({name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()})
    except Exception as error:  # safetensors' own error types for bytes that are not safetensors
        raise WeightsFileError(f"{str(file)!r} is not a readable safetensors file ({error})") from None
    differences = [f"{name}: file {stored.get(name)}, config {expected.get(name)}"
                   for name in sorted(set(expected) | set(stored)) if stored.get(name) != expected.get(name)]
    if differences:
        raise WeightsFileError(f"{file}: its metadata (config, image_shape) does not describe its tensors "
                               f"({len(differences)} differ, e.g. {'; '.join(differences[:3])})")


def load_initial_weights(learner, path: str) -> list[str]:
    """--weights: a local state dict loaded into the backbone before prepare (so every rank starts from it). Returns
    the tensors left at their initialisation (a head of another shape). Any unreadable file is a ConfigError."""
    try:
        return load_weights(learner.model, path)
    except ValueError as error:  # missing, unknown or mis-shaped tensors: the message names --weights
        raise ConfigError(str(error) if str(error).startswith("--weights") else f"--weights={path!r}: {error}") from None
    except Exception as error:  # torch.load / safetensors raise many types for bytes that are not a state dict
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise ConfigError(f"--weights={path!r} is not a readable state dict (.safetensors, or a torch file of "
                          f"tensors): {first_line}") from None


# ---- values that depend on the launch -----------------------------------------------------------------------------

def default_meta_batch(world_size: int) -> int:
    """The paper's P = 4 tasks, rounded up to a multiple of the processes (8 processes -> 8 tasks, one per rank)."""
    return world_size * math.ceil(PAPER_META_BATCH / world_size)


def default_torch_threads(local_processes: int) -> int:
    """Intra-op threads per process: the cores this process may run on, shared by the processes of this node.
    torch's own default counts every core of the machine for each process, which oversubscribes a shared or
    pinned (taskset, SLURM cgroup) set of cores."""
    return max(1, len(os.sched_getaffinity(0)) // max(1, local_processes))


def rank_cores(usable: list[int], local_rank: int, local_processes: int) -> list[int] | None:
    """The cores local rank `local_rank` of `local_processes` is pinned to: its own contiguous share of the cores
    this node's processes may use, or None (no pinning) for a single process or fewer cores than processes.
    Unpinned ranks migrate between cores and a synchronous step waits for the slowest: two pinned ranks on this
    2-core machine reached 2.00x one rank against 1.89x unpinned (docs/benchmarks.md, bench/scaling.py)."""
    if local_processes < 2 or len(usable) < local_processes:
        return None
    share = len(usable) // local_processes
    return sorted(usable)[local_rank * share:(local_rank + 1) * share]


@contextlib.contextmanager
def torch_threads_for_run(cpu_affinity: str = "auto"):
    """For the length of a run: pin this rank to its share of the node's cores (cpu_affinity auto, several local
    processes, no GPU: a GPU's nearest cores are the driver's business, not a contiguous share), then apply
    default_torch_threads unless the user chose (OMP_NUM_THREADS); yields (threads, why, pinned cores or None).
    The caller's thread count and affinity come back afterwards: `train()` called as a library function must not
    change the numerics of what its caller computes next (a different thread count reorders reductions)."""
    before, affinity_before = torch.get_num_threads(), os.sched_getaffinity(0)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if os.environ.get("OMP_NUM_THREADS"):
        chosen = before, "OMP_NUM_THREADS"
    else:
        threads = default_torch_threads(local)  # from the node's cores, before this rank is pinned to its share
        torch.set_num_threads(threads)
        chosen = threads, f"{len(affinity_before)} usable cores / {local} local process(es)"
    pinned = rank_cores(list(affinity_before), int(os.environ.get("LOCAL_RANK", "0")), local) \
        if cpu_affinity == "auto" and not torch.cuda.is_available() else None
    if pinned:
        os.sched_setaffinity(0, pinned)
    try:
        yield (*chosen, pinned)
    finally:
        torch.set_num_threads(before)
        if pinned:
            os.sched_setaffinity(0, affinity_before)

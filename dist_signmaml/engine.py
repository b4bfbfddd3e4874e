"""The only module that touches Accelerate (and, through it, DeepSpeed): processes, prepare, backward, the
non-finite guard, metric reductions, broadcasts, trackers, checkpoint state and export.

Below it nothing imports accelerate or deepspeed, but not everything there is single-device: the episode stream and
the meta-test split their work by the rank and world size this engine hands them. Model and algorithm code
(`models/`, `algorithms/`) is written for one device; data parallelism is applied from here.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.tracking import TensorBoardTracker
from accelerate.utils import (DeepSpeedPlugin, DistributedDataParallelKwargs, DistributedType, InitProcessGroupKwargs,
                               broadcast_object_list, set_seed)

from dist_signmaml.artifacts import TENSORBOARD_DIR, non_finite_tensors, save_weights
from dist_signmaml.trackers import tracker_names, tracker_settings


class DistributedSetupError(RuntimeError):
    pass


class NonFiniteError(FloatingPointError):
    """A meta-step produced a non-finite loss or meta-gradient; the update was not applied."""


class PeerLostError(RuntimeError):
    """A collective failed because another rank died or hung; the message names the rank(s) when they are known."""


ZERO3_REFUSAL = (
    "DeepSpeed ZeRO stage 3 is not supported: it partitions every parameter across ranks and gathers a layer's "
    "weights only inside DeepSpeed's module hooks, but the inner loop calls the backbone functionally "
    "(torch.func.functional_call) on the whole parameter set of each task, so it would adapt empty parameter shards. "
    "Use --zero_stage 1 or 2 (optimizer states / gradients partitioned, parameters kept whole) or plain DDP (0)")


def resolve_zero_stage(requested: int) -> int:
    """The DeepSpeed ZeRO stage to run: --zero_stage, or the stage of an `accelerate launch --use_deepspeed` /
    DeepSpeed config-file launch (ACCELERATE_* variables); 0 = plain DDP. Refuses stage 3 and contradictions."""
    launched_with_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    launched_stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")) if launched_with_deepspeed else 0
    if requested and launched_with_deepspeed and launched_stage != requested:
        raise DistributedSetupError(f"--zero_stage={requested} contradicts the launcher's DeepSpeed ZeRO stage "
                                    f"{launched_stage} (ACCELERATE_DEEPSPEED_ZERO_STAGE); give one of them")
    stage = requested or launched_stage
    if stage == 3:
        raise DistributedSetupError(ZERO3_REFUSAL)
    if stage not in (0, 1, 2):
        raise DistributedSetupError(f"--zero_stage={stage} is invalid: expected 0 (DDP), 1 or 2")
    return stage


def process_group_kwargs(timeout_s: float, deepspeed_on_cpu: bool) -> InitProcessGroupKwargs:
    """Process-group settings: the collective timeout that bounds how long ranks wait for a dead or hung peer.

    Accelerate forwards only fields that differ from its own defaults (nccl, 600 s), so exactly 600 s would
    silently become the backend's default (30 min for gloo): it is nudged by 1 ms. DeepSpeed on a CPU-only
    machine needs gloo named explicitly, or every process forms its own group of one (see ENVIRONMENT notes).
    """
    timeout = timedelta(seconds=timeout_s)
    if timeout == timedelta(seconds=600):
        timeout += timedelta(milliseconds=1)
    kwargs = InitProcessGroupKwargs(timeout=timeout)
    if deepspeed_on_cpu:
        kwargs.backend = "gloo"
    return kwargs


def names_lost_peers(what: str):
    """Decorate an Engine method that runs a collective: a peer lost meanwhile becomes a PeerLostError naming it."""
    def decorate(method):
        @functools.wraps(method)
        def wrapped(self, *args, **kwargs):
            with self.naming_lost_peers(what):
                return method(self, *args, **kwargs)
        return wrapped
    return decorate


def meta_parameters(optimizer) -> list[torch.Tensor]:
    """Everything the outer update changes: the meta-initialisation and any learned step sizes."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def meta_gradient_norm(optimizer) -> torch.Tensor:
    """The L2 norm of the meta-gradient over every meta-parameter (0 for parameters without a gradient)."""
    grads = [p.grad for p in meta_parameters(optimizer) if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


class Engine:
    def __init__(self, out_dir: str | Path, seed: int, log_with: str | None = "tensorboard", *,
                 zero_stage: int = 0, timeout_s: float = 300.0, meta_grad_clip: float = 0.0):
        self.out_dir = Path(out_dir)
        self.meta_grad_clip = float(meta_grad_clip)  # the meta-gradient's L2 norm limit; 0: no clipping
        self.zero_stage = resolve_zero_stage(zero_stage)
        self.timeout_s = float(timeout_s)
        deepspeed = None
        if self.zero_stage:
            self._check_deepspeed_launch()
            deepspeed = DeepSpeedPlugin(zero_stage=self.zero_stage, gradient_accumulation_steps=1)
            # The same clipping as under DDP (none unless --meta_grad_clip): DeepSpeed 0.19 clips at global norm 1.0
            # unless told otherwise, which made ZeRO steps 4x shorter than DDP's in tests/test_deepspeed.py. Batch
            # sizes are filled in prepare().
            deepspeed.deepspeed_config["gradient_clipping"] = self.meta_grad_clip
            # The optimizer is a plain torch one (Adam, or SGD in tests); ZeRO 1/2 apply it to flat fp32 partitions.
            deepspeed.deepspeed_config["zero_allow_untested_optimizer"] = True
        # broadcast_buffers=False: the backbones keep no BatchNorm buffers, and torch.func calls must not see DDP
        # rewriting module state inside forward.
        handlers = [DistributedDataParallelKwargs(broadcast_buffers=False),
                    process_group_kwargs(self.timeout_s, deepspeed_on_cpu=bool(deepspeed) and not torch.cuda.is_available())]
        # TensorBoard is built here so that it writes to OUT/tb whatever the project name of wandb and MLflow is.
        self.trackers = tracker_names(log_with)
        trackers = [TensorBoardTracker(TENSORBOARD_DIR, str(self.out_dir)) if name == "tensorboard" else name
                    for name in self.trackers]
        self.accelerator = Accelerator(log_with=trackers or None, project_dir=str(self.out_dir),
                                       kwargs_handlers=handlers, deepspeed_plugin=deepspeed)
        self._check_world()
        if self.zero_stage and self.accelerator.distributed_type != DistributedType.DEEPSPEED:
            raise DistributedSetupError(self._deepspeed_misuse(self.accelerator.distributed_type.value))
        # A CPU-side (gloo) group for the per-step stop vote and for naming lost peers; it never touches the GPU.
        self._control = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout_s)) \
            if self.world_size > 1 else None
        self._ended = False
        set_seed(seed)

    # ---- processes -------------------------------------------------------------------------------------------
    def _deepspeed_misuse(self, what_happened: str) -> str:
        return (f"--zero_stage={self.zero_stage} asked for DeepSpeed but Accelerate set up {what_happened}; launch with "
                f"`accelerate launch --use_deepspeed` (also for one process) and do not set ACCELERATE_USE_CPU=1 "
                f"(with it Accelerate silently runs plain DDP)")

    def _check_deepspeed_launch(self):
        if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
            raise DistributedSetupError(self._deepspeed_misuse("a CPU run (ACCELERATE_USE_CPU is set)"))
        if "LOCAL_RANK" not in os.environ:
            raise DistributedSetupError(self._deepspeed_misuse("no distributed run (no launcher)"))

    def _check_world(self):
        """Fail loudly when a launcher started several processes that each think they are alone (e.g. `accelerate
        launch --multi_gpu` on a CPU machine without ACCELERATE_USE_CPU=1): they would train without syncing."""
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != self.accelerator.num_processes:
            raise DistributedSetupError(
                f"the launcher started WORLD_SIZE={launched} processes but Accelerate formed a group of "
                f"{self.accelerator.num_processes}: ranks would not sync. On a CPU-only machine launch with "
                f"ACCELERATE_USE_CPU=1 (README: 'Distributed training, DeepSpeed and SLURM').")

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def print0(self, *args, **kwargs):
        self.accelerator.print(*args, **kwargs)

    def tasks_per_rank(self, meta_batch: int) -> int:
        """The global meta-batch P is split evenly: every rank adapts P / world_size tasks per meta-step."""
        if meta_batch % self.world_size:
            raise DistributedSetupError(f"--meta_batch={meta_batch} is not divisible by the {self.world_size} "
                                        f"processes; use a multiple of {self.world_size}")
        return meta_batch // self.world_size

    def main_process_first(self):
        return self.accelerator.main_process_first()

    @names_lost_peers("a barrier")
    def wait(self):
        self.accelerator.wait_for_everyone()

    # ---- the meta-step ------------------------------------------------------------------------------------------
    def prepare(self, learner: torch.nn.Module, optimizer: torch.optim.Optimizer, tasks_per_rank: int = 1):
        if self.zero_stage:
            # No DataLoader reaches prepare() (the episode stream splits ranks itself), so DeepSpeed's batch size,
            # which it only uses for bookkeeping here, is given in tasks: train_batch_size follows as P.
            self.accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = tasks_per_rank
        return self.accelerator.prepare(learner, optimizer)

    def backward(self, loss: torch.Tensor):
        """One backward of the meta-loss; under DDP this is where the meta-gradient is all-reduced (averaged).
        Under DeepSpeed it also runs the optimizer step (the prepared optimizer's step() is then a no-op)."""
        self.accelerator.backward(loss)

    def meta_step(self, learner, optimizer, episodes, phase=None, *, step: int = 0, on_nonfinite: str = "stop",
                  **forward_options):
        """One meta-update on this rank's share of the meta-batch: the meta-loss through the *prepared* module's
        forward (so DDP/DeepSpeed see it), one backward that averages the meta-gradient over ranks, one step
        (after clipping the averaged meta-gradient's norm to --meta_grad_clip, when set).
        `phase(name)`, if given, is a context manager timing each part (monitor.PhaseTimer.phase).

        Before the update the ranks vote on whether any loss or meta-gradient is non-finite; if so no rank applies
        it, so the weights (and every later checkpoint and export) stay finite. on_nonfinite='stop' raises
        NonFiniteError naming the step and the first such rank; 'skip_step' returns None instead of the output."""
        phase = phase or (lambda name: contextlib.nullcontext())
        with self.naming_lost_peers("the meta-gradient all-reduce"):
            with phase("inner_loop"):
                output = learner(*episodes.to(self.device), **forward_options)
            # DeepSpeed applies the optimizer inside backward: its vote is on the loss, before backward.
            bad = self._first_non_finite(output.loss, None) if self.zero_stage else None
            if bad is None:
                with phase("outer_backward"):
                    self.backward(output.loss)
                if not self.zero_stage:
                    output.meta_grad_norm = meta_gradient_norm(optimizer)
                    bad = self._first_non_finite(output.loss, output.meta_grad_norm)
            with phase("optimizer_step"):
                if bad is None:
                    if self.meta_grad_clip and not self.zero_stage:  # DeepSpeed clips inside its own step
                        torch.nn.utils.clip_grads_with_norm_(meta_parameters(optimizer), self.meta_grad_clip,
                                                             output.meta_grad_norm)
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        if bad is None:
            return output
        if on_nonfinite == "skip_step":
            return None
        raise NonFiniteError(f"step {step}: {bad}; the update was not applied and the run stops, keeping the newest "
                             f"checkpoint (all finite). Lower --inner_lr/--outer_lr, check the data's statistics, or "
                             f"pass --on_nonfinite skip_step")

    def _first_non_finite(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> str | None:
        """Which rank, if any, has a non-finite loss or (after backward) meta-gradient, agreed by every rank.

        After DDP's backward every rank holds the same all-reduced meta-gradient, and a non-finite loss on any rank
        makes it non-finite (NaN and inf survive the sum): every rank reaches the same verdict from the norm of its
        own gradients, so a healthy step costs no collective. Only a bad step votes, to name the rank. Without
        gradients (grad_norm None; DeepSpeed: its optimizer runs inside backward) the ranks vote on the loss every
        step."""
        grad_bad = False
        if grad_norm is not None:
            if bool(torch.isfinite(grad_norm)):
                return None  # the same verdict on every rank: nothing to agree on (one host sync per healthy step)
            grad_bad = True
        loss_bad = not bool(torch.isfinite(loss.detach()).all())
        votes = torch.tensor([self.rank if loss_bad else self.world_size, self.rank if grad_bad else self.world_size])
        if self._control is not None:
            with self.naming_lost_peers("the non-finite vote"):
                dist.all_reduce(votes, op=dist.ReduceOp.MIN, group=self._control)
        loss_rank, grad_rank = (int(v) for v in votes)
        if loss_rank < self.world_size:
            return f"the meta-loss is not finite on rank {loss_rank}" + (f" (loss={loss.item()})" if loss_bad else "")
        if grad_rank < self.world_size:
            return f"the meta-gradient is not finite on rank {grad_rank}"
        return None

    # ---- faults -----------------------------------------------------------------------------------------------
    def any_rank(self, flag: bool) -> bool:
        """True on every rank if `flag` is True on any rank (e.g. a stop signal reached only some processes)."""
        if self._control is None:
            return bool(flag)
        vote = torch.tensor([int(bool(flag))])
        with self.naming_lost_peers("the stop vote"):
            dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self._control)
        return bool(vote.item())

    @contextlib.contextmanager
    def naming_lost_peers(self, what: str):
        """Turn a collective that failed because a peer died or hung (connection closed, or the process-group
        timeout) into a PeerLostError that names the lost rank(s), found by pinging over the control group."""
        started = time.monotonic()
        try:
            yield
        except RuntimeError as error:
            if self._control is None or not _is_communication_error(error):
                raise  # a bug in the step itself, not a lost peer: keep its own traceback
            failed_after = time.monotonic() - started
            lost = self._ping_peers()
            if not lost:
                raise
            first_line = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
            lost_error = PeerLostError(f"rank {self.rank}: {what} failed after {failed_after:.1f} s because {lost}. "
                                       f"Original error: {first_line}")
            # Said now, not by whoever catches it: the launcher has seen the peer die too and sends this rank
            # SIGTERM within a fraction of a second, which the default handler (back in place once the training
            # loop has unwound) turns into a silent exit before any traceback is printed.
            print(f"{type(lost_error).__name__}: {lost_error}", file=sys.stderr, flush=True)
            raise lost_error from error

    def _ping_peers(self) -> str:
        """Rank 0 waits for a token from every other rank, each other rank sends one to rank 0; a closed connection
        or no answer within a bounded time marks the peer as lost. Returns a description, '' if all answered."""
        wait = timedelta(seconds=min(self.timeout_s, 30.0))
        token = torch.zeros(1)
        if self.rank != 0:
            try:
                self._control.send([token], 0, 0).wait(wait)
                return "another rank was lost (rank 0's error names it)"
            except RuntimeError as error:
                return f"rank 0 {_reason(error)}"
        lost = []
        for peer in range(1, self.world_size):
            try:
                self._control.recv([token], peer, 0).wait(wait)
            except RuntimeError as error:
                lost.append(f"rank {peer} {_reason(error)}")
        return "; ".join(lost)

    @names_lost_peers("a metric reduction")
    def mean_over_ranks(self, values: dict[str, torch.Tensor | float]) -> dict[str, float]:
        keys = sorted(values)
        stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float32, device=self.device) for k in keys])
        reduced = self.accelerator.reduce(stacked, reduction="mean")
        return {k: float(v) for k, v in zip(keys, reduced.tolist())}

    @names_lost_peers("a metric reduction")
    def sum_over_ranks(self, values: dict[str, torch.Tensor | float]) -> dict[str, float]:
        keys = sorted(values)
        stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float32, device=self.device) for k in keys])
        return {k: float(v) for k, v in zip(keys, self.accelerator.reduce(stacked, reduction="sum").tolist())}

    @names_lost_peers("a broadcast")
    def broadcast_from_main(self, value):
        """The main process's `value` (any picklable object) on every rank: one decision, one error, for all."""
        return broadcast_object_list([value])[0] if self.world_size > 1 else value

    @names_lost_peers("a gather")
    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(tensor.to(self.device))

    def unwrap(self, learner):
        return self.accelerator.unwrap_model(learner)

    # ---- tracking ---------------------------------------------------------------------------------------------
    def start_tracking(self, hparams: dict, project: str = "dist_signmaml", first_step: int = 0):
        """Start the trackers: TensorBoard in OUT/tb, one event stream per run directory; wandb and MLflow under
        `project`, the run named after OUT (dist_signmaml/trackers.py). A resumed run purges the TensorBoard events a
        stopped or killed session logged after its checkpoint (SummaryWriter's purge_step), so no step appears
        twice. `hparams` go to wandb and MLflow as the run's parameters; TensorBoard gets them with the final metrics
        at the end (tb/final), since storing them at start adds an empty timestamped run. Tracker calls run on the
        main process only (Accelerate handles that)."""
        flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        settings = tracker_settings(self.trackers, self.out_dir, self.out_dir.resolve().name) if self.is_main else {}
        for tracker in self.accelerator.log_with:
            if isinstance(tracker, TensorBoardTracker) and first_step:
                tracker.init_kwargs["purge_step"] = first_step + 1
        self.accelerator.init_trackers(project, init_kwargs=settings)
        for tracker in self.accelerator.trackers:
            if tracker.name != "tensorboard":
                tracker.store_init_configuration(flat)

    def log(self, values: dict, step: int, *, except_tensorboard: bool = False):
        """Scalars to every tracker (main process only, as Accelerate does). `except_tensorboard`: to the others
        only, for values the caller writes to TensorBoard itself (with a description on their card)."""
        if not except_tensorboard:
            self.accelerator.log(values, step=step)
        elif self.is_main:
            for tracker in self.accelerator.trackers:
                if tracker.name != "tensorboard":
                    tracker.log(values, step=step)

    def tensorboard_writer(self):
        """The SummaryWriter behind the TensorBoard tracker (for text and images); None off the main process or
        when the run does not log to TensorBoard."""
        if not self.is_main:
            return None
        return next((t.tracker for t in self.accelerator.trackers if t.name == "tensorboard"), None)

    @names_lost_peers("gathering objects")
    def gather_objects(self, value) -> list:
        """`value` of every rank, in rank order, on every rank (picklable objects, over the CPU control group)."""
        if self._control is None:
            return [value]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value, group=self._control)
        return gathered

    def end(self):
        """Finish the trackers and destroy the process groups. A process that exits with a gloo group alive can
        abort in the interpreter's finalisation (gloo's worker threads still hold tensors): SIGABRT, exit -6, after
        a run that otherwise succeeded. Safe to call twice."""
        if self._ended:
            return
        self._ended = True
        self.accelerator.end_training()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc_info) -> None:
        self.end()

    # ---- checkpoint state and export ----------------------------------------------------------------------------
    @names_lost_peers("saving a checkpoint")
    def save_state(self, folder: Path) -> None:
        """Model, optimizer, LR scheduler and RNG states of every rank into `folder` (the checkpointer owns layout,
        atomicity and rotation)."""
        self.accelerator.save_state(str(folder), safe_serialization=True)

    @names_lost_peers("loading a checkpoint")
    def load_state(self, folder: Path) -> None:
        self.accelerator.load_state(str(folder))

    def export(self, learner, path: Path, metadata: dict):
        """The meta-initialisation (backbone weights, names without the learner's prefix) as safetensors, with
        `metadata` beside it. Every rank checks the weights are finite, so all raise together if not."""
        state = self.accelerator.get_state_dict(learner)
        bad = non_finite_tensors(state)
        if bad:
            raise NonFiniteError(f"refusing to export {path}: non-finite weights in {', '.join(bad[:5])}")
        if self.is_main:
            save_weights(path, state, metadata)
        self.wait()


def _is_communication_error(error: RuntimeError) -> bool:
    """Errors raised by a collective (torch.distributed's own types, or gloo's transport errors)."""
    if isinstance(error, PeerLostError):
        return False  # already diagnosed (nested contexts)
    return isinstance(error, dist.DistError) or "gloo" in str(error).lower()


def _reason(error: RuntimeError) -> str:
    text = str(error).lower()
    if "closed" in text or "reset" in text or "refused" in text or "broken pipe" in text:
        return "is gone (its connection closed: the process died)"
    if "timed out" in text or "timeout" in text:
        return "did not answer in time (hung, or blocked in the failed collective)"
    return f"failed ({str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__})"


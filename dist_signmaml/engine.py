"""The only module that touches Accelerate (and, through it, DeepSpeed): processes, prepare, backward, metric
reduction, trackers, checkpoints and export. Everything below it is single-device code."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from safetensors.torch import save_file

CHECKPOINT_DIR = "checkpoints"
TRAIN_STATE = "train_state.json"  # written last: a checkpoint without it is incomplete and ignored


class DistributedSetupError(RuntimeError):
    pass


class Engine:
    def __init__(self, out_dir: str | Path, seed: int, log_with: str | None = "tensorboard"):
        self.out_dir = Path(out_dir)
        # broadcast_buffers=False: the backbones keep no BatchNorm buffers, and torch.func calls must not see DDP
        # rewriting module state inside forward.
        self.accelerator = Accelerator(log_with=log_with, project_dir=str(self.out_dir),
                                       kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
        self._check_world()
        set_seed(seed)

    # ---- processes -------------------------------------------------------------------------------------------
    def _check_world(self):
        """Fail loudly when a launcher started several processes that each think they are alone (e.g. `accelerate
        launch --multi_gpu` on a CPU machine without ACCELERATE_USE_CPU=1): they would train without syncing."""
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != self.accelerator.num_processes:
            raise DistributedSetupError(
                f"the launcher started WORLD_SIZE={launched} processes but Accelerate formed a group of "
                f"{self.accelerator.num_processes}: ranks would not sync. On a CPU-only machine launch with "
                f"ACCELERATE_USE_CPU=1 (see README, 'Distributed').")

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

    def wait(self):
        self.accelerator.wait_for_everyone()

    # ---- the meta-step ------------------------------------------------------------------------------------------
    def prepare(self, learner: torch.nn.Module, optimizer: torch.optim.Optimizer):
        return self.accelerator.prepare(learner, optimizer)

    def backward(self, loss: torch.Tensor):
        """One backward of the meta-loss; under DDP this is where the meta-gradient is all-reduced (averaged)."""
        self.accelerator.backward(loss)

    def mean_over_ranks(self, values: dict[str, torch.Tensor | float]) -> dict[str, float]:
        keys = sorted(values)
        stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float32, device=self.device) for k in keys])
        reduced = self.accelerator.reduce(stacked, reduction="mean") if self.world_size > 1 else stacked
        return {k: float(v) for k, v in zip(keys, reduced.tolist())}

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(tensor.to(self.device))

    def unwrap(self, learner):
        return self.accelerator.unwrap_model(learner)

    # ---- tracking ---------------------------------------------------------------------------------------------
    def start_tracking(self, hparams: dict):
        """TensorBoard under OUT/tb; tracker calls run on the main process only (Accelerate handles that)."""
        flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        self.accelerator.init_trackers("tb", config=flat)

    def log(self, values: dict, step: int):
        self.accelerator.log(values, step=step)

    def tensorboard_writer(self):
        """The SummaryWriter behind the tracker (for text and images), or None off the main process."""
        if not self.is_main:
            return None
        return self.accelerator.get_tracker("tensorboard", unwrap=True)

    def end(self):
        self.accelerator.end_training()

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def save_checkpoint(self, step: int, state: dict, keep: int) -> Path:
        """Save model, optimizer and RNG states (Accelerate) plus `state` (JSON) to OUT/checkpoints/step_N."""
        path = self.out_dir / CHECKPOINT_DIR / f"step_{step:08d}"
        self.accelerator.save_state(str(path), safe_serialization=True)
        if self.is_main:
            (path / TRAIN_STATE).write_text(json.dumps({"step": step, **state}, indent=1, sort_keys=True))
            for old in completed_checkpoints(self.out_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.wait()
        return path

    def load_checkpoint(self, path: Path) -> dict:
        self.accelerator.load_state(str(path))
        return json.loads((path / TRAIN_STATE).read_text())

    def export(self, learner, path: Path, metadata: dict):
        """The meta-initialisation (backbone weights only) as safetensors, with the config in the metadata."""
        state = self.accelerator.get_state_dict(learner)
        if self.is_main:
            weights = {k.removeprefix("model."): v.detach().cpu().contiguous() for k, v in state.items()}
            save_file(weights, str(path), metadata={k: json.dumps(v) for k, v in metadata.items()})
        self.wait()


def completed_checkpoints(out_dir: str | Path) -> list[Path]:
    """Checkpoints whose train_state.json exists, oldest first."""
    root = Path(out_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / TRAIN_STATE).is_file())

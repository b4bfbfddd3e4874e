"""The run directory: every file name a run writes (defined here only), atomic writes, and the exported weights.

    OUT/
      config.json                 the resolved configuration (and the options as given); config.yaml the same
      manifest.json               hosts, versions, command line and status of every session
      run.lock                    PID and host of the live run (see checkpointer.RunLock)
      checkpoints/step_N/         Accelerate state + train_state.json (the completion marker, written last)
      tb/                         TensorBoard events (one run), tb/final: hparams with the final metrics
      model.safetensors           the final meta-initialisation
      model_best.safetensors      the best one by validation accuracy
      results.json, results.md    the run summary
      PREEMPTED                   while the newest checkpoint is a stop-on-signal one

Exported weights carry backbone tensor names (`conv1.weight`, `head.bias`) and the learner's own tensors (learned
step sizes) under theirs: algorithms.learner.to_export_names / to_learner_names is the one prefix rule, used here.
This module needs no torch at import time, so that `sweep` and `plot` can name the files without loading it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

CONFIG_JSON = "config.json"
CONFIG_YAML = "config.yaml"  # the same values, readable by `--config RUN/config.yaml` (config_files)
MANIFEST_JSON = "manifest.json"  # what ran where, per session (manifest)
PROFILE_DIR = "profile"  # torch.profiler traces of --profile_steps (profiling)
LOCK_FILE = "run.lock"
CHECKPOINT_DIR = "checkpoints"
TRAIN_STATE = "train_state.json"  # the completion marker of a checkpoint: written last, after every rank's files
TENSORBOARD_DIR = "tb"
FINAL_WEIGHTS = "model.safetensors"
BEST_WEIGHTS = "model_best.safetensors"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
PREEMPTED_MARKER = "PREEMPTED"
TRAIN_LOG = "train.log"  # a sweep run's output

# What a finished or resumable run leaves: a fresh run refuses a directory holding any of these (checkpointer).
RUN_OUTPUTS = (CHECKPOINT_DIR, FINAL_WEIGHTS, BEST_WEIGHTS, RESULTS_JSON)
# What --overwrite removes (never anything else in the directory).
ALL_RUN_FILES = (CONFIG_JSON, CONFIG_YAML, MANIFEST_JSON, CHECKPOINT_DIR, TENSORBOARD_DIR, PROFILE_DIR, FINAL_WEIGHTS,
                 BEST_WEIGHTS, RESULTS_JSON, RESULTS_MD, PREEMPTED_MARKER)


class WeightsFileError(ValueError):
    """An exported weights file that cannot be used: the message names the file and what is wrong."""


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write through a temporary file in the same directory, flushed to disk, then renamed: a reader (or a crash, or
    a full disk) sees the old file or the whole new one, never a partial one."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def export_names(learner_state: dict) -> dict:
    """A MetaLearner state dict under the names it is exported with (algorithms.learner.to_export_names: the one
    rule for the backbone's prefix)."""
    from dist_signmaml.algorithms.learner import to_export_names

    return to_export_names(learner_state)


def non_finite_tensors(tensors: dict) -> list[str]:
    """Names of tensors holding a NaN or an infinity."""
    import torch

    return [name for name, tensor in tensors.items()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def save_weights(path: str | Path, learner_state: dict, metadata: dict) -> None:
    """A learner state dict under its export names as safetensors, `metadata` (JSON-able) stored beside them; written
    atomically. Non-finite weights are refused: a NaN export would score as chance and look like a result."""
    from safetensors.torch import save

    weights = {k: v.detach().cpu().contiguous() for k, v in export_names(learner_state).items()}
    bad = non_finite_tensors(weights)
    if bad:
        raise FloatingPointError(f"refusing to write {path}: non-finite values in {', '.join(bad[:5])}")
    atomic_write_bytes(path, save(weights, metadata={k: json.dumps(v) for k, v in metadata.items()}))


def read_metadata(file: str | Path) -> dict:
    """The JSON metadata stored beside exported weights (config, image_shape, step, ...)."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            raw = handle.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for bytes that are not safetensors
        raise WeightsFileError(f"{str(file)!r} is not a readable safetensors file ({error})") from None
    try:
        metadata = {key: json.loads(value) for key, value in raw.items()}
    except ValueError as error:
        raise WeightsFileError(f"{str(file)!r}: its metadata is not JSON ({error})") from None
    if not isinstance(metadata.get("config"), dict):
        raise WeightsFileError(f"{str(file)!r} carries no training config in its metadata: only weights exported by "
                               f"dist_signmaml.train can be used here")
    return metadata


def load_learner_weights(file: str | Path) -> dict:
    """An exported file's tensors under the names MetaLearner.load_state_dict takes."""
    from safetensors.torch import load_file

    from dist_signmaml.algorithms.learner import to_learner_names

    try:
        tensors = load_file(str(file))
    except Exception as error:
        raise WeightsFileError(f"{str(file)!r} is not a readable safetensors file ({error})") from None
    return to_learner_names(tensors)

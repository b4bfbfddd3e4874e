"""Which experiment trackers a run logs to (`--log_with tensorboard,wandb,mlflow`) and where each keeps its files.

Every metric goes through the one tracker API of the engine (Accelerate's `log`), so each tracker receives the same
tags at the same steps. This module only names and checks the trackers and builds their settings; the engine
creates them. Where each one writes, by default:

    tensorboard  RUN/tb/                         (TensorBoard event files; also the images and the HPARAMS tab)
    wandb        RUN/wandb/                      (online, or offline with WANDB_MODE=offline; `wandb sync` later)
    mlflow       sqlite:///RUN/mlflow.db, artifacts in RUN/mlflow-artifacts/, unless MLFLOW_TRACKING_URI is set
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from dist_signmaml.artifacts import TENSORBOARD_DIR  # noqa: F401  (named once in artifacts)

TRACKERS = ("tensorboard", "wandb", "mlflow")
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlflow-artifacts"
INSTALL_HINT = "pip install 'dist_signmaml[trackers]'"


def normalize_log_with(value) -> str:
    """The canonical spelling of --log_with: names joined by commas. fire turns `--log_with tensorboard,wandb` into
    a tuple and a YAML file may give a list; both become 'tensorboard,wandb'."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(name).strip() for name in value)
    return value


def tracker_names(spec: str | None) -> list[str]:
    """The tracker names of a --log_with value, in order, without repeats ('' or None: no tracker)."""
    names: list[str] = []
    for name in (spec or "").split(","):
        name = name.strip().lower()
        if name and name not in names:
            names.append(name)
    return names


def check_log_with(spec) -> None:
    """Raise ValueError naming the flag, an unknown tracker, or a tracker whose package is not installed (Accelerate
    itself would only drop it with a debug message, and the run would log nowhere)."""
    if not isinstance(spec, str):
        raise ValueError(f"--log_with={spec!r} is invalid: expected comma-separated names from {', '.join(TRACKERS)}")
    for name in tracker_names(spec):
        if name not in TRACKERS:
            raise ValueError(f"--log_with={spec!r} is invalid: unknown tracker {name!r}; expected any of "
                             f"{', '.join(TRACKERS)}")
        if importlib.util.find_spec(name) is None:
            raise ValueError(f"--log_with={spec!r}: the {name} package is not installed ({INSTALL_HINT})")


def tracker_settings(names: list[str], out_dir: str | Path, run_name: str) -> dict:
    """Accelerate's `init_kwargs` for the non-TensorBoard trackers of a run in `out_dir`, named `run_name`.

    MLflow logs to a SQLite store inside the run directory unless MLFLOW_TRACKING_URI names another store (a server,
    or a shared database): a cluster job's working directory is often shared by many jobs. (MLflow 3 refuses its
    plain-file store unless MLFLOW_ALLOW_FILE_STORE=true; SQLite is its recommended local store.)
    """
    out_dir = Path(out_dir).resolve()
    settings: dict[str, dict] = {}
    if "wandb" in names:
        out_dir.mkdir(parents=True, exist_ok=True)  # wandb falls back to a temporary directory if `dir` is missing
        settings["wandb"] = {"name": run_name, "dir": str(out_dir)}
    if "mlflow" in names:
        settings["mlflow"] = {"run_name": run_name}
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            import mlflow

            out_dir.mkdir(parents=True, exist_ok=True)
            mlflow.set_tracking_uri(f"sqlite:///{out_dir / MLFLOW_DB}")
            settings["mlflow"]["logging_dir"] = str(out_dir / MLFLOW_ARTIFACTS)  # the experiment's artifact location
    return settings

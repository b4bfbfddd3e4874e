"""RUN/manifest.json: what ran where. The code (git commit and whether the checkout had uncommitted changes), the
package versions, CUDA/cuDNN/NCCL when present, every rank's host and device, the world size, the command lines and
the start and end times of the session, with the sessions before a resume kept under `previous_sessions`.

It is written by the main process when training starts (status 'running', no end time) and again when the session
ends ('completed', or 'stopped' by a signal), so a crashed run is recognisable by its 'running' status.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from dist_signmaml.artifacts import MANIFEST_JSON

PACKAGES = ("dist_signmaml", "torch", "torchvision", "accelerate", "deepspeed", "webdataset", "numpy")
SCHEDULER_VARIABLES = ("SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_NNODES", "SLURM_JOB_NODELIST", "SLURM_ARRAY_TASK_ID")
SOURCE_ROOT = Path(__file__).resolve().parents[1]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def package_versions(names=PACKAGES) -> dict[str, str | None]:
    """Installed distribution versions (None: not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state(root: Path = SOURCE_ROOT) -> dict:
    """The commit of the checkout the code was imported from and whether tracked files differ from it (untracked
    files, such as runs/ or data/, do not count). commit None: not a git checkout (e.g. an installed wheel)."""
    def git(*args) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None, "root": str(root)}
    return {"commit": commit, "dirty": dirty, "root": str(root)}


def cuda_versions() -> dict:
    """The CUDA toolkit torch was built with, and cuDNN/NCCL versions when a GPU is usable."""
    info = {"cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "cudnn": None,
            "nccl": None}
    if torch.cuda.is_available():
        info["cudnn"] = torch.backends.cudnn.version()
        try:
            version = torch.cuda.nccl.version()
            info["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        except (AttributeError, RuntimeError):
            pass
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def rank_record(rank: int, device: torch.device) -> dict:
    """This process: rank, host, pid, device and its name (gathered from every rank into the manifest)."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"rank": int(rank), "local_rank": int(os.environ.get("LOCAL_RANK", 0)), "host": socket.gethostname(),
            "pid": os.getpid(), "device": str(device), "device_name": name}


def launcher_command() -> str | None:
    """The command line of the launcher that started this process (e.g. `accelerate launch ...` or torchrun), read
    from the parent process; None when the process was not started by a distributed launcher."""
    if "LOCAL_RANK" not in os.environ:
        return None
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    return shlex.join(part.decode(errors="replace") for part in raw.split(b"\0") if part) or None


def session_record(ranks: list[dict], world_size: int) -> dict:
    return {"status": "running", "start_time": now(), "end_time": None,
            "command": shlex.join(getattr(sys, "orig_argv", sys.argv)), "launcher_command": launcher_command(),
            "cwd": os.getcwd(), "world_size": int(world_size),
            "hosts": sorted({r["host"] for r in ranks}), "ranks": ranks,
            "git": git_state(), "packages": package_versions(), "cuda": cuda_versions(),
            "scheduler": {k: os.environ[k] for k in SCHEDULER_VARIABLES if k in os.environ}}


class RunManifest:
    """The manifest of one training session in `out_dir`; only the main process writes it."""

    def __init__(self, out_dir: str | Path, record: dict, is_main: bool):
        self.path = Path(out_dir) / MANIFEST_JSON
        self.record, self.is_main = record, is_main
        self.previous: list[dict] = []
        if is_main and self.path.is_file():  # a resumed (or repeated) run: keep what ran before
            try:
                old = json.loads(self.path.read_text())
                self.previous = old.pop("previous_sessions", []) + [old]
            except (OSError, ValueError):
                self.previous = []

    @classmethod
    def start(cls, out_dir: str | Path, engine) -> "RunManifest":
        """Gather every rank's host and device (a collective: call on all ranks) and write the manifest."""
        ranks = engine.gather_objects(rank_record(engine.rank, engine.device))
        manifest = cls(out_dir, session_record(ranks, engine.world_size), engine.is_main)
        manifest._write()
        return manifest

    def finish(self, status: str = "completed") -> None:
        self.record |= {"status": status, "end_time": now()}
        self._write()

    def _write(self) -> None:
        if not self.is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        document = self.record | {"previous_sessions": self.previous}
        temporary = self.path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(document, indent=1) + "\n")
        temporary.replace(self.path)  # a reader never sees half a manifest

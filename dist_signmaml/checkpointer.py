"""The run directory's owner: one run per directory, checkpoints on their own cadence, written atomically and
verified on load, resume that checks its config, and save-on-signal. docs/run_lifecycle.md states the guarantees.

A checkpoint is written by every rank into `checkpoints/.step_N.partial/` (Accelerate's model, optimizer, scheduler
and RNG files). After a barrier the main process records every file's size and sha256 in the completion marker
`train_state.json` (temp file + rename, flushed), then renames the folder to `step_N/`. A crash at any point leaves
either a complete, verifiable `step_N/` or a `.partial` folder that the next start removes; a checkpoint is only
ever read back after its files match the marker, and a damaged one falls back to the newest good one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path

from dist_signmaml.artifacts import (ALL_RUN_FILES, CHECKPOINT_DIR, LOCK_FILE, PREEMPTED_MARKER,
                                     RUN_OUTPUTS, TENSORBOARD_DIR, TRAIN_STATE, atomic_write_text)
from dist_signmaml.config import ConfigError, TrainConfig
from dist_signmaml.preemption import GracefulStop

PARTIAL_SUFFIX = ".partial"


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


# ---- the directory and its lock -----------------------------------------------------------------------------

def check_out_dir(out: str) -> Path:
    """--out must be (or become) a writable directory: refused in one line before any work."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out={out!r} is a file: expected a run directory (created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--out={out!r}: cannot create the run directory ({error.strerror or error})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"--out={out!r}: the run directory is not writable")
    return path


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of a process (clock ticks since boot), which tells a reused PID from the original."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class RunLock:
    """OUT/run.lock: {pid, host, started, process start time, SLURM job} of the live run, created exclusively.

    A lock is stale when its process is gone on this host (or the PID now belongs to another process), or when it was
    left by an earlier incarnation of this same SLURM job (a requeue lands on any node). A live lock on another host
    cannot be checked from here: the message says so and names the file to remove if that run is dead.
    """

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / LOCK_FILE
        self.mine: dict | None = None

    @staticmethod
    def _identity() -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "process_start": process_start_time(os.getpid()), "slurm_job": os.environ.get("SLURM_JOB_ID", "")}

    def stale_reason(self, holder: dict) -> str | None:
        if holder.get("host") == socket.gethostname():
            pid = holder.get("pid")
            if not isinstance(pid, int) or process_start_time(pid) is None:
                return f"process {pid} is gone"
            if holder.get("process_start") and process_start_time(pid) != holder["process_start"]:
                return f"PID {pid} now belongs to another process"
            return None
        if holder.get("slurm_job") and holder["slurm_job"] == os.environ.get("SLURM_JOB_ID"):
            return f"it was left by an earlier run of this SLURM job {holder['slurm_job']}"
        return None

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a stale one was replaced. Raises ConfigError when a live run holds it."""
        note = None
        for _ in range(2):
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read_holder()
                if holder is None:  # being written this very moment by another starting run
                    raise ConfigError(f"--out={str(self.path.parent)!r}: another run is starting there "
                                      f"({self.path} is being written); choose another --out") from None
                reason = self.stale_reason(holder)
                if reason is None:
                    raise ConfigError(
                        f"--out={str(self.path.parent)!r} is in use by another run (PID {holder.get('pid')} on host "
                        f"{holder.get('host')}, started {holder.get('started')}): wait for it, choose another --out, "
                        f"or delete {self.path} if that run is dead") from None
                note = f"removed a stale lock {self.path} ({reason})"
                self.path.unlink(missing_ok=True)
                continue
            self.mine = self._identity()
            with os.fdopen(handle, "w") as file:
                file.write(json.dumps(self.mine) + "\n")
            return note
        raise ConfigError(f"--out={str(self.path.parent)!r}: could not take {self.path} (another run raced for it)")

    def _read_holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            try:  # an empty or garbled lock older than a few seconds is not being written: treat it as a dead run's
                return {} if time.time() - self.path.stat().st_mtime > 5 else None
            except OSError:
                return {}

    def release(self) -> None:
        if self.mine is not None and self._read_holder() == self.mine:
            self.path.unlink(missing_ok=True)
        self.mine = None


# ---- checkpoint files -----------------------------------------------------------------------------------------

def file_manifest(folder: Path) -> dict[str, dict]:
    """name -> {bytes, sha256} of every file in a checkpoint folder (the marker excepted)."""
    manifest = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != TRAIN_STATE):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        manifest[str(path.relative_to(folder))] = {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}
    return manifest


def fsync_tree(folder: Path) -> None:
    for path in [*folder.rglob("*"), folder]:
        with contextlib.suppress(OSError):
            handle = os.open(path, os.O_RDONLY)
            try:
                os.fsync(handle)
            finally:
                os.close(handle)


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("_")[1])


def completed_checkpoints(out_dir: str | Path) -> list[Path]:
    """Checkpoint folders with a completion marker, oldest first (not yet verified: see verify_checkpoint)."""
    root = Path(out_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step_*") if (p / TRAIN_STATE).is_file()), key=checkpoint_step)


def verify_checkpoint(path: Path) -> tuple[dict | None, str]:
    """(marker, '') for a checkpoint whose files match its marker; (None, what is wrong) otherwise."""
    try:
        marker = json.loads((path / TRAIN_STATE).read_text())
        if not isinstance(marker, dict) or not isinstance(marker.get("step"), int):
            raise ValueError("no step")
    except (OSError, ValueError) as error:
        return None, f"{TRAIN_STATE} is unreadable ({type(error).__name__})"
    for name, expected in marker.get("files", {}).items():
        file = path / name
        if not file.is_file():
            return None, f"{name} is missing"
        if file.stat().st_size != expected["bytes"]:
            return None, f"{name} has {file.stat().st_size} bytes, the marker says {expected['bytes']}"
    manifest = file_manifest(path)
    for name, expected in marker.get("files", {}).items():
        if manifest[name]["sha256"] != expected["sha256"]:
            return None, f"{name}'s sha256 differs from the marker's"
    return marker, ""


# ---- the component ----------------------------------------------------------------------------------------------

class Checkpointer:
    """Owns OUT for one run: `claim()` before any work, `restore()` after prepare, `register()` the components whose
    state a checkpoint carries, `after_step(step)` at every step boundary (cadence, end of run and stop signals)."""

    def __init__(self, engine, config: TrainConfig):
        self.engine, self.config = engine, config
        self.out = Path(config.out)
        self.every, self.keep, self.last_step = config.ckpt_every, config.keep_checkpoints, config.steps
        self.lock = RunLock(self.out)
        self.resume_from: Path | None = None
        self.marker: dict | None = None
        self.components: dict = {}
        self.stop: GracefulStop | None = None
        self._on_stop: list = []

    # -- before any work
    def claim(self) -> int:
        """Check --out, take the lock, decide fresh start or resume (checking the saved config), clean leftovers.
        The main process decides and every rank gets its verdict, so all raise the same error. Returns the step the
        run starts after (0 for a fresh run)."""
        verdict = None
        if self.engine.is_main:
            try:
                verdict = {"resume_from": self._decide()}
            except ConfigError as error:
                verdict = {"error": str(error)}
        verdict = self.engine.broadcast_from_main(verdict)
        if "error" in verdict:
            self.lock.release()
            raise ConfigError(verdict["error"])
        self.resume_from = Path(verdict["resume_from"]) if verdict["resume_from"] else None
        self.marker = json.loads((self.resume_from / TRAIN_STATE).read_text()) if self.resume_from else None
        self.stop = GracefulStop(self.engine.any_rank)
        return self.marker["step"] if self.marker else 0

    def _decide(self) -> str | None:
        check_out_dir(self.config.out)
        note = self.lock.acquire()
        if note:
            warn(note)
        try:
            self._remove_partial_checkpoints()
            if self.config.resume:
                good = self._newest_good_checkpoint()
                if good is not None:
                    self._check_resume_config(good)
                    print(f"--resume: continuing from {good}", flush=True)
                    return str(good)
                if self.config.resume == "must":
                    raise ConfigError(f"--resume must: {self.out} holds no complete checkpoint to resume from "
                                      f"(wrong --out?)")
                print(f"--resume: {self.out} holds no checkpoint yet; starting from step 0", flush=True)
            self._claim_fresh()
            return None
        except BaseException:
            self.lock.release()
            raise

    def _remove_partial_checkpoints(self) -> None:
        root = self.out / CHECKPOINT_DIR
        if not root.is_dir():
            return
        for folder in sorted(root.iterdir()):
            if folder.is_dir() and (folder.name.startswith(".") or not (folder / TRAIN_STATE).is_file()):
                warn(f"removing the half-written checkpoint {folder}")
                shutil.rmtree(folder, ignore_errors=True)

    def _newest_good_checkpoint(self) -> Path | None:
        for path in reversed(completed_checkpoints(self.out)):
            marker, problem = verify_checkpoint(path)
            if marker is not None:
                return path
            warn(f"checkpoint {path} is damaged ({problem}); trying the one before it")
        return None

    def _check_resume_config(self, checkpoint: Path) -> None:
        state = json.loads((checkpoint / TRAIN_STATE).read_text())
        saved = state.get("config")
        if saved is None:
            return  # written before configs were recorded in checkpoints
        differences = self.config.resume_differences(saved, state.get("step"))
        if differences:
            raise ConfigError(f"--resume: {checkpoint} was trained with other options ({'; '.join(differences)}); "
                              f"these change the model or the algorithm, so resume with the original values or start "
                              f"another --out (docs/run_lifecycle.md lists the options that may change)")

    def _claim_fresh(self) -> None:
        """A fresh run owns the directory: another run's checkpoints or outputs are refused unless --overwrite."""
        found = [name for name in RUN_OUTPUTS if (self.out / name).exists()]
        steps = [checkpoint_step(p) for p in sorted((self.out / CHECKPOINT_DIR).glob("step_*"))] \
            if (self.out / CHECKPOINT_DIR).is_dir() else []
        if CHECKPOINT_DIR in found and not steps:
            found.remove(CHECKPOINT_DIR)
        if found and not self.config.overwrite:
            what = ", ".join((f"checkpoints of steps {', '.join(map(str, steps))}" if name == CHECKPOINT_DIR else name)
                             for name in found)
            raise ConfigError(f"--out={self.config.out!r} holds another run ({what}): continue it with --resume, "
                              f"replace it with --overwrite, or choose another --out")
        removed = [name for name in ALL_RUN_FILES if (self.out / name).exists()]
        if found and removed:
            print(f"--overwrite: removed the earlier run's {', '.join(removed)} from {self.out}", flush=True)
        elif (self.out / TENSORBOARD_DIR).exists():  # events of a run that never checkpointed: one run per directory
            print(f"removing {self.out / TENSORBOARD_DIR} of an earlier run that wrote no checkpoint", flush=True)
        for name in removed:
            target = self.out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()

    # -- after prepare
    def restore(self) -> dict | None:
        """Load the chosen checkpoint into the prepared objects (all ranks); returns its marker, or None."""
        if self.resume_from is None:
            return None
        self.engine.load_state(self.resume_from)
        self.engine.print0(f"resumed from step {self.marker['step']}")
        if self.engine.is_main:
            (self.out / PREEMPTED_MARKER).unlink(missing_ok=True)  # a resumed run is no longer a stopped one
        return self.marker

    def register(self, **components) -> None:
        """Components whose `state_dict(step)` a checkpoint carries. On resume a component either restores itself
        (`load_state_dict`), or was rebuilt at the resumed position and says how it differs from the saved one
        (`resume_differences`, e.g. the episode stream relaunched on more ranks)."""
        self.components.update(components)
        if self.marker is None:
            return
        for name, component in components.items():
            saved = self.marker.get(name)
            if hasattr(component, "load_state_dict"):
                component.load_state_dict(saved)
            elif saved is not None and component.resume_differences(saved) and self.engine.is_main:
                warn(f"the {name} differs from the checkpoint's, so the resumed run sees other episodes than an "
                     f"uninterrupted one: {'; '.join(component.resume_differences(saved))}")

    def on_stop(self, *callbacks) -> None:
        """Run these (e.g. close the profiler, mark the manifest stopped) after a stop-on-signal checkpoint, before
        the process exits for a requeue."""
        self._on_stop.extend(callbacks)

    # -- at every step boundary
    def after_step(self, step: int) -> None:
        """Save on the cadence and at the last step; on a stop signal (any rank) save this step and exit for a
        requeue. The stop vote is a collective: every rank calls this at every step."""
        if self.stop.requested() and step != self.last_step:
            self.save(step, stopped_by=self.stop.reason)
            self.engine.end()
            for callback in self._on_stop:
                callback()
            self.close()
            self.stop.exit(self.out, step, self.engine.is_main)
        if step % self.every == 0 or step == self.last_step:
            self.save(step)

    def save(self, step: int, **extra) -> Path:
        final = self.out / CHECKPOINT_DIR / f"step_{step:08d}"
        partial = final.with_name(f".{final.name}{PARTIAL_SUFFIX}")
        if self.engine.is_main:
            shutil.rmtree(partial, ignore_errors=True)
        self.engine.wait()
        self.engine.save_state(partial)  # every rank writes its files; Accelerate creates the folder
        self.engine.wait()  # all ranks' files are complete before the marker exists
        if self.engine.is_main:
            fsync_tree(partial)
            state = {"step": step, "config": asdict(self.config), "files": file_manifest(partial),
                     "episode_batches_consumed": step, **extra}
            state |= {name: component.state_dict(step) for name, component in self.components.items()}
            atomic_write_text(partial / TRAIN_STATE, json.dumps(state, indent=1, sort_keys=True))
            replaced = final.with_name(f".{final.name}.replaced")
            if final.exists():
                os.replace(final, replaced)
            os.replace(partial, final)
            fsync_tree(final.parent)
            shutil.rmtree(replaced, ignore_errors=True)
            for old in completed_checkpoints(self.out)[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.engine.wait()
        return final

    def close(self) -> None:
        if self.stop is not None:
            self.stop.close()
        self.lock.release()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


"""Helpers for the tests that start real multi-process runs (imported by tests/test_distributed*.py and friends).

Every launch goes through `python -m accelerate.commands.launch` of the running interpreter, so the tests use the
same environment as pytest; children get one BLAS thread each (two ranks share two cores).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from dist_signmaml.config import REPO_ROOT

SCRIPTS = Path(__file__).resolve().parent
LAUNCH = REPO_ROOT / "launch"
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
TRAIN = ["-m", "dist_signmaml.train"]
# A tiny run: what these tests check is process arithmetic, not accuracy.
TINY_TRAIN = ["--ways", "3", "--shots", "1", "--queries", "1", "--hidden", "16", "--meta_batch", "2",
              "--eval_episodes", "0", "--test_episodes", "0", "--log_every", "1"]


def child_env(cpu_ddp: bool = True, **extra) -> dict:
    """Environment of launched runs: repo importable, 1 thread per process, gloo DDP on CPU when `cpu_ddp`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env.pop("ACCELERATE_USE_CPU", None)
    if cpu_ddp:
        env["ACCELERATE_USE_CPU"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def two_cpu_ranks(*args) -> list[str]:
    """`accelerate launch` with the 2-process CPU preset (needs child_env(cpu_ddp=True))."""
    return ACCELERATE + ["--config_file", str(LAUNCH / "cpu_2proc.yaml"), "--main_process_port", str(free_port()),
                         *map(str, args)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(command, env, timeout: float, cwd=REPO_ROOT) -> subprocess.CompletedProcess:
    """Run to completion in its own session; on timeout the whole process tree is killed."""
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(process.pid)
        output, _ = process.communicate()
        raise AssertionError(f"{' '.join(map(str, command))} did not finish in {timeout} s; output tail:\n"
                             f"{output[-4000:]}") from None
    return subprocess.CompletedProcess(command, process.returncode, output, None)


def start(command, env, log: Path, cwd=REPO_ROOT) -> subprocess.Popen:
    """Start in the background (own session), output to `log`."""
    return subprocess.Popen(command, env=env, cwd=cwd, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def descendants(pid: int) -> list[int]:
    """All live descendants of `pid` (torchrun starts its workers in sessions of their own, so killpg misses them)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, frontier = [], [pid]
    while frontier:
        kids = children.get(frontier.pop(), [])
        found += kids
        frontier += kids
    return found


def worker_pids(launcher_pid: int, script_marker: str = "dist_signmaml.train") -> list[int]:
    """The training processes under a launcher, rank order (torchrun starts local rank 0 first)."""
    pids = []
    for pid in descendants(launcher_pid):
        try:
            if script_marker in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                pids.append(pid)
        except OSError:
            pass
    return sorted(pids)


def kill_tree(pid: int, sig=signal.SIGKILL) -> None:
    for target in [pid] + descendants(pid):
        try:
            os.kill(target, sig)
        except ProcessLookupError:
            pass


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05, process=None):
    """Poll `predicate` until it returns something truthy; fail naming `what` (and the log if a process died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if process is not None and process.poll() is not None:
            value = predicate()
            if value:
                return value
            raise AssertionError(f"the process exited with {process.returncode} before {what}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints (train_state.json written) in a run directory."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name.split("_")[1]) for p in root.glob("step_*") if (p / "train_state.json").is_file())


def logged_losses(run_dir: Path, tag: str = "train/loss") -> dict[int, float]:
    """step -> value of `tag` over all event files of a run, oldest file first, so a resumed run's values replace
    those a killed run logged for the same steps."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    values: dict[int, float] = {}
    def started(path: Path):  # events.out.tfevents.<unix time>.<host>...: creation second, then last write
        return int(path.name.split(".")[3]), path.stat().st_mtime

    for events in sorted(Path(run_dir).rglob("events.out.tfevents.*"), key=started):
        for event in EventFileLoader(str(events)).Load():
            for value in event.summary.value:
                if value.tag == tag:
                    values[event.step] = float(tensor_util.make_ndarray(value.tensor)) if value.HasField("tensor") \
                        else float(value.simple_value)
    return values

"""The run lifecycle under real launches: SIGUSR1 to a plain `accelerate launch`, Ctrl-C (to a single process and to
the launcher), the world-size default meta-batch on 3 CPU processes, and errors printed once, not once per rank."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from dist_signmaml.artifacts import PREEMPTED_MARKER
from dist_signmaml.preemption import REQUEUE_EXIT_CODE
from tests.conftest import PYTHON
from tests.dist_scripts.launching import (ACCELERATE, TRAIN, checkpoint_steps, child_env, free_port, kill_tree, run,
                                          start, two_cpu_ranks, wait_for, worker_pids)
from tests.shard_fixtures import write_identifiable_split

pytestmark = pytest.mark.integration
TINY = ["--ways", 3, "--shots", 1, "--queries", 1, "--hidden", 16, "--eval_episodes", 0, "--test_episodes", 0,
        "--log_every", 1, "--window_shards", 16]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("launch_data")
    write_identifiable_split(root / "train", n_classes=36, images_per_class=4, shard_mb=0.004, size=16)
    return root


def long_run(out: Path, data: Path, *extra) -> list[str]:
    return [str(a) for a in (*TRAIN, *TINY, "--steps", 100000, "--ckpt_every", 1000, "--data", data, "--out", out,
                             *extra)]


def alive(pid: int) -> bool:
    """Running, not merely a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def started_training(out: Path):
    return (out / "tb").is_dir() and list((out / "tb").glob("events.out.tfevents.*"))


def test_sigusr1_to_a_plain_accelerate_launch_checkpoints_and_leaves_no_worker(tmp_path, data):
    """SIGUSR1 kills the launcher (it has no handler); its workers get SIGTERM from the kernel (PR_SET_PDEATHSIG),
    checkpoint the same step, write the marker and exit. Before, they kept training as orphans and never saved."""
    out = tmp_path / "run"
    launcher = start(two_cpu_ranks(*long_run(out, data, "--meta_batch", 2)), child_env(), tmp_path / "run.log")
    try:
        wait_for(lambda: started_training(out) and len(worker_pids(launcher.pid)) == 2, 240, "training",
                 process=launcher)
        workers = worker_pids(launcher.pid)
        os.kill(launcher.pid, signal.SIGUSR1)
        launcher.wait(timeout=60)
        wait_for(lambda: not any(alive(w) for w in workers), 120, "both workers to exit")
    finally:
        kill_tree(launcher.pid)
    log = (tmp_path / "run.log").read_text()
    marker = json.loads((out / PREEMPTED_MARKER).read_text())
    assert marker["signal"] in ("SIGTERM", "a stop signal on another rank"), marker
    assert checkpoint_steps(out) == [marker["step"]], log[-3000:]
    saved = {p.name for p in (out / "checkpoints" / f"step_{marker['step']:08d}").iterdir()}
    assert {"random_states_0.pkl", "random_states_1.pkl", "train_state.json"} <= saved, saved
    assert log.count("checkpoint written, exiting with 75") == 2, log[-3000:]


def test_ctrl_c_checkpoints_at_the_step_boundary_then_a_resume_continues(tmp_path, data):
    """A first SIGINT to a single process behaves like SIGTERM (checkpoint, marker, exit 75) with one line and no
    KeyboardInterrupt traceback; the run then resumes from that step."""
    out = tmp_path / "run"
    process = start([PYTHON, *long_run(out, data, "--meta_batch", 2)], child_env(cpu_ddp=False), tmp_path / "a.log")
    try:
        wait_for(lambda: started_training(out), 240, "training", process=process)
        os.kill(process.pid, signal.SIGINT)
        assert process.wait(timeout=120) == REQUEUE_EXIT_CODE
    finally:
        kill_tree(process.pid)
    log = (tmp_path / "a.log").read_text()
    assert "KeyboardInterrupt" not in log and "Traceback" not in log, log[-3000:]
    assert log.count("Ctrl-C: checkpointing at the end of this meta-step") == 1, log[-3000:]
    stopped = json.loads((out / PREEMPTED_MARKER).read_text())
    assert stopped["signal"] == "SIGINT" and checkpoint_steps(out) == [stopped["step"]]

    resumed = run([PYTHON, *map(str, (*TRAIN, *TINY, "--meta_batch", 2, "--steps", stopped["step"] + 2, "--data", data,
                                      "--out", out, "--resume", "must"))], child_env(cpu_ddp=False), timeout=240)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    step_dir = out / "checkpoints" / f"step_{stopped['step']:08d}"
    assert f"--resume: continuing from {step_dir}" in resumed.stdout
    assert f"resumed from step {stopped['step']}" in resumed.stdout
    assert not (out / PREEMPTED_MARKER).exists()


def test_ctrl_c_to_the_launcher_checkpoints_every_rank_and_prints_one_line(tmp_path, data):
    out = tmp_path / "run"
    launcher = start(two_cpu_ranks(*long_run(out, data, "--meta_batch", 2)), child_env(), tmp_path / "run.log")
    try:
        wait_for(lambda: started_training(out) and len(worker_pids(launcher.pid)) == 2, 240, "training",
                 process=launcher)
        os.kill(launcher.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the launcher; it forwards it once
        launcher.wait(timeout=120)
    finally:
        kill_tree(launcher.pid)
    log = (tmp_path / "run.log").read_text()
    marker = json.loads((out / PREEMPTED_MARKER).read_text())
    assert marker["signal"] == "SIGINT" and checkpoint_steps(out) == [marker["step"]], log[-3000:]
    assert log.count("Ctrl-C: checkpointing") == 1 and "KeyboardInterrupt" not in log, log[-3000:]


def three_cpu_ranks(*args) -> list[str]:
    return ACCELERATE + ["--multi_gpu", "--num_processes", "3", "--num_machines", "1", "--mixed_precision", "no",
                         "--dynamo_backend", "no", "--main_process_port", str(free_port()), *map(str, args)]


def test_the_default_meta_batch_follows_the_world_size_and_errors_print_once(tmp_path, data):
    """3 processes and no --meta_batch: 6 tasks (the paper's 4 rounded up to a multiple of 3), printed and recorded.
    An explicit --meta_batch 4 keeps the divisibility check, and its error is printed once, not once per rank."""
    out = tmp_path / "run"
    result = run(three_cpu_ranks(*TRAIN, *TINY, "--steps", 2, "--data", data, "--out", out), child_env(), timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "--meta_batch 6 (2 task(s) on each of 3 process(es); give --meta_batch to choose)" in result.stdout
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["meta_batch"] == 6 and recorded["given"]["meta_batch"] == 0
    assert recorded["resolved"]["world_size"] == 3

    explicit = run(three_cpu_ranks(*TRAIN, *TINY, "--steps", 2, "--meta_batch", 4, "--data", data,
                                   "--out", tmp_path / "explicit"), child_env(), timeout=300)
    assert explicit.returncode != 0
    assert explicit.stdout.count("error: --meta_batch=4 is not divisible by the 3 processes; use a multiple of 3") == 1, \
        explicit.stdout[-3000:]

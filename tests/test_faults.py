"""Faults on 2 real CPU ranks: a stop signal, kill -9 of the whole job, a rank that dies, a rank that hangs."""

from __future__ import annotations

import json
import os
import re
import signal
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from dist_signmaml.engine import Engine, PeerLostError
from dist_signmaml.preemption import PREEMPTED_MARKER, REQUEUE_EXIT_CODE
from tests.dist_scripts.launching import (TINY_TRAIN, TRAIN, checkpoint_steps, child_env, kill_tree, logged_losses,
                                          run, start, two_cpu_ranks, wait_for, worker_pids)

pytestmark = pytest.mark.slow
STEPS = 40


def training(out, *extra):
    return two_cpu_ranks(*TRAIN, *TINY_TRAIN, "--steps", STEPS, "--ckpt_every", 5, "--out", out, *extra)


def test_stop_signal_then_kill_9_then_resume_reproduce_the_uninterrupted_run(tmp_path, omniglot_root):
    """One run goes straight through. The other gets SIGTERM on one worker only (both ranks must checkpoint the same
    step and exit 75, leaving the PREEMPTED marker), is resumed, is killed with SIGKILL as a whole mid-run, and is
    resumed again. Every loss it logged and its final weights equal the straight run's bit for bit (CPU, gloo)."""
    data = ["--data", str(omniglot_root)]
    env = child_env()
    straight = start(training(tmp_path / "straight", *data), env, tmp_path / "straight.log")
    interrupted = tmp_path / "interrupted"

    # 1. SIGTERM to one worker after the first checkpoint
    first = start(training(interrupted, *data), env, tmp_path / "first.log")
    wait_for(lambda: 5 in checkpoint_steps(interrupted), 240, "the step-5 checkpoint", process=first)
    workers = wait_for(lambda: worker_pids(first.pid), 10, "the two workers")
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGTERM)
    first.wait(timeout=120)
    log = (tmp_path / "first.log").read_text()
    marker = json.loads((interrupted / PREEMPTED_MARKER).read_text())
    stopped_at = marker["step"]
    assert marker["exit_code"] == REQUEUE_EXIT_CODE == 75 and marker["signal"] in ("SIGTERM", "a stop signal on another rank")
    assert f"exitcode  : {REQUEUE_EXIT_CODE}" in log, log[-3000:]
    assert checkpoint_steps(interrupted)[-1] == stopped_at < STEPS
    state = json.loads((interrupted / "checkpoints" / f"step_{stopped_at:08d}" / "train_state.json").read_text())
    assert state["stopped_by"] == marker["signal"]
    saved = {p.name for p in (interrupted / "checkpoints" / f"step_{stopped_at:08d}").iterdir()}
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= saved, saved  # both ranks saved this same step
    assert log.count("stopping at step") == 2 and f"stopping at step {stopped_at} on" in log, log[-3000:]
    assert json.loads((interrupted / "manifest.json").read_text())["status"] == "stopped"

    # 2. resume, then SIGKILL everything once a newer checkpoint exists
    second = start(training(interrupted, *data, "--resume"), env, tmp_path / "second.log")
    killed_after = wait_for(lambda: [s for s in checkpoint_steps(interrupted) if s > stopped_at], 240,
                            "a checkpoint after the resume", interval=0.02, process=second)[0]
    kill_tree(second.pid)
    second.wait(timeout=30)
    assert not (interrupted / PREEMPTED_MARKER).exists(), "a resumed run must clear the marker"
    assert not (interrupted / "model.safetensors").exists(), "the run finished before it could be killed"
    last_checkpoint = checkpoint_steps(interrupted)[-1]
    assert killed_after <= last_checkpoint < STEPS
    assert json.loads((interrupted / "manifest.json").read_text())["status"] == "running", "a killed run says so"

    # 3. resume to the end
    third = run(training(interrupted, *data, "--resume"), env, timeout=240)
    assert third.returncode == 0, third.stdout[-4000:]
    assert f"resumed from step {last_checkpoint}" in third.stdout
    manifest = json.loads((interrupted / "manifest.json").read_text())
    assert [m["status"] for m in manifest["previous_sessions"] + [manifest]] == ["stopped", "running", "completed"]

    assert straight.wait(timeout=240) == 0, (tmp_path / "straight.log").read_text()[-4000:]
    expected, got = logged_losses(tmp_path / "straight"), logged_losses(interrupted)
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert set(range(1, stopped_at + 1)) | set(range(last_checkpoint + 1, STEPS + 1)) <= set(got), sorted(got)
    assert {step: got[step] for step in got} == {step: expected[step] for step in got}  # bit-exact, every step
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(interrupted / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a)


def start_long_run(tmp_path, omniglot_root, *extra):
    out = tmp_path / "run"
    launcher = start(two_cpu_ranks(*TRAIN, *TINY_TRAIN, "--steps", 100000, "--ckpt_every", 2, "--out", out,
                                   "--data", omniglot_root, *extra), child_env(), tmp_path / "run.log")
    wait_for(lambda: checkpoint_steps(out), 240, "the first checkpoint", process=launcher)
    workers = worker_pids(launcher.pid)
    assert len(workers) == 2, workers
    return launcher, workers


def test_a_rank_that_dies_makes_the_other_fail_fast_naming_it(tmp_path, omniglot_root):
    """The survivor does not wait out the collective timeout (300 s here): its error says it failed on a closed
    connection, and the launcher has exited by then."""
    launcher, (rank0, rank1) = start_long_run(tmp_path, omniglot_root)
    try:
        kill_tree(rank1)
        launcher.wait(timeout=120)
    finally:
        kill_tree(launcher.pid)
    log = (tmp_path / "run.log").read_text()
    assert "PeerLostError: rank 0:" in log and "rank 1 is gone (its connection closed: the process died)" in log, \
        log[-4000:]
    assert "did not answer in time" not in log, log[-4000:]


@pytest.mark.unit
def test_a_lost_peer_is_reported_when_diagnosed_before_the_launchers_sigterm_can_silence_it(capsys):
    """torchrun's agent SIGTERMs the survivors a fraction of a second after a rank dies. The error must be on stderr
    before the training loop unwinds (and gives SIGTERM its default, silent action back), not left to the caller."""
    surviving_rank = SimpleNamespace(rank=0, _control=object(),
                                     _ping_peers=lambda: "rank 1 is gone (its connection closed: the process died)")
    with pytest.raises(PeerLostError) as raised:
        with Engine.naming_lost_peers(surviving_rank, "the meta-gradient all-reduce"):
            try:
                raise RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4242")
            finally:
                assert capsys.readouterr().err == "", "nothing said before the collective failed"
    said = capsys.readouterr().err
    assert said == f"PeerLostError: {raised.value}\n"
    assert said.startswith("PeerLostError: rank 0: the meta-gradient all-reduce failed after ")
    assert "because rank 1 is gone (its connection closed: the process died). Original error: [gloo/" in said


def test_a_rank_that_hangs_makes_the_other_fail_after_the_timeout_naming_it(tmp_path, omniglot_root):
    """SIGSTOP leaves rank 1's sockets open, as a hung process or a silent network would: rank 0 waits out the
    process-group timeout (--dist_timeout 4), pings rank 1 for as long again, and fails naming it."""
    launcher, (rank0, rank1) = start_long_run(tmp_path, omniglot_root, "--dist_timeout", 4)
    try:
        kill_tree(rank1, signal.SIGSTOP)
        wait_for(lambda: "PeerLostError" in (tmp_path / "run.log").read_text(), 120, "rank 0's error")
    finally:
        kill_tree(launcher.pid)
    log = (tmp_path / "run.log").read_text()
    assert "PeerLostError: rank 0:" in log and "rank 1 did not answer in time" in log, log[-4000:]
    waited = float(re.search(r"PeerLostError: rank 0: .* failed after ([0-9.]+) s", log).group(1))
    assert waited >= 4, waited  # the collective timed out (the event), rather than failing on something else


def test_stop_handler_records_votes_and_gives_the_previous_handlers_back():
    """In-process: the handler only records; the vote decides; close() restores the handlers it replaced (train()
    also runs inside test processes, which must keep their own SIGTERM behaviour)."""
    from dist_signmaml.preemption import GracefulStop

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    votes = []
    stop = GracefulStop(lambda mine: votes.append(mine) or mine)
    assert stop.requested() is False and stop.received is None
    os.kill(os.getpid(), signal.SIGUSR1)
    assert stop.received == "SIGUSR1" and stop.requested() is True and votes == [False, True]
    peer_only = GracefulStop(lambda mine: True)  # another rank got the signal
    assert peer_only.requested() and peer_only.reason == "a stop signal on another rank"
    peer_only.close()
    stop.close()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == before

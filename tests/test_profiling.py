"""`--profile_steps A:B`: a torch.profiler trace of exactly meta-steps A..B on every rank, with the monitor's phases
as labelled ranges, memory events, and (under DDP) the meta-gradient all-reduce inside the backward range."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dist_signmaml.config import ConfigError, TrainConfig
from dist_signmaml.monitor import PHASES
from dist_signmaml.profiling import PROFILE_DIR, parse_profile_steps
from dist_signmaml.train import train
from tests.dist_scripts.launching import TINY_TRAIN, TRAIN, child_env, run, two_cpu_ranks


def ranges(trace_file: Path) -> list[dict]:
    """The complete ('X') events of a Chrome-format trace."""
    return [e for e in json.loads(trace_file.read_text())["traceEvents"] if e.get("ph") == "X"]


def inside(event: dict, outer: dict) -> bool:
    return outer["ts"] <= event["ts"] and event["ts"] + event.get("dur", 0) <= outer["ts"] + outer["dur"] + 1e-3


def trace_of(run_dir: Path, rank: int) -> Path:
    (trace,) = (run_dir / PROFILE_DIR).glob(f"rank{rank}.*.pt.trace.json")
    return trace


@pytest.mark.parametrize("spec,steps,expected", [
    ("", 10, None), ("3:5", 10, (3, 5)), ("4:4", 4, (4, 4)), (7, 10, (7, 7)),
])
def test_profile_steps_parse(spec, steps, expected):
    config = TrainConfig.from_options(profile_steps=spec, steps=steps)
    assert parse_profile_steps(config.profile_steps, config.steps) == expected


@pytest.mark.parametrize("spec", ["5:3", "0:2", "2:11", "a:b", "3", "3-4", "1:2:3"])
def test_bad_profile_steps_are_refused(spec):
    with pytest.raises(ConfigError, match=r"--profile_steps=.* is invalid: expected A:B with 1 <= A <= B <= --steps \(10\)"):
        TrainConfig.from_options(profile_steps=spec, steps=10)


def test_one_process_trace_holds_exactly_the_asked_steps_and_their_phases(tmp_path, omniglot_root, one_torch_thread):
    out = tmp_path / "run"
    train(TrainConfig.from_options(ways=3, shots=1, queries=1, hidden=8, meta_batch=2, steps=4, log_every=2,
                                   eval_episodes=0, test_episodes=0, profile_steps="2:3", data=str(omniglot_root),
                                   out=str(out)))
    events = ranges(trace_of(out, 0))
    steps = {e["name"]: e for e in events if e["name"].startswith("meta_step#")}
    assert sorted(steps) == ["meta_step#2", "meta_step#3"]
    for name in PHASES:
        labelled = [e for e in events if e["name"] == name and e.get("cat") == "user_annotation"]
        assert len(labelled) == 2, (name, len(labelled))
        assert sorted(next(s for s, r in steps.items() if inside(e, r)) for e in labelled) == sorted(steps), name
    # the inner loop's support gradients and the backward's autograd ops sit in their ranges
    inner = [e for e in events if e["name"] == "inner_loop"]
    backward = [e for e in events if e["name"] == "outer_backward"]
    assert any(e["name"] == "aten::sign" and any(inside(e, r) for r in inner) for e in events)
    assert any(e["name"].startswith("autograd::engine::evaluate_function") and any(inside(e, r) for r in backward)
               for e in events)
    memory = [e for e in json.loads(trace_of(out, 0).read_text())["traceEvents"] if e.get("name") == "[memory]"]
    assert memory and all("Total Allocated" in e["args"] for e in memory)
    table = (out / PROFILE_DIR / "rank0.key_averages.txt").read_text()
    assert all(name in table for name in ("inner_loop", "outer_backward", "optimizer_step"))


@pytest.mark.slow
def test_two_ranks_each_write_a_trace_with_the_all_reduce_in_backward(tmp_path, omniglot_root):
    """2 gloo ranks: a trace per rank, and the DDP bucket all-reduce (gloo:all_reduce, on gloo's own thread) starts
    inside the rank's outer_backward range. The manifest names both ranks."""
    out = tmp_path / "run"
    result = run(two_cpu_ranks(*TRAIN, *TINY_TRAIN, "--steps", "3", "--profile_steps", "2:2", "--data", omniglot_root,
                               "--out", out), child_env(), timeout=400)
    assert result.returncode == 0, result.stdout[-4000:]
    for rank in (0, 1):
        events = ranges(trace_of(out, rank))
        (backward,) = [e for e in events if e["name"] == "outer_backward"]
        reduces = [e for e in events if e["name"] in ("gloo:all_reduce", "nccl:all_reduce")]
        assert reduces and all(backward["ts"] <= e["ts"] <= backward["ts"] + backward["dur"] for e in reduces), rank
        assert [e["name"] for e in events if e["name"].startswith("meta_step#")] == ["meta_step#2"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and [r["rank"] for r in manifest["ranks"]] == [0, 1]
    assert len({r["pid"] for r in manifest["ranks"]}) == 2
    assert "accelerate" in manifest["launcher_command"] and "--profile_steps 2:2" in manifest["command"]

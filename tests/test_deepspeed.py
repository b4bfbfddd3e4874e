"""DeepSpeed ZeRO stages 1 and 2 through Accelerate on 2 CPU ranks (gloo), against torch DDP; ZeRO-3 refused.

Stated tolerance (see tests/dist_scripts/equivalence.py): from the same parameters a ZeRO step and a DDP step agree
within 1e-5 (measured: bit-identical, 0.0); after 3 steps within 1e-5 for fo/maml, and for sign within 5% of the
parameters' movement (the sign step is discontinuous; measured 0.0 here).
DeepSpeed's first use JIT-builds a small shared-memory op (~30 s on 2 idle cores, cached in ~/.cache/torch_extensions).
"""

from __future__ import annotations

import json
import re

import pytest

from dist_signmaml.engine import ZERO3_REFUSAL, DistributedSetupError, Engine, resolve_zero_stage
from dist_signmaml.train import main
from tests.dist_scripts.launching import ACCELERATE, LAUNCH, SCRIPTS, child_env, free_port, run

pytestmark = pytest.mark.slow
pytest.importorskip("deepspeed", reason="DeepSpeed is in the test extra: pip install -e '.[test]'")
pytest.importorskip("transformers", reason="Accelerate's DeepSpeed integration needs transformers installed")


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_stage_matches_ddp_on_two_cpu_ranks(tmp_path, omniglot_root, stage):
    # Stage 2 goes through the preset file, stage 1 through launcher flags: both ways of asking for DeepSpeed.
    # Stage 1 also clips the meta-gradient (--meta_grad_clip, which DeepSpeed applies inside its own step), stage 2
    # does not: DeepSpeed's default clipping at norm 1.0 must stay off.
    how = (["--config_file", str(LAUNCH / "deepspeed_zero2.yaml"), "--num_processes", "2"] if stage == 2 else
           ["--use_deepspeed", "--zero_stage", "1", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no"])
    command = ACCELERATE + how + ["--main_process_port", str(free_port()), str(SCRIPTS / "equivalence.py"),
                                  "--data", str(omniglot_root), "--out", str(tmp_path), "--algos", "sign",
                                  "--steps", "3"] + (["--meta_grad_clip", "0.01"] if stage == 1 else [])
    # No ACCELERATE_USE_CPU: with it Accelerate would quietly run DDP instead of DeepSpeed (the engine refuses).
    result = run(command, child_env(cpu_ddp=False), timeout=400)
    assert result.returncode == 0, result.stdout[-6000:]
    report = json.loads((tmp_path / f"equivalence_zero{stage}.json").read_text())
    assert report["zero_stage"] == stage and report["world_size"] == 2
    sign = report["sign"]
    assert sign["rank_spread"] == 0.0
    assert sign["step_error"] <= 1e-5, sign  # ZeRO step vs DDP step from the same parameters
    assert sign["end_error"] <= sign["end_tolerance"], sign  # after 3 steps
    assert sign["ddp_vs_one_process_step"] <= 1e-5, sign


def test_zero3_is_refused_with_the_reason(monkeypatch):
    with pytest.raises(DistributedSetupError, match="functional_call") as refused:
        resolve_zero_stage(3)
    assert str(refused.value) == ZERO3_REFUSAL and "Use --zero_stage 1 or 2" in ZERO3_REFUSAL
    # ... also when the stage comes from the launcher (`accelerate launch --use_deepspeed --zero_stage 3`)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(DistributedSetupError, match="ZeRO stage 3 is not supported"):
        resolve_zero_stage(0)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert resolve_zero_stage(0) == 2
    with pytest.raises(DistributedSetupError, match="--zero_stage=1 contradicts the launcher's DeepSpeed ZeRO stage 2"):
        resolve_zero_stage(1)


def test_zero3_from_the_launcher_stops_the_cli_with_one_line(tmp_path, monkeypatch, capsys, omniglot_root):
    """In-process is safe here: the refusal comes before any Accelerator exists."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(SystemExit) as stopped:
        main(steps=1, eval_episodes=0, test_episodes=0, data=str(omniglot_root), out=str(tmp_path / "run"))
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {ZERO3_REFUSAL}"


@pytest.mark.parametrize("environment, what", [({"ACCELERATE_USE_CPU": "1", "LOCAL_RANK": "0"}, "a CPU run"),
                                               ({}, "no distributed run (no launcher)")])
def test_deepspeed_without_its_launcher_or_with_accelerate_use_cpu_is_refused(tmp_path, monkeypatch, environment, what):
    """ACCELERATE_USE_CPU=1 makes Accelerate drop DeepSpeed silently (plain DDP), and without `accelerate launch
    --use_deepspeed` Accelerate fails deep inside; the engine says what to do instead, before creating anything."""
    for name in ("ACCELERATE_USE_CPU", "LOCAL_RANK", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(DistributedSetupError, match=re.escape(f"--zero_stage=2 asked for DeepSpeed but Accelerate set up {what}")
                                                    + ".*do not set ACCELERATE_USE_CPU=1"):
        Engine(tmp_path, seed=0, log_with=None, zero_stage=2)

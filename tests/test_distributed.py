"""Data-parallel meta-learning on 2 CPU processes (gloo), launched for real with `accelerate launch`.

The arithmetic checks live in tests/dist_scripts/equivalence.py (a plain script full of asserts that runs under
the launcher); this module launches it and checks what it reports.
"""

from __future__ import annotations

import json

import pytest

from dist_signmaml.config import ConfigError, TrainConfig
from tests.dist_scripts.launching import (ACCELERATE, LAUNCH, REPO_ROOT, SCRIPTS, TINY_TRAIN, TRAIN, child_env,
                                          free_port, run, two_cpu_ranks)

pytestmark = pytest.mark.slow


def test_two_ranks_match_one_process_for_sign_fo_and_maml(tmp_path, omniglot_root):
    """2 ranks x 2 tasks == 1 process x 4 tasks, step by step and after 3 steps, for sign, fo, maml and sign with
    learned step sizes, also with --meta_grad_clip; and the same check catches a gradient summed over ranks and one
    that is not reduced at all (the script asserts both)."""
    result = run(two_cpu_ranks(SCRIPTS / "equivalence.py", "--data", omniglot_root, "--out", tmp_path,
                               "--algos", "sign,fo,maml,sign+lsl", "--steps", "3"), child_env(), timeout=300)
    assert result.returncode == 0, result.stdout[-6000:]
    report = json.loads((tmp_path / "equivalence_zero0.json").read_text())
    assert report["world_size"] == 2 and report["steps"] == 3
    # learned step sizes (sign+lsl): 2 ranks give the same sizes as 1 process, and the sizes did move
    assert report["sign+lsl"]["step_sizes_moved"] > 1e3 * max(report["sign+lsl"]["step_error"], 1e-7)
    for algo in ("sign", "fo", "maml", "sign+lsl"):
        numbers = report[algo]
        assert numbers["rank_spread"] == 0.0, (algo, numbers)
        assert numbers["step_error"] <= 1e-5, (algo, numbers)
        assert numbers["clipped_step_error"] <= 1e-5, (algo, numbers)  # clipped as one process clips
        assert numbers["end_error"] <= numbers["end_tolerance"], (algo, numbers)
        # the broken reductions are off by a sizeable fraction of a whole step, the working one by float rounding
        assert numbers["broken_summed_step_error"] > 1e3 * max(numbers["step_error"], 1e-7), (algo, numbers)
        assert numbers["broken_unreduced_step_error"] > 1e3 * max(numbers["step_error"], 1e-7), (algo, numbers)


def test_multi_gpu_launch_without_cpu_flag_on_a_cpu_machine_fails_loudly(tmp_path, omniglot_root):
    """`accelerate launch --multi_gpu` on a CPU-only machine starts 2 processes that would each be rank 0 of 1 and
    train without syncing; the engine notices and stops with a one-line error instead."""
    command = ACCELERATE + ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                            "--dynamo_backend", "no", "--main_process_port", str(free_port()), *TRAIN, *TINY_TRAIN,
                            "--steps", "2", "--data", str(omniglot_root), "--out", str(tmp_path / "run")]
    result = run(command, child_env(cpu_ddp=False), timeout=120)
    assert result.returncode != 0
    assert "error: the launcher started WORLD_SIZE=2 processes but Accelerate formed a group of 1" in result.stdout
    assert "ACCELERATE_USE_CPU=1" in result.stdout
    assert not (tmp_path / "run" / "checkpoints").exists(), "it trained anyway"


def test_presets_describe_the_setups_they_are_named_after():
    """Each accelerate preset parses with Accelerate's own loader and says what its name promises. They are also
    launched for real: cpu_2proc here and in test_faults, multi_node in test_multinode, deepspeed_zero2 in
    test_deepspeed, and in test_slurm accelerate_config.yaml (cut to 2 CPU processes) and cpu_1proc (the sweep)."""
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {
        REPO_ROOT / "accelerate_config.yaml": ("MULTI_GPU", 1, 8, False),
        LAUNCH / "gpu_8.yaml": ("MULTI_GPU", 1, 8, False),
        LAUNCH / "cpu_1proc.yaml": ("NO", 1, 1, True),
        LAUNCH / "cpu_2proc.yaml": ("MULTI_GPU", 1, 2, False),
        LAUNCH / "multi_node.yaml": ("MULTI_GPU", 2, 16, False),
        LAUNCH / "deepspeed_zero2.yaml": ("DEEPSPEED", 1, 8, False),
    }
    for path, (kind, machines, processes, cpu) in expected.items():
        config = load_config_from_file(str(path))
        assert (config.distributed_type.value, config.num_machines, config.num_processes, config.use_cpu) == \
            (kind, machines, processes, cpu), path
        assert config.mixed_precision == "no", path
    assert load_config_from_file(str(LAUNCH / "deepspeed_zero2.yaml")).deepspeed_config["zero_stage"] == 2
    assert sorted(p.name for p in LAUNCH.glob("*.yaml")) == sorted(p.name for p in expected if p.parent == LAUNCH), \
        "a new preset needs a line here"


def test_zero3_and_a_bad_timeout_are_refused_by_the_config():
    """(The uneven meta-batch refusal is asserted inside the equivalence script, where a world size exists.)"""
    with pytest.raises(ConfigError, match="--zero_stage=3 is invalid.*ZeRO-3 partitions the parameters"):
        TrainConfig.from_options(zero_stage=3)
    with pytest.raises(ConfigError, match="--dist_timeout=0 is invalid"):
        TrainConfig.from_options(dist_timeout=0)

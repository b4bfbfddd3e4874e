"""The backbone/precision/adaptation flags through the real training entry point (Omniglot, a few steps)."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file

from dist_signmaml.config import ConfigError, TrainConfig
from dist_signmaml.models import build_backbone
from dist_signmaml.train import build_learner, train


pytestmark = pytest.mark.usefixtures("one_torch_thread")



def config(tmp_path, omniglot_root, **overrides) -> TrainConfig:
    options = dict(ways=5, shots=1, queries=2, steps=2, meta_batch=2, data=str(omniglot_root), out=str(tmp_path / "run"),
                   log_every=1, ckpt_every=1, eval_episodes=0, test_episodes=0, seed=0, backbone="resnet12", hidden=4)
    return TrainConfig.from_options(**(options | overrides))


def test_resnet12_with_every_option_trains_from_a_local_weights_file(tmp_path, omniglot_root):
    """ResNet-12 with last-block adaptation, bf16, channels-last weights, activation checkpointing and a compiled
    task function trains, checkpoints and exports; the start point comes from a local weights file."""
    start = build_backbone("resnet12", in_channels=1, ways=5, hidden=4, image_size=28)
    weights = tmp_path / "start.safetensors"
    save_file({k: v.contiguous() for k, v in start.state_dict().items()}, str(weights))
    run = config(tmp_path, omniglot_root, adapt="last:1", precision="bf16", channels_last=True,
                 activation_checkpointing=True, compile=True, compile_backend="eager", weights=str(weights),
                 steps=1, outer_lr=1e-4)
    train(run)
    out = tmp_path / "run"
    saved = json.loads((out / "config.json").read_text())
    assert (saved["adapt"], saved["precision"], saved["channels_last"], saved["compile"]) == ("last:1", "bf16", True, True)
    assert (out / "checkpoints" / "step_00000001").is_dir()
    exported = load_file(out / "model.safetensors")
    assert exported.keys() == start.state_dict().keys()
    # One Adam step moves every weight by at most ~outer_lr: the run started from the file, not a fresh init.
    for name, tensor in start.state_dict().items():
        assert (exported[name] - tensor).abs().max() <= 1.5e-4, name


def test_bad_backbone_options_fail_with_one_clear_line(tmp_path, omniglot_root):
    with pytest.raises(ConfigError, match="--adapt=last:5 asks for 5 blocks but this backbone has 4"):
        build_learner(config(tmp_path, omniglot_root, adapt="last:5"), (28, 28, 1), "cpu")
    with pytest.raises(ConfigError, match="--stem='tiny' is invalid"):
        config(tmp_path, omniglot_root, backbone="resnet18", hidden=0, stem="tiny")
    with pytest.raises(ConfigError, match="--weights=.*no such file"):
        train(config(tmp_path, omniglot_root, weights=str(tmp_path / "missing.pth")))

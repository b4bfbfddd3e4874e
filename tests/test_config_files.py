"""`--config FILE` (YAML or TOML) beside the flags: the file sets fields, flags win, unknown keys stop the run with
one line naming the key and the file, and RUN/config.yaml reproduces a run bit for bit."""

from __future__ import annotations

import subprocess
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dist_signmaml.config import ConfigError, TrainConfig
from dist_signmaml.train import main, train
from tests.conftest import PYTHON, REPO_ROOT

RUN_PRESETS = REPO_ROOT / "launch" / "configs"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_yaml_sets_fields_and_flags_override_it(tmp_path):
    file = write(tmp_path / "run.yaml", "ways: 10\nshots: 5\nouter_lr: 1e-3\nalgo: fo\nlog_with: [tensorboard]\n")
    config = TrainConfig.from_options(config=str(file), shots=1, steps=7)
    assert (config.ways, config.shots, config.steps, config.algo) == (10, 1, 7, "fo")
    # PyYAML reads 1e-3 as a string; a float field takes it as the number it is
    assert config.outer_lr == 0.001 and isinstance(config.outer_lr, float)
    assert config.inner_lr == 0.1, "fo's default beta follows from the file's algo"
    assert config.log_with == "tensorboard"


def test_toml_sets_fields(tmp_path):
    file = write(tmp_path / "run.toml", 'ways = 3\nbackbone = "resnet12"\nprofile_steps = "2:4"\nsteps = 9\n')
    config = TrainConfig.from_options(config=str(file))
    assert (config.ways, config.backbone, config.profile_steps, config.steps) == (3, "resnet12", "2:4", 9)


@pytest.mark.parametrize("name,text,fragments", [
    ("run.yaml", "ways: 5\nmeta_btach: 8\n", ["run.yaml: unknown key 'meta_btach'"]),
    ("run.toml", "wayz = 5\n", ["run.toml: unknown key 'wayz'"]),
    ("run.yaml", "- ways\n- 5\n", ["run.yaml", "expected a mapping", "list"]),
    ("run.yaml", "ways: [5\n", ["run.yaml", "not valid YAML"]),
    ("run.toml", "ways = \n", ["run.toml", "not valid TOML"]),
    ("run.json", "{}", ["run.json", "expected a .yaml, .yml or .toml file"]),
    ("run.yaml", "outer_lr: fast\n", ["--outer_lr='fast' is invalid", "(set in ", "run.yaml)"]),
])
def test_bad_files_stop_with_one_line_naming_the_file(tmp_path, capsys, name, text, fragments):
    file = write(tmp_path / name, text)
    with pytest.raises(SystemExit) as stopped:
        main(config=str(file), out=str(tmp_path / "run"))
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert not (tmp_path / "run").exists()


def test_a_bad_flag_over_a_file_is_blamed_on_the_flag(tmp_path):
    file = write(tmp_path / "run.yaml", "ways: 5\n")
    with pytest.raises(ConfigError) as error:
        TrainConfig.from_options(config=str(file), ways=1)
    assert str(error.value).startswith("--ways=1 is invalid") and "run.yaml" not in str(error.value)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"--config='.*nothing.yaml': cannot read it"):
        TrainConfig.from_options(config=str(tmp_path / "nothing.yaml"))


def test_cli_reads_the_file_and_rejects_its_unknown_key(tmp_path, subprocess_env):
    """Through fire, as a user types it: `--config FILE` reaches TrainConfig before any work."""
    file = write(tmp_path / "run.yaml", "ways: 5\nmeta_btach: 8\n")
    result = subprocess.run([PYTHON, "-m", "dist_signmaml.train", "--config", str(file), "--out", str(tmp_path / "r")],
                            capture_output=True, text=True, env=subprocess_env, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == f"error: {file}: unknown key 'meta_btach' (the keys are the training options " \
                                    f"without '--': " + ", ".join(sorted(f for f in asdict(TrainConfig()))) + ")"
    assert not (tmp_path / "r").exists()


def test_run_config_yaml_reproduces_the_run(tmp_path, omniglot_root, one_torch_thread):
    """Train with flags; train again from RUN/config.yaml into another directory: the same config (but --out) and
    bit-identical weights."""
    first = TrainConfig.from_options(ways=3, shots=1, queries=2, hidden=8, meta_batch=2, steps=3, log_every=1,
                                     eval_episodes=0, test_episodes=0, seed=11, algo="signum", outer_lr=3e-3,
                                     data=str(omniglot_root), out=str(tmp_path / "a"))
    train(first)
    written = tmp_path / "a" / "config.yaml"
    assert yaml.safe_load(written.read_text()) == asdict(first)
    again = TrainConfig.from_options(config=str(written), out=str(tmp_path / "b"))
    assert asdict(again) == asdict(first) | {"out": str(tmp_path / "b")}
    train(again)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    assert yaml.safe_load((tmp_path / "b" / "config.yaml").read_text()) == asdict(again)


def test_launch_presets_are_valid_configs():
    """Each example under launch/configs/ loads and validates, and says what its name promises."""
    presets = {p.name: TrainConfig.from_options(config=str(p)) for p in sorted(RUN_PRESETS.iterdir())}
    assert sorted(presets) == ["conv4_omniglot.yaml", "node_8gpu.toml", "resnet12_miniimagenet.yaml"]
    omniglot, mini, node = presets["conv4_omniglot.yaml"], presets["resnet12_miniimagenet.yaml"], presets["node_8gpu.toml"]
    assert (omniglot.backbone, omniglot.meta_batch, omniglot.inner_steps, omniglot.test_inner_steps) == ("conv4", 4, 1, 10)
    assert omniglot.data == TrainConfig().data, "the bundled Omniglot shards"
    assert (mini.backbone, mini.shots, Path(mini.data).name) == ("resnet12", 5, "mini-imagenet")
    assert node.meta_batch % 8 == 0 and node.meta_batch // 8 >= 1, "one or more tasks on each of 8 ranks"
    assert node.log_with == "tensorboard,wandb,mlflow" and node.profile_steps == "100:102"

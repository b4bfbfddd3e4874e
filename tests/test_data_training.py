"""The data options reach the trainer: `--on_bad_sample skip` trains past a corrupt sample and logs the count to
TensorBoard; the default stops with one line naming the shard and the member; the stream state is checkpointed."""

from __future__ import annotations

import json
import tarfile
from dataclasses import fields

import pytest

from dist_signmaml.config import TrainConfig
from dist_signmaml.data.format import read_index
from tests.shard_fixtures import reindex, write_identifiable_split, write_tar


@pytest.fixture()
def corrupt_data(tmp_path):
    root = tmp_path / "data"
    write_identifiable_split(root / "train", n_classes=16, images_per_class=4, shard_mb=0.02, size=16)
    index = read_index(root / "train")
    victim = root / "train" / index.shards[0]
    with tarfile.open(victim) as archive:
        members = [(m.name, archive.extractfile(m).read()) for m in archive]
    write_tar(victim, [(n, b"\x00garbage" if n == "c0000001.images.npy" else d) for n, d in members])
    reindex(root / "train")
    return root, victim


def config(tmp_path, data, **overrides):
    options = dict(ways=2, shots=1, queries=1, steps=4, meta_batch=2, data=str(data), out=str(tmp_path / "run"),
                   log_every=2, ckpt_every=2, eval_episodes=0, test_episodes=0, seed=0, hidden=8, window_shards=16)
    return TrainConfig.from_options(**(options | overrides))


def test_skip_logs_the_count_to_tensorboard_and_checkpoints_the_stream_state(tmp_path, corrupt_data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dist_signmaml.train import train

    root, victim = corrupt_data
    with pytest.warns(UserWarning, match=rf"skipped bad sample #1 .*{victim.name} member c0000001\.images\.npy"):
        train(config(tmp_path, root, on_bad_sample="skip"))
    events = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("data/bad_samples_skipped")] == [(2, 1.0), (4, 1.0)]
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000004" / "train_state.json").read_text())
    assert state["episode_stream"]["next_batch"] == 4 and state["episode_stream"]["world_size"] == 1


def test_default_policy_stops_with_one_line_naming_shard_and_member(tmp_path, corrupt_data, capsys):
    from dist_signmaml.train import main

    root, victim = corrupt_data
    with pytest.raises(SystemExit) as stopped:
        main(**{f.name: getattr(config(tmp_path, root), f.name) for f in fields(TrainConfig)})
    assert stopped.value.code == 2
    err = capsys.readouterr().err  # (after the progress bar, which shares stderr)
    assert err.count("error: ") == 1 and "Traceback" not in err, err
    assert f"error: {victim} member c0000001.images.npy: not a readable .npy array (no .npy header" in err, err


def test_data_options_are_validated_before_any_work(tmp_path):
    from dist_signmaml.config import ConfigError

    for option, value in (("on_bad_sample", "ignore"), ("class_sampling", "uniformish")):
        with pytest.raises(ConfigError, match=rf"--{option}='{value}' is invalid"):
            TrainConfig.from_options(**{option: value, "data": str(tmp_path)})

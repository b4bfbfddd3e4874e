"""Exported weights whose metadata lies about the model: refused in one line before anything is sized from it."""

from __future__ import annotations

import dataclasses

import pytest

from dist_signmaml.artifacts import WeightsFileError, read_metadata, save_weights
from dist_signmaml.builders import build_learner, check_weights_fit
from dist_signmaml.config import TrainConfig

pytestmark = pytest.mark.unit

IMAGE_SHAPE = (28, 28, 1)


def export(tmp_path, config: TrainConfig, claimed: dict) -> str:
    """A real export of a small learner, with `claimed` config fields written into its metadata instead."""
    learner = build_learner(config, IMAGE_SHAPE, "cpu")
    path = tmp_path / "model.safetensors"
    save_weights(path, learner.state_dict(), {"config": dataclasses.asdict(config) | claimed,
                                              "image_shape": list(IMAGE_SHAPE)})
    return str(path)


def test_a_width_the_tensors_do_not_have_is_refused_before_the_model_is_allocated(tmp_path):
    config = TrainConfig.from_options(ways=5, hidden=8)
    path = export(tmp_path, config, {"hidden": 100_000})  # would be a 360 GB conv4 if it were built
    claimed = TrainConfig.from_options(**read_metadata(path)["config"])
    with pytest.raises(WeightsFileError, match=r"metadata \(config, image_shape\) does not describe its tensors "
                                               r"\(\d+ differ, e\.g\. model\.features\.0\.0\.bias: file \(8,\), "
                                               r"config \(100000,\)"):
        check_weights_fit(claimed, IMAGE_SHAPE, path)
    check_weights_fit(config, IMAGE_SHAPE, path)  # the true config fits


def test_learned_step_sizes_and_ways_are_checked_too(tmp_path):
    config = TrainConfig.from_options(ways=5, hidden=8, learn_inner_lr="layer_step", inner_steps=2)
    path = export(tmp_path, config, {})
    check_weights_fit(config, IMAGE_SHAPE, path)
    with pytest.raises(WeightsFileError, match="log_inner_lr: file \\(18, 2\\), config \\(18, 3\\)"):
        check_weights_fit(dataclasses.replace(config, inner_steps=3), IMAGE_SHAPE, path)
    with pytest.raises(WeightsFileError, match="model.head.weight: file \\(5, 8\\), config \\(20, 8\\)"):
        check_weights_fit(dataclasses.replace(config, ways=20), IMAGE_SHAPE, path)

"""A short training run (then a resume) with validation, best weights and the final test; every TensorBoard tag the
monitoring promises is read back with EventAccumulator and checked for finite, plausible values."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dist_signmaml.config import TrainConfig
from dist_signmaml.train import train

# tag -> (low, high): plausible ranges for a few steps of 5-way Sign-MAML on Omniglot with conv4
SCALARS = {
    "train/loss": (0.0, 20.0), "train/accuracy_before": (0.0, 1.0), "train/accuracy_after": (0.0, 1.0),
    "train/step_seconds": (1e-4, 120.0), "train/tasks_per_second": (0.01, 1e5),
    "time/data_wait": (0.0, 60.0), "time/inner_loop": (1e-5, 60.0), "time/outer_backward": (1e-5, 60.0),
    "time/optimizer_step": (1e-7, 60.0),
    "memory/peak_mib": (10.0, 1e6),
    "inner/support_grad_norm": (1e-6, 1e4), "inner/sign_agreement": (0.0, 1.0), "inner/moved_fraction": (0.0, 1.0),
    "lr/outer": (0.99e-3, 1.01e-3), "lr/inner": (0.00499, 0.00501),
    "val/accuracy": (0.0, 1.0), "val/ci95": (0.0, 1.0), "test/accuracy": (0.0, 1.0), "test/ci95": (0.0, 1.0),
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, omniglot_root):
    out = tmp_path_factory.mktemp("tb") / "run"
    options = dict(ways=5, shots=1, queries=1, meta_batch=2, hidden=16, test_inner_steps=2, data=str(omniglot_root),
                   out=str(out), log_every=2, eval_every=2, eval_episodes=3, test_episodes=3, ckpt_every=100, seed=5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster, and fair to the other tests sharing the cores
    try:
        first = train(TrainConfig.from_options(steps=4, **options))
        resumed = train(TrainConfig.from_options(steps=6, resume=True, **options))
    finally:
        torch.set_num_threads(threads)
    return out, first, resumed


def scalars(directory) -> dict[str, list]:
    events = EventAccumulator(str(directory), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def test_every_promised_tag_is_logged_with_plausible_values(finished_run):
    out, _, _ = finished_run
    events = scalars(out / "tb")
    tags = events.Tags()
    for tag, (low, high) in SCALARS.items():
        assert tag in tags["scalars"], (tag, sorted(tags["scalars"]))
        values = [e.value for e in events.Scalars(tag)]
        assert all(math.isfinite(v) and low <= v <= high for v in values), (tag, values)
    logged_steps = sorted({e.step for e in events.Scalars("train/loss")})
    assert logged_steps == [2, 4, 6], "log_every=2 over two sessions (4 steps, then resumed to 6)"
    assert sorted({e.step for e in events.Scalars("inner/sign_agreement")}) == [2, 4, 6]
    assert sorted({e.step for e in events.Scalars("val/accuracy")}) == [2, 4, 6]
    assert [e.step for e in events.Scalars("test/accuracy")][-1] == 6
    # The phases are parts of the meta-iteration: their means cannot exceed its mean.
    last = {tag: events.Scalars(tag)[-1].value for tag in SCALARS}
    parts = sum(last[f"time/{p}"] for p in ("data_wait", "inner_loop", "outer_backward", "optimizer_step"))
    assert parts == pytest.approx(last["train/step_seconds"], rel=1e-6)
    assert last["train/tasks_per_second"] == pytest.approx(2 / last["train/step_seconds"], rel=1e-6)

    assert {"episode/support", "episode/query"} <= set(tags["images"])
    support = events.Images("episode/support")[0]
    query = events.Images("episode/query")[0]
    assert support.height >= 28 * 5 and query.height >= 28 * 5, "one row of 28 px images per class"
    assert "config/text_summary" in tags["tensors"]
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"algo": "sign"' in text and '"eval_every": 2' in text


def test_hparams_carry_the_final_metrics(finished_run):
    from tensorboard.plugins.hparams import plugin_data_pb2

    out, _, resumed = finished_run
    events = scalars(out / "tb" / "final")
    content = events.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert session.hparams["algo"].string_value == "sign" and session.hparams["ways"].number_value == 5
    assert events.Scalars("final/test_accuracy")[-1].value == pytest.approx(resumed["test"]["accuracy"])
    assert events.Scalars("final/best_val_accuracy")[-1].value == pytest.approx(resumed["best_val"]["accuracy"])


def test_summary_best_weights_and_resumed_validation_history(finished_run):
    out, first, resumed = finished_run
    results = json.loads((out / "results.json").read_text())
    assert [r["step"] for r in first["val_history"]] == [2, 4]
    assert [r["step"] for r in results["val_history"]] == [2, 4, 6], "the validator's history survives a resume"
    best = max(results["val_history"], key=lambda r: r["accuracy"])
    assert results["best_val"]["accuracy"] == best["accuracy"]
    assert results["test"]["weights"] == "model_best.safetensors"
    assert results["test"]["weights_step"] == results["best_val"]["step"]
    assert results["test"]["episodes"] == 3 and results["val"]["step"] == 6
    assert first["seconds_per_meta_iteration"]["count"] == 3, "4 steps, the first untimed"
    assert results["seconds_per_meta_iteration"]["count"] == 3 + 1, \
        "6 steps in two sessions, the first of each untimed, counted over the whole run"
    assert (out / "model_best.safetensors").is_file() and (out / "model.safetensors").is_file()
    table = (out / "results.md").read_text()
    assert "| test |" in table and "| val (best) |" in table
    assert f"{100 * results['test']['accuracy']:.2f} ± {100 * results['test']['ci95']:.2f}%" in table

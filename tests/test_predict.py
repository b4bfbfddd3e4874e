"""Adapt and predict with a trained export: the API reproduces `evaluate` exactly, BatchNorm modes, image inputs,
exports carrying more than the backbone, old exports, and the `predict` CLI on a generated image folder."""

from __future__ import annotations

import csv
import json
import subprocess
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dist_signmaml
import dist_signmaml.data.episode_loader as episodes_module
from dist_signmaml.config import TrainConfig
from dist_signmaml.data import EpisodeShape, fixed_episodes, read_index
from dist_signmaml.evaluate import EVALUATION_SEED, confidence_interval, evaluate
from dist_signmaml.inference import InferenceError
from dist_signmaml.predict import main as predict_main
from dist_signmaml.train import train
from tests.conftest import PYTHON, REPO_ROOT

WAYS, SHOTS, QUERIES, EPISODES, STEPS = 5, 1, 3, 6, 3


def tiny_run(out, data, **options):
    common = {"ways": WAYS, "shots": SHOTS, "queries": QUERIES, "meta_batch": 2, "hidden": 16, "steps": 6,
              "test_inner_steps": STEPS, "eval_every": 0, "eval_episodes": 2, "test_episodes": 0, "data": str(data),
              "out": str(out), "seed": 3}
    train(TrainConfig.from_options(**(common | options)))
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, omniglot_root, one_torch_thread):
    """A 6-step 5-way 1-shot run that validates at its end (so it has model_best.safetensors)."""
    return tiny_run(tmp_path_factory.mktemp("predict") / "run", omniglot_root)


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory, omniglot_root, one_torch_thread):
    """Learned step sizes per tensor and inner step (2 trained steps; the 3 test steps reuse the last sizes)."""
    return tiny_run(tmp_path_factory.mktemp("predict") / "learned", omniglot_root, learn_inner_lr="layer_step",
                    inner_steps=2, inner_lr_lr=0.3)


@pytest.fixture(scope="module")
def raw_test_episodes(omniglot_root):
    """The evaluation's own fixed test episodes as uint8 pixels, captured where they are normalised."""
    captured = []
    original = episodes_module.stack_tasks

    def capture(tasks, normalize):
        captured.extend(tasks)
        return original(tasks, normalize)

    episodes_module.stack_tasks = capture
    try:
        list(fixed_episodes(omniglot_root / "test", EpisodeShape(WAYS, SHOTS, QUERIES), range(EPISODES),
                            seed=EVALUATION_SEED, tasks_per_batch=4))
    finally:
        episodes_module.stack_tasks = original
    assert len(captured) == EPISODES and captured[0][0].dtype == np.uint8
    return captured


def api_accuracies(model, episodes, batchnorm="query", one_at_a_time=False) -> torch.Tensor:
    accuracies = []
    for support_x, support_y, query_x, query_y in episodes:
        adapted = model.adapt(support_x, support_y.tolist(), steps=STEPS)
        if one_at_a_time:
            predicted = [adapted.predict_classes(image, batchnorm=batchnorm)[0] for image in query_x]
        else:
            predicted = adapted.predict_classes(query_x, batchnorm=batchnorm)
        accuracies.append((torch.tensor(predicted) == torch.from_numpy(query_y)).float().mean())
    return torch.stack(accuracies)


@pytest.mark.parametrize("run", ["run_dir", "learned_run"])
def test_the_api_reproduces_evaluate_exactly(run, raw_test_episodes, omniglot_root, tmp_path, request,
                                             one_torch_thread):
    run_dir = request.getfixturevalue(run)
    scored = evaluate(str(run_dir), episodes=EPISODES, inner_steps=STEPS, out=str(tmp_path / "eval.json"))
    # evaluate normalises the test split with its own statistics (index.json); given those, the API sees the
    # very same input tensors, runs the same inner loop and must count the same correct queries.
    model = dist_signmaml.load(run_dir, normalization=omniglot_root / "test")
    accuracies = api_accuracies(model, raw_test_episodes)
    mean, ci95 = confidence_interval(accuracies)
    print(f"\nevaluate {100 * scored['accuracy']:.4f} ± {100 * scored['ci95']:.4f}%; "
          f"API {100 * mean:.4f} ± {100 * ci95:.4f}% over {EPISODES} episodes")
    assert (mean, ci95) == (scored["accuracy"], scored["ci95"])
    assert 0 < accuracies.min() and accuracies.max() < 1, "episodes of varied accuracy, so a mismatch would show"
    probabilities = model.adapt(*raw_test_episodes[0][:2], steps=STEPS).predict(raw_test_episodes[0][2])
    assert probabilities.shape == (WAYS * QUERIES, WAYS)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(WAYS * QUERIES))


def test_the_export_stores_the_train_normalisation_and_the_api_rebuilds_the_run(run_dir, omniglot_root):
    with safe_open(str(run_dir / "model_best.safetensors"), framework="pt") as handle:
        stored = json.loads(handle.metadata()["normalization"])
    train_index = read_index(omniglot_root / "train")
    assert stored == {"mean": list(train_index.mean), "std": list(train_index.std)}
    model = dist_signmaml.load(run_dir)
    assert (model.preprocessing.mean, model.preprocessing.std) == (train_index.mean, train_index.std)
    assert model.preprocessing.image_shape == (28, 28, 1) and model.ways == WAYS
    assert model.learner.model.head.out_features == WAYS and model.learner.inner_lr == 0.005
    assert model.file.name == "model_best.safetensors"
    assert dist_signmaml.load(run_dir, weights="final").file.name == "model.safetensors"


def test_batchnorm_is_transductive_unless_the_support_statistics_are_used(run_dir, raw_test_episodes,
                                                                          one_torch_thread):
    model = dist_signmaml.load(run_dir)
    support_x, support_y, query_x, _ = raw_test_episodes[1]
    adapted = model.adapt(support_x, support_y.tolist(), steps=STEPS)
    batch = adapted.predict(query_x)
    alone = torch.cat([adapted.predict(image) for image in query_x])
    assert not torch.allclose(batch, alone, atol=1e-3), "one image normalised by its own statistics scores otherwise"
    in_support_mode = adapted.predict(query_x, batchnorm="support")
    torch.testing.assert_close(torch.cat([adapted.predict(image, batchnorm="support") for image in query_x]),
                               in_support_mode, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat([adapted.predict(query_x[:4], batchnorm="support"),
                                          adapted.predict(query_x[4:], batchnorm="support")]),
                               in_support_mode, atol=1e-5, rtol=0)
    # the support set itself is normalised with its own statistics either way
    torch.testing.assert_close(adapted.predict(support_x, batchnorm="support"), adapted.predict(support_x),
                               atol=1e-5, rtol=0)
    with pytest.raises(InferenceError, match="batchnorm='sometimes' is invalid"):
        adapted.predict(query_x, batchnorm="sometimes")

    figures = {name: api_accuracies(model, raw_test_episodes, **options).mean().item() for name, options in (
        ("query batch", {}), ("one query at a time", {"one_at_a_time": True}),
        ("support statistics", {"batchnorm": "support"}))}
    print("\n" + "; ".join(f"{name}: {100 * value:.2f}%" for name, value in figures.items()))


def test_every_image_form_gives_the_same_input(run_dir, raw_test_episodes, tmp_path):
    model = dist_signmaml.load(run_dir)
    pixels = raw_test_episodes[0][0]  # uint8 [5, 28, 28, 1]
    expected = model.preprocessing(pixels)
    files = []
    for i, image in enumerate(pixels):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(image[..., 0]).save(files[-1])
    forms = {"NCHW uint8 tensor": torch.from_numpy(pixels).permute(0, 3, 1, 2),
             "NHW grey": pixels[..., 0], "list of HWC": list(pixels),
             "float in [0, 1]": torch.from_numpy(pixels).float() / 255,
             "PIL images": [Image.fromarray(image[..., 0]) for image in pixels], "files": files,
             "RGB PIL images": [Image.fromarray(image[..., 0]).convert("RGB") for image in pixels]}
    for name, images in forms.items():
        torch.testing.assert_close(model.preprocessing(images), expected, atol=0, rtol=0, msg=name)
    big = Image.fromarray(np.kron(pixels[0][..., 0], np.ones((3, 3), dtype=np.uint8)))  # 84 px, resized to 28
    assert model.preprocessing([big]).shape == (1, 1, 28, 28)

    with pytest.raises(InferenceError, match=r"shape \(5, 32, 32\) do not match the training images \(28x28"):
        model.preprocessing(np.zeros((5, 32, 32), dtype=np.uint8))
    with pytest.raises(InferenceError, match=r"values in \[-1, 1\]: expected pixels in \[0, 1\]"):
        model.preprocessing(torch.linspace(-1, 1, 28 * 28).view(1, 28, 28))
    with pytest.raises(InferenceError, match="missing.png'.*cannot read the image"):
        model.preprocessing([tmp_path / "missing.png"])
    with pytest.raises(InferenceError, match="the support set has 2 classes, but .* 5-way tasks: give exactly 5"):
        model.adapt(pixels[:2], [0, 1])
    with pytest.raises(InferenceError, match="4 support images but 5 labels"):
        model.adapt(pixels[:4], ["a", "b", "c", "d", "e"])


def test_learned_step_sizes_come_back_with_the_weights(learned_run, run_dir, tmp_path):
    learned = json.loads((learned_run / "results.json").read_text())["inner_lr_learned"]
    model = dist_signmaml.load(learned_run, weights="final")
    assert model.learner.step_size_values() == learned
    assert any(abs(size - 0.005) > 1e-4 for sizes in learned.values() for size in sizes), "they did move"
    fixed = dist_signmaml.load(run_dir)
    assert fixed.learner.step_sizes() == 0.005

    # a file whose tensors do not fit the model of its own metadata fails, naming them
    tensors = load_file(str(learned_run / "model.safetensors"))
    with safe_open(str(run_dir / "model.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    save_file(tensors, str(tmp_path / "mixed.safetensors"), metadata=metadata)
    with pytest.raises(InferenceError, match=r"its metadata \(config, image_shape\) does not describe its tensors "
                                             r"\(1 differ, e\.g\. log_inner_lr: file \(18, 2\), config None\)"):
        dist_signmaml.load(tmp_path / "mixed.safetensors")
    del tensors["log_inner_lr"], tensors["head.bias"]
    save_file(tensors, str(tmp_path / "partial.safetensors"), metadata=metadata)
    with pytest.raises(InferenceError, match=r"does not describe its tensors \(1 differ, e\.g\. model\.head\.bias: "
                                             r"file None, config \(5,\)\)"):
        dist_signmaml.load(tmp_path / "partial.safetensors")


def without_normalisation(run_dir, tmp_path, data: str):
    """A copy of the export as written before the normalisation was stored, its config naming `data`."""
    with safe_open(str(run_dir / "model.safetensors"), framework="pt") as handle:
        metadata = dict(handle.metadata())
    del metadata["normalization"]
    metadata["config"] = json.dumps(json.loads(metadata["config"]) | {"data": data})
    file = tmp_path / f"old_{len(data)}.safetensors"
    save_file(load_file(str(run_dir / "model.safetensors")), str(file), metadata=metadata)
    return file


def test_old_exports_use_their_training_data_or_say_what_to_pass(run_dir, tmp_path, omniglot_root):
    train_index = read_index(omniglot_root / "train")
    with pytest.warns(UserWarning, match="stores no normalisation; using the statistics of"):
        model = dist_signmaml.load(without_normalisation(run_dir, tmp_path, str(omniglot_root)))
    assert model.preprocessing.mean == train_index.mean
    gone = without_normalisation(run_dir, tmp_path, str(tmp_path / "moved"))
    with pytest.raises(InferenceError, match=r"before the normalisation was stored .* predict --data ROOT"):
        dist_signmaml.load(gone)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dist_signmaml.load(gone, normalization=omniglot_root).preprocessing.std == train_index.std


# ---- the CLI -----------------------------------------------------------------------------------------------------

SHAPES = ("circle", "square", "cross", "bar", "triangle")


def draw(shape: str, rng: np.random.Generator, size: int = 60) -> Image.Image:
    """A white shape on black (Omniglot's polarity: ink is 255), at a random place and scale."""
    image = Image.new("L", (size, size), 0)
    pen = ImageDraw.Draw(image)
    r = int(rng.integers(12, 20))
    cx, cy = (int(v) for v in rng.integers(r + 2, size - r - 2, size=2))
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        pen.ellipse(box, outline=255, width=4)
    elif shape == "square":
        pen.rectangle(box, outline=255, width=4)
    elif shape == "cross":
        pen.line(box, fill=255, width=4)
        pen.line((cx - r, cy + r, cx + r, cy - r), fill=255, width=4)
    elif shape == "bar":
        pen.line((cx - r, cy, cx + r, cy), fill=255, width=6)
    else:
        pen.polygon((cx, cy - r, cx - r, cy + r, cx + r, cy + r), outline=255, width=4)
    return image


def shape_folder(root, per_class: int, seed: int):
    rng = np.random.default_rng(seed)
    for shape in SHAPES:
        (root / shape).mkdir(parents=True)
        for i in range(per_class):
            draw(shape, rng).convert("RGB").save(root / shape / f"{shape}_{i}.{'jpg' if i % 2 else 'png'}")
    return root


def test_cli_labels_a_generated_image_folder_like_the_api(run_dir, tmp_path, subprocess_env):
    support = shape_folder(tmp_path / "support", 2, seed=0)
    query = shape_folder(tmp_path / "query", 3, seed=1)
    out = tmp_path / "predictions.csv"
    done = subprocess.run([PYTHON, "-m", "dist_signmaml.predict", str(run_dir), "--support", str(support),
                           "--query", str(query), "--out", str(out)],
                          capture_output=True, text=True, env=subprocess_env, timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    print("\n" + out.read_text() + done.stderr.strip().splitlines()[-1])
    rows = list(csv.DictReader(out.open()))
    files = sorted(query.rglob("*.*"))
    assert [row["file"] for row in rows] == [str(f) for f in files]
    assert "labelled 15 query images" in done.stderr and "match their folder's class" in done.stderr

    # the same thread count as the CLI process, so both sum in the same order and agree to the CSV's 6 digits
    threads = torch.get_num_threads()
    torch.set_num_threads(int(subprocess_env["OMP_NUM_THREADS"]))
    try:
        model = dist_signmaml.load(run_dir)
        support_files = sorted(support.rglob("*.*"))
        adapted = model.adapt(support_files, [f.parent.name for f in support_files])
        probabilities = adapted.predict(files)
    finally:
        torch.set_num_threads(threads)
    assert [row["predicted_class"] for row in rows] == [adapted.classes[i] for i in probabilities.argmax(-1)]
    np.testing.assert_allclose([float(row["probability"]) for row in rows], probabilities.max(-1).values,
                               atol=1e-6)


@pytest.mark.parametrize("options, fragment", [
    ({"support": "nowhere", "query": "Q"}, "nowhere' is not a folder (expected SUPPORT/<class>/<image>.jpg)"),
    ({"support": "S", "query": "nowhere.jpg"}, "--query: 'nowhere.jpg' does not exist"),
    ({"support": "S"}, "give --support SUPPORT_DIR"),
    ({"support": "S", "query": "Q", "batchnorm": "running"}, "--batchnorm='running' is invalid"),
    ({"support": "S", "query": "Q", "colour": 1}, "unknown option(s) --colour"),
    ({"support": "S3", "query": "Q"}, "the support set has 3 classes, but"),
    ({"support": "EMPTY", "query": "Q"}, "EMPTY/bar' holds no .jpg/.jpeg/.png images"),
    ({"support": "S", "query": "Q", "weights": "newest"}, "--weights='newest' is invalid"),
])
def test_cli_bad_input_is_one_line_naming_the_path(run_dir, tmp_path, capsys, options, fragment):
    shape_folder(tmp_path / "S", 1, seed=0)
    shape_folder(tmp_path / "Q", 1, seed=1)
    for name, shapes in (("S3", SHAPES[:3]), ("EMPTY", SHAPES)):
        for shape in shapes:
            (tmp_path / name / shape).mkdir(parents=True)
            if shape != "bar":  # EMPTY/bar stays empty
                image = f"{shape}_0.png"
                (tmp_path / name / shape / image).write_bytes((tmp_path / "S" / shape / image).read_bytes())
    paths = {k: (str(tmp_path / v) if k in ("support", "query") and v != "nowhere.jpg" else v)
             for k, v in options.items()}
    with pytest.raises(SystemExit) as stopped:
        predict_main(str(run_dir), **paths)
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and fragment in error and len(error.splitlines()) == 1, error


def test_cli_names_a_run_that_is_not_there(tmp_path, capsys):
    support, query = shape_folder(tmp_path / "S", 1, seed=0), shape_folder(tmp_path / "Q", 1, seed=1)
    with pytest.raises(SystemExit):
        predict_main(str(tmp_path / "no_run"), support=str(support), query=str(query))
    error = capsys.readouterr().err.strip()
    assert error == (f"error: {str(tmp_path / 'no_run')!r} does not exist: expected a run directory (with "
                     f"model.safetensors) or a .safetensors file written by dist_signmaml.train")

"""Adapt a meta-trained model to your own classes and label new images.

    python -m dist_signmaml.predict runs/latest --support my_task/support --query my_task/query
    python -m dist_signmaml.predict runs/latest --support S --query a.jpg,b.png --out predictions.csv
    python -m dist_signmaml.predict --help

--support DIR holds one folder per class (DIR/<class>/*.jpg|jpeg|png), as many classes as the model was trained
for (its ways). --query is a folder (searched recursively) or image files. Images are resized as the shard builder
does. The CSV has one row per query image: file, predicted class, probability. Details: docs/predict.md.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import fire

from dist_signmaml.cli import path_and_options_signature, refuse_unknown_flags, run_with_one_line_errors
from dist_signmaml.inference import BATCHNORM_MODES, CROPS, InferenceError
from shards.imagefolder import IMAGE_EXTENSIONS

CSV_FIELDS = ("file", "predicted_class", "probability")


def support_set(directory: str | Path) -> tuple[list[Path], list[str]]:
    """DIR/<class>/<image> -> (image files, their class names), classes and files in sorted order."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InferenceError(f"--support={str(directory)!r} is not a folder (expected SUPPORT/<class>/<image>.jpg)")
    files, labels = [], []
    for folder in sorted(p for p in directory.iterdir() if p.is_dir()):
        images = image_files(folder)
        if not images:
            raise InferenceError(f"--support: class folder {str(folder)!r} holds no {'/'.join(IMAGE_EXTENSIONS)} images")
        files += images
        labels += [folder.name] * len(images)
    if not files:
        raise InferenceError(f"--support={str(directory)!r} has no class folders (expected SUPPORT/<class>/<image>.jpg)")
    return files, labels


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def query_files(query) -> list[Path]:
    """--query: folders (searched recursively) and image files, comma-separated or repeated by fire as a tuple."""
    items = query.split(",") if isinstance(query, str) else list(query) if isinstance(query, (list, tuple)) else [query]
    files = []
    for item in (str(i).strip() for i in items):
        if not item:
            continue
        path = Path(item)
        if path.is_dir():
            found = image_files(path)
            if not found:
                raise InferenceError(f"--query: folder {item!r} holds no {'/'.join(IMAGE_EXTENSIONS)} images")
            files += found
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise InferenceError(f"--query: {item!r} is not a {'/'.join(IMAGE_EXTENSIONS)} image")
            files.append(path)
        else:
            raise InferenceError(f"--query: {item!r} does not exist")
    if not files:
        raise InferenceError("--query: give a folder or image files")
    return files


def predict(path: str, *, support: str = "", query: str = "", steps: int = -1, out: str = "",
            weights: str = "best", batchnorm: str = "query", data: str = "", crop: str = "center",
            device: str = "") -> list[dict]:
    """Adapt on the support folder, label every query image; returns the CSV rows."""
    import dist_signmaml

    if not support or not query:
        raise InferenceError("give --support SUPPORT_DIR (one folder per class) and --query QUERY_DIR_OR_FILES")
    if batchnorm not in BATCHNORM_MODES:
        raise InferenceError(f"--batchnorm={batchnorm!r} is invalid: expected one of {', '.join(BATCHNORM_MODES)}")
    if crop not in CROPS:
        raise InferenceError(f"--crop={crop!r} is invalid: expected one of {', '.join(CROPS)}")
    support_images, support_labels = support_set(support)
    queries = query_files(query)
    model = dist_signmaml.load(path, weights=weights, device=device or None, normalization=data or None, crop=crop)
    adapted = model.adapt(support_images, support_labels, steps=None if steps == -1 else steps)
    probabilities = adapted.predict(queries, batchnorm=batchnorm)
    best, column = probabilities.max(dim=-1)
    rows = [{"file": str(file), "predicted_class": adapted.classes[c], "probability": f"{p:.6f}"}
            for file, c, p in zip(queries, column.tolist(), best.tolist())]
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", newline="") as handle:
            write_csv(handle, rows)
    else:
        write_csv(sys.stdout, rows)
    summary = (f"{model.file}: adapted to {len(adapted.classes)} classes ({len(support_images)} support images, "
               f"{model.config.test_inner_steps if steps == -1 else steps} {model.config.algo} steps), "
               f"labelled {len(rows)} query images" + (f" -> {out}" if out else ""))
    known = [file.parent.name for file in queries]
    if all(name in adapted.classes for name in known):  # query images sorted into class folders: score them
        correct = sum(row["predicted_class"] == name for row, name in zip(rows, known))
        summary += f"; {correct}/{len(rows)} match their folder's class"
    if batchnorm == "query" and len(rows) < model.ways:
        summary += (f". Note: BatchNorm normalised these {len(rows)} images with their own statistics; few images "
                    f"score differently than in a batch (--batchnorm support avoids that)")
    print(summary, file=sys.stderr)
    return rows


def write_csv(handle, rows: list[dict]) -> None:
    writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows(rows)


def main(path: str = "", **options) -> None:
    """Adapt a meta-trained model on a support folder and label query images (CSV: file, predicted_class, probability).

    Args:
      path: run directory (model_best.safetensors if the run validated, else model.safetensors) or a .safetensors file
      support: folder with one subfolder of images per class (as many classes as the model's ways)
      query: folder (searched recursively) or comma-separated image files to label
      steps: inner steps on the support set (default: the run's test_inner_steps)
      out: CSV file to write (default: print to stdout)
      weights: best | final, for a run directory (default best)
      batchnorm: query (normalise with the query batch's statistics, as training and evaluate do) | support (with the support set's: each image scored independently of the others)
      data: shard root the model was trained on, for exports that do not store their normalisation
      crop: center | stretch, how images are fitted to the training size (as shards build --crop)
      device: cpu | cuda | cuda:N (default: cuda when available)
    """
    if not path:
        print("error: give a run directory or a .safetensors file: python -m dist_signmaml.predict RUN_DIR "
              "--support SUPPORT_DIR --query QUERY_DIR", file=sys.stderr)
        sys.exit(2)
    run_with_one_line_errors(predict, path, options, (InferenceError,))


# `--help` lists predict's options with their defaults.
main.__signature__ = path_and_options_signature(predict)

if __name__ == "__main__":
    refuse_unknown_flags(sys.argv[1:], predict)
    fire.Fire(main)

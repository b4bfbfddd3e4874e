"""ImageFolder trees (SOURCE/<class>/<image>.jpg|png) -> class shards, optionally split by split files.

A split is defined by one of
  * a preset's class list: `mini-imagenet`, `cifar-fs`, `fc100` (shards/splits/, see its README), all three splits
    or one of them (`mini-imagenet:test`);
  * a class list file `NAME=classes.txt` (one class folder per line, `#` comments);
  * a per-image CSV `NAME=test.csv` with header `filename,label` (the Ravi mini-ImageNet format): the listed files,
    found at SOURCE/<label>/<filename> or SOURCE/<filename>.
Without split files every class folder goes into one split called `all`.

Output is canonical: classes sorted by name (label = position), images sorted by file name, so the same tree gives
byte-identical shards whatever the worker count.
"""

from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from shards.writer import DEFAULT_SHARD_MB, ordered_map, write_split

SPLITS_DIR = Path(__file__).resolve().parent / "splits"
PRESETS = {"mini-imagenet": "mini_imagenet", "cifar-fs": "cifar_fs", "fc100": "fc100"}
PRESET_SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
CROPS = ("center", "stretch")
MODES = {"RGB": 3, "L": 1}


@dataclass(frozen=True)
class ClassJob:
    name: str
    files: tuple[str, ...]
    image_size: int
    crop: str
    mode: str


def read_class_list(path: Path) -> list[str]:
    names = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    if not names:
        raise ValueError(f"split file {path} lists no classes")
    return names


def read_file_list(path: Path) -> dict[str, list[str]]:
    """A `filename,label` CSV -> {class: [file names]}."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"filename", "label"} <= set(reader.fieldnames):
            raise ValueError(f"split file {path}: expected a CSV with header 'filename,label', got {reader.fieldnames}")
        files: dict[str, list[str]] = {}
        for row in reader:
            files.setdefault(row["label"], []).append(row["filename"])
    if not files:
        raise ValueError(f"split file {path} lists no images")
    return files


def parse_splits(splits) -> dict[str, Path | list[str]]:
    """`--splits` -> {split name: class list or CSV path}. Items are comma-separated (or a list)."""
    if splits is None or splits == "":
        return {}
    items = [s.strip() for s in splits.split(",")] if isinstance(splits, str) else [str(s).strip() for s in splits]
    parsed: dict[str, Path | list[str]] = {}
    for item in filter(None, items):
        preset, _, only = item.partition(":")
        if preset in PRESETS:
            chosen = only.split("+") if only else list(PRESET_SPLITS)
            for split in chosen:
                if split not in PRESET_SPLITS:
                    raise ValueError(f"--splits={item!r}: preset {preset} has splits {', '.join(PRESET_SPLITS)}, not {split!r}")
                parsed[split] = read_class_list(SPLITS_DIR / PRESETS[preset] / f"{split}.txt")
            continue
        name, _, path = item.rpartition("=")
        path = Path(path)
        name = name or path.stem
        if not path.is_file():
            raise ValueError(f"--splits={item!r}: {path} is not a file (expected a preset {', '.join(PRESETS)}, "
                             f"NAME=classes.txt or NAME=files.csv)")
        if name in parsed:
            raise ValueError(f"--splits: split {name!r} given twice")
        parsed[name] = path
    return parsed


def list_images(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def split_jobs(source: Path, definition, image_size: int, crop: str, mode: str) -> list[ClassJob]:
    """The classes of one split, each with its sorted image files, after checking they all exist."""
    if isinstance(definition, Path) and definition.suffix.lower() == ".csv":
        files_by_class = read_file_list(definition)
        jobs = []
        for name in sorted(files_by_class):
            paths = []
            for filename in sorted(files_by_class[name]):
                candidates = (source / name / filename, source / filename)
                found = next((p for p in candidates if p.is_file()), None)
                if found is None:
                    raise ValueError(f"{definition}: image {filename!r} of class {name!r} not found as "
                                     f"{candidates[0]} or {candidates[1]}")
                paths.append(str(found))
            jobs.append(ClassJob(name, tuple(paths), image_size, crop, mode))
        return jobs
    names = read_class_list(definition) if isinstance(definition, Path) else list(definition)
    missing = [n for n in names if not (source / n).is_dir()]
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise ValueError(f"{len(missing)} classes of the split are not folders under {source}: {shown}")
    return [ClassJob(n, tuple(str(source / n / f) for f in list_images(source / n)), image_size, crop, mode)
            for n in sorted(set(names))]


def prepare_image(path: str, image_size: int, crop: str, mode: str) -> np.ndarray:
    """Decode one image file to uint8 [H, W, C] with `fit_image`."""
    with Image.open(path) as image:
        return fit_image(image, image_size, crop, mode)


def fit_image(image: Image.Image, image_size: int, crop: str, mode: str) -> np.ndarray:
    """A PIL image -> uint8 [H, W, C]: converted to RGB or grey, then centre-cropped to a square and resized
    (`crop=center`) or resized without keeping the aspect ratio (`crop=stretch`); size 0 keeps the size.
    `dist_signmaml.predict` prepares new images with this too, so they match the shards a model was trained on."""
    image = image.convert(mode)
    if image_size:
        if crop == "center":
            image = ImageOps.fit(image, (image_size, image_size), method=Image.Resampling.LANCZOS)
        elif image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def load_class(job: ClassJob) -> tuple[str, np.ndarray | None, list[str]]:
    """(class name, uint8 [n, H, W, C] or None if nothing decodes, messages about files that failed)."""
    images, problems = [], []
    for path in job.files:
        try:
            image = prepare_image(path, job.image_size, job.crop, job.mode)
        except Exception as error:  # PIL raises many types for bad files (OSError, SyntaxError, DecompressionBombError)
            problems.append(f"{path}: cannot decode image ({type(error).__name__}: {error})")
            continue
        if images and image.shape != images[0].shape:
            problems.append(f"{path}: image size {image.shape[1]}x{image.shape[0]} differs from "
                            f"{images[0].shape[1]}x{images[0].shape[0]} of the class's first image; use --image_size")
            continue
        images.append(image)
    return job.name, (np.stack(images) if images else None), problems


def build(source: str | Path, out: str | Path, splits=None, image_size: int = 0, crop: str = "center",
          mode: str = "RGB", shard_mb: float = DEFAULT_SHARD_MB, workers: int = 0, name: str | None = None,
          on_bad_image: str = "error", progress: bool = True) -> dict[str, dict]:
    """Build OUT/<split>/ shards from the ImageFolder tree SOURCE; returns {split: index}."""
    source = Path(source)
    if not source.is_dir():
        raise ValueError(f"--source={str(source)!r} is not a folder (expected SOURCE/<class>/<image>.jpg|png)")
    if crop not in CROPS:
        raise ValueError(f"--crop={crop!r} is invalid: expected one of {', '.join(CROPS)}")
    if mode not in MODES:
        raise ValueError(f"--mode={mode!r} is invalid: expected RGB or L (grey)")
    if not isinstance(image_size, int) or image_size < 0:
        raise ValueError(f"--image_size={image_size!r} is invalid: expected pixels > 0, or 0 to keep the size")
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"--on_bad_image={on_bad_image!r} is invalid: expected error or skip")
    definitions = parse_splits(splits) or {"all": sorted(p.name for p in source.iterdir() if p.is_dir())}
    stem = source.resolve().parent.name if source.name in ("train", "val", "test", "all", "images") else source.name
    dataset = name or f"{stem}-{image_size or 'native'}{'' if mode == 'RGB' else '-grey'}"
    indexes = {}
    for split, definition in definitions.items():
        jobs = split_jobs(source, definition, image_size, crop, mode)
        empty = [job.name for job in jobs if not job.files]
        if empty:
            raise ValueError(f"split {split}: class folders without {'/'.join(IMAGE_EXTENSIONS)} images: {empty[:8]}")
        skipped: list[str] = []
        # write_split records `source` in index.json after consuming the classes, so the count below is final there
        source_record = {"builder": "imagefolder", "image_size": int(image_size), "crop": crop, "mode": mode,
                         "split_definition": definition.name if isinstance(definition, Path) else "class list",
                         "skipped_images": 0}

        def decoded_classes():
            for class_name, images, problems in ordered_map(load_class, jobs, workers):
                if problems and on_bad_image == "error":
                    raise ValueError(f"{problems[0]} (--on_bad_image skip leaves such files out)")
                skipped.extend(problems)
                source_record["skipped_images"] = len(skipped)
                if images is not None:
                    yield class_name, images

        indexes[split] = write_split(decoded_classes(), Path(out) / split, dataset=dataset, split=split,
                                     num_classes=len(jobs), shard_mb=shard_mb, progress=progress, source=source_record)
        if skipped:
            warnings.warn(f"split {split}: skipped {len(skipped)} undecodable images (--on_bad_image skip), e.g. "
                          f"{skipped[0]}", stacklevel=2)
    return indexes

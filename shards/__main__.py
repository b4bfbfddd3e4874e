"""Build, inspect and verify shards; materialise fixed evaluation episodes.

    python -m shards build omniglot --out data/shards/omniglot-28 [--splits train,val,test] [--image_size 28] [--workers 2]
    python -m shards build imagefolder --source DIR --out OUT [--splits mini-imagenet|cifar-fs|fc100|NAME=FILE,...]
                                      [--image_size 84] [--crop center|stretch] [--mode RGB|L] [--shard_mb 64]
    python -m shards inspect DIR
    python -m shards verify DIR
    python -m shards episodes SPLIT_DIR --out OUT [--ways 5 --shots 1 --queries 15 --episodes 1000 --seed 2021]
"""

from __future__ import annotations

import inspect
import json
import sys
import tempfile

import fire

from dist_signmaml.data import storage
from dist_signmaml.data.format import ShardFormatError


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _refuse_unknown(command: str, function, unknown: dict) -> None:
    """fire hands flags it cannot match to the trailing **unknown_options: refuse them before any work (without
    the catch-all, fire would run the whole command and complain about the flag afterwards)."""
    if unknown:
        known = [n for n in inspect.signature(function).parameters if n != "unknown_options"]
        _fail(f"unknown option(s) {', '.join('--' + k for k in sorted(unknown))} for `shards {command}`; known: "
              f"{', '.join('--' + k for k in known)}")


def _split_list(value) -> list[str]:
    if isinstance(value, str):
        return [s for s in value.split(",") if s]
    return [str(s) for s in value]


def build(dataset: str, out: str, splits=None, image_size: int | None = None, shard_mb: float | None = None,
          workers: int = 0, source: str | None = None, crop: str = "center", mode: str = "RGB",
          name: str | None = None, on_bad_image: str = "error", progress: bool = True, **unknown_options):
    """Build shards for DATASET into OUT/<split>/ (shard-*.tar + index.json per split).

    Args:
        dataset: omniglot | imagefolder.
        out: output folder, or an s3://, gs:// or https:// URL (built in a temporary folder, then uploaded with each
            split's index.json last); each split becomes OUT/<split>/.
        splits: omniglot: comma-separated of train,val,test,trainval (Vinyals) and background,evaluation (Lake);
            default train,val,test. imagefolder: comma-separated presets (mini-imagenet, cifar-fs, fc100, optionally
            PRESET:test or PRESET:train+val) and NAME=FILE items (FILE a class list .txt or a filename,label .csv);
            default: every class folder into one split "all".
        image_size: square side in pixels (omniglot default 28; imagefolder default 0 = keep the source size).
        shard_mb: target shard size in MB (omniglot default 4, so a window holds part of the split; else 64).
        workers: processes decoding/resizing images (0 = none); the output is identical for any value.
        source: imagefolder only: the folder with one sub-folder per class.
        crop: imagefolder: center (centre square crop, then resize) or stretch (resize to a square).
        mode: imagefolder: RGB or L (grey).
        name: dataset name written to the index (default derived from the source).
        on_bad_image: imagefolder: error (default) or skip undecodable image files with a warning.
        progress: show a progress bar.
    """
    _refuse_unknown("build", build, unknown_options)
    whole = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    for flag, value, ok, expected in (
            ("image_size", image_size, image_size is None or (whole(image_size) and image_size >= 0),
             "pixels > 0, or 0 to keep the size"),
            ("shard_mb", shard_mb, shard_mb is None or (isinstance(shard_mb, (int, float)) and not isinstance(shard_mb, bool)
                                                        and shard_mb > 0), "a positive size in MB"),
            ("workers", workers, whole(workers) and workers >= 0, "an integer >= 0"),
            ("on_bad_image", on_bad_image, on_bad_image in ("error", "skip"), "error or skip")):
        if not ok:
            _fail(f"--{flag}={value!r} is invalid: expected {expected}")
    if storage.is_remote(out):
        with tempfile.TemporaryDirectory(prefix="shards-build-") as local:
            build(dataset, local, splits, image_size, shard_mb, workers, source, crop, mode, name, on_bad_image,
                  progress)
            try:
                written = storage.upload_tree(local, out)
            except OSError as error:
                _fail(str(error))
        print(f"uploaded {len(written)} files to {out}")
        return
    try:
        if dataset == "omniglot":
            from shards import omniglot

            indexes = omniglot.build(out, splits=_split_list(splits or "train,val,test"),
                                     image_size=28 if image_size is None else int(image_size),
                                     shard_mb=omniglot.DEFAULT_SHARD_MB if shard_mb is None else float(shard_mb),
                                     progress=progress, workers=int(workers))
        elif dataset == "imagefolder":
            from shards import imagefolder
            from shards.writer import DEFAULT_SHARD_MB

            if source is None:
                _fail("build imagefolder needs --source DIR (a folder with one sub-folder per class)")
            indexes = imagefolder.build(source, out, splits=splits, image_size=int(image_size or 0), crop=crop,
                                        mode=mode, shard_mb=DEFAULT_SHARD_MB if shard_mb is None else float(shard_mb),
                                        workers=int(workers), name=name, on_bad_image=on_bad_image, progress=progress)
        else:
            _fail(f"dataset {dataset!r} is not known; expected omniglot or imagefolder")
    except (ValueError, FileNotFoundError) as error:
        _fail(str(error))
    for split, index in indexes.items():
        print(f"{out}/{split}: {index['num_classes']} classes, {index['num_images']} images, "
              f"{len(index['shards'])} shards, image shape {index['image_shape']}")


def inspect_splits(path: str, json_output: bool = False, **unknown_options):
    """Summarise the split(s) in PATH from their index.json (classes, images, shards, shapes, sizes)."""
    _refuse_unknown("inspect", inspect_splits, unknown_options)
    from shards.checks import split_dirs, summary

    try:
        facts = [summary(d) for d in split_dirs(path)]
    except (ValueError, OSError) as error:
        _fail(str(error))
    if json_output:
        print(json.dumps(facts, indent=1))
        return
    for f in facts:
        what = (f"{f['episodes']} episodes {f['ways']}-way {f['shots']}-shot {f['queries']}-query (seed {f['seed']})"
                if f["kind"] == "episodes" else
                f"{f['classes']} classes, {f['images']} images ({f['images_per_class_min']}-{f['images_per_class_max']} "
                f"per class), mean {f['mean']} std {f['std']}")
        print(f"{f['dir']}: {f['dataset']}/{f['split']} [{f['kind']}] {what}; image {f['image_shape']}; "
              f"{f['shards']} shards, {f['bytes'] / 1e6:.1f} MB (largest {f['largest_shard_bytes'] / 1e6:.1f} MB)")


def verify(path: str, **unknown_options):
    """Check every shard in PATH (a folder, or s3://, gs://, https:// URL) against its index: checksums,
    decodability (no unpickling), counts. Exit 1 on problems."""
    _refuse_unknown("verify", verify, unknown_options)
    from shards.checks import split_dirs, verify_split

    try:
        dirs = split_dirs(path)
    except (ValueError, OSError) as error:
        _fail(str(error))
    failed = 0
    for split_dir in dirs:
        try:
            problems, counts = verify_split(split_dir)
        except (ShardFormatError, OSError) as error:
            problems, counts = [str(error)], {}
        for problem in problems:
            print(f"PROBLEM {problem}")
        print(f"{'FAILED' if problems else 'OK'} {split_dir}: {', '.join(f'{v} {k}' for k, v in counts.items())}"
              f"{f'; {len(problems)} problems' if problems else ''}")
        failed += bool(problems)
    if failed:
        sys.exit(1)


def episodes(split_dir: str, out: str, ways: int = 5, shots: int = 1, queries: int = 15, episodes: int = 1000,
             seed: int = 2021, shard_mb: float = 64.0, progress: bool = True, **unknown_options):
    """Materialise EPISODES fixed episodes of the class split SPLIT_DIR into episode shards in OUT.

    Episode i is the one `fixed_episodes(SPLIT_DIR, ..., seed=SEED)` draws, so evaluating on OUT or on SPLIT_DIR with
    that seed scores the same tasks. Pass OUT as the split to evaluate (it is detected from its index.json).
    The default seed is the one `dist_signmaml.evaluate` draws its fixed episodes with (EVALUATION_SEED).
    """
    _refuse_unknown("episodes", episodes, unknown_options)
    from shards.episode_writer import materialise

    try:
        index = materialise(split_dir, out, ways=ways, shots=shots, queries=queries, episodes=episodes, seed=seed,
                            shard_mb=shard_mb, progress=progress)
    except (ValueError, FileNotFoundError) as error:
        _fail(str(error))
    print(f"{out}: {index['num_episodes']} episodes {ways}-way {shots}-shot {queries}-query of "
          f"{index['dataset']}/{index['split']}, {len(index['shards'])} shards")


if __name__ == "__main__":
    fire.Fire({"build": build, "inspect": inspect_splits, "verify": verify, "episodes": episodes})

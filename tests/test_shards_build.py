"""Shard builders: ImageFolder (generated here, and the real mini-ImageNet test classes when present), Omniglot,
split files, determinism, inspect/verify."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dist_signmaml.config import REPO_ROOT
from dist_signmaml.data.format import read_class_shard, read_index
from shards import imagefolder, omniglot
from shards.checks import verify_split
from tests.shard_fixtures import make_image_folder

MINI_IMAGENET = REPO_ROOT.parent / "shared" / "data" / "mini-imagenet"
CLASSES = {"cat": 7, "dog": 6, "grey_owl": 5, "zebra": 4}


def file_digests(split_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(split_dir.iterdir())}


def all_classes(split_dir: Path) -> dict[str, np.ndarray]:
    index = read_index(split_dir)
    found = {}
    for shard in index.shards:
        found |= read_class_shard(split_dir / shard, index.image_shape)
    return found


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("folder") / "src", CLASSES)


def test_imagefolder_round_trip_rgb_center_crop(tree, tmp_path):
    indexes = imagefolder.build(tree, tmp_path / "out", image_size=12, crop="center", mode="RGB", progress=False)
    split = tmp_path / "out" / "all"
    index = read_index(split)
    assert indexes["all"]["num_images"] == sum(CLASSES.values())
    assert index.image_shape == (12, 12, 3)
    assert {n: c for n, (_, c) in index.classes.items()} == CLASSES
    stored = all_classes(split)
    for name in CLASSES:
        files = sorted((tree / name).iterdir())
        expected = np.stack([imagefolder.prepare_image(str(f), 12, "center", "RGB") for f in files])
        np.testing.assert_array_equal(stored[name], expected)  # sorted file order, exact pixels
    # labels follow the sorted class names
    raw = json.loads((split / "index.json").read_text())
    assert [c["name"] for s in raw["shards"] for c in s["classes"]] == sorted(CLASSES)
    assert raw["kind"] == "classes" and raw["channels"] == 3
    problems, counts = verify_split(split)
    assert problems == [] and counts == {"classes": 4, "images": 22}


def test_imagefolder_grey_and_stretch_and_centre_crop_geometry(tree, tmp_path):
    imagefolder.build(tree, tmp_path / "g", image_size=10, crop="stretch", mode="L", progress=False)
    assert read_index(tmp_path / "g" / "all").image_shape == (10, 10, 1)
    # centre crop keeps the middle of a wide image: a 30x10 image with a bright middle third crops to all-bright
    wide = np.zeros((10, 30, 3), dtype=np.uint8)
    wide[:, 10:20] = 255
    from PIL import Image

    path = tmp_path / "wide.png"
    Image.fromarray(wide).save(path)
    assert imagefolder.prepare_image(str(path), 10, "center", "RGB").min() == 255
    assert imagefolder.prepare_image(str(path), 10, "stretch", "RGB").min() < 128


def test_native_size_mismatch_is_a_clear_error(tree, tmp_path):
    with pytest.raises(ValueError, match=r"differs from .* use --image_size"):
        imagefolder.build(tree, tmp_path / "n", image_size=0, progress=False)


def test_build_is_byte_identical_across_runs_and_worker_counts(tree, tmp_path):
    # tiny shards: several shards, and the 7-image class is larger than a shard, so it is written as chunks
    a = imagefolder.build(tree, tmp_path / "a", image_size=12, shard_mb=0.002, workers=0, progress=False)
    imagefolder.build(tree, tmp_path / "b", image_size=12, shard_mb=0.002, workers=2, progress=False)
    assert len(a["all"]["shards"]) >= 4
    assert file_digests(tmp_path / "a" / "all") == file_digests(tmp_path / "b" / "all")
    index = read_index(tmp_path / "a" / "all")
    assert max(index.shard_bytes.values()) > 2000  # a class bigger than the target got a shard of its own
    for name, images in all_classes(tmp_path / "a" / "all").items():
        assert len(images) == CLASSES[name]  # chunks reassembled in order
    assert verify_split(tmp_path / "a" / "all")[0] == []


def test_split_files_csv_and_class_list(tree, tmp_path):
    csv_path = tmp_path / "few.csv"
    picked = sorted(p.name for p in (tree / "dog").iterdir())[:3]
    csv_path.write_text("filename,label\n" + "".join(f"{f},dog\n" for f in picked)
                        + "".join(f"{f},cat\n" for f in sorted(p.name for p in (tree / "cat").iterdir())))
    list_path = tmp_path / "rest.txt"
    list_path.write_text("# two classes\nzebra\ngrey_owl\n")
    imagefolder.build(tree, tmp_path / "o", splits=f"train={csv_path},test={list_path}", image_size=8, progress=False)
    train, test = read_index(tmp_path / "o" / "train"), read_index(tmp_path / "o" / "test")
    assert {n: c for n, (_, c) in train.classes.items()} == {"cat": 7, "dog": 3}
    assert sorted(test.classes) == ["grey_owl", "zebra"]
    with pytest.raises(ValueError, match="not found"):
        bad = tmp_path / "bad.csv"
        bad.write_text("filename,label\nnope.jpg,dog\n")
        imagefolder.build(tree, tmp_path / "x", splits=str(bad), image_size=8, progress=False)
    with pytest.raises(ValueError, match=r"20 classes of the split are not folders under .*baby"):
        imagefolder.build(tree, tmp_path / "x", splits="cifar-fs:test", image_size=8, progress=False)


def test_published_split_lists_have_the_published_sizes():
    sizes = {}
    for preset in imagefolder.PRESETS:
        lists = imagefolder.parse_splits(preset)
        sizes[preset] = tuple(len(lists[s]) for s in ("train", "val", "test"))
        assert sum(sizes[preset]) == len(set().union(*map(set, lists.values())))  # disjoint splits
    assert sizes == {"mini-imagenet": (64, 16, 20), "cifar-fs": (64, 16, 20), "fc100": (60, 20, 20)}
    cifar = set().union(*map(set, imagefolder.parse_splits("cifar-fs").values()))
    assert cifar == set().union(*map(set, imagefolder.parse_splits("fc100").values())) and len(cifar) == 100
    assert imagefolder.parse_splits("fc100:test")["test"][:5] == ["beaver", "dolphin", "otter", "seal", "whale"]


def test_undecodable_image_error_names_the_file_and_skip_counts_it(tree, tmp_path):
    import shutil

    broken = tmp_path / "src"
    shutil.copytree(tree, broken)
    (broken / "cat" / "cat_999.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(ValueError, match=r"cat_999\.jpg: cannot decode image"):
        imagefolder.build(broken, tmp_path / "e", image_size=8, progress=False)
    with pytest.warns(UserWarning, match="skipped 1 undecodable images"):
        index = imagefolder.build(broken, tmp_path / "s", image_size=8, on_bad_image="skip", progress=False)["all"]
    assert index["source"]["skipped_images"] == 1 and index["num_images"] == sum(CLASSES.values())


def test_cli_build_inspect_verify(tree, tmp_path):
    run = lambda *args: subprocess.run([sys.executable, "-m", "shards", *args], cwd=REPO_ROOT, capture_output=True,  # noqa: E731
                                       text=True, timeout=120)
    built = run("build", "imagefolder", "--source", str(tree), "--out", str(tmp_path / "c"), "--image_size", "8",
                "--progress", "False")
    assert built.returncode == 0, built.stderr
    assert "4 classes, 22 images" in built.stdout
    shown = run("inspect", str(tmp_path / "c"))
    assert "4 classes, 22 images (4-7 per class)" in shown.stdout and "image [8, 8, 3]" in shown.stdout
    assert run("verify", str(tmp_path / "c")).returncode == 0
    shard = tmp_path / "c" / "all" / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF  # flip a byte inside the first class's pixels: decodes, but the checksum no longer matches
    shard.write_bytes(bytes(data))
    failed = run("verify", str(tmp_path / "c"))
    assert failed.returncode == 1 and "sha256 differs" in failed.stdout and "FAILED" in failed.stdout
    unknown = run("build", "imagenet21k", "--out", str(tmp_path / "u"))
    assert unknown.returncode == 2 and "expected omniglot or imagefolder" in unknown.stderr


def test_omniglot_vinyals_rotations_lake_split_and_workers():
    characters = omniglot.load_characters()
    assert len(omniglot.split_class_names("evaluation")) == 659 and len(omniglot.split_class_names("background")) == 964
    names = omniglot.split_class_names("val")
    assert len(names) == 688 and all(n.rsplit("/", 1)[1] in ("rot000", "rot090", "rot180", "rot270") for n in names)
    serial = list(omniglot.iter_split_classes("val", 20, characters=characters, workers=0))
    parallel = list(omniglot.iter_split_classes("val", 20, characters=characters, workers=2))
    assert [n for n, _ in serial] == names == [n for n, _ in parallel]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(serial, parallel))
    first = dict(serial[:4])
    base = first[names[0]]
    assert base.shape == (20, 20, 20, 1) and base.dtype == np.uint8
    np.testing.assert_array_equal(first[names[1]], np.rot90(base, 1, axes=(1, 2)))  # rot090 = a quarter turn
    np.testing.assert_array_equal(first[names[2]], np.rot90(base, 2, axes=(1, 2)))
    lake_name, lake_images = next(omniglot.iter_split_classes("evaluation", 20, characters=characters))
    assert "/rot" not in lake_name  # Lake's split: characters as they are, no rotated copies
    np.testing.assert_array_equal(lake_images[..., 0], omniglot.resize(characters[lake_name], 20))
    with pytest.raises(ValueError, match="unknown Omniglot split"):
        omniglot.build("/nonexistent", splits=("tain",))


@pytest.mark.skipif(not (MINI_IMAGENET / "test").is_dir(),
                    reason=f"mini-ImageNet test classes not present at {MINI_IMAGENET}/test (shared data folder absent)")
def test_mini_imagenet_test_split_from_ravi_csv(tmp_path):
    csv_path = MINI_IMAGENET / "splits" / "ravi" / "test.csv"
    index = imagefolder.build(MINI_IMAGENET / "test", tmp_path / "mini", splits=f"test={csv_path}", workers=2,
                              progress=False)["test"]
    assert (index["num_classes"], index["num_images"], index["image_shape"]) == (20, 12000, [84, 84, 3])
    assert index["images_per_class"] == {"min": 600, "max": 600}
    assert len(index["shards"]) >= 4  # 254 MB of pixels in ~64 MB shards
    problems, counts = verify_split(tmp_path / "mini" / "test")
    assert problems == [] and counts == {"classes": 20, "images": 12000}
    # the preset's class list selects the same classes and files as the Ravi CSV
    preset_jobs = imagefolder.split_jobs(MINI_IMAGENET / "test", imagefolder.parse_splits("mini-imagenet:test")["test"],
                                         84, "center", "RGB")
    csv_jobs = imagefolder.split_jobs(MINI_IMAGENET / "test", csv_path, 84, "center", "RGB")
    assert preset_jobs == csv_jobs
    from dist_signmaml.data import EpisodeShape, EpisodeStream

    stream = EpisodeStream(tmp_path / "mini" / "test", EpisodeShape(5, 1, 15), 2, seed=0, num_workers=2)
    batch = stream.batch(0)
    assert batch.support_x.shape == (2, 5, 3, 84, 84) and batch.query_x.shape == (2, 75, 3, 84, 84)
    assert abs(float(batch.query_x.mean())) < 0.5 and 0.5 < float(batch.query_x.std()) < 1.5  # standardised


def test_shards_keep_the_webdataset_layout(tree, tmp_path):
    """Our strict reader and webdataset's own tar iterator see the same samples (keys and member bytes)."""
    import webdataset as wds

    from dist_signmaml.data.format import iter_raw_samples

    imagefolder.build(tree, tmp_path / "w", image_size=8, shard_mb=0.002, progress=False)
    for shard in read_index(tmp_path / "w" / "all").shard_paths:
        ours = list(iter_raw_samples(shard))
        theirs = list(wds.tarfile_samples([{"url": str(shard)}]))
        assert ours and [dict(s) for s in ours] == [dict(s) for s in theirs]


def test_cli_refuses_a_misspelled_or_invalid_flag_before_any_work(tree, tmp_path):
    run = lambda *args: subprocess.run([sys.executable, "-m", "shards", *args], cwd=REPO_ROOT, capture_output=True,  # noqa: E731
                                       text=True, timeout=120)
    done = run("build", "imagefolder", "--source", str(tree), "--out", str(tmp_path / "o"), "--image_szie", "8")
    assert done.returncode == 2 and done.stderr.startswith("error: unknown option(s) --image_szie for `shards build`; "
                                                           "known: --dataset, --out,") and done.stderr.count("\n") == 1
    assert not (tmp_path / "o").exists()  # nothing was built at the default size
    done = run("build", "imagefolder", "--source", str(tree), "--out", str(tmp_path / "o"), "--shard_mb", "-1")
    assert done.returncode == 2 and done.stderr == "error: --shard_mb=-1 is invalid: expected a positive size in MB\n"
    done = run("verify", str(tmp_path), "--deep")
    assert done.returncode == 2 and done.stderr == "error: unknown option(s) --deep for `shards verify`; known: --path\n"
    assert not (tmp_path / "o").exists()

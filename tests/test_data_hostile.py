"""Shards and indexes built to hurt the reader: oversized members, FIFOs and devices, checksums that differ from the
index, image shapes that would size a huge model, deep JSON, huge names, floods of bad members and two samples with
one class name. Each is refused before the damage (allocation, hang, silent merge) with one line naming the file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

from dist_signmaml.config import REPO_ROOT
from dist_signmaml.data import EpisodeShape, EpisodeStream
from dist_signmaml.data.format import (
    MAX_MEMBER_BYTES,
    MAX_TRAILER_BYTES,
    BadSamples,
    ShardFormatError,
    encode_sample,
    read_class_shard,
    read_index,
)
from shards.checks import verify_split
from tests.shard_fixtures import reindex, write_identifiable_split, write_tar



def members_of(key: str, name: str, n: int = 3, chunk: int = 0, label: int = 0):
    sample = encode_sample(key, name, label, np.full((n, 4, 4, 1), 7, dtype=np.uint8), chunk)
    return [(f"{key}.{suffix}", data) for suffix, data in sample.items() if suffix != "__key__"]


def finishes(function, seconds: float = 60.0):
    """Run `function` in a thread; a reader that hangs (the defect) leaves it alive and fails the test."""
    outcome = {}

    def run():
        try:
            outcome["value"] = function()
        except BaseException as error:  # noqa: BLE001 - handed back to the test
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the reader hangs"
    return outcome


@pytest.fixture()
def split(tmp_path) -> Path:
    write_identifiable_split(tmp_path / "s", n_classes=8, images_per_class=4, shard_mb=0.0006, size=8)
    return tmp_path / "s"


def sparse_shard(path: Path, claimed: int) -> Path:
    """A tar whose first member's header claims `claimed` bytes, as a sparse file (tiny on disk)."""
    info = tarfile.TarInfo("c0000000.images.npy")
    info.size = claimed
    with open(path, "wb") as handle:
        handle.write(info.tobuf(format=tarfile.GNU_FORMAT))
        handle.truncate(512 + claimed + 1024)
    return path


def test_a_member_bigger_than_the_shard_or_the_cap_is_refused_before_it_is_read(split, tmp_path):
    index = read_index(split)
    victim = split / index.shards[0]
    sparse_shard(victim, 3 << 30)
    stream = EpisodeStream(split, EpisodeShape(2, 1, 1), 2, seed=0, window_shards=64)
    with pytest.raises(ShardFormatError, match=rf"{victim}: {victim.stat().st_size} bytes, the index says "
                                               rf"{index.shard_bytes[index.shards[0]]}"):
        stream.batch(0)
    # without an index entry (a bare shard) the hard cap applies, again before any byte of the member is read
    lone = sparse_shard(tmp_path / "lone.tar", 3 << 30)
    with pytest.raises(ShardFormatError, match=rf"lone\.tar member 'c0000000\.images\.npy': {3 << 30} bytes, more "
                                               rf"than the {MAX_MEMBER_BYTES} a member may have"):
        read_class_shard(lone)


def test_fifo_and_device_shards_are_refused_at_once_and_the_trailer_scan_is_bounded(split, tmp_path):
    index = read_index(split)
    fifo, device = split / index.shards[0], split / index.shards[1]
    fifo.unlink()
    os.mkfifo(fifo)
    device.unlink()
    device.symlink_to("/dev/zero")
    outcome = finishes(lambda: read_class_shard(fifo))
    assert "a FIFO; shards and indexes must be regular files" in str(outcome["error"])
    outcome = finishes(lambda: read_class_shard(device))
    assert "a character device; shards and indexes must be regular files" in str(outcome["error"])
    problems = finishes(lambda: verify_split(split))["value"][0]
    assert f"{fifo}: a FIFO; shards and indexes must be regular files" in problems
    assert any(str(device) in p and "a character device" in p for p in problems)
    # a real shard followed by megabytes of zeros is not a shard either (and the scan stops after the bound)
    padded = tmp_path / "padded.tar"
    padded.write_bytes(write_tar(tmp_path / "ok.tar", members_of("c0000000", "a")).read_bytes() + bytes(2 * MAX_TRAILER_BYTES))
    with pytest.raises(ShardFormatError, match=rf"padded\.tar: more than {MAX_TRAILER_BYTES} bytes after the end"):
        read_class_shard(padded)


def test_a_shard_whose_sha256_differs_from_the_index_is_a_bad_sample(split):
    index = read_index(split)
    victim = split / index.shards[0]
    data = bytearray(victim.read_bytes())
    data[data.index(b"\x93NUMPY") + 200] ^= 0xFF  # one pixel: the shard still decodes, only the checksum differs
    victim.write_bytes(bytes(data))
    stream = EpisodeStream(split, EpisodeShape(2, 1, 1), 2, seed=0, window_shards=64)
    with pytest.raises(ShardFormatError, match=rf"{victim}: sha256 differs from the index \(corrupt or modified"):
        stream.batch(0)
    skipping = EpisodeStream(split, EpisodeShape(2, 1, 1), 2, seed=0, window_shards=64, on_bad_sample="skip")
    with pytest.warns(UserWarning, match=r"skipped bad sample #1 .*sha256 differs from the index"):
        skipping.batch(0)
        skipping.batch(1)
    assert skipping.bad_samples_skipped == 1
    assert not skipping._cache[index.shards[0]]  # nothing of the modified shard is trained on
    assert all(skipping._cache[s] for s in index.shards[1:])


@pytest.mark.parametrize("change, message", [
    ({"image_shape": [100000, 100000, 3], "mean": [0.5] * 3, "std": [0.2] * 3},
     r"image_shape \[100000, 100000, 3\] is out of bounds: height and width 1\.\.4096, channels 1 or 3"),
    ({"image_shape": [2048, 2048, 1]}, r"shard shard-000000\.tar is \d+ bytes but would hold \d+ images of "
                                       r"\(2048, 2048, 1\) = \d+ bytes of pixels; image_shape or the counts are wrong"),
    ({"image_shape": [28, 28]}, r"image_shape \[28, 28\] must be \[height, width, channels\] \(3 integers\)"),
    ({"mean": [0.5, 0.5]}, r"mean \[0\.5, 0\.5\] must list one number per channel \(1\)"),
    ({"std": [0.0]}, r"std \[0\.0\] must be > 0 \(inputs are divided by it\)"),
    ({"mean": [float("nan")]}, r"mean \[nan\] must be finite numbers"),
])
def test_index_image_facts_are_checked_before_anything_is_sized_from_them(split, change, message):
    path = split / "index.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | change))
    with pytest.raises(ShardFormatError, match=rf"^{path}: {message}$"):
        read_index(split)


def test_cli_prints_one_line_for_deep_json_and_a_two_dimensional_image_shape(split):
    run = lambda *args: subprocess.run([sys.executable, "-m", "shards", *args], cwd=REPO_ROOT, capture_output=True,  # noqa: E731
                                       text=True, timeout=120)
    raw = json.loads((split / "index.json").read_text())
    (split / "index.json").write_text("[" * 200000 + "]" * 200000)
    done = run("inspect", str(split))
    assert done.returncode == 2 and done.stderr == f"error: {split / 'index.json'}: unreadable index (JSON nested too deeply)\n"
    (split / "index.json").write_text(json.dumps(raw | {"image_shape": [8, 8]}))
    done = run("verify", str(split))
    assert done.returncode == 1 and "Traceback" not in done.stdout + done.stderr
    assert "PROBLEM " + f"{split / 'index.json'}: image_shape [8, 8] must be [height, width, channels]" in done.stdout


def test_names_in_messages_are_truncated_and_floods_of_bad_members_are_summarised(tmp_path):
    huge = "x" * 1_000_000
    path = write_tar(tmp_path / "named.tar", members_of("c0000000", huge))
    with pytest.raises(ShardFormatError) as raised:
        read_class_shard(path, expected={"zz": 3})  # the huge name is reported first
    assert len(str(raised.value)) < 400 and "(1000002 chars)" in str(raised.value)
    long_member = write_tar(tmp_path / "pax.tar", [("c" * 200_000 + ".images.npy", b"data")], mode="w")
    with pytest.raises(ShardFormatError, match=r"pax\.tar: .*extended tar header \(at most 65536 are accepted\)"):
        read_class_shard(long_member)
    flood = []
    for i in range(500):
        flood += [(f"c{i:07d}.images.npy", b"not an array"), (f"c{i:07d}.class.json", b'{"name": "a", "label": 0}')]
    write_tar(tmp_path / "flood.tar", flood)
    bad = BadSamples("skip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert read_class_shard(tmp_path / "flood.tar", bad=bad) == {}
    assert bad.count == 500
    texts = [str(w.message) for w in caught]
    assert len(texts) == BadSamples.SHOWN_ONE_BY_ONE + 1, texts
    assert "further ones are counted" in texts[BadSamples.SHOWN_ONE_BY_ONE - 1]
    assert texts[-1].startswith("skipped 100 bad samples so far")


def test_two_samples_with_one_class_name_are_an_error_not_a_merge(tmp_path, split):
    path = write_tar(tmp_path / "twice.tar", members_of("c0000000", "a") + members_of("c0000001", "b")
                     + members_of("c0000002", "a", label=2))
    with pytest.raises(ShardFormatError, match=r"twice\.tar member c0000002: class 'a' is also sample c0000000; two "
                                               r"samples of one shard may share a class name only as its consecutive"):
        read_class_shard(path)
    bad = BadSamples("skip")
    with pytest.warns(UserWarning, match="class 'a' is also sample c0000000"):
        assert sorted(read_class_shard(path, bad=bad)) == ["b"]  # the ambiguous class is left out whole
    # consecutive chunks of one class are the writer's way of splitting a big class, and read as one class
    chunks = write_tar(tmp_path / "chunks.tar", members_of("c0000000-0000", "a") + members_of("c0000000-0001", "a", chunk=1))
    assert read_class_shard(chunks)["a"].shape == (6, 4, 4, 1)
    # and `shards verify` reports the duplicate
    index = read_index(split)
    victim = split / index.shards[0]
    with tarfile.open(victim) as archive:
        members = [(m.name, archive.extractfile(m).read()) for m in archive]
    key = members[0][0].split(".")[0]  # the first sample (chunk 0 of the first class) appended again as c0000099
    first = [(n, d) for n, d in members if n.startswith(key + ".")]
    first_name = json.loads(dict(first)[f"{key}.class.json"])["name"]
    members += [(n.replace(key, "c0000099", 1), d) for n, d in first]
    write_tar(victim, members)
    reindex(split)
    problems, _ = verify_split(split)
    assert any(f"member c0000099: class {first_name!r} is also sample {key}" in p for p in problems), problems

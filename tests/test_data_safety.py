"""Hostile and broken shards: never unpickled or extracted, and every problem is a clear error naming the shard and
the member; `on_bad_sample="skip"` turns sample problems into counted warnings (also across loader workers)."""

from __future__ import annotations

import gzip
import io
import itertools
import json
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from dist_signmaml.data import EpisodeShape, EpisodeStream, fixed_episodes, train_loader
from dist_signmaml.data.format import (
    BadSamples,
    ShardFormatError,
    encode_sample,
    iter_raw_samples,
    read_class_shard,
    read_index,
)
from tests.shard_fixtures import reindex, write_identifiable_split, write_tar

SHAPE = EpisodeShape(2, 1, 1)


class Payload:
    """Unpickling this would create the marker file: the test fails if anything ever unpickles shard content."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def good_members(key="c0000000", name="a", n=3):
    sample = encode_sample(key, name, 0, np.zeros((n, 4, 4, 1), dtype=np.uint8))
    return [(f"{key}.{suffix}", data) for suffix, data in sample.items() if suffix != "__key__"]


def read_all(path: Path):
    return read_class_shard(path, (4, 4, 1))


@pytest.fixture()
def marker(tmp_path):
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "shard content was unpickled"


@pytest.mark.parametrize("member", ["../escape.images.npy", "/abs/olute.images.npy", "dir/c0000000.images.npy",
                                    "c0000000.images.npy.exe", "c 0.images.npy", "c0000000.pyd", "c0000000.pickle"])
def test_hostile_member_names_are_refused_with_the_member_named(tmp_path, member, marker):
    payload = pickle.dumps(Payload(str(marker)))
    path = write_tar(tmp_path / "shard.tar", good_members() + [(member, payload)])
    with pytest.raises(ShardFormatError, match=rf"{tmp_path / 'shard.tar'} member {member!r}: unexpected member name"):
        read_all(path)
    assert sorted(os.listdir(tmp_path)) == ["shard.tar"]  # nothing extracted anywhere near it
    assert not (tmp_path.parent / "escape.images.npy").exists()


def test_links_and_special_files_are_refused(tmp_path):
    for kind, target in ((tarfile.SYMTYPE, "/etc/passwd"), (tarfile.LNKTYPE, "c0000000.class.json"),
                         (tarfile.DIRTYPE, ""), (tarfile.FIFOTYPE, "")):
        path = write_tar(tmp_path / "links.tar", good_members() + [("c0000001.images.npy", None, kind, target)])
        with pytest.raises(ShardFormatError, match=r"member 'c0000001\.images\.npy': a .*shards may only hold regular files"):
            read_all(path)


def test_pickled_npy_is_refused_without_unpickling(tmp_path, marker):
    buffer = io.BytesIO()
    np.save(buffer, np.array([Payload(str(marker))], dtype=object), allow_pickle=True)
    members = [(n, buffer.getvalue() if n.endswith(".npy") else d) for n, d in good_members()]
    path = write_tar(tmp_path / "pickle.tar", members)
    with pytest.raises(ShardFormatError, match=r"pickle\.tar member c0000000\.images\.npy: not a readable \.npy array "
                                               r"\(it holds pickled objects, which are never loaded from shards\)"):
        read_all(path)


def test_compressed_shards_are_refused(tmp_path):
    plain = write_tar(tmp_path / "plain.tar", good_members())
    packed = tmp_path / "packed.tar"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    with pytest.raises(ShardFormatError, match=r"packed\.tar: truncated or corrupt tar after member '\(start of file\)'"):
        read_all(packed)


def test_truncated_and_corrupt_tars_name_the_shard_and_last_member(tmp_path):
    members = good_members("c0000000", "a", 400) + good_members("c0000001", "b", 400)  # 6.4 kB of pixels each
    whole = write_tar(tmp_path / "whole.tar", members).read_bytes()
    assert sorted(read_all(tmp_path / "whole.tar")) == ["a", "b"]
    second = whole.index(b"c0000001.images.npy")
    (tmp_path / "cut.tar").write_bytes(whole[: second + 3000])  # inside the second class's pixels
    with pytest.raises(ShardFormatError, match=r"cut\.tar: truncated or corrupt tar after member 'c0000000.class.json'"):
        read_all(tmp_path / "cut.tar")
    (tmp_path / "boundary.tar").write_bytes(whole[:second])  # cut exactly between two members
    with pytest.raises(ShardFormatError, match=r"boundary\.tar: truncated tar \(no end-of-archive marker\) after member 'c0000000.class.json'"):
        read_all(tmp_path / "boundary.tar")
    # the same shard read against its index: the class the cut removed is reported as missing
    from dist_signmaml.data.format import read_class_shard as read

    (tmp_path / "lost.tar").write_bytes(whole[:second] + bytes(1024))  # cut, then a well-formed end marker
    with pytest.raises(ShardFormatError, match=r"lost\.tar: class 'b' listed in the index with 400 images, but the shard holds 0"):
        read(tmp_path / "lost.tar", (4, 4, 1), expected={"a": 400, "b": 400})
    header_of_third = whole.index(b"c0000001.images.npy")
    broken = bytearray(whole)
    broken[header_of_third + 148: header_of_third + 156] = b"garbage!"  # the header checksum field
    (tmp_path / "header.tar").write_bytes(bytes(broken))
    with pytest.raises(ShardFormatError, match=r"header\.tar: corrupt tar header at byte \d+ after member 'c0000000.class.json'"):
        read_all(tmp_path / "header.tar")


def test_undecodable_npy_wrong_shape_and_bad_json(tmp_path):
    base = dict(good_members())
    cases = {
        "npy": ({"c0000000.images.npy": b"\x93NUMPY garbage"}, r"c0000000\.images\.npy: not a readable \.npy array"),
        "shape": ({"c0000000.images.npy": encode_sample("c0000000", "a", 0, np.zeros((3, 5, 4, 1), np.uint8))["images.npy"]},
                  r"c0000000\.images\.npy: image shape \(5, 4, 1\), the index says \(4, 4, 1\)"),
        "dtype": ({"c0000000.images.npy": encode_sample("c", "a", 0, np.zeros((3, 4, 4, 1), np.uint8))["images.npy"].replace(b"|u1", b"<f2")},
                  r"c0000000\.images\.npy: (expected uint8|not a readable)"),
        "json": ({"c0000000.class.json": b"{not json"}, r"c0000000\.class\.json: not valid UTF-8 JSON"),
        "missing": ({"c0000000.class.json": None}, r"c0000000: members \['images\.npy'\], expected exactly"),
    }
    for case, (change, message) in cases.items():
        members = [(n, change.get(n, d)) for n, d in base.items() if change.get(n, d) is not None]
        path = write_tar(tmp_path / f"{case}.tar", members)
        with pytest.raises(ShardFormatError, match=rf"{case}\.tar member {message}"):
            read_all(path)


def test_hostile_index_cannot_point_outside_the_split(tmp_path):
    write_identifiable_split(tmp_path / "s", n_classes=4, images_per_class=4, shard_mb=1.0)
    raw = json.loads((tmp_path / "s" / "index.json").read_text())
    for name in ("../../etc/passwd.tar", "/etc/shadow.tar", "pipe:touch pwned.tar", ".hidden.tar"):
        raw["shards"][0]["name"] = name
        (tmp_path / "s" / "index.json").write_text(json.dumps(raw))
        with pytest.raises(ShardFormatError, match="is not a plain file name"):
            read_index(tmp_path / "s")
    assert not Path("pwned.tar").exists()


def test_skip_policy_warns_counts_each_problem_once_and_keeps_going(tmp_path):
    write_identifiable_split(tmp_path / "s", n_classes=24, images_per_class=6, shard_mb=0.008)
    index = read_index(tmp_path / "s")
    assert len(index.shards) >= 6 and all(len(c) >= 3 for c in index.shard_contents.values())
    victim = tmp_path / "s" / index.shards[0]
    members = [(m.name, tarfile.open(victim).extractfile(m).read()) for m in tarfile.open(victim)]
    members = [(n, b"not an array" if n == "c0000000.images.npy" else d) for n, d in members]  # first class: undecodable
    write_tar(victim, members)
    reindex(tmp_path / "s")
    strict = EpisodeStream(tmp_path / "s", SHAPE, 2, seed=0, window_shards=1, batches_per_shard=1)
    with pytest.raises(ShardFormatError, match=rf"{victim} member c0000000\.images\.npy: not a readable \.npy"):
        for b in range(len(index.shards)):  # a window of one shard walks over every shard
            strict.batch(b)
    stream = EpisodeStream(tmp_path / "s", SHAPE, 2, seed=0, window_shards=1, batches_per_shard=1, on_bad_sample="skip")
    with pytest.warns(UserWarning, match=r"skipped bad sample #1 \(--on_bad_sample skip\): .*c0000000\.images\.npy"):
        for b in range(3 * len(index.shards)):  # the bad shard is read several times, counted once
            stream.batch(b)
    assert stream.bad_samples_skipped == 1
    # with 2 loader worker processes the count reaches the training process through shared memory
    workers = EpisodeStream(tmp_path / "s", SHAPE, 2, seed=0, num_workers=2, window_shards=1, batches_per_shard=1,
                            on_bad_sample="skip")
    list(itertools.islice(train_loader(workers, 2), 2 * len(index.shards)))
    assert workers.bad_samples_skipped == 1
    with pytest.warns(UserWarning, match="skipped bad sample #1"):
        assert len(list(fixed_episodes(tmp_path / "s", SHAPE, range(6), seed=0, tasks_per_batch=3,
                                       on_bad_sample="skip"))) == 2
    with pytest.raises(ValueError, match="--on_bad_sample='ignore' is invalid"):
        BadSamples("ignore")


def test_duplicate_and_scattered_sample_members(tmp_path):
    members = good_members("c0000000") + good_members("c0000001", "b") + [("c0000000.class.json", b"{}")]
    path = write_tar(tmp_path / "dup.tar", members)
    errors = [item for item in iter_raw_samples(path) if isinstance(item, ShardFormatError)]
    assert len(errors) == 1 and "sample key 'c0000000' appears twice" in str(errors[0])


def test_a_copied_split_reads_the_same_and_verify_flags_a_stray_shard(tmp_path):
    from shards.checks import verify_split

    write_identifiable_split(tmp_path / "s", n_classes=6, images_per_class=4, shard_mb=0.004)
    shutil.copy(tmp_path / "s" / "shard-000000.tar", tmp_path / "s" / "shard-999999.tar")
    problems, _ = verify_split(tmp_path / "s")
    assert problems == [f"{tmp_path / 's' / 'shard-999999.tar'}: shard not listed in index.json"]

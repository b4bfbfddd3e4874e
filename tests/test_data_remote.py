"""Shards from object storage: real HTTP and S3-compatible (moto) servers on 127.0.0.1 serve a shard tree; the
episode stream, training and `shards verify` read it and get exactly what the local copy gives. Corrupt objects,
connections dropped mid-shard, missing objects and foreign schemes are each covered, and the verified cache."""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("moto", reason="the S3 tests need `pip install -e .[test]` (moto[server], boto3, s3fs)")

from dist_signmaml.config import REPO_ROOT
from dist_signmaml.data import (  # noqa: E402
    EpisodeShape,
    EpisodeStream,
    storage,  # noqa: E402
    train_loader,
)
from dist_signmaml.data.format import ShardFormatError, read_index  # noqa: E402
from tests.remote_servers import http_server, s3_server, upload_tree  # noqa: E402
from tests.shard_fixtures import write_identifiable_split  # noqa: E402

SHAPE = EpisodeShape(3, 1, 2)
STREAM = dict(seed=4, window_shards=2, batches_per_shard=1)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("remote") / "ids"
    write_identifiable_split(root / "train", n_classes=12, images_per_class=5, shard_mb=0.0065, size=16)
    assert len(read_index(root / "train").shards) >= 4
    return root


@pytest.fixture(scope="module")
def s3(tree, tmp_path_factory):
    """The tree under s3://dsm-test/ids, and a copy under ids-bad whose first shard has one byte flipped (it still
    decodes; only its sha256 differs from the index)."""
    bad = tmp_path_factory.mktemp("bad") / "ids"
    shutil.copytree(tree, bad)
    victim = bad / "train" / read_index(tree / "train").shards[0]
    corrupt = bytearray(victim.read_bytes())
    corrupt[corrupt.index(b"\x93NUMPY") + 300] ^= 0xFF
    victim.write_bytes(bytes(corrupt))
    with s3_server() as (endpoint, env):
        upload_tree("dsm-test", "ids", tree)
        upload_tree("dsm-test", "ids-bad", bad)
        yield "s3://dsm-test/ids", env


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(storage, "BACKOFF_S", 0.01)


def batches(split, count, **options):
    stream = EpisodeStream(split, SHAPE, 2, **(STREAM | options))
    return [stream.batch(b) for b in range(count)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert all(torch.equal(p, q) for p, q in zip(x, y))


def test_http_stream_equals_the_local_copy_also_in_loader_workers(tree):
    local = batches(tree / "train", 8)
    with http_server(tree) as (url, gets, _):
        assert_same(batches(f"{url}/train", 8), local)
        stream = EpisodeStream(f"{url}/train", SHAPE, 2, num_workers=2, **STREAM)
        local_workers = batches(tree / "train", 8, num_workers=2)  # the schedule depends on the worker count
        assert_same(list(itertools.islice(train_loader(stream, 2), 8)), local_workers)  # forked workers, over HTTP
        assert gets["/train/index.json"] >= 1 and all(p.startswith("/train/") for p in gets)


def test_a_connection_dropped_mid_shard_is_retried_and_a_permanent_failure_names_the_url(tree):
    local = batches(tree / "train", 6)
    first = read_index(tree / "train").shards[0]
    with http_server(tree, drops={f"/train/{first}": 2}) as (url, gets, _):
        assert_same(batches(f"{url}/train", 6), local)
        assert gets[f"/train/{first}"] >= 3  # two cut short, then a whole one
    with http_server(tree, drops={"*": 1}) as (url, gets, _):  # every shard request is cut short
        with pytest.raises(ShardFormatError, match=rf"^{url}/train/shard-\d+\.tar: ClientPayloadError: .* \(gave up "
                                                   rf"after {storage.RETRIES + 1} attempts\)$"):
            batches(f"{url}/train", 1)
    with http_server(tree.parent) as (url, _, _):
        with pytest.raises(FileNotFoundError, match=rf"{url}/nowhere/index\.json: not found"):
            read_index(f"{url}/nowhere")


def test_object_storage_never_takes_a_scheme_or_a_path_from_the_index():
    for value in ("pipe:curl -s http://x | cat", "file:///etc", "ftp://host/x"):
        with pytest.raises(ValueError, match="is not supported; expected a local path or one of http://"):
            storage.data_root(value)
    root = storage.data_root("s3://bucket/prefix/")
    assert root == "s3://bucket/prefix" and root / "train" / "index.json" == "s3://bucket/prefix/train/index.json"
    for name in ("../x.tar", "http://evil/x.tar", "pipe:ls.tar", "a/b.tar"):
        with pytest.raises(ValueError, match="is not a plain file name"):
            root / name


def test_s3_stream_equals_local_and_a_corrupt_object_is_refused(tree, s3):
    split, _ = s3
    local = batches(tree / "train", 8)
    assert_same(batches(f"{split}/train", 8), local)
    index = read_index(tree / "train")
    with pytest.raises(ShardFormatError, match=rf"^s3://dsm-test/ids-bad/train/{index.shards[0]}: sha256 differs "
                                               rf"from the index"):
        batches("s3://dsm-test/ids-bad/train", 2 * len(index.shards))


def test_train_a_few_steps_from_s3_gives_the_local_run(tree, s3, tmp_path):
    from safetensors.torch import load_file

    from dist_signmaml.config import TrainConfig
    from dist_signmaml.train import train

    options = dict(ways=3, shots=1, queries=2, steps=3, meta_batch=2, log_every=1, ckpt_every=3, eval_episodes=0,
                   test_episodes=0, seed=0, hidden=8, window_shards=2)
    train(TrainConfig.from_options(**options, data=str(tree), out=str(tmp_path / "local")))
    train(TrainConfig.from_options(**options, data=s3[0], out=str(tmp_path / "s3"), cache_dir=str(tmp_path / "cache")))
    a, b = load_file(tmp_path / "local" / "model.safetensors"), load_file(tmp_path / "s3" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same episodes, same weights
    index = read_index(tree / "train")
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert cached and set(cached) <= {f"{index.shard_sha256[s]}.tar" for s in index.shards}


def test_the_cache_keeps_only_verified_shards_within_its_bound(tree, tmp_path):
    index = read_index(tree / "train")
    largest = max(index.shard_bytes.values())
    with http_server(tree) as (url, gets, _):
        cached = batches(f"{url}/train", 8, cache_dir=str(tmp_path / "c"), cache_gb=2.5 * largest / 1e9)
        assert_same(cached, batches(tree / "train", 8))
        assert len(list((tmp_path / "c").glob("*.tar"))) <= 2  # the bound, least recently used out first
        requests = sum(gets.values())
        opener = storage.ShardOpener(tmp_path / "c")
        kept = next((tmp_path / "c").glob("*.tar")).name.removesuffix(".tar")
        shard = next(s for s in index.shards if index.shard_sha256[s] == kept)
        handle, _ = opener(storage.Url(f"{url}/train") / shard, kept, index.shard_bytes[shard])
        handle.close()
        assert sum(gets.values()) == requests  # served from the cache, no request
        handle, _ = opener(storage.Url(f"{url}/train") / index.shards[0], "0" * 64, index.shard_bytes[index.shards[0]])
        handle.close()
        assert not (tmp_path / "c" / f"{'0' * 64}.tar").exists()  # a download whose hash is wrong is never kept
        assert not list((tmp_path / "c").glob(".download-*"))


def test_shards_verify_and_inspect_read_s3(tree, s3):
    split, env = s3
    run = lambda *args: subprocess.run([sys.executable, "-m", "shards", *args], cwd=REPO_ROOT, capture_output=True,  # noqa: E731
                                       text=True, timeout=120, env={**__import__("os").environ, **env})
    done = run("verify", split)
    assert done.returncode == 0 and f"OK {split}/train: 12 classes, 60 images" in done.stdout, done.stdout + done.stderr
    assert "12 classes, 60 images" in run("inspect", f"{split}/train").stdout
    bad = run("verify", "s3://dsm-test/ids-bad")
    assert bad.returncode == 1 and "sha256 differs from the index" in bad.stdout and "FAILED" in bad.stdout
    missing = run("verify", "s3://dsm-test/nothing-here")
    assert missing.returncode == 2 and missing.stderr.startswith("error: s3://dsm-test/nothing-here: neither a split")


def test_shards_build_uploads_to_s3_and_the_upload_verifies(s3, tmp_path):
    from tests.shard_fixtures import make_image_folder

    _, env = s3
    source = make_image_folder(tmp_path / "src", {"cat": 4, "dog": 5})
    done = subprocess.run([sys.executable, "-m", "shards", "build", "imagefolder", "--source", str(source), "--out",
                           "s3://dsm-test/built", "--image_size", "8", "--progress", "False"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120, env={**__import__("os").environ, **env})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("uploaded 2 files to s3://dsm-test/built")
    from shards.checks import verify_split

    assert verify_split("s3://dsm-test/built/all") == ([], {"classes": 2, "images": 9})

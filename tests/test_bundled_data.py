"""The bundled Omniglot shards are built on first use by whatever reads them first: only the missing splits, once,
with processes that start together taking turns; and a run is scored on the shard root of the checkout that scores
it, not on the folder named in its weights."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import time

import pytest

from dist_signmaml import builders
from dist_signmaml.builders import BUNDLED_SPLITS, ensure_bundled_data
from shards import omniglot
from tests.dist_scripts.launching import TINY_TRAIN, TRAIN, child_env, run


def fake_build(log):
    """An omniglot.build that logs which process built which split, slowly enough for processes to overlap."""
    def build(root, splits, progress):
        for split in splits:
            with open(log, "a") as file:
                file.write(f"{os.getpid()} {split}\n")
            time.sleep(0.2)
            (root / split).mkdir(parents=True, exist_ok=True)
            (root / split / "index.json").write_text("{}")
    return build


@pytest.mark.unit
def test_only_the_missing_splits_of_the_bundled_root_are_built_and_other_roots_are_left_alone(tmp_path, monkeypatch):
    log = tmp_path / "built.log"
    monkeypatch.setattr(omniglot, "build", fake_build(log))
    bundled = tmp_path / "checkout" / "omniglot-28"
    (bundled / "train").mkdir(parents=True)
    (bundled / "train" / "index.json").write_text("{}")
    ensure_bundled_data(tmp_path / "elsewhere", bundled=bundled)
    assert not log.exists() and not (tmp_path / "elsewhere").exists()
    ensure_bundled_data(bundled, bundled=bundled)
    assert [line.split()[1] for line in log.read_text().splitlines()] == ["val", "test"]
    link = tmp_path / "link"
    link.symlink_to(bundled)
    ensure_bundled_data(link, bundled=bundled)  # the same root through a link, now complete: nothing more
    assert len(log.read_text().splitlines()) == 2


def _ensure(bundled, start):
    while time.time() < start:  # every process reaches the check at once
        time.sleep(0.001)
    ensure_bundled_data(bundled, bundled=bundled)


@pytest.mark.integration
def test_processes_that_start_at_once_build_each_split_once(tmp_path, monkeypatch):
    """Two runs started together in a fresh checkout: without the lock each saw the splits missing, and one read a
    split while the other was still writing it."""
    log = tmp_path / "built.log"
    monkeypatch.setattr(omniglot, "build", fake_build(log))  # inherited by the forked processes
    bundled = tmp_path / "omniglot-28"
    start = time.time() + 0.5
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=_ensure, args=(bundled, start)) for _ in range(3)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(30)
    assert [process.exitcode for process in processes] == [0, 0, 0]
    built = [line.split()[1] for line in log.read_text().splitlines()]
    assert sorted(built) == sorted(BUNDLED_SPLITS), built
    assert len({line.split()[0] for line in log.read_text().splitlines()}) == 1  # one builder, the others waited


@pytest.mark.integration
def test_a_run_trained_in_another_checkout_is_scored_on_this_checkouts_bundled_shards(tmp_path, omniglot_root,
                                                                                        monkeypatch):
    """A run parked in one checkout and finished in a fresh clone: its weights name the first checkout's shard root,
    and the fresh clone had built no val/ split yet. The test protocol failed with 'data split directory .../val does
    not exist'; it now scores on the root it is given, and builds the bundled splits that are missing."""
    from bench.protocol import score_run

    other_checkout = tmp_path / "other_checkout" / "omniglot-28"
    other_checkout.parent.mkdir()
    other_checkout.symlink_to(omniglot_root)
    trained = run([sys.executable, *TRAIN, *TINY_TRAIN, "--steps", "2", "--data", str(other_checkout), "--out",
                   str(tmp_path / "run")], child_env(), timeout=240)
    assert trained.returncode == 0, trained.stdout[-4000:]
    other_checkout.unlink()  # that checkout is gone

    with pytest.raises(FileNotFoundError, match="other_checkout"):
        score_run(tmp_path / "run", val_episodes=4, test_episodes=4)
    fresh = tmp_path / "fresh_clone" / "omniglot-28"  # a new checkout's bundled root: train/ and test/ but no val/
    fresh.mkdir(parents=True)
    for split in ("train", "test"):
        shutil.copytree(omniglot_root / split, fresh / split)
    monkeypatch.setattr(builders, "DEFAULT_DATA", fresh)
    result = score_run(tmp_path / "run", val_episodes=4, test_episodes=4, data=str(fresh))
    assert result["data"] == str(fresh) and len(result["val_grid"]) == 18
    assert json.loads((fresh / "val" / "index.json").read_text()) == json.loads(
        (omniglot_root / "val" / "index.json").read_text())  # the missing split, built as the bundled one is

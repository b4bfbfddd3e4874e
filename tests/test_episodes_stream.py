"""The streaming episode assembler: episode structure, rank x worker disjointness, determinism, exact resume,
bounded memory, class sampling, class exclusion, and fixed (materialised) evaluation episodes."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_signmaml.data import EpisodeShape, EpisodeStream, fixed_episodes, read_episode_index, train_loader
from dist_signmaml.data.format import read_index
from shards.episode_writer import materialise
from tests.shard_fixtures import trace, write_identifiable_split

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAPE = EpisodeShape(ways=3, shots=2, queries=3)


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    split_dir = tmp_path_factory.mktemp("ids") / "train"
    index = write_identifiable_split(split_dir, n_classes=48, images_per_class=10, shard_mb=0.01)
    assert len(index["shards"]) >= 12  # enough for 2 ranks x 2 workers x a window of 2 and more
    return split_dir


def batches_of(stream, count):
    return [stream.batch(b) for b in range(stream.start_batch, stream.start_batch + count)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for p, q in zip(x, y):
            assert torch.equal(p, q)


def test_episode_structure_and_label_remapping(split):
    index = read_index(split)
    for shape in (SHAPE, EpisodeShape(7, 1, 2), EpisodeShape(2, 4, 5)):
        stream = EpisodeStream(split, shape, 3, seed=1, window_shards=4)
        for batch in batches_of(stream, 4):
            assert batch.support_x.shape == (3, shape.ways * shape.shots, 1, 8, 8)
            assert batch.query_x.shape == (3, shape.ways * shape.queries, 1, 8, 8)
            for t in range(3):
                sup, qry = trace(batch.support_x[t], index), trace(batch.query_x[t], index)
                assert batch.support_y[t].tolist() == np.repeat(np.arange(shape.ways), shape.shots).tolist()
                assert batch.query_y[t].tolist() == np.repeat(np.arange(shape.ways), shape.queries).tolist()
                label_class = {}
                for (cls, _), label in zip(np.concatenate([sup, qry]), torch.cat([batch.support_y[t], batch.query_y[t]])):
                    assert label_class.setdefault(int(label), cls) == cls  # one class per label
                assert len(set(label_class.values())) == shape.ways  # distinct classes
                assert len({tuple(p) for p in np.concatenate([sup, qry])}) == shape.ways * shape.images_per_class
    # labels are remapped per episode: the class behind label 0 changes from episode to episode
    stream = EpisodeStream(split, SHAPE, 4, seed=1)
    first = {int(trace(b.support_x[t, :1], index)[0, 0]) for b in batches_of(stream, 5) for t in range(4)}
    assert len(first) > 5


def test_two_ranks_two_workers_read_disjoint_shards(split):
    index = read_index(split)
    shard_of_class = {int(name.removeprefix("class")): shard for name, (shard, _) in index.classes.items()}
    used: dict[tuple[int, int], set[str]] = {}
    owned: dict[tuple[int, int], set[str]] = {}
    for rank in range(2):
        stream = EpisodeStream(split, SHAPE, 2, seed=3, rank=rank, world_size=2, num_workers=2, window_shards=2,
                               batches_per_shard=2)
        for worker in range(2):
            owned[rank, worker] = set(stream.own_shards(worker))
        loader = train_loader(stream, 2)
        for b, batch in enumerate(itertools.islice(loader, 12)):  # real worker processes; batch b from worker b % 2
            classes = {int(c) for c in trace(batch.query_x, index)[..., 0].ravel()}
            used.setdefault((rank, b % 2), set()).update(shard_of_class[c] for c in classes)
            assert_same([batch], [stream.batch(b)])  # the worker produced exactly the stream's batch b
    for slot in owned:
        assert used[slot] <= owned[slot] and len(used[slot]) >= 3  # only its own shards, and the window moved
    for a, b in itertools.combinations(owned, 2):
        assert not owned[a] & owned[b]
    assert set().union(*owned.values()) == set(index.shards)


def test_stream_is_deterministic_and_seeded(split):
    make = lambda seed, workers=0: EpisodeStream(split, SHAPE, 2, seed=seed, num_workers=workers, window_shards=3)  # noqa: E731
    assert_same(batches_of(make(5), 6), batches_of(make(5), 6))
    other = batches_of(make(6), 6)
    assert not all(torch.equal(a.query_x, b.query_x) for a, b in zip(batches_of(make(5), 6), other))


def test_resume_at_batch_b_sees_exactly_the_uninterrupted_batches(split):
    common = dict(seed=7, rank=1, world_size=2, num_workers=2, window_shards=2, batches_per_shard=1)
    uninterrupted = EpisodeStream(split, SHAPE, 2, **common)
    reference = list(itertools.islice(train_loader(uninterrupted, 2), 14))
    state = uninterrupted.state_dict(next_batch=9)  # what a checkpoint after 9 meta-steps stores
    resumed = EpisodeStream(split, SHAPE, 2, start_batch=state["next_batch"], **common)
    assert resumed.resume_differences(state) == []
    assert_same(list(itertools.islice(train_loader(resumed, 2), 5)), reference[9:14])
    relaunched = EpisodeStream(split, SHAPE, 2, **(common | {"world_size": 1, "rank": 0}))
    assert relaunched.resume_differences(state) == ["world_size: saved 2, now 1"]


def test_memory_is_bounded_by_the_window(split):
    stream = EpisodeStream(split, SHAPE, 2, seed=0, window_shards=3, batches_per_shard=1)
    for b in range(60):
        stream.batch(b)
        assert len(stream._cache) <= 3
    own = len(stream.own_shards(0))
    assert own > 3 and stream.shards_loaded >= own  # it cycled through all shards, a few at a time


def test_class_sampling_balanced_and_proportional(tmp_path):
    sizes = [6] * 8 + [60] * 8  # small classes 0-7, large classes 8-15
    write_identifiable_split(tmp_path / "imb", n_classes=16, images_per_class=sizes, shard_mb=1.0)
    index = read_index(tmp_path / "imb")
    shape = EpisodeShape(2, 1, 1)
    counts = {}
    for mode in ("balanced", "proportional"):
        stream = EpisodeStream(tmp_path / "imb", shape, 50, seed=0, class_sampling=mode)
        drawn = np.concatenate([trace(stream.batch(b).support_x, index)[..., 0].ravel() for b in range(8)])
        counts[mode] = np.bincount(drawn, minlength=16)
    small_share = {m: c[:8].sum() / c.sum() for m, c in counts.items()}
    assert abs(small_share["balanced"] - 0.5) < 0.06  # every class equally likely
    assert small_share["proportional"] < 0.2  # expected about 6/66 of draws hit a small class
    with pytest.raises(ValueError, match="--class_sampling='uniformish' is invalid"):
        EpisodeStream(tmp_path / "imb", shape, 2, seed=0, class_sampling="uniformish")


def test_classes_with_too_few_images_are_excluded_or_refused_before_any_step(tmp_path):
    write_identifiable_split(tmp_path / "few", n_classes=6, images_per_class=[10, 10, 10, 10, 3, 2], shard_mb=1.0)
    index = read_index(tmp_path / "few")
    with pytest.warns(UserWarning, match=r"2 classes have fewer than shots\+queries=5 images and are left out: class004, class005"):
        stream = EpisodeStream(tmp_path / "few", EpisodeShape(4, 2, 3), 4, seed=0)
    drawn = {int(c) for b in range(5) for c in trace(stream.batch(b).support_x, index)[..., 0].ravel()}
    assert drawn == {0, 1, 2, 3}
    with pytest.raises(ValueError, match=r"--ways=5 needs 5 classes with at least shots\+queries=5 images, but .* has only 4"), \
            pytest.warns(UserWarning):
        EpisodeStream(tmp_path / "few", EpisodeShape(5, 2, 3), 4, seed=0)
    with pytest.raises(ValueError, match="need at least 4"):
        EpisodeStream(tmp_path / "few", EpisodeShape(2, 1, 1), 4, seed=0, world_size=2, num_workers=2)


def test_materialised_episodes_equal_the_seeded_fallback(split, tmp_path):
    out = tmp_path / "episodes"
    index = materialise(split, out, ways=3, shots=2, queries=3, episodes=37, seed=11, shard_mb=0.03,
                        cache_shards=2, progress=False)
    assert index["num_episodes"] == 37 and len(index["shards"]) >= 2
    stored = read_episode_index(out)
    assert (stored.ways, stored.shots, stored.queries, stored.seed) == (3, 2, 3, 11)
    ids = list(range(1, 37, 2))  # e.g. rank 1 of 2
    from_shards = list(fixed_episodes(out, SHAPE, ids, seed=999, tasks_per_batch=4))
    fallback = list(fixed_episodes(split, SHAPE, ids, seed=11, tasks_per_batch=4))
    assert len(from_shards) == 5 and from_shards[-1].query_x.shape[0] == 2
    assert_same(from_shards, fallback)
    with pytest.raises(ValueError, match="holds 3-way 2-shot 3-query episodes, but 5-way"):
        next(fixed_episodes(out, EpisodeShape(5, 2, 3), [0], seed=0, tasks_per_batch=1))
    with pytest.raises(ValueError, match="holds 37 episodes .* up to 40"):
        next(fixed_episodes(out, SHAPE, [40], seed=0, tasks_per_batch=1))
    from shards.checks import verify_split

    assert verify_split(out) == ([], {"episodes": 37})


def test_episodes_cli_default_seed_is_the_evaluators(split, tmp_path):
    from dist_signmaml.evaluate import EVALUATION_SEED

    done = subprocess.run([sys.executable, "-m", "shards", "episodes", str(split), "--out", str(tmp_path / "e"),
                           "--ways", "3", "--shots", "2", "--queries", "3", "--episodes", "6", "--progress", "False"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert read_episode_index(tmp_path / "e").seed == EVALUATION_SEED
    assert_same(list(fixed_episodes(tmp_path / "e", SHAPE, range(6), seed=0, tasks_per_batch=3)),
                list(fixed_episodes(split, SHAPE, range(6), seed=EVALUATION_SEED, tasks_per_batch=3)))

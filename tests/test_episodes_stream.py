"""The streaming episode assembler: episode structure, a task distribution independent of ranks and workers,
determinism, exact resume,
bounded memory, class sampling, class exclusion, and fixed (materialised) evaluation episodes."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_signmaml.config import REPO_ROOT
from dist_signmaml.data import EpisodeShape, EpisodeStream, fixed_episodes, read_episode_index, train_loader
from dist_signmaml.data.format import read_index
from shards.episode_writer import materialise
from tests.shard_fixtures import trace, write_identifiable_split

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


def test_every_rank_and_worker_draws_from_the_whole_split_in_loader_processes(split):
    index = read_index(split)
    shard_of_class = {int(name.removeprefix("class")): shard for name, (shard, _) in index.classes.items()}
    used: dict[tuple[int, int], set[str]] = {}
    for rank in range(2):
        stream = EpisodeStream(split, SHAPE, 2, seed=3, rank=rank, world_size=2, num_workers=2, window_shards=2,
                               batches_per_shard=1)
        loader = train_loader(stream, 2)
        for b, batch in enumerate(itertools.islice(loader, 4 * len(index.shards))):  # real worker processes
            classes = {int(c) for c in trace(batch.query_x, index)[..., 0].ravel()}
            shards = {shard_of_class[c] for c in classes}
            assert shards <= set(stream.window(b)) and len(stream.window(b)) == 2
            used.setdefault((rank, b % 2), set()).update(shards)
            if b < 6:
                assert_same([batch], [stream.batch(b)])  # the worker produced exactly the stream's batch b
    for slot, shards in used.items():  # no slice: each (rank, worker) reaches most of the split's shards
        assert len(shards) > len(index.shards) // 2, (slot, len(shards))
    assert used[0, 0] & used[1, 0] & used[0, 1] & used[1, 1]


def pair_counts(batches, n_classes: int, index) -> np.ndarray:
    """How often each class pair (i < j) occurs together in one task, over `batches`."""
    counts = np.zeros((n_classes, n_classes), dtype=np.int64)
    for batch in batches:
        for classes in trace(batch.support_x, index)[..., 0]:  # [tasks, ways*shots] class ids
            present = np.zeros(n_classes, dtype=bool)
            present[classes] = True
            counts += np.outer(present, present)
    return counts[np.triu_indices(n_classes, 1)]


def test_task_distribution_does_not_depend_on_world_size(tmp_path):
    from scipy.stats import chi2_contingency

    write_identifiable_split(tmp_path / "ten", n_classes=10, images_per_class=6, shard_mb=0.0105)
    index = read_index(tmp_path / "ten")
    assert len(index.shards) == 2 and all(len(c) == 5 for c in index.shard_contents.values())
    shape = EpisodeShape(5, 1, 1)
    ranks = [EpisodeStream(tmp_path / "ten", shape, 4, seed=0, rank=r, world_size=2) for r in range(2)]
    per_rank = [pair_counts(batches_of(stream, 100), 10, index) for stream in ranks]
    assert all((counts > 0).all() for counts in per_rank)  # all 45 pairs on each rank (one slice per rank: 20)
    one_process = pair_counts(batches_of(EpisodeStream(tmp_path / "ten", shape, 4, seed=1), 200), 10, index)
    two_ranks = per_rank[0] + per_rank[1]
    _, p_value, dof, _ = chi2_contingency(np.stack([two_ranks, one_process]))
    assert dof == 44 and p_value > 1e-3, p_value  # the same co-occurrence distribution
    # a negative control: the disjoint slices the rule replaces (rank r only ever sees shard r) are rejected
    sliced = np.zeros_like(two_ranks)
    pairs = list(itertools.combinations(range(10), 2))
    for k, (i, j) in enumerate(pairs):
        if (i < 5) == (j < 5):
            sliced[k] = two_ranks.sum() // 20
    assert chi2_contingency(np.stack([sliced + 1, one_process]))[1] < 1e-12


def test_a_window_smaller_than_the_split_still_mixes_every_pair_on_every_rank_and_worker(tmp_path):
    write_identifiable_split(tmp_path / "five", n_classes=10, images_per_class=4, shard_mb=0.005)
    index = read_index(tmp_path / "five")
    assert len(index.shards) == 5
    for rank in range(2):
        stream = EpisodeStream(tmp_path / "five", EpisodeShape(2, 1, 1), 8, seed=0, rank=rank, world_size=2,
                               num_workers=2, window_shards=2, batches_per_shard=1)
        for worker in range(2):
            counts = pair_counts((stream.batch(b) for b in range(worker, 200, 2)), 10, index)
            assert (counts > 0).all(), (rank, worker, int((counts == 0).sum()))


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
    shards = len(read_index(split).shards)
    assert shards > 3 and stream.shards_loaded >= shards  # it cycled through all shards, a few at a time


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
    with pytest.raises(ValueError, match=r"--ways=5 needs 5 classes with at least shots\+queries=5 images, but .* has "
                                         r"only 4: use --ways 4 or fewer, fewer --shots/--queries, or a split with "
                                         r"more classes; or do without this split: --eval_episodes 0 --test_episodes 0$"), \
            pytest.warns(UserWarning):
        EpisodeStream(tmp_path / "few", EpisodeShape(5, 2, 3), 4, seed=0)
    # one shard and 2 ranks x 2 workers: every (rank, worker) holds the whole split (it once needed 4 shards)
    assert len(index.shards) == 1
    for rank in range(2):
        stream = EpisodeStream(tmp_path / "few", EpisodeShape(2, 1, 1), 4, seed=0, rank=rank, world_size=2, num_workers=2)
        assert stream.window(0) == stream.window(1) == list(index.shards)
    write_identifiable_split(tmp_path / "small", n_classes=8, images_per_class=4, shard_mb=0.005)
    with pytest.raises(ValueError, match=r"--ways=5: the smallest window of --window_shards=2 shards of .* holds only 4 "
                                         r"usable classes; use --window_shards 3, fewer --ways, or rebuild the split "
                                         r"with bigger shards \(shards build --shard_mb \d+\)"):
        EpisodeStream(tmp_path / "small", EpisodeShape(5, 1, 1), 4, seed=0, window_shards=2)


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

"""Shared fixtures and the test tiers. The bundled Omniglot shards are built once per checkout (data/shards is
git-ignored); shared helpers are in tests/helpers.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from dist_signmaml.config import REPO_ROOT

SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def omniglot_root() -> Path:
    """data/shards/omniglot-28 with train/val/test, built from the vendored npz files if missing."""
    from dist_signmaml.builders import ensure_bundled_data
    from dist_signmaml.config import DEFAULT_DATA

    ensure_bundled_data(DEFAULT_DATA, progress=False)
    return DEFAULT_DATA


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """A synthetic shard root (train split only, 24 classes of 16 px images in several shards): runs start in ~1 s."""
    from tests.shard_fixtures import write_identifiable_split

    root = tmp_path_factory.mktemp("tiny_data")
    write_identifiable_split(root / "train", n_classes=24, images_per_class=4, shard_mb=0.01, size=16)
    return root


@pytest.fixture()
def subprocess_env() -> dict:
    """Environment for child processes: the repo importable, single-threaded BLAS to keep 2 cores shared fairly."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module's in-process work: on a shared 2-core machine OpenMP threads spin against
    the other processes (measured ~10x slower ResNet steps under load)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PYTHON = sys.executable

TIERS = ("unit", "integration", "system")
# The tier of every test in a module that does not mark its tests itself (a test's own marker wins).
MODULE_TIERS = {
    "test_algorithms": "unit", "test_models": "unit", "test_monitor": "unit", "test_reference": "unit",
    "test_data_safety": "unit", "test_learned_step_sizes": "unit", "test_partial_adaptation": "unit",
    "test_backbones": "integration", "test_precision": "integration", "test_backbones_cli": "integration",
    "test_data_training": "integration", "test_distributed": "integration", "test_evaluate": "integration",
    "test_faults": "integration", "test_plot": "integration", "test_sweep": "integration",
    "test_tensorboard": "integration", "test_train": "integration", "test_episodes_stream": "integration",
    "test_shards_build": "integration", "test_reproduce": "integration", "test_config_files": "integration",
    "test_predict": "integration", "test_profiling": "integration", "test_rough_edges": "integration",
    "test_trackers": "integration", "test_bench": "integration", "test_layout": "unit",
    "test_data_hostile": "integration", "test_data_remote": "integration",
    "test_deepspeed": "system", "test_multinode": "system", "test_slurm": "system",
}


def pytest_collection_modifyitems(config, items):
    """Give each test its module's tier unless it has one; refuse to collect a test with no tier, so that
    `pytest -m unit` stays the complete fast tier and nothing silently falls out of every tier."""
    untiered = []
    for item in items:
        if any(item.get_closest_marker(tier) for tier in TIERS):
            continue
        tier = MODULE_TIERS.get(item.module.__name__.rsplit(".", 1)[-1])
        if tier is None:
            untiered.append(item.nodeid)
        else:
            item.add_marker(getattr(pytest.mark, tier))
    if untiered:
        raise pytest.UsageError(f"tests without a tier marker ({' | '.join(TIERS)}): {', '.join(untiered[:10])}; "
                                f"mark them (pytestmark = pytest.mark.unit) or list their module in "
                                f"tests/conftest.py MODULE_TIERS")

"""Shared fixtures. The bundled Omniglot shards are built once per checkout (data/shards is git-ignored)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def omniglot_root() -> Path:
    """data/shards/omniglot-28 with train/val/test, built from the vendored npz files if missing."""
    from dist_signmaml.config import DEFAULT_DATA
    from shards import omniglot

    if not all((DEFAULT_DATA / s / "index.json").is_file() for s in ("train", "val", "test")):
        omniglot.build(DEFAULT_DATA, progress=False)
    return DEFAULT_DATA


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

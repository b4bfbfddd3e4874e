"""Helpers shared by the tests (fixtures live in conftest.py; multi-process launching in dist_scripts/launching.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


def tiny_options(tmp_path: Path, data, **overrides) -> dict:
    """Training options of a run that takes about a second: 3-way 1-shot, 1 query, 16 filters, no validation."""
    return dict(ways=3, shots=1, queries=1, hidden=16, meta_batch=2, steps=2, data=str(data), out=str(tmp_path / "run"),
                log_every=1, ckpt_every=100, eval_episodes=0, test_episodes=0, seed=0, window_shards=16) | overrides


def cli_error(capsys, main, **options) -> tuple[int, str]:
    """Run a CLI main() that must stop: (exit code, its one `error: ...` line). stderr is checked to hold no
    traceback and exactly one error (a progress bar may share its line)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main(**options)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert err.count("error: ") == 1, err
    return stopped.value.code, "error: " + err.split("error: ", 1)[1].splitlines()[0]


def event_steps(directory, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a scalar tag as TensorBoard shows it (EventAccumulator, with its purge of resumed steps)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]

"""The package's shape: no import cycle (every module imports alone), no Accelerate/DeepSpeed below the engine, one
error boundary (a bug inside the library keeps its traceback; only CLI main()s print one-line errors)."""

from __future__ import annotations

import ast
import importlib
import sys

import pytest

from dist_signmaml.config import REPO_ROOT

pytestmark = pytest.mark.unit
PACKAGE = REPO_ROOT / "dist_signmaml"


def modules() -> list[str]:
    return sorted("dist_signmaml." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
                  for p in PACKAGE.rglob("*.py"))


def module_level_imports(path) -> set[str]:
    """dist_signmaml/accelerate/deepspeed modules imported at module level (function-level imports are lazy)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def import_graph() -> dict[str, set[str]]:
    names = set(modules())
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = "dist_signmaml." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        name = name.removesuffix(".__init__")
        graph[name] = {m for m in module_level_imports(path) if m in names and m != name}
    return graph


def test_the_module_graph_has_no_cycle():
    graph, state = import_graph(), {}

    def visit(node, trail):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", f"import cycle: {' -> '.join(trail + [node])}"
        state[node] = "open"
        for child in sorted(graph[node]):
            visit(child, trail + [node])
        state[node] = "done"

    for node in sorted(graph):
        visit(node, [])


@pytest.mark.parametrize("name", modules())
def test_every_module_imports_alone(name):
    """Each module imported first, with no dist_signmaml module loaded before it (what a fresh interpreter does for
    this package; torch stays loaded to keep this fast)."""
    saved = {key: module for key, module in sys.modules.items() if key.startswith(("dist_signmaml", "shards"))}
    for key in saved:
        del sys.modules[key]
    try:
        importlib.import_module(name)
    finally:
        for key in [k for k in sys.modules if k.startswith(("dist_signmaml", "shards"))]:
            del sys.modules[key]
        sys.modules.update(saved)


@pytest.mark.parametrize("layer", ["algorithms", "models", "data"])
def test_no_accelerate_or_deepspeed_below_the_engine(layer):
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):  # function-level imports count too
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name.split(".")[0] not in ("accelerate", "deepspeed"), f"{path} imports {name}"


def test_a_bug_while_building_the_model_keeps_its_traceback(monkeypatch):
    """A ValueError from inside model construction that is not about an option is a bug: it is not turned into a
    one-line ConfigError (which would hide where it came from)."""
    import torch

    from dist_signmaml import builders
    from dist_signmaml.config import ConfigError, TrainConfig

    config = TrainConfig.from_options(adapt="last:9")
    with pytest.raises(ConfigError, match=r"--adapt=last:9 asks for 9 blocks"):
        builders.build_learner(config, (28, 28, 1), torch.device("cpu"))

    def broken(*args, **kwargs):
        raise ValueError("mat1 and mat2 shapes cannot be multiplied (4x64 and 32x5)")

    monkeypatch.setattr(builders, "build_backbone", broken)
    with pytest.raises(ValueError, match="mat1 and mat2") as raised:
        builders.build_learner(TrainConfig.from_options(), (28, 28, 1), torch.device("cpu"))
    assert not isinstance(raised.value, ConfigError)


def test_evaluate_does_not_turn_a_forward_bug_into_one_line(tmp_path, tiny_data, monkeypatch):
    """The meta-test's own errors are bugs: evaluate's main() lets their traceback through (it used to print
    one line and exit 2 for any ValueError raised by the forward pass)."""
    from dist_signmaml.algorithms import MetaLearner
    from dist_signmaml.config import TrainConfig
    from dist_signmaml.evaluate import main as evaluate_main
    from dist_signmaml.train import train
    from tests.helpers import tiny_options

    train(TrainConfig.from_options(**tiny_options(tmp_path, tiny_data)))

    def shape_bug(self, *args, **kwargs):
        raise ValueError("Expected input batch_size (3) to match target batch_size (6)")

    monkeypatch.setattr(MetaLearner, "forward", shape_bug)
    with pytest.raises(ValueError, match="Expected input batch_size"):
        evaluate_main(str(tmp_path / "run"), episodes=2, inner_steps=1, data=str(tiny_data), split="train")

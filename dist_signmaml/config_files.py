"""Config files beside the flags: `--config run.yaml` (or `.toml`) sets any TrainConfig field, flags override it,
and every run leaves its resolved configuration as RUN/config.yaml, which `--config RUN/config.yaml` reads back.

A file is one flat mapping of TrainConfig field names to values, exactly as the flags are spelled without `--`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path

import yaml

from dist_signmaml.artifacts import CONFIG_YAML  # noqa: F401  (the run directory's names are defined once)
from dist_signmaml.config import ConfigError

CONFIG_FLAG = "config"       # --config PATH: read by TrainConfig.from_options, never a field itself

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def _parse(path: Path) -> object:
    suffix = path.suffix.lower()
    text = path.read_text()
    if suffix in (".yaml", ".yml"):
        return yaml.safe_load(text)
    if suffix == ".toml":
        return tomllib.loads(text)
    raise ConfigError(f"--config={str(path)!r}: expected a .yaml, .yml or .toml file")


def read_config_file(path: str | Path, config_class) -> dict:
    """The options set by a YAML or TOML file, checked against `config_class`'s fields (a dataclass).

    Unknown keys, an unreadable file and a document that is not a mapping raise a one-line ConfigError naming the
    file. Values are taken as written, except that a float field also accepts an integer or a numeric string:
    PyYAML (YAML 1.1) reads `1e-3` as a string, which no one who writes it means.
    """
    path = Path(path)
    try:
        document = _parse(path)
    except OSError as error:
        raise ConfigError(f"--config={str(path)!r}: cannot read it ({error.strerror or error})") from None
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"--config={str(path)!r}: not valid {path.suffix.lstrip('.').upper()} ({first_line})") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(f"--config={str(path)!r}: expected a mapping of option names to values, got "
                          f"{type(document).__name__}")
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    for key in document:
        if key not in fields:
            raise ConfigError(f"{path}: unknown key {key!r} (the keys are the training options without '--': "
                              f"{', '.join(sorted(fields))})")
    return {key: _as_field_type(value, fields[key]) for key, value in document.items()}


def _as_field_type(value, field: dataclasses.Field):
    if isinstance(field.default, float) and not isinstance(value, bool):
        if isinstance(value, int):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return value  # validate() names the field and what it expects
    return value


def write_config_yaml(values: dict, path: str | Path) -> None:
    """The resolved configuration as YAML, in field order, so that `--config PATH` reproduces the run."""
    header = ("# The resolved configuration of this run. Reproduce it with\n"
              "#   python -m dist_signmaml.train --config THIS_FILE --out NEW_DIR\n"
              "# (without --out the new run writes into this run's directory).\n")
    Path(path).write_text(header + yaml.safe_dump(values, sort_keys=False, default_flow_style=False))


@contextlib.contextmanager
def blame_config_file(path, keys_from_file: set[str]):
    """Add the file's name to a ConfigError about a value that came from it (not from a flag)."""
    try:
        yield
    except ConfigError as error:
        message = str(error)
        if any(message.startswith(f"--{key}=") for key in keys_from_file):
            raise ConfigError(f"{message} (set in {path})") from None
        raise

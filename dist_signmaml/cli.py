"""Pieces shared by the command lines that take `PATH --option ...` (evaluate, predict), built on fire."""

from __future__ import annotations

import inspect
import sys


def refuse_unknown_flags(argv: list[str], function) -> None:
    """Exit 2 with one line on a --flag that `function` (keyword-only options) does not take, before fire runs
    anything: fire would run the command first and complain about the flag afterwards."""
    known = {"path", "help"} | set(function.__kwdefaults__)
    unknown = sorted({token[2:].split("=")[0].replace("-", "_") for token in argv if token.startswith("--")
                      and len(token) > 2} - known)
    if unknown:
        print(f"error: unknown option(s) {', '.join('--' + u for u in unknown)}; known: "
              f"{', '.join('--' + k for k in sorted(known - {'help'}))}", file=sys.stderr)
        sys.exit(2)


def unknown_options(options: dict, function) -> str:
    """'' when `function` takes every key of `options`, else a one-line complaint naming the unknown ones and the
    known ones: a bad flag would otherwise end in fire's TypeError traceback, after the command had started. For
    commands whose options are ordinary parameters (bench's); `run_with_one_line_errors` takes keyword-only ones,
    so the PATH of `evaluate`/`predict` cannot be given twice."""
    known = [name for name, p in inspect.signature(function).parameters.items()
             if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    unknown = sorted(set(options) - set(known))
    if not unknown:
        return ""
    return (f"unknown option(s) {', '.join('--' + u for u in unknown)}; known: "
            f"{', '.join('--' + k for k in known)}")


def path_and_options_signature(function) -> inspect.Signature:
    """`main(path, **options)`'s signature for `--help`: the path, then `function`'s options with their defaults."""
    return inspect.Signature(
        [inspect.Parameter("path", inspect.Parameter.POSITIONAL_OR_KEYWORD, default="")]
        + [p for p in inspect.signature(function).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY])


def run_with_one_line_errors(function, path: str, options: dict, expected: tuple[type[Exception], ...]) -> None:
    """`function(path, **options)`; an expected input error (and an unknown option) becomes `error: ...` and exit 2,
    anything else keeps its traceback (a bug)."""
    unknown = sorted(set(options) - set(function.__kwdefaults__))
    try:
        if unknown:
            raise expected[0](f"unknown option(s) {', '.join('--' + u for u in unknown)}")
        function(str(path), **options)
    except expected as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)

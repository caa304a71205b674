"""How every CacheKit command-line tool (scripts/*.py) treats a user's mistake: one line on
stderr, `error: <what is wrong, and the fix>`, and exit code 2 (argparse's code for bad usage),
never a traceback. Mistakes are argparse errors, ValueError (CacheKit's own errors such as
RouterError are ValueErrors) and missing files. Anything else is a bug and keeps its traceback;
CACHEKIT_TRACEBACK=1 shows the traceback of a user error too.

    from cachekit.bench.cli import run_cli
    run_cli(main)            # main(argv) parses sys.argv[1:] itself

Validate arguments up front, with the `type=` checkers below, so a mistake is reported before
any model loads, samples or trains.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from pathlib import Path
from typing import Callable, NoReturn

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


def fail(message: str) -> NoReturn:
    """Print `error: message` as one line on stderr and exit with code 2."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr, flush=True)
    raise SystemExit(2)


@contextlib.contextmanager
def _one_line_argparse_errors():
    # argparse prints its whole usage block before the error; one line is the rule for every
    # CacheKit CLI, including parsers defined in modules the scripts import (tinymodels/).
    original = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = lambda parser, message: fail(f"{message} (see {parser.prog} --help)")
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run a CLI's main; a user's mistake ends it with one line and exit code 2."""
    try:
        with _one_line_argparse_errors():
            main(argv)
    except USER_ERRORS as error:
        if os.environ.get("CACHEKIT_TRACEBACK"):
            raise
        fail(str(error) if not isinstance(error, OSError) or not error.filename
             else f"{error.strerror}: {error.filename}")


def fill_defaults(args: argparse.Namespace, full: dict, quick: dict) -> None:
    """Options left unset take the full run's default, or the quick one with --quick; values the
    user gave win over both."""
    for key, default in full.items():
        if getattr(args, key) is None:
            setattr(args, key, quick[key] if args.quick else default)


# -- argparse `type=` checkers: each names the rule a value broke ----------------------------
def int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def float_in(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False
             ) -> Callable[[str], float]:
    """A finite number in the range, whose ends are included unless *_open."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (math.isfinite(value) and above and below):
            if high == math.inf:
                rule = f"must be {'>' if low_open else '>='} {low:g}"
            else:
                rule = f"must be in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"{rule}, got {text}")
        return value
    return parse


def existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def existing_dir(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"no such folder: {text}")
    return path


def pipeline_dir(text: str) -> Path:
    """A diffusers pipeline saved with save_pretrained (checked before diffusers is imported)."""
    path = existing_dir(text)
    if not (path / "model_index.json").is_file():
        raise argparse.ArgumentTypeError(f"{text} has no model_index.json: give a folder with a diffusers pipeline "
                                         "saved by save_pretrained")
    return path


def output_file(suffix: str | None = None) -> Callable[[str], Path]:
    """A file the CLI will write: not a folder, with `suffix` when given."""
    def parse(text: str) -> Path:
        path = Path(text)
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name")
        if suffix is not None and path.suffix.lower() != suffix:
            raise argparse.ArgumentTypeError(f"must end in {suffix}, got {text}")
        return path
    return parse

"""Command-line plumbing shared by every entry point: one-line errors and documented exit codes.

`ArgumentParser` reports a bad flag in one line; `@entry_point` turns the expected failures
into one line on stderr and an exit code, so a traceback always means a bug:
bad input (a missing or corrupt file, a bad value) → 2; storage refusing a write (disk full,
read-only, I/O error) → 5; Ctrl-C → 130.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable

from runtime.errors import EXIT_INPUT, EXIT_INTERRUPTED, EXIT_STORAGE, InputError, StorageError

USER_ERRORS = (
    InputError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error: `error: argument --k: invalid int value: 'abc' (see --help)`."""

    def error(self, message: str):
        self.exit(EXIT_INPUT, f"error: {message} (see {self.prog} --help)\n")


def positive_ints(text: str) -> list[int]:
    """argparse type: '1,5,10' → [1, 5, 10]."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not comma-separated integers (e.g. 1,5,10)"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be >= 1")
    return values


def one_line(exc: BaseException) -> str:
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    return text or type(exc).__name__


def entry_point(main: Callable[..., int]) -> Callable[..., int]:
    """Wraps a `main(argv) -> exit code`: expected failures become `error: ...` and a code."""

    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except SystemExit as exc:  # argparse (--help, a bad flag): its message is printed already
            return exc.code if isinstance(exc.code, int) else EXIT_INPUT
        except StorageError as exc:
            print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
            return EXIT_STORAGE
        except USER_ERRORS as exc:
            print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
            return EXIT_INPUT
        except OSError as exc:  # disk full, read-only file system, I/O error while writing
            print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
            return EXIT_STORAGE
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED

    return run

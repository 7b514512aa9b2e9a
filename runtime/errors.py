"""The error kinds every entry point turns into one clear line and a documented exit code.

InputError    a file or value the user gave cannot be used (exit 2); ConfigError, DataError
              and ChecksumError are kinds of it
StorageError  writing to storage failed: disk full, read-only, vanished (exit 5)
"""

from __future__ import annotations

import shutil
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_INPUT, EXIT_NAN, EXIT_OOM, EXIT_STORAGE = 0, 1, 2, 3, 4, 5
EXIT_INTERRUPTED = 130


class InputError(ValueError):
    """A file or value given by the user cannot be used; the message names it and says why."""


class StorageError(OSError):
    """Storage refused a write (disk full, read-only, vanished); names the path and the cause."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def storage_error(action: str, path: object, exc: BaseException) -> StorageError:
    """`action` of `path` failed because of `exc`, in one line (e.g. 'No space left on device')."""
    text = str(exc).strip()
    cause = getattr(exc, "strerror", None) or (
        text.splitlines()[-1] if text else type(exc).__name__
    )
    return StorageError(f"{action} {path} failed: {cause}")


def root_os_error(exc: BaseException) -> BaseException:
    """The OSError inside a wrapped exception (e.g. DCP's CheckpointException), if there is one."""
    seen = exc
    for _ in range(8):
        if isinstance(seen, OSError):
            return seen
        failures = getattr(seen, "failures", None)  # CheckpointException: {rank: (exc, trace)}
        if isinstance(failures, dict) and failures:
            first = next(iter(failures.values()))
            seen = first[0] if isinstance(first, tuple) else first
            continue
        if seen.__cause__ is None and seen.__context__ is None:
            break
        seen = seen.__cause__ or seen.__context__
    return exc


def free_bytes(path: Path) -> int:
    """Free space on the file system of `path` (or its nearest existing ancestor)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free

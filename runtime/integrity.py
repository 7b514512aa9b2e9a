"""File integrity: SHA256 of files, SHA256SUMS manifests, and atomic (temp + rename) writes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from runtime.errors import InputError

SUMS_FILE = "SHA256SUMS"
_CHUNK = 8 << 20


class ChecksumError(InputError):
    """A file's content does not match its recorded SHA256."""


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temp path beside `path`; renames it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_sha256sums(directory: str | Path, filenames: Iterable[str]) -> Path:
    """Writes `SHA256SUMS` (sha256sum format) for `filenames` relative to `directory`."""
    directory = Path(directory)
    lines = [f"{sha256_file(directory / name)}  {name}\n" for name in sorted(filenames)]
    sums = directory / SUMS_FILE
    atomic_write_text(sums, "".join(lines))
    return sums


def read_sha256sums(directory: str | Path) -> dict[str, str]:
    sums = Path(directory) / SUMS_FILE
    if not sums.is_file():
        raise ChecksumError(f"no {SUMS_FILE} in {directory}: cannot verify its files")
    entries = {}
    for lineno, line in enumerate(sums.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise ChecksumError(f"{sums}:{lineno}: malformed line {line!r}")
        entries[name] = digest
    return entries


def sha256sums_problems(directory: str | Path, only: Iterable[str] | None = None) -> list[str]:
    """Every file listed in `SHA256SUMS` (or just `only`) that is missing or differs, one line each."""
    directory = Path(directory)
    try:
        expected = read_sha256sums(directory)
    except ChecksumError as exc:
        return [str(exc)]
    problems = []
    for name in sorted(expected) if only is None else list(only):
        path = directory / name
        if name not in expected:
            problems.append(f"{path} is not listed in {directory / SUMS_FILE}")
        elif not path.is_file():
            problems.append(f"{path} is listed in {SUMS_FILE} but missing")
        elif (actual := sha256_file(path)) != expected[name]:
            problems.append(
                f"SHA256 mismatch for {path}: expected {expected[name]}, got {actual} "
                "(file corrupted or modified; re-download or re-convert it)"
            )
    return problems


def verify_sha256sums(directory: str | Path, only: Iterable[str] | None = None) -> None:
    """Checks every file listed in `SHA256SUMS` (or just `only`); raises on the first problem."""
    problems = sha256sums_problems(directory, only)
    if problems:
        raise ChecksumError(problems[0])

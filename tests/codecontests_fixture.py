"""CodeContests records in the exact upstream (deepmind/code_contests) schema, built by the tests."""

from __future__ import annotations

import json
from pathlib import Path

PY3, CPP, PY2 = 3, 2, 1


def tests_block(pairs: list[tuple[str, str]]) -> dict:
    return {"input": [i for i, _ in pairs], "output": [o for _, o in pairs]}


def solutions_block(items: list[tuple[int, str]]) -> dict:
    return {"language": [lang for lang, _ in items], "solution": [code for _, code in items]}


def problem(
    name: str,
    description: str,
    correct: list[tuple[int, str]],
    incorrect: list[tuple[int, str]],
    tests: list[tuple[str, str]] | None = None,
) -> dict:
    tests = tests or [("1 2\n", "3\n")]
    return {
        "name": name,
        "description": description,
        "public_tests": tests_block(tests[:1]),
        "private_tests": tests_block(tests[1:]),
        "generated_tests": tests_block([]),
        "source": 2,
        "difficulty": 7,
        "solutions": solutions_block(correct),
        "incorrect_solutions": solutions_block(incorrect),
        "cf_contest_id": 1,
        "cf_index": "A",
        "cf_points": 500.0,
        "cf_rating": 800,
        "cf_tags": ["math"],
        "is_description_translated": False,
        "untranslated_description": "",
        "time_limit": {"seconds": 2, "nanos": 0},
        "memory_limit_bytes": 256000000,
        "input_file": "",
        "output_file": "",
    }


ADD = "a, b = map(int, input().split())\nprint(a + b)\n"
ADD_CRLF = (
    "a, b = map(int, input().split())\r\nprint(a + b)   \r\n"  # duplicate after normalisation
)
SUB = "a, b = map(int, input().split())\nprint(a - b)\n"


def fixture_problems(n: int = 12) -> list[dict]:
    problems = [
        problem(
            "0001_A. Sum",
            "Print the sum of two integers a and b.",
            correct=[(PY3, ADD), (PY3, ADD_CRLF), (CPP, "int main(){}"), (PY2, "print 1")],
            incorrect=[(PY3, SUB), (PY3, "print(0)\n")],
            tests=[("1 2\n", "3\n"), ("5 5\n", "10\n")],
        ),
        problem(
            "0002_B. Conflict",
            "A problem whose solution is labelled both ways.",
            correct=[(PY3, "print(42)\n"), (PY3, "x = 1\nprint(x)\n")],
            incorrect=[(PY3, "print(42)\n")],
        ),
    ]
    for i in range(2, n):
        body = f"n = int(input())\nprint(n * {i})\n"
        problems.append(
            problem(
                f"{i:04d}_C. Times {i}",
                f"Multiply n by {i}. " * 3,
                correct=[(PY3, body)],
                incorrect=[(PY3, body.replace("*", "+"))],
            )
        )
    return problems


def write_jsonl(problems: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p) + "\n" for p in problems))
    return path


def write_parquet(problems: list[dict], path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(problems), path)
    return path

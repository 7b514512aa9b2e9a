"""Processing throughput of `data.prepare`: records/s and tokens/s.

    python -m bench.data_processing --tokenizer TOKENIZER.model [--mbpp mbpp.jsonl] [--problems N]

Runs MBPP (if given) and a synthetic CodeContests set in the upstream schema, each through the
whole pipeline (read, template, length policy, dedupe, split, decontaminate, write, checksums).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from data.prepare import prepare
from data.process import ProcessConfig
from tests.codecontests_fixture import problem, write_jsonl


def synthetic_codecontests(n: int) -> list[dict]:
    problems = []
    for i in range(n):
        desc = f"Problem {i}. Given n integers, print their sum modulo {i + 7}. " * 8
        good = [
            (
                3,
                f"n = int(input())\nxs = list(map(int, input().split()))\nprint(sum(xs) % {i + 7})\n",
            ),
            (
                3,
                f"import sys\nxs = sys.stdin.read().split()[1:]\nprint(sum(map(int, xs)) % {i + 7})\n",
            ),
        ]
        bad = [(3, f"n = int(input())\nprint(n % {i + 7})\n")]
        problems.append(
            problem(f"{i:05d}_A. Sum {i}", desc, good, bad, tests=[("2\n1 2\n", "3\n")])
        )
    return problems


def run(dataset: str, source: Path, tokenizer: Path, **kwargs) -> dict:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        summary = prepare(dataset, source, Path(out), tokenizer, ProcessConfig(), **kwargs)
        seconds = time.perf_counter() - start
    records = sum(summary["records"][s] for s in ("train", "validation", "test"))
    tokens = summary["token_length"]["mean"] * records
    return {
        "dataset": dataset,
        "records": records,
        "seconds": round(seconds, 2),
        "records_per_s": round(records / seconds),
        "tokens_per_s": round(tokens / seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--mbpp", type=Path)
    parser.add_argument("--problems", type=int, default=2000)
    args = parser.parse_args()
    results = []
    if args.mbpp:
        results.append(run("mbpp", args.mbpp, args.tokenizer))
    with tempfile.TemporaryDirectory() as raw:
        write_jsonl(synthetic_codecontests(args.problems), Path(raw) / "cc.jsonl")
        results.append(
            run("codecontests", Path(raw), args.tokenizer, humaneval_for_decontamination=True)
        )
    print(
        json.dumps(
            {"machine": platform.processor() or platform.machine(), "results": results}, indent=2
        )
    )


if __name__ == "__main__":
    main()

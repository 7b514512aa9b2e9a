"""The whole experiment on one CPU machine, nothing downloaded, sized to a time budget:
`python -m launch.demo [--minutes 20] [--seeds 1]`.

Stages: synthetic verifiable tasks → calibrate this machine and plan → micro assets (a code
tokenizer and micro models, prepare_assets steps 0, 1, 5) → tasks processed (60/10/30 split by
task; a correct-only copy) → the Rho-1 reference (micro-ref, next token) trained on the correct
training solutions, its CE precomputed → baseline, rho1-wmtp and critic-wmtp fine-tuned from the
same micro-mtp, once per seed → evaluation (every test task × N samples at T=0.2; lossless
self-speculative decoding on a few of them; HumanEval) → `evaluation.compare` (pass@1 with 95% intervals, paired
tests against the baseline) and reports/demo-summary.md. Everything lands under --out (default
outputs/demo); MLflow in its sqlite store.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from data.splits import split_sizes
from launch.demo_plan import (
    QUICK_LIMITS,
    QUICK_SIZES,
    SIZES,
    Calibration,
    Limits,
    Plan,
    Size,
    calibrate,
    plan,
    replan,
)
from runtime.cli import ArgumentParser, entry_point
from runtime.history import read_history
from runtime.progress import duration

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ALGOS = ("baseline", "rho1-wmtp", "critic-wmtp")
SPLIT = (0.6, 0.1, 0.3)  # train, validation, test shares of the tasks


@dataclass(frozen=True)
class DemoSettings:
    sizes: tuple[Size, ...]
    limits: Limits
    task_variants: int
    seq_len: int = 512
    corpus_mb: float = 6.0  # of code the tokenizer is trained on


FULL = DemoSettings(SIZES, Limits(), task_variants=8)
QUICK = DemoSettings(QUICK_SIZES, QUICK_LIMITS, task_variants=2, corpus_mb=0.6)


class Stages:
    """Numbered stage lines: title, then the time taken against the plan's prediction."""

    def __init__(self, total: int):
        self.total, self.n, self.t0 = total, 0, time.perf_counter()
        self.times: dict[str, float] = {}

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def start(self, key: str, title: str) -> None:
        self.n, self.key, self.started = self.n + 1, key, time.perf_counter()
        print(f"\n[demo {self.n}/{self.total}] {title}", flush=True)

    def done(self, note: str = "", predicted: float | None = None) -> None:
        took = time.perf_counter() - self.started
        self.times[self.key] = round(took, 1)
        against = f" (planned {duration(predicted)})" if predicted is not None else ""
        print(
            f"[demo {self.n}/{self.total}] done in {duration(took)}{against}, "
            f"{duration(self.elapsed)} in all {note}".rstrip(),
            flush=True,
        )


def micro_recipes() -> dict[str, str]:
    """Every shipped micro recipe (recipes/micro-*.yaml) by the algorithm it runs."""
    found = {}
    for path in sorted((REPO / "recipes").glob("micro-*.yaml")):
        algo = (yaml.safe_load(path.read_text()).get("weighting") or {}).get("algo")
        found.setdefault(algo, path.name)
    return found


def algos_argument(text: str) -> tuple[str, ...]:
    """`--algos baseline,dft`: algorithms with a micro recipe; the baseline, always compared
    against, comes first (added when not named)."""
    available = micro_recipes()
    algos = tuple(dict.fromkeys(a.strip() for a in text.split(",") if a.strip()))
    unknown = [a for a in algos if a not in available]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"{unknown[0]!r} is invalid: allowed {', '.join(sorted(available))} (an algorithm "
            "with a recipes/micro-*.yaml)"
        )
    return ("baseline", *(a for a in algos if a != "baseline"))


def check(code: int, what: str) -> None:
    if code != 0:
        raise SystemExit(f"demo stopped: {what} exited with code {code}")


def write_config(out: Path, micro: dict, corpus_mb: float) -> Path:
    config = {
        "storage": {"root": str(out / "storage"), "cache_dir": str(out / "cache")},
        "mlflow": {"tracking_uri": f"sqlite:///{out / 'mlflow.db'}"},
        "assets": {"micro": {"max_corpus_mb": corpus_mb, **micro}},
        "hardware": {"peak_tflops": 1.0},
    }
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def needs_reference(recipe: str) -> bool:
    """Whether the micro recipe's algorithm reads the Rho-1 reference's CE."""
    from training.recipe import load_recipe
    from weighting import get_weighter

    return "reference_ce" in get_weighter(load_recipe(REPO / "recipes" / recipe).weighting).needs


def train(recipe: str, overrides: list[str], config: Path) -> None:
    from train_wmtp import main as train_main

    check(
        train_main([str(REPO / "recipes" / recipe), "--config", str(config), *overrides]),
        f"train_wmtp {recipe}",
    )


def step_seconds(run_dir: Path) -> tuple[float, float]:
    """A finished run's median and total seconds of its optimizer steps, from its history."""
    times = [h["step_time_s"] for h in read_history(run_dir, "step")]
    return statistics.median(times), sum(times)


class Demo:
    """The stages, in order; each leaves its outputs under `out`."""

    def __init__(
        self,
        out: Path,
        settings: DemoSettings,
        minutes: float,
        seeds: int | None,
        algos: tuple[str, ...] = DEFAULT_ALGOS,
    ):
        self.out, self.settings, self.seeds, self.algos = out, settings, seeds, algos
        self.recipes = {algo: micro_recipes()[algo] for algo in algos}
        self.budget_s = minutes * 60
        self.stages = Stages(8)
        self.storage = out / "storage"
        self.tasks_dir = self.storage / "datasets_local_small" / "tasks"
        self.correct_dir = self.storage / "datasets_local_small" / "tasks-correct"
        self.runs = out / "runs"
        self.plan: Plan | None = None
        self.calibration: Calibration | None = None

    def run(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        n_tasks = self.make_tasks()
        self.make_plan(split_sizes(n_tasks, SPLIT)[2])
        self.make_assets()
        self.process_tasks()
        self.train_reference()
        self.finetune()
        self.evaluate()
        return self.report()

    # ------------------------------------------------------------------------- stages
    def make_tasks(self) -> int:
        from launch.synthetic_tasks import write_tasks

        self.stages.start("tasks", "synthetic verifiable tasks, labelled by running their tests")
        stats = write_tasks(
            self.tasks_dir / "raw" / "tasks.jsonl", variants=self.settings.task_variants
        )
        self.programs_per_s = stats["solutions"] / max(self.stages.elapsed, 1e-3)
        self.stages.done(f"{json.dumps(stats)}, {self.programs_per_s:.1f} programs/s")
        return stats["tasks"]

    def make_plan(self, test_problems: int) -> None:
        s = self.settings
        self.stages.start("plan", "calibrate this machine and size the demo to the budget")
        self.test_problems = test_problems
        self.calibration = calibrate(
            s.sizes,
            s.limits,
            self.budget_s - self.stages.elapsed,
            self.seeds,
            test_problems,
            self.programs_per_s,
        )
        self.plan = plan(
            self.calibration,
            s.sizes,
            s.limits,
            self.budget_s,
            self.stages.elapsed,
            self.seeds,
            test_problems,
        )
        print(f"  plan: {self.plan.describe()}", flush=True)
        for warning in self.plan.warnings:
            print(f"[warning] {warning}", flush=True)
        self.stages.done()

    def make_assets(self) -> None:
        from prepare_assets import main as assets_main

        self.stages.start(
            "assets", f"micro assets: code tokenizer, micro-mtp and micro-ref ({self.plan.size})"
        )
        self.config = write_config(self.out, self.plan.micro, self.settings.corpus_mb)
        for step in ("0", "1", "5"):
            check(
                assets_main(["--step", step, "--config", str(self.config)]),
                f"prepare_assets --step {step}",
            )
        self.tokenizer = self.storage / "models_v2" / "micro-mtp" / "tokenizer" / "tokenizer.model"
        self.stages.done()

    def process_tasks(self) -> None:
        from data.prepare import prepare
        from data.process import ProcessConfig

        self.stages.start("process", "process the tasks: template, 60/10/30 split by task")
        records = {}
        for output, incorrect in ((self.tasks_dir, "tag"), (self.correct_dir, "drop")):
            summary = prepare(
                "tasks",
                self.tasks_dir / "raw",
                output,
                self.tokenizer,
                ProcessConfig(max_length=self.settings.seq_len, incorrect=incorrect),
                humaneval_for_decontamination=True,
                split_ratios=SPLIT,
            )
            records[incorrect] = summary["tasks"]
        self.stages.done(f"tasks per split {records['tag']}")

    def common(self, steps: int) -> list[str]:
        return [
            f"model.tokenizer={self.tokenizer}",
            f"data.seq_len={self.settings.seq_len}",
            f"train.max_steps={steps}",
            f"train.eval_every={max(steps // 3, 1)}",
            "train.log_every=50",
            "checkpoint.every_steps=0",
        ]

    def train_reference(self) -> None:
        from training.precompute_reference import main as precompute_main

        p = self.plan
        self.stages.start(
            "reference",
            f"the Rho-1 reference: micro-ref (next token) trained {p.ref_steps} steps on the "
            "correct training solutions; its CE precomputed",
        )
        data = self.correct_dir / "processed"
        started = time.perf_counter()
        train(
            "micro-baseline.yaml",
            [
                f"model.base={self.storage / 'models_v2' / 'micro-ref' / 'safetensors'}",
                "model.require_mtp=false",
                f"data.train={data / 'train.jsonl'}",
                f"data.validation={data / 'validation_small.jsonl'}",
                *self.common(p.ref_steps),
                f"run.output_dir={self.runs / 'reference'}",
                "run.name=demo-reference",
            ],
            self.config,
        )
        measured, in_steps = step_seconds(self.runs / "reference")
        overhead = time.perf_counter() - started - in_steps  # start-up, validation, export
        recipe = str(REPO / "recipes" / "micro-rho1.yaml")
        check(
            precompute_main([recipe, *self.reference_ce(), "--config", str(self.config)]),
            "precompute_reference",
        )
        self.plan = replan(
            p, self.calibration, self.settings.limits, measured, self.stages.elapsed,
            self.test_problems, overhead,
        )  # fmt: skip
        self.stages.done(
            f"({measured:.2f}s per step, {overhead:.1f}s per run besides its steps)",
            p.predicted_s["reference"],
        )
        for warning in self.plan.warnings[len(p.warnings) :]:
            print(f"[plan] {warning}", flush=True)

    def reference_ce(self) -> list[str]:
        """Overrides of rho1-wmtp's recipe: the reference CE of the task training split."""
        return [
            f"model.reference={self.runs / 'reference' / 'export' / 'final'}",
            f"weighting.reference_ce_dir={self.out / 'cache' / 'reference-ce'}",
            f"data.train={self.tasks_dir / 'processed' / 'train.jsonl'}",
            f"model.tokenizer={self.tokenizer}",
        ]

    def run_dir(self, algo: str, seed: int) -> Path:
        return self.runs / algo / f"seed{seed}"

    def finetune(self) -> None:
        p = self.plan
        self.stages.start(
            "fine-tuning",
            f"fine-tune micro-mtp: {', '.join(self.algos)} × {p.seeds} seed(s), "
            f"{p.finetune_steps} steps each",
        )
        base = self.storage / "models_v2" / "micro-mtp" / "safetensors"
        for seed in range(p.seeds):
            for algo, recipe in self.recipes.items():
                print(f"[demo {self.stages.n}/8] {algo}, seed {seed}", flush=True)
                extra = (
                    [*self.reference_ce(), "weighting.reference_source=precomputed"]
                    if needs_reference(recipe)
                    else []
                )
                train(
                    recipe,
                    [
                        f"model.base={base}",
                        f"data.train={self.tasks_dir / 'processed' / 'train.jsonl'}",
                        f"data.validation={self.tasks_dir / 'processed' / 'validation_small.jsonl'}",
                        *self.common(p.finetune_steps),
                        f"weighting.critic.stage1_steps={p.stage1_steps}",
                        *extra,
                        f"run.seed={42 + seed}",
                        f"run.output_dir={self.run_dir(algo, seed)}",
                        f"run.name=demo-{algo}-seed{seed}",
                    ],
                    self.config,
                )
        self.stages.done(predicted=p.predicted_s["fine-tuning"])

    def evaluate(self) -> None:
        from eval_harness import main as eval_main

        p = self.plan
        self.stages.start(
            "evaluation",
            f"evaluate: {self.test_problems} test tasks × {p.eval_samples} samples (T=0.2, "
            f"top-p 0.95); lossless self-speculative decoding on {p.spec_baseline_problems} of "
            f"them (acceptance per head, speed against plain); HumanEval {p.humaneval_problems}",
        )
        for seed in range(p.seeds):
            for algo in self.algos:
                run = self.run_dir(algo, seed)
                common = [
                    "--ckpt", str(run / "export" / "final"), "--config", str(self.config),
                    "--max-new-tokens", str(p.max_new_tokens), "--prompt-style", "alpaca",
                    "--timeout", "3", "--seed", str(seed),
                ]  # fmt: skip
                tasks = [
                    "--tasks", "tasks", "--n-samples", str(p.eval_samples),
                    "--synthetic", str(self.tasks_dir / "raw" / "tasks.jsonl"),
                    "--synthetic-split", str(self.tasks_dir / "processed" / "test.jsonl"),
                ]  # fmt: skip
                speculative = [
                    "--speculative", "--limit", str(p.spec_baseline_problems),
                    "--speculative-baseline", str(p.spec_baseline_problems), "--no-mlflow",
                ]  # fmt: skip
                humaneval = ["--tasks", "humaneval", "--limit", str(p.humaneval_problems)]
                for what, argv in (
                    ("tasks", [*tasks, "--output-dir", str(run / "eval")]),
                    ("speculative", [*tasks, *speculative, "--output-dir", str(run / "eval-speculative")]),
                    ("humaneval", [*humaneval, "--output-dir", str(run / "eval-humaneval")]),
                ):  # fmt: skip
                    check(eval_main([*common, *argv]), f"eval {what} {algo} seed {seed}")
        self.stages.done(predicted=p.predicted_s["evaluation"])

    def report(self) -> Path:
        from evaluation.compare import compare, write
        from launch.demo_report import write_summary

        self.stages.start("report", "compare (95% intervals, paired tests) and report")
        experiments = {
            algo: [
                self.run_dir(algo, seed) / name
                for seed in range(self.plan.seeds)
                for name in ("eval", "eval-humaneval")
            ]
            for algo in self.algos
        }
        comparison = compare(experiments, baseline="baseline")
        write(comparison, self.out / "reports")
        path = write_summary(
            self.out,
            list(self.algos),
            comparison,
            self.plan,
            self.calibration,
            self.stages.times,
            self.stages.elapsed,
        )
        self.stages.done(str(path))
        return path


def seeds_argument(text: str) -> int | None:
    """'auto' → None (the planner chooses), else a positive integer."""
    if text == "auto":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: a positive integer or 'auto'")
    return int(text)


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"))
    parser.add_argument(
        "--minutes", type=float, default=20.0, help="time budget the stages are sized to"
    )
    parser.add_argument(
        "--seeds",
        type=seeds_argument,
        default=None,
        help="fine-tune each algorithm this many times, the comparison pools them (default "
        "auto: as many as the budget allows at full length, up to 3)",
    )
    parser.add_argument(
        "--algos",
        type=algos_argument,
        default=DEFAULT_ALGOS,
        help="comma-separated algorithms to compare with the baseline (default "
        f"{','.join(DEFAULT_ALGOS)}; any with a recipes/micro-*.yaml, e.g. baseline,dft)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes, for tests (about a minute)"
    )
    a = parser.parse_args(argv)
    if a.minutes <= 0:
        parser.error(f"--minutes {a.minutes:g} is invalid: must be > 0")
    report = Demo(a.out, QUICK if a.quick else FULL, a.minutes, a.seeds, a.algos).run()
    print(f"\nreport: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

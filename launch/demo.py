"""The whole experiment on one CPU machine, nothing downloaded, sized to a time budget:
`python -m launch.demo [--minutes 20] [--seeds auto] [--algos baseline,rho1-wmtp,critic-wmtp]`.

Stages: synthetic verifiable tasks → calibrate this machine and plan → the pretrained micro base
(`prepare_assets.py` steps 0, 1, 5: a code tokenizer and micro-mtp pretrained with the MTP loss
on Python's standard library, micro-ref its next-token part; cached by corpus hash) → tasks
processed (60/10/30 split by task; a correct-only copy) → the Rho-1 reference step (micro-ref
fine-tuned on the correct training solutions, its CE precomputed) → every arm fine-tuned from
the same base on the same rows, once per seed → evaluation (every test task × N samples at
T=0.2 / top-p 0.95; self-speculative decoding on a few; a HumanEval floor) → `evaluation.compare`
(pass@1 with 95% intervals, paired tests, each arm's health) and reports/demo-summary.md.
Everything lands under --out (default outputs/demo); MLflow in its sqlite store.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from data.splits import split_sizes
from launch.demo_plan import (
    BASE_TOKENS,
    QUICK_BASE_TOKENS,
    QUICK_SHARES,
    QUICK_SIZES,
    SIZES,
    Calibration,
    Plan,
    Shape,
    Shares,
    calibrate,
    plan,
)
from runtime.cli import ArgumentParser, entry_point
from runtime.progress import duration

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ALGOS = ("baseline", "rho1-wmtp", "critic-wmtp")
SPLIT = (0.6, 0.1, 0.3)  # train, validation, test shares of the tasks
STAGES = ("tasks", "plan", "base", "process", "reference", "fine-tuning", "evaluation", "report")


@dataclass(frozen=True)
class DemoSettings:
    sizes: dict[str, dict]
    shares: Shares
    base_tokens: tuple[int, ...]
    task_variants: int
    corpus_mb: float  # of Python source the base may pretrain on
    shape: Shape = Shape()


FULL = DemoSettings(SIZES, Shares(), BASE_TOKENS, task_variants=8, corpus_mb=12.0)
QUICK = DemoSettings(QUICK_SIZES, QUICK_SHARES, QUICK_BASE_TOKENS, task_variants=2, corpus_mb=0.4)


class Stages:
    """Numbered stage lines: title, then the time taken against the plan's prediction."""

    def __init__(self):
        self.n, self.t0 = 0, time.perf_counter()
        self.times: dict[str, float] = {}

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def start(self, key: str, title: str) -> None:
        self.n, self.key, self.started = self.n + 1, key, time.perf_counter()
        print(f"\n[demo {self.n}/{len(STAGES)}] {title}", flush=True)

    def done(self, note: str = "", predicted: float | None = None) -> None:
        took = time.perf_counter() - self.started
        self.times[self.key] = round(took, 1)
        against = f" (planned {duration(predicted)})" if predicted is not None else ""
        print(
            f"[demo {self.n}/{len(STAGES)}] done in {duration(took)}{against}, "
            f"{duration(self.elapsed)} in all {note}".rstrip(),
            flush=True,
        )


def check(code: int, what: str) -> None:
    if code != 0:
        raise SystemExit(f"demo stopped: {what} exited with code {code}")


def micro_recipes() -> dict[str, str]:
    """Every shipped micro recipe (recipes/micro-*.yaml) by the algorithm it runs."""
    found = {}
    for path in sorted((REPO / "recipes").glob("micro-*.yaml")):
        algo = (yaml.safe_load(path.read_text()).get("weighting") or {}).get("algo")
        found.setdefault(algo, path.name)
    return found


def load_micro_recipe(algo: str, overrides: list[str] | None = None):
    from training.recipe import load_recipe

    return load_recipe(REPO / "recipes" / micro_recipes()[algo], overrides)


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


def train(recipe: str, overrides: list[str], config: Path) -> None:
    from train_wmtp import main as train_main

    check(
        train_main([str(REPO / "recipes" / recipe), "--config", str(config), *overrides]),
        f"train_wmtp {recipe}",
    )


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
        self.stages = Stages()
        self.storage = out / "storage"
        self.tasks_dir = self.storage / "datasets_local_small" / "tasks"
        self.correct_dir = self.storage / "datasets_local_small" / "tasks-correct"
        self.runs = out / "runs"
        self.models = self.storage / "models_v2"
        self.tokenizer = self.models / "micro-mtp" / "tokenizer" / "tokenizer.model"
        self.shape = settings.shape
        self.plan: Plan | None = None
        self.calibration: Calibration | None = None

    def run(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        n_tasks = self.make_tasks()
        self.make_plan(split_sizes(n_tasks, SPLIT)[2])
        self.make_base()
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

    def micro_config(self, size: str, tokens: int) -> dict:
        """`assets.micro` of the environment config: the size and its pretraining."""
        s = self.settings
        return {
            **s.sizes[size],
            "max_corpus_mb": s.corpus_mb,
            "pretrain_tokens": tokens,
            "pretrain_seq_len": s.shape.seq_len,
            "pretrain_micro_batch": s.shape.pretrain_rows,
        }

    def write_config(self, micro: dict) -> Path:
        config = {
            "storage": {"root": str(self.storage), "cache_dir": str(self.out / "cache")},
            "mlflow": {"tracking_uri": f"sqlite:///{self.out / 'mlflow.db'}"},
            "assets": {"micro": micro},
            "hardware": {"peak_tflops": 1.0},
        }
        path = self.out / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def cached_base(self) -> tuple[str, int] | None:
        """(size, tokens) of a base already built for this corpus and these settings."""
        from assets.layout import Layout
        from assets.sources import Fetcher
        from assets.steps import STEPS, Context
        from runtime.config import load_env_config

        meta = self.storage / "models_v2" / "micro-mtp" / "metadata.json"
        if not meta.is_file():
            return None
        try:
            facts = json.loads(meta.read_text())
            params, tokens = facts["params"], facts["pretraining"]["tokens_planned"]
        except (ValueError, KeyError, TypeError):
            return None
        size = next((name for name, s in self.settings.sizes.items()
                     if all(params.get(k) == v for k, v in s.items())), None)  # fmt: skip
        if size is None:
            return None
        config = load_env_config(str(self.write_config(self.micro_config(size, tokens))))
        ctx = Context(config, Layout(self.storage), Fetcher(config, self.out / "cache"))
        return (size, tokens) if not STEPS[5].check(ctx) else None

    def make_plan(self, test_problems: int) -> None:
        s = self.settings
        self.stages.start("plan", "calibrate this machine and size the demo to the budget")
        self.test_problems = test_problems
        cached = self.cached_base()
        arms = {algo: load_micro_recipe(algo, self.arm_overrides(algo)) for algo in self.algos}
        self.calibration = calibrate(
            s.sizes, arms, s.shares, s.shape, self.budget_s, self.seeds, test_problems,
            self.programs_per_s, cached, s.base_tokens,
        )  # fmt: skip
        self.plan = plan(
            self.calibration, s.sizes, s.shares, s.shape, self.budget_s, self.seeds,
            test_problems, cached, s.base_tokens,
        )  # fmt: skip
        print(f"  plan: {self.plan.describe()}", flush=True)
        for note in self.plan.notes:
            print(f"[warning] {note}", flush=True)
        self.stages.done()

    def make_base(self) -> None:
        from prepare_assets import main as assets_main

        p = self.plan
        what = "cached: verify" if p.base_cached else f"pretrain on {p.base_tokens:,} tokens"
        self.stages.start(
            "base", f"the pretrained micro base ({p.size}, {what}): code tokenizer, micro-mtp "
            "pretrained on Python's standard library with the MTP loss, micro-ref its next-token "
            "part",
        )  # fmt: skip
        self.config = self.write_config(self.micro_config(p.size, p.base_tokens))
        for step in ("0", "1", "5"):
            check(
                assets_main(["--step", step, "--config", str(self.config)]),
                f"prepare_assets --step {step}",
            )
        facts = json.loads((self.models / "micro-mtp" / "metadata.json").read_text())
        self.base_facts = facts["pretraining"]
        ce = ", ".join(f"{c:.2f}" for c in self.base_facts["held_out_ce_per_head"])
        self.stages.done(
            f"(held-out CE per head {ce}, {self.base_facts['tokens_seen']:,} tokens)",
            p.predicted_s["base"],
        )

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
                ProcessConfig(max_length=self.shape.seq_len, incorrect=incorrect),
                humaneval_for_decontamination=True,
                split_ratios=SPLIT,
            )
            records[incorrect] = summary["tasks"]
        self.stages.done(f"tasks per split {records['tag']}")

    def common(self, steps: int) -> list[str]:
        return [
            f"model.tokenizer={self.tokenizer}",
            f"data.seq_len={self.shape.seq_len}",
            f"data.micro_batch_size={self.shape.finetune_rows}",
            f"train.max_steps={steps}",
            f"train.eval_every={max(steps // 3, 1)}",
            "train.log_every=50",
            "checkpoint.every_steps=0",
        ]

    def arm_overrides(self, algo: str) -> list[str]:
        """An arm that reads the reference CE reads the precomputed one."""
        if not needs_reference(self.recipes[algo]):
            return []
        return [*self.reference_ce(), "weighting.reference_source=precomputed"]

    def train_reference(self) -> None:
        from training.precompute_reference import main as precompute_main

        p = self.plan
        self.stages.start(
            "reference",
            f"the Rho-1 reference step: micro-ref (the base's next-token part) fine-tuned "
            f"{p.reference_steps} steps on the correct training solutions; its CE precomputed",
        )
        data = self.correct_dir / "processed"
        train(
            "micro-baseline.yaml",
            [
                f"model.base={self.models / 'micro-ref' / 'safetensors'}",
                "model.require_mtp=false",
                f"data.train={data / 'train.jsonl'}",
                f"data.validation={data / 'validation_small.jsonl'}",
                *self.common(p.reference_steps),
                f"run.output_dir={self.runs / 'reference'}",
                "run.name=demo-reference",
            ],
            self.config,
        )
        recipe = str(REPO / "recipes" / "micro-rho1.yaml")
        check(
            precompute_main([recipe, *self.reference_ce(), "--config", str(self.config)]),
            "precompute_reference",
        )
        self.stages.done(predicted=p.predicted_s["reference"])

    def reference_ce(self) -> list[str]:
        """Overrides of an arm reading the reference CE: the CE of the task training split."""
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
            f"fine-tune the base: {', '.join(self.algos)} × {p.seeds} seed(s), "
            f"{p.finetune_steps} steps each from the same weights on the same rows",
        )
        base = self.models / "micro-mtp" / "safetensors"
        for seed in range(p.seeds):
            for algo, recipe in self.recipes.items():
                print(f"[demo {self.stages.n}/{len(STAGES)}] {algo}, seed {seed}", flush=True)
                train(
                    recipe,
                    [
                        f"model.base={base}",
                        f"data.train={self.tasks_dir / 'processed' / 'train.jsonl'}",
                        f"data.validation={self.tasks_dir / 'processed' / 'validation_small.jsonl'}",
                        *self.common(p.finetune_steps),
                        *self.arm_overrides(algo),
                        f"weighting.critic.stage1_steps={p.stage1_steps}",
                        f"weighting.critic.stage1_max_steps={2 * p.stage1_steps}",
                        f"run.seed={42 + seed}",
                        f"run.output_dir={self.run_dir(algo, seed)}",
                        f"run.name=demo-{algo}-seed{seed}",
                    ],
                    self.config,
                )
        self.stages.done(predicted=p.predicted_s["fine-tuning"])

    def evaluate(self) -> None:
        from eval_harness import main as eval_main

        p, shape = self.plan, self.shape
        self.stages.start(
            "evaluation",
            f"evaluate: {self.test_problems} test tasks × {p.eval_samples} samples (T="
            f"{shape.temperature}, top-p {shape.top_p}); lossless self-speculative decoding on "
            f"{p.speculative_problems} of them (acceptance per head, speed against plain); "
            f"HumanEval {p.humaneval_problems}",
        )
        sampling = ["--temperature", str(shape.temperature), "--top-p", str(shape.top_p),
                    "--max-new-tokens", str(shape.max_new_tokens)]  # fmt: skip
        for seed in range(p.seeds):
            for algo in self.algos:
                run = self.run_dir(algo, seed)
                common = [
                    "--ckpt", str(run / "export" / "final"), "--config", str(self.config),
                    *sampling, "--prompt-style", "alpaca", "--timeout", "3", "--seed", str(seed),
                ]  # fmt: skip
                tasks = [
                    "--tasks", "tasks", "--n-samples", str(p.eval_samples),
                    "--synthetic", str(self.tasks_dir / "raw" / "tasks.jsonl"),
                    "--synthetic-split", str(self.tasks_dir / "processed" / "test.jsonl"),
                ]  # fmt: skip
                speculative = [
                    "--speculative", "--limit", str(p.speculative_problems),
                    "--speculative-baseline", str(p.speculative_problems), "--no-mlflow",
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

        self.stages.start("report", "compare (95% intervals, paired tests, health) and report")
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
        finetune_lr = load_micro_recipe("baseline").train.lr
        path = write_summary(
            self.out, list(self.algos), comparison, self.plan, self.calibration,
            self.base_facts, finetune_lr, self.stages.times, self.stages.elapsed,
        )  # fmt: skip
        self.stages.done(str(path))
        return path


def needs_reference(recipe: str) -> bool:
    """Whether the micro recipe's algorithm reads the Rho-1 reference's CE."""
    from training.recipe import load_recipe
    from weighting import get_weighter

    return "reference_ce" in get_weighter(load_recipe(REPO / "recipes" / recipe).weighting).needs


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

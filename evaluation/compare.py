"""Compare experiments with error bars: `python -m evaluation.compare NAME=EVAL_DIR ... --baseline NAME --out DIR`.

Each EVAL_DIR is an `eval_harness.py` output directory (`{benchmark}_samples.jsonl`, summary.json);
`NAME=DIR1,DIR2,...` pools several (e.g. fine-tunes with different seeds: every problem's samples
are put together). For every experiment and benchmark: pass@k with a 95% confidence interval
(bootstrap over problems); for every experiment against the baseline: the paired difference over
the problems both evaluated, its 95% interval and a two-sided p-value from a paired sign-flip
permutation test, said plainly when it is not significant. Beside them: validation CE per head,
weight statistics (from each run's history, in the eval dir's parent) and speculative acceptance
per benchmark (from each eval dir's summary.json).

Writes DIR/comparison.md, DIR/comparison.json and DIR/comparison.svg.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evaluation.health import arm_facts, assess, verdict_override
from evaluation.metrics import pass_at_k
from runtime.cli import ArgumentParser, entry_point, positive_ints
from runtime.errors import InputError
from runtime.history import read_history
from runtime.integrity import atomic_write_text
from runtime.plots import interval_chart_svg

TRAINING_KEYS = (
    "val_loss",
    "weight_std",
    "weight_above_one_fraction",
    "weight_at_max_fraction",
    "weight_selected_fraction",
    "score_std",
    "stage1_explained_variance",
)


@dataclass(frozen=True)
class Interval:
    mean: float
    ci_low: float
    ci_high: float
    p_value: float | None = None

    def as_dict(self) -> dict:
        data = {"mean": self.mean, "ci_low": self.ci_low, "ci_high": self.ci_high}
        return data | ({"p_value": self.p_value} if self.p_value is not None else {})

    def text(self, digits: int = 3) -> str:
        return f"{self.mean:.{digits}f} [{self.ci_low:.{digits}f}, {self.ci_high:.{digits}f}]"

    @property
    def half_width(self) -> float:
        return (self.ci_high - self.ci_low) / 2


# ------------------------------------------------------------------------ statistics
def per_problem_pass_at_k(results: dict[str, list[bool]], k: int) -> dict[str, float]:
    """Unbiased pass@k of each problem with at least k samples."""
    return {task: pass_at_k(len(r), sum(r), k) for task, r in results.items() if len(r) >= k}


def bootstrap_mean(
    values: np.ndarray, n_resamples: int, rng: np.random.Generator, level: float = 0.95
) -> Interval:
    """Mean and percentile bootstrap interval, resampling the values (problems) with replacement."""
    if values.size == 0:
        return Interval(float("nan"), float("nan"), float("nan"))
    means = values[rng.integers(0, values.size, (n_resamples, values.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return Interval(
        float(values.mean()),
        float(np.percentile(means, tail)),
        float(np.percentile(means, 100 - tail)),
    )


def paired_permutation_p(
    differences: np.ndarray, n_resamples: int, rng: np.random.Generator
) -> float:
    """Two-sided p-value of mean(differences) = 0 by random sign flips (exact when n ≤ 16)."""
    observed = abs(differences.mean()) if differences.size else 0.0
    if differences.size == 0 or not np.any(differences):
        return 1.0
    if differences.size <= 16:
        signs = (
            (np.arange(2**differences.size)[:, None] >> np.arange(differences.size)) & 1
        ) * 2 - 1
        return float(np.mean(np.abs((signs * differences).mean(axis=1)) >= observed - 1e-12))
    signs = rng.choice([-1.0, 1.0], size=(n_resamples, differences.size))
    extreme = np.sum(np.abs((signs * differences).mean(axis=1)) >= observed - 1e-12)
    return float((extreme + 1) / (n_resamples + 1))


def paired_difference(
    a: dict[str, float], b: dict[str, float], n_resamples: int, rng: np.random.Generator
) -> tuple[Interval, int]:
    """a − b over the problems both have: mean, bootstrap interval, permutation p-value."""
    common = sorted(set(a) & set(b))
    d = np.array([a[t] - b[t] for t in common], dtype=np.float64)
    interval = bootstrap_mean(d, n_resamples, rng)
    return Interval(
        interval.mean, interval.ci_low, interval.ci_high, paired_permutation_p(d, n_resamples, rng)
    ), len(common)


# ------------------------------------------------------------------------------ inputs
def read_samples(eval_dirs: list[Path]) -> dict[str, dict[str, list[bool]]]:
    """benchmark → task → every sample's verdict, pooled over `eval_dirs`."""
    pooled: dict[str, dict[str, list[bool]]] = {}
    for directory in eval_dirs:
        files = sorted(directory.glob("*_samples.jsonl"))
        if not files:
            raise InputError(
                f"{directory}: no *_samples.jsonl (is it an eval_harness.py output dir?)"
            )
        for path in files:
            benchmark = path.name.removesuffix("_samples.jsonl")
            for lineno, line in enumerate(path.read_text().splitlines(), start=1):
                try:
                    row = json.loads(line)
                    pooled.setdefault(benchmark, {}).setdefault(row["task_id"], []).append(
                        bool(row["passed"])
                    )
                except (ValueError, KeyError, TypeError) as exc:
                    raise InputError(f"{path}:{lineno}: not an eval sample row ({exc})") from None
    return pooled


def training_facts(eval_dirs: list[Path]) -> dict[str, float]:
    """The last logged validation CE per head and weight statistics of the runs that made
    `eval_dirs` (the run history beside each eval dir), averaged over the runs."""
    values: dict[str, list[float]] = {}
    for directory in dict.fromkeys(d.parent for d in eval_dirs):
        history = read_history(directory)
        if not history:
            continue
        steps = [h for h in history if h.get("stage") == "step"]
        last_val = next((h for h in reversed(steps) if "val_loss" in h), {})
        last = steps[-1] if steps else {}
        for key, value in {**last, **last_val}.items():
            if key.startswith("val_ce_head") or key in TRAINING_KEYS:
                values.setdefault(key, []).append(float(value))
        ev = [h["stage1_explained_variance"] for h in history if "stage1_explained_variance" in h]
        if ev:
            values.setdefault("stage1_explained_variance", []).append(float(ev[-1]))
    return {k: float(np.mean(v)) for k, v in values.items()}


def decoding_facts(eval_dirs: list[Path]) -> dict[str, dict[str, float]]:
    """benchmark → speculative acceptance and speeds (`spec_*`, plain_tokens_per_s) from each
    eval dir's summary.json, averaged over the dirs that decoded it speculatively."""
    values: dict[str, dict[str, list[float]]] = {}
    for directory in eval_dirs:
        summary_file = directory / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
        for bench, stats in summary.items():
            for key, value in stats.items() if isinstance(stats, dict) else ():
                if key.startswith(("spec_", "plain_")) and isinstance(value, int | float):
                    values.setdefault(bench, {}).setdefault(key, []).append(float(value))
    return {
        bench: {k: float(np.mean(v)) for k, v in facts.items()} for bench, facts in values.items()
    }


# ------------------------------------------------------------------------ comparison
def compare(
    experiments: dict[str, list[Path]],
    baseline: str,
    k: int = 1,
    n_resamples: int = 10_000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict:
    if baseline not in experiments:
        raise InputError(
            f"--baseline {baseline!r} is not one of the experiments ({', '.join(experiments)})"
        )
    rng = np.random.default_rng(seed)
    samples = {name: read_samples(dirs) for name, dirs in experiments.items()}
    benchmarks = sorted(set.intersection(*(set(s) for s in samples.values())))
    if not benchmarks:
        raise InputError("the experiments share no benchmark")
    result = {
        "baseline": baseline,
        "k": k,
        "alpha": alpha,
        "bootstrap_resamples": n_resamples,
        "benchmarks": benchmarks,
        "experiments": {},
        "training": {},
        "decoding": {},
    }
    health = assess({name: arm_facts(dirs) for name, dirs in experiments.items()}, baseline)
    result["health"] = {name: h.as_dict() | {"line": h.line(name)} for name, h in health.items()}
    for name in experiments:
        result["experiments"][name] = {}
        result["training"][name] = training_facts(experiments[name])
        result["decoding"][name] = decoding_facts(experiments[name])
        for bench in benchmarks:
            values = per_problem_pass_at_k(samples[name][bench], k)
            counts = [len(v) for v in samples[name][bench].values()]
            entry = {
                f"pass@{k}": bootstrap_mean(
                    np.array(list(values.values())), n_resamples, rng
                ).as_dict(),
                "n_problems": len(values),
                "samples_per_problem": int(np.median(counts)) if counts else 0,
            }
            if name != baseline:
                base = per_problem_pass_at_k(samples[baseline][bench], k)
                delta, n_common = paired_difference(values, base, n_resamples, rng)
                significant = delta.p_value < alpha and not delta.ci_low <= 0 <= delta.ci_high
                inconclusive = verdict_override(name, baseline, health)
                entry["delta_vs_baseline"] = delta.as_dict() | {
                    "n_problems": n_common,
                    "significant": significant and inconclusive is None,
                    "verdict": inconclusive
                    or ("significant" if significant else "not significant: could be noise"),
                }
            result["experiments"][name][bench] = entry
    return result


def result_cells(entry: dict, k: int) -> str:
    """One experiment's table cells for a benchmark: pass@k [CI] | Δ [CI] | p | verdict."""
    passed = Interval(**entry[f"pass@{k}"]).text()
    if "delta_vs_baseline" not in entry:
        return f"{passed} | – | – | baseline"
    d = entry["delta_vs_baseline"]
    delta = Interval(d["mean"], d["ci_low"], d["ci_high"], d["p_value"])
    verdict = "**significant**" if d["significant"] else d["verdict"]
    return f"{passed} | {delta.text()} | {delta.p_value:.3g} | {verdict}"


def markdown(result: dict) -> str:
    k, base, alpha = result["k"], result["baseline"], result["alpha"]
    lines = [
        "# Comparison",
        "",
        f"pass@{k} with 95% confidence intervals (bootstrap over problems, {result['bootstrap_resamples']} "
        f"resamples); differences against **{base}** are paired by problem, with a two-sided sign-flip "
        f"permutation test (significant: p < {alpha} and the interval excludes 0).",
        "",
    ]
    lines += ["## Health", "", *[f"- {h['line']}" for h in result["health"].values()], ""]
    for bench in result["benchmarks"]:
        lines += [
            f"## {bench}",
            "",
            f"| experiment | problems × samples | pass@{k} [95% CI] | Δ vs {base} [95% CI] | p | verdict |",
            "| --- | ---: | --- | --- | ---: | --- |",
        ]
        for name, per_bench in result["experiments"].items():
            e = per_bench[bench]
            lines.append(
                f"| {name} | {e['n_problems']} × {e['samples_per_problem']} | "
                f"{result_cells(e, k)} |"
            )
        widths = [
            Interval(**per_bench[bench][f"pass@{k}"]).half_width
            for per_bench in result["experiments"].values()
        ]
        lines += [
            "",
            f"Interval half-widths: ±{min(widths):.3f} to ±{max(widths):.3f} (pass@{k} units).",
            "",
        ]
    lines += _facts_table("Training", result["training"])
    for bench in sorted({b for per in result.get("decoding", {}).values() for b in per}):
        facts = {name: per.get(bench, {}) for name, per in result["decoding"].items()}
        lines += _facts_table(f"Speculative decoding: {bench}", facts)
    return "\n".join(lines)


def _facts_table(title: str, facts: dict[str, dict[str, float]]) -> list[str]:
    keys = sorted({key for per in facts.values() for key in per})
    if not keys:
        return []
    lines = [f"## {title}", "", "| experiment | " + " | ".join(keys) + " |"]
    lines.append("| --- |" + " ---: |" * len(keys))
    for name, per in facts.items():
        cells = [f"{per[key]:.3g}" if key in per else "–" for key in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def write(result: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "comparison.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "comparison.md", markdown(result))
    k = result["k"]
    series = {
        bench: {
            name: per_bench[bench][f"pass@{k}"] for name, per_bench in result["experiments"].items()
        }
        for bench in result["benchmarks"]
    }
    atomic_write_text(out / "comparison.svg", interval_chart_svg(series, f"pass@{k} with 95% CI"))
    return [out / "comparison.md", out / "comparison.json", out / "comparison.svg"]


def parse_experiments(items: list[str]) -> dict[str, list[Path]]:
    experiments = {}
    for item in items:
        name, sep, dirs = item.partition("=")
        if not sep or not name or not dirs:
            raise InputError(f"{item!r} is not NAME=EVAL_DIR[,EVAL_DIR...]")
        paths = [Path(d) for d in dirs.split(",") if d]
        missing = [str(p) for p in paths if not p.is_dir()]
        if missing:
            raise InputError(f"{name}: eval dir not found: {', '.join(missing)}")
        experiments[name] = paths
    return experiments


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "experiments", nargs="+", help="NAME=EVAL_DIR[,EVAL_DIR...] (several dirs are pooled)"
    )
    parser.add_argument("--baseline", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--k", type=positive_ints, default=[1], help="the pass@k compared (one value)"
    )
    parser.add_argument("--resamples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=0.05)
    a = parser.parse_args(argv)
    result = compare(
        parse_experiments(a.experiments), a.baseline, a.k[0], a.resamples, a.seed, a.alpha
    )
    for path in write(result, a.out):
        print(f"[compare] {path}")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

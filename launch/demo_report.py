"""reports/demo-summary.md: each arm's health first, then pass@1 with intervals and paired tests
(from `evaluation.compare`), what explains a difference (how samples end, timeouts, valid
Python, which tokens an arm emphasised), the base and how the regime maps to the 7B recipe, the
runs side by side, the plan against the stage times, charts and a token-weight heatmap."""

from __future__ import annotations

import json
import shutil
import statistics
from dataclasses import asdict
from html import escape
from pathlib import Path

from evaluation.compare import Interval, decoding_facts, result_cells
from launch.demo_plan import Calibration, Plan
from runtime.history import read_history
from runtime.integrity import atomic_write_text
from runtime.plots import line_chart_svg
from runtime.precision import cpu_model_name
from runtime.progress import duration

FLOOR_NOTE = (
    "micro models trained on a few hundred synthetic solutions do not solve HumanEval; this "
    "row shows the harness end to end, not a difference between the algorithms"
)


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _latest(folder: Path, pattern: str) -> Path | None:
    found = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def _history(run: Path) -> list[dict]:
    return read_history(run, "step")


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def behaviour_facts(runs: list[Path]) -> dict[str, float | None]:
    """What explains a difference, averaged over seeds: how the test samples ended, and the
    mean token weight of each kind of target over the whole fine-tuning."""
    summaries = [_read(run / "eval" / "summary.json").get("tasks", {}) for run in runs]
    stopped = _mean([s.get("stopped_share") for s in summaries])
    facts = {
        "stopped by themselves (EOS / stop)": stopped,
        "ran to max_new_tokens": 1 - stopped if stopped is not None else None,
        "timed out": _mean([s.get("timeout_share") for s in summaries]),
        "valid Python": _mean([s.get("parse_share") for s in summaries]),
    }
    histories = [_history(run) for run in runs]
    for kind, label in WEIGHT_KINDS.items():
        key = f"weight_mean_{kind}"
        facts[label] = _mean(
            [statistics.fmean(h[key] for h in steps if key in h) for steps in histories
             if any(key in h for h in steps)]
        )  # fmt: skip
    return facts


WEIGHT_KINDS = {
    "eos": "mean weight: EOS (ends the program)",
    "first": "mean weight: first response token",
    "layout": "mean weight: newline / indentation",
    "other": "mean weight: every other token",
}


def run_facts(runs: list[Path]) -> dict[str, float | None]:
    """Throughput and decoding facts of one algorithm, averaged over its seeds' runs."""
    histories = [_history(run) for run in runs]
    summaries = [_read(run / "eval" / "summary.json").get("tasks", {}) for run in runs]
    speculative = decoding_facts([run / "eval-speculative" for run in runs]).get("tasks", {})
    facts = {
        "final weighted loss": _mean([h[-1]["loss"] for h in histories if h]),
        "head-0 CE (train, last step)": _mean([h[-1]["ce_head0"] for h in histories if h]),
        "train tokens/s": _mean(
            [statistics.fmean(s["tokens_per_s"] for s in h) for h in histories if h]
        ),
        "decode tokens/s (T=0.2, batch = samples)": _mean(
            [s.get("tokens_per_s") for s in summaries]
        ),
    }
    return facts | dict(sorted(speculative.items()))


FACT_LABELS = {
    **{f"val_ce_head{k}": f"validation CE, head {k}" for k in range(8)},
    "weight_std": "token-weight std",
    "weight_above_one_fraction": "weights above 1 (fraction)",
    "weight_at_max_fraction": "weights at the cap (fraction)",
    "weight_selected_fraction": "tokens trained on (fraction)",
    "score_std": "score std (before normalising)",
    "stage1_explained_variance": "critic: explained variance after stage 1",
    "spec_tokens_per_forward": "speculative: tokens per forward",
    **{f"spec_accept_pos{k}": f"speculative: head {k} draft accepted" for k in range(1, 8)},
    "spec_tokens_per_s": "speculative decoding tokens/s",
    "plain_tokens_per_s": "plain decoding tokens/s (same prompts)",
    "spec_speedup": "speculative speed-up over plain",
}


def heatmap_html(runs: dict[str, Path], n_examples: int = 2, max_tokens: int = 160) -> str:
    """The same training rows under each algorithm: background intensity = token weight."""
    parts = [
        "<!doctype html><meta charset='utf-8'><title>WMTP token weights</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}pre{white-space:pre-wrap;"
        "font-family:monospace;line-height:1.7}span{border-radius:3px;padding:1px 0}</style>",
        "<h1>Token weights of the first training step (head 0)</h1>",
        "<p>Each algorithm saw the same rows (same seed and data order). Red = weight above 1, "
        "blue = below 1; hover for the value. Prompt tokens carry no loss and are not shown.</p>",
    ]
    weights = {
        algo: _read(_latest(run / "reports", "*_token_weights.json") or Path("/nonexistent"))
        for algo, run in runs.items()
    }
    for i in range(n_examples):
        for algo, data in weights.items():
            examples = data.get("examples", [])
            if i >= len(examples):
                continue
            ex = examples[i]
            parts.append(
                f"<h3>example {i + 1} · {escape(algo)} · {escape(', '.join(ex['sample_ids'][:2]))}</h3><pre>"
            )
            for piece, w in list(zip(ex["pieces"], ex["weights"], strict=True))[:max_tokens]:
                text = escape(piece.replace("▁", " ")).replace("\n", "↵\n") or "·"
                alpha = min(abs(w - 1.0) / 2.0, 0.85)
                color = f"rgba(220,40,40,{alpha:.2f})" if w >= 1 else f"rgba(40,90,220,{alpha:.2f})"
                parts.append(f"<span title='{w:.3f}' style='background:{color}'>{text}</span>")
            parts.append("</pre>")
    return "".join(parts)


def _number(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def result_lines(comparison: dict, bench: str, plan: Plan) -> list[str]:
    """The benchmark's table: pass@1 [CI] per algorithm, Δ vs baseline [CI], p, verdict."""
    base = comparison["baseline"]
    rows = comparison["experiments"]
    first = next(iter(rows.values()))[bench]
    lines = [
        f"{first['n_problems']} problems × {first['samples_per_problem']} samples "
        f"({plan.seeds} seed(s) pooled), T={plan.shape.temperature}, top-p {plan.shape.top_p}.",
        "",
        f"| algorithm | pass@1 [95% CI] | Δ vs {base} [95% CI] | p (paired) | verdict |",
        "| --- | --- | --- | ---: | --- |",
    ]
    lines += [
        f"| {algo} | {result_cells(per_bench[bench], 1)} |" for algo, per_bench in rows.items()
    ]
    widths = [Interval(**per_bench[bench]["pass@1"]).half_width for per_bench in rows.values()]
    lines += ["", f"Interval half-width: ±{max(widths):.3f} (pass@1)."]
    return lines


def facts_table(
    algos: list[str], columns: dict[str, dict], keys: list[str] | None = None
) -> list[str]:
    """`keys` (default: the run facts, then every labelled fact an algorithm has, in
    FACT_LABELS' order) as rows, one column per algorithm."""
    present = {k for facts in columns.values() for k in facts}
    if keys is None:
        keys = [k for k in run_facts([]) if k in present] + [k for k in FACT_LABELS if k in present]
    lines = ["| | " + " | ".join(algos) + " |", "| --- |" + " ---: |" * len(algos)]
    for key in keys:
        cells = [_number(columns[a].get(key)) for a in algos]
        lines.append(f"| {FACT_LABELS.get(key, key)} | " + " | ".join(cells) + " |")
    return lines


def write_charts(reports: Path, runs: dict[str, Path]) -> None:
    histories = {algo: _history(run) for algo, run in runs.items()}
    curves = {a: [(h["step"], h["ce_head0"]) for h in steps] for a, steps in histories.items()}
    atomic_write_text(
        reports / "demo-loss.svg",
        line_chart_svg(curves, "training CE of head 0 (unweighted)", "cross-entropy (nats)"),
    )
    weighted = {a: [(h["step"], h["loss"]) for h in steps] for a, steps in histories.items()}
    atomic_write_text(
        reports / "demo-weighted-loss.svg",
        line_chart_svg(weighted, "training loss (weighted, 4 heads)", "weighted loss"),
    )
    for algo, run in runs.items():
        found = _latest(run / "reports", "*_weights.svg")
        if found:
            shutil.copyfile(found, reports / f"demo-weights-{algo}.svg")
    atomic_write_text(reports / "demo-token-weights.html", heatmap_html(runs))


def base_lines(base: dict, plan: Plan, pretrain_lr: float, finetune_lr: float) -> list[str]:
    ce = ", ".join(f"head {k} {c:.3f}" for k, c in enumerate(base["held_out_ce_per_head"]))
    dropped = base.get("corpus_dropped_for_leakage") or []
    return [
        "## The pretrained base",
        "",
        f"micro-mtp ({plan.size}) pretrained with the MTP loss on {base['corpus_files']} Python "
        f"files of the standard library (corpus {base['corpus_sha256'][:16]}; "
        f"{len(dropped)} left out for containing an evaluation text): "
        f"{base['tokens_seen']:,} tokens in {base['steps']} steps "
        f"({duration(base['train_seconds'])} of training"
        f"{', reused from the cache' if plan.base_cached else ''}). Held-out CE: {ce}. micro-ref "
        "is its next-token part, fine-tuned on the correct training solutions (the Rho-1 "
        "reference step).",
        "",
        plan.regime(pretrain_lr, finetune_lr),
        "",
    ]


def write_summary(
    out: Path,
    algos: list[str],
    comparison: dict,
    plan: Plan,
    calibration: Calibration,
    base: dict,
    finetune_lr: float,
    stage_times: dict[str, float],
    seconds: float,
) -> Path:
    reports = out / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    runs = {algo: sorted((out / "runs" / algo).glob("seed*")) for algo in algos}
    write_charts(reports, {algo: seeds[0] for algo, seeds in runs.items()})
    columns = {algo: comparison["training"].get(algo, {}) | run_facts(runs[algo]) for algo in algos}
    behaviour = {algo: behaviour_facts(runs[algo]) for algo in algos}
    health = comparison["health"]
    lines = [
        f"# WMTP demo: {' vs '.join(algos)}",
        "",
        f"Micro models ({plan.size}) on one CPU — {cpu_model_name()}, compute dtype "
        f"{calibration.dtype} ({calibration.dtype_reason}) — nothing downloaded; "
        f"{seconds / 60:.1f} minutes end to end (budget {plan.budget_s / 60:.0f}).",
        "",
        "## Did every arm train?",
        "",
        *[f"- {health[a]['line']}" for a in algos],
        "",
        "An arm that did not train makes its verdict *inconclusive*, whatever its p-value.",
        "",
        "## Synthetic tasks (held-out test split)",
        "",
        *result_lines(comparison, "tasks", plan),
        "",
        "A difference is called significant when the paired sign-flip permutation test over "
        "problems gives p < 0.05, the bootstrap interval excludes 0 and both arms trained; "
        "otherwise the runs cannot be told apart at this size. Full table: "
        "[comparison.md](comparison.md), [comparison.json](comparison.json), chart: "
        "![pass@1](comparison.svg)",
        "",
        "## What explains a difference",
        "",
        "How each arm's test samples ended and which kinds of token its weights emphasised "
        "during fine-tuning (mean weight over every step; 1 = the baseline's).",
        "",
        *facts_table(algos, behaviour, keys=list(next(iter(behaviour.values())))),
        "",
        *base_lines(base, plan, base["lr"], finetune_lr),
    ]
    if "humaneval" in comparison["benchmarks"]:
        lines += ["## HumanEval (floor)", "", *result_lines(comparison, "humaneval", plan)]
        lines += ["", f"Note: {FLOOR_NOTE}.", ""]
    lines += [
        "## Training and decoding",
        "",
        "Validation CE per head and weight statistics at the last evaluation; speculative "
        f"decoding (lossless sampling, T={plan.shape.temperature}) on "
        f"{plan.speculative_problems} test tasks: how often each head's draft was accepted, "
        "tokens per forward and its speed against plain decoding of the same prompts; averaged "
        "over seeds.",
        "",
        *facts_table(algos, columns),
        "",
        "![head-0 CE](demo-loss.svg) ![weighted loss](demo-weighted-loss.svg)",
        "",
        "## Token weights",
        "",
        *[
            f"![{a}](demo-weights-{a}.svg)"
            for a in algos
            if (reports / f"demo-weights-{a}.svg").exists()
        ],
        "",
        "[demo-token-weights.html](demo-token-weights.html): the first training rows under each "
        "algorithm, coloured by weight.",
        "",
        "## Plan and stage times",
        "",
        plan.describe() + ".",
        "",
        *[f"- {w}" for w in plan.notes],
        "",
        "| stage | planned | took |",
        "| --- | ---: | ---: |",
        *[
            f"| {stage} | {duration(plan.predicted_s[stage]) if stage in plan.predicted_s else '–'} "
            f"| {duration(took)} |"
            for stage, took in stage_times.items()
        ],
        "",
        "Per-run reports: `runs/<algo>/seed<N>/reports/<run_id>.md`; MLflow: "
        f"`mlflow ui --backend-store-uri sqlite:///{out / 'mlflow.db'}`.",
        "",
    ]
    path = reports / "demo-summary.md"
    atomic_write_text(path, "\n".join(lines))
    record = {"plan": plan.as_dict(), "calibration": asdict(calibration), "stages": stage_times,
              "base": base}  # fmt: skip
    atomic_write_text(reports / "demo-plan.json", json.dumps(record, indent=2, default=str) + "\n")
    return path

"""reports/demo-summary.md: the three runs side by side, with charts and a token-weight heatmap."""

from __future__ import annotations

import json
import shutil
from html import escape
from pathlib import Path

from runtime.integrity import atomic_write_text
from runtime.plots import line_chart_svg


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _latest(folder: Path, pattern: str) -> Path | None:
    found = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def run_facts(run: Path) -> dict:
    reports = run / "reports"
    history_file = _latest(reports, "*_history.json")
    history = json.loads(history_file.read_text()) if history_file else []
    steps = [h for h in history if h.get("stage") == "step"]
    last = steps[-1] if steps else {}
    tasks = _read(run / "eval" / "summary.json").get("tasks", {})
    humaneval = _read(run / "eval-humaneval" / "summary.json").get("humaneval", {})
    spec = _read(run / "eval-speculative" / "summary.json").get("tasks", {})
    greedy = _read(run / "eval-greedy" / "summary.json").get("tasks", {})
    return {
        "history": steps,
        "run_id": history_file.name.removesuffix("_history.json") if history_file else "?",
        "final_loss": last.get("loss"),
        "ce_head0": last.get("ce_head0"),
        "val_loss": next((h["val_loss"] for h in reversed(steps) if "val_loss" in h), None),
        "train_tokens_per_s": sum(h["tokens_per_s"] for h in steps) / len(steps) if steps else None,
        "weight_std": last.get("weight_std"),
        "clipped": last.get("weight_clipped_fraction"),
        "tasks_pass@1": tasks.get("pass@k", {}).get("pass@1"),
        "humaneval_pass@1": humaneval.get("pass@k", {}).get("pass@1"),
        "decode_tokens_per_s": tasks.get("tokens_per_s"),
        "greedy_tokens_per_s": greedy.get("tokens_per_s"),
        "spec_tokens_per_s": spec.get("tokens_per_s"),
        "spec_identical": _same_completions(run / "eval-greedy", run / "eval-speculative"),
        "spec_accepted": spec.get("spec_tokens_per_forward"),
        "spec_pass@1": spec.get("pass@k", {}).get("pass@1"),
        "weights_svg": _latest(reports, "*_weights.svg"),
        "token_weights": _read(_latest(reports, "*_token_weights.json") or Path("/nonexistent")),
    }


def _same_completions(a: Path, b: Path) -> str:
    """'yes' if greedy and self-speculative decoding produced the same text for every task."""
    files = [d / "tasks_samples.jsonl" for d in (a, b)]
    if not all(f.is_file() for f in files):
        return "–"
    texts = [[json.loads(line)["completion"] for line in f.read_text().splitlines()] for f in files]
    return "yes" if texts[0] == texts[1] else "NO"


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def heatmap_html(facts: dict[str, dict], n_examples: int = 2, max_tokens: int = 160) -> str:
    """The same training examples under each algorithm: background intensity = token weight."""
    parts = [
        "<!doctype html><meta charset='utf-8'><title>WMTP token weights</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}pre{white-space:pre-wrap;"
        "font-family:monospace;line-height:1.7}span{border-radius:3px;padding:1px 0}</style>",
        "<h1>Token weights of the first training step (head 0)</h1>",
        "<p>Each algorithm saw the same rows (same seed and data order). Red = weight above 1, "
        "blue = below 1; hover for the value. Prompt tokens carry no loss and are not shown.</p>",
    ]
    for i in range(n_examples):
        for algo, f in facts.items():
            examples = f["token_weights"].get("examples", [])
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


def write_summary(out: Path, algos: list[str], settings: dict, seconds: float) -> Path:
    reports = out / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    facts = {algo: run_facts(out / "runs" / algo) for algo in algos}
    curves = {a: [(h["step"], h["ce_head0"]) for h in f["history"]] for a, f in facts.items()}
    atomic_write_text(
        reports / "demo-loss.svg", line_chart_svg(curves, "training CE of head 0 (unweighted)")
    )
    weighted = {a: [(h["step"], h["loss"]) for h in f["history"]] for a, f in facts.items()}
    atomic_write_text(
        reports / "demo-weighted-loss.svg",
        line_chart_svg(weighted, "training loss (weighted, 4 heads)"),
    )
    for algo, f in facts.items():
        if f["weights_svg"]:
            shutil.copyfile(f["weights_svg"], reports / f"demo-weights-{algo}.svg")
    atomic_write_text(reports / "demo-token-weights.html", heatmap_html(facts))
    rows = [
        ("run id (MLflow)", "run_id", 0),
        ("final weighted loss", "final_loss", 3),
        ("head-0 CE", "ce_head0", 3),
        ("validation loss (head 0)", "val_loss", 3),
        ("task pass@1 (T=0.2)", "tasks_pass@1", 3),
        ("HumanEval pass@1 (T=0.2)", "humaneval_pass@1", 3),
        ("train tokens/s", "train_tokens_per_s", 0),
        ("weight std", "weight_std", 3),
        ("clipped fraction", "clipped", 3),
        ("decode tokens/s (sampling, 5 per batch)", "decode_tokens_per_s", 1),
        ("decode tokens/s (greedy, batch 1)", "greedy_tokens_per_s", 1),
        ("decode tokens/s (self-speculative greedy)", "spec_tokens_per_s", 1),
        ("accepted tokens per forward", "spec_accepted", 2),
        ("task pass@1 (speculative greedy)", "spec_pass@1", 3),
        ("speculative output == greedy output", "spec_identical", 0),
    ]
    lines = [
        "# WMTP demo: baseline vs rho1-wmtp vs critic-wmtp",
        "",
        f"Micro models on one CPU, nothing downloaded; {seconds / 60:.1f} minutes end to end.",
        "",
        "| metric | " + " | ".join(algos) + " |",
        "| --- |" + " ---: |" * len(algos),
    ]
    for label, key, digits in rows:
        values = [
            _fmt(
                round(f[key], digits) if isinstance(f[key], float) and digits == 0 else f[key],
                digits or 0,
            )
            if not isinstance(f[key], str)
            else f[key]
            for f in facts.values()
        ]
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    lines += [
        "",
        "![head-0 CE](demo-loss.svg) ![weighted loss](demo-weighted-loss.svg)",
        "",
        "## Token-weight histograms (last step)",
        "",
    ]
    lines += [
        f"![{a}](demo-weights-{a}.svg)"
        for a in algos
        if (reports / f"demo-weights-{a}.svg").exists()
    ]
    lines += [
        "",
        "## Which tokens each algorithm emphasised",
        "",
        "[demo-token-weights.html](demo-token-weights.html): the first training rows under each algorithm.",
        "",
        "## Settings",
        "",
        "```json",
        json.dumps(settings, indent=2),
        "```",
        "",
        "Per-run reports: `runs/<algo>/reports/<run_id>.md`; MLflow: `mlflow ui --backend-store-uri "
        f"sqlite:///{out / 'mlflow.db'}`.",
        "",
    ]
    path = reports / "demo-summary.md"
    atomic_write_text(path, "\n".join(lines))
    return path

"""What a run tells: step log lines, MLflow metrics, and reports/{run_id}.md (its numbers, its
config, its token weights and — on failure — what to do next), with the files beside it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from html import escape
from pathlib import Path

import torch
import yaml

from data.loader import Batch
from model.tokenizer import Tokenizer
from runtime.history import write_history
from runtime.integrity import atomic_write_text
from runtime.plots import histogram_svg
from runtime.schema import to_dict
from runtime.tracking import Tracker, scrub_tree
from training.recipe import Recipe
from training.state import TrainState


def weighted_tokens_markdown(pieces: list[str], weights: list[float]) -> str:
    """Target tokens with their weights, heaviest shown in bold."""
    cells = []
    for piece, w in zip(pieces, weights, strict=True):
        text = escape(piece.replace("▁", "·").replace("\n", "⏎")) or "∅"
        cells.append(f"**`{text}`**{w:.2f}" if w >= 1.5 else f"`{text}`{w:.2f}")
    return " ".join(cells)


def write_run_report(
    path: str | Path,
    run_id: str,
    title: str,
    summary: dict[str, float | int | str],
    recipe: dict,
    sample_tokens: str = "",
    histogram: str | None = None,
    failure: tuple[str, str] | None = None,
    warnings: list[str] | None = None,
) -> Path:
    """Writes the markdown report atomically; `failure` = (what went wrong, next action)."""
    lines = [f"# {title}", "", f"Run `{run_id}`", ""]
    if failure:
        lines += ["## What went wrong", "", failure[0], "", "## Next action", "", failure[1], ""]
    if warnings:
        lines += ["## Warnings", "", *[f"- {w}" for w in warnings], ""]
    lines += ["## Metrics", "", "| metric | value |", "| --- | --- |"]
    for k, v in summary.items():
        lines.append(f"| {k} | {v:.5g} |" if isinstance(v, float) else f"| {k} | {v} |")
    if histogram:
        lines += ["", "## Token weights", "", f"![weight histogram]({histogram})"]
    if sample_tokens:
        lines += [
            "",
            "## Sample weighted tokens (head 0; weight after each target token)",
            "",
            sample_tokens,
        ]
    lines += [
        "",
        "## Recipe",
        "",
        "```yaml",
        yaml.safe_dump(recipe, sort_keys=False).rstrip(),
        "```",
        "",
    ]
    path = Path(path)
    atomic_write_text(path, "\n".join(lines))
    return path


@dataclass
class WeightSamples:
    """What the report shows of the token weights: the first and the latest step's first
    micro-batch, and the latest step's histogram."""

    first: tuple[Batch, torch.Tensor] | None = None
    last: tuple[Batch, torch.Tensor] | None = None
    hist_counts: list[int] | None = None

    def update(self, first: tuple[Batch, torch.Tensor] | None, hist_counts: list[int]) -> None:
        """A finished step: its first micro-batch with its weights, its weight histogram."""
        self.hist_counts = hist_counts
        self.last = first
        if self.first is None:
            self.first = first


def token_weights_json(
    batch: Batch, weights: torch.Tensor, tokenizer: Tokenizer, algo: str, rows: int = 2
) -> dict:
    """Head-0 weights of a step's first rows, per target token (for heatmaps)."""
    examples = []
    for b in range(min(rows, batch.tokens.shape[0])):
        pos = batch.valid[b, :, 0].cpu().nonzero().flatten()[:400]
        examples.append(
            {
                "sample_ids": batch.sample_ids[b],
                "pieces": [tokenizer.id_to_piece(int(batch.labels[b, p, 0])) for p in pos],
                "weights": [round(float(weights[b, p, 0]), 4) for p in pos],
            }
        )
    return {"algo": algo, "step": 1, "examples": examples}


def sample_tokens_markdown(
    batch: Batch, weights: torch.Tensor, tokenizer: Tokenizer, n: int
) -> str:
    pos = batch.valid[0, :, 0].cpu().nonzero().flatten()[:n]
    pieces = [tokenizer.id_to_piece(int(batch.labels[0, p, 0])) for p in pos]
    return weighted_tokens_markdown(pieces, [float(weights[0, p, 0]) for p in pos])


def run_summary(
    state: TrainState, n_heads: int, export: Path | None, registered: str | None = None
) -> dict:
    """The report's metrics table: last logged values, first loss, steps and skips."""
    last = state.history[-1] if state.history else {}
    summary = {"steps": state.step, "skipped_steps": state.guard.skipped_steps}
    keys = (
        "loss",
        "val_loss",
        "tokens_per_s",
        "mfu",
        "weight_mean",
        "weight_std",
        "weight_clipped_fraction",
        "weight_above_one_fraction",
        "weight_selected_fraction",
        "score_mean",
        "score_std",
        *[f"ce_head{i}" for i in range(n_heads)],
    )
    summary.update({k: float(last[k]) for k in keys if k in last})
    losses = [h["loss"] for h in state.history if "loss" in h]
    if losses:
        summary["first_loss"] = float(losses[0])
    if state.stage1_explained_variance is not None:
        summary["stage1_explained_variance"] = state.stage1_explained_variance
    if state.best_step is not None:
        summary["best_step"] = state.best_step
    if state.stop_reason:
        summary["stopped"] = state.stop_reason
    if export:
        summary["export"] = str(export)
    if registered:
        summary["registered"] = registered
    return summary


def write_reports(
    out: Path,
    recipe: Recipe,
    state: TrainState,
    n_heads: int,
    samples: WeightSamples,
    tokenizer: Tokenizer,
    tracker: Tracker,
    export: Path | None,
    failure: tuple[str, str] | None,
    warnings: list[str] | None = None,
    registered: str | None = None,
) -> Path:
    """reports/{run_id}.md, _history.json, _weights.svg, _token_weights.json, _recipe.yaml;
    each logged to MLflow. `failure` = (what went wrong, next action). Main rank only."""
    reports = out / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    run_id, algo = str(state.run_id), recipe.weighting.algo
    hist_name = f"{run_id}_weights.svg" if samples.hist_counts else None
    if hist_name:
        svg = histogram_svg(
            samples.hist_counts, recipe.weighting.max_weight, f"token weights ({algo})"
        )
        (reports / hist_name).write_text(svg)
    history = write_history(reports, run_id, state.history)
    if samples.first is not None:
        data = token_weights_json(*samples.first, tokenizer, algo)
        (reports / f"{run_id}_token_weights.json").write_text(json.dumps(data))
    sample = (
        sample_tokens_markdown(*samples.last, tokenizer, recipe.tracking.sample_tokens)
        if samples.last
        else ""
    )
    report = write_run_report(
        reports / f"{run_id}.md",
        run_id,
        f"{recipe.run.name}: {algo}",
        run_summary(state, n_heads, export, registered),
        scrub_tree(to_dict(recipe)),
        sample,
        hist_name,
        failure,
        warnings,
    )
    for path in (report, history, *([reports / hist_name] if hist_name else [])):
        tracker.log_artifact(path, "reports")
    snapshot = reports / f"{run_id}_recipe.yaml"
    snapshot.write_text(yaml.safe_dump(scrub_tree(to_dict(recipe)), sort_keys=False))
    tracker.log_artifact(snapshot, "recipe")
    return report


@dataclass
class RunReporter:
    """Writes the run's report and ends its MLflow run: on success, or on a failure of any rank
    (the failure board calls it on rank 0)."""

    out: Path
    recipe: Recipe
    state: TrainState
    n_heads: int
    samples: WeightSamples
    tokenizer: Tokenizer
    tracker: Tracker
    warnings: list[str]

    def __call__(
        self, failure=None, export: Path | None = None, registered: str | None = None
    ) -> Path:
        failed = (failure.what, failure.next_action) if failure else None
        path = write_reports(
            self.out,
            self.recipe,
            self.state,
            self.n_heads,
            self.samples,
            self.tokenizer,
            self.tracker,
            export,
            failed,
            self.warnings,
            registered,
        )
        self.tracker.end(
            "FAILED" if failure else "FINISHED", failure.what.splitlines()[0] if failure else None
        )
        if failure:
            print(
                f"error: {failure.what}\nnext action: {failure.next_action}\nreport: {path}",
                flush=True,
            )
        return path

"""reports/{run_id}.md: what a run did, its numbers, its config, and — on failure — what to do next."""

from __future__ import annotations

from html import escape
from pathlib import Path

import yaml

from model.integrity import atomic_write_text


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
) -> Path:
    """Writes the markdown report atomically; `failure` = (what went wrong, next action)."""
    lines = [f"# {title}", "", f"Run `{run_id}`", ""]
    if failure:
        lines += ["## What went wrong", "", failure[0], "", "## Next action", "", failure[1], ""]
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

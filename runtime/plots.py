"""Charts for reports, drawn with matplotlib (installed with MLflow) and returned as SVG text:
every axis labelled, losses on a log scale, nothing cut at the edges (tight bounding box).
matplotlib is imported on first use, with the non-interactive Agg backend."""

from __future__ import annotations

import io
import os
import tempfile

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def _pyplot():
    os.environ.setdefault("MPLCONFIGDIR", os.path.join(tempfile.gettempdir(), "wmtp-matplotlib"))
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "font.size": 9, "axes.titlesize": 10})
    return plt


def _svg(fig) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    fig.clear()
    _pyplot().close(fig)
    return buffer.getvalue()


def histogram_svg(counts: list[int], upper: float, title: str, xlabel: str = "token weight") -> str:
    """Bars of `counts` over equal bins of [0, upper]."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 2.8))
    width = upper / max(len(counts), 1)
    ax.bar([i * width for i in range(len(counts))], counts, width=width, align="edge",
           color=PALETTE[0], edgecolor="white")  # fmt: skip
    ax.set(title=title, xlabel=xlabel, ylabel="tokens (last step)", xlim=(0, upper))
    return _svg(fig)


def line_chart_svg(
    series: dict[str, list[tuple[float, float]]],
    title: str,
    ylabel: str,
    xlabel: str = "optimizer step",
    log_y: bool = True,
) -> str:
    """One line per series of (x, y) points; a log y axis for losses (positive values)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.2))
    for i, (name, points) in enumerate(series.items()):
        points = [(x, y) for x, y in points if not log_y or y > 0]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, label=name, color=PALETTE[i % len(PALETTE)], linewidth=1.2)
    if log_y:
        ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(True, which="both", alpha=0.25)
    if series:
        ax.legend(frameon=False)
    return _svg(fig)


def interval_chart_svg(
    groups: dict[str, dict[str, dict]], title: str, ylabel: str = "pass@1"
) -> str:
    """Per group (benchmark), each experiment's mean with its [ci_low, ci_high] as an error bar."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(3.2 * max(len(groups), 1) + 0.8, 3.2),
                             squeeze=False)  # fmt: skip
    for ax, (group, experiments) in zip(axes[0], groups.items(), strict=False):
        names = list(experiments)
        means = [experiments[n]["mean"] for n in names]
        low = [m - experiments[n]["ci_low"] for n, m in zip(names, means, strict=True)]
        high = [experiments[n]["ci_high"] - m for n, m in zip(names, means, strict=True)]
        colors = [PALETTE[i % len(PALETTE)] for i in range(len(names))]
        ax.bar(range(len(names)), means, color=colors, alpha=0.35)
        ax.errorbar(range(len(names)), means, yerr=[low, high], fmt="o", color="black",
                    capsize=4)  # fmt: skip
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
        ax.set(
            title=group,
            ylabel=ylabel,
            ylim=(0, max(1.0, *[m + h for m, h in zip(means, high, strict=True)])),
        )
    fig.suptitle(title)
    return _svg(fig)

"""Tiny dependency-free SVG charts for reports (histograms, line charts)."""

from __future__ import annotations

from html import escape

_W, _H, _PAD = 480, 240, 36
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def _frame(title: str, body: list[str], legend: list[tuple[str, str]] | None = None) -> str:
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="{_W / 2}" y="16" text-anchor="middle" font-family="sans-serif" font-size="13">{escape(title)}</text>',
        f'<line x1="{_PAD}" y1="{_H - _PAD}" x2="{_W - 8}" y2="{_H - _PAD}" stroke="black"/>',
        f'<line x1="{_PAD}" y1="24" x2="{_PAD}" y2="{_H - _PAD}" stroke="black"/>',
        *body,
    ]
    for i, (label, color) in enumerate(legend or []):
        y = 30 + 14 * i
        parts.append(f'<rect x="{_W - 150}" y="{y - 9}" width="10" height="10" fill="{color}"/>')
        parts.append(
            f'<text x="{_W - 136}" y="{y}" font-family="sans-serif" font-size="11">{escape(label)}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts)


def _axis_labels(x0: float, x1: float, y0: float, y1: float) -> list[str]:
    fmt = "{:.3g}".format
    return [
        f'<text x="{_PAD}" y="{_H - _PAD + 14}" font-family="sans-serif" font-size="10">{fmt(x0)}</text>',
        f'<text x="{_W - 8}" y="{_H - _PAD + 14}" text-anchor="end" font-family="sans-serif" font-size="10">{fmt(x1)}</text>',
        f'<text x="{_PAD - 4}" y="{_H - _PAD}" text-anchor="end" font-family="sans-serif" font-size="10">{fmt(y0)}</text>',
        f'<text x="{_PAD - 4}" y="30" text-anchor="end" font-family="sans-serif" font-size="10">{fmt(y1)}</text>',
    ]


def histogram_svg(counts: list[int], upper: float, title: str) -> str:
    """Bars for equal-width bins over [0, upper]."""
    top = max(max(counts, default=0), 1)
    width = (_W - _PAD - 8) / max(len(counts), 1)
    bars = []
    for i, c in enumerate(counts):
        h = (_H - _PAD - 24) * c / top
        bars.append(
            f'<rect x="{_PAD + i * width:.1f}" y="{_H - _PAD - h:.1f}" width="{width * 0.9:.1f}" height="{h:.1f}" fill="{PALETTE[0]}"/>'
        )
    return _frame(title, bars + _axis_labels(0, upper, 0, top))


def line_chart_svg(series: dict[str, list[tuple[float, float]]], title: str) -> str:
    """One polyline per named series of (x, y) points, common axes."""
    points = [p for pts in series.values() for p in pts]
    if not points:
        return _frame(title, [])
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx = (_W - _PAD - 8) / ((x1 - x0) or 1)
    sy = (_H - _PAD - 24) / ((y1 - y0) or 1)
    body, legend = [], []
    for i, (name, pts) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        coords = " ".join(
            f"{_PAD + (x - x0) * sx:.1f},{_H - _PAD - (y - y0) * sy:.1f}" for x, y in pts
        )
        body.append(
            f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{coords}"/>'
        )
        legend.append((name, color))
    return _frame(title, body + _axis_labels(x0, x1, y0, y1), legend)


def interval_chart_svg(groups: dict[str, dict[str, dict]], title: str) -> str:
    """Grouped bars with 95% intervals: groups (benchmarks) → series (experiments) →
    {"mean", "ci_low", "ci_high"}, values in [0, 1]."""
    names = list(dict.fromkeys(n for series in groups.values() for n in series))
    colors = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}
    top = max(
        [
            1e-9,
            *(
                v["ci_high"]
                for s in groups.values()
                for v in s.values()
                if v["ci_high"] == v["ci_high"]
            ),
        ]
    )
    slot = (_W - _PAD - 8) / max(len(groups), 1)
    bar = slot * 0.8 / max(len(names), 1)
    scale = (_H - _PAD - 24) / top
    body = []
    for g, (group, series) in enumerate(groups.items()):
        x0 = _PAD + g * slot + slot * 0.1
        body.append(
            f'<text x="{x0 + slot * 0.4:.1f}" y="{_H - _PAD + 14}" text-anchor="middle" '
            f'font-family="sans-serif" font-size="10">{escape(group)}</text>'
        )
        for i, name in enumerate(names):
            v = series.get(name)
            if v is None or v["mean"] != v["mean"]:
                continue
            x = x0 + i * bar
            h = v["mean"] * scale
            body.append(
                f'<rect x="{x:.1f}" y="{_H - _PAD - h:.1f}" width="{bar * 0.9:.1f}" height="{h:.1f}" fill="{colors[name]}"/>'
            )
            cx, lo, hi = (
                x + bar * 0.45,
                _H - _PAD - v["ci_low"] * scale,
                _H - _PAD - v["ci_high"] * scale,
            )
            body.append(
                f'<line x1="{cx:.1f}" y1="{lo:.1f}" x2="{cx:.1f}" y2="{hi:.1f}" stroke="black"/>'
            )
            for y in (lo, hi):
                body.append(
                    f'<line x1="{cx - 3:.1f}" y1="{y:.1f}" x2="{cx + 3:.1f}" y2="{y:.1f}" stroke="black"/>'
                )
    return _frame(title, body + _axis_labels(0, 0, 0, top)[2:], [(n, colors[n]) for n in names])

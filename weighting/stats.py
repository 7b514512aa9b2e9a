"""Per-step statistics of token weights and of the raw scores behind them, for logging."""

from __future__ import annotations

import torch

SCALAR_KEYS = (
    "mean",
    "std",
    "min",
    "max",
    "clipped_fraction",
    "above_one_fraction",
    "at_min_fraction",
    "at_max_fraction",
)


@torch.no_grad()
def weight_stats(
    weights: torch.Tensor,
    valid: torch.Tensor,
    min_weight: float | None = None,
    max_weight: float | None = None,
    n_bins: int = 20,
    hist_max: float | None = None,
) -> dict[str, float | list[int]]:
    """mean/std/min/max over valid tokens; the fractions above 1, on the lower clip bound, on the
    upper one and on either (`clipped_fraction`); histogram counts over [0, hist_max]
    (default: max_weight, else the largest weight)."""
    vals = weights[valid.bool()].float()
    n = vals.numel()
    if n == 0:
        empty = dict.fromkeys(SCALAR_KEYS, 0.0)
        return {"n_valid": 0, **empty, "hist_counts": [0] * n_bins, "hist_max": 0.0}
    at_min = torch.zeros_like(vals, dtype=torch.bool)
    at_max = torch.zeros_like(vals, dtype=torch.bool)
    if min_weight is not None:
        at_min = vals <= min_weight * (1 + 1e-5)
    if max_weight is not None:
        at_max = vals >= max_weight * (1 - 1e-5)
    top = float(hist_max or max_weight or vals.max().item() or 1.0)
    hist = torch.histc(vals.clamp(0, top), bins=n_bins, min=0.0, max=top)
    return {
        "n_valid": n,
        "mean": vals.mean().item(),
        "std": vals.std(unbiased=False).item(),
        "min": vals.min().item(),
        "max": vals.max().item(),
        "clipped_fraction": (at_min | at_max).float().mean().item(),
        "above_one_fraction": (vals > 1 + 1e-6).float().mean().item(),
        "at_min_fraction": at_min.float().mean().item(),
        "at_max_fraction": at_max.float().mean().item(),
        "hist_counts": [int(c) for c in hist.tolist()],
        "hist_max": top,
    }


def scalar_stats(stats: dict, prefix: str = "weight") -> dict[str, float]:
    """The scalar entries of `weight_stats` with a metric-name prefix (for MLflow)."""
    return {f"{prefix}_{k}": float(stats[k]) for k in SCALAR_KEYS}

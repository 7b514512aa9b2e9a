"""Statistics of token weights, for logging: accumulated as tensors, read once.

`weight_sums` turns one micro-batch's weights into a vector of sums (and `weight_extremes` into
[max, −min]); vectors add up over micro-batches and ranks, and `stats_from_sums` reads them
into numbers. `weight_stats` does all three for one tensor.
"""

from __future__ import annotations

import math

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
N_BINS = 20
_FIXED = 6  # n, Σw, Σw², above one, at min, at max; then the histogram


@torch.no_grad()
def weight_sums(
    weights: torch.Tensor,
    valid: torch.Tensor,
    min_weight: float | None,
    max_weight: float | None,
    hist_max: float,
    n_bins: int = N_BINS,
) -> torch.Tensor:
    """float64 (6 + n_bins,): count, Σw, Σw², counts above 1 / on the lower / on the upper
    clip bound (bounds None: not counted), and histogram counts over [0, hist_max]."""
    valid = valid.bool()
    w = torch.where(valid, weights.double(), torch.zeros_like(weights, dtype=torch.float64))
    on = valid.double()
    at_min = w <= min_weight * (1 + 1e-5) if min_weight is not None else torch.zeros_like(valid)
    at_max = w >= max_weight * (1 - 1e-5) if max_weight is not None else torch.zeros_like(valid)
    fixed = torch.stack(
        [
            on.sum(),
            w.sum(),
            (w * w).sum(),
            (valid & (w > 1 + 1e-6)).double().sum(),
            (valid & at_min).double().sum(),
            (valid & at_max).double().sum(),
        ]
    )
    top = hist_max if hist_max > 0 else 1.0
    bins = (w.clamp(0, top) * (n_bins / top)).long().clamp(max=n_bins - 1)
    hist = torch.zeros(n_bins, dtype=torch.float64, device=w.device)
    hist.scatter_add_(0, bins.flatten(), on.flatten())
    return torch.cat([fixed, hist])


@torch.no_grad()
def weight_extremes(weights: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """float64 (2,): [max, −min] of the valid weights (−inf when none): combine with max."""
    w = weights.double()
    top = torch.where(valid.bool(), w, torch.full_like(w, -math.inf)).amax()
    low = torch.where(valid.bool(), -w, torch.full_like(w, -math.inf)).amax()
    return torch.stack([top, low])


def stats_from_sums(
    sums: list[float], extremes: list[float], hist_max: float
) -> dict[str, float | list[int]]:
    """mean/std/min/max over valid tokens; the fractions above 1, on the lower clip bound, on the
    upper one and on either (`clipped_fraction`); histogram counts over [0, hist_max]."""
    n, total, squares, above, at_min, at_max = sums[:_FIXED]
    hist = [int(round(c)) for c in sums[_FIXED:]]
    if n == 0:
        empty = dict.fromkeys(SCALAR_KEYS, 0.0)
        return {"n_valid": 0, **empty, "hist_counts": [0] * len(hist), "hist_max": 0.0}
    mean = total / n
    return {
        "n_valid": int(n),
        "mean": mean,
        "std": math.sqrt(max(squares / n - mean * mean, 0.0)),
        "min": -extremes[1],
        "max": extremes[0],
        "clipped_fraction": min(at_min + at_max, n) / n,
        "above_one_fraction": above / n,
        "at_min_fraction": at_min / n,
        "at_max_fraction": at_max / n,
        "hist_counts": hist,
        "hist_max": hist_max,
    }


@torch.no_grad()
def weight_stats(
    weights: torch.Tensor,
    valid: torch.Tensor,
    min_weight: float | None = None,
    max_weight: float | None = None,
    n_bins: int = N_BINS,
    hist_max: float | None = None,
) -> dict[str, float | list[int]]:
    """`stats_from_sums` of one tensor; the histogram spans [0, hist_max] (default: max_weight,
    else the largest valid weight)."""
    extremes = weight_extremes(weights, valid).tolist()
    top = float(hist_max or max_weight or (extremes[0] if extremes[0] > 0 else 1.0))
    sums = weight_sums(weights, valid, min_weight, max_weight, top, n_bins).tolist()
    return stats_from_sums(sums, extremes, top)


def scalar_stats(stats: dict, prefix: str = "weight") -> dict[str, float]:
    """The scalar entries of `weight_stats` with a metric-name prefix (for MLflow)."""
    return {f"{prefix}_{k}": float(stats[k]) for k in SCALAR_KEYS}

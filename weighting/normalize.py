"""The one normalisation pipeline the normalised weighters share, with no host synchronisation.

scores → z-score over valid tokens → softmax(z / T) → scaled to mean 1 → clipped to
[min_weight, max_weight] → rescaled (before the clip) until the clipped weights have mean 1.

The last step finds the scale c with mean(clip(c·w, lo, hi)) = 1 by bisection (in float64, in
log space), so bounds hold exactly and the mean is 1 to float precision whenever lo ≤ 1 ≤ hi.
Padding/prompt tokens get weight 0 and take no part in any statistic. Emphasis is continuous:
no token is dropped.

Every statistic is a masked reduction (no boolean indexing, no `.item()`), so the pipeline runs
on a GPU without stalling the stream and under FakeTensorMode. The invariants are checked by
`mean_error` / `check_mean_error`, which the training step reads once per step.
"""

from __future__ import annotations

import math

import torch

from weighting.config import NormalizeConfig
from weighting.inputs import WeightingError

_BISECTION_STEPS = 100
Dims = tuple[int, ...]


def _masked_sum(x: torch.Tensor, mask: torch.Tensor, dims: Dims) -> torch.Tensor:
    return torch.where(mask, x, torch.zeros_like(x)).sum(dims, keepdim=True)


def _masked_max(x: torch.Tensor, mask: torch.Tensor, dims: Dims) -> torch.Tensor:
    return torch.where(mask, x, torch.full_like(x, -math.inf)).amax(dims, keepdim=True)


def _masked_min(x: torch.Tensor, mask: torch.Tensor, dims: Dims) -> torch.Tensor:
    return torch.where(mask, x, torch.full_like(x, math.inf)).amin(dims, keepdim=True)


def sanitize_scores(scores: torch.Tensor, valid: torch.Tensor, dims: Dims) -> torch.Tensor:
    """Makes valid scores finite (float64): NaN → mean of the finite ones, ±inf → their max/min.

    A NaN or infinite CE (an fp16 overflow, a -inf logit) thus neither poisons the batch nor
    gets all the weight. With no finite valid score every valid token scores 0 (uniform weights).
    """
    scores = scores.double()  # float64 so that squaring a 1e30 score cannot overflow
    finite = valid & torch.isfinite(scores)
    count = finite.sum(dims, keepdim=True)
    mean = _masked_sum(scores, finite, dims) / count.clamp(min=1)
    low, high = _masked_min(scores, finite, dims), _masked_max(scores, finite, dims)
    out = torch.where(torch.isnan(scores), mean, scores)
    out = torch.minimum(torch.maximum(out, low), high)
    return torch.where(valid & (count > 0), out, torch.zeros_like(out))


def zscore(scores: torch.Tensor, valid: torch.Tensor, eps: float, dims: Dims) -> torch.Tensor:
    n = valid.sum(dims, keepdim=True).clamp(min=1)
    mean = _masked_sum(scores, valid, dims) / n
    var = _masked_sum((scores - mean) ** 2, valid, dims) / n
    return torch.where(valid, (scores - mean) / (var.sqrt() + eps), torch.zeros_like(scores))


def log_softmax_mean_one(
    z: torch.Tensor, valid: torch.Tensor, temperature: float, dims: Dims
) -> torch.Tensor:
    """log of softmax(z/T) over the valid tokens times their count (weights of mean exactly 1).

    Kept in log space so that a sharp temperature cannot underflow a weight to 0.
    """
    logits = torch.where(valid, z.double() / temperature, torch.full_like(z, -math.inf).double())
    kept = [d for d in range(z.dim()) if d not in dims]
    grouped = logits.permute(*kept, *dims)  # each group's elements on the trailing dims
    log_probs = torch.log_softmax(grouped.flatten(len(kept)), dim=-1).view_as(grouped)
    n = valid.sum(dims, keepdim=True).clamp(min=1).double()
    order = [*kept, *dims]
    return log_probs.permute(*[order.index(d) for d in range(z.dim())]) + torch.log(n)


def clip_to_mean_one(
    log_w: torch.Tensor,
    valid: torch.Tensor,
    lo: float,
    hi: float,
    dims: Dims,
    steps: int = _BISECTION_STEPS,
) -> torch.Tensor:
    """clip(c·w, lo, hi) with c found by bisection on log c so that each group's valid mean is 1.

    At log c = log(lo) − max(log w) every weight sits on `lo` (mean ≤ 1); at
    log c = log(hi) − min(log w) every weight sits on `hi` (mean ≥ 1); the mean is continuous
    and monotone in between.
    """
    n = valid.sum(dims, keepdim=True).clamp(min=1)
    left = math.log(lo) - _masked_max(log_w, valid, dims) - 1.0
    right = math.log(hi) - _masked_min(log_w, valid, dims) + 1.0
    for _ in range(steps):
        mid = (left + right) / 2
        too_big = _masked_sum((log_w + mid).exp().clamp(lo, hi), valid, dims) / n > 1.0
        right, left = torch.where(too_big, mid, right), torch.where(too_big, left, mid)
    weights = (log_w + (left + right) / 2).exp().clamp(lo, hi).float()
    return torch.where(valid, weights, torch.zeros_like(weights))


@torch.no_grad()
def normalize(
    scores: torch.Tensor, valid: torch.Tensor, config: NormalizeConfig, dims: Dims
) -> torch.Tensor:
    """Weights (float32, the scores' shape) normalised over each group of elements that share
    every index outside `dims`; a group with no valid token gets zeros."""
    if scores.shape != valid.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and valid mask {tuple(valid.shape)} differ")
    valid = valid.bool()
    clean = sanitize_scores(scores, valid, dims)
    z = zscore(clean, valid, config.zscore_eps, dims)
    log_w = log_softmax_mean_one(z, valid, config.temperature, dims)
    return clip_to_mean_one(log_w, valid, config.min_weight, config.max_weight, dims)


def normalize_scores(
    scores: torch.Tensor, valid: torch.Tensor, config: NormalizeConfig
) -> torch.Tensor:
    """The pipeline over all elements at once (any shape); higher score → more weight."""
    return normalize(scores, valid, config, tuple(range(scores.dim())))


def normalize_per_head(
    scores: torch.Tensor, valid: torch.Tensor, config: NormalizeConfig
) -> torch.Tensor:
    """The pipeline for each head separately; scores/valid are (..., n_heads)."""
    return normalize(scores, valid, config, tuple(range(scores.dim() - 1)))


@torch.no_grad()
def mean_error(weights: torch.Tensor, valid: torch.Tensor, config: NormalizeConfig) -> torch.Tensor:
    """The largest |mean − 1| of any head's valid weights (0-dim tensor; 0 for a head with no
    valid token); inf when a valid weight is non-finite or outside [min_weight, max_weight]."""
    dims = tuple(range(weights.dim() - 1))
    valid = valid.bool()
    count = valid.sum(dims)
    mean = _masked_sum(weights.double(), valid, dims).flatten() / count.clamp(min=1)
    error = torch.where(count > 0, (mean - 1.0).abs(), torch.zeros_like(mean)).amax()
    slack = 1e-6
    broken = valid & ~(
        torch.isfinite(weights)
        & (weights >= config.min_weight * (1 - slack))
        & (weights <= config.max_weight * (1 + slack))
    )
    return torch.where(broken.any(), torch.full_like(error, math.inf), error)


def check_mean_error(error: float, config: NormalizeConfig) -> None:
    """Raises WeightingError when normalised weights broke their invariants (read once a step)."""
    if not math.isfinite(error) or error > config.mean_tolerance:
        raise WeightingError(
            f"token weights have mean off 1.0 by {error:.6g} after normalisation (temperature "
            f"{config.temperature:g}, clip [{config.min_weight:g}, {config.max_weight:g}]), "
            f"tolerance {config.mean_tolerance:g}"
        )

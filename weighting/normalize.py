"""The one normalisation pipeline every weighting algorithm shares.

scores → z-score over valid tokens → softmax(z / T) → scaled to mean 1 → clipped to
[min_weight, max_weight] → rescaled (before the clip) until the clipped weights have mean 1.

The last step finds the scale c with mean(clip(c·w, lo, hi)) = 1 by bisection (in float64, in
log space), so bounds hold exactly and the mean is 1 to float precision whenever lo ≤ 1 ≤ hi. Padding/prompt tokens get
weight 0 and take no part in any statistic. Emphasis is continuous: no token is dropped.
"""

from __future__ import annotations

import math

import torch

from weighting.config import NormalizeConfig
from weighting.inputs import WeightingError

_BISECTION_STEPS = 100


def sanitize_scores(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Makes valid scores finite: NaN → mean of the finite ones, ±inf → their max/min.

    A NaN or infinite CE (an fp16 overflow, a -inf logit) thus neither poisons the batch nor
    gets all the weight. With no finite valid score every valid token scores 0 (uniform weights).
    """
    scores = scores.double()  # float64 so that squaring a 1e30 score cannot overflow
    finite = valid & torch.isfinite(scores)
    if not finite.any():
        return torch.zeros_like(scores)
    finite_vals = scores[finite]
    out = torch.where(torch.isnan(scores), finite_vals.mean(), scores)
    out = out.clamp(finite_vals.min(), finite_vals.max())
    return torch.where(valid, out, torch.zeros_like(out))


def zscore(scores: torch.Tensor, valid: torch.Tensor, eps: float) -> torch.Tensor:
    n = valid.sum()
    mean = scores[valid].sum() / n
    var = ((scores - mean) ** 2)[valid].sum() / n
    return torch.where(valid, (scores - mean) / (var.sqrt() + eps), torch.zeros_like(scores))


def log_softmax_mean_one(z: torch.Tensor, valid: torch.Tensor, temperature: float) -> torch.Tensor:
    """log of softmax(z/T) over the valid tokens times their count (weights of mean exactly 1).

    Kept in log space so that a sharp temperature cannot underflow a weight to 0.
    """
    logits = torch.where(
        valid, z.double() / temperature, torch.full_like(z, -torch.inf, dtype=torch.float64)
    )
    log_probs = torch.log_softmax(logits.flatten(), dim=0).view_as(z)
    return log_probs + math.log(valid.sum().item())


def clip_to_mean_one(
    log_w: torch.Tensor, valid: torch.Tensor, lo: float, hi: float, steps: int = _BISECTION_STEPS
) -> torch.Tensor:
    """clip(c·w, lo, hi) with c found by bisection on log c so that the valid mean is 1.

    At log c = log(lo) − max(log w) every weight sits on `lo` (mean ≤ 1); at
    log c = log(hi) − min(log w) every weight sits on `hi` (mean ≥ 1); the mean is continuous
    and monotone in between.
    """
    vals = log_w[valid]
    left = math.log(lo) - vals.max() - 1.0
    right = math.log(hi) - vals.min() + 1.0
    for _ in range(steps):
        mid = (left + right) / 2
        too_big = (vals + mid).exp().clamp(lo, hi).mean() > 1.0
        right, left = torch.where(too_big, mid, right), torch.where(too_big, left, mid)
    weights = (log_w + (left + right) / 2).exp().clamp(lo, hi).float()
    return torch.where(valid, weights, torch.zeros_like(weights))


@torch.no_grad()
def normalize_scores(
    scores: torch.Tensor, valid: torch.Tensor, config: NormalizeConfig
) -> torch.Tensor:
    """Turns per-token scores into weights (float32, same shape) through the shared pipeline.

    Args:
        scores: any shape; higher score → more weight.
        valid: bool, same shape; False tokens (padding, prompt) get weight 0.
        config: temperature and clip bounds.

    Returns all zeros when no token is valid.
    """
    if scores.shape != valid.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and valid mask {tuple(valid.shape)} differ")
    valid = valid.bool()
    if not valid.any():
        return torch.zeros_like(scores, dtype=torch.float32)
    clean = sanitize_scores(scores, valid)
    z = zscore(clean, valid, config.zscore_eps)
    log_w = log_softmax_mean_one(z, valid, config.temperature)
    w = clip_to_mean_one(log_w, valid, config.min_weight, config.max_weight)
    mean = w[valid].mean().item()
    if not math.isfinite(mean) or abs(mean - 1.0) > config.mean_tolerance:
        raise WeightingError(
            f"token weights have mean {mean:.6f} after normalisation (temperature "
            f"{config.temperature:g}, clip [{config.min_weight:g}, {config.max_weight:g}]), "
            "expected 1.0"
        )
    return w


def normalize_per_head(
    scores: torch.Tensor, valid: torch.Tensor, config: NormalizeConfig
) -> torch.Tensor:
    """`normalize_scores` applied to each head separately; scores/valid are (..., n_heads)."""
    return torch.stack(
        [normalize_scores(scores[..., k], valid[..., k], config) for k in range(scores.shape[-1])],
        dim=-1,
    )

"""pass@k (the unbiased estimator of Chen et al., 2021) and per-benchmark summaries."""

from __future__ import annotations

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn from n, c of them correct, passes) = 1 − C(n−c,k)/C(n,k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(results: dict[str, list[bool]], ks: list[int]) -> dict[int, float]:
    """Average pass@k over problems, for every k not larger than the sample count."""
    out = {}
    for k in ks:
        scores = [pass_at_k(len(r), sum(r), k) for r in results.values() if len(r) >= k]
        if scores:
            out[k] = float(np.mean(scores))
    return out

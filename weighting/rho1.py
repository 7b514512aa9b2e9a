"""`rho1-wmtp`: weights from the excess loss CE_policy − CE_ref of each target token.

The reference (Sheared-LLaMA 2.7B, the Rho-1 reference) is a next-token model: for head k at
position t (target token t+k+1) the score uses the reference CE of that same target token
(`weighting.heads.align_to_heads`). With `rho1.score: token` the policy side is its next-token
CE of the same token (same context as the reference), so every head predicting x_j shares one
score; with `score: head` it is head k's own CE.

`mode: soft` → |excess| through the shared pipeline (every token kept, emphasis continuous).
`mode: select` → Rho-1's token selection: signed excess, the top `select_ratio` of each head's
target tokens over the whole optimizer step get weight 1, the others 0. The threshold is agreed
over all micro-batches and ranks by the training loop (`top_fraction_threshold` on the gathered
scores); `selected_weights` applies it.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from weighting.config import WeightingConfig
from weighting.inputs import WeightingError, WeightingInputs
from weighting.normalize import normalize_per_head


class Rho1Weighter:
    name: ClassVar[str] = "rho1-wmtp"
    needs: ClassVar[tuple[str, ...]] = ("base_ce", "ref_ce")

    def __init__(self, config: WeightingConfig):
        self.config = config
        self.selects_per_step = config.rho1.mode == "select"

    @torch.no_grad()
    def scores(self, inputs: WeightingInputs) -> torch.Tensor:
        """Signed excess CE_policy − CE_ref (select), or its magnitude (soft)."""
        inputs.require(self.name, *self.needs)
        excess = inputs.base_ce.float() - inputs.ref_ce.float()
        return excess if self.selects_per_step else excess.abs()

    @torch.no_grad()
    def weights_from_scores(self, scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        if self.selects_per_step:
            raise WeightingError(
                "rho1 select mode needs the step's thresholds: use selected_weights()"
            )
        return normalize_per_head(scores, valid, self.config)

    def weights(self, inputs: WeightingInputs) -> torch.Tensor:
        return self.weights_from_scores(self.scores(inputs), inputs.valid)


def top_fraction_threshold(values: torch.Tensor, ratio: float) -> float:
    """The score a value needs to be among the top ceil(ratio·n) of `values` (1-D, finite)."""
    n = values.numel()
    if n == 0:
        return math.inf
    k = max(1, math.ceil(ratio * n))
    return float(torch.topk(values.double(), k).values[-1])


@torch.no_grad()
def selected_weights(
    scores: torch.Tensor, valid: torch.Tensor, thresholds: list[float]
) -> torch.Tensor:
    """(bsz, seq, n_heads) 1.0 where head k's valid, finite score reaches thresholds[k], else 0."""
    limit = torch.tensor(thresholds, dtype=torch.float64, device=scores.device)
    keep = valid & ~torch.isnan(scores) & (scores.double() >= limit)
    return keep.float()

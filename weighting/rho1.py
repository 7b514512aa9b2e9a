"""`rho1-wmtp`: weights from the excess loss CE_policy − CE_ref of each target token.

The reference (Sheared-LLaMA 2.7B, the Rho-1 reference) is a next-token model: for head k at
position t (target token t+k+1) the score uses the reference CE of that same target token
(`weighting.heads.align_to_heads`). With `rho1.score: token` the policy side is its next-token
CE of the same token (signal `policy_token_ce`: same context as the reference), so every head
predicting x_j shares one score; with `score: head` it is head k's own CE (`policy_head_ce`).

`mode: soft` → |excess| through the shared pipeline (every token kept, emphasis continuous).
`mode: select` → Rho-1's token selection, a per-step weighter: signed excess; the top
`select_ratio` of each head's target tokens over the whole optimizer step (every micro-batch,
every rank) get weight 1, the others 0, and each head's loss is averaged over its selected
tokens. `step_context` agrees on the thresholds; `weights` applies them.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from weighting.config import WeightingConfig
from weighting.inputs import Collectives, Signal, WeightingInputs
from weighting.normalize import normalize_per_head


class Rho1Weighter:
    name: ClassVar[str] = "rho1-wmtp"

    def __init__(self, config: WeightingConfig):
        self.config = config
        policy: Signal = "policy_token_ce" if config.rho1.score == "token" else "policy_head_ce"
        self.needs: tuple[Signal, ...] = (policy, "reference_ce")
        self.per_step = config.rho1.mode == "select"
        self.normalised = not self.per_step

    @torch.no_grad()
    def scores(self, inputs: WeightingInputs) -> torch.Tensor:
        """Signed excess CE_policy − CE_ref (select), or its magnitude (soft)."""
        inputs.require(self.name, *self.needs)
        policy = getattr(inputs, self.needs[0])
        excess = policy.float() - inputs.reference_ce.float()
        return excess if self.per_step else excess.abs()

    @torch.no_grad()
    def step_context(
        self, scores: list[torch.Tensor], valid: list[torch.Tensor], collectives: Collectives
    ) -> torch.Tensor:
        """Select mode: each head's threshold (n_heads,) over the whole step, all ranks."""
        n_heads = scores[0].shape[-1]
        candidates = torch.cat(
            [
                torch.where(v & torch.isfinite(s), s.double(), -math.inf).reshape(-1, n_heads)
                for s, v in zip(scores, valid, strict=True)
            ]
        )
        return top_fraction_threshold(
            collectives.gather(candidates, -math.inf), self.config.rho1.select_ratio
        )

    @torch.no_grad()
    def weights(
        self, scores: torch.Tensor, valid: torch.Tensor, step_context: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.per_step:
            return selected_weights(scores, valid, step_context)
        return normalize_per_head(scores, valid, self.config)


def top_fraction_threshold(candidates: torch.Tensor, ratio: float) -> torch.Tensor:
    """Per column of `candidates` (n, n_heads; -inf = not a candidate): the score a value needs
    to be among the top ceil(ratio·m) of the m candidates; +inf where there are none."""
    count = torch.isfinite(candidates).sum(0)
    keep = torch.ceil(ratio * count.double()).long().clamp(min=1)
    ordered = candidates.sort(dim=0, descending=True).values
    kth = ordered.gather(0, (keep - 1).clamp(max=candidates.shape[0] - 1)[None]).squeeze(0)
    return torch.where(count > 0, kth, torch.full_like(kth, math.inf))


@torch.no_grad()
def selected_weights(
    scores: torch.Tensor, valid: torch.Tensor, thresholds: torch.Tensor
) -> torch.Tensor:
    """(bsz, seq, n_heads) 1.0 where head k's valid, non-NaN score reaches thresholds[k]."""
    limit = thresholds.to(device=scores.device, dtype=torch.float64)
    keep = valid & ~torch.isnan(scores) & (scores.double() >= limit)
    return keep.float()

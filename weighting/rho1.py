"""`rho1-wmtp`: weight = normalised |CE_ref − CE_base| of each head's target token.

The reference (Sheared-LLaMA 2.7B, the Rho-1 reference) is a next-token model: for head k at
position t (target token t+k+1) the score uses the reference CE of that same target token
(`weighting.heads.align_to_heads`). Where the CE comes from (a reference forward or precomputed
shards) is the training loop's business (`training.reference`).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from weighting.config import WeightingConfig
from weighting.inputs import WeightingInputs
from weighting.normalize import normalize_per_head


class Rho1Weighter:
    name: ClassVar[str] = "rho1-wmtp"
    needs: ClassVar[tuple[str, ...]] = ("base_ce", "ref_ce")

    def __init__(self, config: WeightingConfig):
        self.config = config

    @torch.no_grad()
    def weights(self, inputs: WeightingInputs) -> torch.Tensor:
        inputs.require(self.name, *self.needs)
        scores = (inputs.ref_ce.float() - inputs.base_ce.float()).abs()
        return normalize_per_head(scores, inputs.valid, self.config)

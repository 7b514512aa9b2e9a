"""`rho1-wmtp`: weight = normalised |CE_ref − CE_base| of each head's target token.

The reference (Sheared-LLaMA 2.7B, the Rho-1 reference) is a next-token model: for head k at
position t (target token t+k+1) the score uses the reference CE of that same target token.
Reference CE comes either from a forward of the reference model during training
(`reference_next_token_ce`) or from precomputed shards (`weighting.reference_store`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from model.transformer import Transformer
from weighting.inputs import WeightingInputs
from weighting.normalize import NormalizeConfig, normalize_per_head


class Rho1Weighter:
    name: ClassVar[str] = "rho1-wmtp"

    def __init__(self, config: NormalizeConfig):
        self.config = config

    @torch.no_grad()
    def weights(self, inputs: WeightingInputs) -> torch.Tensor:
        inputs.require(self.name, "base_ce", "ref_ce")
        scores = (inputs.ref_ce.float() - inputs.base_ce.float()).abs()
        return normalize_per_head(scores, inputs.valid, self.config)


@torch.no_grad()
def reference_next_token_ce(
    reference: Transformer, tokens: torch.Tensor, chunk_size: int = 512
) -> torch.Tensor:
    """CE of the reference's next-token head: out[b, t] = −log p(tokens[b, t+1] | tokens[b, :t+1]).

    The last position has no target and is NaN. Logits are built `chunk_size` positions at a
    time so a 32000-word vocabulary never needs (bsz, seq, vocab) floats at once.
    """
    hidden = reference.head_hidden(reference(tokens, return_trunk=True), 0)
    bsz, seq = tokens.shape
    ce = torch.full((bsz, seq), float("nan"), device=tokens.device)
    for start in range(0, seq - 1, chunk_size):
        end = min(start + chunk_size, seq - 1)
        logits = reference.output(hidden[:, start:end]).float()
        targets = tokens[:, start + 1 : end + 1]
        ce[:, start:end] = F.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), reduction="none"
        ).view(bsz, end - start)
    return ce

"""What a training step hands to a weighter."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class WeightingError(ValueError):
    """Token weights could not be computed (missing inputs, a degenerate normalisation)."""


@dataclass
class WeightingInputs:
    """Per-head tensors are (bsz, seq, n_heads); position t of head k targets token t+k+1.

    Attributes:
        valid: bool, True where a head's target is a response token (loss is taken there).
        base_ce: the trained model's CE of each head's target token (detached), for rho1-wmtp.
        ref_ce: the reference model's CE of the same target token, aligned to the heads
            (`weighting.heads.align_to_heads`), for rho1-wmtp.
        td_error: TD errors aligned to the heads, for critic-wmtp.
    """

    valid: torch.Tensor
    base_ce: torch.Tensor | None = None
    ref_ce: torch.Tensor | None = None
    td_error: torch.Tensor | None = None

    def require(self, algorithm: str, *fields: str) -> None:
        for name in fields:
            value = getattr(self, name)
            if value is None:
                raise WeightingError(
                    f"{algorithm} needs `{name}` in its weighting inputs; none given"
                )
            if value.shape != self.valid.shape:
                raise WeightingError(
                    f"{algorithm}: `{name}` has shape {tuple(value.shape)}, "
                    f"valid mask has {tuple(self.valid.shape)}"
                )

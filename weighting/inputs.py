"""What a training step hands to a weighter: the signals, named, and the collectives it may use."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal, Protocol

import torch

Signal = Literal["policy_token_ce", "policy_head_ce", "reference_ce", "td_error"]
SIGNALS: tuple[Signal, ...] = ("policy_token_ce", "policy_head_ce", "reference_ce", "td_error")


class WeightingError(ValueError):
    """Token weights could not be computed (missing inputs, a degenerate normalisation)."""


@dataclass
class WeightingInputs:
    """The signals of one micro-batch. Per-head tensors are (bsz, seq, n_heads); position t of
    head k targets token t+k+1. The step computes exactly the signals a weighter `needs`.

    Attributes:
        valid: bool, True where a head's target is a response token (loss is taken there).
        policy_token_ce: the policy's next-token CE of each target token (the context the
            reference sees), shared by every head that predicts that token; NaN off targets.
        policy_head_ce: each head's own CE of its target token; 0 off targets.
        reference_ce: the reference model's CE of each head's target token (next-token, aligned
            with `weighting.heads.align_to_heads`); NaN where it has none.
        td_error: the critic's TD errors, aligned to the heads; 0 off the response.
    """

    valid: torch.Tensor
    policy_token_ce: torch.Tensor | None = None
    policy_head_ce: torch.Tensor | None = None
    reference_ce: torch.Tensor | None = None
    td_error: torch.Tensor | None = None

    def require(self, algorithm: str, *signals: Signal) -> None:
        """Raises WeightingError unless every signal is present with the valid mask's shape."""
        for name in signals:
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


assert {f.name for f in fields(WeightingInputs)} == {"valid", *SIGNALS}


class Collectives(Protocol):
    """Reductions over every rank of the run; the identity in a single process. Both are
    collectives: every rank calls them in the same order."""

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks."""
        ...

    def gather(self, rows: torch.Tensor, fill: float) -> torch.Tensor:
        """Every rank's `rows` (n, ...) concatenated along dim 0; ranks may hold different n
        (padded with `fill` to the step's capacity, so the padding is part of the result)."""
        ...


class SingleProcess:
    """`Collectives` of a single process."""

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def gather(self, rows: torch.Tensor, fill: float) -> torch.Tensor:
        return rows

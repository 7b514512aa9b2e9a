"""`dft`: Dynamic Fine-Tuning (Wu et al., 2025, "On the Generalization of SFT"), as TRL ships it
(`SFTTrainer`, `loss_type="dft"`): each target token's CE is weighted by the policy's own
probability of that token, detached from the graph,

    loss = Σ_t sg(p_θ(y_t | y_<t)) · CE_t / N,

here per head: head k's weight at position t is exp(−CE) of head k's own target (signal
`policy_head_ce`, computed without gradients on the step's trunk). The weights lie in (0, 1]
and are not renormalised (as in TRL): confidently predicted tokens keep their full gradient,
tokens the policy finds unlikely are damped, so the effective learning rate is below the
baseline's. Cost: one extra forward of every head (no backward) per micro-batch.

DFT maximises the targets' probability rather than their log-likelihood, so it needs a base that
already predicts the data: from random weights (p ≈ 1/vocab) it sharpens what the model already
favours and leaves the rest behind (on the tests' random micro model its objective falls 10×
in 100 steps while head-0 CE rises from 6.5 to 11). Fine-tune pretrained bases with it.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from weighting.config import WeightingConfig
from weighting.inputs import Signal, WeightingInputs


class DFTWeighter:
    name: ClassVar[str] = "dft"
    per_step: ClassVar[bool] = False
    normalised: ClassVar[bool] = False

    def __init__(self, config: WeightingConfig):
        self.config = config
        self.needs: tuple[Signal, ...] = ("policy_head_ce",)

    @torch.no_grad()
    def scores(self, inputs: WeightingInputs) -> torch.Tensor:
        """The policy's probability of each head's target token, exp(−CE_k)."""
        inputs.require(self.name, *self.needs)
        return torch.exp(-inputs.policy_head_ce.float())

    @torch.no_grad()
    def weights(
        self, scores: torch.Tensor, valid: torch.Tensor, step_context: None = None
    ) -> torch.Tensor:
        return torch.where(valid, scores, torch.zeros_like(scores))

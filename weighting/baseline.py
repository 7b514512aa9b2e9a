"""`baseline`: every valid token of every head gets weight 1."""

from __future__ import annotations

from typing import ClassVar

import torch

from weighting.config import WeightingConfig
from weighting.inputs import Signal, WeightingInputs


class BaselineWeighter:
    name: ClassVar[str] = "baseline"
    per_step: ClassVar[bool] = False
    normalised: ClassVar[bool] = False

    def __init__(self, config: WeightingConfig):
        self.config = config
        self.needs: tuple[Signal, ...] = ()

    def scores(self, inputs: WeightingInputs) -> None:
        """Uniform weights have no score."""
        return None

    def weights(self, scores: None, valid: torch.Tensor, step_context: None = None) -> torch.Tensor:
        return valid.float()

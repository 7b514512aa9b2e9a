"""`baseline`: every valid token of every head gets weight 1."""

from __future__ import annotations

from typing import ClassVar

import torch

from weighting.config import WeightingConfig
from weighting.inputs import WeightingInputs


class BaselineWeighter:
    name: ClassVar[str] = "baseline"
    needs: ClassVar[tuple[str, ...]] = ()
    selects_per_step: ClassVar[bool] = False

    def __init__(self, config: WeightingConfig):
        self.config = config

    def scores(self, inputs: WeightingInputs) -> None:
        """Uniform weights have no score."""
        return None

    def weights_from_scores(self, scores: None, valid: torch.Tensor) -> torch.Tensor:
        return valid.float()

    def weights(self, inputs: WeightingInputs) -> torch.Tensor:
        return inputs.valid.float()

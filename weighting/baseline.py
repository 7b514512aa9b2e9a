"""`baseline`: every valid token of every head gets weight 1."""

from __future__ import annotations

from typing import ClassVar

import torch

from weighting.config import WeightingConfig
from weighting.inputs import WeightingInputs


class BaselineWeighter:
    name: ClassVar[str] = "baseline"
    needs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: WeightingConfig):
        self.config = config

    @torch.no_grad()
    def weights(self, inputs: WeightingInputs) -> torch.Tensor:
        return inputs.valid.float()

"""`baseline`: every valid token of every head gets weight 1."""

from __future__ import annotations

from typing import ClassVar

import torch

from weighting.inputs import WeightingInputs


class BaselineWeighter:
    name: ClassVar[str] = "baseline"

    def __init__(self, config=None):
        self.config = config

    @torch.no_grad()
    def weights(self, inputs: WeightingInputs) -> torch.Tensor:
        return inputs.valid.float()

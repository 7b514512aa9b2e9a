"""Weighting algorithms by their kebab-case recipe key.

To add an algorithm: a class with `name`, `needs` (the `WeightingInputs` fields it reads),
`selects_per_step`, `scores(inputs)` (raw per-token scores, logged before normalisation) and
`weights_from_scores(scores, valid) -> (bsz, seq, n_heads)` float weights, listed here and in
`config.ALGORITHMS`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Protocol

import torch

from runtime.schema import did_you_mean
from weighting.baseline import BaselineWeighter
from weighting.config import ALGORITHMS, NormalizeConfig, WeightingConfig
from weighting.critic import CriticWeighter
from weighting.inputs import WeightingInputs
from weighting.rho1 import Rho1Weighter


class Weighter(Protocol):
    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]]
    selects_per_step: bool

    def scores(self, inputs: WeightingInputs) -> torch.Tensor | None: ...

    def weights_from_scores(
        self, scores: torch.Tensor | None, valid: torch.Tensor
    ) -> torch.Tensor: ...

    def weights(self, inputs: WeightingInputs) -> torch.Tensor: ...


WEIGHTERS: dict[str, type] = {
    "baseline": BaselineWeighter,
    "rho1-wmtp": Rho1Weighter,
    "critic-wmtp": CriticWeighter,
}
assert set(WEIGHTERS) == set(ALGORITHMS), "weighting.config.ALGORITHMS and WEIGHTERS must agree"


def get_weighter(name: str, config: NormalizeConfig | None = None) -> Weighter:
    """The weighter `name` with `config` (a plain `NormalizeConfig` gets the section defaults)."""
    if name not in WEIGHTERS:
        allowed = sorted(WEIGHTERS)
        raise KeyError(
            f"unknown weighting algorithm {name!r}{did_you_mean(name, allowed)}; "
            f"allowed: {', '.join(allowed)}"
        )
    if not isinstance(config, WeightingConfig):
        config = WeightingConfig(algo=name, **dataclasses.asdict(config or NormalizeConfig()))
    return WEIGHTERS[name](config)

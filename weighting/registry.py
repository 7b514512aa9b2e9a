"""Weighting algorithms by their kebab-case recipe key.

To add an algorithm: a class with `name`, `needs` (the `WeightingInputs` fields it reads) and
`weights(inputs) -> (bsz, seq, n_heads)` float weights, listed here and in `config.ALGORITHMS`.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import torch

from runtime.schema import did_you_mean
from weighting.baseline import BaselineWeighter
from weighting.config import ALGORITHMS, WeightingConfig
from weighting.critic import CriticWeighter
from weighting.inputs import WeightingInputs
from weighting.rho1 import Rho1Weighter


class Weighter(Protocol):
    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]]

    def weights(self, inputs: WeightingInputs) -> torch.Tensor: ...


WEIGHTERS: dict[str, type] = {
    "baseline": BaselineWeighter,
    "rho1-wmtp": Rho1Weighter,
    "critic-wmtp": CriticWeighter,
}
assert set(WEIGHTERS) == set(ALGORITHMS), "weighting.config.ALGORITHMS and WEIGHTERS must agree"


def get_weighter(name: str, config: WeightingConfig | None = None) -> Weighter:
    if name not in WEIGHTERS:
        allowed = sorted(WEIGHTERS)
        raise KeyError(
            f"unknown weighting algorithm {name!r}{did_you_mean(name, allowed)}; "
            f"allowed: {', '.join(allowed)}"
        )
    return WEIGHTERS[name](config or WeightingConfig(algo=name))

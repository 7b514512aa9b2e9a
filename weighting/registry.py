"""Weighting algorithms by their kebab-case recipe key."""

from __future__ import annotations

import difflib
from typing import Protocol

import torch

from weighting.baseline import BaselineWeighter
from weighting.critic import CriticWeighter
from weighting.inputs import WeightingInputs
from weighting.normalize import NormalizeConfig
from weighting.rho1 import Rho1Weighter


class Weighter(Protocol):
    name: str

    def weights(self, inputs: WeightingInputs) -> torch.Tensor: ...


WEIGHTERS: dict[str, type] = {
    "baseline": BaselineWeighter,
    "rho1-wmtp": Rho1Weighter,
    "critic-wmtp": CriticWeighter,
}


def unknown_key_message(kind: str, key: str, allowed: list[str]) -> str:
    """'unknown <kind> 'x' (did you mean 'y'?); allowed: a, b' — one line for any bad key."""
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {kind} {key!r}{hint}; allowed: {', '.join(allowed)}"


def get_weighter(name: str, config: NormalizeConfig | None = None) -> Weighter:
    if name not in WEIGHTERS:
        raise KeyError(unknown_key_message("weighting algorithm", name, sorted(WEIGHTERS)))
    return WEIGHTERS[name](config or NormalizeConfig())

"""Every weighting algorithm, by its recipe key (`weighting.algo`), and the protocol they follow.

A weighter is built from the recipe's `weighting:` section and answers, for every micro-batch,
which weight each (token, head) pair gets in the loss:

    weighter = get_weighter(config)
    weighter.needs        the signals it reads (fields of `WeightingInputs`); the step computes
                          exactly these, without gradients, from the micro-batch's trunk
    weighter.per_step     False: weights come from one micro-batch's scores
                          True: from the whole optimizer step's (every micro-batch, every rank);
                          the step then scores every micro-batch first, calls `step_context`
                          once, and averages each head's loss over the tokens with a nonzero
                          weight (Rho-1's selection)
    weighter.normalised   True: every head's valid weights have mean 1 (within
                          weighting.mean_tolerance) and lie in [min_weight, max_weight]; the step
                          checks it once per step
    scores(inputs)        raw per-token scores (bsz, seq, n_heads), logged; None for uniform
    step_context(scores, valid, collectives)   per-step weighters only: what the whole step's
                          scores decide (Rho-1's thresholds)
    weights(scores, valid, step_context=None)  float weights (bsz, seq, n_heads), 0 where
                          `valid` is False

None of these may read a tensor's value on the host (`.item()`, `bool(t)`, boolean indexing):
the step runs without host synchronisation.

To add an algorithm: a class with these members in `weighting/<name>.py`, listed below.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import torch

from runtime.schema import did_you_mean
from weighting.baseline import BaselineWeighter
from weighting.config import NormalizeConfig, WeightingConfig
from weighting.critic import CriticWeighter
from weighting.dft import DFTWeighter
from weighting.inputs import Collectives, Signal, WeightingInputs
from weighting.rho1 import Rho1Weighter


class Weighter(Protocol):
    name: ClassVar[str]
    needs: tuple[Signal, ...]
    per_step: bool
    normalised: bool

    def __init__(self, config: WeightingConfig) -> None: ...

    def scores(self, inputs: WeightingInputs) -> torch.Tensor | None: ...

    def weights(
        self, scores: torch.Tensor | None, valid: torch.Tensor, step_context: Any = None
    ) -> torch.Tensor: ...


class PerStepWeighter(Weighter, Protocol):
    def step_context(
        self, scores: list[torch.Tensor], valid: list[torch.Tensor], collectives: Collectives
    ) -> Any: ...


WEIGHTERS: dict[str, type[Weighter]] = {
    cls.name: cls for cls in (BaselineWeighter, Rho1Weighter, CriticWeighter, DFTWeighter)
}


def register(cls: type[Weighter]) -> type[Weighter]:
    """Adds a weighter class under its `name` (a plugin, or a test's own algorithm)."""
    WEIGHTERS[cls.name] = cls
    return cls


def get_weighter(name: str | WeightingConfig, config: NormalizeConfig | None = None) -> Weighter:
    """The weighter of a `WeightingConfig` (its `algo`), or of `name` with `config` (a plain
    `NormalizeConfig` or nothing: the section's defaults)."""
    if isinstance(name, WeightingConfig):
        name, config = name.algo, name
    if name not in WEIGHTERS:
        allowed = sorted(WEIGHTERS)
        raise KeyError(
            f"unknown weighting algorithm {name!r}{did_you_mean(name, allowed)}; "
            f"allowed: {', '.join(allowed)}"
        )
    if not isinstance(config, WeightingConfig):
        fields = vars(config) if config is not None else {}
        config = WeightingConfig(algo=name, **fields)
    return WEIGHTERS[name](config)

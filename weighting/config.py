"""The recipe's `weighting:` section as the weighting code itself uses it, validated once.

`WeightingConfig` *is* the recipe section: the normalisation keys sit at its top level (it extends
`NormalizeConfig`, which the pipeline reads), the critic's under `critic:`. Every bad value raises
`ConfigError("weighting.<key>=<value> is invalid: <what is allowed>")` when the object is built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from runtime.schema import ConfigError, did_you_mean, require

MIN_TEMPERATURE = 1e-3


@dataclass(frozen=True)
class NormalizeConfig:
    """scores → z-score → softmax(z/T) → mean 1 → clip to [min_weight, max_weight]."""

    temperature: float = 1.0
    min_weight: float = 0.05
    max_weight: float = 3.0
    mean_tolerance: float = 1e-3
    zscore_eps: float = 1e-6

    def __post_init__(self) -> None:
        w = "weighting"
        require(
            math.isfinite(self.temperature) and self.temperature >= MIN_TEMPERATURE,
            f"{w}.temperature",
            self.temperature,
            f"must be >= {MIN_TEMPERATURE:g} (sharper weights underflow; use rho1.mode: select)",
        )
        require(
            0 < self.min_weight <= 1,
            f"{w}.min_weight",
            self.min_weight,
            "must be in (0, 1] (mean 1 must stay reachable)",
        )
        require(
            self.max_weight >= 1,
            f"{w}.max_weight",
            self.max_weight,
            "must be >= 1 (mean 1 must stay reachable)",
        )
        require(
            0 < self.mean_tolerance < 1,
            f"{w}.mean_tolerance",
            self.mean_tolerance,
            "must be in (0, 1)",
        )
        require(self.zscore_eps > 0, f"{w}.zscore_eps", self.zscore_eps, "must be > 0")


@dataclass(frozen=True)
class CriticConfig:
    """critic-wmtp: sequence rewards, GAE, the value head's stage-1 regression and its checks.

    min_explained_variance: after `stage1_steps` the value head must explain at least this share
        of the held-out return variance; below it stage 1 keeps training (a quarter of
        `stage1_steps` at a time) up to `stage1_max_steps`, then the run stops
        (`on_weak_critic: stop`) or trains on with uniform weights (`uniform`), said in the log
        and the report.
    stage2_value_lr: > 0 keeps the value head learning during stage 2 (an auxiliary MSE on the
        GAE returns of the current trunk, its own AdamW at this LR), so that it follows the trunk
        as it changes; 0 freezes it after stage 1.
    """

    gamma: float = 1.0
    gae_lambda: float = 0.95
    reward_correct: float = 1.0
    reward_incorrect: float = 0.0
    stage1_steps: int = 200
    stage1_max_steps: int = 0  # 0: stage1_steps (no extension)
    value_lr: float = 1e-3
    min_explained_variance: float = 0.0
    on_weak_critic: Literal["stop", "uniform"] = "stop"
    stage2_value_lr: float = 0.0

    def __post_init__(self) -> None:
        w = "weighting.critic"
        for name in ("gamma", "gae_lambda"):
            value = getattr(self, name)
            require(0 <= value <= 1, f"{w}.{name}", value, "must be in [0, 1]")
        require(self.stage1_steps >= 0, f"{w}.stage1_steps", self.stage1_steps, "must be >= 0")
        require(
            self.stage1_max_steps == 0 or self.stage1_max_steps >= self.stage1_steps,
            f"{w}.stage1_max_steps",
            self.stage1_max_steps,
            f"must be 0 or >= stage1_steps ({self.stage1_steps})",
        )
        require(self.value_lr > 0, f"{w}.value_lr", self.value_lr, "must be > 0")
        require(
            math.isfinite(self.min_explained_variance) and self.min_explained_variance < 1,
            f"{w}.min_explained_variance",
            self.min_explained_variance,
            "must be below 1 (0: no check)",
        )
        require(
            self.on_weak_critic in ("stop", "uniform"),
            f"{w}.on_weak_critic",
            self.on_weak_critic,
            "allowed 'stop', 'uniform'",
        )
        require(
            self.stage2_value_lr >= 0,
            f"{w}.stage2_value_lr",
            self.stage2_value_lr,
            "must be >= 0 (0: the value head is frozen in stage 2)",
        )

    @property
    def stage1_cap(self) -> int:
        return max(self.stage1_max_steps, self.stage1_steps)


@dataclass(frozen=True)
class Rho1Config:
    """rho1-wmtp: what is scored and how scores become weights.

    score: `token` scores target token x_j by CE_policy(x_j) − CE_ref(x_j) with the policy's
        next-token head (the same context as the reference), shared by every head predicting
        x_j; `head` uses head k's own CE (mixes in how hard it is to look k tokens ahead).
    mode: `soft` weights every token by normalised |excess| (z-score → softmax(T) → mean 1 →
        clip); `select` is Rho-1's selection: the top `select_ratio` of target tokens of each
        head over the whole optimizer step by signed excess get weight 1, the rest 0, and each
        head's loss is averaged over its selected tokens.
    """

    score: Literal["token", "head"] = "token"
    mode: Literal["soft", "select"] = "soft"
    select_ratio: float = 0.6

    def __post_init__(self) -> None:
        w = "weighting.rho1"
        require(
            self.score in ("token", "head"), f"{w}.score", self.score, "allowed 'token', 'head'"
        )
        require(self.mode in ("soft", "select"), f"{w}.mode", self.mode, "allowed 'soft', 'select'")
        require(
            0 < self.select_ratio <= 1, f"{w}.select_ratio", self.select_ratio, "must be in (0, 1]"
        )


@dataclass(frozen=True)
class WeightingConfig(NormalizeConfig):
    """The whole `weighting:` section: algorithm (a key of `weighting.registry.WEIGHTERS`),
    normalisation, reference CE source, rho1, critic."""

    algo: str = "rho1-wmtp"
    reference_source: Literal["online", "precomputed"] = "online"
    reference_ce_dir: str | None = None
    rho1: Rho1Config = field(default_factory=Rho1Config)
    critic: CriticConfig = field(default_factory=CriticConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        from weighting.registry import WEIGHTERS  # the registry imports the weighters, they this

        if self.algo not in WEIGHTERS:
            raise ConfigError(
                f"weighting.algo={self.algo!r} is invalid: allowed {', '.join(WEIGHTERS)}"
                f"{did_you_mean(self.algo, list(WEIGHTERS))}"
            )
        if self.reference_source == "precomputed":
            require(
                bool(self.reference_ce_dir),
                "weighting.reference_ce_dir",
                self.reference_ce_dir,
                "set it when reference_source is 'precomputed'",
            )

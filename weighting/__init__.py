"""Token weighting for weighted MTP (tensor math only): baseline, rho1-wmtp, critic-wmtp, dft."""

from weighting.config import CriticConfig, NormalizeConfig, Rho1Config, WeightingConfig
from weighting.critic import ValueHead, gae, td_errors, terminal_rewards, value_loss
from weighting.heads import align_to_heads
from weighting.inputs import (
    SIGNALS,
    Collectives,
    Signal,
    SingleProcess,
    WeightingError,
    WeightingInputs,
)
from weighting.normalize import check_mean_error, mean_error, normalize_per_head, normalize_scores
from weighting.registry import WEIGHTERS, Weighter, get_weighter, register
from weighting.stats import scalar_stats, weight_stats

__all__ = [
    "SIGNALS",
    "WEIGHTERS",
    "Collectives",
    "CriticConfig",
    "NormalizeConfig",
    "Rho1Config",
    "Signal",
    "SingleProcess",
    "ValueHead",
    "Weighter",
    "WeightingConfig",
    "WeightingError",
    "WeightingInputs",
    "align_to_heads",
    "check_mean_error",
    "gae",
    "get_weighter",
    "mean_error",
    "normalize_per_head",
    "normalize_scores",
    "register",
    "scalar_stats",
    "td_errors",
    "terminal_rewards",
    "value_loss",
    "weight_stats",
]

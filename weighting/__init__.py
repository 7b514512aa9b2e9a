"""Token weighting for weighted MTP (tensor math only): baseline, rho1-wmtp and critic-wmtp."""

from weighting.config import ALGORITHMS, CriticConfig, NormalizeConfig, Rho1Config, WeightingConfig
from weighting.critic import ValueHead, gae, td_errors, terminal_rewards, value_loss
from weighting.heads import align_to_heads
from weighting.inputs import WeightingError, WeightingInputs
from weighting.normalize import normalize_per_head, normalize_scores
from weighting.registry import WEIGHTERS, get_weighter
from weighting.stats import scalar_stats, weight_stats

__all__ = [
    "ALGORITHMS",
    "WEIGHTERS",
    "CriticConfig",
    "NormalizeConfig",
    "Rho1Config",
    "ValueHead",
    "WeightingConfig",
    "WeightingError",
    "WeightingInputs",
    "align_to_heads",
    "gae",
    "get_weighter",
    "normalize_per_head",
    "normalize_scores",
    "scalar_stats",
    "td_errors",
    "terminal_rewards",
    "value_loss",
    "weight_stats",
]

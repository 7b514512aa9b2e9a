"""`critic-wmtp`: a value head on the trunk, trained on verifiable sequence rewards.

Stage 1 regresses the value head on GAE returns of the sequence reward (is_correct → reward);
stage 2 turns the TD errors δ_t = r_t + γ·V(t+1) − V(t) into token weights through the shared
normalisation pipeline.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from weighting.config import CriticConfig, WeightingConfig
from weighting.inputs import Signal, WeightingInputs
from weighting.normalize import normalize_per_head


class ValueHead(nn.Module):
    """V(s_t): a linear map of the trunk's hidden state at position t to a scalar."""

    def __init__(self, dim: int, device: torch.device | str | None = None):
        super().__init__()
        self.proj = nn.Linear(dim, 1, device=device)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden.to(self.proj.weight.dtype)).squeeze(-1).float()


def episode_ends(valid: torch.Tensor) -> torch.Tensor:
    """True at the last token of each contiguous run of valid tokens (one response each)."""
    nxt = torch.zeros_like(valid)
    nxt[:, :-1] = valid[:, 1:]
    return valid & ~nxt


def terminal_rewards(
    valid: torch.Tensor, is_correct: torch.Tensor, config: CriticConfig
) -> torch.Tensor:
    """Token rewards (bsz, seq): the sequence reward at each episode's last valid token.

    `is_correct` is per row (bsz,) or per token (bsz, seq) for packed rows.
    """
    correct = is_correct.bool().to(valid.device)
    if correct.dim() == 1:
        correct = correct[:, None].expand_as(valid)
    reward = torch.where(correct, config.reward_correct, config.reward_incorrect)
    return episode_ends(valid).float() * reward


def td_errors(
    rewards: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, gamma: float
) -> torch.Tensor:
    """δ_t = r_t + γ·V(t+1)·[t not terminal] − V(t) on valid tokens, 0 elsewhere."""
    ends = episode_ends(valid)
    next_values = torch.zeros_like(values)
    next_values[:, :-1] = values[:, 1:]
    next_values = torch.where(ends, torch.zeros_like(next_values), next_values)
    delta = rewards + gamma * next_values - values
    return torch.where(valid, delta, torch.zeros_like(delta))


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each episode (contiguous valid run).

    Returns (advantages, returns), both (bsz, seq) and 0 off the valid tokens.
    """
    delta = td_errors(rewards, values, valid, gamma)
    ends = episode_ends(valid)
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        running = torch.where(ends[:, t], torch.zeros_like(running), running)
        running = torch.where(
            valid[:, t], delta[:, t] + gamma * lam * running, torch.zeros_like(running)
        )
        advantages[:, t] = running
    returns = torch.where(valid, advantages + values, torch.zeros_like(values))
    return advantages, returns


def value_loss(values: torch.Tensor, returns: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean squared error to the (detached) returns over valid tokens."""
    sq = (values - returns.detach()) ** 2
    return (sq * valid).sum() / valid.sum().clamp(min=1)


class CriticWeighter:
    name: ClassVar[str] = "critic-wmtp"
    per_step: ClassVar[bool] = False
    normalised: ClassVar[bool] = True

    def __init__(self, config: WeightingConfig):
        self.config = config
        self.needs: tuple[Signal, ...] = ("td_error",)

    @torch.no_grad()
    def scores(self, inputs: WeightingInputs) -> torch.Tensor:
        """The TD errors themselves: a token that raised the expected reward scores high."""
        inputs.require(self.name, *self.needs)
        return inputs.td_error.float()

    @torch.no_grad()
    def weights(
        self, scores: torch.Tensor, valid: torch.Tensor, step_context: None = None
    ) -> torch.Tensor:
        return normalize_per_head(scores, valid, self.config)

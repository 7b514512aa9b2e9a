"""critic-wmtp stage 1: regress the value head on GAE returns of the sequence reward (trunk frozen)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from data.loader import Batch
from model.transformer import Transformer
from training.distributed import DistInfo, all_reduce_sum
from training.loss import autocast
from weighting import ValueHead, gae, terminal_rewards, value_loss
from weighting.config import CriticConfig


def build_value_head(dim: int, critic: CriticConfig, device: torch.device):
    """The value head (zero-initialised) and its AdamW optimizer."""
    head = ValueHead(dim).to(device)
    return head, torch.optim.AdamW(head.parameters(), lr=critic.value_lr)


def critic_stage1_step(
    model: Transformer,
    value_head: ValueHead,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    critic: CriticConfig,
    dtype: torch.dtype,
    info: DistInfo,
) -> float:
    """One regression step; returns the value loss averaged over ranks."""
    with torch.no_grad(), autocast(info.device, dtype):
        hidden = model(batch.tokens, return_trunk=True)
    response = batch.valid[..., 0]
    values = value_head(hidden.float())
    rewards = terminal_rewards(response, batch.token_is_correct, critic)
    _, returns = gae(rewards, values.detach(), response, critic.gamma, critic.gae_lambda)
    loss = value_loss(values, returns, response)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if info.enabled:
        for p in value_head.parameters():
            dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
    optimizer.step()
    return all_reduce_sum([loss.item()], info)[0] / info.world_size

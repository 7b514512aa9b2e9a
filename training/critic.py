"""critic-wmtp's value head and its training: stage 1 regresses it on GAE returns of the
sequence reward (trunk frozen), then measures how much of the held-out return variance it
explains."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from data.loader import Batch, TrainLoader
from model.transformer import Transformer
from runtime.precision import autocast
from training.distributed import DistInfo, all_reduce_sum
from training.run_log import StepLog
from training.state import TrainState
from weighting import ValueHead, gae, terminal_rewards, value_loss
from weighting.config import CriticConfig

LOW_EXPLAINED_VARIANCE = 0.1


@dataclass(frozen=True)
class Critic:
    """The value head, its AdamW optimizer and the recipe's `weighting.critic` section."""

    value_head: ValueHead
    optimizer: torch.optim.Optimizer
    config: CriticConfig


def build_critic(dim: int, config: CriticConfig, device: torch.device) -> Critic:
    """A zero-initialised value head on `device` with its optimizer."""
    head = ValueHead(dim).to(device)
    return Critic(head, torch.optim.AdamW(head.parameters(), lr=config.value_lr), config)


def _values_and_returns(
    model: Transformer,
    value_head: ValueHead,
    batch: Batch,
    critic: CriticConfig,
    dtype: torch.dtype,
    segment_ids: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.no_grad(), autocast(batch.tokens.device, dtype):
        hidden = model(batch.tokens, return_trunk=True, segment_ids=segment_ids)
    response = batch.valid[..., 0]
    values = value_head(hidden.float())
    rewards = terminal_rewards(response, batch.token_is_correct, critic)
    _, returns = gae(rewards, values.detach(), response, critic.gamma, critic.gae_lambda)
    return values, returns, response


def critic_stage1_step(
    model: Transformer,
    critic: Critic,
    batch: Batch,
    dtype: torch.dtype,
    info: DistInfo,
    segment_ids: torch.Tensor | None = None,
) -> float:
    """One regression step; returns the value loss averaged over ranks."""
    values, returns, response = _values_and_returns(
        model, critic.value_head, batch, critic.config, dtype, segment_ids
    )
    loss = value_loss(values, returns, response)
    critic.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if info.enabled:
        for p in critic.value_head.parameters():
            dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
    critic.optimizer.step()
    return all_reduce_sum([loss.item()], info)[0] / info.world_size


@torch.no_grad()
def explained_variance(
    model: Transformer,
    value_head: ValueHead,
    loader: TrainLoader,
    n_batches: int,
    critic: CriticConfig,
    dtype: torch.dtype,
    info: DistInfo,
    isolate_samples: bool = False,
) -> float:
    """1 − Var(returns − V) / Var(returns) over the response tokens of held-out batches (all
    ranks): 1 is a perfect critic, 0 one that predicts the mean, below 0 worse than that."""
    sums = [0.0] * 5  # n, Σr, Σr², Σe, Σe² (e = r − V)
    for _ in range(n_batches):
        batch = loader.next_batch().to(info.device)
        segments = batch.segment_ids if isolate_samples else None
        values, returns, response = _values_and_returns(
            model, value_head, batch, critic, dtype, segments
        )
        r, e = returns[response].double(), (returns - values)[response].double()
        for i, x in enumerate((r.numel(), r.sum(), (r**2).sum(), e.sum(), (e**2).sum())):
            sums[i] += float(x)
    n, sr, sr2, se, se2 = all_reduce_sum(sums, info)
    var_r = sr2 / max(n, 1) - (sr / max(n, 1)) ** 2
    var_e = se2 / max(n, 1) - (se / max(n, 1)) ** 2
    return 1.0 - var_e / var_r if var_r > 1e-12 else 0.0


def critic_warnings(is_correct: np.ndarray, critic: CriticConfig, ev: float | None) -> list[str]:
    """Plain-language warnings for a critic whose TD errors cannot carry a correctness signal."""
    warnings = []
    rewards = {critic.reward_correct if c else critic.reward_incorrect for c in is_correct}
    if len(rewards) < 2:
        share = "correct" if bool(is_correct.all()) else "incorrect"
        warnings.append(
            f"critic rewards have no variance: every training sample is {share}, so the value "
            "head learns a constant and critic-wmtp's TD-error weights carry no correctness "
            "signal (train on data with incorrect solutions, e.g. data.prepare --incorrect tag)"
        )
    if ev is not None and ev < LOW_EXPLAINED_VARIANCE:
        warnings.append(
            f"the value head explains {ev:.1%} of the return variance on held-out batches after "
            "stage 1 (below 10%): its TD errors are close to noise; raise "
            "weighting.critic.stage1_steps or value_lr"
        )
    return warnings


def run_stage1(
    state: TrainState,
    model: Transformer,
    critic: Critic,
    loader: TrainLoader,
    held_out: TrainLoader | None,
    eval_batches: int,
    dtype: torch.dtype,
    isolate_samples: bool,
    info: DistInfo,
    log: StepLog,
) -> list[str]:
    """Stage 1 from `state.stage1_step` to `critic.stage1_steps` (the policy `model` is frozen,
    the value head learns), then the explained variance on `held_out` (once per run); returns
    the critic's warnings, also printed."""
    config = critic.config
    log.start_stage("[critic stage 1]", config.stage1_steps, state.stage1_step)
    while state.stage1_step < config.stage1_steps:
        batch = loader.next_batch().to(info.device)
        segments = batch.segment_ids if isolate_samples else None
        loss = critic_stage1_step(model, critic, batch, dtype, info, segments)
        state.stage1_step += 1
        log({"stage1_value_loss": loss}, state.stage1_step, config.stage1_steps, "stage1")
    if held_out is not None and state.stage1_explained_variance is None:
        ev = explained_variance(
            model, critic.value_head, held_out.rewind(), eval_batches, config, dtype, info,
            isolate_samples,
        )  # fmt: skip
        state.stage1_explained_variance = ev
        log({"stage1_explained_variance": ev}, state.stage1_step, state.stage1_step, "critic_eval")
    warnings = critic_warnings(loader.split_is_correct(), config, state.stage1_explained_variance)
    for warning in warnings if info.is_main else []:
        print(f"[warning] {warning}", flush=True)
    return warnings

"""critic-wmtp's value head and its training.

Stage 1 regresses it on GAE returns of the sequence reward (trunk frozen) and measures how much
of the held-out return variance it explains; below `weighting.critic.min_explained_variance` it
trains on up to `stage1_max_steps`, then stops the run or falls back to uniform weights
(`on_weak_critic`). In stage 2 the TD errors weight the tokens; with `stage2_value_lr` the value
head keeps learning from every micro-batch (`Critic.td_errors`), so that it follows the trunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from data.loader import Batch, TrainLoader
from model.transformer import Transformer
from runtime.errors import EXIT_NAN
from runtime.precision import autocast
from training.distributed import DistInfo, all_reduce_sum
from training.failures import TrainingFailure
from training.run_log import StepLog
from training.state import TrainState
from weighting import ValueHead, gae, td_errors, terminal_rewards, value_loss
from weighting.config import CriticConfig

LOW_EXPLAINED_VARIANCE = 0.1


@dataclass
class Critic:
    """The value head, its AdamW optimizer and the recipe's `weighting.critic` section.
    `uniform`: the value head proved too weak and stage 2 gives every token the same weight."""

    value_head: ValueHead
    optimizer: torch.optim.Optimizer
    config: CriticConfig
    info: DistInfo
    uniform: bool = False

    def td_errors(self, trunk: torch.Tensor, batch: Batch) -> torch.Tensor:
        """(bsz, seq) TD errors of the value head on one micro-batch's (detached) trunk: zeros
        when uniform. With `stage2_value_lr` the head then learns from the same batch."""
        response = batch.valid[..., 0]
        if self.uniform:
            return torch.zeros(response.shape, device=trunk.device)
        rewards = terminal_rewards(response, batch.token_is_correct, self.config)
        learn = self.config.stage2_value_lr > 0
        with torch.enable_grad() if learn else torch.no_grad():
            values = self.value_head(trunk.detach().float())
        delta = td_errors(rewards, values.detach(), response, self.config.gamma)
        if learn:
            _, returns = gae(rewards, values.detach(), response, self.config.gamma,
                             self.config.gae_lambda)  # fmt: skip
            with torch.enable_grad():
                self._learn(value_loss(values, returns, response), self.config.stage2_value_lr)
        return delta

    @torch.no_grad()
    def start_at_mean(self, is_correct: np.ndarray) -> None:
        """The value head starts by predicting the training split's mean reward (the return of
        every token under γ = 1), so that stage 1 learns what distinguishes solutions rather
        than the mean itself."""
        c = self.config
        mean = float(np.where(is_correct, c.reward_correct, c.reward_incorrect).mean())
        self.value_head.proj.bias.fill_(mean)

    def _learn(self, loss: torch.Tensor, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.info.enabled:
            for p in self.value_head.parameters():
                dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
        self.optimizer.step()


def build_critic(dim: int, config: CriticConfig, info: DistInfo) -> Critic:
    """A zero-initialised value head on the run's device with its optimizer."""
    head = ValueHead(dim, info.device)
    return Critic(head, torch.optim.AdamW(head.parameters(), lr=config.value_lr), config, info)


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
    critic._learn(loss, critic.config.value_lr)
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
    ranks): 1 is a perfect critic, 0 one that predicts the mean, below 0 worse than that. Returns
    that barely vary (rewards without variance) have nothing to explain: 0."""
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
    mean_square = sr2 / max(n, 1)
    if var_r <= 1e-4 * mean_square + 1e-12:  # constant rewards: only bootstrap noise to explain
        return 0.0
    return 1.0 - var_e / var_r


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
    least = max(LOW_EXPLAINED_VARIANCE, critic.min_explained_variance)
    if ev is not None and ev < least:
        warnings.append(
            f"the value head explains {ev:.1%} of the return variance on held-out batches after "
            f"stage 1 (below {least:.0%}): its TD errors are close to noise; raise "
            "weighting.critic.stage1_steps or value_lr"
        )
    return warnings


def weak_critic(critic: CriticConfig, ev: float, steps: int) -> TrainingFailure:
    return TrainingFailure(
        f"the value head explains {ev:.1%} of the held-out return variance after {steps} "
        f"stage-1 steps, below weighting.critic.min_explained_variance="
        f"{critic.min_explained_variance:g}: its TD errors would weight tokens by noise",
        "raise weighting.critic.stage1_max_steps or value_lr, train on data with more incorrect "
        "solutions, or set weighting.critic.on_weak_critic: uniform to train on with uniform "
        "weights (the report says so)",
        EXIT_NAN,
    )


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
    """Stage 1 (the policy `model` frozen, the value head learns) until the value head explains
    `min_explained_variance` of the held-out return variance or `stage1_max_steps` are done;
    then a weak critic stops the run or falls back to uniform weights. Once per run (a resumed
    run only restores the verdict); returns the critic's warnings, also printed. The loader is
    rewound when stage 1 ends, so that stage 2 trains on the same rows, in the same order, as
    every other arm."""
    config = critic.config
    is_correct = loader.split_is_correct()
    ran = not state.stage1_done
    if state.stage1_done:
        critic.uniform = state.critic_uniform
    elif state.stage1_step == 0:
        critic.start_at_mean(is_correct)
    target = max(state.stage1_step, config.stage1_steps)
    while not state.stage1_done:
        log.start_stage("[critic stage 1]", target, state.stage1_step)
        while state.stage1_step < target:
            batch = loader.next_batch().to(info.device)
            segments = batch.segment_ids if isolate_samples else None
            loss = critic_stage1_step(model, critic, batch, dtype, info, segments)
            state.stage1_step += 1
            log({"stage1_value_loss": loss}, state.stage1_step, target, "stage1")
        if held_out is None:
            state.stage1_done = True
            break
        ev = explained_variance(
            model, critic.value_head, held_out.rewind(), eval_batches, config, dtype, info,
            isolate_samples,
        )  # fmt: skip
        state.stage1_explained_variance = ev
        log({"stage1_explained_variance": ev, "min_explained_variance":
             config.min_explained_variance}, state.stage1_step, state.stage1_step, "critic_eval")  # fmt: skip
        if ev >= config.min_explained_variance or state.stage1_step >= config.stage1_cap:
            state.stage1_done = True
        else:
            target = min(config.stage1_cap, state.stage1_step + max(config.stage1_steps // 4, 1))
    ev = state.stage1_explained_variance
    warnings = critic_warnings(is_correct, config, ev)
    if ev is not None and ev < config.min_explained_variance and not state.critic_uniform:
        if config.on_weak_critic == "stop":
            raise weak_critic(config, ev, state.stage1_step)
        state.critic_uniform = critic.uniform = True
        log({"critic_uniform": 1.0}, state.stage1_step, state.stage1_step, "critic_eval")
    if state.critic_uniform:
        warnings.append(
            f"critic-wmtp fell back to uniform weights: the value head explained {ev:.1%} of "
            f"the held-out return variance after {state.stage1_step} stage-1 steps, below "
            f"weighting.critic.min_explained_variance={config.min_explained_variance:g} "
            "(on_weak_critic: uniform); this run is a baseline run, not a test of the critic"
        )
    if ran:
        loader.rewind()
    for warning in warnings if info.is_main else []:
        print(f"[warning] {warning}", flush=True)
    return warnings

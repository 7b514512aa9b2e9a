"""Pieces of one optimizer step that `train_wmtp.train_step` and the loop call by name: the
step's target counts N_k, the weights of per-step weighters, the running totals of the
micro-batches (device tensors, read once per step into a `StepSummary`), gradient clipping and
the logged metrics.

Nothing here reads a device value inside the micro-batch loop: counts come from the loader
(host values), sums stay on the device, and `StepTotals.reduce` makes the step's one read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from data.loader import Batch
from runtime.precision import autocast
from training.distributed import DistInfo, all_reduce_tensor
from training.loss import MTPLossResult
from training.parallel import all_reduce_replicated_grads, clip_grad_norm, replicated_parameters
from training.signals import Signals
from weighting import (
    Collectives,
    Weighter,
    WeightingConfig,
    check_mean_error,
    mean_error,
    scalar_stats,
)
from weighting.stats import N_BINS, stats_from_sums, weight_extremes, weight_sums


def global_target_counts(batches: list[Batch], collectives: Collectives) -> torch.Tensor:
    """N_k (n_heads,) float64: head k's target tokens over the whole optimizer step (all
    micro-batches and ranks), from the loader's host counts."""
    local = [sum(counts) for counts in zip(*(b.n_targets for b in batches), strict=True)]
    device = batches[0].tokens.device
    return collectives.sum(torch.tensor(local, dtype=torch.float64, device=device))


@dataclass
class StepWeights:
    """A per-step weighter's verdict, made before any backward: every micro-batch's scores and
    weights, and N_k = each head's tokens with a nonzero weight over the step (all ranks)."""

    scores: list[torch.Tensor | None]
    weights: list[torch.Tensor]
    n_targets: torch.Tensor


@torch.no_grad()
def weigh_step_ahead(
    batches: list[Batch], weighter: Weighter, signals: Signals, collectives: Collectives
) -> StepWeights:
    """Scores every micro-batch (a trunk forward without gradients), lets the weighter decide
    from the whole step (`step_context`), then weights each micro-batch (Rho-1 selection)."""
    scores = []
    for batch in batches:
        with autocast(batch.tokens.device, signals.dtype):
            trunk = signals.model(
                batch.tokens, return_trunk=True, segment_ids=signals.segments(batch)
            )
        scores.append(weighter.scores(signals.inputs(batch, trunk)))
    valid = [b.valid for b in batches]
    context = weighter.step_context(scores, valid, collectives)
    weights = [weighter.weights(s, v, context) for s, v in zip(scores, valid, strict=True)]
    kept = torch.stack([(w > 0).sum((0, 1)) for w in weights]).sum(0).double()
    return StepWeights(scores, weights, collectives.sum(kept))


@dataclass
class StepSummary:
    """One optimizer step's numbers, summed over its micro-batches and every rank."""

    loss: float
    grad_norm: float
    head_ce: list[float]  # unweighted CE per head
    tokens: float  # non-padding tokens
    weight_stats: dict  # `weighting.stats.stats_from_sums`
    weight_error: float  # normalised weighters: worst |mean − 1| of a head (inf: broken)
    diagnostics: dict[str, float]  # score moments, the fraction of tokens with weight > 0


class StepTotals:
    """Sums over the micro-batches of one optimizer step (this rank), kept as device tensors;
    `reduce` adds them over ranks and reads them once."""

    def __init__(
        self, n_heads: int, device: torch.device, weighter: Weighter, config: WeightingConfig
    ):
        self.weighter, self.config = weighter, config
        f64 = {"dtype": torch.float64, "device": device}
        self.loss = torch.zeros((), **f64)
        self.ce_sum = torch.zeros(n_heads, **f64)
        self.ce_count, self.tokens = [0] * n_heads, 0  # host counts
        self.scores = torch.zeros(4, **f64)  # n, Σs, Σs², non-finite
        self.kept = torch.zeros(2, **f64)  # valid with weight > 0, valid
        self.weight_sums = torch.zeros(6 + N_BINS, **f64)
        self.weight_extremes = torch.full((2,), -math.inf, **f64)
        self.weight_error = torch.zeros((), **f64)
        self.first: tuple[Batch, torch.Tensor] | None = None  # the report's sample

    @property
    def bounds(self) -> tuple[float | None, float | None]:
        if self.weighter.normalised:
            return self.config.min_weight, self.config.max_weight
        return None, None

    @torch.no_grad()
    def add(
        self,
        batch: Batch,
        weights: torch.Tensor,
        scores: torch.Tensor | None,
        result: MTPLossResult,
    ) -> None:
        self.first = self.first or (batch, weights)
        self.loss += result.loss
        self.ce_sum += result.ce_sum
        self.ce_count = [a + b for a, b in zip(self.ce_count, batch.n_targets, strict=True)]
        self.tokens += batch.n_tokens
        valid = batch.valid
        if scores is not None:
            finite = valid & torch.isfinite(scores)
            values = torch.where(
                finite, scores.double(), torch.zeros_like(scores, dtype=torch.float64)
            )
            self.scores += torch.stack(
                [finite.sum(), values.sum(), (values**2).sum(), (valid & ~finite).sum()]
            ).double()
        self.kept += torch.stack([(valid & (weights > 0)).sum(), valid.sum()]).double()
        lo, hi = self.bounds
        self.weight_sums += weight_sums(weights, valid, lo, hi, self.config.max_weight)
        self.weight_extremes = torch.maximum(self.weight_extremes, weight_extremes(weights, valid))
        if self.weighter.normalised:
            self.weight_error = torch.maximum(
                self.weight_error, mean_error(weights, valid, self.config)
            )

    def reduce(self, grad_norm: torch.Tensor, info: DistInfo) -> StepSummary:
        """Sums over ranks, reads everything in one go, and checks the weights' invariants
        (raises WeightingError when normalised weights broke them)."""
        device = self.loss.device
        counts = torch.tensor([*self.ce_count, self.tokens], dtype=torch.float64, device=device)
        flat = torch.cat(
            [self.loss[None], self.ce_sum, counts, self.scores, self.kept, self.weight_sums]
        )
        flat = all_reduce_tensor(flat, info)
        top = all_reduce_tensor(
            torch.cat([self.weight_extremes, self.weight_error[None]]), info, "max"
        )
        values = torch.cat([flat, top, grad_norm.detach().double().reshape(1)]).tolist()
        n = len(self.ce_count)
        loss, ce_sum, counts = values[0], values[1 : 1 + n], values[1 + n : 2 + 2 * n]
        rest = values[2 + 2 * n :]
        (count, total, squares, nonfinite), (kept, valid) = rest[:4], rest[4:6]
        sums, (w_max, w_neg_min, error, norm) = rest[6:-4], rest[-4:]
        diagnostics = {"weight_selected_fraction": kept / max(valid, 1)}
        if count:
            mean = total / count
            std = math.sqrt(max(squares / count - mean**2, 0.0))
            diagnostics |= {"score_mean": mean, "score_std": std, "score_nonfinite": nonfinite}
        summary = StepSummary(
            loss=loss,
            grad_norm=norm,
            head_ce=[s / max(c, 1) for s, c in zip(ce_sum, counts[:n], strict=True)],
            tokens=counts[n],
            weight_stats=stats_from_sums(sums, [w_max, w_neg_min], self.config.max_weight),
            weight_error=error,
            diagnostics=diagnostics,
        )
        if self.weighter.normalised:
            check_mean_error(error, self.config)
        return summary


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def step_metrics(
    summary: StepSummary, lr: float, seconds: float, flops_per_token: float, peak_flops: float
) -> dict[str, float]:
    """The step's logged numbers: loss, LR, gradient norm, throughput and MFU, weight statistics,
    score diagnostics and CE per head."""
    return {
        "loss": summary.loss,
        "lr": lr,
        "grad_norm": summary.grad_norm,
        "tokens_per_s": summary.tokens / seconds,
        "step_time_s": seconds,
        "mfu": flops_per_token * summary.tokens / seconds / peak_flops,
        **scalar_stats(summary.weight_stats),
        **summary.diagnostics,
        **{f"ce_head{k}": ce for k, ce in enumerate(summary.head_ce)},
    }


def clip_gradients(model: nn.Module, max_norm: float, use_fsdp: bool) -> torch.Tensor:
    """Averages the replicated heads' gradients over ranks (FSDP), then clips the global norm;
    returns the norm before clipping (a device tensor)."""
    if use_fsdp:
        all_reduce_replicated_grads(replicated_parameters(model))
    return clip_grad_norm(list(model.parameters()), max_norm)

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

from data.loader import TOKEN_CLASSES, Batch
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
        self.by_class = torch.zeros(2, len(TOKEN_CLASSES), **f64)  # Σ weight, count per class
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
        if batch.target_class is not None:  # which kinds of token an algorithm emphasises
            index = batch.target_class.flatten().long()
            on = valid.flatten().double()
            self.by_class[0].index_add_(0, index, weights.flatten().double() * on)
            self.by_class[1].index_add_(0, index, on)

    def reduce(self, grad_norm: torch.Tensor, info: DistInfo) -> StepSummary:
        """Sums (and maxima) over ranks, read in one go, and the weights' invariants checked
        (raises WeightingError when normalised weights broke them)."""
        device = self.loss.device
        summed = {
            "loss": self.loss,
            "ce_sum": self.ce_sum,
            "ce_count": torch.tensor(self.ce_count, dtype=torch.float64, device=device),
            "tokens": torch.tensor(float(self.tokens), dtype=torch.float64, device=device),
            "scores": self.scores,  # n, Σs, Σs², non-finite
            "kept": self.kept,  # valid with weight > 0, valid
            "class_weight": self.by_class[0],
            "class_count": self.by_class[1],
            "weight_sums": self.weight_sums,
        }
        largest = {"weight_extremes": self.weight_extremes, "weight_error": self.weight_error}
        v = read_once({**reduced(summed, info, "sum"), **reduced(largest, info, "max"),
                       "grad_norm": grad_norm})  # fmt: skip
        (count, total, squares, nonfinite), (kept, valid) = v["scores"], v["kept"]
        diagnostics = {"weight_selected_fraction": kept / max(valid, 1)}
        for name, w_sum, n in zip(TOKEN_CLASSES, v["class_weight"], v["class_count"], strict=True):
            if n:
                diagnostics[f"weight_mean_{name}"] = w_sum / n
        if count:
            mean = total / count
            std = math.sqrt(max(squares / count - mean**2, 0.0))
            diagnostics |= {"score_mean": mean, "score_std": std, "score_nonfinite": nonfinite}
        summary = StepSummary(
            loss=v["loss"][0],
            grad_norm=v["grad_norm"][0],
            head_ce=[s / max(c, 1) for s, c in zip(v["ce_sum"], v["ce_count"], strict=True)],
            tokens=v["tokens"][0],
            weight_stats=stats_from_sums(
                v["weight_sums"], v["weight_extremes"], self.config.max_weight
            ),
            weight_error=v["weight_error"][0],
            diagnostics=diagnostics,
        )
        if self.weighter.normalised:
            check_mean_error(summary.weight_error, self.config)
        return summary


def reduced(parts: dict[str, torch.Tensor], info: DistInfo, op: str) -> dict[str, torch.Tensor]:
    """Each named tensor reduced over ranks (`sum` or `max`) in one collective."""
    flat = torch.cat([t.detach().double().flatten() for t in parts.values()])
    flat = all_reduce_tensor(flat, info, op)
    sizes = [t.numel() for t in parts.values()]
    return dict(zip(parts, flat.split(sizes), strict=True))


def read_once(parts: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Named device tensors read on the host together: the step's one synchronisation."""
    flat = torch.cat(
        [t.detach().double().flatten().to(parts["loss"].device) for t in parts.values()]
    )
    values, sizes = flat.tolist(), [t.numel() for t in parts.values()]
    out, start = {}, 0
    for name, size in zip(parts, sizes, strict=True):
        out[name], start = values[start : start + size], start + size
    return out


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
        "tokens": summary.tokens,
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

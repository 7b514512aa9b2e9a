"""Pieces of one optimizer step that the loop in train_wmtp.py calls by name: the step's global
target counts, Rho-1 token selection over the step, the running totals of its micro-batches,
gradient clipping, validation loss."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from data.loader import IGNORE_INDEX, Batch, TrainLoader
from model.transformer import Transformer
from training.distributed import DistInfo, all_gather_values, all_reduce_sum
from training.loss import MTPLossResult, autocast, chunked_head_ce
from training.parallel import all_reduce_replicated_grads, clip_grad_norm, replicated_parameters
from training.recipe import TrainSection
from training.signals import Signals
from weighting import WeightingConfig, weight_stats
from weighting.registry import Weighter
from weighting.rho1 import selected_weights, top_fraction_threshold


def global_target_counts(batches: list[Batch], n_heads: int, info: DistInfo) -> list[float]:
    """N_k: head k's target tokens over the whole optimizer step (all micro-batches and ranks)."""
    local = [
        float(sum((b.labels[..., k] != IGNORE_INDEX).sum() for b in batches))
        for k in range(n_heads)
    ]
    return all_reduce_sum(local, info)


@torch.no_grad()
def select_step_tokens(
    batches: list[Batch], weighter: Weighter, signals: Signals, ratio: float, info: DistInfo
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[float]]:
    """Rho-1 selection over the whole step: scores every micro-batch (a forward without
    gradients), agrees on one threshold per head over all micro-batches and ranks, and returns
    per micro-batch (scores, 0/1 weights) and the global selected count of each head (its N_k)."""
    scores = []
    for batch in batches:
        with autocast(info.device, signals.dtype):
            trunk = signals.model(
                batch.tokens, return_trunk=True, segment_ids=signals.segments(batch)
            )
        scores.append(weighter.scores(signals.inputs(weighter.needs, batch, trunk)))
    thresholds = []
    for k in range(signals.n_heads):
        local = [
            s[..., k][b.valid[..., k] & torch.isfinite(s[..., k])]
            for s, b in zip(scores, batches, strict=True)
        ]
        thresholds.append(top_fraction_threshold(all_gather_values(torch.cat(local), info), ratio))
    chosen = [
        (s, selected_weights(s, b.valid, thresholds)) for s, b in zip(scores, batches, strict=True)
    ]
    counts = [float(sum(w[..., k].sum() for _, w in chosen)) for k in range(signals.n_heads)]
    return chosen, all_reduce_sum(counts, info)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


@dataclass
class StepTotals:
    """Sums over the micro-batches of one optimizer step (this rank): loss, CE per head, tokens,
    the raw weighting scores' moments, and the weights themselves (for statistics)."""

    n_heads: int
    loss: float = 0.0
    ce_sum: list[float] = field(default_factory=list)
    ce_count: list[int] = field(default_factory=list)
    tokens: int = 0  # non-padding tokens
    scores: list[float] = field(
        default_factory=lambda: [0.0] * 6
    )  # n, Σs, Σs², non-finite, selected, valid
    weights: list[tuple[Batch, torch.Tensor]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ce_sum, self.ce_count = [0.0] * self.n_heads, [0] * self.n_heads

    def add(
        self,
        batch: Batch,
        weights: torch.Tensor,
        scores: torch.Tensor | None,
        result: MTPLossResult,
    ) -> None:
        self.loss += result.loss
        for k in range(self.n_heads):
            self.ce_sum[k] += result.ce_sum[k]
            self.ce_count[k] += result.ce_count[k]
        self.tokens += int((batch.segment_ids >= 0).sum())
        self.weights.append((batch, weights))
        valid = batch.valid
        if scores is not None:
            finite = valid & torch.isfinite(scores)
            values = scores[finite].double()
            self.scores[0] += values.numel()
            self.scores[1] += float(values.sum())
            self.scores[2] += float((values**2).sum())
            self.scores[3] += float((valid & ~torch.isfinite(scores)).sum())
        self.scores[4] += float((valid & (weights > 0)).sum())
        self.scores[5] += float(valid.sum())

    def reduce(self, info: DistInfo) -> tuple[float, list[float], float, dict[str, float]]:
        """(step loss, unweighted CE per head, tokens, score diagnostics) summed over ranks."""
        totals = all_reduce_sum(
            [self.loss, *self.ce_sum, *self.ce_count, float(self.tokens), *self.scores], info
        )
        n = self.n_heads
        head_ce = [totals[1 + k] / max(totals[1 + n + k], 1) for k in range(n)]
        count, total, squares, nonfinite, selected, valid = totals[-6:]
        diagnostics = {"weight_selected_fraction": selected / max(valid, 1)}
        if count:
            mean = total / count
            std = math.sqrt(max(squares / count - mean**2, 0.0))
            diagnostics |= {"score_mean": mean, "score_std": std, "score_nonfinite": nonfinite}
        return totals[0], head_ce, totals[1 + 2 * n], diagnostics

    def weight_stats(self, config: WeightingConfig) -> dict:
        """`weighting.weight_stats` over every valid (token, head) weight of the step."""
        values = (
            torch.cat([w[b.valid] for b, w in self.weights]) if self.weights else torch.zeros(0)
        )
        normalised = config.algo != "baseline" and not (
            config.algo == "rho1-wmtp" and config.rho1.mode == "select"
        )
        lo, hi = (config.min_weight, config.max_weight) if normalised else (None, None)
        everything = torch.ones_like(values, dtype=torch.bool)
        return weight_stats(values, everything, lo, hi, hist_max=config.max_weight)


def step_metrics(
    loss: float,
    lr: float,
    grad_norm: float,
    tokens: float,
    seconds: float,
    flops_per_token: float,
    peak_flops: float,
    head_ce: list[float],
    *extra: dict,
) -> dict[str, float]:
    """The step's logged numbers: loss, LR, gradient norm, throughput and MFU, CE per head, and
    the `extra` dicts (weight statistics, score diagnostics)."""
    metrics = {
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens_per_s": tokens / seconds,
        "step_time_s": seconds,
        "mfu": flops_per_token * tokens / seconds / peak_flops,
    }
    for more in extra:
        metrics |= more
    return metrics | {f"ce_head{k}": ce for k, ce in enumerate(head_ce)}


def clip_gradients(model: nn.Module, max_norm: float, use_fsdp: bool) -> float:
    """Averages the replicated heads' gradients over ranks (FSDP), then clips the global norm."""
    if use_fsdp:
        all_reduce_replicated_grads(replicated_parameters(model))
    return clip_grad_norm(list(model.parameters()), max_norm)


def is_finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


@torch.no_grad()
def validation_loss(
    model: Transformer,
    loader: TrainLoader,
    train: TrainSection,
    dtype: torch.dtype,
    info: DistInfo,
    isolate_samples: bool = False,
) -> dict[str, float]:
    """Unweighted CE per head over `train.eval_batches` validation batches (all ranks), head 0 =
    val_loss."""
    n_batches, chunk = train.eval_batches, train.ce_chunk_size
    n_heads = loader.config.n_heads
    sums, counts = [0.0] * n_heads, [0.0] * n_heads
    model.eval()
    for _ in range(n_batches):
        batch = loader.next_batch().to(info.device)
        segments = batch.segment_ids if isolate_samples else None
        with autocast(info.device, dtype):
            h = model(batch.tokens, return_trunk=True, segment_ids=segments)
            for k in range(n_heads):
                z = model.head_hidden(h, k, segment_ids=segments)
                ce = chunked_head_ce(model, z, batch.labels[..., k], chunk)
                sums[k] += float(ce.sum())
                counts[k] += float((batch.labels[..., k] != IGNORE_INDEX).sum())
    model.train()
    totals = all_reduce_sum(sums + counts, info)
    ce = [totals[k] / max(totals[n_heads + k], 1) for k in range(n_heads)]
    return {"val_loss": ce[0], **{f"val_ce_head{k}": ce[k] for k in range(n_heads)}}

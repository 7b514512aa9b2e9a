"""Pieces of one optimizer step that the loop in train_wmtp.py calls by name: the step's global
target counts, the running totals of its micro-batches, gradient clipping, validation loss."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from data.loader import IGNORE_INDEX, Batch, TrainLoader
from model.transformer import Transformer
from training.distributed import DistInfo, all_reduce_sum
from training.loss import MTPLossResult, autocast, chunked_head_ce
from training.parallel import all_reduce_replicated_grads, clip_grad_norm, replicated_parameters
from weighting import WeightingConfig, weight_stats


def global_target_counts(batches: list[Batch], n_heads: int, info: DistInfo) -> list[float]:
    """N_k: head k's target tokens over the whole optimizer step (all micro-batches and ranks)."""
    local = [
        float(sum((b.labels[..., k] != IGNORE_INDEX).sum() for b in batches))
        for k in range(n_heads)
    ]
    return all_reduce_sum(local, info)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


@dataclass
class StepTotals:
    """Sums over the micro-batches of one optimizer step (this rank), and their weights."""

    n_heads: int
    loss: float = 0.0
    ce_sum: list[float] = field(default_factory=list)
    ce_count: list[int] = field(default_factory=list)
    tokens: int = 0  # non-padding tokens
    weights: list[tuple[Batch, torch.Tensor]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ce_sum, self.ce_count = [0.0] * self.n_heads, [0] * self.n_heads

    def add(self, batch: Batch, weights: torch.Tensor, result: MTPLossResult) -> None:
        self.loss += result.loss
        for k in range(self.n_heads):
            self.ce_sum[k] += result.ce_sum[k]
            self.ce_count[k] += result.ce_count[k]
        self.tokens += int((batch.segment_ids >= 0).sum())
        self.weights.append((batch, weights))

    def reduce(self, info: DistInfo) -> tuple[float, list[float], float]:
        """(step loss, unweighted CE per head, tokens) summed over ranks."""
        totals = all_reduce_sum([self.loss, *self.ce_sum, *self.ce_count, float(self.tokens)], info)
        n = self.n_heads
        head_ce = [totals[1 + k] / max(totals[1 + n + k], 1) for k in range(n)]
        return totals[0], head_ce, totals[-1]

    def weight_stats(self, config: WeightingConfig) -> dict:
        """`weighting.weight_stats` over every valid (token, head) weight of the step."""
        values = (
            torch.cat([w[b.valid] for b, w in self.weights]) if self.weights else torch.zeros(0)
        )
        clip_max = config.max_weight if config.algo != "baseline" else None
        everything = torch.ones_like(values, dtype=torch.bool)
        return weight_stats(
            values, everything, config.min_weight, clip_max, hist_max=config.max_weight
        )


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
    n_batches: int,
    chunk: int,
    dtype: torch.dtype,
    info: DistInfo,
) -> dict[str, float]:
    """Unweighted CE per head over `n_batches` validation batches (all ranks), head 0 = val_loss."""
    n_heads = loader.config.n_heads
    sums, counts = [0.0] * n_heads, [0.0] * n_heads
    model.eval()
    for _ in range(n_batches):
        batch = loader.next_batch().to(info.device)
        with autocast(info.device, dtype):
            h = model(batch.tokens, return_trunk=True)
            for k in range(n_heads):
                z = model.head_hidden(h, k)
                ce = chunked_head_ce(model, z, batch.labels[..., k], chunk)
                sums[k] += float(ce.sum())
                counts[k] += float((batch.labels[..., k] != IGNORE_INDEX).sum())
    model.train()
    totals = all_reduce_sum(sums + counts, info)
    ce = [totals[k] / max(totals[n_heads + k], 1) for k in range(n_heads)]
    return {"val_loss": ce[0], **{f"val_ce_head{k}": ce[k] for k in range(n_heads)}}

"""Memory-efficient weighted MTP loss: one head's logits alive at a time, CE chunked over the sequence.

    h = trunk(x)                      (graph kept)
    for head k:                       (h detached, grads collected in h_d.grad)
        z_k = head_k(h_d)             (graph kept until this head's backward)
        for each sequence chunk c:    logits_c = output(z_k[c]) → λ_k · Σ w·CE / N_k → backward
        z_k.backward(z_k_d.grad)
    h.backward(h_d.grad)

Loss = Σ_k λ_k · Σ_t w_{t,k} CE_{t,k} / N_k, where N_k counts head k's target tokens over the
whole optimizer step (all micro-batches, all ranks), so accumulation and data parallelism give
the same update as one big batch. Gradients equal the naive all-heads computation (tested).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from data.loader import IGNORE_INDEX
from model.transformer import Transformer

# (head index, base CE of that head (bsz, seq) or None) -> weights (bsz, seq), 0 where no target
HeadWeightsFn = Callable[[int, torch.Tensor | None], torch.Tensor]


@dataclass
class MTPLossResult:
    loss: float = 0.0  # this micro-batch's share of the step loss
    ce_sum: list[float] = field(default_factory=list)  # unweighted CE summed per head
    ce_count: list[int] = field(default_factory=list)
    weights: list[torch.Tensor] = field(default_factory=list)  # (bsz, seq) per head, detached


def chunk_bounds(seq_len: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk, seq_len)) for s in range(0, seq_len, chunk)]


def token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token CE in float32 (bsz, n); 0 where the label is IGNORE_INDEX."""
    ce = F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return ce.view(labels.shape)


@torch.no_grad()
def chunked_head_ce(
    model: Transformer, hidden: torch.Tensor, labels: torch.Tensor, chunk: int
) -> torch.Tensor:
    """CE of one head for every position (bsz, seq), built chunk by chunk."""
    return torch.cat(
        [
            token_ce(model.output(hidden[:, s:e]), labels[:, s:e])
            for s, e in chunk_bounds(hidden.shape[1], chunk)
        ],
        dim=1,
    )


def sequential_mtp_backward(
    model: Transformer,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    head_weights: list[float],
    weights_fn: HeadWeightsFn,
    denominators: list[float],
    chunk: int,
    needs_base_ce: bool = False,
    loss_scale: float = 1.0,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    trunk_hook: Callable[[torch.Tensor], None] | None = None,
) -> MTPLossResult:
    """Runs forward and backward for one micro-batch; gradients accumulate in the parameters.

    Args:
        labels: (bsz, seq, n_heads), IGNORE_INDEX where a head has no target.
        head_weights: λ_k per head.
        weights_fn: token weights of head k (see HeadWeightsFn).
        denominators: N_k, target tokens of head k over the whole optimizer step.
        needs_base_ce: compute head k's CE before its weights (rho1-wmtp).
        loss_scale: multiplies the loss (e.g. world size, when the gradient reduction averages).
        trunk_hook: called with the detached trunk output (critic values, say).
    """
    result = MTPLossResult()
    with autocast():
        h = model(tokens, return_trunk=True)
    h_d = h.detach().requires_grad_(True)
    if trunk_hook is not None:
        trunk_hook(h_d.detach())
    for k, lam in enumerate(head_weights):
        labels_k = labels[..., k]
        with autocast():
            z = model.head_hidden(h_d, k)
        z_d = z.detach().requires_grad_(True)
        base_ce = chunked_head_ce(model, z_d, labels_k, chunk) if needs_base_ce else None
        w = weights_fn(k, base_ce).detach()
        result.weights.append(w)
        ce_sum, count = 0.0, int((labels_k != IGNORE_INDEX).sum())
        for s, e in chunk_bounds(tokens.shape[1], chunk):
            with autocast():
                logits = model.output(z_d[:, s:e])
            ce = token_ce(logits, labels_k[:, s:e])
            scale = lam * loss_scale / max(denominators[k], 1.0)
            chunk_loss = (w[:, s:e] * ce).sum() * scale
            if lam > 0 and chunk_loss.requires_grad:
                chunk_loss.backward()
            result.loss += chunk_loss.item() / loss_scale
            ce_sum += ce.detach().sum().item()
        result.ce_sum.append(ce_sum)
        result.ce_count.append(count)
        if z_d.grad is not None:
            z.backward(z_d.grad)
    if h_d.grad is not None:
        h.backward(h_d.grad)
    return result


def naive_mtp_loss(
    model: Transformer,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    head_weights: list[float],
    weights: torch.Tensor,
    denominators: list[float],
) -> torch.Tensor:
    """Reference: all heads' full logits at once, one graph. weights: (bsz, seq, n_heads)."""
    logits = model(tokens)
    total = logits.new_zeros(())
    for k, lam in enumerate(head_weights):
        ce = token_ce(logits[:, :, k], labels[..., k])
        total = total + lam * (weights[..., k] * ce).sum() / max(denominators[k], 1.0)
    return total

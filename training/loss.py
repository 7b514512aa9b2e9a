"""Memory-efficient weighted MTP loss: one head's logits alive at a time, CE chunked over the sequence.

    h = trunk(x)                       (computed by the caller, graph kept)
    for head k:                        (h detached, grads collected in h_d.grad)
        z_k = head_k(h_d)              (graph kept until this head's backward)
        for each chunk c of the positions that have a target:
            logits_c = output(z_k[c]) → λ_k · Σ w·CE / N_k → backward
        z_k.backward(z_k_d.grad)
    h.backward(h_d.grad)

The vocabulary projection runs only at positions with a target (a prompt's positions have none,
and in instruction data they are most of the row), `chunk` rows per sequence row at a time.

Loss = Σ_k λ_k · Σ_t w_{t,k} CE_{t,k} / N_k, where N_k counts head k's target tokens over the
whole optimizer step (all micro-batches, all ranks), so accumulation and data parallelism give
the same update as one big batch. Gradients equal the naive all-heads computation (tested).
Everything here is a function of tensors: token weights are computed before the call.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from data.loader import IGNORE_INDEX
from model.transformer import Transformer


@dataclass
class MTPLossResult:
    loss: float = 0.0  # this micro-batch's share of the step loss
    ce_sum: list[float] = field(default_factory=list)  # unweighted CE summed per head
    ce_count: list[int] = field(default_factory=list)


def chunk_bounds(seq_len: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk, seq_len)) for s in range(0, seq_len, chunk)]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """bf16 autocast for reduced-precision compute; nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token CE in float32, shaped like `labels`; 0 where the label is IGNORE_INDEX."""
    ce = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return ce.view(labels.shape)


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices (into bsz·seq) of the positions whose label is a target."""
    return (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)


@torch.no_grad()
def chunked_head_ce(
    model: Transformer, hidden: torch.Tensor, labels: torch.Tensor, chunk: int
) -> torch.Tensor:
    """CE of one head (bsz, seq), 0 where there is no target; the vocabulary projection runs
    only at target positions, `chunk` × bsz of them at a time."""
    ce = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    rows = target_positions(labels)
    flat_hidden, flat_labels, flat_ce = hidden.flatten(0, 1), labels.reshape(-1), ce.view(-1)
    for s, e in chunk_bounds(rows.numel(), chunk * labels.shape[0]):
        at = rows[s:e]
        flat_ce[at] = token_ce(model.output(flat_hidden[at]), flat_labels[at])
    return ce


def mtp_loss_backward(
    model: Transformer,
    trunk: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    head_weights: list[float],
    n_targets: list[float],
    chunk: int,
    loss_scale: float = 1.0,
    compute_dtype: torch.dtype = torch.float32,
    segment_ids: torch.Tensor | None = None,
) -> MTPLossResult:
    """Runs every head's forward and the whole backward for one micro-batch.

    Gradients accumulate in the parameters; nothing is returned that holds a graph.

    Args:
        trunk: the trunk output `model(tokens, return_trunk=True)`, with its graph.
        labels: (bsz, seq, n_heads), IGNORE_INDEX where a head has no target.
        weights: (bsz, seq, n_heads) token weights (detached), 0 where there is no target.
        head_weights: λ_k per head.
        n_targets: N_k, target tokens of head k over the whole optimizer step.
        loss_scale: multiplies the loss (e.g. world size, when the gradient reduction averages).
        compute_dtype: autocast dtype of the heads and the output projection.
        segment_ids: the trunk's segment ids (packed rows), so the head blocks isolate them too.
    """
    result = MTPLossResult()
    weights = weights.detach()
    h_d = trunk.detach().requires_grad_(True)
    for k, lam in enumerate(head_weights):
        labels_k = labels[..., k]
        with autocast(trunk.device, compute_dtype):
            z = model.head_hidden(h_d, k, segment_ids=segment_ids)
        z_d = z.detach().requires_grad_(True)
        rows = target_positions(labels_k)
        flat_z, flat_labels = z_d.flatten(0, 1), labels_k.reshape(-1)
        flat_weights = weights[..., k].reshape(-1)
        ce_sum, count = 0.0, rows.numel()
        scale = lam * loss_scale / max(n_targets[k], 1.0)
        for s, e in chunk_bounds(count, chunk * labels.shape[0]):
            at = rows[s:e]
            with autocast(trunk.device, compute_dtype):
                logits = model.output(flat_z[at])
            ce = token_ce(logits, flat_labels[at])
            chunk_loss = (flat_weights[at] * ce).sum() * scale
            if lam > 0 and chunk_loss.requires_grad:
                chunk_loss.backward()
            result.loss += chunk_loss.item() / loss_scale
            ce_sum += ce.detach().sum().item()
        result.ce_sum.append(ce_sum)
        result.ce_count.append(count)
        if z_d.grad is not None:
            z.backward(z_d.grad)
    # always a backward through the trunk: sharded blocks reduce gradients collectively, so a
    # rank whose micro-batch has no target at all must still take part (with zero gradients)
    trunk.backward(h_d.grad if h_d.grad is not None else torch.zeros_like(trunk))
    return result


def naive_mtp_loss(
    model: Transformer,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    head_weights: list[float],
    weights: torch.Tensor,
    n_targets: list[float],
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference: all heads' full logits at once, one graph. weights: (bsz, seq, n_heads)."""
    logits = model(tokens, segment_ids=segment_ids)
    total = logits.new_zeros(())
    for k, lam in enumerate(head_weights):
        ce = token_ce(logits[:, :, k], labels[..., k])
        total = total + lam * (weights[..., k] * ce).sum() / max(n_targets[k], 1.0)
    return total

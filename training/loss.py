"""Memory-efficient weighted MTP loss: one head's logits alive at a time, CE chunked over the sequence.

    h = trunk(x)                       (computed by the caller, graph kept)
    for head k:                        (h detached, grads collected in h_d.grad)
        z_k = head_k(h_d)              (graph kept until this head's backward)
        for each chunk c of the positions that have a target:
            logits_c = output(z_k[c]) → λ_k · Σ w·CE / N_k → backward
        z_k.backward(z_k_d.grad)
    h.backward(h_d.grad)

The vocabulary projection runs only at positions with a target (a prompt's positions have none,
and in instruction data they are most of the row), `chunk` rows per sequence row at a time. The
positions come from the loader (`Batch.targets`), known on the host: nothing here reads a device
value, so the step never waits for the GPU.

Loss = Σ_k λ_k · Σ_t w_{t,k} CE_{t,k} / N_k, where N_k counts head k's target tokens over the
whole optimizer step (all micro-batches, all ranks), so accumulation and data parallelism give
the same update as one big batch. Gradients equal the naive all-heads computation (tested).
Everything here is a function of tensors: token weights are computed before the call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data.loader import IGNORE_INDEX
from model.transformer import Transformer
from runtime.precision import autocast


@dataclass
class MTPLossResult:
    loss: torch.Tensor  # float64 0-dim: this micro-batch's share of the step loss
    ce_sum: torch.Tensor  # float64 (n_heads,): unweighted CE summed per head


def chunk_bounds(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token CE in float32, shaped like `labels`; 0 where the label is IGNORE_INDEX."""
    ce = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return ce.view(labels.shape)


def target_positions(labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per head, the flat positions (into bsz·seq) whose label is a target. Reads the labels'
    values (a host sync on a GPU): the training step uses the loader's `Batch.targets`."""
    flat = labels.flatten(0, 1)
    return tuple((flat[:, k] != IGNORE_INDEX).nonzero().squeeze(1) for k in range(flat.shape[1]))


def chunked_head_ce(
    model: Transformer,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    positions: torch.Tensor,
    chunk: int,
    compute_dtype: torch.dtype = torch.float32,
    weights: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One head's CE at `positions` (flat, into bsz·seq), projected to the vocabulary `chunk` ×
    bsz positions at a time. With `weights` (flat, bsz·seq) and `scale` (λ_k / N_k), each
    chunk's scale · Σ w·CE is back-propagated into `hidden` as soon as it is made, so only one
    chunk's logits are ever alive.

    Returns the detached CE at `positions` and the summed (scaled, weighted) loss, float64.
    """
    flat_hidden, flat_labels = hidden.flatten(0, 1), labels.reshape(-1)
    parts, loss = [], torch.zeros((), dtype=torch.float64, device=hidden.device)
    for s, e in chunk_bounds(positions.shape[0], chunk * labels.shape[0]):
        at = positions[s:e]
        with autocast(hidden.device, compute_dtype):
            logits = model.output(flat_hidden[at])
        ce = token_ce(logits, flat_labels[at])
        if weights is not None:
            chunk_loss = (weights[at] * ce).sum() * scale
            if chunk_loss.requires_grad:
                chunk_loss.backward()
            loss = loss + chunk_loss.detach().double()
        parts.append(ce.detach())
    ce = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    return ce, loss


@torch.no_grad()
def head_ce_map(
    model: Transformer,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    positions: torch.Tensor,
    chunk: int,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """One head's CE as a (bsz, seq) map, 0 where it has no target."""
    ce, _ = chunked_head_ce(model, hidden, labels, positions, chunk, compute_dtype)
    flat = torch.zeros(labels.numel(), dtype=torch.float32, device=labels.device)
    return flat.index_copy(0, positions, ce).view(labels.shape)


def mtp_loss_backward(
    model: Transformer,
    trunk: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    head_weights: Sequence[float],
    n_targets: torch.Tensor | Sequence[float],
    chunk: int,
    loss_scale: float = 1.0,
    compute_dtype: torch.dtype = torch.float32,
    segment_ids: torch.Tensor | None = None,
    targets: Sequence[torch.Tensor] | None = None,
) -> MTPLossResult:
    """Runs every head's forward and the whole backward for one micro-batch.

    Gradients accumulate in the parameters; nothing is returned that holds a graph.

    Args:
        trunk: the trunk output `model(tokens, return_trunk=True)`, with its graph.
        labels: (bsz, seq, n_heads), IGNORE_INDEX where a head has no target.
        weights: (bsz, seq, n_heads) token weights (detached), 0 where there is no target.
        head_weights: λ_k per head.
        n_targets: N_k (n_heads,), target tokens of head k over the whole optimizer step.
        loss_scale: multiplies the loss (e.g. world size, when the gradient reduction averages).
        compute_dtype: autocast dtype of the heads and the output projection.
        segment_ids: the trunk's segment ids (packed rows), so the head blocks isolate them too.
        targets: per head, the flat target positions (`Batch.targets`); found from `labels`
            when not given.
    """
    targets = target_positions(labels) if targets is None else targets
    counts = torch.as_tensor(n_targets, dtype=torch.float64, device=trunk.device)
    weights = weights.detach()
    h_d = trunk.detach().requires_grad_(True)
    loss = torch.zeros((), dtype=torch.float64, device=trunk.device)
    ce_sums = []
    for k, lam in enumerate(head_weights):
        with autocast(trunk.device, compute_dtype):
            z = model.head_hidden(h_d, k, segment_ids=segment_ids)
        z_d = z.detach().requires_grad_(True)
        scale = ((lam * loss_scale) / counts[k].clamp(min=1.0)).float()
        ce, head_loss = chunked_head_ce(
            model, z_d, labels[..., k], targets[k], chunk, compute_dtype,
            weights[..., k].reshape(-1), scale,
        )  # fmt: skip
        loss = loss + head_loss / loss_scale
        ce_sums.append(ce.double().sum())
        if z_d.grad is not None:
            z.backward(z_d.grad)
    # always a backward through the trunk: sharded blocks reduce gradients collectively, so a
    # rank whose micro-batch has no target at all must still take part (with zero gradients)
    trunk.backward(h_d.grad if h_d.grad is not None else torch.zeros_like(trunk))
    return MTPLossResult(loss, torch.stack(ce_sums))


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

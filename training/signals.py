"""The per-token signals weighters read, each computed by one explicit call in the loop:
the policy's own CE (rho1-wmtp), the reference CE (rho1-wmtp), the critic's TD errors
(critic-wmtp). All run without gradients on the detached trunk output."""

from __future__ import annotations

import torch

from data.loader import Batch
from model.transformer import Transformer
from training.loss import autocast, chunked_head_ce
from training.reference import ReferenceCEStore, reference_next_token_ce
from weighting import ValueHead, align_to_heads, td_errors, terminal_rewards
from weighting.config import CriticConfig


@torch.no_grad()
def policy_head_ce(
    model: Transformer, trunk: torch.Tensor, labels: torch.Tensor, chunk: int, dtype: torch.dtype
) -> torch.Tensor:
    """(bsz, seq, n_heads): CE of each head's own target token, 0 where it has none."""
    per_head = []
    for k in range(labels.shape[-1]):
        with autocast(trunk.device, dtype):
            z = model.head_hidden(trunk, k)
        per_head.append(chunked_head_ce(model, z, labels[..., k], chunk))
    return torch.stack(per_head, dim=-1)


@torch.no_grad()
def reference_ce(
    batch: Batch,
    n_heads: int,
    chunk: int,
    dtype: torch.dtype,
    reference: Transformer | None = None,
    store: ReferenceCEStore | None = None,
) -> torch.Tensor:
    """(bsz, seq, n_heads): the reference's CE of each head's target token.

    From a forward of `reference`, or from the precomputed `store` (one entry per sample, laid
    out at the sample's positions in the row).
    """
    if store is not None:
        ce = torch.full(batch.tokens.shape, float("nan"))
        for b, ids in enumerate(batch.sample_ids):
            for seg, sid in enumerate(ids):
                pos = (batch.segment_ids[b] == seg).nonzero().flatten().cpu()
                values = store.get(sid)[: len(pos) - 1]
                ce[b, pos[: len(values)]] = values
        ce = ce.to(batch.tokens.device)
    else:
        with autocast(batch.tokens.device, dtype):
            ce = reference_next_token_ce(reference, batch.tokens, chunk)
    return align_to_heads(ce, n_heads)


@torch.no_grad()
def critic_td_errors(
    value_head: ValueHead, trunk: torch.Tensor, batch: Batch, critic: CriticConfig, n_heads: int
) -> torch.Tensor:
    """(bsz, seq, n_heads): TD errors of the (frozen) value head, aligned to the heads."""
    response = batch.valid[..., 0]
    values = value_head(trunk)
    rewards = terminal_rewards(response, batch.token_is_correct, critic)
    delta = td_errors(rewards, values, response, critic.gamma)
    return align_to_heads(delta, n_heads, fill=0.0)

"""The Rho-1 reference's per-token CE by a forward of the reference (the precomputed store is
`data.reference_ce`, read by the loader)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.transformer import Transformer


@torch.no_grad()
def reference_next_token_ce(
    reference: Transformer,
    tokens: torch.Tensor,
    chunk_size: int = 512,
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """CE of the reference's next-token head: out[b, t] = −log p(tokens[b, t+1] | tokens[b, :t+1]).

    With `segment_ids` the context is the token's own sample only (packed rows). The last
    position has no target and is NaN. Logits are built `chunk_size` positions at a time so a
    32000-word vocabulary never needs (bsz, seq, vocab) floats at once.
    """
    trunk = reference(tokens, return_trunk=True, segment_ids=segment_ids)
    hidden = reference.head_hidden(trunk, 0, segment_ids=segment_ids)
    bsz, seq = tokens.shape
    ce = torch.full((bsz, seq), float("nan"), device=tokens.device)
    for start in range(0, seq - 1, chunk_size):
        end = min(start + chunk_size, seq - 1)
        logits = reference.output(hidden[:, start:end]).float()
        targets = tokens[:, start + 1 : end + 1]
        ce[:, start:end] = F.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), reduction="none"
        ).view(bsz, end - start)
    return ce

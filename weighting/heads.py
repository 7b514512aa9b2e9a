"""Aligning per-target-token quantities to the MTP heads.

Position t of head k predicts token t+k+1. A next-token quantity `q[t]` is about token t+1
(predicted from position t), so head k at position t needs `q[t+k]`; positions whose target
lies past the sequence end have none.
"""

from __future__ import annotations

import torch


def align_to_heads(
    next_token_values: torch.Tensor, n_heads: int, fill: float = float("nan")
) -> torch.Tensor:
    """(bsz, seq) next-token values → (bsz, seq, n_heads); out-of-range targets get `fill`."""
    bsz, seq = next_token_values.shape
    out = next_token_values.new_full((bsz, seq, n_heads), fill)
    for k in range(n_heads):
        out[:, : seq - k, k] = next_token_values[:, k:]
    return out

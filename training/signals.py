"""The per-token signals weighters read (`weighting.inputs.SIGNALS`), computed without gradients
on the detached trunk output by one explicit call in the step (`Signals.inputs`):

    policy_token_ce   the policy's next-token CE of each target token, aligned to the heads
    policy_head_ce    each head's own CE of its target token
    reference_ce      the Rho-1 reference's CE: the loader's precomputed `Batch.ref_ce`, or a
                      forward of the reference model
    td_error          the critic's TD errors from the value head on the trunk

`training.run` builds the object in one call, with exactly the sources the weighter needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from data.loader import Batch
from model.transformer import Transformer
from runtime.precision import autocast
from training.critic import Critic
from training.loss import head_ce_map
from training.reference import reference_next_token_ce
from weighting import Signal, WeightingInputs, align_to_heads


@torch.no_grad()
def policy_head_ce(
    model: Transformer,
    trunk: torch.Tensor,
    batch: Batch,
    chunk: int,
    dtype: torch.dtype,
    segment_ids: torch.Tensor | None = None,
    heads: int | None = None,
) -> torch.Tensor:
    """(bsz, seq, heads): CE of the first `heads` heads' own target tokens, 0 where none."""
    per_head = []
    for k in range(heads or batch.labels.shape[-1]):
        with autocast(trunk.device, dtype):
            z = model.head_hidden(trunk, k, segment_ids=segment_ids)
        per_head.append(head_ce_map(model, z, batch.labels[..., k], batch.targets[k], chunk, dtype))
    return torch.stack(per_head, dim=-1)


@dataclass(frozen=True)
class Signals:
    """Where this run's weighting signals come from.

    Attributes:
        needs: the signals `inputs` computes (the weighter's `needs`).
        isolate_samples: pass the batch's segment ids to every forward (packed rows).
        reference: the online Rho-1 reference (None: precomputed, on the batch, or not needed).
        critic: the value head and its training (critic-wmtp).
    """

    model: Transformer
    needs: tuple[Signal, ...]
    n_heads: int
    chunk: int
    dtype: torch.dtype
    isolate_samples: bool
    reference: Transformer | None = None
    critic: Critic | None = None

    def segments(self, batch: Batch) -> torch.Tensor | None:
        return batch.segment_ids if self.isolate_samples else None

    @torch.no_grad()
    def inputs(self, batch: Batch, trunk: torch.Tensor) -> WeightingInputs:
        """The `WeightingInputs` of one micro-batch: exactly the signals in `needs`."""
        inputs = WeightingInputs(batch.valid)
        if "policy_token_ce" in self.needs:
            inputs.policy_token_ce = self.policy_token_ce(batch, trunk)
        if "policy_head_ce" in self.needs:
            inputs.policy_head_ce = policy_head_ce(
                self.model, trunk, batch, self.chunk, self.dtype, self.segments(batch)
            )
        if "reference_ce" in self.needs:
            inputs.reference_ce = self.reference_ce(batch)
        if "td_error" in self.needs:
            inputs.td_error = self.td_errors(batch, trunk)
        return inputs

    def policy_token_ce(self, batch: Batch, trunk: torch.Tensor) -> torch.Tensor:
        """Head 0's CE of each target token, aligned to every head that predicts that token."""
        ce = policy_head_ce(
            self.model, trunk, batch, self.chunk, self.dtype, self.segments(batch), heads=1
        )
        head0 = torch.where(batch.valid[..., 0], ce[..., 0], torch.nan)
        return align_to_heads(head0, self.n_heads)

    def reference_ce(self, batch: Batch) -> torch.Tensor:
        """(bsz, seq, n_heads): the reference's CE of each head's target token, precomputed on
        the batch (each sample scored alone) or from a forward of the reference."""
        if batch.ref_ce is not None:
            return align_to_heads(batch.ref_ce, self.n_heads)
        if self.reference is None:
            raise ValueError("reference_ce needs model.reference or precomputed reference CE")
        with autocast(batch.tokens.device, self.dtype):
            ce = reference_next_token_ce(
                self.reference, batch.tokens, self.chunk, self.segments(batch)
            )
        return align_to_heads(ce, self.n_heads)

    def td_errors(self, batch: Batch, trunk: torch.Tensor) -> torch.Tensor:
        """(bsz, seq, n_heads): TD errors of the value head, aligned to the heads (zeros from a
        critic that fell back to uniform weights: every token then weighs the same)."""
        return align_to_heads(self.critic.td_errors(trunk, batch), self.n_heads, fill=0.0)

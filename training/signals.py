"""The per-token signals weighters read, computed without gradients on the detached trunk
output by one explicit call in the loop (`Signals.inputs`): the policy's own CE (rho1-wmtp),
the reference CE (rho1-wmtp), the critic's TD errors (critic-wmtp)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from data.loader import Batch
from model.transformer import Transformer
from training.loss import autocast, chunked_head_ce
from training.recipe import Recipe
from training.reference import ReferenceCEStore, reference_next_token_ce
from weighting import ValueHead, WeightingInputs, align_to_heads, td_errors, terminal_rewards
from weighting.config import CriticConfig


@torch.no_grad()
def policy_head_ce(
    model: Transformer,
    trunk: torch.Tensor,
    labels: torch.Tensor,
    chunk: int,
    dtype: torch.dtype,
    segment_ids: torch.Tensor | None = None,
    heads: int | None = None,
) -> torch.Tensor:
    """(bsz, seq, heads): CE of the first `heads` heads' own target tokens, 0 where none."""
    per_head = []
    for k in range(heads or labels.shape[-1]):
        with autocast(trunk.device, dtype):
            z = model.head_hidden(trunk, k, segment_ids=segment_ids)
        per_head.append(chunked_head_ce(model, z, labels[..., k], chunk))
    return torch.stack(per_head, dim=-1)


@dataclass
class Signals:
    """Where this run's weighting signals come from.

    Attributes:
        isolate_samples: pass the batch's segment ids to every forward (packed rows).
        score: rho1's policy CE: `token` (head 0's CE of each target token, aligned to every
            head that predicts it, as the reference CE is) or `head` (each head's own CE).
    """

    model: Transformer
    n_heads: int
    chunk: int
    dtype: torch.dtype
    isolate_samples: bool
    score: str = "token"
    reference: Transformer | None = None
    store: ReferenceCEStore | None = None
    value_head: ValueHead | None = None
    critic: CriticConfig | None = None

    @classmethod
    def for_recipe(
        cls, model: Transformer, n_heads: int, dtype: torch.dtype, recipe: Recipe
    ) -> Signals:
        """Signals of the policy `model`; the reference, store and value head are set later."""
        return cls(
            model,
            n_heads,
            recipe.train.ce_chunk_size,
            dtype,
            isolate_samples=recipe.data.pack,
            score=recipe.weighting.rho1.score,
            critic=recipe.weighting.critic,
        )

    def segments(self, batch: Batch) -> torch.Tensor | None:
        return batch.segment_ids if self.isolate_samples else None

    @torch.no_grad()
    def inputs(self, needs: tuple[str, ...], batch: Batch, trunk: torch.Tensor) -> WeightingInputs:
        """The `WeightingInputs` a weighter with these `needs` reads, for one micro-batch."""
        inputs = WeightingInputs(batch.valid)
        if "base_ce" in needs:
            inputs.base_ce = self.policy_ce(batch, trunk)
        if "ref_ce" in needs:
            inputs.ref_ce = self.reference_ce(batch)
        if "td_error" in needs:
            inputs.td_error = self.td_errors(batch, trunk)
        return inputs

    def policy_ce(self, batch: Batch, trunk: torch.Tensor) -> torch.Tensor:
        """(bsz, seq, n_heads): the policy's CE of each head's target token."""
        heads = 1 if self.score == "token" else self.n_heads
        ce = policy_head_ce(
            self.model, trunk, batch.labels, self.chunk, self.dtype, self.segments(batch), heads
        )
        if self.score == "head":
            return ce
        head0 = torch.where(batch.valid[..., 0], ce[..., 0], torch.nan)
        return align_to_heads(head0, self.n_heads)

    def reference_ce(self, batch: Batch) -> torch.Tensor:
        """(bsz, seq, n_heads): the reference's CE of each head's target token, from a forward
        of the reference or from the precomputed store (each sample scored alone)."""
        if self.store is not None:
            ce = torch.full(batch.tokens.shape, float("nan"))
            for b, ids in enumerate(batch.sample_ids):
                for seg, sid in enumerate(ids):
                    pos = (batch.segment_ids[b] == seg).nonzero().flatten().cpu()
                    values = self.store.get(sid)[: len(pos) - 1]
                    ce[b, pos[: len(values)]] = values
            ce = ce.to(batch.tokens.device)
        else:
            with autocast(batch.tokens.device, self.dtype):
                ce = reference_next_token_ce(
                    self.reference, batch.tokens, self.chunk, self.segments(batch)
                )
        return align_to_heads(ce, self.n_heads)

    def td_errors(self, batch: Batch, trunk: torch.Tensor) -> torch.Tensor:
        """(bsz, seq, n_heads): TD errors of the frozen value head, aligned to the heads."""
        response = batch.valid[..., 0]
        values = self.value_head(trunk)
        rewards = terminal_rewards(response, batch.token_is_correct, self.critic)
        delta = td_errors(rewards, values, response, self.critic.gamma)
        return align_to_heads(delta, self.n_heads, fill=0.0)

"""Evaluation during training: the validation loss (unweighted CE per head) every
`train.eval_every` steps — and once before the first step, where fine-tuning starts from —,
critic-wmtp's explained variance with it (so that a value head drifting from the trunk shows),
and pass@1 by execution every `train.eval_pass_every` steps."""

from __future__ import annotations

import torch

from data.loader import TrainLoader
from runtime.precision import autocast
from training.critic import explained_variance
from training.distributed import DistInfo, all_reduce_sum
from training.execution_eval import PassAtOne, tracked_name
from training.loss import chunked_head_ce
from training.recipe import TrainSection
from training.run import Run


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module,
    loader: TrainLoader,
    train: TrainSection,
    dtype: torch.dtype,
    info: DistInfo,
    isolate_samples: bool = False,
) -> dict[str, float]:
    """Unweighted CE per head over `train.eval_batches` validation batches (all ranks), head 0 =
    val_loss."""
    n_heads = loader.config.n_heads
    sums, counts = [0.0] * n_heads, [0.0] * n_heads
    model.eval()
    for _ in range(train.eval_batches):
        batch = loader.next_batch().to(info.device)
        segments = batch.segment_ids if isolate_samples else None
        with autocast(info.device, dtype):
            h = model(batch.tokens, return_trunk=True, segment_ids=segments)
        for k in range(n_heads):
            with autocast(info.device, dtype):
                z = model.head_hidden(h, k, segment_ids=segments)
            ce, _ = chunked_head_ce(
                model, z, batch.labels[..., k], batch.targets[k], train.ce_chunk_size, dtype
            )
            sums[k] += float(ce.double().sum())
            counts[k] += batch.n_targets[k]
    model.train()
    totals = all_reduce_sum(sums + counts, info)
    ce = [totals[k] / max(totals[n_heads + k], 1) for k in range(n_heads)]
    return {"val_loss": ce[0], **{f"val_ce_head{k}": ce[k] for k in range(n_heads)}}


class Validation:
    """`validation(model, step)` → the evaluations due at `step` ({} when none): `val_loss`,
    `val_ce_head{k}`, `critic_explained_variance` (critic-wmtp) and `pass@1` (with
    `eval_pass_seconds`). The validation loader is built once and rewound each time, so every
    evaluation reads the same batches."""

    def __init__(self, run: Run):
        self.run, self.train = run, run.recipe.train
        self.pass_at_1 = (
            PassAtOne(run.recipe.eval_pass, run.tokenizer, run.info, run.dtype)
            if self.train.eval_pass_every
            else None
        )

    def __call__(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        values, run = {}, self.run
        if self.train.eval_every and step % self.train.eval_every == 0 and run.validation:
            pack = run.recipe.data.pack
            loader = run.validation.rewind()
            values |= validation_loss(model, loader, self.train, run.dtype, run.info, pack)
            critic = run.signals.critic
            if critic is not None and not critic.uniform:
                values["critic_explained_variance"] = explained_variance(
                    model, critic.value_head, run.validation.rewind(), self.train.eval_batches,
                    critic.config, run.dtype, run.info, pack,
                )  # fmt: skip
        if self.pass_at_1 is not None and step > 0 and step % self.train.eval_pass_every == 0:
            values |= self.pass_at_1(model, step)
        return values


def tracked(values: dict[str, float]) -> dict[str, float]:
    """The names MLflow accepts (no '@')."""
    return {tracked_name(k): v for k, v in values.items()}

"""`Run`: what a training run computes with, built from the recipe in one call (`build_run`):
the compute dtype, the tokenizer, the parallelised model and its AdamW, the training and
validation loaders, the weighter and the signals it needs.

`step_run` builds the part of a `Run` that `train_wmtp.train_step` needs, from a model already
made (random weights, the meta device, fake tensors) and no files: the demo's calibration and the
7B planner time and trace the real step with it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from data.loader import TrainLoader
from data.reference_ce import ReferenceCEStore
from data.tokenized import cache_key
from model.args import ModelArgs
from model.tokenizer import Tokenizer
from model.transformer import Transformer
from runtime.config import EnvConfig
from runtime.precision import Precision, resolve_precision
from training.critic import build_critic
from training.distributed import DistInfo, RankCollectives
from training.recipe import Recipe
from training.setup import (
    build_loader,
    build_optimizer,
    build_training_model,
    flops_per_token,
    head_weights_for,
    load_base,
    load_reference_files,
)
from training.signals import Signals
from weighting import Collectives, Weighter, get_weighter


@dataclass
class Run:
    recipe: Recipe
    info: DistInfo
    precision: Precision
    args: ModelArgs
    model: nn.Module
    optimizer: torch.optim.Optimizer
    weighter: Weighter
    signals: Signals
    collectives: Collectives
    head_weights: list[float]
    use_fsdp: bool
    flops_per_token: float
    tokenizer: Tokenizer | None = None
    loader: TrainLoader | None = None
    validation: TrainLoader | None = None
    data_hash: str = ""

    @property
    def dtype(self) -> torch.dtype:
        return self.precision.dtype

    @property
    def extras(self) -> dict[str, tuple[nn.Module, torch.optim.Optimizer | None]]:
        """What a checkpoint holds besides the model and its optimizer."""
        critic = self.signals.critic
        return {"value_head": (critic.value_head, critic.optimizer)} if critic else {}


def step_run(
    recipe: Recipe,
    args: ModelArgs,
    model: nn.Module,
    info: DistInfo,
    precision: Precision,
    use_fsdp: bool = False,
    reference: Transformer | None = None,
    fused_optimizer: bool | None = None,
) -> Run:
    """The weighter, signals (the online `reference` when given, the critic's value head),
    optimizer and collectives of `recipe` around `model`."""
    weighter = get_weighter(recipe.weighting)
    critic = None
    if "td_error" in weighter.needs:
        critic = build_critic(args.dim, recipe.weighting.critic, info)
    signals = Signals(
        model,
        weighter.needs,
        args.n_future_tokens,
        recipe.train.ce_chunk_size,
        precision.dtype,
        isolate_samples=recipe.data.pack,
        reference=reference,
        critic=critic,
    )
    rows_per_step = recipe.data.micro_batch_size * recipe.train.grad_accum
    return Run(
        recipe=recipe,
        info=info,
        precision=precision,
        args=args,
        model=model,
        optimizer=build_optimizer(model, recipe.train, info.device, fused_optimizer),
        weighter=weighter,
        signals=signals,
        collectives=RankCollectives(info, rows_per_step * recipe.data.seq_len),
        head_weights=head_weights_for(recipe.train, args.n_future_tokens),
        use_fsdp=use_fsdp,
        flops_per_token=flops_per_token(model, args, recipe.data.seq_len),
    )


def build_run(recipe: Recipe, env: EnvConfig, info: DistInfo) -> Run:
    r = recipe
    precision = resolve_precision(r.model.dtype, info.device)
    if info.is_main:
        print(f"[setup] compute dtype {precision.name}: {precision.reason}", flush=True)
    tokenizer = Tokenizer(r.model.tokenizer)
    args, weights = load_base(r.model, tokenizer)
    use_fsdp = r.train.fsdp == "on" or (r.train.fsdp == "auto" and info.enabled)
    model = build_training_model(
        args, weights, info, precision.dtype, use_fsdp, True, r.train.activation_checkpointing
    )
    needs = get_weighter(r.weighting).needs
    online = "reference_ce" in needs and r.weighting.reference_source == "online"
    reference = None
    if online:  # the Rho-1 reference, frozen, in the compute dtype
        ref_args, ref_weights = load_reference_files(r.model, args)
        reference = build_training_model(
            ref_args, ref_weights, info, precision.dtype, use_fsdp, False
        )
    run = step_run(r, args, model, info, precision, use_fsdp, reference)
    run.tokenizer, run.data_hash = tokenizer, cache_key(Path(r.data.train), tokenizer)
    precomputed = "reference_ce" in needs and not online
    store = ReferenceCEStore(r.weighting.reference_ce_dir, run.data_hash) if precomputed else None
    loader_for = functools.partial(
        build_loader,
        tokenizer=tokenizer,
        data=r.data,
        n_heads=args.n_future_tokens,
        info=info,
        cache_dir=env.storage.cache_dir,
    )
    run.loader = loader_for(r.data.train, seed=r.run.seed, reference_ce=store)
    run.validation = loader_for(r.data.validation, seed=0) if r.data.validation else None
    return run

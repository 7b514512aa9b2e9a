"""`Run`: what a training run computes with, built from the recipe in one call (`build_run`):
the compute dtype, the tokenizer, the parallelised model and its AdamW, the training and
validation loaders, the weighter and the signals it needs."""

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
from runtime.config import EnvConfig
from runtime.precision import Precision, resolve_precision
from training.distributed import DistInfo, RankCollectives
from training.recipe import Recipe
from training.setup import (
    build_loader,
    build_optimizer,
    build_training_model,
    flops_per_token,
    head_weights_for,
    load_base,
)
from training.signals import Signals, build_signals
from weighting import Collectives, Weighter, get_weighter


@dataclass
class Run:
    recipe: Recipe
    info: DistInfo
    precision: Precision
    tokenizer: Tokenizer
    args: ModelArgs
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: TrainLoader
    validation: TrainLoader | None
    weighter: Weighter
    signals: Signals
    collectives: Collectives
    head_weights: list[float]
    use_fsdp: bool
    data_hash: str
    flops_per_token: float

    @property
    def dtype(self) -> torch.dtype:
        return self.precision.dtype

    @property
    def extra_modules(self) -> dict[str, nn.Module]:
        """What a checkpoint holds besides the model and its optimizer."""
        critic = self.signals.critic
        return {"value_head": critic.value_head} if critic is not None else {}


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
    data_hash = cache_key(Path(r.data.train), tokenizer)
    weighter = get_weighter(r.weighting)
    signals = build_signals(weighter.needs, r, model, args, info, precision.dtype, use_fsdp)
    precomputed = "reference_ce" in weighter.needs and r.weighting.reference_source == "precomputed"
    store = ReferenceCEStore(r.weighting.reference_ce_dir, data_hash) if precomputed else None
    loader_for = functools.partial(
        build_loader,
        tokenizer=tokenizer,
        data=r.data,
        n_heads=args.n_future_tokens,
        info=info,
        cache_dir=env.storage.cache_dir,
    )
    rows_per_step = r.data.micro_batch_size * r.train.grad_accum
    return Run(
        recipe=r,
        info=info,
        precision=precision,
        tokenizer=tokenizer,
        args=args,
        model=model,
        optimizer=build_optimizer(model, r.train, info.device),
        loader=loader_for(r.data.train, seed=r.run.seed, reference_ce=store),
        validation=loader_for(r.data.validation, seed=0) if r.data.validation else None,
        weighter=weighter,
        signals=signals,
        collectives=RankCollectives(info, rows_per_step * r.data.seq_len),
        head_weights=head_weights_for(r.train, args.n_future_tokens),
        use_fsdp=use_fsdp,
        data_hash=data_hash,
        flops_per_token=flops_per_token(model, args, r.data.seq_len),
    )

"""Building what a run trains with: base model files, the (parallelised) model, the optimizer,
the data loaders, the learning-rate schedule and the FLOPs estimate behind MFU."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from data.loader import LoaderConfig, TrainLoader
from data.reference_ce import ReferenceCEStore
from data.tokenized import load_tokenized
from model.args import ModelArgs
from model.tokenizer import Tokenizer
from model.transformer import Transformer
from model.weights import build_model, load_checkpoint_dir
from runtime.errors import InputError
from runtime.schema import ConfigError
from training.distributed import DistInfo
from training.parallel import parallelize
from training.recipe import DataSection, ModelSection, TrainSection


def load_base(model: ModelSection, tokenizer: Tokenizer) -> tuple[ModelArgs, dict]:
    """The base model's args and weights, checked against the recipe and the tokenizer."""
    args, state = load_checkpoint_dir(model.base)
    if args.n_future_tokens < 2 and model.require_mtp:
        raise ConfigError(
            f"model.base={model.base!r} has n_future_tokens={args.n_future_tokens}: "
            "the base must be an MTP model (n_future_tokens >= 2)"
        )
    if args.vocab_size != tokenizer.n_words:
        raise ConfigError(
            f"model.tokenizer has {tokenizer.n_words} pieces, the base model "
            f"{args.vocab_size}: they must match"
        )
    return args, state


def load_reference_files(model: ModelSection, base: ModelArgs) -> tuple[ModelArgs, dict]:
    """The Rho-1 reference model's args and weights; its vocabulary must be the base's."""
    args, state = load_checkpoint_dir(model.reference)
    if args.vocab_size != base.vocab_size:
        raise ConfigError(
            f"model.reference vocab {args.vocab_size} != base vocab {base.vocab_size}: "
            "Rho-1 scores need the same tokenizer"
        )
    return args, state


def make_output_dir(out: Path) -> None:
    """run.output_dir, created now: a path that cannot be created is bad input (exit 2)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"run.output_dir={str(out)!r} cannot be created: {exc.strerror}") from None


def head_weights_for(train: TrainSection, n_heads: int) -> list[float]:
    """λ_k of every head (default 1.0 each)."""
    weights = list(train.head_weights or [1.0] * n_heads)
    if len(weights) != n_heads:
        raise ConfigError(f"train.head_weights={weights} is invalid: needs {n_heads} values")
    return weights


def build_training_model(
    args: ModelArgs,
    state: dict,
    info: DistInfo,
    compute_dtype: torch.dtype,
    use_fsdp: bool,
    trainable: bool = True,
    activation_checkpointing: bool = False,
) -> nn.Module:
    """The model on `info.device`, parallelised by `training.parallel.parallelize`.

    Trainable models keep fp32 master weights (bf16 compute via autocast or FSDP's policy); a
    frozen one (the reference) is stored in the compute dtype and put in eval mode.
    """
    param_dtype = torch.float32 if trainable else compute_dtype
    checkpointing = trainable and activation_checkpointing
    if use_fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
        )

        with torch.device("meta"):
            model = Transformer(args)
        mixed = compute_dtype if compute_dtype != torch.float32 else None
        parallelize(model, fsdp=True, activation_checkpointing=checkpointing, param_dtype=mixed)
        model.to_empty(device=info.device)
        if not trainable:
            model.to(param_dtype)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, state if info.is_main else {}, options=options)
    else:
        model = build_model(args, state, device=info.device, dtype=param_dtype)
        parallelize(model, fsdp=False, activation_checkpointing=checkpointing, param_dtype=None)
    if not trainable:
        model.eval().requires_grad_(False)
    return model


def build_optimizer(
    model: nn.Module, train: TrainSection, device: torch.device, fused: bool | None = None
):
    """AdamW; weight decay on matrices only; the fused kernel on CUDA (`fused` overrides: the
    planner traces the GPU's optimizer on fake CPU tensors). Sharded (DTensor) and replicated
    parameters sit in separate groups: a fused or foreach kernel takes one kind at a time."""
    groups = []
    for sharded in (True, False):
        kind = [p for p in model.parameters() if hasattr(p, "to_local") == sharded]
        for decay in (True, False):
            params = [p for p in kind if (p.ndim >= 2) == decay]
            if params:
                groups.append(
                    {"params": params, "weight_decay": train.weight_decay if decay else 0.0}
                )
    return torch.optim.AdamW(
        groups,
        lr=train.lr,
        betas=tuple(train.betas),
        fused=device.type == "cuda" if fused is None else fused,
    )


def build_loader(
    path: str | Path,
    tokenizer: Tokenizer,
    data: DataSection,
    n_heads: int,
    info: DistInfo,
    cache_dir: str,
    batch_size: int | None = None,
    seed: int = 0,
    reference_ce: ReferenceCEStore | None = None,
) -> TrainLoader:
    """A loader over the tokenised split (cached), this rank's slice of every global batch;
    with `reference_ce` every batch carries its rows' precomputed reference CE."""
    split = load_tokenized(path, tokenizer, cache_dir)
    config = LoaderConfig(
        seq_len=data.seq_len,
        batch_size=batch_size or data.micro_batch_size,
        n_heads=n_heads,
        pack=data.pack,
        seed=seed,
        pad_id=tokenizer.pad_id,
        eos_id=tokenizer.eos_id,
        layout_ids=tokenizer.layout_ids(),
    )
    return TrainLoader(split, config, info.rank, info.world_size, reference_ce)


def lr_at(step: int, train: TrainSection) -> float:
    """Linear warmup over warmup_ratio·max_steps, then cosine down to min_lr_ratio·lr."""
    warmup = max(1, round(train.warmup_ratio * train.max_steps)) if train.warmup_ratio > 0 else 0
    if step < warmup:
        return train.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, train.max_steps - warmup))
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return train.lr * (train.min_lr_ratio + (1 - train.min_lr_ratio) * cosine)


def flops_per_token(model: nn.Module, args: ModelArgs, seq_len: int) -> float:
    """6·(block params + H·dim·vocab) + causal attention: each head's projection runs once."""
    blocks = sum(
        p.numel() for n, p in model.named_parameters() if "layers" in n or "extra_heads" in n
    )
    attention = 6 * args.n_layers * args.dim * seq_len
    return 6 * (blocks + args.n_future_tokens * args.dim * args.vocab_size) + attention

"""Activation checkpointing and FSDP2 wrapping, applied from outside the model (torchtitan style).

FSDP2 shards the trunk: every trunk block is a unit and the root holds the token embedding. The
prediction heads, the shared final norm and the output projection stay replicated (FSDP's
`ignored_params`): the sequential-head loss runs a separate backward pass per head, and FSDP2
finalises (reduce-scatters and reshards) every unit at the end of each backward pass that
touches it, so only modules outside FSDP may take part in those per-head passes. Their
gradients are averaged across ranks by `all_reduce_replicated_grads` before the optimizer step.
For 7B_1T_4 that replicates 4 blocks + output (≈ 0.94 B parameters) on each GPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from model.transformer import Transformer


def apply_activation_checkpointing(model: Transformer) -> None:
    """Recompute each block's activations in backward instead of storing them."""
    for blocks in (model.layers, model.extra_heads):
        for i, block in enumerate(blocks):
            blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def replicated_parameters(model: Transformer) -> list[nn.Parameter]:
    """Parameters of the heads, the final norm and the output projection."""
    modules = [*model.heads, model.norm, model.output]
    return [p for m in modules for p in m.parameters()]


def apply_fsdp(model: Transformer, param_dtype: torch.dtype | None) -> Transformer:
    """fully_shard per trunk block, then the root (embedding); heads/norm/output left replicated."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.trunk_layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy, ignored_params=set(replicated_parameters(model)))
    return model


def parallelize(
    model: Transformer, fsdp: bool, activation_checkpointing: bool, param_dtype: torch.dtype | None
) -> nn.Module:
    """The one place where checkpointing and sharding are applied."""
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if fsdp:
        apply_fsdp(model, param_dtype)
    return model


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip (False) or do (True) the gradient reduce-scatter in the next backward passes."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)


def all_reduce_replicated_grads(params: list[nn.Parameter]) -> None:
    """Averages the gradients of replicated parameters over ranks (one flat bucket)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not dist.is_initialized():
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, op=dist.ReduceOp.AVG)
    for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
        grad.copy_(reduced)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global L2 norm over sharded (DTensor) and plain gradients, then clipping to max_norm.

    Returns the norm before clipping as a 0-dim float32 tensor; nothing is read on the host (a
    NaN/inf norm leaves the gradients as they are, for the NaN guard)."""
    squares, grads = [], []
    for p in params:
        if p.grad is None:
            continue
        norm = torch.linalg.vector_norm(p.grad.float())
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        squares.append(norm.pow(2))
        grads.append(p.grad)
    if not squares:
        return torch.zeros(())
    total = torch.stack(squares).sum().sqrt()
    coef = (max_norm / (total.double() + 1e-6)).float()
    coef = torch.where(total > max_norm, coef, torch.ones_like(coef))  # NaN > x is False
    local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # a shard scales itself
    torch._foreach_mul_(local, coef)
    return total

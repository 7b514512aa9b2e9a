"""The traced training step behind `--plan` and `--measure` (training/plan.py): the recipe's
models built on the meta device, WMTP's own `parallelize` over a (fake) process group,
materialised as fake or real tensors, and one real step — two micro-batches of
`train_wmtp.train_step`, clipping, the step's reductions, the fused AdamW — under the memory
tracker (`training.memory`); FLOPs per token under `FlopCounterMode`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from data.loader import IGNORE_INDEX, Batch
from model.args import META_7B_1T_4, SHEARED_LLAMA_2_7B, ModelArgs
from model.transformer import Transformer
from model.weights import read_params
from runtime.precision import Precision
from training.distributed import DistInfo
from training.memory import MemoryTracker
from training.parallel import parallelize
from training.recipe import Recipe
from training.run import Run, step_run
from weighting import get_weighter


@dataclass
class Trace:
    micro_batch: int
    peak_bytes: int  # the whole step's
    breakdown: dict[str, int]  # at that peak
    largest: dict[str, int] | None = None  # the most each allocation label held at any time


# ------------------------------------------------------------------------- shapes
def model_args(recipe: Recipe) -> tuple[ModelArgs, str]:
    """The base's args from its params.json, else the published 7B_1T_4 shape."""
    params = Path(recipe.model.base) / "params.json"
    if params.is_file():
        return ModelArgs.from_dict(read_params(params)), f"{params}"
    return ModelArgs(**META_7B_1T_4), "the published 7B_1T_4 shape (no params.json yet)"


def reference_args(recipe: Recipe) -> tuple[ModelArgs | None, str]:
    needs = get_weighter(recipe.weighting).needs
    if "reference_ce" not in needs or recipe.weighting.reference_source != "online":
        return None, ""
    params = Path(recipe.model.reference or "") / "params.json"
    if recipe.model.reference and params.is_file():
        return ModelArgs.from_dict(read_params(params)), f"{params}"
    return ModelArgs(**SHEARED_LLAMA_2_7B), "Sheared-LLaMA 2.7B's published shape"


def plan_precision(recipe: Recipe) -> Precision:
    """What the GPU run computes in: bf16 (`auto` on any A100/H100/H200) unless float32."""
    if recipe.model.dtype == "float32":
        return Precision(torch.float32, "float32 requested")
    return Precision(torch.bfloat16, f"{recipe.model.dtype}: bf16 on the GPU")


@contextlib.contextmanager
def fake_world(world_size: int):
    """A fake process group of `world_size` ranks (this process is rank 0), torn down after."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        yield DistInfo(0, world_size, 0, torch.device("cpu"))
    finally:
        dist.destroy_process_group()


def synthetic_batch(
    args: ModelArgs, rows: int, seq_len: int, target_share: float, precomputed: bool
) -> Batch:
    """Rows of `seq_len` tokens whose last `target_share` of positions are response targets
    (with the loader's precomputed reference CE when the recipe reads it)."""
    tokens = torch.randint(0, args.vocab_size, (rows, seq_len))
    labels = torch.stack([torch.roll(tokens, -k - 1, 1) for k in range(args.n_future_tokens)], -1)
    labels[:, : seq_len - max(1, round(target_share * seq_len))] = IGNORE_INDEX
    for k in range(args.n_future_tokens):
        labels[:, seq_len - k - 1 :, k] = IGNORE_INDEX
    segments = torch.zeros(rows, seq_len, dtype=torch.long)
    batch = Batch(tokens, labels, segments, torch.ones(rows, seq_len, dtype=torch.bool),
                  [["s"]] * rows)  # fmt: skip
    batch.ref_ce = torch.rand(rows, seq_len) if precomputed else None
    return batch


# ------------------------------------------------------------------------- tracing
def build_models(
    recipe: Recipe, args: ModelArgs, ref: ModelArgs | None, info: DistInfo, fake: bool
) -> list[torch.nn.Module]:
    """The policy (and the frozen reference) parallelised as `build_training_model` does: on
    the meta device when `fake` (`materialise` them inside FakeTensorMode), else randomly
    initialised."""
    precision = plan_precision(recipe)
    use_fsdp = recipe.train.fsdp == "on" or (recipe.train.fsdp == "auto" and info.enabled)
    mixed = precision.dtype if precision.dtype != torch.float32 else None
    models = []
    for model_args, trainable in ((args, True), (ref, False)):
        if model_args is None:
            continue
        with torch.device("meta") if fake else contextlib.nullcontext():
            model = Transformer(model_args)
        if not fake:
            model.init_weights(seed=0)
        checkpointing = trainable and recipe.train.activation_checkpointing
        parallelize(model, use_fsdp, checkpointing, mixed)
        if not trainable:
            model.eval().requires_grad_(False)
        models.append(model)
    return models


def materialise(models: list[torch.nn.Module], recipe: Recipe, info: DistInfo, fake: bool) -> None:
    """Meta tensors into (fake) tensors on the device; the reference in the compute dtype."""
    for i, model in enumerate(models):
        if fake:
            model.to_empty(device=info.device)
        if i == 1:
            model.to(plan_precision(recipe).dtype)


def trace_step(
    recipe: Recipe,
    args: ModelArgs,
    ref: ModelArgs | None,
    info: DistInfo,
    micro_batch: int,
    target_share: float,
    fake: bool = True,
) -> Trace:
    """The memory of one optimizer step of `micro_batch` rows per micro-batch, traced."""
    recipe = replace(recipe, data=replace(recipe.data, micro_batch_size=micro_batch))
    tracker = MemoryTracker()
    with _step(recipe, args, ref, info, micro_batch, target_share, fake) as (run, reference, step):
        steady_state(run)
        register_state(tracker, run, reference)
        with tracker, _labelled_phases(tracker, run):
            step(tracker)
    return Trace(micro_batch, tracker.peak_bytes, tracker.breakdown(), dict(tracker.label_max))


def flops_per_token(recipe: Recipe, args: ModelArgs, ref: ModelArgs | None, info: DistInfo,
                    target_share: float) -> float:  # fmt: skip
    """Model FLOPs per token of one step (one row; activation recomputation not counted, as MFU
    conventionally excludes it), counted by `FlopCounterMode` in a pass of its own (its module
    hooks keep activations alive, which would spoil a memory trace)."""
    from torch.utils.flop_counter import FlopCounterMode

    recipe = replace(
        recipe,
        data=replace(recipe.data, micro_batch_size=1),
        train=replace(recipe.train, activation_checkpointing=False, grad_accum=1),
    )
    counter = FlopCounterMode(display=False)
    with _step(recipe, args, ref, info, 1, target_share, True) as (run, reference, step), counter:
        step(None)
    return counter.get_total_flops() / recipe.data.seq_len


@contextlib.contextmanager
def _step(recipe, args, ref, info, micro_batch, target_share, fake):
    """(run, reference, step): the models built, materialised and wrapped in a `Run`; `step`
    runs the real optimizer step (`tracker` labels its phases when given)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from train_wmtp import train_step
    from training.step import clip_gradients, reduced

    models = build_models(recipe, args, ref, info, fake)
    needs = get_weighter(recipe.weighting).needs
    precomputed = "reference_ce" in needs and recipe.weighting.reference_source == "precomputed"
    batch = synthetic_batch(args, micro_batch, recipe.data.seq_len, target_share, precomputed)
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    with mode:
        materialise(models, recipe, info, fake)
        model, reference = models[0], (models[1] if len(models) > 1 else None)
        run = step_run(recipe, args, model, info, plan_precision(recipe), info.enabled,
                       reference, fused_optimizer=True)  # fmt: skip
        n_micro = min(recipe.train.grad_accum, 2)  # the second meets the first's gradients

        def step(tracker: MemoryTracker | None) -> None:
            totals = train_step(run, [batch] * n_micro)
            grad_norm = clip_gradients(model, recipe.train.grad_clip, run.use_fsdp)
            summed = {"loss": totals.loss, "ce": totals.ce_sum, "norm": grad_norm}
            reduced(summed, info, "sum")  # the step's reductions; only their read is left out
            if tracker is None:
                run.optimizer.step()
            else:
                tracker.classify(grads(run), "gradients")
                with tracker.label("optimizer state"), tracker.transient():
                    run.optimizer.step()
                tracker.classify(optimizer_state(run), "optimizer state")
            run.optimizer.zero_grad(set_to_none=True)

        yield run, reference, step


def steady_state(run: Run) -> None:
    """The optimizer state every step after the first carries through its forward and backward
    (`_init_optim_state`: a step with zero gradients and zero LR, as DCP does)."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    critic = run.signals.critic  # stage 1 has run: the value head's AdamW has its state
    for optimizer in [run.optimizer, *([critic.optimizer] if critic else [])]:
        _init_optim_state(optimizer)
        optimizer.zero_grad(set_to_none=True)


def fsdp_unsharded_grads(model: torch.nn.Module) -> list[torch.Tensor]:
    """Gradients FSDP2 keeps unsharded between micro-batches while their reduce-scatter waits
    for the last one (`set_requires_gradient_sync(False)`)."""
    found = []
    for module in model.modules():
        state = getattr(module, "_get_fsdp_state", lambda: None)()
        group = getattr(state, "_fsdp_param_group", None) if state is not None else None
        for fsdp_param in getattr(group, "fsdp_params", []):
            grad = fsdp_param.unsharded_accumulated_grad
            if grad is None and hasattr(fsdp_param, "_unsharded_param"):
                grad = fsdp_param._unsharded_param.grad
            if grad is not None:
                found.append(grad)
    return found


@contextlib.contextmanager
def _labelled_phases(tracker: MemoryTracker, run: Run):
    """While tracing: what the chunked CE allocates counts as loss chunks, what the reference's
    forward allocates as the reference model, and the unsharded gradients FSDP accumulates
    between micro-batches as gradients."""
    import train_wmtp
    from training import loss as loss_module
    from training.signals import Signals

    chunked, reference_ce = loss_module.chunked_head_ce, Signals.reference_ce
    sync = train_wmtp.set_gradient_sync

    def labelled(fn, label):
        def wrapped(*a, **k):
            with tracker.label(label):
                return fn(*a, **k)

        return wrapped

    def next_micro_batch(model, enabled):  # the previous micro-batch's gradients exist now
        tracker.classify(fsdp_unsharded_grads(model) + grads(run), "gradients")
        return sync(model, enabled)

    loss_module.chunked_head_ce = labelled(chunked, "loss chunks")
    Signals.reference_ce = labelled(reference_ce, "reference model")
    train_wmtp.set_gradient_sync = next_micro_batch
    try:
        yield
    finally:
        loss_module.chunked_head_ce, Signals.reference_ce = chunked, reference_ce
        train_wmtp.set_gradient_sync = sync


def register_state(tracker: MemoryTracker, run: Run, reference: torch.nn.Module | None) -> None:
    tracker.register(list(run.model.parameters()) + list(run.model.buffers()), "parameters")
    tracker.register(optimizer_state(run), "optimizer state")
    if run.signals.critic is not None:
        tracker.register(run.signals.critic.value_head.parameters(), "parameters")
    if reference is not None:
        tracker.register(
            list(reference.parameters()) + list(reference.buffers()), "reference model"
        )


def grads(run: Run) -> list[torch.Tensor]:
    params = list(run.model.parameters())
    if run.signals.critic is not None:
        params += list(run.signals.critic.value_head.parameters())
    return [p.grad for p in params if p.grad is not None]


def optimizer_state(run: Run) -> list[torch.Tensor]:
    optimizers = [run.optimizer]
    if run.signals.critic is not None:
        optimizers.append(run.signals.critic.optimizer)
    return [t for o in optimizers for state in o.state.values() for t in state.values()
            if isinstance(t, torch.Tensor)]  # fmt: skip

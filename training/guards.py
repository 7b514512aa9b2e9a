"""The NaN and OOM guards, the LR's recovery, and the fault injection that tests them.

NaN guard: a non-finite loss or gradient norm (all ranks agree) skips the update and halves the
LR; after `train.lr_recovery_steps` clean steps the LR doubles back (up to the schedule). If the
parameters themselves went bad, the newest intact checkpoint is restored and the step counter,
history and data order rewind with it. More than `train.nan_max_retries` failures in a row stop
the run (exit 3) with a report.
OOM guard: a memory report is written; a single-process run halves the micro-batch while the
step keeps exactly `data.micro_batch_size × train.grad_accum` rows (the last micro-batch may be
smaller); when it cannot shrink, or in a distributed run, it stops (exit 4) with advice.
Fault injection (`faults:` in a recipe, for tests) counts steps from 1, as the log does.
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

import torch
from torch import nn

from runtime.errors import EXIT_NAN, EXIT_OOM, EXIT_STORAGE, StorageError
from training.distributed import DistInfo
from training.failures import TrainingFailure
from training.recipe import FaultsSection, TrainSection
from training.state import GuardState, TrainState


def memory_report(device: torch.device) -> str:
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    text = f"host peak RSS: {rss_mb:.0f} MiB\n"
    if device.type == "cuda":
        text += torch.cuda.memory_summary(device, abbreviated=True)
    return text


def micro_batches(rows: int, micro_batch: int) -> list[int]:
    """Sizes of the micro-batches that make up one step of `rows` rows."""
    full, rest = divmod(rows, micro_batch)
    return [micro_batch] * full + ([rest] if rest else [])


def parameters_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def on_nonfinite_step(
    guard: GuardState, step: int, loss: float, grad_norm: float, info: DistInfo, train: TrainSection
) -> None:
    """Counts a skipped update and halves the LR; raises TrainingFailure past the retries."""
    guard.consecutive_failures += 1
    guard.skipped_steps += 1
    guard.clean_steps = 0
    guard.lr_scale *= 0.5
    if info.is_main:
        print(
            f"[guard] non-finite loss/grad at step {step} (loss={loss}, grad_norm={grad_norm}): "
            f"update skipped, lr scale -> {guard.lr_scale}",
            flush=True,
        )
    if guard.consecutive_failures > train.nan_max_retries:
        raise TrainingFailure(
            f"{guard.consecutive_failures} consecutive non-finite steps at step {step} "
            f"(last loss {loss}, grad norm {grad_norm}); lr scale reached {guard.lr_scale}",
            f"resume from the last checkpoint with a lower train.lr (e.g. "
            f"train.lr={train.lr * guard.lr_scale:g}), check the data batch around this step, "
            "or raise weighting.min_weight / lower max_weight",
            EXIT_NAN,
        )


def on_clean_step(guard: GuardState, train: TrainSection, info: DistInfo) -> None:
    """After `train.lr_recovery_steps` clean steps a halved LR doubles back (at most to 1×)."""
    guard.consecutive_failures = 0
    guard.clean_steps += 1
    if (
        guard.lr_scale < 1
        and train.lr_recovery_steps
        and guard.clean_steps >= train.lr_recovery_steps
    ):
        guard.lr_scale = min(1.0, guard.lr_scale * 2)
        guard.clean_steps = 0
        if info.is_main:
            print(
                f"[guard] {train.lr_recovery_steps} clean steps: lr scale -> {guard.lr_scale}",
                flush=True,
            )


def no_checkpoint_to_restore() -> TrainingFailure:
    return TrainingFailure(
        "parameters became non-finite and no checkpoint exists to restore",
        "lower train.lr or set checkpoint.every_steps, then rerun",
        EXIT_NAN,
    )


def weighting_failure(exc: Exception, step: int) -> TrainingFailure:
    """A token-weighting error ends the run like the NaN guard does: exit 3 with a report."""
    return TrainingFailure(
        f"token weights could not be computed at step {step}: {exc}",
        "check the weighting.* settings named above (a temperature too sharp, a degenerate "
        "reference or critic) and the data batch around this step, then resume",
        EXIT_NAN,
    )


def storage_failure(exc: StorageError) -> TrainingFailure:
    return TrainingFailure(
        str(exc),
        "free space or fix the permissions of that path (or point run.output_dir elsewhere), then "
        "rerun with checkpoint.resume: auto: the last complete checkpoint is intact",
        EXIT_STORAGE,
    )


def on_out_of_memory(
    exc: Exception,
    step: int,
    micro_batch: int,
    rows: int,
    out: Path,
    info: DistInfo,
    train: TrainSection,
) -> int:
    """Writes this rank's memory report; returns the halved micro-batch (single process, when it
    can shrink) or raises TrainingFailure (exit 4) with advice."""
    report = memory_report(info.device)
    name = f"oom_step{step}.txt" if info.rank == 0 else f"oom_step{step}_rank{info.rank}.txt"
    (out / "reports").mkdir(parents=True, exist_ok=True)
    (out / "reports" / name).write_text(f"rank {info.rank}: {exc}\n\n{report}")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if not info.enabled and train.oom_auto_shrink and micro_batch > 1:
        new = micro_batch // 2
        sizes = micro_batches(rows, new)
        print(
            f"[oom] {exc}: micro-batch {micro_batch} -> {new}; the step keeps its {rows} rows "
            f"in {len(sizes)} micro-batches {sizes}",
            flush=True,
        )
        return new
    suggestion = (
        f"data.micro_batch_size={max(micro_batch // 2, 1)} train.grad_accum={train.grad_accum * 2}"
        if micro_batch > 1
        else "train.activation_checkpointing=true or a smaller data.seq_len"
    )
    where = f" on rank {info.rank}" if info.enabled else ""
    raise TrainingFailure(
        f"out of memory at step {step}{where} with micro-batch {micro_batch}: {exc}\n\n"
        f"```\n{report}```",
        f"resume (the last checkpoint is intact) with {suggestion}",
        EXIT_OOM,
    )


class Faults:
    """Injected faults (the recipe's `faults:` section); every step number counts from 1."""

    def __init__(self, faults: FaultsSection, guard: GuardState, info: DistInfo):
        self.faults, self.guard, self.info = faults, guard, info

    def before_optimizer_step(self, step: int, model: nn.Module) -> None:
        """NaN gradients (faults.nan_at_steps) or a simulated OOM (faults.oom_at_steps on
        faults.oom_ranks), each at most once per step number."""
        self.kill_point("step", step)
        tag = f"nan@{step}"
        if step in self.faults.nan_at_steps and tag not in self.guard.fired_faults:
            self.guard.fired_faults.append(tag)
            param = next(p for p in model.parameters() if p.grad is not None)
            param.grad.fill_(float("nan"))
        tag = f"oom@{step}"
        ranks = self.faults.oom_ranks
        if step in self.faults.oom_at_steps and tag not in self.guard.fired_faults:
            self.guard.fired_faults.append(tag)
            if ranks is None or self.info.rank in ranks:
                raise torch.OutOfMemoryError(
                    f"simulated out-of-memory at step {step} (faults.oom_at_steps)"
                )

    def after_optimizer_step(self, step: int, model: nn.Module) -> None:
        """Parameters turned NaN (faults.nan_params_at_steps), once per step number."""
        tag = f"nan-params@{step}"
        if step in self.faults.nan_params_at_steps and tag not in self.guard.fired_faults:
            self.guard.fired_faults.append(tag)
            with torch.no_grad():
                next(iter(model.parameters())).fill_(float("nan"))

    def kill_point(self, point: str, step: int | None = None) -> None:
        """Dies like `kill -9` (no cleanup) at `point:step` if `faults.kill_at` lists it."""
        name = point if step is None else f"{point}:{step}"
        if name in self.faults.kill_at:
            self.kill_now()

    def kill_now(self) -> None:
        sys.stdout.flush()
        os._exit(137)


def restore_after_bad_parameters(
    checkpoints, state: TrainState, model, optimizer, extra_modules, loader, info: DistInfo
) -> None:
    """Parameters went non-finite: load the newest intact checkpoint and rewind the step
    counter, history and data order with it (the guard's own counters carry on)."""
    restored = checkpoints.newest_intact()
    if restored is None:
        raise no_checkpoint_to_restore()
    guard = state.guard
    state.load_state_dict(
        checkpoints.load(restored, model, optimizer, extra_modules, restore_rng=False)
    )
    state.guard = guard
    guard.restores += 1
    loader.load_state_dict(state.loader)
    if info.is_main:
        print(
            f"[guard] parameters became non-finite: restored {restored.name}; step counter, "
            f"history and data order rewound to step {state.step}",
            flush=True,
        )

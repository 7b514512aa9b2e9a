"""The NaN and OOM guards, and the fault injection that tests them.

NaN guard: a non-finite loss or gradient norm (all ranks agree) skips the update and halves the
LR; if the parameters themselves went bad the last checkpoint is restored; more than
`train.nan_max_retries` failures in a row stop the run (exit 3) with a report.
OOM guard: a memory report is written; a single-process run halves the micro-batch and doubles
the accumulation, a distributed one stops (exit 4) with advice.
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch
from torch import nn

from training.checkpoints import GuardState
from training.distributed import DistInfo
from training.recipe import FaultsSection, TrainSection

EXIT_OK, EXIT_CONFIG, EXIT_NAN, EXIT_OOM = 0, 2, 3, 4


class TrainingFailure(RuntimeError):
    """A clean, reported stop: `what` went wrong, `next_action` to take, process `exit_code`."""

    def __init__(self, what: str, next_action: str, exit_code: int):
        super().__init__(what)
        self.what, self.next_action, self.exit_code = what, next_action, exit_code


def memory_report(device: torch.device) -> str:
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    text = f"host peak RSS: {rss_mb:.0f} MiB\n"
    if device.type == "cuda":
        text += torch.cuda.memory_summary(device, abbreviated=True)
    return text


def parameters_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def on_nonfinite_step(
    guard: GuardState, step: int, loss: float, grad_norm: float, info: DistInfo, train: TrainSection
) -> None:
    """Counts a skipped update and halves the LR; raises TrainingFailure past the retries."""
    guard.consecutive_failures += 1
    guard.skipped_steps += 1
    guard.lr_scale *= 0.5
    if info.is_main:
        print(
            f"[guard] non-finite loss/grad at step {step + 1} (loss={loss}, "
            f"grad_norm={grad_norm}): update skipped, lr scale -> {guard.lr_scale}",
            flush=True,
        )
    if guard.consecutive_failures > train.nan_max_retries:
        raise TrainingFailure(
            f"{guard.consecutive_failures} consecutive non-finite steps at step {step + 1} "
            f"(last loss {loss}, grad norm {grad_norm}); lr scale reached {guard.lr_scale}",
            f"resume from the last checkpoint with a lower train.lr (e.g. "
            f"train.lr={train.lr * guard.lr_scale:g}), check the data batch around this step, "
            "or raise weighting.min_weight / lower max_weight",
            EXIT_NAN,
        )


def weighting_failure(exc: Exception, step: int, train: TrainSection) -> TrainingFailure:
    """A token-weighting error ends the run like the NaN guard does: exit 3 with a report."""
    return TrainingFailure(
        f"token weights could not be computed at step {step + 1}: {exc}",
        "check the weighting.* settings named above (a temperature too sharp, a degenerate "
        "reference or critic) and the data batch around this step, then resume",
        EXIT_NAN,
    )


def no_checkpoint_to_restore() -> TrainingFailure:
    return TrainingFailure(
        "parameters became non-finite and no checkpoint exists to restore",
        "lower train.lr or set checkpoint.every_steps, then rerun",
        EXIT_NAN,
    )


def on_out_of_memory(
    exc: Exception,
    step: int,
    micro_batch: int,
    accum: int,
    out: Path,
    info: DistInfo,
    train: TrainSection,
) -> int:
    """Writes the memory report; returns the new micro-batch size (single process, shrinkable)
    or raises TrainingFailure (exit 4) with advice."""
    report = memory_report(info.device)
    if info.is_main:
        (out / "reports").mkdir(parents=True, exist_ok=True)
        (out / "reports" / f"oom_step{step + 1}.txt").write_text(f"{exc}\n\n{report}")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if not info.enabled and train.oom_auto_shrink and micro_batch > 1:
        new = micro_batch // 2
        print(
            f"[oom] {exc}: micro-batch {micro_batch} -> {new}, "
            f"grad accumulation {accum} -> {accum * 2}",
            flush=True,
        )
        return new
    suggestion = (
        f"data.micro_batch_size={max(micro_batch // 2, 1)} train.grad_accum={train.grad_accum * 2}"
        if micro_batch > 1
        else "train.activation_checkpointing=true or a smaller data.seq_len"
    )
    raise TrainingFailure(
        f"out of memory at step {step + 1} with micro-batch {micro_batch}: {exc}\n\n"
        f"```\n{report}```",
        f"resume (the last checkpoint is intact) with {suggestion}",
        EXIT_OOM,
    )


def inject_faults(faults: FaultsSection, guard: GuardState, step: int, model: nn.Module) -> None:
    """Before the optimizer step: NaN gradients (faults.nan_at_steps) or a simulated OOM
    (faults.oom_at_steps), each at most once per step number."""
    tag = f"nan@{step}"
    if step in faults.nan_at_steps and tag not in guard.fired_faults:
        guard.fired_faults.append(tag)
        param = next(p for p in model.parameters() if p.grad is not None)
        param.grad.fill_(float("nan"))
    tag = f"oom@{step}"
    if step in faults.oom_at_steps and tag not in guard.fired_faults:
        guard.fired_faults.append(tag)
        raise torch.OutOfMemoryError(
            f"simulated out-of-memory at step {step} (faults.oom_at_steps)"
        )

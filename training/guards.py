"""The NaN and OOM guards and the LR's recovery (their counters live in `TrainState.guard`).

NaN guard: a non-finite loss or gradient norm (all ranks agree) skips the update and halves the
LR; after `train.lr_recovery_steps` clean steps the LR doubles back (up to the schedule). If the
parameters themselves went bad, the newest intact checkpoint is restored and the step counter,
history and data order rewind with it (`Checkpoints.restore_after_bad_parameters`). More than
`train.nan_max_retries` failures in a row stop the run (exit 3) with a report.
OOM guard: a memory report is written; a single-process run halves the micro-batch while the
step keeps exactly `data.micro_batch_size × train.grad_accum` rows (the last micro-batch may be
smaller); when it cannot shrink, or in a distributed run, it stops (exit 4) with advice.
"""

from __future__ import annotations

import math
import resource
from pathlib import Path

import torch
from torch import nn

from data.loader import micro_batches
from runtime.errors import EXIT_NAN, EXIT_OOM, EXIT_STORAGE, StorageError
from training.distributed import DistInfo, all_true
from training.failures import TrainingFailure
from training.recipe import TrainSection
from training.state import TrainState


def memory_report(device: torch.device) -> str:
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    text = f"host peak RSS: {rss_mb:.0f} MiB\n"
    if device.type == "cuda":
        text += torch.cuda.memory_summary(device, abbreviated=True)
    return text


def parameters_finite(model: nn.Module, info: DistInfo) -> bool:
    """Every parameter finite on every rank (one device read)."""
    flags = [torch.isfinite(p).all() for p in model.parameters()]
    return all_true(bool(torch.stack(flags).all()), info)


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


class Guards:
    """The run's NaN and OOM guards. `micro_batch` is the current micro-batch size (after OOM
    shrinks; saved in `TrainState`)."""

    def __init__(
        self, state: TrainState, train: TrainSection, micro_batch: int, info: DistInfo, out: Path
    ):
        self.state, self.train, self.info, self.out = state, train, info, out
        self.rows_per_step = micro_batch * train.grad_accum  # kept through OOM shrinks
        self.state.micro_batch_size = self.state.micro_batch_size or micro_batch

    @property
    def micro_batch(self) -> int:
        return self.state.micro_batch_size

    @property
    def lr_scale(self) -> float:
        return self.state.guard.lr_scale

    # --------------------------------------------------------------------------- NaN
    def update_is_finite(self, step: int, loss: float, grad_norm: float) -> bool:
        """The NaN guard's verdict on a step (values already agreed over ranks): True when its
        update may be applied; otherwise counts the skip and halves the LR, or raises
        TrainingFailure past the retries."""
        guard = self.state.guard
        if math.isfinite(loss) and math.isfinite(grad_norm):
            guard.consecutive_failures = 0
            guard.clean_steps += 1
            self._recover_lr()
            return True
        guard.consecutive_failures += 1
        guard.skipped_steps += 1
        guard.clean_steps = 0
        guard.lr_scale *= 0.5
        if self.info.is_main:
            print(
                f"[guard] non-finite loss/grad at step {step} (loss={loss}, grad_norm={grad_norm})"
                f": update skipped, lr scale -> {guard.lr_scale}",
                flush=True,
            )
        if guard.consecutive_failures > self.train.nan_max_retries:
            raise TrainingFailure(
                f"{guard.consecutive_failures} consecutive non-finite steps at step {step} "
                f"(last loss {loss}, grad norm {grad_norm}); lr scale reached {guard.lr_scale}",
                f"resume from the last checkpoint with a lower train.lr (e.g. "
                f"train.lr={self.train.lr * guard.lr_scale:g}), check the data batch around this "
                "step, or raise weighting.min_weight / lower max_weight",
                EXIT_NAN,
            )
        return False

    def _recover_lr(self) -> None:
        """After `train.lr_recovery_steps` clean steps a halved LR doubles back (at most 1×)."""
        guard, every = self.state.guard, self.train.lr_recovery_steps
        if guard.lr_scale < 1 and every and guard.clean_steps >= every:
            guard.lr_scale = min(1.0, guard.lr_scale * 2)
            guard.clean_steps = 0
            if self.info.is_main:
                print(f"[guard] {every} clean steps: lr scale -> {guard.lr_scale}", flush=True)

    # --------------------------------------------------------------------------- OOM
    def out_of_memory(self, exc: Exception, step: int) -> None:
        """Writes this rank's memory report; halves the micro-batch (single process, when it
        can shrink) or raises TrainingFailure (exit 4) with advice."""
        micro_batch, info = self.micro_batch, self.info
        report = memory_report(info.device)
        name = f"oom_step{step}.txt" if info.rank == 0 else f"oom_step{step}_rank{info.rank}.txt"
        (self.out / "reports").mkdir(parents=True, exist_ok=True)
        (self.out / "reports" / name).write_text(f"rank {info.rank}: {exc}\n\n{report}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if not info.enabled and self.train.oom_auto_shrink and micro_batch > 1:
            new = micro_batch // 2
            sizes = micro_batches(self.rows_per_step, new)
            print(
                f"[oom] {exc}: micro-batch {micro_batch} -> {new}; the step keeps its "
                f"{self.rows_per_step} rows in {len(sizes)} micro-batches {sizes}",
                flush=True,
            )
            self.state.micro_batch_size = new
            return
        suggestion = (
            f"data.micro_batch_size={max(micro_batch // 2, 1)} "
            f"train.grad_accum={self.train.grad_accum * 2}"
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

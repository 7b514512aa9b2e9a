"""The running record of a run: the MLflow run it logs to and every step's line, history
entry and metrics."""

from __future__ import annotations

import time

import torch

from runtime.precision import Precision
from runtime.progress import Progress
from runtime.schema import flatten, to_dict
from runtime.tracking import Tracker
from training.distributed import DistInfo
from training.recipe import Recipe


class StepLog:
    """Every logged step goes to the run history, MLflow and (every `every` steps) stdout; the
    stage under way shows `[train] step/total steps, rate, ETA | loss, tokens/s` at least every
    ~10 s of wall time on rank 0 (a heartbeat while one step runs longer than that)."""

    SHOWN = (
        "loss",
        "value_loss",
        "val_loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "explained_variance",
        "critic_explained_variance",
    )

    def __init__(self, history: list[dict], tracker: Tracker, every: int, is_main: bool):
        self.history, self.tracker, self.every, self.is_main = history, tracker, every, is_main
        self.progress: Progress | None = None

    def start_stage(self, label: str, total: int, done: int) -> None:
        """Progress of a new stage (`done` of `total` steps already done: a resumed run)."""
        self.close()
        self.progress = Progress(
            label, total, "steps", done=done, heartbeat=True, enabled=self.is_main
        )

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None

    def __call__(
        self, metrics: dict[str, float], step: int, last: int, stage: str = "step"
    ) -> None:
        numbers = {k: v for k, v in metrics.items() if isinstance(v, float | int)}
        self.history.append({"stage": stage, "step": step, **numbers})
        self.tracker.log_metrics(metrics, step)
        if self.progress is not None and stage in ("step", "stage1"):
            self.progress.update(extra=_progress_extra(metrics))
        if self.is_main and (step % self.every == 0 or step == last):
            shown = " ".join(
                f"{k}={v:.4g}"
                for k, v in metrics.items()
                if k.removeprefix("stage1_") in self.SHOWN
            )
            if shown:
                self._print(f"[{stage} {step}] {shown}")

    def _print(self, text: str) -> None:
        if self.progress is not None:
            self.progress.write(text)  # clears a live bar first
        else:
            print(text, flush=True)


def _progress_extra(metrics: dict[str, float]) -> str:
    loss = metrics.get("loss", metrics.get("stage1_value_loss"))
    parts = [f"loss {loss:.4g}"] if loss is not None else []
    if "tokens_per_s" in metrics:
        parts.append(f"{metrics['tokens_per_s']:,.0f} tokens/s")
    return ", ".join(parts)


def start_tracking(
    tracker: Tracker,
    recipe: Recipe,
    model: torch.nn.Module,
    data_hash: str,
    precision: Precision,
    run_id: str | None,
    info: DistInfo,
) -> str:
    """Starts (or resumes) the MLflow run `mtp/{algo}/{dataset}` with the flattened recipe and
    what the run resolved (heads, size, data hash, world size, dtype); every rank gets its id."""
    experiment = recipe.tracking.experiment or f"mtp/{recipe.weighting.algo}/{recipe.data.dataset}"
    resolved = {
        "model.n_future_tokens": getattr(model, "n_future_tokens", None),
        "model.n_params": sum(p.numel() for p in model.parameters()),
        "data.hash": data_hash,
        "world_size": info.world_size,
        "model.compute_dtype": precision.name,
        "model.compute_dtype_reason": precision.reason,
    }
    params = {**flatten(to_dict(recipe)), **resolved}
    run_name = recipe.tracking.run_name or recipe.run.name
    tags = {"algo": recipe.weighting.algo}
    run_id = tracker.start(experiment, run_name, params, tags=tags, run_id=run_id)
    if info.is_main and run_id is None:
        run_id = f"local-{int(time.time())}"
    if info.enabled:
        box = [run_id]
        torch.distributed.broadcast_object_list(box, src=0)
        run_id = box[0]
    return run_id

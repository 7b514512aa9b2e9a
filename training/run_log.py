"""The running record of a run: the MLflow run it logs to and every step's line, history
entry and metrics."""

from __future__ import annotations

import time

import torch

from runtime.precision import Precision
from runtime.schema import flatten, to_dict
from runtime.tracking import Tracker
from training.distributed import DistInfo
from training.recipe import Recipe


class StepLog:
    """Every logged step goes to the run history, MLflow and (every `every` steps) stdout."""

    SHOWN = ("loss", "value_loss", "val_loss", "lr", "grad_norm", "tokens_per_s")

    def __init__(
        self, history: list[dict], tracker: Tracker, every: int, is_main: bool, kill_point=None
    ):
        self.history, self.tracker, self.every, self.is_main = history, tracker, every, is_main
        self.kill_point = kill_point

    def __call__(
        self, metrics: dict[str, float], step: int, last: int, stage: str = "step"
    ) -> None:
        numbers = {k: v for k, v in metrics.items() if isinstance(v, float | int)}
        self.history.append({"stage": stage, "step": step, **numbers})
        if self.kill_point is not None and stage == "step":
            self.kill_point("log", step)  # fault injection: dies between history and MLflow
        self.tracker.log_metrics(metrics, step)
        if self.is_main and (step % self.every == 0 or step == last):
            shown = " ".join(
                f"{k}={v:.4g}"
                for k, v in metrics.items()
                if k.removeprefix("stage1_") in self.SHOWN
            )
            print(f"[{stage} {step}] {shown}", flush=True)


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

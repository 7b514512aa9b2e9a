"""What a run is, besides its tensors: `TrainState` (saved in every checkpoint as
trainer_state.json) and the guards' `GuardState` inside it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

HISTORY_KEPT = 2000  # history entries stored in a checkpoint (the run's full history is in MLflow)


@dataclass
class GuardState:
    """What the NaN/OOM guards have done so far (saved with every checkpoint)."""

    lr_scale: float = 1.0
    consecutive_failures: int = 0
    clean_steps: int = 0  # since the LR was last halved
    skipped_steps: int = 0
    restores: int = 0


@dataclass
class TrainState:
    """Everything besides model/optimizer tensors that a resumed run needs to continue exactly."""

    step: int = 0  # optimizer steps done
    stage1_step: int = 0  # critic stage-1 steps done
    stage1_explained_variance: float | None = None  # of the value head, on held-out batches
    stage1_done: bool = False  # stage 1 finished (and, with a minimum, judged)
    critic_uniform: bool = False  # a weak critic: stage 2 runs with uniform weights
    run_id: str | None = None
    best_val: float | None = None  # best value of checkpoint.best_metric so far
    best_step: int | None = None  # the checkpoint holding it
    evals_since_best: int = 0  # evaluations of best_metric without improvement (early stopping)
    stop_reason: str | None = None  # why the run ended before train.max_steps
    micro_batch_size: int | None = None  # after OOM shrinks
    loader: dict = field(default_factory=dict)  # TrainLoader.state_dict()
    guard: GuardState = field(default_factory=GuardState)
    history: list[dict] = field(default_factory=list)

    def record_eval(self, metric: str, values: dict, step: int) -> bool:
        """Notes an evaluation of `metric` (val_loss lower is better, pass@1 higher); True when
        it is the best so far (then step becomes `best_step`)."""
        if metric not in values:
            return False
        value = values[metric]
        better = self.best_val is None or (
            value < self.best_val if metric == "val_loss" else value > self.best_val
        )
        if better:
            self.best_val, self.best_step, self.evals_since_best = value, step, 0
        else:
            self.evals_since_best += 1
        return better

    def patience_exhausted(self, patience: int, metric: str, step: int) -> bool:
        """Early stopping: `patience` evaluations in a row without improvement (sets stop_reason)."""
        if not patience or self.evals_since_best < patience:
            return False
        self.stop_reason = (
            f"early stop at step {step}: {metric} did not improve for {self.evals_since_best} "
            f"evaluations (best {self.best_val:.4g} at step {self.best_step})"
        )
        return True

    def state_dict(self) -> dict:
        state = asdict(self)
        state["history"] = self.history[-HISTORY_KEPT:]
        return state

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            if name == "history":
                self.history[:] = value  # the step log appends to this very list
            else:
                setattr(self, name, _guard_state(value) if name == "guard" else value)


def _guard_state(saved: dict) -> GuardState:
    """A checkpoint's guard state; keys of older versions that no longer exist are ignored."""
    known = {f.name for f in fields(GuardState)}
    return GuardState(**{k: v for k, v in saved.items() if k in known})


def rng_state() -> dict[str, Any]:
    """This rank's torch (and CUDA) RNG state, saved per rank in every checkpoint."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

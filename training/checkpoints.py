"""Training checkpoints: model + optimizer (DCP, sharded when FSDP) + `TrainState` + per-rank RNG.

    <output>/checkpoints/step_0000100/   complete checkpoints only (written as .tmp, then renamed)
        dcp/                             torch.distributed.checkpoint of model, optimizer, extras
        trainer_state.json               step, scheduler, loader cursor, guard state, run id
        rng_rank{r}.pt                   torch (and CUDA) RNG of rank r
    <output>/checkpoints/latest          name of the newest complete checkpoint
    <output>/checkpoints/best            name of the best one (by validation loss), never rotated
    <output>/export/<name>/              full-weight safetensors model dir, for evaluation

keep_last rotation removes the oldest step_* dirs beyond the limit, never `best` or `latest`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from model.args import ModelArgs
from model.weights import save_model_dir
from runtime.integrity import atomic_write_text
from training.distributed import DistInfo, barrier

STATE_FILE = "trainer_state.json"
HISTORY_KEPT = 2000  # history entries stored in a checkpoint (the run's full history is in MLflow)


@dataclass
class GuardState:
    """What the NaN/OOM guards have done so far (saved with every checkpoint)."""

    lr_scale: float = 1.0
    consecutive_failures: int = 0
    skipped_steps: int = 0
    fired_faults: list[str] = field(default_factory=list)


@dataclass
class TrainState:
    """Everything besides model/optimizer tensors that a resumed run needs to continue exactly."""

    step: int = 0  # optimizer steps done
    stage1_step: int = 0  # critic stage-1 steps done
    stage1_explained_variance: float | None = None  # of the value head, on held-out batches
    run_id: str | None = None
    best_val: float | None = None
    micro_batch_size: int | None = None
    loader: dict = field(default_factory=dict)  # TrainLoader.state_dict()
    guard: GuardState = field(default_factory=GuardState)
    history: list[dict] = field(default_factory=list)

    def state_dict(self) -> dict:
        state = asdict(self)
        state["history"] = self.history[-HISTORY_KEPT:]
        return state

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, GuardState(**value) if name == "guard" else value)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    def __init__(self, root: str | Path, info: DistInfo, keep_last: int = 3):
        self.root = Path(root)
        self.info = info
        self.keep_last = keep_last

    def _pointer(self, name: str) -> Path | None:
        pointer = self.root / name
        if not pointer.is_file():
            return None
        target = self.root / pointer.read_text().strip()
        return target if (target / STATE_FILE).is_file() else None

    def latest(self) -> Path | None:
        """Newest complete checkpoint (the pointer, else a scan that ignores partial .tmp dirs)."""
        found = self._pointer("latest")
        if found:
            return found
        complete = sorted(p for p in self.root.glob("step_*") if (p / STATE_FILE).is_file())
        return complete[-1] if complete else None

    def best(self) -> Path | None:
        return self._pointer("best")

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        trainer_state: dict,
        extra_modules: dict[str, nn.Module] | None = None,
    ) -> Path:
        """Collective: every rank must call it. Returns the checkpoint dir."""
        name = f"step_{step:07d}"
        final, tmp = self.root / name, self.root / f".{name}.tmp"
        if self.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(self.info)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        for key, module in (extra_modules or {}).items():
            state[key] = module.state_dict()
        dcp.save(state, checkpoint_id=str(tmp / "dcp"))
        torch.save(_rng_state(), tmp / f"rng_rank{self.info.rank}.pt")
        barrier(self.info)
        if self.info.is_main:
            atomic_write_text(
                tmp / STATE_FILE, json.dumps({**trainer_state, "step": step}, indent=2) + "\n"
            )
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            atomic_write_text(self.root / "latest", name + "\n")
            self._rotate()
        barrier(self.info)
        return final

    def mark_best(self, path: Path) -> None:
        if self.info.is_main:
            atomic_write_text(self.root / "best", path.name + "\n")

    def _rotate(self) -> None:
        protected = {p.name for p in (self.best(), self.latest()) if p is not None}
        steps = sorted(p for p in self.root.glob("step_*") if (p / STATE_FILE).is_file())
        for old in steps[: max(len(steps) - self.keep_last, 0)]:
            if old.name not in protected:
                shutil.rmtree(old)

    def load(
        self,
        path: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        extra_modules: dict[str, nn.Module] | None = None,
        restore_rng: bool = True,
    ) -> dict:
        """Loads a checkpoint into the (already parallelised) model/optimizer; returns trainer state."""
        model_sd, optim_sd = (
            get_state_dict(model, optimizer) if optimizer else (get_model_state_dict(model), None)
        )
        state: dict[str, Any] = {"model": model_sd}
        if optim_sd is not None:
            state["optim"] = optim_sd
        for key, module in (extra_modules or {}).items():
            state[key] = module.state_dict()
        dcp.load(state, checkpoint_id=str(path / "dcp"))
        if optimizer is not None:
            set_state_dict(
                model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
            )
        else:
            model.load_state_dict(state["model"])
        for key, module in (extra_modules or {}).items():
            module.load_state_dict(state[key])
        rng_file = path / f"rng_rank{self.info.rank}.pt"
        if restore_rng and rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False))
        return json.loads((path / STATE_FILE).read_text())


def export_safetensors(
    model: nn.Module,
    args: ModelArgs,
    out_dir: str | Path,
    info: DistInfo,
    dtype: torch.dtype,
    metadata: dict[str, str] | None = None,
    tokenizer: Path | None = None,
) -> Path | None:
    """Gathers full weights (collective) and writes a model dir (with tokenizer.model) on the main rank."""
    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    out = Path(out_dir)
    if info.is_main:
        state = {k: v.detach().to("cpu", dtype) for k, v in full.items()}
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        extra = {"tokenizer.model": tokenizer} if tokenizer else None
        save_model_dir(tmp, args, state, metadata=metadata, extra_files=extra)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    barrier(info)
    return out if info.is_main else None

"""Checkpoints on disk: model + optimizer (DCP, sharded when FSDP) + `TrainState` + per-rank RNG.
What to save and when is `training.checkpoints.Checkpoints`' policy; this is the storage.

    <output>/checkpoints/step_0000100/   complete checkpoints only (written as .tmp, then renamed)
        dcp/                             torch.distributed.checkpoint of model, optimizer, extras
        trainer_state.json               `TrainState`: step, loader cursor, guard, best, history
        rng_rank{r}.pt                   torch (and CUDA) RNG of rank r
        SHA256SUMS                       every file above: a torn checkpoint is never loaded
    <output>/checkpoints/latest          name of the newest complete checkpoint
    <output>/checkpoints/best            name of the best one, never rotated

`latest` and `best` are conveniences re-derived from the checkpoints themselves on resume (the
state names its best step), so a kill between a save and a pointer update cannot leave them
stale. A save that fails (disk full, read-only, vanished directory) removes its temporary
directory, leaves the previous checkpoint as it was and raises StorageError on every rank.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from runtime.errors import StorageError, free_bytes, root_os_error, storage_error
from runtime.integrity import (
    SUMS_FILE,
    ChecksumError,
    atomic_write_text,
    read_sha256sums,
    sha256_file,
    sha256sums_problems,
)
from training.distributed import DistInfo, all_gather_objects, barrier
from training.state import rng_state, set_rng_state

STATE_FILE = "trainer_state.json"
FREE_SPACE_MARGIN = 1.05
FULL_BELOW_BYTES = 1 << 20  # a write error with less free than this is a full disk


def _local_bytes(state: Any) -> int:
    """Bytes this rank holds in a (nested) state dict; sharded tensors count their local shard."""
    if isinstance(state, dict):
        return sum(_local_bytes(v) for v in state.values())
    if isinstance(state, list | tuple):
        return sum(_local_bytes(v) for v in state)
    if hasattr(state, "to_local"):
        state = state.to_local()
    return state.numel() * state.element_size() if isinstance(state, torch.Tensor) else 0


class CheckpointStore:
    def __init__(
        self, root: str | Path, info: DistInfo, keep_last: int = 3, check_free_space: bool = True
    ):
        self.root = Path(root)
        self.info = info
        self.keep_last = keep_last
        self.check_free_space = check_free_space
        self.last_saved: Path | None = None

    def complete(self) -> list[Path]:
        """Checkpoint dirs with a state and a manifest, oldest first (not yet verified)."""
        if not self.root.is_dir():
            return []
        found = [
            p
            for p in self.root.glob("step_*")
            if (p / STATE_FILE).is_file() and (p / SUMS_FILE).is_file()
        ]
        return sorted(found)

    def latest(self) -> Path | None:
        """The newest complete checkpoint (manifest present; see `newest_intact` for SHA256)."""
        complete = self.complete()
        return complete[-1] if complete else None

    def best(self) -> Path | None:
        pointer = self.root / "best"
        target = self.root / pointer.read_text().strip() if pointer.is_file() else None
        return target if target is not None and (target / STATE_FILE).is_file() else None

    def verify(self, path: Path) -> list[str]:
        """SHA256 of every file in the checkpoint's manifest, hashed in parallel by the ranks."""
        try:
            names = sorted(read_sha256sums(path))
        except (OSError, ChecksumError) as exc:
            return [str(exc)]
        mine = names[self.info.rank :: self.info.world_size]
        problems = sha256sums_problems(path, mine)
        gathered = all_gather_objects(problems, self.info)
        return [p for rank_problems in gathered for p in rank_problems]

    def newest_intact(self, log=print) -> Path | None:
        """The newest checkpoint whose files all match its manifest; torn ones are skipped."""
        for path in reversed(self.complete()):
            problems = self.verify(path)
            if not problems:
                return path
            if self.info.is_main:
                log(f"[resume] skipping torn checkpoint {path.name}: {problems[0]}")
        return None

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        trainer_state: dict,
        extras: Extras | None = None,
    ) -> Path:
        """Collective: every rank must call it. Returns the checkpoint dir; raises StorageError
        (on every rank) with the previous checkpoint untouched when storage refuses the write."""
        name = f"step_{step:07d}"
        final, tmp = self.root / name, self.root / f".{name}.tmp"
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd, **_extra_states(extras)}
        try:
            self._agree(self._prepare, tmp, _local_bytes(state) * self.info.world_size)
            self._agree(self._write_shards, tmp, state)
            self._agree(self._seal, tmp, final, {**trainer_state, "step": step})
            self._agree(self._publish, final, trainer_state.get("best_step"))
        except StorageError:
            if self.info.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.last_saved = final
        return final

    def _agree(self, phase, *args) -> None:
        """Runs one phase of a save on every rank; if it failed anywhere, every rank raises."""
        try:
            phase(*args)
            message = None
        except StorageError as exc:
            message = str(exc)
        except (
            OSError,
            RuntimeError,
            ValueError,
            CheckpointException,
        ) as exc:  # DCP wraps I/O errors
            message = str(storage_error("writing checkpoint", args[0], root_os_error(exc)))
            free = free_bytes(self.root)
            if free < FULL_BELOW_BYTES and "space" not in message:
                message += f" (No space left on device: {free / 2**20:.1f} MiB free)"
        messages = [m for m in all_gather_objects(message, self.info) if m]
        if messages:
            raise StorageError(messages[0])

    def _prepare(self, tmp: Path, needed: int) -> None:
        if not self.info.is_main:
            return
        if self.last_saved is not None and not self.last_saved.is_dir():
            raise StorageError(
                f"checkpoint directory {self.root} vanished: {self.last_saved.name} is gone"
            )
        free = free_bytes(self.root)
        if self.check_free_space and free < needed * FREE_SPACE_MARGIN:
            raise StorageError(
                f"not enough space for a checkpoint in {self.root}: needs about "
                f"{needed * FREE_SPACE_MARGIN / 2**20:.0f} MiB, {free / 2**20:.0f} MiB free"
            )
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    def _write_shards(self, tmp: Path, state: dict) -> None:
        dcp.save(state, checkpoint_id=str(tmp / "dcp"))
        torch.save(rng_state(), tmp / f"rng_rank{self.info.rank}.pt")

    def _seal(self, tmp: Path, final: Path, trainer_state: dict) -> None:
        """State file and manifest (every rank hashes its own files), then the rename."""
        barrier(self.info)
        mine = [
            p
            for p in tmp.rglob("*")
            if p.is_file() and _owner(p, self.info.world_size) == self.info.rank
        ]
        digests = {str(p.relative_to(tmp)): sha256_file(p) for p in mine}
        gathered = all_gather_objects(digests, self.info)
        if not self.info.is_main:
            return
        atomic_write_text(tmp / STATE_FILE, json.dumps(trainer_state, indent=2) + "\n")
        digests = {k: v for d in gathered for k, v in d.items()}
        digests[STATE_FILE] = sha256_file(tmp / STATE_FILE)
        lines = "".join(f"{digest}  {n}\n" for n, digest in sorted(digests.items()))
        atomic_write_text(tmp / SUMS_FILE, lines)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)

    def _publish(self, final: Path, best_step: int | None) -> None:
        self.point_to(final, best_step)
        if self.info.is_main:
            self._rotate()

    def point_to(self, latest: Path, best_step: int | None) -> None:
        """Rewrites `latest` and `best` from a checkpoint and the best step its state names."""
        if not self.info.is_main:
            return
        atomic_write_text(self.root / "latest", latest.name + "\n")
        best = self.root / f"step_{best_step:07d}" if best_step is not None else None
        if best is not None and (best / STATE_FILE).is_file():
            atomic_write_text(self.root / "best", best.name + "\n")

    def _rotate(self) -> None:
        best = self.best()
        protected = {p.name for p in (best, self.latest()) if p is not None}
        steps = self.complete()
        for old in steps[: max(len(steps) - self.keep_last, 0)]:
            if old.name not in protected:
                shutil.rmtree(old)

    def load(
        self,
        path: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        extras: Extras | None = None,
        restore_rng: bool = True,
    ) -> dict:
        """Loads a checkpoint into the (already parallelised) model/optimizer; returns trainer state."""
        model_sd, optim_sd = (
            get_state_dict(model, optimizer) if optimizer else (get_model_state_dict(model), None)
        )
        state: dict[str, Any] = {"model": model_sd, **_extra_states(extras)}
        if optim_sd is not None:
            state["optim"] = optim_sd
        dcp.load(state, checkpoint_id=str(path / "dcp"))
        if optimizer is not None:
            set_state_dict(
                model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
            )
        else:
            model.load_state_dict(state["model"])
        for key, (module, extra_optimizer) in (extras or {}).items():
            if extra_optimizer is None:
                module.load_state_dict(state[key]["model"])
            else:
                set_state_dict(module, extra_optimizer, model_state_dict=state[key]["model"],
                               optim_state_dict=state[key]["optim"])  # fmt: skip
        rng_file = path / f"rng_rank{self.info.rank}.pt"
        if restore_rng and rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        self.last_saved = path
        return json.loads((path / STATE_FILE).read_text())


Extras = dict[str, tuple[nn.Module, "torch.optim.Optimizer | None"]]


def _extra_states(extras: Extras | None) -> dict[str, dict]:
    """The state of every module saved beside the model (the critic's value head), with its
    optimizer's when it has one."""
    states = {}
    for key, (module, optimizer) in (extras or {}).items():
        if optimizer is None:
            states[key] = {"model": module.state_dict()}
        else:
            module_sd, optim_sd = get_state_dict(module, optimizer)
            states[key] = {"model": module_sd, "optim": optim_sd}
    return states


def _owner(path: Path, world_size: int) -> int:
    """The rank that hashes a file: DCP's `__{rank}_{i}.distcp` and `rng_rank{r}.pt` by their
    writer, the rest by rank 0."""
    name = path.name
    if name.startswith("__") and name.endswith(".distcp"):
        return int(name[2:].split("_")[0]) % world_size
    if name.startswith("rng_rank"):
        return int(name.removeprefix("rng_rank").split(".")[0]) % world_size
    return 0

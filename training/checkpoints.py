"""The checkpoint manager: it owns what a checkpoint holds (model, optimizer, the critic's value
head and its optimizer, the loader's cursor, `TrainState`) and every policy about it, so the loop only says
`checkpoints.save(step, best=..., last=...)`.

    when         every `checkpoint.every_steps`, at a new best `checkpoint.best_metric`, at the
                 last step (or an early stop)
    on failure   storage that refuses a write (disk full, read-only, vanished) stops the run
                 (exit 5) unless `checkpoint.periodic_save_failure: skip` and the save was a
                 periodic or best one: then it warns, trains on, and `best` rolls back to the
                 last saved one
    mirror       each saved checkpoint is uploaded to S3 in the background (`s3.checkpoints`),
                 and on a clean disk `resume` downloads the newest complete one
    restore      `resume` loads the newest intact checkpoint; `restore_after_bad_parameters`
                 rewinds to it when the parameters went non-finite
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from data.loader import TrainLoader
from runtime.config import S3Config
from runtime.errors import EXIT_NAN, StorageError
from training.checkpoint_store import CheckpointStore, Extras
from training.distributed import DistInfo
from training.failures import TrainingFailure
from training.mirror import CheckpointMirror, restore_from_mirror
from training.recipe import CheckpointSection
from training.state import TrainState


class Checkpoints:
    def __init__(
        self,
        root: Path,
        section: CheckpointSection,
        info: DistInfo,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        extras: Extras,
        loader: TrainLoader,
        state: TrainState,
        s3: S3Config | None = None,
        run_name: str = "run",
    ):
        self.store = CheckpointStore(root, info, section.keep_last, section.check_free_space)
        self.section, self.info = section, info
        self.model, self.optimizer, self.extras = model, optimizer, extras
        self.loader, self.state = loader, state
        mirrored = s3 is not None and s3.checkpoints
        self.mirror = CheckpointMirror(s3, run_name) if mirrored and info.is_main else None
        self._from_mirror = mirrored
        self._saved_best: tuple[float | None, int | None] = (None, None)

    # ------------------------------------------------------------------ resume
    def resume(self) -> bool:
        """Loads the newest intact checkpoint (local, else from the S3 mirror on a clean disk)
        into everything the manager owns; False when there is none or resume is off."""
        if self.section.resume != "auto":
            return False
        latest = self.store.newest_intact()
        if latest is None and self._from_mirror:
            restore_from_mirror(self.mirror, self.store.root, self.info)
            latest = self.store.newest_intact()
        if latest is None:
            return False
        self._load(latest, restore_rng=True)
        self.store.point_to(latest, self.state.best_step)
        if self.info.is_main:
            print(f"[resume] {latest} (step {self.state.step})", flush=True)
        return True

    def _load(self, path: Path, restore_rng: bool) -> None:
        trainer_state = self.store.load(path, self.model, self.optimizer, self.extras, restore_rng)
        self.state.load_state_dict(trainer_state)
        self.loader.load_state_dict(self.state.loader)
        self._saved_best = (self.state.best_val, self.state.best_step)

    def restore_after_bad_parameters(self) -> None:
        """Parameters went non-finite: load the newest intact checkpoint and rewind the step
        counter, history and data order with it (the guards' own counters carry on)."""
        restored = self.store.newest_intact()
        if restored is None:
            raise TrainingFailure(
                "parameters became non-finite and no checkpoint exists to restore",
                "lower train.lr or set checkpoint.every_steps, then rerun",
                EXIT_NAN,
            )
        guard = self.state.guard
        self._load(restored, restore_rng=False)
        self.state.guard = guard
        guard.restores += 1
        if self.info.is_main:
            print(
                f"[guard] parameters became non-finite: restored {restored.name}; step counter, "
                f"history and data order rewound to step {self.state.step}",
                flush=True,
            )

    # -------------------------------------------------------------------- save
    def save(self, step: int, best: bool = False, last: bool = False) -> None:
        """Called after every step (collective): saves when the policy says so. `best`: this
        step set a new best metric; `last`: the run ends after it (final step or early stop)."""
        every = self.section.every_steps
        if last or best or (every and step % every == 0):
            self._save(step, last)
        if self.mirror is not None:
            self.mirror.check()  # a background upload that failed stops the run here

    def _save(self, step: int, last: bool) -> None:
        self.state.loader = self.loader.state_dict()
        try:
            path = self.store.save(
                step, self.model, self.optimizer, self.state.state_dict(), self.extras
            )
        except StorageError as exc:
            if last or self.section.periodic_save_failure == "stop":
                raise
            self.state.best_val, self.state.best_step = self._saved_best
            if self.info.is_main:
                print(f"[warning] checkpoint of step {step} skipped: {exc}", flush=True)
            return
        self._saved_best = (self.state.best_val, self.state.best_step)
        if self.mirror is not None:  # uploaded in the background; kept in S3 as on disk
            keep = {p.name for p in self.store.complete()}
            self.mirror.upload(path, f"checkpoints/{path.name}", keep)

    def finish(self, export: Path | None) -> None:
        """Uploads the export (when mirrored) and waits for every upload."""
        if self.mirror is None:
            return
        if export is not None:
            self.mirror.upload(export, "export/final")
        self.mirror.drain()

    def export_uri(self, export: Path) -> str:
        """Where the registry should point: the S3 copy when mirrored, else the local path."""
        return self.mirror.uri("export/final") if self.mirror else str(export.resolve())

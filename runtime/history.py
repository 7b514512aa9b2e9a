"""Run histories: every logged entry of a training run, in `<run>/reports/<run_id>_history.json`
(written by the run's report). This module is their one reader."""

from __future__ import annotations

import json
from pathlib import Path

from runtime.integrity import atomic_write_text

SUFFIX = "_history.json"


def write_history(reports: Path, run_id: str, history: list[dict]) -> Path:
    path = reports / f"{run_id}{SUFFIX}"
    atomic_write_text(path, json.dumps(history))
    return path


def history_file(run_dir: str | Path) -> Path | None:
    """The newest history under `run_dir/reports` (the last run that wrote one), or None."""
    found = sorted(
        Path(run_dir).glob(f"reports/*{SUFFIX}"), key=lambda p: (p.stat().st_mtime_ns, p.name)
    )
    return found[-1] if found else None


def read_history(run_dir: str | Path, stage: str | None = None) -> list[dict]:
    """The entries of a run's newest history ([] when it has none); with `stage`, only those of
    that stage (`step`, `stage1`, `critic_eval`, ...)."""
    path = history_file(run_dir)
    entries = json.loads(path.read_text()) if path is not None else []
    return [h for h in entries if stage is None or h.get("stage") == stage]


def run_id_of(run_dir: str | Path) -> str | None:
    """The run id whose history is newest in `run_dir`."""
    path = history_file(run_dir)
    return path.name.removesuffix(SUFFIX) if path is not None else None

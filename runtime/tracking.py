"""MLflow tracking: embedded sqlite store by default, any tracking URI by config.

Only the main rank tracks; other ranks get a tracker whose calls do nothing. Parameters are
scrubbed of anything that looks like a secret before they are logged.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from runtime.config import MlflowConfig

_SECRET_KEY = re.compile(
    r"(^|_)(secret|token|password|passwd|credentials?|api_?key|access_?key)(_|$)", re.I
)
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "HF_TOKEN",
               "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "VESSL_ACCESS_TOKEN")  # fmt: skip


def scrub(params: dict[str, Any]) -> dict[str, Any]:
    """Drops keys named like secrets and masks any value equal to a secret environment variable."""
    secrets = {os.environ[v] for v in _SECRET_ENV if os.environ.get(v)}
    out = {}
    for k, v in params.items():
        if _SECRET_KEY.search(k.split(".")[-1]) and not k.endswith(
            ("max_tokens", "sample_tokens", "tokenizer")
        ):
            continue
        out[k] = "***" if str(v) in secrets else v
    return out


def scrub_tree(data: Any) -> Any:
    """`scrub` applied through nested dicts/lists (for recipe snapshots in reports)."""
    secrets = {os.environ[v] for v in _SECRET_ENV if os.environ.get(v)}
    if isinstance(data, dict):
        return {k: scrub_tree(v) for k, v in data.items() if not _SECRET_KEY.search(str(k))}
    if isinstance(data, list):
        return [scrub_tree(v) for v in data]
    return "***" if isinstance(data, str) and data in secrets else data


class Tracker:
    def __init__(self, config: MlflowConfig, active: bool = True):
        self.active = active and config.enabled
        self.config = config
        self.run_id: str | None = None
        self._mlflow = None

    def start(
        self,
        experiment: str,
        run_name: str | None,
        params: dict[str, Any],
        tags: dict[str, str] | None = None,
        run_id: str | None = None,
    ) -> str | None:
        """Starts (or, given `run_id`, resumes) a run and logs `params` (scrubbed, ≤ 500 chars)."""
        if not self.active:
            return None
        import mlflow

        self._mlflow = mlflow
        mlflow.set_tracking_uri(self.config.tracking_uri)
        mlflow.set_experiment(experiment)
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, tags=tags)
        self.run_id = run.info.run_id
        if run_id is None:
            clean = {k: str(v)[:500] for k, v in scrub(params).items()}
            items = list(clean.items())
            for i in range(0, len(items), 100):
                mlflow.log_params(dict(items[i : i + 100]))
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self._mlflow:
            finite = {
                k: float(v)
                for k, v in metrics.items()
                if v is not None and v == v and abs(v) != float("inf")
            }
            self._mlflow.log_metrics(finite, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self._mlflow:
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self._mlflow:
            self._mlflow.set_tags(tags)

    def end(self, status: str = "FINISHED") -> None:
        if self._mlflow:
            self._mlflow.end_run(status=status)
            self._mlflow = None

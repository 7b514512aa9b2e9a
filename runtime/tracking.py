"""MLflow tracking: embedded sqlite store by default, any tracking URI by config.

Only the main rank tracks; other ranks get a tracker whose calls do nothing. Parameters are
scrubbed of anything that looks like a secret before they are logged.
"""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path
from typing import Any

from runtime.config import MlflowConfig

_SECRET_KEY = re.compile(
    r"(^|_)(secret|token|password|passwd|credentials?|api_?key|access_?key)(_|$)", re.I
)
_SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SESSION_TOKEN",
    "HF_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "VESSL_ACCESS_TOKEN",
)


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
    """Thin MlflowClient wrapper with an explicit tracking URI (no process-global MLflow state)."""

    def __init__(self, config: MlflowConfig, active: bool = True):
        self.active = active and config.enabled
        self.config = config
        self.run_id: str | None = None
        self._client = None

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
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self._client = MlflowClient(tracking_uri=self.config.tracking_uri)
        if run_id is not None:
            self._client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            return run_id
        found = self._client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self._client.create_experiment(experiment)
        safe_name = scrub({"run_name": run_name}).get("run_name")
        run = self._client.create_run(experiment_id, run_name=safe_name, tags=tags or {})
        self.run_id = run.info.run_id
        clean = [Param(k, str(v)[:500]) for k, v in scrub(params).items()]
        for i in range(0, len(clean), 100):
            self._client.log_batch(self.run_id, params=clean[i : i + 100])
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self._client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        finite = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if v is not None and math.isfinite(v)
        ]
        if finite:
            self._client.log_batch(self.run_id, metrics=finite)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self._client is not None:
            self._client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def end(self, status: str = "FINISHED", reason: str | None = None) -> None:
        """Ends the run; a failed run carries its reason in the `failure` tag."""
        if self._client is not None:
            if reason:
                self._client.set_tag(self.run_id, "failure", reason[:5000])
            self._client.set_terminated(self.run_id, status=status)
            self._client = None

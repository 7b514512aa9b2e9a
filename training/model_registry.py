"""The MLflow model registry (MLflow 3: aliases, no stages): a finished run's export registered
by reference as `wmtp-{algo}`, and promotions that keep their history.

A version's source is the export's S3 URI (when checkpoints are mirrored) or local path; nothing
is copied into the artifact store. Its tags carry the run id, algorithm, data hash, recipe and
evaluation summary, its description the release note. `promote` moves the `staging` or
`production` alias and records who, when and why in the version's tags and description.
"""

from __future__ import annotations

import datetime as dt
import getpass

import yaml

from runtime.config import MlflowConfig

HISTORY_HEADER = "Promotion history:"


def client(config: MlflowConfig):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=config.tracking_uri, registry_uri=config.tracking_uri)


def register_export(
    config: MlflowConfig,
    name: str,
    source: str,
    run_id: str,
    tags: dict[str, str],
    recipe: dict,
    release_note: str,
) -> str:
    """Registers `source` as a new version of `name` (created if new); returns the version."""
    from mlflow.exceptions import MlflowException

    registry = client(config)
    try:
        registry.get_registered_model(name)
    except MlflowException:
        registry.create_registered_model(
            name, tags={"project": "wmtp"}, description="WMTP fine-tunes of Meta's MTP LLaMA"
        )
    all_tags = {
        **{k: str(v)[:5000] for k, v in tags.items()},
        "recipe": yaml.safe_dump(recipe, sort_keys=False)[:5000],
        "source": source,
    }
    version = registry.create_model_version(
        name, source=source, run_id=run_id, tags=all_tags, description=release_note
    )
    return str(version.version)


def promote(
    config: MlflowConfig, name: str, version: str, to: str, notes: str, who: str | None = None
) -> str:
    """Points alias `to` at `version`; the version (and the one that held the alias before)
    record who/when/why. Returns the history line."""
    registry = client(config)
    who = who or getpass.getuser()
    when = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    target = registry.get_model_version(name, version)  # fails clearly when it does not exist
    previous = registry.get_registered_model(name).aliases.get(to)
    line = f"- {when} {who}: → {to}. {notes}".rstrip()
    registry.set_registered_model_alias(name, to, version)
    for key, value in {"promoted_at": when, "promoted_by": who, "notes": notes}.items():
        registry.set_model_version_tag(name, version, f"{to}.{key}", value)
    registry.update_model_version(name, version, _with_history(target.description, line))
    if previous is not None and str(previous) != str(version):
        old = registry.get_model_version(name, str(previous))
        moved = f"- {when} {who}: {to} moved to version {version}. {notes}".rstrip()
        registry.update_model_version(name, str(previous), _with_history(old.description, moved))
    return line


def _with_history(description: str | None, line: str) -> str:
    text = (description or "").rstrip()
    if HISTORY_HEADER not in text:
        text = f"{text}\n\n{HISTORY_HEADER}" if text else HISTORY_HEADER
    return f"{text}\n{line}"


def register_run(config: MlflowConfig, recipe, state, source: str, data_hash: str) -> str:
    """Registers a finished run's export as `tracking.registry_name`; returns 'name vN'."""
    from runtime.schema import to_dict
    from runtime.tracking import scrub_tree

    algo = recipe.weighting.algo
    name = recipe.tracking.registry_name.format(algo=algo)
    last = next((h for h in reversed(state.history) if h.get("stage") == "step"), {})
    summary = {k: last[k] for k in ("loss", "val_loss", "pass_at_1") if k in last}
    if state.best_val is not None:
        summary[f"best_{recipe.checkpoint.best_metric}".replace("@", "_at_")] = state.best_val
    note = recipe.tracking.release_note or (
        f"{algo} fine-tune of {recipe.model.base} on {recipe.data.dataset} ({state.step} steps, "
        f"data hash {data_hash[:12]}): " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items())
    )
    tags = {
        "algo": algo,
        "run_id": state.run_id,
        "data_hash": data_hash,
        "steps": state.step,
        **{f"eval.{k}": f"{v:.6g}" for k, v in summary.items()},
    }
    version = register_export(
        config, name, source, state.run_id, tags, scrub_tree(to_dict(recipe)), note
    )
    return f"{name} v{version}"

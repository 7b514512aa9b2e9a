"""Promote a registered model version: `python -m training.promote NAME VERSION --to staging|production --notes "..."`.

Moves the MLflow alias and records who, when and why on the version (training/model_registry.py).
"""

from __future__ import annotations

import sys

from runtime.cli import ArgumentParser, entry_point
from runtime.config import load_env_config
from runtime.errors import InputError
from training.model_registry import promote


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="registered model, e.g. wmtp-rho1-wmtp")
    parser.add_argument("version")
    parser.add_argument("--to", choices=("staging", "production"), required=True)
    parser.add_argument("--notes", required=True, help="why: release notes for this promotion")
    parser.add_argument("--config", help="environment config (MLflow tracking URI)")
    a = parser.parse_args(argv)
    env = load_env_config(a.config)
    from mlflow.exceptions import MlflowException

    try:
        line = promote(env.mlflow, a.name, a.version, a.to, a.notes)
    except MlflowException as exc:
        raise InputError(f"{a.name} version {a.version}: {exc.message}") from None
    print(f"[promote] {a.name} v{a.version} {line.removeprefix('- ')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

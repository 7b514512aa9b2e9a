"""The layout's rules, checked on the source: which folder may import which, file sizes, and a
loss that is a plain function of tensors (docs/architecture.md)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

PACKAGES = ("model", "weighting", "data", "training", "evaluation", "assets", "launch", "runtime")
# folder -> project packages it must never import
FORBIDDEN = {
    "model": {"weighting", "data", "training", "evaluation", "assets", "launch"},
    "weighting": {"model", "data", "training", "evaluation", "assets", "launch"},
    "data": {"evaluation", "training", "weighting", "assets", "launch"},
    "runtime": {"model", "weighting", "data", "training", "evaluation", "assets", "launch"},
    "evaluation": {"training", "weighting", "assets", "launch"},
    "training": {"assets", "launch"},  # evaluation: pass@1 during training (execution_eval.py)
}


def project_imports(path: Path) -> set[str]:
    """Top-level project packages a file imports (anywhere in it, lazily or not)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        found |= {n.split(".")[0] for n in names if n.split(".")[0] in PACKAGES}
    return found


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_folders_import_only_what_their_concern_allows(folder):
    offenders = {
        f"{path.relative_to(REPO_ROOT)} imports {bad}"
        for path in (REPO_ROOT / folder).glob("*.py")
        for bad in project_imports(path) & FORBIDDEN[folder]
    }
    assert not offenders, sorted(offenders)


def test_training_modules_stay_short_and_the_loop_lives_in_train_wmtp():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (REPO_ROOT / "training").glob("*.py")}
    assert max(sizes.values()) <= 300, sizes
    assert not (REPO_ROOT / "training" / "trainer.py").exists()
    main = (REPO_ROOT / "train_wmtp.py").read_text()
    for step in ("mtp_loss_backward(", "weighter.scores(", "optimizer.step()", "validation_loss("):
        assert step in main, f"the loop in train_wmtp.py no longer calls {step}"


def test_the_loss_takes_tensors_not_callables():
    from training import loss

    for name, fn in inspect.getmembers(loss, inspect.isfunction):
        if fn.__module__ != loss.__name__:
            continue
        for param in inspect.signature(fn).parameters.values():
            annotation = str(param.annotation)
            assert "Callable" not in annotation, f"training.loss.{name}({param.name}: {annotation})"

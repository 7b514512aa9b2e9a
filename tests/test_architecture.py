"""The layout's rules, checked on the source's syntax tree (never its text or docstrings): which
folder may import which, the loop and the step in plain sight in train_wmtp.py, a loss that is a
function of tensors, no fault-injection hooks and no algorithm names outside `weighting/`
(docs/architecture.md)."""

from __future__ import annotations

import ast
import collections.abc
import inspect
import typing
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
PRODUCTION = [
    p for folder in (*PACKAGES, "bench") for p in sorted((REPO_ROOT / folder).glob("*.py"))
] + sorted(REPO_ROOT.glob("*.py"))


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


def function(path: Path, name: str) -> ast.FunctionDef:
    tree = ast.parse(path.read_text())
    return next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)


def calls(node: ast.AST) -> list[str]:
    """Dotted names of the calls made inside `node`, in source order (`a.b(...)` → 'a.b')."""
    found = []
    for sub in ast.walk(node):
        if isinstance(sub, ast.Call):
            found.append((sub.lineno, sub.col_offset, ast.unparse(sub.func)))
    return [name for *_, name in sorted(found)]


def in_order(seen: list[str], wanted: list[str]) -> bool:
    position = 0
    for name in seen:
        if position < len(wanted) and name == wanted[position]:
            position += 1
    return position == len(wanted)


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_folders_import_only_what_their_concern_allows(folder):
    offenders = {
        f"{path.relative_to(REPO_ROOT)} imports {bad}"
        for path in (REPO_ROOT / folder).glob("*.py")
        for bad in project_imports(path) & FORBIDDEN[folder]
    }
    assert not offenders, sorted(offenders)


def test_the_loop_reads_batch_weights_loss_guards_update_log_validate_checkpoint():
    main = REPO_ROOT / "train_wmtp.py"
    loop = next(n for n in ast.walk(function(main, "train")) if isinstance(n, ast.While))
    assert loop.end_lineno - loop.lineno < 60, "the step loop grew: move policy into its owners"
    assert in_order(
        calls(loop),
        ["loader.next_step", "train_step", "clip_gradients", "totals.reduce",
         "guards.update_is_finite", "optimizer.step", "validate", "log", "checkpoints.save"],
    ), calls(loop)  # fmt: skip
    step = function(main, "train_step")
    assert in_order(
        calls(step),
        ["model", "weighter.scores", "signals.inputs", "weighter.weights", "mtp_loss_backward",
         "totals.add"],
    ), calls(step)  # fmt: skip
    sizes = {p.name: len(p.read_text().splitlines()) for p in (REPO_ROOT / "training").glob("*.py")}
    assert max(sizes.values()) <= 300, sizes


def test_the_loop_never_branches_on_an_algorithm_name():
    from weighting import WEIGHTERS

    for path in [REPO_ROOT / "train_wmtp.py", *sorted((REPO_ROOT / "training").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert node.value not in WEIGHTERS, (
                    f"{path.name}:{node.lineno} names {node.value!r}"
                )


def test_no_fault_injection_hooks_in_production_code():
    """Faults are injected from tests/faults.py alone: nothing a training run executes names
    them (the sandbox's and the lock files' own kills are not hooks)."""
    run_code = {"training", "data", "model", "weighting", "runtime", "main"}
    for path in [p for p in PRODUCTION if p.parent.name in run_code]:
        tree = ast.parse(path.read_text())
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        names |= {n.arg for n in ast.walk(tree) if isinstance(n, ast.arg)}
        names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        words = {"kill", "fault", "faults", "stall", "inject"}
        hooks = {n for n in names if words & set(n.lower().split("_")) or "kill_point" in n}
        assert not hooks, f"{path.relative_to(REPO_ROOT)}: {sorted(hooks)}"


def _mentions_callable(hint) -> bool:
    if hint is collections.abc.Callable or typing.get_origin(hint) is collections.abc.Callable:
        return True
    return any(_mentions_callable(arg) for arg in typing.get_args(hint))


def test_the_loss_takes_tensors_not_callables():
    from training import loss

    for name, fn in inspect.getmembers(loss, inspect.isfunction):
        if fn.__module__ != loss.__name__:
            continue
        hints = typing.get_type_hints(fn)
        for param in inspect.signature(fn).parameters:
            assert param in hints, f"training.loss.{name}({param}) has no type"
            assert not _mentions_callable(hints[param]), f"training.loss.{name}({param})"
        tree = function(Path(loss.__file__), name)
        params = {a.arg for a in tree.args.args} - {"model"}  # the model's modules are called
        called = {c for c in calls(tree) if "." not in c}  # `fn(...)`, not `t.sum()`
        assert not params & called, f"training.loss.{name} calls its argument {params & called}"

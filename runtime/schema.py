"""Plain-dataclass validation of YAML recipes and config: one clear message per bad key.

`build(cls, data)` turns nested dicts into nested dataclasses, checking every value against its
type hint (int, float, str, bool, Literal, X | None, list[X], tuple, nested dataclass), rejecting
unknown keys with a did-you-mean, then calling each dataclass's `validate()` if it has one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from runtime.errors import InputError


class ConfigError(InputError):
    """A recipe or config value is wrong; the message names the key, the value and what is allowed."""


def did_you_mean(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check(value: Any, hint: Any, where: str) -> Any:
    origin = get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"{where}={value!r} fits none of {hint}"
        )
    if origin is Literal:
        if value not in get_args(hint):
            allowed = ", ".join(repr(a) for a in get_args(hint))
            raise ConfigError(
                f"{where}={value!r} is invalid: allowed {allowed}{did_you_mean(str(value), [str(a) for a in get_args(hint)])}"
            )
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}={value!r} is invalid: expected a list")
        (item,) = get_args(hint)[:1] or (Any,)
        items = [_check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}={value!r} is invalid: expected a mapping")
        return dict(value)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}={value!r} is invalid: expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}={value!r} is invalid: expected an integer")
        return value
    if hint is float:
        if isinstance(value, str) and _looks_numeric(value):  # YAML 1.1 reads 1e-5 as a string
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}={value!r} is invalid: expected a number")
        if not math.isfinite(value):
            raise ConfigError(f"{where}={value!r} is invalid: expected a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}={value!r} is invalid: expected a string")
        return value
    return value


def build(cls: type, data: Any, where: str = "") -> Any:
    """Instance of dataclass `cls` from a mapping, validated (see module docstring)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'recipe'}={data!r} is invalid: expected a mapping")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        name = f"{where}.{key}" if where else key
        raise ConfigError(
            f"unknown key {name!r}{did_you_mean(key, list(fields))}; allowed: {', '.join(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _check(value, hints[name], f"{where}.{name}" if where else name)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing key {(where + '.' if where else '') + missing[0]!r}")
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(where)
    return obj


def require(ok: bool, where: str, value: Any, allowed: str) -> None:
    """Raises ConfigError('<where>=<value> is invalid: <allowed>') unless ok."""
    if not ok:
        raise ConfigError(f"{where}={value!r} is invalid: {allowed}")


def key(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=1e-4' → (['train', 'lr'], 0.0001); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is invalid: expected key=value (e.g. train.lr=1e-4)")
    dotted, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw else ""
    return dotted.strip().split("."), value


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    return data


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def to_dict(obj: Any) -> Any:
    """Dataclass tree → plain dict/list tree (for snapshots and MLflow params)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    return obj


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in data.items():
        name = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, name))
        else:
            out[name] = v
    return out

"""Model files on disk: Meta consolidated.pth and this project's sharded safetensors model dirs
with SHA256SUMS (Hugging Face LLaMA import and export: `model.hf`).

The on-disk layout this project writes (a "model dir"):

    params.json                         ModelArgs
    model.safetensors                   or model-00001-of-0000N.safetensors + index json
    model.safetensors.index.json        {"metadata": {"total_size": ...}, "weight_map": {...}}
    SHA256SUMS                          sha256sum format, every file above
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.args import ModelArgs
from model.transformer import Transformer
from runtime.errors import InputError
from runtime.integrity import (
    ChecksumError,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    verify_sha256sums,
    write_sha256sums,
)
from runtime.progress import Progress

META_IGNORED_KEYS = frozenset({"rope.freqs"})
PARAMS_FILE = "params.json"
SAFETENSORS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30

__all__ = [
    "ChecksumError",
    "build_model",
    "load_checkpoint_dir",
    "load_meta_checkpoint",
    "load_model_dir",
    "load_state_dict_strict",
    "save_model_dir",
    "save_safetensors",
    "load_safetensors",
]


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return state
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def read_params(path: Path) -> dict:
    """A params.json as a dict; a missing or malformed file is one clear InputError."""
    if not path.is_file():
        raise InputError(f"{path}: model params file not found")
    try:
        params = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path}: not a valid params.json ({exc})") from None
    if not isinstance(params, dict):
        raise InputError(f"{path}: not a valid params.json (expected an object)")
    return params


def find_meta_weights(ckpt_dir: Path) -> Path:
    """Meta ships `consolidated.pth` (MTP release) or `consolidated.00.pth` (llama releases)."""
    candidates = sorted(ckpt_dir.glob("consolidated*.pth"))
    if not candidates:
        raise FileNotFoundError(f"no consolidated*.pth in {ckpt_dir}")
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        raise ValueError(
            f"{ckpt_dir} holds {len(candidates)} model-parallel shards ({names}); "
            "merge them first: only single-file checkpoints are supported"
        )
    return candidates[0]


def load_meta_checkpoint(
    ckpt_dir: str | Path, dtype: torch.dtype | None = None, mmap: bool = True, **arg_overrides
) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """Reads params.json and consolidated.pth (memory-mapped) from a Meta checkpoint dir.

    `rope.freqs` is dropped. A params.json `vocab_size` of -1 is taken from tokenizer.model.
    """
    ckpt_dir = Path(ckpt_dir)
    params = read_params(ckpt_dir / PARAMS_FILE)
    if params.get("vocab_size", -1) <= 0 and "vocab_size" not in arg_overrides:
        from model.tokenizer import Tokenizer

        arg_overrides["vocab_size"] = Tokenizer(ckpt_dir / "tokenizer.model").n_words
    args = ModelArgs.from_dict(params, **arg_overrides)
    weights = find_meta_weights(ckpt_dir)
    try:
        state = torch.load(weights, map_location="cpu", mmap=mmap, weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise ChecksumError(f"{weights}: not a readable PyTorch checkpoint ({exc})") from None
    state = {k: v for k, v in state.items() if k not in META_IGNORED_KEYS}
    return args, _cast(state, dtype)


def load_checkpoint_dir(
    path: str | Path, dtype: torch.dtype | None = None
) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """A Meta checkpoint dir (consolidated*.pth) or a model dir of this project (SHA256-verified)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model dir not found: {path}")
    if any(path.glob("consolidated*.pth")):
        return load_meta_checkpoint(path, dtype=dtype)
    return load_model_dir(path, dtype=dtype)


def load_state_dict_strict(model: Transformer, state: dict[str, torch.Tensor]) -> None:
    """load_state_dict(strict=True, assign=True) with a readable list of what did not match."""
    expected, given = set(model.state_dict()), set(state) - META_IGNORED_KEYS
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise KeyError(
            f"checkpoint does not fit the model: {len(missing)} missing keys {missing[:8]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:8]}"
        )
    for name, tensor in model.state_dict().items():
        if tensor.shape != state[name].shape:
            raise ValueError(
                f"checkpoint tensor {name} has shape {tuple(state[name].shape)}, "
                f"model expects {tuple(tensor.shape)}"
            )
    model.load_state_dict({k: state[k] for k in expected}, strict=True, assign=True)


def build_model(
    args: ModelArgs,
    state: dict[str, torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Transformer:
    """Builds a Transformer without a throw-away random init, then loads `state` into it."""
    if state is None:
        model = Transformer(args).to(device=device, dtype=dtype)
        model.init_weights()
        return model
    with torch.device("meta"):
        model = Transformer(args)
    load_state_dict_strict(model, state)
    return model.to(device=device, dtype=dtype)


def _shards(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def save_safetensors(
    state: dict[str, torch.Tensor],
    out_dir: str | Path,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    metadata: dict[str, str] | None = None,
    progress: str | None = None,
) -> list[str]:
    """Writes `state` as one or more safetensors files (atomically) plus the index json.

    Only one shard's tensors are materialised at a time, so memory-mapped inputs stream through.
    With a `progress` label, shows MiB written, rate and ETA. Returns the file names written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = _shards(state, max_shard_bytes)
    names = (
        [SAFETENSORS_FILE]
        if len(groups) == 1
        else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    )
    weight_map = {}
    total = sum(t.numel() * t.element_size() for t in state.values())
    written = Progress(
        progress or "", total, "MiB", scale=2**20, heartbeat=True, enabled=progress is not None
    )
    with written:
        for filename, keys in zip(names, groups, strict=True):
            tensors = {k: state[k].detach().contiguous().clone() for k in keys}
            with atomic_path(out_dir / filename) as tmp:
                save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})})
            weight_map.update(dict.fromkeys(keys, filename))
            written.update(sum(t.numel() * t.element_size() for t in tensors.values()), filename)
            del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    atomic_write_text(out_dir / INDEX_FILE, json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [*names, INDEX_FILE]


def _safetensors_files(model_dir: Path) -> list[str]:
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            return sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ChecksumError(f"{index}: not a valid safetensors index ({exc})") from None
    if (model_dir / SAFETENSORS_FILE).is_file():
        return [SAFETENSORS_FILE]
    raise FileNotFoundError(f"no {INDEX_FILE} or {SAFETENSORS_FILE} in {model_dir}")


def load_safetensors(
    model_dir: str | Path, dtype: torch.dtype | None = None, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    model_dir = Path(model_dir)
    state: dict[str, torch.Tensor] = {}
    for filename in _safetensors_files(model_dir):
        try:
            with safe_open(str(model_dir / filename), framework="pt", device=device) as f:
                for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    state[key] = f.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise ChecksumError(
                f"{model_dir / filename}: not a readable safetensors file ({exc})"
            ) from None
    return _cast(state, dtype)


def save_model_dir(
    out_dir: str | Path,
    args: ModelArgs,
    state: dict[str, torch.Tensor],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    metadata: dict[str, str] | None = None,
    extra_files: dict[str, Path] | None = None,
    progress: str | None = None,
) -> list[str]:
    """params.json + safetensors (+ copies of `extra_files`, e.g. tokenizer.model) + SHA256SUMS.

    Returns every file written (SHA256SUMS last).
    """
    out_dir = Path(out_dir)
    files = save_safetensors(state, out_dir, max_shard_bytes, metadata, progress)
    atomic_write_text(out_dir / PARAMS_FILE, json.dumps(args.to_dict(), indent=2) + "\n")
    files.append(PARAMS_FILE)
    for name, source in (extra_files or {}).items():
        atomic_write_bytes(out_dir / name, Path(source).read_bytes())
        files.append(name)
    write_sha256sums(out_dir, files)
    return [*files, "SHA256SUMS"]


def load_model_dir(
    model_dir: str | Path,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    verify: bool = True,
) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """Reads a model dir written by `save_model_dir`, checking SHA256SUMS first when `verify`."""
    model_dir = Path(model_dir)
    if verify:
        verify_sha256sums(model_dir)
    args = ModelArgs.from_params_json(model_dir / PARAMS_FILE)
    return args, load_safetensors(model_dir, dtype=dtype, device=device)

"""The run's final export: the full-weight safetensors model dir that evaluation reads (other
formats: `model.export`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from model.args import ModelArgs
from model.weights import save_model_dir
from runtime.errors import StorageError, storage_error
from training.distributed import DistInfo, barrier


def export_safetensors(
    model: nn.Module,
    args: ModelArgs,
    out_dir: str | Path,
    info: DistInfo,
    dtype: torch.dtype,
    metadata: dict[str, str] | None = None,
    tokenizer: Path | None = None,
) -> Path | None:
    """Gathers full weights (collective) and writes a model dir (with tokenizer.model) on the
    main rank, into a temporary dir renamed into place: a failed export leaves no half dir."""
    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    out = Path(out_dir)
    if info.is_main:
        state = {k: v.detach().to("cpu", dtype) for k, v in full.items()}
        tmp = out.with_name(f".{out.name}.tmp")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            extra = {"tokenizer.model": tokenizer} if tokenizer else None
            save_model_dir(tmp, args, state, metadata=metadata, extra_files=extra)
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise storage_error("exporting the model to", out, exc) from None
        except StorageError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    barrier(info)
    return out if info.is_main else None

"""The compute dtype: `auto` picks bfloat16 only where the hardware runs it natively.

bf16 matmuls are fast on CUDA GPUs that support them and on CPUs with AVX512-BF16 or AMX; on
other CPUs (AVX2-only, common in the cloud) PyTorch emulates them and a bf16 step can be ~80×
slower than float32. Every entry point (training, evaluation, the reference pre-computation,
the benchmarks) resolves its dtype here and prints the choice with its reason.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPE_NAMES = ("auto", "bfloat16", "float32")
_warned: set[str] = set()


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def cpu_capability() -> str:
    """What the CPU offers for bf16, in words (e.g. 'AVX512 + AVX512-BF16 + AMX')."""
    parts = [torch.backends.cpu.get_cpu_capability()]
    if _probe("_is_avx512_bf16_supported"):
        parts.append("AVX512-BF16")
    if _probe("_is_amx_tile_supported"):
        parts.append("AMX")
    return " + ".join(parts)


def cpu_model_name() -> str:
    """The CPU's model name and what it offers for bf16, e.g. 'AMD EPYC 7B13 (AVX2)'."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name} ({cpu_capability()}, {cores} cores)"


def _probe(name: str) -> bool:
    check = getattr(torch.cpu, name, None)
    return bool(check()) if check is not None else False


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX tiles) and PyTorch's
    kernels use it: an AVX512 kernel level (ATEN_CPU_CAPABILITY=avx2 caps it below)."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    return _probe("_is_avx512_bf16_supported") or _probe("_is_amx_tile_supported")


def cuda_supports_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """`requested` ∈ auto | bfloat16 | float32 on `device` → the dtype to compute in, and why.

    An explicit bfloat16 on a CPU without native support is honoured with a one-time warning.
    """
    if requested not in DTYPE_NAMES:
        raise ValueError(f"dtype {requested!r} is invalid: allowed {', '.join(DTYPE_NAMES)}")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        native, where = cuda_supports_bf16(), f"CUDA device {name}"
    else:
        native, where = cpu_supports_bf16(), f"CPU ({cpu_capability()})"
    if requested == "float32":
        return Precision(torch.float32, f"float32 requested on {where}")
    if requested == "bfloat16":
        if not native and where not in _warned:
            _warned.add(where)
            print(
                f"[warning] bfloat16 requested on {where} without native bf16: expect it to "
                "run many times slower than float32 (use dtype auto)",
                file=sys.stderr,
                flush=True,
            )
        return Precision(torch.bfloat16, f"bfloat16 requested on {where}")
    if native:
        return Precision(torch.bfloat16, f"auto: {where} computes bf16 natively")
    return Precision(torch.float32, f"auto: {where} has no native bf16, float32 is faster")


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` for reduced-precision compute; nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)

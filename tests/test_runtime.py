"""runtime/: the compute dtype `auto` picks, and progress lines on a log (not a terminal)."""

from __future__ import annotations

import io
import re
import time

import pytest
import torch

from runtime import precision
from runtime.precision import resolve_precision
from runtime.progress import Progress, duration

CPU = torch.device("cpu")


def fake_cpu(monkeypatch, capability: str, bf16: bool, amx: bool) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(precision, "_warned", set())


@pytest.mark.parametrize(
    "capability, bf16, amx, expected",
    [
        ("AVX512", True, True, torch.bfloat16),  # Sapphire Rapids: AMX tiles
        ("AVX512", True, False, torch.bfloat16),  # Zen 4 / Cooper Lake: AVX512-BF16
        ("AVX512", False, False, torch.float32),  # Skylake-X: AVX-512, no bf16
        ("AVX2", False, False, torch.float32),  # EPYC Zen 2/3: AVX2 only
        ("AVX2", True, True, torch.float32),  # ATEN_CPU_CAPABILITY=avx2 on an AMX machine
        ("DEFAULT", False, False, torch.float32),
    ],
)
def test_auto_picks_bf16_only_on_cpus_that_compute_it_natively(
    monkeypatch, capability, bf16, amx, expected
):
    fake_cpu(monkeypatch, capability, bf16, amx)
    chosen = resolve_precision("auto", CPU)
    assert chosen.dtype == expected
    assert capability in chosen.reason
    assert ("natively" in chosen.reason) == (expected == torch.bfloat16)


def test_explicit_bf16_without_native_support_runs_and_warns_once(monkeypatch, capsys):
    fake_cpu(monkeypatch, "AVX2", False, False)
    assert resolve_precision("bfloat16", CPU).dtype == torch.bfloat16
    assert resolve_precision("bfloat16", CPU).dtype == torch.bfloat16
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 1 and "many times slower than float32" in warnings[0]
    assert resolve_precision("float32", CPU).dtype == torch.float32


def test_explicit_bf16_on_a_native_cpu_is_silent(monkeypatch, capsys):
    fake_cpu(monkeypatch, "AVX512", True, True)
    assert resolve_precision("bfloat16", CPU).dtype == torch.bfloat16
    assert capsys.readouterr().err == ""


def test_auto_on_cuda_follows_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    for supported, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(precision, "cuda_supports_bf16", lambda s=supported: s)
        chosen = resolve_precision("auto", torch.device("cuda", 0))
        assert chosen.dtype == expected and "A100" in chosen.reason


def test_unknown_dtype_names_the_allowed_values():
    with pytest.raises(ValueError, match="auto, bfloat16, float32"):
        resolve_precision("fp8", CPU)


# -------------------------------------------------------------------------- progress
def test_progress_on_a_log_prints_plain_lines_with_rate_and_eta():
    out = io.StringIO()
    progress = Progress("[train]", 4, "steps", every_s=0.0, stream=out, done=1)
    for loss in (3.0, 2.5, 2.0):
        progress.update(extra=f"loss {loss}")
    progress.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and "\033" not in out.getvalue()
    assert [re.match(r"\[train\] (\d)/4 steps", line).group(1) for line in lines] == ["2", "3", "4"]
    assert "ETA" in lines[0] and "ETA" not in lines[-1]  # nothing left to estimate at the end
    assert lines[-1].endswith("| loss 2.0") and " steps/s, " in lines[-1]


def test_progress_prints_at_most_every_interval_but_always_the_last_line():
    out = io.StringIO()
    with Progress("[eval] decode", 100, "problems", every_s=3600, stream=out) as progress:
        for _ in range(100):
            progress.update()
    lines = out.getvalue().splitlines()  # the first (early rate) and the last
    assert len(lines) == 2 and "1/100 problems" in lines[0] and "100/100 problems" in lines[1]


def test_heartbeat_shows_a_long_step_is_alive():
    out = io.StringIO()
    with Progress("[train]", 10, "steps", every_s=0.2, stream=out, heartbeat=True):
        time.sleep(1.0)  # one step that takes longer than the interval
    beats = [line for line in out.getvalue().splitlines() if line.startswith("[train] 0/10 steps")]
    assert len(beats) >= 3 and "elapsed" in beats[-1]
    assert "steps/s" not in beats[-1]  # no rate until something is done


def test_progress_scales_bytes_and_redraws_a_live_bar_on_a_terminal():
    out = io.StringIO()
    progress = Progress("  hub x", 4 * 2**20, "MiB", stream=out, tty=True, scale=2**20)
    progress.update(2**20)
    progress.write("[step 1] loss=3")
    progress.update(3 * 2**20)
    text = out.getvalue()
    assert text.startswith("\r\033[K  hub x 1.0/4.0 MiB")
    assert "\r\033[K[step 1] loss=3\n" in text  # the live bar cleared before the line
    assert text.rsplit("\r\033[K", 1)[1].startswith("  hub x 4.0/4.0 MiB")
    assert text.endswith("\n")


def test_disabled_progress_prints_nothing():
    out = io.StringIO()
    with Progress("[train]", 3, "steps", stream=out, enabled=False, heartbeat=True) as progress:
        progress.update(3)
        progress.write("hidden")
    assert out.getvalue() == ""


def test_durations_read_naturally():
    assert [duration(s) for s in (0, 42, 185, 3720)] == ["0s", "42s", "3m05s", "1h02m"]

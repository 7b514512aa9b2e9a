"""Training-step throughput and peak memory: MTP (4 heads) vs next-token, sequential vs naive loss.

    python -m bench.mtp_step [--dim 512 --layers 8 --vocab 32000 --seq 1024 --batch 2 --steps 5]

Each variant runs in its own process (so peak memory is its own): CUDA peak allocated memory
on a GPU, peak RSS on the CPU. Variants:
  ntp-naive       next-token step of the same model: head 0 only, full logits
  mtp-naive       4 heads, all heads' full logits alive, one backward
  mtp-sequential  4 heads, one head at a time, CE chunked over the sequence (training/loss.py)
  mtp-isolated    mtp-sequential on packed rows of `--segments` samples each, kept apart by
                  segment ids (block-causal mask, positions restarting per sample)
--target-share S leaves targets on the last S of each row only (instruction tuning: the prompt
has none); the sequential loss projects to the vocabulary only where there are targets.
FLOPs of one step are counted with torch's FlopCounterMode (matmuls and attention);
`--peak-tflops` (e.g. 790 for an H200's measured bf16 peak) turns them into MFU.
`--profile-dir D` writes a torch.profiler table of the top kernels of one step per variant.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from data.loader import IGNORE_INDEX
from model import ModelArgs, Transformer
from runtime.precision import DTYPE_NAMES, cpu_capability, resolve_precision
from training.loss import mtp_loss_backward, naive_mtp_loss

VARIANTS = ("ntp-naive", "mtp-naive", "mtp-sequential", "mtp-isolated")


def run_variant(variant: str, a: argparse.Namespace) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    args = ModelArgs(
        dim=a.dim, n_layers=a.layers, n_heads=a.dim // 64, vocab_size=a.vocab, n_future_tokens=4
    )
    model = Transformer(args).to(device)
    model.init_weights(seed=0)
    precision = resolve_precision(a.dtype, device)
    dtype = precision.dtype
    tokens = torch.randint(0, a.vocab, (a.batch, a.seq), device=device)
    labels = torch.stack([torch.roll(tokens, -k - 1, dims=1) for k in range(4)], dim=-1)
    for k in range(4):
        labels[:, a.seq - k - 1 :, k] = IGNORE_INDEX
    labels[:, : round(a.seq * (1 - a.target_share))] = IGNORE_INDEX  # the prompt: no targets
    lam = [1.0, 0.0, 0.0, 0.0] if variant == "ntp-naive" else [1.0] * 4
    denominators = [float((labels[..., k] != IGNORE_INDEX).sum()) for k in range(4)]
    weights = (labels != IGNORE_INDEX).float()
    segment_ids = None
    if variant == "mtp-isolated":  # equal-length samples packed into each row
        segment_ids = (torch.arange(a.seq, device=device) * a.segments // a.seq).expand(a.batch, -1)

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        if variant in ("mtp-sequential", "mtp-isolated"):
            with autocast():
                trunk = model(tokens, return_trunk=True, segment_ids=segment_ids)
            mtp_loss_backward(
                model,
                trunk,
                labels,
                weights,
                lam,
                denominators,
                a.chunk,
                compute_dtype=dtype,
                segment_ids=segment_ids,
            )
        elif variant == "mtp-naive":
            with autocast():
                loss = naive_mtp_loss(model, tokens, labels, lam, weights, denominators)
            loss.backward()
        else:
            with autocast():
                logits = model.head_logits(model(tokens, return_trunk=True), 0).float()
                loss = torch.nn.functional.cross_entropy(
                    logits.flatten(0, 1), labels[..., 0].flatten(), ignore_index=IGNORE_INDEX
                )
            loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up
    flops = step_flops(step)
    if a.profile_dir:
        profile_step(step, variant, a.profile_dir, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(a.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / a.steps
    peak = (
        torch.cuda.max_memory_allocated()
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    achieved = flops / seconds / 1e12
    return {
        "variant": variant,
        "device": device.type,
        "dtype": precision.name,
        "tokens_per_s": round(a.batch * a.seq / seconds),
        "step_s": round(seconds, 3),
        "peak_mib": round(peak / 2**20),
        "tflop_per_step": round(flops / 1e12, 3),
        "achieved_tflops": round(achieved, 1),
        "mfu": round(achieved / a.peak_tflops, 3) if a.peak_tflops else None,
    }


def step_flops(step) -> int:
    """FLOPs of one call of `step` (forward and backward), as torch counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def profile_step(step, variant: str, out_dir: str, device: torch.device) -> None:
    """Writes the top kernels of one step (by device time) to `out_dir/profile-<variant>.txt`."""
    from pathlib import Path

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=25)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    Path(out_dir, f"profile-{variant}.txt").write_text(table + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="auto")
    parser.add_argument("--segments", type=int, default=4, help="samples per row (mtp-isolated)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak, for MFU")
    parser.add_argument("--profile-dir", help="write a profiler table per variant here")
    parser.add_argument(
        "--target-share",
        type=float,
        default=1.0,
        help="share of each row's positions with targets (SFT: the response, ~0.25)",
    )
    a = parser.parse_args()
    if a.variant:
        print(json.dumps(run_variant(a.variant, a)))
        return
    passthrough = sys.argv[1:]
    rows = []
    for variant in a.variants.split(","):
        out = subprocess.run(
            [sys.executable, "-m", "bench.mtp_step", "--variant", variant, *passthrough],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    machine = {
        "cpu": cpu_capability(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    ratio = _ratio(rows, "mtp-sequential", "ntp-naive")
    print(json.dumps({"config": vars(a), "machine": machine, "results": rows,
                      "mtp_over_ntp_step": ratio}, indent=2))  # fmt: skip


def _ratio(rows: list[dict], a: str, b: str) -> float | None:
    by = {r["variant"]: r["step_s"] for r in rows}
    return round(by[a] / by[b], 3) if a in by and b in by and by[b] else None


if __name__ == "__main__":
    main()

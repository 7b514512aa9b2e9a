"""Know before renting: `train_wmtp.py RECIPE --plan --nproc-per-node 8 --gpu h100` plans the run
on a laptop — memory per rank by category, the largest micro-batch that fits, FLOPs per token,
step and run time at a stated MFU — with no GPU and no weights on disk.

It builds the recipe's model (its params.json, or the published 7B_1T_4 shape), the Rho-1
reference (online) and the critic's value head where the recipe uses them, on the meta device;
applies WMTP's own `parallelize` (FSDP2 per block, activation checkpointing as the recipe says,
bf16 params / fp32 reduce) over a fake process group of nnodes × nproc ranks; materialises it
as fake tensors; and runs the real step — `train_wmtp.train_step` on `micro_batch_size` rows of
`seq_len` (two micro-batches: the first has no gradients yet, the second meets them), the
gradient clipping, the step's reductions, the fused AdamW — under the memory tracker
(`training.memory`) and `FlopCounterMode`. Nothing is skipped but the step's one host read of
its ~40 summary numbers (`StepTotals.reduce` → `read_once`), which a fake tensor cannot give.

The trace itself lives in training/step_trace.py; this file holds the GPU table, the plan and
its report. `--measure` runs the same trace on real tensors (and, under torchrun, the real process group),
so the plan can be checked against what a run allocates (tests/test_plan.py).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.progress import Progress
from training.memory import CATEGORIES
from training.recipe import Recipe
from training.step_trace import (
    Trace,
    fake_world,
    flops_per_token,
    model_args,
    reference_args,
    trace_step,
)

GIB = 2**30
TRANSIENT = ("loss chunks", "reference model", "communication buffers")  # come and go in a step


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_tflops: float  # dense peak
    memory_gib: float
    dollars_per_hour: float  # on-demand, per GPU (an order of magnitude: prices vary)


GPUS = {  # NVIDIA data sheets (dense bf16, SXM); the H200 measured ~790 on the device we tried
    "a100": GPU("A100 80GB SXM", 312.0, 80.0, 2.0),
    "h100": GPU("H100 80GB SXM", 989.0, 80.0, 3.0),
    "h200": GPU("H200 141GB SXM", 989.0, 141.0, 4.0),
}


# ------------------------------------------------------------------------- planning
@dataclass
class PlanResult:
    recipe: Recipe
    gpu: GPU
    gpu_memory_gib: float
    world: int
    mfu: float
    trace: Trace
    largest_micro_batch: int
    flops_per_token: float
    shapes: list[str]

    @property
    def fits(self) -> bool:
        return self.trace.peak_bytes <= self.gpu_memory_gib * GIB

    @property
    def tokens_per_step(self) -> int:
        r = self.recipe
        return r.data.micro_batch_size * r.data.seq_len * r.train.grad_accum * self.world

    @property
    def step_seconds(self) -> float:
        peak = self.gpu.bf16_tflops * 1e12 * self.world * self.mfu
        return self.flops_per_token * self.tokens_per_step / peak

    def as_dict(self) -> dict:
        run_s = self.step_seconds * self.recipe.train.max_steps
        return {
            "recipe": self.recipe.run.name, "world_size": self.world, "gpu": self.gpu.name,
            "gpu_memory_gib": self.gpu_memory_gib, "micro_batch_size": self.trace.micro_batch,
            "peak_gib": self.trace.peak_bytes / GIB,
            "breakdown_gib": {k: v / GIB for k, v in self.trace.breakdown.items()},
            "largest_gib": {k: v / GIB for k, v in (self.trace.largest or {}).items()},
            "fits": self.fits, "largest_micro_batch": self.largest_micro_batch,
            "tokens_per_step": self.tokens_per_step, "flops_per_token": self.flops_per_token,
            "mfu": self.mfu, "step_seconds": self.step_seconds, "run_hours": run_s / 3600,
            "gpu_hours": run_s * self.world / 3600,
            "cost_dollars": run_s * self.world / 3600 * self.gpu.dollars_per_hour,
            "shapes": self.shapes,
        }  # fmt: skip


def largest_micro_batch(
    recipe, args, ref, info, target_share, limit_bytes: float, traces: dict[int, Trace]
) -> int:
    """The largest micro-batch whose traced peak fits `limit_bytes` (0: not even one row).
    Memory grows linearly in the rows: two traces predict it, one more confirms."""

    def peak(m: int) -> int:
        if m not in traces:
            traces[m] = trace_step(recipe, args, ref, info, m, target_share)
        return traces[m].peak_bytes

    one, two = peak(1), peak(2)
    if one > limit_bytes:
        return 0
    per_row = max(two - one, 1)
    guess = max(1, int(1 + (limit_bytes - one) // per_row))
    while guess > 1 and peak(guess) > limit_bytes:
        guess -= 1
    return guess


def advice(result: PlanResult, limit: float) -> str:
    """One line naming what to change when the recipe does not fit."""
    r, parts = result.recipe, result.trace.breakdown
    state = parts["parameters"] + parts["gradients"] + parts["optimizer state"]
    need = result.trace.peak_bytes / GIB
    head = (f"needs {need:.1f} GiB per rank, {result.gpu_memory_gib:g} GiB available on "
            f"{result.world} × {result.gpu.name}")  # fmt: skip
    if result.largest_micro_batch >= 1:
        return (f"{head}: set data.micro_batch_size={result.largest_micro_batch} (train.grad_accum="
                f"{math.ceil(r.data.micro_batch_size * r.train.grad_accum / result.largest_micro_batch)}"
                " keeps the step's rows)")  # fmt: skip
    if not r.train.activation_checkpointing and parts["activations"] > 0.25 * need * GIB:
        return f"{head}: set train.activation_checkpointing=true (activations are {parts['activations'] / GIB:.1f} GiB)"
    if parts["loss chunks"] > 0.15 * need * GIB and r.train.ce_chunk_size > 128:
        return f"{head}: lower train.ce_chunk_size (now {r.train.ce_chunk_size}; the loss chunks hold {parts['loss chunks'] / GIB:.1f} GiB)"
    if parts["reference model"] > 0.15 * need * GIB:
        return (f"{head}: precompute the reference CE (python -m training.precompute_reference; "
                f"weighting.reference_source: precomputed) to free {parts['reference model'] / GIB:.1f} GiB")  # fmt: skip
    if state > 0.5 * limit:
        return f"{head}: use more GPUs (parameters, gradients and optimizer state alone take {state / GIB:.1f} GiB per rank)"
    return f"{head}: lower data.seq_len (now {r.data.seq_len}) or use more GPUs"


def plan(
    recipe: Recipe, world: int, gpu: GPU, gpu_memory_gib: float, mfu: float, target_share: float
) -> PlanResult:
    args, where = model_args(recipe)
    ref, ref_where = reference_args(recipe)
    shapes = [f"model: {where}"] + ([f"reference: {ref_where}"] if ref is not None else [])
    limit = gpu_memory_gib * GIB
    traces: dict[int, Trace] = {}
    with fake_world(world) as info, Progress("[plan] tracing", None, "steps", heartbeat=True) as p:
        wanted = recipe.data.micro_batch_size
        traces[wanted] = trace_step(recipe, args, ref, info, wanted, target_share)
        p.update()
        best = largest_micro_batch(recipe, args, ref, info, target_share, limit, traces)
        p.update()
        flops = flops_per_token(recipe, args, ref, info, target_share)
        p.update()
    return PlanResult(recipe, gpu, gpu_memory_gib, world, mfu, traces[wanted], best, flops, shapes)


def report_lines(result: PlanResult) -> list[str]:
    d = result.as_dict()
    r = result.recipe
    lines = [
        f"plan: {r.run.name} on {result.world} × {result.gpu.name} ({result.gpu_memory_gib:g} GiB "
        f"each), {d['micro_batch_size']} rows × {r.data.seq_len} per micro-batch, "
        f"grad_accum {r.train.grad_accum}, activation checkpointing "
        f"{'on' if r.train.activation_checkpointing else 'off'}, {', '.join(result.shapes)}",
        f"  peak memory per rank: {d['peak_gib']:.1f} GiB of {result.gpu_memory_gib:g} "
        f"(headroom {result.gpu_memory_gib - d['peak_gib']:.1f} GiB)",
    ]
    largest = result.trace.largest or {}
    lines.append(f"    {'':<22} {'at the peak':>12} {'most at any time':>20}")
    for name in CATEGORIES:
        shown = name in TRANSIENT and name in largest  # the others are at their most at the peak
        most = f"{largest[name] / GIB:14.2f} GiB" if shown else ""
        lines.append(f"    {name:<22} {d['breakdown_gib'].get(name, 0.0):8.2f} GiB   {most}")
    lines += [
        f"  largest micro_batch_size that fits: {d['largest_micro_batch']}",
        f"  FLOPs per token: {d['flops_per_token'] / 1e9:.1f} GFLOP (traced, without activation "
        f"recomputation); tokens per step "
        f"{d['tokens_per_step']:,}",
        f"  at {result.mfu:.0%} MFU of {result.gpu.bf16_tflops:g} TFLOP/s bf16 per GPU: "
        f"{d['step_seconds']:.2f} s per step, {r.train.max_steps} steps = {d['run_hours']:.1f} h, "
        f"{d['gpu_hours']:.0f} GPU-hours (~${d['cost_dollars']:,.0f} at "
        f"${result.gpu.dollars_per_hour:g}/GPU-hour)",
    ]
    return lines


def measure_main(recipe: Recipe, target_share: float, json_out: str | None) -> int:
    """`train_wmtp.py --measure` (under torchrun or alone): the same trace on real tensors and
    the real process group, this rank's numbers printed (and written, with `.rank<r>`)."""
    from training.distributed import init_distributed, shutdown

    info = init_distributed(recipe.run.device, recipe.run.dist_timeout_s)
    cuda = info.device.type == "cuda"
    try:
        args, _ = model_args(recipe)
        ref, _ = reference_args(recipe)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trace = trace_step(recipe, args, ref, info, recipe.data.micro_batch_size, target_share,
                           fake=False)  # fmt: skip
        allocator_peak = torch.cuda.max_memory_allocated() if cuda else None
    finally:
        shutdown(info)
    record = {"rank": info.rank, "world_size": info.world_size, "peak_bytes": trace.peak_bytes,
              "breakdown": trace.breakdown,
              "cuda_max_memory_allocated": allocator_peak}  # fmt: skip
    print(json.dumps(record), flush=True)
    if json_out:
        Path(f"{json_out}.rank{info.rank}").write_text(json.dumps(record) + "\n")
    return 0


def plan_main(recipe: Recipe, nnodes: int, nproc: int, gpu_name: str, memory_gib: float | None,
              mfu: float, target_share: float, json_out: str | None) -> int:  # fmt: skip
    """`train_wmtp.py --plan`: prints the plan; exit 0 when it fits, else 2 with what to change."""
    from runtime.schema import ConfigError

    started = time.perf_counter()
    gpu = GPUS[gpu_name]
    result = plan(recipe, nnodes * nproc, gpu, memory_gib or gpu.memory_gib, mfu, target_share)
    for line in report_lines(result):
        print(line, flush=True)
    print(f"  planned in {time.perf_counter() - started:.0f}s", flush=True)
    if json_out:
        Path(json_out).write_text(json.dumps(result.as_dict(), indent=2) + "\n")
    if not result.fits:
        raise ConfigError(advice(result, result.gpu_memory_gib * GIB))
    return 0

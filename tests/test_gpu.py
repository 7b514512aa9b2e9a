"""CUDA correctness, run by `bench/gpu_suite.sh` (`pytest -m gpu`) on a lent GPU; skipped
without CUDA. Each test compares the CUDA path against the CPU fp32 reference on the same
weights, with the tolerance stated beside it (bf16 keeps 8 bits of mantissa: ~0.4 % per
rounding, a few percent after a few layers)."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F

from data.loader import IGNORE_INDEX
from model import ModelArgs, Transformer
from training.loss import mtp_loss_backward, naive_mtp_loss
from training.parallel import parallelize

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
ARGS = ModelArgs(dim=256, n_layers=4, n_heads=4, vocab_size=1024, n_future_tokens=4)
BF16_LOGIT_ATOL = 0.1  # logits of a 4-layer model with std-0.02 weights are O(1)


def model_pair(args: ModelArgs = ARGS) -> tuple[Transformer, Transformer]:
    cpu = Transformer(args)
    cpu.init_weights(seed=0)
    gpu = Transformer(args)
    gpu.load_state_dict(cpu.state_dict())
    return cpu.eval(), gpu.to("cuda", torch.bfloat16).eval()


def labels_for(tokens: torch.Tensor, n_future: int) -> torch.Tensor:
    labels = torch.stack([torch.roll(tokens, -k - 1, dims=1) for k in range(n_future)], dim=-1)
    for k in range(n_future):
        labels[:, tokens.shape[1] - k - 1 :, k] = IGNORE_INDEX
    return labels


@torch.no_grad()
def test_bf16_forward_and_kv_decoding_match_cpu_fp32():
    cpu, gpu = model_pair()
    tokens = torch.randint(0, ARGS.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    reference = cpu(tokens)
    full = gpu(tokens.cuda()).float().cpu()
    assert (full - reference).abs().max() < BF16_LOGIT_ATOL
    assert (full.argmax(-1) == reference.argmax(-1)).float().mean() > 0.95
    cache = gpu.new_cache(2, 64)
    step_logits = [gpu(tokens[:, :16].cuda(), 0, cache)[:, -1:]]
    for pos in range(16, 48):  # one token at a time through the cache
        step_logits.append(gpu(tokens[:, pos : pos + 1].cuda(), pos, cache))
    decoded = torch.cat(step_logits[1:], dim=1).float().cpu()
    assert (decoded - reference[:, 16:48]).abs().max() < BF16_LOGIT_ATOL


def test_a_fully_sharded_bf16_step_with_checkpointing_matches_cpu():
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl", rank=0, world_size=1, timeout=timedelta(seconds=60))
    try:
        cpu, _ = model_pair()
        gpu = Transformer(ARGS)
        gpu.load_state_dict(cpu.state_dict())
        gpu = parallelize(gpu.cuda(), fsdp=True, activation_checkpointing=True,
                          param_dtype=torch.bfloat16)  # fmt: skip
        tokens = torch.randint(
            0, ARGS.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1)
        )
        labels = labels_for(tokens, 4)
        losses = {}
        for name, model, device in (("cpu", cpu.train(), "cpu"), ("gpu", gpu.train(), "cuda")):
            t, y = tokens.to(device), labels.to(device)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                logits = model(t)
            losses[name] = [
                F.cross_entropy(
                    logits[..., k, :].flatten(0, 1).float(),
                    y[..., k].flatten(),
                    ignore_index=IGNORE_INDEX,
                )  # fmt: skip
                for k in range(4)
            ]
            sum(losses[name]).backward()
        for k in range(4):
            assert (
                abs(losses["gpu"][k].item() - losses["cpu"][k].item())
                < 0.02 * losses["cpu"][k].item()
            )
        grads = [p.grad for p in gpu.parameters() if p.grad is not None]
        assert grads and all(
            torch.isfinite(g.full_tensor() if hasattr(g, "full_tensor") else g).all() for g in grads
        )
    finally:
        dist.destroy_process_group()


@torch.no_grad()
def test_the_packed_sample_mask_runs_and_matches_separate_samples():
    """Packed rows pass a boolean block mask, which FlashAttention cannot take: SDPA falls back
    to the memory-efficient (or math) kernel. The packed forward must equal each sample alone."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    _, gpu = model_pair()
    a = torch.randint(0, ARGS.vocab_size, (1, 24), device="cuda")
    b = torch.randint(0, ARGS.vocab_size, (1, 40), device="cuda")
    packed = torch.cat([a, b], dim=1)
    segments = torch.cat([torch.zeros(1, 24), torch.ones(1, 40)], dim=1).long().cuda()
    together = gpu(packed, segment_ids=segments).float()
    alone = torch.cat([gpu(a).float(), gpu(b).float()], dim=1)
    assert (together - alone).abs().max() < BF16_LOGIT_ATOL
    runs = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):  # fmt: skip
        try:
            with sdpa_kernel([backend]):
                out = gpu(packed, segment_ids=segments).float()
            runs[backend.name] = f"max |diff| {(out - together).abs().max().item():.2e}"
        except RuntimeError as exc:
            runs[backend.name] = f"refused ({str(exc).splitlines()[0][:80]})"
    print(f"SDPA backends with the packed-sample mask: {runs}")  # the suite's log keeps it
    assert runs["EFFICIENT_ATTENTION"].startswith("max")  # the kernel packed rows get on CUDA


def test_the_sequential_head_loss_needs_less_memory_than_the_naive_one():
    args = ModelArgs(dim=512, n_layers=2, n_heads=8, vocab_size=32000, n_future_tokens=4)
    model = Transformer(args).cuda()
    model.init_weights(seed=0)
    tokens = torch.randint(0, args.vocab_size, (2, 1024), device="cuda")
    labels = labels_for(tokens, 4)
    weights = (labels != IGNORE_INDEX).float()
    lam, denominators = [1.0] * 4, [float(weights[..., k].sum()) for k in range(4)]
    peaks = {}
    for variant in ("naive", "sequential"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if variant == "naive":
                naive_mtp_loss(model, tokens, labels, lam, weights, denominators).backward()
            else:
                trunk = model(tokens, return_trunk=True)
        if variant == "sequential":
            mtp_loss_backward(model, trunk, labels, weights, lam, denominators, 256,
                              compute_dtype=torch.bfloat16)  # fmt: skip
        torch.cuda.synchronize()
        peaks[variant] = torch.cuda.max_memory_allocated() - base
        model.zero_grad(set_to_none=True)
    print(f"peak above the weights: { ({k: f'{v / 2**20:.0f} MiB' for k, v in peaks.items()}) }")
    # naive keeps 4 × (2 × 1024 × 32000) logits and their grads alive; sequential one chunk
    assert peaks["sequential"] < 0.6 * peaks["naive"]

"""Self-speculative decoding: what a verify step costs against a decode step, and what it gives.

    python -m bench.speculative --cost-model [--dim 4096 --n-heads 32 --ffn 11008 --kv 1024 --dtype auto]
    python -m bench.speculative --ckpt outputs/demo/runs/baseline/seed0/export/final \\
        [--prompts 16 --max-new-tokens 128 --synthetic TASKS.jsonl --synthetic-split TEST.jsonl]

--cost-model times, at 7B layer shapes, one transformer block and the output projection on 1
token (plain decoding) and on n tokens (verifying 1 + (n−1) drafted tokens), with a KV cache of
`--kv` positions; then a decode step = 29 blocks (28 trunk + head 0) + 1 projection and a verify
step = 32 blocks (28 trunk + 4 heads) on n tokens + n projections for head 0 + n−1 for the
drafts. Projected speed-up at a accepted tokens per forward = a / (verify / decode).
--ckpt decodes HumanEval prompts (or --synthetic: the demo's tasks; training template) plainly
and speculatively, greedy and at T=0.2 / top-p 0.95, batch 1 and 8 (different prompts in a
batch), and reports tokens/s and acceptance (greedy outputs are checked identical).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from data.records import read_records
from evaluation.generation import SamplingConfig, SpeculationStats, generate
from evaluation.tasks import humaneval_problems, synthetic_problems
from model import ModelArgs
from model.tokenizer import Tokenizer
from model.transformer import KVCache, TransformerBlock, rotary_tables
from model.weights import build_model, load_checkpoint_dir
from runtime.precision import DTYPE_NAMES, cpu_capability, resolve_precision
from runtime.progress import Progress

TRUNK_7B, HEADS_7B = 28, 4


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


@torch.no_grad()
def cost_model(a: argparse.Namespace) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(a.dtype, device)
    dtype = precision.dtype
    args = ModelArgs(
        dim=a.dim,
        n_layers=1,
        n_heads=a.n_heads,
        vocab_size=a.vocab,
        ffn_hidden_dim=a.ffn,
        max_seq_len=a.kv + 8,
    )
    block = TransformerBlock(0, args).to(device=device, dtype=dtype)
    output = torch.nn.Linear(a.dim, a.vocab, bias=False).to(device=device, dtype=dtype)
    cache = KVCache(1, a.kv + 8, args.kv_heads, args.head_dim, dtype, device)
    cache.k.normal_()
    cache.v.normal_()
    times = {}
    for n in (1, a.n_future):
        x = torch.randn(1, n, a.dim, device=device, dtype=dtype)
        positions = torch.arange(a.kv, a.kv + n, device=device)
        rope = rotary_tables(positions, args.head_dim, args.rope_theta)
        times[f"block_{n}"] = timed(lambda x=x, rope=rope: block(x, rope, a.kv, cache), a.repeats)
        times[f"output_{n}"] = timed(lambda x=x: output(x).float(), a.repeats)
    m = a.n_future
    decode = (TRUNK_7B + 1) * times["block_1"] + times["output_1"]
    verify = (
        (TRUNK_7B + HEADS_7B) * times[f"block_{m}"]
        + times[f"output_{m}"]
        + (m - 1) * times["output_1"]
    )
    ratio = verify / decode
    return {
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"CPU {cpu_capability()}",
        "dtype": precision.name,
        "shapes": {"dim": a.dim, "heads": a.n_heads, "ffn": a.ffn, "vocab": a.vocab, "kv": a.kv},
        "seconds": {k: round(v, 5) for k, v in times.items()},
        "block_cost_ratio": round(times[f"block_{m}"] / times["block_1"], 3),
        "decode_step_7b_s": round(decode, 4),
        "verify_step_7b_s": round(verify, 4),
        "verify_cost_ratio": round(ratio, 3),
        "projected_speedup": {str(acc): round(acc / ratio, 2) for acc in (1.5, 2.0, 2.5, 3.0)},
    }


@torch.no_grad()
def end_to_end(a: argparse.Namespace) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(a.dtype, device)
    args, state = load_checkpoint_dir(a.ckpt)
    model = build_model(args, state, device=device, dtype=precision.dtype).eval()
    tok = Tokenizer(a.tokenizer or a.ckpt / "tokenizer.model")
    if a.synthetic:
        ids = {r.task_id for r in read_records(a.synthetic_split)} if a.synthetic_split else None
        problems = synthetic_problems(a.synthetic, ids)
    else:
        problems = humaneval_problems(style="alpaca")
    prompts = [[tok.bos_id, *tok.encode(p.prompt)] for p in problems[: a.prompts]]
    stop = ["\n### "]
    n_params = sum(p.numel() for p in model.parameters())
    rows = []
    batches = sum(math.ceil(len(prompts) / b) for b in (1, 8)) * 2 * 2  # × speculative × T
    progress = Progress("[bench] decode", batches, "batches", stream=sys.stderr, heartbeat=True)
    for temperature in (0.0, 0.2):
        for batch in (1, 8):
            cfg = SamplingConfig(
                temperature=temperature, top_p=0.95, max_new_tokens=a.max_new_tokens
            )
            result = {"temperature": temperature, "batch": batch}
            for speculative in (False, True):
                stats, tokens, seconds, identical = SpeculationStats(), 0, 0.0, True
                for i in range(0, len(prompts), batch):
                    batch_prompts = prompts[i : i + batch]  # different prompts: ragged acceptance
                    g = torch.Generator().manual_seed(i)
                    gens = generate(
                        model,
                        tok,
                        batch_prompts,
                        cfg,
                        stop,
                        g,
                        speculative=speculative,
                        stats=stats,
                    )
                    progress.update(extra=f"T={temperature}, batch {batch}")
                    tokens += sum(len(x.tokens) for x in gens)
                    seconds += gens[0].seconds
                    if speculative and temperature == 0:
                        plain = generate(
                            model,
                            tok,
                            batch_prompts,
                            cfg,
                            stop,
                            torch.Generator().manual_seed(i),
                        )
                        identical &= [x.tokens for x in plain] == [x.tokens for x in gens]
                key = "speculative" if speculative else "plain"
                result[f"{key}_tokens_per_s"] = round(tokens / seconds, 1)
                if speculative:
                    result["tokens_per_forward"] = round(stats.tokens_per_forward, 3)
                    result["acceptance"] = {k: round(v, 3) for k, v in stats.acceptance().items()}
                    if temperature == 0:
                        result["identical_to_plain"] = identical
            result["speedup"] = round(
                result["speculative_tokens_per_s"] / result["plain_tokens_per_s"], 2
            )
            rows.append(result)
    progress.close()
    return {
        "ckpt": str(a.ckpt),
        "n_params": n_params,
        "dtype": precision.name,
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"CPU {cpu_capability()}",
        "prompts": f"{len(prompts)} from {a.synthetic or 'HumanEval'}",
        "max_new_tokens": a.max_new_tokens,
        "results": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cost-model", action="store_true")
    parser.add_argument("--ckpt", type=Path)
    parser.add_argument("--tokenizer", type=Path)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--n-heads", type=int, default=32)
    parser.add_argument("--ffn", type=int, default=11008)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--kv", type=int, default=1024)
    parser.add_argument("--n-future", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument(
        "--synthetic", type=Path, help="prompts from the demo's tasks.jsonl instead of HumanEval"
    )
    parser.add_argument(
        "--synthetic-split", type=Path, help="only these tasks (a processed split, e.g. test.jsonl)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="auto")
    a = parser.parse_args()
    if not a.cost_model and a.ckpt is None:
        parser.error("pass --cost-model or --ckpt")
    print(json.dumps(cost_model(a) if a.cost_model else end_to_end(a), indent=2))


if __name__ == "__main__":
    main()

"""Self-speculative decoding vs plain greedy: tokens/s and mean accepted tokens per forward.

    python -m bench.speculative --ckpt outputs/demo/runs/baseline/export/final [--prompts 20 --max-new-tokens 128]

Prompts are HumanEval's (training template). Both decoders produce identical tokens (checked).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from evaluation.generation import SamplingConfig, generate, speculative_greedy
from evaluation.tasks import humaneval_problems
from model.tokenizer import Tokenizer
from model.weights import build_model, load_checkpoint_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    a = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args, state = load_checkpoint_dir(a.ckpt)
    model = build_model(args, state, device=device, dtype=torch.float32).eval()
    tok = Tokenizer(a.ckpt / "tokenizer.model")
    cfg = SamplingConfig(temperature=0, max_new_tokens=a.max_new_tokens)
    problems = humaneval_problems(style="alpaca")[: a.prompts]
    plain_tokens = spec_tokens = 0
    plain_s = spec_s = 0.0
    accepted: list[int] = []
    for p in problems:
        ids = [tok.bos_id, *tok.encode(p.prompt)]
        start = time.perf_counter()
        (plain,) = generate(model, tok, ids, 1, cfg, p.stop)
        plain_s += time.perf_counter() - start
        start = time.perf_counter()
        spec, acc = speculative_greedy(model, tok, ids, cfg, p.stop)
        spec_s += time.perf_counter() - start
        assert spec.tokens == plain.tokens, f"{p.task_id}: speculative output differs from greedy"
        plain_tokens += len(plain.tokens)
        spec_tokens += len(spec.tokens)
        accepted += acc
    print(
        json.dumps(
            {
                "ckpt": str(a.ckpt),
                "device": device.type,
                "prompts": len(problems),
                "tokens": plain_tokens,
                "plain_tokens_per_s": round(plain_tokens / plain_s, 1),
                "speculative_tokens_per_s": round(spec_tokens / spec_s, 1),
                "speedup": round((spec_tokens / spec_s) / (plain_tokens / plain_s), 2),
                "mean_accepted_per_forward": round(sum(accepted) / len(accepted), 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

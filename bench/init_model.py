"""A randomly initialised MTP model dir of any shape, for benchmarks that need a bigger model
than the micro ones (train it with `train_wmtp.py ... model.base=OUT`):

    python -m bench.init_model OUT --tokenizer TOKENIZER.model --dim 768 --n-layers 15 \\
        --n-heads 12 --n-kv-heads 12 --multiple-of 256

`--n-layers` counts blocks as Meta's params.json does, trunk and all `--n-future` heads (7B_1T_4:
28 + 4 = 32); the defaults make 112 M parameters with a 4000-piece tokenizer. The vocabulary is
the tokenizer's. Written as fp16 safetensors with SHA256SUMS, like prepare_assets step 5.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from assets.micro import build_micro_model
from model.tokenizer import Tokenizer
from model.weights import save_model_dir
from runtime.config import MicroConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--n-layers", type=int, default=15)
    parser.add_argument("--n-heads", type=int, default=12)
    parser.add_argument("--n-kv-heads", type=int, default=12)
    parser.add_argument("--multiple-of", type=int, default=256)
    parser.add_argument("--n-future", type=int, default=4)
    parser.add_argument("--seed", type=int, default=42)
    a = parser.parse_args()
    tok = Tokenizer(a.tokenizer)
    cfg = MicroConfig(
        dim=a.dim,
        n_layers=a.n_layers,
        n_heads=a.n_heads,
        n_kv_heads=a.n_kv_heads,
        multiple_of=a.multiple_of,
        n_future_tokens=a.n_future,
        vocab_size=tok.n_words,
        seed=a.seed,
    )
    args, state, init = build_micro_model(cfg, tok, False, None, None)
    save_model_dir(a.out, args, state, extra_files={"tokenizer.model": a.tokenizer})
    n_params = sum(t.numel() for t in state.values())
    print(f"{a.out}: {n_params / 1e6:.1f} M parameters, {init}, {torch.float16}")


if __name__ == "__main__":
    main()

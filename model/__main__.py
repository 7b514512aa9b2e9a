"""Smoke path of the model package: `python -m model [--out DIR]`.

Builds a small random MTP LLaMA, runs all heads, checks KV-cache decoding against the full
forward, and round-trips the weights through safetensors with SHA256 verification.
"""

from __future__ import annotations

import tempfile
import time

import torch

from model.args import ModelArgs
from model.weights import build_model, load_model_dir, save_model_dir
from runtime.cli import ArgumentParser, entry_point


@entry_point
def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="model dir to write (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    cli = parser.parse_args(argv)

    torch.manual_seed(cli.seed)
    args = ModelArgs(
        dim=256,
        n_layers=6,
        n_heads=8,
        n_kv_heads=4,
        vocab_size=8000,
        n_future_tokens=4,
        max_seq_len=256,
    )
    model = build_model(args).eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"[model] {n_params / 1e6:.2f}M params, {len(model.trunk_layers)} trunk blocks, "
        f"{len(model.heads)} heads"
    )

    tokens = torch.randint(0, args.vocab_size, (2, 64))
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(tokens)
    print(f"[forward] logits {tuple(logits.shape)} in {time.perf_counter() - start:.3f}s")

    cache = model.new_cache(2, 64)
    with torch.no_grad():
        steps = [model(tokens[:, :48], 0, cache)]
        steps += [model(tokens[:, i : i + 1], i, cache) for i in range(48, 64)]
    diff = (torch.cat(steps, dim=1) - logits).abs().max().item()
    print(f"[kv-cache] incremental vs full forward: max |diff| = {diff:.2e}")

    with tempfile.TemporaryDirectory() as tmp:
        out = cli.out or tmp
        files = save_model_dir(out, args, model.state_dict(), max_shard_bytes=8 << 20)
        _, state = load_model_dir(out)
        same = all(torch.equal(state[k], v) for k, v in model.state_dict().items())
        print(f"[checkpoint] wrote {len(files)} files to {out}; sha256 verified; exact={same}")
    if diff > 1e-4 or not same:
        raise SystemExit("smoke check failed")
    print("[ok] model smoke path passed")


if __name__ == "__main__":
    main()

"""Precompute the Rho-1 reference CE of a recipe's training split, once, for every run that uses it.

    python -m training.precompute_reference recipes/rho1.yaml [--config ...] [key=value ...]

Writes <weighting.reference_ce_dir>/<data hash>/ (safetensors shards + index + SHA256SUMS); a run
with `weighting.reference_source: precomputed` reads it instead of running the reference model.
Each sample is scored on its own (no packing neighbours), so with `data.pack: false` the weights
equal those of the online reference exactly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from data.reference_ce import ReferenceCEWriter
from data.tokenized import cache_key, load_tokenized
from model.tokenizer import Tokenizer
from model.weights import build_model, load_checkpoint_dir
from runtime.cli import ArgumentParser, entry_point
from runtime.config import load_env_config
from runtime.precision import autocast, resolve_precision
from runtime.progress import Progress
from runtime.schema import ConfigError
from training.recipe import Recipe, load_recipe
from training.reference import reference_next_token_ce


def precompute(recipe: Recipe, cache_dir: str, device: torch.device, log=print) -> Path:
    if not recipe.model.reference or not recipe.weighting.reference_ce_dir:
        raise ConfigError(
            "model.reference and weighting.reference_ce_dir must both be set to precompute"
        )
    tok = Tokenizer(recipe.model.tokenizer)
    data = load_tokenized(recipe.data.train, tok, cache_dir)
    args, state = load_checkpoint_dir(recipe.model.reference)
    precision = resolve_precision(recipe.model.dtype, device)
    log(f"[precompute] compute dtype {precision.name}: {precision.reason}")
    model = build_model(args, state, device=device, dtype=precision.dtype).eval()
    key = cache_key(Path(recipe.data.train), tok)
    writer = ReferenceCEWriter(
        recipe.weighting.reference_ce_dir, key, reference_id=str(recipe.model.reference)
    )
    with Progress("[precompute] reference CE", len(data), "samples", heartbeat=True) as progress:
        for i in range(len(data)):
            tokens = torch.as_tensor(data.sample(i), dtype=torch.long, device=device)[None]
            with autocast(device, precision.dtype):
                ce = reference_next_token_ce(model, tokens, recipe.train.ce_chunk_size)
            writer.add(data.sample_ids[i], ce[0, :-1])
            progress.update()
    directory = writer.close()
    log(f"reference CE of {len(data)} samples → {directory}")
    return directory


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--config")
    a = parser.parse_intermixed_args(argv)
    try:
        recipe = load_recipe(a.recipe, a.overrides)
        env = load_env_config(a.config)
        device = torch.device(
            "cuda" if torch.cuda.is_available() and recipe.run.device != "cpu" else "cpu"
        )
        precompute(recipe, env.storage.cache_dir, device)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

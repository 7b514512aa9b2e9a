"""Weighted multi-token-prediction fine-tuning.

    torchrun --nproc_per_node=8 train_wmtp.py recipes/rho1.yaml [--config recipes/config.yaml] [key=value ...]
    python train_wmtp.py recipes/micro-baseline.yaml train.max_steps=20      # single process, CPU or GPU

Exit codes: 0 done, 2 bad recipe/config, 3 stopped by the NaN guard, 4 out of memory.
"""

from __future__ import annotations

import argparse
import sys

from runtime.config import load_env_config
from runtime.schema import ConfigError
from training.distributed import init_distributed, shutdown
from training.recipe import load_recipe


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="recipes/*.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=2e-5")
    parser.add_argument("--config", help="environment config (default recipes/config.yaml)")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    cli = parse_args(argv)
    try:
        recipe = load_recipe(cli.recipe, cli.overrides)
        env = load_env_config(cli.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    info = init_distributed(recipe.run.device)
    try:
        from training.trainer import Trainer

        try:
            trainer = Trainer(recipe, env, info)
        except (ConfigError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return trainer.run()
    finally:
        shutdown(info)


if __name__ == "__main__":
    sys.exit(main())

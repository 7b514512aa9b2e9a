"""Micro assets the training tests build for themselves: tokenizer, processed MBPP, tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from data.prepare import prepare
from data.process import ProcessConfig
from model import ModelArgs, Transformer
from model.tokenizer import train_tokenizer
from model.weights import save_model_dir
from runtime.history import read_history

VOCAB = 1000


def build_micro_assets(root: Path, mbpp_path: Path) -> dict[str, Path]:
    codes = [
        json.loads(line)["code"].replace("\r\n", "\n")
        for line in mbpp_path.read_text().splitlines()
    ]
    tokenizer = train_tokenizer(codes, root / "tokenizer" / "micro", vocab_size=VOCAB)
    prepare("mbpp", mbpp_path, root / "mbpp", tokenizer, ProcessConfig(max_length=512))
    paths = {
        "tokenizer": tokenizer,
        "train": root / "mbpp" / "processed" / "train.jsonl",
        "validation": root / "mbpp" / "processed" / "validation_small.jsonl",
    }
    specs = {
        "mtp": ModelArgs(
            dim=64,
            n_layers=5,
            n_heads=4,
            n_kv_heads=2,
            vocab_size=VOCAB,
            multiple_of=32,
            n_future_tokens=4,
        ),
        "ref": ModelArgs(
            dim=64, n_layers=3, n_heads=4, vocab_size=VOCAB, multiple_of=32, n_future_tokens=1
        ),
    }
    for seed, (name, args) in enumerate(specs.items()):
        model = Transformer(args)
        model.init_weights(seed=seed)
        save_model_dir(root / name, args, model.state_dict())
        paths[name] = root / name
    return paths


def write_recipe(
    path: Path, assets: dict[str, Path], algo: str, output_dir: Path, **sections
) -> Path:
    recipe = {
        "run": {"name": f"test-{algo}", "output_dir": str(output_dir), "seed": 0, "device": "cpu"},
        "model": {
            "base": str(assets["mtp"]),
            "tokenizer": str(assets["tokenizer"]),
            "reference": str(assets["ref"]),
            "dtype": "float32",
        },
        "data": {
            "train": str(assets["train"]),
            "validation": str(assets["validation"]),
            "dataset": "mbpp",
            "seq_len": 512,
            "micro_batch_size": 2,
            "pack": True,
        },
        "weighting": {
            "algo": algo,
            "temperature": 1.0,
            "min_weight": 0.05,
            "max_weight": 3.0,
            "critic": {"stage1_steps": 20, "value_lr": 0.01, "gae_lambda": 0.95},
        },
        "train": {
            "max_steps": 20,
            "grad_accum": 1,
            "lr": 3e-3,
            "warmup_ratio": 0.05,
            "ce_chunk_size": 64,
            "eval_every": 0,
            "log_every": 10,
        },
        "checkpoint": {
            "every_steps": 0,
            "keep_last": 2,
            "resume": "auto",
            "export_safetensors": True,
        },
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def env_config(path: Path, tmp: Path) -> Path:
    config = {
        "storage": {"root": str(tmp / "storage"), "cache_dir": str(tmp / "cache")},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"},
        "hardware": {"peak_tflops": 1.0},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def history(output_dir: Path) -> list[dict]:
    return read_history(output_dir)


def losses(output_dir: Path) -> list[float]:
    """The loss of every optimizer step in a run's history."""
    return [h["loss"] for h in history(output_dir) if h.get("stage") == "step"]

"""The whole training step as `train_wmtp.py` runs it, per weighting algorithm, and its parameters.

    python -m bench.train_step [--work /tmp/wmtp-bench] [--steps 12] [--dtype float32]
        [--algos baseline,rho1-soft,rho1-select,rho1-precomputed,critic] [--params-out DIR]

Builds its own assets once under --work (the synthetic task set, a 2000-piece code tokenizer
trained on the standard library, a random dim-256 micro-mtp with 4 heads and a next-token
reference), then runs `train_wmtp.py` in-process for every algorithm on the same fp32 recipe
and reports the median `step_time_s` of the steps after the first two (weighting signals,
the sequential-head loss, guards, AdamW: everything inside the loop). With --params-out the
final parameters of every run are saved there (safetensors) to compare two versions of the
code bit for bit (`--compare A B`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

VARIANTS = {
    "baseline": {"algo": "baseline"},
    "rho1-soft": {"algo": "rho1-wmtp", "reference_source": "online"},
    "rho1-select": {"algo": "rho1-wmtp", "rho1": {"mode": "select", "select_ratio": 0.6}},
    "rho1-precomputed": {"algo": "rho1-wmtp", "reference_source": "precomputed"},
    # a random micro model's value head explains nothing: time its TD-error weights anyway
    "critic": {
        "algo": "critic-wmtp",
        "critic": {"stage1_steps": 4, "value_lr": 0.01, "min_explained_variance": -1e3},
    },
    "dft": {"algo": "dft"},
}


def build_assets(work: Path) -> dict[str, Path]:
    """Tasks, tokenizer and two random micro models, made once and reused."""
    from assets.pretrain import corpus_files, default_corpus_dirs
    from data.prepare import prepare
    from data.process import ProcessConfig
    from launch.synthetic_tasks import write_tasks
    from model import ModelArgs, Transformer
    from model.tokenizer import train_tokenizer
    from model.weights import save_model_dir

    paths = {
        "tokenizer": work / "tokenizer" / "code.model",
        "train": work / "tasks" / "processed" / "train.jsonl",
        "validation": work / "tasks" / "processed" / "validation_small.jsonl",
        "mtp": work / "mtp",
        "ref": work / "ref",
    }
    if all(p.exists() for p in paths.values()):
        return paths
    write_tasks(work / "tasks" / "raw" / "tasks.jsonl", variants=2)
    corpus = (f.text for f in corpus_files(default_corpus_dirs(), 2 * 2**20))
    tokenizer = train_tokenizer(corpus, work / "tokenizer" / "code", vocab_size=2000)
    prepare(
        "tasks",
        work / "tasks" / "raw",
        work / "tasks",
        tokenizer,
        ProcessConfig(max_length=512, incorrect="tag"),
        humaneval_for_decontamination=True,
        split_ratios=(0.6, 0.1, 0.3),
    )
    common = {"dim": 256, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 2000, "multiple_of": 64}
    for seed, (name, extra) in enumerate(
        (("mtp", {"n_layers": 5, "n_future_tokens": 4}), ("ref", {"n_layers": 3}))
    ):
        args = ModelArgs(**common, **extra)
        model = Transformer(args)
        model.init_weights(seed=seed)
        save_model_dir(paths[name], args, model.state_dict())
    return paths


def recipe(paths: dict[str, Path], variant: str, out: Path, steps: int, dtype: str) -> dict:
    return {
        "run": {"name": f"bench-{variant}", "output_dir": str(out), "seed": 0, "device": "cpu"},
        "model": {
            "base": str(paths["mtp"]),
            "tokenizer": str(paths["tokenizer"]),
            "reference": str(paths["ref"]) if variant.startswith("rho1") else None,
            "dtype": dtype,
        },
        "data": {
            "train": str(paths["train"]),
            "validation": str(paths["validation"]),
            "dataset": "tasks",
            "seq_len": 512,
            "micro_batch_size": 2,
            "pack": True,
        },
        "weighting": VARIANTS[variant],
        "train": {
            "max_steps": steps,
            "grad_accum": 2,
            "lr": 1e-3,
            "warmup_ratio": 0.1,
            "ce_chunk_size": 128,
            "eval_every": 0,
            "log_every": 1000,
        },
        "checkpoint": {"every_steps": 0, "resume": "never", "export_safetensors": True},
        "tracking": {"register": False},
    }


def run(paths, variant: str, work: Path, steps: int, dtype: str) -> tuple[dict, Path]:
    from train_wmtp import main as train_main

    out = work / "runs" / f"{variant}-{dtype}"
    shutil.rmtree(out, ignore_errors=True)  # one run's history and export only
    path = work / f"{variant}-{dtype}.yaml"
    settings = recipe(paths, variant, out, steps, dtype)
    if variant == "rho1-precomputed":
        settings["weighting"]["reference_ce_dir"] = str(work / "reference-ce")
    path.write_text(yaml.safe_dump(settings))
    config = work / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "storage": {"root": str(work / "storage"), "cache_dir": str(work / "cache")},
                "mlflow": {"enabled": False},
            }
        )
    )
    if variant == "rho1-precomputed":
        from training.precompute_reference import main as precompute_main

        if precompute_main([str(path), "--config", str(config)]) != 0:
            raise SystemExit("precomputing the reference CE failed")
    started = time.perf_counter()
    code = train_main([str(path), "--config", str(config)])
    if code != 0:
        raise SystemExit(f"{variant}: train_wmtp exited with {code}")
    history = json.loads(next((out / "reports").glob("*_history.json")).read_text())
    times = [h["step_time_s"] for h in history if h.get("stage") == "step"][2:]
    return {
        "variant": variant,
        "dtype": dtype,
        "steps": steps,
        "median_step_s": statistics.median(times),
        "min_step_s": min(times),
        "wall_s": round(time.perf_counter() - started, 1),
    }, out


def save_params(out: Path, export: Path, variant: str) -> None:
    from safetensors.torch import load_file, save_file

    state = {}
    for file in sorted(export.glob("*.safetensors")):
        state |= load_file(file)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / f"{variant}.safetensors"))


def compare(a: Path, b: Path) -> int:
    """Largest relative difference of every saved run's parameters between two folders."""
    from safetensors.torch import load_file

    worst = 0.0
    for file in sorted(a.glob("*.safetensors")):
        left, right = load_file(file), load_file(b / file.name)
        identical = all(torch.equal(left[k], right[k]) for k in left)
        rel = max(
            float((left[k].double() - right[k].double()).abs().max())
            / max(float(left[k].double().abs().max()), 1e-30)
            for k in left
        )
        worst = max(worst, rel)
        print(f"{file.stem}: bit-identical {identical}, max relative difference {rel:.3g}")
    return 0 if worst <= 1e-6 else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/wmtp-bench"))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--algos", default="baseline,rho1-soft,rho1-select,rho1-precomputed,critic")
    p.add_argument("--params-out", type=Path)
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"))
    a = p.parse_args(argv)
    if a.compare:
        return compare(*a.compare)
    from runtime.precision import cpu_model_name

    paths = build_assets(a.work)
    torch.set_num_threads(torch.get_num_threads())
    results = []
    for variant in a.algos.split(","):
        result, out = run(paths, variant, a.work, a.steps, a.dtype)
        results.append(result)
        if a.params_out:
            save_params(a.params_out, out / "export" / "final", variant)
    print(json.dumps({"cpu": cpu_model_name(), "torch": torch.__version__, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

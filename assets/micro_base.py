"""Step 5's pretrained micro base, built and cached by its corpus key.

    storage/models_v2/micro-mtp/pretrain/<key>/   the work of one build (kept until it is done):
        tokenizer.model       a code tokenizer trained on the corpus's training files
        corpus/processed/     train.jsonl, validation.jsonl (the held-out files), SHA256SUMS
        init/                 the initial weights (random, or sliced from 7B_1T_4 when present)
        pretrain.yaml, config.yaml, run/    the `train_wmtp.py` run: checkpoints, report, export
    storage/models_v2/micro-mtp/   safetensors/, tokenizer/, configs/, metadata.json: the base
    storage/models_v2/micro-ref/   its next-token model (the trunk and head 0): the same
                                   pretraining; the demo then fine-tunes it on correct solutions
                                   (the Rho-1 reference step)

A build killed midway resumes where it stopped on the next run (the tokenizer, corpus and init
are reused, the run resumes from its last checkpoint). A second run with the same key only
verifies; a changed corpus or setting (a new key) builds a new base.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from assets.micro import build_micro_model
from assets.pretrain import (
    LeakFilter,
    chunk_records,
    corpus_files,
    corpus_key,
    default_corpus_dirs,
)
from data.records import write_records
from model.args import ModelArgs
from model.tokenizer import Tokenizer, train_tokenizer
from model.weights import load_model_dir, save_model_dir
from runtime.config import EnvConfig, MicroConfig
from runtime.history import read_history
from runtime.integrity import SUMS_FILE, atomic_write_text, verify_sha256sums, write_sha256sums
from runtime.schema import to_dict

MTP, REF = "micro-mtp", "micro-ref"


@dataclass
class Corpus:
    key: str
    files: list  # SourceFile, leak-free
    dropped: dict[str, list[str]]
    n_seen: int
    leak_sources: dict[str, bool]  # which evaluation sets the leak filter held


@dataclass(frozen=True)
class SlicedInit:
    """Meta's 7B_1T_4 to slice the initial weights from (assets/micro.py), when it is there."""

    weights: Path
    tokenizer: Path

    def digest(self) -> str:
        return hashlib.sha256((self.weights / SUMS_FILE).read_bytes()).hexdigest()


def gather_corpus(
    micro: MicroConfig, mbpp: Path | None, tasks: Path | None, sliced: SlicedInit | None = None
) -> Corpus:
    """The corpus files, leak-filtered, and the base's cache key (which also names the weights
    the base starts from)."""
    dirs = [Path(d) for d in micro.corpus_dirs] or default_corpus_dirs()
    files = corpus_files(dirs, int(micro.max_corpus_mb * 2**20))
    leaks = LeakFilter(mbpp, tasks)
    kept, dropped = leaks.split(files)
    start = [f"init sliced from {sliced.digest()}"] if sliced else []
    key = corpus_key(kept, [*leaks.texts, *start], micro)
    sources = {"mbpp": mbpp is not None, "tasks": tasks is not None}
    return Corpus(key, kept, dropped, len(files), sources)


def recipe_for(micro: MicroConfig, work: Path, steps: int, eval_batches: int) -> dict:
    """The pretraining run: all heads, uniform weights, warm-up then cosine decay."""
    return {
        "run": {"name": "micro-pretrain", "output_dir": str(work / "run"), "seed": micro.seed,
                "device": "auto"},
        "model": {"base": str(work / "init"), "tokenizer": str(work / "tokenizer.model"),
                  "dtype": "auto"},
        "data": {"train": str(work / "corpus" / "processed" / "train.jsonl"),
                 "validation": str(work / "corpus" / "processed" / "validation.jsonl"),
                 "dataset": "python-stdlib", "seq_len": micro.pretrain_seq_len,
                 "micro_batch_size": micro.pretrain_micro_batch, "pack": True},
        "weighting": {"algo": "baseline"},
        "train": {"max_steps": steps, "lr": micro.pretrain_lr, "warmup_ratio": 0.05,
                  "min_lr_ratio": 0.1, "weight_decay": 0.1, "ce_chunk_size": 256,
                  "eval_every": steps, "eval_batches": eval_batches, "eval_at_start": False,
                  "log_every": max(steps // 10, 1)},
        "checkpoint": {"every_steps": max(steps // 5, 1), "keep_last": 1, "resume": "auto",
                       "export_safetensors": True},
        "tracking": {"experiment": "micro-pretrain", "register": False},
    }  # fmt: skip


def _verified(directory: Path) -> bool:
    try:
        verify_sha256sums(directory)
    except (OSError, ValueError):
        return False
    return True


def prepare_work(
    corpus: Corpus, micro: MicroConfig, work: Path, log, sliced: SlicedInit | None = None
) -> tuple[int, int]:
    """Tokenizer, corpus records and initial weights in `work` (each reused when intact);
    returns (pretraining steps, validation batches covering the held-out files once)."""
    tok_path = work / "tokenizer.model"
    if not tok_path.is_file():
        log(f"  training a {micro.vocab_size}-piece code tokenizer on {len(corpus.files)} files")
        trained = train_tokenizer((f.text for f in corpus.files), work / "tokenizer",
                                  vocab_size=micro.vocab_size)  # fmt: skip
        trained.replace(tok_path)
        trained.with_suffix(".vocab").unlink(missing_ok=True)
    tok = Tokenizer(tok_path)
    processed = work / "corpus" / "processed"
    train, held_out = chunk_records(
        corpus.files, tok, micro.pretrain_seq_len, micro.holdout_fraction
    )
    if not _verified(processed):
        for name, records in (("train", train), ("validation", held_out)):
            write_records(processed / f"{name}.jsonl", records)
        manifest = {"dataset": "python-stdlib", "data_version": corpus.key, "seed": micro.seed,
                    "config": {"seq_len": micro.pretrain_seq_len}, "template": "raw-code"}  # fmt: skip
        atomic_write_text(processed / "manifest.json", json.dumps(manifest, indent=2) + "\n")
        write_sha256sums(processed, ["train.jsonl", "validation.jsonl", "manifest.json"])
    if not _verified(work / "init"):
        base = (sliced.weights, Tokenizer(sliced.tokenizer)) if sliced else (None, None)
        args, state, init = build_micro_model(micro, tok, False, *base)
        save_model_dir(work / "init", args, state, metadata={"init": init})
        atomic_write_text(work / "init.txt", init + "\n")
    rows = micro.pretrain_micro_batch * micro.pretrain_seq_len
    steps = max(1, math.ceil(micro.pretrain_tokens / rows))
    held_tokens = sum(len(tok.encode(r.response)) + 2 for r in held_out)
    eval_batches = max(1, min(64, math.ceil(held_tokens / (0.9 * rows))))
    log(f"  corpus: {len(corpus.files)} files ({corpus.n_seen - len(corpus.files)} dropped "
        f"for overlapping evaluation texts), {len(train)} training and {len(held_out)} held-out "
        f"chunks; {steps} steps of {rows:,} tokens")  # fmt: skip
    return steps, eval_batches


def pretrain(
    corpus: Corpus, config: EnvConfig, root: Path, log, sliced: SlicedInit | None = None
) -> dict:
    """Builds (or resumes) the base under `root/micro-mtp/pretrain/<key>`; returns its facts."""
    from train_wmtp import main as train_main

    micro = config.assets.micro
    started = time.perf_counter()
    work = root / MTP / "pretrain" / corpus.key[:16]
    for stale in (root / MTP / "pretrain").glob("*"):
        if stale != work:
            shutil.rmtree(stale, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    steps, eval_batches = prepare_work(corpus, micro, work, log, sliced)
    recipe = work / "pretrain.yaml"
    atomic_write_text(recipe, yaml.safe_dump(recipe_for(micro, work, steps, eval_batches)))
    env = to_dict(config)
    env["storage"]["cache_dir"] = str(work / "cache")
    atomic_write_text(work / "config.yaml", yaml.safe_dump(env))
    code = train_main([str(recipe), "--config", str(work / "config.yaml")])
    if code != 0:
        raise RuntimeError(f"pretraining the micro base failed (train_wmtp exit {code}); "
                           f"report in {work / 'run' / 'reports'}")  # fmt: skip
    steps_logged = read_history(work / "run", "step")
    final = steps_logged[-1]
    return {
        "key": corpus.key,
        "version": corpus.key[:16],
        "corpus_sha256": corpus.key,
        "corpus_files": len(corpus.files),
        "corpus_dropped_for_leakage": sorted(corpus.dropped),
        "leak_sources": corpus.leak_sources,
        "tokens_planned": micro.pretrain_tokens,
        "tokens_seen": int(sum(h.get("tokens", 0) for h in steps_logged)),
        "steps": final["step"],
        "held_out_ce_per_head": [final[f"val_ce_head{k}"] for k in range(micro.n_future_tokens)],
        "train_seconds": round(sum(h["step_time_s"] for h in steps_logged), 1),
        "wall_seconds_this_build": round(time.perf_counter() - started, 1),
        "lr": micro.pretrain_lr,
        "init": (work / "init.txt").read_text().strip(),
        "export": str(work / "run" / "export" / "final"),
        "tokenizer": str(work / "tokenizer.model"),
    }


def next_token_part(args: ModelArgs, state: dict) -> tuple[ModelArgs, dict]:
    """The trunk and head 0 of an MTP model: a plain next-token LLaMA (Meta's `layers` hold the
    trunk then head 0; `extra_heads` hold heads 1..)."""
    ref_args = ModelArgs.from_dict(
        {**args.to_dict(), "n_layers": args.n_trunk_layers + 1, "n_future_tokens": 1}
    )
    return ref_args, {k: v for k, v in state.items() if not k.startswith("extra_heads.")}


def install(facts: dict, root: Path, write_json) -> dict[str, tuple[ModelArgs, dict]]:
    """Writes micro-mtp (the pretrained export) and micro-ref (its next-token part) as model dirs
    in fp16 with their tokenizer, configs and metadata."""
    args, state = load_model_dir(Path(facts["export"]))
    tokenizer = Path(facts["tokenizer"])
    models = {MTP: (args, state), REF: next_token_part(args, state)}
    for name, (model_args, model_state) in models.items():
        fp16 = {k: v.to(torch.float16) for k, v in model_state.items()}
        out = root / name
        save_model_dir(out / "safetensors", model_args, fp16,
                       extra_files={"tokenizer.model": tokenizer})  # fmt: skip
        (out / "tokenizer").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tokenizer, out / "tokenizer" / "tokenizer.model")
        write_json(out / "configs" / "params.json", model_args.to_dict())
        public = {k: v for k, v in facts.items() if k not in ("export", "tokenizer")}
        write_json(out / "metadata.json", {
            "dtype": "float16", "init": facts["init"],
            "params": model_args.to_dict(), "n_params": sum(t.numel() for t in fp16.values()),
            "tokenizer_shared_with": MTP, "pretraining": public,
        })  # fmt: skip
    return models


def recorded_leak_sources(root: Path) -> dict[str, bool] | None:
    """Which evaluation sets the installed base's leak filter held (None: no base)."""
    try:
        facts = json.loads((root / MTP / "metadata.json").read_text()).get("pretraining", {})
    except (OSError, ValueError):
        return None
    return facts.get("leak_sources")


def cached_problems(root: Path, key: str) -> list[str]:
    """Why the cached base cannot be used as it is (empty: it can)."""
    problems = []
    for name in (MTP, REF):
        meta = root / name / "metadata.json"
        if not meta.is_file():
            return [f"{meta} missing"]
        try:
            recorded = json.loads(meta.read_text()).get("pretraining", {}).get("key")
        except ValueError as exc:
            return [f"{meta} is not valid JSON ({exc})"]
        if recorded != key:
            problems.append(f"{meta}: built from corpus {str(recorded)[:16]}, the corpus and "
                            f"settings now give {key[:16]}")  # fmt: skip
        if not (root / name / "safetensors" / SUMS_FILE).is_file():
            problems.append(f"{root / name / 'safetensors' / SUMS_FILE} missing")
    return problems

"""Training recipes (recipes/*.yaml) as validated dataclasses.

Every key has a default here except the paths a run cannot guess; `load_recipe` reports the
first bad key as `<section>.<key>=<value> is invalid: <what is allowed>`. The `weighting:`
section is `weighting.config.WeightingConfig` itself: the weighting code reads the same object.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from runtime.schema import apply_overrides, build, key, load_yaml, require
from weighting import WeightingConfig, get_weighter


@dataclass
class RunSection:
    name: str = "wmtp"
    output_dir: str = "outputs/run"
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dist_timeout_s: float = 300.0  # how long healthy ranks wait in a collective for a failed one

    def validate(self, where: str) -> None:
        require(
            math.isfinite(self.dist_timeout_s) and self.dist_timeout_s >= 10,
            key(where, "dist_timeout_s"),
            self.dist_timeout_s,
            "must be >= 10 seconds",
        )


@dataclass
class ModelSection:
    base: str = (
        ""  # model dir (params.json + safetensors) or Meta dir (params.json + consolidated.pth)
    )
    tokenizer: str = ""
    reference: str | None = None  # next-token reference model dir, for rho1-wmtp
    dtype: Literal["auto", "bfloat16", "float32"] = (
        "auto"  # auto: bf16 where native (runtime.precision)
    )
    require_mtp: bool = True  # false only to pre-train a next-token model (e.g. micro-ref)

    def validate(self, where: str) -> None:
        require(
            bool(self.base), key(where, "base"), self.base, "set it to the base model's directory"
        )
        require(
            bool(self.tokenizer),
            key(where, "tokenizer"),
            self.tokenizer,
            "set it to tokenizer.model",
        )


@dataclass
class DataSection:
    train: str = ""
    validation: str | None = None
    dataset: str = "codecontests"  # names the MLflow experiment mtp/{algo}/{dataset}
    seq_len: int = 2048
    micro_batch_size: int = 1
    pack: bool = True

    def validate(self, where: str) -> None:
        require(
            bool(self.train), key(where, "train"), self.train, "set it to a processed train.jsonl"
        )
        require(self.seq_len >= 8, key(where, "seq_len"), self.seq_len, "must be >= 8")
        require(
            self.micro_batch_size >= 1,
            key(where, "micro_batch_size"),
            self.micro_batch_size,
            "must be >= 1",
        )


@dataclass
class TrainSection:
    max_steps: int = 1000
    grad_accum: int = 1
    lr: float = 1e-5
    min_lr_ratio: float = 0.1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.1
    betas: tuple[float, ...] = (0.9, 0.95)
    grad_clip: float = 1.0
    head_weights: list[float] | None = None  # λ_k; default 1.0 for every head
    ce_chunk_size: int = 1024
    activation_checkpointing: bool = False
    fsdp: Literal["auto", "on", "off"] = "auto"
    nan_max_retries: int = 3
    lr_recovery_steps: int = 100  # clean steps after which a halved LR doubles back (0: never)
    oom_auto_shrink: bool = True
    eval_every: int = 0  # steps between validation-loss evaluations (0: never)
    eval_at_start: bool = True  # one before the first step too: where fine-tuning starts from
    eval_batches: int = 8
    eval_pass_every: int = 0  # steps between pass@1 evaluations on `eval_pass` problems (0: never)
    early_stop_patience: int = (
        0  # evaluations of checkpoint.best_metric without improvement (0: off)
    )
    log_every: int = 1

    def validate(self, where: str) -> None:
        require(self.max_steps >= 1, key(where, "max_steps"), self.max_steps, "must be >= 1")
        require(self.grad_accum >= 1, key(where, "grad_accum"), self.grad_accum, "must be >= 1")
        require(self.lr > 0, key(where, "lr"), self.lr, "must be > 0")
        require(
            0 <= self.min_lr_ratio <= 1,
            key(where, "min_lr_ratio"),
            self.min_lr_ratio,
            "must be in [0, 1]",
        )
        require(
            0 <= self.warmup_ratio < 1,
            key(where, "warmup_ratio"),
            self.warmup_ratio,
            "must be in [0, 1)",
        )
        require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            key(where, "betas"),
            list(self.betas),
            "two numbers in [0, 1)",
        )
        require(self.grad_clip > 0, key(where, "grad_clip"), self.grad_clip, "must be > 0")
        require(
            self.ce_chunk_size >= 1, key(where, "ce_chunk_size"), self.ce_chunk_size, "must be >= 1"
        )
        require(
            self.nan_max_retries >= 0,
            key(where, "nan_max_retries"),
            self.nan_max_retries,
            "must be >= 0",
        )
        if self.head_weights is not None:
            require(
                all(w >= 0 for w in self.head_weights) and any(self.head_weights),
                key(where, "head_weights"),
                self.head_weights,
                "non-negative, not all zero",
            )


@dataclass
class CheckpointSection:
    every_steps: int = 200
    keep_last: int = 3
    resume: Literal["auto", "never"] = "auto"
    export_safetensors: bool = True
    best_metric: Literal["val_loss", "pass@1"] = "val_loss"  # what picks `best`
    check_free_space: bool = True  # refuse a save that cannot fit, before writing anything
    periodic_save_failure: Literal["stop", "skip"] = "stop"  # skip: warn and train on

    def validate(self, where: str) -> None:
        require(
            self.every_steps >= 0,
            key(where, "every_steps"),
            self.every_steps,
            "must be >= 0 (0: only at the end)",
        )
        require(self.keep_last >= 1, key(where, "keep_last"), self.keep_last, "must be >= 1")


@dataclass
class TrackingSection:
    experiment: str | None = None  # default mtp/{algo}/{dataset}
    run_name: str | None = None
    sample_tokens: int = 48  # tokens shown with their weights in the run report
    register: bool = True  # register the export in the MLflow model registry at the end
    registry_name: str = "wmtp-{algo}"
    release_note: str | None = None  # default: a summary of the run


@dataclass
class EvalPassSection:
    """Held-out problems for pass@1 during training (`train.eval_pass_every`)."""

    benchmark: Literal["tasks", "mbpp", "codecontests", "humaneval"] = "mbpp"
    problems: str = (
        ""  # tasks: the synthetic task JSONL; mbpp: mbpp.jsonl; codecontests: split file
    )
    split: str | None = None  # tasks: a processed split naming the task ids (validation.jsonl)
    limit: int = 32
    n_samples: int = 1
    temperature: float = 0.0  # greedy; the protocol's sampling is 0.2 with top_p 0.95
    top_p: float = 0.95
    max_new_tokens: int = 256
    timeout_s: float = 10.0
    max_tests: int | None = None
    condition: Literal["correct", "none"] = "correct"

    def validate(self, where: str) -> None:
        require(self.limit >= 1, key(where, "limit"), self.limit, "must be >= 1")
        require(self.n_samples >= 1, key(where, "n_samples"), self.n_samples, "must be >= 1")
        require(
            self.max_new_tokens >= 1,
            key(where, "max_new_tokens"),
            self.max_new_tokens,
            "must be >= 1",
        )
        require(self.temperature >= 0, key(where, "temperature"), self.temperature, "must be >= 0")
        require(0 < self.top_p <= 1, key(where, "top_p"), self.top_p, "must be in (0, 1]")


@dataclass
class Recipe:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    eval_pass: EvalPassSection = field(default_factory=EvalPassSection)

    def validate(self, where: str) -> None:
        needs = get_weighter(self.weighting).needs
        if "reference_ce" in needs and self.weighting.reference_source == "online":
            require(
                bool(self.model.reference),
                "model.reference",
                self.model.reference,
                f"{self.weighting.algo} needs a reference model (or weighting.reference_source: "
                "precomputed)",
            )
        if self.checkpoint.best_metric == "pass@1":
            require(
                self.train.eval_pass_every > 0,
                "checkpoint.best_metric",
                "pass@1",
                "needs train.eval_pass_every > 0 (and an eval_pass: problem set)",
            )
        if self.train.eval_pass_every > 0 and self.eval_pass.benchmark != "humaneval":
            require(
                bool(self.eval_pass.problems),
                "eval_pass.problems",
                self.eval_pass.problems,
                f"set it to the {self.eval_pass.benchmark} problems for train.eval_pass_every",
            )


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Reads, overrides (`section.key=value`) and validates a recipe YAML."""
    data = apply_overrides(load_yaml(path), list(overrides or []))
    return build(Recipe, data)

"""The weighted-MTP training loop: set-up, (critic stage 1), steps with guards, checkpoints, tracking."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn

from data.loader import IGNORE_INDEX, Batch, LoaderConfig, TrainLoader
from data.tokenized import cache_key, load_tokenized
from model.args import ModelArgs
from model.checkpoint import load_checkpoint_dir
from model.tokenizer import Tokenizer
from model.transformer import Transformer
from runtime.config import EnvConfig
from runtime.plots import histogram_svg
from runtime.schema import ConfigError, flatten, to_dict
from runtime.tracking import Tracker, scrub_tree
from training.checkpointing import CheckpointManager, export_safetensors
from training.distributed import DistInfo, all_reduce_sum, all_true
from training.loss import chunked_head_ce, sequential_mtp_backward
from training.parallel import (
    all_reduce_replicated_grads,
    clip_grad_norm,
    parallelize,
    replicated_parameters,
    set_gradient_sync,
)
from training.recipe import Recipe
from training.report import weighted_tokens_markdown, write_run_report
from weighting import (
    ValueHead,
    WeightingInputs,
    align_to_heads,
    gae,
    get_weighter,
    td_errors,
    terminal_rewards,
    value_loss,
    weight_stats,
)
from weighting.reference_store import ReferenceCEStore
from weighting.rho1 import reference_next_token_ce
from weighting.stats import scalar_stats

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
EXIT_OK, EXIT_NAN, EXIT_OOM = 0, 3, 4


class TrainingFailure(RuntimeError):
    """A clean, reported stop: `what` went wrong, `next_action` to take, process `exit_code`."""

    def __init__(self, what: str, next_action: str, exit_code: int):
        super().__init__(what)
        self.what, self.next_action, self.exit_code = what, next_action, exit_code


@dataclass
class GuardState:
    lr_scale: float = 1.0
    consecutive_failures: int = 0
    skipped_steps: int = 0
    fired_faults: list[str] = field(default_factory=list)


def lr_at(step: int, recipe: Recipe) -> float:
    """Linear warmup over warmup_ratio·max_steps, then cosine down to min_lr_ratio·lr."""
    t = recipe.train
    warmup = max(1, round(t.warmup_ratio * t.max_steps)) if t.warmup_ratio > 0 else 0
    if step < warmup:
        return t.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, t.max_steps - warmup))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def memory_report(device: torch.device) -> str:
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    text = f"host peak RSS: {rss_mb:.0f} MiB\n"
    if device.type == "cuda":
        text += torch.cuda.memory_summary(device, abbreviated=True)
    return text


class Trainer:
    def __init__(self, recipe: Recipe, env: EnvConfig, info: DistInfo):
        self.recipe, self.env, self.info = recipe, env, info
        self.out = Path(recipe.run.output_dir)
        self.device = info.device
        self.guard = GuardState()
        self.step = 0
        self.stage1_step = 0
        self.history: list[dict] = []
        self.best_val: float | None = None
        self.tracker = Tracker(env.mlflow, active=info.is_main)
        self.run_id: str | None = None
        self.last_weights: tuple[Batch, torch.Tensor] | None = None
        self.first_weights: tuple[Batch, torch.Tensor] | None = None
        self.hist_counts: list[int] | None = None
        self._setup()

    # ----------------------------------------------------------------- set-up
    def _setup(self) -> None:
        r = self.recipe
        torch.manual_seed(r.run.seed)
        self.tokenizer = Tokenizer(r.model.tokenizer)
        self.args, state = load_checkpoint_dir(r.model.base)
        if self.args.n_future_tokens < 2 and r.model.require_mtp:
            raise ConfigError(f"model.base={r.model.base!r} has n_future_tokens={self.args.n_future_tokens}: "
                              "the base must be an MTP model (n_future_tokens >= 2)")  # fmt: skip
        if self.args.vocab_size != self.tokenizer.n_words:
            raise ConfigError(f"model.tokenizer has {self.tokenizer.n_words} pieces, the base model "
                              f"{self.args.vocab_size}: they must match")  # fmt: skip
        self.n_heads = self.args.n_future_tokens
        self.head_weights = list(r.train.head_weights or [1.0] * self.n_heads)
        if len(self.head_weights) != self.n_heads:
            raise ConfigError(
                f"train.head_weights={self.head_weights} is invalid: needs {self.n_heads} values"
            )
        self.compute_dtype = DTYPES[r.model.dtype]
        self.use_fsdp = r.train.fsdp == "on" or (r.train.fsdp == "auto" and self.info.enabled)
        self.model = self._build(self.args, state, trainable=True)
        self.reference = self._load_reference()
        self.ref_store = None
        if r.weighting.algo == "rho1-wmtp" and r.weighting.reference_source == "precomputed":
            self.ref_store = ReferenceCEStore(r.weighting.reference_ce_dir, self.data_key)
        self.weighter = get_weighter(r.weighting.algo, r.weighting.normalize_config())
        self.value_head = (
            ValueHead(self.args.dim).to(self.device) if r.weighting.algo == "critic-wmtp" else None
        )
        self.optimizer = self._optimizer()
        self.value_optimizer = (torch.optim.AdamW(self.value_head.parameters(), lr=r.weighting.critic.value_lr)
                                if self.value_head is not None else None)  # fmt: skip
        self.loader = self._loader(r.data.train, r.data.micro_batch_size, shuffle_seed=r.run.seed)
        self.ckpt = CheckpointManager(self.out / "checkpoints", self.info, r.checkpoint.keep_last)

    @functools.cached_property
    def data_key(self) -> str:
        """Hash of the tokenised training split (names precomputed reference CE, logged to MLflow)."""
        return cache_key(Path(self.recipe.data.train), self.tokenizer)

    def _build(self, args: ModelArgs, state: dict, trainable: bool) -> nn.Module:
        """fp32 master weights (bf16 compute via autocast or FSDP's policy); reference in compute dtype."""
        param_dtype = torch.float32 if trainable else self.compute_dtype
        if self.use_fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
            )

            with torch.device("meta"):
                model = Transformer(args)
            mp = self.compute_dtype if self.compute_dtype != torch.float32 else None
            parallelize(
                model,
                fsdp=True,
                activation_checkpointing=trainable and self.recipe.train.activation_checkpointing,
                param_dtype=mp,
            )
            model.to_empty(device=self.device)
            if not trainable:
                model.to(param_dtype)
            options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
            set_model_state_dict(model, state if self.info.is_main else {}, options=options)
        else:
            model = Transformer(args)
            model.load_state_dict(state, strict=True)
            model = model.to(device=self.device, dtype=param_dtype)
            parallelize(
                model,
                fsdp=False,
                activation_checkpointing=trainable and self.recipe.train.activation_checkpointing,
                param_dtype=None,
            )
        if not trainable:
            model.eval().requires_grad_(False)
        return model

    def _load_reference(self) -> nn.Module | None:
        r = self.recipe
        if r.weighting.algo != "rho1-wmtp" or r.weighting.reference_source != "online":
            return None
        args, state = load_checkpoint_dir(r.model.reference)
        if args.vocab_size != self.args.vocab_size:
            raise ConfigError(f"model.reference vocab {args.vocab_size} != base vocab {self.args.vocab_size}: "
                              "Rho-1 scores need the same tokenizer")  # fmt: skip
        return self._build(args, state, trainable=False)

    def _optimizer(self) -> torch.optim.Optimizer:
        t = self.recipe.train
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.ndim < 2]
        groups = [
            {"params": decay, "weight_decay": t.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(
            groups, lr=t.lr, betas=tuple(t.betas), fused=self.device.type == "cuda"
        )

    def _loader(self, path: str, batch_size: int, shuffle_seed: int) -> TrainLoader:
        data = load_tokenized(path, self.tokenizer, self.env.storage.cache_dir)
        cfg = LoaderConfig(seq_len=self.recipe.data.seq_len, batch_size=batch_size, n_heads=self.n_heads,
                           pack=self.recipe.data.pack, seed=shuffle_seed, pad_id=self.tokenizer.pad_id)  # fmt: skip
        return TrainLoader(data, cfg, rank=self.info.rank, world_size=self.info.world_size)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    # ------------------------------------------------------------- weights
    def _reference_ce(self, batch: Batch) -> torch.Tensor:
        """Reference next-token CE aligned to the heads, (B, L, H)."""
        if self.ref_store is not None:
            ce = torch.full(batch.tokens.shape, float("nan"))
            for b, ids in enumerate(batch.sample_ids):
                for seg, sid in enumerate(ids):
                    pos = (batch.segment_ids[b] == seg).nonzero().flatten().cpu()
                    values = self.ref_store.get(sid)[: len(pos) - 1]
                    ce[b, pos[: len(values)]] = values
            ce = ce.to(self.device)
        else:
            with torch.no_grad(), self.autocast():
                ce = reference_next_token_ce(
                    self.reference, batch.tokens, self.recipe.train.ce_chunk_size
                )
        return align_to_heads(ce, self.n_heads)

    def _td_errors(self, batch: Batch, values_box: dict) -> torch.Tensor:
        """TD errors of the frozen value head, aligned to the heads (computed once per micro-batch)."""
        if "td" not in values_box:
            critic = self.recipe.weighting.critic
            resp = batch.valid[..., 0]
            rewards = terminal_rewards(resp, batch.token_is_correct, critic.to_config())
            delta = td_errors(rewards, values_box["values"], resp, critic.gamma)
            values_box["td"] = align_to_heads(delta, self.n_heads, fill=0.0)
        return values_box["td"]

    def _weights_fn(self, batch: Batch, values_box: dict):
        """Per-head token weights for this micro-batch from the registry's weighter, one head at a
        time (a one-head slice of every input); True when it needs the base model's CE."""
        valid = batch.valid
        ref = self._reference_ce(batch) if self.weighter.name == "rho1-wmtp" else None

        def head_weights(k: int, base_ce: torch.Tensor | None) -> torch.Tensor:
            one = slice(k, k + 1)
            inputs = WeightingInputs(valid[..., one])
            if ref is not None:
                inputs.base_ce, inputs.ref_ce = base_ce[..., None], ref[..., one]
            if self.weighter.name == "critic-wmtp":
                inputs.td_error = self._td_errors(batch, values_box)[..., one]
            return self.weighter.weights(inputs)[..., 0]

        return head_weights, ref is not None

    # ---------------------------------------------------------------- steps
    def _micro_batches(self, accum: int) -> list[Batch]:
        return [self.loader.next_batch().to(self.device) for _ in range(accum)]

    def train_step(self, accum: int) -> dict[str, float]:
        r = self.recipe
        start = time.perf_counter()
        micro = self._micro_batches(accum)
        local_counts = [
            float(sum((b.labels[..., k] != IGNORE_INDEX).sum() for b in micro))
            for k in range(self.n_heads)
        ]
        denominators = all_reduce_sum(local_counts, self.info)  # N_k over the whole optimizer step
        lr = lr_at(self.step, r) * self.guard.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss, ce_sum, ce_cnt, all_weights = 0.0, [0.0] * self.n_heads, [0] * self.n_heads, []
        for i, batch in enumerate(micro):
            set_gradient_sync(self.model, i == len(micro) - 1)
            box: dict = {}
            weights_fn, needs_ce = self._weights_fn(batch, box)
            hook = None
            if self.value_head is not None:

                def hook(h: torch.Tensor, box: dict = box) -> None:  # noqa: E306
                    with torch.no_grad():
                        box["values"] = self.value_head(h)

            res = sequential_mtp_backward(
                self.model, batch.tokens, batch.labels, self.head_weights, weights_fn, denominators,
                r.train.ce_chunk_size, needs_base_ce=needs_ce, loss_scale=float(self.info.world_size),
                autocast=self.autocast, trunk_hook=hook,
            )  # fmt: skip
            loss += res.loss
            for k in range(self.n_heads):
                ce_sum[k] += res.ce_sum[k]
                ce_cnt[k] += res.ce_count[k]
            all_weights.append((batch, torch.stack(res.weights, dim=-1)))
        self._inject_faults()
        grad_norm = self._clip_grads()
        totals = all_reduce_sum(
            [loss, *ce_sum, *ce_cnt, float(sum(int((b.segment_ids >= 0).sum()) for b in micro))],
            self.info,
        )
        loss = totals[0]
        finite = all_true(math.isfinite(loss) and math.isfinite(grad_norm), self.info)
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        head_ce = [
            totals[1 + k] / max(totals[1 + self.n_heads + k], 1) for k in range(self.n_heads)
        ]
        weights = torch.cat([w[b.valid] for b, w in all_weights]) if all_weights else torch.zeros(0)
        stats = weight_stats(weights, torch.ones_like(weights, dtype=torch.bool), r.weighting.min_weight,
                             r.weighting.max_weight if r.weighting.algo != "baseline" else None,
                             hist_max=r.weighting.max_weight)  # fmt: skip
        self.hist_counts = stats["hist_counts"]
        self.last_weights = all_weights[0]
        if self.first_weights is None:
            self.first_weights = all_weights[0]
        tokens = totals[-1]
        metrics = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens / elapsed,
                   "step_time_s": elapsed, **scalar_stats(stats),
                   **{f"ce_head{k}": head_ce[k] for k in range(self.n_heads)}}  # fmt: skip
        metrics["mfu"] = self._mfu(metrics["tokens_per_s"])
        metrics["finite"] = 1.0 if finite else 0.0
        return metrics

    def _inject_faults(self) -> None:
        tag = f"nan@{self.step}"
        if self.step in self.recipe.faults.nan_at_steps and tag not in self.guard.fired_faults:
            self.guard.fired_faults.append(tag)
            param = next(p for p in self.model.parameters() if p.grad is not None)
            param.grad.fill_(float("nan"))
        tag = f"oom@{self.step}"
        if self.step in self.recipe.faults.oom_at_steps and tag not in self.guard.fired_faults:
            self.guard.fired_faults.append(tag)
            raise torch.OutOfMemoryError(
                f"simulated out-of-memory at step {self.step} (faults.oom_at_steps)"
            )

    def _clip_grads(self) -> float:
        if self.use_fsdp:
            all_reduce_replicated_grads(replicated_parameters(self.model))
        return clip_grad_norm(list(self.model.parameters()), self.recipe.train.grad_clip)

    @functools.cached_property
    def flops_per_token(self) -> float:
        """6·(block params + H·dim·vocab) + causal attention: each head's projection runs once."""
        a = self.args
        blocks = sum(
            p.numel()
            for n, p in self.model.named_parameters()
            if "layers" in n or "extra_heads" in n
        )
        attention = 6 * a.n_layers * a.dim * self.recipe.data.seq_len
        return 6 * (blocks + self.n_heads * a.dim * a.vocab_size) + attention

    def _mfu(self, tokens_per_s: float) -> float:
        """Model FLOPs utilisation against hardware.peak_tflops on every rank."""
        peak = self.env.hardware.peak_tflops * 1e12 * self.info.world_size
        return self.flops_per_token * tokens_per_s / peak

    def critic_stage1_step(self) -> dict[str, float]:
        """Regress the value head on GAE returns of the sequence reward (trunk frozen)."""
        cfg = self.recipe.weighting.critic
        batch = self.loader.next_batch().to(self.device)
        with torch.no_grad(), self.autocast():
            h = self.model(batch.tokens, return_trunk=True)
        resp = batch.valid[..., 0]
        values = self.value_head(h.float())
        rewards = terminal_rewards(resp, batch.token_is_correct, cfg.to_config())
        _, returns = gae(rewards, values.detach(), resp, cfg.gamma, cfg.gae_lambda)
        loss = value_loss(values, returns, resp)
        self.value_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.info.enabled:
            for p in self.value_head.parameters():
                torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.AVG)
        self.value_optimizer.step()
        return {"value_loss": all_reduce_sum([loss.item()], self.info)[0] / self.info.world_size}

    @torch.no_grad()
    def validation_loss(self) -> dict[str, float] | None:
        r = self.recipe
        if not r.data.validation:
            return None
        loader = self._loader(r.data.validation, r.data.micro_batch_size, shuffle_seed=0)
        sums, counts = [0.0] * self.n_heads, [0.0] * self.n_heads
        self.model.eval()
        for _ in range(r.train.eval_batches):
            batch = loader.next_batch().to(self.device)
            with self.autocast():
                h = self.model(batch.tokens, return_trunk=True)
                for k in range(self.n_heads):
                    z = self.model.head_hidden(h, k)
                    ce = chunked_head_ce(self.model, z, batch.labels[..., k], r.train.ce_chunk_size)
                    sums[k] += float(ce.sum())
                    counts[k] += float((batch.labels[..., k] != IGNORE_INDEX).sum())
        self.model.train()
        totals = all_reduce_sum(sums + counts, self.info)
        ce = [totals[k] / max(totals[self.n_heads + k], 1) for k in range(self.n_heads)]
        return {"val_loss": ce[0], **{f"val_ce_head{k}": ce[k] for k in range(self.n_heads)}}

    # ----------------------------------------------------------- checkpoints
    def trainer_state(self) -> dict:
        return {"step": self.step, "stage1_step": self.stage1_step, "loader": self.loader.state_dict(),
                "guard": vars(self.guard), "run_id": self.run_id, "best_val": self.best_val,
                "micro_batch_size": self.loader.config.batch_size, "history": self.history[-2000:]}  # fmt: skip

    def _extra_modules(self) -> dict[str, nn.Module]:
        return {"value_head": self.value_head} if self.value_head is not None else {}

    def save_checkpoint(self) -> Path:
        return self.ckpt.save(
            self.step, self.model, self.optimizer, self.trainer_state(), self._extra_modules()
        )

    def resume(self) -> bool:
        if self.recipe.checkpoint.resume != "auto":
            return False
        latest = self.ckpt.latest()
        if latest is None:
            return False
        state = self.ckpt.load(latest, self.model, self.optimizer, self._extra_modules())
        self.step, self.stage1_step = state["step"], state["stage1_step"]
        self.guard = GuardState(**state["guard"])
        self.run_id, self.best_val, self.history = (
            state["run_id"],
            state["best_val"],
            state["history"],
        )
        if state["micro_batch_size"] != self.loader.config.batch_size:
            self.loader = self._loader(
                self.recipe.data.train, state["micro_batch_size"], self.recipe.run.seed
            )
        self.loader.load_state_dict(state["loader"])
        if self.info.is_main:
            print(f"[resume] {latest} (step {self.step})", flush=True)
        return True

    # ------------------------------------------------------------------ run
    def _experiment(self) -> str:
        r = self.recipe
        return r.tracking.experiment or f"mtp/{r.weighting.algo}/{r.data.dataset}"

    def _start_tracking(self) -> None:
        params = flatten(to_dict(self.recipe))
        params.update({"model.n_future_tokens": self.n_heads, "model.n_params": sum(p.numel() for p in self.model.parameters()),
                       "data.hash": self.data_key, "world_size": self.info.world_size})  # fmt: skip
        self.run_id = self.tracker.start(self._experiment(), self.recipe.tracking.run_name or self.recipe.run.name,
                                         params, tags={"algo": self.recipe.weighting.algo}, run_id=self.run_id)  # fmt: skip
        if self.info.is_main and self.run_id is None:
            self.run_id = f"local-{int(time.time())}"
        if self.info.enabled:
            box = [self.run_id]
            torch.distributed.broadcast_object_list(box, src=0)
            self.run_id = box[0]

    def _log(self, metrics: dict[str, float], step: int, stage: str = "step") -> None:
        self.history.append(
            {
                "stage": stage,
                "step": step,
                **{k: v for k, v in metrics.items() if isinstance(v, float | int)},
            }
        )
        self.tracker.log_metrics(metrics, step)
        last = (
            self.recipe.weighting.critic.stage1_steps
            if stage == "stage1"
            else self.recipe.train.max_steps
        )
        if self.info.is_main and (step % self.recipe.train.log_every == 0 or step == last):
            keys = ("loss", "value_loss", "val_loss", "lr", "grad_norm", "tokens_per_s")
            shown = " ".join(
                f"{k}={v:.4g}" for k, v in metrics.items() if k.removeprefix("stage1_") in keys
            )
            print(f"[{stage} {step}] {shown}", flush=True)

    def run(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        self.resume()
        self._start_tracking()
        try:
            self._run_stage1()
            self._run_stage2()
        except TrainingFailure as failure:
            self._finish(failure)
            return failure.exit_code
        self._finish(None)
        return EXIT_OK

    def _run_stage1(self) -> None:
        if self.value_head is None:
            return
        steps = self.recipe.weighting.critic.stage1_steps
        while self.stage1_step < steps:
            metrics = self.critic_stage1_step()
            self.stage1_step += 1
            self._log(
                {f"stage1_{k}": v for k, v in metrics.items()}, self.stage1_step, stage="stage1"
            )

    def _run_stage2(self) -> None:
        r = self.recipe
        accum = r.train.grad_accum * r.data.micro_batch_size // self.loader.config.batch_size
        while self.step < r.train.max_steps:
            cursor = self.loader.state_dict()
            try:
                metrics = self.train_step(accum)
            except torch.OutOfMemoryError as exc:
                accum = self._handle_oom(exc, cursor, accum)
                continue
            if metrics["finite"] < 1:
                self._handle_nonfinite(metrics)
                continue
            self.guard.consecutive_failures = 0
            self.step += 1
            val = (
                self.validation_loss()
                if r.train.eval_every and self.step % r.train.eval_every == 0
                else None
            )
            self._log({**metrics, **(val or {})}, self.step)
            self._maybe_checkpoint(val)
            if r.faults.kill_at_step == self.step:
                os._exit(137)  # simulated hard kill: no cleanup, no final checkpoint

    def _maybe_checkpoint(self, val: dict | None) -> None:
        r = self.recipe
        improved = val is not None and (self.best_val is None or val["val_loss"] < self.best_val)
        if improved:
            self.best_val = val["val_loss"]
        periodic = r.checkpoint.every_steps and self.step % r.checkpoint.every_steps == 0
        if periodic or improved or self.step == r.train.max_steps:
            path = self.save_checkpoint()
            if improved:
                self.ckpt.mark_best(path)

    def _handle_nonfinite(self, metrics: dict) -> None:
        g = self.guard
        g.consecutive_failures += 1
        g.skipped_steps += 1
        g.lr_scale *= 0.5
        if self.info.is_main:
            print(f"[guard] non-finite loss/grad at step {self.step + 1} (loss={metrics['loss']}, "
                  f"grad_norm={metrics['grad_norm']}): update skipped, lr scale -> {g.lr_scale}", flush=True)  # fmt: skip
        if not all_true(
            all(bool(torch.isfinite(p).all()) for p in self.model.parameters()), self.info
        ):
            latest = self.ckpt.latest()
            if latest is None:
                raise TrainingFailure("parameters became non-finite and no checkpoint exists to restore",
                                      "lower train.lr or set checkpoint.every_steps, then rerun", EXIT_NAN)  # fmt: skip
            cursor = self.loader.state_dict()
            self.ckpt.load(
                latest, self.model, self.optimizer, self._extra_modules(), restore_rng=False
            )
            self.loader.load_state_dict(cursor)
        if g.consecutive_failures > self.recipe.train.nan_max_retries:
            raise TrainingFailure(
                f"{g.consecutive_failures} consecutive non-finite steps at step {self.step + 1} "
                f"(last loss {metrics['loss']}, grad norm {metrics['grad_norm']}); lr scale reached {g.lr_scale}",
                f"resume from the last checkpoint with a lower train.lr (e.g. train.lr={self.recipe.train.lr * g.lr_scale:g}), "
                "check the data batch around this step, or raise weighting.min_weight / lower max_weight",
                EXIT_NAN,
            )  # fmt: skip

    def _handle_oom(self, exc: Exception, cursor: dict, accum: int) -> int:
        self.optimizer.zero_grad(set_to_none=True)
        report = memory_report(self.device)
        mb = self.loader.config.batch_size
        if self.info.is_main:
            (self.out / "reports").mkdir(parents=True, exist_ok=True)
            (self.out / "reports" / f"oom_step{self.step + 1}.txt").write_text(f"{exc}\n\n{report}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if not self.info.enabled and self.recipe.train.oom_auto_shrink and mb > 1:
            new_mb = mb // 2
            print(
                f"[oom] {exc}: micro-batch {mb} -> {new_mb}, grad accumulation {accum} -> {accum * 2}",
                flush=True,
            )
            self.loader = self._loader(self.recipe.data.train, new_mb, self.recipe.run.seed)
            self.loader.load_state_dict(cursor)
            return accum * 2
        suggestion = (f"data.micro_batch_size={max(mb // 2, 1)} train.grad_accum={self.recipe.train.grad_accum * 2}"
                      if mb > 1 else "train.activation_checkpointing=true or a smaller data.seq_len")  # fmt: skip
        raise TrainingFailure(f"out of memory at step {self.step + 1} with micro-batch {mb}: {exc}\n\n```\n{report}```",
                              f"resume (the last checkpoint is intact) with {suggestion}", EXIT_OOM)  # fmt: skip

    # --------------------------------------------------------------- finish
    def _finish(self, failure: TrainingFailure | None) -> None:
        r = self.recipe
        export = None
        if failure is None and r.checkpoint.export_safetensors:
            export = export_safetensors(self.model, self.args, self.out / "export" / "final", self.info,
                                        DTYPES[r.model.dtype], {"run_id": str(self.run_id), "algo": r.weighting.algo},
                                        tokenizer=Path(r.model.tokenizer))  # fmt: skip
        if not self.info.is_main:
            return
        reports = self.out / "reports"
        reports.mkdir(parents=True, exist_ok=True)
        hist_name = f"{self.run_id}_weights.svg"
        if self.hist_counts:
            (reports / hist_name).write_text(
                histogram_svg(
                    self.hist_counts, r.weighting.max_weight, f"token weights ({r.weighting.algo})"
                )
            )
        (reports / f"{self.run_id}_history.json").write_text(json.dumps(self.history))
        if self.first_weights is not None:
            (reports / f"{self.run_id}_token_weights.json").write_text(
                json.dumps(self._token_weights(*self.first_weights))
            )
        summary = self._summary(export)
        report = write_run_report(
            reports / f"{self.run_id}.md", str(self.run_id), f"{r.run.name}: {r.weighting.algo}", summary,
            scrub_tree(to_dict(r)), self._sample_tokens(), hist_name if self.hist_counts else None,
            (failure.what, failure.next_action) if failure else None,
        )  # fmt: skip
        for path in (
            report,
            reports / f"{self.run_id}_history.json",
            *([reports / hist_name] if self.hist_counts else []),
        ):
            self.tracker.log_artifact(path, "reports")
        snapshot = reports / f"{self.run_id}_recipe.yaml"
        snapshot.write_text(yaml.safe_dump(scrub_tree(to_dict(r)), sort_keys=False))
        self.tracker.log_artifact(snapshot, "recipe")
        if failure:
            print(
                f"error: {failure.what}\nnext action: {failure.next_action}\nreport: {report}",
                flush=True,
            )
        self.tracker.end("FAILED" if failure else "FINISHED")

    def _summary(self, export: Path | None) -> dict:
        last = self.history[-1] if self.history else {}
        summary = {"steps": self.step, "skipped_steps": self.guard.skipped_steps}
        for k in (
            "loss",
            "val_loss",
            "tokens_per_s",
            "mfu",
            "weight_mean",
            "weight_std",
            "weight_clipped_fraction",
            *[f"ce_head{i}" for i in range(self.n_heads)],
        ):
            if k in last:
                summary[k] = float(last[k])
        losses = [h["loss"] for h in self.history if "loss" in h]
        if losses:
            summary["first_loss"] = float(losses[0])
        if export:
            summary["export"] = str(export)
        return summary

    def _token_weights(self, batch: Batch, weights: torch.Tensor, rows: int = 2) -> dict:
        """Head-0 weights of the first step's first rows, per target token (for heatmaps)."""
        examples = []
        for b in range(min(rows, batch.tokens.shape[0])):
            valid = batch.valid[b, :, 0].cpu()
            pos = valid.nonzero().flatten()[:400]
            examples.append({
                "sample_ids": batch.sample_ids[b],
                "pieces": [self.tokenizer.id_to_piece(int(batch.labels[b, p, 0])) for p in pos],
                "weights": [round(float(weights[b, p, 0]), 4) for p in pos],
            })  # fmt: skip
        return {"algo": self.recipe.weighting.algo, "step": 1, "examples": examples}

    def _sample_tokens(self) -> str:
        if self.last_weights is None:
            return ""
        batch, weights = self.last_weights
        valid = batch.valid[0, :, 0].cpu()
        pos = valid.nonzero().flatten()[: self.recipe.tracking.sample_tokens]
        pieces = [self.tokenizer.id_to_piece(int(batch.labels[0, p, 0])) for p in pos]
        return weighted_tokens_markdown(pieces, [float(weights[0, p, 0]) for p in pos])

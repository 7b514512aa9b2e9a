"""Weighted multi-token-prediction fine-tuning: the whole run, top to bottom.

    torchrun --nproc_per_node=8 train_wmtp.py recipes/rho1.yaml [--config recipes/config.yaml] [key=value ...]
    python train_wmtp.py recipes/micro-baseline.yaml train.max_steps=20      # single process, CPU or GPU

A run: set-up (recipe, model, optimizer, loader, weighter, tracker, resume) → critic stage 1
(critic-wmtp only) → optimizer steps → export and report. One optimizer step:

    for each of `grad_accum` micro-batches:
        trunk  = model trunk forward                       (graph kept)
        inputs = the signals the weighter needs            (policy CE, reference CE, TD errors)
        w      = weighter.weights(inputs)                  (bsz, seq, n_heads), mean 1 per head
        mtp_loss_backward(trunk, labels, w, λ, N)          (one head at a time, then the trunk)
    guards (NaN / OOM) → AdamW step → log → validate → checkpoint

Exit codes: 0 done, 2 bad recipe/config/input, 3 stopped by the NaN guard, 4 out of memory.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

import torch

from data.tokenized import cache_key
from model.tokenizer import Tokenizer
from runtime.config import EnvConfig, load_env_config
from runtime.precision import resolve_precision
from runtime.schema import ConfigError
from runtime.tracking import Tracker
from training.checkpoints import CheckpointManager, TrainState, export_safetensors
from training.critic_stage1 import build_value_head, run_stage1
from training.distributed import DistInfo, all_true, init_distributed, shutdown
from training.guards import (
    EXIT_CONFIG,
    EXIT_OK,
    TrainingFailure,
    inject_faults,
    no_checkpoint_to_restore,
    on_nonfinite_step,
    on_out_of_memory,
    parameters_finite,
    weighting_failure,
)
from training.loss import autocast, mtp_loss_backward
from training.parallel import set_gradient_sync
from training.recipe import Recipe, load_recipe
from training.reference import ReferenceCEStore
from training.report import StepLog, WeightSamples, start_tracking, write_reports
from training.setup import (
    build_loader,
    build_optimizer,
    build_training_model,
    flops_per_token,
    head_weights_for,
    load_base,
    load_reference_files,
    lr_at,
)
from training.signals import Signals
from training.step import (
    StepTotals,
    clip_gradients,
    global_target_counts,
    is_finite,
    select_step_tokens,
    set_lr,
    validation_loss,
)
from weighting import WeightingError, get_weighter, scalar_stats


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
        return EXIT_CONFIG
    info = init_distributed(recipe.run.device, recipe.run.dist_timeout_s)
    try:
        return train(recipe, env, info)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        shutdown(info)


def train(recipe: Recipe, env: EnvConfig, info: DistInfo) -> int:
    # ------------------------------------------------------------------------------ set-up
    torch.manual_seed(recipe.run.seed)
    r, device, out = recipe, info.device, Path(recipe.run.output_dir)
    precision = resolve_precision(r.model.dtype, device)
    dtype = precision.dtype
    if info.is_main:
        print(f"[setup] compute dtype {precision.name}: {precision.reason}", flush=True)
    tokenizer = Tokenizer(r.model.tokenizer)
    args, weights = load_base(r.model, tokenizer)
    n_heads = args.n_future_tokens
    head_weights = head_weights_for(r.train, n_heads)
    use_fsdp = r.train.fsdp == "on" or (r.train.fsdp == "auto" and info.enabled)
    model = build_training_model(
        args, weights, info, dtype, use_fsdp, True, r.train.activation_checkpointing
    )
    data_hash = cache_key(Path(r.data.train), tokenizer)

    weighter = get_weighter(r.weighting.algo, r.weighting)
    signals = Signals(
        model,
        n_heads,
        r.train.ce_chunk_size,
        dtype,
        isolate_samples=r.data.pack,
        score=r.weighting.rho1.score,
        critic=r.weighting.critic,
    )
    value_optimizer = None
    if "ref_ce" in weighter.needs and r.weighting.reference_source == "online":
        ref_args, ref_weights = load_reference_files(r.model, args)
        signals.reference = build_training_model(
            ref_args, ref_weights, info, dtype, use_fsdp, False
        )
    if "ref_ce" in weighter.needs and r.weighting.reference_source == "precomputed":
        signals.store = ReferenceCEStore(r.weighting.reference_ce_dir, data_hash)
    if "td_error" in weighter.needs:
        signals.value_head, value_optimizer = build_value_head(args.dim, r.weighting.critic, device)
    value_head = signals.value_head
    extra_modules = {"value_head": value_head} if value_head is not None else {}

    optimizer = build_optimizer(model, r.train, device)
    loader_for = functools.partial(
        build_loader,
        tokenizer=tokenizer,
        data=r.data,
        n_heads=n_heads,
        info=info,
        cache_dir=env.storage.cache_dir,
    )
    loader = loader_for(r.data.train, seed=r.run.seed)
    checkpoints = CheckpointManager(out / "checkpoints", info, r.checkpoint.keep_last)
    out.mkdir(parents=True, exist_ok=True)

    state = TrainState()
    latest = checkpoints.latest() if r.checkpoint.resume == "auto" else None
    if latest is not None:
        state.load_state_dict(checkpoints.load(latest, model, optimizer, extra_modules))
        if state.micro_batch_size != loader.config.batch_size:  # shrunk by the OOM guard
            loader = loader_for(r.data.train, batch_size=state.micro_batch_size, seed=r.run.seed)
        loader.load_state_dict(state.loader)
        if info.is_main:
            print(f"[resume] {latest} (step {state.step})", flush=True)

    tracker = Tracker(env.mlflow, active=info.is_main)
    n_params = sum(p.numel() for p in model.parameters())
    run_params = {
        "model.n_future_tokens": n_heads,
        "model.n_params": n_params,
        "data.hash": data_hash,
        "world_size": info.world_size,
        "model.compute_dtype": precision.name,
        "model.compute_dtype_reason": precision.reason,
    }
    state.run_id = start_tracking(tracker, r, run_params, state.run_id, info)
    log = StepLog(state.history, tracker, r.train.log_every, info.is_main)
    samples = WeightSamples()
    flops = flops_per_token(model, args, r.data.seq_len)
    peak_flops = env.hardware.peak_tflops * 1e12 * info.world_size

    failure: TrainingFailure | None = None
    warnings: list[str] = []
    try:
        # ------------------------- critic stage 1 (critic-wmtp): fit the value head, measure it
        if value_head is not None:
            held_out = loader_for(r.data.validation, seed=0) if r.data.validation else None
            warnings += run_stage1(
                state,
                model,
                value_head,
                value_optimizer,
                loader,
                held_out,
                r.weighting.critic,
                r.train.eval_batches,
                signals,
                info,
                log,
            )

        # ---------------------------------------------------------- optimizer steps
        accum = r.train.grad_accum * r.data.micro_batch_size // loader.config.batch_size
        while state.step < r.train.max_steps:
            start = time.perf_counter()
            cursor = loader.state_dict()
            try:
                batches = [loader.next_batch().to(device) for _ in range(accum)]
                n_targets = global_target_counts(batches, n_heads, info)
                selected = None
                if weighter.selects_per_step:  # Rho-1 selection: the step's top tokens, all ranks
                    selected, n_targets = select_step_tokens(
                        batches, weighter, signals, r.weighting.rho1.select_ratio, info
                    )
                lr = set_lr(optimizer, lr_at(state.step, r.train) * state.guard.lr_scale)
                totals = StepTotals(n_heads)
                for i, batch in enumerate(batches):
                    set_gradient_sync(model, i == len(batches) - 1)
                    segments = signals.segments(batch)
                    with autocast(device, dtype):
                        trunk = model(batch.tokens, return_trunk=True, segment_ids=segments)
                    if selected is None:
                        inputs = signals.inputs(weighter.needs, batch, trunk.detach())
                        scores = weighter.scores(inputs)
                        token_weights = weighter.weights_from_scores(scores, batch.valid)
                    else:
                        scores, token_weights = selected[i]
                    result = mtp_loss_backward(
                        model,
                        trunk,
                        batch.labels,
                        token_weights,
                        head_weights,
                        n_targets,
                        r.train.ce_chunk_size,
                        info.world_size,
                        dtype,
                        segments,
                    )
                    totals.add(batch, token_weights, scores, result)
                inject_faults(r.faults, state.guard, state.step, model)
                grad_norm = clip_gradients(model, r.train.grad_clip, use_fsdp)
            except torch.OutOfMemoryError as exc:
                optimizer.zero_grad(set_to_none=True)
                micro_batch = on_out_of_memory(
                    exc, state.step, loader.config.batch_size, accum, out, info, r.train
                )
                loader = loader_for(r.data.train, batch_size=micro_batch, seed=r.run.seed)
                loader.load_state_dict(cursor)
                accum *= 2
                continue
            except WeightingError as exc:
                raise weighting_failure(exc, state.step, r.train) from None

            loss, head_ce, tokens, diagnostics = totals.reduce(info)
            finite = all_true(is_finite(loss, grad_norm), info)
            if finite:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - start
            stats = totals.weight_stats(r.weighting)
            samples.update(totals.weights, stats["hist_counts"])
            if not finite:  # the NaN guard: skip, halve the LR, restore bad parameters
                on_nonfinite_step(state.guard, state.step, loss, grad_norm, info, r.train)
                if not all_true(parameters_finite(model), info):
                    if checkpoints.latest() is None:
                        raise no_checkpoint_to_restore()
                    checkpoints.load(
                        checkpoints.latest(), model, optimizer, extra_modules, restore_rng=False
                    )
                continue

            state.guard.consecutive_failures = 0
            state.step += 1
            metrics = {
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": tokens / elapsed,
                "step_time_s": elapsed,
                **scalar_stats(stats),
                **diagnostics,
                **{f"ce_head{k}": head_ce[k] for k in range(n_heads)},
            }
            metrics["mfu"] = flops * metrics["tokens_per_s"] / peak_flops
            metrics["finite"] = 1.0
            val = None
            if r.train.eval_every and state.step % r.train.eval_every == 0 and r.data.validation:
                val_loader = loader_for(r.data.validation, seed=0)
                val = validation_loss(
                    model,
                    val_loader,
                    r.train.eval_batches,
                    r.train.ce_chunk_size,
                    dtype,
                    info,
                    r.data.pack,
                )
            log({**metrics, **(val or {})}, state.step, r.train.max_steps)

            improved = val is not None and (
                state.best_val is None or val["val_loss"] < state.best_val
            )
            if improved:
                state.best_val = val["val_loss"]
            periodic = r.checkpoint.every_steps and state.step % r.checkpoint.every_steps == 0
            if periodic or improved or state.step == r.train.max_steps:
                state.loader, state.micro_batch_size = loader.state_dict(), loader.config.batch_size
                path = checkpoints.save(
                    state.step, model, optimizer, state.state_dict(), extra_modules
                )
                if improved:
                    checkpoints.mark_best(path)
            if r.faults.kill_at_step == state.step:
                os._exit(137)  # simulated hard kill: no cleanup, no final checkpoint
    except TrainingFailure as exc:
        failure = exc

    # ------------------------------------------------------------- export and report
    export = None
    if failure is None and r.checkpoint.export_safetensors:
        export = export_safetensors(
            model,
            args,
            out / "export" / "final",
            info,
            dtype,
            {"run_id": str(state.run_id), "algo": r.weighting.algo},
            tokenizer=Path(r.model.tokenizer),
        )
    if info.is_main:
        failed = (failure.what, failure.next_action) if failure else None
        report = write_reports(
            out, r, state, n_heads, samples, tokenizer, tracker, export, failed, warnings
        )
        if failure:
            print(
                f"error: {failure.what}\nnext action: {failure.next_action}\nreport: {report}",
                flush=True,
            )
        tracker.end("FAILED" if failure else "FINISHED")
    return failure.exit_code if failure else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

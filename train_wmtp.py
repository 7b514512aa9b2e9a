"""Weighted multi-token-prediction fine-tuning: the whole run, top to bottom.

    torchrun --nproc_per_node=8 train_wmtp.py recipes/rho1.yaml [--config recipes/config.yaml] [key=value ...]
    python train_wmtp.py recipes/micro-baseline.yaml train.max_steps=20      # single process, CPU or GPU

A run: set-up (recipe, model, optimizer, loader, weighter, tracker, resume) → critic stage 1
(critic-wmtp only) → optimizer steps → export and report. One optimizer step:

    for each micro-batch of the step's data.micro_batch_size × train.grad_accum rows:
        trunk  = model trunk forward                       (graph kept)
        inputs = the signals the weighter needs            (policy CE, reference CE, TD errors)
        w      = weighter.weights_from_scores(weighter.scores(inputs))   (bsz, seq, n_heads)
        mtp_loss_backward(trunk, labels, w, λ, N)          (one head at a time, then the trunk)
    guards (NaN / OOM) → AdamW step → log → validate → checkpoint

Exit codes: 0 done, 1 a bug (traceback), 2 bad recipe/config/input, 3 stopped by the NaN guard,
4 out of memory, 5 storage refused a write (disk full, read-only, vanished). Any rank's failure
stops every rank with its code (training/failures.py).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch

from data.tokenized import cache_key
from model.tokenizer import Tokenizer
from runtime.cli import ArgumentParser, entry_point
from runtime.config import EnvConfig, load_env_config
from runtime.errors import EXIT_OK, StorageError
from runtime.precision import resolve_precision
from runtime.tracking import Tracker
from training.checkpoints import CheckpointManager
from training.critic_stage1 import run_stage1
from training.distributed import DistInfo, all_true, init_distributed, shutdown
from training.execution_eval import PassAtOne, tracked_name
from training.export import export_safetensors
from training.failures import FailureBoard, TrainingFailure, stop_all_ranks
from training.guards import (
    Faults,
    micro_batches,
    on_clean_step,
    on_nonfinite_step,
    on_out_of_memory,
    parameters_finite,
    restore_after_bad_parameters,
    storage_failure,
    weighting_failure,
)
from training.loss import autocast, mtp_loss_backward
from training.mirror import CheckpointMirror, restore_from_mirror
from training.parallel import set_gradient_sync
from training.recipe import Recipe, load_recipe
from training.registry import register_run
from training.report import RunReporter, WeightSamples
from training.run_log import StepLog, start_tracking
from training.setup import (
    attach_signal_sources,
    build_loader,
    build_optimizer,
    build_training_model,
    flops_per_token,
    head_weights_for,
    load_base,
    lr_at,
    make_output_dir,
)
from training.signals import Signals
from training.state import TrainState
from training.step import (
    StepTotals,
    clip_gradients,
    global_target_counts,
    is_finite,
    select_step_tokens,
    set_lr,
    step_metrics,
    validation_loss,
)
from weighting import WeightingError, get_weighter, scalar_stats


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="recipes/*.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=2e-5")
    parser.add_argument("--config", help="environment config (default recipes/config.yaml)")
    return parser.parse_intermixed_args(argv)


@entry_point
def main(argv: list[str] | None = None) -> int:
    cli = parse_args(argv)
    recipe = load_recipe(cli.recipe, cli.overrides)
    env = load_env_config(cli.config)
    info = init_distributed(recipe.run.device, recipe.run.dist_timeout_s)
    board = FailureBoard(info)
    try:
        return train(recipe, env, info, board)
    except BaseException as exc:  # on one rank only, perhaps: the others must not wait for it
        stop_all_ranks(board, exc)
        raise
    finally:
        board.close()
        shutdown(info)


def train(recipe: Recipe, env: EnvConfig, info: DistInfo, board: FailureBoard) -> int:
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
    signals = Signals.for_recipe(model, n_heads, dtype, r)  # + the reference, its CE or the critic:
    value_optimizer = attach_signal_sources(
        signals, weighter.needs, r, args, info, use_fsdp, data_hash
    )
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
    make_output_dir(out)
    checkpoints = CheckpointManager(
        out / "checkpoints", info, r.checkpoint.keep_last, r.checkpoint.check_free_space
    )

    mirror = CheckpointMirror(env.s3, r.run.name) if env.s3.checkpoints and info.is_main else None
    state = TrainState()
    latest = checkpoints.newest_intact() if r.checkpoint.resume == "auto" else None
    if latest is None and r.checkpoint.resume == "auto" and env.s3.checkpoints:  # a clean disk
        restore_from_mirror(mirror, checkpoints.root, info)
        latest = checkpoints.newest_intact()
    if latest is not None:
        state.load_state_dict(checkpoints.load(latest, model, optimizer, extra_modules))
        loader.load_state_dict(state.loader)
        checkpoints.point_to(latest, state.best_step)
        if info.is_main:
            print(f"[resume] {latest} (step {state.step})", flush=True)

    tracker = Tracker(env.mlflow, active=info.is_main)
    state.run_id = start_tracking(tracker, r, model, data_hash, precision, state.run_id, info)
    faults = Faults(r.faults, state.guard, info)
    if mirror is not None:
        mirror.kill_point = faults.kill_point
    pass_at_1 = PassAtOne(r.eval_pass, tokenizer, info, dtype) if r.train.eval_pass_every else None
    log = StepLog(state.history, tracker, r.train.log_every, info.is_main, faults.kill_point)
    samples, warnings = WeightSamples(), []
    flops = flops_per_token(model, args, r.data.seq_len)
    peak_flops = env.hardware.peak_tflops * 1e12 * info.world_size

    report = RunReporter(out, r, state, n_heads, samples, tokenizer, tracker, warnings)
    board.watch(report)  # another rank's failure: rank 0 reports, every rank exits with its code
    failure: TrainingFailure | None = None
    try:
        # ------------------------- critic stage 1 (critic-wmtp): fit the value head, measure it
        if value_head is not None:
            held_out = loader_for(r.data.validation, seed=0) if r.data.validation else None
            warnings += run_stage1(
                state, signals, value_optimizer, loader, held_out, r.train.eval_batches, info, log
            )

        # ---------------------------------------------------------- optimizer steps
        rows_per_step = r.data.micro_batch_size * r.train.grad_accum  # kept through OOM shrinks
        micro_batch = state.micro_batch_size or r.data.micro_batch_size
        log.start_stage("[train]", r.train.max_steps, state.step)
        while state.step < r.train.max_steps:
            step, start, cursor = state.step + 1, time.perf_counter(), loader.state_dict()
            try:
                sizes = micro_batches(rows_per_step, micro_batch)
                batches = [loader.next_batch(n).to(device) for n in sizes]
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
                faults.before_optimizer_step(step, model)
                grad_norm = clip_gradients(model, r.train.grad_clip, use_fsdp)
            except torch.OutOfMemoryError as exc:
                optimizer.zero_grad(set_to_none=True)
                micro_batch = on_out_of_memory(
                    exc, step, micro_batch, rows_per_step, out, info, r.train
                )
                loader.load_state_dict(cursor)
                continue
            except WeightingError as exc:
                raise weighting_failure(exc, step) from None

            loss, head_ce, tokens, diagnostics = totals.reduce(info)
            finite = all_true(is_finite(loss, grad_norm), info)
            if finite:
                optimizer.step()
                faults.after_optimizer_step(step, model)
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - start
            stats = totals.weight_stats(r.weighting)
            samples.update(totals.weights, stats["hist_counts"])
            if not finite:  # the NaN guard: skip, halve the LR, restore bad parameters
                on_nonfinite_step(state.guard, step, loss, grad_norm, info, r.train)
                if not all_true(parameters_finite(model), info):
                    restore_after_bad_parameters(
                        checkpoints, state, model, optimizer, extra_modules, loader, info
                    )
                    micro_batch = state.micro_batch_size or micro_batch
                continue

            on_clean_step(state.guard, r.train, info)
            state.step = step
            metrics = step_metrics(
                loss,
                lr,
                grad_norm,
                tokens,
                elapsed,
                flops,
                peak_flops,
                head_ce,
                scalar_stats(stats),
                diagnostics,
            )
            val = {}
            if r.train.eval_every and step % r.train.eval_every == 0 and r.data.validation:
                val_loader = loader_for(r.data.validation, seed=0)
                val = validation_loss(model, val_loader, r.train, dtype, info, r.data.pack)
            if pass_at_1 is not None and step % r.train.eval_pass_every == 0:
                val |= pass_at_1(model, step)
            log(
                {**metrics, **{tracked_name(k): v for k, v in val.items()}}, step, r.train.max_steps
            )

            metric, best_before = r.checkpoint.best_metric, (state.best_val, state.best_step)
            is_best = state.record_eval(metric, val, step)
            stop_early = state.patience_exhausted(r.train.early_stop_patience, metric, step)
            periodic = r.checkpoint.every_steps and step % r.checkpoint.every_steps == 0
            if periodic or is_best or stop_early or step == r.train.max_steps:
                state.loader, state.micro_batch_size = loader.state_dict(), micro_batch
                try:
                    path = checkpoints.save(
                        step, model, optimizer, state.state_dict(), extra_modules, faults.kill_point
                    )
                    if mirror is not None:  # uploaded in the background; kept in S3 as on disk
                        mirror.upload(
                            path,
                            f"checkpoints/{path.name}",
                            step,
                            {p.name for p in checkpoints.complete()},
                        )
                except StorageError as exc:
                    if (
                        step == r.train.max_steps
                        or stop_early
                        or r.checkpoint.periodic_save_failure == "stop"
                    ):
                        raise
                    state.best_val, state.best_step = best_before
                    if info.is_main:
                        print(f"[warning] checkpoint of step {step} skipped: {exc}", flush=True)
            if mirror is not None:
                mirror.check()  # a background upload that failed stops the run here
            if stop_early:
                if info.is_main:
                    print(f"[train] {state.stop_reason}", flush=True)
                break
            if r.faults.stall_after_step == step:
                time.sleep(r.faults.stall_seconds)
            if r.faults.kill_at_step == step:
                faults.kill_now()  # fault injection: dies after the step and its checkpoint
    except TrainingFailure as exc:
        failure = exc
    except StorageError as exc:
        failure = storage_failure(exc)
    finally:
        log.close()

    # ------------------------------------------------------------- export and report
    export, registered = None, None
    if failure is None and r.checkpoint.export_safetensors:
        try:
            metadata = {"run_id": str(state.run_id), "algo": r.weighting.algo}
            export = export_safetensors(
                model,
                args,
                out / "export" / "final",
                info,
                dtype,
                metadata,
                Path(r.model.tokenizer),
                faults.kill_point,
            )
        except StorageError as exc:
            failure = storage_failure(exc)
    if mirror is not None and failure is None:
        try:
            if export is not None:
                mirror.upload(export, "export/final")
            mirror.drain()
        except StorageError as exc:
            failure = storage_failure(exc)
    if failure is not None:
        board.fail(failure)  # distributed: rank 0 reports, every rank exits with the code
    if info.is_main:
        if export is not None and r.tracking.register and tracker.active:
            source = mirror.uri("export/final") if mirror is not None else str(export.resolve())
            registered = register_run(env.mlflow, r, state, source, data_hash)
        report(failure, export, registered)
    return failure.exit_code if failure else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

"""Weighted multi-token-prediction fine-tuning: the whole run, top to bottom.

    torchrun --nproc_per_node=8 train_wmtp.py recipes/rho1.yaml [--config recipes/config.yaml] [key=value ...]
    python train_wmtp.py recipes/micro-baseline.yaml train.max_steps=20      # single process, CPU or GPU

A run: set-up (`training.run.build_run`: model, optimizer, loaders, weighter and its signals),
resume → critic stage 1 (critic-wmtp only) → optimizer steps → export and report. One step:

    batches  = the step's data.micro_batch_size × train.grad_accum rows, in micro-batches
    for each micro-batch (`train_step`):
        trunk  = model trunk forward                            (graph kept)
        w      = weighter.weights(weighter.scores(signals))     (bsz, seq, n_heads)
        mtp_loss_backward(trunk, labels, w, λ, N)               (one head at a time, then trunk)
    clip → the step's one read of device values → NaN guard → AdamW → log → validate →
    checkpoints.save(step)

Exit codes: 0 done, 1 a bug (traceback), 2 bad recipe/config/input, 3 stopped by the NaN guard,
4 out of memory, 5 storage refused a write (disk full, read-only, vanished). Any rank's failure
stops every rank with its code (training/failures.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from runtime.cli import ArgumentParser, entry_point
from runtime.config import EnvConfig, load_env_config
from runtime.errors import EXIT_OK, StorageError
from runtime.precision import autocast
from runtime.tracking import Tracker
from training.checkpoints import Checkpoints
from training.critic import run_stage1
from training.distributed import DistInfo, init_distributed, shutdown
from training.failures import FailureBoard, TrainingFailure, stop_all_ranks
from training.final_export import export_safetensors
from training.guards import Guards, parameters_finite, storage_failure, weighting_failure
from training.loss import mtp_loss_backward
from training.model_registry import register_run
from training.parallel import set_gradient_sync
from training.plan import GPUS, measure_main, plan_main
from training.recipe import Recipe, load_recipe
from training.report import RunReporter, WeightSamples
from training.run import Run, build_run
from training.run_log import StepLog, start_tracking
from training.setup import lr_at, make_output_dir
from training.state import TrainState
from training.step import (
    StepTotals,
    clip_gradients,
    global_target_counts,
    set_lr,
    step_metrics,
    weigh_step_ahead,
)
from training.validation import Validation, tracked
from weighting import WeightingError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="recipes/*.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=2e-5")
    parser.add_argument("--config", help="environment config (default recipes/config.yaml)")
    plan = parser.add_argument_group("planning (no GPU, no weights): training/plan.py")
    plan.add_argument("--plan", action="store_true", help="memory, fit, FLOPs and time per rank")
    plan.add_argument("--nproc-per-node", type=int, default=8)
    plan.add_argument("--nnodes", type=int, default=1)
    plan.add_argument("--gpu", choices=sorted(GPUS), default="a100")
    plan.add_argument("--gpu-memory-gib", type=float, help="default: the GPU's")
    plan.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed")
    plan.add_argument(
        "--target-share", type=float, default=1.0, help="share of positions with a target"
    )
    plan.add_argument(
        "--measure", action="store_true", help="the same trace on real tensors (and ranks)"
    )
    plan.add_argument("--plan-json", help="also write the plan (or measurement) as JSON here")
    return parser.parse_intermixed_args(argv)


@entry_point
def main(argv: list[str] | None = None) -> int:
    cli = parse_args(argv)
    recipe = load_recipe(cli.recipe, cli.overrides)
    if cli.plan:
        return plan_main(recipe, cli.nnodes, cli.nproc_per_node, cli.gpu, cli.gpu_memory_gib,
                         cli.mfu, cli.target_share, cli.plan_json)  # fmt: skip
    if cli.measure:
        return measure_main(recipe, cli.target_share, cli.plan_json)
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


def train_step(run: Run, batches: list) -> StepTotals:
    """One optimizer step's gradients on this rank: batch → weights → loss and backward.
    Reads no device value (host counts come from the loader), so a GPU never stalls here."""
    model, weighter, signals, info = run.model, run.weighter, run.signals, run.info
    totals = StepTotals(run.args.n_future_tokens, info.device, weighter, run.recipe.weighting)
    n_targets = global_target_counts(batches, run.collectives)  # N_k over the step, all ranks
    ahead = (
        weigh_step_ahead(batches, weighter, signals, run.collectives) if weighter.per_step else None
    )
    for i, batch in enumerate(batches):
        set_gradient_sync(model, i == len(batches) - 1)  # reduce-scatter after the last one
        segments = signals.segments(batch)
        with autocast(info.device, run.dtype):
            trunk = model(batch.tokens, return_trunk=True, segment_ids=segments)
        if ahead is None:
            scores = weighter.scores(signals.inputs(batch, trunk.detach()))
            weights = weighter.weights(scores, batch.valid)
        else:  # a per-step weighter decided from the whole step (Rho-1 selection)
            scores, weights, n_targets = ahead.scores[i], ahead.weights[i], ahead.n_targets
        result = mtp_loss_backward(
            model, trunk, batch.labels, weights, run.head_weights, n_targets,
            run.recipe.train.ce_chunk_size, info.world_size, run.dtype, segments, batch.targets,
        )  # fmt: skip
        totals.add(batch, weights, scores, result)
    return totals


def train(recipe: Recipe, env: EnvConfig, info: DistInfo, board: FailureBoard) -> int:
    r, out = recipe, Path(recipe.run.output_dir)
    torch.manual_seed(r.run.seed)
    run = build_run(r, env, info)
    model, optimizer, loader = run.model, run.optimizer, run.loader
    make_output_dir(out)
    state = TrainState()
    checkpoints = Checkpoints(
        out / "checkpoints", r.checkpoint, info, model, optimizer, run.extras, loader,
        state, env.s3, r.run.name,
    )  # fmt: skip
    checkpoints.resume()
    tracker = Tracker(env.mlflow, active=info.is_main)
    state.run_id = start_tracking(
        tracker, r, model, run.data_hash, run.precision, state.run_id, info
    )
    log = StepLog(state.history, tracker, r.train.log_every, info.is_main)
    guards = Guards(state, r.train, r.data.micro_batch_size, info, out)
    validate = Validation(run)
    samples, warnings = WeightSamples(), []
    report = RunReporter(
        out, r, state, run.args.n_future_tokens, samples, run.tokenizer, tracker, warnings
    )
    board.watch(report)  # another rank's failure: rank 0 reports, every rank exits with its code
    peak_flops = env.hardware.peak_tflops * 1e12 * info.world_size
    failure: TrainingFailure | None = None
    try:
        if run.signals.critic is not None:  # critic-wmtp stage 1: fit the value head, measure it
            warnings += run_stage1(
                state, model, run.signals.critic, loader, run.validation, r.train.eval_batches,
                run.dtype, r.data.pack, info, log,
            )  # fmt: skip
        log.start_stage("[train]", r.train.max_steps, state.step)
        fresh = state.step == 0 and r.train.eval_at_start
        start = validate(model, 0) if fresh else {}  # where fine-tuning starts from
        if start:
            log(tracked(start), 0, r.train.max_steps, "validation")
        while state.step < r.train.max_steps:
            step, started, cursor = state.step + 1, time.perf_counter(), loader.state_dict()
            lr = set_lr(optimizer, lr_at(state.step, r.train) * guards.lr_scale)
            try:
                batches = loader.next_step(guards.rows_per_step, guards.micro_batch)
                totals = train_step(run, [b.to(info.device) for b in batches])
                grad_norm = clip_gradients(model, r.train.grad_clip, run.use_fsdp)
                summary = totals.reduce(grad_norm, info)  # the step's one read of device values
            except torch.OutOfMemoryError as exc:
                optimizer.zero_grad(set_to_none=True)
                guards.out_of_memory(exc, step)  # halves the micro-batch, or stops the run
                loader.load_state_dict(cursor)
                continue
            except WeightingError as exc:
                raise weighting_failure(exc, step) from None

            finite = guards.update_is_finite(step, summary.loss, summary.grad_norm)
            if finite:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - started
            if not finite:  # the NaN guard skipped the update; bad parameters: rewind
                if not parameters_finite(model, info):
                    checkpoints.restore_after_bad_parameters()
                continue

            state.step = step
            samples.update(totals.first, summary.weight_stats["hist_counts"])
            val = validate(model, step)
            metrics = step_metrics(summary, lr, seconds, run.flops_per_token, peak_flops)
            log({**metrics, **tracked(val)}, step, r.train.max_steps)
            best = state.record_eval(r.checkpoint.best_metric, val, step)
            stop = state.patience_exhausted(
                r.train.early_stop_patience, r.checkpoint.best_metric, step
            )
            checkpoints.save(step, best=best, last=stop or step == r.train.max_steps)
            if stop:
                if info.is_main:
                    print(f"[train] {state.stop_reason}", flush=True)
                break
    except TrainingFailure as exc:
        failure = exc
    except StorageError as exc:
        failure = storage_failure(exc)
    finally:
        log.close()

    # ------------------------------------------------------------- export and report
    export = registered = None
    if failure is None:
        try:
            if r.checkpoint.export_safetensors:
                metadata = {"run_id": str(state.run_id), "algo": r.weighting.algo}
                export = export_safetensors(
                    model, run.args, out / "export" / "final", info, run.dtype, metadata,
                    Path(r.model.tokenizer),
                )  # fmt: skip
            checkpoints.finish(export)  # the export uploaded, every upload done
        except StorageError as exc:
            failure = storage_failure(exc)
    if failure is not None:
        board.fail(failure)  # distributed: rank 0 reports, every rank exits with the code
    if info.is_main:
        if export is not None and r.tracking.register and tracker.active:
            source = checkpoints.export_uri(export)
            registered = register_run(env.mlflow, r, state, source, run.data_hash)
        report(failure, export, registered)
    return failure.exit_code if failure else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

"""The fault matrix: every fault the tests inject, what WMTP does, the exit code and what survives.

tests/test_reliability.py, tests/test_lifecycle.py and tests/test_cli_errors.py run these cases; docs/reliability.md
is generated from this list (`python -m tests.fault_cases > docs/reliability.md`) and a test
checks that it is up to date.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Fault:
    id: str
    fault: str
    outcome: str
    exit_code: str
    survives: str


@dataclass(frozen=True)
class BadInput:
    id: str
    cli: str
    what: str
    expect: str  # in the one-line error
    exit_code: int = 2


FAULTS = [
    Fault("oom-one-rank", "CUDA out of memory on rank 1 of 2 (FSDP, gloo)",
          "rank 1 posts the failure on the process group's store; rank 0, blocked in a collective, "
          "learns of it within a second, writes the report; both ranks exit", "4 on every rank",
          "last checkpoint, memory report of the failed rank, run report, MLflow run FAILED"),
    Fault("oom-shrink-odd", "out of memory with micro-batch 3, single process",
          "micro-batch halved to 1; the step still takes its 3 rows (3 micro-batches), so the "
          "losses equal an uninterrupted run's, before and after a resume", "0",
          "everything; the effective batch is unchanged"),
    Fault("oom-no-shrink", "out of memory with micro-batch 1", "report with advice", "4",
          "last checkpoint, memory report, run report"),
    Fault("disk-full-precheck", "checkpoint disk too small for the next save",
          "the save is refused before anything is written (free space vs. state size)", "5",
          "previous checkpoint intact and `latest`, no partial step directory, MLflow run FAILED with the reason"),
    Fault("disk-full-write", "disk fills up while DCP writes the shards (free-space check off)",
          "DCP's error is reduced to one line naming the path and the cause", "5",
          "previous checkpoint intact and `latest`, no partial step directory, MLflow run FAILED with the reason"),
    Fault("read-only", "checkpoint directory remounted read-only mid-run",
          "the next save fails in one line naming the path", "5",
          "previous checkpoint intact and `latest`, no partial step directory"),
    Fault("vanished", "checkpoint directory deleted mid-run",
          "the next save notices the last checkpoint is gone and stops", "5",
          "the run report and MLflow run (FAILED, with the reason)"),
    Fault("periodic-skip", "read-only checkpoints with `checkpoint.periodic_save_failure: skip`",
          "periodic saves are skipped with a warning and training goes on; the final save "
          "still fails", "5", "the last checkpoint written before the fault"),
    Fault("nan-grad", "NaN gradients at one step", "update skipped, LR halved, LR recovers after "
          "`train.lr_recovery_steps` clean steps", "0", "everything"),
    Fault("nan-params", "parameters become NaN", "newest intact checkpoint restored; step counter, "
          "history and data order rewound to it, said in the log", "0", "everything"),
    Fault("nan-forever", "non-finite steps beyond `train.nan_max_retries`", "report with next action",
          "3", "last checkpoint, run report"),
    Fault("weighting-error", "token weights cannot be computed", "ends like the NaN guard", "3",
          "last checkpoint, run report"),
    Fault("kill-step", "kill -9 mid-step (after backward, before the update)",
          "`resume: auto` continues from the last complete checkpoint", "137, then 0",
          "losses identical to an uninterrupted run"),
    Fault("kill-save", "kill -9 mid-save (shards written, not sealed)",
          "the half-written `.tmp` directory is ignored and replaced", "137, then 0",
          "losses identical to an uninterrupted run"),
    Fault("kill-sealed", "kill -9 between a save and its `latest`/`best` pointers",
          "pointers re-derived from the newest intact checkpoint and the best step its state names",
          "137, then 0", "losses identical; `best` correct"),
    Fault("kill-log", "kill -9 between a step's history entry and its MLflow write",
          "resume re-logs the steps after the checkpoint", "137, then 0",
          "losses identical to an uninterrupted run"),
    Fault("kill-export", "kill -9 mid-export", "the export is redone on resume", "137, then 0",
          "a complete export; losses identical"),
    Fault("torn-checkpoint", "a checkpoint file corrupted on disk",
          "resume verifies the manifest (SHA256), skips it with a message, loads the previous one",
          "0", "the previous complete checkpoint"),
    Fault("s3-outage", "S3 unreachable while checkpoints are mirrored (`s3.checkpoints: true`)",
          "the background upload fails after retries; the run stops at the next step", "5",
          "local checkpoints intact, report, MLflow run FAILED with the reason"),
    Fault("s3-half-upload", "kill -9 while a checkpoint is uploading to S3, then resume on a clean disk",
          "in S3 the manifest goes last: the half-uploaded checkpoint has none and is skipped",
          "137, then 0", "the previous complete checkpoint in S3; losses identical"),
    Fault("kill-random", "kill -9 at random moments, resumed each time (slow test)",
          "each resume continues from the last complete checkpoint", "137…, then 0",
          "losses identical to an uninterrupted run"),
]  # fmt: skip

BAD_INPUTS = [
    BadInput("train-missing-recipe", "train_wmtp.py", "recipe file missing", "file not found"),
    BadInput("train-unknown-option", "train_wmtp.py", "unknown option", "unrecognized arguments: --frobnicate"),
    BadInput("train-unknown-key", "train_wmtp.py", "unknown recipe key", "unknown key 'train.lrr'"),
    BadInput("train-lr-inf", "train_wmtp.py", "`train.lr=inf`", "train.lr=inf is invalid: expected a finite number"),
    BadInput("train-wrong-type", "train_wmtp.py", "`train.max_steps=abc`", "train.max_steps='abc' is invalid: expected an integer"),
    BadInput("train-binary-data", "train_wmtp.py", "binary `data.train`", "not UTF-8 text"),
    BadInput("train-corrupt-base", "train_wmtp.py", "base model with a flipped byte", "SHA256 mismatch"),
    BadInput("train-corrupt-tokenizer", "train_wmtp.py", "corrupt `tokenizer.model`", "not a sentencepiece tokenizer model"),
    BadInput("train-output-dir", "train_wmtp.py", "`run.output_dir` that cannot be created", "cannot be created"),
    BadInput("eval-corrupt-ckpt", "eval_harness.py", "checkpoint with a flipped byte", "SHA256 mismatch"),
    BadInput("eval-truncated", "eval_harness.py", "truncated safetensors (re-summed)", "not a readable safetensors file"),
    BadInput("eval-no-params", "eval_harness.py", "`params.json` missing", "params.json: model params file not found"),
    BadInput("eval-corrupt-tokenizer", "eval_harness.py", "corrupt `tokenizer.model`", "not a sentencepiece tokenizer model"),
    BadInput("eval-bad-k", "eval_harness.py", "`--k abc`", "argument --k"),
    BadInput("eval-unknown-task", "eval_harness.py", "`--tasks foo`", "--tasks 'foo' is unknown"),
    BadInput("eval-missing-ckpt", "eval_harness.py", "`--ckpt` that does not exist", "model dir not found"),
    BadInput("assets-bad-step", "prepare_assets.py", "`--step ²`", "--step '²' is invalid"),
    BadInput("assets-missing-config", "prepare_assets.py", "`--config` missing", "file not found"),
    BadInput("assets-malformed-sums", "prepare_assets.py", "malformed SHA256SUMS line (`--step 9`)", "malformed line", 1),
    BadInput("assets-corrupt-stamp", "prepare_assets.py", "corrupt `.verified.json` (`--step 9`): said, re-hashed, passes", ".verified.json is unreadable", 0),
    BadInput("prepare-unknown-dataset", "data.prepare", "`--dataset foo`", "argument --dataset"),
    BadInput("prepare-missing-source", "data.prepare", "`--source-dir` missing", "not found"),
    BadInput("prepare-max-length", "data.prepare", "`--max-length 10`", "--max-length 10 is invalid"),
    BadInput("prepare-bad-int", "data.prepare", "`--max-length abc`", "argument --max-length"),
    BadInput("prepare-corrupt-tokenizer", "data.prepare", "corrupt `--tokenizer`", "not a sentencepiece tokenizer model"),
    BadInput("launcher-missing-recipe", "launch.launcher", "recipe missing", "recipe not found"),
    BadInput("launcher-unknown-option", "launch.launcher", "unknown option", "unrecognized arguments"),
    BadInput("launcher-bad-config", "launch.launcher", "`launcher.nnodes: 0` in the config", "launcher.nnodes=0 is invalid"),
    BadInput("precompute-missing-recipe", "training.precompute_reference", "recipe missing", "file not found"),
]  # fmt: skip


def render() -> str:
    """docs/reliability.md."""
    lines = [
        "# Reliability: the fault matrix",
        "",
        "Generated from `tests/fault_cases.py` (`python -m tests.fault_cases > docs/reliability.md`);",
        "each row is a test in `tests/test_reliability.py`, `tests/test_lifecycle.py` or `tests/test_cli_errors.py` that",
        "injects the fault into a real run and checks what the row says. Faults are injected from the outside",
        "(`tests/faults.py` patches named points of a run, in process or as `python -m tests.faults PLAN",
        "train_wmtp.py ...`): nothing in WMTP itself knows about them.",
        "",
        "Exit codes: 0 done, 1 a failed check (prepare_assets) or a bug, 2 bad input, 3 stopped by",
        "the NaN guard, 4 out of memory, 5 storage refused a write, 137 killed.",
        "",
        "## Runs",
        "",
        "| fault | what happens | exit code | what survives |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {f.fault} | {f.outcome} | {f.exit_code} | {f.survives} |" for f in FAULTS]
    lines += [
        "",
        "## Bad input: one line, no traceback, nothing half-written",
        "",
        "| command | input | exit code | the line says |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| `{b.cli}` | {b.what} | {b.exit_code} | {('`' + b.expect + '`') if b.expect else '–'} |"
        for b in BAD_INPUTS
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")

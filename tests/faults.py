"""Fault injection for the reliability tests, from the outside: a `FaultPlan` patches production
functions at named points for one run; nothing in WMTP knows about it.

    with injected(FaultPlan(nan_at_steps=[3])):        # in this process
        train_main([...])
    python -m tests.faults '{"kill_at": ["save:6"]}' train_wmtp.py RECIPE --config C   # a process

Steps count from 1, as the log does. Kill points (the process dies like `kill -9`):
    step:N    step N's backward done, before its update
    save:N    step N's checkpoint shards written, not sealed
    sealed:N  step N's checkpoint renamed into place, `latest`/`best` not yet moved
    log:N     between step N's history entry and its MLflow write
    upload:N  step N's checkpoint partly uploaded to S3
    export    the export written to its temporary dir, not renamed into place
`kill_at_step: N` dies after step N and its checkpoint; `stall_after_step: N` sleeps
`stall_seconds` there (a window for breaking storage from outside). NaN gradients, NaN
parameters and simulated OOMs fire at most once per step number.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


@dataclass
class FaultPlan:
    nan_at_steps: list[int] = field(default_factory=list)  # NaN gradients during these steps
    nan_params_at_steps: list[int] = field(default_factory=list)  # a NaN parameter after the update
    oom_at_steps: list[int] = field(default_factory=list)
    oom_ranks: list[int] | None = None  # ranks the simulated OOM hits (default: all)
    kill_at: list[str] = field(default_factory=list)
    kill_at_step: int | None = None
    stall_after_step: int | None = None
    stall_seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def die() -> None:
    """Like `kill -9`: no cleanup, no flush beyond what is printed already."""
    sys.stdout.flush()
    os._exit(137)


class _Injector:
    def __init__(self, plan: FaultPlan):
        self.plan, self.step, self.fired = plan, 0, set()
        self.rank = int(os.environ.get("RANK", "0"))

    def once(self, kind: str, steps: list[int]) -> bool:
        tag = (kind, self.step)
        if self.step in steps and tag not in self.fired:
            self.fired.add(tag)
            return True
        return False

    def kill(self, point: str) -> None:
        if point in self.plan.kill_at:
            die()


@contextlib.contextmanager
def injected(plan: FaultPlan) -> Iterator[None]:
    """Patches the named points of train_wmtp and its pieces for the duration of the block."""
    import train_wmtp
    from runtime.tracking import Tracker
    from training import final_export, mirror, run
    from training.checkpoint_store import CheckpointStore
    from training.checkpoints import Checkpoints

    fault = _Injector(plan)
    undo = []

    def patch(owner, name, make):
        original = getattr(owner, name)
        undo.append((owner, name, original))
        setattr(owner, name, make(original))

    def lr_at(original):  # the clock: called once at the start of every step attempt
        def wrapped(done, train):
            fault.step = done + 1
            return original(done, train)

        return wrapped

    def clip_gradients(original):  # after the step's backward, before its update
        def wrapped(model, max_norm, use_fsdp):
            fault.kill(f"step:{fault.step}")
            if fault.once("nan", plan.nan_at_steps):
                param = next(p for p in model.parameters() if p.grad is not None)
                param.grad.fill_(float("nan"))
            if fault.once("oom", plan.oom_at_steps) and (
                plan.oom_ranks is None or fault.rank in plan.oom_ranks
            ):
                raise torch.OutOfMemoryError(
                    f"simulated out-of-memory at step {fault.step} (fault injection)"
                )
            return original(model, max_norm, use_fsdp)

        return wrapped

    def build_optimizer(original):  # a NaN parameter right after an update
        def wrapped(*args, **kwargs):
            optimizer = original(*args, **kwargs)

            def poison(opt, *_):
                if fault.once("nan-params", plan.nan_params_at_steps):
                    with torch.no_grad():
                        next(iter(opt.param_groups[0]["params"])).fill_(float("nan"))

            optimizer.register_step_post_hook(poison)
            return optimizer

        return wrapped

    def seal(original):
        def wrapped(self, tmp, final, trainer_state):
            fault.kill(f"save:{trainer_state['step']}")
            return original(self, tmp, final, trainer_state)

        return wrapped

    def publish(original):
        def wrapped(self, final, best_step):
            fault.kill(f"sealed:{int(final.name.removeprefix('step_'))}")
            return original(self, final, best_step)

        return wrapped

    def log_metrics(original):
        def wrapped(self, metrics, step=None):
            if "loss" in metrics:  # a training step's entry, already in the history
                fault.kill(f"log:{step}")
            return original(self, metrics, step)

        return wrapped

    def s3_client(original):
        def wrapped(config):
            return _KillingClient(original(config), fault)

        return wrapped

    def save_model_dir(original):
        def wrapped(*args, **kwargs):
            result = original(*args, **kwargs)
            fault.kill("export")
            return result

        return wrapped

    def save(original):  # the loop calls it after every step
        def wrapped(self, step, *args, **kwargs):
            result = original(self, step, *args, **kwargs)
            if plan.stall_after_step == step:
                time.sleep(plan.stall_seconds)
            if plan.kill_at_step == step:
                die()
            return result

        return wrapped

    patch(train_wmtp, "lr_at", lr_at)
    patch(train_wmtp, "clip_gradients", clip_gradients)
    patch(run, "build_optimizer", build_optimizer)
    patch(CheckpointStore, "_seal", seal)
    patch(CheckpointStore, "_publish", publish)
    patch(Tracker, "log_metrics", log_metrics)
    patch(mirror, "s3_client", s3_client)
    patch(final_export, "save_model_dir", save_model_dir)
    patch(Checkpoints, "save", save)
    try:
        yield
    finally:
        for owner, name, original in reversed(undo):
            setattr(owner, name, original)


class _KillingClient:
    """An S3 client that dies after the first file of checkpoint `upload:N` is uploaded."""

    def __init__(self, client, fault: _Injector):
        self._client, self._fault = client, fault

    def __getattr__(self, name):
        return getattr(self._client, name)

    def upload_file(self, filename, bucket, key, *args, **kwargs):
        result = self._client.upload_file(filename, bucket, key, *args, **kwargs)
        name = key.split("/checkpoints/")[-1].split("/")[0] if "/checkpoints/" in key else ""
        if name.startswith("step_"):
            self._fault.kill(f"upload:{int(name.removeprefix('step_'))}")
        return result


def main(argv: list[str]) -> int:
    """`python -m tests.faults PLAN_JSON SCRIPT ARGS...`: `train_wmtp.py` (or `prepare_assets.py`,
    whose step 5 trains through it) in a process with faults."""
    import importlib

    plan = FaultPlan(**json.loads(argv[0]))
    script = importlib.import_module(Path(argv[1]).stem)
    with injected(plan):
        return script.main(argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

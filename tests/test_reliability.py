"""Faults injected into real runs end the way docs/reliability.md says (cases: tests/fault_cases.py):
out of memory on one rank, disk full, read-only or vanished storage, NaN gradients and
parameters, kill -9 at every stage of a step, torn checkpoints."""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from runtime.history import run_id_of
from tests.conftest import REPO_ROOT
from tests.fault_cases import FAULTS
from tests.faults import FaultPlan, injected
from tests.micro_assets import history, losses, write_recipe
from train_wmtp import main as train_main

CASE_IDS = {f.id for f in FAULTS}
BASE = {"train": {"max_steps": 8, "eval_every": 2, "eval_batches": 1, "log_every": 1},
        "checkpoint": {"every_steps": 2, "keep_last": 5}}  # fmt: skip


def case(fault_id: str) -> str:
    assert fault_id in CASE_IDS, f"{fault_id} is not in tests/fault_cases.py"
    return fault_id


def steps_logged(out: Path) -> list[int]:
    return [h["step"] for h in history(out) if h.get("stage") == "step"]


def recipe_for(micro, tmp: Path, name: str, algo: str = "baseline", **sections) -> Path:
    _, assets, _ = micro
    merged = {k: {**BASE.get(k, {}), **sections.get(k, {})} for k in {*BASE, *sections}}
    return write_recipe(tmp / f"{name}.yaml", assets, algo, tmp / name, **merged)


def train_command(micro, recipe: Path, faults: FaultPlan | None = None) -> list[str]:
    """train_wmtp.py on `recipe`, through the fault injector when there are `faults`."""
    _, _, config = micro
    injector = ["-m", "tests.faults", faults.to_json()] if faults else []
    return [sys.executable, *injector, str(REPO_ROOT / "train_wmtp.py"), str(recipe),
            "--config", str(config)]  # fmt: skip


def train_process(
    micro, recipe: Path, *overrides: str, faults: FaultPlan | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    cmd = [*train_command(micro, recipe, faults), *overrides]
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def train_in_process(micro, recipe: Path, faults: FaultPlan) -> int:
    with injected(faults):
        return train_main([str(recipe), "--config", str(micro[2])])


@pytest.fixture(scope="module")
def uninterrupted(micro, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    recipe = recipe_for(micro, tmp, "run")
    assert train_main([str(recipe), "--config", str(micro[2])]) == 0
    return tmp / "run"


def mlflow_run(micro, out: Path):
    root = micro[0]
    run_id = run_id_of(out)
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}").get_run(run_id)


# ------------------------------------------------------------------ out of memory
@pytest.mark.dist
def test_oom_on_one_rank_stops_both_ranks_with_exit_4(micro, tmp_path):
    case("oom-one-rank")
    recipe = recipe_for(micro, tmp_path, "run", train={"max_steps": 6, "fsdp": "on"})
    faults = FaultPlan(oom_at_steps=[3], oom_ranks=[1])
    start, procs = time.perf_counter(), []
    for rank in (0, 1):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29631", "WORLD_SIZE": "2",
               "RANK": str(rank), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"}  # fmt: skip
        cmd = [*train_command(micro, recipe, faults), "run.dist_timeout_s=600"]
        procs.append(subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))  # fmt: skip
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    elapsed = time.perf_counter() - start
    assert [p.returncode for p in procs] == [4, 4], outputs
    assert elapsed < 60, f"ranks took {elapsed:.0f}s to stop (timeout 600 s)"
    assert all("Traceback" not in o for o in outputs), outputs
    out = tmp_path / "run"
    report = next(p for p in (out / "reports").glob("*.md")).read_text()
    assert "out of memory at step 3 on rank 1" in report and "## Next action" in report
    assert (out / "reports" / "oom_step3_rank1.txt").is_file()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    run = mlflow_run(micro, out)
    assert run.info.status == "FAILED" and "out of memory" in run.data.tags["failure"]


def test_oom_with_an_odd_micro_batch_keeps_the_rows_of_every_step(micro, tmp_path):
    case("oom-shrink-odd")
    sections = {"data": {"micro_batch_size": 3}, "train": {"max_steps": 6}}
    reference = recipe_for(micro, tmp_path, "reference", **sections)
    assert train_main([str(reference), "--config", str(micro[2])]) == 0
    shrunk = recipe_for(micro, tmp_path, "shrunk", **sections)
    killed = train_process(micro, shrunk, faults=FaultPlan(oom_at_steps=[3], kill_at_step=5))
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert (
        "micro-batch 3 -> 1; the step keeps its 3 rows in 3 micro-batches [1, 1, 1]"
        in killed.stdout
    )
    resumed = train_process(micro, shrunk)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "(step 4)" in resumed.stdout  # resumed from step 4, saved with micro-batch 1
    assert losses(tmp_path / "shrunk") == pytest.approx(losses(tmp_path / "reference"), rel=1e-5)


# ------------------------------------------------------------------------ storage
def namespaces_available() -> bool:
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return probe.returncode == 0


needs_mount_namespace = pytest.mark.skipif(
    not namespaces_available(),
    reason="needs `unshare -m` (root in a container) for real storage faults",
)


def run_with_storage_fault(
    micro,
    recipe: Path,
    out: Path,
    mount: str = "",
    action: str = "",
    faults: FaultPlan | None = None,
) -> tuple[int, str]:
    """Runs training inside a private mount namespace; `mount` prepares its checkpoint dir, and
    `action` breaks it from outside once step 2's checkpoint exists (the run stalls there)."""
    ckpt, marker = out / "checkpoints", out / "checkpoints" / "step_0000002" / "SHA256SUMS"
    train = " ".join(shlex.quote(part) for part in train_command(micro, recipe, faults))
    script = f"""
set -u
cd {REPO_ROOT}
mkdir -p {ckpt}
{mount}
{train} > {out}.log 2>&1 &
pid=$!
while [ ! -f {marker} ] && kill -0 $pid 2>/dev/null; do sleep 0.05; done
{action}
wait $pid
code=$?
cp -a {ckpt} {out}/checkpoints.after 2>/dev/null  # a tmpfs vanishes with the namespace
echo "exit=$code" >> {out}.log
"""
    subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], timeout=300)
    text = Path(f"{out}.log").read_text()
    code = int(text.rsplit("exit=", 1)[1].strip())
    return code, text


def assert_previous_checkpoint_intact(out: Path, micro) -> None:
    ckpt = out / "checkpoints.after"  # as the run left it, copied out of its mount namespace
    leftovers = [p.name for p in ckpt.iterdir() if p.name.startswith(".")] if ckpt.is_dir() else []
    assert not leftovers, f"partial step directories left: {leftovers}"
    assert (ckpt / "latest").read_text().strip() == "step_0000002"
    from runtime.integrity import verify_sha256sums

    verify_sha256sums(ckpt / "step_0000002")
    run = mlflow_run(micro, out)
    assert run.info.status == "FAILED" and run.data.tags["failure"]


STALL = FaultPlan(stall_after_step=2, stall_seconds=3.0)


@needs_mount_namespace
def test_a_save_that_cannot_fit_is_refused_before_writing(micro, tmp_path):
    case("disk-full-precheck")
    recipe = recipe_for(micro, tmp_path, "run", train={"eval_every": 0})
    out = tmp_path / "run"
    code, text = run_with_storage_fault(
        micro, recipe, out, mount=f"mount -t tmpfs -o size=7m tmpfs {out / 'checkpoints'}"
    )
    assert code == 5, text[-3000:]
    assert f"error: not enough space for a checkpoint in {out / 'checkpoints'}" in text
    assert "Traceback" not in text
    assert_previous_checkpoint_intact(out, micro)


@needs_mount_namespace
def test_a_disk_filling_up_during_a_save_is_one_line(micro, tmp_path):
    case("disk-full-write")
    recipe = recipe_for(
        micro, tmp_path, "run", train={"eval_every": 0}, checkpoint={"check_free_space": False}
    )
    out = tmp_path / "run"
    code, text = run_with_storage_fault(
        micro, recipe, out, mount=f"mount -t tmpfs -o size=7m tmpfs {out / 'checkpoints'}"
    )
    assert code == 5, text[-3000:]
    assert "No space left on device" in text and "Traceback" not in text
    assert_previous_checkpoint_intact(out, micro)


@needs_mount_namespace
def test_a_checkpoint_dir_made_read_only_mid_run(micro, tmp_path):
    case("read-only")
    recipe = recipe_for(micro, tmp_path, "run", train={"eval_every": 0})
    out, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints"
    remount = f"mount --bind {ckpt} {ckpt} && mount -o remount,bind,ro {ckpt}"
    code, text = run_with_storage_fault(micro, recipe, out, action=remount, faults=STALL)
    assert code == 5, text[-3000:]
    assert "Read-only file system" in text and "Traceback" not in text
    assert_previous_checkpoint_intact(out, micro)


def test_a_checkpoint_dir_that_vanishes_mid_run(micro, tmp_path):
    case("vanished")
    recipe = recipe_for(micro, tmp_path, "run", train={"eval_every": 0})
    out = tmp_path / "run"
    proc = subprocess.Popen(train_command(micro, recipe, STALL), cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    marker = out / "checkpoints" / "step_0000002" / "SHA256SUMS"
    while not marker.exists() and proc.poll() is None:
        time.sleep(0.05)
    shutil.rmtree(out / "checkpoints")
    text = proc.communicate(timeout=300)[0]
    assert proc.returncode == 5, text[-3000:]
    assert (
        f"checkpoint directory {out / 'checkpoints'} vanished" in text and "Traceback" not in text
    )
    run = mlflow_run(micro, out)
    assert run.info.status == "FAILED" and "vanished" in run.data.tags["failure"]


@needs_mount_namespace
def test_periodic_saves_can_be_skipped_with_a_warning(micro, tmp_path):
    case("periodic-skip")
    recipe = recipe_for(micro, tmp_path, "run", train={"eval_every": 0, "max_steps": 6},
                        checkpoint={"periodic_save_failure": "skip"})  # fmt: skip
    out, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints"
    remount = f"mount --bind {ckpt} {ckpt} && mount -o remount,bind,ro {ckpt}"
    code, text = run_with_storage_fault(micro, recipe, out, action=remount, faults=STALL)
    assert code == 5, text[-3000:]
    assert "[warning] checkpoint of step 4 skipped" in text
    assert steps_logged(out) == [1, 2, 3, 4, 5, 6]  # training went on past the skipped save
    assert_previous_checkpoint_intact(out, micro)


# -------------------------------------------------------------------- the NaN guard
def test_nan_gradients_halve_the_lr_which_then_recovers(micro, tmp_path, capsys, uninterrupted):
    case("nan-grad")
    recipe = recipe_for(micro, tmp_path, "run", train={"lr_recovery_steps": 2})
    assert train_in_process(micro, recipe, FaultPlan(nan_at_steps=[3])) == 0
    printed = capsys.readouterr().out
    assert "[guard] non-finite loss/grad at step 3" in printed
    assert "[guard] 2 clean steps: lr scale -> 1.0" in printed
    lrs = {h["step"]: h["lr"] for h in history(tmp_path / "run") if h.get("stage") == "step"}
    reference = {h["step"]: h["lr"] for h in history(uninterrupted) if h.get("stage") == "step"}
    assert lrs[3] == pytest.approx(reference[3] * 0.5)  # the retried step 3 runs at half the LR
    assert lrs[6] == pytest.approx(reference[6])  # back on the schedule


def test_nan_parameters_restore_and_rewind_to_the_checkpoint(micro, tmp_path, capsys):
    case("nan-params")
    recipe = recipe_for(micro, tmp_path, "run")
    assert train_in_process(micro, recipe, FaultPlan(nan_params_at_steps=[3])) == 0
    printed = capsys.readouterr().out
    assert (
        "[guard] parameters became non-finite: restored step_0000002; step counter, history and data order rewound to step 2"
        in printed
    )
    out = tmp_path / "run"
    assert steps_logged(out) == list(range(1, 9))  # rewound: no step counted twice
    state = json.loads((out / "checkpoints" / "step_0000008" / "trainer_state.json").read_text())
    assert state["guard"]["restores"] == 1 and state["guard"]["skipped_steps"] == 1
    assert all(loss == loss for loss in losses(out))


# --------------------------------------------------------------- kill -9, resume
@pytest.mark.parametrize(
    "fault_id, kill, resumed_from",
    [("kill-step", "step:5", 4), ("kill-save", "save:6", 4), ("kill-sealed", "sealed:6", 6),
     ("kill-log", "log:5", 4), ("kill-export", "export", 8)],
)  # fmt: skip
def test_kill_at_any_stage_then_resume_gives_the_same_losses(
    micro, tmp_path, uninterrupted, fault_id, kill, resumed_from
):
    case(fault_id)
    recipe = recipe_for(micro, tmp_path, "run")
    killed = train_process(micro, recipe, faults=FaultPlan(kill_at=[kill]))
    assert killed.returncode == 137, killed.stderr[-2000:]
    resumed = train_process(micro, recipe)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"(step {resumed_from})" in resumed.stdout
    out = tmp_path / "run"
    assert losses(out) == losses(uninterrupted)
    assert steps_logged(out) == list(range(1, 9))
    assert (out / "export" / "final" / "SHA256SUMS").is_file()
    for pointer in ("latest", "best"):
        expected = (uninterrupted / "checkpoints" / pointer).read_text()
        assert (out / "checkpoints" / pointer).read_text() == expected, pointer


def test_a_torn_checkpoint_is_skipped_with_a_message(micro, tmp_path, uninterrupted):
    case("torn-checkpoint")
    recipe = recipe_for(micro, tmp_path, "run")
    assert train_process(micro, recipe, faults=FaultPlan(kill_at_step=5)).returncode == 137
    shard = next((tmp_path / "run" / "checkpoints" / "step_0000004" / "dcp").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    resumed = train_process(micro, recipe)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "[resume] skipping torn checkpoint step_0000004: SHA256 mismatch" in resumed.stdout
    assert "(step 2)" in resumed.stdout
    assert losses(tmp_path / "run") == losses(uninterrupted)


@pytest.mark.slow
def test_kill_at_random_moments_then_resume_gives_the_same_losses(micro, tmp_path):
    case("kill-random")
    sections = {"train": {"max_steps": 60, "eval_every": 4}, "checkpoint": {"every_steps": 4}}
    reference = recipe_for(micro, tmp_path, "reference", **sections)
    assert train_main([str(reference), "--config", str(micro[2])]) == 0
    recipe = recipe_for(micro, tmp_path, "run", **sections)
    rng = random.Random(0)
    cmd = [sys.executable, str(REPO_ROOT / "train_wmtp.py"), str(recipe), "--config", str(micro[2])]
    kills = 0
    for _ in range(40):
        proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            proc.wait(timeout=rng.uniform(1.0, 5.0))  # start-up is ~3 s, then ~0.1 s a step
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            continue
        assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
        break
    assert kills >= 3, f"only {kills} kills landed: change the timings"
    final = train_process(micro, recipe)  # a finished run only verifies and re-exports
    assert final.returncode == 0, final.stderr[-2000:]
    assert losses(tmp_path / "run") == losses(tmp_path / "reference")
    assert steps_logged(tmp_path / "run") == list(range(1, 61))

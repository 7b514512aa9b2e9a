"""Model lifecycle: the MLflow registry (register, promote with history), checkpoints mirrored to
S3 (moto's server) and resumed from there on a clean disk, `best` and early stopping by pass@1."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import yaml

from tests.conftest import REPO_ROOT
from tests.faults import FaultPlan
from tests.micro_assets import history, losses, write_recipe
from train_wmtp import main as train_main
from training.promote import main as promote_main

BASE = {
    "train": {"max_steps": 6, "eval_every": 0, "log_every": 2},
    "checkpoint": {"every_steps": 2, "keep_last": 2},
}


def recipe_for(micro, tmp: Path, name: str, **sections) -> Path:
    _, assets, _ = micro
    merged = {k: {**BASE.get(k, {}), **sections.get(k, {})} for k in {*BASE, *sections}}
    return write_recipe(tmp / f"{name}.yaml", assets, "baseline", tmp / name, **merged)


def registry(micro):
    return mlflow.MlflowClient(
        tracking_uri=f"sqlite:///{micro[0] / 'mlflow.db'}",
        registry_uri=f"sqlite:///{micro[0] / 'mlflow.db'}",
    )


# ---------------------------------------------------------------------- registry
def test_a_run_registers_its_export_and_promote_moves_it_with_history(micro, tmp_path, capsys):
    name = f"wmtp-lifecycle-{tmp_path.name}"
    tracking = {"registry_name": name, "release_note": "first micro release"}
    recipe = recipe_for(micro, tmp_path, "one", tracking=tracking)
    assert train_main([str(recipe), "--config", str(micro[2])]) == 0
    client = registry(micro)
    (v1,) = client.search_model_versions(f"name='{name}'")
    export = tmp_path / "one" / "export" / "final"
    assert v1.source == str(export.resolve()) and v1.description.startswith("first micro release")
    assert v1.tags["algo"] == "baseline" and len(v1.tags["data_hash"]) == 32 and "recipe" in v1.tags
    assert client.get_run(v1.run_id).info.status == "FINISHED"
    report = next((tmp_path / "one" / "reports").glob("*.md")).read_text()
    assert f"{name} v{v1.version}" in report

    config = ["--config", str(micro[2])]
    assert (
        promote_main([name, str(v1.version), "--to", "staging", "--notes", "smoke passed", *config])
        == 0
    )
    assert (
        promote_main([name, str(v1.version), "--to", "production", "--notes", "MBPP +2pt", *config])
        == 0
    )
    recipe = recipe_for(micro, tmp_path, "two", tracking={"registry_name": name})
    assert train_main([str(recipe), "--config", str(micro[2])]) == 0
    v2 = max(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    assert (
        promote_main([name, str(v2.version), "--to", "production", "--notes", "beats v1", *config])
        == 0
    )

    model = client.get_registered_model(name)
    assert model.aliases == {"staging": int(v1.version), "production": int(v2.version)}
    old = client.get_model_version(name, str(v1.version))
    assert (
        "→ staging. smoke passed" in old.description
        and "→ production. MBPP +2pt" in old.description
    )
    assert f"production moved to version {v2.version}. beats v1" in old.description
    new = client.get_model_version(name, str(v2.version))
    assert new.tags["production.notes"] == "beats v1" and new.tags["production.promoted_by"]
    capsys.readouterr()
    assert promote_main([name, "99", "--to", "staging", "--notes", "x", *config]) == 2
    assert capsys.readouterr().err.startswith(f"error: {name} version 99:")


# ------------------------------------------------------------------------- S3
def s3_config(micro, tmp: Path, endpoint: str) -> Path:
    config = yaml.safe_load(Path(micro[2]).read_text())
    config["s3"] = {
        "bucket": "wmtp-mirror",
        "prefix": "team",
        "endpoint_url": endpoint,
        "checkpoints": True,
    }
    path = tmp / "s3-config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def with_faults(cmd: list[str], faults: FaultPlan) -> list[str]:
    """`python train_wmtp.py ...` run through the fault injector."""
    return [cmd[0], "-m", "tests.faults", faults.to_json(), *cmd[1:]]


def remote_keys(client, prefix: str) -> list[str]:
    return sorted(
        o["Key"]
        for o in client.list_objects_v2(Bucket="wmtp-mirror", Prefix=prefix).get("Contents", [])
    )


def test_checkpoints_are_mirrored_and_resume_from_s3_on_a_clean_disk(micro, tmp_path, s3):
    endpoint, client = s3
    config = s3_config(micro, tmp_path, endpoint)
    sections = {"run": {"name": "mirrored"}, "train": {"max_steps": 8}}
    reference = recipe_for(micro, tmp_path, "reference", train={"max_steps": 8})
    assert train_main([str(reference), "--config", str(micro[2])]) == 0
    # dies after step 6 (its upload done during the stall): the machine is lost
    run = recipe_for(micro, tmp_path, "run", **sections)
    cmd = [sys.executable, str(REPO_ROOT / "train_wmtp.py"), str(run), "--config", str(config)]
    faults = FaultPlan(stall_after_step=6, stall_seconds=3, kill_at_step=6)
    killed = subprocess.run(with_faults(cmd, faults), cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert killed.returncode == 137, killed.stderr[-3000:]
    keys = remote_keys(client, "team/runs/mirrored/")
    assert sorted({k.split("/")[4] for k in keys if "/checkpoints/" in k}) == [
        "step_0000004",
        "step_0000006",
    ]
    meta = client.head_object(
        Bucket="wmtp-mirror", Key="team/runs/mirrored/checkpoints/step_0000006/trainer_state.json"
    )
    assert len(meta["Metadata"]["sha256"]) == 64

    shutil.rmtree(tmp_path / "run")  # a new machine: nothing on local disk
    resumed = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (
        "[resume] downloaded s3://wmtp-mirror/team/runs/mirrored/checkpoints/step_0000006"
        in resumed.stdout
    )
    assert losses(tmp_path / "run") == losses(tmp_path / "reference")
    keys = remote_keys(client, "team/runs/mirrored/")
    assert "team/runs/mirrored/export/final/model.safetensors" in keys
    assert sorted({k.split("/")[4] for k in keys if "/checkpoints/" in k}) == [
        "step_0000006",
        "step_0000008",
    ]


def test_a_half_uploaded_checkpoint_is_never_used(micro, tmp_path, s3):
    endpoint, client = s3
    config = s3_config(micro, tmp_path, endpoint)
    reference = recipe_for(micro, tmp_path, "reference")
    assert train_main([str(reference), "--config", str(micro[2])]) == 0
    run = recipe_for(micro, tmp_path, "run", run={"name": "torn"})
    cmd = [sys.executable, str(REPO_ROOT / "train_wmtp.py"), str(run), "--config", str(config)]
    faults = FaultPlan(kill_at=["upload:4"])
    killed = subprocess.run(with_faults(cmd, faults), cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert killed.returncode == 137, killed.stderr[-3000:]
    keys = remote_keys(client, "team/runs/torn/checkpoints/step_0000004/")
    assert keys and not any(k.endswith("SHA256SUMS") for k in keys)  # died mid-upload
    shutil.rmtree(tmp_path / "run")
    resumed = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoints/step_0000002" in resumed.stdout and "(step 2)" in resumed.stdout
    assert losses(tmp_path / "run") == losses(tmp_path / "reference")


def test_an_s3_outage_stops_the_run_with_exit_5(micro, tmp_path, s3):
    endpoint, _ = s3
    config = s3_config(micro, tmp_path, endpoint)
    run = recipe_for(micro, tmp_path, "run", run={"name": "outage"})
    cmd = [sys.executable, str(REPO_ROOT / "train_wmtp.py"), str(run), "--config", str(config)]
    cmd = with_faults(cmd, FaultPlan(stall_after_step=2, stall_seconds=4))
    env = {**os.environ, "AWS_MAX_ATTEMPTS": "1"}
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    marker = tmp_path / "run" / "checkpoints" / "step_0000002" / "SHA256SUMS"
    while not marker.exists() and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(1.0)  # step 2's upload completes; then S3 goes away
    s3.server.stop()
    text = proc.communicate(timeout=300)[0]
    assert proc.returncode == 5, text[-3000:]
    assert (
        "error: uploading" in text
        and "s3://wmtp-mirror/team/runs/outage/" in text
        and "Traceback" not in text
    )


# ---------------------------------------------------------------- best by pass@1
def test_best_and_early_stopping_by_pass_at_1(micro, tmp_path, mbpp_path):
    recipe = recipe_for(micro, tmp_path, "run", train={"max_steps": 12, "eval_pass_every": 2, "early_stop_patience": 2},
                        checkpoint={"best_metric": "pass@1", "every_steps": 0},
                        eval_pass={"benchmark": "mbpp", "problems": str(mbpp_path), "limit": 3, "max_new_tokens": 12})  # fmt: skip
    assert train_main([str(recipe), "--config", str(micro[2])]) == 0
    out = tmp_path / "run"
    evals = [h for h in history(out) if "pass_at_1" in h]
    assert [h["step"] for h in evals] == [2, 4, 6]  # stopped: no improvement in 2 evaluations
    assert all(0 <= h["pass_at_1"] <= 1 for h in evals)
    assert (out / "checkpoints" / "best").read_text().strip() == "step_0000002"
    report = next((out / "reports").glob("*.md")).read_text()
    assert "early stop at step 6: pass@1 did not improve for 2 evaluations" in report
    assert (out / "export" / "final" / "SHA256SUMS").is_file()


def test_pass_at_1_as_best_metric_needs_an_evaluation(micro, tmp_path, capsys):
    recipe = recipe_for(micro, tmp_path, "run", checkpoint={"best_metric": "pass@1"})
    assert train_main([str(recipe), "--config", str(micro[2])]) == 2
    assert (
        "checkpoint.best_metric='pass@1' is invalid: needs train.eval_pass_every > 0"
        in capsys.readouterr().err
    )

"""launch/: the VESSL spec, the Dockerfile, the torchrun command lines, and the CPU demo."""

from __future__ import annotations

import re

import pytest
import yaml

from launch.launcher import main as launcher_main
from launch.launcher import render_vessl, torchrun_command
from runtime.config import LauncherConfig
from tests.conftest import REPO_ROOT

SECRET_VALUE = re.compile(r"(AKIA[0-9A-Z]{16}|hf_[A-Za-z0-9]{20,}|[A-Za-z0-9/+=]{40})")


def test_vessl_yaml_parses_and_refers_to_files_that_exist():
    spec = yaml.safe_load((REPO_ROOT / "launch" / "vessl.yaml").read_text())
    assert {"name", "resources", "image", "run", "env"} <= set(spec)
    command = spec["run"][0]["command"]
    for path in re.findall(r"\b([\w/.-]+\.(?:py|lock|yaml))\b", command):
        if "${RECIPE}" not in path:
            assert (REPO_ROOT / path).exists(), path
    assert "recipes/${RECIPE}.yaml" in command and "requirements.lock" in command
    assert (REPO_ROOT / "recipes" / f"{spec['env']['RECIPE']}.yaml").is_file()
    for recipe in ("baseline", "rho1", "critic"):
        assert (REPO_ROOT / "recipes" / f"{recipe}.yaml").is_file()


def test_vessl_yaml_embeds_no_secret_values():
    text = (REPO_ROOT / "launch" / "vessl.yaml").read_text()
    spec = yaml.safe_load(text)
    for key in ("HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert set(spec["env"][key]) == {"secret", "source"}, key  # a reference by name, no value
    assert not SECRET_VALUE.search(text)


def test_dockerfile_uses_a_cuda_12_1_pytorch_runtime_and_the_lock():
    text = (REPO_ROOT / "launch" / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    assert base.startswith("pytorch/pytorch:") and "cuda12.1" in base and base.endswith("runtime")
    assert "pip install -r requirements.lock" in text and "train_wmtp.py" in text


def test_torchrun_one_node_of_eight():
    cmd = torchrun_command("recipes/rho1.yaml", LauncherConfig(nnodes=1, nproc_per_node=8))
    assert cmd == [
        "torchrun",
        "--standalone",
        "--nproc_per_node=8",
        "train_wmtp.py",
        "recipes/rho1.yaml",
    ]


def test_torchrun_two_nodes_of_eight_static_and_c10d():
    static = LauncherConfig(
        nnodes=2, nproc_per_node=8, node_rank=1, master_addr="10.0.0.1", master_port=29500
    )
    assert torchrun_command("recipes/critic.yaml", static, ["train.lr=2e-5"]) == [
        "torchrun",
        "--nnodes=2",
        "--nproc_per_node=8",
        "--node_rank=1",
        "--master_addr=10.0.0.1",
        "--master_port=29500",
        "train_wmtp.py",
        "recipes/critic.yaml",
        "train.lr=2e-5",
    ]
    c10d = LauncherConfig(
        nnodes=2,
        nproc_per_node=8,
        master_addr="head",
        master_port=29400,
        rdzv_backend="c10d",
        rdzv_id="exp7",
    )
    assert torchrun_command("recipes/rho1.yaml", c10d)[:6] == [
        "torchrun",
        "--nnodes=2",
        "--nproc_per_node=8",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=head:29400",
        "--rdzv_id=exp7",
    ]


def test_launcher_reads_the_target_from_config(tmp_path, capsys, monkeypatch):
    local = tmp_path / "local.yaml"
    local.write_text(
        yaml.safe_dump(
            {"launcher": {"target": "local", "nnodes": 2, "nproc_per_node": 8, "node_rank": 0}}
        )
    )
    assert (
        launcher_main(
            [str(REPO_ROOT / "recipes" / "rho1.yaml"), "--config", str(local), "--dry-run"]
        )
        == 0
    )
    assert "torchrun --nnodes=2 --nproc_per_node=8 --node_rank=0" in capsys.readouterr().out
    spec = render_vessl("recipes/critic.yaml", LauncherConfig(target="vessl"))
    assert spec["name"] == "wmtp-critic" and spec["env"]["RECIPE"] == "critic"
    assert spec["resources"] == {"cluster": "default", "preset": "gpu-a100-8"}
    assert launcher_main(["recipes/nope.yaml", "--config", str(local), "--dry-run"]) == 2


@pytest.mark.parametrize(
    "bad", [{"launcher": {"target": "slurm"}}, {"launcher": {"nnodes": 2, "node_rank": 2}}]
)
def test_bad_launcher_config_is_one_clear_error(tmp_path, capsys, bad):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert (
        launcher_main(
            [str(REPO_ROOT / "recipes" / "rho1.yaml"), "--config", str(path), "--dry-run"]
        )
        == 2
    )
    assert capsys.readouterr().err.startswith("error: launcher.")

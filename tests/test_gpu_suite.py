"""`bench/gpu_suite.sh` runs to the end on a machine without CUDA (GPU tests skipped, the
benchmarks at a smoke-test shape) and leaves every result under the folder it is given, so the
one run a lent GPU allows is not spent debugging the script."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT


@pytest.mark.slow  # ~25 s; make test-all runs it
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the suite runs the real shapes")
def test_the_gpu_suite_runs_green_on_the_cpu(tmp_path):
    out = tmp_path / "gpu"
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", "bench/gpu_suite.sh", str(out)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=400)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    stages = (out / "stages.txt").read_text().splitlines()
    names = [line.split(":")[0] for line in stages]
    assert names == ["nvidia-smi", "environment", "pytest-gpu", "mtp-step", "plan", "measure",
                     "speculative", "summary"]  # fmt: skip
    assert all(": ok" in line for line in stages)
    assert json.loads((out / "env.json").read_text())["cuda_available"] is False
    assert "skipped" in (out / "pytest-gpu.xml").read_text()  # every gpu test, with its reason
    step = json.loads((out / "mtp_step.json").read_text())
    assert {r["variant"] for r in step["results"]} == {"ntp-naive", "mtp-naive", "mtp-sequential"}
    assert all(r["tflop_per_step"] >= 0 and r["mfu"] is not None for r in step["results"])
    assert (out / "profile" / "profile-mtp-sequential.txt").read_text().count("\n") > 5
    plan = json.loads((out / "plan.json").read_text())
    measured = json.loads((out / "measured.json.rank0").read_text())
    assert plan["fits"] and measured["peak_bytes"] > 0
    summary = (out / "summary.txt").read_text()
    assert "MTP step / next-token step" in summary and "peak memory: planned" in summary
    assert "=== summary: exit 0" in (out / "suite.log").read_text()  # the log is tee'd there

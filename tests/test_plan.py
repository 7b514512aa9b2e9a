"""`train_wmtp.py --plan`: the real step traced on fake tensors over a fake process group —
parameters, gradients and optimizer state equal to their analytic counts, the same numbers a
real 2-rank run measures, a recipe that cannot fit refused in one line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from model import ModelArgs, Transformer
from model.args import META_7B_1T_4
from tests.conftest import REPO_ROOT
from tests.micro_assets import write_recipe
from train_wmtp import main as train_main
from training.plan import GIB
from training.recipe import load_recipe
from training.step_trace import fake_world, model_args, reference_args, trace_step

MB = 2**20


def analytic_state(args: ModelArgs, world: int) -> dict[str, int]:
    """Bytes per rank of fp32 parameters and AdamW state: trunk blocks and the embedding sharded
    along dim 0 (padded to the world size), the heads, final norm and output replicated."""
    with torch.device("meta"):
        model = Transformer(args)
    replicated = {id(p) for m in [*model.heads, model.norm, model.output] for p in m.parameters()}
    params = tensors = 0
    for p in model.parameters():
        rows = p.shape[0]
        local = math.ceil(rows / world) if world > 1 and id(p) not in replicated else rows
        params += local * (p.numel() // rows) * 4
        tensors += 1
    return {"parameters": params, "optimizer state": 2 * params + 4 * tensors}  # + fused steps


def micro_recipe(micro, tmp_path, algo="baseline", **sections):
    _, assets, _ = micro
    train = {"fsdp": "on", "grad_accum": 2, "activation_checkpointing": True}
    path = write_recipe(tmp_path / f"{algo}.yaml", assets, algo, tmp_path / algo,
                        train=train, data={"micro_batch_size": 2}, **sections)  # fmt: skip
    return path


@pytest.mark.parametrize("algo", ["baseline", "rho1-wmtp", "critic-wmtp"])
def test_the_plan_counts_parameters_and_optimizer_state_exactly(micro, tmp_path, algo):
    recipe = load_recipe(micro_recipe(micro, tmp_path, algo))
    args, _ = model_args(recipe)
    ref, _ = reference_args(recipe)
    with fake_world(4) as info:
        trace = trace_step(recipe, args, ref, info, 2, 1.0)
    expected = analytic_state(args, 4)
    parts = trace.breakdown
    critic = 2 * (args.dim + 1) * 4 if algo == "critic-wmtp" else 0  # the value head, fp32
    assert parts["parameters"] == expected["parameters"] + critic // 2
    critic_state = critic + 2 * 4 if critic else 0  # its AdamW moments, and 2 step counters
    assert parts["optimizer state"] == expected["optimizer state"] + critic_state
    # gradients: the sharded ones, and the unsharded ones accumulated between micro-batches
    assert parts["gradients"] >= expected["parameters"]
    assert (parts["reference model"] > 0) == (algo == "rho1-wmtp")
    assert trace.peak_bytes == sum(parts.values()) and parts["activations"] > 0


@pytest.mark.dist
def test_the_plan_matches_what_a_real_two_rank_run_measures(micro, tmp_path):
    """Fake tensors on a fake process group against real tensors on a real gloo group."""
    recipe_path = micro_recipe(micro, tmp_path, "rho1-wmtp")
    out = tmp_path / "measured"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_port=29733", str(REPO_ROOT / "train_wmtp.py"), str(recipe_path),
           "--measure", "--plan-json", str(out), "run.dist_timeout_s=60"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = [json.loads((tmp_path / f"measured.rank{r}").read_text()) for r in (0, 1)]
    recipe = load_recipe(recipe_path)
    args, _ = model_args(recipe)
    ref, _ = reference_args(recipe)
    with fake_world(2) as info:
        planned = trace_step(recipe, args, ref, info, 2, 1.0)
    for real in measured:
        for exact in ("parameters", "gradients", "optimizer state", "communication buffers"):
            assert planned.breakdown[exact] == real["breakdown"][exact], exact
        for close in ("activations", "reference model"):
            assert planned.breakdown[close] == pytest.approx(real["breakdown"][close], rel=0.05)
        assert planned.breakdown["loss chunks"] == pytest.approx(
            real["breakdown"]["loss chunks"], rel=0.25
        )  # a few hundred KiB: CPU kernels and meta kernels keep different intermediates
        assert planned.peak_bytes == pytest.approx(real["peak_bytes"], rel=0.05)


def test_a_recipe_that_cannot_fit_exits_2_naming_what_to_change(micro, tmp_path, capsys):
    _, _, config = micro
    path = micro_recipe(micro, tmp_path)
    code = train_main([str(path), "--plan", "--nproc-per-node", "2", "--gpu", "a100",
                       "--gpu-memory-gib", "0.012"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: needs "), captured.err
    assert "0.012 GiB available on 2 × A100 80GB SXM" in lines[0]
    assert "data.micro_batch_size=1" in lines[0] and "train.grad_accum=4" in lines[0]
    assert "peak memory per rank" in captured.out and "FLOPs per token" in captured.out


def test_a_plan_that_fits_prints_every_category_and_the_time(micro, tmp_path, capsys):
    path = micro_recipe(micro, tmp_path)
    out = tmp_path / "plan.json"
    assert train_main([str(path), "--plan", "--nproc-per-node", "2", "--gpu", "h100",
                       "--plan-json", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    for category in ("parameters", "gradients", "optimizer state", "activations", "loss chunks",
                     "reference model", "communication buffers"):  # fmt: skip
        assert category in printed, category
    plan = json.loads(out.read_text())
    assert plan["fits"] and plan["largest_micro_batch"] >= 2
    tokens = plan["tokens_per_step"]
    assert tokens == 2 * 512 * 2 * 2  # rows × seq_len × grad_accum × ranks
    assert plan["step_seconds"] == pytest.approx(
        plan["flops_per_token"] * tokens / (989e12 * 2 * 0.4)
    )
    _, assets, _ = micro
    args = ModelArgs.from_dict(json.loads((assets["mtp"] / "params.json").read_text()))
    blocks = sum(p.numel() for n, p in Transformer(args).named_parameters()
                 if n.startswith(("layers", "extra_heads")))  # fmt: skip
    model_flops = 6 * (blocks + 4 * args.dim * args.vocab_size)  # each head's projection once
    # the last k positions of a row have no target for head k: a little under 6N there
    assert 0.95 * model_flops < plan["flops_per_token"] < 1.5 * model_flops


@pytest.mark.slow
@pytest.mark.parametrize("name", ["baseline", "rho1", "critic"])
def test_the_7b_recipes_plan_on_8_gpus(name, tmp_path, capsys):
    out = tmp_path / "plan.json"
    code = train_main([str(REPO_ROOT / "recipes" / f"{name}.yaml"), "--plan", "--gpu", "a100",
                       "--plan-json", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    plan = json.loads(out.read_text())
    expected = analytic_state(ModelArgs(**META_7B_1T_4), 8)
    gib = plan["breakdown_gib"]
    assert gib["parameters"] * GIB == pytest.approx(
        expected["parameters"] + (2 * 4097 * 4 if name == "critic" else 0) // 2, abs=1
    )
    assert gib["optimizer state"] * GIB >= expected["optimizer state"]
    assert (gib["reference model"] > 0) == (name == "rho1")
    assert plan["peak_gib"] < 80 and plan["largest_micro_batch"] >= 4
    assert 40e9 < plan["flops_per_token"] < 60e9


@pytest.mark.slow
def test_micro_batch_64_on_one_24gb_gpu_does_not_fit(capsys):
    code = train_main([str(REPO_ROOT / "recipes" / "baseline.yaml"), "--plan", "--nproc-per-node",
                       "1", "--gpu-memory-gib", "24", "data.micro_batch_size=64"])  # fmt: skip
    assert code == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: needs ") and "use more GPUs" in line

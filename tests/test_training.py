"""train_wmtp.py end to end on micro assets: the loss, the algorithms, guards, resume, MLflow, FSDP."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

from data.loader import IGNORE_INDEX, Batch
from model import ModelArgs, Transformer
from runtime.schema import ConfigError
from runtime.tracking import scrub
from tests.conftest import REPO_ROOT
from tests.faults import FaultPlan, injected
from tests.micro_assets import history, write_recipe
from train_wmtp import main as train_main
from training.loss import mtp_loss_backward, naive_mtp_loss, target_positions
from training.recipe import load_recipe
from training.signals import Signals, policy_head_ce


def run_train(micro, algo, tmp_path, name="run", faults: FaultPlan | None = None, **sections):
    root, assets, config = micro
    recipe = write_recipe(tmp_path / f"{name}.yaml", assets, algo, tmp_path / name, **sections)
    with injected(faults or FaultPlan()):
        return train_main([str(recipe), "--config", str(config)]), tmp_path / name


def step_losses(output):
    return [h["loss"] for h in history(output) if h.get("stage") == "step"]


# ---------------------------------------------------------------- the loss
@pytest.mark.parametrize("needs_ce", [False, True], ids=["fixed-weights", "weights-from-base-ce"])
def test_sequential_head_loss_equals_naive_loss_and_gradients(needs_ce):
    torch.manual_seed(0)
    args = ModelArgs(
        dim=32,
        n_layers=5,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=97,
        multiple_of=16,
        n_future_tokens=4,
    )
    model = Transformer(args)
    model.init_weights(std=0.1, seed=0)
    tokens = torch.randint(0, 97, (3, 40))
    labels = torch.randint(0, 97, (3, 40, 4))
    labels[torch.rand(3, 40, 4) < 0.3] = IGNORE_INDEX
    fixed = torch.rand(3, 40, 4) * 2
    lam = [1.0, 0.5, 0.25, 0.0]
    denominators = [float((labels[..., k] != IGNORE_INDEX).sum()) + 7 for k in range(4)]

    trunk = model(tokens, return_trunk=True)
    if needs_ce:  # weights computed from the policy's own per-head CE, as rho1-wmtp does
        segments = torch.zeros(3, 40, dtype=torch.long)
        batch = Batch(tokens, labels, segments, torch.ones(3, 40, dtype=torch.bool), [["a"]] * 3)
        weights = (policy_head_ce(model, trunk.detach(), batch, 7, torch.float32) - 4.0).abs()
    else:
        weights = fixed
    weights = weights * (labels != IGNORE_INDEX)
    result = mtp_loss_backward(model, trunk, labels, weights, lam, denominators, chunk=7)
    sequential = {
        n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
        for n, p in model.named_parameters()
    }
    model.zero_grad()
    naive = naive_mtp_loss(model, tokens, labels, lam, weights, denominators)
    naive.backward()
    assert result.loss == pytest.approx(naive.item(), rel=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(sequential[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert sequential["extra_heads.2.attention.wq.weight"].abs().sum() == 0  # λ_3 = 0


def flat_grads(model):
    return torch.cat([torch.zeros_like(p).flatten() if p.grad is None else p.grad.flatten()
                      for p in model.parameters()])  # fmt: skip


def test_every_token_head_weight_moves_the_gradient_by_its_own_ce_gradient():
    torch.manual_seed(1)
    args = ModelArgs(
        dim=32,
        n_layers=5,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=61,
        multiple_of=16,
        n_future_tokens=4,
    )
    model = Transformer(args)
    model.init_weights(std=0.1, seed=1)
    tokens, labels = torch.randint(0, 61, (2, 12)), torch.randint(0, 61, (2, 12, 4))
    labels[0, :3] = IGNORE_INDEX  # a prompt: no targets there
    lam, weights = [1.0, 0.5, 0.25, 0.0], torch.rand(2, 12, 4) + 0.5
    n_targets = [float((labels[..., k] != IGNORE_INDEX).sum()) for k in range(4)]

    def grads(w):
        model.zero_grad()
        mtp_loss_backward(
            model, model(tokens, return_trunk=True), labels, w, lam, n_targets, chunk=5
        )
        return flat_grads(model)

    def ce_grad(b, t, k):  # gradient of λ_k·CE_{b,t,k}/N_k alone
        model.zero_grad()
        one = torch.zeros(2, 12, 4)
        one[b, t, k] = 1.0
        naive_mtp_loss(model, tokens, labels, lam, one, n_targets).backward()
        return flat_grads(model)

    base = grads(weights)
    for b, t, k in [(0, 3, 0), (1, 0, 1), (1, 11, 2), (0, 7, 0), (1, 5, 2)]:
        bumped = weights.clone()
        bumped[b, t, k] += 1.0
        change = grads(bumped) - base
        assert change.abs().max() > 0, (b, t, k)
        torch.testing.assert_close(change, ce_grad(b, t, k), rtol=1e-3, atol=1e-6)
    for b, t, k in [(0, 1, 0), (0, 4, 3)]:  # a prompt position; a head with λ = 0
        bumped = weights.clone()
        bumped[b, t, k] += 1.0
        assert torch.equal(grads(bumped), base), (b, t, k)


def test_vocabulary_projection_runs_only_at_target_positions_and_a_batch_without_targets_still_backprops():
    torch.manual_seed(2)
    args = ModelArgs(dim=32, n_layers=5, n_heads=4, n_kv_heads=2, vocab_size=61, multiple_of=16,
                     n_future_tokens=4)  # fmt: skip
    model = Transformer(args)
    tokens, labels = torch.randint(0, 61, (2, 16)), torch.randint(0, 61, (2, 16, 4))
    labels[:, :10] = IGNORE_INDEX  # a long prompt
    rows = []
    hook = model.output.register_forward_hook(lambda m, inp, out: rows.append(inp[0].shape[0]))
    weights = (labels != IGNORE_INDEX).float()
    result = mtp_loss_backward(
        model, model(tokens, return_trunk=True), labels, weights, [1.0] * 4, [12.0] * 4, chunk=3
    )
    assert rows == [6, 6] * 4  # 12 targets a head: 2 chunks of 2 rows × 3 positions
    assert [len(t) for t in target_positions(labels)] == [12] * 4 and result.ce_sum.gt(0).all()
    model.zero_grad()
    labels[:] = IGNORE_INDEX  # nothing to predict: the trunk's backward still runs (FSDP ranks
    trunk = model(tokens, return_trunk=True)  # reduce gradients together), with zeros
    result = mtp_loss_backward(model, trunk, labels, labels.float() * 0, [1.0] * 4, [1.0] * 4, 3)
    hook.remove()
    assert result.loss == 0 and result.ce_sum.eq(0).all()
    grad = model.layers[0].attention.wq.weight.grad
    assert grad is not None and not grad.any()


def test_token_scores_are_shared_by_every_head_predicting_the_token():
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=5, n_heads=4, n_kv_heads=2, vocab_size=61, multiple_of=16,
                     n_future_tokens=4)  # fmt: skip
    model = Transformer(args)
    model.init_weights(std=0.1, seed=0)
    tokens = torch.randint(0, 61, (1, 16))
    labels = torch.full((1, 16, 4), IGNORE_INDEX)
    for k in range(4):  # response = tokens 4..15
        for t in range(16):
            if 4 <= t + k + 1 < 16:
                labels[0, t, k] = tokens[0, t + k + 1]
    batch = Batch(
        tokens,
        labels,
        torch.zeros(1, 16, dtype=torch.long),
        torch.ones(1, 16, dtype=torch.bool),
        [["x"]],
    )
    trunk = model(tokens, return_trunk=True)
    signals = Signals(model, ("policy_token_ce", "policy_head_ce"), 4, 8, torch.float32, False)
    inputs = signals.inputs(batch, trunk)
    per_token, per_head = inputs.policy_token_ce, inputs.policy_head_ce
    for j in range(5, 16):  # token j is predicted by head k at position j-k-1
        shared = {round(float(per_token[0, j - k - 1, k]), 6) for k in range(4) if j - k - 1 >= 3}
        assert len(shared) == 1, (j, shared)
        assert per_token[0, j - 1, 0] == per_head[0, j - 1, 0]  # head 0: both the same CE
    assert not torch.allclose(per_token[0, 3:8, 3], per_head[0, 3:8, 3])  # head 3's own CE differs


# ---------------------------------------------------------- recipe checks
@pytest.mark.parametrize(
    "edit, message",
    [
        ({"train": {"lrr": 1}}, "unknown key 'train.lrr' (did you mean 'lr'?)"),
        (
            {"weighting": {"algo": "rho1"}},
            "weighting.algo='rho1' is invalid: allowed baseline, rho1-wmtp, critic-wmtp, dft (did you mean 'rho1-wmtp'?)",
        ),
        (
            {"model": {"reference": None}},
            "model.reference=None is invalid: rho1-wmtp needs a reference model",
        ),
        ({"train": {"lr": "fast"}}, "train.lr='fast' is invalid: expected a number"),
        ({"weighting": {"max_weight": 0.5}}, "weighting.max_weight=0.5 is invalid"),
        (
            {"checkpoint": {"resume": "sometimes"}},
            "checkpoint.resume='sometimes' is invalid: allowed 'auto', 'never'",
        ),
    ],
)
def test_bad_recipes_fail_with_one_clear_line(micro, tmp_path, edit, message, capsys):
    root, assets, config = micro
    path = write_recipe(tmp_path / "r.yaml", assets, "rho1-wmtp", tmp_path / "out", **edit)
    with pytest.raises(ConfigError, match=None) as err:
        load_recipe(path)
    assert message in str(err.value)
    assert train_main([str(path), "--config", str(config)]) == 2
    err_text = capsys.readouterr().err
    assert err_text.startswith("error: ") and "Traceback" not in err_text


def test_next_token_base_model_is_rejected(micro, tmp_path, capsys):
    root, assets, config = micro
    code, _ = run_train(micro, "baseline", tmp_path, model={"base": str(assets["ref"])})
    assert code == 2 and "the base must be an MTP model" in capsys.readouterr().err


def test_overrides_on_the_command_line(micro, tmp_path):
    root, assets, config = micro
    path = write_recipe(tmp_path / "r.yaml", assets, "baseline", tmp_path / "out")
    recipe = load_recipe(
        path, ["train.lr=1e-4", "data.pack=false", "train.head_weights=[1, 0.5, 0.5, 0.25]"]
    )
    assert (
        recipe.train.lr == 1e-4
        and recipe.data.pack is False
        and recipe.train.head_weights == [1, 0.5, 0.5, 0.25]
    )


# ------------------------------------------------------------ smoke runs
@pytest.mark.parametrize("algo", ["baseline", "rho1-wmtp", "critic-wmtp", "dft"])
def test_100_step_micro_smoke_loss_falls(micro, tmp_path, algo, capsys):
    code, out = run_train(micro, algo, tmp_path, train={"max_steps": 100, "log_every": 50})
    assert code == 0
    printed = capsys.readouterr().out  # progress: first step (early rate) and the last, ETA
    assert re.search(r"^\[train\] 1/100 steps, .* tokens/s$", printed, re.M)
    assert re.search(r"^\[train\] 100/100 steps, [\d.]+ steps/s, .* \| loss ", printed, re.M)
    if algo == "critic-wmtp":
        assert "[critic stage 1] 20/20 steps" in printed
    steps = [h for h in history(out) if h.get("stage") == "step"]
    assert len(steps) == 100
    first = sum(h["ce_head0"] for h in steps[:10]) / 10
    last = sum(h["ce_head0"] for h in steps[-10:]) / 10
    if algo == "dft":
        # DFT maximises the probability of the targets, not their log-likelihood: from random
        # weights (p ≈ 1/vocab) it sharpens what it already predicts and its CE may rise (see
        # weighting/dft.py); its own objective Σ sg(p)·CE / N must fall, its weights are p
        first, last = (sum(h["loss"] for h in part) / 10 for part in (steps[:10], steps[-10:]))
        assert last < first / 2, f"dft: loss {first:.4f} -> {last:.4f}"
        assert all(0 < h["weight_mean"] < 1 and h["weight_max"] <= 1 for h in steps)
        assert max(h["weight_mean"] for h in steps) > 10 * steps[0]["weight_mean"]
    else:
        assert last < first - 0.5, f"{algo}: head-0 CE {first:.3f} -> {last:.3f}"
        assert all(abs(h["weight_mean"] - 1) < 1e-3 for h in steps)
    if algo == "critic-wmtp":
        stage1 = [h["stage1_value_loss"] for h in history(out) if h.get("stage") == "stage1"]
        # MBPP holds only correct solutions: the head starts at their mean reward, which is every
        # return, so stage 1 has (almost) nothing to learn and must not drift away from it
        assert len(stage1) == 20 and stage1[0] < 1e-6 and max(stage1) < 1e-3
    assert (out / "export" / "final" / "SHA256SUMS").is_file()
    assert (out / "export" / "final" / "tokenizer.model").is_file()


# ------------------------------------------------------------------ guards
def test_nan_injection_is_skipped_and_training_recovers(micro, tmp_path, capsys):
    code, out = run_train(
        micro, "baseline", tmp_path, train={"max_steps": 8}, faults=FaultPlan(nan_at_steps=[4])
    )
    assert code == 0
    steps = [h for h in history(out) if h.get("stage") == "step"]
    assert len(steps) == 8 and all(torch.isfinite(torch.tensor(h["loss"])) for h in steps)
    assert "[guard] non-finite loss/grad at step 4" in capsys.readouterr().out
    assert steps[4]["lr"] < steps[2]["lr"] * 0.6  # LR halved after the skipped update
    state = yaml.safe_load(
        (out / "checkpoints" / "step_0000008" / "trainer_state.json").read_text()
    )
    assert state["guard"]["skipped_steps"] == 1


def test_nan_beyond_retries_stops_with_a_failure_report(micro, tmp_path, capsys):
    code, out = run_train(
        micro,
        "baseline",
        tmp_path,
        train={"max_steps": 8, "nan_max_retries": 0},
        faults=FaultPlan(nan_at_steps=[2]),
    )
    assert code == 3
    report = _report(out)
    assert "## What went wrong" in report and "1 consecutive non-finite steps" in report
    assert "## Next action" in report and "train.lr=" in report
    assert "next action:" in capsys.readouterr().out


def _report(out):
    return next(p for p in (out / "reports").glob("*.md")).read_text()


def test_simulated_oom_single_process_shrinks_the_micro_batch(micro, tmp_path, capsys):
    code, out = run_train(
        micro, "baseline", tmp_path, train={"max_steps": 5}, faults=FaultPlan(oom_at_steps=[3])
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "[oom] simulated out-of-memory at step 3" in printed
    assert "micro-batch 2 -> 1; the step keeps its 2 rows in 2 micro-batches [1, 1]" in printed
    assert (out / "reports" / "oom_step3.txt").is_file()
    state = yaml.safe_load(
        (out / "checkpoints" / "step_0000005" / "trainer_state.json").read_text()
    )
    assert state["micro_batch_size"] == 1


def test_oom_that_cannot_shrink_exits_cleanly_with_advice(micro, tmp_path):
    code, out = run_train(
        micro,
        "baseline",
        tmp_path,
        train={"max_steps": 5},
        data={"micro_batch_size": 1},
        faults=FaultPlan(oom_at_steps=[2]),
    )
    assert code == 4
    report = _report(out)
    assert "out of memory at step 2 with micro-batch 1" in report
    assert "train.activation_checkpointing=true" in report


# ------------------------------------------------------------------ resume
def test_resume_after_a_kill_gives_the_same_losses(micro, tmp_path):
    root, assets, config = micro
    sections = {"train": {"max_steps": 10}, "checkpoint": {"every_steps": 4}}
    code, reference = run_train(micro, "rho1-wmtp", tmp_path, name="uninterrupted", **sections)
    assert code == 0
    recipe = write_recipe(
        tmp_path / "killed.yaml", assets, "rho1-wmtp", tmp_path / "killed", **sections
    )
    cmd = [sys.executable, str(REPO_ROOT / "train_wmtp.py"), str(recipe), "--config", str(config)]
    plan = FaultPlan(kill_at_step=6).to_json()
    killed = subprocess.run([cmd[0], "-m", "tests.faults", plan, *cmd[1:]], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert (tmp_path / "killed" / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    resumed = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "[resume]" in resumed.stdout and "step 4" in resumed.stdout
    assert step_losses(tmp_path / "killed") == step_losses(reference)


# ------------------------------------------------------------------ MLflow
def test_mlflow_run_contents(micro, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("HF_TOKEN", "hf_supersecret")
    code, out = run_train(
        micro,
        "rho1-wmtp",
        tmp_path,
        train={"max_steps": 3},
        tracking={"run_name": "hf_supersecret"},
    )
    assert code == 0
    root, _, _ = micro
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mtp/rho1-wmtp/mbpp")
    run = client.search_runs([experiment.experiment_id], order_by=["start_time DESC"])[0]
    params = run.data.params
    assert params["train.lr"] == "0.003" and params["weighting.algo"] == "rho1-wmtp"
    assert len(params["data.hash"]) == 32 and params["model.n_future_tokens"] == "4"
    assert "hf_supersecret" not in str(params) and params["tracking.run_name"] == "***"
    metrics = run.data.metrics
    for key in (
        "loss",
        "ce_head0",
        "ce_head3",
        "weight_mean",
        "weight_std",
        "weight_min",
        "weight_max",
        "weight_clipped_fraction",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "mfu",
    ):
        assert key in metrics, key
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 3
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "reports")}
    assert (
        f"reports/{run.info.run_id}.md" in artifacts
        and f"reports/{run.info.run_id}_weights.svg" in artifacts
    )
    assert client.list_artifacts(run.info.run_id, "recipe")
    report = (out / "reports" / f"{run.info.run_id}.md").read_text()
    assert (
        "## Sample weighted tokens" in report
        and "## Recipe" in report
        and "hf_supersecret" not in report
    )


def test_scrub_drops_secret_keys_and_values(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "abc123")
    clean = scrub(
        {"s3.secret_key": "x", "hub.token": "y", "a": "abc123", "data.max_tokens": 5, "b": 1}
    )
    assert clean == {"a": "***", "data.max_tokens": 5, "b": 1}


# ------------------------------------------------------------- distributed
@pytest.mark.dist
@pytest.mark.parametrize(
    "algo, weighting, port",
    [("baseline", {}, 29581), ("rho1-wmtp", {"rho1": {"mode": "select"}}, 29582)],
    ids=["baseline", "rho1-select"],
)
def test_fsdp_two_ranks_match_single_process(micro, tmp_path, algo, weighting, port):
    root, assets, config = micro
    common = {"train": {"max_steps": 4, "fsdp": "on"}, "checkpoint": {"every_steps": 2}}
    dist_recipe = write_recipe(
        tmp_path / "dist.yaml", assets, algo, tmp_path / "dist", weighting=weighting, **common
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                f"--master_port={port}"]  # fmt: skip
    proc = subprocess.run(
        [*torchrun, str(REPO_ROOT / "train_wmtp.py"), str(dist_recipe), "--config", str(config),
         "run.dist_timeout_s=120"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    code, single = run_train(micro, algo, tmp_path, name="single", weighting=weighting,
                             train={"max_steps": 4, "fsdp": "off"}, data={"micro_batch_size": 4})  # fmt: skip
    assert code == 0
    assert step_losses(tmp_path / "dist") == pytest.approx(step_losses(single), rel=1e-5)
    assert (tmp_path / "dist" / "checkpoints" / "step_0000004" / "dcp").is_dir()
    assert (tmp_path / "dist" / "export" / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "name",
    ["baseline", "rho1", "critic", "dft", "micro-baseline", "micro-rho1", "micro-critic",
     "micro-dft"],
)  # fmt: skip
def test_shipped_recipes_validate(name):
    recipe = load_recipe(REPO_ROOT / "recipes" / f"{name}.yaml")
    assert recipe.weighting.algo == {"rho1": "rho1-wmtp", "critic": "critic-wmtp"}.get(
        name.removeprefix("micro-"), name.removeprefix("micro-")
    )
    assert (recipe.model.reference is not None) == (recipe.weighting.algo == "rho1-wmtp")


def test_precomputed_reference_ce_gives_the_online_losses(micro, tmp_path):
    from training.precompute_reference import main as precompute_main

    root, assets, config = micro
    sections = {"train": {"max_steps": 4}, "data": {"pack": False}}
    code, online = run_train(micro, "rho1-wmtp", tmp_path, name="online", **sections)
    assert code == 0
    recipe = write_recipe(
        tmp_path / "pre.yaml",
        assets,
        "rho1-wmtp",
        tmp_path / "pre",
        weighting={"reference_source": "precomputed", "reference_ce_dir": str(tmp_path / "refce")},
        **sections,
    )
    assert precompute_main([str(recipe), "--config", str(config)]) == 0
    assert train_main([str(recipe), "--config", str(config)]) == 0
    assert step_losses(tmp_path / "pre") == pytest.approx(step_losses(online), rel=1e-5)


# ----------------------------------------------------- trustworthy experiments
def test_rho1_select_agrees_on_one_threshold_over_the_whole_step(micro, tmp_path):
    select = {"rho1": {"mode": "select", "select_ratio": 0.6}}
    code, whole = run_train(micro, "rho1-wmtp", tmp_path, name="whole", weighting=select,
                            train={"max_steps": 4}, data={"micro_batch_size": 2})  # fmt: skip
    assert code == 0
    code, split = run_train(micro, "rho1-wmtp", tmp_path, name="split", weighting=select,
                            train={"max_steps": 4, "grad_accum": 2}, data={"micro_batch_size": 1})  # fmt: skip
    assert code == 0
    assert step_losses(split) == pytest.approx(step_losses(whole), rel=1e-5)
    steps = [h for h in history(whole) if h.get("stage") == "step"]
    assert all(0.6 <= h["weight_selected_fraction"] < 0.65 for h in steps)
    assert all(h["weight_min"] == 0.0 and h["weight_max"] == 1.0 for h in steps)


def test_rho1_token_and_head_scores_give_different_runs(micro, tmp_path):
    runs = {}
    for score in ("token", "head"):
        code, out = run_train(micro, "rho1-wmtp", tmp_path, name=score, train={"max_steps": 3},
                              weighting={"rho1": {"score": score}})  # fmt: skip
        assert code == 0
        runs[score] = step_losses(out)
    assert runs["token"][0] != runs["head"][0]


def test_packed_online_reference_equals_precomputed(micro, tmp_path):
    from training.precompute_reference import main as precompute_main

    root, assets, config = micro
    sections = {"train": {"max_steps": 3}, "data": {"pack": True}}
    code, online = run_train(micro, "rho1-wmtp", tmp_path, name="online", **sections)
    assert code == 0
    pre = {"reference_source": "precomputed", "reference_ce_dir": str(tmp_path / "refce")}
    recipe = write_recipe(tmp_path / "pre.yaml", assets, "rho1-wmtp", tmp_path / "pre",
                          weighting=pre, **sections)  # fmt: skip
    assert precompute_main([str(recipe), "--config", str(config)]) == 0
    assert train_main([str(recipe), "--config", str(config)]) == 0
    assert step_losses(tmp_path / "pre") == pytest.approx(step_losses(online), rel=1e-5)


def test_weight_diagnostics_are_logged_every_step(micro, tmp_path):
    code, out = run_train(micro, "rho1-wmtp", tmp_path, train={"max_steps": 2})
    assert code == 0
    for h in (h for h in history(out) if h.get("stage") == "step"):
        assert h["score_std"] > 0 and h["score_mean"] > 0 and h["score_nonfinite"] == 0
        assert 0 < h["weight_above_one_fraction"] < 1  # emphasis both ways, mean 1
        # the clip counts agree with the extremes and add up (min_weight 0.05, max_weight 3.0)
        assert (h["weight_at_min_fraction"] > 0) == (h["weight_min"] <= 0.05 * (1 + 1e-5))
        assert (h["weight_at_max_fraction"] > 0) == (h["weight_max"] >= 3.0 * (1 - 1e-5))
        assert h["weight_clipped_fraction"] == pytest.approx(
            h["weight_at_min_fraction"] + h["weight_at_max_fraction"]
        )


def test_a_critic_without_reward_variance_is_reported(micro, tmp_path, capsys):
    # MBPP has only correct solutions: the value head can only learn a constant
    code, out = run_train(micro, "critic-wmtp", tmp_path, train={"max_steps": 2},
                          weighting={"critic": {"stage1_steps": 3}})  # fmt: skip
    assert code == 0
    assert "[warning] critic rewards have no variance" in capsys.readouterr().out
    assert "critic rewards have no variance: every training sample is correct" in _report(out)
    evals = [h for h in history(out) if h.get("stage") == "critic_eval"]
    assert len(evals) == 1 and "stage1_explained_variance" in evals[0]


def test_a_weighting_error_ends_like_the_nan_guard(micro, tmp_path, monkeypatch, capsys):
    from weighting.inputs import WeightingError
    from weighting.rho1 import Rho1Weighter

    def broken(self, scores, valid, step_context=None):
        raise WeightingError("token weights have mean nan after normalisation")

    monkeypatch.setattr(Rho1Weighter, "weights", broken)
    code, out = run_train(micro, "rho1-wmtp", tmp_path, train={"max_steps": 3})
    assert code == 3
    report = _report(out)
    assert "token weights could not be computed at step 1" in report and "## Next action" in report
    assert "Traceback" not in capsys.readouterr().err


# ------------------------------------------------------------------- a weak critic
WEAK = {"critic": {"stage1_steps": 3, "stage1_max_steps": 7, "min_explained_variance": 0.05}}


def test_a_weak_critic_trains_on_to_its_cap_then_stops_the_run(micro, tmp_path, capsys):
    # MBPP has only correct solutions: nothing to explain, the value head stays at 0 EV
    code, out = run_train(micro, "critic-wmtp", tmp_path, train={"max_steps": 2},
                          weighting={"critic": {**WEAK["critic"], "on_weak_critic": "stop"}})  # fmt: skip
    assert code == 3
    stage1 = [h for h in history(out) if h.get("stage") == "stage1"]
    evals = [h for h in history(out) if "stage1_explained_variance" in h]
    assert len(stage1) == 7 and [h["step"] for h in evals] == [3, 4, 5, 6, 7]
    report = _report(out)
    assert "below weighting.critic.min_explained_variance=0.05" in report
    assert "on_weak_critic: uniform" in report  # the next action names the way out
    assert not [h for h in history(out) if h.get("stage") == "step"]  # stage 2 never began


def test_a_weak_critic_can_fall_back_to_uniform_weights_and_says_so(micro, tmp_path, capsys):
    code, out = run_train(micro, "critic-wmtp", tmp_path, train={"max_steps": 3},
                          weighting={"critic": {**WEAK["critic"], "on_weak_critic": "uniform"}})  # fmt: skip
    assert code == 0
    steps = [h for h in history(out) if h.get("stage") == "step"]
    assert len(steps) == 3 and all(h["weight_std"] == 0 and h["weight_mean"] == 1 for h in steps)
    assert any(h.get("critic_uniform") for h in history(out))
    assert "critic-wmtp fell back to uniform weights" in capsys.readouterr().out
    assert "critic-wmtp fell back to uniform weights" in _report(out)


def test_the_value_head_keeps_learning_in_stage_2_and_its_drift_is_measured(micro, tmp_path):
    runs = {}
    for lr in (0.0, 0.05):
        code, out = run_train(micro, "critic-wmtp", tmp_path, name=f"lr{lr}",
                              train={"max_steps": 4, "eval_every": 2, "eval_batches": 1},
                              weighting={"critic": {"stage1_steps": 2, "stage2_value_lr": lr}})  # fmt: skip
        assert code == 0
        runs[lr] = history(out)
    evs = [h for h in runs[0.05] if "critic_explained_variance" in h]
    assert [h["step"] for h in evs] == [0, 2, 4]  # at the start and at every validation
    frozen, learning = ([h for h in runs[lr] if h.get("stage") == "step"] for lr in (0.0, 0.05))
    assert frozen[0]["loss"] == learning[0]["loss"]  # step 1: the same head weighed its tokens
    assert frozen[-1]["weight_std"] != learning[-1]["weight_std"]  # then the head had learnt

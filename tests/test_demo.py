"""The demo: its planner sizes the stages to the budget on fast and slow machines, and
`python -m launch.demo --quick` runs every stage to a comparison with intervals."""

from __future__ import annotations

import json
import re

import pytest
import torch

from launch.demo import main as demo_main
from launch.demo_plan import (
    QUICK_SIZES,
    SIZES,
    Calibration,
    Shape,
    Shares,
    SizeTiming,
    calibrate_size,
    plan,
)
from runtime.precision import resolve_precision

SHAPE, SHARES, TEST_PROBLEMS = Shape(), Shares(), 56
ARMS = ("baseline", "rho1-wmtp", "critic-wmtp")


def machine(step_s: float, decode_ms: float = 3.0, programs_per_s: float = 30.0) -> Calibration:
    """A calibration of every size: each smaller rung 1.8× cheaper; a pretraining step of 8 rows
    costs 3 fine-tuning steps of 4 (every position a target), stage 1 a third of one."""
    calibration = Calibration("float32", "test machine", programs_per_s=programs_per_s)
    for i, name in enumerate(SIZES):
        step = step_s / 1.8**i
        decode = decode_ms / 1000 / 1.5**i
        calibration.sizes[name] = SizeTiming(
            pretrain_step_s=3 * step,
            arm_step_s={"baseline": step, "rho1-wmtp": 1.2 * step, "critic-wmtp": 1.1 * step},
            stage1_step_s=step / 3,
            reference_step_s=0.5 * step,
            decode_step_s={1: decode / 3, 10: decode},
        )
    return calibration


def total(p) -> float:
    return sum(p.predicted_s.values())


def fits(p, budget: float = 1200) -> bool:
    shares = SHARES.base + SHARES.reference + SHARES.finetune + SHARES.evaluation
    return total(p) <= shares * budget + 1


def test_a_fast_machine_gets_the_largest_model_a_large_base_and_most_samples():
    p = plan(machine(0.15), SIZES, SHARES, SHAPE, 1200, 1, TEST_PROBLEMS)
    assert p.size == "micro-384" and p.base_tokens >= 2_000_000 and not p.notes
    assert p.finetune_steps == SHARES.max_finetune_steps and p.eval_samples == 10
    assert p.finetune_tokens < p.base_tokens  # a fine-tune, not a second pretraining
    assert fits(p) and p.stage1_steps == p.finetune_steps // 4


def test_auto_seeds_spend_a_large_budget_on_repeats_at_full_length():
    fast = plan(machine(0.15), SIZES, SHARES, SHAPE, 3600, None, TEST_PROBLEMS)
    assert fast.seeds == 3 and fast.finetune_steps == SHARES.max_finetune_steps
    one = plan(machine(0.4), SIZES, SHARES, SHAPE, 1200, None, TEST_PROBLEMS)
    assert one.seeds == 1


@pytest.mark.parametrize("slowdown", [4, 12])
def test_a_slow_machine_gets_a_smaller_model_and_still_fits_the_budget(slowdown):
    """An AVX2-only CPU in fp32 runs the step several times slower than one with bf16."""
    p = plan(machine(0.15 * slowdown), SIZES, SHARES, SHAPE, 1200, 1, TEST_PROBLEMS)
    assert p.size != "micro-384" and not p.notes
    assert p.finetune_steps >= SHARES.min_finetune_steps and p.base_tokens >= 1_000_000
    assert fits(p)


def test_a_budget_too_small_for_any_size_says_so():
    p = plan(machine(30.0), SIZES, SHARES, SHAPE, 300, 1, TEST_PROBLEMS)
    assert p.size == "micro-128" and "raise --minutes" in p.notes[0]


def test_a_cached_base_keeps_its_size_and_costs_nothing_to_build():
    fresh = plan(machine(0.6), SIZES, SHARES, SHAPE, 1200, 1, TEST_PROBLEMS)
    cached = plan(machine(0.6), SIZES, SHARES, SHAPE, 1200, 1, TEST_PROBLEMS,
                  cached=(fresh.size, fresh.base_tokens))  # fmt: skip
    assert cached.base_cached and cached.predicted_s["base"] == 0
    assert (cached.size, cached.finetune_steps, cached.eval_samples) == (
        fresh.size, fresh.finetune_steps, fresh.eval_samples,
    )  # the same experiment, with or without the cache  # fmt: skip
    assert total(cached) <= total(fresh) - fresh.predicted_s["base"] + 1


def test_slow_decoding_or_a_slow_sandbox_trade_samples_for_time_but_keep_every_problem():
    fast = plan(machine(0.6, decode_ms=3), SIZES, SHARES, SHAPE, 1200, 1, TEST_PROBLEMS)
    slow = plan(machine(0.6, decode_ms=60), SIZES, SHARES, SHAPE, 1200, 1, TEST_PROBLEMS)
    assert slow.eval_samples < fast.eval_samples == 10 and fits(slow)
    sandbox = plan(machine(0.6, programs_per_s=1), SIZES, SHARES, SHAPE, 1200, 1, TEST_PROBLEMS)
    assert sandbox.eval_samples < fast.eval_samples


def test_the_plan_says_how_the_regime_maps_to_the_7b_recipe():
    p = plan(machine(0.6), SIZES, SHARES, SHAPE, 1200, 1, TEST_PROBLEMS)
    text = p.regime(3e-3, 5e-4)
    assert "1T tokens" in text and "0.52B" in text and f"{p.base_tokens / 1e6:.1f}M" in text
    assert "6×" in text


def test_calibration_times_the_real_step_of_every_arm():
    from launch.demo import load_micro_recipe

    arms = {a: load_micro_recipe(a, ["weighting.reference_source=precomputed",
                                     "weighting.reference_ce_dir=/nowhere"]) for a in ARMS}  # fmt: skip
    t = calibrate_size(QUICK_SIZES["micro-64"], arms, Shape(seq_len=128, pretrain_rows=2,
                       finetune_rows=2, sample_tokens=64), resolve_precision("float32",
                       torch.device("cpu")), 2)  # fmt: skip
    assert set(t.arm_step_s) == set(ARMS) and all(s > 0 for s in t.arm_step_s.values())
    assert t.pretrain_step_s > 0 and t.stage1_step_s > 0 and t.reference_step_s > 0
    assert set(t.decode_step_s) == {1, 2}


def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo_main(["--quick", "--out", str(out), "--seeds", "2"]) == 0
    printed = capsys.readouterr().out
    for stage in range(1, 9):
        assert re.search(rf"^\[demo {stage}/8\] done in ", printed, re.M), stage
    assert re.search(r"^\[train\] 8/8 steps, ", printed, re.M)  # progress of every run
    assert re.search(r"^\[eval\] tasks decode \d+/\d+ problems, ", printed, re.M)
    assert "plan: micro-64 (64 wide), base pretrained on 40,000 tokens" in printed
    assert "[step 5] micro models: micro-mtp pretrained" in printed

    comparison = json.loads((out / "reports" / "comparison.json").read_text())
    assert comparison["baseline"] == "baseline" and "tasks" in comparison["benchmarks"]
    means = {}
    for algo in ("baseline", "rho1-wmtp", "critic-wmtp"):
        tasks = comparison["experiments"][algo]["tasks"]
        assert tasks["samples_per_problem"] == 2 * 2  # two seeds pooled, two samples each
        rates = pass_rates(out / "runs" / algo)  # recomputed from the verdicts on disk
        means[algo] = sum(rates.values()) / len(rates)
        ci = tasks["pass@1"]
        assert ci["mean"] == pytest.approx(means[algo])  # the comparison reads these verdicts
        assert ci["ci_low"] <= ci["mean"] <= ci["ci_high"]
        assert (ci["ci_low"] < ci["ci_high"]) == (len(set(rates.values())) > 1)
        if algo != "baseline":
            delta = tasks["delta_vs_baseline"]
            assert delta["mean"] == pytest.approx(means[algo] - means["baseline"])
            outside = not delta["ci_low"] <= 0 <= delta["ci_high"]
            healthy = all(comparison["health"][a]["ok"] for a in (algo, "baseline"))
            assert delta["significant"] == (delta["p_value"] < 0.05 and outside and healthy)
            assert delta["verdict"].startswith("inconclusive") != healthy
        assert "val_ce_head0" in comparison["training"][algo]
        for seed in (0, 1):
            run = out / "runs" / algo / f"seed{seed}"
            assert (run / "eval" / "tasks_samples.jsonl").is_file()
            assert list((run / "reports").glob("*.md"))

    summary = (out / "reports" / "demo-summary.md").read_text()
    assert (
        "| algorithm | pass@1 [95% CI] | Δ vs baseline [95% CI] | p (paired) | verdict |" in summary
    )
    assert "HumanEval (floor)" in summary and "Interval half-width" in summary
    for row in ("train tokens/s", "speculative: head 1 draft accepted", "validation CE, head 3"):
        assert row in summary
    assert "| fine-tuning |" in summary and "| base |" in summary  # planned against taken
    assert summary.index("## Did every arm train?") < summary.index("## Synthetic tasks")
    for algo in ("baseline", "rho1-wmtp", "critic-wmtp"):
        assert f"- **{algo}**: " in summary and "validation CE" in summary
    assert "value head explains" in summary  # the critic's own line
    for row in ("stopped by themselves", "timed out", "valid Python", "mean weight: EOS"):
        assert row in summary, row
    assert "## The pretrained base" in summary and "7B_1T_4 was pretrained on 1T tokens" in summary
    loss_chart = (out / "reports" / "demo-loss.svg").read_text()
    assert "optimizer step" in loss_chart and "cross-entropy (nats)" in loss_chart  # labelled
    assert loss_chart.count("baseline") >= 1 and "critic-wmtp" in loss_chart  # a legend
    heatmap = (out / "reports" / "demo-token-weights.html").read_text()
    assert all(f"· {algo} ·" in heatmap for algo in ("baseline", "rho1-wmtp", "critic-wmtp"))

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    names = {e.name for e in client.search_experiments()}
    assert {
        "mtp/baseline/tasks",
        "mtp/rho1-wmtp/tasks",
        "mtp/critic-wmtp/tasks",
        "mtp/eval",
    } <= names


def test_a_second_demo_reuses_the_cached_base(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo_main(["--quick", "--out", str(out), "--seeds", "1", "--algos", "baseline"]) == 0
    first = json.loads((out / "storage" / "models_v2" / "micro-mtp" / "metadata.json").read_text())
    capsys.readouterr()
    assert demo_main(["--quick", "--out", str(out), "--seeds", "1", "--algos", "baseline"]) == 0
    printed = capsys.readouterr().out
    assert "base (micro-64, cached: verify)" in printed
    assert "[step 5] already done (verified)" in printed and "[train] 10/10" not in printed
    again = json.loads((out / "storage" / "models_v2" / "micro-mtp" / "metadata.json").read_text())
    assert again == first
    assert "reused from the cache" in (out / "reports" / "demo-summary.md").read_text()


def pass_rates(algo_dir) -> dict[str, float]:
    """Per test task: the share of passing samples over every seed's eval of an algorithm."""
    passed: dict[str, list[bool]] = {}
    for samples in sorted(algo_dir.glob("seed*/eval/tasks_samples.jsonl")):
        for line in samples.read_text().splitlines():
            row = json.loads(line)
            passed.setdefault(row["task_id"], []).append(bool(row["passed"]))
    return {task: sum(v) / len(v) for task, v in passed.items()}


def test_bad_demo_arguments_are_one_line(capsys):
    for argv, message in ((["--minutes", "0"], "--minutes 0 is invalid"),
                          (["--seeds", "two"], "'two' is invalid")):  # fmt: skip
        assert demo_main(argv) == 2
        assert message in capsys.readouterr().err

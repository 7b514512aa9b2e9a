"""The demo: its planner sizes the stages to the budget on fast and slow machines, and
`python -m launch.demo --quick` runs every stage to a comparison with intervals."""

from __future__ import annotations

import json
import re

import pytest

from launch.demo import main as demo_main
from launch.demo_plan import SIZES, Calibration, Limits, plan, replan

LIMITS = Limits()
TEST_PROBLEMS = 56


def machine(
    train_step_s: float, decode_ms: float = 3.0, programs_per_s: float = 30.0
) -> Calibration:
    """A calibration of every size: each smaller rung is 1.8× cheaper."""
    calibration = Calibration("float32", "test machine", programs_per_s=programs_per_s)
    for i, size in enumerate(SIZES):
        step = train_step_s / 1.8**i
        calibration.train_step_s[size.name] = step
        calibration.ref_step_s[size.name] = step * 0.4
        full = decode_ms / 1000 / 1.5**i
        calibration.decode_step_s[size.name] = (full / 3, full)  # batch 1, batch 10
    return calibration


def total(p) -> float:
    return sum(p.predicted_s.values())


def test_a_fast_machine_gets_the_largest_model_full_length_and_most_samples():
    p = plan(machine(0.56), SIZES, LIMITS, 1200, 25, 1, TEST_PROBLEMS)
    assert p.size == SIZES[0].name and p.finetune_steps == LIMITS.max_steps
    assert p.eval_samples == max(LIMITS.samples) and not p.warnings
    assert total(p) <= 1200 * (1 - LIMITS.margin) - 25


def test_auto_seeds_spend_a_large_budget_on_repeats_at_full_length():
    fast = plan(machine(0.56), SIZES, LIMITS, 3600, 25, None, TEST_PROBLEMS)
    assert fast.seeds == 3 and fast.finetune_steps == LIMITS.max_steps
    twenty = plan(machine(0.56), SIZES, LIMITS, 1200, 25, None, TEST_PROBLEMS)
    assert twenty.seeds == 3 and twenty.finetune_steps == LIMITS.max_steps
    assert next(s for s in SIZES if s.name == twenty.size).repeatable
    assert total(twenty) <= 1200 * (1 - LIMITS.margin) - 25
    one = plan(machine(0.56), SIZES, LIMITS, 600, 25, None, TEST_PROBLEMS)
    assert one.seeds == 1  # two seeds at full length would not fit 10 minutes


@pytest.mark.parametrize("slowdown", [4, 12])
def test_a_slow_machine_gets_a_smaller_model_and_still_fits_the_budget(slowdown):
    """AVX2-only fp32 CPUs run the demo's step 4–12× slower than an AMX one in bf16."""
    p = plan(machine(0.56 * slowdown), SIZES, LIMITS, 1200, 60, 1, TEST_PROBLEMS)
    assert p.size != SIZES[0].name
    assert p.finetune_steps >= LIMITS.min_steps and not p.warnings
    assert total(p) <= 1200 * (1 - LIMITS.margin) - 60


def test_a_budget_too_small_for_any_size_says_so_and_keeps_a_floor():
    p = plan(machine(30.0), SIZES, LIMITS, 300, 60, 1, TEST_PROBLEMS)
    assert p.size == SIZES[-1].name and p.finetune_steps == LIMITS.floor_steps
    assert "raise --minutes" in p.warnings[0]


def test_slow_decoding_trades_samples_per_problem_for_time_but_keeps_every_problem():
    fast = plan(machine(1.5, decode_ms=3), SIZES, LIMITS, 1200, 25, 1, TEST_PROBLEMS)
    slow = plan(machine(1.5, decode_ms=60), SIZES, LIMITS, 1200, 25, 1, TEST_PROBLEMS)
    assert slow.eval_samples < fast.eval_samples == max(LIMITS.samples)
    assert slow.predicted_s["evaluation"] > fast.predicted_s["evaluation"]
    assert total(slow) <= 1200 * (1 - LIMITS.margin) - 25  # taken from training, not the budget


def test_a_slow_sandbox_counts_in_the_evaluation_and_costs_samples_not_the_budget():
    fast = plan(machine(1.5, programs_per_s=30), SIZES, LIMITS, 1200, 25, 1, TEST_PROBLEMS)
    slow = plan(machine(1.5, programs_per_s=3), SIZES, LIMITS, 1200, 25, 1, TEST_PROBLEMS)
    assert slow.predicted_s["evaluation"] > fast.predicted_s["evaluation"]
    assert slow.eval_samples < fast.eval_samples
    assert total(slow) <= 1200 * (1 - LIMITS.margin) - 25


def test_replan_resizes_fine_tuning_to_the_speed_the_reference_really_ran_at():
    calibration = machine(0.56 * 4)
    p = plan(calibration, SIZES, LIMITS, 1200, 60, 1, TEST_PROBLEMS)
    measured = calibration.ref_step_s[p.size]
    assert replan(p, calibration, LIMITS, measured * 1.1, 200, TEST_PROBLEMS) is p  # noise
    slower = replan(p, calibration, LIMITS, measured * 2, 60 + p.predicted_s["reference"] * 2,
                    TEST_PROBLEMS)  # fmt: skip
    assert slower.finetune_steps < p.finetune_steps and "2.00×" in slower.warnings[-1]
    spent = 60 + p.predicted_s["reference"] * 2
    assert spent + slower.predicted_s["fine-tuning"] + slower.predicted_s["evaluation"] <= 1200


def test_replan_takes_the_per_run_overhead_the_reference_really_had():
    """On a slow machine start-up, validation and export take longer too, not only the steps."""
    calibration = machine(0.56 * 12)
    p = plan(calibration, SIZES, LIMITS, 1200, 60, 1, TEST_PROBLEMS)
    measured = calibration.ref_step_s[p.size]
    same = replan(p, calibration, LIMITS, measured, 200, TEST_PROBLEMS, LIMITS.run_overhead_s)
    assert same is p
    slow_start = replan(p, calibration, LIMITS, measured, 200, TEST_PROBLEMS, 30.0)
    assert slow_start.finetune_steps < p.finetune_steps and "30s per run" in slow_start.warnings[-1]
    left = 1200 * (1 - LIMITS.margin) - 200 - 30.0  # the report run, at the measured overhead
    assert slow_start.predicted_s["fine-tuning"] + slow_start.predicted_s["evaluation"] <= left


def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo_main(["--quick", "--out", str(out), "--seeds", "2"]) == 0
    printed = capsys.readouterr().out
    for stage in range(1, 9):
        assert re.search(rf"^\[demo {stage}/8\] done in ", printed, re.M), stage
    assert re.search(r"^\[train\] 8/8 steps, ", printed, re.M)  # progress of every run
    assert re.search(r"^\[eval\] tasks decode \d+/\d+ problems, ", printed, re.M)
    assert "plan: model dim 64" in printed

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
            assert delta["significant"] == (delta["p_value"] < 0.05 and outside)
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
    assert "| fine-tuning |" in summary  # planned against taken
    assert (out / "reports" / "demo-loss.svg").read_text().count("<polyline") == 3
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

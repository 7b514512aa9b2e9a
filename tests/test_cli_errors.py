"""Bad input to every CLI is one line naming what and where, the documented exit code, no
traceback and nothing half-written (cases: tests/fault_cases.py BAD_INPUTS)."""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import pytest
import yaml

from model.weights import save_model_dir
from runtime.integrity import write_sha256sums
from tests.conftest import REPO_ROOT
from tests.fault_cases import BAD_INPUTS, render
from tests.micro_assets import write_recipe

MAINS = {
    "train_wmtp.py": "train_wmtp",
    "eval_harness.py": "eval_harness",
    "prepare_assets.py": "prepare_assets",
    "data.prepare": "data.prepare",
    "launch.launcher": "launch.launcher",
    "training.precompute_reference": "training.precompute_reference",
}


def flip_a_byte(directory: Path, suffix: str = ".safetensors") -> None:
    victim = next(directory.glob(f"*{suffix}"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))


def model_copy(micro, tmp: Path) -> Path:
    _, assets, _ = micro
    copy = tmp / "model"
    shutil.copytree(assets["mtp"], copy)
    return copy


def garbage(tmp: Path, name: str = "tokenizer.model") -> Path:
    path = tmp / name
    path.write_bytes(b"\x00\xff not a model \x13" * 20)
    return path


def build(case_id: str, micro, tmp: Path) -> tuple[list[str], Path | None]:
    """argv for the case, and a path that must not exist afterwards (nothing half-written)."""
    root, assets, config = micro
    out = tmp / "out"
    recipe = write_recipe(tmp / "r.yaml", assets, "baseline", out)
    train = [str(recipe), "--config", str(config)]
    evaluate = ["--config", str(config), "--no-mlflow", "--output-dir", str(out), "--tasks", "humaneval",
                "--limit", "1", "--tokenizer", str(assets["tokenizer"])]  # fmt: skip
    if case_id == "train-missing-recipe":
        return [str(tmp / "nope.yaml")], out
    if case_id == "train-unknown-option":
        return [*train, "--frobnicate"], out
    if case_id == "train-unknown-key":
        return [*train, "train.lrr=1"], out
    if case_id == "train-lr-inf":
        return [*train, "train.lr=inf"], out
    if case_id == "train-wrong-type":
        return [*train, "train.max_steps=abc"], out
    if case_id == "train-binary-data":
        binary = tmp / "train.jsonl"
        binary.write_bytes(bytes(range(256)) * 8)
        return [*train, f"data.train={binary}"], out
    if case_id == "train-corrupt-base":
        copy = model_copy(micro, tmp)
        flip_a_byte(copy)
        return [*train, f"model.base={copy}"], out
    if case_id == "train-corrupt-tokenizer":
        return [*train, f"model.tokenizer={garbage(tmp)}"], out
    if case_id == "train-output-dir":
        blocker = tmp / "a-file"
        blocker.write_text("x")
        return [*train, f"run.output_dir={blocker / 'run'}"], None
    if case_id == "eval-corrupt-ckpt":
        copy = model_copy(micro, tmp)
        flip_a_byte(copy)
        return ["--ckpt", str(copy), *evaluate], out
    if case_id == "eval-truncated":
        copy = model_copy(micro, tmp)
        shard = next(copy.glob("*.safetensors"))
        shard.write_bytes(shard.read_bytes()[:5])
        write_sha256sums(copy, [p.name for p in copy.iterdir() if p.name != "SHA256SUMS"])
        return ["--ckpt", str(copy), *evaluate], out
    if case_id == "eval-no-params":
        copy = model_copy(micro, tmp)
        (copy / "params.json").unlink()
        write_sha256sums(copy, [p.name for p in copy.iterdir() if p.name != "SHA256SUMS"])
        return ["--ckpt", str(copy), *evaluate], out
    if case_id == "eval-corrupt-tokenizer":
        return ["--ckpt", str(assets["mtp"]), *evaluate, "--tokenizer", str(garbage(tmp))], out
    if case_id == "eval-bad-k":
        return ["--ckpt", str(assets["mtp"]), *evaluate, "--k", "abc"], out
    if case_id == "eval-unknown-task":
        return ["--ckpt", str(assets["mtp"]), *evaluate, "--tasks", "foo"], out
    if case_id == "eval-missing-ckpt":
        return ["--ckpt", str(tmp / "nowhere"), *evaluate], out
    assets_config = tmp / "assets.yaml"
    assets_config.write_text(
        yaml.safe_dump({"storage": {"root": str(tmp / "storage"), "cache_dir": str(tmp / "cache")}})
    )
    if case_id == "assets-bad-step":
        return ["--step", "²", "--config", str(assets_config)], None
    if case_id == "assets-missing-config":
        return ["--step", "1", "--config", str(tmp / "nowhere.yaml")], None
    if case_id in ("assets-malformed-sums", "assets-corrupt-stamp"):
        from model import ModelArgs, Transformer

        args = ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=50, multiple_of=16)
        target = tmp / "storage" / "models_v2" / "micro-mtp" / "safetensors"
        save_model_dir(target, args, Transformer(args).state_dict())
        if case_id == "assets-malformed-sums":
            with open(target / "SHA256SUMS", "a") as f:
                f.write("this is not a sha256sum line\n")
        else:
            (target / ".verified.json").write_text("{not json")
        return ["--step", "9", "--config", str(assets_config)], None
    prepare = ["--output-dir", str(out), "--tokenizer", str(assets["tokenizer"])]
    if case_id == "prepare-unknown-dataset":
        return ["--dataset", "foo", *prepare], out
    if case_id == "prepare-missing-source":
        return ["--dataset", "mbpp", "--source-dir", str(tmp / "nowhere"), *prepare], out
    if case_id == "prepare-max-length":
        return ["--dataset", "humaneval", "--max-length", "10", *prepare], out
    if case_id == "prepare-bad-int":
        return ["--dataset", "humaneval", "--max-length", "abc", *prepare], out
    if case_id == "prepare-corrupt-tokenizer":
        return [
            "--dataset",
            "humaneval",
            "--output-dir",
            str(out),
            "--tokenizer",
            str(garbage(tmp)),
        ], out
    if case_id == "launcher-missing-recipe":
        return [str(tmp / "nope.yaml"), "--dry-run"], None
    if case_id == "launcher-unknown-option":
        return [str(recipe), "--dry-run", "--frobnicate"], None
    if case_id == "launcher-bad-config":
        bad = tmp / "bad.yaml"
        bad.write_text(yaml.safe_dump({"launcher": {"nnodes": 0}}))
        return [str(recipe), "--dry-run", "--config", str(bad)], None
    if case_id == "precompute-missing-recipe":
        return [str(tmp / "nope.yaml")], None
    raise AssertionError(f"no argv for case {case_id}")


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[b.id for b in BAD_INPUTS])
def test_bad_input_is_one_line_and_an_exit_code(case, micro, tmp_path, capsys):
    argv, must_not_exist = build(case.id, micro, tmp_path)
    main = importlib.import_module(MAINS[case.cli]).main
    code = main(argv) if case.cli != "prepare_assets.py" else main(argv)
    captured = capsys.readouterr()
    assert code == case.exit_code, captured.err[-2000:]
    assert "Traceback" not in captured.err + captured.out
    if case.exit_code == 2:
        lines = [line for line in captured.err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
        assert case.expect in lines[0], lines[0]
    elif case.expect:
        assert case.expect in captured.err + captured.out
    if must_not_exist is not None:
        assert not must_not_exist.exists(), f"{must_not_exist} was written"


def test_docs_reliability_is_generated_from_the_case_list():
    assert (REPO_ROOT / "docs" / "reliability.md").read_text() == render(), (
        "regenerate: python -m tests.fault_cases > docs/reliability.md"
    )

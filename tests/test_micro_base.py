"""`prepare_assets.py --step 5`: the micro base pretrained on Python source, cached by its corpus
key, rebuilt when the corpus changes, resumed after a kill, and broken caches named in one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from assets.pretrain import LeakFilter, SourceFile, chunks, corpus_files
from model.tokenizer import Tokenizer
from model.weights import load_model_dir
from prepare_assets import main as assets_main
from tests.conftest import REPO_ROOT

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS = ("textwrap.py", "colorsys.py", "bisect.py", "heapq.py", "string.py", "fnmatch.py",
          "shlex.py", "glob.py", "keyword.py", "graphlib.py")  # fmt: skip


def make_corpus(root: Path) -> Path:
    corpus = root / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for name in CORPUS:
        shutil.copyfile(STDLIB / name, corpus / name)
    (corpus / "tests").mkdir(exist_ok=True)  # test folders are left out
    (corpus / "tests" / "test_x.py").write_text("def test_x():\n    assert True\n")
    return corpus


def write_config(root: Path, corpus: Path, **micro) -> str:
    config = {
        "storage": {"root": str(root / "storage"), "cache_dir": str(root / "cache")},
        "mlflow": {"enabled": False},
        "assets": {"micro": {
            "dim": 32, "n_layers": 5, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32,
            "vocab_size": 400, "corpus_dirs": [str(corpus)], "holdout_fraction": 0.2,
            "pretrain_tokens": 6144, "pretrain_seq_len": 256, "pretrain_micro_batch": 4, **micro,
        }},
    }  # fmt: skip
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def build(config: str) -> int:
    return assets_main(["--step", "5", "--config", config])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    corpus = make_corpus(root)
    config = write_config(root, corpus)
    assert build(config) == 0
    return root, corpus, config


def metadata(root: Path, name: str = "micro-mtp") -> dict:
    return json.loads((root / "storage" / "models_v2" / name / "metadata.json").read_text())


def test_the_base_is_pretrained_and_records_how(built):
    root, corpus, _ = built
    meta = metadata(root)
    facts = meta["pretraining"]
    assert len(facts["corpus_sha256"]) == 64 and facts["corpus_files"] == len(CORPUS)
    assert facts["steps"] == 6 and 5000 < facts["tokens_seen"] <= 6144
    assert len(facts["held_out_ce_per_head"]) == 4
    assert all(0 < ce < 6.0 for ce in facts["held_out_ce_per_head"])  # below ln(400) = 6.0
    assert facts["train_seconds"] > 0 and facts["wall_seconds_this_build"] > 0
    args, state = load_model_dir(root / "storage" / "models_v2" / "micro-mtp" / "safetensors")
    assert args.n_future_tokens == 4 and not any(k.startswith("tests") for k in facts)
    ref_args, ref_state = load_model_dir(
        root / "storage" / "models_v2" / "micro-ref" / "safetensors"
    )
    assert ref_args.n_future_tokens == 1 and ref_args.n_layers == args.n_layers - 3
    for key, value in ref_state.items():  # the reference is the base's own next-token part
        assert (state[key] == value).all(), key
    assert metadata(root, "micro-ref")["pretraining"] == facts


def test_a_second_run_reuses_the_cached_base(built, capsys):
    root, _, config = built
    before = (root / "storage" / "models_v2" / "micro-mtp" / "metadata.json").stat().st_mtime_ns
    assert build(config) == 0
    assert "[step 5] already done (verified)" in capsys.readouterr().out
    after = (root / "storage" / "models_v2" / "micro-mtp" / "metadata.json").stat().st_mtime_ns
    assert after == before


def test_a_changed_corpus_builds_a_new_base(tmp_path, capsys):
    corpus = make_corpus(tmp_path)
    config = write_config(tmp_path, corpus)
    assert build(config) == 0
    first = metadata(tmp_path)["pretraining"]["corpus_sha256"]
    capsys.readouterr()
    with open(corpus / "textwrap.py", "a") as f:
        f.write("\n# one more line\n")
    assert build(config) == 0
    out = capsys.readouterr().out
    assert "[step 5] to do:" in out and "built from corpus" in out
    second = metadata(tmp_path)["pretraining"]["corpus_sha256"]
    assert second != first
    old = tmp_path / "storage" / "models_v2" / "micro-mtp" / "pretrain"
    assert [p.name for p in old.iterdir()] == [second[:16]]  # the stale build was removed


def test_a_malformed_manifest_is_named_then_rebuilt(built, tmp_path, capsys):
    root, corpus, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    config = write_config(copy, corpus)
    sums = copy / "storage" / "models_v2" / "micro-mtp" / "safetensors" / "SHA256SUMS"
    with open(sums, "a") as f:
        f.write("this is not a sha256sum line\n")
    assert build(config) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("[step 5] to do:"))
    assert f"{sums}:" in line and "malformed line" in line
    assert "this is not" not in sums.read_text()  # rebuilt: a fresh manifest


def test_a_corrupt_verification_stamp_is_named_and_everything_rehashed(built, tmp_path, capsys):
    root, corpus, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    stamp = copy / "storage" / "models_v2" / "micro-mtp" / "safetensors" / ".verified.json"
    stamp.write_text("{not json")
    assert build(write_config(copy, corpus)) == 0
    out = capsys.readouterr().out
    assert f"{stamp} is unreadable (JSONDecodeError" in out and "re-hashing every file" in out
    assert "[step 5] already done (verified)" in out  # the files were intact


def test_a_killed_pretraining_resumes_from_its_checkpoint(tmp_path):
    corpus = make_corpus(tmp_path)
    config = write_config(tmp_path, corpus, pretrain_tokens=10240)  # 10 steps, saved every 2
    plan = '{"kill_at_step": 5}'
    killed = subprocess.run(
        [sys.executable, "-m", "tests.faults", plan, "prepare_assets.py", "--step", "5",
         "--config", config], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert killed.returncode == 137, killed.stderr[-2000:]
    resumed = subprocess.run(
        [sys.executable, "prepare_assets.py", "--step", "5", "--config", config],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "[resume]" in resumed.stdout and "(step 4)" in resumed.stdout
    assert metadata(tmp_path)["pretraining"]["steps"] == 10


def test_files_with_an_evaluation_text_are_left_out():
    leaks = LeakFilter()
    humaneval = next(text for label, text in leaks.index.texts if "solution" in label)
    files = [SourceFile("a.py", "x = 1\n" * 20), SourceFile("b.py", f"# copied\n{humaneval}\n")]
    kept, dropped = leaks.split(files)
    assert [f.name for f in kept] == ["a.py"] and list(dropped) == ["b.py"]


def test_chunks_cut_at_lines_and_fit_the_row(tmp_path):
    from model.tokenizer import train_tokenizer

    texts = [f.text for f in corpus_files([make_corpus(tmp_path)], 10**6)]
    tok = Tokenizer(train_tokenizer(texts, tmp_path / "tok", vocab_size=400))
    pieces = chunks(texts[0], tok, 64)
    assert len(pieces) > 1 and "".join(pieces).strip() == texts[0].strip()
    assert all(len(tok.encode(p)) <= 64 for p in pieces)

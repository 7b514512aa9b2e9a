"""prepare_assets.py against local servers: a hub stand-in (HTTP + Range) and moto's S3."""

from __future__ import annotations

import json
import os
import re
import time

import pytest
import torch
import yaml

from assets.sources import Fetcher, FetchError, RemoteFile
from model.weights import load_model_dir
from prepare_assets import main as assets_main
from runtime.config import load_env_config
from tests.codecontests_fixture import fixture_problems, write_parquet
from tests.hub_server import HubServer
from tests.test_checkpoint import meta_7b_1t_4_keys

MBPP_SHA = "ccf64ceae9c5403bf50a044cb6d505bfd2a2963ee58338ba268fd65beab92a9f"
META_PARAMS = {
    "dim": 64,
    "n_layers": 32,
    "n_heads": 4,
    "multiple_of": 32,
    "norm_eps": 1e-5,
    "vocab_size": 32000,
    "n_future_tokens": 4,
    "rope_theta": 10000.0,
}


def synthetic_meta(tmp_path) -> dict[str, bytes]:
    from model import ModelArgs, Transformer

    args = ModelArgs.from_dict(META_PARAMS)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state = {
        k: (torch.randn(shapes.get(k, (16,)), generator=g) * 0.05).to(torch.bfloat16)
        for k in meta_7b_1t_4_keys()
    }
    torch.save(state, tmp_path / "consolidated.pth")
    return {
        "7B_1T_4/consolidated.pth": (tmp_path / "consolidated.pth").read_bytes(),
        "7B_1T_4/params.json": json.dumps(META_PARAMS).encode(),
    }


def synthetic_reference(tmp_path, tokenizer_bytes: bytes) -> dict[str, bytes]:
    transformers = pytest.importorskip("transformers")
    from tests.test_model import _save_pytorch_bin_shards

    config = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    out = tmp_path / "ref"
    _save_pytorch_bin_shards(transformers.LlamaForCausalLM(config), out, n_shards=2)
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    files["tokenizer.model"] = tokenizer_bytes
    files["tokenizer_config.json"] = b'{"add_bos_token": true}'
    files["special_tokens_map.json"] = b'{"bos_token": "<s>"}'
    return files


@pytest.fixture(scope="module")
def hub(tmp_path_factory, llama2_tokenizer_path, mbpp_path):
    tmp = tmp_path_factory.mktemp("hub")
    server = HubServer()
    tokenizer = llama2_tokenizer_path.read_bytes()
    for path, data in {**synthetic_meta(tmp), "tokenizer.model": tokenizer}.items():
        server.add("facebook/multi-token-prediction", path, data)
    for path, data in synthetic_reference(tmp, tokenizer).items():
        server.add("princeton-nlp/Sheared-LLaMA-2.7B", path, data)
    problems = fixture_problems(20)
    parquet = {}
    for i, chunk in enumerate((problems[:10], problems[10:])):
        write_parquet(chunk, tmp / f"p{i}.parquet")
        parquet[f"train-0000{i}-of-00002.parquet"] = (tmp / f"p{i}.parquet").read_bytes()
    server.add_tree("deepmind/code_contests", "data", parquet)
    server.files["/raw/mbpp.jsonl"] = mbpp_path.read_bytes()
    with server:
        yield server


def write_config(path, root, hub_url, **extra) -> str:
    config = {
        "storage": {"root": str(root / "storage"), "cache_dir": str(root / "cache")},
        "hub": {"base_url": hub_url},
        "mlflow": {"enabled": False},
        "assets": {
            "mbpp": {"url": f"{hub_url}/raw/mbpp.jsonl", "sha256": MBPP_SHA},
            "micro": {
                "dim": 32,
                "n_layers": 5,
                "n_heads": 4,
                "n_kv_heads": 2,
                "multiple_of": 32,
                "vocab_size": 1000,
                "max_corpus_mb": 0.3,
                "pretrain_tokens": 8192,
                "pretrain_seq_len": 256,
                "pretrain_micro_batch": 4,
            },
        },
    }
    for section, values in extra.items():
        config.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_full_pipeline_from_the_hub_then_idempotent(hub, tmp_path, capsys):
    config = write_config(tmp_path / "config.yaml", tmp_path, hub.url)
    (tmp_path / "storage" / "models").mkdir(parents=True)  # an old layout to clean up
    assert assets_main(["--step", "all", "--config", config]) == 0
    out = capsys.readouterr().out
    assert "11/11 steps pass" in out and "removed old layout" in out
    assert re.search(r"^  write safetensors [\d.]+/[\d.]+ MiB", out, re.M)  # conversion progress
    storage = tmp_path / "storage" / "models_v2"
    meta = json.loads((storage / "meta-llama-mtp" / "metadata.json").read_text())
    assert meta["dtype"] == "bfloat16" and meta["params"]["n_future_tokens"] == 4
    args, state = load_model_dir(storage / "meta-llama-mtp" / "safetensors")
    original = (
        torch.load(tmp_path.parent / "hub0" / "consolidated.pth", weights_only=True)
        if False
        else None
    )
    assert args.n_layers == 32 and len(state) == len(meta_7b_1t_4_keys()) - 1 and original is None
    adapter = yaml.safe_load(
        (storage / "meta-llama-mtp" / "configs" / "meta_adapter.yaml").read_text()
    )
    assert adapter["heads"] == ["layers.28", "extra_heads.0", "extra_heads.1", "extra_heads.2"]
    ref = json.loads((storage / "ref-sheared-llama-2.7b" / "metadata.json").read_text())
    assert ref["tokenizer_shared_with"] == "meta-llama-mtp"
    for micro in ("micro-mtp", "micro-ref"):
        micro_meta = json.loads((storage / micro / "metadata.json").read_text())
        assert micro_meta["dtype"] == "float16" and micro_meta["init"].startswith("sliced from")
        assert (
            micro_meta["pretraining"]["steps"] == 8 and micro_meta["pretraining"]["tokens_seen"] > 0
        )
    processed = tmp_path / "storage" / "datasets_v2"
    assert (processed / "codecontests" / "processed" / "train.jsonl").is_file()
    assert (processed / "mbpp" / "processed" / "test.jsonl").is_file()
    assert (
        tmp_path / "storage" / "datasets_local_small" / "mbpp" / "processed" / "train_small.jsonl"
    ).is_file()
    inventory = json.loads((tmp_path / "storage" / "inventory.json").read_text())
    assert any(f["path"].endswith("consolidated.pth") for f in inventory["files"])
    assert "| models_v2/meta-llama-mtp |" in (tmp_path / "storage" / "README.md").read_text()
    n_requests = len(hub.requests)
    start = time.perf_counter()
    for step in ("2", "3", "4", "7"):
        assert assets_main(["--step", step, "--config", config]) == 0
    assert (
        time.perf_counter() - start < 10 and len(hub.requests) == n_requests
    )  # verified, nothing fetched
    assert capsys.readouterr().out.count("already done (verified)") == 4
    assert assets_main(["--step", "11", "--config", config]) == 0


def test_corruption_after_the_fact_is_listed_by_the_integrity_step(hub, tmp_path, capsys):
    config = write_config(tmp_path / "config.yaml", tmp_path, hub.url)
    for step in ("1", "2", "3"):
        assert assets_main(["--step", step, "--config", config]) == 0
    shard = next(
        (tmp_path / "storage" / "models_v2" / "meta-llama-mtp" / "safetensors").glob(
            "*.safetensors"
        )
    )
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(1, 1))  # a different mtime: the quick check re-hashes it
    assert assets_main(["--step", "9", "--config", config]) == 1
    assert f"SHA256 mismatch for {shard}" in capsys.readouterr().err
    assert assets_main(["--step", "11", "--config", config]) == 1


def test_interrupted_download_resumes_with_range(hub, tmp_path):
    config = load_env_config(write_config(tmp_path / "c.yaml", tmp_path, hub.url))
    fetcher = Fetcher(config, tmp_path / "cache")
    path = "/facebook/multi-token-prediction/resolve/main/7B_1T_4/consolidated.pth"
    hub.cut_after[path] = 100_000
    remote = RemoteFile("facebook/multi-token-prediction", "7B_1T_4/consolidated.pth")
    dest = tmp_path / "raw" / "consolidated.pth"
    with pytest.raises(FetchError, match="hub: "):
        fetcher.fetch(remote, dest)
    part = dest.with_name("consolidated.pth.part")
    assert part.stat().st_size == 100_000 and not dest.exists()
    digest = fetcher.fetch(remote, dest)
    assert dest.read_bytes() == hub.files[path] and not part.exists()
    last_path, headers = [r for r in hub.requests if r[0] == path][-1]
    assert headers.get("Range") == "bytes=100000-"
    assert (tmp_path / "cache" / "cas" / "sha256" / digest).is_file()


def test_corrupted_download_is_rejected_and_not_kept(hub, tmp_path):
    config = load_env_config(write_config(tmp_path / "c.yaml", tmp_path, hub.url))
    remote = RemoteFile("facebook/multi-token-prediction", "7B_1T_4/params.json", sha256="0" * 64)
    dest = tmp_path / "params.json"
    with pytest.raises(FetchError, match="SHA256 mismatch for params.json.part"):
        Fetcher(config, tmp_path / "cache").fetch(remote, dest)
    assert not dest.exists() and not dest.with_name("params.json.part").exists()


def test_gated_hub_without_token_says_so(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with HubServer(token="hf_right") as gated:
        gated.add("facebook/multi-token-prediction", "tokenizer.model", b"x")
        config = load_env_config(write_config(tmp_path / "c.yaml", tmp_path, gated.url))
        remote = RemoteFile("facebook/multi-token-prediction", "tokenizer.model")
        with pytest.raises(FetchError, match="HTTP 401 .* set HF_TOKEN"):
            Fetcher(config, tmp_path / "cache").fetch(remote, tmp_path / "t.model")
        monkeypatch.setenv("HF_TOKEN", "hf_right")
        Fetcher(config, tmp_path / "cache").fetch(remote, tmp_path / "t.model")
        assert (tmp_path / "t.model").read_bytes() == b"x"


def test_s3_mirror_is_used_before_the_hub_and_resumes(s3, tmp_path):
    endpoint, client = s3
    data = os.urandom(300_000)
    client.put_object(
        Bucket="wmtp-mirror",
        Key="team/models/facebook/multi-token-prediction/7B_1T_4/params.json",
        Body=data,
    )
    config = load_env_config(
        write_config(
            tmp_path / "c.yaml",
            tmp_path,
            "http://127.0.0.1:9",
            s3={"bucket": "wmtp-mirror", "prefix": "team", "endpoint_url": endpoint},
        )
    )
    messages = []
    fetcher = Fetcher(config, tmp_path / "cache", log=messages.append)
    dest = tmp_path / "raw" / "params.json"
    dest.parent.mkdir()
    dest.with_name("params.json.part").write_bytes(
        data[:120_000]
    )  # an earlier, interrupted attempt
    fetcher.fetch(RemoteFile("facebook/multi-token-prediction", "7B_1T_4/params.json"), dest)
    assert dest.read_bytes() == data
    assert (
        "s3://wmtp-mirror/team/models/facebook/multi-token-prediction/7B_1T_4/params.json (resumed at 120000 bytes)"
        in messages[0]
    )


def test_hub_downloads_are_uploaded_to_the_s3_mirror(s3, hub, tmp_path):
    endpoint, client = s3
    config = load_env_config(
        write_config(
            tmp_path / "c.yaml",
            tmp_path,
            hub.url,
            s3={"bucket": "wmtp-mirror", "endpoint_url": endpoint, "upload": True},
        )
    )
    remote = RemoteFile("facebook/multi-token-prediction", "7B_1T_4/params.json")
    digest = Fetcher(config, tmp_path / "cache").fetch(remote, tmp_path / "params.json")
    head = client.head_object(
        Bucket="wmtp-mirror", Key="wmtp/models/facebook/multi-token-prediction/7B_1T_4/params.json"
    )
    assert head["Metadata"]["sha256"] == digest


def test_missing_s3_credentials_give_a_clear_message(tmp_path, monkeypatch):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    config = load_env_config(
        write_config(tmp_path / "c.yaml", tmp_path, "http://127.0.0.1:9", s3={"bucket": "b"})
    )
    with pytest.raises(
        FetchError, match="s3: S3 mirror s3://b/wmtp is configured but no AWS credentials"
    ):
        Fetcher(config, tmp_path / "cache").fetch(RemoteFile("r", "f.bin"), tmp_path / "f.bin")


def test_cleanup_keeps_old_layouts_with_a_download_in_progress(tmp_path, capsys):
    config = write_config(tmp_path / "config.yaml", tmp_path, "http://127.0.0.1:9")
    busy = tmp_path / "storage" / "datasets" / "x.bin.part.lock"
    busy.parent.mkdir(parents=True)
    busy.write_text(str(os.getpid()))
    (tmp_path / "storage" / "models_v1").mkdir()
    assert assets_main(["--step", "0", "--config", config]) == 0
    assert busy.exists() and not (tmp_path / "storage" / "models_v1").exists()
    assert "a download is in progress there" in capsys.readouterr().out


def test_dry_run_changes_nothing(tmp_path, capsys):
    config = write_config(tmp_path / "config.yaml", tmp_path, "http://127.0.0.1:9")
    assert (
        assets_main(["--step", "all", "--dry-run", "--config", config]) == 1
    )  # the checklist still fails
    assert not (tmp_path / "storage" / "models_v2").exists()
    assert "would run: create the v2 layout" in capsys.readouterr().out

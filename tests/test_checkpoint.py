"""Meta consolidated.pth loading, safetensors round trips and SHA256 verification."""

from __future__ import annotations

import json

import pytest
import torch

from model import ModelArgs, Transformer
from model.weights import (
    build_model,
    load_meta_checkpoint,
    load_model_dir,
    save_model_dir,
)
from runtime.integrity import ChecksumError, verify_sha256sums

# 7B_1T_4's params.json with the sizes shrunk; the key set below is the real one's structure.
SHRUNK_7B_1T_4 = {
    "dim": 64,
    "n_layers": 32,
    "n_heads": 4,
    "multiple_of": 32,
    "ffn_dim_multiplier": None,
    "norm_eps": 1e-5,
    "vocab_size": 96,
    "n_future_tokens": 4,
    "rope_theta": 10000.0,
}


def meta_7b_1t_4_keys(n_layers: int = 32, n_future: int = 4) -> list[str]:
    """The tensor names in Meta's 7B_1T_4 consolidated.pth, written out independently of model/."""
    block = [
        "attention.wq.weight",
        "attention.wk.weight",
        "attention.wv.weight",
        "attention.wo.weight",
        "feed_forward.w1.weight",
        "feed_forward.w2.weight",
        "feed_forward.w3.weight",
        "attention_norm.weight",
        "ffn_norm.weight",
    ]
    n_main = n_layers - n_future + 1
    keys = ["tok_embeddings.weight", "norm.weight", "output.weight", "rope.freqs"]
    keys += [f"layers.{i}.{b}" for i in range(n_main) for b in block]
    keys += [f"extra_heads.{i}.{b}" for i in range(n_future - 1) for b in block]
    return keys


def write_synthetic_meta_checkpoint(directory, dtype=torch.bfloat16, seed=0):
    args = ModelArgs.from_dict(SHRUNK_7B_1T_4)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key in meta_7b_1t_4_keys():
        shape = shapes.get(key, (args.head_dim // 2,))  # rope.freqs
        state[key] = torch.randn(shape, generator=generator).to(dtype)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / "consolidated.pth")
    (directory / "params.json").write_text(json.dumps(SHRUNK_7B_1T_4))
    return state


@pytest.fixture
def meta_dir(tmp_path):
    state = write_synthetic_meta_checkpoint(tmp_path / "7B_1T_4")
    return tmp_path / "7B_1T_4", state


def test_synthetic_7b_1t_4_loads_strict_and_ignores_only_rope_freqs(meta_dir):
    directory, original = meta_dir
    args, state = load_meta_checkpoint(directory)
    assert set(original) - set(state) == {"rope.freqs"}
    assert (args.n_layers, args.n_future_tokens) == (32, 4)
    model = build_model(args, state)
    assert len(model.layers) == 29 and len(model.extra_heads) == 3
    assert torch.equal(
        model.extra_heads[2].attention.wq.weight, original["extra_heads.2.attention.wq.weight"]
    )
    logits = model(torch.randint(0, 96, (1, 8)))
    assert logits.shape == (1, 8, 4, 96) and torch.isfinite(logits).all()


def test_meta_checkpoint_with_a_missing_key_fails_clearly(meta_dir):
    directory, original = meta_dir
    del original["extra_heads.1.ffn_norm.weight"]
    torch.save(original, directory / "consolidated.pth")
    args, state = load_meta_checkpoint(directory)
    with pytest.raises(KeyError, match=r"1 missing keys \['extra_heads.1.ffn_norm.weight'\]"):
        build_model(args, state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_load_meta_checkpoint_casts_dtype(meta_dir, dtype):
    _, state = load_meta_checkpoint(meta_dir[0], dtype=dtype)
    assert {t.dtype for t in state.values()} == {dtype}


@pytest.mark.parametrize("max_shard_bytes", [1 << 30, 256 << 10], ids=["single", "sharded"])
def test_safetensors_round_trip_is_bit_exact(meta_dir, tmp_path, max_shard_bytes):
    args, state = load_meta_checkpoint(meta_dir[0])
    files = save_model_dir(tmp_path / "st", args, state, max_shard_bytes=max_shard_bytes)
    shards = [f for f in files if f.endswith(".safetensors")]
    assert (len(shards) > 1) == (max_shard_bytes < 1 << 20)
    index = json.loads((tmp_path / "st" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(state)
    loaded_args, loaded = load_model_dir(tmp_path / "st")
    assert loaded_args == args
    assert set(loaded) == set(state)
    for key, tensor in state.items():
        assert loaded[key].dtype == tensor.dtype == torch.bfloat16
        assert torch.equal(loaded[key].view(torch.int16), tensor.view(torch.int16)), key


def test_flipped_byte_fails_sha256_verification_naming_the_file(meta_dir, tmp_path):
    args, state = load_meta_checkpoint(meta_dir[0])
    files = save_model_dir(tmp_path / "st", args, state, max_shard_bytes=256 << 10)
    victim = tmp_path / "st" / files[1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=rf"SHA256 mismatch for .*{files[1]}"):
        load_model_dir(tmp_path / "st")
    verify_sha256sums(tmp_path / "st", only=["params.json"])  # the other files still verify


def test_missing_sums_file_is_an_error(tmp_path):
    with pytest.raises(ChecksumError, match="no SHA256SUMS"):
        verify_sha256sums(tmp_path)


def test_multi_shard_meta_checkpoint_is_rejected(meta_dir):
    directory, _ = meta_dir
    (directory / "consolidated.01.pth").write_bytes(b"")
    (directory / "consolidated.pth").rename(directory / "consolidated.00.pth")
    with pytest.raises(ValueError, match="model-parallel shards"):
        load_meta_checkpoint(directory)


def test_load_checkpoint_dir_reads_meta_and_project_dirs(meta_dir, tmp_path):
    from model.weights import load_checkpoint_dir

    args, state = load_checkpoint_dir(meta_dir[0])
    save_model_dir(tmp_path / "st", args, state)
    args2, state2 = load_checkpoint_dir(tmp_path / "st")
    assert args2 == args and set(state2) == set(state)
    with pytest.raises(FileNotFoundError, match="model dir not found"):
        load_checkpoint_dir(tmp_path / "missing")

"""The hand-written MTP LLaMA against transformers' LlamaForCausalLM and against itself."""

from __future__ import annotations

import json

import pytest
import torch

from model import ModelArgs, Transformer
from model.hf import convert_hf_llama
from model.weights import build_model

SMALL = dict(dim=64, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=16, rope_theta=50000.0)


def _random_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**{**SMALL, **overrides}))
    model.init_weights(std=0.1, seed=seed)
    return model.eval()


@pytest.fixture(scope="module")
def hf_llama_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(1)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():  # HF's init leaves norms at 1 and is small; make it non-trivial
            p.add_(torch.randn_like(p) * 0.05)
    out = tmp_path_factory.mktemp("hf")
    return hf, out


def _save_pytorch_bin_shards(hf, out, n_shards: int) -> None:
    """The legacy layout of the Rho-1 reference: pytorch_model-0000i-of-0000N.bin + index."""
    hf.config.save_pretrained(out)
    state = hf.state_dict()
    keys = list(state)
    weight_map = {}
    for i in range(n_shards):
        name = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        shard = {k: state[k].clone() for k in keys[i::n_shards]}
        torch.save(shard, out / name)
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {}, "weight_map": weight_map}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pytorch_bin"])
def test_converted_hf_llama_matches_transformers_logits(hf_llama_dir, safe, tmp_path):
    hf, _ = hf_llama_dir
    if safe:
        hf.save_pretrained(tmp_path, max_shard_size="60KB")
        assert (tmp_path / "model.safetensors.index.json").is_file(), "expected sharded output"
    else:
        _save_pytorch_bin_shards(hf, tmp_path, n_shards=3)
    args, state = convert_hf_llama(tmp_path)
    assert (args.n_kv_heads, args.rope_theta, args.n_future_tokens) == (2, 500000.0, 1)
    ours = build_model(args, state).eval()
    tokens = torch.randint(0, 128, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens)[:, :, 0]
    assert (got - expected).abs().max().item() < 1e-4


def test_head0_equals_plain_llama_of_trunk_plus_last_layer():
    mtp = _random_model(n_layers=5, n_future_tokens=3)
    assert len(mtp.layers) == 3 and len(mtp.extra_heads) == 2
    plain = Transformer(ModelArgs(**SMALL, n_layers=3, n_future_tokens=1)).eval()
    plain_keys = set(plain.state_dict())
    plain.load_state_dict({k: v for k, v in mtp.state_dict().items() if k in plain_keys})
    tokens = torch.randint(0, 128, (3, 20))
    with torch.no_grad():
        heads = mtp(tokens)
        reference = plain(tokens)[:, :, 0]
    assert heads.shape == (3, 20, 3, 128)
    torch.testing.assert_close(heads[:, :, 0], reference, rtol=0, atol=1e-5)
    for k in (1, 2):
        assert (heads[:, :, k] - reference).abs().max() > 1e-2, f"head {k} equals head 0"


def test_head_function_path_equals_stacked_forward():
    model = _random_model(n_layers=4, n_future_tokens=4)
    tokens = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        stacked = model(tokens)
        trunk = model.trunk(tokens)
        per_head = [model.head_logits(trunk, k) for k in range(4)]
    for k, logits in enumerate(per_head):
        torch.testing.assert_close(logits.float(), stacked[:, :, k], rtol=0, atol=0)
    with pytest.raises(IndexError, match="head 4 out of range"):
        model.head_logits(trunk, 4)


def test_model_trains_gradients_reach_trunk_and_every_head():
    model = _random_model(n_layers=4, n_future_tokens=2).train()
    tokens = torch.randint(0, 128, (2, 12))
    model(tokens).logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_a_sample_inside_a_packed_row_has_its_logits_alone():
    model = _random_model(n_layers=5, n_future_tokens=4)
    gen = torch.Generator().manual_seed(3)
    samples = [torch.randint(0, 128, (1, n), generator=gen) for n in (7, 12, 5)]
    row = torch.cat([*samples, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    segments = torch.tensor([[0] * 7 + [1] * 12 + [2] * 5 + [-1] * 6])
    with torch.no_grad():
        packed = model(row, segment_ids=segments)
        leaky = model(row)
        alone = [model(s) for s in samples]
    start = 0
    for sample, logits in zip(samples, alone, strict=True):
        end = start + sample.shape[1]
        torch.testing.assert_close(packed[:, start:end], logits, rtol=0, atol=1e-4)  # all heads
        start = end
    assert (leaky[:, 7:19] - alone[1]).abs().max() > 1e-2  # without segment ids it leaks
    assert torch.isfinite(packed).all()  # padding attends only to padding: no empty rows


def test_segment_positions_restart_at_each_sample():
    from model.transformer import segment_positions

    segments = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1], [0, 0, 0, 0, 0, 0, 0, 0]])
    assert segment_positions(segments).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]


@pytest.mark.parametrize("prefill", [1, 9])
def test_kv_cache_incremental_decoding_equals_full_forward(prefill):
    model = _random_model(n_layers=4, n_future_tokens=3)
    tokens = torch.randint(0, 128, (2, 24))
    cache = model.new_cache(max_batch_size=2, max_seq_len=32)
    with torch.no_grad():
        full = model(tokens)
        parts = [model(tokens[:, :prefill], 0, cache)]
        pos = prefill
        for step in (1, 3, 1, 5):  # single tokens and multi-token chunks (speculative verify)
            parts.append(model(tokens[:, pos : pos + step], pos, cache))
            pos += step
        parts += [model(tokens[:, i : i + 1], i, cache) for i in range(pos, 24)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)


def test_kv_cache_rejects_overflow():
    model = _random_model(n_layers=2, n_future_tokens=1)
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="KV cache holds"):
        model(torch.zeros(1, 5, dtype=torch.long), 0, cache)


def test_bf16_forward_is_close_to_fp32():
    model = _random_model(n_layers=3, n_future_tokens=2)
    tokens = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        fp32 = model(tokens)
        bf16 = model.to(torch.bfloat16)(tokens)
    assert bf16.dtype == torch.float32  # logits are upcast like Meta's reference
    assert (bf16 - fp32).abs().max() < 0.1 * fp32.abs().max()


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"n_heads": 5}, "n_heads"),
        ({"n_kv_heads": 3}, "n_kv_heads"),
        ({"n_layers": 2, "n_future_tokens": 4}, "n_layers"),
        ({"vocab_size": -1}, "vocab_size"),
    ],
)
def test_model_args_reject_bad_values_naming_the_key(overrides, key):
    with pytest.raises(ValueError, match=f"ModelArgs.{key}="):
        ModelArgs(**{**SMALL, **overrides})


def test_7b_1t_4_layout():
    args = ModelArgs(n_layers=32, n_future_tokens=4)
    assert args.n_trunk_layers == 28 and args.hidden_dim == 11008
    with torch.device("meta"):
        model = Transformer(args)
    assert len(model.layers) == 29 and len(model.extra_heads) == 3
    assert sum(p.numel() for p in model.parameters()) == 6_738_415_616  # LLaMA-2 7B's size

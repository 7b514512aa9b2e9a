"""`python -m model.export --format hf`: transformers loads head 0 with WMTP's logits, AutoTokenizer
works, the extra heads travel beside it, and the way back is exact."""

from __future__ import annotations

import json

import pytest
import torch

from model import ModelArgs, Transformer
from model.export import main as export_main
from model.weights import load_model_dir, save_model_dir

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def wmtp_dir(tmp_path_factory, llama2_tokenizer_path):
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=5, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=16,
                     n_future_tokens=4, rope_theta=500000.0, max_seq_len=128)  # fmt: skip
    model = Transformer(args)
    model.init_weights(std=0.05, seed=0)
    out = tmp_path_factory.mktemp("wmtp") / "model"
    save_model_dir(
        out, args, model.state_dict(), extra_files={"tokenizer.model": llama2_tokenizer_path}
    )
    return out, model.eval()


def test_transformers_loads_head_0_with_the_same_logits(wmtp_dir, tmp_path):
    src, model = wmtp_dir
    assert export_main([str(src), str(tmp_path / "hf"), "--format", "hf"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float32
    ).eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.num_hidden_layers == 2
    tokens = torch.randint(0, 32000, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens)[:, :, 0]
        theirs = hf(tokens).logits
    assert (ours - theirs).abs().max().item() < 1e-4


def test_auto_tokenizer_works_with_the_exported_tokenizer(wmtp_dir, tmp_path):
    from model.tokenizer import Tokenizer

    src, _ = wmtp_dir
    export_main([str(src), str(tmp_path / "hf")])
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = Tokenizer(tmp_path / "hf" / "tokenizer.model")
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (ours.bos_id, ours.eos_id)
    text = "def add(a, b): return a + b # sum of two numbers"
    assert hf_tok(text)["input_ids"] == ours.encode(text, bos=True)
    code = "def add(a, b):\n    return a + b\n"  # indentation: HF merges runs of spaces its own way
    assert hf_tok.decode(ours.encode(code), skip_special_tokens=True) == code
    assert hf_tok.decode(hf_tok(code)["input_ids"], skip_special_tokens=True) == code


def test_the_extra_heads_are_kept_and_the_round_trip_is_exact(wmtp_dir, tmp_path):
    src, _ = wmtp_dir
    export_main([str(src), str(tmp_path / "hf")])
    note = json.loads((tmp_path / "hf" / "mtp_heads.json").read_text())
    assert note["n_future_tokens"] == 4 and len(note["tensors"]) == 3 * 9
    assert export_main([str(tmp_path / "hf"), str(tmp_path / "back"), "--format", "wmtp"]) == 0
    args, state = load_model_dir(src)
    args2, state2 = load_model_dir(tmp_path / "back")
    assert args2 == args and set(state2) == set(state)
    assert all(torch.equal(state[k], state2[k]) for k in state)

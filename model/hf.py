"""Hugging Face LLaMA interop: import a `LlamaForCausalLM` checkpoint (the Rho-1 reference),
and export a WMTP model so that `transformers` loads it.

HF stores q/k projections in the rotate-half layout; Meta (and this project) rotate adjacent
pairs. `unpermute_rotary` / `permute_rotary` convert between the two exactly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from model.args import ModelArgs
from model.weights import _cast

_HF_LAYER_KEYS = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_HF_TOP_KEYS = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def hf_config_to_args(config: dict) -> ModelArgs:
    if config.get("model_type", "llama") != "llama":
        raise ValueError(f"config.json model_type={config['model_type']!r}: only 'llama' converts")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"config.json rope scaling {rope!r} is not supported (only 'default')")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise ValueError(f"config.json {key}=true is not supported: LLaMA has no biases")
    n_heads = config["num_attention_heads"]
    if config.get("head_dim", config["hidden_size"] // n_heads) != config["hidden_size"] // n_heads:
        raise ValueError(f"config.json head_dim={config['head_dim']} != hidden_size/heads")
    rope_theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    return ModelArgs(
        dim=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        vocab_size=config["vocab_size"],
        ffn_hidden_dim=config["intermediate_size"],
        norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        n_future_tokens=1,
        max_seq_len=config.get("max_position_embeddings", 2048),
    )


def unpermute_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undoes HF's q/k permutation (rotate-half layout back to Meta's interleaved pairs)."""
    out_dim, in_dim = weight.shape
    return (
        weight.view(n_heads, 2, out_dim // n_heads // 2, in_dim)
        .transpose(1, 2)
        .reshape(out_dim, in_dim)
    )


def _hf_weight_files(hf_dir: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = hf_dir / index_name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [hf_dir / f for f in files]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (hf_dir / single).is_file():
            return [hf_dir / single]
    raise FileNotFoundError(f"no HF weights (*.safetensors / pytorch_model*.bin) in {hf_dir}")


def _iter_hf_tensors(files: Iterable[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118
                    yield key, f.get_tensor(key)
        else:
            yield from torch.load(path, map_location="cpu", mmap=True, weights_only=True).items()


def convert_hf_llama(
    hf_dir: str | Path, dtype: torch.dtype | None = None
) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """Converts a HF LlamaForCausalLM checkpoint dir into (ModelArgs, Meta-named state dict)."""
    hf_dir = Path(hf_dir)
    args = hf_config_to_args(json.loads((hf_dir / "config.json").read_text()))
    state: dict[str, torch.Tensor] = {}
    for key, tensor in _iter_hf_tensors(_hf_weight_files(hf_dir)):
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if key in _HF_TOP_KEYS:
            state[_HF_TOP_KEYS[key]] = tensor
            continue
        match = _HF_LAYER_RE.match(key)
        if not match or match.group(2) not in _HF_LAYER_KEYS:
            raise KeyError(f"unexpected tensor {key!r} in HF checkpoint {hf_dir}")
        layer, suffix = match.groups()
        if suffix == "self_attn.q_proj.weight":
            tensor = unpermute_rotary(tensor, args.n_heads)
        elif suffix == "self_attn.k_proj.weight":
            tensor = unpermute_rotary(tensor, args.kv_heads)
        state[f"layers.{layer}.{_HF_LAYER_KEYS[suffix]}"] = tensor
    if "output.weight" not in state:  # tie_word_embeddings
        state["output.weight"] = state["tok_embeddings.weight"]
    return args, _cast(state, dtype)


# --- export --------------------------------------------------------------------------------

HF_WEIGHTS = "model.safetensors"
MTP_HEADS = "mtp_heads.safetensors"
MTP_NOTE = "mtp_heads.json"


def permute_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved q/k rows → HF's rotate-half layout (the inverse of `unpermute_rotary`)."""
    out_dim, in_dim = weight.shape
    return (
        weight.view(n_heads, out_dim // n_heads // 2, 2, in_dim)
        .transpose(1, 2)
        .reshape(out_dim, in_dim)
    )


def args_to_hf_config(args: ModelArgs, dtype: torch.dtype, bos_id: int, eos_id: int) -> dict:
    """A LlamaConfig for head 0's path: the trunk plus head 0's block (`n_trunk + 1` layers)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_trunk_layers + 1,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "dtype": str(dtype).removeprefix("torch."),
    }


def to_hf_state(args: ModelArgs, state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(HF LlamaForCausalLM state of head 0's path, the extra heads' tensors by WMTP name)."""
    inverse_layer = {ours: theirs for theirs, ours in _HF_LAYER_KEYS.items()}
    inverse_top = {ours: theirs for theirs, ours in _HF_TOP_KEYS.items()}
    hf, heads = {}, {}
    for name, tensor in state.items():
        if name in inverse_top:
            hf[inverse_top[name]] = tensor
            continue
        if name.startswith("extra_heads."):
            heads[name] = tensor
            continue
        layer, suffix = re.match(r"^layers\.(\d+)\.(.+)$", name).groups()
        if suffix == "attention.wq.weight":
            tensor = permute_rotary(tensor, args.n_heads)
        elif suffix == "attention.wk.weight":
            tensor = permute_rotary(tensor, args.kv_heads)
        hf[f"model.layers.{layer}.{inverse_layer[suffix]}"] = tensor
    return hf, heads


def tokenizer_files(bos_id: int, eos_id: int, pad_id: int) -> dict[str, dict]:
    """tokenizer_config.json and special_tokens_map.json for a LLaMA sentencepiece tokenizer."""
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
        "sp_model_kwargs": {},
        **special,
    }
    if pad_id not in (bos_id, eos_id):
        config["pad_token"] = special["pad_token"] = "<pad>"
    return {"tokenizer_config.json": config, "special_tokens_map.json": special}


def mtp_note(args: ModelArgs, heads: dict[str, torch.Tensor]) -> dict:
    """How to use the extra heads a plain LLaMA loader leaves out."""
    return {
        "format": "wmtp-mtp-heads-v1",
        "n_future_tokens": args.n_future_tokens,
        "n_trunk_layers": args.n_trunk_layers,
        "tensors": sorted(heads),
        "how_to_use": (
            "The Llama model in this directory is head 0 (next token): trunk = "
            f"model.layers[:{args.n_trunk_layers}], head 0 = model.layers[{args.n_trunk_layers}]. "
            f"{MTP_HEADS} holds heads 1..{args.n_future_tokens - 1} as LLaMA blocks named "
            "extra_heads.K.* (Meta's names, q/k in Meta's interleaved rotary layout). Head k+1 "
            "reads the trunk's output (the hidden state before head 0's block) and feeds the "
            "shared model.norm and lm_head, predicting the token k+2 positions ahead. To get the "
            "full MTP model back: python -m model.export THIS_DIR OUT --format wmtp."
        ),
        "tokenizer": (
            "tokenizer.model is the sentencepiece model WMTP trained with. transformers' fast "
            "LLaMA tokenizer (what AutoTokenizer returns) agrees with it except on runs of "
            "spaces, which it merges differently (as for Meta's LLaMA-2 on the Hub); for ids "
            "identical to training, encode with sentencepiece and tokenizer.model."
        ),
        "params": args.to_dict(),
    }
